//! From an agent's dialogs to helpdesk events: `agent.line` (idle, ringing,
//! busy, with the remote party's number when the PBX gives it) and, in
//! SIP-only mode (no AMI), a reduced call lifecycle per dialog.
//!
//! A pure, deterministic state machine like the normalizer: [`LineTracker::update`]
//! takes the agent's current [`DialogSet`] and the time, [`LineTracker::poll`]
//! takes the time, and both append events to a caller-provided `Vec`. No
//! I/O, no clock of its own.
//!
//! # Line state
//!
//! `busy` when a dialog is confirmed or the agent is placing a call
//! (`direction="initiator"` not yet confirmed); else `ringing` when a
//! dialog is being set up towards the agent (`recipient`, or no direction:
//! PBX hints report ringing only for incoming calls); else `idle`. An event
//! goes out when the state or the remote number changes. Asterisk first
//! reports a ringing dialog with the agent's own extension as the remote
//! identity and only then the caller (see the lab log): an identity equal to
//! the agent's extension counts as unknown.
//!
//! # SIP-only lifecycle
//!
//! Each dialog (by its `id`) is one call, seen from the agent's phone:
//!
//! | dialog | events |
//! | --- | --- |
//! | appears ringing (inbound) | `call.started`, `call.offered` (held up to `offer_identity_wait` for the caller's identity) |
//! | appears being dialled (outbound) | `call.started` |
//! | becomes `confirmed` | `call.answered` (started/offered first if the dialog appears confirmed) |
//! | ends (`terminated`, or left out of a full document) after an answer | `call.ended` |
//! | ends without an answer | inbound: `call.offer_ended`, `call.missed`, `call.ended`; outbound: `call.missed`, `call.ended` |
//!
//! Call ids are `sip-` and 16 hex digits of MD5 over (extension, dialog
//! id, dialog call-id, first-seen time): deterministic for the same
//! NOTIFYs at the same times, distinct for successive calls on the same
//! dialog id (Asterisk reuses the extension as the id of every call).
//! Queue, group, ticket and recording stay empty: SIP dialogs do not carry
//! them. A dialog that goes back from `confirmed` to ringing (Asterisk's
//! aggregate state during call waiting) stays the answered call.
//!
//! Architecture invariant (as for the normalizer): every call that produced
//! `call.started` produces exactly one `call.ended`; `seq` is 1, 2, 3…
//! without gaps; a call never answered gets exactly one `call.missed` right
//! before `call.ended`.

use super::dialog_info::{Dialog, DialogSet, DialogState, Direction as DialogDirection, StateEvent};
use crate::event::{
    seconds_between, CallSnapshot, CallState, Direction, EndReason, Event, EventKind, HungUpBy, LineState, Micros,
    MissedReason, OfferEndReason, Party,
};
use crate::ids::{AgentId, CallId};
use md5::{Digest, Md5};
use smol_str::SmolStr;
use std::collections::BTreeMap;

/// What a tracker emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `agent.line` only (another source, AMI, owns the call lifecycle).
    LineOnly,
    /// `agent.line` and the reduced call lifecycle.
    SipOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Ringing, offer held until this time for the caller's identity.
    Held(Micros),
    /// Started (and offered, inbound), not answered.
    Setup,
    Answered,
}

#[derive(Debug, Clone)]
struct Call {
    snapshot: CallSnapshot,
    seq: u64,
    phase: Phase,
}

/// One agent's line and, in SIP-only mode, its calls.
#[derive(Debug, Clone)]
pub struct LineTracker {
    agent: AgentId,
    extension: String,
    mode: Mode,
    offer_wait: Micros,
    /// Last emitted (state, remote number); `None` before the first NOTIFY.
    line: Option<(LineState, Option<String>)>,
    /// Time of the last agent event: ids (`<pbx>:agent:<agent>:<µs>`) must
    /// not repeat, so agent events get strictly increasing times.
    last_agent_time: Micros,
    /// Remote parties seen per dialog id (a later document may omit them).
    remotes: BTreeMap<String, Party>,
    calls: BTreeMap<String, Call>,
}

