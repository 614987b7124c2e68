//! The TOML configuration (SPEC §9): types, loading and validation.
//!
//! Loading never stops at the first problem. It goes in three steps, each
//! of which lists everything it finds:
//!
//! 1. TOML syntax (`toml` stops at the first syntax error; it is reported
//!    with its line and column).
//! 2. The key/type walk (`schema.rs`): unknown keys with the known keys
//!    suggested, wrong types, missing keys, malformed values (day lists,
//!    times, dates, time zones, addresses, ids), secret sources.
//! 3. Cross-entry checks (`check.rs`): agents without extension, duplicates,
//!    unknown agents or groups referenced, groups without agents, overflow
//!    loops.
//!
//! Only a document without problems is deserialized into [`Config`]; the
//! deserialized sections then check the ranges the walk does not express
//! (`[sip]`: [`SipConfig::validate`]). Every problem is one line naming the
//! field path (`groups[1].agents[0]`) and why.
//!
//! Secrets may be given inline (`secret`), in a file (`secret_file`) or in an
//! environment variable (`secret_env`). Validation checks that exactly one
//! is given but reads files and the environment only when asked
//! ([`Config::inspect_secrets`], which `check-config` runs by default, and
//! [`Config::check_secrets`]). A secret's value is never printed: not in
//! `Debug`, not in problems, not in the `check-config` summary.
//!
//! This module must never open sockets or touch the PBX.
//!
//! The doc comments on the fields below are the user documentation of the
//! configuration keys.

// Reads the configuration file: no indexing or slicing that could panic
// (here and in every submodule: check, command, schema, sip, values).
#![deny(clippy::indexing_slicing, clippy::string_slice)]

mod check;
mod command;
mod schema;
pub mod sip;
pub mod values;

pub use crate::secret::{SecretError, SecretSource, SecretUse};
pub use command::{check_config, check_config_main, CheckOptions};
pub use sip::{SipConfig, SipTransport};

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub pbx: PbxConfig,
    /// Telephony groups (SPEC §2), one per PBX queue.
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
    /// Agents and their extensions.
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    /// The global holiday calendar.
    #[serde(default)]
    pub holidays: HolidaysConfig,
    #[serde(default)]
    pub recordings: RecordingsConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    /// The HTTP API (health, metrics, calls, control). Omitted: no API.
    #[serde(default)]
    pub api: Option<ApiConfig>,
    /// Limits of the stuck-call sweeper.
    #[serde(default)]
    pub stuck: StuckConfig,
    /// Group indicators (`GET /v1/groups/{id}/indicators`).
    #[serde(default)]
    pub indicators: IndicatorsConfig,
    /// SIP dialog-event subscriptions (agent line state; SIP-only mode
    /// without `[pbx.ami]`).
    #[serde(default)]
    pub sip: Option<SipConfig>,
    /// The FastAGI routing endpoint (SPEC §8). Absent: no listener.
    pub agi: Option<AgiConfig>,
    /// Who is calling: the helpdesk lookup the FastAGI router asks before
    /// applying `redirect_unknown_to` / `redirect_inactive_to`.
    #[serde(default)]
    pub caller_lookup: Option<CallerLookupConfig>,
    /// The durable outbox between the normalizer and the sinks.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// Where lifecycle events are delivered.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// A hot-standby pair: two instances beside one PBX, of which only the
    /// holder of a lease in a NATS key-value bucket delivers and controls
    /// (see `crate::ha`). Absent: this instance is alone and always
    /// delivers.
    #[serde(default)]
    pub ha: Option<HaConfig>,
}

/// `[ha]`: the lease that makes one of two instances the leader.
///
/// No `deny_unknown_fields`: the connection is flattened in; the schema
/// walk refuses unknown keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HaConfig {
    /// The NATS servers holding the lease (`url`, credentials, CA): the same
    /// keys as a NATS sink's.
    #[serde(flatten)]
    pub connection: NatsConnectionConfig,
    /// The password (with `user`) or the token.
    #[serde(flatten)]
    pub secret: SecretSource,
    /// The key-value bucket of the leases (created when missing, with a
    /// maximum age of `lease_seconds`). Default `callbridge_leader`.
    #[serde(default = "default_ha_bucket")]
    pub bucket: String,
    /// The lease's key: one per PBX. Default: `pbx.name`.
    #[serde(default)]
    pub key: Option<String>,
    /// How long a lease lasts without renewal; the leader renews it every
    /// third of this, and a standby takes over at most this long (plus its
    /// polling) after the leader stopped renewing. Default 10.
    #[serde(default = "default_ha_lease")]
    pub lease_seconds: u64,
    /// This instance's name, as the lease and the standby's `not_leader`
    /// answers show it. Default: the host name. The two instances of a pair
    /// need different names.
    #[serde(default)]
    pub node: Option<String>,
    /// This instance's API as clients reach it (`https://cb-a.example:8080`),
    /// named in the standby's `not_leader` answers. Optional.
    #[serde(default)]
    pub advertise: Option<String>,
    /// A new leader delivers again every event stored less than this long
    /// before the oldest event its predecessor had not delivered (clock
    /// differences between the two machines, and events stored in a
    /// different order). Default 30.
    #[serde(default = "default_ha_overlap")]
    pub overlap_seconds: u64,
    /// Copies of the lease bucket in a NATS cluster (1, 3 or 5).
    #[serde(default = "default_nats_replicas")]
    pub replicas: usize,
}

