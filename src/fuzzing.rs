//! The fuzz targets' bodies: one function per parser that takes bytes from
//! the network or from disk. `fuzz/` (its own crate, built with `cargo
//! afl`) calls these, and `tests/fuzz_corpus.rs` runs every file of the
//! kept corpora and crashes through them on each `cargo test`, so a crash
//! found once stays fixed.
//!
//! Each function must not panic on any input: a panic (or an abort, or a
//! hang) is what the fuzzer reports. Beyond "no panic", each checks the
//! invariants its parser promises (the AMI codec decodes the same whatever
//! the reads, the lifecycle invariants hold on whatever a trace says, …),
//! with `assert!`, so that a broken promise is reported the same way.
//!
//! Not part of the product's interface: `#[doc(hidden)]` in `lib.rs`.

use crate::ami::codec::{decode_all, AmiCodec, AmiMessage, CodecLimits};
use crate::config::Config;
use crate::event::{EndReason, Event, EventKind};
use crate::replay::{replay_bytes, ReplaySettings, ReplayState, Speed};
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use tokio_util::codec::Decoder;

/// The lab configuration (agents, groups, hours): the directory the trace
/// target's normalizer attributes calls with.
const LAB_CONFIG: &str = include_str!("../config/lab.toml");

fn lab() -> &'static Config {
    static LAB: OnceLock<Config> = OnceLock::new();
    LAB.get_or_init(|| Config::parse(LAB_CONFIG, "config/lab.toml").unwrap_or_else(|e| panic!("{e}")))
}

/// A small number taken from the first byte, to vary read sizes and limits
/// with the input (`default` for an empty input).
fn knob(data: &[u8], default: usize) -> usize {
    data.first().map_or(default, |&b| usize::from(b))
}

/// Decodes `data` fed in reads of `chunk` bytes.
fn decode_in_chunks(limits: CodecLimits, data: &[u8], chunk: usize) -> Vec<AmiMessage> {
    let mut codec = AmiCodec::new(limits);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(c);
        while let Ok(Some(m)) = codec.decode(&mut buf) {
            out.push(m);
        }
        // The bound the codec promises: a partial frame plus one read.
        assert!(codec.pending_bytes() <= limits.max_frame_bytes + chunk, "pending {}", codec.pending_bytes());
        let bound = limits.max_frame_bytes.max(crate::ami::codec::BANNER_PREFIX.len());
        assert!(buf.len() <= bound + chunk, "buffered {}", buf.len());
    }
    while let Ok(Some(m)) = codec.decode_eof(&mut buf) {
        out.push(m);
    }
    out
}

/// Reads everything a frame offers (what the normalizer and the AMI client
/// read).
fn touch(m: &AmiMessage) {
    if let AmiMessage::Frame(f) = m {
        let _ = (f.event(), f.response(), f.action_id(), f.timestamp_micros(), f.len(), f.as_bytes().len());
        for (k, v) in f.headers() {
            assert!(f.get(k).is_some(), "header {k:?} not found by name");
            let _ = f.get_all(k).count() + v.len();
        }
    }
}

/// AMI codec and frame: whatever the bytes, decoding never panics, never
/// holds more than a frame plus a read, and gives the same messages
/// whether the stream arrives whole or in reads of any size.
pub fn ami_codec(data: &[u8]) {
    let limits = CodecLimits { max_frame_bytes: 16 + knob(data, 0) * 4, max_headers: 1 + knob(data, 0) % 16 };
    for limits in [CodecLimits::default(), limits] {
        let whole = decode_in_chunks(limits, data, data.len().max(1));
        whole.iter().for_each(touch);
        for chunk in [1, 1 + knob(data, 7) % 61] {
            let cut = decode_in_chunks(limits, data, chunk);
            assert_eq!(cut, whole, "reads of {chunk} bytes decode differently");
        }
    }
}

