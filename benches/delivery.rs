//! Delivery throughput and latency: events → outbox (durable, group commit)
//! → webhook sink → a receiver on loopback (axum, same process).
//!
//! `cargo bench --bench delivery` (env `EVENTS`, default 20000; `RATE`,
//! default 5000 events/s for the latency run; `SECONDS`, default 4).
//!
//! - sustained events/s, one event per request (concurrency 64);
//! - sustained events/s, batches of 100 (`application/cloudevents-batch+json`);
//! - latency from "event in" (the moment the event was due, before the
//!   append and its fsync) to "request out" (the receiver has the request),
//!   at a paced rate, p50/p99/max.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use callbridge::config::Config;
use callbridge::event::{CallId, Event};
use callbridge::outbox::{Outbox, OutboxOptions};
use callbridge::sink::webhook::{WebhookSettings, WebhookSink};
use callbridge::sink::{RunnerOptions, Runners};
use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
struct Rx {
    t0: Instant,
    /// Arrival (µs since t0) by event id, first arrival kept.
    arrivals: Arc<DashMap<String, u64>>,
    events: Arc<AtomicU64>,
}

async fn handle(State(rx): State<Rx>, headers: HeaderMap, body: Bytes) -> &'static str {
    let at = rx.t0.elapsed().as_micros() as u64;
    let batch = headers.get("content-type").is_some_and(|v| v.as_bytes().ends_with(b"batch+json"));
    if batch {
        let n = serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&body).map(|v| v.len()).unwrap_or(0);
        rx.events.fetch_add(n as u64, Ordering::Relaxed);
    } else if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) {
        rx.arrivals.entry(id.to_string()).or_insert(at);
        rx.events.fetch_add(1, Ordering::Relaxed);
    }
    "ok"
}

