//! Who is calling: the helpdesk lookup of a caller's number, asked by the
//! FastAGI router before it applies `redirect_unknown_to` /
//! `redirect_inactive_to` (SPEC §2, "Parameters").
//!
//! The caller waits in `AGI()` meanwhile, so every lookup is bounded:
//!
//! - **Time**: a call waits at most [`LookupSettings::timeout`] for an
//!   answer, a wait for a free request slot included. No answer in time, an
//!   error, a refusal: the call takes its normal route (*fail open*), counted
//!   in `callbridge_caller_lookup_fail_open_total` and logged once per
//!   outage (when it starts, and when the helpdesk answers again), never
//!   once per call.
//! - **Requests**: at most [`LookupSettings::max_concurrent`] in flight (a
//!   semaphore); callers of the same number share one request (the first
//!   one's, kept in a map of requests in flight).
//! - **Memory**: answers are cached per number for
//!   [`LookupSettings::cache_ttl`], at most
//!   [`LookupSettings::cache_max_entries`] numbers (the oldest dropped
//!   first). Failures are never cached: the next call asks again.
//!
//! A request runs in a task of its own, so a caller who hangs up mid-lookup
//! does not cancel it and its answer still fills the cache; the task ends
//! within the timeout too.
//!
//! Numbers are normalised as click-to-call normalises them
//! ([`crate::control::normalize_number`]: separators dropped, `+<country
//! code>` made national, other `+` numbers dialled with the international
//! prefix), so `+55 11 98765-0001`, `005511987650001` and `11987650001` are
//! one number, one cache entry and one request.
//!
//! Two forms of request:
//! - **generic**: `GET` a URL template (`{number}`, `{e164}`), optional
//!   bearer token, a JSON answer read through three JSON pointers; `404` is
//!   "not found".
//! - **zammad**: Zammad's user search (`GET /api/v1/users/search`, access
//!   token), `phone` and `mobile` of the users found compared with the
//!   caller's number, their `active` attribute and `id`.
//!
//! This module never logs or labels a number, a token or a response body.

use crate::control::{normalize_number, OutboundRules};
use crate::event::CallerLookup;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tracing::{info, warn};

/// Most numbers whose request may be in flight or waiting for a slot; a
/// new number beyond it fails open at once (`busy`).
const MAX_PENDING_NUMBERS: usize = 4096;

/// Most users read from one Zammad search.
const ZAMMAD_SEARCH_LIMIT: u32 = 10;

/// How the caller's number is asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupForm {
    /// `GET url` with `{number}` / `{e164}` replaced; the answer read
    /// through JSON pointers (an empty pointer: the service does not say).
    Generic { url: String, found_pointer: String, active_pointer: String, contact_id_pointer: String },
    /// Zammad's user search at this base URL.
    Zammad { base_url: String },
}

/// How numbers are normalised: `[outbound] country_code` and
/// `international_prefix`, as for click-to-call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberRules {
    pub country_code: Option<String>,
    pub international_prefix: String,
}

impl Default for NumberRules {
    fn default() -> Self {
        NumberRules { country_code: None, international_prefix: "00".into() }
    }
}

/// Everything the lookup needs (`settings::caller_lookup` builds it from
/// `[caller_lookup]` and `[outbound]`).
#[derive(Clone)]
pub struct LookupSettings {
    pub form: LookupForm,
    /// The bearer token (generic) or Zammad access token.
    pub token: Option<String>,
    pub timeout: Duration,
    /// Zero: answers are not cached.
    pub cache_ttl: Duration,
    pub cache_max_entries: usize,
    pub max_concurrent: usize,
    pub numbers: NumberRules,
    /// Certificate authorities trusted besides the system's (`ca_file`).
    pub roots: Vec<reqwest::Certificate>,
}

impl std::fmt::Debug for LookupSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupSettings")
            .field("form", &self.form)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("cache_ttl", &self.cache_ttl)
            .field("cache_max_entries", &self.cache_max_entries)
            .field("max_concurrent", &self.max_concurrent)
            .field("numbers", &self.numbers)
            .finish_non_exhaustive()
    }
}

/// A caller's number in the forms a lookup uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Number {
    /// As click-to-call would dial it (national for the own country,
    /// international prefix + digits otherwise): the cache key, `{number}`.
    pub dial: String,
    /// `+` and the international digits when the country is known
    /// (`{e164}`), else the dial form.
    pub e164: String,
}

