//! Hostile input: the codec's memory stays bounded and the stream survives
//! 100 MB of random bytes, a 50 MB frame and endless headers, both in memory
//! and through a real loopback connection to the AMI client.

mod support;

use bytes::BytesMut;
use callbridge::ami::codec::{AmiCodec, AmiMessage, CodecLimits, MalformedReason};
use callbridge::ami::connection::SourceItem;
use support::client::TestClient;
use support::server::{AmiServer, ServerOptions};
use tokio_util::codec::Decoder;

const MIB: usize = 1 << 20;
const CHUNK: usize = 64 * 1024;

/// splitmix64: seeded, fast even in debug builds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Feeds chunks to a decoder, asserting after every step that the buffer
/// holds at most `max_frame_bytes` plus one chunk; returns every message.
struct Feeder {
    codec: AmiCodec,
    buf: BytesMut,
    limit: usize,
    out: Vec<AmiMessage>,
    high_water: usize,
}

impl Feeder {
    fn new(limits: CodecLimits) -> Feeder {
        Feeder {
            codec: AmiCodec::new(limits),
            buf: BytesMut::with_capacity(limits.max_frame_bytes + CHUNK),
            limit: limits.max_frame_bytes + CHUNK,
            out: Vec::new(),
            high_water: 0,
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        self.check();
        while let Some(m) = self.codec.decode(&mut self.buf).expect("in-memory decoding cannot fail") {
            self.check();
            self.out.push(m);
        }
        self.check();
        assert!(self.codec.pending_bytes() <= self.limit, "pending {}", self.codec.pending_bytes());
    }

    fn check(&mut self) {
        self.high_water = self.high_water.max(self.buf.len());
        assert!(self.buf.len() <= self.limit, "buffer grew to {} bytes (bound {})", self.buf.len(), self.limit);
    }

    fn finish(mut self) -> (Vec<AmiMessage>, usize) {
        while let Some(m) = self.codec.decode_eof(&mut self.buf).expect("in-memory decoding cannot fail") {
            self.out.push(m);
        }
        (self.out, self.high_water)
    }
}

fn last_frame_event(messages: &[AmiMessage]) -> Option<String> {
    messages.iter().rev().find_map(|m| match m {
        AmiMessage::Frame(f) => Some(f.event().unwrap_or("").to_string()),
        _ => None,
    })
}

#[test]
fn hundred_megabytes_of_random_bytes_stay_bounded_and_the_stream_survives() {
    let limits = CodecLimits::default();
    let mut feeder = Feeder::new(limits);
    let mut rng = Rng(0x00C0_FFEE);
    let mut chunk = vec![0u8; CHUNK];
    let mut fed = 0;
    while fed < 100 * MIB {
        rng.fill(&mut chunk);
        feeder.feed(&chunk);
        fed += CHUNK;
    }
    // Close whatever the garbage left open, then a real event.
    feeder.feed(b"\r\n\r\nEvent: Survivor\r\nChannel: SIP/2000-01\r\n\r\n");
    let (out, high_water) = feeder.finish();
    let malformed: u64 = out
        .iter()
        .filter_map(|m| match m {
            AmiMessage::Malformed(m) => Some(m.bytes),
            _ => None,
        })
        .sum();
    assert!(malformed > 90 * MIB as u64, "random bytes are reported as skipped ({malformed} bytes)");
    assert_eq!(last_frame_event(&out).as_deref(), Some("Survivor"));
    assert!(high_water <= limits.max_frame_bytes + CHUNK);
}

#[test]
fn a_fifty_megabyte_frame_is_skipped_in_bounded_memory() {
    let limits = CodecLimits::default();
    let mut feeder = Feeder::new(limits);
    feeder.feed(b"Event: Huge\r\nValue: ");
    let filler = vec![b'x'; CHUNK];
    let total = 50 * MIB;
    let mut fed = 0;
    while fed < total {
        feeder.feed(&filler);
        fed += CHUNK;
    }
    feeder.feed(b"\r\n\r\nEvent: After\r\n\r\n");
    let (out, _) = feeder.finish();
    assert_eq!(out.len(), 2, "{out:?}");
    match &out[0] {
        AmiMessage::Malformed(m) => {
            assert_eq!(m.reason, MalformedReason::TooLarge);
            assert_eq!(m.bytes as usize, "Event: Huge\r\nValue: ".len() + total + 4);
        }
        other => panic!("expected the huge frame to be skipped, got {other:?}"),
    }
    assert_eq!(last_frame_event(&out).as_deref(), Some("After"));
}

#[test]
fn endless_headers_are_skipped_in_bounded_memory() {
    let limits = CodecLimits::default();
    let mut feeder = Feeder::new(limits);
    feeder.feed(b"Event: Endless\r\n");
    let lines: Vec<u8> = b"X-Header: y\r\n".iter().copied().cycle().take(13 * 5000).collect();
    for _ in 0..(20 * MIB / lines.len()) {
        feeder.feed(&lines);
    }
    feeder.feed(b"\r\nEvent: After\r\n\r\n");
    let (out, _) = feeder.finish();
    assert!(matches!(&out[0], AmiMessage::Malformed(m) if m.reason == MalformedReason::TooManyHeaders), "{out:?}");
    assert_eq!(last_frame_event(&out).as_deref(), Some("After"));
    assert_eq!(out.len(), 2);
}

#[tokio::test]
async fn garbage_and_oversized_frames_on_the_wire_do_not_stop_the_client() {
    let server = AmiServer::start(ServerOptions::default()).await;
    let mut client = TestClient::spawn(server.client_config());
    client.until(|i| matches!(i, SourceItem::Resync(_))).await;

    let mut garbage = vec![0u8; 8 * MIB];
    Rng(42).fill(&mut garbage);
    server.send_bytes(&garbage);
    server.send_bytes(b"\r\n\r\n");
    let mut huge = b"Event: Huge\r\nValue: ".to_vec();
    huge.resize(huge.len() + 3 * MIB, b'x');
    huge.extend_from_slice(b"\r\n\r\n");
    server.send_bytes(&huge);
    for i in 0..100 {
        server.send_frame(&[("Event", "UserEvent"), ("UserEvent", "AfterGarbage"), ("Seq", &i.to_string())]);
    }
    // Random bytes may hold a line that happens to look like a header; such
    // a "frame" is passed on like any other. The real events must all come,
    // in order, and the connection must stay up.
    let mut seqs = Vec::new();
    while seqs.len() < 100 {
        if let SourceItem::Frame(f) = client.next().await {
            if f.get("UserEvent") == Some("AfterGarbage") {
                seqs.push(f.get("Seq").unwrap_or("").to_string());
            }
            assert_ne!(f.event(), Some("Huge"), "the oversized frame is never delivered");
        }
    }
    assert_eq!(seqs, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
    assert_eq!(server.accepted(), 1, "no reconnect");
    assert!(client.handle.is_connected());
    client.stop().await.expect("clean stop");
}
