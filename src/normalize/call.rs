//! One call's bookkeeping: its channels, offers, queue outcome and snapshot.
//!
//! Only `Normalizer` drives a `Call`; this file knows how each AMI event
//! changes one call and which lifecycle events that emits.

use super::{Options, PresenceMap, Rules, ROUTE_GROUP_VARIABLE, ROUTE_REASON_VARIABLE};
use crate::ami::Frame;
use crate::directory::{is_local_channel, Agent, Directory};
use crate::event::{
    seconds_between, CallId, CallSnapshot, CallState, Direction, EndReason, Event, EventKind, HungUpBy, Micros,
    MissedReason, OfferEndReason, Party, TransferKind,
};
use crate::ids::AgentId;
use smallvec::SmallVec;
use std::collections::HashSet;

/// What a channel is to its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone)]
pub(super) struct Channel {
    uniqueid: Box<str>,
    /// Channel name (`SIP/2000-0000000f`), for actions on it (transfer).
    name: Box<str>,
    role: ChannelRole,
    agent: Option<AgentId>,
    up: bool,
    hung_up: bool,
}

#[derive(Debug, Clone)]
struct Offer {
    agent: AgentId,
    open: bool,
    channels: SmallVec<[Box<str>; 3]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueOutcome {
    Abandoned,
    Timeout,
    NoAgents,
}

/// Borrowed context for one `Call::handle`.
pub(super) struct Ctx<'a> {
    pub dir: &'a Directory,
    pub opts: &'a Options,
    /// Agent presence now (for "was anybody available when the call arrived").
    pub presence: &'a PresenceMap,
    /// Channels this event added to the call (the normalizer indexes them).
    pub new_channels: &'a mut Vec<Box<str>>,
}

pub(super) struct Call {
    pub id: CallId,
    seq: u64,
    snap: CallSnapshot,
    channels: SmallVec<[Channel; 6]>,
    origin: Box<str>,
    pub last_event_at: Micros,
    /// The normalizer's resync epoch at this call's last event.
    pub epoch: u64,
    queued_at: Option<Micros>,
    queue_app: Option<String>,
    in_queue: bool,
    queue_outcome: Option<QueueOutcome>,
    /// No agent of the call's group was available when the call arrived in
    /// it: an unanswered end is `no_agents`, whatever the queue said.
    nobody_available: bool,
    /// The FastAGI router's missed reason (`CALLBRIDGE_REASON`), until the
    /// call joins a queue after all.
    routed_reason: Option<MissedReason>,
    offers: SmallVec<[Offer; 4]>,
    /// The agent in conversation now (`None` after a blind transfer until
    /// the target answers).
    talking: Option<Option<AgentId>>,
    /// When the current wait started (queue join, start, or a transfer).
    wait_base: Micros,
    dialing: bool,
    last_dial_status: Option<String>,
    originate_failed: bool,
    caller_hung_up: bool,
    hung_up_by: Option<HungUpBy>,
    cause: Option<(u32, String)>,
    stuck_reported: bool,
    /// `call.started` waits for the ticket variable on originated calls.
    started_emitted: bool,
    /// The state as of the last event, and since when.
    state_seen: CallState,
    pub state_since: Micros,
}

fn is_dialable(exten: &str) -> bool {
    !exten.is_empty() && exten.bytes().all(|c| c.is_ascii_digit() || matches!(c, b'+' | b'*' | b'#'))
}

fn known(s: Option<&str>) -> Option<String> {
    s.filter(|v| !v.is_empty() && *v != "<unknown>").map(str::to_string)
}

fn status_is(s: Option<&str>, v: &str) -> bool {
    s.is_some_and(|x| x.eq_ignore_ascii_case(v))
}

