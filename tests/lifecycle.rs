//! What the helpdesk must end up seeing for each recorded trace (the table
//! in the fixtures' README), asserted field by field; plus the invariants
//! under arbitrary interleavings of concurrent calls.

mod lifecycle_checks;

use callbridge::ami::codec::{decode_all, AmiCodec, AmiMessage};
use callbridge::ami::Frame;
use callbridge::config::Config;
use callbridge::event::{Event, EventKind, HungUpBy, MissedReason, OfferEndReason, TransferKind};
use callbridge::normalize::{AlwaysOpen, Normalizer};
use callbridge::replay::events_of;
use lifecycle_checks::{check_invariants, types_of};
use proptest::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lab() -> Config {
    Config::load(&root().join("config/lab.toml")).expect("config/lab.toml is valid")
}

fn replay(name: &str) -> Vec<Event> {
    let events = events_of(&lab(), &[root().join("fixtures/ami").join(name)]).expect("trace readable");
    check_invariants(&events, "lab").unwrap_or_else(|e| panic!("{name}: {e}"));
    events
}

fn only_call(events: &[Event]) -> String {
    let mut ids: Vec<String> = events.iter().filter_map(|e| e.call.as_ref().map(|c| c.id.to_string())).collect();
    ids.dedup();
    assert_eq!(ids.len(), 1, "one call in the trace: {ids:?}");
    ids.remove(0)
}

fn last(events: &[Event]) -> &Event {
    events.iter().rev().find(|e| e.call.is_some()).expect("a call event")
}

fn ended(events: &[Event]) -> (&Event, HungUpBy) {
    let e = last(events);
    match &e.kind {
        EventKind::Ended { hung_up_by, .. } => (e, *hung_up_by),
        other => panic!("last event is {other:?}"),
    }
}

#[test]
fn a01_inbound_answered() {
    let ev = replay("a01-inbound-answered.ami");
    let id = only_call(&ev);
    assert_eq!(types_of(&ev, &id), ["call.started", "call.queued", "call.offered", "call.answered", "call.ended"]);
    assert!(
        matches!(&ev[1].kind, EventKind::Queued { group: Some(g), queue, .. } if g.as_str() == "support" && queue == "700")
    );
    assert!(
        matches!(&ev[2].kind, EventKind::Offered { agent, extension } if agent.as_str() == "joao" && extension == "2001")
    );
    assert!(matches!(&ev[3].kind, EventKind::Answered { agent: Some(a), wait_seconds: 3 } if a.as_str() == "joao"));
    let (end, by) = ended(&ev);
    assert_eq!(by, HungUpBy::Agent);
    let call = end.call.as_ref().expect("snapshot");
    assert_eq!(call.caller.number.as_deref(), Some("11987650001"));
    assert_eq!(call.caller.name.as_deref(), Some("Cliente 0001"));
    assert_eq!(call.callee.number.as_deref(), Some("1130001000"));
    assert_eq!(call.recording.as_deref(), Some("https://pbx.example/recordings/20261123-1795471080.4.wav"));
    assert!(matches!(end.kind, EventKind::Ended { talk_seconds: 8, .. }));
}

#[test]
fn a02_caller_hangs_up() {
    let ev = replay("a02-inbound-caller-hangs-up.ami");
    let id = only_call(&ev);
    assert!(types_of(&ev, &id).contains(&"call.answered"));
    assert!(ev.iter().any(|e| matches!(&e.kind, EventKind::Answered { agent: Some(a), .. } if a.as_str() == "maria")));
    assert_eq!(ended(&ev).1, HungUpBy::Caller);
}

#[test]
fn a03_abandoned_while_ringing() {
    let ev = replay("a03-inbound-abandoned.ami");
    let id = only_call(&ev);
    assert_eq!(
        types_of(&ev, &id),
        ["call.started", "call.queued", "call.offered", "call.offer_ended", "call.missed", "call.ended"]
    );
    assert!(ev.iter().any(|e| matches!(&e.kind,
        EventKind::OfferEnded { agent, reason: OfferEndReason::CallerHungUp } if agent.as_str() == "joao")));
    assert!(ev.iter().any(|e| matches!(e.kind, EventKind::Missed { reason: MissedReason::Abandoned, .. })));
    assert_eq!(ended(&ev).1, HungUpBy::Caller);
}

