//! `callbridge explain`: why each call of a trace came out the way it did.
//!
//! Replays one trace exactly as `replay` does — the same codec and limits,
//! the same [`TraceReader`] (reconnections, recorded and implied resyncs),
//! the same clock and bound on live calls, through [`crate::replay`]'s own
//! steps — and keeps, per call, a ladder: the AMI frames the normalizer
//! applied to the call (with their line in the trace file), the lifecycle
//! events each produced, and the rule that decided each outcome.
//!
//! Provenance is derived here, outside the normalizer, so that nobody else
//! pays for it: frames are fed one at a time, so the events one
//! [`Normalizer::handle`] appends are that frame's products; the calls a
//! frame touched are read from the normalizer's channel → call index
//! ([`Normalizer::call_of_channel`]); the rule behind a `call.missed` is
//! the normalizer's own [`MissRule`] for the call, read after every frame
//! that touched it (a call ends on a frame that changes none of its
//! evidence: its last hangup, or a resync that finds it gone).
//!
//! Reads a trace, writes text or a page: never a sink, never the network.

// Reads trace files: no indexing or slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

mod html;
mod rule;
mod text;

pub use html::render_html;
pub use text::render_text;

use crate::ami::codec::{AmiCodec, AmiMessage, CodecLimits};
use crate::ami::Frame;
use crate::event::{CallId, CallSnapshot, EndReason, Event, EventKind, Micros};
use crate::ids::AgentId;
use crate::normalize::headers::{
    DEST_LINKEDID, LINKEDID, ORIG_TRANSFERER_LINKEDID, TRANSFEREE_LINKEDID, TRANSFERER_LINKEDID, UNIQUEID,
};
use crate::normalize::input::AmiEvent;
use crate::normalize::{IgnoredFrames, MissRule, Normalizer};
use crate::reconnect::{TraceItem, TraceReader, RESYNC_END_MARKER, RESYNC_MARKER};
use crate::replay::{Clock, ReplayState, Speed};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How an explanation replays its trace (as `replay` would).
#[derive(Debug, Clone, Copy)]
pub struct ExplainSettings {
    pub limits: CodecLimits,
    /// Most calls live at once (`replay --max-live-calls`).
    pub max_live_calls: usize,
}

/// Why a trace cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("cannot read trace {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: no AMI frame in the trace (an AMI trace starts with the banner `Asterisk Call Manager/…` and holds `Key: Value` frames)")]
    NoFrames { path: PathBuf, line: u64 },
}

/// Every call of one trace, in the order they started.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub trace: PathBuf,
    pub calls: Vec<CallLadder>,
    /// Lines where a frame was skipped as malformed (too large, garbage).
    pub malformed: Vec<u64>,
    pub frames: u64,
}

impl Explanation {
    pub fn call(&self, id: &str) -> Option<&CallLadder> {
        self.calls.iter().find(|c| c.id.as_str() == id)
    }
}

/// One call's ladder.
#[derive(Debug, Clone)]
pub struct CallLadder {
    pub id: CallId,
    /// The call after its last event.
    pub snapshot: Option<CallSnapshot>,
    pub rungs: Vec<Rung>,
    /// Lanes of the swimlane view, in order: the caller (or the agent who
    /// called out), the queue, each agent, the customer, the PBX.
    pub lanes: Vec<String>,
}

impl CallLadder {
    /// Every lifecycle event of the call, with the rung that produced it.
    pub fn products(&self) -> impl Iterator<Item = (&Rung, &Product)> {
        self.rungs.iter().flat_map(|r| r.products.iter().map(move |p| (r, p)))
    }

    /// The rule of the call's `call.missed`, if it was missed.
    pub fn missed_rule(&self) -> Option<&str> {
        self.products().find(|(_, p)| p.event.kind.type_name() == "call.missed").map(|(_, p)| p.rule.as_str())
    }
}

/// What touched a call at one point of the trace.
#[derive(Debug, Clone)]
pub struct Rung {
    /// Line of the trace file (the frame's first line, or the resync's
    /// marker); 0 for what is not in the file (the bound on live calls).
    pub line: u64,
    pub time: Micros,
    pub cause: Cause,
    /// The swimlane it belongs to.
    pub lane: String,
    pub products: Vec<Product>,
}

