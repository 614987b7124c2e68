//! The Zammad sink against loopback receivers: a scripted one (the a11
//! lifecycle becomes Generic CTI calls, per call `newCall` first and
//! `hangup` last, through a failing first request; a refusal never leaks
//! the token), and a model of Zammad's own CTI code (`zammad_model`): the
//! a11 replay opens the screen of each agent who answered and closes every
//! call with no 5xx; a call Zammad forgot, or whose `newCall` answer was
//! lost, never wedges; a rejected caller is hung up on the (scripted) PBX
//! and ends `missed`/`blocked` while the other calls go on.

mod delivery_common;
mod support;
mod zammad_model;

use callbridge::event::Event;
use callbridge::outbox::{Outbox, OutboxOptions};
use callbridge::sink::zammad::{
    agents_of, BlockOutcome, CallBlocker, ZammadAgent, ZammadSettings, ZammadSink, UNKNOWN_CALL_ATTEMPTS,
};
use callbridge::sink::{RunnerOptions, Runners};
use delivery_common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zammad_model::{Lookup, Zammad};

const TOKEN: &str = "s3cr3t-token";

/// The sink's settings against a receiver at `url`: short timeouts and backoff.
fn settings_for(url: String, concurrency: usize, agents: HashMap<String, ZammadAgent>) -> ZammadSettings {
    ZammadSettings {
        url,
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        max_backoff: Duration::from_millis(200),
        concurrency,
        agents,
        honour_reject: false,
    }
}

/// The sink's settings against the scripted receiver.
fn settings(rx: &Receiver, concurrency: usize, agents: HashMap<String, ZammadAgent>) -> ZammadSettings {
    settings_for(format!("http://{}/", rx.addr), concurrency, agents)
}

/// The lab's agents as the model Zammad knows them: ana by her direct
/// number (written otherwise on her Zammad user), the others by extension.
fn lab_agents() -> HashMap<String, ZammadAgent> {
    let mut agents = agents_of(&lab());
    agents.get_mut("ana").expect("ana").number = "+55 11 3000-2002".into();
    agents
}

/// The model's login of each lab agent.
fn login(agent: &str) -> String {
    format!("{agent}@lab.example")
}

/// Appends `events` to a fresh outbox, delivers them through `sink` until
/// drained (or `deadline`), and returns the outbox for the dead letters.
async fn deliver(sink: ZammadSink, events: &[Event], deadline: Duration) -> (Outbox, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let name = callbridge::sink::Sink::name(&sink).to_string();
    let outbox = Outbox::open(tmp.path(), OutboxOptions::new("lab", vec![name])).expect("outbox");
    let mut d = Runners::new(&outbox, RunnerOptions::default());
    d.spawn(Arc::new(sink));
    outbox.append(events).await.expect("append");
    assert!(outbox.wait_drained(deadline).await, "not drained within {deadline:?}");
    d.shutdown().await.expect("shutdown");
    (outbox, tmp)
}

/// `(call id, agent)` of every inbound `call.answered`.
fn inbound_answers(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.to_cloudevent_json("lab")).expect("JSON"))
        .filter(|v| v["type"] == "call.answered" && v["data"]["call"]["direction"] == "inbound")
        .map(|v| (v["data"]["call"]["id"].as_str().unwrap().into(), v["data"]["agent"].as_str().unwrap().into()))
        .collect()
}

