//! Pairs what the PBX sends with the actions waiting for it: the AMI
//! client's bookkeeping of one connection, as a pure state machine.
//!
//! The connection loop tells a [`Correlator`] what happened (an action was
//! written, a frame was read, the timer fired, the connection ended),
//! always with the time it happened, and carries out what comes back as
//! [`Output`]s: an event for the pipeline, an answer for a caller, the
//! resync listings.
//!
//! # Rules
//!
//! - A frame carrying the `ActionID` of a pending action is its reply or one
//!   of its list items; everything else is an unsolicited event, passed on in
//!   stream order. An `Event:` frame tagged with a pending single action
//!   (before its reply), or with an action no longer pending (an
//!   `OriginateResponse` after `Originate`'s reply) is an event like any other.
//! - A list collects items until its `…Complete` event; every item restarts
//!   its deadline, so long lists live as long as items keep coming.
//! - A late reply (its action timed out) is dropped; the late items of a
//!   list that timed out or overflowed are swallowed up to its `…Complete`
//!   (a bounded tombstone list).
//! - The keepalive `Ping` is judged only on time spent listening: its
//!   deadline is never earlier than the last frame read plus the action
//!   timeout, so a slow pipeline is not mistaken for a dead PBX.
//! - After a (re)connection, `CoreShowChannels` and `QueueStatus` become one
//!   [`Resync`]; no resync when the channel listing fails, channels only
//!   when the queue listing fails.
//!
//! This module must never touch a socket, a channel, a task or the clock:
//! every instant is passed in, every effect is returned. It is generic over
//! how a caller is answered (`S` for single actions, `L` for lists) so that
//! its tests use plain values.

use super::action::Action;
use super::error::ActionError;
use super::frame::Frame;
use super::handle::{ListResponse, Resync};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Most actions awaiting a reply at once; more get [`ActionError::Busy`].
pub(crate) const MAX_IN_FLIGHT: usize = 1024;
/// Most items one list may carry (a PBX with 100,000 calls has ~200,000
/// channels); beyond it the list fails instead of growing memory.
pub(crate) const MAX_LIST_ITEMS: usize = 1_000_000;
/// Timed-out lists whose late items are still swallowed.
const MAX_DRAINING: usize = 64;

/// Mints `ActionID`s: `cb-1`, `cb-2`, …, unique for the life of a client
/// (across its connections, so a late reply can never match a newer action).
#[derive(Debug, Default)]
pub(crate) struct ActionIds {
    last: u64,
}

impl ActionIds {
    pub(crate) fn next(&mut self) -> String {
        self.last += 1;
        format!("cb-{}", self.last)
    }
}

/// Who waits for an action's answer.
#[derive(Debug)]
pub(crate) enum Expect<S, L> {
    /// A caller of `send`: gets the reply frame.
    Reply(S),
    /// A caller of `send_list`: gets the list.
    List(L),
    /// The keepalive `Ping`: its reply only proves the PBX alive.
    Keepalive,
    /// One of the listings taken after (re)connecting.
    Resync(ResyncPart),
}

impl<S, L> Expect<S, L> {
    /// Sent on behalf of a handle (counted against [`MAX_IN_FLIGHT`]).
    pub(crate) fn is_caller(&self) -> bool {
        matches!(self, Expect::Reply(_) | Expect::List(_))
    }
}

/// The two listings of a resync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResyncPart {
    Channels,
    Queues,
}

/// What the connection loop must do.
#[derive(Debug)]
pub(crate) enum Output<S, L> {
    /// Pass an unsolicited event to the pipeline.
    Event(Frame),
    /// Answer a caller of `send`.
    Reply(S, Result<Frame, ActionError>),
    /// Answer a caller of `send_list`.
    List(L, Result<ListResponse, ActionError>),
    /// Pass the PBX's view after a (re)connection to the pipeline.
    Resync(Resync),
}

/// An action that got its answer (or whose list failed), for the action
/// duration histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answered {
    pub label: &'static str,
    pub elapsed: Duration,
}

/// What one frame led to: at most one output and one answered action.
#[derive(Debug)]
pub(crate) struct Routed<S, L> {
    pub output: Option<Output<S, L>>,
    pub answered: Option<Answered>,
}

