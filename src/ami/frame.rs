//! One AMI message: the ordered `Key: Value` lines of a frame over a shared,
//! immutable byte buffer.
//!
//! A frame is cheap to create (one `Bytes` handle and a small inline index of
//! header positions) and cheap to query: AMI frames have 10–40 headers, so a
//! linear scan with a length check first beats any map. Duplicate keys (for
//! example repeated `Variable:` lines of an `Originate` or a `Status` reply)
//! are kept in order. A frame never owns parsed copies of its values.
//!
//! This module must never touch a socket or a file: it only indexes bytes that
//! the codec already cut out of the stream.

// Reads bytes from the network and trace files: no indexing or slicing
// that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

use bytestring::ByteString;
use std::fmt;

/// Position of one header inside the frame's buffer. `key` is empty for a
/// line without a colon (command output of old Asterisk versions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeaderPos {
    pub(crate) key_start: u32,
    pub(crate) key_end: u32,
    pub(crate) value_start: u32,
    pub(crate) value_end: u32,
}

/// A decoded AMI frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// UTF-8 checked once, when the codec cut the frame.
    buf: ByteString,
    /// One exact-size allocation per frame: keeping the index inline would
    /// make `Frame` ~700 bytes, and every move of it through the codec, the
    /// connection and the pipeline channel would copy that much.
    headers: Vec<HeaderPos>,
}

impl Frame {
    /// Builds a frame from an already validated UTF-8 buffer and its header
    /// index. Only the codec and [`Frame::from_pairs`] construct frames.
    pub(crate) fn from_parts(buf: ByteString, headers: Vec<HeaderPos>) -> Self {
        Frame { buf, headers }
    }

    /// Builds a frame from key/value pairs, as if it had been received.
    /// Used by tests, by synthetic events and by the action encoder.
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Self {
        let mut raw = String::new();
        let mut headers = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let key_start = raw.len() as u32;
            raw.push_str(k.as_ref());
            let key_end = raw.len() as u32;
            raw.push_str(": ");
            let value_start = raw.len() as u32;
            raw.push_str(v.as_ref());
            let value_end = raw.len() as u32;
            raw.push_str("\r\n");
            headers.push(HeaderPos { key_start, key_end, value_start, value_end });
        }
        Frame { buf: ByteString::from(raw), headers }
    }

    #[inline]
    fn slice(&self, start: u32, end: u32) -> &str {
        // Every boundary sits next to an ASCII byte (':', ' ', '\r', '\n'),
        // so this is always a char boundary; an empty string is the
        // defensive answer if it ever were not.
        self.buf.get(start as usize..end as usize).unwrap_or("")
    }

    #[inline]
    fn key_bytes(&self, h: &HeaderPos) -> &[u8] {
        self.buf.as_bytes().get(h.key_start as usize..h.key_end as usize).unwrap_or(b"")
    }

    /// The value of the first header named `key` (ASCII case-insensitive).
    #[inline]
    pub fn get(&self, key: &str) -> Option<&str> {
        let kb = key.as_bytes();
        for h in &self.headers {
            if (h.key_end - h.key_start) as usize == kb.len() && key_matches(self.key_bytes(h), kb) {
                return Some(self.slice(h.value_start, h.value_end));
            }
        }
        None
    }

    /// Every value of the headers named `key`, in order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers().filter(move |(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v)
    }

    /// All headers in order; a line without a colon has an empty key.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.headers.iter().map(|h| (self.slice(h.key_start, h.key_end), self.slice(h.value_start, h.value_end)))
    }

    /// Number of header lines.
    pub fn len(&self) -> usize {
        self.headers.len()
    }

    /// True for a frame without any line (never produced by the codec).
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
    }

    /// The `Event` header: set on unsolicited events and list items.
    #[inline]
    pub fn event(&self) -> Option<&str> {
        // `Event` is always the first header Asterisk writes; check it first.
        if let Some(h) = self.headers.first() {
            if self.key_bytes(h) == b"Event" {
                return Some(self.slice(h.value_start, h.value_end));
            }
        }
        self.get("Event")
    }

    /// The `Response` header: set on replies to actions.
    pub fn response(&self) -> Option<&str> {
        self.get("Response")
    }

    /// The `ActionID` header, if the frame answers (or belongs to) an action.
    pub fn action_id(&self) -> Option<&str> {
        self.get("ActionID")
    }

    /// The PBX's event time (`Timestamp: 1795471080.044838`, present with
    /// `timestampevents=yes`) in microseconds since the Unix epoch.
    pub fn timestamp_micros(&self) -> Option<i64> {
        parse_timestamp_micros(self.get("Timestamp")?)
    }

    /// The frame's raw bytes as received (without the closing blank line).
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_bytes()
    }
}

