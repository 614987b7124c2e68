//! SIP messages: bounded parsing (via `rsip`), the few header accessors the
//! user agent needs (compact header forms included), message builders, and
//! the stream framing for TCP.
//!
//! Framing (where one message ends in a byte stream, [`SipCodec`]) is kept
//! apart from format (what a message says, [`Message`]). Every entry point
//! is bounded by a maximum message size; a message that fails to parse is a
//! value ([`MessageError`]) the caller counts and, for a request whose
//! dialog headers can still be read ([`Lenient`]), answers with `400`.
//!
//! This module does no I/O, keeps no state across messages and must never
//! panic on input: everything here is fed by the network.

// Fed by the network: no indexing or slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

use bytes::{Buf, BytesMut};
use rsip::headers::UntypedHeader;
use rsip::Header;
use std::fmt::Write as _;
use tokio_util::codec::Decoder;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("SIP syntax: {0}")]
    Syntax(String),
    #[error("missing or invalid {0} header")]
    Header(&'static str),
    #[error("Content-Length {declared} but {actual} body bytes")]
    ContentLength { declared: usize, actual: usize },
}

/// The headers callbridge reads, by canonical name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Contact,
    Event,
    Expires,
    SubscriptionState,
    ContentType,
    ContentLength,
    WwwAuthenticate,
    ProxyAuthenticate,
    MinExpires,
    RetryAfter,
    Server,
    UserAgent,
}

impl Name {
    pub fn as_str(self) -> &'static str {
        match self {
            Name::Via => "Via",
            Name::From => "From",
            Name::To => "To",
            Name::CallId => "Call-ID",
            Name::CSeq => "CSeq",
            Name::Contact => "Contact",
            Name::Event => "Event",
            Name::Expires => "Expires",
            Name::SubscriptionState => "Subscription-State",
            Name::ContentType => "Content-Type",
            Name::ContentLength => "Content-Length",
            Name::WwwAuthenticate => "WWW-Authenticate",
            Name::ProxyAuthenticate => "Proxy-Authenticate",
            Name::MinExpires => "Min-Expires",
            Name::RetryAfter => "Retry-After",
            Name::Server => "Server",
            Name::UserAgent => "User-Agent",
        }
    }

    /// RFC 3261 §7.3.3 compact forms (and RFC 6665's `o` for Event).
    fn compact(self) -> Option<&'static str> {
        Some(match self {
            Name::Via => "v",
            Name::From => "f",
            Name::To => "t",
            Name::CallId => "i",
            Name::Contact => "m",
            Name::Event => "o",
            Name::ContentType => "c",
            Name::ContentLength => "l",
            _ => return None,
        })
    }

    const ALL: [Name; 17] = [
        Name::Via,
        Name::From,
        Name::To,
        Name::CallId,
        Name::CSeq,
        Name::Contact,
        Name::Event,
        Name::Expires,
        Name::SubscriptionState,
        Name::ContentType,
        Name::ContentLength,
        Name::WwwAuthenticate,
        Name::ProxyAuthenticate,
        Name::MinExpires,
        Name::RetryAfter,
        Name::Server,
        Name::UserAgent,
    ];

    fn from_wire(name: &str) -> Option<Name> {
        Name::ALL.into_iter().find(|n| {
            name.eq_ignore_ascii_case(n.as_str()) || n.compact().is_some_and(|c| name.eq_ignore_ascii_case(c))
        })
    }

    /// An rsip header of this name.
    fn header(self, value: String) -> Header {
        match self {
            Name::Via => Header::Via(rsip::headers::Via::new(value)),
            Name::From => Header::From(rsip::headers::From::new(value)),
            Name::To => Header::To(rsip::headers::To::new(value)),
            Name::CallId => Header::CallId(rsip::headers::CallId::new(value)),
            Name::CSeq => Header::CSeq(rsip::headers::CSeq::new(value)),
            Name::Contact => Header::Contact(rsip::headers::Contact::new(value)),
            Name::Event => Header::Event(rsip::headers::Event::new(value)),
            Name::Expires => Header::Expires(rsip::headers::Expires::new(value)),
            Name::SubscriptionState => Header::SubscriptionState(rsip::headers::SubscriptionState::new(value)),
            Name::ContentType => Header::ContentType(rsip::headers::ContentType::new(value)),
            Name::ContentLength => Header::ContentLength(rsip::headers::ContentLength::new(value)),
            Name::WwwAuthenticate => Header::WwwAuthenticate(rsip::headers::WwwAuthenticate::new(value)),
            Name::ProxyAuthenticate => Header::ProxyAuthenticate(rsip::headers::ProxyAuthenticate::new(value)),
            Name::MinExpires => Header::MinExpires(rsip::headers::MinExpires::new(value)),
            Name::RetryAfter => Header::RetryAfter(rsip::headers::RetryAfter::new(value)),
            Name::Server => Header::Server(rsip::headers::Server::new(value)),
            Name::UserAgent => Header::UserAgent(rsip::headers::UserAgent::new(value)),
        }
    }
}