impl<S, L> Routed<S, L> {
    fn nothing() -> Self {
        Routed { output: None, answered: None }
    }

    fn event(f: Frame) -> Self {
        Routed { output: Some(Output::Event(f)), answered: None }
    }
}

/// What the timer led to: actions that timed out.
#[derive(Debug)]
pub(crate) struct Expired<S, L> {
    pub outputs: Vec<Output<S, L>>,
    pub answered: Vec<Answered>,
}

/// The keepalive `Ping` went unanswered: the connection is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeepaliveLost;

struct Pending<S, L> {
    name: String,
    label: &'static str,
    started: Instant,
    deadline: Instant,
    waiter: Waiter<S, L>,
}

enum Waiter<S, L> {
    Single(S),
    List {
        to: ListTo<L>,
        /// Boxed: most waiters are single actions and pings.
        response: Option<Box<Frame>>,
        items: Vec<Frame>,
    },
    Keepalive,
}

enum ListTo<L> {
    Caller(L),
    Resync(ResyncPart),
}

#[derive(Default)]
struct ResyncState {
    /// False once the channel list failed: no `Resync` for this connection.
    active: bool,
    channels: Option<Vec<Frame>>,
    queues: Option<Vec<Frame>>,
}

/// The actions awaiting an answer on one connection.
pub(crate) struct Correlator<S, L> {
    pending: HashMap<String, Pending<S, L>>,
    /// Lists that timed out or overflowed: their late items are swallowed
    /// until their `EventList: Complete`. Bounded by [`MAX_DRAINING`].
    draining: VecDeque<String>,
    /// `ActionID` of the outstanding keepalive `Ping`.
    keepalive: Option<String>,
    resync: ResyncState,
    /// When the last message was read (after it was passed on).
    last_rx: Instant,
    action_timeout: Duration,
    ping_interval: Duration,
}

impl<S, L> Correlator<S, L> {
    /// A fresh connection, logged in at `now`.
    pub(crate) fn new(now: Instant, action_timeout: Duration, ping_interval: Duration) -> Self {
        Correlator {
            pending: HashMap::new(),
            draining: VecDeque::new(),
            keepalive: None,
            resync: ResyncState::default(),
            last_rx: now,
            action_timeout,
            ping_interval,
        }
    }

    /// True when a caller's action must be refused with [`ActionError::Busy`].
    pub(crate) fn is_full(&self) -> bool {
        self.pending.len() >= MAX_IN_FLIGHT
    }

    /// Starts collecting a resync: the listings to send, in order.
    pub(crate) fn begin_resync(&mut self) -> [(Action, Expect<S, L>); 2] {
        self.resync = ResyncState { active: true, ..ResyncState::default() };
        [
            (Action::new("CoreShowChannels"), Expect::Resync(ResyncPart::Channels)),
            (Action::new("QueueStatus"), Expect::Resync(ResyncPart::Queues)),
        ]
    }

    /// Records an action written at `now` under `id`; returns its deadline.
    pub(crate) fn register(
        &mut self,
        id: String,
        name: String,
        label: &'static str,
        expect: Expect<S, L>,
        now: Instant,
    ) -> Instant {
        let deadline = now + self.action_timeout;
        let waiter = match expect {
            Expect::Reply(s) => Waiter::Single(s),
            Expect::List(l) => Waiter::list(ListTo::Caller(l)),
            Expect::Resync(part) => Waiter::list(ListTo::Resync(part)),
            Expect::Keepalive => {
                self.keepalive = Some(id.clone());
                Waiter::Keepalive
            }
        };
        self.pending.insert(id, Pending { name, label, started: now, deadline, waiter });
        deadline
    }

    /// A message was read and passed on at `now`: the PBX is alive.
    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// Routes a frame read at `now` to the action it belongs to, or out as
    /// an event.
    pub(crate) fn on_frame(&mut self, f: Frame, now: Instant) -> Routed<S, L> {
        let Some(id) = f.action_id() else {
            return Routed::event(f);
        };
        let is_list = match self.pending.get(id) {
            None => return self.unclaimed(f),
            Some(p) => matches!(p.waiter, Waiter::List { .. }),
        };
        let id = id.to_string();
        if is_list {
            self.list_frame(id, f, now)
        } else {
            self.reply_frame(id, f, now)
        }
    }

