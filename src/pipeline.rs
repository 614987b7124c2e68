//! The pipeline task: the one owner of the normalizer.
//!
//! It reads source items (AMI frames, connection changes, resync listings,
//! or a trace's frames) in order, runs them through the normalizer, hands
//! the resulting events to delivery (durable before anything else sees
//! them), then to the registry and the indicators. Everything that changes
//! call state from outside — an administrator removing a call, the
//! stuck-call sweeper's verdicts, a configuration reload — arrives here as a
//! [`Command`], so call state has exactly one writer and needs no lock.
//!
//! It must never block on the network: PBX checks run in their own tasks and
//! come back as commands.
//!
//! # Overlap with the outbox
//!
//! With the durable outbox, storing a batch (one group commit: SQL and an
//! fsync) runs in its own task while the pipeline goes on normalizing the
//! next batch: at most one batch is being stored at a time, so batches are
//! stored in the order they were made (per-call order holds), and a batch's
//! events reach the registry and the indicators only once the outbox
//! confirmed them durable. The next batch grows while the previous one is
//! stored, up to `[outbox] max_batch_events` events (then the pipeline
//! stops reading its sources until the commit returns: backpressure as
//! before), so the batch size follows the commit time: small batches at
//! low rates, large ones in a burst; an event waits at most for the
//! commit in flight and its own.
//!
//! While a batch is stored, the events of the next one are stamped and
//! their records (CloudEvents JSON, id, digest) built as they come, and
//! when the commit returns the next batch goes to the outbox before the
//! stored one is published: the writer starts its next commit at once
//! instead of waiting for the records and the publishing.

use crate::ami::connection::SourceItem;
use crate::ami::Action;
use crate::config::Config;
use crate::delivery::{Delivering, Delivery};
use crate::event::{EndReason, Event, EventKind};
use crate::normalize::{Normalizer, PbxChannels, StuckLimits};
use crate::registry::Registry;
use crate::state::{Command, Shared};
use anyhow::Context;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub struct Pipeline {
    normalizer: Normalizer,
    shared: Arc<Shared>,
    delivery: Delivery,
    limits: StuckLimits,
    sweep_every: Duration,
    sweep_running: bool,
    pbx: String,
    out: Vec<Event>,
    /// How many of `out` are stamped ([`crate::event::AgentIds`]) and,
    /// with an outbox, have their records in `prepared`.
    ready: usize,
    /// The records of `out[..ready]`, built while the batch before is
    /// being stored: the next append is ready when its commit returns.
    prepared: Vec<crate::outbox::NewRecord>,
    /// The batch being stored (outbox): its task, and nothing else is
    /// published or stored until it returns.
    storing: Option<Storing>,
    /// Most events in one batch (the next one waits for the one stored).
    max_batch: usize,
    agent_ids: crate::event::AgentIds,
    /// Live calls are checkpointed with their events and restored at start
    /// (a live PBX with a durable outbox; see `normalize::persist`).
    persist: bool,
}

impl Pipeline {
    /// `persist`: carry live calls across restarts (only with an outbox).
    pub fn new(config: &Config, shared: Arc<Shared>, delivery: Delivery, persist: bool) -> Pipeline {
        let mut normalizer = crate::settings::normalizer(config);
        let persist = persist && delivery.outbox().is_some();
        if persist {
            normalizer.track_changes();
        }
        Pipeline {
            normalizer,
            shared,
            delivery,
            limits: crate::settings::stuck_limits(config),
            sweep_every: Duration::from_secs(config.stuck.check_interval_seconds.max(1)),
            sweep_running: false,
            pbx: config.pbx.name.clone(),
            out: Vec::with_capacity(64),
            ready: 0,
            prepared: Vec::new(),
            storing: None,
            max_batch: config.outbox.max_batch_events.max(1),
            agent_ids: crate::event::AgentIds::default(),
            persist,
        }
    }

    /// Keeps the AMI reader's filter (see [`crate::normalize::IgnoredFrames`])
    /// in step with this pipeline's normalizer.
    pub fn share_ignored_frames(&mut self, filter: crate::normalize::IgnoredFrames) {
        self.normalizer.share_ignored_frames(filter);
    }