/// The canonical name and value of an rsip header, when it is one we read.
fn name_value(h: &Header) -> Option<(Name, &str)> {
    Some(match h {
        Header::Via(v) => (Name::Via, v.value()),
        Header::From(v) => (Name::From, v.value()),
        Header::To(v) => (Name::To, v.value()),
        Header::CallId(v) => (Name::CallId, v.value()),
        Header::CSeq(v) => (Name::CSeq, v.value()),
        Header::Contact(v) => (Name::Contact, v.value()),
        Header::Event(v) => (Name::Event, v.value()),
        Header::Expires(v) => (Name::Expires, v.value()),
        Header::SubscriptionState(v) => (Name::SubscriptionState, v.value()),
        Header::ContentType(v) => (Name::ContentType, v.value()),
        Header::ContentLength(v) => (Name::ContentLength, v.value()),
        Header::WwwAuthenticate(v) => (Name::WwwAuthenticate, v.value()),
        Header::ProxyAuthenticate(v) => (Name::ProxyAuthenticate, v.value()),
        Header::MinExpires(v) => (Name::MinExpires, v.value()),
        Header::RetryAfter(v) => (Name::RetryAfter, v.value()),
        Header::Server(v) => (Name::Server, v.value()),
        Header::UserAgent(v) => (Name::UserAgent, v.value()),
        Header::Other(n, v) => (Name::from_wire(n)?, v.as_str()),
        _ => return None,
    })
}

/// `CSeq: 102 NOTIFY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: String,
}

/// `Subscription-State` (RFC 6665 §8.2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubState {
    pub state: SubStateValue,
    pub expires: Option<u32>,
    pub reason: Option<String>,
    pub retry_after: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubStateValue {
    Active,
    Pending,
    Terminated,
}

impl SubState {
    pub fn parse(value: &str) -> Option<SubState> {
        let mut parts = value.split(';');
        let state = match parts.next()?.trim().to_ascii_lowercase().as_str() {
            "active" => SubStateValue::Active,
            "pending" => SubStateValue::Pending,
            "terminated" => SubStateValue::Terminated,
            _ => return None,
        };
        let mut s = SubState { state, expires: None, reason: None, retry_after: None };
        for p in parts {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("expires") {
                s.expires = v.parse().ok();
            } else if k.eq_ignore_ascii_case("reason") {
                s.reason = Some(v.to_ascii_lowercase()).filter(|r| r.len() <= 32);
            } else if k.eq_ignore_ascii_case("retry-after") {
                s.retry_after = v.parse().ok();
            }
        }
        Some(s)
    }
}

/// A parsed SIP message.
#[derive(Debug, Clone)]
pub struct Message {
    inner: rsip::SipMessage,
}

