//! The commands of the `callbridge` binary, each a function from parsed
//! arguments to an [`Outcome`]: `run`, `replay` (to stdout, through the
//! durable outbox, or as a whole daemon), `record`. `main.rs` only parses
//! the command line and maps outcomes to exit codes.

use super::{RunOptions, SourceSpec};
use crate::config::{Config, ConfigError};
use crate::delivery::Delivery;
use crate::exit;
use crate::replay::{replay_files, ReplaySettings, Speed};
use crate::state::Readiness;
use anyhow::Context;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How a command ended; [`Outcome::code`] is the process exit status.
#[derive(Debug)]
pub enum Outcome {
    Done,
    /// The configuration is unusable (already printed, every problem named).
    BadConfig,
    /// Events still undelivered at the drain deadline; they stay in the
    /// outbox and go first next time.
    Undelivered(u64),
    /// The PBX refused the AMI credentials (logged; not worth a restart).
    AuthRefused(anyhow::Error),
    Failed(anyhow::Error),
}

impl Outcome {
    /// sysexits-style status: 0, 64 for configuration, 75 when the work is
    /// kept for later, 1 otherwise.
    pub fn code(&self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::BadConfig => exit::EX_USAGE,
            Outcome::Undelivered(_) => exit::EX_TEMPFAIL,
            Outcome::AuthRefused(_) => exit::EX_NOPERM,
            Outcome::Failed(_) => 1,
        }
    }

    /// Prints what went wrong on stderr (nothing for success).
    pub fn report(&self) {
        match self {
            Outcome::Done | Outcome::BadConfig => {}
            Outcome::Undelivered(n) => eprintln!(
                "callbridge: {n} events still undelivered after the drain timeout; \
                 they stay in the outbox and go first next time"
            ),
            Outcome::Failed(e) | Outcome::AuthRefused(e) => eprintln!("callbridge: {e:#}"),
        }
    }
}

impl From<anyhow::Result<()>> for Outcome {
    fn from(r: anyhow::Result<()>) -> Self {
        match r {
            Ok(()) => Outcome::Done,
            Err(e) => match e.downcast_ref::<ConfigError>() {
                Some(c) => {
                    eprintln!("{c}");
                    Outcome::BadConfig
                }
                None => Outcome::Failed(e),
            },
        }
    }
}

fn load(path: &Path) -> Result<Config, Outcome> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        Outcome::BadConfig
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, Outcome> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Outcome::Failed(anyhow::Error::new(e).context("cannot start the runtime")))
}

/// `run` and `replay --serve`: the daemon until SIGTERM.
pub fn daemon(opts: RunOptions) -> Outcome {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(o) => return o,
    };
    rt.block_on(async {
        match super::start(opts).await {
            Ok(running) => match running.wait().await {
                Ok(()) => Outcome::Done,
                Err(e) => {
                    tracing::error!("callbridge stopped: {e:#}");
                    let refused = matches!(
                        e.downcast_ref::<crate::ami::AmiError>(),
                        Some(crate::ami::AmiError::AuthenticationFailed { .. })
                    );
                    if refused {
                        Outcome::AuthRefused(e)
                    } else {
                        Outcome::Failed(e)
                    }
                }
            },
            Err(e) => Outcome::from(Err(e)),
        }
    })
}

/// `record`: the live AMI stream into trace files until SIGINT/SIGTERM.
pub fn record(config_path: &Path, out: PathBuf, rotate_mb: Option<u64>) -> Outcome {
    let config = match load(config_path) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let Some(ami) = config.pbx.ami.clone() else {
        eprintln!("callbridge: no [pbx.ami] in the configuration: nothing to record from");
        return Outcome::BadConfig;
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(o) => return o,
    };
    rt.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut t), Ok(mut i)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
            }
            stop.cancel();
        });
        match crate::record::record(ami, &out, rotate_mb.map(|m| m * 1_000_000), shutdown).await {
            Ok(r) => {
                eprintln!("recorded {} frames, {} bytes into {:?}", r.frames, r.bytes, r.files);
                Outcome::Done
            }
            Err(e) => Outcome::Failed(e),
        }
    })
}

/// What `explain` does.
pub struct ExplainOptions {
    pub config_path: PathBuf,
    pub trace: PathBuf,
    /// Only this call.
    pub call: Option<String>,
    /// Where to write the HTML page, if wanted.
    pub html: Option<PathBuf>,
    /// As `replay --max-live-calls`.
    pub max_live_calls: usize,
}

