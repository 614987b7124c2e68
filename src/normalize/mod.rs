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
//!   `blocked` > `holiday` > `outside_hours` > `no_agents` >
//!   `abandoned`/`queue_timeout`; `blocked`: the helpdesk refused the caller
//!   and callbridge hung up, see [`Normalizer::block_caller`]).
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
//!
//! # Layout
//!
//! - here: the [`Normalizer`], its dispatch table ([`Normalizer::handle`]:
//!   which AMI events matter and where each goes), call creation, channel
//!   migration, transfers and click-to-call results;
//! - [`input`]: the AMI event names, parsed once per frame;
//! - [`headers`]: the AMI header names read;
//! - `call.rs`: one call's state machine;
//! - `miss_rule.rs`: which evidence decided a missed call's reason (read
//!   by `callbridge explain` through [`Normalizer::miss_rule`]);
//! - `presence.rs`: agent presence and `agent.availability`;
//! - `resync.rs`: reconciling with the PBX (resync after a reconnection,
//!   the stuck-call sweeper's suspects).

mod call;
pub mod headers;
pub mod input;
mod miss_rule;
mod persist;
mod presence;
mod resync;

use crate::ami::Frame;
use crate::directory::Directory;
use crate::event::{CallId, EndReason, Event, Micros, MissedReason};
use crate::ids::{AgentId, GroupId};
pub use call::ChannelRole;
use call::{Call, CallHandler, FirstChannel};
use headers::{
    CHANNEL, DEST_CHANNEL, DEST_LINKEDID, DEST_UNIQUEID, EXTEN, LINKEDID, ORIG_TRANSFERER_LINKEDID, REASON, RESPONSE,
    RESULT, TRANSFEREE_LINKEDID, TRANSFERER_LINKEDID, UNIQUEID, VARIABLE,
};
use input::AmiEvent;

pub use miss_rule::MissRule;
pub use persist::{CallCheckpoint, Restored, RestoredCall, CHECKPOINT_FORMAT};
pub use presence::{device_state_unavailable, AgentPresence, PresenceMap};
pub use resync::{PbxChannels, StuckCause, StuckLimits, Suspect};
use smol_str::SmolStr;
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
/// Channel variable the FastAGI router sets to why it moved the call away
/// from the group asked for (`overflow`, `caller_unknown`,
/// `caller_inactive`); empty otherwise. Set before
/// [`ROUTING_FROM_VARIABLE`].
pub const ROUTING_REASON_VARIABLE: &str = "CALLBRIDGE_ROUTING_REASON";
/// Channel variable: the group whose rule moved the call (with
/// [`ROUTING_REASON_VARIABLE`]).
pub const ROUTING_FROM_VARIABLE: &str = "CALLBRIDGE_ROUTING_FROM";
/// Channel variable: `true`/`false` when the router looked the caller's
/// number up and the helpdesk answered; empty otherwise. Set before
/// [`CALLER_ACTIVE_VARIABLE`] and [`CONTACT_ID_VARIABLE`].
pub const CALLER_FOUND_VARIABLE: &str = "CALLBRIDGE_CALLER_FOUND";
/// Channel variable: `true`/`false`, whether the caller's contact is active.
pub const CALLER_ACTIVE_VARIABLE: &str = "CALLBRIDGE_CALLER_ACTIVE";
/// Channel variable: the helpdesk's id of the caller's contact.
pub const CONTACT_ID_VARIABLE: &str = "CALLBRIDGE_CONTACT_ID";

/// No business hours: every group is always open.
#[derive(Debug, Default, Clone, Copy)]
pub struct AlwaysOpen;

impl Rules for AlwaysOpen {
    fn closed_reason(&self, _: &GroupId, _: Micros) -> Option<MissedReason> {
        None
    }
}

/// What the normalizer needs to know about the site: the ticket variable,
/// where recordings are served, the outbound dial prefix.
#[derive(Debug, Clone)]
pub struct SiteOptions {
    /// Channel variable carrying the ticket id.
    pub ticket_variable: String,
    /// Base URL the recording's file name is appended to.
    pub recording_url_base: Option<String>,
    /// Dial prefix stripped from dialled numbers (outbound).
    pub outbound_prefix: String,
}

