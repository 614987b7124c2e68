//! The normalizer: Asterisk's event soup in, the helpdesk's call lifecycle out.
//!
//! A pure, deterministic state machine. [`Normalizer::handle`] takes one AMI
//! frame and the clock (`now`, used only when a frame has no `Timestamp`) and
//! appends the lifecycle events it causes to a caller-provided `Vec`. It does
//! no I/O and reads no clock, so a trace replayed twice gives the same events,
//! byte for byte, as the live run that recorded it.
//!
//! # Model
//!
//! - A **call** is every channel sharing one `Linkedid` (SPEC §4). Channels are
//!   also indexed by `Uniqueid`: when Asterisk moves a channel to another
//!   Linkedid (bridging propagates the oldest Linkedid, e.g. after an attended
//!   transfer), the channel moves to that call, and a call whose last channel
//!   left or hung up ends.
//! - Each channel gets a **role**: the call's originating channel, an agent's
//!   phone (`SIP/2000-…`), a half of a Local channel (`Local/2000@agents-…;1`,
//!   attributed to the agent but never counted as a separate offer), or an
//!   external leg (the customer, outbound).
//! - **Offers** are per agent, not per channel: `AgentCalled`, then the
//!   `DialBegin`s of both Local halves, open one offer for that agent.
//! - **Presence**: per agent, paused or not in each group's queue, device
//!   usable or not, switched on or off in the helpdesk ([`AgentPresence`]).
//!   A call remembers whether anybody of its group was available when it
//!   arrived: if not, an unanswered end is `no_agents` (SPEC §4 precedence:
//!   `holiday` > `outside_hours` > `no_agents` > `abandoned`/`queue_timeout`).
//! - **Missed or answered** is decided when the call ends, not when the queue
//!   says so: `QueueCallerAbandon` is also sent when the queue times out (the
//!   `QUEUESTATUS=TIMEOUT` that tells them apart comes after it), and a call
//!   that times out of one queue may still be answered in another.
//!
//! Architecture invariant: every call that produced `call.started` produces
//! exactly one `call.ended`; per call, `seq` is 1, 2, 3… without gaps; a call
//! never answered gets exactly one `call.missed` right before `call.ended`.
//!
//! Memory: per live call, a snapshot and a handful of channel records; all of
//! it is dropped when the call ends. Ended call ids are remembered in a
//! bounded ring only, so late events of an ended call do not resurrect it.

mod call;
mod presence;

use crate::ami::Frame;
use crate::directory::Directory;
use crate::event::{
    seconds_between, AvailabilitySource, CallId, CallState, EndReason, Event, EventKind, Micros, MissedReason,
};
use crate::ids::{AgentId, GroupId};
use call::Call;
pub use call::ChannelRole;

pub use presence::{device_state_unavailable, AgentPresence, PresenceMap};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Business rules the normalizer consults when a call ends unanswered
/// (hours and holidays, SPEC §2). Pure functions of the configuration;
/// `routing::Routing` is the real one.
pub trait Rules: Send + Sync {
    /// `Some(Holiday | OutsideHours)` when `group` was closed at `at`.
    fn closed_reason(&self, group: &GroupId, at: Micros) -> Option<MissedReason>;
}

/// Channel variable the FastAGI router sets to the group a call was routed
/// to (or missed for). The normalizer reads it from `VarSet` so that a call
/// the dialplan never queues still reaches the helpdesk with its group.
pub const ROUTE_GROUP_VARIABLE: &str = "CALLBRIDGE_GROUP";
/// Channel variable the FastAGI router sets to the missed-call reason
/// (`holiday`, `outside_hours`, `no_agents`) when it routes a call to
/// "missed"; empty otherwise.
pub const ROUTE_REASON_VARIABLE: &str = "CALLBRIDGE_REASON";

/// No business hours: every group is always open.
#[derive(Debug, Default, Clone, Copy)]
pub struct AlwaysOpen;

impl Rules for AlwaysOpen {
    fn closed_reason(&self, _: &GroupId, _: Micros) -> Option<MissedReason> {
        None
    }
}

