//! The FastAGI endpoint over real loopback sockets, with a client that
//! speaks AGI as Asterisk does: the environment block, one reply per
//! command (`200 result=1`), the unsolicited `HANGUP` when the caller hangs
//! up, `511` on a dead channel, `520-` usage texts; plus concurrent
//! sessions, the session cap, timeouts and garbage.

use callbridge::config::Config;
use callbridge::ids::AgentId;
use callbridge::normalize::AgentPresence;
use callbridge::routing::agi::{serve_with, AgiLimits};
use callbridge::routing::{PresenceBoard, RouteOracle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CONFIG: &str = r#"
[pbx]
name = "t"

[[groups]]
id = "support"
queue = "700"
agents = ["maria", "joao"]
timezone = "America/Sao_Paulo"
hours = [{ days = "mon-fri", from = "08:00", to = "18:00" }]
overflow = ["sales"]

[[groups]]
id = "sales"
queue = "701"
agents = ["ana"]
timezone = "America/Sao_Paulo"

[[agents]]
id = "maria"
extension = "2000"
[[agents]]
id = "joao"
extension = "2001"
[[agents]]
id = "ana"
extension = "2002"
"#;

/// Monday 2026-11-23, 12:00 and 18:58 in Sao Paulo.
const NOON: &str = "2026-11-23T15:00:00Z";
const EVENING: &str = "2026-11-23T21:58:00Z";

const WAIT: Duration = Duration::from_secs(5);

fn micros(utc: &str) -> i64 {
    utc.parse::<jiff::Timestamp>().expect("instant").as_microsecond()
}

struct Server {
    addr: SocketAddr,
    clock: Arc<AtomicI64>,
    board: Arc<PresenceBoard>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(limits: AgiLimits) -> Server {
        let config = Config::parse(CONFIG, "agi.toml").expect("valid");
        let routing = Arc::new(callbridge::settings::routing(&config).expect("rules"));
        let board = Arc::new(PresenceBoard::new());
        let clock = Arc::new(AtomicI64::new(micros(NOON)));
        let c = clock.clone();
        let oracle = Arc::new(RouteOracle::with_clock(routing, board.clone(), move || c.load(Ordering::SeqCst)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_with(listener, oracle, limits, shutdown.clone()));
        Server { addr, clock, board, shutdown, task }
    }

    fn at(&self, utc: &str) {
        self.clock.store(micros(utc), Ordering::SeqCst);
    }

    fn pause(&self, agent: &str, queue: &str) {
        let p = AgentPresence { paused: [(queue.to_string(), true)].into(), ..Default::default() };
        self.board.apply([(AgentId::new(agent), p)]);
    }
}

/// The environment block Asterisk 20 sends for
/// `AGI(agi://127.0.0.1:<port>/<script>)` on a SIP channel.
fn env_block(port: u16, script: &str, args: &[&str]) -> String {
    let mut s = format!(
        "agi_network: yes\n\
         agi_network_script: {script}\n\
         agi_request: agi://127.0.0.1:{port}/{script}\n\
         agi_channel: SIP/carrier00-0000000b\n\
         agi_language: en\n\
         agi_type: SIP\n\
         agi_uniqueid: 1795471144.11\n\
         agi_version: 20.5.2\n\
         agi_callerid: 11987650001\n\
         agi_calleridname: Cliente 0001\n\
         agi_callingpres: 0\n\
         agi_callingani2: 0\n\
         agi_callington: 0\n\
         agi_callingtns: 0\n\
         agi_dnid: 1130001000\n\
         agi_rdnis: unknown\n\
         agi_context: from-pstn\n\
         agi_extension: 1130001000\n\
         agi_priority: 3\n\
         agi_enhanced: 0.0\n\
         agi_accountcode: \n\
         agi_threadid: 140245123456768\n"
    );
    for (i, a) in args.iter().enumerate() {
        s.push_str(&format!("agi_arg_{}: {a}\n", i + 1));
    }
    s.push('\n');
    s
}

/// res_agi's `parse_args`: words split on blanks, `"…"` groups, `\`
/// escapes the next character.
fn parse_args(line: &str) -> Vec<String> {
    let (mut args, mut cur) = (Vec::new(), String::new());
    let (mut quoted, mut escaped, mut in_word) = (false, false, false);
    for c in line.chars() {
        match c {
            '"' if !escaped => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' | '\t' if !quoted && !escaped => {
                if in_word {
                    args.push(std::mem::take(&mut cur));
                }
                in_word = false;
            }
            '\\' if !escaped => escaped = true,
            c => {
                cur.push(c);
                in_word = true;
                escaped = false;
            }
        }
    }
    if in_word {
        args.push(cur);
    }
    args
}

/// How the fake Asterisk behaves after the environment block.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Answers every command `200 result=1`.
    Alive,
    /// The caller hung up right after `AGI()` started: `HANGUP` first,
    /// then commands still work (variables for the `h` extension).
    HungUp,
    /// The channel is gone: `HANGUP`, then `511` to every command.
    Dead,
    /// Refuses commands with a multi-line `520` usage text.
    Refuses,
}

