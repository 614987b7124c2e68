//! Routing by who is calling, end to end over loopback: a FastAGI client
//! that speaks as Asterisk does, the router, and a real HTTP lookup server
//! (the generic form and one that answers like Zammad's user search).
//! Known active, known inactive, unknown, slow beyond the timeout, 500,
//! down: each call gets its queue and reason; failures fail open within
//! the timeout + 50 ms; repeated numbers hit the cache; a storm of 1,000
//! sessions for 100 numbers stays within the concurrency cap. And the
//! configuration checks: unknown targets, cycles through redirects and
//! overflow, a lookup without URL, each named by field (`check-config`
//! exits 64).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use callbridge::config::Config;
use callbridge::routing::agi::{serve_with, AgiLimits};
use callbridge::routing::{PresenceBoard, RouteOracle};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Support redirects unknown callers to triage and inactive ones to
/// former; sales overflows to support (whose redirects then apply).
const GROUPS: &str = r#"
[pbx]
name = "t"

[outbound]
country_code = "55"

[[groups]]
id = "support"
queue = "700"
agents = ["maria"]
redirect_unknown_to = "triage"
redirect_inactive_to = "former"

[[groups]]
id = "triage"
queue = "701"
agents = ["ana"]

[[groups]]
id = "former"
queue = "702"
agents = ["joao"]

[[groups]]
id = "sales"
queue = "703"
agents = ["rui"]
hours = [{ days = "sat", from = "08:00", to = "09:00" }]
overflow = ["support"]

[[agents]]
id = "maria"
extension = "2000"
[[agents]]
id = "joao"
extension = "2001"
[[agents]]
id = "ana"
extension = "2002"
[[agents]]
id = "rui"
extension = "2003"
"#;

/// Monday 2026-11-23 noon UTC: sales (Saturdays only) is closed.
const NOON: &str = "2026-11-23T12:00:00Z";

const ACTIVE: &str = "11900000001";
const INACTIVE: &str = "11900000002";
const UNKNOWN: &str = "11900000003";
const SLOW: &str = "11900000004";
const BROKEN: &str = "11900000005";

const TOKEN: &str = "lookup-token-1";
const ZAMMAD_TOKEN: &str = "zammad-access-token";

// ---------------------------------------------------------------- the helpdesk

/// What the lookup server saw.
#[derive(Default)]
struct Seen {
    requests: Mutex<HashMap<String, usize>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    unauthorized: AtomicUsize,
    /// Zammad search queries, as sent.
    queries: Mutex<Vec<String>>,
}

impl Seen {
    fn requests_for(&self, number: &str) -> usize {
        self.requests.lock().unwrap().get(number).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.requests.lock().unwrap().values().sum()
    }

