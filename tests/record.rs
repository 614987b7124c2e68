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

/// a12 split at its second banner: the events before the PBX crashed, and
/// those after it came back (its `FullyBooted` with `Uptime: 2` first).
fn a12_connections() -> (Vec<u8>, Vec<u8>) {
    let trace = std::fs::read(root().join("fixtures/ami/a12-pbx-crash-mid-call.ami")).expect("a12");
    let banner = b"Asterisk Call Manager/";
    let second = trace.windows(banner.len()).skip(1).position(|w| w == banner).expect("a12 has two banners") + 1;
    let (first, rest) = trace.split_at(second);
    (support::trace::events_part(first).to_vec(), support::trace::events_part(rest).to_vec())
}

/// Plays a12 as a PBX that crashes (the connection drops, the listing after
/// the reconnection is empty) to whichever client logs in to `server`.
async fn play_a12_crash(
    server: &AmiServer,
    before: &[u8],
    after: &[u8],
    crashed: impl std::future::Future<Output = ()>,
) {
    server.wait_logins(1).await;
    server.wait_actions("CoreShowChannels", 1).await;
    server.send_bytes(before);
    // The crash comes at the same moment after the last frame for every
    // client, once it has taken the frames in.
    let crash_at = tokio::time::Instant::now() + Duration::from_millis(1500);
    crashed.await;
    tokio::time::sleep_until(crash_at).await;
    server.cut();
    server.wait_logins(2).await;
    // The restarted PBX speaks once both resync listings are answered, for
    // every client alike: otherwise its first events (16 s later on its
    // clock) race the listings, and the call cut by the crash ends at the
    // time of whichever came first, which may differ between two runs.
    server.wait_actions("CoreShowChannels", 2).await;
    server.wait_actions("QueueStatus", 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.send_bytes(after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_across_a_pbx_crash_replays_like_the_live_daemon() {
    use serde_json::Value;
    let (before, after) = a12_connections();
    let dir = tempfile::tempdir().expect("tempdir");
    let lost_call = "1796029357.4";

    // The live daemon, against one scripted PBX.
    let live_pbx = AmiServer::start(ServerOptions::default().without_fully_booted()).await;
    let events = dir.path().join("live.jsonl");
    let lab = std::fs::read_to_string(root().join("config/lab.toml")).expect("lab.toml");
    let cut = lab.find("[[sinks]]").expect("lab.toml has sinks");
    let text = format!(
        "{}[[sinks]]\ntype = \"jsonl\"\npath = {:?}\n\n[outbox]\npath = {:?}\n",
        &lab[..cut],
        events,
        dir.path().join("outbox")
    )
    .replace(
        "address = \"127.0.0.1:5038\"",
        &format!("address = \"{}\"\nreconnect_max_seconds = 0.2", live_pbx.addr()),
    );
    let config_path = dir.path().join("callbridge.toml");
    std::fs::write(&config_path, text).expect("config");
    let running = callbridge::app::start(callbridge::app::RunOptions {
        config_path: config_path.clone(),
        source: callbridge::app::SourceSpec::Ami,
        api_listen: None,
        shutdown_deadline: Duration::from_secs(5),
    })
    .await
    .expect("daemon starts");
    let answered = |path: &std::path::Path| {
        std::fs::read_to_string(path).unwrap_or_default().contains(&format!("\"id\":\"lab:{lost_call}:4\""))
    };
    let live_path = events.clone();
    play_a12_crash(&live_pbx, &before, &after, support::wait_until("the live call answered", || answered(&live_path)))
        .await;
    support::wait_until("the second call ended", || {
        std::fs::read_to_string(&events).unwrap_or_default().contains("\"id\":\"lab:1796029372.0:5\"")
    })
    .await;
    running.stop().await.expect("daemon stops");

    // The recorder, against another PBX playing the same.
    let rec_pbx = AmiServer::start(ServerOptions::default().without_fully_booted()).await;
    let out = dir.path().join("crash.ami");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (stop, ami, rec_out) = (shutdown.clone(), rec_pbx.client_config(), out.clone());
    let task = tokio::spawn(async move { callbridge::record::record(ami, &rec_out, None, stop).await });
    let rec_path = out.clone();
    let before_len = String::from_utf8_lossy(&before).matches("Linkedid: 1796029357.4\r\n").count();
    play_a12_crash(
        &rec_pbx,
        &before,
        &after,
        support::wait_until("the recorder wrote the first connection", || {
            std::fs::read_to_string(&rec_path).unwrap_or_default().matches("Linkedid: 1796029357.4\r\n").count()
                >= before_len
        }),
    )
    .await;
    support::wait_until("the recorder wrote the second call", || {
        std::fs::read_to_string(&out).unwrap_or_default().contains("Uniqueid: 1796029372.0\r\n")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    shutdown.cancel();
    let rec = task.await.expect("task").expect("recording");
    let text = std::fs::read_to_string(&rec.files[0]).expect("trace");
    assert_eq!(text.matches("Event: CallbridgeResync\r\n").count(), 2, "a resync marker per connection");

    // Replayed, the crashed call ends exactly as the live daemon ended it.
    let config = Config::load(&config_path).expect("config");
    let replayed: Vec<Value> = events_of(&config, &rec.files)
        .expect("replay")
        .iter()
        .map(|e| serde_json::from_str(&e.to_cloudevent_json("lab")).expect("json"))
        .collect();
    let live: Vec<Value> = std::fs::read_to_string(&events)
        .expect("live events")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let of = |v: &[Value], call: &str| -> Vec<Value> {
        v.iter().filter(|e| e["data"]["call"]["id"] == call).cloned().collect()
    };
    let (mut want, mut got) = (of(&live, lost_call), of(&replayed, lost_call));
    assert_eq!(got.len(), want.len(), "replayed: {got:#?}");
    let ended = |v: &[Value]| v.last().expect("events").clone();
    assert_eq!(ended(&got)["data"]["end_reason"], "lost");
    // The resync's moment is each process's reading of the PBX clock: the
    // same to within a second, not to the microsecond.
    let ms = |e: &Value, k: &str| -> i64 {
        let t = e["time"].as_str().or(e["data"]["call"][k].as_str()).expect("time");
        t.parse::<jiff::Timestamp>().expect("RFC 3339").as_millisecond()
    };
    let (at_replay, at_live) = (ms(&ended(&got), "ended_at"), ms(&ended(&want), "ended_at"));
    assert!((at_replay - at_live).abs() < 1000, "ended at {at_replay} in the replay, {at_live} live");
    for v in [&mut want, &mut got] {
        if let Some(e) = v.last_mut() {
            e["time"] = Value::Null;
            e["data"]["call"]["ended_at"] = Value::Null;
            e["data"]["duration_seconds"] = Value::Null;
            e["data"]["talk_seconds"] = Value::Null;
        }
    }
    assert_eq!(got, want);
    // And the second call, after the crash, is the same too.
    assert_eq!(of(&replayed, "1796029372.0"), of(&live, "1796029372.0"));
}
