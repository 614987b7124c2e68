//! The NATS JetStream sink: each event is published to a subject of the
//! configured stream, and counts as delivered only once the stream's
//! `PubAck` arrived (SPEC §6).
//!
//! The message is the event's CloudEvents JSON (structured mode, the same
//! body the webhook sink posts) with headers: `Nats-Msg-Id` = the event id
//! (deterministic, so JetStream drops a redelivery inside the stream's
//! duplicate window and answers it with a duplicate `PubAck`, which
//! acknowledges too), `Content-Type: application/cloudevents+json`, and
//! `ce-specversion`, `ce-id`, `ce-type`, `ce-source`, `ce-time` so that
//! consumers can route without parsing the body; with `[ha]`,
//! `Callbridge-Node`: which instance of the pair published it.
//!
//! **Ordering.** The runner hands a batch holding several calls' events,
//! each call's in order, and never two batches of one call at once. A batch
//! is published in waves: the first event of every call in it, then, once
//! all of their PubAcks are in, the second of every call, and so on. Within a
//! wave the publishes are pipelined on the one connection (asynchronous
//! acks), so throughput comes from the number of calls in flight, while a
//! call's event is never published before its predecessor is stored: a
//! connection lost mid-wave cannot store a later event without the earlier
//! one. A failed wave fails the batch; the retry publishes the whole batch
//! again, and JetStream de-duplicates what was stored already.
//!
//! Outcomes: every PubAck (new or duplicate) → delivered; no connection,
//! broken pipe → `network`; no PubAck within `timeout_seconds` → `timeout`;
//! no stream for the subject (no responders) or an error from the stream →
//! `5xx`; all retried with the sink backoff, parked only past the retry
//! budget. This module must never log a credential.

use super::{retry_policy, Attempt, Sink, SinkError, StatusClass};
use crate::backoff::Backoff;
use crate::config::{Config, NatsConnectionConfig, SecretSource, SinkConfig};
use crate::outbox::Record;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

/// First retry delay; doubles up to `max_backoff_seconds`.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The subject token standing for "no group" in `{group}`.
pub const NO_GROUP: &str = "_";
/// Longest pause between reconnection attempts to the NATS servers.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// A subject template (`callbridge.{pbx}.{type}`), split once.
#[derive(Debug, Clone)]
pub struct SubjectTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Type,
    Group,
}

impl SubjectTemplate {
    /// `{pbx}` is fixed now; `{type}` and `{group}` per event. The template
    /// was checked with the configuration (tokens, placeholders).
    pub fn new(template: &str, pbx: &str) -> SubjectTemplate {
        let mut parts = Vec::new();
        for token in template.split('.') {
            let part = match token {
                "{pbx}" => Part::Literal(pbx.to_string()),
                "{type}" => Part::Type,
                "{group}" => Part::Group,
                other => Part::Literal(other.to_string()),
            };
            match (parts.last_mut(), part) {
                (Some(Part::Literal(prev)), Part::Literal(next)) => {
                    prev.push('.');
                    prev.push_str(&next);
                }
                (_, part) => parts.push(part),
            }
        }
        SubjectTemplate { parts }
    }

    pub fn uses_group(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Group))
    }

    /// The subject of an event of type `kind` in `group`.
    pub fn render(&self, kind: &str, group: Option<&str>) -> String {
        let mut s = String::with_capacity(64);
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                s.push('.');
            }
            match part {
                Part::Literal(l) => s.push_str(l),
                Part::Type => s.push_str(kind),
                Part::Group => s.push_str(group.filter(|g| !g.is_empty()).unwrap_or(NO_GROUP)),
            }
        }
        s
    }
}

/// The stream's subjects when `stream_subjects` is not set: the template's
/// literal tokens up to the first placeholder, then `>` (`callbridge.>`):
/// one stream for every site.
pub fn default_stream_subjects(template: &str) -> Vec<String> {
    let literal: Vec<&str> = template.split('.').take_while(|t| !t.starts_with('{')).collect();
    if literal.is_empty() {
        vec![">".to_string()]
    } else {
        vec![format!("{}.>", literal.join("."))]
    }
}

