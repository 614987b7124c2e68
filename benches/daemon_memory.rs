//! The daemon's memory at 1,000 / 10,000 / 100,000 live calls (issue 17):
//! the real `callbridge run` binary, with its outbox and a webhook sink,
//! fed over TCP (the peer harness's fake AMI server) a stream of calls
//! that never end, made from the real trace `fixtures/ami/a01-inbound-answered.ami`:
//!
//! - **queued**: every call cut after its `QueueCallerJoin` (one channel
//!   each, waiting in the queue);
//! - **talking**: every call cut before its first `Hangup`: the caller
//!   bridged with an agent reached through a Local-channel queue member
//!   (`Local/…;1`, `;2` and the agent's phone: four channels), every
//!   `VarSet`, `Newexten` and bridge event of the real call included.
//!
//! Each copy gets its own ids (`Uniqueid`/`Linkedid` seconds moved by
//! 1,000 per copy), channel names, caller number and timestamps (1 ms
//! apart, starting now). When every call's `call.queued` (or
//! `call.answered`) is durable, and 2 s later, the daemon's resident set
//! (`VmRSS`) and its peak (`VmHWM`) are read from `/proc`. The per-call
//! cost is the difference between two sizes divided by the difference in
//! calls.
//!
//! ```text
//! cargo bench --bench daemon_memory                      # both scenarios, 1k/10k/100k
//! cargo bench --bench daemon_memory -- --calls 100000 --scenario queued
//! ```
//!
//! Profiling: `CALLBRIDGE_BIN=wrapper` runs a script in place of the
//! daemon (it must `exec` the binary, e.g. with heaptrack's preload
//! library set, so that the measured process is the daemon);
//! `CALLBRIDGE_MEASURE_HOOK='shell command'` runs at each measurement with
//! the daemon's process id in `$DAEMON_PID` (e.g. to keep its `smaps`).
//!
//! Targets (issue 17): 100,000 queued calls < 150 MB at peak; 100,000
//! talking calls with a Local-channel member < 250 MB. Exits non-zero if
//! one is missed. Needs `python3` (the fake AMI server).

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{
    call_frames, callbridge_bin, delivery_config, met, pbx_config, proc_status_bytes, scrape, write_copy, Daemon,
    FakeAmi, Receiver,
};

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Queued,
    Talking,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Queued => "queued",
            Scenario::Talking => "talking",
        }
    }
    /// The lifecycle event every call has made once it is in this state.
    fn reached(self) -> &'static str {
        match self {
            Scenario::Queued => "call.queued",
            Scenario::Talking => "call.answered",
        }
    }
    fn target_mb(self) -> f64 {
        match self {
            Scenario::Queued => 150.0,
            Scenario::Talking => 250.0,
        }
    }
}

const MB: f64 = 1024.0 * 1024.0;

/// The frames of a01 that make one call reach `scenario` (raw, without
/// the closing empty line).
fn template(scenario: Scenario) -> Vec<String> {
    let mut frames = Vec::new();
    for f in call_frames("a01-inbound-answered.ami") {
        let event = f.lines().find_map(|l| l.strip_prefix("Event: ")).unwrap_or("");
        if scenario == Scenario::Talking && event == "Hangup" {
            break;
        }
        let last = scenario == Scenario::Queued && event == "QueueCallerJoin";
        frames.push(f);
        if last {
            break;
        }
    }
    assert!(frames.len() > 1, "a01 has no call");
    frames
}

/// The stream: `calls` renamed copies of the template, then the harness's
/// end marker. Returns the file and its number of frames.
fn stream(dir: &Path, scenario: Scenario, calls: u64) -> (PathBuf, u64) {
    let frames = template(scenario);
    let first_ts = frames
        .iter()
        .find_map(|f| f.lines().find_map(|l| l.strip_prefix("Timestamp: ")))
        .and_then(|t| t.parse::<f64>().ok())
        .expect("a timestamp");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    let file = dir.join(format!("{}-{calls}.ami", scenario.name()));
    let mut w = std::io::BufWriter::new(std::fs::File::create(&file).expect("create the stream"));
    for k in 0..calls {
        for f in &frames {
            write_copy(&mut w, f, k, |ts| ts - first_ts + now + k as f64 / 1000.0).expect("write");
        }
    }
    w.write_all(b"Event: UserEvent\r\nUserEvent: BenchEnd\r\n\r\n").expect("write");
    w.flush().expect("write");
    (file, calls * frames.len() as u64 + 1)
}

