//! The outbox's single writer: opens the store, then applies queued requests
//! in group commits (see the module doc of `crate::outbox` for the design).
//!
//! Runs on its own OS thread: SQLite calls block, and a commit's fsync must
//! never stall the async runtime. It must never reply `Ok` to an append
//! before the commit that contains it returned.

use super::{now_micros, publish_counters, AppendOutcome, NewRecord, Op, OutboxError, OutboxOptions, Shared};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// File name of the database inside the outbox directory.
pub const DB_FILE: &str = "outbox.sqlite3";
const RESERVE_FILE: &str = "reserve";
const FORMAT_VERSION: &str = "1";
/// Tombstones deleted per compaction at most (bounds the pause).
const COMPACT_DELETE_LIMIT: i64 = 20_000;
/// Free pages returned to the filesystem per compaction at most.
const VACUUM_PAGES: i64 = 4096;
/// The WAL is checkpointed into the main file every this many pages…
const WAL_AUTOCHECKPOINT_PAGES: i64 = 256;
/// …and truncated back to this size afterwards.
const WAL_LIMIT_BYTES: i64 = 1 << 20;
/// How often a full or failing store checks whether it can write again.
const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);

pub(crate) struct StoreState {
    pub next_pos: i64,
    pub depth: i64,
    pub dead_letters: i64,
}

fn storage(e: rusqlite::Error) -> OutboxError {
    if is_full(&e) {
        OutboxError::DiskFull
    } else {
        OutboxError::Storage(e)
    }
}

fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

/// A reply-safe copy of a write error (rusqlite errors are not `Clone`).
fn error_copy(e: &rusqlite::Error) -> OutboxError {
    if is_full(e) {
        return OutboxError::DiskFull;
    }
    let code = match e {
        rusqlite::Error::SqliteFailure(f, _) => *f,
        _ => rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
    };
    OutboxError::Storage(rusqlite::Error::SqliteFailure(code, Some(e.to_string())))
}