    /// Counts a request in flight for as long as the guard lives.
    fn enter(self: &Arc<Self>, number: &str) -> InFlight {
        *self.requests.lock().unwrap().entry(number.to_string()).or_default() += 1;
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

struct InFlight(Arc<Seen>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Storm numbers `1190010xxxx`: even ones are active customers, odd ones
/// nobody.
fn storm_number(i: usize) -> String {
    format!("11900{:06}", 100_000 + i)
}

fn storm_known(number: &str) -> bool {
    number.bytes().last().is_some_and(|d| (d - b'0') % 2 == 0)
}

/// The generic form: `GET /lookup/{number}` with a bearer token.
async fn generic(State(seen): State<Arc<Seen>>, Path(number): Path<String>, headers: HeaderMap) -> Response {
    let _guard = seen.enter(&number);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        seen.unauthorized.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let answer =
        |found: bool, active: bool, id: &str| Json(json!({"found": found, "active": active, "contact_id": id}));
    match number.as_str() {
        ACTIVE => answer(true, true, "c-1").into_response(),
        INACTIVE => answer(true, false, "c-2").into_response(),
        UNKNOWN => StatusCode::NOT_FOUND.into_response(),
        SLOW => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            answer(true, true, "c-4").into_response()
        }
        BROKEN => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        n if n.starts_with("119001") => {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if storm_known(n) {
                answer(true, true, n).into_response()
            } else {
                Json(json!({"found": false})).into_response()
            }
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A Zammad user as `GET /api/v1/users/search` lists it (the attributes
/// of Zammad's REST API documentation; `expand` not asked).
fn zammad_user(id: u64, active: bool, phone: &str, mobile: &str) -> serde_json::Value {
    json!({
        "id": id, "organization_id": null, "login": format!("customer{id}@example.com"),
        "firstname": "Cliente", "lastname": format!("{id}"), "email": format!("customer{id}@example.com"),
        "image": null, "image_source": null, "web": "", "phone": phone, "fax": "", "mobile": mobile,
        "department": "", "street": "", "zip": "", "city": "", "country": "", "address": "",
        "vip": false, "verified": false, "active": active, "note": "", "last_login": null,
        "source": null, "login_failed": 0, "out_of_office": false, "out_of_office_start_at": null,
        "out_of_office_end_at": null, "out_of_office_replacement_id": null, "preferences": {},
        "updated_by_id": 1, "created_by_id": 1, "created_at": "2026-01-05T10:00:00.000Z",
        "updated_at": "2026-11-20T10:00:00.000Z", "role_ids": [3], "organization_ids": [],
        "authorization_ids": [], "karma_user_ids": [], "group_ids": {}
    })
}

/// Zammad's user search: `GET /api/v1/users/search?query=…&limit=…` with
/// `Authorization: Token token=…`; a JSON array of users. Like Zammad's
/// search index, it matches whole words: the caller's digits against the
/// words of `phone` and `mobile`.
async fn zammad_search(
    State(seen): State<Arc<Seen>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let query = params.get("query").cloned().unwrap_or_default();
    let _guard = seen.enter(&query);
    seen.queries.lock().unwrap().push(query.clone());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Token token={ZAMMAD_TOKEN}")) {
        seen.unauthorized.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "authentication failed"}))).into_response();
    }
    let users = [
        zammad_user(11, true, "+5511900000001", ""),
        zammad_user(12, false, "", "5511900000002"),
        // Shares words with nobody's number: never found.
        zammad_user(13, true, "+55 11 90000-0009", ""),
    ];
    let words = |s: &str| {
        s.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).map(str::to_string).collect::<Vec<_>>()
    };
    let asked = words(&query);
    let found: Vec<serde_json::Value> = users
        .into_iter()
        .filter(|u| {
            let mut own = words(u["phone"].as_str().unwrap_or(""));
            own.extend(words(u["mobile"].as_str().unwrap_or("")));
            own.iter().any(|w| asked.contains(w))
        })
        .collect();
    Json(serde_json::Value::Array(found)).into_response()
}

