//! One AMI message: the ordered `Key: Value` lines of a frame over a shared,
//! immutable byte buffer.
//!
//! A frame is cheap to create (one `Bytes` handle and an index of header
//! positions) and cheap to query: the names read on nearly every frame
//! (`Timestamp`, `Linkedid`, `Uniqueid`, `Channel`, `Variable`…) are located
//! while the codec cuts the frame, and any other name is a linear scan with
//! a length check first (AMI frames have 10–40 headers: that beats any map).
//! Duplicate keys (for example repeated `Variable:` lines of an `Originate`
//! or a `Status` reply) are kept in order. A frame owns no parsed copy of its
//! values but one: the `Timestamp`, read once, which every stage asks for.
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

/// Header names the pipeline reads on nearly every frame. Where each one
/// first appears is noted while the codec cuts the frame, so that looking
/// one up is an index instead of a scan over 10–40 lines.
const HOT: [&str; 8] =
    ["Timestamp", "Linkedid", "Uniqueid", "Channel", "Variable", "DestUniqueid", "DestLinkedid", "ChannelStateDesc"];

/// The slot in [`HOT`] of a name spelled exactly as there. Inlined into
/// [`Frame::get`], it folds away for the constant names callers pass.
#[inline(always)]
fn hot_slot(key: &str) -> Option<usize> {
    match key {
        "Timestamp" => Some(0),
        "Linkedid" => Some(1),
        "Uniqueid" => Some(2),
        "Channel" => Some(3),
        "Variable" => Some(4),
        "DestUniqueid" => Some(5),
        "DestLinkedid" => Some(6),
        "ChannelStateDesc" => Some(7),
        _ => None,
    }
}

/// Where the [`HOT`] names first appear among a frame's headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HotIndex {
    /// Header position + 1; 0: the frame has no such header.
    at: [u16; HOT.len()],
    /// A header beyond what `at` can hold was seen: lookups scan instead.
    overflow: bool,
}

impl HotIndex {
    /// Notes header `i`, named `key` (any ASCII case, as [`Frame::get`]
    /// compares). Called for every header in order, on the codec's hot
    /// path: one length test for most headers, two word compares for the
    /// rest.
    #[inline(always)]
    pub(crate) fn note(&mut self, i: usize, key: &[u8]) {
        let slot = match key.len() {
            9 => 0,
            8 => match key.first().map(|c| c | 0x20) {
                Some(b'l') => 1,
                Some(b'u') => 2,
                Some(b'v') => 4,
                _ => return,
            },
            7 => 3,
            12 => match key.get(4).map(|c| c | 0x20) {
                Some(b'u') => 5,
                Some(b'l') => 6,
                _ => return,
            },
            16 => 7,
            _ => return,
        };
        let Some(at) = self.at.get_mut(slot) else { return };
        if *at != 0 || !HOT.get(slot).is_some_and(|name| letters_eq_ignore_case(key, name.as_bytes())) {
            return;
        }
        match u16::try_from(i + 1) {
            Ok(pos) => *at = pos,
            Err(_) => self.overflow = true,
        }
    }
}

/// `key` is `name` in any ASCII case, for a `name` of ASCII letters: for
/// 4 to 16 letters, its first and last words compared with the case bit
/// set (for a letter, `c | 0x20` is its lower case; for any byte, `c | 0x20`
/// equal to a lower-case letter means `c` is that letter in either case).
#[inline(always)]
fn letters_eq_ignore_case(key: &[u8], name: &[u8]) -> bool {
    let n = name.len();
    if key.len() != n {
        return false;
    }
    if !(4..=16).contains(&n) {
        return key.eq_ignore_ascii_case(name);
    }
    let wide = n >= 8;
    let last = n - if wide { 8 } else { 4 };
    let same = |at: usize| matches!((folded(key, at, wide), folded(name, at, wide)), (Some(a), Some(b)) if a == b);
    same(0) && same(last)
}

/// The 8 (`wide`) or 4 bytes of `b` at `at`, as a word with the case bit
/// of every byte set.
#[inline(always)]
fn folded(b: &[u8], at: usize, wide: bool) -> Option<u64> {
    let rest = b.get(at..)?;
    let w = if wide {
        u64::from_le_bytes(*rest.first_chunk::<8>()?)
    } else {
        u64::from(u32::from_le_bytes(*rest.first_chunk::<4>()?))
    };
    Some(w | 0x2020_2020_2020_2020)
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
    hot: HotIndex,
    /// The `Timestamp` read once: every stage of the pipeline asks for it.
    timestamp: Option<i64>,
}