async fn receiver(t0: Instant) -> (String, Rx) {
    let rx = Rx { t0, arrivals: Arc::new(DashMap::new()), events: Arc::new(AtomicU64::new(0)) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(handle).with_state(rx.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, rx)
}

fn events(n: usize) -> Vec<Event> {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = Config::load(std::path::Path::new(&format!("{root}/config/lab.toml"))).unwrap();
    let base =
        callbridge::replay::events_of(&config, &[format!("{root}/fixtures/ami/a11-concurrent-mix.ami")]).unwrap();
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while out.len() < n {
        for e in &base {
            let mut e = e.clone();
            match e.call.as_mut() {
                Some(c) => std::sync::Arc::make_mut(c).id = CallId::new(&format!("{}-{i}", c.id)),
                None => e.time += i as i64 * 1_000_000_000,
            }
            out.push(e);
        }
        i += 1;
    }
    out.truncate(n);
    out
}

async fn setup(url: String, batch_size: usize, dir: &std::path::Path) -> (Outbox, Runners) {
    let mut opts = OutboxOptions::new("lab", vec!["webhook".into()]);
    opts.dedup_retention = Duration::from_secs(60);
    let outbox = Outbox::open(dir, opts).unwrap();
    let settings = WebhookSettings {
        url,
        batch_size,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        max_backoff: Duration::from_secs(1),
        concurrency: 64,
    };
    let mut d = Runners::new(&outbox, RunnerOptions::default());
    d.spawn(Arc::new(WebhookSink::new("webhook", settings, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()));
    (outbox, d)
}

/// A recorder that only counts outbox commits (everything else is a no-op,
/// so measuring does not slow the measured path).
struct CommitCounter(Arc<AtomicU64>);

impl metrics::Recorder for CommitCounter {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == "callbridge_outbox_commits_total" {
            Counter::from_arc(self.0.clone())
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

type Snapshotter = Arc<AtomicU64>;

/// Commits since the previous call.
fn commits(snap: &Snapshotter) -> u64 {
    snap.swap(0, Ordering::Relaxed)
}

async fn throughput(n: usize, batch_size: usize, snap: &Snapshotter) {
    let evs = events(n);
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let (url, rx) = receiver(t0).await;
    let (outbox, d) = setup(url, batch_size, dir.path()).await;
    commits(snap);
    let start = Instant::now();
    // Appenders as the pipeline does them: chunks, each awaited (durable).
    for chunk in evs.chunks(500) {
        outbox.append(chunk).await.unwrap();
    }
    let appended = start.elapsed();
    assert!(outbox.wait_drained(Duration::from_secs(300)).await);
    let secs = start.elapsed().as_secs_f64();
    d.shutdown().await.unwrap();
    let c = commits(snap);
    println!(
        "throughput batch_size={batch_size:<4} {n} events: appended (durable) in {:.3} s ({:.0}/s); delivered in {secs:.3} s = {:.0} events/s ({} received); {c} commits (appends + acks) = {:.1} events per commit",
        appended.as_secs_f64(),
        n as f64 / appended.as_secs_f64(),
        n as f64 / secs,
        rx.events.load(Ordering::Relaxed),
        n as f64 / c.max(1) as f64,
    );
}

async fn latency(rate: f64, seconds: f64, snap: &Snapshotter) {
    let n = (rate * seconds) as usize;
    let evs = events(n);
    let ids: Vec<String> = evs.iter().map(|e| e.id("lab")).collect();
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let (url, rx) = receiver(t0).await;
    let (outbox, d) = setup(url, 1, dir.path()).await;
    // Warm up the connection pool.
    tokio::time::sleep(Duration::from_millis(200)).await;
    commits(snap);
    let start = t0.elapsed().as_micros() as u64 + 1000;
    let due = |i: usize| start + (i as f64 * 1e6 / rate) as u64;
    let mut next = 0usize;
    while next < n {
        let now = t0.elapsed().as_micros() as u64;
        let mut end = next;
        while end < n && due(end) <= now {
            end += 1;
        }
        if end > next {
            outbox.append(&evs[next..end]).await.unwrap();
            next = end;
        } else {
            // Timer resolution is 1 ms: events due meanwhile are appended
            // together at the next wake (as the pipeline's recv_many does),
            // and that wait counts in their latency.
            let wait = due(next).saturating_sub(now);
            tokio::time::sleep(Duration::from_micros(wait)).await;
        }
    }
    assert!(outbox.wait_drained(Duration::from_secs(60)).await);
    d.shutdown().await.unwrap();
    let mut lat: Vec<u64> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| rx.arrivals.get(id).map(|a| a.saturating_sub(due(i))).expect("every event arrived"))
        .collect();
    let c = commits(snap);
    lat.sort_unstable();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "latency at {rate:.0} events/s for {seconds} s ({n} events, one per request): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; {c} commits ({:.0}/s)",
        p(0.5),
        p(0.99),
        p(0.999),
        p(1.0),
        c as f64 / seconds,
    );
}

/// fdatasync latency of the disk right now (p50, p99 in ms): the floor of
/// the durable path's latency, and what varies most on a shared machine.
fn fsync_probe() -> (f64, f64) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::create(dir.path().join("probe")).unwrap();
    let mut t: Vec<f64> = (0..200)
        .map(|_| {
            f.write_all(&[b'x'; 1000]).unwrap();
            let t0 = Instant::now();
            f.sync_data().unwrap();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[100], t[197])
}

fn main() {
    let n: usize = std::env::var("EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let rate: f64 = std::env::var("RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(5000.0);
    let seconds: f64 = std::env::var("SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4.0);
    let snap: Snapshotter = Arc::new(AtomicU64::new(0));
    metrics::set_global_recorder(CommitCounter(snap.clone())).expect("metrics recorder");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (p50, p99) = fsync_probe();
    println!("disk: fdatasync p50 {p50:.2} ms, p99 {p99:.2} ms");
    rt.block_on(async {
        throughput(n, 1, &snap).await;
        throughput(n, 100, &snap).await;
        latency(rate, seconds, &snap).await;
    });
    let (p50, p99) = fsync_probe();
    println!("disk: fdatasync p50 {p50:.2} ms, p99 {p99:.2} ms");
}
