//! The outbox's single writer: opens the store, then applies queued requests
//! in group commits (see the module doc of `crate::outbox` for the design).
//!
//! Runs on its own OS thread: SQLite calls block, and a commit's fsync must
//! never stall the async runtime. It must never reply `Ok` to an append
//! before the commit that contains it returned.
//!
//! Each group commit is planned (the requests, those deferred by the last
//! commit first, and its fsync policy), executed (one transaction, each
//! request in its own savepoint, collected in a `Batch`) and settled
//! (errors recorded, then replies, counters, and the acknowledgements kept
//! for the next commit if this one did not go through).

use super::journal::Journal;
use super::journaled::{self, Held};
use super::{
    now_micros, publish_counters, AppendOutcome, AppendReply, NewRecord, Op, OutboxError, OutboxOptions, PartialAppend,
    Record, Shared, StoreError,
};
use crate::normalize::CallCheckpoint;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// File name of the database inside the outbox directory.
pub const DB_FILE: &str = "outbox.sqlite3";
const RESERVE_FILE: &str = "reserve";
/// Tombstones deleted per compaction at most (bounds the pause).
const COMPACT_DELETE_LIMIT: i64 = 20_000;
/// Free pages returned to the filesystem per compaction at most.
const VACUUM_PAGES: i64 = 4096;
/// The WAL is checkpointed into the main file once it holds this many
/// bytes of pages (`wal_autocheckpoint`, set in pages of the store's own
/// size), and truncated back to this size afterwards.
const WAL_LIMIT_BYTES: i64 = 1 << 20;
/// Page size of a new store. SQLite's default of 4 KiB fits five or six
/// events per table page; at 8 KiB the writer splits and rebalances half
/// as many b-tree pages per event and writes half as many WAL frames.
/// Measured with `benches/durable_ingest.rs` (four alternating pairs of
/// 1M-event runs against 4 KiB): ingest +11 to +27 %, writer CPU −1 to
/// −18 %. 16 KiB measured no better. A store made with another page size
/// keeps it: SQLite changes it only by rewriting the whole file.
const NEW_PAGE_BYTES: i64 = 8192;
/// How long a commit of acknowledgements alone waits for the next append
/// (or flush, or retry) to share its transaction. Nobody waits for an
/// acknowledgement's commit, and at a high rate a sink acknowledges a batch
/// a few milliseconds after its commit, while the pipeline is still handing
/// over the next one: committed on their own, the acknowledgements took a
/// commit of their own between every two appends, which wrote the same
/// b-tree pages to the WAL twice. Measured with `benches/durable_ingest.rs`:
/// 57–74 commits instead of 168–176 per run, a fifth to a third fewer bytes
/// written per event. What a `kill -9` can cost is redeliveries of at most
/// this long's acknowledgements, which at-least-once allows.
const ACK_HOLD: Duration = Duration::from_millis(20);
/// The journal's open segment is closed (and a new one begun) once it
/// holds this many bytes or is this old: a closed segment is removed once
/// every event in it has left the journal, so the journal stays within a
/// few segments, and none outlives the store's memory of delivered ids
/// (`dedup_retention`), against which its events are told apart when read
/// back.
const JOURNAL_SEGMENT_BYTES: u64 = 8 << 20;
const JOURNAL_SEGMENT_AGE: Duration = Duration::from_secs(60);
/// How long an event stays held in the journal, waiting for its sink's
/// acknowledgement, before it is written to the tables (its sink is slow
/// or down). At full rate a sink acknowledges a commit's events while the
/// next one or two commits are written: settled at the very next commit,
/// more than half of them became rows (`benches/durable_ingest.rs`). With
/// nothing else to do, the writer wakes up for this.
const HELD_WAIT: Duration = Duration::from_secs(1);
/// How often a full or failing store checks whether it can write again.
const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);
/// A store full again within this long after the last time it was full is
/// the same episode: logged once, and reported writable again only after
/// this long without filling up (readiness does not flap while delivery
/// frees room that new events take at once).
const FULL_EPISODE_QUIET: Duration = Duration::from_secs(5);
/// The error of a piece of a split append that did not fit: the caller
/// offers a smaller piece; the store is not full on its account.
const PIECE_TOO_LARGE: &str = "appending a piece of events too large for the room left";

/// The store's migrations, oldest first: entry `i` brings a store from
/// format version `i` to `i + 1`. A store without a version stamp is at
/// version 0 (nothing, or the tables of migration 1 from before the stamp
/// existed: that migration only creates what is missing). Only ever append
/// to this list; a migration that shipped never changes.
const MIGRATIONS: &[&str] = &[
    // 1: the original layout.
    "CREATE TABLE IF NOT EXISTS events(
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
    // 2: the SHA-256 of each event's JSON, kept with its id after delivery,
    // so that an id coming back with other content is told from a repeat.
    // Rows from before have none (NULL): their ids count as duplicates.
    "ALTER TABLE events ADD COLUMN digest BLOB;
     ALTER TABLE delivered ADD COLUMN digest BLOB;",
    // 3: the calls live as of the stored events, with their last seq and
    // state, so that a restart carries them on (`normalize::persist`).
    "CREATE TABLE live_calls(
         call TEXT PRIMARY KEY, seq INTEGER NOT NULL, state BLOB) WITHOUT ROWID;",
];

/// The format version this build writes (and the newest it opens).
pub const FORMAT_VERSION: u32 = MIGRATIONS.len() as u32;

pub(crate) struct StoreState {
    pub next_pos: i64,
    pub depth: i64,
    pub dead_letters: i64,
    /// Rows of sinks no longer configured are still queued (there was no
    /// room to drop them at open).
    pub foreign_rows: bool,
}

pub(crate) fn storage(e: rusqlite::Error) -> OutboxError {
    OutboxError::from_store(e.into())
}

/// Page cache of the write connection, KiB. A group commit of a few
/// thousand events touches more than SQLite's default 2 MiB: the cache then
/// spilled dirty pages into the WAL mid-transaction and read them back.
/// 4 MiB holds such a commit. 16 MiB saved the writer about a tenth of its
/// CPU (3.8 against 4.25 s per 1M-event run of `benches/durable_ingest.rs`,
/// means of 7 and 9 runs; ingest rates within the machine's noise) but
/// stays resident for good: 100,000 queued calls then peaked at 158 MB
/// instead of 146 (`benches/daemon_memory.rs`). `cache_spill = false`
/// (let the cache grow within a commit instead) measured no better.
const CACHE_KIB: u64 = 4 << 10;
/// Prepared statements kept by the write connection (it uses about 30).
const STATEMENT_CACHE: usize = 64;

/// What [`open_store`] found.
pub(crate) struct Opened {
    pub state: StoreState,
    pub conn: Connection,
    /// The disk was full at open: the ballast is released, appends are
    /// refused until room returns (see "When the disk is full").
    pub full: bool,
    pub journal: Journal,
    /// Events of the journal the store has neither pending nor delivered
    /// (a crash left them there): held again, settled by the first commit.
    pub held: Vec<Held>,
}

impl Opened {
    /// The first position the tail covers: the held events are its first.
    pub fn tail_start(&self) -> i64 {
        self.held.first().map_or(self.state.next_pos, |h| h.pos)
    }
}

/// Opens or creates the store; returns its counters and the write
/// connection. Never fails for want of room when the store is already at
/// the current format: a full disk only starts the store in its full state
/// (ballast released, appends refused, acknowledgements still written).
pub(crate) fn open_store(dir: &Path, opts: &OutboxOptions) -> Result<Opened, OutboxError> {
    let path = dir.join(DB_FILE);
    let mut full = !disk_has_room(dir, opts.reserve_bytes);
    if full {
        release_reserve(dir);
    }
    let (state, conn) = match open_conn(&path, opts) {
        Ok(opened) => opened,
        // Opening needed room after all (the `-shm` file to create, a
        // migration to write): the ballast is there for this.
        Err(e) if !full && wants_room(&e, dir) => {
            full = true;
            release_reserve(dir);
            open_conn(&path, opts).map_err(|e| no_room(e, dir, &path))?
        }
        Err(e) => return Err(no_room(e, dir, &path)),
    };
    if full {
        let free = free_bytes(dir).map_or_else(|| "unknown".to_string(), |f| f.to_string());
        error!(path = %dir.display(), free_bytes = %free, events = state.depth,
            "outbox: DISK FULL at start; the ballast is released so that stored events can still be delivered; \
             new events are refused (not ready) until space is freed");
        let _ = set_page_cap(&conn, opts, true);
    }
    let mut state = state;
    let (journal, held) = journaled::recover(dir, &conn, &mut state.next_pos)?;
    if !held.is_empty() {
        info!(events = held.len(), "outbox: events read back from the journal");
        if !opts.sinks.is_empty() {
            state.depth += held.len() as i64;
        }
    }
    if state.depth > 0 {
        info!(events = state.depth, "outbox: undelivered events from a previous run go first");
    }
    Ok(Opened { state, conn, full, journal, held })
}

/// The connection, at the current format, with its counters.
fn open_conn(path: &Path, opts: &OutboxOptions) -> Result<(StoreState, Connection), OutboxError> {
    let conn = connect(path, opts).map_err(storage)?;
    migrate(&conn, path)?;
    // Dropped, no other sink's rows are left; only when the drop failed
    // is `pending` read again to know.
    let foreign_rows = match drop_unconfigured_sinks(&conn, &opts.sinks) {
        Ok(()) => false,
        Err(e) => {
            let e = StoreError::from(e);
            if !e.is_full() {
                return Err(OutboxError::Storage(e));
            }
            // Their rows only wait longer; no other sink is held up by them.
            warn!(error = %e, "outbox: no room to drop the queues of sinks no longer configured; tried again at the next start");
            has_foreign_rows(&conn, &opts.sinks).map_err(storage)?
        }
    };
    let state = StoreState { foreign_rows, ..load_state(&conn).map_err(storage)? };
    Ok((state, conn))
}

