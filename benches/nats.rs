//! NATS JetStream sink throughput and latency against a local `nats-server`
//! (JetStream on a file store in a temporary directory; skipped with a
//! message when the binary is missing).
//!
//! `cargo bench --bench nats` (env `EVENTS`, default 200000; `RATE`,
//! default 5000 events/s; `SECONDS`, default 4).
//!
//! - sink alone, one core (a current-thread runtime): real a11 event bodies
//!   of many calls handed to `NatsSink::deliver` in batches, every PubAck
//!   awaited: events/s, and the stored bytes per event;
//! - outbox → runner → sink (two worker threads, the daemon's path, the
//!   outbox fsync'd): events/s from the first append to the last PubAck;
//! - latency at a paced rate through the sink alone: from the moment an
//!   event was due to its PubAck, p50/p99/max.

mod support;

use callbridge::config::Config;
use callbridge::event::{CallId, Event};
use callbridge::outbox::{Outbox, OutboxOptions, Record};
use callbridge::sink::nats::NatsSink;
use callbridge::sink::{Attempt, RunnerOptions, Runners, Sink};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(dir: &Path) -> Option<(Server, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((Server(child), port))
}

fn lab_with_nats(url: &str, outbox: &Path) -> Config {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/config/lab.toml")).unwrap();
    let cut = text.find("[[sinks]]").unwrap();
    let text = format!(
        "{}[[sinks]]\ntype = \"nats\"\nurl = \"{url}\"\nbatch_size = 256\nconcurrency = 32\n\n[outbox]\npath = \"{}\"\n",
        &text[..cut],
        outbox.display()
    );
    Config::parse(&text, "bench").unwrap()
}

/// `n` events of a11, repeated with call ids renamed per copy.
fn events(config: &Config, n: usize) -> Vec<Event> {
    let root = env!("CARGO_MANIFEST_DIR");
    let base = callbridge::replay::events_of(config, &[format!("{root}/fixtures/ami/a11-concurrent-mix.ami")]).unwrap();
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

fn records(events: &[Event], run: &str) -> Vec<Record> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let body = e.to_cloudevent_json("lab");
            let id = format!("{run}-{}", e.id("lab"));
            Record {
                pos: i as i64,
                seq: i as i64,
                key: e.ordering_key(),
                kind: e.kind.type_name().into(),
                id: id.into(),
                body: body.into(),
                appended_at: 0,
            }
        })
        .collect()
}

