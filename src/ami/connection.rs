//! The live AMI client: one task that owns the connection to the PBX, logs
//! in, keeps it alive, reconnects, and splits what it reads into replies to
//! our actions and the event stream for the pipeline.
//!
//! # Shape
//!
//! [`spawn`] starts the task and returns an [`AmiHandle`] (cheap to clone) and
//! the task's `JoinHandle`. The task loops: connect (TCP, or TLS with rustls)
//! → read the banner → log in (MD5 challenge by default) → send
//! [`SourceItem::Connected`] → run `CoreShowChannels` and `QueueStatus` and send
//! [`SourceItem::Resync`] → serve until the connection is lost → send
//! [`SourceItem::Disconnected`] → wait a capped, jittered backoff → again.
//!
//! Inside a connection a single `select!` loop, biased in this order:
//! shutdown, new actions from handles, bytes from the PBX, timers. Actions come
//! before reading so that a flood of events cannot starve the control plane;
//! reading comes before timers so that a reply already in the socket is always
//! seen before its deadline is judged.
//!
//! # Routing
//!
//! Every action gets a fresh `ActionID` (`cb-<n>`, unique for the life of the
//! process). A frame carrying the `ActionID` of a pending action is its reply
//! or one of its list items and goes back to the caller; everything else is an
//! unsolicited event and goes to the events channel in stream order. Late list
//! items of an action that timed out are swallowed (a short tombstone list);
//! late replies are dropped. A frame with an `Event:` header whose action is
//! no longer pending (an `OriginateResponse` after `Originate`'s reply) is an
//! event like any other.
//!
//! # Guarantees
//!
//! - **No event is dropped by the client.** The events channel is bounded;
//!   when it is full the reader waits (backpressure up to the PBX's socket).
//!   The keepalive counts only time spent listening: after a wait, a `Ping`
//!   whose reply is still queued behind unread events gets a full
//!   `action_timeout_seconds` from the last frame read, so a slow pipeline
//!   is never mistaken for a dead PBX.
//! - Actions fail fast with [`ActionError::NotConnected`] while logged out;
//!   they are never queued for a later connection (a click-to-call placed
//!   30 s late is worse than an error).
//! - A frame cut by a connection loss is discarded, never delivered truncated;
//!   frames fully received before the loss were delivered exactly once.
//! - Bad credentials end the task with [`AmiError::AuthenticationFailed`]
//!   after exactly one attempt; every other failure reconnects.
//!
//! This module must never parse AMI bytes itself (that is the codec's job),
//! never interpret events (that is the normalizer's), never log a secret and
//! never drop an event because a consumer is slow.

use super::action::{Action, InvalidAction};
use super::backoff::{Backoff, InvalidBackoff};
use super::codec::{AmiCodec, AmiMessage, CodecLimits, Malformed};
use super::frame::Frame;
use super::transport::{CountingIo, Transport, TransportError};
use crate::config::{AmiAuth, AmiConfig};
use bytes::BytesMut;
use futures::FutureExt;
use futures::{SinkExt, StreamExt};
use md5::{Digest, Md5};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::codec::{Decoder, Encoder, Framed};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What the client sends into the pipeline, in stream order.
// `Frame` is the hot variant and keeps its header index inline; boxing it
// would cost an allocation per event to save room in the rare variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceItem {
    /// Logged in to the PBX. `banner` is the version after
    /// `Asterisk Call Manager/`. Followed, on the same connection, by the
    /// PBX's events and, once both lists are in, one [`SourceItem::Resync`]
    /// (none if the PBX refused `CoreShowChannels`: logged).
    Connected { banner: String },
    /// An unsolicited event (not a reply to, or list item of, our actions).
    Frame(Frame),
    /// The PBX's view after a (re)connection, for the registry to end calls
    /// that vanished and adopt unknown ones.
    Resync(Resync),
    /// The connection was lost after `Connected`; a reconnect follows.
    Disconnected { reason: String },
}

/// What the PBX reported right after a (re)connection.
///
/// The snapshot was taken at some moment between [`SourceItem::Connected`]
/// and this item, while events kept flowing: a call that had any event after
/// `Connected` is known to exist (or to have ended) from those events and must
/// not be ended for missing from `channels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    /// `CoreShowChannel` items, one per live channel.
    pub channels: Vec<Frame>,
    /// `QueueParams`, `QueueMember` and `QueueEntry` items. Empty when the
    /// PBX refused `QueueStatus` (no `app_queue`, no permission): logged.
    pub queue_items: Vec<Frame>,
}

/// The reply to a list action (`CoreShowChannels`, `QueueStatus`, `Status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResponse {
    /// The `Response: Success` frame that opened the list.
    pub response: Frame,
    /// The items, in order, without the closing `…Complete` event.
    pub items: Vec<Frame>,
}

/// Whether the client is logged in; for readiness probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting, logging in, or waiting to reconnect.
    Disconnected,
    /// Logged in: actions can be sent.
    Connected,
    /// The task has ended (shutdown or a fatal error).
    Stopped,
}