    /// Runs until shutdown; a source that ends (a trace fully replayed) is
    /// noted and the pipeline keeps serving commands. `ready_events` carries
    /// events made elsewhere (SIP dialog events) into the same delivery.
    /// On return every event handed to delivery has been flushed.
    pub async fn run(
        mut self,
        mut source: mpsc::Receiver<SourceItem>,
        mut ready_events: mpsc::Receiver<Event>,
        mut commands: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut sweep = tokio::time::interval(self.sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watchdog_every = crate::systemd::watchdog_interval().unwrap_or(Duration::from_secs(3600));
        let mut watchdog = tokio::time::interval(watchdog_every);
        // Readiness follows the outbox's writability within a second (a
        // full disk ends without any delivery call noticing).
        let mut readiness = tokio::time::interval(Duration::from_secs(1));
        readiness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut source_open = true;
        let mut ready_open = true;
        if self.persist {
            self.restore().await?;
        }
        loop {
            // The next batch is full: sources wait for the one being stored.
            let room = self.out.len() < self.max_batch;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                stored = Storing::done(&mut self.storing) => {
                    // The next batch goes to the outbox first: its commit
                    // then overlaps with publishing this one.
                    let stored = stored?;
                    if !self.out.is_empty() {
                        self.store()?;
                    }
                    self.on_stored(stored);
                }
                Some(cmd) = commands.recv() => self.on_command(cmd),
                item = source.recv(), if source_open && room => match item {
                    Some(item) => {
                        self.on_source(item);
                        // Whatever else is queued joins this batch: one
                        // delivery (one outbox commit) for a burst.
                        for _ in 0..255 {
                            if self.out.len() >= self.max_batch {
                                break;
                            }
                            match source.try_recv() {
                                Ok(item) => self.on_source(item),
                                Err(_) => break,
                            }
                        }
                    }
                    None => {
                        source_open = false;
                        info!("source ended; {} live calls remain", self.normalizer.live_calls());
                    }
                },
                e = ready_events.recv(), if ready_open && room => match e {
                    Some(e) => self.out.push(e),
                    None => ready_open = false,
                },
                _ = sweep.tick() => self.start_sweep(),
                _ = readiness.tick() => self.delivery.refresh_readiness(),
                _ = watchdog.tick() => crate::systemd::watchdog(),
            }
            self.shared.presence.sync_from(&mut self.normalizer);
            if self.storing.is_some() {
                self.prepare_new();
            }
            if !self.out.is_empty() && self.storing.is_none() {
                self.store()?;
            }
        }
        // What is being stored, then the rest.
        if let Some(stored) = Storing::finish(&mut self.storing).await {
            self.on_stored(stored?);
        }
        if !self.out.is_empty() {
            self.flush().await?;
        }
        // The live calls' latest state, for the next start. Bounded: with a
        // full disk the state of their last stored event stands (as after
        // kill -9), and the resync at the next start fills in.
        if self.persist {
            match tokio::time::timeout(Duration::from_secs(2), self.flush()).await {
                Ok(r) => r?,
                Err(_) => {
                    warn!("could not store the live calls' last state at shutdown; their last stored state stands")
                }
            }
        }
        // Readers of the stream end: nothing more will come.
        self.shared.feed.close();
        // What the sinks have not taken by then stays in the outbox.
        let delivery = std::mem::replace(&mut self.delivery, Delivery::Discard);
        delivery.close(Duration::from_secs(3)).await?;
        Ok(())
    }

    /// Seals the pending events into a batch and hands it to delivery:
    /// with the outbox, stored in a task of its own (published by
    /// [`Pipeline::on_stored`] once durable); otherwise delivered and
    /// published now.
    fn store(&mut self) -> anyhow::Result<()> {
        self.prepare_new();
        let events = std::mem::take(&mut self.out);
        let prepared = std::mem::take(&mut self.prepared);
        self.ready = 0;
        // The calls' state as of the last event of this batch.
        let checkpoints = self.normalizer.take_checkpoints();
        match self.delivery.deliver_in_task(events, prepared, checkpoints, &self.pbx)? {
            Delivering::Done(events) => self.on_stored(events),
            Delivering::Task(task) => self.storing = Some(Storing(task)),
        }
        Ok(())
    }

    /// Stamps the events made since the last call (each exactly once) and,
    /// with an outbox, builds their records.
    fn prepare_new(&mut self) {
        let new = self.out.get_mut(self.ready..).unwrap_or_default();
        if new.is_empty() {
            // Most turns of the loop (commands, ticks) made no event.
            return;
        }
        for e in new.iter_mut() {
            self.agent_ids.stamp(e);
        }
        if let Some(outbox) = self.delivery.outbox() {
            outbox.prepare(new, &mut self.prepared);
        }
        self.ready = self.out.len();
    }

    /// Delivers the pending events (durably) and waits, then publishes them.
    async fn flush(&mut self) -> anyhow::Result<()> {
        self.store()?;
        if let Some(stored) = Storing::finish(&mut self.storing).await {
            self.on_stored(stored?);
        }
        Ok(())
    }

