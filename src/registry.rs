//! The live call registry: the calls in progress, and the calls that ended
//! within the retention window, as the helpdesk last saw them.
//!
//! It is fed by [`Registry::apply`] with every lifecycle event the
//! normalizer emits (in emission order) and read concurrently by the HTTP
//! API (one call, live calls by group/agent/state), the indicators and the
//! stuck-call sweeper ([`Registry::scan_live`]).
//!
//! # What is stored, and for how long
//!
//! - **Live calls** (`DashMap<CallId, LiveCall>`): the snapshot after the
//!   call's last event (`data.call`), the last `seq` applied, and three PBX
//!   times for the sweeper: when the call entered its current state, when it
//!   last had an event from the PBX, and when it was reported stuck. A call
//!   stays here from its first event until its `call.ended`.
//!   An ordered index of the live calls (`BTreeSet<(started_at, CallId)>`)
//!   lets [`Registry::live_page`] list them page by page in a stable order
//!   without copying or sorting the whole map per request.
//! - **Ended calls** (`DashMap<CallId, EndedCall>`): the final snapshot, kept
//!   for `registry.retention_seconds` (default 4 h) of PBX time after the
//!   call ended, so the helpdesk can recover a ticket the agent forgot to
//!   save (SPEC §1). An ordered index (`BTreeSet<(ended_at, CallId)>`)
//!   makes [`Registry::purge_expired`] touch only what expires. At most
//!   `registry.max_ended_calls` are kept; beyond that the oldest go early
//!   (counted in [`Registry::evicted_early`]).
//!
//! Retention is measured on the PBX clock ([`Micros`], the events' `time`),
//! never on the local clock, so replaying a day-old trace keeps the same
//! calls as the live run did. [`Registry::get`] hides a call once its
//! retention is over even if no purge has run yet.
//!
//! # Memory
//!
//! Only snapshots, and those shared: an event's `Arc<CallSnapshot>` is the
//! one the normalizer made (copy on write), so a live call's snapshot
//! exists once for the normalizer, the registry and the event feed. No
//! per-channel bookkeeping (that lives in the normalizer), no event
//! history. `benches/registry.rs` measured about 690 bytes of resident
//! memory per live call when the registry held its own copy (numbers,
//! caller name, group, queue, agent, ticket, recording URL), map overhead
//! included; the daemon as a whole (`benches/daemon_memory.rs`) takes
//! about 1.25 KB of resident memory per queued call (1.9 KB before the
//! calls' short strings were stored inline and the allocator kept to two
//! arenas). An ended call
//! costs about the same plus the end-time index entry (estimated ~60 bytes),
//! so the default cap of 200,000 ended calls bounds that part at roughly
//! 150 MB.
//!
//! # Concurrency
//!
//! Reads never block each other; a write locks one of the map's shards for
//! the time of one update. Nothing here is async, and every accessor copies
//! out what it returns, so no map guard ever outlives the call that took
//! it: callers cannot hold one across an `.await`. The closure given to
//! [`Registry::scan_live`] runs under a shard's read lock, so it must be
//! short and must not call back into the registry's write methods.
//!
//! Lock order: a `live` shard guard may be held while `by_start` is
//! locked, never the other way round; `by_end` likewise after `ended`.
//!
//! This module must never emit events or call the normalizer, the outbox or
//! the PBX: it is a read model, downstream of the normalizer.

use crate::config::RegistryConfig;
use crate::event::{CallId, CallSnapshot, CallState, Event, EventKind, Micros};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::collections::BTreeSet;
use std::fmt;
use std::ops::Bound;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A call in progress, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveCall {
    /// The call after its last event: the event's own snapshot, shared
    /// with the normalizer until the call changes again (not a copy).
    pub snapshot: Arc<CallSnapshot>,
    /// `seq` of the last event applied.
    pub seq: u64,
    /// PBX time the call entered its current state.
    pub state_since: Micros,
    /// PBX time of the call's last event other than `call.stuck`.
    pub last_event_at: Micros,
    /// PBX time of the `call.stuck` reported for the current state, if any
    /// (cleared when the state changes).
    pub stuck_since: Option<Micros>,
}

