//! The stated rule behind each lifecycle event of a ladder, with the AMI
//! evidence (event, time, line) it rests on, and the swimlane of each
//! rung and event.

use super::{CallLadder, Cause, Rung};
use crate::directory::Directory;
use crate::event::{Direction, EndReason, EventKind, HungUpBy, Micros, OfferEndReason, TransferKind};
use crate::normalize::MissRule;

/// `HH:MM:SS.mmm` (UTC) of a PBX time.
pub fn clock_time(t: Micros) -> String {
    let secs = t.div_euclid(1_000_000);
    let ms = t.rem_euclid(1_000_000) / 1_000;
    let day = secs.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}.{ms:03}", day / 3600, day % 3600 / 60, day % 60)
}

/// A rung's evidence in one phrase: `QueueCallerAbandon at 19:04:11.105 (line 1500)`.
pub fn cite(r: &Rung) -> String {
    match &r.cause {
        Cause::Frame { event, .. } => format!("{event} at {} (line {})", clock_time(r.time), r.line),
        Cause::Resync { listed, recorded: true, .. } => format!(
            "the resync at {} (recorded listing ending at line {}): the PBX listed {listed} channel(s), none of this call's",
            clock_time(r.time),
            r.line
        ),
        Cause::Resync { booted, .. } => {
            let boot = match booted {
                Some((line, uptime)) => format!("FullyBooted with Uptime {uptime} s at line {line}"),
                None => "a new banner".to_string(),
            };
            format!(
                "the resync at {} (line {}): the PBX restarted ({boot}), so no channel survived",
                clock_time(r.time),
                r.line
            )
        }
        Cause::LiveBound { max } => {
            format!("more than --max-live-calls ({max}) calls live at {}: the call silent the longest ended", clock_time(r.time))
        }
    }
}

/// A frame rung cited with one of its headers: `DialEnd at … (line …): DialStatus=BUSY`.
fn cite_with(r: &Rung, key: &str) -> String {
    match r.cause.detail(key) {
        Some(v) => format!("{}: {key}={v}", cite(r)),
        None => cite(r),
    }
}

fn is_event(r: &Rung, name: &str) -> bool {
    matches!(&r.cause, Cause::Frame { event, .. } if event == name)
}

fn is_var(r: &Rung, var: &str) -> bool {
    is_event(r, "VarSet") && r.cause.detail("Variable") == Some(var)
}

fn last(rungs: &[Rung], pred: impl Fn(&Rung) -> bool) -> Option<&Rung> {
    rungs.iter().rev().find(|r| pred(r))
}

/// Who is who in one call, for placing its items in lanes.
struct Parties<'a> {
    dir: &'a Directory,
    /// The call's first channel.
    origin: String,
    /// Its lane: `caller` inbound, the calling agent outbound.
    origin_lane: String,
    /// The lane of channels nobody can name: the caller's side inbound,
    /// the customer outbound.
    other_lane: &'static str,
    queued: bool,
}

impl Parties<'_> {
    fn agent_of(&self, channel: &str) -> Option<String> {
        self.dir.agent_for_channel(channel).map(|a| a.id.to_string())
    }

    fn lane_of_channel(&self, channel: &str) -> String {
        if channel == self.origin {
            self.origin_lane.clone()
        } else {
            self.agent_of(channel).unwrap_or_else(|| self.other_lane.to_string())
        }
    }

    /// The lane of a rung: the queue's events, the agent a queue or dial
    /// event is about, else the party of its channel.
    fn rung_lane(&self, rung: &Rung) -> String {
        let Cause::Frame { event, channel, .. } = &rung.cause else { return "pbx".to_string() };
        match event.as_str() {
            "QueueCallerJoin" | "QueueCallerLeave" | "QueueCallerAbandon" => "queue".to_string(),
            "VarSet" if rung.cause.detail("Variable") == Some("QUEUESTATUS") => "queue".to_string(),
            "AgentCalled" | "AgentRingNoAnswer" | "AgentConnect" | "AgentDump" => self
                .dir
                .agent_for_member(rung.cause.detail("Interface"), None, rung.cause.detail("MemberName"))
                .map(|a| a.id.to_string())
                .or_else(|| rung.cause.detail("DestChannel").and_then(|d| self.agent_of(d)))
                .unwrap_or_else(|| "queue".to_string()),
            "DialBegin" | "DialEnd" => match rung.cause.detail("DestChannel") {
                Some(dest) if dest != self.origin => self.lane_of_channel(dest),
                _ => self.lane_of_channel(channel),
            },
            _ => self.lane_of_channel(channel),
        }
    }

    /// The lane of a lifecycle event.
    fn product_lane(&self, kind: &EventKind, rung_lane: &str) -> String {
        match kind {
            EventKind::Started {} | EventKind::Ended { .. } | EventKind::Stuck { .. } => self.origin_lane.clone(),
            EventKind::Queued { .. } => "queue".to_string(),
            EventKind::Missed { .. } if self.queued => "queue".to_string(),
            EventKind::Missed { .. } => self.origin_lane.clone(),
            EventKind::Offered { agent, .. } | EventKind::OfferEnded { agent, .. } => agent.to_string(),
            EventKind::Answered { agent: Some(a), .. } => a.to_string(),
            EventKind::Transferred { to_agent: Some(a), .. } => a.to_string(),
            _ => rung_lane.to_string(),
        }
    }
}