/// Runs one AGI session; returns the commands received, in order, as
/// parsed argument lists. The session must end with the server closing.
async fn asterisk(addr: SocketAddr, script: &str, args: &[&str], peer: Peer) -> Vec<Vec<String>> {
    tokio::time::timeout(WAIT, async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        write.write_all(env_block(addr.port(), script, args).as_bytes()).await.expect("env");
        if peer != Peer::Alive && peer != Peer::Refuses {
            write.write_all(b"HANGUP\n").await.expect("hangup");
        }
        let mut commands = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if read.read_line(&mut line).await.expect("read") == 0 {
                return commands;
            }
            let args = parse_args(line.trim_end_matches('\n'));
            commands.push(args);
            let reply: &[u8] = match peer {
                Peer::Alive | Peer::HungUp => b"200 result=1\n",
                Peer::Dead => b"511 Command Not Permitted on a dead channel or intercepted routine\n",
                Peer::Refuses => b"520-Invalid command syntax.  Proper usage follows:\n Usage: SET VARIABLE <variablename> <value>\n520 End of proper usage.\n",
            };
            // The server may already have closed after a refusal.
            let _ = write.write_all(reply).await;
        }
    })
    .await
    .expect("the session ends with the server closing")
}

/// The variables a session set, as (name, value).
fn variables(commands: &[Vec<String>]) -> Vec<(String, String)> {
    commands
        .iter()
        .map(|c| {
            assert_eq!(c.len(), 4, "SET VARIABLE <name> <value>: {c:?}");
            assert_eq!((c[0].as_str(), c[1].as_str()), ("SET", "VARIABLE"), "{c:?}");
            (c[2].clone(), c[3].clone())
        })
        .collect()
}

