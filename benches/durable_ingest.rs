//! The durable ingest path, end to end (issue 17): the real `callbridge run`
//! binary with its outbox (on disk, fsync'd) and a webhook sink, fed the
//! peer benchmark's 1,000,000-event AMI stream over TCP by its fake AMI
//! server (`../shared/bench/peers/`), against a local receiver that
//! answers 200 at once. Each run also reads the same stream with a raw
//! socket read (the harness's `raw_read`, std blocking reads into 1 MiB,
//! nothing parsed), before and after the daemon, so the ratio is measured
//! in the same run on this noisy machine.
//!
//! ```text
//! cargo bench --bench durable_ingest                       # 1M events, 3 runs
//! cargo bench --bench durable_ingest -- --events 100000 --runs 5 --batch-size 100
//! cargo bench --bench durable_ingest -- --runs 1 --perf /tmp/cb.perf.data   # daemon under `perf record`
//!                                      (add --callgraph for DWARF call graphs)
//! cargo bench --bench durable_ingest -- --bin /tmp/callbridge-before  # another build, for before/after
//! ```
//!
//! The stream is `$AMIBENCH_DIR/data/events_<N>.ami` (default
//! `/tmp/amibench`), generated with the harness's `gen_events.py` (seed 18)
//! when missing; the harness is found at `$AMI_PEERS_DIR` or
//! `../shared/bench/peers` beside the repository. Needs `python3`.
//!
//! What is measured, from `/metrics` polled every 25 ms:
//! - **ingest**: from the first AMI event received (`callbridge_ami_frames_received_total`
//!   moving) until every lifecycle event the stream makes is durable
//!   (`callbridge_lifecycle_events_total`, counted after the outbox commit,
//!   at its final value); `events/s` = AMI events / that time. This is the
//!   target of issue 17 (≥ 1M events/s, ≥ 0.2 of the raw read).
//! - **delivered**: until the receiver got the request that completed
//!   every lifecycle event (the time it arrived, stamped by the receiver).
//! - the raw read: first byte after login → `BenchEnd`.
//!
//! The machine is noisy: compare ratios from the same run, not absolute
//! numbers across runs. Medians over the runs are printed last.

#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::{
    callbridge_bin, cpu_seconds, delivery_config, median, met, pbx_config, peers_dir, scrape, thread_cpu_seconds,
    written_bytes, Daemon, FakeAmi, Receiver,
};

const END: &[u8] = b"UserEvent: BenchEnd\r\n\r\n";
/// How often `/metrics` is read (rendering it costs the daemon a little: at
/// 100 Hz, 5–10 % of its CPU in this benchmark).
const POLL: Duration = Duration::from_millis(25);
/// The stream is taken as done once every frame is in and no lifecycle
/// event was counted for this long. Ingest ends at the last count, so a
/// longer wait costs the measurement nothing; a shorter one ended a run
/// early when a commit stalled on this machine's disk for half a second.
const QUIET: Duration = Duration::from_secs(2);

struct Args {
    events: u64,
    runs: usize,
    batch_size: usize,
    perf: Option<PathBuf>,
    /// `perf record` with DWARF call graphs (inclusive costs; big files).
    callgraph: bool,
    keep: bool,
    /// Another callbridge binary to measure (an older build, for before/after).
    bin: Option<PathBuf>,
}

fn args() -> Args {
    let mut a =
        Args { events: 1_000_000, runs: 3, batch_size: 100, perf: None, callgraph: false, keep: false, bin: None };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--events" => a.events = it.next().and_then(|v| v.parse().ok()).expect("--events N"),
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--batch-size" => a.batch_size = it.next().and_then(|v| v.parse().ok()).expect("--batch-size N"),
            "--perf" => a.perf = it.next().map(PathBuf::from),
            "--keep" => a.keep = true,
            "--callgraph" => a.callgraph = true,
            "--bin" => a.bin = it.next().map(PathBuf::from),
            "--bench" => {}
            other => eprintln!("ignoring argument {other}"),
        }
    }
    a
}

/// The harness's event file, generated when missing.
fn events_file(n: u64) -> PathBuf {
    let work = std::env::var_os("AMIBENCH_DIR").map_or_else(|| PathBuf::from("/tmp/amibench"), PathBuf::from);
    let file = work.join("data").join(format!("events_{n}.ami"));
    if !file.exists() {
        std::fs::create_dir_all(file.parent().expect("data dir")).expect("create the data dir");
        eprintln!("generating {} (gen_events.py, seed 18)…", file.display());
        let ok = Command::new("python3")
            .arg(peers_dir().join("gen_events.py"))
            .args(["--events", &n.to_string(), "--seed", "18", "--out"])
            .arg(&file)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot generate {} with {}", file.display(), peers_dir().display());
    }
    file
}

