//! The daemon end to end, in process: a scripted AMI server on loopback as
//! the PBX, the real HTTP API on loopback, JSON lines to a file.
//!
//! Covers the resync after a reconnect (calls the PBX forgot end `lost`,
//! exactly once; calls already up when callbridge starts are adopted and end
//! normally), stuck-call detection checked against the PBX, the API with its
//! authentication and error paths, indicators of a replayed trace against
//! hand-computed values, and the Prometheus exposition.

mod support;

use callbridge::app::{self, RunOptions, SourceSpec};
use callbridge::replay::Speed;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::events::{events_of, of_call, types, wait_for};
use support::server::{headers, AmiServer, Headers, Reply, ServerOptions};

const TOKEN: &str = "test-token";

fn now_ts() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

/// A configuration for the lab directory, with `extra` appended.
fn write_config(dir: &Path, ami: Option<&AmiServer>, extra: &str) -> PathBuf {
    let ami = match ami {
        Some(s) => format!(
            "[pbx.ami]\naddress = \"{}\"\nusername = \"callbridge\"\nsecret = \"s3cret-lab\"\n\
             connect_timeout_seconds = 2.0\naction_timeout_seconds = 2.0\nreconnect_max_seconds = 0.2\n",
            s.addr()
        ),
        None => String::new(),
    };
    let events = dir.join("events.jsonl");
    let outbox = dir.join("outbox");
    let text = format!(
        r#"[pbx]
name = "lab"
{ami}
[[groups]]
id = "support"
queue = "700"
agents = ["maria", "joao"]
timezone = "America/Sao_Paulo"
[[groups]]
id = "sales"
queue = "701"
agents = ["ana"]
timezone = "America/Sao_Paulo"
{agents}
[api]
listen = "127.0.0.1:0"
secret = "{TOKEN}"
[outbox]
path = {outbox:?}
[[sinks]]
type = "jsonl"
path = {events:?}
{extra}
"#,
        agents = support::LAB_AGENTS
    );
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn channel(uid: &str, linkedid: &str, chan: &str, state: &str, extra: &[(&str, &str)]) -> Headers {
    let mut h = headers(&[
        ("Event", "CoreShowChannel"),
        ("Channel", chan),
        ("Uniqueid", uid),
        ("Linkedid", linkedid),
        ("ChannelStateDesc", state),
        ("CallerIDNum", "11999990000"),
        ("Exten", "1130001000"),
        ("Duration", "00:00:30"),
    ]);
    h.extend(headers(extra));
    h
}

/// A scripted PBX whose `CoreShowChannels` answer the test can change.
async fn pbx(channels: Arc<Mutex<Vec<Headers>>>) -> AmiServer {
    AmiServer::start(ServerOptions::default().on("CoreShowChannels", move |_| {
        Reply::list(channels.lock().expect("lock").clone(), "CoreShowChannelsComplete")
    }))
    .await
}

async fn start(config: PathBuf, source: SourceSpec) -> app::Running {
    app::start(RunOptions { config_path: config, source, api_listen: None, shutdown_deadline: Duration::from_secs(5) })
        .await
        .expect("daemon starts")
}

fn newchannel(server: &AmiServer, uid: &str, chan: &str) {
    let ts = now_ts();
    server.send_frame(&[
        ("Event", "Newchannel"),
        ("Timestamp", &ts),
        ("Channel", chan),
        ("ChannelStateDesc", "Ring"),
        ("CallerIDNum", "11987650001"),
        ("Exten", "1130001000"),
        ("Uniqueid", uid),
        ("Linkedid", uid),
    ]);
}

fn hangup(server: &AmiServer, uid: &str, linkedid: &str, chan: &str) {
    let ts = now_ts();
    server.send_frame(&[
        ("Event", "Hangup"),
        ("Timestamp", &ts),
        ("Channel", chan),
        ("Uniqueid", uid),
        ("Linkedid", linkedid),
        ("Cause", "16"),
        ("Cause-txt", "Normal Clearing"),
    ]);
}

#[tokio::test]
async fn resync_ends_forgotten_calls_once_and_adopts_calls_already_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Before callbridge starts, the PBX already has a call queued in 700.
    let listed = Arc::new(Mutex::new(vec![channel(
        "9.1",
        "9.1",
        "SIP/carrier00-00000009",
        "Up",
        &[("Application", "Queue"), ("ApplicationData", "700,r,,,45")],
    )]));
    let server = pbx(listed.clone()).await;
    let running = start(write_config(dir.path(), Some(&server), ""), SourceSpec::Ami).await;
    wait_for("the adopted call", dir.path(), |ev| types(&of_call(ev, "9.1")) == ["call.started", "call.queued"]).await;

    // A new call starts while connected…
    newchannel(&server, "1.1", "SIP/carrier00-00000010");
    wait_for("call 1.1", dir.path(), |ev| !of_call(ev, "1.1").is_empty()).await;
    // …then the connection drops and the PBX forgets it meanwhile.
    server.cut();
    server.wait_logins(2).await;
    let ev = wait_for("call 1.1 ended as lost", dir.path(), |ev| {
        of_call(ev, "1.1").iter().any(|e| e["type"] == "call.ended")
    })
    .await;
    let ended: Vec<&Value> = of_call(&ev, "1.1").into_iter().filter(|e| e["type"] == "call.ended").collect();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0]["data"]["end_reason"], "lost");
    assert_eq!(types(&of_call(&ev, "1.1")), ["call.started", "call.missed", "call.ended"]);

    // A second reconnect does not end it again; the adopted call goes on.
    server.cut();
    server.wait_logins(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    hangup(&server, "9.1", "9.1", "SIP/carrier00-00000009");
    let ev = wait_for("the adopted call's end", dir.path(), |ev| {
        of_call(ev, "9.1").iter().any(|e| e["type"] == "call.ended")
    })
    .await;
    assert_eq!(of_call(&ev, "1.1").iter().filter(|e| e["type"] == "call.ended").count(), 1);
    let adopted = of_call(&ev, "9.1");
    assert_eq!(adopted.last().map(|e| &e["data"]["end_reason"]), Some(&Value::from("normal")));
    assert_eq!(adopted[1]["data"]["call"]["group"], "support");
    running.stop().await.expect("clean stop");
}