/// Settings of the normalizer that come from the configuration.
#[derive(Debug, Clone)]
pub struct Options {
    /// Channel variable carrying the ticket id.
    pub ticket_variable: String,
    /// Base URL the recording's file name is appended to.
    pub recording_url_base: Option<String>,
    /// Dial prefix stripped from dialled numbers (outbound).
    pub outbound_prefix: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ticket_variable: "CALLBRIDGE_TICKET".into(),
            recording_url_base: None,
            outbound_prefix: String::new(),
        }
    }
}

/// How many ended call ids (and hung-up channel ids) are remembered so that
/// late events for them are ignored instead of starting a ghost call.
const ENDED_MEMORY: usize = 16_384;

/// The state machine. One per PBX.
pub struct Normalizer {
    dir: Arc<Directory>,
    rules: Arc<dyn Rules>,
    opts: Options,
    calls: HashMap<CallId, Call, ahash::RandomState>,
    /// Uniqueid → call, for channels whose Linkedid changes.
    channel_call: HashMap<Box<str>, CallId, ahash::RandomState>,
    ended: BoundedSet,
    gone_channels: BoundedSet,
    /// What the PBX and the helpdesk say about each agent.
    presence: PresenceMap,
    /// Last availability reported per agent (`agent.availability`).
    available: HashMap<AgentId, bool>,
    /// Bumped when a (re)connection starts; calls touched since then are
    /// newer than the resync listing and are left alone by [`Normalizer::resync`].
    epoch: u64,
    /// Agents whose presence changed since the last
    /// [`Normalizer::take_presence_changes`] (bounded by the agents).
    presence_changed: BTreeSet<AgentId>,
    /// Click-to-calls sent to the PBX whose `OriginateResponse` has not
    /// come yet, by call id (the `ChannelId`); oldest dropped beyond
    /// [`EXPECTED_ORIGINATES`].
    originates: HashMap<CallId, ExpectedOriginate>,
    originate_order: VecDeque<CallId>,
}

/// How many click-to-calls may wait for their `OriginateResponse` at once
/// (far more than agents; a PBX that never answers cannot grow the map).
const EXPECTED_ORIGINATES: usize = 1024;

/// A click-to-call callbridge asked the PBX for. If the PBX cannot even
/// create the agent's channel (phone unreachable), no channel event ever
/// names the call: only the failed `OriginateResponse` does, and this is
/// what the call then looks like.
#[derive(Debug, Clone)]
pub struct ExpectedOriginate {
    /// The `ChannelId` given to `Originate`: the call id.
    pub call_id: String,
    pub agent: AgentId,
    /// The device `Originate` rings (`SIP/2000`).
    pub device: String,
    /// The customer's number as the helpdesk should see it.
    pub number: String,
    pub ticket: Option<String>,
    /// When it was requested.
    pub at: Micros,
}

/// Per-state limits of the stuck-call sweeper (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StuckLimits {
    /// Not yet queued nor ringing (IVR, dialling).
    pub started_seconds: u64,
    pub queued_seconds: u64,
    pub ringing_seconds: u64,
    pub talking_seconds: u64,
    /// No event at all for this long.
    pub silence_seconds: u64,
}

impl StuckLimits {
    pub fn for_state(&self, s: CallState) -> u64 {
        match s {
            CallState::Started => self.started_seconds,
            CallState::Queued => self.queued_seconds,
            CallState::Ringing => self.ringing_seconds,
            CallState::Talking => self.talking_seconds,
            CallState::Ended => u64::MAX,
        }
    }
}

/// Why a call is suspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StuckCause {
    /// Longer in its state than the state's limit.
    State,
    /// No event for longer than the silence limit.
    Silence,
}

impl StuckCause {
    pub fn as_str(self) -> &'static str {
        match self {
            StuckCause::State => "state_limit",
            StuckCause::Silence => "silence",
        }
    }
}

/// A call the sweeper should check with the PBX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspect {
    pub call: CallId,
    pub state: CallState,
    pub seconds_in_state: u64,
    pub silent_seconds: u64,
    pub cause: StuckCause,
    pub already_reported: bool,
}

/// What a PBX resync says exists (from `CoreShowChannels`).
#[derive(Debug, Clone, Default)]
pub struct PbxChannels {
    pub channels: Vec<Frame>,
}