/// `explain`: the trace's ladders as text on stdout, and as a page.
pub fn explain(opts: ExplainOptions) -> Outcome {
    let config = match load(&opts.config_path) {
        Ok(c) => c,
        Err(o) => return o,
    };
    explain_to_stdout(&config, &opts).into()
}

fn explain_to_stdout(config: &Config, opts: &ExplainOptions) -> anyhow::Result<()> {
    use crate::provenance::{explain_file, render_html, render_text, ExplainSettings};
    let mut normalizer = crate::settings::normalizer(config);
    let settings =
        ExplainSettings { limits: crate::settings::codec_limits(config), max_live_calls: opts.max_live_calls };
    let explanation = explain_file(&opts.trace, &mut normalizer, settings, opts.call.as_deref())?;
    if let (Some(id), true) = (&opts.call, explanation.calls.is_empty()) {
        anyhow::bail!("no call {id} in trace {} (a call's id is its Linkedid)", opts.trace.display());
    }
    for line in &explanation.malformed {
        eprintln!("warning: {}:{line}: malformed frame skipped (as replay skips it)", opts.trace.display());
    }
    if let Some(path) = &opts.html {
        std::fs::write(path, render_html(&explanation))
            .with_context(|| format!("cannot write the page {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(render_text(&explanation).as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing the explanation to stdout"),
        _ => Ok(()),
    }
}

/// What `replay` without `--serve` does.
pub struct ReplayOptions {
    pub config_path: PathBuf,
    pub speed: Speed,
    /// One summary line on stderr at the end.
    pub summary: bool,
    /// With sinks other than stdout: how long to wait for delivery after
    /// the traces end.
    pub drain_timeout: Duration,
    /// Most calls live at once; past it the calls silent the longest end
    /// `lost` ([`crate::replay::DEFAULT_MAX_LIVE_CALLS`] by default).
    pub max_live_calls: usize,
    pub traces: Vec<PathBuf>,
}

impl ReplayOptions {
    fn settings(&self, config: &Config) -> ReplaySettings {
        ReplaySettings {
            speed: self.speed,
            limits: crate::settings::codec_limits(config),
            max_live_calls: self.max_live_calls,
        }
    }
}

/// `replay`: to stdout as JSON lines, or through the durable outbox when
/// sinks other than stdout are configured.
pub fn replay(opts: ReplayOptions) -> Outcome {
    let config = match load(&opts.config_path) {
        Ok(c) => c,
        Err(o) => return o,
    };
    if crate::sink::only_stdout(&config) {
        replay_to_stdout(&config, &opts).into()
    } else {
        replay_durable(&config, &opts)
    }
}

fn replay_to_stdout(config: &Config, opts: &ReplayOptions) -> anyhow::Result<()> {
    let mut normalizer = crate::settings::normalizer(config);
    let settings = opts.settings(config);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut write_error: Option<std::io::Error> = None;
    let pbx = config.pbx.name.clone();
    let paced = matches!(opts.speed, Speed::Factor(_));
    let mut line = Vec::with_capacity(1024);
    let stats = replay_files(&opts.traces, &mut normalizer, settings, |e| {
        if write_error.is_none() {
            line.clear();
            e.write_cloudevent_json(&pbx, &mut line);
            line.push(b'\n');
            if let Err(err) = out.write_all(&line) {
                write_error = Some(err);
            } else if paced {
                // Paced replays are watched live: do not sit on events.
                let _ = out.flush();
            }
        }
    })?;
    if let Some(e) = write_error {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing events to stdout");
        }
    }
    out.flush().ok();
    if opts.summary {
        eprintln!("{}", stats.summary());
    }
    Ok(())
}

