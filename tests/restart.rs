//! The real `callbridge run` binary restarted (SIGTERM, and `kill -9`) in the
//! middle of calls, against a scripted PBX that plays a real trace and a
//! webhook receiver. Each case stops callbridge with a call queued, ringing,
//! talking or just transferred; while it is down the PBX either goes on
//! with nothing new or goes on through the rest of the call (it hangs up);
//! then callbridge starts again, the PBX lists its channels
//! (`CoreShowChannels`, modelled from the frames played so far) and plays
//! the rest of the trace.
//!
//! Whatever the case, the receiver must end up with, per call: `seq` 1..n
//! without gaps, each id once (or repeated byte for byte), exactly one
//! `call.ended`, the agent who answered. When nothing was missed while
//! callbridge was down and it stopped cleanly, the events are exactly those
//! of an uninterrupted run.

mod delivery_common;
mod support;

use callbridge::ami::Frame;
use delivery_common::{lab_config_text, Receiver, SECRET};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::server::{encode, headers, AmiServer, Headers, Reply, ServerOptions};

/// What the PBX has now, as `CoreShowChannels` would list it.
#[derive(Default, Clone)]
struct PbxModel {
    channels: BTreeMap<String, BTreeMap<String, String>>,
    now: i64,
}

impl PbxModel {
    fn apply(&mut self, f: &Frame) {
        if let Some(ts) = f.timestamp_micros() {
            self.now = ts;
        }
        let (Some(event), Some(uid)) = (f.event(), f.get("Uniqueid")) else { return };
        if event == "Hangup" {
            self.channels.remove(uid);
            return;
        }
        let ch = self.channels.entry(uid.to_string()).or_default();
        if event == "Newchannel" {
            ch.insert("Created".into(), self.now.to_string());
        }
        for key in ["Channel", "Linkedid", "ChannelStateDesc", "CallerIDNum", "CallerIDName", "Exten", "Context"] {
            if let Some(v) = f.get(key) {
                ch.insert(key.into(), v.into());
            }
        }
        match event {
            "Newexten" => {
                for (from, to) in [("Application", "Application"), ("AppData", "ApplicationData")] {
                    ch.insert(to.into(), f.get(from).unwrap_or("").into());
                }
            }
            "BridgeEnter" => {
                ch.insert("BridgeId".into(), f.get("BridgeUniqueid").unwrap_or("").into());
            }
            "BridgeLeave" => {
                ch.insert("BridgeId".into(), String::new());
            }
            _ => {}
        }
    }

    fn listing(&self) -> Vec<Headers> {
        self.channels
            .iter()
            .map(|(uid, ch)| {
                let created: i64 = ch.get("Created").and_then(|c| c.parse().ok()).unwrap_or(self.now);
                let secs = (self.now - created).max(0) / 1_000_000;
                let duration = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
                let mut h = headers(&[("Event", "CoreShowChannel"), ("Uniqueid", uid), ("Duration", &duration)]);
                h.extend(ch.iter().filter(|(k, _)| *k != "Created").map(|(k, v)| (k.clone(), v.clone())));
                h
            })
            .collect()
    }
}

/// The trace's events, their timestamps moved to now (the stuck-call
/// sweeper compares them with the clock).
fn frames_of(trace: &str) -> Vec<Frame> {
    let bytes = support::trace::load(trace);
    let frames = support::trace::frames(&support::trace::decode(support::trace::events_part(&bytes)));
    let first = frames.iter().find_map(Frame::timestamp_micros).expect("timestamped trace");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_micros() as i64;
    let shift = now - first;
    frames
        .iter()
        .map(|f| {
            let pairs: Vec<(String, String)> = f
                .headers()
                .map(|(k, v)| match (k, f.timestamp_micros()) {
                    ("Timestamp", Some(t)) => {
                        let t = t + shift;
                        (k.to_string(), format!("{}.{:06}", t / 1_000_000, t % 1_000_000))
                    }
                    _ => (k.to_string(), v.to_string()),
                })
                .collect();
            Frame::from_pairs(&pairs)
        })
        .collect()
}

fn encode_frames(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        let h: Headers = f.headers().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        out.extend(encode(&h));
    }
    out
}