#[tokio::test]
async fn stuck_calls_are_checked_with_the_pbx() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listed = Arc::new(Mutex::new(Vec::new()));
    let server = pbx(listed.clone()).await;
    let config = write_config(
        dir.path(),
        Some(&server),
        "[stuck]\nstarted_seconds = 1\nqueued_seconds = 1\nsilence_seconds = 1\ncheck_interval_seconds = 1\n",
    );
    let running = start(config, SourceSpec::Ami).await;
    server.wait_logins(1).await;
    // Two calls whose hangup never comes: the PBX still has the first…
    *listed.lock().expect("lock") = vec![channel("2.1", "2.1", "SIP/carrier00-00000021", "Up", &[])];
    newchannel(&server, "2.1", "SIP/carrier00-00000021");
    // …and has forgotten the second.
    newchannel(&server, "3.1", "SIP/carrier00-00000031");
    let ev = wait_for("the sweeper's verdicts", dir.path(), |ev| {
        of_call(ev, "2.1").iter().any(|e| e["type"] == "call.stuck")
            && of_call(ev, "3.1").iter().any(|e| e["type"] == "call.ended")
    })
    .await;
    let stuck: Vec<&Value> = of_call(&ev, "2.1").into_iter().filter(|e| e["type"] == "call.stuck").collect();
    assert_eq!(stuck[0]["data"]["state"], "started");
    assert_eq!(of_call(&ev, "3.1").last().map(|e| &e["data"]["end_reason"]), Some(&Value::from("lost")));
    assert!(server.actions_named("CoreShowChannels").len() >= 2, "the suspects were checked with the PBX");
    // Flagged once only, however many sweeps pass; the call stays live.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ev = events_of(dir.path());
    assert_eq!(of_call(&ev, "2.1").iter().filter(|e| e["type"] == "call.stuck").count(), 1);
    assert!(running.shared.registry.is_live("2.1"));
    let metrics = callbridge::telemetry::render();
    assert!(metrics.contains("callbridge_calls_stuck_total"), "{metrics}");
    running.stop().await.expect("clean stop");
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(running: &app::Running) -> Api {
        let addr = running.api_addr.expect("API configured");
        Api { base: format!("http://{addr}"), http: reqwest::Client::new() }
    }

    /// One request; the answer is checked against the OpenAPI document.
    async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        support::openapi::check(method.as_str(), path, status, &body);
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(TOKEN)).await
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/ami").join(name)
}