/// Per call id, the CTI events Zammad accepted, in order.
fn accepted_per_call(zammad: &Zammad) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for x in zammad.exchanges().iter().filter(|x| x.status == 200) {
        out.entry(x.call_id().to_string()).or_default().push(x.event().to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_maps_to_generic_cti() {
    let rx = Receiver::start().await;
    rx.fail_first([Reply::Status(502)]);
    let tmp = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(tmp.path(), OutboxOptions::new("lab", vec!["zammad".into()])).unwrap();
    let settings = settings(&rx, 8, agents_of(&lab()));
    let mut d = Runners::new(&outbox, RunnerOptions::default());
    d.spawn(Arc::new(ZammadSink::new("zammad", settings, "s3cr3t-token").unwrap()));
    let events = a11_events();
    outbox.append(&events).await.unwrap();
    assert!(outbox.wait_drained(Duration::from_secs(10)).await);
    d.shutdown().await.unwrap();

    let mut per_call: HashMap<String, Vec<String>> = HashMap::new();
    for r in rx.requests().iter().filter(|r| r.status == 200) {
        assert_eq!(r.path, "/api/v1/cti/s3cr3t-token");
        assert_eq!(r.headers["content-type"], "application/json");
        // So that Rails renders its errors as JSON.
        assert_eq!(r.headers["accept"], "application/json");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let ev = v["event"].as_str().unwrap().to_string();
        assert!(["newCall", "answer", "hangup"].contains(&ev.as_str()), "{ev}");
        if ev == "hangup" {
            let cause = v["cause"].as_str().unwrap();
            assert!(
                ["normalClearing", "busy", "cancel", "noAnswer", "congestion", "notFound", "forwarded"]
                    .contains(&cause),
                "{cause}"
            );
        }
        if ev == "answer" {
            // One string (Zammad looks it up as a login), and the agent's
            // number (Zammad's first lookup).
            assert!(v["user"].as_str().is_some_and(|u| !u.is_empty()), "{v}");
            assert!(["2000", "2001", "2002"].contains(&v["answeringNumber"].as_str().unwrap_or("")), "{v}");
        }
        per_call.entry(v["callId"].as_str().unwrap().to_string()).or_default().push(ev);
    }
    let calls = events.iter().filter(|e| e.kind.type_name() == "call.started").count();
    assert_eq!(per_call.len(), calls, "one CTI call per (inbound/outbound) call");
    for (call, evs) in &per_call {
        assert_eq!(evs.first().map(String::as_str), Some("newCall"), "{call}: {evs:?}");
        assert_eq!(evs.last().map(String::as_str), Some("hangup"), "{call}: {evs:?}");
        assert_eq!(evs.iter().filter(|e| *e == "hangup").count(), 1, "{call}: {evs:?}");
    }
}

/// Zammad's token is a segment of the request path; a server that echoes
/// the path in a refusal must not put the token into the dead letter's
/// reason (which the API lists and the log prints).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_echoing_the_path_does_not_leak_the_token() {
    const TOKEN: &str = "s3cr3t-token-4711";
    let rx = Receiver::start().await;
    rx.fail_first([Reply::EchoPath(404)]);
    let tmp = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(tmp.path(), OutboxOptions::new("lab", vec!["zammad".into()])).unwrap();
    let settings = settings(&rx, 1, HashMap::new());
    let mut d = Runners::new(&outbox, RunnerOptions::default());
    d.spawn(Arc::new(ZammadSink::new("zammad", settings, TOKEN).unwrap()));
    outbox.append(&a11_events()).await.unwrap();
    assert!(outbox.wait_drained(Duration::from_secs(10)).await);
    d.shutdown().await.unwrap();

    let echoed = rx.requests().into_iter().find(|r| r.status == 404).expect("one request refused");
    assert!(echoed.path.contains(TOKEN), "the refused request carried the token: {}", echoed.path);
    let parked = outbox.dead_letters().await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    let reason = &parked[0].reason;
    assert!(reason.contains("HTTP 404") && reason.contains("/api/v1/cti/"), "{reason}");
    assert!(!reason.contains(TOKEN) && !reason.contains("s3cr3t"), "the token leaked: {reason}");
}

/// The model itself, request by request, against what Zammad's code does:
/// so that the tests below test against Zammad, not against a friendly
/// receiver.
#[tokio::test]
async fn the_model_answers_as_zammads_code_does() {
    let zammad = Zammad::lab(TOKEN).await;
    zammad.block("491715000000");
    let http = reqwest::Client::new();
    let post = |token: &str, body: Value| {
        let req = http
            .post(format!("{}/api/v1/cti/{token}", zammad.url()))
            .header("content-type", "application/json")
            .body(body.to_string());
        async move {
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            let text = resp.text().await.expect("answer");
            (status, serde_json::from_str::<Value>(&text).expect("JSON answer"))
        }
    };
    let call = |id: &str, event: &str| json!({"event": event, "direction": "in", "from": "4912347114711", "to": "1130001000", "callId": id});

    let (s, b) = post("wrong", call("1", "newCall")).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("Invalid token, please contact your admin!")));
    let (s, b) = post(TOKEN, json!({"event": "newCall", "direction": "internal", "callId": "1"})).await;
    assert_eq!((s, b["error"].as_str()), (422, Some("Invalid direction!")));
    // Unknown call: Zammad raises, and masks the message for a non-admin.
    let (s, b) = post(TOKEN, call("nope", "answer")).await;
    let e = b["error"].as_str().unwrap_or("");
    assert!(s == 500 && e.starts_with("Error ID ") && e.ends_with("Please contact your administrator."), "{s} {b}");
    let (s, _) = post(TOKEN, call("nope", "hangup")).await;
    assert_eq!(s, 500);
    // A callId Zammad has already.
    assert_eq!(post(TOKEN, call("1", "newCall")).await, (200, json!({})));
    let (s, b) = post(TOKEN, call("1", "newCall")).await;
    assert_eq!((s, b["error"].as_str()), (500, Some("Object already exists!")));

    // The answering agent: answeringNumber first (known agents by number,
    // then the exact phone), then `user` as a login, then `user_id`.
    let mut answer = call("1", "answer");
    answer["answeringNumber"] = json!("+55 11 3000-2002");
    answer["user"] = json!(["Ana Costa"]); // never read: the number found her
    assert_eq!(post(TOKEN, answer).await.0, 200);
    for (id, number, user, user_id) in [
        ("2", json!("2000"), json!(null), json!(null)),
        ("3", json!("9999"), json!("JOAO@lab.example"), json!(null)),
        ("4", json!(null), json!(null), json!(5)),
    ] {
        assert_eq!(post(TOKEN, call(id, "newCall")).await.0, 200);
        let mut a = call(id, "answer");
        a["answeringNumber"] = number;
        a["user"] = user;
        a["user_id"] = user_id;
        assert_eq!(post(TOKEN, a).await.0, 200);
    }
    let screens: Vec<(String, String, Lookup)> =
        zammad.screens().into_iter().map(|s| (s.call_id, s.user, s.via)).collect();
    assert_eq!(
        screens,
        [
            ("1".to_string(), login("ana"), Lookup::KnownAgentNumber),
            ("2".to_string(), login("maria"), Lookup::Phone),
            ("3".to_string(), login("joao"), Lookup::Login),
            ("4".to_string(), login("ana"), Lookup::UserId),
        ]
    );
    // An array `user` that is read (the number matched nobody): `.downcase`
    // raises — after the log was updated.
    assert_eq!(post(TOKEN, call("5", "newCall")).await.0, 200);
    let mut a = call("5", "answer");
    a["answeringNumber"] = json!("2999");
    a["user"] = json!(["Maria Silva"]);
    assert_eq!(post(TOKEN, a).await.0, 500);
    assert_eq!(zammad.log("5").map(|l| l.state), Some("answer".to_string()));
    // Hangup: an inbound call never answered is a missed call (not done).
    assert_eq!(post(TOKEN, call("6", "newCall")).await.0, 200);
    let mut h = call("6", "hangup");
    h["cause"] = json!("cancel");
    assert_eq!(post(TOKEN, h).await.0, 200);
    let log = zammad.log("6").expect("logged");
    assert_eq!((log.state.as_str(), log.done, log.comment.as_deref()), ("hangup", false, Some("cancel")));
    // A blocked caller id: logged, and rejected.
    let mut blocked = call("7", "newCall");
    blocked["from"] = json!("491715000000");
    assert_eq!(post(TOKEN, blocked).await, (200, json!({"action": "reject", "reason": "busy"})));
    assert!(zammad.log("7").is_some());
    // Older releases say what went wrong.
    zammad.unmasked();
    let (s, b) = post(TOKEN, call("nope", "answer")).await;
    assert_eq!((s, b["error"].as_str()), (500, Some("No such call_id nope")));
}

