//! Redirects by who is calling (SPEC §2, "Parameters"): the step after
//! hours, holidays, availability and overflow.
//!
//! [`redirect`] is a pure function like [`route`]: given where the call
//! would go ([`route`]'s answer) and who the caller is ([`CallerClass`],
//! from the helpdesk lookup), it follows the redirect rules of the group
//! that would take the call: an unknown caller goes to its
//! `redirect_unknown_to`, an inactive one to its `redirect_inactive_to`.
//! The target is routed with its own rules (hours, holidays, availability,
//! its overflow list, and in turn its own redirects). No group is left by a
//! redirect twice nor gone back to, so the walk ends whatever it is given
//! (cycles through overflow and redirects are also refused when the
//! configuration is loaded).
//! A call that would be missed is not redirected: it is missed for the
//! group asked for, with that group's reason.

use super::overflow::{route, Availability, Route, Target};
use super::Routing;
use crate::event::{CallRouting, CallerLookup, Micros, RoutingReason};
use crate::ids::GroupId;
use std::collections::HashSet;

/// Who the caller is, as far as redirects go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerClass {
    /// A contact has the number and is active (or the helpdesk does not
    /// say whether it is): no redirect.
    Known,
    /// A contact has the number but is inactive: `redirect_inactive_to`.
    Inactive,
    /// No contact has the number (or there is none to look up):
    /// `redirect_unknown_to`.
    Unknown,
}

impl CallerClass {
    pub fn of(lookup: &CallerLookup) -> CallerClass {
        match (lookup.found, lookup.active) {
            (false, _) => CallerClass::Unknown,
            (true, Some(false)) => CallerClass::Inactive,
            (true, _) => CallerClass::Known,
        }
    }
}

/// A group's redirects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redirects {
    pub unknown_to: Option<GroupId>,
    pub inactive_to: Option<GroupId>,
}

impl Redirects {
    pub fn is_empty(&self) -> bool {
        self.unknown_to.is_none() && self.inactive_to.is_none()
    }

    fn for_caller(&self, caller: CallerClass) -> Option<(&GroupId, RoutingReason)> {
        match caller {
            CallerClass::Known => None,
            CallerClass::Inactive => self.inactive_to.as_ref().map(|g| (g, RoutingReason::CallerInactive)),
            CallerClass::Unknown => self.unknown_to.as_ref().map(|g| (g, RoutingReason::CallerUnknown)),
        }
    }
}

/// What the router moved: overflow (the route's `diverted_from`), if any.
pub fn overflow_note(route: &Route) -> Option<CallRouting> {
    match route {
        Route::Queue { diverted_from: Some(from), .. } => {
            Some(CallRouting { reason: RoutingReason::Overflow, from_group: Some(from.clone()) })
        }
        _ => None,
    }
}

/// Whether the group that would take the call (`first`) redirects anyone:
/// only then is the caller worth looking up.
pub fn wants_caller(first: &Route, routing: &Routing) -> bool {
    matches!(first, Route::Queue { group, .. } if !routing.redirects(group.as_str()).is_empty())
}

