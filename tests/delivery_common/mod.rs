//! Shared by the `delivery_*` tests: a real HTTP receiver on 127.0.0.1 (axum)
//! whose answers are scripted, the lab configuration and the a11 trace, and
//! the checks every delivery test makes (nothing missing, per-call order,
//! duplicates only with identical ids and bodies).
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use callbridge::config::Config;
use callbridge::event::Event;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn a11() -> PathBuf {
    root().join("fixtures/ami/a11-concurrent-mix.ami")
}

/// config/lab.toml with its `[[sinks]]` replaced by `sinks` (TOML text).
pub fn lab_config_text(sinks: &str) -> String {
    let text = std::fs::read_to_string(root().join("config/lab.toml")).expect("lab.toml");
    let cut = text.find("[[sinks]]").expect("lab.toml has sinks");
    format!("{}{}", &text[..cut], sinks)
}

pub fn lab() -> Config {
    Config::load(&root().join("config/lab.toml")).expect("lab config")
}

pub fn a11_events() -> Vec<Event> {
    callbridge::replay::events_of(&lab(), &[a11()]).expect("a11 replays")
}

/// What the receiver answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// A status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// Answers 200 only after this long (the client times out first).
    Hang(Duration),
    /// A status whose body echoes the request's path (as Rails' "No route
    /// matches" pages do).
    EchoPath(u16),
}

#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub status: u16,
}

#[derive(Default)]
struct Script {
    /// Answers for the next requests, in order; then 200.
    first: VecDeque<Reply>,
    /// Events (by CloudEvents id) always refused with this status.
    refuse: HashMap<String, u16>,
    /// Event types (`call.missed`) always refused with this status.
    refuse_type: HashMap<String, u16>,
    /// Every request answered with this status (the helpdesk is down).
    down: Option<u16>,
}

#[derive(Clone)]
struct AppState {
    log: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Script>>,
}

/// A scripted webhook receiver on 127.0.0.1.
pub struct Receiver {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

/// Event ids in a request body (one CloudEvent or a batch array).
pub fn ids_in(body: &[u8]) -> Vec<(String, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_slice(body).expect("receiver got JSON");
    let items = match v {
        serde_json::Value::Array(a) => a,
        one => vec![one],
    };
    items.into_iter().map(|e| (e["id"].as_str().expect("id").to_string(), e)).collect()
}

async fn handle(State(st): State<AppState>, uri: axum::http::Uri, headers: HeaderMap, body: Bytes) -> Response {
    let events: Vec<(String, String)> = serde_json::from_slice::<serde_json::Value>(&body)
        .map(|v| match v {
            serde_json::Value::Array(a) => a,
            one => vec![one],
        })
        .unwrap_or_default()
        .iter()
        .filter_map(|e| Some((e["id"].as_str()?.to_string(), e["type"].as_str().unwrap_or("").to_string())))
        .collect();
    let reply = {
        let mut s = st.script.lock().unwrap();
        let refused =
            events.iter().find_map(|(id, ty)| s.refuse.get(id).or_else(|| s.refuse_type.get(ty)).copied()).or(s.down);
        match refused {
            Some(status) => Reply::Status(status),
            None => s.first.pop_front().unwrap_or(Reply::Status(200)),
        }
    };
    let status = match &reply {
        Reply::Status(s) | Reply::RetryAfter(s, _) | Reply::EchoPath(s) => *s,
        Reply::Hang(_) => 0,
    };
    st.log.lock().unwrap().push(Received { at: Instant::now(), path: uri.path().to_string(), headers, body, status });
    match reply {
        Reply::EchoPath(s) => {
            let page = format!("No route matches [POST] \"{}\"", uri.path());
            (StatusCode::from_u16(s).unwrap(), page).into_response()
        }
        Reply::Status(s) => StatusCode::from_u16(s).unwrap().into_response(),
        Reply::RetryAfter(s, secs) => {
            let mut r = StatusCode::from_u16(s).unwrap().into_response();
            r.headers_mut().insert("retry-after", HeaderValue::from_str(&secs.to_string()).unwrap());
            r
        }
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
    }
}

impl Receiver {
    /// Starts on an ephemeral port.
    pub async fn start() -> Receiver {
        Receiver::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on `addr` (used to bring a "down" helpdesk back on its port).
    pub async fn start_on(addr: SocketAddr) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(Script::default()));
        let app =
            axum::Router::new().fallback(handle).with_state(AppState { log: log.clone(), script: script.clone() });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, log, script, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    /// Answers the next requests with `replies`, in order.
    pub fn fail_first(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().first.extend(replies);
    }

