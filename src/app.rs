//! The wiring: the only module that knows all the others.
//!
//! ```text
//! AMI client ─┐                                  ┌─► delivery (outbox → sinks)
//!             ├─► source channel ─► pipeline ────┼─► registry ─► HTTP API
//! trace file ─┘   (bounded: full    (normalizer) └─► indicators
//!                  = reader waits)       ▲
//!        HTTP API, sweeper, SIGHUP ──────┘ commands (bounded: full = caller waits)
//! ```
//!
//! Shutdown (SIGTERM/SIGINT): the sources stop reading, the pipeline
//! flushes what it has to delivery, the API stops accepting; all within a
//! deadline. Reload (SIGHUP): the new file is validated first; a bad one is
//! refused (logged, counted) and the old configuration stays.

mod blocker;
pub mod commands;

use crate::ami::codec::{AmiCodec, CodecLimits};
use crate::ami::connection::{self, AmiHandle, SourceItem};
use crate::api::{routes, Auth};
use crate::config::Config;
use crate::delivery::Delivery;
use crate::pipeline::Pipeline;
use crate::registry::Registry;
use crate::replay::Speed;
use crate::state::Readiness;
use crate::state::{Command, Shared};
use anyhow::{bail, Context};
use futures::StreamExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Where the daemon's AMI frames come from.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    /// The live PBX of `[pbx.ami]`.
    Ami,
    /// Recorded traces, replayed in order at `speed`.
    Traces { paths: Vec<PathBuf>, speed: Speed },
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config_path: PathBuf,
    pub source: SourceSpec,
    /// Overrides `[api] listen` (e.g. `127.0.0.1:0` in tests).
    pub api_listen: Option<String>,
    /// How long shutdown may take.
    pub shutdown_deadline: Duration,
}

/// A started daemon.
pub struct Running {
    pub shared: Arc<Shared>,
    /// FastAGI routing, when `[agi]` is configured.
    pub oracle: Option<Arc<crate::routing::RouteOracle>>,
    /// Where the API listens, when configured.
    pub api_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    pipeline: JoinHandle<anyhow::Result<()>>,
    tasks: Tasks,
    /// Names of essential tasks that ended while the daemon was running.
    ended: mpsc::Receiver<&'static str>,
    ami_task: Option<JoinHandle<Result<(), crate::ami::AmiError>>>,
    config_path: PathBuf,
    deadline: Duration,
    signals: Signals,
}

