//! The API's HTTP server: a bounded accept loop over hyper, in place of
//! `axum::serve`, which has no header-read or idle timeout and no cap on
//! connections (1,100 idle sockets used to exhaust the daemon's file
//! descriptors: `/healthz` timed out and AMI reconnects failed).
//!
//! - At most `max_connections` connections are open at once. When a new
//!   one arrives at the cap, the oldest connection with no request in
//!   progress is closed to make room (idle sockets cannot starve real
//!   clients); if every connection is busy, accepting waits.
//! - A connection must send a complete request head within
//!   `header_read_timeout` of being accepted, and between requests it may
//!   stay idle for `idle_timeout`; then it is closed.
//! - An accept error (e.g. `EMFILE`) is logged once per streak and
//!   followed by a short pause, never a busy loop.
//! - On shutdown, accepting stops and every connection finishes its
//!   request in progress, then closes.
//!
//! - A request is in progress until its response body has been sent (or
//!   dropped), not only until its handler returns: a long response (the
//!   event stream) keeps its connection busy, never idle.
//! - A handler may close its connection at once, without the graceful
//!   close, through the [`CloseConnection`] request extension: the event
//!   stream does so for a client too slow to read, whose socket buffers are
//!   full and whose response body hyper therefore no longer polls.
//!
//! Closing is otherwise hyper's graceful close (a response being written
//! is finished first), forced after [`CLOSE_GRACE`].

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, error, info, warn};

/// How long a closing connection may take to finish what it is writing.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of file descriptors, etc.).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// One open connection, as the accept loop and the connection task see it.
struct Conn {
    /// Requests whose handler has not returned yet.
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last handler return (0: none yet).
    last_done_ms: AtomicU64,
    /// Asks the connection to close (eviction or shutdown).
    close: Notify,
    /// Asks the connection to close now, dropping what is being written.
    close_now: Arc<Notify>,
}

/// A request extension: closes the request's connection at once (what is
/// being written is dropped). Absent when the router is called without
/// this server (tests calling it in process).
#[derive(Clone)]
pub struct CloseConnection(Arc<Notify>);

impl CloseConnection {
    pub fn now(&self) {
        self.0.notify_one();
    }
}

/// Counts a request as in progress until dropped (with its response body).
struct InFlight {
    conn: Arc<Conn>,
    epoch: Instant,
}

impl InFlight {
    fn new(conn: Arc<Conn>, epoch: Instant) -> InFlight {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight { conn, epoch }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.last_done_ms.store(millis_since(self.epoch).max(1), Ordering::Release);
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`InFlight`] until it ends.
struct Tracked {
    body: axum::body::Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The open connections by accept order (oldest first).
#[derive(Default)]
struct Conns {
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        // Every mutation is a single insert/remove: a poisoned map is consistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
            close: Notify::new(),
            close_now: Arc::new(Notify::new()),
        });
        self.lock().insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Asks the oldest connection without a request in progress to close;
    /// false if every connection is busy.
    fn evict_oldest_idle(&self) -> bool {
        let open = self.lock();
        let victim = open.values().find(|c| c.in_flight.load(Ordering::Acquire) == 0);
        victim.map(|c| c.close.notify_one()).is_some()
    }

    fn close_all(&self) {
        for c in self.lock().values() {
            c.close.notify_one();
        }
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown`.
pub fn serve(listener: TcpListener, app: Router, limits: ServeLimits, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let conns = Arc::new(Conns::default());
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        let builder = Arc::new(builder);
        let epoch = Instant::now();
        while let Some((stream, permit)) = accept(&listener, &permits, &conns, &shutdown).await {
            let (id, conn) = conns.add();
            let task = connection(stream, app.clone(), builder.clone(), conn, limits, epoch, shutdown.clone());
            let conns = conns.clone();
            tracker.spawn(async move {
                task.await;
                conns.remove(id);
                drop(permit);
            });
        }
        conns.close_all();
        tracker.close();
        tracker.wait().await;
    })
}

/// The next connection with its permit, or `None` on shutdown.
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    conns: &Conns,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => return None,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if !failing {
                    error!(error = %e, "HTTP API cannot accept connections (retrying every 100 ms; see LimitNOFILE and [api] max_connections)");
                    failing = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    _ = shutdown.cancelled() => return None,
                }
            }
        };
        if failing {
            info!("HTTP API accepts connections again");
        }
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !conns.evict_oldest_idle() {
                    debug!("HTTP API at max_connections with every connection busy; waiting");
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => p.ok()?,
                    _ = shutdown.cancelled() => return None,
                }
            }
        };
        return Some((stream, permit));
    }
}

/// Runs one connection until it ends, times out or is asked to close.
async fn connection(
    stream: TcpStream,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    conn: Arc<Conn>,
    limits: ServeLimits,
    epoch: Instant,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let accepted_ms = millis_since(epoch);
    let tracked = conn.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let app = app.clone();
        let in_flight = InFlight::new(tracked.clone(), epoch);
        req.extensions_mut().insert(CloseConnection(tracked.close_now.clone()));
        async move {
            let response = app.oneshot(req.map(axum::body::Body::new)).await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| Tracked { body, _in_flight: in_flight }))
        }
    });
    let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(served);
    loop {
        let deadline = idle_deadline(&conn, limits, epoch, accepted_ms);
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                if conn.in_flight.load(Ordering::Acquire) > 0 || Instant::now() < idle_deadline(&conn, limits, epoch, accepted_ms) {
                    continue;
                }
            }
            _ = conn.close.notified() => {}
            _ = conn.close_now.notified() => return,
            _ = shutdown.cancelled() => {}
        }
        served.as_mut().graceful_shutdown();
        if tokio::time::timeout(CLOSE_GRACE, served.as_mut()).await.is_err() {
            warn!("HTTP connection did not close within {CLOSE_GRACE:?}; dropped");
        }
        return;
    }
}

/// When the connection has been idle too long: `header_read_timeout` after
/// the accept until a first request is answered, `idle_timeout` after the
/// last answer. While a request is in progress the check is re-armed.
fn idle_deadline(conn: &Conn, limits: ServeLimits, epoch: Instant, accepted_ms: u64) -> Instant {
    let last = conn.last_done_ms.load(Ordering::Acquire);
    let (since, wait) = if last == 0 { (accepted_ms, limits.header_read_timeout) } else { (last, limits.idle_timeout) };
    let deadline = epoch + Duration::from_millis(since) + wait;
    if conn.in_flight.load(Ordering::Acquire) > 0 {
        deadline.max(Instant::now() + wait)
    } else {
        deadline
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}
