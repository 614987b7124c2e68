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
//! client). Which frame answers which action, list draining, late replies,
//! timeouts and the resync listings are the `Correlator`'s (a pure state
//! machine, `correlation.rs`); this loop only feeds it frames and instants
//! and carries out what it returns.
//!
//! # Guarantees
//!
//! - **No event is dropped by the client.** The events channel is bounded;
//!   when it is full the reader waits (backpressure up to the PBX's socket).
//!   The keepalive counts only time spent listening: after a wait, a `Ping`
//!   whose reply is still queued behind unread events gets a full
//!   `action_timeout` from the last frame read, so a slow pipeline
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
//! never interpret events (that is the normalizer's), never decide which
//! action a frame answers (that is the correlator's), never log a secret and
//! never drop an event because a consumer is slow.

use super::action::{Action, EncodeError};
use super::codec::AmiMessage;
use super::correlation::{ActionIds, Answered, Correlator, Expect, KeepaliveLost, Output, MAX_IN_FLIGHT};
use super::frame::Frame;
use super::login::{Conn, MalformedLog, Opener};
use super::settings::ClientSettings;
use super::transport::Transport;
use crate::backoff::{Backoff, Jitter, Retries};
use futures::FutureExt;
use futures::{SinkExt, StreamExt};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use super::error::{ActionError, AmiError};
pub use super::handle::{AmiHandle, ConnectionState, ListResponse, Resync, SourceItem};
use super::handle::{Reply, Request};

/// Capacity of the handle → connection queue.
const REQUEST_QUEUE: usize = 64;
/// First reconnect delay ceiling (capped by `reconnect_max`).
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// A connection that stayed logged in this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// Frames handled in one go before the connection task looks at its
/// actions, timers and shutdown again.
const BURST: usize = 64;

/// Starts the AMI client. `events` should be created with
/// `settings.event_queue_capacity`; a full channel makes the reader wait.
/// The task ends with `Ok(())` when `shutdown` is cancelled, or with a fatal
/// [`AmiError`] (invalid settings, bad credentials, closed events channel).
pub fn spawn(
    settings: ClientSettings,
    events: mpsc::Sender<SourceItem>,
    shutdown: CancellationToken,
) -> (AmiHandle, JoinHandle<Result<(), AmiError>>) {
    let (req_tx, req_rx) = mpsc::channel(REQUEST_QUEUE);
    let (state_tx, state_rx) = watch::channel(ConnectionState::Disconnected);
    let handle = AmiHandle { requests: req_tx, state: state_rx };
    let task = tokio::spawn(run(settings, events, req_rx, state_tx, shutdown));
    (handle, task)
}