/// SIGTERM, SIGINT and SIGHUP, caught from the start: `READY=1` and the
/// first `WATCHDOG=1` go out from tasks while `start` is still running,
/// and a SIGTERM that follows them at once (`systemctl stop` right after
/// a start) must shut down cleanly, not kill the process mid-flush.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn catch() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Starts every component; returns once the API listens (if any).
pub async fn start(opts: RunOptions) -> anyhow::Result<Running> {
    let config = Arc::new(Config::load(&opts.config_path)?);
    let signals = Signals::catch().context("cannot catch SIGTERM/SIGINT/SIGHUP")?;
    crate::telemetry::metrics();
    let shutdown = CancellationToken::new();
    let readiness = Arc::new(Readiness::default());
    let registry = Arc::new(Registry::new(&config.registry));
    let capacity =
        config.pbx.ami.as_ref().map_or_else(crate::config::default_event_queue, |a| a.event_queue_capacity.max(1));
    // Full source channel: the reader (socket or trace) waits; nothing is dropped.
    let (source_tx, source_rx) = mpsc::channel::<SourceItem>(capacity);
    // Full command channel: the API request waits.
    let (cmd_tx, cmd_rx) = mpsc::channel::<Command>(256);
    // SIP dialog events arrive as ready-made lifecycle events. Full channel:
    // the SIP agent waits.
    let (sip_tx, sip_rx) = mpsc::channel::<crate::event::Event>(1024);

    let (ended_tx, ended) = mpsc::channel(16);
    let mut tasks = Tasks { handles: Vec::new(), shutdown: shutdown.clone(), ended: ended_tx };
    // The VarSets the normalizer ignores (30 % of a busy stream) stop at
    // the AMI reader; the pipeline keeps the filter in step with reloads.
    let ignored = crate::settings::ignored_frames(&config);
    let (ami, ami_task) = start_source(&opts, &config, &readiness, &ignored, source_tx, &shutdown, &mut tasks)?;
    start_sip(&opts, &config, &readiness, sip_tx, &shutdown, &mut tasks).await?;

    readiness.set_outbox(true);
    // A caller the helpdesk rejects is hung up through the control path:
    // the pipeline marks the call, then the PBX hangs the caller up.
    let blocker = blocker::PbxBlocker::new(cmd_tx.clone(), ami.clone());
    // A hot-standby pair delivers only while it holds the lease. A replayed
    // trace is never part of a pair (an incident reproduced beside the
    // live instances must not take their lease).
    let paired = config.ha.as_ref().filter(|_| matches!(opts.source, SourceSpec::Ami));
    let leadership = Arc::new(match paired {
        Some(ha) => crate::ha::Leadership::paired(&ha.node_name()),
        None => crate::ha::Leadership::single(),
    });
    let gate = paired.map(|_| leadership.gate());
    let sink_ctx = crate::sink::SinkContext { blocker: Some(Arc::new(blocker)), gate };
    let delivery = Delivery::for_daemon(&config, readiness.clone(), &sink_ctx).await?;
    if let (Some(settings), Some(outbox), true) = (crate::settings::ha(&config), delivery.outbox(), paired.is_some()) {
        let task = tokio::spawn(crate::ha::run(settings, leadership.clone(), outbox.clone(), shutdown.clone()));
        tasks.watch("hot standby", task);
    }
    let shared = Arc::new(
        Shared::new(
            config.clone(),
            Arc::new(crate::settings::directory(&config)),
            registry,
            readiness.clone(),
            ami.clone(),
            cmd_tx,
            delivery.outbox().cloned(),
        )
        .with_feed(Arc::new(crate::feed::Feed::new(crate::settings::feed(&config))))
        .with_leadership(leadership),
    );
    // A live PBX carries its calls across restarts; a replayed trace is
    // an incident reproduced from scratch.
    let persist = matches!(opts.source, SourceSpec::Ami);
    let mut pipeline = Pipeline::new(&config, shared.clone(), delivery, persist);
    pipeline.share_ignored_frames(ignored);
    let pipeline = tokio::spawn(pipeline.run(source_rx, sip_rx, cmd_rx, shutdown.clone()));
    let pipeline = tasks.watch_result("pipeline", pipeline);

    let oracle = start_agi(&config, &shared, &shutdown, &mut tasks).await?;
    let api_addr = start_api(&opts, &config, &shared, &shutdown, &mut tasks).await?;

    // READY=1 once the PBX is logged in (or the trace is being read) and
    // delivery is open.
    let notify_ami = ami.clone();
    let name = config.pbx.name.clone();
    tasks.push(tokio::spawn(async move {
        if let Some(a) = notify_ami {
            if a.wait_connected().await.is_err() {
                return; // stopped before the first login
            }
        }
        crate::systemd::ready(&format!("running for {name}"));
    }));

    Ok(Running {
        shared,
        oracle,
        api_addr,
        shutdown,
        pipeline,
        tasks,
        ended,
        ami_task,
        config_path: opts.config_path,
        deadline: opts.shutdown_deadline,
        signals,
    })
}

type AmiTask = JoinHandle<Result<(), crate::ami::AmiError>>;

/// The AMI client or the trace reader, feeding `source_tx`.
fn start_source(
    opts: &RunOptions,
    config: &Config,
    readiness: &Readiness,
    ignored: &crate::normalize::IgnoredFrames,
    source_tx: mpsc::Sender<SourceItem>,
    shutdown: &CancellationToken,
    tasks: &mut Tasks,
) -> anyhow::Result<(Option<AmiHandle>, Option<AmiTask>)> {
    match &opts.source {
        SourceSpec::Ami => match config.pbx.ami.as_ref().map(crate::settings::ami_client) {
            Some(mut settings) => {
                let ignored = ignored.clone();
                settings.skip = Some(crate::ami::settings::FrameFilter::new(move |f| ignored.ignores(f)));
                let (handle, task) = connection::spawn(settings, source_tx, shutdown.clone());
                Ok((Some(handle), Some(task)))
            }
            // SIP-only mode: calls come from the agents' dialogs.
            None if config.sip.is_some() => Ok((None, None)),
            None => bail!(
                "{}: neither [pbx.ami] nor [sip] is configured: callbridge run needs a source",
                opts.config_path.display()
            ),
        },
        SourceSpec::Traces { paths, speed } => {
            readiness.set_pbx(true);
            let limits = crate::settings::codec_limits(config);
            tasks.push(tokio::spawn(feed_traces(paths.clone(), *speed, limits, source_tx, shutdown.clone())));
            Ok((None, None))
        }
    }
}

