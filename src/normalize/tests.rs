//! Unit tests of the normalizer on hand-written event sequences shaped like
//! Asterisk 18–20's, for situations the recorded traces do not show (queue
//! timeout, overflow, attended transfer with Linkedid propagation, Local
//! member transfers, resync); the real traces are covered by
//! `tests/golden.rs` and `tests/lifecycle.rs`.

use super::*;
use crate::directory::{Agent, Directory, Group};
use crate::event::{AvailabilitySource, CallState, EventKind, HungUpBy, MissedReason, OfferEndReason, TransferKind};

/// Two groups, three agents: the lab's, as the directory is built from
/// plain lists (no configuration file in the normalizer's own tests).
fn directory() -> Directory {
    let agent = |id: &str, name: &str, extension: &str| Agent {
        id: AgentId::new(id),
        name: Some(name.to_string()),
        extension: extension.to_string(),
        groups: Vec::new(),
    };
    let group = |id: &str, queue: &str, agents: &[&str]| Group {
        id: GroupId::new(id),
        queue: queue.to_string(),
        agents: agents.iter().map(|a| AgentId::new(a)).collect(),
    };
    Directory::new(
        [agent("maria", "Maria Silva", "2000"), agent("joao", "Joao Souza", "2001"), agent("ana", "Ana Costa", "2002")],
        [group("support", "700", &["maria", "joao"]), group("sales", "701", &["ana"])],
    )
}

struct T {
    n: Normalizer,
    t: i64,
    out: Vec<Event>,
}

impl T {
    fn new() -> T {
        T {
            n: Normalizer::new(Arc::new(directory()), Arc::new(AlwaysOpen), SiteOptions::default()),
            t: 1_800_000_000,
            out: Vec::new(),
        }
    }

    /// Feeds one event; `secs` advances the PBX clock first.
    fn ev(&mut self, secs: i64, event: &str, fields: &[(&str, &str)]) {
        self.t += secs;
        let ts = format!("{}.000000", self.t);
        let mut pairs: Vec<(&str, &str)> = vec![("Event", event), ("Timestamp", &ts)];
        pairs.extend_from_slice(fields);
        let f = Frame::from_pairs(&pairs);
        self.n.handle(&f, 0, &mut self.out);
    }

    fn types(&self, call: &str) -> Vec<&'static str> {
        self.out
            .iter()
            .filter(|e| e.call.as_ref().is_some_and(|c| c.id.as_str() == call))
            .map(|e| e.kind.type_name())
            .collect()
    }

    fn kind(&self, call: &str, ty: &str) -> Vec<&EventKind> {
        self.out
            .iter()
            .filter(|e| e.call.as_ref().is_some_and(|c| c.id.as_str() == call) && e.kind.type_name() == ty)
            .map(|e| &e.kind)
            .collect()
    }

    fn last_of(&self, call: &str) -> &Event {
        self.out.iter().rev().find(|e| e.call.as_ref().is_some_and(|c| c.id.as_str() == call)).expect("events")
    }

    /// Caller `SIP/carrier-<n>` with Uniqueid = Linkedid = `id`.
    fn inbound(&mut self, id: &str, chan: &str) {
        self.ev(
            0,
            "Newchannel",
            &[
                ("Channel", chan),
                ("ChannelStateDesc", "Ring"),
                ("CallerIDNum", "11999990000"),
                ("CallerIDName", "Cliente"),
                ("Exten", "1130001000"),
                ("Uniqueid", id),
                ("Linkedid", id),
            ],
        );
    }

    fn chan(&mut self, secs: i64, event: &str, chan: &str, uid: &str, linked: &str, extra: &[(&str, &str)]) {
        let mut f = vec![("Channel", chan), ("Uniqueid", uid), ("Linkedid", linked)];
        f.extend_from_slice(extra);
        self.ev(secs, event, &f);
    }

    fn two(&mut self, secs: i64, event: &str, a: (&str, &str), b: (&str, &str), linked: &str, extra: &[(&str, &str)]) {
        let mut f = vec![
            ("Channel", a.0),
            ("Uniqueid", a.1),
            ("Linkedid", linked),
            ("DestChannel", b.0),
            ("DestUniqueid", b.1),
            ("DestLinkedid", linked),
        ];
        f.extend_from_slice(extra);
        self.ev(secs, event, &f);
    }
}

#[test]
fn queue_timeout_is_not_an_abandon() {
    let mut t = T::new();
    let c = ("SIP/carrier-01", "1.1");
    let m = ("Local/2000@agents-01;1", "1.2");
    t.inbound("1.1", c.0);
    t.chan(0, "QueueCallerJoin", c.0, c.1, "1.1", &[("Queue", "700"), ("Position", "1")]);
    t.two(
        0,
        "AgentCalled",
        c,
        m,
        "1.1",
        &[("Queue", "700"), ("Interface", "Local/2000@agents/n"), ("MemberName", "Maria Silva")],
    );
    t.two(0, "DialBegin", c, m, "1.1", &[]);
    // The queue's own timeout: app_queue stops ringing, then reports an
    // "abandon" and only afterwards sets QUEUESTATUS=TIMEOUT.
    t.two(30, "DialEnd", c, m, "1.1", &[("DialStatus", "CANCEL")]);
    t.chan(0, "Hangup", m.0, m.1, "1.1", &[("Cause", "0")]);
    t.chan(0, "QueueCallerAbandon", c.0, c.1, "1.1", &[("Queue", "700")]);
    t.chan(0, "QueueCallerLeave", c.0, c.1, "1.1", &[("Queue", "700")]);
    t.chan(0, "VarSet", c.0, c.1, "1.1", &[("Variable", "QUEUESTATUS"), ("Value", "TIMEOUT")]);
    // The rule is the timeout that came after the abandon; lost, still the timeout.
    assert_eq!(t.n.miss_rule("1.1", EndReason::Normal), Some(MissRule::QueueTimeout));
    assert_eq!(t.n.miss_rule("1.1", EndReason::Lost), Some(MissRule::QueueTimeout));
    t.chan(0, "SoftHangupRequest", c.0, c.1, "1.1", &[("Cause", "16")]);
    t.chan(0, "Hangup", c.0, c.1, "1.1", &[("Cause", "16"), ("Cause-txt", "Normal Clearing")]);
    assert_eq!(t.n.miss_rule("1.1", EndReason::Normal), None, "ended: no longer live");
    assert_eq!(
        t.types("1.1"),
        ["call.started", "call.queued", "call.offered", "call.offer_ended", "call.missed", "call.ended"]
    );
    assert!(matches!(
        t.kind("1.1", "call.offer_ended")[0],
        EventKind::OfferEnded { reason: OfferEndReason::NoAnswer, .. }
    ));
    assert!(matches!(
        t.kind("1.1", "call.missed")[0],
        EventKind::Missed { reason: MissedReason::QueueTimeout, wait_seconds: 30 }
    ));
    assert!(matches!(t.kind("1.1", "call.ended")[0], EventKind::Ended { hung_up_by: HungUpBy::System, .. }));
}