#[tokio::test]
async fn api_over_http_with_a_replayed_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), None, "");
    let running =
        start(config, SourceSpec::Traces { paths: vec![fixture("a11-concurrent-mix.ami")], speed: Speed::Max }).await;
    let api = Api::new(&running);
    wait_for("the whole trace", dir.path(), |ev| ev.iter().filter(|e| e["type"] == "call.ended").count() == 12).await;

    // Health is open, everything else needs the token.
    assert_eq!(api.call(reqwest::Method::GET, "/healthz", None).await.0, 200);
    assert_eq!(api.call(reqwest::Method::GET, "/readyz", None).await.0, 200);
    let (status, body) = api.call(reqwest::Method::GET, "/v1/calls", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));
    let (status, _) = api.call(reqwest::Method::GET, "/v1/calls", Some("wrong")).await;
    assert_eq!(status, 401);

    // Calls: none live after the trace; ended ones within retention.
    let (status, body) = api.get("/v1/calls").await;
    assert_eq!((status, body["count"].as_u64()), (200, Some(0)));
    let (status, _) = api.get("/v1/calls?state=talking&group=support&agent=maria").await;
    assert_eq!(status, 200);
    let (status, body) = api.get("/v1/calls?state=flying").await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_state")));
    let (status, body) = api.get("/v1/calls/1795471952.37").await;
    assert_eq!(status, 200);
    assert_eq!((body["state"].as_str(), body["agent"].as_str()), (Some("ended"), Some("maria")));
    let (status, body) = api.get("/v1/calls/no.such").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("call_not_found")));
    let (status, body) = api.call(reqwest::Method::DELETE, "/v1/calls/1795471952.37", Some(TOKEN)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("call_not_live")));

    // Indicators, computed by hand from the trace (QueueCallerJoin →
    // answer, rounded to seconds): support answered 6 with waits
    // 2, 5, 8, 13, 14, 16 and 2 abandoned; sales 3 (2, 7, 9) and 1.
    let (status, s) = api.get("/v1/groups/support/indicators").await;
    assert_eq!(status, 200);
    assert_eq!(s["date"], "2026-11-23");
    assert_eq!((s["offered"].as_u64(), s["answered"].as_u64(), s["missed"].as_u64()), (Some(8), Some(6), Some(2)));
    assert_eq!(s["missed_by_reason"]["abandoned"], 2);
    assert!((s["average_wait_seconds"].as_f64().unwrap_or(0.0) - 58.0 / 6.0).abs() < 1e-9);
    assert_eq!(s["max_wait_seconds"], 16);
    assert_eq!(s["service_level"], 1.0);
    let (_, s) = api.get("/v1/groups/sales/indicators").await;
    assert_eq!((s["offered"].as_u64(), s["answered"].as_u64(), s["missed"].as_u64()), (Some(4), Some(3), Some(1)));
    assert_eq!((s["average_wait_seconds"].as_f64(), s["max_wait_seconds"].as_u64()), (Some(6.0), Some(9)));
    let (status, body) = api.get("/v1/groups/nope/indicators").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("group_not_found")));
    let (status, body) = api.get("/v1/nothing").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));

    // Prometheus exposition: every sample line is `name{labels} value`.
    let resp = reqwest::get(format!("{}/metrics", api.base)).await.expect("metrics");
    let text = resp.text().await.expect("text");
    check_exposition(&text);
    for name in [
        "callbridge_lifecycle_events_total{type=\"call.ended\"}",
        "callbridge_calls_missed_total{reason=\"abandoned\"}",
        "callbridge_calls_active{",
        "callbridge_build_info{",
        "process_",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    running.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_administrator_removes_a_live_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = pbx(Arc::new(Mutex::new(Vec::new()))).await;
    let running = start(write_config(dir.path(), Some(&server), ""), SourceSpec::Ami).await;
    server.wait_logins(1).await;
    newchannel(&server, "5.1", "SIP/carrier00-00000051");
    wait_for("call 5.1", dir.path(), |ev| !of_call(ev, "5.1").is_empty()).await;
    let api = Api::new(&running);
    let (status, body) = api.get("/v1/calls?group=").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.call(reqwest::Method::DELETE, "/v1/calls/5.1", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = api.call(reqwest::Method::DELETE, "/v1/calls/5.1", Some(TOKEN)).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("ended")));
    let ev =
        wait_for("the removal", dir.path(), |ev| of_call(ev, "5.1").iter().any(|e| e["type"] == "call.ended")).await;
    assert_eq!(of_call(&ev, "5.1").last().map(|e| &e["data"]["end_reason"]), Some(&Value::from("removed")));
    // Its late hangup changes nothing.
    hangup(&server, "5.1", "5.1", "SIP/carrier00-00000051");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(of_call(&events_of(dir.path()), "5.1").len(), 3);
    running.stop().await.expect("clean stop");
}

