//! Cuts the AMI byte stream into frames (`tokio_util::codec::Decoder`).
//!
//! AMI is line based: a frame is a run of `Key: Value` lines closed by an empty
//! line; the very first line of a connection is the banner
//! `Asterisk Call Manager/x.y.z`, which has no closing empty line. Asterisk
//! sends CRLF; LF-only streams (proxies, hand-written traces) are accepted.
//!
//! The decoder scans each byte once: it remembers where it stopped in an
//! incomplete frame and the header positions it already found, so a frame that
//! arrives one byte at a time costs the same as one that arrives whole.
//!
//! Bounds, so that hostile input can never grow memory or stop the stream:
//! - a frame larger than `max_frame_bytes`, or with more than `max_headers`
//!   lines, is skipped up to the next empty line and reported as
//!   [`AmiMessage::Malformed`]; while skipping, the decoder keeps at most two
//!   bytes of it in the buffer;
//! - a frame whose first line is not a header (binary garbage) is reported the
//!   same way; the stream resynchronises at the next empty line.
//!
//! The decoder never fails on content: `Err` is reserved for I/O errors of the
//! underlying stream. It never panics on any input (see the property tests).

// Fed by the network and by trace files: no indexing or slicing that
// could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

use super::frame::{Frame, HeaderPos, HotIndex};
use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// What the decoder yields.
///
/// `Frame` keeps its header index inline (no allocation per frame), which
/// makes it much larger than the other variants; boxing it would cost an
/// allocation per event on the hot path, so the size difference is accepted.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmiMessage {
    /// The `Asterisk Call Manager/x.y.z` greeting line (text after the slash).
    Banner(String),
    /// A well-formed frame.
    Frame(Frame),
    /// Bytes that were skipped; the stream goes on after them.
    Malformed(Malformed),
}

/// A skipped run of bytes and why it was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed {
    pub reason: MalformedReason,
    /// How many bytes were dropped, closing empty line included.
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MalformedReason {
    /// Larger than `max_frame_bytes`.
    TooLarge,
    /// More header lines than `max_headers`.
    TooManyHeaders,
    /// The first line is not `Key: Value`.
    Garbage,
}

impl MalformedReason {
    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MalformedReason::TooLarge => "too_large",
            MalformedReason::TooManyHeaders => "too_many_headers",
            MalformedReason::Garbage => "garbage",
        }
    }
}

/// Limits of the decoder.
#[derive(Debug, Clone, Copy)]
pub struct CodecLimits {
    pub max_frame_bytes: usize,
    pub max_headers: usize,
}

impl Default for CodecLimits {
    fn default() -> Self {
        // Asterisk's largest ordinary events (`QueueStatus` members with many
        // variables, `Status` with all channel variables) stay below 16 KiB;
        // 1 MiB leaves room for `Command` output without inviting abuse.
        CodecLimits { max_frame_bytes: 1 << 20, max_headers: 1024 }
    }
}

pub(crate) const BANNER_PREFIX: &[u8] = b"Asterisk Call Manager/";

/// The AMI decoder. One per connection (or per trace file).
#[derive(Debug)]
pub struct AmiCodec {
    limits: CodecLimits,
    /// Where the next line of the pending frame starts.
    scan_from: usize,
    /// Header positions of the pending frame found so far. A `Vec` that
    /// keeps its room from frame to frame: its push is one compare, where
    /// an inline `SmallVec`'s asks first where its items are.
    pending: Vec<HeaderPos>,
    /// Where the pending frame's hot names are.
    pending_hot: HotIndex,
    /// A byte of the pending frame (or one next to it) is not ASCII: its
    /// UTF-8 may be invalid.
    pending_non_ascii: bool,
    /// Whether the first line of the pending frame was a header.
    pending_first_ok: bool,
    /// Set while dropping an oversized frame up to its closing empty line.
    discarding: Option<Discard>,
}