/// The a11 replay through the sink into the model: every inbound call an
/// agent answered opens that agent's screen (found by `answeringNumber`),
/// every call that got its `newCall` gets its `hangup`, nothing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a11_opens_the_answering_agents_screen_and_closes_every_call() {
    let zammad = Zammad::lab(TOKEN).await;
    let events = a11_events();
    let sink = ZammadSink::new("zammad", settings_for(zammad.url(), 8, lab_agents()), TOKEN).unwrap();
    let (outbox, _tmp) = deliver(sink, &events, Duration::from_secs(10)).await;

    assert!(outbox.dead_letters().await.unwrap().is_empty());
    let refused: Vec<_> = zammad.exchanges().into_iter().filter(|x| x.status != 200).collect();
    assert!(refused.is_empty(), "Zammad refused: {refused:#?}");
    let answered = inbound_answers(&events);
    assert_eq!(answered.len(), 9, "a11 has 9 answered calls");
    let screens = zammad.screens();
    for (call, agent) in &answered {
        let opened: Vec<_> = screens.iter().filter(|s| &s.call_id == call).collect();
        assert_eq!(opened.len(), 1, "{call} (answered by {agent}): {opened:?}");
        assert_eq!(opened[0].user, login(agent), "{call}");
        assert!(matches!(opened[0].via, Lookup::KnownAgentNumber | Lookup::Phone), "{:?}", opened[0]);
    }
    assert_eq!(screens.len(), answered.len(), "{screens:#?}");
    assert!(screens.iter().any(|s| s.via == Lookup::KnownAgentNumber), "ana is found through her direct number");

    let per_call = accepted_per_call(&zammad);
    assert_eq!(per_call.len(), 12);
    for (call, evs) in &per_call {
        assert_eq!(evs.first().map(String::as_str), Some("newCall"), "{call}: {evs:?}");
        assert_eq!(evs.last().map(String::as_str), Some("hangup"), "{call}: {evs:?}");
        let log = zammad.log(call).expect("logged");
        let was_answered = answered.iter().any(|(c, _)| c == call);
        assert_eq!((log.state.as_str(), log.done), ("hangup", was_answered), "{call}: {log:?}");
    }
}