/// Fills in the lanes and every product's rule.
pub fn decide(ladder: &mut CallLadder, dir: &Directory) {
    let direction = ladder.snapshot.as_ref().map_or(Direction::Inbound, |s| s.direction);
    let group = ladder.snapshot.as_ref().and_then(|s| s.group.as_ref()).map(|g| g.to_string());
    let origin = ladder
        .rungs
        .iter()
        .find(|r| r.products.iter().any(|p| matches!(p.event.kind, EventKind::Started {})))
        .or(ladder.rungs.first())
        .map(|r| r.cause.channel().to_string())
        .unwrap_or_default();
    let origin_lane = match direction {
        Direction::Inbound => None,
        _ => dir.agent_for_channel(&origin).map(|a| a.id.to_string()),
    };
    let parties = Parties {
        dir,
        origin,
        origin_lane: origin_lane.unwrap_or_else(|| "caller".to_string()),
        other_lane: if direction == Direction::Inbound { "caller" } else { "customer" },
        queued: ladder.snapshot.as_ref().is_some_and(|s| s.queue.is_some()),
    };
    let mut lanes: Vec<String> = vec![parties.origin_lane.clone()];
    for i in 0..ladder.rungs.len() {
        let (Some(rung), Some(earlier)) = (ladder.rungs.get(i), ladder.rungs.get(..=i)) else { continue };
        let lane = parties.rung_lane(rung);
        let decided: Vec<(String, String)> = rung
            .products
            .iter()
            .map(|p| {
                let text = product_rule(rung, earlier, p, &parties.origin, group.as_deref(), direction);
                (parties.product_lane(&p.event.kind, &lane), text)
            })
            .collect();
        for l in std::iter::once(&lane).chain(decided.iter().map(|(l, _)| l)) {
            if !lanes.contains(l) {
                lanes.push(l.clone());
            }
        }
        if let Some(rung) = ladder.rungs.get_mut(i) {
            rung.lane = lane;
            for (p, (l, t)) in rung.products.iter_mut().zip(decided) {
                p.lane = l;
                p.rule = t;
            }
        }
    }
    // Caller, queue, agents, customer, PBX.
    let rank = |l: &str| match l {
        x if x == parties.origin_lane => 0,
        "queue" => 1,
        "customer" | "caller" => 3,
        "pbx" => 4,
        _ => 2,
    };
    lanes.sort_by_key(|l| rank(l.as_str()));
    ladder.lanes = lanes;
}

