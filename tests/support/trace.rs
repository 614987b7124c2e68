//! Fixture traces (`fixtures/ami/*.ami`): raw bytes as an AMI client received
//! them from Asterisk 20, banner and login reply included.

use bytes::BytesMut;
use callbridge::ami::codec::{decode_all, AmiCodec, AmiMessage, CodecLimits};
use callbridge::ami::Frame;
use std::path::PathBuf;
use tokio_util::codec::Decoder;

/// Directory of the AMI fixtures.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/ami")
}

/// Every fixture trace as (file name, bytes), sorted by name.
pub fn all() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir())
        .expect("fixtures/ami exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "ami"))
        .map(|p| {
            let name = p.file_name().expect("file name").to_string_lossy().into_owned();
            let bytes = std::fs::read(&p).expect("readable fixture");
            (name, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no fixture traces found");
    out
}

/// One fixture by file name (`a01-inbound-answered.ami`).
pub fn load(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("cannot read fixture {name}: {e}"))
}

/// The part of a trace after its banner line and the replies (`Response:`
/// frames) that follow it: what can be streamed to a client that logged in
/// for real. Starts at the first event.
pub fn events_part(trace: &[u8]) -> &[u8] {
    let mut rest = trace;
    if rest.starts_with(b"Asterisk Call Manager/") {
        let nl = rest.iter().position(|&c| c == b'\n').map_or(rest.len(), |i| i + 1);
        rest = &rest[nl..];
    }
    loop {
        let skip_blank = rest.iter().take_while(|&&c| c == b'\r' || c == b'\n').count();
        rest = &rest[skip_blank..];
        if !rest.starts_with(b"Response:") {
            return rest;
        }
        match find_frame_end(rest) {
            Some(end) => rest = &rest[end..],
            None => return &rest[rest.len()..],
        }
    }
}

/// End (exclusive) of the first frame of `bytes`, closing empty line included.
pub fn find_frame_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Byte offsets where each frame of `bytes` ends (closing empty line
/// included), for cutting a stream between or inside frames.
pub fn frame_ends(bytes: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut pos = 0;
    while let Some(end) = find_frame_end(&bytes[pos..]) {
        pos += end;
        ends.push(pos);
    }
    ends
}

/// Decodes a whole byte slice with default limits.
pub fn decode(bytes: &[u8]) -> Vec<AmiMessage> {
    let mut out = Vec::new();
    decode_all(&mut AmiCodec::default(), bytes, |m| out.push(m));
    out
}

/// Decodes `bytes` fed in the given chunk sizes (cycled), then EOF.
pub fn decode_chunked(bytes: &[u8], chunks: &[usize], limits: CodecLimits) -> Vec<AmiMessage> {
    let mut codec = AmiCodec::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut sizes = chunks.iter().copied().filter(|&n| n > 0).cycle();
    while pos < bytes.len() {
        let n = sizes.next().unwrap_or(bytes.len()).min(bytes.len() - pos);
        buf.extend_from_slice(&bytes[pos..pos + n]);
        pos += n;
        while let Some(m) = codec.decode(&mut buf).expect("decoding from memory cannot fail") {
            out.push(m);
        }
    }
    while let Some(m) = codec.decode_eof(&mut buf).expect("decoding from memory cannot fail") {
        out.push(m);
    }
    out
}

/// Only the frames of decoded messages.
pub fn frames(messages: &[AmiMessage]) -> Vec<Frame> {
    messages
        .iter()
        .filter_map(|m| match m {
            AmiMessage::Frame(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

/// How many lifecycle events a fixture trace makes (`fixtures/expected/<name>.jsonl`).
pub fn expected_events(name: &str) -> usize {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/expected").join(format!("{name}.jsonl"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).lines().count()
}
