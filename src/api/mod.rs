//! The HTTP API (axum): health and readiness, Prometheus metrics, calls,
//! indicators, control actions and dead letters (SPEC §8).
//!
//! JSON everywhere; errors are `{"error": {"code": "...", "message": "..."}}`
//! with a stable `code`. Every route but `/healthz`, `/readyz` and `/metrics`
//! needs `Authorization: Bearer <token>`, compared in constant time.
//!
//! The API never changes call state itself: reads come from the registry,
//! changes go to the pipeline task or the PBX as commands.

pub mod actions;
pub mod routes;
pub mod server;

use crate::state::Readiness;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// An API error: HTTP status, stable code, human message.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl From<crate::control::Refusal> for ApiError {
    fn from(r: crate::control::Refusal) -> Self {
        ApiError {
            status: StatusCode::from_u16(r.status).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
            code: r.code,
            message: r.message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

pub async fn readyz(State(r): State<Arc<Readiness>>) -> Response {
    let body = serde_json::json!({
        "ready": r.is_ready(),
        "pbx_connected": r.pbx.load(Ordering::Relaxed),
        "outbox_writable": r.outbox.load(Ordering::Relaxed),
    });
    let status = if r.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

pub async fn metrics() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render()).into_response()
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
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token (Authorization: Bearer <token>)",
        )
        .into_response();
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        r
    }
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
