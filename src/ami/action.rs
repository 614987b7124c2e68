//! AMI actions (what callbridge asks the PBX to do) and their wire encoding.
//!
//! An [`Action`] is a name plus ordered headers; duplicate keys are allowed
//! and kept in order (an `Originate` carries one `Variable:` line per channel
//! variable). The encoder writes
//! `Action: <name>\r\nActionID: <id>\r\n<Key>: <Value>\r\n...\r\n`.
//!
//! The `ActionID` belongs to the connection, which uses it to route replies
//! and list items back to the caller: an action built here never carries one
//! as an ordinary header (see [`InvalidAction::ReservedHeader`]).
//!
//! This module must never write a CR or LF that the caller put in a name, key
//! or value: AMI has no escaping, so one stray `\r\n` would let text taken from
//! a ticket or an API request inject a second action (header injection).
//! Such an action is refused with [`InvalidAction`] before any byte is written.

use super::codec::AmiCodec;
use bytes::{BufMut, BytesMut};
use std::fmt;
use tokio_util::codec::Encoder;

/// One AMI action.
#[derive(Clone, PartialEq, Eq)]
pub struct Action {
    name: String,
    action_id: Option<String>,
    headers: Vec<(String, String)>,
}

/// Why an action cannot be written to the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAction {
    #[error("action name {0:?} is empty or contains CR, LF or ':'")]
    BadName(String),
    #[error("header key {key:?} of action {action} is empty or contains CR, LF or ':'")]
    BadKey { action: String, key: String },
    #[error("value of header {key:?} of action {action} contains CR or LF (header injection)")]
    BadValue { action: String, key: String },
    #[error("header {key:?} of action {action} is reserved: the connection sets Action and ActionID itself")]
    ReservedHeader { action: String, key: String },
}

/// Errors of the encoder: a refused action, or the I/O error of the sink it
/// writes to (`tokio_util`'s `FramedWrite` requires `From<io::Error>`).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Invalid(#[from] InvalidAction),
    #[error("writing the action failed")]
    Io(#[from] std::io::Error),
}

impl Action {
    /// An action named `name` (`Ping`, `Originate`, `QueuePause`, …) without
    /// headers.
    pub fn new(name: impl Into<String>) -> Self {
        Action { name: name.into(), action_id: None, headers: Vec::new() }
    }

    /// Appends a header (builder style); a repeated key adds another line.
    #[must_use]
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.push(key, value);
        self
    }

    /// Appends a header in place.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.headers.push((key.into(), value.into()));
    }

    /// The action's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value of the first header named `key` (ASCII case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str())
    }

    /// All headers in order (without `Action` and `ActionID`).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The `ActionID` the connection assigned, if any.
    pub fn action_id(&self) -> Option<&str> {
        self.action_id.as_deref()
    }

    /// Sets the `ActionID`. Only the connection (and tests of the encoder)
    /// should call this: replies are routed by it.
    pub fn with_action_id(mut self, id: impl Into<String>) -> Self {
        self.action_id = Some(id.into());
        self
    }

    /// Checks that the action can be written without changing its meaning.
    pub fn validate(&self) -> Result<(), InvalidAction> {
        if !is_clean_key(&self.name) {
            return Err(InvalidAction::BadName(self.name.clone()));
        }
        if let Some(id) = &self.action_id {
            if has_line_break(id) {
                return Err(InvalidAction::BadValue { action: self.name.clone(), key: "ActionID".into() });
            }
        }
        for (k, v) in &self.headers {
            if !is_clean_key(k) {
                return Err(InvalidAction::BadKey { action: self.name.clone(), key: k.clone() });
            }
            if k.eq_ignore_ascii_case("Action") || k.eq_ignore_ascii_case("ActionID") {
                return Err(InvalidAction::ReservedHeader { action: self.name.clone(), key: k.clone() });
            }
            if has_line_break(v) {
                return Err(InvalidAction::BadValue { action: self.name.clone(), key: k.clone() });
            }
        }
        Ok(())
    }

    /// Bytes this action takes on the wire.
    fn encoded_len(&self) -> usize {
        let id = self.action_id.as_ref().map_or(0, |id| "ActionID: \r\n".len() + id.len());
        "Action: \r\n".len()
            + self.name.len()
            + id
            + self.headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>()
            + 2
    }

    /// Writes the action (validated first) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), InvalidAction> {
        self.validate()?;
        dst.reserve(self.encoded_len());
        put_line(dst, "Action", &self.name);
        if let Some(id) = &self.action_id {
            put_line(dst, "ActionID", id);
        }
        for (k, v) in &self.headers {
            put_line(dst, k, v);
        }
        dst.put_slice(b"\r\n");
        Ok(())
    }
}

fn put_line(dst: &mut BytesMut, key: &str, value: &str) {
    dst.put_slice(key.as_bytes());
    dst.put_slice(b": ");
    dst.put_slice(value.as_bytes());
    dst.put_slice(b"\r\n");
}

