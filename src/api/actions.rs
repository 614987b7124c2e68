//! Control endpoints: click-to-call, transfer, agent availability.
//!
//! Each handler validates against the configuration and the live calls
//! (the pure rules are in [`crate::control`]), sends one AMI action per
//! step and answers as soon as the PBX accepted it. None of them changes a
//! call's state: the lifecycle (`call.started`, `call.transferred`, …)
//! comes back through the normal pipeline from the PBX's own events. The
//! only exception is the helpdesk's availability switch, which the
//! pipeline records (and reports as `agent.availability`, `source: api`).

use super::error::{ApiError, ErrorCode, ErrorDetail, Json, NoQuery, Path, Query};
use crate::ami::{Action, ActionError, AmiHandle, Frame};
use crate::control::{self, ClickToCall, OutboundRules, PlannedAction, TransferRequest};
use crate::directory::{Agent, Directory};
use crate::event::{CallId, CallState, Direction};
use crate::ids::{AgentId, GroupId};
use crate::normalize::ExpectedOriginate;
use crate::registry::LiveFilter;
use crate::state::{Command, Shared};
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::oneshot;
use utoipa::ToSchema;

fn ami_of(shared: &Shared) -> Result<&AmiHandle, ApiError> {
    shared.ami.as_ref().ok_or_else(|| ApiError::new(ErrorCode::PbxNotConfigured, "no AMI connection is configured"))
}

/// What the API answers when the PBX did not accept an action.
fn ami_error(e: ActionError) -> ApiError {
    let code = match &e {
        ActionError::Rejected { action, message, .. } => {
            return ApiError::new(ErrorCode::PbxRejected, format!("the PBX rejected {action}: {message}"))
        }
        ActionError::NotConnected | ActionError::ConnectionLost { .. } | ActionError::Stopped => {
            ErrorCode::PbxNotConnected
        }
        ActionError::Timeout { .. } => ErrorCode::PbxTimeout,
        ActionError::Busy(_) => ErrorCode::PbxBusy,
        ActionError::Invalid(_) | ActionError::ListTooLong { .. } => ErrorCode::InvalidAction,
    };
    ApiError::new(code, e.to_string())
}

fn to_action(p: &PlannedAction) -> Action {
    let mut a = Action::new(p.name);
    for (k, v) in &p.headers {
        a.push(k.clone(), v.clone());
    }
    a
}

async fn ask<T>(shared: &Shared, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    shared.commands.send(make(tx)).await.map_err(|_| ApiError::stopping())?;
    rx.await.map_err(|_| ApiError::stopping())
}

fn agent_on_call(shared: &Shared, agent: &str) -> Option<String> {
    shared.registry.live_calls(&LiveFilter::all().agent(agent)).into_iter().next().map(|c| c.id.to_string())
}

/// `202` of `POST /v1/calls`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClickToCallAccepted {
    /// callbridge's id of the call: every lifecycle event of it carries it.
    pub call_id: String,
    pub agent: AgentId,
    pub extension: String,
    /// The number as normalised (national, or with the international prefix).
    pub number: String,
    /// What the dialplan dials: the outbound prefix and the number.
    pub dialled: String,
    pub ticket_id: Option<String>,
}