impl Normalizer {
    pub fn new(dir: Arc<Directory>, rules: Arc<dyn Rules>, opts: Options) -> Normalizer {
        Normalizer {
            dir,
            rules,
            opts,
            // ahash: SipHash showed up in profiles; keys are randomly
            // seeded all the same, so crafted ids cannot degrade the maps.
            calls: HashMap::default(),
            channel_call: HashMap::default(),
            ended: BoundedSet::new(ENDED_MEMORY),
            gone_channels: BoundedSet::new(ENDED_MEMORY * 4),
            presence: PresenceMap::default(),
            available: HashMap::new(),
            epoch: 0,
            presence_changed: BTreeSet::new(),
            originates: HashMap::new(),
            originate_order: VecDeque::new(),
        }
    }

    /// Notes a click-to-call about to be sent (before the `Originate`
    /// action goes out, so that its response always finds it).
    pub fn expect_originate(&mut self, o: ExpectedOriginate) {
        let id = CallId::new(&o.call_id);
        if self.originate_order.len() >= EXPECTED_ORIGINATES {
            if let Some(old) = self.originate_order.pop_front() {
                self.originates.remove(&old);
            }
        }
        self.originate_order.push_back(id.clone());
        self.originates.insert(id, o);
    }

    /// The agent talking in a live call and their channel's name (the
    /// transferer's channel of a blind transfer).
    pub fn talking_agent_channel(&self, call: &str) -> Option<(AgentId, String)> {
        self.calls.get(call)?.talking_agent_channel()
    }

    /// Replaces the directory, rules and options (configuration reload).
    /// Live calls keep the attribution they already have.
    pub fn reconfigure(&mut self, dir: Arc<Directory>, rules: Arc<dyn Rules>, opts: Options) {
        self.dir = dir;
        self.rules = rules;
        self.opts = opts;
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.dir
    }

    /// Number of live calls.
    pub fn live_calls(&self) -> usize {
        self.calls.len()
    }

    /// Ids of the live calls (for the stuck-call sweeper and resync).
    pub fn live_call_ids(&self) -> Vec<CallId> {
        self.calls.keys().cloned().collect()
    }

    /// Time of the last event seen for a live call.
    pub fn last_activity(&self, id: &str) -> Option<Micros> {
        self.calls.get(id).map(|c| c.last_event_at)
    }