impl Number {
    /// The number of a caller ID, or `None` when there is none to look up
    /// (withheld, `anonymous`, not a phone number).
    pub fn parse(raw: &str, rules: &NumberRules) -> Option<Number> {
        let outbound = OutboundRules {
            country_code: rules.country_code.clone(),
            international_prefix: rules.international_prefix.clone(),
            ..OutboundRules::default()
        };
        let digits: String = raw.trim().chars().filter(char::is_ascii_digit).collect();
        let intl = if raw.trim().starts_with('+') {
            Some(digits.clone())
        } else if !rules.international_prefix.is_empty() {
            digits.strip_prefix(rules.international_prefix.as_str()).map(str::to_string)
        } else {
            None
        };
        match intl {
            Some(intl) => {
                let dial = normalize_number(&format!("+{intl}"), &outbound).ok()?;
                Some(Number { dial, e164: format!("+{intl}") })
            }
            None => {
                let dial = normalize_number(raw, &outbound).ok()?;
                let e164 = match &rules.country_code {
                    // A national number: without its trunk prefix (0) after the country code.
                    Some(cc) => format!("+{cc}{}", dial.trim_start_matches('0')),
                    None => dial.clone(),
                };
                Some(Number { dial, e164 })
            }
        }
    }
}

/// Why a call got no answer (metric label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer within the timeout.
    Timeout,
    /// The helpdesk answered something else than an answer (5xx, 401,
    /// malformed JSON), or could not be reached.
    Error,
    /// Every request slot stayed busy for the whole timeout, or too many
    /// numbers were pending.
    Busy,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Error => "error",
            Failure::Busy => "busy",
        }
    }
}

/// Why a lookup cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("caller_lookup.url: {0}")]
    Url(String),
    #[error("caller_lookup: cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

type Pending = Shared<BoxFuture<'static, Result<CallerLookup, Failure>>>;

/// The lookup client: cache, shared requests, request slots, outage state.
/// One per configuration; shared (`Arc`) by every FastAGI session.
pub struct CallerLookups {
    inner: Arc<Inner>,
}

struct Inner {
    settings: LookupSettings,
    client: reqwest::Client,
    slots: Arc<Semaphore>,
    cache: Mutex<Cache>,
    pending: Mutex<HashMap<String, Pending>>,
    outage: Outage,
}

impl std::fmt::Debug for CallerLookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerLookups").field("settings", &self.inner.settings).finish_non_exhaustive()
    }
}

impl CallerLookups {
    pub fn new(settings: LookupSettings) -> Result<CallerLookups, LookupError> {
        let base = match &settings.form {
            LookupForm::Generic { url, .. } => url.replace("{number}", "0").replace("{e164}", "0"),
            LookupForm::Zammad { base_url } => base_url.clone(),
        };
        reqwest::Url::parse(&base).map_err(|e| LookupError::Url(e.to_string()))?;
        let mut builder = reqwest::Client::builder();
        for root in &settings.roots {
            builder = builder.add_root_certificate(root.clone());
        }
        let client = builder
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(settings.max_concurrent.max(1))
            .tcp_nodelay(true)
            .user_agent(concat!("callbridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(LookupError::Client)?;
        for f in [Failure::Timeout, Failure::Error, Failure::Busy] {
            metrics::counter!("callbridge_caller_lookup_fail_open_total", "cause" => f.as_str()).increment(0);
        }
        let slots = Arc::new(Semaphore::new(settings.max_concurrent.max(1)));
        let cache = Mutex::new(Cache::new(settings.cache_max_entries, settings.cache_ttl));
        Ok(CallerLookups {
            inner: Arc::new(Inner {
                settings,
                client,
                slots,
                cache,
                pending: Mutex::new(HashMap::new()),
                outage: Outage::default(),
            }),
        })
    }

    pub fn settings(&self) -> &LookupSettings {
        &self.inner.settings
    }

    /// What the helpdesk says about the caller ID `raw`. A caller without
    /// a number to look up is not found (no request is made). Waits at
    /// most the configured timeout.
    pub async fn lookup(&self, raw: &str) -> Result<CallerLookup, Failure> {
        let Some(number) = Number::parse(raw, &self.inner.settings.numbers) else {
            return Ok(CallerLookup { found: false, active: None, contact_id: None });
        };
        let now = Instant::now();
        if let Some(hit) = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&number.dial, now) {
            metrics::counter!("callbridge_caller_lookup_cache_hits_total").increment(1);
            return Ok(hit);
        }
        let pending = match self.pending(number) {
            Ok(p) => p,
            Err(Some(hit)) => {
                metrics::counter!("callbridge_caller_lookup_cache_hits_total").increment(1);
                return Ok(hit);
            }
            Err(None) => return Err(self.fail_open(Failure::Busy)),
        };
        match tokio::time::timeout(self.inner.settings.timeout, pending).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(f)) => Err(self.fail_open(f)),
            Err(_) => Err(self.fail_open(Failure::Timeout)),
        }
    }

    fn fail_open(&self, f: Failure) -> Failure {
        metrics::counter!("callbridge_caller_lookup_fail_open_total", "cause" => f.as_str()).increment(1);
        f
    }

    /// The request in flight for `number`, or a new one; `Err(Some)`: the
    /// answer is cached after all, `Err(None)`: too many numbers pending.
    fn pending(&self, number: Number) -> Result<Pending, Option<CallerLookup>> {
        let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pending.get(&number.dial) {
            return Ok(p.clone());
        }
        // A request may have finished since the caller looked at the cache:
        // it fills the cache before it leaves this map (under this lock).
        if let Some(hit) = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&number.dial, Instant::now())
        {
            return Err(Some(hit));
        }
        if pending.len() >= MAX_PENDING_NUMBERS {
            return Err(None);
        }
        let inner = Arc::clone(&self.inner);
        let key = number.dial.clone();
        let task = tokio::spawn(async move {
            let result = inner.ask(&number).await;
            let now = Instant::now();
            if let Ok(answer) = &result {
                inner.cache.lock().unwrap_or_else(|p| p.into_inner()).put(number.dial.clone(), answer.clone(), now);
            }
            inner.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&number.dial);
            result
        });
        let shared = async move { task.await.unwrap_or(Err(Failure::Error)) }.boxed().shared();
        pending.insert(key, shared.clone());
        Ok(shared)
    }
}

