//! Decode + normalize throughput on one core, over a large trace built from
//! the real fixture traces (renamed copies), and resident memory over the run;
//! then the real `callbridge replay` of the same trace, written to a file,
//! with its JSON lines on stdout (into `/dev/null`): frames/s and peak RSS.
//!
//! `cargo bench --bench replay` (env `COPIES`, default 400 ≈ 900k frames,
//! 418 MB; `COPIES=454` makes the 474 MB trace of issue 17).
//!
//! Targets (issue 17), printed with whether each is met: decode+normalize
//! ≥ 3,000,000 frames/s; `replay` ≥ 2,000,000 frames/s to JSON lines, with
//! a peak RSS under 60 MB.

#[path = "support/mod.rs"]
mod support;

use callbridge::ami::codec::{decode_all, AmiCodec, AmiMessage};
use callbridge::config::Config;
use callbridge::normalize::{AlwaysOpen, Normalizer};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TARGET_DECODE_NORMALIZE_FPS: f64 = 3_000_000.0;
const TARGET_REPLAY_FPS: f64 = 2_000_000.0;
const TARGET_REPLAY_PEAK_RSS: u64 = 60_000_000;

/// `callbridge replay` of `trace` with JSON lines to `/dev/null`: seconds
/// and peak RSS (`VmHWM`, read every 5 ms until it exits).
fn replay_binary(trace: &std::path::Path, config: &std::path::Path) -> (f64, u64) {
    let t = Instant::now();
    let mut child = Command::new(support::callbridge_bin())
        .args(["replay", "--config"])
        .arg(config)
        .arg(trace)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start callbridge replay");
    let mut peak = 0;
    loop {
        peak = peak.max(support::proc_status_bytes(child.id(), "VmHWM"));
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "callbridge replay failed: {status}");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (t.elapsed().as_secs_f64(), peak)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let root = env!("CARGO_MANIFEST_DIR");
    let traces = support::lab_session_traces();
    let copies: usize = std::env::var("COPIES").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    let data = callbridge::tracegen::concatenated(&traces, copies);
    let config = Config::load(std::path::Path::new(&format!("{root}/config/lab.toml"))).expect("config");
    let mb = data.len() as f64 / 1e6;

    // Decode only.
    let mut best_decode = f64::MAX;
    let mut frames = 0u64;
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0u64;
        decode_all(&mut AmiCodec::default(), &data, |m| {
            if matches!(m, AmiMessage::Frame(_)) {
                n += 1
            }
        });
        best_decode = best_decode.min(t.elapsed().as_secs_f64());
        frames = n;
    }
    println!(
        "decode:            {frames} frames, {mb:.1} MB in {best_decode:.3} s = {:.0} frames/s, {:.0} MB/s",
        frames as f64 / best_decode,
        mb / best_decode
    );

    // Decode + normalize (the pipeline's hot path), memory sampled along.
    let mut best = f64::MAX;
    let mut events = 0usize;
    let (mut rss_min, mut rss_max) = (u64::MAX, 0u64);
    for _ in 0..3 {
        let dir = Arc::new(callbridge::settings::directory(&config));
        let mut norm = Normalizer::new(dir, Arc::new(AlwaysOpen), callbridge::settings::normalizer_options(&config));
        let mut out = Vec::with_capacity(64);
        let mut n_events = 0usize;
        let mut n = 0u64;
        let t = Instant::now();
        decode_all(&mut AmiCodec::default(), &data, |m| {
            if let AmiMessage::Frame(f) = m {
                norm.handle(&f, 0, &mut out);
                n_events += out.len();
                out.clear();
                n += 1;
                if n % 100_000 == 0 {
                    let r = rss_kib();
                    rss_min = rss_min.min(r);
                    rss_max = rss_max.max(r);
                }
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
        events = n_events;
        assert_eq!(norm.live_calls(), 0, "every call of the trace ended");
    }
    println!(
        "decode+normalize:  {frames} frames -> {events} lifecycle events in {best:.3} s = {:.0} frames/s, {:.0} MB/s",
        frames as f64 / best,
        mb / best
    );
    println!(
        "resident memory during the run: {rss_min} KiB .. {rss_max} KiB (trace itself {:.0} MiB in memory)",
        data.len() as f64 / (1 << 20) as f64
    );

    // The daemon's path with a durable outbox: the changed calls'
    // checkpoints taken with every batch of up to 256 frames that made
    // events (what the pipeline hands the outbox; the store itself is the
    // delivery benchmark's).
    let mut best_cp = f64::MAX;
    let (mut checkpoints, mut bytes) = (0usize, 0usize);
    for _ in 0..3 {
        let dir = Arc::new(callbridge::settings::directory(&config));
        let mut norm = Normalizer::new(dir, Arc::new(AlwaysOpen), callbridge::settings::normalizer_options(&config));
        norm.track_changes();
        let mut out = Vec::with_capacity(512);
        let (mut n, mut cps, mut size) = (0u64, 0usize, 0usize);
        let t = Instant::now();
        decode_all(&mut AmiCodec::default(), &data, |m| {
            if let AmiMessage::Frame(f) = m {
                norm.handle(&f, 0, &mut out);
                n += 1;
                if n % 256 == 0 && !out.is_empty() {
                    let taken = norm.take_checkpoints();
                    cps += taken.len();
                    size += taken.iter().map(|c| c.state.len()).sum::<usize>();
                    out.clear();
                }
            }
        });
        best_cp = best_cp.min(t.elapsed().as_secs_f64());
        (checkpoints, bytes) = (cps, size);
    }
    println!(
        "... + checkpoints: {frames} frames in {best_cp:.3} s = {:.0} frames/s ({:.1}% of decode+normalize), \
         {checkpoints} call states of {} bytes on average",
        frames as f64 / best_cp,
        100.0 * best / best_cp,
        bytes / checkpoints.max(1)
    );

    // The whole `callbridge replay`, reading the trace from a file as it goes.
    let tmp = tempfile::tempdir().expect("tempdir");
    let trace = tmp.path().join("trace.ami");
    std::fs::write(&trace, &data).expect("write the trace");
    drop(data);
    let lab = std::path::PathBuf::from(format!("{root}/config/lab.toml"));
    let (mut best_replay, mut peak) = (f64::MAX, 0);
    for _ in 0..3 {
        let (secs, hwm) = replay_binary(&trace, &lab);
        best_replay = best_replay.min(secs);
        peak = peak.max(hwm);
    }
    let replay_fps = frames as f64 / best_replay;
    println!(
        "callbridge replay: {frames} frames, {mb:.1} MB file -> JSON lines on stdout in {best_replay:.3} s = \
         {replay_fps:.0} frames/s, peak RSS {:.1} MB",
        peak as f64 / 1e6
    );
    let fps = frames as f64 / best;
    println!(
        "targets (issue 17): decode+normalize ≥ 3,000,000 frames/s: {} | replay ≥ 2,000,000 frames/s: {} | \
         replay peak RSS < 60 MB: {}",
        support::met(fps >= TARGET_DECODE_NORMALIZE_FPS),
        support::met(replay_fps >= TARGET_REPLAY_FPS),
        support::met(peak > 0 && peak < TARGET_REPLAY_PEAK_RSS)
    );
}