#[test]
fn timeout_then_overflow_queue_answers_is_not_missed() {
    let mut t = T::new();
    let c = ("SIP/carrier-01", "1.1");
    let a = ("SIP/2002-02", "1.2");
    t.inbound("1.1", c.0);
    t.chan(0, "QueueCallerJoin", c.0, c.1, "1.1", &[("Queue", "700")]);
    t.chan(20, "QueueCallerAbandon", c.0, c.1, "1.1", &[("Queue", "700")]);
    t.chan(0, "VarSet", c.0, c.1, "1.1", &[("Variable", "QUEUESTATUS"), ("Value", "TIMEOUT")]);
    t.chan(0, "QueueCallerJoin", c.0, c.1, "1.1", &[("Queue", "701")]);
    t.two(0, "AgentCalled", c, a, "1.1", &[("Queue", "701"), ("Interface", "SIP/2002"), ("MemberName", "Ana Costa")]);
    t.two(2, "AgentConnect", c, a, "1.1", &[("Queue", "701"), ("Interface", "SIP/2002"), ("MemberName", "Ana Costa")]);
    t.chan(5, "HangupRequest", c.0, c.1, "1.1", &[]);
    t.chan(0, "Hangup", a.0, a.1, "1.1", &[("Cause", "16")]);
    t.chan(0, "Hangup", c.0, c.1, "1.1", &[("Cause", "16")]);
    assert_eq!(
        t.types("1.1"),
        ["call.started", "call.queued", "call.queued", "call.offered", "call.answered", "call.ended"]
    );
    let end = t.last_of("1.1");
    assert_eq!(end.call.as_ref().and_then(|c| c.group.as_ref()).map(|g| g.as_str()), Some("sales"));
    // Waiting counts from the first queue the caller entered.
    assert!(matches!(t.kind("1.1", "call.answered")[0], EventKind::Answered { wait_seconds: 22, .. }));
    assert!(matches!(end.kind, EventKind::Ended { hung_up_by: HungUpBy::Caller, .. }));
}

#[test]
fn ringall_answered_elsewhere_closes_other_offers() {
    let mut t = T::new();
    let c = ("SIP/carrier-01", "1.1");
    let m = ("SIP/2000-02", "1.2");
    let j = ("SIP/2001-03", "1.3");
    t.inbound("1.1", c.0);
    t.chan(0, "QueueCallerJoin", c.0, c.1, "1.1", &[("Queue", "700")]);
    t.two(0, "AgentCalled", c, m, "1.1", &[("Interface", "SIP/2000")]);
    t.two(0, "AgentCalled", c, j, "1.1", &[("Interface", "SIP/2001")]);
    t.two(3, "DialEnd", c, j, "1.1", &[("DialStatus", "ANSWER")]);
    t.two(0, "DialEnd", c, m, "1.1", &[("DialStatus", "CANCEL")]);
    t.two(0, "AgentConnect", c, j, "1.1", &[("Interface", "SIP/2001")]);
    t.chan(0, "Hangup", m.0, m.1, "1.1", &[("Cause", "26")]);
    t.chan(4, "Hangup", j.0, j.1, "1.1", &[("Cause", "16")]);
    t.chan(0, "Hangup", c.0, c.1, "1.1", &[("Cause", "16")]);
    assert_eq!(
        t.types("1.1"),
        [
            "call.started",
            "call.queued",
            "call.offered",
            "call.offered",
            "call.answered",
            "call.offer_ended",
            "call.ended"
        ]
    );
    assert!(matches!(t.kind("1.1", "call.offer_ended")[0],
        EventKind::OfferEnded { agent, reason: OfferEndReason::AnsweredElsewhere } if agent.as_str() == "maria"));
}