fn default_ha_bucket() -> String {
    "callbridge_leader".to_string()
}
fn default_ha_lease() -> u64 {
    10
}
fn default_ha_overlap() -> u64 {
    30
}

impl HaConfig {
    /// `node`, else the host name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "callbridge".to_string())
        })
    }

    /// The lease's key.
    pub fn key<'a>(&'a self, config: &'a Config) -> &'a str {
        self.key.as_deref().unwrap_or(&config.pbx.name)
    }
}

/// `[api]`: the HTTP API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `host:port` the API listens on (e.g. `127.0.0.1:8080`).
    pub listen: String,
    /// The bearer token clients must send: `secret`, `secret_file` or
    /// `secret_env`, exactly one.
    #[serde(flatten)]
    pub secret: SecretSource,
    /// Serve `/metrics` on its own listener as well (e.g. `0.0.0.0:9464`).
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Most connections open at once on each API listener (default 512).
    /// At the cap, a new connection closes the oldest one that has no
    /// request in progress; if all are busy, it waits to be accepted. Keep
    /// it well below the process's file-descriptor limit (`LimitNOFILE` in
    /// the systemd unit, 65536) so the AMI and sink connections always
    /// find a descriptor.
    #[serde(default = "default_api_max_connections")]
    pub max_connections: usize,
    /// A connection must send a complete request head within this long of
    /// being accepted, or it is closed (default 10 s).
    #[serde(default = "default_api_header_read_timeout")]
    pub header_read_timeout_seconds: f64,
    /// A keep-alive connection idle this long between requests is closed
    /// (default 60 s).
    #[serde(default = "default_api_idle_timeout")]
    pub idle_timeout_seconds: f64,
    /// A request not answered within this long is abandoned with `503
    /// request_timeout` (default 60 s; each AMI action has its own
    /// `action_timeout_seconds` within it).
    #[serde(default = "default_api_request_timeout")]
    pub request_timeout_seconds: f64,
    /// A larger request body is refused with `413 payload_too_large`
    /// (default 65536).
    #[serde(default = "default_api_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Lifecycle events kept in memory for `GET /v1/events` (default
    /// 10000, at least twice `[outbox] max_batch_events`): a client that
    /// reconnects with `Last-Event-ID` resumes from them (an older id gets
    /// `event: reset`: re-read `/v1/calls`), and a client that falls this
    /// far behind is disconnected.
    #[serde(default = "default_api_events_window")]
    pub events_window: usize,
}

fn default_api_events_window() -> usize {
    10_000
}

fn default_api_max_connections() -> usize {
    512
}
fn default_api_header_read_timeout() -> f64 {
    10.0
}
fn default_api_idle_timeout() -> f64 {
    60.0
}
fn default_api_request_timeout() -> f64 {
    60.0
}
fn default_api_max_body_bytes() -> usize {
    64 * 1024
}

/// `[stuck]`: when a call is suspect (SPEC §7).
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StuckConfig {
    /// Longest time a call may stay started (IVR, dialling) before it is checked.
    pub started_seconds: u64,
    /// Longest time in a queue without ringing anyone.
    pub queued_seconds: u64,
    /// Longest ringing time.
    pub ringing_seconds: u64,
    /// Longest conversation.
    pub talking_seconds: u64,
    /// Longest time without any event for the call.
    pub silence_seconds: u64,
    /// How often the sweeper looks.
    pub check_interval_seconds: u64,
}

impl Default for StuckConfig {
    fn default() -> Self {
        // Generous: a false "stuck" costs a PBX query, a missed one costs a
        // ghost call on an administrator's screen for hours.
        StuckConfig {
            started_seconds: 600,
            queued_seconds: 3600,
            ringing_seconds: 300,
            talking_seconds: 4 * 3600,
            silence_seconds: 2 * 3600,
            check_interval_seconds: 30,
        }
    }
}

/// `[indicators]`: how group indicators are computed.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndicatorsConfig {
    /// Service level = share of calls answered within this many seconds.
    pub service_level_seconds: u64,
}

