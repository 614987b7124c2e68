//! Parsers for the configuration's textual values: day lists (`mon-fri`),
//! clock times (`08:00`), dates (`2026-12-25`), IANA time zones and
//! `host:port` addresses.
//!
//! Validation and the runtime (business hours, holidays, connecting to the
//! PBX) use the same functions, so a value that passed `check-config` means
//! the same thing when the daemon runs. Error messages quote the offending
//! value; these parsers must therefore never be handed a secret.

use jiff::civil::{Date, Weekday};
use jiff::tz::{TimeZone, TimeZoneDatabase};
use std::fmt;
use std::sync::OnceLock;

/// A value that does not parse; the message says why and what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

fn invalid(msg: impl Into<String>) -> InvalidValue {
    InvalidValue(msg.into())
}

const DAY_NAMES: [(&str, &str); 7] = [
    ("mon", "monday"),
    ("tue", "tuesday"),
    ("wed", "wednesday"),
    ("thu", "thursday"),
    ("fri", "friday"),
    ("sat", "saturday"),
    ("sun", "sunday"),
];

/// A set of weekdays (bit 0 = Monday … bit 6 = Sunday).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Days(u8);

impl Days {
    pub const ALL: Days = Days(0x7f);

    pub fn contains(self, day: Weekday) -> bool {
        self.0 & (1 << day.to_monday_zero_offset()) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn with(self, monday_zero: usize) -> Days {
        Days(self.0 | (1 << monday_zero))
    }
}

impl fmt::Debug for Days {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Canonical short form: `mon-fri`, `sat,sun`, `mon-wed,fri`.
impl fmt::Display for Days {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < 7 {
            if self.0 & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i + 1 < 7 && self.0 & (1 << (i + 1)) != 0 {
                i += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            let name = |d: usize| DAY_NAMES.get(d).map_or("?", |n| n.0);
            match i - start {
                0 => f.write_str(name(start))?,
                1 => write!(f, "{},{}", name(start), name(i))?,
                _ => write!(f, "{}-{}", name(start), name(i))?,
            }
            i += 1;
        }
        Ok(())
    }
}

fn day_index(name: &str) -> Result<usize, InvalidValue> {
    let lower = name.trim().to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|(short, long)| lower == *short || lower == *long)
        .ok_or_else(|| invalid(format!("unknown day {:?} (use mon, tue, wed, thu, fri, sat, sun)", name.trim())))
}

/// Parses a day list: comma-separated days or `first-last` ranges, e.g.
/// `mon-fri`, `sat,sun`, `mon-wed,fri`. A range may wrap around the week
/// (`fri-mon` is Friday to Monday). Full names (`monday`) are accepted too.
pub fn parse_days(text: &str) -> Result<Days, InvalidValue> {
    if text.trim().is_empty() {
        return Err(invalid("empty day list (e.g. \"mon-fri\", \"sat,sun\", \"mon-wed,fri\")"));
    }
    let mut days = Days::default();
    for token in text.split(',') {
        if token.trim().is_empty() {
            return Err(invalid(format!("empty entry in day list {text:?}")));
        }
        match token.split_once('-') {
            None => days = days.with(day_index(token)?),
            Some((first, last)) => {
                let (first, last) = (day_index(first)?, day_index(last)?);
                let mut d = first;
                loop {
                    days = days.with(d);
                    if d == last {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
        }
    }
    Ok(days)
}

/// Parses a clock time `HH:MM` (or `H:MM`) into minutes after midnight.
/// `24:00` (end of day, 1440) is accepted only when `end_of_day_ok`.
pub fn parse_clock(text: &str, end_of_day_ok: bool) -> Result<u16, InvalidValue> {
    let bad = || invalid(format!("{text:?} is not a time of day (expected HH:MM, 00:00 to 24:00)"));
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(h) || h.len() > 2 || !digits(m) || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    if h == 24 && !end_of_day_ok {
        return Err(invalid("24:00 is only valid as the end of a range (`to`); use 00:00 to start at midnight"));
    }
    Ok(h * 60 + m)
}

/// Parses a calendar date written exactly `YYYY-MM-DD`.
pub fn parse_date(text: &str) -> Result<Date, InvalidValue> {
    let b = text.as_bytes();
    let shape = b.len() == 10
        && b.get(4) == Some(&b'-')
        && b.get(7) == Some(&b'-')
        && b.iter().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape {
        return Err(invalid(format!("{text:?} is not a date (expected YYYY-MM-DD)")));
    }
    let num = |r: std::ops::Range<usize>| text.get(r).and_then(|t| t.parse::<i16>().ok()).unwrap_or(0);
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // The shape check above makes every field fit its type.
    Date::new(y, m as i8, d as i8).map_err(|_| invalid(format!("{text:?} is not a calendar date")))
}

/// The bundled copy of the IANA database (the `tzdb-bundle-always` feature
/// of jiff), used when the host has no usable `/usr/share/zoneinfo`.
fn bundled_tzdb() -> &'static TimeZoneDatabase {
    static DB: OnceLock<TimeZoneDatabase> = OnceLock::new();
    DB.get_or_init(TimeZoneDatabase::bundled)
}

/// Resolves an IANA time zone name (`America/Sao_Paulo`, `UTC`).
///
/// The host's database is preferred (it is updated with the OS); the copy
/// bundled into the binary is the fallback, so a name valid at build time
/// always resolves, even in a container without `/usr/share/zoneinfo`.
pub fn time_zone(name: &str) -> Result<TimeZone, InvalidValue> {
    if name.trim().is_empty() {
        return Err(invalid("empty time zone name (e.g. \"America/Sao_Paulo\")"));
    }
    jiff::tz::db().get(name).or_else(|_| bundled_tzdb().get(name)).map_err(|_| {
        invalid(format!("unknown time zone {name:?} (expected an IANA name such as \"America/Sao_Paulo\" or \"UTC\")"))
    })
}

/// Checks a `host:port` address: an IPv4 address, a bracketed IPv6 address
/// (`[::1]:5038`) or a DNS name, and a port 1–65535. Returns (host, port).
pub fn parse_host_port(text: &str) -> Result<(&str, u16), InvalidValue> {
    let expected = "expected host:port, e.g. \"127.0.0.1:5038\" or \"pbx.example:5038\"";
    if text.contains("://") {
        return Err(invalid(format!("{text:?} has a URL scheme; {expected}")));
    }
    if let Ok(addr) = text.parse::<std::net::SocketAddr>() {
        if addr.port() == 0 {
            return Err(invalid(format!("{text:?}: port 0 is not a valid port")));
        }
        let host = text.rsplit_once(':').map_or(text, |(h, _)| h);
        return Ok((host, addr.port()));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(invalid(format!("{text:?} has no port; {expected}")));
    };
    if host.contains(':') {
        return Err(invalid(format!("{text:?}: an IPv6 address needs brackets, e.g. \"[::1]:5038\"")));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(invalid(format!("{text:?}: {port:?} is not a port (1-65535)"))),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(invalid(format!("{text:?}: {host:?} is not a host name or IP address; {expected}")));
    }
    Ok((host, port))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
mod tests {
    use super::*;

    #[test]
    fn day_lists() {
        let d = parse_days("mon-fri").unwrap();
        assert!(d.contains(Weekday::Monday) && d.contains(Weekday::Friday));
        assert!(!d.contains(Weekday::Saturday));
        assert_eq!(parse_days("sat,sun").unwrap().to_string(), "sat,sun");
        assert_eq!(parse_days("mon-wed,fri").unwrap().to_string(), "mon-wed,fri");
        assert_eq!(parse_days("Monday - Tuesday").unwrap().to_string(), "mon,tue");
        assert_eq!(parse_days("fri-mon").unwrap().to_string(), "mon,fri-sun");
        assert_eq!(parse_days("mon-sun").unwrap(), Days::ALL);
        assert!(parse_days("").is_err());
        assert!(parse_days("mon,,fri").is_err());
        assert!(parse_days("mun-fri").unwrap_err().0.contains("\"mun\""));
    }

    #[test]
    fn clock_times() {
        assert_eq!(parse_clock("08:00", false), Ok(480));
        assert_eq!(parse_clock("8:30", false), Ok(510));
        assert_eq!(parse_clock("00:00", false), Ok(0));
        assert_eq!(parse_clock("24:00", true), Ok(1440));
        assert!(parse_clock("24:00", false).is_err());
        for bad in ["24:01", "25:00", "12:60", "12", "12:5", "ab:cd", "-1:00", "123:00", ""] {
            assert!(parse_clock(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date("2026-12-25").unwrap(), jiff::civil::date(2026, 12, 25));
        for bad in ["2026-02-30", "2026-13-01", "2026-1-01", "20261225", "25/12/2026", ""] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn time_zones_resolve_from_the_bundled_database() {
        assert!(time_zone("America/Sao_Paulo").is_ok());
        assert!(time_zone("UTC").is_ok());
        assert!(time_zone("Mars/Olympus_Mons").is_err());
        // The fallback works without any system database.
        assert!(bundled_tzdb().get("America/Sao_Paulo").is_ok());
        assert!(!bundled_tzdb().is_definitively_empty());
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_host_port("127.0.0.1:5038").unwrap(), ("127.0.0.1", 5038));
        assert_eq!(parse_host_port("[::1]:5038").unwrap(), ("[::1]", 5038));
        assert_eq!(parse_host_port("pbx.example:5039").unwrap(), ("pbx.example", 5039));
        for bad in ["127.0.0.1", "pbx:0", "pbx:99999", "::1:5038", "tcp://pbx:5038", ":5038", "pbx host:5038"] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }
}
