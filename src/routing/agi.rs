//! The FastAGI endpoint (SPEC §8): the dialplan asks callbridge where to
//! route a call before queueing it.
//!
//! ```text
//! exten => s,n,AGI(agi://127.0.0.1:4573/route?queue=700)    ; or ?group=support
//! ```
//!
//! # Protocol, as Asterisk speaks it
//!
//! Asterisk connects and sends its environment block, `agi_<name>: <value>`
//! lines ended by an empty line (`agi_network: yes`, `agi_network_script:
//! route?queue=700`, `agi_request: agi://127.0.0.1:4573/route?queue=700`,
//! `agi_channel`, `agi_uniqueid`, …, `agi_arg_1`…). The script then sends
//! commands, one line each, and reads one reply each (`200 result=1`).
//! When the channel hangs up meanwhile, Asterisk sends an unsolicited
//! `HANGUP` line; variables can still be set on the dead channel (for the
//! `h` extension). When the script closes the connection, `AGI()` returns
//! with `AGISTATUS=SUCCESS` and the dialplan continues.
//!
//! # What callbridge answers
//!
//! The request names a PBX queue (`?queue=700`) or a helpdesk group
//! (`?group=support`), in the query string or as an argument
//! (`AGI(agi://…/route,queue=700)`). callbridge works out the route with
//! [`RouteOracle::decide`] (hours, holidays, availability, overflow, then
//! who is calling: the caller lookup and the redirects of the group that
//! would take the call) and sets, with `SET VARIABLE`, always all eleven of:
//!
//! | variable | value |
//! | --- | --- |
//! | `CALLBRIDGE_ROUTE` | `queue`, `missed`, or empty when the request could not be answered |
//! | `CALLBRIDGE_QUEUE` | the queue to use (route `queue`) |
//! | `CALLBRIDGE_GROUP` | the group it goes to (`queue`) or is missed for (`missed`) |
//! | `CALLBRIDGE_REASON` | `holiday`, `outside_hours` or `no_agents` (route `missed`) |
//! | `CALLBRIDGE_DIVERTED_FROM` | the group asked for, when the call overflowed to another |
//! | `CALLBRIDGE_ERROR` | why there is no route: `unknown_script`, `no_target`, `ambiguous_target`, `unknown_queue`, `unknown_group` |
//! | `CALLBRIDGE_ROUTING_REASON` | why the call left the group asked for: `overflow`, `caller_unknown`, `caller_inactive` |
//! | `CALLBRIDGE_ROUTING_FROM` | the group whose rule moved it |
//! | `CALLBRIDGE_CALLER_FOUND` | `true`/`false` when the caller was looked up and the helpdesk answered |
//! | `CALLBRIDGE_CALLER_ACTIVE` | `true`/`false`: the caller's contact is active |
//! | `CALLBRIDGE_CONTACT_ID` | the contact's id in the helpdesk |
//!
//! The caller's number is the channel's caller ID (`agi_callerid`), or
//! `caller=` when the request names one.
//!
//! Setting all of them every time means a second `AGI()` on the same channel
//! never leaves a stale value behind. Then callbridge closes the connection:
//! the dialplan continues with the variables set.
//!
//! **callbridge never hangs up a caller.** It never sends the `HANGUP`
//! command: deciding to drop a call is the dialplan's job, and a bug or an
//! outage in callbridge must at worst cost the routing, never the call.
//! A session that is not FastAGI (garbage, lines over the limit, an
//! environment block that never ends, a request naming no script) or that
//! exceeds the session time is closed without a word; so is a connection
//! beyond `max_sessions`. `AGI()` then returns and the dialplan falls back
//! on its own default (see the README's snippet), at once rather than
//! after a wait.
//!
//! # Bounds
//!
//! Lines are at most [`AgiLimits::max_line_bytes`], the environment block
//! at most [`AgiLimits::max_env_lines`] lines, a session lasts at most
//! [`AgiLimits::session_timeout`] from accept to close, and at most
//! [`AgiLimits::max_sessions`] run at once (a semaphore; a connection
//! beyond it is closed, not queued: the channel is blocked in `AGI()`
//! while it waits, and the dialplan's fallback is better than a wait).
//!
//! This module must never touch the normalizer or the AMI connection: its
//! answer reaches the call lifecycle through the PBX, as the `VarSet`
//! events of the variables it sets.