/// The variables of an answer without a caller lookup: an overflow is
/// also the routing reason.
fn answer(route: &str, queue: &str, group: &str, reason: &str, from: &str, error: &str) -> Vec<(String, String)> {
    let moved = if from.is_empty() { "" } else { "overflow" };
    [
        ("CALLBRIDGE_ROUTE", route),
        ("CALLBRIDGE_QUEUE", queue),
        ("CALLBRIDGE_GROUP", group),
        ("CALLBRIDGE_REASON", reason),
        ("CALLBRIDGE_DIVERTED_FROM", from),
        ("CALLBRIDGE_ERROR", error),
        ("CALLBRIDGE_ROUTING_REASON", moved),
        ("CALLBRIDGE_ROUTING_FROM", from),
        ("CALLBRIDGE_CALLER_FOUND", ""),
        ("CALLBRIDGE_CALLER_ACTIVE", ""),
        ("CALLBRIDGE_CONTACT_ID", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[tokio::test]
async fn routes_by_hours_availability_and_overflow() {
    let s = Server::start(AgiLimits::default()).await;
    let q = |queue: &str, group: &str, from: &str| answer("queue", queue, group, "", from, "");
    let missed = |group: &str, reason: &str| answer("missed", "", group, reason, "", "");

    // (what is going on, request, expected variables)
    type Step = (&'static str, fn(&Server), &'static str, Vec<(String, String)>);
    let steps: Vec<Step> = vec![
        ("noon, everyone in", |s| s.at(NOON), "route?queue=700", q("700", "support", "")),
        ("noon, by group", |_| {}, "route?group=support", q("700", "support", "")),
        ("maria paused", |s| s.pause("maria", "700"), "route?queue=700", q("700", "support", "")),
        ("joao paused too", |s| s.pause("joao", "700"), "route?queue=700", q("701", "sales", "support")),
        ("evening", |s| s.at(EVENING), "route?queue=700", q("701", "sales", "support")),
        ("sales asked directly", |_| {}, "route?queue=701", q("701", "sales", "")),
        ("ana paused", |s| s.pause("ana", "701"), "route?queue=700", missed("support", "outside_hours")),
        ("sales itself", |_| {}, "route?group=sales", missed("sales", "no_agents")),
        ("noon again", |s| s.at(NOON), "route?queue=700", missed("support", "no_agents")),
    ];
    for (what, change, script, want) in steps {
        change(&s);
        let got = variables(&asterisk(s.addr, script, &[], Peer::Alive).await);
        assert_eq!(got, want, "{what}: {script}");
    }
}

#[tokio::test]
async fn the_target_may_come_as_an_argument() {
    let s = Server::start(AgiLimits::default()).await;
    let got = variables(&asterisk(s.addr, "route", &["group=sales"], Peer::Alive).await);
    assert_eq!(got, answer("queue", "701", "sales", "", "", ""));
}

#[tokio::test]
async fn requests_that_cannot_be_routed_say_why() {
    let s = Server::start(AgiLimits::default()).await;
    for (script, code) in [
        ("route?queue=799", "unknown_queue"),
        ("route?group=hr", "unknown_group"),
        ("route", "no_target"),
        ("route?queue=700&group=sales", "ambiguous_target"),
        ("hours?queue=700", "unknown_script"),
    ] {
        let got = variables(&asterisk(s.addr, script, &[], Peer::Alive).await);
        assert_eq!(got, answer("", "", "", "", "", code), "{script}");
    }
}

#[tokio::test]
async fn a_caller_who_hung_up_still_gets_the_variables() {
    let s = Server::start(AgiLimits::default()).await;
    let got = variables(&asterisk(s.addr, "route?queue=700", &[], Peer::HungUp).await);
    assert_eq!(got, answer("queue", "700", "support", "", "", ""));
}

#[tokio::test]
async fn a_dead_channel_ends_the_session_after_one_command() {
    let s = Server::start(AgiLimits::default()).await;
    let commands = asterisk(s.addr, "route?queue=700", &[], Peer::Dead).await;
    assert_eq!(commands.len(), 1, "{commands:?}");
}

#[tokio::test]
async fn a_refused_command_ends_the_session() {
    let s = Server::start(AgiLimits::default()).await;
    let commands = asterisk(s.addr, "route?queue=700", &[], Peer::Refuses).await;
    assert_eq!(commands.len(), 1, "{commands:?}");
    // The server is fine afterwards.
    let got = variables(&asterisk(s.addr, "route?queue=700", &[], Peer::Alive).await);
    assert_eq!(got, answer("queue", "700", "support", "", "", ""));
}

#[tokio::test]
async fn concurrent_sessions_each_get_their_answer() {
    let s = Server::start(AgiLimits::default()).await;
    s.at(EVENING);
    let mut sessions = Vec::new();
    for i in 0..48 {
        let addr = s.addr;
        sessions.push(tokio::spawn(async move {
            let (script, want) = match i % 3 {
                0 => ("route?queue=700", answer("queue", "701", "sales", "", "support", "")),
                1 => ("route?group=sales", answer("queue", "701", "sales", "", "", "")),
                _ => ("route?queue=798", answer("", "", "", "", "", "unknown_queue")),
            };
            (variables(&asterisk(addr, script, &[], Peer::Alive).await), want)
        }));
    }
    for (i, session) in sessions.into_iter().enumerate() {
        let (got, want) = session.await.expect("session task");
        assert_eq!(got, want, "session {i}");
    }
}

/// Sends `input` (then closes the sending side if `close`), and returns
/// everything the server sent before closing.
async fn send_raw(addr: SocketAddr, input: &[u8], close: bool) -> Vec<u8> {
    tokio::time::timeout(WAIT, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(input).await.expect("write");
        if close {
            stream.shutdown().await.expect("shutdown");
        }
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.expect("a clean close, not a reset");
        got
    })
    .await
    .expect("the server closes the session")
}

#[tokio::test]
async fn garbage_gets_a_clean_close_and_nothing_else() {
    let limits = AgiLimits { session_timeout: Duration::from_secs(2), ..AgiLimits::default() };
    let s = Server::start(limits).await;
    let long_line = format!("agi_network_script: route?queue=700{}\n\n", "0".repeat(10_000));
    let endless: String = (0..500).map(|i| format!("agi_x{i}: y\n")).collect();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("binary junk", (0u8..=255).cycle().take(3000).collect(), false),
        ("an HTTP request", b"GET /route?queue=700 HTTP/1.1\r\nHost: pbx\r\n\r\n".to_vec(), false),
        ("a line over the limit", long_line.into_bytes(), false),
        ("an environment block that never ends", endless.into_bytes(), false),
        ("not UTF-8", b"agi_network: yes\nagi_network_script: route?queue=7\xff\xfe0\n\n".to_vec(), false),
        ("no script named", b"agi_network: yes\nagi_channel: SIP/x-1\n\n".to_vec(), false),
        ("a request that is no agi:// URL", b"agi_request: http://x/route?queue=700\n\n".to_vec(), false),
        ("closed inside the environment", b"agi_network: yes\nagi_network_scr".to_vec(), true),
        ("closed at once", Vec::new(), true),
        ("an empty environment", b"\n".to_vec(), false),
    ];
    for (what, input, close) in cases {
        let started = Instant::now();
        let got = send_raw(s.addr, &input, close).await;
        assert!(got.is_empty(), "{what}: the server sent {:?}", String::from_utf8_lossy(&got));
        assert!(started.elapsed() < Duration::from_secs(1), "{what}: closed at once, not by the timeout");
    }
    // Still serving.
    let got = variables(&asterisk(s.addr, "route?queue=700", &[], Peer::Alive).await);
    assert_eq!(got, answer("queue", "700", "support", "", "", ""));
}

#[tokio::test]
async fn a_stalled_session_is_closed_after_the_session_time() {
    let limits = AgiLimits { session_timeout: Duration::from_millis(300), ..AgiLimits::default() };
    let s = Server::start(limits).await;
    let started = Instant::now();
    let got = send_raw(s.addr, b"agi_network: yes\nagi_network_script: route?queue=700\n", false).await;
    assert!(got.is_empty());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn sessions_beyond_the_cap_are_closed_at_once() {
    let limits = AgiLimits { max_sessions: 1, session_timeout: Duration::from_secs(3), ..AgiLimits::default() };
    let s = Server::start(limits).await;
    // A holds the only session, silently.
    let mut a = TcpStream::connect(s.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // B is closed at once, without a word.
    let started = Instant::now();
    let got = send_raw(s.addr, env_block(s.addr.port(), "route?queue=700", &[]).as_bytes(), false).await;
    assert!(got.is_empty());
    assert!(started.elapsed() < Duration::from_secs(1));
    // A is still served.
    a.write_all(env_block(s.addr.port(), "route?queue=700", &[]).as_bytes()).await.expect("env");
    let mut read = BufReader::new(a);
    let mut line = String::new();
    read.read_line(&mut line).await.expect("command");
    assert!(line.starts_with("SET VARIABLE CALLBRIDGE_ROUTE"), "{line:?}");
    drop(read);
    // Once A is over, the next session is served.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = variables(&asterisk(s.addr, "route?queue=700", &[], Peer::Alive).await);
    assert_eq!(got, answer("queue", "700", "support", "", "", ""));
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let s = Server::start(AgiLimits::default()).await;
    let got = variables(&asterisk(s.addr, "route?queue=700", &[], Peer::Alive).await);
    assert_eq!(got.len(), 11);
    s.shutdown.cancel();
    tokio::time::timeout(WAIT, s.task).await.expect("serve returns").expect("no panic");
    assert!(TcpStream::connect(s.addr).await.is_err(), "the listener is closed");
}

#[tokio::test]
async fn agi_settings_are_checked_and_bound() {
    let with_agi = |agi: &str| format!("{CONFIG}\n[agi]\n{agi}\n");
    // (settings, field expected in a problem, why expected in it)
    for (agi, field, why) in [
        (r#"listen = "localhost:4573""#, "agi.listen", "no host names"),
        (r#"listen = "127.0.0.1:0""#, "agi.listen", "port 0"),
        (r#"listen = "127.0.0.1""#, "agi.listen", "not an ip:port"),
        ("max_sessions = 8", "agi.listen", "missing"),
        ("listen = \"127.0.0.1:4573\"\nmax_sessions = 0", "agi.max_sessions", "at least 1"),
        ("listen = \"127.0.0.1:4573\"\nsession_timeout_seconds = 0", "agi.session_timeout_seconds", "> 0"),
        ("listen = \"127.0.0.1:4573\"\nport = 4573", "agi.port", "unknown key"),
    ] {
        let problems = Config::parse(&with_agi(agi), "agi.toml").expect_err(agi).problems;
        assert!(
            problems.iter().any(|p| p.starts_with(&format!("{field}:")) && p.contains(why)),
            "{agi}: no problem at {field} saying {why:?}:\n{}",
            problems.join("\n")
        );
    }

    let text = with_agi("listen = \"127.0.0.1:4573\"\nmax_sessions = 8\nsession_timeout_seconds = 1.5");
    let config = Config::parse(&text, "agi.toml").expect("valid");
    let agi = config.agi.as_ref().expect("[agi]");
    let limits = AgiLimits::from_config(agi).expect("limits");
    assert_eq!((limits.max_sessions, limits.session_timeout), (8, Duration::from_millis(1500)));

    // Binding an address already in use names it.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut busy = agi.clone();
    busy.listen = taken.local_addr().expect("addr").to_string();
    let e = callbridge::routing::agi::bind(&busy).await.expect_err("in use");
    assert!(e.to_string().contains(&busy.listen), "{e}");
}
