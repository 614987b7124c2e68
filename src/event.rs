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
use smol_str::SmolStr;
use std::sync::Arc;

/// Microseconds since the Unix epoch (the PBX's clock).
pub type Micros = i64;

/// Formats a PBX time as RFC 3339 UTC with milliseconds.
pub fn format_time(t: Micros) -> String {
    Rfc3339(t).to_string()
}

/// A PBX time as RFC 3339 UTC with milliseconds, written where it goes
/// (JSON output without an intermediate `String`).
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339(pub Micros);

/// Microseconds at jiff's latest timestamp, 9999-12-30T22:00:00Z (its
/// range leaves room for any UTC offset); later times print as the epoch.
const LATEST: Micros = 253_402_207_200_000_000;

impl Rfc3339 {
    /// `YYYY-MM-DDTHH:MM:SS.mmmZ` for times from 1970 to 9999 (every PBX
    /// clock), written digit by digit: a call event holds up to four times
    /// and this runs for each at full rate. Other times go through `jiff`,
    /// which prints the very same text for these (tested below).
    fn ascii(self) -> Option<[u8; 24]> {
        if !(0..=LATEST).contains(&self.0) {
            return None;
        }
        let secs = self.0 / 1_000_000;
        let millis = (self.0 % 1_000_000) / 1000;
        let (days, day_secs) = (secs / 86_400, secs % 86_400);
        // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm,
        // shifted so that years start on 1 March; every value here is
        // non-negative).
        let z = days + 719_468;
        let (era, doe) = (z / 146_097, z % 146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut v: i64| {
            for i in (at..at + width).rev() {
                // A digit: 0..=9.
                out[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, day_secs / 3600);
        put(14, 2, day_secs / 60 % 60);
        put(17, 2, day_secs % 60);
        put(20, 3, millis);
        Some(out)
    }
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(text) = self.ascii() {
            // ASCII digits and separators only.
            return f.write_str(std::str::from_utf8(&text).unwrap_or_default());
        }
        match jiff::Timestamp::from_microsecond(self.0) {
            Ok(ts) => write!(f, "{ts:.3}"),
            Err(_) => f.write_str("1970-01-01T00:00:00.000Z"),
        }
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.ascii() {
            Some(text) => s.serialize_str(std::str::from_utf8(&text).unwrap_or_default()),
            None => s.collect_str(self),
        }
    }
}

/// Seconds between two PBX times, rounded to the nearest second (never
/// negative).
pub fn seconds_between(from: Micros, to: Micros) -> u64 {
    u64::try_from(((to - from).max(0) + 500_000) / 1_000_000).unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Inbound,
    Outbound,
    Internal,
}

/// Where a call stands now (for the API, indicators and the stuck-call sweeper).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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

// A phone number and a caller name fit in a `SmolStr` inline (up to 23
// bytes): every live call holds two parties, and a heap allocation per
// string cost more than the string. Serialized as plain strings. (Plain
// comments: a doc comment here would be the API schema's description.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Party {
    #[schema(value_type = Option<String>)]
    pub number: Option<SmolStr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub name: Option<SmolStr>,
}

/// A call as the helpdesk sees it after an event (`data.call`).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CallSnapshot {
    pub id: CallId,
    pub direction: Direction,
    pub state: CallState,
    pub caller: Party,
    pub callee: Party,
    pub group: Option<GroupId>,
    // Inline like `Party`'s strings (a queue name, a ticket number); the
    // recording's URL is longer and stays a `String`.
    #[schema(value_type = Option<String>)]
    pub queue: Option<SmolStr>,
    pub agent: Option<AgentId>,
    #[schema(value_type = Option<String>)]
    pub ticket_id: Option<SmolStr>,
    /// RFC 3339, UTC, milliseconds (the PBX's clock).
    #[serde(serialize_with = "ser_time")]
    #[schema(value_type = String, format = DateTime)]
    pub started_at: Micros,
    #[serde(serialize_with = "ser_opt_time")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub answered_at: Option<Micros>,
    #[serde(serialize_with = "ser_opt_time")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub ended_at: Option<Micros>,
    pub recording: Option<String>,
    /// How the FastAGI router moved the call away from the group asked
    /// for (overflow, or the caller's identity); absent when it did not.
    // Boxed, like `caller_lookup`: most calls have neither, and every live
    // call's snapshot would carry their room.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing: Option<Box<CallRouting>>,
    /// What the helpdesk said about the caller's number when the router
    /// looked it up (`[caller_lookup]`); absent when it did not ask, or
    /// got no answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller_lookup: Option<Box<CallerLookup>>,
}