/// Where the call goes once the caller is known, and the router's last
/// move (overflow, or the redirect that moved it last).
pub fn redirect(
    first: Route,
    caller: CallerClass,
    at: Micros,
    routing: &Routing,
    availability: &dyn Availability,
) -> (Route, Option<CallRouting>) {
    let mut note = overflow_note(&first);
    let mut current = first;
    // Groups a redirect left: none is left twice, nor gone back to.
    let mut left: HashSet<GroupId> = HashSet::new();
    while let Route::Queue { group, .. } = &current {
        let Some((target, reason)) = routing.redirects(group.as_str()).for_caller(caller) else { break };
        if !left.insert(group.clone()) || left.contains(target) {
            break;
        }
        let Ok(next) = route(&Target::Group(target.to_string()), at, routing, availability) else { break };
        note = Some(CallRouting { reason, from_group: Some(group.clone()) });
        current = next;
    }
    (current, note)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::ids::AgentId;

    /// support → unknown: triage, inactive: former; triage → unknown:
    /// night (a chain); former is closed on Saturdays and overflows to
    /// support; night is always closed (no overflow).
    const CONFIG: &str = r#"
[pbx]
name = "t"
[caller_lookup]
url = "http://127.0.0.1:9/{number}"
[[groups]]
id = "support"
queue = "700"
agents = ["a"]
redirect_unknown_to = "triage"
redirect_inactive_to = "former"
[[groups]]
id = "triage"
queue = "701"
agents = ["b"]
redirect_unknown_to = "night"
[[groups]]
id = "former"
queue = "702"
agents = ["c"]
hours = [{ days = "mon-fri", from = "00:00", to = "24:00" }]
overflow = ["sales"]
[[groups]]
id = "night"
queue = "703"
agents = ["d"]
hours = [{ days = "sun", from = "00:00", to = "01:00" }]
[[groups]]
id = "sales"
queue = "704"
agents = ["e"]
[[agents]]
id = "a"
extension = "1"
[[agents]]
id = "b"
extension = "2"
[[agents]]
id = "c"
extension = "3"
[[agents]]
id = "d"
extension = "4"
[[agents]]
id = "e"
extension = "5"
"#;

    fn routing() -> Routing {
        let config = Config::parse(CONFIG, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        crate::settings::routing(&config).expect("rules")
    }

    fn at(utc: &str) -> Micros {
        utc.parse::<jiff::Timestamp>().expect("instant").as_microsecond()
    }

    const MONDAY: &str = "2026-11-23T12:00:00Z";
    const SATURDAY: &str = "2026-11-28T12:00:00Z";

    fn everyone(_: &AgentId, _: &str) -> bool {
        true
    }

    fn decide(target: &str, caller: CallerClass, when: &str) -> (String, Option<(RoutingReason, String)>) {
        let r = routing();
        let first = route(&Target::Group(target.into()), at(when), &r, &everyone).expect("known");
        let (route, note) = redirect(first, caller, at(when), &r, &everyone);
        let to = match route {
            Route::Queue { group, .. } => group.to_string(),
            Route::Missed { group, reason } => format!("missed {group} {}", reason.as_str()),
        };
        (to, note.map(|n| (n.reason, n.from_group.map(|g| g.to_string()).unwrap_or_default())))
    }

    #[test]
    fn callers_are_sent_where_the_group_that_would_take_them_says() {
        use CallerClass::*;
        use RoutingReason::*;
        let s = |x: &str| x.to_string();
        assert_eq!(decide("support", Known, MONDAY), (s("support"), None));
        assert_eq!(decide("support", Inactive, MONDAY), (s("former"), Some((CallerInactive, s("support")))));
        // The target's own rules apply: former is closed on Saturdays and
        // overflows to sales.
        assert_eq!(decide("support", Inactive, SATURDAY), (s("sales"), Some((CallerInactive, s("support")))));
        // And its own redirects: triage sends unknown callers on to night,
        // which is closed without overflow: missed for night.
        assert_eq!(
            decide("support", Unknown, MONDAY),
            (s("missed night outside_hours"), Some((CallerUnknown, s("triage"))))
        );
        // triage redirects nobody inactive.
        assert_eq!(decide("triage", Inactive, MONDAY), (s("triage"), None));
        // A call missed before the caller matters is not redirected.
        assert_eq!(decide("night", Unknown, MONDAY), (s("missed night outside_hours"), None));
    }

    #[test]
    fn the_lookup_is_wanted_only_where_a_redirect_could_apply() {
        let r = routing();
        let q = |g: &str| Route::Queue { group: GroupId::new(g), queue: "x".into(), diverted_from: None };
        assert!(wants_caller(&q("support"), &r));
        assert!(wants_caller(&q("triage"), &r));
        assert!(!wants_caller(&q("sales"), &r));
        let missed = Route::Missed { group: GroupId::new("support"), reason: crate::event::MissedReason::NoAgents };
        assert!(!wants_caller(&missed, &r));
    }

    #[test]
    fn redirects_never_loop_even_when_the_configuration_was_not_checked() {
        let r = routing().with_redirects([(
            GroupId::new("triage"),
            Redirects { unknown_to: Some(GroupId::new("support")), inactive_to: None },
        )]);
        let first = Route::Queue { group: GroupId::new("support"), queue: "700".into(), diverted_from: None };
        let (route, note) = redirect(first, CallerClass::Unknown, at(MONDAY), &r, &everyone);
        assert!(matches!(route, Route::Queue { group, .. } if group.as_str() == "triage"));
        assert_eq!(note.map(|n| n.reason), Some(RoutingReason::CallerUnknown));
    }

    #[test]
    fn caller_classes() {
        let l = |found, active| CallerLookup { found, active, contact_id: None };
        assert_eq!(CallerClass::of(&l(false, None)), CallerClass::Unknown);
        assert_eq!(CallerClass::of(&l(true, Some(false))), CallerClass::Inactive);
        assert_eq!(CallerClass::of(&l(true, Some(true))), CallerClass::Known);
        assert_eq!(CallerClass::of(&l(true, None)), CallerClass::Known);
    }
}