/// Opens or creates the store; returns its counters and the write connection.
pub(crate) fn open_store(dir: &Path, opts: &OutboxOptions) -> Result<(StoreState, Connection), OutboxError> {
    let path = dir.join(DB_FILE);
    let conn = Connection::open(&path).map_err(storage)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(storage)?;
    // auto_vacuum only takes effect before the first table exists.
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;").map_err(storage)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(storage)?;
    if !mode.eq_ignore_ascii_case("wal") {
        warn!(mode = %mode, "outbox: WAL journal unavailable; commits are slower");
    }
    // FULL in WAL mode: the WAL is fsync'd at every commit (power-loss safe).
    // A small WAL, checkpointed often and truncated back to WAL_LIMIT_BYTES,
    // keeps the data in the main file: on a full disk the ballast then covers
    // what a checkpoint and the acknowledgements need.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = OFF;
         PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES};"
    ))
    .map_err(storage)?;
    let _: i64 =
        conn.query_row(&format!("PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}"), [], |r| r.get(0)).map_err(storage)?;
    if opts.max_bytes > 0 {
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(storage)?;
        let pages = (opts.max_bytes as i64 / page.max(512)).max(16);
        let _: i64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| r.get(0)).map_err(storage)?;
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS events(
             seq INTEGER PRIMARY KEY,
             id TEXT NOT NULL UNIQUE,
             key TEXT NOT NULL,
             type TEXT NOT NULL,
             body TEXT NOT NULL,
             appended_at INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS delivered(
             id TEXT PRIMARY KEY, done_at INTEGER NOT NULL) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS delivered_done ON delivered(done_at);
         CREATE TABLE IF NOT EXISTS pending(
             sink TEXT NOT NULL, pos INTEGER NOT NULL, seq INTEGER NOT NULL,
             PRIMARY KEY(sink, pos)) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS pending_seq ON pending(seq);
         CREATE TABLE IF NOT EXISTS dead_letters(
             seq INTEGER NOT NULL, sink TEXT NOT NULL, parked_at INTEGER NOT NULL,
             status INTEGER, reason TEXT NOT NULL,
             PRIMARY KEY(seq, sink)) WITHOUT ROWID;",
    )
    .map_err(storage)?;
    let version: Option<String> =
        conn.query_row("SELECT v FROM meta WHERE k = 'format'", [], |r| r.get(0)).optional().map_err(storage)?;
    match version {
        None => {
            conn.execute("INSERT INTO meta(k, v) VALUES ('format', ?1)", [FORMAT_VERSION]).map_err(storage)?;
        }
        Some(v) if v == FORMAT_VERSION => {}
        Some(found) => return Err(OutboxError::Format { path, found, expected: FORMAT_VERSION }),
    }

    // Sinks no longer configured: their queues go (the events stay for the
    // others, or become tombstones).
    let known: Vec<String> = {
        let mut st = conn.prepare("SELECT DISTINCT sink FROM pending").map_err(storage)?;
        let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(storage)?;
        rows.collect::<Result<_, _>>().map_err(storage)?
    };
    let mut dropped = 0usize;
    for s in known.iter().filter(|s| !opts.sinks.iter().any(|x| x == *s)) {
        let n = conn.execute("DELETE FROM pending WHERE sink = ?1", [s]).map_err(storage)?;
        warn!(sink = %s, events = n, "outbox: sink no longer configured; its undelivered events are dropped from its queue");
        dropped += n;
    }
    if dropped > 0 {
        conn.execute_batch(&format!(
            "BEGIN;
             INSERT OR IGNORE INTO delivered(id, done_at) SELECT id, {now} FROM events e
              WHERE NOT EXISTS(SELECT 1 FROM pending p WHERE p.seq = e.seq)
                AND NOT EXISTS(SELECT 1 FROM dead_letters d WHERE d.seq = e.seq);
             DELETE FROM events WHERE NOT EXISTS(SELECT 1 FROM pending p WHERE p.seq = events.seq)
                AND NOT EXISTS(SELECT 1 FROM dead_letters d WHERE d.seq = events.seq);
             COMMIT;",
            now = now_micros()
        ))
        .map_err(storage)?;
    }
    let depth: i64 = conn.query_row("SELECT COUNT(DISTINCT seq) FROM pending", [], |r| r.get(0)).map_err(storage)?;
    let dead_letters: i64 = conn.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0)).map_err(storage)?;
    let max_seq: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0)).map_err(storage)?;
    let max_pos: i64 =
        conn.query_row("SELECT COALESCE(MAX(pos), 0) FROM pending", [], |r| r.get(0)).map_err(storage)?;
    if depth > 0 {
        info!(events = depth, "outbox: undelivered events from a previous run go first");
    }
    write_reserve(dir, opts.reserve_bytes);
    Ok((StoreState { next_pos: max_seq.max(max_pos) + 1, depth, dead_letters }, conn))
}

/// Writes the ballast file if missing; false when there is no room for it.
fn write_reserve(dir: &Path, bytes: u64) -> bool {
    if bytes == 0 {
        return true;
    }
    let path = dir.join(RESERVE_FILE);
    if std::fs::metadata(&path).map(|m| m.len() >= bytes).unwrap_or(false) {
        return true;
    }
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        f.sync_all()
    };
    match write() {
        Ok(()) => true,
        Err(_) => {
            let _ = std::fs::remove_file(&path);
            false
        }
    }
}

pub(crate) fn spawn(
    conn: Connection,
    rx: mpsc::Receiver<Op>,
    shared: Arc<Shared>,
    state: StoreState,
    dir: PathBuf,
    opts: OutboxOptions,
) -> std::thread::JoinHandle<()> {
    let mut w = Writer {
        conn,
        rx,
        shared,
        next_pos: state.next_pos,
        dir,
        opts,
        deferred: Vec::new(),
        full: false,
        failing: false,
        last_compact: Instant::now(),
        last_recovery: Instant::now(),
        dirty: false,
        metrics: WriterMetrics::new(),
        sync_full: true,
    };
    std::thread::Builder::new()
        .name("outbox-writer".into())
        .spawn(move || w.run())
        .unwrap_or_else(|e| panic!("cannot start the outbox writer thread: {e}"))
}

struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Op>,
    shared: Arc<Shared>,
    next_pos: i64,
    dir: PathBuf,
    opts: OutboxOptions,
    /// Acks and parks whose commit failed: applied again with the next one.
    deferred: Vec<Op>,
    /// The disk (or `max_bytes`) is full: appends are refused.
    full: bool,
    /// The last commit failed.
    failing: bool,
    last_compact: Instant,
    last_recovery: Instant,
    /// Something was deleted since the last compaction.
    dirty: bool,
    metrics: WriterMetrics,
    /// `synchronous = FULL` (fsync at commit) is in force.
    sync_full: bool,
}

/// Counter handles, registered once.
struct WriterMetrics {
    write_errors: metrics::Counter,
    commits: metrics::Counter,
    commit_duration: metrics::Histogram,
    stored: metrics::Counter,
    duplicates: metrics::Counter,
}

impl WriterMetrics {
    fn new() -> WriterMetrics {
        WriterMetrics {
            write_errors: metrics::counter!("callbridge_outbox_write_errors_total"),
            commits: metrics::counter!("callbridge_outbox_commits_total"),
            commit_duration: metrics::histogram!("callbridge_outbox_commit_duration_seconds"),
            stored: metrics::counter!("callbridge_outbox_appends_total", "result" => "stored"),
            duplicates: metrics::counter!("callbridge_outbox_appends_total", "result" => "duplicate"),
        }
    }
}

/// What an applied request does once its transaction committed.
enum After {
    Append(oneshot::Sender<Result<AppendOutcome, OutboxError>>, AppendOutcome),
    Retry(oneshot::Sender<Result<usize, OutboxError>>, usize),
    Flush(oneshot::Sender<()>),
}

#[derive(Default)]
struct Delta {
    depth: i64,
    dead_letters: i64,
}

fn weight(op: &Op) -> usize {
    match op {
        Op::Append { records, .. } => records.len(),
        Op::Ack { acks, .. } => acks.len(),
        _ => 1,
    }
}

