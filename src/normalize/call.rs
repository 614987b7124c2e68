//! One call's bookkeeping: its channels, offers, queue outcome and snapshot.
//!
//! Only `Normalizer` drives a `Call`: its dispatch table (`Normalizer::handle`)
//! picks the `Call::on_…` handler for each AMI event, and [`Call::handle`]
//! registers the frame's channels and runs it. This file knows how each AMI
//! event changes one call and which lifecycle events that emits.
//!
//! What the call went through is kept in enums that name each state
//! ([`Conversation`], [`Queueing`], [`Started`], [`OutboundDial`], and the
//! [`MissEvidence`] weighed when the call ends unanswered) rather than in
//! flags whose combinations the reader would have to decode.

use super::headers::{
    APPLICATION, APPLICATION_DATA, APP_DATA, BRIDGE_ID, CALLER_ID_NAME, CALLER_ID_NUM, CAUSE, CAUSE_TXT, CHANNEL,
    CHANNEL_STATE_DESC, DEST_CHANNEL, DEST_CHANNEL_STATE_DESC, DEST_LINKEDID, DEST_UNIQUEID, DIAL_STATUS, DIAL_STRING,
    EXTEN, EXTENSION, INTERFACE, MEMBER_NAME, ORIG_TRANSFERER_CHANNEL, POSITION, QUEUE,
    SECOND_TRANSFERER_CONNECTED_LINE_NUM, STATE_INTERFACE, TRANSFERER_CHANNEL, TRANSFER_TARGET_CHANNEL, UNIQUEID,
    VALUE, VARIABLE,
};
use super::input::AmiEvent;
use super::{
    MissRule, PresenceMap, Rules, SiteOptions, CALLER_ACTIVE_VARIABLE, CALLER_FOUND_VARIABLE, CONTACT_ID_VARIABLE,
    ROUTE_GROUP_VARIABLE, ROUTE_REASON_VARIABLE, ROUTING_FROM_VARIABLE, ROUTING_REASON_VARIABLE,
};
use crate::ami::Frame;
use crate::directory::{is_local_channel, Agent, Directory, Group};
use crate::event::{
    seconds_between, CallId, CallRouting, CallSnapshot, CallState, CallerLookup, Direction, EndReason, Event,
    EventKind, HungUpBy, Micros, MissedReason, OfferEndReason, Party, RoutingReason, TransferKind,
};
use crate::ids::AgentId;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use smol_str::SmolStr;
use std::collections::HashSet;
use std::sync::Arc;

/// Channel variable: the queue's verdict for the caller (`TIMEOUT`, `JOINEMPTY`…).
pub(super) const QUEUESTATUS: &str = "QUEUESTATUS";
/// Channel variable: the result of `Dial()` (read from `DialEnd` instead;
/// the `VarSet` still keeps the call alive).
pub(super) const DIALSTATUS: &str = "DIALSTATUS";
/// Channel variable: the recording's file on the PBX.
pub(super) const MIXMONITOR_FILENAME: &str = "MIXMONITOR_FILENAME";

/// What a channel is to its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelRole {
    /// The call's first channel: the caller (inbound) or the agent's phone
    /// that starts an outbound/internal call.
    Origin,
    /// An agent's own device (`SIP/2000-…`).
    AgentPhone,
    /// Either half of a Local channel (`Local/2000@agents-…;1`/`;2`).
    LocalHalf,
    /// Anything else: the customer's leg of an outbound call, a trunk.
    External,
}

/// Ids and names are [`SmolStr`]s: an Asterisk `Uniqueid`
/// (`1795471080.4`, or with a system name `pbx1-1795471080.4`) and most
/// channel names (`SIP/2000-0000000f`) fit in it without a heap
/// allocation, and a longer one is shared, not copied, when the same id is
/// also the call's origin or a key of the normalizer's channel index.
/// Stored as the same JSON strings as before.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Channel {
    uniqueid: SmolStr,
    /// Channel name (`SIP/2000-0000000f`), for actions on it (transfer).
    name: SmolStr,
    role: ChannelRole,
    agent: Option<AgentId>,
    up: bool,
    hung_up: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Offer {
    agent: AgentId,
    open: bool,
    channels: SmallVec<[SmolStr; 3]>,
}

/// What the queue said about a caller who left it unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum QueueOutcome {
    Abandoned,
    Timeout,
    NoAgents,
}

/// Who the call is in conversation with now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Conversation {
    /// Nobody answered yet, or a blind transfer's target has not yet.
    Waiting,
    /// Talking with this agent.
    Agent(AgentId),
    /// Answered by somebody the directory cannot name (a queue member it
    /// does not know, the customer of an outbound call without an agent,
    /// an attended transfer to an unknown target).
    Unattributed,
}

impl Conversation {
    fn answered_by(agent: Option<AgentId>) -> Conversation {
        agent.map_or(Conversation::Unattributed, Conversation::Agent)
    }

    fn is_talking(&self) -> bool {
        !matches!(self, Conversation::Waiting)
    }

    fn agent(&self) -> Option<&AgentId> {
        match self {
            Conversation::Agent(a) => Some(a),
            Conversation::Waiting | Conversation::Unattributed => None,
        }
    }
}

/// The call and the PBX's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Queueing {
    /// Never joined a queue (IVR, direct dial, outbound).
    Never,
    /// Waiting in a queue now; `first_joined` is when it joined its first.
    Waiting { first_joined: Micros },
    /// Left the queue (answered, timed out, gave up, sent on).
    Left { first_joined: Micros },
}

impl Queueing {
    fn first_joined(self) -> Option<Micros> {
        match self {
            Queueing::Never => None,
            Queueing::Waiting { first_joined } | Queueing::Left { first_joined } => Some(first_joined),
        }
    }

    fn is_waiting(self) -> bool {
        matches!(self, Queueing::Waiting { .. })
    }

    /// Joins a queue at `time` (the first join's time is kept).
    fn join(&mut self, time: Micros) {
        *self = Queueing::Waiting { first_joined: self.first_joined().unwrap_or(time) };
    }

    fn leave(&mut self) {
        if let Queueing::Waiting { first_joined } = *self {
            *self = Queueing::Left { first_joined };
        }
    }
}

/// Whether `call.started` went out. An originated call (the agent's phone
/// rung by `Originate`) holds it back until its ticket variable is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Started {
    Pending,
    Emitted,
}

/// The call's first channel dialling the customer (outbound, internal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum OutboundDial {
    /// Not dialling (not yet, or the dial ended).
    Idle,
    /// The far end is ringing.
    Ringing,
}

/// The last `DialStatus` of the call's first channel, as far as the missed
/// reason cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum DialStatus {
    NoAnswer,
    Busy,
    Cancel,
    /// `ANSWER`, `CHANUNAVAIL`, `CONGESTION`… (an unanswered call with
    /// one of these failed).
    Other,
}

impl DialStatus {
    fn parse(s: &str) -> DialStatus {
        if s.eq_ignore_ascii_case("NOANSWER") {
            DialStatus::NoAnswer
        } else if s.eq_ignore_ascii_case("BUSY") {
            DialStatus::Busy
        } else if s.eq_ignore_ascii_case("CANCEL") {
            DialStatus::Cancel
        } else {
            DialStatus::Other
        }
    }
}