#[derive(Debug, Clone, Copy)]
struct Discard {
    reason: MalformedReason,
    dropped: u64,
    /// Up to the end of the line (an oversized banner, which has no
    /// closing empty line) rather than to the next empty line.
    line: bool,
}

impl Default for AmiCodec {
    fn default() -> Self {
        AmiCodec::new(CodecLimits::default())
    }
}

enum Scan {
    /// The frame's content ends at `content_end`; the closing empty line ends
    /// at `consumed`.
    Complete {
        content_end: usize,
        consumed: usize,
    },
    Incomplete,
    Overflow(MalformedReason),
}

impl AmiCodec {
    pub fn new(limits: CodecLimits) -> Self {
        AmiCodec {
            limits,
            scan_from: 0,
            pending: Vec::with_capacity(64),
            pending_hot: HotIndex::default(),
            pending_non_ascii: false,
            pending_first_ok: false,
            discarding: None,
        }
    }

    pub fn limits(&self) -> CodecLimits {
        self.limits
    }

    /// Bytes of the current partial frame the decoder is holding on to
    /// (for tests and metrics: it never exceeds `max_frame_bytes` + one read;
    /// the buffer also holds up to 21 bytes that may start a banner, when
    /// `max_frame_bytes` is smaller than that).
    pub fn pending_bytes(&self) -> usize {
        self.scan_from
    }

    fn reset_pending(&mut self) {
        self.scan_from = 0;
        self.pending.clear();
        self.pending_hot = HotIndex::default();
        self.pending_non_ascii = false;
        self.pending_first_ok = false;
    }

    /// Scans lines of the pending frame from `scan_from`, recording headers
    /// and whether any byte seen may not be ASCII.
    fn scan(&mut self, src: &[u8]) -> Scan {
        let mut lines = Lines::new(src);
        let scan = self.scan_lines(src, &mut lines);
        self.pending_non_ascii |= lines.non_ascii;
        scan
    }

    fn scan_lines(&mut self, src: &[u8], lines: &mut Lines) -> Scan {
        let mut pos = self.scan_from;
        loop {
            // `pos` is the start of a line. Is it the closing empty line?
            match src.get(pos) {
                None => break,
                Some(b'\n') if pos > 0 => {
                    return Scan::Complete { content_end: pos, consumed: pos + 1 };
                }
                Some(b'\r') if pos > 0 => match src.get(pos + 1) {
                    None => break,
                    Some(b'\n') => return Scan::Complete { content_end: pos, consumed: pos + 2 },
                    Some(_) => {}
                },
                Some(_) => {}
            }
            let (colon, Some(line_end_nl)) = lines.line(pos) else {
                break;
            };
            let mut line_end = line_end_nl;
            if line_end > pos && src.get(line_end - 1) == Some(&b'\r') {
                line_end -= 1;
            }
            if self.pending.len() >= self.limits.max_headers {
                return Scan::Overflow(MalformedReason::TooManyHeaders);
            }
            let header = match colon.filter(|&c| c < line_end) {
                Some(key_end) => {
                    self.pending_hot.note(self.pending.len(), src.get(pos..key_end).unwrap_or_default());
                    let mut value_start = key_end + 1;
                    if src.get(value_start) == Some(&b' ') && value_start < line_end {
                        value_start += 1;
                    }
                    HeaderPos {
                        key_start: pos as u32,
                        key_end: key_end as u32,
                        value_start: value_start as u32,
                        value_end: line_end as u32,
                    }
                }
                None => HeaderPos {
                    key_start: pos as u32,
                    key_end: pos as u32,
                    value_start: pos as u32,
                    value_end: line_end as u32,
                },
            };
            if self.pending.is_empty() {
                self.pending_first_ok = is_header_key(src.get(pos..header.key_end as usize).unwrap_or_default())
                    && header.key_end > header.key_start;
            }
            self.pending.push(header);
            pos = line_end_nl + 1;
            if pos > self.limits.max_frame_bytes {
                return Scan::Overflow(MalformedReason::TooLarge);
            }
        }
        self.scan_from = pos;
        // Checked as a whole frame is (line by line, in order), so that
        // where the reads end changes neither whether a frame is dropped
        // nor why: a lone '\r' may start the closing empty line and is no
        // content yet; a partial line beyond `max_headers` is the line the
        // header count refuses, once it is complete.
        let partial = src.get(pos..).unwrap_or_default();
        let content = if partial == b"\r" { pos } else { src.len() };
        if content > self.limits.max_frame_bytes {
            return Scan::Overflow(if self.pending.len() >= self.limits.max_headers {
                MalformedReason::TooManyHeaders
            } else {
                MalformedReason::TooLarge
            });
        }
        Scan::Incomplete
    }

