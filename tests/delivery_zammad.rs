//! The Zammad sink against a loopback receiver: the a11 lifecycle becomes
//! Generic CTI calls, per call `newCall` first and `hangup` last, through a
//! failing first request.

mod delivery_common;

use callbridge::outbox::{Outbox, OutboxOptions};
use callbridge::sink::zammad::{ZammadAgent, ZammadSettings, ZammadSink};
use callbridge::sink::{RunnerOptions, Runners};
use delivery_common::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The sink's settings against the receiver: short timeouts and backoff.
fn settings(rx: &Receiver, concurrency: usize, agents: HashMap<String, ZammadAgent>) -> ZammadSettings {
    ZammadSettings {
        url: format!("http://{}/", rx.addr),
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        max_backoff: Duration::from_millis(200),
        concurrency,
        agents,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_maps_to_generic_cti() {
    let rx = Receiver::start().await;
    rx.fail_first([Reply::Status(502)]);
    let tmp = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(tmp.path(), OutboxOptions::new("lab", vec!["zammad".into()])).unwrap();
    let settings = settings(&rx, 8, callbridge::sink::zammad::agents_of(&lab()));
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
