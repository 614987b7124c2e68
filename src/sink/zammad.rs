//! The Zammad sink: the call lifecycle mapped onto Zammad's Generic CTI API
//! (`POST {url}/api/v1/cti/{token}`, JSON).
//!
//! | lifecycle | CTI event | fields |
//! | --- | --- | --- |
//! | `call.started` | `newCall` | `from`, `to`, `direction` (`in`/`out`), `callId`, `user` (outbound: the calling agent), `queue` |
//! | `call.answered` | `answer` | + `user`, `answeringNumber` (the agent who answered) |
//! | `call.ended` | `hangup` | + `cause`, `answeringNumber` |
//!
//! Agents are named as Zammad looks them up when it opens the agent's
//! screen on `answer`: `answeringNumber` is the number on the agent's
//! Zammad user (`[[agents]] helpdesk_phone`, by default the extension) and
//! `user` is one string, the agent's Zammad login (`helpdesk_login`, by
//! default the display name). An outbound `newCall` goes from the agent's
//! number to the customer's, with the calling agent as `user`.
//! | anything else | — | acknowledged without a request |
//!
//! `cause`: an answered call ends with `normalClearing`; an unanswered one
//! with `busy` (Q.850 17, 21), `notFound` (1, 2, 3, 22, 28), `congestion`
//! (34, 38, 41, 42, 44, 47, or `end_reason` lost), `cancel` (the caller hung
//! up first) or `noAnswer` (every other case: queue timeout, nobody
//! available, outside hours). `forwarded` is not produced: callbridge follows
//! transfers and reports the final hangup of the call. Internal
//! (agent-to-agent) calls are not sent: Zammad's caller log is about
//! customers.
//!
//! Typed fields are read back from the stored CloudEvent (its field names are
//! the public contract, SPEC §5). This module must never log the token (it
//! is part of the URL).

use super::redact::Redactor;
use super::webhook::{http_client, load_ca_file, retry_budget, secs, send, DEFAULT_RETRY_BUDGET, INITIAL_BACKOFF};
use super::{retry_policy, Attempt, Sink, SinkError};
use crate::backoff::Backoff;
use crate::config::{Config, SinkConfig};
use crate::outbox::Record;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Settings of a [`ZammadSink`] (from `[[sinks]] type = "zammad"`).
#[derive(Debug, Clone)]
pub struct ZammadSettings {
    /// Base URL of the Zammad instance.
    pub url: String,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_backoff: Duration,
    pub concurrency: usize,
    /// Agent id → how Zammad knows the agent.
    pub agents: HashMap<String, ZammadAgent>,
}

/// How Zammad finds an agent: by number first, then by login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZammadAgent {
    /// `answeringNumber`: the phone number on the agent's Zammad user.
    pub number: String,
    /// `user`: the agent's Zammad login.
    pub user: String,
}

/// The agents of a configuration as Zammad knows them.
pub fn agents_of(config: &Config) -> HashMap<String, ZammadAgent> {
    config
        .agents
        .iter()
        .map(|a| {
            let number = a.helpdesk_phone.clone().or_else(|| a.extension.clone()).unwrap_or_else(|| a.id.clone());
            let user = a.helpdesk_login.clone().or_else(|| a.name.clone()).unwrap_or_else(|| a.id.clone());
            (a.id.clone(), ZammadAgent { number, user })
        })
        .collect()
}

/// Posts CTI events to one Zammad instance.
pub struct ZammadSink {
    name: Arc<str>,
    endpoint: reqwest::Url,
    client: reqwest::Client,
    /// Masks the token (and the URL's credentials) in what a refusal reports.
    redactor: Redactor,
    concurrency: usize,
    policy: Backoff,
    /// How long one event is retried before it becomes a dead letter.
    retry_budget: Option<Duration>,
    /// Agent id → how Zammad knows the agent.
    agents: HashMap<String, ZammadAgent>,
}