/// An error of opening that more room on the disk would cure: a full disk
/// (`SQLITE_FULL`), or an I/O error (creating or growing the `-shm` file,
/// creating the database) while the filesystem is nearly full.
fn wants_room(e: &OutboxError, dir: &Path) -> bool {
    match e {
        OutboxError::DiskFull => true,
        OutboxError::Storage(s) => {
            matches!(s.code(), Some(rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::CannotOpen))
                && free_bytes(dir).is_some_and(|f| f < LOW_SPACE_BYTES)
        }
        _ => false,
    }
}

/// `e` as [`OutboxError::NoRoom`] when room is what it lacks.
fn no_room(e: OutboxError, dir: &Path, path: &Path) -> OutboxError {
    if !wants_room(&e, dir) {
        return e;
    }
    let source = match e {
        OutboxError::Storage(s) => s,
        _ => StoreError::Full { extended: rusqlite::ffi::SQLITE_FULL, message: "database or disk is full".into() },
    };
    OutboxError::NoRoom { path: path.to_path_buf(), free: free_bytes(dir), source }
}

/// Opens the write connection with the outbox's settings (WAL, fsync at
/// commit, size cap). Writes nothing to a store that exists: on a full
/// disk, opening must not need room.
pub(crate) fn connect(path: &Path, opts: &OutboxOptions) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Every statement of the writer stays prepared (the default cache of
    // 16 evicted some at every group commit).
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // auto_vacuum only takes effect before the first table exists, and
    // setting it writes the header (a transaction) every time: only for a
    // new store.
    let fresh: bool = conn.query_row("SELECT NOT EXISTS(SELECT 1 FROM sqlite_master)", [], |r| r.get(0))?;
    if fresh {
        conn.execute_batch(&format!("PRAGMA page_size = {NEW_PAGE_BYTES}; PRAGMA auto_vacuum = INCREMENTAL;"))?;
    }
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        warn!(mode = %mode, "outbox: WAL journal unavailable; commits are slower");
    }
    // NORMAL in WAL mode: SQLite fsyncs at checkpoints only; the writer
    // fsyncs the WAL itself after each commit that must survive a power
    // loss (`WalSync`: what FULL does inside every commit), so the pragma is
    // set once and never switched per commit.
    // A small WAL, checkpointed often and truncated back to WAL_LIMIT_BYTES,
    // keeps the data in the main file: on a full disk the ballast then covers
    // what a checkpoint and the acknowledgements need.
    let page = page_bytes(&conn)?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = {cache}; PRAGMA wal_autocheckpoint = {wal};",
        cache = -(CACHE_KIB as i64),
        wal = WAL_LIMIT_BYTES / page,
    ))?;
    let _: i64 = conn.query_row(&format!("PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}"), [], |r| r.get(0))?;
    set_page_cap(&conn, opts, false)?;
    Ok(conn)
}

/// The store's page size in bytes (never below SQLite's smallest, 512).
fn page_bytes(conn: &Connection) -> Result<i64, rusqlite::Error> {
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(page.max(512))
}

/// Fewest pages of the size cap: `max_bytes` below 16 pages (128 KiB at
/// the 8 KiB pages of a new store, 64 KiB at 4 KiB) is raised to it (the
/// empty store's tables and indexes take about half).
const MIN_CAP_PAGES: i64 = 16;
/// Pages above the cap that a full store lends to acknowledgements when
/// there is no ballast (`reserve_bytes` = 0).
const MIN_HEADROOM_PAGES: i64 = 8;

/// Enforces `max_bytes` as SQLite's `max_page_count`. `full`: the store is
/// full and the ballast was released, so the cap grows by the ballast's size
/// (at least `MIN_HEADROOM_PAGES`): acknowledgements, which must write
/// (`delivered` ids) before they free anything, can then still commit.
/// The disk use stays the same: the ballast file is gone meanwhile. A cap
/// below the current size is raised to it by SQLite.
fn set_page_cap(conn: &Connection, opts: &OutboxOptions, full: bool) -> Result<(), rusqlite::Error> {
    if opts.max_bytes == 0 {
        return Ok(());
    }
    let page = page_bytes(conn)?;
    let mut pages = (i64::try_from(opts.max_bytes).unwrap_or(i64::MAX) / page).max(MIN_CAP_PAGES);
    if full {
        let reserve = i64::try_from(opts.reserve_bytes).unwrap_or(i64::MAX) / page;
        pages = pages.saturating_add(reserve.max(MIN_HEADROOM_PAGES));
    }
    let _: i64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| r.get(0))?;
    Ok(())
}

/// The format version stamped in the store (0: none).
fn stored_version(c: &Connection, path: &Path) -> Result<u32, OutboxError> {
    let has_meta: bool = c
        .query_row("SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')", [], |r| {
            r.get(0)
        })
        .map_err(storage)?;
    if !has_meta {
        return Ok(0);
    }
    let found: Option<String> =
        c.query_row("SELECT v FROM meta WHERE k = 'format'", [], |r| r.get(0)).optional().map_err(storage)?;
    match found {
        None => Ok(0),
        Some(v) => v.trim().parse().map_err(|_| OutboxError::Format {
            path: path.to_path_buf(),
            found: v,
            supported: FORMAT_VERSION,
        }),
    }
}

/// Brings the store to [`FORMAT_VERSION`], every missing migration in one
/// transaction (a crash leaves the old version, intact). A store at the
/// current version is not written to; one from a newer build is refused.
/// Returns how many migrations ran.
pub(crate) fn migrate(conn: &Connection, path: &Path) -> Result<usize, OutboxError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(storage)?;
    let found = stored_version(&tx, path)?;
    if found == FORMAT_VERSION {
        return Ok(0);
    }
    if found > FORMAT_VERSION {
        return Err(OutboxError::Format {
            path: path.to_path_buf(),
            found: found.to_string(),
            supported: FORMAT_VERSION,
        });
    }
    tx.execute_batch("CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;")
        .map_err(storage)?;
    let pending = &MIGRATIONS[found as usize..];
    for sql in pending {
        tx.execute_batch(sql).map_err(storage)?;
    }
    tx.execute(
        "INSERT INTO meta(k, v) VALUES ('format', ?1) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
        [FORMAT_VERSION.to_string()],
    )
    .map_err(storage)?;
    tx.commit().map_err(storage)?;
    if found > 0 {
        info!(path = %path.display(), from = found, to = FORMAT_VERSION, "outbox: store format upgraded");
    }
    Ok(pending.len())
}

/// Sinks no longer configured: their queues go (the events stay for the
/// others, or become tombstones).
fn drop_unconfigured_sinks(conn: &Connection, sinks: &[String]) -> Result<(), rusqlite::Error> {
    let known = queued_sinks(conn)?;
    let mut dropped = 0usize;
    for s in known.iter().filter(|s| !sinks.iter().any(|x| x == *s)) {
        let n = conn.execute("DELETE FROM pending WHERE sink = ?1", [s])?;
        warn!(sink = %s, events = n, "outbox: sink no longer configured; its undelivered events are dropped from its queue");
        dropped += n;
    }
    if dropped > 0 {
        conn.execute_batch(&format!(
            "BEGIN;
             INSERT OR IGNORE INTO delivered(id, done_at, digest) SELECT id, {now}, digest FROM events e
              WHERE NOT EXISTS(SELECT 1 FROM pending p WHERE p.seq = e.seq)
                AND NOT EXISTS(SELECT 1 FROM dead_letters d WHERE d.seq = e.seq);
             DELETE FROM events WHERE NOT EXISTS(SELECT 1 FROM pending p WHERE p.seq = events.seq)
                AND NOT EXISTS(SELECT 1 FROM dead_letters d WHERE d.seq = events.seq);
             COMMIT;",
            now = now_micros()
        ))?;
    }
    Ok(())
}

/// The counters the writer and the handles start from.
fn load_state(conn: &Connection) -> Result<StoreState, rusqlite::Error> {
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0));
    let depth = count("SELECT COUNT(DISTINCT seq) FROM pending")?;
    let dead_letters = count("SELECT COUNT(*) FROM dead_letters")?;
    let max_seq = count("SELECT COALESCE(MAX(seq), 0) FROM events")?;
    let max_pos = count("SELECT COALESCE(MAX(pos), 0) FROM pending")?;
    Ok(StoreState { next_pos: max_seq.max(max_pos) + 1, depth, dead_letters, foreign_rows: false })
}

/// The sinks that have rows in `pending`.
fn queued_sinks(conn: &Connection) -> Result<Vec<String>, rusqlite::Error> {
    let mut st = conn.prepare("SELECT DISTINCT sink FROM pending")?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Whether `pending` holds rows of sinks other than `sinks`.
fn has_foreign_rows(conn: &Connection, sinks: &[String]) -> Result<bool, rusqlite::Error> {
    Ok(queued_sinks(conn)?.iter().any(|s| !sinks.contains(s)))
}

/// Free space the filesystem leaves beside the ballast before the disk
/// counts as full: one WAL's worth, what commits need between checkpoints.
const LOW_SPACE_BYTES: u64 = WAL_LIMIT_BYTES as u64;

/// Bytes free on the filesystem of `dir` (as an unprivileged user sees
/// it), when the filesystem says.
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// The ballast file is in place, at full size.
fn has_reserve(dir: &Path, bytes: u64) -> bool {
    bytes == 0 || std::fs::metadata(dir.join(RESERVE_FILE)).is_ok_and(|m| m.len() >= bytes)
}

fn release_reserve(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(RESERVE_FILE));
}

/// Whether the disk has room for the store, the same test at open and
/// when a full store checks for room again: the ballast is in place (it is
/// written if missing) and at least [`LOW_SPACE_BYTES`] are free beside it.
fn disk_has_room(dir: &Path, reserve_bytes: u64) -> bool {
    let free = free_bytes(dir);
    let short = |extra: u64| free.is_some_and(|f| f < LOW_SPACE_BYTES.saturating_add(extra));
    if has_reserve(dir, reserve_bytes) {
        return !short(0);
    }
    !short(reserve_bytes) && write_reserve(dir, reserve_bytes)
}

