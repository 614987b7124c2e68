//! A Zammad on 127.0.0.1 as far as its Generic CTI endpoint goes, modelled
//! on Zammad's own code paths (zammad/zammad):
//!
//! - `app/controllers/integration/cti_controller.rb`: the token check (401
//!   `Invalid token, please contact your admin!`), `invalid_direction` (422
//!   `Invalid direction!`), `reject` → 200 `{"action":"reject","reason":"busy"}`;
//! - `app/models/cti/driver/base.rb`: direction check, then the blocked
//!   caller ids (an inbound `newCall` whose `from` is one of them is logged
//!   with the comment `reject, busy` and rejected), then `Cti::Log.process`,
//!   then on an inbound `answer` the screen of the answering agent, found by
//!   `answeringNumber` (known agents by number: `Cti::CallerId`'s numbers of
//!   users with `cti.agent`; else a user whose `phone` is exactly it), else
//!   `User.find_by(login: params[:user].downcase)` — an array raises
//!   `NoMethodError` → 500 —, else `user_id`;
//! - `app/models/cti/log.rb`: `newCall` of a known `callId` raises
//!   `call_id … already exists!`, `answer`/`hangup` of an unknown one raises
//!   `No such call_id …`; an `answer` after the `hangup` is ignored; a
//!   `hangup` of an inbound call still in `newCall` (not `forwarded`) is
//!   not done (a missed call to call back);
//! - `app/models/cti/caller_id.rb`: `extract_numbers` (runs of 6 to 26
//!   digits, spaces, `-`, `(`, `|`, `)`), `normalize_number` (`00` dropped,
//!   a leading `0` becomes 49);
//! - `app/controllers/application_controller/handles_errors.rb`: an
//!   exception is a JSON `{"error": …}` with 500 (422 for `ArgumentError`);
//!   `already exists` is humanized to `Object already exists!`; any other
//!   message is masked as `Error ID …: Please contact your administrator.`
//!   for a client that is not an admin (the CTI endpoint has no user), as
//!   current Zammad does. [`Zammad::unmasked`] gives the older releases'
//!   bare messages instead.
//!
//! Test hooks: forget a call right after its `newCall` (a pruned caller
//! log), answer a `newCall` only after a delay (its answer lost to the
//! client's timeout).
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A Zammad user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: u64,
    pub login: String,
    pub phone: String,
    /// Has the `cti.agent` permission.
    pub agent: bool,
}

/// One caller log entry (`Cti::Log`).
#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub direction: String,
    pub from: String,
    pub to: String,
    pub state: String,
    pub done: bool,
    pub to_comment: Option<String>,
    pub comment: Option<String>,
    pub queue: Option<String>,
}

/// Which lookup of `push_open_ticket_screen_recipient` found the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// `Cti::CallerId.known_agents_by_number(answeringNumber)`.
    KnownAgentNumber,
    /// `User.find_by(phone: answeringNumber, active: true)`.
    Phone,
    /// `User.find_by(login: user.downcase)`.
    Login,
    /// `User.find_by(id: user_id)`.
    UserId,
}

/// A ticket or customer screen pushed to an agent (`remote_task`).
#[derive(Debug, Clone, PartialEq)]
pub struct Screen {
    pub call_id: String,
    pub user: String,
    pub via: Lookup,
}

/// One request and Zammad's answer.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub at: Instant,
    pub path: String,
    pub params: Value,
    pub status: u16,
    pub answer: Value,
}

impl Exchange {
    pub fn event(&self) -> &str {
        self.params["event"].as_str().unwrap_or("")
    }
    pub fn call_id(&self) -> &str {
        self.params["callId"].as_str().or_else(|| self.params["call_id"].as_str()).unwrap_or("")
    }
}

#[derive(Default)]
struct Model {
    token: String,
    users: Vec<User>,
    block_caller_ids: Vec<String>,
    logs: HashMap<String, Log>,
    screens: Vec<Screen>,
    exchanges: Vec<Exchange>,
    /// Older Zammad: exception messages as they are.
    unmasked: bool,
    /// Calls whose log entry disappears right after their `newCall`.
    forget: HashSet<String>,
    /// Calls whose `newCall` is answered only after this long.
    slow_new_call: HashMap<String, Duration>,
}

