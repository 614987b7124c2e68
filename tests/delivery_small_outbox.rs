//! `replay` through an outbox capped below one append batch: the batch is
//! split into commits that fit, delivery frees the room for the rest, and
//! the replay completes with every event delivered. `--drain-timeout-seconds`
//! bounds the whole wait after the trace, even while the outbox is full.
//!
//! The a11 trace alone (57 events, 34 kB of JSON) fits in the smallest
//! store; the replay also gets copies of it with other channel ids (other
//! calls), so that the events queued behind the first commit are more than
//! the whole store holds.

mod delivery_common;

use delivery_common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The smallest cap the outbox accepts: `max_bytes` is enforced as SQLite's
/// `max_page_count`, at least 16 pages, of 8 KiB in a new store (the empty
/// store's tables and indexes take about half of that). The replay's first
/// append batch (57 events, 34 kB of JSON each trace) is larger than the
/// room left.
const MAX_BYTES: u64 = 16 * 8192;

fn config(dir: &std::path::Path, url: &str, extra: &str) -> std::path::PathBuf {
    let config = dir.join("callbridge.toml");
    let text = lab_config_text(&format!(
        "[[sinks]]\ntype = \"webhook\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\ntimeout_seconds = 2\nmax_backoff_seconds = 0.3\n{extra}\n\
         [outbox]\npath = \"{}\"\nmax_bytes = {MAX_BYTES}\n",
        dir.join("outbox").display()
    ));
    std::fs::write(&config, text).unwrap();
    config
}

/// a11 and `copies` copies of it whose calls have other ids (the channel
/// ids' leading digit changed).
fn traces(dir: &std::path::Path, copies: usize) -> Vec<std::path::PathBuf> {
    let text = std::fs::read_to_string(a11()).expect("a11");
    let mut all = vec![a11()];
    for k in 0..copies {
        let copy: String = text
            .split_inclusive('\n')
            .map(|line| match line.split_once(": 1795471") {
                Some((name, rest)) if name.ends_with("Uniqueid") || name.ends_with("Linkedid") => {
                    format!("{name}: {}795471{rest}", k + 2)
                }
                _ => line.to_string(),
            })
            .collect();
        let path = dir.join(format!("a11-copy{k}.ami"));
        std::fs::write(&path, copy).expect("write trace");
        all.push(path);
    }
    all
}

/// Runs `callbridge replay`; kills it after `limit`.
fn replay(
    config: &std::path::Path,
    traces: &[std::path::PathBuf],
    drain_timeout: &str,
    limit: Duration,
) -> (Option<i32>, String, Duration) {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .args(["replay", "--config"])
        .arg(config)
        .args(["--drain-timeout-seconds", drain_timeout])
        .args(traces)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start callbridge");
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            child.stderr.take().expect("stderr").read_to_string(&mut err).unwrap_or_default();
            return (status.code(), err, t.elapsed());
        }
        if t.elapsed() > limit {
            child.kill().expect("kill");
            let _ = child.wait();
            panic!("callbridge replay still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_outbox_is_split_and_delivered() {
    let rx = Receiver::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path(), &rx.url(), "");
    let traces = traces(tmp.path(), 8);
    let expected = callbridge::replay::events_of(&lab(), &traces).expect("replays");
    let ids: std::collections::HashSet<String> = expected.iter().map(|e| e.id("lab")).collect();
    assert_eq!(ids.len(), expected.len(), "the copies are other calls");
    let bytes: u64 = expected.iter().map(|e| e.to_cloudevent_json("lab").len() as u64).sum();
    assert!(bytes > 2 * MAX_BYTES, "the events ({bytes} bytes) must not fit in the outbox");
    let (code, err, took) =
        tokio::task::spawn_blocking(move || replay(&config, &traces, "30", Duration::from_secs(40))).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    check_delivery(&rx.requests(), &expected, "lab");
    eprintln!("{} events delivered in {took:?}", expected.len());
    let full_logs = err.matches("DISK FULL").count();
    assert!(full_logs <= 3, "a full outbox is logged once per episode, not {full_logs} times in {took:?}:\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_timeout_bounds_the_wait_while_the_outbox_is_full() {
    // The helpdesk is down: nothing leaves the full outbox.
    let rx = Receiver::start().await;
    rx.set_down(Some(503));
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path(), &rx.url(), "");
    let (code, err, took) =
        tokio::task::spawn_blocking(move || replay(&config, &[a11()], "2", Duration::from_secs(30))).await.unwrap();
    assert_eq!(code, Some(75), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(err.contains("events still undelivered after the drain timeout"), "{err}");
    let n: u64 = err
        .split("callbridge: ")
        .filter_map(|s| s.split(' ').next()?.parse().ok())
        .next()
        .unwrap_or_else(|| panic!("no count in {err}"));
    assert_eq!(n as usize, a11_events().len(), "every event is reported undelivered: {err}");
}
