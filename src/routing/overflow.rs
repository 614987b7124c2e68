//! Overflow (diversion, SPEC §2): where should a call for group G go now?
//!
//! [`route`] is a pure function of (the target, the instant, the routing
//! rules, who is available). A group *takes* a call when it is open (not a
//! holiday, within hours) and at least one of its agents is available in
//! its queue. The call goes to G if G takes it; otherwise the overflow
//! list is followed in order, depth first: G's first overflow group, then
//! that group's own overflow list, then G's second overflow group, and so
//! on, each group at most once. The first group that takes the call gets
//! it. When none does, the call is missed for G with G's own reason:
//! `holiday` > `outside_hours` > `no_agents`.
//!
//! Overflow cycles are refused when the configuration is loaded; the walk
//! still visits each group once, so it ends whatever it is given.

use super::Routing;
use crate::directory::Group;
use crate::event::{Micros, MissedReason};
use crate::ids::{AgentId, GroupId};
use std::collections::HashSet;

/// Who takes calls now; implemented by `PresenceBoard` (live) and by any
/// `Fn(&AgentId, &str) -> bool` (tests, what-if tools).
pub trait Availability {
    /// Whether `agent` takes calls from PBX queue `queue` now.
    fn available_in(&self, agent: &AgentId, queue: &str) -> bool;
}

impl<F: Fn(&AgentId, &str) -> bool> Availability for F {
    fn available_in(&self, agent: &AgentId, queue: &str) -> bool {
        self(agent, queue)
    }
}

/// What the dialplan asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A PBX queue id (`queue=700`).
    Queue(String),
    /// A helpdesk group id (`group=support`).
    Group(String),
}

/// Where the call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Queue the call in `queue`, the queue of `group`. `diverted_from` is
    /// the group asked for when the call overflowed to another one.
    Queue { group: GroupId, queue: String, diverted_from: Option<GroupId> },
    /// Nobody takes the call: it is a missed call of `group` for `reason`
    /// (`holiday`, `outside_hours` or `no_agents`).
    Missed { group: GroupId, reason: MissedReason },
}

/// A target that names nothing configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no group is served by queue {0:?}")]
    UnknownQueue(String),
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
}

impl RouteError {
    /// A short fixed code for the dialplan and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            RouteError::UnknownQueue(_) => "unknown_queue",
            RouteError::UnknownGroup(_) => "unknown_group",
        }
    }
}

/// Why `group` does not take a call at `at`, or `None` when it does.
pub fn refusal(group: &Group, at: Micros, routing: &Routing, availability: &dyn Availability) -> Option<MissedReason> {
    if let Some(reason) = routing.calendar(group.id.as_str()).and_then(|c| c.closed_reason(at)) {
        return Some(reason);
    }
    let anyone = group.agents.iter().any(|a| availability.available_in(a, &group.queue));
    (!anyone).then_some(MissedReason::NoAgents)
}

/// Where a call for `target` should go at `at` (PBX clock, µs).
pub fn route(
    target: &Target,
    at: Micros,
    routing: &Routing,
    availability: &dyn Availability,
) -> Result<Route, RouteError> {
    let dir = routing.directory();
    let start = match target {
        Target::Queue(q) => dir.group_for_queue(q).ok_or_else(|| RouteError::UnknownQueue(q.clone()))?,
        Target::Group(g) => dir.group(g).ok_or_else(|| RouteError::UnknownGroup(g.clone()))?,
    };
    let Some(reason) = refusal(start, at, routing, availability) else {
        return Ok(Route::Queue { group: start.id.clone(), queue: start.queue.clone(), diverted_from: None });
    };
    let mut visited: HashSet<&str> = HashSet::from([start.id.as_str()]);
    // Depth first, in list order: the stack holds the lists reversed.
    let mut stack: Vec<&GroupId> = routing.overflow(start.id.as_str()).iter().rev().collect();
    while let Some(next) = stack.pop() {
        if !visited.insert(next.as_str()) {
            continue;
        }
        let Some(group) = dir.group(next.as_str()) else {
            continue;
        };
        if refusal(group, at, routing, availability).is_none() {
            return Ok(Route::Queue {
                group: group.id.clone(),
                queue: group.queue.clone(),
                diverted_from: Some(start.id.clone()),
            });
        }
        stack.extend(routing.overflow(group.id.as_str()).iter().rev());
    }
    Ok(Route::Missed { group: start.id.clone(), reason })
}
