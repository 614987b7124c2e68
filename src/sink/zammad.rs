//! The Zammad sink: the call lifecycle mapped onto Zammad's Generic CTI API
//! (`POST {url}/api/v1/cti/{token}`, JSON).
//!
//! | lifecycle | CTI event | fields |
//! | --- | --- | --- |
//! | `call.started` | `newCall` | `from`, `to`, `direction` (`in`/`out`), `callId`, `user` (outbound: the calling agent), `queue` |
//! | `call.answered` | `answer` | + `user`, `answeringNumber` (the agent who answered) |
//! | `call.ended` | `hangup` | + `cause`, `answeringNumber` |
//! | anything else | — | acknowledged without a request |
//!
//! Agents are named as Zammad looks them up when it opens the agent's
//! screen on `answer`: `answeringNumber` is the number on the agent's
//! Zammad user (`[[agents]] helpdesk_phone`, by default the extension) and
//! `user` is one string, the agent's Zammad login (`helpdesk_login`, by
//! default the display name). An outbound `newCall` goes from the agent's
//! number to the customer's, with the calling agent as `user`.
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
//! # Zammad's answers (`Integration::CtiController`, `Cti::Driver::Base`, `Cti::Log`)
//!
//! - `200 {"action": "reject", "reason": "busy"}` to an inbound `newCall`:
//!   the caller is one of Zammad's blocked caller ids. With
//!   `honour_reject`, the caller is hung up through a [`CallBlocker`] (the
//!   call ends `missed`/`blocked`); without it the reject is only logged.
//!   Either way it is counted in `callbridge_zammad_rejects_total`. Other
//!   `action`s (`dial`: Zammad's outbound caller id rewrite) cannot apply to
//!   a call the PBX already placed and are ignored.
//! - `401` (wrong token) and `422` (`Invalid direction!`, feature disabled
//!   or not configured): refused for good, a dead letter.
//! - `500` with Zammad's JSON error body: `Cti::Log` raises for a `newCall`
//!   whose `callId` it already has (`Object already exists!`: an earlier
//!   attempt got through and its answer was lost, so it counts as
//!   delivered) and for an `answer`/`hangup` of a `callId` it does not know
//!   (its `newCall` was refused, or the caller log was pruned). Zammad
//!   answers that with `No such call_id …` (older releases) or, since it
//!   masks exceptions from clients that are not admins, with only
//!   `Error ID …: Please contact your administrator.`: the body cannot be
//!   relied on to say the call is unknown. So an `answer`/`hangup` Zammad
//!   still answers with its own 500 after [`UNKNOWN_CALL_ATTEMPTS`] attempts
//!   is taken for one of an unknown call: the `answer` becomes a dead letter
//!   (with Zammad's answer as the reason) and the call's later events go on;
//!   the `hangup` is sent as `newCall` (+ `answer` without an agent, so no
//!   screen opens after the call, when the call was answered) + `hangup`, so
//!   Zammad's caller log still gets the call. A 5xx without Zammad's body
//!   (a proxy's 502/503/504) is retried within the retry budget like any.
//!
//! Requests ask for JSON (`Accept: application/json`), so that Rails
//! renders errors as JSON rather than as its HTML error page.
//!
//! Typed fields are read back from the stored CloudEvent (its field names are
//! the public contract, SPEC §5). This module must never log the token (it
//! is part of the URL): every text from a response passes the sink's
//! [`Redactor`] first.

use super::redact::Redactor;
use super::webhook::{
    body_excerpt, http_client, load_ca_file, retry_after_of, retry_budget, secs, transport_failure,
    DEFAULT_RETRY_BUDGET, INITIAL_BACKOFF, REASON_BYTES,
};
use super::{classify_status, retry_policy, Attempt, Sink, SinkError};
use crate::backoff::Backoff;
use crate::config::{Config, SinkConfig};
use crate::outbox::Record;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

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
    /// Hang up a caller Zammad rejects (`honour_reject`).
    pub honour_reject: bool,
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