/// An exception inside Zammad, and how it is rendered.
enum Raised {
    /// `RuntimeError` and friends: 500.
    Runtime(String),
    /// `ArgumentError`: 422.
    Argument(String),
}

/// The model, serving on 127.0.0.1.
pub struct Zammad {
    pub addr: SocketAddr,
    model: Arc<Mutex<Model>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Zammad {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<Model>) -> MutexGuard<'_, Model> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Zammad {
    /// Starts with the CTI token `token` and these users.
    pub async fn start(token: &str, users: Vec<User>) -> Zammad {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let model = Arc::new(Mutex::new(Model { token: token.into(), users, ..Model::default() }));
        let app = axum::Router::new()
            .route("/api/v1/cti/{token}", axum::routing::post(handle))
            .fallback(|| async { (StatusCode::NOT_FOUND, "No route matches").into_response() })
            .with_state(model.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Zammad { addr, model, task }
    }

    /// The lab's agents as Zammad users: maria and joao with their
    /// extension as phone (shorter than Zammad's caller-id index takes, so
    /// found by the exact phone), ana with a direct number written another
    /// way than callbridge sends it (found through the caller-id index),
    /// and a customer.
    pub async fn lab(token: &str) -> Zammad {
        let users = vec![
            User { id: 3, login: "maria@lab.example".into(), phone: "2000".into(), agent: true },
            User { id: 4, login: "joao@lab.example".into(), phone: "2001".into(), agent: true },
            User { id: 5, login: "ana@lab.example".into(), phone: "+55 (11) 3000-2002".into(), agent: true },
            User { id: 6, login: "cliente@example.com".into(), phone: "11987651101".into(), agent: false },
        ];
        Zammad::start(token, users).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Rejects inbound calls from `number` (Admin → CTI → blocked caller ids).
    pub fn block(&self, number: &str) {
        lock(&self.model).block_caller_ids.push(number.into());
    }

    /// Answers with the bare exception messages of older releases.
    pub fn unmasked(&self) {
        lock(&self.model).unmasked = true;
    }

    /// Drops `call`'s log entry right after its `newCall` was logged.
    pub fn forget_after_new_call(&self, call: &str) {
        lock(&self.model).forget.insert(call.into());
    }

    /// Answers `call`'s `newCall` (processed at once) only after `delay`.
    pub fn slow_new_call(&self, call: &str, delay: Duration) {
        lock(&self.model).slow_new_call.insert(call.into(), delay);
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.model).exchanges.clone()
    }

    pub fn screens(&self) -> Vec<Screen> {
        lock(&self.model).screens.clone()
    }

    pub fn log(&self, call: &str) -> Option<Log> {
        lock(&self.model).logs.get(call).cloned()
    }

    pub fn logs(&self) -> HashMap<String, Log> {
        lock(&self.model).logs.clone()
    }
}

async fn handle(State(model): State<Arc<Mutex<Model>>>, Path(token): Path<String>, body: Bytes) -> Response {
    let params: Value = serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
    let (status, answer, delay) = {
        let mut m = lock(&model);
        let (status, answer) = m.event(&token, &params);
        let call = call_id(&params);
        let delay = (params["event"] == "newCall").then(|| m.slow_new_call.remove(&call)).flatten();
        let path = format!("/api/v1/cti/{token}");
        m.exchanges.push(Exchange { at: Instant::now(), path, params, status, answer: answer.clone() });
        (status, answer, delay)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    (StatusCode::from_u16(status).expect("status"), axum::Json(answer)).into_response()
}

fn call_id(params: &Value) -> String {
    params["callId"].as_str().or_else(|| params["call_id"].as_str()).unwrap_or("").to_string()
}

/// `params[k].present?` for a string.
fn present<'a>(params: &'a Value, k: &str) -> Option<&'a Value> {
    match params.get(k) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(v) => Some(v),
    }
}