impl Frame {
    /// Builds a frame from an already validated UTF-8 buffer, its header
    /// index and where its hot names are. Only the codec and
    /// [`Frame::from_pairs`] construct frames.
    pub(crate) fn from_parts(buf: ByteString, headers: Vec<HeaderPos>, hot: HotIndex) -> Self {
        let mut frame = Frame { buf, headers, hot, timestamp: None };
        frame.timestamp = frame.get("Timestamp").and_then(parse_timestamp_micros);
        frame
    }

    /// Builds a frame from key/value pairs, as if it had been received.
    /// Used by tests, by synthetic events and by the action encoder.
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Self {
        let mut raw = String::new();
        let mut headers = Vec::with_capacity(pairs.len());
        let mut hot = HotIndex::default();
        for (i, (k, v)) in pairs.iter().enumerate() {
            hot.note(i, k.as_ref().as_bytes());
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
        Frame::from_parts(ByteString::from(raw), headers, hot)
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
        match hot_slot(key) {
            Some(slot) if !self.hot.overflow => {
                let i = usize::from(*self.hot.at.get(slot)?);
                let h = self.headers.get(i.checked_sub(1)?)?;
                Some(self.slice(h.value_start, h.value_end))
            }
            _ => self.scan(key),
        }
    }

    /// [`Frame::get`] by looking at every header.
    fn scan(&self, key: &str) -> Option<&str> {
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
        self.timestamp
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
    // Every frame's `Timestamp` comes through here: the exact shape
    // Asterisk writes (`1795471080.044838`) eight digits at a time, other
    // runs of digits in one pass, anything else (a sign, no digits) the
    // general way below.
    let b = s.as_bytes();
    if let Some(micros) = asterisk_timestamp(b) {
        return Some(micros);
    }
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

/// Exactly the shape Asterisk writes today, ten digits, a point, six
/// (`1795471080.044838`), eight digits at a time; `None` for anything
/// else, which the byte-wise reading then decides.
#[inline]
fn asterisk_timestamp(b: &[u8]) -> Option<i64> {
    let (secs, rest) = b.split_first_chunk::<10>()?;
    let (&[b'.'], frac) = rest.split_first_chunk::<1>()? else { return None };
    let frac: &[u8; 6] = frac.try_into().ok()?;
    let (high, low) = secs.split_first_chunk::<8>()?;
    let [f0, f1, f2, f3, f4, f5] = *frac;
    let secs = eight_digits(*high)? * 100 + two_digits(low)?;
    let micros = eight_digits([f0, f1, f2, f3, f4, f5, b'0', b'0'])? / 100;
    i64::try_from(secs * 1_000_000 + micros).ok()
}

/// Eight ASCII digits, the first one the most significant, as a number
/// (three multiplications instead of eight steps); `None` if a byte is
/// not a digit.
#[inline]
fn eight_digits(w: [u8; 8]) -> Option<u64> {
    const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    const LOW: u64 = 0x0F0F_0F0F_0F0F_0F0F;
    let v = u64::from_le_bytes(w);
    // A digit is 0x30..=0x39: high nibble 3, low nibble at most 9.
    if v & HIGH != 0x3030_3030_3030_3030 || ((v & LOW) + 0x0606_0606_0606_0606) & HIGH != 0 {
        return None;
    }
    let v = (v & LOW).wrapping_mul(10 << 8 | 1) >> 8;
    let v = (v & 0x00FF_00FF_00FF_00FF).wrapping_mul(100 << 16 | 1) >> 16;
    Some((v & 0x0000_FFFF_0000_FFFF).wrapping_mul(10_000 << 32 | 1) >> 32)
}

/// Two ASCII digits as a number.
#[inline]
fn two_digits(d: &[u8]) -> Option<u64> {
    match d {
        [a @ b'0'..=b'9', b @ b'0'..=b'9'] => Some(u64::from(a - b'0') * 10 + u64::from(b - b'0')),
        _ => None,
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
    fn hot_names_are_letters_and_compare_in_any_case_only() {
        for name in HOT {
            assert!(name.bytes().all(|c| c.is_ascii_alphabetic()), "{name}");
            assert!(letters_eq_ignore_case(name.to_ascii_uppercase().as_bytes(), name.as_bytes()));
            assert!(letters_eq_ignore_case(name.to_ascii_lowercase().as_bytes(), name.as_bytes()));
            // One byte changed anywhere, including to what `| 0x20` maps
            // onto a letter's case bit from outside the letters.
            for i in 0..name.len() {
                for c in [b'@', b'[', b'{', b'`', b'0', b'x', 0x80 | name.as_bytes()[i]] {
                    let mut k = name.as_bytes().to_vec();
                    k[i] = c;
                    let want = k.eq_ignore_ascii_case(name.as_bytes());
                    assert_eq!(letters_eq_ignore_case(&k, name.as_bytes()), want, "{k:?} {name}");
                }
            }
        }
        assert!(letters_eq_ignore_case(b"ab", b"AB"));
        assert!(!letters_eq_ignore_case(b"Event", b"Even"));
    }

    #[test]
    fn a_hot_name_past_what_the_index_holds_is_found_by_a_scan() {
        let mut pairs: Vec<(String, &str)> = (0..70_000).map(|i| (format!("X{i}"), "x")).collect();
        pairs.push(("Linkedid".into(), "1.2"));
        let f = Frame::from_pairs(&pairs);
        assert!(f.hot.overflow);
        assert_eq!(f.get("Linkedid"), Some("1.2"));
        assert_eq!(f.get("Uniqueid"), None);
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

    /// Names of the hot slots and their look-alikes (same length, same
    /// first letter) in any case, and ordinary names, in any order, some
    /// repeated.
    fn header_name() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let names = HOT.iter().copied().chain([
            "Event",
            "Exten",
            "Privilege",
            "Language",
            "Priority",
            "Uniqueidx",
            "DestChannel",
            "DestUniqueiX",
            "ChannelStateDesX",
            "Channels",
            "Value",
            "",
        ]);
        (proptest::sample::select(names.collect::<Vec<_>>()), any::<u32>()).prop_map(|(name, case)| {
            name.chars()
                .enumerate()
                .map(|(i, c)| if case >> (i % 32) & 1 == 1 { c.to_ascii_lowercase() } else { c })
                .collect()
        })
    }

    proptest::proptest! {
        /// Looking a hot name up by its index finds what looking at every
        /// header finds, in frames built from pairs and cut by the codec.
        #[test]
        fn hot_lookups_agree_with_a_scan(
            names in proptest::collection::vec(header_name(), 0..30),
        ) {
            let pairs: Vec<(String, String)> =
                names.iter().enumerate().filter(|(_, n)| !n.is_empty()).map(|(i, n)| (n.clone(), format!("v{i}"))).collect();
            let mut wire = b"Event: X\r\n".to_vec();
            for (k, v) in &pairs {
                wire.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
            let mut decoded = Vec::new();
            crate::ami::codec::decode_all(&mut crate::ami::codec::AmiCodec::default(), &wire, |m| decoded.push(m));
            let Some(crate::ami::codec::AmiMessage::Frame(cut)) = decoded.pop() else {
                return Err(proptest::test_runner::TestCaseError::fail("the codec cut no frame"));
            };
            for frame in [Frame::from_pairs(&pairs), cut] {
                for name in HOT {
                    proptest::prop_assert_eq!(frame.get(name), frame.scan(name), "{}", name);
                    let lower = name.to_ascii_lowercase();
                    proptest::prop_assert_eq!(frame.get(&lower), frame.scan(name), "{}", lower);
                }
            }
        }

        /// The one-pass reading agrees with the general one on any text,
        /// and on text shaped like timestamps (digits, a point, digits).
        #[test]
        fn the_fast_timestamp_path_agrees_with_the_general_one(
            any in "\\PC{0,24}",
            shaped in "[+-]?[0-9]{0,20}(\\.[0-9x]{0,9})?",
            asterisk in "[0-9/:]{10}[.,][0-9/:]{6}",
            digits in "[0-9]{10}\\.[0-9]{6}",
        ) {
            proptest::prop_assert_eq!(parse_timestamp_micros(&asterisk), parse_timestamp_general(&asterisk));
            proptest::prop_assert_eq!(parse_timestamp_micros(&digits), parse_timestamp_general(&digits));
            proptest::prop_assert!(asterisk_timestamp(digits.as_bytes()).is_some());
            proptest::prop_assert_eq!(parse_timestamp_micros(&any), parse_timestamp_general(&any));
            proptest::prop_assert_eq!(parse_timestamp_micros(&shaped), parse_timestamp_general(&shaped));
        }
    }
}