/// Attempts of an `answer`/`hangup` that Zammad answers with its own 500
/// before the call counts as unknown to Zammad (see the module docs): a few,
/// so that a passing failure inside Zammad is ridden out, and few enough
/// that the call's later events wait about a second, not a day.
pub const UNKNOWN_CALL_ATTEMPTS: u32 = 5;

/// How the Zammad sink hangs up a caller Zammad rejected: through the
/// control path (the pipeline marks the call, then the PBX hangs up the
/// caller's channel). Built by the wiring; the sink knows nothing of the
/// PBX.
pub trait CallBlocker: Send + Sync + 'static {
    /// Blocks the caller of live call `call`.
    fn block<'a>(&'a self, call: &'a str) -> Pin<Box<dyn Future<Output = BlockOutcome> + Send + 'a>>;
}

/// What became of a caller Zammad rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockOutcome {
    /// The call is marked blocked and the PBX accepted the hangup of the
    /// caller's channel (`channel`).
    HungUp { channel: String },
    /// The call was answered, is outbound or has ended by now: nothing done.
    TooLate,
    /// The PBX could not be asked or refused the hangup (the mark is taken
    /// back); the reason.
    Failed(String),
}

/// `result` label values of `callbridge_zammad_rejects_total`.
pub const REJECT_RESULTS: [&str; 4] = ["hung_up", "ignored", "too_late", "failed"];

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
    honour_reject: bool,
    /// How a rejected caller is hung up (`None`: no PBX, e.g. a replay).
    blocker: Option<Arc<dyn CallBlocker>>,
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

/// The CTI events callbridge sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtiEvent {
    NewCall,
    Answer,
    Hangup,
}

impl CtiEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            CtiEvent::NewCall => "newCall",
            CtiEvent::Answer => "answer",
            CtiEvent::Hangup => "hangup",
        }
    }
}

/// One CTI request, and how to re-create its call in Zammad.
#[derive(Debug, Clone)]
pub struct CtiRequest {
    pub event: CtiEvent,
    pub call_id: String,
    pub inbound: bool,
    pub body: Value,
    /// Sent before a `hangup` of a call Zammad does not know: its `newCall`,
    /// and an `answer` without an agent if it was answered (so Zammad logs it
    /// as answered, and no agent's screen opens after the call).
    pub recreate: Vec<Value>,
}

/// What Zammad's refusal of one request means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A `newCall` Zammad already has: an earlier attempt got through.
    AlreadyThere,
    /// An `answer`/`hangup` of a call Zammad does not know (see the module
    /// docs for why that is a guess after [`UNKNOWN_CALL_ATTEMPTS`]).
    UnknownCall,
    /// Classified by status, like any HTTP sink's.
    ByStatus,
}

/// Judges Zammad's refusal (`status`, the `error` of its JSON body if it
/// has one) of `event` at attempt `attempt` (0: the first).
pub fn judge(event: CtiEvent, status: u16, error: Option<&str>, attempt: u32) -> Verdict {
    let Some(error) = error.filter(|_| status == 500) else { return Verdict::ByStatus };
    match event {
        CtiEvent::NewCall if error.to_ascii_lowercase().contains("already exists") => Verdict::AlreadyThere,
        CtiEvent::Answer | CtiEvent::Hangup if attempt.saturating_add(1) >= UNKNOWN_CALL_ATTEMPTS => {
            Verdict::UnknownCall
        }
        _ => Verdict::ByStatus,
    }
}

/// What Zammad answered to one request.
enum Answer {
    /// 2xx, with the body's `action` if any.
    Accepted {
        action: Option<String>,
    },
    Refused(Refusal),
    /// No answer (network, timeout): already the attempt's outcome.
    Unreachable(Attempt),
}

/// A non-2xx answer, its texts scrubbed of the token.
struct Refusal {
    status: u16,
    retry_after: Option<Duration>,
    /// The `error` of Zammad's JSON body (absent: not Zammad's answer, e.g.
    /// a proxy's).
    error: Option<String>,
    excerpt: String,
}