struct Helpdesk {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

async fn helpdesk() -> Helpdesk {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/lookup/{number}", get(generic))
        .route("/api/v1/users/search", get(zammad_search))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Helpdesk { addr, seen }
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------- the router

struct Router_ {
    addr: SocketAddr,
    _shutdown: tokio_util::sync::DropGuard,
}

fn config(lookup: &str) -> Config {
    let text = format!("{GROUPS}\n[caller_lookup]\n{lookup}\n");
    Config::parse(&text, "lookup.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn generic_lookup(port: u16, extra: &str) -> String {
    format!("url = \"http://127.0.0.1:{port}/lookup/{{number}}\"\nsecret = \"{TOKEN}\"\n{extra}")
}

async fn router(config: &Config, limits: AgiLimits) -> Router_ {
    let routing = Arc::new(callbridge::settings::routing(config).expect("rules"));
    let lookup = callbridge::settings::caller_lookups(config).expect("lookup");
    let noon = NOON.parse::<jiff::Timestamp>().expect("instant").as_microsecond();
    let oracle = RouteOracle::with_clock(routing, Arc::new(PresenceBoard::new()), move || noon).with_lookup(lookup);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_with(listener, Arc::new(oracle), limits, shutdown.clone()));
    Router_ { addr, _shutdown: shutdown.drop_guard() }
}

/// One FastAGI session as Asterisk runs `AGI(agi://…/<script>)` for a call
/// from `callerid`: the variables set, and how long the router took to
/// answer (from the environment block sent to the first `SET VARIABLE`).
async fn agi(addr: SocketAddr, script: &str, callerid: &str) -> (HashMap<String, String>, Duration) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (read, mut write) = stream.into_split();
    let env = format!(
        "agi_network: yes\nagi_network_script: {script}\nagi_request: agi://{addr}/{script}\n\
         agi_channel: PJSIP/carrier-0000000b\nagi_uniqueid: 1795471144.11\nagi_callerid: {callerid}\n\
         agi_calleridname: Cliente\nagi_context: from-pstn\nagi_extension: 1130001000\nagi_priority: 3\n\n"
    );
    let started = Instant::now();
    write.write_all(env.as_bytes()).await.expect("env");
    let mut read = BufReader::new(read);
    let mut vars = HashMap::new();
    let mut line = String::new();
    let mut answered = None;
    loop {
        line.clear();
        if read.read_line(&mut line).await.expect("read") == 0 {
            return (vars, answered.unwrap_or_else(|| started.elapsed()));
        }
        answered.get_or_insert_with(|| started.elapsed());
        // SET VARIABLE NAME "value"
        let rest = line.trim_end().strip_prefix("SET VARIABLE ").expect("only SET VARIABLE");
        let (name, value) = rest.split_once(' ').expect("name and value");
        vars.insert(name.to_string(), value.trim_matches('"').replace("\\\"", "\""));
        write.write_all(b"200 result=1\n").await.expect("reply");
    }
}

/// The variables that matter here, in a fixed order.
fn summary(vars: &HashMap<String, String>) -> [&str; 7] {
    let v = |k: &str| vars.get(k).map(String::as_str).unwrap_or("<unset>");
    [
        v("CALLBRIDGE_QUEUE"),
        v("CALLBRIDGE_GROUP"),
        v("CALLBRIDGE_ROUTING_REASON"),
        v("CALLBRIDGE_ROUTING_FROM"),
        v("CALLBRIDGE_CALLER_FOUND"),
        v("CALLBRIDGE_CALLER_ACTIVE"),
        v("CALLBRIDGE_CONTACT_ID"),
    ]
}

const TIMEOUT: Duration = Duration::from_millis(300);
const MARGIN: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_gets_the_queue_and_reason_of_who_they_are() {
    let desk = helpdesk().await;
    let r = router(&config(&generic_lookup(desk.addr.port(), "")), AgiLimits::default()).await;
    // (caller ID, expected [queue, group, reason, from, found, active, contact])
    let cases: [(&str, [&str; 7]); 8] = [
        (ACTIVE, ["700", "support", "", "", "true", "true", "c-1"]),
        (INACTIVE, ["702", "former", "caller_inactive", "support", "true", "false", "c-2"]),
        (UNKNOWN, ["701", "triage", "caller_unknown", "support", "false", "", ""]),
        // The same numbers as the PBX may present them.
        ("+55 11 90000-0002", ["702", "former", "caller_inactive", "support", "true", "false", "c-2"]),
        ("005511900000001", ["700", "support", "", "", "true", "true", "c-1"]),
        // Withheld: nobody to look up, so nobody known.
        ("anonymous", ["701", "triage", "caller_unknown", "support", "false", "", ""]),
        // Failures fail open: the normal route, nothing said about the caller.
        (SLOW, ["700", "support", "", "", "", "", ""]),
        (BROKEN, ["700", "support", "", "", "", "", ""]),
    ];
    for (caller, want) in cases {
        let (vars, took) = agi(r.addr, "route?queue=700", caller).await;
        assert_eq!(summary(&vars), want, "{caller}");
        assert_eq!(vars["CALLBRIDGE_ROUTE"], "queue", "{caller}");
        assert!(took < TIMEOUT + MARGIN, "{caller}: {took:?}");
    }
    assert_eq!(desk.seen.unauthorized.load(Ordering::SeqCst), 0, "the bearer token is sent");
    // The overflow chain applies before the caller: sales is closed, support
    // would take the call, support's redirects apply (reason: the last move).
    let (vars, _) = agi(r.addr, "route?group=sales", INACTIVE).await;
    assert_eq!(summary(&vars), ["702", "former", "caller_inactive", "support", "true", "false", "c-2"]);
    assert_eq!(vars["CALLBRIDGE_DIVERTED_FROM"], "");
    let (vars, _) = agi(r.addr, "route?group=sales", ACTIVE).await;
    assert_eq!(summary(&vars), ["700", "support", "overflow", "sales", "true", "true", "c-1"]);
    // A group without redirects never asks.
    let before = desk.seen.total();
    let (vars, _) = agi(r.addr, "route?group=triage", "11977777777").await;
    assert_eq!(summary(&vars), ["701", "triage", "", "", "", "", ""]);
    assert_eq!(desk.seen.total(), before);
    // `caller=` overrides the channel's caller ID.
    let (vars, _) = agi(r.addr, &format!("route?queue=700&caller={INACTIVE}"), ACTIVE).await;
    assert_eq!(summary(&vars)[..2], ["702", "former"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_failing_lookups_fail_open_within_the_timeout() {
    let desk = helpdesk().await;
    let down = closed_port().await;
    let slow_desk = router(&config(&generic_lookup(desk.addr.port(), "")), AgiLimits::default()).await;
    let down_desk = router(&config(&generic_lookup(down, "")), AgiLimits::default()).await;
    for (what, r, caller) in [
        ("slow beyond the timeout", &slow_desk, SLOW),
        ("500", &slow_desk, BROKEN),
        ("down", &down_desk, ACTIVE),
        ("down, unknown number", &down_desk, UNKNOWN),
    ] {
        for attempt in 0..3 {
            let (vars, took) = agi(r.addr, "route?queue=700", caller).await;
            assert_eq!(summary(&vars), ["700", "support", "", "", "", "", ""], "{what} #{attempt}");
            assert!(took < TIMEOUT + MARGIN, "{what} #{attempt}: {took:?}");
        }
    }
    // Failures are not cached: every call asked again.
    assert_eq!(desk.seen.requests_for(BROKEN), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_number_is_answered_from_the_cache() {
    let desk = helpdesk().await;
    let r = router(&config(&generic_lookup(desk.addr.port(), "")), AgiLimits::default()).await;
    for caller in [INACTIVE, "+5511900000002", INACTIVE, UNKNOWN, UNKNOWN] {
        agi(r.addr, "route?queue=700", caller).await;
    }
    assert_eq!(desk.seen.requests_for(INACTIVE), 1);
    assert_eq!(desk.seen.requests_for(UNKNOWN), 1, "a 404 is an answer too");

    // Without a cache, every call asks.
    let desk = helpdesk().await;
    let r = router(&config(&generic_lookup(desk.addr.port(), "cache_ttl_seconds = 0")), AgiLimits::default()).await;
    for _ in 0..3 {
        agi(r.addr, "route?queue=700", ACTIVE).await;
    }
    assert_eq!(desk.seen.requests_for(ACTIVE), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_storm_stays_within_the_concurrency_cap() {
    const SESSIONS: usize = 1000;
    const NUMBERS: usize = 100;
    const CAP: usize = 8;
    let desk = helpdesk().await;
    // A generous timeout: this is about the cap, not about failing open
    // (2,000 busy sockets on two test threads slow every request down, and
    // requests beyond the cap wait their turn).
    let lookup = generic_lookup(desk.addr.port(), &format!("max_concurrent = {CAP}\ntimeout_ms = 15000"));
    let limits =
        AgiLimits { max_sessions: SESSIONS + 10, session_timeout: Duration::from_secs(30), ..Default::default() };
    let r = router(&config(&lookup), limits).await;
    let mut sessions = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let addr = r.addr;
        sessions.push(tokio::spawn(async move {
            let number = storm_number(i % NUMBERS);
            let (vars, _) = agi(addr, "route?queue=700", &number).await;
            (number, vars)
        }));
    }
    for s in sessions {
        let (number, vars) = s.await.expect("session");
        let want = if storm_known(&number) { ["700", "support"] } else { ["701", "triage"] };
        assert_eq!(summary(&vars)[..2], want, "{number}: {:?}", summary(&vars));
    }
    let max = desk.seen.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= CAP, "{max} lookups in flight at once, cap {CAP}");
    assert!(max >= 2, "the storm never ran lookups side by side ({max})");
    // Callers of one number share one request; later ones hit the cache.
    assert_eq!(desk.seen.total(), NUMBERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zammad_form_asks_zammads_user_search() {
    let desk = helpdesk().await;
    let lookup = format!("type = \"zammad\"\nurl = \"http://{}/\"\nsecret = \"{ZAMMAD_TOKEN}\"", desk.addr);
    let r = router(&config(&lookup), AgiLimits::default()).await;
    for (caller, want) in [
        (ACTIVE, ["700", "support", "", "", "true", "true", "11"]),
        ("+55 (11) 90000-0002", ["702", "former", "caller_inactive", "support", "true", "false", "12"]),
        (UNKNOWN, ["701", "triage", "caller_unknown", "support", "false", "", ""]),
        // A user whose phone only shares words with the number is not the caller.
        ("11900000009", ["701", "triage", "caller_unknown", "support", "false", "", ""]),
    ] {
        let (vars, took) = agi(r.addr, "route?queue=700", caller).await;
        assert_eq!(summary(&vars), want, "{caller}");
        assert!(took < TIMEOUT + MARGIN, "{caller}: {took:?}");
    }
    assert_eq!(desk.seen.unauthorized.load(Ordering::SeqCst), 0, "Zammad's token header is sent");
    let queries = desk.seen.queries.lock().unwrap().clone();
    assert_eq!(
        queries[0], "phone:(11900000001 OR 5511900000001) OR mobile:(11900000001 OR 5511900000001)",
        "{queries:?}"
    );

    // A wrong token: Zammad refuses, the call fails open.
    let lookup = format!("type = \"zammad\"\nurl = \"http://{}/\"\nsecret = \"wrong\"", desk.addr);
    let r = router(&config(&lookup), AgiLimits::default()).await;
    let (vars, _) = agi(r.addr, "route?queue=700", INACTIVE).await;
    assert_eq!(summary(&vars), ["700", "support", "", "", "", "", ""]);
}

// ---------------------------------------------------------------- configuration

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text, "c.toml") {
        Ok(_) => Vec::new(),
        Err(e) => e.problems,
    }
}

fn has(problems: &[String], parts: &[&str]) -> bool {
    problems.iter().any(|p| parts.iter().all(|part| p.contains(part)))
}

#[test]
fn redirect_and_lookup_settings_are_checked_by_field() {
    let lookup = "[caller_lookup]\nurl = \"http://127.0.0.1:9/lookup/{number}\"\n";
    let base = format!("{GROUPS}\n{lookup}");
    assert!(problems(&base).is_empty(), "{:#?}", problems(&base));

    let unknown_target = base.replace("redirect_unknown_to = \"triage\"", "redirect_unknown_to = \"triag\"");
    let p = problems(&unknown_target);
    assert!(
        has(&p, &["groups[0].redirect_unknown_to:", "unknown group \"triag\"", "did you mean \"triage\""]),
        "{p:#?}"
    );

    let to_itself = base.replace("redirect_inactive_to = \"former\"", "redirect_inactive_to = \"support\"");
    let p = problems(&to_itself);
    assert!(has(&p, &["groups[0].redirect_inactive_to:", "redirects to itself"]), "{p:#?}");

    // support → (unknown) triage → (overflow) sales → (overflow) support.
    let cycle = base.replace("agents = [\"ana\"]", "agents = [\"ana\"]\noverflow = [\"sales\"]");
    let p = problems(&cycle);
    assert!(
        has(
            &p,
            &[
                "groups[0].redirect_unknown_to:",
                "routing cycle support → triage → sales → support",
                "overflow and redirects"
            ]
        ),
        "{p:#?}"
    );

    let no_url = format!("{GROUPS}\n[caller_lookup]\ntimeout_ms = 200\n");
    let p = problems(&no_url);
    assert!(has(&p, &["caller_lookup.url: missing (required)"]), "{p:#?}");

    let no_lookup = GROUPS.to_string();
    let p = problems(&no_lookup);
    assert!(has(&p, &["groups[0].redirect_unknown_to:", "needs a [caller_lookup]"]), "{p:#?}");
    assert!(has(&p, &["groups[0].redirect_inactive_to:", "needs a [caller_lookup]"]), "{p:#?}");

    for (lookup, field, why) in [
        ("url = \"http://127.0.0.1:9/lookup\"", "caller_lookup.url:", "{number}"),
        ("url = \"ftp://x/{number}\"", "caller_lookup.url:", "not an http"),
        ("url = \"http://x/{number}\"\ntimeout_ms = 0", "caller_lookup.timeout_ms:", "at least 1"),
        ("url = \"http://x/{number}\"\nmax_concurrent = 0", "caller_lookup.max_concurrent:", "at least 1"),
        ("url = \"http://x/{number}\"\nfound_pointer = \"found\"", "caller_lookup.found_pointer:", "JSON pointer"),
        ("url = \"http://x/{number}\"\nsecret = \"a\"\nsecret_env = \"B\"", "caller_lookup:", "both set"),
        ("type = \"zammad\"\nurl = \"http://zammad.example/\"", "caller_lookup:", "no secret"),
        (
            "type = \"zammad\"\nurl = \"http://z/\"\nsecret = \"t\"\nactive_pointer = \"/a\"",
            "caller_lookup.active_pointer:",
            "only for type",
        ),
        ("type = \"ldap\"\nurl = \"http://z/{number}\"", "caller_lookup.type:", "not one of"),
        ("url = \"http://x/{number}\"\ncolour = 1", "caller_lookup.colour:", "unknown key"),
    ] {
        let p = problems(&format!("{GROUPS}\n[caller_lookup]\n{lookup}\n"));
        assert!(has(&p, &[field, why]), "{lookup}: no problem at {field} saying {why:?}:\n{p:#?}");
    }
}

#[test]
fn check_config_refuses_bad_redirects_with_exit_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    let text = GROUPS.replace("redirect_unknown_to = \"triage\"", "redirect_unknown_to = \"nowhere\"");
    std::fs::write(&path, format!("{text}\n[caller_lookup]\ntype = \"zammad\"\nsecret = \"t\"\n")).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .args(["check-config"])
        .arg(&path)
        .output()
        .expect("run callbridge");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("groups[0].redirect_unknown_to: unknown group \"nowhere\""), "{err}");
    assert!(err.contains("caller_lookup.url: missing (required)"), "{err}");
}

// ---------------------------------------------------------------- lifecycle

/// What Asterisk reports for a call the router sent on: the caller's
/// channel, the `VarSet`s of the variables the router set (in its order),
/// the queue join, the hangup.
fn routed_call(id: &str, vars: &[(&str, &str)], queue: &str, at: i64) -> Vec<callbridge::ami::Frame> {
    use callbridge::ami::Frame;
    let ts = |s: i64| format!("{s}.000000");
    let chan = format!("PJSIP/carrier-{id}");
    let mut frames = vec![Frame::from_pairs(&[
        ("Event", "Newchannel"),
        ("Timestamp", &ts(at)),
        ("Channel", &chan),
        ("ChannelStateDesc", "Ring"),
        ("CallerIDNum", INACTIVE),
        ("CallerIDName", "Cliente"),
        ("Exten", "1130001000"),
        ("Uniqueid", id),
        ("Linkedid", id),
    ])];
    let on = |event: &str, s: i64, extra: &[(&str, &str)]| {
        let t = ts(s);
        let mut f = vec![
            ("Event", event),
            ("Timestamp", t.as_str()),
            ("Channel", chan.as_str()),
            ("Uniqueid", id),
            ("Linkedid", id),
        ];
        f.extend_from_slice(extra);
        Frame::from_pairs(&f)
    };
    for (var, value) in vars {
        frames.push(on("VarSet", at + 1, &[("Variable", var), ("Value", value)]));
    }
    frames.push(on("QueueCallerJoin", at + 1, &[("Queue", queue), ("Position", "1")]));
    frames.push(on("QueueCallerAbandon", at + 5, &[("Queue", queue)]));
    frames.push(on("Hangup", at + 5, &[("Cause", "16")]));
    frames
}

#[test]
fn the_decision_reaches_the_snapshot_and_the_indicators() {
    use callbridge::event::{CallRouting, CallerLookup, EventKind, RoutingReason};
    use callbridge::ids::GroupId;
    let config = config("url = \"http://127.0.0.1:9/lookup/{number}\"");
    let mut normalizer = callbridge::settings::normalizer(&config);
    let mut indicators = callbridge::indicators::Indicators::new(&config);
    let at = NOON.parse::<jiff::Timestamp>().expect("instant").as_second();
    let redirected = [
        ("CALLBRIDGE_ROUTE", "queue"),
        ("CALLBRIDGE_QUEUE", "702"),
        ("CALLBRIDGE_GROUP", "former"),
        ("CALLBRIDGE_REASON", ""),
        ("CALLBRIDGE_DIVERTED_FROM", ""),
        ("CALLBRIDGE_ERROR", ""),
        ("CALLBRIDGE_ROUTING_REASON", "caller_inactive"),
        ("CALLBRIDGE_ROUTING_FROM", "support"),
        ("CALLBRIDGE_CALLER_FOUND", "true"),
        ("CALLBRIDGE_CALLER_ACTIVE", "false"),
        ("CALLBRIDGE_CONTACT_ID", "c-2"),
    ];
    let mut events = Vec::new();
    for f in routed_call("1795471100.1", &redirected, "702", at)
        .iter()
        .chain(routed_call("1795471100.2", &[], "700", at + 10).iter())
    {
        normalizer.handle(f, 0, &mut events);
    }
    for e in &events {
        indicators.apply(e);
    }
    let queued: Vec<_> = events.iter().filter(|e| matches!(e.kind, EventKind::Queued { .. })).collect();
    assert_eq!(queued.len(), 2);
    let call = queued[0].call.as_ref().expect("snapshot");
    assert!(matches!(&queued[0].kind, EventKind::Queued { group: Some(g), .. } if g.as_str() == "former"));
    assert_eq!(
        call.routing.as_deref(),
        Some(&CallRouting { reason: RoutingReason::CallerInactive, from_group: Some(GroupId::new("support")) })
    );
    assert_eq!(
        call.caller_lookup.as_deref(),
        Some(&CallerLookup { found: true, active: Some(false), contact_id: Some("c-2".into()) })
    );
    let json: serde_json::Value = serde_json::from_str(&queued[0].to_cloudevent_json("t")).expect("json");
    assert_eq!(json["data"]["call"]["routing"], json!({"reason": "caller_inactive", "from_group": "support"}));
    assert_eq!(json["data"]["call"]["caller_lookup"], json!({"found": true, "active": false, "contact_id": "c-2"}));
    // The routing stays on every later event of the call.
    let last = events.iter().rev().find(|e| e.call.as_ref().is_some_and(|c| c.id.as_str() == "1795471100.1"));
    assert_eq!(
        last.and_then(|e| e.call.as_ref()).and_then(|c| c.routing.clone()).map(|r| r.reason),
        Some(RoutingReason::CallerInactive)
    );
    // A call the router did not move carries neither field.
    let plain: serde_json::Value = serde_json::from_str(&queued[1].to_cloudevent_json("t")).expect("json");
    assert!(
        plain["data"]["call"].get("routing").is_none() && plain["data"]["call"].get("caller_lookup").is_none(),
        "{plain}"
    );

    let now = (at + 60) * 1_000_000;
    let report = |g: &str| indicators.report(g, now, 0, 0).expect("group");
    assert_eq!((report("former").redirected_in, report("former").redirected_out, report("former").offered), (1, 0, 1));
    assert_eq!(
        (report("support").redirected_in, report("support").redirected_out, report("support").offered),
        (0, 1, 1)
    );
    assert_eq!(report("triage").redirected_in, 0);
}