impl Default for IndicatorsConfig {
    fn default() -> Self {
        IndicatorsConfig { service_level_seconds: 20 }
    }
}

/// `[pbx]`: the PBX callbridge runs beside.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PbxConfig {
    /// Used in event ids (`<name>:<call id>:<seq>`), the CloudEvents source
    /// (`callbridge/<name>`) and metric labels. Must not contain `:`.
    pub name: String,
    /// Channel variable that carries the helpdesk ticket id.
    #[serde(default = "default_ticket_variable")]
    pub ticket_variable: String,
    /// The Asterisk Manager Interface. Needed by `run`; `replay` works
    /// without it.
    pub ami: Option<AmiConfig>,
}

fn default_ticket_variable() -> String {
    "CALLBRIDGE_TICKET".to_string()
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AmiAuth {
    /// `Action: Challenge` + `AuthType: MD5`: the secret never crosses the wire.
    #[default]
    Md5,
    /// `Action: Login` with `Secret:` in clear text.
    Plain,
}

impl AmiAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            AmiAuth::Md5 => "md5",
            AmiAuth::Plain => "plain",
        }
    }
}

/// `[pbx.ami]`: how to reach and log in to the Asterisk Manager Interface.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmiConfig {
    /// `host:port` of the Manager Interface (5038, or 5039 with TLS).
    pub address: String,
    /// The `manager.conf` user.
    pub username: String,
    /// Its secret: exactly one of `secret`, `secret_file`, `secret_env`.
    #[serde(flatten)]
    pub secret: SecretSource,
    /// `md5` (default) or `plain`.
    #[serde(default)]
    pub auth: AmiAuth,
    /// Connect with TLS (AMI over TLS, usually port 5039).
    #[serde(default)]
    pub tls: bool,
    /// Server name checked against the PBX's certificate (default: the host
    /// part of `address`).
    pub tls_server_name: Option<String>,
    /// Extra PEM CA file to trust (self-signed PBX certificates).
    pub tls_ca_file: Option<String>,
    /// Give up a connection attempt after this long.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_seconds: f64,
    /// Give up waiting for an action's response after this long.
    #[serde(default = "default_action_timeout")]
    pub action_timeout_seconds: f64,
    /// Send `Ping` after this long without traffic.
    #[serde(default = "default_ping_interval")]
    pub ping_interval_seconds: f64,
    /// Cap of the reconnect backoff.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_seconds: f64,
    /// Largest AMI frame accepted; a larger one is counted and skipped.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Most headers accepted in one AMI frame.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Capacity of the reader → pipeline channel (full = the reader waits).
    #[serde(default = "default_event_queue")]
    pub event_queue_capacity: usize,
}

fn default_connect_timeout() -> f64 {
    5.0
}
fn default_action_timeout() -> f64 {
    10.0
}
fn default_ping_interval() -> f64 {
    20.0
}
fn default_reconnect_max() -> f64 {
    30.0
}
fn default_max_frame_bytes() -> usize {
    1 << 20
}
fn default_max_headers() -> usize {
    1024
}
/// Frames between the AMI reader and the pipeline. 1024 keeps the pipeline
/// fed (it takes at most a few hundred per batch); the 8192 of before held
/// about 10 MB of frames during a burst, left as free holes in the heap
/// afterwards (`benches/daemon_memory.rs`), without ingesting faster.
pub(crate) fn default_event_queue() -> usize {
    1024
}

/// `[[groups]]`: a telephony group and the PBX queue that serves it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// The helpdesk's id of the group (in events as `group`).
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// The PBX queue that serves this group. One queue serves one group.
    pub queue: String,
    /// Agent ids in distribution order (round-robin). At least one.
    #[serde(default)]
    pub agents: Vec<String>,
    /// Agent ids of the group's administrators (they monitor live calls and
    /// indicators; they take calls only if also listed in `agents`).
    #[serde(default)]
    pub admins: Vec<String>,
    /// IANA time zone of `hours` and `holidays` (default `UTC`).
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Business hours. Omitted or empty: always open.
    #[serde(default)]
    pub hours: Vec<HoursRange>,
    /// The group's own holidays, `YYYY-MM-DD`.
    #[serde(default)]
    pub holidays: Vec<String>,
    /// Also observe the global calendar (`[holidays] dates`).
    #[serde(default)]
    pub use_global_holidays: bool,
    /// Group ids to divert to, in order, when this group has no available
    /// agent, is outside hours or on a holiday. No cycles.
    #[serde(default)]
    pub overflow: Vec<String>,
    /// Agents may transfer a call to another agent of the group.
    #[serde(default)]
    pub allow_transfer: bool,
    /// Group to send callers to whose number no helpdesk contact has
    /// (FastAGI routing; needs `[caller_lookup]`). Omitted: no redirection.
    #[serde(default)]
    pub redirect_unknown_to: Option<String>,
    /// Group to send callers to whose contact is inactive (FastAGI
    /// routing; needs `[caller_lookup]`). Omitted: no redirection.
    #[serde(default)]
    pub redirect_inactive_to: Option<String>,
}