    /// A frame whose `ActionID` is not pending: a late list item, a late
    /// reply, or an event.
    fn unclaimed(&mut self, f: Frame) -> Routed<S, L> {
        let Some(id) = f.action_id() else {
            return Routed::event(f);
        };
        if let Some(i) = self.draining.iter().position(|d| d == id) {
            if is_list_complete(&f) {
                self.draining.remove(i);
            }
            return Routed::nothing();
        }
        if f.event().is_none() && f.response().is_some() {
            debug!(action_id = id, "late or unknown AMI reply dropped");
            return Routed::nothing();
        }
        Routed::event(f)
    }

    /// A frame for a pending single action or keepalive.
    fn reply_frame(&mut self, id: String, f: Frame, now: Instant) -> Routed<S, L> {
        if f.response().is_none() {
            // An event tagged with the action (before its reply).
            return Routed::event(f);
        }
        let Some(p) = self.pending.remove(&id) else {
            return Routed::nothing();
        };
        let answered = Some(p.answered(now));
        let output = match p.waiter {
            Waiter::Single(to) => {
                let r = if is_error(&f) {
                    Err(ActionError::Rejected { action: p.name, message: message_of(&f), response: Box::new(f) })
                } else {
                    Ok(f)
                };
                Some(Output::Reply(to, r))
            }
            Waiter::Keepalive => {
                self.keepalive = None;
                None
            }
            Waiter::List { .. } => None,
        };
        Routed { output, answered }
    }

    /// A frame for a pending list: its opening reply, an item, or the end.
    fn list_frame(&mut self, id: String, f: Frame, now: Instant) -> Routed<S, L> {
        let Some(p) = self.pending.get_mut(&id) else {
            return Routed::nothing();
        };
        let Waiter::List { response, items, .. } = &mut p.waiter else {
            return Routed::nothing();
        };
        let step = if response.is_none() && f.response().is_some() {
            // No `EventList: start`: an error, or an action that is not a
            // list after all; either way nothing follows.
            let done = is_error(&f) || !f.get("EventList").is_some_and(|v| v.eq_ignore_ascii_case("start"));
            *response = Some(Box::new(f));
            if done {
                ListStep::Done
            } else {
                ListStep::More
            }
        } else if is_list_complete(&f) {
            ListStep::Done
        } else if items.len() >= MAX_LIST_ITEMS {
            ListStep::Overflow
        } else {
            items.push(f);
            ListStep::More
        };
        // A long list is alive as long as items keep coming.
        p.deadline = now + self.action_timeout;
        match step {
            ListStep::More => Routed::nothing(),
            ListStep::Done => match self.pending.remove(&id) {
                Some(p) => self.finish_list(p, Ok(()), now),
                None => Routed::nothing(),
            },
            ListStep::Overflow => {
                let routed = match self.pending.remove(&id) {
                    Some(p) => {
                        let e = ActionError::ListTooLong { action: p.name.clone(), limit: MAX_LIST_ITEMS };
                        self.finish_list(p, Err(e), now)
                    }
                    None => Routed::nothing(),
                };
                self.add_draining(id);
                routed
            }
        }
    }

    /// Completes a list action (`Ok(())`: as collected; `Err`: failed).
    fn finish_list(&mut self, p: Pending<S, L>, outcome: Result<(), ActionError>, now: Instant) -> Routed<S, L> {
        let answered = Some(p.answered(now));
        let Waiter::List { to, response, items } = p.waiter else {
            return Routed { output: None, answered };
        };
        let result = outcome.and_then(|()| match response {
            Some(r) if is_error(&r) => {
                Err(ActionError::Rejected { action: p.name.clone(), message: message_of(&r), response: r })
            }
            Some(r) => Ok(ListResponse { response: *r, items }),
            // The list completed without an opening reply (broken peer).
            None => Err(ActionError::Rejected {
                action: p.name.clone(),
                message: "list without a reply".into(),
                response: Box::new(Frame::from_pairs::<&str, &str>(&[])),
            }),
        });
        let output = match to {
            ListTo::Caller(l) => Some(Output::List(l, result)),
            ListTo::Resync(part) => self.resync_part(part, result).map(Output::Resync),
        };
        Routed { output, answered }
    }

