//! Helpdesk rules (SPEC §2, §4): calendars in the groups' time zones,
//! holidays, overflow, and what they do to the recorded traces.
//!
//! Instants are written in UTC and commented with the local time they are in
//! the group's zone; DST cases use `America/Sao_Paulo` history (Brazil had
//! DST until February 2019) and `Europe/Lisbon`.

mod lifecycle_checks;

use callbridge::ami::Frame;
use callbridge::config::Config;
use callbridge::event::{Event, EventKind, MissedReason};
use callbridge::ids::AgentId;
use callbridge::normalize::Normalizer;
use callbridge::replay::events_of;
use callbridge::routing::{route, Calendar, PresenceBoard, Route, RouteError, RouteOracle, Target};
use std::path::PathBuf;
use std::sync::Arc;

fn micros(utc: &str) -> i64 {
    utc.parse::<jiff::Timestamp>().unwrap_or_else(|e| panic!("{utc}: {e}")).as_microsecond()
}

const AGENTS: &str = r#"
[[agents]]
id = "maria"
name = "Maria Silva"
extension = "2000"
[[agents]]
id = "joao"
name = "Joao Souza"
extension = "2001"
[[agents]]
id = "ana"
name = "Ana Costa"
extension = "2002"
[[agents]]
id = "rui"
name = "Rui Lopes"
extension = "2003"
"#;

/// A configuration with one group `g` whose calendar is `calendar` (TOML
/// keys of the group), and global holidays 2026-12-25 and 2027-01-01.
fn one_group(calendar: &str) -> String {
    format!(
        r#"
[pbx]
name = "t"
[holidays]
dates = ["2026-12-25", "2027-01-01"]
[[groups]]
id = "g"
queue = "700"
agents = ["maria"]
{calendar}
{AGENTS}"#
    )
}

fn calendar_of(calendar: &str) -> Calendar {
    let config = Config::parse(&one_group(calendar), "test.toml").unwrap_or_else(|e| panic!("{calendar}:\n{e}"));
    let routing = callbridge::settings::routing(&config).unwrap_or_else(|e| panic!("{calendar}:\n{e}"));
    routing.calendar("g").expect("group g").clone()
}

const OPEN: Option<MissedReason> = None;
const OUTSIDE: Option<MissedReason> = Some(MissedReason::OutsideHours);
const HOLIDAY: Option<MissedReason> = Some(MissedReason::Holiday);

/// (calendar, [(instant in UTC, local time for the reader, expected)]).
type CalendarCase = (&'static str, &'static [(&'static str, &'static str, Option<MissedReason>)]);

