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
//!    │ per extension:
//!    ├─ subscription.rs  SUBSCRIBE, 401/407 → digest.rs, refresh, backoff
//!    ├─ dialog_info.rs   NOTIFY body → DialogSet (full/partial, versions)
//!    └─ line.rs          DialogSet → agent.line (+ SIP-only call events)
//!                      │ Event (bounded channel: full = wait)
//!                      ▼ normalizer's consumers (registry, outbox)
//! ```
//!
//! `subscription.rs`, `dialog_info.rs`, `line.rs`, `digest.rs` and
//! `message.rs` are pure (no I/O, no clock); only `ua.rs` owns sockets and
//! timers. Keepalive: `OPTIONS` every `options_interval_seconds`; the answer
//! sets [`SipStatus::reachable`] and the round-trip time, and when the PBX
//! answers again after a silence every extension is subscribed anew (a
//! restarted PBX forgot its subscriptions; a `481` to a refresh says so too).
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

pub mod config;
pub mod dialog_info;
pub mod digest;
pub mod line;
pub mod message;
pub mod subscription;
mod ua;

pub use config::{SipConfig, Transport};
pub use line::Mode;

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
    /// SIP-only when no AMI connection is configured.
    pub fn for_config(config: &crate::config::Config) -> Mode {
        if config.pbx.ami.is_none() {
            Mode::SipOnly
        } else {
            Mode::LineOnly
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

    /// Extensions whose subscription is active now.
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
    /// Ends after `shutdown` (having sent `Expires: 0` for every active
    /// subscription), or with an error when the event channel closes.
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

/// Starts the SIP connector: binds the socket (or listener), resolves the
/// PBX, and spawns the user agent, which subscribes to the dialog state of
/// every agent's extension in `directory`.
///
/// `mode` says whether calls come from AMI ([`Mode::LineOnly`]) or from SIP
/// alone ([`Mode::SipOnly`], see [`Mode::for_config`]). `events` receives
/// `agent.line` (and SIP-only call) events in order; when it is full the
/// connector waits. `pbx_name` names the PBX in logs.
pub async fn spawn(
    config: SipConfig,
    mode: Mode,
    directory: Arc<Directory>,
    pbx_name: String,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) -> Result<SipAgent, SipError> {
    let problems = config.validate();
    if !problems.is_empty() {
        return Err(SipError::Config(problems));
    }
    let password = config.secret.resolve().map_err(SipError::Secret)?;
    let pbx_addr = tokio::net::lookup_host(&config.pbx)
        .await
        .map_err(|source| SipError::Resolve { address: config.pbx.clone(), source })?
        .next()
        .ok_or_else(|| SipError::Resolve {
            address: config.pbx.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    let bind_err = |source| SipError::Bind { address: config.bind.clone(), source };
    let (inbound_tx, inbound_rx) = mpsc::channel(ua::INBOUND_CAPACITY);
    let (udp, local_addr, tcp_listener) = match config.transport {
        Transport::Udp => {
            let socket = tokio::net::UdpSocket::bind(&config.bind).await.map_err(bind_err)?;
            let local = socket.local_addr().map_err(bind_err)?;
            (Some(Arc::new(socket)), local, None)
        }
        Transport::Tcp => {
            let listener = tokio::net::TcpListener::bind(&config.bind).await.map_err(bind_err)?;
            let local = listener.local_addr().map_err(bind_err)?;
            (None, local, Some(listener))
        }
    };
    let advertised = match &config.contact_host {
        Some(h) if h.contains(':') && !h.starts_with('[') && h.parse::<std::net::Ipv6Addr>().is_err() => h.clone(),
        Some(h) if h.starts_with('[') && h.contains("]:") => h.clone(),
        Some(h) => format!("{h}:{}", local_addr.port()),
        None if local_addr.ip().is_unspecified() => {
            host_port(route_source(pbx_addr).unwrap_or(local_addr.ip()), local_addr.port())
        }
        None => local_addr.to_string(),
    };
    let mut agents: Vec<(crate::ids::AgentId, String)> =
        directory.agents().map(|a| (a.id.clone(), a.extension.clone())).collect();
    agents.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    agents.dedup_by(|a, b| a.1 == b.1);
    let status = SipStatus::default();
    let setup = ua::Setup {
        password,
        pbx_addr,
        advertised: advertised.clone(),
        mode,
        agents,
        events,
        status: status.clone(),
        config: config.clone(),
    };
    let ua = ua::Ua::new(setup, udp.clone())?;
    match (udp, tcp_listener) {
        (Some(socket), _) => {
            ua::spawn_udp_reader(socket, inbound_tx, config.max_message_bytes, shutdown.clone());
        }
        (None, Some(listener)) => {
            ua::spawn_tcp(pbx_addr, listener, inbound_tx, &config, shutdown.clone());
        }
        (None, None) => return Err(SipError::TransportClosed),
    }
    tracing::info!(
        pbx = %pbx_name,
        sip_pbx = %pbx_addr,
        local = %local_addr,
        contact = %advertised,
        transport = config.transport.token(),
        extensions = status.subscriptions_total(),
        sip_only = (mode == Mode::SipOnly),
        "SIP dialog-event connector started"
    );
    let task = tokio::spawn(ua.run(inbound_rx, shutdown));
    Ok(SipAgent { task, status, local_addr })
}
