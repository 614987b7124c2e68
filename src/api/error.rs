//! The API's one error envelope, `{"error": {"code", "message"}}`, and its
//! codes.
//!
//! Every code is an [`ErrorCode`] with one HTTP status; a handler names
//! the code and the status follows. The extractors here ([`Json`],
//! [`Query`], [`Path`]) turn axum's own rejections into the envelope, and
//! [`envelope`] (a layer round the whole router) rewrites whatever error
//! still comes out without it — 404 on unknown routes, 405, a body over the
//! limit refused before any handler ran, the request timeout, a panic.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::borrow::Cow;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;

macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, $status:ident, $what:literal;)*) => {
        /// A stable error code of the API; each has one HTTP status.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in the order of the table in the README.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code as clients see it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }

            /// The HTTP status the API answers with.
            pub fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)*
                }
            }

            /// What the code means, for the OpenAPI document and the README.
            pub fn meaning(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $what,)*
                }
            }
        }
    };
}

error_codes! {
    // The request itself: authentication, routing and shape.
    Unauthorized = "unauthorized", UNAUTHORIZED, "missing or wrong `Authorization: Bearer <token>`";
    NotFound = "not_found", NOT_FOUND, "no such endpoint (unknown path, or a path segment missing)";
    MethodNotAllowed = "method_not_allowed", METHOD_NOT_ALLOWED, "the endpoint exists but not with this method (`Allow` lists those it has)";
    BadQuery = "bad_query", BAD_REQUEST, "the query string does not parse: an unknown parameter, a repeated or malformed one";
    BadPath = "bad_path", BAD_REQUEST, "a path segment is not valid (e.g. not UTF-8 once percent-decoded)";
    MalformedJson = "malformed_json", BAD_REQUEST, "the body is not JSON (syntax error, or empty)";
    BadRequest = "bad_request", BAD_REQUEST, "the JSON body does not fit the endpoint: a missing or unknown field, or a value of the wrong type";
    UnsupportedMediaType = "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE, "a body without `Content-Type: application/json`";
    PayloadTooLarge = "payload_too_large", PAYLOAD_TOO_LARGE, "the body is larger than `[api] max_body_bytes`";
    RequestTimeout = "request_timeout", SERVICE_UNAVAILABLE, "no answer within `[api] request_timeout_seconds`; an action may still have reached the PBX";
    InternalError = "internal_error", INTERNAL_SERVER_ERROR, "a bug in callbridge (logged)";
    ShuttingDown = "shutting_down", SERVICE_UNAVAILABLE, "callbridge is stopping";
    NotReady = "not_ready", SERVICE_UNAVAILABLE, "`/readyz`: the PBX is not connected or the outbox does not accept writes";
    NotLeader = "not_leader", SERVICE_UNAVAILABLE, "this instance is a hot standby: only the leader changes anything (the message names it)";
    // Calls.
    BadState = "bad_state", BAD_REQUEST, "`state` is not one of started, queued, ringing, talking";
    BadLimit = "bad_limit", BAD_REQUEST, "`limit` is not a whole number from 1 to 1000";
    BadCursor = "bad_cursor", BAD_REQUEST, "`cursor` is not a `next_cursor` this API returned";
    CallNotFound = "call_not_found", NOT_FOUND, "no live call, and no call ended within retention, with this id";
    CallNotLive = "call_not_live", NOT_FOUND, "no live call with this id";
    CallEnded = "call_ended", CONFLICT, "the call has ended";
    CallNotAnswered = "call_not_answered", CONFLICT, "no agent is talking on the call";
    CallHasNoGroup = "call_has_no_group", CONFLICT, "the call belongs to no configured group, so no group allows its transfer";
    GroupNotFound = "group_not_found", NOT_FOUND, "no group with this id";
    BadType = "bad_type", BAD_REQUEST, "`type` names an event type callbridge does not emit";
    // Control: click-to-call, transfer, availability.
    ContactNotConsented = "contact_not_consented", FORBIDDEN, "the contact has not consented to be called (`contact.consent`)";
    NumberMissing = "number_missing", UNPROCESSABLE_ENTITY, "no phone number to dial";
    NumberMalformed = "number_malformed", UNPROCESSABLE_ENTITY, "the number has characters or a length no phone number has";
    TicketMalformed = "ticket_malformed", UNPROCESSABLE_ENTITY, "the ticket id has control characters";
    ReasonMalformed = "reason_malformed", UNPROCESSABLE_ENTITY, "the availability reason has control characters";
    AgentUnknown = "agent_unknown", NOT_FOUND, "no agent with this id in the configuration";
    AgentHasNoExtension = "agent_has_no_extension", CONFLICT, "the agent has no extension";
    AgentBusy = "agent_busy", CONFLICT, "the agent is on a call";
    TargetMissing = "target_missing", UNPROCESSABLE_ENTITY, "a transfer needs `to_agent` or `to_extension`";
    TargetAmbiguous = "target_ambiguous", UNPROCESSABLE_ENTITY, "a transfer takes `to_agent` or `to_extension`, not both";
    TargetNotInGroup = "target_not_in_group", CONFLICT, "the transfer target is no agent of the call's group";
    TargetIsCurrentAgent = "target_is_current_agent", CONFLICT, "the transfer target already has the call";
    TransferNotAllowed = "transfer_not_allowed", CONFLICT, "the call's group does not allow transfers (`allow_transfer`)";
    ClickToCallNotConfigured = "click_to_call_not_configured", SERVICE_UNAVAILABLE, "click-to-call needs `[outbound] context`";
    NotAMember = "not_a_member", CONFLICT, "per queue in an availability answer: the queue does not list the agent";
    // The PBX.
    PbxNotConfigured = "pbx_not_configured", SERVICE_UNAVAILABLE, "no AMI connection is configured";
    PbxNotConnected = "pbx_not_connected", SERVICE_UNAVAILABLE, "the AMI connection is down";
    PbxRejected = "pbx_rejected", BAD_GATEWAY, "the PBX refused the action (its message follows)";
    PbxTimeout = "pbx_timeout", GATEWAY_TIMEOUT, "the PBX did not answer the action in `action_timeout_seconds`";
    PbxBusy = "pbx_busy", SERVICE_UNAVAILABLE, "too many AMI actions in flight";
    InvalidAction = "invalid_action", UNPROCESSABLE_ENTITY, "the action cannot be sent (a value AMI cannot carry)";
    // Dead letters.
    NoOutbox = "no_outbox", NOT_FOUND, "no durable outbox is configured (only stdout), so nothing is ever parked";
    SinkNotFound = "sink_not_found", NOT_FOUND, "no sink with this name";
    DeadLetterNotFound = "dead_letter_not_found", NOT_FOUND, "no dead letter for this event id";
    OutboxUnavailable = "outbox_unavailable", SERVICE_UNAVAILABLE, "the outbox cannot be read or written now";
}