/// Writes the ballast file if missing; false when there is no room for it.
fn write_reserve(dir: &Path, bytes: u64) -> bool {
    if has_reserve(dir, bytes) {
        return true;
    }
    let path = dir.join(RESERVE_FILE);
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
    opened: Opened,
    rx: mpsc::Receiver<Op>,
    shared: Arc<Shared>,
    dir: PathBuf,
    opts: OutboxOptions,
) -> Result<std::thread::JoinHandle<()>, OutboxError> {
    let Opened { state, conn, full, journal, held } = opened;
    shared.tail.appended(held.iter().map(Held::record).collect());
    let wal = WalSync::new(&path_of(&dir));
    let sole_sink = shared.sinks.len() == 1 && !state.foreign_rows;
    let mut w = Writer {
        conn,
        rx,
        shared,
        next_pos: state.next_pos,
        dir,
        opts,
        deferred: Vec::new(),
        full,
        failing: false,
        last_compact: Instant::now(),
        last_recovery: Instant::now(),
        last_full: full.then(Instant::now),
        depth_at_full: if full { state.depth } else { 0 },
        sole_sink,
        probation: false,
        dirty: false,
        metrics: WriterMetrics::new(),
        wal,
        timer: None,
        journal,
        held,
        segment_started: Instant::now(),
        settle_soon: false,
    };
    std::thread::Builder::new()
        .name("outbox-writer".into())
        .spawn(move || {
            w.timer = tokio::runtime::Builder::new_current_thread().enable_time().build().ok();
            w.run();
            w.finish();
        })
        .map_err(OutboxError::Spawn)
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
    /// When the store was last found full (an episode lasts until it has
    /// not been full for `FULL_EPISODE_QUIET`).
    last_full: Option<Instant>,
    /// The depth when the store filled up: below it, delivery has freed
    /// room (however small the cap, and however much of it the tables'
    /// own pages take), and appends are tried again.
    depth_at_full: i64,
    /// One sink, and only its rows are queued: an event whose row it
    /// acknowledged has no other pending row.
    sole_sink: bool,
    /// Room again after a full episode: appends are accepted, but the store
    /// reports writable only once the episode is over.
    probation: bool,
    /// Something was deleted since the last compaction.
    dirty: bool,
    metrics: WriterMetrics,
    /// The WAL file, fsync'd after the commits that must be durable.
    wal: WalSync,
    /// A clock for waiting on the request queue with a deadline
    /// ([`ACK_HOLD`]); without it, acknowledgements commit at once.
    timer: Option<tokio::runtime::Runtime>,
    journal: Journal,
    /// Events stored in the journal and not in the tables, in position
    /// order: the next commit settles them (see "The journal tier").
    held: Vec<Held>,
    /// When the journal's open segment was begun (about: when the last
    /// one was closed).
    segment_started: Instant,
    /// The tail was reset while events were held: it no longer has them,
    /// so they are settled without waiting (sinks then read them as rows).
    settle_soon: bool,
}

/// Counter handles, registered once.
struct WriterMetrics {
    write_errors: metrics::Counter,
    commits: metrics::Counter,
    commit_duration: metrics::Histogram,
    stored: metrics::Counter,
    duplicates: metrics::Counter,
    conflicts: metrics::Counter,
    held_delivered: metrics::Counter,
    held_stored: metrics::Counter,
}

impl WriterMetrics {
    fn new() -> WriterMetrics {
        WriterMetrics {
            write_errors: metrics::counter!("callbridge_outbox_write_errors_total"),
            commits: metrics::counter!("callbridge_outbox_commits_total"),
            commit_duration: metrics::histogram!("callbridge_outbox_commit_duration_seconds"),
            stored: metrics::counter!("callbridge_outbox_appends_total", "result" => "stored"),
            duplicates: metrics::counter!("callbridge_outbox_appends_total", "result" => "duplicate"),
            conflicts: metrics::counter!("callbridge_outbox_id_conflicts_total"),
            held_delivered: metrics::counter!("callbridge_outbox_journal_events_total", "left_as" => "delivered"),
            held_stored: metrics::counter!("callbridge_outbox_journal_events_total", "left_as" => "stored"),
        }
    }
}

/// What an applied request does once its transaction committed.
enum After {
    /// The outcome, and the ids refused as conflicts (logged at commit).
    Append(AppendReply, PartialAppend, Vec<String>),
    Retry(oneshot::Sender<Result<usize, OutboxError>>, usize),
    Flush(oneshot::Sender<()>),
}

/// Where a failed request's error goes.
enum Reply {
    Append(AppendReply),
    Retry(oneshot::Sender<Result<usize, OutboxError>>),
}

impl Reply {
    fn fail(self, e: StoreError) {
        match self {
            Reply::Append(r) => {
                let _ = r.send(Err(OutboxError::from_store(e)));
            }
            Reply::Retry(r) => {
                let _ = r.send(Err(OutboxError::from_store(e)));
            }
        }
    }
}

impl After {
    /// The transaction did not commit: nothing it did happened.
    fn fail(self, e: &StoreError) {
        match self {
            After::Append(r, ..) => Reply::Append(r).fail(e.clone()),
            After::Retry(r, _) => Reply::Retry(r).fail(e.clone()),
            After::Flush(r) => {
                let _ = r.send(());
            }
        }
    }
}

#[derive(Default)]
struct Delta {
    depth: i64,
    dead_letters: i64,
}

/// Whether a commit holding `op` must be fsync'd: appends and dead-letter
/// retries must survive a power loss; acknowledgements and parks alone need
/// not (see [`Writer::plan`]).
fn needs_sync(op: &Op) -> bool {
    matches!(op, Op::Append { .. } | Op::Retry { .. })
}

/// A request whose sender does not wait for its commit.
fn unwaited(op: &Op) -> bool {
    matches!(op, Op::Ack { .. } | Op::Park { .. })
}

fn weight(op: &Op) -> usize {
    match op {
        Op::Append { records, checkpoints, .. } => records.len().max(usize::from(!checkpoints.is_empty())),
        Op::Ack { acks, .. } => acks.len(),
        _ => 1,
    }
}

/// One group commit in progress: what its requests did inside the
/// transaction, settled (replied to, counted) once the commit returned.
struct Batch {
    started: Instant,
    now: i64,
    sinks: Vec<Arc<str>>,
    /// The store was full when the batch started: appends are refused.
    full: bool,
    /// See [`Writer::sole_sink`].
    sole_sink: bool,
    /// Dead letters may exist (some did at the start, or a request of this
    /// batch parked one): a done event must be checked against them.
    dead_letters: bool,
    next_pos: i64,
    delta: Delta,
    /// The records stored, for the tail (see `tail.rs`) once committed.
    tail: Vec<Record>,
    /// The tail cannot follow this transaction: it starts again after it.
    tail_reset: bool,
    /// Replies to send if the transaction commits.
    after: Vec<After>,
    /// Acks and parks applied in the transaction (deferred if it does not commit).
    applied: Vec<Op>,
    /// Acks and parks that failed (applied again with the next commit).
    deferred: Vec<Op>,
    /// Errors of single requests, recorded before any reply is sent.
    errors: Vec<(StoreError, &'static str)>,
    /// Requests that failed, replied to once the errors are recorded (a
    /// caller that sees DiskFull also sees `is_writable()` false).
    failed: Vec<(Reply, StoreError)>,
    /// SQLite rolled the whole transaction back (SQLITE_FULL among others):
    /// nothing of it can commit.
    aborted: bool,
    /// Appends go to the journal (see [`Writer::journal_ok`]).
    journal_ok: bool,
    /// The events held before this batch that it settles at its start
    /// (acknowledged, held long enough, or all of them); given back to the
    /// writer if the transaction does not commit.
    held: Vec<Held>,
    /// The other events held before this batch: they stay held.
    held_kept: Vec<Held>,
    /// Settle every held event (a flush asks for it; the tail lost them).
    settle_all: bool,
    /// Settling some of `held` failed: they moved to `held_kept`.
    held_unsettled: bool,
    settled: journaled::Settled,
    /// Events this batch stored in the journal only: held once it commits.
    journaled: Vec<Held>,
    /// The ids (and JSON) of the events held and journaled, which the
    /// tables do not have: an append is told apart from them by these.
    held_ids: HashMap<Arc<str>, Arc<str>, ahash::RandomState>,
    /// JSON bytes journaled so far, and at most: half the tail's budget, so
    /// that the held events always stay in the tail (sinks read them from
    /// nowhere else); appends past it are written to the tables at once.
    journaled_bytes: usize,
    journal_budget: usize,
    /// The commit reached the disk (its WAL fsync, when it needs one).
    synced: bool,
}

impl Batch {
    /// Applies one request inside the open transaction `c`.
    fn run(&mut self, c: &Connection, op: Op) {
        if self.aborted {
            self.skip(op);
            return;
        }
        match op {
            Op::Append { records, checkpoints, split, reply } => self.append(c, records, &checkpoints, split, reply),
            Op::Ack { ref sink, ref acks } => match in_savepoint(c, |t| self.ack(t, sink, acks)) {
                Ok(d) => {
                    self.delta.depth += d;
                    self.applied.push(op);
                }
                Err(e) => self.defer(op, e, "recording acknowledgements"),
            },
            // Still held (its row could not be written): parked once it is a row.
            Op::Park { pos, .. } if self.held_kept.iter().any(|h| h.pos == pos) => self.deferred.push(op),
            Op::Park { ref sink, pos, seq, status, ref reason } => {
                self.dead_letters = true;
                match in_savepoint(c, |t| park(t, sink, pos, seq, status, reason, self.now)) {
                    Ok(d) => {
                        self.delta.depth += d.depth;
                        self.delta.dead_letters += d.dead_letters;
                        self.applied.push(op);
                    }
                    Err(e) => self.defer(op, e, "parking a dead letter"),
                }
            }
            Op::Retry { sink, event_id, reply } => {
                let (sinks, next_pos) = (&self.sinks, &mut self.next_pos);
                match in_savepoint(c, |t| retry(t, sinks, sink.as_deref(), event_id.as_deref(), next_pos)) {
                    Ok((n, d)) => {
                        self.delta.depth += d.depth;
                        self.delta.dead_letters += d.dead_letters;
                        self.tail_reset |= n > 0;
                        self.after.push(After::Retry(reply, n));
                    }
                    Err(e) => {
                        self.failed.push((Reply::Retry(reply), e.clone()));
                        self.errors.push((e, "requeueing dead letters"));
                    }
                }
            }
            Op::Flush { reply } => self.after.push(After::Flush(reply)),
            Op::Contains { id, reply } => {
                let known = if self.held_ids.contains_key(id.as_str()) {
                    Ok(true)
                } else {
                    journaled::stored_or_delivered(c, &id).map_err(storage)
                };
                let _ = reply.send(known);
            }
        }
        if !self.errors.is_empty() && c.is_autocommit() {
            self.aborted = true;
        }
    }