/// Whether anybody of the call's group was available when the call arrived
/// in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Staffing {
    /// Somebody was, or the group is not known.
    NoShortage,
    /// Nobody was: an unanswered end is `no_agents`, whatever the queue said.
    NobodyAvailable,
}

/// What the helpdesk said about the caller (Zammad's `reject` of a
/// blocked caller id, honoured by hanging the caller up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum HelpdeskVerdict {
    Admitted,
    /// An unanswered end is `blocked`, whatever else is known.
    Blocked,
}

impl Staffing {
    fn on_arrival(group: Option<&Group>, presence: &PresenceMap) -> Staffing {
        if group.is_some_and(|g| !presence.group_has_available_agent(g)) {
            Staffing::NobodyAvailable
        } else {
            Staffing::NoShortage
        }
    }
}

/// The click-to-call's own leg: the PBX rings the agent's phone first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum OriginateLeg {
    /// Not a click-to-call.
    NotOriginated,
    /// A click-to-call whose agent's phone has not rung (yet): an
    /// unanswered end is `failed` (the PBX could not reach it).
    Originated,
    /// A click-to-call whose agent's phone rang (or was busy) and was not
    /// answered (yet): an unanswered end is `agent_no_answer`.
    AgentRinging,
    /// The agent answered; what follows is the customer's dial.
    AgentAnswered,
    /// The PBX could not ring the agent (unreachable, congestion): an
    /// unanswered end is `failed`.
    Failed,
}

impl OriginateLeg {
    /// The originated leg ended unanswered with this `DialStatus`, or this
    /// `OriginateResponse` `Reason` (Asterisk's control frame: 1 hung up,
    /// 3 rang out, 5 busy; 0 and 8 mean it could not ring at all).
    fn unanswered(dial_status: Option<&str>, reason: Option<&str>) -> OriginateLeg {
        let rang = dial_status.is_some_and(|s| {
            matches!(DialStatus::parse(s), DialStatus::NoAnswer | DialStatus::Busy | DialStatus::Cancel)
        }) || matches!(reason, Some("1" | "3" | "5"));
        if rang {
            OriginateLeg::AgentRinging
        } else {
            OriginateLeg::Failed
        }
    }
}

/// Whether the call's first channel (the caller, inbound) hung up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum OriginLeg {
    Present,
    HungUp,
}

/// Whether `call.stuck` was reported (it is, once per call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum StuckReport {
    NotReported,
    Reported,
}

/// What is known about why the call would be missed if it ended unanswered
/// now; [`Call::missed_reason`] weighs it when the call ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MissEvidence {
    staffing: Staffing,
    /// The FastAGI router's missed reason (`CALLBRIDGE_REASON`), until the
    /// call joins a queue after all.
    routed: Option<MissedReason>,
    /// What the queue said last.
    queue: Option<QueueOutcome>,
    dial: Option<DialStatus>,
    originate: OriginateLeg,
    helpdesk: HelpdeskVerdict,
}

/// Borrowed context for one `Call::handle`.
pub(super) struct Ctx<'a> {
    pub dir: &'a Directory,
    pub opts: &'a SiteOptions,
    /// Agent presence now (for "was anybody available when the call arrived").
    pub presence: &'a PresenceMap,
    /// Channels this event added to the call (the normalizer indexes them).
    pub new_channels: &'a mut Vec<SmolStr>,
}

/// One frame as a call's handler sees it.
pub(super) struct Step<'a> {
    pub frame: &'a Frame,
    /// The frame's `Uniqueid` (empty if none).
    pub uid: &'a str,
    /// The frame's `DestUniqueid` (empty if none).
    pub dest_uid: &'a str,
    /// The event's time (the PBX's `Timestamp`, or the clock).
    pub time: Micros,
}

/// What an AMI event does to a call (chosen by `Normalizer::handle`).
pub(super) type CallHandler = fn(&mut Call, &Step<'_>, &Ctx<'_>, &mut Vec<Event>);

/// The first channel of a call: what [`Call::start`] starts it from.
pub(super) struct FirstChannel<'a> {
    pub id: CallId,
    /// The frame that named the channel (its `Exten`, caller id, state).
    pub frame: &'a Frame,
    /// Channel name (`SIP/2000-0000000f`).
    pub channel: &'a str,
    pub uniqueid: &'a str,
    /// When the call started.
    pub time: Micros,
    /// The last `seq` a previous run emitted under this id (0: none): the
    /// call numbers its events after it.
    pub after_seq: u64,
}

/// Everything here is what a restarted daemon needs to carry the call on
/// (`persist.rs` stores it with the call's events); only `epoch` is not:
/// a restored call belongs to no resync yet.
#[derive(Serialize, Deserialize)]
pub(super) struct Call {
    pub id: CallId,
    pub(super) seq: u64,
    /// Shared with the events emitted since it last changed (and so with
    /// the registry and the feed): written through [`Call::snap_mut`].
    #[serde(with = "super::persist::shared_snapshot")]
    pub(super) snap: Arc<CallSnapshot>,
    /// One inline: a queued caller has one channel; more spill to the heap.
    channels: SmallVec<[Channel; 1]>,
    /// The first channel's `Uniqueid` (that channel may have moved on).
    origin: SmolStr,
    pub last_event_at: Micros,
    /// The normalizer's resync epoch at this call's last event.
    #[serde(skip)]
    pub epoch: u64,
    queue: Queueing,
    /// The queue the dialplan sent the call to (`Queue(…)`), joined or not.
    queue_app: Option<SmolStr>,
    evidence: MissEvidence,
    offers: Vec<Offer>,
    conversation: Conversation,
    /// When the current wait started (queue join, start, or a transfer).
    wait_base: Micros,
    dialing: OutboundDial,
    origin_leg: OriginLeg,
    hung_up_by: Option<HungUpBy>,
    cause: Option<(u32, Box<str>)>,
    stuck: StuckReport,
    started: Started,
    /// The state as of the last event, and since when.
    state_seen: CallState,
    pub state_since: Micros,
}

fn is_dialable(exten: &str) -> bool {
    !exten.is_empty() && exten.bytes().all(|c| c.is_ascii_digit() || matches!(c, b'+' | b'*' | b'#'))
}

fn known(s: Option<&str>) -> Option<SmolStr> {
    s.filter(|v| !v.is_empty() && *v != "<unknown>").map(SmolStr::from)
}

/// An agent as a party of a call: their extension and name.
fn agent_party(a: &Agent) -> Party {
    Party { number: Some(a.extension.as_str().into()), name: a.name.as_deref().map(SmolStr::from) }
}

fn status_is(s: Option<&str>, v: &str) -> bool {
    s.is_some_and(|x| x.eq_ignore_ascii_case(v))
}