fn default_timezone() -> String {
    "UTC".to_string()
}

/// One business-hours range, e.g. `{ days = "mon-fri", from = "08:00", to = "18:00" }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HoursRange {
    /// `mon-fri`, `sat`, `sat,sun`, `mon-wed,fri`.
    pub days: String,
    /// `HH:MM` (00:00–23:59), local time of the group.
    pub from: String,
    /// `HH:MM` (00:00–24:00); earlier than `from` means the range crosses
    /// midnight (and ends the next day).
    pub to: String,
}

/// A business-hours range, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedHours {
    pub days: values::Days,
    /// Minutes after midnight, 0..=1439.
    pub from_minute: u16,
    /// Minutes after midnight, 0..=1440; `< from_minute` crosses midnight.
    pub to_minute: u16,
}

impl HoursRange {
    /// Parses the range (always succeeds on a validated configuration).
    pub fn parse(&self) -> Result<ParsedHours, values::InvalidValue> {
        Ok(ParsedHours {
            days: values::parse_days(&self.days)?,
            from_minute: values::parse_clock(&self.from, false)?,
            to_minute: values::parse_clock(&self.to, true)?,
        })
    }
}

/// `[[agents]]`: a helpdesk agent and the extension of their phone.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The helpdesk's id of the agent (in events as `agent`).
    pub id: String,
    /// Display name; also matched against a queue member's `MemberName`.
    #[serde(default)]
    pub name: Option<String>,
    /// The agent's extension. Required: an agent without one is a
    /// configuration error (optional in the type so validation can name
    /// the agent).
    pub extension: Option<String>,
    /// The number the helpdesk knows this agent by (Zammad: the phone
    /// field of the agent's user, matched against `answeringNumber`).
    /// Default: the extension.
    #[serde(default)]
    pub helpdesk_phone: Option<String>,
    /// The agent's login in the helpdesk (Zammad looks `user` up as a
    /// login). Default: the display name, else the id.
    #[serde(default)]
    pub helpdesk_login: Option<String>,
}

/// `[holidays]`: the global holiday calendar, used by groups with
/// `use_global_holidays = true`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HolidaysConfig {
    /// `YYYY-MM-DD` dates with no telephone service.
    #[serde(default)]
    pub dates: Vec<String>,
}

/// `[recordings]`: how a call's recording is linked.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RecordingsConfig {
    /// `MIXMONITOR_FILENAME`'s file name is appended; without it the PBX's
    /// path is passed as is.
    pub url_base: Option<String>,
}

/// `[outbound]`: click-to-call.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Dialplan context that dials external numbers (click-to-call).
    pub context: Option<String>,
    /// Prefix the dialplan expects before an external number (e.g. "0");
    /// stripped from the dialled extension to get the customer's number.
    #[serde(default)]
    pub prefix: String,
    /// The agent's phone as `Originate` dials it, `{extension}` replaced
    /// (`PJSIP/{extension}`, `SIP/{extension}`).
    #[serde(default = "default_agent_channel")]
    pub agent_channel: String,
    /// The PBX's country code: `+55 11 …` is dialled as the national
    /// `11 …`. Without it every `+` number is dialled as international.
    pub country_code: Option<String>,
    /// What replaces `+` in an international number (`+44 …` → `0044…`).
    #[serde(default = "default_international_prefix")]
    pub international_prefix: String,
    /// How long the agent's phone rings before a click-to-call gives up.
    #[serde(default = "default_agent_ring_seconds")]
    pub agent_ring_seconds: u64,
    /// Dialplan context a transfer target's extension is dialled in
    /// (default: `context`, else `from-internal`).
    pub transfer_context: Option<String>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            context: None,
            prefix: String::new(),
            agent_channel: default_agent_channel(),
            country_code: None,
            international_prefix: default_international_prefix(),
            agent_ring_seconds: default_agent_ring_seconds(),
            transfer_context: None,
        }
    }
}

fn default_agent_channel() -> String {
    "PJSIP/{extension}".to_string()
}

fn default_international_prefix() -> String {
    "00".to_string()
}

fn default_agent_ring_seconds() -> u64 {
    30
}

/// `[registry]`: the live call registry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// How long an ended call stays queryable, on the PBX clock. At least
    /// 14400 (4 h): the helpdesk recovers unsaved tickets that long after.
    #[serde(default = "default_retention")]
    pub retention_seconds: u64,
    /// Most ended calls kept; beyond it the oldest are dropped before their
    /// retention is over (a memory bound for extreme call rates).
    #[serde(default = "default_max_ended_calls")]
    pub max_ended_calls: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig { retention_seconds: default_retention(), max_ended_calls: default_max_ended_calls() }
    }
}

