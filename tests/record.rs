//! `record` then `replay`: a trace captured from a (scripted) live PBX
//! replays into the same lifecycle as the stream that was sent, and the
//! recording holds no credential of the login exchange.

mod support;

use callbridge::config::Config;
use callbridge::replay::events_of;
use std::path::PathBuf;
use std::time::Duration;
use support::server::{AmiServer, ServerOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn recorded_trace_replays_into_the_live_lifecycle() {
    let server = AmiServer::start(ServerOptions::default().without_fully_booted()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("incident.ami");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut ami = server.client_config();
    ami.event_queue_capacity = 64;
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { callbridge::record::record(ami, &out, Some(200_000), stop).await });
    server.wait_logins(1).await;
    let trace = std::fs::read(root().join("fixtures/ami/a11-concurrent-mix.ami")).expect("fixture");
    server.send_trace(&trace);
    // Wait for the last frame of the trace to reach the files.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let recorded: usize = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| {
                std::fs::read_to_string(e.path()).unwrap_or_default().matches("\r\nLinkedid: 1795471959.55\r\n").count()
            })
            .sum();
        let want = String::from_utf8_lossy(&trace).matches("\r\nLinkedid: 1795471959.55\r\n").count();
        if recorded == want {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "recording incomplete: {recorded}/{want}");
    }
    shutdown.cancel();
    let rec = task.await.expect("task").expect("recording");
    assert!(rec.files.len() >= 3, "a 570 kB trace rotated at 200 kB: {:?}", rec.files);

    let config = Config::load(&root().join("config/lab.toml")).expect("lab config");
    let live = events_of(&config, &[root().join("fixtures/ami/a11-concurrent-mix.ami")]).expect("original");
    let replayed = events_of(&config, &rec.files).expect("recording");
    assert_eq!(live, replayed);
    for f in &rec.files {
        let text = std::fs::read_to_string(f).expect("trace");
        assert!(text.starts_with("Asterisk Call Manager/9.0.0\r\nResponse: Success\r\n"), "{}", f.display());
        assert!(!text.contains("s3cret-lab") && !text.contains("Key: ") && !text.contains("Challenge"));
    }
}

/// Records `trace` from a scripted PBX into `out`; the result of `record`.
async fn record_into(out: PathBuf, trace: &[u8]) -> anyhow::Result<callbridge::record::Recorded> {
    let server = AmiServer::start(ServerOptions::default().without_fully_booted()).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let ami = server.client_config();
    let task = tokio::spawn(async move { callbridge::record::record(ami, &out, None, stop).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.logins() == 0 && !task.is_finished() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if server.logins() > 0 {
        server.send_trace(trace);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("record stops").expect("task")
}

#[tokio::test]
async fn a_missing_output_directory_is_named_in_the_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("no-such-dir").join("incident.ami");
    let trace = std::fs::read(root().join("fixtures/ami/a11-concurrent-mix.ami")).expect("fixture");
    let e = record_into(out.clone(), &trace[..2000]).await.expect_err("no directory to write in");
    let message = format!("{e:#}");
    assert!(message.contains(&dir.path().join("no-such-dir").display().to_string()), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
}

#[tokio::test]
async fn traces_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("incident.ami");
    let trace = std::fs::read(root().join("fixtures/ami/a11-concurrent-mix.ami")).expect("fixture");
    let rec = record_into(out, &trace[..20_000]).await.expect("recording");
    assert!(!rec.files.is_empty());
    for f in &rec.files {
        let mode = std::fs::metadata(f).expect("trace").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}: it holds phone numbers", f.display());
    }
}
