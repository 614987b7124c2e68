//! The runtime state the pipeline, the HTTP API and delivery share, and the
//! commands that reach the pipeline from outside the event stream.
//!
//! It sits below all three (none of them imports another for these types),
//! holds no logic beyond small accessors, and must never change call state
//! itself: only the pipeline task does, when it handles a [`Command`].

use crate::ami::connection::AmiHandle;
use crate::config::Config;
use crate::directory::Directory;
use crate::event::{CallSnapshot, Micros};
use crate::ids::AgentId;
use crate::indicators::Indicators;
use crate::normalize::{ExpectedOriginate, Suspect};
use crate::registry::Registry;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// What `/readyz` reports: each source of truth sets its own flag.
#[derive(Debug, Default)]
pub struct Readiness {
    /// AMI connected and logged in (or no AMI configured).
    pub pbx: AtomicBool,
    /// The outbox accepts writes (false when the disk is full).
    pub outbox: AtomicBool,
}

impl Readiness {
    pub fn set_pbx(&self, v: bool) {
        self.pbx.store(v, Ordering::Relaxed);
    }
    pub fn set_outbox(&self, v: bool) {
        self.outbox.store(v, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.pbx.load(Ordering::Relaxed) && self.outbox.load(Ordering::Relaxed)
    }
}

/// State shared with the API (read-mostly).
pub struct Shared {
    pub registry: Arc<Registry>,
    /// Durable events as they come, for the event stream (`GET /v1/events`).
    pub feed: Arc<crate::feed::Feed>,
    /// Whether this instance delivers and controls (a hot-standby pair's
    /// leader, or alone).
    pub leadership: Arc<crate::ha::Leadership>,
    pub readiness: Arc<Readiness>,
    pub indicators: Mutex<Indicators>,
    pub config: RwLock<Arc<Config>>,
    /// The directory of `config`, built once per configuration (not per
    /// request); replaced with it on reload.
    directory: RwLock<Arc<Directory>>,
    pub ami: Option<AmiHandle>,
    pub commands: mpsc::Sender<Command>,
    /// Agents' presence as the normalizer knows it, for concurrent readers
    /// (FastAGI routing). Only the pipeline task writes it.
    pub presence: Arc<crate::routing::PresenceBoard>,
    /// The durable outbox, when sinks other than stdout are configured
    /// (dead letters for the API).
    pub outbox: Option<crate::outbox::Outbox>,
    /// The PBX's clock as last seen (µs), and when; `None` before the
    /// first timestamp (the wall clock stands in).
    clock: Mutex<Option<(Micros, Instant)>>,
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
        directory: Arc<Directory>,
        registry: Arc<Registry>,
        readiness: Arc<Readiness>,
        ami: Option<AmiHandle>,
        commands: mpsc::Sender<Command>,
        outbox: Option<crate::outbox::Outbox>,
    ) -> Shared {
        Shared {
            indicators: Mutex::new(Indicators::new(&config)),
            config: RwLock::new(config),
            directory: RwLock::new(directory),
            registry,
            feed: Arc::new(crate::feed::Feed::new(crate::feed::FeedSettings::default())),
            leadership: Arc::new(crate::ha::Leadership::single()),
            readiness,
            ami,
            commands,
            presence: Arc::new(crate::routing::PresenceBoard::new()),
            outbox,
            clock: Mutex::new(None),
        }
    }

    /// With the feed of the event stream (`[api] events_window`).
    pub fn with_feed(mut self, feed: Arc<crate::feed::Feed>) -> Shared {
        self.feed = feed;
        self
    }

    /// With the role of a hot-standby pair (`[ha]`).
    pub fn with_leadership(mut self, leadership: Arc<crate::ha::Leadership>) -> Shared {
        self.leadership = leadership;
        self
    }

    /// The PBX's current time: its last timestamp plus the time since.
    /// A replayed trace brings its own time, a live PBX its own clock.
    pub fn pbx_now(&self) -> Micros {
        self.pbx_now_then_saw(None)
    }

    /// [`Shared::pbx_now`], then a frame's timestamp `seen` taken as the
    /// PBX's time: one lock and one clock read per frame for both.
    pub(crate) fn pbx_now_then_saw(&self, seen: Option<Micros>) -> Micros {
        let mut c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        let at_now = Instant::now();
        let now = match *c {
            Some((t, at)) => t + at_now.saturating_duration_since(at).as_micros() as i64,
            None => wall_micros(),
        };
        // Frames of one PBX are in time order; never move the clock back.
        match (seen, *c) {
            (Some(t), Some(_)) if t <= now => {}
            (Some(t), _) => *c = Some((t, at_now)),
            (None, _) => {}
        }
        now
    }

    /// The directory of the running configuration.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the configuration and its directory (reload).
    pub fn set_config(&self, config: Arc<Config>, directory: Arc<Directory>) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        *self.directory.write().unwrap_or_else(|p| p.into_inner()) = directory;
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn wall_micros() -> Micros {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Requests to the pipeline from outside the event stream.
pub enum Command {
    /// An administrator removes a live call (`call.ended`, `end_reason: removed`).
    RemoveCall { id: String, reply: oneshot::Sender<Option<CallSnapshot>> },
    /// A validated new configuration (SIGHUP).
    Reload { config: Arc<Config> },
    /// The PBX's answer about suspect calls: ids of calls (Linkedids) it
    /// still has, or `None` when it could not be asked.
    SweepVerdict { suspects: Vec<Suspect>, alive: Option<HashSet<String>> },
    /// A click-to-call is about to be sent to the PBX; the reply says it is
    /// noted (so its `OriginateResponse` cannot overtake it).
    ExpectOriginate { originate: ExpectedOriginate, reply: oneshot::Sender<()> },
    /// Which agent talks in a live call, and on which channel (for a
    /// transfer); `None` when nobody does.
    TalkingChannel { call: String, reply: oneshot::Sender<Option<(AgentId, String)>> },
    /// The helpdesk refused the caller of an inbound call (Zammad's
    /// `reject`): mark the call so that it ends `missed`/`blocked`, and
    /// reply with the caller's channel to hang up; `None` when the call is
    /// answered, outbound or gone (nothing is marked then).
    BlockCaller { call: String, reply: oneshot::Sender<Option<String>> },
    /// The PBX did not hang up a caller marked by [`Command::BlockCaller`]:
    /// take the mark back.
    UnblockCaller { call: String },
    /// The agent switched "available for calls" in the helpdesk
    /// (`agent.availability`, `source: api`); replies false for an unknown agent.
    /// `queues` are the agent's queues about to be (un)paused on the PBX.
    SetAvailable {
        agent: String,
        available: bool,
        reason: Option<String>,
        queues: Vec<String>,
        reply: oneshot::Sender<bool>,
    },
}