/// Click-to-call: the agent's phone rings first, then the customer's
/// number is dialled. `202` once the PBX queued the `Originate`; the call
/// id is the `ChannelId` of the agent's channel, so every lifecycle event
/// of the call carries it.
#[utoipa::path(post, path = "/v1/calls", tag = "control", request_body = ClickToCall, responses(
    (status = 202, description = "The PBX queued the call", body = ClickToCallAccepted),
))]
pub async fn click_to_call(
    State(shared): State<Arc<Shared>>,
    _: Query<NoQuery>,
    Json(req): Json<ClickToCall>,
) -> Result<(StatusCode, axum::Json<ClickToCallAccepted>), ApiError> {
    let config = shared.config();
    let rules = OutboundRules::from_config(&config);
    let dir = shared.directory();
    let call_id = control::new_call_id();
    let planned = control::plan_click_to_call(&req, &dir, &rules, |a| agent_on_call(&shared, a).is_some(), &call_id)?;
    if config.outbound.context.is_none() {
        return Err(ApiError::new(
            ErrorCode::ClickToCallNotConfigured,
            "click-to-call needs [outbound] context in the configuration",
        ));
    }
    let ami = ami_of(&shared)?;
    if !ami.is_connected() {
        return Err(ami_error(ActionError::NotConnected));
    }
    // Validated by plan_click_to_call: normalising again cannot fail.
    let number = control::normalize_number(req.number.as_deref().unwrap_or(""), &rules)?;
    let agent = dir.agent(&req.agent).map(|a| a.id.clone()).unwrap_or_else(|| AgentId::new(&req.agent));
    let extension = dir.agent(&req.agent).map(|a| a.extension.clone()).unwrap_or_default();
    let originate = ExpectedOriginate {
        call_id: call_id.clone(),
        agent: agent.clone(),
        device: rules.agent_device(&extension),
        number: number.clone(),
        ticket: req.ticket_id.clone(),
        at: shared.pbx_now(),
    };
    ask(&shared, |reply| Command::ExpectOriginate { originate, reply }).await?;
    ami.send(to_action(&planned)).await.map_err(ami_error)?;
    let dialled = format!("{}{number}", rules.prefix);
    let accepted = ClickToCallAccepted { call_id, agent, extension, number, dialled, ticket_id: req.ticket_id };
    Ok((StatusCode::ACCEPTED, axum::Json(accepted)))
}

/// `202` of `POST /v1/calls/{id}/transfer`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TransferAccepted {
    pub call_id: String,
    /// Always `blind`.
    pub kind: &'static str,
    pub from_agent: AgentId,
    pub to_agent: String,
    pub to_extension: String,
}

/// Blind transfer of the customer to another agent of the call's group.
/// `202` once the PBX accepted it; the `call.transferred` event follows
/// from the PBX's `BlindTransfer`.
#[utoipa::path(post, path = "/v1/calls/{id}/transfer", tag = "control",
    params(("id" = String, Path, description = "The call id")),
    request_body = TransferRequest,
    responses((status = 202, description = "The PBX accepted the transfer", body = TransferAccepted)))]
pub async fn transfer(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    _: Query<NoQuery>,
    Json(req): Json<TransferRequest>,
) -> Result<(StatusCode, axum::Json<TransferAccepted>), ApiError> {
    let Some(live) = shared.registry.get_live(&id) else {
        return Err(match shared.registry.get(&id) {
            Some(_) => ApiError::new(ErrorCode::CallEnded, format!("call {id:?} has ended")),
            None => ApiError::new(ErrorCode::CallNotFound, format!("no live call with id {id:?}")),
        });
    };
    let config = shared.config();
    let target = control::check_transfer(&req, &live.snapshot, &config)?;
    let talking = ask(&shared, |reply| Command::TalkingChannel { call: id.clone(), reply }).await?;
    let Some((agent, channel)) = talking.filter(|(a, _)| a.as_str() == target.from_agent) else {
        return Err(ApiError::new(
            ErrorCode::CallNotAnswered,
            format!("no channel of agent {:?} is in call {id:?}", target.from_agent),
        ));
    };
    let rules = OutboundRules::from_config(&config);
    let planned = control::plan_blind_transfer(&channel, &target, &rules);
    ami_of(&shared)?.send(to_action(&planned)).await.map_err(ami_error)?;
    let accepted = TransferAccepted {
        call_id: id,
        kind: "blind",
        from_agent: agent,
        to_agent: target.to_agent,
        to_extension: target.to_extension,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(accepted)))
}

/// `PUT /v1/agents/{id}/availability` body.
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityRequest {
    /// `false` pauses the agent in every queue of their groups.
    pub available: bool,
    /// Why (e.g. `lunch`); given to the PBX as the pause reason.
    pub reason: Option<String>,
}

