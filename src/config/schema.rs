//! The shape of the configuration file, and a walk of a parsed
//! [`toml::Table`] against it that reports every unknown key (with the known
//! keys suggested), every value of the wrong type, every missing required
//! key and every malformed value, each with its field path
//! (`groups[1].hours[0].from`).
//!
//! The walk runs before serde deserialization because serde stops at the
//! first error; here nothing stops the walk. Whatever passes the walk
//! deserializes into the structs in `config/mod.rs`, which keep the field
//! documentation. **Keep [`ROOT`] in step with those structs**: the test
//! `schema_accepts_every_key` deserializes a document built from the schema.
//!
//! The walk must never print the value of a secret (`Kind::Secret`): type
//! errors name the type found, never the value.

use super::values;
use toml::{Table, Value};

/// A check of a string value; the error says why it is wrong.
pub(crate) type Check = fn(&str) -> Result<(), String>;

/// What a key's value must be.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Str(Option<Check>),
    /// An inline secret: a non-empty string, never echoed.
    Secret,
    Bool,
    /// A non-negative integer, at least `min`.
    Count {
        min: u64,
        why: &'static str,
    },
    /// A duration in seconds (integer or float), finite and > 0.
    Seconds,
    /// A duration in seconds, finite and >= 0 (0 turns something off).
    SecondsOrOff,
    Strings(Option<Check>),
    OneOf(&'static [&'static str]),
    Table(&'static TableSchema),
    Tables(&'static TableSchema),
    /// An array of tables told apart by their `tag` key.
    TaggedTables {
        tag: &'static str,
        variants: &'static [(&'static str, &'static TableSchema)],
    },
}

#[derive(Clone, Copy)]
pub(crate) struct Field {
    pub key: &'static str,
    pub kind: Kind,
    pub required: bool,
}

pub(crate) struct TableSchema {
    /// How the table is named in "known keys" hints (`groups[]`).
    pub name: &'static str,
    pub fields: &'static [Field],
    /// Checks across the table's keys (e.g. exactly one secret source).
    pub check: Option<fn(&str, &Table, &mut Vec<String>)>,
}

const fn req(key: &'static str, kind: Kind) -> Field {
    Field { key, kind, required: true }
}

const fn opt(key: &'static str, kind: Kind) -> Field {
    Field { key, kind, required: false }
}

const STR: Kind = Kind::Str(None);
const SECONDS: Kind = Kind::Seconds;

fn check_id(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
        return Err(format!("{s:?} contains whitespace or '/' (ids appear in event data and API paths)"));
    }
    Ok(())
}

fn check_pbx_name(s: &str) -> Result<(), String> {
    check_id(s)?;
    if s.contains(':') {
        return Err(format!("{s:?} contains ':', which separates the parts of event ids (<pbx>:<call>:<seq>)"));
    }
    Ok(())
}

fn check_non_empty(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(())
    }
}

fn check_extension(s: &str) -> Result<(), String> {
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!("{s:?} is not an extension"))
    } else {
        Ok(())
    }
}

fn check_variable_name(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(())
    } else {
        Err(format!("{s:?} is not a channel variable name (letters, digits, '_')"))
    }
}

/// Never echoes the value: a secret pasted here by mistake must not be
/// printed.
fn check_env_name(s: &str) -> Result<(), String> {
    let first_ok = s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if first_ok && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(())
    } else {
        Err("is not an environment variable name (letters, digits, '_'; not starting with a digit); \
             it names the variable that holds the secret, not the secret itself"
            .into())
    }
}

fn check_http_url(s: &str) -> Result<(), String> {
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => Ok(()),
        _ => Err(format!("{s:?} is not an http:// or https:// URL")),
    }
}

fn check_address(s: &str) -> Result<(), String> {
    values::parse_host_port(s).map(|_| ()).map_err(|e| e.0)
}

/// A local address to listen on: like [`check_address`], but port 0 (any
/// free port) is allowed.
fn check_bind_address(s: &str) -> Result<(), String> {
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        if addr.port() == 0 {
            return Ok(());
        }
    }
    check_address(s)
}

/// A listening socket: an IP address (no host name) and a port.
fn check_listen(s: &str) -> Result<(), String> {
    match s.parse::<std::net::SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(()),
        Ok(_) => Err(format!("{s:?}: port 0 is not a port to listen on")),
        Err(_) => Err(format!(
            "{s:?} is not an ip:port to listen on (e.g. \"127.0.0.1:4573\", \"[::1]:4573\"; no host names)"
        )),
    }
}

fn check_timezone(s: &str) -> Result<(), String> {
    values::time_zone(s).map(|_| ()).map_err(|e| e.0)
}

fn check_days(s: &str) -> Result<(), String> {
    values::parse_days(s).map(|_| ()).map_err(|e| e.0)
}

fn check_from(s: &str) -> Result<(), String> {
    values::parse_clock(s, false).map(|_| ()).map_err(|e| e.0)
}

fn check_to(s: &str) -> Result<(), String> {
    values::parse_clock(s, true).map(|_| ()).map_err(|e| e.0)
}

fn check_date(s: &str) -> Result<(), String> {
    values::parse_date(s).map(|_| ()).map_err(|e| e.0)
}

pub(crate) const SECRET_KEYS: [&str; 3] = ["secret", "secret_file", "secret_env"];