impl Inner {
    /// One request for `number`: a slot, then the HTTP exchange, all
    /// within the timeout; counted and fed to the outage state.
    async fn ask(&self, number: &Number) -> Result<CallerLookup, Failure> {
        let started = Instant::now();
        let deadline = started + self.settings.timeout;
        let permit = match tokio::time::timeout_at(deadline.into(), Arc::clone(&self.slots).acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                let f = Failure::Busy;
                metrics::counter!("callbridge_caller_lookup_requests_total", "result" => f.as_str()).increment(1);
                self.outage.failed(f, "every request slot stayed busy");
                return Err(f);
            }
        };
        metrics::gauge!("callbridge_caller_lookup_in_flight").increment(1.0);
        let result = tokio::time::timeout_at(deadline.into(), self.request(number)).await;
        metrics::gauge!("callbridge_caller_lookup_in_flight").decrement(1.0);
        drop(permit);
        metrics::histogram!("callbridge_caller_lookup_request_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let (result, label) = match result {
            Ok(Ok(answer)) => {
                let label = if answer.found { "found" } else { "not_found" };
                (Ok(answer), label)
            }
            Ok(Err(RequestError::Timeout)) | Err(_) => {
                self.outage.failed(Failure::Timeout, "no answer within the timeout");
                (Err(Failure::Timeout), Failure::Timeout.as_str())
            }
            Ok(Err(RequestError::Other(why))) => {
                self.outage.failed(Failure::Error, &why);
                (Err(Failure::Error), Failure::Error.as_str())
            }
        };
        if result.is_ok() {
            self.outage.answered();
        }
        metrics::counter!("callbridge_caller_lookup_requests_total", "result" => label).increment(1);
        result
    }

    async fn request(&self, number: &Number) -> Result<CallerLookup, RequestError> {
        match &self.settings.form {
            LookupForm::Generic { url, found_pointer, active_pointer, contact_id_pointer } => {
                let url = url.replace("{number}", &encode(&number.dial)).replace("{e164}", &encode(&number.e164));
                let mut req = self.client.get(url).header("Accept", "application/json");
                if let Some(token) = &self.settings.token {
                    req = req.bearer_auth(token);
                }
                let resp = req.send().await.map_err(RequestError::from)?;
                if resp.status().as_u16() == 404 {
                    return Ok(CallerLookup { found: false, active: None, contact_id: None });
                }
                let body = json_body(resp).await?;
                read_generic(&body, found_pointer, active_pointer, contact_id_pointer).map_err(RequestError::Other)
            }
            LookupForm::Zammad { base_url } => {
                let mut url = reqwest::Url::parse(base_url).map_err(|e| RequestError::Other(format!("url: {e}")))?;
                url.set_path(&format!("{}/api/v1/users/search", url.path().trim_end_matches('/')));
                url.query_pairs_mut()
                    .append_pair("query", &zammad_query(number))
                    .append_pair("limit", &ZAMMAD_SEARCH_LIMIT.to_string());
                let mut req = self.client.get(url).header("Accept", "application/json");
                if let Some(token) = &self.settings.token {
                    req = req.header("Authorization", format!("Token token={token}"));
                }
                let resp = req.send().await.map_err(RequestError::from)?;
                let body = json_body(resp).await?;
                read_zammad(&body, number, &self.settings.numbers).map_err(RequestError::Other)
            }
        }
    }
}

