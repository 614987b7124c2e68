//! Typed input: the AMI events the normalizer knows, parsed once per frame
//! from its `Event` header.
//!
//! Parsing is a `match` on the name (no allocation, no map); anything not
//! listed is [`AmiEvent::Other`] and ignored. Which handler each event goes
//! to is decided in one place, `Normalizer::handle` (mod.rs).

/// An AMI event name the normalizer reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmiEvent {
    Newchannel,
    Newstate,
    Newexten,
    Rename,
    VarSet,
    QueueCallerJoin,
    QueueCallerLeave,
    QueueCallerAbandon,
    AgentCalled,
    AgentRingNoAnswer,
    AgentConnect,
    AgentDump,
    DialBegin,
    DialEnd,
    BridgeEnter,
    HangupRequest,
    SoftHangupRequest,
    Hangup,
    BlindTransfer,
    AttendedTransfer,
    QueueMemberPause,
    QueueMemberStatus,
    QueueMember,
    /// Asterisk before 13's spelling of `QueueMemberPause`.
    QueueMemberPaused,
    OriginateResponse,
    /// Every other event (RTCP, DTMF, CDRs, …): no effect on the lifecycle.
    Other,
}

impl AmiEvent {
    /// The event named `name` (exact, as Asterisk spells it).
    #[inline]
    pub fn parse(name: &str) -> AmiEvent {
        match name {
            "Newchannel" => AmiEvent::Newchannel,
            "Newstate" => AmiEvent::Newstate,
            "Newexten" => AmiEvent::Newexten,
            "Rename" => AmiEvent::Rename,
            "VarSet" => AmiEvent::VarSet,
            "QueueCallerJoin" => AmiEvent::QueueCallerJoin,
            "QueueCallerLeave" => AmiEvent::QueueCallerLeave,
            "QueueCallerAbandon" => AmiEvent::QueueCallerAbandon,
            "AgentCalled" => AmiEvent::AgentCalled,
            "AgentRingNoAnswer" => AmiEvent::AgentRingNoAnswer,
            "AgentConnect" => AmiEvent::AgentConnect,
            "AgentDump" => AmiEvent::AgentDump,
            "DialBegin" => AmiEvent::DialBegin,
            "DialEnd" => AmiEvent::DialEnd,
            "BridgeEnter" => AmiEvent::BridgeEnter,
            "HangupRequest" => AmiEvent::HangupRequest,
            "SoftHangupRequest" => AmiEvent::SoftHangupRequest,
            "Hangup" => AmiEvent::Hangup,
            "BlindTransfer" => AmiEvent::BlindTransfer,
            "AttendedTransfer" => AmiEvent::AttendedTransfer,
            "QueueMemberPause" => AmiEvent::QueueMemberPause,
            "QueueMemberStatus" => AmiEvent::QueueMemberStatus,
            "QueueMember" => AmiEvent::QueueMember,
            "QueueMemberPaused" => AmiEvent::QueueMemberPaused,
            "OriginateResponse" => AmiEvent::OriginateResponse,
            _ => AmiEvent::Other,
        }
    }

    /// Whether this event may introduce a call we do not know yet (a trace
    /// that starts mid-call, a call already up when callbridge started).
    /// Events that only end things never create a call.
    pub fn may_start_call(self) -> bool {
        !matches!(
            self,
            AmiEvent::Hangup
                | AmiEvent::HangupRequest
                | AmiEvent::SoftHangupRequest
                | AmiEvent::DialEnd
                | AmiEvent::QueueCallerLeave
                | AmiEvent::QueueCallerAbandon
        )
    }

    /// Whether an originated call may still hold back `call.started` at
    /// this event: the events around a channel's creation, before the
    /// ticket variable is known.
    pub fn keeps_start_deferred(self) -> bool {
        matches!(self, AmiEvent::Newchannel | AmiEvent::VarSet | AmiEvent::Newexten | AmiEvent::Rename)
    }
}

#[cfg(test)]
mod tests {
    use super::AmiEvent;

    #[test]
    fn names_parse_exactly() {
        assert_eq!(AmiEvent::parse("Hangup"), AmiEvent::Hangup);
        assert_eq!(AmiEvent::parse("QueueMemberPaused"), AmiEvent::QueueMemberPaused);
        assert_eq!(AmiEvent::parse("hangup"), AmiEvent::Other);
        assert_eq!(AmiEvent::parse("RTCPSent"), AmiEvent::Other);
        assert_eq!(AmiEvent::parse(""), AmiEvent::Other);
    }
}
