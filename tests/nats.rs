//! The NATS JetStream sink against a real `nats-server` on loopback, driven
//! by the real `callbridge` binary: a replay of a11 lands in the stream
//! exactly once and in each call's order, a second replay adds nothing
//! (the outbox's ids, then JetStream's de-duplication with a fresh
//! outbox), and a nats-server killed with SIGKILL and restarted on its file
//! store in the middle of a 100,000-event replay loses and doubles nothing.
//! `callbridge tail` reads the stream back (ephemeral and durable consumers).
//! Events published before the stream exists wait (retried) and go once
//! `nats-setup` created it.

mod delivery_common;
mod nats_common;

use delivery_common::{a11, a11_events, lab, lab_config_text};
use nats_common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const STREAM: &str = "CALLBRIDGE";

fn write_config(dir: &Path, url: &str, outbox: &str) -> PathBuf {
    let config = dir.join(format!("callbridge-{outbox}.toml"));
    let text = lab_config_text(&format!(
        "[[sinks]]\ntype = \"nats\"\nurl = \"{url}\"\ntimeout_seconds = 2\nmax_backoff_seconds = 0.5\n\n[outbox]\npath = \"{}\"\n",
        dir.join(outbox).display()
    ));
    std::fs::write(&config, text).unwrap();
    config
}

fn callbridge(args: &[&str], config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_callbridge"));
    c.args(args).arg("--config").arg(config);
    c
}