/// The trace reader: the bytes as a trace file, replayed through the codec
/// and the normalizer with the lab configuration. Then every call still
/// live is ended (`lost`) and the lifecycle invariants (SPEC §4) are
/// checked on the whole stream.
pub fn trace(data: &[u8]) {
    let config = lab();
    let mut normalizer = crate::settings::normalizer(config);
    let mut state = ReplayState::default();
    let mut events: Vec<Event> = Vec::new();
    // For a third of the inputs, a low bound on live calls, so that ending
    // calls past it is fuzzed too.
    let mut settings = ReplaySettings::new(Speed::Max, CodecLimits::default());
    if data.len() % 3 == 0 {
        settings.max_live_calls = 1 + data.last().map_or(0, |&b| usize::from(b) % 8);
    }
    replay_bytes(data, &mut normalizer, settings, &mut state, |e| events.push(e.clone()));
    let mut end = Vec::new();
    let now = events.iter().map(|e| e.time).max().unwrap_or(0);
    for id in normalizer.live_call_ids() {
        assert!(normalizer.end_call(id.as_str(), EndReason::Lost, now, &mut end));
    }
    assert_eq!(normalizer.live_calls(), 0);
    events.extend(end);
    for e in &events {
        let _ = e.to_cloudevent_json(&config.pbx.name);
    }
    if let Err(e) = check_lifecycle(&events) {
        panic!("lifecycle invariant broken: {e}");
    }
}

/// SPEC §4, per call: `call.started` first, `seq` 1, 2, 3… without gaps,
/// exactly one `call.ended`, last; a call never answered has one
/// `call.missed` right before it, an answered one none.
fn check_lifecycle(events: &[Event]) -> Result<(), String> {
    let mut per_call: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        if let Some(c) = &e.call {
            per_call.entry(c.id.as_str()).or_default().push(e);
        }
    }
    for (call, evs) in per_call {
        let types: Vec<&str> = evs.iter().map(|e| e.kind.type_name()).collect();
        if evs.iter().enumerate().any(|(i, e)| e.seq != i as u64 + 1) {
            return Err(format!("call {call}: seq not 1, 2, 3…: {types:?}"));
        }
        if types.first() != Some(&"call.started") {
            return Err(format!("call {call}: does not start with call.started: {types:?}"));
        }
        let ended = types.iter().filter(|t| **t == "call.ended").count();
        if ended != 1 || types.last() != Some(&"call.ended") {
            return Err(format!("call {call}: {ended} call.ended: {types:?}"));
        }
        let answered = evs.iter().any(|e| matches!(e.kind, EventKind::Answered { .. }));
        let missed = types.iter().filter(|t| **t == "call.missed").count();
        let missed_last = types.len() >= 2 && types.get(types.len() - 2) == Some(&"call.missed");
        match (answered, missed) {
            (true, 0) => {}
            (false, 1) if missed_last => {}
            _ => return Err(format!("call {call}: answered {answered}, {missed} call.missed: {types:?}")),
        }
    }
    Ok(())
}

/// SIP: one datagram (or TCP message) through the parser and every
/// accessor the user agent uses, the lenient scan that answers `400`, a
/// NOTIFY body through the dialog-info parser, and the bytes as a TCP
/// stream through the framer in reads of varying size.
pub fn sip_message(data: &[u8]) {
    use crate::sip::message::{Framed, Lenient, Message, Name, SipCodec};
    let max = 65_535;
    if let Ok(m) = Message::parse(data, max) {
        let _ = (m.is_request(), m.method(), m.status(), m.call_id(), m.cseq(), m.branch());
        let _ = (m.from_tag(), m.to_tag(), m.expires(), m.subscription_state(), m.event());
        let _ = (m.content_type(), m.contact_uri());
        let _ = m.headers(Name::Via).count();
        let _ = m.response(200, "OK", "tag", &[("Expires", "60")]);
        if m.content_type().as_deref() == Some("application/dialog-info+xml") {
            let _ = crate::sip::dialog_info::DialogInfo::parse(m.body());
        }
    } else if let Some(l) = Lenient::scan(data) {
        assert!(l.bad_request().starts_with(b"SIP/2.0 400 "));
    }
    let chunk = 1 + knob(data, 0) % 97;
    let mut codec = SipCodec::new(1 + knob(data, 0) * 16);
    let mut buf = BytesMut::new();
    'read: for c in data.chunks(chunk) {
        buf.extend_from_slice(c);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Framed::Message(m))) => {
                    let _ = Message::parse(&m, max);
                }
                Ok(Some(Framed::Skipped(_))) => {}
                Ok(None) => break,
                // The connection is closed on a framing error.
                Err(_) => break 'read,
            }
        }
    }
}