/// Zammad forgets a call between its `newCall` and its `answer` (a pruned
/// caller log): the `answer` becomes a dead letter after a bounded number
/// of attempts, the `hangup` re-creates the call (so the caller log has
/// it, answered), within a few seconds of a day's retry budget, and the
/// other calls' events keep flowing meanwhile. Whether Zammad masks its
/// error (current) or says `No such call_id` (older), the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_zammad_forgot_never_wedges() {
    const FORGOTTEN: &str = "1795471952.37"; // answered by maria
    for masked in [true, false] {
        let zammad = Zammad::lab(TOKEN).await;
        if !masked {
            zammad.unmasked();
        }
        zammad.forget_after_new_call(FORGOTTEN);
        let events = a11_events();
        let sink = ZammadSink::new("zammad", settings_for(zammad.url(), 8, lab_agents()), TOKEN).unwrap();
        let t0 = Instant::now();
        let (outbox, _tmp) = deliver(sink, &events, Duration::from_secs(15)).await;
        assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());

        let parked = outbox.dead_letters().await.unwrap();
        assert_eq!(parked.len(), 1, "{parked:#?}");
        assert_eq!((parked[0].key.as_str(), parked[0].kind.as_str()), (FORGOTTEN, "call.answered"));
        let reason = &parked[0].reason;
        assert!(reason.contains(&format!("does not know call {FORGOTTEN}")) && reason.contains("HTTP 500"), "{reason}");
        if !masked {
            assert!(reason.contains("No such call_id"), "{reason}");
        }

        let ex = zammad.exchanges();
        let mine: Vec<(&str, u16)> =
            ex.iter().filter(|x| x.call_id() == FORGOTTEN).map(|x| (x.event(), x.status)).collect();
        let n = UNKNOWN_CALL_ATTEMPTS as usize;
        let mut want = vec![("newCall", 200)];
        want.extend(std::iter::repeat_n(("answer", 500), n));
        want.extend(std::iter::repeat_n(("hangup", 500), n));
        want.extend([("newCall", 200), ("answer", 200), ("hangup", 200)]);
        assert_eq!(mine, want, "masked: {masked}");
        let log = zammad.log(FORGOTTEN).expect("re-created");
        assert_eq!((log.state.as_str(), log.done), ("hangup", true), "answered, so not a call to call back");
        assert!(zammad.screens().iter().all(|s| s.call_id != FORGOTTEN), "no screen opens after the call");

        // The other calls: everything accepted, and not held back.
        let others: Vec<_> = ex.iter().filter(|x| x.call_id() != FORGOTTEN).collect();
        assert!(others.iter().all(|x| x.status == 200), "{others:#?}");
        let per_call = accepted_per_call(&zammad);
        assert_eq!(per_call.len(), 12);
        assert!(per_call.values().all(|evs| evs.last().map(String::as_str) == Some("hangup")), "{per_call:?}");
        let first_refusal = ex.iter().find(|x| x.status == 500).expect("a refusal").at;
        assert!(others.iter().any(|x| x.at > first_refusal), "other calls went on while one was refused");
    }
}