#[derive(Debug, Clone)]
pub enum Cause {
    /// An AMI frame: its event, channel and the headers that matter.
    Frame { event: String, channel: String, details: Vec<(String, String)> },
    /// The resync after a reconnection: `listed` channels; `recorded`
    /// when the recorder wrote the listing, else implied by a restarted
    /// PBX (`FullyBooted` with a short `Uptime` at line `booted`).
    Resync { listed: usize, recorded: bool, booted: Option<(u64, String)> },
    /// More calls live than `max_live_calls`: the call silent the longest ended.
    LiveBound { max: usize },
}

impl Cause {
    /// `QueueCallerAbandon`, `resync`, …
    pub fn name(&self) -> &str {
        match self {
            Cause::Frame { event, .. } => event,
            Cause::Resync { .. } => "resync",
            Cause::LiveBound { .. } => "max-live-calls",
        }
    }

    pub fn detail(&self, key: &str) -> Option<&str> {
        match self {
            Cause::Frame { details, .. } => details.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    pub fn channel(&self) -> &str {
        match self {
            Cause::Frame { channel, .. } => channel,
            _ => "",
        }
    }
}

/// A lifecycle event and the rule that decided it.
#[derive(Debug, Clone)]
pub struct Product {
    pub event: Event,
    /// The swimlane it belongs to.
    pub lane: String,
    /// Why: the AMI evidence and the rule applied (never empty).
    pub rule: String,
    /// What decided a `call.missed` (the normalizer's own verdict).
    pub miss_rule: Option<MissRule>,
    /// For a `call.missed` decided by nobody being available: the last
    /// presence frame of each of the group's agents when the call arrived.
    pub presence: Vec<String>,
}

/// Explains the trace at `path` with `normalizer` (fresh, built from the
/// configuration). `only` keeps one call.
pub fn explain_file(
    path: &Path,
    normalizer: &mut Normalizer,
    settings: ExplainSettings,
    only: Option<&str>,
) -> Result<Explanation, ExplainError> {
    let data = std::fs::read(path).map_err(|source| ExplainError::Read { path: path.to_path_buf(), source })?;
    let mut x = explain_bytes(&data, normalizer, settings);
    x.trace = path.to_path_buf();
    if x.frames == 0 {
        return Err(ExplainError::NoFrames {
            path: path.to_path_buf(),
            line: x.malformed.first().copied().unwrap_or(1),
        });
    }
    if let Some(id) = only {
        x.calls.retain(|c| c.id.as_str() == id);
    }
    Ok(x)
}

/// [`explain_file`] over a trace in memory.
pub fn explain_bytes(data: &[u8], normalizer: &mut Normalizer, settings: ExplainSettings) -> Explanation {
    let ignored = IgnoredFrames::new("");
    normalizer.share_ignored_frames(ignored.clone());
    let mut d = Driver {
        n: normalizer,
        ignored,
        clock: Clock::new(Speed::Max),
        state: ReplayState::default(),
        max: settings.max_live_calls,
        out: Vec::new(),
        ladders: Vec::new(),
        index: HashMap::new(),
        verdicts: HashMap::new(),
        presence: Vec::new(),
        presence_at_arrival: HashMap::new(),
        context: TraceContext::default(),
        malformed: Vec::new(),
        frames: 0,
    };
    let mut codec = AmiCodec::new(settings.limits);
    let mut reader = TraceReader::new();
    let mut items = Vec::new();
    decode_with_lines(&mut codec, data, |msg, line| {
        d.note_message(&msg, line);
        reader.read(msg, |i| items.push(i));
        for item in items.drain(..) {
            d.item(item, line);
        }
    });
    let last = d.context.last_line;
    reader.finish(|i| items.push(i));
    for item in items.drain(..) {
        d.item(item, last);
    }
    d.finish()
}

/// Decodes `data` as [`crate::ami::codec::decode_reader`] does (the same
/// codec, fed in the same chunks) and hands each message over with the
/// line of the trace it starts on.
fn decode_with_lines(codec: &mut AmiCodec, data: &[u8], mut f: impl FnMut(AmiMessage, u64)) {
    use tokio_util::codec::Decoder;
    const CHUNK: usize = 64 * 1024;
    let mut buf = bytes::BytesMut::with_capacity(CHUNK * 2);
    let mut lines = LineCounter { data, counted: 0, newlines: 0 };
    let (mut fed, mut start) = (0usize, 0usize);
    let mut hand_over = |m: AmiMessage, end: usize, start: &mut usize| {
        let first = data
            .get(*start..end)
            .and_then(|s| s.iter().position(|b| *b != b'\r' && *b != b'\n'))
            .map_or(*start, |p| *start + p);
        f(m, lines.line_of(first));
        *start = end;
    };
    for chunk in data.chunks(CHUNK) {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        // Decoding fails only on I/O, which memory has none of.
        while let Ok(Some(m)) = codec.decode(&mut buf) {
            hand_over(m, fed - buf.len(), &mut start);
        }
    }
    while let Ok(Some(m)) = codec.decode_eof(&mut buf) {
        hand_over(m, fed - buf.len(), &mut start);
    }
}

/// Line numbers of byte offsets, counted once as the offsets grow.
struct LineCounter<'a> {
    data: &'a [u8],
    counted: usize,
    newlines: u64,
}

impl LineCounter<'_> {
    fn line_of(&mut self, offset: usize) -> u64 {
        if offset > self.counted {
            let seen = self.data.get(self.counted..offset).unwrap_or_default();
            self.newlines += memchr::memchr_iter(b'\n', seen).count() as u64;
            self.counted = offset;
        }
        self.newlines + 1
    }
}

