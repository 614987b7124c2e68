//! The helpdesk's call lifecycle (SPEC §4) and its CloudEvents envelope (§5).
//!
//! [`Event`] is what the normalizer emits and what the outbox stores and the
//! sinks deliver. Its JSON form ([`Event::to_cloudevent_json`]) is the
//! contract with the helpdesk: field names here are public API.
//!
//! Event ids are deterministic: `<pbx>:<call id>:<seq>` for call events, so a
//! replay or a redelivery produces the same ids; agent events, which belong to
//! no call, use `<pbx>:agent:<agent id>:<PBX time in µs>`.

pub use crate::ids::{AgentId, CallId, GroupId};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// Microseconds since the Unix epoch (the PBX's clock).
pub type Micros = i64;

/// Formats a PBX time as RFC 3339 UTC with milliseconds.
pub fn format_time(t: Micros) -> String {
    match jiff::Timestamp::from_microsecond(t) {
        Ok(ts) => format!("{ts:.3}"),
        Err(_) => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

/// Seconds between two PBX times, rounded to the nearest second (never
/// negative).
pub fn seconds_between(from: Micros, to: Micros) -> u64 {
    u64::try_from(((to - from).max(0) + 500_000) / 1_000_000).unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Inbound,
    Outbound,
    Internal,
}

/// Where a call stands now (for the API, indicators and the stuck-call sweeper).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallState {
    /// Started, not (yet) in a queue nor ringing an agent (IVR, dialling).
    Started,
    /// Waiting in a queue, no agent phone ringing.
    Queued,
    /// An agent's phone (or the customer's, outbound) is ringing.
    Ringing,
    /// In conversation.
    Talking,
    Ended,
}

impl CallState {
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Started => "started",
            CallState::Queued => "queued",
            CallState::Ringing => "ringing",
            CallState::Talking => "talking",
            CallState::Ended => "ended",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    pub number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A call as the helpdesk sees it after an event (`data.call`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallSnapshot {
    pub id: CallId,
    pub direction: Direction,
    pub state: CallState,
    pub caller: Party,
    pub callee: Party,
    pub group: Option<GroupId>,
    pub queue: Option<String>,
    pub agent: Option<AgentId>,
    pub ticket_id: Option<String>,
    #[serde(serialize_with = "ser_time")]
    pub started_at: Micros,
    #[serde(serialize_with = "ser_opt_time")]
    pub answered_at: Option<Micros>,
    #[serde(serialize_with = "ser_opt_time")]
    pub ended_at: Option<Micros>,
    pub recording: Option<String>,
    /// How the FastAGI router moved the call away from the group asked
    /// for (overflow, or the caller's identity); absent when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<CallRouting>,
    /// What the helpdesk said about the caller's number when the router
    /// looked it up (`[caller_lookup]`); absent when it did not ask, or
    /// got no answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller_lookup: Option<CallerLookup>,
}

/// Why the router sent a call to another group than the one asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingReason {
    /// The group asked for was closed, on holiday or had nobody available:
    /// its overflow list took the call.
    Overflow,
    /// No contact has the caller's number: `redirect_unknown_to`.
    CallerUnknown,
    /// The caller's contact is inactive: `redirect_inactive_to`.
    CallerInactive,
}

impl RoutingReason {
    pub const ALL: [RoutingReason; 3] =
        [RoutingReason::Overflow, RoutingReason::CallerUnknown, RoutingReason::CallerInactive];

    pub fn as_str(self) -> &'static str {
        match self {
            RoutingReason::Overflow => "overflow",
            RoutingReason::CallerUnknown => "caller_unknown",
            RoutingReason::CallerInactive => "caller_inactive",
        }
    }

    pub fn parse(s: &str) -> Option<RoutingReason> {
        RoutingReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// A redirect by who is calling (not an overflow).
    pub fn is_redirect(self) -> bool {
        matches!(self, RoutingReason::CallerUnknown | RoutingReason::CallerInactive)
    }
}

/// The router's last move of a call (`data.call.routing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRouting {
    pub reason: RoutingReason,
    /// The group whose rule moved the call: the group asked for
    /// (overflow), or the group that would have taken it but redirects
    /// such callers.
    pub from_group: Option<GroupId>,
}

/// The helpdesk's answer about the caller's number (`data.call.caller_lookup`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerLookup {
    /// A contact has this number.
    pub found: bool,
    /// Whether that contact is active (`null` when not found, or when the
    /// helpdesk did not say).
    pub active: Option<bool>,
    /// The helpdesk's id of the contact.
    pub contact_id: Option<String>,
}

fn ser_time<S: Serializer>(t: &Micros, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*t))
}

