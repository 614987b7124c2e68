//! Reading what a daemon under test delivered: the JSON lines of its
//! `events.jsonl` sink, filtered per call, waited for with a deadline.

use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Every event the daemon wrote to `<dir>/events.jsonl` so far.
pub fn events_of(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// The events of one call, in order.
pub fn of_call<'a>(events: &'a [Value], call: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["data"]["call"]["id"] == call).collect()
}

/// The `type`s of `events`.
pub fn types(events: &[&Value]) -> Vec<String> {
    events.iter().map(|e| e["type"].as_str().unwrap_or("").to_string()).collect()
}

/// Polls `<dir>/events.jsonl` until `cond` holds; panics after 15 s naming
/// `what` and showing what arrived.
pub async fn wait_for(what: &str, dir: &Path, cond: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ev = events_of(dir);
        if cond(&ev) {
            return ev;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; events: {ev:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