/// The SIP dialog-event agent of a live run, if `[sip]` is configured; in
/// SIP-only mode readiness follows it.
async fn start_sip(
    opts: &RunOptions,
    config: &Config,
    readiness: &Arc<Readiness>,
    sip_tx: mpsc::Sender<crate::event::Event>,
    shutdown: &CancellationToken,
    tasks: &mut Tasks,
) -> anyhow::Result<()> {
    // A replayed trace is the only source of a reproduced incident: SIP
    // subscriptions belong to live runs.
    let Some(sip) = crate::settings::sip_settings(config).filter(|_| matches!(opts.source, SourceSpec::Ami)) else {
        return Ok(());
    };
    let mode = crate::settings::sip_mode(config);
    let agent = crate::sip::spawn(
        sip,
        mode,
        Arc::new(crate::settings::directory(config)),
        config.pbx.name.clone(),
        sip_tx,
        shutdown.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("[sip]: {e}"))?;
    info!(addr = %agent.local_addr, "SIP dialog subscriptions started");
    let status = agent.status.clone();
    let sip = tokio::spawn(async move {
        match agent.task.await {
            Ok(Err(e)) => error!(error = %e, "SIP connector stopped"),
            Err(e) => error!(error = %e, "SIP connector task failed"),
            Ok(Ok(())) => {}
        }
    });
    tasks.watch("sip", sip);
    if config.pbx.ami.is_none() {
        // Readiness follows the SIP side when it is the only source.
        let r = readiness.clone();
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => r.set_pbx(status.ready()),
                }
            }
        }));
    }
    Ok(())
}

/// The FastAGI routing endpoint, if `[agi]` is configured.
async fn start_agi(
    config: &Config,
    shared: &Shared,
    shutdown: &CancellationToken,
    tasks: &mut Tasks,
) -> anyhow::Result<Option<Arc<crate::routing::RouteOracle>>> {
    let Some(agi) = &config.agi else { return Ok(None) };
    let routing = Arc::new(crate::settings::routing(config)?);
    let lookup = crate::settings::caller_lookups(config).map_err(|e| anyhow::anyhow!(e))?;
    let oracle = Arc::new(crate::routing::RouteOracle::new(routing, shared.presence.clone()).with_lookup(lookup));
    let limits = crate::routing::agi::AgiLimits::from_config(agi)?;
    let listener = crate::routing::agi::bind(agi).await?;
    info!(addr = %listener.local_addr()?, "FastAGI routing listening");
    let stop = shutdown.clone();
    let serve_oracle = oracle.clone();
    tasks
        .push(tokio::spawn(async move { crate::routing::agi::serve_with(listener, serve_oracle, limits, stop).await }));
    Ok(Some(oracle))
}

/// The HTTP API (and a separate metrics listener), if `[api]` is configured.
async fn start_api(
    opts: &RunOptions,
    config: &Config,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    tasks: &mut Tasks,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(api) = &config.api else { return Ok(None) };
    let token = api.secret.resolve().map_err(|e| anyhow::anyhow!("[api]: {e}"))?;
    let listen = opts.api_listen.clone().unwrap_or_else(|| api.listen.clone());
    let listener =
        tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    info!(addr = %addr, "HTTP API listening");
    let requests = crate::settings::api_request_limits(api);
    let app = routes::router(shared.clone(), Auth::new(&token), requests);
    let limits = crate::settings::api_serve_limits(api);
    tasks.watch("api", crate::api::server::serve(listener, app, limits, shutdown.clone()));
    if let Some(m) = &api.metrics_listen {
        let listener = tokio::net::TcpListener::bind(m).await.with_context(|| format!("cannot listen on {m}"))?;
        info!(addr = %listener.local_addr()?, "metrics listening");
        tasks.watch(
            "metrics",
            crate::api::server::serve(listener, routes::metrics_router(requests), limits, shutdown.clone()),
        );
    }
    Ok(Some(addr))
}

/// The daemon's long-lived tasks. An essential one (pipeline, SIP agent,
/// FastAGI, API) that ends while the daemon is not shutting down is a
/// failure: logged, counted, and the daemon stops with an error so that the
/// service manager restarts it — never left silently dead while `/readyz`
/// says 200.
struct Tasks {
    handles: Vec<JoinHandle<()>>,
    shutdown: CancellationToken,
    /// Full only if every essential task ended at once; a name that does
    /// not fit changes nothing (the daemon is stopping already).
    ended: mpsc::Sender<&'static str>,
}

impl Tasks {
    /// A helper task: awaited at shutdown, its end is no failure.
    fn push(&mut self, task: JoinHandle<()>) {
        self.handles.push(task);
    }

