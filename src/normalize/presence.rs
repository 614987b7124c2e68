//! Agent presence: whether each agent takes calls, per PBX queue, as the PBX
//! (queue pause, device state) and the helpdesk (the agent's "available for
//! calls" switch) report it.
//!
//! The normalizer owns the authoritative copy: it is part of the pure state
//! machine, changed only by AMI frames (queue member events, the
//! `QueueStatus` listing after a reconnection) and by
//! [`Normalizer::set_helpdesk_available`](super::Normalizer::set_helpdesk_available).
//! This file holds the data ([`AgentPresence`], [`PresenceMap`]) and the
//! normalizer's code that changes it and reports `agent.availability`.
//! Readers on other tasks (the FastAGI router) read a mirror,
//! `routing::PresenceBoard`, that the pipeline refreshes from
//! [`Normalizer::take_presence_changes`](super::Normalizer::take_presence_changes).
//!
//! Nothing here does I/O or reads a clock.

use super::headers::{
    INTERFACE, LOCATION, MEMBER_NAME, NAME, PAUSED, PAUSED_REASON, QUEUE, REASON, STATE_INTERFACE, STATUS,
};
use super::input::AmiEvent;
use super::Normalizer;
use crate::ami::Frame;
use crate::directory::Group;
use crate::event::{AvailabilitySource, Event, EventKind, Micros};
use crate::ids::AgentId;
use std::collections::{BTreeMap, HashMap};

/// What the PBX and the helpdesk say about one agent.
///
/// An agent nobody said anything about is available: callbridge does not
/// invent unavailability it has not been told about (a fresh start without
/// a resync must not turn every call into `no_agents`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentPresence {
    /// Per PBX queue of a configured group: paused (`true`) or not. Queues
    /// never reported are absent (not paused).
    pub paused: BTreeMap<String, bool>,
    /// The agent's device is unavailable or invalid (queue member `Status`
    /// 5 or 4: unregistered phone, unreachable peer).
    pub device_unavailable: bool,
    /// Switched off in the helpdesk ("available for calls" off).
    pub helpdesk_off: bool,
}

impl AgentPresence {
    /// Takes calls from `queue`: switched on, device usable, not paused there.
    pub fn available_in(&self, queue: &str) -> bool {
        !self.helpdesk_off && !self.device_unavailable && !self.paused.get(queue).copied().unwrap_or(false)
    }

    /// Takes calls at all: switched on, device usable, and unpaused in at
    /// least one queue (or never reported paused). This is what
    /// `agent.availability` reports.
    pub fn available(&self) -> bool {
        !self.helpdesk_off
            && !self.device_unavailable
            && (self.paused.is_empty() || self.paused.values().any(|paused| !paused))
    }
}

/// Asterisk's device states (`enum ast_device_state`) in which a queue does
/// not ring the member: 4 `INVALID`, 5 `UNAVAILABLE`. Every other state
/// (idle, in use, busy, ringing, on hold, unknown) still counts as present:
/// an agent on another call is logged in and will take the next one.
pub fn device_state_unavailable(status: u8) -> bool {
    matches!(status, 4 | 5)
}

/// Every agent's presence. Bounded by the configured agents: frames about
/// members the directory does not know are ignored before they get here.
#[derive(Debug, Clone, Default)]
pub struct PresenceMap {
    agents: HashMap<AgentId, AgentPresence>,
}

impl PresenceMap {
    pub fn get(&self, agent: &str) -> Option<&AgentPresence> {
        self.agents.get(agent)
    }

    pub(super) fn entry(&mut self, agent: &AgentId) -> &mut AgentPresence {
        self.agents.entry(agent.clone()).or_default()
    }

    /// Whether `agent` takes calls from `queue` (unknown agents do).
    pub fn available_in(&self, agent: &str, queue: &str) -> bool {
        self.agents.get(agent).is_none_or(|p| p.available_in(queue))
    }

    /// Whether at least one agent of `group` takes calls from its queue.
    pub fn group_has_available_agent(&self, group: &Group) -> bool {
        group.agents.iter().any(|a| self.available_in(a.as_str(), &group.queue))
    }
}