/// A `newCall` Zammad took, but whose answer the sink never got (timeout):
/// the retry is refused with `Object already exists!`, which means
/// delivered — not a 500 to retry for a day while the call waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_call_whose_answer_was_lost_counts_as_delivered() {
    const SLOW: &str = "1795471953.42";
    let zammad = Zammad::lab(TOKEN).await;
    zammad.slow_new_call(SLOW, Duration::from_millis(1500));
    let mut settings = settings_for(zammad.url(), 8, lab_agents());
    settings.timeout = Duration::from_millis(500);
    let sink = ZammadSink::new("zammad", settings, TOKEN).unwrap();
    let (outbox, _tmp) = deliver(sink, &a11_events(), Duration::from_secs(10)).await;

    assert!(outbox.dead_letters().await.unwrap().is_empty());
    let mine: Vec<(String, u16)> =
        zammad.exchanges().iter().filter(|x| x.call_id() == SLOW).map(|x| (x.event().to_string(), x.status)).collect();
    assert_eq!(mine[..2], [("newCall".to_string(), 200), ("newCall".to_string(), 500)], "{mine:?}");
    assert!(mine[2..].iter().all(|(e, s)| e != "newCall" && *s == 200), "{mine:?}");
    assert_eq!(zammad.log(SLOW).map(|l| l.state), Some("hangup".to_string()));
}

/// Records the calls it is asked to block and answers `outcome`.
struct FakeBlocker {
    asked: Mutex<Vec<String>>,
    outcome: BlockOutcome,
}

impl CallBlocker for FakeBlocker {
    fn block<'a>(&'a self, call: &'a str) -> Pin<Box<dyn Future<Output = BlockOutcome> + Send + 'a>> {
        self.asked.lock().unwrap().push(call.to_string());
        let outcome = self.outcome.clone();
        Box::pin(async move { outcome })
    }
}