// Fed by the network: no indexing or slicing that could panic.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

use super::{Decision, Route, RouteOracle, Target};
use crate::config::AgiConfig;
use crate::normalize::{
    CALLER_ACTIVE_VARIABLE, CALLER_FOUND_VARIABLE, CONTACT_ID_VARIABLE, ROUTE_GROUP_VARIABLE, ROUTE_REASON_VARIABLE,
    ROUTING_FROM_VARIABLE, ROUTING_REASON_VARIABLE,
};
use futures::StreamExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// `queue`, `missed`, or empty.
pub const ROUTE_VARIABLE: &str = "CALLBRIDGE_ROUTE";
/// The queue to use.
pub const QUEUE_VARIABLE: &str = "CALLBRIDGE_QUEUE";
/// The group the call goes to or is missed for.
pub const GROUP_VARIABLE: &str = ROUTE_GROUP_VARIABLE;
/// The missed reason.
pub const REASON_VARIABLE: &str = ROUTE_REASON_VARIABLE;
/// The group asked for, when the call overflowed.
pub const DIVERTED_FROM_VARIABLE: &str = "CALLBRIDGE_DIVERTED_FROM";
/// Why there is no route.
pub const ERROR_VARIABLE: &str = "CALLBRIDGE_ERROR";
/// Why the call was moved away from the group asked for: `overflow`,
/// `caller_unknown`, `caller_inactive`.
pub const ROUTING_REASON: &str = ROUTING_REASON_VARIABLE;
/// The group whose rule moved it.
pub const ROUTING_FROM: &str = ROUTING_FROM_VARIABLE;
/// `true`/`false`: a contact has the caller's number (when looked up).
pub const CALLER_FOUND: &str = CALLER_FOUND_VARIABLE;
/// `true`/`false`: that contact is active.
pub const CALLER_ACTIVE: &str = CALLER_ACTIVE_VARIABLE;
/// The contact's id in the helpdesk.
pub const CONTACT_ID: &str = CONTACT_ID_VARIABLE;

/// The one script this endpoint serves (`agi://host:port/route`).
pub const SCRIPT: &str = "route";

/// Replies read for one command before giving up (Asterisk's longest is a
/// multi-line `520-` usage text of a dozen lines).
const MAX_REPLY_LINES: usize = 64;

/// After closing, how long and how much unread input is drained so that the
/// peer sees an orderly close (FIN) rather than a reset.
const DRAIN_TIME: Duration = Duration::from_millis(200);
const DRAIN_BYTES: usize = 64 * 1024;

/// Limits of the FastAGI server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgiLimits {
    /// Sessions served at once; beyond, a connection is closed at once.
    pub max_sessions: usize,
    /// From accept to close.
    pub session_timeout: Duration,
    /// Longest line accepted (environment line or reply).
    pub max_line_bytes: usize,
    /// Most lines in the environment block.
    pub max_env_lines: usize,
}

impl Default for AgiLimits {
    fn default() -> Self {
        AgiLimits {
            max_sessions: 64,
            session_timeout: Duration::from_secs(5),
            // Asterisk's own AGI buffer is 2 KiB per line; a long caller
            // name or request still fits twice over.
            max_line_bytes: 4096,
            // Asterisk sends about 20 lines plus one per argument.
            max_env_lines: 128,
        }
    }
}

/// Why the FastAGI endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgiError {
    #[error("invalid [agi] setting {field}: {reason}")]
    Setting { field: &'static str, reason: String },
    #[error("cannot listen on {address} for FastAGI: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl AgiLimits {
    /// The limits of an `[agi]` section (values were validated at load;
    /// a configuration built in code is checked again here).
    pub fn from_config(c: &AgiConfig) -> Result<AgiLimits, AgiError> {
        if c.max_sessions == 0 {
            return Err(AgiError::Setting { field: "agi.max_sessions", reason: "must be at least 1".into() });
        }
        let session_timeout = Duration::try_from_secs_f64(c.session_timeout_seconds)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| AgiError::Setting {
                field: "agi.session_timeout_seconds",
                reason: "must be a number of seconds > 0".into(),
            })?;
        Ok(AgiLimits { max_sessions: c.max_sessions, session_timeout, ..AgiLimits::default() })
    }
}