/// Why the router sent a call to another group than the one asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallRouting {
    pub reason: RoutingReason,
    /// The group whose rule moved the call: the group asked for
    /// (overflow), or the group that would have taken it but redirects
    /// such callers.
    pub from_group: Option<GroupId>,
}

/// The helpdesk's answer about the caller's number (`data.call.caller_lookup`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    s.collect_str(&Rfc3339(*t))
}

fn ser_opt_time<S: Serializer>(t: &Option<Micros>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&Rfc3339(*t)),
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

/// The type-specific part of an event. Fields are declared in
/// alphabetical order: the order they are written in (`Data`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventKind {
    Started {},
    Queued {
        group: Option<GroupId>,
        position: Option<u32>,
        queue: String,
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
        kind: TransferKind,
        #[serde(skip_serializing_if = "Option::is_none")]
        to_agent: Option<AgentId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to_extension: Option<String>,
    },
    Missed {
        reason: MissedReason,
        wait_seconds: u64,
    },
    Stuck {
        detected_by: String,
        silent_seconds: u64,
        state: CallState,
    },
    Ended {
        duration_seconds: u64,
        end_reason: EndReason,
        hangup_cause: Option<u32>,
        hangup_cause_text: Option<String>,
        hung_up_by: HungUpBy,
        talk_seconds: u64,
        wait_seconds: u64,
    },
    AgentAvailability {
        agent: AgentId,
        available: bool,
        reason: Option<String>,
        source: AvailabilitySource,
    },
    AgentLine {
        agent: AgentId,
        #[serde(skip_serializing_if = "Option::is_none")]
        remote: Option<String>,
        state: LineState,
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
    /// The call after this event; `None` for agent events. Shared: the
    /// normalizer, the registry and the feed hold the same snapshot as
    /// long as the call does not change.
    pub call: Option<std::sync::Arc<CallSnapshot>>,
}

impl Event {
    /// Events of one key must be delivered in order; different keys are
    /// independent. Call events: the call id; agent events: the agent.
    pub fn ordering_key(&self) -> Arc<str> {
        match (&self.call, &self.kind) {
            // The call id's own block: no copy per event.
            (Some(c), _) => c.id.shared(),
            (None, EventKind::AgentAvailability { agent, .. } | EventKind::AgentLine { agent, .. }) => {
                Arc::from(format!("agent:{agent}"))
            }
            (None, _) => Arc::from(""),
        }
    }

    /// The deterministic CloudEvents `id`.
    pub fn id(&self, pbx: &str) -> String {
        EventId { event: self, pbx }.to_string()
    }

    /// The deterministic CloudEvents `id`, appended to `out` (callers
    /// naming many events reuse one buffer).
    pub fn write_id(&self, pbx: &str, out: &mut String) {
        use std::fmt::Write;
        // Writing into a String cannot fail.
        let _ = write!(out, "{}", EventId { event: self, pbx });
    }

    /// The event in CloudEvents 1.0 structured JSON (one line).
    pub fn to_cloudevent_json(&self, pbx: &str) -> String {
        // Room for a call event at once (0.5–1.3 KB), then a string of its
        // size: growing 512 → 1024 → 2048 took glibc's slow path at each step
        // past 1 KiB.
        self.cloudevent_json_in(pbx, &mut Vec::with_capacity(2048)).to_owned()
    }

    /// The CloudEvents JSON written into `scratch` (emptied first): callers
    /// rendering many events reuse one buffer, the outbox among them (at
    /// full rate, growing a fresh buffer per event was a tenth of the
    /// daemon's CPU in `benches/durable_ingest.rs`).
    pub fn cloudevent_json_in<'a>(&self, pbx: &str, scratch: &'a mut Vec<u8>) -> &'a str {
        scratch.clear();
        self.write_cloudevent_json(pbx, scratch);
        // serde_json writes UTF-8 only.
        std::str::from_utf8(scratch).unwrap_or_default()
    }

    /// Appends the CloudEvents JSON of this event to `out`, written
    /// straight into it (no intermediate values or strings).
    pub fn write_cloudevent_json(&self, pbx: &str, out: &mut Vec<u8>) {
        let envelope = Envelope { event: self, pbx };
        // Serializing plain data into memory cannot fail.
        let _ = serde_json::to_writer(out, &envelope);
    }
}

