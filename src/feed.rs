//! The live feed of lifecycle events, for readers that follow the events as
//! they happen (the API's `GET /v1/events` stream and the monitor page).
//!
//! The pipeline publishes each batch here once it is durable, right after
//! the registry has seen it; the feed keeps the last `window` events in a
//! ring (newest last), each with a position that grows by one per event.
//! A reader remembers the position it has read up to, is woken when the
//! newest position moves, and copies out what came since. So a reader that
//! reconnects with the id of the last event it saw resumes exactly after
//! it, as long as that event is still in the window; past the window it is
//! told to start over from the registry.
//!
//! It must never slow the pipeline: publishing takes one short lock per
//! batch, moves the events in (no copy, no serialization: the JSON is made
//! once, by the first reader that needs it) and never waits for a reader.
//! The window is the only buffer readers share: a reader holds its place
//! as a position, not as copies, so a slow reader costs no memory until it
//! is a whole window behind; then it has lost events and must notice
//! ([`Lapsed`], [`Feed::lapsed`]); what it does then is its own business.

use crate::event::Event;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the feed keeps and how much each reader may hold (`[api]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedSettings {
    /// The PBX's name: event ids and CloudEvents `source`.
    pub pbx: String,
    /// Events kept for readers that resume (`Last-Event-ID`), and how far
    /// behind the newest event a reader may fall before it is dropped.
    pub window: usize,
}

impl Default for FeedSettings {
    fn default() -> Self {
        FeedSettings { pbx: String::new(), window: DEFAULT_WINDOW }
    }
}

/// Default `[api] events_window`: some 10 to 20 MB of events at most (an
/// event and, once a reader needed it, its JSON).
pub const DEFAULT_WINDOW: usize = 10_000;

/// One event as the feed keeps it.
#[derive(Debug)]
pub struct FeedEvent {
    /// Its position in the feed (1 for the first event published).
    pub position: u64,
    pub event: Event,
    rendered: OnceLock<(String, String)>,
}

impl FeedEvent {
    /// The CloudEvents `id`.
    pub fn id(&self, pbx: &str) -> &str {
        &self.render(pbx).0
    }

    /// The event as the sinks get it: CloudEvents structured JSON, one line.
    pub fn json(&self, pbx: &str) -> &str {
        &self.render(pbx).1
    }

    fn render(&self, pbx: &str) -> &(String, String) {
        self.rendered.get_or_init(|| (self.event.id(pbx), self.event.to_cloudevent_json(pbx)))
    }
}

/// A reader fell behind the window: what it had not read is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lapsed;

/// Where a new reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// The position read up to (the reader gets what comes after it).
    pub after: u64,
    /// The event id asked to resume from is no longer (or never was) in
    /// the window: the reader must start over from the current state.
    pub reset: bool,
}

struct Ring {
    events: VecDeque<Arc<FeedEvent>>,
    /// Position of the newest event published (0: none yet).
    newest: u64,
}

/// The feed (one per daemon, shared by the pipeline and the API).
pub struct Feed {
    settings: FeedSettings,
    // Held for one batch's push (writer) or one copy of a few `Arc`s
    // (readers); never across an await.
    ring: Mutex<Ring>,
    newest: watch::Sender<u64>,
    closed: CancellationToken,
}

impl Feed {
    pub fn new(settings: FeedSettings) -> Feed {
        let window = settings.window.max(1);
        Feed {
            settings: FeedSettings { window, ..settings },
            ring: Mutex::new(Ring { events: VecDeque::with_capacity(window.min(4096)), newest: 0 }),
            newest: watch::Sender::new(0),
            closed: CancellationToken::new(),
        }
    }

    pub fn settings(&self) -> &FeedSettings {
        &self.settings
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // Every mutation leaves the ring consistent: a poisoned lock is usable.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes durable events, in order; the oldest fall out of the window.
    pub fn publish(&self, events: impl IntoIterator<Item = Event>) {
        let newest = {
            let mut ring = self.ring();
            for event in events {
                ring.newest += 1;
                let position = ring.newest;
                ring.events.push_back(Arc::new(FeedEvent { position, event, rendered: OnceLock::new() }));
            }
            let excess = ring.events.len().saturating_sub(self.settings.window);
            ring.events.drain(..excess);
            ring.newest
        };
        self.newest.send_if_modified(|n| std::mem::replace(n, newest) != newest);
    }

    /// Where a reader resuming after the event `last_id` (or, without one,
    /// from now on) starts.
    pub fn start(&self, last_id: Option<&str>) -> Start {
        let ring = self.ring();
        let Some(id) = last_id else { return Start { after: ring.newest, reset: false } };
        match ring.events.iter().rev().find(|e| e.id(&self.settings.pbx) == id) {
            Some(e) => Start { after: e.position, reset: false },
            None => Start { after: ring.newest, reset: true },
        }
    }

    /// The events after position `after`, oldest first, at most `max`.
    pub fn since(&self, after: u64, max: usize) -> Result<Vec<Arc<FeedEvent>>, Lapsed> {
        let ring = self.ring();
        let first = ring.newest + 1 - ring.events.len() as u64;
        if after + 1 < first {
            return Err(Lapsed);
        }
        let skip = (after + 1 - first) as usize;
        Ok(ring.events.iter().skip(skip).take(max).cloned().collect())
    }

    /// Whether the event at `position` has fallen out of the window.
    pub fn lapsed(&self, position: u64) -> bool {
        let ring = self.ring();
        position + (ring.events.len() as u64) <= ring.newest
    }

    /// Position of the newest event published (0: none yet).
    pub fn newest(&self) -> u64 {
        *self.newest.borrow()
    }

    /// Wakes when the newest position moves (see [`watch::Receiver::changed`]).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// No event will be published any more (shutdown): readers end.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Resolves once [`Feed::close`] was called.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.closed.cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::ids::AgentId;

    fn agent_event(t: i64) -> Event {
        Event {
            seq: 0,
            time: t,
            kind: EventKind::AgentAvailability {
                agent: AgentId::new("maria"),
                available: true,
                reason: None,
                source: crate::event::AvailabilitySource::Api,
            },
            call: None,
        }
    }

    fn feed(window: usize) -> Feed {
        Feed::new(FeedSettings { pbx: "lab".into(), window })
    }

    #[test]
    fn readers_resume_inside_the_window_and_reset_outside_it() {
        let f = feed(3);
        f.publish((1..=5).map(agent_event));
        assert_eq!(f.newest(), 5);
        // Events 3, 4, 5 are kept.
        let got = f.since(2, 10).expect("in the window");
        assert_eq!(got.iter().map(|e| e.position).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(matches!(f.since(1, 10), Err(Lapsed)), "event 2 is out of the window");
        assert_eq!(f.since(5, 10).map(|v| v.len()), Ok(0));
        let id4 = f.since(3, 1).expect("kept")[0].id("lab").to_string();
        assert_eq!(id4, "lab:agent:maria:4");
        assert_eq!(f.start(Some(&id4)), Start { after: 4, reset: false });
        assert_eq!(f.start(Some("lab:agent:maria:1")), Start { after: 5, reset: true });
        assert_eq!(f.start(None), Start { after: 5, reset: false });
        assert!(f.lapsed(2) && !f.lapsed(3));
    }

    #[test]
    fn json_is_the_sinks_json() {
        let f = feed(2);
        f.publish([agent_event(7)]);
        let e = &f.since(0, 1).expect("kept")[0];
        assert_eq!(e.json("lab"), agent_event(7).to_cloudevent_json("lab"));
    }
}
