//! The presence board: a copy of the normalizer's agent presence that other
//! tasks (the FastAGI router, the API) can read at any time.
//!
//! **Who writes it:** only the pipeline task that owns the
//! [`Normalizer`]. After each batch of frames it handles (and after
//! `resync_members` or `set_helpdesk_available`), it calls
//! [`PresenceBoard::sync_from`], which moves the agents whose presence
//! changed onto the board. Nothing else writes it; readers never block the
//! pipeline for longer than one map shard lock, and no guard is held across
//! an `.await` (every method here is synchronous and copies out).
//!
//! An agent the board has never heard of is available, as in the
//! normalizer.

use super::overflow::Availability;
use crate::ids::AgentId;
use crate::normalize::{AgentPresence, Normalizer};
use dashmap::DashMap;

/// Presence of every agent the pipeline reported, readable concurrently.
/// Bounded by the configured agents (the normalizer reports no others).
#[derive(Debug, Default)]
pub struct PresenceBoard {
    agents: DashMap<AgentId, AgentPresence>,
}

impl PresenceBoard {
    pub fn new() -> PresenceBoard {
        PresenceBoard::default()
    }

    /// Copies the normalizer's presence changes onto the board. Cheap when
    /// nothing changed (no lock is taken).
    pub fn sync_from(&self, normalizer: &mut Normalizer) {
        self.apply(normalizer.take_presence_changes());
    }

    /// Applies changes as returned by [`Normalizer::take_presence_changes`].
    pub fn apply(&self, changes: impl IntoIterator<Item = (AgentId, AgentPresence)>) {
        for (agent, presence) in changes {
            self.agents.insert(agent, presence);
        }
    }

    /// A copy of an agent's presence (the default, available, if unknown).
    pub fn get(&self, agent: &str) -> AgentPresence {
        self.agents.get(agent).map(|p| p.clone()).unwrap_or_default()
    }

    /// Number of agents with a reported presence.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}

impl Availability for PresenceBoard {
    fn available_in(&self, agent: &AgentId, queue: &str) -> bool {
        self.agents.get(agent.as_str()).is_none_or(|p| p.available_in(queue))
    }
}
