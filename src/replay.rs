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

// Reads trace files: no indexing or slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

use crate::ami::codec::{decode_reader, AmiCodec, AmiMessage, CodecLimits};
use crate::event::{AgentIds, CallId, EndReason, Event, EventKind, Micros, MissedReason};
use crate::normalize::Normalizer;
use crate::reconnect::TraceItem;
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};
use tracing::warn;

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

/// Most calls a replay keeps live at once, unless `--max-live-calls` says
/// otherwise. A real PBX has at most a few thousand calls at once, so a
/// trace never reaches this unless hangups are missing from it (a cut or
/// corrupted trace, a synthetic one); each live call costs the normalizer
/// about 4 KB, so the bound keeps a replay under about 400 MB of call
/// state whatever the trace.
pub const DEFAULT_MAX_LIVE_CALLS: usize = 100_000;

/// How a replay runs.
#[derive(Debug, Clone, Copy)]
pub struct ReplaySettings {
    pub speed: Speed,
    pub limits: CodecLimits,
    /// Most calls live at once: past it, the calls silent the longest are
    /// ended `lost` (with a warning now and then, not one per call).
    pub max_live_calls: usize,
}

impl ReplaySettings {
    /// At `speed` with the codec's `limits` and the default bound on live
    /// calls.
    pub fn new(speed: Speed, limits: CodecLimits) -> ReplaySettings {
        ReplaySettings { speed, limits, max_live_calls: DEFAULT_MAX_LIVE_CALLS }
    }
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
    /// Calls ended `lost` because more than `max_live_calls` were live.
    pub calls_over_limit: u64,
    pub elapsed: Duration,
}

/// What a replay carries from one trace file to the next besides the
/// normalizer: the counters, the agent event ids, and which live calls
/// were answered (each answered call counted once; forgotten when it
/// ends, so this is bounded by the live calls).
#[derive(Debug, Default)]
pub struct ReplayState {
    pub stats: ReplayStats,
    agent_ids: AgentIds,
    answered: HashSet<CallId>,
    /// `calls_over_limit` when the last warning was logged.
    warned_at: u64,
    /// Warnings logged about the bound.
    warnings: u64,
}

impl ReplayState {
    fn count(&mut self, e: &Event) {
        let stats = &mut self.stats;
        stats.events += 1;
        match &e.kind {
            EventKind::Started {} => stats.calls_started += 1,
            EventKind::Ended { .. } => {
                stats.calls_ended += 1;
                if let Some(c) = &e.call {
                    self.answered.remove(&c.id);
                }
            }
            EventKind::Answered { .. } => {
                if let Some(c) = &e.call {
                    if self.answered.insert(c.id.clone()) {
                        stats.answered_calls += 1;
                    }
                }
            }
            EventKind::Missed { reason, .. } => *stats.missed.entry(MissedReason::as_str(*reason)).or_default() += 1,
            _ => {}
        }
    }

    /// Stamps, counts and hands over the events in `out`.
    pub(crate) fn emit(&mut self, out: &mut Vec<Event>, sink: &mut impl FnMut(&Event)) {
        for mut e in out.drain(..) {
            self.agent_ids.stamp(&mut e);
            self.count(&e);
            sink(&e);
        }
    }

    /// Past `max` live calls: ends the calls silent the longest as `lost`,
    /// down to `max` less a 1% margin (so that the O(live calls) search
    /// runs once per many new calls, not for each). Warns on the first,
    /// then once per `max` calls ended this way.
    pub(crate) fn bound_live_calls(
        &mut self,
        normalizer: &mut Normalizer,
        max: usize,
        now: Micros,
        out: &mut Vec<Event>,
    ) {
        let live = normalizer.live_calls();
        if live <= max {
            return;
        }
        let excess = live - max + max / 100;
        for id in normalizer.oldest_live_calls(excess) {
            if normalizer.end_call(id.as_str(), EndReason::Lost, now, out) {
                self.stats.calls_over_limit += 1;
            }
        }
        let ended = self.stats.calls_over_limit;
        if self.warnings == 0 || ended - self.warned_at >= max as u64 {
            self.warned_at = ended;
            self.warnings += 1;
            warn!(
                max_live_calls = max,
                ended_lost = ended,
                "replay: more calls live at once than --max-live-calls; the calls silent the longest were ended as lost \
                 (hangups missing from the trace?)"
            );
        }
    }
}