    /// A batch is safe: the registry, the indicators and the feed see it.
    fn on_stored(&mut self, mut events: Vec<Event>) {
        let mut ind = self.shared.indicators.lock().unwrap_or_else(|p| p.into_inner());
        for e in &events {
            self.shared.registry.apply(e);
            ind.apply(e);
        }
        drop(ind);
        count(&events);
        // Moved, not copied: the feed keeps the last events for the stream.
        self.shared.feed.publish(events.drain(..));
        // The allocation serves the next batch.
        if self.out.is_empty() && events.capacity() > self.out.capacity() {
            self.out = events;
        }
    }

    /// Puts back the calls that were live when the previous run stopped;
    /// the resync after the first connection decides which go on.
    async fn restore(&mut self) -> anyhow::Result<()> {
        let Some(outbox) = self.delivery.outbox() else {
            return Ok(());
        };
        let rows = outbox.live_calls().await.context("reading the live calls of the previous run")?;
        if rows.is_empty() {
            return Ok(());
        }
        let restored = self.normalizer.restore(rows);
        for c in &restored.calls {
            let e = Event {
                seq: c.seq,
                time: c.last_event_at,
                kind: EventKind::Started {},
                call: Some(Arc::new(c.snapshot.clone())),
            };
            self.shared.registry.apply(&e);
        }
        metrics::counter!("callbridge_calls_restored_total").increment(restored.calls.len() as u64);
        for id in &restored.stale {
            warn!(call = %id, "restored call state is older than its last stored event; the resync with the PBX fills in");
        }
        for (id, why) in &restored.unreadable {
            warn!(call = %id, reason = %why, "cannot restore a live call's state; only its event numbering is kept");
        }
        info!(
            calls = restored.calls.len(),
            "live calls of the previous run restored; the resync with the PBX decides which go on"
        );
        Ok(())
    }