fn default_retention() -> u64 {
    4 * 3600
}

fn default_max_ended_calls() -> usize {
    200_000
}

/// `[agi]`: the FastAGI endpoint the dialplan asks where to route a call
/// (`AGI(agi://127.0.0.1:4573/route?queue=700)`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgiConfig {
    /// `ip:port` to listen on, e.g. `127.0.0.1:4573` (4573 is FastAGI's
    /// usual port). Keep it on loopback or a trusted network: FastAGI has
    /// no authentication.
    pub listen: String,
    /// Most AGI sessions served at once; a connection beyond it is closed
    /// at once (the dialplan falls back) rather than left waiting.
    #[serde(default = "default_agi_max_sessions")]
    pub max_sessions: usize,
    /// Longest an AGI session may last, from connection to close. The
    /// channel waits in `AGI()` meanwhile, so keep it short.
    #[serde(default = "default_agi_session_timeout")]
    pub session_timeout_seconds: f64,
}

/// `[caller_lookup]`: how the FastAGI router asks the helpdesk who is
/// calling. Slow or failing lookups never hold a caller: the call takes its
/// normal route ("fail open").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallerLookupConfig {
    /// `generic` (default): `GET url` with `{number}` replaced, JSON answer
    /// read through the `*_pointer`s. `zammad`: Zammad's user search.
    #[serde(rename = "type", default)]
    pub kind: CallerLookupKind,
    /// `generic`: the URL template, with `{number}` (the number as
    /// click-to-call normalises it) or `{e164}` (`+` and the digits).
    /// `zammad`: the base URL of the instance.
    pub url: String,
    /// The token: sent as `Authorization: Bearer <token>` (generic, where
    /// it is optional) or `Authorization: Token token=<token>` (Zammad, an
    /// access token with `ticket.agent` or `admin.user`). At most one of
    /// `secret`, `secret_file`, `secret_env`.
    #[serde(flatten)]
    pub secret: SecretSource,
    /// Longest a call waits for the answer (including a wait for a free
    /// request slot); then it takes its normal route.
    #[serde(default = "default_lookup_timeout_ms")]
    pub timeout_ms: u64,
    /// How long an answer is reused for the same number (0: not cached).
    #[serde(default = "default_lookup_cache_ttl")]
    pub cache_ttl_seconds: u64,
    /// Most numbers cached; the oldest answer is dropped beyond it.
    #[serde(default = "default_lookup_cache_entries")]
    pub cache_max_entries: usize,
    /// Most lookups in flight at once (one per number: callers of the same
    /// number share one request).
    #[serde(default = "default_lookup_concurrency")]
    pub max_concurrent: usize,
    /// Generic form: JSON pointer (RFC 6901) to a boolean, whether a
    /// contact has the number (default `/found`; missing or `null` is
    /// false, and a 404 answer is "not found" too).
    #[serde(default)]
    pub found_pointer: Option<String>,
    /// Generic form: JSON pointer to a boolean, whether the contact is
    /// active (default `/active`; missing or `null`: the service does not
    /// say, and the caller counts as active).
    #[serde(default)]
    pub active_pointer: Option<String>,
    /// Generic form: JSON pointer to the contact's id, a string or a number
    /// (default `/contact_id`).
    #[serde(default)]
    pub contact_id_pointer: Option<String>,
    /// PEM file of certificate authorities to trust besides the system's.
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// `[caller_lookup] type`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CallerLookupKind {
    #[default]
    Generic,
    Zammad,
}

fn default_lookup_timeout_ms() -> u64 {
    300
}
fn default_lookup_cache_ttl() -> u64 {
    300
}
fn default_lookup_cache_entries() -> usize {
    10_000
}
fn default_lookup_concurrency() -> usize {
    16
}

fn default_agi_max_sessions() -> usize {
    64
}

fn default_agi_session_timeout() -> f64 {
    5.0
}

