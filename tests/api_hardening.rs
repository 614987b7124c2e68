//! The HTTP API under hostile or heavy load, against a real daemon on
//! loopback.
//!
//! - Idle connections: 1,100 sockets that never send a byte, against a
//!   `callbridge` child process started with `ulimit -n 1024` (the stock
//!   soft limit a service gets without `LimitNOFILE`, the setting under
//!   which 1,100 idle connections used to exhaust its descriptors). The
//!   test process keeps its own limit (it needs ~1,100 descriptors; it
//!   checks and says so if it has fewer). `/healthz` must still answer in
//!   under 100 ms.
//! - Header-read timeout: a silent connection is closed.

mod support;

use callbridge::app::{self, RunOptions, SourceSpec};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "lab-api-token";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The lab configuration with its API on `127.0.0.1:0`, events to a file
/// and `extra_api` appended to `[api]`.
fn lab_config(dir: &Path, extra_api: &str) -> PathBuf {
    let config = std::fs::read_to_string(root().join("config/lab.toml")).expect("lab config");
    let config = config
        .replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"127.0.0.1:0\"\n{extra_api}"))
        .replace("path = \"-\"", &format!("path = {:?}", dir.join("events.jsonl")))
        + &format!("\n[outbox]\npath = {:?}\n", dir.join("outbox"));
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

fn soft_nofile() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or("");
    line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// One HTTP/1.1 request on a fresh connection; (status, body) or an error
/// (connect/read timeout included).
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn idle_connections_leave_healthz_answering() {
    const IDLE: usize = 1_100;
    let soft = soft_nofile();
    assert!(soft >= 1_400, "this test opens {IDLE} sockets itself: raise `ulimit -n` (now {soft}) to 1400 or more");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = lab_config(dir.path(), "");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_callbridge"))
        .args(["replay", "--serve", "--api-listen", &addr.to_string(), "--config"])
        .arg(&config)
        .arg(root().join("fixtures/ami/a01-inbound-answered.ami"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start callbridge");
    let _daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(addr, "/healthz", Duration::from_secs(1)).ok().map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "the daemon never answered /healthz");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut idle = Vec::with_capacity(IDLE);
    let mut refused = 0;
    for _ in 0..IDLE {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => idle.push(s),
            Err(_) => refused += 1,
        }
    }
    eprintln!("{} idle connections open, {refused} not accepted by the kernel", idle.len());
    std::thread::sleep(Duration::from_millis(300));

    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let got = http_get(addr, "/healthz", Duration::from_secs(2));
        let took = t.elapsed();
        assert!(matches!(&got, Ok((200, body)) if body.contains("ok")), "/healthz with {IDLE} idle sockets: {got:?}");
        worst = worst.max(took);
    }
    eprintln!("/healthz worst of 5 with {} idle sockets: {worst:?}", idle.len());
    assert!(worst < Duration::from_millis(100), "/healthz took {worst:?}");
    // The authenticated API works as well.
    let (status, body) = http_get(addr, "/v1/calls", Duration::from_secs(2)).expect("/v1/calls");
    assert_eq!(status, 200, "{body}");
    drop(idle);
}

async fn start(config: PathBuf) -> app::Running {
    let source = SourceSpec::Traces { paths: vec![], speed: callbridge::replay::Speed::Max };
    app::start(RunOptions { config_path: config, source, api_listen: None, shutdown_deadline: Duration::from_secs(5) })
        .await
        .expect("daemon starts")
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = start(lab_config(dir.path(), "header_read_timeout_seconds = 0.5\nidle_timeout_seconds = 0.5")).await;
    let addr = running.api_addr.expect("api");
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let t = Instant::now();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf);
        (n.ok(), t.elapsed())
    })
    .await
    .expect("join");
    assert_eq!(closed.0, Some(0), "the silent connection was not closed");
    assert!(closed.1 >= Duration::from_millis(400) && closed.1 < Duration::from_secs(3), "{:?}", closed.1);
    running.stop().await.expect("clean stop");
}