#[derive(Debug, Clone)]
struct EndedCall {
    snapshot: Arc<CallSnapshot>,
    seq: u64,
    ended_at: Micros,
}

/// What [`Registry::apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// First event of a call: it is now live.
    Started,
    /// A live call's snapshot was updated.
    Updated,
    /// `call.ended`: the call moved to the ended calls.
    Ended,
    /// The event changed nothing.
    Ignored(Ignored),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// An agent event (no call).
    NotACallEvent,
    /// A `seq` at or below the last one applied (a redelivery or replay).
    Stale,
    /// An event other than `call.ended` for a call that already ended.
    AfterEnd,
}

/// Which live calls [`Registry::live_calls`] returns; `None` fields match
/// everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveFilter<'a> {
    pub group: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub state: Option<CallState>,
}

impl<'a> LiveFilter<'a> {
    pub fn all() -> LiveFilter<'a> {
        LiveFilter::default()
    }

    pub fn group(mut self, group: &'a str) -> LiveFilter<'a> {
        self.group = Some(group);
        self
    }

    pub fn agent(mut self, agent: &'a str) -> LiveFilter<'a> {
        self.agent = Some(agent);
        self
    }

    pub fn state(mut self, state: CallState) -> LiveFilter<'a> {
        self.state = Some(state);
        self
    }

    pub fn matches(&self, call: &CallSnapshot) -> bool {
        if let Some(g) = self.group {
            if call.group.as_ref().map(|cg| cg.as_str()) != Some(g) {
                return false;
            }
        }
        if let Some(a) = self.agent {
            if call.agent.as_ref().map(|ca| ca.as_str()) != Some(a) {
                return false;
            }
        }
        if let Some(s) = self.state {
            if call.state != s {
                return false;
            }
        }
        true
    }
}

/// A position in the order of [`Registry::live_page`]: start time, then id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LiveCursor {
    pub started_at: Micros,
    pub id: CallId,
}

/// One page of live calls.
#[derive(Debug, Clone, PartialEq)]
pub struct LivePage {
    pub calls: Vec<CallSnapshot>,
    /// Where the next page starts, when more matching calls remain.
    pub next: Option<LiveCursor>,
}

/// How many index keys a page walk copies per read lock.
const PAGE_CHUNK: usize = 256;

/// Live calls and recently ended calls. Share it as `Arc<Registry>`.
pub struct Registry {
    /// Boxed: the shards keep spare buckets, and a spare bucket costs the
    /// size of what it holds.
    live: DashMap<CallId, Box<LiveCall>>,
    /// Live calls ordered by `(started_at, id)`: the listing order of
    /// [`Registry::live_page`]. Holds exactly the live calls (a key may
    /// briefly outlive its call while it ends; readers skip it).
    by_start: RwLock<BTreeSet<(Micros, CallId)>>,
    ended: DashMap<CallId, EndedCall>,
    /// Ended calls ordered by end time: what [`Registry::purge_expired`] and
    /// the cap remove first. Holds exactly the keys of `ended`.
    ///
    /// Lock order: this mutex may be held while touching `ended`, never the
    /// other way round (no `ended` guard is alive when it is locked).
    by_end: Mutex<BTreeSet<(Micros, CallId)>>,
    retention: Micros,
    max_ended: usize,
    /// Latest PBX event time applied.
    pbx_now: AtomicI64,
    evicted_early: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(&RegistryConfig::default())
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("live", &self.live.len())
            .field("ended", &self.ended.len())
            .field("retention_micros", &self.retention)
            .field("max_ended", &self.max_ended)
            .field("pbx_now", &self.pbx_now())
            .finish()
    }
}