/// A frame's evidence with the headers that say most about it.
fn cite_frame(r: &Rung) -> String {
    let Cause::Frame { event, channel, details } = &r.cause else { return cite(r) };
    let mut s = format!("{event} at {} (line {})", clock_time(r.time), r.line);
    if !channel.is_empty() {
        s.push_str(&format!(" on {channel}"));
    }
    let shown: Vec<String> = details
        .iter()
        .filter(|(k, _)| {
            matches!(
                k.as_str(),
                "DestChannel"
                    | "MemberName"
                    | "Queue"
                    | "DialStatus"
                    | "Value"
                    | "Variable"
                    | "Extension"
                    | "TransferTargetChannel"
                    | "Response"
                    | "Reason"
                    | "Cause"
                    | "Cause-txt"
            )
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !shown.is_empty() {
        s.push_str(&format!(" ({})", shown.join(", ")));
    }
    s
}

fn product_rule(
    rung: &Rung,
    earlier: &[Rung],
    p: &super::Product,
    origin: &str,
    group: Option<&str>,
    direction: Direction,
) -> String {
    let why = cite_frame(rung);
    match &p.event.kind {
        EventKind::Started {} => match &rung.cause {
            Cause::Frame { .. } => format!("first channel of the call seen: {why}"),
            _ => format!("adopted from the PBX's channel listing: {}", cite(rung)),
        },
        EventKind::Queued { group, queue, .. } => match group {
            Some(g) => format!("queue {queue} serves group {g}: {why}"),
            None => format!("queue {queue} serves no configured group: {why}"),
        },
        EventKind::Offered { agent, extension } => format!("{agent}'s phone ({extension}) rings: {why}"),
        EventKind::OfferEnded { agent, reason } => {
            let r = match reason {
                OfferEndReason::NoAnswer => "no_answer — rang unanswered",
                OfferEndReason::AnsweredElsewhere => "answered_elsewhere — the call was answered by somebody else",
                OfferEndReason::CallerHungUp => "caller_hung_up — the caller hung up while it rang",
                OfferEndReason::Other => {
                    "other — the ringing stopped otherwise (agent hung up while connected, channel gone)"
                }
            };
            format!("{agent}: {r}: {why}")
        }
        EventKind::Answered { agent, wait_seconds } => {
            let who = agent.as_ref().map_or("somebody the directory cannot name".to_string(), |a| a.to_string());
            let how = if direction == Direction::Inbound { "" } else { " (the customer picked up)" };
            format!("answered by {who}{how} after {wait_seconds} s — {why}")
        }
        EventKind::Transferred { from_agent, to_agent, to_extension, kind } => {
            let kind = match kind {
                TransferKind::Blind => "blind",
                TransferKind::Attended => "attended",
            };
            let from = from_agent.as_ref().map_or("?".to_string(), |a| a.to_string());
            let to = to_agent
                .as_ref()
                .map(|a| a.to_string())
                .or_else(|| to_extension.clone())
                .unwrap_or_else(|| "?".to_string());
            format!("{kind} transfer from {from} to {to} — {why}")
        }
        EventKind::Stuck { detected_by, .. } => format!("the stuck-call sweeper ({detected_by})"),
        EventKind::Missed { reason, .. } => match p.miss_rule {
            Some(rule) => format!(
                "missed: {} — {}; evidence: {}{}",
                reason.as_str(),
                rule.describe(),
                miss_evidence(rule, rung, earlier, origin, group),
                if p.presence.is_empty() {
                    String::new()
                } else {
                    format!("; the group's agents then: {}", p.presence.join("; "))
                }
            ),
            None => format!("missed: {} — no rule recorded; ended by {}", reason.as_str(), cite(rung)),
        },
        EventKind::Ended { end_reason, hung_up_by, .. } => end_rule(*end_reason, *hung_up_by, rung),
        EventKind::AgentAvailability { .. } | EventKind::AgentLine { .. } => why,
    }
}

/// The AMI evidence of a missed rule, found in the call's ladder up to the
/// rung that ended it.
fn miss_evidence(rule: MissRule, end: &Rung, rungs: &[Rung], origin: &str, group: Option<&str>) -> String {
    let on_origin = |r: &Rung| r.cause.channel() == origin;
    let found = match rule {
        MissRule::QueueTimeout => {
            let status = last(rungs, |r| is_var(r, "QUEUESTATUS")).map(cite);
            let abandon = last(rungs, |r| is_event(r, "QueueCallerAbandon")).map(cite);
            match (abandon, status) {
                (Some(a), Some(s)) => Some(format!("{a} then QUEUESTATUS=TIMEOUT: {s}")),
                (None, Some(s)) => Some(format!("QUEUESTATUS=TIMEOUT: {s}")),
                (a, None) => a,
            }
        }
        MissRule::QueueAbandoned => last(rungs, |r| is_event(r, "QueueCallerAbandon")).map(|r| {
            let queue = r.cause.detail("Queue").unwrap_or("?");
            let held = r.cause.detail("HoldTime").map_or(String::new(), |h| format!(" after {h} s"));
            format!("{} in queue {queue}{held}", cite(r))
        }),
        MissRule::QueueEmpty => last(rungs, |r| is_var(r, "QUEUESTATUS"))
            .map(|r| format!("QUEUESTATUS={}: {}", r.cause.detail("Value").unwrap_or("?"), cite(r))),
        MissRule::NobodyAvailable => {
            let arrival = last(rungs, |r| is_event(r, "QueueCallerJoin")).map(cite).or_else(|| {
                last(rungs, |r| is_var(r, "QUEUESTATUS"))
                    .map(|r| format!("QUEUESTATUS={}: {}", r.cause.detail("Value").unwrap_or("?"), cite(r)))
            });
            arrival.map(|a| format!("nobody of group {} available on arrival: {a}", group.unwrap_or("?")))
        }
        MissRule::Routed(_) => last(rungs, |r| is_var(r, "CALLBRIDGE_REASON"))
            .map(|r| format!("CALLBRIDGE_REASON={}: {}", r.cause.detail("Value").unwrap_or("?"), cite(r))),
        MissRule::Closed(_) => last(rungs, |r| is_event(r, "QueueCallerJoin"))
            .or(rungs.first())
            .map(|r| format!("group {} closed when the call arrived: {}", group.unwrap_or("?"), cite(r))),
        MissRule::DialNoAnswer | MissRule::DialBusy | MissRule::DialCancelled | MissRule::DialFailed => {
            last(rungs, |r| is_event(r, "DialEnd") && on_origin(r)).map(|r| cite_with(r, "DialStatus"))
        }
        MissRule::OriginateFailed => last(rungs, |r| is_event(r, "OriginateResponse"))
            .map(|r| cite_with(r, "Reason"))
            .or_else(|| last(rungs, |r| is_event(r, "DialEnd")).map(|r| cite_with(r, "DialStatus"))),
        MissRule::AgentNoAnswer => {
            last(rungs, |r| is_event(r, "DialEnd") && r.cause.detail("DestChannel") == Some(origin))
                .map(|r| cite_with(r, "DialStatus"))
                .or_else(|| {
                    last(rungs, |r| is_event(r, "Newstate") && on_origin(r)).map(|r| cite_with(r, "ChannelStateDesc"))
                })
        }
        MissRule::CallerHungUp | MissRule::NothingDialled | MissRule::Blocked => {
            last(rungs, |r| (is_event(r, "Hangup") || is_event(r, "HangupRequest")) && on_origin(r))
                .map(|r| format!("{} of {origin}", cite(r)))
        }
        MissRule::Lost => None,
    };
    found.unwrap_or_else(|| cite(end))
}

fn end_rule(reason: EndReason, hung_up_by: HungUpBy, rung: &Rung) -> String {
    let by = match hung_up_by {
        HungUpBy::Caller => "the caller",
        HungUpBy::Agent => "the agent",
        HungUpBy::Customer => "the customer",
        HungUpBy::System => "the system",
    };
    match (reason, &rung.cause) {
        (EndReason::Normal, Cause::Frame { event, channel, .. }) if event == "Hangup" => {
            let cause = match (rung.cause.detail("Cause"), rung.cause.detail("Cause-txt")) {
                (Some(c), Some(t)) => format!(", cause {c} ({t})"),
                (Some(c), None) => format!(", cause {c}"),
                _ => String::new(),
            };
            format!("ended: normal — the call's last channel hung up: {} of {channel}{cause}; hung up by {by}", cite(rung))
        }
        (EndReason::Normal, Cause::Frame { event, .. }) if event == "OriginateResponse" => format!(
            "ended: normal — the click-to-call failed before any of its channels existed: {}",
            cite_frame(rung)
        ),
        (EndReason::Normal, Cause::Frame { .. }) => format!(
            "ended: normal — its last channel moved to another call (Asterisk propagated another Linkedid on bridging): {}",
            cite_frame(rung)
        ),
        (EndReason::Normal, _) => format!("ended: normal — {}", cite(rung)),
        (EndReason::Lost, _) => format!("ended: lost — the PBX no longer has the call: {}", cite(rung)),
        (EndReason::Removed, _) => {
            format!("ended: removed — an administrator removed the call through the API ({})", cite(rung))
        }
    }
}

/// A `call.missed` with no verdict read before it: only a click-to-call
/// that failed before any channel existed (the call is made up from its
/// `OriginateResponse`) ends on the frame that starts it.
pub fn implied_miss_rule(cause: &Cause) -> Option<MissRule> {
    (cause.name() == "OriginateResponse").then_some(MissRule::OriginateFailed)
}
