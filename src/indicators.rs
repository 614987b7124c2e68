//! Group indicators for administrators (SPEC §1, §2): calls offered,
//! answered and missed by reason today (in the group's time zone), calls
//! redirected in and out by who was calling, average and maximum wait, and
//! the service level — the share of answered calls answered within a
//! threshold.
//!
//! Fed by the pipeline with every lifecycle event, in order; read by the API.
//! "Waiting now" and "talking now" come from the registry's live calls, not
//! from here. A call counts once per group and day: in the group it was in
//! when it was answered or missed (the snapshot's group).
//!
//! Memory: one small record per group and day; days before yesterday are
//! dropped.

use crate::config::Config;
use crate::event::{CallId, Event, EventKind, GroupId, Micros};
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::Serialize;
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashMap, HashSet};

/// One group's day.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DayCounts {
    /// Calls that reached the group (queued, or missed for it without joining).
    pub offered: u64,
    pub answered: u64,
    pub missed: u64,
    pub missed_by_reason: BTreeMap<&'static str, u64>,
    /// Waits of the answered calls, in seconds.
    pub wait_seconds_total: u64,
    pub wait_seconds_max: u64,
    pub answered_within_service_level: u64,
    /// Calls sent here from another group by who is calling.
    pub redirected_in: u64,
    /// Calls that would have come here, sent to another group by who is calling.
    pub redirected_out: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct GroupIndicators {
    pub group: String,
    /// The group's local date the counts are for.
    pub date: String,
    pub timezone: String,
    pub waiting_now: u64,
    pub talking_now: u64,
    pub offered: u64,
    pub answered: u64,
    pub missed: u64,
    pub missed_by_reason: BTreeMap<&'static str, u64>,
    /// Calls the router sent here because of who was calling
    /// (`redirect_unknown_to` / `redirect_inactive_to` of another group).
    pub redirected_in: u64,
    /// Calls this group's redirects sent to another group.
    pub redirected_out: u64,
    pub average_wait_seconds: f64,
    pub max_wait_seconds: u64,
    pub service_level_seconds: u64,
    /// Answered within the threshold / answered; `null` before the first answer.
    pub service_level: Option<f64>,
}

#[derive(Debug)]
pub struct Indicators {
    zones: HashMap<String, TimeZone>,
    service_level_seconds: u64,
    days: HashMap<(String, Date), DayCounts>,
    /// Live calls already counted as offered, and for which groups (shared
    /// ids, not copies: one entry per live call, 100,000 at a time and more).
    offered_seen: HashMap<CallId, SmallVec<[GroupId; 1]>, ahash::RandomState>,
    answered_seen: HashSet<CallId, ahash::RandomState>,
}

impl Indicators {
    pub fn new(config: &Config) -> Indicators {
        let zones = config
            .groups
            .iter()
            .map(|g| {
                let tz = crate::config::values::time_zone(&g.timezone).unwrap_or(TimeZone::UTC);
                (g.id.clone(), tz)
            })
            .collect();
        Indicators {
            zones,
            service_level_seconds: config.indicators.service_level_seconds,
            days: HashMap::new(),
            offered_seen: HashMap::default(),
            answered_seen: HashSet::default(),
        }
    }

    /// Applies a configuration reload (zones, threshold); counts are kept.
    pub fn reconfigure(&mut self, config: &Config) {
        let fresh = Indicators::new(config);
        self.zones = fresh.zones;
        self.service_level_seconds = fresh.service_level_seconds;
    }

    fn local_date(&self, group: &str, t: Micros) -> Option<Date> {
        let tz = self.zones.get(group)?;
        let ts = jiff::Timestamp::from_microsecond(t).ok()?;
        Some(ts.to_zoned(tz.clone()).date())
    }

    /// Counts one lifecycle event.
    pub fn apply(&mut self, e: &Event) {
        let Some(call) = &e.call else { return };
        let Some(group_id) = call.group.as_ref() else { return };
        let Some(date) = self.local_date(group_id.as_str(), e.time) else { return };
        let group = group_id.as_str().to_string();
        if matches!(e.kind, EventKind::Queued { .. } | EventKind::Missed { .. }) {
            let seen = self.offered_seen.entry(call.id.clone()).or_default();
            if !seen.contains(group_id) {
                seen.push(group_id.clone());
                self.days.entry((group.clone(), date)).or_default().offered += 1;
                self.count_redirect(call, &group, date, e.time);
            }
        }
        match &e.kind {
            EventKind::Answered { wait_seconds, .. } => {
                if !self.answered_seen.insert(call.id.clone()) {
                    return; // a transfer's second answer is not a second call
                }
                let sl = self.service_level_seconds;
                let d = self.days.entry((group, date)).or_default();
                d.answered += 1;
                d.wait_seconds_total += wait_seconds;
                d.wait_seconds_max = d.wait_seconds_max.max(*wait_seconds);
                if *wait_seconds <= sl {
                    d.answered_within_service_level += 1;
                }
            }
            EventKind::Missed { reason, .. } => {
                let d = self.days.entry((group, date)).or_default();
                d.missed += 1;
                *d.missed_by_reason.entry(reason.as_str()).or_default() += 1;
            }
            EventKind::Ended { .. } => {
                self.answered_seen.remove(call.id.as_str());
                self.offered_seen.remove(call.id.as_str());
            }
            _ => {}
        }
    }

    /// A call arriving in `group` because another group redirected it:
    /// in for `group`, out for the other (on its own local date).
    fn count_redirect(&mut self, call: &crate::event::CallSnapshot, group: &str, date: Date, t: Micros) {
        let Some(from) = call.routing.as_ref().filter(|r| r.reason.is_redirect()).and_then(|r| r.from_group.as_ref())
        else {
            return;
        };
        if from.as_str() == group {
            return;
        }
        self.days.entry((group.to_string(), date)).or_default().redirected_in += 1;
        if let Some(from_date) = self.local_date(from.as_str(), t) {
            self.days.entry((from.to_string(), from_date)).or_default().redirected_out += 1;
        }
    }

    /// Drops days older than yesterday (relative to `now` in each zone).
    pub fn prune(&mut self, now: Micros) {
        let keep: HashMap<String, Date> = self
            .zones
            .keys()
            .filter_map(|g| self.local_date(g, now).and_then(|d| d.yesterday().ok()).map(|d| (g.clone(), d)))
            .collect();
        self.days.retain(|(g, d), _| keep.get(g).is_none_or(|y| d >= y));
    }

    /// The indicators of `group` for its current local day at `now`.
    pub fn report(&self, group: &str, now: Micros, waiting_now: u64, talking_now: u64) -> Option<GroupIndicators> {
        let tz = self.zones.get(group)?;
        let date = self.local_date(group, now)?;
        let d = self.days.get(&(group.to_string(), date)).cloned().unwrap_or_default();
        Some(GroupIndicators {
            group: group.to_string(),
            date: date.to_string(),
            timezone: tz.iana_name().unwrap_or("UTC").to_string(),
            waiting_now,
            talking_now,
            offered: d.offered,
            answered: d.answered,
            missed: d.missed,
            missed_by_reason: d.missed_by_reason,
            redirected_in: d.redirected_in,
            redirected_out: d.redirected_out,
            average_wait_seconds: if d.answered == 0 { 0.0 } else { d.wait_seconds_total as f64 / d.answered as f64 },
            max_wait_seconds: d.wait_seconds_max,
            service_level_seconds: self.service_level_seconds,
            service_level: (d.answered > 0).then(|| d.answered_within_service_level as f64 / d.answered as f64),
        })
    }
}
