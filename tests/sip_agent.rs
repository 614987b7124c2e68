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
use std::net::SocketAddr;
use std::sync::Arc;
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

/// The scripted PBX: answers OPTIONS on its own, returns other requests.
struct Pbx<W: Wire> {
    wire: W,
    addr: SocketAddr,
    options_seen: usize,
    notify_cseq: u32,
}

impl<W: Wire> Pbx<W> {
    async fn request(&mut self, method: &str) -> Msg {
        loop {
            let m = self.wire.recv().await;
            if m.method() == "OPTIONS" {
                self.options_seen += 1;
                let r = m.response("200 OK", Some("pbx-opt"), &[]);
                self.wire.send(m.from, r.as_bytes()).await;
                continue;
            }
            assert_eq!(m.method(), method, "expected {method}, got {m:?}");
            return m;
        }
    }

    async fn response(&mut self) -> Msg {
        loop {
            let m = self.wire.recv().await;
            if m.method() == "OPTIONS" {
                let r = m.response("200 OK", Some("pbx-opt"), &[]);
                self.wire.send(m.from, r.as_bytes()).await;
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
    let ami = if ami { "[pbx.ami]\naddress = \"127.0.0.1:5038\"\nusername = \"u\"\nsecret = \"s\"\n" } else { "" };
    let text = format!(
        "[pbx]\nname = \"lab\"\n{ami}\n[[agents]]\nid = \"maria\"\nextension = \"2000\"\n\n\
         [sip]\nbind = \"127.0.0.1:0\"\npbx = \"{pbx}\"\ntransport = \"{transport}\"\nusername = \"callbridge\"\n\
         secret = \"sub-s3cret\"\noptions_interval_seconds = 1\n\
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
    let pbx = Pbx { wire: UdpPeer(socket), addr, options_seen: 0, notify_cseq: 100 };
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
    let (mut pbx, agent, mut rx, shutdown) = udp_pbx_and_agent(true, 2.0).await;
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
    pbx.reply(&refresh, "481 Call/Transaction Does Not Exist", &[]).await;
    let fresh = pbx.accept_subscription("n-2", 600).await;
    assert_ne!(fresh.h("Call-ID"), sub.h("Call-ID"));
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
    let mut pbx =
        Pbx { wire: TcpPeer { stream, buf: Vec::new(), addr: peer_addr }, addr, options_seen: 0, notify_cseq: 1 };
    let sub = pbx.accept_subscription("t-1", 600).await;
    assert!(sub.h("Via").starts_with("SIP/2.0/TCP "), "{}", sub.h("Via"));
    assert!(sub.h("Contact").contains(";transport=tcp"));
    pbx.notify(&sub, "active", &doc(0, EARLY)).await;
    assert_eq!(types(&next_events(&mut rx, 3).await), ["agent.line", "call.started", "call.offered"]);
    // The PBX drops the connection: callbridge reconnects and subscribes anew.
    drop(pbx);
    let (stream, peer_addr) = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    let mut pbx =
        Pbx { wire: TcpPeer { stream, buf: Vec::new(), addr: peer_addr }, addr, options_seen: 0, notify_cseq: 1 };
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