/// The answer of `PUT /v1/agents/{id}/availability`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AvailabilityResult {
    pub agent: AgentId,
    pub available: bool,
    pub reason: Option<String>,
    /// One entry per group of the agent.
    pub queues: Vec<QueueResult>,
}

/// What one queue did with the switch.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueResult {
    pub group: GroupId,
    pub queue: String,
    /// How the queue lists the agent; absent when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    pub ok: bool,
    /// Why the queue did not take it (`not_a_member`, `pbx_rejected`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Finds how a queue lists the agent (its member interface), from
/// `QueueStatus` for that queue: `Local/2000@agents/n`, `SIP/2002`, …
async fn member_interface(
    ami: &AmiHandle,
    queue: &str,
    dir: &Directory,
    agent: &str,
) -> Result<Option<String>, ActionError> {
    let list = ami.send_list(Action::new("QueueStatus").header("Queue", queue)).await?;
    Ok(list.items.iter().filter(|f| f.event() == Some("QueueMember")).find_map(|f: &Frame| {
        let who = dir.agent_for_member(
            f.get("Interface").or_else(|| f.get("Location")),
            f.get("StateInterface"),
            f.get("MemberName").or_else(|| f.get("Name")),
        )?;
        (who.id.as_str() == agent).then(|| f.get("Interface").or_else(|| f.get("Location")).map(str::to_string))?
    }))
}

/// Pauses or unpauses the agent in the queue of each of their groups
/// (`QueuePause`) and records the helpdesk's switch. The answer lists the
/// result per queue; `200` when every queue took it, `207` when some did not
/// (the switch is recorded either way: it is what the agent asked for; the
/// PBX's next member event or the resync after a reconnection corrects the
/// queues it did not take). Without AMI (SIP-only, a served replay) every
/// queue answers `pbx_not_configured`: the switch still reaches the
/// helpdesk and the FastAGI routing.
#[utoipa::path(put, path = "/v1/agents/{id}/availability", tag = "control",
    params(("id" = String, Path, description = "The agent id")),
    request_body = AvailabilityRequest,
    responses(
        (status = 200, description = "Every queue took it", body = AvailabilityResult),
        (status = 207, description = "Some queues did not take it (see `queues[].error`)", body = AvailabilityResult),
    ))]
pub async fn set_availability(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    _: Query<NoQuery>,
    Json(req): Json<AvailabilityRequest>,
) -> Result<(StatusCode, axum::Json<AvailabilityResult>), ApiError> {
    if req.reason.as_deref().is_some_and(|r| r.chars().any(char::is_control)) {
        return Err(ApiError::new(ErrorCode::ReasonMalformed, "the reason contains control characters"));
    }
    let dir = shared.directory();
    let Some(agent) = dir.agent(&id).cloned() else {
        return Err(ApiError::new(ErrorCode::AgentUnknown, format!("no agent {id:?} in the configuration")));
    };
    // Recorded before the PBX is told, so that the PBX's confirmation
    // (`QueueMemberPause`) finds the change made and the helpdesk hears of
    // it once, as `source: api`.
    let queues: Vec<String> =
        agent.groups.iter().filter_map(|g| dir.group(g.as_str())).map(|g| g.queue.clone()).collect();
    let (available, reason) = (req.available, req.reason.clone().filter(|r| !r.is_empty()));
    ask(&shared, |reply| Command::SetAvailable { agent: id.clone(), available, reason, queues, reply }).await?;
    let mut results = Vec::new();
    for group in &agent.groups {
        let Some(g) = dir.group(group.as_str()) else { continue };
        // Without AMI (SIP-only, a served replay) the switch still counts
        // for routing and reaches the helpdesk; no queue can be told.
        results.push(match &shared.ami {
            Some(ami) => pause_in_queue(ami, &dir, &agent, group, &g.queue, &req).await,
            None => QueueResult {
                group: group.clone(),
                queue: g.queue.clone(),
                interface: None,
                ok: false,
                error: Some(ApiError::new(ErrorCode::PbxNotConfigured, "no AMI connection is configured").detail()),
            },
        });
    }
    let status = if results.iter().all(|r| r.ok) { StatusCode::OK } else { StatusCode::MULTI_STATUS };
    Ok((status, axum::Json(AvailabilityResult { agent: agent.id, available, reason: req.reason, queues: results })))
}