impl Normalizer {
    /// `QueueMemberPause`, `QueueMemberStatus`, `QueueMember` (and the older
    /// `QueueMemberPaused`): pause state per queue and device state.
    pub(super) fn on_member(&mut self, frame: &Frame, now: Micros, out: &mut Vec<Event>) {
        let paused = frame.get(PAUSED).map(|p| p == "1" || p.eq_ignore_ascii_case("true"));
        let device_unavailable =
            frame.get(STATUS).and_then(|s| s.trim().parse::<u8>().ok()).map(device_state_unavailable);
        if paused.is_none() && device_unavailable.is_none() {
            return;
        }
        let Some(queue) = frame.get(QUEUE) else {
            return;
        };
        let Some(agent) = self.member_agent(frame) else {
            return;
        };
        // Pauses in queues no group uses do not make anyone unavailable for
        // the helpdesk (and keep the map bounded by the configuration).
        let paused = paused.filter(|_| self.dir.group_for_queue(queue).is_some());
        let time = frame.timestamp_micros().unwrap_or(now);
        let pause_reason = frame.get(PAUSED_REASON).or_else(|| frame.get(REASON)).filter(|r| !r.is_empty());
        self.change_presence(
            &agent,
            time,
            AvailabilitySource::Pbx,
            |p| {
                let mut changed = false;
                if let Some(paused) = paused {
                    match p.paused.get_mut(queue) {
                        Some(was) if *was == paused => {}
                        Some(was) => {
                            *was = paused;
                            changed = true;
                        }
                        None => {
                            p.paused.insert(queue.to_string(), paused);
                            changed = true;
                        }
                    }
                }
                if let Some(unavailable) = device_unavailable.filter(|u| *u != p.device_unavailable) {
                    p.device_unavailable = unavailable;
                    changed = true;
                }
                changed
            },
            |device_was_unavailable, after| {
                if !after.available() && after.device_unavailable && !device_was_unavailable {
                    Some(DEVICE_UNAVAILABLE.to_string())
                } else {
                    pause_reason.map(str::to_string)
                }
            },
            out,
        );
    }

    fn member_agent(&self, frame: &Frame) -> Option<AgentId> {
        self.dir
            .agent_for_member(
                frame.get(INTERFACE).or_else(|| frame.get(LOCATION)),
                frame.get(STATE_INTERFACE),
                frame.get(MEMBER_NAME).or_else(|| frame.get(NAME)),
            )
            .map(|a| a.id.clone())
    }

    /// Applies `change` to an agent's presence (it returns whether anything
    /// changed: member events repeat the same state all day long, and this
    /// path must not allocate for them); notes a change for
    /// [`Normalizer::take_presence_changes`] and emits `agent.availability`
    /// when the agent's overall availability flips (`reason(device was
    /// unavailable before, presence after)` says why).
    fn change_presence(
        &mut self,
        agent: &AgentId,
        time: Micros,
        source: AvailabilitySource,
        change: impl FnOnce(&mut AgentPresence) -> bool,
        reason: impl FnOnce(bool, &AgentPresence) -> Option<String>,
        out: &mut Vec<Event>,
    ) {
        let presence = self.presence.entry(agent);
        let device_was_unavailable = presence.device_unavailable;
        if !change(presence) {
            return;
        }
        let now_available = presence.available();
        let reason = reason(device_was_unavailable, presence);
        self.presence_changed.insert(agent.clone());
        let was_available = self.available.insert(agent.clone(), now_available).unwrap_or(true);
        if was_available != now_available {
            out.push(Event {
                seq: 0,
                time,
                kind: EventKind::AgentAvailability { agent: agent.clone(), available: now_available, reason, source },
                call: None,
            });
        }
    }

    /// The agent switched "available for calls" on or off in the helpdesk
    /// (the control plane calls this; it also pauses the agent on the PBX,
    /// whose confirming event then changes nothing more). Emits
    /// `agent.availability` with `source: api` when the agent's overall
    /// availability flips. Returns false for an unknown agent.
    pub fn set_helpdesk_available(&mut self, agent: &str, available: bool, now: Micros, out: &mut Vec<Event>) -> bool {
        self.apply_helpdesk_switch(agent, available, None, &[], now, out)
    }

    /// The control plane's availability switch: like
    /// [`Normalizer::set_helpdesk_available`], with the reason the agent
    /// gave, and with `queues` (the agent's groups' queues it is about to
    /// pause or unpause with `QueuePause`) taken as already done — so the
    /// change is reported once, as `source: api`, and the PBX's confirming
    /// `QueueMemberPause` changes nothing more.
    pub fn apply_helpdesk_switch(
        &mut self,
        agent: &str,
        available: bool,
        reason: Option<String>,
        queues: &[String],
        now: Micros,
        out: &mut Vec<Event>,
    ) -> bool {
        let Some(agent) = self.dir.agent(agent).map(|a| a.id.clone()) else {
            return false;
        };
        let dir = self.dir.clone();
        self.change_presence(
            &agent,
            now,
            AvailabilitySource::Api,
            |p| {
                let mut changed = p.helpdesk_off == available;
                p.helpdesk_off = !available;
                for q in queues.iter().filter(|q| dir.group_for_queue(q).is_some()) {
                    if p.paused.insert(q.clone(), !available) != Some(!available) {
                        changed = true;
                    }
                }
                changed
            },
            |_, _| reason,
            out,
        );
        true
    }