/// Exactly one of `secret`, `secret_file`, `secret_env`.
fn check_secret_source(path: &str, table: &Table, out: &mut Vec<String>) {
    let present: Vec<&str> = SECRET_KEYS.iter().copied().filter(|k| table.contains_key(*k)).collect();
    match present.as_slice() {
        [_] => {}
        [] => out.push(format!("{path}: no secret: set exactly one of secret, secret_file, secret_env")),
        [a, b] => {
            out.push(format!("{path}: {a} and {b} are both set: set exactly one of secret, secret_file, secret_env"))
        }
        _ => out.push(format!("{path}: secret, secret_file and secret_env are all set: set exactly one of them")),
    }
}

/// `from` and `to` must not be equal (an empty range).
fn check_hours_range(path: &str, table: &Table, out: &mut Vec<String>) {
    let clock =
        |k: &str, end: bool| table.get(k).and_then(Value::as_str).and_then(|s| values::parse_clock(s, end).ok());
    if let (Some(from), Some(to)) = (clock("from", false), clock("to", true)) {
        if from == to {
            out.push(format!(
                "{path}: empty range (from equals to); for a whole day use from = \"00:00\", to = \"24:00\""
            ));
        }
    }
}

const SECRET_FIELDS: [Field; 3] = [
    opt("secret", Kind::Secret),
    opt("secret_file", Kind::Str(Some(check_non_empty))),
    opt("secret_env", Kind::Str(Some(check_env_name))),
];

static AMI: TableSchema = TableSchema {
    name: "pbx.ami",
    fields: &[
        req("address", Kind::Str(Some(check_address))),
        req("username", Kind::Str(Some(check_non_empty))),
        SECRET_FIELDS[0],
        SECRET_FIELDS[1],
        SECRET_FIELDS[2],
        opt("auth", Kind::OneOf(&["md5", "plain"])),
        opt("tls", Kind::Bool),
        opt("tls_server_name", Kind::Str(Some(check_non_empty))),
        opt("tls_ca_file", Kind::Str(Some(check_non_empty))),
        opt("connect_timeout_seconds", SECONDS),
        opt("action_timeout_seconds", SECONDS),
        opt("ping_interval_seconds", SECONDS),
        opt("reconnect_max_seconds", SECONDS),
        opt("max_frame_bytes", Kind::Count { min: 4096, why: "real AMI events need a few KiB" }),
        opt("max_headers", Kind::Count { min: 16, why: "real AMI events carry dozens of headers" }),
        opt("event_queue_capacity", Kind::Count { min: 1, why: "a queue needs room for one event" }),
    ],
    check: Some(check_secret_source),
};

static PBX: TableSchema = TableSchema {
    name: "pbx",
    fields: &[
        req("name", Kind::Str(Some(check_pbx_name))),
        opt("ticket_variable", Kind::Str(Some(check_variable_name))),
        opt("ami", Kind::Table(&AMI)),
    ],
    check: None,
};

static HOURS: TableSchema = TableSchema {
    name: "groups[].hours[]",
    fields: &[
        req("days", Kind::Str(Some(check_days))),
        req("from", Kind::Str(Some(check_from))),
        req("to", Kind::Str(Some(check_to))),
    ],
    check: Some(check_hours_range),
};

static GROUP: TableSchema = TableSchema {
    name: "groups[]",
    fields: &[
        req("id", Kind::Str(Some(check_id))),
        opt("name", STR),
        req("queue", Kind::Str(Some(check_non_empty))),
        opt("agents", Kind::Strings(None)),
        opt("admins", Kind::Strings(None)),
        opt("timezone", Kind::Str(Some(check_timezone))),
        opt("hours", Kind::Tables(&HOURS)),
        opt("holidays", Kind::Strings(Some(check_date))),
        opt("use_global_holidays", Kind::Bool),
        opt("overflow", Kind::Strings(None)),
        opt("allow_transfer", Kind::Bool),
        opt("redirect_unknown_to", Kind::Str(Some(check_non_empty))),
        opt("redirect_inactive_to", Kind::Str(Some(check_non_empty))),
    ],
    check: None,
};

static AGENT: TableSchema = TableSchema {
    name: "agents[]",
    fields: &[
        req("id", Kind::Str(Some(check_id))),
        opt("name", STR),
        // Required, but checked with the agent named (see check.rs).
        opt("extension", Kind::Str(Some(check_extension))),
        opt("helpdesk_phone", Kind::Str(Some(check_non_empty))),
        opt("helpdesk_login", Kind::Str(Some(check_non_empty))),
    ],
    check: None,
};

static HOLIDAYS: TableSchema =
    TableSchema { name: "holidays", fields: &[opt("dates", Kind::Strings(Some(check_date)))], check: None };

static RECORDINGS: TableSchema =
    TableSchema { name: "recordings", fields: &[opt("url_base", Kind::Str(Some(check_http_url)))], check: None };

static OUTBOUND: TableSchema = TableSchema {
    name: "outbound",
    fields: &[
        opt("context", Kind::Str(Some(check_non_empty))),
        opt("prefix", Kind::Str(Some(check_digits_or_empty))),
        opt("agent_channel", Kind::Str(Some(check_agent_channel))),
        opt("country_code", Kind::Str(Some(check_country_code))),
        opt("international_prefix", Kind::Str(Some(check_digits_or_empty))),
        opt("agent_ring_seconds", Kind::Count { min: 5, why: "a phone needs a few seconds to be picked up" }),
        opt("transfer_context", Kind::Str(Some(check_non_empty))),
    ],
    check: None,
};