    fn append(
        &mut self,
        c: &Connection,
        records: Vec<NewRecord>,
        checkpoints: &[CallCheckpoint],
        split: bool,
        reply: AppendReply,
    ) {
        if self.full {
            let _ = reply.send(Err(OutboxError::DiskFull));
            return;
        }
        let bytes: usize = records.iter().map(|r| r.body.len()).sum();
        if self.journal_ok && !self.held_unsettled && self.journaled_bytes + bytes <= self.journal_budget {
            // `journaled_bytes` starts with what stays held (`settle_held`).
            self.journaled_bytes += bytes;
            self.journal_append(c, records, checkpoints, reply);
            return;
        }
        let (mut a, taken, error) = self.store_prefix(c, &records, checkpoints, split);
        self.keep_for_tail(records, std::mem::take(&mut a.stored));
        match error {
            None => {}
            // SQLite rolled the whole transaction back while a piece of
            // several events did not fit: not a full store yet (a smaller
            // piece may fit), and the caller offers a smaller one.
            Some((e, piece)) if split && piece > 1 && e.is_full() && c.is_autocommit() => {
                self.failed.push((Reply::Append(reply), e.clone()));
                self.errors.push((e, PIECE_TOO_LARGE));
                return;
            }
            Some((e, _)) if taken > 0 && !c.is_autocommit() => self.errors.push((e, "appending events")),
            Some((e, _)) => {
                self.failed.push((Reply::Append(reply), e.clone()));
                self.errors.push((e, "appending events"));
                return;
            }
        }
        self.delta.depth += a.depth;
        self.after.push(After::Append(reply, PartialAppend { outcome: a.outcome, taken }, a.conflicts));
    }

    /// [`Batch::append`] through the journal: the checks for ids known
    /// and the calls' states are done in the transaction; the new events
    /// are held, written to the journal just before it commits.
    fn journal_append(
        &mut self,
        c: &Connection,
        records: Vec<NewRecord>,
        checkpoints: &[CallCheckpoint],
        reply: AppendReply,
    ) {
        match in_savepoint(c, |t| self.journal_records(t, &records, checkpoints)) {
            Ok((mut a, new)) => {
                self.next_pos += new.len() as i64;
                for h in &new {
                    self.held_ids.insert(h.id.clone(), h.body.clone());
                }
                self.journaled.extend(new);
                self.keep_for_tail(records, std::mem::take(&mut a.stored));
                self.delta.depth += a.depth;
                let taken = a.outcome.appended + a.outcome.duplicates + a.outcome.conflicts;
                self.after.push(After::Append(reply, PartialAppend { outcome: a.outcome, taken }, a.conflicts));
            }
            Err(e) => {
                self.failed.push((Reply::Append(reply), e.clone()));
                self.errors.push((e, "appending events"));
            }
        }
    }

    /// What [`Batch::journal_append`] holds of `records` (in memory only:
    /// the caller keeps it once the savepoint is released).
    fn journal_records(
        &self,
        c: &Connection,
        records: &[NewRecord],
        checkpoints: &[CallCheckpoint],
    ) -> Result<(Appended, Vec<Held>), rusqlite::Error> {
        let mut out =
            Appended { outcome: AppendOutcome::default(), stored: Vec::new(), depth: 0, conflicts: Vec::new() };
        let mut new: Vec<Held> = Vec::new();
        let mut ids: HashMap<&str, usize, ahash::RandomState> = HashMap::default();
        let mut pos = self.next_pos;
        for (i, r) in records.iter().enumerate() {
            let mut known = known_delivered(c, r)?;
            if known == Known::New {
                let held =
                    self.held_ids.get(&r.id).or_else(|| ids.get(&*r.id).and_then(|&k| new.get(k).map(|h| &h.body)));
                known = known_held(held, r);
            }
            if known == Known::New {
                known = known_stored(c, r)?;
            }
            match known {
                Known::New => {
                    ids.insert(&r.id, new.len());
                    new.push(Held::new(r, pos, self.now));
                    out.stored.push((i, pos));
                    pos += 1;
                    out.outcome.appended += 1;
                }
                Known::Different => {
                    out.outcome.conflicts += 1;
                    out.conflicts.push(r.id.to_string());
                }
                Known::Same => out.outcome.duplicates += 1,
            }
        }
        out.depth = out.outcome.appended as i64;
        store_live_calls(c, records, checkpoints)?;
        Ok((out, new))
    }

    /// Settles the events held before this batch (see
    /// [`journaled::settle`]), first thing in its transaction: those its
    /// only sink acknowledged in this batch (and not parked) leave as
    /// delivered. If that fails, they stay held for the next commit.
    fn settle_held(&mut self, c: &Connection, ops: &[Op]) {
        if self.held.is_empty() {
            return;
        }
        self.settle_all |= ops.iter().any(|op| matches!(op, Op::Flush { .. }));
        let mut acked: Vec<i64> = Vec::new();
        // A parked event becomes a row first: its dead letter needs one.
        let mut parked: Vec<i64> = Vec::new();
        for op in ops {
            match op {
                Op::Ack { acks, .. } if self.sole_sink => acked.extend(acks.iter().map(|&(pos, _)| pos)),
                Op::Park { pos, .. } => parked.push(*pos),
                _ => {}
            }
        }
        acked.sort_unstable();
        for h in &mut self.held {
            if acked.binary_search(&h.pos).is_ok() && !parked.contains(&h.pos) {
                h.acked = true;
            }
        }
        for h in &self.held {
            self.held_ids.insert(h.id.clone(), h.body.clone());
        }
        if !self.settle_all {
            let wait = HELD_WAIT.as_micros() as i64;
            let (settle, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|h| h.acked || self.now - h.appended_at >= wait || parked.contains(&h.pos));
            self.journaled_bytes = keep.iter().map(|h| h.body.len()).sum();
            (self.held, self.held_kept) = (settle, keep);
        }
        // Those acknowledged first, on their own: on a full disk, writing
        // the others may fail, and these free room. On a full disk, only
        // those, and a few at a time (as acknowledgements are then): a
        // failure there may roll back the whole transaction, and with it
        // the requests that free room.
        let (mut delivered, mut stored): (Vec<Held>, Vec<Held>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| h.acked || self.sinks.is_empty());
        if self.full {
            if delivered.len() > FULL_DISK_ACKS {
                self.held_kept.extend(delivered.split_off(FULL_DISK_ACKS));
            }
            let (park, wait): (Vec<Held>, Vec<Held>) =
                std::mem::take(&mut stored).into_iter().partition(|h| parked.contains(&h.pos));
            stored = park;
            self.held_kept.extend(wait);
        }
        for part in [delivered, stored] {
            if part.is_empty() {
                continue;
            }
            let (sinks, now) = (&self.sinks, self.now);
            match in_savepoint(c, |t| journaled::settle(t, &part, sinks, now)) {
                Ok(settled) => {
                    if !sinks.is_empty() {
                        self.delta.depth -= settled.left as i64;
                    }
                    self.settled.left += settled.left;
                    self.settled.promoted += settled.promoted;
                    self.held.extend(part);
                }
                Err(e) => {
                    // They stay held.
                    self.held_unsettled = true;
                    self.held_kept.extend(part);
                    self.errors.push((e, "storing events held in the journal"));
                }
            }
        }
    }

    /// Every event held before this batch, in position order (settled or
    /// not: the transaction did not begin).
    fn all_held(&mut self) -> Vec<Held> {
        merge_held(std::mem::take(&mut self.held), std::mem::take(&mut self.held_kept))
    }

    /// The records stored (index in `records`, position), as sinks read
    /// them, for the tail once the transaction commits.
    fn keep_for_tail(&mut self, records: Vec<NewRecord>, stored: Vec<(usize, i64)>) {
        let mut stored = stored.into_iter().peekable();
        for (i, r) in records.into_iter().enumerate() {
            let Some((_, pos)) = stored.next_if(|&(k, _)| k == i) else { continue };
            self.tail.push(Record {
                pos,
                seq: pos,
                id: r.id,
                key: r.key,
                kind: std::borrow::Cow::Borrowed(r.kind),
                body: r.body,
                appended_at: self.now,
            });
        }
    }