/// Binds the `[agi] listen` address.
pub async fn bind(c: &AgiConfig) -> Result<TcpListener, AgiError> {
    let address: SocketAddr = c
        .listen
        .parse()
        .map_err(|_| AgiError::Setting { field: "agi.listen", reason: format!("{:?} is not an ip:port", c.listen) })?;
    TcpListener::bind(address).await.map_err(|source| AgiError::Bind { address, source })
}

/// Serves FastAGI on `listener` with the default [`AgiLimits`] until
/// `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, oracle: Arc<RouteOracle>, shutdown: CancellationToken) {
    serve_with(listener, oracle, AgiLimits::default(), shutdown).await
}

/// Serves FastAGI on `listener` until `shutdown` is cancelled, then stops
/// accepting and returns once the sessions in flight are over (each is
/// bounded by `limits.session_timeout`).
pub async fn serve_with(
    listener: TcpListener,
    oracle: Arc<RouteOracle>,
    limits: AgiLimits,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_sessions.max(1)));
    // Refused connections are closed by short tasks (a FIN and a drain of at
    // most DRAIN_TIME); as many of those as sessions at most, beyond which a
    // refused connection is simply dropped.
    let closers = Arc::new(Semaphore::new(limits.max_sessions.max(1)));
    let sessions = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        info!(address = %addr, max_sessions = limits.max_sessions, "FastAGI routing endpoint listening");
    }
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                warn!(error = %e, "FastAGI accept failed; retrying shortly");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            warn!(peer = %peer, max_sessions = limits.max_sessions, "FastAGI busy: session refused, the dialplan falls back");
            count(Outcome::Refused, Duration::ZERO);
            if let Ok(closer) = Arc::clone(&closers).try_acquire_owned() {
                sessions.spawn(async move {
                    let _closer = closer;
                    let (read, write) = stream.into_split();
                    close(read, write).await;
                });
            }
            continue;
        };
        let oracle = Arc::clone(&oracle);
        sessions.spawn(async move {
            let _permit = permit;
            metrics::gauge!("callbridge_agi_sessions_active").increment(1.0);
            let started = Instant::now();
            let outcome = run_session(stream, peer, &oracle, &limits).await;
            count(outcome, started.elapsed());
            metrics::gauge!("callbridge_agi_sessions_active").decrement(1.0);
        });
    }
    sessions.close();
    sessions.wait().await;
    info!("FastAGI routing endpoint stopped");
}

/// How a session ended (metric label values: a fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Queue,
    Missed,
    /// Well-formed, but no route (unknown queue, …): `CALLBRIDGE_ERROR` set.
    Error,
    /// Not FastAGI, or Asterisk refused our command.
    Malformed,
    Timeout,
    /// The peer went away mid-session.
    Closed,
    /// Over `max_sessions`.
    Refused,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Queue => "queue",
            Outcome::Missed => "missed",
            Outcome::Error => "error",
            Outcome::Malformed => "malformed",
            Outcome::Timeout => "timeout",
            Outcome::Closed => "closed",
            Outcome::Refused => "refused",
        }
    }
}

fn count(outcome: Outcome, took: Duration) {
    metrics::counter!("callbridge_agi_sessions_total", "outcome" => outcome.as_str()).increment(1);
    if outcome != Outcome::Refused {
        metrics::histogram!("callbridge_agi_session_duration_seconds").record(took.as_secs_f64());
    }
}

/// Why a session stopped early.
#[derive(Debug)]
enum Stop {
    /// Not FastAGI; the text says what was wrong (logged, never sent).
    Malformed(String),
    /// The peer closed or reset the connection.
    Closed,
}

impl From<LinesCodecError> for Stop {
    fn from(e: LinesCodecError) -> Stop {
        match e {
            LinesCodecError::MaxLineLengthExceeded => Stop::Malformed("line too long".into()),
            LinesCodecError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Stop::Malformed("not UTF-8 text".into())
            }
            LinesCodecError::Io(_) => Stop::Closed,
        }
    }
}