impl Message {
    /// Parses one whole message (a datagram, or a frame cut by
    /// [`SipCodec`]). The body is cut to `Content-Length` when the datagram
    /// carries more (RFC 3261 §18.3); a shorter body is an error.
    pub fn parse(bytes: &[u8], max: usize) -> Result<Message, MessageError> {
        if bytes.len() > max {
            return Err(MessageError::TooLarge { size: bytes.len(), max });
        }
        let inner = rsip::SipMessage::try_from(bytes)
            .map_err(|e| MessageError::Syntax(crate::text::shorten_owned(e.to_string(), 120)))?;
        let mut msg = Message { inner };
        for required in [Name::Via, Name::From, Name::To, Name::CallId] {
            if msg.header(required).is_none() {
                return Err(MessageError::Header(required.as_str()));
            }
        }
        msg.cseq().ok_or(MessageError::Header("CSeq"))?;
        if let Some(len) = msg.header(Name::ContentLength) {
            let declared: usize = len.trim().parse().map_err(|_| MessageError::Header("Content-Length"))?;
            let body = msg.inner.body_mut();
            if body.len() < declared {
                return Err(MessageError::ContentLength { declared, actual: body.len() });
            }
            body.truncate(declared);
        }
        Ok(msg)
    }

    pub fn is_request(&self) -> bool {
        self.inner.is_request()
    }

    /// The request method (`NOTIFY`), `None` for a response.
    pub fn method(&self) -> Option<String> {
        match &self.inner {
            rsip::SipMessage::Request(r) => Some(r.method().to_string()),
            rsip::SipMessage::Response(_) => None,
        }
    }

    /// The status code, `None` for a request.
    pub fn status(&self) -> Option<u16> {
        match &self.inner {
            rsip::SipMessage::Response(r) => Some(r.status_code().code()),
            rsip::SipMessage::Request(_) => None,
        }
    }

    pub fn body(&self) -> &[u8] {
        self.inner.body()
    }

    /// The first header of that name.
    pub fn header(&self, name: Name) -> Option<&str> {
        self.headers(name).next()
    }

    /// Every header of that name, in order (comma-joined values are not
    /// split: callbridge only reads single-valued headers this way).
    pub fn headers(&self, name: Name) -> impl Iterator<Item = &str> {
        let headers: &rsip::Headers = match &self.inner {
            rsip::SipMessage::Request(r) => &r.headers,
            rsip::SipMessage::Response(r) => &r.headers,
        };
        headers.iter().filter_map(move |h| name_value(h).filter(|(n, _)| *n == name).map(|(_, v)| v.trim()))
    }

    pub fn call_id(&self) -> &str {
        self.header(Name::CallId).unwrap_or("")
    }

    pub fn cseq(&self) -> Option<CSeq> {
        let v = self.header(Name::CSeq)?;
        let (seq, method) = v.trim().split_once(|c: char| c.is_ascii_whitespace())?;
        Some(CSeq { seq: seq.parse().ok()?, method: method.trim().to_string() })
    }

    /// The `branch` of the topmost Via.
    pub fn branch(&self) -> Option<&str> {
        header_param(self.header(Name::Via)?, "branch")
    }

    pub fn from_tag(&self) -> Option<&str> {
        header_param(self.header(Name::From)?, "tag")
    }

    pub fn to_tag(&self) -> Option<&str> {
        header_param(self.header(Name::To)?, "tag")
    }

    /// `Expires` as seconds.
    pub fn expires(&self) -> Option<u32> {
        self.header(Name::Expires)?.trim().parse().ok()
    }

    pub fn subscription_state(&self) -> Option<SubState> {
        SubState::parse(self.header(Name::SubscriptionState)?)
    }

    /// The event package (`dialog` of `Event: dialog;id=1`).
    pub fn event(&self) -> Option<&str> {
        self.header(Name::Event)?.split(';').next().map(str::trim)
    }

    /// The MIME type of the body, lowercase, without parameters.
    pub fn content_type(&self) -> Option<String> {
        Some(self.header(Name::ContentType)?.split(';').next()?.trim().to_ascii_lowercase())
    }

    /// The URI of the first Contact (`sip:2000@127.0.0.1:5060`).
    pub fn contact_uri(&self) -> Option<&str> {
        let v = self.header(Name::Contact)?;
        match (v.find('<'), v.find('>')) {
            (Some(a), Some(b)) if a < b => v.get(a + 1..b),
            _ => v.split(';').next().map(str::trim),
        }
    }