impl Default for SiteOptions {
    fn default() -> Self {
        SiteOptions {
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
    opts: SiteOptions,
    /// Boxed: the table keeps spare buckets (up to half of them after it
    /// grows), and a spare bucket costs the size of what it holds.
    calls: HashMap<CallId, Box<Call>, ahash::RandomState>,
    /// Uniqueid → call, for channels whose Linkedid changes. Keys are
    /// inline (see `call::Channel`): no allocation per live channel.
    channel_call: HashMap<SmolStr, CallId, ahash::RandomState>,
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
    /// Live calls changed since the last checkpoint (`None`: not tracked).
    changed: Option<HashSet<CallId, ahash::RandomState>>,
    /// Last `seq` of calls a previous run left whose state could not be
    /// restored: a call adopted under such an id goes on from there.
    seq_floors: HashMap<CallId, u64>,
    /// The AMI reader's filter, kept in step with the ticket variable.
    ignored: Option<IgnoredFrames>,
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

impl Normalizer {
    pub fn new(dir: Arc<Directory>, rules: Arc<dyn Rules>, opts: SiteOptions) -> Normalizer {
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
            changed: None,
            seq_floors: HashMap::new(),
            ignored: None,
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

    /// The helpdesk refused the caller of `call` (Zammad's `reject`): if
    /// the call is inbound and not answered, it is marked so that it ends
    /// `missed` with reason `blocked`, and the caller's channel is returned
    /// for the hangup. `None`: nothing marked (answered, outbound, ended).
    /// Marked before the hangup is sent, so the PBX's hangup events find it.
    pub fn block_caller(&mut self, call: &str) -> Option<String> {
        self.calls.get_mut(call)?.block_caller()
    }

    /// Takes back [`Normalizer::block_caller`]: the PBX did not hang up.
    pub fn unblock_caller(&mut self, call: &str) {
        if let Some(c) = self.calls.get_mut(call) {
            c.unblock_caller();
        }
    }

    /// Replaces the directory, rules and options (configuration reload).
    /// Live calls keep the attribution they already have.
    pub fn reconfigure(&mut self, dir: Arc<Directory>, rules: Arc<dyn Rules>, opts: SiteOptions) {
        self.dir = dir;
        self.rules = rules;
        self.opts = opts;
        if let Some(f) = &self.ignored {
            f.set_ticket_variable(&self.opts.ticket_variable);
        }
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

    /// The `n` live calls silent the longest: oldest last event first, ties
    /// by id (deterministic). What a bound on live calls ends first
    /// (`replay --max-live-calls`). O(live calls).
    pub fn oldest_live_calls(&self, n: usize) -> Vec<CallId> {
        let mut all: Vec<(Micros, &CallId)> = self.calls.values().map(|c| (c.last_event_at, &c.id)).collect();
        let n = n.min(all.len());
        if n == 0 {
            return Vec::new();
        }
        all.select_nth_unstable(n - 1);
        all.truncate(n);
        all.sort_unstable();
        all.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// Time of the last event seen for a live call.
    pub fn last_activity(&self, id: &str) -> Option<Micros> {
        self.calls.get(id).map(|c| c.last_event_at)
    }

    /// The live call a channel (`Uniqueid`) belongs to (read-only; for
    /// `callbridge explain`, which attributes frames to calls).
    pub fn call_of_channel(&self, uniqueid: &str) -> Option<&CallId> {
        self.channel_call.get(uniqueid)
    }

    /// The rule that would decide the live call `id`'s missed reason if
    /// it ended unanswered now, with `end`; `None` when it is not live or
    /// was answered. Computed on demand from the evidence the call keeps
    /// anyway: the normalizer records nothing for it.
    pub fn miss_rule(&self, id: &str, end: EndReason) -> Option<MissRule> {
        let call = self.calls.get(id)?;
        call.unanswered().then(|| call.miss_rule(call.closed_reason(self.rules.as_ref()), end))
    }

    /// Handles one AMI frame; appends the resulting events to `out`.
    ///
    /// The dispatch table: every AMI event the normalizer reacts to, and
    /// where it goes. Events about a call's channels go through
    /// `Normalizer::on_call_event` (find or start the call, follow moved
    /// channels, end it after its last hangup) to the `Call` method named.
    pub fn handle(&mut self, frame: &Frame, now: Micros, out: &mut Vec<Event>) {
        use AmiEvent as E;
        let Some(name) = frame.event() else { return };
        let event = AmiEvent::parse(name);
        let on: CallHandler = match event {
            // A channel is created: the first one of a Linkedid starts the call.
            E::Newchannel => Call::on_channel_seen,
            // A channel takes another's place (masquerade): known under its new name.
            E::Rename => Call::on_channel_seen,
            // Channel state changes: an `Up` leg counts when deciding who hung up.
            E::Newstate => Call::on_newstate,
            // Dialplan step: `Queue(…)` names the queue even if the call never joins it.
            E::Newexten => Call::on_newexten,
            // Ticket, recording, queue and dial status, the router's group, reasons, caller lookup.
            E::VarSet if self.reads_variable(frame) => Call::on_varset,
            // Every other variable (most of the traffic) is noise.
            E::VarSet => return,
            // The call waits in a queue: `call.queued`; was anybody available?
            E::QueueCallerJoin => Call::on_queue_join,
            // The call left the queue (answered, timed out, gone).
            E::QueueCallerLeave => Call::on_queue_leave,
            // The caller left the queue unanswered (a timeout says so later).
            E::QueueCallerAbandon => Call::on_queue_abandon,
            // The queue rings an agent: `call.offered`.
            E::AgentCalled => Call::on_agent_called,
            // The agent did not pick up: the offer ends (`no_answer`).
            E::AgentRingNoAnswer => Call::on_agent_ring_no_answer,
            // The agent picked up: `call.answered`.
            E::AgentConnect => Call::on_agent_connect,
            // The agent hung up while being connected: the offer ends (`other`).
            E::AgentDump => Call::on_agent_dump,
            // A leg is dialled: an offer to an agent, or an outbound call dialling out.
            E::DialBegin => Call::on_dial_begin,
            // The dial's result: answered, no answer, busy, cancelled.
            E::DialEnd => Call::on_dial_end,
            // A channel joins a bridge: it is up.
            E::BridgeEnter => Call::on_bridge_enter,
            // Somebody asked to hang a channel up: who hung up.
            E::HangupRequest => Call::on_hangup_request,
            // The PBX hangs a channel up itself: only keeps the call alive.
            E::SoftHangupRequest => Call::on_channel_seen,
            // A channel is gone: its offers end; the last one ends the call.
            E::Hangup => Call::on_hangup,
            // Transfers move the call to another agent (found by the transferee's Linkedid).
            E::BlindTransfer | E::AttendedTransfer => return self.on_transfer(event, frame, now, out),
            // Queue member pause and device state: agent presence.
            E::QueueMemberPause | E::QueueMemberStatus | E::QueueMember | E::QueueMemberPaused => {
                return self.on_member(frame, now, out)
            }
            // A click-to-call's result: a failure marks (or makes up) a failed call.
            E::OriginateResponse => return self.on_originate_response(frame, now, out),
            // Anything else (RTCP, DTMF, CDRs…) changes nothing.
            E::Other => return,
        };
        self.on_call_event(event, on, frame, now, out);
    }

    /// Whether a `VarSet` sets one of the channel variables the lifecycle
    /// reads (the cheap filter: most traffic is other variables).
    fn reads_variable(&self, frame: &Frame) -> bool {
        frame.get(VARIABLE).is_some_and(|var| reads_variable(var, &self.opts.ticket_variable))
    }

    /// Keeps `filter` (the AMI reader's, see [`IgnoredFrames`]) in step
    /// with this normalizer's options, now and at every
    /// [`Normalizer::reconfigure`].
    pub fn share_ignored_frames(&mut self, filter: IgnoredFrames) {
        filter.set_ticket_variable(&self.opts.ticket_variable);
        self.ignored = Some(filter);
    }

    /// A frame about a call's channels: finds the call by `Linkedid` (or
    /// starts it), follows a channel that moved to another call, lets `on`
    /// apply the event, and ends the call when its last channel hung up.
    fn on_call_event(&mut self, event: AmiEvent, on: CallHandler, frame: &Frame, now: Micros, out: &mut Vec<Event>) {
        let time = frame.timestamp_micros().unwrap_or(now);
        let Some(linkedid) = frame.get(LINKEDID).or_else(|| frame.get(DEST_LINKEDID)) else {
            return;
        };
        if linkedid.is_empty() {
            return;
        }
        let uniqueid = frame.get(UNIQUEID).filter(|u| !u.is_empty());

        // Channel moved to another call (Linkedid propagation on bridging)?
        if let Some(uid) = uniqueid {
            if let Some(owner) = self.channel_call.get(uid) {
                if owner.as_str() != linkedid {
                    let owner = owner.clone();
                    self.migrate_channel(uid, &owner, linkedid, time, out);
                }
            }
        }

        // One lookup for a known call (most frames); an unknown one is
        // started first.
        let call = match self.calls.get_mut(linkedid) {
            Some(call) => call,
            None => {
                if !self.start_call(event, frame, linkedid, uniqueid, time, out) {
                    return;
                }
                let Some(call) = self.calls.get_mut(linkedid) else {
                    return;
                };
                call
            }
        };
        call.last_event_at = time;
        call.epoch = self.epoch;
        let mut new_channels: Vec<SmolStr> = Vec::new();
        let ctx =
            call::Ctx { dir: &self.dir, opts: &self.opts, presence: &self.presence, new_channels: &mut new_channels };
        let finished = call.handle(on, event, frame, time, ctx, out);
        call.track_state(time);
        for uid in new_channels {
            self.channel_call.insert(uid, call.id.clone());
        }
        self.touch(linkedid);
        if let Some(uid) = uniqueid {
            if event == AmiEvent::Hangup {
                self.channel_call.remove(uid);
                self.gone_channels.insert(uid);
            }
        }
        if finished {
            self.finish(linkedid, time, EndReason::Normal, out);
        }
    }

    /// Starts the unknown call `linkedid` from this frame, unless the call
    /// (or this channel) already ended or the event cannot start a call.
    /// Returns whether the call exists now.
    fn start_call(
        &mut self,
        event: AmiEvent,
        frame: &Frame,
        linkedid: &str,
        uniqueid: Option<&str>,
        time: Micros,
        out: &mut Vec<Event>,
    ) -> bool {
        if self.ended.contains(linkedid) || uniqueid.is_some_and(|u| self.gone_channels.contains(u)) {
            return false;
        }
        if !event.may_start_call() {
            return false;
        }
        let channel = frame.get(CHANNEL).or_else(|| frame.get(DEST_CHANNEL)).unwrap_or("");
        let uid = uniqueid.or_else(|| frame.get(DEST_UNIQUEID)).unwrap_or(linkedid);
        let after_seq = self.seq_floors.remove(linkedid).unwrap_or(0);
        let first = FirstChannel { id: CallId::new(linkedid), frame, channel, uniqueid: uid, time, after_seq };
        let mut call = Call::start(first, &self.dir, &self.opts, out);
        if let Some(o) = self.originates.get(linkedid) {
            call.apply_originate(&o.number, o.ticket.as_deref());
        }
        self.channel_call.insert(uid.into(), call.id.clone());
        self.calls.insert(call.id.clone(), Box::new(call));
        true
    }

    fn migrate_channel(&mut self, uid: &str, from: &CallId, to: &str, time: Micros, out: &mut Vec<Event>) {
        let Some(old) = self.calls.get_mut(from.as_str()) else {
            return;
        };
        let Some(ch) = old.take_channel(uid) else {
            return;
        };
        let old_empty = old.live_channel_count() == 0;
        self.touch(from.as_str());
        if let Some(new) = self.calls.get_mut(to) {
            new.adopt_channel(ch);
            self.channel_call.insert(uid.into(), new.id.clone());
            self.touch(to);
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

    /// `BlindTransfer`, `AttendedTransfer`: the call (found by the
    /// transferee's Linkedid) moves to the target agent.
    fn on_transfer(&mut self, event: AmiEvent, frame: &Frame, now: Micros, out: &mut Vec<Event>) {
        if frame.get(RESULT).is_some_and(|r| r != "Success") {
            return;
        }
        let time = frame.timestamp_micros().unwrap_or(now);
        let linkedid = frame
            .get(TRANSFEREE_LINKEDID)
            .or_else(|| frame.get(ORIG_TRANSFERER_LINKEDID))
            .or_else(|| frame.get(TRANSFERER_LINKEDID));
        let Some(call) = linkedid.and_then(|l| self.calls.get_mut(l)) else {
            return;
        };
        call.last_event_at = time;
        call.epoch = self.epoch;
        call.on_transfer(event, frame, time, &self.dir, out);
        let id = call.id.clone();
        self.touch(id.as_str());
    }

    /// `OriginateResponse`: success changes nothing (the channels' events
    /// tell the story). A failure marks the call `failed`; a failed
    /// click-to-call whose channel never existed becomes a whole call
    /// here — `call.started`, `call.missed` (`failed`), `call.ended` — so
    /// that the helpdesk never waits for a call that will not come.
    fn on_originate_response(&mut self, frame: &Frame, now: Micros, out: &mut Vec<Event>) {
        let uid = frame.get(UNIQUEID).filter(|u| !u.is_empty() && *u != "<null>");
        let expected = uid.and_then(|u| self.originates.remove(u));
        if let Some(u) = uid.filter(|_| expected.is_some()) {
            self.originate_order.retain(|c| c.as_str() != u);
        }
        if frame.get(RESPONSE) == Some("Success") {
            return;
        }
        let Some(uid) = uid else { return };
        let time = frame.timestamp_micros().unwrap_or(now);
        let live =
            self.channel_call.get(uid).cloned().or_else(|| self.calls.contains_key(uid).then(|| CallId::new(uid)));
        if let Some(call) = live {
            if let Some(c) = self.calls.get_mut(call.as_str()) {
                c.originate_failed(frame.get(REASON));
            }
            self.touch(call.as_str());
            return;
        }
        let Some(exp) = expected else { return };
        if self.ended.contains(uid) || self.gone_channels.contains(uid) {
            return;
        }
        let started = exp.at.min(time);
        let synthetic =
            Frame::from_pairs(&[(CHANNEL, exp.device.as_str()), (EXTEN, "s"), (UNIQUEID, uid), (LINKEDID, uid)]);
        let first = FirstChannel {
            id: CallId::new(uid),
            frame: &synthetic,
            channel: &exp.device,
            uniqueid: uid,
            time: started,
            after_seq: self.seq_floors.remove(uid).unwrap_or(0),
        };
        let mut call = Call::start(first, &self.dir, &self.opts, out);
        let agent = self.dir.agent(exp.agent.as_str());
        call.prepare_failed_originate(agent, exp.ticket, Some(exp.number));
        self.calls.insert(call.id.clone(), Box::new(call));
        self.finish(uid, time, EndReason::Normal, out);
    }
}

/// A set that forgets its oldest members beyond a capacity. Members are
/// [`SmolStr`]s: a call or channel id is stored inline in both the order
/// and the set, without an allocation (a long one is shared by the two).
struct BoundedSet {
    order: VecDeque<SmolStr>,
    set: HashSet<SmolStr, ahash::RandomState>,
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
        let s = SmolStr::from(s);
        self.order.push_back(s.clone());
        self.set.insert(s);
    }
    fn contains(&self, s: &str) -> bool {
        self.set.contains(s)
    }
}

/// The channel variables the lifecycle reads (every other `VarSet` is noise).
fn reads_variable(var: &str, ticket_variable: &str) -> bool {
    var == call::QUEUESTATUS
        || var == call::DIALSTATUS
        || var == call::MIXMONITOR_FILENAME
        || var == ROUTE_GROUP_VARIABLE
        || var == ROUTE_REASON_VARIABLE
        || var == ROUTING_REASON_VARIABLE
        || var == ROUTING_FROM_VARIABLE
        || var == CALLER_FOUND_VARIABLE
        || var == CALLER_ACTIVE_VARIABLE
        || var == CONTACT_ID_VARIABLE
        || var == ticket_variable
}

/// The frames a [`Normalizer`] ignores whatever its state: `VarSet`s of
/// variables it does not read (30 % of a busy PBX's stream). The daemon's
/// AMI reader drops them before the pipeline's channel
/// ([`Normalizer::share_ignored_frames`] keeps the filter in step with a
/// reload); cheap to clone.
#[derive(Clone)]
pub struct IgnoredFrames(Arc<std::sync::RwLock<Box<str>>>);

impl IgnoredFrames {
    /// With the configured ticket variable (the one of
    /// [`SiteOptions::ticket_variable`]).
    pub fn new(ticket_variable: &str) -> IgnoredFrames {
        IgnoredFrames(Arc::new(std::sync::RwLock::new(Box::from(ticket_variable))))
    }

    /// Whether the normalizer would ignore `frame`.
    pub fn ignores(&self, frame: &Frame) -> bool {
        if frame.event() != Some("VarSet") {
            return false;
        }
        let Some(var) = frame.get(VARIABLE) else { return true };
        !reads_variable(var, &self.0.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The ticket variable changed (configuration reload).
    pub fn set_ticket_variable(&self, v: &str) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Box::from(v);
    }
}

#[cfg(test)]
mod tests;
