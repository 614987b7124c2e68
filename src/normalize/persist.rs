//! Call state that survives the process: checkpoints of live calls.
//!
//! A restart (package upgrade, `kill -9`, OOM) must not lose the end of the
//! calls in progress, nor reuse their event ids: ids are `<pbx>:<call>:<seq>`,
//! so a call adopted afresh after a restart would number its events from 1
//! again and collide with what the outbox already holds.
//!
//! # Design
//!
//! The normalizer notes which live calls changed ([`Normalizer::track_changes`]
//! turns this on). When the pipeline hands a batch of events to the outbox,
//! it takes a [`CallCheckpoint`] of each changed call
//! ([`Normalizer::take_checkpoints`]) and the outbox stores them **in the
//! same transaction as the events** (table `live_calls`, see
//! `crate::outbox`): the stored state of a call is always the state that
//! produced its last stored event, even after `kill -9` at any instant. A
//! `call.ended` deletes the call's row in that same transaction, so an
//! ended call is never restored. Calls that changed without emitting an
//! event (a channel added, a state flag) wait for the next batch with
//! events, or for the final checkpoint at shutdown; after a `kill -9` the
//! resync with the PBX's listing fills in what they missed.
//!
//! On start, [`Normalizer::restore`] puts every stored call back, with its
//! channels, offers, times and last `seq`. The resync after the first
//! connection then decides as for any reconnection: the PBX still has the
//! call → it goes on and its next event gets the next `seq`; it does not →
//! `call.ended` with `end_reason: lost`. Calls that began while callbridge
//! was down are adopted from the listing as before.
//!
//! The stored form is this build's `Call` as JSON with a format number
//! ([`CHECKPOINT_FORMAT`]); times stay in µs (the public snapshot rounds
//! to ms). Each row also carries the highest `seq` stored for the call,
//! raised with every append even when the state itself is not written (a
//! batch split across several commits because the store is nearly full
//! writes the states with its last piece). A row whose state cannot be
//! read (another format) or is older than its `seq` is restored as far as
//! possible and logged; its `seq` is always honoured, so no id is reused.

use super::call::Call;
use super::Normalizer;
use crate::event::{CallId, CallRouting, CallSnapshot, CallState, CallerLookup, Direction, Micros, Party};
use crate::ids::{AgentId, GroupId};
use serde::{Deserialize, Serialize};

/// Version of the stored call state. Bump it when `Call` changes in a way
/// older rows cannot be read as (a restored row of another version is
/// reported and only its `seq` is kept).
pub const CHECKPOINT_FORMAT: u32 = 1;

/// One live call's state as stored with its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallCheckpoint {
    pub call: CallId,
    /// The call's last emitted `seq`.
    pub seq: u64,
    /// The call's state (JSON, [`CHECKPOINT_FORMAT`]); empty when only the
    /// `seq` is known.
    pub state: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Stored<T> {
    format: u32,
    call: T,
}

/// The live call snapshot as stored: every field, times in µs.
#[derive(Serialize, Deserialize)]
#[serde(remote = "CallSnapshot")]
pub(super) struct SnapshotDef {
    id: CallId,
    direction: Direction,
    state: CallState,
    caller: Party,
    callee: Party,
    group: Option<GroupId>,
    queue: Option<smol_str::SmolStr>,
    agent: Option<AgentId>,
    ticket_id: Option<smol_str::SmolStr>,
    started_at: Micros,
    answered_at: Option<Micros>,
    ended_at: Option<Micros>,
    recording: Option<String>,
    #[serde(default)]
    routing: Option<Box<CallRouting>>,
    #[serde(default)]
    caller_lookup: Option<Box<CallerLookup>>,
}