fn ok(what: &str, out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn replay(config: &Path, trace: &Path) -> Output {
    callbridge(&["replay", "--drain-timeout-seconds", "120"], config)
        .arg(trace)
        .output()
        .expect("run callbridge replay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a11_lands_exactly_once_in_call_order_and_a_second_replay_adds_nothing() {
    if !nats_present("a11_lands_exactly_once_in_call_order_and_a_second_replay_adds_nothing") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(tmp.path());
    let config = write_config(tmp.path(), &nats.url(), "outbox");

    let setup = ok("nats-setup", callbridge(&["nats-setup"], &config).output().unwrap());
    assert!(setup.contains("stream CALLBRIDGE: created"), "{setup}");
    assert!(setup.contains("file storage") && setup.contains("duplicate window 120 s"), "{setup}");
    // Run again: it finds the stream and changes nothing.
    let again = ok("nats-setup again", callbridge(&["nats-setup"], &config).output().unwrap());
    assert!(again.contains("exists") && again.contains("nothing changed"), "{again}");

    let expected: Vec<String> = a11_events().iter().map(|e| e.id(&lab().pbx.name)).collect();
    ok("replay", replay(&config, &a11()));
    let stored = read_stream(&nats.url(), STREAM).await;
    check_exactly_once_in_order(&stored, &expected);
    let m = &stored[0];
    let kind = m.body["type"].as_str().unwrap();
    assert_eq!(m.subject, format!("callbridge.lab.{kind}"));
    assert_eq!(m.headers.get("Nats-Msg-Id"), Some(&m.id));
    assert_eq!(m.headers.get("ce-id"), Some(&m.id));
    assert_eq!(m.headers.get("ce-type").map(String::as_str), Some(kind));
    assert_eq!(m.headers.get("ce-source").map(String::as_str), Some("callbridge/lab"));
    assert_eq!(m.headers.get("ce-time").map(String::as_str), m.body["time"].as_str());

    // `tail` prints what the stream holds: every site's call events in
    // stream order; a durable consumer goes on where it stopped.
    let call_events: Vec<&Stored> = stored.iter().filter(|m| m.subject.starts_with("callbridge.lab.call.")).collect();
    let tail = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_callbridge"));
        c.args(["tail", "--nats", &nats.url(), "--all"]).args(args);
        let out = ok("tail", c.output().unwrap());
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let want: Vec<String> = call_events.iter().map(|m| m.id.clone()).collect();
    assert_eq!(tail(&["--count", &want.len().to_string()]), want);
    let first = tail(&["--durable", "helpdesk", "--count", "10"]);
    let rest = tail(&["--durable", "helpdesk", "--count", &(want.len() - 10).to_string()]);
    assert_eq!([first, rest].concat(), want, "the durable consumer resumes after what it acknowledged");

    // The same outbox remembers the ids it delivered: nothing is sent.
    ok("second replay", replay(&config, &a11()));
    // A fresh outbox sends everything again: JetStream drops the duplicates
    // (and acknowledges them, or the replay would not drain).
    let fresh = write_config(tmp.path(), &nats.url(), "outbox-fresh");
    ok("replay with a fresh outbox", replay(&fresh, &a11()));
    let js = jetstream(&nats.url()).await;
    assert_eq!(stream_count(&js, STREAM).await, expected.len() as u64, "replaying again adds nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_killed_mid_run_loses_and_doubles_nothing() {
    if !nats_present("nats_server_killed_mid_run_loses_and_doubles_nothing") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(tmp.path());
    let config = write_config(tmp.path(), &nats.url(), "outbox");
    ok("nats-setup", callbridge(&["nats-setup"], &config).output().unwrap());

    // a11 renamed and repeated past 100,000 events.
    let per_copy = a11_events().len();
    let copies = 100_000usize.div_ceil(per_copy);
    let trace = tmp.path().join("big.ami");
    let a11_bytes = std::fs::read(a11()).unwrap();
    std::fs::write(&trace, callbridge::tracegen::concatenated(&[a11_bytes], copies)).unwrap();
    // Copy k of a11 is a11 with its ids' 179547 prefix renamed (see
    // tracegen), so its events are a11's under renamed ids.
    let a11_ids: Vec<String> = a11_events().iter().map(|e| e.id("lab")).collect();
    assert!(a11_ids.iter().all(|id| id.starts_with("lab:179547")), "a11's ids carry the renamed prefix");
    let expected: Vec<String> = (0..copies)
        .flat_map(|k| a11_ids.iter().map(move |id| format!("lab:{}{}", 179_547 + k, &id["lab:179547".len()..])))
        .collect();
    assert!(expected.len() >= 100_000, "{} events", expected.len());
    let started = Instant::now();

    let log = std::fs::File::create(tmp.path().join("callbridge.log")).unwrap();
    let mut child = callbridge(&["replay", "--drain-timeout-seconds", "300"], &config)
        .arg(&trace)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start callbridge");
    let js = jetstream(&nats.url()).await;
    let t0 = Instant::now();
    let mut at_kill = 0;
    while at_kill < 10_000 {
        assert!(t0.elapsed() < Duration::from_secs(120), "delivery does not start: {at_kill} events stored");
        at_kill = stream_count(&js, STREAM).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nats.kill();
    eprintln!("nats-server killed with {at_kill} of {} events stored", expected.len());
    assert!((at_kill as usize) < expected.len() * 3 / 4, "the kill must land mid-run ({at_kill} stored)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    let log = std::fs::read_to_string(tmp.path().join("callbridge.log")).unwrap_or_default();
    assert!(status.success(), "replay failed ({status}):\n{}", &log[log.len().saturating_sub(4000)..]);
    assert!(log.contains("will retry"), "the outage was retried:\n{}", &log[log.len().saturating_sub(4000)..]);
    eprintln!("replay done in {:.1} s", started.elapsed().as_secs_f64());
    let stored = read_stream(&nats.url(), STREAM).await;
    check_exactly_once_in_order(&stored, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_a_missing_stream_and_go_once_it_exists() {
    if !nats_present("events_wait_for_a_missing_stream_and_go_once_it_exists") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(tmp.path());
    let config = write_config(tmp.path(), &nats.url(), "outbox");
    let log_path = tmp.path().join("callbridge.log");
    let mut child = callbridge(&["replay", "--drain-timeout-seconds", "60"], &config)
        .arg(a11())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("start callbridge");
    // No stream captures the subjects yet: the server has no responders,
    // and the sink retries instead of dropping or parking anything.
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log_path).unwrap_or_default().contains("no stream captures the subject") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no retry logged:\n{}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok("nats-setup", callbridge(&["nats-setup"], &config).output().unwrap());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "replay failed ({status}):\n{}", std::fs::read_to_string(&log_path).unwrap());
    let expected: Vec<String> = a11_events().iter().map(|e| e.id("lab")).collect();
    check_exactly_once_in_order(&read_stream(&nats.url(), STREAM).await, &expected);
}