enum RequestError {
    Timeout,
    /// What went wrong, for the outage log line (never a body or a token).
    Other(String),
}

impl From<reqwest::Error> for RequestError {
    fn from(e: reqwest::Error) -> RequestError {
        if e.is_timeout() {
            return RequestError::Timeout;
        }
        let what = if e.is_connect() {
            "cannot connect"
        } else if e.is_decode() || e.is_body() {
            "bad response body"
        } else {
            "request failed"
        };
        // The URL may carry the number (generic form): never in a log line.
        RequestError::Other(format!("{what}: {}", e.without_url()))
    }
}

/// The JSON body of a 2xx answer.
async fn json_body(resp: reqwest::Response) -> Result<serde_json::Value, RequestError> {
    let status = resp.status();
    if !status.is_success() {
        return Err(RequestError::Other(format!("HTTP status {}", status.as_u16())));
    }
    let bytes = resp.bytes().await.map_err(RequestError::from)?;
    serde_json::from_slice(&bytes).map_err(|e| RequestError::Other(format!("answer is not JSON: {e}")))
}

/// The generic answer: `found` (missing or `null`: false), `active`,
/// `contact_id` (a string or a number) through their pointers. An empty
/// pointer means the service does not say: `found` is then true (a 2xx
/// answer, `404` being "not found").
pub fn read_generic(
    body: &serde_json::Value,
    found: &str,
    active: &str,
    contact_id: &str,
) -> Result<CallerLookup, String> {
    use serde_json::Value;
    let at = |p: &str| if p.is_empty() { None } else { body.pointer(p).filter(|v| !v.is_null()) };
    let found = match (found.is_empty(), at(found)) {
        (true, _) => true,
        (false, None) => false,
        (false, Some(Value::Bool(b))) => *b,
        (false, Some(_)) => return Err(format!("the value at {found:?} is not a boolean")),
    };
    let active = match at(active) {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(format!("the value at {active:?} is not a boolean")),
    };
    let contact_id = match at(contact_id) {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err(format!("the value at {contact_id:?} is neither a string nor a number")),
    };
    Ok(if found { CallerLookup { found, active, contact_id } } else { CallerLookup::default() })
}

/// The Zammad search query: the number's national and international
/// digits in the `phone` and `mobile` attributes (Zammad's search index
/// matches whole words: a number stored with spaces is several words).
pub fn zammad_query(number: &Number) -> String {
    let mut forms = vec![number.dial.clone()];
    let intl = number.e164.trim_start_matches('+').to_string();
    if !forms.contains(&intl) {
        forms.push(intl);
    }
    let any = forms.join(" OR ");
    format!("phone:({any}) OR mobile:({any})")
}