/// A minimal check of the Prometheus text format (0.0.4).
fn check_exposition(text: &str) {
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "bad value: {line}");
        let name = series.split('{').next().unwrap_or("");
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name: {line}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "bad labels: {line}");
        }
    }
}

fn dial_begin(server: &AmiServer, caller: (&str, &str), dest: (&str, &str)) {
    let ts = now_ts();
    server.send_frame(&[
        ("Event", "DialBegin"),
        ("Timestamp", &ts),
        ("Channel", caller.0),
        ("Uniqueid", caller.1),
        ("Linkedid", caller.1),
        ("DestChannel", dest.0),
        ("DestUniqueid", dest.1),
        ("DestLinkedid", caller.1),
    ]);
}

#[tokio::test]
async fn reload_applies_a_good_configuration_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = pbx(Arc::new(Mutex::new(Vec::new()))).await;
    let config = write_config(dir.path(), Some(&server), "");
    let running = start(config.clone(), SourceSpec::Ami).await;
    server.wait_logins(1).await;
    // A call rings extension 2003, which is nobody's yet.
    newchannel(&server, "6.1", "SIP/carrier00-00000061");
    dial_begin(&server, ("SIP/carrier00-00000061", "6.1"), ("SIP/2003-00000062", "6.2"));
    // A frame after the dial that shows in the lifecycle: once it is out, the
    // dial was handled with the old directory (frames are handled in order;
    // a reload may overtake frames still queued).
    let ts = now_ts();
    server.send_frame(&[
        ("Event", "QueueCallerJoin"),
        ("Timestamp", &ts),
        ("Channel", "SIP/carrier00-00000061"),
        ("Uniqueid", "6.1"),
        ("Linkedid", "6.1"),
        ("Queue", "700"),
        ("Position", "1"),
    ]);
    wait_for("call 6.1 queued", dir.path(), |ev| of_call(ev, "6.1").iter().any(|e| e["type"] == "call.queued")).await;

    // Pedro joins support with extension 2003.
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replace("agents = [\"maria\", \"joao\"]", "agents = [\"maria\", \"joao\", \"pedro\"]")
        + "\n[[agents]]\nid = \"pedro\"\nname = \"Pedro Lima\"\nextension = \"2003\"\n";
    std::fs::write(&config, &text).expect("rewrite");
    running.reload().await.expect("a valid configuration is applied");

    // The call in progress goes on and ends once.
    hangup(&server, "6.2", "6.1", "SIP/2003-00000062");
    hangup(&server, "6.1", "6.1", "SIP/carrier00-00000061");
    // The next call uses the new directory: Pedro is offered the call.
    newchannel(&server, "7.1", "SIP/carrier00-00000071");
    dial_begin(&server, ("SIP/carrier00-00000071", "7.1"), ("SIP/2003-00000072", "7.2"));
    let ev = wait_for("pedro's offer", dir.path(), |ev| {
        of_call(ev, "7.1").iter().any(|e| e["type"] == "call.offered" && e["data"]["agent"] == "pedro")
    })
    .await;
    assert_eq!(of_call(&ev, "6.1").iter().filter(|e| e["type"] == "call.ended").count(), 1);
    assert!(!of_call(&ev, "6.1").iter().any(|e| e["type"] == "call.offered"), "6.1 rang before pedro existed");

    // A broken file is refused with its problems; the running one stays.
    std::fs::write(&config, text.replace("[[agents]]\nid = \"pedro\"", "[[agents]]\nidd = \"pedro\"")).expect("break");
    let err = running.reload().await.expect_err("a broken configuration is refused");
    assert!(err.problems.iter().any(|p| p.contains("idd")), "{err}");
    dial_begin(&server, ("SIP/carrier00-00000071", "7.1"), ("SIP/2003-00000073", "7.3"));
    hangup(&server, "7.2", "7.1", "SIP/2003-00000072");
    hangup(&server, "7.3", "7.1", "SIP/2003-00000073");
    hangup(&server, "7.1", "7.1", "SIP/carrier00-00000071");
    let ev =
        wait_for("call 7.1 ended", dir.path(), |ev| of_call(ev, "7.1").iter().any(|e| e["type"] == "call.ended")).await;
    assert!(of_call(&ev, "7.1")
        .iter()
        .all(|e| e["data"]["call"]["agent"].is_null() || e["data"]["call"]["agent"] == "pedro"));
    let metrics = callbridge::telemetry::render();
    assert!(metrics.contains("callbridge_config_reloads_total{result=\"rejected\"}"), "{metrics}");
    running.stop().await.expect("clean stop");
}

