//! Golden tests: every fixture trace replayed through the normalizer must
//! give exactly the lifecycle checked in under `fixtures/expected/`.
//!
//! Refreshing the expected files is a deliberate act, reviewed in the diff:
//! `CALLBRIDGE_UPDATE_GOLDEN=1 cargo test --test golden`.

mod lifecycle_checks;

use callbridge::config::Config;
use callbridge::replay::events_of;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn traces() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("fixtures/ami"))
        .expect("fixtures/ami exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ami"))
        .collect();
    v.sort();
    assert!(v.len() >= 11, "the fixture traces are checked in");
    v
}

fn lab() -> Config {
    Config::load(&root().join("config/lab.toml")).expect("config/lab.toml is valid")
}

fn expected_path(trace: &Path) -> PathBuf {
    let stem = trace.file_stem().and_then(|s| s.to_str()).unwrap_or("trace");
    root().join("fixtures/expected").join(format!("{stem}.jsonl"))
}

#[test]
fn every_trace_matches_its_golden_lifecycle() {
    let config = lab();
    let update = std::env::var_os("CALLBRIDGE_UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for trace in traces() {
        let events = events_of(&config, &[&trace]).expect("trace readable");
        let got: String = events.iter().map(|e| e.to_cloudevent_json(&config.pbx.name) + "\n").collect();
        let path = expected_path(&trace);
        if update {
            std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
            std::fs::write(&path, &got).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with CALLBRIDGE_UPDATE_GOLDEN=1 to create)", path.display()));
        if want != got {
            let first = want
                .lines()
                .zip(got.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| want.lines().count().min(got.lines().count()));
            failures.push(format!(
                "{}: differs from {} at line {}\n  want: {}\n  got:  {}",
                trace.display(),
                path.display(),
                first + 1,
                want.lines().nth(first).unwrap_or("<end>"),
                got.lines().nth(first).unwrap_or("<end>")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn invariants_hold_for_every_trace() {
    let config = lab();
    for trace in traces() {
        let events = events_of(&config, &[&trace]).expect("trace readable");
        lifecycle_checks::check_invariants(&events, &config.pbx.name)
            .unwrap_or_else(|e| panic!("{}: {e}", trace.display()));
    }
}

#[test]
fn invariants_hold_for_all_traces_back_to_back_and_twice() {
    // The same traces replayed twice in one run: the second pass must not
    // resurrect or duplicate anything (ids are per Linkedid, so the second
    // pass is a replay of already ended calls and is ignored).
    let config = lab();
    let mut all = traces();
    let calls_only = |v: Vec<callbridge::event::Event>| v.into_iter().filter(|e| e.call.is_some()).collect::<Vec<_>>();
    let once = events_of(&config, &all).expect("readable");
    lifecycle_checks::check_invariants(&once, &config.pbx.name).expect("one pass");
    all.extend(traces());
    // Agent events of the second pass repeat with the same ids (the same PBX
    // events), which is what lets the helpdesk de-duplicate them.
    let twice = calls_only(events_of(&config, &all).expect("readable"));
    lifecycle_checks::check_invariants(&twice, &config.pbx.name).expect("two passes");
    assert_eq!(calls_only(once), twice, "replaying ended calls again emits no call event");
}

#[test]
fn replay_is_deterministic() {
    let config = lab();
    let a = events_of(&config, &traces()).expect("readable");
    let b = events_of(&config, &traces()).expect("readable");
    assert_eq!(a, b);
}