    fn on_source(&mut self, item: SourceItem) {
        match item {
            SourceItem::Frame(f) => {
                let now = self.shared.pbx_now_then_saw(f.timestamp_micros());
                self.normalizer.handle(&f, now, &mut self.out);
            }
            SourceItem::Connected { banner } => {
                info!(%banner, "connected to the PBX");
                self.normalizer.begin_resync();
                self.shared.readiness.set_pbx(true);
                crate::systemd::status(&format!("connected to {}", self.pbx));
            }
            SourceItem::Resync(r) => {
                let now = self.shared.pbx_now();
                let before = self.normalizer.live_calls();
                self.normalizer.resync(&PbxChannels { channels: r.channels }, now, &mut self.out);
                self.normalizer.resync_members(&r.queue_items, now, &mut self.out);
                info!(before, after = self.normalizer.live_calls(), "resync with the PBX done");
            }
            SourceItem::Disconnected { reason } => {
                warn!(%reason, "disconnected from the PBX");
                self.shared.readiness.set_pbx(false);
                crate::systemd::status(&format!("disconnected from {}: {reason}", self.pbx));
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let now = self.shared.pbx_now();
        match cmd {
            Command::RemoveCall { id, reply } => {
                let ok = self.normalizer.end_call(&id, EndReason::Removed, now, &mut self.out);
                let last = ok.then(|| self.out.last().and_then(|e| e.call.as_deref().cloned())).flatten();
                let _ = reply.send(last);
            }
            Command::Reload { config } => {
                let (dir, rules, opts) = crate::settings::normalizer_parts(&config);
                self.normalizer.reconfigure(dir, rules, opts);
                self.limits = crate::settings::stuck_limits(&config);
                info!("configuration reloaded; {} live calls kept", self.normalizer.live_calls());
            }
            Command::ExpectOriginate { originate, reply } => {
                self.normalizer.expect_originate(originate);
                let _ = reply.send(());
            }
            Command::TalkingChannel { call, reply } => {
                let _ = reply.send(self.normalizer.talking_agent_channel(&call));
            }
            Command::BlockCaller { call, reply } => {
                let _ = reply.send(self.normalizer.block_caller(&call));
            }
            Command::UnblockCaller { call } => self.normalizer.unblock_caller(&call),
            Command::SetAvailable { agent, available, reason, queues, reply } => {
                let known =
                    self.normalizer.apply_helpdesk_switch(&agent, available, reason, &queues, now, &mut self.out);
                let _ = reply.send(known);
            }
            Command::SweepVerdict { suspects, alive } => {
                self.sweep_running = false;
                // Only calls that are still suspect now (they may have moved on).
                let still: HashSet<_> =
                    self.normalizer.suspects(now, &self.limits).into_iter().map(|s| s.call).collect();
                for s in suspects.into_iter().filter(|s| still.contains(&s.call)) {
                    match &alive {
                        Some(alive) if !alive.contains(s.call.as_str()) => {
                            if self.normalizer.end_call(s.call.as_str(), EndReason::Lost, now, &mut self.out) {
                                warn!(call = %s.call, state = s.state.as_str(), "call vanished from the PBX; ended as lost");
                            }
                        }
                        _ => {
                            if self.normalizer.mark_stuck(s.call.as_str(), s.cause.as_str(), now, &mut self.out) {
                                metrics::counter!("callbridge_calls_stuck_total").increment(1);
                                warn!(call = %s.call, state = s.state.as_str(), cause = s.cause.as_str(), "call looks stuck");
                            }
                        }
                    }
                }
            }
        }
    }

    fn start_sweep(&mut self) {
        let now = self.shared.pbx_now();
        self.shared.registry.purge_expired(now);
        self.shared.indicators.lock().unwrap_or_else(|p| p.into_inner()).prune(now);
        publish_active(&self.shared.registry, &self.shared.config());
        if self.sweep_running {
            return;
        }
        let suspects = self.normalizer.suspects(now, &self.limits);
        if suspects.is_empty() {
            return;
        }
        self.sweep_running = true;
        let ami = self.shared.ami.clone();
        let commands = self.shared.commands.clone();
        tokio::spawn(async move {
            let alive = match ami {
                Some(ami) => match ami.send_list(Action::new("CoreShowChannels")).await {
                    Ok(list) => Some(list.items.iter().filter_map(|f| f.get("Linkedid").map(str::to_string)).collect()),
                    Err(e) => {
                        warn!(error = %e, "cannot check suspect calls with the PBX");
                        None
                    }
                },
                None => None,
            };
            // The pipeline may be gone (shutdown): nothing to report then.
            let _ = commands.send(Command::SweepVerdict { suspects, alive }).await;
        });
    }
}

/// The batch being stored, in its task.
struct Storing(tokio::task::JoinHandle<anyhow::Result<Vec<Event>>>);

impl Storing {
    /// Resolves when the batch in flight is stored (never, when there is
    /// none: for `select!`).
    async fn done(storing: &mut Option<Storing>) -> anyhow::Result<Vec<Event>> {
        match storing {
            Some(s) => {
                let r = (&mut s.0).await;
                *storing = None;
                r.context("the task storing events failed")?
            }
            None => std::future::pending().await,
        }
    }

    /// Waits for the batch in flight, if any.
    async fn finish(storing: &mut Option<Storing>) -> Option<anyhow::Result<Vec<Event>>> {
        match storing.is_some() {
            true => Some(Storing::done(storing).await),
            false => None,
        }
    }
}

fn count(events: &[Event]) {
    // One update per type and batch: each `counter!` with a label looks the
    // series up in the registry, which per event was a visible cost at
    // full rate.
    let mut by_type: Vec<(&'static str, u64)> = Vec::with_capacity(8);
    for e in events {
        let name = e.kind.type_name();
        match by_type.iter_mut().find(|(n, _)| *n == name) {
            Some((_, k)) => *k += 1,
            None => by_type.push((name, 1)),
        }
        match e.kind {
            EventKind::Missed { reason, .. } => {
                metrics::counter!("callbridge_calls_missed_total", "reason" => reason.as_str()).increment(1);
            }
            // However it was found gone: at a resync, by the stuck-call check.
            EventKind::Ended { end_reason: EndReason::Lost, .. } => {
                metrics::counter!("callbridge_calls_lost_total").increment(1);
            }
            _ => {}
        }
    }
    for (name, k) in by_type {
        metrics::counter!("callbridge_lifecycle_events_total", "type" => name).increment(k);
    }
}

/// `callbridge_calls_active{group, state}` from the registry; the group
/// label takes the configured ids and `none` only.
fn publish_active(registry: &Registry, config: &Config) {
    use std::collections::HashMap;
    let mut by: HashMap<(&str, &'static str), u64> = HashMap::new();
    registry.for_each_live(|c| {
        let group = c
            .snapshot
            .group
            .as_ref()
            .and_then(|g| config.groups.iter().find(|x| x.id == g.as_str()))
            .map_or("none", |g| g.id.as_str());
        *by.entry((group, c.snapshot.state.as_str())).or_default() += 1;
    });
    let groups = config.groups.iter().map(|g| g.id.as_str()).chain(std::iter::once("none"));
    for g in groups {
        for state in ["started", "queued", "ringing", "talking"] {
            let n = by.get(&(g, state)).copied().unwrap_or(0);
            metrics::gauge!("callbridge_calls_active", "group" => g.to_string(), "state" => state).set(n as f64);
        }
    }
}
