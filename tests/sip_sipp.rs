//! Interop: the SIP connector against the real `sipp` (Debian's
//! `sip-tester`) playing the PBX, with the UAS scenarios of `tests/sipp/`.
//!
//! Without `sipp` on PATH these tests print why and pass, except under CI
//! (`CI` set), where `.ci/run` installs it and its absence is a failure.

mod lifecycle_checks;

use callbridge::config::Config;
use callbridge::event::{Event, EventKind, LineState};
use callbridge::settings;
use callbridge::sip::{self, SipAgent};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

fn sipp_present(test: &str) -> bool {
    if Command::new("sipp").arg("-v").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: `sipp` is not on PATH; CI must run it (.ci/run installs Debian's sip-tester)");
    }
    eprintln!("SKIPPED {test}: `sipp` is not on PATH (apt-get install sip-tester to run the SIP interop tests)");
    false
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A sipp UAS on 127.0.0.1:`port` running `scenario` for `calls` calls.
struct Sipp {
    child: std::process::Child,
    logs: tempfile::TempDir,
}

impl Sipp {
    fn start(scenario: &str, port: u16, calls: u32) -> Sipp {
        Sipp::spawn(scenario, port, &["-m", &calls.to_string()])
    }

    /// A run that ends itself (the scenario's `stop_gracefully`), however
    /// many calls the keepalive's OPTIONS make.
    fn start_until_done(scenario: &str, port: u16) -> Sipp {
        Sipp::spawn(scenario, port, &[])
    }

    fn spawn(scenario: &str, port: u16, limit: &[&str]) -> Sipp {
        let logs = tempfile::tempdir().unwrap();
        let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sipp").join(scenario);
        let out = std::fs::File::create(logs.path().join("stdout.log")).unwrap();
        let child = Command::new("sipp")
            .arg("-sf")
            .arg(&path)
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .args(limit)
            .args(["-nostdin", "-timeout", "20s", "-timeout_error"])
            .arg("-trace_msg")
            .arg("-message_file")
            .arg(logs.path().join("messages.log"))
            .arg("-trace_err")
            .arg("-error_file")
            .arg(logs.path().join("errors.log"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("cannot start sipp");
        Sipp { child, logs }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.path().join(name)).unwrap_or_default()
    }

    /// Kills this run at once (the PBX crashes: nothing is sent).
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for sipp to finish its calls; prints its logs when it failed.
    async fn wait(mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if !status.success() {
                    eprintln!("--- sipp errors\n{}", self.log("errors.log"));
                    eprintln!("--- sipp messages\n{}", self.log("messages.log"));
                }
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = self.child.kill();
                eprintln!("--- sipp messages\n{}", self.log("messages.log"));
                panic!("sipp did not finish");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn start_callbridge(
    port: u16,
    agents: &str,
    extra: &str,
) -> (SipAgent, mpsc::Receiver<Event>, CancellationToken) {
    let text = format!(
        "[pbx]\nname = \"lab\"\n{agents}\n[sip]\nbind = \"127.0.0.1:0\"\npbx = \"127.0.0.1:{port}\"\n\
         username = \"callbridge\"\nsecret = \"sub-s3cret\"\noffer_identity_wait_seconds = 0\n{extra}"
    );
    let config = Config::parse(&text, "sipp test").unwrap();
    let (tx, rx) = mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let agent = sip::spawn(
        settings::sip_settings(&config).unwrap(),
        settings::sip_mode(&config),
        Arc::new(settings::directory(&config)),
        "lab".into(),
        tx,
        shutdown.clone(),
    )
    .await
    .unwrap();
    (agent, rx, shutdown)
}

async fn stop(agent: SipAgent, mut rx: mpsc::Receiver<Event>, shutdown: CancellationToken) -> Vec<Event> {
    shutdown.cancel();
    timeout(Duration::from_secs(5), agent.task).await.unwrap().unwrap().unwrap();
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    events
}

#[tokio::test]
async fn sipp_pbx_challenge_accept_ring_answer_hangup_terminate_resubscribe() {
    if !sipp_present("sipp_pbx_challenge_accept_ring_answer_hangup_terminate_resubscribe") {
        return;
    }
    let port = free_udp_port();
    let sipp = Sipp::start("pbx-dialog.xml", port, 2);
    // Keepalive off: each OPTIONS would be a call the scenario does not expect.
    let (agent, rx, shutdown) = start_callbridge(
        port,
        "[[agents]]\nid = \"maria\"\nextension = \"2000\"\n",
        "options_interval_seconds = 0\nrequest_timeout_seconds = 5\n",
    )
    .await;
    let status = sipp.wait().await;
    let events = stop(agent, rx, shutdown).await;
    assert!(status.success(), "sipp failed: {status}");

    let types: Vec<&str> = events.iter().map(|e| e.kind.type_name()).collect();
    let cycle =
        ["agent.line", "call.started", "call.offered", "agent.line", "call.answered", "agent.line", "call.ended"];
    let mut want = vec!["agent.line"]; // idle, from the first full state
    want.extend(cycle);
    want.extend(cycle); // the re-subscription's idle state changes nothing
    assert_eq!(types, want, "{events:#?}");
    let lines: Vec<(LineState, Option<String>)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::AgentLine { state, remote, .. } => Some((*state, remote.clone())),
            _ => None,
        })
        .collect();
    let caller = Some("31955550003".to_string());
    assert_eq!(
        lines,
        vec![
            (LineState::Idle, None),
            (LineState::Ringing, caller.clone()),
            (LineState::Busy, caller.clone()),
            (LineState::Idle, None),
            (LineState::Ringing, caller.clone()),
            (LineState::Busy, caller.clone()),
            (LineState::Idle, None),
        ]
    );
    let offered: Vec<&Event> = events.iter().filter(|e| e.kind.type_name() == "call.offered").collect();
    let c = offered[0].call.as_ref().unwrap();
    assert_eq!(c.caller.number.as_deref(), caller.as_deref());
    assert_eq!(c.caller.name.as_deref(), Some("Cliente 0003"));
    assert_ne!(offered[0].call.as_ref().unwrap().id, offered[1].call.as_ref().unwrap().id);
    lifecycle_checks::check_invariants(&events, "lab").unwrap();
}

#[tokio::test]
async fn sipp_pbx_answers_the_options_keepalive() {
    if !sipp_present("sipp_pbx_answers_the_options_keepalive") {
        return;
    }
    let port = free_udp_port();
    let sipp = Sipp::start("pbx-options.xml", port, 2);
    // No agents: only keepalives go to this PBX.
    let (agent, rx, shutdown) = start_callbridge(port, "", "options_interval_seconds = 1\n").await;
    let status = sipp.wait().await;
    assert!(status.success(), "sipp failed: {status}");
    assert!(agent.status.reachable());
    let rtt = agent.status.rtt().expect("an RTT");
    assert!(rtt < Duration::from_secs(1), "{rtt:?}");
    assert!(agent.status.ready(), "reachable and nothing to subscribe");
    assert!(stop(agent, rx, shutdown).await.is_empty());
}

/// Reads events until `n` more `agent.line`s, keeping every event in
/// `all`; returns the `agent.line` states with their arrival times.
async fn next_lines(
    rx: &mut mpsc::Receiver<Event>,
    n: usize,
    all: &mut Vec<Event>,
) -> Vec<(tokio::time::Instant, LineState)> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = timeout(Duration::from_secs(10), rx.recv()).await.expect("no agent.line").expect("channel closed");
        if let EventKind::AgentLine { state, .. } = &e.kind {
            out.push((tokio::time::Instant::now(), *state));
        }
        all.push(e);
    }
    out
}