impl std::fmt::Debug for ZammadSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZammadSink").field("name", &self.name).field("endpoint", &"<redacted>").finish()
    }
}

#[derive(Deserialize)]
struct CloudEvent {
    #[serde(rename = "type")]
    kind: String,
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    call: Option<Call>,
    agent: Option<String>,
    hangup_cause: Option<u32>,
    hung_up_by: Option<String>,
    end_reason: Option<String>,
}

#[derive(Deserialize)]
struct Call {
    id: String,
    direction: String,
    caller: Party,
    callee: Party,
    group: Option<String>,
    queue: Option<String>,
    agent: Option<String>,
    answered_at: Option<String>,
}

#[derive(Deserialize)]
struct Party {
    number: Option<String>,
}

/// Zammad's hangup `cause` for an ended call.
pub fn hangup_cause(
    answered: bool,
    q850: Option<u32>,
    hung_up_by: Option<&str>,
    end_reason: Option<&str>,
) -> &'static str {
    if answered {
        return "normalClearing";
    }
    match q850 {
        Some(17 | 21) => "busy",
        Some(1..=3 | 22 | 28) => "notFound",
        Some(34 | 38 | 41 | 42 | 44 | 47) => "congestion",
        _ if end_reason == Some("lost") => "congestion",
        _ if hung_up_by == Some("caller") => "cancel",
        _ => "noAnswer",
    }
}

impl ZammadSink {
    /// How long one event is retried before it becomes a dead letter
    /// (`None`: for ever). Default: a day.
    pub fn with_retry_budget(mut self, budget: Option<Duration>) -> ZammadSink {
        self.retry_budget = budget;
        self
    }

    pub fn new(name: &str, settings: ZammadSettings, token: &str) -> Result<ZammadSink, String> {
        ZammadSink::with_roots(name, settings, token, &[])
    }

    /// As [`ZammadSink::new`], also trusting the certificate authorities
    /// `roots` (from `ca_file`).
    pub fn with_roots(
        name: &str,
        settings: ZammadSettings,
        token: &str,
        roots: &[reqwest::Certificate],
    ) -> Result<ZammadSink, String> {
        let ZammadSettings { url: base_url, timeout, connect_timeout, max_backoff, concurrency, agents } = settings;
        let base_url = base_url.as_str();
        let base = reqwest::Url::parse(base_url).map_err(|e| format!("url: {e}"))?;
        crate::secret::check_path_token(token)?;
        let endpoint = base
            .join(&format!("{}/api/v1/cti/{token}", base.path().trim_end_matches('/')))
            .map_err(|e| format!("url: {e}"))?;
        let client =
            http_client(timeout, connect_timeout, concurrency, roots).map_err(|e| format!("HTTP client: {e}"))?;
        let redactor = Redactor::for_url(&base, [token]);
        Ok(ZammadSink {
            name: Arc::from(name),
            endpoint,
            client,
            redactor,
            concurrency: concurrency.max(1),
            policy: retry_policy(INITIAL_BACKOFF.min(max_backoff), max_backoff)?,
            retry_budget: Some(DEFAULT_RETRY_BUDGET),
            agents,
        })
    }

    pub fn from_config(index: usize, name: &str, s: &SinkConfig, config: &Config) -> Result<ZammadSink, SinkError> {
        let SinkConfig::Zammad {
            url,
            secret,
            timeout_seconds,
            connect_timeout_seconds,
            max_backoff_seconds,
            concurrency,
            ca_file,
            max_retry_seconds,
            ..
        } = s
        else {
            return Err(SinkError::Config { index, name: name.into(), message: "not a zammad sink".into() });
        };
        let err = |message: String| SinkError::Config { index, name: name.to_string(), message };
        let token = secret.resolve().map_err(err)?;
        let roots = ca_file.as_deref().map(load_ca_file).transpose().map_err(err)?.unwrap_or_default();
        let settings = ZammadSettings {
            url: url.clone(),
            timeout: secs(index, name, "timeout_seconds", *timeout_seconds)?,
            connect_timeout: secs(index, name, "connect_timeout_seconds", *connect_timeout_seconds)?,
            max_backoff: secs(index, name, "max_backoff_seconds", *max_backoff_seconds)?,
            concurrency: *concurrency,
            agents: agents_of(config),
        };
        let sink = ZammadSink::with_roots(name, settings, &token, &roots).map_err(err)?;
        Ok(sink.with_retry_budget(retry_budget(*max_retry_seconds)))
    }

