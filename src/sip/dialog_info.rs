//! `application/dialog-info+xml` (RFC 4235 §4): parses a NOTIFY body into a
//! typed [`DialogInfo`] and keeps, per subscription, the current set of an
//! extension's dialogs ([`DialogSet`]) by applying full and partial
//! documents in `version` order.
//!
//! The parser is namespace-prefix agnostic (it matches local names), skips
//! elements it does not know, and is bounded: at most [`MAX_DIALOGS`]
//! dialogs per document, [`MAX_DEPTH`] levels of nesting and
//! [`MAX_TEXT`] bytes per text value. It never expands custom entities and
//! never fetches anything. An empty body is a full document with no dialogs
//! (what several notifiers send for an idle extension).
//!
//! This module does no I/O and knows nothing of agents or events: mapping a
//! set to line states and calls is `line.rs`'s job.

// Fed by the network: no indexing or slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

use crate::text::prefix_chars;
use quick_xml::events::{BytesStart, Event as Xml};
use quick_xml::Reader;
use std::collections::BTreeMap;

pub const MAX_DIALOGS: usize = 64;
pub const MAX_DEPTH: usize = 16;
pub const MAX_TEXT: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialogInfoError {
    #[error("XML syntax: {0}")]
    Xml(String),
    #[error("root element is <{0}>, not <dialog-info>")]
    Root(String),
    #[error("<dialog-info> has no valid version attribute")]
    Version,
    #[error("<dialog-info> state {0:?} is neither full nor partial")]
    DocState(String),
    #[error("a <dialog> has no id attribute")]
    DialogId,
    #[error("<dialog id={0:?}> has no valid <state>")]
    DialogState(String),
    #[error("document exceeds a bound ({0})")]
    TooLarge(&'static str),
    #[error("body is not UTF-8")]
    Encoding,
}

/// Full state replaces what the subscriber knows; partial updates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocState {
    Full,
    Partial,
}

/// RFC 4235 §3.7.1: the dialog FSM states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DialogState {
    Trying,
    Proceeding,
    Early,
    Confirmed,
    Terminated,
}

impl DialogState {
    fn parse(s: &str) -> Option<DialogState> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "trying" => DialogState::Trying,
            "proceeding" => DialogState::Proceeding,
            "early" => DialogState::Early,
            "confirmed" => DialogState::Confirmed,
            "terminated" => DialogState::Terminated,
            _ => return None,
        })
    }

    /// Not yet answered: trying, proceeding or early.
    pub fn is_setup(self) -> bool {
        matches!(self, DialogState::Trying | DialogState::Proceeding | DialogState::Early)
    }
}

/// Who started the dialog, seen from the watched extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The extension placed the call (outbound for an agent).
    Initiator,
    /// The extension is being called (inbound for an agent).
    Recipient,
}

/// The `event` attribute of `<state>`: why a dialog ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateEvent {
    Cancelled,
    Rejected,
    Replaced,
    LocalBye,
    RemoteBye,
    Error,
    Timeout,
}

impl StateEvent {
    fn parse(s: &str) -> Option<StateEvent> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "cancelled" => StateEvent::Cancelled,
            "rejected" => StateEvent::Rejected,
            "replaced" => StateEvent::Replaced,
            "local-bye" => StateEvent::LocalBye,
            "remote-bye" => StateEvent::RemoteBye,
            "error" => StateEvent::Error,
            "timeout" => StateEvent::Timeout,
            _ => return None,
        })
    }
}

/// `<local>` or `<remote>`: who is at that end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Participant {
    /// `<identity>`'s URI (`sip:31955550003@127.0.0.1`).
    pub identity: Option<String>,
    /// `<identity display="…">`.
    pub display: Option<String>,
    /// `<target uri="…">`.
    pub target: Option<String>,
}

impl Participant {
    /// The user part of the identity (or target) URI: the phone number
    /// when the PBX provides one (`31955550003`), or a `tel:` number.
    pub fn number(&self) -> Option<&str> {
        let uri = self.identity.as_deref().or(self.target.as_deref())?;
        uri_user(uri)
    }
}