/// `[[sinks]]`: where events are delivered; `type` selects the kind.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines to stdout (`path = "-"`) or a file.
    Jsonl {
        /// Names the sink's cursor in the outbox and its metric label
        /// (default: `jsonl`). Must be unique among the sinks.
        name: Option<String>,
        #[serde(default = "default_jsonl_path")]
        path: String,
    },
    /// CloudEvents over HTTP(S) POST, signed per Standard Webhooks.
    Webhook {
        /// Default: `webhook`. Must be unique among the sinks.
        name: Option<String>,
        url: String,
        /// Signing secret (`whsec_<base64>` or raw text): `secret`,
        /// `secret_file` or `secret_env`.
        #[serde(flatten)]
        secret: SecretSource,
        /// Events per request; above 1, requests carry
        /// `application/cloudevents-batch+json`.
        #[serde(default = "default_batch_size")]
        batch_size: usize,
        #[serde(default = "default_sink_timeout")]
        timeout_seconds: f64,
        #[serde(default = "default_sink_connect_timeout")]
        connect_timeout_seconds: f64,
        /// Cap of the exponential retry backoff.
        #[serde(default = "default_max_backoff")]
        max_backoff_seconds: f64,
        /// Requests in flight at once (different calls proceed in parallel).
        #[serde(default = "default_sink_concurrency")]
        concurrency: usize,
        /// PEM file of certificate authorities to trust besides the system's
        /// (a helpdesk behind an internal CA).
        #[serde(default)]
        ca_file: Option<String>,
        /// How long one event is retried (5xx, network, timeouts) before it
        /// is parked as a dead letter and the call's later events go on;
        /// 0 retries for ever. Default: a day.
        #[serde(default = "default_max_retry")]
        max_retry_seconds: f64,
    },
    /// Zammad's Generic CTI (`POST {url}/api/v1/cti/{token}`).
    Zammad {
        /// Default: `zammad`. Must be unique among the sinks.
        name: Option<String>,
        /// Base URL of the Zammad instance (`https://helpdesk.example`).
        url: String,
        /// The CTI endpoint token: `secret`, `secret_file` or `secret_env`
        /// (exactly one, like every secret).
        #[serde(flatten)]
        secret: SecretSource,
        #[serde(default = "default_sink_timeout")]
        timeout_seconds: f64,
        #[serde(default = "default_sink_connect_timeout")]
        connect_timeout_seconds: f64,
        #[serde(default = "default_max_backoff")]
        max_backoff_seconds: f64,
        #[serde(default = "default_sink_concurrency")]
        concurrency: usize,
        /// PEM file of certificate authorities to trust besides the system's.
        #[serde(default)]
        ca_file: Option<String>,
        /// How long one event is retried before it becomes a dead letter
        /// (0: for ever). Default: a day.
        #[serde(default = "default_max_retry")]
        max_retry_seconds: f64,
        /// Hang up an inbound caller when Zammad answers its `newCall` with
        /// `{"action": "reject"}` (Zammad's blocked caller ids): the call
        /// ends `missed`/`blocked`. Off by default: hanging up a call is a
        /// PBX action callbridge takes on nobody else's say, and it needs
        /// the AMI user's `call` write permission.
        #[serde(default)]
        honour_reject: bool,
    },
    /// CloudEvents published into a NATS JetStream stream (see
    /// `crate::sink::nats`): acknowledged by the stream's `PubAck`.
    Nats {
        /// Default: `nats`. Must be unique among the sinks.
        name: Option<String>,
        #[serde(flatten)]
        connection: NatsConnectionConfig,
        /// The password (with `user`) or the token: `secret`, `secret_file`
        /// or `secret_env`; none without authentication or with a file.
        #[serde(flatten)]
        secret: SecretSource,
        /// Subject of each event: `{pbx}`, `{type}` (`call.answered`, two
        /// tokens) and `{group}` (the call's group, `_` without one) are
        /// replaced. Default `callbridge.{pbx}.{type}`.
        #[serde(default = "default_nats_subject")]
        subject: String,
        /// The stream that captures the subjects (`nats-setup` creates it).
        #[serde(default = "default_nats_stream")]
        stream: String,
        /// Subjects of the stream (`nats-setup`); default: the subject
        /// template's literal prefix followed by `>` (`callbridge.>`), so
        /// one stream carries every site.
        #[serde(default)]
        stream_subjects: Vec<String>,
        /// Copies of each message in a cluster (1, 3 or 5; `nats-setup`).
        #[serde(default = "default_nats_replicas")]
        replicas: usize,
        /// How long the stream remembers message ids to drop duplicates
        /// (`nats-setup`). Default: 2 minutes, and at least three lease
        /// periods plus a minute when `[ha]` is set (a new leader delivers
        /// again what the old one may have published in its last period).
        #[serde(default)]
        duplicate_window_seconds: Option<f64>,
        /// How long the stream keeps messages (`nats-setup`; 0: until
        /// removed by other limits). Default: 7 days.
        #[serde(default = "default_nats_max_age")]
        max_age_seconds: f64,
        /// Events of one attempt at most (published together, acknowledged
        /// together; a call's events within it wait for each other's
        /// PubAck).
        #[serde(default = "default_nats_batch")]
        batch_size: usize,
        /// How long a batch may wait for its PubAcks.
        #[serde(default = "default_sink_timeout")]
        timeout_seconds: f64,
        #[serde(default = "default_max_backoff")]
        max_backoff_seconds: f64,
        /// Batches in flight at once (different calls).
        #[serde(default = "default_sink_concurrency")]
        concurrency: usize,
        /// How long one event is retried before it becomes a dead letter
        /// (0: for ever). Default: a day.
        #[serde(default = "default_max_retry")]
        max_retry_seconds: f64,
    },
}