impl Refusal {
    fn attempt(self, context: &str) -> Attempt {
        let Refusal { status, retry_after, excerpt, .. } = self;
        classify_status(status, retry_after, || format!("{context}HTTP {status}: {excerpt}"))
    }
}

fn reject_counter(sink: &str, result: &'static str) -> metrics::Counter {
    metrics::counter!("callbridge_zammad_rejects_total", "sink" => sink.to_string(), "result" => result)
}

impl ZammadSink {
    /// How long one event is retried before it becomes a dead letter
    /// (`None`: for ever). Default: a day.
    pub fn with_retry_budget(mut self, budget: Option<Duration>) -> ZammadSink {
        self.retry_budget = budget;
        self
    }

    /// How a caller Zammad rejects is hung up (with `honour_reject`).
    pub fn with_blocker(mut self, blocker: Option<Arc<dyn CallBlocker>>) -> ZammadSink {
        self.blocker = blocker;
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
        let ZammadSettings { url: base_url, timeout, connect_timeout, max_backoff, concurrency, agents, honour_reject } =
            settings;
        let base_url = base_url.as_str();
        let base = reqwest::Url::parse(base_url).map_err(|e| format!("url: {e}"))?;
        crate::secret::check_path_token(token)?;
        let endpoint = base
            .join(&format!("{}/api/v1/cti/{token}", base.path().trim_end_matches('/')))
            .map_err(|e| format!("url: {e}"))?;
        let client =
            http_client(timeout, connect_timeout, concurrency, roots).map_err(|e| format!("HTTP client: {e}"))?;
        let redactor = Redactor::for_url(&base, [token]);
        // Exported at 0 from the start, so that rate() and alerts work.
        for result in REJECT_RESULTS {
            reject_counter(name, result).increment(0);
        }
        Ok(ZammadSink {
            name: Arc::from(name),
            endpoint,
            client,
            redactor,
            concurrency: concurrency.max(1),
            policy: retry_policy(INITIAL_BACKOFF.min(max_backoff), max_backoff)?,
            retry_budget: Some(DEFAULT_RETRY_BUDGET),
            agents,
            honour_reject,
            blocker: None,
        })
    }