/// What the trace said about the connection so far (for the resync rules).
#[derive(Debug, Default)]
struct TraceContext {
    /// The last `FullyBooted` after a reconnection: line and `Uptime`.
    booted: Option<(u64, String)>,
    /// Whether the message being read closes a recorded resync listing.
    closes_listing: bool,
    /// Line of the last message.
    last_line: u64,
}

struct Driver<'n> {
    n: &'n mut Normalizer,
    ignored: IgnoredFrames,
    clock: Clock,
    state: ReplayState,
    max: usize,
    out: Vec<Event>,
    ladders: Vec<CallLadder>,
    index: HashMap<CallId, usize>,
    /// The normalizer's verdict for each live unanswered call as of its
    /// last frame: what `call.missed` says if the call ends now.
    verdicts: HashMap<CallId, MissRule>,
    /// Per agent, the last presence frame seen (pause, device state).
    presence: Vec<(AgentId, String)>,
    /// Per call judged as arriving when nobody was available: `presence` then.
    presence_at_arrival: HashMap<CallId, Vec<(AgentId, String)>>,
    context: TraceContext,
    malformed: Vec<u64>,
    frames: u64,
}

impl Driver<'_> {
    fn note_message(&mut self, msg: &AmiMessage, line: u64) {
        self.context.last_line = line;
        self.context.closes_listing = false;
        match msg {
            AmiMessage::Malformed(_) => self.malformed.push(line),
            AmiMessage::Banner(_) => {}
            AmiMessage::Frame(f) => match f.event() {
                Some("FullyBooted") => {
                    self.context.booted = Some((line, f.get("Uptime").unwrap_or("").to_string()));
                }
                Some(RESYNC_END_MARKER) => self.context.closes_listing = true,
                Some(RESYNC_MARKER) => {}
                _ => {}
            },
        }
    }

    /// One trace item, as `replay` applies it (then the bound on live calls).
    fn item(&mut self, item: TraceItem, line: u64) {
        match item {
            TraceItem::Frame(f) => {
                self.frames += 1;
                let before = self.dispatched(&f);
                // The normalizer's time for the frame (a frame without a
                // `Timestamp` takes the latest seen).
                let time = f.timestamp_micros().unwrap_or(self.clock.now());
                self.note_presence(&f, line, time);
                let frame = f.clone();
                let products = self.apply(TraceItem::Frame(f));
                self.record_frame(&frame, line, time, before, products);
            }
            // A reconnection only starts a resync epoch: it produces nothing.
            TraceItem::Reconnected => {
                self.apply(TraceItem::Reconnected);
            }
            TraceItem::Resync { channels, queue_items, at } => {
                self.refresh_all(EndReason::Lost);
                let cause = Cause::Resync {
                    listed: channels.len(),
                    recorded: self.context.closes_listing,
                    booted: self.context.booted.clone(),
                };
                let products = self.apply(TraceItem::Resync { channels, queue_items, at });
                self.record(products, line, at, &cause);
                self.refresh_all(EndReason::Normal);
            }
        }
        // Past the bound, the calls silent the longest end `lost`; the
        // others are judged as usual again afterwards.
        let over = self.n.live_calls() > self.max;
        if over {
            self.refresh_all(EndReason::Lost);
        }
        let now = self.clock.now();
        self.state.bound_live_calls(self.n, self.max, now, &mut self.out);
        let products = self.take_products();
        self.record(products, 0, now, &Cause::LiveBound { max: self.max });
        if over {
            self.refresh_all(EndReason::Normal);
        }
    }

    /// Remembers an agent's presence frame (`QueueMemberPause`,
    /// `QueueMemberStatus`…): the evidence when a call finds nobody available.
    fn note_presence(&mut self, f: &Frame, line: u64, time: Micros) {
        let Some(name) = f.event() else { return };
        let event = AmiEvent::parse(name);
        let is_presence = matches!(
            event,
            AmiEvent::QueueMemberPause
                | AmiEvent::QueueMemberStatus
                | AmiEvent::QueueMember
                | AmiEvent::QueueMemberPaused
        );
        if !is_presence {
            return;
        }
        let dir = self.n.directory();
        let Some(agent) = dir.agent_for_member(f.get("Interface"), f.get("StateInterface"), f.get("MemberName")) else {
            return;
        };
        let mut said: Vec<String> = Vec::new();
        for key in ["Queue", "Paused", "PausedReason", "Status"] {
            if let Some(v) = f.get(key).filter(|v| !v.is_empty()) {
                said.push(format!("{key}={v}"));
            }
        }
        let cited = format!("{name} at {} (line {line}): {}", rule::clock_time(time), said.join(", "));
        let id = agent.id.clone();
        match self.presence.iter_mut().find(|(a, _)| *a == id) {
            Some(entry) => entry.1 = cited,
            None => self.presence.push((id, cited)),
        }
    }

    fn apply(&mut self, item: TraceItem) -> Vec<Event> {
        self.clock.apply(item, self.n, &mut self.out);
        self.take_products()
    }

    fn take_products(&mut self) -> Vec<Event> {
        let mut products = Vec::new();
        self.state.emit(&mut self.out, &mut |e: &Event| products.push(e.clone()));
        products
    }

    /// The live calls the normalizer applies `f` to (before it does):
    /// the one of its `Linkedid` and the one a moving channel leaves, the
    /// transferee's, the click-to-call's; `None` for a frame it ignores
    /// (noise variables, events it does not read) or applies to no call
    /// (agent presence). Mirrors `Normalizer::handle`.
    fn dispatched(&self, f: &Frame) -> Option<Vec<CallId>> {
        let name = f.event()?;
        let live = |id: Option<&str>| id.filter(|i| self.n.last_activity(i).is_some()).map(CallId::new);
        match AmiEvent::parse(name) {
            AmiEvent::Other
            | AmiEvent::QueueMemberPause
            | AmiEvent::QueueMemberStatus
            | AmiEvent::QueueMember
            | AmiEvent::QueueMemberPaused => None,
            AmiEvent::VarSet if self.ignored.ignores(f) => None,
            AmiEvent::BlindTransfer | AmiEvent::AttendedTransfer => Some(
                live(
                    f.get(TRANSFEREE_LINKEDID)
                        .or_else(|| f.get(ORIG_TRANSFERER_LINKEDID))
                        .or_else(|| f.get(TRANSFERER_LINKEDID)),
                )
                .into_iter()
                .collect(),
            ),
            AmiEvent::OriginateResponse => {
                let uid = f.get(UNIQUEID);
                Some(uid.and_then(|u| self.n.call_of_channel(u).cloned()).or_else(|| live(uid)).into_iter().collect())
            }
            _ => {
                let moved_from = f.get(UNIQUEID).and_then(|u| self.n.call_of_channel(u)).cloned();
                let linked = live(f.get(LINKEDID).or_else(|| f.get(DEST_LINKEDID)));
                let mut v: Vec<CallId> = moved_from.into_iter().chain(linked).collect();
                v.dedup();
                Some(v)
            }
        }
    }

    fn record_frame(&mut self, f: &Frame, line: u64, time: Micros, before: Option<Vec<CallId>>, products: Vec<Event>) {
        let Some(mut touched) = before else { return };
        // A call this very frame started.
        if let Some(l) = f.get(LINKEDID).or_else(|| f.get(DEST_LINKEDID)) {
            if self.n.last_activity(l).is_some() && !touched.iter().any(|t| t.as_str() == l) {
                touched.push(CallId::new(l));
            }
        }
        for e in &products {
            if let Some(c) = &e.call {
                if !touched.contains(&c.id) {
                    touched.push(c.id.clone());
                }
            }
        }
        if touched.is_empty() {
            return;
        }
        let cause = frame_cause(f);
        for id in &touched {
            let mine: Vec<Event> =
                products.iter().filter(|e| e.call.as_ref().is_some_and(|c| &c.id == id)).cloned().collect();
            self.push_rung(id, line, time, cause.clone(), mine);
        }
        for id in touched {
            self.refresh(&id, EndReason::Normal);
        }
    }

    /// Products of a resync or of the bound: one rung per call they name.
    fn record(&mut self, products: Vec<Event>, line: u64, time: Micros, cause: &Cause) {
        let mut ids: Vec<CallId> = Vec::new();
        for e in &products {
            if let Some(c) = &e.call {
                if !ids.contains(&c.id) {
                    ids.push(c.id.clone());
                }
            }
        }
        for id in ids {
            let mine: Vec<Event> =
                products.iter().filter(|e| e.call.as_ref().is_some_and(|c| c.id == id)).cloned().collect();
            self.push_rung(&id, line, time, cause.clone(), mine);
        }
    }

    fn push_rung(&mut self, id: &CallId, line: u64, time: Micros, cause: Cause, events: Vec<Event>) {
        let at = match self.index.get(id) {
            Some(i) => *i,
            None => {
                self.ladders.push(CallLadder { id: id.clone(), snapshot: None, rungs: Vec::new(), lanes: Vec::new() });
                self.index.insert(id.clone(), self.ladders.len() - 1);
                self.ladders.len() - 1
            }
        };
        let verdict = self.verdicts.get(id).copied();
        let Some(ladder) = self.ladders.get_mut(at) else { return };
        let mut products = Vec::with_capacity(events.len());
        for event in events {
            // The verdict read before must be the one the normalizer gave.
            let missed = match &event.kind {
                EventKind::Missed { reason, .. } => Some(*reason),
                _ => None,
            };
            if let Some(s) = &event.call {
                ladder.snapshot = Some(CallSnapshot::clone(s));
            }
            if matches!(event.kind, EventKind::Ended { .. }) {
                self.verdicts.remove(id);
                self.presence_at_arrival.remove(id);
            }
            let miss_rule = missed.and_then(|reason| {
                verdict.or_else(|| rule::implied_miss_rule(&cause)).filter(|r| r.reason() == reason)
            });
            let arrival = (miss_rule == Some(MissRule::NobodyAvailable)).then(|| self.presence_at_arrival.remove(id));
            let presence = match arrival.flatten() {
                Some(then) => {
                    let group = event.call.as_ref().and_then(|c| c.group.as_ref());
                    let agents = group.and_then(|g| self.n.directory().group(g.as_str())).map(|g| g.agents.clone());
                    then.into_iter()
                        .filter(|(a, _)| agents.as_ref().is_none_or(|list| list.contains(a)))
                        .map(|(a, cited)| format!("{a}: {cited}"))
                        .collect()
                }
                _ => Vec::new(),
            };
            products.push(Product { event, lane: String::new(), rule: String::new(), miss_rule, presence });
        }
        ladder.rungs.push(Rung { line, time, cause, lane: String::new(), products });
    }

    fn refresh(&mut self, id: &CallId, end: EndReason) {
        match self.n.miss_rule(id.as_str(), end) {
            Some(r) => {
                let before = self.verdicts.insert(id.clone(), r);
                if r == MissRule::NobodyAvailable && before != Some(r) {
                    self.presence_at_arrival.insert(id.clone(), self.presence.clone());
                }
            }
            None => {
                self.verdicts.remove(id);
            }
        }
    }

    /// Before what may end any call as `lost` (a resync, the bound).
    fn refresh_all(&mut self, end: EndReason) {
        for id in self.n.live_call_ids() {
            self.refresh(&id, end);
        }
    }

    fn finish(self) -> Explanation {
        let dir = self.n.directory().clone();
        let mut calls = self.ladders;
        for ladder in &mut calls {
            rule::decide(ladder, &dir);
        }
        Explanation { trace: PathBuf::new(), calls, malformed: self.malformed, frames: self.frames }
    }
}