/// sipp plays a PBX that restarts the way Asterisk's chan_sip does: the
/// first run is killed (no NOTIFY, no goodbye), a second run takes its
/// port at once and knows nothing of the subscription (it answers `481` to
/// the refresh). The subscription was granted for 600 s and every OPTIONS
/// is answered, so only callbridge's keepalive refresh of the subscription
/// confirmed longest ago can find it gone: it subscribes anew within
/// seconds and
/// `agent.line` flows again; at shutdown its unsubscribe is challenged
/// (401) and answered with credentials, which ends the second run with
/// success.
#[tokio::test]
async fn sipp_pbx_restart_is_found_resubscribed_and_unsubscribed_with_credentials() {
    if !sipp_present("sipp_pbx_restart_is_found_resubscribed_and_unsubscribed_with_credentials") {
        return;
    }
    let port = free_udp_port();
    let first_life = Sipp::start_until_done("pbx-restart.xml", port);
    let (agent, mut rx, shutdown) = start_callbridge(
        port,
        "[[agents]]\nid = \"maria\"\nextension = \"2000\"\n",
        "options_interval_seconds = 1\nrequest_timeout_seconds = 5\n",
    )
    .await;
    let mut all = Vec::new();
    let before = next_lines(&mut rx, 2, &mut all).await;
    assert_eq!(before.iter().map(|l| l.1).collect::<Vec<_>>(), [LineState::Ringing, LineState::Idle]);
    assert_eq!(agent.status.subscriptions_active(), 1);

    // A restart quicker than the keepalive's retransmissions: no OPTIONS
    // goes unanswered, so only the keepalive's refresh can tell.
    first_life.kill();
    let second_life = Sipp::start_until_done("pbx-restart.xml", port);
    let back = tokio::time::Instant::now();
    let after = next_lines(&mut rx, 2, &mut all).await;
    assert_eq!(after.iter().map(|l| l.1).collect::<Vec<_>>(), [LineState::Ringing, LineState::Idle]);
    let flowing = after[0].0 - back;
    assert!(flowing < Duration::from_secs(5), "agent.line again {flowing:?} after the PBX came back");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while agent.status.subscriptions_active() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never active again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Long enough for a keepalive refresh of the new dialog (challenged,
    // answered with credentials, 200) before the shutdown.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(agent.status.subscriptions_active(), 1);

    all.extend(stop(agent, rx, shutdown).await);
    let status = second_life.wait().await;
    assert!(status.success(), "the restarted PBX did not get an authenticated unsubscribe: {status}");
    let lines: Vec<LineState> = all
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::AgentLine { state, .. } => Some(*state),
            _ => None,
        })
        .collect();
    assert_eq!(lines, [LineState::Ringing, LineState::Idle, LineState::Ringing, LineState::Idle]);
    lifecycle_checks::check_invariants(&all, "lab").unwrap();
}
