//! `callbridge explain` through the real binary, on the fixture traces:
//! every missed call names the rule that decided it and the AMI frames
//! (checked against the trace file's lines) it rests on; two ladders are
//! golden; the HTML page loads in headless Chromium without a console
//! message.
//!
//! Refreshing the golden ladders is a deliberate act, reviewed in the diff:
//! `CALLBRIDGE_UPDATE_GOLDEN=1 cargo test --test explain`.

use callbridge::config::Config;
use callbridge::event::EventKind;
use callbridge::replay::events_of;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture traces, relative to the crate's root (as the ladders print them).
fn traces() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("fixtures/ami"))
        .expect("fixtures/ami exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ami"))
        .filter_map(|p| p.strip_prefix(root()).ok().map(Path::to_path_buf))
        .collect();
    v.sort();
    assert!(v.len() >= 12, "the fixture traces are checked in");
    v
}

fn explain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .current_dir(root())
        .args(["explain", "--config", "config/lab.toml"])
        .args(args)
        .output()
        .expect("run callbridge explain")
}

fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "explain failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).expect("utf-8")
}

/// The block of one call in the text output.
fn block<'a>(text: &'a str, id: &str) -> Option<&'a str> {
    let head = format!("\ncall {id} —");
    let start = text.find(&head)? + 1;
    let rest = text.get(start..)?;
    let end = rest.find("\ncall ").map_or(rest.len(), |e| e + 1);
    rest.get(..end)
}

/// Every `<Event> at HH:MM:SS.mmm (line N)` a rule cites: (event, line).
fn citations(rule: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let mut pieces = rule.split("(line ");
    let mut before = pieces.next().unwrap_or("");
    for piece in pieces {
        let line: String = piece.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let (Ok(n), Some((left, time))) = (line.parse::<usize>(), before.trim_end().rsplit_once(" at ")) {
            let event = left.rsplit([' ', '(']).next().unwrap_or("");
            let is_time = time.len() == 12 && time.chars().filter(|c| *c == ':').count() == 2;
            let named = event.starts_with(|c: char| c.is_ascii_uppercase());
            if is_time && named && event.chars().all(|c| c.is_ascii_alphanumeric()) {
                found.push((event.to_string(), n));
            }
        }
        before = piece;
    }
    found
}

#[test]
fn every_missed_call_names_its_rule_and_the_ami_frames_it_rests_on() {
    let config = Config::load(&root().join("config/lab.toml")).expect("config/lab.toml is valid");
    let mut missed_seen = 0;
    for trace in traces() {
        let events = events_of(&config, &[root().join(&trace)]).expect("trace readable");
        let text = stdout_of(&explain(&[trace.to_str().expect("utf-8 path")]));
        let file = std::fs::read_to_string(root().join(&trace)).expect("trace readable");
        let lines: Vec<&str> = file.lines().collect();
        let started = events.iter().filter(|e| matches!(e.kind, EventKind::Started {})).count();
        assert_eq!(text.matches("\ncall ").count(), started, "{}: one ladder per call", trace.display());
        for e in &events {
            let EventKind::Missed { reason, .. } = &e.kind else { continue };
            let id = e.call.as_ref().expect("call event").id.to_string();
            let block =
                block(&text, &id).unwrap_or_else(|| panic!("{}: no ladder for missed call {id}", trace.display()));
            let outcome = block
                .lines()
                .find(|l| l.starts_with("  outcome: "))
                .unwrap_or_else(|| panic!("{}: call {id} has no outcome line:\n{block}", trace.display()));
            let want = format!("  outcome: missed: {} — ", reason.as_str());
            assert!(outcome.starts_with(&want), "{}: call {id}: {outcome}", trace.display());
            let (rule, evidence) = outcome
                .split_once("; evidence: ")
                .unwrap_or_else(|| panic!("{}: call {id}: no evidence in {outcome}", trace.display()));
            assert!(rule.len() > want.len() + 10, "{}: call {id}: empty rule: {outcome}", trace.display());
            let cited = citations(evidence);
            let resync = evidence.contains("the resync at ");
            assert!(
                !cited.is_empty() || resync,
                "{}: call {id}: the rule cites no AMI frame: {outcome}",
                trace.display()
            );
            for (event, n) in cited {
                let at = lines.get(n - 1).copied().unwrap_or("").trim_end();
                assert_eq!(at, format!("Event: {event}"), "{}: call {id} cites line {n}: {outcome}", trace.display());
            }
            missed_seen += 1;
        }
    }
    // a03, a05, a08, a09, a10, a11 (3): not a vacuous pass.
    assert!(missed_seen >= 8, "only {missed_seen} missed calls in the fixtures");
}

