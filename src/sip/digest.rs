//! HTTP digest authentication as SIP uses it (RFC 3261 §22, RFC 2617,
//! RFC 7616 with MD5): parses a `WWW-Authenticate`/`Proxy-Authenticate`
//! challenge and computes the matching `Authorization`/`Proxy-Authorization`
//! value, with `qop=auth` (or `auth-int`), `nc` and `cnonce`, or the RFC 2069
//! form when the challenge offers no `qop` (Asterisk's chan_sip).
//!
//! Hand-written rather than taken from `rsip::services::DigestGenerator`,
//! which formats `nc` in decimal instead of 8 hex digits (wrong from the 10th
//! use of a nonce), treats `MD5-sess` as `MD5` and hashes no body for
//! `auth-int`. This module does no I/O, keeps no state and must never log or
//! return the password or HA1.

// Fed by the network: no indexing or slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

use crate::text::prefix_chars;
use md5::{Digest, Md5};
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("challenge scheme {0:?} is not Digest")]
    NotDigest(String),
    #[error("challenge has no {0} parameter")]
    Missing(&'static str),
    #[error("unsupported digest algorithm {0:?} (only MD5 and MD5-sess)")]
    Algorithm(String),
    #[error("challenge offers no supported qop ({0:?})")]
    Qop(String),
    #[error("malformed challenge: {0}")]
    Syntax(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Md5Sess,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qop {
    Auth,
    AuthInt,
}

/// A digest challenge from the PBX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    /// `None` when the challenge carried no `algorithm` (MD5 is implied and
    /// the response then names none either).
    pub algorithm: Option<Algorithm>,
    /// The qop we will use: `auth` when offered, else `auth-int`; `None`
    /// when the challenge offers none (RFC 2069 compatibility).
    pub qop: Option<Qop>,
    /// `stale=true`: the nonce expired, the credentials were fine.
    pub stale: bool,
}

impl Challenge {
    /// Parses the value of a `WWW-Authenticate` or `Proxy-Authenticate`
    /// header: `Digest realm="asterisk", nonce="6f956b05", algorithm=MD5`.
    pub fn parse(value: &str) -> Result<Challenge, DigestError> {
        let value = value.trim();
        let (scheme, rest) = value.split_once(|c: char| c.is_ascii_whitespace()).unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("Digest") {
            return Err(DigestError::NotDigest(prefix_chars(scheme, 32).to_string()));
        }
        let params = parse_params(rest)?;
        let get = |name: &str| params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
        let realm = get("realm").ok_or(DigestError::Missing("realm"))?;
        let nonce = get("nonce").ok_or(DigestError::Missing("nonce"))?;
        let algorithm = match get("algorithm") {
            None => None,
            Some(a) if a.eq_ignore_ascii_case("MD5") => Some(Algorithm::Md5),
            Some(a) if a.eq_ignore_ascii_case("MD5-sess") => Some(Algorithm::Md5Sess),
            Some(a) => return Err(DigestError::Algorithm(prefix_chars(&a, 32).to_string())),
        };
        let qop = match get("qop") {
            None => None,
            Some(list) => {
                let offered: Vec<&str> = list.split(',').map(str::trim).collect();
                if offered.iter().any(|q| q.eq_ignore_ascii_case("auth")) {
                    Some(Qop::Auth)
                } else if offered.iter().any(|q| q.eq_ignore_ascii_case("auth-int")) {
                    Some(Qop::AuthInt)
                } else {
                    return Err(DigestError::Qop(prefix_chars(&list, 32).to_string()));
                }
            }
        };
        let stale = get("stale").is_some_and(|s| s.eq_ignore_ascii_case("true"));
        Ok(Challenge { realm, nonce, opaque: get("opaque"), algorithm, qop, stale })
    }
}

/// `name=value` pairs separated by commas; values are tokens or quoted
/// strings (with `\` escapes; commas inside quotes belong to the value).
fn parse_params(s: &str) -> Result<Vec<(String, String)>, DigestError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_ascii_whitespace() {
                break;
            }
            name.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') || name.is_empty() {
            return Err(DigestError::Syntax("expected name=value"));
        }
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => value.push(chars.next().ok_or(DigestError::Syntax("unterminated escape"))?),
                    Some(c) => value.push(c),
                    None => return Err(DigestError::Syntax("unterminated quoted string")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_ascii_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        if out.len() >= 32 {
            return Err(DigestError::Syntax("too many parameters"));
        }
        out.push((name, value));
    }
}

