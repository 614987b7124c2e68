//! The TOML configuration (SPEC §9): types, loading and validation.
//!
//! Loading never stops at the first problem: every problem found is listed,
//! each naming the field (`groups[1].agents[0]`) and why. Secrets may be given
//! inline, in a file (`*_file`) or in an environment variable (`*_env`), and
//! are never printed (`Secret`'s `Debug` is redacted).
//!
//! This module must never open sockets or touch the PBX.

use serde::Deserialize;
use std::fmt;
use std::path::Path;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub pbx: PbxConfig,
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    #[serde(default)]
    pub holidays: HolidaysConfig,
    #[serde(default)]
    pub recordings: RecordingsConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub registry: RegistryConfig,
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// The durable outbox between the normalizer and the sinks.
    #[serde(default)]
    pub outbox: OutboxConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PbxConfig {
    /// Used in event ids (`<name>:<call id>:<seq>`), the CloudEvents source
    /// and metric labels.
    pub name: String,
    /// Channel variable that carries the helpdesk ticket id.
    #[serde(default = "default_ticket_variable")]
    pub ticket_variable: String,
    pub ami: Option<AmiConfig>,
}

fn default_ticket_variable() -> String {
    "CALLBRIDGE_TICKET".to_string()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AmiAuth {
    /// `Action: Challenge` + `AuthType: MD5`: the secret never crosses the wire.
    #[default]
    Md5,
    /// `Action: Login` with `Secret:` in clear text.
    Plain,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmiConfig {
    /// `host:port` of the Manager Interface (5038, or 5039 with TLS).
    pub address: String,
    pub username: String,
    #[serde(flatten)]
    pub secret: SecretSource,
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
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_seconds: f64,
    #[serde(default = "default_action_timeout")]
    pub action_timeout_seconds: f64,
    /// Send `Ping` after this long without traffic.
    #[serde(default = "default_ping_interval")]
    pub ping_interval_seconds: f64,
    /// Cap of the reconnect backoff.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_seconds: f64,
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
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
fn default_event_queue() -> usize {
    8192
}

/// A secret given inline (`secret`), in a file (`secret_file`) or in an
/// environment variable (`secret_env`). Exactly one must be set.
#[derive(Clone, Deserialize, Default)]
pub struct SecretSource {
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub secret_env: Option<String>,
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSource")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("secret_env", &self.secret_env)
            .finish()
    }
}

impl SecretSource {
    /// Resolves the secret. The error names the source, never the value.
    pub fn resolve(&self) -> Result<String, String> {
        match (&self.secret, &self.secret_file, &self.secret_env) {
            (Some(s), None, None) => Ok(s.clone()),
            (None, Some(path), None) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| format!("cannot read secret_file {path:?}: {e}")),
            (None, None, Some(var)) => {
                std::env::var(var).map_err(|_| format!("environment variable {var:?} (secret_env) is not set"))
            }
            (None, None, None) => Err("no secret: set one of secret, secret_file, secret_env".into()),
            _ => Err("set only one of secret, secret_file, secret_env".into()),
        }
    }

    pub fn is_set(&self) -> bool {
        self.secret.is_some() || self.secret_file.is_some() || self.secret_env.is_some()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// The PBX queue that serves this group.
    pub queue: String,
    /// Distribution order.
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub admins: Vec<String>,
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Omitted: always open.
    #[serde(default)]
    pub hours: Vec<HoursRange>,
    #[serde(default)]
    pub holidays: Vec<String>,
    #[serde(default)]
    pub use_global_holidays: bool,
    #[serde(default)]
    pub overflow: Vec<String>,
    #[serde(default)]
    pub allow_transfer: bool,
}

fn default_timezone() -> String {
    "UTC".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoursRange {
    /// `mon-fri`, `sat`, `mon,wed,fri`, `mon-fri,sun`.
    pub days: String,
    /// `HH:MM`, local time of the group.
    pub from: String,
    /// `HH:MM`; earlier than `from` means the range crosses midnight.
    pub to: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Required: an agent without an extension is a configuration error
    /// reported by validation (optional here so that it can be named).
    pub extension: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HolidaysConfig {
    #[serde(default)]
    pub dates: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RecordingsConfig {
    /// `MIXMONITOR_FILENAME`'s file name is appended; without it the PBX's
    /// path is passed as is.
    pub url_base: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// Dialplan context that dials external numbers (click-to-call).
    pub context: Option<String>,
    /// Prefix the dialplan expects before an external number (e.g. "0");
    /// stripped from the dialled extension to get the customer's number.
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// How long an ended call stays queryable.
    #[serde(default = "default_retention")]
    pub retention_seconds: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig { retention_seconds: default_retention() }
    }
}

fn default_retention() -> u64 {
    4 * 3600
}

#[derive(Debug, Clone, Deserialize)]
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
    },
    /// Zammad's Generic CTI (`POST {url}/api/v1/cti/{token}`).
    Zammad {
        /// Default: `zammad`. Must be unique among the sinks.
        name: Option<String>,
        /// Base URL of the Zammad instance (`https://helpdesk.example`).
        url: String,
        /// The CTI endpoint token: `token`, `token_file` or `token_env`.
        token: Option<String>,
        token_file: Option<String>,
        token_env: Option<String>,
        #[serde(default = "default_sink_timeout")]
        timeout_seconds: f64,
        #[serde(default = "default_sink_connect_timeout")]
        connect_timeout_seconds: f64,
        #[serde(default = "default_max_backoff")]
        max_backoff_seconds: f64,
        #[serde(default = "default_sink_concurrency")]
        concurrency: usize,
    },
}

fn default_jsonl_path() -> String {
    "-".to_string()
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
#[derive(Debug, Clone, Deserialize)]
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

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration {source_name}:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<String>,
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: path.display().to_string(),
            problems: vec![format!("cannot read file: {e}")],
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `source_name` names it in errors.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let err = |problems| ConfigError { source_name: source_name.to_string(), problems };
        let config: Config = toml::from_str(text).map_err(|e| err(vec![e.to_string()]))?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(err(problems))
        }
    }

    /// Semantic checks; returns every problem found.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.pbx.name.trim().is_empty() {
            problems.push("pbx.name: must not be empty".to_string());
        }
        for (i, a) in self.agents.iter().enumerate() {
            if a.extension.as_deref().map_or(true, |e| e.trim().is_empty()) {
                problems.push(format!("agents[{i}] ({}): every agent needs an extension", a.id));
            }
        }
        for (i, g) in self.groups.iter().enumerate() {
            if g.agents.is_empty() {
                problems.push(format!("groups[{i}] ({}).agents: a group needs at least one agent", g.id));
            }
            for (j, a) in g.agents.iter().enumerate() {
                if !self.agents.iter().any(|x| &x.id == a) {
                    problems.push(format!("groups[{i}] ({}).agents[{j}]: unknown agent {a:?}", g.id));
                }
            }
        }
        problems
    }
}
