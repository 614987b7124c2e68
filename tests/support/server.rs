//! A scripted AMI server on `127.0.0.1:0`, in the spirit of h2's mock peer.
//!
//! ```ignore
//! let server = AmiServer::start(ServerOptions::default().on("Getvar", |a| {
//!     Reply::success(&[("Value", a.get("Variable").unwrap_or(""))])
//! }))
//! .await;
//! let client = TestClient::spawn(server.client_config()).await;
//! server.wait_logins(1).await;
//! server.send_frame(&[("Event", "Newchannel"), ("Channel", "SIP/2000-01")]);
//! server.send_bytes_then_cut(trace, 1234); // cut mid-frame
//! assert_eq!(server.actions_named("CoreShowChannels").len(), 2);
//! ```
//!
//! Per connection: the banner is written at once; `Challenge` (MD5) and
//! `Login` (MD5 key or plaintext `Secret`) are answered like Asterisk does,
//! a wrong login gets `Response: Error` / `Message: Authentication failed`
//! and the connection is closed; after a good login the server writes
//! `Event: FullyBooted` (unless disabled) and answers each action with its
//! handler's [`Reply`], adding the action's `ActionID` to every frame that
//! does not carry one. Writes to a connection are ordered; a cut writes
//! everything queued before it, then closes the socket's write side (FIN),
//! so the client receives exactly the bytes sent before the cut.
//!
//! Test-only simplifications: writer queues are unbounded and handlers run
//! on the connection's reader task.

use bytes::Bytes;
use callbridge::ami::codec::{AmiCodec, AmiMessage};
use callbridge::ami::Frame;
use callbridge::config::AmiConfig;
use futures::StreamExt;
use md5::{Digest, Md5};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

/// A frame to write: ordered `(key, value)` pairs.
pub type Headers = Vec<(String, String)>;

/// Builds [`Headers`] from string pairs.
pub fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Serialises headers as an AMI frame (CRLF, closing empty line).
pub fn encode(h: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in h {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// What the server does with one action.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Write these frames now, in order (each gets the action's `ActionID`).
    Frames(Vec<Headers>),
    /// Write these frames after a delay (replies can overtake each other).
    Delayed(Duration, Vec<Headers>),
    /// Never answer.
    Silence,
}

impl Reply {
    /// `Response: Success` plus `extra` headers.
    pub fn success(extra: &[(&str, &str)]) -> Reply {
        let mut h = headers(&[("Response", "Success")]);
        h.extend(headers(extra));
        Reply::Frames(vec![h])
    }

    /// `Response: Error` with `Message`.
    pub fn error(message: &str) -> Reply {
        Reply::Frames(vec![headers(&[("Response", "Error"), ("Message", message)])])
    }

    /// A list reply as Asterisk 20 writes it: `Response: Success` with
    /// `EventList: start`, the items, then `Event: <complete_event>` with
    /// `EventList: Complete` and `ListItems`.
    pub fn list(items: Vec<Headers>, complete_event: &str) -> Reply {
        let mut frames =
            vec![headers(&[("Response", "Success"), ("EventList", "start"), ("Message", "Events will follow")])];
        let n = items.len().to_string();
        frames.extend(items);
        frames.push(headers(&[("Event", complete_event), ("EventList", "Complete"), ("ListItems", &n)]));
        Reply::Frames(frames)
    }

    /// The same reply, written after `delay`.
    pub fn after(self, delay: Duration) -> Reply {
        match self {
            Reply::Frames(f) | Reply::Delayed(_, f) => Reply::Delayed(delay, f),
            Reply::Silence => Reply::Silence,
        }
    }
}

/// An action handler: gets the action as received, returns the reply.
pub type Handler = Arc<dyn Fn(&Frame) -> Reply + Send + Sync>;

/// How the server behaves.
#[derive(Clone)]
pub struct ServerOptions {
    pub username: String,
    pub secret: String,
    /// First line written on every connection.
    pub banner: String,
    /// Write `Event: FullyBooted` after a good login, like Asterisk.
    pub fully_booted: bool,
    /// Serve TLS with `tests/support/tls/server.pem` (CA: `ca.pem`).
    pub tls: bool,
    /// Handlers by lower-cased action name; see [`ServerOptions::on`].
    handlers: HashMap<String, Handler>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            username: "callbridge".into(),
            secret: "s3cret-lab".into(),
            banner: "Asterisk Call Manager/9.0.0".into(),
            fully_booted: true,
            tls: false,
            handlers: HashMap::new(),
        }
    }
}