/// What one request's credentials are computed from.
#[derive(Debug, Clone, Copy)]
pub struct RequestDigest<'a> {
    pub username: &'a str,
    pub password: &'a str,
    pub method: &'a str,
    /// The `digest-uri`: the Request-URI as sent.
    pub uri: &'a str,
    /// The message body (hashed only for `qop=auth-int`).
    pub body: &'a [u8],
    /// Nonce count: how many requests used this nonce, this one included.
    pub nc: u32,
    /// Client nonce (ignored without qop).
    pub cnonce: &'a str,
}

fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(b":");
        }
        h.update(p);
    }
    let mut s = String::with_capacity(32);
    crate::text::push_hex(&mut s, &h.finalize());
    s
}

/// The `response` value (32 lowercase hex digits).
pub fn response(ch: &Challenge, r: &RequestDigest<'_>) -> String {
    let mut ha1 = md5_hex(&[r.username.as_bytes(), ch.realm.as_bytes(), r.password.as_bytes()]);
    if ch.algorithm == Some(Algorithm::Md5Sess) {
        ha1 = md5_hex(&[ha1.as_bytes(), ch.nonce.as_bytes(), r.cnonce.as_bytes()]);
    }
    let ha2 = match ch.qop {
        Some(Qop::AuthInt) => md5_hex(&[r.method.as_bytes(), r.uri.as_bytes(), md5_hex(&[r.body]).as_bytes()]),
        _ => md5_hex(&[r.method.as_bytes(), r.uri.as_bytes()]),
    };
    match ch.qop {
        None => md5_hex(&[ha1.as_bytes(), ch.nonce.as_bytes(), ha2.as_bytes()]),
        Some(q) => {
            let nc = format!("{:08x}", r.nc);
            let qop: &[u8] = if q == Qop::Auth { b"auth" } else { b"auth-int" };
            md5_hex(&[ha1.as_bytes(), ch.nonce.as_bytes(), nc.as_bytes(), r.cnonce.as_bytes(), qop, ha2.as_bytes()])
        }
    }
}

fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// The value of the `Authorization` (or `Proxy-Authorization`) header.
pub fn authorization(ch: &Challenge, r: &RequestDigest<'_>) -> String {
    let mut v = format!(
        "Digest username={},realm={},nonce={},uri={},response={}",
        quote(r.username),
        quote(&ch.realm),
        quote(&ch.nonce),
        quote(r.uri),
        quote(&response(ch, r))
    );
    match ch.algorithm {
        Some(Algorithm::Md5) => v.push_str(",algorithm=MD5"),
        Some(Algorithm::Md5Sess) => v.push_str(",algorithm=MD5-sess"),
        None => {}
    }
    if let Some(q) = ch.qop {
        let _ = write!(
            v,
            ",qop={},nc={:08x},cnonce={}",
            if q == Qop::Auth { "auth" } else { "auth-int" },
            r.nc,
            quote(r.cnonce)
        );
    }
    if let Some(o) = &ch.opaque {
        let _ = write!(v, ",opaque={}", quote(o));
    }
    v
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
mod tests {
    use super::*;

    fn req<'a>(method: &'a str, uri: &'a str, user: &'a str, pass: &'a str, cnonce: &'a str) -> RequestDigest<'a> {
        RequestDigest { username: user, password: pass, method, uri, body: b"", nc: 1, cnonce }
    }

    #[test]
    fn rfc2617_section_3_5_example() {
        let ch = Challenge::parse(
            r#"Digest realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#,
        )
        .unwrap();
        assert_eq!(ch.qop, Some(Qop::Auth));
        let r = req("GET", "/dir/index.html", "Mufasa", "Circle Of Life", "0a4f113b");
        assert_eq!(response(&ch, &r), "6629fae49393a05397450978507c4ef1");
        let header = authorization(&ch, &r);
        assert!(header.contains(r#"qop=auth,nc=00000001,cnonce="0a4f113b""#), "{header}");
        assert!(header.ends_with(r#"opaque="5ccc069c403ebaf9f0171e9517f40e41""#), "{header}");
    }

    #[test]
    fn rfc7616_section_3_9_1_md5_example() {
        let ch = Challenge::parse(
            r#"Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=MD5, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#,
        )
        .unwrap();
        let r =
            req("GET", "/dir/index.html", "Mufasa", "Circle of Life", "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ");
        assert_eq!(response(&ch, &r), "8ca523f5e9506fed4657c9700eebdbec");
    }

    /// The authenticated SUBSCRIBE of fixtures/sip/asterisk20-chan_sip-dialog-2000.log
    /// (peer `callbridge`, secret `sub-s3cret`): no qop, RFC 2069 form.
    #[test]
    fn asterisk_chan_sip_challenge_from_the_lab_log() {
        let ch = Challenge::parse(r#"Digest algorithm=MD5, realm="asterisk", nonce="6f956b05""#).unwrap();
        assert_eq!(ch.qop, None);
        assert_eq!(ch.algorithm, Some(Algorithm::Md5));
        let r = req("SUBSCRIBE", "sip:127.0.0.1:5060", "callbridge", "sub-s3cret", "");
        assert_eq!(response(&ch, &r), "b4e01862339c5010dfa0d72137a2136c");
        assert_eq!(
            authorization(&ch, &r),
            r#"Digest username="callbridge",realm="asterisk",nonce="6f956b05",uri="sip:127.0.0.1:5060",response="b4e01862339c5010dfa0d72137a2136c",algorithm=MD5"#
        );
    }

    #[test]
    fn nonce_count_is_eight_hex_digits() {
        let ch = Challenge::parse(r#"Digest realm="r", nonce="n", qop="auth""#).unwrap();
        let mut r = req("SUBSCRIBE", "sip:2000@pbx", "u", "p", "c");
        r.nc = 10;
        assert!(authorization(&ch, &r).contains("nc=0000000a"));
        r.nc = 11;
        let other = response(&ch, &r);
        r.nc = 10;
        assert_ne!(response(&ch, &r), other);
    }

    #[test]
    fn md5_sess_and_auth_int_differ_from_plain_md5() {
        let plain = Challenge::parse(r#"Digest realm="r", nonce="n", qop="auth""#).unwrap();
        let sess = Challenge::parse(r#"Digest realm="r", nonce="n", qop="auth", algorithm=MD5-sess"#).unwrap();
        let int = Challenge::parse(r#"Digest realm="r", nonce="n", qop="auth-int""#).unwrap();
        let r = req("SUBSCRIBE", "sip:2000@pbx", "u", "p", "c");
        let (a, b, c) = (response(&plain, &r), response(&sess, &r), response(&int, &r));
        assert!(a != b && b != c && a != c);
        // MD5-sess: HA1 = MD5(MD5(u:r:p):nonce:cnonce).
        let ha1 = md5_hex(&[md5_hex(&[b"u", b"r", b"p"]).as_bytes(), b"n", b"c"]);
        let ha2 = md5_hex(&[b"SUBSCRIBE", b"sip:2000@pbx"]);
        assert_eq!(b, md5_hex(&[ha1.as_bytes(), b"n", b"00000001", b"c", b"auth", ha2.as_bytes()]));
    }

    #[test]
    fn challenge_variants_and_errors() {
        let ch = Challenge::parse(r#"digest  realm = "a \"b\"" ,nonce=xyz,stale=TRUE,qop="auth-int""#).unwrap();
        assert_eq!(ch.realm, "a \"b\"");
        assert_eq!(ch.nonce, "xyz");
        assert!(ch.stale);
        assert_eq!(ch.qop, Some(Qop::AuthInt));
        assert_eq!(Challenge::parse("Basic realm=\"x\""), Err(DigestError::NotDigest("Basic".into())));
        assert_eq!(Challenge::parse("Digest nonce=\"x\""), Err(DigestError::Missing("realm")));
        assert!(matches!(
            Challenge::parse("Digest realm=\"r\",nonce=\"n\",algorithm=SHA-256"),
            Err(DigestError::Algorithm(_))
        ));
        assert!(matches!(Challenge::parse("Digest realm=\"r\",nonce=\"n\",qop=\"bogus\""), Err(DigestError::Qop(_))));
        assert!(matches!(Challenge::parse("Digest realm=\"r"), Err(DigestError::Syntax(_))));
        assert!(matches!(Challenge::parse("Digest realm"), Err(DigestError::Syntax(_))));
    }
}
