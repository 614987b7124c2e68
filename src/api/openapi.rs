//! The OpenAPI 3.1 document of the HTTP API, served at `/v1/openapi.json`
//! and checked in as `docs/openapi.json`.
//!
//! Generated from the code: the paths, parameters and bodies from the
//! handlers' `#[utoipa::path]` and the types' `ToSchema`, collected by the
//! same route lists the router is built from ([`super::routes`]). Added
//! here from the router's structure: the bearer requirement on every
//! protected route, and each operation's error responses, grouped by status
//! with one example per [`ErrorCode`] — the codes every route can answer
//! (below) plus the refusals of its handler ([`REFUSALS`]).

use super::error::{ErrorBody, ErrorCode, ErrorDetail};
use super::routes::{open_routes, protected_routes};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use utoipa::openapi::example::Example;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::Response;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr};

/// The name of the bearer security scheme.
const BEARER: &str = "bearer";

/// What each handler refuses with, besides what every route can answer;
/// keyed by operation id (the handler's name). A test checks that every
/// operation has an entry and every entry an operation.
pub const REFUSALS: &[(&str, &[ErrorCode])] = {
    use ErrorCode::*;
    const PBX: [ErrorCode; 6] = [PbxNotConfigured, PbxNotConnected, PbxRejected, PbxTimeout, PbxBusy, InvalidAction];
    &[
        ("healthz", &[]),
        ("readyz", &[]),
        ("metrics", &[]),
        ("openapi_json", &[]),
        ("ui", &[]),
        ("list_calls", &[BadState, BadLimit, BadCursor]),
        ("get_call", &[CallNotFound]),
        ("events", &[GroupNotFound, AgentUnknown, BadType]),
        ("remove_call", &[CallNotLive, ShuttingDown, NotLeader]),
        (
            "click_to_call",
            &[
                ContactNotConsented,
                NumberMissing,
                NumberMalformed,
                TicketMalformed,
                AgentUnknown,
                AgentHasNoExtension,
                AgentBusy,
                ClickToCallNotConfigured,
                PBX[0],
                PBX[1],
                PBX[2],
                PBX[3],
                PBX[4],
                PBX[5],
                ShuttingDown,
                NotLeader,
            ],
        ),
        (
            "transfer",
            &[
                CallNotFound,
                CallEnded,
                CallNotAnswered,
                CallHasNoGroup,
                TransferNotAllowed,
                TargetMissing,
                TargetAmbiguous,
                TargetNotInGroup,
                TargetIsCurrentAgent,
                AgentUnknown,
                AgentHasNoExtension,
                PBX[0],
                PBX[1],
                PBX[2],
                PBX[3],
                PBX[4],
                PBX[5],
                ShuttingDown,
                NotLeader,
            ],
        ),
        ("list_agents", &[]),
        ("set_availability", &[ReasonMalformed, AgentUnknown, ShuttingDown, NotLeader]),
        ("indicators", &[GroupNotFound]),
        ("dead_letters", &[NoOutbox, OutboxUnavailable]),
        ("retry_dead_letter", &[NoOutbox, SinkNotFound, DeadLetterNotFound, OutboxUnavailable, NotLeader]),
    ]
};

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "callbridge",
        description = "Live calls, group indicators, dead letters and control (click-to-call, transfer, \
            agent availability) of a callbridge daemon. Every error is `{\"error\": {\"code\", \"message\"}}` \
            with a stable `code` (schema `ErrorCode`); unknown routes answer `404 not_found`, a known route \
            with another method `405 method_not_allowed`.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode)),
    tags(
        (name = "health", description = "Liveness, readiness, metrics and this document: no token"),
        (name = "calls", description = "Live calls, calls ended within retention, and the event stream"),
        (name = "groups", description = "Group indicators"),
        (name = "control", description = "Agents, click-to-call, transfer, availability"),
        (name = "dead letters", description = "Events a sink refused for good"),
        (name = "monitor", description = "The live monitor page: no token (the page asks for one)"),
    ),
)]
struct Base;

