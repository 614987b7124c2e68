//! The HTTP API under hostile or heavy load, against a real daemon on
//! loopback.
//!
//! - Idle connections: 1,100 sockets that never send a byte, against a
//!   `callbridge` child process started with `ulimit -n 1024` (the stock
//!   soft limit a service gets without `LimitNOFILE`, the setting under
//!   which 1,100 idle connections used to exhaust its descriptors). The
//!   test process keeps its own limit (it needs ~1,100 descriptors; it
//!   checks and says so if it has fewer). `/healthz` must still answer in
//!   under 100 ms.
//! - Header-read timeout: a silent connection is closed; an event stream
//!   is not (it is a request in progress) and ends at shutdown.
//! - Pagination of `GET /v1/calls` over 10,000 live calls: every call
//!   exactly once, filters kept, bad cursors and limits refused with the
//!   JSON error envelope, and a page's latency bounded.

mod support;

use callbridge::app::{self, RunOptions, SourceSpec};
use callbridge::event::{CallId, CallSnapshot, CallState, Direction, Event, EventKind, Micros, Party};
use callbridge::ids::{AgentId, GroupId};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "lab-api-token";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The lab configuration with its API on `127.0.0.1:0`, events to a file
/// and `extra_api` appended to `[api]`.
fn lab_config(dir: &Path, extra_api: &str) -> PathBuf {
    let config = std::fs::read_to_string(root().join("config/lab.toml")).expect("lab config");
    let config = config
        .replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"127.0.0.1:0\"\n{extra_api}"))
        .replace("path = \"-\"", &format!("path = {:?}", dir.join("events.jsonl")))
        + &format!("\n[outbox]\npath = {:?}\n", dir.join("outbox"));
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

fn soft_nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or("");
    line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// One HTTP/1.1 request on a fresh connection; (status, body) or an error
/// (connect/read timeout included).
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn idle_connections_leave_healthz_answering() {
    const IDLE: usize = 1_100;
    let soft = soft_nofile();
    assert!(soft >= 1_400, "this test opens {IDLE} sockets itself: raise `ulimit -n` (now {soft}) to 1400 or more");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = lab_config(dir.path(), "");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_callbridge"))
        .args(["replay", "--serve", "--api-listen", &addr.to_string(), "--config"])
        .arg(&config)
        .arg(root().join("fixtures/ami/a01-inbound-answered.ami"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start callbridge");
    let _daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(addr, "/healthz", Duration::from_secs(1)).ok().map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the daemon never answered /healthz");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut idle = Vec::with_capacity(IDLE);
    let mut refused = 0;
    for _ in 0..IDLE {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => idle.push(s),
            Err(_) => refused += 1,
        }
    }
    eprintln!("{} idle connections open, {refused} not accepted by the kernel", idle.len());
    std::thread::sleep(Duration::from_millis(300));

    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let got = http_get(addr, "/healthz", Duration::from_secs(2));
        let took = t.elapsed();
        assert!(matches!(&got, Ok((200, body)) if body.contains("ok")), "/healthz with {IDLE} idle sockets: {got:?}");
        worst = worst.max(took);
    }
    eprintln!("/healthz worst of 5 with {} idle sockets: {worst:?}", idle.len());
    assert!(worst < Duration::from_millis(100), "/healthz took {worst:?}");
    // The authenticated API works as well.
    let (status, body) = http_get(addr, "/v1/calls", Duration::from_secs(2)).expect("/v1/calls");
    assert_eq!(status, 200, "{body}");
    drop(idle);
}

async fn start(config: PathBuf) -> app::Running {
    let source = SourceSpec::Traces { paths: vec![], speed: callbridge::replay::Speed::Max };
    app::start(RunOptions { config_path: config, source, api_listen: None, shutdown_deadline: Duration::from_secs(5) })
        .await
        .expect("daemon starts")
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(lab_config(dir.path(), "header_read_timeout_seconds = 0.5\nidle_timeout_seconds = 0.5")).await;
    let addr = running.api_addr.expect("api");
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let t = Instant::now();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf);
        (n.ok(), t.elapsed())
    })
    .await
    .expect("join");
    assert_eq!(closed.0, Some(0), "the silent connection was not closed");
    assert!(closed.1 >= Duration::from_millis(400) && closed.1 < Duration::from_secs(3), "{:?}", closed.1);
    running.stop().await.expect("clean stop");
}

/// An event stream is a request in progress as long as it is open: the
/// idle timeout does not close it, and it ends promptly when the daemon
/// stops (not after the forced-close grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_outlives_the_idle_timeout_and_ends_at_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(lab_config(dir.path(), "header_read_timeout_seconds = 0.5\nidle_timeout_seconds = 0.5")).await;
    let base = format!("http://{}", running.api_addr.expect("api"));
    let mut stream = support::sse::SseReader::open(&format!("{base}/v1/events"), TOKEN, None).await;
    // Idle long enough for an idle connection to be closed, forced close included.
    tokio::time::sleep(callbridge::api::server::CLOSE_GRACE + Duration::from_secs(1)).await;
    let resp = reqwest::Client::new()
        .put(format!("{base}/v1/agents/ana/availability"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"available": false, "reason": "lunch"}"#)
        .send()
        .await
        .expect("PUT availability");
    // No AMI here: the switch is recorded, no queue can be told.
    assert_eq!(resp.status().as_u16(), 207);
    let event = stream.next("agent.availability after the idle timeout and the close grace").await;
    assert_eq!(event.event.as_deref(), Some("agent.availability"));
    let t = Instant::now();
    running.stop().await.expect("clean stop");
    assert_eq!(stream.next_within(Duration::from_secs(2)).await, None, "the stream ends at shutdown");
    assert!(t.elapsed() < Duration::from_secs(4), "stopping took {:?}", t.elapsed());
}

