//! Latency of the durable path (issue 17): from an AMI frame written to the
//! socket to the webhook POST carrying its lifecycle event received, with
//! the real `callbridge run` binary, its outbox on disk (fsync'd) and a
//! webhook sink, at 5,000 and at 50,000 frames/s.
//!
//! The AMI side is a scripted server in this benchmark: it logs the daemon
//! in (any credentials), answers its actions (anything but `Ping` with an error: no resync
//! listing), then writes whole real calls — copies of
//! `fixtures/ami/a01-inbound-answered.ami` and of the outbound
//! `a07-outbound-answered.ami`, each with its own ids — paced on
//! millisecond boundaries: the frames due in a millisecond are written at
//! its start, stamped (`Timestamp`) with that millisecond. An event's
//! `time` is the `Timestamp` of the frame that made it, so the receiver's
//! clock minus `time` is the frame → POST latency (same machine, same
//! clock). The first half second is warm-up and left out.
//!
//! An outbound call's `call.started` waits for the ticket variable that
//! the dialplan sets a few frames later (by design, SPEC §4): it is
//! reported separately and not in the percentiles.
//!
//! ```text
//! cargo bench --bench latency                       # 5,000 and 50,000 frames/s, 10 s each
//! cargo bench --bench latency -- --rates 5000 --seconds 30
//! cargo bench --bench latency -- --bin /tmp/callbridge-before   # another build, for before/after
//! ```
//!
//! Target (issue 17): p99 < 5 ms at both rates. Exits non-zero if missed.

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{call_frames, callbridge_bin, delivery_config, met, pbx_config, write_copy, Daemon, Receiver};

const TARGET_P99_MS: f64 = 5.0;
const WARM_UP_US: i64 = 500_000;

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// One received event: its type, whether it is an outbound call's start,
/// its `time` and when its POST arrived (µs since the epoch).
struct Seen {
    outbound_start: bool,
    time: i64,
    received: i64,
}

fn parse_body(body: &[u8], received: i64, into: &mut Vec<Seen>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let events = match v {
        serde_json::Value::Array(a) => a,
        one => vec![one],
    };
    for e in events {
        let Some(time) = e["time"].as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok()) else {
            continue;
        };
        let outbound_start = e["type"] == "call.started" && e["data"]["call"]["direction"] == "outbound";
        into.push(Seen { outbound_start, time: time.as_microsecond(), received });
    }
}

/// Reads the daemon's actions and answers them (through the shared
/// writer, between frames): a login, pings, and an error for anything
/// else. Returns once the connection closes.
fn answer_actions(read: TcpStream, write: Arc<Mutex<TcpStream>>, logged_in: std::sync::mpsc::Sender<()>) {
    let mut lines = BufReader::new(read);
    let (mut action, mut id) = (String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let l = line.trim_end();
        if let Some((k, v)) = l.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "action" => action = v.trim().to_ascii_lowercase(),
                "actionid" => id = v.trim().to_string(),
                _ => {}
            }
            continue;
        }
        if !l.is_empty() || action.is_empty() {
            continue;
        }
        let reply = match action.as_str() {
            "login" => format!("Response: Success\r\nActionID: {id}\r\nMessage: Authentication accepted\r\n\r\n"),
            "challenge" => format!("Response: Success\r\nActionID: {id}\r\nChallenge: 840415273\r\n\r\n"),
            "ping" => format!("Response: Success\r\nActionID: {id}\r\nPing: Pong\r\n\r\n"),
            _ => format!("Response: Error\r\nActionID: {id}\r\nMessage: not in this benchmark\r\n\r\n"),
        };
        if write.lock().map(|mut w| w.write_all(reply.as_bytes())).is_err() {
            return;
        }
        if action == "login" {
            let _ = logged_in.send(());
        }
        action.clear();
        id.clear();
    }
}

/// Serves one connection: login, then `rate` frames/s for `seconds`.
/// Returns the number of frames written.
fn serve(listener: TcpListener, rate: u64, seconds: u64) -> u64 {
    let calls = [call_frames("a01-inbound-answered.ami"), call_frames("a07-outbound-answered.ami")];
    let (stream, _) = listener.accept().expect("accept");
    stream.set_nodelay(true).ok();
    let writer = Arc::new(Mutex::new(stream.try_clone().expect("clone")));
    writer.lock().expect("writer").write_all(b"Asterisk Call Manager/9.0.0\r\n").expect("banner");
    let (tx, rx) = std::sync::mpsc::channel();
    let w = writer.clone();
    std::thread::spawn(move || answer_actions(stream, w, tx));
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        eprintln!("the daemon did not log in");
        return 0;
    }
    // Its resync actions come and go first.
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let (mut sent, mut k, mut frame) = (0u64, 0u64, 0usize);
    let mut buf = Vec::with_capacity(1 << 16);
    let total = rate * seconds;
    while sent < total {
        // The next millisecond boundary of the wall clock.
        let t = now_us();
        let next = (t / 1000 + 1) * 1000;
        std::thread::sleep(Duration::from_micros((next - now_us()).max(0) as u64));
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        let stamp = next as f64 / 1e6;
        buf.clear();
        while sent < due {
            let call = &calls[(k % 2) as usize];
            write_copy(&mut buf, &call[frame], k, |_| stamp).expect("write");
            sent += 1;
            frame += 1;
            if frame == call.len() {
                frame = 0;
                k += 1;
            }
        }
        if !buf.is_empty() && writer.lock().expect("writer").write_all(&buf).is_err() {
            break;
        }
    }
    sent
}