impl ServerOptions {
    /// Answers actions named `name` (case-insensitive) with `handler`.
    pub fn on(mut self, name: &str, handler: impl Fn(&Frame) -> Reply + Send + Sync + 'static) -> Self {
        self.handlers.insert(name.to_ascii_lowercase(), Arc::new(handler));
        self
    }

    /// Do not write `Event: FullyBooted` after login (to stream a trace
    /// that has its own).
    pub fn without_fully_booted(mut self) -> Self {
        self.fully_booted = false;
        self
    }

    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }
}

/// The reply of actions without a handler.
fn default_reply(action: &Frame) -> Reply {
    let name = action.get("Action").unwrap_or("").to_ascii_lowercase();
    match name.as_str() {
        "ping" => Reply::success(&[("Ping", "Pong"), ("Timestamp", "1795471080.000000")]),
        "coreshowchannels" => Reply::list(Vec::new(), "CoreShowChannelsComplete"),
        "queuestatus" => Reply::list(Vec::new(), "QueueStatusComplete"),
        "status" => Reply::list(Vec::new(), "StatusComplete"),
        "logoff" => Reply::Frames(vec![headers(&[("Response", "Goodbye"), ("Message", "Thanks for all the fish.")])]),
        _ => Reply::error("Invalid/unknown command"),
    }
}

/// One action the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// 1 for the first accepted connection, 2 for the next, …
    pub conn: usize,
    pub frame: Frame,
}