const CALENDAR_CASES: &[CalendarCase] = &[
    (
        // The issue's example; Sao Paulo has been UTC-3 all year since 2019.
        r#"timezone = "America/Sao_Paulo"
hours = [{ days = "mon-fri", from = "08:00", to = "18:00" }]"#,
        &[
            ("2026-11-23T21:58:00Z", "Mon 18:58 (the fixture traces)", OUTSIDE),
            ("2026-11-23T11:00:00Z", "Mon 08:00", OPEN),
            ("2026-11-23T10:59:59Z", "Mon 07:59:59", OUTSIDE),
            ("2026-11-23T20:59:59Z", "Mon 17:59:59", OPEN),
            ("2026-11-23T21:00:00Z", "Mon 18:00 (to is excluded)", OUTSIDE),
            ("2026-11-27T20:30:00Z", "Fri 17:30", OPEN),
            ("2026-11-28T15:00:00Z", "Sat 12:00", OUTSIDE),
            ("2026-11-29T15:00:00Z", "Sun 12:00", OUTSIDE),
            ("2026-11-24T01:00:00Z", "Mon 22:00 (Tuesday in UTC)", OUTSIDE),
            // DST, summer 2018/19: UTC-2. A fixed UTC-3 would get all of these wrong.
            ("2018-11-05T10:30:00Z", "Mon 08:30 -02", OPEN),
            ("2018-11-05T20:30:00Z", "Mon 18:30 -02", OUTSIDE),
            ("2019-02-15T10:30:00Z", "Fri 08:30 -02, last DST week", OPEN),
            ("2019-02-15T20:30:00Z", "Fri 18:30 -02", OUTSIDE),
            // Before and after it: UTC-3.
            ("2018-11-02T10:30:00Z", "Fri 07:30 -03", OUTSIDE),
            ("2019-02-18T10:30:00Z", "Mon 07:30 -03, DST over", OUTSIDE),
            ("2019-02-18T20:30:00Z", "Mon 17:30 -03", OPEN),
        ],
    ),
    (
        // 2018-11-04 00:00 did not exist in Sao Paulo: clocks jumped to 01:00.
        r#"timezone = "America/Sao_Paulo"
hours = [{ days = "sun", from = "00:00", to = "01:00" }]"#,
        &[
            ("2018-11-04T02:59:59Z", "Sat 23:59:59 -03", OUTSIDE),
            ("2018-11-04T03:00:00Z", "Sun 01:00 -02 (00:xx skipped)", OUTSIDE),
            ("2018-11-11T02:30:00Z", "Sun 00:30 -02, a week later", OPEN),
            ("2018-10-28T03:30:00Z", "Sun 00:30 -03, a week before", OPEN),
        ],
    ),
    (
        r#"timezone = "Europe/Lisbon"
hours = [{ days = "mon-fri", from = "08:00", to = "18:00" }]"#,
        &[
            ("2026-03-27T07:30:00Z", "Fri 07:30 WET", OUTSIDE),
            ("2026-03-27T08:00:00Z", "Fri 08:00 WET", OPEN),
            ("2026-03-30T07:30:00Z", "Mon 08:30 WEST (clocks went forward Sunday)", OPEN),
            ("2026-03-30T16:59:59Z", "Mon 17:59:59 WEST", OPEN),
            ("2026-03-30T17:30:00Z", "Mon 18:30 WEST", OUTSIDE),
            ("2026-10-23T07:30:00Z", "Fri 08:30 WEST", OPEN),
            ("2026-10-26T07:30:00Z", "Mon 07:30 WET (clocks went back Sunday)", OUTSIDE),
            ("2026-10-26T08:00:00Z", "Mon 08:00 WET", OPEN),
        ],
    ),
    (
        // A range on the transition nights themselves.
        r#"timezone = "Europe/Lisbon"
hours = [{ days = "sun", from = "01:00", to = "03:00" }]"#,
        &[
            ("2026-03-29T00:30:00Z", "Sun 00:30 WET", OUTSIDE),
            ("2026-03-29T01:00:00Z", "Sun 02:00 WEST (01:xx skipped)", OPEN),
            ("2026-03-29T01:59:59Z", "Sun 02:59:59 WEST", OPEN),
            ("2026-03-29T02:00:00Z", "Sun 03:00 WEST", OUTSIDE),
            ("2026-10-25T00:30:00Z", "Sun 01:30 WEST", OPEN),
            ("2026-10-25T01:30:00Z", "Sun 01:30 WET (the hour again)", OPEN),
            ("2026-10-25T02:30:00Z", "Sun 02:30 WET", OPEN),
            ("2026-10-25T03:00:00Z", "Sun 03:00 WET", OUTSIDE),
        ],
    ),
    (
        // Several ranges a day.
        r#"timezone = "America/Sao_Paulo"
hours = [
  { days = "mon-fri", from = "08:00", to = "12:00" },
  { days = "mon-fri", from = "13:00", to = "18:00" },
  { days = "sat", from = "09:00", to = "13:00" },
]"#,
        &[
            ("2026-11-23T14:59:00Z", "Mon 11:59", OPEN),
            ("2026-11-23T15:30:00Z", "Mon 12:30 (lunch)", OUTSIDE),
            ("2026-11-23T16:00:00Z", "Mon 13:00", OPEN),
            ("2026-11-28T13:00:00Z", "Sat 10:00", OPEN),
            ("2026-11-28T17:00:00Z", "Sat 14:00", OUTSIDE),
            ("2026-11-29T13:00:00Z", "Sun 10:00", OUTSIDE),
        ],
    ),
    (
        // Across midnight: the days name the evening the range starts.
        r#"timezone = "UTC"
hours = [{ days = "fri", from = "22:00", to = "02:00" }, { days = "sat,sun", from = "10:00", to = "14:00" }]"#,
        &[
            ("2026-11-27T01:00:00Z", "Fri 01:00 (Thursday night is not listed)", OUTSIDE),
            ("2026-11-27T21:59:59Z", "Fri 21:59:59", OUTSIDE),
            ("2026-11-27T22:00:00Z", "Fri 22:00", OPEN),
            ("2026-11-27T23:59:59Z", "Fri 23:59:59", OPEN),
            ("2026-11-28T00:00:00Z", "Sat 00:00", OPEN),
            ("2026-11-28T01:59:59Z", "Sat 01:59:59", OPEN),
            ("2026-11-28T02:00:00Z", "Sat 02:00", OUTSIDE),
            ("2026-11-28T11:00:00Z", "Sat 11:00", OPEN),
            ("2026-11-28T23:00:00Z", "Sat 23:00 (Saturday night is not listed)", OUTSIDE),
        ],
    ),
    (
        // A night shift in a zone, and a range to the end of the day.
        r#"timezone = "America/Sao_Paulo"
hours = [{ days = "mon-fri", from = "20:00", to = "08:00" }, { days = "sun", from = "18:00", to = "24:00" }]"#,
        &[
            ("2026-11-28T02:00:00Z", "Fri 23:00", OPEN),
            ("2026-11-28T10:00:00Z", "Sat 07:00 (Friday's night)", OPEN),
            ("2026-11-28T11:00:00Z", "Sat 08:00", OUTSIDE),
            ("2026-11-28T23:30:00Z", "Sat 20:30", OUTSIDE),
            ("2026-11-30T02:59:59Z", "Sun 23:59:59", OPEN),
            ("2026-11-30T03:00:00Z", "Mon 00:00 (Sunday's range ended)", OUTSIDE),
            ("2026-11-30T23:00:00Z", "Mon 20:00", OPEN),
        ],
    ),
    (
        // The group's own holidays only: the global list is not observed.
        r#"timezone = "America/Sao_Paulo"
holidays = ["2026-12-24"]"#,
        &[
            ("2026-12-24T02:59:59Z", "Wed Dec 23 23:59:59 (Dec 24 in UTC)", OPEN),
            ("2026-12-24T03:00:00Z", "Thu Dec 24 00:00", HOLIDAY),
            ("2026-12-25T02:59:59Z", "Thu Dec 24 23:59:59 (Dec 25 in UTC)", HOLIDAY),
            ("2026-12-25T15:00:00Z", "Fri Dec 25 12:00 (global, not used)", OPEN),
        ],
    ),
    (
        // Own and global holidays; a holiday wins over hours either way.
        r#"timezone = "America/Sao_Paulo"
hours = [{ days = "mon-fri", from = "08:00", to = "18:00" }]
holidays = ["2026-11-20"]
use_global_holidays = true"#,
        &[
            ("2026-11-20T12:00:00Z", "Fri Nov 20 09:00, own holiday", HOLIDAY),
            ("2026-12-25T15:00:00Z", "Fri Dec 25 12:00, global holiday within hours", HOLIDAY),
            ("2026-12-25T23:00:00Z", "Fri Dec 25 20:00, holiday and outside hours", HOLIDAY),
            ("2027-01-01T12:00:00Z", "Fri Jan 1 09:00", HOLIDAY),
            ("2026-12-24T12:00:00Z", "Thu Dec 24 09:00", OPEN),
            ("2026-12-26T12:00:00Z", "Sat Dec 26 09:00", OUTSIDE),
        ],
    ),
    (
        // A holiday closes its whole date, even inside an overnight range.
        r#"timezone = "UTC"
hours = [{ days = "thu", from = "22:00", to = "06:00" }]
use_global_holidays = true"#,
        &[
            ("2026-12-24T23:00:00Z", "Thu Dec 24 23:00", OPEN),
            ("2026-12-25T01:00:00Z", "Fri Dec 25 01:00, holiday", HOLIDAY),
            ("2026-12-31T23:00:00Z", "Thu Dec 31 23:00", OPEN),
            ("2027-01-01T00:00:00Z", "Fri Jan 1 00:00, holiday", HOLIDAY),
        ],
    ),
    (
        // No hours: always open, but for holidays.
        r#"timezone = "Europe/Lisbon"
use_global_holidays = true"#,
        &[("2026-11-29T03:00:00Z", "Sun 03:00", OPEN), ("2026-12-25T00:30:00Z", "Fri Dec 25 00:30", HOLIDAY)],
    ),
];