impl Registry {
    pub fn new(config: &RegistryConfig) -> Registry {
        let retention_micros = i64::try_from(config.retention_seconds).unwrap_or(i64::MAX / 1_000_000);
        Registry {
            live: DashMap::new(),
            by_start: RwLock::new(BTreeSet::new()),
            ended: DashMap::new(),
            by_end: Mutex::new(BTreeSet::new()),
            retention: retention_micros.saturating_mul(1_000_000),
            max_ended: config.max_ended_calls.max(1),
            pbx_now: AtomicI64::new(i64::MIN),
            evicted_early: AtomicU64::new(0),
        }
    }

    /// Updates the registry from one lifecycle event. Events of one call
    /// must be applied in `seq` order (the pipeline's order); a repeated or
    /// older `seq` is ignored, so redelivery is harmless.
    pub fn apply(&self, event: &Event) -> Applied {
        let Some(snapshot) = &event.call else {
            return Applied::Ignored(Ignored::NotACallEvent);
        };
        self.pbx_now.fetch_max(event.time, Ordering::Relaxed);
        if matches!(event.kind, EventKind::Ended { .. }) {
            return self.end(snapshot, event);
        }
        if self.ended.contains_key(&snapshot.id) {
            return Applied::Ignored(Ignored::AfterEnd);
        }
        let stuck = matches!(event.kind, EventKind::Stuck { .. });
        match self.live.entry(snapshot.id.clone()) {
            Entry::Occupied(mut e) => {
                let call = e.get_mut();
                if event.seq <= call.seq {
                    return Applied::Ignored(Ignored::Stale);
                }
                if call.snapshot.started_at != snapshot.started_at {
                    let mut by_start = self.by_start_mut();
                    by_start.remove(&(call.snapshot.started_at, snapshot.id.clone()));
                    by_start.insert((snapshot.started_at, snapshot.id.clone()));
                }
                if call.snapshot.state != snapshot.state {
                    call.state_since = event.time;
                    call.stuck_since = None;
                }
                if stuck {
                    call.stuck_since.get_or_insert(event.time);
                } else {
                    call.last_event_at = event.time;
                }
                call.snapshot = Arc::clone(snapshot);
                call.seq = event.seq;
                Applied::Updated
            }
            Entry::Vacant(e) => {
                e.insert(Box::new(LiveCall {
                    snapshot: Arc::clone(snapshot),
                    seq: event.seq,
                    state_since: event.time,
                    last_event_at: event.time,
                    stuck_since: stuck.then_some(event.time),
                }));
                // Still under the shard's lock: the index never misses a live call.
                self.by_start_mut().insert((snapshot.started_at, snapshot.id.clone()));
                Applied::Started
            }
        }
    }