impl ReplayStats {
    /// One human line: `12 calls: 9 answered, 3 missed (abandoned 3)`.
    pub fn summary(&self) -> String {
        let missed: u64 = self.missed.values().sum();
        let reasons: Vec<String> = self.missed.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        format!(
            "{} calls: {} answered, {} missed{}; {} ended{}, {} still live; {} frames ({} malformed), {} events in {:.3} s ({:.0} frames/s)",
            self.calls_started,
            self.answered_calls,
            missed,
            if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) },
            self.calls_ended,
            if self.calls_over_limit == 0 {
                String::new()
            } else {
                format!(" ({} as lost past --max-live-calls)", self.calls_over_limit)
            },
            self.calls_started.saturating_sub(self.calls_ended),
            self.frames,
            self.malformed,
            self.events,
            secs,
            self.frames as f64 / secs,
        )
    }
}

/// Replays one trace read from `reader` through `normalizer` as it is
/// read (memory does not grow with the trace), handing every event to
/// `sink`. Frames without a `Timestamp` take the latest one seen.
pub fn replay_reader(
    reader: impl Read,
    normalizer: &mut Normalizer,
    settings: ReplaySettings,
    state: &mut ReplayState,
    sink: &mut impl FnMut(&Event),
) -> std::io::Result<()> {
    let mut codec = AmiCodec::new(settings.limits);
    let mut out: Vec<Event> = Vec::with_capacity(16);
    let mut trace = crate::reconnect::TraceReader::new();
    let mut items: Vec<TraceItem> = Vec::new();
    let mut clock = Clock { speed: settings.speed, started: Instant::now(), first_ts: None, last_ts: 0 };
    let max = settings.max_live_calls;
    let read = decode_reader(&mut codec, reader, |m| {
        if matches!(m, AmiMessage::Malformed(_)) {
            state.stats.malformed += 1;
        }
        trace.read(m, |item| items.push(item));
        for item in items.drain(..) {
            state.stats.frames += u64::from(matches!(item, TraceItem::Frame(_)));
            clock.apply(item, normalizer, &mut out);
            state.emit(&mut out, sink);
            state.bound_live_calls(normalizer, max, clock.last_ts, &mut out);
            state.emit(&mut out, sink);
        }
    });
    trace.finish(|item| items.push(item));
    for item in items.drain(..) {
        clock.apply(item, normalizer, &mut out);
        state.emit(&mut out, sink);
        state.bound_live_calls(normalizer, max, clock.last_ts, &mut out);
        state.emit(&mut out, sink);
    }
    // Bytes decoded, also when reading failed part way.
    state.stats.bytes += match &read {
        Ok(n) => *n,
        Err(_) => 0,
    };
    read.map(|_| ())
}

/// A replay's pacing and PBX clock (also `callbridge explain`'s, which
/// applies a trace's items one by one as a replay does).
pub(crate) struct Clock {
    speed: Speed,
    started: Instant,
    first_ts: Option<Micros>,
    /// The latest PBX time seen (the clock of frames without a `Timestamp`).
    last_ts: Micros,
}

impl Clock {
    /// A clock for a replay starting now at `speed`.
    pub(crate) fn new(speed: Speed) -> Clock {
        Clock { speed, started: Instant::now(), first_ts: None, last_ts: 0 }
    }

    /// The latest PBX time seen (the clock of frames without a `Timestamp`).
    pub(crate) fn now(&self) -> Micros {
        self.last_ts
    }