#[test]
fn a04_ring_no_answer_then_next_agent() {
    let ev = replay("a04-ring-noanswer-next-agent.ami");
    let id = only_call(&ev);
    assert_eq!(
        types_of(&ev, &id),
        [
            "call.started",
            "call.queued",
            "call.offered",
            "call.offer_ended",
            "call.offered",
            "call.answered",
            "call.ended"
        ]
    );
    assert!(matches!(&ev[2].kind, EventKind::Offered { agent, .. } if agent.as_str() == "maria"));
    assert!(
        matches!(&ev[3].kind, EventKind::OfferEnded { agent, reason: OfferEndReason::NoAnswer } if agent.as_str() == "maria")
    );
    assert!(matches!(&ev[4].kind, EventKind::Offered { agent, .. } if agent.as_str() == "joao"));
    assert!(matches!(&ev[5].kind, EventKind::Answered { agent: Some(a), wait_seconds: 12 } if a.as_str() == "joao"));
}

#[test]
fn a05_no_agents_available() {
    let ev = replay("a05-no-agents-available.ami");
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.type_name()).collect();
    assert_eq!(kinds, ["agent.availability", "call.started", "call.missed", "call.ended", "agent.availability"]);
    assert!(matches!(&ev[0].kind, EventKind::AgentAvailability { agent, available: false, reason: Some(r), .. }
        if agent.as_str() == "ana" && r == "almoco"));
    assert!(matches!(ev[2].kind, EventKind::Missed { reason: MissedReason::NoAgents, .. }));
    assert_eq!(ev[2].call.as_ref().and_then(|c| c.group.as_ref()).map(|g| g.as_str()), Some("sales"));
    assert!(matches!(&ev[4].kind, EventKind::AgentAvailability { available: true, .. }));
}