impl LineTracker {
    pub fn new(agent: AgentId, extension: String, mode: Mode, offer_wait: Micros) -> LineTracker {
        LineTracker {
            agent,
            extension,
            mode,
            offer_wait: offer_wait.max(0),
            line: None,
            last_agent_time: Micros::MIN,
            remotes: BTreeMap::new(),
            calls: BTreeMap::new(),
        }
    }

    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    /// The last emitted line state.
    pub fn line_state(&self) -> Option<LineState> {
        self.line.as_ref().map(|(s, _)| *s)
    }

    /// Calls in progress (SIP-only mode).
    pub fn calls_in_progress(&self) -> usize {
        self.calls.len()
    }

    /// When [`LineTracker::poll`] has something to do (a held offer).
    pub fn next_deadline(&self) -> Option<Micros> {
        self.calls
            .values()
            .filter_map(|c| match c.phase {
                Phase::Held(until) => Some(until),
                _ => None,
            })
            .min()
    }

    /// Held offers whose wait is over go out without the caller's identity.
    pub fn poll(&mut self, now: Micros, out: &mut Vec<Event>) {
        let due: Vec<String> = self
            .calls
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Held(until) if until <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(call) = self.calls.get_mut(&key) {
                release(call, &self.agent, &self.extension, out);
            }
        }
    }

    /// The agent's dialogs after a NOTIFY was applied.
    pub fn update(&mut self, now: Micros, dialogs: &DialogSet, out: &mut Vec<Event>) {
        for d in dialogs.dialogs() {
            if let Some(p) = self.remote_party(d) {
                self.remotes.insert(d.id.clone(), p);
            }
        }
        self.update_line(now, dialogs, out);
        if self.mode == Mode::SipOnly {
            self.update_calls(now, dialogs, out);
        }
        self.remotes.retain(|id, _| dialogs.dialogs().any(|d| &d.id == id && d.state != DialogState::Terminated));
    }

    /// The remote party of a dialog, unless it is unknown or the agent itself.
    fn remote_party(&self, d: &Dialog) -> Option<Party> {
        let remote = d.remote.as_ref()?;
        let number = remote.number()?;
        if number == self.extension {
            return None;
        }
        let name = remote.display.clone().filter(|n| !n.is_empty() && n != number);
        Some(Party { number: Some(number.into()), name: name.map(SmolStr::from) })
    }

    fn update_line(&mut self, now: Micros, dialogs: &DialogSet, out: &mut Vec<Event>) {
        let live: Vec<&Dialog> = dialogs.dialogs().filter(|d| d.state != DialogState::Terminated).collect();
        let busy =
            live.iter().find(|d| d.state == DialogState::Confirmed || d.direction == Some(DialogDirection::Initiator));
        let ringing = live.iter().find(|d| d.state.is_setup());
        let (state, dialog) = match (busy, ringing) {
            (Some(d), _) => (LineState::Busy, Some(d)),
            (None, Some(d)) => (LineState::Ringing, Some(d)),
            (None, None) => (LineState::Idle, None),
        };
        let remote = dialog.and_then(|d| self.remotes.get(&d.id)).and_then(|p| p.number.as_deref().map(str::to_string));
        let now_line = (state, remote);
        if self.line.as_ref() == Some(&now_line) {
            return;
        }
        let time = now.max(self.last_agent_time.saturating_add(1));
        self.last_agent_time = time;
        out.push(Event {
            seq: 0,
            time,
            kind: EventKind::AgentLine { agent: self.agent.clone(), state: now_line.0, remote: now_line.1.clone() },
            call: None,
        });
        self.line = Some(now_line);
    }

    fn update_calls(&mut self, now: Micros, dialogs: &DialogSet, out: &mut Vec<Event>) {
        let mut seen = Vec::new();
        for d in dialogs.dialogs() {
            if d.state == DialogState::Terminated {
                if let Some(call) = self.calls.remove(&d.id) {
                    finish(call, now, d.event, &self.agent, &self.extension, out);
                }
                continue;
            }
            seen.push(d.id.clone());
            let remote = self.remotes.get(&d.id).cloned();
            match self.calls.get_mut(&d.id) {
                None => {
                    let call = self.start(now, d, remote, out);
                    self.calls.insert(d.id.clone(), call);
                }
                Some(call) => {
                    if let Some(party) = remote {
                        let slot = match call.snapshot.direction {
                            Direction::Outbound => &mut call.snapshot.callee,
                            _ => &mut call.snapshot.caller,
                        };
                        if slot.number.is_none() {
                            *slot = party;
                            if matches!(call.phase, Phase::Held(_)) {
                                release(call, &self.agent, &self.extension, out);
                            }
                        }
                    }
                    if d.state == DialogState::Confirmed && call.phase != Phase::Answered {
                        if matches!(call.phase, Phase::Held(_)) {
                            release(call, &self.agent, &self.extension, out);
                        }
                        answer(call, now, &self.agent, out);
                    }
                }
            }
        }
        // Full state leaves ended dialogs out.
        let gone: Vec<String> = self.calls.keys().filter(|k| !seen.contains(k)).cloned().collect();
        for key in gone {
            if let Some(call) = self.calls.remove(&key) {
                finish(call, now, None, &self.agent, &self.extension, out);
            }
        }
    }

    fn start(&self, now: Micros, d: &Dialog, remote: Option<Party>, out: &mut Vec<Event>) -> Call {
        let direction = match (d.direction, d.state) {
            (Some(DialogDirection::Recipient), _) => Direction::Inbound,
            (Some(DialogDirection::Initiator), _) => Direction::Outbound,
            // No direction: hints report ringing only for incoming calls; a
            // dialog first seen confirmed was most likely dialled by the agent.
            (None, DialogState::Confirmed) => Direction::Outbound,
            (None, _) => Direction::Inbound,
        };
        let me = Party { number: Some(self.extension.as_str().into()), name: None };
        let other = remote.unwrap_or_default();
        let (caller, callee) = match direction {
            Direction::Outbound => (me, other),
            _ => (other, me),
        };
        let snapshot = CallSnapshot {
            id: call_id(&self.extension, d, now),
            direction,
            state: CallState::Ringing,
            caller,
            callee,
            group: None,
            queue: None,
            agent: Some(self.agent.clone()),
            ticket_id: None,
            started_at: now,
            answered_at: None,
            ended_at: None,
            recording: None,
            routing: None,
            caller_lookup: None,
        };
        let mut call = Call { snapshot, seq: 0, phase: Phase::Setup };
        let unknown_caller = call.snapshot.caller.number.is_none();
        if direction == Direction::Inbound && d.state.is_setup() && unknown_caller && self.offer_wait > 0 {
            call.phase = Phase::Held(now.saturating_add(self.offer_wait));
            return call;
        }
        call.phase = Phase::Held(now);
        release(&mut call, &self.agent, &self.extension, out);
        if d.state == DialogState::Confirmed {
            answer(&mut call, now, &self.agent, out);
        }
        call
    }
}