    /// Drops bytes of a skipped frame until its closing empty line.
    fn discard(&mut self, src: &mut BytesMut, mut d: Discard) -> Option<AmiMessage> {
        if d.line {
            if let Some(nl) = memchr::memchr(b'\n', src) {
                return Some(self.finish_discard(src, d, nl + 1));
            }
            d.dropped += src.len() as u64;
            src.clear();
            self.discarding = Some(d);
            return None;
        }
        if let Some(upto) = find_empty_line_end(src) {
            return Some(self.finish_discard(src, d, upto));
        }
        // Not found: keep at most the last two bytes (a "\n\r" that may be
        // completed by the next read), drop the rest.
        let keep = src.len().min(2);
        let drop = src.len() - keep;
        src.advance(drop);
        d.dropped += drop as u64;
        self.discarding = Some(d);
        None
    }

    fn finish_discard(&mut self, src: &mut BytesMut, d: Discard, upto: usize) -> AmiMessage {
        src.advance(upto);
        self.discarding = None;
        self.reset_pending();
        AmiMessage::Malformed(Malformed { reason: d.reason, bytes: d.dropped + upto as u64 })
    }
}

/// The line structure of a frame's bytes, 64 at a time: for each block of
/// 64 bytes, one bit per byte that is a `\n` and one per byte that is a
/// `:` (SSE2 compares on x86-64, through `wide`'s safe vectors). Lines are
/// then found by counting bits, without a branch per byte or per word:
/// AMI lines are short (20–40 bytes), so a block holds two or three.
struct Lines<'a> {
    src: &'a [u8],
    /// Start of the block whose masks are loaded (`usize::MAX`: none yet).
    base: usize,
    nl: u64,
    colon: u64,
    /// A block loaded so far had a byte that is not ASCII.
    non_ascii: bool,
}

impl<'a> Lines<'a> {
    fn new(src: &'a [u8]) -> Self {
        Lines { src, base: usize::MAX, nl: 0, colon: 0, non_ascii: false }
    }

    /// Loads the masks of the block starting at `base`; bytes past the end
    /// of `src` count as neither.
    fn load(&mut self, base: usize) {
        let rest = self.src.get(base..).unwrap_or_default();
        let (nl, colon, high) = match rest.first_chunk::<64>() {
            Some(block) => block_masks(block),
            None => {
                let mut block = [0u8; 64];
                if let Some(dst) = block.get_mut(..rest.len()) {
                    dst.copy_from_slice(rest);
                }
                block_masks(&block)
            }
        };
        (self.base, self.nl, self.colon) = (base, nl, colon);
        self.non_ascii |= high;
    }

    /// The line starting at `from`: where its first `:` is (if before the
    /// line's end) and where its `\n` is (`None`: not in `src` yet).
    #[inline]
    fn line(&mut self, from: usize) -> (Option<usize>, Option<usize>) {
        let mut colon = None;
        let mut base = from & !63;
        let mut keep = !0u64 << (from & 63);
        loop {
            if base >= self.src.len() {
                return (colon, None);
            }
            if self.base != base {
                self.load(base);
            }
            let nl = self.nl & keep;
            let nl_at = (nl != 0).then(|| base + nl.trailing_zeros() as usize);
            if colon.is_none() {
                let c = self.colon & keep;
                if c != 0 {
                    let at = base + c.trailing_zeros() as usize;
                    if nl_at.is_none_or(|n| at < n) {
                        colon = Some(at);
                    }
                }
            }
            if nl_at.is_some() {
                return (colon, nl_at);
            }
            base += 64;
            keep = !0;
        }
    }
}