/// Direction, caller, callee and agent of a call, from its first channel:
/// an agent's phone calls out (or another agent: internal), anything else
/// calls in.
fn first_parties(
    agent: Option<&Agent>,
    exten: &str,
    frame: &Frame,
    dir: &Directory,
    opts: &SiteOptions,
) -> (Direction, Party, Party, Option<AgentId>) {
    match agent {
        Some(a) => {
            let caller = agent_party(a);
            match dir.agent_for_extension(exten) {
                Some(b) => (Direction::Internal, caller, agent_party(b), Some(a.id.clone())),
                None => (
                    Direction::Outbound,
                    caller,
                    Party { number: is_dialable(exten).then(|| strip_prefix(exten, opts)), name: None },
                    Some(a.id.clone()),
                ),
            }
        }
        None => (
            Direction::Inbound,
            Party { number: known(frame.get(CALLER_ID_NUM)), name: known(frame.get(CALLER_ID_NAME)) },
            Party { number: is_dialable(exten).then(|| exten.into()), name: None },
            None,
        ),
    }
}

impl Call {
    /// Creates a call from its first channel and emits `call.started`.
    pub fn start(first: FirstChannel<'_>, dir: &Directory, opts: &SiteOptions, out: &mut Vec<Event>) -> Call {
        let FirstChannel { id, frame, channel, uniqueid, time, after_seq } = first;
        let agent = dir.agent_for_channel(channel);
        let exten = frame.get(EXTEN).unwrap_or("");
        let (direction, caller, callee, snap_agent) = first_parties(agent, exten, frame, dir, opts);
        let snap = CallSnapshot {
            id: id.clone(),
            direction,
            state: CallState::Started,
            caller,
            callee,
            group: None,
            queue: None,
            agent: snap_agent,
            ticket_id: None,
            started_at: time,
            answered_at: None,
            ended_at: None,
            recording: None,
            routing: None,
            caller_lookup: None,
        };
        let uniqueid = SmolStr::from(uniqueid);
        let mut call = Call::new(id, snap, uniqueid.clone(), time);
        call.seq = after_seq;
        call.channels.push(Channel {
            uniqueid,
            name: channel.into(),
            role: ChannelRole::Origin,
            agent: agent.map(|a| a.id.clone()),
            up: frame.get(CHANNEL_STATE_DESC) == Some("Up"),
            hung_up: false,
        });
        // An originated call (the agent's phone rung by `Originate`, no
        // number dialled yet) carries its ticket in a channel variable set
        // right after the channel is created: start it on the next event so
        // that `call.started` already shows the ticket.
        let originated = direction == Direction::Outbound && !is_dialable(exten);
        if originated {
            call.evidence.originate = OriginateLeg::Originated;
        } else {
            call.emit_started(out);
        }
        call
    }

    /// A call that nothing has happened to yet.
    fn new(id: CallId, snap: CallSnapshot, origin: SmolStr, time: Micros) -> Call {
        Call {
            id,
            seq: 0,
            snap: Arc::new(snap),
            channels: SmallVec::new(),
            origin,
            last_event_at: time,
            epoch: 0,
            queue: Queueing::Never,
            queue_app: None,
            evidence: MissEvidence {
                staffing: Staffing::NoShortage,
                routed: None,
                queue: None,
                dial: None,
                originate: OriginateLeg::NotOriginated,
                helpdesk: HelpdeskVerdict::Admitted,
            },
            offers: Vec::new(),
            conversation: Conversation::Waiting,
            wait_base: time,
            dialing: OutboundDial::Idle,
            origin_leg: OriginLeg::Present,
            hung_up_by: None,
            cause: None,
            stuck: StuckReport::NotReported,
            started: Started::Pending,
            state_seen: CallState::Started,
            state_since: time,
        }
    }

    fn emit_started(&mut self, out: &mut Vec<Event>) {
        if self.started == Started::Pending {
            self.started = Started::Emitted;
            let t = self.snap.started_at;
            self.emit(EventKind::Started {}, t, out);
        }
    }

    fn emit(&mut self, kind: EventKind, time: Micros, out: &mut Vec<Event>) {
        self.seq += 1;
        let state = self.state();
        if self.snap.state != state {
            self.snap_mut().state = state;
        }
        out.push(Event { seq: self.seq, time, kind, call: Some(Arc::clone(&self.snap)) });
    }

    /// The snapshot to change: copied first if an event still shares it.
    fn snap_mut(&mut self) -> &mut CallSnapshot {
        Arc::make_mut(&mut self.snap)
    }

    /// Notes a state change at `time` (for the stuck-call limits).
    pub fn track_state(&mut self, time: Micros) {
        let now = self.state();
        if now != self.state_seen {
            self.state_seen = now;
            self.state_since = time;
        }
    }

    pub fn stuck_reported(&self) -> bool {
        self.stuck == StuckReport::Reported
    }

    pub(super) fn state(&self) -> CallState {
        if self.snap.ended_at.is_some() {
            CallState::Ended
        } else if self.conversation.is_talking() {
            CallState::Talking
        } else if self.offers.iter().any(|o| o.open) || self.dialing == OutboundDial::Ringing {
            CallState::Ringing
        } else if self.queue.is_waiting() {
            CallState::Queued
        } else {
            CallState::Started
        }
    }

    pub fn live_channel_count(&self) -> usize {
        self.channels.iter().filter(|c| !c.hung_up).count()
    }

    pub fn channel_ids(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(|c| &*c.uniqueid)
    }

    /// Channels of the call that have not hung up.
    pub fn live_channel_ids(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().filter(|c| !c.hung_up).map(|c| &*c.uniqueid)
    }

    /// Channels of the call that hung up.
    pub fn gone_channel_ids(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().filter(|c| c.hung_up).map(|c| &*c.uniqueid)
    }

    /// The call as the helpdesk last saw it.
    pub fn snapshot(&self) -> CallSnapshot {
        let mut snap = CallSnapshot::clone(&self.snap);
        snap.state = self.state();
        snap
    }

