//! Log lines as a service manager sees them: no colour codes when stderr is
//! not a terminal, and no timestamp of our own when stderr is journald's
//! stream (`JOURNAL_STREAM`), which stamps every line itself.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// `callbridge replay` through the durable path (it logs at info) with
/// stderr in a file; returns what it logged.
fn replay_logs(dir: &Path, journal: bool) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let lab = std::fs::read_to_string(format!("{root}/config/lab.toml")).expect("lab.toml");
    let cut = lab.find("[[sinks]]").expect("lab.toml has sinks");
    let config = dir.join(format!("journal-{journal}.toml"));
    let sinks = format!(
        "[outbox]\npath = {:?}\n[[sinks]]\ntype = \"jsonl\"\npath = {:?}\n",
        dir.join(format!("outbox-{journal}")),
        dir.join(format!("events-{journal}.jsonl"))
    );
    std::fs::write(&config, format!("{}{sinks}", &lab[..cut])).expect("config");
    let log = dir.join(format!("stderr-{journal}.log"));
    let stderr = std::fs::File::create(&log).expect("log file");
    let meta = stderr.metadata().expect("metadata");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_callbridge"));
    cmd.args(["replay", "--config"])
        .arg(&config)
        .arg(format!("{root}/fixtures/ami/a01-inbound-answered.ami"))
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(stderr);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    let status = cmd.status().expect("callbridge runs");
    assert!(status.success(), "{status}");
    std::fs::read_to_string(&log).expect("log")
}

#[test]
fn no_colour_codes_off_a_terminal_and_no_timestamps_under_journald() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = replay_logs(dir.path(), false);
    assert!(plain.contains("delivery started"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "escape codes in {plain:?}");
    assert!(plain.lines().all(|l| l.starts_with("20")), "timestamped lines: {plain}");

    let journal = replay_logs(dir.path(), true);
    assert!(journal.contains("delivery started"), "{journal}");
    assert!(!journal.contains('\u{1b}'), "escape codes in {journal:?}");
    assert!(journal.lines().all(|l| !l.starts_with("20")), "journald stamps lines itself: {journal}");
}
