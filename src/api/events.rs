//! `GET /v1/events`: lifecycle events as Server-Sent Events, each once it
//! is durable, in the order the sinks get them.
//!
//! Each event is `id: <event id>`, `event: <type>`, `data: <the CloudEvents
//! JSON the sinks get>`. A client that reconnects with `Last-Event-ID`
//! gets the events after that one from the feed's window ([`crate::feed`]);
//! when that event is no longer in it the stream starts with `event:
//! reset` (the client re-reads `/v1/calls`), then goes on live.
//!
//! A slow client never slows the pipeline or the other clients: each has a
//! task of its own that hands matching events from the feed to the
//! client's connection through a small bounded queue, waiting for the
//! client, never for the pipeline. A client's backlog is its position in
//! the feed, bounded by the window (`[api] events_window`): once the
//! client is a whole window behind it has lost events, and its connection
//! is closed at once (even when its socket is full and nothing is being
//! written) and counted (`callbridge_api_event_clients_dropped_total`); it
//! may reconnect with `Last-Event-ID` and gets `reset`. Comments keep idle
//! streams alive through proxies.

use super::error::{ApiError, ErrorCode, Query};
use super::server::CloseConnection;
use crate::event::{Event, EventKind};
use crate::feed::{Feed, FeedEvent};
use crate::state::Shared;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::StreamExt;
use serde::Deserialize;
use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use utoipa::IntoParams;

/// A comment this often keeps an idle stream open through proxies.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events copied from the feed per lock.
const SLICE: usize = 256;
/// Events handed to a client's connection ahead of what it has sent; the
/// rest of its backlog stays in the feed (shared), as a position.
const CLIENT_QUEUE: usize = 64;

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only calls of this group and events of its agents (`group_not_found` otherwise).
    group: Option<String>,
    /// Only calls this agent was offered or had, and the agent's own events
    /// (`agent_unknown` otherwise).
    agent: Option<String>,
    /// Only these event types, comma-separated (e.g. `call.started,call.ended`;
    /// `bad_type` otherwise).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    types: Option<String>,
}

/// Which events a client wants.
#[derive(Debug, Default)]
struct Filter {
    /// The group, and its agents (for agent events).
    group: Option<(String, HashSet<String>)>,
    agent: Option<String>,
    types: Option<HashSet<&'static str>>,
}

impl Filter {
    fn matches(&self, e: &Event) -> bool {
        if self.types.as_ref().is_some_and(|t| !t.contains(e.kind.type_name())) {
            return false;
        }
        if let Some((group, agents)) = &self.group {
            let ok = match (&e.call, agent_of(&e.kind)) {
                (Some(c), _) => c.group.as_ref().is_some_and(|g| g.as_str() == group),
                (None, Some(a)) => agents.contains(a),
                (None, None) => false,
            };
            if !ok {
                return false;
            }
        }
        if let Some(agent) = &self.agent {
            let of_call = e.call.as_ref().and_then(|c| c.agent.as_ref()).is_some_and(|a| a.as_str() == agent);
            return of_call || agent_of(&e.kind) == Some(agent.as_str()) || transfer_to(&e.kind) == Some(agent);
        }
        true
    }
}

/// The agent an event is about, besides the call's own.
fn agent_of(kind: &EventKind) -> Option<&str> {
    match kind {
        EventKind::Offered { agent, .. }
        | EventKind::OfferEnded { agent, .. }
        | EventKind::AgentAvailability { agent, .. }
        | EventKind::AgentLine { agent, .. } => Some(agent.as_str()),
        EventKind::Answered { agent, .. } => agent.as_ref().map(|a| a.as_str()),
        EventKind::Transferred { from_agent, .. } => from_agent.as_ref().map(|a| a.as_str()),
        _ => None,
    }
}

fn transfer_to(kind: &EventKind) -> Option<&str> {
    match kind {
        EventKind::Transferred { to_agent: Some(a), .. } => Some(a.as_str()),
        _ => None,
    }
}

fn filter_of(shared: &Shared, q: &EventsQuery) -> Result<Filter, ApiError> {
    let dir = shared.directory();
    let mut filter = Filter::default();
    if let Some(g) = &q.group {
        let group = dir.group(g).ok_or_else(|| ApiError::new(ErrorCode::GroupNotFound, format!("no group {g:?}")))?;
        let agents = group.agents.iter().map(|a| a.as_str().to_string()).collect();
        filter.group = Some((g.clone(), agents));
    }
    if let Some(a) = &q.agent {
        if dir.agent(a).is_none() {
            return Err(ApiError::new(ErrorCode::AgentUnknown, format!("no agent {a:?} in the configuration")));
        }
        filter.agent = Some(a.clone());
    }
    if let Some(list) = &q.types {
        let mut types = HashSet::new();
        for t in list.split(',').map(str::trim) {
            let Some(known) = EventKind::TYPE_NAMES.iter().find(|n| **n == t) else {
                return Err(ApiError::new(
                    ErrorCode::BadType,
                    format!("unknown event type {t:?}: use {}", EventKind::TYPE_NAMES.join(", ")),
                ));
            };
            types.insert(*known);
        }
        filter.types = Some(types);
    }
    Ok(filter)
}