/// The headers worth showing for each AMI event (those the normalizer reads).
fn key_headers(event: &str) -> &'static [&'static str] {
    match event {
        "Newchannel" => &["ChannelStateDesc", "CallerIDNum", "Exten"],
        "Newstate" => &["ChannelStateDesc"],
        "Newexten" => &["Application", "AppData"],
        "Rename" => &["Newname"],
        "VarSet" => &["Variable", "Value"],
        "QueueCallerJoin" => &["Queue", "Position", "Count"],
        "QueueCallerLeave" => &["Queue", "Count"],
        "QueueCallerAbandon" => &["Queue", "Position", "HoldTime"],
        "AgentCalled" | "AgentRingNoAnswer" | "AgentConnect" | "AgentDump" => {
            &["Queue", "MemberName", "Interface", "DestChannel", "RingTime", "HoldTime"]
        }
        "DialBegin" => &["DestChannel", "DialString"],
        "DialEnd" => &["DestChannel", "DialStatus"],
        "BridgeEnter" => &["BridgeUniqueid"],
        "HangupRequest" | "SoftHangupRequest" => &["Cause"],
        "Hangup" => &["Cause", "Cause-txt"],
        "BlindTransfer" => &["Result", "TransfererChannel", "Extension"],
        "AttendedTransfer" => &["Result", "OrigTransfererChannel", "TransferTargetChannel"],
        "OriginateResponse" => &["Response", "Reason"],
        _ => &[],
    }
}

fn frame_cause(f: &Frame) -> Cause {
    let event = f.event().unwrap_or("").to_string();
    let channel = f.get("Channel").or_else(|| f.get("DestChannel")).unwrap_or("").to_string();
    let details = key_headers(&event)
        .iter()
        .filter_map(|k| f.get(k).filter(|v| !v.is_empty()).map(|v| (k.to_string(), v.to_string())))
        .collect();
    Cause::Frame { event, channel, details }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_line_they_start_on() {
        let data = b"Asterisk Call Manager/9.0.0\r\nResponse: Success\r\n\r\n\r\nEvent: A\r\nX: 1\r\n\r\nEvent: B\n\n";
        let mut got = Vec::new();
        decode_with_lines(&mut AmiCodec::default(), data, |m, line| {
            let what = match m {
                AmiMessage::Banner(_) => "banner".to_string(),
                AmiMessage::Frame(f) => f.event().or(f.response()).unwrap_or("?").to_string(),
                AmiMessage::Malformed(_) => "malformed".to_string(),
            };
            got.push((what, line));
        });
        assert_eq!(got, [("banner".into(), 1), ("Success".into(), 2), ("A".into(), 5), ("B".into(), 8)]);
    }
}