fn check_digits_or_empty(s: &str) -> Result<(), String> {
    if s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'*' | b'#')) {
        Ok(())
    } else {
        Err(format!("{s:?} is not a dial prefix (digits, '*', '#')"))
    }
}

fn check_agent_channel(s: &str) -> Result<(), String> {
    if !s.contains("{extension}") {
        return Err(format!("{s:?} does not contain {{extension}} (e.g. \"PJSIP/{{extension}}\")"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?} contains white space"));
    }
    Ok(())
}

fn check_country_code(s: &str) -> Result<(), String> {
    if (1..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(format!("{s:?} is not a country code (1 to 3 digits, without '+')"))
    }
}

static REGISTRY: TableSchema = TableSchema {
    name: "registry",
    fields: &[
        opt(
            "retention_seconds",
            Kind::Count {
                min: 4 * 3600,
                why: "the helpdesk recovers unsaved call tickets up to 4 hours after the call",
            },
        ),
        opt("max_ended_calls", Kind::Count { min: 1, why: "ended calls must stay queryable" }),
    ],
    check: None,
};

static AGI: TableSchema = TableSchema {
    name: "agi",
    fields: &[
        req("listen", Kind::Str(Some(check_listen))),
        opt("max_sessions", Kind::Count { min: 1, why: "the endpoint must serve at least one session" }),
        opt("session_timeout_seconds", SECONDS),
    ],
    check: None,
};

fn check_json_pointer(s: &str) -> Result<(), String> {
    if s.is_empty() || s.starts_with('/') {
        Ok(())
    } else {
        Err(format!("{s:?} is not a JSON pointer (\"\" or starting with '/', e.g. \"/data/active\")"))
    }
}

const LOOKUP_KINDS: &[&str] = &["generic", "zammad"];
const POINTER_KEYS: [&str; 3] = ["found_pointer", "active_pointer", "contact_id_pointer"];

/// `[caller_lookup]`: at most one secret source (exactly one for Zammad);
/// the generic URL names the number; pointers belong to the generic form.
fn check_caller_lookup(path: &str, table: &Table, out: &mut Vec<String>) {
    let zammad = table.get("type").and_then(Value::as_str) == Some("zammad");
    let secrets = SECRET_KEYS.iter().filter(|k| table.contains_key(**k)).count();
    if zammad || secrets > 1 {
        check_secret_source(path, table, out);
    }
    if zammad {
        for key in POINTER_KEYS.iter().filter(|k| table.contains_key(**k)) {
            out.push(format!("{path}.{key}: only for type = \"generic\" (Zammad's answer is read as documented)"));
        }
    } else if let Some(url) = table.get("url").and_then(Value::as_str) {
        if !url.contains("{number}") && !url.contains("{e164}") {
            out.push(format!(
                "{path}.url: {url:?} does not contain {{number}} or {{e164}} (where the caller's number goes)"
            ));
        }
    }
}

static CALLER_LOOKUP: TableSchema = TableSchema {
    name: "caller_lookup",
    fields: &[
        opt("type", Kind::OneOf(LOOKUP_KINDS)),
        req("url", Kind::Str(Some(check_http_url))),
        SECRET_FIELDS[0],
        SECRET_FIELDS[1],
        SECRET_FIELDS[2],
        opt("timeout_ms", Kind::Count { min: 1, why: "a lookup needs some time" }),
        opt("cache_ttl_seconds", Kind::Count { min: 0, why: "0 turns the cache off" }),
        opt("cache_max_entries", Kind::Count { min: 1, why: "the cache needs room for one number" }),
        opt("max_concurrent", Kind::Count { min: 1, why: "at least one lookup must be able to run" }),
        opt(POINTER_KEYS[0], Kind::Str(Some(check_json_pointer))),
        opt(POINTER_KEYS[1], Kind::Str(Some(check_json_pointer))),
        opt(POINTER_KEYS[2], Kind::Str(Some(check_json_pointer))),
        opt("ca_file", Kind::Str(Some(check_non_empty))),
    ],
    check: Some(check_caller_lookup),
};

static SINK_JSONL: TableSchema = TableSchema {
    name: "sinks[] (type = \"jsonl\")",
    fields: &[req("type", STR), opt("name", Kind::Str(Some(check_id))), opt("path", Kind::Str(Some(check_non_empty)))],
    check: None,
};

/// Request settings shared by the HTTP sinks (webhook, Zammad).
const HTTP_SINK_FIELDS: [Field; 6] = [
    opt("timeout_seconds", SECONDS),
    opt("connect_timeout_seconds", SECONDS),
    opt("max_backoff_seconds", SECONDS),
    opt("concurrency", Kind::Count { min: 1, why: "at least one request must be able to run" }),
    opt("ca_file", Kind::Str(Some(check_non_empty))),
    opt("max_retry_seconds", Kind::SecondsOrOff),
];

static SINK_WEBHOOK: TableSchema = TableSchema {
    name: "sinks[] (type = \"webhook\")",
    fields: &[
        req("type", STR),
        opt("name", Kind::Str(Some(check_id))),
        req("url", Kind::Str(Some(check_http_url))),
        SECRET_FIELDS[0],
        SECRET_FIELDS[1],
        SECRET_FIELDS[2],
        opt("batch_size", Kind::Count { min: 1, why: "a request carries at least one event" }),
        HTTP_SINK_FIELDS[0],
        HTTP_SINK_FIELDS[1],
        HTTP_SINK_FIELDS[2],
        HTTP_SINK_FIELDS[3],
        HTTP_SINK_FIELDS[4],
        HTTP_SINK_FIELDS[5],
    ],
    check: Some(check_secret_source),
};

static SINK_ZAMMAD: TableSchema = TableSchema {
    name: "sinks[] (type = \"zammad\")",
    fields: &[
        req("type", STR),
        opt("name", Kind::Str(Some(check_id))),
        req("url", Kind::Str(Some(check_http_url))),
        SECRET_FIELDS[0],
        SECRET_FIELDS[1],
        SECRET_FIELDS[2],
        HTTP_SINK_FIELDS[0],
        HTTP_SINK_FIELDS[1],
        HTTP_SINK_FIELDS[2],
        HTTP_SINK_FIELDS[3],
        HTTP_SINK_FIELDS[4],
        HTTP_SINK_FIELDS[5],
        opt("honour_reject", Kind::Bool),
    ],
    check: Some(check_secret_source),
};

/// A NATS server list: `nats://`, `tls://`, `ws://` URLs or `host:port`,
/// comma-separated.
fn check_nats_url(s: &str) -> Result<(), String> {
    for part in s.split(',').map(str::trim) {
        let rest = ["nats://", "tls://", "ws://", "wss://"].iter().find_map(|p| part.strip_prefix(p)).unwrap_or(part);
        let host_port = rest.rsplit('@').next().unwrap_or(rest);
        if host_port.is_empty() || host_port.contains('/') || host_port.chars().any(char::is_whitespace) {
            return Err(format!(
                "{part:?} is not a NATS server (e.g. \"nats://127.0.0.1:4222\", several separated by commas)"
            ));
        }
        if part.contains("://") && rest.contains('@') {
            return Err(format!(
                "{:?}: put credentials in user/secret, creds_file or nkey_seed_file, not in the URL",
                without_credentials(part)
            ));
        }
    }
    Ok(())
}

fn without_credentials(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, rest)), Some((_, host))) if rest.contains('@') => format!("{scheme}://***@{host}"),
        _ => url.to_string(),
    }
}