/// Failures of the connection task. Only [`AmiError::is_fatal`] ones end it.
#[derive(Debug, thiserror::Error)]
pub enum AmiError {
    #[error("invalid AMI setting {field}: {reason}")]
    InvalidSetting { field: &'static str, reason: String },
    #[error("invalid AMI reconnect backoff")]
    InvalidBackoff(#[source] InvalidBackoff),
    #[error("cannot resolve the AMI secret: {0}")]
    Secret(String),
    #[error("AMI authentication failed for user {username:?} (PBX said {message:?}); not retrying")]
    AuthenticationFailed { username: String, message: String },
    #[error("connecting to {address} timed out after {timeout:?}")]
    ConnectTimeout { address: String, timeout: Duration },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("I/O error on the AMI connection")]
    Io(#[source] io::Error),
    #[error("the PBX closed the AMI connection")]
    Closed,
    #[error("AMI protocol error: {0}")]
    Protocol(String),
    #[error("the PBX rejected {action}: {message}")]
    LoginRejected { action: &'static str, message: String },
    #[error("{action} got no reply within {timeout:?}")]
    LoginTimeout { action: &'static str, timeout: Duration },
    #[error("keepalive Ping got no reply within {0:?}")]
    PingTimeout(Duration),
    #[error("writing to the PBX timed out after {0:?}")]
    WriteTimeout(Duration),
    #[error("the events channel was closed by its consumer")]
    EventsClosed,
}

impl AmiError {
    /// Errors that reconnecting cannot fix: the task ends with them.
    pub fn is_fatal(&self) -> bool {
        if let AmiError::Transport(t) = self {
            return t.is_fatal();
        }
        matches!(
            self,
            AmiError::InvalidSetting { .. }
                | AmiError::InvalidBackoff(_)
                | AmiError::Secret(_)
                | AmiError::AuthenticationFailed { .. }
                | AmiError::EventsClosed
        )
    }
}

/// Why an action got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Invalid(#[from] InvalidAction),
    #[error("not connected to the PBX")]
    NotConnected,
    #[error("the AMI connection was lost before {action} was answered")]
    ConnectionLost { action: String },
    #[error("{action} got no reply within {timeout:?}")]
    Timeout { action: String, timeout: Duration },
    #[error("the PBX rejected {action}: {message}")]
    Rejected {
        action: String,
        message: String,
        /// The PBX's error reply (boxed: frames are large and errors rare).
        response: Box<Frame>,
    },
    #[error("too many AMI actions in flight (limit {0})")]
    Busy(usize),
    #[error("{action} returned more than {limit} list items")]
    ListTooLong { action: String, limit: usize },
    #[error("the AMI client has stopped")]
    Stopped,
}

/// How the rest of callbridge talks to the PBX. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AmiHandle {
    /// Full = the caller waits (the connection writes actions faster than
    /// any caller produces them; the bound only stops a runaway caller).
    requests: mpsc::Sender<Request>,
    state: watch::Receiver<ConnectionState>,
}

impl AmiHandle {
    /// Sends `action` and waits for its reply (`action_timeout_seconds`).
    /// A `Response: Error` reply is [`ActionError::Rejected`]. Use
    /// [`AmiHandle::send_list`] for actions that answer with a list.
    pub async fn send(&self, action: Action) -> Result<Frame, ActionError> {
        let (tx, rx) = oneshot::channel();
        self.submit(action, Reply::Single(tx)).await?;
        rx.await.map_err(|_| ActionError::Stopped)?
    }

    /// Sends a list action and collects the events carrying its `ActionID`
    /// until `EventList: Complete`. The deadline restarts with every item,
    /// so long lists are fine as long as they keep coming.
    pub async fn send_list(&self, action: Action) -> Result<ListResponse, ActionError> {
        let (tx, rx) = oneshot::channel();
        self.submit(action, Reply::List(tx)).await?;
        rx.await.map_err(|_| ActionError::Stopped)?
    }

    async fn submit(&self, action: Action, reply: Reply) -> Result<(), ActionError> {
        action.validate()?;
        match *self.state.borrow() {
            ConnectionState::Connected => {}
            ConnectionState::Disconnected => return Err(ActionError::NotConnected),
            ConnectionState::Stopped => return Err(ActionError::Stopped),
        }
        self.requests.send(Request { action, reply }).await.map_err(|_| ActionError::Stopped)
    }

    /// True while logged in to the PBX.
    pub fn is_connected(&self) -> bool {
        *self.state.borrow() == ConnectionState::Connected
    }

    /// The connection state, to watch for changes (readiness).
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Waits until logged in; `Err(Stopped)` if the task ended first.
    pub async fn wait_connected(&self) -> Result<(), ActionError> {
        let mut state = self.state.clone();
        let seen = state.wait_for(|s| *s != ConnectionState::Disconnected).await.map_err(|_| ActionError::Stopped)?;
        match *seen {
            ConnectionState::Connected => Ok(()),
            _ => Err(ActionError::Stopped),
        }
    }
}

#[derive(Debug)]
struct Request {
    action: Action,
    reply: Reply,
}

#[derive(Debug)]
enum Reply {
    Single(oneshot::Sender<Result<Frame, ActionError>>),
    List(oneshot::Sender<Result<ListResponse, ActionError>>),
}

impl Reply {
    fn fail(self, e: ActionError) {
        // The caller may have given up (dropped its future): nothing to do.
        match self {
            Reply::Single(tx) => drop(tx.send(Err(e))),
            Reply::List(tx) => drop(tx.send(Err(e))),
        }
    }
}

/// Capacity of the handle → connection queue.
const REQUEST_QUEUE: usize = 64;
/// Most actions awaiting a reply at once; more get [`ActionError::Busy`].
const MAX_IN_FLIGHT: usize = 1024;
/// Most items one list may carry (a PBX with 100,000 calls has ~200,000
/// channels); beyond it the list fails instead of growing memory.
const MAX_LIST_ITEMS: usize = 1_000_000;
/// Timed-out lists whose late items are still swallowed.
const MAX_DRAINING: usize = 64;
/// First reconnect delay ceiling (capped by `reconnect_max_seconds`).
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// A connection that stayed logged in this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// How often a repeated malformed-frame warning may be logged.
const MALFORMED_WARN_EVERY: Duration = Duration::from_secs(10);
/// Initial read buffer; it grows up to `max_frame_bytes` + one read.
/// Frames handled in one go before the connection task looks at its
/// actions, timers and shutdown again.
const BURST: usize = 64;
const READ_BUFFER: usize = 64 * 1024;

/// Starts the AMI client. `events` should be created with
/// `config.event_queue_capacity`; a full channel makes the reader wait.
/// The task ends with `Ok(())` when `shutdown` is cancelled, or with a fatal
/// [`AmiError`] (invalid settings, bad credentials, closed events channel).
pub fn spawn(
    config: AmiConfig,
    events: mpsc::Sender<SourceItem>,
    shutdown: CancellationToken,
) -> (AmiHandle, JoinHandle<Result<(), AmiError>>) {
    let (req_tx, req_rx) = mpsc::channel(REQUEST_QUEUE);
    let (state_tx, state_rx) = watch::channel(ConnectionState::Disconnected);
    let handle = AmiHandle { requests: req_tx, state: state_rx };
    let task = tokio::spawn(run(config, events, req_rx, state_tx, shutdown));
    (handle, task)
}

/// Checks an AMI configuration without connecting (for `check-config`).
pub fn check_config(config: &AmiConfig) -> Result<(), AmiError> {
    Settings::from_config(config)?;
    transport_of(config)?;
    config.secret.resolve().map_err(AmiError::Secret)?;
    Ok(())
}

fn transport_of(c: &AmiConfig) -> Result<Transport, TransportError> {
    Transport::new(&c.address, c.tls, c.tls_server_name.as_deref(), c.tls_ca_file.as_deref().map(Path::new))
}

async fn run(
    config: AmiConfig,
    events: mpsc::Sender<SourceItem>,
    mut requests: mpsc::Receiver<Request>,
    state: watch::Sender<ConnectionState>,
    shutdown: CancellationToken,
) -> Result<(), AmiError> {
    let result = match Client::new(&config, events, shutdown) {
        Ok(mut client) => client.supervise(&mut requests, &state).await,
        Err(e) => Err(e),
    };
    state.send_replace(ConnectionState::Stopped);
    metrics::gauge!("callbridge_ami_connected").set(0.0);
    requests.close();
    while let Ok(r) = requests.try_recv() {
        r.reply.fail(ActionError::Stopped);
    }
    match &result {
        Ok(()) => info!("AMI client stopped"),
        Err(e) => warn!(error = %e, "AMI client stopped"),
    }
    result
}

/// Validated settings with durations.
#[derive(Debug, Clone)]
struct Settings {
    username: String,
    auth: AmiAuth,
    connect_timeout: Duration,
    action_timeout: Duration,
    ping_interval: Duration,
    reconnect_max: Duration,
    limits: CodecLimits,
}

impl Settings {
    fn from_config(c: &AmiConfig) -> Result<Settings, AmiError> {
        let seconds = |field: &'static str, v: f64| {
            Duration::try_from_secs_f64(v).ok().filter(|d| !d.is_zero()).ok_or_else(|| AmiError::InvalidSetting {
                field,
                reason: format!("{v} is not a positive number of seconds"),
            })
        };
        let positive = |field: &'static str, v: usize| {
            if v == 0 {
                Err(AmiError::InvalidSetting { field, reason: "must be greater than zero".into() })
            } else {
                Ok(v)
            }
        };
        if c.address.trim().is_empty() {
            return Err(AmiError::InvalidSetting { field: "address", reason: "must not be empty".into() });
        }
        positive("event_queue_capacity", c.event_queue_capacity)?;
        Ok(Settings {
            username: c.username.clone(),
            auth: c.auth,
            connect_timeout: seconds("connect_timeout_seconds", c.connect_timeout_seconds)?,
            action_timeout: seconds("action_timeout_seconds", c.action_timeout_seconds)?,
            ping_interval: seconds("ping_interval_seconds", c.ping_interval_seconds)?,
            reconnect_max: seconds("reconnect_max_seconds", c.reconnect_max_seconds)?,
            limits: CodecLimits {
                max_frame_bytes: positive("max_frame_bytes", c.max_frame_bytes)?,
                max_headers: positive("max_headers", c.max_headers)?,
            },
        })
    }
}

