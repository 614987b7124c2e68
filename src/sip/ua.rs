//! The SIP user agent task: owns the transport (a UDP socket, or TCP
//! connections), sends SUBSCRIBE and OPTIONS requests and whatever their
//! client transactions ask for ([`Transactions`]: retransmission over UDP,
//! timeouts, responses matched by the top Via `branch`), answers every
//! request the PBX sends (NOTIFY `200`, `400` when malformed, `481` for an
//! unknown subscription, `489` for another event package, OPTIONS `200`,
//! `405` otherwise), and feeds NOTIFY bodies through [`DialogSet`] and
//! [`LineTracker`] into the event channel.
//!
//! One task, one loop (`tokio::select!` over shutdown, the inbound channel
//! and the earliest timer), no locks: subscriptions, transactions and line
//! trackers are plain fields. Timers are found by scanning (O(agents) per
//! wake-up, fine for the hundreds of extensions of a helpdesk).
//!
//! A PBX restart is noticed however the PBX shows it, and every
//! subscription is then checked at once ([`Subscription::verify`]: a
//! refresh, which a PBX that forgot the dialog answers `481`, and the
//! subscription starts over with a new dialog):
//!
//! - the PBX answers OPTIONS again after a silence (the keepalive comes
//!   sooner while it is silent: 1 s, 2 s, 4 s… up to the interval, jittered;
//!   requests it left unanswered are retransmitted at once);
//! - its OPTIONS answer changes (status, e.g. `503` while Asterisk shuts
//!   down and `200` after, or `Server`/`User-Agent`, e.g. after an upgrade);
//! - the TCP connection to it is made again;
//! - one subscription's refresh is answered `481` (at most once per
//!   [`RESYNC_HOLDOFF`], so that the others' `481`s do not cascade);
//! - with every keepalive, the subscription the PBX confirmed longest ago
//!   (and more than half an interval ago) is refreshed: a PBX that restarted
//!   between two keepalives, silently and quickly, answers it `481`. Not an
//!   in-dialog OPTIONS: chan_sip answers those by destroying the dialog.
//!
//! `Subscription-State: terminated` and a `481` to a refresh re-subscribe
//! that one subscription (`subscription.rs`). Asterisk offers no boot
//! identity over SIP (no header of its answers changes with a restart).
//! Checks are spread over [`STAGGER`] per extension plus up to
//! [`RESYNC_JITTER`].
//!
//! Shutdown unsubscribes (`Expires: 0`) every subscription the PBX may hold
//! and keeps serving the transport until each is answered (its digest
//! challenge too), times out, or [`UNSUBSCRIBE_WAIT`] passes.
//!
//! Invariant: every parse failure is counted and survived; only a closed
//! event channel ends the task with an error. This module never decides
//! what a SIP response means for a subscription (that is
//! `subscription.rs`), when a request is retransmitted or has failed
//! (`transaction.rs`), nor what a dialog means for a call (`line.rs`).

use super::dialog_info::{Applied, DialogInfo, DialogSet};
use super::line::{LineTracker, Mode};
use super::message::{new_branch, token, Framed, Lenient, Message, Name, Outgoing, SipCodec};
use super::settings::{SipSettings, Transport};
use super::subscription::{self, SubscribeParams, SubscribeRequest, Subscription};
use super::transaction::{Matched, Transactions};
use super::{SipError, SipStatus};
use crate::backoff::{Backoff, Jitter, Retries};
use crate::event::{Event, Micros};
use crate::ids::AgentId;
use futures::StreamExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Capacity of the transport → user agent channel. Full means the readers
/// wait: UDP datagrams then queue in the kernel (and the PBX retransmits
/// what gets dropped there), TCP stops reading (TCP flow control).
pub(crate) const INBOUND_CAPACITY: usize = 256;
/// Capacity of each TCP connection's outgoing queue; full means the user
/// agent waits for the connection to drain.
const TCP_OUT_CAPACITY: usize = 64;
/// Inbound TCP connections served at once (PBXs open one, maybe two).
const MAX_INBOUND_TCP: usize = 16;
/// Delay between the first SUBSCRIBEs of successive extensions, so that a
/// start with hundreds of agents does not burst at the PBX.
const STAGGER: Duration = Duration::from_millis(10);
/// Upper bound of the random delay added to each subscription's check
/// after a suspected PBX restart.
pub(crate) const RESYNC_JITTER: Duration = Duration::from_millis(500);
/// A `481` to one refresh checks every subscription at most this often
/// (after the previous checks are all out).
pub(crate) const RESYNC_HOLDOFF: Duration = Duration::from_secs(5);
/// Longest wait for the answers to the unsubscribes at shutdown (at most
/// the request timeout).
pub(crate) const UNSUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
/// First keepalive retry after an unanswered OPTIONS; doubled up to the interval.
const OPTIONS_RETRY: Duration = Duration::from_secs(1);

