//! Which piece of a call's evidence decided its missed reason.
//!
//! `Call::miss_rule` weighs the evidence when an unanswered call ends and
//! names the rule that won; the `MissedReason` in `call.missed` is that
//! rule's [`MissRule::reason`]. Nothing is recorded along the way: the
//! rule is computed from the evidence the call keeps anyway, once, when it
//! ends (and on demand, through [`super::Normalizer::miss_rule`], for
//! `callbridge explain`).

use crate::event::MissedReason;

/// The rule that decided a missed call's reason (SPEC §4 precedence:
/// `blocked` > `holiday` > `outside_hours` > `no_agents` > what the queue
/// or the dial said).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissRule {
    /// The helpdesk refused the caller (a blocked caller id) and callbridge
    /// hung the call up.
    Blocked,
    /// The group's calendar (`Holiday` or `OutsideHours`) when the call
    /// arrived.
    Closed(MissedReason),
    /// The FastAGI router sent the call to "missed" (`CALLBRIDGE_REASON`).
    Routed(MissedReason),
    /// Nobody of the group was available when the call arrived in it.
    NobodyAvailable,
    /// The queue refused or dropped the caller for lack of members
    /// (`QUEUESTATUS` `JOINEMPTY`, `LEAVEEMPTY`, `JOINUNAVAIL`,
    /// `LEAVEUNAVAIL`, `FULL`).
    QueueEmpty,
    /// `QUEUESTATUS=TIMEOUT` (after the `QueueCallerAbandon` Asterisk also
    /// sends on a timeout).
    QueueTimeout,
    /// `QueueCallerAbandon` and no timeout after it: the caller hung up
    /// while queued.
    QueueAbandoned,
    /// The call's dial ended `NOANSWER`.
    DialNoAnswer,
    /// The call's dial ended `BUSY`.
    DialBusy,
    /// Outbound: the dial ended `CANCEL` (the agent gave up).
    DialCancelled,
    /// Outbound: the dial ended otherwise (`CHANUNAVAIL`, `CONGESTION`…).
    DialFailed,
    /// Inbound, no queue verdict and no dial result: the caller hung up
    /// before anybody answered.
    CallerHungUp,
    /// Outbound, no dial result: the agent hung up before anything was
    /// dialled.
    NothingDialled,
    /// The PBX lost the call (gone at a resync, stuck, past the bound on
    /// live calls) before any queue verdict or dial result.
    Lost,
    /// Click-to-call: the PBX could not ring the agent's phone.
    OriginateFailed,
    /// Click-to-call: the agent's phone rang and nobody answered it; the
    /// customer was not dialled.
    AgentNoAnswer,
}

impl MissRule {
    /// The missed reason this rule gives.
    pub fn reason(self) -> MissedReason {
        match self {
            MissRule::Blocked => MissedReason::Blocked,
            MissRule::Closed(r) | MissRule::Routed(r) => r,
            MissRule::NobodyAvailable | MissRule::QueueEmpty => MissedReason::NoAgents,
            MissRule::QueueTimeout => MissedReason::QueueTimeout,
            MissRule::QueueAbandoned | MissRule::CallerHungUp => MissedReason::Abandoned,
            MissRule::DialNoAnswer => MissedReason::NoAnswer,
            MissRule::DialBusy => MissedReason::Busy,
            MissRule::DialCancelled | MissRule::NothingDialled => MissedReason::Cancelled,
            MissRule::DialFailed | MissRule::OriginateFailed => MissedReason::Failed,
            MissRule::Lost => MissedReason::Lost,
            MissRule::AgentNoAnswer => MissedReason::AgentNoAnswer,
        }
    }

    /// The rule in words (what `callbridge explain` prints with the AMI
    /// evidence).
    pub fn describe(self) -> &'static str {
        match self {
            MissRule::Blocked => "the helpdesk refused the caller (blocked caller id) and callbridge hung up",
            MissRule::Closed(MissedReason::Holiday) => {
                "the group's holiday calendar: no service on the day the call arrived"
            }
            MissRule::Closed(_) => "the group's business hours: closed when the call arrived",
            MissRule::Routed(_) => "the FastAGI router sent the call to missed (CALLBRIDGE_REASON)",
            MissRule::NobodyAvailable => {
                "nobody of the group was available (paused, device unavailable or switched off) when the call arrived"
            }
            MissRule::QueueEmpty => {
                "the queue refused or dropped the caller for lack of available members (QUEUESTATUS)"
            }
            MissRule::QueueTimeout => "the queue timed the caller out: QueueCallerAbandon then QUEUESTATUS=TIMEOUT",
            MissRule::QueueAbandoned => {
                "caller hung up while queued, no timeout: QueueCallerAbandon, no QUEUESTATUS=TIMEOUT after it"
            }
            MissRule::DialNoAnswer => "the dialled party did not answer (DialStatus=NOANSWER)",
            MissRule::DialBusy => "the dialled party was busy (DialStatus=BUSY)",
            MissRule::DialCancelled => "the agent hung up while the customer's phone rang (DialStatus=CANCEL)",
            MissRule::DialFailed => "the dial failed (DialStatus CHANUNAVAIL, CONGESTION or similar)",
            MissRule::CallerHungUp => {
                "caller hung up before anybody answered, with no queue verdict and no dial result"
            }
            MissRule::NothingDialled => "the agent hung up before any dial result",
            MissRule::Lost => {
                "the PBX lost the call (crash, cut) before any queue verdict or dial result: nobody hung up"
            }
            MissRule::OriginateFailed => "click-to-call: the PBX could not ring the agent's phone",
            MissRule::AgentNoAnswer => "click-to-call: the agent's phone rang unanswered; the customer was not dialled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every missed reason some rule gives has a stated rule, and every
    /// rule names it.
    #[test]
    fn every_missed_reason_has_a_rule() {
        let rules = [
            MissRule::Blocked,
            MissRule::Closed(MissedReason::Holiday),
            MissRule::Closed(MissedReason::OutsideHours),
            MissRule::Routed(MissedReason::NoAgents),
            MissRule::NobodyAvailable,
            MissRule::QueueEmpty,
            MissRule::QueueTimeout,
            MissRule::QueueAbandoned,
            MissRule::DialNoAnswer,
            MissRule::DialBusy,
            MissRule::DialCancelled,
            MissRule::DialFailed,
            MissRule::CallerHungUp,
            MissRule::NothingDialled,
            MissRule::Lost,
            MissRule::OriginateFailed,
            MissRule::AgentNoAnswer,
        ];
        for reason in MissedReason::ALL {
            assert!(rules.iter().any(|r| r.reason() == reason), "no rule gives {}", reason.as_str());
        }
        for r in rules {
            assert!(!r.describe().is_empty());
        }
    }
}