impl Writer {
    fn run(&mut self) {
        loop {
            let mut ops = Vec::new();
            if self.deferred.is_empty() && !self.full && !self.failing {
                match self.rx.blocking_recv() {
                    Some(op) => ops.push(op),
                    None => break,
                }
            } else {
                // Work to retry or a condition to recover from: poll.
                match self.rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(50)),
                    Err(TryRecvError::Disconnected) => {
                        if !self.deferred.is_empty() {
                            self.apply(Vec::new());
                        }
                        break;
                    }
                }
            }
            if !ops.is_empty() && !self.opts.commit_interval.is_zero() {
                std::thread::sleep(self.opts.commit_interval);
            }
            let mut n: usize = ops.iter().map(weight).sum();
            while n < self.opts.max_batch_events {
                match self.rx.try_recv() {
                    Ok(op) => {
                        n += weight(&op);
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.apply(ops);
            self.maintain();
        }
        if self.dirty {
            let _ = self.compact();
        }
    }

    fn write_error(&mut self, e: &rusqlite::Error, what: &str) {
        self.metrics.write_errors.increment(1);
        if is_full(e) {
            if !self.full {
                error!(error = %e, "outbox: DISK FULL while {what}; new events are refused (kept by the caller) until space is freed; accepted events are safe");
                self.full = true;
                self.shared.writable.store(false, Ordering::Release);
                // Free the ballast so acknowledgements can still commit.
                let _ = std::fs::remove_file(self.dir.join(RESERVE_FILE));
                publish_counters(&self.shared);
            }
        } else {
            error!(error = %e, "outbox: write failed while {what}");
        }
    }

    fn apply(&mut self, ops: Vec<Op>) {
        let mut all = std::mem::take(&mut self.deferred);
        all.extend(ops);
        if all.is_empty() {
            return;
        }
        let now = now_micros();
        let started = Instant::now();
        let mut after: Vec<After> = Vec::new();
        let mut applied: Vec<Op> = Vec::new();
        let mut delta = Delta::default();
        let mut next_pos = self.next_pos;
        let sinks = self.shared.sinks.clone();
        let full = self.full;
        let mut errors: Vec<(rusqlite::Error, &'static str)> = Vec::new();
        let mut failed: Vec<(oneshot::Sender<Result<AppendOutcome, OutboxError>>, OutboxError)> = Vec::new();

        // Only appends and dead-letter retries must survive a power loss; a
        // commit of acknowledgements alone is written to the WAL without an
        // fsync (it survives a process crash; after a power loss it may be
        // lost, which means a redelivery, never a loss). The next fsync'd
        // commit makes it durable too: the WAL is sequential.
        let must_sync = all.iter().any(|op| matches!(op, Op::Append { .. } | Op::Retry { .. }));
        if must_sync != self.sync_full {
            let mode = if must_sync { "FULL" } else { "NORMAL" };
            if self.conn.execute_batch(&format!("PRAGMA synchronous = {mode}")).is_ok() {
                self.sync_full = must_sync;
            }
        }
        let begun = self.conn.execute_batch("BEGIN IMMEDIATE");
        if let Err(e) = begun {
            self.fail_all(all, &e);
            return;
        }
        // Owns the transaction begun above: commits, or rolls back on drop.
        let tx = Tx(&self.conn);
        // Some errors (SQLITE_FULL among them) roll the whole transaction
        // back, not only the savepoint: then nothing of it can commit.
        let mut aborted = false;
        for op in all {
            if !aborted && !errors.is_empty() && tx.is_autocommit() {
                aborted = true;
            }
            if aborted {
                let e = error_copy(&errors[0].0);
                match op {
                    Op::Append { reply, .. } => failed.push((reply, e)),
                    Op::Retry { reply, .. } => {
                        let _ = reply.send(Err(e));
                    }
                    Op::Flush { reply } => after.push(After::Flush(reply)),
                    op @ (Op::Ack { .. } | Op::Park { .. }) => self.deferred.push(op),
                }
                continue;
            }
            match op {
                Op::Append { records, reply } => {
                    if full {
                        let _ = reply.send(Err(OutboxError::DiskFull));
                        continue;
                    }
                    match in_savepoint(&tx, |t| append(t, &records, &sinks, &mut next_pos, now)) {
                        Ok((outcome, d)) => {
                            delta.depth += d;
                            after.push(After::Append(reply, outcome));
                        }
                        Err(e) => {
                            // Replied after the error is recorded, so a caller
                            // that sees DiskFull also sees is_writable() false.
                            failed.push((reply, error_copy(&e)));
                            errors.push((e, "appending events"));
                        }
                    }
                }
                Op::Ack { ref sink, ref acks } => match in_savepoint(&tx, |t| ack(t, sink, acks, now)) {
                    Ok(d) => {
                        delta.depth += d;
                        applied.push(op);
                    }
                    Err(e) => {
                        errors.push((e, "recording acknowledgements"));
                        self.deferred.push(op);
                    }
                },
                Op::Park { ref sink, pos, seq, status, ref reason } => {
                    match in_savepoint(&tx, |t| park(t, sink, pos, seq, status, reason, now)) {
                        Ok(d) => {
                            delta.depth += d.depth;
                            delta.dead_letters += d.dead_letters;
                            applied.push(op);
                        }
                        Err(e) => {
                            errors.push((e, "parking a dead letter"));
                            self.deferred.push(op);
                        }
                    }
                }
                Op::Retry { sink, event_id, reply } => {
                    match in_savepoint(&tx, |t| retry(t, &sinks, sink.as_deref(), event_id.as_deref(), &mut next_pos)) {
                        Ok((n, d)) => {
                            delta.depth += d.depth;
                            delta.dead_letters += d.dead_letters;
                            after.push(After::Retry(reply, n));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(error_copy(&e)));
                            errors.push((e, "requeueing dead letters"));
                        }
                    }
                }
                Op::Flush { reply } => after.push(After::Flush(reply)),
            }
        }
        if !aborted && !errors.is_empty() && tx.is_autocommit() {
            aborted = true;
        }
        let committed = if aborted {
            drop(tx);
            Err(error_copy(&errors[0].0)).map_err(|e| match e {
                OutboxError::Storage(e) => e,
                _ => rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None),
            })
        } else {
            tx.commit()
        };
        let rolled_back = aborted;
        for (e, what) in &errors {
            self.write_error(e, what);
        }
        for (reply, e) in failed {
            let _ = reply.send(Err(e));
        }
        match committed {
            Ok(()) => {
                self.metrics.commits.increment(1);
                self.metrics.commit_duration.record(started.elapsed().as_secs_f64());
                if self.failing && errors.is_empty() {
                    info!("outbox: writes succeed again");
                }
                self.failing = !errors.is_empty();
                if !self.full {
                    self.shared.writable.store(!self.failing, Ordering::Release);
                }
                self.dirty |= delta.depth < 0;
                self.shared.depth.fetch_add(delta.depth, Ordering::AcqRel);
                self.shared.dead_letters.fetch_add(delta.dead_letters, Ordering::AcqRel);
                if next_pos != self.next_pos {
                    self.next_pos = next_pos;
                    self.shared.committed.send_replace(next_pos - 1);
                }
                for a in after {
                    match a {
                        After::Append(r, o) => {
                            self.metrics.stored.increment(o.appended as u64);
                            self.metrics.duplicates.increment(o.duplicates as u64);
                            let _ = r.send(Ok(o));
                        }
                        After::Retry(r, n) => {
                            let _ = r.send(Ok(n));
                        }
                        After::Flush(r) => {
                            let _ = r.send(());
                        }
                    }
                }
                publish_counters(&self.shared);
            }
            Err(e) => {
                if !rolled_back {
                    self.write_error(&e, "committing");
                }
                self.failing = true;
                self.shared.writable.store(false, Ordering::Release);
                for a in after {
                    match a {
                        After::Append(r, _) => {
                            let _ = r.send(Err(error_copy(&e)));
                        }
                        After::Retry(r, _) => {
                            let _ = r.send(Err(error_copy(&e)));
                        }
                        After::Flush(r) => {
                            let _ = r.send(());
                        }
                    }
                }
                self.deferred.extend(applied);
                publish_counters(&self.shared);
            }
        }
    }