/// Where a response to an inbound request goes.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    Udp(SocketAddr),
    Tcp(mpsc::Sender<Vec<u8>>),
}

/// What the transport tasks hand to the user agent.
#[derive(Debug)]
pub(crate) enum Inbound {
    Bytes(Vec<u8>, Reply),
    /// A message larger than `max_message_bytes`, dropped unread.
    Oversize,
    /// The outgoing TCP connection is up (its writer).
    Connected(mpsc::Sender<Vec<u8>>),
    /// The outgoing TCP connection is gone.
    Disconnected,
}

/// Everything the user agent needs, resolved by `spawn`.
pub(crate) struct AgentSetup {
    pub settings: SipSettings,
    pub password: String,
    pub pbx_addr: SocketAddr,
    /// `host:port` written in Via and Contact.
    pub advertised: String,
    pub mode: Mode,
    /// (agent, extension), sorted by extension.
    pub agents: Vec<(AgentId, String)>,
    pub events: mpsc::Sender<Event>,
    pub status: SipStatus,
}

/// What a request in flight is for. SUBSCRIBEs (unsubscribes too) go
/// back to their line's [`Subscription`], which knows its phase.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    Subscribe { agent: usize, cseq: u32 },
    Options,
}

/// What made the user agent check every subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resync {
    /// The PBX answers OPTIONS again after a silence.
    Reachable,
    /// The PBX's OPTIONS answer (status, Server/User-Agent) changed.
    OptionsChanged,
    /// The TCP connection to the PBX was made again.
    Reconnected,
    /// A refresh was answered `481`.
    Lost,
}

impl Resync {
    fn as_str(self) -> &'static str {
        match self {
            Resync::Reachable => "the PBX answers again after a silence",
            Resync::OptionsChanged => "the PBX answers OPTIONS differently",
            Resync::Reconnected => "the connection to the PBX was made again",
            Resync::Lost => "the PBX no longer knew a subscription",
        }
    }

    /// Requests in flight went over a connection that closed: send them
    /// anew. (Over UDP, those the PBX left unanswered are retransmitted at
    /// once when it answers again, see [`Transactions::resend_all`].)
    fn in_flight_lost(self) -> bool {
        self == Resync::Reconnected
    }
}

struct Line {
    extension: String,
    sub: Subscription,
    dialogs: DialogSet,
    tracker: LineTracker,
}

pub(crate) struct Ua {
    settings: SipSettings,
    advertised: String,
    pbx_addr: SocketAddr,
    udp: Option<Arc<UdpSocket>>,
    tcp: Option<mpsc::Sender<Vec<u8>>>,
    connected_before: bool,
    lines: Vec<Line>,
    txns: Transactions<Purpose>,
    options_at: Instant,
    /// Keepalive retries while the PBX does not answer.
    options_retry: Option<Retries>,
    /// (status, `Server` or `User-Agent`) of the last OPTIONS answer.
    options_answer: Option<(u16, Option<String>)>,
    /// `None` until the first OPTIONS answered or timed out.
    reachable: Option<bool>,
    /// The last check of every subscription after a `481`.
    last_resync: Option<Instant>,
    /// Shutting down: unsubscribes in flight, NOTIFYs only answered.
    closing: bool,
    events: mpsc::Sender<Event>,
    status: SipStatus,
    out: Vec<Event>,
}

fn wall_micros() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX))
}

fn jitter() -> f64 {
    rand::random::<f64>()
}

impl Ua {
    pub(crate) fn new(setup: AgentSetup, udp: Option<Arc<UdpSocket>>) -> Result<Ua, SipError> {
        let now = Instant::now();
        let domain = setup.settings.domain.clone();
        let offer_wait = Micros::try_from(setup.settings.offer_identity_wait.as_micros()).unwrap_or(0);
        let mut lines = Vec::with_capacity(setup.agents.len());
        for (i, (agent, extension)) in setup.agents.into_iter().enumerate() {
            let raw = format!("sip:{extension}@{domain}");
            let uri = super::message::sip_uri(&raw)
                .map_err(|e| SipError::Config(vec![format!("sip.domain: agent {agent}'s URI: {e}")]))?
                .to_string();
            let params = SubscribeParams {
                uri,
                username: setup.settings.username.clone(),
                password: setup.password.clone(),
                expires: setup.settings.expires_seconds,
                retry_max: setup.settings.retry_max,
            };
            let start = now + STAGGER.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
            lines.push(Line {
                tracker: LineTracker::new(agent, extension.clone(), setup.mode, offer_wait),
                extension,
                sub: Subscription::new(params, start),
                dialogs: DialogSet::default(),
            });
        }
        setup.status.set_total(lines.len());
        // Over UDP requests are retransmitted; TCP is reliable.
        let retransmit = udp.is_some();
        Ok(Ua {
            advertised: setup.advertised,
            pbx_addr: setup.pbx_addr,
            udp,
            tcp: None,
            connected_before: false,
            lines,
            txns: Transactions::new(retransmit, setup.settings.request_timeout),
            options_at: now,
            options_retry: setup
                .settings
                .options_interval
                .map(|interval| Retries::new(Backoff::clamped(OPTIONS_RETRY, interval, Jitter::Equal))),
            options_answer: None,
            reachable: None,
            last_resync: None,
            closing: false,
            events: setup.events,
            status: setup.status,
            out: Vec::new(),
            settings: setup.settings,
        })
    }

