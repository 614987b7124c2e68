//! The SIP connector: watches agents' phones through the dialog event
//! package (RFC 4235 over RFC 6665 subscriptions), on any PBX that
//! publishes it (Asterisk, FreeSWITCH, Kamailio, hosted PBXs), and turns
//! what it sees into `agent.line` events and, when no AMI is configured,
//! into a reduced call lifecycle (SIP-only mode, see `line.rs`).
//!
//! ```text
//!            UDP socket / TCP connections
//!                      │ bytes (bounded channel)
//!  ua.rs ──────────────┴── message.rs (parse, bounded) ── responses, 400/481/489
//!    ├─ transaction.rs   requests in progress: T1/T2 retransmission, timeout,
//!    │                   response ↔ request by Via branch
//!    │ per extension:
//!    ├─ subscription.rs  SUBSCRIBE, 401/407 → digest.rs, refresh, backoff
//!    ├─ dialog_info.rs   NOTIFY body → DialogSet (full/partial, versions)
//!    └─ line.rs          DialogSet → agent.line (+ SIP-only call events)
//!                      │ Event (bounded channel: full = wait)
//!                      ▼ normalizer's consumers (registry, outbox)
//! ```
//!
//! `subscription.rs`, `transaction.rs`, `dialog_info.rs`, `line.rs`,
//! `digest.rs` and `message.rs` are pure (no I/O, no clock); only `ua.rs`
//! owns sockets and timers. `ua.rs` takes [`SipSettings`] (plain values,
//! built from the configuration file by `config/runtime.rs`); nothing here
//! reads the configuration. Keepalive: `OPTIONS` every `options_interval_seconds`
//! (sooner while the PBX is silent); the answer sets [`SipStatus::reachable`]
//! and the round-trip time. A PBX restart may forget subscriptions without a
//! word; `ua.rs` notices it (the PBX answering again after a silence or
//! differently, a `481` to a refresh, a keepalive refresh of the
//! subscription confirmed longest ago) and checks every subscription at
//! once. [`SipStatus::subscriptions_active`] counts what the PBX holds as
//! far as callbridge knows: a `481`, `terminated`, a failed refresh or a
//! lapsed grant take a subscription out at once.
//!
//! Metrics (label values from fixed sets):
//! `callbridge_sip_messages_received_total{kind=notify|options|other|response}`,
//! `callbridge_sip_malformed_total{what=sip|xml|oversize}`,
//! `callbridge_sip_subscription_failures_total{reason=auth|timeout|rejected|terminated}`,
//! `callbridge_sip_subscriptions_active`, `callbridge_sip_pbx_reachable` (0/1),
//! `callbridge_sip_options_rtt_seconds` (histogram).
//!
//! This module must never emit events for extensions that are not agents'
//! in the directory, never drop an event when the channel is full, and never
//! log the SIP secret.

pub mod dialog_info;
pub mod digest;
pub mod line;
pub mod message;
mod settings;
pub mod subscription;
pub mod transaction;
mod ua;

pub use line::Mode;
pub use settings::{SipSettings, Transport};