/// Connection options of a `NatsConnectionConfig`: credentials read now
/// (files, secrets), never logged.
pub fn connect_options(
    conn: &NatsConnectionConfig,
    secret: &SecretSource,
    client_name: &str,
) -> Result<async_nats::ConnectOptions, String> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(client_name)
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            INITIAL_BACKOFF.saturating_mul(1u32 << attempts.min(8) as u32).min(MAX_RECONNECT_DELAY)
        })
        .connection_timeout(
            Duration::try_from_secs_f64(conn.connect_timeout_seconds)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| "connect_timeout_seconds must be a positive number of seconds".to_string())?,
        );
    if let Some(path) = &conn.creds_file {
        let creds = std::fs::read_to_string(path).map_err(|e| format!("creds_file {path:?}: {e}"))?;
        opts = opts.credentials(&creds).map_err(|e| format!("creds_file {path:?}: {e}"))?;
    } else if let Some(path) = &conn.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|e| format!("nkey_seed_file {path:?}: {e}"))?;
        let seed = seed.trim().to_string();
        if !seed.starts_with('S') || nkeys_seed_invalid(&seed) {
            return Err(format!("nkey_seed_file {path:?}: not an NKey seed (a line starting with \"S\")"));
        }
        opts = opts.nkey(seed);
    } else if secret.is_set() {
        let secret = secret.resolve()?;
        opts = match &conn.user {
            Some(user) => opts.user_and_password(user.clone(), secret),
            None => opts.token(secret),
        };
    }
    if let Some(ca) = &conn.ca_file {
        if !std::path::Path::new(ca).is_file() {
            return Err(format!("ca_file {ca:?}: no such file"));
        }
        opts = opts.add_root_certificates(ca.into()).require_tls(true);
    }
    Ok(opts)
}

/// Whether an NKey seed cannot be decoded (checked at start rather than at
/// the first connection).
fn nkeys_seed_invalid(seed: &str) -> bool {
    seed.len() < 50 || seed.chars().any(|c| !c.is_ascii_alphanumeric())
}

/// The server list of `url` (comma-separated).
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    url.split(',')
        .map(str::trim)
        .map(|u| u.parse::<async_nats::ServerAddr>().map_err(|e| format!("url {u:?}: {e}")))
        .collect()
}

/// Publishes events into JetStream.
pub struct NatsSink {
    name: Arc<str>,
    servers: Vec<async_nats::ServerAddr>,
    /// The connection is made at the first delivery (so that a server down
    /// at start is retried like any other outage), with options built anew
    /// for each try (they were checked once at start).
    connection: NatsConnectionConfig,
    secret: SecretSource,
    client_name: String,
    context: OnceCell<async_nats::jetstream::Context>,
    subject: SubjectTemplate,
    batch_size: usize,
    concurrency: usize,
    timeout: Duration,
    policy: Backoff,
    retry_budget: Option<Duration>,
    /// `[ha] node`: which instance of a hot-standby pair published
    /// (header `Callbridge-Node`).
    node: Option<String>,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink").field("name", &self.name).field("subject", &self.subject).finish()
    }
}

/// What a body says that the headers and the subject need.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    source: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    time: std::borrow::Cow<'a, str>,
    #[serde(default)]
    data: Option<HeadData>,
}

#[derive(serde::Deserialize)]
struct HeadData {
    #[serde(default)]
    call: Option<HeadCall>,
}

#[derive(serde::Deserialize)]
struct HeadCall {
    #[serde(default)]
    group: Option<String>,
}

impl NatsSink {
    pub fn from_config(index: usize, name: &str, config: &Config, sink: &SinkConfig) -> Result<NatsSink, SinkError> {
        let SinkConfig::Nats {
            connection,
            secret,
            subject,
            batch_size,
            timeout_seconds,
            max_backoff_seconds,
            concurrency,
            max_retry_seconds,
            ..
        } = sink
        else {
            return Err(SinkError::Config { index, name: name.into(), message: "not a nats sink".into() });
        };
        let err = |message: String| SinkError::Config { index, name: name.to_string(), message };
        let servers = server_addrs(&connection.url).map_err(err)?;
        let client_name = format!("callbridge {} {name}", config.pbx.name);
        connect_options(connection, secret, &client_name).map_err(err)?;
        let max_backoff = super::webhook::secs(index, name, "max_backoff_seconds", *max_backoff_seconds)?;
        let policy = retry_policy(INITIAL_BACKOFF.min(max_backoff), max_backoff).map_err(err)?;
        Ok(NatsSink {
            name: Arc::from(name),
            servers,
            connection: connection.clone(),
            secret: secret.clone(),
            client_name,
            context: OnceCell::new(),
            subject: SubjectTemplate::new(subject, &config.pbx.name),
            batch_size: (*batch_size).max(1),
            concurrency: (*concurrency).max(1),
            timeout: super::webhook::secs(index, name, "timeout_seconds", *timeout_seconds)?,
            policy,
            retry_budget: super::webhook::retry_budget(*max_retry_seconds),
            node: config.ha.as_ref().map(|h| h.node_name()),
        })
    }