    /// Takes in one resync listing; the [`Resync`] once both are in.
    fn resync_part(&mut self, part: ResyncPart, result: Result<ListResponse, ActionError>) -> Option<Resync> {
        if !self.resync.active {
            return None;
        }
        match (part, result) {
            (ResyncPart::Channels, Ok(list)) => self.resync.channels = Some(list.items),
            (ResyncPart::Queues, Ok(list)) => self.resync.queues = Some(list.items),
            (ResyncPart::Channels, Err(e)) => {
                warn!(error = %e, "CoreShowChannels failed after (re)connecting; no resync on this connection");
                self.resync.active = false;
                return None;
            }
            (ResyncPart::Queues, Err(e)) => {
                warn!(error = %e, "QueueStatus failed after (re)connecting; resyncing channels only");
                self.resync.queues = Some(Vec::new());
            }
        }
        if self.resync.channels.is_none() || self.resync.queues.is_none() {
            return None;
        }
        self.resync.active = false;
        let channels = self.resync.channels.take().unwrap_or_default();
        let queue_items = self.resync.queues.take().unwrap_or_default();
        info!(channels = channels.len(), queue_items = queue_items.len(), "AMI resync collected");
        Some(Resync { channels, queue_items })
    }

    /// Expires the actions overdue at `now`. `Err` when the keepalive is
    /// overdue: then nothing else is expired (the connection is dropped and
    /// every pending action fails with it).
    pub(crate) fn on_timer(&mut self, now: Instant) -> Result<Expired<S, L>, KeepaliveLost> {
        if let Some(p) = self.keepalive.as_ref().and_then(|id| self.pending.get_mut(id)) {
            // Its reply may still be queued behind events we were slow to
            // read: a full timeout from the last frame read.
            p.deadline = p.deadline.max(self.last_rx + self.action_timeout);
            if p.deadline <= now {
                return Err(KeepaliveLost);
            }
        }
        let overdue: Vec<String> =
            self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| id.clone()).collect();
        let mut expired = Expired { outputs: Vec::new(), answered: Vec::new() };
        for id in overdue {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            let e = ActionError::Timeout { action: p.name.clone(), timeout: self.action_timeout };
            match p.waiter {
                Waiter::Keepalive => return Err(KeepaliveLost),
                Waiter::Single(s) => expired.outputs.push(Output::Reply(s, Err(e))),
                Waiter::List { .. } => {
                    self.add_draining(id);
                    let routed = self.finish_list(p, Err(e), now);
                    expired.outputs.extend(routed.output);
                    expired.answered.extend(routed.answered);
                }
            }
        }
        Ok(expired)
    }

    /// True when a keepalive `Ping` should be sent at `now`.
    pub(crate) fn ping_due(&self, now: Instant) -> bool {
        self.keepalive.is_none() && now >= self.last_rx + self.ping_interval
    }

    /// When [`Correlator::on_timer`] should next run: the earliest deadline,
    /// or the next keepalive; never before `now`.
    pub(crate) fn next_wakeup(&self, now: Instant) -> Instant {
        let mut next = self.pending.values().map(|p| p.deadline).min().unwrap_or(now + self.ping_interval);
        if self.keepalive.is_none() {
            next = next.min(self.last_rx + self.ping_interval);
        }
        next.max(now)
    }

    /// The connection ended: every caller still waiting gets
    /// [`ActionError::ConnectionLost`].
    pub(crate) fn close(&mut self) -> Vec<Output<S, L>> {
        self.keepalive = None;
        self.resync = ResyncState::default();
        self.pending
            .drain()
            .filter_map(|(_, p)| {
                let e = ActionError::ConnectionLost { action: p.name };
                match p.waiter {
                    Waiter::Single(s) => Some(Output::Reply(s, Err(e))),
                    Waiter::List { to: ListTo::Caller(l), .. } => Some(Output::List(l, Err(e))),
                    Waiter::List { to: ListTo::Resync(_), .. } | Waiter::Keepalive => None,
                }
            })
            .collect()
    }

    fn add_draining(&mut self, id: String) {
        if self.draining.len() >= MAX_DRAINING {
            self.draining.pop_front();
        }
        self.draining.push_back(id);
    }
}