async fn run(
    settings: ClientSettings,
    events: mpsc::Sender<SourceItem>,
    mut requests: mpsc::Receiver<Request>,
    state: watch::Sender<ConnectionState>,
    shutdown: CancellationToken,
) -> Result<(), AmiError> {
    let result = match Client::new(settings, events, shutdown) {
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

type ReplyTx = oneshot::Sender<Result<Frame, ActionError>>;
type ListTx = oneshot::Sender<Result<ListResponse, ActionError>>;
type Expecting = Expect<ReplyTx, ListTx>;

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

/// Adds an answered action to the action duration histogram.
pub(super) fn record_duration(a: Answered) {
    metrics::histogram!("callbridge_ami_action_duration_seconds", "action" => a.label).record(a.elapsed.as_secs_f64());
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
    settings: ClientSettings,
    transport: Transport,
    events: mpsc::Sender<SourceItem>,
    shutdown: CancellationToken,
    ids: ActionIds,
    malformed: MalformedLog,
    frames_received: metrics::Counter,
    bytes_received: metrics::Counter,
}

/// Per connection: the socket, what awaits an answer, and the timer.
struct Session {
    conn: Conn,
    book: Correlator<ReplyTx, ListTx>,
    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
}

impl Session {
    fn set_timer(&mut self, at: Instant) {
        self.timer_at = at;
        self.timer.as_mut().reset(at.into());
    }
}

impl Client {
    fn new(
        settings: ClientSettings,
        events: mpsc::Sender<SourceItem>,
        shutdown: CancellationToken,
    ) -> Result<Client, AmiError> {
        settings.validate()?;
        let transport = settings.transport()?;
        Ok(Client {
            settings,
            transport,
            events,
            shutdown,
            ids: ActionIds::default(),
            malformed: MalformedLog::default(),
            frames_received: metrics::counter!("callbridge_ami_frames_received_total"),
            bytes_received: metrics::counter!("callbridge_ami_bytes_received_total"),
        })
    }

    async fn supervise(
        &mut self,
        requests: &mut mpsc::Receiver<Request>,
        state: &watch::Sender<ConnectionState>,
    ) -> Result<(), AmiError> {
        let initial = INITIAL_BACKOFF.min(self.settings.reconnect_max);
        let mut backoff = Retries::new(
            Backoff::try_new(initial, self.settings.reconnect_max, Jitter::Full).map_err(AmiError::InvalidBackoff)?,
        );
        let mut was_connected = false;
        loop {
            let shutdown = self.shutdown.clone();
            metrics::counter!("callbridge_ami_connect_attempts_total").increment(1);
            let attempt = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                r = self.opener().establish() => r,
            };
            let failure = match attempt {
                Ok((conn, banner)) => {
                    if was_connected {
                        metrics::counter!("callbridge_ami_reconnects_total").increment(1);
                    }
                    was_connected = true;
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

    /// Borrows what opening a session needs.
    fn opener(&mut self) -> Opener<'_> {
        Opener {
            settings: &self.settings,
            transport: &self.transport,
            ids: &mut self.ids,
            malformed: &mut self.malformed,
            received: self.bytes_received.clone(),
        }
    }

    /// Serves a logged-in connection until it ends.
    async fn serve(&mut self, conn: Conn, banner: String, requests: &mut mpsc::Receiver<Request>) -> End {
        let now = Instant::now();
        let first = now + self.settings.ping_interval;
        let mut s = Session {
            conn,
            book: Correlator::new(now, self.settings.action_timeout, self.settings.ping_interval),
            timer: Box::pin(tokio::time::sleep_until(first.into())),
            timer_at: first,
        };
        let end = match self.serve_inner(&mut s, banner, requests).await {
            Ok(()) => End::Shutdown,
            Err(end) => end,
        };
        for output in s.book.close() {
            answer(output);
        }
        // Actions queued while the connection died will not be answered.
        while let Ok(r) = requests.try_recv() {
            r.reply.fail(ActionError::ConnectionLost { action: r.action.name().to_string() });
        }
        if matches!(end, End::Shutdown) {
            // Polite goodbye; the PBX may already be gone.
            let logoff = Action::new("Logoff").with_action_id(self.ids.next());
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
        for (action, expect) in s.book.begin_resync() {
            self.start(s, action, expect).await?;
        }
        let mut requests_open = true;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                r = requests.recv(), if requests_open => match r {
                    Some(Request { action, reply }) => {
                        let expect = match reply {
                            Reply::Single(tx) => Expect::Reply(tx),
                            Reply::List(tx) => Expect::List(tx),
                        };
                        self.start(s, action, expect).await?;
                    }
                    // Every handle is gone: keep streaming events.
                    None => requests_open = false,
                },
                m = s.conn.next() => {
                    // One clock read for the burst: what an action's answer
                    // took is measured to its start, and the PBX counts as
                    // heard when the burst is delivered.
                    let now = Instant::now();
                    match m {
                        Some(Ok(m)) => self.on_message(s, m, now).await?,
                        Some(Err(e)) => return Err(AmiError::Io(e).into()),
                        None => return Err(AmiError::Closed.into()),
                    }
                    // Frames already buffered (or readable without waiting)
                    // are handled here, without a round through `select!`:
                    // at event bursts that is most of the per-frame cost.
                    // Bounded, so actions and timers wait at most this many.
                    for _ in 0..BURST {
                        match s.conn.next().now_or_never() {
                            Some(Some(Ok(m))) => self.on_message(s, m, now).await?,
                            Some(Some(Err(e))) => return Err(AmiError::Io(e).into()),
                            Some(None) => return Err(AmiError::Closed.into()),
                            None => break,
                        }
                    }
                    // Taken after delivering: time spent waiting on a full
                    // events channel is ours, not the PBX's silence (see
                    // `Correlator::on_timer`).
                    s.book.heard(Instant::now());
                }
                _ = &mut s.timer => self.on_timer(s).await?,
            }
        }
    }

    /// Writes an action and registers what awaits its answer.
    async fn start(&mut self, s: &mut Session, action: Action, expect: Expecting) -> Result<(), End> {
        let name = action.name().to_string();
        if expect.is_caller() && s.book.is_full() {
            refuse(expect, ActionError::Busy(MAX_IN_FLIGHT));
            return Ok(());
        }
        let id = self.ids.next();
        let timeout = self.settings.action_timeout;
        let written = tokio::time::timeout(timeout, s.conn.send(action.with_action_id(id.clone()))).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(EncodeError::Invalid(e))) => {
                // Handles validate before queueing; kept for internal actions.
                refuse(expect, ActionError::Invalid(e));
                return Ok(());
            }
            Ok(Err(EncodeError::Io(e))) => {
                refuse(expect, ActionError::ConnectionLost { action: name });
                return Err(AmiError::Io(e).into());
            }
            Err(_) => {
                refuse(expect, ActionError::ConnectionLost { action: name });
                return Err(AmiError::WriteTimeout(timeout).into());
            }
        }
        let label = action_label(&name);
        let deadline = s.book.register(id, name, label, expect, Instant::now());
        if deadline < s.timer_at {
            s.set_timer(deadline);
        }
        Ok(())
    }

    async fn on_message(&mut self, s: &mut Session, m: AmiMessage, now: Instant) -> Result<(), End> {
        match m {
            AmiMessage::Frame(f) => {
                self.frames_received.increment(1);
                let routed = s.book.on_frame(f, now);
                if let Some(a) = routed.answered {
                    record_duration(a);
                }
                match routed.output {
                    Some(output) => self.emit(output).await,
                    None => Ok(()),
                }
            }
            AmiMessage::Malformed(m) => {
                self.malformed.record(m);
                Ok(())
            }
            AmiMessage::Banner(b) => {
                debug!(banner = %b, "unexpected AMI banner mid-stream ignored");
                Ok(())
            }
        }
    }

    /// Expires overdue actions and runs the keepalive.
    async fn on_timer(&mut self, s: &mut Session) -> Result<(), End> {
        let now = Instant::now();
        let expired =
            s.book.on_timer(now).map_err(|KeepaliveLost| AmiError::PingTimeout(self.settings.action_timeout))?;
        expired.answered.into_iter().for_each(record_duration);
        for output in expired.outputs {
            self.emit(output).await?;
        }
        if s.book.ping_due(now) {
            self.start(s, Action::new("Ping"), Expect::Keepalive).await?;
        }
        s.set_timer(s.book.next_wakeup(now));
        Ok(())
    }

    /// Carries out one output of the correlator.
    async fn emit(&mut self, output: Output<ReplyTx, ListTx>) -> Result<(), End> {
        match output {
            Output::Event(f) if self.settings.skip.as_ref().is_some_and(|s| s.skips(&f)) => Ok(()),
            Output::Event(f) => self.deliver(SourceItem::Frame(f)).await,
            Output::Resync(r) => self.deliver(SourceItem::Resync(r)).await,
            answer_to_caller => {
                answer(answer_to_caller);
                Ok(())
            }
        }
    }
}

/// Answers a caller (who may have given up: nothing to do then).
fn answer(output: Output<ReplyTx, ListTx>) {
    match output {
        Output::Reply(tx, r) => drop(tx.send(r)),
        Output::List(tx, r) => drop(tx.send(r)),
        Output::Event(_) | Output::Resync(_) => {}
    }
}

/// Fails an action that was not sent.
fn refuse(expect: Expecting, e: ActionError) {
    match expect {
        Expect::Reply(tx) => drop(tx.send(Err(e))),
        Expect::List(tx) => drop(tx.send(Err(e))),
        Expect::Resync(part) => warn!(error = %e, ?part, "resync action not sent"),
        Expect::Keepalive => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_labels_are_a_fixed_set() {
        assert_eq!(action_label("coreshowchannels"), "CoreShowChannels");
        assert_eq!(action_label("Ping"), "Ping");
        assert_eq!(action_label("SomethingFromAnApiCaller"), "other");
    }
}
