//! Sinks deliver the outbox's events to the helpdesk (SPEC §6): the delivery
//! runner here, one module per destination (`webhook`, `zammad`, `jsonl`,
//! `nats`),
//! and the Standard Webhooks signature (`signature`).
//!
//! One runner per configured sink reads that sink's queue in the outbox in
//! order and keeps **per ordering key** order (a call's events, or one
//! agent's) while different keys proceed in parallel, up to the sink's
//! `concurrency`: a key whose request is being retried holds back only that
//! key (and, with batching, the keys that share its batch). Outcomes:
//!
//! - acknowledged (2xx, or written for JSON lines): acked in the outbox;
//! - 408, 429, 5xx, network errors, timeouts: retried with capped exponential
//!   backoff and jitter ([`retry_policy`]: uniform between half the initial
//!   delay and the current cap, so retries of many calls spread out),
//!   waiting at least what `Retry-After` asks (up to one hour), within the
//!   sink's retry budget (`max_retry_seconds`, a day by default): an event
//!   still refused past it is parked as a dead letter, so one refused event
//!   never wedges its call for ever;
//! - any other 4xx: the event is parked as a dead letter (listed and retried
//!   through [`crate::outbox::Outbox`]); the key's later events go on. A
//!   rejected batch is retried event by event so that only the refused
//!   events are parked.
//!
//! A sink may read more into its destination's answers than the status: the
//! Zammad sink knows which of Zammad's 500s mean "already delivered" or "an
//! unknown call" (see [`zammad`]); [`Sink::deliver`] gets the attempt number
//! for that.
//!
//! A runner holds at most `max_buffered` events of its sink in memory; the
//! rest waits on disk. (So one key with that many undelivered events would
//! hold back reading the others: far beyond any call's event count.)
//! Shutdown cancels requests in flight; their events stay pending and go
//! first on the next start.
//!
//! This module must never acknowledge an event the destination did not
//! accept, never drop one, and never hold a lock across an `.await`.
//!
//! Metrics (labels from fixed sets: `sink` is a configured sink name,
//! `status_class` one of `2xx`, `3xx`, `4xx`, `5xx`, `network`, `timeout`,
//! `io`): `callbridge_sink_requests_total{sink,status_class}`,
//! `callbridge_sink_request_duration_seconds{sink}`,
//! `callbridge_sink_retries_total{sink}`, `callbridge_dead_letters_total{sink}`.

pub mod jsonl;
pub mod nats;
pub mod nats_setup;
pub mod nats_tail;
pub mod redact;
pub mod signature;
pub mod webhook;
pub mod zammad;