/// A NATS subject token taken from configuration: no `.`, wildcards or
/// white space.
pub(crate) fn check_subject_token(s: &str) -> Result<(), String> {
    if s.is_empty() || s.chars().any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control()) {
        Err(format!("{s:?} cannot be one NATS subject token (no '.', '*', '>' or white space)"))
    } else {
        Ok(())
    }
}

/// The placeholders a NATS subject template may hold.
pub(crate) const SUBJECT_PLACEHOLDERS: [&str; 3] = ["{pbx}", "{type}", "{group}"];

/// `callbridge.{pbx}.{type}`: dot-separated tokens, each literal or one
/// placeholder; no wildcards.
pub(crate) fn check_subject_template(s: &str) -> Result<(), String> {
    for token in s.split('.') {
        if SUBJECT_PLACEHOLDERS.contains(&token) {
            continue;
        }
        if token.contains('{') || token.contains('}') {
            return Err(format!(
                "{s:?}: {token:?} is not a placeholder: a token is literal or one of {{pbx}}, {{type}}, {{group}}"
            ));
        }
        check_subject_token(token).map_err(|e| format!("{s:?}: {e}"))?;
    }
    Ok(())
}

/// A subject filter (`callbridge.>`): tokens, `*` or a final `>`.
fn check_subject_filter(s: &str) -> Result<(), String> {
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let wildcard = *token == "*" || (*token == ">" && i + 1 == tokens.len());
        if !wildcard {
            check_subject_token(token).map_err(|e| format!("{s:?}: {e}"))?;
        }
    }
    Ok(())
}

/// One way to authenticate: `creds_file`, `nkey_seed_file`, or the secret
/// (a password with `user`, a token without); `user` needs a password.
fn check_nats_auth(path: &str, table: &Table, out: &mut Vec<String>) {
    let secrets = SECRET_KEYS.iter().filter(|k| table.contains_key(**k)).count();
    if secrets > 1 || table.contains_key("user") {
        check_secret_source(path, table, out);
    }
    let mut ways: Vec<&str> = ["creds_file", "nkey_seed_file"].into_iter().filter(|k| table.contains_key(*k)).collect();
    if secrets > 0 {
        ways.push(if table.contains_key("user") { "user/secret" } else { "secret (token)" });
    }
    if ways.len() > 1 {
        out.push(format!("{path}: {} are all set: choose one way to authenticate", ways.join(", ")));
    }
    if table.contains_key("user") && ways.len() > 1 {
        out.push(format!("{path}.user: a user name goes with a password (secret) only"));
    }
}

const NATS_CONNECTION_FIELDS: [Field; 8] = [
    req("url", Kind::Str(Some(check_nats_url))),
    opt("user", Kind::Str(Some(check_non_empty))),
    SECRET_FIELDS[0],
    SECRET_FIELDS[1],
    SECRET_FIELDS[2],
    opt("creds_file", Kind::Str(Some(check_non_empty))),
    opt("nkey_seed_file", Kind::Str(Some(check_non_empty))),
    opt("ca_file", Kind::Str(Some(check_non_empty))),
];

