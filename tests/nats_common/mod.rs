//! Shared by the NATS tests: a real `nats-server` (Debian's package) on a
//! free loopback port with JetStream on a file store in a temporary
//! directory, killed with SIGKILL and restarted on the same store; a reader
//! of everything a stream holds; the checks every NATS test makes (each
//! event exactly once, each call's events in seq order without gaps).
//!
//! Without `nats-server` on PATH the tests print why and pass, except under
//! CI (`CI` set), where `.ci/run` installs it and its absence is a failure.
#![allow(dead_code)]

use async_nats::jetstream::consumer::{pull, AckPolicy};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NATS_SERVER: &str = "nats-server";

pub fn nats_present(test: &str) -> bool {
    if Command::new(NATS_SERVER).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: `nats-server` is not on PATH; CI must run it (.ci/run installs Debian's nats-server)");
    }
    eprintln!("SKIPPED {test}: `nats-server` is not on PATH (apt-get install nats-server to run the NATS tests)");
    false
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A nats-server with JetStream on a file store.
pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start(dir: &Path) -> NatsServer {
        let mut s = NatsServer {
            port: free_port(),
            store: dir.join("jetstream"),
            log: dir.join("nats-server.log"),
            child: None,
        };
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and store; returns once it
    /// accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "nats-server did not start:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown, the store is left as the process had it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL nats-server");
            c.wait().unwrap();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One message of the stream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub id: String,
    pub headers: HashMap<String, String>,
    pub body: serde_json::Value,
    /// When the stream stored it (ns since the epoch).
    pub published_ns: i128,
}

pub async fn jetstream(url: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(url).await.expect("connect to nats-server");
    async_nats::jetstream::new(client)
}

/// How many messages the stream holds (0 when it does not exist).
pub async fn stream_count(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message of the stream, in stream order.
pub async fn read_stream(url: &str, stream: &str) -> Vec<Stored> {
    let js = jetstream(url).await;
    let mut s = js.get_stream(stream).await.expect("the stream exists");
    let n = s.info().await.unwrap().state.messages as usize;
    let consumer = s
        .create_consumer(pull::Config { ack_policy: AckPolicy::None, ..Default::default() })
        .await
        .expect("a consumer");
    let mut out = Vec::with_capacity(n);
    let mut messages = consumer.messages().await.unwrap();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the stream's messages arrive")
            .expect("more messages")
            .expect("a message");
        let headers: HashMap<String, String> = m
            .headers
            .as_ref()
            .map(|h| {
                h.iter().map(|(k, v)| (k.to_string(), v.first().map(|v| v.to_string()).unwrap_or_default())).collect()
            })
            .unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&m.payload).expect("a JSON body");
        let published_ns = m.info().expect("JetStream metadata").published.unix_timestamp_nanos();
        out.push(Stored {
            subject: m.subject.to_string(),
            id: body["id"].as_str().unwrap_or_default().to_string(),
            headers,
            body,
            published_ns,
        });
    }
    out
}

/// Each expected id exactly once and nothing else; each call's events in
/// seq order (1, 2, 3… without gaps) in stream order.
pub fn check_exactly_once_in_order(stored: &[Stored], expected_ids: &[String]) {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for m in stored {
        *count.entry(m.id.as_str()).or_default() += 1;
    }
    let dups: Vec<_> = count.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicates in the stream (first 5): {dups:?}");
    let missing: Vec<_> = expected_ids.iter().filter(|id| !count.contains_key(id.as_str())).take(5).collect();
    assert!(missing.is_empty(), "missing from the stream (first 5 of {}): {missing:?}", expected_ids.len());
    assert_eq!(stored.len(), expected_ids.len(), "the stream holds exactly the expected events");
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for m in stored {
        let Some(seq) = m.body["data"]["seq"].as_u64().filter(|s| *s > 0) else { continue };
        let call = m.body["data"]["call"]["id"].as_str().expect("a call event names its call").to_string();
        let prev = last.insert(call.clone(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "call {call}: seq {seq} stored after {prev}");
    }
}