    /// Stores `records` in savepoints: all at once, or (with `split`, when
    /// they do not fit) in halving pieces, as many in order as fit. Returns
    /// what was stored, how many records were taken, and the error that
    /// stopped it with the size of the piece that failed. Part stored and
    /// the transaction still open: the store is full from now on, and the
    /// caller learns how much went in.
    fn store_prefix(
        &mut self,
        c: &Connection,
        records: &[NewRecord],
        checkpoints: &[CallCheckpoint],
        split: bool,
    ) -> (Appended, usize, Option<(StoreError, usize)>) {
        let mut total =
            Appended { outcome: AppendOutcome::default(), stored: Vec::new(), depth: 0, conflicts: Vec::new() };
        if records.is_empty() {
            return match in_savepoint(c, |t| store_live_calls(t, &[], checkpoints)) {
                Ok(()) => (total, 0, None),
                Err(e) => (total, 0, Some((e, 1))),
            };
        }
        let (mut taken, mut piece) = (0, records.len());
        let (sinks, next_pos, now) = (&self.sinks, &mut self.next_pos, self.now);
        while taken < records.len() {
            let end = (taken + piece).min(records.len());
            let part = &records[taken..end];
            let states = if end == records.len() { checkpoints } else { &[] };
            let held = &self.held_ids;
            match in_savepoint(c, |t| append(t, part, states, sinks, held, next_pos, now)) {
                Ok(a) => {
                    total.outcome.appended += a.outcome.appended;
                    total.outcome.duplicates += a.outcome.duplicates;
                    total.outcome.conflicts += a.outcome.conflicts;
                    total.depth += a.depth;
                    total.conflicts.extend(a.conflicts);
                    total.stored.extend(a.stored.into_iter().map(|(i, pos)| (taken + i, pos)));
                    taken += part.len();
                }
                Err(e) if split && e.is_full() && part.len() > 1 && !c.is_autocommit() => piece = part.len() / 2,
                Err(e) => return (total, taken, Some((e, part.len()))),
            }
        }
        (total, taken, None)
    }

    /// Committed, but the fsync that makes it durable failed: its appends
    /// and retries fail (their callers try again; the events are then
    /// found stored, as duplicates), the store counts as failing.
    fn unsynced(&mut self, e: StoreError) {
        self.tail_reset = true;
        self.synced = false;
        let mut after = Vec::with_capacity(self.after.len());
        for a in std::mem::take(&mut self.after) {
            match a {
                After::Append(r, ..) => self.failed.push((Reply::Append(r), e.clone())),
                After::Retry(r, _) => self.failed.push((Reply::Retry(r), e.clone())),
                flush @ After::Flush(_) => after.push(flush),
            }
        }
        self.after = after;
        self.errors.push((e, "syncing the WAL"));
    }

    fn defer(&mut self, op: Op, e: StoreError, what: &'static str) {
        self.errors.push((e, what));
        self.deferred.push(op);
    }

