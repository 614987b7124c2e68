//! What the daemon benchmarks share: the peer harness's fake AMI server
//! (`../shared/bench/peers/fake_ami_server.py`), a webhook receiver that
//! answers 200 at once, the real `callbridge run` binary with its API
//! address, `/metrics` scraping and the process's CPU and memory from
//! `/proc`.
//!
//! Included with `#[path = "support/mod.rs"] mod support;`; not every
//! benchmark uses every part.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The receiver's webhook secret (Standard Webhooks, `whsec_` + base64).
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The peer benchmark harness (`$AMI_PEERS_DIR`, default
/// `../shared/bench/peers` beside the repository).
pub fn peers_dir() -> PathBuf {
    std::env::var_os("AMI_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bench/peers"))
}

/// The harness's fake AMI server, serving one file to every connection
/// after the login (then answering actions until the client closes).
pub struct FakeAmi {
    child: Child,
    pub port: u16,
}

impl FakeAmi {
    pub fn start(file: &Path, dir: &Path) -> FakeAmi {
        let port_file = dir.join("ami.port");
        let _ = std::fs::remove_file(&port_file);
        let child = Command::new("python3")
            .arg(peers_dir().join("fake_ami_server.py"))
            .arg("--events-file")
            .arg(file)
            .args(["--port", "0", "--quiet", "--port-file"])
            .arg(&port_file)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fake_ami_server.py (python3)");
        // Stopped on drop, also if it never says where it listens.
        let mut server = FakeAmi { child, port: 0 };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(port) = std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse().ok()) {
                server.port = port;
                return server;
            }
            assert!(Instant::now() < deadline, "the fake AMI server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FakeAmi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook receiver that answers 200 at once, counts the events and
/// calls `on_body` (if set) with each request body as it arrives.
pub struct Receiver {
    pub addr: SocketAddr,
    pub events: Arc<AtomicU64>,
    /// When the last request with events arrived.
    pub last_at: Arc<Mutex<Option<Instant>>>,
}

pub type OnBody = Arc<Mutex<Option<Box<dyn FnMut(&[u8]) + Send>>>>;

impl Receiver {
    pub fn start() -> Receiver {
        Receiver::start_with(Arc::new(Mutex::new(None)))
    }

    pub fn start_with(on_body: OnBody) -> Receiver {
        let events = Arc::new(AtomicU64::new(0));
        let counter = events.clone();
        let last_at = Arc::new(Mutex::new(None));
        let stamp = last_at.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                tx.send(listener.local_addr().expect("addr")).expect("send addr");
                let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
                    let counter = counter.clone();
                    let on_body = on_body.clone();
                    let stamp = stamp.clone();
                    async move {
                        if let Some(f) = on_body.lock().expect("receiver callback").as_mut() {
                            f(&body);
                        }
                        let n = memchr::memmem::find_iter(&body, b"\"specversion\"").count();
                        if n > 0 {
                            // Stamped before the count: whoever sees the count sees this time or a later one.
                            *stamp.lock().expect("receiver clock") = Some(Instant::now());
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        axum::http::StatusCode::OK
                    }
                });
                axum::serve(listener, app).await.expect("serve");
            });
        });
        Receiver { addr: rx.recv().expect("receiver address"), events, last_at }
    }
}

/// `[pbx]` and `[pbx.ami]` of a daemon connecting to `ami_port`.
pub fn pbx_config(name: &str, ami_port: u16) -> String {
    format!(
        "[pbx]\nname = \"{name}\"\n\n[pbx.ami]\naddress = \"127.0.0.1:{ami_port}\"\nusername = \"bench\"\n\
         secret = \"bench\"\nping_interval_seconds = 600.0\n\n"
    )
}

/// A webhook sink to `receiver`, the outbox in `dir` and the API on an
/// ephemeral port.
pub fn delivery_config(dir: &Path, receiver: SocketAddr, batch_size: usize) -> String {
    format!(
        "[[sinks]]\ntype = \"webhook\"\nurl = \"http://{receiver}/hook\"\nsecret = \"{SECRET}\"\nbatch_size = {batch_size}\n\n\
         [outbox]\npath = \"{}\"\n\n[api]\nlisten = \"127.0.0.1:0\"\nsecret = \"bench-token\"\n",
        dir.join("outbox").display()
    )
}

/// The callbridge binary built with this benchmark, or `$CALLBRIDGE_BIN`
/// when set: a wrapper that `exec`s the daemon under a profiler (e.g.
/// heaptrack's preload library) keeps the process id the benchmark reads
/// `/proc` and sends signals to.
pub fn callbridge_bin() -> PathBuf {
    std::env::var_os("CALLBRIDGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_callbridge")))
}