/// The codec as a live connection needs it: bytes left at end of stream are
/// a frame cut by the connection loss and are dropped, where a trace file
/// (`AmiCodec::decode_eof`) would close them into a frame.
struct LiveCodec(AmiCodec);

impl Decoder for LiveCodec {
    type Item = AmiMessage;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<AmiMessage>, io::Error> {
        self.0.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<AmiMessage>, io::Error> {
        if let Some(m) = self.0.decode(src)? {
            return Ok(Some(m));
        }
        if src.iter().any(|&c| c != b'\r' && c != b'\n') {
            debug!(bytes = src.len(), "AMI connection ended inside a frame; partial frame dropped");
        }
        src.clear();
        Ok(None)
    }
}

impl Encoder<Action> for LiveCodec {
    type Error = super::action::EncodeError;

    fn encode(&mut self, item: Action, dst: &mut BytesMut) -> Result<(), Self::Error> {
        self.0.encode(item, dst)
    }
}

type Conn = Framed<CountingIo, LiveCodec>;

/// The metric label of an action name: only names from this fixed set (plus
/// `other`) ever become label values.
fn action_label(name: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "Atxfer",
        "BlindTransfer",
        "Challenge",
        "Command",
        "CoreShowChannels",
        "CoreStatus",
        "Getvar",
        "Hangup",
        "Login",
        "Logoff",
        "Originate",
        "Ping",
        "QueueAdd",
        "QueuePause",
        "QueueRemove",
        "QueueStatus",
        "QueueSummary",
        "Redirect",
        "Setvar",
        "Status",
    ];
    KNOWN.iter().find(|k| k.eq_ignore_ascii_case(name)).copied().unwrap_or("other")
}