    /// Bytes of a response to this request: Via(s), From, To, Call-ID and
    /// CSeq copied (RFC 3261 §8.2.6), a To tag added when missing, plus
    /// `extra` headers.
    pub fn response(&self, code: u16, reason: &str, to_tag: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut out = format!("SIP/2.0 {code} {reason}\r\n");
        for via in self.headers(Name::Via) {
            let _ = write!(out, "Via: {via}\r\n");
        }
        let _ = write!(out, "From: {}\r\n", self.header(Name::From).unwrap_or(""));
        let to = self.header(Name::To).unwrap_or("");
        if self.to_tag().is_some() || to_tag.is_empty() {
            let _ = write!(out, "To: {to}\r\n");
        } else {
            let _ = write!(out, "To: {to};tag={to_tag}\r\n");
        }
        let _ = write!(out, "Call-ID: {}\r\n", self.call_id());
        let _ = write!(out, "CSeq: {}\r\n", self.header(Name::CSeq).unwrap_or(""));
        for (name, value) in extra {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        out.push_str("Content-Length: 0\r\n\r\n");
        out.into_bytes()
    }
}

/// A parameter of a header value (`tag` of `<sip:a@b>;tag=x`), looked up
/// after the closing `>` when there is one, so that URI parameters are not
/// mistaken for header parameters.
pub fn header_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let params = match value.rfind('>') {
        Some(i) => value.get(i + 1..).unwrap_or_default(),
        None => value.split_once(';').map_or("", |(_, p)| p),
    };
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// What can be read from a request that `rsip` refused: enough to answer it
/// with `400 Bad Request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lenient {
    pub method: String,
    pub vias: Vec<String>,
    pub from: String,
    pub to: String,
    pub call_id: String,
    pub cseq: String,
}

impl Lenient {
    /// Scans a request line by line; `None` unless it looks like a request
    /// with Via, From, To, Call-ID and CSeq (a response is never answered).
    pub fn scan(bytes: &[u8]) -> Option<Lenient> {
        let head_end = memchr::memmem::find(bytes, b"\r\n\r\n").unwrap_or(bytes.len());
        let head = String::from_utf8_lossy(bytes.get(..head_end).unwrap_or(bytes));
        let mut lines = head.split("\r\n");
        let start = lines.next()?;
        let method = start.split(' ').next()?;
        if start.starts_with("SIP/") || !start.ends_with("SIP/2.0") || method.is_empty() || method.len() > 16 {
            return None;
        }
        let mut l = Lenient {
            method: method.to_string(),
            vias: vec![],
            from: String::new(),
            to: String::new(),
            call_id: String::new(),
            cseq: String::new(),
        };
        for line in lines {
            let Some((n, v)) = line.split_once(':') else { continue };
            let v = v.trim().to_string();
            match Name::from_wire(n.trim()) {
                Some(Name::Via) => l.vias.push(v),
                Some(Name::From) => l.from = v,
                Some(Name::To) => l.to = v,
                Some(Name::CallId) => l.call_id = v,
                Some(Name::CSeq) => l.cseq = v,
                _ => {}
            }
        }
        let complete = !l.vias.is_empty() && !l.from.is_empty() && !l.to.is_empty();
        (complete && !l.call_id.is_empty() && !l.cseq.is_empty()).then_some(l)
    }

    pub fn bad_request(&self) -> Vec<u8> {
        let mut out = String::from("SIP/2.0 400 Bad Request\r\n");
        for via in &self.vias {
            let _ = write!(out, "Via: {via}\r\n");
        }
        let _ = write!(
            out,
            "From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {}\r\nContent-Length: 0\r\n\r\n",
            self.from, self.to, self.call_id, self.cseq
        );
        out.into_bytes()
    }
}

/// A request to send, built from parts and rendered by `rsip`.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub method: rsip::Method,
    pub uri: String,
    pub headers: Vec<(Name, String)>,
    /// Headers `rsip` has no variant for (`Accept`, `Authorization`…), by name.
    pub other: Vec<(&'static str, String)>,
}