#[test]
fn attended_transfer_moves_the_target_into_the_customers_call() {
    let mut t = T::new();
    let cust = ("SIP/carrier-01", "1.1");
    let maria = ("SIP/2000-02", "1.2");
    t.inbound("1.1", cust.0);
    t.chan(0, "QueueCallerJoin", cust.0, cust.1, "1.1", &[("Queue", "700")]);
    t.two(0, "AgentCalled", cust, maria, "1.1", &[("Interface", "SIP/2000")]);
    t.two(2, "DialEnd", cust, maria, "1.1", &[("DialStatus", "ANSWER")]);
    t.chan(0, "Newstate", maria.0, maria.1, "1.1", &[("ChannelStateDesc", "Up")]);
    // Maria consults Joao: a call of its own (internal), Linkedid 2.1.
    t.ev(
        5,
        "Newchannel",
        &[
            ("Channel", "SIP/2000-03"),
            ("ChannelStateDesc", "Ring"),
            ("CallerIDNum", "2000"),
            ("Exten", "2001"),
            ("Uniqueid", "2.1"),
            ("Linkedid", "2.1"),
        ],
    );
    t.two(0, "DialBegin", ("SIP/2000-03", "2.1"), ("SIP/2001-04", "2.2"), "2.1", &[("DialString", "2001")]);
    t.two(2, "DialEnd", ("SIP/2000-03", "2.1"), ("SIP/2001-04", "2.2"), "2.1", &[("DialStatus", "ANSWER")]);
    t.ev(
        3,
        "AttendedTransfer",
        &[
            ("Result", "Success"),
            ("OrigTransfererChannel", "SIP/2000-02"),
            ("OrigTransfererUniqueid", "1.2"),
            ("OrigTransfererLinkedid", "1.1"),
            ("SecondTransfererChannel", "SIP/2000-03"),
            ("SecondTransfererUniqueid", "2.1"),
            ("SecondTransfererLinkedid", "2.1"),
            ("TransfereeChannel", "SIP/carrier-01"),
            ("TransfereeUniqueid", "1.1"),
            ("TransfereeLinkedid", "1.1"),
            ("TransferTargetChannel", "SIP/2001-04"),
            ("TransferTargetUniqueid", "2.2"),
            ("TransferTargetLinkedid", "2.1"),
            ("DestType", "Bridge"),
        ],
    );
    t.chan(0, "Hangup", maria.0, maria.1, "1.1", &[("Cause", "16")]);
    t.chan(0, "Hangup", "SIP/2000-03", "2.1", "2.1", &[("Cause", "16")]);
    // Bridging propagates the oldest Linkedid to Joao's channel.
    t.chan(0, "BridgeEnter", "SIP/2001-04", "2.2", "1.1", &[("ChannelStateDesc", "Up")]);
    t.chan(10, "HangupRequest", "SIP/2001-04", "2.2", "1.1", &[]);
    t.chan(0, "Hangup", "SIP/2001-04", "2.2", "1.1", &[("Cause", "16")]);
    t.chan(0, "Hangup", cust.0, cust.1, "1.1", &[("Cause", "16")]);

    assert_eq!(
        t.types("1.1"),
        ["call.started", "call.queued", "call.offered", "call.answered", "call.transferred", "call.ended"]
    );
    assert!(matches!(t.kind("1.1", "call.transferred")[0],
        EventKind::Transferred { from_agent: Some(f), to_agent: Some(to), kind: TransferKind::Attended, .. }
        if f.as_str() == "maria" && to.as_str() == "joao"));
    let end = t.last_of("1.1");
    assert_eq!(end.call.as_ref().and_then(|c| c.agent.as_ref()).map(|a| a.as_str()), Some("joao"));
    assert!(matches!(end.kind, EventKind::Ended { hung_up_by: HungUpBy::Agent, .. }));
    // The consultation call ended by itself when its last channel left.
    assert_eq!(t.types("2.1"), ["call.started", "call.offered", "call.answered", "call.ended"]);
    assert_eq!(t.last_of("2.1").call.as_ref().map(|c| c.direction), Some(crate::event::Direction::Internal));
    assert_eq!(t.n.live_calls(), 0);
}

#[test]
fn blind_transfer_from_a_local_channel_member() {
    let mut t = T::new();
    let c = ("SIP/carrier-01", "1.1");
    let l1 = ("Local/2000@agents-01;1", "1.2");
    let l2 = ("Local/2000@agents-01;2", "1.3");
    let phone = ("SIP/2000-02", "1.4");
    t.inbound("1.1", c.0);
    t.chan(0, "QueueCallerJoin", c.0, c.1, "1.1", &[("Queue", "700")]);
    t.chan(0, "Newchannel", l1.0, l1.1, "1.1", &[]);
    t.chan(0, "Newchannel", l2.0, l2.1, "1.1", &[]);
    t.two(0, "AgentCalled", c, l1, "1.1", &[("Interface", "Local/2000@agents/n"), ("MemberName", "Maria Silva")]);
    t.two(0, "DialBegin", c, l1, "1.1", &[]);
    t.two(0, "DialBegin", l2, phone, "1.1", &[]);
    t.two(2, "DialEnd", l2, phone, "1.1", &[("DialStatus", "ANSWER")]);
    t.chan(0, "Newstate", phone.0, phone.1, "1.1", &[("ChannelStateDesc", "Up")]);
    t.two(0, "DialEnd", c, l1, "1.1", &[("DialStatus", "ANSWER")]);
    t.two(0, "AgentConnect", c, l1, "1.1", &[("Interface", "Local/2000@agents/n"), ("MemberName", "Maria Silva")]);
    // Maria's phone blind-transfers the Local half it talks to, to 2001.
    t.ev(
        4,
        "BlindTransfer",
        &[
            ("Result", "Success"),
            ("TransfererChannel", "SIP/2000-02"),
            ("TransfererUniqueid", "1.4"),
            ("TransfererLinkedid", "1.1"),
            ("TransfereeChannel", l2.0),
            ("TransfereeUniqueid", l2.1),
            ("TransfereeLinkedid", "1.1"),
            ("Extension", "2001"),
            ("Context", "from-internal"),
        ],
    );
    t.chan(0, "Hangup", phone.0, phone.1, "1.1", &[("Cause", "16")]);
    t.two(0, "DialBegin", l2, ("SIP/2001-03", "1.5"), "1.1", &[]);
    t.two(3, "DialEnd", l2, ("SIP/2001-03", "1.5"), "1.1", &[("DialStatus", "ANSWER")]);
    t.chan(0, "Newstate", "SIP/2001-03", "1.5", "1.1", &[("ChannelStateDesc", "Up")]);
    t.chan(6, "HangupRequest", c.0, c.1, "1.1", &[]);
    for (ch, uid) in [("SIP/2001-03", "1.5"), l2, l1, c] {
        t.chan(0, "Hangup", ch, uid, "1.1", &[("Cause", "16")]);
    }
    assert_eq!(
        t.types("1.1"),
        [
            "call.started",
            "call.queued",
            "call.offered",
            "call.answered",
            "call.transferred",
            "call.offered",
            "call.answered",
            "call.ended"
        ]
    );
    assert!(matches!(t.kind("1.1", "call.transferred")[0],
        EventKind::Transferred { from_agent: Some(f), to_agent: Some(to), kind: TransferKind::Blind, .. }
        if f.as_str() == "maria" && to.as_str() == "joao"));
    assert!(matches!(t.last_of("1.1").kind, EventKind::Ended { hung_up_by: HungUpBy::Caller, .. }));
}

#[test]
fn late_events_of_an_ended_call_do_not_resurrect_it() {
    let mut t = T::new();
    t.inbound("1.1", "SIP/carrier-01");
    t.chan(1, "Hangup", "SIP/carrier-01", "1.1", "1.1", &[("Cause", "16")]);
    let n = t.out.len();
    t.chan(0, "VarSet", "SIP/carrier-01", "1.1", "1.1", &[("Variable", "MIXMONITOR_FILENAME"), ("Value", "/x.wav")]);
    t.chan(0, "Newstate", "SIP/carrier-01", "1.1", "1.1", &[("ChannelStateDesc", "Up")]);
    assert_eq!(t.out.len(), n);
    assert_eq!(t.n.live_calls(), 0);
}