    fn end(&self, snapshot: &Arc<CallSnapshot>, event: &Event) -> Applied {
        let id = &snapshot.id;
        let ended_at = snapshot.ended_at.unwrap_or(event.time);
        let mut snapshot = Arc::clone(snapshot);
        // Shared as it is when it says so already (the normalizer's `call.ended`).
        if snapshot.state != CallState::Ended || snapshot.ended_at != Some(ended_at) {
            let s = Arc::make_mut(&mut snapshot);
            s.state = CallState::Ended;
            s.ended_at = Some(ended_at);
        }
        // Insert into `ended` before removing from `live`, so a concurrent
        // `get` finds the call in one map or the other, never in neither.
        let replaced = match self.ended.entry(id.clone()) {
            Entry::Occupied(mut e) => {
                if event.seq <= e.get().seq {
                    return Applied::Ignored(Ignored::Stale);
                }
                let old = e.get().ended_at;
                e.insert(EndedCall { snapshot, seq: event.seq, ended_at });
                Some(old)
            }
            Entry::Vacant(e) => {
                e.insert(EndedCall { snapshot, seq: event.seq, ended_at });
                None
            }
        }; // the `ended` guard is dropped here, before `by_end` is locked
        {
            let mut by_end = self.by_end();
            if let Some(old) = replaced {
                by_end.remove(&(old, id.clone()));
            }
            by_end.insert((ended_at, id.clone()));
            while by_end.len() > self.max_ended {
                let Some((_, oldest)) = by_end.pop_first() else { break };
                self.ended.remove(&oldest);
                self.evicted_early.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.remove_live(id.as_str());
        Applied::Ended
    }

    fn remove_live(&self, id: &str) -> Option<LiveCall> {
        let (key, call) = self.live.remove(id)?;
        self.by_start_mut().remove(&(call.snapshot.started_at, key));
        Some(*call)
    }

    fn by_start_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeSet<(Micros, CallId)>> {
        // Every mutation is a single insert/remove: a poisoned set is consistent.
        self.by_start.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Up to `n` index keys after `after` (from the start if `None`).
    fn keys_after(&self, after: Option<&(Micros, CallId)>, n: usize) -> Vec<(Micros, CallId)> {
        let by_start = self.by_start.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        by_start.range((from, Bound::Unbounded)).take(n).cloned().collect()
    }

    fn by_end(&self) -> std::sync::MutexGuard<'_, BTreeSet<(Micros, CallId)>> {
        // A panic elsewhere while holding the lock leaves a consistent set
        // (every mutation is a single insert/remove), so poison is ignored.
        self.by_end.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The call, live or ended within the retention window (on the PBX
    /// clock, [`Registry::pbx_now`]).
    pub fn get(&self, id: &str) -> Option<CallSnapshot> {
        if let Some(call) = self.live.get(id) {
            return Some(CallSnapshot::clone(&call.snapshot));
        }
        let ended = self.ended.get(id)?;
        (ended.ended_at.saturating_add(self.retention) > self.pbx_now()).then(|| CallSnapshot::clone(&ended.snapshot))
    }

    /// A live call with the sweeper's bookkeeping.
    pub fn get_live(&self, id: &str) -> Option<LiveCall> {
        self.live.get(id).map(|c| LiveCall::clone(&c))
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.live.contains_key(id)
    }

    /// Live calls matching `filter`, oldest first (then by id).
    pub fn live_calls(&self, filter: &LiveFilter<'_>) -> Vec<CallSnapshot> {
        let mut calls: Vec<CallSnapshot> =
            self.scan_live(|c| filter.matches(&c.snapshot).then(|| CallSnapshot::clone(&c.snapshot)));
        calls.sort_by(|a, b| a.started_at.cmp(&b.started_at).then_with(|| a.id.cmp(&b.id)));
        calls
    }

    /// Up to `limit` live calls matching `filter` that come after `after`
    /// in start order (then id), and where the next page starts if more
    /// match. Cost: the calls visited up to one past the page, never the
    /// whole registry (a very selective filter visits more).
    ///
    /// Calls started or ended between two pages may or may not appear; the
    /// others appear exactly once over a walk of every page.
    pub fn live_page(&self, filter: &LiveFilter<'_>, after: Option<&LiveCursor>, limit: usize) -> LivePage {
        let limit = limit.max(1);
        let mut pos = after.map(|c| (c.started_at, c.id.clone()));
        let mut calls = Vec::with_capacity(limit.min(PAGE_CHUNK));
        loop {
            let keys = self.keys_after(pos.as_ref(), PAGE_CHUNK);
            let Some(last) = keys.last().cloned() else { return LivePage { calls, next: None } };
            for (started_at, id) in keys {
                let Some(call) = self.live.get(&id) else { continue };
                if call.snapshot.started_at != started_at || !filter.matches(&call.snapshot) {
                    continue;
                }
                if calls.len() == limit {
                    let next =
                        calls.last().map(|c: &CallSnapshot| LiveCursor { started_at: c.started_at, id: c.id.clone() });
                    return LivePage { calls, next };
                }
                calls.push(CallSnapshot::clone(&call.snapshot));
            }
            pos = Some(last);
        }
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Ended calls currently kept (including any past retention that no
    /// purge has removed yet).
    pub fn ended_count(&self) -> usize {
        self.ended.len()
    }

    /// Ended calls dropped before their retention was over because of the
    /// `max_ended_calls` cap.
    pub fn evicted_early(&self) -> u64 {
        self.evicted_early.load(Ordering::Relaxed)
    }

    /// The latest PBX event time applied (`i64::MIN` before any event).
    pub fn pbx_now(&self) -> Micros {
        self.pbx_now.load(Ordering::Relaxed)
    }

    /// Visits every live call and collects what `f` returns. For the
    /// stuck-call sweeper and indicators: copy out what you need and act
    /// after the scan.
    ///
    /// `f` runs while one shard of the map is read-locked (writers to that
    /// shard wait): keep it short, and do not call `apply`/`remove`/
    /// `purge_expired` from it. Calls started or ended during the scan may
    /// or may not be visited.
    pub fn scan_live<T>(&self, mut f: impl FnMut(&LiveCall) -> Option<T>) -> Vec<T> {
        let mut out = Vec::new();
        for entry in self.live.iter() {
            if let Some(t) = f(entry.value()) {
                out.push(t);
            }
        }
        out
    }

    /// Visits every live call (see [`Registry::scan_live`] for the rules).
    pub fn for_each_live(&self, mut f: impl FnMut(&LiveCall)) {
        for entry in self.live.iter() {
            f(entry.value());
        }
    }

    /// Drops the ended calls whose retention is over at PBX time `now`;
    /// returns how many. Cost: proportional to what is dropped.
    pub fn purge_expired(&self, now: Micros) -> usize {
        let mut by_end = self.by_end();
        let mut purged = 0;
        while let Some((ended_at, _)) = by_end.first() {
            if ended_at.saturating_add(self.retention) > now {
                break;
            }
            if let Some((_, id)) = by_end.pop_first() {
                self.ended.remove(&id);
                purged += 1;
            }
        }
        purged
    }

    /// Forgets a call, live or ended, without any event (e.g. in tests or
    /// after an operator's cleanup). Removing a live call for the helpdesk
    /// goes through the normalizer, which emits `call.ended`.
    pub fn remove(&self, id: &str) -> Option<CallSnapshot> {
        if let Some(call) = self.remove_live(id) {
            return Some(Arc::unwrap_or_clone(call.snapshot));
        }
        let (key, ended) = self.ended.remove(id)?;
        self.by_end().remove(&(ended.ended_at, key));
        Some(Arc::unwrap_or_clone(ended.snapshot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Direction, EndReason, HungUpBy, Party};
    use crate::ids::{AgentId, GroupId};

    const S: Micros = 1_000_000;
    const T0: Micros = 1_795_471_023 * S;

    fn snapshot(id: &str, state: CallState, group: &str, agent: Option<&str>) -> CallSnapshot {
        CallSnapshot {
            id: CallId::new(id),
            direction: Direction::Inbound,
            state,
            caller: Party { number: Some("11987650001".into()), name: Some("Cliente 0001".into()) },
            callee: Party { number: Some("1130001000".into()), name: None },
            group: Some(GroupId::new(group)),
            queue: Some("700".into()),
            agent: agent.map(AgentId::new),
            ticket_id: None,
            started_at: T0,
            answered_at: None,
            ended_at: None,
            recording: None,
            routing: None,
            caller_lookup: None,
        }
    }

    fn event(seq: u64, time: Micros, kind: EventKind, call: CallSnapshot) -> Event {
        Event { seq, time, kind, call: Some(Arc::new(call)) }
    }

    fn started(id: &str, time: Micros) -> Event {
        event(1, time, EventKind::Started {}, snapshot(id, CallState::Started, "support", None))
    }

    fn answered(id: &str, seq: u64, time: Micros, agent: &str) -> Event {
        let mut s = snapshot(id, CallState::Talking, "support", Some(agent));
        s.answered_at = Some(time);
        event(seq, time, EventKind::Answered { agent: Some(AgentId::new(agent)), wait_seconds: 2 }, s)
    }

    fn ended(id: &str, seq: u64, time: Micros) -> Event {
        let mut s = snapshot(id, CallState::Ended, "support", Some("maria"));
        s.ended_at = Some(time);
        let kind = EventKind::Ended {
            duration_seconds: 10,
            talk_seconds: 8,
            wait_seconds: 2,
            hangup_cause: Some(16),
            hangup_cause_text: None,
            hung_up_by: HungUpBy::Caller,
            end_reason: EndReason::Normal,
        };
        event(seq, time, kind, s)
    }

    fn registry(retention_seconds: u64, max_ended_calls: usize) -> Registry {
        Registry::new(&RegistryConfig { retention_seconds, max_ended_calls })
    }

    #[test]
    fn apply_starts_and_updates_calls() {
        let r = Registry::default();
        assert_eq!(r.apply(&started("c1", T0)), Applied::Started);
        assert_eq!(r.get("c1").map(|c| c.state), Some(CallState::Started));
        assert_eq!(r.apply(&answered("c1", 2, T0 + 3 * S, "maria")), Applied::Updated);
        let c = r.get("c1").expect("live");
        assert_eq!(c.state, CallState::Talking);
        assert_eq!(c.agent.as_ref().map(AgentId::as_str), Some("maria"));
        assert_eq!(r.live_count(), 1);
        assert!(r.is_live("c1"));
        assert_eq!(r.get("nope"), None);
        assert_eq!(r.pbx_now(), T0 + 3 * S);
    }

    #[test]
    fn stale_duplicate_and_agent_events_are_ignored() {
        let r = Registry::default();
        r.apply(&started("c1", T0));
        r.apply(&answered("c1", 2, T0 + S, "maria"));
        assert_eq!(r.apply(&answered("c1", 2, T0 + S, "joao")), Applied::Ignored(Ignored::Stale));
        assert_eq!(r.apply(&started("c1", T0)), Applied::Ignored(Ignored::Stale));
        assert_eq!(r.get("c1").and_then(|c| c.agent).map(|a| a.to_string()).as_deref(), Some("maria"));
        let agent_event = Event {
            seq: 0,
            time: T0,
            kind: EventKind::AgentAvailability {
                agent: AgentId::new("maria"),
                available: false,
                reason: None,
                source: crate::event::AvailabilitySource::Pbx,
            },
            call: None,
        };
        assert_eq!(r.apply(&agent_event), Applied::Ignored(Ignored::NotACallEvent));
    }

    #[test]
    fn sweeper_times_follow_state_changes_not_stuck_reports() {
        let r = Registry::default();
        r.apply(&started("c1", T0));
        let mut queued = snapshot("c1", CallState::Queued, "support", None);
        queued.queue = Some("700".into());
        r.apply(&event(2, T0 + S, EventKind::Queued { group: None, queue: "700".into(), position: Some(1) }, queued));
        let stuck = event(
            3,
            T0 + 100 * S,
            EventKind::Stuck { state: CallState::Queued, silent_seconds: 99, detected_by: "sweeper".into() },
            snapshot("c1", CallState::Queued, "support", None),
        );
        r.apply(&stuck);
        let c = r.get_live("c1").expect("live");
        assert_eq!((c.state_since, c.last_event_at, c.stuck_since), (T0 + S, T0 + S, Some(T0 + 100 * S)));
        r.apply(&answered("c1", 4, T0 + 200 * S, "maria"));
        let c = r.get_live("c1").expect("live");
        assert_eq!((c.state_since, c.last_event_at, c.stuck_since, c.seq), (T0 + 200 * S, T0 + 200 * S, None, 4));
    }

    #[test]
    fn ended_calls_stay_queryable_for_the_retention_window() {
        let r = registry(4 * 3600, 1000);
        r.apply(&started("c1", T0));
        r.apply(&answered("c1", 2, T0 + S, "maria"));
        assert_eq!(r.apply(&ended("c1", 3, T0 + 10 * S)), Applied::Ended);
        assert_eq!(r.live_count(), 0);
        assert_eq!(r.ended_count(), 1);
        let c = r.get("c1").expect("ended within retention");
        assert_eq!((c.state, c.ended_at), (CallState::Ended, Some(T0 + 10 * S)));
        // Late events for an ended call change nothing.
        assert_eq!(r.apply(&answered("c1", 4, T0 + 11 * S, "joao")), Applied::Ignored(Ignored::AfterEnd));
        assert_eq!(r.apply(&ended("c1", 3, T0 + 10 * S)), Applied::Ignored(Ignored::Stale));
        assert!(!r.is_live("c1"));

        // Another call's events move the PBX clock; at exactly 4 h after the
        // end the call is gone from `get`, before any purge.
        r.apply(&started("c2", T0 + 10 * S + 4 * 3600 * S - 1));
        assert!(r.get("c1").is_some());
        r.apply(&answered("c2", 2, T0 + 10 * S + 4 * 3600 * S, "joao"));
        assert!(r.get("c1").is_none());
        assert_eq!(r.ended_count(), 1);
    }

    #[test]
    fn purge_removes_only_expired_calls() {
        let r = registry(4 * 3600, 1000);
        for (i, end) in [10, 20, 30].iter().enumerate() {
            let id = format!("c{i}");
            r.apply(&started(&id, T0));
            r.apply(&ended(&id, 2, T0 + end * S));
        }
        assert_eq!(r.purge_expired(T0 + 4 * 3600 * S), 0);
        assert_eq!(r.purge_expired(T0 + (4 * 3600 + 20) * S), 2);
        assert_eq!(r.ended_count(), 1);
        assert!(r.get("c2").is_some());
        assert_eq!(r.purge_expired(i64::MAX), 1);
        assert_eq!(r.ended_count(), 0);
        assert_eq!(r.purge_expired(i64::MAX), 0);
    }

    #[test]
    fn a_call_seen_only_at_its_end_is_kept() {
        let r = Registry::default();
        assert_eq!(r.apply(&ended("late", 7, T0)), Applied::Ended);
        assert_eq!(r.get("late").map(|c| c.state), Some(CallState::Ended));
    }

    #[test]
    fn the_ended_cap_drops_the_oldest_first() {
        let r = registry(4 * 3600, 2);
        for i in 0..3 {
            let id = format!("c{i}");
            r.apply(&started(&id, T0 + i * S));
            r.apply(&ended(&id, 2, T0 + (10 + i) * S));
        }
        assert_eq!(r.ended_count(), 2);
        assert_eq!(r.evicted_early(), 1);
        assert!(r.get("c0").is_none());
        assert!(r.get("c1").is_some() && r.get("c2").is_some());
    }

    #[test]
    fn live_calls_filter_by_group_agent_and_state() {
        let r = Registry::default();
        let mut s = snapshot("a", CallState::Queued, "support", None);
        s.started_at = T0 + 2 * S;
        r.apply(&event(1, T0 + 2 * S, EventKind::Started {}, s));
        let mut s = snapshot("b", CallState::Talking, "support", Some("maria"));
        s.started_at = T0 + S;
        r.apply(&event(1, T0 + S, EventKind::Started {}, s));
        r.apply(&event(1, T0, EventKind::Started {}, snapshot("c", CallState::Ringing, "sales", Some("ana"))));

        let ids = |f: LiveFilter| r.live_calls(&f).into_iter().map(|c| c.id.to_string()).collect::<Vec<_>>();
        assert_eq!(ids(LiveFilter::all()), ["c", "b", "a"]);
        assert_eq!(ids(LiveFilter::all().group("support")), ["b", "a"]);
        assert_eq!(ids(LiveFilter::all().agent("ana")), ["c"]);
        assert_eq!(ids(LiveFilter::all().state(CallState::Queued)), ["a"]);
        assert_eq!(ids(LiveFilter::all().group("support").state(CallState::Talking)), ["b"]);
        assert!(ids(LiveFilter::all().group("nobody")).is_empty());
        assert_eq!(r.live_count(), 3);
    }

    #[test]
    fn live_pages_walk_every_live_call_once_in_start_order() {
        let r = Registry::default();
        for i in 0..1000 {
            let mut s =
                snapshot(&format!("c{i}"), CallState::Queued, if i % 2 == 0 { "support" } else { "sales" }, None);
            s.started_at = T0 + (i / 3) * S;
            r.apply(&event(1, s.started_at, EventKind::Started {}, s));
        }
        r.apply(&ended("c5", 2, T0 + 999 * S));
        // A start time corrected by a later event moves the call in the order.
        let mut moved = snapshot("c7", CallState::Ringing, "sales", None);
        moved.started_at = T0 - S;
        r.apply(&event(2, T0 + 999 * S, EventKind::Started {}, moved));

        let walk = |f: LiveFilter, limit: usize| {
            let (mut ids, mut after, mut pages) = (Vec::new(), None, 0);
            loop {
                let page = r.live_page(&f, after.as_ref(), limit);
                pages += 1;
                ids.extend(page.calls.iter().map(|c| c.id.to_string()));
                match page.next {
                    Some(next) => after = Some(next),
                    None => return (ids, pages),
                }
            }
        };
        let all: Vec<String> = r.live_calls(&LiveFilter::all()).into_iter().map(|c| c.id.to_string()).collect();
        assert_eq!(all.len(), 999);
        assert_eq!(all[0], "c7");
        for limit in [1, 7, 100, 999, 5000] {
            let (ids, pages) = walk(LiveFilter::all(), limit);
            assert_eq!(ids, all, "limit {limit}");
            assert_eq!(pages, 999usize.div_ceil(limit), "limit {limit}: no empty last page");
        }
        let support: Vec<String> =
            r.live_calls(&LiveFilter::all().group("support")).into_iter().map(|c| c.id.to_string()).collect();
        assert_eq!(walk(LiveFilter::all().group("support"), 33).0, support);
        assert_eq!(walk(LiveFilter::all().group("nobody"), 10), (vec![], 1));
        r.remove("c0");
        assert_eq!(r.live_page(&LiveFilter::all(), None, 2000).calls.len(), 998);
    }

    #[test]
    fn scan_live_visits_every_live_call() {
        let r = Registry::default();
        for i in 0..100 {
            r.apply(&started(&format!("c{i}"), T0 + i * S));
        }
        r.apply(&ended("c0", 2, T0 + 200 * S));
        let old: Vec<CallId> = r.scan_live(|c| (c.state_since < T0 + 50 * S).then(|| c.snapshot.id.clone()));
        assert_eq!(old.len(), 49);
        let mut n = 0;
        r.for_each_live(|_| n += 1);
        assert_eq!(n, 99);
    }

    #[test]
    fn remove_forgets_live_and_ended_calls() {
        let r = Registry::default();
        r.apply(&started("live", T0));
        r.apply(&started("gone", T0));
        r.apply(&ended("gone", 2, T0 + S));
        assert_eq!(r.remove("live").map(|c| c.state), Some(CallState::Started));
        assert_eq!(r.remove("gone").map(|c| c.state), Some(CallState::Ended));
        assert_eq!(r.remove("gone"), None);
        assert_eq!((r.live_count(), r.ended_count()), (0, 0));
        assert_eq!(r.purge_expired(i64::MAX), 0);
    }

    #[test]
    fn concurrent_writer_and_readers() {
        let r = std::sync::Arc::new(Registry::default());
        let writer = {
            let r = r.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let id = format!("c{i}");
                    r.apply(&started(&id, T0 + i * S));
                    r.apply(&answered(&id, 2, T0 + i * S + 1, "maria"));
                    if i % 2 == 0 {
                        r.apply(&ended(&id, 3, T0 + i * S + 2));
                    }
                }
            })
        };
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    let mut seen = 0;
                    for i in (0..2000).step_by(4) {
                        seen += usize::from(r.get(&format!("c{i}")).is_some());
                        seen += r.live_calls(&LiveFilter::all().agent("maria")).len().min(1);
                    }
                    seen
                })
            })
            .collect();
        writer.join().expect("writer");
        for reader in readers {
            reader.join().expect("reader");
        }
        assert_eq!(r.live_count(), 1000);
        assert_eq!(r.ended_count(), 1000);
        assert!((0..2000).all(|i| r.get(&format!("c{i}")).is_some()));
    }
}