const S: Micros = 1_000_000;
const T0: Micros = 1_795_471_023 * S;

fn live_call(i: usize) -> Event {
    let group = if i % 2 == 0 { "support" } else { "sales" };
    let (state, agent) = match i % 3 {
        0 => (CallState::Queued, None),
        1 => (CallState::Ringing, Some("maria")),
        _ => (CallState::Talking, Some("joao")),
    };
    let call = CallSnapshot {
        id: CallId::new(&format!("1795471023.{i}")),
        direction: Direction::Inbound,
        state,
        caller: Party { number: Some(format!("119876{i:05}").into()), name: Some(format!("Cliente {i}").into()) },
        callee: Party { number: Some("1130001000".into()), name: None },
        group: Some(GroupId::new(group)),
        queue: Some("700".into()),
        agent: agent.map(AgentId::new),
        ticket_id: None,
        // Many calls share a start time: the order must still be total.
        started_at: T0 + (i / 7) as Micros * S,
        answered_at: None,
        ended_at: None,
        recording: None,
        routing: None,
        caller_lookup: None,
    };
    Event { seq: 1, time: call.started_at, kind: EventKind::Started {}, call: Some(call.into()) }
}

struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    /// One GET; the answer is checked against the OpenAPI document.
    async fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.fetch(path).await;
        support::openapi::check("GET", path, status, &body);
        (status, body)
    }

    async fn fetch(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(format!("{}{path}", self.base)).bearer_auth(TOKEN).send().await.expect("request");
        let status = r.status().as_u16();
        (status, serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or(Value::Null))
    }

    /// Walks every page of `query`; the ids in order, and the slowest page.
    async fn walk(&self, query: &str, limit: usize) -> (Vec<String>, Duration) {
        let (mut ids, mut cursor, mut slowest) = (Vec::new(), None::<String>, Duration::ZERO);
        loop {
            let mut path = format!("/v1/calls?limit={limit}{query}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let t = Instant::now();
            let (status, body) = self.fetch(&path).await;
            slowest = slowest.max(t.elapsed());
            support::openapi::check("GET", &path, status, &body);
            assert_eq!(status, 200, "{path}: {body}");
            let calls = body["calls"].as_array().expect("calls");
            assert!(calls.len() <= limit);
            assert_eq!(body["count"].as_u64(), Some(calls.len() as u64));
            ids.extend(calls.iter().map(|c| c["id"].as_str().expect("id").to_string()));
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return (ids, slowest),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_listed_page_by_page() {
    const CALLS: usize = 10_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(lab_config(dir.path(), "")).await;
    for i in 0..CALLS {
        running.shared.registry.apply(&live_call(i));
    }
    let addr = running.api_addr.expect("api");
    let api = Api { client: reqwest::Client::new(), base: format!("http://{addr}") };

    // Every call exactly once, in start order.
    let (ids, slowest) = api.walk("", 1000).await;
    assert_eq!(ids.len(), CALLS);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), CALLS, "a call was listed twice");
    eprintln!("10 pages of 1000 out of {CALLS} live calls: slowest {slowest:?}");
    assert!(slowest < Duration::from_millis(500), "a page took {slowest:?}");
    let (small, _) = api.walk("", 333).await;
    assert_eq!(small, ids, "the page size changed the order");

    // Filters apply before paging.
    let (talking, _) = api.walk("&state=talking&group=support", 250).await;
    let expected: Vec<String> = ids
        .iter()
        .filter(|id| id.rsplit('.').next().and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n % 6 == 2))
        .cloned()
        .collect();
    assert_eq!(talking, expected);

    // The default page is 100 calls, and says where to go on.
    let (status, body) = api.get("/v1/calls").await;
    assert_eq!((status, body["count"].as_u64()), (200, Some(100)));
    assert!(body["next_cursor"].is_string());

    // Calls ended between two pages do not disturb the walk.
    let (_, first) = api.get("/v1/calls?limit=10").await;
    running.shared.registry.remove("1795471023.0");
    running.shared.registry.remove(first["calls"][9]["id"].as_str().expect("id"));
    let cursor = first["next_cursor"].as_str().expect("cursor").to_string();
    let (_, next) = api.get(&format!("/v1/calls?limit=10&cursor={cursor}")).await;
    assert_eq!(next["calls"][0]["id"], first_after(&ids, 10));

    for bad in ["cursor=%%%", "cursor=bm90IGEgY3Vyc29y", "cursor=", "limit=0", "limit=1001", "limit=many"] {
        let (status, body) = api.get(&format!("/v1/calls?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let code = body["error"]["code"].as_str().unwrap_or_default();
        assert!(["bad_cursor", "bad_limit"].contains(&code), "{bad}: {body}");
        assert!(body["error"]["message"].is_string(), "{bad}: {body}");
    }
    running.stop().await.expect("clean stop");
}

fn first_after(ids: &[String], n: usize) -> Value {
    Value::from(ids[n].clone())
}
