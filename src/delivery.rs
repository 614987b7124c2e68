//! Where the pipeline hands events once they are final.
//!
//! `deliver` returns when the events are safe by the sink's standard:
//! - **outbox** (any sink other than JSON lines on stdout): appended to the
//!   durable outbox and fsync'd; the sink runners take them from there. A
//!   full disk makes `deliver` wait and retry — the pipeline stops taking
//!   frames, the AMI reader waits, and nothing already accepted is lost —
//!   while readiness reports false.
//! - **stdout**: written and flushed (first runs, replays: not durable).

use crate::config::Config;
use crate::event::Event;
use crate::outbox::{Outbox, OutboxOptions};
use crate::sink;
use crate::state::Readiness;
use anyhow::Context;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

pub enum Delivery {
    /// The durable path: outbox → sink runners.
    Outbox { outbox: Outbox, runners: sink::Runners, readiness: Arc<Readiness> },
    /// JSON lines to stdout (or any writer).
    Jsonl(Box<dyn Write + Send>),
    /// Events are only published to the registry (tests).
    Discard,
}

impl Delivery {
    /// The delivery the configuration asks for. The Prometheus recorder
    /// must be installed first (the outbox registers its metrics on open).
    pub fn for_config(config: &Config, readiness: Arc<Readiness>) -> anyhow::Result<Delivery> {
        if sink::only_stdout(config) {
            return Ok(Delivery::Jsonl(Box::new(std::io::stdout())));
        }
        let sinks = sink::build_sinks(config)?;
        let names = sink::sink_names(config)?;
        let outbox = Outbox::open(&config.outbox.path, OutboxOptions::from_config(config, names))
            .with_context(|| format!("opening the outbox at {}", config.outbox.path))?;
        let mut runners = sink::Runners::new(&outbox, sink::RunnerOptions::default());
        runners.spawn_configured(sinks);
        readiness.set_outbox(outbox.is_writable());
        Ok(Delivery::Outbox { outbox, runners, readiness })
    }

    /// The durable outbox, when there is one (dead letters, depth).
    pub fn outbox(&self) -> Option<&Outbox> {
        match self {
            Delivery::Outbox { outbox, .. } => Some(outbox),
            _ => None,
        }
    }

    pub async fn deliver(&mut self, events: &[Event], pbx: &str) -> anyhow::Result<()> {
        match self {
            Delivery::Outbox { outbox, readiness, .. } => {
                let mut delay = Duration::from_millis(100);
                loop {
                    match outbox.append(events).await {
                        Ok(o) => {
                            readiness.set_outbox(true);
                            if o.conflicts > 0 {
                                // Retrying cannot help: the outbox keeps what it
                                // has under those ids (and logged them).
                                tracing::error!(
                                    refused = o.conflicts,
                                    stored = o.appended,
                                    "events refused by the outbox: their ids are already stored with different content"
                                );
                            }
                            return Ok(());
                        }
                        Err(e) if e.is_transient() => {
                            readiness.set_outbox(false);
                            tracing::error!(error = %e, events = events.len(), retry_in_ms = delay.as_millis() as u64,
                                "cannot store events in the outbox; holding them and retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                        Err(e) => return Err(e).context("appending to the outbox"),
                    }
                }
            }
            Delivery::Jsonl(w) => {
                let mut buf = String::with_capacity(events.len() * 900);
                for e in events {
                    buf.push_str(&e.to_cloudevent_json(pbx));
                    buf.push('\n');
                }
                w.write_all(buf.as_bytes())?;
                w.flush()?;
                Ok(())
            }
            Delivery::Discard => Ok(()),
        }
    }

    /// Flushes and stops: the sink runners get until `deadline` to deliver
    /// what is pending (the rest stays in the outbox for the next start).
    pub async fn close(self, deadline: Duration) -> anyhow::Result<Closed> {
        match self {
            Delivery::Outbox { outbox, runners, .. } => {
                outbox.wait_drained(deadline).await;
                let closed = Closed { undelivered: outbox.depth(), dead_letters: outbox.dead_letter_count() };
                runners.shutdown().await?;
                outbox.close().await?;
                Ok(closed)
            }
            Delivery::Jsonl(mut w) => {
                w.flush()?;
                Ok(Closed::default())
            }
            Delivery::Discard => Ok(Closed::default()),
        }
    }
}

/// What [`Delivery::close`] left behind in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Closed {
    /// Events not yet acknowledged by every sink (delivered first next time).
    pub undelivered: u64,
    /// Events a sink refused, waiting as dead letters.
    pub dead_letters: u64,
}
