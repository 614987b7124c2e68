//! The layers round every API router (tower-http): request tracing, a
//! request timeout, a body size limit, panics caught, and every error in
//! the envelope.
//!
//! Tracing records the method, the route (the path template, e.g.
//! `/v1/calls/{id}`, never the query or a header: the bearer token is never
//! logged), the status and the latency of each request: at `debug`, or
//! `warn` for a 5xx (`RUST_LOG=info,callbridge::api=debug` shows them all).

use super::error::{envelope, ApiError, ErrorCode};
use axum::extract::MatchedPath;
use axum::http::{Request, Response, StatusCode};
use axum::middleware::map_response;
use axum::Router;
use std::any::Any;
use std::time::Duration;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::{debug, error, warn, Span};

/// What one request may take (`[api]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLimits {
    /// A request not answered within this is abandoned: `503 request_timeout`.
    pub timeout: Duration,
    /// A larger body is refused: `413 payload_too_large`.
    pub max_body_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits { timeout: Duration::from_secs(60), max_body_bytes: 64 * 1024 }
    }
}

/// `router` with the layers; the last `layer` is the outermost, so tracing
/// sees the final status (after the envelope) and the whole latency.
pub fn harden(router: Router, limits: RequestLimits) -> Router {
    router
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, limits.timeout))
        .layer(CatchPanicLayer::custom(panicked))
        .layer(map_response(envelope))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(answered)
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
}

fn request_span<B>(req: &Request<B>) -> Span {
    let route = req.extensions().get::<MatchedPath>().map_or("(no route)", |m| m.as_str());
    tracing::info_span!("http", method = %req.method(), route = %route)
}

fn answered<B>(response: &Response<B>, latency: Duration, _span: &Span) {
    let status = response.status().as_u16();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    if response.status().is_server_error() {
        warn!(status, latency_ms, "HTTP request answered with a server error");
    } else {
        debug!(status, latency_ms, "HTTP request answered");
    }
}

fn panicked(panic: Box<dyn Any + Send + 'static>) -> Response<axum::body::Body> {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    error!(panic = what, "an API handler panicked; answered 500");
    axum::response::IntoResponse::into_response(ApiError::new(ErrorCode::InternalError, "internal error (logged)"))
}
