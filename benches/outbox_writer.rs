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
//! CPU time per event, and the bytes written per event (`/proc/self/io`);
//! first with the journal tier off (`OutboxOptions::journal`: every event
//! a row of the tables), then as the daemon runs it.
//!
//! Then the same events through the journal's log alone
//! (`callbridge::outbox::journal`), in the same run: each event written as
//! an entry of what the store keeps of it (seq, id, key, type, JSON,
//! SHA-256), a commit (`fdatasync`) per batch, and each acknowledgement
//! request of 100 as an entry of the next commit, on a thread of its own.
//! The records are built before the clock starts, as the pipeline builds
//! them on its side before the writer gets them. That is what the journal
//! tier would leave on the writer's path per event.
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
use callbridge::outbox::journal::Journal;
use callbridge::outbox::{Outbox, OutboxOptions};
use sha2::Digest;
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

async fn run(events: &[Event], batch: usize, journal: bool) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = OutboxOptions { journal, ..OutboxOptions::new("lab", vec!["hook".into()]) };
    let outbox = Outbox::open(dir.path(), opts).expect("open the outbox");
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

/// What the journal would hold of an event: the store's columns.
struct Entry {
    id: String,
    key: String,
    kind: &'static str,
    body: String,
    digest: [u8; 32],
}

fn entries(events: &[Event]) -> Vec<Entry> {
    let mut scratch = Vec::with_capacity(2048);
    events
        .iter()
        .map(|e| {
            let body = e.cloudevent_json_in("lab", &mut scratch).to_owned();
            Entry {
                id: e.id("lab"),
                key: e.ordering_key().to_string(),
                kind: e.kind.type_name(),
                digest: sha2::Sha256::digest(body.as_bytes()).into(),
                body,
            }
        })
        .collect()
}

/// Appends one length-prefixed field.
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn journal_run(entries: Arc<Vec<Entry>>, batch: usize) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let worker = std::thread::Builder::new()
        .name("outbox-journal".into())
        .spawn(move || {
            let written0 = self_written();
            let cpu0 = thread_cpu();
            let t = Instant::now();
            let mut journal = Journal::open(&path, |_, _| {}).expect("open the journal");
            let mut entry = Vec::with_capacity(4096);
            let mut seq = 0u64;
            let mut acks: Vec<u64> = Vec::new();
            for chunk in entries.chunks(batch) {
                // The last batch's acknowledgements, 100 positions a request.
                for piece in acks.chunks(100) {
                    entry.clear();
                    entry.push(b'A');
                    field(&mut entry, b"hook");
                    for pos in piece {
                        entry.extend_from_slice(&pos.to_le_bytes());
                    }
                    journal.push(&entry).expect("push");
                }
                acks.clear();
                for e in chunk {
                    seq += 1;
                    entry.clear();
                    entry.push(b'E');
                    entry.extend_from_slice(&seq.to_le_bytes());
                    for f in [e.id.as_bytes(), e.key.as_bytes(), e.kind.as_bytes(), e.body.as_bytes(), &e.digest[..]] {
                        field(&mut entry, f);
                    }
                    journal.push(&entry).expect("push");
                    acks.push(seq);
                }
                journal.commit().expect("commit");
            }
            (t.elapsed().as_secs_f64(), thread_cpu() - cpu0, self_written() - written0)
        })
        .expect("spawn");
    let (seconds, writer_cpu, written) = worker.join().expect("journal thread");
    Run { seconds, writer_cpu, written }
}

/// The calling thread's CPU time, in seconds (to the nanosecond, where
/// `/proc`'s ticks are 10 ms).
fn thread_cpu() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn main() {
    let (copies, runs, batch) = (env_or("COPIES", 1000), env_or("RUNS", 3), env_or("BATCH", 1200).max(1));
    let events = events(copies);
    let n = events.len() as f64;
    println!("outbox writer: {} lifecycle events, group commits of {batch}, one sink acknowledging, {runs} runs", n);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (_, tables) = measure("tables only", "writer", runs, n, || rt.block_on(run(&events, batch, false)));
    let (_, store_cpu) = measure("run", "writer", runs, n, || rt.block_on(run(&events, batch, true)));
    println!(
        "the outbox's journal tier: {:.1}× less writer CPU per event than the tables alone",
        tables / store_cpu.max(1e-9)
    );
    let entries = Arc::new(entries(&events));
    let (rate, journal_cpu) = measure("journal run", "journal thread", runs, n, || journal_run(entries.clone(), batch));
    println!(
        "journal median: {rate:.0} events/s | {journal_cpu:.2} µs per event, {:.1}× less than the store's {store_cpu:.2}",
        store_cpu / journal_cpu.max(1e-9)
    );
}

/// Runs `run` `runs` times, printing each, then the medians; returns the
/// median events/s and CPU µs per event.
fn measure(label: &str, thread: &str, runs: usize, n: f64, mut run: impl FnMut() -> Run) -> (f64, f64) {
    let mut rates = Vec::new();
    let mut cpus = Vec::new();
    for i in 1..=runs {
        let r = run();
        let cpu_us = r.writer_cpu * 1e6 / n;
        println!(
            "{label} {i}: {:>8.0} events/s | {thread} CPU {:.2} s = {cpu_us:.2} µs per event | {:.0} bytes written per event",
            n / r.seconds,
            r.writer_cpu,
            r.written as f64 / n
        );
        rates.push(n / r.seconds);
        cpus.push(cpu_us);
    }
    let (rate, cpu) = (support::median(rates), support::median(cpus));
    println!("{label} median: {rate:.0} events/s | {thread} CPU {cpu:.2} µs per event");
    (rate, cpu)
}