/// The lab's groups and agents (a01's queue 700 and agent 2001).
fn config(dir: &Path, ami_port: u16, receiver: std::net::SocketAddr) -> PathBuf {
    let mut text = pbx_config("bench", ami_port);
    text += "[[groups]]\nid = \"support\"\nqueue = \"700\"\nagents = [\"maria\", \"joao\"]\n\n\
             [[agents]]\nid = \"maria\"\nextension = \"2000\"\n\n\
             [[agents]]\nid = \"joao\"\nname = \"Joao Souza\"\nextension = \"2001\"\n\n";
    text += &delivery_config(dir, receiver, 100);
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

struct Measure {
    calls: u64,
    rss: u64,
    peak: u64,
    /// Anonymous resident memory: the heap, stacks (not the mapped binary).
    anon: u64,
    seconds: f64,
}

fn measure(scenario: Scenario, calls: u64, receiver: &Receiver) -> Measure {
    let dir = tempfile::Builder::new().prefix("callbridge-memory-").tempdir().expect("tempdir");
    let (file, frames) = stream(dir.path(), scenario, calls);
    let server = FakeAmi::start(&file, dir.path());
    let config = config(dir.path(), server.port, receiver.addr);
    let started = Instant::now();
    let daemon = Daemon::start(Command::new(callbridge_bin()), &config, dir.path());
    let reached = format!("callbridge_lifecycle_events_total{{type=\"{}\"}}", scenario.reached());
    let names = ["callbridge_ami_frames_received_total", reached.as_str()];
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let v = scrape(daemon.api, &names).unwrap_or_default();
        if v.len() == 2 && v[0] >= frames as f64 && v[1] >= calls as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} calls never all reached {} (metrics {v:?}); log: {}",
            calls,
            scenario.reached(),
            daemon.log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let seconds = started.elapsed().as_secs_f64();
    // Deliveries and the sweeper settle; the resident set is what stays.
    std::thread::sleep(Duration::from_secs(2));
    let m = Measure {
        calls,
        rss: proc_status_bytes(daemon.pid(), "VmRSS"),
        peak: proc_status_bytes(daemon.pid(), "VmHWM"),
        anon: proc_status_bytes(daemon.pid(), "RssAnon"),
        seconds,
    };
    // `CALLBRIDGE_MEASURE_HOOK='command'`: run (by `sh -c`, the daemon's
    // process id in `$DAEMON_PID`, the scenario and calls in `$SCENARIO`
    // and `$CALLS`) at the measurement, e.g. to keep `/proc/$DAEMON_PID/smaps`
    // or ask the allocator for its statistics.
    if let Some(hook) = std::env::var_os("CALLBRIDGE_MEASURE_HOOK") {
        let status = Command::new("sh")
            .arg("-c")
            .arg(hook)
            .env("DAEMON_PID", daemon.pid().to_string())
            .env("SCENARIO", scenario.name())
            .env("CALLS", calls.to_string())
            .status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("CALLBRIDGE_MEASURE_HOOK failed: {status:?}");
        }
    }
    daemon.stop();
    m
}

fn main() {
    let mut sizes = vec![1_000u64, 10_000, 100_000];
    let mut scenarios = vec![Scenario::Queued, Scenario::Talking];
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--calls" => sizes = vec![it.next().and_then(|v| v.parse().ok()).expect("--calls N")],
            "--scenario" => {
                scenarios = match it.next().as_deref() {
                    Some("queued") => vec![Scenario::Queued],
                    Some("talking") => vec![Scenario::Talking],
                    other => panic!("--scenario queued|talking, not {other:?}"),
                }
            }
            "--bench" => {}
            other => eprintln!("ignoring argument {other}"),
        }
    }
    let receiver = Receiver::start();
    let mut missed = false;
    for scenario in scenarios {
        println!(
            "{} calls ({} frames each from a01), callbridge run with outbox and webhook sink:",
            scenario.name(),
            template(scenario).len()
        );
        let mut done: Vec<Measure> = Vec::new();
        for &n in &sizes {
            let m = measure(scenario, n, &receiver);
            let per_call = done.first().map(|f| (m.rss as f64 - f.rss as f64) / (m.calls - f.calls) as f64);
            println!(
                "  {:>7} calls: RSS {:>6.1} MB (anonymous {:.1} MB), peak {:>6.1} MB, in {:.1} s{}",
                m.calls,
                m.rss as f64 / MB,
                m.anon as f64 / MB,
                m.peak as f64 / MB,
                m.seconds,
                per_call.map(|b| format!(", {b:.0} bytes per call over {} calls", done[0].calls)).unwrap_or_default()
            );
            done.push(m);
        }
        if let Some(m) = done.iter().find(|m| m.calls == 100_000) {
            let ok = (m.peak as f64 / MB) < scenario.target_mb();
            missed |= !ok;
            println!(
                "  target (issue 17): 100,000 {} calls < {:.0} MB at peak: {} ({:.1} MB)",
                scenario.name(),
                scenario.target_mb(),
                met(ok),
                m.peak as f64 / MB
            );
        }
    }
    let _ = std::io::stdout().flush();
    if missed {
        std::process::exit(1);
    }
}
