//! Reconciling with the PBX when the event stream cannot be trusted alone:
//! the resync after a (re)connection (a `CoreShowChannels` listing: calls
//! that vanished end as `lost`, calls already up are adopted) and the
//! stuck-call sweeper (SPEC §7: calls that overstayed a state or went
//! silent, for the caller to check with the PBX and then report
//! `call.stuck` or end as `lost`).
//!
//! Like the rest of the normalizer, pure: the caller asks the PBX and hands
//! the answers in, with the clock.

use super::call::{Call, FirstChannel};
use super::headers::{CHANNEL, DURATION, LINKEDID, UNIQUEID};
use super::Normalizer;
use crate::ami::Frame;
use crate::event::{seconds_between, CallId, CallState, EndReason, Event, Micros};
use std::collections::HashSet;

/// Per-state limits of the stuck-call sweeper (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StuckLimits {
    /// Not yet queued nor ringing (IVR, dialling).
    pub started_seconds: u64,
    pub queued_seconds: u64,
    pub ringing_seconds: u64,
    pub talking_seconds: u64,
    /// No event at all for this long.
    pub silence_seconds: u64,
}

impl StuckLimits {
    pub fn for_state(&self, s: CallState) -> u64 {
        match s {
            CallState::Started => self.started_seconds,
            CallState::Queued => self.queued_seconds,
            CallState::Ringing => self.ringing_seconds,
            CallState::Talking => self.talking_seconds,
            CallState::Ended => u64::MAX,
        }
    }
}

/// Why a call is suspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StuckCause {
    /// Longer in its state than the state's limit.
    State,
    /// No event for longer than the silence limit.
    Silence,
}

impl StuckCause {
    pub fn as_str(self) -> &'static str {
        match self {
            StuckCause::State => "state_limit",
            StuckCause::Silence => "silence",
        }
    }
}

/// A call the sweeper should check with the PBX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspect {
    pub call: CallId,
    pub state: CallState,
    pub seconds_in_state: u64,
    pub silent_seconds: u64,
    pub cause: StuckCause,
    pub already_reported: bool,
}

/// What a PBX resync says exists (from `CoreShowChannels`).
#[derive(Debug, Clone, Default)]
pub struct PbxChannels {
    pub channels: Vec<Frame>,
}

impl Normalizer {
    /// A (re)connection to the PBX starts: the resync listing that follows
    /// describes the PBX as of now, so calls with events after this point
    /// are newer than the listing.
    pub fn begin_resync(&mut self) {
        self.epoch += 1;
    }