    /// The loop. Returns on shutdown (after unsubscribing) or when the
    /// event channel is closed.
    pub(crate) async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        shutdown: CancellationToken,
    ) -> Result<(), SipError> {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.close(&mut inbound).await;
                    return Ok(());
                }
                item = inbound.recv() => match item {
                    Some(item) => self.on_inbound(item).await?,
                    None => return Err(SipError::TransportClosed),
                },
                _ = tokio::time::sleep_until(wake) => self.on_timers().await?,
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let wall = wall_micros();
        let mut wake = now + Duration::from_secs(3600);
        let can_send = self.can_send();
        let mut consider = |t: Instant| wake = wake.min(t);
        if can_send && self.settings.options_interval.is_some() {
            consider(self.options_at);
        }
        if let Some(t) = self.txns.next_deadline() {
            consider(t);
        }
        for l in &self.lines {
            if let Some(d) = l.sub.deadline().filter(|_| can_send) {
                consider(d);
            }
            if let Some(d) = l.sub.lapse_deadline() {
                consider(d);
            }
            if let Some(d) = l.tracker.next_deadline() {
                consider(now + Duration::from_micros(u64::try_from(d.saturating_sub(wall)).unwrap_or(0)));
            }
        }
        wake
    }

    async fn on_timers(&mut self) -> Result<(), SipError> {
        let now = Instant::now();
        // Transactions: retransmit (UDP) or give up.
        let due = self.txns.poll(now);
        for bytes in due.resend {
            self.send_to_pbx(&bytes).await;
        }
        for purpose in due.expired {
            self.on_txn_timeout(now, purpose).await;
        }
        for l in &mut self.lines {
            // (A refresh still in flight past the grant counts when it times out.)
            if l.sub.lapse(now) && l.sub.in_flight_cseq().is_none() {
                warn!(extension = %l.extension, "subscription lapsed: no refresh answered before it ended");
                metrics::counter!("callbridge_sip_subscription_failures_total", "reason" => "timeout").increment(1);
            }
        }
        if self.can_send() {
            if let Some(interval) = self.settings.options_interval.filter(|_| self.options_at <= now) {
                let silent = self.reachable == Some(false);
                let retry = self.options_retry.as_mut().filter(|_| silent).map(|r| r.next_delay(&mut rand::rng()));
                self.options_at = now + retry.map_or(interval, |d| d.min(interval));
                self.send_options(now).await;
                if !silent {
                    self.probe(now, interval);
                }
            }
            for i in 0..self.lines.len() {
                if let Some(req) = self.lines[i].sub.poll(now) {
                    self.send_subscribe(i, req, now).await;
                }
            }
        }
        let wall = wall_micros();
        for l in &mut self.lines {
            if l.tracker.next_deadline().is_some_and(|d| d <= wall) {
                l.tracker.poll(wall, &mut self.out);
            }
        }
        self.update_active();
        self.flush_events().await
    }

    /// With a keepalive: refresh the active subscription the PBX confirmed
    /// longest ago, when that was more than half an interval ago (not one
    /// just granted; a single subscription is checked at every keepalive).
    /// A PBX that restarted since answers `481`, and [`Resync::Lost`]
    /// checks the rest.
    fn probe(&mut self, now: Instant, interval: Duration) {
        let Some(cutoff) = now.checked_sub(interval / 2) else { return };
        let oldest = self
            .lines
            .iter_mut()
            .filter_map(|l| l.sub.last_confirmed().filter(|t| *t <= cutoff).map(|t| (t, l)))
            .min_by_key(|(t, _)| *t);
        if let Some((_, l)) = oldest {
            debug!(extension = %l.extension, "keepalive: refreshing the subscription confirmed longest ago");
            l.sub.refresh_now(now);
        }
    }

    /// The PBX may have lost its subscriptions: check every one
    /// ([`Subscription::verify`]), spread over the stagger and a jitter.
    fn resync(&mut self, now: Instant, why: Resync) {
        // The checks of one resync take up to `span`; their 481s are its own.
        let span = STAGGER.saturating_mul(u32::try_from(self.lines.len()).unwrap_or(u32::MAX)) + RESYNC_JITTER;
        if why == Resync::Lost && self.last_resync.is_some_and(|t| now < t + span + RESYNC_HOLDOFF) {
            return;
        }
        if self.closing || self.lines.is_empty() {
            return;
        }
        self.last_resync = Some(now);
        info!(pbx = %self.pbx_addr, reason = why.as_str(), "checking every subscription (the PBX may have restarted)");
        let spread = Backoff::clamped(RESYNC_JITTER, RESYNC_JITTER, Jitter::Full);
        let mut rng = rand::rng();
        for (i, l) in self.lines.iter_mut().enumerate() {
            let at = now + STAGGER.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX)) + spread.delay(0, &mut rng);
            l.sub.verify(at, why.in_flight_lost());
        }
        self.update_active();
    }

    async fn on_txn_timeout(&mut self, now: Instant, purpose: Purpose) {
        match purpose {
            Purpose::Subscribe { agent, cseq } => {
                if let Some(l) = self.lines.get_mut(agent) {
                    if l.sub.is_closing() {
                        debug!(extension = %l.extension, "unsubscribe unanswered");
                    } else if l.sub.in_flight_cseq() == Some(cseq) {
                        warn!(extension = %l.extension, "SUBSCRIBE timed out; retrying with backoff");
                        metrics::counter!("callbridge_sip_subscription_failures_total", "reason" => "timeout")
                            .increment(1);
                    }
                    l.sub.on_timeout(now, cseq, jitter());
                }
                self.update_active();
            }
            Purpose::Options => {
                self.set_reachable(false, None, now);
                // Look again soon (1 s, 2 s, 4 s… up to the interval).
                if let Some(retry) = self.options_retry.as_mut() {
                    self.options_at = self.options_at.min(now + retry.next_delay(&mut rand::rng()));
                }
            }
        }
    }

    /// UDP can always send; TCP only over a live connection (requests are
    /// held, not lost, while it is down).
    fn can_send(&self) -> bool {
        self.udp.is_some() || self.tcp.is_some()
    }

    /// Returns true when this checked every subscription (the PBX answers
    /// again after a silence).
    fn set_reachable(&mut self, reachable: bool, rtt: Option<Duration>, now: Instant) -> bool {
        let before = self.reachable.replace(reachable);
        self.status.set_reachable(reachable, rtt);
        metrics::gauge!("callbridge_sip_pbx_reachable").set(if reachable { 1.0 } else { 0.0 });
        if let Some(rtt) = rtt {
            metrics::histogram!("callbridge_sip_options_rtt_seconds").record(rtt.as_secs_f64());
        }
        if reachable {
            if let Some(retry) = self.options_retry.as_mut() {
                retry.reset();
            }
        }
        match (before, reachable) {
            (Some(false), true) => {
                // The PBX may have restarted and forgotten every subscription.
                info!(pbx = %self.pbx_addr, "PBX reachable again");
                self.resync(now, Resync::Reachable);
                true
            }
            (Some(true) | None, false) => {
                warn!(pbx = %self.pbx_addr, "PBX does not answer OPTIONS");
                false
            }
            _ => false,
        }
    }

    /// Publishes how many subscriptions the PBX holds (the status and the
    /// `callbridge_sip_subscriptions_active` gauge): after every change.
    fn update_active(&self) {
        let active = self.lines.iter().filter(|l| l.sub.is_active()).count();
        self.status.set_active(active);
        metrics::gauge!("callbridge_sip_subscriptions_active").set(active as f64);
        if self.settings.options_interval.is_none() {
            // No keepalive: an active subscription is the sign of life.
            self.status.set_reachable(active > 0, None);
            metrics::gauge!("callbridge_sip_pbx_reachable").set(if active > 0 { 1.0 } else { 0.0 });
        }
    }

    async fn flush_events(&mut self) -> Result<(), SipError> {
        // Full channel: wait (backpressure); call events are never dropped.
        for e in self.out.drain(..) {
            self.events.send(e).await.map_err(|_| SipError::EventsClosed)?;
        }
        Ok(())
    }

    async fn send_to_pbx(&mut self, bytes: &[u8]) {
        if let Some(udp) = &self.udp {
            if let Err(e) = udp.send_to(bytes, self.pbx_addr).await {
                debug!(error = %e, "UDP send failed");
            }
        } else if let Some(tcp) = &self.tcp {
            if tcp.send(bytes.to_vec()).await.is_err() {
                self.tcp = None;
            }
        }
    }

    async fn reply(&mut self, to: &Reply, bytes: Vec<u8>) {
        match to {
            Reply::Udp(addr) => {
                if let Some(udp) = &self.udp {
                    if let Err(e) = udp.send_to(&bytes, addr).await {
                        debug!(error = %e, "UDP reply failed");
                    }
                }
            }
            Reply::Tcp(tx) => {
                let _ = tx.send(bytes).await;
            }
        }
    }

    fn via(&self, branch: &str) -> String {
        format!("SIP/2.0/{} {};branch={branch};rport", self.settings.transport.token(), self.advertised)
    }

    fn contact(&self) -> String {
        match self.settings.transport {
            Transport::Udp => format!("<sip:{}@{}>", self.settings.username, self.advertised),
            Transport::Tcp => format!("<sip:{}@{};transport=tcp>", self.settings.username, self.advertised),
        }
    }

    async fn start_txn(&mut self, purpose: Purpose, out: Outgoing, branch: String, now: Instant) {
        let bytes = match out.render() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot render a SIP request");
                return;
            }
        };
        self.send_to_pbx(&bytes).await;
        self.txns.start(branch, purpose, bytes, now);
    }

    async fn send_subscribe(&mut self, i: usize, req: SubscribeRequest, now: Instant) {
        let Some(line) = self.lines.get_mut(i) else { return };
        if req.fresh {
            line.dialogs.reset_version();
        }
        let extension = line.extension.clone();
        // A request superseded by this one (auth retry, refresh, unsubscribe) is over.
        self.txns.abandon(|p| matches!(p, Purpose::Subscribe { agent, .. } if *agent == i));
        let purpose = Purpose::Subscribe { agent: i, cseq: req.cseq };
        let out = self.subscribe_request(&extension, &req);
        let branch = header_branch(&out);
        // Published before the request leaves: whoever sees it sees the truth.
        self.update_active();
        self.start_txn(purpose, out, branch, now).await;
    }

    fn subscribe_request(&self, extension: &str, req: &SubscribeRequest) -> Outgoing {
        let branch = new_branch();
        let to = match &req.remote_tag {
            Some(tag) => format!("<sip:{extension}@{}>;tag={tag}", self.settings.domain),
            None => format!("<sip:{extension}@{}>", self.settings.domain),
        };
        let mut other = vec![
            ("Max-Forwards", "70".to_string()),
            ("Accept", "application/dialog-info+xml".to_string()),
            ("User-Agent", concat!("callbridge/", env!("CARGO_PKG_VERSION")).to_string()),
        ];
        if let Some((name, value)) = &req.authorization {
            other.push((name, value.clone()));
        }
        Outgoing {
            method: rsip::Method::Subscribe,
            uri: req.uri.clone(),
            headers: vec![
                (Name::Via, self.via(&branch)),
                (
                    Name::From,
                    format!("<sip:{}@{}>;tag={}", self.settings.username, self.settings.domain, req.local_tag),
                ),
                (Name::To, to),
                (Name::CallId, req.call_id.clone()),
                (Name::CSeq, format!("{} SUBSCRIBE", req.cseq)),
                (Name::Contact, self.contact()),
                (Name::Event, "dialog".to_string()),
                (Name::Expires, req.expires.to_string()),
            ],
            other,
        }
    }

    async fn send_options(&mut self, now: Instant) {
        let branch = new_branch();
        let out = Outgoing {
            method: rsip::Method::Options,
            uri: format!("sip:{}", self.settings.pbx),
            headers: vec![
                (Name::Via, self.via(&branch)),
                (Name::From, format!("<sip:{}@{}>;tag={}", self.settings.username, self.settings.domain, token(12))),
                (Name::To, format!("<sip:{}>", self.settings.pbx)),
                (Name::CallId, format!("{}@callbridge", token(24))),
                (Name::CSeq, "1 OPTIONS".to_string()),
                (Name::Contact, self.contact()),
            ],
            other: vec![("Max-Forwards", "70".to_string()), ("Accept", "application/sdp".to_string())],
        };
        // Only one keepalive at a time: a new one supersedes a lost one.
        if self.txns.abandon(|p| matches!(p, Purpose::Options)) > 0 {
            self.set_reachable(false, None, now);
        }
        self.start_txn(Purpose::Options, out, branch, now).await;
    }

    /// Shutdown: unsubscribes every subscription the PBX may hold, then
    /// serves the transport (challenges answered, NOTIFYs acknowledged but
    /// not reported) until each unsubscribe is over or [`UNSUBSCRIBE_WAIT`]
    /// (at most the request timeout) has passed.
    async fn close(&mut self, inbound: &mut mpsc::Receiver<Inbound>) {
        self.closing = true;
        let now = Instant::now();
        for i in 0..self.lines.len() {
            if let Some(req) = self.lines[i].sub.close() {
                self.send_subscribe(i, req, now).await;
            }
        }
        self.update_active();
        let deadline = now + UNSUBSCRIBE_WAIT.min(self.settings.request_timeout);
        loop {
            let pending = self.lines.iter().filter(|l| !l.sub.is_closed()).count();
            if pending == 0 {
                debug!("every subscription unsubscribed");
                return;
            }
            let wake = self.txns.next_deadline().map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                biased;
                item = inbound.recv() => match item {
                    Some(item) => {
                        if let Err(e) = self.on_inbound(item).await {
                            debug!(error = %e, "while unsubscribing");
                            return;
                        }
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if now >= deadline {
                        warn!(pending, "unsubscribes not answered before the shutdown wait ended");
                        return;
                    }
                    let due = self.txns.poll(now);
                    for bytes in due.resend {
                        self.send_to_pbx(&bytes).await;
                    }
                    for purpose in due.expired {
                        self.on_txn_timeout(now, purpose).await;
                    }
                }
            }
        }
    }

    async fn on_inbound(&mut self, item: Inbound) -> Result<(), SipError> {
        match item {
            Inbound::Oversize => {
                metrics::counter!("callbridge_sip_malformed_total", "what" => "oversize").increment(1);
                warn!(max = self.settings.max_message_bytes, "oversized SIP message dropped");
            }
            Inbound::Connected(tx) => {
                info!(pbx = %self.pbx_addr, "TCP connection to the PBX up");
                let now = Instant::now();
                self.tcp = Some(tx);
                if self.connected_before {
                    // Requests and NOTIFYs of the old connection are lost,
                    // and the PBX may have restarted: check every subscription.
                    self.resync(now, Resync::Reconnected);
                }
                self.connected_before = true;
                self.options_at = now;
            }
            Inbound::Disconnected => {
                warn!(pbx = %self.pbx_addr, "TCP connection to the PBX lost");
                self.tcp = None;
            }
            Inbound::Bytes(bytes, reply) => self.on_bytes(&bytes, reply).await?,
        }
        Ok(())
    }

    async fn on_bytes(&mut self, bytes: &[u8], reply: Reply) -> Result<(), SipError> {
        let msg = match Message::parse(bytes, self.settings.max_message_bytes) {
            Ok(m) => m,
            Err(e) => {
                metrics::counter!("callbridge_sip_malformed_total", "what" => "sip").increment(1);
                warn!(error = %e, "malformed SIP message");
                if let Some(l) = Lenient::scan(bytes) {
                    if !l.method.eq_ignore_ascii_case("ACK") {
                        self.reply(&reply, l.bad_request()).await;
                    }
                }
                return Ok(());
            }
        };
        let kind = match msg.method().as_deref() {
            None => "response",
            Some("NOTIFY") => "notify",
            Some("OPTIONS") => "options",
            Some(_) => "other",
        };
        metrics::counter!("callbridge_sip_messages_received_total", "kind" => kind).increment(1);
        if msg.is_request() {
            self.on_request(&msg, reply).await
        } else {
            self.on_response(&msg).await;
            Ok(())
        }
    }

    async fn on_response(&mut self, msg: &Message) {
        let now = Instant::now();
        let (Some(branch), Some(status), Some(cseq)) = (msg.branch(), msg.status(), msg.cseq()) else { return };
        let (purpose, elapsed) = match self.txns.on_response(branch, status, now) {
            Matched::Unknown => {
                debug!(status, "response to no pending request");
                return;
            }
            Matched::Provisional => return,
            Matched::Final { purpose, elapsed } => (purpose, elapsed),
        };
        match purpose {
            Purpose::Options => {
                let server = msg.header(Name::Server).or_else(|| msg.header(Name::UserAgent));
                let answer = (status, server.map(|s| crate::text::shorten_owned(s.to_string(), 120)));
                let changed = self.options_answer.as_ref().is_some_and(|before| *before != answer);
                if changed {
                    info!(pbx = %self.pbx_addr, status, server = ?answer.1, "the PBX answers OPTIONS differently");
                }
                self.options_answer = Some(answer);
                if self.set_reachable(true, Some(elapsed), now) {
                    // Back after a silence: what it left unanswered goes again now.
                    for bytes in self.txns.resend_all(now) {
                        self.send_to_pbx(&bytes).await;
                    }
                } else if changed {
                    self.resync(now, Resync::OptionsChanged);
                }
            }
            Purpose::Subscribe { agent, .. } => {
                let r = subscription::Response {
                    status,
                    cseq: cseq.seq,
                    to_tag: msg.to_tag(),
                    expires: msg.expires(),
                    contact: msg.contact_uri(),
                    www_authenticate: msg.header(Name::WwwAuthenticate),
                    proxy_authenticate: msg.header(Name::ProxyAuthenticate),
                    min_expires: msg.header(Name::MinExpires).and_then(|v| v.trim().parse().ok()),
                    retry_after: msg
                        .header(Name::RetryAfter)
                        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()),
                };
                let Some(line) = self.lines.get_mut(agent) else { return };
                let closing = line.sub.is_closing();
                let next = line.sub.on_response(now, &r, jitter());
                let lost = status == 481 && next.as_ref().is_some_and(|n| n.fresh);
                if closing {
                    if line.sub.is_closed() {
                        debug!(extension = %line.extension, status, "unsubscribed");
                    }
                } else if lost {
                    info!(extension = %line.extension, "the PBX no longer knows the subscription (restarted?); subscribing anew");
                    metrics::counter!("callbridge_sip_subscription_failures_total", "reason" => "terminated")
                        .increment(1);
                } else if let Some(why) = line.sub.last_failure().filter(|_| next.is_none() && !line.sub.is_active()) {
                    warn!(extension = %line.extension, status, reason = why.as_str(), "SUBSCRIBE failed; retrying with backoff");
                    metrics::counter!("callbridge_sip_subscription_failures_total", "reason" => why.as_str())
                        .increment(1);
                } else if line.sub.is_active() && (200..300).contains(&status) {
                    debug!(extension = %line.extension, "subscription active");
                }
                if let Some(req) = next {
                    self.send_subscribe(agent, req, now).await;
                }
                self.update_active();
                if lost {
                    self.resync(now, Resync::Lost);
                }
            }
        }
    }

    async fn on_request(&mut self, msg: &Message, reply: Reply) -> Result<(), SipError> {
        let method = msg.method().unwrap_or_default();
        let allow = [("Allow", "NOTIFY, OPTIONS")];
        let bytes = match method.as_str() {
            "NOTIFY" => return self.on_notify(msg, reply).await,
            "ACK" => return Ok(()),
            "OPTIONS" => msg.response(
                200,
                "OK",
                &token(12),
                &[("Allow", "NOTIFY, OPTIONS"), ("Accept", "application/dialog-info+xml"), ("Allow-Events", "dialog")],
            ),
            "BYE" | "CANCEL" => msg.response(481, "Call/Transaction Does Not Exist", &token(12), &[]),
            _ => msg.response(405, "Method Not Allowed", &token(12), &allow),
        };
        self.reply(&reply, bytes).await;
        Ok(())
    }

    async fn on_notify(&mut self, msg: &Message, reply: Reply) -> Result<(), SipError> {
        let now = Instant::now();
        let Some(i) = self.lines.iter().position(|l| l.sub.owns(msg.call_id(), msg.to_tag())) else {
            // Not ours (any more): 481 makes the PBX drop that subscription.
            debug!(call_id = msg.call_id(), "NOTIFY for an unknown subscription");
            self.reply(&reply, msg.response(481, "Subscription Does Not Exist", "", &[])).await;
            return Ok(());
        };
        if !msg.event().is_some_and(|e| e.eq_ignore_ascii_case("dialog")) {
            self.reply(&reply, msg.response(489, "Bad Event", "", &[("Allow-Events", "dialog")])).await;
            return Ok(());
        }
        if self.closing {
            // Unsubscribing: the final NOTIFY is acknowledged, not reported.
            // A dialog left without an unsubscribe (its SUBSCRIBE was still
            // unanswered) gets 481, so that the PBX drops it.
            let bytes = if self.lines[i].sub.is_closing() {
                msg.response(200, "OK", "", &[])
            } else {
                msg.response(481, "Subscription Does Not Exist", "", &[])
            };
            self.reply(&reply, bytes).await;
            return Ok(());
        }
        let body = msg.body();
        let doc = if body.iter().all(u8::is_ascii_whitespace) {
            Ok(DialogInfo::parse(b""))
        } else if msg.content_type().as_deref() != Some("application/dialog-info+xml") {
            Err(msg.response(415, "Unsupported Media Type", "", &[("Accept", "application/dialog-info+xml")]))
        } else {
            Ok(DialogInfo::parse(body))
        };
        let doc = match doc {
            Err(bytes) => {
                self.reply(&reply, bytes).await;
                return Ok(());
            }
            Ok(Err(e)) => {
                metrics::counter!("callbridge_sip_malformed_total", "what" => "xml").increment(1);
                warn!(extension = %self.lines[i].extension, error = %e, "malformed dialog-info body");
                self.reply(&reply, msg.response(400, "Bad Request", "", &[])).await;
                return Ok(());
            }
            Ok(Ok(doc)) => doc,
        };
        self.reply(&reply, msg.response(200, "OK", "", &[])).await;
        let mut state = msg.subscription_state();
        if let Some(s) = state.as_mut().filter(|s| s.retry_after.is_none()) {
            // chan_sip puts it in a header of its own (probation, Retry-After: 60).
            s.retry_after =
                msg.header(Name::RetryAfter).and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok());
        }
        let terminated = state.as_ref().filter(|s| s.state == super::message::SubStateValue::Terminated);
        if let Some(s) = terminated {
            warn!(
                extension = %self.lines[i].extension,
                reason = s.reason.as_deref().unwrap_or("none"),
                retry_after = ?s.retry_after,
                "the PBX ended the subscription"
            );
            metrics::counter!("callbridge_sip_subscription_failures_total", "reason" => "terminated").increment(1);
        }
        let line = &mut self.lines[i];
        let next = line.sub.on_notify(now, state.as_ref(), msg.from_tag(), jitter());
        match line.dialogs.apply(doc) {
            Applied::Stale => {}
            applied => {
                if applied == Applied::Gap {
                    debug!(extension = %line.extension, "dialog-info version gap; refreshing for full state");
                    line.sub.refresh_now(now);
                }
                line.tracker.update(wall_micros(), &line.dialogs, &mut self.out);
            }
        }
        if let Some(req) = next {
            info!(extension = %self.lines[i].extension, "re-subscribing at once");
            self.send_subscribe(i, req, now).await;
        }
        self.update_active();
        self.flush_events().await
    }
}