fn ser_opt_time<S: Serializer>(t: &Option<Micros>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&format_time(*t)),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OfferEndReason {
    NoAnswer,
    AnsweredElsewhere,
    CallerHungUp,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedReason {
    OutsideHours,
    Holiday,
    NoAgents,
    Abandoned,
    QueueTimeout,
    NoAnswer,
    Busy,
    Cancelled,
    Failed,
    /// The PBX lost the call (crash, restart) while it was queued or
    /// ringing: found gone at a resync or by the stuck-call check.
    Lost,
    /// A click-to-call whose agent never answered their own phone.
    AgentNoAnswer,
    /// The helpdesk refused the caller (Zammad's blocked caller ids) and
    /// callbridge hung the call up.
    Blocked,
}

impl MissedReason {
    /// Every reason, in the precedence table's order of declaration.
    pub const ALL: [MissedReason; 12] = [
        MissedReason::OutsideHours,
        MissedReason::Holiday,
        MissedReason::NoAgents,
        MissedReason::Abandoned,
        MissedReason::QueueTimeout,
        MissedReason::NoAnswer,
        MissedReason::Busy,
        MissedReason::Cancelled,
        MissedReason::Failed,
        MissedReason::Lost,
        MissedReason::AgentNoAnswer,
        MissedReason::Blocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MissedReason::OutsideHours => "outside_hours",
            MissedReason::Holiday => "holiday",
            MissedReason::NoAgents => "no_agents",
            MissedReason::Abandoned => "abandoned",
            MissedReason::QueueTimeout => "queue_timeout",
            MissedReason::NoAnswer => "no_answer",
            MissedReason::Busy => "busy",
            MissedReason::Cancelled => "cancelled",
            MissedReason::Failed => "failed",
            MissedReason::Lost => "lost",
            MissedReason::AgentNoAnswer => "agent_no_answer",
            MissedReason::Blocked => "blocked",
        }
    }

    /// Rank in SPEC §4's precedence, strongest first: `blocked` (0) >
    /// `holiday` (1) > `outside_hours` (2) > `no_agents` (3) > everything
    /// else (4), which describes what happened to a call that was
    /// deliverable. `blocked` comes first: the helpdesk refused the caller
    /// and callbridge hung up, so neither the hours nor the staffing is why
    /// the call went unanswered — and a blocked caller must not land in the
    /// call-backs a missed-call list asks for.
    pub fn precedence(self) -> u8 {
        match self {
            MissedReason::Blocked => 0,
            MissedReason::Holiday => 1,
            MissedReason::OutsideHours => 2,
            MissedReason::NoAgents => 3,
            _ => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    Blind,
    Attended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HungUpBy {
    Caller,
    Agent,
    Customer,
    System,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Normal,
    Removed,
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AvailabilitySource {
    Pbx,
    Api,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineState {
    Idle,
    Ringing,
    Busy,
}

/// The type-specific part of an event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventKind {
    Started {},
    Queued {
        group: Option<GroupId>,
        queue: String,
        position: Option<u32>,
    },
    Offered {
        agent: AgentId,
        extension: String,
    },
    OfferEnded {
        agent: AgentId,
        reason: OfferEndReason,
    },
    Answered {
        agent: Option<AgentId>,
        wait_seconds: u64,
    },
    Transferred {
        from_agent: Option<AgentId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to_agent: Option<AgentId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to_extension: Option<String>,
        kind: TransferKind,
    },
    Missed {
        reason: MissedReason,
        wait_seconds: u64,
    },
    Stuck {
        state: CallState,
        silent_seconds: u64,
        detected_by: String,
    },
    Ended {
        duration_seconds: u64,
        talk_seconds: u64,
        wait_seconds: u64,
        hangup_cause: Option<u32>,
        hangup_cause_text: Option<String>,
        hung_up_by: HungUpBy,
        end_reason: EndReason,
    },
    AgentAvailability {
        agent: AgentId,
        available: bool,
        reason: Option<String>,
        source: AvailabilitySource,
    },
    AgentLine {
        agent: AgentId,
        state: LineState,
        #[serde(skip_serializing_if = "Option::is_none")]
        remote: Option<String>,
    },
}

impl EventKind {
    /// Every CloudEvents `type` callbridge emits.
    pub const TYPE_NAMES: [&'static str; 11] = [
        "call.started",
        "call.queued",
        "call.offered",
        "call.offer_ended",
        "call.answered",
        "call.transferred",
        "call.missed",
        "call.stuck",
        "call.ended",
        "agent.availability",
        "agent.line",
    ];

    /// The CloudEvents `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::Started {} => "call.started",
            EventKind::Queued { .. } => "call.queued",
            EventKind::Offered { .. } => "call.offered",
            EventKind::OfferEnded { .. } => "call.offer_ended",
            EventKind::Answered { .. } => "call.answered",
            EventKind::Transferred { .. } => "call.transferred",
            EventKind::Missed { .. } => "call.missed",
            EventKind::Stuck { .. } => "call.stuck",
            EventKind::Ended { .. } => "call.ended",
            EventKind::AgentAvailability { .. } => "agent.availability",
            EventKind::AgentLine { .. } => "agent.line",
        }
    }
}

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Per call: 1, 2, 3… without gaps. 0 for agent events.
    pub seq: u64,
    /// PBX time of the event.
    pub time: Micros,
    pub kind: EventKind,
    /// The call after this event; `None` for agent events.
    pub call: Option<CallSnapshot>,
}

impl Event {
    /// Events of one key must be delivered in order; different keys are
    /// independent. Call events: the call id; agent events: the agent.
    pub fn ordering_key(&self) -> String {
        match (&self.call, &self.kind) {
            (Some(c), _) => c.id.to_string(),
            (None, EventKind::AgentAvailability { agent, .. } | EventKind::AgentLine { agent, .. }) => {
                format!("agent:{agent}")
            }
            (None, _) => String::new(),
        }
    }

    /// The deterministic CloudEvents `id`.
    pub fn id(&self, pbx: &str) -> String {
        match (&self.call, &self.kind) {
            (Some(c), _) => format!("{pbx}:{}:{}", c.id, self.seq),
            // `seq` tells apart events of one agent in the same µs
            // ([`AgentIds`]); the first keeps the plain form.
            (None, EventKind::AgentAvailability { agent, .. } | EventKind::AgentLine { agent, .. }) => match self.seq {
                0 => format!("{pbx}:agent:{agent}:{}", self.time),
                n => format!("{pbx}:agent:{agent}:{}:{n}", self.time),
            },
            (None, _) => format!("{pbx}:event:{}", self.time),
        }
    }

    /// The event in CloudEvents 1.0 structured JSON (one line).
    pub fn to_cloudevent_json(&self, pbx: &str) -> String {
        let envelope = Envelope { event: self, pbx };
        // Serializing plain data into a String cannot fail.
        serde_json::to_string(&envelope).unwrap_or_default()
    }
}

struct Envelope<'a> {
    event: &'a Event,
    pbx: &'a str,
}