    /// Handles one AMI frame; appends the resulting events to `out`.
    pub fn handle(&mut self, frame: &Frame, now: Micros, out: &mut Vec<Event>) {
        let Some(event) = frame.event() else { return };
        // The cheap filters first: most traffic is VarSet and RTCP noise.
        match event {
            "VarSet" => {
                let Some(var) = frame.get("Variable") else {
                    return;
                };
                if !(var == "QUEUESTATUS"
                    || var == "DIALSTATUS"
                    || var == "MIXMONITOR_FILENAME"
                    || var == ROUTE_GROUP_VARIABLE
                    || var == ROUTE_REASON_VARIABLE
                    || var == self.opts.ticket_variable)
                {
                    return;
                }
            }
            "Newchannel" | "Newstate" | "Newexten" | "QueueCallerJoin" | "QueueCallerLeave" | "QueueCallerAbandon"
            | "AgentCalled" | "AgentRingNoAnswer" | "AgentConnect" | "AgentDump" | "DialBegin" | "DialEnd"
            | "BridgeEnter" | "HangupRequest" | "SoftHangupRequest" | "Hangup" | "Rename" => {}
            "BlindTransfer" | "AttendedTransfer" => return self.on_transfer(event, frame, now, out),
            "QueueMemberPause" | "QueueMemberStatus" | "QueueMember" | "QueueMemberPaused" => {
                return self.on_member(frame, now, out)
            }
            "OriginateResponse" => return self.on_originate_response(frame, now, out),
            _ => return,
        }
        let time = frame.timestamp_micros().unwrap_or(now);
        let Some(linkedid) = frame.get("Linkedid").or_else(|| frame.get("DestLinkedid")) else {
            return;
        };
        if linkedid.is_empty() {
            return;
        }
        let uniqueid = frame.get("Uniqueid").filter(|u| !u.is_empty());

        // Channel moved to another call (Linkedid propagation on bridging)?
        if let Some(uid) = uniqueid {
            if let Some(owner) = self.channel_call.get(uid) {
                if owner.as_str() != linkedid {
                    let owner = owner.clone();
                    self.migrate_channel(uid, &owner, linkedid, time, out);
                }
            }
        }

        if !self.calls.contains_key(linkedid) {
            if self.ended.contains(linkedid) || uniqueid.is_some_and(|u| self.gone_channels.contains(u)) {
                return;
            }
            if !starts_or_continues_call(event) {
                return;
            }
            let channel = frame.get("Channel").or_else(|| frame.get("DestChannel")).unwrap_or("");
            let uid = uniqueid.or_else(|| frame.get("DestUniqueid")).unwrap_or(linkedid);
            let call = Call::start(CallId::new(linkedid), frame, channel, uid, time, &self.dir, &self.opts, out);
            self.channel_call.insert(uid.into(), call.id.clone());
            self.calls.insert(call.id.clone(), call);
        }

        let Some(call) = self.calls.get_mut(linkedid) else {
            return;
        };
        call.last_event_at = time;
        call.epoch = self.epoch;
        let mut new_channels: Vec<Box<str>> = Vec::new();
        let ctx =
            call::Ctx { dir: &self.dir, opts: &self.opts, presence: &self.presence, new_channels: &mut new_channels };
        let finished = call.handle(event, frame, time, ctx, out);
        call.track_state(time);
        for uid in new_channels {
            self.channel_call.insert(uid, call.id.clone());
        }
        if let Some(uid) = uniqueid {
            if event == "Hangup" {
                self.channel_call.remove(uid);
                self.gone_channels.insert(uid);
            }
        }
        if finished {
            self.finish(linkedid, time, EndReason::Normal, out);
        }
    }

    fn migrate_channel(&mut self, uid: &str, from: &CallId, to: &str, time: Micros, out: &mut Vec<Event>) {
        let Some(old) = self.calls.get_mut(from.as_str()) else {
            return;
        };
        let Some(ch) = old.take_channel(uid) else {
            return;
        };
        let old_empty = old.live_channel_count() == 0;
        if let Some(new) = self.calls.get_mut(to) {
            new.adopt_channel(ch);
            self.channel_call.insert(uid.into(), new.id.clone());
        } else {
            // The target call is not known (yet): let the next handle() create
            // it from this very event.
            self.channel_call.remove(uid);
        }
        if old_empty {
            self.finish(from.as_str(), time, EndReason::Normal, out);
        }
    }

    /// Ends a call: closes offers, decides missed, emits `call.ended`.
    fn finish(&mut self, id: &str, time: Micros, reason: EndReason, out: &mut Vec<Event>) {
        let Some(mut call) = self.calls.remove(id) else {
            return;
        };
        let closed = call.closed_reason(self.rules.as_ref());
        call.finish(time, reason, closed, out);
        for uid in call.channel_ids() {
            self.channel_call.remove(uid);
            self.gone_channels.insert(uid);
        }
        self.ended.insert(id);
    }

    /// Ends a live call from outside the event stream: an administrator
    /// removed it (`EndReason::Removed`) or the PBX no longer has it
    /// (`EndReason::Lost`). Returns false if the call is not live.
    pub fn end_call(&mut self, id: &str, reason: EndReason, now: Micros, out: &mut Vec<Event>) -> bool {
        if !self.calls.contains_key(id) {
            return false;
        }
        self.finish(id, now, reason, out);
        true
    }

    /// Emits `call.stuck` for a live call (once per call).
    pub fn mark_stuck(&mut self, id: &str, detected_by: &str, now: Micros, out: &mut Vec<Event>) -> bool {
        match self.calls.get_mut(id) {
            Some(call) => call.mark_stuck(detected_by, now, out),
            None => false,
        }
    }