#[tokio::test]
async fn dead_letters_are_listed_and_retried_through_the_api() {
    use axum::{extract::State as S, http::StatusCode, routing::post, Router};
    #[derive(Clone, Default)]
    struct Receiver {
        refuse_queued: Arc<std::sync::atomic::AtomicBool>,
        got: Arc<Mutex<Vec<Value>>>,
    }
    let recv = Receiver::default();
    recv.refuse_queued.store(true, std::sync::atomic::Ordering::SeqCst);
    let app = Router::new()
        .route(
            "/hook",
            post(|S(r): S<Receiver>, body: String| async move {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                if v["type"] == "call.queued" && r.refuse_queued.load(std::sync::atomic::Ordering::SeqCst) {
                    return StatusCode::UNPROCESSABLE_ENTITY;
                }
                r.got.lock().expect("lock").push(v);
                StatusCode::NO_CONTENT
            }),
        )
        .with_state(recv.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), None, "").to_string_lossy().to_string();
    // Replace the JSON-lines sink by the webhook.
    let text = std::fs::read_to_string(&config).expect("config");
    let start_sinks = text.find("[[sinks]]").expect("sinks");
    let text = format!(
        "{}[[sinks]]\ntype = \"webhook\"\nurl = \"{hook}\"\nsecret = \"whsec_dGVzdA==\"\n",
        &text[..start_sinks]
    );
    std::fs::write(&config, text).expect("write");
    let running = start(
        PathBuf::from(&config),
        SourceSpec::Traces { paths: vec![fixture("a01-inbound-answered.ami")], speed: Speed::Max },
    )
    .await;
    let api = Api::new(&running);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let letters = loop {
        let (status, body) = api.get("/v1/dead-letters").await;
        assert_eq!(status, 200, "{body}");
        if body["count"] == 1 && recv.got.lock().expect("lock").len() == 4 {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The refused event did not block the later events of its call.
    let id = letters["dead_letters"][0]["event_id"].as_str().expect("event id").to_string();
    assert_eq!(id, "lab:1795471080.4:2");
    let (status, body) = api.call(reqwest::Method::POST, "/v1/dead-letters/nope/retry", Some(TOKEN)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("dead_letter_not_found")));
    recv.refuse_queued.store(false, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = api.call(reqwest::Method::POST, &format!("/v1/dead-letters/{id}/retry"), Some(TOKEN)).await;
    assert_eq!((status, body["requeued"].as_u64()), (200, Some(1)), "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while recv.got.lock().expect("lock").len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "the retried event never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(api.get("/v1/dead-letters").await.1["count"], 0);
    running.stop().await.expect("clean stop");
}

#[tokio::test]
async fn wrong_ami_credentials_exit_with_a_code_systemd_does_not_restart() {
    // The PBX knows another secret: `run` logs in once, is refused, and exits
    // 77 (the unit's RestartPreventExitStatus=) instead of 1 (restart loop).
    let mut options = ServerOptions::default();
    options.secret = "another-secret".into();
    let server = AmiServer::start(options).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), Some(&server), "");
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .await
        .expect("callbridge runs");
    assert_eq!(out.status.code(), Some(77), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("authentication failed"));
    assert_eq!(server.failed_logins(), 1, "one attempt, no hammering");
    assert!(started.elapsed() < Duration::from_secs(10));
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/callbridge.service")).expect("unit");
    assert!(unit.lines().any(|l| l.starts_with("RestartPreventExitStatus=") && l.contains("77")), "{unit}");
}