    pub fn from_config(
        index: usize,
        name: &str,
        s: &SinkConfig,
        config: &Config,
        blocker: Option<Arc<dyn CallBlocker>>,
    ) -> Result<ZammadSink, SinkError> {
        let SinkConfig::Zammad {
            url,
            secret,
            timeout_seconds,
            connect_timeout_seconds,
            max_backoff_seconds,
            concurrency,
            ca_file,
            max_retry_seconds,
            honour_reject,
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
            honour_reject: *honour_reject,
        };
        let sink = ZammadSink::with_roots(name, settings, &token, &roots).map_err(err)?;
        Ok(sink.with_retry_budget(retry_budget(*max_retry_seconds)).with_blocker(blocker))
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
    pub fn cti_body(&self, cloudevent_json: &str) -> Result<Option<Value>, serde_json::Error> {
        Ok(self.cti_request(cloudevent_json)?.map(|r| r.body))
    }

    /// The CTI request for one event (`None`: nothing to send).
    pub fn cti_request(&self, cloudevent_json: &str) -> Result<Option<CtiRequest>, serde_json::Error> {
        let ev: CloudEvent = serde_json::from_str(cloudevent_json)?;
        let Some(call) = ev.data.call.as_ref() else { return Ok(None) };
        let direction = match call.direction.as_str() {
            "inbound" => "in",
            "outbound" => "out",
            _ => return Ok(None),
        };
        let event = match ev.kind.as_str() {
            "call.started" => CtiEvent::NewCall,
            "call.answered" => CtiEvent::Answer,
            "call.ended" => CtiEvent::Hangup,
            _ => return Ok(None),
        };
        let agent = ev.data.agent.as_deref().or(call.agent.as_deref()).map(|a| self.agent(a));
        let new_call = self.new_call_body(call, direction, agent.as_ref());
        let mut body = self.base_body(call, direction, agent.as_ref());
        let mut recreate = Vec::new();
        let body = match event {
            CtiEvent::NewCall => new_call,
            CtiEvent::Answer => {
                body["event"] = json!("answer");
                if let Some(a) = &agent {
                    body["user"] = json!(a.user);
                    body["answeringNumber"] = json!(a.number);
                }
                body
            }
            CtiEvent::Hangup => {
                body["event"] = json!("hangup");
                let cause = hangup_cause(
                    call.answered_at.is_some(),
                    ev.data.hangup_cause,
                    ev.data.hung_up_by.as_deref(),
                    ev.data.end_reason.as_deref(),
                );
                body["cause"] = json!(cause);
                recreate.push(new_call);
                if call.answered_at.is_some() {
                    if let Some(a) = call.agent.as_deref() {
                        body["answeringNumber"] = json!(self.agent(a).number);
                    }
                    let mut answer = self.base_body(call, direction, agent.as_ref());
                    answer["event"] = json!("answer");
                    recreate.push(answer);
                }
                body
            }
        };
        Ok(Some(CtiRequest { event, call_id: call.id.clone(), inbound: direction == "in", body, recreate }))
    }

    /// `from`, `to`, `direction`, `callId`: what every CTI event of a call
    /// carries. Outbound, `from` is the calling agent's number.
    fn base_body(&self, call: &Call, direction: &str, agent: Option<&ZammadAgent>) -> Value {
        let mut from = call.caller.number.clone().unwrap_or_else(|| "anonymous".into());
        if direction == "out" {
            if let Some(a) = agent {
                from = a.number.clone();
            }
        }
        let to = call.callee.number.clone().unwrap_or_default();
        json!({ "from": from, "to": to, "direction": direction, "callId": call.id })
    }

    fn new_call_body(&self, call: &Call, direction: &str, agent: Option<&ZammadAgent>) -> Value {
        let mut body = self.base_body(call, direction, agent);
        body["event"] = json!("newCall");
        if direction == "out" {
            if let Some(a) = agent {
                body["user"] = json!(a.user);
            }
        }
        if let Some(q) = call.group.as_deref().or(call.queue.as_deref()) {
            body["queue"] = json!(q);
        }
        body
    }

    /// Posts one CTI request and reads Zammad's answer.
    async fn post(&self, body: &Value) -> Answer {
        let req = self
            .client
            .post(self.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body.to_string());
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Answer::Unreachable(transport_failure(e, &self.redactor)),
        };
        let status = resp.status().as_u16();
        let retry_after = retry_after_of(&resp);
        let text = self.redactor.scrub(&body_excerpt(resp).await);
        let json: Option<Value> = serde_json::from_str(&text).ok();
        let field = |k: &str| json.as_ref().and_then(|v| v.get(k)).and_then(Value::as_str).map(str::to_string);
        if (200..300).contains(&status) {
            return Answer::Accepted { action: field("action") };
        }
        let error = field("error").map(|e| crate::text::shorten_owned(e, REASON_BYTES));
        Answer::Refused(Refusal { status, retry_after, error, excerpt: self.redactor.excerpt(&text, REASON_BYTES) })
    }

    /// Zammad refused `req`: what the runner does with it.
    async fn refused(&self, req: &CtiRequest, refusal: Refusal, attempt: u32) -> Attempt {
        let (name, call, event) = (&self.name, &req.call_id, req.event.as_str());
        match judge(req.event, refusal.status, refusal.error.as_deref(), attempt) {
            Verdict::AlreadyThere => {
                info!(sink = %name, %call, "Zammad already has this call (an earlier newCall got through); acknowledged");
                Attempt::Delivered
            }
            Verdict::UnknownCall if req.event == CtiEvent::Answer => {
                let error = refusal.error.clone().unwrap_or_default();
                warn!(sink = %name, %call, %event, attempts = attempt + 1, zammad_error = %error,
                      "Zammad does not know this call; the answer becomes a dead letter and the call goes on");
                let context = format!("Zammad does not know call {call} ({} attempts): ", attempt + 1);
                Attempt::Reject {
                    status: Some(refusal.status),
                    detail: format!("{context}HTTP {}: {}", refusal.status, refusal.excerpt),
                }
            }
            Verdict::UnknownCall => self.recreate(req, attempt).await,
            Verdict::ByStatus => {
                if let Some(error) = &refusal.error {
                    // Zammad's own words; the runner logs the outcome too,
                    // but not this plainly.
                    if attempt == 0 || attempt % 10 == 0 {
                        warn!(sink = %name, %call, %event, status = refusal.status, zammad_error = %error,
                              "Zammad refused a CTI event");
                    }
                }
                refusal.attempt("")
            }
        }
    }