fn header_branch(out: &Outgoing) -> String {
    out.headers
        .iter()
        .find(|(n, _)| *n == Name::Via)
        .and_then(|(_, v)| super::message::header_param(v, "branch"))
        .unwrap_or_default()
        .to_string()
}

/// UDP: one reader task feeding the user agent.
pub(crate) fn spawn_udp_reader(
    socket: Arc<UdpSocket>,
    tx: mpsc::Sender<Inbound>,
    max: usize,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; max + 1];
        loop {
            let received = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = socket.recv_from(&mut buf) => r,
            };
            let item = match received {
                Ok((n, _)) if n > max => Inbound::Oversize,
                Ok((n, from)) => Inbound::Bytes(buf[..n].to_vec(), Reply::Udp(from)),
                Err(e) => {
                    // ICMP errors of earlier sends surface here on some systems.
                    debug!(error = %e, "UDP receive error");
                    continue;
                }
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    })
}

/// Reads one TCP connection into the user agent and writes what the user
/// agent queues for it. Ends when either side closes.
async fn serve_connection(
    stream: TcpStream,
    tx: mpsc::Sender<Inbound>,
    max: usize,
    out_tx: mpsc::Sender<Vec<u8>>,
    mut out_rx: mpsc::Receiver<Vec<u8>>,
) {
    let (read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        while let Some(bytes) = out_rx.recv().await {
            if write.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut frames = FramedRead::new(read, SipCodec::new(max));
    while let Some(item) = frames.next().await {
        let item = match item {
            Ok(Framed::Message(bytes)) => Inbound::Bytes(bytes.to_vec(), Reply::Tcp(out_tx.clone())),
            Ok(Framed::Skipped(_)) => Inbound::Oversize,
            Err(e) => {
                metrics::counter!("callbridge_sip_malformed_total", "what" => "sip").increment(1);
                warn!(error = %e, "SIP stream unusable; closing the connection");
                break;
            }
        };
        if tx.send(item).await.is_err() {
            break;
        }
    }
    writer.abort();
}

/// TCP: keeps one connection to the PBX (reconnecting with backoff) and
/// serves connections the PBX opens to `listener`.
pub(crate) fn spawn_tcp(
    pbx: SocketAddr,
    listener: TcpListener,
    tx: mpsc::Sender<Inbound>,
    settings: &SipSettings,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let max = settings.max_message_bytes;
    let connect_timeout = settings.request_timeout;
    let retry_max = settings.retry_max;
    let accept_tx = tx.clone();
    let accept_shutdown = shutdown.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INBOUND_TCP));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = accept_shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((stream, peer)) = accepted else { continue };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                warn!(%peer, "too many inbound SIP/TCP connections; refusing one");
                continue;
            };
            let tx = accept_tx.clone();
            let shutdown = accept_shutdown.clone();
            tokio::spawn(async move {
                let (out_tx, out_rx) = mpsc::channel(TCP_OUT_CAPACITY);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = serve_connection(stream, tx, max, out_tx, out_rx) => {}
                }
                drop(permit);
            });
        }
    });
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = tokio::time::timeout(connect_timeout, TcpStream::connect(pbx)) => c,
            };
            match connected {
                Ok(Ok(stream)) => {
                    failures = 0;
                    let _ = stream.set_nodelay(true);
                    let (out_tx, out_rx) = mpsc::channel(TCP_OUT_CAPACITY);
                    if tx.send(Inbound::Connected(out_tx.clone())).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = serve_connection(stream, tx.clone(), max, out_tx, out_rx) => {}
                    }
                    if tx.send(Inbound::Disconnected).await.is_err() {
                        return;
                    }
                }
                Ok(Err(e)) => debug!(error = %e, %pbx, "TCP connect failed"),
                Err(_) => debug!(%pbx, "TCP connect timed out"),
            }
            failures = failures.saturating_add(1);
            let delay = subscription::backoff(failures, retry_max, jitter());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    })
}