/// Replay through the durable path: normalizer → outbox (fsync'd) → sinks,
/// with the daemon's own [`Delivery`] (the same wait-and-retry on a full
/// disk). Events left undelivered by an earlier run are delivered first;
/// event ids are deterministic and the outbox ignores ids it already has,
/// so replaying the same trace again delivers nothing twice beyond
/// at-least-once.
fn replay_durable(config: &Config, opts: &ReplayOptions) -> Outcome {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return Outcome::Failed(anyhow::Error::new(e).context("cannot start the runtime")),
    };
    let run = rt.block_on(async move {
        let mut delivery =
            Delivery::for_config(config, Arc::new(Readiness::default()), &crate::sink::SinkContext::default())?;
        let normalizer = crate::settings::normalizer(config);
        let settings = opts.settings(config);
        let (traces, pbx) = (opts.traces.clone(), config.pbx.name.clone());
        // Normalizer → delivery. Full means the replay waits (never drop).
        let (tx, rx) = tokio::sync::mpsc::channel::<crate::event::Event>(4096);
        let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
        let replay = tokio::task::spawn_blocking(move || {
            let mut normalizer = normalizer;
            let stats = replay_files(&traces, &mut normalizer, settings, |e| {
                // The receiver only goes away when delivery failed for good
                // or the drain deadline passed.
                let _ = tx.blocking_send(e.clone());
            });
            let _ = ended_tx.send(());
            stats
        });
        let (unstored, deadline) = store_replayed(&mut delivery, rx, ended, opts.drain_timeout, &pbx).await?;
        let stats = replay.await.context("replay task")??;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut closed = delivery.close(left).await?;
        closed.undelivered += unstored;
        if closed.dead_letters > 0 {
            tracing::warn!(
                dead_letters = closed.dead_letters,
                "some events were refused by a sink and wait as dead letters"
            );
        }
        if opts.summary {
            eprintln!("{}", stats.summary());
        }
        anyhow::Ok(closed.undelivered)
    });
    match run {
        Ok(0) => Outcome::Done,
        Ok(left) => Outcome::Undelivered(left),
        Err(e) => Outcome::from(Err(e)),
    }
}

/// Hands the replayed events to `delivery` until the channel ends, or
/// until `drain` after the trace ended (`ended`), whichever is first: the
/// drain timeout bounds the whole wait after the trace, including a wait
/// for room in a full outbox. Returns how many events were not stored, and
/// the deadline (for the rest of the drain).
async fn store_replayed(
    delivery: &mut Delivery,
    mut rx: tokio::sync::mpsc::Receiver<crate::event::Event>,
    ended: tokio::sync::oneshot::Receiver<()>,
    drain: Duration,
    pbx: &str,
) -> anyhow::Result<(u64, tokio::time::Instant)> {
    let deadline = Arc::new(std::sync::OnceLock::new());
    let set = deadline.clone();
    tokio::spawn(async move {
        // Ended, or the replay task is gone: either way the trace is over.
        let _ = ended.await;
        let _ = set.set(tokio::time::Instant::now() + drain);
    });
    let mut batch = Vec::with_capacity(1024);
    let mut unstored = 0u64;
    // Ends once the trace ended and everything was handed over (the
    // channel closes), or when storing gave up at the deadline.
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let stored = delivery.deliver_until(&batch, pbx, &deadline).await?;
        if stored < batch.len() {
            unstored += (batch.len() - stored) as u64;
            break;
        }
        batch.clear();
    }
    rx.close();
    while rx.try_recv().is_ok() {
        unstored += 1;
    }
    let at = deadline.get().copied().unwrap_or_else(|| tokio::time::Instant::now() + drain);
    Ok((unstored, at))
}

/// `run`: the daemon against the live PBX.
pub fn run(config_path: PathBuf, api_listen: Option<String>, shutdown_deadline: Duration) -> Outcome {
    daemon(RunOptions { config_path, source: SourceSpec::Ami, api_listen, shutdown_deadline })
}

/// `callbridge nats-setup`: creates or checks the JetStream stream of every
/// NATS sink (see `crate::sink::nats_setup`); prints what exists. Fails
/// when a stream exists but does not fit the configuration.
pub fn nats_setup(config_path: &Path) -> Outcome {
    let config = match load(config_path) {
        Ok(c) => c,
        Err(o) => return o,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(o) => return o,
    };
    match rt.block_on(crate::sink::nats_setup::setup(&config)) {
        Ok((report, fits)) => {
            print!("{report}");
            if fits {
                Outcome::Done
            } else {
                Outcome::Failed(anyhow::anyhow!(
                    "a stream does not fit the configuration (see above); nothing was changed"
                ))
            }
        }
        Err(e) => Outcome::Failed(e),
    }
}

/// `callbridge tail --nats URL`: prints the stream's events as JSON lines
/// until interrupted (see `crate::sink::nats_tail`).
pub fn tail(opts: crate::sink::nats_tail::TailOptions) -> Outcome {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(o) => return o,
    };
    let result = rt.block_on(async {
        let mut out = std::io::stdout();
        tokio::select! {
            r = crate::sink::nats_tail::tail(&opts, &mut out) => r.map(|_| ()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    result.into()
}