/// `QueuePause` of `agent` in one queue, with the interface the queue lists.
async fn pause_in_queue(
    ami: &AmiHandle,
    dir: &Directory,
    agent: &Agent,
    group: &GroupId,
    queue: &str,
    req: &AvailabilityRequest,
) -> QueueResult {
    let result = |interface: Option<String>, error: Option<ApiError>| QueueResult {
        group: group.clone(),
        queue: queue.to_string(),
        interface,
        ok: error.is_none(),
        error: error.map(|e| e.detail()),
    };
    let interface = match member_interface(ami, queue, dir, agent.id.as_str()).await {
        Ok(Some(interface)) => interface,
        Ok(None) => {
            let message = format!("agent {:?} is not a member of queue {queue}", agent.id.as_str());
            return result(None, Some(ApiError::new(ErrorCode::NotAMember, message)));
        }
        Err(e) => return result(None, Some(ami_error(e))),
    };
    let mut action = Action::new("QueuePause")
        .header("Queue", queue)
        .header("Interface", interface.as_str())
        .header("Paused", if req.available { "false" } else { "true" });
    if let Some(r) = req.reason.as_deref().filter(|r| !r.is_empty()) {
        action.push("Reason", r);
    }
    let error = ami.send(action).await.err().map(ami_error);
    result(Some(interface), error)
}

/// `GET /v1/agents`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentList {
    pub count: usize,
    pub agents: Vec<AgentView>,
}

/// An agent as `GET /v1/agents` shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentView {
    pub id: AgentId,
    pub name: Option<String>,
    pub extension: String,
    pub groups: Vec<GroupId>,
    /// Takes calls: switched on in the helpdesk, device usable, not paused everywhere.
    pub available: bool,
    /// The helpdesk's switch.
    pub helpdesk_available: bool,
    /// Queues the PBX has the agent paused in.
    pub paused_queues: Vec<String>,
    /// The agent's phone is unregistered or unreachable.
    pub device_unavailable: bool,
    /// The agent's live call, if any.
    pub current_call: Option<CurrentCall>,
}

/// The call an agent is on.
#[derive(Debug, Serialize, ToSchema)]
pub struct CurrentCall {
    pub id: CallId,
    pub state: CallState,
    pub direction: Direction,
    pub group: Option<GroupId>,
}

/// Every configured agent with extension, groups, availability (as the
/// PBX and the helpdesk said) and current call.
#[utoipa::path(get, path = "/v1/agents", tag = "control", responses(
    (status = 200, description = "The agents", body = AgentList),
))]
pub async fn list_agents(State(shared): State<Arc<Shared>>, _: Query<NoQuery>) -> axum::Json<AgentList> {
    let config = shared.config();
    let dir = shared.directory();
    let agents: Vec<AgentView> = config
        .agents
        .iter()
        .filter_map(|a| dir.agent(&a.id))
        .map(|a| {
            let call = shared.registry.live_calls(&LiveFilter::all().agent(a.id.as_str())).into_iter().next();
            let p = shared.presence.get(a.id.as_str());
            AgentView {
                id: a.id.clone(),
                name: a.name.clone(),
                extension: a.extension.clone(),
                groups: a.groups.clone(),
                available: p.available(),
                helpdesk_available: !p.helpdesk_off,
                paused_queues: p.paused.iter().filter(|(_, v)| **v).map(|(q, _)| q.clone()).collect(),
                device_unavailable: p.device_unavailable,
                current_call: call.map(|c| CurrentCall {
                    id: c.id,
                    state: c.state,
                    direction: c.direction,
                    group: c.group,
                }),
            }
        })
        .collect();
    axum::Json(AgentList { count: agents.len(), agents })
}
