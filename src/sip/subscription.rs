//! One extension's dialog-event subscription (RFC 6665) as a pure state
//! machine: when to send the initial SUBSCRIBE, how to answer a digest
//! challenge (once per challenge, the unsubscribe's too), when to refresh
//! (at 85 % of the granted duration), when the grant has lapsed, and when
//! and how to start over (after `Subscription-State: terminated`, an error
//! response, a timeout, a `481` to a refresh) with a capped exponential
//! backoff and jitter.
//!
//! "Active" is what the PBX holds as far as callbridge can know: from the
//! 2xx until the grant ends, a `481` or `terminated` says the PBX dropped
//! it, or a refresh fails. A refresh in flight keeps the subscription
//! active (the previous grant still holds); a new dialog in flight does not.
//!
//! A PBX that restarts may lose its subscriptions without a word (chan_sip
//! keeps them in memory only; res_pjsip recreates the ones it stored). When
//! the user agent suspects a restart it calls [`Subscription::verify`] on
//! every subscription: an active one is
//! refreshed at the given time (a PBX that forgot the dialog answers `481`,
//! and the subscription starts over with a new dialog at once), one waiting
//! for a retry retries then, with its backoff reset.
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
    /// No final response in time, or the grant ended without a refresh.
    Timeout,
    /// An error response (4xx–6xx) or a zero-length grant.
    Rejected,
    /// The PBX ended the subscription (`Subscription-State: terminated`)
    /// or no longer knows it (`481` to a refresh).
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
    /// A SUBSCRIBE is in flight. `grant_ends`: a refresh, and the previous
    /// grant still holds until then (active); `None`: a new dialog, or a
    /// refresh whose previous grant has ended (not active).
    InFlight { grant_ends: Option<Instant> },
    /// Established: refresh at `refresh_at`; the PBX holds it until `grant_ends`.
    Active { refresh_at: Instant, grant_ends: Instant },
    /// The unsubscribe (`Expires: 0`) is in flight.
    Closing,
    /// Unsubscribed on shutdown (or nothing to unsubscribe): nothing more happens.
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
    /// When the PBX last showed it holds this dialog (a 2xx, or a NOTIFY
    /// saying active or pending).
    confirmed_at: Option<Instant>,
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