/// Dialog-info XML: a NOTIFY body parsed, applied to a dialog set and to
/// an agent's line tracker (both modes), as the SIP subscription does.
/// The input may hold two documents separated by a NUL byte (a full then a
/// partial update, say).
pub fn dialog_info(data: &[u8]) {
    use crate::ids::AgentId;
    use crate::sip::dialog_info::{DialogInfo, DialogSet};
    use crate::sip::line::{LineTracker, Mode};
    let mut set = DialogSet::default();
    let mut trackers = [Mode::LineOnly, Mode::SipOnly]
        .map(|mode| LineTracker::new(AgentId::new("a1"), "2000".into(), mode, 2_000_000));
    let mut out = Vec::new();
    let mut now = 1_700_000_000_000_000;
    for doc in data.split(|&b| b == 0) {
        let Ok(info) = DialogInfo::parse(doc) else { continue };
        for d in &info.dialogs {
            let _ = (d.state.is_setup(), d.local.as_ref().and_then(|p| p.number()));
            let _ = d.remote.as_ref().map(|p| p.number());
        }
        let _ = set.apply(info);
        for t in &mut trackers {
            t.update(now, &set, &mut out);
            t.poll(now + 5_000_000, &mut out);
            let _ = (t.line_state(), t.calls_in_progress(), t.next_deadline());
        }
        now += 1_000_000;
    }
    for e in &out {
        let _ = e.to_cloudevent_json("lab");
    }
}

/// FastAGI: the bytes as what Asterisk sends on a FastAGI connection (the
/// environment block, then replies), read as a session reads them.
pub fn agi_request(data: &[u8]) {
    let limits = crate::routing::agi::AgiLimits {
        max_line_bytes: 8 + knob(data, 0) * 32,
        max_env_lines: 1 + knob(data, 0) % 64,
        ..Default::default()
    };
    for limits in [crate::routing::agi::AgiLimits::default(), limits] {
        let _ = crate::routing::agi::parse_session(data, &limits);
    }
}

/// The configuration file: parsed and validated, then every component's
/// settings built from it as `run` builds them at start (a file that
/// passed validation must never make the daemon panic while starting).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::parse(text, "fuzz.toml") else { return };
    assert!(config.validate().is_empty(), "a loaded configuration validates");
    let _ = config.secret_uses();
    let _ = crate::settings::codec_limits(&config);
    let _ = crate::settings::normalizer(&config);
    let _ = crate::settings::routing(&config);
    let _ = crate::settings::stuck_limits(&config);
    let _ = crate::settings::sip_settings(&config);
    let _ = crate::settings::sip_mode(&config);
    if let Some(api) = &config.api {
        let _ = crate::settings::api_serve_limits(api);
    }
    if let Some(ami) = &config.pbx.ami {
        let _ = crate::settings::ami_client(ami);
    }
    if let Some(agi) = &config.agi {
        let _ = crate::routing::agi::AgiLimits::from_config(agi);
    }
}

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus test and the fuzz crate.
pub const TARGETS: &[(&str, Target)] = &[
    ("ami_codec", ami_codec),
    ("trace", trace),
    ("sip_message", sip_message),
    ("dialog_info", dialog_info),
    ("agi_request", agi_request),
    ("config", config),
];

/// Decodes every message of `data` with the default limits (a helper of
/// the corpus test, which checks that the seeds are meaningful).
pub fn messages(data: &[u8]) -> Vec<AmiMessage> {
    let mut out = Vec::new();
    decode_all(&mut AmiCodec::default(), data, |m| out.push(m));
    out
}