    /// An essential task: its end before shutdown stops the daemon.
    fn watch(&mut self, name: &'static str, task: JoinHandle<()>) {
        let (stop, ended) = (self.shutdown.clone(), self.ended.clone());
        self.handles.push(tokio::spawn(async move {
            let panicked = task.await.is_err();
            if !stop.is_cancelled() {
                task_ended(name, panicked, &ended);
            }
        }));
    }

    /// As [`Tasks::watch`] for a task whose result the shutdown wants.
    fn watch_result<T: Send + 'static>(
        &self,
        name: &'static str,
        task: JoinHandle<anyhow::Result<T>>,
    ) -> JoinHandle<anyhow::Result<T>> {
        let (stop, ended) = (self.shutdown.clone(), self.ended.clone());
        tokio::spawn(async move {
            let r = task.await;
            if !stop.is_cancelled() {
                task_ended(name, r.is_err(), &ended);
            }
            r.map_err(|e| anyhow::anyhow!("{name} task failed: {e}"))?
        })
    }
}

fn task_ended(name: &'static str, panicked: bool, ended: &mpsc::Sender<&'static str>) {
    error!(task = name, panicked, "an essential task stopped unexpectedly; stopping so that the service restarts");
    metrics::counter!("callbridge_task_exits_total", "task" => name).increment(1);
    let _ = ended.try_send(name);
}

/// A deadline that is never reached (tokio's own "far future").
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// Reads trace files into the source channel, paced by their timestamps.
/// Each file is decoded as it is read: memory holds the frames in the
/// (bounded) channel and one read, never the trace.
async fn feed_traces(
    paths: Vec<PathBuf>,
    speed: Speed,
    limits: CodecLimits,
    tx: mpsc::Sender<SourceItem>,
    shutdown: CancellationToken,
) {
    for path in paths {
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                error!(trace = %path.display(), error = %e, "cannot read trace");
                continue;
            }
        };
        let mut messages = FramedRead::with_capacity(file, AmiCodec::new(limits), 64 * 1024);
        let mut pace = Pace { speed, start: tokio::time::Instant::now(), first: None };
        // Reconnections and resyncs recorded in the trace reach the
        // pipeline as they did live (see `crate::reconnect`).
        let mut reader = crate::reconnect::TraceReader::new();
        let mut items = Vec::new();
        loop {
            let m = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = messages.next() => m,
            };
            let done = m.is_none();
            match m {
                Some(Ok(m)) => reader.read(m, |i| items.push(i)),
                Some(Err(e)) => {
                    error!(trace = %path.display(), error = %e, "cannot read the rest of the trace");
                    break;
                }
                None => {
                    reader.finish(|i| items.push(i));
                    info!(trace = %path.display(), "trace replayed");
                }
            }
            for item in items.drain(..) {
                if !pace.send(item, &tx, &shutdown).await {
                    return;
                }
            }
            if done {
                break;
            }
        }
    }
}

/// A replayed trace's pacing by its frames' timestamps.
struct Pace {
    speed: Speed,
    start: tokio::time::Instant,
    first: Option<i64>,
}