    /// Reconciles with what the PBX reports after a (re)connection: live
    /// calls none of whose channels exist any more end as `lost`; channels
    /// of unknown calls are adopted (the call starts now, with what the
    /// listing tells). Calls with events since [`Normalizer::begin_resync`]
    /// are newer than the listing and are left alone.
    pub fn resync(&mut self, pbx: &PbxChannels, now: Micros, out: &mut Vec<Event>) {
        let alive: HashSet<&str> = pbx.channels.iter().filter_map(|f| f.get(UNIQUEID)).collect();
        let mut vanished: Vec<CallId> = Vec::new();
        let mut reconciled: Vec<CallId> = Vec::new();
        let epoch = self.epoch;
        for (id, call) in self.calls.iter_mut() {
            if call.epoch == epoch && epoch > 0 {
                continue;
            }
            call.forget_channels_not_in(&alive);
            if call.live_channel_count() == 0 {
                vanished.push(id.clone());
            } else {
                reconciled.push(id.clone());
            }
        }
        vanished.sort();
        reconciled.sort();
        for id in &vanished {
            self.finish(id.as_str(), now, EndReason::Lost, out);
        }
        // Calls that go on: offers whose phones are gone ended unseen.
        for id in &reconciled {
            if let Some(call) = self.calls.get_mut(id.as_str()) {
                call.close_offers_without_channels(now, out);
            }
            self.touch(id.as_str());
        }
        let reconciled: HashSet<CallId> = reconciled.into_iter().collect();
        // Adopt, originating channels first so that each call starts from
        // its first channel when the listing has it.
        let mut items: Vec<&Frame> = pbx.channels.iter().collect();
        items.sort_by_key(|f| f.get(UNIQUEID) != f.get(LINKEDID));
        for f in items {
            let (Some(uid), Some(linkedid)) = (f.get(UNIQUEID), f.get(LINKEDID)) else {
                continue;
            };
            if let Some(owner) = self.channel_call.get(uid) {
                // A channel of a call being reconciled: what it does now
                // (answered, ringing) may have changed while nobody looked.
                if let Some(call) = reconciled.get(owner).and_then(|o| self.calls.get_mut(o.as_str())) {
                    call.adopt_listed_channel(true, f, uid, now, &self.dir, out);
                }
                continue;
            }
            if self.gone_channels.contains(uid) || self.ended.contains(linkedid) {
                continue;
            }
            let channel = f.get(CHANNEL).unwrap_or("");
            let started = f.get(DURATION).and_then(parse_duration).map_or(now, |secs| now - secs * 1_000_000);
            let call = match self.calls.get_mut(linkedid) {
                Some(call) => call,
                None => {
                    let after_seq = self.seq_floors.remove(linkedid).unwrap_or(0);
                    let first = FirstChannel {
                        id: CallId::new(linkedid),
                        frame: f,
                        channel,
                        uniqueid: uid,
                        time: started,
                        after_seq,
                    };
                    let call = Call::start(first, &self.dir, &self.opts, out);
                    self.calls.entry(call.id.clone()).or_insert(Box::new(call))
                }
            };
            call.adopt_listed_channel(false, f, uid, now, &self.dir, out);
            let id = call.id.clone();
            self.touch(id.as_str());
            self.channel_call.insert(uid.into(), id);
        }
    }

    /// Live calls that overstayed a state limit or went silent: the
    /// sweeper checks each with the PBX, then calls [`Normalizer::mark_stuck`]
    /// (still there) or [`Normalizer::end_call`] with `Lost` (gone).
    /// Sorted by call id, so the result is deterministic.
    pub fn suspects(&self, now: Micros, limits: &StuckLimits) -> Vec<Suspect> {
        let mut v: Vec<Suspect> = self
            .calls
            .values()
            .filter_map(|c| {
                let state = c.state();
                let in_state = seconds_between(c.state_since, now);
                let silent = seconds_between(c.last_event_at, now);
                let limit = limits.for_state(state);
                // Exact comparison: the rounded seconds reported would fire
                // up to half a second early.
                let by = if reached(c.state_since, now, limit) {
                    Some(StuckCause::State)
                } else if reached(c.last_event_at, now, limits.silence_seconds) {
                    Some(StuckCause::Silence)
                } else {
                    None
                };
                by.map(|cause| Suspect {
                    call: c.id.clone(),
                    state,
                    seconds_in_state: in_state,
                    silent_seconds: silent,
                    cause,
                    already_reported: c.stuck_reported(),
                })
            })
            .collect();
        v.sort_by(|a, b| a.call.cmp(&b.call));
        v
    }

    /// Emits `call.stuck` for a live call (once per call).
    pub fn mark_stuck(&mut self, id: &str, detected_by: &str, now: Micros, out: &mut Vec<Event>) -> bool {
        let marked = match self.calls.get_mut(id) {
            Some(call) => call.mark_stuck(detected_by, now, out),
            None => false,
        };
        if marked {
            self.touch(id);
        }
        marked
    }
}

/// Whether `limit_seconds` have passed from `since` to `now` (µs).
fn reached(since: Micros, now: Micros, limit_seconds: u64) -> bool {
    let limit = i64::try_from(limit_seconds).unwrap_or(i64::MAX).saturating_mul(1_000_000);
    now.saturating_sub(since) >= limit
}

/// `CoreShowChannel`'s `Duration` is `HH:MM:SS` (or seconds).
fn parse_duration(s: &str) -> Option<i64> {
    let mut total: i64 = 0;
    for part in s.split(':') {
        total = total.checked_mul(60)?.checked_add(part.trim().parse::<i64>().ok()?)?;
    }
    Some(total)
}