impl Recorded {
    pub fn name(&self) -> &str {
        self.frame.get("Action").unwrap_or("")
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.frame.get(key)
    }
    /// All headers as owned pairs (for exact comparisons).
    pub fn headers(&self) -> Vec<(String, String)> {
        self.frame.headers().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

enum Out {
    Bytes(Bytes),
    /// Write everything before, then close the write side and stop serving.
    Cut,
}

struct ConnCtl {
    id: usize,
    out: mpsc::UnboundedSender<Out>,
}

struct Inner {
    options: ServerOptions,
    tls: Option<tokio_rustls::TlsAcceptor>,
    actions: Mutex<Vec<Recorded>>,
    conns: Mutex<Vec<ConnCtl>>,
    accepted: AtomicUsize,
    logins: AtomicUsize,
    failed_logins: AtomicUsize,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread poisons nothing we cannot read.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The scripted server. Stops when dropped.
pub struct AmiServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl Drop for AmiServer {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        self.accept.abort();
    }
}

/// Path of a file in `tests/support/tls/`.
pub fn tls_file(name: &str) -> String {
    format!("{}/tests/support/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A TLS acceptor with `server.pem` (CN and SAN localhost, 127.0.0.1), signed by `ca.pem`.
pub fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(tls_file("server.pem"))
        .expect("server.pem")
        .collect::<Result<_, _>>()
        .expect("valid PEM");
    let key = PrivateKeyDer::from_pem_file(tls_file("server.key")).expect("server.key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key match");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

impl AmiServer {
    /// Starts listening on `127.0.0.1:0`.
    pub async fn start(options: ServerOptions) -> AmiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let tls = options.tls.then(tls_acceptor);
        let inner = Arc::new(Inner {
            options,
            tls,
            actions: Mutex::new(Vec::new()),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
            logins: AtomicUsize::new(0),
            failed_logins: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        AmiServer { addr, inner, accept }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client configuration for this server with test-friendly timers:
    /// 2 s connect/action timeouts, pings after 30 s of silence, reconnects
    /// capped at 200 ms. Adjust fields as needed.
    pub fn client_config(&self) -> AmiConfig {
        let o = &self.inner.options;
        let tls = if o.tls {
            format!("tls = true\ntls_server_name = \"localhost\"\ntls_ca_file = {:?}\n", tls_file("ca.pem"))
        } else {
            String::new()
        };
        let text = format!(
            "address = \"{}\"\nusername = {:?}\nsecret = {:?}\n{tls}\
             connect_timeout_seconds = 2.0\naction_timeout_seconds = 2.0\n\
             ping_interval_seconds = 30.0\nreconnect_max_seconds = 0.2\n\
             event_queue_capacity = 1024\n",
            self.addr, o.username, o.secret
        );
        toml::from_str(&text).expect("valid test AMI config")
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Successful logins so far.
    pub fn logins(&self) -> usize {
        self.inner.logins.load(Ordering::SeqCst)
    }

    /// Rejected logins so far.
    pub fn failed_logins(&self) -> usize {
        self.inner.failed_logins.load(Ordering::SeqCst)
    }

    /// Every action received, in arrival order, across connections.
    pub fn actions(&self) -> Vec<Recorded> {
        lock(&self.inner.actions).clone()
    }

    /// Actions with this name (case-insensitive).
    pub fn actions_named(&self, name: &str) -> Vec<Recorded> {
        self.actions().into_iter().filter(|a| a.name().eq_ignore_ascii_case(name)).collect()
    }

    pub async fn wait_accepted(&self, n: usize) {
        super::wait_until(&format!("{n} accepted connections"), || self.accepted() >= n).await;
    }

    pub async fn wait_logins(&self, n: usize) {
        super::wait_until(&format!("{n} logins"), || self.logins() >= n).await;
    }

    /// Waits until `n` actions named `name` arrived; returns them.
    pub async fn wait_actions(&self, name: &str, n: usize) -> Vec<Recorded> {
        super::wait_until(&format!("{n} {name} actions"), || self.actions_named(name).len() >= n).await;
        self.actions_named(name)
    }

    fn current(&self) -> mpsc::UnboundedSender<Out> {
        let conns = lock(&self.inner.conns);
        conns.last().map(|c| c.out.clone()).expect("no client connection yet")
    }

    /// Number of the latest connection (1-based).
    pub fn current_conn(&self) -> usize {
        lock(&self.inner.conns).last().map_or(0, |c| c.id)
    }

    /// Writes raw bytes to the latest connection.
    pub fn send_bytes(&self, bytes: &[u8]) {
        let _ = self.current().send(Out::Bytes(Bytes::copy_from_slice(bytes)));
    }

    /// Writes raw bytes to every connection (several clients following
    /// one PBX, as a hot-standby pair does); a closed one is skipped.
    pub fn broadcast_bytes(&self, bytes: &[u8]) {
        (self.broadcast_handle())(bytes)
    }

    /// [`AmiServer::broadcast_bytes`] for another task.
    pub fn broadcast_handle(&self) -> impl Fn(&[u8]) + Send + Sync + 'static {
        let inner = self.inner.clone();
        move |bytes| {
            let bytes = Bytes::copy_from_slice(bytes);
            for c in lock(&inner.conns).iter() {
                let _ = c.out.send(Out::Bytes(bytes.clone()));
            }
        }
    }

    /// Writes one frame to the latest connection.
    pub fn send_frame(&self, pairs: &[(&str, &str)]) {
        self.send_bytes(&encode(&headers(pairs)));
    }

    /// Writes the events of a fixture trace (its own banner and login reply
    /// stripped) to the latest connection.
    pub fn send_trace(&self, trace: &[u8]) {
        self.send_bytes(super::trace::events_part(trace));
    }

    /// Closes the latest connection after everything already queued.
    pub fn cut(&self) {
        let _ = self.current().send(Out::Cut);
    }

    /// Writes `bytes[..offset]` and closes the connection: a cut at any
    /// byte offset, inside a frame or between frames.
    pub fn send_bytes_then_cut(&self, bytes: &[u8], offset: usize) {
        self.send_bytes(&bytes[..offset]);
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let accepted = tokio::select! {
            _ = inner.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let id = inner.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        let inner = inner.clone();
        tokio::spawn(async move {
            match inner.tls.clone() {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_conn(id, tls, inner).await;
                    }
                }
                None => serve_conn(id, tcp, inner).await,
            }
        });
    }
}

async fn serve_conn<S>(id: usize, io: S, inner: Arc<Inner>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, mut write) = tokio::io::split(io);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Out>();
    lock(&inner.conns).push(ConnCtl { id, out: out_tx.clone() });
    let cut = CancellationToken::new();
    let writer_cut = cut.clone();
    let stop = inner.stop.clone();
    let writer = tokio::spawn(async move {
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => None,
                i = out_rx.recv() => i,
            };
            match item {
                Some(Out::Bytes(b)) => {
                    if write.write_all(&b).await.is_err() || write.flush().await.is_err() {
                        break;
                    }
                }
                Some(Out::Cut) | None => break,
            }
        }
        let _ = write.shutdown().await;
        writer_cut.cancel();
    });
    let _ = out_tx.send(Out::Bytes(Bytes::from(format!("{}\r\n", inner.options.banner))));

    let mut reader = FramedRead::new(read, AmiCodec::default());
    let mut challenge: Option<String> = None;
    let mut logged_in = false;
    loop {
        let msg = tokio::select! {
            _ = cut.cancelled() => break,
            _ = inner.stop.cancelled() => break,
            m = reader.next() => m,
        };
        let frame = match msg {
            Some(Ok(AmiMessage::Frame(f))) => f,
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break,
        };
        lock(&inner.actions).push(Recorded { conn: id, frame: frame.clone() });
        let action_id = frame.get("ActionID").map(str::to_string);
        let name = frame.get("Action").unwrap_or("").to_ascii_lowercase();
        let o = &inner.options;
        let reply = match name.as_str() {
            "challenge" => {
                if frame.get("AuthType").is_some_and(|t| t.eq_ignore_ascii_case("md5")) {
                    let c = format!("{}", 100_000_000 + id * 7919);
                    challenge = Some(c.clone());
                    Reply::success(&[("Challenge", &c)])
                } else {
                    Reply::error("Must specify AuthType")
                }
            }
            "login" => {
                let user_ok = frame.get("Username") == Some(o.username.as_str());
                let secret_ok = match (frame.get("AuthType"), frame.get("Key"), frame.get("Secret")) {
                    (Some(t), Some(key), _) if t.eq_ignore_ascii_case("md5") => challenge.as_ref().is_some_and(|c| {
                        let want: String = Md5::new()
                            .chain_update(c.as_bytes())
                            .chain_update(o.secret.as_bytes())
                            .finalize()
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        key == want
                    }),
                    (None, None, Some(secret)) => secret == o.secret,
                    _ => false,
                };
                if user_ok && secret_ok {
                    logged_in = true;
                    inner.logins.fetch_add(1, Ordering::SeqCst);
                    let mut frames = vec![headers(&[("Response", "Success"), ("Message", "Authentication accepted")])];
                    add_action_id(&mut frames, action_id.as_deref());
                    if o.fully_booted {
                        frames.push(headers(&[
                            ("Event", "FullyBooted"),
                            ("Privilege", "system,all"),
                            ("Uptime", "183"),
                            ("LastReload", "183"),
                            ("Status", "Fully Booted"),
                        ]));
                    }
                    for f in frames {
                        let _ = out_tx.send(Out::Bytes(Bytes::from(encode(&f))));
                    }
                    continue;
                }
                inner.failed_logins.fetch_add(1, Ordering::SeqCst);
                write_reply(&out_tx, Reply::error("Authentication failed"), action_id.as_deref());
                // Asterisk ends the session after a failed login.
                let _ = out_tx.send(Out::Cut);
                continue;
            }
            _ if !logged_in => Reply::error("Authentication Required"),
            "logoff" => {
                write_reply(&out_tx, default_reply(&frame), action_id.as_deref());
                let _ = out_tx.send(Out::Cut);
                continue;
            }
            _ => match o.handlers.get(&name) {
                Some(h) => h(&frame),
                None => default_reply(&frame),
            },
        };
        write_reply(&out_tx, reply, action_id.as_deref());
    }
    // Write everything queued, close the write side (FIN), then read until
    // the client closes too: closing with unread input would send a reset
    // instead, which may discard bytes the client has not read yet.
    let _ = out_tx.send(Out::Cut);
    let _ = writer.await;
    let drain = async { while let Some(Ok(_)) = reader.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
}

fn add_action_id(frames: &mut [Headers], action_id: Option<&str>) {
    let Some(id) = action_id else { return };
    for f in frames.iter_mut() {
        if !f.iter().any(|(k, _)| k.eq_ignore_ascii_case("ActionID")) {
            // Asterisk writes ActionID right after Response/Event.
            let at = 1.min(f.len());
            f.insert(at, ("ActionID".to_string(), id.to_string()));
        }
    }
}

fn write_reply(out: &mpsc::UnboundedSender<Out>, reply: Reply, action_id: Option<&str>) {
    match reply {
        Reply::Silence => {}
        Reply::Frames(mut frames) => {
            add_action_id(&mut frames, action_id);
            let bytes: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
            let _ = out.send(Out::Bytes(Bytes::from(bytes)));
        }
        Reply::Delayed(delay, mut frames) => {
            add_action_id(&mut frames, action_id);
            let bytes: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
            let out = out.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = out.send(Out::Bytes(Bytes::from(bytes)));
            });
        }
    }
}