    /// How Zammad knows `agent` (an agent missing from the configuration:
    /// its id for both).
    fn agent(&self, agent: &str) -> ZammadAgent {
        self.agents
            .get(agent)
            .cloned()
            .unwrap_or_else(|| ZammadAgent { number: agent.to_string(), user: agent.to_string() })
    }

    /// The CTI request body for one event (`None`: nothing to send).
    pub fn cti_body(&self, cloudevent_json: &str) -> Result<Option<serde_json::Value>, serde_json::Error> {
        let ev: CloudEvent = serde_json::from_str(cloudevent_json)?;
        let Some(call) = ev.data.call else { return Ok(None) };
        let direction = match call.direction.as_str() {
            "inbound" => "in",
            "outbound" => "out",
            _ => return Ok(None),
        };
        let agent = ev.data.agent.as_deref().or(call.agent.as_deref()).map(|a| self.agent(a));
        let mut from = call.caller.number.clone().unwrap_or_else(|| "anonymous".into());
        if direction == "out" {
            // From the agent, as Zammad knows the agent's number.
            if let Some(a) = &agent {
                from = a.number.clone();
            }
        }
        let to = call.callee.number.clone().unwrap_or_default();
        let mut body = json!({ "from": from, "to": to, "direction": direction, "callId": call.id });
        match ev.kind.as_str() {
            "call.started" => {
                body["event"] = json!("newCall");
                if direction == "out" {
                    if let Some(a) = &agent {
                        body["user"] = json!(a.user);
                    }
                }
                if let Some(q) = call.group.as_deref().or(call.queue.as_deref()) {
                    body["queue"] = json!(q);
                }
            }
            "call.answered" => {
                body["event"] = json!("answer");
                if let Some(a) = &agent {
                    body["user"] = json!(a.user);
                    body["answeringNumber"] = json!(a.number);
                }
            }
            "call.ended" => {
                body["event"] = json!("hangup");
                let cause = hangup_cause(
                    call.answered_at.is_some(),
                    ev.data.hangup_cause,
                    ev.data.hung_up_by.as_deref(),
                    ev.data.end_reason.as_deref(),
                );
                body["cause"] = json!(cause);
                if let (Some(a), Some(_)) = (call.agent.as_deref(), call.answered_at.as_ref()) {
                    body["answeringNumber"] = json!(self.agent(a).number);
                }
            }
            _ => return Ok(None),
        }
        Ok(Some(body))
    }
}

