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
//! - [`RouteOracle`]: `route`, then `redirect` after the caller lookup, with
//!   the live presence and the wall clock: what the FastAGI server (and
//!   anything else live) asks.
//!
//! Data still flows one way: the FastAGI answer reaches the lifecycle only
//! through the PBX (the channel variables it sets come back as `VarSet`
//! events), never by calling into the normalizer.
//!
//! - [`lookup`]: [`CallerLookups`], the helpdesk lookup of a caller's
//!   number (bounded: timeout, cache, request slots; fails open).
//! - [`redirect`]: [`redirect`], the pure "and by who is calling?" after
//!   [`route`].
//!
//! This module must never touch the AMI connection, and nothing but
//! [`agi`] (the FastAGI listener) and [`lookup`] (its HTTP client) does
//! network I/O.

pub mod agi;
pub mod board;
pub mod calendar;
pub mod lookup;
pub mod overflow;
pub mod redirect;

pub use board::PresenceBoard;
pub use calendar::{Calendar, CalendarError};
pub use lookup::{CallerLookups, LookupSettings};
pub use overflow::{route, Availability, Route, RouteError, Target};
pub use redirect::{redirect, CallerClass, Redirects};

use crate::directory::Directory;
use crate::event::{CallRouting, CallerLookup, Micros, MissedReason, RoutingReason};
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
    redirects: Redirects,
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
        let groups = groups
            .into_iter()
            .map(|(id, calendar, overflow)| (id, GroupRules { calendar, overflow, redirects: Redirects::default() }))
            .collect();
        Routing { dir, groups }
    }

    /// The same rules with these groups' redirects by who is calling
    /// (groups not named keep none; unknown groups are ignored).
    pub fn with_redirects(mut self, redirects: impl IntoIterator<Item = (GroupId, Redirects)>) -> Routing {
        for (id, r) in redirects {
            if let Some(g) = self.groups.get_mut(&id) {
                g.redirects = r;
            }
        }
        self
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

    /// A group's redirects by who is calling (none for unknown groups).
    pub fn redirects(&self, group: &str) -> &Redirects {
        static NONE: Redirects = Redirects { unknown_to: None, inactive_to: None };
        self.groups.get(group).map_or(&NONE, |g| &g.redirects)
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
    /// Who is calling (`[caller_lookup]`); replaced like `routing`.
    lookup: RwLock<Option<Arc<CallerLookups>>>,
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
        RouteOracle { routing: RwLock::new(routing), lookup: RwLock::new(None), presence, clock: Box::new(clock) }
    }

    /// The same oracle, asking `lookup` who is calling.
    pub fn with_lookup(self, lookup: Option<Arc<CallerLookups>>) -> RouteOracle {
        self.reconfigure_lookup(lookup);
        self
    }

    /// Replaces the caller lookup (configuration reload).
    pub fn reconfigure_lookup(&self, lookup: Option<Arc<CallerLookups>>) {
        *self.lookup.write().unwrap_or_else(|e| e.into_inner()) = lookup;
    }

    pub fn lookup(&self) -> Option<Arc<CallerLookups>> {
        self.lookup.read().unwrap_or_else(|e| e.into_inner()).clone()
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

    /// Where a call for `target` should go now, by hours, holidays,
    /// availability and overflow (not by who is calling: see
    /// [`RouteOracle::decide`]).
    pub fn route(&self, target: &Target) -> Result<Route, RouteError> {
        let routing = self.routing();
        route(target, (self.clock)(), &routing, self.presence.as_ref())
    }

    /// Where a call for `target` from caller ID `caller` should go now:
    /// first hours, holidays, availability and overflow ([`route`]); then,
    /// if the group that would take the call redirects unknown or inactive
    /// callers, who is calling ([`redirect`], after asking the lookup). A
    /// lookup that does not answer in time leaves the call on its normal
    /// route (fail open).
    pub async fn decide(&self, target: &Target, caller: Option<&str>) -> Result<Decision, RouteError> {
        let routing = self.routing();
        let at = (self.clock)();
        let first = route(target, at, &routing, self.presence.as_ref())?;
        let note = redirect::overflow_note(&first);
        let mut decision = Decision { route: first, routing: note, caller: None, lookup_failed: None };
        if !redirect::wants_caller(&decision.route, &routing) {
            return Ok(decision);
        }
        let Some(lookup) = self.lookup() else { return Ok(decision) };
        match lookup.lookup(caller.unwrap_or("")).await {
            Ok(answer) => {
                let class = CallerClass::of(&answer);
                let (route, note) = redirect(decision.route, class, at, &routing, self.presence.as_ref());
                if let Some(n) = note.as_ref().filter(|n| n.reason.is_redirect()) {
                    metrics::counter!("callbridge_routing_redirects_total", "reason" => n.reason.as_str()).increment(1);
                }
                decision = Decision { route, routing: note, caller: Some(answer), lookup_failed: None };
            }
            Err(f) => decision.lookup_failed = Some(f),
        }
        Ok(decision)
    }
}

/// What the router decided for a call ([`RouteOracle::decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub route: Route,
    /// The router's last move away from the group asked for: overflow,
    /// or a redirect by who is calling.
    pub routing: Option<CallRouting>,
    /// The helpdesk's answer about the caller, when it was asked and answered.
    pub caller: Option<CallerLookup>,
    /// Why the lookup gave no answer, when it was asked and did not (the
    /// call took its normal route).
    pub lookup_failed: Option<lookup::Failure>,
}

impl Decision {
    /// The reason of a redirect by who is calling, if one moved the call.
    pub fn redirect_reason(&self) -> Option<RoutingReason> {
        self.routing.as_ref().map(|r| r.reason).filter(|r| r.is_redirect())
    }
}