/// `sip:user@host;params` → `user`; `tel:+4930123;x` → `+4930123`.
pub fn uri_user(uri: &str) -> Option<&str> {
    let uri = uri.trim().trim_start_matches('<').trim_end_matches('>');
    let (scheme, rest) = uri.split_once(':')?;
    let user = if scheme.eq_ignore_ascii_case("tel") {
        rest.split(';').next()?
    } else if scheme.eq_ignore_ascii_case("sip") || scheme.eq_ignore_ascii_case("sips") {
        rest.split_once('@')?.0.split(';').next()?
    } else {
        return None;
    };
    let user = user.split(':').next()?; // sip:user:password@host
    (!user.is_empty()).then_some(user)
}

/// One `<dialog>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialog {
    pub id: String,
    pub call_id: Option<String>,
    pub local_tag: Option<String>,
    pub remote_tag: Option<String>,
    pub direction: Option<Direction>,
    pub state: DialogState,
    pub event: Option<StateEvent>,
    /// `<state code="…">`: the SIP response code that ended or moved it.
    pub code: Option<u16>,
    pub local: Option<Participant>,
    pub remote: Option<Participant>,
}

/// One parsed `<dialog-info>` document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialogInfo {
    /// `None` only for an empty body.
    pub version: Option<u64>,
    pub state: DocState,
    pub entity: Option<String>,
    pub dialogs: Vec<Dialog>,
}

impl DialogInfo {
    /// Parses a NOTIFY body; an empty (or whitespace) body is a full
    /// document without dialogs.
    pub fn parse(body: &[u8]) -> Result<DialogInfo, DialogInfoError> {
        let text = std::str::from_utf8(body).map_err(|_| DialogInfoError::Encoding)?;
        if text.trim().is_empty() {
            return Ok(DialogInfo { version: None, state: DocState::Full, entity: None, dialogs: Vec::new() });
        }
        Parser::default().parse(text)
    }
}