    /// A request after the transaction was rolled back: fails (or waits for
    /// the next commit) with the error that rolled it back.
    fn skip(&mut self, op: Op) {
        let Some((e, _)) = self.errors.first() else { return };
        let e = e.clone();
        match op {
            Op::Append { reply, .. } => self.failed.push((Reply::Append(reply), e)),
            Op::Retry { reply, .. } => self.failed.push((Reply::Retry(reply), e)),
            Op::Flush { reply } => self.after.push(After::Flush(reply)),
            Op::Contains { reply, .. } => {
                let _ = reply.send(Err(OutboxError::from_store(e)));
            }
            op @ (Op::Ack { .. } | Op::Park { .. }) => self.deferred.push(op),
        }
    }
}

impl Writer {
    fn run(&mut self) {
        loop {
            let mut ops = Vec::new();
            if self.deferred.is_empty() && !self.full && !self.failing && !self.probation {
                if self.held.is_empty() {
                    match self.rx.blocking_recv() {
                        Some(op) => ops.push(op),
                        None => break,
                    }
                } else {
                    match self.recv_until(Instant::now() + self.held_due()) {
                        Some(Some(op)) => ops.push(op),
                        Some(None) => break,
                        None => {}
                    }
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
            if ops.is_empty() && self.deferred.is_empty() {
                // No request came: only the held events to settle.
                if !self.held.is_empty() {
                    self.commit(Vec::new(), true);
                }
                self.maintain();
                continue;
            }
            if !ops.is_empty() && !self.opts.commit_interval.is_zero() {
                std::thread::sleep(self.opts.commit_interval);
            }
            let mut n: usize = ops.iter().map(weight).sum();
            self.take_queued(&mut ops, &mut n);
            self.hold_acks(&mut ops, n);
            self.apply(ops);
            self.maintain();
        }
        // Closing: the held events go to the tables, and the journal,
        // settled, is removed (left as it is if that fails: read back at
        // the next open).
        if !self.held.is_empty() {
            self.settle_soon = true;
            self.commit(Vec::new(), true);
        }
        // The commits that settled the last held events (acknowledgements
        // alone are not fsync'd) reach the disk before the journal goes.
        self.release_journal();
        if self.dirty {
            let _ = self.compact();
        }
    }

    /// The next request, waiting until `until` at most: `None` when none
    /// came in time, `Some(None)` when the queue is closed.
    fn recv_until(&mut self, until: Instant) -> Option<Option<Op>> {
        let Some(timer) = &self.timer else {
            return match self.rx.try_recv() {
                Ok(op) => Some(Some(op)),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(None),
            };
        };
        let rx = &mut self.rx;
        // The deadline's timer is made inside the runtime's context.
        timer.block_on(async { tokio::time::timeout_at(until.into(), rx.recv()).await }).ok()
    }

    /// Whether this commit's appends go to the journal: with one sink
    /// (whose acknowledgement settles a held event as delivered), and not
    /// while the store is full (appends are refused then).
    fn journal_ok(&self) -> bool {
        self.opts.journal && self.sole_sink && !self.full
    }

    /// How long until the oldest held event is due to be settled.
    fn held_due(&self) -> Duration {
        if self.settle_soon {
            return Duration::ZERO;
        }
        let waited = self.held.first().map_or(0, |h| (now_micros() - h.appended_at).max(0) as u64);
        HELD_WAIT.saturating_sub(Duration::from_micros(waited))
    }

    /// Where the held events begin, for readers (see `Outbox::pending`).
    fn publish_held(&self) {
        let from = self.held.first().map_or(i64::MAX, |h| h.pos);
        self.shared.held_from.store(from, Ordering::Release);
    }

    /// The journal's room back once its events are settled, on a full disk
    /// and at close (acknowledgements alone are not fsync'd, and would
    /// never let the segments go): the WAL is fsync'd, then every segment
    /// before the held events goes, the open one too when none is held.
    fn release_journal(&mut self) {
        if self.journal.segments().next().is_none() || self.wal.sync(&self.dir).is_err() {
            return;
        }
        if self.held.is_empty() {
            self.journal.rotate();
        }
        self.tidy_journal();
    }

    /// After a durable commit: the segments that hold only settled events
    /// go.
    fn tidy_journal(&mut self) {
        // The held events are in position order, so in segment order.
        let through = self.held.first().map_or(u64::MAX, |h| h.segment.saturating_sub(1));
        if let Err(e) = self.journal.remove_through(through) {
            warn!(error = %e, "outbox: cannot remove settled journal segments");
        }
    }

    /// Requests that nobody waits for (acknowledgements and parks) wait up
    /// to [`ACK_HOLD`] for one that somebody does (an append, a flush, a
    /// retry) and share its commit, with whatever is queued behind it. Not
    /// while the store retries or recovers (it polls then), and never past
    /// a batch's worth of requests or the queue's end. `n`: the weight of
    /// `ops`.
    fn hold_acks(&mut self, ops: &mut Vec<Op>, mut n: usize) {
        if self.timer.is_none() {
            return;
        }
        let idle = self.deferred.is_empty() && !self.full && !self.failing && !self.probation;
        if !idle || ops.is_empty() || !ops.iter().all(unwaited) {
            return;
        }
        let until = Instant::now() + ACK_HOLD;
        while n < self.opts.max_batch_events {
            let Some(Some(op)) = self.recv_until(until) else { return };
            let waited_for = !unwaited(&op);
            n += weight(&op);
            ops.push(op);
            if waited_for {
                self.take_queued(ops, &mut n);
                return;
            }
        }
    }

    /// Adds what is already queued to `ops`, up to a batch's worth (`n`:
    /// the weight of `ops` so far).
    fn take_queued(&mut self, ops: &mut Vec<Op>, n: &mut usize) {
        while *n < self.opts.max_batch_events {
            match self.rx.try_recv() {
                Ok(op) => {
                    *n += weight(&op);
                    ops.push(op);
                }
                Err(_) => break,
            }
        }
    }

    /// Closes the store, except while the disk is full: SQLite deletes
    /// the `-wal` and `-shm` files when the last connection closes, and
    /// a start on a full disk without the ballast could not create the
    /// `-shm` file again (32 KiB). Then the connection is left open until
    /// the process exits, which leaves the store as a crash would (safe by
    /// design: the WAL is replayed at the next open).
    fn finish(self) {
        let keep = (self.opts.reserve_bytes > 0 && !has_reserve(&self.dir, self.opts.reserve_bytes))
            || free_bytes(&self.dir).is_some_and(|f| f < LOW_SPACE_BYTES);
        if keep {
            info!("outbox: disk full at exit; the store is left as after a crash (its files kept for the next start)");
            std::mem::forget(self.conn);
        }
    }

    fn write_error(&mut self, e: &StoreError, what: &str) {
        self.metrics.write_errors.increment(1);
        if e.is_full() {
            if !self.full {
                if self.in_full_episode() || self.probation {
                    debug!(error = %e, "outbox: full again while {what} (same episode)");
                } else {
                    error!(error = %e, "outbox: DISK FULL while {what}; new events are refused (kept by the caller) until space is freed; accepted events are safe");
                }
                self.full = true;
                self.probation = false;
                self.depth_at_full = self.shared.depth.load(Ordering::Acquire);
                self.shared.writable.store(false, Ordering::Release);
                // Free the ballast so acknowledgements can still commit (with
                // a size cap, its room is lent to the store).
                release_reserve(&self.dir);
                let _ = set_page_cap(&self.conn, &self.opts, true);
                publish_counters(&self.shared);
            }
            self.last_full = Some(Instant::now());
        } else {
            error!(error = %e, "outbox: write failed while {what}");
        }
    }

    /// One group commit: plan (what to apply, how durably), execute (in
    /// one transaction), settle (reply, count, keep what must be retried).
    fn apply(&mut self, ops: Vec<Op>) {
        let Some((ops, must_sync)) = self.plan(ops) else { return };
        if self.full && ops.len() > 1 {
            // A failed commit keeps its acknowledgements for the next one,
            // and delivery goes on acknowledging meanwhile: on a full disk,
            // all of them in one transaction could soon never fit in the
            // room left, and nothing would ever be freed. One request per
            // transaction instead: each one that fits frees room for the
            // next; the first that does not waits with those after it.
            let mut ops = ops.into_iter();
            while let Some(op) = ops.next() {
                let sync = needs_sync(&op);
                let waiting = self.deferred.len();
                self.commit(vec![op], sync);
                if self.deferred.len() > waiting {
                    self.deferred.extend(ops);
                    return;
                }
            }
            return;
        }
        self.commit(ops, must_sync);
    }

    /// [`Writer::apply`]'s one transaction.
    fn commit(&mut self, ops: Vec<Op>, must_sync: bool) {
        if let Some((mut batch, committed)) = self.execute(ops) {
            // Only a commit that reached the disk lets journal segments go
            // (with it, every commit before it did: the WAL is sequential).
            batch.synced = must_sync;
            if committed.is_ok() && must_sync {
                if let Err(e) = self.wal.sync(&self.dir) {
                    batch.unsynced(e);
                }
            }
            self.settle(batch, committed);
        }
    }

    /// The requests of this commit (those deferred by the last one first),
    /// and whether it must be fsync'd.
    fn plan(&mut self, ops: Vec<Op>) -> Option<(Vec<Op>, bool)> {
        let mut all = std::mem::take(&mut self.deferred);
        all.extend(ops);
        if all.is_empty() {
            return None;
        }
        // Only appends and dead-letter retries must survive a power loss; a
        // commit of acknowledgements alone is written to the WAL without an
        // fsync (it survives a process crash; after a power loss it may be
        // lost, which means a redelivery, never a loss). The next fsync'd
        // commit makes it durable too: the WAL is sequential.
        let must_sync = all.iter().any(needs_sync);
        // On a full disk, requests commit one at a time (see `apply`), and
        // each must be small: acknowledgements gathered by a commit that
        // failed as the disk filled are cut up again.
        all = if self.full { split_acks(all, FULL_DISK_ACKS) } else { coalesce_acks(all) };
        Some((all, must_sync))
    }

    /// Applies `ops` in one transaction, each in its own savepoint, and
    /// commits. `None` when the transaction could not even begin (every
    /// request was failed or deferred).
    fn execute(&mut self, ops: Vec<Op>) -> Option<(Batch, Result<(), StoreError>)> {
        let mut batch = Batch {
            started: Instant::now(),
            now: now_micros(),
            sinks: self.shared.sinks.clone(),
            full: self.full,
            sole_sink: self.sole_sink,
            dead_letters: self.shared.dead_letters.load(Ordering::Acquire) != 0,
            next_pos: self.next_pos,
            delta: Delta::default(),
            tail: Vec::new(),
            tail_reset: false,
            after: Vec::new(),
            applied: Vec::new(),
            deferred: Vec::new(),
            errors: Vec::new(),
            failed: Vec::new(),
            aborted: false,
            journal_ok: self.journal_ok(),
            held: std::mem::take(&mut self.held),
            held_kept: Vec::new(),
            settle_all: self.settle_soon,
            held_unsettled: false,
            settled: journaled::Settled::default(),
            journaled: Vec::new(),
            held_ids: HashMap::default(),
            journaled_bytes: 0,
            journal_budget: self.opts.tail_bytes / 2,
            synced: true,
        };
        if let Err(e) = self.conn.prepare_cached("BEGIN IMMEDIATE").and_then(|mut st| st.execute([])) {
            self.held = batch.all_held();
            self.fail_all(ops, &e.into());
            return None;
        }
        // Owns the transaction begun above: commits, or rolls back on drop.
        let tx = Tx(&self.conn);
        batch.settle_held(&tx, &ops);
        if !batch.errors.is_empty() && tx.is_autocommit() {
            batch.aborted = true;
        }
        if batch.journal_ok && self.opts.max_bytes > 0 {
            // Under a size cap, what is held must fit in the store as rows
            // (its sink may never acknowledge it), with room to spare: JSON
            // of at most half the room left under 90 % of the cap.
            let room = match used_bytes(&tx) {
                Ok(used) => (self.opts.max_bytes as f64 * 0.9 - used as f64).max(0.0) as usize,
                Err(_) => 0,
            };
            batch.journal_budget = batch.journal_budget.min(room / 2);
        }
        for op in ops {
            batch.run(&tx, op);
        }
        if !batch.aborted && !batch.journaled.is_empty() {
            match write_journal(&mut self.journal, &mut self.segment_started, &batch.journaled) {
                Ok(segment) => {
                    for h in &mut batch.journaled {
                        h.segment = segment;
                    }
                }
                Err(e) => {
                    batch.errors.push((e, "writing the journal"));
                    batch.aborted = true;
                }
            }
        }
        let committed = match batch.errors.first() {
            Some((e, _)) if batch.aborted => {
                let e = e.clone();
                drop(tx);
                Err(e)
            }
            _ => tx.commit().map_err(StoreError::from),
        };
        Some((batch, committed))
    }

    /// Records the errors, then replies: the results on commit; on failure
    /// an error to every append and retry, and the acks and parks are kept
    /// for the next commit.
    fn settle(&mut self, mut batch: Batch, committed: Result<(), StoreError>) {
        let journaled = std::mem::take(&mut batch.journaled);
        // The events held before the batch: those it settled, and those it
        // kept held.
        let (settling, kept) = (std::mem::take(&mut batch.held), std::mem::take(&mut batch.held_kept));
        for (e, what) in &batch.errors {
            if *what == PIECE_TOO_LARGE {
                self.metrics.write_errors.increment(1);
                debug!(error = %e, "outbox: {what}");
            } else {
                self.write_error(e, what);
            }
        }
        for (reply, e) in batch.failed {
            reply.fail(e);
        }
        self.deferred.extend(batch.deferred);
        // A full store has its own state (`full`): only other errors mean
        // the store is failing.
        let ok = batch.errors.iter().all(|(e, _)| e.is_full());
        match committed {
            Ok(()) => {
                self.metrics.commits.increment(1);
                self.metrics.commit_duration.record(batch.started.elapsed().as_secs_f64());
                if self.failing && ok {
                    info!("outbox: writes succeed again");
                }
                self.failing = !ok;
                if !self.full && !self.probation {
                    self.shared.writable.store(!self.failing, Ordering::Release);
                }
                self.dirty |= batch.delta.depth < 0;
                let depth = self.shared.depth.fetch_add(batch.delta.depth, Ordering::AcqRel) + batch.delta.depth;
                if batch.errors.iter().any(|(e, _)| e.is_full()) {
                    // What this commit stored counts: room is freed once
                    // delivery took the store below it.
                    self.depth_at_full = depth;
                }
                self.shared.dead_letters.fetch_add(batch.delta.dead_letters, Ordering::AcqRel);
                self.follow_in_tail(&batch.applied, std::mem::take(&mut batch.tail), batch.tail_reset, batch.next_pos);
                // Held events whose settling failed stay held, before this
                // commit's.
                let promoted = batch.settled.promoted > 0;
                self.metrics.held_delivered.increment(batch.settled.left as u64);
                self.metrics.held_stored.increment(batch.settled.promoted as u64);
                self.held = merge_held(Vec::new(), kept);
                self.held.extend(journaled);
                self.settle_soon = batch.tail_reset && !self.held.is_empty();
                self.publish_held();
                if batch.synced {
                    self.tidy_journal();
                }
                if batch.next_pos != self.next_pos {
                    self.next_pos = batch.next_pos;
                    self.shared.committed.send_replace(batch.next_pos - 1);
                } else if promoted {
                    // Sinks reading behind the tail find them in the tables now.
                    self.shared.committed.send_replace(self.next_pos - 1);
                }
                for a in batch.after {
                    self.reply_committed(a);
                }
            }
            Err(e) => {
                if !batch.aborted {
                    self.write_error(&e, "committing");
                }
                // Rolled back for want of room (the full state, or a piece
                // to split further, says so): the store is not failing.
                if !(batch.aborted && ok) {
                    self.failing = true;
                    self.shared.writable.store(false, Ordering::Release);
                }
                for a in batch.after {
                    a.fail(&e);
                }
                self.deferred.extend(batch.applied);
                // Still held (acknowledged ones marked): settled next time.
                // This batch's journaled events are not accepted: their
                // callers offer them again (found held, at a restart, only
                // if their ids are still unknown).
                self.held = merge_held(settling, kept);
                self.publish_held();
            }
        }
        publish_counters(&self.shared);
    }

    /// The tail after a commit, before the sinks hear of it: the rows the
    /// commit stored, and those its acknowledgements and parks removed.
    fn follow_in_tail(&self, applied: &[Op], stored: Vec<Record>, reset: bool, next_pos: i64) {
        let tail = &self.shared.tail;
        for op in applied {
            match op {
                Op::Ack { sink, acks } => tail.done(sink, acks.iter().map(|&(pos, _)| pos)),
                Op::Park { sink, pos, .. } => tail.done(sink, std::iter::once(*pos)),
                _ => {}
            }
        }
        if reset {
            tail.reset(next_pos);
        } else {
            tail.appended(stored);
        }
    }

    fn reply_committed(&self, a: After) {
        match a {
            After::Append(r, p, conflicts) => {
                let o = p.outcome;
                self.metrics.stored.increment(o.appended as u64);
                self.metrics.duplicates.increment(o.duplicates as u64);
                self.metrics.conflicts.increment(o.conflicts as u64);
                for id in &conflicts {
                    error!(id = %id, "outbox: event refused: its id is already in the outbox with different content");
                }
                let _ = r.send(Ok(p));
            }
            After::Retry(r, n) => {
                let _ = r.send(Ok(n));
            }
            After::Flush(r) => {
                let _ = r.send(());
            }
        }
    }

    /// The store was full less than [`FULL_EPISODE_QUIET`] ago.
    fn in_full_episode(&self) -> bool {
        self.last_full.is_some_and(|t| t.elapsed() < FULL_EPISODE_QUIET)
    }

    fn fail_all(&mut self, ops: Vec<Op>, e: &StoreError) {
        self.write_error(e, "starting a transaction");
        self.failing = true;
        self.shared.writable.store(false, Ordering::Release);
        for op in ops {
            match op {
                Op::Append { reply, .. } => Reply::Append(reply).fail(e.clone()),
                Op::Retry { reply, .. } => Reply::Retry(reply).fail(e.clone()),
                Op::Flush { reply } => {
                    let _ = reply.send(());
                }
                Op::Contains { reply, .. } => {
                    let _ = reply.send(Err(OutboxError::from_store(e.clone())));
                }
                op @ (Op::Ack { .. } | Op::Park { .. }) => self.deferred.push(op),
            }
        }
    }

    /// Compaction on its interval; recovery checks while full (at most every
    /// `RECOVERY_INTERVAL`); the end of a full episode.
    fn maintain(&mut self) {
        if self.probation && !self.in_full_episode() {
            info!("outbox: space available again; accepting events");
            self.probation = false;
            self.shared.writable.store(!self.failing, Ordering::Release);
            publish_counters(&self.shared);
        }
        if self.full {
            if self.last_recovery.elapsed() < RECOVERY_INTERVAL {
                return;
            }
            self.last_recovery = Instant::now();
            self.release_journal();
            let _ = self.compact();
            let freed = self.shared.depth.load(Ordering::Acquire) < self.depth_at_full;
            if (freed || self.has_room()) && disk_has_room(&self.dir, self.opts.reserve_bytes) {
                debug!("outbox: room again; accepting events");
                let _ = set_page_cap(&self.conn, &self.opts, false);
                self.full = false;
                self.probation = true;
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
        matches!(used_bytes(&self.conn), Ok(u) if (u as f64) < self.opts.max_bytes as f64 * 0.9)
    }

    fn compact(&mut self) -> Result<(), StoreError> {
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

/// Held events `a` and `b` as one list in position order.
fn merge_held(mut a: Vec<Held>, b: Vec<Held>) -> Vec<Held> {
    a.extend(b);
    a.sort_unstable_by_key(|h| h.pos);
    a
}

/// Bytes of the store's pages in use (its free pages not counted).
fn used_bytes(c: &Connection) -> Result<i64, rusqlite::Error> {
    c.query_row(
        "SELECT (SELECT page_count FROM pragma_page_count()) - (SELECT freelist_count FROM pragma_freelist_count()),
                (SELECT page_size FROM pragma_page_size())",
        [],
        |r| Ok(r.get::<_, i64>(0)? * r.get::<_, i64>(1)?),
    )
}

/// Writes `held` to the journal, durably (one commit, or several for more
/// than one commit holds), in a new segment if the open one is old or
/// large enough to close. Returns the segment.
fn write_journal(journal: &mut Journal, started: &mut Instant, held: &[Held]) -> Result<u64, StoreError> {
    if started.elapsed() >= JOURNAL_SEGMENT_AGE || journal.open_bytes() >= JOURNAL_SEGMENT_BYTES {
        journal.rotate();
        *started = Instant::now();
    }
    for h in held {
        if journal.push_with(|out| h.write_entry(out)).is_err() {
            journal.commit().map_err(|e| journaled::store_error(&e))?;
            journal.push_with(|out| h.write_entry(out)).map_err(|e| journaled::store_error(&e))?;
        }
    }
    journal.commit().map_err(|e| journaled::store_error(&e))
}

fn path_of(dir: &Path) -> PathBuf {
    dir.join(format!("{DB_FILE}-wal"))
}

/// fsync of the WAL after a commit (the store runs `synchronous = NORMAL`):
/// the committed frames are on disk once [`WalSync::sync`] returns, as
/// `synchronous = FULL` would have them at the end of `COMMIT`. The WAL
/// file lives as long as the write connection (SQLite truncates it in
/// place, and deletes it only when the last connection closes), so one
/// handle serves; the directory is fsync'd once too, for the WAL's own
/// entry (as SQLite does for a journal it creates).
struct WalSync {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl WalSync {
    fn new(path: &Path) -> WalSync {
        WalSync { path: path.to_path_buf(), file: None }
    }

    fn sync(&mut self, dir: &Path) -> Result<(), StoreError> {
        let r = self.try_sync(dir);
        if r.is_err() {
            // Opened again next time (the file may have been replaced).
            self.file = None;
        }
        r.map_err(|e| StoreError::Sqlite {
            code: rusqlite::ErrorCode::SystemIoFailure,
            extended: rusqlite::ffi::SQLITE_IOERR_FSYNC,
            message: format!("fsync of {}: {e}", self.path.display()),
        })
    }

    fn try_sync(&mut self, dir: &Path) -> std::io::Result<()> {
        let f = match self.file.take() {
            Some(f) => f,
            None => {
                let f = std::fs::OpenOptions::new().read(true).write(true).open(&self.path)?;
                std::fs::File::open(dir)?.sync_all()?;
                f
            }
        };
        let r = f.sync_data();
        self.file = Some(f);
        r
    }
}

/// An open transaction: rolled back when dropped without `commit`.
struct Tx<'c>(&'c Connection);

impl Tx<'_> {
    fn commit(self) -> Result<(), rusqlite::Error> {
        let r = self.0.prepare_cached("COMMIT").and_then(|mut st| st.execute([]).map(drop));
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
    tx: &Connection,
    f: impl FnOnce(&rusqlite::Connection) -> Result<T, rusqlite::Error>,
) -> Result<T, StoreError> {
    tx.prepare_cached("SAVEPOINT op")?.execute([])?;
    match f(tx) {
        Ok(v) => {
            tx.prepare_cached("RELEASE op")?.execute([])?;
            Ok(v)
        }
        Err(e) => {
            let _ = tx.execute_batch("ROLLBACK TO op; RELEASE op");
            Err(e.into())
        }
    }
}

/// What one append request did.
struct Appended {
    outcome: AppendOutcome,
    /// Index in the request and position of each record stored.
    stored: Vec<(usize, i64)>,
    /// Change of the depth (events some sink has pending).
    depth: i64,
    /// Ids refused because the outbox has them with other content.
    conflicts: Vec<String>,
}

/// Whether a record's id is new, or already here with the same content
/// (a repeat) or with other content (a conflict).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    New,
    Same,
    Different,
}

/// The id among the held events, whose JSON is `held`: compared by content.
fn known_held(held: Option<&Arc<str>>, r: &NewRecord) -> Known {
    match held {
        None => Known::New,
        Some(body) if **body == *r.body => Known::Same,
        Some(_) => Known::Different,
    }
}

/// The id among delivered events: a digest that differs is a conflict; no
/// digest (delivered before digests were kept) counts as the same.
fn known_delivered(c: &Connection, r: &NewRecord) -> Result<Known, rusqlite::Error> {
    let row: Option<Option<Vec<u8>>> = c
        .prepare_cached("SELECT digest FROM delivered WHERE id = ?1")?
        .query_row([&r.id], |row| row.get(0))
        .optional()?;
    Ok(match row {
        None => Known::New,
        Some(Some(d)) if d.as_slice() != r.digest.as_slice() => Known::Different,
        Some(_) => Known::Same,
    })
}

/// The id among stored (pending or parked) events: compared by content.
fn known_stored(c: &Connection, r: &NewRecord) -> Result<Known, rusqlite::Error> {
    let same: Option<bool> = c
        .prepare_cached("SELECT body = ?2 FROM events WHERE id = ?1")?
        .query_row(params![r.id, r.body], |row| row.get(0))
        .optional()?;
    Ok(match same {
        None => Known::New,
        Some(true) => Known::Same,
        Some(false) => Known::Different,
    })
}

fn append(
    c: &Connection,
    records: &[NewRecord],
    checkpoints: &[CallCheckpoint],
    sinks: &[Arc<str>],
    held: &HashMap<Arc<str>, Arc<str>, ahash::RandomState>,
    next_pos: &mut i64,
    now: i64,
) -> Result<Appended, rusqlite::Error> {
    let mut ins = c.prepare_cached(journaled::INSERT_EVENT)?;
    let mut done = c.prepare_cached(journaled::INSERT_DELIVERED)?;
    let mut pend = c.prepare_cached(journaled::INSERT_PENDING)?;
    let mut out = Appended { outcome: AppendOutcome::default(), stored: Vec::new(), depth: 0, conflicts: Vec::new() };
    let mut pos = *next_pos;
    let no_sinks = sinks.is_empty();
    for (i, r) in records.iter().enumerate() {
        let mut known = known_delivered(c, r)?;
        if known == Known::New {
            // Held in the journal (its settling failed): not in the tables.
            known = known_held(held.get(&r.id), r);
        }
        if known == Known::New && no_sinks {
            // Nobody to deliver to: remembered as delivered.
            out.outcome.appended += done.execute(params![r.id, now, &r.digest[..]])?;
            continue;
        }
        if known == Known::New && ins.execute(params![pos, r.id, r.key, r.kind, r.body, now, &r.digest[..]])? == 1 {
            for s in sinks {
                pend.execute(params![&**s, pos])?;
            }
            out.stored.push((i, pos));
            pos += 1;
            out.outcome.appended += 1;
            continue;
        }
        if known == Known::New {
            known = known_stored(c, r)?;
        }
        if known == Known::Different {
            out.outcome.conflicts += 1;
            out.conflicts.push(r.id.to_string());
        } else {
            out.outcome.duplicates += 1;
        }
    }
    *next_pos = pos;
    out.depth = if no_sinks { 0 } else { out.outcome.appended as i64 };
    store_live_calls(c, records, checkpoints)?;
    Ok(out)
}

/// `live_calls` after `records` (see "Live calls" in the module doc):
/// each call's highest `seq` raised, ended calls removed, then the states
/// of `checkpoints` written. Repeated and refused events count too: the
/// normalizer did emit them.
fn store_live_calls(
    c: &Connection,
    records: &[NewRecord],
    checkpoints: &[CallCheckpoint],
) -> Result<(), rusqlite::Error> {
    let mut last: HashMap<&str, (u64, bool), ahash::RandomState> = HashMap::default();
    for m in records.iter().filter_map(|r| r.call.as_ref()) {
        let entry = last.entry(m.call.as_str()).or_insert((m.seq, m.ended));
        entry.0 = entry.0.max(m.seq);
        entry.1 |= m.ended;
    }
    let mut raise = c.prepare_cached(
        "INSERT INTO live_calls(call, seq) VALUES (?1, ?2)
         ON CONFLICT(call) DO UPDATE SET seq = max(seq, excluded.seq)",
    )?;
    let mut gone = c.prepare_cached("DELETE FROM live_calls WHERE call = ?1")?;
    for (call, (seq, ended)) in last {
        if ended {
            gone.execute([call])?;
        } else {
            raise.execute(params![call, seq as i64])?;
        }
    }
    let mut put = c.prepare_cached(
        "INSERT INTO live_calls(call, seq, state) VALUES (?1, ?2, ?3)
         ON CONFLICT(call) DO UPDATE SET seq = max(seq, excluded.seq), state = excluded.state",
    )?;
    for cp in checkpoints {
        put.execute(params![cp.call.as_str(), cp.seq as i64, cp.state])?;
    }
    Ok(())
}

fn still_pending(c: &Connection, seq: i64) -> Result<bool, rusqlite::Error> {
    c.prepare_cached("SELECT EXISTS(SELECT 1 FROM pending WHERE seq = ?1)")?.query_row([seq], |r| r.get(0))
}

/// Whether a dead letter of some sink still needs the event.
fn parked(c: &Connection, seq: i64) -> Result<bool, rusqlite::Error> {
    c.prepare_cached("SELECT EXISTS(SELECT 1 FROM dead_letters WHERE seq = ?1)")?.query_row([seq], |r| r.get(0))
}

/// The events `seqs` (ascending) have no pending row and no dead letter
/// left: they leave, and only their ids stay (for de-duplication). Each run
/// of consecutive seqs is one range for SQLite, instead of three statements
/// per event.
fn mark_done(c: &Connection, seqs: &[i64], now: i64) -> Result<(), rusqlite::Error> {
    let mut keep = c.prepare_cached(
        "INSERT OR IGNORE INTO delivered(id, done_at, digest)
         SELECT id, ?3, digest FROM events WHERE seq BETWEEN ?1 AND ?2",
    )?;
    let mut delete = c.prepare_cached("DELETE FROM events WHERE seq BETWEEN ?1 AND ?2")?;
    for (first, last) in runs(seqs) {
        keep.execute(params![first, last, now])?;
        delete.execute(params![first, last])?;
    }
    Ok(())
}

/// `ops` with each sink's acknowledgements gathered into one request, in
/// the place of its first. A runner acknowledges a batch at a time, and a
/// batch takes a few events from each of many calls, so one request's
/// positions are scattered; a commit's requests together cover most of a
/// range (about eight positions per run at full rate in
/// `benches/durable_ingest.rs`, against one), which [`Batch::ack`] deletes a
/// run per statement. Moving acknowledgements ahead of the other requests
/// changes nothing they do: they concern positions committed before.
fn coalesce_acks(ops: Vec<Op>) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::with_capacity(ops.len());
    // (sink, index in `out` of its request)
    let mut first: Vec<(Arc<str>, usize)> = Vec::new();
    for op in ops {
        match op {
            Op::Ack { sink, acks } => match first.iter().find(|(s, _)| *s == sink) {
                Some(&(_, i)) => {
                    if let Some(Op::Ack { acks: all, .. }) = out.get_mut(i) {
                        all.extend(acks);
                    }
                }
                None => {
                    first.push((sink.clone(), out.len()));
                    out.push(Op::Ack { sink, acks });
                }
            },
            op => out.push(op),
        }
    }
    out
}

/// Most acknowledgements one transaction takes on a full disk: about what
/// one runner's request holds (one event by default, a webhook batch often
/// 100).
const FULL_DISK_ACKS: usize = 100;

/// `ops` with every acknowledgement request of more than `n` cut into
/// requests of at most `n`, in order.
fn split_acks(ops: Vec<Op>, n: usize) -> Vec<Op> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Ack { sink, acks } if acks.len() > n => {
                out.extend(acks.chunks(n).map(|part| Op::Ack { sink: sink.clone(), acks: part.to_vec() }));
            }
            op => out.push(op),
        }
    }
    out
}

/// The runs of consecutive values of the ascending `seqs`, as (first, last).
fn runs(seqs: &[i64]) -> impl Iterator<Item = (i64, i64)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *seqs.get(i)?;
        let mut last = first;
        i += 1;
        while seqs.get(i) == Some(&(last + 1)) {
            last += 1;
            i += 1;
        }
        Some((first, last))
    })
}