type Lines = FramedRead<OwnedReadHalf, LinesCodec>;

async fn run_session(stream: TcpStream, peer: SocketAddr, oracle: &RouteOracle, limits: &AgiLimits) -> Outcome {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(limits.max_line_bytes));
    let result = tokio::time::timeout(limits.session_timeout, session(&mut lines, &mut write, oracle, limits)).await;
    let outcome = match result {
        Ok(Ok((outcome, channel))) => {
            if outcome == Outcome::Error {
                warn!(peer = %peer, channel = %channel, "FastAGI request could not be routed; CALLBRIDGE_ERROR set, the dialplan falls back");
            } else {
                debug!(peer = %peer, channel = %channel, outcome = outcome.as_str(), "FastAGI request routed");
            }
            outcome
        }
        Ok(Err(Stop::Malformed(why))) => {
            info!(peer = %peer, why = %why, "FastAGI session malformed; closed");
            Outcome::Malformed
        }
        Ok(Err(Stop::Closed)) => {
            debug!(peer = %peer, "FastAGI peer closed the session early");
            Outcome::Closed
        }
        Err(_) => {
            info!(peer = %peer, timeout = ?limits.session_timeout, "FastAGI session timed out; closed");
            Outcome::Timeout
        }
    };
    close(lines.into_inner(), write).await;
    outcome
}

/// One session: environment block, route, variables. Returns the outcome
/// and the channel name (for the log).
async fn session(
    lines: &mut Lines,
    write: &mut OwnedWriteHalf,
    oracle: &RouteOracle,
    limits: &AgiLimits,
) -> Result<(Outcome, String), Stop> {
    let env = read_env(lines, limits.max_env_lines).await?;
    let request = Request::from_env(&env)?;
    let (outcome, vars) = match request.target() {
        Err(code) => (Outcome::Error, answer_error(code)),
        Ok(target) => match oracle.decide(&target, request.caller()).await {
            Ok(decision) => {
                if let Some(f) = decision.lookup_failed {
                    debug!(channel = %request.channel, cause = f.as_str(), "caller lookup gave no answer; normal route");
                }
                let outcome =
                    if matches!(decision.route, Route::Queue { .. }) { Outcome::Queue } else { Outcome::Missed };
                (outcome, answer_decision(&decision))
            }
            Err(e) => (Outcome::Error, answer_error(e.code())),
        },
    };
    for (name, value) in &vars {
        let command = format!("SET VARIABLE {name} \"{}\"\n", quote(value));
        write.write_all(command.as_bytes()).await.map_err(|_| Stop::Closed)?;
        if !await_success(lines).await? {
            // The channel is gone and refuses commands: nothing more to say.
            break;
        }
    }
    Ok((outcome, request.channel))
}

/// Reads `agi_<name>: <value>` lines up to the empty line.
async fn read_env(lines: &mut Lines, max_lines: usize) -> Result<Vec<(String, String)>, Stop> {
    let mut env = Vec::new();
    loop {
        let line = match lines.next().await {
            Some(line) => line?,
            None if env.is_empty() => return Err(Stop::Closed),
            None => return Err(Stop::Malformed("connection closed inside the environment block".into())),
        };
        if line.is_empty() {
            return Ok(env);
        }
        if env.len() >= max_lines {
            return Err(Stop::Malformed(format!("environment block longer than {max_lines} lines")));
        }
        env.push(env_line(&line)?);
    }
}

/// One line of the environment block: `agi_<name>: <value>`.
fn env_line(line: &str) -> Result<(String, String), Stop> {
    let Some((key, value)) = line.split_once(':') else {
        return Err(Stop::Malformed("environment line without ':'".into()));
    };
    if !key.starts_with("agi_") || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(Stop::Malformed("environment line that is not agi_<name>: <value>".into()));
    }
    Ok((key.to_string(), value.strip_prefix(' ').unwrap_or(value).to_string()))
}