fn record_duration(label: &'static str, started: Instant) {
    metrics::histogram!("callbridge_ami_action_duration_seconds", "action" => label)
        .record(started.elapsed().as_secs_f64());
}

fn is_error(f: &Frame) -> bool {
    f.response().is_some_and(|r| r.eq_ignore_ascii_case("Error"))
}

fn message_of(f: &Frame) -> String {
    f.get("Message").unwrap_or("").to_string()
}

fn md5_key(challenge: &str, secret: &str) -> String {
    let digest = Md5::new().chain_update(challenge.as_bytes()).chain_update(secret.as_bytes()).finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Logs malformed frames at `warn` at most every [`MALFORMED_WARN_EVERY`]
/// (a hostile or broken peer could send millions), at `debug` otherwise.
#[derive(Default)]
struct MalformedLog {
    next_warn: Option<Instant>,
    suppressed: u64,
}

impl MalformedLog {
    fn record(&mut self, m: Malformed) {
        metrics::counter!("callbridge_ami_malformed_frames_total", "reason" => m.reason.as_str()).increment(1);
        let now = Instant::now();
        if self.next_warn.is_none_or(|t| now >= t) {
            warn!(
                reason = m.reason.as_str(),
                bytes = m.bytes,
                suppressed = self.suppressed,
                "skipped a malformed AMI frame"
            );
            self.suppressed = 0;
            self.next_warn = Some(now + MALFORMED_WARN_EVERY);
        } else {
            self.suppressed += 1;
            debug!(reason = m.reason.as_str(), bytes = m.bytes, "skipped a malformed AMI frame");
        }
    }
}

/// How a connection ended.
enum End {
    Shutdown,
    Failed(AmiError),
}

impl From<AmiError> for End {
    fn from(e: AmiError) -> Self {
        End::Failed(e)
    }
}

/// Across connections: settings, channels and counters.
struct Client {
    settings: Settings,
    secret: crate::secret::SecretSource,
    transport: Transport,
    events: mpsc::Sender<SourceItem>,
    shutdown: CancellationToken,
    next_id: u64,
    malformed: MalformedLog,
    frames_received: metrics::Counter,
    bytes_received: metrics::Counter,
}

/// Per connection: the socket and what is awaiting a reply.
struct Session {
    conn: Conn,
    pending: HashMap<String, Pending>,
    /// Lists that timed out or overflowed: their late items are swallowed
    /// until their `EventList: Complete`. Bounded by [`MAX_DRAINING`].
    draining: VecDeque<String>,
    last_rx: Instant,
    /// `ActionID` of the outstanding keepalive `Ping`.
    ping: Option<String>,
    resync: ResyncState,
    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
}

struct Pending {
    name: String,
    label: &'static str,
    started: Instant,
    deadline: Instant,
    waiter: Waiter,
}

enum Waiter {
    Single(oneshot::Sender<Result<Frame, ActionError>>),
    List {
        to: ListTo,
        /// Boxed: most waiters are single actions and pings.
        response: Option<Box<Frame>>,
        items: Vec<Frame>,
    },
    Keepalive,
}

enum ListTo {
    Caller(oneshot::Sender<Result<ListResponse, ActionError>>),
    Resync(ResyncPart),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResyncPart {
    Channels,
    Queues,
}

#[derive(Default)]
struct ResyncState {
    /// False once the channel list failed: no `Resync` for this connection.
    active: bool,
    channels: Option<Vec<Frame>>,
    queues: Option<Vec<Frame>>,
}

impl Client {
    fn new(
        config: &AmiConfig,
        events: mpsc::Sender<SourceItem>,
        shutdown: CancellationToken,
    ) -> Result<Client, AmiError> {
        Ok(Client {
            settings: Settings::from_config(config)?,
            secret: config.secret.clone(),
            transport: transport_of(config)?,
            events,
            shutdown,
            next_id: 0,
            malformed: MalformedLog::default(),
            frames_received: metrics::counter!("callbridge_ami_frames_received_total"),
            bytes_received: metrics::counter!("callbridge_ami_bytes_received_total"),
        })
    }

    fn next_action_id(&mut self) -> String {
        self.next_id += 1;
        format!("cb-{}", self.next_id)
    }

    async fn supervise(
        &mut self,
        requests: &mut mpsc::Receiver<Request>,
        state: &watch::Sender<ConnectionState>,
    ) -> Result<(), AmiError> {
        let initial = INITIAL_BACKOFF.min(self.settings.reconnect_max);
        let mut backoff = Backoff::try_new(initial, self.settings.reconnect_max).map_err(AmiError::InvalidBackoff)?;
        loop {
            let shutdown = self.shutdown.clone();
            let attempt = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                r = self.establish() => r,
            };
            let failure = match attempt {
                Ok((conn, banner)) => {
                    let up_since = Instant::now();
                    info!(address = %self.transport.address(), version = %banner, "logged in to AMI");
                    state.send_replace(ConnectionState::Connected);
                    metrics::gauge!("callbridge_ami_connected").set(1.0);
                    let end = self.serve(conn, banner, requests).await;
                    state.send_replace(ConnectionState::Disconnected);
                    metrics::gauge!("callbridge_ami_connected").set(0.0);
                    let e = match end {
                        End::Shutdown => return Ok(()),
                        End::Failed(e) if e.is_fatal() => return Err(e),
                        End::Failed(e) => e,
                    };
                    warn!(error = %e, address = %self.transport.address(), "AMI connection lost; reconnecting");
                    if up_since.elapsed() >= STABLE_CONNECTION {
                        backoff.reset();
                    }
                    let item = SourceItem::Disconnected { reason: e.to_string() };
                    match self.deliver(item).await {
                        Ok(()) => {}
                        Err(End::Shutdown) => return Ok(()),
                        Err(End::Failed(e)) => return Err(e),
                    }
                    e
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    warn!(error = %e, address = %self.transport.address(), "cannot open the AMI session; retrying");
                    e
                }
            };
            let delay = backoff.next_delay(&mut rand::rng());
            debug!(delay_ms = delay.as_millis() as u64, error = %failure, "waiting before reconnecting to AMI");
            if !self.wait_disconnected(delay, requests).await {
                return Ok(());
            }
            metrics::counter!("callbridge_ami_reconnects_total").increment(1);
        }
    }

    /// Sleeps `delay` while refusing actions; false on shutdown.
    async fn wait_disconnected(&self, delay: Duration, requests: &mut mpsc::Receiver<Request>) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return false,
                Some(r) = requests.recv() => r.reply.fail(ActionError::NotConnected),
                _ = &mut sleep => return true,
            }
        }
    }

    /// Sends an item into the pipeline, waiting while the channel is full.
    async fn deliver(&self, item: SourceItem) -> Result<(), End> {
        tokio::select! {
            biased;
            r = self.events.send(item) => r.map_err(|_| End::Failed(AmiError::EventsClosed)),
            _ = self.shutdown.cancelled() => Err(End::Shutdown),
        }
    }

    /// Connects, reads the banner and logs in.
    async fn establish(&mut self) -> Result<(Conn, String), AmiError> {
        let timeout = self.settings.connect_timeout;
        let address = self.transport.address().to_string();
        let (mut conn, banner) = tokio::time::timeout(timeout, self.connect())
            .await
            .map_err(|_| AmiError::ConnectTimeout { address, timeout })??;
        self.login(&mut conn).await?;
        Ok((conn, banner))
    }

    async fn connect(&mut self) -> Result<(Conn, String), AmiError> {
        let io = self.transport.connect(self.bytes_received.clone()).await?;
        let mut conn = Framed::with_capacity(io, LiveCodec(AmiCodec::new(self.settings.limits)), READ_BUFFER);
        loop {
            match conn.next().await {
                Some(Ok(AmiMessage::Banner(b))) => return Ok((conn, b)),
                Some(Ok(AmiMessage::Malformed(m))) => self.malformed.record(m),
                Some(Ok(AmiMessage::Frame(f))) => {
                    return Err(AmiError::Protocol(format!("expected the AMI banner, got a frame {f:?}")));
                }
                Some(Err(e)) => return Err(AmiError::Io(e)),
                None => return Err(AmiError::Closed),
            }
        }
    }

    async fn login(&mut self, conn: &mut Conn) -> Result<(), AmiError> {
        let secret = self.secret.resolve().map_err(AmiError::Secret)?;
        let mut login = Action::new("Login").header("Username", self.settings.username.clone());
        match self.settings.auth {
            AmiAuth::Md5 => {
                let reply = self.call(conn, "Challenge", Action::new("Challenge").header("AuthType", "MD5")).await?;
                if is_error(&reply) {
                    return Err(AmiError::LoginRejected { action: "Challenge", message: message_of(&reply) });
                }
                let challenge = reply
                    .get("Challenge")
                    .ok_or_else(|| AmiError::Protocol("Challenge reply without a Challenge header".into()))?;
                login.push("AuthType", "MD5");
                login.push("Key", md5_key(challenge, &secret));
            }
            AmiAuth::Plain => login.push("Secret", secret),
        }
        let reply = self.call(conn, "Login", login).await?;
        if is_error(&reply) {
            return Err(AmiError::AuthenticationFailed {
                username: self.settings.username.clone(),
                message: message_of(&reply),
            });
        }
        Ok(())
    }

    /// One action during login, before events flow: write it, then read
    /// until its reply.
    async fn call(&mut self, conn: &mut Conn, label: &'static str, action: Action) -> Result<Frame, AmiError> {
        let id = self.next_action_id();
        let started = Instant::now();
        let timeout = self.settings.action_timeout;
        let exchange = async {
            conn.send(action.with_action_id(id.clone())).await.map_err(|e| match e {
                super::action::EncodeError::Io(e) => AmiError::Io(e),
                super::action::EncodeError::Invalid(e) => AmiError::Protocol(e.to_string()),
            })?;
            loop {
                match conn.next().await {
                    Some(Ok(AmiMessage::Frame(f))) if f.action_id() == Some(id.as_str()) => return Ok(f),
                    Some(Ok(AmiMessage::Frame(f))) => debug!(?f, "AMI frame before login ignored"),
                    Some(Ok(AmiMessage::Malformed(m))) => self.malformed.record(m),
                    Some(Ok(AmiMessage::Banner(_))) => {}
                    Some(Err(e)) => return Err(AmiError::Io(e)),
                    None => return Err(AmiError::Closed),
                }
            }
        };
        let reply = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AmiError::LoginTimeout { action: label, timeout })??;
        record_duration(label, started);
        Ok(reply)
    }

    /// Serves a logged-in connection until it ends.
    async fn serve(&mut self, conn: Conn, banner: String, requests: &mut mpsc::Receiver<Request>) -> End {
        let now = Instant::now();
        let mut s = Session {
            conn,
            pending: HashMap::new(),
            draining: VecDeque::new(),
            last_rx: now,
            ping: None,
            resync: ResyncState::default(),
            timer: Box::pin(tokio::time::sleep_until(now + self.settings.ping_interval)),
            timer_at: now + self.settings.ping_interval,
        };
        let end = match self.serve_inner(&mut s, banner, requests).await {
            Ok(()) => End::Shutdown,
            Err(end) => end,
        };
        for (_, p) in s.pending.drain() {
            let e = ActionError::ConnectionLost { action: p.name };
            match p.waiter {
                Waiter::Single(tx) => drop(tx.send(Err(e))),
                Waiter::List { to: ListTo::Caller(tx), .. } => drop(tx.send(Err(e))),
                Waiter::List { to: ListTo::Resync(_), .. } | Waiter::Keepalive => {}
            }
        }
        // Actions queued while the connection died will not be answered.
        while let Ok(r) = requests.try_recv() {
            r.reply.fail(ActionError::ConnectionLost { action: r.action.name().to_string() });
        }
        if matches!(end, End::Shutdown) {
            // Polite goodbye; the PBX may already be gone.
            let logoff = Action::new("Logoff").with_action_id(self.next_action_id());
            let _ = tokio::time::timeout(Duration::from_secs(1), s.conn.send(logoff)).await;
        }
        end
    }

    async fn serve_inner(
        &mut self,
        s: &mut Session,
        banner: String,
        requests: &mut mpsc::Receiver<Request>,
    ) -> Result<(), End> {
        self.deliver(SourceItem::Connected { banner }).await?;
        s.resync.active = true;
        self.start(s, Action::new("CoreShowChannels"), Waiter::list(ListTo::Resync(ResyncPart::Channels))).await?;
        self.start(s, Action::new("QueueStatus"), Waiter::list(ListTo::Resync(ResyncPart::Queues))).await?;
        let mut requests_open = true;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                r = requests.recv(), if requests_open => match r {
                    Some(Request { action, reply }) => {
                        let waiter = match reply {
                            Reply::Single(tx) => Waiter::Single(tx),
                            Reply::List(tx) => Waiter::list(ListTo::Caller(tx)),
                        };
                        self.start(s, action, waiter).await?;
                    }
                    // Every handle is gone: keep streaming events.
                    None => requests_open = false,
                },
                m = s.conn.next() => {
                    match m {
                        Some(Ok(m)) => self.on_message(s, m).await?,
                        Some(Err(e)) => return Err(AmiError::Io(e).into()),
                        None => return Err(AmiError::Closed.into()),
                    }
                    // Frames already buffered (or readable without waiting)
                    // are handled here, without a round through `select!`:
                    // at event bursts that is most of the per-frame cost.
                    // Bounded, so actions and timers wait at most this many.
                    for _ in 0..BURST {
                        match s.conn.next().now_or_never() {
                            Some(Some(Ok(m))) => self.on_message(s, m).await?,
                            Some(Some(Err(e))) => return Err(AmiError::Io(e).into()),
                            Some(None) => return Err(AmiError::Closed.into()),
                            None => break,
                        }
                    }
                }
                _ = &mut s.timer => self.on_timer(s).await?,
            }
        }
    }

    /// Writes an action and registers its waiter.
    async fn start(&mut self, s: &mut Session, action: Action, waiter: Waiter) -> Result<(), End> {
        let name = action.name().to_string();
        let from_caller = matches!(waiter, Waiter::Single(_) | Waiter::List { to: ListTo::Caller(_), .. });
        if from_caller && s.pending.len() >= MAX_IN_FLIGHT {
            waiter.fail(ActionError::Busy(MAX_IN_FLIGHT));
            return Ok(());
        }
        let id = self.next_action_id();
        let timeout = self.settings.action_timeout;
        let written = tokio::time::timeout(timeout, s.conn.send(action.with_action_id(id.clone()))).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(super::action::EncodeError::Invalid(e))) => {
                // Handles validate before queueing; kept for internal actions.
                waiter.fail(ActionError::Invalid(e));
                return Ok(());
            }
            Ok(Err(super::action::EncodeError::Io(e))) => {
                waiter.fail(ActionError::ConnectionLost { action: name });
                return Err(AmiError::Io(e).into());
            }
            Err(_) => {
                waiter.fail(ActionError::ConnectionLost { action: name });
                return Err(AmiError::WriteTimeout(timeout).into());
            }
        }
        let now = Instant::now();
        let deadline = now + timeout;
        if matches!(waiter, Waiter::Keepalive) {
            s.ping = Some(id.clone());
        }
        s.pending.insert(id, Pending { label: action_label(&name), name, started: now, deadline, waiter });
        if deadline < s.timer_at {
            s.set_timer(deadline);
        }
        Ok(())
    }

    async fn on_message(&mut self, s: &mut Session, m: AmiMessage) -> Result<(), End> {
        let r = match m {
            AmiMessage::Frame(f) => {
                self.frames_received.increment(1);
                self.route(s, f).await
            }
            AmiMessage::Malformed(m) => {
                self.malformed.record(m);
                Ok(())
            }
            AmiMessage::Banner(b) => {
                debug!(banner = %b, "unexpected AMI banner mid-stream ignored");
                Ok(())
            }
        };
        // Taken after delivering: time spent waiting on a full events
        // channel is ours, not the PBX's silence (see `on_timer`).
        s.last_rx = Instant::now();
        r
    }

    /// Sends a frame to the action it belongs to, or into the pipeline.
    async fn route(&mut self, s: &mut Session, f: Frame) -> Result<(), End> {
        let Some(id) = f.action_id() else {
            return self.forward(f).await;
        };
        if !s.pending.contains_key(id) {
            if let Some(i) = s.draining.iter().position(|d| d == id) {
                if is_list_complete(&f) {
                    s.draining.remove(i);
                }
                return Ok(());
            }
            if f.event().is_none() && f.response().is_some() {
                debug!(action_id = id, "late or unknown AMI reply dropped");
                return Ok(());
            }
            return self.forward(f).await;
        }
        let id = id.to_string();
        let Some(p) = s.pending.get_mut(&id) else {
            return Ok(());
        };
        match &mut p.waiter {
            Waiter::Single(_) | Waiter::Keepalive => {
                if f.response().is_none() {
                    // An event tagged with the action (before its reply).
                    return self.forward(f).await;
                }
                if let Some(p) = s.pending.remove(&id) {
                    record_duration(p.label, p.started);
                    match p.waiter {
                        Waiter::Single(tx) => {
                            let r = if is_error(&f) {
                                Err(ActionError::Rejected {
                                    action: p.name,
                                    message: message_of(&f),
                                    response: Box::new(f),
                                })
                            } else {
                                Ok(f)
                            };
                            drop(tx.send(r));
                        }
                        _ => s.ping = None,
                    }
                }
                Ok(())
            }
            Waiter::List { response, items, .. } => {
                enum Step {
                    More,
                    Done,
                    Overflow,
                }
                let step = if response.is_none() && f.response().is_some() {
                    // No `EventList: start`: an error, or an action that is
                    // not a list after all; either way nothing follows.
                    let done = is_error(&f) || !f.get("EventList").is_some_and(|v| v.eq_ignore_ascii_case("start"));
                    *response = Some(Box::new(f));
                    if done {
                        Step::Done
                    } else {
                        Step::More
                    }
                } else if is_list_complete(&f) {
                    Step::Done
                } else if items.len() >= MAX_LIST_ITEMS {
                    Step::Overflow
                } else {
                    items.push(f);
                    Step::More
                };
                // A long list is alive as long as items keep coming.
                p.deadline = Instant::now() + self.settings.action_timeout;
                match step {
                    Step::More => Ok(()),
                    Step::Done => match s.pending.remove(&id) {
                        Some(p) => self.finish_list(s, p, Ok(())).await,
                        None => Ok(()),
                    },
                    Step::Overflow => {
                        if let Some(p) = s.pending.remove(&id) {
                            let e = ActionError::ListTooLong { action: p.name.clone(), limit: MAX_LIST_ITEMS };
                            self.finish_list(s, p, Err(e)).await?;
                        }
                        s.add_draining(id);
                        Ok(())
                    }
                }
            }
        }
    }

    /// Completes a list action (`Ok(())`: as collected; `Err`: failed).
    async fn finish_list(&mut self, s: &mut Session, p: Pending, outcome: Result<(), ActionError>) -> Result<(), End> {
        record_duration(p.label, p.started);
        let Waiter::List { to, response, items } = p.waiter else {
            return Ok(());
        };
        let result = outcome.and_then(|()| match response {
            Some(r) if is_error(&r) => {
                Err(ActionError::Rejected { action: p.name.clone(), message: message_of(&r), response: r })
            }
            Some(r) => Ok(ListResponse { response: *r, items }),
            // The list completed without an opening reply (broken peer).
            None => Err(ActionError::Rejected {
                action: p.name.clone(),
                message: "list without a reply".into(),
                response: Box::new(Frame::from_pairs::<&str, &str>(&[])),
            }),
        });
        match to {
            ListTo::Caller(tx) => {
                drop(tx.send(result));
                Ok(())
            }
            ListTo::Resync(part) => self.resync_part(s, part, result).await,
        }
    }

    async fn resync_part(
        &mut self,
        s: &mut Session,
        part: ResyncPart,
        result: Result<ListResponse, ActionError>,
    ) -> Result<(), End> {
        if !s.resync.active {
            return Ok(());
        }
        match (part, result) {
            (ResyncPart::Channels, Ok(list)) => s.resync.channels = Some(list.items),
            (ResyncPart::Queues, Ok(list)) => s.resync.queues = Some(list.items),
            (ResyncPart::Channels, Err(e)) => {
                warn!(error = %e, "CoreShowChannels failed after (re)connecting; no resync on this connection");
                s.resync.active = false;
                return Ok(());
            }
            (ResyncPart::Queues, Err(e)) => {
                warn!(error = %e, "QueueStatus failed after (re)connecting; resyncing channels only");
                s.resync.queues = Some(Vec::new());
            }
        }
        if s.resync.channels.is_some() && s.resync.queues.is_some() {
            s.resync.active = false;
            let channels = s.resync.channels.take().unwrap_or_default();
            let queue_items = s.resync.queues.take().unwrap_or_default();
            info!(channels = channels.len(), queue_items = queue_items.len(), "AMI resync collected");
            self.deliver(SourceItem::Resync(Resync { channels, queue_items })).await?;
        }
        Ok(())
    }

    async fn forward(&mut self, f: Frame) -> Result<(), End> {
        self.deliver(SourceItem::Frame(f)).await
    }

    /// Expires overdue actions and runs the keepalive.
    async fn on_timer(&mut self, s: &mut Session) -> Result<(), End> {
        let now = Instant::now();
        // The keepalive judges the PBX only on time we spent listening: after
        // a stall on a full events channel its reply may still be queued
        // behind unread events, so it gets a full timeout from the last frame.
        if let Some(p) = s.ping.as_ref().and_then(|id| s.pending.get_mut(id)) {
            p.deadline = p.deadline.max(s.last_rx + self.settings.action_timeout);
        }
        let overdue: Vec<String> =
            s.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| id.clone()).collect();
        for id in overdue {
            let Some(p) = s.pending.remove(&id) else {
                continue;
            };
            let e = ActionError::Timeout { action: p.name.clone(), timeout: self.settings.action_timeout };
            match p.waiter {
                Waiter::Keepalive => return Err(AmiError::PingTimeout(self.settings.action_timeout).into()),
                Waiter::Single(tx) => drop(tx.send(Err(e))),
                Waiter::List { .. } => {
                    s.add_draining(id);
                    self.finish_list(s, p, Err(e)).await?;
                }
            }
        }
        if s.ping.is_none() && now >= s.last_rx + self.settings.ping_interval {
            self.start(s, Action::new("Ping"), Waiter::Keepalive).await?;
        }
        let mut next = s.pending.values().map(|p| p.deadline).min().unwrap_or(now + self.settings.ping_interval);
        if s.ping.is_none() {
            next = next.min(s.last_rx + self.settings.ping_interval);
        }
        s.set_timer(next.max(now));
        Ok(())
    }
}

