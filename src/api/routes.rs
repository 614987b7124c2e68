//! The routes of the HTTP API and their handlers.
//!
//! Every route is registered through [`routes!`], which also documents it:
//! the router and the OpenAPI document come from the same two lists
//! ([`open_routes`], [`protected_routes`]) and cannot disagree.

use super::error::{not_found, ApiError, ErrorCode, NoQuery, Path, Query};
use super::layers::{harden, RequestLimits};
use super::{require_bearer, require_leader, Auth};
use crate::event::{CallSnapshot, CallState};
use crate::registry::{LiveCursor, LiveFilter};
use crate::state::{Command, Shared};
use axum::extract::State;
use axum::{middleware, Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::oneshot;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The routes anyone may call.
pub fn open_routes() -> OpenApiRouter<Arc<Shared>> {
    OpenApiRouter::new()
        .routes(routes!(super::healthz))
        .routes(routes!(super::readyz))
        .routes(routes!(super::metrics))
        .routes(routes!(super::openapi_json))
        .routes(routes!(super::ui::ui))
}

/// The routes behind the bearer token.
pub fn protected_routes() -> OpenApiRouter<Arc<Shared>> {
    OpenApiRouter::new()
        .routes(routes!(list_calls, super::actions::click_to_call))
        .routes(routes!(get_call, remove_call))
        .routes(routes!(super::events::events))
        .routes(routes!(super::actions::transfer))
        .routes(routes!(super::actions::list_agents))
        .routes(routes!(super::actions::set_availability))
        .routes(routes!(indicators))
        .routes(routes!(dead_letters))
        .routes(routes!(retry_dead_letter))
}

/// The whole API: open health routes, everything else behind the token,
/// unknown routes `404 not_found`, all of it within `limits`.
pub fn router(shared: Arc<Shared>, auth: Auth, limits: RequestLimits) -> Router {
    let (open, _) = open_routes().split_for_parts();
    let (protected, _) = protected_routes().split_for_parts();
    let app = open
        .merge(
            protected
                .route_layer(middleware::from_fn_with_state(shared.clone(), require_leader))
                .route_layer(middleware::from_fn_with_state(auth, require_bearer)),
        )
        .fallback(not_found)
        .with_state(shared);
    harden(app, limits)
}

/// `/metrics` alone, for a separate listener.
pub fn metrics_router(limits: RequestLimits) -> Router {
    let (metrics_only, _) = OpenApiRouter::<()>::new().routes(routes!(super::metrics)).split_for_parts();
    harden(metrics_only.fallback(not_found), limits)
}

/// The live states a call can be listed by.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // documents the values of `state`, parsed by parse_state
enum LiveState {
    Started,
    Queued,
    Ringing,
    Talking,
}

/// Query of `GET /v1/calls`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CallsQuery {
    /// Only calls of this group.
    group: Option<String>,
    /// Only calls an agent of this id has.
    agent: Option<String>,
    /// Only calls in this state (`bad_state` otherwise).
    #[param(inline, value_type = Option<LiveState>)]
    state: Option<String>,
    /// Page size, 1 to 1000 (default 100; `bad_limit` otherwise).
    // A string here so that a bad value gets its own code, not `bad_query`.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page, unchanged (`bad_cursor` otherwise).
    cursor: Option<String>,
}

/// Calls per page of `GET /v1/calls` unless `limit` says otherwise.
pub const DEFAULT_PAGE: usize = 100;
/// The largest `limit` accepted.
pub const MAX_PAGE: usize = 1000;

/// A page of `GET /v1/calls`.
#[derive(Serialize, ToSchema)]
pub struct CallsPage {
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
        _ => Err(ApiError::new(ErrorCode::BadLimit, format!("limit {s:?} is not a whole number from 1 to {MAX_PAGE}"))),
    }
}

/// The cursor is `base64url("<started_at µs>:<call id>")`, opaque to clients.
pub fn encode_cursor(c: &LiveCursor) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}:{}", c.started_at, c.id))
}

pub fn decode_cursor(s: &str) -> Result<LiveCursor, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::BadCursor,
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
                ErrorCode::BadState,
                format!("unknown state {other:?}: use started, queued, ringing or talking"),
            ))
        }
    })
}

/// Live calls, oldest first (then by id), one page at a time; the filters
/// apply before paging.
#[utoipa::path(get, path = "/v1/calls", tag = "calls", params(CallsQuery), responses(
    (status = 200, description = "A page of live calls", body = CallsPage),
))]
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