/// What one line read after a command says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// An unsolicited `HANGUP` (the caller hung up): not the reply yet.
    Hangup,
    /// `520-`: a usage text follows, up to `520 End of proper usage.`
    Usage,
    /// `200 result=1`.
    Success,
    /// `511`: the channel is dead and refuses commands.
    Dead,
    /// Anything else: why, for the log.
    Refused(String),
}

fn reply(line: &str) -> Reply {
    let line = line.trim_end();
    if line == "HANGUP" {
        return Reply::Hangup;
    }
    if line.starts_with("520-") {
        return Reply::Usage;
    }
    if let Some(rest) = line.strip_prefix("200 ") {
        return if rest.split_whitespace().any(|w| w == "result=1") {
            Reply::Success
        } else {
            Reply::Refused(format!("SET VARIABLE refused: {}", printable(line)))
        };
    }
    if line.starts_with("511") {
        return Reply::Dead;
    }
    Reply::Refused(format!("unexpected reply: {}", printable(line)))
}

/// Reads the reply to one command. `Ok(true)`: `200 result=1`. `Ok(false)`:
/// `511`, the channel is dead and refuses commands. An unsolicited `HANGUP`
/// line (the caller hung up) is skipped: variables can still be set.
async fn await_success(lines: &mut Lines) -> Result<bool, Stop> {
    for _ in 0..MAX_REPLY_LINES {
        let line = lines.next().await.ok_or(Stop::Closed)??;
        match reply(&line) {
            Reply::Hangup => continue,
            Reply::Usage => {
                // A usage text: skip to its last line, `520 End of proper usage.`
                for _ in 0..MAX_REPLY_LINES {
                    let line = lines.next().await.ok_or(Stop::Closed)??;
                    if line.starts_with("520 ") {
                        break;
                    }
                }
                return Err(Stop::Malformed("SET VARIABLE refused (520)".into()));
            }
            Reply::Success => return Ok(true),
            Reply::Dead => return Ok(false),
            Reply::Refused(why) => return Err(Stop::Malformed(why)),
        }
    }
    Err(Stop::Malformed(format!("more than {MAX_REPLY_LINES} reply lines to one command")))
}

/// The parsing half of a session, without a socket: `bytes` is everything
/// the peer sent, cut into lines by the session's own codec and read as
/// [`session`] reads them. Returns the target asked for (or the error code
/// answered) and how many later lines read as `200 result=1`; `Err` is why
/// the session would be closed as malformed. For the fuzz targets (`fuzz/`)
/// and tests.
#[doc(hidden)]
pub fn parse_session(bytes: &[u8], limits: &AgiLimits) -> Result<(Result<Target, &'static str>, usize), String> {
    use tokio_util::codec::Decoder;
    let why = |e: Stop| match e {
        Stop::Malformed(why) => why,
        Stop::Closed => "closed".to_string(),
    };
    let mut codec = LinesCodec::new_with_max_length(limits.max_line_bytes);
    let mut buf = bytes::BytesMut::from(bytes);
    let mut next = move || codec.decode_eof(&mut buf).map_err(|e| why(Stop::from(e)));
    let mut env = Vec::new();
    loop {
        let Some(line) = next()? else { return Err("closed inside the environment block".into()) };
        if line.is_empty() {
            break;
        }
        if env.len() >= limits.max_env_lines {
            return Err("environment block too long".into());
        }
        env.push(env_line(&line).map_err(why)?);
    }
    let target = Request::from_env(&env).map_err(why)?.target();
    let mut successes = 0;
    while let Some(line) = next()? {
        successes += usize::from(reply(&line) == Reply::Success);
    }
    Ok((target, successes))
}

