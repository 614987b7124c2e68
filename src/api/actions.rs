//! Control endpoints: click-to-call, transfer, agent availability.
//!
//! Each handler validates against the configuration and the live calls
//! (the pure rules are in [`crate::control`]), sends one AMI action per
//! step and answers as soon as the PBX accepted it. None of them changes a
//! call's state: the lifecycle (`call.started`, `call.transferred`, …)
//! comes back through the normal pipeline from the PBX's own events. The
//! only exception is the helpdesk's availability switch, which the
//! pipeline records (and reports as `agent.availability`, `source: api`).

use super::ApiError;
use crate::ami::{Action, ActionError, AmiHandle, Frame};
use crate::control::{self, ClickToCall, OutboundRules, PlannedAction, TransferRequest};
use crate::directory::Directory;
use crate::ids::AgentId;
use crate::normalize::ExpectedOriginate;
use crate::registry::LiveFilter;
use crate::state::{Command, Shared};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::oneshot;

fn stopping() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "callbridge is stopping")
}

fn bad_body(e: JsonRejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
}

fn ami_of(shared: &Shared) -> Result<&AmiHandle, ApiError> {
    shared.ami.as_ref().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "pbx_not_configured", "no AMI connection is configured")
    })
}

/// What the API answers when the PBX did not accept an action.
fn ami_error(e: ActionError) -> ApiError {
    match e {
        ActionError::Rejected { action, message, .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, "pbx_rejected", format!("the PBX rejected {action}: {message}"))
        }
        ActionError::NotConnected | ActionError::ConnectionLost { .. } | ActionError::Stopped => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "pbx_not_connected", e.to_string())
        }
        ActionError::Timeout { .. } => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "pbx_timeout", e.to_string()),
        ActionError::Busy(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "pbx_busy", e.to_string()),
        ActionError::Invalid(_) | ActionError::ListTooLong { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_action", e.to_string())
        }
    }
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
    shared.commands.send(make(tx)).await.map_err(|_| stopping())?;
    rx.await.map_err(|_| stopping())
}

fn agent_on_call(shared: &Shared, agent: &str) -> Option<String> {
    shared.registry.live_calls(&LiveFilter::all().agent(agent)).into_iter().next().map(|c| c.id.to_string())
}

/// `POST /v1/calls`: click-to-call. `202 {"call_id": …}` once the PBX
/// queued the `Originate`; the call id is the `ChannelId` of the agent's
/// channel, so every lifecycle event of the call carries it.
pub async fn click_to_call(
    State(shared): State<Arc<Shared>>,
    body: Result<Json<ClickToCall>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(req) = body.map_err(bad_body)?;
    let config = shared.config();
    let rules = OutboundRules::from_config(&config);
    let dir = shared.directory();
    let call_id = control::new_call_id();
    let planned = control::plan_click_to_call(&req, &dir, &rules, |a| agent_on_call(&shared, a).is_some(), &call_id)?;
    if config.outbound.context.is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "click_to_call_not_configured",
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
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "call_id": call_id,
            "agent": agent,
            "extension": extension,
            "number": number,
            "dialled": format!("{}{number}", rules.prefix),
            "ticket_id": req.ticket_id,
        })),
    ))
}

/// `POST /v1/calls/{id}/transfer`: blind transfer of the customer to
/// another agent of the call's group. `202` once the PBX accepted it; the
/// `call.transferred` event follows from the PBX's `BlindTransfer`.
pub async fn transfer(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Result<Json<TransferRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(req) = body.map_err(bad_body)?;
    let Some(live) = shared.registry.get_live(&id) else {
        return Err(match shared.registry.get(&id) {
            Some(_) => ApiError::new(StatusCode::CONFLICT, "call_ended", format!("call {id:?} has ended")),
            None => ApiError::not_found("call_not_found", format!("no live call with id {id:?}")),
        });
    };
    let config = shared.config();
    let target = control::check_transfer(&req, &live.snapshot, &config)?;
    let talking = ask(&shared, |reply| Command::TalkingChannel { call: id.clone(), reply }).await?;
    let Some((agent, channel)) = talking.filter(|(a, _)| a.as_str() == target.from_agent) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "call_not_answered",
            format!("no channel of agent {:?} is in call {id:?}", target.from_agent),
        ));
    };
    let rules = OutboundRules::from_config(&config);
    let planned = control::plan_blind_transfer(&channel, &target, &rules);
    ami_of(&shared)?.send(to_action(&planned)).await.map_err(ami_error)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "call_id": id,
            "kind": "blind",
            "from_agent": agent,
            "to_agent": target.to_agent,
            "to_extension": target.to_extension,
        })),
    ))
}