#[test]
fn a06_blind_transfer() {
    let ev = replay("a06-blind-transfer.ami");
    let id = only_call(&ev);
    let types = types_of(&ev, &id);
    assert_eq!(
        types,
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
    let t = ev.iter().find(|e| e.kind.type_name() == "call.transferred").expect("transferred");
    assert!(
        matches!(&t.kind, EventKind::Transferred { from_agent: Some(f), to_agent: Some(to), kind: TransferKind::Blind, .. }
        if f.as_str() == "ana" && to.as_str() == "joao")
    );
    assert_eq!(t.call.as_ref().and_then(|c| c.agent.as_ref()).map(|a| a.as_str()), Some("joao"));
    let (end, by) = ended(&ev);
    assert_eq!(by, HungUpBy::Agent);
    assert_eq!(end.call.as_ref().and_then(|c| c.agent.as_ref()).map(|a| a.as_str()), Some("joao"));
}

fn outbound(name: &str, ticket: &str, number: &str) -> Vec<Event> {
    let ev = replay(name);
    let _ = only_call(&ev);
    for e in &ev {
        let c = e.call.as_ref().expect("call event");
        assert_eq!(c.direction, callbridge::event::Direction::Outbound, "{name}: {}", e.kind.type_name());
        assert_eq!(c.agent.as_ref().map(|a| a.as_str()), Some("maria"));
        assert_eq!(c.ticket_id.as_deref(), Some(ticket), "{name}: {}", e.kind.type_name());
    }
    assert_eq!(last(&ev).call.as_ref().and_then(|c| c.callee.number.as_deref()), Some(number));
    ev
}

#[test]
fn a07_outbound_answered() {
    let ev = outbound("a07-outbound-answered.ami", "4711", "11987650700");
    assert_eq!(
        ev.iter().map(|e| e.kind.type_name()).collect::<Vec<_>>(),
        ["call.started", "call.answered", "call.ended"]
    );
    assert!(matches!(ev[2].kind, EventKind::Ended { talk_seconds: 4, .. }));
    assert!(last(&ev).call.as_ref().is_some_and(|c| c.recording.is_some()));
}

fn missed_reason(ev: &[Event]) -> MissedReason {
    ev.iter()
        .find_map(|e| match e.kind {
            EventKind::Missed { reason, .. } => Some(reason),
            _ => None,
        })
        .expect("a call.missed")
}

#[test]
fn a08_outbound_agent_cancels() {
    let ev = outbound("a08-outbound-agent-cancels.ami", "4712", "11987650701");
    assert_eq!(missed_reason(&ev), MissedReason::Cancelled);
    assert_eq!(ended(&ev).1, HungUpBy::Agent);
}

#[test]
fn a09_outbound_no_answer() {
    let ev = outbound("a09-outbound-no-answer.ami", "4714", "11987650901");
    assert_eq!(missed_reason(&ev), MissedReason::NoAnswer);
}

#[test]
fn a10_outbound_busy() {
    let ev = outbound("a10-outbound-busy.ami", "4715", "11987651002");
    assert_eq!(missed_reason(&ev), MissedReason::Busy);
}

#[test]
fn a11_concurrent_mix() {
    let ev = replay("a11-concurrent-mix.ami");
    let started = ev.iter().filter(|e| e.kind.type_name() == "call.started").count();
    let ended = ev.iter().filter(|e| e.kind.type_name() == "call.ended").count();
    let mut answered: Vec<&str> = ev
        .iter()
        .filter(|e| e.kind.type_name() == "call.answered")
        .filter_map(|e| e.call.as_ref().map(|c| c.id.as_str()))
        .collect();
    answered.dedup();
    let missed: Vec<MissedReason> = ev
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Missed { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!((started, ended, answered.len()), (12, 12, 9));
    assert_eq!(missed, vec![MissedReason::Abandoned; 3]);
}

fn frames_of(name: &str) -> Vec<Frame> {
    let data = std::fs::read(root().join("fixtures/ami").join(name)).expect("trace");
    let mut v = Vec::new();
    decode_all(&mut AmiCodec::default(), &data, |m| {
        if let AmiMessage::Frame(f) = m {
            v.push(f)
        }
    });
    v
}

fn run(frames: &[&Frame]) -> Vec<Event> {
    let config = lab();
    let mut n = Normalizer::new(
        Arc::new(callbridge::settings::directory(&config)),
        Arc::new(AlwaysOpen),
        callbridge::settings::normalizer_options(&config),
    );
    let mut out = Vec::new();
    for f in frames {
        n.handle(f, 0, &mut out);
    }
    out
}

fn per_call(events: &[Event]) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut m = std::collections::BTreeMap::<String, Vec<String>>::new();
    for e in events {
        if let Some(c) = &e.call {
            m.entry(c.id.to_string()).or_default().push(e.to_cloudevent_json("lab"));
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Calls are independent: interleaving the frames of several traces in
    /// any order (each trace's own order kept) gives every call exactly the
    /// lifecycle it has when replayed alone.
    #[test]
    fn interleaving_calls_changes_nothing_per_call(choices in proptest::collection::vec(0usize..4, 2000)) {
        let traces = [
            frames_of("a01-inbound-answered.ami"),
            frames_of("a04-ring-noanswer-next-agent.ami"),
            frames_of("a06-blind-transfer.ami"),
            frames_of("a08-outbound-agent-cancels.ami"),
        ];
        let alone: Vec<Event> = traces.iter().flat_map(|t| run(&t.iter().collect::<Vec<_>>())).collect();
        let mut idx = [0usize; 4];
        let mut mixed: Vec<&Frame> = Vec::new();
        let mut choice = choices.iter().cycle();
        while idx.iter().zip(&traces).any(|(i, t)| *i < t.len()) {
            let mut k = *choice.next().unwrap_or(&0);
            while idx[k] >= traces[k].len() {
                k = (k + 1) % 4;
            }
            mixed.push(&traces[k][idx[k]]);
            idx[k] += 1;
        }
        let together = run(&mixed);
        prop_assert!(check_invariants(&together, "lab").is_ok(), "{:?}", check_invariants(&together, "lab"));
        prop_assert_eq!(per_call(&alone), per_call(&together));
    }
}

#[test]
fn no_stuck_suspects_while_replaying_the_fixture_traces() {
    // The sweeper's question asked after every frame, on the trace's clock
    // (what a paced replay at any speed sees): real calls are never suspects.
    let limits = callbridge::settings::stuck_limits(&lab());
    let config = lab();
    let mut n = Normalizer::new(
        Arc::new(callbridge::settings::directory(&config)),
        Arc::new(AlwaysOpen),
        callbridge::settings::normalizer_options(&config),
    );
    let mut out = Vec::new();
    let mut checked = 0;
    for name in [
        "a01-inbound-answered.ami",
        "a04-ring-noanswer-next-agent.ami",
        "a06-blind-transfer.ami",
        "a09-outbound-no-answer.ami",
        "a11-concurrent-mix.ami",
    ] {
        for f in frames_of(name) {
            n.handle(&f, 0, &mut out);
            if let Some(ts) = f.timestamp_micros() {
                let s = n.suspects(ts, &limits);
                assert!(s.is_empty(), "{name}: false positive {s:?}");
                checked += 1;
            }
        }
    }
    assert!(checked > 1000);
}