    /// Paces and applies one trace item: a frame, or what the live daemon
    /// did at the same point of the recording (a reconnection, a resync).
    pub(crate) fn apply(&mut self, item: TraceItem, normalizer: &mut Normalizer, out: &mut Vec<Event>) {
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

/// [`replay_reader`] over a trace in memory.
pub fn replay_bytes(
    data: &[u8],
    normalizer: &mut Normalizer,
    settings: ReplaySettings,
    state: &mut ReplayState,
    mut sink: impl FnMut(&Event),
) {
    // Reading from memory cannot fail.
    let _ = replay_reader(data, normalizer, settings, state, &mut sink);
}

/// Replays trace files in order, each read as it is replayed.
pub fn replay_files(
    paths: &[impl AsRef<Path>],
    normalizer: &mut Normalizer,
    settings: ReplaySettings,
    mut sink: impl FnMut(&Event),
) -> std::io::Result<ReplayStats> {
    let mut state = ReplayState::default();
    let t0 = Instant::now();
    for p in paths {
        let p = p.as_ref();
        let named =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot read trace {}: {e}", p.display()));
        let file = std::fs::File::open(p).map_err(named)?;
        replay_reader(file, normalizer, settings, &mut state, &mut sink).map_err(named)?;
    }
    state.stats.elapsed = t0.elapsed();
    Ok(state.stats)
}

/// Every event of replaying `traces` at full speed with `config`: the
/// helper behind the golden tests and the invariant checks.
pub fn events_of(config: &crate::config::Config, traces: &[impl AsRef<Path>]) -> std::io::Result<Vec<Event>> {
    let mut n = crate::settings::normalizer(config);
    let mut events = Vec::new();
    let settings = ReplaySettings::new(Speed::Max, CodecLimits::default());
    replay_files(traces, &mut n, settings, |e| events.push(e.clone()))?;
    Ok(events)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
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

    /// A trace of `calls` calls that never hang up: one `Newchannel` each,
    /// a second apart, Linkedids `100.<n>`.
    pub(crate) fn endless_calls(calls: usize) -> Vec<u8> {
        let mut t = b"Asterisk Call Manager/9.0.0\r\n".to_vec();
        for n in 0..calls {
            t.extend_from_slice(
                format!(
                    "Event: Newchannel\r\nTimestamp: {}.000000\r\nChannel: SIP/carrier-{n:08}\r\nChannelState: 4\r\n\
                     CallerIDNum: 1198765{n:04}\r\nExten: 1130001000\r\nUniqueid: 100.{n}\r\nLinkedid: 100.{n}\r\n\r\n",
                    1_800_000_000 + n
                )
                .as_bytes(),
            );
        }
        t
    }

    fn lab_normalizer() -> Normalizer {
        let text = include_str!("../config/lab.toml");
        crate::settings::normalizer(&crate::config::Config::parse(text, "lab.toml").unwrap())
    }

    #[test]
    fn live_calls_stay_bounded_and_the_oldest_end_lost() {
        let (calls, max) = (5_000, 1_000);
        let mut n = lab_normalizer();
        let settings =
            ReplaySettings { max_live_calls: max, ..ReplaySettings::new(Speed::Max, CodecLimits::default()) };
        let mut state = ReplayState::default();
        let (mut live, mut most) = (0i64, 0i64);
        let mut lost = Vec::new();
        replay_bytes(&endless_calls(calls), &mut n, settings, &mut state, |e| match &e.kind {
            EventKind::Started {} => {
                live += 1;
                most = most.max(live);
            }
            EventKind::Ended { end_reason, .. } => {
                live -= 1;
                assert_eq!(*end_reason, EndReason::Lost);
                lost.push(e.call.as_ref().unwrap().id.to_string());
            }
            _ => {}
        });
        // At most one call over the bound, and only until that frame is done.
        assert!(most <= max as i64 + 1, "{most} live at once");
        assert!(n.live_calls() <= max, "{} live", n.live_calls());
        assert_eq!(state.stats.calls_over_limit as usize, lost.len());
        assert_eq!(lost.len(), calls - n.live_calls());
        // The oldest went first, in order.
        let expect: Vec<String> = (0..lost.len()).map(|k| format!("100.{k}")).collect();
        assert_eq!(lost, expect);
        // Each ended call is missed, then ended: the lifecycle holds.
        assert_eq!(state.stats.missed.values().sum::<u64>() as usize, lost.len());
        // Warned once per `max` calls ended, not once per call.
        assert!(state.warnings >= 1 && state.warnings <= 1 + lost.len() as u64 / max as u64, "{}", state.warnings);
        assert!(state.stats.summary().contains("as lost past --max-live-calls"), "{}", state.stats.summary());
    }

    #[test]
    fn under_the_bound_nothing_is_ended() {
        let mut n = lab_normalizer();
        let mut state = ReplayState::default();
        let settings =
            ReplaySettings { max_live_calls: 300, ..ReplaySettings::new(Speed::Max, CodecLimits::default()) };
        replay_bytes(&endless_calls(300), &mut n, settings, &mut state, |_| {});
        assert_eq!((n.live_calls(), state.stats.calls_over_limit, state.warnings), (300, 0, 0));
        assert!(!state.stats.summary().contains("max-live-calls"));
    }

    #[test]
    fn a_file_replays_the_same_as_its_bytes() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ami/a11-concurrent-mix.ami");
        let settings = ReplaySettings::new(Speed::Max, CodecLimits::default());
        let mut from_file = Vec::new();
        let stats = replay_files(&[&path], &mut lab_normalizer(), settings, |e| from_file.push(e.clone())).unwrap();
        let mut from_bytes = Vec::new();
        let mut state = ReplayState::default();
        let data = std::fs::read(&path).unwrap();
        replay_bytes(&data, &mut lab_normalizer(), settings, &mut state, |e| from_bytes.push(e.clone()));
        assert_eq!(from_file, from_bytes);
        assert_eq!(stats.bytes, data.len() as u64);
        assert_eq!(stats.calls_ended, 12);
    }
}