/// `PUT /v1/agents/{id}/availability` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityRequest {
    pub available: bool,
    pub reason: Option<String>,
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

/// `PUT /v1/agents/{id}/availability`: pauses or unpauses the agent in the
/// queue of each of their groups (`QueuePause`) and records the helpdesk's
/// switch. The answer lists the result per queue; `200` when every queue
/// took it, `207` when some did not (the switch is recorded either way:
/// it is what the agent asked for; the PBX's next member event or the
/// resync after a reconnection corrects the queues it did not take).
pub async fn set_availability(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Result<Json<AvailabilityRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(req) = body.map_err(bad_body)?;
    if req.reason.as_deref().is_some_and(|r| r.chars().any(char::is_control)) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason_malformed",
            "the reason contains control characters",
        ));
    }
    let dir = shared.directory();
    let Some(agent) = dir.agent(&id).cloned() else {
        return Err(ApiError::not_found("agent_unknown", format!("no agent {id:?} in the configuration")));
    };
    let ami = ami_of(&shared)?;
    // Recorded before the PBX is told, so that the PBX's confirmation
    // (`QueueMemberPause`) finds the change made and the helpdesk hears of
    // it once, as `source: api`.
    let queues: Vec<String> =
        agent.groups.iter().filter_map(|g| dir.group(g.as_str())).map(|g| g.queue.clone()).collect();
    let (available, reason) = (req.available, req.reason.clone().filter(|r| !r.is_empty()));
    ask(&shared, |reply| Command::SetAvailable { agent: id.clone(), available, reason, queues, reply }).await?;
    let mut results = Vec::new();
    let mut all_ok = true;
    for group in &agent.groups {
        let Some(g) = dir.group(group.as_str()) else { continue };
        let result = match member_interface(ami, &g.queue, &dir, agent.id.as_str()).await {
            Ok(Some(interface)) => {
                let mut action = Action::new("QueuePause")
                    .header("Queue", g.queue.as_str())
                    .header("Interface", interface.as_str())
                    .header("Paused", if req.available { "false" } else { "true" });
                if let Some(r) = req.reason.as_deref().filter(|r| !r.is_empty()) {
                    action.push("Reason", r);
                }
                match ami.send(action).await {
                    Ok(_) => json!({"group": group, "queue": g.queue, "interface": interface, "ok": true}),
                    Err(e) => {
                        all_ok = false;
                        let e = ami_error(e);
                        json!({"group": group, "queue": g.queue, "interface": interface, "ok": false,
                               "error": {"code": e.code, "message": e.message}})
                    }
                }
            }
            Ok(None) => {
                all_ok = false;
                json!({"group": group, "queue": g.queue, "ok": false, "error": {"code": "not_a_member",
                       "message": format!("agent {id:?} is not a member of queue {}", g.queue)}})
            }
            Err(e) => {
                all_ok = false;
                let e = ami_error(e);
                json!({"group": group, "queue": g.queue, "ok": false, "error": {"code": e.code, "message": e.message}})
            }
        };
        results.push(result);
    }
    let status = if all_ok { StatusCode::OK } else { StatusCode::MULTI_STATUS };
    Ok((status, Json(json!({"agent": agent.id, "available": available, "reason": req.reason, "queues": results}))))
}

/// `GET /v1/agents`: every configured agent with extension, groups,
/// availability (as the PBX and the helpdesk said) and current call.
pub async fn list_agents(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let config = shared.config();
    let dir = shared.directory();
    let agents: Vec<Value> = config
        .agents
        .iter()
        .filter_map(|a| dir.agent(&a.id))
        .map(|a| {
            let call = shared.registry.live_calls(&LiveFilter::all().agent(a.id.as_str())).into_iter().next();
            let p = shared.presence.get(a.id.as_str());
            let paused: Vec<&String> = p.paused.iter().filter(|(_, v)| **v).map(|(q, _)| q).collect();
            json!({
                "id": a.id,
                "name": a.name,
                "extension": a.extension,
                "groups": a.groups,
                "available": p.available(),
                "helpdesk_available": !p.helpdesk_off,
                "paused_queues": paused,
                "device_unavailable": p.device_unavailable,
                "current_call": call.map(|c| json!({
                    "id": c.id, "state": c.state.as_str(), "direction": c.direction, "group": c.group,
                })),
            })
        })
        .collect();
    Json(json!({ "count": agents.len(), "agents": agents }))
}
