//! Replays recorded AMI traces through the normalizer.
//!
//! A trace is the raw byte stream an AMI client received (banner included).
//! Replay decodes it with the very codec the live connection uses and feeds
//! the very same normalizer; only the byte source and the clock differ.
//! Pacing follows the frames' `Timestamp` headers: `max` does not wait,
//! `realtime` waits as long as the PBX did, `N` runs N times faster. Each
//! trace file is paced on its own (the gap between two files is not waited).
//!
//! This module must never reach the network.

use crate::ami::codec::{decode_all, AmiCodec, AmiMessage, CodecLimits};
use crate::event::{AgentIds, Event, EventKind, Micros, MissedReason};
use crate::normalize::Normalizer;
use crate::reconnect::TraceItem;
use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// How fast a trace is replayed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    Max,
    /// 1.0 = real time, 50.0 = fifty times faster.
    Factor(f64),
}

/// The slowest factor accepted: a million times slower than real time.
/// Slower factors would turn a trace's span into delays `Duration` cannot
/// hold.
pub const MIN_SPEED_FACTOR: f64 = 1e-6;

impl FromStr for Speed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "max" => Ok(Speed::Max),
            "realtime" => Ok(Speed::Factor(1.0)),
            n => match n.parse::<f64>() {
                Ok(f) if f.is_finite() && f >= MIN_SPEED_FACTOR => Ok(Speed::Factor(f)),
                _ => Err(format!(
                    "speed must be max, realtime or a finite speed-up factor of at least {MIN_SPEED_FACTOR} \
                     (e.g. 50, or 0.5 for half speed), not {n:?}"
                )),
            },
        }
    }
}

/// How long after a trace's first frame a frame `since_first` microseconds
/// later is due at speed `factor`. Never panics: a negative span is no
/// delay, and a delay too long for `Duration` (or a nonsensical factor) is
/// `Duration::MAX`.
pub fn pacing_delay(since_first: Micros, factor: f64) -> Duration {
    let secs = (since_first.max(0) as f64 / 1e6) / factor;
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// Counters of one replay.
#[derive(Debug, Default, Clone)]
pub struct ReplayStats {
    pub bytes: u64,
    pub frames: u64,
    pub malformed: u64,
    pub events: u64,
    pub calls_started: u64,
    pub calls_ended: u64,
    pub answered_calls: u64,
    pub missed: BTreeMap<&'static str, u64>,
    pub elapsed: Duration,
}

impl ReplayStats {
    fn count(&mut self, e: &Event, answered_seen: &mut std::collections::HashSet<String>) {
        self.events += 1;
        match &e.kind {
            EventKind::Started {} => self.calls_started += 1,
            EventKind::Ended { .. } => self.calls_ended += 1,
            EventKind::Answered { .. } => {
                if let Some(c) = &e.call {
                    if answered_seen.insert(c.id.to_string()) {
                        self.answered_calls += 1;
                    }
                }
            }
            EventKind::Missed { reason, .. } => *self.missed.entry(MissedReason::as_str(*reason)).or_default() += 1,
            _ => {}
        }
    }

    /// One human line: `12 calls: 9 answered, 3 missed (abandoned 3)`.
    pub fn summary(&self) -> String {
        let missed: u64 = self.missed.values().sum();
        let reasons: Vec<String> = self.missed.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "{} calls: {} answered, {} missed{}; {} ended, {} still live; {} frames ({} malformed), {} events in {:.3} s ({:.0} frames/s)",
            self.calls_started,
            self.answered_calls,
            missed,
            if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) },
            self.calls_ended,
            self.calls_started.saturating_sub(self.calls_ended),
            self.frames,
            self.malformed,
            self.events,
            secs,
            self.frames as f64 / secs,
        )
    }
}

/// Replays `data` (one trace) through `normalizer`, handing every event to
/// `sink`. `now` is the clock for frames without a `Timestamp`.
pub fn replay_bytes(
    data: &[u8],
    normalizer: &mut Normalizer,
    speed: Speed,
    limits: CodecLimits,
    stats: &mut ReplayStats,
    agent_ids: &mut AgentIds,
    mut sink: impl FnMut(&Event),
) {
    let mut codec = AmiCodec::new(limits);
    let mut out: Vec<Event> = Vec::with_capacity(16);
    let mut answered = std::collections::HashSet::new();
    stats.bytes += data.len() as u64;
    let mut reader = crate::reconnect::TraceReader::new();
    let mut items: Vec<TraceItem> = Vec::new();
    let mut clock = Clock { speed, started: Instant::now(), first_ts: None, last_ts: 0 };
    decode_all(&mut codec, data, |m| {
        if matches!(m, AmiMessage::Malformed(_)) {
            stats.malformed += 1;
        }
        reader.read(m, |item| items.push(item));
        for item in items.drain(..) {
            stats.frames += u64::from(matches!(item, TraceItem::Frame(_)));
            clock.apply(item, normalizer, &mut out);
        }
        for mut e in out.drain(..) {
            agent_ids.stamp(&mut e);
            stats.count(&e, &mut answered);
            sink(&e);
        }
    });
    reader.finish(|item| items.push(item));
    for item in items.drain(..) {
        clock.apply(item, normalizer, &mut out);
    }
    for mut e in out.drain(..) {
        agent_ids.stamp(&mut e);
        stats.count(&e, &mut answered);
        sink(&e);
    }
}