/// `callbridge run` (or whatever `cmd` starts) with its log in `dir`;
/// killed on drop.
pub struct Daemon {
    pub child: Child,
    pub api: SocketAddr,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` (already holding the program) with `run --config
    /// config` and waits until its API listens.
    pub fn start(mut cmd: Command, config: &Path, dir: &Path) -> Daemon {
        let log = dir.join("callbridge.log");
        let mut child = cmd
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,callbridge::app=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start callbridge");
        let api = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find(|l| l.contains("HTTP API listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                break addr;
            }
            if child.try_wait().expect("wait").is_some() {
                panic!("callbridge exited:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Daemon { child, api, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sums of the samples of each metric in `/metrics`. A name may carry
/// label matchers (`callbridge_lifecycle_events_total{type="call.queued"}`):
/// then only samples with those labels count.
pub fn scrape(api: SocketAddr, names: &[&str]) -> Option<Vec<f64>> {
    let mut s = TcpStream::connect_timeout(&api, Duration::from_secs(1)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let wanted: Vec<(&str, Vec<&str>)> = names
        .iter()
        .map(|n| match n.split_once('{') {
            Some((base, labels)) => (base, labels.trim_end_matches('}').split(',').collect()),
            None => (*n, Vec::new()),
        })
        .collect();
    let mut sums = vec![0.0; names.len()];
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (key, value) = line.rsplit_once(' ').unwrap_or((line, ""));
        let base = key.split('{').next().unwrap_or("");
        for (i, (name, labels)) in wanted.iter().enumerate() {
            if base == *name && labels.iter().all(|l| key.contains(l)) {
                sums[i] += value.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Some(sums)
}

/// The daemon's user+system CPU seconds so far (`/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// User + system CPU seconds of a `/proc/…/stat` file (a process's or a
/// thread's); 0 when it cannot be read.
fn stat_cpu_seconds(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Bytes `pid` caused to be written to storage so far (`write_bytes` of
/// `/proc/<pid>/io`); 0 when it cannot be read.
#[allow(dead_code)]
pub fn written_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("write_bytes: ").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

/// CPU seconds of the threads of `pid` named `name` (`/proc/<pid>/task/*/comm`).
#[allow(dead_code)]
pub fn thread_cpu_seconds(pid: u32, name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
        .map(|t| stat_cpu_seconds(&t.path().join("stat").to_string_lossy()))
        .sum()
}

/// How a target line reads its verdict.
#[allow(dead_code)]
pub fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

/// Every fixture trace (`fixtures/ami/*.ami`), in name order.
pub fn fixture_traces() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ami");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ami"))
        .collect();
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).collect()
}

/// The fixture traces of the lab session whose ids `tracegen` renames
/// (a12, recorded across a PBX crash later, keeps a call that only a
/// resync ends).
pub fn lab_session_traces() -> Vec<Vec<u8>> {
    fixture_traces().into_iter().filter(|t| t.windows(6).any(|w| w == b"179547")).collect()
}

/// The frames of the fixture trace `name` (`fixtures/ami/`) from its first
/// `Newchannel` on, without the closing empty lines; logins left out.
pub fn call_frames(name: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ami").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut started = false;
    let mut frames = Vec::new();
    for f in text.split("\r\n\r\n").map(str::trim_start).filter(|f| !f.is_empty()) {
        started |= f.lines().any(|l| l == "Event: Newchannel");
        if started && !f.contains("Event: SuccessfulAuth") {
            frames.push(f.to_string());
        }
    }
    frames
}

/// Writes `frame` as copy `k` of its call: ids, channel names and caller
/// number of its own, and each `Timestamp` (seconds) mapped by `ts`.
pub fn write_copy(w: &mut impl Write, frame: &str, k: u64, mut ts: impl FnMut(f64) -> f64) -> std::io::Result<()> {
    for line in frame.lines() {
        match line.split_once(": ") {
            Some(("Timestamp", t)) => write!(w, "Timestamp: {:.6}\r\n", ts(t.parse::<f64>().unwrap_or(0.0)))?,
            Some((key, value)) => write!(w, "{key}: {}\r\n", rename(key, value, k))?,
            None => write!(w, "{line}\r\n")?,
        }
    }
    w.write_all(b"\r\n")
}

/// `value` with the call ids, channel names and caller number of copy `k`.
fn rename(key: &str, value: &str, k: u64) -> String {
    // Uniqueid-like ids: `seconds.counter`.
    if key.ends_with("id") {
        if let Some((s, n)) = value.split_once('.') {
            if s.len() == 10 && s.bytes().all(|c| c.is_ascii_digit()) && n.bytes().all(|c| c.is_ascii_digit()) {
                let secs: u64 = s.parse().expect("digits");
                return format!("{}.{n}", secs + 1000 * k);
            }
        }
    }
    // Bridge ids (UUIDs): one set per copy.
    if value.len() == 36 && value.bytes().filter(|&c| c == b'-').count() == 4 {
        return format!("{k:08x}{}", &value[8..]);
    }
    // Channel name suffixes `-0000000N`: one set per copy.
    let value = value.replace("11987650001", &format!("1198{:07}", k % 10_000_000));
    let mut out = String::with_capacity(value.len() + 8);
    let mut rest = value.as_str();
    while let Some(i) = rest.find("-000000") {
        out.push_str(&rest[..i]);
        out.push_str(&format!("-{k:06x}"));
        rest = &rest[i + 7..];
    }
    out.push_str(rest);
    out
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
