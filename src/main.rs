//! The `callbridge` command line: parses arguments, loads the configuration
//! and hands over to the library. Nothing here knows AMI or the lifecycle.

use anyhow::Context;
use callbridge::ami::CodecLimits;
use callbridge::config::Config;
use callbridge::directory::Directory;
use callbridge::normalize::{Normalizer, Options};
use callbridge::replay::{replay_files, Speed};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "callbridge", version, about = "PBX call events in, helpdesk call lifecycle out")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay recorded AMI traces through the pipeline; events go to stdout as JSON lines.
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
        /// Trace files, replayed in order.
        #[arg(required = true)]
        traces: Vec<PathBuf>,
    },
}

/// Exit code for a bad configuration (sysexits EX_USAGE).
const EX_CONFIG: u8 = 64;

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EX_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Replay { config, speed, summary, traces } => {
            let config = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match replay(&config, speed, summary, &traces) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("callbridge: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn replay(config: &Config, speed: Speed, summary: bool, traces: &[PathBuf]) -> anyhow::Result<()> {
    let dir = Arc::new(Directory::from_config(config));
    let rules = callbridge::routing::Routing::with_directory(config, dir.clone()).context("routing rules")?;
    let mut normalizer = Normalizer::new(dir, Arc::new(rules), Options::from_config(config));
    let limits = config
        .pbx
        .ami
        .as_ref()
        .map(|a| CodecLimits { max_frame_bytes: a.max_frame_bytes, max_headers: a.max_headers })
        .unwrap_or_default();
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
