//! The ladder as text: per call, each AMI frame that touched it (time,
//! line, lane, event, channel, key headers), the lifecycle events it
//! produced, and why.

use super::rule::clock_time;
use super::{CallLadder, Cause, Explanation};
use crate::event::{format_time, EventKind};
use std::fmt::Write;

/// The whole explanation as text.
pub fn render_text(x: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "trace {}: {} call(s), {} frame(s); times are UTC", x.trace.display(), x.calls.len(), x.frames);
    for line in &x.malformed {
        let _ = writeln!(s, "warning: {}:{line}: malformed frame skipped (as replay skips it)", x.trace.display());
    }
    for call in &x.calls {
        s.push('\n');
        render_call(&mut s, call);
    }
    s
}

/// A lifecycle event's own data in one line.
pub fn summary(kind: &EventKind) -> String {
    let opt = |o: Option<&str>| o.unwrap_or("-").to_string();
    match kind {
        EventKind::Started {} => String::new(),
        EventKind::Queued { group, queue, position } => format!(
            "group={} queue={queue} position={}",
            opt(group.as_ref().map(|g| g.as_str())),
            position.map_or("-".to_string(), |p| p.to_string())
        ),
        EventKind::Offered { agent, extension } => format!("agent={agent} extension={extension}"),
        EventKind::OfferEnded { agent, reason } => format!("agent={agent} reason={}", name(reason)),
        EventKind::Answered { agent, wait_seconds } => {
            format!("agent={} wait_seconds={wait_seconds}", opt(agent.as_ref().map(|a| a.as_str())))
        }
        EventKind::Transferred { from_agent, to_agent, to_extension, kind } => format!(
            "from_agent={} to_agent={} to_extension={} kind={}",
            opt(from_agent.as_ref().map(|a| a.as_str())),
            opt(to_agent.as_ref().map(|a| a.as_str())),
            opt(to_extension.as_deref()),
            name(kind)
        ),
        EventKind::Missed { reason, wait_seconds } => format!("reason={} wait_seconds={wait_seconds}", reason.as_str()),
        EventKind::Stuck { state, silent_seconds, detected_by } => {
            format!("state={} silent_seconds={silent_seconds} detected_by={detected_by}", state.as_str())
        }
        EventKind::Ended {
            duration_seconds, talk_seconds, wait_seconds, hangup_cause, hung_up_by, end_reason, ..
        } => {
            format!(
                "end_reason={} hung_up_by={} duration_seconds={duration_seconds} talk_seconds={talk_seconds} \
                 wait_seconds={wait_seconds} hangup_cause={}",
                name(end_reason),
                name(hung_up_by),
                hangup_cause.map_or("-".to_string(), |c| c.to_string())
            )
        }
        EventKind::AgentAvailability { agent, available, .. } => format!("agent={agent} available={available}"),
        EventKind::AgentLine { agent, state, .. } => format!("agent={agent} state={}", name(state)),
    }
}

/// The snake_case name serde gives a unit variant.
pub fn name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|j| j.as_str().map(str::to_string)).unwrap_or_default()
}

/// Whether a lifecycle event is an outcome whose rule is printed (the
/// others follow from the frame above them).
pub fn is_outcome(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::OfferEnded { .. }
            | EventKind::Answered { .. }
            | EventKind::Transferred { .. }
            | EventKind::Missed { .. }
            | EventKind::Stuck { .. }
            | EventKind::Ended { .. }
    )
}

/// One line about the call: direction, parties, group, start.
pub fn headline(call: &CallLadder) -> String {
    match &call.snapshot {
        Some(snap) => format!(
            "call {} — {}, {} → {}, group {}, agent {}, started {}",
            call.id,
            name(&snap.direction),
            snap.caller.number.as_deref().unwrap_or("?"),
            snap.callee.number.as_deref().unwrap_or("?"),
            snap.group.as_ref().map_or("-", |g| g.as_str()),
            snap.agent.as_ref().map_or("-", |a| a.as_str()),
            format_time(snap.started_at)
        ),
        None => format!("call {}", call.id),
    }
}

fn render_call(s: &mut String, call: &CallLadder) {
    let _ = writeln!(s, "{}", headline(call));
    let _ = writeln!(s, "  lanes: {}", call.lanes.join(" | "));
    for rung in &call.rungs {
        let line = if rung.line == 0 { "-".to_string() } else { rung.line.to_string() };
        let what = match &rung.cause {
            Cause::Frame { event, channel, details } => {
                let mut w = format!("{event:<19} {channel}");
                for (k, v) in details {
                    let _ = write!(w, " {k}={v}");
                }
                w
            }
            Cause::Resync { listed, recorded, .. } => {
                format!(
                    "{:<19} {listed} channel(s) listed{}",
                    "(resync)",
                    if *recorded { "" } else { " (PBX restarted)" }
                )
            }
            Cause::LiveBound { max } => format!("{:<19} --max-live-calls {max}", "(bound)"),
        };
        let _ = writeln!(s, "  {}  L{line:<6} {:<9} {what}", clock_time(rung.time), rung.lane);
        for p in &rung.products {
            let data = summary(&p.event.kind);
            let _ = writeln!(
                s,
                "      => #{} {} {}{}[{}]",
                p.event.seq,
                p.event.kind.type_name(),
                data,
                if data.is_empty() { "" } else { " " },
                p.lane
            );
            if is_outcome(&p.event.kind) {
                let _ = writeln!(s, "         why: {}", p.rule);
            }
        }
    }
    let answered = call.products().find(|(_, p)| matches!(p.event.kind, EventKind::Answered { .. }));
    let missed = call.products().find(|(_, p)| matches!(p.event.kind, EventKind::Missed { .. }));
    let ended = call.products().find(|(_, p)| matches!(p.event.kind, EventKind::Ended { .. }));
    match (answered, missed) {
        (_, Some((_, p))) | (Some((_, p)), None) => {
            let _ = writeln!(s, "  outcome: {}", p.rule);
        }
        (None, None) => {
            let _ = writeln!(s, "  outcome: not answered yet");
        }
    }
    match ended {
        Some((_, p)) => {
            let _ = writeln!(s, "  end: {}", p.rule);
        }
        None => {
            let _ = writeln!(s, "  end: still live at the end of the trace");
        }
    }
}