/// Closes the session: FIN, then a short bounded drain so that input the
/// peer already sent does not turn the close into a reset.
async fn close(mut read: OwnedReadHalf, mut write: OwnedWriteHalf) {
    let _ = write.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < DRAIN_BYTES {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// What the environment block asks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    /// The script path without leading `/` (`route`).
    script: String,
    /// `key=value` pairs of the query string, then of `agi_arg_N`.
    params: Vec<(String, String)>,
    channel: String,
    /// `agi_callerid`: the caller's number as the channel has it.
    callerid: String,
}

impl Request {
    fn from_env(env: &[(String, String)]) -> Result<Request, Stop> {
        let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        // `agi_network_script` is what follows host[:port]/ in the URL;
        // older Asterisks only send `agi_request` with the whole URL.
        let script = match (get("agi_network_script"), get("agi_request")) {
            (Some(s), _) if !s.is_empty() => s.to_string(),
            (_, Some(url)) => {
                let rest = url
                    .strip_prefix("agi://")
                    .or_else(|| url.strip_prefix("hagi://"))
                    .ok_or_else(|| Stop::Malformed("agi_request is not an agi:// URL".into()))?;
                rest.split_once('/').map(|(_, s)| s.to_string()).unwrap_or_default()
            }
            _ => return Err(Stop::Malformed("neither agi_network_script nor agi_request".into())),
        };
        let (path, query) = script.split_once('?').unwrap_or((&script, ""));
        let mut params: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        // Arguments in order: agi_arg_1, agi_arg_2, …
        let mut args: Vec<(u32, &str)> = env
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("agi_arg_")?.parse::<u32>().ok().map(|n| (n, v.as_str())))
            .collect();
        args.sort_by_key(|(n, _)| *n);
        for (_, arg) in args {
            if let Some((k, v)) = arg.split_once('=') {
                params.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Ok(Request {
            script: path.trim_matches('/').to_string(),
            params,
            channel: get("agi_channel").unwrap_or("").to_string(),
            callerid: get("agi_callerid").unwrap_or("").to_string(),
        })
    }

    /// The caller's number to look up: `caller=` when the dialplan passes
    /// one (`route?queue=700&caller=${URIENCODE(${CALLERID(num)})}`), else
    /// the channel's caller ID; `None` when there is neither.
    fn caller(&self) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == "caller")
            .map(|(_, v)| v.as_str())
            .or(Some(self.callerid.as_str()))
            .filter(|c| !c.trim().is_empty())
    }

    /// The queue or group asked about, or an error code.
    fn target(&self) -> Result<Target, &'static str> {
        if self.script != SCRIPT {
            return Err("unknown_script");
        }
        let first = |key: &str| self.params.iter().find(|(k, v)| k == key && !v.is_empty()).map(|(_, v)| v.clone());
        match (first("queue"), first("group")) {
            (Some(q), None) => Ok(Target::Queue(q)),
            (None, Some(g)) => Ok(Target::Group(g)),
            (Some(_), Some(_)) => Err("ambiguous_target"),
            (None, None) => Err("no_target"),
        }
    }
}

type Answer = [(&'static str, String); 11];

/// The variables of a decision, in the order the normalizer reads them
/// (a routing reason before its group, `found` before the rest).
fn answer_decision(d: &Decision) -> Answer {
    let flag = |b: bool| if b { "true" } else { "false" }.to_string();
    let [route, queue, group, reason, diverted, error] = answer_route(&d.route);
    let routing = d.routing.as_ref();
    let caller = d.caller.as_ref();
    [
        route,
        queue,
        group,
        reason,
        diverted,
        error,
        (ROUTING_REASON, routing.map(|r| r.reason.as_str().to_string()).unwrap_or_default()),
        (ROUTING_FROM, routing.and_then(|r| r.from_group.as_ref()).map(|g| g.to_string()).unwrap_or_default()),
        (CALLER_FOUND, caller.map(|c| flag(c.found)).unwrap_or_default()),
        (CALLER_ACTIVE, caller.and_then(|c| c.active).map(flag).unwrap_or_default()),
        (CONTACT_ID, caller.and_then(|c| c.contact_id.clone()).unwrap_or_default()),
    ]
}

fn answer_route(route: &Route) -> [(&'static str, String); 6] {
    match route {
        Route::Queue { group, queue, diverted_from } => [
            (ROUTE_VARIABLE, "queue".into()),
            (QUEUE_VARIABLE, queue.clone()),
            (GROUP_VARIABLE, group.to_string()),
            (REASON_VARIABLE, String::new()),
            (DIVERTED_FROM_VARIABLE, diverted_from.as_ref().map(|g| g.to_string()).unwrap_or_default()),
            (ERROR_VARIABLE, String::new()),
        ],
        Route::Missed { group, reason } => [
            (ROUTE_VARIABLE, "missed".into()),
            (QUEUE_VARIABLE, String::new()),
            (GROUP_VARIABLE, group.to_string()),
            (REASON_VARIABLE, reason.as_str().into()),
            (DIVERTED_FROM_VARIABLE, String::new()),
            (ERROR_VARIABLE, String::new()),
        ],
    }
}

fn answer_error(code: &'static str) -> Answer {
    [
        (ROUTE_VARIABLE, String::new()),
        (QUEUE_VARIABLE, String::new()),
        (GROUP_VARIABLE, String::new()),
        (REASON_VARIABLE, String::new()),
        (DIVERTED_FROM_VARIABLE, String::new()),
        (ERROR_VARIABLE, code.into()),
        (ROUTING_REASON, String::new()),
        (ROUTING_FROM, String::new()),
        (CALLER_FOUND, String::new()),
        (CALLER_ACTIVE, String::new()),
        (CONTACT_ID, String::new()),
    ]
}

/// Escapes a value for an AGI double-quoted argument: `\` and `"` are
/// backslash-escaped; control characters (which would end the line) become
/// `?`.
fn quote(value: &str) -> String {
    let mut s = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                s.push('\\');
                s.push(c);
            }
            c if c.is_control() => s.push('?'),
            c => s.push(c),
        }
    }
    s
}