impl ErrorCode {
    /// The code of an error response some layer produced without the
    /// envelope (only its status is known).
    fn of_bare_status(status: StatusCode) -> ErrorCode {
        match status {
            StatusCode::NOT_FOUND => ErrorCode::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
            // The timeout layer answers 503 (nothing else does bare).
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
            s if s.is_client_error() => ErrorCode::BadRequest,
            _ => ErrorCode::InternalError,
        }
    }

    /// The message of an error some layer produced without the envelope.
    fn bare_message(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "no such endpoint",
            ErrorCode::MethodNotAllowed => "method not allowed on this endpoint (see the Allow header)",
            ErrorCode::PayloadTooLarge => "request body too large",
            ErrorCode::RequestTimeout => "the request took too long and was abandoned",
            ErrorCode::InternalError => "internal error (logged)",
            other => other.meaning(),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        let table: String = ErrorCode::ALL
            .iter()
            .map(|c| format!("\n- `{}` ({}): {}", c.as_str(), c.status().as_u16(), c.meaning()))
            .collect();
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(format!("A stable error code; its HTTP status and meaning:{table}")))
            .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
            .into()
    }
}

impl utoipa::ToSchema for ErrorCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ErrorCode")
    }
}

/// The body of every error: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable code and a message for a person.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    /// For a person; may change between versions (match on `code`).
    pub message: String,
}

/// An API error: a stable code (which gives the HTTP status) and a message.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// Marks a response as already in the envelope (see [`envelope`]).
#[derive(Debug, Clone, Copy)]
pub struct Enveloped;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn detail(&self) -> ErrorDetail {
        ErrorDetail { code: self.code, message: self.message.clone() }
    }

    pub fn stopping() -> Self {
        ApiError::new(ErrorCode::ShuttingDown, "callbridge is stopping")
    }
}

