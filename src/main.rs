//! The `callbridge` command line: parses arguments, sets up logging once
//! for every command, hands over to `app::commands`, and maps the outcome
//! to an exit code. Nothing here knows AMI, the lifecycle or delivery.

#![deny(clippy::too_many_lines)]

use callbridge::app::commands::{self, ExplainOptions, Outcome, ReplayOptions};
use callbridge::app::{RunOptions, SourceSpec};
use callbridge::config::CheckOptions;
use callbridge::replay::Speed;
use clap::{Parser, Subcommand};
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
        /// Print a one-line summary to stderr at the end (not with --serve,
        /// which has no end).
        #[arg(long, conflicts_with = "serve")]
        summary: bool,
        /// Run the whole daemon (API, registry, sinks, sweeper) fed by the
        /// traces, and keep serving after them until SIGTERM.
        #[arg(long)]
        serve: bool,
        /// Override `[api] listen` (with --serve).
        #[arg(long, requires = "serve")]
        api_listen: Option<String>,
        /// With sinks other than stdout: how long to wait, after the trace
        /// ends, for every event to be delivered. Undelivered events stay in
        /// the outbox and go first on the next start. Not with --serve
        /// (shutdown has its own deadline).
        #[arg(long, default_value_t = 60.0, conflicts_with = "serve")]
        drain_timeout_seconds: f64,
        /// Most calls live at once: past it, the calls silent the longest are
        /// ended as `lost` (with a warning). Only a trace missing hangups
        /// gets there. Not with --serve (the daemon's stuck-call sweeper
        /// ends calls the PBX no longer has).
        #[arg(long, default_value_t = callbridge::replay::DEFAULT_MAX_LIVE_CALLS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..), conflicts_with = "serve")]
        max_live_calls: usize,
        /// Trace files, replayed in order.
        #[arg(required = true)]
        traces: Vec<PathBuf>,
    },
    /// Explain a trace: per call, the AMI frames that touched it (with their
    /// line in the file), the lifecycle events they produced, and the rule
    /// that decided each outcome. Replays the trace as `replay` does.
    Explain {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Only this call (its id: the Linkedid).
        #[arg(long)]
        call: Option<String>,
        /// Also write one self-contained HTML page with a swimlane per call.
        #[arg(long)]
        html: Option<PathBuf>,
        /// As `replay --max-live-calls`.
        #[arg(long, default_value_t = callbridge::replay::DEFAULT_MAX_LIVE_CALLS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        max_live_calls: usize,
        /// The trace file.
        trace: PathBuf,
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
    /// Create the JetStream stream of each NATS sink, or check the existing
    /// one, and print what exists. Never changes or deletes a stream.
    NatsSetup {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the events of a NATS stream as JSON lines (watch a site's calls).
    Tail {
        /// NATS server(s), comma-separated (nats://host:4222).
        #[arg(long)]
        nats: String,
        /// Subject filter: every site's call events by default; one site:
        /// callbridge.<pbx>.>
        #[arg(long, default_value = "callbridge.*.call.>")]
        subject: String,
        /// The stream.
        #[arg(long, default_value = "CALLBRIDGE")]
        stream: String,
        /// A durable consumer of this name (acknowledges what it printed; a
        /// restart goes on from there). Without it: an ephemeral one.
        #[arg(long)]
        durable: Option<String>,
        /// Start with the oldest event the stream holds, not the next new one.
        #[arg(long)]
        all: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// A .creds file for the connection.
        #[arg(long)]
        creds_file: Option<String>,
    },
    /// Validate a configuration file: every problem (exit 64), or a summary.
    CheckConfig {
        /// Configuration file (TOML).
        config: PathBuf,
        /// Do not read secret files and environment variables (for checking
        /// a file away from the daemon's environment). By default every
        /// secret is obtained and checked, as `run` would at start.
        #[arg(long)]
        no_resolve_secrets: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    callbridge::telemetry::init_logging(cli.log_json);
    let outcome = match cli.command {
        Command::CheckConfig { config, no_resolve_secrets } => {
            let options = CheckOptions { resolve_secrets: !no_resolve_secrets };
            return ExitCode::from(u8::try_from(callbridge::config::check_config_main(&config, options)).unwrap_or(1));
        }
        Command::Run { config, api_listen, shutdown_seconds } => {
            few_malloc_arenas();
            commands::run(config, api_listen, Duration::from_secs(shutdown_seconds))
        }
        Command::Record { config, out, rotate_mb } => commands::record(&config, out, rotate_mb),
        Command::Explain { config, call, html, max_live_calls, trace } => {
            commands::explain(ExplainOptions { config_path: config, trace, call, html, max_live_calls })
        }
        Command::NatsSetup { config } => commands::nats_setup(&config),
        Command::Tail { nats, subject, stream, durable, all, count, creds_file } => {
            commands::tail(callbridge::sink::nats_tail::TailOptions {
                url: nats,
                stream,
                subject,
                durable,
                all,
                creds_file,
                count,
            })
        }
        Command::Replay { config, speed, serve: true, api_listen, traces, .. } => commands::daemon(RunOptions {
            config_path: config,
            source: SourceSpec::Traces { paths: traces, speed },
            api_listen,
            shutdown_deadline: Duration::from_secs(10),
        }),
        Command::Replay {
            config, speed, summary, serve: false, drain_timeout_seconds, max_live_calls, traces, ..
        } => match Duration::try_from_secs_f64(drain_timeout_seconds) {
            Ok(drain_timeout) => commands::replay(ReplayOptions {
                config_path: config,
                speed,
                summary,
                drain_timeout,
                max_live_calls,
                traces,
            }),
            Err(_) => {
                eprintln!("callbridge: --drain-timeout-seconds must be a non-negative number");
                Outcome::BadConfig
            }
        },
    };
    outcome.report();
    ExitCode::from(outcome.code())
}

/// glibc's allocator gives every thread that allocates a malloc arena of
/// its own (up to eight per core). The daemon's threads pass call data and
/// batches between them, and each arena kept its own free holes: 100,000
/// live calls held 158 MB resident with the default arenas and 146 MB with
/// four (`benches/daemon_memory.rs`), ingesting as fast
/// (`benches/durable_ingest.rs`; two arenas saved 3 MB more but ingested
/// 15-20% slower, the outbox writer waiting for the arena's lock). The
/// limit is read from the environment when the process starts, so the
/// daemon starts itself again in place (`exec`: same process id, same
/// arguments) with `MALLOC_ARENA_MAX=4`, unless the variable is set
/// already (then it decides).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn few_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_ARENA_MAX";
    const ARENAS: &str = "4";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let mut again = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        again.arg0(arg0);
    }
    // Returns only if the exec failed (e.g. the binary was replaced on
    // disk): the daemon then runs as it is.
    let error = again.args(args).env(VAR, ARENAS).exec();
    tracing::warn!(%error, "cannot restart with {VAR}={ARENAS}; running with the allocator's default arenas");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn few_malloc_arenas() {}