fn retry_after(seconds: Option<u32>) -> Option<Duration> {
    seconds.map(|s| Duration::from_secs(u64::from(s.min(3600))))
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
            confirmed_at: None,
        }
    }

    /// The PBX holds this subscription, as far as callbridge knows: granted
    /// and not yet lapsed, dropped (`481`, `terminated`) or failed to refresh.
    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Active { .. } | Phase::InFlight { grant_ends: Some(_) })
    }

    /// The unsubscribe is in flight.
    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// Unsubscribed (or nothing to unsubscribe): shutdown is done with it.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Why the subscription last failed (cleared by a success).
    pub fn last_failure(&self) -> Option<Failure> {
        self.last_failure
    }

    /// When [`Subscription::poll`] has a request to send.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Waiting(at) => Some(at),
            Phase::Active { refresh_at, .. } => Some(refresh_at),
            Phase::InFlight { .. } | Phase::Closing | Phase::Closed => None,
        }
    }

    /// When the grant ends if nothing renews it ([`Subscription::lapse`]);
    /// this happens whether or not requests can be sent.
    pub fn lapse_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Active { grant_ends, .. } | Phase::InFlight { grant_ends: Some(grant_ends) } => Some(grant_ends),
            _ => None,
        }
    }

    /// When the PBX last confirmed an active subscription (its 2xx or an
    /// active NOTIFY): the oldest is the one worth probing.
    pub fn last_confirmed(&self) -> Option<Instant> {
        match self.phase {
            Phase::Active { .. } => self.confirmed_at,
            _ => None,
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

    /// The grant ended with no refresh answered (the refresh could not be
    /// sent, or is still unanswered): no longer active. Returns true when
    /// this changed anything.
    pub fn lapse(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Active { grant_ends, .. } if now >= grant_ends => {
                self.last_failure = Some(Failure::Timeout);
                self.confirmed_at = None;
                self.phase = Phase::Waiting(now);
                true
            }
            Phase::InFlight { grant_ends: Some(g) } if now >= g => {
                self.phase = Phase::InFlight { grant_ends: None };
                true
            }
            _ => false,
        }
    }

    /// Timers: the initial SUBSCRIBE, a retry or a refresh.
    pub fn poll(&mut self, now: Instant) -> Option<SubscribeRequest> {
        self.lapse(now);
        match self.phase {
            Phase::Waiting(at) if now >= at => Some(self.fresh()),
            Phase::Active { refresh_at, .. } if now >= refresh_at => Some(self.refresh()),
            _ => None,
        }
    }

    /// The PBX may have lost its subscriptions (it answered again after a
    /// silence, answered OPTIONS differently, or forgot another one): check
    /// this one at `at`. Active: refresh then (the answer is `200`, or `481`
    /// and a new dialog). Waiting for a retry: retry then, backoff reset.
    /// In flight: nothing, unless `in_flight_lost` (the PBX was silent or
    /// the connection carrying it closed), then the request is sent anew at
    /// `at` (a refresh in the same dialog, a new dialog otherwise).
    pub fn verify(&mut self, at: Instant, in_flight_lost: bool) {
        match self.phase {
            Phase::Waiting(t) => {
                self.failures = 0;
                self.phase = Phase::Waiting(t.min(at));
            }
            Phase::Active { refresh_at, grant_ends } => {
                self.phase = Phase::Active { refresh_at: refresh_at.min(at), grant_ends };
            }
            Phase::InFlight { grant_ends: Some(grant_ends) } if in_flight_lost => {
                self.in_flight = None;
                self.phase = Phase::Active { refresh_at: at, grant_ends };
            }
            Phase::InFlight { grant_ends: None } if in_flight_lost => {
                self.in_flight = None;
                self.phase = Phase::Waiting(at);
            }
            Phase::InFlight { .. } | Phase::Closing | Phase::Closed => {}
        }
    }

    /// Asks for a refresh now (a version gap in partial state: the NOTIFY
    /// that answers the refresh carries full state; or a keepalive probe).
    pub fn refresh_now(&mut self, now: Instant) {
        if let Phase::Active { grant_ends, .. } = self.phase {
            self.phase = Phase::Active { refresh_at: now, grant_ends };
        }
    }

    /// The unsubscribe (`Expires: 0`) for shutdown, when the PBX may hold
    /// the dialog (granted, or a NOTIFY told its tag). Its challenge is
    /// answered like any other; its final answer or timeout closes.
    pub fn close(&mut self) -> Option<SubscribeRequest> {
        let held = matches!(self.phase, Phase::Active { .. } | Phase::InFlight { .. })
            && self.dialog.as_ref().is_some_and(|d| d.remote_tag.is_some());
        if held {
            let req = self.in_dialog(0);
            self.phase = Phase::Closing;
            Some(req)
        } else {
            self.in_flight = None;
            self.phase = Phase::Closed;
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
        self.confirmed_at = None;
        let mut req = self.in_dialog(self.params.expires);
        req.fresh = true;
        self.phase = Phase::InFlight { grant_ends: None };
        req
    }

    fn refresh(&mut self) -> SubscribeRequest {
        let grant_ends = self.lapse_deadline();
        let req = self.in_dialog(self.params.expires);
        self.phase = Phase::InFlight { grant_ends };
        req
    }

    /// The next request of the current dialog, now in flight (the caller
    /// sets the phase).
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
        self.in_flight = Some(req.clone());
        req
    }

    fn fail(&mut self, now: Instant, why: Failure, jitter: f64, at_least: Option<Duration>) {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = Some(why);
        self.in_flight = None;
        self.confirmed_at = None;
        let delay = backoff(self.failures, self.params.retry_max, jitter).max(at_least.unwrap_or_default());
        self.phase = Phase::Waiting(now + delay);
    }

    fn closed(&mut self) {
        self.in_flight = None;
        self.phase = Phase::Closed;
    }

    /// A final or provisional response to the SUBSCRIBE in flight.
    /// Returns the request to send next, if any (an authenticated retry,
    /// a retry with a longer Expires, or a new dialog after a `481`).
    pub fn on_response(&mut self, now: Instant, r: &Response<'_>, jitter: f64) -> Option<SubscribeRequest> {
        let in_flight = self.in_flight.clone()?;
        if r.cseq != in_flight.cseq || r.status < 200 {
            return None;
        }
        if self.phase == Phase::Closing {
            // The unsubscribe: answer its challenge, anything else ends it.
            let next = matches!(r.status, 401 | 407).then(|| self.answer_challenge(r, in_flight)).flatten();
            if next.is_none() {
                self.closed();
            }
            return next;
        }
        match r.status {
            200..=299 => {
                self.on_success(now, r, &in_flight, jitter);
                None
            }
            401 | 407 => {
                let next = self.answer_challenge(r, in_flight);
                if next.is_none() {
                    self.fail(now, Failure::Auth, jitter, None);
                }
                next
            }
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
                self.last_failure = Some(Failure::Terminated);
                Some(self.fresh())
            }
            _ => {
                self.fail(now, Failure::Rejected, jitter, retry_after(r.retry_after));
                None
            }
        }
    }

    /// A 2xx: the subscription is active, unless the PBX granted no time at all.
    fn on_success(&mut self, now: Instant, r: &Response<'_>, in_flight: &SubscribeRequest, jitter: f64) {
        let granted = r.expires.unwrap_or(in_flight.expires);
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
        self.confirmed_at = Some(now);
        self.phase = Phase::Active {
            refresh_at: now + refresh_delay(granted),
            grant_ends: now + Duration::from_secs(u64::from(granted)),
        };
    }

    /// A 401/407: the same request again with credentials, once per
    /// challenge. `None`: refused credentials or an unusable challenge.
    fn answer_challenge(&mut self, r: &Response<'_>, in_flight: SubscribeRequest) -> Option<SubscribeRequest> {
        let proxy = r.status == 407;
        let header = if proxy { r.proxy_authenticate } else { r.www_authenticate };
        let challenge = Challenge::parse(header?).ok()?;
        // Same nonce, not stale: the PBX refused these credentials.
        let refused = self.sent_nonce.as_deref() == Some(challenge.nonce.as_str()) && !challenge.stale;
        if refused || self.challenges >= MAX_CHALLENGES {
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
        self.in_flight = Some(req.clone());
        Some(req)
    }

    /// The SUBSCRIBE in flight got no final response in time.
    pub fn on_timeout(&mut self, now: Instant, cseq: u32, jitter: f64) {
        if self.in_flight_cseq() != Some(cseq) {
            return;
        }
        if self.phase == Phase::Closing {
            self.closed();
        } else {
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
        if matches!(self.phase, Phase::Closing | Phase::Closed) {
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
                self.confirmed_at = Some(now);
                if let (Some(expires), Phase::Active { refresh_at, .. }) = (state.expires, &self.phase) {
                    self.phase = Phase::Active {
                        refresh_at: (*refresh_at).min(now + refresh_delay(expires)),
                        grant_ends: now + Duration::from_secs(u64::from(expires)),
                    };
                }
                None
            }
            SubStateValue::Terminated => {
                self.in_flight = None;
                self.confirmed_at = None;
                let after = retry_after(state.retry_after);
                match (state.reason.as_deref(), after) {
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
                        self.fail(now, Failure::Terminated, jitter, after);
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
    fn refresh_answered_481_starts_over_and_is_no_longer_active() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        let r = s.poll(t0).unwrap();
        assert!(!s.is_active(), "a new dialog in flight is not active");
        s.on_response(t0, &ok(r.cseq, 60), 0.0);
        assert!(s.is_active());
        let t1 = t0 + Duration::from_secs(51);
        let refresh = s.poll(t1).unwrap();
        assert!(!refresh.fresh);
        assert!(s.is_active(), "a refresh in flight: the previous grant still holds");
        let gone = Response { status: 481, cseq: refresh.cseq, ..Response::default() };
        let fresh = s.on_response(t1, &gone, 0.0).unwrap();
        assert!(fresh.fresh && fresh.call_id != r.call_id && fresh.remote_tag.is_none());
        assert!(!s.is_active(), "481: the PBX holds nothing");
        assert_eq!(s.last_failure(), Some(Failure::Terminated));
        s.on_response(t1, &ok(fresh.cseq, 600), 0.0);
        assert!(s.is_active());
        assert_eq!(s.last_failure(), None);
    }

    #[test]
    fn a_grant_that_ends_unrefreshed_is_no_longer_active() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        let r = s.poll(t0).unwrap();
        s.on_response(t0, &ok(r.cseq, 100), 0.0);
        assert_eq!(s.lapse_deadline(), Some(t0 + Duration::from_secs(100)));
        // The refresh cannot go out (no connection): the grant lapses.
        assert!(!s.lapse(t0 + Duration::from_secs(99)));
        assert!(s.lapse(t0 + Duration::from_secs(100)));
        assert!(!s.is_active());
        assert_eq!(s.last_failure(), Some(Failure::Timeout));
        assert!(s.poll(t0 + Duration::from_secs(100)).unwrap().fresh);
        // A refresh left unanswered past the grant: in flight, not active.
        let mut s = Subscription::new(params(), t0);
        let r = s.poll(t0).unwrap();
        s.on_response(t0, &ok(r.cseq, 100), 0.0);
        s.poll(t0 + Duration::from_secs(85)).unwrap();
        assert!(s.is_active());
        assert!(s.lapse(t0 + Duration::from_secs(100)));
        assert!(!s.is_active());
        assert_eq!(s.lapse_deadline(), None);
    }

    #[test]
    fn verify_refreshes_active_retries_waiting_and_resends_lost_requests() {
        let t0 = Instant::now();
        let soon = t0 + Duration::from_millis(300);
        // Active: refreshed at the given time, in the same dialog.
        let mut s = Subscription::new(params(), t0);
        let r = s.poll(t0).unwrap();
        s.on_response(t0, &ok(r.cseq, 600), 0.0);
        s.verify(soon, false);
        assert_eq!(s.deadline(), Some(soon));
        assert!(s.is_active());
        let check = s.poll(soon).unwrap();
        assert!(!check.fresh && check.call_id == r.call_id && check.remote_tag.is_some());
        // A refresh in flight is left alone when the PBX answers…
        s.verify(soon + Duration::from_secs(1), false);
        assert_eq!(s.deadline(), None);
        // …and sent anew when it was lost (the PBX was silent).
        s.verify(soon + Duration::from_secs(1), true);
        assert_eq!(s.deadline(), Some(soon + Duration::from_secs(1)));
        assert!(s.is_active());
        let again = s.poll(soon + Duration::from_secs(1)).unwrap();
        assert_eq!((again.call_id.as_str(), again.cseq), (r.call_id.as_str(), check.cseq + 1));
        assert!(s.on_response(soon, &ok(check.cseq, 600), 0.0).is_none(), "the answer to the lost one is ignored");
        // Waiting after failures: retried at the given time, backoff reset.
        let mut s = Subscription::new(params(), t0);
        for _ in 0..5 {
            let at = s.deadline().unwrap();
            let r = s.poll(at).unwrap();
            s.on_timeout(at, r.cseq, 1.0);
        }
        let t1 = s.deadline().unwrap() - Duration::from_secs(10);
        s.verify(t1, false);
        assert_eq!(s.deadline(), Some(t1));
        let r = s.poll(t1).unwrap();
        s.on_timeout(t1, r.cseq, 1.0);
        assert_eq!(s.deadline(), Some(t1 + Duration::from_secs(1)), "first backoff again");
        // A new dialog in flight and lost: a new dialog at the given time.
        let first = s.poll(t1 + Duration::from_secs(1)).unwrap();
        s.verify(t1 + Duration::from_secs(2), true);
        let second = s.poll(t1 + Duration::from_secs(2)).unwrap();
        assert!(second.fresh && second.call_id != first.call_id);
    }

    #[test]
    fn the_oldest_confirmation_is_the_one_to_probe() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        let r = s.poll(t0).unwrap();
        assert_eq!(s.last_confirmed(), None);
        s.on_response(t0, &ok(r.cseq, 600), 0.0);
        assert_eq!(s.last_confirmed(), Some(t0));
        let t1 = t0 + Duration::from_secs(20);
        s.on_notify(t1, SubState::parse("active;expires=580").as_ref(), None, 0.0);
        assert_eq!(s.last_confirmed(), Some(t1), "an active NOTIFY shows the PBX holds it");
        s.refresh_now(t1);
        s.poll(t1).unwrap();
        assert_eq!(s.last_confirmed(), None, "being checked");
    }

    #[test]
    fn unsubscribe_answers_its_challenge() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        let r = s.poll(t0).unwrap();
        s.on_response(t0, &ok(r.cseq, 600), 0.0);
        let bye = s.close().unwrap();
        assert_eq!((bye.expires, bye.cseq, bye.authorization.is_none()), (0, 2, true));
        assert!(s.is_closing() && !s.is_active() && !s.is_closed());
        // chan_sip challenges the unsubscribe like any SUBSCRIBE.
        let retry = s.on_response(t0, &challenge(2, ASTERISK_CHALLENGE), 0.0).unwrap();
        assert_eq!((retry.expires, retry.cseq, retry.call_id.as_str()), (0, 3, r.call_id.as_str()));
        assert_eq!(retry.remote_tag.as_deref(), Some("as7435ba19"));
        let (name, value) = retry.authorization.unwrap();
        assert_eq!(name, "Authorization");
        assert!(value.contains(r#"nonce="6f956b05""#) && value.contains(r#"uri="sip:2000@127.0.0.1:5060""#));
        assert!(s.is_closing());
        // NOTIFYs (the final terminated one) change nothing.
        let st = SubState::parse("terminated;reason=timeout").unwrap();
        assert!(s.on_notify(t0, Some(&st), None, 0.0).is_none());
        assert!(s.on_response(t0, &ok(3, 0), 0.0).is_none());
        assert!(s.is_closed());
        assert!(s.poll(t0 + Duration::from_secs(10_000)).is_none());

        // Refused credentials, an error or a timeout end it too.
        for end in [401, 481, 0] {
            let mut s = Subscription::new(params(), t0);
            let r = s.poll(t0).unwrap();
            s.on_response(t0, &ok(r.cseq, 600), 0.0);
            s.close().unwrap();
            s.on_response(t0, &challenge(2, ASTERISK_CHALLENGE), 0.0).unwrap();
            match end {
                0 => s.on_timeout(t0, 3, 0.0),
                401 => assert!(s.on_response(t0, &challenge(3, ASTERISK_CHALLENGE), 0.0).is_none()),
                status => {
                    assert!(s.on_response(t0, &Response { status, cseq: 3, ..Response::default() }, 0.0).is_none())
                }
            }
            assert!(s.is_closed(), "{end}");
        }
    }

    #[test]
    fn close_unsubscribes_a_dialog_whose_refresh_is_in_flight() {
        let t0 = Instant::now();
        let mut s = Subscription::new(params(), t0);
        let r = s.poll(t0).unwrap();
        s.on_response(t0, &ok(r.cseq, 60), 0.0);
        let refresh = s.poll(t0 + Duration::from_secs(51)).unwrap();
        let bye = s.close().unwrap();
        assert_eq!((bye.expires, bye.cseq), (0, refresh.cseq + 1));
        assert!(
            s.on_response(t0, &ok(refresh.cseq, 60), 0.0).is_none(),
            "the refresh's answer is not the unsubscribe's"
        );
        assert!(s.is_closing());
        // A new dialog the PBX never answered: nothing to unsubscribe.
        let mut s = Subscription::new(params(), t0);
        s.poll(t0).unwrap();
        assert!(s.close().is_none());
        assert!(s.is_closed());
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