fn has_line_break(s: &str) -> bool {
    s.bytes().any(|c| c == b'\r' || c == b'\n')
}

fn is_clean_key(s: &str) -> bool {
    !s.trim().is_empty() && !s.bytes().any(|c| matches!(c, b'\r' | b'\n' | b':'))
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Login keys and secrets must never reach a log line.
        let mut d = f.debug_struct("Action");
        d.field("name", &self.name).field("action_id", &self.action_id);
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| {
                let redact = ["Secret", "Key"].iter().any(|s| k.eq_ignore_ascii_case(s));
                (k.as_str(), if redact { "<redacted>" } else { v.as_str() })
            })
            .collect();
        d.field("headers", &headers).finish()
    }
}

impl Encoder<&Action> for AmiCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: &Action, dst: &mut BytesMut) -> Result<(), EncodeError> {
        Ok(item.encode(dst)?)
    }
}

impl Encoder<Action> for AmiCodec {
    type Error = EncodeError;

    fn encode(&mut self, item: Action, dst: &mut BytesMut) -> Result<(), EncodeError> {
        Ok(item.encode(dst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ami::codec::{decode_all, AmiMessage};

    fn wire(a: &Action) -> String {
        let mut buf = BytesMut::new();
        a.encode(&mut buf).expect("valid action");
        String::from_utf8(buf.to_vec()).expect("utf-8")
    }

    #[test]
    fn encodes_name_id_then_headers_in_order_with_duplicates() {
        let a = Action::new("Originate")
            .header("Channel", "PJSIP/2000")
            .header("Variable", "A=1")
            .header("Variable", "B=2")
            .with_action_id("cb-7");
        assert_eq!(
            wire(&a),
            "Action: Originate\r\nActionID: cb-7\r\nChannel: PJSIP/2000\r\nVariable: A=1\r\nVariable: B=2\r\n\r\n"
        );
        assert_eq!(a.encoded_len(), wire(&a).len());
    }

    #[test]
    fn encoded_action_decodes_back_to_the_same_headers() {
        let a = Action::new("Setvar").header("Variable", "X").header("Value", "a: b").with_action_id("1");
        let mut out = Vec::new();
        decode_all(&mut AmiCodec::default(), wire(&a).as_bytes(), |m| out.push(m));
        let AmiMessage::Frame(f) = &out[0] else { panic!("{out:?}") };
        let headers: Vec<_> = f.headers().collect();
        assert_eq!(headers, vec![("Action", "Setvar"), ("ActionID", "1"), ("Variable", "X"), ("Value", "a: b")]);
    }

    #[test]
    fn refuses_header_injection() {
        let injected = Action::new("Setvar").header("Value", "x\r\n\r\nAction: Originate");
        assert!(matches!(injected.validate(), Err(InvalidAction::BadValue { .. })));
        let mut buf = BytesMut::new();
        assert!(injected.encode(&mut buf).is_err());
        assert!(buf.is_empty(), "nothing may be written for a refused action");

        assert!(matches!(Action::new("Ping\n").validate(), Err(InvalidAction::BadName(_))));
        assert!(matches!(Action::new("").validate(), Err(InvalidAction::BadName(_))));
        assert!(matches!(Action::new("Ping").header("A\rB", "1").validate(), Err(InvalidAction::BadKey { .. })));
        assert!(matches!(Action::new("Ping").header("A: B", "1").validate(), Err(InvalidAction::BadKey { .. })));
        assert!(matches!(Action::new("Ping").header("X", "lf\n").validate(), Err(InvalidAction::BadValue { .. })));
        assert!(matches!(
            Action::new("Ping").with_action_id("1\r\nAction: Logoff").validate(),
            Err(InvalidAction::BadValue { .. })
        ));
    }

    #[test]
    fn action_id_is_reserved_for_the_connection() {
        let a = Action::new("Ping").header("actionid", "mine");
        assert!(matches!(a.validate(), Err(InvalidAction::ReservedHeader { .. })));
    }

    #[test]
    fn debug_redacts_credentials() {
        let a = Action::new("Login").header("Username", "cb").header("Secret", "s3cret").header("Key", "abc");
        let s = format!("{a:?}");
        assert!(!s.contains("s3cret") && !s.contains("abc"), "{s}");
        assert!(s.contains("cb"));
    }

    #[test]
    fn encoder_trait_writes_the_same_bytes() {
        let a = Action::new("Ping").with_action_id("9");
        let mut codec = AmiCodec::default();
        let mut buf = BytesMut::new();
        Encoder::<&Action>::encode(&mut codec, &a, &mut buf).expect("valid");
        assert_eq!(&buf[..], b"Action: Ping\r\nActionID: 9\r\n\r\n");
        let bad = Action::new("Ping").header("X", "\n");
        assert!(matches!(Encoder::<Action>::encode(&mut codec, bad, &mut buf), Err(EncodeError::Invalid(_))));
    }
}