impl Waiter {
    fn list(to: ListTo) -> Waiter {
        Waiter::List { to, response: None, items: Vec::new() }
    }

    fn fail(self, e: ActionError) {
        match self {
            Waiter::Single(tx) => drop(tx.send(Err(e))),
            Waiter::List { to: ListTo::Caller(tx), .. } => drop(tx.send(Err(e))),
            Waiter::List { to: ListTo::Resync(part), .. } => warn!(error = %e, ?part, "resync action not sent"),
            Waiter::Keepalive => {}
        }
    }
}

impl Session {
    fn set_timer(&mut self, at: Instant) {
        self.timer_at = at;
        self.timer.as_mut().reset(at);
    }

    fn add_draining(&mut self, id: String) {
        if self.draining.len() >= MAX_DRAINING {
            self.draining.pop_front();
        }
        self.draining.push_back(id);
    }
}

fn is_list_complete(f: &Frame) -> bool {
    f.event().is_some() && f.get("EventList").is_some_and(|v| v.eq_ignore_ascii_case("Complete"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_key_matches_asterisk() {
        // md5("1234" + "secret"), as Asterisk's manager.c computes it.
        assert_eq!(md5_key("1234", "secret"), format!("{:x}", Md5::digest(b"1234secret")));
        assert_eq!(md5_key("", ""), "d41d8cd98f00b204e9800998ecf8427e");
    }

    #[test]
    fn action_labels_are_a_fixed_set() {
        assert_eq!(action_label("coreshowchannels"), "CoreShowChannels");
        assert_eq!(action_label("Ping"), "Ping");
        assert_eq!(action_label("SomethingFromAnApiCaller"), "other");
    }

    fn config() -> AmiConfig {
        let text = r#"
            address = "127.0.0.1:5038"
            username = "cb"
            secret = "x"
        "#;
        toml::from_str(text).expect("valid AMI config")
    }

    #[test]
    fn settings_reject_bad_durations_and_sizes() {
        assert!(Settings::from_config(&config()).is_ok());
        let mut c = config();
        c.ping_interval_seconds = -1.0;
        assert!(matches!(
            Settings::from_config(&c),
            Err(AmiError::InvalidSetting { field: "ping_interval_seconds", .. })
        ));
        let mut c = config();
        c.reconnect_max_seconds = f64::NAN;
        assert!(Settings::from_config(&c).is_err());
        let mut c = config();
        c.event_queue_capacity = 0;
        assert!(Settings::from_config(&c).is_err());
        let mut c = config();
        c.tls = true;
        c.tls_server_name = Some("not a host name!".into());
        assert!(matches!(check_config(&c), Err(ref e @ AmiError::Transport(_)) if e.is_fatal()));
    }

    #[test]
    fn live_codec_drops_a_frame_cut_by_eof() {
        let mut codec = LiveCodec(AmiCodec::default());
        let mut buf = BytesMut::from(&b"Event: A\r\n\r\nEvent: B\r\nChannel: SIP/x"[..]);
        let first = codec.decode_eof(&mut buf).expect("no I/O error");
        assert!(matches!(first, Some(AmiMessage::Frame(ref f)) if f.event() == Some("A")));
        assert_eq!(codec.decode_eof(&mut buf).expect("no I/O error"), None);
        assert!(buf.is_empty());
    }
}
