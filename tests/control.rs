//! The control plane end to end: click-to-call, transfer and availability
//! through the real HTTP API, against a scripted AMI server on loopback as
//! the PBX, with the lifecycle read back from a JSON lines sink.
//!
//! Asserts the exact AMI actions sent (fields, channel variables, one
//! `ActionID` per action), the HTTP answer for every refusal, and the
//! lifecycle of every outcome: the fixture traces a07–a10 (originated
//! calls, ids rewritten to the call id callbridge gave the `Originate`) and
//! a06 (blind transfer), and an originate that fails before any channel
//! exists.

mod support;

use callbridge::app::{self, RunOptions, SourceSpec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::events::{of_call, types, wait_for};
use support::server::{headers, AmiServer, Headers, Reply, ServerOptions};
use support::trace;

const TOKEN: &str = "test-token";

/// The lab directory; `sales` also has joao (the a06 transfer goes from
/// ana to joao) and allows transfers, `support` does not.
fn write_config(dir: &Path, ami: &AmiServer) -> PathBuf {
    let events = dir.join("events.jsonl");
    let outbox = dir.join("outbox");
    let text = format!(
        r#"[pbx]
name = "lab"
[pbx.ami]
address = "{addr}"
username = "callbridge"
secret = "s3cret-lab"
connect_timeout_seconds = 2.0
action_timeout_seconds = 2.0
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
[[agents]]
id = "pedro"
extension = "2003"
[outbound]
context = "from-internal"
prefix = "0"
agent_channel = "SIP/{{extension}}"
country_code = "55"
agent_ring_seconds = 25
transfer_context = "transfers"
[recordings]
url_base = "https://pbx.example/recordings/"
[api]
listen = "127.0.0.1:0"
secret = "{TOKEN}"
[outbox]
path = {outbox:?}
[[sinks]]
type = "jsonl"
path = {events:?}
"#,
        agents = support::LAB_AGENTS,
        addr = ami.addr()
    );
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

async fn wait_ended(dir: &Path, call: &str) -> Vec<Value> {
    wait_for(&format!("call {call} to end"), dir, |ev| of_call(ev, call).iter().any(|e| e["type"] == "call.ended"))
        .await
}

/// Queue members as the lab lists them: Local channels for 2000/2001 in
/// 700, a SIP peer for ana and a Local channel for joao in 701.
fn members(queue: Option<&str>) -> Vec<Headers> {
    let all = [
        ("700", "Local/2000@agents/n", "Maria Silva"),
        ("700", "Local/2001@agents/n", "Joao Souza"),
        ("701", "SIP/2002", "Ana Costa"),
        ("701", "Local/2001@agents/n", "Joao Souza"),
    ];
    all.iter()
        .filter(|(q, _, _)| queue.is_none_or(|want| want == *q))
        .map(|(q, i, n)| {
            headers(&[
                ("Event", "QueueMember"),
                ("Queue", q),
                ("Name", n),
                ("Location", i),
                ("StateInterface", i),
                ("Status", "1"),
                ("Paused", "0"),
            ])
        })
        .collect()
}

/// What the scripted PBX answers to `Originate`; tests switch it.
type OriginateReply = Arc<Mutex<Reply>>;

async fn pbx(originate: OriginateReply) -> AmiServer {
    AmiServer::start(
        ServerOptions::default()
            .on("Originate", move |_| originate.lock().expect("lock").clone())
            .on("QueueStatus", |a| Reply::list(members(a.get("Queue")), "QueueStatusComplete"))
            .on("QueuePause", |a| {
                if a.get("Queue") == Some("701") && a.get("Interface") == Some("Local/2001@agents/n") {
                    Reply::error("Interface not found")
                } else {
                    Reply::success(&[("Message", "Interface paused successfully")])
                }
            })
            .on("BlindTransfer", |_| Reply::success(&[("Message", "Transfer succeeded")])),
    )
    .await
}

fn queued() -> Reply {
    Reply::success(&[("Message", "Originate successfully queued")])
}

struct Daemon {
    running: app::Running,
    server: AmiServer,
    originate: OriginateReply,
    base: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Daemon {
    async fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let originate = Arc::new(Mutex::new(queued()));
        let server = pbx(originate.clone()).await;
        let running = app::start(RunOptions {
            config_path: write_config(dir.path(), &server),
            source: SourceSpec::Ami,
            api_listen: None,
            shutdown_deadline: Duration::from_secs(5),
        })
        .await
        .expect("daemon starts");
        server.wait_logins(1).await;
        let mut ready = false;
        for _ in 0..500 {
            if running.shared.readiness.is_ready() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ready, "callbridge never became ready");
        let base = format!("http://{}", running.api_addr.expect("API configured"));
        Daemon { running, server, originate, base, http: reqwest::Client::new(), dir }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body), Some(TOKEN)).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::PUT, path, Some(body), Some(TOKEN)).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None, Some(TOKEN)).await
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until the API shows the call in `state`.
    async fn wait_state(&self, call: &str, state: &str) {
        for _ in 0..500 {
            if self.get(&format!("/v1/calls/{call}")).await.1["state"] == state {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let now = self.get(&format!("/v1/calls/{call}")).await;
        panic!("call {call} never reached {state}: {now:?}");
    }

    async fn stop(self) {
        self.running.stop().await.expect("clean stop");
    }
}

fn click(agent: &str, number: Option<&str>, consent: bool, ticket: &str) -> Value {
    json!({"agent": agent, "number": number, "ticket_id": ticket, "contact": {"name": "Cliente", "consent": consent}})
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Every refusal reason, its status and stable code; nothing reaches the PBX.
#[tokio::test]
async fn click_to_call_refusals() {
    let d = Daemon::start().await;
    let (status, body) =
        d.request(reqwest::Method::POST, "/v1/calls", Some(click("maria", Some("11987650700"), true, "1")), None).await;
    assert_eq!((status, code(&body)), (401, "unauthorized"));
    let cases = [
        (click("maria", Some("+55 11 98765-0700"), false, "1"), 403, "contact_not_consented"),
        (json!({"agent": "maria", "number": "11987650700"}), 403, "contact_not_consented"),
        (click("maria", None, true, "1"), 422, "number_missing"),
        (click("maria", Some("  "), true, "1"), 422, "number_missing"),
        (click("maria", Some("11 9876x-0700"), true, "1"), 422, "number_malformed"),
        (click("maria", Some("12"), true, "1"), 422, "number_malformed"),
        (click("nobody", Some("11987650700"), true, "1"), 404, "agent_unknown"),
        (json!({"number": "11987650700"}), 400, "bad_request"),
    ];
    for (body, want_status, want_code) in cases {
        let (status, got) = d.post("/v1/calls", body.clone()).await;
        assert_eq!((status, code(&got)), (want_status, want_code), "{body}: {got}");
        assert!(got["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // The agent is on a call (an outbound call from her phone is live).
    d.server.send_frame(&[
        ("Event", "Newchannel"),
        ("Channel", "SIP/2000-00000001"),
        ("ChannelStateDesc", "Ring"),
        ("CallerIDNum", "2000"),
        ("Exten", "011987650000"),
        ("Uniqueid", "77.1"),
        ("Linkedid", "77.1"),
    ]);
    d.wait_state("77.1", "started").await;
    let (status, got) = d.post("/v1/calls", click("maria", Some("11987650700"), true, "1")).await;
    assert_eq!((status, code(&got)), (409, "agent_busy"));
    assert!(d.server.actions_named("Originate").is_empty(), "a refused click-to-call sends nothing");

    // The PBX refuses the Originate itself: 502 with its message.
    *d.originate.lock().expect("lock") = Reply::error("Originate failed: extension does not exist");
    let (status, got) = d.post("/v1/calls", click("joao", Some("11987650700"), true, "1")).await;
    assert_eq!((status, code(&got)), (502, "pbx_rejected"), "{got}");
    assert!(got["error"]["message"].as_str().unwrap_or("").contains("extension does not exist"));
    d.stop().await;
}

/// The `Originate` as sent: fields, variables, `ChannelId` = the call id.
#[tokio::test]
async fn click_to_call_sends_the_originate() {
    let d = Daemon::start().await;
    let (status, body) = d.post("/v1/calls", click("maria", Some("+55 11 98765-0700"), true, "4711")).await;
    assert_eq!(status, 202, "{body}");
    let call = body["call_id"].as_str().expect("call id").to_string();
    assert!(call.starts_with("cb-"), "{call}");
    assert_eq!(body["number"], "11987650700");
    assert_eq!(body["dialled"], "011987650700");
    let (status, second) = d.post("/v1/calls", click("joao", Some("(11) 3000-1000"), true, "4712")).await;
    assert_eq!(status, 202, "{second}");
    assert_ne!(second["call_id"], body["call_id"]);

    let sent = d.server.wait_actions("Originate", 2).await;
    let headers: Vec<(String, String)> =
        sent[0].headers().into_iter().filter(|(k, _)| k != "Action" && k != "ActionID").collect();
    let want: Vec<(String, String)> = [
        ("Channel", "SIP/2000"),
        ("Context", "from-internal"),
        ("Exten", "011987650700"),
        ("Priority", "1"),
        ("Timeout", "25000"),
        ("CallerID", "\"Ticket 4711\" <2000>"),
        ("Async", "true"),
        ("ChannelId", call.as_str()),
        ("Variable", "CALLBRIDGE_TICKET=4711"),
        ("Variable", &format!("CALLBRIDGE_CORRELATION={call}")),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(headers, want);
    assert_eq!(sent[1].get("Exten"), Some("01130001000"));
    assert_eq!(sent[1].get("Channel"), Some("SIP/2001"));
    let ids: Vec<&str> = sent.iter().map(|a| a.get("ActionID").expect("ActionID")).collect();
    assert_ne!(ids[0], ids[1], "each action has its own ActionID");
    d.stop().await;
}

/// The fixture trace with its first channel's id replaced by `call`.
fn trace_as(name: &str, original: &str, call: &str) -> Vec<u8> {
    let bytes = trace::load(name);
    let text = String::from_utf8_lossy(trace::events_part(&bytes)).replace(original, call);
    text.into_bytes()
}

fn expected(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/expected").join(name);
    std::fs::read_to_string(path)
        .expect("expected lifecycle")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// a07–a10: answered, agent cancels, no answer, busy. Each click-to-call's
/// call follows the recorded lifecycle, under the id the 202 gave.
#[tokio::test]
async fn click_to_call_outcomes_follow_the_recorded_traces() {
    let d = Daemon::start().await;
    let cases = [
        ("a07-outbound-answered", "1795471860.27", "4711", None),
        ("a08-outbound-agent-cancels", "1795471871.29", "4712", Some("cancelled")),
        ("a09-outbound-no-answer", "1795471911.33", "4714", Some("no_answer")),
        ("a10-outbound-busy", "1795471937.35", "4715", Some("busy")),
    ];
    for (name, original, ticket, missed) in cases {
        let (status, body) = d.post("/v1/calls", click("maria", Some("11987650700"), true, ticket)).await;
        assert_eq!(status, 202, "{name}: {body}");
        let call = body["call_id"].as_str().expect("call id").to_string();
        d.server.send_trace(&trace_as(&format!("{name}.ami"), original, &call));
        let ev = wait_ended(d.path(), &call).await;
        let got = of_call(&ev, &call);
        let want = expected(&format!("{name}.jsonl"));
        let want: Vec<&Value> = want.iter().collect();
        assert_eq!(types(&got), types(&want), "{name}");
        for (g, w) in got.iter().zip(&want) {
            let mut g = g["data"].clone();
            let mut w = w["data"].clone();
            for d in [&mut g, &mut w] {
                d["call"]["id"] = Value::Null;
                d["call"]["recording"] = Value::Null;
            }
            // Before anything is dialled the replayed trace knows no customer
            // number; the click-to-call request does, and the call shows it.
            if w["call"]["callee"]["number"].is_null() {
                assert_eq!(g["call"]["callee"]["number"], "11987650700", "{name}");
                g["call"]["callee"]["number"] = Value::Null;
            }
            assert_eq!(g, w, "{name}");
        }
        assert_eq!(got[0]["data"]["call"]["direction"], "outbound");
        assert_eq!(got[0]["data"]["call"]["ticket_id"], ticket);
        let missed_reason = got.iter().find(|e| e["type"] == "call.missed").map(|e| e["data"]["reason"].clone());
        assert_eq!(missed_reason, missed.map(Value::from), "{name}");
        if missed.is_none() {
            let ended = got.last().expect("ended");
            assert!(ended["data"]["talk_seconds"].as_u64() > Some(0));
            assert!(ended["data"]["call"]["recording"].as_str().is_some_and(|r| r.ends_with(".wav")));
        }
    }
    d.stop().await;
}

/// The agent's phone cannot be reached: the PBX queues the originate, then
/// reports failure without ever creating a channel. The helpdesk still gets
/// the whole call: started, missed `failed`, ended.
#[tokio::test]
async fn a_failed_originate_is_a_missed_call() {
    let d = Daemon::start().await;
    let (status, body) = d.post("/v1/calls", click("maria", Some("+55 11 98765-0700"), true, "4800")).await;
    assert_eq!(status, 202, "{body}");
    let call = body["call_id"].as_str().expect("call id").to_string();
    let sent = d.server.wait_actions("Originate", 1).await;
    let action_id = sent[0].get("ActionID").expect("ActionID").to_string();
    d.server.send_frame(&[
        ("Event", "OriginateResponse"),
        ("ActionID", &action_id),
        ("Response", "Failure"),
        ("Channel", "SIP/2000"),
        ("Context", "from-internal"),
        ("Exten", "011987650700"),
        ("Reason", "0"),
        ("Uniqueid", &call),
        ("CallerIDNum", "<unknown>"),
        ("CallerIDName", "<unknown>"),
    ]);
    let ev = wait_ended(d.path(), &call).await;
    let got = of_call(&ev, &call);
    assert_eq!(types(&got), ["call.started", "call.missed", "call.ended"]);
    let snap = &got[0]["data"]["call"];
    assert_eq!(snap["direction"], "outbound");
    assert_eq!(snap["agent"], "maria");
    assert_eq!(snap["ticket_id"], "4800");
    assert_eq!(snap["callee"]["number"], "11987650700");
    assert_eq!(got[1]["data"]["reason"], "failed");
    assert_eq!(got[2]["data"]["hung_up_by"], "system");
    assert_eq!(got[2]["data"]["talk_seconds"], 0);
    // The agent is free again.
    let (status, _) = d.post("/v1/calls", click("maria", Some("11987650700"), true, "4801")).await;
    assert_eq!(status, 202);
    d.stop().await;
}

/// Byte offset of the first frame of `trace` that starts with `needle`.
fn offset_of(trace: &[u8], needle: &str) -> usize {
    let text = String::from_utf8_lossy(trace);
    text.find(needle).unwrap_or_else(|| panic!("{needle:?} not in the trace"))
}

/// a06: ana answers a sales call and hands it to joao through the API.
/// The `BlindTransfer` names ana's channel; the refusals come first.
#[tokio::test]
async fn transfer_moves_the_customer_to_another_agent_of_the_group() {
    let d = Daemon::start().await;
    let bytes = trace::load("a06-blind-transfer.ami");
    let events = trace::events_part(&bytes);
    let cut = offset_of(events, "Event: BlindTransfer");
    let call = "1795471151.24";

    let (status, body) = d.post(&format!("/v1/calls/{call}/transfer"), json!({"to_agent": "joao"})).await;
    assert_eq!((status, code(&body)), (404, "call_not_found"));

    d.server.send_bytes(&events[..cut]);
    d.wait_state(call, "talking").await;
    let path = format!("/v1/calls/{call}/transfer");
    let cases = [
        (json!({}), 422, "target_missing"),
        (json!({"to_agent": "joao", "to_extension": "2001"}), 422, "target_ambiguous"),
        (json!({"to_agent": "nobody"}), 404, "agent_unknown"),
        (json!({"to_agent": "maria"}), 409, "target_not_in_group"),
        (json!({"to_extension": "2000"}), 409, "target_not_in_group"),
        (json!({"to_extension": "9999"}), 409, "target_not_in_group"),
        (json!({"to_agent": "ana"}), 409, "target_is_current_agent"),
        (json!({"to": "joao"}), 400, "bad_request"),
    ];
    for (body, want_status, want_code) in cases {
        let (status, got) = d.post(&path, body.clone()).await;
        assert_eq!((status, code(&got)), (want_status, want_code), "{body}: {got}");
    }
    assert!(d.server.actions_named("BlindTransfer").is_empty());

    let (status, body) = d.post(&path, json!({"to_extension": "2001"})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        body,
        json!({"call_id": call, "kind": "blind", "from_agent": "ana", "to_agent": "joao", "to_extension": "2001"})
    );
    let sent = d.server.wait_actions("BlindTransfer", 1).await;
    let h: Vec<(String, String)> =
        sent[0].headers().into_iter().filter(|(k, _)| k != "Action" && k != "ActionID").collect();
    let want: Vec<(String, String)> = [("Channel", "SIP/2002-0000000d"), ("Context", "transfers"), ("Exten", "2001")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(h, want);
    assert!(sent[0].get("ActionID").is_some());

    // What the PBX did next: the transfer, joao answers.
    d.server.send_bytes(&events[cut..]);
    let ev = wait_ended(d.path(), call).await;
    let got = of_call(&ev, call);
    let want = expected("a06-blind-transfer.jsonl");
    let want: Vec<&Value> = want.iter().collect();
    assert_eq!(types(&got), types(&want));
    let moved = got.iter().find(|e| e["type"] == "call.transferred").expect("transferred");
    assert_eq!(moved["data"]["from_agent"], "ana");
    assert_eq!(moved["data"]["to_agent"], "joao");
    assert_eq!(moved["data"]["kind"], "blind");
    assert_eq!(got.last().expect("ended")["data"]["call"]["agent"], "joao");

    // Ended: no more transfers.
    let (status, body) = d.post(&path, json!({"to_agent": "joao"})).await;
    assert_eq!((status, code(&body)), (409, "call_ended"));
    d.stop().await;
}

/// A group without `allow_transfer`, and a call nobody answered yet.
#[tokio::test]
async fn transfer_refused_when_the_group_does_not_allow_it() {
    let d = Daemon::start().await;
    // The a01 trace: a support call (queue 700) answered by joao.
    let bytes = trace::load("a01-inbound-answered.ami");
    let events = trace::events_part(&bytes);
    let call_frames = String::from_utf8_lossy(events).to_string();
    let first_uid =
        call_frames.lines().find_map(|l| l.strip_prefix("Linkedid: ")).expect("a Linkedid").trim().to_string();
    let cut = offset_of(events, "Event: DialEnd");
    d.server.send_bytes(&events[..cut]);
    d.wait_state(&first_uid, "ringing").await;
    let path = format!("/v1/calls/{first_uid}/transfer");
    let (status, body) = d.post(&path, json!({"to_agent": "maria"})).await;
    assert_eq!((status, code(&body)), (409, "call_not_answered"), "{body}");
    let rest = &events[cut..];
    let hangup = cut + offset_of(rest, "Event: Hangup");
    d.server.send_bytes(&events[cut..hangup]);
    d.wait_state(&first_uid, "talking").await;
    let (status, body) = d.post(&path, json!({"to_agent": "maria"})).await;
    assert_eq!((status, code(&body)), (409, "transfer_not_allowed"), "{body}");
    d.server.send_bytes(&events[hangup..]);
    wait_ended(d.path(), &first_uid).await;
    assert!(d.server.actions_named("BlindTransfer").is_empty());
    d.stop().await;
}

/// The helpdesk switch pauses the agent in each group's queue (with the
/// member interface the queue lists), reports per queue, and emits
/// `agent.availability` once with `source: api`; a pause made on the PBX
/// is reported with `source: pbx`. `GET /v1/agents` shows it all.
#[tokio::test]
async fn availability_pauses_the_agent_in_every_queue() {
    let d = Daemon::start().await;
    let (status, body) = d.put("/v1/agents/nobody/availability", json!({"available": false})).await;
    assert_eq!((status, code(&body)), (404, "agent_unknown"));
    let (status, body) = d.put("/v1/agents/maria/availability", json!({"on": false})).await;
    assert_eq!((status, code(&body)), (400, "bad_request"));

    let (status, body) = d.put("/v1/agents/maria/availability", json!({"available": false, "reason": "lunch"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["queues"],
        json!([{"group": "support", "queue": "700", "interface": "Local/2000@agents/n", "ok": true}])
    );
    let pauses = d.server.wait_actions("QueuePause", 1).await;
    let h: Vec<(String, String)> =
        pauses[0].headers().into_iter().filter(|(k, _)| k != "Action" && k != "ActionID").collect();
    let want: Vec<(String, String)> =
        [("Queue", "700"), ("Interface", "Local/2000@agents/n"), ("Paused", "true"), ("Reason", "lunch")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    assert_eq!(h, want);
    // The PBX confirms: nothing more is reported.
    d.server.send_frame(&[
        ("Event", "QueueMemberPause"),
        ("Queue", "700"),
        ("MemberName", "Maria Silva"),
        ("Interface", "Local/2000@agents/n"),
        ("StateInterface", "Local/2000@agents/n"),
        ("Paused", "1"),
        ("PausedReason", "lunch"),
    ]);

    // joao is in two queues; 701 refuses.
    let (status, body) = d.put("/v1/agents/joao/availability", json!({"available": false})).await;
    assert_eq!(status, 207, "{body}");
    assert_eq!(body["queues"][0]["ok"], true);
    assert_eq!(body["queues"][1]["ok"], false);
    assert_eq!(body["queues"][1]["error"]["code"], "pbx_rejected");

    // ana pauses on her phone.
    d.server.send_frame(&[
        ("Event", "QueueMemberPause"),
        ("Queue", "701"),
        ("MemberName", "Ana Costa"),
        ("Interface", "SIP/2002"),
        ("StateInterface", "SIP/2002"),
        ("Paused", "1"),
        ("PausedReason", "break"),
    ]);
    let ev = wait_for("three availability events", d.path(), |ev| {
        ev.iter().filter(|e| e["type"] == "agent.availability").count() >= 3
    })
    .await;
    let avail: Vec<(String, bool, String, Value)> = ev
        .iter()
        .filter(|e| e["type"] == "agent.availability")
        .map(|e| {
            let d = &e["data"];
            (
                d["agent"].as_str().unwrap_or("").to_string(),
                d["available"].as_bool().unwrap_or(true),
                d["source"].as_str().unwrap_or("").to_string(),
                d["reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        avail,
        [
            ("maria".to_string(), false, "api".to_string(), Value::from("lunch")),
            ("joao".to_string(), false, "api".to_string(), Value::Null),
            ("ana".to_string(), false, "pbx".to_string(), Value::from("break")),
        ]
    );

    // joao is on an outbound call.
    d.server.send_frame(&[
        ("Event", "Newchannel"),
        ("Channel", "SIP/2001-00000005"),
        ("ChannelStateDesc", "Ring"),
        ("CallerIDNum", "2001"),
        ("Exten", "011987650000"),
        ("Uniqueid", "88.1"),
        ("Linkedid", "88.1"),
    ]);
    d.wait_state("88.1", "started").await;
    let (status, body) = d.get("/v1/agents").await;
    assert_eq!(status, 200);
    assert_eq!(body["count"], 4);
    let agent = |id: &str| body["agents"].as_array().and_then(|a| a.iter().find(|x| x["id"] == id)).cloned();
    let maria = agent("maria").expect("maria");
    assert_eq!((maria["extension"].clone(), maria["available"].clone()), (json!("2000"), json!(false)));
    assert_eq!(maria["groups"], json!(["support"]));
    assert_eq!(maria["helpdesk_available"], false);
    assert_eq!(maria["current_call"], Value::Null);
    let joao = agent("joao").expect("joao");
    assert_eq!(joao["groups"], json!(["support", "sales"]));
    assert_eq!(joao["current_call"]["id"], "88.1");
    let ana = agent("ana").expect("ana");
    assert_eq!((ana["available"].clone(), ana["paused_queues"].clone()), (json!(false), json!(["701"])));
    assert_eq!(agent("pedro").expect("pedro")["groups"], json!([]));

    // Back on: unpaused, reported once as api.
    let (status, _) = d.put("/v1/agents/maria/availability", json!({"available": true})).await;
    assert_eq!(status, 200);
    assert_eq!(d.server.wait_actions("QueuePause", 4).await[3].get("Paused"), Some("false"));
    let ev = wait_for("maria available", d.path(), |ev| {
        ev.iter().any(|e| e["type"] == "agent.availability" && e["data"]["available"] == true)
    })
    .await;
    let back: Vec<&Value> = ev.iter().filter(|e| e["data"]["available"] == true).collect();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0]["data"]["source"], "api");
    d.stop().await;
}