/// A live call, or one ended within retention (with its recording).
#[utoipa::path(get, path = "/v1/calls/{id}", tag = "calls",
    params(("id" = String, Path, description = "The call id")),
    responses((status = 200, description = "The call", body = CallSnapshot)))]
async fn get_call(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    _: Query<NoQuery>,
) -> Result<Json<CallSnapshot>, ApiError> {
    shared.registry.get(&id).map(Json).ok_or_else(|| {
        ApiError::new(
            ErrorCode::CallNotFound,
            format!("no live call and no call ended within retention with id {id:?}"),
        )
    })
}

/// Removes a stuck call: `call.ended` with `end_reason: removed`.
#[utoipa::path(delete, path = "/v1/calls/{id}", tag = "calls",
    params(("id" = String, Path, description = "The call id")),
    responses((status = 200, description = "The call as it ended", body = CallSnapshot)))]
async fn remove_call(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    _: Query<NoQuery>,
) -> Result<Json<CallSnapshot>, ApiError> {
    let (tx, rx) = oneshot::channel();
    shared.commands.send(Command::RemoveCall { id: id.clone(), reply: tx }).await.map_err(|_| ApiError::stopping())?;
    match rx.await {
        Ok(Some(snapshot)) => Ok(Json(snapshot)),
        Ok(None) => Err(ApiError::new(ErrorCode::CallNotLive, format!("no live call with id {id:?}"))),
        Err(_) => Err(ApiError::stopping()),
    }
}

/// Waiting and talking now; today's counts in the group's time zone.
#[utoipa::path(get, path = "/v1/groups/{id}/indicators", tag = "groups",
    params(("id" = String, Path, description = "The group id")),
    responses((status = 200, description = "The group's indicators", body = crate::indicators::GroupIndicators)))]
async fn indicators(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    _: Query<NoQuery>,
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
    report.map(Json).ok_or_else(|| ApiError::new(ErrorCode::GroupNotFound, format!("no group {id:?}")))
}

/// Query of the dead-letter endpoints.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SinkQuery {
    /// Only this sink's dead letters.
    sink: Option<String>,
}

/// `GET /v1/dead-letters`.
#[derive(Serialize, ToSchema)]
pub struct DeadLetters {
    pub count: usize,
    pub dead_letters: Vec<crate::outbox::DeadLetter>,
}

/// `POST /v1/dead-letters/{id}/retry`.
#[derive(Serialize, ToSchema)]
pub struct Requeued {
    /// Dead letters queued again (one per sink that had the event).
    pub requeued: usize,
    pub event_id: String,
}

fn outbox_of(shared: &Shared) -> Result<&crate::outbox::Outbox, ApiError> {
    shared.outbox.as_ref().ok_or_else(|| {
        ApiError::new(ErrorCode::NoOutbox, "no durable outbox: only stdout is configured, nothing is ever parked")
    })
}

fn outbox_error(e: crate::outbox::OutboxError) -> ApiError {
    match e {
        crate::outbox::OutboxError::UnknownSink(s) => {
            ApiError::new(ErrorCode::SinkNotFound, format!("no sink named {s:?}"))
        }
        other => ApiError::new(ErrorCode::OutboxUnavailable, other.to_string()),
    }
}

/// Events a sink refused for good (a 4xx), oldest first.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "dead letters", params(SinkQuery), responses(
    (status = 200, description = "The dead letters", body = DeadLetters),
))]
async fn dead_letters(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<SinkQuery>,
) -> Result<Json<DeadLetters>, ApiError> {
    let mut all = outbox_of(&shared)?.dead_letters().await.map_err(outbox_error)?;
    if let Some(s) = &q.sink {
        all.retain(|d| &d.sink == s);
    }
    Ok(Json(DeadLetters { count: all.len(), dead_letters: all }))
}

/// Queues a dead letter again (for every sink, or only `sink`).
#[utoipa::path(post, path = "/v1/dead-letters/{id}/retry", tag = "dead letters",
    params(("id" = String, Path, description = "The event id"), SinkQuery),
    responses((status = 200, description = "Queued again", body = Requeued)))]
async fn retry_dead_letter(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(q): Query<SinkQuery>,
) -> Result<Json<Requeued>, ApiError> {
    let n = outbox_of(&shared)?.retry_dead_letters(q.sink.as_deref(), Some(&id)).await.map_err(outbox_error)?;
    if n == 0 {
        return Err(ApiError::new(ErrorCode::DeadLetterNotFound, format!("no dead letter for event {id:?}")));
    }
    Ok(Json(Requeued { requeued: n, event_id: id }))
}