    pub fn refuse(&self, event_id: &str, status: u16) {
        self.script.lock().unwrap().refuse.insert(event_id.to_string(), status);
    }

    /// Refuses every event of this type (`call.missed`) with `status`.
    pub fn refuse_type(&self, event_type: &str, status: u16) {
        self.script.lock().unwrap().refuse_type.insert(event_type.to_string(), status);
    }

    /// Answers every request with `status` (the helpdesk is down), or
    /// normally again with `None`.
    pub fn set_down(&self, status: Option<u16>) {
        self.script.lock().unwrap().down = status;
    }

    pub fn accept(&self, event_id: &str) {
        self.script.lock().unwrap().refuse.remove(event_id);
    }

    pub fn requests(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// Every id that arrived in a request answered 2xx.
    pub fn accepted_ids(&self) -> HashSet<String> {
        self.requests()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .flat_map(|r| ids_in(&r.body).into_iter().map(|(id, _)| id))
            .collect()
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

/// Checks what `requests` carried against the events that had to arrive:
/// every id arrived (answered 2xx), per ordering key the first arrivals are
/// in `seq` order, nothing unknown arrived, and every copy of an id is
/// byte-identical. Returns how many deliveries were duplicates.
pub fn check_delivery(requests: &[Received], expected: &[Event], pbx: &str) -> usize {
    let want: HashMap<String, (String, String)> =
        expected.iter().map(|e| (e.id(pbx), (e.ordering_key().to_string(), e.to_cloudevent_json(pbx)))).collect();
    let mut first_seen: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut accepted: HashSet<String> = HashSet::new();
    let mut copies = 0usize;
    for r in requests {
        for (id, v) in ids_in(&r.body) {
            let (_, json) = want.get(&id).unwrap_or_else(|| panic!("unexpected event id {id}"));
            let expected_v: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(v, expected_v, "every copy of {id} carries the same event");
            if seen.insert(id.clone()) {
                first_seen.push(id.clone());
            } else {
                copies += 1;
            }
            if (200..300).contains(&r.status) {
                accepted.insert(id);
            }
        }
    }
    let missing: Vec<&String> = want.keys().filter(|id| !accepted.contains(*id)).collect();
    assert!(missing.is_empty(), "{} events never acknowledged: {missing:?}", missing.len());
    // Per key, first arrivals in the order the events were emitted.
    let order: HashMap<String, usize> = expected.iter().enumerate().map(|(i, e)| (e.id(pbx), i)).collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for id in &first_seen {
        let key = want[id].0.as_str();
        let i = order[id];
        if let Some(prev) = last.insert(key, i) {
            assert!(prev < i, "events of {key} arrived out of order at {id}");
        }
    }
    copies
}

/// One metrics snapshot. Taking it resets the debugging recorder's values
/// (gauges to 0, counters to 0), so read everything from one snapshot.
pub struct Metrics(Vec<(String, metrics_util::debugging::DebugValue)>);

impl Metrics {
    pub fn take(snapshotter: &metrics_util::debugging::Snapshotter) -> Metrics {
        Metrics(
            snapshotter.snapshot().into_vec().into_iter().map(|(k, _, _, v)| (k.key().name().to_string(), v)).collect(),
        )
    }

    /// A gauge's value (no labels).
    pub fn gauge(&self, name: &str) -> Option<f64> {
        self.0.iter().find_map(|(n, v)| match v {
            metrics_util::debugging::DebugValue::Gauge(g) if n == name => Some(g.into_inner()),
            _ => None,
        })
    }

    /// A counter summed over its label sets (since the previous snapshot).
    pub fn counter(&self, name: &str) -> u64 {
        self.0
            .iter()
            .filter_map(|(n, v)| match v {
                metrics_util::debugging::DebugValue::Counter(c) if n == name => Some(*c),
                _ => None,
            })
            .sum()
    }
}

/// `copies` renamed copies of the a11 events (distinct call ids and agent
/// event times), in an order that keeps every call's events in sequence.
pub fn many_events(copies: usize) -> Vec<Event> {
    let base = a11_events();
    let mut out = Vec::with_capacity(base.len() * copies);
    for i in 0..copies {
        for e in &base {
            let mut e = e.clone();
            match e.call.as_mut() {
                Some(c) => std::sync::Arc::make_mut(c).id = callbridge::event::CallId::new(&format!("{}-{i}", c.id)),
                None => e.time += i as i64 * 1_000_000_000,
            }
            out.push(e);
        }
    }
    out
}
