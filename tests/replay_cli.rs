//! `callbridge replay` refuses a speed it cannot pace with, before reading
//! anything, instead of panicking half-way through a trace.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn a_speed_too_slow_to_pace_is_refused_with_a_message() {
    for speed in ["1e-300", "0", "-2", "NaN", "inf"] {
        let out = Command::new(env!("CARGO_BIN_EXE_callbridge"))
            .args(["replay", "--config"])
            .arg(root().join("config/lab.toml"))
            .arg(format!("--speed={speed}"))
            .arg(root().join("fixtures/ami/a11-concurrent-mix.ami"))
            .output()
            .expect("run callbridge");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--speed {speed}: {err}");
        assert!(err.contains("--speed") && err.contains("at least") && !err.contains("panicked"), "{err}");
        assert!(out.stdout.is_empty());
    }
}

/// A trace whose calls never hang up (1,000 Linkedids, one `Newchannel`
/// each): past `--max-live-calls` the calls silent the longest end `lost`,
/// with a warning now and then, not one per call.
#[test]
fn live_calls_past_the_bound_end_lost_with_few_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("endless.ami");
    let mut t = String::from("Asterisk Call Manager/9.0.0\r\n");
    for n in 0..1_000 {
        t.push_str(&format!(
            "Event: Newchannel\r\nTimestamp: {}.000000\r\nChannel: SIP/carrier-{n:08}\r\nChannelState: 4\r\n\
             CallerIDNum: 1198765{n:04}\r\nExten: 1130001000\r\nUniqueid: 100.{n}\r\nLinkedid: 100.{n}\r\n\r\n",
            1_800_000_000 + n
        ));
    }
    std::fs::write(&trace, t).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .args(["replay", "--summary", "--max-live-calls", "100", "--config"])
        .arg(root().join("config/lab.toml"))
        .arg(&trace)
        .output()
        .expect("run callbridge");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let lost = stdout.lines().filter(|l| l.contains(r#""type":"call.ended""#) && l.contains(r#""end_reason":"lost""#));
    assert_eq!(lost.count(), 900, "{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.contains(r#""type":"call.missed""#)).count(), 900);
    // The oldest call went first.
    let first_end = stdout.lines().find(|l| l.contains(r#""type":"call.ended""#)).unwrap();
    assert!(first_end.contains(r#""id":"100.0""#) || first_end.contains("100.0\""), "{first_end}");
    let warnings = stderr.lines().filter(|l| l.contains("--max-live-calls") && l.contains("WARN")).count();
    assert!((1..=10).contains(&warnings), "{warnings} warnings:\n{stderr}");
    assert!(stderr.contains("900 as lost past --max-live-calls") && stderr.contains("100 still live"), "{stderr}");

    // Without the flag, the default bound (100,000) is far away.
    let out = Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .args(["replay", "--summary", "--config"])
        .arg(root().join("config/lab.toml"))
        .arg(&trace)
        .output()
        .expect("run callbridge");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1000 still live") && !stderr.contains("WARN"), "{stderr}");

    // 0 is no bound at all: refused.
    let out = Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .args(["replay", "--max-live-calls", "0", "--config"])
        .arg(root().join("config/lab.toml"))
        .arg(&trace)
        .output()
        .expect("run callbridge");
    assert_eq!(out.status.code(), Some(2));
}