#[tokio::test]
async fn a_served_replay_across_a_pbx_crash_ends_the_crashed_call_lost() {
    // The daemon replaying a trace (`replay --serve`) reads its
    // reconnections like `replay` does: a12's first call ends `lost` once,
    // exactly as in the golden lifecycle.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), None, "");
    let running =
        start(config, SourceSpec::Traces { paths: vec![fixture("a12-pbx-crash-mid-call.ami")], speed: Speed::Max })
            .await;
    let ev =
        wait_for("both calls ended", dir.path(), |ev| ev.iter().filter(|e| e["type"] == "call.ended").count() == 2)
            .await;
    let lost = of_call(&ev, "1796029357.4");
    assert_eq!(types(&lost), ["call.started", "call.queued", "call.offered", "call.answered", "call.ended"]);
    assert_eq!(lost.last().map(|e| e["data"]["end_reason"].clone()), Some(Value::from("lost")));
    let golden = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/expected/a12-pbx-crash-mid-call.jsonl"),
    )
    .expect("golden");
    let want: Vec<Value> = golden.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    // This configuration has no recordings URL (the golden one's lab.toml has).
    let without_recording = |v: &[Value], call: &str| -> Vec<Value> {
        of_call(v, call)
            .into_iter()
            .map(|e| {
                let mut e = e.clone();
                e["data"]["call"]["recording"] = Value::Null;
                e
            })
            .collect()
    };
    assert_eq!(without_recording(&ev, "1796029372.0"), without_recording(&want, "1796029372.0"), "after the crash");
    running.stop().await.expect("clean stop");
}

/// `MALLOC_ARENA_MAX` in the environment of process `pid`, once it has one
/// (the daemon sets it by starting itself again in place, early).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn arena_max_of(pid: u32) -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let found = environ
            .split(|b| *b == 0)
            .find_map(|v| v.strip_prefix(b"MALLOC_ARENA_MAX=").map(|x| String::from_utf8_lossy(x).into_owned()));
        if found.is_some() {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test]
async fn run_keeps_to_four_malloc_arenas_unless_told_otherwise() {
    // The same process (the id systemd and the tests know) runs with four
    // arenas; a value set by the operator is kept.
    let server = AmiServer::start(ServerOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), Some(&server), "");
    for (preset, expected) in [(None, "4"), (Some("2"), "2")] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callbridge"));
        cmd.args(["run", "--config"]).arg(&config).env_remove("MALLOC_ARENA_MAX");
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        if let Some(v) = preset {
            cmd.env("MALLOC_ARENA_MAX", v);
        }
        let mut child = cmd.spawn().expect("callbridge starts");
        let seen = arena_max_of(child.id());
        let still_running = child.try_wait().expect("status").is_none();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen.as_deref(), Some(expected), "preset {preset:?}");
        assert!(still_running, "the daemon exited (preset {preset:?})");
    }
}
