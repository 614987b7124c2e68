//! The routes of the HTTP API and their handlers.

use super::{healthz, metrics, readyz, require_bearer, ApiError, Auth};
use crate::event::{CallSnapshot, CallState};
use crate::registry::{LiveCursor, LiveFilter};
use crate::state::{Command, Shared};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{middleware, Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::oneshot;

/// The whole API: open health routes, everything else behind the token.
pub fn router(shared: Arc<Shared>, auth: Auth) -> Router {
    let protected = Router::new()
        .route("/v1/calls", get(list_calls).post(super::actions::click_to_call))
        .route("/v1/calls/{id}", get(get_call).delete(remove_call))
        .route("/v1/calls/{id}/transfer", axum::routing::post(super::actions::transfer))
        .route("/v1/agents", get(super::actions::list_agents))
        .route("/v1/agents/{id}/availability", axum::routing::put(super::actions::set_availability))
        .route("/v1/groups/{id}/indicators", get(indicators))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/dead-letters/{id}/retry", axum::routing::post(retry_dead_letter))
        .layer(middleware::from_fn_with_state(auth, require_bearer))
        .with_state(shared.clone());
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared.readiness.clone())
        .route("/metrics", get(metrics));
    open.merge(protected).fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
}

/// `/metrics` alone, for a separate listener.
pub fn metrics_router() -> Router {
    Router::new().route("/metrics", get(metrics))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallsQuery {
    group: Option<String>,
    agent: Option<String>,
    state: Option<String>,
    /// Page size (1..=[`MAX_PAGE`], default [`DEFAULT_PAGE`]); a string so
    /// a bad value gets the JSON error envelope, not a plain-text rejection.
    limit: Option<String>,
    /// Opaque: the `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Calls per page of `GET /v1/calls` unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// The largest `limit` accepted.
pub const MAX_PAGE: usize = 1000;

/// A page of `GET /v1/calls`.
#[derive(Serialize)]
struct CallsPage {
    /// Calls in this page.
    count: usize,
    calls: Vec<CallSnapshot>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

fn parse_limit(s: Option<&str>) -> Result<usize, ApiError> {
    let Some(s) = s else { return Ok(DEFAULT_PAGE) };
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_limit",
            format!("limit {s:?} is not a whole number from 1 to {MAX_PAGE}"),
        )),
    }
}

/// The cursor is `base64url("<started_at µs>:<call id>")`, opaque to clients.
pub fn encode_cursor(c: &LiveCursor) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}:{}", c.started_at, c.id))
}

pub fn decode_cursor(s: &str) -> Result<LiveCursor, ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_cursor",
            "cursor is not one this API returned: pass next_cursor from the previous page unchanged",
        )
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (time, id) = text.split_once(':').ok_or_else(bad)?;
    let started_at = time.parse().map_err(|_| bad())?;
    if id.is_empty() {
        return Err(bad());
    }
    Ok(LiveCursor { started_at, id: crate::event::CallId::new(id) })
}

fn parse_state(s: &str) -> Result<CallState, ApiError> {
    Ok(match s {
        "started" => CallState::Started,
        "queued" => CallState::Queued,
        "ringing" => CallState::Ringing,
        "talking" => CallState::Talking,
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_state",
                format!("unknown state {other:?}: use started, queued, ringing or talking"),
            ))
        }
    })
}

/// `GET /v1/calls[?group=&agent=&state=&limit=&cursor=]`: live calls,
/// oldest first (then by id), one page at a time.
async fn list_calls(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<CallsQuery>,
) -> Result<Json<CallsPage>, ApiError> {
    let mut filter = LiveFilter::all();
    if let Some(g) = q.group.as_deref() {
        filter = filter.group(g);
    }
    if let Some(a) = q.agent.as_deref() {
        filter = filter.agent(a);
    }
    if let Some(s) = q.state.as_deref() {
        filter = filter.state(parse_state(s)?);
    }
    let limit = parse_limit(q.limit.as_deref())?;
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let page = shared.registry.live_page(&filter, after.as_ref(), limit);
    let next_cursor = page.next.as_ref().map(encode_cursor);
    Ok(Json(CallsPage { count: page.calls.len(), calls: page.calls, next_cursor }))
}

async fn get_call(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<CallSnapshot>, ApiError> {
    shared.registry.get(&id).map(Json).ok_or_else(|| {
        ApiError::not_found("call_not_found", format!("no live call and no call ended within retention with id {id:?}"))
    })
}

async fn remove_call(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<CallSnapshot>, ApiError> {
    let (tx, rx) = oneshot::channel();
    shared
        .commands
        .send(Command::RemoveCall { id: id.clone(), reply: tx })
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "callbridge is stopping"))?;
    match rx.await {
        Ok(Some(snapshot)) => Ok(Json(snapshot)),
        Ok(None) => Err(ApiError::not_found("call_not_live", format!("no live call with id {id:?}"))),
        Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "callbridge is stopping")),
    }
}

async fn indicators(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<crate::indicators::GroupIndicators>, ApiError> {
    let now = shared.pbx_now();
    let (mut waiting, mut talking) = (0u64, 0u64);
    shared.registry.for_each_live(|c| {
        if c.snapshot.group.as_ref().is_some_and(|g| g.as_str() == id) {
            match c.snapshot.state {
                CallState::Queued | CallState::Ringing => waiting += 1,
                CallState::Talking => talking += 1,
                _ => {}
            }
        }
    });
    let report = shared.indicators.lock().unwrap_or_else(|p| p.into_inner()).report(&id, now, waiting, talking);
    report.map(Json).ok_or_else(|| ApiError::not_found("group_not_found", format!("no group {id:?}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkQuery {
    sink: Option<String>,
}

fn outbox_of(shared: &Shared) -> Result<&crate::outbox::Outbox, ApiError> {
    shared.outbox.as_ref().ok_or_else(|| {
        ApiError::not_found("no_outbox", "no durable outbox: only stdout is configured, nothing is ever parked")
    })
}

fn outbox_error(e: crate::outbox::OutboxError) -> ApiError {
    match e {
        crate::outbox::OutboxError::UnknownSink(s) => {
            ApiError::not_found("sink_not_found", format!("no sink named {s:?}"))
        }
        other => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "outbox_unavailable", other.to_string()),
    }
}

/// `GET /v1/dead-letters[?sink=name]`: events a sink refused (4xx), oldest first.
async fn dead_letters(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<SinkQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut all = outbox_of(&shared)?.dead_letters().await.map_err(outbox_error)?;
    if let Some(s) = &q.sink {
        all.retain(|d| &d.sink == s);
    }
    Ok(Json(serde_json::json!({ "count": all.len(), "dead_letters": all })))
}

/// `POST /v1/dead-letters/{event id}/retry[?sink=name]`: queue it again.
async fn retry_dead_letter(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<SinkQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let n = outbox_of(&shared)?.retry_dead_letters(q.sink.as_deref(), Some(&id)).await.map_err(outbox_error)?;
    if n == 0 {
        return Err(ApiError::not_found("dead_letter_not_found", format!("no dead letter for event {id:?}")));
    }
    Ok(Json(serde_json::json!({ "requeued": n, "event_id": id })))
}
