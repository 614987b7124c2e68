//! A group's calendar: weekly business hours in the group's IANA time zone
//! and holiday dates (SPEC §2). Answers one question: at this instant, is
//! the group open, or closed for a holiday, or outside its hours?
//!
//! Semantics, all in the group's local wall-clock time:
//!
//! - No hours at all: always open (except on holidays).
//! - A range `{ days = "mon-fri", from = "08:00", to = "18:00" }` is open
//!   from `from` (included) to `to` (excluded) on each listed day. Several
//!   ranges may cover the same day; a day is open if any range says so.
//! - `to` earlier than `from` crosses midnight: `{ days = "fri", from =
//!   "22:00", to = "02:00" }` is Friday 22:00 to Saturday 02:00 (the days
//!   name the day the range *starts*). `to = "24:00"` ends at midnight.
//! - A holiday closes its whole local date, 00:00 to 24:00, including the
//!   part of an overnight range that falls on it; the part after midnight of
//!   an overnight range that started on a holiday is open (it is another
//!   date).
//! - Daylight-saving time is the time-zone database's business (jiff,
//!   bundled IANA data): an instant is turned into local wall-clock time and
//!   compared with the ranges. There is never a fixed UTC offset here. On the
//!   day clocks go forward the skipped local times simply never occur; on
//!   the day they go back the repeated hour is open (or closed) twice.
//!
//! Built on the configuration's own parsers (`config::values`), so a value
//! `check-config` accepted means the same here. This module must never read
//! a clock: the instant is always given.

use crate::config::values::{self, InvalidValue};
use crate::config::{GroupConfig, HolidaysConfig, ParsedHours};
use crate::event::{Micros, MissedReason};
use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use std::collections::BTreeSet;

/// A calendar value that cannot be used, with the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct CalendarError {
    /// Field path, e.g. `groups[0].hours[1].to`.
    pub field: String,
    pub reason: String,
}

/// When one group takes calls.
#[derive(Debug, Clone)]
pub struct Calendar {
    zone: TimeZone,
    zone_name: String,
    /// Empty: always open.
    hours: Vec<ParsedHours>,
    holidays: BTreeSet<Date>,
}

impl Calendar {
    /// A calendar from already parsed parts. Ranges with `from == to` (empty)
    /// or out-of-day minutes are refused.
    pub fn new(
        zone_name: &str,
        hours: Vec<ParsedHours>,
        holidays: impl IntoIterator<Item = Date>,
    ) -> Result<Calendar, InvalidValue> {
        let zone = values::time_zone(zone_name)?;
        for h in &hours {
            check_range(h)?;
        }
        Ok(Calendar { zone, zone_name: zone_name.to_string(), hours, holidays: holidays.into_iter().collect() })
    }

    /// The calendar of `groups[index]`: its hours, its own holidays and,
    /// with `use_global_holidays`, the global ones. Every unusable value is
    /// reported with its field path.
    pub fn from_group(
        index: usize,
        group: &GroupConfig,
        global: &HolidaysConfig,
    ) -> Result<Calendar, Vec<CalendarError>> {
        let at = |field: String| move |e: InvalidValue| CalendarError { field, reason: e.0 };
        let mut problems = Vec::new();
        let zone = values::time_zone(&group.timezone).map_err(at(format!("groups[{index}].timezone")));
        let mut hours = Vec::with_capacity(group.hours.len());
        for (j, h) in group.hours.iter().enumerate() {
            let path = format!("groups[{index}].hours[{j}]");
            let days = values::parse_days(&h.days).map_err(at(format!("{path}.days")));
            let from = values::parse_clock(&h.from, false).map_err(at(format!("{path}.from")));
            let to = values::parse_clock(&h.to, true).map_err(at(format!("{path}.to")));
            match (days, from, to) {
                (Ok(days), Ok(from_minute), Ok(to_minute)) => {
                    let parsed = ParsedHours { days, from_minute, to_minute };
                    match check_range(&parsed) {
                        Ok(()) => hours.push(parsed),
                        Err(e) => problems.push(at(path)(e)),
                    }
                }
                (days, from, to) => problems.extend([days.err(), from.err(), to.err()].into_iter().flatten()),
            }
        }
        let mut holidays = BTreeSet::new();
        for (j, d) in group.holidays.iter().enumerate() {
            match values::parse_date(d) {
                Ok(date) => {
                    holidays.insert(date);
                }
                Err(e) => problems.push(at(format!("groups[{index}].holidays[{j}]"))(e)),
            }
        }
        if group.use_global_holidays {
            for (j, d) in global.dates.iter().enumerate() {
                match values::parse_date(d) {
                    Ok(date) => {
                        holidays.insert(date);
                    }
                    Err(e) => problems.push(at(format!("holidays.dates[{j}]"))(e)),
                }
            }
        }
        match zone {
            Ok(zone) if problems.is_empty() => {
                Ok(Calendar { zone, zone_name: group.timezone.clone(), hours, holidays })
            }
            Ok(_) => Err(problems),
            Err(e) => {
                problems.insert(0, e);
                Err(problems)
            }
        }
    }