    /// Live calls that overstayed a state limit or went silent: the
    /// sweeper checks each with the PBX, then calls [`Normalizer::mark_stuck`]
    /// (still there) or [`Normalizer::end_call`] with `Lost` (gone).
    /// Sorted by call id, so the result is deterministic.
    pub fn suspects(&self, now: Micros, limits: &StuckLimits) -> Vec<Suspect> {
        let mut v: Vec<Suspect> = self
            .calls
            .values()
            .filter_map(|c| {
                let state = c.state();
                let in_state = seconds_between(c.state_since, now);
                let silent = seconds_between(c.last_event_at, now);
                let limit = limits.for_state(state);
                let by = if in_state >= limit {
                    Some(StuckCause::State)
                } else if silent >= limits.silence_seconds {
                    Some(StuckCause::Silence)
                } else {
                    None
                };
                by.map(|cause| Suspect {
                    call: c.id.clone(),
                    state,
                    seconds_in_state: in_state,
                    silent_seconds: silent,
                    cause,
                    already_reported: c.stuck_reported(),
                })
            })
            .collect();
        v.sort_by(|a, b| a.call.cmp(&b.call));
        v
    }

    /// A (re)connection to the PBX starts: the resync listing that follows
    /// describes the PBX as of now, so calls with events after this point
    /// are newer than the listing.
    pub fn begin_resync(&mut self) {
        self.epoch += 1;
    }

    /// Reconciles with what the PBX reports after a (re)connection: live
    /// calls none of whose channels exist any more end as `lost`; channels
    /// of unknown calls are adopted (the call starts now, with what the
    /// listing tells). Calls with events since [`Normalizer::begin_resync`]
    /// are newer than the listing and are left alone.
    pub fn resync(&mut self, pbx: &PbxChannels, now: Micros, out: &mut Vec<Event>) {
        let alive: HashSet<&str> = pbx.channels.iter().filter_map(|f| f.get("Uniqueid")).collect();
        let mut vanished: Vec<CallId> = Vec::new();
        let epoch = self.epoch;
        for (id, call) in self.calls.iter_mut() {
            if call.epoch == epoch && epoch > 0 {
                continue;
            }
            call.forget_channels_not_in(&alive);
            if call.live_channel_count() == 0 {
                vanished.push(id.clone());
            }
        }
        vanished.sort();
        for id in vanished {
            self.finish(id.as_str(), now, EndReason::Lost, out);
        }
        // Adopt, originating channels first so that each call starts from
        // its first channel when the listing has it.
        let mut items: Vec<&Frame> = pbx.channels.iter().collect();
        items.sort_by_key(|f| f.get("Uniqueid") != f.get("Linkedid"));
        for f in items {
            let (Some(uid), Some(linkedid)) = (f.get("Uniqueid"), f.get("Linkedid")) else {
                continue;
            };
            if self.channel_call.contains_key(uid) || self.gone_channels.contains(uid) || self.ended.contains(linkedid)
            {
                continue;
            }
            let channel = f.get("Channel").unwrap_or("");
            let started = f.get("Duration").and_then(parse_duration).map_or(now, |secs| now - secs * 1_000_000);
            let call = match self.calls.get_mut(linkedid) {
                Some(call) => call,
                None => {
                    let call = Call::start(CallId::new(linkedid), f, channel, uid, started, &self.dir, &self.opts, out);
                    self.calls.entry(call.id.clone()).or_insert(call)
                }
            };
            call.adopt_listed_channel(f, channel, uid, now, &self.dir, out);
            let id = call.id.clone();
            self.channel_call.insert(uid.into(), id);
        }
    }

    fn on_transfer(&mut self, event: &str, frame: &Frame, now: Micros, out: &mut Vec<Event>) {
        if frame.get("Result").is_some_and(|r| r != "Success") {
            return;
        }
        let time = frame.timestamp_micros().unwrap_or(now);
        let linkedid = frame
            .get("TransfereeLinkedid")
            .or_else(|| frame.get("OrigTransfererLinkedid"))
            .or_else(|| frame.get("TransfererLinkedid"));
        let Some(call) = linkedid.and_then(|l| self.calls.get_mut(l)) else {
            return;
        };
        call.last_event_at = time;
        call.epoch = self.epoch;
        call.on_transfer(event, frame, time, &self.dir, out);
    }

