//! The `callbridge` command line: parses arguments, loads the configuration
//! and hands over to the library. Nothing here knows AMI or the lifecycle.

use anyhow::Context;
use callbridge::app::{self, RunOptions, SourceSpec};
use callbridge::config::Config;
use callbridge::event::Event;
use callbridge::normalize::Normalizer;
use callbridge::outbox::{Outbox, OutboxOptions};
use callbridge::replay::{replay_files, Speed};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "callbridge", version, about = "PBX call events in, helpdesk call lifecycle out")]
struct Cli {
    /// Log one JSON object per line instead of human-readable lines.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon against the PBX of the configuration.
    Run {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Override `[api] listen` (e.g. 127.0.0.1:0).
        #[arg(long)]
        api_listen: Option<String>,
        /// Seconds shutdown may take.
        #[arg(long, default_value_t = 10)]
        shutdown_seconds: u64,
    },
    /// Replay recorded AMI traces through the pipeline; events go to stdout as JSON lines,
    /// or, when other sinks are configured, through the durable outbox to them.
    Replay {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// max, realtime, or a speed-up factor (e.g. 50).
        #[arg(long, default_value = "max")]
        speed: Speed,
        /// Print a one-line summary to stderr at the end.
        #[arg(long)]
        summary: bool,
        /// Run the whole daemon (API, registry, sinks, sweeper) fed by the
        /// traces, and keep serving after them until SIGTERM.
        #[arg(long)]
        serve: bool,
        /// Override `[api] listen` (with --serve).
        #[arg(long)]
        api_listen: Option<String>,
        /// With sinks other than stdout: how long to wait, after the trace
        /// ends, for every event to be delivered. Undelivered events stay in
        /// the outbox and go first on the next start.
        #[arg(long, default_value_t = 60.0)]
        drain_timeout_seconds: f64,
        /// Trace files, replayed in order.
        #[arg(required = true)]
        traces: Vec<PathBuf>,
    },
    /// Capture the live PBX's AMI stream into traces that `replay` reads
    /// (no credentials are written). Stops on SIGINT/SIGTERM.
    Record {
        /// Configuration file (TOML); `[pbx.ami]` says where the PBX is.
        #[arg(long)]
        config: PathBuf,
        /// The trace file to write (rotated files get .1, .2, … before the extension).
        #[arg(long)]
        out: PathBuf,
        /// Start a new file once one exceeds this many MB.
        #[arg(long)]
        rotate_mb: Option<u64>,
    },
    /// Validate a configuration file: every problem (exit 64), or a summary.
    CheckConfig {
        /// Configuration file (TOML).
        config: PathBuf,
    },
}

/// Exit code for a bad configuration (sysexits EX_USAGE).
const EX_CONFIG: u8 = 64;
/// Exit code when events are still undelivered at the drain deadline
/// (sysexits EX_TEMPFAIL: they are kept and delivered on the next start).
const EX_TEMPFAIL: u8 = 75;

