//! The outbox writer on its own (issue 17): what the store costs per
//! lifecycle event, without the network, the AMI decoder or the sinks, so
//! that a change to the store can be measured on a noisy machine where the
//! end-to-end benchmark (`durable_ingest`) cannot tell 10 % apart.
//!
//! The events are the real normalizer's, from the fixture traces repeated
//! with fresh ids (`tracegen`). They are appended in group commits of
//! `BATCH` events, as the pipeline hands them over at a high rate, with one
//! sink that acknowledges each batch in requests of 100 (a webhook's batch
//! size) while the next one is appended, as in a daemon whose sink keeps up.
//! What is printed per run: events/s through the store, the writer thread's
//! CPU time per event, and the bytes written per event (`/proc/self/io`).
//!
//! ```text
//! cargo bench --bench outbox_writer                  # COPIES=1000 (105k events), 3 runs
//! COPIES=2000 RUNS=5 BATCH=1200 cargo bench --bench outbox_writer
//! ```

#[path = "support/mod.rs"]
mod support;

use callbridge::ami::codec::{decode_all, AmiCodec, AmiMessage};
use callbridge::config::Config;
use callbridge::event::Event;
use callbridge::normalize::{AlwaysOpen, Normalizer};
use callbridge::outbox::{Outbox, OutboxOptions};
use std::sync::Arc;
use std::time::Instant;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The lifecycle events of the fixture traces, `copies` times over.
fn events(copies: usize) -> Vec<Event> {
    let root = env!("CARGO_MANIFEST_DIR");
    let traces = support::lab_session_traces();
    let data = callbridge::tracegen::concatenated(&traces, copies);
    let config = Config::load(std::path::Path::new(&format!("{root}/config/lab.toml"))).expect("config");
    let dir = Arc::new(callbridge::settings::directory(&config));
    let mut norm = Normalizer::new(dir, Arc::new(AlwaysOpen), callbridge::settings::normalizer_options(&config));
    let mut out = Vec::new();
    decode_all(&mut AmiCodec::default(), &data, |m| {
        if let AmiMessage::Frame(f) = m {
            norm.handle(&f, 0, &mut out);
        }
    });
    out
}

struct Run {
    seconds: f64,
    writer_cpu: f64,
    written: u64,
}

fn self_written() -> u64 {
    support::written_bytes(std::process::id())
}

async fn run(events: &[Event], batch: usize) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(dir.path(), OutboxOptions::new("lab", vec!["hook".into()])).expect("open the outbox");
    let sink: Arc<str> = Arc::from("hook");
    let pid = std::process::id();
    let (cpu0, written0) = (support::thread_cpu_seconds(pid, "outbox-writer"), self_written());
    let t = Instant::now();
    let mut after = 0;
    for chunk in events.chunks(batch) {
        outbox.append(chunk).await.expect("append");
        // What the sink took from the last commit, acknowledged while
        // this one is stored: it joins the next commit.
        let records = outbox.pending("hook", after, usize::MAX).await.expect("pending");
        if let Some(last) = records.last() {
            after = last.pos;
        }
        for piece in records.chunks(100) {
            outbox.ack(&sink, piece.iter().map(|r| (r.pos, r.seq)).collect()).await.expect("ack");
        }
    }
    outbox.flush().await.expect("flush");
    let seconds = t.elapsed().as_secs_f64();
    let writer_cpu = support::thread_cpu_seconds(pid, "outbox-writer") - cpu0;
    let written = self_written() - written0;
    assert_eq!(outbox.depth(), 0, "every event acknowledged");
    outbox.close().await.expect("close");
    Run { seconds, writer_cpu, written }
}

fn main() {
    let (copies, runs, batch) = (env_or("COPIES", 1000), env_or("RUNS", 3), env_or("BATCH", 1200).max(1));
    let events = events(copies);
    let n = events.len() as f64;
    println!("outbox writer: {} lifecycle events, group commits of {batch}, one sink acknowledging, {runs} runs", n);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut rates = Vec::new();
    let mut cpus = Vec::new();
    for i in 1..=runs {
        let r = rt.block_on(run(&events, batch));
        let cpu_us = r.writer_cpu * 1e6 / n;
        println!(
            "run {i}: {:>8.0} events/s | writer CPU {:.2} s = {cpu_us:.2} µs per event | {:.0} bytes written per event",
            n / r.seconds,
            r.writer_cpu,
            r.written as f64 / n
        );
        rates.push(n / r.seconds);
        cpus.push(cpu_us);
    }
    println!("median: {:.0} events/s | writer CPU {:.2} µs per event", support::median(rates), support::median(cpus));
}
