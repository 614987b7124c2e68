//! The helpdesk drives the PBX: click-to-call, transfer, agent availability,
//! and hanging up a caller the helpdesk refused (Zammad's `reject`).
//!
//! This module holds the pure part — validating a request against the
//! directory and the live calls, normalising the number, and deciding the
//! exact AMI action (name and headers) to send. Sending it and answering the
//! HTTP request is the API's job (for a refused caller, the Zammad sink's,
//! through `app`); the resulting call lifecycle comes back through the
//! normal pipeline (the PBX's events), never from here.

use crate::config::Config;
use crate::directory::Directory;
use crate::event::{CallSnapshot, CallState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How outbound numbers are dialled (`[outbound]`).
#[derive(Debug, Clone)]
pub struct OutboundRules {
    /// Dialplan context of the customer leg.
    pub context: String,
    /// Prefix the dialplan expects before an external number (e.g. "0").
    pub prefix: String,
    /// The agent's device, `{extension}` replaced (e.g. `PJSIP/{extension}`).
    pub agent_channel: String,
    /// Country code of the PBX: `+55 11 …` becomes a national number.
    pub country_code: Option<String>,
    /// Prefix for international numbers (`+44 …` → `0044…`).
    pub international_prefix: String,
    /// How long the agent's phone rings before the originate fails.
    pub agent_ring_seconds: u64,
    /// Channel variable carrying the ticket id.
    pub ticket_variable: String,
    /// Dialplan context a transfer target's extension is dialled in.
    pub transfer_context: String,
}

impl OutboundRules {
    /// The rules of `[outbound]` (and `[pbx] ticket_variable`).
    pub fn from_config(c: &Config) -> OutboundRules {
        let o = &c.outbound;
        let context = o.context.clone().unwrap_or_else(|| "from-internal".into());
        OutboundRules {
            transfer_context: o.transfer_context.clone().unwrap_or_else(|| context.clone()),
            context,
            prefix: o.prefix.clone(),
            agent_channel: o.agent_channel.clone(),
            country_code: o.country_code.clone(),
            international_prefix: o.international_prefix.clone(),
            agent_ring_seconds: o.agent_ring_seconds,
            ticket_variable: c.pbx.ticket_variable.clone(),
        }
    }

    /// The agent's device as `Originate` and `QueuePause` name it.
    pub fn agent_device(&self, extension: &str) -> String {
        self.agent_channel.replace("{extension}", extension)
    }
}

/// A new call id for a click-to-call: `cb-<unix µs>-<n>`. It is given to
/// `Originate` as `ChannelId`, so Asterisk uses it as the Uniqueid of the
/// agent's channel and thereby as the call's Linkedid: the call id is
/// known before the PBX sends a single event.
pub fn new_call_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    format!("cb-{micros}-{}", N.fetch_add(1, Ordering::Relaxed))
}

impl Default for OutboundRules {
    fn default() -> Self {
        OutboundRules {
            context: "from-internal".into(),
            prefix: String::new(),
            agent_channel: "PJSIP/{extension}".into(),
            country_code: None,
            international_prefix: "00".into(),
            agent_ring_seconds: 30,
            ticket_variable: "CALLBRIDGE_TICKET".into(),
            transfer_context: "from-internal".into(),
        }
    }
}

/// Why a control request is refused; `code` is stable API, `status` the HTTP
/// status the API answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

fn refuse(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { status, code, message: message.into() }
}