impl From<crate::control::Refusal> for ApiError {
    fn from(r: crate::control::Refusal) -> Self {
        use crate::control::Refused;
        let code = match r.reason {
            Refused::ContactNotConsented => ErrorCode::ContactNotConsented,
            Refused::NumberMissing => ErrorCode::NumberMissing,
            Refused::NumberMalformed => ErrorCode::NumberMalformed,
            Refused::TicketMalformed => ErrorCode::TicketMalformed,
            Refused::AgentUnknown => ErrorCode::AgentUnknown,
            Refused::AgentHasNoExtension => ErrorCode::AgentHasNoExtension,
            Refused::AgentBusy => ErrorCode::AgentBusy,
            Refused::TargetMissing => ErrorCode::TargetMissing,
            Refused::TargetAmbiguous => ErrorCode::TargetAmbiguous,
            Refused::TargetNotInGroup => ErrorCode::TargetNotInGroup,
            Refused::TargetIsCurrentAgent => ErrorCode::TargetIsCurrentAgent,
            Refused::CallNotAnswered => ErrorCode::CallNotAnswered,
            Refused::CallHasNoGroup => ErrorCode::CallHasNoGroup,
            Refused::TransferNotAllowed => ErrorCode::TransferNotAllowed,
        };
        ApiError { code, message: r.message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(ErrorBody { error: self.detail() })).into_response();
        response.extensions_mut().insert(Enveloped);
        if self.code == ErrorCode::Unauthorized {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let code = match &r {
            JsonRejection::JsonDataError(_) => ErrorCode::BadRequest,
            JsonRejection::JsonSyntaxError(_) => ErrorCode::MalformedJson,
            JsonRejection::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            _ => ErrorCode::BadRequest,
        };
        ApiError::new(code, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::new(ErrorCode::BadQuery, r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        match r {
            PathRejection::FailedToDeserializePathParams(e) => ApiError::new(ErrorCode::BadPath, e.body_text()),
            // A handler asking for parameters its route has not: a bug.
            other => ApiError::new(ErrorCode::InternalError, other.body_text()),
        }
    }
}

/// `axum::Json` whose rejections are the envelope.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(Json(value))
    }
}

/// `axum::extract::Query` whose rejections are the envelope.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(value) = axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Query(value))
    }
}

/// `axum::extract::Path` whose rejections are the envelope. An empty
/// segment where a parameter goes (`/v1/calls//transfer`) is a missing
/// segment: `404 not_found`, as for a path that lacks it altogether.
#[derive(Debug, Clone, Copy, Default)]
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let raw = axum::extract::RawPathParams::from_request_parts(parts, state).await.map_err(|e| {
            use axum::extract::rejection::RawPathParamsRejection as R;
            let code =
                if matches!(e, R::InvalidUtf8InPathParam(_)) { ErrorCode::BadPath } else { ErrorCode::InternalError };
            ApiError::new(code, e.body_text())
        })?;
        if let Some((name, _)) = raw.iter().find(|(_, value)| value.is_empty()) {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no such endpoint: the path segment {{{name}}} is empty"),
            ));
        }
        let axum::extract::Path(value) = axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Path(value))
    }
}

/// The query of an endpoint that takes no parameters: any parameter is
/// refused (`bad_query`), as on the endpoints that take some.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

/// Answer of routes that do not exist.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, ErrorCode::NotFound.bare_message())
}

/// Puts an error response that some layer produced without the envelope
/// (405, a body over the limit refused up front, the request timeout, a
/// panic) in it, keeping its headers (`Allow` on a 405).
pub async fn envelope(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || response.extensions().get::<Enveloped>().is_some() {
        return response;
    }
    let code = ErrorCode::of_bare_status(status);
    let (parts, _) = response.into_parts();
    let mut fresh = ApiError::new(code, code.bare_message()).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_LENGTH && name != header::CONTENT_TYPE && !fresh.headers().contains_key(name) {
            fresh.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_errors() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{} twice", c.as_str());
            assert!(c.as_str().chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'), "{}", c.as_str());
            assert!(c.status().is_client_error() || c.status().is_server_error(), "{c:?}");
            assert_eq!(serde_json::to_value(c).ok(), Some(serde_json::Value::from(c.as_str())));
        }
    }

    #[test]
    fn every_control_refusal_has_a_code() {
        for r in crate::control::Refused::ALL {
            let e = ApiError::from(crate::control::Refusal { reason: r, message: String::new() });
            assert!(e.status().is_client_error(), "{r:?} → {:?}", e.code);
        }
    }

    #[test]
    fn bare_statuses_map_to_codes() {
        assert_eq!(ErrorCode::of_bare_status(StatusCode::METHOD_NOT_ALLOWED), ErrorCode::MethodNotAllowed);
        assert_eq!(ErrorCode::of_bare_status(StatusCode::SERVICE_UNAVAILABLE), ErrorCode::RequestTimeout);
        assert_eq!(ErrorCode::of_bare_status(StatusCode::INTERNAL_SERVER_ERROR), ErrorCode::InternalError);
        assert_eq!(ErrorCode::of_bare_status(StatusCode::IM_A_TEAPOT), ErrorCode::BadRequest);
    }
}
