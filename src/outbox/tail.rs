//! The outbox's recent tail in memory: what sinks read back on the happy
//! path without a query.
//!
//! A sink's runner reads the events after its cursor ([`super::Outbox::pending`]).
//! Keeping up, those are the events just committed, whose JSON the writer
//! still holds: reading them back from SQLite (a read transaction, the
//! b-tree pages from the OS, a thread hop to the blocking pool) cost a
//! tenth of the daemon's CPU at full rate. The writer hands them here
//! instead, right after the commit that stored them.
//!
//! The one invariant: every row of `pending` with `pos >= first` is in
//! `entries`, with its sink's bit set, and nothing else is: a read of the
//! rows after `after >= first - 1` from here gives what SQLite gives. A read
//! from further back goes to SQLite. Whatever the writer does not model
//! here (dead letters requeued, a commit whose fsync failed) resets the
//! tail to empty at the next position, which keeps the invariant trivially.
//! Entries leave from the front once every sink has read past them or
//! none has them pending, or when the tail outgrows its budget.

use super::Record;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes of JSON the tail holds at most: a runner further behind than
/// that reads from SQLite until it catches up. Half of it bounds what one
/// commit holds in the journal (the held events must stay in the tail):
/// a full commit of 4,096 events is 2–5 MB of JSON. Only a sink that
/// lags keeps it filled.
pub(crate) const TAIL_BYTES: usize = 16 << 20;

struct Entry {
    record: Record,
    /// Bit `i`: pending for sink `i`.
    pending: u64,
}

struct Inner {
    /// Position of `entries[0]`; positions are consecutive.
    first: i64,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Per sink, the highest cursor it read after.
    read: Vec<i64>,
}

pub(crate) struct Tail {
    sinks: Vec<Arc<str>>,
    /// Every sink's bit.
    all: u64,
    budget: usize,
    inner: Mutex<Inner>,
}