/// Normalises a human-written phone number into what the dialplan dials
/// (without the outbound prefix): separators removed, `+<country code>`
/// made national, other `+` made international.
pub fn normalize_number(raw: &str, rules: &OutboundRules) -> Result<String, Refusal> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(refuse(422, "number_missing", "the contact has no phone number"));
    }
    let mut plus = false;
    let mut digits = String::with_capacity(trimmed.len());
    for (i, c) in trimmed.chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => plus = true,
            ' ' | '-' | '.' | '(' | ')' | '/' => {}
            _ => {
                return Err(refuse(422, "number_malformed", format!("{raw:?} is not a phone number (character {c:?})")))
            }
        }
    }
    if plus {
        match &rules.country_code {
            Some(cc) if digits.starts_with(cc.as_str()) => digits = digits[cc.len()..].to_string(),
            _ => digits = format!("{}{digits}", rules.international_prefix),
        }
    }
    if !(3..=20).contains(&digits.len()) {
        return Err(refuse(422, "number_malformed", format!("{raw:?} has {} digits", digits.len())));
    }
    Ok(digits)
}

/// A click-to-call request (`POST /v1/calls`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ClickToCall {
    pub agent: String,
    pub number: Option<String>,
    pub ticket_id: Option<String>,
    pub contact: Option<Contact>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Contact {
    pub name: Option<String>,
    #[serde(default)]
    pub consent: bool,
}

/// An AMI action to send: name and headers in order (duplicates allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedAction {
    pub name: &'static str,
    pub headers: Vec<(String, String)>,
}

/// Validates a click-to-call and plans the `Originate` (async): the agent's
/// phone rings first, then the dialplan dials `prefix + number` in
/// `context`. `agent_busy` says whether the agent is on a call now;
/// `call_id` is callbridge's id for the attempt: the `ChannelId` of the
/// agent's channel (so the call's Linkedid) and the channel variable
/// `CALLBRIDGE_CORRELATION`.
pub fn plan_click_to_call(
    req: &ClickToCall,
    dir: &Directory,
    rules: &OutboundRules,
    agent_busy: impl Fn(&str) -> bool,
    call_id: &str,
) -> Result<PlannedAction, Refusal> {
    if !req.contact.as_ref().is_some_and(|c| c.consent) {
        return Err(refuse(403, "contact_not_consented", "the contact has not consented to be called"));
    }
    let number = normalize_number(req.number.as_deref().unwrap_or(""), rules)?;
    let agent = dir
        .agent(&req.agent)
        .ok_or_else(|| refuse(404, "agent_unknown", format!("no agent {:?} in the configuration", req.agent)))?;
    if agent.extension.trim().is_empty() {
        return Err(refuse(409, "agent_has_no_extension", format!("agent {:?} has no extension", req.agent)));
    }
    if agent_busy(agent.id.as_str()) {
        return Err(refuse(409, "agent_busy", format!("agent {:?} is on a call", req.agent)));
    }
    let channel = rules.agent_device(&agent.extension);
    let mut caller_name = match &req.ticket_id {
        Some(t) => format!("Ticket {t}"),
        None => req.contact.as_ref().and_then(|c| c.name.clone()).unwrap_or_else(|| number.clone()),
    };
    caller_name.retain(|c| c != '"' && c != '<' && c != '>' && !c.is_control());
    let mut headers = vec![
        ("Channel".to_string(), channel),
        ("Context".to_string(), rules.context.clone()),
        ("Exten".to_string(), format!("{}{number}", rules.prefix)),
        ("Priority".to_string(), "1".to_string()),
        ("Timeout".to_string(), (rules.agent_ring_seconds * 1000).to_string()),
        ("CallerID".to_string(), format!("\"{caller_name}\" <{}>", agent.extension)),
        ("Async".to_string(), "true".to_string()),
        ("ChannelId".to_string(), call_id.to_string()),
    ];
    if let Some(t) = &req.ticket_id {
        if t.chars().any(|c| c.is_control()) {
            return Err(refuse(422, "ticket_malformed", "the ticket id contains control characters"));
        }
        headers.push(("Variable".to_string(), format!("{}={t}", rules.ticket_variable)));
    }
    headers.push(("Variable".to_string(), format!("{CORRELATION_VARIABLE}={call_id}")));
    Ok(PlannedAction { name: "Originate", headers })
}

/// Channel variable carrying callbridge's id of a click-to-call.
pub const CORRELATION_VARIABLE: &str = "CALLBRIDGE_CORRELATION";

