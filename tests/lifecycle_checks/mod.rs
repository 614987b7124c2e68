//! The lifecycle invariants of SPEC §4, checked on a whole event stream.
#![allow(dead_code)]

use callbridge::event::{Event, EventKind};
use std::collections::{BTreeMap, HashSet};

/// Per call: seq 1, 2, 3… without gaps; `call.started` first; exactly one
/// `call.ended`, last; a call never answered has exactly one `call.missed`
/// right before `call.ended`, an answered one none; ids unique.
pub fn check_invariants(events: &[Event], pbx: &str) -> Result<(), String> {
    let mut ids = HashSet::new();
    let mut per_call: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
    for e in events {
        let id = e.id(pbx);
        if !ids.insert(id.clone()) {
            return Err(format!("duplicate event id {id}"));
        }
        if let Some(c) = &e.call {
            per_call.entry(c.id.to_string()).or_default().push(e);
        }
    }
    for (call, evs) in &per_call {
        for (i, e) in evs.iter().enumerate() {
            if e.seq != i as u64 + 1 {
                return Err(format!("call {call}: event {} has seq {}, expected {}", e.kind.type_name(), e.seq, i + 1));
            }
        }
        let types: Vec<&str> = evs.iter().map(|e| e.kind.type_name()).collect();
        if types.first() != Some(&"call.started") {
            return Err(format!("call {call}: first event is {:?}", types.first()));
        }
        let ended = types.iter().filter(|t| **t == "call.ended").count();
        if ended != 1 || types.last() != Some(&"call.ended") {
            return Err(format!("call {call}: {ended} call.ended, sequence {types:?}"));
        }
        let answered = types.contains(&"call.answered");
        let missed = types.iter().filter(|t| **t == "call.missed").count();
        match (answered, missed) {
            (true, 0) => {}
            (false, 1) if types[types.len() - 2] == "call.missed" => {}
            _ => return Err(format!("call {call}: answered={answered}, {missed} call.missed, sequence {types:?}")),
        }
        // Every offer is closed by an offer_ended or by that agent answering.
        let mut open: Vec<String> = Vec::new();
        for e in evs {
            match &e.kind {
                EventKind::Offered { agent, .. } => open.push(agent.to_string()),
                EventKind::OfferEnded { agent, .. } => open.retain(|a| a != agent.as_str()),
                EventKind::Answered { agent: Some(agent), .. } => open.retain(|a| a != agent.as_str()),
                _ => {}
            }
        }
        if !open.is_empty() {
            return Err(format!("call {call}: offers never closed for {open:?}"));
        }
        if evs.iter().any(|e| e.time < evs[0].time) {
            return Err(format!("call {call}: an event is older than call.started"));
        }
    }
    Ok(())
}

/// The events of one call, as `type` strings.
pub fn types_of<'a>(events: &'a [Event], call: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e.call.as_ref().is_some_and(|c| c.id.as_str() == call))
        .map(|e| e.kind.type_name())
        .collect()
}