/// Lifecycle events as they become durable (Server-Sent Events).
///
/// Each event: `id` the event id, `event` its type, `data` the CloudEvents
/// JSON the sinks get. With `Last-Event-ID`, the events after that one
/// first (from the last `[api] events_window` events); if it is older, an
/// `event: reset` first: re-read `/v1/calls`. A client that falls a whole
/// window behind is disconnected.
#[utoipa::path(get, path = "/v1/events", tag = "calls", params(
    EventsQuery,
    ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
), responses(
    (status = 200, description = "The stream (`text/event-stream`)", body = String, content_type = "text/event-stream"),
))]
pub async fn events(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
    close: Option<Extension<CloseConnection>>,
) -> Result<Response, ApiError> {
    let filter = filter_of(&shared, &q)?;
    let last_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::trim).filter(|s| !s.is_empty());
    let feed = shared.feed.clone();
    let start = feed.start(last_id);
    let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
    tokio::spawn(forward(feed.clone(), filter, start.after, tx, close.map(|Extension(c)| c)));
    let reset = start.reset.then(|| {
        Ok(SseEvent::default().event("reset").data(
            r#"{"reason":"the events after Last-Event-ID are no longer kept: re-read /v1/calls","calls":"/v1/calls"}"#,
        ))
    });
    let pbx: Arc<str> = Arc::from(feed.settings().pbx.as_str());
    let live = futures::stream::unfold(rx, move |mut rx| {
        let pbx = pbx.clone();
        async move {
            let e = rx.recv().await?;
            Some((Ok::<_, Infallible>(to_sse(&e, &pbx)), rx))
        }
    });
    let stream = futures::stream::iter(reset).chain(live);
    let mut response = Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response();
    // nginx and the like would otherwise hold events back in their buffers.
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

fn to_sse(e: &FeedEvent, pbx: &str) -> SseEvent {
    SseEvent::default().id(e.id(pbx)).event(e.event.kind.type_name()).data(e.json(pbx))
}

/// One connected client, for `callbridge_api_event_clients`.
struct Connected;

impl Connected {
    fn new() -> Connected {
        metrics::gauge!("callbridge_api_event_clients").increment(1.0);
        Connected
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        metrics::gauge!("callbridge_api_event_clients").decrement(1.0);
    }
}

/// Hands the client's events from the feed to its connection, waiting for
/// the client as long as it is less than the feed's window behind, until
/// the client goes or the feed closes.
async fn forward(
    feed: Arc<Feed>,
    filter: Filter,
    mut after: u64,
    tx: mpsc::Sender<Arc<FeedEvent>>,
    close: Option<CloseConnection>,
) {
    let _connected = Connected::new();
    let mut newest = feed.watch();
    loop {
        newest.borrow_and_update();
        let Ok(slice) = feed.since(after, SLICE) else {
            return drop_slow(close.as_ref());
        };
        if slice.is_empty() {
            tokio::select! {
                changed = newest.changed() => if changed.is_err() { return },
                _ = tx.closed() => {
                    debug!("event stream client went away");
                    return;
                }
                _ = feed.closed() => return,
            }
            continue;
        }
        for e in slice {
            if filter.matches(&e.event) {
                // Room in the client's queue, or the window moves past it.
                let permit = loop {
                    tokio::select! {
                        biased;
                        permit = tx.reserve() => match permit {
                            Ok(p) => break p,
                            Err(_) => return,
                        },
                        changed = newest.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            if feed.lapsed(e.position) {
                                return drop_slow(close.as_ref());
                            }
                        }
                        _ = feed.closed() => return,
                    }
                };
                after = e.position;
                permit.send(e);
            } else {
                after = e.position;
            }
        }
    }
}

fn drop_slow(close: Option<&CloseConnection>) {
    metrics::counter!("callbridge_api_event_clients_dropped_total").increment(1);
    warn!("event stream client a whole [api] events_window behind; disconnected (it may reconnect with Last-Event-ID)");
    if let Some(c) = close {
        c.now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{AvailabilitySource, CallSnapshot, CallState, Direction, Party};
    use crate::ids::{AgentId, CallId, GroupId};

    fn call_event(group: &str, agent: Option<&str>) -> Event {
        Event {
            seq: 1,
            time: 0,
            kind: EventKind::Started {},
            call: Some(std::sync::Arc::new(CallSnapshot {
                id: CallId::new("1.1"),
                direction: Direction::Inbound,
                state: CallState::Started,
                caller: Party::default(),
                callee: Party::default(),
                group: Some(GroupId::new(group)),
                queue: None,
                agent: agent.map(AgentId::new),
                ticket_id: None,
                started_at: 0,
                answered_at: None,
                ended_at: None,
                recording: None,
                routing: None,
                caller_lookup: None,
            })),
        }
    }

    fn availability(agent: &str) -> Event {
        Event {
            seq: 0,
            time: 0,
            kind: EventKind::AgentAvailability {
                agent: AgentId::new(agent),
                available: false,
                reason: None,
                source: AvailabilitySource::Api,
            },
            call: None,
        }
    }

    #[test]
    fn filters_select_by_group_agent_and_type() {
        let support = Filter {
            group: Some(("support".into(), ["maria".to_string()].into_iter().collect())),
            ..Filter::default()
        };
        assert!(support.matches(&call_event("support", None)));
        assert!(!support.matches(&call_event("sales", None)));
        assert!(support.matches(&availability("maria")));
        assert!(!support.matches(&availability("ana")));
        let maria = Filter { agent: Some("maria".into()), ..Filter::default() };
        assert!(maria.matches(&call_event("sales", Some("maria"))));
        assert!(!maria.matches(&call_event("sales", None)));
        assert!(maria.matches(&availability("maria")));
        let ended = Filter { types: Some(["call.ended"].into_iter().collect()), ..Filter::default() };
        assert!(!ended.matches(&call_event("support", None)));
        assert!(Filter::default().matches(&availability("ana")));
    }
}