    fn fail_all(&mut self, ops: Vec<Op>, e: &rusqlite::Error) {
        self.write_error(e, "starting a transaction");
        self.failing = true;
        self.shared.writable.store(false, Ordering::Release);
        for op in ops {
            match op {
                Op::Append { reply, .. } => {
                    let _ = reply.send(Err(error_copy(e)));
                }
                Op::Retry { reply, .. } => {
                    let _ = reply.send(Err(error_copy(e)));
                }
                Op::Flush { reply } => {
                    let _ = reply.send(());
                }
                op @ (Op::Ack { .. } | Op::Park { .. }) => self.deferred.push(op),
            }
        }
    }

    /// Compaction on its interval; recovery checks while full.
    fn maintain(&mut self) {
        if self.full {
            if self.last_recovery.elapsed() < RECOVERY_INTERVAL {
                return;
            }
            self.last_recovery = Instant::now();
            let _ = self.compact();
            if self.has_room() && write_reserve(&self.dir, self.opts.reserve_bytes) {
                info!("outbox: space available again; accepting events");
                self.full = false;
                self.shared.writable.store(!self.failing, Ordering::Release);
                publish_counters(&self.shared);
            }
        } else if self.dirty && self.last_compact.elapsed() >= self.opts.compact_interval {
            if let Err(e) = self.compact() {
                self.write_error(&e, "compacting");
            }
        }
    }