#[test]
fn a_call_seen_mid_way_is_adopted_and_ends_once() {
    let mut t = T::new();
    // No Newchannel: callbridge started while the call was queued.
    t.chan(0, "QueueCallerJoin", "SIP/carrier-01", "1.1", "1.1", &[("Queue", "700"), ("CallerIDNum", "119")]);
    t.chan(5, "Hangup", "SIP/carrier-01", "1.1", "1.1", &[("Cause", "16")]);
    assert_eq!(t.types("1.1"), ["call.started", "call.queued", "call.missed", "call.ended"]);
}

#[test]
fn resync_ends_vanished_calls_as_lost_and_adopts_unknown_ones() {
    let mut t = T::new();
    t.inbound("1.1", "SIP/carrier-01");
    t.chan(0, "QueueCallerJoin", "SIP/carrier-01", "1.1", "1.1", &[("Queue", "700")]);
    let listing = PbxChannels {
        channels: vec![
            Frame::from_pairs(&[
                ("Event", "CoreShowChannel"),
                ("Channel", "SIP/carrier-09"),
                ("Uniqueid", "9.1"),
                ("Linkedid", "9.1"),
                ("ChannelStateDesc", "Up"),
                ("CallerIDNum", "11988887777"),
                ("Exten", "1130001000"),
                ("Application", "Queue"),
                ("ApplicationData", "700,r,,,45"),
                ("Duration", "00:00:42"),
            ]),
            Frame::from_pairs(&[
                ("Event", "CoreShowChannel"),
                ("Channel", "SIP/2001-0a"),
                ("Uniqueid", "9.2"),
                ("Linkedid", "9.1"),
                ("ChannelStateDesc", "Ringing"),
            ]),
        ],
    };
    let mut out = Vec::new();
    t.n.resync(&listing, (t.t + 10) * 1_000_000, &mut out);
    let types: Vec<(&str, &str)> =
        out.iter().map(|e| (e.call.as_ref().map_or("", |c| c.id.as_str()), e.kind.type_name())).collect();
    assert_eq!(
        types,
        [
            ("1.1", "call.missed"),
            ("1.1", "call.ended"),
            ("9.1", "call.started"),
            ("9.1", "call.queued"),
            ("9.1", "call.offered"),
        ]
    );
    assert!(matches!(out[0].kind, EventKind::Missed { reason: MissedReason::Lost, .. }), "{:?}", out[0].kind);
    assert!(matches!(out[1].kind, EventKind::Ended { end_reason: EndReason::Lost, .. }));
    assert_eq!(out[2].call.as_ref().map(|c| c.started_at), Some((t.t + 10 - 42) * 1_000_000));
    // The adopted call then ends normally.
    t.out.clear();
    t.chan(1, "Hangup", "SIP/2001-0a", "9.2", "9.1", &[("Cause", "16")]);
    t.chan(0, "Hangup", "SIP/carrier-09", "9.1", "9.1", &[("Cause", "16")]);
    assert_eq!(t.types("9.1"), ["call.offer_ended", "call.missed", "call.ended"]);
}

#[test]
fn removed_and_stuck_calls() {
    let mut t = T::new();
    t.inbound("1.1", "SIP/carrier-01");
    let mut out = Vec::new();
    assert!(t.n.mark_stuck("1.1", "silence", 5, &mut out));
    assert!(!t.n.mark_stuck("1.1", "silence", 6, &mut out), "call.stuck only once");
    assert!(t.n.end_call("1.1", EndReason::Removed, 7, &mut out));
    assert!(!t.n.end_call("1.1", EndReason::Removed, 8, &mut out));
    let types: Vec<&str> = out.iter().map(|e| e.kind.type_name()).collect();
    assert_eq!(types, ["call.stuck", "call.missed", "call.ended"]);
    assert!(matches!(
        out[2].kind,
        EventKind::Ended { end_reason: EndReason::Removed, hung_up_by: HungUpBy::System, .. }
    ));
    // Its channel's late hangup is ignored.
    t.chan(0, "Hangup", "SIP/carrier-01", "1.1", "1.1", &[]);
    assert_eq!(t.types("1.1").len(), 1);
}

#[test]
fn agent_paused_in_every_queue_is_unavailable_once() {
    let mut t = T::new();
    let pause = |t: &mut T, queue: &str, paused: &str| {
        t.ev(
            1,
            "QueueMemberPause",
            &[
                ("Queue", queue),
                ("Interface", "SIP/2000"),
                ("MemberName", "Maria Silva"),
                ("Paused", paused),
                ("PausedReason", "lunch"),
            ],
        );
    };
    pause(&mut t, "700", "1");
    pause(&mut t, "701", "1");
    pause(&mut t, "700", "0");
    pause(&mut t, "701", "0");
    let avail: Vec<bool> = t
        .out
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::AgentAvailability { available, .. } => Some(available),
            _ => None,
        })
        .collect();
    assert_eq!(avail, [false, true]);
    assert!(t.n.agent_available("maria"));
}

#[test]
fn suspects_follow_per_state_limits_and_silence() {
    let mut t = T::new();
    let limits = StuckLimits {
        started_seconds: 100,
        queued_seconds: 50,
        ringing_seconds: 30,
        talking_seconds: 1000,
        silence_seconds: 500,
    };
    t.inbound("1.1", "SIP/carrier-01");
    t.chan(0, "QueueCallerJoin", "SIP/carrier-01", "1.1", "1.1", &[("Queue", "700")]);
    let us = |s: i64| s * 1_000_000;
    assert!(t.n.suspects(us(t.t + 49), &limits).is_empty());
    // The limit is compared exactly: 0.15 s short of it is not yet stuck.
    assert!(t.n.suspects(us(t.t + 50) - 150_000, &limits).is_empty());
    let s = t.n.suspects(us(t.t + 50), &limits);
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].state, s[0].cause), (CallState::Queued, StuckCause::State));
    // An agent answers: talking has a longer limit, but silence still counts.
    t.two(10, "AgentConnect", ("SIP/carrier-01", "1.1"), ("SIP/2000-02", "1.2"), "1.1", &[("Interface", "SIP/2000")]);
    assert!(t.n.suspects(us(t.t + 499), &limits).is_empty());
    assert!(t.n.suspects(us(t.t + 500) - 1, &limits).is_empty());
    let s = t.n.suspects(us(t.t + 500), &limits);
    assert_eq!((s[0].state, s[0].cause), (CallState::Talking, StuckCause::Silence));
}