/// How to reach a NATS server (the NATS sink, `[ha]`): the servers and the
/// credentials. One of `creds_file`, `nkey_seed_file`, or the secret
/// (`secret`/`secret_file`/`secret_env`: the password with `user`, the
/// token without); none for a server without authentication.
///
/// The secret is a field beside it (serde cannot flatten a flattened
/// struct's flattened fields under `deny_unknown_fields`). No
/// `deny_unknown_fields` here: it is flattened into `[[sinks]]`, where that
/// would refuse the sink's own keys; the schema walk refuses unknown keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NatsConnectionConfig {
    /// One server or several, comma-separated
    /// (`nats://a:4222,nats://b:4222`; `tls://` for TLS).
    pub url: String,
    /// A user name (the password is the secret beside it).
    #[serde(default)]
    pub user: Option<String>,
    /// A `.creds` file (JWT and NKey seed, as `nsc` writes it).
    #[serde(default)]
    pub creds_file: Option<String>,
    /// A file holding an NKey seed (`SU…`).
    #[serde(default)]
    pub nkey_seed_file: Option<String>,
    /// PEM file of certificate authorities to trust (TLS is then required).
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default = "default_sink_connect_timeout")]
    pub connect_timeout_seconds: f64,
}

fn default_nats_subject() -> String {
    "callbridge.{pbx}.{type}".to_string()
}
fn default_nats_stream() -> String {
    "CALLBRIDGE".to_string()
}
fn default_nats_replicas() -> usize {
    1
}
fn default_nats_max_age() -> f64 {
    7.0 * 86_400.0
}
fn default_nats_batch() -> usize {
    256
}

fn default_max_retry() -> f64 {
    86_400.0
}
fn default_batch_size() -> usize {
    1
}
fn default_sink_timeout() -> f64 {
    10.0
}
fn default_sink_connect_timeout() -> f64 {
    5.0
}
fn default_max_backoff() -> f64 {
    300.0
}
fn default_sink_concurrency() -> usize {
    32
}

/// `[outbox]`: where events wait, durable, until every sink acknowledged
/// them (see `crate::outbox` for the design).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Directory of the store (created if missing).
    #[serde(default = "default_outbox_path")]
    pub path: String,
    /// Extra time the writer waits to gather more events into one commit
    /// (0: commit as soon as the previous commit's fsync returns).
    #[serde(default)]
    pub commit_interval_ms: u64,
    /// Most events (and acknowledgements) in one commit.
    #[serde(default = "default_outbox_max_batch")]
    pub max_batch_events: usize,
    /// Cap of the store's size; appends beyond it fail as "disk full"
    /// (0: only the filesystem limits it).
    #[serde(default)]
    pub max_bytes: u64,
    /// How long the ids of delivered events are remembered, so that a
    /// re-emitted event (replay after a crash) is not delivered again.
    #[serde(default = "default_outbox_dedup")]
    pub dedup_retention_seconds: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            path: default_outbox_path(),
            commit_interval_ms: 0,
            max_batch_events: default_outbox_max_batch(),
            max_bytes: 0,
            dedup_retention_seconds: default_outbox_dedup(),
        }
    }
}

fn default_outbox_path() -> String {
    "/var/lib/callbridge/outbox".to_string()
}
fn default_outbox_max_batch() -> usize {
    4096
}
fn default_outbox_dedup() -> u64 {
    24 * 3600
}

impl SinkConfig {
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConfig::Jsonl { .. } => "jsonl",
            SinkConfig::Webhook { .. } => "webhook",
            SinkConfig::Zammad { .. } => "zammad",
            SinkConfig::Nats { .. } => "nats",
        }
    }
}

fn default_jsonl_path() -> String {
    "-".to_string()
}

