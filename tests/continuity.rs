//! Calls survive a restart of the normalizer: every fixture trace is cut at
//! many points; at each cut the live calls' checkpoints (what the outbox
//! stores with the events) go into a fresh normalizer, which handles the
//! rest of the trace. Each call's events must be exactly those of the
//! uninterrupted run: same `seq`s, same content, one `call.ended`.
//!
//! This is the orderly stop (SIGTERM: the last checkpoint is written at
//! shutdown). Agent presence is not part of a call's state (a restarted
//! daemon learns it from the PBX at its first resync), so only call events
//! are compared. `tests/restart.rs` runs the daemon itself through SIGTERM
//! and `kill -9` against a scripted PBX.

mod support;

use callbridge::config::Config;
use callbridge::event::Event;
use callbridge::normalize::{CallCheckpoint, Normalizer};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn lab() -> Config {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/lab.toml");
    Config::load(&path).expect("config/lab.toml is valid")
}

/// What the outbox's `live_calls` table holds, applied as the outbox does.
#[derive(Default)]
struct Store {
    rows: BTreeMap<String, CallCheckpoint>,
}

impl Store {
    fn commit(&mut self, events: &[Event], checkpoints: Vec<CallCheckpoint>) {
        for cp in checkpoints {
            self.rows.insert(cp.call.to_string(), cp);
        }
        for e in events {
            if let (Some(call), callbridge::event::EventKind::Ended { .. }) = (&e.call, &e.kind) {
                self.rows.remove(call.id.as_str());
            }
        }
    }
}

fn call_lines(events: &[Event], pbx: &str) -> Vec<String> {
    events.iter().filter(|e| e.call.is_some()).map(|e| e.to_cloudevent_json(pbx)).collect()
}

/// Handles `frames` like the pipeline: a checkpoint with every batch of
/// events (here, every frame that made some).
fn run(n: &mut Normalizer, frames: &[callbridge::ami::Frame], store: &mut Store, all: &mut Vec<Event>) {
    let mut now = 0;
    let mut out = Vec::new();
    for f in frames {
        if let Some(ts) = f.timestamp_micros() {
            now = ts.max(now);
        }
        n.handle(f, now, &mut out);
        if !out.is_empty() {
            store.commit(&out, n.take_checkpoints());
            all.append(&mut out);
        }
    }
}

#[test]
fn every_call_goes_on_after_a_restart_at_any_point() {
    let config = lab();
    let pbx = config.pbx.name.clone();
    let mut checked = 0;
    for (name, bytes) in support::trace::all() {
        let frames = support::trace::frames(&support::trace::decode(&bytes));
        let mut whole = Vec::new();
        let mut n = callbridge::settings::normalizer(&config);
        run(&mut n, &frames, &mut Store::default(), &mut whole);
        let want = call_lines(&whole, &pbx);

        let stride = (frames.len() / 40).max(1);
        for cut in (1..frames.len()).step_by(stride) {
            let (before, after) = frames.split_at(cut);
            let mut store = Store::default();
            let mut got = Vec::new();
            let mut first = callbridge::settings::normalizer(&config);
            first.track_changes();
            run(&mut first, before, &mut store, &mut got);
            // Orderly stop: the final checkpoint.
            store.commit(&[], first.take_checkpoints());
            let live = first.live_calls();
            drop(first);

            let mut second = callbridge::settings::normalizer(&config);
            second.track_changes();
            let restored = second.restore(store.rows.into_values().collect());
            assert!(restored.unreadable.is_empty() && restored.stale.is_empty(), "{name} cut at {cut}: {restored:?}");
            assert_eq!(restored.calls.len(), live, "{name} cut at {cut}: every live call restored");
            run(&mut second, after, &mut Store::default(), &mut got);
            let got = call_lines(&got, &pbx);
            if got != want {
                let at = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
                panic!(
                    "{name} cut at frame {cut}: call events differ at {at}\n  want: {}\n  got:  {}",
                    want.get(at).map_or("<end>", String::as_str),
                    got.get(at).map_or("<end>", String::as_str)
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 300, "only {checked} cuts checked");
}

#[test]
fn unreadable_state_keeps_the_numbering() {
    let config = lab();
    let mut n = callbridge::settings::normalizer(&config);
    let restored = n.restore(vec![CallCheckpoint {
        call: callbridge::event::CallId::new("1700000000.1"),
        seq: 7,
        state: b"{\"format\": 999}".to_vec(),
    }]);
    assert_eq!(restored.unreadable.len(), 1);
    assert_eq!(n.live_calls(), 0);
    // The PBX still has the call: adopted, it numbers after 7.
    let frame = callbridge::ami::Frame::from_pairs(&[
        ("Event", "Newchannel"),
        ("Channel", "SIP/carrier00-00000001"),
        ("Uniqueid", "1700000000.1"),
        ("Linkedid", "1700000000.1"),
        ("Exten", "1130001000"),
        ("CallerIDNum", "11987650001"),
    ]);
    let mut out = Vec::new();
    n.handle(&frame, 1_700_000_000_000_000, &mut out);
    assert_eq!(out.first().map(|e| e.seq), Some(8), "{out:?}");
}
