//! The SIP connector against a scripted PBX on loopback (UDP and TCP): the
//! peer below speaks SIP with plain string handling, never through
//! callbridge's own parser, and plays the PBX of the lab log (challenge,
//! accept, NOTIFY ring → answer → hang-up, terminate).

mod lifecycle_checks;

use callbridge::config::Config;
use callbridge::event::{Event, EventKind, LineState};
use callbridge::settings;
use callbridge::sip::{self, SipAgent};
use md5::{Digest, Md5};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

/// A SIP request or response as the peer sees it.
#[derive(Debug, Clone)]
struct Msg {
    start: String,
    headers: Vec<(String, String)>,
    from: SocketAddr,
}

impl Msg {
    fn parse(bytes: &[u8], from: SocketAddr) -> Msg {
        let text = String::from_utf8_lossy(bytes);
        let head = text.split("\r\n\r\n").next().unwrap_or("");
        let mut lines = head.split("\r\n");
        let start = lines.next().unwrap_or("").to_string();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        Msg { start, headers, from }
    }

    fn method(&self) -> &str {
        self.start.split(' ').next().unwrap_or("")
    }

    fn uri(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn h(&self, name: &str) -> &str {
        self.header(name).unwrap_or_else(|| panic!("no {name} in {self:?}"))
    }

    fn param(&self, name: &str, param: &str) -> Option<String> {
        let v = self.header(name)?;
        let after = v.rfind('>').map_or(v, |i| &v[i..]);
        after.split(';').find_map(|p| p.trim().strip_prefix(&format!("{param}=")).map(str::to_string))
    }

    fn response(&self, status: &str, to_tag: Option<&str>, extra: &[String]) -> String {
        let mut r = format!("SIP/2.0 {status}\r\n");
        for (n, v) in &self.headers {
            if n.eq_ignore_ascii_case("Via") {
                r.push_str(&format!("Via: {v}\r\n"));
            }
        }
        r.push_str(&format!("From: {}\r\n", self.h("From")));
        match to_tag {
            Some(tag) if self.param("To", "tag").is_none() => {
                r.push_str(&format!("To: {};tag={tag}\r\n", self.h("To")))
            }
            _ => r.push_str(&format!("To: {}\r\n", self.h("To"))),
        }
        r.push_str(&format!("Call-ID: {}\r\nCSeq: {}\r\n", self.h("Call-ID"), self.h("CSeq")));
        for e in extra {
            r.push_str(e);
            r.push_str("\r\n");
        }
        r.push_str("Content-Length: 0\r\n\r\n");
        r
    }
}

fn md5_hex(s: &str) -> String {
    Md5::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks an `Authorization` header the way a PBX does (RFC 2617, qop=auth).
fn check_digest(auth: &str, method: &str, password: &str) {
    let field = |name: &str| -> String {
        let start = auth.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name} in {auth}")) + name.len() + 1;
        let rest = &auth[start..];
        if let Some(q) = rest.strip_prefix('"') {
            q[..q.find('"').unwrap()].to_string()
        } else {
            rest.split(',').next().unwrap().to_string()
        }
    };
    let ha1 = md5_hex(&format!("{}:{}:{password}", field("username"), field("realm")));
    let ha2 = md5_hex(&format!("{method}:{}", field("uri")));
    let expected =
        md5_hex(&format!("{ha1}:{}:{}:{}:{}:{ha2}", field("nonce"), field("nc"), field("cnonce"), field("qop")));
    assert_eq!(field("response"), expected, "digest of {auth}");
}

/// As [`check_digest`], for a PBX that answers `403` instead of failing the test.
fn digest_valid(auth: &str, method: &str, password: &str) -> bool {
    let field = |name: &str| -> Option<String> {
        let start = auth.find(&format!("{name}="))? + name.len() + 1;
        let rest = &auth[start..];
        Some(match rest.strip_prefix('"') {
            Some(q) => q[..q.find('"')?].to_string(),
            None => rest.split(',').next()?.to_string(),
        })
    };
    let check = || -> Option<bool> {
        let ha1 = md5_hex(&format!("{}:{}:{password}", field("username")?, field("realm")?));
        let ha2 = md5_hex(&format!("{method}:{}", field("uri")?));
        let expected = md5_hex(&format!(
            "{ha1}:{}:{}:{}:{}:{ha2}",
            field("nonce")?,
            field("nc")?,
            field("cnonce")?,
            field("qop")?
        ));
        Some(field("response")? == expected)
    };
    check().unwrap_or(false)
}

trait Wire {
    async fn recv(&mut self) -> Msg;
    async fn send(&mut self, to: SocketAddr, bytes: &[u8]);
}

struct UdpPeer(UdpSocket);

impl Wire for UdpPeer {
    async fn recv(&mut self) -> Msg {
        let mut buf = vec![0u8; 70_000];
        let (n, from) = timeout(WAIT, self.0.recv_from(&mut buf)).await.expect("peer waited too long").unwrap();
        Msg::parse(&buf[..n], from)
    }
    async fn send(&mut self, to: SocketAddr, bytes: &[u8]) {
        self.0.send_to(bytes, to).await.unwrap();
    }
}

struct TcpPeer {
    stream: TcpStream,
    buf: Vec<u8>,
    addr: SocketAddr,
}

impl Wire for TcpPeer {
    async fn recv(&mut self) -> Msg {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if self.buf.len() >= end + 4 + len {
                    let msg: Vec<u8> = self.buf.drain(..end + 4 + len).collect();
                    return Msg::parse(&msg, self.addr);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = timeout(WAIT, self.stream.read(&mut chunk)).await.expect("peer waited too long").unwrap();
            assert!(n > 0, "callbridge closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
    async fn send(&mut self, _: SocketAddr, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
}

/// A refresh (in-dialog SUBSCRIBE that does not unsubscribe), such as
/// the keepalive's check of the subscription confirmed longest ago.
fn is_refresh(m: &Msg) -> bool {
    m.method() == "SUBSCRIBE" && m.param("To", "tag").is_some() && m.header("Expires") != Some("0")
}

/// The scripted PBX: answers OPTIONS on its own (and refreshes, while
/// `answer_refreshes`), returns other requests.
struct Pbx<W: Wire> {
    wire: W,
    addr: SocketAddr,
    options_seen: usize,
    notify_cseq: u32,
    answer_refreshes: bool,
}

impl<W: Wire> Pbx<W> {
    /// Answers what the script leaves to the PBX; true when `m` was one.
    async fn answered_on_its_own(&mut self, m: &Msg) -> bool {
        if m.method() == "OPTIONS" {
            self.options_seen += 1;
            let r = m.response("200 OK", Some("pbx-opt"), &[]);
            self.wire.send(m.from, r.as_bytes()).await;
            return true;
        }
        if self.answer_refreshes && is_refresh(m) {
            let r = m.response("200 OK", None, &["Expires: 600".into(), "Contact: <sip:2000@127.0.0.1>".into()]);
            self.wire.send(m.from, r.as_bytes()).await;
            return true;
        }
        false
    }

    async fn request(&mut self, method: &str) -> Msg {
        loop {
            let m = self.wire.recv().await;
            if self.answered_on_its_own(&m).await {
                continue;
            }
            assert_eq!(m.method(), method, "expected {method}, got {m:?}");
            return m;
        }
    }

    async fn response(&mut self) -> Msg {
        loop {
            let m = self.wire.recv().await;
            if self.answered_on_its_own(&m).await {
                continue;
            }
            assert!(m.start.starts_with("SIP/2.0 "), "expected a response, got {m:?}");
            return m;
        }
    }

    async fn reply(&mut self, req: &Msg, status: &str, extra: &[String]) {
        let r = req.response(status, Some("pbx-tag-1"), extra);
        self.wire.send(req.from, r.as_bytes()).await;
    }

    /// Challenge the SUBSCRIBE with 401, check the authenticated retry,
    /// accept it. Returns the accepted SUBSCRIBE.
    async fn accept_subscription(&mut self, nonce: &str, expires: u32) -> Msg {
        let first = self.request("SUBSCRIBE").await;
        assert_eq!(first.h("Event"), "dialog");
        assert_eq!(first.h("Accept"), "application/dialog-info+xml");
        assert!(first.header("Authorization").is_none());
        assert!(first.param("To", "tag").is_none());
        let challenge = format!(r#"WWW-Authenticate: Digest realm="lab", nonce="{nonce}", qop="auth", algorithm=MD5"#);
        self.reply(&first, "401 Unauthorized", &[challenge]).await;
        let second = self.request("SUBSCRIBE").await;
        assert_eq!(second.h("Call-ID"), first.h("Call-ID"));
        assert_eq!(second.param("From", "tag"), first.param("From", "tag"));
        assert_ne!(second.h("CSeq"), first.h("CSeq"));
        let auth = second.h("Authorization");
        assert!(auth.contains(&format!(r#"uri="{}""#, second.uri())), "{auth}");
        check_digest(auth, "SUBSCRIBE", "sub-s3cret");
        self.reply(&second, "200 OK", &[format!("Expires: {expires}"), "Contact: <sip:2000@127.0.0.1>".into()]).await;
        second
    }

    /// Sends a NOTIFY in the subscription's dialog and returns the answer.
    async fn notify(&mut self, sub: &Msg, state: &str, body: &str) -> Msg {
        self.notify_raw(sub, sub.h("Call-ID"), state, body, "application/dialog-info+xml").await
    }

    async fn notify_raw(&mut self, sub: &Msg, call_id: &str, state: &str, body: &str, ctype: &str) -> Msg {
        self.notify_cseq += 1;
        let contact = sub.h("Contact");
        let target = &contact[contact.find('<').unwrap() + 1..contact.find('>').unwrap()];
        let msg = format!(
            "NOTIFY {target} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKpbx{}\r\nMax-Forwards: 70\r\n\
             From: {};tag=pbx-tag-1\r\nTo: {}\r\nCall-ID: {call_id}\r\nCSeq: {} NOTIFY\r\n\
             Event: dialog\r\nSubscription-State: {state}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.notify_cseq,
            sub.h("To"),
            sub.h("From"),
            self.notify_cseq,
            body.len()
        );
        self.wire.send(sub.from, msg.as_bytes()).await;
        self.response().await
    }
}

fn doc(version: u32, inner: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?>\n<dialog-info xmlns=\"urn:ietf:params:xml:ns:dialog-info\" version=\"{version}\" \
         state=\"full\" entity=\"sip:2000@127.0.0.1:5060\">\n{inner}</dialog-info>\n"
    )
}

const EARLY: &str = "<dialog id=\"2000\" call-id=\"pickup-1\" direction=\"recipient\">\n<remote>\n\
    <identity display=\"Cliente 0003\">sip:31955550003@127.0.0.1</identity>\n\
    <target uri=\"sip:31955550003@127.0.0.1\"/>\n</remote>\n<state>early</state>\n</dialog>\n";
const CONFIRMED: &str = "<dialog id=\"2000\">\n<state>confirmed</state>\n</dialog>\n";
const TERMINATED: &str = "<dialog id=\"2000\">\n<state>terminated</state>\n</dialog>\n";

fn config(pbx: SocketAddr, transport: &str, ami: bool, request_timeout: f64) -> Config {
    config_with(pbx, transport, ami, request_timeout, 1.0, "[[agents]]\nid = \"maria\"\nextension = \"2000\"\n")
}

fn config_with(
    pbx: SocketAddr,
    transport: &str,
    ami: bool,
    request_timeout: f64,
    options: f64,
    agents: &str,
) -> Config {
    let ami = if ami { "[pbx.ami]\naddress = \"127.0.0.1:5038\"\nusername = \"u\"\nsecret = \"s\"\n" } else { "" };
    let text = format!(
        "[pbx]\nname = \"lab\"\n{ami}\n{agents}\n\
         [sip]\nbind = \"127.0.0.1:0\"\npbx = \"{pbx}\"\ntransport = \"{transport}\"\nusername = \"callbridge\"\n\
         secret = \"sub-s3cret\"\noptions_interval_seconds = {options}\n\
         request_timeout_seconds = {request_timeout}\noffer_identity_wait_seconds = 0\nmax_message_bytes = 8192\n"
    );
    Config::parse(&text, "test").unwrap()
}

/// A scripted PBX on a UDP socket and an agent subscribed to it.
async fn udp_pbx_and_agent(
    ami: bool,
    request_timeout: f64,
) -> (Pbx<UdpPeer>, SipAgent, mpsc::Receiver<Event>, CancellationToken) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let pbx = Pbx { wire: UdpPeer(socket), addr, options_seen: 0, notify_cseq: 100, answer_refreshes: true };
    let (agent, rx, shutdown) = start(&config(addr, "udp", ami, request_timeout)).await;
    (pbx, agent, rx, shutdown)
}

async fn start(config: &Config) -> (SipAgent, mpsc::Receiver<Event>, CancellationToken) {
    let (tx, rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let directory = Arc::new(settings::directory(config));
    let sip_settings = settings::sip_settings(config).unwrap();
    let agent = sip::spawn(sip_settings, settings::sip_mode(config), directory, "lab".into(), tx, shutdown.clone())
        .await
        .unwrap();
    (agent, rx, shutdown)
}

async fn next_events(rx: &mut mpsc::Receiver<Event>, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(timeout(WAIT, rx.recv()).await.expect("no event").expect("channel closed"));
    }
    out
}

fn types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.type_name()).collect()
}

fn line_state(e: &Event) -> (LineState, Option<String>) {
    match &e.kind {
        EventKind::AgentLine { state, remote, .. } => (*state, remote.clone()),
        k => panic!("{k:?}"),
    }
}

#[tokio::test]
async fn udp_ring_answer_hangup_terminate_and_resubscribe() {
    let (mut pbx, agent, mut rx, shutdown) = udp_pbx_and_agent(false, 2.0).await;

    let sub = pbx.accept_subscription("n-1", 600).await;
    assert!(sub.h("Via").starts_with(&format!("SIP/2.0/UDP {};branch=z9hG4bK", agent.local_addr)));
    let r = pbx.notify(&sub, "active;expires=600", &doc(0, TERMINATED)).await;
    assert!(r.start.starts_with("SIP/2.0 200"), "{r:?}");
    let e = next_events(&mut rx, 1).await;
    assert_eq!(line_state(&e[0]), (LineState::Idle, None));

    let r = pbx.notify(&sub, "active;expires=590", &doc(1, EARLY)).await;
    assert!(r.start.starts_with("SIP/2.0 200"));
    let mut all = next_events(&mut rx, 3).await;
    assert_eq!(types(&all), ["agent.line", "call.started", "call.offered"]);
    assert_eq!(line_state(&all[0]), (LineState::Ringing, Some("31955550003".into())));
    assert_eq!(all[2].call.as_ref().unwrap().caller.number.as_deref(), Some("31955550003"));

    // A retransmitted NOTIFY (same version) is answered and changes nothing.
    let r = pbx.notify(&sub, "active", &doc(1, EARLY)).await;
    assert!(r.start.starts_with("SIP/2.0 200"));
    pbx.notify(&sub, "active", &doc(2, CONFIRMED)).await;
    let e = next_events(&mut rx, 2).await;
    assert_eq!(types(&e), ["agent.line", "call.answered"]);
    all.extend(e);

    // Malformed bodies and messages are answered, counted and survived.
    let r = pbx.notify(&sub, "active", "<dialog-info version=\"3\" state=\"full\"><dialog").await;
    assert!(r.start.starts_with("SIP/2.0 400"), "{r:?}");
    let r = pbx.notify(&sub, "active", &doc(3, "<dialog id=\"2000\"><state>ringing-ish</state></dialog>")).await;
    assert!(r.start.starts_with("SIP/2.0 400"), "{r:?}");
    let r = pbx.notify_raw(&sub, sub.h("Call-ID"), "active", "{}", "application/json").await;
    assert!(r.start.starts_with("SIP/2.0 415"), "{r:?}");
    let r =
        pbx.notify_raw(&sub, "stale-subscription@pbx", "active", &doc(9, EARLY), "application/dialog-info+xml").await;
    assert!(r.start.starts_with("SIP/2.0 481"), "{r:?}");
    let addr = pbx.addr;
    let broken = format!(
        "NOTIFY sip:callbridge@{} SIP/2.0\r\nVia: SIP/2.0/UDP {addr};branch=z9hG4bKbroken\r\n\
         From: <sip:2000@pbx>;tag=x\r\nTo: <sip:callbridge@h>;tag=y\r\nCall-ID: b1\r\nCSeq: 1 NOTIFY\r\n\
         this line is no header\r\n\r\n",
        agent.local_addr
    );
    pbx.wire.send(agent.local_addr, broken.as_bytes()).await;
    let r = pbx.response().await;
    assert!(r.start.starts_with("SIP/2.0 400") && r.h("CSeq") == "1 NOTIFY", "{r:?}");
    pbx.wire.send(agent.local_addr, &[0xffu8; 10_000]).await; // oversized: dropped
    pbx.wire.send(agent.local_addr, b"\x00\x01\x02 binary garbage").await; // not even a request: dropped

    // Hang-up, then the PBX ends the subscription: callbridge re-subscribes.
    pbx.notify(&sub, "active", &doc(3, TERMINATED)).await;
    let e = next_events(&mut rx, 2).await;
    assert_eq!(types(&e), ["agent.line", "call.ended"]);
    assert_eq!(line_state(&e[0]), (LineState::Idle, None));
    all.extend(e);
    let r = pbx.notify(&sub, "terminated;reason=deactivated", "").await;
    assert!(r.start.starts_with("SIP/2.0 200"));
    let again = pbx.accept_subscription("n-2", 600).await;
    assert_ne!(again.h("Call-ID"), sub.h("Call-ID"), "a new subscription dialog");
    // The new subscription's versions start over.
    pbx.notify(&again, "active", &doc(0, EARLY)).await;
    let e = next_events(&mut rx, 3).await;
    assert_eq!(types(&e), ["agent.line", "call.started", "call.offered"]);
    all.extend(e);
    pbx.notify(&again, "active", &doc(1, TERMINATED)).await;
    let e = next_events(&mut rx, 4).await;
    assert_eq!(types(&e), ["agent.line", "call.offer_ended", "call.missed", "call.ended"]);
    all.extend(e);
    lifecycle_checks::check_invariants(&all, "lab").unwrap();

    assert!(agent.status.subscriptions_active() == 1 && agent.status.subscriptions_total() == 1);
    // Keepalive: the peer answers OPTIONS, so the PBX is reachable.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(agent.status.reachable() && agent.status.rtt().is_some()) {
        assert!(tokio::time::Instant::now() < deadline, "never reachable");
        let _ = timeout(Duration::from_millis(200), pbx.request("NONE")).await;
    }
    assert!(agent.status.ready());
    assert!(pbx.options_seen > 0);

    // Shutdown unsubscribes (Expires: 0) and ends the task.
    shutdown.cancel();
    let bye = pbx.request("SUBSCRIBE").await;
    assert_eq!(bye.h("Expires"), "0");
    assert_eq!(bye.h("Call-ID"), again.h("Call-ID"));
    timeout(WAIT, agent.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn refresh_before_expiry_and_restart_after_481() {
    // No keepalive: its check of the subscription would come before the refresh.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let mut pbx = Pbx { wire: UdpPeer(socket), addr, options_seen: 0, notify_cseq: 100, answer_refreshes: false };
    let agents = "[[agents]]\nid = \"maria\"\nextension = \"2000\"\n";
    let (agent, mut rx, shutdown) = start(&config_with(addr, "udp", true, 2.0, 0.0, agents)).await;
    let sub = pbx.accept_subscription("n-1", 2).await;
    let granted_at = tokio::time::Instant::now();
    pbx.notify(&sub, "active;expires=2", &doc(0, CONFIRMED)).await;
    let e = next_events(&mut rx, 1).await;
    assert_eq!(types(&e), ["agent.line"], "line only: AMI owns calls");
    assert_eq!(line_state(&e[0]).0, LineState::Busy);
    let refresh = pbx.request("SUBSCRIBE").await;
    let waited = granted_at.elapsed();
    // Scheduled at 85 % of the 2 s granted (1.7 s); the slack is for loaded CI machines.
    assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_millis(2300), "refresh after {waited:?}");
    assert_eq!(refresh.h("Call-ID"), sub.h("Call-ID"));
    assert_eq!(refresh.param("To", "tag").as_deref(), Some("pbx-tag-1"));
    assert_eq!(refresh.uri(), "sip:2000@127.0.0.1", "in-dialog requests go to the PBX's Contact");
    // The PBX restarted and forgot the dialog.
    assert_eq!(agent.status.subscriptions_active(), 1, "a refresh in flight: still held");
    pbx.reply(&refresh, "481 Subscription does not exist", &[]).await;
    let first = pbx.request("SUBSCRIBE").await;
    assert!(first.param("To", "tag").is_none(), "a new dialog: {first:?}");
    assert_eq!(agent.status.subscriptions_active(), 0, "481: the PBX holds nothing");
    let challenge = r#"WWW-Authenticate: Digest realm="lab", nonce="n-2", qop="auth", algorithm=MD5"#.to_string();
    pbx.reply(&first, "401 Unauthorized", &[challenge]).await;
    let fresh = pbx.request("SUBSCRIBE").await;
    check_digest(fresh.h("Authorization"), "SUBSCRIBE", "sub-s3cret");
    pbx.reply(&fresh, "200 OK", &["Expires: 600".into(), "Contact: <sip:2000@127.0.0.1>".into()]).await;
    assert_ne!(fresh.h("Call-ID"), sub.h("Call-ID"));
    let deadline = tokio::time::Instant::now() + WAIT;
    while agent.status.subscriptions_active() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never active again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    timeout(WAIT, agent.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn unanswered_options_make_the_pbx_unreachable() {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let config = config(addr, "udp", false, 0.5);
    let (agent, _rx, shutdown) = start(&config).await;
    let mut buf = vec![0u8; 65_536];
    // Answer the first OPTIONS (and nothing else): reachable, with an RTT.
    loop {
        let (n, from) = timeout(WAIT, socket.recv_from(&mut buf)).await.unwrap().unwrap();
        let m = Msg::parse(&buf[..n], from);
        if m.method() == "OPTIONS" {
            socket.send_to(m.response("200 OK", Some("t"), &[]).as_bytes(), from).await.unwrap();
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while !agent.status.reachable() {
        assert!(tokio::time::Instant::now() < deadline, "never reachable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(agent.status.rtt().is_some_and(|rtt| rtt < Duration::from_secs(1)));
    assert!(!agent.status.ready(), "reachable, but no subscription yet");
    // Then silence: the next OPTIONS (1 s later) times out 0.5 s after.
    while agent.status.reachable() {
        assert!(tokio::time::Instant::now() < deadline, "still reachable");
        let _ = timeout(Duration::from_millis(50), socket.recv_from(&mut buf)).await;
    }
    assert_eq!(agent.status.subscriptions_active(), 0);
    shutdown.cancel();
    timeout(WAIT, agent.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn tcp_transport_subscribes_and_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = config(addr, "tcp", false, 2.0);
    let (agent, mut rx, shutdown) = start(&config).await;
    let (stream, peer_addr) = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    let mut pbx = Pbx {
        wire: TcpPeer { stream, buf: Vec::new(), addr: peer_addr },
        addr,
        options_seen: 0,
        notify_cseq: 1,
        answer_refreshes: true,
    };
    let sub = pbx.accept_subscription("t-1", 600).await;
    assert!(sub.h("Via").starts_with("SIP/2.0/TCP "), "{}", sub.h("Via"));
    assert!(sub.h("Contact").contains(";transport=tcp"));
    pbx.notify(&sub, "active", &doc(0, EARLY)).await;
    assert_eq!(types(&next_events(&mut rx, 3).await), ["agent.line", "call.started", "call.offered"]);
    // The PBX restarts (the connection drops): callbridge reconnects and
    // checks the subscription; the new PBX does not know it, so it
    // subscribes anew.
    drop(pbx);
    let (stream, peer_addr) = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    let mut pbx = Pbx {
        wire: TcpPeer { stream, buf: Vec::new(), addr: peer_addr },
        addr,
        options_seen: 0,
        notify_cseq: 1,
        answer_refreshes: false,
    };
    let check = pbx.request("SUBSCRIBE").await;
    assert_eq!(check.h("Call-ID"), sub.h("Call-ID"), "a refresh of the known dialog");
    assert!(check.param("To", "tag").is_some());
    pbx.reply(&check, "481 Subscription does not exist", &[]).await;
    let again = pbx.accept_subscription("t-2", 600).await;
    assert_ne!(again.h("Call-ID"), sub.h("Call-ID"));
    pbx.notify(&again, "active", &doc(0, "")).await;
    let e = next_events(&mut rx, 4).await;
    assert_eq!(types(&e), ["agent.line", "call.offer_ended", "call.missed", "call.ended"]);
    shutdown.cancel();
    timeout(WAIT, agent.task).await.unwrap().unwrap().unwrap();
}

/// One datagram of non-ASCII garbage once panicked the user agent's task
/// (its parse error was shortened inside a UTF-8 character): the process
/// stayed up but SIP was dead. Every such datagram is now survived, and
/// the next NOTIFY is answered and reported.
#[tokio::test]
async fn non_ascii_garbage_datagrams_do_not_stop_the_connector() {
    let (mut pbx, agent, mut rx, shutdown) = udp_pbx_and_agent(false, 2.0).await;
    let sub = pbx.accept_subscription("n-1", 600).await;
    let r = pbx.notify(&sub, "active;expires=600", &doc(0, TERMINATED)).await;
    assert!(r.start.starts_with("SIP/2.0 200"), "{r:?}");
    assert_eq!(line_state(&next_events(&mut rx, 1).await[0]), (LineState::Idle, None));

    // Whatever the cut, one of these puts the 120-byte mark of the parse
    // error inside a multi-byte character.
    for pad in 0..4 {
        for filler in ["é", "€", "📞"] {
            let garbage = format!("{}{} SIP/2.0\r\n\r\n", "x".repeat(pad), filler.repeat(200));
            pbx.wire.send(agent.local_addr, garbage.as_bytes()).await;
        }
    }
    let addr = pbx.addr;
    let broken = format!(
        "NOTIFY sip:callbridge@{} SIP/2.0\r\nVia: SIP/2.0/UDP {addr};branch=z9hG4bKutf8\r\n\
         From: <sip:2000@pbx>;tag=x\r\nTo: <sip:callbridge@h>;tag=y\r\nCall-ID: b1\r\nCSeq: 1 NOTIFY\r\n\
         não é um cabeçalho {}\r\n\r\n",
        agent.local_addr,
        "📞".repeat(100)
    );
    pbx.wire.send(agent.local_addr, broken.as_bytes()).await;
    let r = pbx.response().await;
    assert!(r.start.starts_with("SIP/2.0 400") && r.h("CSeq") == "1 NOTIFY", "{r:?}");

    // Still alive: the next NOTIFY is answered and becomes agent.line.
    let r = pbx.notify(&sub, "active", &doc(1, EARLY)).await;
    assert!(r.start.starts_with("SIP/2.0 200"), "{r:?}");
    let e = next_events(&mut rx, 3).await;
    assert_eq!(types(&e), ["agent.line", "call.started", "call.offered"]);
    assert_eq!(line_state(&e[0]), (LineState::Ringing, Some("31955550003".into())));
    assert!(!agent.task.is_finished());
    shutdown.cancel();
    let bye = pbx.request("SUBSCRIBE").await;
    assert_eq!(bye.h("Expires"), "0");
    timeout(WAIT, agent.task).await.unwrap().unwrap().unwrap();
}

/// Over UDP an unanswered SUBSCRIBE is sent again, byte for byte, after
/// T1 (0.5 s) and then at doubling intervals; its final response, even to
/// a retransmission, ends the transaction.
#[tokio::test]
async fn unanswered_udp_requests_are_retransmitted() {
    let (mut pbx, agent, _rx, shutdown) = udp_pbx_and_agent(false, 10.0).await;
    let first = pbx.request("SUBSCRIBE").await;
    let t0 = tokio::time::Instant::now();
    let second = pbx.request("SUBSCRIBE").await;
    let t1 = tokio::time::Instant::now();
    let third = pbx.request("SUBSCRIBE").await;
    let t2 = tokio::time::Instant::now();
    for again in [&second, &third] {
        assert_eq!(again.headers, first.headers, "a retransmission is the same request");
    }
    // 0.5 s, then 1 s (the slack is for loaded CI machines).
    let (d1, d2) = (t1 - t0, t2 - t1);
    assert!(d1 >= Duration::from_millis(350) && d1 < Duration::from_millis(1000), "first after {d1:?}");
    assert!(d2 >= Duration::from_millis(800) && d2 < Duration::from_millis(1700), "second after {d2:?}");
    pbx.reply(&third, "200 OK", &["Expires: 600".into(), "Contact: <sip:2000@127.0.0.1>".into()]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while agent.status.subscriptions_active() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Answered: no more retransmissions (only keepalives, which `request` answers).
    assert!(timeout(Duration::from_millis(1500), pbx.request("SUBSCRIBE")).await.is_err());
    shutdown.cancel();
    let bye = pbx.request("SUBSCRIBE").await;
    assert_eq!(bye.h("Expires"), "0");
    timeout(WAIT, agent.task).await.unwrap().unwrap().unwrap();
}

/// What the automatic PBX below does; a test changes it while it runs.
#[derive(Debug)]
struct Policy {
    /// Drops everything: the PBX is down (or restarting).
    silent: bool,
    /// Drops new SUBSCRIBEs (no To tag): the PBX is still booting.
    hold_new: bool,
    /// Status line and `Server` of OPTIONS answers.
    options_status: &'static str,
    server: &'static str,
    /// Dialog-info of the NOTIFY sent after each accepted SUBSCRIBE.
    line: &'static str,
}

/// A PBX that runs by itself, the way Asterisk's chan_sip does: it
/// challenges every SUBSCRIBE (initial, refresh and unsubscribe), accepts
/// authenticated ones and sends a full-state NOTIFY after each, answers
/// `481` to in-dialog SUBSCRIBEs of dialogs it does not hold, and answers
/// OPTIONS. [`AutoPbx::restart`] forgets every dialog, like a restart.
struct AutoPbx {
    policy: Arc<Mutex<Policy>>,
    /// Every request received, with when.
    seen: Arc<Mutex<Vec<(tokio::time::Instant, Msg)>>>,
    /// Dialogs held: Call-ID → next dialog-info version.
    held: Arc<Mutex<HashMap<String, u32>>>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AutoPbx {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl AutoPbx {
    async fn start(line: &'static str) -> AutoPbx {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let policy = Arc::new(Mutex::new(Policy {
            silent: false,
            hold_new: false,
            options_status: "200 OK",
            server: "Asterisk PBX 20.5.0",
            line,
        }));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(HashMap::new()));
        let (p, s, h) = (policy.clone(), seen.clone(), held.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 70_000];
            let mut nonce = 0u32;
            let mut cseq = 100u32;
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
                let m = Msg::parse(&buf[..n], from);
                if m.start.starts_with("SIP/2.0") {
                    continue; // answers to our NOTIFYs
                }
                s.lock().unwrap().push((tokio::time::Instant::now(), m.clone()));
                let (silent, hold_new, options_status, server, line) = {
                    let p = p.lock().unwrap();
                    (p.silent, p.hold_new, p.options_status, p.server, p.line)
                };
                if silent {
                    continue;
                }
                let send = |bytes: String| {
                    let socket = &socket;
                    async move { socket.send_to(bytes.as_bytes(), from).await.unwrap() }
                };
                match m.method() {
                    "OPTIONS" => {
                        send(m.response(options_status, Some("opt"), &[format!("Server: {server}")])).await;
                    }
                    "SUBSCRIBE" => {
                        let call_id = m.h("Call-ID").to_string();
                        let in_dialog = m.param("To", "tag").is_some();
                        if in_dialog && !h.lock().unwrap().contains_key(&call_id) {
                            send(m.response("481 Subscription does not exist", None, &[])).await;
                            continue;
                        }
                        if !in_dialog && hold_new {
                            continue;
                        }
                        let Some(auth) = m.header("Authorization") else {
                            nonce += 1;
                            let challenge = format!(
                                r#"WWW-Authenticate: Digest realm="lab", nonce="auto-{nonce}", qop="auth", algorithm=MD5"#
                            );
                            send(m.response("401 Unauthorized", Some("pbx-auto"), &[challenge])).await;
                            continue;
                        };
                        if !digest_valid(auth, "SUBSCRIBE", "sub-s3cret") {
                            send(m.response("403 Forbidden", Some("pbx-auto"), &[])).await;
                            continue;
                        }
                        if m.header("Expires") == Some("0") {
                            h.lock().unwrap().remove(&call_id);
                            send(m.response("200 OK", Some("pbx-auto"), &["Expires: 0".into()])).await;
                            continue;
                        }
                        let version = {
                            let mut h = h.lock().unwrap();
                            let v = h.entry(call_id.clone()).or_insert(0);
                            *v += 1;
                            *v - 1
                        };
                        let ok = ["Expires: 600".to_string(), format!("Contact: <sip:{}>", addr)];
                        send(m.response("200 OK", Some("pbx-auto"), &ok)).await;
                        // Full state after every (re)subscription, as chan_sip does.
                        let contact = m.h("Contact");
                        let target = &contact[contact.find('<').unwrap() + 1..contact.find('>').unwrap()];
                        let to_user = m.h("To").split(";tag=").next().unwrap().to_string();
                        let body = doc(version, line);
                        cseq += 1;
                        let notify = format!(
                            "NOTIFY {target} SIP/2.0\r\nVia: SIP/2.0/UDP {addr};branch=z9hG4bKauto{cseq}\r\n\
                             Max-Forwards: 70\r\nFrom: {to_user};tag=pbx-auto\r\nTo: {}\r\nCall-ID: {call_id}\r\n\
                             CSeq: {cseq} NOTIFY\r\nEvent: dialog\r\nSubscription-State: active;expires=600\r\n\
                             Content-Type: application/dialog-info+xml\r\nContent-Length: {}\r\n\r\n{body}",
                            m.h("From"),
                            body.len()
                        );
                        send(notify).await;
                    }
                    _ => {
                        send(m.response("405 Method Not Allowed", Some("pbx-auto"), &[])).await;
                    }
                }
            }
        });
        AutoPbx { policy, seen, held, addr, task }
    }

    fn set(&self, f: impl FnOnce(&mut Policy)) {
        f(&mut self.policy.lock().unwrap());
    }

    /// Forgets every subscription, as a restarted PBX does.
    fn restart(&self) {
        self.held.lock().unwrap().clear();
    }

    fn held(&self) -> Vec<String> {
        let mut v: Vec<String> = self.held.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }

    /// The SUBSCRIBEs received at or after `since`.
    fn subscribes_since(&self, since: tokio::time::Instant) -> Vec<(tokio::time::Instant, Msg)> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|(t, m)| *t >= since && m.method() == "SUBSCRIBE").cloned().collect()
    }

    /// When the first OPTIONS at or after `since` arrived.
    fn first_options_since(&self, since: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let seen = self.seen.lock().unwrap();
        seen.iter().find(|(t, m)| *t >= since && m.method() == "OPTIONS").map(|(t, _)| *t)
    }
}

fn agents(n: usize) -> String {
    (0..n).map(|i| format!("[[agents]]\nid = \"agent{i}\"\nextension = \"{}\"\n", 2000 + i)).collect()
}

async fn until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `agent.line` states until `n` events, each with its arrival time.
async fn lines(rx: &mut mpsc::Receiver<Event>, n: usize) -> Vec<(tokio::time::Instant, String, LineState)> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = timeout(Duration::from_secs(8), rx.recv()).await.expect("no agent.line").expect("channel closed");
        if let EventKind::AgentLine { agent, state, .. } = &e.kind {
            out.push((tokio::time::Instant::now(), agent.to_string(), *state));
        }
    }
    out
}

/// A PBX that restarts between two keepalives, quickly and silently (no
/// NOTIFY, OPTIONS always answered, refreshes due in 8 minutes): the
/// keepalive's check of the subscription confirmed longest ago gets `481`,
/// every subscription is checked and subscribed anew within seconds,
/// `agent.line` flows again, and the active count tells the truth
/// throughout. Shutdown then unsubscribes each, answering the challenge.
#[tokio::test]
async fn a_quick_silent_pbx_restart_is_found_and_every_extension_resubscribed() {
    let pbx = AutoPbx::start(TERMINATED).await;
    let config = config_with(pbx.addr, "udp", true, 2.0, 1.0, &agents(2));
    let (agent, mut rx, shutdown) = start(&config).await;
    let idle = lines(&mut rx, 2).await;
    assert!(idle.iter().all(|(_, _, s)| *s == LineState::Idle), "{idle:?}");
    until("both active", WAIT, || agent.status.subscriptions_active() == 2).await;
    let before = pbx.held();
    assert_eq!(before.len(), 2);

    // Restart: the PBX holds nothing, and answers new SUBSCRIBEs only
    // once it has booted. Meanwhile, a phone starts ringing.
    pbx.set(|p| {
        p.hold_new = true;
        p.line = EARLY;
    });
    pbx.restart();
    let restarted = tokio::time::Instant::now();
    until("the active count drops to 0 (481: not held)", WAIT, || agent.status.subscriptions_active() == 0).await;
    let found = restarted.elapsed();
    let checks: Vec<Msg> = pbx.subscribes_since(restarted).into_iter().map(|(_, m)| m).collect();
    for call_id in &before {
        assert!(
            checks.iter().any(|m| m.h("Call-ID") == call_id && m.param("To", "tag").is_some()),
            "{call_id} checked in its dialog: {checks:?}"
        );
    }
    assert!(found < Duration::from_secs(3), "found after {found:?} (keepalive every 1 s)");

    // Booted: both extensions are subscribed anew and report again.
    pbx.set(|p| p.hold_new = false);
    let booted = tokio::time::Instant::now();
    let ringing = lines(&mut rx, 2).await;
    assert!(ringing.iter().all(|(_, _, s)| *s == LineState::Ringing), "{ringing:?}");
    let mut who: Vec<&str> = ringing.iter().map(|(_, a, _)| a.as_str()).collect();
    who.sort();
    assert_eq!(who, ["agent0", "agent1"]);
    let flowing = ringing.iter().map(|(t, _, _)| *t - booted).max().unwrap();
    assert!(flowing < Duration::from_secs(5), "agent.line again after {flowing:?}");
    until("both active again", WAIT, || agent.status.subscriptions_active() == 2).await;
    let after = pbx.held();
    assert_eq!(after.len(), 2, "no stale subscription");
    assert!(after.iter().all(|c| !before.contains(c)), "new dialogs");

    // Shutdown: Expires: 0 in each dialog, challenged, then authenticated.
    let stopping = tokio::time::Instant::now();
    shutdown.cancel();
    timeout(WAIT, agent.task).await.unwrap().unwrap().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(1), "unsubscribed in {:?}", stopping.elapsed());
    let byes: Vec<Msg> = pbx
        .subscribes_since(stopping)
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| m.header("Expires") == Some("0"))
        .collect();
    for call_id in &after {
        let ours: Vec<&Msg> = byes.iter().filter(|m| m.h("Call-ID") == call_id).collect();
        assert_eq!(ours.len(), 2, "{call_id}: {byes:?}");
        assert!(ours[0].header("Authorization").is_none());
        check_digest(ours[1].h("Authorization"), "SUBSCRIBE", "sub-s3cret");
    }
    assert!(pbx.held().is_empty(), "the PBX holds nothing after the shutdown: {:?}", pbx.held());
}

/// A PBX that stops answering (down, or restarting slowly) and comes back
/// without its subscriptions: while it is silent the keepalive looks again
/// every 1 s, 2 s…; its first answer checks every subscription at once
/// (requests left unanswered are sent anew), so `agent.line` flows again
/// within seconds instead of after the backoff or the refresh.
#[tokio::test]
async fn a_pbx_back_after_a_silence_gets_every_extension_resubscribed_within_seconds() {
    let pbx = AutoPbx::start(TERMINATED).await;
    let config = config_with(pbx.addr, "udp", true, 1.0, 1.0, &agents(1));
    let (agent, mut rx, shutdown) = start(&config).await;
    assert_eq!(lines(&mut rx, 1).await[0].2, LineState::Idle);
    until("active", WAIT, || agent.status.subscriptions_active() == 1).await;
    until("reachable", WAIT, || agent.status.reachable()).await;
    let before = pbx.held();

    pbx.set(|p| {
        p.silent = true;
        p.line = CONFIRMED;
    });
    pbx.restart();
    until("unreachable", WAIT, || !agent.status.reachable()).await;
    // Down long enough for the subscription's own retries to back off.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let back = tokio::time::Instant::now();
    pbx.set(|p| p.silent = false);
    let busy = lines(&mut rx, 1).await;
    assert_eq!(busy[0].2, LineState::Busy);
    let flowing = busy[0].0 - back;
    assert!(flowing < Duration::from_secs(5), "agent.line again after {flowing:?}");
    until("active again", WAIT, || agent.status.subscriptions_active() == 1).await;
    until("reachable again", WAIT, || agent.status.reachable()).await;
    let after = pbx.held();
    assert_eq!(after.len(), 1);
    assert_ne!(after, before);
    shutdown.cancel();
    timeout(WAIT, agent.task).await.unwrap().unwrap().unwrap();
    assert!(pbx.held().is_empty());
}

/// The PBX answering OPTIONS differently (`503` while Asterisk shuts down,
/// then `200`; another `Server` after an upgrade) checks every
/// subscription at once, not one per keepalive.
#[tokio::test]
async fn a_changed_options_answer_checks_every_subscription() {
    let pbx = AutoPbx::start(TERMINATED).await;
    let config = config_with(pbx.addr, "udp", true, 2.0, 1.0, &agents(3));
    let (agent, mut rx, shutdown) = start(&config).await;
    lines(&mut rx, 3).await;
    until("all active", WAIT, || agent.status.subscriptions_active() == 3).await;
    let held = pbx.held();
    let changes: [fn(&mut Policy); 3] = [
        |p| p.options_status = "503 Service Unavailable",
        |p| p.options_status = "200 OK",
        |p| p.server = "Asterisk PBX 22.1.0",
    ];
    for change in changes {
        let since = tokio::time::Instant::now();
        pbx.set(change);
        let deadline = since + Duration::from_secs(3);
        let answered = loop {
            if let Some(t) = pbx.first_options_since(since) {
                break t;
            }
            assert!(tokio::time::Instant::now() < deadline, "no OPTIONS");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Within 0.9 s of that answer (the next keepalive is 1 s later, and
        // checks one subscription at most): all three refreshed.
        tokio::time::sleep_until(answered + Duration::from_millis(900)).await;
        let refreshed: std::collections::HashSet<String> = pbx
            .subscribes_since(answered)
            .into_iter()
            .filter(|(t, m)| *t <= answered + Duration::from_millis(900) && is_refresh(m))
            .map(|(_, m)| m.h("Call-ID").to_string())
            .collect();
        assert_eq!(refreshed.len(), 3, "refreshed after the change: {refreshed:?}");
    }
    assert_eq!(pbx.held(), held, "the PBX kept them: same dialogs");
    assert_eq!(agent.status.subscriptions_active(), 3);
    shutdown.cancel();
    timeout(WAIT, agent.task).await.unwrap().unwrap().unwrap();
}
