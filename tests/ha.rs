//! A hot-standby pair (`[ha]`) against a real `nats-server` and one scripted
//! AMI server: two `callbridge run` processes follow the same live stream
//! (a11's calls, renamed and repeated), both normalizing; only the holder
//! of the lease publishes into the stream.
//!
//! - The leader killed with SIGKILL mid-stream: the standby takes over
//!   within `lease_seconds` + 1 s, and the stream holds every event of every
//!   call exactly once, each call's in seq order. Before that, the standby
//!   refuses control with `503 not_leader` naming the leader, and `/readyz`
//!   tells each instance's role.
//! - The leader cut off from NATS by a proxy the test controls: it stops
//!   publishing at once (nothing it published is stored after the new
//!   leader's first message), the other takes over, and once the network
//!   heals the old leader comes back as the standby; the stream again holds
//!   everything exactly once.
//!
//! - The leader stopped with SIGTERM: it releases the lease and the standby
//!   takes over at its next look, well before the lease would expire.
//!
//! Without `nats-server` the tests print why and pass (CI installs it).

mod delivery_common;
mod nats_common;
mod support;

use delivery_common::{a11, a11_events, lab, root};
use nats_common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::server::{AmiServer, ServerOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const STREAM: &str = "CALLBRIDGE";
const TOKEN: &str = "lab-api-token";
const LEASE: u64 = 3;
const COPIES: usize = 16;

/// One `callbridge run` of the pair.
struct Instance {
    node: &'static str,
    api: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Instance {
    fn start(dir: &Path, node: &'static str, ami: &str, nats_sink: &str, nats_ha: &str) -> Instance {
        let api = free_port();
        let lab = std::fs::read_to_string(root().join("config/lab.toml")).unwrap();
        let head = &lab[..lab.find("[[sinks]]").unwrap()];
        let head = head.replace("address = \"127.0.0.1:5038\"", &format!("address = \"{ami}\""));
        let config = format!(
            "{head}[[sinks]]\ntype = \"nats\"\nurl = \"{nats_sink}\"\ntimeout_seconds = 2\nmax_backoff_seconds = 0.3\n\n\
             [outbox]\npath = \"{}\"\n\n[api]\nlisten = \"127.0.0.1:{api}\"\nsecret = \"{TOKEN}\"\n\n\
             [ha]\nurl = \"{nats_ha}\"\nlease_seconds = {LEASE}\nnode = \"{node}\"\nadvertise = \"http://127.0.0.1:{api}\"\n",
            dir.join(format!("outbox-{node}")).display()
        );
        let path = dir.join(format!("{node}.toml"));
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("{node}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_callbridge"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start callbridge run");
        Instance { node, api, log, child: Some(child) }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api)
    }

    async fn readyz(&self) -> Option<Value> {
        let r = reqwest::get(self.url("/readyz")).await.ok()?;
        serde_json::from_slice(&r.bytes().await.ok()?).ok()
    }

    async fn role(&self) -> Option<String> {
        Some(self.readyz().await?["role"].as_str()?.to_string())
    }

    /// Waits until `/readyz` says `role`; returns when it did.
    async fn wait_role(&self, role: &str, within: Duration) -> Instant {
        let t0 = Instant::now();
        loop {
            if self.role().await.as_deref() == Some(role) {
                return Instant::now();
            }
            assert!(t0.elapsed() < within, "{} is not {role} after {within:?}:\n{}", self.node, self.log_tail());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(self.url("/metrics")).await.ok()?.text().await.ok()?;
        text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?.split(' ').nth(1)?.parse().ok()
    }

    /// Requests this instance's sinks made so far (every status class).
    async fn sink_requests(&self) -> f64 {
        let text = reqwest::get(self.url("/metrics")).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("callbridge_sink_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for the exit; whether it exited cleanly.
    fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        Command::new("kill").args(["-TERM", &c.id().to_string()]).status().expect("kill -TERM");
        c.wait().unwrap().success()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log[log.len().saturating_sub(3000)..].to_string()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP proxy to nats-server that the test can cut (every connection
/// closed, new ones refused) and heal: a network partition of one
/// instance from NATS.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    pipes: Arc<std::sync::Mutex<CancellationToken>>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let pipes = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let (c, p) = (cut.clone(), pipes.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the partition refuses
                }
                let stop = p.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Proxy { port, cut, pipes }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let mut pipes = self.pipes.lock().unwrap();
        pipes.cancel();
        *pipes = CancellationToken::new();
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// a11's events part, renamed and repeated `COPIES` times, cut into frames;
/// and the ids of the events it makes (copy k of a11 makes a11's events
/// under renamed ids, see `tracegen`).
fn live_stream() -> (Vec<Vec<u8>>, Vec<String>) {
    let a11_bytes = std::fs::read(a11()).unwrap();
    let part = support::trace::events_part(&a11_bytes).to_vec();
    let stream = callbridge::tracegen::concatenated(&[part], COPIES);
    // Frames end with an empty line (the lab traces use CRLF).
    assert!(!stream.windows(2).any(|w| w == b"\n\n"), "a frame ending in a bare LF");
    let mut frames = Vec::new();
    let mut start = 0;
    for (i, w) in stream.windows(4).enumerate() {
        if w == b"\r\n\r\n" {
            frames.push(stream[start..i + 4].to_vec());
            start = i + 4;
        }
    }
    assert_eq!(start, stream.len(), "the stream ends with a whole frame");
    let a11_ids: Vec<String> = a11_events().iter().map(|e| e.id(&lab().pbx.name)).collect();
    let expected = (0..COPIES)
        .flat_map(|k| a11_ids.iter().map(move |id| format!("lab:{}{}", 179_547 + k, &id["lab:179547".len()..])))
        .collect();
    (frames, expected)
}

/// Streams `frames` to every AMI client, about 2,000 frames a second, from
/// a task of its own.
fn stream_in_task(ami: &AmiServer, frames: &[Vec<u8>]) -> tokio::task::JoinHandle<()> {
    let (frames, send) = (frames.to_vec(), ami.broadcast_handle());
    tokio::spawn(async move {
        for chunk in frames.chunks(50) {
            send(&chunk.concat());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
}

/// [`stream_in_task`], waiting until everything was sent.
async fn stream(ami: &AmiServer, frames: &[Vec<u8>]) {
    stream_in_task(ami, frames).await.unwrap();
}

/// Waits until the stream holds `n` messages and stops growing.
async fn wait_stream(url: &str, n: usize, within: Duration) {
    let js = jetstream(url).await;
    let t0 = Instant::now();
    loop {
        let have = stream_count(&js, STREAM).await as usize;
        if have >= n {
            // A duplicate would show up as more: give it a moment.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
        assert!(t0.elapsed() < within, "the stream holds {have} of {n} events after {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn node_of(m: &Stored) -> &str {
    m.headers.get("Callbridge-Node").map(String::as_str).unwrap_or("?")
}

struct Lab {
    tmp: tempfile::TempDir,
    nats: NatsServer,
    ami: AmiServer,
}

async fn lab_setup() -> Lab {
    let tmp = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(tmp.path());
    let setup = tmp.path().join("setup.toml");
    let text = delivery_common::lab_config_text(&format!("[[sinks]]\ntype = \"nats\"\nurl = \"{}\"\n", nats.url()));
    std::fs::write(&setup, format!("{text}\n[ha]\nurl = \"{}\"\nlease_seconds = {LEASE}\n", nats.url())).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_callbridge")).args(["nats-setup", "--config"]).arg(&setup).output().unwrap();
    assert!(out.status.success(), "nats-setup: {}", String::from_utf8_lossy(&out.stderr));
    let ami = AmiServer::start(ServerOptions::default()).await;
    Lab { tmp, nats, ami }
}

/// cb-a (reaching NATS at `a_nats`) as the leader, then cb-b (straight to
/// the lab's server) as its standby.
async fn start_pair(lab: &Lab, a_nats: &str) -> (Instance, Instance) {
    let (ami, url) = (lab.ami.addr().to_string(), lab.nats.url());
    let a = Instance::start(lab.tmp.path(), "cb-a", &ami, a_nats, a_nats);
    a.wait_role("leader", Duration::from_secs(30)).await;
    let b = Instance::start(lab.tmp.path(), "cb-b", &ami, &url, &url);
    b.wait_role("standby", Duration::from_secs(30)).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_a_killed_leader_within_the_lease_and_nothing_is_lost_or_doubled() {
    if !nats_present("the_standby_takes_over_a_killed_leader_within_the_lease_and_nothing_is_lost_or_doubled") {
        return;
    }
    let lab = lab_setup().await;
    let url = lab.nats.url();
    let (mut a, b) = start_pair(&lab, &url).await;
    lab.ami.wait_logins(2).await;

    // Roles as /readyz and the gauge tell them.
    let ra = a.readyz().await.unwrap();
    assert_eq!((ra["role"].as_str(), ra["leader"].as_str()), (Some("leader"), Some("cb-a")), "{ra}");
    let t0 = Instant::now();
    while b.readyz().await.unwrap()["leader"].as_str() != Some("cb-a") {
        assert!(t0.elapsed() < Duration::from_secs(5), "the standby does not name the leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.metric("callbridge_ha_leader").await, Some(1.0));
    assert_eq!(b.metric("callbridge_ha_leader").await, Some(0.0));

    // Control is refused on the standby, naming the leader; reads are served.
    let http = reqwest::Client::new();
    let r = http
        .put(b.url("/v1/agents/maria/availability"))
        .bearer_auth(TOKEN)
        .header("Content-Type", "application/json")
        .body(r#"{"available": false}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "not_leader", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("cb-a") && message.contains(&a.url("")), "{message}");
    let r = http.get(b.url("/v1/calls")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // The live stream; the leader killed 40 % of the way.
    let (frames, expected) = live_stream();
    let cut = frames.len() * 2 / 5;
    stream(&lab.ami, &frames[..cut]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.sink_requests().await > 0.0, "the leader delivers");
    assert_eq!(b.sink_requests().await, 0.0, "the standby delivers nothing");
    a.kill9();
    let killed = Instant::now();
    let feeding = stream_in_task(&lab.ami, &frames[cut..]);
    let took_over = b.wait_role("leader", Duration::from_secs(LEASE + 10)).await;
    let handover = took_over.duration_since(killed);
    eprintln!("the standby took over {:.0} ms after the kill (lease {LEASE} s)", handover.as_secs_f64() * 1000.0);
    assert!(handover <= Duration::from_secs(LEASE + 1), "takeover took {handover:?}:\n{}", b.log_tail());
    assert_eq!(b.metric("callbridge_ha_leader").await, Some(1.0));
    feeding.await.unwrap();

    wait_stream(&url, expected.len(), Duration::from_secs(90)).await;
    let stored = read_stream(&url, STREAM).await;
    check_exactly_once_in_order(&stored, &expected);
    let by_a = stored.iter().filter(|m| node_of(m) == "cb-a").count();
    let by_b = stored.iter().filter(|m| node_of(m) == "cb-b").count();
    eprintln!("{} events: {by_a} published by cb-a, {by_b} by cb-b", stored.len());
    assert!(by_a > 0 && by_b > 0 && by_a + by_b == stored.len(), "both published, nobody else: {by_a} + {by_b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_nats_stops_before_the_other_starts_and_comes_back_as_standby() {
    if !nats_present("a_leader_cut_off_from_nats_stops_before_the_other_starts_and_comes_back_as_standby") {
        return;
    }
    let lab = lab_setup().await;
    let url = lab.nats.url();
    let proxy = Proxy::start(lab.nats.port).await;
    // cb-a reaches NATS (lease and stream) only through the proxy.
    let (a, b) = start_pair(&lab, &proxy.url()).await;
    lab.ami.wait_logins(2).await;

    let (frames, expected) = live_stream();
    let third = frames.len() / 3;
    stream(&lab.ami, &frames[..third]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.sink_requests().await > 0.0, "the leader delivers");
    assert_eq!(b.sink_requests().await, 0.0, "the standby delivers nothing");
    proxy.cut();
    let cut_at = Instant::now();
    // Calls go on during the partition; both instances keep normalizing.
    let feeding = stream_in_task(&lab.ami, &frames[third..2 * third]);
    // The cut-off leader stops at once; the other takes over once the
    // lease has expired.
    a.wait_role("standby", Duration::from_secs(2)).await;
    assert_eq!(a.metric("callbridge_ha_leader").await, Some(0.0));
    let a_stopped = a.sink_requests().await;
    let took_over = b.wait_role("leader", Duration::from_secs(LEASE + 10)).await;
    eprintln!("cb-b took over {:.0} ms after the partition", took_over.duration_since(cut_at).as_secs_f64() * 1000.0);
    feeding.await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.heal();
    // Back on the network, cb-a follows cb-b.
    let t0 = Instant::now();
    loop {
        let r = a.readyz().await.unwrap_or_default();
        if r["role"] == "standby" && r["leader"] == "cb-b" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "cb-a does not follow cb-b after the partition: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stream(&lab.ami, &frames[2 * third..]).await;

    wait_stream(&url, expected.len(), Duration::from_secs(90)).await;
    assert_eq!(a.sink_requests().await, a_stopped, "cb-a sent nothing once it stopped");
    let stored = read_stream(&url, STREAM).await;
    check_exactly_once_in_order(&stored, &expected);
    // No two deliverers: everything cb-a got stored was stored before cb-b's
    // first message.
    let last_a = stored.iter().filter(|m| node_of(m) == "cb-a").map(|m| m.published_ns).max();
    let first_b = stored.iter().filter(|m| node_of(m) == "cb-b").map(|m| m.published_ns).min();
    let (Some(last_a), Some(first_b)) = (last_a, first_b) else {
        panic!("both instances published: last of cb-a {last_a:?}, first of cb-b {first_b:?}")
    };
    eprintln!("cb-a's last message {:.0} ms before cb-b's first", (first_b - last_a) as f64 / 1e6);
    assert!(last_a < first_b, "cb-a published after cb-b started ({last_a} ≥ {first_b})");
    assert!(a.log_tail().contains("stopped delivering"), "{}", a.log_tail());
    assert!(b.log_tail().contains("took over the lease"), "{}", b.log_tail());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_cleanly_hands_over_at_once() {
    if !nats_present("a_leader_stopped_cleanly_hands_over_at_once") {
        return;
    }
    let lab = lab_setup().await;
    let (mut a, b) = start_pair(&lab, &lab.nats.url()).await;
    let stopping = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || {
        let ok = a.stop();
        (ok, a.log_tail())
    });
    let took_over = b.wait_role("leader", Duration::from_secs(LEASE + 10)).await;
    let (ok, log) = stopped.await.unwrap();
    assert!(ok, "cb-a did not stop cleanly:\n{log}");
    assert!(log.contains("released the lease"), "{log}");
    let handover = took_over.duration_since(stopping);
    eprintln!("cb-b took over {:.0} ms after SIGTERM to the leader", handover.as_secs_f64() * 1000.0);
    assert!(handover < Duration::from_millis(LEASE * 1000 / 2), "no release: the takeover took {handover:?}");
}