impl Serialize for Envelope<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(7))?;
        m.serialize_entry("specversion", "1.0")?;
        m.serialize_entry("id", &self.event.id(self.pbx))?;
        m.serialize_entry("source", &format!("callbridge/{}", self.pbx))?;
        m.serialize_entry("type", self.event.kind.type_name())?;
        m.serialize_entry("time", &format_time(self.event.time))?;
        m.serialize_entry("datacontenttype", "application/json")?;
        m.serialize_entry("data", &Data(self.event))?;
        m.end()
    }
}

struct Data<'a>(&'a Event);

impl Serialize for Data<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Flatten `seq`, `call` and the type-specific fields into one object.
        let kind = serde_json::to_value(&self.0.kind).map_err(serde::ser::Error::custom)?;
        let mut m = s.serialize_map(None)?;
        if self.0.call.is_some() {
            m.serialize_entry("seq", &self.0.seq)?;
            m.serialize_entry("call", &self.0.call)?;
        }
        if let serde_json::Value::Object(fields) = kind {
            for (k, v) in fields {
                m.serialize_entry(&k, &v)?;
            }
        }
        m.end()
    }
}

/// Makes agent event ids unique by construction: the id of an agent event
/// is `<pbx>:agent:<agent>:<µs>`, and a pause and an unpause (or two line
/// changes) of one agent can carry the same PBX microsecond. The second and
/// later events of an agent in the same µs get `seq` 1, 2, … and so an id
/// of their own (`…:<µs>:1`), instead of being taken for a duplicate of the
/// first. Applied in emission order where every agent event passes (the
/// pipeline; a replay), so the same input always gives the same ids.
#[derive(Debug, Default)]
pub struct AgentIds {
    /// Per agent: the µs of its last event and that event's `seq`.
    last: std::collections::HashMap<AgentId, (Micros, u64)>,
}

impl AgentIds {
    pub fn stamp(&mut self, e: &mut Event) {
        let (EventKind::AgentAvailability { agent, .. } | EventKind::AgentLine { agent, .. }) = &e.kind else {
            return;
        };
        if e.call.is_some() {
            return;
        }
        let seq = match self.last.get(agent) {
            Some(&(t, n)) if t == e.time => n + 1,
            _ => 0,
        };
        e.seq = seq;
        // Bounded by the configured agents.
        self.last.insert(agent.clone(), (e.time, seq));
    }
}

#[cfg(test)]
mod agent_id_tests {
    use super::*;

    fn line(agent: &str, time: Micros, state: LineState) -> Event {
        Event {
            seq: 0,
            time,
            kind: EventKind::AgentLine { agent: AgentId::new(agent), state, remote: None },
            call: None,
        }
    }

    #[test]
    fn same_microsecond_events_of_one_agent_get_ids_of_their_own() {
        let mut ids = AgentIds::default();
        let mut events = vec![
            line("ana", 10, LineState::Ringing),
            line("ana", 10, LineState::Busy),
            line("joao", 10, LineState::Busy),
            line("ana", 10, LineState::Idle),
            line("ana", 11, LineState::Idle),
        ];
        for e in &mut events {
            ids.stamp(e);
        }
        let got: Vec<String> = events.iter().map(|e| e.id("lab")).collect();
        assert_eq!(
            got,
            ["lab:agent:ana:10", "lab:agent:ana:10:1", "lab:agent:joao:10", "lab:agent:ana:10:2", "lab:agent:ana:11"]
        );
    }
}