/// `k == want`, ASCII case-insensitive, for keys of equal length. Checks the
/// first byte before anything else: most headers of a frame differ there,
/// and this is the hottest comparison of the pipeline.
#[inline]
fn key_matches(k: &[u8], want: &[u8]) -> bool {
    match (k.first(), want.first()) {
        (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => k == want || k.eq_ignore_ascii_case(want),
        (None, None) => true,
        _ => false,
    }
}

/// Parses Asterisk's `seconds.micros` timestamp into microseconds.
pub fn parse_timestamp_micros(s: &str) -> Option<i64> {
    // Every frame's `Timestamp` comes through here: the shape Asterisk
    // writes (`1795471080.044838`) is read in one pass; anything else (a
    // sign, no digits) the general way below.
    let b = s.as_bytes();
    let mut secs: i64 = 0;
    let mut i = 0;
    while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
        secs = secs.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
        i += 1;
    }
    match b.get(i) {
        _ if i == 0 => parse_timestamp_general(s),
        None => secs.checked_mul(1_000_000),
        Some(b'.') => secs.checked_mul(1_000_000)?.checked_add(fraction_micros(b.get(i + 1..).unwrap_or_default())?),
        Some(_) => None,
    }
}

/// The digits after the decimal point as µs (the first six count; more are
/// cut, fewer are padded); `None` if any byte is not a digit.
fn fraction_micros(frac: &[u8]) -> Option<i64> {
    let mut micros: i64 = 0;
    let mut digits = 0;
    for &c in frac {
        if !c.is_ascii_digit() {
            return None;
        }
        if digits < 6 {
            micros = micros * 10 + i64::from(c - b'0');
            digits += 1;
        }
    }
    while digits < 6 {
        micros *= 10;
        digits += 1;
    }
    Some(micros)
}

/// [`parse_timestamp_micros`] for any shape `i64` parsing takes (a sign).
fn parse_timestamp_general(s: &str) -> Option<i64> {
    let (secs, frac) = match s.split_once('.') {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    secs.checked_mul(1_000_000)?.checked_add(fraction_micros(frac.as_bytes())?)
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.headers()).finish()
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
mod tests {
    use super::*;

    #[test]
    fn lookup_is_case_insensitive_and_keeps_duplicates() {
        let f = Frame::from_pairs(&[("Event", "VarSet"), ("Variable", "A"), ("Variable", "B"), ("Value", "x: y")]);
        assert_eq!(f.event(), Some("VarSet"));
        assert_eq!(f.get("variable"), Some("A"));
        assert_eq!(f.get_all("Variable").collect::<Vec<_>>(), vec!["A", "B"]);
        assert_eq!(f.get("Value"), Some("x: y"));
        assert_eq!(f.get("Missing"), None);
    }

    #[test]
    fn timestamps_parse_to_micros() {
        assert_eq!(parse_timestamp_micros("1795471080.044838"), Some(1_795_471_080_044_838));
        assert_eq!(parse_timestamp_micros("1795471080.5"), Some(1_795_471_080_500_000));
        assert_eq!(parse_timestamp_micros("1795471080"), Some(1_795_471_080_000_000));
        assert_eq!(parse_timestamp_micros("17x"), None);
        assert_eq!(parse_timestamp_micros("1.2x"), None);
        assert_eq!(parse_timestamp_micros("-1.5"), Some(-500_000));
        assert_eq!(parse_timestamp_micros("+2"), Some(2_000_000));
        assert_eq!(parse_timestamp_micros("1."), Some(1_000_000));
        assert_eq!(parse_timestamp_micros("1.2.3"), None);
        assert_eq!(parse_timestamp_micros("99999999999999999999"), None);
        assert_eq!(parse_timestamp_micros(""), None);
    }

    proptest::proptest! {
        /// The one-pass reading agrees with the general one on any text,
        /// and on text shaped like timestamps (digits, a point, digits).
        #[test]
        fn the_fast_timestamp_path_agrees_with_the_general_one(
            any in "\\PC{0,24}",
            shaped in "[+-]?[0-9]{0,20}(\\.[0-9x]{0,9})?",
        ) {
            proptest::prop_assert_eq!(parse_timestamp_micros(&any), parse_timestamp_general(&any));
            proptest::prop_assert_eq!(parse_timestamp_micros(&shaped), parse_timestamp_general(&shaped));
        }
    }
}