    /// A `hangup` of a call Zammad does not know: `newCall` (+ `answer`)
    /// first, then the `hangup`, so that Zammad's caller log has the call.
    async fn recreate(&self, req: &CtiRequest, attempt: u32) -> Attempt {
        let (name, call) = (&self.name, &req.call_id);
        for step in &req.recreate {
            let is_new_call = step["event"] == "newCall";
            match self.post(step).await {
                Answer::Accepted { .. } => {}
                // Zammad has the call after all: the hangup failed for
                // another reason; try it again as it is.
                Answer::Refused(r)
                    if is_new_call
                        && judge(CtiEvent::NewCall, r.status, r.error.as_deref(), 0) == Verdict::AlreadyThere =>
                {
                    break
                }
                Answer::Refused(r) => {
                    return r.attempt(&format!("re-creating call {call} in Zammad ({}): ", step["event"]))
                }
                Answer::Unreachable(a) => return a,
            }
        }
        match self.post(&req.body).await {
            Answer::Accepted { .. } => {
                warn!(sink = %name, %call, attempts = attempt + 1,
                      "Zammad did not know this call; sent it again (newCall, hangup) so that its caller log has it");
                Attempt::Delivered
            }
            Answer::Refused(r) => r.attempt(""),
            Answer::Unreachable(a) => a,
        }
    }