    /// `OriginateResponse`: success changes nothing (the channels' events
    /// tell the story). A failure marks the call `failed`; a failed
    /// click-to-call whose channel never existed becomes a whole call
    /// here — `call.started`, `call.missed` (`failed`), `call.ended` — so
    /// that the helpdesk never waits for a call that will not come.
    fn on_originate_response(&mut self, frame: &Frame, now: Micros, out: &mut Vec<Event>) {
        let uid = frame.get("Uniqueid").filter(|u| !u.is_empty() && *u != "<null>");
        let expected = uid.and_then(|u| self.originates.remove(u));
        if let Some(u) = uid.filter(|_| expected.is_some()) {
            self.originate_order.retain(|c| c.as_str() != u);
        }
        if frame.get("Response") == Some("Success") {
            return;
        }
        let Some(uid) = uid else { return };
        let time = frame.timestamp_micros().unwrap_or(now);
        let live =
            self.channel_call.get(uid).cloned().or_else(|| self.calls.contains_key(uid).then(|| CallId::new(uid)));
        if let Some(call) = live {
            if let Some(c) = self.calls.get_mut(call.as_str()) {
                c.originate_failed();
            }
            return;
        }
        let Some(exp) = expected else { return };
        if self.ended.contains(uid) || self.gone_channels.contains(uid) {
            return;
        }
        let started = exp.at.min(time);
        let synthetic = Frame::from_pairs(&[
            ("Channel", exp.device.as_str()),
            ("Exten", "s"),
            ("Uniqueid", uid),
            ("Linkedid", uid),
        ]);
        let mut call = Call::start(CallId::new(uid), &synthetic, &exp.device, uid, started, &self.dir, &self.opts, out);
        let agent = self.dir.agent(exp.agent.as_str());
        call.prepare_failed_originate(agent, exp.ticket, Some(exp.number));
        self.calls.insert(call.id.clone(), call);
        self.finish(uid, time, EndReason::Normal, out);
    }

    /// `QueueMemberPause`, `QueueMemberStatus`, `QueueMember` (and the older
    /// `QueueMemberPaused`): pause state per queue and device state.
    fn on_member(&mut self, frame: &Frame, now: Micros, out: &mut Vec<Event>) {
        let paused = frame.get("Paused").map(|p| p == "1" || p.eq_ignore_ascii_case("true"));
        let device_unavailable =
            frame.get("Status").and_then(|s| s.trim().parse::<u8>().ok()).map(device_state_unavailable);
        if paused.is_none() && device_unavailable.is_none() {
            return;
        }
        let Some(queue) = frame.get("Queue") else {
            return;
        };
        let Some(agent) = self.member_agent(frame) else {
            return;
        };
        // Pauses in queues no group uses do not make anyone unavailable for
        // the helpdesk (and keep the map bounded by the configuration).
        let paused = paused.filter(|_| self.dir.group_for_queue(queue).is_some());
        let time = frame.timestamp_micros().unwrap_or(now);
        let pause_reason = frame.get("PausedReason").or_else(|| frame.get("Reason")).filter(|r| !r.is_empty());
        self.change_presence(
            &agent,
            time,
            AvailabilitySource::Pbx,
            |p| {
                let mut changed = false;
                if let Some(paused) = paused {
                    match p.paused.get_mut(queue) {
                        Some(was) if *was == paused => {}
                        Some(was) => {
                            *was = paused;
                            changed = true;
                        }
                        None => {
                            p.paused.insert(queue.to_string(), paused);
                            changed = true;
                        }
                    }
                }
                if let Some(unavailable) = device_unavailable.filter(|u| *u != p.device_unavailable) {
                    p.device_unavailable = unavailable;
                    changed = true;
                }
                changed
            },
            |device_was_unavailable, after| {
                if !after.available() && after.device_unavailable && !device_was_unavailable {
                    Some(DEVICE_UNAVAILABLE.to_string())
                } else {
                    pause_reason.map(str::to_string)
                }
            },
            out,
        );
    }

    fn member_agent(&self, frame: &Frame) -> Option<AgentId> {
        self.dir
            .agent_for_member(
                frame.get("Interface").or_else(|| frame.get("Location")),
                frame.get("StateInterface"),
                frame.get("MemberName").or_else(|| frame.get("Name")),
            )
            .map(|a| a.id.clone())
    }