/// [`SnapshotDef`] for the call's shared snapshot (the same JSON).
pub(super) mod shared_snapshot {
    use super::SnapshotDef;
    use crate::event::CallSnapshot;
    use serde::{Deserializer, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(snap: &Arc<CallSnapshot>, s: S) -> Result<S::Ok, S::Error> {
        SnapshotDef::serialize(snap, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<CallSnapshot>, D::Error> {
        SnapshotDef::deserialize(d).map(Arc::new)
    }
}

/// A call put back by [`Normalizer::restore`], for the registry.
#[derive(Debug, Clone)]
pub struct RestoredCall {
    pub snapshot: CallSnapshot,
    pub seq: u64,
    pub last_event_at: Micros,
}

/// What [`Normalizer::restore`] did.
#[derive(Debug, Default)]
pub struct Restored {
    pub calls: Vec<RestoredCall>,
    /// Rows whose state could not be read: only their `seq` was kept (a
    /// call adopted later under that id numbers its events after it).
    pub unreadable: Vec<(CallId, String)>,
    /// Calls whose stored state is older than their last stored event.
    pub stale: Vec<CallId>,
}

impl Normalizer {
    /// Starts noting which live calls change, for
    /// [`Normalizer::take_checkpoints`] (the daemon with a durable outbox).
    pub fn track_changes(&mut self) {
        self.changed = Some(Default::default());
    }

    /// Notes that live call `id` changed (when tracking).
    pub(super) fn touch(&mut self, id: &str) {
        if let Some(changed) = &mut self.changed {
            if !changed.contains(id) {
                changed.insert(CallId::new(id));
            }
        }
    }

    /// The state of every live call changed since the last call, sorted by
    /// call id. Ended calls are not included (their `call.ended` removes
    /// their stored state).
    pub fn take_checkpoints(&mut self) -> Vec<CallCheckpoint> {
        let Some(changed) = &mut self.changed else {
            return Vec::new();
        };
        let mut ids: Vec<CallId> = changed.drain().collect();
        ids.sort();
        let mut scratch = Vec::with_capacity(CHECKPOINT_SCRATCH);
        ids.iter().filter_map(|id| self.calls.get(id.as_str())).map(|c| checkpoint(c, &mut scratch)).collect()
    }

    /// Puts back the live calls of a previous run (see the module doc).
    /// Call it before the first frame; restored calls belong to no resync
    /// yet, so the first resync reconciles every one of them.
    pub fn restore(&mut self, rows: Vec<CallCheckpoint>) -> Restored {
        let mut done = Restored::default();
        for row in rows {
            let mut call = match serde_json::from_slice::<Stored<Call>>(&row.state) {
                Ok(s) if s.format == CHECKPOINT_FORMAT && s.call.id == row.call => s.call,
                Ok(s) => {
                    let why = format!("stored state of format {} for call {}", s.format, s.call.id);
                    self.keep_seq_floor(&row, why, &mut done);
                    continue;
                }
                Err(e) => {
                    let why = if row.state.is_empty() { "no stored state".to_string() } else { e.to_string() };
                    self.keep_seq_floor(&row, why, &mut done);
                    continue;
                }
            };
            if call.seq < row.seq {
                call.seq = row.seq;
                done.stale.push(row.call.clone());
            }
            for uid in call.live_channel_ids() {
                self.channel_call.insert(uid.into(), call.id.clone());
            }
            for uid in call.gone_channel_ids() {
                self.gone_channels.insert(uid);
            }
            done.calls.push(RestoredCall {
                snapshot: call.snapshot(),
                seq: call.seq,
                last_event_at: call.last_event_at,
            });
            self.calls.insert(call.id.clone(), Box::new(call));
        }
        done
    }

    fn keep_seq_floor(&mut self, row: &CallCheckpoint, why: String, done: &mut Restored) {
        self.seq_floors.insert(row.call.clone(), row.seq);
        done.unreadable.push((row.call.clone(), why));
    }
}

/// Room for one call's JSON state (a few hundred bytes to a few KB: more
/// channels and offers, more bytes); a larger one grows it.
const CHECKPOINT_SCRATCH: usize = 4096;

/// `scratch` is reused for every call of a batch, so each state is
/// allocated once at its exact size: serialising straight into a fresh
/// vector grows it by doubling, and the freed halves (128, 256, 512 bytes
/// per call and batch) were left as holes among the live calls' records.
fn checkpoint(call: &Call, scratch: &mut Vec<u8>) -> CallCheckpoint {
    let stored = Stored { format: CHECKPOINT_FORMAT, call };
    scratch.clear();
    // Serialising plain data into memory cannot fail; an empty state would
    // still keep the seq.
    let state = match serde_json::to_writer(&mut *scratch, &stored) {
        Ok(()) => scratch.as_slice().to_vec(),
        Err(_) => Vec::new(),
    };
    CallCheckpoint { call: call.id.clone(), seq: call.seq, state }
}