    /// Zammad rejects the caller of `call` (a blocked caller id).
    fn rejected(&self, call: &str) {
        let name = self.name.clone();
        if !self.honour_reject {
            reject_counter(&name, "ignored").increment(1);
            info!(sink = %name, %call, "Zammad rejects this caller (blocked caller id); not hung up: honour_reject is off");
            return;
        }
        let Some(blocker) = self.blocker.clone() else {
            reject_counter(&name, "failed").increment(1);
            warn!(sink = %name, %call, "Zammad rejects this caller (blocked caller id), but no PBX is connected to hang up");
            return;
        };
        let call = call.to_string();
        // Not awaited in the delivery: the PBX may take a while, and the
        // newCall is delivered either way.
        tokio::spawn(async move {
            let outcome = blocker.block(&call).await;
            match &outcome {
                BlockOutcome::HungUp { channel } => {
                    reject_counter(&name, "hung_up").increment(1);
                    info!(sink = %name, %call, %channel, "Zammad rejects this caller (blocked caller id); hung up");
                }
                BlockOutcome::TooLate => {
                    reject_counter(&name, "too_late").increment(1);
                    info!(sink = %name, %call, "Zammad rejects this caller, but the call is answered or over; left alone");
                }
                BlockOutcome::Failed(e) => {
                    reject_counter(&name, "failed").increment(1);
                    warn!(sink = %name, %call, error = %e, "Zammad rejects this caller, but the PBX did not hang up");
                }
            }
        });
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

    async fn deliver(&self, batch: &[Record], attempt: u32) -> Attempt {
        // batch_size is 1: one CTI event per request.
        let Some(r) = batch.first() else { return Attempt::Skipped };
        let req = match self.cti_request(&r.body) {
            Ok(Some(req)) => req,
            Ok(None) => return Attempt::Skipped,
            Err(e) => return Attempt::Reject { status: None, detail: format!("unreadable stored event: {e}") },
        };
        match self.post(&req.body).await {
            Answer::Accepted { action } => {
                if req.event == CtiEvent::NewCall && req.inbound && action.as_deref() == Some("reject") {
                    self.rejected(&req.call_id);
                }
                Attempt::Delivered
            }
            Answer::Refused(refusal) => self.refused(&req, refusal, attempt).await,
            Answer::Unreachable(a) => a,
        }
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
            honour_reject: false,
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
    fn zammads_refusals_are_judged_per_event() {
        use CtiEvent::*;
        let masked = Some("Error ID x1y2: Please contact your administrator.");
        // A newCall it already has: an earlier attempt got through.
        assert_eq!(judge(NewCall, 500, Some("Object already exists!"), 0), Verdict::AlreadyThere);
        assert_eq!(judge(NewCall, 500, masked, 9), Verdict::ByStatus);
        // answer/hangup: Zammad's own 500, repeated, means an unknown call.
        for event in [Answer, Hangup] {
            for attempt in 0..UNKNOWN_CALL_ATTEMPTS - 1 {
                assert_eq!(judge(event, 500, masked, attempt), Verdict::ByStatus, "{attempt}");
            }
            assert_eq!(judge(event, 500, masked, UNKNOWN_CALL_ATTEMPTS - 1), Verdict::UnknownCall);
            assert_eq!(judge(event, 500, Some("No such call_id 1.0"), UNKNOWN_CALL_ATTEMPTS), Verdict::UnknownCall);
            // Not Zammad's answer (a proxy's), or not a 500: by status.
            assert_eq!(judge(event, 500, None, 99), Verdict::ByStatus);
            assert_eq!(judge(event, 502, masked, 99), Verdict::ByStatus);
            assert_eq!(judge(event, 422, Some("Invalid direction!"), 99), Verdict::ByStatus);
        }
    }

    #[test]
    fn a_hangup_carries_how_to_re_create_its_call() {
        let s = sink();
        let answered = ce(
            "call.ended",
            json!({"seq": 5, "call": call("inbound", true), "hangup_cause": 16, "hung_up_by": "caller", "end_reason": "normal"}),
        );
        let r = s.cti_request(&answered).unwrap().unwrap();
        assert_eq!((r.event, r.call_id.as_str(), r.inbound), (CtiEvent::Hangup, "1.0", true));
        assert_eq!(r.recreate.len(), 2);
        assert_eq!(
            r.recreate[0],
            json!({"event": "newCall", "from": "1198765", "to": "1130001000", "direction": "in", "callId": "1.0", "queue": "support"})
        );
        // Answered, but by nobody Zammad would open a screen for.
        assert_eq!(
            r.recreate[1],
            json!({"event": "answer", "from": "1198765", "to": "1130001000", "direction": "in", "callId": "1.0"})
        );
        let missed = ce("call.ended", json!({"seq": 4, "call": call("inbound", false), "hangup_cause": 16}));
        let r = s.cti_request(&missed).unwrap().unwrap();
        assert_eq!(r.recreate.iter().map(|b| b["event"].as_str().unwrap()).collect::<Vec<_>>(), ["newCall"]);
        let started = ce("call.started", json!({"seq": 1, "call": call("inbound", false)}));
        assert!(s.cti_request(&started).unwrap().unwrap().recreate.is_empty());
    }

    #[test]
    fn hangup_causes() {
        assert_eq!(hangup_cause(false, Some(17), Some("system"), Some("normal")), "busy");
        assert_eq!(hangup_cause(false, Some(1), None, None), "notFound");
        assert_eq!(hangup_cause(false, Some(34), None, None), "congestion");
        assert_eq!(hangup_cause(false, Some(16), Some("system"), Some("normal")), "noAnswer");
        assert_eq!(hangup_cause(false, None, None, Some("lost")), "congestion");
        // A caller callbridge hung up for the helpdesk (cause 21).
        assert_eq!(hangup_cause(false, Some(21), Some("system"), Some("normal")), "busy");
    }
}