/// Bit `i` of the first mask: `block[i]` is `\n`; of the second: it is
/// `:`; and whether any byte of the block is not ASCII.
#[inline]
fn block_masks(block: &[u8; 64]) -> (u64, u64, bool) {
    use wide::u8x16;
    let (nl_v, colon_v) = (u8x16::splat(b'\n'), u8x16::splat(b':'));
    let (mut nl, mut colon, mut high) = (0u64, 0u64, 0u32);
    for (k, q) in block.chunks_exact(16).enumerate() {
        let mut lane = [0u8; 16];
        lane.copy_from_slice(q);
        let v = u8x16::new(lane);
        nl |= u64::from(v.simd_eq(nl_v).to_bitmask()) << (16 * k);
        colon |= u64::from(v.simd_eq(colon_v).to_bitmask()) << (16 * k);
        high |= v.to_bitmask();
    }
    (nl, colon, high != 0)
}

/// End (exclusive) of the first empty line ("\n\n" or "\n\r\n") in `bytes`.
fn find_empty_line_end(bytes: &[u8]) -> Option<usize> {
    let mut search = 0;
    while let Some(i) = bytes.get(search..).and_then(|rest| memchr::memchr(b'\n', rest)) {
        let nl = search + i;
        match bytes.get(nl + 1) {
            None => return None,
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') => match bytes.get(nl + 2) {
                None => return None,
                Some(b'\n') => return Some(nl + 3),
                Some(_) => {}
            },
            Some(_) => {}
        }
        search = nl + 1;
    }
    None
}

/// AMI header names are ASCII letters, digits, '-' and '_' (e.g. `Cause-txt`,
/// `CID-CallingPres`, `ChanVariable(SIP/2000-01)` is the only exception
/// Asterisk sends, so parentheses, '/' and '.' are accepted too).
fn is_header_key(k: &[u8]) -> bool {
    !k.is_empty()
        && k.len() <= 128
        && k.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'(' | b')' | b'/' | b'.' | b'@' | b';'))
}