use crate::backoff::{Backoff, InvalidBackoff, Jitter};
use crate::config::{Config, SinkConfig};
use crate::outbox::{Outbox, OutboxError, Record};
use rand::Rng;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The longest `Retry-After` honoured; longer requests wait this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What can go wrong building sinks from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sinks[{index}]: two sinks are named {name:?}; give each a distinct `name`")]
    DuplicateName { index: usize, name: String },
    #[error("sinks[{index}] ({name}): {message}")]
    Config { index: usize, name: String, message: String },
    #[error("sinks[{index}] ({name}): cannot build the HTTP client")]
    Client {
        index: usize,
        name: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("sinks[{index}] ({name}): cannot open {path:?}")]
    Open {
        index: usize,
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Label value of `callbridge_sink_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    S2xx,
    S3xx,
    S4xx,
    S5xx,
    Network,
    Timeout,
    Io,
}

impl StatusClass {
    /// Every class, in label order.
    pub const ALL: [StatusClass; 7] = [
        StatusClass::S2xx,
        StatusClass::S3xx,
        StatusClass::S4xx,
        StatusClass::S5xx,
        StatusClass::Network,
        StatusClass::Timeout,
        StatusClass::Io,
    ];

    pub fn of_status(status: u16) -> StatusClass {
        match status {
            200..=299 => StatusClass::S2xx,
            300..=399 => StatusClass::S3xx,
            400..=499 => StatusClass::S4xx,
            _ => StatusClass::S5xx,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::S2xx => "2xx",
            StatusClass::S3xx => "3xx",
            StatusClass::S4xx => "4xx",
            StatusClass::S5xx => "5xx",
            StatusClass::Network => "network",
            StatusClass::Timeout => "timeout",
            StatusClass::Io => "io",
        }
    }
}

/// The result of one delivery attempt of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// The destination accepted every event of the batch.
    Delivered,
    /// The sink has nothing to send for these events (e.g. Zammad has no CTI
    /// event for `call.queued`): acknowledged without a request.
    Skipped,
    /// Try again later (408, 429, 5xx, network, timeout, I/O).
    Retry { class: StatusClass, retry_after: Option<Duration>, detail: String },
    /// Refused for good: park as dead letter.
    Reject { status: Option<u16>, detail: String },
}

/// Classifies an HTTP status as the delivery rules say (SPEC §6).
pub fn classify_status(status: u16, retry_after: Option<Duration>, detail: impl FnOnce() -> String) -> Attempt {
    match status {
        200..=299 => Attempt::Delivered,
        408 | 429 | 500..=599 => {
            Attempt::Retry { class: StatusClass::of_status(status), retry_after, detail: detail() }
        }
        _ => Attempt::Reject { status: Some(status), detail: detail() },
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = jiff::fmt::rfc2822::DateTimeParser::new().parse_timestamp(v).ok()?;
    let now = jiff::Timestamp::now();
    let secs = when.as_second() - now.as_second();
    Some(Duration::from_secs(secs.max(0) as u64))
}

/// A sink's retry backoff: capped exponential, [`Jitter::Wide`] (uniform
/// between half the initial delay and the current ceiling, so retries of
/// many calls spread out).
pub fn retry_policy(initial: Duration, max: Duration) -> Result<Backoff, String> {
    Backoff::try_new(initial, max, Jitter::Wide).map_err(|e| match e {
        InvalidBackoff::ZeroInitial => "the initial backoff must be positive".to_string(),
        InvalidBackoff::MaxBelowInitial { initial, max } => {
            format!("max_backoff_seconds ({max:?}) is below the initial backoff ({initial:?})")
        }
    })
}

/// Delay before retry number `attempt` (0 = first retry): the policy's
/// delay, and never less than `retry_after` (itself capped at
/// [`MAX_RETRY_AFTER`]).
pub fn retry_delay(policy: &Backoff, attempt: u32, retry_after: Option<Duration>, rng: &mut impl Rng) -> Duration {
    let jittered = policy.delay(attempt, rng);
    match retry_after {
        Some(ra) => jittered.max(ra.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// A destination of events.
pub trait Sink: Send + Sync + 'static {
    /// The configured name: the outbox queue and the `sink` metric label.
    fn name(&self) -> &Arc<str>;
    /// Most events in one attempt.
    fn batch_size(&self) -> usize {
        1
    }
    /// Attempts in flight at once (different ordering keys).
    fn concurrency(&self) -> usize;
    fn retry_policy(&self) -> Backoff;
    /// How long one event may be retried before it is parked as a dead
    /// letter (listed and retried through the API); `None`: for ever.
    fn retry_budget(&self) -> Option<Duration> {
        None
    }
    /// One attempt; the runner retries. Events of one key appear in order.
    /// `attempt` counts the earlier attempts of this batch (0 for the
    /// first), for a sink whose destination's answers mean something else
    /// once repeated (Zammad: an unknown call).
    fn deliver(&self, batch: &[Record], attempt: u32) -> impl Future<Output = Attempt> + Send;
}

/// Tuning of the runners.
#[derive(Debug, Clone, Copy)]
pub struct RunnerOptions {
    /// Events of one sink held in memory at most (read ahead of delivery);
    /// beyond it the runner waits and the rest stays on disk.
    pub max_buffered: usize,
    /// Events read from the outbox per query at most.
    pub fetch_limit: usize,
    /// How often the outbox gauges (depth, oldest age) are refreshed.
    pub gauge_interval: Duration,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        RunnerOptions { max_buffered: 10_000, fetch_limit: 1_000, gauge_interval: Duration::from_secs(1) }
    }
}

/// The running sinks, one runner each. Dropping it does not stop them: call
/// [`Runners::shutdown`].
pub struct Runners {
    outbox: Outbox,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    opts: RunnerOptions,
    /// When set, the runners deliver only while it is open (a hot
    /// standby's lease, see `crate::ha`).
    gate: Option<watch::Receiver<bool>>,
}

impl Runners {
    /// Starts the gauge refresher; add sinks with [`Runners::spawn`].
    pub fn new(outbox: &Outbox, opts: RunnerOptions) -> Runners {
        let cancel = CancellationToken::new();
        let gauges = {
            let outbox = outbox.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(opts.gauge_interval);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tick.tick() => outbox.refresh_gauges().await,
                    }
                }
            })
        };
        Runners { outbox: outbox.clone(), cancel, tasks: vec![gauges], opts, gate: None }
    }

    /// The runners spawned from now on deliver only while `gate` is open:
    /// closing it stops them at once (requests in flight are abandoned,
    /// their events stay pending); opening it starts them again from what
    /// the outbox holds then.
    pub fn with_gate(mut self, gate: watch::Receiver<bool>) -> Runners {
        self.gate = Some(gate);
        self
    }

    /// Starts the runner of one sink: it delivers what its queue already
    /// holds (undelivered events of earlier runs) first, in order.
    pub fn spawn<S: Sink>(&mut self, sink: Arc<S>) {
        let (outbox, cancel, opts) = (self.outbox.clone(), self.cancel.child_token(), self.opts);
        let task = match self.gate.clone() {
            None => tokio::spawn(run_sink(outbox, sink, cancel, opts)),
            Some(gate) => tokio::spawn(run_gated(outbox, sink, cancel, opts, gate)),
        };
        self.tasks.push(task);
    }

    /// Whether the runners deliver now (always, without a gate).
    pub fn delivering(&self) -> bool {
        self.gate.as_ref().is_none_or(|g| *g.borrow())
    }

    /// Starts every sink of the configuration.
    pub fn spawn_configured(&mut self, sinks: Vec<ConfiguredSink>) {
        for s in sinks {
            match s {
                ConfiguredSink::Webhook(s) => self.spawn(s),
                ConfiguredSink::Zammad(s) => self.spawn(s),
                ConfiguredSink::Jsonl(s) => self.spawn(s),
                ConfiguredSink::Nats(s) => self.spawn(s),
            }
        }
    }

    /// Stops the runners (requests in flight are abandoned: their events stay
    /// pending and go first next time) and commits every acknowledgement.
    pub async fn shutdown(self) -> Result<(), OutboxError> {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.outbox.flush().await?;
        self.outbox.refresh_gauges().await;
        Ok(())
    }
}

/// A sink built from `[[sinks]]`.
pub enum ConfiguredSink {
    Webhook(Arc<webhook::WebhookSink>),
    Zammad(Arc<zammad::ZammadSink>),
    Jsonl(Arc<jsonl::JsonlSink>),
    Nats(Arc<nats::NatsSink>),
}

/// The name of each `[[sinks]]` entry (`name`, or the type); an error when
/// two coincide.
pub fn sink_names(config: &Config) -> Result<Vec<String>, SinkError> {
    let mut names: Vec<String> = Vec::new();
    for (index, s) in config.sinks.iter().enumerate() {
        let name = match s {
            SinkConfig::Jsonl { name, .. } => name.clone().unwrap_or_else(|| "jsonl".into()),
            SinkConfig::Webhook { name, .. } => name.clone().unwrap_or_else(|| "webhook".into()),
            SinkConfig::Zammad { name, .. } => name.clone().unwrap_or_else(|| "zammad".into()),
            SinkConfig::Nats { name, .. } => name.clone().unwrap_or_else(|| "nats".into()),
        };
        if names.contains(&name) {
            return Err(SinkError::DuplicateName { index, name });
        }
        names.push(name);
    }
    Ok(names)
}

/// True when the configuration only asks for JSON lines on stdout (the
/// replay default, which needs no outbox).
pub fn only_stdout(config: &Config) -> bool {
    config.sinks.iter().all(|s| matches!(s, SinkConfig::Jsonl { path, .. } if path == "-"))
}

/// What sinks may ask of the rest of callbridge, handed in by the wiring.
#[derive(Clone, Default)]
pub struct SinkContext {
    /// Hangs up a caller the helpdesk rejects (the Zammad sink with
    /// `honour_reject`); `None` where there is no PBX (a replay).
    pub blocker: Option<Arc<dyn zammad::CallBlocker>>,
    /// Deliver only while this is open (a hot standby; see
    /// [`Runners::with_gate`]); `None`: always.
    pub gate: Option<watch::Receiver<bool>>,
}

/// Builds every configured sink (resolving secrets; never logging them).
pub fn build_sinks(config: &Config, ctx: &SinkContext) -> Result<Vec<ConfiguredSink>, SinkError> {
    let names = sink_names(config)?;
    let mut out = Vec::new();
    for (index, (s, name)) in config.sinks.iter().zip(names).enumerate() {
        out.push(match s {
            SinkConfig::Jsonl { path, .. } => ConfiguredSink::Jsonl(Arc::new(
                jsonl::JsonlSink::open(&name, path).map_err(|source| SinkError::Open {
                    index,
                    name,
                    path: path.clone(),
                    source,
                })?,
            )),
            SinkConfig::Webhook { .. } => {
                ConfiguredSink::Webhook(Arc::new(webhook::WebhookSink::from_config(index, &name, s)?))
            }
            SinkConfig::Zammad { .. } => {
                let blocker = ctx.blocker.clone();
                ConfiguredSink::Zammad(Arc::new(zammad::ZammadSink::from_config(index, &name, s, config, blocker)?))
            }
            SinkConfig::Nats { .. } => {
                ConfiguredSink::Nats(Arc::new(nats::NatsSink::from_config(index, &name, config, s)?))
            }
        });
    }
    Ok(out)
}

/// Metric handles of one sink, registered once (the hot path only
/// increments). Created when the runner starts: install the metrics
/// recorder before starting sinks.
struct SinkMetrics {
    requests: [metrics::Counter; 7],
    duration: metrics::Histogram,
    retries: metrics::Counter,
    dead_letters: metrics::Counter,
}

impl SinkMetrics {
    fn new(sink: &str) -> SinkMetrics {
        let s = sink.to_string();
        SinkMetrics {
            requests: StatusClass::ALL.map(|c| {
                metrics::counter!("callbridge_sink_requests_total", "sink" => s.clone(), "status_class" => c.as_str())
            }),
            duration: metrics::histogram!("callbridge_sink_request_duration_seconds", "sink" => s.clone()),
            retries: metrics::counter!("callbridge_sink_retries_total", "sink" => s.clone()),
            dead_letters: metrics::counter!("callbridge_dead_letters_total", "sink" => s),
        }
    }

    fn request(&self, class: StatusClass) -> &metrics::Counter {
        &self.requests[StatusClass::ALL.iter().position(|c| *c == class).unwrap_or(0)]
    }
}

/// Returned by a worker when its batch is finished (delivered, parked or
/// abandoned at shutdown).
struct Done {
    keys: Vec<Arc<str>>,
    count: usize,
}

/// After this long without a success, the destination counts as down:
/// the next success wakes every sleeping retry, and meanwhile one sleeping
/// retry is woken this often as a probe.
const RECOVERY_GAP: Duration = Duration::from_secs(1);
/// Retries woken together wait a random part of this, so that a recovered
/// destination is not hit by all of them in the same instant.
const WAKE_JITTER: Duration = Duration::from_millis(250);

/// What a sink's runner and its workers share about sending.
struct Flow {
    /// Requests in flight at most (`concurrency`). A worker holds a slot
    /// only while its request runs, never while it sleeps in backoff, so
    /// calls being retried never hold back the others.
    slots: Arc<Semaphore>,
    /// Wakes sleeping retries: all of them when the destination answers
    /// again after an outage, one of them per [`RECOVERY_GAP`] as a probe
    /// while it is down.
    wake: Notify,
    sleeping: AtomicUsize,
    last_success: std::sync::Mutex<Instant>,
}

impl Flow {
    fn new(concurrency: usize) -> Flow {
        Flow {
            slots: Arc::new(Semaphore::new(concurrency)),
            wake: Notify::new(),
            sleeping: AtomicUsize::new(0),
            last_success: std::sync::Mutex::new(Instant::now()),
        }
    }

    async fn slot(&self, cancel: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            _ = cancel.cancelled() => None,
            p = self.slots.clone().acquire_owned() => p.ok(),
        }
    }

    /// A request succeeded: after an outage, wake every sleeping retry.
    fn succeeded(&self) {
        let now = Instant::now();
        let gap = {
            let mut last = self.last_success.lock().unwrap_or_else(|p| p.into_inner());
            let gap = now.saturating_duration_since(*last);
            *last = now;
            gap
        };
        if gap > RECOVERY_GAP && self.sleeping.load(Ordering::Relaxed) > 0 {
            self.wake.notify_waiters();
        }
    }

    /// Whether a probe is due: retries are sleeping and nothing succeeded
    /// for [`RECOVERY_GAP`].
    fn probe_due(&self) -> bool {
        self.sleeping.load(Ordering::Relaxed) > 0
            && self.last_success.lock().unwrap_or_else(|p| p.into_inner()).elapsed() > RECOVERY_GAP
    }

    /// Sleeps out a backoff `delay`, or less when woken; false when cancelled.
    async fn backoff(&self, delay: Duration, cancel: &CancellationToken) -> bool {
        self.sleeping.fetch_add(1, Ordering::Relaxed);
        let woken = tokio::select! {
            _ = cancel.cancelled() => None,
            _ = tokio::time::sleep(delay) => Some(false),
            _ = self.wake.notified() => Some(true),
        };
        self.sleeping.fetch_sub(1, Ordering::Relaxed);
        match woken {
            None => false,
            Some(false) => true,
            Some(true) => {
                let jitter = WAKE_JITTER.mul_f64(rand::rng().random::<f64>()).min(delay);
                tokio::select! {
                    _ = cancel.cancelled() => false,
                    _ = tokio::time::sleep(jitter) => true,
                }
            }
        }
    }
}

/// A runner's events read from the outbox and not yet finished, by key.
#[derive(Default)]
struct Lanes {
    /// Per key, the events read but not yet handed to a worker, in order.
    lanes: HashMap<Arc<str>, VecDeque<Record>, ahash::RandomState>,
    /// Keys with a batch in flight: their next events wait.
    busy: HashSet<Arc<str>, ahash::RandomState>,
    /// Keys not busy with events waiting, oldest first.
    ready: VecDeque<Arc<str>>,
    buffered: usize,
    read_pos: i64,
    caught_up: bool,
}

impl Lanes {
    /// Reads the next events of the sink's queue, if there is room.
    /// `committed` is marked seen just before the query, never when no
    /// query runs: a commit seen without being read would wait for the
    /// next one.
    async fn fill(
        &mut self,
        outbox: &Outbox,
        name: &str,
        opts: &RunnerOptions,
        committed: &mut tokio::sync::watch::Receiver<i64>,
    ) -> Result<(), OutboxError> {
        if self.caught_up || self.buffered >= opts.max_buffered {
            return Ok(());
        }
        committed.borrow_and_update();
        let limit = (opts.max_buffered - self.buffered).min(opts.fetch_limit).max(1);
        let records = outbox.pending(name, self.read_pos, limit).await?;
        self.caught_up = records.len() < limit;
        for r in records {
            self.read_pos = r.pos;
            self.buffered += 1;
            let lane = self.lanes.entry(r.key.clone()).or_default();
            if lane.is_empty() && !self.busy.contains(&r.key) {
                self.ready.push_back(r.key.clone());
            }
            lane.push_back(r);
        }
        Ok(())
    }

    /// The next batch of ready keys, marked busy; `None` when none is ready.
    fn next_batch(&mut self, batch_size: usize) -> Option<(Vec<Record>, Vec<Arc<str>>)> {
        let first = self.ready.pop_front()?;
        let (batch, keys) = take_batch(first, batch_size, &mut self.lanes, &mut self.ready);
        self.busy.extend(keys.iter().cloned());
        Some((batch, keys))
    }

    /// A worker finished: its keys' next events become ready.
    fn finish(&mut self, done: Done) {
        self.buffered -= done.count;
        for key in done.keys {
            self.busy.remove(&key);
            if self.lanes.get(&key).is_some_and(|l| !l.is_empty()) {
                self.ready.push_back(key);
            } else {
                self.lanes.remove(&key);
            }
        }
    }
}

/// [`run_sink`] while `gate` is open, stopped (its requests in flight
/// abandoned) as soon as it closes, started again when it opens.
async fn run_gated<S: Sink>(
    outbox: Outbox,
    sink: Arc<S>,
    cancel: CancellationToken,
    opts: RunnerOptions,
    mut gate: watch::Receiver<bool>,
) {
    loop {
        while !*gate.borrow_and_update() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = gate.changed() => if changed.is_err() { return },
            }
        }
        let stint = cancel.child_token();
        let run = run_sink(outbox.clone(), sink.clone(), stint.clone(), opts);
        tokio::pin!(run);
        loop {
            tokio::select! {
                () = &mut run => return,
                changed = gate.changed() => {
                    if changed.is_err() || !*gate.borrow_and_update() {
                        stint.cancel();
                        run.as_mut().await;
                        break;
                    }
                }
            }
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}

async fn run_sink<S: Sink>(outbox: Outbox, sink: Arc<S>, cancel: CancellationToken, opts: RunnerOptions) {
    let name = sink.name().clone();
    let metrics = Arc::new(SinkMetrics::new(&name));
    let batch_size = sink.batch_size().max(1);
    let flow = Arc::new(Flow::new(sink.concurrency().max(1)));
    // Workers, each returning its `Done`; kept in a set so that shutdown
    // waits for them (their acks reach the writer first). At most
    // `concurrency` send at once; the others sleep in backoff, and there
    // are never more than buffered events.
    let mut workers: JoinSet<Done> = JoinSet::new();
    let mut committed = outbox.subscribe();
    let mut lanes = Lanes::default();
    let mut probe = tokio::time::interval(RECOVERY_GAP);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(sink = %name, "delivery started");
    loop {
        if let Err(e) = lanes.fill(&outbox, &name, &opts, &mut committed).await {
            warn!(sink = %name, error = %e, "cannot read the outbox; retrying in 1 s");
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            Ok(slot) = flow.slots.clone().acquire_owned(), if !lanes.ready.is_empty() => {
                let Some((batch, keys)) = lanes.next_batch(batch_size) else { continue };
                let (outbox, sink, name, cancel, m, flow) =
                    (outbox.clone(), sink.clone(), name.clone(), cancel.clone(), metrics.clone(), flow.clone());
                workers.spawn(async move {
                    let count = batch.len();
                    let worker = Worker { outbox: &outbox, sink: &*sink, name: &name, m: &m, flow: &flow, cancel: &cancel };
                    worker.deliver_batch(batch, slot).await;
                    Done { keys, count }
                });
            }
            Some(joined) = workers.join_next(), if !workers.is_empty() => match joined {
                Ok(done) => lanes.finish(done),
                // A worker panicked: its events were neither acked nor
                // parked, so they are delivered again after a restart; its
                // keys stay blocked until then (order is kept).
                Err(e) => warn!(sink = %name, error = %e, "delivery worker failed"),
            },
            changed = committed.changed(), if lanes.caught_up => {
                if changed.is_err() {
                    break;
                }
                lanes.caught_up = false;
            }
            _ = probe.tick() => {
                if flow.probe_due() {
                    flow.wake.notify_one();
                }
            }
        }
    }
    // Workers see the same cancellation; wait until they have handed their
    // acks to the outbox.
    while workers.join_next().await.is_some() {}
    info!(sink = %name, "delivery stopped");
}

/// Takes up to `batch_size` events, starting with key `first` and going on
/// with other ready keys; each key's events stay in order.
fn take_batch(
    first: Arc<str>,
    batch_size: usize,
    lanes: &mut HashMap<Arc<str>, VecDeque<Record>, ahash::RandomState>,
    ready: &mut VecDeque<Arc<str>>,
) -> (Vec<Record>, Vec<Arc<str>>) {
    let mut batch = Vec::with_capacity(batch_size.min(64));
    let mut keys = Vec::new();
    let mut key = first;
    loop {
        if let Some(lane) = lanes.get_mut(&key) {
            while batch.len() < batch_size {
                match lane.pop_front() {
                    Some(r) => batch.push(r),
                    None => break,
                }
            }
        }
        keys.push(key);
        if batch.len() >= batch_size {
            break;
        }
        match ready.pop_front() {
            Some(k) => key = k,
            None => break,
        }
    }
    (batch, keys)
}

enum Final {
    Delivered,
    Rejected { status: Option<u16>, detail: String },
    Cancelled,
}

/// One batch's delivery: the sink, where acknowledgements go, and the
/// runner's shared flow control.
struct Worker<'a, S> {
    outbox: &'a Outbox,
    sink: &'a S,
    name: &'a Arc<str>,
    m: &'a SinkMetrics,
    flow: &'a Flow,
    cancel: &'a CancellationToken,
}

impl<S: Sink> Worker<'_, S> {
    async fn deliver_batch(&self, batch: Vec<Record>, slot: OwnedSemaphorePermit) {
        match self.deliver_with_retry(&batch, Some(slot)).await {
            Final::Delivered => ack(self.outbox, self.name, &batch).await,
            Final::Cancelled => {}
            Final::Rejected { status, detail } if batch.len() == 1 => {
                park(self.outbox, self.name, self.m, &batch[0], status, detail).await
            }
            Final::Rejected { .. } => {
                // Find the refused events: one by one, in order.
                for r in &batch {
                    match self.deliver_with_retry(std::slice::from_ref(r), None).await {
                        Final::Delivered => ack(self.outbox, self.name, std::slice::from_ref(r)).await,
                        Final::Rejected { status, detail } => {
                            park(self.outbox, self.name, self.m, r, status, detail).await
                        }
                        Final::Cancelled => return,
                    }
                }
            }
        }
    }

    /// Attempts until delivered or refused. A slot is held for each attempt
    /// and given back while sleeping in backoff.
    async fn deliver_with_retry(&self, batch: &[Record], mut slot: Option<OwnedSemaphorePermit>) -> Final {
        let policy = self.sink.retry_policy();
        let budget = self.sink.retry_budget();
        let first_try = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            let held = match slot.take() {
                Some(s) => s,
                None => match self.flow.slot(self.cancel).await {
                    Some(s) => s,
                    None => return Final::Cancelled,
                },
            };
            let result = self.attempt(batch, attempt).await;
            drop(held);
            let Some(result) = result else { return Final::Cancelled };
            match result {
                Attempt::Delivered | Attempt::Skipped => {
                    self.flow.succeeded();
                    if attempt > 0 {
                        info!(sink = %self.name, event = %batch[0].id, attempts = attempt + 1, "delivered after retries");
                    }
                    return Final::Delivered;
                }
                Attempt::Reject { status, detail } => return Final::Rejected { status, detail },
                Attempt::Retry { class, retry_after, detail } => {
                    let delay = retry_delay(&policy, attempt, retry_after, &mut rand::rng());
                    if let Some(budget) = budget.filter(|b| first_try.elapsed() + delay > *b) {
                        // Retrying for ever must not be the only outcome: the
                        // event waits as a dead letter, the call goes on.
                        let detail = format!(
                            "gave up after {} attempts in {:.0} s (retry budget {} s): {}: {detail}",
                            attempt + 1,
                            first_try.elapsed().as_secs_f64(),
                            budget.as_secs(),
                            class.as_str()
                        );
                        return Final::Rejected { status: None, detail };
                    }
                    self.m.retries.increment(1);
                    if attempt == 0 || attempt % 10 == 0 {
                        warn!(sink = %self.name, event = %batch[0].id, events = batch.len(), class = class.as_str(),
                              error = %detail, retry_in_ms = delay.as_millis() as u64, attempt = attempt + 1,
                              "delivery failed; will retry");
                    }
                    attempt = attempt.saturating_add(1);
                    // A destination that asked for a pause gets it in full.
                    let slept = match retry_after {
                        Some(_) => tokio::select! {
                            _ = self.cancel.cancelled() => false,
                            _ = tokio::time::sleep(delay) => true,
                        },
                        None => self.flow.backoff(delay, self.cancel).await,
                    };
                    if !slept {
                        return Final::Cancelled;
                    }
                }
            }
        }
    }

    /// One request, counted by status class; `None` when cancelled.
    async fn attempt(&self, batch: &[Record], attempt: u32) -> Option<Attempt> {
        let t0 = Instant::now();
        let result = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            r = self.sink.deliver(batch, attempt) => r,
        };
        let class = match &result {
            Attempt::Skipped => None,
            Attempt::Delivered => Some(StatusClass::S2xx),
            Attempt::Retry { class, .. } => Some(*class),
            Attempt::Reject { status, .. } => Some(status.map_or(StatusClass::S4xx, StatusClass::of_status)),
        };
        if let Some(class) = class {
            self.m.request(class).increment(1);
            self.m.duration.record(t0.elapsed().as_secs_f64());
        }
        Some(result)
    }
}

async fn ack(outbox: &Outbox, name: &Arc<str>, batch: &[Record]) {
    if let Err(e) = outbox.ack(name, batch.iter().map(|r| (r.pos, r.seq)).collect()).await {
        warn!(sink = %name, error = %e, "cannot record an acknowledgement; the events will be delivered again");
    }
}

async fn park(outbox: &Outbox, name: &Arc<str>, m: &SinkMetrics, r: &Record, status: Option<u16>, detail: String) {
    warn!(sink = %name, event = %r.id, status = ?status, reason = %detail, "event refused; parked as dead letter");
    m.dead_letters.increment(1);
    if let Err(e) = outbox.park(name, r, status, detail).await {
        warn!(sink = %name, error = %e, "cannot park a dead letter; it stays pending");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_stays_within_bounds_and_honours_retry_after() {
        let p = retry_policy(Duration::from_millis(100), Duration::from_secs(5)).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            for _ in 0..50 {
                let d = retry_delay(&p, attempt, None, &mut rng);
                assert!(d >= Duration::from_millis(50), "{d:?}");
                assert!(d <= Duration::from_secs(5), "{d:?}");
                let d = retry_delay(&p, attempt, Some(Duration::from_secs(7)), &mut rng);
                assert!(d >= Duration::from_secs(7));
                let d = retry_delay(&p, attempt, Some(Duration::from_secs(10 * 3600)), &mut rng);
                assert_eq!(d, MAX_RETRY_AFTER);
            }
        }
        assert!(retry_policy(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(retry_policy(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }

    #[test]
    fn statuses_are_classified_as_the_spec_says() {
        let d = || String::new();
        assert_eq!(classify_status(204, None, d), Attempt::Delivered);
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(classify_status(s, None, d), Attempt::Retry { .. }), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 413, 422, 301] {
            assert!(matches!(classify_status(s, None, d), Attempt::Reject { .. }), "{s}");
        }
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    fn config(sinks: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(&format!("[pbx]\nname = \"lab\"\n{sinks}"), "test")
    }

    #[test]
    fn sinks_and_outbox_parse_and_build() {
        let c = config(
            r#"
[[sinks]]
type = "webhook"
url = "https://helpdesk.example/hooks"
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
batch_size = 50

[[sinks]]
type = "zammad"
url = "https://zammad.example"
secret = "abc123"

[[sinks]]
type = "jsonl"
name = "audit"
path = "/dev/null"

[outbox]
path = "/tmp/x"
max_bytes = 1000000
"#,
        )
        .unwrap();
        assert_eq!(sink_names(&c).unwrap(), vec!["webhook", "zammad", "audit"]);
        assert!(!only_stdout(&c));
        assert_eq!(c.outbox.max_bytes, 1_000_000);
        assert_eq!(c.outbox.dedup_retention_seconds, 86400);
        let built = build_sinks(&c, &SinkContext::default()).unwrap();
        assert_eq!(built.len(), 3);
        assert!(matches!(&built[0], ConfiguredSink::Webhook(w) if w.batch_size() == 50));
    }

    #[test]
    fn bad_sink_configurations_are_refused() {
        assert!(config("[[sinks]]\ntype = \"webhook\"\nurl = \"https://x\"\nsecret = \"s\"\nbogus = 1\n").is_err());
        // Refused when the configuration is loaded, naming the field.
        let e = config("[[sinks]]\ntype = \"webhook\"\nurl = \"https://x\"\n").unwrap_err().to_string();
        assert!(e.contains("no secret"), "{e}");
        let c = config("[[sinks]]\ntype = \"jsonl\"\n[[sinks]]\ntype = \"jsonl\"\npath = \"/dev/null\"\n").unwrap();
        assert!(matches!(sink_names(&c), Err(SinkError::DuplicateName { index: 1, .. })));
        let e =
            config("[[sinks]]\ntype = \"webhook\"\nurl = \"https://x\"\nsecret = \"hunter2\"\ntimeout_seconds = -1\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("timeout_seconds") && !e.contains("hunter2"), "{e}");
        let c = config("").unwrap();
        assert!(only_stdout(&c));
    }

    fn rec(pos: i64, key: &str) -> Record {
        Record {
            pos,
            seq: pos,
            id: format!("x:{key}:{pos}").into(),
            key: key.into(),
            kind: "call.started".into(),
            body: "{}".into(),
            appended_at: 0,
        }
    }

    #[test]
    fn batches_keep_each_key_in_order_and_mix_keys() {
        let mut lanes: HashMap<Arc<str>, VecDeque<Record>, ahash::RandomState> = HashMap::default();
        lanes.insert("a".into(), [rec(1, "a"), rec(3, "a"), rec(4, "a")].into());
        lanes.insert("b".into(), [rec(2, "b")].into());
        let mut ready: VecDeque<Arc<str>> = [Arc::from("b")].into();
        let (batch, keys) = take_batch("a".into(), 3, &mut lanes, &mut ready);
        assert_eq!(batch.iter().map(|r| r.pos).collect::<Vec<_>>(), vec![1, 3, 4]);
        assert_eq!(keys, vec![Arc::<str>::from("a")]);
        let (batch, keys) = take_batch("b".into(), 1, &mut lanes, &mut ready);
        assert_eq!(batch.iter().map(|r| r.pos).collect::<Vec<_>>(), vec![2]);
        assert_eq!(keys, vec![Arc::<str>::from("b")]);
    }
}