/// The harness's `raw_read`: login, then blocking reads into 1 MiB until
/// `BenchEnd`; seconds from the first event byte.
fn raw_read(port: u16) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).ok();
    s.write_all(b"Action: Login\r\nActionID: raw-1\r\nUsername: bench\r\nSecret: bench\r\n\r\n").expect("login");
    let mut buf = vec![0u8; 1 << 20];
    let mut head = Vec::new();
    let mut t0 = None;
    let rest = loop {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed during login");
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = memchr::memmem::find(&head, b"\r\n\r\n") {
            let rest = head.len() - (i + 4);
            if rest > 0 {
                t0 = Some(Instant::now());
            }
            break rest;
        }
    };
    let mut tail: Vec<u8> = head[head.len() - rest..].to_vec();
    loop {
        if tail.ends_with(END) {
            break;
        }
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "server closed before BenchEnd");
        t0.get_or_insert_with(Instant::now);
        tail.extend_from_slice(&buf[n.saturating_sub(64)..n]);
        let cut = tail.len().saturating_sub(64);
        tail.drain(..cut);
    }
    t0.expect("events").elapsed().as_secs_f64()
}

/// The generator's queues and their members (PJSIP/<extension>).
fn config(dir: &Path, ami_port: u16, receiver: SocketAddr, batch_size: usize) -> PathBuf {
    let mut text = pbx_config("bench", ami_port);
    let groups =
        [("sales", 1001..=1024), ("support", 2001..=2040), ("billing", 3001..=3012), ("retention", 4001..=4008)];
    for (queue, exts) in &groups {
        let agents: Vec<String> = exts.clone().map(|e| format!("\"a{e}\"")).collect();
        text += &format!("[[groups]]\nid = \"{queue}\"\nqueue = \"{queue}\"\nagents = [{}]\n\n", agents.join(", "));
    }
    for (_, exts) in &groups {
        for e in exts.clone() {
            text += &format!("[[agents]]\nid = \"a{e}\"\nextension = \"{e}\"\n\n");
        }
    }
    text += &delivery_config(dir, receiver, batch_size);
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

struct Run {
    raw_before: f64,
    raw_after: f64,
    ingest: f64,
    delivered: f64,
    lifecycle: u64,
    commits: u64,
    /// Time spent in group commits (SQL, fsync, checkpoints).
    commit_seconds: f64,
    cpu: f64,
    /// CPU of the outbox's writer thread (SQLite, fsync), part of `cpu`.
    writer_cpu: f64,
    /// Bytes the daemon wrote to storage (the outbox's WAL and database).
    written: u64,
}

/// The first child of process `pid` (Linux's `/proc/PID/task/PID/children`).
fn first_child(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

fn daemon_run(a: &Args, server: &FakeAmi, receiver: &Receiver, run: usize) -> Run {
    let dir = tempfile::Builder::new().prefix("callbridge-ingest-").tempdir().expect("tempdir");
    let config = config(dir.path(), server.port, receiver.addr, a.batch_size);
    let bin = a.bin.clone().unwrap_or_else(callbridge_bin);
    let cmd = match &a.perf {
        Some(out) => {
            let mut c = Command::new("perf");
            c.args(["record", "-F", "1999"]);
            if a.callgraph {
                c.args(["--call-graph", "dwarf,32768"]);
            }
            c.arg("-o")
                .arg(if a.runs > 1 { out.with_extension(format!("{run}")) } else { out.clone() })
                .arg("--")
                .arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let received_before = receiver.events.load(Ordering::Relaxed);
    let daemon = Daemon::start(cmd, &config, dir.path());
    let (api, log) = (daemon.api, daemon.log.clone());
    let names = [
        "callbridge_ami_frames_received_total",
        "callbridge_lifecycle_events_total",
        "callbridge_outbox_commits_total",
        "callbridge_outbox_commit_duration_seconds_sum",
        "callbridge_outbox_journal_events_total{left_as=\"delivered\"}",
        "callbridge_outbox_journal_events_total{left_as=\"stored\"}",
    ];
    let mut first: Option<Instant> = None;
    let (mut last_lifecycle, mut last_change) = (0.0, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(600);
    let (ingest_end, lifecycle, commits, commit_seconds) = loop {
        let now = Instant::now();
        assert!(now < deadline, "the daemon never finished the stream; log: {}", log.display());
        let Some(v) = scrape(api, &names) else {
            std::thread::sleep(POLL);
            continue;
        };
        if first.is_none() && v[0] > 100.0 {
            first = Some(now);
        }
        if v[1] != last_lifecycle {
            last_lifecycle = v[1];
            last_change = now;
        }
        if v[0] >= a.events as f64 && now.duration_since(last_change) > QUIET {
            eprintln!("journal: {} events left it as delivered, {} as rows of the store", v[4], v[5]);
            break (last_change, v[1] as u64, v[2] as u64, v[3]);
        }
        std::thread::sleep(POLL);
    };
    let first = first.expect("frames counted");
    let deadline = Instant::now() + Duration::from_secs(600);
    while receiver.events.load(Ordering::Relaxed) - received_before < lifecycle {
        assert!(Instant::now() < deadline, "the receiver never got every event");
        std::thread::sleep(Duration::from_millis(2));
    }
    // The last request's arrival, not now: the quiet wait above must not
    // count as delivery time.
    let last = receiver.last_at.lock().expect("receiver clock").unwrap_or_else(Instant::now);
    let delivered = last.saturating_duration_since(first).as_secs_f64();
    // Under `perf record` the process started is perf: the daemon is its child.
    let pid = if a.perf.is_some() { first_child(daemon.pid()).unwrap_or(daemon.pid()) } else { daemon.pid() };
    let cpu = cpu_seconds(pid);
    let writer_cpu = thread_cpu_seconds(pid, "outbox-writer");
    let written = written_bytes(pid);
    daemon.stop();
    if a.keep {
        eprintln!("kept {}", dir.keep().display());
    }
    Run {
        raw_before: 0.0,
        raw_after: 0.0,
        ingest: ingest_end.duration_since(first).as_secs_f64(),
        delivered,
        lifecycle,
        commits,
        commit_seconds,
        cpu,
        writer_cpu,
        written,
    }
}

fn main() {
    let a = args();
    let file = events_file(a.events);
    let work = tempfile::tempdir().expect("tempdir");
    let server = FakeAmi::start(&file, work.path());
    let receiver = Receiver::start();
    let n = a.events as f64;
    if let Some(b) = &a.bin {
        println!("binary: {}", b.display());
    }
    println!(
        "durable ingest: callbridge run (outbox on disk, webhook batch_size {}) vs a raw socket read, {} AMI events ({} MB), {} runs",
        a.batch_size,
        a.events,
        std::fs::metadata(&file).map(|m| m.len() / 1_000_000).unwrap_or(0),
        a.runs
    );
    // Warm-up: the page cache, the loopback path.
    raw_read(server.port);
    let mut runs = Vec::new();
    for r in 0..a.runs {
        let raw_before = raw_read(server.port);
        let run = daemon_run(&a, &server, &receiver, r);
        let raw_after = raw_read(server.port);
        let run = Run { raw_before, raw_after, ..run };
        let raw = n / ((run.raw_before + run.raw_after) / 2.0);
        println!(
            "run {}: raw read {:>10.0} ev/s | ingest {:>9.0} ev/s ({:.3} s, ratio {:.3}) | delivered {:>9.0} ev/s ({:.3} s) | \
             {} lifecycle events, {} commits ({:.0} events/commit, {:.1} ms each), daemon CPU {:.2} s \
             (outbox writer {:.2} s, the rest {:.2} s), {:.0} bytes written per lifecycle event",
            r + 1,
            raw,
            n / run.ingest,
            run.ingest,
            (n / run.ingest) / raw,
            n / run.delivered,
            run.delivered,
            run.lifecycle,
            run.commits,
            run.lifecycle as f64 / run.commits.max(1) as f64,
            run.commit_seconds * 1000.0 / run.commits.max(1) as f64,
            run.cpu,
            run.writer_cpu,
            run.cpu - run.writer_cpu,
            run.written as f64 / run.lifecycle.max(1) as f64
        );
        runs.push(run);
    }
    let raw = median(runs.iter().map(|r| n / ((r.raw_before + r.raw_after) / 2.0)).collect());
    let ingest = median(runs.iter().map(|r| n / r.ingest).collect());
    let ratio = median(runs.iter().map(|r| (n / r.ingest) / (n / ((r.raw_before + r.raw_after) / 2.0))).collect());
    let delivered = median(runs.iter().map(|r| n / r.delivered).collect());
    let writer_us = median(runs.iter().map(|r| r.writer_cpu * 1e6 / r.lifecycle.max(1) as f64).collect());
    let rest_us = median(runs.iter().map(|r| (r.cpu - r.writer_cpu) * 1e6 / n).collect());
    println!(
        "median: raw read {raw:.0} ev/s | ingest {ingest:.0} ev/s | ratio {ratio:.3} | delivered {delivered:.0} ev/s"
    );
    println!(
        "median CPU: outbox writer {writer_us:.2} µs per lifecycle event | the rest of the daemon {rest_us:.2} µs per AMI event"
    );
    println!("target (issue 17): ingest ≥ 1,000,000 ev/s: {} | ratio ≥ 0.2: {}", met(ingest >= 1e6), met(ratio >= 0.2));
    let _ = std::io::stdout().flush();
}