impl Call {
    /// Creates a call from its first channel and emits `call.started`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        id: CallId,
        frame: &Frame,
        channel: &str,
        uniqueid: &str,
        time: Micros,
        dir: &Directory,
        opts: &Options,
        out: &mut Vec<Event>,
    ) -> Call {
        let agent = dir.agent_for_channel(channel);
        let exten = frame.get("Exten").unwrap_or("");
        let (direction, caller, callee, snap_agent) = match agent {
            Some(a) => {
                let caller = Party { number: Some(a.extension.clone()), name: a.name.clone() };
                match dir.agent_for_extension(exten) {
                    Some(b) => (
                        Direction::Internal,
                        caller,
                        Party { number: Some(b.extension.clone()), name: b.name.clone() },
                        Some(a.id.clone()),
                    ),
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
                Party { number: known(frame.get("CallerIDNum")), name: known(frame.get("CallerIDName")) },
                Party { number: is_dialable(exten).then(|| exten.to_string()), name: None },
                None,
            ),
        };
        let mut call = Call {
            id: id.clone(),
            seq: 0,
            snap: CallSnapshot {
                id,
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
            },
            channels: SmallVec::new(),
            origin: uniqueid.into(),
            last_event_at: time,
            epoch: 0,
            queued_at: None,
            queue_app: None,
            in_queue: false,
            queue_outcome: None,
            nobody_available: false,
            routed_reason: None,
            offers: SmallVec::new(),
            talking: None,
            wait_base: time,
            dialing: false,
            last_dial_status: None,
            originate_failed: false,
            caller_hung_up: false,
            hung_up_by: None,
            cause: None,
            stuck_reported: false,
            started_emitted: false,
            state_seen: CallState::Started,
            state_since: time,
        };
        call.channels.push(Channel {
            uniqueid: uniqueid.into(),
            name: channel.into(),
            role: ChannelRole::Origin,
            agent: agent.map(|a| a.id.clone()),
            up: frame.get("ChannelStateDesc") == Some("Up"),
            hung_up: false,
        });
        // An originated call (the agent's phone rung by `Originate`, no
        // number dialled yet) carries its ticket in a channel variable set
        // right after the channel is created: start it on the next event so
        // that `call.started` already shows the ticket.
        let originated = direction == Direction::Outbound && !is_dialable(exten);
        if !originated {
            call.emit_started(out);
        }
        call
    }

    fn emit_started(&mut self, out: &mut Vec<Event>) {
        if !self.started_emitted {
            self.started_emitted = true;
            let t = self.snap.started_at;
            self.emit(EventKind::Started {}, t, out);
        }
    }

    fn emit(&mut self, kind: EventKind, time: Micros, out: &mut Vec<Event>) {
        self.seq += 1;
        self.snap.state = self.state();
        out.push(Event { seq: self.seq, time, kind, call: Some(self.snap.clone()) });
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
        self.stuck_reported
    }

    pub(super) fn state(&self) -> CallState {
        if self.snap.ended_at.is_some() {
            CallState::Ended
        } else if self.talking.is_some() {
            CallState::Talking
        } else if self.offers.iter().any(|o| o.open) || self.dialing {
            CallState::Ringing
        } else if self.in_queue {
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
        self.channels.push(Channel {
            uniqueid: uid.into(),
            name: name.into(),
            role,
            agent,
            up: state == Some("Up"),
            hung_up: false,
        });
        ctx.new_channels.push(uid.into());
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

    /// Handles one event of this call. Returns true when its last channel
    /// hung up.
    pub fn handle(&mut self, event: &str, f: &Frame, time: Micros, mut ctx: Ctx<'_>, out: &mut Vec<Event>) -> bool {
        if !self.started_emitted && !matches!(event, "Newchannel" | "VarSet" | "Newexten" | "Rename") {
            self.emit_started(out);
        }
        let uid = f.get("Uniqueid").unwrap_or("");
        if let Some(name) = f.get("Channel") {
            self.ensure_channel(uid, name, f.get("ChannelStateDesc"), &mut ctx);
        }
        let dest_uid = f.get("DestUniqueid").unwrap_or("");
        if let Some(dest) = f.get("DestChannel") {
            if f.get("DestLinkedid").is_none_or(|l| l == self.id.as_str()) {
                self.ensure_channel(dest_uid, dest, f.get("DestChannelStateDesc"), &mut ctx);
            }
        }
        match event {
            "BridgeEnter" => {
                if let Some(c) = self.channel_mut(uid) {
                    c.up = true;
                }
            }
            "Newstate" => {
                let up = f.get("ChannelStateDesc") == Some("Up");
                if let Some(c) = self.channel_mut(uid) {
                    c.up = up;
                }
            }
            "Newexten" if uid == &*self.origin && f.get("Application") == Some("Queue") => {
                let queue = f.get("AppData").unwrap_or("").split(',').next().unwrap_or("").trim();
                if !queue.is_empty() {
                    self.queue_app = Some(queue.to_string());
                }
            }
            "VarSet" => self.on_varset(f, uid, &ctx),
            "QueueCallerJoin" => {
                let queue = f.get("Queue").unwrap_or("").to_string();
                let dir_group = ctx.dir.group_for_queue(&queue);
                self.nobody_available = dir_group.is_some_and(|g| !ctx.presence.group_has_available_agent(g));
                self.routed_reason = None;
                let group = dir_group.map(|g| g.id.clone());
                let position = f.get("Position").and_then(|p| p.parse().ok());
                self.snap.group = group.clone();
                self.snap.queue = Some(queue.clone());
                self.queued_at.get_or_insert(time);
                if self.talking.is_none() {
                    self.wait_base = *self.queued_at.as_ref().unwrap_or(&time);
                }
                self.in_queue = true;
                self.queue_outcome = None;
                self.emit(EventKind::Queued { group, queue, position }, time, out);
            }
            "QueueCallerLeave" => self.in_queue = false,
            "QueueCallerAbandon" => {
                self.in_queue = false;
                self.queue_outcome = Some(QueueOutcome::Abandoned);
            }
            "AgentCalled" => {
                let agent = ctx
                    .dir
                    .agent_for_member(f.get("Interface"), f.get("StateInterface"), f.get("MemberName"))
                    .or_else(|| f.get("DestChannel").and_then(|d| ctx.dir.agent_for_channel(d)));
                if let Some(agent) = agent {
                    self.open_offer(agent, dest_uid, true, time, out);
                }
            }
            "AgentRingNoAnswer" => {
                if let Some(a) = self.member_agent(f, ctx.dir) {
                    self.close_offer(&a, OfferEndReason::NoAnswer, time, out);
                }
            }
            "AgentDump" => {
                if let Some(a) = self.member_agent(f, ctx.dir) {
                    self.close_offer(&a, OfferEndReason::Other, time, out);
                }
            }
            "AgentConnect" => {
                let agent = self.member_agent(f, ctx.dir);
                self.answer(agent, time, out);
            }
            "DialBegin" => self.on_dial_begin(f, uid, dest_uid, ctx.dir, ctx.opts, time, out),
            "DialEnd" => self.on_dial_end(f, uid, dest_uid, time, out),
            "HangupRequest" => self.on_hangup_request(uid),
            "Hangup" => return self.on_hangup(f, uid, time, out),
            _ => {}
        }
        false
    }

    fn member_agent(&self, f: &Frame, dir: &Directory) -> Option<AgentId> {
        dir.agent_for_member(f.get("Interface"), f.get("StateInterface"), f.get("MemberName"))
            .map(|a| a.id.clone())
            .or_else(|| f.get("DestUniqueid").and_then(|u| self.channel(u)).and_then(|c| c.agent.clone()))
    }

    fn on_varset(&mut self, f: &Frame, uid: &str, ctx: &Ctx<'_>) {
        let (dir, opts) = (ctx.dir, ctx.opts);
        let (Some(var), Some(value)) = (f.get("Variable"), f.get("Value")) else {
            return;
        };
        if var == opts.ticket_variable {
            self.snap.ticket_id = (!value.is_empty()).then(|| value.to_string());
        } else if var == "MIXMONITOR_FILENAME" && !value.is_empty() {
            self.snap.recording = Some(recording_location(value, opts));
        } else if var == "QUEUESTATUS" && uid == &*self.origin {
            let outcome = match value {
                "TIMEOUT" => Some(QueueOutcome::Timeout),
                "JOINEMPTY" | "LEAVEEMPTY" | "JOINUNAVAIL" | "LEAVEUNAVAIL" | "FULL" => Some(QueueOutcome::NoAgents),
                _ => None,
            };
            if let Some(o) = outcome {
                self.queue_outcome = Some(o);
                self.in_queue = false;
                if self.queued_at.is_none() {
                    // Never joined: the queue is the one the dialplan asked for.
                    if let Some(q) = self.queue_app.clone() {
                        let group = dir.group_for_queue(&q);
                        self.nobody_available = group.is_some_and(|g| !ctx.presence.group_has_available_agent(g));
                        self.snap.group = group.map(|g| g.id.clone());
                        self.snap.queue = Some(q);
                    }
                }
            }
        } else if var == ROUTE_GROUP_VARIABLE && uid == &*self.origin {
            // The FastAGI router's answer, seen through the PBX: a call sent
            // to "missed" never joins a queue but belongs to this group.
            if self.queued_at.is_none() {
                if let Some(g) = dir.group(value) {
                    self.snap.group = Some(g.id.clone());
                }
            }
        } else if var == ROUTE_REASON_VARIABLE && uid == &*self.origin {
            self.routed_reason = match value {
                "holiday" => Some(MissedReason::Holiday),
                "outside_hours" => Some(MissedReason::OutsideHours),
                "no_agents" => Some(MissedReason::NoAgents),
                _ => None,
            };
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_dial_begin(
        &mut self,
        f: &Frame,
        src: &str,
        dest: &str,
        dir: &Directory,
        opts: &Options,
        time: Micros,
        out: &mut Vec<Event>,
    ) {
        if dest == &*self.origin {
            // Originate: the PBX rings the agent's own phone first.
            return;
        }
        let dest_agent = self.channel(dest).and_then(|c| c.agent.clone());
        if let Some(agent) = dest_agent.as_ref().and_then(|a| dir.agent(a.as_str())) {
            self.open_offer(agent, dest, false, time, out);
            if src == &*self.origin {
                self.last_dial_status = None;
            }
            return;
        }
        if src == &*self.origin && self.snap.direction != Direction::Inbound {
            // The agent's phone dials the customer.
            self.dialing = true;
            self.last_dial_status = None;
            if self.snap.callee.number.is_none() || self.snap.direction == Direction::Outbound {
                let number = f
                    .get("Exten")
                    .filter(|e| is_dialable(e))
                    .map(|e| strip_prefix(e, opts))
                    .or_else(|| f.get("DialString").and_then(|d| d.rsplit('/').next()).map(str::to_string));
                if number.is_some() {
                    self.snap.callee.number = number;
                }
            }
        }
    }

    fn on_dial_end(&mut self, f: &Frame, src: &str, dest: &str, time: Micros, out: &mut Vec<Event>) {
        let status = f.get("DialStatus");
        if dest == &*self.origin {
            if !status_is(status, "ANSWER") {
                self.originate_failed = true;
            }
            return;
        }
        if src == &*self.origin {
            if let Some(s) = status {
                self.last_dial_status = Some(s.to_ascii_uppercase());
            }
        }
        let dest_agent = self.channel(dest).and_then(|c| c.agent.clone());
        if let Some(agent) = dest_agent {
            if !self.offers.iter().any(|o| o.open && o.agent == agent) {
                return;
            }
            match status.unwrap_or("") {
                "ANSWER" => self.answer(Some(agent), time, out),
                "NOANSWER" => self.close_offer(&agent, OfferEndReason::NoAnswer, time, out),
                "CANCEL" => {
                    let reason = if self.caller_hung_up {
                        OfferEndReason::CallerHungUp
                    } else if self.talking.is_some() {
                        OfferEndReason::AnsweredElsewhere
                    } else {
                        OfferEndReason::NoAnswer
                    };
                    self.close_offer(&agent, reason, time, out)
                }
                _ => self.close_offer(&agent, OfferEndReason::Other, time, out),
            }
            return;
        }
        if src == &*self.origin && self.snap.direction != Direction::Inbound {
            self.dialing = false;
            if status_is(status, "ANSWER") {
                if let Some(c) = self.channel_mut(dest) {
                    c.up = true;
                }
                let agent = self.snap.agent.clone();
                self.answer(agent, time, out);
            }
        }
    }

    fn on_hangup_request(&mut self, uid: &str) {
        let Some(ch) = self.channel(uid) else { return };
        let party = match ch.role {
            ChannelRole::LocalHalf => None,
            ChannelRole::Origin if self.snap.direction == Direction::Inbound => Some(HungUpBy::Caller),
            ChannelRole::Origin => Some(HungUpBy::Agent),
            ChannelRole::AgentPhone
                if ch.up || self.talking.as_ref().is_some_and(|t| t.is_some() && *t == ch.agent) =>
            {
                Some(HungUpBy::Agent)
            }
            ChannelRole::External if ch.up => Some(HungUpBy::Customer),
            _ => None,
        };
        if ch.role == ChannelRole::Origin {
            self.caller_hung_up = true;
        }
        if self.hung_up_by.is_none() {
            self.hung_up_by = party;
        }
    }

    fn on_hangup(&mut self, f: &Frame, uid: &str, time: Micros, out: &mut Vec<Event>) -> bool {
        let cause = f.get("Cause").and_then(|c| c.parse::<u32>().ok());
        let is_origin = uid == &*self.origin;
        if let Some(c) = cause {
            if c != 0 && (is_origin || self.cause.is_none()) {
                self.cause = Some((c, f.get("Cause-txt").unwrap_or("").to_string()));
            }
        }
        if is_origin {
            self.caller_hung_up = true;
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
        self.live_channel_count() == 0
    }

    fn default_offer_end(&self) -> OfferEndReason {
        if self.talking.is_some() {
            OfferEndReason::AnsweredElsewhere
        } else if self.caller_hung_up {
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
        if self.talking.as_ref().is_some_and(|t| t.as_ref() == Some(&agent.id)) {
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
        if let Some(current) = &self.talking {
            if *current == agent || agent.is_none() {
                return;
            }
        }
        // The answering agent's offer ends by being answered (no event);
        // everybody else's ringing stops.
        if let Some(a) = &agent {
            if let Some(o) = self.offers.iter_mut().find(|o| o.open && &o.agent == a) {
                o.open = false;
            }
        }
        self.talking = Some(agent.clone());
        self.dialing = false;
        self.in_queue = false;
        self.snap.answered_at.get_or_insert(time);
        if agent.is_some() {
            self.snap.agent = agent.clone();
        }
        self.hung_up_by = None;
        let wait_seconds = seconds_between(self.wait_base, time);
        self.emit(EventKind::Answered { agent, wait_seconds }, time, out);
        let others: Vec<AgentId> = self.offers.iter().filter(|o| o.open).map(|o| o.agent.clone()).collect();
        for other in others {
            self.close_offer(&other, OfferEndReason::AnsweredElsewhere, time, out);
        }
    }

    pub fn on_transfer(&mut self, event: &str, f: &Frame, time: Micros, dir: &Directory, out: &mut Vec<Event>) {
        self.emit_started(out);
        let agent_of = |key: &str| f.get(key).and_then(|c| dir.agent_for_channel(c)).map(|a| a.id.clone());
        let (kind, from_agent, to_agent, to_extension) = if event == "BlindTransfer" {
            let ext = f.get("Extension").filter(|e| !e.is_empty());
            let to = ext.and_then(|e| dir.agent_for_extension(e)).map(|a| a.id.clone());
            (TransferKind::Blind, agent_of("TransfererChannel"), to, ext.map(str::to_string))
        } else {
            let to = agent_of("TransferTargetChannel").or_else(|| {
                f.get("SecondTransfererConnectedLineNum").and_then(|n| dir.agent_for_extension(n)).map(|a| a.id.clone())
            });
            let ext = to.as_ref().and_then(|a| dir.agent(a.as_str())).map(|a| a.extension.clone());
            (TransferKind::Attended, agent_of("OrigTransfererChannel"), to, ext)
        };
        let from_agent = from_agent.or_else(|| self.snap.agent.clone());
        match kind {
            TransferKind::Blind => {
                // The target still has to answer: the call waits again.
                self.talking = None;
                self.wait_base = time;
            }
            TransferKind::Attended => self.talking = Some(to_agent.clone()),
        }
        self.snap.agent = to_agent.clone();
        self.hung_up_by = None;
        self.emit(EventKind::Transferred { from_agent, to_agent, to_extension, kind }, time, out);
    }

    pub fn originate_failed(&mut self) {
        self.originate_failed = true;
    }

    /// The agent in conversation and the name of their channel in this
    /// call: their own phone if it is up, else the call's first channel
    /// when it is theirs (outbound), else a Local half of theirs.
    pub fn talking_agent_channel(&self) -> Option<(AgentId, String)> {
        let agent = self.talking.clone().flatten()?;
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

    /// An originate whose first channel never came up: the call exists for
    /// the helpdesk only as this failure. Gives the not yet started call
    /// its ticket and number; `finish` then emits `call.started`,
    /// `call.missed` (`failed`) and `call.ended`.
    pub fn prepare_failed_originate(&mut self, agent: Option<&Agent>, ticket: Option<String>, number: Option<String>) {
        if let Some(a) = agent {
            self.snap.direction = Direction::Outbound;
            self.snap.agent = Some(a.id.clone());
            self.snap.caller = Party { number: Some(a.extension.clone()), name: a.name.clone() };
        }
        self.snap.ticket_id = ticket;
        if number.is_some() {
            self.snap.callee.number = number;
        }
        self.originate_failed = true;
    }

    pub fn mark_stuck(&mut self, detected_by: &str, now: Micros, out: &mut Vec<Event>) -> bool {
        if self.stuck_reported {
            return false;
        }
        self.emit_started(out);
        self.stuck_reported = true;
        let state = self.state();
        let silent_seconds = seconds_between(self.last_event_at, now);
        self.emit(EventKind::Stuck { state, silent_seconds, detected_by: detected_by.to_string() }, now, out);
        true
    }

    /// Adopts a channel listed by `CoreShowChannels` after a (re)connection.
    pub fn adopt_listed_channel(
        &mut self,
        f: &Frame,
        name: &str,
        uid: &str,
        now: Micros,
        dir: &Directory,
        out: &mut Vec<Event>,
    ) {
        self.emit_started(out);
        let mut added = Vec::new();
        let opts = Options::default();
        // A call adopted at resync arrived while callbridge was not looking:
        // nobody knows who was available then.
        let presence = PresenceMap::default();
        let mut ctx = Ctx { dir, opts: &opts, presence: &presence, new_channels: &mut added };
        self.ensure_channel(uid, name, f.get("ChannelStateDesc"), &mut ctx);
        let Some(ch) = self.channel(uid).cloned() else {
            return;
        };
        let up = f.get("ChannelStateDesc") == Some("Up");
        let app = f.get("Application").unwrap_or("");
        if uid == &*self.origin && app == "Queue" && !self.in_queue {
            let queue = f.get("ApplicationData").unwrap_or("").split(',').next().unwrap_or("").to_string();
            let group = dir.group_for_queue(&queue).map(|g| g.id.clone());
            self.snap.group = group.clone();
            self.snap.queue = Some(queue.clone());
            self.queued_at.get_or_insert(now);
            self.in_queue = true;
            self.emit(EventKind::Queued { group, queue, position: None }, now, out);
        }
        let bridged = f.get("BridgeId").is_some_and(|b| !b.is_empty());
        if let (ChannelRole::AgentPhone, Some(agent)) = (ch.role, ch.agent.as_ref()) {
            if up && bridged {
                self.answer(Some(agent.clone()), now, out);
            } else if f.get("ChannelStateDesc") == Some("Ringing") {
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
        rules.closed_reason(group, self.queued_at.unwrap_or(self.snap.started_at))
    }

    /// Why an unanswered call was missed. Inbound, the strongest of what is
    /// known wins (SPEC §4: `holiday` > `outside_hours` > `no_agents` >
    /// `abandoned`/`queue_timeout`): the group's calendar when the call
    /// arrived (`closed`), the FastAGI router's verdict, nobody available
    /// when the call arrived, and what the queue said.
    fn missed_reason(&self, closed: Option<MissedReason>) -> MissedReason {
        let dial = self.last_dial_status.as_deref();
        match self.snap.direction {
            Direction::Inbound => {
                let observed = match self.queue_outcome {
                    Some(QueueOutcome::NoAgents) => MissedReason::NoAgents,
                    Some(QueueOutcome::Timeout) => MissedReason::QueueTimeout,
                    Some(QueueOutcome::Abandoned) => MissedReason::Abandoned,
                    None => match dial {
                        Some("NOANSWER") => MissedReason::NoAnswer,
                        Some("BUSY") => MissedReason::Busy,
                        _ => MissedReason::Abandoned,
                    },
                };
                let nobody = self.nobody_available.then_some(MissedReason::NoAgents);
                [closed, self.routed_reason, nobody, Some(observed)]
                    .into_iter()
                    .flatten()
                    .min_by_key(|r| r.precedence())
                    .unwrap_or(observed)
            }
            Direction::Outbound | Direction::Internal => {
                if let Some(r) = closed {
                    return r;
                }
                if self.originate_failed {
                    return MissedReason::Failed;
                }
                match dial {
                    Some("NOANSWER") => MissedReason::NoAnswer,
                    Some("BUSY") => MissedReason::Busy,
                    Some("CANCEL") | None => MissedReason::Cancelled,
                    Some(_) => MissedReason::Failed,
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
        let wait_from = self.queued_at.unwrap_or(self.snap.started_at);
        if self.snap.answered_at.is_none() {
            let missed = self.missed_reason(closed);
            self.emit(EventKind::Missed { reason: missed, wait_seconds: seconds_between(wait_from, time) }, time, out);
        }
        self.snap.ended_at = Some(time);
        let started = self.snap.started_at;
        let answered = self.snap.answered_at;
        let (hangup_cause, hangup_cause_text) = match &self.cause {
            Some((c, t)) => (Some(*c), (!t.is_empty()).then(|| t.clone())),
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
        self.dialing = false;
        self.in_queue = false;
    }
}

fn strip_prefix(exten: &str, opts: &Options) -> String {
    if !opts.outbound_prefix.is_empty() && exten.len() > opts.outbound_prefix.len() {
        if let Some(rest) = exten.strip_prefix(opts.outbound_prefix.as_str()) {
            return rest.to_string();
        }
    }
    exten.to_string()
}

/// `MIXMONITOR_FILENAME` as the helpdesk should see it: the file name
/// appended to `url_base`, or the PBX path as is.
fn recording_location(path: &str, opts: &Options) -> String {
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
