//! One extension's dialog-event subscription (RFC 6665) as a pure state
//! machine: when to send the initial SUBSCRIBE, how to answer a digest
//! challenge (once per challenge), when to refresh (at 85 % of the granted
//! duration), and when and how to start over (after `Subscription-State:
//! terminated`, an error response, a timeout, a `481` to a refresh, or the
//! PBX coming back) with a capped exponential backoff and jitter.
//!
//! It decides, it does not act: every method takes the time (`now`) and,
//! where a delay is drawn, a `jitter` in `[0, 1)`, and returns at most one
//! [`SubscribeRequest`] for the user agent to render and send. It does no
//! I/O, reads no clock, and never sees sockets or bytes. Transaction
//! matching (which response belongs to which request) is the user agent's
//! job; this machine only checks that a response's CSeq is the one in flight.

use super::digest::{self, Challenge, RequestDigest};
use super::message::{token, SubState, SubStateValue};
use crate::backoff::{Backoff, Jitter};
use std::time::Duration;
use tokio::time::Instant;

/// Backoff of the first retry; doubled per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Consecutive challenges without success before giving up for a backoff.
const MAX_CHALLENGES: u32 = 2;

/// Fixed settings of one subscription.
#[derive(Debug, Clone)]
pub struct SubscribeParams {
    /// `sip:2000@pbx.example` (normalized as it will be rendered).
    pub uri: String,
    pub username: String,
    pub password: String,
    pub expires: u32,
    pub retry_max: Duration,
}

/// A SUBSCRIBE to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeRequest {
    /// A new dialog (the caller resets what it knows of NOTIFY versions).
    pub fresh: bool,
    pub uri: String,
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: Option<String>,
    pub cseq: u32,
    pub expires: u32,
    /// (`Authorization` or `Proxy-Authorization`, value).
    pub authorization: Option<(&'static str, String)>,
}

/// The parts of a response to our SUBSCRIBE this machine reads.
#[derive(Debug, Clone, Default)]
pub struct Response<'a> {
    pub status: u16,
    pub cseq: u32,
    pub to_tag: Option<&'a str>,
    pub expires: Option<u32>,
    pub contact: Option<&'a str>,
    pub www_authenticate: Option<&'a str>,
    pub proxy_authenticate: Option<&'a str>,
    pub min_expires: Option<u32>,
    pub retry_after: Option<u32>,
}

/// Why a subscription is not active, for logs and the failure metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The PBX refused our credentials (or sent an unusable challenge).
    Auth,
    /// No final response in time.
    Timeout,
    /// An error response (4xx–6xx) or a zero-length grant.
    Rejected,
    /// The PBX ended the subscription (`Subscription-State: terminated`).
    Terminated,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Auth => "auth",
            Failure::Timeout => "timeout",
            Failure::Rejected => "rejected",
            Failure::Terminated => "terminated",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Start a new dialog at this time.
    Waiting(Instant),
    /// A SUBSCRIBE is in flight.
    InFlight,
    /// Established: refresh at `refresh_at`.
    Active { refresh_at: Instant },
    /// Unsubscribed on shutdown: nothing more happens.
    Closed,
}

#[derive(Debug, Clone)]
struct DialogIds {
    call_id: String,
    local_tag: String,
    remote_tag: Option<String>,
    /// Request-URI of in-dialog requests (the PBX's Contact).
    target: String,
    cseq: u32,
}

#[derive(Debug, Clone)]
struct Auth {
    challenge: Challenge,
    nc: u32,
    cnonce: String,
}

/// The subscription of one extension.
#[derive(Debug, Clone)]
pub struct Subscription {
    params: SubscribeParams,
    phase: Phase,
    dialog: Option<DialogIds>,
    /// The request in flight (resent as is, with credentials, on a challenge).
    in_flight: Option<SubscribeRequest>,
    /// Credentials of the request in flight were computed from this nonce.
    sent_nonce: Option<String>,
    challenges: u32,
    auth: Option<Auth>,
    failures: u32,
    last_failure: Option<Failure>,
}

