//! The webhook sink: CloudEvents over HTTP(S) POST, signed per Standard
//! Webhooks (SPEC §6).
//!
//! One event per request (`application/cloudevents+json`, `webhook-id` = the
//! event id) or, with `batch_size` > 1, a JSON array
//! (`application/cloudevents-batch+json`, `webhook-id` = `batch_` + a SHA-256
//! of the ids it carries, so the same batch always has the same id).
//! `webhook-timestamp` is the Unix time of sending, so every retry is signed
//! anew. Connections are kept alive and reused (rustls for HTTPS).
//!
//! This module must never log the secret, the signature or a request body,
//! and never decide on retries itself: it reports one [`Attempt`].

use super::redact::Redactor;
use super::signature::Signer;
use super::{classify_status, parse_retry_after, retry_policy, Attempt, Sink, SinkError, StatusClass};
use crate::backoff::Backoff;
use crate::config::SinkConfig;
use crate::outbox::Record;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

const CE_JSON: &str = "application/cloudevents+json";
const CE_BATCH: &str = "application/cloudevents-batch+json";
/// First retry delay; doubles up to `max_backoff_seconds`.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// How long one event is retried by default before it is parked as a dead
/// letter (`max_retry_seconds`): a day, so that a helpdesk down over a
/// night still gets everything, and nothing is retried for ever.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(24 * 3600);

/// `max_retry_seconds` as a budget: 0 means retry for ever.
pub(crate) fn retry_budget(seconds: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(seconds).ok().filter(|d| !d.is_zero())
}
/// Bytes of a refusal's response body kept in the dead letter's reason.
pub(crate) const REASON_BYTES: usize = 512;
/// Bytes read to make the excerpt: more than kept, so that a secret
/// straddling the cut is seen whole and masked.
const EXCERPT_READ_BYTES: usize = REASON_BYTES + 1024;

/// Posts events to one URL.
#[derive(Debug)]
pub struct WebhookSink {
    name: Arc<str>,
    url: reqwest::Url,
    client: reqwest::Client,
    signer: Signer,
    /// Masks the secret and the URL's credentials in what a refusal reports.
    redactor: Redactor,
    batch_size: usize,
    concurrency: usize,
    policy: Backoff,
    /// How long one event is retried before it becomes a dead letter.
    retry_budget: Option<Duration>,
}

/// Settings of a [`WebhookSink`] (from `[[sinks]] type = "webhook"`).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub batch_size: usize,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub max_backoff: Duration,
    pub concurrency: usize,
}

/// The certificate authorities of a PEM file (`ca_file`): trusted besides
/// the system's store, for a helpdesk behind an internal CA.
pub fn load_ca_file(path: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("ca_file {path:?}: {e}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("ca_file {path:?}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("ca_file {path:?}: no PEM certificate in it"));
    }
    Ok(certs)
}

/// An HTTP client with the sinks' common settings. Servers are checked
/// against the system's trust store, the bundled web roots, and `roots`.
pub(crate) fn http_client(
    timeout: Duration,
    connect_timeout: Duration,
    concurrency: usize,
    roots: &[reqwest::Certificate],
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder();
    for root in roots {
        builder = builder.add_root_certificate(root.clone());
    }
    builder
        .use_rustls_tls()
        // A redirected POST may be replayed as a GET whose 2xx would count as
        // delivered: a 3xx is refused (dead letter) for ops to fix the URL.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(concurrency.max(1))
        .tcp_nodelay(true)
        .tcp_keepalive(Duration::from_secs(30))
        .user_agent(concat!("callbridge/", env!("CARGO_PKG_VERSION")))
        .build()
}

pub(crate) fn secs(index: usize, name: &str, field: &str, v: f64) -> Result<Duration, SinkError> {
    Duration::try_from_secs_f64(v).ok().filter(|d| !d.is_zero()).ok_or_else(|| SinkError::Config {
        index,
        name: name.to_string(),
        message: format!("{field} must be a positive number of seconds, not {v}"),
    })
}

/// Reads at most `EXCERPT_READ_BYTES` of a response body (and drains the
/// rest of small bodies so the connection can be reused).
pub(crate) async fn body_excerpt(mut resp: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        if buf.len() < EXCERPT_READ_BYTES {
            buf.extend_from_slice(&chunk[..chunk.len().min(EXCERPT_READ_BYTES - buf.len())]);
        }
        if buf.len() >= 64 * 1024 {
            break;
        }
    }
    String::from_utf8_lossy(&buf).chars().filter(|c| !c.is_control()).collect()
}

/// Sends one request and classifies the outcome. The outcome's detail (a
/// response excerpt, an error chain: what becomes a dead letter's reason
/// and a log line) goes through `redactor`: a server may echo the request,
/// and the request may carry a secret.
pub(crate) async fn send(req: reqwest::RequestBuilder, redactor: &Redactor) -> Attempt {
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = retry_after_of(&resp);
            if (200..300).contains(&status) {
                // Drain the (usually empty) body so the connection is reused.
                let _ = body_excerpt(resp).await;
                return Attempt::Delivered;
            }
            let excerpt = redactor.excerpt(&body_excerpt(resp).await, REASON_BYTES);
            classify_status(status, retry_after, || format!("HTTP {status}: {excerpt}"))
        }
        Err(e) => transport_failure(e, redactor),
    }
}