/// `callbridge_zammad_rejects_total{sink, result}` from `/metrics`.
fn rejects(sink: &str, result: &str) -> u64 {
    let text = callbridge::telemetry::render();
    text.lines()
        .filter(|l| l.starts_with("callbridge_zammad_rejects_total{"))
        .filter(|l| l.contains(&format!("sink=\"{sink}\"")) && l.contains(&format!("result=\"{result}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Zammad rejects one caller's `newCall`: with `honour_reject` the sink
/// hands the call to the blocker (once) and counts the outcome; without it
/// the reject is only counted. The call's events are delivered either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reject_goes_to_the_blocker_when_honoured() {
    const BLOCKED: &str = "1795471954.44"; // caller 11987651104
    callbridge::telemetry::metrics();
    let cases = [
        ("zammad-honour", true, BlockOutcome::HungUp { channel: "SIP/carrier00-0000001e".into() }, "hung_up", 1),
        ("zammad-late", true, BlockOutcome::TooLate, "too_late", 1),
        ("zammad-failed", true, BlockOutcome::Failed("PBX refused".into()), "failed", 1),
        ("zammad-ignore", false, BlockOutcome::TooLate, "ignored", 0),
    ];
    for (name, honour, outcome, result, asked) in cases {
        let zammad = Zammad::lab(TOKEN).await;
        zammad.block("11987651104");
        let blocker = Arc::new(FakeBlocker { asked: Mutex::new(Vec::new()), outcome });
        let mut settings = settings_for(zammad.url(), 8, lab_agents());
        settings.honour_reject = honour;
        let sink = ZammadSink::new(name, settings, TOKEN).unwrap().with_blocker(Some(blocker.clone()));
        let (outbox, _tmp) = deliver(sink, &a11_events(), Duration::from_secs(10)).await;
        assert!(outbox.dead_letters().await.unwrap().is_empty());
        support::wait_until(&format!("{name}: the reject counted as {result}"), || rejects(name, result) == 1).await;
        for other in ["hung_up", "ignored", "too_late", "failed"].iter().filter(|r| **r != result) {
            assert_eq!(rejects(name, other), 0, "{name}: {other}");
        }
        assert_eq!(blocker.asked.lock().unwrap().len(), asked, "{name}");
        if asked == 1 {
            assert_eq!(blocker.asked.lock().unwrap()[0], BLOCKED);
        }
        let rejected: Vec<_> = zammad.exchanges().into_iter().filter(|x| x.answer["action"] == "reject").collect();
        assert_eq!(rejected.len(), 1, "{rejected:#?}");
        assert_eq!(rejected[0].call_id(), BLOCKED);
        assert_eq!(zammad.log(BLOCKED).map(|l| l.state), Some("hangup".to_string()), "its hangup still went");
    }
}

/// The whole control path: callbridge runs against the scripted PBX
/// streaming a11, with the model Zammad rejecting one caller. callbridge
/// sends `Hangup` for that caller's channel (and nothing else), the call
/// ends `missed`/`blocked`, and every other call's lifecycle is what the
/// plain replay gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_caller_is_hung_up_on_the_pbx_and_missed_as_blocked() {
    use support::server::{AmiServer, ServerOptions};
    const BLOCKED: &str = "1795471954.44";
    const CALLER_CHANNEL: &str = "SIP/carrier00-0000001e";
    let zammad = Zammad::lab(TOKEN).await;
    zammad.block("11987651104");
    let server = AmiServer::start(
        ServerOptions::default()
            .without_fully_booted()
            .on("Hangup", |_| support::server::Reply::success(&[("Message", "Channel Hungup")])),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sinks = format!(
        "[[sinks]]\ntype = \"jsonl\"\npath = {events:?}\n\n[[sinks]]\ntype = \"zammad\"\nurl = \"{url}\"\n\
         secret = \"{TOKEN}\"\nhonour_reject = true\nmax_backoff_seconds = 0.2\n\n[outbox]\npath = {outbox:?}\n",
        events = dir.path().join("events.jsonl"),
        url = zammad.url(),
        outbox = dir.path().join("outbox"),
    );
    let text = lab_config_text(&sinks)
        .replace("address = \"127.0.0.1:5038\"", &format!("address = \"{}\"", server.addr()))
        .replace("extension = \"2002\"", "extension = \"2002\"\nhelpdesk_phone = \"+55 11 3000-2002\"");
    let config = dir.path().join("callbridge.toml");
    std::fs::write(&config, text).unwrap();
    let running = callbridge::app::start(callbridge::app::RunOptions {
        config_path: config,
        source: callbridge::app::SourceSpec::Ami,
        api_listen: None,
        shutdown_deadline: Duration::from_secs(5),
    })
    .await
    .expect("daemon starts");
    server.wait_logins(1).await;
    support::wait_until("callbridge ready", || running.shared.readiness.is_ready()).await;

    // a11 up to the moment the blocked caller would hang up by himself…
    let trace = support::trace::load("a11-concurrent-mix.ami");
    let frames: Vec<&str> =
        std::str::from_utf8(support::trace::events_part(&trace)).unwrap().split_inclusive("\r\n\r\n").collect();
    let of_caller = |f: &str, event: &str| {
        f.starts_with(&format!("Event: {event}\r\n")) && f.contains(&format!("Uniqueid: {BLOCKED}\r\n"))
    };
    let cut = frames.iter().position(|f| of_caller(f, "HangupRequest")).expect("the caller hangs up in a11");
    server.send_bytes(frames[..cut].concat().as_bytes());
    // …where callbridge, told by Zammad, hangs him up instead.
    let hangups = server.wait_actions("Hangup", 1).await;
    assert_eq!(hangups[0].get("Channel"), Some(CALLER_CHANNEL));
    assert_eq!(hangups[0].get("Cause"), Some("21"));
    // The PBX does it: the caller's hangup is requested by the system.
    let rest: String = frames[cut..]
        .iter()
        .map(|f| {
            if of_caller(f, "HangupRequest") {
                f.replacen("Event: HangupRequest", "Event: SoftHangupRequest", 1).replacen(
                    "\r\n\r\n",
                    "\r\nCause: 21\r\n\r\n",
                    1,
                )
            } else if of_caller(f, "Hangup") {
                f.replace("Cause: 0\r\n", "Cause: 21\r\n").replace("Cause-txt: Unknown", "Cause-txt: Call Rejected")
            } else {
                f.to_string()
            }
        })
        .collect();
    server.send_bytes(rest.as_bytes());

    let got = support::events::wait_for("every a11 call to end", dir.path(), |ev| {
        ev.iter().filter(|e| e["type"] == "call.ended").count() == 12
    })
    .await;
    let plain = a11_events();
    let plain: Vec<Value> = plain.iter().map(|e| serde_json::from_str(&e.to_cloudevent_json("lab")).unwrap()).collect();
    let calls: HashSet<&str> = plain.iter().filter_map(|e| e["data"]["call"]["id"].as_str()).collect();
    assert_eq!(calls.len(), 12);
    let summary = |events: &[&Value]| -> Vec<(String, Value)> {
        events.iter().map(|e| (e["type"].as_str().unwrap().to_string(), e["data"]["reason"].clone())).collect()
    };
    for call in calls {
        let live = support::events::of_call(&got, call);
        if call == BLOCKED {
            assert_eq!(
                summary(&live),
                [
                    ("call.started".to_string(), Value::Null),
                    ("call.queued".to_string(), Value::Null),
                    ("call.missed".to_string(), json!("blocked")),
                    ("call.ended".to_string(), Value::Null),
                ]
            );
            let ended = live.last().unwrap();
            assert_eq!(
                (ended["data"]["hung_up_by"].as_str(), ended["data"]["hangup_cause"].as_u64()),
                (Some("system"), Some(21))
            );
        } else {
            assert_eq!(summary(&live), summary(&support::events::of_call(&plain, call)), "{call}");
        }
    }
    assert_eq!(server.actions_named("Hangup").len(), 1, "only the blocked caller is hung up");

    // Zammad: the rejected call is logged and closed (busy); every
    // answered call opened its agent's screen; nothing refused.
    support::wait_until("Zammad has every hangup", || {
        zammad.exchanges().iter().filter(|x| x.event() == "hangup" && x.status == 200).count() == 12
    })
    .await;
    let refused: Vec<_> = zammad.exchanges().into_iter().filter(|x| x.status != 200).collect();
    assert!(refused.is_empty(), "{refused:#?}");
    let log = zammad.log(BLOCKED).expect("logged");
    assert_eq!((log.state.as_str(), log.comment.as_deref(), log.done), ("hangup", Some("busy"), false));
    assert_eq!(zammad.screens().len(), 9);
    assert_eq!(rejects("zammad", "hung_up"), 1);
    running.stop().await.expect("clean stop");
}
