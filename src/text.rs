//! Shortening text for logs and error messages without splitting a
//! character; lowercase hex of digests (ids, AMI and SIP digest logins).
//!
//! Error texts often quote input from outside (a SIP message, an XML body,
//! a header value). Cutting such a string at a byte count panics when the
//! cut falls inside a multi-byte UTF-8 character, so every shortening in
//! the crate goes through the functions here: they cut at the last
//! character boundary at or before the limit, and never panic.

/// The longest prefix of `s` that is at most `max_bytes` long and ends on
/// a character boundary (all of `s` when it is short enough).
pub fn shorten(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// [`shorten`] in place, for owned strings.
pub fn shorten_owned(mut s: String, max_bytes: usize) -> String {
    let end = shorten(&s, max_bytes).len();
    s.truncate(end);
    s
}

/// At most `max_chars` characters of `s` (counted in characters, not bytes).
pub fn prefix_chars(s: &str, max_chars: usize) -> &str {
    match s.char_indices().nth(max_chars) {
        Some((end, _)) => s.get(..end).unwrap_or(s),
        None => s,
    }
}

/// Appends `bytes` to `out` as lowercase hex, two digits per byte.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_two_lowercase_digits_per_byte() {
        let mut s = String::from("x-");
        push_hex(&mut s, &[0x00, 0x0f, 0xa5, 0xff]);
        assert_eq!(s, "x-000fa5ff");
    }

    #[test]
    fn short_strings_are_unchanged() {
        assert_eq!(shorten("", 0), "");
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abc", 120), "abc");
        assert_eq!(shorten("abcdef", 3), "abc");
        assert_eq!(shorten("abc", 0), "");
    }

    #[test]
    fn never_cuts_inside_a_character() {
        // 'é' is 2 bytes, '€' 3, '𝄞' 4: every cut inside one falls back
        // to the boundary before it.
        let s = "aé€𝄞z";
        assert_eq!(s.len(), 1 + 2 + 3 + 4 + 1);
        let expect = [
            (0, ""),
            (1, "a"),
            (2, "a"),
            (3, "aé"),
            (4, "aé"),
            (5, "aé"),
            (6, "aé€"),
            (7, "aé€"),
            (8, "aé€"),
            (9, "aé€"),
            (10, "aé€𝄞"),
            (11, "aé€𝄞z"),
            (99, "aé€𝄞z"),
        ];
        for (max, want) in expect {
            assert_eq!(shorten(s, max), want, "max {max}");
            assert_eq!(shorten_owned(s.to_string(), max), want, "max {max}");
        }
    }

    #[test]
    fn every_cut_of_multibyte_text_is_valid() {
        let s = "ação 電話 📞 ok ".repeat(20);
        for max in 0..=s.len() + 1 {
            let cut = shorten(&s, max);
            assert!(cut.len() <= max && s.starts_with(cut));
            assert!(cut.len() + 4 > max || cut.len() == s.len(), "cut {max} lost more than one char");
        }
    }

    #[test]
    fn prefix_counts_characters() {
        assert_eq!(prefix_chars("ação", 2), "aç");
        assert_eq!(prefix_chars("ação", 10), "ação");
        assert_eq!(prefix_chars("📞📞📞", 1), "📞");
        assert_eq!(prefix_chars("", 3), "");
    }
}