fn xml_err(e: impl std::fmt::Display) -> DialogInfoError {
    DialogInfoError::Xml(crate::text::shorten_owned(e.to_string(), 120))
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Result<Option<String>, DialogInfoError> {
    for a in e.attributes() {
        let a = a.map_err(xml_err)?;
        if a.key.local_name().as_ref() == name {
            let v = a.normalized_value(quick_xml::XmlVersion::Implicit1_0).map_err(xml_err)?;
            if v.len() > MAX_TEXT {
                return Err(DialogInfoError::TooLarge("attribute"));
            }
            return Ok(Some(v.into_owned()));
        }
    }
    Ok(None)
}

/// Where the parser stands: the path of local names from the root.
#[derive(Default)]
struct Parser {
    path: Vec<Vec<u8>>,
    doc: Option<DialogInfo>,
    dialog: Option<PartialDialog>,
    text: String,
}

#[derive(Default)]
struct PartialDialog {
    id: String,
    call_id: Option<String>,
    local_tag: Option<String>,
    remote_tag: Option<String>,
    direction: Option<Direction>,
    state: Option<DialogState>,
    event: Option<StateEvent>,
    code: Option<u16>,
    local: Option<Participant>,
    remote: Option<Participant>,
}

impl Parser {
    fn parse(mut self, text: &str) -> Result<DialogInfo, DialogInfoError> {
        let mut reader = Reader::from_str(text);
        reader.config_mut().trim_text(false);
        loop {
            match reader.read_event().map_err(xml_err)? {
                Xml::Start(e) => {
                    self.open(&e)?;
                    if self.path.len() >= MAX_DEPTH {
                        return Err(DialogInfoError::TooLarge("nesting"));
                    }
                    self.path.push(e.local_name().as_ref().to_vec());
                    self.text.clear();
                }
                Xml::Empty(e) => {
                    self.open(&e)?;
                    self.path.push(e.local_name().as_ref().to_vec());
                    self.text.clear();
                    self.close()?;
                    self.path.pop();
                }
                Xml::End(_) => {
                    self.close()?;
                    self.path.pop();
                    self.text.clear();
                }
                Xml::Text(t) => self.push_text(&t.decode().map_err(xml_err)?)?,
                Xml::CData(t) => self.push_text(&t.decode().map_err(xml_err)?)?,
                Xml::GeneralRef(r) => {
                    let resolved = match r.resolve_char_ref().map_err(xml_err)? {
                        Some(c) => c.to_string(),
                        None => {
                            let name = r.decode().map_err(xml_err)?;
                            quick_xml::escape::unescape(&format!("&{name};")).map_err(xml_err)?.into_owned()
                        }
                    };
                    self.push_text(&resolved)?;
                }
                Xml::Eof if !self.path.is_empty() => return Err(DialogInfoError::Xml("unclosed element".into())),
                Xml::Eof => break,
                Xml::Decl(_) | Xml::Comment(_) | Xml::PI(_) | Xml::DocType(_) => {}
            }
        }
        self.doc.ok_or_else(|| DialogInfoError::Xml("no root element".into()))
    }

    fn push_text(&mut self, s: &str) -> Result<(), DialogInfoError> {
        if self.text.len() + s.len() > MAX_TEXT {
            return Err(DialogInfoError::TooLarge("text"));
        }
        self.text.push_str(s);
        Ok(())
    }

    /// The path relative to the current `<dialog>`, if inside one.
    fn in_dialog(&self) -> Option<Vec<&[u8]>> {
        if self.path.get(1).is_some_and(|p| p == b"dialog") {
            Some(self.path.get(2..)?.iter().map(Vec::as_slice).collect())
        } else {
            None
        }
    }

    fn open(&mut self, e: &BytesStart<'_>) -> Result<(), DialogInfoError> {
        let name = e.local_name();
        let name = name.as_ref();
        if self.path.is_empty() {
            if name != b"dialog-info" || self.doc.is_some() {
                return Err(DialogInfoError::Root(prefix_chars(&String::from_utf8_lossy(name), 40).to_string()));
            }
            let version =
                attr(e, b"version")?.and_then(|v| v.trim().parse::<u64>().ok()).ok_or(DialogInfoError::Version)?;
            let state = match attr(e, b"state")?.as_deref().map(str::trim) {
                Some("full") => DocState::Full,
                Some("partial") => DocState::Partial,
                other => return Err(DialogInfoError::DocState(prefix_chars(other.unwrap_or(""), 20).to_string())),
            };
            self.doc = Some(DialogInfo { version: Some(version), state, entity: attr(e, b"entity")?, dialogs: vec![] });
            return Ok(());
        }
        if self.path.len() == 1 && name == b"dialog" {
            if self.doc.as_ref().is_some_and(|d| d.dialogs.len() >= MAX_DIALOGS) {
                return Err(DialogInfoError::TooLarge("dialogs"));
            }
            let id = attr(e, b"id")?.filter(|i| !i.trim().is_empty()).ok_or(DialogInfoError::DialogId)?;
            let direction = match attr(e, b"direction")?.as_deref().map(str::trim) {
                Some(d) if d.eq_ignore_ascii_case("initiator") => Some(Direction::Initiator),
                Some(d) if d.eq_ignore_ascii_case("recipient") => Some(Direction::Recipient),
                _ => None,
            };
            self.dialog = Some(PartialDialog {
                id,
                call_id: attr(e, b"call-id")?,
                local_tag: attr(e, b"local-tag")?,
                remote_tag: attr(e, b"remote-tag")?,
                direction,
                ..PartialDialog::default()
            });
            return Ok(());
        }
        let Some(rel) = self.in_dialog() else { return Ok(()) };
        let rel: Vec<Vec<u8>> = rel.into_iter().map(<[u8]>::to_vec).collect();
        let Some(d) = self.dialog.as_mut() else { return Ok(()) };
        match (rel.as_slice(), name) {
            ([], b"state") => {
                d.event = attr(e, b"event")?.as_deref().and_then(StateEvent::parse);
                d.code = attr(e, b"code")?.and_then(|c| c.trim().parse().ok());
            }
            ([], b"local") => d.local = Some(Participant::default()),
            ([], b"remote") => d.remote = Some(Participant::default()),
            ([side], b"identity") => {
                if let Some(p) = participant(d, side) {
                    p.display = attr(e, b"display")?;
                }
            }
            ([side], b"target") => {
                if let Some(p) = participant(d, side) {
                    p.target = attr(e, b"uri")?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn close(&mut self) -> Result<(), DialogInfoError> {
        if self.path.len() == 2 && self.path.get(1).is_some_and(|p| p == b"dialog") {
            if let Some(d) = self.dialog.take() {
                let state = d.state.ok_or_else(|| DialogInfoError::DialogState(d.id.clone()))?;
                if let Some(doc) = self.doc.as_mut() {
                    doc.dialogs.push(Dialog {
                        id: d.id,
                        call_id: d.call_id,
                        local_tag: d.local_tag,
                        remote_tag: d.remote_tag,
                        direction: d.direction,
                        state,
                        event: d.event,
                        code: d.code,
                        local: d.local,
                        remote: d.remote,
                    });
                }
            }
            return Ok(());
        }
        let Some(rel) = self.in_dialog() else { return Ok(()) };
        let rel: Vec<Vec<u8>> = rel.into_iter().map(<[u8]>::to_vec).collect();
        let text = self.text.trim().to_string();
        let Some(d) = self.dialog.as_mut() else { return Ok(()) };
        match rel.as_slice() {
            [state] if state == b"state" => {
                d.state = Some(DialogState::parse(&text).ok_or_else(|| DialogInfoError::DialogState(d.id.clone()))?);
            }
            [side, identity] if identity == b"identity" => {
                if let Some(p) = participant(d, side) {
                    p.identity = (!text.is_empty()).then_some(text);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn participant<'a>(d: &'a mut PartialDialog, side: &[u8]) -> Option<&'a mut Participant> {
    match side {
        b"local" => d.local.as_mut(),
        b"remote" => d.remote.as_mut(),
        _ => None,
    }
}

/// What applying a document did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The set changed (or was confirmed) by this document.
    Updated,
    /// Older than or equal to what we have (a retransmission or reordering):
    /// ignored.
    Stale,
    /// A partial document skipped versions: it was applied, but the
    /// subscriber should refresh the subscription to get full state.
    Gap,
}

/// The dialogs of one subscription, as the notifier last described them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DialogSet {
    version: Option<u64>,
    /// Keyed by dialog id; terminated dialogs of the last document stay
    /// here (so that their end can be reported) until the next document.
    dialogs: BTreeMap<String, Dialog>,
}

impl DialogSet {
    pub fn version(&self) -> Option<u64> {
        self.version
    }

    pub fn dialogs(&self) -> impl Iterator<Item = &Dialog> {
        self.dialogs.values()
    }

    /// Applies a document (RFC 4235 §4.1): full replaces, partial updates
    /// by dialog id; a document whose version is not newer is ignored.
    /// Dialogs reported terminated are kept until the next document.
    pub fn apply(&mut self, doc: DialogInfo) -> Applied {
        if let (Some(have), Some(got)) = (self.version, doc.version) {
            if got <= have {
                return Applied::Stale;
            }
        }
        self.dialogs.retain(|_, d| d.state != DialogState::Terminated);
        let gap = doc.state == DocState::Partial
            && match (self.version, doc.version) {
                (Some(have), Some(got)) => got != have + 1,
                _ => true,
            };
        if doc.state == DocState::Full {
            self.dialogs.clear();
        }
        if doc.version.is_some() {
            self.version = doc.version;
        }
        for d in doc.dialogs {
            if self.dialogs.len() >= MAX_DIALOGS && !self.dialogs.contains_key(&d.id) {
                continue;
            }
            self.dialogs.insert(d.id.clone(), d);
        }
        if gap {
            Applied::Gap
        } else {
            Applied::Updated
        }
    }

    /// A new subscription starts its own version sequence.
    pub fn reset_version(&mut self) {
        self.version = None;
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
pub(crate) mod tests {
    use super::*;

    /// Bodies copied from fixtures/sip/asterisk20-chan_sip-dialog-2000.log.
    pub(crate) const ASTERISK_IDLE_V0: &str = r#"<?xml version="1.0"?>
<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" version="0" state="full" entity="sip:2000@127.0.0.1:5060">
<dialog id="2000">
<state>terminated</state>
</dialog>
</dialog-info>
"#;

    pub(crate) const ASTERISK_EARLY_NO_CID_V1: &str = r#"<?xml version="1.0"?>
<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" version="1" state="full" entity="sip:2000@127.0.0.1:5060">
<dialog id="2000" call-id="pickup-1-8888@127.0.0.1" local-tag="8888SIPpTag001" remote-tag="as7435ba19" direction="recipient">
<remote>
<identity display="2000">sip:2000@127.0.0.1:5060</identity>
<target uri="sip:2000@127.0.0.1:5060"/>
</remote>
<local>
<identity display="2000">sip:2000@127.0.0.1:5060</identity>
<target uri="sip:2000@127.0.0.1:5060"/>
</local>
<state>early</state>
</dialog>
</dialog-info>
"#;

    pub(crate) const ASTERISK_EARLY_CID_V2: &str = r#"<?xml version="1.0"?>
<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" version="2" state="full" entity="sip:2000@127.0.0.1:5060">
<dialog id="2000" call-id="pickup-1-8888@127.0.0.1" local-tag="8888SIPpTag001" remote-tag="as7435ba19" direction="recipient">
<remote>
<identity display="Cliente 0003">sip:31955550003@127.0.0.1</identity>
<target uri="sip:31955550003@127.0.0.1"/>
</remote>
<local>
<identity display="Maria Silva">sip:2000@127.0.0.1</identity>
<target uri="sip:2000@127.0.0.1"/>
</local>
<state>early</state>
</dialog>
</dialog-info>
"#;

    pub(crate) const ASTERISK_CONFIRMED_V3: &str = r#"<?xml version="1.0"?>
<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" version="3" state="full" entity="sip:2000@127.0.0.1:5060">
<dialog id="2000">
<state>confirmed</state>
</dialog>
</dialog-info>
"#;

    pub(crate) const ASTERISK_TERMINATED_V4: &str = r#"<?xml version="1.0"?>
<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" version="4" state="full" entity="sip:2000@127.0.0.1:5060">
<dialog id="2000">
<state>terminated</state>
</dialog>
</dialog-info>
"#;

    #[test]
    fn the_fixture_log_contains_these_bodies() {
        let log = include_str!("../../fixtures/sip/asterisk20-chan_sip-dialog-2000.log");
        for body in [
            ASTERISK_IDLE_V0,
            ASTERISK_EARLY_NO_CID_V1,
            ASTERISK_EARLY_CID_V2,
            ASTERISK_CONFIRMED_V3,
            ASTERISK_TERMINATED_V4,
        ] {
            assert!(log.contains(body.trim_end()), "not in the log:\n{body}");
        }
    }

    #[test]
    fn asterisk_early_with_remote_identity() {
        let doc = DialogInfo::parse(ASTERISK_EARLY_CID_V2.as_bytes()).unwrap();
        assert_eq!(doc.version, Some(2));
        assert_eq!(doc.state, DocState::Full);
        assert_eq!(doc.entity.as_deref(), Some("sip:2000@127.0.0.1:5060"));
        let d = &doc.dialogs[0];
        assert_eq!(d.id, "2000");
        assert_eq!(d.call_id.as_deref(), Some("pickup-1-8888@127.0.0.1"));
        assert_eq!(d.direction, Some(Direction::Recipient));
        assert_eq!(d.state, DialogState::Early);
        let remote = d.remote.as_ref().unwrap();
        assert_eq!(remote.display.as_deref(), Some("Cliente 0003"));
        assert_eq!(remote.number(), Some("31955550003"));
        assert_eq!(d.local.as_ref().unwrap().number(), Some("2000"));
    }

    #[test]
    fn asterisk_bare_states() {
        for (body, version, state) in [
            (ASTERISK_IDLE_V0, 0, DialogState::Terminated),
            (ASTERISK_CONFIRMED_V3, 3, DialogState::Confirmed),
            (ASTERISK_TERMINATED_V4, 4, DialogState::Terminated),
        ] {
            let doc = DialogInfo::parse(body.as_bytes()).unwrap();
            assert_eq!(doc.version, Some(version));
            assert_eq!(doc.dialogs.len(), 1);
            assert_eq!(doc.dialogs[0].state, state);
            assert_eq!(doc.dialogs[0].direction, None);
            assert_eq!(doc.dialogs[0].remote, None);
        }
    }

    #[test]
    fn empty_bodies_are_idle() {
        for body in ["", "  \r\n"] {
            let doc = DialogInfo::parse(body.as_bytes()).unwrap();
            assert_eq!(doc.state, DocState::Full);
            assert!(doc.dialogs.is_empty());
        }
        let doc = DialogInfo::parse(
            br#"<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" version="7" state="full" entity="sip:2001@pbx"/>"#,
        )
        .unwrap();
        assert_eq!(doc.version, Some(7));
        assert!(doc.dialogs.is_empty());
    }

    /// RFC 4235 §5-style document, prefixed namespace, several dialogs,
    /// `event`/`code` on the state, escaped display names, unknown children.
    #[test]
    fn rfc_style_partial_document_with_prefixes() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<d:dialog-info xmlns:d="urn:ietf:params:xml:ns:dialog-info" xmlns:x="urn:x" version="12" state="partial" entity="sip:2001@pbx.example">
  <d:dialog id="a1" call-id="c1@phone" local-tag="lt" remote-tag="rt" direction="initiator">
    <d:state event="remote-bye" code="200">terminated</d:state>
    <d:duration>30</d:duration>
    <d:remote><d:identity display="Dupont &amp; Fils">tel:+33123456789</d:identity></d:remote>
    <x:extension><x:deep>ignored</x:deep></x:extension>
  </d:dialog>
  <d:dialog id="b2"><d:state><![CDATA[ confirmed ]]></d:state>
    <d:remote><d:target uri="sip:0800&#64;carrier"/></d:remote>
  </d:dialog>
</d:dialog-info>"#;
        let doc = DialogInfo::parse(body.as_bytes()).unwrap();
        assert_eq!(doc.state, DocState::Partial);
        assert_eq!(doc.dialogs.len(), 2);
        let a = &doc.dialogs[0];
        assert_eq!(a.direction, Some(Direction::Initiator));
        assert_eq!(a.state, DialogState::Terminated);
        assert_eq!(a.event, Some(StateEvent::RemoteBye));
        assert_eq!(a.code, Some(200));
        let remote = a.remote.as_ref().unwrap();
        assert_eq!(remote.display.as_deref(), Some("Dupont & Fils"));
        assert_eq!(remote.number(), Some("+33123456789"));
        let b = &doc.dialogs[1];
        assert_eq!(b.state, DialogState::Confirmed);
        assert_eq!(b.remote.as_ref().unwrap().number(), Some("0800"));
    }

    #[test]
    fn malformed_documents_are_errors() {
        type Check = fn(&DialogInfoError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("<dialog-info version=\"1\" state=\"full\">", |e| matches!(e, DialogInfoError::Xml(_))),
            ("<presence/>", |e| matches!(e, DialogInfoError::Root(_))),
            ("<dialog-info state=\"full\"/>", |e| matches!(e, DialogInfoError::Version)),
            ("<dialog-info version=\"x\" state=\"full\"/>", |e| matches!(e, DialogInfoError::Version)),
            ("<dialog-info version=\"1\" state=\"half\"/>", |e| matches!(e, DialogInfoError::DocState(_))),
            ("<dialog-info version=\"1\" state=\"full\"><dialog><state>early</state></dialog></dialog-info>", |e| {
                matches!(e, DialogInfoError::DialogId)
            }),
            ("<dialog-info version=\"1\" state=\"full\"><dialog id=\"x\"><state>ringing</state></dialog></dialog-info>", |e| {
                matches!(e, DialogInfoError::DialogState(_))
            }),
            ("<dialog-info version=\"1\" state=\"full\"><dialog id=\"x\"/></dialog-info>", |e| {
                matches!(e, DialogInfoError::DialogState(_))
            }),
            ("<dialog-info version=\"1\" state=\"full\"></dialog-info><dialog-info version=\"2\" state=\"full\"/>", |e| {
                matches!(e, DialogInfoError::Root(_))
            }),
            ("<dialog-info version=\"1\" state=\"full\">&bogus;</dialog-info>", |e| matches!(e, DialogInfoError::Xml(_))),
            ("not xml at all", |e| matches!(e, DialogInfoError::Xml(_))),
        ];
        for (body, check) in cases {
            let e = DialogInfo::parse(body.as_bytes()).unwrap_err();
            assert!(check(&e), "{body}: {e:?}");
        }
        assert_eq!(DialogInfo::parse(b"\xff\xfe"), Err(DialogInfoError::Encoding));
    }

    #[test]
    fn errors_quoting_non_ascii_input_are_shortened_whole() {
        for pad in 0..4 {
            for filler in ["é", "€", "📞"] {
                let long = filler.repeat(200);
                let bodies = [
                    format!("<{}{long} version=\"1\"/>", "d".repeat(pad)),
                    format!("<dialog-info version=\"1\" state=\"{}{long}\"/>", "s".repeat(pad)),
                    format!("<dialog-info version=\"1\" state=\"full\">&{}{long};</dialog-info>", "e".repeat(pad)),
                    format!("<dialog-info version=\"1\" state=\"full\"></{}{long}>", "x".repeat(pad)),
                ];
                for body in bodies {
                    match DialogInfo::parse(body.as_bytes()) {
                        Err(DialogInfoError::Xml(s) | DialogInfoError::Root(s) | DialogInfoError::DocState(s)) => {
                            assert!(s.len() <= 160, "{s:?}")
                        }
                        other => panic!("{body}: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn bounds_hold() {
        let mut many = String::from("<dialog-info version=\"1\" state=\"full\">");
        for i in 0..=MAX_DIALOGS {
            many.push_str(&format!("<dialog id=\"{i}\"><state>early</state></dialog>"));
        }
        many.push_str("</dialog-info>");
        assert_eq!(DialogInfo::parse(many.as_bytes()), Err(DialogInfoError::TooLarge("dialogs")));
        let deep = format!(
            "<dialog-info version=\"1\" state=\"full\">{}{}</dialog-info>",
            "<a>".repeat(MAX_DEPTH + 1),
            "</a>".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(DialogInfo::parse(deep.as_bytes()), Err(DialogInfoError::TooLarge("nesting")));
        let long = format!(
            "<dialog-info version=\"1\" state=\"full\"><dialog id=\"x\"><state>{}</state></dialog></dialog-info>",
            " ".repeat(MAX_TEXT + 1)
        );
        assert_eq!(DialogInfo::parse(long.as_bytes()), Err(DialogInfoError::TooLarge("text")));
    }

    fn doc(version: u64, state: DocState, dialogs: &[(&str, DialogState)]) -> DialogInfo {
        DialogInfo {
            version: Some(version),
            state,
            entity: None,
            dialogs: dialogs
                .iter()
                .map(|(id, s)| Dialog {
                    id: id.to_string(),
                    call_id: None,
                    local_tag: None,
                    remote_tag: None,
                    direction: None,
                    state: *s,
                    event: None,
                    code: None,
                    local: None,
                    remote: None,
                })
                .collect(),
        }
    }

    fn states(set: &DialogSet) -> Vec<(String, DialogState)> {
        set.dialogs().map(|d| (d.id.clone(), d.state)).collect()
    }

    #[test]
    fn full_and_partial_merge_in_version_order() {
        use DialogState::*;
        let mut set = DialogSet::default();
        assert_eq!(set.apply(doc(5, DocState::Full, &[("a", Early)])), Applied::Updated);
        assert_eq!(set.apply(doc(6, DocState::Partial, &[("b", Trying)])), Applied::Updated);
        assert_eq!(states(&set), vec![("a".into(), Early), ("b".into(), Trying)]);
        // A retransmission or an older document changes nothing.
        assert_eq!(set.apply(doc(6, DocState::Partial, &[("b", Terminated)])), Applied::Stale);
        assert_eq!(set.apply(doc(3, DocState::Full, &[])), Applied::Stale);
        assert_eq!(states(&set), vec![("a".into(), Early), ("b".into(), Trying)]);
        // Terminated dialogs are reported once, then forgotten.
        assert_eq!(set.apply(doc(7, DocState::Partial, &[("a", Terminated)])), Applied::Updated);
        assert_eq!(states(&set), vec![("a".into(), Terminated), ("b".into(), Trying)]);
        // A gap in partial versions is applied but flagged.
        assert_eq!(set.apply(doc(9, DocState::Partial, &[("b", Confirmed)])), Applied::Gap);
        assert_eq!(states(&set), vec![("b".into(), Confirmed)]);
        // Full state replaces everything.
        assert_eq!(set.apply(doc(10, DocState::Full, &[("c", Early)])), Applied::Updated);
        assert_eq!(states(&set), vec![("c".into(), Early)]);
        // A new subscription restarts versions (Asterisk starts at 0).
        set.reset_version();
        assert_eq!(set.apply(doc(0, DocState::Full, &[])), Applied::Updated);
        assert!(states(&set).is_empty());
        // An empty body (no version) is full state and keeps the version.
        let mut set2 = DialogSet::default();
        set2.apply(doc(4, DocState::Full, &[("x", Confirmed)]));
        assert_eq!(set2.apply(DialogInfo::parse(b"").unwrap()), Applied::Updated);
        assert!(states(&set2).is_empty());
        assert_eq!(set2.version(), Some(4));
    }

    #[test]
    fn uri_users() {
        assert_eq!(uri_user("sip:31955550003@127.0.0.1"), Some("31955550003"));
        assert_eq!(uri_user("<sips:2000@pbx;transport=tls>"), Some("2000"));
        assert_eq!(uri_user("sip:anonymous:x@pbx"), Some("anonymous"));
        assert_eq!(uri_user("tel:+4930123;phone-context=x"), Some("+4930123"));
        assert_eq!(uri_user("sip:pbx.example"), None);
        assert_eq!(uri_user("mailto:x@y"), None);
    }
}