    /// The JetStream context, connecting on first use. A failed first
    /// connection is retried by the next attempt; once connected, the
    /// client reconnects by itself for ever.
    async fn context(&self) -> Result<&async_nats::jetstream::Context, Attempt> {
        self.context
            .get_or_try_init(|| async {
                let options = connect_options(&self.connection, &self.secret, &self.client_name)
                    .map_err(|e| retry(StatusClass::Io, format!("cannot prepare the connection: {e}")))?;
                let client = options
                    .connect(self.servers.as_slice())
                    .await
                    .map_err(|e| retry(StatusClass::Network, format!("cannot connect to NATS: {e}")))?;
                let in_flight = self.batch_size.saturating_mul(self.concurrency).max(1);
                Ok(async_nats::jetstream::context::ContextBuilder::new()
                    .timeout(self.timeout)
                    .max_ack_inflight(in_flight)
                    .backpressure_on_inflight(true)
                    .build(client))
            })
            .await
    }

    /// Subject, headers and payload of one event.
    pub fn message(&self, r: &Record) -> (String, HeaderMap, Bytes) {
        // The body is parsed only for the group (a template with
        // `{group}`): `source` and `time` are read off its first fields.
        let head: Option<Head> = if self.subject.uses_group() { serde_json::from_str(&r.body).ok() } else { None };
        let group = head.as_ref().and_then(|h| h.data.as_ref()?.call.as_ref()?.group.as_deref());
        let subject = self.subject.render(&r.kind, group);
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, &*r.id);
        headers.insert("Content-Type", "application/cloudevents+json");
        headers.insert("ce-specversion", "1.0");
        headers.insert("ce-id", &*r.id);
        headers.insert("ce-type", &*r.kind);
        let head_str =
            |key: &str, parsed: Option<&str>| parsed.map(str::to_string).or_else(|| top_level_str(&r.body, key));
        let parsed = head.as_ref();
        if let Some(source) = head_str("source", parsed.map(|h| h.source.as_ref())) {
            headers.insert("ce-source", source.as_str());
        }
        if let Some(time) = head_str("time", parsed.map(|h| h.time.as_ref())) {
            headers.insert("ce-time", time.as_str());
        }
        if let Some(node) = &self.node {
            headers.insert("Callbridge-Node", node.as_str());
        }
        (subject, headers, Bytes::copy_from_slice(r.body.as_bytes()))
    }

    /// Publishes one wave (at most one event per call) and waits for every
    /// PubAck.
    async fn publish_wave(&self, js: &async_nats::jetstream::Context, wave: &[&Record]) -> Attempt {
        let mut acks = Vec::with_capacity(wave.len());
        for r in wave {
            let (subject, headers, payload) = self.message(r);
            match js.send_publish(subject, PublishMessage::build().payload(payload).headers(headers)).await {
                Ok(ack) => acks.push(ack),
                Err(e) => return publish_failure(&e),
            }
        }
        for ack in acks {
            if let Err(e) = ack.await {
                return publish_failure(&e);
            }
        }
        Attempt::Delivered
    }
}

/// The value of a string member of the event's top-level object. The
/// CloudEvents JSON callbridge writes has `id`, `source`, `type` and
/// `time` before `data`, and none of their values holds a quote, so the
/// first `"key":"` is the member. A value with an escape is decoded by a
/// full parse.
fn top_level_str(body: &str, key: &str) -> Option<String> {
    let pattern = format!("\"{key}\":\"");
    let start = body.find(&pattern)? + pattern.len();
    let len = body[start..].find('"')?;
    let value = &body[start..start + len];
    if !value.contains('\\') {
        return Some(value.to_string());
    }
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get(key)?.as_str().map(str::to_string)
}