    /// The IANA name of the calendar's time zone.
    pub fn zone_name(&self) -> &str {
        &self.zone_name
    }

    /// True when the group has business hours (otherwise it is open
    /// whenever it is not a holiday).
    pub fn has_hours(&self) -> bool {
        !self.hours.is_empty()
    }

    /// Why the group is closed at `at` (PBX time, µs since the epoch):
    /// `Holiday` on a holiday (it wins over hours), `OutsideHours` outside
    /// every range, `None` when open. An instant jiff cannot represent
    /// (beyond ±9999 years) counts as open.
    pub fn closed_reason(&self, at: Micros) -> Option<MissedReason> {
        let ts = Timestamp::from_microsecond(at).ok()?;
        self.closed_reason_at(ts)
    }

    /// [`Calendar::closed_reason`] for a [`Timestamp`].
    pub fn closed_reason_at(&self, ts: Timestamp) -> Option<MissedReason> {
        let local = self.zone.to_datetime(ts);
        let date = local.date();
        if self.holidays.contains(&date) {
            return Some(MissedReason::Holiday);
        }
        if self.hours.is_empty() {
            return None;
        }
        let minute = u16::try_from(i32::from(local.hour()) * 60 + i32::from(local.minute())).unwrap_or(0);
        let today = date.weekday();
        let yesterday = today.previous();
        let open = self.hours.iter().any(|h| {
            if h.from_minute < h.to_minute {
                h.days.contains(today) && h.from_minute <= minute && minute < h.to_minute
            } else {
                // Crosses midnight: the evening part today, or the morning
                // part of a range that started yesterday.
                (h.days.contains(today) && minute >= h.from_minute)
                    || (h.days.contains(yesterday) && minute < h.to_minute)
            }
        });
        (!open).then_some(MissedReason::OutsideHours)
    }

    /// Open at `at`: not a holiday and within hours.
    pub fn is_open(&self, at: Micros) -> bool {
        self.closed_reason(at).is_none()
    }
}

fn check_range(h: &ParsedHours) -> Result<(), InvalidValue> {
    if h.days.is_empty() {
        return Err(InvalidValue("no days in the range".into()));
    }
    if h.from_minute >= 24 * 60 || h.to_minute > 24 * 60 {
        return Err(InvalidValue("times must be within 00:00 and 24:00".into()));
    }
    if h.from_minute == h.to_minute {
        return Err(InvalidValue(
            "empty range (from equals to); for a whole day use from = \"00:00\", to = \"24:00\"".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HoursRange;

    fn range(days: &str, from: &str, to: &str) -> ParsedHours {
        HoursRange { days: days.into(), from: from.into(), to: to.into() }.parse().expect("valid range")
    }

    #[test]
    fn new_refuses_empty_ranges_and_unknown_zones() {
        let empty = ParsedHours { days: values::Days::ALL, from_minute: 60, to_minute: 60 };
        assert!(Calendar::new("UTC", vec![empty], []).unwrap_err().0.contains("empty range"));
        assert!(Calendar::new("Nowhere/Special", vec![], []).unwrap_err().0.contains("Nowhere/Special"));
        let ok = Calendar::new("UTC", vec![range("mon", "00:00", "24:00")], []).expect("valid");
        assert!(ok.has_hours());
        assert_eq!(ok.zone_name(), "UTC");
    }

    #[test]
    fn out_of_range_instants_count_as_open() {
        let c = Calendar::new("UTC", vec![range("mon", "08:00", "09:00")], []).expect("valid");
        assert_eq!(c.closed_reason(i64::MAX), None);
    }
}
