//! Helpdesk routing rules (SPEC §2): business hours, holidays, agent
//! availability, overflow, and the FastAGI endpoint where these rules meet
//! the PBX's dialplan.
//!
//! - [`calendar`]: when a group is open, in its own time zone.
//! - [`Routing`]: every group's calendar and overflow list, built once
//!   (`settings::routing`) from a validated configuration. It is the normalizer's [`Rules`] (an unanswered
//!   call to a closed group is `holiday`/`outside_hours`).
//! - [`presence`]: [`PresenceBoard`], the normalizer's agent presence mirrored
//!   for readers on other tasks.
//! - [`overflow`]: [`route`], the pure "where should this call go now?".
//! - [`agi`]: the FastAGI server answering that question to the dialplan.
//! - [`RouteOracle`]: `route` with the live presence and the wall clock, what
//!   the FastAGI server (and anything else live) asks.
//!
//! Data still flows one way: the FastAGI answer reaches the lifecycle only
//! through the PBX (the channel variables it sets come back as `VarSet`
//! events), never by calling into the normalizer.
//!
//! This module must never touch the AMI connection, and nothing but
//! [`agi`] does network I/O.

pub mod agi;
pub mod board;
pub mod calendar;
pub mod overflow;

pub use board::PresenceBoard;
pub use calendar::{Calendar, CalendarError};
pub use overflow::{route, Availability, Route, RouteError, Target};

use crate::directory::Directory;
use crate::event::{Micros, MissedReason};
use crate::ids::GroupId;
use crate::normalize::Rules;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The configuration could not be turned into routing rules; one line per
/// problem, each naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct RoutingError {
    pub problems: Vec<String>,
}

#[derive(Debug)]
struct GroupRules {
    calendar: Calendar,
    overflow: Vec<GroupId>,
}

/// Every group's calendar and overflow order, plus the directory (queue →
/// group, group → agents). Immutable; a configuration reload builds a new
/// one.
#[derive(Debug)]
pub struct Routing {
    dir: Arc<Directory>,
    groups: HashMap<GroupId, GroupRules>,
}

impl Routing {
    /// The rules of these groups: each group's calendar and overflow
    /// order, over `dir`. `settings::routing` builds them from a validated
    /// configuration.
    pub fn new(dir: Arc<Directory>, groups: impl IntoIterator<Item = (GroupId, Calendar, Vec<GroupId>)>) -> Routing {
        let groups =
            groups.into_iter().map(|(id, calendar, overflow)| (id, GroupRules { calendar, overflow })).collect();
        Routing { dir, groups }
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.dir
    }

    /// A group's calendar.
    pub fn calendar(&self, group: &str) -> Option<&Calendar> {
        self.groups.get(group).map(|g| &g.calendar)
    }

    /// A group's overflow list, in order (empty for unknown groups).
    pub fn overflow(&self, group: &str) -> &[GroupId] {
        self.groups.get(group).map_or(&[], |g| g.overflow.as_slice())
    }
}

impl Rules for Routing {
    fn closed_reason(&self, group: &GroupId, at: Micros) -> Option<MissedReason> {
        self.calendar(group.as_str())?.closed_reason(at)
    }
}

/// The wall clock, µs since the epoch.
pub fn wall_clock() -> Micros {
    jiff::Timestamp::now().as_microsecond()
}

/// [`route`] with the live presence board and a clock: what the FastAGI
/// server asks. Shared (`Arc`) by every session; the rules can be replaced
/// on a configuration reload while sessions run.
pub struct RouteOracle {
    /// Replaced whole on reload; readers clone the `Arc` and drop the lock
    /// at once, so a reload never waits for a session.
    routing: RwLock<Arc<Routing>>,
    presence: Arc<PresenceBoard>,
    clock: Box<dyn Fn() -> Micros + Send + Sync>,
}

impl std::fmt::Debug for RouteOracle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteOracle").field("presence", &self.presence).finish_non_exhaustive()
    }
}

impl RouteOracle {
    /// An oracle on the wall clock. Calls are routed by the time callbridge
    /// reads when the dialplan asks, which is the PBX's "now" give or take
    /// clock drift between two hosts (keep both on NTP).
    pub fn new(routing: Arc<Routing>, presence: Arc<PresenceBoard>) -> RouteOracle {
        RouteOracle::with_clock(routing, presence, wall_clock)
    }

    /// An oracle on another clock (tests, what-if tools).
    pub fn with_clock(
        routing: Arc<Routing>,
        presence: Arc<PresenceBoard>,
        clock: impl Fn() -> Micros + Send + Sync + 'static,
    ) -> RouteOracle {
        RouteOracle { routing: RwLock::new(routing), presence, clock: Box::new(clock) }
    }

    /// Replaces the rules (configuration reload).
    pub fn reconfigure(&self, routing: Arc<Routing>) {
        // A poisoned lock only means a reader panicked while holding it;
        // the Arc inside is intact.
        *self.routing.write().unwrap_or_else(|e| e.into_inner()) = routing;
    }

    pub fn routing(&self) -> Arc<Routing> {
        self.routing.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn presence(&self) -> &Arc<PresenceBoard> {
        &self.presence
    }

    /// Where a call for `target` should go now.
    pub fn route(&self, target: &Target) -> Result<Route, RouteError> {
        let routing = self.routing();
        route(target, (self.clock)(), &routing, self.presence.as_ref())
    }
}