    /// Under 90 % of `max_bytes` (always true without a cap).
    fn has_room(&self) -> bool {
        if self.opts.max_bytes == 0 {
            return true;
        }
        let used = self.conn.query_row(
            "SELECT (SELECT page_count FROM pragma_page_count()) - (SELECT freelist_count FROM pragma_freelist_count()),
                    (SELECT page_size FROM pragma_page_size())",
            [],
            |r| Ok(r.get::<_, i64>(0)? * r.get::<_, i64>(1)?),
        );
        matches!(used, Ok(u) if (u as f64) < self.opts.max_bytes as f64 * 0.9)
    }

    fn compact(&mut self) -> Result<(), rusqlite::Error> {
        self.last_compact = Instant::now();
        // Checkpoint first: on a full disk this moves the WAL into the main
        // file (using the ballast's space) so later writes reuse the WAL.
        let mode = if self.full { "TRUNCATE" } else { "PASSIVE" };
        let _: (i64, i64, i64) = self
            .conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let cutoff = now_micros() - self.opts.dedup_retention.as_micros() as i64;
        let deleted = self.conn.execute(
            "DELETE FROM delivered WHERE id IN (SELECT id FROM delivered WHERE done_at < ?1 LIMIT ?2)",
            params![cutoff, COMPACT_DELETE_LIMIT],
        )?;
        self.dirty = deleted as i64 == COMPACT_DELETE_LIMIT;
        {
            let mut st = self.conn.prepare_cached(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"))?;
            let mut rows = st.query([])?;
            while rows.next()?.is_some() {}
        }
        Ok(())
    }
}

/// An open transaction: rolled back when dropped without `commit`.
struct Tx<'c>(&'c Connection);

impl Tx<'_> {
    fn commit(self) -> Result<(), rusqlite::Error> {
        let r = self.0.execute_batch("COMMIT");
        if r.is_ok() {
            std::mem::forget(self);
        }
        r
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.0.is_autocommit() {
            let _ = self.0.execute_batch("ROLLBACK");
        }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.0
    }
}

fn in_savepoint<T>(
    tx: &Tx<'_>,
    f: impl FnOnce(&rusqlite::Connection) -> Result<T, rusqlite::Error>,
) -> Result<T, rusqlite::Error> {
    tx.prepare_cached("SAVEPOINT op")?.execute([])?;
    match f(tx) {
        Ok(v) => {
            tx.prepare_cached("RELEASE op")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            let _ = tx.execute_batch("ROLLBACK TO op; RELEASE op");
            Err(e)
        }
    }
}

fn append(
    c: &Connection,
    records: &[NewRecord],
    sinks: &[Arc<str>],
    next_pos: &mut i64,
    now: i64,
) -> Result<(AppendOutcome, i64), rusqlite::Error> {
    let mut seen = c.prepare_cached("SELECT EXISTS(SELECT 1 FROM delivered WHERE id = ?1)")?;
    let mut ins = c.prepare_cached(
        "INSERT INTO events(seq, id, key, type, body, appended_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(id) DO NOTHING",
    )?;
    let mut done = c.prepare_cached("INSERT OR IGNORE INTO delivered(id, done_at) VALUES (?1, ?2)")?;
    let mut pend = c.prepare_cached("INSERT INTO pending(sink, pos, seq) VALUES (?1, ?2, ?2)")?;
    let mut out = AppendOutcome::default();
    let mut pos = *next_pos;
    let no_sinks = sinks.is_empty();
    for r in records {
        if seen.query_row([&r.id], |row| row.get::<_, bool>(0))? {
            out.duplicates += 1;
            continue;
        }
        if no_sinks {
            // Nobody to deliver to: remembered as delivered.
            out.appended += done.execute(params![r.id, now])?;
            continue;
        }
        if ins.execute(params![pos, r.id, r.key, r.kind, r.body, now])? == 1 {
            for s in sinks {
                pend.execute(params![&**s, pos])?;
            }
            pos += 1;
            out.appended += 1;
        } else {
            out.duplicates += 1;
        }
    }
    *next_pos = pos;
    let depth = if no_sinks { 0 } else { out.appended as i64 };
    Ok((out, depth))
}