#[test]
fn every_answered_call_names_the_frame_that_answered_it() {
    let text = stdout_of(&explain(&["fixtures/ami/a01-inbound-answered.ami"]));
    let file = std::fs::read_to_string(root().join("fixtures/ami/a01-inbound-answered.ami")).expect("readable");
    let outcome = text.lines().find(|l| l.starts_with("  outcome: ")).expect("an outcome");
    // Joao's phone answering the Local member's dial is what answered it.
    assert!(outcome.starts_with("  outcome: answered by joao after 3 s — DialEnd at "), "{outcome}");
    let (event, n) = citations(outcome).into_iter().next().expect("a citation");
    assert_eq!(file.lines().nth(n - 1).map(str::trim_end), Some(format!("Event: {event}").as_str()));
    assert!(outcome.contains("DestChannel=SIP/2001-") && outcome.contains("DialStatus=ANSWER"), "{outcome}");
}

#[test]
fn one_call_is_explained_alone_and_an_unknown_one_is_an_error() {
    let all = stdout_of(&explain(&["fixtures/ami/a11-concurrent-mix.ami"]));
    let first = all.lines().find_map(|l| l.strip_prefix("call ")).and_then(|l| l.split(' ').next()).expect("a call");
    let one = stdout_of(&explain(&["--call", first, "fixtures/ami/a11-concurrent-mix.ami"]));
    assert_eq!(one.matches("\ncall ").count(), 1, "{one}");
    assert_eq!(block(&one, first).map(str::trim_end), block(&all, first).map(str::trim_end));

    let out = explain(&["--call", "no.such", "fixtures/ami/a11-concurrent-mix.ami"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no.such") && err.contains("a11-concurrent-mix.ami"), "{err}");
}

#[test]
fn a_missing_or_empty_trace_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.ami");
    let out = explain(&[missing.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("missing.ami") && !err.contains("panicked"), "{err}");

    let garbage = dir.path().join("garbage.ami");
    std::fs::write(&garbage, b"\x00\x01 not a trace\r\n\r\n").expect("write");
    let out = explain(&[garbage.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("garbage.ami:1:") && err.contains("no AMI frame"), "{err}");
}

#[test]
fn ladders_match_their_golden_files() {
    let update = std::env::var_os("CALLBRIDGE_UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for stem in ["a05-no-agents-available", "a11-concurrent-mix", "a12-pbx-crash-mid-call"] {
        let got = stdout_of(&explain(&[&format!("fixtures/ami/{stem}.ami")]));
        let path = root().join("tests/golden/explain").join(format!("{stem}.txt"));
        if update {
            std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
            std::fs::write(&path, &got).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with CALLBRIDGE_UPDATE_GOLDEN=1 to create)", path.display()));
        if want != got {
            let first = want.lines().zip(got.lines()).position(|(a, b)| a != b).unwrap_or(0);
            failures.push(format!(
                "{stem}: differs from {} at line {}\n  want: {}\n  got:  {}",
                path.display(),
                first + 1,
                want.lines().nth(first).unwrap_or("<end>"),
                got.lines().nth(first).unwrap_or("<end>")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Chromium's path: `CHROMIUM`, else `chromium` on the PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("chromium")).find(|p| p.is_file())
}

/// Loads `page` in headless Chromium: the DOM after its scripts ran, and
/// every console message (Chromium logs them, errors and uncaught
/// exceptions included, as `CONSOLE` lines on stderr).
fn load(chromium: &Path, page: &Path) -> (String, Vec<String>) {
    let profile = tempfile::tempdir().expect("tempdir");
    let out = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr", "--v=0"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    let console =
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains(":CONSOLE")).map(str::to_string).collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

#[test]
fn the_html_page_is_self_contained_and_loads_without_console_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("a11.html");
    let text = stdout_of(&explain(&["--html", page.to_str().expect("utf-8"), "fixtures/ami/a11-concurrent-mix.ami"]));
    let html = std::fs::read_to_string(&page).expect("the page was written");
    // Self-contained: nothing to fetch.
    for outside in ["http://", "https://", " src=", "<link", "@import"] {
        assert!(!html.contains(outside), "the page refers to something outside it ({outside})");
    }
    // A swimlane per call, with the same calls as the text.
    assert_eq!(html.matches("<section id=\"call-").count(), text.matches("\ncall ").count());
    assert!(html.contains("data-lane=\"queue\"") && html.contains("data-lane=\"caller\""));
    assert!(html.contains("missed: abandoned — "), "the provenance is in the page");

    let Some(chromium) = chromium() else {
        println!("skipping the browser check: chromium not found (set CHROMIUM or install chromium)");
        return;
    };
    // The check itself can fail: a page whose script throws is caught.
    let broken = dir.path().join("broken.html");
    std::fs::write(&broken, "<!DOCTYPE html><html><body><script>noSuchFunction();</script></body></html>")
        .expect("write");
    let (_, console) = load(&chromium, &broken);
    assert!(console.iter().any(|l| l.contains("noSuchFunction")), "a script error went unnoticed: {console:?}");

    let (dom, console) = load(&chromium, &page);
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(dom.contains("data-ready=\"1\""), "the page's script did not run to its end");
    assert!(dom.contains("class=\"lanes\""), "no swimlane in the loaded page");
}

/// A queue timeout as app_queue reports it: the ringing stops, then
/// `QueueCallerAbandon`, and only then `QUEUESTATUS=TIMEOUT` (no fixture
/// has one; the frames follow Asterisk 20's order and headers).
#[test]
fn a_queue_timeout_is_told_apart_from_an_abandon_with_both_frames() {
    let caller = [("Channel", "SIP/carrier00-00000001"), ("Uniqueid", "1.1"), ("Linkedid", "1.1")];
    let member = [("DestChannel", "Local/2000@agents-00000001;1"), ("DestUniqueid", "1.2"), ("DestLinkedid", "1.1")];
    type Headers<'a> = Vec<(&'a str, &'a str)>;
    let frames: Vec<(i64, &str, Headers)> = vec![
        (
            0,
            "Newchannel",
            [&caller[..], &[("ChannelStateDesc", "Ring"), ("CallerIDNum", "11999990000"), ("Exten", "1130001000")]]
                .concat(),
        ),
        (0, "QueueCallerJoin", [&caller[..], &[("Queue", "700"), ("Position", "1")]].concat()),
        (
            0,
            "AgentCalled",
            [
                &caller[..],
                &member[..],
                &[("Queue", "700"), ("Interface", "Local/2000@agents/n"), ("MemberName", "Maria Silva")],
            ]
            .concat(),
        ),
        (0, "DialBegin", [&caller[..], &member[..]].concat()),
        (30, "DialEnd", [&caller[..], &member[..], &[("DialStatus", "CANCEL")]].concat()),
        (
            30,
            "Hangup",
            vec![("Channel", "Local/2000@agents-00000001;1"), ("Uniqueid", "1.2"), ("Linkedid", "1.1"), ("Cause", "0")],
        ),
        (30, "QueueCallerAbandon", [&caller[..], &[("Queue", "700"), ("Position", "1"), ("HoldTime", "30")]].concat()),
        (30, "QueueCallerLeave", [&caller[..], &[("Queue", "700")]].concat()),
        (30, "VarSet", [&caller[..], &[("Variable", "QUEUESTATUS"), ("Value", "TIMEOUT")]].concat()),
        (30, "Hangup", [&caller[..], &[("Cause", "16"), ("Cause-txt", "Normal Clearing")]].concat()),
    ];
    let mut trace = String::from("Asterisk Call Manager/9.0.0\r\n");
    for (secs, event, headers) in &frames {
        trace.push_str(&format!("Event: {event}\r\nTimestamp: {}.000000\r\n", 1_800_000_000 + secs));
        for (k, v) in headers {
            trace.push_str(&format!("{k}: {v}\r\n"));
        }
        trace.push_str("\r\n");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("queue-timeout.ami");
    std::fs::write(&path, &trace).expect("write");
    let text = stdout_of(&explain(&[path.to_str().expect("utf-8")]));
    let outcome = text.lines().find(|l| l.starts_with("  outcome: ")).expect("an outcome");
    assert!(outcome.starts_with("  outcome: missed: queue_timeout — "), "{outcome}");
    assert!(
        outcome.contains("evidence: QueueCallerAbandon at 08:00:30.000 (line ")
            && outcome.contains(" then QUEUESTATUS=TIMEOUT"),
        "{outcome}"
    );
    let lines: Vec<&str> = trace.lines().collect();
    let cited = citations(outcome);
    assert_eq!(
        cited.iter().map(|(e, _)| e.as_str()).collect::<Vec<_>>(),
        ["QueueCallerAbandon", "VarSet"],
        "{outcome}"
    );
    for (event, n) in cited {
        assert_eq!(lines.get(n - 1).copied(), Some(format!("Event: {event}").as_str()), "{outcome}");
    }
}

/// Calls that never hang up, past `--max-live-calls`: the ones ended
/// `lost` say the bound ended them, the others are still live at the end.
#[test]
fn calls_ended_by_the_live_call_bound_say_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("endless.ami");
    let mut t = String::from("Asterisk Call Manager/9.0.0\r\n");
    for n in 0..30 {
        t.push_str(&format!(
            "Event: Newchannel\r\nTimestamp: {}.000000\r\nChannel: SIP/carrier-{n:08}\r\nChannelStateDesc: Ring\r\n\
             CallerIDNum: 1198765{n:04}\r\nExten: 1130001000\r\nUniqueid: 100.{n}\r\nLinkedid: 100.{n}\r\n\r\n",
            1_800_000_000 + n
        ));
    }
    std::fs::write(&trace, t).expect("write");
    let text = stdout_of(&explain(&["--max-live-calls", "10", trace.to_str().expect("utf-8")]));
    let lost: Vec<&str> = text.lines().filter(|l| l.starts_with("  outcome: missed: lost — ")).collect();
    assert_eq!(lost.len(), 20, "{text}");
    assert!(lost.iter().all(|l| l.contains("evidence: more than --max-live-calls (10) calls live at ")), "{lost:#?}");
    assert_eq!(text.lines().filter(|l| l.starts_with("  end: ended: lost — ")).count(), 20);
    assert_eq!(text.lines().filter(|l| *l == "  end: still live at the end of the trace").count(), 10);
}