impl Pace {
    /// Waits until the item is due, then hands it to the pipeline. False
    /// when shutting down or the pipeline is gone.
    async fn send(
        &mut self,
        item: crate::reconnect::TraceItem,
        tx: &mpsc::Sender<SourceItem>,
        shutdown: &CancellationToken,
    ) -> bool {
        use crate::reconnect::TraceItem;
        let item = match item {
            TraceItem::Frame(f) => {
                if let (Speed::Factor(k), Some(ts)) = (self.speed, f.timestamp_micros()) {
                    let base = *self.first.get_or_insert(ts);
                    let delay = crate::replay::pacing_delay(ts.saturating_sub(base), k);
                    // Past what an Instant can hold: as good as never.
                    let due = self.start.checked_add(delay).unwrap_or_else(|| self.start + FAR_FUTURE);
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                SourceItem::Frame(f)
            }
            TraceItem::Reconnected => SourceItem::Connected { banner: "(replayed reconnection)".into() },
            TraceItem::Resync { channels, queue_items, .. } => {
                SourceItem::Resync(crate::ami::Resync { channels, queue_items })
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => false,
            r = tx.send(item) => r.is_ok(),
        }
    }
}

impl Running {
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn ami(&self) -> Option<&AmiHandle> {
        self.shared.ami.as_ref()
    }

    /// Validates the configuration file again and applies it; a bad file is
    /// refused and the running configuration kept. Returns the problems.
    pub async fn reload(&self) -> Result<(), crate::config::ConfigError> {
        crate::systemd::reloading();
        let result = Config::load(&self.config_path);
        let r = match result {
            Ok(new) => {
                let new = Arc::new(new);
                self.shared.set_config(new.clone(), Arc::new(crate::settings::directory(&new)));
                self.shared.indicators.lock().unwrap_or_else(|p| p.into_inner()).reconfigure(&new);
                if let Some(o) = &self.oracle {
                    match crate::settings::routing(&new).map(Arc::new) {
                        Ok(r) => o.reconfigure(r),
                        Err(e) => error!(problems = %e, "routing rules not reloaded"),
                    }
                    match crate::settings::caller_lookups(&new) {
                        Ok(l) => o.reconfigure_lookup(l),
                        Err(e) => error!(problem = %e, "caller lookup not reloaded; keeping the running one"),
                    }
                }
                let _ = self.shared.commands.send(Command::Reload { config: new }).await;
                metrics::counter!("callbridge_config_reloads_total", "result" => "ok").increment(1);
                info!(config = %self.config_path.display(), "configuration reloaded");
                Ok(())
            }
            Err(e) => {
                metrics::counter!("callbridge_config_reloads_total", "result" => "rejected").increment(1);
                error!(problems = %e, "new configuration refused; keeping the running one");
                Err(e)
            }
        };
        crate::systemd::ready("running");
        r
    }

    /// Runs until SIGTERM/SIGINT (or the AMI client gives up for good),
    /// reloading on SIGHUP; then shuts down within the deadline.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut fatal: Option<anyhow::Error> = None;
        loop {
            tokio::select! {
                _ = self.signals.term.recv() => { info!("SIGTERM: shutting down"); break }
                _ = self.signals.int.recv() => { info!("SIGINT: shutting down"); break }
                _ = self.signals.hup.recv() => { let _ = self.reload().await; }
                Some(name) = self.ended.recv() => {
                    fatal = Some(anyhow::anyhow!("the {name} task stopped unexpectedly"));
                    break;
                }
                r = async { match self.ami_task.as_mut() { Some(t) => t.await, None => std::future::pending().await } } => {
                    self.ami_task = None;
                    match r {
                        Ok(Err(e)) => { error!(error = %e, "AMI client stopped"); fatal = Some(e.into()); }
                        Ok(Ok(())) => {}
                        Err(e) => { fatal = Some(anyhow::anyhow!("AMI client task failed: {e}")); }
                    }
                    break;
                }
            }
        }
        self.stop().await?;
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops everything: sources first, then the pipeline flushes, then
    /// the servers; gives up after the deadline.
    pub async fn stop(self) -> anyhow::Result<()> {
        crate::systemd::stopping();
        self.shutdown.cancel();
        let deadline = self.deadline;
        let all = async move {
            let r = self.pipeline.await;
            for t in self.tasks.handles {
                let _ = t.await;
            }
            if let Some(t) = self.ami_task {
                let _ = t.await;
            }
            r
        };
        match tokio::time::timeout(deadline, all).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(anyhow::anyhow!("pipeline task failed: {e}")),
            Err(_) => {
                warn!(?deadline, "shutdown deadline passed; exiting anyway");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks() -> (Tasks, mpsc::Receiver<&'static str>, CancellationToken) {
        let shutdown = CancellationToken::new();
        let (ended, rx) = mpsc::channel(16);
        (Tasks { handles: Vec::new(), shutdown: shutdown.clone(), ended }, rx, shutdown)
    }

    #[tokio::test]
    async fn an_essential_task_that_ends_or_panics_is_reported() {
        let (mut t, mut rx, _shutdown) = tasks();
        t.watch("sip", tokio::spawn(async {}));
        assert_eq!(rx.recv().await, Some("sip"));
        t.watch("api", tokio::spawn(async { panic!("boom") }));
        assert_eq!(rx.recv().await, Some("api"));
        let pipeline = t.watch_result("pipeline", tokio::spawn(async { anyhow::Ok(()) }));
        assert_eq!(rx.recv().await, Some("pipeline"));
        assert!(pipeline.await.expect("joined").is_ok());
    }

    #[tokio::test]
    async fn tasks_ending_at_shutdown_are_not_failures() {
        let (mut t, mut rx, shutdown) = tasks();
        shutdown.cancel();
        t.watch("api", tokio::spawn(async {}));
        let helper = tokio::spawn(async {});
        t.push(helper);
        for h in t.handles.drain(..) {
            h.await.expect("joined");
        }
        drop(t);
        assert_eq!(rx.recv().await, None, "nothing reported at shutdown");
    }
}