fn still_pending(c: &Connection, seq: i64) -> Result<bool, rusqlite::Error> {
    c.prepare_cached("SELECT EXISTS(SELECT 1 FROM pending WHERE seq = ?1)")?.query_row([seq], |r| r.get(0))
}

/// The event has no pending row left: unless a dead letter still needs it,
/// it leaves, and only its id stays (for de-duplication).
fn mark_done(c: &Connection, seq: i64, now: i64) -> Result<(), rusqlite::Error> {
    let parked: bool =
        c.prepare_cached("SELECT EXISTS(SELECT 1 FROM dead_letters WHERE seq = ?1)")?.query_row([seq], |r| r.get(0))?;
    if parked {
        return Ok(());
    }
    c.prepare_cached("INSERT OR IGNORE INTO delivered(id, done_at) SELECT id, ?2 FROM events WHERE seq = ?1")?
        .execute(params![seq, now])?;
    c.prepare_cached("DELETE FROM events WHERE seq = ?1")?.execute([seq])?;
    Ok(())
}

fn ack(c: &Connection, sink: &str, acks: &[(i64, i64)], now: i64) -> Result<i64, rusqlite::Error> {
    let mut del = c.prepare_cached("DELETE FROM pending WHERE sink = ?1 AND pos = ?2")?;
    let mut depth = 0;
    for &(pos, seq) in acks {
        if del.execute(params![sink, pos])? == 1 && !still_pending(c, seq)? {
            mark_done(c, seq, now)?;
            depth -= 1;
        }
    }
    Ok(depth)
}

fn park(
    c: &Connection,
    sink: &str,
    pos: i64,
    seq: i64,
    status: Option<u16>,
    reason: &str,
    now: i64,
) -> Result<Delta, rusqlite::Error> {
    let mut d = Delta::default();
    if c.prepare_cached("DELETE FROM pending WHERE sink = ?1 AND pos = ?2")?.execute(params![sink, pos])? != 1 {
        return Ok(d);
    }
    let n = c
        .prepare_cached(
            "INSERT INTO dead_letters(seq, sink, parked_at, status, reason) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(seq, sink) DO NOTHING",
        )?
        .execute(params![seq, sink, now, status, reason])?;
    d.dead_letters += n as i64;
    if !still_pending(c, seq)? {
        d.depth -= 1;
    }
    Ok(d)
}

fn retry(
    c: &Connection,
    sinks: &[Arc<str>],
    sink: Option<&str>,
    event_id: Option<&str>,
    next_pos: &mut i64,
) -> Result<(usize, Delta), rusqlite::Error> {
    let rows: Vec<(i64, String)> = {
        let mut st = c.prepare_cached(
            "SELECT d.seq, d.sink FROM dead_letters d JOIN events e ON e.seq = d.seq
              WHERE (?1 IS NULL OR d.sink = ?1) AND (?2 IS NULL OR e.id = ?2)
              ORDER BY d.parked_at, d.seq",
        )?;
        let rows = st.query_map(params![sink, event_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut d = Delta::default();
    let mut n = 0;
    for (seq, s) in rows {
        if !sinks.iter().any(|x| **x == *s) {
            continue;
        }
        let had = still_pending(c, seq)?;
        c.prepare_cached("DELETE FROM dead_letters WHERE seq = ?1 AND sink = ?2")?.execute(params![seq, s])?;
        c.prepare_cached("INSERT INTO pending(sink, pos, seq) VALUES (?1, ?2, ?3)")?
            .execute(params![s, *next_pos, seq])?;
        *next_pos += 1;
        if !had {
            d.depth += 1;
        }
        d.dead_letters -= 1;
        n += 1;
    }
    Ok((n, d))
}