#[derive(Debug, thiserror::Error)]
#[error("{0} events still undelivered after the drain timeout; they stay in the outbox and go first next time")]
struct DrainTimeout(u64);

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EX_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => {
            ExitCode::from(u8::try_from(callbridge::config::check_config_main(&config)).unwrap_or(1))
        }
        Command::Run { config, api_listen, shutdown_seconds } => {
            callbridge::telemetry::init_logging(cli.log_json);
            daemon(RunOptions {
                config_path: config,
                source: SourceSpec::Ami,
                api_listen,
                shutdown_deadline: Duration::from_secs(shutdown_seconds),
            })
        }
        Command::Record { config, out, rotate_mb } => {
            callbridge::telemetry::init_logging(cli.log_json);
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            record(config, out, rotate_mb)
        }
        Command::Replay { config, speed, summary, serve: true, api_listen, traces, .. } => {
            callbridge::telemetry::init_logging(cli.log_json);
            let _ = summary;
            daemon(RunOptions {
                config_path: config,
                source: SourceSpec::Traces { paths: traces, speed },
                api_listen,
                shutdown_deadline: Duration::from_secs(10),
            })
        }
        Command::Replay { config, speed, summary, serve: false, drain_timeout_seconds, traces, .. } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let result = if callbridge::sink::only_stdout(&config) {
                replay(&config, speed, summary, &traces)
            } else {
                replay_durable(&config, speed, summary, drain_timeout_seconds, &traces)
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.downcast_ref::<DrainTimeout>().is_some() => {
                    eprintln!("callbridge: {e:#}");
                    ExitCode::from(EX_TEMPFAIL)
                }
                Err(e) => {
                    eprintln!("callbridge: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn record(config: Config, out: PathBuf, rotate_mb: Option<u64>) -> ExitCode {
    let Some(ami) = config.pbx.ami.clone() else {
        eprintln!("callbridge: no [pbx.ami] in the configuration: nothing to record from");
        return ExitCode::from(EX_CONFIG);
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("callbridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
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
        match callbridge::record::record(ami, &out, rotate_mb.map(|m| m * 1_000_000), shutdown).await {
            Ok(r) => {
                eprintln!("recorded {} frames, {} bytes into {:?}", r.frames, r.bytes, r.files);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("callbridge: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

fn daemon(opts: RunOptions) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("callbridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        match app::start(opts).await {
            Ok(running) => match running.wait().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("callbridge stopped: {e:#}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                if let Some(c) = e.downcast_ref::<callbridge::config::ConfigError>() {
                    eprintln!("{c}");
                    return ExitCode::from(EX_CONFIG);
                }
                eprintln!("callbridge: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

fn replay(config: &Config, speed: Speed, summary: bool, traces: &[PathBuf]) -> anyhow::Result<()> {
    let mut normalizer = Normalizer::from_config(config);
    let limits = callbridge::config::runtime::codec_limits(config);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut write_error: Option<std::io::Error> = None;
    let pbx = config.pbx.name.clone();
    let stats = replay_files(traces, &mut normalizer, speed, limits, |e| {
        if write_error.is_none() {
            let line = e.to_cloudevent_json(&pbx);
            if let Err(err) = writeln!(out, "{line}") {
                write_error = Some(err);
            } else if matches!(speed, Speed::Factor(_)) {
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
    if summary {
        eprintln!("{}", stats.summary());
    }
    Ok(())
}

/// Replay through the durable path: normalizer → outbox (fsync'd) → sinks.
/// Events left undelivered by an earlier run are delivered first; event ids
/// are deterministic and the outbox ignores ids it already has, so replaying
/// the same trace after a crash does not deliver anything twice beyond
/// at-least-once.
fn replay_durable(
    config: &Config,
    speed: Speed,
    summary: bool,
    drain_timeout_seconds: f64,
    traces: &[PathBuf],
) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init()
        .ok();
    let drain_timeout = std::time::Duration::try_from_secs_f64(drain_timeout_seconds)
        .context("--drain-timeout-seconds must be a non-negative number")?;
    let sinks = callbridge::sink::build_sinks(config)?;
    let names = callbridge::sink::sink_names(config)?;
    let outbox = Outbox::open(&config.outbox.path, OutboxOptions::from_config(config, names))
        .with_context(|| format!("opening the outbox at {}", config.outbox.path))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let normalizer = Normalizer::from_config(config);
    let limits = callbridge::config::runtime::codec_limits(config);
    let traces = traces.to_vec();
    runtime.block_on(async move {
        let mut delivery = callbridge::sink::Delivery::new(&outbox, callbridge::sink::DeliveryOptions::default());
        delivery.spawn_configured(sinks);

        // Normalizer → appender. Full means the replay waits (never drop).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(4096);
        let replay = tokio::task::spawn_blocking(move || {
            let mut normalizer = normalizer;
            replay_files(&traces, &mut normalizer, speed, limits, |e| {
                // The receiver only goes away when the appender failed for good.
                let _ = tx.blocking_send(e.clone());
            })
        });
        let mut batch = Vec::with_capacity(1024);
        while rx.recv_many(&mut batch, 1024).await > 0 {
            append_until_stored(&outbox, &batch).await?;
            batch.clear();
        }
        let stats = replay.await.context("replay task")??;
        let drained = outbox.wait_drained(drain_timeout).await;
        let left = outbox.depth();
        let parked = outbox.dead_letter_count();
        if parked > 0 {
            tracing::warn!(dead_letters = parked, "some events were refused by a sink and wait as dead letters");
        }
        delivery.shutdown().await?;
        outbox.close().await?;
        if summary {
            eprintln!("{}", stats.summary());
        }
        if drained {
            Ok(())
        } else {
            Err(DrainTimeout(left).into())
        }
    })
}

/// Appends `events`, waiting out a full disk (the events stay here in
/// memory and the replay waits behind the bounded channel: never dropped).
async fn append_until_stored(outbox: &Outbox, events: &[Event]) -> anyhow::Result<()> {
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        match outbox.append(events).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_transient() => {
                tracing::error!(error = %e, events = events.len(), retry_in_ms = delay.as_millis() as u64,
                                "cannot store events in the outbox; holding them and retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("appending to the outbox"),
        }
    }
}