static SINK_NATS: TableSchema = TableSchema {
    name: "sinks[] (type = \"nats\")",
    fields: &[
        req("type", STR),
        opt("name", Kind::Str(Some(check_id))),
        NATS_CONNECTION_FIELDS[0],
        NATS_CONNECTION_FIELDS[1],
        NATS_CONNECTION_FIELDS[2],
        NATS_CONNECTION_FIELDS[3],
        NATS_CONNECTION_FIELDS[4],
        NATS_CONNECTION_FIELDS[5],
        NATS_CONNECTION_FIELDS[6],
        NATS_CONNECTION_FIELDS[7],
        opt("connect_timeout_seconds", SECONDS),
        opt("subject", Kind::Str(Some(check_subject_template))),
        opt("stream", Kind::Str(Some(check_subject_token))),
        opt("stream_subjects", Kind::Strings(Some(check_subject_filter))),
        opt("replicas", Kind::Count { min: 1, why: "a stream keeps at least one copy" }),
        opt("duplicate_window_seconds", SECONDS),
        opt("max_age_seconds", Kind::SecondsOrOff),
        opt("batch_size", Kind::Count { min: 1, why: "an attempt carries at least one event" }),
        opt("timeout_seconds", SECONDS),
        opt("max_backoff_seconds", SECONDS),
        opt("concurrency", Kind::Count { min: 1, why: "at least one batch must be able to be in flight" }),
        opt("max_retry_seconds", Kind::SecondsOrOff),
    ],
    check: Some(check_nats_sink),
};

fn check_nats_sink(path: &str, table: &Table, out: &mut Vec<String>) {
    check_nats_auth(path, table, out);
    if let Some(n) = table.get("replicas").and_then(Value::as_integer).filter(|n| *n > 5) {
        out.push(format!("{path}.replicas: {n} copies; JetStream keeps at most 5 (use 1, 3 or 5)"));
    }
}

/// A KV bucket name: letters, digits, `-` and `_`.
fn check_bucket(s: &str) -> Result<(), String> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        Err(format!("{s:?} is not a bucket name (letters, digits, '-' and '_')"))
    } else {
        Ok(())
    }
}

/// A KV key: letters, digits and `-_/=.`, not starting or ending with `.`.
pub(crate) fn check_kv_key(s: &str) -> Result<(), String> {
    let chars_ok = s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/' | '=' | '.'));
    if s.is_empty() || !chars_ok || s.starts_with('.') || s.ends_with('.') {
        Err(format!("{s:?} is not a key-value key (letters, digits and '-_/=.', not starting or ending with '.')"))
    } else {
        Ok(())
    }
}

static HA: TableSchema = TableSchema {
    name: "ha",
    fields: &[
        NATS_CONNECTION_FIELDS[0],
        NATS_CONNECTION_FIELDS[1],
        NATS_CONNECTION_FIELDS[2],
        NATS_CONNECTION_FIELDS[3],
        NATS_CONNECTION_FIELDS[4],
        NATS_CONNECTION_FIELDS[5],
        NATS_CONNECTION_FIELDS[6],
        NATS_CONNECTION_FIELDS[7],
        opt("connect_timeout_seconds", SECONDS),
        opt("bucket", Kind::Str(Some(check_bucket))),
        opt("key", Kind::Str(Some(check_kv_key))),
        opt("lease_seconds", Kind::Count { min: 3, why: "the leader renews every third of the lease" }),
        opt("node", Kind::Str(Some(check_id))),
        opt("advertise", Kind::Str(Some(check_non_empty))),
        opt("overlap_seconds", Kind::Count { min: 0, why: "0 redelivers only what the leader had not delivered" }),
        opt("replicas", Kind::Count { min: 1, why: "a bucket keeps at least one copy" }),
    ],
    // The same rules as a NATS sink's connection: one way to authenticate,
    // at most 5 replicas.
    check: Some(check_nats_sink),
};

static OUTBOX: TableSchema = TableSchema {
    name: "outbox",
    fields: &[
        opt("path", Kind::Str(Some(check_non_empty))),
        opt("commit_interval_ms", Kind::Count { min: 0, why: "0 commits as soon as possible" }),
        opt("max_batch_events", Kind::Count { min: 1, why: "a commit holds at least one event" }),
        opt("max_bytes", Kind::Count { min: 0, why: "0 means no cap" }),
        opt("dedup_retention_seconds", Kind::Count { min: 0, why: "0 forgets delivered ids at once" }),
    ],
    check: None,
};

static API: TableSchema = TableSchema {
    name: "api",
    fields: &[
        req("listen", Kind::Str(Some(check_bind_address))),
        SECRET_FIELDS[0],
        SECRET_FIELDS[1],
        SECRET_FIELDS[2],
        opt("metrics_listen", Kind::Str(Some(check_bind_address))),
        opt("max_connections", Kind::Count { min: 1, why: "the API needs at least one connection" }),
        opt("header_read_timeout_seconds", SECONDS),
        opt("idle_timeout_seconds", SECONDS),
        opt("request_timeout_seconds", SECONDS),
        opt("max_body_bytes", Kind::Count { min: 1, why: "a request body of 0 bytes is no limit callbridge can use" }),
        opt("events_window", Kind::Count { min: 1, why: "a reconnecting client resumes from at least the last event" }),
    ],
    check: Some(check_secret_source),
};

