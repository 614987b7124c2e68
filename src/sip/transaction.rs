//! Client transactions (RFC 3261 §17.1.2, non-INVITE) without I/O: which
//! requests are waiting for a final response, when a request sent over UDP
//! is retransmitted (timer E: T1, doubling up to T2; T2 once a provisional
//! response arrived), when it has failed (the request timeout, timer F),
//! and which request a response answers (by the top Via `branch`).
//!
//! The caller owns the socket and the clock: it hands in `Instant`s, sends
//! the bytes [`Transactions::poll`] returns, sleeps until
//! [`Transactions::next_deadline`], and reports every response with
//! [`Transactions::on_response`]. What a request was for is the caller's
//! own `P` (the user agent's purpose); this module only keeps and returns
//! it. It does no I/O, reads no clock and never parses bytes.

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// RFC 3261 timer T1 (first retransmission of a UDP request).
pub const T1: Duration = Duration::from_millis(500);
/// RFC 3261 timer T2 (cap of the retransmission interval).
pub const T2: Duration = Duration::from_secs(4);

#[derive(Debug)]
struct Txn<P> {
    purpose: P,
    bytes: Vec<u8>,
    sent_at: Instant,
    /// `None` on a reliable transport (TCP): nothing is retransmitted.
    retransmit_at: Option<Instant>,
    interval: Duration,
    deadline: Instant,
}

/// What the timers due at some instant ask for.
#[derive(Debug, PartialEq, Eq)]
pub struct Due<P> {
    /// Requests to send again, as they were first sent.
    pub resend: Vec<Vec<u8>>,
    /// Transactions that got no final response in time (now forgotten),
    /// earliest deadline first.
    pub expired: Vec<P>,
}

/// What a response is to the transactions in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched<P> {
    /// No request in progress has this branch (a late or stray response).
    Unknown,
    /// A provisional (1xx) response: the request is still in progress, and
    /// is retransmitted every T2 from now on.
    Provisional,
    /// The final response: the transaction is over.
    Final {
        purpose: P,
        /// From the first send to this response.
        elapsed: Duration,
    },
}

/// The client transactions in progress, keyed by branch.
#[derive(Debug)]
pub struct Transactions<P> {
    txns: HashMap<String, Txn<P>>,
    retransmit: bool,
    timeout: Duration,
}

impl<P: Clone> Transactions<P> {
    /// `retransmit`: the transport is unreliable (UDP). `timeout`: how long
    /// a request may wait for its final response.
    pub fn new(retransmit: bool, timeout: Duration) -> Transactions<P> {
        Transactions { txns: HashMap::new(), retransmit, timeout }
    }

    /// Records a request the caller sent at `now` with this `branch`. A
    /// transaction with the same branch is replaced.
    pub fn start(&mut self, branch: String, purpose: P, bytes: Vec<u8>, now: Instant) {
        let txn = Txn {
            purpose,
            bytes,
            sent_at: now,
            retransmit_at: self.retransmit.then_some(now + T1),
            interval: T1,
            deadline: now + self.timeout,
        };
        self.txns.insert(branch, txn);
    }