impl Tail {
    /// An empty tail at `next_pos`. More than 64 sinks: never used.
    pub(crate) fn new(sinks: &[Arc<str>], next_pos: i64, budget: usize) -> Tail {
        let n = sinks.len();
        let all = if n == 0 || n > 64 { 0 } else { u64::MAX >> (64 - n) };
        Tail {
            sinks: sinks.to_vec(),
            all,
            budget,
            inner: Mutex::new(Inner { first: next_pos, entries: VecDeque::new(), bytes: 0, read: vec![0; n] }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sink_index(&self, sink: &str) -> Option<usize> {
        self.sinks.iter().position(|s| **s == *sink)
    }

    /// Up to `limit` records pending for `sink` after `after`, in order; `None`
    /// when the tail does not cover `after` (read SQLite instead).
    pub(crate) fn pending(&self, sink: &str, after: i64, limit: usize) -> Option<Vec<Record>> {
        if self.all == 0 {
            return None;
        }
        let i = self.sink_index(sink)?;
        let bit = 1u64 << i;
        let mut t = self.lock();
        if after < t.first - 1 {
            return None;
        }
        t.read[i] = t.read[i].max(after);
        let skip = usize::try_from(after + 1 - t.first).unwrap_or(0);
        let out: Vec<Record> = t
            .entries
            .iter()
            .skip(skip)
            .filter(|e| e.pending & bit != 0)
            .take(limit)
            .map(|e| e.record.clone())
            .collect();
        t.trim(self.budget);
        Some(out)
    }

    /// The first position the tail covers.
    pub(crate) fn first(&self) -> i64 {
        self.lock().first
    }

    /// Records just committed, pending for every sink, at consecutive
    /// positions from where the tail ends.
    pub(crate) fn appended(&self, records: Vec<Record>) {
        if self.all == 0 || records.is_empty() {
            return;
        }
        let mut t = self.lock();
        let end = t.first + t.entries.len() as i64;
        if records[0].pos != end || records.windows(2).any(|w| w[1].pos != w[0].pos + 1) {
            // Not the positions expected: never serve a guess.
            let next = records.last().map_or(end, |r| r.pos + 1).max(end);
            t.reset(next);
            return;
        }
        for record in records {
            t.bytes += record.body.len();
            t.entries.push_back(Entry { record, pending: self.all });
        }
        t.trim(self.budget);
    }

    /// `sink`'s rows at `positions` left `pending` (acknowledged or parked).
    pub(crate) fn done(&self, sink: &str, positions: impl Iterator<Item = i64>) {
        let Some(i) = self.sink_index(sink) else { return };
        let mut t = self.lock();
        let first = t.first;
        for pos in positions {
            if let Some(e) = usize::try_from(pos - first).ok().and_then(|k| t.entries.get_mut(k)) {
                e.pending &= !(1u64 << i);
            }
        }
        t.trim(self.budget);
    }

    /// Forgets everything: the next rows start at `next_pos`.
    pub(crate) fn reset(&self, next_pos: i64) {
        self.lock().reset(next_pos);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

impl Inner {
    fn reset(&mut self, next_pos: i64) {
        self.first = next_pos.max(self.first + self.entries.len() as i64);
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops front entries no sink still needs from here, and any beyond the
    /// budget.
    fn trim(&mut self, budget: usize) {
        let slowest = self.read.iter().copied().min().unwrap_or(i64::MAX);
        while let Some(e) = self.entries.front() {
            let needed = e.pending != 0 && e.record.pos > slowest;
            if needed && self.bytes <= budget {
                break;
            }
            self.bytes -= e.record.body.len();
            self.entries.pop_front();
            self.first += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(pos: i64, body: &str) -> Record {
        Record::for_test(pos, "c", "call.started", body)
    }

    fn sinks(names: &[&str]) -> Vec<Arc<str>> {
        names.iter().map(|s| Arc::from(*s)).collect()
    }

    fn positions(r: Option<Vec<Record>>) -> Option<Vec<i64>> {
        r.map(|r| r.iter().map(|r| r.pos).collect())
    }

    #[test]
    fn serves_reads_it_covers_and_sends_the_others_to_the_store() {
        let t = Tail::new(&sinks(&["a", "b"]), 10, 1 << 20);
        t.appended((10..15).map(|p| rec(p, "{}")).collect());
        assert_eq!(positions(t.pending("a", 9, 100)), Some(vec![10, 11, 12, 13, 14]));
        assert_eq!(positions(t.pending("a", 11, 2)), Some(vec![12, 13]));
        assert_eq!(positions(t.pending("a", 14, 2)), Some(vec![]));
        assert_eq!(positions(t.pending("a", 8, 100)), None, "position 9 may be in the store");
        assert_eq!(positions(t.pending("c", 9, 100)), None, "not a sink of this tail");
    }

    #[test]
    fn entries_leave_once_read_by_every_sink_or_done_for_all() {
        let t = Tail::new(&sinks(&["a", "b"]), 1, 1 << 20);
        t.appended((1..=4).map(|p| rec(p, "{}")).collect());
        t.pending("a", 2, 100);
        assert_eq!(t.len(), 4, "b has read nothing yet");
        t.pending("b", 1, 100);
        assert_eq!(t.len(), 3, "both read past 1");
        assert_eq!(positions(t.pending("b", 0, 100)), None, "1 is gone: the store answers");
        // a acknowledged 2 and 3: b still reads them, a does not.
        t.done("a", [2, 3].into_iter());
        assert_eq!(positions(t.pending("a", 1, 100)), Some(vec![4]));
        assert_eq!(positions(t.pending("b", 1, 100)), Some(vec![2, 3, 4]));
        t.done("b", [2, 3, 4].into_iter());
        t.done("a", [4].into_iter());
        assert_eq!(t.len(), 0);
        assert_eq!(positions(t.pending("a", 4, 100)), Some(vec![]));
    }

    #[test]
    fn the_budget_drops_the_oldest_first() {
        let t = Tail::new(&sinks(&["a"]), 1, 25);
        t.appended((1..=5).map(|p| rec(p, "0123456789")).collect());
        assert_eq!(t.len(), 2);
        assert_eq!(positions(t.pending("a", 0, 100)), None);
        assert_eq!(positions(t.pending("a", 3, 100)), Some(vec![4, 5]));
    }

    #[test]
    fn positions_it_did_not_expect_and_resets_leave_it_empty_after_them() {
        let t = Tail::new(&sinks(&["a"]), 1, 1 << 20);
        t.appended(vec![rec(1, "{}"), rec(3, "{}")]);
        assert_eq!(t.len(), 0);
        assert_eq!(positions(t.pending("a", 2, 100)), None, "3 is in the store only");
        assert_eq!(positions(t.pending("a", 3, 100)), Some(vec![]));
        t.appended(vec![rec(4, "{}")]);
        t.reset(9);
        assert_eq!(positions(t.pending("a", 7, 100)), None);
        t.reset(2);
        t.appended(vec![rec(9, "{}")]);
        assert_eq!(positions(t.pending("a", 8, 100)), Some(vec![9]), "a reset never moves back");
    }

    #[test]
    fn more_sinks_than_bits_or_none_never_use_it() {
        let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        let names: Vec<&str> = many.iter().map(String::as_str).collect();
        let t = Tail::new(&sinks(&names), 1, 1 << 20);
        t.appended(vec![rec(1, "{}")]);
        assert_eq!(positions(t.pending("s0", 0, 100)), None);
        let t = Tail::new(&[], 1, 1 << 20);
        assert_eq!(positions(t.pending("a", 0, 100)), None);
    }
}