fn retry(class: StatusClass, detail: String) -> Attempt {
    Attempt::Retry { class, retry_after: None, detail }
}

fn publish_failure(e: &async_nats::jetstream::context::PublishError) -> Attempt {
    let class = match e.kind() {
        PublishErrorKind::TimedOut => StatusClass::Timeout,
        PublishErrorKind::BrokenPipe | PublishErrorKind::MaxAckPending => StatusClass::Network,
        PublishErrorKind::StreamNotFound => {
            return retry(StatusClass::S5xx, "no stream captures the subject (no responders)".into())
        }
        _ => StatusClass::S5xx,
    };
    retry(class, format!("publish: {e}"))
}

/// Splits a batch into waves: the n-th wave holds the n-th event of each
/// ordering key (in batch order).
pub fn waves(batch: &[Record]) -> Vec<Vec<&Record>> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut waves: Vec<Vec<&Record>> = Vec::new();
    for r in batch {
        let n = seen.entry(&*r.key).or_insert(0);
        if waves.len() <= *n {
            waves.push(Vec::new());
        }
        waves[*n].push(r);
        *n += 1;
    }
    waves
}

impl Sink for NatsSink {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn retry_policy(&self) -> Backoff {
        self.policy
    }

    fn retry_budget(&self) -> Option<Duration> {
        self.retry_budget
    }

    async fn deliver(&self, batch: &[Record], _attempt: u32) -> Attempt {
        let js = match self.context().await {
            Ok(js) => js,
            Err(a) => return a,
        };
        for wave in waves(batch) {
            // The acks time out on their own; this bounds the publishes,
            // which wait while the client is disconnected and its buffer full.
            match tokio::time::timeout(self.timeout * 2, self.publish_wave(js, &wave)).await {
                Ok(Attempt::Delivered) => {}
                Ok(other) => return other,
                Err(_) => return retry(StatusClass::Timeout, "publish: timed out (no connection?)".into()),
            }
        }
        Attempt::Delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(pos: i64, key: &str) -> Record {
        let body = format!(
            r#"{{"id":"lab:{key}:{pos}","source":"callbridge/lab","time":"2026-11-23T21:57:06.478Z","data":{{"call":{{"group":"support"}}}}}}"#
        );
        Record::for_test(pos, key, "call.answered", &body)
    }

    #[test]
    fn subjects_follow_the_template() {
        let t = SubjectTemplate::new("callbridge.{pbx}.{type}", "lab");
        assert_eq!(t.render("call.answered", None), "callbridge.lab.call.answered");
        assert!(!t.uses_group());
        let t = SubjectTemplate::new("cb.{pbx}.{group}.{type}", "lab");
        assert_eq!(t.render("call.ended", Some("support")), "cb.lab.support.call.ended");
        assert_eq!(t.render("call.ended", None), "cb.lab._.call.ended");
        assert_eq!(default_stream_subjects("callbridge.{pbx}.{type}"), vec!["callbridge.>"]);
        assert_eq!(default_stream_subjects("a.b.{type}"), vec!["a.b.>"]);
        assert_eq!(default_stream_subjects("{pbx}.{type}"), vec![">"]);
    }

    #[test]
    fn waves_hold_one_event_per_call_in_order() {
        let batch = [rec(1, "a"), rec(2, "a"), rec(3, "b"), rec(4, "a"), rec(5, "c")];
        let w: Vec<Vec<i64>> = waves(&batch).iter().map(|w| w.iter().map(|r| r.pos).collect()).collect();
        assert_eq!(w, vec![vec![1, 3, 5], vec![2], vec![4]]);
    }

    #[test]
    fn messages_carry_the_id_and_cloudevents_headers() {
        let c = Config::parse(
            "[pbx]\nname = \"lab\"\n[[sinks]]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"cb.{pbx}.{group}.{type}\"\n",
            "test",
        )
        .unwrap();
        let sink = NatsSink::from_config(0, "nats", &c, &c.sinks[0]).unwrap();
        let (subject, h, _) = sink.message(&rec(7, "1.0"));
        assert_eq!(subject, "cb.lab.support.call.answered");
        assert_eq!(h.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.as_str()), Some("lab:1.0:7"));
        assert_eq!(h.get("ce-id").map(|v| v.as_str()), Some("lab:1.0:7"));
        assert_eq!(h.get("ce-type").map(|v| v.as_str()), Some("call.answered"));
        assert_eq!(h.get("ce-source").map(|v| v.as_str()), Some("callbridge/lab"));
        assert_eq!(h.get("ce-time").map(|v| v.as_str()), Some("2026-11-23T21:57:06.478Z"));
    }