    /// The earliest instant at which [`Transactions::poll`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.txns.values().flat_map(|t| [Some(t.deadline), t.retransmit_at]).flatten().min()
    }

    /// The timers due at `now`: requests to retransmit (their next
    /// retransmission is scheduled) and transactions that failed (removed).
    pub fn poll(&mut self, now: Instant) -> Due<P> {
        let mut expired = Vec::new();
        let mut resend = Vec::new();
        for (branch, t) in &mut self.txns {
            if t.deadline <= now {
                expired.push((t.deadline, branch.clone()));
            } else if let Some(at) = t.retransmit_at.filter(|at| *at <= now) {
                t.interval = (t.interval * 2).min(T2);
                t.retransmit_at = Some(at.max(now) + t.interval);
                resend.push(t.bytes.clone());
            }
        }
        expired.sort();
        let expired = expired.into_iter().filter_map(|(_, b)| self.txns.remove(&b)).map(|t| t.purpose).collect();
        Due { resend, expired }
    }

    /// Matches a response (its top Via `branch` and status) received at
    /// `now` to the request it answers.
    pub fn on_response(&mut self, branch: &str, status: u16, now: Instant) -> Matched<P> {
        let Some(txn) = self.txns.get_mut(branch) else { return Matched::Unknown };
        if status < 200 {
            // Proceeding: keep retransmitting, at T2 (RFC 3261 §17.1.2.2).
            txn.interval = T2;
            if let Some(r) = txn.retransmit_at.as_mut() {
                *r = now + T2;
            }
            return Matched::Provisional;
        }
        match self.txns.remove(branch) {
            Some(t) => Matched::Final { purpose: t.purpose, elapsed: now.saturating_duration_since(t.sent_at) },
            None => Matched::Unknown,
        }
    }

    /// The peer answers again after a silence: every request still waiting
    /// (over UDP) is to be sent again now, not at its next timer E, which
    /// may be up to T2 away; each one's timer E starts over at T1. The
    /// timeouts stay. Returns the bytes to send.
    pub fn resend_all(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut resend = Vec::new();
        for t in self.txns.values_mut().filter(|t| t.retransmit_at.is_some()) {
            t.interval = T1;
            t.retransmit_at = Some(now + T1);
            resend.push(t.bytes.clone());
        }
        resend
    }

    /// Forgets the transactions whose purpose matches (a request
    /// superseded by a newer one); returns how many there were.
    pub fn abandon(&mut self, superseded: impl Fn(&P) -> bool) -> usize {
        let before = self.txns.len();
        self.txns.retain(|_, t| !superseded(&t.purpose));
        before - self.txns.len()
    }

    /// Transactions in progress.
    pub fn len(&self) -> usize {
        self.txns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn udp() -> (Transactions<&'static str>, Instant) {
        (Transactions::new(true, Duration::from_secs(32)), Instant::now())
    }

    /// Polls at every deadline until `until`; returns when each resend
    /// happened (relative to `t0`) and what expired.
    fn run(
        txns: &mut Transactions<&'static str>,
        t0: Instant,
        until: Duration,
    ) -> (Vec<Duration>, Vec<(Duration, &'static str)>) {
        let (mut sends, mut expired) = (Vec::new(), Vec::new());
        while let Some(at) = txns.next_deadline().filter(|at| *at <= t0 + until) {
            let due = txns.poll(at);
            assert!(!due.resend.is_empty() || !due.expired.is_empty(), "woken for nothing at {:?}", at - t0);
            sends.extend(due.resend.iter().map(|_| at - t0));
            expired.extend(due.expired.into_iter().map(|p| (at - t0, p)));
        }
        (sends, expired)
    }

    #[test]
    fn udp_requests_are_retransmitted_at_t1_doubling_to_t2_until_the_timeout() {
        let (mut txns, t0) = udp();
        txns.start("z9hG4bK1".into(), "subscribe", b"SUBSCRIBE".to_vec(), t0);
        assert_eq!(txns.next_deadline(), Some(t0 + T1));
        assert_eq!(txns.poll(t0 + T1 - MS), Due { resend: vec![], expired: vec![] });
        let (sends, expired) = run(&mut txns, t0, Duration::from_secs(40));
        let ms: Vec<u128> = sends.iter().map(Duration::as_millis).collect();
        // Intervals 0.5, 1, 2, 4, 4, 4…; the last send before 32 s is at 31.5 s.
        assert_eq!(ms, [500, 1500, 3500, 7500, 11_500, 15_500, 19_500, 23_500, 27_500, 31_500]);
        assert_eq!(expired, [(Duration::from_secs(32), "subscribe")]);
        assert!(txns.is_empty() && txns.next_deadline().is_none());
    }

    #[test]
    fn retransmissions_carry_the_bytes_first_sent() {
        let (mut txns, t0) = udp();
        txns.start("a".into(), "options", b"OPTIONS one".to_vec(), t0);
        txns.start("b".into(), "subscribe", b"SUBSCRIBE two".to_vec(), t0 + 100 * MS);
        let mut due = txns.poll(t0 + T1 + 100 * MS);
        due.resend.sort();
        assert_eq!(due.resend, [b"OPTIONS one".to_vec(), b"SUBSCRIBE two".to_vec()]);
        // A late poll does not bunch up retransmissions: the next is one
        // interval after the late one.
        assert_eq!(txns.next_deadline(), Some(t0 + T1 + 100 * MS + 2 * T1));
    }

    #[test]
    fn reliable_transports_only_time_out() {
        let mut txns = Transactions::new(false, Duration::from_secs(2));
        let t0 = Instant::now();
        txns.start("z9hG4bK1".into(), "options", b"OPTIONS".to_vec(), t0);
        assert_eq!(txns.next_deadline(), Some(t0 + Duration::from_secs(2)));
        let (sends, expired) = run(&mut txns, t0, Duration::from_secs(10));
        assert!(sends.is_empty());
        assert_eq!(expired, [(Duration::from_secs(2), "options")]);
    }

    #[test]
    fn a_final_response_ends_the_transaction_and_measures_the_round_trip() {
        let (mut txns, t0) = udp();
        txns.start("z9hG4bK1".into(), "options", b"OPTIONS".to_vec(), t0);
        assert_eq!(txns.on_response("z9hG4bK2", 200, t0 + 30 * MS), Matched::Unknown);
        assert_eq!(
            txns.on_response("z9hG4bK1", 200, t0 + 30 * MS),
            Matched::Final { purpose: "options", elapsed: 30 * MS }
        );
        assert_eq!(txns.on_response("z9hG4bK1", 200, t0 + 40 * MS), Matched::Unknown, "a retransmitted 200");
        assert!(txns.next_deadline().is_none());
        assert_eq!(txns.poll(t0 + Duration::from_secs(60)), Due { resend: vec![], expired: vec![] });
    }

    #[test]
    fn a_provisional_response_slows_retransmission_to_t2_but_keeps_the_timeout() {
        let (mut txns, t0) = udp();
        txns.start("b".into(), "subscribe", b"SUBSCRIBE".to_vec(), t0);
        assert_eq!(txns.on_response("b", 100, t0 + 200 * MS), Matched::Provisional);
        assert_eq!(txns.next_deadline(), Some(t0 + 200 * MS + T2));
        let (sends, expired) = run(&mut txns, t0, Duration::from_secs(40));
        let ms: Vec<u128> = sends.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [4200, 8200, 12_200, 16_200, 20_200, 24_200, 28_200]);
        assert_eq!(expired, [(Duration::from_secs(32), "subscribe")]);
        // A final response after a provisional one still matches.
        txns.start("c".into(), "subscribe", b"SUBSCRIBE".to_vec(), t0);
        assert_eq!(txns.on_response("c", 180, t0 + MS), Matched::Provisional);
        assert!(matches!(txns.on_response("c", 481, t0 + 2 * MS), Matched::Final { purpose: "subscribe", .. }));
    }

    #[test]
    fn resend_all_sends_waiting_requests_now_and_restarts_timer_e() {
        let (mut txns, t0) = udp();
        txns.start("a".into(), "subscribe", b"SUBSCRIBE".to_vec(), t0);
        let (sends, _) = run(&mut txns, t0, Duration::from_secs(8));
        assert_eq!(sends.len(), 4, "0.5, 1.5, 3.5, 7.5 s: the next one is at 11.5 s");
        let now = t0 + Duration::from_secs(9);
        assert_eq!(txns.resend_all(now), [b"SUBSCRIBE".to_vec()]);
        assert_eq!(txns.next_deadline(), Some(now + T1));
        let (sends, expired) = run(&mut txns, t0, Duration::from_secs(40));
        let ms: Vec<u128> = sends.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [9500, 10_500, 12_500, 16_500, 20_500, 24_500, 28_500]);
        assert_eq!(expired, [(Duration::from_secs(32), "subscribe")], "the timeout stays");
        // Nothing to resend over a reliable transport.
        let mut tcp = Transactions::new(false, Duration::from_secs(2));
        tcp.start("b".into(), "options", b"OPTIONS".to_vec(), t0);
        assert!(tcp.resend_all(t0).is_empty());
    }

    #[test]
    fn expired_transactions_come_earliest_first_and_superseded_ones_are_forgotten() {
        let mut txns = Transactions::new(false, Duration::from_secs(1));
        let t0 = Instant::now();
        txns.start("late".into(), "second", vec![], t0 + 10 * MS);
        txns.start("early".into(), "first", vec![], t0);
        txns.start("gone".into(), "old refresh", vec![], t0);
        assert_eq!(txns.abandon(|p| *p == "old refresh"), 1);
        assert_eq!(txns.abandon(|p| *p == "nothing"), 0);
        assert_eq!(txns.len(), 2);
        let due = txns.poll(t0 + Duration::from_secs(2));
        assert_eq!(due.expired, ["first", "second"]);
        // Starting again with a known branch replaces the transaction.
        txns.start("x".into(), "a", vec![1], t0);
        txns.start("x".into(), "b", vec![2], t0);
        assert_eq!(txns.len(), 1);
        assert!(matches!(txns.on_response("x", 200, t0), Matched::Final { purpose: "b", .. }));
    }
}