/// The index just after the first frame matching `event` (and `extra`).
fn after(frames: &[Frame], event: &str, extra: Option<(&str, &str)>) -> usize {
    let at = frames
        .iter()
        .position(|f| f.event() == Some(event) && extra.is_none_or(|(k, v)| f.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no {event} {extra:?} in the trace"));
    at + 1
}

struct Setup {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

fn write_config(server: &AmiServer, receiver: &Receiver) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = lab_config_text(&format!(
        "[[sinks]]\ntype = \"webhook\"\nurl = \"{}\"\nsecret = \"{SECRET}\"\ntimeout_seconds = 2\nmax_backoff_seconds = 0.3\n\n\
         [outbox]\npath = \"{}\"\n",
        receiver.url(),
        dir.path().join("outbox").display()
    ))
    .replace("address = \"127.0.0.1:5038\"", &format!("address = \"{}\"\nreconnect_max_seconds = 0.2", server.addr()));
    let config = dir.path().join("callbridge.toml");
    std::fs::write(&config, text).expect("write config");
    Setup { dir, config }
}

fn start(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start callbridge")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Term,
    Kill,
}

fn stop(child: &mut Child, how: Stop) {
    match how {
        Stop::Term => {
            let pid = child.id().to_string();
            let ok = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
            assert!(ok.success());
        }
        Stop::Kill => child.kill().expect("kill -9"),
    }
    let status = child.wait().expect("wait");
    if how == Stop::Term {
        assert!(status.success(), "callbridge exited with {status} on SIGTERM");
    }
}

/// Every call event the receiver got, by id (first arrival), checking that
/// repeats are identical.
fn received(receiver: &Receiver) -> BTreeMap<String, Value> {
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    for r in receiver.requests().iter().filter(|r| r.status == 200) {
        for (id, body) in delivery_common::ids_in(&r.body) {
            match by_id.get(&id) {
                Some(old) => assert_eq!(old, &body, "id {id} delivered twice with different content"),
                None => {
                    by_id.insert(id, body);
                }
            }
        }
    }
    by_id
}

/// The call events of an uninterrupted run of `frames`, by id.
fn uninterrupted(frames: &[Frame]) -> BTreeMap<String, Value> {
    let config = delivery_common::lab();
    let mut n = callbridge::settings::normalizer(&config);
    let (mut out, mut now) = (Vec::new(), 0);
    for f in frames {
        now = f.timestamp_micros().unwrap_or(now).max(now);
        n.handle(f, now, &mut out);
    }
    out.iter()
        .filter(|e| e.call.is_some())
        .map(|e| {
            let v: Value = serde_json::from_str(&e.to_cloudevent_json(&config.pbx.name)).expect("json");
            (v["id"].as_str().expect("id").to_string(), v)
        })
        .collect()
}

async fn wait_for_ids(receiver: &Receiver, ids: impl Iterator<Item = String>, what: &str) {
    let ids: Vec<String> = ids.collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = receiver.accepted_ids();
        let missing: Vec<&String> = ids.iter().filter(|i| !got.contains(*i)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: never received {missing:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Per-call checks on everything received.
fn check_calls(events: &BTreeMap<String, Value>, case: &str) -> HashMap<String, Vec<Value>> {
    let mut calls: HashMap<String, Vec<Value>> = HashMap::new();
    for e in events.values().filter(|e| e["type"].as_str().is_some_and(|t| t.starts_with("call."))) {
        calls.entry(e["data"]["call"]["id"].as_str().expect("call id").to_string()).or_default().push(e.clone());
    }
    for (call, evs) in &mut calls {
        evs.sort_by_key(|e| e["data"]["seq"].as_u64());
        let seqs: Vec<u64> = evs.iter().filter_map(|e| e["data"]["seq"].as_u64()).collect();
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "{case}: call {call} seq has gaps or repeats");
        let ended = evs.iter().filter(|e| e["type"] == "call.ended").count();
        assert_eq!(ended, 1, "{case}: call {call} has {ended} call.ended");
        assert_eq!(evs.last().map(|e| e["type"].clone()), Some(Value::from("call.ended")), "{case}: {call}");
    }
    calls
}

struct Case {
    name: &'static str,
    trace: &'static str,
    /// Frames played before callbridge stops.
    cut: usize,
    /// Frames the PBX plays while callbridge is down (from `cut`).
    down: usize,
    how: Stop,
}

async fn run_case(case: Case) {
    let frames = frames_of(case.trace);
    let model = Arc::new(Mutex::new(PbxModel::default()));
    let listing = model.clone();
    let server = AmiServer::start(ServerOptions::default().on("CoreShowChannels", move |_| {
        Reply::list(listing.lock().expect("lock").listing(), "CoreShowChannelsComplete")
    }))
    .await;
    let receiver = Receiver::start().await;
    let setup = write_config(&server, &receiver);
    let label = format!("{} ({:?}, {} frames missed)", case.name, case.how, case.down);
    let log = setup.dir.path().join("callbridge.log");

    // First run: the trace up to the cut.
    let mut child = start(&setup.config, &log);
    server.wait_actions("CoreShowChannels", 1).await;
    let (before, rest) = frames.split_at(case.cut);
    for f in before {
        model.lock().expect("lock").apply(f);
    }
    server.send_bytes(&encode_frames(before));
    wait_for_ids(&receiver, uninterrupted(before).into_keys(), &label).await;
    stop(&mut child, case.how);

    // Down: the PBX goes on.
    let (missed, rest) = rest.split_at(case.down.min(rest.len()));
    for f in missed {
        model.lock().expect("lock").apply(f);
    }

    // Second run: the listing, then the rest.
    let log2 = setup.dir.path().join("callbridge-2.log");
    let mut child = start(&setup.config, &log2);
    server.wait_actions("CoreShowChannels", 2).await;
    // Let the resync land before the next frames (as on a real PBX, whose
    // listing describes the moment the connection came back).
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.send_bytes(&encode_frames(rest));
    let whole = uninterrupted(&frames);
    let calls: Vec<String> = whole
        .values()
        .filter(|e| e["type"] == "call.ended")
        .filter_map(|e| e["data"]["call"]["id"].as_str().map(str::to_string))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = received(&receiver);
        let ended = got.values().filter(|e| e["type"] == "call.ended").count();
        if ended >= calls.len() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let logs = std::fs::read_to_string(&log2).unwrap_or_default();
            panic!("{label}: {ended} of {} calls ended; log:\n{logs}", calls.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Anything late (a repeated delivery) would show now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop(&mut child, Stop::Term);

    let got = received(&receiver);
    let per_call = check_calls(&got, &label);
    let want_calls = check_calls(&whole, "uninterrupted run");
    assert_eq!(per_call.len(), want_calls.len(), "{label}: calls");
    for (call, evs) in &per_call {
        let want = &want_calls[call];
        let answers = |v: &[Value]| -> Vec<Value> {
            v.iter().filter(|e| e["type"] == "call.answered").map(|e| e["data"]["agent"].clone()).collect()
        };
        let (got_answers, want_answers) = (answers(evs), answers(want));
        let ended = evs.last().expect("events");
        if ended["data"]["end_reason"] == "lost" {
            // The PBX finished the call while nobody looked: what was seen
            // before is kept, the rest is unknown.
            assert!(want_answers.starts_with(&got_answers), "{label}: {call} answered by {got_answers:?}");
            continue;
        }
        assert_eq!(got_answers, want_answers, "{label}: {call} answered by");
        let want_end = want.last().expect("events");
        assert_eq!(ended["data"]["call"]["agent"], want_end["data"]["call"]["agent"], "{label}: {call} agent");
        if case.down > 0 {
            // An answer that happened while callbridge was down is dated
            // by the resync that found it: times are approximate.
            continue;
        }
        assert_eq!(ended["data"]["call"]["answered_at"], want_end["data"]["call"]["answered_at"], "{label}: {call}");
        assert_eq!(ended["data"]["talk_seconds"], want_end["data"]["talk_seconds"], "{label}: {call} talk");
        assert_eq!(ended["data"]["wait_seconds"], want_end["data"]["wait_seconds"], "{label}: {call} wait");
    }
    if case.down == 0 && case.how == Stop::Term {
        let want: BTreeMap<&String, &Value> =
            whole.iter().filter(|(_, e)| e["type"].as_str().is_some_and(|t| t.starts_with("call."))).collect();
        let got: BTreeMap<&String, &Value> =
            got.iter().filter(|(_, e)| e["type"].as_str().is_some_and(|t| t.starts_with("call."))).collect();
        assert_eq!(got, want, "{label}: a clean restart with nothing missed changes nothing");
    }
}

fn cases(how: Stop) -> Vec<Case> {
    let a01 = frames_of("a01-inbound-answered.ami");
    let a06 = frames_of("a06-blind-transfer.ami");
    let queued = after(&a01, "QueueCallerJoin", None);
    let ringing = after(&a01, "AgentCalled", None);
    let talking = after(&a01, "AgentConnect", None);
    let transferred = after(&a06, "BlindTransfer", None);
    let mut v = Vec::new();
    for (name, trace, cut, total) in [
        ("queued", "a01-inbound-answered.ami", queued, a01.len()),
        ("ringing", "a01-inbound-answered.ami", ringing, a01.len()),
        ("talking", "a01-inbound-answered.ami", talking, a01.len()),
        ("transferred", "a06-blind-transfer.ami", transferred, a06.len()),
    ] {
        // Nothing missed; a few frames missed; the PBX finished the call.
        for down in [0, 5, total] {
            v.push(Case { name, trace, cut, down, how });
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_sigterm_at_every_stage() {
    for case in cases(Stop::Term) {
        run_case(case).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_kill_9_at_every_stage() {
    for case in cases(Stop::Kill) {
        run_case(case).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_survive_restarts_at_several_points() {
    let a11 = frames_of("a11-concurrent-mix.ami");
    for (i, cut) in [a11.len() / 4, a11.len() / 2, 3 * a11.len() / 4].into_iter().enumerate() {
        let how = if i % 2 == 0 { Stop::Kill } else { Stop::Term };
        run_case(Case { name: "a11", trace: "a11-concurrent-mix.ami", cut, down: 0, how }).await;
        run_case(Case { name: "a11", trace: "a11-concurrent-mix.ami", cut, down: 40, how }).await;
    }
}
