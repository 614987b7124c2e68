//! One error envelope everywhere: every kind of malformed or refused
//! request, sent over real HTTP on loopback to a daemon (a scripted AMI
//! server as the PBX), answers `{"error": {"code", "message"}}` with the
//! documented status and code — axum's own rejections (bad JSON, wrong
//! types, unknown query parameters, missing path segments, 405, 404 on
//! unknown routes) and the layers' (body too large, request timeout,
//! panic) included. Every answer is also checked against the OpenAPI
//! document. And the request log names method, route, status and latency,
//! never the token.

mod support;

use callbridge::api::layers::{harden, RequestLimits};
use callbridge::app::{self, RunOptions, SourceSpec};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::server::{AmiServer, Reply, ServerOptions};

const TOKEN: &str = "test-token";

/// An answer as read off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// Decodes a chunked body.
fn unchunk(mut raw: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = raw.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        raw = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Sends `head` (request line and headers, without the blank line) and
/// `body` as they are on a fresh connection; reads the whole answer.
fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(format!("{head}\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).expect("write head");
    // The server may answer (413) and close before reading the whole body.
    let _ = s.write_all(body);
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { unchunk(body) } else { body.to_string() };
    Answer { status, headers, body: serde_json::from_str(&body).unwrap_or(Value::String(body)) }
}

/// A request of the table.
struct Case {
    what: &'static str,
    method: &'static str,
    uri: String,
    token: Option<&'static str>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    chunked: bool,
    status: u16,
    code: &'static str,
}

fn case(what: &'static str, method: &'static str, uri: &str, status: u16, code: &'static str) -> Case {
    Case {
        what,
        method,
        uri: uri.to_string(),
        token: Some(TOKEN),
        content_type: None,
        body: Vec::new(),
        chunked: false,
        status,
        code,
    }
}

impl Case {
    fn token(mut self, token: Option<&'static str>) -> Case {
        self.token = token;
        self
    }

    fn json(mut self, body: &str) -> Case {
        self.content_type = Some("application/json");
        self.body = body.as_bytes().to_vec();
        self
    }

    fn body(mut self, content_type: Option<&'static str>, body: Vec<u8>) -> Case {
        self.content_type = content_type;
        self.body = body;
        self
    }

    fn chunked(mut self) -> Case {
        self.chunked = true;
        self
    }

    fn send(&self, addr: SocketAddr) -> Answer {
        let mut head = format!("{} {} HTTP/1.1", self.method, self.uri);
        if let Some(t) = self.token {
            head.push_str(&format!("\r\nAuthorization: Bearer {t}"));
        }
        if let Some(c) = self.content_type {
            head.push_str(&format!("\r\nContent-Type: {c}"));
        }
        let body = if self.chunked {
            head.push_str("\r\nTransfer-Encoding: chunked");
            let mut b = Vec::new();
            for piece in self.body.chunks(1000) {
                b.extend(format!("{:x}\r\n", piece.len()).as_bytes());
                b.extend(piece);
                b.extend(b"\r\n");
            }
            b.extend(b"0\r\n\r\n");
            b
        } else {
            if !self.body.is_empty() || matches!(self.method, "POST" | "PUT") {
                head.push_str(&format!("\r\nContent-Length: {}", self.body.len()));
            }
            self.body.clone()
        };
        raw(addr, &head, &body)
    }
}

fn write_config(dir: &Path, ami: &AmiServer) -> PathBuf {
    let text = format!(
        r#"[pbx]
name = "lab"
[pbx.ami]
address = "{addr}"
username = "callbridge"
secret = "s3cret-lab"
connect_timeout_seconds = 2.0
action_timeout_seconds = 5.0
reconnect_max_seconds = 0.2
[[groups]]
id = "support"
queue = "700"
agents = ["maria", "joao"]
[[groups]]
id = "sales"
queue = "701"
agents = ["ana", "joao"]
allow_transfer = true
{agents}
[outbound]
context = "from-internal"
[api]
listen = "127.0.0.1:0"
secret = "{TOKEN}"
request_timeout_seconds = 0.5
max_body_bytes = 2048
[outbox]
path = {outbox:?}
[[sinks]]
type = "jsonl"
name = "events"
path = {events:?}
"#,
        agents = support::LAB_AGENTS,
        addr = ami.addr(),
        outbox = dir.join("outbox"),
        events = dir.join("events.jsonl"),
    );
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn table() -> Vec<Case> {
    let big = format!("{{\"agent\": \"maria\", \"number\": \"{}\"}}", "1".repeat(4000));
    vec![
        case("no token", "GET", "/v1/calls", 401, "unauthorized").token(None),
        case("wrong token", "GET", "/v1/calls", 401, "unauthorized").token(Some("not-the-token")),
        case("unknown route", "GET", "/v1/nothing", 404, "not_found"),
        case("unknown route, no token", "GET", "/nothing", 404, "not_found").token(None),
        case("missing path segment", "GET", "/v1/calls/", 404, "not_found"),
        case("empty path segment", "GET", "/v1/groups//indicators", 404, "not_found"),
        case("empty path segment before an action", "POST", "/v1/calls//transfer", 404, "not_found").json("{}"),
        case("method not allowed", "PATCH", "/v1/calls", 405, "method_not_allowed"),
        case("method not allowed on a path with a parameter", "PUT", "/v1/calls/1.1", 405, "method_not_allowed"),
        case("method not allowed on an open route", "POST", "/healthz", 405, "method_not_allowed").token(None),
        case("unknown query parameter", "GET", "/v1/calls?colour=red", 400, "bad_query"),
        case("query parameter on an endpoint without any", "GET", "/v1/agents?x=1", 400, "bad_query"),
        case("repeated query parameter", "GET", "/v1/calls?group=a&group=b", 400, "bad_query"),
        case("limit of the wrong type", "GET", "/v1/calls?limit=many", 400, "bad_limit"),
        case("unknown state", "GET", "/v1/calls?state=flying", 400, "bad_state"),
        case("forged cursor", "GET", "/v1/calls?cursor=bm90IGEgY3Vyc29y", 400, "bad_cursor"),
        case("path segment not UTF-8", "GET", "/v1/calls/%FF", 400, "bad_path"),
        case("malformed JSON", "POST", "/v1/calls", 400, "malformed_json").json("{\"agent\": "),
        case("empty JSON body", "POST", "/v1/calls", 400, "malformed_json").json(""),
        case("no content type", "POST", "/v1/calls", 415, "unsupported_media_type")
            .body(None, b"{\"agent\": \"maria\"}".to_vec()),
        case("wrong content type", "POST", "/v1/calls", 415, "unsupported_media_type")
            .body(Some("text/plain"), b"{\"agent\": \"maria\"}".to_vec()),
        case("field of the wrong type", "POST", "/v1/calls", 400, "bad_request").json("{\"agent\": 5}"),
        case("boolean of the wrong type", "PUT", "/v1/agents/maria/availability", 400, "bad_request")
            .json("{\"available\": \"yes\"}"),
        case("missing field", "POST", "/v1/calls", 400, "bad_request").json("{\"number\": \"11987650700\"}"),
        case("unknown field", "POST", "/v1/calls/1.1/transfer", 400, "bad_request").json("{\"to\": \"joao\"}"),
        case("body over max_body_bytes", "POST", "/v1/calls", 413, "payload_too_large").json(&big),
        case("chunked body over max_body_bytes", "POST", "/v1/calls", 413, "payload_too_large").json(&big).chunked(),
        case("unknown call", "GET", "/v1/calls/no.such", 404, "call_not_found"),
        case("unknown group", "GET", "/v1/groups/nope/indicators", 404, "group_not_found"),
        case("unknown sink", "POST", "/v1/dead-letters/e1/retry?sink=nope", 404, "sink_not_found"),
        case("event stream: unknown event type", "GET", "/v1/events?type=call.flying", 400, "bad_type"),
        case("event stream: unknown group", "GET", "/v1/events?group=nope", 404, "group_not_found"),
        case("event stream: unknown agent", "GET", "/v1/events?agent=nope", 404, "agent_unknown"),
        case("event stream: no token", "GET", "/v1/events", 401, "unauthorized").token(None),
        case("monitor page: unknown method", "POST", "/ui", 405, "method_not_allowed").token(None),
        case("refused by the control layer", "POST", "/v1/calls", 403, "contact_not_consented")
            .json("{\"agent\": \"maria\", \"number\": \"11987650700\"}"),
        case("request timeout (the PBX never answers)", "PUT", "/v1/agents/maria/availability", 503, "request_timeout")
            .json("{\"available\": false}"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_the_envelope_with_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The PBX never answers QueueStatus: an availability switch outlives
    // the request timeout.
    let server = AmiServer::start(ServerOptions::default().on("QueueStatus", |_| Reply::Silence)).await;
    let running = app::start(RunOptions {
        config_path: write_config(dir.path(), &server),
        source: SourceSpec::Ami,
        api_listen: None,
        shutdown_deadline: Duration::from_secs(5),
    })
    .await
    .expect("daemon starts");
    server.wait_logins(1).await;
    let addr = running.api_addr.expect("API configured");
    let cases = table();
    assert!(cases.len() >= 15);
    let answers = tokio::task::spawn_blocking(move || {
        cases
            .into_iter()
            .map(|c| {
                let started = Instant::now();
                let answer = c.send(addr);
                (c, answer, started.elapsed())
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("join");
    let mut failures = Vec::new();
    for (c, answer, took) in &answers {
        let got = (answer.status, answer.code());
        let message = answer.body["error"]["message"].as_str().unwrap_or("");
        if got != (c.status, c.code) || message.is_empty() {
            failures.push(format!(
                "{}: {} {} → {} {} (want {} {})",
                c.what, c.method, c.uri, got.0, answer.body, c.status, c.code
            ));
            continue;
        }
        if !answer.header("content-type").is_some_and(|t| t.starts_with("application/json")) {
            failures.push(format!("{}: content type {:?}", c.what, answer.header("content-type")));
        }
        if let Err(e) = support::openapi::verify(c.method, &c.uri, answer.status, &answer.body) {
            failures.push(format!("{}: not as documented: {e}", c.what));
        }
        match c.code {
            "unauthorized" if answer.header("www-authenticate") != Some("Bearer") => {
                failures.push(format!("{}: no WWW-Authenticate: Bearer", c.what));
            }
            "method_not_allowed" if answer.header("allow").is_none() => {
                failures.push(format!("{}: no Allow header", c.what));
            }
            "request_timeout" if *took > Duration::from_secs(3) => {
                failures.push(format!("{}: answered after {took:?}", c.what));
            }
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), answers.len(), failures.join("\n"));
    running.stop().await.expect("clean stop");
}

/// A handler that panics answers `500 internal_error` in the envelope, and
/// the connection and the server live on.
#[tokio::test]
async fn a_panicking_handler_answers_500_in_the_envelope() {
    async fn boom() -> &'static str {
        panic!("deliberate test panic")
    }
    let router = axum::Router::new().route("/boom", axum::routing::get(boom));
    let app = harden(router.fallback(callbridge::api::error::not_found), RequestLimits::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    let server = callbridge::api::server::serve(listener, app, Default::default(), stop.clone());
    let (boom, missing) =
        tokio::task::spawn_blocking(move || (raw(addr, "GET /boom HTTP/1.1", b""), raw(addr, "GET /x HTTP/1.1", b"")))
            .await
            .expect("join");
    assert_eq!((boom.status, boom.code()), (500, "internal_error"), "{boom:?}");
    assert_eq!((missing.status, missing.code()), (404, "not_found"), "{missing:?}");
    stop.cancel();
    server.await.expect("server ends");
}

/// The request log, at the most verbose level, names method, route,
/// status and latency, and never the token — neither the right one nor a
/// wrong one, nor one put in a query string.
#[test]
fn the_request_log_never_shows_the_token() {
    const SECRET: &str = "tok-9f2c61e5-never-logged";
    const WRONG: &str = "wrong-7b1d04aa-never-logged";
    let dir = tempfile::tempdir().expect("tempdir");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lab = std::fs::read_to_string(root.join("config/lab.toml")).expect("lab config");
    assert!(lab.contains("secret = \"lab-api-token\""), "the lab config's API token moved");
    let config = lab
        .replace("secret = \"lab-api-token\"", &format!("secret = \"{SECRET}\""))
        .replace("path = \"-\"", &format!("path = {:?}", dir.path().join("events.jsonl")))
        + &format!("\n[outbox]\npath = {:?}\n", dir.path().join("outbox"));
    let config_path = dir.path().join("callbridge.toml");
    std::fs::write(&config_path, config).expect("config");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let log_path = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .args(["replay", "--serve", "--api-listen", &addr.to_string(), "--config"])
        .arg(&config_path)
        .arg(root.join("fixtures/ami/a01-inbound-answered.ami"))
        .env("RUST_LOG", "trace")
        .env_remove("JOURNAL_STREAM")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("start callbridge");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the API never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bearer = |t: &str| format!("\r\nAuthorization: Bearer {t}");
    let requests = [
        (format!("GET /v1/calls HTTP/1.1{}", bearer(SECRET)), 200),
        (format!("GET /v1/calls/1795471023.1 HTTP/1.1{}", bearer(SECRET)), 200),
        (format!("GET /v1/agents HTTP/1.1{}", bearer(WRONG)), 401),
        (format!("GET /v1/calls?access_token={SECRET} HTTP/1.1{}", bearer(SECRET)), 400),
        (format!("GET /v1/nothing HTTP/1.1{}", bearer(SECRET)), 404),
    ];
    let mut statuses = Vec::new();
    for (head, _) in &requests {
        statuses.push(raw(addr, head, b"").status);
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).expect("log");
    let want: Vec<u16> = requests.iter().map(|(_, s)| *s).collect();
    // The call id of the second request depends on the trace; 404 is fine too.
    assert_eq!(statuses[0], want[0], "{log}");
    assert_eq!(&statuses[2..], &want[2..], "{log}");
    for secret in [SECRET, WRONG] {
        assert!(!log.contains(secret), "the token {secret} is in the log:\n{log}");
    }
    let request_lines: Vec<&str> = log.lines().filter(|l| l.contains("HTTP request answered")).collect();
    assert!(request_lines.len() >= requests.len(), "one line per request expected:\n{log}");
    for needle in ["method=GET", "route=/v1/calls", "route=/v1/calls/{id}", "status=200", "status=401", "latency_ms="] {
        assert!(
            request_lines.iter().any(|l| l.contains(needle)),
            "no request line with {needle}:\n{}",
            request_lines.join("\n")
        );
    }
}