    /// Applies `change` to an agent's presence (it returns whether anything
    /// changed: member events repeat the same state all day long, and this
    /// path must not allocate for them); notes a change for
    /// [`Normalizer::take_presence_changes`] and emits `agent.availability`
    /// when the agent's overall availability flips (`reason(device was
    /// unavailable before, presence after)` says why).
    fn change_presence(
        &mut self,
        agent: &AgentId,
        time: Micros,
        source: AvailabilitySource,
        change: impl FnOnce(&mut AgentPresence) -> bool,
        reason: impl FnOnce(bool, &AgentPresence) -> Option<String>,
        out: &mut Vec<Event>,
    ) {
        let presence = self.presence.entry(agent);
        let device_was_unavailable = presence.device_unavailable;
        if !change(presence) {
            return;
        }
        let now_available = presence.available();
        let reason = reason(device_was_unavailable, presence);
        self.presence_changed.insert(agent.clone());
        let was_available = self.available.insert(agent.clone(), now_available).unwrap_or(true);
        if was_available != now_available {
            out.push(Event {
                seq: 0,
                time,
                kind: EventKind::AgentAvailability { agent: agent.clone(), available: now_available, reason, source },
                call: None,
            });
        }
    }

    /// The agent switched "available for calls" on or off in the helpdesk
    /// (the control plane calls this; it also pauses the agent on the PBX,
    /// whose confirming event then changes nothing more). Emits
    /// `agent.availability` with `source: api` when the agent's overall
    /// availability flips. Returns false for an unknown agent.
    pub fn set_helpdesk_available(&mut self, agent: &str, available: bool, now: Micros, out: &mut Vec<Event>) -> bool {
        self.apply_helpdesk_switch(agent, available, None, &[], now, out)
    }

    /// The control plane's availability switch: like
    /// [`Normalizer::set_helpdesk_available`], with the reason the agent
    /// gave, and with `queues` (the agent's groups' queues it is about to
    /// pause or unpause with `QueuePause`) taken as already done — so the
    /// change is reported once, as `source: api`, and the PBX's confirming
    /// `QueueMemberPause` changes nothing more.
    pub fn apply_helpdesk_switch(
        &mut self,
        agent: &str,
        available: bool,
        reason: Option<String>,
        queues: &[String],
        now: Micros,
        out: &mut Vec<Event>,
    ) -> bool {
        let Some(agent) = self.dir.agent(agent).map(|a| a.id.clone()) else {
            return false;
        };
        let dir = self.dir.clone();
        self.change_presence(
            &agent,
            now,
            AvailabilitySource::Api,
            |p| {
                let mut changed = p.helpdesk_off == available;
                p.helpdesk_off = !available;
                for q in queues.iter().filter(|q| dir.group_for_queue(q).is_some()) {
                    if p.paused.insert(q.clone(), !available) != Some(!available) {
                        changed = true;
                    }
                }
                changed
            },
            |_, _| reason,
            out,
        );
        true
    }