#[test]
fn resync_leaves_calls_newer_than_the_listing_alone() {
    let mut t = T::new();
    t.inbound("1.1", "SIP/carrier-01");
    // Reconnected: this call has events after the connection, the listing
    // (taken earlier) does not know it yet.
    t.n.begin_resync();
    t.inbound("2.1", "SIP/carrier-02");
    let mut out = Vec::new();
    t.n.resync(&PbxChannels::default(), (t.t + 1) * 1_000_000, &mut out);
    let ended: Vec<&str> = out
        .iter()
        .filter(|e| e.kind.type_name() == "call.ended")
        .filter_map(|e| e.call.as_ref().map(|c| c.id.as_str()))
        .collect();
    assert_eq!(ended, ["1.1"]);
    assert_eq!(t.n.live_calls(), 1);
}

/// A calendar that always gives the same answer.
struct Fixed(Option<MissedReason>);

impl Rules for Fixed {
    fn closed_reason(&self, _: &GroupId, _: Micros) -> Option<MissedReason> {
        self.0
    }
}

impl T {
    fn with_rules(rules: Option<MissedReason>) -> T {
        let mut t = T::new();
        let dir = t.n.directory().clone();
        t.n.reconfigure(dir, Arc::new(Fixed(rules)), SiteOptions::default());
        t
    }

    fn member(&mut self, event: &str, queue: &str, ext: &str, fields: &[(&str, &str)]) {
        let interface = format!("SIP/{ext}");
        let mut f = vec![("Queue", queue), ("Interface", interface.as_str())];
        f.extend_from_slice(fields);
        self.ev(0, event, &f);
    }

    fn pause(&mut self, queue: &str, ext: &str, paused: bool) {
        self.member("QueueMemberPause", queue, ext, &[("Paused", if paused { "1" } else { "0" })]);
    }

    fn device(&mut self, queue: &str, ext: &str, status: &str) {
        self.member("QueueMemberStatus", queue, ext, &[("Status", status), ("Paused", "0")]);
    }