/// Zammad's answer: an array of users. A user counts when its `phone` or
/// `mobile` is the caller's number once normalised (the search also finds
/// near misses); found when one does, active when one of those is
/// (`active`), the contact the first active one (else the first).
pub fn read_zammad(body: &serde_json::Value, number: &Number, rules: &NumberRules) -> Result<CallerLookup, String> {
    let users = body.as_array().ok_or("the answer is not an array of users")?;
    // Stored as typed: national, `+…`, `00…`, or the international digits alone.
    let intl_digits = number.e164.trim_start_matches('+');
    let same = |v: Option<&serde_json::Value>| {
        let Some(stored) = v.and_then(serde_json::Value::as_str) else { return false };
        let digits: String = stored.chars().filter(char::is_ascii_digit).collect();
        digits == intl_digits || Number::parse(stored, rules).is_some_and(|n| n.dial == number.dial)
    };
    let matching: Vec<&serde_json::Value> =
        users.iter().filter(|u| same(u.get("phone")) || same(u.get("mobile"))).collect();
    let Some(first) = matching.first() else {
        return Ok(CallerLookup::default());
    };
    let is_active = |u: &&serde_json::Value| u.get("active").and_then(serde_json::Value::as_bool) != Some(false);
    let chosen = matching.iter().copied().find(is_active).unwrap_or(first);
    let id = chosen.get("id").and_then(|v| match v {
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::String(s) => Some(s.clone()),
        _ => None,
    });
    Ok(CallerLookup { found: true, active: Some(matching.iter().any(is_active)), contact_id: id })
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Answers per number, each kept for the TTL, at most `cap` numbers (the
/// oldest answer is dropped first).
struct Cache {
    ttl: Duration,
    cap: usize,
    entries: HashMap<String, (Instant, CallerLookup)>,
    /// Insertion order, for eviction; may hold keys already replaced or
    /// expired (skipped when found stale).
    order: VecDeque<(String, Instant)>,
}

impl Cache {
    fn new(cap: usize, ttl: Duration) -> Cache {
        Cache { ttl, cap: cap.max(1), entries: HashMap::new(), order: VecDeque::new() }
    }

    fn get(&mut self, key: &str, now: Instant) -> Option<CallerLookup> {
        let (at, answer) = self.entries.get(key)?;
        if now.duration_since(*at) < self.ttl {
            return Some(answer.clone());
        }
        self.entries.remove(key);
        None
    }

    fn put(&mut self, key: String, answer: CallerLookup, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        while self.entries.len() >= self.cap && !self.entries.contains_key(&key) {
            let Some((old, at)) = self.order.pop_front() else { break };
            if self.entries.get(&old).is_some_and(|(t, _)| *t == at) {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(key.clone(), (now, answer));
        self.order.push_back((key, now));
        // Entries replaced or expired leave stale keys behind: compact.
        if self.order.len() > self.cap * 2 {
            let entries = &self.entries;
            self.order.retain(|(k, t)| entries.get(k).is_some_and(|(at, _)| at == t));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Whether the helpdesk is failing: one warning when failures start, one
/// line when it answers again (with how many requests failed meanwhile).
#[derive(Debug, Default)]
struct Outage {
    failing: AtomicBool,
    failures: AtomicU64,
}

impl Outage {
    /// A request failed; returns whether this started an outage (logged).
    fn failed(&self, f: Failure, why: &str) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let started = !self.failing.swap(true, Ordering::AcqRel);
        if started {
            metrics::gauge!("callbridge_caller_lookup_failing").set(1.0);
            warn!(cause = f.as_str(), error = %why, "caller lookup failing: calls take their normal route until the helpdesk answers again");
        }
        started
    }

    /// A request was answered; returns the failures of the outage it ended.
    fn answered(&self) -> Option<u64> {
        if !self.failing.swap(false, Ordering::AcqRel) {
            return None;
        }
        let failed = self.failures.swap(0, Ordering::Relaxed);
        metrics::gauge!("callbridge_caller_lookup_failing").set(0.0);
        info!(failed_requests = failed, "caller lookup answers again");
        Some(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn br() -> NumberRules {
        NumberRules { country_code: Some("55".into()), international_prefix: "00".into() }
    }

    #[test]
    fn numbers_are_normalised_as_click_to_call_does() {
        let n = |raw: &str| Number::parse(raw, &br()).map(|n| (n.dial, n.e164));
        let local = Some(("11987650001".to_string(), "+5511987650001".to_string()));
        assert_eq!(n("11987650001"), local);
        assert_eq!(n("+55 11 98765-0001"), local);
        assert_eq!(n("005511987650001"), local);
        assert_eq!(n("(11) 98765-0001"), local);
        assert_eq!(n("+44 20 7946 0000"), Some(("00442079460000".into(), "+442079460000".into())));
        assert_eq!(n("00442079460000"), Some(("00442079460000".into(), "+442079460000".into())));
        for withheld in ["", "anonymous", "unknown", "12", "abc"] {
            assert_eq!(n(withheld), None, "{withheld:?}");
        }
        // Without a country code, `+` numbers are international.
        let none = NumberRules::default();
        let n = Number::parse("+5511987650001", &none).expect("number");
        assert_eq!((n.dial.as_str(), n.e164.as_str()), ("005511987650001", "+5511987650001"));
    }

    #[test]
    fn generic_answers_are_read_through_pointers() {
        let read = |body, f: &str, a: &str, c: &str| read_generic(&body, f, a, c);
        let full = json!({"found": true, "active": false, "contact_id": "c-7"});
        assert_eq!(
            read(full, "/found", "/active", "/contact_id"),
            Ok(CallerLookup { found: true, active: Some(false), contact_id: Some("c-7".into()) })
        );
        let nested = json!({"data": {"exists": true, "customer": {"enabled": true, "id": 42}}});
        assert_eq!(
            read(nested, "/data/exists", "/data/customer/enabled", "/data/customer/id"),
            Ok(CallerLookup { found: true, active: Some(true), contact_id: Some("42".into()) })
        );
        assert_eq!(read(json!({}), "/found", "/active", "/contact_id"), Ok(CallerLookup::default()));
        assert_eq!(read(json!({"found": null}), "/found", "", ""), Ok(CallerLookup::default()));
        assert_eq!(
            read(json!({"id": 1}), "", "", "/id"),
            Ok(CallerLookup { found: true, active: None, contact_id: Some("1".into()) })
        );
        assert!(read(json!({"found": "yes"}), "/found", "", "").is_err());
        assert!(read(json!({"found": true, "active": 1}), "/found", "/active", "").is_err());
    }

    #[test]
    fn zammad_users_are_matched_by_normalised_phone_or_mobile() {
        let number = Number::parse("11987650001", &br()).expect("number");
        assert_eq!(
            zammad_query(&number),
            "phone:(11987650001 OR 5511987650001) OR mobile:(11987650001 OR 5511987650001)"
        );
        let users = json!([
            {"id": 3, "active": true, "phone": "+55 11 98765-0009", "mobile": ""},
            {"id": 7, "active": false, "phone": "+5511987650001", "mobile": ""},
            {"id": 9, "active": true, "phone": "", "mobile": "(11) 98765-0001"},
        ]);
        assert_eq!(
            read_zammad(&users, &number, &br()),
            Ok(CallerLookup { found: true, active: Some(true), contact_id: Some("9".into()) })
        );
        let inactive = json!([{"id": 7, "active": false, "phone": "+5511987650001", "mobile": ""}]);
        assert_eq!(
            read_zammad(&inactive, &number, &br()),
            Ok(CallerLookup { found: true, active: Some(false), contact_id: Some("7".into()) })
        );
        let near_miss = json!([{"id": 3, "active": true, "phone": "+55 11 98765-0009"}]);
        assert_eq!(read_zammad(&near_miss, &number, &br()), Ok(CallerLookup::default()));
        assert_eq!(read_zammad(&json!([]), &number, &br()), Ok(CallerLookup::default()));
        assert!(read_zammad(&json!({"error": "not authorized"}), &number, &br()).is_err());
    }

    #[test]
    fn the_cache_keeps_answers_for_the_ttl_and_at_most_cap_numbers() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut c = Cache::new(3, ttl);
        let a = |id: &str| CallerLookup { found: true, active: Some(true), contact_id: Some(id.into()) };
        for i in 0..5 {
            c.put(format!("n{i}"), a(&i.to_string()), t0);
        }
        assert_eq!(c.len(), 3);
        assert_eq!(c.get("n0", t0), None, "oldest dropped");
        assert_eq!(c.get("n4", t0), Some(a("4")));
        assert_eq!(c.get("n4", t0 + ttl), None, "expired");
        // Replacing a number does not evict another one.
        c.put("n3".into(), a("x"), t0);
        assert_eq!((c.get("n3", t0), c.get("n2", t0)), (Some(a("x")), Some(a("2"))));
        for i in 0..1000 {
            c.put(format!("m{}", i % 5), a("y"), t0);
        }
        assert!(c.order.len() <= 6, "stale keys compacted: {}", c.order.len());
        let mut off = Cache::new(3, Duration::ZERO);
        off.put("n".into(), a("1"), t0);
        assert_eq!(off.get("n", t0), None);
    }

    #[test]
    fn an_outage_is_logged_when_it_starts_and_when_it_ends() {
        let o = Outage::default();
        assert_eq!(o.answered(), None);
        assert!(o.failed(Failure::Timeout, "slow"));
        assert!(!o.failed(Failure::Error, "down"));
        assert!(!o.failed(Failure::Timeout, "slow"));
        assert_eq!(o.answered(), Some(3));
        assert_eq!(o.answered(), None);
        assert!(o.failed(Failure::Busy, "busy"));
    }

    #[test]
    fn template_values_are_percent_encoded() {
        assert_eq!(encode("+5511"), "%2B5511");
        assert_eq!(encode("0044-1.2_~"), "0044-1.2_~");
    }
}
