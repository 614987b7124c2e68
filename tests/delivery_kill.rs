//! `kill -9` of the real `callbridge` binary in the middle of a paced replay
//! of a11-concurrent-mix, at several points, then a run to completion: the
//! receiver ends up with every event id at least once, none missing, and
//! the first arrivals of each call in order.

mod delivery_common;

use delivery_common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn callbridge(config: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_callbridge"));
    c.args(["replay", "--config"])
        .arg(config)
        .args(["--speed", "20", "--drain-timeout-seconds", "20"])
        .arg(a11())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_replay_loses_nothing() {
    let rx = Receiver::start().await;
    // A few failures too, so kills also land during retries.
    rx.fail_first([Reply::Status(503), Reply::Status(500), Reply::Status(503)]);
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("callbridge.toml");
    let text = lab_config_text(&format!(
        "[[sinks]]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\ntimeout_seconds = 2\nmax_backoff_seconds = 0.3\n\n[outbox]\npath = \"{}\"\n",
        rx.url(),
        tmp.path().join("outbox").display()
    ));
    std::fs::write(&config, text).unwrap();
    let expected = a11_events();

    let mut partial_kills = 0;
    for kill_after in [300u64, 700, 1100, 1500] {
        let mut child = callbridge(&config).spawn().expect("start callbridge");
        tokio::time::sleep(Duration::from_millis(kill_after)).await;
        let before = rx.accepted_ids().len();
        child.kill().expect("SIGKILL"); // kill -9
        child.wait().unwrap();
        if before > 0 && before < expected.len() {
            partial_kills += 1;
        }
        eprintln!("killed after {kill_after} ms with {before}/{} events acknowledged", expected.len());
    }
    assert!(partial_kills >= 2, "kills must land mid-delivery ({partial_kills} did)");

    // Restart and let it finish: the outbox's leftovers first, then the replay
    // (whose ids it already has).
    let t = Instant::now();
    let status = callbridge(&config).status().expect("run callbridge");
    assert!(status.success(), "final run exited with {status}");
    eprintln!("final run took {:?}", t.elapsed());
    let dups = check_delivery(&rx.requests(), &expected, "lab");
    eprintln!("{} requests, {dups} duplicate deliveries (same ids)", rx.requests().len());
}
