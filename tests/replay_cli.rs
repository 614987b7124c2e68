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