/// The deterministic CloudEvents `id`, written where it goes.
struct EventId<'a> {
    event: &'a Event,
    pbx: &'a str,
}

impl std::fmt::Display for EventId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (e, pbx) = (self.event, self.pbx);
        match (&e.call, &e.kind) {
            // Every event of a call: pieces written as they are (this runs
            // twice per event at full rate; `write!` parses its format).
            (Some(c), _) => {
                f.write_str(pbx)?;
                f.write_str(":")?;
                f.write_str(c.id.as_str())?;
                f.write_str(":")?;
                f.write_str(itoa::Buffer::new().format(e.seq))
            }
            // `seq` tells apart events of one agent in the same µs
            // ([`AgentIds`]); the first keeps the plain form.
            (None, EventKind::AgentAvailability { agent, .. } | EventKind::AgentLine { agent, .. }) => match e.seq {
                0 => write!(f, "{pbx}:agent:{agent}:{}", e.time),
                n => write!(f, "{pbx}:agent:{agent}:{}:{n}", e.time),
            },
            (None, _) => write!(f, "{pbx}:event:{}", e.time),
        }
    }
}

impl Serialize for EventId<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `callbridge/<pbx>`.
struct Source<'a>(&'a str);

impl Serialize for Source<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("callbridge/{}", self.0))
    }
}

struct Envelope<'a> {
    event: &'a Event,
    pbx: &'a str,
}

impl Serialize for Envelope<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.event;
        let mut m = s.serialize_map(Some(7))?;
        m.serialize_entry("specversion", "1.0")?;
        m.serialize_entry("id", &EventId { event: e, pbx: self.pbx })?;
        m.serialize_entry("source", &Source(self.pbx))?;
        m.serialize_entry("type", e.kind.type_name())?;
        m.serialize_entry("time", &Rfc3339(e.time))?;
        m.serialize_entry("datacontenttype", "application/json")?;
        // `seq`, `call` and the type-specific fields in one object.
        m.serialize_entry(
            "data",
            &Data { seq: e.call.as_ref().map(|_| e.seq), call: e.call.as_deref(), kind: &e.kind },
        )?;
        m.end()
    }
}

/// The event's `data`: the type-specific fields follow `seq` and `call`
/// in the order [`EventKind`] declares them (alphabetical, as the format
/// has always had them).
#[derive(Serialize)]
struct Data<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    call: Option<&'a CallSnapshot>,
    #[serde(flatten)]
    kind: &'a EventKind,
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

#[cfg(test)]
mod time_tests {
    use super::*;
    use proptest::prelude::*;

    /// What `Rfc3339` printed before it wrote digits itself.
    fn by_jiff(t: Micros) -> String {
        match jiff::Timestamp::from_microsecond(t) {
            Ok(ts) => format!("{ts:.3}"),
            Err(_) => "1970-01-01T00:00:00.000Z".to_string(),
        }
    }

    #[test]
    fn times_print_as_jiff_prints_them_at_the_edges() {
        for t in [
            0,
            999,
            999_999,
            1_000_000,
            86_399_999_999,
            // Leap days, century and 400-year rules, the last µs of a year.
            951_782_400_000_000,     // 2000-02-29
            4_107_542_400_000_000,   // 2100-03-01
            1_795_471_952_380_123,   // a trace's time
            253_402_207_199_999_999, // the last µs jiff takes, and
            LATEST,                  // that one
        ] {
            assert_eq!(Rfc3339(t).to_string(), by_jiff(t), "{t}");
        }
        // Outside 1970–9999: jiff's own text.
        for t in [-1, -86_400_000_001, LATEST + 1, 253_402_300_800_000_000, Micros::MIN, Micros::MAX] {
            assert_eq!(Rfc3339(t).to_string(), by_jiff(t), "{t}");
            assert!(Rfc3339(t).ascii().is_none());
        }
        assert_eq!(serde_json::to_string(&Rfc3339(999_999)).unwrap(), "\"1970-01-01T00:00:00.999Z\"");
    }

    proptest! {
        #[test]
        fn times_print_as_jiff_prints_them(t in 0..=LATEST) {
            prop_assert_eq!(Rfc3339(t).to_string(), by_jiff(t));
            prop_assert_eq!(serde_json::to_string(&Rfc3339(t)).unwrap(), format!("\"{}\"", by_jiff(t)));
        }
    }
}