const LIMIT: Kind = Kind::Count { min: 1, why: "a limit of zero would flag every call" };

static STUCK: TableSchema = TableSchema {
    name: "stuck",
    fields: &[
        opt("started_seconds", LIMIT),
        opt("queued_seconds", LIMIT),
        opt("ringing_seconds", LIMIT),
        opt("talking_seconds", LIMIT),
        opt("silence_seconds", LIMIT),
        opt("check_interval_seconds", Kind::Count { min: 1, why: "the sweeper needs a period" }),
    ],
    check: None,
};

static INDICATORS: TableSchema = TableSchema {
    name: "indicators",
    fields: &[opt("service_level_seconds", Kind::Count { min: 1, why: "a service level needs a threshold" })],
    check: None,
};

static SIP: TableSchema = TableSchema {
    name: "sip",
    fields: &[
        opt("bind", Kind::Str(Some(check_bind_address))),
        req("pbx", Kind::Str(Some(check_address))),
        opt("transport", Kind::OneOf(&["udp", "tcp"])),
        opt("domain", Kind::Str(Some(check_non_empty))),
        opt("contact_host", Kind::Str(Some(check_non_empty))),
        req("username", Kind::Str(Some(check_non_empty))),
        SECRET_FIELDS[0],
        SECRET_FIELDS[1],
        SECRET_FIELDS[2],
        opt("expires_seconds", Kind::Count { min: 60, why: "PBXs refuse subscriptions shorter than a minute" }),
        opt("options_interval_seconds", Kind::SecondsOrOff),
        opt("request_timeout_seconds", SECONDS),
        opt("retry_max_seconds", SECONDS),
        opt("max_message_bytes", Kind::Count { min: 1500, why: "a SIP message needs at least one datagram" }),
        opt("offer_identity_wait_seconds", Kind::SecondsOrOff),
    ],
    check: Some(check_secret_source),
};

/// The whole file.
pub(crate) static ROOT: TableSchema = TableSchema {
    name: "the top level",
    fields: &[
        req("pbx", Kind::Table(&PBX)),
        opt("groups", Kind::Tables(&GROUP)),
        opt("agents", Kind::Tables(&AGENT)),
        opt("holidays", Kind::Table(&HOLIDAYS)),
        opt("recordings", Kind::Table(&RECORDINGS)),
        opt("outbound", Kind::Table(&OUTBOUND)),
        opt("registry", Kind::Table(&REGISTRY)),
        opt("outbox", Kind::Table(&OUTBOX)),
        opt("api", Kind::Table(&API)),
        opt("stuck", Kind::Table(&STUCK)),
        opt("indicators", Kind::Table(&INDICATORS)),
        opt("sip", Kind::Table(&SIP)),
        opt("agi", Kind::Table(&AGI)),
        opt("caller_lookup", Kind::Table(&CALLER_LOOKUP)),
        opt("ha", Kind::Table(&HA)),
        opt(
            "sinks",
            Kind::TaggedTables {
                tag: "type",
                variants: &[
                    ("jsonl", &SINK_JSONL),
                    ("webhook", &SINK_WEBHOOK),
                    ("zammad", &SINK_ZAMMAD),
                    ("nats", &SINK_NATS),
                ],
            },
        ),
    ],
    check: None,
};

/// "a string", "an integer", … (never the value itself).
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date/time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Walks `table` against `schema`, appending one message per problem.
pub(crate) fn walk(path: &str, table: &Table, schema: &TableSchema, out: &mut Vec<String>) {
    for (key, value) in table {
        let here = join(path, key);
        match schema.fields.iter().find(|f| f.key == key) {
            Some(field) => check_value(&here, value, field.kind, out),
            None => out.push(unknown_key(&here, key, schema)),
        }
    }
    for field in schema.fields.iter().filter(|f| f.required) {
        if !table.contains_key(field.key) {
            let what = match field.kind {
                Kind::Table(_) => format!("missing table [{}]", join(path, field.key)),
                _ => "missing (required)".to_string(),
            };
            out.push(format!("{}: {what}", join(path, field.key)));
        }
    }
    if let Some(check) = schema.check {
        check(if path.is_empty() { "(top level)" } else { path }, table, out);
    }
}

fn unknown_key(here: &str, key: &str, schema: &TableSchema) -> String {
    let known: Vec<&str> = schema.fields.iter().map(|f| f.key).collect();
    let hint = suggest(key, &known).map(|s| format!("; did you mean {s:?}?")).unwrap_or_default();
    format!("{here}: unknown key{hint} (keys of {}: {})", schema.name, known.join(", "))
}