impl Outgoing {
    /// The wire form. Fails when `uri` is not a SIP URI that renders back
    /// exactly as given (see [`sip_uri`]).
    pub fn render(&self) -> Result<Vec<u8>, MessageError> {
        let uri = sip_uri(&self.uri)?;
        let mut headers: Vec<Header> = self.headers.iter().map(|(n, v)| n.header(v.clone())).collect();
        headers.extend(self.other.iter().map(|(n, v)| Header::Other((*n).to_string(), v.clone())));
        headers.push(Header::ContentLength(rsip::headers::ContentLength::new("0")));
        let req = rsip::Request {
            method: self.method,
            uri,
            version: rsip::Version::V2,
            headers: headers.into(),
            body: Vec::new(),
        };
        Ok(req.to_string().into_bytes())
    }
}

/// Parses a `sip:`/`sips:` URI with `rsip`, and refuses any URI `rsip`
/// would not render back byte for byte: the digest is computed over the
/// Request-URI as given, and `rsip`'s URI parser is lenient (it cuts
/// `not a uri` to `not`) and has no IPv6 literals.
pub fn sip_uri(s: &str) -> Result<rsip::Uri, MessageError> {
    let bad = || MessageError::Syntax(format!("{:?} is not a usable SIP URI", crate::text::prefix_chars(s, 80)));
    let lower = s.get(..5).unwrap_or("").to_ascii_lowercase();
    if !(lower.starts_with("sip:") || lower.starts_with("sips:"))
        || s.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad());
    }
    let uri = rsip::Uri::try_from(s).map_err(|_| bad())?;
    if uri.to_string() != s {
        return Err(bad());
    }
    Ok(uri)
}

/// A random token for tags, branches and Call-IDs (lowercase hex).
pub fn token(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..len).filter_map(|_| char::from_digit(rng.random_range(0..16), 16)).collect()
}

/// RFC 3261's magic cookie plus a random part.
pub fn new_branch() -> String {
    format!("z9hG4bK{}", token(20))
}

/// One item of a SIP byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed {
    /// One whole message (headers and `Content-Length` bytes of body).
    Message(BytesMut),
    /// A message that was cut out and dropped (too large); the stream goes on.
    Skipped(MessageError),
}

/// Cuts a TCP byte stream into messages (RFC 3261 §18.3: `Content-Length`
/// delimits the body; a missing one means no body). CRLF keepalives between
/// messages (RFC 5626) are skipped.
#[derive(Debug)]
pub struct SipCodec {
    max: usize,
    /// Bytes of an oversized message still to be discarded.
    discard: usize,
}

impl SipCodec {
    pub fn new(max_message_bytes: usize) -> SipCodec {
        SipCodec { max: max_message_bytes, discard: 0 }
    }
}

/// `Content-Length` of a header block, 0 when absent.
fn content_length(head: &[u8]) -> Result<usize, MessageError> {
    for line in head.split(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let Some((n, v)) = line.split_once(':') else { continue };
        if Name::from_wire(n.trim()) == Some(Name::ContentLength) {
            return v.trim().parse().map_err(|_| MessageError::Header("Content-Length"));
        }
    }
    Ok(0)
}

impl Decoder for SipCodec {
    type Item = Framed;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Framed>, std::io::Error> {
        if self.discard > 0 {
            let n = self.discard.min(src.len());
            src.advance(n);
            self.discard -= n;
            if self.discard > 0 {
                return Ok(None);
            }
        }
        let skip = src.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
        src.advance(skip);
        let Some(head_end) = memchr::memmem::find(src, b"\r\n\r\n") else {
            if src.len() > self.max {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("SIP header block exceeds {} bytes", self.max),
                ));
            }
            return Ok(None);
        };
        let body_len = match content_length(src.get(..head_end).unwrap_or_default()) {
            Ok(n) => n,
            Err(e) => {
                // Without a length the rest of the stream cannot be framed.
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()));
            }
        };
        let total = head_end + 4 + body_len;
        if total > self.max {
            let n = total.min(src.len());
            src.advance(n);
            self.discard = total - n;
            return Ok(Some(Framed::Skipped(MessageError::TooLarge { size: total, max: self.max })));
        }
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        Ok(Some(Framed::Message(src.split_to(total))))
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
pub(crate) mod tests {
    use super::*;

