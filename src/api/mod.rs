//! The HTTP API (axum): health and readiness, Prometheus metrics, calls,
//! indicators, control actions and dead letters (SPEC §8), described by the
//! OpenAPI document at `/v1/openapi.json` ([`openapi`]).
//!
//! JSON everywhere (but the event stream, [`events`], and the monitor
//! page, [`ui`]); every error is `{"error": {"code": "...", "message":
//! "..."}}` with a stable [`ErrorCode`] ([`error`]). Every route but
//! `/healthz`, `/readyz`, `/metrics`, `/v1/openapi.json` and `/ui` needs
//! `Authorization: Bearer <token>`, compared in constant time. Tracing, the
//! request timeout and the body limit are in [`layers`].
//!
//! The API never changes call state itself: reads come from the registry,
//! changes go to the pipeline task or the PBX as commands.

pub mod actions;
pub mod error;
pub mod events;
pub mod layers;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod ui;

pub use error::{ApiError, ErrorCode};
pub use layers::RequestLimits;

use crate::state::Shared;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use error::{Enveloped, ErrorDetail};
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// `GET /healthz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// `GET /readyz` when ready.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// AMI logged in (or, in SIP-only mode, the SIP side reachable).
    pub pbx_connected: bool,
    pub outbox_writable: bool,
    /// `single` (no hot standby), `leader` or `standby` (`[ha]`). A
    /// standby is ready: it is warm and takes over by itself; only the
    /// leader (or an instance alone) delivers and controls.
    #[schema(example = "leader")]
    pub role: &'static str,
    /// The leader's `[ha] node`, when known (itself when leading).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// `GET /readyz` when not ready: the error envelope (`not_ready`) with the
/// same flags.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotReady {
    pub error: ErrorDetail,
    pub ready: bool,
    pub pbx_connected: bool,
    pub outbox_writable: bool,
    /// `single` (no hot standby), `leader` or `standby` (`[ha]`). A
    /// standby is ready: it is warm and takes over by itself; only the
    /// leader (or an instance alone) delivers and controls.
    #[schema(example = "leader")]
    pub role: &'static str,
    /// The leader's `[ha] node`, when known (itself when leading).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// Which part this instance plays (`[ha]`): `role` and `leader` of
/// [`Readiness`].
struct RoleInfo {
    role: &'static str,
    leader: Option<String>,
}

impl RoleInfo {
    fn of(l: &crate::ha::Leadership) -> RoleInfo {
        let role = l.role();
        let leader = match &role {
            crate::ha::Role::Single => None,
            crate::ha::Role::Leader { .. } => l.node().map(str::to_string),
            crate::ha::Role::Standby { leader } => leader.as_ref().map(|l| l.node.clone()),
        };
        RoleInfo { role: role.name(), leader }
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is up", body = Health)))]
pub async fn healthz() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

/// Ready for work: the PBX is connected and the outbox accepts writes.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "Ready", body = Readiness),
    (status = 503, description = "Not ready (`not_ready`); the flags say why", body = NotReady),
))]
pub async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let r = &shared.readiness;
    let (ready, pbx_connected, outbox_writable) =
        (r.is_ready(), r.pbx.load(Ordering::Relaxed), r.outbox.load(Ordering::Relaxed));
    let role = RoleInfo::of(&shared.leadership);
    if ready {
        let RoleInfo { role, leader } = role;
        return axum::Json(Readiness { ready, pbx_connected, outbox_writable, role, leader }).into_response();
    }
    let why: Vec<&str> =
        [(!pbx_connected, "the PBX is not connected"), (!outbox_writable, "the outbox does not accept writes")]
            .into_iter()
            .filter_map(|(bad, what)| bad.then_some(what))
            .collect();
    let error = ErrorDetail { code: ErrorCode::NotReady, message: why.join("; ") };
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(NotReady { error, ready, pbx_connected, outbox_writable, role: role.role, leader: role.leader }),
    )
        .into_response();
    response.extensions_mut().insert(Enveloped);
    response
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"),
))]
pub async fn metrics() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render()).into_response()
}

/// This document (OpenAPI 3.1), without a token.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "health", responses(
    (status = 200, description = "The OpenAPI 3.1 document of this API", body = Object, content_type = "application/json"),
))]
pub async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi::json()).into_response()
}

/// Bearer-token check for the protected routes.
#[derive(Clone)]
pub struct Auth {
    token: Arc<str>,
}

impl Auth {
    pub fn new(token: &str) -> Self {
        Auth { token: Arc::from(token) }
    }

    fn accepts(&self, header_value: Option<&str>) -> bool {
        let Some(v) = header_value else { return false };
        let Some(given) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")) else { return false };
        !self.token.is_empty() && constant_time_eq::constant_time_eq(given.trim().as_bytes(), self.token.as_bytes())
    }
}

pub async fn require_bearer(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    let value = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if auth.accepts(value) {
        next.run(req).await
    } else {
        ApiError::new(ErrorCode::Unauthorized, "missing or wrong bearer token (Authorization: Bearer <token>)")
            .into_response()
    }
}

/// A hot standby changes nothing: every request that could (any method
/// but GET and HEAD on the protected routes) is refused with `503
/// not_leader`, naming the leader as the standby last read it.
pub async fn require_leader(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let reads = matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    if reads || shared.leadership.leads() {
        return next.run(req).await;
    }
    let leader = match shared.leadership.role() {
        crate::ha::Role::Standby { leader: Some(l) } => match &l.advertise {
            Some(url) => format!("the leader is {} ({url})", l.node),
            None => format!("the leader is {}", l.node),
        },
        _ => "no instance holds the lease now".to_string(),
    };
    let me = shared.leadership.node().unwrap_or("this instance");
    ApiError::new(ErrorCode::NotLeader, format!("{me} is the standby of a hot-standby pair; {leader}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let a = Auth::new("s3cret");
        assert!(a.accepts(Some("Bearer s3cret")));
        assert!(!a.accepts(Some("Bearer s3cre")));
        assert!(!a.accepts(Some("Bearer s3cret2")));
        assert!(!a.accepts(Some("Basic s3cret")));
        assert!(!a.accepts(None));
        assert!(!Auth::new("").accepts(Some("Bearer ")));
    }
}