/// A replay's pacing and PBX clock.
struct Clock {
    speed: Speed,
    started: Instant,
    first_ts: Option<Micros>,
    /// The latest PBX time seen (the clock of frames without a `Timestamp`).
    last_ts: Micros,
}

impl Clock {
    /// Paces and applies one trace item: a frame, or what the live daemon
    /// did at the same point of the recording (a reconnection, a resync).
    fn apply(&mut self, item: TraceItem, normalizer: &mut Normalizer, out: &mut Vec<Event>) {
        match item {
            TraceItem::Frame(f) => {
                let ts = f.timestamp_micros();
                if let (Speed::Factor(k), Some(ts)) = (self.speed, ts) {
                    let base = *self.first_ts.get_or_insert(ts);
                    let due = pacing_delay(ts.saturating_sub(base), k);
                    let elapsed = self.started.elapsed();
                    if due > elapsed {
                        std::thread::sleep(due - elapsed);
                    }
                }
                if let Some(ts) = ts {
                    self.last_ts = self.last_ts.max(ts);
                }
                normalizer.handle(&f, self.last_ts, out);
            }
            TraceItem::Reconnected => normalizer.begin_resync(),
            // Dated as the live daemon dated it; the frames' clock goes on
            // from their own timestamps.
            TraceItem::Resync { channels, queue_items, at } => {
                normalizer.resync(&crate::normalize::PbxChannels { channels }, at, out);
                normalizer.resync_members(&queue_items, at, out);
            }
        }
    }
}

/// Replays trace files in order.
pub fn replay_files(
    paths: &[impl AsRef<Path>],
    normalizer: &mut Normalizer,
    speed: Speed,
    limits: CodecLimits,
    mut sink: impl FnMut(&Event),
) -> std::io::Result<ReplayStats> {
    let mut stats = ReplayStats::default();
    let mut agent_ids = AgentIds::default();
    let t0 = Instant::now();
    for p in paths {
        let p = p.as_ref();
        let data = std::fs::read(p)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot read trace {}: {e}", p.display())))?;
        replay_bytes(&data, normalizer, speed, limits, &mut stats, &mut agent_ids, &mut sink);
    }
    stats.elapsed = t0.elapsed();
    Ok(stats)
}

/// Every event of replaying `traces` at full speed with `config`: the
/// helper behind the golden tests and the invariant checks.
pub fn events_of(config: &crate::config::Config, traces: &[impl AsRef<Path>]) -> std::io::Result<Vec<Event>> {
    let mut n = crate::settings::normalizer(config);
    let mut events = Vec::new();
    replay_files(traces, &mut n, Speed::Max, CodecLimits::default(), |e| events.push(e.clone()))?;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_never_panics() {
        assert_eq!(pacing_delay(2_000_000, 2.0), Duration::from_secs(1));
        assert_eq!(pacing_delay(-5, 1.0), Duration::ZERO);
        assert_eq!(pacing_delay(i64::MAX, 1e-300), Duration::MAX);
        assert_eq!(pacing_delay(1, 0.0), Duration::MAX);
        assert_eq!(pacing_delay(0, 0.0), Duration::MAX);
        assert_eq!(pacing_delay(1, f64::NAN), Duration::MAX);
        assert_eq!(pacing_delay(1, -1.0), Duration::MAX);
        // The slowest accepted factor on a year-long trace still fits.
        assert!(pacing_delay(365 * 86_400 * 1_000_000, MIN_SPEED_FACTOR) < Duration::MAX);
    }

    #[test]
    fn speeds_that_cannot_pace_are_refused() {
        for bad in ["1e-300", "0", "-1", "NaN", "inf", "1e-7", "fast"] {
            let e = bad.parse::<Speed>().expect_err(bad);
            assert!(e.contains(bad) && e.contains("at least"), "{e}");
        }
        assert_eq!("1e-6".parse::<Speed>(), Ok(Speed::Factor(1e-6)));
        assert_eq!("realtime".parse::<Speed>(), Ok(Speed::Factor(1.0)));
        assert_eq!("max".parse::<Speed>(), Ok(Speed::Max));
    }
}