async fn create_stream(url: &str, name: &str, subjects: &str) {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn stream_bytes(url: &str, name: &str) -> (u64, u64) {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let info = js.get_stream(name).await.unwrap().info().await.unwrap().clone();
    (info.state.messages, info.state.bytes)
}

/// The sink's batches as the runner takes them: up to 256 events, whole
/// calls first.
fn batches(records: &[Record], size: usize) -> Vec<Vec<Record>> {
    records.chunks(size).map(|c| c.to_vec()).collect()
}

async fn sink_alone(sink: Arc<NatsSink>, records: Vec<Record>, concurrency: usize) -> f64 {
    let n = records.len();
    let queue = Arc::new(std::sync::Mutex::new(batches(&records, 256)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (sink, queue) = (sink.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(batch) = queue.lock().unwrap().pop() else { break };
                loop {
                    match sink.deliver(&batch, 0).await {
                        Attempt::Delivered => break,
                        other => eprintln!("retrying a batch: {other:?}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn latency(sink: Arc<NatsSink>, records: Vec<Record>, rate: f64) -> (f64, f64, f64) {
    let n = records.len();
    let t0 = Instant::now() + Duration::from_millis(10);
    let due = |i: usize| t0 + Duration::from_secs_f64(i as f64 / rate);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let mut next = 0;
    while next < n {
        let now = Instant::now();
        let mut end = next;
        while end < n && due(end) <= now {
            end += 1;
        }
        if end == next {
            tokio::time::sleep_until(due(next).into()).await;
            continue;
        }
        // The events due now, one batch (as the runner would take them).
        let batch: Vec<Record> = records[next..end].to_vec();
        let dues: Vec<Instant> = (next..end).map(due).collect();
        let (sink, tx) = (sink.clone(), tx.clone());
        tokio::spawn(async move {
            let r = sink.deliver(&batch, 0).await;
            assert_eq!(r, Attempt::Delivered);
            let done = Instant::now();
            for d in dues {
                let _ = tx.send(done.saturating_duration_since(d));
            }
        });
        next = end;
    }
    drop(tx);
    let mut lat = Vec::with_capacity(n);
    while let Some(d) = rx.recv().await {
        lat.push(d.as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    (p(0.5), p(0.99), p(1.0))
}

async fn through_outbox(config: &Config, evs: &[Event], dir: &Path) -> f64 {
    let sinks = callbridge::sink::build_sinks(config, &Default::default()).unwrap();
    let mut opts = OutboxOptions::new("lab", vec!["nats".into()]);
    opts.dedup_retention = Duration::from_secs(60);
    let outbox = Outbox::open(dir, opts).unwrap();
    let mut runners = Runners::new(&outbox, RunnerOptions::default());
    runners.spawn_configured(sinks);
    let start = Instant::now();
    for chunk in evs.chunks(500) {
        outbox.append(chunk).await.unwrap();
    }
    assert!(outbox.wait_drained(Duration::from_secs(600)).await);
    let rate = evs.len() as f64 / start.elapsed().as_secs_f64();
    runners.shutdown().await.unwrap();
    rate
}

fn main() {
    let n: usize = std::env::var("EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let rate: f64 = std::env::var("RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(5000.0);
    let seconds: f64 = std::env::var("SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4.0);
    let tmp = tempfile::tempdir().unwrap();
    let Some((_server, port)) = start_server(&tmp.path().join("js")) else {
        println!("SKIPPED: nats-server is not on PATH (apt-get install nats-server)");
        return;
    };
    let url = format!("nats://127.0.0.1:{port}");
    let config = lab_with_nats(&url, &tmp.path().join("outbox"));
    let evs = events(&config, n);
    let one_core = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    one_core.block_on(create_stream(&url, "CALLBRIDGE", "callbridge.>"));
    let sink = Arc::new(NatsSink::from_config(0, "nats", &config, &config.sinks[0]).unwrap());

    let recs = records(&evs, "a");
    let body_bytes: usize = recs.iter().map(|r| r.body.len()).sum();
    let (cpu0, wall0) = (support::cpu_seconds(std::process::id()), Instant::now());
    let per_s = one_core.block_on(sink_alone(sink.clone(), recs, 32));
    // The client's own CPU: on a machine where the server shares the cores,
    // events per CPU-second of the client is the one-core ceiling.
    let cpu = support::cpu_seconds(std::process::id()) - cpu0;
    let busy = cpu / wall0.elapsed().as_secs_f64();
    let (msgs, bytes) = one_core.block_on(stream_bytes(&url, "CALLBRIDGE"));
    println!(
        "sink alone, one core, batch 256 x 32 in flight: {n} events, {per_s:.0} events/s (PubAck awaited); \
         client CPU {cpu:.2} s ({:.0} % of a core): {:.0} events per client CPU-second; \
         body {:.0} B/event, stored {:.0} B/event ({msgs} messages, {bytes} B)",
        busy * 100.0,
        n as f64 / cpu.max(1e-9),
        body_bytes as f64 / n as f64,
        bytes as f64 / msgs.max(1) as f64
    );
    println!("target >= 100000 events/s on one core: {}", if per_s >= 100_000.0 { "met" } else { "NOT met" });
    let again = one_core.block_on(sink_alone(sink.clone(), records(&evs, "a"), 32));
    println!("the same events again (all duplicates, de-duplicated by JetStream): {again:.0} events/s");

    let paced = records(&evs[..((rate * seconds) as usize).min(n)], "l");
    let (p50, p99, max) = one_core.block_on(latency(sink.clone(), paced, rate));
    println!("latency event due -> PubAck at {rate:.0} events/s for {seconds} s: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    drop(one_core);

    let two = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut config = config.clone();
    // Fresh ids: the stream has a11's copies already.
    let renamed: Vec<Event> = evs
        .iter()
        .cloned()
        .map(|mut e| {
            if let Some(c) = e.call.as_mut() {
                std::sync::Arc::make_mut(c).id = CallId::new(&format!("o-{}", c.id));
            }
            e
        })
        .collect();
    config.outbox.path = tmp.path().join("outbox").display().to_string();
    let per_s = two.block_on(through_outbox(&config, &renamed, &tmp.path().join("outbox")));
    println!("outbox (fsync'd) -> runner -> sink, 2 threads: {n} events, {per_s:.0} events/s from first append to last PubAck");
}