/// The document, built from the route lists.
pub fn document() -> OpenApi {
    let mut doc = <Base as utoipa::OpenApi>::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut protected = protected_routes().into_openapi();
    for item in protected.paths.paths.values_mut() {
        for (_, op) in operations(item) {
            op.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
        }
    }
    doc.merge(open_routes().into_openapi());
    doc.merge(protected);
    let mut bearer = Http::new(HttpAuthScheme::Bearer);
    bearer.description = Some("`Authorization: Bearer <token>`: the token of `[api]`".into());
    doc.components.get_or_insert_with(Default::default).add_security_scheme(BEARER, SecurityScheme::Http(bearer));
    for item in doc.paths.paths.values_mut() {
        for (_, op) in operations(item) {
            add_error_responses(op);
        }
    }
    doc
}

/// The document as served (pretty JSON), built once.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| document().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")))
}

/// The operations of a path, with their method.
pub fn operations(item: &mut PathItem) -> impl Iterator<Item = (&'static str, &mut Operation)> {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("patch", &mut item.patch),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("trace", &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(method, op)| op.as_mut().map(|op| (method, op)))
}

/// The codes `op` can answer: the common ones, then its handler's.
fn error_codes(op: &Operation) -> Vec<ErrorCode> {
    use ErrorCode::*;
    let mut codes = vec![PayloadTooLarge, RequestTimeout, InternalError];
    if op.security.is_some() {
        codes.extend([Unauthorized, BadQuery]);
    }
    let params = op.parameters.iter().flatten();
    if params
        .filter_map(|p| if let RefOr::T(p) = p { Some(p) } else { None })
        .any(|p| matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Path))
    {
        codes.extend([BadPath, NotFound]);
    }
    if op.request_body.is_some() {
        codes.extend([MalformedJson, BadRequest, UnsupportedMediaType]);
    }
    let id = op.operation_id.as_deref().unwrap_or_default();
    codes.extend(REFUSALS.iter().filter(|(name, _)| *name == id).flat_map(|(_, c)| c.iter().copied()));
    codes
}

/// One response per error status `op` can answer, unless `op` documents
/// that status itself (`/readyz`'s 503).
fn add_error_responses(op: &mut Operation) {
    let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = BTreeMap::new();
    for code in error_codes(op) {
        let codes = by_status.entry(code.status().as_u16()).or_default();
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    for (status, codes) in by_status {
        let key = status.to_string();
        if op.responses.responses.contains_key(&key) {
            continue;
        }
        let description: String = codes.iter().map(|c| format!("- `{}`: {}\n", c.as_str(), c.meaning())).collect();
        let examples = codes.iter().map(|c| {
            let body = serde_json::json!({"error": {"code": c.as_str(), "message": c.meaning()}});
            (c.as_str(), Example::builder().summary(c.meaning()).value(Some(body)).build())
        });
        let content = Content::builder().schema(Some(Ref::from_schema_name("ErrorBody"))).examples_from_iter(examples);
        let response =
            Response::builder().description(description.trim_end()).content("application/json", content.build());
        op.responses.responses.insert(key, RefOr::T(response.build()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_its_refusals_listed_and_no_more() {
        let mut doc = document();
        let mut ids: Vec<String> = doc
            .paths
            .paths
            .values_mut()
            .flat_map(|item| {
                operations(item).map(|(_, op)| op.operation_id.clone().unwrap_or_default()).collect::<Vec<_>>()
            })
            .collect();
        ids.sort();
        let mut listed: Vec<String> = REFUSALS.iter().map(|(id, _)| id.to_string()).collect();
        listed.sort();
        assert_eq!(ids, listed, "REFUSALS must name exactly the operations");
    }

    #[test]
    fn protected_operations_need_the_token_and_open_ones_do_not() {
        let doc: serde_json::Value = serde_json::from_str(json()).expect("JSON");
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("item") {
                let open = ["/healthz", "/readyz", "/metrics", "/v1/openapi.json", "/ui"].contains(&path.as_str());
                assert_eq!(op.get("security").is_none(), open, "{method} {path}");
                assert_eq!(op["responses"].get("401").is_none(), open, "{method} {path}");
            }
        }
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
