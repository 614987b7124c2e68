//! Agent presence: whether each agent takes calls, per PBX queue, as the PBX
//! (queue pause, device state) and the helpdesk (the agent's "available for
//! calls" switch) report it.
//!
//! The normalizer owns the authoritative copy: it is part of the pure state
//! machine, changed only by AMI frames and by
//! [`Normalizer::set_helpdesk_available`](super::Normalizer::set_helpdesk_available).
//! Readers on other tasks (the FastAGI router) read a mirror,
//! `routing::PresenceBoard`, that the pipeline refreshes from
//! [`Normalizer::take_presence_changes`](super::Normalizer::take_presence_changes).
//!
//! Nothing here does I/O or reads a clock.

use crate::directory::Group;
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
