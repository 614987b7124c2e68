//! SPEC §10 scale bar: 100,000 live calls in the registry under 300 MB RSS,
//! and a stuck-call sweep over them in under 50 ms — measured while one
//! writer thread keeps applying lifecycle events and two reader threads
//! keep calling `get` and `live_calls`, as the pipeline and the HTTP API do.
//!
//! `cargo bench --bench registry` prints the numbers; it exits non-zero if a
//! target is missed. Memory is the process's resident set (`VmRSS` in
//! /proc/self/status, Linux only) before and after filling the registry.

use callbridge::config::RegistryConfig;
use callbridge::event::{
    CallId, CallSnapshot, CallState, Direction, EndReason, Event, EventKind, HungUpBy, Micros, Party,
};
use callbridge::ids::{AgentId, GroupId};
use callbridge::registry::{LiveFilter, Registry};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIVE_CALLS: usize = 100_000;
const RSS_TARGET_MB: f64 = 300.0;
const SCAN_TARGET_MS: f64 = 50.0;
const SCANS: usize = 40;
const S: Micros = 1_000_000;
/// PBX time at the end of the fill.
const NOW: Micros = 1_795_471_023 * S;

/// Minimal xorshift: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Ids shared the way the normalizer shares them (cloned from the directory).
struct Names {
    groups: Vec<(GroupId, &'static str)>,
    agents: Vec<AgentId>,
}

impl Names {
    fn new() -> Names {
        Names {
            groups: vec![
                (GroupId::new("support"), "700"),
                (GroupId::new("sales"), "701"),
                (GroupId::new("billing"), "702"),
            ],
            agents: (0..60).map(|i| AgentId::new(&format!("agent{i:02}"))).collect(),
        }
    }
}

fn call_id(n: u64) -> String {
    format!("{}.{}", 1_795_460_000 + n / 40, n)
}

/// A realistic snapshot for call number `n`, in `state`.
fn snapshot(names: &Names, n: u64, state: CallState, started_at: Micros) -> CallSnapshot {
    let id = call_id(n);
    let (group, queue) = &names.groups[(n % 3) as usize];
    let agent = matches!(state, CallState::Ringing | CallState::Talking)
        .then(|| names.agents[(n % names.agents.len() as u64) as usize].clone());
    CallSnapshot {
        recording: Some(format!("https://pbx.example/recordings/20261123-{id}.wav")),
        id: CallId::new(&id),
        direction: if n % 5 == 0 { Direction::Outbound } else { Direction::Inbound },
        state,
        caller: Party {
            number: Some(format!("119876{:05}", n % 100_000).into()),
            name: Some(format!("Cliente {n:05}").into()),
        },
        callee: Party { number: Some("1130001000".into()), name: None },
        group: Some(group.clone()),
        queue: Some((*queue).into()),
        agent,
        ticket_id: (n % 3 == 0).then(|| format!("{}", 40_000 + n % 10_000).into()),
        started_at,
        answered_at: (state == CallState::Talking).then_some(started_at + 7 * S),
        ended_at: None,
        routing: None,
        caller_lookup: None,
    }
}

fn state_for(n: u64) -> CallState {
    match n % 20 {
        0..=1 => CallState::Started,
        2..=5 => CallState::Queued,
        6..=8 => CallState::Ringing,
        _ => CallState::Talking,
    }
}

fn kind_for(state: CallState, names: &Names, n: u64) -> EventKind {
    match state {
        CallState::Started | CallState::Ended => EventKind::Started {},
        CallState::Queued => EventKind::Queued { group: None, queue: "700".into(), position: Some(1) },
        CallState::Ringing => EventKind::Offered {
            agent: names.agents[(n % names.agents.len() as u64) as usize].clone(),
            extension: "2000".into(),
        },
        CallState::Talking => EventKind::Answered { agent: None, wait_seconds: 7 },
    }
}

fn ended_kind() -> EventKind {
    EventKind::Ended {
        duration_seconds: 120,
        talk_seconds: 100,
        wait_seconds: 20,
        hangup_cause: Some(16),
        hangup_cause_text: Some("Normal Clearing".into()),
        hung_up_by: HungUpBy::Caller,
        end_reason: EndReason::Normal,
    }
}

fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The sweeper's pass (SPEC §7): every live call, its state against the
/// state's limit, its silence against the silence limit; suspects copied out.
fn sweep(registry: &Registry, now: Micros) -> Vec<CallId> {
    const SILENCE: Micros = 2 * 3600 * S;
    registry.scan_live(|c| {
        let limit = match c.snapshot.state {
            CallState::Started => 600 * S,
            CallState::Queued => 3600 * S,
            CallState::Ringing => 300 * S,
            CallState::Talking => 4 * 3600 * S,
            CallState::Ended => Micros::MAX,
        };
        let suspect = now - c.state_since >= limit || now - c.last_event_at >= SILENCE;
        (suspect && c.stuck_since.is_none()).then(|| c.snapshot.id.clone())
    })
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is ignored too.
    let names = Arc::new(Names::new());
    let registry = Arc::new(Registry::new(&RegistryConfig::default()));

    let rss_before = rss_kib("VmRSS:").unwrap_or(0);
    let fill_start = Instant::now();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for n in 0..LIVE_CALLS as u64 {
        let state = state_for(n);
        // Most calls started in the last 4 minutes; 1 in 100 hangs around
        // for up to 3 h (the sweeper's suspects).
        let age = if n % 100 == 0 { rng.below(3 * 3600) } else { rng.below(240) };
        let started_at = NOW - (age as Micros) * S;
        let event = Event {
            seq: 1,
            time: started_at,
            kind: kind_for(state, &names, n),
            call: Some(snapshot(&names, n, state, started_at).into()),
        };
        registry.apply(&event);
    }
    let fill = fill_start.elapsed();
    let rss_after = rss_kib("VmRSS:").unwrap_or(0);
    assert_eq!(registry.live_count(), LIVE_CALLS);
    let grown_mb = (rss_after.saturating_sub(rss_before)) as f64 / 1024.0;
    let total_mb = rss_after as f64 / 1024.0;
    let per_call = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / LIVE_CALLS as f64;

    // One sweep with nothing else running, for reference.
    let quiet: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(sweep(&registry, NOW));
            millis(t.elapsed())
        })
        .collect();
    let suspects = sweep(&registry, NOW).len();

    // Load: 1 writer (state changes, ends and new calls: the live count
    // stays at 100,000), 2 readers (`get` and `live_calls`).
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let writer = {
        let (registry, names, stop, writes) = (registry.clone(), names.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0xD1B5_4A32_D192_ED03);
            // slot → (call number, seq, state)
            let mut slots: Vec<(u64, u64, CallState)> = (0..LIVE_CALLS as u64).map(|n| (n, 1, state_for(n))).collect();
            let mut next_call = LIVE_CALLS as u64;
            let mut time = NOW;
            while !stop.load(Ordering::Relaxed) {
                time += 1_000;
                let slot = rng.below(LIVE_CALLS);
                let (n, seq, state) = slots[slot];
                let next = match state {
                    CallState::Started => Some(CallState::Queued),
                    CallState::Queued => Some(CallState::Ringing),
                    CallState::Ringing => Some(CallState::Talking),
                    CallState::Talking | CallState::Ended => None,
                };
                match next {
                    Some(state) => {
                        let event = Event {
                            seq: seq + 1,
                            time,
                            kind: kind_for(state, &names, n),
                            call: Some(snapshot(&names, n, state, time - 60 * S).into()),
                        };
                        registry.apply(&event);
                        slots[slot] = (n, seq + 1, state);
                    }
                    None => {
                        let mut last = snapshot(&names, n, CallState::Ended, time - 600 * S);
                        last.ended_at = Some(time);
                        registry.apply(&Event { seq: seq + 1, time, kind: ended_kind(), call: Some(last.into()) });
                        let n = next_call;
                        next_call += 1;
                        let event = Event {
                            seq: 1,
                            time,
                            kind: EventKind::Started {},
                            call: Some(snapshot(&names, n, CallState::Started, time).into()),
                        };
                        registry.apply(&event);
                        slots[slot] = (n, 1, CallState::Started);
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                }
                writes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let (registry, stop, reads) = (registry.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0xA076_1D64_78BD_642F ^ (r + 1));
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..200 {
                        let n = rng.below(LIVE_CALLS + 20_000) as u64;
                        std::hint::black_box(registry.get(&call_id(n)));
                    }
                    let agent = format!("agent{:02}", rng.below(60));
                    std::hint::black_box(registry.live_calls(&LiveFilter::all().agent(&agent)));
                    if round % 10 == 0 {
                        let filter = LiveFilter::all().group("support").state(CallState::Queued);
                        std::hint::black_box(registry.live_calls(&filter));
                    }
                    round += 1;
                    reads.fetch_add(201 + u64::from(round % 10 == 1), Ordering::Relaxed);
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(300));
    let load_start = Instant::now();
    let (writes0, reads0) = (writes.load(Ordering::Relaxed), reads.load(Ordering::Relaxed));
    let mut loaded: Vec<f64> = Vec::with_capacity(SCANS);
    for _ in 0..SCANS {
        let t = Instant::now();
        std::hint::black_box(sweep(&registry, NOW + 60 * S));
        loaded.push(millis(t.elapsed()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let load_secs = load_start.elapsed().as_secs_f64();
    let writes_per_s = (writes.load(Ordering::Relaxed) - writes0) as f64 / load_secs;
    let reads_per_s = (reads.load(Ordering::Relaxed) - reads0) as f64 / load_secs;
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    for r in readers {
        r.join().expect("reader thread");
    }
    let rss_end = rss_kib("VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let hwm = rss_kib("VmHWM:").unwrap_or(0) as f64 / 1024.0;

    loaded.sort_by(f64::total_cmp);
    let mut quiet_sorted = quiet.clone();
    quiet_sorted.sort_by(f64::total_cmp);
    let scan_max = loaded[loaded.len() - 1];

    println!("registry: {LIVE_CALLS} live calls filled in {:.0} ms", millis(fill));
    println!(
        "registry memory: RSS {:.1} MB before, {total_mb:.1} MB after (+{grown_mb:.1} MB, {per_call:.0} B per live call); target < {RSS_TARGET_MB:.0} MB",
        rss_before as f64 / 1024.0
    );
    println!(
        "registry sweep, idle: median {:.2} ms over {LIVE_CALLS} live calls ({suspects} suspects)",
        percentile(&quiet_sorted, 0.5)
    );
    println!(
        "registry sweep under load ({SCANS} sweeps; 1 writer at {writes_per_s:.0} events/s, 2 readers at {reads_per_s:.0} lookups/s): median {:.2} ms, p95 {:.2} ms, max {scan_max:.2} ms; target < {SCAN_TARGET_MS:.0} ms",
        percentile(&loaded, 0.5),
        percentile(&loaded, 0.95),
    );
    println!(
        "registry after load: {} live, {} ended, RSS {rss_end:.1} MB (peak {hwm:.1} MB)",
        registry.live_count(),
        registry.ended_count()
    );

    let mut failed = false;
    if total_mb >= RSS_TARGET_MB {
        eprintln!("FAIL: RSS {total_mb:.1} MB >= {RSS_TARGET_MB} MB");
        failed = true;
    }
    if scan_max >= SCAN_TARGET_MS {
        eprintln!("FAIL: slowest sweep {scan_max:.2} ms >= {SCAN_TARGET_MS} ms");
        failed = true;
    }
    if failed {
        std::process::exit(1);
    }
}