impl Sink for ZammadSink {
    fn name(&self) -> &Arc<str> {
        &self.name
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

    async fn deliver(&self, batch: &[Record]) -> Attempt {
        // batch_size is 1: one CTI event per request.
        let Some(r) = batch.first() else { return Attempt::Skipped };
        let body = match self.cti_body(&r.body) {
            Ok(Some(b)) => b,
            Ok(None) => return Attempt::Skipped,
            Err(e) => return Attempt::Reject { status: None, detail: format!("unreadable stored event: {e}") },
        };
        let req = self
            .client
            .post(self.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        send(req, &self.redactor).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> ZammadSink {
        let agents = [("maria".to_string(), ZammadAgent { number: "2000".into(), user: "maria.silva".into() })]
            .into_iter()
            .collect();
        let d = Duration::from_secs(1);
        let settings = ZammadSettings {
            url: "http://127.0.0.1:9/zammad/".into(),
            timeout: d,
            connect_timeout: d,
            max_backoff: d,
            concurrency: 1,
            agents,
        };
        ZammadSink::new("zammad", settings, "tok").unwrap()
    }

    fn ce(kind: &str, data: serde_json::Value) -> String {
        json!({"specversion": "1.0", "id": "lab:1.0:1", "type": kind, "data": data}).to_string()
    }

    fn call(direction: &str, answered: bool) -> serde_json::Value {
        json!({"id": "1.0", "direction": direction, "caller": {"number": "1198765"}, "callee": {"number": "1130001000"},
               "group": "support", "queue": "700", "agent": "maria",
               "answered_at": if answered { json!("2026-11-23T21:57:06.478Z") } else { json!(null) }})
    }

    #[test]
    fn endpoint_carries_the_token_under_the_base_path() {
        assert_eq!(sink().endpoint.as_str(), "http://127.0.0.1:9/zammad/api/v1/cti/tok");
    }

    #[test]
    fn maps_the_lifecycle_to_cti_events() {
        let s = sink();
        let b = s.cti_body(&ce("call.started", json!({"seq": 1, "call": call("inbound", false)}))).unwrap().unwrap();
        assert_eq!(
            b,
            json!({"event": "newCall", "from": "1198765", "to": "1130001000", "direction": "in", "callId": "1.0", "queue": "support"})
        );
        let b = s
            .cti_body(&ce(
                "call.answered",
                json!({"seq": 3, "call": call("inbound", true), "agent": "maria", "wait_seconds": 2}),
            ))
            .unwrap()
            .unwrap();
        assert_eq!(b["event"], "answer");
        // As Zammad looks the agent up: its number, then one login string.
        assert_eq!(b["user"], json!("maria.silva"));
        assert_eq!(b["answeringNumber"], "2000");
        let b = s
            .cti_body(&ce("call.ended", json!({"seq": 5, "call": call("inbound", true), "hangup_cause": 16, "hung_up_by": "caller", "end_reason": "normal"})))
            .unwrap()
            .unwrap();
        assert_eq!((b["event"].as_str(), b["cause"].as_str()), (Some("hangup"), Some("normalClearing")));
        let b = s
            .cti_body(&ce("call.ended", json!({"seq": 4, "call": call("inbound", false), "hangup_cause": 16, "hung_up_by": "caller", "end_reason": "normal"})))
            .unwrap()
            .unwrap();
        assert_eq!(b["cause"], "cancel");
        assert_eq!(b["answeringNumber"], json!(null), "nobody answered");
        // Outbound: from the agent's number to the customer, the agent as user.
        let b = s.cti_body(&ce("call.started", json!({"seq": 1, "call": call("outbound", false)}))).unwrap().unwrap();
        assert_eq!((b["from"].as_str(), b["to"].as_str()), (Some("2000"), Some("1130001000")));
        assert_eq!((b["direction"].as_str(), b["user"].as_str()), (Some("out"), Some("maria.silva")));
        assert!(s.cti_body(&ce("call.queued", json!({"seq": 2, "call": call("inbound", false)}))).unwrap().is_none());
        assert!(s.cti_body(&ce("call.started", json!({"seq": 1, "call": call("internal", false)}))).unwrap().is_none());
        assert!(s.cti_body(&ce("agent.line", json!({"agent": "maria", "state": "idle"}))).unwrap().is_none());
    }

    #[test]
    fn hangup_causes() {
        assert_eq!(hangup_cause(false, Some(17), Some("system"), Some("normal")), "busy");
        assert_eq!(hangup_cause(false, Some(1), None, None), "notFound");
        assert_eq!(hangup_cause(false, Some(34), None, None), "congestion");
        assert_eq!(hangup_cause(false, Some(16), Some("system"), Some("normal")), "noAnswer");
        assert_eq!(hangup_cause(false, None, None, Some("lost")), "congestion");
    }
}