impl Batch {
    /// A sink's acknowledgements: its pending rows go; events that no sink
    /// has pending any more leave (see [`mark_done`]) unless a dead letter
    /// still needs them. Returns the change of the depth.
    fn ack(&self, c: &Connection, sink: &str, acks: &[(i64, i64)]) -> Result<i64, rusqlite::Error> {
        let mut acks = acks.to_vec();
        acks.sort_unstable();
        acks.dedup();
        let positions: Vec<i64> = acks.iter().map(|&(pos, _)| pos).collect();
        // The rows still pending (an acknowledgement may come twice, or
        // after a park), deleted a run of positions per statement.
        let mut del =
            c.prepare_cached("DELETE FROM pending WHERE sink = ?1 AND pos BETWEEN ?2 AND ?3 RETURNING pos")?;
        let mut gone = Vec::with_capacity(acks.len());
        for (first, last) in runs(&positions) {
            let rows = del.query_map(params![sink, first, last], |r| r.get::<_, i64>(0))?;
            for pos in rows {
                gone.push(pos?);
            }
        }
        let mut done = Vec::with_capacity(gone.len());
        for pos in gone {
            let Ok(i) = positions.binary_search(&pos) else { continue };
            let seq = acks[i].1;
            if self.sole_sink || !still_pending(c, seq)? {
                done.push(seq);
            }
        }
        let depth = -(done.len() as i64);
        if self.dead_letters {
            let mut free = Vec::with_capacity(done.len());
            for seq in done {
                if !parked(c, seq)? {
                    free.push(seq);
                }
            }
            done = free;
        }
        done.sort_unstable();
        mark_done(c, &done, self.now)?;
        Ok(depth)
    }
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

#[cfg(test)]
mod tests {
    use super::{coalesce_acks, runs, split_acks, Op};
    use std::sync::Arc;