impl Decoder for AmiCodec {
    type Item = AmiMessage;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<AmiMessage>, std::io::Error> {
        if let Some(d) = self.discarding {
            match self.discard(src, d) {
                Some(m) => return Ok(Some(m)),
                None => return Ok(None),
            }
        }
        if self.scan_from == 0 {
            // Stray empty lines between frames carry nothing.
            let skip = src.iter().take_while(|&&c| c == b'\r' || c == b'\n').count();
            // Keep a lone trailing '\r': it may be the start of "\r\n".
            let skip = if skip == src.len() && src.last() == Some(&b'\r') { skip - 1 } else { skip };
            src.advance(skip);
            if src.is_empty() {
                return Ok(None);
            }
            if src.len() >= BANNER_PREFIX.len() && src.starts_with(BANNER_PREFIX) {
                // A banner longer than a frame may be is dropped (that line
                // only), whether its end came in this read or a later one.
                let too_large = Discard { reason: MalformedReason::TooLarge, dropped: 0, line: true };
                return match memchr::memchr(b'\n', src) {
                    Some(nl) if nl + 1 > self.limits.max_frame_bytes => Ok(self.discard(src, too_large)),
                    Some(nl) => {
                        let line = src.split_to(nl + 1);
                        let text = String::from_utf8_lossy(line.get(BANNER_PREFIX.len()..).unwrap_or_default());
                        Ok(Some(AmiMessage::Banner(text.trim_end().to_string())))
                    }
                    None if src.len() > self.limits.max_frame_bytes => Ok(self.discard(src, too_large)),
                    None => Ok(None),
                };
            }
            if src.len() < BANNER_PREFIX.len() && BANNER_PREFIX.starts_with(&src[..]) {
                // Could still become a banner: wait for more.
                return Ok(None);
            }
        }
        match self.scan(src) {
            Scan::Incomplete => Ok(None),
            Scan::Overflow(reason) => {
                let d = Discard { reason, dropped: 0, line: false };
                self.reset_pending();
                Ok(self.discard(src, d))
            }
            Scan::Complete { content_end, consumed } => {
                if !self.pending_first_ok {
                    self.reset_pending();
                    src.advance(consumed);
                    return Ok(Some(AmiMessage::Malformed(Malformed {
                        reason: MalformedReason::Garbage,
                        bytes: consumed as u64,
                    })));
                }
                // The scratch index keeps its inline storage for the next frame.
                let headers = self.pending.to_vec();
                let (hot, ascii) = (self.pending_hot, !self.pending_non_ascii);
                self.reset_pending();
                let mut chunk = src.split_to(consumed);
                chunk.truncate(content_end);
                let bytes = chunk.freeze();
                // ASCII is valid UTF-8: the bytes are not needed again. Else
                // they are kept (a reference count, not a copy) to repair.
                let text = match ascii {
                    true => bytestring::ByteString::try_from(bytes).map_err(|_| None),
                    false => bytestring::ByteString::try_from(bytes.clone()).map_err(|_| Some(bytes)),
                };
                let buf = match text {
                    Ok(text) => text,
                    Err(None) => {
                        return Ok(Some(AmiMessage::Malformed(Malformed {
                            reason: MalformedReason::Garbage,
                            bytes: consumed as u64,
                        })))
                    }
                    Err(Some(bytes)) => {
                        // Latin-1 names from old phones: replace invalid bytes and
                        // re-index, so every value is valid UTF-8.
                        let fixed = String::from_utf8_lossy(&bytes).into_owned();
                        let mut again =
                            AmiCodec::new(CodecLimits { max_frame_bytes: usize::MAX, max_headers: usize::MAX });
                        let mut b = BytesMut::from(fixed.as_bytes());
                        b.extend_from_slice(b"\n\n");
                        return Ok(again.decode(&mut b)?.or(Some(AmiMessage::Malformed(Malformed {
                            reason: MalformedReason::Garbage,
                            bytes: consumed as u64,
                        }))));
                    }
                };
                Ok(Some(AmiMessage::Frame(Frame::from_parts(buf, headers, hot))))
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<AmiMessage>, std::io::Error> {
        match self.decode(buf)? {
            Some(m) => Ok(Some(m)),
            None => {
                // A trace may end without the final empty line: close it.
                if self.discarding.is_none() && !buf.is_empty() && buf.iter().any(|&c| c != b'\r' && c != b'\n') {
                    buf.extend_from_slice(b"\r\n\r\n");
                    let m = self.decode(buf)?;
                    buf.clear();
                    self.reset_pending();
                    return Ok(m);
                }
                if let Some(d) = self.discarding.take() {
                    let dropped = d.dropped + buf.len() as u64;
                    buf.clear();
                    return Ok(Some(AmiMessage::Malformed(Malformed { reason: d.reason, bytes: dropped })));
                }
                buf.clear();
                Ok(None)
            }
        }
    }
}

/// Decodes a whole in-memory byte slice, calling `f` for each message.
/// Used by tests, benchmarks and the fuzz targets. The bytes are fed in
/// socket-sized chunks, as [`decode_reader`] feeds a file.
pub fn decode_all(codec: &mut AmiCodec, data: &[u8], f: impl FnMut(AmiMessage)) {
    // Reading from memory cannot fail.
    let _ = decode_reader(codec, data, f);
}

/// Decodes what `reader` yields (a trace file) as it is read, calling `f`
/// for each message; returns how many bytes were read. Memory stays
/// bounded by the codec's limits plus one read, whatever the size of the
/// trace. Fails only when reading fails (what was decoded before stays
/// handed over).
pub fn decode_reader(
    codec: &mut AmiCodec,
    mut reader: impl std::io::Read,
    mut f: impl FnMut(AmiMessage),
) -> std::io::Result<u64> {
    const CHUNK: usize = 64 * 1024;
    let mut buf = BytesMut::with_capacity(CHUNK * 2);
    let mut total = 0u64;
    loop {
        // Read straight into the decode buffer, after the partial frame
        // left by the last read (as the live connection's reads do): one
        // copy of each byte, not two. The room is zeroed first, which costs
        // less than a copy, and the code forbids `unsafe`.
        let held = buf.len();
        buf.resize(held + CHUNK, 0);
        let read = reader.read(buf.get_mut(held..).unwrap_or_default());
        buf.truncate(held + *read.as_ref().unwrap_or(&0));
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        // Decoding cannot fail on content: errors only come from I/O.
        while let Ok(Some(m)) = codec.decode(&mut buf) {
            f(m);
        }
    }
    while let Ok(Some(m)) = codec.decode_eof(&mut buf) {
        f(m);
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
mod tests {
    use super::*;

    fn all(data: &[u8]) -> Vec<AmiMessage> {
        let mut out = Vec::new();
        decode_all(&mut AmiCodec::default(), data, |m| out.push(m));
        out
    }

    fn frame(m: &AmiMessage) -> &Frame {
        match m {
            AmiMessage::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn line_scan_finds_what_a_plain_search_finds() {
        // Every length over two blocks and a bit, every start, a ':' and a
        // '\n' at every pair of positions, among bytes that trip naive
        // word tricks (0x0b, 0x3b, 0xba, 0x8a, 0x00 next to the ones searched).
        let fill = [b'a', 0x0b, 0x3b, 0xba, 0x8a, 0x09, 0xff, 0x00];
        let plain = |h: &[u8]| {
            let nl = h.iter().position(|&c| c == b'\n');
            let colon = h.iter().take(nl.unwrap_or(h.len())).position(|&c| c == b':');
            (colon, nl)
        };
        for len in 0..140 {
            for nl in (0..len).step_by(3).chain([usize::MAX]) {
                for colon in (0..len).step_by(5).chain([usize::MAX]) {
                    for &f in &fill {
                        let mut hay: Vec<u8> = (0..len).map(|i| if i % 3 == 0 { f } else { b'x' }).collect();
                        if colon < len {
                            hay[colon] = b':';
                        }
                        if nl < len {
                            hay[nl] = b'\n';
                        }
                        for from in [0, 1, 7, 63, 64, 65] {
                            let Some(rest) = hay.get(from..) else { continue };
                            let (c, n) = plain(rest);
                            let want = (c.map(|c| c + from), n.map(|n| n + from));
                            assert_eq!(Lines::new(&hay).line(from), want, "{hay:?} from {from}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn banner_then_response_without_blank_line() {
        let msgs = all(b"Asterisk Call Manager/9.0.0\r\nResponse: Success\r\nActionID: 1\r\n\r\n");
        assert_eq!(msgs[0], AmiMessage::Banner("9.0.0".into()));
        assert_eq!(frame(&msgs[1]).response(), Some("Success"));
        assert_eq!(msgs.len(), 2);
    }

    #[test]
    fn lf_only_and_values_with_colons() {
        let msgs = all(b"Event: VarSet\nValue: sip:1@127.0.0.1:5090\nEmpty:\nSpaced: \n\n");
        let f = frame(&msgs[0]);
        assert_eq!(f.get("Value"), Some("sip:1@127.0.0.1:5090"));
        assert_eq!(f.get("Empty"), Some(""));
        assert_eq!(f.get("Spaced"), Some(""));
    }

    #[test]
    fn command_output_lines_are_kept() {
        let msgs = all(b"Response: Follows\r\nPrivilege: Command\r\nline without colon\r\n--END COMMAND--\r\n\r\n");
        let f = frame(&msgs[0]);
        let lines: Vec<_> = f.headers().filter(|(k, _)| k.is_empty()).map(|(_, v)| v).collect();
        assert_eq!(lines, vec!["line without colon", "--END COMMAND--"]);
    }

    #[test]
    fn oversized_frame_is_skipped_and_stream_resyncs() {
        let mut codec = AmiCodec::new(CodecLimits { max_frame_bytes: 64, max_headers: 10 });
        let mut data = Vec::new();
        data.extend_from_slice(b"Event: Big\r\nValue: ");
        data.extend(std::iter::repeat_n(b'x', 1000));
        data.extend_from_slice(b"\r\n\r\nEvent: Small\r\n\r\n");
        let mut out = Vec::new();
        decode_all(&mut codec, &data, |m| out.push(m));
        assert!(matches!(out[0], AmiMessage::Malformed(Malformed { reason: MalformedReason::TooLarge, .. })));
        assert_eq!(frame(&out[1]).event(), Some("Small"));
    }

    #[test]
    fn too_many_headers_is_skipped() {
        let mut codec = AmiCodec::new(CodecLimits { max_frame_bytes: 1 << 20, max_headers: 3 });
        let mut out = Vec::new();
        decode_all(&mut codec, b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\nEvent: Ok\r\n\r\n", |m| out.push(m));
        assert!(matches!(out[0], AmiMessage::Malformed(Malformed { reason: MalformedReason::TooManyHeaders, .. })));
        assert_eq!(frame(&out[1]).event(), Some("Ok"));
    }

    #[test]
    fn garbage_frame_is_reported() {
        let out = all(b"\x00\x01\x02 nonsense\r\n\r\nEvent: Ok\r\n\r\n");
        assert!(matches!(out[0], AmiMessage::Malformed(Malformed { reason: MalformedReason::Garbage, .. })));
        assert_eq!(frame(&out[1]).event(), Some("Ok"));
    }

    #[test]
    fn invalid_utf8_values_are_replaced() {
        let out = all(b"Event: Newchannel\r\nCallerIDName: Jos\xe9\r\n\r\n");
        assert_eq!(frame(&out[0]).get("CallerIDName"), Some("Jos\u{fffd}"));
    }

    /// Whether a frame may need repair is known from every read it came
    /// in, not only the last one; valid UTF-8 is kept as it is.
    #[test]
    fn non_ascii_bytes_in_any_read_of_a_frame_are_checked() {
        let data = b"Event: Newchannel\r\nCallerIDName: Jos\xe9\r\nUniqueid: 1.2\r\n\r\n\
                     Event: Newchannel\r\nCallerIDName: Zo\xc3\xab\r\n\r\n\
                     Event: Hangup\r\nChannel: PJSIP/1-00000001\r\nCause-txt: Normal\r\n\r\n";
        for chunk in 1..=data.len() {
            let out = in_reads(CodecLimits::default(), data, chunk);
            assert_eq!(out.len(), 3, "reads of {chunk}");
            assert_eq!(frame(&out[0]).get("CallerIDName"), Some("Jos\u{fffd}"), "reads of {chunk}");
            assert_eq!(frame(&out[0]).get("Uniqueid"), Some("1.2"), "reads of {chunk}");
            assert_eq!(frame(&out[1]).get("CallerIDName"), Some("Zo\u{eb}"), "reads of {chunk}");
            assert_eq!(frame(&out[2]).get("Channel"), Some("PJSIP/1-00000001"), "reads of {chunk}");
        }
    }

    /// Decodes `data` fed in reads of `chunk` bytes.
    fn in_reads(limits: CodecLimits, data: &[u8], chunk: usize) -> Vec<AmiMessage> {
        let mut codec = AmiCodec::new(limits);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in data.chunks(chunk) {
            buf.extend_from_slice(c);
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                out.push(m);
            }
        }
        while let Some(m) = codec.decode_eof(&mut buf).unwrap() {
            out.push(m);
        }
        out
    }

    /// Found by fuzzing (fuzz/crashes/ami_codec): a frame over both limits
    /// was `TooLarge` when its last line arrived in pieces and
    /// `TooManyHeaders` when it arrived whole.
    #[test]
    fn why_a_frame_is_dropped_does_not_depend_on_the_reads() {
        let limits = CodecLimits { max_frame_bytes: 40, max_headers: 2 };
        let data = b"Event: A\r\nB: 1\r\nC: a line long enough to pass the size limit\r\n\r\nEvent: Ok\r\n\r\n";
        let whole = in_reads(limits, data, data.len());
        assert!(
            matches!(whole[0], AmiMessage::Malformed(Malformed { reason: MalformedReason::TooManyHeaders, bytes: 64 })),
            "{whole:?}"
        );
        assert_eq!(frame(&whole[1]).event(), Some("Ok"));
        for chunk in 1..data.len() {
            assert_eq!(in_reads(limits, data, chunk), whole, "reads of {chunk}");
        }
    }

    /// A frame of exactly `max_frame_bytes` is accepted however the reads
    /// cut it; it was dropped when a read ended between the closing
    /// empty line's '\r' and '\n'.
    #[test]
    fn a_frame_of_exactly_the_limit_is_kept_whatever_the_reads() {
        let frame_bytes = b"Event: A\r\nX: 12345\r\n";
        let limits = CodecLimits { max_frame_bytes: frame_bytes.len(), max_headers: 8 };
        let data = [&frame_bytes[..], b"\r\nEvent: B\r\n\r\n"].concat();
        for chunk in 1..=data.len() {
            let out = in_reads(limits, &data, chunk);
            assert_eq!(out.len(), 2, "reads of {chunk}: {out:?}");
            assert_eq!(frame(&out[0]).get("X"), Some("12345"), "reads of {chunk}");
        }
    }

    /// Found by fuzzing (fuzz/crashes/ami_codec/9422c59711b81477): a banner
    /// line longer than `max_frame_bytes` was accepted when it came in one
    /// read, and dropped, together with the frame after it, when it came
    /// in pieces. Now it is dropped alone, whatever the reads.
    #[test]
    fn an_oversized_banner_is_dropped_alone_whatever_the_reads() {
        let limits = CodecLimits { max_frame_bytes: 24, max_headers: 8 };
        let data = b"Asterisk Call Manager/9.0.0\r\nResponse: Success\r\n\r\n";
        let whole = in_reads(limits, data, data.len());
        assert_eq!(
            whole[0],
            AmiMessage::Malformed(Malformed { reason: MalformedReason::TooLarge, bytes: 29 }),
            "{whole:?}"
        );
        assert_eq!(frame(&whole[1]).response(), Some("Success"));
        assert_eq!(whole.len(), 2);
        for chunk in 1..data.len() {
            assert_eq!(in_reads(limits, data, chunk), whole, "reads of {chunk}");
        }
        // Within the limit it is a banner, whatever the reads.
        let limits = CodecLimits { max_frame_bytes: 29, max_headers: 8 };
        for chunk in 1..=data.len() {
            assert_eq!(in_reads(limits, data, chunk)[0], AmiMessage::Banner("9.0.0".into()), "reads of {chunk}");
        }
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let data =
            b"Asterisk Call Manager/9.0.0\r\nResponse: Success\r\n\r\nEvent: A\r\nX: 1\r\n\r\n\r\nEvent: B\nY: 2\n\n";
        let whole = all(data);
        let mut codec = AmiCodec::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &b in data.iter() {
            buf.extend_from_slice(&[b]);
            while let Some(m) = codec.decode(&mut buf).unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, whole);
        assert_eq!(whole.len(), 4);
    }
}