/// The delay before the `failures`-th consecutive retry: 1 s, 2 s, 4 s…
/// capped at `max`, then "equal jitter" (between half and all of it) so
/// that many subscriptions failing together do not retry together.
pub fn backoff(failures: u32, max: Duration, jitter: f64) -> Duration {
    let policy = Backoff::clamped(BACKOFF_BASE, max.max(Duration::from_millis(100)), Jitter::Equal);
    policy.delay_at(failures.saturating_sub(1), jitter)
}

/// When to refresh a subscription granted for `granted` seconds.
pub fn refresh_delay(granted: u32) -> Duration {
    Duration::from_secs(u64::from(granted)).mul_f64(0.85).max(Duration::from_millis(500))
}

impl Subscription {
    /// A subscription whose first SUBSCRIBE goes out at `start`.
    pub fn new(params: SubscribeParams, start: Instant) -> Subscription {
        Subscription {
            params,
            phase: Phase::Waiting(start),
            dialog: None,
            in_flight: None,
            sent_nonce: None,
            challenges: 0,
            auth: None,
            failures: 0,
            last_failure: None,
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Active { .. })
    }

    /// Why the subscription last failed (cleared by a success).
    pub fn last_failure(&self) -> Option<Failure> {
        self.last_failure
    }

    /// When [`Subscription::poll`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Waiting(at) => Some(at),
            Phase::Active { refresh_at } => Some(refresh_at),
            Phase::InFlight | Phase::Closed => None,
        }
    }

    /// True when a NOTIFY with this Call-ID and To tag belongs to this
    /// subscription's current dialog.
    pub fn owns(&self, call_id: &str, local_tag: Option<&str>) -> bool {
        self.dialog.as_ref().is_some_and(|d| d.call_id == call_id && Some(d.local_tag.as_str()) == local_tag)
    }

    /// The CSeq of the SUBSCRIBE in flight.
    pub fn in_flight_cseq(&self) -> Option<u32> {
        self.in_flight.as_ref().map(|r| r.cseq)
    }

    /// Timers: the initial SUBSCRIBE, a retry or a refresh.
    pub fn poll(&mut self, now: Instant) -> Option<SubscribeRequest> {
        match self.phase {
            Phase::Waiting(at) if now >= at => Some(self.fresh()),
            Phase::Active { refresh_at } if now >= refresh_at => Some(self.in_dialog(self.params.expires)),
            _ => None,
        }
    }

    /// Starts over with a new dialog now (the PBX came back, or the
    /// subscriber wants full state after a version gap it cannot repair).
    pub fn restart(&mut self, now: Instant) {
        if self.phase != Phase::Closed {
            self.failures = 0;
            self.in_flight = None;
            self.phase = Phase::Waiting(now);
        }
    }

    /// Asks for a refresh now (a version gap in partial state: the NOTIFY
    /// that answers the refresh carries full state).
    pub fn refresh_now(&mut self, now: Instant) {
        if let Phase::Active { .. } = self.phase {
            self.phase = Phase::Active { refresh_at: now };
        }
    }

    /// The unsubscribe (`Expires: 0`) for shutdown, if there is a dialog.
    pub fn close(&mut self) -> Option<SubscribeRequest> {
        let active = self.is_active();
        self.phase = Phase::Closed;
        if active {
            let req = self.in_dialog(0);
            self.phase = Phase::Closed;
            Some(req)
        } else {
            None
        }
    }

    fn fresh(&mut self) -> SubscribeRequest {
        self.dialog = Some(DialogIds {
            call_id: format!("{}@callbridge", token(24)),
            local_tag: token(12),
            remote_tag: None,
            target: self.params.uri.clone(),
            cseq: 0,
        });
        self.auth = None;
        let mut req = self.in_dialog(self.params.expires);
        req.fresh = true;
        req
    }

    /// The next request of the current dialog (credentials added when a
    /// challenge of this dialog is known and still applies).
    fn in_dialog(&mut self, expires: u32) -> SubscribeRequest {
        let Some(d) = self.dialog.as_mut() else {
            return self.fresh();
        };
        d.cseq += 1;
        let req = SubscribeRequest {
            fresh: false,
            uri: d.target.clone(),
            call_id: d.call_id.clone(),
            local_tag: d.local_tag.clone(),
            remote_tag: d.remote_tag.clone(),
            cseq: d.cseq,
            expires,
            authorization: None,
        };
        self.challenges = 0;
        self.sent_nonce = None;
        self.phase = Phase::InFlight;
        self.in_flight = Some(req.clone());
        req
    }

    fn fail(&mut self, now: Instant, why: Failure, jitter: f64, at_least: Option<Duration>) {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = Some(why);
        self.in_flight = None;
        let delay = backoff(self.failures, self.params.retry_max, jitter).max(at_least.unwrap_or_default());
        self.phase = Phase::Waiting(now + delay);
    }

    /// A final or provisional response to the SUBSCRIBE in flight.
    /// Returns the request to send next, if any (an authenticated retry,
    /// a retry with a longer Expires, or a new dialog after a `481`).
    pub fn on_response(&mut self, now: Instant, r: &Response<'_>, jitter: f64) -> Option<SubscribeRequest> {
        let in_flight = self.in_flight.clone()?;
        if r.cseq != in_flight.cseq || r.status < 200 {
            return None;
        }
        match r.status {
            200..=299 => {
                self.on_success(now, r, &in_flight, jitter);
                None
            }
            401 | 407 => self.on_challenge(now, r, in_flight, jitter),
            423 => match r.min_expires {
                Some(min) if min > in_flight.expires && min <= 86_400 => {
                    self.params.expires = min;
                    Some(self.in_dialog(min))
                }
                _ => {
                    self.fail(now, Failure::Rejected, jitter, None);
                    None
                }
            },
            // The PBX no longer knows the dialog (it restarted): start over.
            481 if in_flight.remote_tag.is_some() => {
                self.in_flight = None;
                Some(self.fresh())
            }
            _ => {
                let retry_after = r.retry_after.map(|s| Duration::from_secs(u64::from(s.min(3600))));
                self.fail(now, Failure::Rejected, jitter, retry_after);
                None
            }
        }
    }

    /// A 2xx: the subscription is active (or closed, for an unsubscribe),
    /// unless the PBX granted no time at all.
    fn on_success(&mut self, now: Instant, r: &Response<'_>, in_flight: &SubscribeRequest, jitter: f64) {
        let granted = r.expires.unwrap_or(in_flight.expires);
        if in_flight.expires == 0 {
            self.phase = Phase::Closed;
            return;
        }
        if let Some(d) = self.dialog.as_mut() {
            if d.remote_tag.is_none() {
                d.remote_tag = r.to_tag.map(str::to_string);
            }
            // A Contact rsip cannot render as given keeps the original target.
            if let Some(uri) = r.contact.and_then(|c| super::message::sip_uri(c).ok()) {
                d.target = uri.to_string();
            }
        }
        self.in_flight = None;
        if granted == 0 {
            self.fail(now, Failure::Rejected, jitter, None);
            return;
        }
        self.failures = 0;
        self.last_failure = None;
        self.phase = Phase::Active { refresh_at: now + refresh_delay(granted) };
    }

    /// A 401/407: the same request again with credentials, once per
    /// challenge; refused credentials or an unusable challenge fail.
    fn on_challenge(
        &mut self,
        now: Instant,
        r: &Response<'_>,
        in_flight: SubscribeRequest,
        jitter: f64,
    ) -> Option<SubscribeRequest> {
        let proxy = r.status == 407;
        let header = if proxy { r.proxy_authenticate } else { r.www_authenticate };
        let challenge = match header.map(Challenge::parse) {
            Some(Ok(c)) => c,
            _ => {
                self.fail(now, Failure::Auth, jitter, None);
                return None;
            }
        };
        // Same nonce, not stale: the PBX refused these credentials.
        let refused = self.sent_nonce.as_deref() == Some(challenge.nonce.as_str()) && !challenge.stale;
        if refused || self.challenges >= MAX_CHALLENGES {
            self.fail(now, Failure::Auth, jitter, None);
            return None;
        }
        let challenges = self.challenges + 1;
        let d = self.dialog.as_mut()?;
        d.cseq += 1;
        let mut req = SubscribeRequest { cseq: d.cseq, fresh: false, ..in_flight };
        let auth = self.auth.insert(Auth { challenge, nc: 0, cnonce: token(16) });
        auth.nc += 1;
        let value = digest::authorization(
            &auth.challenge,
            &RequestDigest {
                username: &self.params.username,
                password: &self.params.password,
                method: "SUBSCRIBE",
                uri: &req.uri,
                body: b"",
                nc: auth.nc,
                cnonce: &auth.cnonce,
            },
        );
        req.authorization = Some((if proxy { "Proxy-Authorization" } else { "Authorization" }, value));
        self.sent_nonce = Some(auth.challenge.nonce.clone());
        self.challenges = challenges;
        self.phase = Phase::InFlight;
        self.in_flight = Some(req.clone());
        Some(req)
    }

    /// The SUBSCRIBE in flight got no final response in time.
    pub fn on_timeout(&mut self, now: Instant, cseq: u32, jitter: f64) {
        if self.in_flight_cseq() == Some(cseq) {
            self.fail(now, Failure::Timeout, jitter, None);
        }
    }

    /// A NOTIFY of this subscription: learns the PBX's tag, follows the
    /// `expires` it states, and starts over when it says `terminated`.
    /// Returns a request to send at once (re-subscription after
    /// `deactivated`/`timeout`, RFC 6665 §4.1.3).
    pub fn on_notify(
        &mut self,
        now: Instant,
        state: Option<&SubState>,
        remote_tag: Option<&str>,
        jitter: f64,
    ) -> Option<SubscribeRequest> {
        if self.phase == Phase::Closed {
            return None;
        }
        if let Some(d) = self.dialog.as_mut() {
            if d.remote_tag.is_none() {
                d.remote_tag = remote_tag.map(str::to_string);
            }
        }
        let state = state?;
        match state.state {
            SubStateValue::Active | SubStateValue::Pending => {
                if let (Some(expires), Phase::Active { refresh_at }) = (state.expires, &self.phase) {
                    let sooner = now + refresh_delay(expires);
                    if sooner < *refresh_at {
                        self.phase = Phase::Active { refresh_at: sooner };
                    }
                }
                None
            }
            SubStateValue::Terminated => {
                self.in_flight = None;
                let retry_after = state.retry_after.map(|s| Duration::from_secs(u64::from(s.min(3600))));
                match (state.reason.as_deref(), retry_after) {
                    (Some("deactivated" | "timeout"), None) => {
                        self.last_failure = Some(Failure::Terminated);
                        Some(self.fresh())
                    }
                    (Some("deactivated" | "timeout" | "probation" | "giveup"), Some(after)) => {
                        self.last_failure = Some(Failure::Terminated);
                        self.phase = Phase::Waiting(now + after);
                        None
                    }
                    _ => {
                        self.fail(now, Failure::Terminated, jitter, retry_after);
                        None
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SubscribeParams {
        SubscribeParams {
            uri: "sip:2000@127.0.0.1:5060".into(),
            username: "callbridge".into(),
            password: "sub-s3cret".into(),
            expires: 600,
            retry_max: Duration::from_secs(60),
        }
    }

    fn ok<'a>(cseq: u32, expires: u32) -> Response<'a> {
        Response {
            status: 200,
            cseq,
            to_tag: Some("as7435ba19"),
            expires: Some(expires),
            contact: Some("sip:2000@127.0.0.1:5060"),
            ..Response::default()
        }
    }

    const ASTERISK_CHALLENGE: &str = r#"Digest algorithm=MD5, realm="asterisk", nonce="6f956b05""#;

    fn challenge(cseq: u32, value: &str) -> Response<'_> {
        Response { status: 401, cseq, www_authenticate: Some(value), ..Response::default() }
    }

    /// The exchange of the lab log: SUBSCRIBE, 401, authenticated
    /// SUBSCRIBE, 200 with Expires 600, refresh at 510 s.
    #[test]
    fn challenge_then_accept_then_refresh() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        assert_eq!(s.deadline(), Some(t0));
        let first = s.poll(t0).unwrap();
        assert!(first.fresh);
        assert_eq!(first.cseq, 1);
        assert_eq!(first.expires, 600);
        assert!(first.authorization.is_none());
        assert!(s.poll(t0).is_none(), "nothing while in flight");
        let second = s.on_response(t0, &challenge(1, ASTERISK_CHALLENGE), 0.0).unwrap();
        assert_eq!((second.cseq, &second.call_id, &second.local_tag), (2, &first.call_id, &first.local_tag));
        let (name, value) = second.authorization.clone().unwrap();
        assert_eq!(name, "Authorization");
        // uri is the Request-URI, as RFC 3261 §22.4 says (sipp put the host only).
        assert!(value.contains(r#"uri="sip:2000@127.0.0.1:5060""#), "{value}");
        assert!(value.contains(r#"nonce="6f956b05""#));
        assert!(s.on_response(t0, &ok(1, 600), 0.0).is_none(), "a response to an old CSeq is ignored");
        assert!(!s.is_active());
        assert!(s.on_response(t0, &ok(2, 600), 0.0).is_none());
        assert!(s.is_active());
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(510)));
        assert!(s.owns(&first.call_id, Some(&first.local_tag)));
        assert!(!s.owns(&first.call_id, Some("other")));
        assert!(s.poll(t0 + Duration::from_secs(509)).is_none());
        let refresh = s.poll(t0 + Duration::from_secs(510)).unwrap();
        assert!(!refresh.fresh);
        assert_eq!(refresh.cseq, 3);
        assert_eq!(refresh.remote_tag.as_deref(), Some("as7435ba19"));
        assert!(refresh.authorization.is_none());
    }

    #[test]
    fn a_second_challenge_with_the_same_nonce_means_bad_credentials() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        s.poll(t0).unwrap();
        s.on_response(t0, &challenge(1, ASTERISK_CHALLENGE), 0.0).unwrap();
        assert!(s.on_response(t0, &challenge(2, ASTERISK_CHALLENGE), 0.0).is_none());
        assert_eq!(s.last_failure(), Some(Failure::Auth));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(500)), "first backoff: 1 s with jitter 0 → 0.5 s");
        // A stale nonce is retried.
        let t1 = t0 + Duration::from_secs(1);
        s.poll(t1).unwrap();
        s.on_response(t1, &challenge(1, ASTERISK_CHALLENGE), 0.0).unwrap();
        let again = s.on_response(t1, &challenge(2, r#"Digest realm="asterisk", nonce="new1", stale=true"#), 0.0);
        assert!(again.unwrap().authorization.unwrap().1.contains("new1"));
        // …but not forever.
        assert!(s.on_response(t1, &challenge(3, r#"Digest realm="asterisk", nonce="new2""#), 0.0).is_none());
        assert_eq!(s.last_failure(), Some(Failure::Auth));
    }

    #[test]
    fn proxy_challenge_uses_proxy_authorization() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        s.poll(t0).unwrap();
        let r = Response {
            status: 407,
            cseq: 1,
            proxy_authenticate: Some(r#"Digest realm="sip.example", nonce="abc", qop="auth""#),
            ..Response::default()
        };
        let req = s.on_response(t0, &r, 0.0).unwrap();
        let (name, value) = req.authorization.unwrap();
        assert_eq!(name, "Proxy-Authorization");
        assert!(value.contains("qop=auth,nc=00000001,cnonce="), "{value}");
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff(1, max, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(2, max, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(3, max, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(10, max, 1.0), max);
        assert_eq!(backoff(u32::MAX, max, 1.0), max);
        for j in [0.0, 0.3, 0.99] {
            let d = backoff(7, max, j);
            assert!(d >= max / 2 && d <= max, "{d:?}");
        }
    }

    #[test]
    fn errors_and_timeouts_back_off_and_start_a_new_dialog() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        let first = s.poll(t0).unwrap();
        s.on_timeout(t0, 1, 1.0);
        assert_eq!(s.last_failure(), Some(Failure::Timeout));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(1)));
        let second = s.poll(t0 + Duration::from_secs(1)).unwrap();
        assert!(second.fresh);
        assert_ne!(second.call_id, first.call_id);
        let t2 = t0 + Duration::from_secs(1);
        let forbidden = Response { status: 403, cseq: 1, ..Response::default() };
        assert!(s.on_response(t2, &forbidden, 1.0).is_none());
        assert_eq!(s.deadline(), Some(t2 + Duration::from_secs(2)), "second failure: 2 s");
        let t3 = t2 + Duration::from_secs(2);
        s.poll(t3).unwrap();
        let busy = Response { status: 503, cseq: 1, retry_after: Some(30), ..Response::default() };
        s.on_response(t3, &busy, 1.0);
        assert_eq!(s.deadline(), Some(t3 + Duration::from_secs(30)), "Retry-After wins over a shorter backoff");
        // Success resets the backoff.
        let t4 = t3 + Duration::from_secs(30);
        s.poll(t4).unwrap();
        s.on_response(t4, &ok(1, 600), 1.0);
        assert!(s.is_active());
        assert_eq!(s.last_failure(), None);
    }

    #[test]
    fn interval_too_brief_and_zero_grant() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        s.poll(t0).unwrap();
        let brief = Response { status: 423, cseq: 1, min_expires: Some(1800), ..Response::default() };
        let retry = s.on_response(t0, &brief, 0.0).unwrap();
        assert_eq!((retry.cseq, retry.expires), (2, 1800));
        s.on_response(t0, &ok(2, 0), 1.0);
        assert!(!s.is_active());
        assert_eq!(s.last_failure(), Some(Failure::Rejected));
    }

    #[test]
    fn terminated_notifies() {
        let t0 = Instant::now();
        let active = |s: &mut Subscription| {
            let r = s.poll(t0).unwrap();
            s.on_response(t0, &ok(r.cseq, 600), 0.0);
            r
        };
        // deactivated / timeout: re-subscribe at once with a new dialog.
        for reason in ["deactivated", "timeout"] {
            let mut s = Subscription::new(params(), t0);
            let first = active(&mut s);
            let st = SubState::parse(&format!("terminated;reason={reason}")).unwrap();
            let again = s.on_notify(t0, Some(&st), Some("as1"), 0.0).unwrap();
            assert!(again.fresh && again.call_id != first.call_id && again.remote_tag.is_none());
        }
        // probation with retry-after: wait that long.
        let mut s = Subscription::new(params(), t0);
        active(&mut s);
        let st = SubState::parse("terminated;reason=probation;retry-after=20").unwrap();
        assert!(s.on_notify(t0, Some(&st), None, 0.0).is_none());
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(20)));
        // rejected, noresource or no reason: back off.
        let mut s = Subscription::new(params(), t0);
        active(&mut s);
        let st = SubState::parse("terminated;reason=noresource").unwrap();
        assert!(s.on_notify(t0, Some(&st), None, 1.0).is_none());
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(s.last_failure(), Some(Failure::Terminated));
    }

    #[test]
    fn notify_expires_brings_the_refresh_forward_and_learns_the_tag() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        s.poll(t0).unwrap();
        // NOTIFY may overtake the 200 (RFC 6665 §4.1.2.4).
        assert!(s.on_notify(t0, SubState::parse("active;expires=600").as_ref(), Some("pbx-tag"), 0.0).is_none());
        s.on_response(t0, &Response { to_tag: None, ..ok(1, 600) }, 0.0);
        let t1 = t0 + Duration::from_secs(100);
        s.on_notify(t1, SubState::parse("active;expires=100").as_ref(), None, 0.0);
        assert_eq!(s.deadline(), Some(t1 + Duration::from_secs(85)));
        let refresh = s.poll(t1 + Duration::from_secs(85)).unwrap();
        assert_eq!(refresh.remote_tag.as_deref(), Some("pbx-tag"));
    }

    #[test]
    fn refresh_answered_481_starts_over_and_restart_resets() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        let r = s.poll(t0).unwrap();
        s.on_response(t0, &ok(r.cseq, 60), 0.0);
        let refresh = s.poll(t0 + Duration::from_secs(51)).unwrap();
        let gone = Response { status: 481, cseq: refresh.cseq, ..Response::default() };
        let fresh = s.on_response(t0, &gone, 0.0).unwrap();
        assert!(fresh.fresh && fresh.call_id != r.call_id);
        s.on_timeout(t0, fresh.cseq, 0.0);
        s.restart(t0);
        assert_eq!(s.deadline(), Some(t0));
        assert!(s.poll(t0).unwrap().fresh);
    }

    #[test]
    fn close_unsubscribes_active_dialogs_only() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        assert!(s.clone().close().is_none());
        let r = s.poll(t0).unwrap();
        s.on_response(t0, &ok(r.cseq, 600), 0.0);
        let bye = s.close().unwrap();
        assert_eq!(bye.expires, 0);
        assert_eq!(bye.cseq, 2);
        assert!(s.poll(t0 + Duration::from_secs(10_000)).is_none());
        assert!(s.on_response(t0, &ok(2, 0), 0.0).is_none());
    }
}
