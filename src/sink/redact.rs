//! Keeps secrets out of what the HTTP sinks report: the text of a refusal
//! (a response body excerpt, an error chain) becomes a dead letter's reason,
//! an API answer and a log line, and a server may echo the request back —
//! Zammad's CTI token is a path segment of every request, a webhook URL may
//! carry credentials. One [`Redactor`] per sink knows its secrets, in every
//! form they travel in, and masks them (as `check-config` masks a URL's
//! `user:password@`).

use std::fmt;

/// What a masked secret is replaced with.
pub const MASK: &str = "***";

/// The secrets of one sink, masked wherever they appear in a text.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first, so that a secret containing another is masked whole.
    needles: Vec<String>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} secrets)", self.needles.len())
    }
}

impl Redactor {
    /// Masks `secrets` and their percent-encoded and percent-decoded forms.
    /// Secrets shorter than 3 characters are not masked (they would mask
    /// ordinary text, and are not secrets worth the name).
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut needles: Vec<String> = Vec::new();
        for s in secrets {
            let path_encoded = percent_encode(s);
            let encoded = path_encoded.replace("%20", "+");
            let decoded = percent_decode(s);
            for n in [s.to_string(), encoded, path_encoded, decoded] {
                if n.chars().count() >= 3 && !needles.contains(&n) {
                    needles.push(n);
                }
            }
        }
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        Redactor { needles }
    }

    /// The secrets of an HTTP sink: `secrets` plus the URL's password and
    /// user name (`https://user:password@host/`) and its query string.
    pub fn for_url<'a>(url: &'a reqwest::Url, secrets: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut all: Vec<&str> = secrets.into_iter().collect();
        all.extend(url.password());
        all.extend(Some(url.username()).filter(|u| !u.is_empty()));
        all.extend(url.query());
        Redactor::new(all)
    }

    /// `text` with every secret replaced by [`MASK`].
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), MASK);
            }
        }
        out
    }
}

impl Redactor {
    /// At most `max_bytes` of `text`, scrubbed. `text` may itself be cut
    /// (a body read in part): a secret's beginning at its end is masked too.
    pub fn excerpt(&self, text: &str, max_bytes: usize) -> String {
        let mut out = self.scrub(text);
        for n in &self.needles {
            let partial =
                (1..n.len()).rev().filter(|&k| n.is_char_boundary(k) && k >= 3).find(|&k| out.ends_with(&n[..k]));
            if let Some(k) = partial {
                out.truncate(out.len() - k);
                out.push_str(MASK);
                break;
            }
        }
        crate::text::shorten_owned(out, max_bytes)
    }
}

/// `s` with every byte but the unreserved ones percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(char::from(b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `s` with `%XX` sequences and `+` decoded (invalid sequences kept).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex =
            b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_form_of_a_secret() {
        let r = Redactor::new(["tok en/ü"]);
        assert_eq!(r.scrub("path /api/v1/cti/tok en/ü not found"), "path /api/v1/cti/*** not found");
        assert_eq!(r.scrub("GET /cti/tok%20en%2F%C3%BC"), "GET /cti/***");
        assert_eq!(r.scrub("q=tok+en%2F%C3%BC"), "q=***");
        assert_eq!(Redactor::new(["ab"]).scrub("about"), "about");
    }

    #[test]
    fn an_excerpt_masks_a_secret_cut_at_its_end() {
        let r = Redactor::new(["s3cr3t-token"]);
        assert_eq!(r.excerpt("no route /cti/s3cr3t-to", 100), "no route /cti/***");
        assert_eq!(r.excerpt("x s3cr3t-token y", 5), "x ***");
        assert_eq!(r.excerpt("plain", 3), "pla");
    }

    #[test]
    fn masks_url_credentials_and_query() {
        let url = reqwest::Url::parse("https://bob:hunter22@h.example/hook?key=k3y-123").expect("url");
        let r = Redactor::for_url(&url, ["whsec_abc"]);
        let s = r.scrub("denied bob hunter22 key=k3y-123 whsec_abc");
        assert!(!s.contains("hunter22") && !s.contains("k3y-123") && !s.contains("whsec_abc"), "{s}");
    }
}