/// `sip-` + 16 hex digits of MD5(extension, dialog id, call-id, first seen).
fn call_id(extension: &str, d: &Dialog, first_seen: Micros) -> CallId {
    let mut h = Md5::new();
    for part in [extension, &d.id, d.call_id.as_deref().unwrap_or(""), &first_seen.to_string()] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let mut id = String::from("sip-");
    crate::text::push_hex(&mut id, &h.finalize()[..8]);
    CallId::new(&id)
}

fn emit(call: &mut Call, time: Micros, kind: EventKind, out: &mut Vec<Event>) {
    call.seq += 1;
    out.push(Event { seq: call.seq, time, kind, call: Some(std::sync::Arc::new(call.snapshot.clone())) });
}

/// `call.started` (and `call.offered`, inbound) at the time the dialog was
/// first seen.
fn release(call: &mut Call, agent: &AgentId, extension: &str, out: &mut Vec<Event>) {
    if !matches!(call.phase, Phase::Held(_)) {
        return;
    }
    call.phase = Phase::Setup;
    let t = call.snapshot.started_at;
    emit(call, t, EventKind::Started {}, out);
    if call.snapshot.direction == Direction::Inbound {
        emit(call, t, EventKind::Offered { agent: agent.clone(), extension: extension.to_string() }, out);
    }
}