/// Every problem found in a configuration, one line each in `Display`:
/// `<source>: <field path>: <why>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.iter().map(|p| format!("{}: {p}", .source_name)).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<String>,
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: path.display().to_string(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let err = |problems| ConfigError { source_name: source_name.to_string(), problems };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| err(vec![syntax_problem(text, &e)]))?;
        let problems = check_table(&table);
        if !problems.is_empty() {
            return Err(err(problems));
        }
        // The walk accepts only what the structs accept; an error here is a
        // schema/struct mismatch, still reported rather than panicking.
        let config: Config = table.try_into().map_err(|e: toml::de::Error| err(vec![e.message().to_string()]))?;
        let problems = config.check_sections();
        if !problems.is_empty() {
            return Err(err(problems));
        }
        Ok(config)
    }

    /// Step 4, on the deserialized sections: ranges the key walk does not
    /// express.
    fn check_sections(&self) -> Vec<String> {
        self.sip.as_ref().map(SipConfig::validate).unwrap_or_default()
    }

    /// Every problem of an already built configuration (e.g. one assembled
    /// in code); empty when it is valid. Secrets are not resolved.
    pub fn validate(&self) -> Vec<String> {
        match toml::Table::try_from(self) {
            Ok(table) => match check_table(&table) {
                problems if problems.is_empty() => self.check_sections(),
                problems => problems,
            },
            Err(e) => vec![format!("cannot check the configuration: {e}")],
        }
    }

    /// Every secret source with its field path.
    pub fn secrets(&self) -> Vec<(String, &SecretSource)> {
        self.secret_uses().into_iter().map(|(path, s, _)| (path, s)).collect()
    }

    /// Every secret source with its field path and what it is used for.
    pub fn secret_uses(&self) -> Vec<(String, &SecretSource, SecretUse)> {
        let mut all = Vec::new();
        if let Some(ami) = &self.pbx.ami {
            all.push(("pbx.ami".to_string(), &ami.secret, SecretUse::Password));
        }
        if let Some(api) = &self.api {
            all.push(("api".to_string(), &api.secret, SecretUse::Password));
        }
        if let Some(sip) = &self.sip {
            all.push(("sip".to_string(), &sip.secret, SecretUse::Password));
        }
        if let Some(ha) = self.ha.as_ref().filter(|h| h.secret.is_set()) {
            all.push(("ha".to_string(), &ha.secret, SecretUse::Password));
        }
        if let Some(lookup) = self.caller_lookup.as_ref().filter(|l| l.secret.is_set()) {
            all.push(("caller_lookup".to_string(), &lookup.secret, SecretUse::Password));
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            match sink {
                SinkConfig::Webhook { secret, .. } => all.push((format!("sinks[{i}]"), secret, SecretUse::SigningKey)),
                SinkConfig::Zammad { secret, .. } => all.push((format!("sinks[{i}]"), secret, SecretUse::PathToken)),
                SinkConfig::Nats { secret, .. } if secret.is_set() => {
                    all.push((format!("sinks[{i}]"), secret, SecretUse::Password))
                }
                SinkConfig::Jsonl { .. } | SinkConfig::Nats { .. } => {}
            }
        }
        all
    }

    /// Resolves every secret (reads `secret_file`s and `secret_env`
    /// variables) and lists those that cannot be obtained. Never returns or
    /// prints a value.
    pub fn check_secrets(&self) -> Vec<String> {
        self.secrets().into_iter().filter_map(|(path, s)| s.read().err().map(|e| format!("{path}: {e}"))).collect()
    }

    /// Obtains every secret and checks it is usable where it is used
    /// (present, readable, non-empty, well-formed); see
    /// [`SecretSource::check`]. Problems and warnings name the field
    /// (`sinks[0].secret_file: …`), never a value.
    pub fn inspect_secrets(&self) -> SecretCheckReport {
        let mut report = SecretCheckReport::default();
        for (path, source, purpose) in self.secret_uses() {
            let check = source.check(&path, purpose);
            report.problems.extend(check.problem);
            report.warnings.extend(check.warnings);
        }
        report
    }

    pub fn agent(&self, id: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.id == id)
    }

    pub fn group(&self, id: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.id == id)
    }
}

/// What [`Config::inspect_secrets`] found.
#[derive(Debug, Default)]
pub struct SecretCheckReport {
    /// Secrets that cannot be used: the daemon would not start.
    pub problems: Vec<String>,
    /// Secrets that can be used but are exposed (e.g. a file others can read).
    pub warnings: Vec<String>,
}

/// Steps 2 and 3 of loading: the key/type walk, then the cross-entry checks.
fn check_table(table: &toml::Table) -> Vec<String> {
    let mut problems = Vec::new();
    schema::walk("", table, &schema::ROOT, &mut problems);
    check::cross_check(table, &mut problems);
    problems
}

/// `syntax error at line L, column C: <message>`, without echoing the
/// source line (it could hold a secret).
fn syntax_problem(text: &str, e: &toml::de::Error) -> String {
    // toml's messages may span lines ("invalid string\nexpected `\"`");
    // a problem is one line.
    let message = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            format!("syntax error at line {line}, column {column}: {message}")
        }
        None => format!("syntax error: {message}"),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = crate::text::shorten(text, offset);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before.get(line_start..).unwrap_or_default().chars().count() + 1)
}