/// A transfer request (`POST /v1/calls/{id}/transfer`): exactly one target.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    pub to_agent: Option<String>,
    pub to_extension: Option<String>,
}

/// A validated transfer: where the customer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferTarget {
    /// The agent now talking, who hands the call over.
    pub from_agent: String,
    pub to_agent: String,
    pub to_extension: String,
}

/// Validates a transfer of `call` (its live snapshot) against the
/// configuration: the call must be answered by an agent, its group must
/// allow transfers, and the target must be another agent of that group.
pub fn check_transfer(req: &TransferRequest, call: &CallSnapshot, config: &Config) -> Result<TransferTarget, Refusal> {
    let dir_agent = |id: &str| config.agents.iter().find(|a| a.id == id);
    let target = match (&req.to_agent, &req.to_extension) {
        (Some(_), Some(_)) => {
            return Err(refuse(422, "target_ambiguous", "give either to_agent or to_extension, not both"));
        }
        (None, None) => return Err(refuse(422, "target_missing", "give to_agent or to_extension")),
        (Some(a), None) => {
            dir_agent(a).ok_or_else(|| refuse(404, "agent_unknown", format!("no agent {a:?} in the configuration")))?
        }
        (None, Some(e)) => {
            config.agents.iter().find(|a| a.extension.as_deref() == Some(e.as_str())).ok_or_else(|| {
                refuse(409, "target_not_in_group", format!("extension {e:?} belongs to no agent of the call's group"))
            })?
        }
    };
    let (CallState::Talking, Some(from)) = (call.state, call.agent.as_ref()) else {
        return Err(refuse(409, "call_not_answered", "only a call an agent is talking on can be transferred"));
    };
    let Some(group_id) = call.group.as_ref() else {
        return Err(refuse(409, "call_has_no_group", "the call belongs to no group, so no group allows its transfer"));
    };
    let Some(group) = config.groups.iter().find(|g| g.id == group_id.as_str()) else {
        return Err(refuse(409, "call_has_no_group", format!("group {group_id} is no longer configured")));
    };
    if !group.allow_transfer {
        return Err(refuse(409, "transfer_not_allowed", format!("group {} does not allow transfers", group.id)));
    }
    if !group.agents.contains(&target.id) {
        return Err(refuse(
            409,
            "target_not_in_group",
            format!("agent {:?} is not an agent of group {}", target.id, group.id),
        ));
    }
    if target.id == from.as_str() {
        return Err(refuse(409, "target_is_current_agent", format!("agent {:?} already has the call", target.id)));
    }
    let Some(ext) = target.extension.clone().filter(|e| !e.trim().is_empty()) else {
        return Err(refuse(409, "agent_has_no_extension", format!("agent {:?} has no extension", target.id)));
    };
    Ok(TransferTarget { from_agent: from.to_string(), to_agent: target.id.clone(), to_extension: ext })
}

/// Plans the blind transfer: `BlindTransfer` takes the transferer's
/// channel (the agent's phone in the call) and sends the party bridged to
/// it — the customer — to `to_extension` in the transfer context.
pub fn plan_blind_transfer(agent_channel: &str, target: &TransferTarget, rules: &OutboundRules) -> PlannedAction {
    PlannedAction {
        name: "BlindTransfer",
        headers: vec![
            ("Channel".to_string(), agent_channel.to_string()),
            ("Context".to_string(), rules.transfer_context.clone()),
            ("Exten".to_string(), target.to_extension.clone()),
        ],
    }
}

/// Q.850 cause "call rejected": what the caller's side is told when the
/// helpdesk refused the caller.
pub const CAUSE_CALL_REJECTED: &str = "21";