fn answer(call: &mut Call, now: Micros, agent: &AgentId, out: &mut Vec<Event>) {
    let now = now.max(call.snapshot.started_at);
    call.phase = Phase::Answered;
    call.snapshot.state = CallState::Talking;
    call.snapshot.answered_at = Some(now);
    let wait_seconds = seconds_between(call.snapshot.started_at, now);
    emit(call, now, EventKind::Answered { agent: Some(agent.clone()), wait_seconds }, out);
}

fn finish(mut call: Call, now: Micros, why: Option<StateEvent>, agent: &AgentId, ext: &str, out: &mut Vec<Event>) {
    release(&mut call, agent, ext, out);
    let now = now.max(call.snapshot.started_at);
    let inbound = call.snapshot.direction != Direction::Outbound;
    let wait_seconds = seconds_between(call.snapshot.started_at, call.snapshot.answered_at.unwrap_or(now));
    if call.phase != Phase::Answered {
        if inbound {
            let reason = match why {
                Some(StateEvent::Cancelled) => OfferEndReason::CallerHungUp,
                Some(StateEvent::Replaced) => OfferEndReason::AnsweredElsewhere,
                Some(StateEvent::Rejected | StateEvent::Error) => OfferEndReason::Other,
                _ => OfferEndReason::NoAnswer,
            };
            emit(&mut call, now, EventKind::OfferEnded { agent: agent.clone(), reason }, out);
        }
        let reason = match (why, inbound) {
            (Some(StateEvent::Cancelled), true) => MissedReason::Abandoned,
            (Some(StateEvent::Cancelled), false) => MissedReason::Cancelled,
            (Some(StateEvent::Rejected), _) => MissedReason::Busy,
            (Some(StateEvent::Error), _) => MissedReason::Failed,
            _ => MissedReason::NoAnswer,
        };
        emit(&mut call, now, EventKind::Missed { reason, wait_seconds }, out);
    }
    let hung_up_by = match (why, inbound) {
        (Some(StateEvent::LocalBye), _) => HungUpBy::Agent,
        (Some(StateEvent::RemoteBye), true) => HungUpBy::Caller,
        (Some(StateEvent::RemoteBye), false) => HungUpBy::Customer,
        _ => HungUpBy::System,
    };
    let talk_seconds = call.snapshot.answered_at.map_or(0, |a| seconds_between(a, now));
    let duration_seconds = seconds_between(call.snapshot.started_at, now);
    call.snapshot.state = CallState::Ended;
    call.snapshot.ended_at = Some(now);
    emit(
        &mut call,
        now,
        EventKind::Ended {
            duration_seconds,
            talk_seconds,
            wait_seconds,
            hangup_cause: None,
            hangup_cause_text: None,
            hung_up_by,
            end_reason: EndReason::Normal,
        },
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::dialog_info::DialogInfo;

    const T0: Micros = 1_795_472_524_000_000;
    const S: Micros = 1_000_000;

    fn tracker(mode: Mode, wait: Micros) -> LineTracker {
        LineTracker::new(AgentId::new("maria"), "2000".into(), mode, wait)
    }

    fn apply(t: &mut LineTracker, set: &mut DialogSet, now: Micros, body: &str) -> Vec<Event> {
        set.apply(DialogInfo::parse(body.as_bytes()).unwrap());
        let mut out = Vec::new();
        t.update(now, set, &mut out);
        out
    }

    fn line(e: &Event) -> (LineState, Option<&str>) {
        match &e.kind {
            EventKind::AgentLine { state, remote, .. } => (*state, remote.as_deref()),
            k => panic!("not agent.line: {k:?}"),
        }
    }

    fn types(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind.type_name()).collect()
    }

    use crate::sip::dialog_info::tests::{
        ASTERISK_CONFIRMED_V3, ASTERISK_EARLY_CID_V2, ASTERISK_EARLY_NO_CID_V1, ASTERISK_IDLE_V0,
        ASTERISK_TERMINATED_V4,
    };

    /// The NOTIFY sequence of the lab log for subscription 1-8888.
    #[test]
    fn asterisk_ring_answer_hangup_line_events() {
        let mut t = tracker(Mode::LineOnly, 0);
        let mut set = DialogSet::default();
        let e = apply(&mut t, &mut set, T0, ASTERISK_IDLE_V0);
        assert_eq!(e.iter().map(line).collect::<Vec<_>>(), vec![(LineState::Idle, None)]);
        assert_eq!(e[0].id("lab"), format!("lab:agent:maria:{T0}"));
        let e = apply(&mut t, &mut set, T0 + 2 * S, ASTERISK_EARLY_NO_CID_V1);
        assert_eq!(
            e.iter().map(line).collect::<Vec<_>>(),
            vec![(LineState::Ringing, None)],
            "own extension is no caller"
        );
        let e = apply(&mut t, &mut set, T0 + 2 * S, ASTERISK_EARLY_CID_V2);
        assert_eq!(e.iter().map(line).collect::<Vec<_>>(), vec![(LineState::Ringing, Some("31955550003"))]);
        assert_eq!(e[0].time, T0 + 2 * S + 1, "same µs: the id must still be unique");
        let e = apply(&mut t, &mut set, T0 + 5 * S, ASTERISK_CONFIRMED_V3);
        assert_eq!(e.iter().map(line).collect::<Vec<_>>(), vec![(LineState::Busy, Some("31955550003"))]);
        let e = apply(&mut t, &mut set, T0 + 9 * S, ASTERISK_TERMINATED_V4);
        assert_eq!(e.iter().map(line).collect::<Vec<_>>(), vec![(LineState::Idle, None)]);
        assert!(apply(&mut t, &mut set, T0 + 10 * S, ASTERISK_TERMINATED_V4).is_empty(), "stale version");
        let json = e[0].to_cloudevent_json("lab");
        assert!(json.contains(r#""type":"agent.line""#) && json.contains(r#""state":"idle""#), "{json}");
    }

    #[test]
    fn asterisk_sequence_in_sip_only_mode_holds_the_offer_for_the_caller_id() {
        let mut t = tracker(Mode::SipOnly, S / 2);
        let mut set = DialogSet::default();
        assert_eq!(types(&apply(&mut t, &mut set, T0, ASTERISK_IDLE_V0)), ["agent.line"]);
        let e = apply(&mut t, &mut set, T0 + 2 * S, ASTERISK_EARLY_NO_CID_V1);
        assert_eq!(types(&e), ["agent.line"], "offer held for the identity");
        assert_eq!(t.next_deadline(), Some(T0 + 2 * S + S / 2));
        let e = apply(&mut t, &mut set, T0 + 2 * S + 300, ASTERISK_EARLY_CID_V2);
        assert_eq!(types(&e), ["agent.line", "call.started", "call.offered"]);
        let call = e[2].call.as_ref().unwrap();
        assert_eq!(call.caller, Party { number: Some("31955550003".into()), name: Some("Cliente 0003".into()) });
        assert_eq!(call.callee.number.as_deref(), Some("2000"));
        assert_eq!(call.direction, Direction::Inbound);
        assert_eq!(call.started_at, T0 + 2 * S, "started when the phone began to ring");
        assert!(call.id.as_str().starts_with("sip-") && call.id.as_str().len() == 20);
        assert_eq!(t.next_deadline(), None);
        let e = apply(&mut t, &mut set, T0 + 5 * S, ASTERISK_CONFIRMED_V3);
        assert_eq!(types(&e), ["agent.line", "call.answered"]);
        assert!(matches!(e[1].kind, EventKind::Answered { wait_seconds: 3, .. }));
        let e = apply(&mut t, &mut set, T0 + 9 * S, ASTERISK_TERMINATED_V4);
        assert_eq!(types(&e), ["agent.line", "call.ended"]);
        let ended = e[1].call.as_ref().unwrap();
        assert_eq!(ended.caller.number.as_deref(), Some("31955550003"), "the caller survives the bare states");
        assert!(matches!(
            e[1].kind,
            EventKind::Ended {
                duration_seconds: 7,
                talk_seconds: 4,
                wait_seconds: 3,
                hung_up_by: HungUpBy::System,
                ..
            }
        ));
        assert_eq!(e[1].seq, 4, "started, offered, answered, ended");
        assert_eq!(t.calls_in_progress(), 0);
    }

    #[test]
    fn a_held_offer_goes_out_without_identity_when_the_wait_is_over() {
        let mut t = tracker(Mode::SipOnly, S / 2);
        let mut set = DialogSet::default();
        apply(&mut t, &mut set, T0, ASTERISK_EARLY_NO_CID_V1);
        let mut out = Vec::new();
        t.poll(T0 + S / 4, &mut out);
        assert!(out.is_empty());
        t.poll(T0 + S / 2, &mut out);
        assert_eq!(types(&out), ["call.started", "call.offered"]);
        assert_eq!(out[0].call.as_ref().unwrap().caller.number, None);
        // The identity arriving later fills the snapshot of later events.
        let e = apply(&mut t, &mut set, T0 + S, ASTERISK_EARLY_CID_V2);
        assert_eq!(types(&e), ["agent.line"]);
        let e = apply(&mut t, &mut set, T0 + 3 * S, ASTERISK_TERMINATED_V4);
        assert_eq!(types(&e), ["agent.line", "call.offer_ended", "call.missed", "call.ended"]);
        assert_eq!(e[3].call.as_ref().unwrap().caller.number.as_deref(), Some("31955550003"));
        assert!(matches!(e[2].kind, EventKind::Missed { reason: MissedReason::NoAnswer, wait_seconds: 3 }));
        assert_eq!(e[1..].iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn successive_calls_on_one_dialog_id_get_distinct_deterministic_ids() {
        let run = || {
            let mut t = tracker(Mode::SipOnly, 0);
            let mut set = DialogSet::default();
            let mut all = Vec::new();
            all.extend(apply(&mut t, &mut set, T0, ASTERISK_EARLY_CID_V2));
            all.extend(apply(&mut t, &mut set, T0 + S, ASTERISK_TERMINATED_V4));
            set.reset_version();
            all.extend(apply(&mut t, &mut set, T0 + 60 * S, ASTERISK_EARLY_CID_V2));
            all.extend(apply(&mut t, &mut set, T0 + 61 * S, ASTERISK_CONFIRMED_V3));
            all.extend(apply(&mut t, &mut set, T0 + 70 * S, ASTERISK_TERMINATED_V4));
            all
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        let ids: std::collections::BTreeSet<_> =
            a.iter().filter_map(|e| e.call.as_ref()).map(|c| c.id.clone()).collect();
        assert_eq!(ids.len(), 2);
    }

    fn rfc_doc(version: u64, dialogs: &str) -> String {
        format!(
            r#"<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" version="{version}" state="partial" entity="sip:2000@pbx">{dialogs}</dialog-info>"#
        )
    }

    #[test]
    fn outbound_dialog_with_events_and_remote_bye() {
        let mut t = tracker(Mode::SipOnly, S);
        let mut set = DialogSet::default();
        let dialing = rfc_doc(
            1,
            r#"<dialog id="x1" call-id="abc@phone" direction="initiator"><state>trying</state>
               <remote><identity>sip:011987650001@pbx</identity></remote></dialog>"#,
        );
        let e = apply(&mut t, &mut set, T0, &dialing);
        assert_eq!(types(&e), ["agent.line", "call.started"], "no offer and no wait for outbound");
        assert_eq!(line(&e[0]), (LineState::Busy, Some("011987650001")));
        let c = e[1].call.as_ref().unwrap();
        assert_eq!(c.direction, Direction::Outbound);
        assert_eq!(c.caller.number.as_deref(), Some("2000"));
        assert_eq!(c.callee.number.as_deref(), Some("011987650001"));
        let e =
            apply(&mut t, &mut set, T0 + 4 * S, &rfc_doc(2, r#"<dialog id="x1"><state>confirmed</state></dialog>"#));
        assert_eq!(types(&e), ["call.answered"], "line stays busy with the same remote");
        let e = apply(
            &mut t,
            &mut set,
            T0 + 64 * S,
            &rfc_doc(3, r#"<dialog id="x1"><state event="remote-bye">terminated</state></dialog>"#),
        );
        assert_eq!(types(&e), ["agent.line", "call.ended"]);
        assert!(matches!(e[1].kind, EventKind::Ended { hung_up_by: HungUpBy::Customer, talk_seconds: 60, .. }));
    }

    #[test]
    fn unanswered_endings_by_state_event() {
        for (event, direction, want_missed, want_offer_end) in [
            ("cancelled", "recipient", MissedReason::Abandoned, Some(OfferEndReason::CallerHungUp)),
            ("rejected", "recipient", MissedReason::Busy, Some(OfferEndReason::Other)),
            ("replaced", "recipient", MissedReason::NoAnswer, Some(OfferEndReason::AnsweredElsewhere)),
            ("cancelled", "initiator", MissedReason::Cancelled, None),
            ("rejected", "initiator", MissedReason::Busy, None),
            ("error", "initiator", MissedReason::Failed, None),
            ("timeout", "initiator", MissedReason::NoAnswer, None),
        ] {
            let mut t = tracker(Mode::SipOnly, 0);
            let mut set = DialogSet::default();
            apply(
                &mut t,
                &mut set,
                T0,
                &rfc_doc(1, &format!(r#"<dialog id="d" direction="{direction}"><state>early</state></dialog>"#)),
            );
            let e = apply(
                &mut t,
                &mut set,
                T0 + S,
                &rfc_doc(2, &format!(r#"<dialog id="d"><state event="{event}">terminated</state></dialog>"#)),
            );
            let missed = e.iter().find_map(|e| match e.kind {
                EventKind::Missed { reason, .. } => Some(reason),
                _ => None,
            });
            let offer_end = e.iter().find_map(|e| match e.kind {
                EventKind::OfferEnded { reason, .. } => Some(reason),
                _ => None,
            });
            assert_eq!((missed, offer_end), (Some(want_missed), want_offer_end), "{event} {direction}");
        }
    }

    #[test]
    fn full_state_without_a_dialog_ends_it_and_line_only_mode_has_no_calls() {
        let mut t = tracker(Mode::SipOnly, 0);
        let mut set = DialogSet::default();
        let full = |v: u64, inner: &str| {
            format!(
                r#"<dialog-info xmlns="urn:ietf:params:xml:ns:dialog-info" version="{v}" state="full">{inner}</dialog-info>"#
            )
        };
        apply(&mut t, &mut set, T0, &full(1, r#"<dialog id="a"><state>confirmed</state></dialog>"#));
        let e = apply(&mut t, &mut set, T0 + S, "");
        assert_eq!(types(&e), ["agent.line", "call.ended"], "an empty body is idle");
        let mut l = tracker(Mode::LineOnly, 0);
        let mut set = DialogSet::default();
        let e = apply(&mut l, &mut set, T0, &full(1, r#"<dialog id="a"><state>confirmed</state></dialog>"#));
        assert_eq!(types(&e), ["agent.line"]);
        assert_eq!(l.calls_in_progress(), 0);
    }

    #[test]
    fn call_waiting_keeps_the_answered_call() {
        let mut t = tracker(Mode::SipOnly, 0);
        let mut set = DialogSet::default();
        apply(&mut t, &mut set, T0, ASTERISK_EARLY_CID_V2);
        apply(&mut t, &mut set, T0 + S, ASTERISK_CONFIRMED_V3);
        // Asterisk reports RINGING|INUSE as "early" on the same dialog id.
        let early_again = ASTERISK_EARLY_CID_V2.replace("version=\"2\"", "version=\"4\"");
        let e = apply(&mut t, &mut set, T0 + 2 * S, &early_again);
        assert_eq!(types(&e), ["agent.line"]);
        assert_eq!(line(&e[0]).0, LineState::Ringing);
        let e = apply(&mut t, &mut set, T0 + 3 * S, &ASTERISK_TERMINATED_V4.replace("version=\"4\"", "version=\"5\""));
        assert_eq!(types(&e), ["agent.line", "call.ended"]);
    }
}