    fn channel(&self, uid: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| &*c.uniqueid == uid)
    }

    fn channel_mut(&mut self, uid: &str) -> Option<&mut Channel> {
        self.channels.iter_mut().find(|c| &*c.uniqueid == uid)
    }

    /// Registers a channel seen for the first time in this call.
    fn ensure_channel(&mut self, uid: &str, name: &str, state: Option<&str>, ctx: &mut Ctx<'_>) {
        if uid.is_empty() || self.channel(uid).is_some() {
            return;
        }
        let agent = ctx.dir.agent_for_channel(name).map(|a| a.id.clone());
        let role = if is_local_channel(name) {
            ChannelRole::LocalHalf
        } else if agent.is_some() {
            ChannelRole::AgentPhone
        } else {
            ChannelRole::External
        };
        let uniqueid = SmolStr::from(uid);
        ctx.new_channels.push(uniqueid.clone());
        self.channels.push(Channel {
            uniqueid,
            name: name.into(),
            role,
            agent,
            up: state == Some("Up"),
            hung_up: false,
        });
    }

    pub fn take_channel(&mut self, uid: &str) -> Option<Channel> {
        let pos = self.channels.iter().position(|c| &*c.uniqueid == uid)?;
        Some(self.channels.remove(pos))
    }

    pub fn adopt_channel(&mut self, mut ch: Channel) {
        if ch.role == ChannelRole::Origin {
            ch.role = if ch.agent.is_some() { ChannelRole::AgentPhone } else { ChannelRole::External };
        }
        if self.channel(&ch.uniqueid).is_none() {
            self.channels.push(ch);
        }
    }

    pub fn forget_channels_not_in(&mut self, alive: &HashSet<&str>) {
        for c in self.channels.iter_mut() {
            if !alive.contains(&*c.uniqueid) {
                c.hung_up = true;
            }
        }
    }

    /// Handles one event of this call: registers the channels the frame
    /// names, then lets `on` (picked by `Normalizer::handle`) apply it.
    /// Returns true when the event is the hangup of its last channel.
    pub fn handle(
        &mut self,
        on: CallHandler,
        event: AmiEvent,
        f: &Frame,
        time: Micros,
        mut ctx: Ctx<'_>,
        out: &mut Vec<Event>,
    ) -> bool {
        if self.started == Started::Pending && !event.keeps_start_deferred() {
            self.emit_started(out);
        }
        let uid = f.get(UNIQUEID).unwrap_or("");
        if let Some(name) = f.get(CHANNEL) {
            self.ensure_channel(uid, name, f.get(CHANNEL_STATE_DESC), &mut ctx);
        }
        let dest_uid = f.get(DEST_UNIQUEID).unwrap_or("");
        if let Some(dest) = f.get(DEST_CHANNEL) {
            if f.get(DEST_LINKEDID).is_none_or(|l| l == self.id.as_str()) {
                self.ensure_channel(dest_uid, dest, f.get(DEST_CHANNEL_STATE_DESC), &mut ctx);
            }
        }
        on(self, &Step { frame: f, uid, dest_uid, time }, &ctx, out);
        event == AmiEvent::Hangup && self.live_channel_count() == 0
    }

    /// Events whose channels [`Call::handle`] registers, and nothing more.
    pub fn on_channel_seen(&mut self, _: &Step<'_>, _: &Ctx<'_>, _: &mut Vec<Event>) {}

    pub fn on_bridge_enter(&mut self, s: &Step<'_>, _: &Ctx<'_>, _: &mut Vec<Event>) {
        if let Some(c) = self.channel_mut(s.uid) {
            c.up = true;
        }
        self.note_origin_up(s.uid, true);
    }

    /// The click-to-call's agent answered their phone.
    fn note_origin_up(&mut self, uid: &str, up: bool) {
        let waiting = matches!(self.evidence.originate, OriginateLeg::Originated | OriginateLeg::AgentRinging);
        if up && uid == &*self.origin && waiting {
            self.evidence.originate = OriginateLeg::AgentAnswered;
        }
    }

    pub fn on_newstate(&mut self, s: &Step<'_>, _: &Ctx<'_>, _: &mut Vec<Event>) {
        let state = s.frame.get(CHANNEL_STATE_DESC);
        let up = state == Some("Up");
        if let Some(c) = self.channel_mut(s.uid) {
            c.up = up;
        }
        self.note_origin_up(s.uid, up);
        if state == Some("Ringing") && s.uid == &*self.origin && self.evidence.originate == OriginateLeg::Originated {
            self.evidence.originate = OriginateLeg::AgentRinging;
        }
    }

    /// The first channel enters `Queue(…)`: the queue it was sent to.
    pub fn on_newexten(&mut self, s: &Step<'_>, _: &Ctx<'_>, _: &mut Vec<Event>) {
        if s.uid != &*self.origin || s.frame.get(APPLICATION) != Some("Queue") {
            return;
        }
        let queue = s.frame.get(APP_DATA).unwrap_or("").split(',').next().unwrap_or("").trim();
        if !queue.is_empty() {
            self.queue_app = Some(queue.into());
        }
    }

    pub fn on_queue_join(&mut self, s: &Step<'_>, ctx: &Ctx<'_>, out: &mut Vec<Event>) {
        let (f, time) = (s.frame, s.time);
        let queue = f.get(QUEUE).unwrap_or("").to_string();
        let dir_group = ctx.dir.group_for_queue(&queue);
        self.evidence.staffing = Staffing::on_arrival(dir_group, ctx.presence);
        self.evidence.routed = None;
        let group = dir_group.map(|g| g.id.clone());
        let position = f.get(POSITION).and_then(|p| p.parse().ok());
        self.snap_mut().group = group.clone();
        self.snap_mut().queue = Some(queue.as_str().into());
        self.queue.join(time);
        if !self.conversation.is_talking() {
            self.wait_base = self.queue.first_joined().unwrap_or(time);
        }
        self.evidence.queue = None;
        self.emit(EventKind::Queued { group, queue, position }, time, out);
    }

    pub fn on_queue_leave(&mut self, _: &Step<'_>, _: &Ctx<'_>, _: &mut Vec<Event>) {
        self.queue.leave();
    }

    pub fn on_queue_abandon(&mut self, _: &Step<'_>, _: &Ctx<'_>, _: &mut Vec<Event>) {
        self.queue.leave();
        self.evidence.queue = Some(QueueOutcome::Abandoned);
    }

    pub fn on_agent_called(&mut self, s: &Step<'_>, ctx: &Ctx<'_>, out: &mut Vec<Event>) {
        let f = s.frame;
        let agent = ctx
            .dir
            .agent_for_member(f.get(INTERFACE), f.get(STATE_INTERFACE), f.get(MEMBER_NAME))
            .or_else(|| f.get(DEST_CHANNEL).and_then(|d| ctx.dir.agent_for_channel(d)));
        if let Some(agent) = agent {
            self.open_offer(agent, s.dest_uid, true, s.time, out);
        }
    }

    pub fn on_agent_ring_no_answer(&mut self, s: &Step<'_>, ctx: &Ctx<'_>, out: &mut Vec<Event>) {
        if let Some(a) = self.member_agent(s.frame, ctx.dir) {
            self.close_offer(&a, OfferEndReason::NoAnswer, s.time, out);
        }
    }

    pub fn on_agent_dump(&mut self, s: &Step<'_>, ctx: &Ctx<'_>, out: &mut Vec<Event>) {
        if let Some(a) = self.member_agent(s.frame, ctx.dir) {
            self.close_offer(&a, OfferEndReason::Other, s.time, out);
        }
    }

    pub fn on_agent_connect(&mut self, s: &Step<'_>, ctx: &Ctx<'_>, out: &mut Vec<Event>) {
        let agent = self.member_agent(s.frame, ctx.dir);
        self.answer(agent, s.time, out);
    }

    fn member_agent(&self, f: &Frame, dir: &Directory) -> Option<AgentId> {
        dir.agent_for_member(f.get(INTERFACE), f.get(STATE_INTERFACE), f.get(MEMBER_NAME))
            .map(|a| a.id.clone())
            .or_else(|| f.get(DEST_UNIQUEID).and_then(|u| self.channel(u)).and_then(|c| c.agent.clone()))
    }

    /// The channel variables that matter (the dispatch table filtered the
    /// others out): ticket, recording, and on the first channel the queue's
    /// verdict and the FastAGI router's group and reason.
    pub fn on_varset(&mut self, s: &Step<'_>, ctx: &Ctx<'_>, _: &mut Vec<Event>) {
        let (f, uid, dir, opts) = (s.frame, s.uid, ctx.dir, ctx.opts);
        let (Some(var), Some(value)) = (f.get(VARIABLE), f.get(VALUE)) else {
            return;
        };
        if var == opts.ticket_variable {
            self.snap_mut().ticket_id = (!value.is_empty()).then(|| value.into());
        } else if var == MIXMONITOR_FILENAME && !value.is_empty() {
            self.snap_mut().recording = Some(recording_location(value, opts));
        } else if var == QUEUESTATUS && uid == &*self.origin {
            self.on_queue_status(value, ctx);
        } else if var == ROUTE_GROUP_VARIABLE && uid == &*self.origin {
            // The FastAGI router's answer, seen through the PBX: a call sent
            // to "missed" never joins a queue but belongs to this group.
            if self.queue.first_joined().is_none() {
                if let Some(g) = dir.group(value) {
                    self.snap_mut().group = Some(g.id.clone());
                }
            }
        } else if var == ROUTE_REASON_VARIABLE && uid == &*self.origin {
            self.evidence.routed = match value {
                "holiday" => Some(MissedReason::Holiday),
                "outside_hours" => Some(MissedReason::OutsideHours),
                "no_agents" => Some(MissedReason::NoAgents),
                _ => None,
            };
        } else if uid == &*self.origin {
            self.on_routing_varset(var, value, dir);
        }
    }

    /// The router's move (`CALLBRIDGE_ROUTING_*`) and caller lookup
    /// (`CALLBRIDGE_CALLER_*`, `CALLBRIDGE_CONTACT_ID`) onto the snapshot.
    /// The router sets the reason before the group and `found` before the
    /// rest; an empty reason or `found` (a later `AGI()` that moved nothing
    /// or got no answer) clears what an earlier one said.
    fn on_routing_varset(&mut self, var: &str, value: &str, dir: &Directory) {
        let flag = |v: &str| match v {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        };
        if var == ROUTING_REASON_VARIABLE {
            self.snap_mut().routing =
                RoutingReason::parse(value).map(|reason| Box::new(CallRouting { reason, from_group: None }));
        } else if var == ROUTING_FROM_VARIABLE {
            if let Some(r) = self.snap_mut().routing.as_mut() {
                r.from_group = dir.group(value).map(|g| g.id.clone());
            }
        } else if var == CALLER_FOUND_VARIABLE {
            self.snap_mut().caller_lookup =
                flag(value).map(|found| Box::new(CallerLookup { found, active: None, contact_id: None }));
        } else if var == CALLER_ACTIVE_VARIABLE {
            if let Some(l) = self.snap_mut().caller_lookup.as_mut() {
                l.active = flag(value);
            }
        } else if var == CONTACT_ID_VARIABLE {
            if let Some(l) = self.snap_mut().caller_lookup.as_mut() {
                l.contact_id = (!value.is_empty()).then(|| value.to_string());
            }
        }
    }

    /// `QUEUESTATUS` of the first channel: why the call left the queue.
    fn on_queue_status(&mut self, value: &str, ctx: &Ctx<'_>) {
        let outcome = match value {
            "TIMEOUT" => QueueOutcome::Timeout,
            "JOINEMPTY" | "LEAVEEMPTY" | "JOINUNAVAIL" | "LEAVEUNAVAIL" | "FULL" => QueueOutcome::NoAgents,
            _ => return,
        };
        self.evidence.queue = Some(outcome);
        self.queue.leave();
        if self.queue.first_joined().is_none() {
            // Never joined: the queue is the one the dialplan asked for.
            if let Some(q) = self.queue_app.clone() {
                let group = ctx.dir.group_for_queue(&q);
                self.evidence.staffing = Staffing::on_arrival(group, ctx.presence);
                self.snap_mut().group = group.map(|g| g.id.clone());
                self.snap_mut().queue = Some(q);
            }
        }
    }

    /// A leg is dialled: an agent's (an offer), or the customer's from the
    /// agent's phone (outbound, internal).
    pub fn on_dial_begin(&mut self, s: &Step<'_>, ctx: &Ctx<'_>, out: &mut Vec<Event>) {
        let (f, src, dest) = (s.frame, s.uid, s.dest_uid);
        if dest == &*self.origin {
            // Originate: the PBX rings the agent's own phone first.
            return;
        }
        let dest_agent = self.channel(dest).and_then(|c| c.agent.clone());
        if let Some(agent) = dest_agent.as_ref().and_then(|a| ctx.dir.agent(a.as_str())) {
            if src == &*self.origin {
                self.evidence.dial = None;
                self.dialled_agent(agent);
            }
            self.open_offer(agent, dest, false, s.time, out);
            return;
        }
        if src == &*self.origin && self.snap.direction != Direction::Inbound {
            // The agent's phone dials the customer.
            self.dialing = OutboundDial::Ringing;
            self.evidence.dial = None;
            if self.snap.callee.number.is_none() || self.snap.direction == Direction::Outbound {
                let number = f
                    .get(EXTEN)
                    .filter(|e| is_dialable(e))
                    .map(|e| strip_prefix(e, ctx.opts))
                    .or_else(|| f.get(DIAL_STRING).and_then(|d| d.rsplit('/').next()).map(SmolStr::from));
                if number.is_some() {
                    self.snap_mut().callee.number = number;
                }
            }
        }
    }

    /// An agent's call from their phone reaches another agent (the
    /// extension was only known once dialled): agent to agent is internal.
    fn dialled_agent(&mut self, callee: &Agent) {
        let other = self.snap.agent.as_ref() != Some(&callee.id);
        if self.snap.direction == Direction::Outbound && other && !self.conversation.is_talking() {
            self.snap_mut().direction = Direction::Internal;
            self.snap_mut().callee = agent_party(callee);
        }
    }

    pub fn on_dial_end(&mut self, s: &Step<'_>, _: &Ctx<'_>, out: &mut Vec<Event>) {
        let (src, dest, time) = (s.uid, s.dest_uid, s.time);
        let status = s.frame.get(DIAL_STATUS);
        if dest == &*self.origin {
            if status_is(status, "ANSWER") {
                self.note_origin_up(dest, true);
            } else {
                self.evidence.originate = OriginateLeg::unanswered(status, None);
            }
            return;
        }
        if src == &*self.origin {
            if let Some(st) = status {
                self.evidence.dial = Some(DialStatus::parse(st));
            }
        }
        let dest_agent = self.channel(dest).and_then(|c| c.agent.clone());
        if let Some(agent) = dest_agent {
            if self.offers.iter().any(|o| o.open && o.agent == agent) {
                self.end_agent_dial(agent, status.unwrap_or(""), time, out);
            }
            return;
        }
        if src == &*self.origin && self.snap.direction != Direction::Inbound {
            self.dialing = OutboundDial::Idle;
            if status_is(status, "ANSWER") {
                if let Some(c) = self.channel_mut(dest) {
                    c.up = true;
                }
                let agent = self.snap.agent.clone();
                self.answer(agent, time, out);
            }
        }
    }

    /// The dial of an agent with an open offer ended with `status`.
    fn end_agent_dial(&mut self, agent: AgentId, status: &str, time: Micros, out: &mut Vec<Event>) {
        match status {
            "ANSWER" => self.answer(Some(agent), time, out),
            "NOANSWER" => self.close_offer(&agent, OfferEndReason::NoAnswer, time, out),
            "CANCEL" => {
                let reason = if self.origin_leg == OriginLeg::HungUp {
                    OfferEndReason::CallerHungUp
                } else if self.conversation.is_talking() {
                    OfferEndReason::AnsweredElsewhere
                } else {
                    OfferEndReason::NoAnswer
                };
                self.close_offer(&agent, reason, time, out)
            }
            _ => self.close_offer(&agent, OfferEndReason::Other, time, out),
        }
    }

    /// Somebody asked to hang a channel up: who hung up, if the channel
    /// says (the first request wins; an answer or transfer forgets it).
    pub fn on_hangup_request(&mut self, s: &Step<'_>, _: &Ctx<'_>, _: &mut Vec<Event>) {
        let Some(ch) = self.channel(s.uid) else { return };
        let talking_to_it = ch.agent.is_some() && self.conversation.agent() == ch.agent.as_ref();
        let party = match ch.role {
            ChannelRole::LocalHalf => None,
            ChannelRole::Origin if self.snap.direction == Direction::Inbound => Some(HungUpBy::Caller),
            ChannelRole::Origin => Some(HungUpBy::Agent),
            ChannelRole::AgentPhone if ch.up || talking_to_it => Some(HungUpBy::Agent),
            ChannelRole::External if ch.up => Some(HungUpBy::Customer),
            _ => None,
        };
        if ch.role == ChannelRole::Origin {
            self.origin_leg = OriginLeg::HungUp;
        }
        if self.hung_up_by.is_none() {
            self.hung_up_by = party;
        }
    }

    /// A channel is gone: the hangup cause, and the offers ringing it end.
    pub fn on_hangup(&mut self, s: &Step<'_>, _: &Ctx<'_>, out: &mut Vec<Event>) {
        let (f, uid, time) = (s.frame, s.uid, s.time);
        let cause = f.get(CAUSE).and_then(|c| c.parse::<u32>().ok());
        let is_origin = uid == &*self.origin;
        if let Some(c) = cause {
            if c != 0 && (is_origin || self.cause.is_none()) {
                self.cause = Some((c, f.get(CAUSE_TXT).unwrap_or("").into()));
            }
        }
        if is_origin {
            self.origin_leg = OriginLeg::HungUp;
        }
        if let Some(ch) = self.channel_mut(uid) {
            ch.hung_up = true;
        }
        // An open offer whose device went away without answering is over.
        let ended: Vec<AgentId> = self
            .offers
            .iter()
            .filter(|o| o.open && o.channels.iter().any(|c| &**c == uid))
            .map(|o| o.agent.clone())
            .collect();
        for agent in ended {
            let reason = self.default_offer_end();
            self.close_offer(&agent, reason, time, out);
        }
    }

    fn default_offer_end(&self) -> OfferEndReason {
        if self.conversation.is_talking() {
            OfferEndReason::AnsweredElsewhere
        } else if self.origin_leg == OriginLeg::HungUp {
            OfferEndReason::CallerHungUp
        } else {
            OfferEndReason::Other
        }
    }

    /// Opens an offer for `agent`, or attaches `uid` to the one already
    /// ringing. `new_attempt` is true for `AgentCalled` (the queue starts a
    /// new attempt even if a previous one of the same agent is closed).
    fn open_offer(&mut self, agent: &Agent, uid: &str, new_attempt: bool, time: Micros, out: &mut Vec<Event>) {
        if let Some(o) = self.offers.iter_mut().find(|o| o.open && o.agent == agent.id) {
            if !uid.is_empty() && !o.channels.iter().any(|c| &**c == uid) {
                o.channels.push(uid.into());
            }
            return;
        }
        if !new_attempt && self.offers.iter().any(|o| o.channels.iter().any(|c| &**c == uid)) {
            return;
        }
        if self.conversation.agent() == Some(&agent.id) {
            return;
        }
        let mut channels = SmallVec::new();
        if !uid.is_empty() {
            channels.push(uid.into());
        }
        self.offers.push(Offer { agent: agent.id.clone(), open: true, channels });
        self.emit(EventKind::Offered { agent: agent.id.clone(), extension: agent.extension.clone() }, time, out);
    }

    fn close_offer(&mut self, agent: &AgentId, reason: OfferEndReason, time: Micros, out: &mut Vec<Event>) {
        let Some(o) = self.offers.iter_mut().find(|o| o.open && &o.agent == agent) else {
            return;
        };
        o.open = false;
        self.emit(EventKind::OfferEnded { agent: agent.clone(), reason }, time, out);
    }

    fn answer(&mut self, agent: Option<AgentId>, time: Micros, out: &mut Vec<Event>) {
        if self.conversation.is_talking() && (agent.is_none() || self.conversation.agent() == agent.as_ref()) {
            return;
        }
        // The answering agent's offer ends by being answered (no event);
        // everybody else's ringing stops.
        if let Some(a) = &agent {
            if let Some(o) = self.offers.iter_mut().find(|o| o.open && &o.agent == a) {
                o.open = false;
            }
        }
        self.conversation = Conversation::answered_by(agent.clone());
        self.dialing = OutboundDial::Idle;
        self.queue.leave();
        self.snap_mut().answered_at.get_or_insert(time);
        if agent.is_some() {
            self.snap_mut().agent = agent.clone();
        }
        self.hung_up_by = None;
        let wait_seconds = seconds_between(self.wait_base, time);
        self.emit(EventKind::Answered { agent, wait_seconds }, time, out);
        let others: Vec<AgentId> = self.offers.iter().filter(|o| o.open).map(|o| o.agent.clone()).collect();
        for other in others {
            self.close_offer(&other, OfferEndReason::AnsweredElsewhere, time, out);
        }
    }

    pub fn on_transfer(&mut self, event: AmiEvent, f: &Frame, time: Micros, dir: &Directory, out: &mut Vec<Event>) {
        self.emit_started(out);
        let agent_of = |key: &str| f.get(key).and_then(|c| dir.agent_for_channel(c)).map(|a| a.id.clone());
        let (kind, from_agent, to_agent, to_extension) = if event == AmiEvent::BlindTransfer {
            let ext = f.get(EXTENSION).filter(|e| !e.is_empty());
            let to = ext.and_then(|e| dir.agent_for_extension(e)).map(|a| a.id.clone());
            (TransferKind::Blind, agent_of(TRANSFERER_CHANNEL), to, ext.map(str::to_string))
        } else {
            let to = agent_of(TRANSFER_TARGET_CHANNEL).or_else(|| {
                f.get(SECOND_TRANSFERER_CONNECTED_LINE_NUM)
                    .and_then(|n| dir.agent_for_extension(n))
                    .map(|a| a.id.clone())
            });
            let ext = to.as_ref().and_then(|a| dir.agent(a.as_str())).map(|a| a.extension.clone());
            (TransferKind::Attended, agent_of(ORIG_TRANSFERER_CHANNEL), to, ext)
        };
        let from_agent = from_agent.or_else(|| self.snap.agent.clone());
        match kind {
            TransferKind::Blind => {
                // The target still has to answer: the call waits again.
                self.conversation = Conversation::Waiting;
                self.wait_base = time;
            }
            TransferKind::Attended => self.conversation = Conversation::answered_by(to_agent.clone()),
        }
        self.snap_mut().agent = to_agent.clone();
        self.hung_up_by = None;
        self.emit(EventKind::Transferred { from_agent, to_agent, to_extension, kind }, time, out);
    }

    /// The PBX says the click-to-call failed (`OriginateResponse`
    /// `Reason`). A failure after the agent answered changes nothing.
    pub fn originate_failed(&mut self, reason: Option<&str>) {
        // Once the phone rang (or answered), the PBX's verdict adds nothing.
        if !matches!(self.evidence.originate, OriginateLeg::AgentAnswered | OriginateLeg::AgentRinging) {
            self.evidence.originate = OriginateLeg::unanswered(None, reason);
        }
    }

    /// What the click-to-call request said about the call, for a call the
    /// PBX started from it: the customer's number (kept even if the agent
    /// never answers and nothing is dialled) and the ticket.
    pub fn apply_originate(&mut self, number: &str, ticket: Option<&str>) {
        if self.snap.callee.number.is_none() && !number.is_empty() {
            self.snap_mut().callee.number = Some(number.into());
        }
        if self.snap.ticket_id.is_none() {
            self.snap_mut().ticket_id = ticket.map(SmolStr::from);
        }
    }

    /// The agent in conversation and the name of their channel in this
    /// call: their own phone if it is up, else the call's first channel
    /// when it is theirs (outbound), else a Local half of theirs.
    pub fn talking_agent_channel(&self) -> Option<(AgentId, String)> {
        let agent = self.conversation.agent()?.clone();
        let live = |c: &&Channel| !c.hung_up && c.agent.as_ref() == Some(&agent);
        let pick = self
            .channels
            .iter()
            .filter(live)
            .find(|c| c.role == ChannelRole::AgentPhone && c.up)
            .or_else(|| self.channels.iter().filter(live).find(|c| c.role == ChannelRole::Origin))
            .or_else(|| self.channels.iter().filter(live).find(|c| c.role == ChannelRole::AgentPhone))
            .or_else(|| self.channels.iter().filter(live).find(|c| c.role == ChannelRole::LocalHalf))?;
        Some((agent, pick.name.to_string()))
    }

    /// The helpdesk refused the caller: an inbound call not answered yet is
    /// marked so that its unanswered end is `blocked`. Returns the caller's
    /// channel (to hang up), or `None` when the call is not an inbound one
    /// waiting for an answer (answered already, outbound) or its caller's
    /// channel is gone — then nothing is marked.
    pub fn block_caller(&mut self) -> Option<String> {
        if self.snap.direction != Direction::Inbound || self.snap.answered_at.is_some() {
            return None;
        }
        let caller = self.channels.iter().find(|c| *c.uniqueid == *self.origin && !c.hung_up)?;
        let name = caller.name.to_string();
        self.evidence.helpdesk = HelpdeskVerdict::Blocked;
        Some(name)
    }

    /// Takes back [`Call::block_caller`] (the PBX did not hang up).
    pub fn unblock_caller(&mut self) {
        self.evidence.helpdesk = HelpdeskVerdict::Admitted;
    }

    /// An originate whose first channel never came up: the call exists for
    /// the helpdesk only as this failure. Gives the not yet started call
    /// its ticket and number; `finish` then emits `call.started`,
    /// `call.missed` (`failed`) and `call.ended`.
    pub fn prepare_failed_originate(&mut self, agent: Option<&Agent>, ticket: Option<String>, number: Option<String>) {
        if let Some(a) = agent {
            self.snap_mut().direction = Direction::Outbound;
            self.snap_mut().agent = Some(a.id.clone());
            self.snap_mut().caller = agent_party(a);
        }
        self.snap_mut().ticket_id = ticket.map(SmolStr::from);
        if let Some(number) = number {
            self.snap_mut().callee.number = Some(number.into());
        }
        self.evidence.originate = OriginateLeg::Failed;
    }

    pub fn mark_stuck(&mut self, detected_by: &str, now: Micros, out: &mut Vec<Event>) -> bool {
        if self.stuck == StuckReport::Reported {
            return false;
        }
        self.emit_started(out);
        self.stuck = StuckReport::Reported;
        let state = self.state();
        let silent_seconds = seconds_between(self.last_event_at, now);
        self.emit(EventKind::Stuck { state, silent_seconds, detected_by: detected_by.to_string() }, now, out);
        true
    }

    /// After a resync: offers whose ringing channels are all gone ended
    /// while nobody was looking.
    pub fn close_offers_without_channels(&mut self, time: Micros, out: &mut Vec<Event>) {
        let gone = |uid: &str| self.channels.iter().any(|c| &*c.uniqueid == uid && c.hung_up);
        let ended: Vec<AgentId> = self
            .offers
            .iter()
            .filter(|o| o.open && !o.channels.is_empty() && o.channels.iter().all(|c| gone(c)))
            .map(|o| o.agent.clone())
            .collect();
        for agent in ended {
            let reason = self.default_offer_end();
            self.close_offer(&agent, reason, time, out);
        }
    }

    /// Adopts a channel listed by `CoreShowChannels` after a (re)connection,
    /// or reconciles one the call already had (`known`).
    pub fn adopt_listed_channel(
        &mut self,
        known: bool,
        f: &Frame,
        uid: &str,
        now: Micros,
        dir: &Directory,
        out: &mut Vec<Event>,
    ) {
        let name = f.get(CHANNEL).unwrap_or("");
        self.emit_started(out);
        let mut added = Vec::new();
        let opts = SiteOptions::default();
        // A call adopted at resync arrived while callbridge was not looking:
        // nobody knows who was available then.
        let presence = PresenceMap::default();
        let mut ctx = Ctx { dir, opts: &opts, presence: &presence, new_channels: &mut added };
        self.ensure_channel(uid, name, f.get(CHANNEL_STATE_DESC), &mut ctx);
        let Some(ch) = self.channel(uid).cloned() else {
            return;
        };
        // A phone of the call known before says who answered only if it was
        // ringing for it (an open offer); a transferer's phone still in its
        // bridge says nothing new.
        let ringing_for_it = ch.agent.as_ref().is_some_and(|a| self.offers.iter().any(|o| o.open && &o.agent == a));
        let answered_unseen = !known || ringing_for_it;
        let up = f.get(CHANNEL_STATE_DESC) == Some("Up");
        let app = f.get(APPLICATION).unwrap_or("");
        // Only a call not queued before: a reconciled call that already
        // left its queue (answered) is still in `Queue()` on the PBX.
        let never_queued = self.queue.first_joined().is_none() && !self.conversation.is_talking();
        if uid == &*self.origin && app == "Queue" && never_queued {
            let queue = f.get(APPLICATION_DATA).unwrap_or("").split(',').next().unwrap_or("").to_string();
            let group = dir.group_for_queue(&queue).map(|g| g.id.clone());
            self.snap_mut().group = group.clone();
            self.snap_mut().queue = Some(queue.as_str().into());
            self.queue.join(now);
            self.emit(EventKind::Queued { group, queue, position: None }, now, out);
        }
        let bridged = f.get(BRIDGE_ID).is_some_and(|b| !b.is_empty());
        if let (ChannelRole::AgentPhone, Some(agent)) = (ch.role, ch.agent.as_ref()) {
            if up && bridged && answered_unseen {
                self.answer(Some(agent.clone()), now, out);
            } else if f.get(CHANNEL_STATE_DESC) == Some("Ringing") {
                if let Some(a) = dir.agent(agent.as_str()) {
                    self.open_offer(a, uid, false, now, out);
                }
            }
        }
        if let Some(c) = self.channel_mut(uid) {
            c.up = up;
        }
    }

    /// The business-hours reason for a call that ends unanswered.
    pub fn closed_reason(&self, rules: &dyn Rules) -> Option<MissedReason> {
        if self.snap.direction != Direction::Inbound || self.snap.answered_at.is_some() {
            return None;
        }
        let group = self.snap.group.as_ref()?;
        rules.closed_reason(group, self.queue.first_joined().unwrap_or(self.snap.started_at))
    }

    /// Why an unanswered call was missed. Inbound, the strongest of what is
    /// known wins (SPEC §4: `blocked` > `holiday` > `outside_hours` >
    /// `no_agents` > `abandoned`/`queue_timeout`): the helpdesk's refusal
    /// of the caller, the group's calendar when the call
    /// arrived (`closed`), the FastAGI router's verdict, nobody available
    /// when the call arrived, and what the queue said.
    ///
    /// A call the PBX lost (`end` is `Lost`) that nothing had decided yet
    /// (no queue verdict, no dial result) is missed as `lost`, not as
    /// `abandoned`/`cancelled`: nobody gave up, the PBX dropped it.
    fn missed_reason(&self, closed: Option<MissedReason>, end: EndReason) -> MissedReason {
        self.miss_rule(closed, end).reason()
    }

    /// Whether the call was never answered (so far).
    pub fn unanswered(&self) -> bool {
        self.snap.answered_at.is_none()
    }

    /// The rule behind [`Call::missed_reason`]: which evidence won.
    pub fn miss_rule(&self, closed: Option<MissedReason>, end: EndReason) -> MissRule {
        let dial = self.evidence.dial;
        let lost = end == EndReason::Lost;
        match self.snap.direction {
            Direction::Inbound => {
                let observed = match self.evidence.queue {
                    Some(QueueOutcome::NoAgents) => MissRule::QueueEmpty,
                    Some(QueueOutcome::Timeout) => MissRule::QueueTimeout,
                    Some(QueueOutcome::Abandoned) => MissRule::QueueAbandoned,
                    None => match dial {
                        Some(DialStatus::NoAnswer) => MissRule::DialNoAnswer,
                        Some(DialStatus::Busy) => MissRule::DialBusy,
                        _ if lost => MissRule::Lost,
                        _ => MissRule::CallerHungUp,
                    },
                };
                let nobody = (self.evidence.staffing == Staffing::NobodyAvailable).then_some(MissRule::NobodyAvailable);
                let blocked = (self.evidence.helpdesk == HelpdeskVerdict::Blocked).then_some(MissRule::Blocked);
                [
                    blocked,
                    closed.map(MissRule::Closed),
                    self.evidence.routed.map(MissRule::Routed),
                    nobody,
                    Some(observed),
                ]
                .into_iter()
                .flatten()
                .min_by_key(|r| r.reason().precedence())
                .unwrap_or(observed)
            }
            Direction::Outbound | Direction::Internal => {
                if let Some(r) = closed {
                    return MissRule::Closed(r);
                }
                match self.evidence.originate {
                    OriginateLeg::Failed | OriginateLeg::Originated => return MissRule::OriginateFailed,
                    OriginateLeg::AgentRinging => return MissRule::AgentNoAnswer,
                    OriginateLeg::NotOriginated | OriginateLeg::AgentAnswered => {}
                }
                match dial {
                    Some(DialStatus::NoAnswer) => MissRule::DialNoAnswer,
                    Some(DialStatus::Busy) => MissRule::DialBusy,
                    None if lost => MissRule::Lost,
                    Some(DialStatus::Cancel) => MissRule::DialCancelled,
                    None => MissRule::NothingDialled,
                    Some(_) => MissRule::DialFailed,
                }
            }
        }
    }

    /// Closes the call: open offers end, `call.missed` if never answered,
    /// then `call.ended`.
    pub fn finish(&mut self, time: Micros, reason: EndReason, closed: Option<MissedReason>, out: &mut Vec<Event>) {
        self.emit_started(out);
        let open: Vec<AgentId> = self.offers.iter().filter(|o| o.open).map(|o| o.agent.clone()).collect();
        for agent in open {
            let r = if reason == EndReason::Normal { self.default_offer_end() } else { OfferEndReason::Other };
            self.close_offer(&agent, r, time, out);
        }
        self.talking_end();
        let wait_from = self.queue.first_joined().unwrap_or(self.snap.started_at);
        if self.snap.answered_at.is_none() {
            let missed = self.missed_reason(closed, reason);
            self.emit(EventKind::Missed { reason: missed, wait_seconds: seconds_between(wait_from, time) }, time, out);
        }
        self.snap_mut().ended_at = Some(time);
        let started = self.snap.started_at;
        let answered = self.snap.answered_at;
        let (hangup_cause, hangup_cause_text) = match &self.cause {
            Some((c, t)) => (Some(*c), (!t.is_empty()).then(|| t.to_string())),
            None => (None, None),
        };
        let hung_up_by = match reason {
            EndReason::Normal => self.hung_up_by.unwrap_or(HungUpBy::System),
            EndReason::Removed | EndReason::Lost => HungUpBy::System,
        };
        let kind = EventKind::Ended {
            duration_seconds: seconds_between(started, time),
            talk_seconds: answered.map_or(0, |a| seconds_between(a, time)),
            wait_seconds: seconds_between(wait_from, answered.unwrap_or(time)),
            hangup_cause,
            hangup_cause_text,
            hung_up_by,
            end_reason: reason,
        };
        self.emit(kind, time, out);
    }

    fn talking_end(&mut self) {
        self.dialing = OutboundDial::Idle;
        self.queue.leave();
    }
}

fn strip_prefix(exten: &str, opts: &SiteOptions) -> SmolStr {
    if !opts.outbound_prefix.is_empty() && exten.len() > opts.outbound_prefix.len() {
        if let Some(rest) = exten.strip_prefix(opts.outbound_prefix.as_str()) {
            return rest.into();
        }
    }
    exten.into()
}

/// `MIXMONITOR_FILENAME` as the helpdesk should see it: the file name
/// appended to `url_base`, or the PBX path as is.
fn recording_location(path: &str, opts: &SiteOptions) -> String {
    match &opts.recording_url_base {
        Some(base) => {
            let file = path.rsplit('/').next().unwrap_or(path);
            if base.ends_with('/') {
                format!("{base}{file}")
            } else {
                format!("{base}/{file}")
            }
        }
        None => path.to_string(),
    }
}