fn config(dir: &Path, ami_port: u16, receiver: std::net::SocketAddr) -> PathBuf {
    // The lab's groups, agents and outbound settings (a01 and a07).
    let lab = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/lab.toml")).expect("lab.toml");
    let mut text = pbx_config("bench", ami_port);
    let keep = ["[[groups]]", "[[agents]]", "[outbound]"];
    let mut on = false;
    for line in lab.lines() {
        if line.starts_with('[') {
            on = keep.contains(&line.trim());
        }
        if on {
            text += line;
            text += "\n";
        }
    }
    text += &delivery_config(dir, receiver, 100);
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A commit slower than this (seconds; a bucket bound of the daemon's
/// `_duration_seconds` histograms) counts as a stall.
const SLOW_COMMIT_S: f64 = 0.05;

/// The daemon's commits so far: (slower than [`SLOW_COMMIT_S`], all).
fn slow_commits(api: std::net::SocketAddr) -> Option<(u64, u64)> {
    let bucket = format!("callbridge_outbox_commit_duration_seconds_bucket{{le=\"{SLOW_COMMIT_S}\"}}");
    let v = support::scrape(api, &["callbridge_outbox_commit_duration_seconds_count", &bucket])?;
    let (all, fast) = (v[0] as u64, v[1] as u64);
    Some((all.saturating_sub(fast), all))
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

fn main() {
    let (mut rates, mut seconds) = (vec![5_000u64, 50_000], 10u64);
    // Another callbridge binary to measure (an older build, for before/after).
    let mut bin = callbridge_bin();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rates" => {
                rates = it.next().expect("--rates A,B").split(',').map(|r| r.parse().expect("a rate")).collect()
            }
            "--seconds" => seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            "--bin" => bin = it.next().map(PathBuf::from).expect("--bin PATH"),
            "--bench" => {}
            other => eprintln!("ignoring argument {other}"),
        }
    }
    let mut missed = false;
    println!("AMI frame written → webhook POST received, callbridge run with outbox (fsync) and webhook sink:");
    for rate in rates {
        let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let into = seen.clone();
        let on_body: support::OnBody = Arc::new(Mutex::new(Some(Box::new(move |body: &[u8]| {
            let received = now_us();
            if let Ok(mut v) = into.lock() {
                parse_body(body, received, &mut v);
            }
        }))));
        let receiver = Receiver::start_with(on_body);
        let dir = tempfile::Builder::new().prefix("callbridge-latency-").tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let config = config(dir.path(), port, receiver.addr);
        let server = std::thread::spawn(move || serve(listener, rate, seconds));
        let daemon = Daemon::start(Command::new(&bin), &config, dir.path());
        let first = now_us() + WARM_UP_US;
        let frames = server.join().expect("the AMI side");
        if frames == 0 {
            let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
            panic!("nothing was streamed; the daemon's log:\n{log}");
        }
        // The last events on their way.
        std::thread::sleep(Duration::from_secs(2));
        let commits = slow_commits(daemon.api);
        daemon.stop();
        let seen = std::mem::take(&mut *seen.lock().expect("seen"));
        let (mut lat, mut outbound): (Vec<i64>, Vec<i64>) = (Vec::new(), Vec::new());
        for s in seen.iter().filter(|s| s.time >= first) {
            match s.outbound_start {
                true => outbound.push(s.received - s.time),
                false => lat.push(s.received - s.time),
            }
        }
        lat.sort_unstable();
        outbound.sort_unstable();
        let p99 = percentile(&lat, 0.99);
        let ok = p99 < TARGET_P99_MS;
        missed |= !ok;
        println!(
            "  {rate:>6} frames/s ({frames} frames, {} events measured): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms \
             | target p99 < {TARGET_P99_MS} ms: {}",
            lat.len(),
            percentile(&lat, 0.5),
            p99,
            percentile(&lat, 0.999),
            percentile(&lat, 1.0),
            met(ok)
        );
        println!(
            "         outbound call.started (waits for the ticket variable, not counted above): {} events, p50 {:.2} ms, p99 {:.2} ms",
            outbound.len(),
            percentile(&outbound, 0.5),
            percentile(&outbound, 0.99)
        );
        // A p99 far above the target with a handful of slow commits is the
        // disk stalling (one fsync holds every event behind it), not the
        // daemon's own work.
        if let Some((slow, all)) = commits {
            println!("         outbox commits: {all}, of which {slow} took over {SLOW_COMMIT_S} s (fsync included)");
        }
    }
    let _ = std::io::stdout().flush();
    if missed {
        std::process::exit(1);
    }
}