/// Plans the hangup of a caller the helpdesk refused (Zammad's `reject`
/// of a blocked caller id): `Hangup` of the caller's channel with cause 21.
/// The AMI user needs write permission `call` (or `system`).
pub fn plan_reject_hangup(caller_channel: &str) -> PlannedAction {
    PlannedAction {
        name: "Hangup",
        headers: vec![
            ("Channel".to_string(), caller_channel.to_string()),
            ("Cause".to_string(), CAUSE_CALL_REJECTED.to_string()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn rules() -> OutboundRules {
        OutboundRules {
            prefix: "0".into(),
            country_code: Some("55".into()),
            agent_channel: "SIP/{extension}".into(),
            ..OutboundRules::default()
        }
    }

    fn dir() -> Directory {
        let c = Config::parse(
            "[pbx]\nname='t'\n[[groups]]\nid='s'\nqueue='700'\nagents=['maria']\n[[agents]]\nid='maria'\nextension='2000'\n",
            "t",
        )
        .expect("valid");
        crate::settings::directory(&c)
    }

    #[test]
    fn numbers_are_normalised() {
        let r = rules();
        assert_eq!(normalize_number("+55 11 98765-0700", &r).as_deref(), Ok("11987650700"));
        assert_eq!(normalize_number("+44 20 7946 0000", &r).as_deref(), Ok("00442079460000"));
        assert_eq!(normalize_number("(11) 3000-1000", &r).as_deref(), Ok("1130001000"));
        assert_eq!(normalize_number("", &r).map_err(|e| e.code), Err("number_missing"));
        assert_eq!(normalize_number("11 9x", &r).map_err(|e| e.code), Err("number_malformed"));
        assert_eq!(normalize_number("1+1", &r).map_err(|e| e.code), Err("number_malformed"));
        assert_eq!(normalize_number("12", &r).map_err(|e| e.code), Err("number_malformed"));
    }

    fn req(consent: bool, number: Option<&str>, agent: &str) -> ClickToCall {
        ClickToCall {
            agent: agent.into(),
            number: number.map(str::to_string),
            ticket_id: Some("4711".into()),
            contact: Some(Contact { name: Some("Cliente".into()), consent }),
        }
    }

    #[test]
    fn click_to_call_refusals() {
        let (d, r) = (dir(), rules());
        let code = |q: &ClickToCall, busy: bool| plan_click_to_call(q, &d, &r, |_| busy, "c1").map_err(|e| e.code);
        assert_eq!(code(&req(false, Some("11987650700"), "maria"), false), Err("contact_not_consented"));
        assert_eq!(code(&req(true, None, "maria"), false), Err("number_missing"));
        assert_eq!(code(&req(true, Some("abc"), "maria"), false), Err("number_malformed"));
        assert_eq!(code(&req(true, Some("11987650700"), "nobody"), false), Err("agent_unknown"));
        assert_eq!(code(&req(true, Some("11987650700"), "maria"), true), Err("agent_busy"));
    }

    #[test]
    fn a_refused_caller_is_hung_up_as_rejected() {
        let a = plan_reject_hangup("SIP/carrier00-0000001e");
        assert_eq!(a.name, "Hangup");
        let h: Vec<(&str, &str)> = a.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(h, [("Channel", "SIP/carrier00-0000001e"), ("Cause", "21")]);
    }

    #[test]
    fn click_to_call_originate() {
        let a = plan_click_to_call(&req(true, Some("+55 11 98765-0700"), "maria"), &dir(), &rules(), |_| false, "c1")
            .expect("accepted");
        assert_eq!(a.name, "Originate");
        let h: Vec<(&str, &str)> = a.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            h,
            [
                ("Channel", "SIP/2000"),
                ("Context", "from-internal"),
                ("Exten", "011987650700"),
                ("Priority", "1"),
                ("Timeout", "30000"),
                ("CallerID", "\"Ticket 4711\" <2000>"),
                ("Async", "true"),
                ("ChannelId", "c1"),
                ("Variable", "CALLBRIDGE_TICKET=4711"),
                ("Variable", "CALLBRIDGE_CORRELATION=c1"),
            ]
        );
    }
}