fn check_value(here: &str, value: &Value, kind: Kind, out: &mut Vec<String>) {
    let wrong = |expected: &str, out: &mut Vec<String>| wrong_type(here, value, expected, out);
    match kind {
        Kind::Str(check) => match value.as_str() {
            Some(s) => {
                if let Some(Err(why)) = check.map(|c| c(s)) {
                    out.push(format!("{here}: {why}"));
                }
            }
            None => wrong("a string", out),
        },
        Kind::Secret => match value.as_str() {
            Some("") => out.push(format!("{here}: must not be empty")),
            Some(_) => {}
            None => wrong("a string", out),
        },
        Kind::Bool => {
            if !value.is_bool() {
                wrong("a boolean (true or false)", out)
            }
        }
        Kind::Count { min, why } => match value.as_integer() {
            Some(n) if n < 0 => out.push(format!("{here}: must not be negative")),
            Some(n) if (n as u64) < min => out.push(format!("{here}: must be at least {min} ({why})")),
            Some(_) => {}
            None => wrong("an integer", out),
        },
        Kind::Seconds => check_seconds(here, value, false, out),
        Kind::SecondsOrOff => check_seconds(here, value, true, out),
        Kind::Strings(check) => match value.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_value(&format!("{here}[{i}]"), item, Kind::Str(check), out);
                }
            }
            None => wrong("an array of strings", out),
        },
        Kind::OneOf(choices) => match value.as_str() {
            Some(s) if choices.contains(&s) => {}
            Some(s) => out.push(format!("{here}: {s:?} is not one of {}", choices.join(", "))),
            None => wrong(&format!("a string ({})", choices.join(", ")), out),
        },
        Kind::Table(schema) => match value.as_table() {
            Some(t) => walk(here, t, schema, out),
            None => wrong("a table", out),
        },
        Kind::Tables(schema) => each_table(here, value, out, |at, t, out| walk(at, t, schema, out)),
        Kind::TaggedTables { tag, variants } => {
            each_table(here, value, out, |at, t, out| check_tagged(at, t, tag, variants, out))
        }
    }
}

/// `{here}: expected {expected}, found …`, with a hint for unquoted dates.
fn wrong_type(here: &str, value: &Value, expected: &str, out: &mut Vec<String>) {
    let found = match value {
        Value::Datetime(_) if expected.contains("string") => "a TOML date; write it in quotes (\"YYYY-MM-DD\")",
        v => type_name(v),
    };
    out.push(format!("{here}: expected {expected}, found {found}"));
}