/// `%XX` sequences decoded (as the dialplan's `URIENCODE()` writes them);
/// anything malformed is kept as it is.
fn percent_decode(s: &str) -> String {
    let hex = |c: Option<&u8>| c.and_then(|&c| (c as char).to_digit(16));
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&c, tail)) = rest.split_first() {
        if c == b'%' {
            if let (Some(h), Some(l)) = (hex(tail.first()), hex(tail.get(1))) {
                out.push((h * 16 + l) as u8);
                rest = tail.get(2..).unwrap_or_default();
                continue;
            }
        }
        // `+` stays `+`: ids may contain it, and Asterisk's URIENCODE()
        // writes a space as %20.
        out.push(c);
        rest = tail;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A peer's line for a log message: at most 80 printable characters.
fn printable(s: &str) -> String {
    crate::text::prefix_chars(s, 80).chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn targets_from_script_query_and_arguments() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<Target, &'a str>);
        let cases: &[Case] = &[
            (&[("agi_network_script", "route?queue=700")], Ok(Target::Queue("700".into()))),
            (&[("agi_network_script", "/route?group=support")], Ok(Target::Group("support".into()))),
            (&[("agi_request", "agi://127.0.0.1:4573/route?queue=701")], Ok(Target::Queue("701".into()))),
            (&[("agi_network_script", "route"), ("agi_arg_1", "group=sales")], Ok(Target::Group("sales".into()))),
            (&[("agi_network_script", "route?group=sup%70ort")], Ok(Target::Group("support".into()))),
            (&[("agi_network_script", "route?queue=700&group=sales")], Err("ambiguous_target")),
            (&[("agi_network_script", "route?queue=")], Err("no_target")),
            (&[("agi_network_script", "route")], Err("no_target")),
            (&[("agi_network_script", "hours?queue=700")], Err("unknown_script")),
            (&[("agi_request", "agi://127.0.0.1:4573")], Err("unknown_script")),
        ];
        for (pairs, want) in cases {
            let req = Request::from_env(&env(pairs)).unwrap_or_else(|e| panic!("{pairs:?}: {e:?}"));
            assert_eq!(&req.target(), want, "{pairs:?}");
        }
    }

    #[test]
    fn requests_without_a_script_are_malformed() {
        for pairs in [&[][..], &[("agi_channel", "SIP/x-1")][..], &[("agi_request", "http://x/route")][..]] {
            assert!(matches!(Request::from_env(&env(pairs)), Err(Stop::Malformed(_))), "{pairs:?}");
        }
    }

    #[test]
    fn values_are_quoted_for_agi() {
        assert_eq!(quote("700"), "700");
        assert_eq!(quote(r#"a "b" \c"#), r#"a \"b\" \\c"#);
        assert_eq!(quote("x\ny\r"), "x?y?");
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("a+b"), "a+b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