    #[test]
    fn headers_are_read_off_the_body_without_parsing_it_and_agree_with_a_parse() {
        let c =
            Config::parse("[pbx]\nname = \"lab\"\n[[sinks]]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\n", "t")
                .unwrap();
        let sink = NatsSink::from_config(0, "nats", &c, &c.sinks[0]).unwrap();
        let (subject, h, _) = sink.message(&rec(7, "1.0"));
        assert_eq!(subject, "callbridge.lab.call.answered");
        assert_eq!(h.get("ce-source").map(|v| v.as_str()), Some("callbridge/lab"));
        assert_eq!(h.get("ce-time").map(|v| v.as_str()), Some("2026-11-23T21:57:06.478Z"));
        // Real bodies: the scan and a parse agree on every event of a11.
        let root = env!("CARGO_MANIFEST_DIR");
        let lab = Config::load(std::path::Path::new(&format!("{root}/config/lab.toml"))).unwrap();
        let events = crate::replay::events_of(&lab, &[format!("{root}/fixtures/ami/a11-concurrent-mix.ami")]).unwrap();
        for e in &events {
            let body = e.to_cloudevent_json("lab");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            for key in ["source", "time"] {
                assert_eq!(top_level_str(&body, key).as_deref(), v[key].as_str(), "{key} of {body}");
            }
        }
        assert_eq!(top_level_str(r#"{"source":"a\"b","time":"t"}"#, "source").as_deref(), Some("a\"b"));
    }

    #[test]
    fn bad_nats_configurations_are_refused_with_the_field_named() {
        let parse =
            |sink: &str| Config::parse(&format!("[pbx]\nname = \"lab\"\n[[sinks]]\ntype = \"nats\"\n{sink}"), "t");
        let e = parse("url = \"nats://x:4222\"\nsubject = \"cb.{pbx}.*\"\n").unwrap_err().to_string();
        assert!(e.contains("sinks[0].subject"), "{e}");
        let e = parse("url = \"nats://x:4222\"\nsubject = \"cb.{site}.{type}\"\n").unwrap_err().to_string();
        assert!(e.contains("not a placeholder"), "{e}");
        let e = parse("url = \"nats://x:4222\"\nuser = \"u\"\n").unwrap_err().to_string();
        assert!(e.contains("no secret"), "{e}");
        let e = parse("url = \"nats://x:4222\"\ncreds_file = \"a\"\nsecret = \"hunter2\"\n").unwrap_err().to_string();
        assert!(e.contains("one way to authenticate") && !e.contains("hunter2"), "{e}");
        let e = parse("url = \"nats://u:hunter2@x:4222\"\n").unwrap_err().to_string();
        assert!(e.contains("not in the URL") && !e.contains("hunter2"), "{e}");
        let e = parse("url = \"nats://x:4222\"\nreplicas = 7\n").unwrap_err().to_string();
        assert!(e.contains("replicas"), "{e}");
        let e = parse("url = \"nats://x:4222\"\nstream = \"a.b\"\n").unwrap_err().to_string();
        assert!(e.contains("sinks[0].stream"), "{e}");
        let e = Config::parse("[pbx]\nname = \"lab.1\"\n[[sinks]]\ntype = \"nats\"\nurl = \"nats://x:4222\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pbx.name"), "{e}");
        assert!(parse("url = \"nats://a:4222, nats://b:4222\"\nuser = \"u\"\nsecret = \"p\"\n").is_ok());
        assert!(parse("url = \"127.0.0.1:4222\"\nsecret_env = \"NATS_TOKEN\"\n").is_ok());
    }
}