/// A response's `Retry-After`, if it has a readable one.
pub(crate) fn retry_after_of(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after)
}

/// A request that got no answer (network, timeout): retried. The detail is
/// the error chain without the URL (it may carry a token: Zammad's), scrubbed.
pub(crate) fn transport_failure(e: reqwest::Error, redactor: &Redactor) -> Attempt {
    let class = if e.is_timeout() { StatusClass::Timeout } else { StatusClass::Network };
    Attempt::Retry { class, retry_after: None, detail: redactor.scrub(&error_chain(&e.without_url())) }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl WebhookSink {
    /// How long one event is retried before it becomes a dead letter
    /// (`None`: for ever). Default: [`DEFAULT_RETRY_BUDGET`].
    pub fn with_retry_budget(mut self, budget: Option<Duration>) -> WebhookSink {
        self.retry_budget = budget;
        self
    }

    pub fn new(name: &str, settings: WebhookSettings, secret: &str) -> Result<WebhookSink, String> {
        WebhookSink::with_roots(name, settings, secret, &[])
    }

    /// As [`WebhookSink::new`], also trusting the certificate authorities
    /// `roots` (from `ca_file`).
    pub fn with_roots(
        name: &str,
        settings: WebhookSettings,
        secret: &str,
        roots: &[reqwest::Certificate],
    ) -> Result<WebhookSink, String> {
        let url = reqwest::Url::parse(&settings.url).map_err(|e| format!("url: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url: scheme must be http or https, not {}", url.scheme()));
        }
        let signer = Signer::new(secret).map_err(|e| e.to_string())?;
        let policy = retry_policy(INITIAL_BACKOFF.min(settings.max_backoff), settings.max_backoff)?;
        let client = http_client(settings.timeout, settings.connect_timeout, settings.concurrency, roots)
            .map_err(|e| format!("HTTP client: {e}"))?;
        let redactor = Redactor::for_url(&url, [secret]);
        Ok(WebhookSink {
            name: Arc::from(name),
            url,
            client,
            signer,
            redactor,
            batch_size: settings.batch_size.max(1),
            concurrency: settings.concurrency.max(1),
            policy,
            retry_budget: Some(DEFAULT_RETRY_BUDGET),
        })
    }

    pub fn from_config(index: usize, name: &str, config: &SinkConfig) -> Result<WebhookSink, SinkError> {
        let SinkConfig::Webhook {
            url,
            secret,
            batch_size,
            timeout_seconds,
            connect_timeout_seconds,
            max_backoff_seconds,
            concurrency,
            ca_file,
            max_retry_seconds,
            ..
        } = config
        else {
            return Err(SinkError::Config { index, name: name.into(), message: "not a webhook sink".into() });
        };
        let err = |message: String| SinkError::Config { index, name: name.to_string(), message };
        let secret = secret.resolve().map_err(err)?;
        let roots = ca_file.as_deref().map(load_ca_file).transpose().map_err(err)?.unwrap_or_default();
        let settings = WebhookSettings {
            url: url.clone(),
            batch_size: *batch_size,
            timeout: secs(index, name, "timeout_seconds", *timeout_seconds)?,
            connect_timeout: secs(index, name, "connect_timeout_seconds", *connect_timeout_seconds)?,
            max_backoff: secs(index, name, "max_backoff_seconds", *max_backoff_seconds)?,
            concurrency: *concurrency,
        };
        let sink = WebhookSink::with_roots(name, settings, &secret, &roots).map_err(err)?;
        Ok(sink.with_retry_budget(retry_budget(*max_retry_seconds)))
    }

    /// The `webhook-id` of a batch: stable for the same events.
    pub fn batch_id(batch: &[Record]) -> String {
        let mut h = Sha256::new();
        for r in batch {
            h.update(r.id.as_bytes());
            h.update(b"\n");
        }
        let digest = h.finalize();
        let mut id = String::from("batch_");
        crate::text::push_hex(&mut id, &digest[..16]);
        id
    }
}

impl Sink for WebhookSink {
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
        let (id, content_type, body) = match batch {
            [one] if self.batch_size == 1 => (one.id.to_string(), CE_JSON, one.body.to_string()),
            _ => {
                let mut body = String::with_capacity(batch.iter().map(|r| r.body.len() + 1).sum::<usize>() + 2);
                body.push('[');
                for (i, r) in batch.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    body.push_str(&r.body);
                }
                body.push(']');
                (WebhookSink::batch_id(batch), CE_BATCH, body)
            }
        };
        let ts = jiff::Timestamp::now().as_second();
        let signature = self.signer.sign(&id, ts, body.as_bytes());
        let req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body);
        send(req, &self.redactor).await
    }
}