/// A number of seconds (integer or float): > 0, or >= 0 when 0 means off.
fn check_seconds(here: &str, value: &Value, zero_is_off: bool, out: &mut Vec<String>) {
    let secs = match value {
        Value::Integer(n) => Some(*n as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    };
    match secs {
        Some(s) if s.is_finite() && (s > 0.0 || zero_is_off && s == 0.0) => {}
        Some(_) if zero_is_off => out.push(format!("{here}: must be a number of seconds >= 0 (0 turns it off)")),
        Some(_) => out.push(format!("{here}: must be a number of seconds > 0")),
        None => wrong_type(here, value, "a number of seconds", out),
    }
}

/// An array of tables (`[[here]]`): each table checked by `check` at its
/// own path, anything else named.
fn each_table(here: &str, value: &Value, out: &mut Vec<String>, mut check: impl FnMut(&str, &Table, &mut Vec<String>)) {
    let Some(items) = value.as_array() else {
        return wrong_type(here, value, &format!("an array of tables ([[{here}]])"), out);
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("{here}[{i}]");
        match item.as_table() {
            Some(t) => check(&at, t, out),
            None => out.push(format!("{at}: expected a table, found {}", type_name(item))),
        }
    }
}

/// A table whose `tag` key picks its schema (`[[sinks]] type = …`).
fn check_tagged(at: &str, t: &Table, tag: &str, variants: &[(&str, &TableSchema)], out: &mut Vec<String>) {
    let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
    match t.get(tag).map(|v| v.as_str()) {
        None => out.push(format!("{at}.{tag}: missing (required; one of {})", names.join(", "))),
        Some(None) => out.push(format!("{at}.{tag}: expected a string (one of {})", names.join(", "))),
        Some(Some(name)) => match variants.iter().find(|(n, _)| *n == name) {
            Some((_, schema)) => walk(at, t, schema, out),
            None => out.push(format!("{at}.{tag}: unknown {tag} {name:?} (one of {})", names.join(", "))),
        },
    }
}

/// The known word closest to `word`, if it is close enough to be a typo.
pub(crate) fn suggest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = match word.chars().count() {
        0..=4 => 1,
        5..=8 => 2,
        _ => 3,
    };
    known
        .iter()
        .map(|k| (edit_distance(&word.to_lowercase(), &k.to_lowercase()), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Optimal-string-alignment distance (Levenshtein plus transpositions).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: the distance between the first i chars of a and the first j of b.
    let mut d: Vec<Vec<usize>> = (0..=a.len())
        .map(|i| {
            (0..=b.len())
                .map(|j| {
                    if i == 0 {
                        j
                    } else if j == 0 {
                        i
                    } else {
                        0
                    }
                })
                .collect()
        })
        .collect();
    let at = |d: &[Vec<usize>], i: usize, j: usize| d.get(i).and_then(|r| r.get(j)).copied().unwrap_or(usize::MAX / 2);
    for (i, ca) in (1..).zip(&a) {
        for (j, cb) in (1..).zip(&b) {
            let cost = usize::from(ca != cb);
            let mut v = (at(&d, i - 1, j) + 1).min(at(&d, i, j - 1) + 1).min(at(&d, i - 1, j - 1) + cost);
            if i > 1 && j > 1 && b.get(j - 2) == Some(ca) && a.get(i - 2) == Some(cb) {
                v = v.min(at(&d, i - 2, j - 2) + 1);
            }
            if let Some(cell) = d.get_mut(i).and_then(|r| r.get_mut(j)) {
                *cell = v;
            }
        }
    }
    at(&d, a.len(), b.len())
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
mod tests {
    use super::*;

    /// A sample value of the right type for every key.
    fn sample(kind: Kind, key: &str) -> Value {
        match kind {
            Kind::Str(_) | Kind::Secret => Value::String(
                match key {
                    "address" | "metrics_listen" | "bind" | "pbx" => "127.0.0.1:5038",
                    "listen" => "127.0.0.1:4573",
                    "timezone" => "UTC",
                    "days" => "mon-fri",
                    "from" => "08:00",
                    "to" => "18:00",
                    "url" | "url_base" => "https://example.test/{number}",
                    "found_pointer" | "active_pointer" | "contact_id_pointer" => "/x",
                    "redirect_unknown_to" | "redirect_inactive_to" => "x",
                    "secret_env" => "SECRET_VAR",
                    "prefix" | "international_prefix" => "00",
                    "country_code" => "55",
                    "agent_channel" => "PJSIP/{extension}",
                    _ => "x",
                }
                .to_string(),
            ),
            Kind::Bool => Value::Boolean(true),
            Kind::Count { min, .. } => Value::Integer(min as i64),
            Kind::Seconds | Kind::SecondsOrOff => Value::Float(1.5),
            Kind::Strings(_) => Value::Array(vec![Value::String(
                if key == "holidays" || key == "dates" { "2026-12-25" } else { "x" }.into(),
            )]),
            Kind::OneOf(c) => Value::String(c[0].into()),
            Kind::Table(s) => Value::Table(full_table(s, None)),
            Kind::Tables(s) => Value::Array(vec![Value::Table(full_table(s, None))]),
            Kind::TaggedTables { tag, variants } => {
                Value::Array(variants.iter().map(|(name, s)| Value::Table(full_table(s, Some((tag, name))))).collect())
            }
        }
    }

    /// A table with every key of `schema` (one secret source only).
    fn full_table(schema: &TableSchema, tag: Option<(&str, &str)>) -> Table {
        let mut t = Table::new();
        for f in schema.fields {
            if f.key == "secret_file" || f.key == "secret_env" {
                continue;
            }
            t.insert(f.key.to_string(), sample(f.kind, f.key));
        }
        if let Some((k, v)) = tag {
            t.insert(k.to_string(), Value::String(v.to_string()));
        }
        if tag == Some(("type", "nats")) || schema.name == "ha" {
            // One way to authenticate at a time: creds_file here; the
            // others are checked by `nats_auth_variants`.
            t.insert("url".into(), Value::String("nats://127.0.0.1:4222".into()));
            for k in NATS_OTHER_AUTH {
                t.remove(k);
            }
        }
        t
    }

    const NATS_OTHER_AUTH: [&str; 3] = ["user", "secret", "nkey_seed_file"];

    /// The whole document with the NATS sink authenticating each other way.
    fn nats_auth_variants(doc: &Table) -> Vec<Table> {
        let auths: [&[(&str, &str)]; 3] =
            [&[("user", "u"), ("secret", "p")], &[("secret", "token")], &[("nkey_seed_file", "/run/seed")]];
        auths
            .iter()
            .map(|auth| {
                let mut doc = doc.clone();
                let sinks = doc.get_mut("sinks").and_then(Value::as_array_mut).expect("sinks");
                for sink in sinks.iter_mut().filter_map(Value::as_table_mut) {
                    if sink.get("type").and_then(Value::as_str) == Some("nats") {
                        sink.remove("creds_file");
                        for (k, v) in auth.iter() {
                            sink.insert((*k).into(), Value::String((*v).into()));
                        }
                    }
                }
                doc
            })
            .collect()
    }

    #[test]
    fn schema_accepts_every_key() {
        let doc = full_table(&ROOT, None);
        let mut problems = Vec::new();
        walk("", &doc, &ROOT, &mut problems);
        assert!(problems.is_empty(), "{problems:#?}");
        // Every key the schema knows is a field serde knows, with a
        // compatible type (the structs deny unknown fields).
        let parsed: Result<super::super::Config, _> = doc.clone().try_into();
        assert!(parsed.is_ok(), "{parsed:?}");
        // And the secret file/env variants too.
        let mut ami = doc["pbx"]["ami"].as_table().cloned().unwrap_or_default();
        ami.remove("secret");
        ami.insert("secret_file".into(), Value::String("/run/secret".into()));
        let mut doc2 = doc.clone();
        if let Some(pbx) = doc2.get_mut("pbx").and_then(Value::as_table_mut) {
            pbx.insert("ami".into(), Value::Table(ami));
        }
        let parsed: Result<super::super::Config, _> = doc2.try_into();
        assert!(parsed.is_ok(), "{parsed:?}");
        for variant in nats_auth_variants(&doc) {
            let mut problems = Vec::new();
            walk("", &variant, &ROOT, &mut problems);
            assert!(problems.is_empty(), "{problems:#?}");
            let parsed: Result<super::super::Config, _> = variant.try_into();
            assert!(parsed.is_ok(), "{parsed:?}");
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("agnets", &["id", "agents", "admins"]), Some("agents"));
        assert_eq!(suggest("time_zone", &["timezone", "hours"]), Some("timezone"));
        assert_eq!(suggest("colour", &["id", "name"]), None);
    }
}