enum ListStep {
    More,
    Done,
    Overflow,
}

impl<S, L> Pending<S, L> {
    fn answered(&self, now: Instant) -> Answered {
        Answered { label: self.label, elapsed: now.saturating_duration_since(self.started) }
    }
}

impl<S, L> Waiter<S, L> {
    fn list(to: ListTo<L>) -> Self {
        Waiter::List { to, response: None, items: Vec::new() }
    }
}

fn is_list_complete(f: &Frame) -> bool {
    f.event().is_some() && f.get("EventList").is_some_and(|v| v.eq_ignore_ascii_case("Complete"))
}

/// `Response: Error`.
pub(crate) fn is_error(f: &Frame) -> bool {
    f.response().is_some_and(|r| r.eq_ignore_ascii_case("Error"))
}

/// The `Message:` of a reply, empty without one.
pub(crate) fn message_of(f: &Frame) -> String {
    f.get("Message").unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    //! Made-up frames and instants: no socket, no channel, no sleeping.

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);
    const PING: Duration = Duration::from_secs(20);

    /// Callers are plain numbers: the output says who gets what.
    type Book = Correlator<u32, u32>;

    fn frame(pairs: &[(&str, &str)]) -> Frame {
        Frame::from_pairs(pairs)
    }

    fn reply(id: &str) -> Frame {
        frame(&[("Response", "Success"), ("ActionID", id), ("Message", "ok")])
    }

    fn t(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn book(base: Instant) -> Book {
        Correlator::new(base, TIMEOUT, PING)
    }

    fn send(b: &mut Book, id: &str, name: &str, expect: Expect<u32, u32>, at: Instant) -> Instant {
        b.register(id.into(), name.into(), "other", expect, at)
    }

    fn reply_to(r: Routed<u32, u32>) -> (u32, Result<Frame, ActionError>) {
        match r.output {
            Some(Output::Reply(to, result)) => (to, result),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn list_to(r: Option<Output<u32, u32>>) -> (u32, Result<ListResponse, ActionError>) {
        match r {
            Some(Output::List(to, result)) => (to, result),
            other => panic!("expected a list answer, got {other:?}"),
        }
    }

    fn is_event(r: &Routed<u32, u32>, name: &str) -> bool {
        matches!(&r.output, Some(Output::Event(f)) if f.event() == Some(name)) && r.answered.is_none()
    }

    fn is_nothing(r: &Routed<u32, u32>) -> bool {
        r.output.is_none() && r.answered.is_none()
    }

    #[test]
    fn replies_go_to_their_callers_in_any_order_and_events_pass_through() {
        let t0 = Instant::now();
        let mut b = book(t0);
        send(&mut b, "cb-1", "Getvar", Expect::Reply(1), t0);
        send(&mut b, "cb-2", "Getvar", Expect::Reply(2), t(t0, 5));
        assert!(is_event(&b.on_frame(frame(&[("Event", "Newchannel")]), t(t0, 6)), "Newchannel"));
        let second = b.on_frame(reply("cb-2"), t(t0, 30));
        assert_eq!(second.answered, Some(Answered { label: "other", elapsed: Duration::from_millis(25) }));
        let (to, r) = reply_to(second);
        assert_eq!((to, r.map(|f| f.action_id().map(str::to_string))), (2, Ok(Some("cb-2".into()))));
        let (to, r) = reply_to(b.on_frame(reply("cb-1"), t(t0, 40)));
        assert_eq!(to, 1);
        assert!(r.is_ok());
        // Answered: the same reply again is late and dropped.
        assert!(is_nothing(&b.on_frame(reply("cb-1"), t(t0, 50))));
    }

    #[test]
    fn an_error_reply_is_a_rejection_with_the_message() {
        let t0 = Instant::now();
        let mut b = book(t0);
        send(&mut b, "cb-1", "Hangup", Expect::Reply(7), t0);
        let error = frame(&[("Response", "Error"), ("ActionID", "cb-1"), ("Message", "No such channel")]);
        let (_, r) = reply_to(b.on_frame(error, t(t0, 1)));
        assert!(matches!(r, Err(ActionError::Rejected { ref action, ref message, .. })
            if action == "Hangup" && message == "No such channel"));
    }

    #[test]
    fn events_tagged_with_an_action_are_events() {
        let t0 = Instant::now();
        let mut b = book(t0);
        send(&mut b, "cb-1", "Originate", Expect::Reply(1), t0);
        // Before the reply: an event carrying the ActionID is still an event.
        let early = frame(&[("Event", "VarSet"), ("ActionID", "cb-1")]);
        assert!(is_event(&b.on_frame(early, t(t0, 1)), "VarSet"));
        assert!(b.on_frame(reply("cb-1"), t(t0, 2)).output.is_some());
        // After it: `OriginateResponse` is an event like any other.
        let late = frame(&[("Event", "OriginateResponse"), ("ActionID", "cb-1"), ("Response", "Success")]);
        assert!(is_event(&b.on_frame(late, t(t0, 3)), "OriginateResponse"));
        // An unknown ActionID on a bare reply is dropped.
        assert!(is_nothing(&b.on_frame(reply("cb-99"), t(t0, 4))));
    }

    fn list_start(id: &str) -> Frame {
        frame(&[("Response", "Success"), ("ActionID", id), ("EventList", "start")])
    }

    fn item(id: &str, n: &str) -> Frame {
        frame(&[("Event", "CoreShowChannel"), ("ActionID", id), ("Channel", n)])
    }

    fn complete(id: &str) -> Frame {
        frame(&[("Event", "CoreShowChannelsComplete"), ("ActionID", id), ("EventList", "Complete")])
    }

    #[test]
    fn a_list_collects_its_items_until_complete_and_every_item_extends_its_deadline() {
        let t0 = Instant::now();
        let mut b = book(t0);
        send(&mut b, "cb-1", "CoreShowChannels", Expect::List(3), t0);
        assert!(is_nothing(&b.on_frame(list_start("cb-1"), t(t0, 1))));
        // Items keep coming past the first deadline: the list is alive.
        assert!(is_nothing(&b.on_frame(item("cb-1", "SIP/a"), t(t0, 9_000))));
        assert!(is_nothing(&b.on_frame(item("cb-1", "SIP/b"), t(t0, 18_000))));
        let expired = b.on_timer(t(t0, 20_000)).expect("no keepalive");
        assert!(expired.outputs.is_empty(), "not overdue: {:?}", expired.outputs);
        let done = b.on_frame(complete("cb-1"), t(t0, 21_000));
        assert_eq!(done.answered.map(|a| a.elapsed), Some(Duration::from_secs(21)));
        let (to, r) = list_to(done.output);
        let list = r.expect("a complete list");
        assert_eq!(to, 3);
        assert_eq!(list.response.get("EventList"), Some("start"));
        let channels: Vec<_> = list.items.iter().filter_map(|f| f.get("Channel")).collect();
        assert_eq!(channels, ["SIP/a", "SIP/b"]);
    }

    #[test]
    fn a_list_refused_or_not_a_list_ends_at_its_reply() {
        let t0 = Instant::now();
        let mut b = book(t0);
        send(&mut b, "cb-1", "QueueStatus", Expect::List(1), t0);
        let refused = frame(&[("Response", "Error"), ("ActionID", "cb-1"), ("Message", "Permission denied")]);
        let (_, r) = list_to(b.on_frame(refused, t(t0, 1)).output);
        assert!(matches!(r, Err(ActionError::Rejected { ref message, .. }) if message == "Permission denied"));
        send(&mut b, "cb-2", "Ping", Expect::List(2), t0);
        let (_, r) = list_to(b.on_frame(reply("cb-2"), t(t0, 1)).output);
        assert!(r.expect("a plain reply is an empty list").items.is_empty());
    }

    #[test]
    fn a_timed_out_action_fails_and_its_late_answers_are_dropped() {
        let t0 = Instant::now();
        let mut b = book(t0);
        let deadline = send(&mut b, "cb-1", "Getvar", Expect::Reply(1), t0);
        assert_eq!(deadline, t0 + TIMEOUT);
        assert!(b.on_timer(t(t0, 9_999)).expect("no keepalive").outputs.is_empty());
        let mut expired = b.on_timer(deadline).expect("no keepalive");
        assert!(expired.answered.is_empty(), "a timeout is not a duration sample");
        match expired.outputs.pop() {
            Some(Output::Reply(1, Err(ActionError::Timeout { action, timeout }))) => {
                assert_eq!((action.as_str(), timeout), ("Getvar", TIMEOUT));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(is_nothing(&b.on_frame(reply("cb-1"), t(t0, 10_500))));
    }

    #[test]
    fn a_timed_out_list_swallows_its_late_items_up_to_complete() {
        let t0 = Instant::now();
        let mut b = book(t0);
        send(&mut b, "cb-1", "CoreShowChannels", Expect::List(4), t0);
        let mut expired = b.on_timer(t0 + TIMEOUT).expect("no keepalive");
        let (to, r) = list_to(expired.outputs.pop());
        assert_eq!(to, 4);
        assert!(matches!(r, Err(ActionError::Timeout { .. })));
        assert_eq!(expired.answered.len(), 1, "a failed list is still a duration sample");
        assert!(is_nothing(&b.on_frame(list_start("cb-1"), t(t0, 10_001))));
        assert!(is_nothing(&b.on_frame(item("cb-1", "SIP/a"), t(t0, 10_002))));
        assert!(is_nothing(&b.on_frame(complete("cb-1"), t(t0, 10_003))));
        // Drained: later frames with that ActionID are ordinary again.
        assert!(is_event(&b.on_frame(item("cb-1", "SIP/b"), t(t0, 10_004)), "CoreShowChannel"));
    }

    #[test]
    fn the_keepalive_is_due_after_silence_and_judged_on_listening_time() {
        let t0 = Instant::now();
        let mut b = book(t0);
        assert!(!b.ping_due(t(t0, 19_999)));
        assert_eq!(b.next_wakeup(t0), t0 + PING);
        assert!(b.ping_due(t0 + PING));
        let ping_at = t0 + PING;
        send(&mut b, "cb-1", "Ping", Expect::Keepalive, ping_at);
        assert!(!b.ping_due(ping_at + PING), "one keepalive at a time");
        // Frames were read up to just before the deadline (the reader was
        // stalled on a full pipeline): the Ping gets a full timeout from then.
        b.heard(ping_at + TIMEOUT - Duration::from_millis(1));
        assert!(b.on_timer(ping_at + TIMEOUT).is_ok());
        assert_eq!(b.next_wakeup(ping_at + TIMEOUT), ping_at + TIMEOUT * 2 - Duration::from_millis(1));
        assert_eq!(b.on_timer(ping_at + TIMEOUT * 2).err(), Some(KeepaliveLost));
    }

    #[test]
    fn a_keepalive_reply_is_absorbed() {
        let t0 = Instant::now();
        let mut b = book(t0);
        send(&mut b, "cb-1", "Ping", Expect::Keepalive, t0);
        let r = b.on_frame(reply("cb-1"), t(t0, 3));
        assert!(r.output.is_none() && r.answered.is_some());
        b.heard(t(t0, 3));
        assert!(!b.ping_due(t(t0, 4)));
        assert!(b.ping_due(t(t0, 3) + PING));
    }

    fn queue_item(id: &str) -> Frame {
        frame(&[("Event", "QueueMember"), ("ActionID", id), ("Queue", "701")])
    }

    fn queues_complete(id: &str) -> Frame {
        frame(&[("Event", "QueueStatusComplete"), ("ActionID", id), ("EventList", "Complete")])
    }

    /// Registers the resync listings as `cb-1` (channels) and `cb-2` (queues).
    fn resyncing(t0: Instant) -> Book {
        let mut b = book(t0);
        let [(channels, c), (queues, q)] = b.begin_resync();
        assert_eq!((channels.name(), queues.name()), ("CoreShowChannels", "QueueStatus"));
        send(&mut b, "cb-1", channels.name(), c, t0);
        send(&mut b, "cb-2", queues.name(), q, t0);
        b
    }

    #[test]
    fn both_listings_make_one_resync() {
        let t0 = Instant::now();
        let mut b = resyncing(t0);
        for f in [list_start("cb-1"), item("cb-1", "SIP/a"), list_start("cb-2"), queue_item("cb-2")] {
            assert!(b.on_frame(f, t(t0, 1)).output.is_none());
        }
        assert!(b.on_frame(complete("cb-1"), t(t0, 2)).output.is_none(), "queues still missing");
        match b.on_frame(queues_complete("cb-2"), t(t0, 3)).output {
            Some(Output::Resync(r)) => {
                assert_eq!(r.channels.len(), 1);
                assert_eq!(r.queue_items[0].get("Queue"), Some("701"));
            }
            other => panic!("expected the resync, got {other:?}"),
        }
    }

    #[test]
    fn a_refused_queue_listing_resyncs_channels_only() {
        let t0 = Instant::now();
        let mut b = resyncing(t0);
        let refused = frame(&[("Response", "Error"), ("ActionID", "cb-2"), ("Message", "Permission denied")]);
        assert!(b.on_frame(refused, t(t0, 1)).output.is_none());
        b.on_frame(list_start("cb-1"), t(t0, 2));
        b.on_frame(item("cb-1", "SIP/a"), t(t0, 2));
        match b.on_frame(complete("cb-1"), t(t0, 3)).output {
            Some(Output::Resync(r)) => assert_eq!((r.channels.len(), r.queue_items.len()), (1, 0)),
            other => panic!("expected the resync, got {other:?}"),
        }
    }

    #[test]
    fn a_failed_channel_listing_means_no_resync() {
        let t0 = Instant::now();
        let mut b = resyncing(t0);
        b.on_frame(list_start("cb-2"), t(t0, 1));
        // The channel listing times out; the queue listing's items kept its
        // own deadline alive.
        b.on_frame(queue_item("cb-2"), t(t0, 9_000));
        let expired = b.on_timer(t0 + TIMEOUT).expect("no keepalive");
        assert!(expired.outputs.is_empty(), "{:?}", expired.outputs);
        assert!(b.on_frame(queues_complete("cb-2"), t(t0, 11_000)).output.is_none());
    }

    #[test]
    fn closing_fails_every_waiting_caller_and_nothing_else() {
        let t0 = Instant::now();
        let mut b = resyncing(t0);
        send(&mut b, "cb-3", "Getvar", Expect::Reply(1), t0);
        send(&mut b, "cb-4", "Status", Expect::List(2), t0);
        send(&mut b, "cb-5", "Ping", Expect::Keepalive, t0);
        let mut lost: Vec<(u32, ActionError)> = b
            .close()
            .into_iter()
            .map(|o| match o {
                Output::Reply(to, Err(e)) | Output::List(to, Err(e)) => (to, e),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        lost.sort_by_key(|(to, _)| *to);
        assert_eq!(
            lost,
            [
                (1, ActionError::ConnectionLost { action: "Getvar".into() }),
                (2, ActionError::ConnectionLost { action: "Status".into() }),
            ]
        );
        assert!(b.ping_due(t0 + PING));
    }

    #[test]
    fn callers_are_refused_beyond_the_in_flight_limit() {
        let t0 = Instant::now();
        let mut b = book(t0);
        for i in 0..MAX_IN_FLIGHT {
            assert!(!b.is_full());
            send(&mut b, &format!("cb-{i}"), "Getvar", Expect::Reply(0), t0);
        }
        assert!(b.is_full());
        assert!(Expect::<u32, u32>::Reply(0).is_caller() && !Expect::<u32, u32>::Keepalive.is_caller());
    }

    #[test]
    fn the_timer_wakes_at_the_earliest_deadline() {
        let t0 = Instant::now();
        let mut b = book(t0);
        send(&mut b, "cb-1", "Getvar", Expect::Reply(1), t(t0, 500));
        send(&mut b, "cb-2", "Getvar", Expect::Reply(2), t(t0, 100));
        assert_eq!(b.next_wakeup(t0), t(t0, 100) + TIMEOUT);
        // Never in the past.
        assert_eq!(b.next_wakeup(t(t0, 60_000)), t(t0, 60_000));
    }
}