    /// The messages of the lab log, in order: (sent by the subscriber?, bytes).
    pub(crate) fn fixture_messages() -> Vec<(bool, Vec<u8>)> {
        let log = include_str!("../../fixtures/sip/asterisk20-chan_sip-dialog-2000.log");
        let mut out = Vec::new();
        for block in log.split("-----------------------------------------------") {
            let Some((first, rest)) = block.split_once("\n\n") else { continue };
            let sent = first.contains("message sent");
            if !first.contains("UDP message") {
                continue;
            }
            // Each block ends with the separator's preceding blank line(s).
            let msg = rest.trim_start_matches('\n');
            let end = msg.find("\r\n\r\n").map(|h| {
                let head = &msg[..h];
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                h + 4 + len
            });
            if let Some(end) = end {
                out.push((sent, msg.as_bytes()[..end.min(msg.len())].to_vec()));
            }
        }
        out
    }

    #[test]
    fn every_message_of_the_asterisk_log_parses() {
        let msgs = fixture_messages();
        assert!(msgs.len() > 30, "{} messages", msgs.len());
        for (_, bytes) in &msgs {
            let m = Message::parse(bytes, 65_535).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)));
            assert!(m.branch().is_some_and(|b| b.starts_with("z9hG4bK")));
            if m.method().as_deref() == Some("NOTIFY") {
                assert_eq!(m.event(), Some("dialog"));
                assert_eq!(m.content_type().as_deref(), Some("application/dialog-info+xml"));
                assert_eq!(m.subscription_state().unwrap().state, SubStateValue::Active);
                assert!(m.body().starts_with(b"<?xml"));
                assert!(crate::sip::dialog_info::DialogInfo::parse(m.body()).is_ok());
            }
        }
    }

    #[test]
    fn asterisk_challenge_and_ok() {
        let msgs = fixture_messages();
        let challenge = Message::parse(&msgs[1].1, 65_535).unwrap();
        assert_eq!(challenge.status(), Some(401));
        assert_eq!(challenge.cseq(), Some(CSeq { seq: 1, method: "SUBSCRIBE".into() }));
        assert_eq!(challenge.to_tag(), Some("as7435ba19"));
        assert_eq!(challenge.from_tag(), Some("8888SIPpTag001"));
        assert_eq!(challenge.branch(), Some("z9hG4bK-8888-1-0"));
        assert_eq!(
            challenge.header(Name::WwwAuthenticate),
            Some(r#"Digest algorithm=MD5, realm="asterisk", nonce="6f956b05""#)
        );
        let ok = Message::parse(&msgs[3].1, 65_535).unwrap();
        assert_eq!(ok.status(), Some(200));
        assert_eq!(ok.expires(), Some(600));
        assert_eq!(ok.contact_uri(), Some("sip:2000@127.0.0.1:5060"));
        let notify = Message::parse(&msgs[4].1, 65_535).unwrap();
        assert_eq!(notify.method().as_deref(), Some("NOTIFY"));
        assert_eq!(notify.cseq(), Some(CSeq { seq: 102, method: "NOTIFY".into() }));
        assert_eq!(notify.body().len(), 207);
        // Our answer has the shape of the subscriber's 200 in the log.
        let answer = String::from_utf8(notify.response(200, "OK", "ignored", &[])).unwrap();
        let logged = String::from_utf8(msgs[5].1.clone()).unwrap();
        assert_eq!(answer, logged);
    }

    #[test]
    fn compact_forms_and_parameters() {
        let raw = "NOTIFY sip:cb@10.0.0.1 SIP/2.0\r\nv: SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKx;rport\r\n\
                   f: \"PBX\" <sip:2000@pbx;transport=udp>;tag=abc\r\nt: <sip:cb@10.0.0.1>;tag=def\r\n\
                   i: call-1\r\nCSeq: 7 NOTIFY\r\no: dialog;id=4\r\n\
                   Subscription-State: terminated;reason=timeout;retry-after=30\r\nc: application/dialog-info+xml;charset=utf-8\r\nl: 0\r\n\r\n";
        let m = Message::parse(raw.as_bytes(), 4096).unwrap();
        assert_eq!(m.call_id(), "call-1");
        assert_eq!(m.from_tag(), Some("abc"));
        assert_eq!(m.to_tag(), Some("def"));
        assert_eq!(m.branch(), Some("z9hG4bKx"));
        assert_eq!(m.event(), Some("dialog"));
        assert_eq!(m.content_type().as_deref(), Some("application/dialog-info+xml"));
        let s = m.subscription_state().unwrap();
        assert_eq!(s.state, SubStateValue::Terminated);
        assert_eq!(s.reason.as_deref(), Some("timeout"));
        assert_eq!(s.retry_after, Some(30));
        assert_eq!(header_param("<sip:a@b;tag=uri>;tag=hdr", "tag"), Some("hdr"));
        assert_eq!(header_param("sip:a@b;tag=x", "tag"), Some("x"));
        assert_eq!(header_param("<sip:a@b>", "tag"), None);
    }

    #[test]
    fn malformed_and_oversized_input() {
        assert!(matches!(Message::parse(&[b'x'; 100], 50), Err(MessageError::TooLarge { size: 100, max: 50 })));
        assert!(matches!(Message::parse(b"\x00\x01garbage", 4096), Err(MessageError::Syntax(_))));
        let no_call_id = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>\r\nCSeq: 1 OPTIONS\r\n\r\n";
        assert_eq!(Message::parse(no_call_id, 4096).unwrap_err(), MessageError::Header("Call-ID"));
        let short = b"NOTIFY sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: c\r\nCSeq: 1 NOTIFY\r\nContent-Length: 50\r\n\r\n<x/>";
        assert_eq!(Message::parse(short, 4096).unwrap_err(), MessageError::ContentLength { declared: 50, actual: 4 });
        let long = b"NOTIFY sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:x@y>;tag=1\r\nTo: <sip:a@b>;tag=2\r\nCall-ID: c\r\nCSeq: 1 NOTIFY\r\nContent-Length: 4\r\n\r\n<x/>trailing";
        assert_eq!(Message::parse(long, 4096).unwrap().body(), b"<x/>");
    }

    /// A syntax error quotes the input; shortening that quote must not cut
    /// a multi-byte character (this once panicked the user agent's task).
    #[test]
    fn syntax_errors_quoting_non_ascii_input_do_not_panic() {
        let mut cut_inside_a_char = false;
        for pad in 0..4 {
            for filler in ["é", "€", "📞"] {
                let text = format!("{}{} SIP/2.0\r\n\r\n", "x".repeat(pad), filler.repeat(200));
                let full = rsip::SipMessage::try_from(text.as_bytes()).unwrap_err().to_string();
                cut_inside_a_char |= full.len() > 120 && !full.is_char_boundary(120);
                match Message::parse(text.as_bytes(), 65_535) {
                    Err(MessageError::Syntax(s)) => assert!(s.len() <= 120 && full.starts_with(&s), "{s:?}"),
                    other => panic!("{other:?}"),
                }
                assert!(Lenient::scan(text.as_bytes()).is_none());
                let _ = sip_uri(&format!("sip:{}", filler.repeat(100)));
            }
        }
        assert!(cut_inside_a_char, "no case puts the 120-byte cut inside a character");
    }

    #[test]
    fn lenient_scan_answers_broken_requests_only() {
        let broken = b"NOTIFY sip:cb@h SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKq\r\nFrom: <sip:2000@pbx>;tag=a\r\nTo: <sip:cb@h>;tag=b\r\nCall-ID: c1\r\nCSeq: 9 NOTIFY\r\nbroken header line\r\n\r\n";
        assert!(Message::parse(broken, 4096).is_err());
        let l = Lenient::scan(broken).unwrap();
        let answer = String::from_utf8(l.bad_request()).unwrap();
        assert!(answer.starts_with("SIP/2.0 400 Bad Request\r\nVia: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKq\r\n"));
        assert!(answer.contains("CSeq: 9 NOTIFY\r\n"));
        assert!(Lenient::scan(b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n").is_none());
        assert!(Lenient::scan(b"\xff\xfe\x00").is_none());
    }

    #[test]
    fn outgoing_requests_render_and_parse_back() {
        let out = Outgoing {
            method: rsip::Method::Subscribe,
            uri: "sip:2000@127.0.0.1:5060".into(),
            headers: vec![
                (Name::Via, "SIP/2.0/UDP 127.0.0.1:5065;branch=z9hG4bKabc;rport".into()),
                (Name::From, "<sip:callbridge@127.0.0.1>;tag=f1".into()),
                (Name::To, "<sip:2000@127.0.0.1>".into()),
                (Name::CallId, "c1@callbridge".into()),
                (Name::CSeq, "1 SUBSCRIBE".into()),
                (Name::Event, "dialog".into()),
                (Name::Expires, "600".into()),
            ],
            other: vec![("Accept", "application/dialog-info+xml".into()), ("Max-Forwards", "70".into())],
        };
        let bytes = out.render().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("SUBSCRIBE sip:2000@127.0.0.1:5060 SIP/2.0\r\n"), "{text}");
        assert!(text.ends_with("Content-Length: 0\r\n\r\n"), "{text:?}");
        let back = Message::parse(&bytes, 4096).unwrap();
        assert_eq!(back.method().as_deref(), Some("SUBSCRIBE"));
        assert_eq!(back.branch(), Some("z9hG4bKabc"));
        assert_eq!(back.expires(), Some(600));
        for bad in ["not a uri", "sip:2000 x@h", "sip:", "sips:a@[::1]:5061", "sip:a@b;transport=tcp"] {
            assert!(Outgoing { uri: bad.into(), ..out.clone() }.render().is_err(), "{bad}");
        }
    }

    fn decode_all(codec: &mut SipCodec, chunks: &[&[u8]]) -> Vec<Framed> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        out
    }

    #[test]
    fn stream_framing_however_the_bytes_are_split() {
        let msgs = fixture_messages();
        let stream: Vec<u8> =
            msgs.iter().take(8).flat_map(|(_, m)| [b"\r\n\r\n".as_slice(), m.as_slice()].concat()).collect();
        for split in [1usize, 7, 100, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(split).collect();
            let framed = decode_all(&mut SipCodec::new(65_535), &chunks);
            let got: Vec<Vec<u8>> = framed
                .into_iter()
                .map(|f| match f {
                    Framed::Message(m) => m.to_vec(),
                    Framed::Skipped(e) => panic!("{e}"),
                })
                .collect();
            let want: Vec<Vec<u8>> = msgs.iter().take(8).map(|(_, m)| m.clone()).collect();
            assert_eq!(got, want, "split {split}");
        }
    }

    #[test]
    fn stream_framing_skips_oversized_messages_and_refuses_endless_headers() {
        let msgs = fixture_messages();
        let big = &msgs[4].1; // a NOTIFY with a 207-byte body, 647 bytes
        let small = &msgs[1].1; // the 401, 491 bytes
        let stream = [big.as_slice(), small.as_slice()].concat();
        let framed = decode_all(&mut SipCodec::new(600), &stream.chunks(64).collect::<Vec<_>>());
        assert!(matches!(framed[0], Framed::Skipped(MessageError::TooLarge { .. })), "{framed:?}");
        assert_eq!(framed[1], Framed::Message(BytesMut::from(small.as_slice())));
        let mut codec = SipCodec::new(1024);
        let mut endless = BytesMut::from(&b"NOTIFY sip:a@b SIP/2.0\r\n"[..]);
        endless.extend_from_slice(&b"X-Long: aaaaaaaa\r\n".repeat(100));
        assert!(codec.decode(&mut endless).is_err());
    }
}
