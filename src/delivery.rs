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
use crate::normalize::CallCheckpoint;
use crate::outbox::{NewRecord, Outbox, OutboxOptions};
use crate::sink;
use crate::state::Readiness;
use anyhow::Context;
use std::io::Write;
use std::sync::{Arc, OnceLock};
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
    /// `ctx`: what sinks may ask of the rest of callbridge (hanging up a
    /// caller the helpdesk rejects).
    pub fn for_config(config: &Config, readiness: Arc<Readiness>, ctx: &sink::SinkContext) -> anyhow::Result<Delivery> {
        if sink::only_stdout(config) {
            return Ok(Delivery::Jsonl(Box::new(std::io::stdout())));
        }
        let sinks = sink::build_sinks(config, ctx)?;
        let names = sink::sink_names(config)?;
        let outbox = Outbox::open(&config.outbox.path, OutboxOptions::from_config(config, names))
            .with_context(|| format!("opening the outbox at {}", config.outbox.path))?;
        let mut runners = sink::Runners::new(&outbox, sink::RunnerOptions::default());
        if let Some(gate) = &ctx.gate {
            runners = runners.with_gate(gate.clone());
        }
        runners.spawn_configured(sinks);
        readiness.set_outbox(outbox.is_writable());
        Ok(Delivery::Outbox { outbox, runners, readiness })
    }

    /// [`Delivery::for_config`] for the daemon: when the outbox cannot be
    /// opened for want of room on its disk (a format upgrade or a new
    /// store to write, with no ballast left to release), it says so and
    /// tries again every few seconds (keeping systemd's start timeout
    /// from running out) instead of exiting into a restart loop. Every
    /// other error ends the start as before.
    pub async fn for_daemon(
        config: &Config,
        readiness: Arc<Readiness>,
        ctx: &sink::SinkContext,
    ) -> anyhow::Result<Delivery> {
        const RETRY: Duration = Duration::from_secs(5);
        let mut attempts = 0u64;
        loop {
            match Delivery::for_config(config, readiness.clone(), ctx) {
                Err(e) if no_room(&e) => {
                    if attempts % 12 == 0 {
                        tracing::error!(error = %format!("{e:#}"), retry_in_seconds = RETRY.as_secs(),
                            "cannot open the outbox for want of room on its disk; waiting for space (nothing stored is lost)");
                    }
                    attempts += 1;
                    crate::systemd::waiting(
                        &format!("waiting for room on the outbox's disk ({})", config.outbox.path),
                        RETRY * 3,
                    );
                    tokio::time::sleep(RETRY).await;
                }
                other => return other,
            }
        }
    }

    /// The durable outbox, when there is one (dead letters, depth).
    pub fn outbox(&self) -> Option<&Outbox> {
        match self {
            Delivery::Outbox { outbox, .. } => Some(outbox),
            _ => None,
        }
    }

    /// `checkpoints` (the calls' state after `events`, see
    /// `normalize::persist`) are stored with the events in the outbox, and
    /// dropped by the other deliveries, which do not survive a restart.
    pub async fn deliver(&mut self, events: &[Event], checkpoints: &[CallCheckpoint], pbx: &str) -> anyhow::Result<()> {
        match self {
            Delivery::Outbox { outbox, readiness, .. } => {
                store(outbox, readiness, events, Vec::new(), &Arc::from(checkpoints), None).await.map(|_| ())
            }
            other => other.deliver_now(events, pbx),
        }
    }

    /// The deliveries that are not durable: written (and flushed) at once.
    fn deliver_now(&mut self, events: &[Event], pbx: &str) -> anyhow::Result<()> {
        match self {
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
            Delivery::Outbox { .. } | Delivery::Discard => Ok(()),
        }
    }

    /// [`Delivery::deliver`] without waiting for the outbox: the events
    /// are stored by a task of their own, which returns them once they are
    /// durable (the caller publishes them then, and stores nothing else
    /// meanwhile, to keep the order). The other deliveries are done at
    /// once. `prepared`: the events' records, built ahead with
    /// [`Outbox::prepare`] (or empty: built here).
    pub(crate) fn deliver_in_task(
        &mut self,
        events: Vec<Event>,
        prepared: Vec<NewRecord>,
        checkpoints: Vec<CallCheckpoint>,
        pbx: &str,
    ) -> anyhow::Result<Delivering> {
        match self {
            Delivery::Outbox { outbox, readiness, .. } => {
                let (outbox, readiness) = (outbox.clone(), readiness.clone());
                // Moved, not copied: the states (JSON) go to the outbox as they are.
                let checkpoints: Arc<[CallCheckpoint]> = checkpoints.into();
                Ok(Delivering::Task(tokio::spawn(async move {
                    store(&outbox, &readiness, &events, prepared, &checkpoints, None).await?;
                    Ok(events)
                })))
            }
            // Not durable: nothing to overlap with.
            other => {
                other.deliver_now(&events, pbx)?;
                Ok(Delivering::Done(events))
            }
        }
    }

    /// [`Delivery::deliver`], giving up waiting for room in the outbox once
    /// `deadline` is set and has passed. Returns how many of `events` (from
    /// the first) are safe; the others were not stored.
    pub async fn deliver_until(
        &mut self,
        events: &[Event],
        pbx: &str,
        deadline: &OnceLock<tokio::time::Instant>,
    ) -> anyhow::Result<usize> {
        match self {
            Delivery::Outbox { outbox, readiness, .. } => {
                store(outbox, readiness, events, Vec::new(), &Arc::from([]), Some(deadline)).await
            }
            _ => self.deliver(events, &[], pbx).await.map(|()| events.len()),
        }
    }

    /// Readiness follows the outbox's writability (called periodically: a
    /// full episode ends without any delivery call noticing).
    pub fn refresh_readiness(&self) {
        if let Delivery::Outbox { outbox, readiness, .. } = self {
            readiness.set_outbox(outbox.is_writable());
        }
    }

    /// Flushes and stops: the sink runners get until `deadline` to deliver
    /// what is pending (the rest stays in the outbox for the next start).
    pub async fn close(self, deadline: Duration) -> anyhow::Result<Closed> {
        match self {
            Delivery::Outbox { outbox, runners, .. } => {
                // A hot standby delivers nothing: nothing to wait for.
                if runners.delivering() {
                    outbox.wait_drained(deadline).await;
                }
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

/// What [`Delivery::deliver_in_task`] did with a batch.
pub enum Delivering {
    /// Delivered already (stdout, discard): the events, to publish.
    Done(Vec<Event>),
    /// Being stored: the task returns the events once they are durable.
    Task(tokio::task::JoinHandle<anyhow::Result<Vec<Event>>>),
}

/// Stores `events` in the outbox, waiting and retrying while it is full:
/// what fits goes in at once (a batch larger than the whole store goes in
/// piece by piece while the sinks drain what went before), the rest waits.
/// Returns how many events (from the first) are stored: all of them, or
/// fewer once `deadline` is set and passed.
async fn store(
    outbox: &Outbox,
    readiness: &Readiness,
    events: &[Event],
    mut prepared: Vec<NewRecord>,
    checkpoints: &Arc<[CallCheckpoint]>,
    deadline: Option<&OnceLock<tokio::time::Instant>>,
) -> anyhow::Result<usize> {
    let mut rest = events;
    let mut delay = Duration::from_millis(100);
    let mut waiting = false;
    // Checkpoints go in with the last event (or alone when there is none).
    let states_pending = !checkpoints.is_empty();
    while !rest.is_empty() || states_pending {
        // The records built ahead serve the first attempt (all of the
        // events); later ones build theirs.
        match outbox.append_prepared_what_fits(rest, std::mem::take(&mut prepared), checkpoints).await {
            Ok(p) => {
                if p.outcome.conflicts > 0 {
                    // Retrying cannot help: the outbox keeps what it has
                    // under those ids (and logged them).
                    tracing::error!(
                        refused = p.outcome.conflicts,
                        stored = p.outcome.appended,
                        "events refused by the outbox: their ids are already stored with different content"
                    );
                }
                rest = rest.get(p.taken..).unwrap_or_default();
                if p.taken > 0 {
                    delay = Duration::from_millis(100);
                }
                if rest.is_empty() {
                    break;
                }
            }
            Err(e) if e.is_transient() => {
                // The outbox logs a full disk once per episode; here, once
                // per wait.
                if !waiting {
                    tracing::warn!(error = %e, events = rest.len(),
                        "cannot store events in the outbox yet; holding them and retrying");
                }
                waiting = true;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("appending to the outbox"),
        }
        readiness.set_outbox(false);
        let now = tokio::time::Instant::now();
        let pause = match deadline.and_then(OnceLock::get) {
            Some(&at) if now >= at => return Ok(events.len() - rest.len()),
            Some(&at) => delay.min(at - now),
            None => delay,
        };
        tokio::time::sleep(pause).await;
    }
    readiness.set_outbox(outbox.is_writable());
    Ok(events.len())
}

fn no_room(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<crate::outbox::OutboxError>(), Some(crate::outbox::OutboxError::NoRoom { .. }))
    })
}

/// What [`Delivery::close`] left behind in the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Closed {
    /// Events not yet acknowledged by every sink (delivered first next time).
    pub undelivered: u64,
    /// Events a sink refused, waiting as dead letters.
    pub dead_letters: u64,
}