impl Model {
    /// `Integration::CtiController#event` with its `before_action`s.
    fn event(&mut self, token: &str, params: &Value) -> (u16, Value) {
        if token != self.token {
            return (401, json!({"error": "Invalid token, please contact your admin!"}));
        }
        match self.process(params) {
            Ok(Some("reject")) => (200, json!({"action": "reject", "reason": "busy"})),
            Ok(Some("invalid_direction")) => (422, json!({"error": "Invalid direction!"})),
            Ok(_) => (200, json!({})),
            Err(e) => self.render_error(e),
        }
    }

    /// `ApplicationController::HandlesErrors#humanize_error`.
    fn render_error(&self, e: Raised) -> (u16, Value) {
        let (status, message) = match e {
            Raised::Runtime(m) => (500, m),
            Raised::Argument(m) => (422, m),
        };
        if message.to_lowercase().contains("already exists") {
            return (status, json!({"error": "Object already exists!", "error_human": "Object already exists!"}));
        }
        if self.unmasked {
            return (status, json!({"error": message}));
        }
        let id: String = format!("{:x}", rand_id());
        (status, json!({"error": format!("Error ID {id}: Please contact your administrator.")}))
    }

    /// `Cti::Driver::Base#process`: the action, if any.
    fn process(&mut self, params: &Value) -> Result<Option<&'static str>, Raised> {
        let direction = params["direction"].as_str().unwrap_or("");
        if direction != "in" && direction != "out" {
            return Ok(Some("invalid_direction"));
        }
        let event = params["event"].as_str().unwrap_or("");
        if direction == "in" && event == "newCall" {
            let from = params["from"].as_str().unwrap_or("");
            if self.block_caller_ids.iter().any(|b| b == from) {
                let mut p = params.clone();
                p["comment"] = json!("reject, busy");
                self.log_process(&p)?;
                return Ok(Some("reject"));
            }
        }
        let logged = self.log_process(params)?;
        if logged && event == "answer" && direction == "in" {
            if let Some((user, via)) = self.recipient(params)? {
                if user.agent {
                    self.screens.push(Screen { call_id: call_id(params), user: user.login, via });
                }
            }
        }
        Ok(None)
    }

    /// `Cti::Log.process`; false when nothing was logged (an `answer` after
    /// the `hangup`).
    fn log_process(&mut self, params: &Value) -> Result<bool, Raised> {
        let call = call_id(params);
        let event = params["event"].as_str().unwrap_or("");
        let direction = params["direction"].as_str().unwrap_or("").to_string();
        // The driver sets `comment` for a rejected caller, but the log reads
        // `cause`.
        let cause = params["cause"].as_str().map(str::to_string);
        let user = match &params["user"] {
            Value::Array(a) => Some(a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")),
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        let queue = params["queue"].as_str().filter(|q| !q.is_empty()).map(str::to_string);
        match event {
            "newCall" => {
                if self.logs.contains_key(&call) {
                    return Err(Raised::Runtime(format!("call_id {call} already exists!")));
                }
                let to_comment = if direction == "in" { user.or_else(|| queue.clone()) } else { None };
                let log = Log {
                    from: params["from"].as_str().unwrap_or("").into(),
                    to: params["to"].as_str().unwrap_or("").into(),
                    state: "newCall".into(),
                    done: direction != "in",
                    to_comment,
                    comment: cause,
                    queue,
                    direction,
                };
                if self.forget.remove(&call) {
                    return Ok(true); // logged, and pruned at once
                }
                self.logs.insert(call, log);
                Ok(true)
            }
            "answer" => {
                let log = self.logs.get_mut(&call).ok_or_else(|| Raised::Runtime(format!("No such call_id {call}")))?;
                if log.state == "hangup" {
                    return Ok(false);
                }
                log.state = "answer".into();
                if user.is_some() {
                    log.to_comment = user;
                }
                log.done = true;
                log.comment = cause;
                Ok(true)
            }
            "hangup" => {
                let log = self.logs.get_mut(&call).ok_or_else(|| Raised::Runtime(format!("No such call_id {call}")))?;
                log.done = true;
                if direction == "in"
                    && ((log.state == "newCall" && cause.as_deref() != Some("forwarded"))
                        || log.to_comment.as_deref() == Some("voicemail"))
                {
                    log.done = false;
                }
                log.state = "hangup".into();
                log.comment = cause;
                Ok(true)
            }
            other => Err(Raised::Argument(format!("Unknown event {other:?}"))),
        }
    }

    /// `push_open_ticket_screen_recipient`, in its order.
    fn recipient(&self, params: &Value) -> Result<Option<(User, Lookup)>, Raised> {
        let mut found: Option<(User, Lookup)> = None;
        if let Some(number) = present(params, "answeringNumber").and_then(Value::as_str) {
            let wanted = extract_numbers(number);
            found = self
                .users
                .iter()
                .filter(|u| u.agent && extract_numbers(&u.phone).iter().any(|n| wanted.contains(n)))
                .max_by_key(|u| u.id)
                .map(|u| (u.clone(), Lookup::KnownAgentNumber));
            if found.is_none() {
                found = self.users.iter().find(|u| u.phone == number).map(|u| (u.clone(), Lookup::Phone));
            }
        }
        if found.is_none() {
            if let Some(user) = present(params, "user") {
                let Some(login) = user.as_str() else {
                    return Err(Raised::Runtime(format!("undefined method `downcase' for {user}:Array")));
                };
                let login = login.to_lowercase();
                found = self.users.iter().find(|u| u.login == login).map(|u| (u.clone(), Lookup::Login));
            }
        }
        if found.is_none() {
            if let Some(id) = present(params, "user_id") {
                let id = id.as_u64().or_else(|| id.as_str().and_then(|s| s.parse().ok()));
                found = self.users.iter().find(|u| Some(u.id) == id).map(|u| (u.clone(), Lookup::UserId));
            }
        }
        Ok(found)
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() & 0xffff_ffff
}

/// `Cti::CallerId.extract_numbers`: every run of 6 to 26 of `[\d\s\-(|)]`,
/// normalized.
pub fn extract_numbers(text: &str) -> Vec<String> {
    let allowed = |c: char| c.is_ascii_digit() || c.is_whitespace() || matches!(c, '-' | '(' | '|' | ')');
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !allowed(chars[i]) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && allowed(chars[j]) && j - i < 26 {
            j += 1;
        }
        if j - i >= 6 {
            out.push(normalize_number(&chars[i..j].iter().collect::<String>()));
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// `Cti::CallerId.normalize_number`.
pub fn normalize_number(number: &str) -> String {
    let mut n: String = number.chars().filter(|c| !c.is_whitespace() && *c != '-').collect();
    // `^(00)?(\+?\d\d)\(0?(\d*)\)` → `\1\2\3`
    let (zeros, rest) = n.strip_prefix("00").map_or(("", n.as_str()), |r| ("00", r));
    let rest_chars: Vec<char> = rest.chars().collect();
    if rest_chars.len() >= 3 && rest_chars[0].is_ascii_digit() && rest_chars[1].is_ascii_digit() && rest_chars[2] == '('
    {
        let inner: String = rest_chars[3..].iter().collect();
        let inner = inner.strip_prefix('0').unwrap_or(&inner);
        let digits: String = inner.chars().take_while(char::is_ascii_digit).collect();
        if inner[digits.len()..].starts_with(')') {
            let tail = &inner[digits.len() + 1..];
            n = format!("{zeros}{}{}{digits}{tail}", rest_chars[0], rest_chars[1]);
        }
    }
    let digits: String = n.chars().filter(char::is_ascii_digit).collect();
    if let Some(r) = digits.strip_prefix("00") {
        r.to_string()
    } else if let Some(r) = digits.strip_prefix('0') {
        format!("49{r}")
    } else {
        digits
    }
}