    #[test]
    fn a_commits_acknowledgements_are_one_request_per_sink_in_place_of_its_first() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let ack = |sink: &Arc<str>, acks: &[(i64, i64)]| Op::Ack { sink: sink.clone(), acks: acks.to_vec() };
        let (flush, _rx) = tokio::sync::oneshot::channel();
        let ops = vec![
            ack(&a, &[(5, 5), (1, 1)]),
            ack(&b, &[(2, 2)]),
            Op::Flush { reply: flush },
            ack(&a, &[(3, 3)]),
            ack(&b, &[(7, 7)]),
            ack(&a, &[(1, 1)]),
        ];
        assert_eq!(shown(&coalesce_acks(ops)), vec!["a[(5, 5), (1, 1), (3, 3), (1, 1)]", "b[(2, 2), (7, 7)]", "flush"]);
    }

    /// Requests as text: acknowledgements as `<sink>[(pos, seq), …]`.
    fn shown(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                Op::Ack { sink, acks } => format!("{sink}{acks:?}"),
                Op::Flush { .. } => "flush".into(),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn on_a_full_disk_gathered_acknowledgements_are_cut_up_again_in_order() {
        let a: Arc<str> = Arc::from("a");
        let acks: Vec<(i64, i64)> = (1..=5).map(|p| (p, p)).collect();
        let (flush, _rx) = tokio::sync::oneshot::channel();
        let ops = vec![
            Op::Ack { sink: a.clone(), acks },
            Op::Flush { reply: flush },
            Op::Ack { sink: a, acks: vec![(9, 9)] },
        ];
        assert_eq!(
            shown(&split_acks(ops, 2)),
            vec!["a[(1, 1), (2, 2)]", "a[(3, 3), (4, 4)]", "a[(5, 5)]", "flush", "a[(9, 9)]"]
        );
    }

    #[test]
    fn runs_split_ascending_seqs_where_they_are_not_consecutive() {
        let all = |s: &[i64]| runs(s).collect::<Vec<_>>();
        assert_eq!(all(&[]), vec![]);
        assert_eq!(all(&[7]), vec![(7, 7)]);
        assert_eq!(all(&[1, 2, 3, 4]), vec![(1, 4)]);
        assert_eq!(all(&[1, 2, 4, 5, 9]), vec![(1, 2), (4, 5), (9, 9)]);
        assert_eq!(all(&[-3, -2, 0]), vec![(-3, -2), (0, 0)]);
    }
}