    /// Reconciles presence with a `QueueStatus` listing taken after a
    /// (re)connection (its `QueueMember` items; `QueueParams` and
    /// `QueueEntry` items are ignored). The listing replaces what the PBX
    /// said before: pauses and device states missed while disconnected are
    /// applied, an agent listed in no queue has no pause left. The helpdesk
    /// switch is kept. A listing without any member (the PBX refused
    /// `QueueStatus`) changes nothing.
    pub fn resync_members(&mut self, items: &[Frame], now: Micros, out: &mut Vec<Event>) {
        #[derive(Default)]
        struct Listed {
            paused: BTreeMap<String, bool>,
            device_unavailable: bool,
            reason: Option<String>,
        }
        let mut listed: HashMap<AgentId, Listed> = HashMap::new();
        let mut any_member = false;
        for f in items.iter().filter(|f| f.event().map(AmiEvent::parse) == Some(AmiEvent::QueueMember)) {
            any_member = true;
            let (Some(agent), Some(queue)) = (self.member_agent(f), f.get(QUEUE)) else {
                continue;
            };
            let entry = listed.entry(agent).or_default();
            if let Some(paused) = f.get(PAUSED).map(|p| p == "1" || p.eq_ignore_ascii_case("true")) {
                if self.dir.group_for_queue(queue).is_some() {
                    entry.paused.insert(queue.to_string(), paused);
                }
                if paused && entry.reason.is_none() {
                    entry.reason = f.get(PAUSED_REASON).filter(|r| !r.is_empty()).map(str::to_string);
                }
            }
            if f.get(STATUS).and_then(|s| s.trim().parse::<u8>().ok()).is_some_and(device_state_unavailable) {
                entry.device_unavailable = true;
            }
        }
        if !any_member {
            return;
        }
        // Every configured agent, in id order so that the events are
        // deterministic.
        let mut agents: Vec<AgentId> = self.dir.agents().map(|a| a.id.clone()).collect();
        agents.sort();
        for agent in agents {
            let fresh = listed.remove(&agent).unwrap_or_default();
            let reason = fresh.reason.clone();
            self.change_presence(
                &agent,
                now,
                AvailabilitySource::Pbx,
                |p| {
                    let changed = p.paused != fresh.paused || p.device_unavailable != fresh.device_unavailable;
                    p.paused = fresh.paused;
                    p.device_unavailable = fresh.device_unavailable;
                    changed
                },
                |device_was_unavailable, after| {
                    if !after.available() && after.device_unavailable && !device_was_unavailable {
                        Some(DEVICE_UNAVAILABLE.to_string())
                    } else if !after.available() {
                        reason
                    } else {
                        None
                    }
                },
                out,
            );
        }
    }

    /// Agents whose presence changed since the last call, with their
    /// presence now, in agent id order. The pipeline hands them to
    /// `routing::PresenceBoard::apply` after each batch of frames so that
    /// the FastAGI router sees what the normalizer sees.
    pub fn take_presence_changes(&mut self) -> Vec<(AgentId, AgentPresence)> {
        std::mem::take(&mut self.presence_changed)
            .into_iter()
            .map(|a| {
                let p = self.presence.get(a.as_str()).cloned().unwrap_or_default();
                (a, p)
            })
            .collect()
    }

    /// What the PBX and the helpdesk said about an agent so far.
    pub fn presence(&self) -> &PresenceMap {
        &self.presence
    }

    /// Whether an agent is available for calls as far as the PBX and the
    /// helpdesk told us (unknown counts as available).
    pub fn agent_available(&self, agent: &str) -> bool {
        self.presence.get(agent).is_none_or(AgentPresence::available)
    }

    /// Whether at least one agent of the group takes calls from its queue.
    pub fn group_has_available_agent(&self, group: &str) -> bool {
        self.dir.group(group).is_some_and(|g| self.presence.group_has_available_agent(g))
    }
}

/// `agent.availability` reason when the agent's device became unusable.
const DEVICE_UNAVAILABLE: &str = "device_unavailable";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_per_queue_and_overall() {
        let cases: &[(&str, AgentPresence, bool, bool, bool)] = &[
            // (case, presence, available in 700, in 701, overall)
            ("nothing known", AgentPresence::default(), true, true, true),
            (
                "paused in 700 only",
                AgentPresence { paused: [("700".to_string(), true)].into(), ..Default::default() },
                false,
                true,
                false,
            ),
            (
                "paused in 700, unpaused in 701",
                AgentPresence {
                    paused: [("700".to_string(), true), ("701".to_string(), false)].into(),
                    ..Default::default()
                },
                false,
                true,
                true,
            ),
            (
                "device unavailable",
                AgentPresence { device_unavailable: true, ..Default::default() },
                false,
                false,
                false,
            ),
            ("switched off", AgentPresence { helpdesk_off: true, ..Default::default() }, false, false, false),
        ];
        for (case, p, in700, in701, overall) in cases {
            assert_eq!(p.available_in("700"), *in700, "{case}: 700");
            assert_eq!(p.available_in("701"), *in701, "{case}: 701");
            assert_eq!(p.available(), *overall, "{case}: overall");
        }
    }

    #[test]
    fn device_states() {
        let unavailable: Vec<u8> = (0..=9).filter(|s| device_state_unavailable(*s)).collect();
        assert_eq!(unavailable, [4, 5]);
    }
}