#[test]
fn calendars() {
    let mut failures = Vec::new();
    for (calendar, instants) in CALENDAR_CASES {
        let c = calendar_of(calendar);
        for (utc, local, want) in *instants {
            let got = c.closed_reason(micros(utc));
            if got != *want {
                failures.push(format!("{utc} ({local}): want {want:?}, got {got:?}\n  calendar: {calendar}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// (group keys, field path expected in a problem, why expected in it).
const BAD_CALENDARS: &[(&str, &str, &str)] = &[
    (r#"timezone = "Mars/Olympus_Mons""#, "groups[0].timezone", "unknown time zone \"Mars/Olympus_Mons\""),
    (r#"timezone = """#, "groups[0].timezone", "empty time zone"),
    (r#"hours = [{ days = "mon-fry", from = "08:00", to = "18:00" }]"#, "groups[0].hours[0].days", "\"fry\""),
    (r#"hours = [{ days = "", from = "08:00", to = "18:00" }]"#, "groups[0].hours[0].days", "empty day list"),
    (r#"hours = [{ days = "mon", from = "8am", to = "18:00" }]"#, "groups[0].hours[0].from", "not a time of day"),
    (r#"hours = [{ days = "mon", from = "08:00", to = "25:00" }]"#, "groups[0].hours[0].to", "not a time of day"),
    (r#"hours = [{ days = "mon", from = "08:00", to = "18:60" }]"#, "groups[0].hours[0].to", "not a time of day"),
    (r#"hours = [{ days = "mon", from = "24:00", to = "02:00" }]"#, "groups[0].hours[0].from", "only valid as the end"),
    (r#"hours = [{ days = "mon", from = "09:00", to = "09:00" }]"#, "groups[0].hours[0]", "empty range"),
    (r#"hours = [{ days = "mon", to = "18:00" }]"#, "groups[0].hours[0].from", "missing"),
    (r#"hours = [{ days = "mon", form = "08:00", to = "18:00" }]"#, "groups[0].hours[0].form", "did you mean \"from\""),
    (r#"hours = "mon-fri 08:00-18:00""#, "groups[0].hours", "array of tables"),
    (
        r#"hours = [{ days = "mon", from = "08:00", to = "12:00" }, { days = "tue", from = "08:00", to = "noon" }]"#,
        "groups[0].hours[1].to",
        "not a time of day",
    ),
    (r#"holidays = ["2026-02-30"]"#, "groups[0].holidays[0]", "not a calendar date"),
    (r#"holidays = ["25/12/2026"]"#, "groups[0].holidays[0]", "expected YYYY-MM-DD"),
    (r#"holidays = [2026-12-25]"#, "groups[0].holidays[0]", "write it in quotes"),
    (r#"use_global_holidays = "yes""#, "groups[0].use_global_holidays", "boolean"),
];

#[test]
fn bad_calendar_values_are_refused_naming_the_field() {
    for (keys, field, why) in BAD_CALENDARS {
        let problems = match Config::parse(&one_group(keys), "test.toml") {
            Ok(_) => panic!("accepted: {keys}"),
            Err(e) => e.problems,
        };
        assert!(
            problems.iter().any(|p| p.starts_with(&format!("{field}:")) && p.contains(why)),
            "{keys}: no problem at {field} saying {why:?}:\n{}",
            problems.join("\n")
        );
    }
    // The global calendar too.
    let text = one_group("use_global_holidays = true").replace("\"2027-01-01\"", "\"2027-13-01\"");
    let problems = Config::parse(&text, "test.toml").expect_err("bad global date").problems;
    assert!(problems.iter().any(|p| p.starts_with("holidays.dates[1]:")), "{problems:#?}");
}

#[test]
fn calendars_built_in_code_are_checked_too() {
    let mut config = Config::parse(&one_group(r#"timezone = "UTC""#), "test.toml").expect("valid");
    config.groups[0].hours.push(callbridge::config::HoursRange {
        days: "mon".into(),
        from: "08:00".into(),
        to: "26:00".into(),
    });
    config.groups[0].holidays.push("2026-12-32".into());
    let e = callbridge::settings::routing(&config).expect_err("refused");
    let text = e.to_string();
    assert!(text.contains("groups[0].hours[0].to"), "{text}");
    assert!(text.contains("groups[0].holidays[0]"), "{text}");
    // The calendar alone names the fields the same way.
    let problems = Calendar::from_group(0, &config.groups[0], &config.holidays).expect_err("refused");
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["groups[0].hours[0].to", "groups[0].holidays[0]"]);
}

// ---------------------------------------------------------------- overflow

/// How a group of the chain stands at the instant asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Open, with an agent available.
    Takes,
    /// Outside its hours (agents available).
    Closed,
    /// A holiday (agents available).
    Holiday,
    /// Open, but nobody available.
    Empty,
    /// Outside hours and nobody available.
    ClosedEmpty,
}

const STATES: [State; 5] = [State::Takes, State::Closed, State::Holiday, State::Empty, State::ClosedEmpty];

/// Monday 2026-11-23 12:00 in Sao Paulo.
const NOON: &str = "2026-11-23T15:00:00Z";

const CHAIN: [(&str, &str, &str); 3] =
    [("support", "700", "maria"), ("sales", "701", "ana"), ("billing", "702", "rui")];

/// support → sales → billing, each group in its state.
fn chain_config(states: [State; 3]) -> Config {
    Config::parse(&chain_text(states, ""), "chain.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// The chain's configuration text; `billing_overflow` is billing's
/// `overflow` list (TOML), empty for none.
fn chain_text(states: [State; 3], billing_overflow: &str) -> String {
    let mut text = String::from("[pbx]\nname = \"t\"\n");
    for (i, ((id, queue, agent), state)) in CHAIN.iter().zip(states).enumerate() {
        let calendar = match state {
            State::Takes | State::Empty => "",
            State::Closed | State::ClosedEmpty => r#"hours = [{ days = "sat,sun", from = "08:00", to = "18:00" }]"#,
            State::Holiday => r#"holidays = ["2026-11-23"]"#,
        };
        let overflow = match CHAIN.get(i + 1) {
            Some((next, _, _)) => format!("overflow = [\"{next}\"]"),
            None if !billing_overflow.is_empty() => format!("overflow = {billing_overflow}"),
            None => String::new(),
        };
        text.push_str(&format!(
            "[[groups]]\nid = \"{id}\"\nqueue = \"{queue}\"\nagents = [\"{agent}\"]\ntimezone = \"America/Sao_Paulo\"\n{calendar}\n{overflow}\n"
        ));
    }
    text.push_str(AGENTS);
    text
}

/// The route the rules of SPEC §2 give, worked out independently.
fn expected_route(states: [State; 3]) -> Route {
    if let Some(i) = states.iter().position(|s| *s == State::Takes) {
        let (id, queue, _) = CHAIN[i];
        return Route::Queue {
            group: id.into_group(),
            queue: queue.to_string(),
            diverted_from: (i > 0).then(|| "support".into_group()),
        };
    }
    let reason = match states[0] {
        State::Holiday => MissedReason::Holiday,
        State::Closed | State::ClosedEmpty => MissedReason::OutsideHours,
        State::Empty => MissedReason::NoAgents,
        State::Takes => unreachable!("handled above"),
    };
    Route::Missed { group: "support".into_group(), reason }
}

trait IntoGroup {
    fn into_group(self) -> callbridge::ids::GroupId;
}

impl IntoGroup for &str {
    fn into_group(self) -> callbridge::ids::GroupId {
        callbridge::ids::GroupId::new(self)
    }
}

#[test]
fn overflow_chain_every_combination() {
    let at = micros(NOON);
    let mut checked = 0;
    for a in STATES {
        for b in STATES {
            for c in STATES {
                let states = [a, b, c];
                let config = chain_config(states);
                let routing = callbridge::settings::routing(&config).expect("valid");
                let empty: Vec<&str> = CHAIN
                    .iter()
                    .zip(states)
                    .filter(|(_, s)| matches!(s, State::Empty | State::ClosedEmpty))
                    .map(|((_, _, agent), _)| *agent)
                    .collect();
                let available = |agent: &AgentId, _queue: &str| !empty.contains(&agent.as_str());
                let want = expected_route(states);
                for target in [Target::Group("support".into()), Target::Queue("700".into())] {
                    let got = route(&target, at, &routing, &available).expect("known target");
                    assert_eq!(got, want, "{states:?}, asked {target:?}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 125);
}

#[test]
fn overflow_is_followed_depth_first_in_list_order() {
    // support → [sales, billing], sales → [night]: sales' own overflow
    // comes before support's next entry.
    let text = format!(
        r#"[pbx]
name = "t"
[[groups]]
id = "support"
queue = "700"
agents = ["maria"]
overflow = ["sales", "billing"]
[[groups]]
id = "sales"
queue = "701"
agents = ["ana"]
overflow = ["night"]
[[groups]]
id = "billing"
queue = "702"
agents = ["rui"]
[[groups]]
id = "night"
queue = "703"
agents = ["joao"]
{AGENTS}"#
    );
    let routing = callbridge::settings::routing(&Config::parse(&text, "t.toml").expect("valid")).expect("rules");
    let at = micros(NOON);
    let cases: &[(&[&str], &str)] = &[
        // (agents available, group the call goes to)
        (&["maria", "ana", "rui", "joao"], "support"),
        (&["ana", "rui", "joao"], "sales"),
        (&["rui", "joao"], "night"),
        (&["rui"], "billing"),
        (&[], ""),
    ];
    for (available, want) in cases {
        let av = |agent: &AgentId, _: &str| available.contains(&agent.as_str());
        let got = route(&Target::Queue("700".into()), at, &routing, &av).expect("known");
        match got {
            Route::Queue { group, .. } => assert_eq!(group.as_str(), *want, "{available:?}"),
            Route::Missed { group, reason } => {
                assert_eq!((*want, group.as_str(), reason), ("", "support", MissedReason::NoAgents), "{available:?}")
            }
        }
    }
    // Unknown targets are errors, not routes.
    let all = |_: &AgentId, _: &str| true;
    assert_eq!(route(&Target::Queue("799".into()), at, &routing, &all), Err(RouteError::UnknownQueue("799".into())));
    assert_eq!(route(&Target::Group("hr".into()), at, &routing, &all), Err(RouteError::UnknownGroup("hr".into())));
}

#[test]
fn overflow_cycles_are_refused_at_load() {
    // billing → support closes the loop.
    let text = chain_text([State::Takes; 3], r#"["support"]"#);
    let problems = Config::parse(&text, "t.toml").expect_err("cycle refused").problems;
    assert!(problems.iter().any(|p| p.contains("overflow cycle support → sales → billing → support")), "{problems:#?}");
    // A configuration assembled in code is checked the same way.
    let mut config = chain_config([State::Takes; 3]);
    config.groups[2].overflow = vec!["support".into()];
    let e = callbridge::settings::routing(&config).expect_err("cycle refused");
    assert!(e.to_string().contains("overflow cycle"), "{e}");
}

#[test]
fn the_oracle_follows_the_normalizers_presence() {
    // support → sales; it is noon on a Monday; ana (sales) pauses, then the
    // support agents pause: the route moves from support to sales to missed.
    let config = chain_config([State::Takes, State::Takes, State::Takes]);
    let routing = Arc::new(callbridge::settings::routing(&config).expect("rules"));
    let board = Arc::new(PresenceBoard::new());
    let noon = micros(NOON);
    let oracle = RouteOracle::with_clock(routing.clone(), board.clone(), move || noon);
    let dir = Arc::new(callbridge::settings::directory(&config));
    let mut n = Normalizer::new(dir, routing, callbridge::settings::normalizer_options(&config));
    let mut out = Vec::new();
    let pause = |n: &mut Normalizer, out: &mut Vec<Event>, queue: &str, ext: &str| {
        let iface = format!("SIP/{ext}");
        let f = Frame::from_pairs(&[
            ("Event", "QueueMemberPause"),
            ("Queue", queue),
            ("Interface", &iface),
            ("Paused", "1"),
        ]);
        n.handle(&f, noon, out);
    };
    let support = Target::Group("support".into());
    let group_of = |r: Route| match r {
        Route::Queue { group, .. } => group.to_string(),
        Route::Missed { reason, .. } => format!("missed: {}", reason.as_str()),
    };
    assert_eq!(group_of(oracle.route(&support).expect("known")), "support");
    pause(&mut n, &mut out, "700", "2000");
    // Not yet synced: the board still has maria available.
    assert_eq!(group_of(oracle.route(&support).expect("known")), "support");
    board.sync_from(&mut n);
    assert_eq!(group_of(oracle.route(&support).expect("known")), "sales");
    pause(&mut n, &mut out, "701", "2002");
    pause(&mut n, &mut out, "702", "2003");
    board.sync_from(&mut n);
    assert_eq!(group_of(oracle.route(&support).expect("known")), "missed: no_agents");
    // The helpdesk switches rui back on… but he is still paused on the PBX.
    n.set_helpdesk_available("rui", true, noon, &mut out);
    board.sync_from(&mut n);
    assert!(!board.get("rui").available_in("702"));
    assert_eq!(board.len(), 3);
}

// ------------------------------------------------------- traces with hours

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn traces() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("fixtures/ami"))
        .expect("fixtures/ami")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ami"))
        .collect();
    v.sort();
    v
}

/// The lab configuration with extra keys for the support group.
fn lab_with_support(keys: &str) -> Config {
    let text = std::fs::read_to_string(root().join("config/lab.toml")).expect("lab.toml");
    let anchor = "overflow = [\"sales\"]\n";
    assert_eq!(text.matches(anchor).count(), 1, "support's overflow line is the anchor");
    let text = text.replacen(anchor, &format!("{anchor}{keys}\n"), 1);
    Config::parse(&text, "lab+hours.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn lab() -> Config {
    Config::load(&root().join("config/lab.toml")).expect("lab.toml")
}

/// Per call: the group and the missed reason, if any.
fn missed_by_call(events: &[Event]) -> Vec<(String, Option<String>, MissedReason)> {
    events
        .iter()
        .filter_map(|e| match (&e.kind, &e.call) {
            (EventKind::Missed { reason, .. }, Some(c)) => {
                Some((c.id.to_string(), c.group.as_ref().map(|g| g.to_string()), *reason))
            }
            _ => None,
        })
        .collect()
}

fn answered_calls(events: &[Event]) -> Vec<String> {
    let mut v: Vec<String> = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Answered { .. }))
        .filter_map(|e| e.call.as_ref().map(|c| c.id.to_string()))
        .collect();
    v.dedup();
    v
}

/// Replaying every trace with support open `mon-fri 08:00-18:00` in Sao
/// Paulo (the traces were recorded on Monday 2026-11-23 around 19:00
/// there): unanswered support calls become `outside_hours`; nothing else
/// changes, event for event.
#[test]
fn support_hours_turn_evening_support_calls_into_outside_hours() {
    let hours = lab_with_support(r#"hours = [{ days = "mon-fri", from = "08:00", to = "18:00" }]"#);
    let plain = lab();
    let mut support_outside = 0;
    for trace in traces() {
        let name = trace.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
        let with_hours = events_of(&hours, &[&trace]).expect("readable");
        let without = events_of(&plain, &[&trace]).expect("readable");
        lifecycle_checks::check_invariants(&with_hours, "lab").unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(answered_calls(&with_hours), answered_calls(&without), "{name}: answered calls stay answered");
        assert_eq!(with_hours.len(), without.len(), "{name}");
        for (a, b) in with_hours.iter().zip(&without) {
            match (&a.kind, &b.kind) {
                (
                    EventKind::Missed { reason: ra, wait_seconds: wa },
                    EventKind::Missed { reason: rb, wait_seconds: wb },
                ) => {
                    assert_eq!(wa, wb, "{name}");
                    let group = a.call.as_ref().and_then(|c| c.group.as_ref()).map(|g| g.as_str());
                    let inbound = a.call.as_ref().is_some_and(|c| c.direction == callbridge::event::Direction::Inbound);
                    if group == Some("support") && inbound {
                        assert_eq!(*ra, MissedReason::OutsideHours, "{name}: support call {:?}", a.call);
                        support_outside += 1;
                    } else {
                        assert_eq!(ra, rb, "{name}: not a support call, unchanged");
                    }
                }
                _ => assert_eq!(a, b, "{name}: only missed reasons may differ"),
            }
        }
    }
    assert!(support_outside >= 1);

    // The cases the issue names.
    let a03 = events_of(&hours, &[root().join("fixtures/ami/a03-inbound-abandoned.ami")]).expect("a03");
    let m = missed_by_call(&a03);
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].1.as_deref(), m[0].2), (Some("support"), MissedReason::OutsideHours));
    let a05 = events_of(&hours, &[root().join("fixtures/ami/a05-no-agents-available.ami")]).expect("a05");
    let m = missed_by_call(&a05);
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].1.as_deref(), m[0].2), (Some("sales"), MissedReason::NoAgents), "sales has no hours");
    for answered in ["a01-inbound-answered.ami", "a02-inbound-caller-hangs-up.ami", "a04-ring-noanswer-next-agent.ami"]
    {
        let ev = events_of(&hours, &[root().join("fixtures/ami").join(answered)]).expect("readable");
        assert!(missed_by_call(&ev).is_empty(), "{answered} stays answered");
        assert_eq!(answered_calls(&ev).len(), 1, "{answered}");
    }
}

#[test]
fn support_hours_that_cover_the_evening_change_nothing() {
    let late = lab_with_support(r#"hours = [{ days = "mon-fri", from = "08:00", to = "20:00" }]"#);
    let all = traces();
    assert_eq!(events_of(&late, &all).expect("readable"), events_of(&lab(), &all).expect("readable"));
}

#[test]
fn a_support_holiday_beats_outside_hours() {
    let config = lab_with_support(
        r#"hours = [{ days = "mon-fri", from = "08:00", to = "18:00" }]
holidays = ["2026-11-23"]"#,
    );
    let a03 = events_of(&config, &[root().join("fixtures/ami/a03-inbound-abandoned.ami")]).expect("a03");
    assert_eq!(missed_by_call(&a03)[0].2, MissedReason::Holiday);
    // Another date is no holiday (and without hours, support is open).
    let next_day = lab_with_support(r#"holidays = ["2026-11-24"]"#);
    let a03 = events_of(&next_day, &[root().join("fixtures/ami/a03-inbound-abandoned.ami")]).expect("a03");
    assert_eq!(missed_by_call(&a03)[0].2, MissedReason::Abandoned);
}