use crate::directory::Directory;
use crate::event::Event;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SipError {
    #[error("invalid [sip] configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("sip secret: {0}")]
    Secret(String),
    #[error("cannot resolve the PBX address {address:?}")]
    Resolve {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind the SIP socket on {address}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the event channel is closed")]
    EventsClosed,
    #[error("the SIP transport stopped")]
    TransportClosed,
}

impl Mode {
    /// SIP-only when no other source (AMI) reports calls.
    pub fn with_ami(ami: bool) -> Mode {
        if ami {
            Mode::LineOnly
        } else {
            Mode::SipOnly
        }
    }
}

#[derive(Debug, Default)]
struct StatusInner {
    reachable: AtomicBool,
    /// Last OPTIONS round-trip in µs; `u64::MAX` = none yet.
    rtt_micros: AtomicU64,
    active: AtomicUsize,
    total: AtomicUsize,
}

/// What the SIP connector knows of the PBX, for readiness and the API.
/// Cheap to clone; read without locks.
#[derive(Debug, Clone)]
pub struct SipStatus(Arc<StatusInner>);

impl Default for SipStatus {
    fn default() -> Self {
        let s = SipStatus(Arc::default());
        s.0.rtt_micros.store(u64::MAX, Ordering::Relaxed);
        s
    }
}

impl SipStatus {
    /// The PBX answered the last OPTIONS keepalive.
    pub fn reachable(&self) -> bool {
        self.0.reachable.load(Ordering::Relaxed)
    }

    /// Round-trip time of the last answered OPTIONS.
    pub fn rtt(&self) -> Option<Duration> {
        match self.0.rtt_micros.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Extensions whose subscription the PBX holds now, as far as callbridge
    /// knows (granted, and not dropped, failed to refresh or lapsed since).
    pub fn subscriptions_active(&self) -> usize {
        self.0.active.load(Ordering::Relaxed)
    }

    /// Extensions watched.
    pub fn subscriptions_total(&self) -> usize {
        self.0.total.load(Ordering::Relaxed)
    }

    /// Readiness when SIP is the only source: the PBX answers, and at least
    /// one extension is subscribed (or there is none to watch).
    pub fn ready(&self) -> bool {
        self.reachable() && (self.subscriptions_active() > 0 || self.subscriptions_total() == 0)
    }

    fn set_reachable(&self, reachable: bool, rtt: Option<Duration>) {
        self.0.reachable.store(reachable, Ordering::Relaxed);
        if let Some(rtt) = rtt {
            self.0.rtt_micros.store(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX - 1), Ordering::Relaxed);
        }
    }

    fn set_active(&self, n: usize) {
        self.0.active.store(n, Ordering::Relaxed);
    }

    fn set_total(&self, n: usize) {
        self.0.total.store(n, Ordering::Relaxed);
    }
}

/// A running SIP connector.
#[derive(Debug)]
pub struct SipAgent {
    /// Ends after `shutdown`, once every subscription the PBX may hold is
    /// unsubscribed (`Expires: 0`, its digest challenge answered) or the
    /// unsubscribe wait (2 s at most) has passed; or with an error when the
    /// event channel closes.
    pub task: JoinHandle<Result<(), SipError>>,
    pub status: SipStatus,
    /// The bound SIP address (useful with port 0).
    pub local_addr: SocketAddr,
}

/// The local address the system would use to reach `peer`: no packet is
/// sent (connecting a UDP socket only selects a route).
fn route_source(peer: SocketAddr) -> Option<std::net::IpAddr> {
    let unspecified: SocketAddr = if peer.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let s = std::net::UdpSocket::bind(unspecified).ok()?;
    s.connect(peer).ok()?;
    Some(s.local_addr().ok()?.ip())
}

fn host_port(ip: std::net::IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// The bound transport: a UDP socket, or a TCP listener (the outgoing
/// connection is opened by the transport task).
enum Bound {
    Udp(Arc<tokio::net::UdpSocket>),
    Tcp(tokio::net::TcpListener),
}

async fn resolve_pbx(pbx: &str) -> Result<SocketAddr, SipError> {
    tokio::net::lookup_host(pbx)
        .await
        .map_err(|source| SipError::Resolve { address: pbx.to_string(), source })?
        .next()
        .ok_or_else(|| SipError::Resolve {
            address: pbx.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })
}

async fn bind(settings: &SipSettings) -> Result<(Bound, SocketAddr), SipError> {
    let bind_err = |source| SipError::Bind { address: settings.bind.clone(), source };
    match settings.transport {
        Transport::Udp => {
            let socket = tokio::net::UdpSocket::bind(&settings.bind).await.map_err(bind_err)?;
            let local = socket.local_addr().map_err(bind_err)?;
            Ok((Bound::Udp(Arc::new(socket)), local))
        }
        Transport::Tcp => {
            let listener = tokio::net::TcpListener::bind(&settings.bind).await.map_err(bind_err)?;
            let local = listener.local_addr().map_err(bind_err)?;
            Ok((Bound::Tcp(listener), local))
        }
    }
}

/// The `host:port` written in Via and Contact.
fn advertised_address(contact_host: Option<&str>, local_addr: SocketAddr, pbx_addr: SocketAddr) -> String {
    match contact_host {
        Some(h) if h.contains(':') && !h.starts_with('[') && h.parse::<std::net::Ipv6Addr>().is_err() => h.to_string(),
        Some(h) if h.starts_with('[') && h.contains("]:") => h.to_string(),
        Some(h) => format!("{h}:{}", local_addr.port()),
        None if local_addr.ip().is_unspecified() => {
            host_port(route_source(pbx_addr).unwrap_or(local_addr.ip()), local_addr.port())
        }
        None => local_addr.to_string(),
    }
}

/// (agent, extension) of every agent, sorted by extension, one agent per
/// extension.
fn watched_extensions(directory: &Directory) -> Vec<(crate::ids::AgentId, String)> {
    let mut agents: Vec<(crate::ids::AgentId, String)> =
        directory.agents().map(|a| (a.id.clone(), a.extension.clone())).collect();
    agents.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    agents.dedup_by(|a, b| a.1 == b.1);
    agents
}

/// Starts the SIP connector: binds the socket (or listener), resolves the
/// PBX, and spawns the user agent, which subscribes to the dialog state of
/// every agent's extension in `directory`.
///
/// `mode` says whether calls come from AMI ([`Mode::LineOnly`]) or from SIP
/// alone ([`Mode::SipOnly`], see [`Mode::with_ami`]). `events` receives
/// `agent.line` (and SIP-only call) events in order; when it is full the
/// connector waits. `pbx_name` names the PBX in logs.
pub async fn spawn(
    settings: SipSettings,
    mode: Mode,
    directory: Arc<Directory>,
    pbx_name: String,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) -> Result<SipAgent, SipError> {
    let password = settings.secret.resolve().map_err(SipError::Secret)?;
    let pbx_addr = resolve_pbx(&settings.pbx).await?;
    let (inbound_tx, inbound_rx) = mpsc::channel(ua::INBOUND_CAPACITY);
    let (bound, local_addr) = bind(&settings).await?;
    let advertised = advertised_address(settings.contact_host.as_deref(), local_addr, pbx_addr);
    let status = SipStatus::default();
    let udp = match &bound {
        Bound::Udp(socket) => Some(socket.clone()),
        Bound::Tcp(_) => None,
    };
    let setup = ua::AgentSetup {
        password,
        pbx_addr,
        advertised: advertised.clone(),
        mode,
        agents: watched_extensions(&directory),
        events,
        status: status.clone(),
        settings: settings.clone(),
    };
    let ua = ua::Ua::new(setup, udp)?;
    // The transport outlives `shutdown` (the unsubscribes need their
    // answers) and stops with the user agent's task, however it ends.
    let transport = CancellationToken::new();
    match bound {
        Bound::Udp(socket) => {
            ua::spawn_udp_reader(socket, inbound_tx, settings.max_message_bytes, transport.clone());
        }
        Bound::Tcp(listener) => {
            ua::spawn_tcp(pbx_addr, listener, inbound_tx, &settings, transport.clone());
        }
    }
    tracing::info!(
        pbx = %pbx_name,
        sip_pbx = %pbx_addr,
        local = %local_addr,
        contact = %advertised,
        transport = settings.transport.token(),
        extensions = status.subscriptions_total(),
        sip_only = (mode == Mode::SipOnly),
        "SIP dialog-event connector started"
    );
    let task = tokio::spawn(async move {
        let _transport = transport.drop_guard();
        ua.run(inbound_rx, shutdown).await
    });
    Ok(SipAgent { task, status, local_addr })
}
