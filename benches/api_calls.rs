//! `GET /v1/calls` at the SPEC §10 scale: 100,000 live calls in a real
//! daemon (`app::start`, API on loopback), listed page by page over HTTP.
//!
//! 1. One client walks every page (limit 100, then 1000): per-page p50,
//!    p99 and max.
//! 2. Sixteen clients walk every page at once (the default limit 100,
//!    three walks each; then limit 1000, one walk each, reported only):
//!    per-page p99 and the process's resident set (`VmRSS` in
//!    /proc/self/status, sampled every 20 ms) before and at its peak.
//!    Clients and server share the machine's cores, so on a small box the
//!    limit-1000 phase is CPU-bound queueing (16 pages of ~300 kB in
//!    flight), not listing cost.
//!
//! Before pagination one request copied and serialized the whole registry
//! (29 MB); 16 at once took 19 s each and RSS went from 347 MB to 1.56 GB.
//! For comparison the bench also times `Registry::live_calls` (the old
//! full copy and sort) once.
//!
//! `cargo bench --bench api_calls` prints the numbers; it exits non-zero if
//! a target is missed (p99 per page < 100 ms at the default limit, alone
//! and with 16 clients; RSS growth under 16 clients < 64 MB).

use callbridge::app::{self, RunOptions, SourceSpec};
use callbridge::event::{CallId, CallSnapshot, CallState, Direction, Event, EventKind, Micros, Party};
use callbridge::ids::{AgentId, GroupId};
use callbridge::registry::LiveFilter;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIVE_CALLS: usize = 100_000;
const CLIENTS: usize = 16;
const ROUNDS: usize = 3;
const P99_TARGET_MS: f64 = 100.0;
const RSS_GROWTH_TARGET_MB: f64 = 64.0;
const TOKEN: &str = "bench-token";
const S: Micros = 1_000_000;
const T0: Micros = 1_795_471_023 * S;

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn live_call(i: usize) -> Event {
    let groups = ["support", "sales", "billing", "retention"];
    let (state, agent) = match i % 3 {
        0 => (CallState::Queued, None),
        1 => (CallState::Ringing, Some(format!("agent{:03}", i % 200))),
        _ => (CallState::Talking, Some(format!("agent{:03}", i % 200))),
    };
    let call = CallSnapshot {
        id: CallId::new(&format!("1795471023.{i}")),
        direction: Direction::Inbound,
        state,
        caller: Party { number: Some(format!("11987{i:06}").into()), name: Some(format!("Cliente {i:06}").into()) },
        callee: Party { number: Some("1130001000".into()), name: Some("Central".into()) },
        group: Some(GroupId::new(groups[i % groups.len()])),
        queue: Some(format!("{}", 700 + i % groups.len()).into()),
        agent: agent.as_deref().map(AgentId::new),
        ticket_id: Some(format!("{}", 40_000 + i).into()),
        started_at: T0 + (i / 10) as Micros * S,
        answered_at: None,
        ended_at: None,
        recording: Some(format!("https://pbx.example/rec/1795471023.{i}.wav")),
        routing: None,
        caller_lookup: None,
    };
    Event { seq: 1, time: call.started_at, kind: EventKind::Started {}, call: Some(call.into()) }
}

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let text = format!(
        "[pbx]\nname = \"bench\"\n[api]\nlisten = \"127.0.0.1:0\"\nsecret = \"{TOKEN}\"\n\
         [[sinks]]\ntype = \"jsonl\"\npath = {:?}\n[outbox]\npath = {:?}\n",
        dir.join("events.jsonl"),
        dir.join("outbox")
    );
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// What a client reads of a page (the calls are skipped, not built).
#[derive(serde::Deserialize)]
struct Page {
    count: usize,
    next_cursor: Option<String>,
}

/// Walks every page; the latency of each page in ms, and the calls seen.
async fn walk(client: &reqwest::Client, base: &str, limit: usize) -> (Vec<f64>, usize) {
    let (mut times, mut seen, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let mut url = format!("{base}/v1/calls?limit={limit}");
        if let Some(c) = &cursor {
            url.push_str("&cursor=");
            url.push_str(c);
        }
        let t = Instant::now();
        let body = client.get(&url).bearer_auth(TOKEN).send().await.expect("request").bytes().await.expect("body");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let page: Page = serde_json::from_slice(&body).expect("json");
        seen += page.count;
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return (times, seen),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(label: &str, mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    let p99 = percentile(&times, 0.99);
    println!(
        "{label}: {} pages, p50 {:.2} ms, p99 {p99:.2} ms, max {:.2} ms",
        times.len(),
        percentile(&times, 0.5),
        times[times.len() - 1]
    );
    p99
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = SourceSpec::Traces { paths: vec![], speed: callbridge::replay::Speed::Max };
    let opts = RunOptions {
        config_path: config(dir.path()),
        source,
        api_listen: None,
        shutdown_deadline: Duration::from_secs(5),
    };
    let running = app::start(opts).await.expect("daemon starts");
    let base = format!("http://{}", running.api_addr.expect("api"));
    let empty = rss_mb();
    for i in 0..LIVE_CALLS {
        running.shared.registry.apply(&live_call(i));
    }
    let filled = rss_mb();
    println!("{LIVE_CALLS} live calls: RSS {empty:.0} MB empty, {filled:.0} MB filled");
    let t = Instant::now();
    let all = running.shared.registry.live_calls(&LiveFilter::all());
    println!(
        "for comparison, one full copy and sort (the old listing, before JSON): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(all);

    let client = reqwest::Client::new();
    let mut failed = false;
    for limit in [100, 1000] {
        let (times, seen) = walk(&client, &base, limit).await;
        assert_eq!(seen, LIVE_CALLS, "a walk with limit {limit} saw {seen} calls");
        failed |= report(&format!("1 client, limit {limit}"), times) >= P99_TARGET_MS;
    }

    let before = rss_mb();
    let peak = Arc::new(AtomicU64::new(before.to_bits()));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let now = rss_mb();
                if now > f64::from_bits(peak.load(Ordering::Relaxed)) {
                    peak.store(now.to_bits(), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let p99 = concurrent_walks(&client, &base, 100, ROUNDS).await;
    failed |= p99 >= P99_TARGET_MS;
    concurrent_walks(&client, &base, 1000, 1).await;
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let peak = f64::from_bits(peak.load(Ordering::Relaxed));
    let after = rss_mb();
    println!("RSS under {CLIENTS} clients: {before:.0} MB before, peak {peak:.0} MB, {after:.0} MB after");
    failed |= peak - before >= RSS_GROWTH_TARGET_MB;
    running.stop().await.expect("clean stop");
    if failed {
        eprintln!("target missed: p99 per page < {P99_TARGET_MS} ms, RSS growth < {RSS_GROWTH_TARGET_MB} MB");
        std::process::exit(1);
    }
}

/// `CLIENTS` clients each walking every page `rounds` times; the p99.
async fn concurrent_walks(client: &reqwest::Client, base: &str, limit: usize, rounds: usize) -> f64 {
    let t = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, base) = (client.clone(), base.to_string());
            tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..rounds {
                    let (t, seen) = walk(&client, &base, limit).await;
                    assert_eq!(seen, LIVE_CALLS);
                    times.extend(t);
                }
                times
            })
        })
        .collect();
    let mut times = Vec::new();
    for c in clients {
        times.extend(c.await.expect("client"));
    }
    println!("{CLIENTS} clients x {rounds} full walks (limit {limit}) in {:.2} s", t.elapsed().as_secs_f64());
    report(&format!("{CLIENTS} clients, limit {limit}"), times)
}