    /// Reconciles presence with a `QueueStatus` listing taken after a
    /// (re)connection (its `QueueMember` items; `QueueParams` and
    /// `QueueEntry` items are ignored). The listing replaces what the PBX
    /// said before: pauses and device states missed while disconnected are
    /// applied, an agent listed in no queue has no pause left. The helpdesk
    /// switch is kept. A listing without any member (the PBX refused
    /// `QueueStatus`) changes nothing.
    pub fn resync_members(&mut self, items: &[Frame], now: Micros, out: &mut Vec<Event>) {
        #[derive(Default)]
        struct Listed {
            paused: std::collections::BTreeMap<String, bool>,
            device_unavailable: bool,
            reason: Option<String>,
        }
        let mut listed: HashMap<AgentId, Listed> = HashMap::new();
        let mut any_member = false;
        for f in items.iter().filter(|f| f.event() == Some("QueueMember")) {
            any_member = true;
            let (Some(agent), Some(queue)) = (self.member_agent(f), f.get("Queue")) else {
                continue;
            };
            let entry = listed.entry(agent).or_default();
            if let Some(paused) = f.get("Paused").map(|p| p == "1" || p.eq_ignore_ascii_case("true")) {
                if self.dir.group_for_queue(queue).is_some() {
                    entry.paused.insert(queue.to_string(), paused);
                }
                if paused && entry.reason.is_none() {
                    entry.reason = f.get("PausedReason").filter(|r| !r.is_empty()).map(str::to_string);
                }
            }
            if f.get("Status").and_then(|s| s.trim().parse::<u8>().ok()).is_some_and(device_state_unavailable) {
                entry.device_unavailable = true;
            }
        }
        if !any_member {
            return;
        }
        // Every configured agent, in id order so that the events are
        // deterministic.
        let mut agents: Vec<AgentId> = self.dir.agents().map(|a| a.id.clone()).collect();
        agents.sort();
        for agent in agents {
            let fresh = listed.remove(&agent).unwrap_or_default();
            let reason = fresh.reason.clone();
            self.change_presence(
                &agent,
                now,
                AvailabilitySource::Pbx,
                |p| {
                    let changed = p.paused != fresh.paused || p.device_unavailable != fresh.device_unavailable;
                    p.paused = fresh.paused;
                    p.device_unavailable = fresh.device_unavailable;
                    changed
                },
                |device_was_unavailable, after| {
                    if !after.available() && after.device_unavailable && !device_was_unavailable {
                        Some(DEVICE_UNAVAILABLE.to_string())
                    } else if !after.available() {
                        reason
                    } else {
                        None
                    }
                },
                out,
            );
        }
    }

    /// Agents whose presence changed since the last call, with their
    /// presence now, in agent id order. The pipeline hands them to
    /// `routing::PresenceBoard::apply` after each batch of frames so that
    /// the FastAGI router sees what the normalizer sees.
    pub fn take_presence_changes(&mut self) -> Vec<(AgentId, AgentPresence)> {
        std::mem::take(&mut self.presence_changed)
            .into_iter()
            .map(|a| {
                let p = self.presence.get(a.as_str()).cloned().unwrap_or_default();
                (a, p)
            })
            .collect()
    }

    /// What the PBX and the helpdesk said about an agent so far.
    pub fn presence(&self) -> &PresenceMap {
        &self.presence
    }

    /// Whether an agent is available for calls as far as the PBX and the
    /// helpdesk told us (unknown counts as available).
    pub fn agent_available(&self, agent: &str) -> bool {
        self.presence.get(agent).is_none_or(AgentPresence::available)
    }

    /// Whether at least one agent of the group takes calls from its queue.
    pub fn group_has_available_agent(&self, group: &str) -> bool {
        self.dir.group(group).is_some_and(|g| self.presence.group_has_available_agent(g))
    }
}

/// `agent.availability` reason when the agent's device became unusable.
const DEVICE_UNAVAILABLE: &str = "device_unavailable";

/// Events that may introduce a call we do not know yet (a trace that starts
/// mid-call, a call already up when callbridge started). Events that only
/// end things never create a call.
fn starts_or_continues_call(event: &str) -> bool {
    !matches!(
        event,
        "Hangup" | "HangupRequest" | "SoftHangupRequest" | "DialEnd" | "QueueCallerLeave" | "QueueCallerAbandon"
    )
}

/// `CoreShowChannel`'s `Duration` is `HH:MM:SS` (or seconds).
fn parse_duration(s: &str) -> Option<i64> {
    let mut total: i64 = 0;
    for part in s.split(':') {
        total = total.checked_mul(60)?.checked_add(part.trim().parse::<i64>().ok()?)?;
    }
    Some(total)
}

/// A set that forgets its oldest members beyond a capacity.
struct BoundedSet {
    order: VecDeque<Box<str>>,
    set: HashSet<Box<str>, ahash::RandomState>,
    cap: usize,
}

impl BoundedSet {
    fn new(cap: usize) -> Self {
        BoundedSet { order: VecDeque::new(), set: HashSet::default(), cap }
    }
    fn insert(&mut self, s: &str) {
        if self.set.contains(s) {
            return;
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(s.into());
        self.set.insert(s.into());
    }
    fn contains(&self, s: &str) -> bool {
        self.set.contains(s)
    }
}

#[cfg(test)]
mod tests;