    fn availability(&self) -> Vec<(String, bool, Option<String>, AvailabilitySource)> {
        self.out
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::AgentAvailability { agent, available, reason, source } => {
                    Some((agent.to_string(), *available, reason.clone(), *source))
                }
                _ => None,
            })
            .collect()
    }

    fn missed(&self, call: &str) -> MissedReason {
        match self.kind(call, "call.missed").first() {
            Some(EventKind::Missed { reason, .. }) => *reason,
            other => panic!("no call.missed for {call}: {other:?}"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum QueueEnd {
    Abandon,
    Timeout,
    LeaveEmpty,
}

#[test]
fn missed_reason_precedence() {
    use MissedReason::*;
    type Setup = fn(&mut T);
    let none: Setup = |_| {};
    let both_paused: Setup = |t| {
        t.pause("700", "2000", true);
        t.pause("700", "2001", true);
    };
    type Case = (&'static str, Option<MissedReason>, Setup, Setup, QueueEnd, MissedReason);
    let cases: &[Case] = &[
        // (case, calendar says, before the call, after it joined, queue end, expected)
        ("agents available, abandoned", None, none, none, QueueEnd::Abandon, Abandoned),
        ("agents available, timeout", None, none, none, QueueEnd::Timeout, QueueTimeout),
        ("agents available, queue emptied", None, none, none, QueueEnd::LeaveEmpty, NoAgents),
        ("everyone paused, abandoned", None, both_paused, none, QueueEnd::Abandon, NoAgents),
        ("everyone paused, timeout", None, both_paused, none, QueueEnd::Timeout, NoAgents),
        ("one agent left", None, |t| t.pause("700", "2000", true), none, QueueEnd::Abandon, Abandoned),
        (
            "paused only in another group's queue",
            None,
            |t| {
                t.pause("701", "2000", true);
                t.pause("701", "2001", true);
            },
            none,
            QueueEnd::Abandon,
            Abandoned,
        ),
        (
            "paused in a queue no group uses",
            None,
            |t| {
                t.pause("999", "2000", true);
                t.pause("999", "2001", true);
            },
            none,
            QueueEnd::Abandon,
            Abandoned,
        ),
        (
            "devices unavailable",
            None,
            |t| {
                t.device("700", "2000", "5");
                t.device("700", "2001", "4");
            },
            none,
            QueueEnd::Abandon,
            NoAgents,
        ),
        (
            "switched off in the helpdesk",
            None,
            |t| {
                let mut out = Vec::new();
                t.n.set_helpdesk_available("maria", false, 0, &mut out);
                t.n.set_helpdesk_available("joao", false, 0, &mut out);
            },
            none,
            QueueEnd::Timeout,
            NoAgents,
        ),
        ("everyone paused after the call arrived", None, none, both_paused, QueueEnd::Abandon, Abandoned),
        (
            "back from pause after the call arrived",
            None,
            both_paused,
            |t| t.pause("700", "2000", false),
            QueueEnd::Abandon,
            NoAgents,
        ),
        ("outside hours, abandoned", Some(OutsideHours), none, none, QueueEnd::Abandon, OutsideHours),
        ("outside hours beats no agents", Some(OutsideHours), both_paused, none, QueueEnd::Timeout, OutsideHours),
        ("holiday beats an emptied queue", Some(Holiday), none, none, QueueEnd::LeaveEmpty, Holiday),
    ];
    for (case, closed, before, after, end, want) in cases {
        let mut t = T::with_rules(*closed);
        before(&mut t);
        let c = ("SIP/carrier-01", "1.1");
        t.inbound("1.1", c.0);
        t.chan(0, "QueueCallerJoin", c.0, c.1, "1.1", &[("Queue", "700"), ("Position", "1")]);
        after(&mut t);
        match end {
            QueueEnd::Abandon => t.chan(5, "QueueCallerAbandon", c.0, c.1, "1.1", &[("Queue", "700")]),
            QueueEnd::Timeout => {
                t.chan(30, "QueueCallerAbandon", c.0, c.1, "1.1", &[("Queue", "700")]);
                t.chan(0, "VarSet", c.0, c.1, "1.1", &[("Variable", "QUEUESTATUS"), ("Value", "TIMEOUT")]);
            }
            QueueEnd::LeaveEmpty => {
                t.chan(1, "QueueCallerLeave", c.0, c.1, "1.1", &[("Queue", "700")]);
                t.chan(0, "VarSet", c.0, c.1, "1.1", &[("Variable", "QUEUESTATUS"), ("Value", "LEAVEEMPTY")]);
            }
        }
        // The rule read before the last hangup is the one the hangup applies.
        let rule = t.n.miss_rule("1.1", EndReason::Normal).expect("live and unanswered");
        t.chan(0, "Hangup", c.0, c.1, "1.1", &[("Cause", "16")]);
        assert_eq!(t.missed("1.1"), *want, "{case}");
        assert_eq!(rule.reason(), *want, "{case}: {rule:?}");
    }
}

#[test]
fn answered_calls_are_never_missed_whoever_was_available() {
    let mut t = T::with_rules(Some(MissedReason::OutsideHours));
    t.pause("700", "2000", true);
    t.pause("700", "2001", true);
    let c = ("SIP/carrier-01", "1.1");
    let m = ("SIP/2000-02", "1.2");
    t.inbound("1.1", c.0);
    t.chan(0, "QueueCallerJoin", c.0, c.1, "1.1", &[("Queue", "700")]);
    t.pause("700", "2000", false);
    t.two(1, "AgentCalled", c, m, "1.1", &[("Interface", "SIP/2000")]);
    t.two(2, "AgentConnect", c, m, "1.1", &[("Interface", "SIP/2000")]);
    t.chan(5, "Hangup", m.0, m.1, "1.1", &[("Cause", "16")]);
    t.chan(0, "Hangup", c.0, c.1, "1.1", &[("Cause", "16")]);
    assert!(t.kind("1.1", "call.missed").is_empty());
    assert_eq!(t.kind("1.1", "call.answered").len(), 1);
}

#[test]
fn device_state_and_helpdesk_switch_drive_availability() {
    let mut t = T::new();
    // In use, ringing, on hold: still available (no event).
    for status in ["2", "6", "8", "1"] {
        t.device("700", "2000", status);
    }
    t.device("700", "2000", "5");
    t.device("701", "2000", "5");
    t.device("700", "2000", "1");
    // Switched off in the helpdesk, then paused on the PBX by callbridge:
    // one event, from the API.
    let mut out = Vec::new();
    assert!(t.n.set_helpdesk_available("maria", false, 1_000, &mut out));
    t.out.append(&mut out);
    t.pause("700", "2000", true);
    assert!(!t.n.set_helpdesk_available("nobody", false, 2_000, &mut out), "unknown agent");
    assert!(out.is_empty());
    // Unpaused on the PBX but still off in the helpdesk: nothing.
    t.pause("700", "2000", false);
    assert!(!t.n.agent_available("maria"));
    assert!(t.n.set_helpdesk_available("maria", true, 3_000, &mut out));
    t.out.append(&mut out);
    let ev: Vec<(String, bool, Option<String>, AvailabilitySource)> = t.availability();
    let want = [
        ("maria", false, Some("device_unavailable"), AvailabilitySource::Pbx),
        ("maria", true, None, AvailabilitySource::Pbx),
        ("maria", false, None, AvailabilitySource::Api),
        ("maria", true, None, AvailabilitySource::Api),
    ];
    assert_eq!(ev.len(), want.len(), "{ev:#?}");
    for (got, want) in ev.iter().zip(want) {
        assert_eq!((got.0.as_str(), got.1, got.2.as_deref(), got.3), want);
    }
    assert!(t.n.agent_available("maria"));
    assert!(t.n.group_has_available_agent("support"));
}

#[test]
fn presence_changes_are_handed_over_once() {
    let mut t = T::new();
    assert!(t.n.take_presence_changes().is_empty());
    t.pause("700", "2000", true);
    t.pause("701", "2002", true);
    // In use (and still paused): no presence change.
    t.member("QueueMemberStatus", "700", "2000", &[("Status", "2"), ("Paused", "1")]);
    let changes = t.n.take_presence_changes();
    let agents: Vec<&str> = changes.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(agents, ["ana", "maria"]);
    assert!(!changes[1].1.available_in("700"));
    assert!(changes[1].1.available_in("701"));
    assert!(t.n.take_presence_changes().is_empty(), "handed over once");
    // Members the directory does not know change nothing.
    t.pause("700", "2999", true);
    assert!(t.n.take_presence_changes().is_empty());
}

#[test]
fn resync_members_replaces_what_the_pbx_said() {
    let mut t = T::new();
    t.pause("700", "2000", true); // maria paused, then the connection drops
    let mut out = Vec::new();
    assert!(t.n.set_helpdesk_available("ana", false, 0, &mut out));
    t.n.take_presence_changes();
    out.clear();
    let item = |queue: &str, name: &str, paused: &str, status: &str| {
        Frame::from_pairs(&[
            ("Event", "QueueMember"),
            ("Queue", queue),
            ("Name", name),
            ("Location", &format!("SIP/{}", if name == "Maria Silva" { "2000" } else { "2001" })),
            ("Paused", paused),
            ("PausedReason", if paused == "1" { "break" } else { "" }),
            ("Status", status),
        ])
    };
    // While away: maria was unpaused, joao paused, and his phone went away.
    let listing = vec![
        Frame::from_pairs(&[("Event", "QueueParams"), ("Queue", "700")]),
        item("700", "Maria Silva", "0", "1"),
        item("700", "Joao Souza", "1", "5"),
    ];
    t.n.resync_members(&listing, 9_000_000, &mut out);
    let got: Vec<(String, bool)> = out
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::AgentAvailability { agent, available, .. } => Some((agent.to_string(), *available)),
            _ => None,
        })
        .collect();
    assert_eq!(got, [("joao".to_string(), false), ("maria".to_string(), true)]);
    assert!(!t.n.agent_available("ana"), "the helpdesk switch survives a resync");
    assert!(!t.n.group_has_available_agent("sales"));
    assert!(t.n.group_has_available_agent("support"));
    // A listing without members (QueueStatus refused) changes nothing.
    out.clear();
    t.n.resync_members(&[Frame::from_pairs(&[("Event", "QueueParams"), ("Queue", "700")])], 10_000_000, &mut out);
    assert!(out.is_empty());
    assert!(!t.n.agent_available("joao"));
}

#[test]
fn fastagi_verdict_reaches_a_call_that_never_queues() {
    let mut t = T::new();
    let c = ("SIP/carrier-01", "1.1");
    t.inbound("1.1", c.0);
    for (var, value) in [
        ("CALLBRIDGE_ROUTE", "missed"),
        ("CALLBRIDGE_QUEUE", ""),
        ("CALLBRIDGE_GROUP", "support"),
        ("CALLBRIDGE_REASON", "outside_hours"),
    ] {
        t.chan(0, "VarSet", c.0, c.1, "1.1", &[("Variable", var), ("Value", value)]);
    }
    t.chan(8, "Hangup", c.0, c.1, "1.1", &[("Cause", "16")]);
    assert_eq!(t.missed("1.1"), MissedReason::OutsideHours);
    let group = t.last_of("1.1").call.as_ref().and_then(|c| c.group.clone());
    assert_eq!(group.as_ref().map(|g| g.as_str()), Some("support"));

    // Routed to a queue after all (diverted to sales): the queue decides.
    let c = ("SIP/carrier-02", "2.1");
    t.inbound("2.1", c.0);
    t.chan(0, "VarSet", c.0, c.1, "2.1", &[("Variable", "CALLBRIDGE_GROUP"), ("Value", "sales")]);
    t.chan(0, "VarSet", c.0, c.1, "2.1", &[("Variable", "CALLBRIDGE_REASON"), ("Value", "no_agents")]);
    t.chan(0, "QueueCallerJoin", c.0, c.1, "2.1", &[("Queue", "701")]);
    t.chan(4, "QueueCallerAbandon", c.0, c.1, "2.1", &[("Queue", "701")]);
    t.chan(0, "Hangup", c.0, c.1, "2.1", &[("Cause", "16")]);
    assert_eq!(t.missed("2.1"), MissedReason::Abandoned);

    // Unknown groups and reasons are ignored.
    let c = ("SIP/carrier-03", "3.1");
    t.inbound("3.1", c.0);
    t.chan(0, "VarSet", c.0, c.1, "3.1", &[("Variable", "CALLBRIDGE_GROUP"), ("Value", "nope")]);
    t.chan(0, "VarSet", c.0, c.1, "3.1", &[("Variable", "CALLBRIDGE_REASON"), ("Value", "busy")]);
    t.chan(1, "Hangup", c.0, c.1, "3.1", &[("Cause", "16")]);
    assert_eq!(t.missed("3.1"), MissedReason::Abandoned);
    assert_eq!(t.last_of("3.1").call.as_ref().and_then(|c| c.group.clone()), None);
}

/// The helpdesk refused the caller (Zammad's `reject`): the waiting call is
/// marked before the PBX hangs it up, and ends `blocked` — stronger than
/// the hours or the staffing. Answered, outbound or ended calls are not
/// marked; a mark taken back (the PBX did not hang up) leaves the reason
/// the call would have had.
#[test]
fn a_blocked_caller_is_missed_as_blocked() {
    let c = ("SIP/carrier-01", "1.1");
    let mut t = T::with_rules(Some(MissedReason::OutsideHours));
    t.pause("700", "2000", true);
    t.pause("700", "2001", true);
    t.inbound("1.1", c.0);
    t.chan(0, "QueueCallerJoin", c.0, c.1, "1.1", &[("Queue", "700"), ("Position", "1")]);
    assert_eq!(t.n.block_caller("1.1").as_deref(), Some(c.0), "the caller's channel, to hang up");
    t.chan(1, "SoftHangupRequest", c.0, c.1, "1.1", &[("Cause", "21")]);
    t.chan(0, "Hangup", c.0, c.1, "1.1", &[("Cause", "21"), ("Cause-txt", "Call Rejected")]);
    assert_eq!(t.missed("1.1"), MissedReason::Blocked);
    assert_eq!(t.n.block_caller("1.1"), None, "an ended call is not marked");

    // Answered: too late to block.
    let mut t = T::new();
    let m = ("SIP/2000-02", "2.2");
    t.inbound("2.1", "SIP/carrier-02");
    t.chan(0, "QueueCallerJoin", "SIP/carrier-02", "2.1", "2.1", &[("Queue", "700")]);
    t.two(1, "AgentCalled", ("SIP/carrier-02", "2.1"), m, "2.1", &[("Interface", "SIP/2000")]);
    t.two(1, "AgentConnect", ("SIP/carrier-02", "2.1"), m, "2.1", &[("Interface", "SIP/2000")]);
    assert_eq!(t.n.block_caller("2.1"), None);
    assert_eq!(t.n.block_caller("9.9"), None, "unknown call");

    // Taken back: the call ends as it would have.
    let mut t = T::new();
    t.inbound("3.1", "SIP/carrier-03");
    t.chan(0, "QueueCallerJoin", "SIP/carrier-03", "3.1", "3.1", &[("Queue", "700")]);
    assert!(t.n.block_caller("3.1").is_some());
    t.n.unblock_caller("3.1");
    t.chan(5, "QueueCallerAbandon", "SIP/carrier-03", "3.1", "3.1", &[("Queue", "700")]);
    t.chan(0, "Hangup", "SIP/carrier-03", "3.1", "3.1", &[("Cause", "16")]);
    assert_eq!(t.missed("3.1"), MissedReason::Abandoned);
}

#[test]
fn a_click_to_call_whose_agent_never_answers_keeps_the_customer_number() {
    let mut t = T::new();
    let at = t.t * 1_000_000;
    t.n.expect_originate(ExpectedOriginate {
        call_id: "5.1".into(),
        agent: AgentId::new("maria"),
        device: "SIP/2000".into(),
        number: "11987650700".into(),
        ticket: Some("4711".into()),
        at,
    });
    // The PBX rings Maria's phone (no number dialled yet); it rings out.
    t.ev(
        0,
        "Newchannel",
        &[("Channel", "SIP/2000-0000000a"), ("Uniqueid", "5.1"), ("Linkedid", "5.1"), ("Exten", "s")],
    );
    t.chan(1, "Newstate", "SIP/2000-0000000a", "5.1", "5.1", &[("ChannelStateDesc", "Ringing")]);
    t.chan(20, "Hangup", "SIP/2000-0000000a", "5.1", "5.1", &[("Cause", "19")]);
    t.ev(0, "OriginateResponse", &[("Response", "Failure"), ("Uniqueid", "5.1"), ("Reason", "3")]);
    assert_eq!(t.types("5.1"), ["call.started", "call.missed", "call.ended"]);
    assert!(matches!(t.kind("5.1", "call.missed")[0], EventKind::Missed { reason: MissedReason::AgentNoAnswer, .. }));
    let snap = t.last_of("5.1").call.clone().expect("snapshot");
    assert_eq!(snap.callee.number.as_deref(), Some("11987650700"));
    assert_eq!(snap.ticket_id.as_deref(), Some("4711"));
    assert_eq!(snap.agent.as_ref().map(AgentId::as_str), Some("maria"));
}

#[test]
fn a_click_to_call_the_pbx_cannot_ring_is_failed() {
    let mut t = T::new();
    t.ev(
        0,
        "Newchannel",
        &[("Channel", "SIP/2000-0000000b"), ("Uniqueid", "5.2"), ("Linkedid", "5.2"), ("Exten", "s")],
    );
    t.chan(0, "Hangup", "SIP/2000-0000000b", "5.2", "5.2", &[("Cause", "20")]);
    t.ev(0, "OriginateResponse", &[("Response", "Failure"), ("Uniqueid", "5.2"), ("Reason", "0")]);
    // The phone never rang (unregistered): the PBX failed, not the agent.
    assert!(matches!(t.kind("5.2", "call.missed")[0], EventKind::Missed { reason: MissedReason::Failed, .. }));
    let mut t = T::new();
    t.ev(
        0,
        "Newchannel",
        &[("Channel", "SIP/2000-0000000c"), ("Uniqueid", "5.3"), ("Linkedid", "5.3"), ("Exten", "s")],
    );
    t.ev(0, "OriginateResponse", &[("Response", "Failure"), ("Uniqueid", "5.3"), ("Reason", "8")]);
    t.chan(0, "Hangup", "SIP/2000-0000000c", "5.3", "5.3", &[("Cause", "34")]);
    assert!(matches!(t.kind("5.3", "call.missed")[0], EventKind::Missed { reason: MissedReason::Failed, .. }));
}

#[test]
fn an_agent_dialling_another_agents_extension_is_internal() {
    let mut t = T::new();
    // chan_sip/PJSIP may create the phone's channel before the dialplan
    // knows the extension: Exten is empty at first.
    t.ev(0, "Newchannel", &[("Channel", "SIP/2000-00000010"), ("Uniqueid", "6.1"), ("Linkedid", "6.1"), ("Exten", "")]);
    t.ev(0, "Newchannel", &[("Channel", "SIP/2001-00000011"), ("Uniqueid", "6.2"), ("Linkedid", "6.1")]);
    t.two(0, "DialBegin", ("SIP/2000-00000010", "6.1"), ("SIP/2001-00000011", "6.2"), "6.1", &[("DialString", "2001")]);
    t.two(2, "DialEnd", ("SIP/2000-00000010", "6.1"), ("SIP/2001-00000011", "6.2"), "6.1", &[("DialStatus", "ANSWER")]);
    t.chan(5, "Hangup", "SIP/2001-00000011", "6.2", "6.1", &[("Cause", "16")]);
    t.chan(0, "Hangup", "SIP/2000-00000010", "6.1", "6.1", &[("Cause", "16")]);
    let snap = t.last_of("6.1").call.clone().expect("snapshot");
    assert_eq!(snap.direction, crate::event::Direction::Internal);
    assert_eq!(snap.callee.number.as_deref(), Some("2001"));
    assert_eq!(t.types("6.1"), ["call.started", "call.offered", "call.answered", "call.ended"]);
}

#[test]
fn resync_reconciles_what_a_known_call_did_while_nobody_looked() {
    let mut t = T::new();
    t.inbound("7.1", "SIP/carrier-07");
    t.chan(0, "QueueCallerJoin", "SIP/carrier-07", "7.1", "7.1", &[("Queue", "700")]);
    t.ev(0, "Newchannel", &[("Channel", "SIP/2000-0000007a"), ("Uniqueid", "7.2"), ("Linkedid", "7.1")]);
    t.ev(0, "Newchannel", &[("Channel", "SIP/2001-0000007b"), ("Uniqueid", "7.3"), ("Linkedid", "7.1")]);
    t.two(
        0,
        "AgentCalled",
        ("SIP/carrier-07", "7.1"),
        ("SIP/2000-0000007a", "7.2"),
        "7.1",
        &[("Queue", "700"), ("MemberName", "SIP/2000"), ("Interface", "SIP/2000")],
    );
    t.two(
        0,
        "AgentCalled",
        ("SIP/carrier-07", "7.1"),
        ("SIP/2001-0000007b", "7.3"),
        "7.1",
        &[("Queue", "700"), ("MemberName", "SIP/2001"), ("Interface", "SIP/2001")],
    );
    assert_eq!(t.kind("7.1", "call.offered").len(), 2);
    // Connection lost; meanwhile Maria answered and Joao's phone stopped.
    t.n.begin_resync();
    let listed = |uid: &str, chan: &str, state: &str, bridge: &str| {
        Frame::from_pairs(&[
            ("Event", "CoreShowChannel"),
            ("Channel", chan),
            ("Uniqueid", uid),
            ("Linkedid", "7.1"),
            ("ChannelStateDesc", state),
            ("Application", "Queue"),
            ("ApplicationData", "700"),
            ("BridgeId", bridge),
        ])
    };
    let listing = PbxChannels {
        channels: vec![listed("7.1", "SIP/carrier-07", "Up", "b-1"), listed("7.2", "SIP/2000-0000007a", "Up", "b-1")],
    };
    let mut out = Vec::new();
    t.n.resync(&listing, (t.t + 5) * 1_000_000, &mut out);
    let types: Vec<&str> = out.iter().map(|e| e.kind.type_name()).collect();
    assert_eq!(types, ["call.offer_ended", "call.answered"], "{out:#?}");
    assert!(matches!(&out[1].kind, EventKind::Answered { agent: Some(a), .. } if a.as_str() == "maria"));
    // A second resync with the same listing changes nothing.
    t.n.begin_resync();
    let mut again = Vec::new();
    t.n.resync(&listing, (t.t + 6) * 1_000_000, &mut again);
    assert!(again.is_empty(), "{again:#?}");
}
