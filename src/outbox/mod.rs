//! The outbox: lifecycle events wait here, durable on local disk, until every
//! configured sink acknowledged them (SPEC §6).
//!
//! An event counts as emitted only once [`Outbox::append`] has returned `Ok`:
//! by then it is on disk (fsync'd). It leaves the outbox only when every sink
//! has acknowledged it ([`Outbox::ack`]) or parked it as a dead letter
//! ([`Outbox::park`]). This module must never drop an accepted event, never
//! deliver anything itself (the sinks do, see `crate::sink`), and never hold a
//! lock across an `.await`.
//!
//! # Why SQLite
//!
//! The store is one SQLite database (bundled through `rusqlite`, so there is
//! no server and no system library to match) in WAL mode. The alternatives
//! weighed were redb (pure Rust, but after an I/O error such as `ENOSPC` it
//! refuses further writes until the database is reopened), fjall (an LSM tree,
//! younger and with a moving on-disk format) and a hand-written segment log
//! (the most code to get right for the least gain: per-sink cursors that
//! advance out of order, dead letters and idempotency by id all want an
//! index). SQLite gives, off the shelf: atomic multi-row commits, a crash
//! story tested for decades (`kill -9` or power loss at any instant leaves
//! either the old or the new state), indexes for the per-sink queues and the
//! id set, a *recoverable* disk-full error (`SQLITE_FULL` rolls back the one
//! transaction; the database stays open and consistent), and an engine-level
//! size cap (`max_page_count`) that produces the very same error.
//!
//! # Layout
//!
//! `<path>/outbox.sqlite3` (+ `-wal`, `-shm`), `<path>/reserve`, a ballast
//! file (see "When the disk is full"), and `<path>/journal/` (see "The
//! journal tier").
//!
//! ```text
//! events(seq INTEGER PRIMARY KEY,     -- outbox order, assigned at append
//!        id TEXT UNIQUE,              -- CloudEvents id <pbx>:<call>:<seq>
//!        key TEXT,                    -- ordering key (call id / agent:<id>)
//!        type TEXT,                   -- CloudEvents type
//!        body TEXT,                   -- the CloudEvents JSON
//!        appended_at INTEGER,         -- wall clock, µs since the epoch
//!        digest BLOB)                 -- SHA-256 of body (format ≥ 2)
//!        -- only events some sink still has pending, or parked
//! pending(sink TEXT, pos INTEGER, seq INTEGER, PRIMARY KEY(sink, pos))
//!        -- one row per (sink, event) not yet acknowledged; a sink reads its
//!        -- rows in `pos` order. pos = seq at append; a dead letter that is
//!        -- retried gets a fresh pos after everything else.
//! dead_letters(seq, sink, parked_at, status, reason, PRIMARY KEY(seq, sink))
//! live_calls(call TEXT PRIMARY KEY,  -- calls live as of the stored events
//!        seq INTEGER,                 -- highest seq stored for the call
//!        state BLOB)                  -- its normalizer state (format ≥ 3)
//! delivered(id TEXT PRIMARY KEY, done_at INTEGER, digest BLOB)
//!        -- ids (and body digests) of events that left, kept for
//!        -- de-duplication
//! meta(k, v)                          -- 'format' = the format version
//! ```
//!
//! The format version ([`FORMAT_VERSION`]) is the number of migrations the
//! store has been through (`MIGRATIONS` in `writer.rs`, oldest first; a
//! store without a stamp is version 0). At open, the missing migrations run
//! in one transaction, so a crash leaves the older version intact; a store
//! at the current version is not written to, and one from a newer build is
//! refused ([`OutboxError::Format`], naming the file and both versions),
//! never rewritten.
//!
//! The event is stored as its CloudEvents JSON, the contract with the
//! helpdesk, plus the two fields the delivery runner needs without parsing
//! (`id`, `key`) and `type`. The typed `Event` is not stored: sinks that need
//! typed fields (Zammad) read them back from the JSON, whose field names are
//! public API anyway, so there is one stored format and no second schema to
//! migrate.
//!
//! # Writes and fsync policy (group commit)
//!
//! One writer thread owns the only write connection. Appends, acks, parks and
//! dead-letter retries are requests on a bounded channel
//! ([`OutboxOptions::queue_capacity`]; full means the caller *waits*: events
//! are never dropped). The writer takes the first request, then everything
//! already queued (up to `max_batch_events`, optionally waiting
//! `commit_interval` for more), applies them in one transaction and commits
//! once, with one `fdatasync` of the WAL, shared by every request in it
//! (the store runs `synchronous=NORMAL`, set once at open, and the writer
//! fsyncs the WAL file itself right after `COMMIT` and before any reply:
//! what `synchronous=FULL` does inside `COMMIT`, without switching the
//! pragma per commit, which SQLite applies only when the statement is
//! compiled, so it could not even be kept prepared). While a commit's fsync runs, new
//! requests queue up and share the next one, so at high rates the cost per
//! event falls with the batch size, and at low rates an event waits for at
//! most one fsync. Each append is its own savepoint: a failing append fails
//! alone, the others in the commit go through. Acknowledgements are not
//! waited for by the runners (an ack lost in a crash only means a
//! redelivery with the same id, which at-least-once allows), and a commit
//! that holds only acknowledgements is not fsync'd (it survives `kill -9`,
//! and after a power loss costs at most redeliveries); the next fsync'd
//! commit covers it, as the WAL is sequential. Acknowledgements (and parks)
//! alone wait up to 20 ms for the next append to share its commit instead
//! of taking one of their own between every two appends. An ack that fails to commit
//! is kept by the writer and applied again with the next commit. A commit
//! whose fsync fails is settled (its rows are in), but its appends are
//! answered with the error: their callers offer them again and find them
//! stored (duplicates), and the store counts as failing until a commit
//! goes through. Every statement of the writer stays prepared (a cache of
//! 64; the default 16 evicted some at every commit).
//!
//! # The journal tier
//!
//! With one sink, an append does not write the events to the tables: the
//! writer checks their ids and writes the calls' states in its transaction
//! as always, but the events themselves go to the journal (`journal.rs`:
//! `<path>/journal/`, checksummed segments, one write and one `fdatasync`
//! per commit, made durable before the transaction commits), and the
//! writer *holds* them (`journaled.rs`): in memory, in the tail (sinks read
//! them from there; a commit's held JSON is at most half the tail's
//! budget, so the tail never drops them unread), counted in the depth.
//! Each commit first *settles* the held events that are due: those the
//! sink acknowledged in it leave as delivered (only their id and digest
//! are written, to `delivered`); those held for a second without an
//! acknowledgement, parked, or asked for by a flush become rows
//! (`events` and `pending`) at their positions. At full rate a sink
//! acknowledges a commit's events within the next one or two, so almost
//! no event is ever a row: `benches/durable_ingest.rs` measured every
//! event leaving as delivered, half the bytes written per event and about
//! a fifth less writer CPU. A segment goes once every event in it is
//! settled and a commit after that reached the disk; the open segment is
//! closed at 8 MiB or after a minute. Under a size cap, what is held must
//! fit in half the room left, as rows; on a full disk nothing new is held,
//! acknowledged events still leave (a few at a time) and the others wait
//! for room. Readers of the tables alone see held events once they are
//! rows: [`Outbox::pending`] completes a read from the tail,
//! [`Outbox::contains`] asks the writer, [`Outbox::flush`] settles them.
//!
//! A crash leaves held events in the journal. Opening reads it back
//! (`journal.rs`, "Recovery": a torn last commit is cut, any other damage
//! refuses the start, naming the file and offset) and holds again, after
//! everything the store has, the events whose ids the store has neither
//! pending nor delivered; the first commit settles them. Opening writes
//! nothing to the store for this (a full disk must not stop it). With
//! several sinks the tier is off: an event leaves only once every sink
//! acknowledged it, so holding it would only add a write.
//!
//! # Idempotency
//!
//! Ids are deterministic, so a replay restarted after a crash re-emits the
//! same ids. Appending an id the outbox has — pending, parked or delivered —
//! with the same content is a no-op, counted as a duplicate: `events.id` is
//! unique, and the ids of delivered events stay in `delivered` for
//! `dedup_retention` (default 24 h), with the SHA-256 of their JSON.
//!
//! The same id with *other* content is a bug upstream (or a changed
//! configuration replaying old calls), and the outbox keeps what it has:
//! the new event is refused, logged with its id (never its content),
//! counted in `callbridge_outbox_id_conflicts_total` and reported to the
//! caller in [`AppendOutcome::conflicts`] (not as stored, and not as an
//! error to retry: retrying cannot succeed). Pending and parked events are
//! compared by their JSON, delivered ones by its digest; ids delivered by a
//! build that kept no digest count as duplicates.
//!
//! # Live calls
//!
//! Each append may carry checkpoints of the calls it concerns
//! ([`CallCheckpoint`], see `crate::normalize::persist` for what they hold
//! and why): they are written in the same savepoint as the events, so the
//! stored state of a call always matches its last stored event. Every
//! stored event of a call raises the call's `seq` in `live_calls`; its
//! `call.ended` deletes the row; a piece of a split append writes the
//! states only with its last piece (until then the rows keep their older
//! state and the raised `seq`). [`Outbox::live_calls`] reads them back at
//! start.
//!
//! # Compaction
//!
//! When the last sink acknowledges an event, the same transaction deletes
//! its row (unless a dead letter still needs it) and records its id in
//! `delivered`: deleting, rather than blanking the body, lets SQLite merge
//! and free the pages, so the live data is only what is undelivered. A
//! commit gathers each sink's acknowledgements into one request (except on
//! a full disk, where requests commit one at a time, of at most 100
//! acknowledgements each), which deletes its pending rows and moves its
//! done events a run of consecutive positions at a time (one range
//! statement per run for the rows, two for the events, instead of three
//! statements per event): a runner's request alone has hardly any runs, a
//! commit's gathered requests about eight positions per run, which took
//! about an eighth off the writer's CPU (`benches/durable_ingest.rs`); with
//! a single sink, whose rows are the only ones queued, an acknowledged
//! event is done without looking for other pending rows, and the dead
//! letters are looked at only while some exist. At most every
//! `compact_interval`, after a commit, the writer checkpoints the WAL,
//! deletes `delivered` ids older than `dedup_retention` and gives free pages
//! back to the filesystem (`auto_vacuum=INCREMENTAL`, `incremental_vacuum`).
//! SQLite reuses freed pages before growing the file, so a steady state
//! keeps a steady size. The WAL is checkpointed once it holds 1 MiB of
//! pages and truncated back to 1 MiB, so the data lives in the main file.
//! A new store has 8 KiB pages (`NEW_PAGE_BYTES` in `writer.rs`: half the
//! b-tree splits and WAL frames per event of SQLite's default 4 KiB); a
//! store made with 4 KiB pages by an older build keeps them, and both
//! kinds open in either build.
//!
//! # When the disk is full
//!
//! A write that fails with `SQLITE_FULL`/`ENOSPC` (or hits `max_bytes`, which
//! is enforced by SQLite's `max_page_count` and fails the same way) rolls back
//! that transaction only: nothing already accepted is touched (the writer
//! passes it on as [`StoreError::Full`], and callers get
//! [`OutboxError::DiskFull`]). The outbox
//! then (1) logs an error, counts `callbridge_outbox_write_errors_total`, sets
//! `callbridge_outbox_disk_full` to 1 and [`Outbox::is_writable`] to false,
//! which the daemon reports as "not ready"; (2) refuses further appends with
//! [`OutboxError::DiskFull`] (the caller keeps its events and retries:
//! backpressure up to the AMI reader, never loss); (3) deletes the ballast
//! file `reserve` (`reserve_bytes`, 2 MiB by default, written at open), so
//! that acknowledgements, which must write to free space, can still commit
//! while the disk is otherwise full. Delivering and compacting then frees
//! space; while full, the writer checkpoints with `TRUNCATE` (moving the WAL
//! into the main file with the ballast's room) every 500 ms, and once the
//! ballast can be written again (and the store is under 90 % of
//! `max_bytes`, or delivery took the depth below what it was when the store
//! filled up), appends are accepted again. "Room" is the same test at open
//! and here: the ballast is in place (written if missing) and at least
//! 1 MiB (one WAL's worth) is free beside it on the filesystem (`statvfs`,
//! as an unprivileged user sees it). An error
//! that rolls a whole transaction back fails every append in it (their
//! callers keep the events) and keeps its acknowledgements for the next
//! commit.
//!
//! ## Starting on a full disk
//!
//! A full disk never stops the outbox from opening a store at the current
//! format, whether the disk filled while callbridge was stopped, or the
//! outbox filled it and was killed (`kill -9`) or stopped then:
//!
//! - Opening writes nothing to an existing store: `auto_vacuum` is set only
//!   on a new one (setting it writes the header, a WAL frame, each time:
//!   that write was what failed), a store at the current format is only
//!   read, and dropping the queues of sinks no longer configured waits for
//!   the next start when it cannot be written.
//! - When the disk has no room at open (the test above), or opening fails
//!   for want of it (`SQLITE_FULL`, or an I/O error creating or growing the
//!   `-shm` file while the disk is nearly full), the ballast is released
//!   (and opening tried again): the store starts in its full state,
//!   `is_writable()` false (`/readyz` 503, `callbridge_outbox_disk_full` 1),
//!   logged once as `DISK FULL at start`. The sinks deliver what is stored,
//!   which frees space, and appends are accepted again once there is room,
//!   as above.
//! - Stopped while the disk is full (the ballast released, or under 1 MiB
//!   free), the writer leaves its connection open until the process exits:
//!   SQLite would otherwise delete the `-wal` and `-shm` files at close,
//!   and the next start would have to create the `-shm` file (32 KiB) on a
//!   full disk with no ballast left. The store is then as after a crash,
//!   which is safe by design (the WAL is replayed at the next open).
//! - Only a store that *must* write to open — a format upgrade (the
//!   migrations), a new store, a `-shm` file to create — on a disk with no
//!   room even after releasing the ballast fails, with
//!   [`OutboxError::NoRoom`] naming the file and the free bytes, leaving
//!   the store untouched (the migrations run in one transaction). The
//!   daemon does not exit then (a restart could not help and systemd would
//!   loop): `Delivery::for_daemon` logs it (once a minute), shows it in
//!   `systemctl status`, extends systemd's start timeout and tries again
//!   every 5 s until there is room. `replay` exits with the error.
//!
//! A `max_bytes` cap does not reproduce the failure at start: the write at
//! open went to the WAL, which `max_page_count` does not limit; a store at
//! its cap opens, and finds itself full at its first write.
//!
//! With `max_bytes`, the released ballast's room is lent to the store (the
//! page cap grows by `reserve_bytes`, at least 8 pages, until it has room
//! again): acknowledgements write `delivered` ids before they free
//! anything, and without that room a store filled to the brim could not
//! take them. The disk use stays the same, as the ballast file is gone.
//!
//! A full store is one *episode* until it has not been full for 5 s: the
//! error is logged once per episode (refilling within it is a debug line),
//! and `is_writable` (readiness, `callbridge_outbox_disk_full`) stays false
//! until the episode ends, so a store that delivery empties and new events
//! refill at once does not flap. Room is re-checked every 500 ms.
//!
//! [`Outbox::append`] is all or nothing. [`Outbox::append_what_fits`] (what
//! the daemon and `replay` use) stores the longest prefix that fits, in
//! halving pieces, and says how many were taken: a batch larger than the
//! whole store (`max_bytes` below one batch) goes in piece by piece while
//! the sinks drain what went before, instead of being refused forever.
//!
//! # Metrics
//!
//! `callbridge_outbox_depth` (events some sink has not acknowledged),
//! `callbridge_outbox_oldest_age_seconds`, `callbridge_dead_letters_waiting`,
//! `callbridge_outbox_disk_full` (0/1), `callbridge_outbox_write_errors_total`,
//! `callbridge_outbox_commits_total`, `callbridge_outbox_commit_duration_seconds`
//! (SQL and fsync of one group commit),
//! `callbridge_outbox_appends_total{result="stored"|"duplicate"}` and
//! `callbridge_outbox_id_conflicts_total`.
//!
//! # Testing
//!
//! Besides the unit tests here, `tests/outbox_model.rs` runs random
//! sequences of appends, acknowledgements, dead letters, restarts and
//! disk-full failures against the real store and a model of it. It runs a
//! few cases in `cargo test`; for many more:
//!
//! ```text
//! PROPTEST_CASES=5000 cargo test --release --test outbox_model
//! ```
//!
//! # Sinks and cursors
//!
//! The set of sink names is given at open. Each append creates one pending
//! row per sink. A sink removed from the configuration has its pending rows
//! dropped at open (logged); a sink added later receives events appended
//! from then on.

pub mod journal;
mod journaled;
mod tail;
mod writer;

use crate::event::{Event, EventKind};
use crate::normalize::CallCheckpoint;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};

pub use writer::{DB_FILE, FORMAT_VERSION};

/// A storage error of the outbox's SQLite store, as a value: it can be
/// cloned into the reply of every request a failed commit concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// `SQLITE_FULL`: the disk is full, or the store reached `max_bytes`
    /// (SQLite's `max_page_count`). Recoverable: only the transaction that
    /// hit it was rolled back.
    #[error("database or disk is full (SQLite extended code {extended}): {message}")]
    Full { extended: i32, message: String },
    /// Any other SQLite failure.
    #[error("SQLite error {code:?} (extended code {extended}): {message}")]
    Sqlite { code: rusqlite::ErrorCode, extended: i32, message: String },
    /// An error of the SQLite binding itself (type conversion, misuse).
    #[error("{message}")]
    Other { message: String },
}

impl StoreError {
    /// The disk (or `max_bytes`) is full.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full { .. })
    }

    /// SQLite's primary error code, when SQLite reported one.
    pub fn code(&self) -> Option<rusqlite::ErrorCode> {
        match self {
            StoreError::Full { .. } => Some(rusqlite::ErrorCode::DiskFull),
            StoreError::Sqlite { code, .. } => Some(*code),
            StoreError::Other { .. } => None,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        let message = e.to_string();
        match e.sqlite_error() {
            Some(f) if f.code == rusqlite::ErrorCode::DiskFull => {
                StoreError::Full { extended: f.extended_code, message }
            }
            Some(f) => StoreError::Sqlite { code: f.code, extended: f.extended_code, message },
            None => StoreError::Other { message },
        }
    }
}

/// What the outbox can fail with.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox disk is full (or the store reached max_bytes); nothing accepted was lost, new events are refused until space is freed")]
    DiskFull,
    #[error("outbox storage error")]
    Storage(#[source] StoreError),
    /// The journal cannot be read back at open (damaged, unreadable).
    #[error("outbox journal")]
    Journal(#[source] journal::JournalError),
    #[error("cannot create outbox directory {path:?}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox store {path:?} has format version {found}, newer than version {supported}, the newest this build understands; run a newer callbridge or move the file aside")]
    Format { path: PathBuf, found: String, supported: u32 },
    /// Opening the store must write (a format upgrade, the `-shm` file of
    /// a store closed cleanly, a new store) and the disk has no room for
    /// it, not even with the ballast released.
    #[error("no room on the disk to open the outbox store {path:?} ({}free): it must write to open (a format upgrade, its -shm file, a new store); free some space on that filesystem", .free.map(|f| format!("{f} bytes ")).unwrap_or_default())]
    NoRoom {
        path: PathBuf,
        free: Option<u64>,
        #[source]
        source: StoreError,
    },
    #[error("cannot start the outbox writer thread")]
    Spawn(#[source] std::io::Error),
    #[error("the outbox writer has stopped")]
    Closed,
    #[error("outbox read task failed")]
    Join(#[source] tokio::task::JoinError),
    #[error("unknown sink {0:?}")]
    UnknownSink(String),
}

impl OutboxError {
    /// A failed write: `DiskFull` when the disk (or `max_bytes`) is full,
    /// so callers keep telling a full disk from other failures.
    pub fn from_store(e: StoreError) -> OutboxError {
        if e.is_full() {
            OutboxError::DiskFull
        } else {
            OutboxError::Storage(e)
        }
    }

    /// True when retrying the same request later can succeed (the caller
    /// keeps its events and waits).
    pub fn is_transient(&self) -> bool {
        matches!(self, OutboxError::DiskFull | OutboxError::Storage(_))
    }
}

/// How the outbox is opened.
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// PBX name: the prefix of event ids and the CloudEvents source.
    pub pbx: String,
    /// Names of the sinks; each gets its own queue (cursor) of pending events.
    pub sinks: Vec<String>,
    /// Extra wait to gather a larger commit (0: none).
    pub commit_interval: Duration,
    /// Most requests (events, acks) applied in one commit.
    pub max_batch_events: usize,
    /// Capacity of the request channel to the writer (full = callers wait).
    pub queue_capacity: usize,
    /// Size cap of the database (0: none).
    pub max_bytes: u64,
    /// How long delivered ids are remembered for de-duplication.
    pub dedup_retention: Duration,
    /// Ballast released when the disk fills up, so acks can still commit.
    pub reserve_bytes: u64,
    /// Least time between two compactions.
    pub compact_interval: Duration,
    /// JSON of the events just committed kept in memory, for the sinks to
    /// read without a query (see `tail.rs`), bytes at most.
    pub tail_bytes: usize,
    /// Appends go through the journal (see "The journal tier"); off, each
    /// event is written to the tables at once, as before the tier existed.
    pub journal: bool,
}

impl OutboxOptions {
    pub fn new(pbx: &str, sinks: Vec<String>) -> Self {
        OutboxOptions {
            pbx: pbx.to_string(),
            sinks,
            commit_interval: Duration::ZERO,
            max_batch_events: 4096,
            queue_capacity: 1024,
            max_bytes: 0,
            dedup_retention: Duration::from_secs(24 * 3600),
            reserve_bytes: 2 << 20,
            compact_interval: Duration::from_secs(5),
            tail_bytes: tail::TAIL_BYTES,
            journal: true,
        }
    }

    /// Options from the `[outbox]` section.
    pub fn from_config(config: &crate::config::Config, sinks: Vec<String>) -> Self {
        let o = &config.outbox;
        OutboxOptions {
            commit_interval: Duration::from_millis(o.commit_interval_ms),
            max_batch_events: o.max_batch_events.max(1),
            max_bytes: o.max_bytes,
            dedup_retention: Duration::from_secs(o.dedup_retention_seconds),
            ..OutboxOptions::new(&config.pbx.name, sinks)
        }
    }
}

/// One event as a sink reads it from its queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Position in this sink's queue (what [`Outbox::ack`] takes).
    pub pos: i64,
    /// The event's place in the outbox.
    pub seq: i64,
    /// CloudEvents id. The id, key and body are shared blocks: the tail,
    /// every sink and their lanes hold them without a copy each.
    pub id: Arc<str>,
    /// Ordering key: events with the same key are delivered in order.
    pub key: Arc<str>,
    /// CloudEvents type (`call.answered`): static for events appended by
    /// this process, owned when read back from the store.
    pub kind: Cow<'static, str>,
    /// CloudEvents JSON, shared by the sinks that read it (no copy each).
    pub body: Arc<str>,
    /// When it was appended (µs since the epoch, local wall clock).
    pub appended_at: i64,
}

#[cfg(test)]
impl Record {
    /// A record at `pos` (also its seq) with id `lab:<key>:<pos>`.
    pub(crate) fn for_test(pos: i64, key: &str, kind: &str, body: &str) -> Record {
        Record {
            pos,
            seq: pos,
            id: format!("lab:{key}:{pos}").into(),
            key: key.into(),
            kind: Cow::Owned(kind.to_string()),
            body: body.into(),
            appended_at: 0,
        }
    }
}

/// An event a sink refused for good (4xx other than 408/429).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub sink: String,
    pub event_id: String,
    pub key: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// µs since the epoch.
    pub parked_at: i64,
    /// HTTP status, when there was one.
    pub status: Option<u16>,
    pub reason: String,
    /// The CloudEvents JSON.
    pub body: Option<String>,
}

/// What an append did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Newly stored events.
    pub appended: usize,
    /// Events whose id the outbox already had with the same content (no-op).
    pub duplicates: usize,
    /// Events refused because their id is already in the outbox with other
    /// content (logged with their ids). They were *not* stored: retrying
    /// them cannot succeed.
    pub conflicts: usize,
}

/// What [`Outbox::append_what_fits`] did: the first `taken` events were
/// handled (stored, or known already: see `outcome`); the others were not
/// stored because the store is full, and are the caller's to offer again
/// once delivery freed space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartialAppend {
    pub outcome: AppendOutcome,
    pub taken: usize,
}

/// Where the writer answers an append.
pub(crate) type AppendReply = oneshot::Sender<Result<PartialAppend, OutboxError>>;

/// An event ready to be stored.
#[derive(Debug, Clone)]
pub(crate) struct NewRecord {
    id: Arc<str>,
    key: Arc<str>,
    kind: &'static str,
    body: Arc<str>,
    /// SHA-256 of `body`: kept with the id after delivery, to tell a
    /// repeated event from a different one under the same id.
    digest: [u8; 32],
    /// The call event's call, for `live_calls`.
    call: Option<CallMark>,
}

/// What a call event tells `live_calls`.
#[derive(Debug, Clone)]
pub(crate) struct CallMark {
    call: crate::ids::CallId,
    seq: u64,
    /// `call.ended`: the call's row goes.
    ended: bool,
}

pub(crate) enum Op {
    /// `split`: store the longest prefix that fits rather than all or nothing.
    Append {
        records: Vec<NewRecord>,
        /// Written with the last of `records` (alone when there are none).
        /// Shared with the caller, which offers them again if they could
        /// not be stored (no copy of a batch's states per attempt).
        checkpoints: Arc<[CallCheckpoint]>,
        split: bool,
        reply: AppendReply,
    },
    Ack {
        sink: Arc<str>,
        acks: Vec<(i64, i64)>,
    },
    Park {
        sink: Arc<str>,
        pos: i64,
        seq: i64,
        status: Option<u16>,
        reason: String,
    },
    Retry {
        sink: Option<String>,
        event_id: Option<String>,
        reply: oneshot::Sender<Result<usize, OutboxError>>,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
    /// Whether the outbox has (or had) this id: the writer knows the events
    /// held in the journal, which the tables do not have.
    Contains {
        id: String,
        reply: oneshot::Sender<Result<bool, OutboxError>>,
    },
}

/// State shared by the handles and the writer thread.
pub(crate) struct Shared {
    writable: AtomicBool,
    depth: AtomicI64,
    dead_letters: AtomicI64,
    /// Highest position committed so far (sinks wait on it for new work).
    committed: watch::Sender<i64>,
    sinks: Vec<Arc<str>>,
    /// The events just committed, for the sinks to read without a query.
    tail: tail::Tail,
    /// The lowest position of an event held in the journal (`i64::MAX`:
    /// none), which the store does not have yet.
    held_from: AtomicI64,
    gauges: Gauges,
}

/// Gauge handles, registered once at open (install the metrics recorder
/// before opening the outbox).
struct Gauges {
    depth: metrics::Gauge,
    dead_letters: metrics::Gauge,
    disk_full: metrics::Gauge,
    oldest_age: metrics::Gauge,
}

impl Gauges {
    fn new() -> Gauges {
        Gauges {
            depth: metrics::gauge!("callbridge_outbox_depth"),
            dead_letters: metrics::gauge!("callbridge_dead_letters_waiting"),
            disk_full: metrics::gauge!("callbridge_outbox_disk_full"),
            oldest_age: metrics::gauge!("callbridge_outbox_oldest_age_seconds"),
        }
    }
}

/// Handle to the outbox; cheap to clone. The writer thread stops when the
/// last handle is dropped, after applying everything queued.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
    pbx: Arc<str>,
    db_path: Arc<PathBuf>,
    /// Read connections (WAL readers never block the writer). The mutex is
    /// held only to take or return a connection, never across an `.await`.
    readers: Arc<Mutex<Vec<Connection>>>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

pub(crate) fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// SHA-256 of an event's stored JSON.
pub(crate) fn digest(body: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(body.as_bytes()).into()
}

/// Page cache of each read connection, KiB. Reads are sinks fetching the
/// newest events, just written and still in the operating system's cache:
/// SQLite's default 2 MiB per connection held a few MB of duplicates.
const READER_CACHE_KIB: i64 = 512;

fn open_reader(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    Ok(conn)
}

impl Outbox {
    /// Opens (or creates) the outbox in directory `path` and starts its
    /// writer thread. Blocking: call it before the runtime gets busy or from
    /// `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>, opts: OutboxOptions) -> Result<Outbox, OutboxError> {
        let dir = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| OutboxError::CreateDir { path: dir.clone(), source })?;
        let sinks: Vec<Arc<str>> = opts.sinks.iter().map(|s| Arc::from(s.as_str())).collect();
        let opened = writer::open_store(&dir, &opts)?;
        let (committed, _) = watch::channel(opened.state.next_pos - 1);
        let shared = Arc::new(Shared {
            writable: AtomicBool::new(!opened.full),
            depth: AtomicI64::new(opened.state.depth),
            dead_letters: AtomicI64::new(opened.state.dead_letters),
            committed,
            tail: tail::Tail::new(&sinks, opened.tail_start(), opts.tail_bytes),
            held_from: AtomicI64::new(opened.held.first().map_or(i64::MAX, |h| h.pos)),
            sinks,
            gauges: Gauges::new(),
        });
        let (tx, rx) = mpsc::channel(opts.queue_capacity.max(1));
        let db_path = dir.join(DB_FILE);
        let handle = writer::spawn(opened, rx, shared.clone(), dir.clone(), opts.clone())?;
        let outbox = Outbox {
            tx,
            shared,
            pbx: Arc::from(opts.pbx.as_str()),
            db_path: Arc::new(db_path),
            readers: Arc::new(Mutex::new(Vec::new())),
            writer: Arc::new(Mutex::new(Some(handle))),
        };
        outbox.publish_gauges();
        Ok(outbox)
    }

    fn records(&self, events: &[Event]) -> Vec<NewRecord> {
        let mut records = Vec::with_capacity(events.len());
        self.prepare(events, &mut records);
        records
    }

    /// Builds the records of `events` (their JSON, id and digest) into
    /// `into`, ahead of their append: the pipeline does this while the
    /// batch before is being stored, so that the next append is ready when
    /// that commit returns (see [`Outbox::append_prepared_what_fits`]).
    pub(crate) fn prepare(&self, events: &[Event], into: &mut Vec<NewRecord>) {
        // Each event's JSON is written into one buffer, then copied once into
        // the block the writer, the tail and every sink share.
        let mut scratch = Vec::with_capacity(2048);
        let mut id = String::with_capacity(64);
        into.extend(events.iter().map(|e| {
            let body: Arc<str> = Arc::from(e.cloudevent_json_in(&self.pbx, &mut scratch));
            id.clear();
            e.write_id(&self.pbx, &mut id);
            NewRecord {
                id: Arc::from(id.as_str()),
                key: e.ordering_key(),
                kind: e.kind.type_name(),
                digest: digest(&body),
                body,
                call: e.call.as_ref().map(|c| CallMark {
                    call: c.id.clone(),
                    seq: e.seq,
                    ended: matches!(e.kind, EventKind::Ended { .. }),
                }),
            }
        }));
    }

    /// Stores `events` durably, in order; returns once they are on disk
    /// (one fsync shared with every other request in the same commit).
    /// Events whose id is already known are skipped.
    pub async fn append(&self, events: &[Event]) -> Result<AppendOutcome, OutboxError> {
        if events.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let records = self.records(events);
        let (reply, rx) = oneshot::channel();
        let op = Op::Append { records, checkpoints: Arc::new([]), split: false, reply };
        self.tx.send(op).await.map_err(|_| OutboxError::Closed)?;
        Ok(rx.await.map_err(|_| OutboxError::Closed)??.outcome)
    }

    /// Like [`Outbox::append`], but when the events do not all fit (the
    /// disk or `max_bytes` is full), stores the longest prefix that does,
    /// in order, and reports how many were taken; the caller offers the rest
    /// again once delivery freed space. Fails with
    /// [`OutboxError::DiskFull`] only when not even the first event fits.
    /// This is how a batch larger than the whole store gets in: piece by
    /// piece, while the sinks drain what went before.
    ///
    /// `checkpoints` are stored with the piece that takes the last event
    /// (or alone, when `events` is empty); when not every event fits, they
    /// are not stored, and the caller offers them again with the rest.
    pub async fn append_what_fits(
        &self,
        events: &[Event],
        checkpoints: &[CallCheckpoint],
    ) -> Result<PartialAppend, OutboxError> {
        self.append_what_fits_shared(events, &Arc::from(checkpoints)).await
    }

    /// [`Outbox::append_what_fits`] with checkpoints the caller keeps for
    /// another attempt: handed over without copying them.
    pub async fn append_what_fits_shared(
        &self,
        events: &[Event],
        checkpoints: &Arc<[CallCheckpoint]>,
    ) -> Result<PartialAppend, OutboxError> {
        self.append_prepared_what_fits(events, Vec::new(), checkpoints).await
    }

    /// [`Outbox::append_what_fits_shared`] with the records of `events`
    /// built beforehand ([`Outbox::prepare`]): the first attempt, with
    /// every event, stores them as they are; pieces after it (a store that
    /// is full) are built again from `events`. `prepared` that is not the
    /// records of `events` (another length) is not used.
    pub(crate) async fn append_prepared_what_fits(
        &self,
        events: &[Event],
        mut prepared: Vec<NewRecord>,
        checkpoints: &Arc<[CallCheckpoint]>,
    ) -> Result<PartialAppend, OutboxError> {
        if events.is_empty() && !checkpoints.is_empty() {
            let (reply, rx) = oneshot::channel();
            let op = Op::Append { records: Vec::new(), checkpoints: Arc::clone(checkpoints), split: false, reply };
            self.tx.send(op).await.map_err(|_| OutboxError::Closed)?;
            return rx.await.map_err(|_| OutboxError::Closed)?;
        }
        let mut done = PartialAppend::default();
        let mut piece = events.len();
        while done.taken < events.len() {
            let end = (done.taken + piece).min(events.len());
            let part = &events[done.taken..end];
            let records = match done.taken == 0 && prepared.len() == part.len() {
                true => std::mem::take(&mut prepared),
                false => self.records(part),
            };
            let checkpoints = if end == events.len() { Arc::clone(checkpoints) } else { Arc::new([]) };
            let (reply, rx) = oneshot::channel();
            let op = Op::Append { records, checkpoints, split: true, reply };
            self.tx.send(op).await.map_err(|_| OutboxError::Closed)?;
            match rx.await.map_err(|_| OutboxError::Closed)? {
                Ok(p) => {
                    done.taken += p.taken;
                    done.outcome.appended += p.outcome.appended;
                    done.outcome.duplicates += p.outcome.duplicates;
                    done.outcome.conflicts += p.outcome.conflicts;
                    if p.taken < part.len() {
                        break;
                    }
                }
                // Nothing of it fit (SQLite may give up the whole commit
                // then): a smaller piece may. Refusals of a full store are
                // immediate, so halving down to one event costs little.
                Err(OutboxError::DiskFull) if part.len() > 1 => piece = part.len() / 2,
                Err(e) if done.taken == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(done)
    }

    /// [`Outbox::append`] for synchronous callers (not from async code).
    pub fn append_blocking(&self, events: &[Event]) -> Result<AppendOutcome, OutboxError> {
        if events.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let records = self.records(events);
        let (reply, rx) = oneshot::channel();
        let op = Op::Append { records, checkpoints: Arc::new([]), split: false, reply };
        self.tx.blocking_send(op).map_err(|_| OutboxError::Closed)?;
        Ok(rx.blocking_recv().map_err(|_| OutboxError::Closed)??.outcome)
    }

    /// Marks `(pos, seq)` pairs of `sink`'s queue as delivered. Does not wait
    /// for the commit (a lost ack means a redelivery, which at-least-once
    /// allows); [`Outbox::flush`] waits.
    pub async fn ack(&self, sink: &Arc<str>, acks: Vec<(i64, i64)>) -> Result<(), OutboxError> {
        self.tx.send(Op::Ack { sink: sink.clone(), acks }).await.map_err(|_| OutboxError::Closed)
    }

    /// Moves one event of `sink`'s queue to the dead letters.
    pub async fn park(
        &self,
        sink: &Arc<str>,
        rec: &Record,
        status: Option<u16>,
        reason: String,
    ) -> Result<(), OutboxError> {
        let op = Op::Park { sink: sink.clone(), pos: rec.pos, seq: rec.seq, status, reason };
        self.tx.send(op).await.map_err(|_| OutboxError::Closed)
    }

    /// Puts dead letters back in their sinks' queues (after everything
    /// pending). `sink`/`event_id` narrow the selection; both `None` retries
    /// all. Returns how many were requeued.
    pub async fn retry_dead_letters(&self, sink: Option<&str>, event_id: Option<&str>) -> Result<usize, OutboxError> {
        if let Some(s) = sink {
            if !self.shared.sinks.iter().any(|x| &**x == s) {
                return Err(OutboxError::UnknownSink(s.to_string()));
            }
        }
        let (reply, rx) = oneshot::channel();
        let op = Op::Retry { sink: sink.map(str::to_string), event_id: event_id.map(str::to_string), reply };
        self.tx.send(op).await.map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Waits until everything requested so far is committed, and the
    /// events held in the journal before it are in the tables (or gone as
    /// delivered).
    pub async fn flush(&self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Op::Flush { reply }).await.map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)
    }

    /// Flushes; when this is the last handle, also stops the writer thread
    /// and waits for it.
    pub async fn close(self) -> Result<(), OutboxError> {
        self.flush().await?;
        // Only the last handle can wait for the thread: others still hold
        // the channel open.
        let last = Arc::strong_count(&self.writer) == 1;
        let handle = if last { self.writer.lock().ok().and_then(|mut h| h.take()) } else { None };
        drop(self.tx);
        if let Some(h) = handle {
            tokio::task::spawn_blocking(move || {
                let _ = h.join();
            })
            .await
            .map_err(OutboxError::Join)?;
        }
        Ok(())
    }

    /// False while the disk is full: readiness must report not ready.
    pub fn is_writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    /// Events not yet acknowledged (or parked) by every sink.
    pub fn depth(&self) -> u64 {
        self.shared.depth.load(Ordering::Acquire).max(0) as u64
    }

    /// Dead letters over all sinks.
    pub fn dead_letter_count(&self) -> u64 {
        self.shared.dead_letters.load(Ordering::Acquire).max(0) as u64
    }

    /// The configured sink names.
    pub fn sinks(&self) -> &[Arc<str>] {
        &self.shared.sinks
    }

    /// PBX name given at open.
    pub fn pbx(&self) -> &str {
        &self.pbx
    }

    /// Receives the highest committed position whenever it grows.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.shared.committed.subscribe()
    }

    /// Runs `f` on a read connection in the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let pool = self.readers.clone();
        let path = self.db_path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.lock().ok().and_then(|mut p| p.pop());
            let conn = match conn {
                Some(c) => c,
                None => open_reader(&path).map_err(|e| OutboxError::Storage(e.into()))?,
            };
            let r = f(&conn).map_err(|e| OutboxError::Storage(e.into()));
            if let Ok(mut p) = pool.lock() {
                p.push(conn);
            }
            r
        })
        .await
        .map_err(OutboxError::Join)?
    }

    /// Up to `limit` events pending for `sink` after position `after`, in order.
    pub async fn pending(&self, sink: &str, after: i64, limit: usize) -> Result<Vec<Record>, OutboxError> {
        let tail = &self.shared.tail;
        if let Some(records) = tail.pending(sink, after, limit) {
            return Ok(records);
        }
        // Read before the store: see below.
        let first = tail.first();
        let held_from = self.shared.held_from.load(Ordering::Acquire);
        let mut records = self.pending_stored(sink, after, limit).await?;
        let Some(rest) = limit.checked_sub(records.len()).filter(|&n| n > 0) else { return Ok(records) };
        // Short of `limit`: the store had no other row after `after`. The
        // events held in the journal are in the tail only (see "The
        // journal tier"), so the rest comes from there: from the last row
        // read if the tail covers it, else from the tail's first position,
        // provided the tail did not move since the store was read (then no
        // position before it was a row or can become one: new rows are
        // after it, and so were the held events).
        let from = records.last().map_or(after, |r| r.pos);
        let more = if from >= first - 1 {
            tail.pending(sink, from, rest)
        } else if held_from >= first {
            tail.pending(sink, first - 1, rest)
        } else {
            None
        };
        records.extend(more.unwrap_or_default());
        Ok(records)
    }

    /// [`Outbox::pending`] as the store has it, never from the tail.
    async fn pending_stored(&self, sink: &str, after: i64, limit: usize) -> Result<Vec<Record>, OutboxError> {
        let sink = sink.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT p.pos, e.seq, e.id, e.key, e.type, e.body, e.appended_at
                   FROM pending p JOIN events e ON e.seq = p.seq
                  WHERE p.sink = ?1 AND p.pos > ?2 ORDER BY p.pos LIMIT ?3",
            )?;
            let rows = st.query_map(rusqlite::params![sink, after, limit as i64], |r| {
                Ok(Record {
                    pos: r.get(0)?,
                    seq: r.get(1)?,
                    id: Arc::from(r.get::<_, String>(2)?),
                    key: Arc::from(r.get::<_, String>(3)?),
                    kind: Cow::Owned(r.get(4)?),
                    body: Arc::from(r.get::<_, String>(5)?),
                    appended_at: r.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// The calls live as of the stored events, with their last `seq` and
    /// state (see "Live calls"), by call id.
    pub async fn live_calls(&self) -> Result<Vec<CallCheckpoint>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare_cached("SELECT call, seq, state FROM live_calls ORDER BY call")?;
            let rows = st.query_map([], |r| {
                Ok(CallCheckpoint {
                    call: crate::event::CallId::new(&r.get::<_, String>(0)?),
                    seq: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                    state: r.get::<_, Option<Vec<u8>>>(2)?.unwrap_or_default(),
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Age of the oldest event some sink has not acknowledged.
    pub async fn oldest_undelivered_age(&self) -> Result<Option<Duration>, OutboxError> {
        let at = self.oldest_undelivered_at().await?;
        Ok(at.map(|t| Duration::from_micros((now_micros() - t).max(0) as u64)))
    }

    /// When the oldest event some sink has not acknowledged was stored
    /// (µs since the epoch, this machine's clock); `None` when everything
    /// was delivered. Dead letters do not count: they wait for an operator.
    pub async fn oldest_undelivered_at(&self) -> Result<Option<i64>, OutboxError> {
        self.read(|c| {
            c.query_row(
                "SELECT e.appended_at FROM pending p JOIN events e ON e.seq = p.seq ORDER BY p.seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
        })
        .await
    }

    /// Marks as delivered, for every sink, each pending event stored before
    /// `before` (µs since the epoch): what another instance is known to
    /// have delivered (a hot standby following its leader, see
    /// `crate::ha`). Dead letters stay. Returns how many deliveries were
    /// settled; everything is committed on return.
    ///
    /// Events are stored in time order, so the cut is found by a binary
    /// search on `seq` (a few point reads) and the pending rows before it
    /// are read by their `seq` index, a bounded batch at a time.
    pub async fn settle_before(&self, before: i64) -> Result<usize, OutboxError> {
        const BATCH: i64 = 4096;
        // The events held in the journal go to the tables first.
        self.flush().await?;
        let cut: i64 = self
            .read(move |c| {
                let bounds: (Option<i64>, Option<i64>) =
                    c.query_row("SELECT min(seq), max(seq) FROM events", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
                let (Some(mut lo), Some(hi)) = bounds else { return Ok(0) };
                // The first seq stored at or after `before` (hi + 1: none).
                let mut hi = hi + 1;
                let mut at = c.prepare_cached("SELECT appended_at FROM events WHERE seq >= ?1 ORDER BY seq LIMIT 1")?;
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    let t: Option<i64> = at.query_row([mid], |r| r.get(0)).optional()?;
                    match t {
                        Some(t) if t < before => lo = mid + 1,
                        _ => hi = mid,
                    }
                }
                Ok(lo)
            })
            .await?;
        let mut settled = 0;
        loop {
            let rows: Vec<(String, i64, i64)> = self
                .read(move |c| {
                    let mut st =
                        c.prepare_cached("SELECT sink, pos, seq FROM pending WHERE seq < ?1 ORDER BY seq LIMIT ?2")?;
                    let rows =
                        st.query_map(rusqlite::params![cut, BATCH], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                    rows.collect()
                })
                .await?;
            if rows.is_empty() {
                break;
            }
            let mut n = 0;
            for sink in &self.shared.sinks {
                let acks: Vec<(i64, i64)> =
                    rows.iter().filter(|(s, _, _)| **s == **sink).map(|&(_, pos, seq)| (pos, seq)).collect();
                if !acks.is_empty() {
                    n += acks.len();
                    self.ack(sink, acks).await?;
                }
            }
            self.flush().await?;
            settled += n;
            // A row of a sink no longer configured would come back for ever.
            if n == 0 || (rows.len() as i64) < BATCH {
                break;
            }
        }
        Ok(settled)
    }

    /// Every dead letter, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT d.sink, e.id, e.key, e.type, d.parked_at, d.status, d.reason, e.body
                   FROM dead_letters d JOIN events e ON e.seq = d.seq ORDER BY d.parked_at, d.seq",
            )?;
            let rows = st.query_map([], |r| {
                Ok(DeadLetter {
                    sink: r.get(0)?,
                    event_id: r.get(1)?,
                    key: r.get(2)?,
                    kind: r.get(3)?,
                    parked_at: r.get(4)?,
                    status: r.get::<_, Option<i64>>(5)?.and_then(|s| u16::try_from(s).ok()),
                    reason: r.get(6)?,
                    body: r.get(7)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Whether the outbox has (or had, within `dedup_retention`) this id.
    pub async fn contains(&self, event_id: &str) -> Result<bool, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Op::Contains { id: event_id.to_string(), reply }).await.map_err(|_| OutboxError::Closed)?;
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Sets the gauges that only need the counters; see
    /// [`Outbox::refresh_gauges`] for the age.
    pub(crate) fn publish_gauges(&self) {
        publish_counters(&self.shared);
    }

    /// Updates every outbox gauge, the oldest age included (the sink runners
    /// call this once a second).
    pub async fn refresh_gauges(&self) {
        publish_counters(&self.shared);
        match self.oldest_undelivered_age().await {
            Ok(age) => self.shared.gauges.oldest_age.set(age.map_or(0.0, |a| a.as_secs_f64())),
            Err(e) => tracing::warn!(error = %e, "outbox: cannot read the oldest undelivered event"),
        }
    }

    /// Waits until nothing is pending (or `timeout` passes); returns whether
    /// the outbox drained.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.depth() == 0 {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub(crate) fn publish_counters(shared: &Shared) {
    let g = &shared.gauges;
    g.depth.set(shared.depth.load(Ordering::Acquire) as f64);
    g.dead_letters.set(shared.dead_letters.load(Ordering::Acquire) as f64);
    g.disk_full.set(if shared.writable.load(Ordering::Acquire) { 0.0 } else { 1.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a11() -> Vec<Event> {
        let root = env!("CARGO_MANIFEST_DIR");
        let config = crate::config::Config::load(Path::new(&format!("{root}/config/lab.toml"))).unwrap();
        crate::replay::events_of(&config, &[format!("{root}/fixtures/ami/a11-concurrent-mix.ami")]).unwrap()
    }

    fn open(dir: &Path, sinks: &[&str]) -> Outbox {
        Outbox::open(dir, OutboxOptions::new("lab", sinks.iter().map(|s| s.to_string()).collect())).unwrap()
    }

    fn rows(dir: &Path, table: &str) -> i64 {
        let c = Connection::open(dir.join(DB_FILE)).unwrap();
        c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).unwrap()
    }

    fn segments(dir: &Path) -> usize {
        std::fs::read_dir(dir.join(journaled::JOURNAL_DIR)).map_or(0, |d| d.count())
    }

    /// With one sink that keeps up, an event is written once, to the
    /// journal: acknowledged before the next commit, it leaves as
    /// delivered without ever being a row of the store's queue tables.
    #[tokio::test]
    async fn events_acknowledged_in_time_never_become_rows_of_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let events = a11();
        let ob = open(tmp.path(), &["a"]);
        assert_eq!(ob.append(&events[..3]).await.unwrap().appended, 3);
        assert_eq!((rows(tmp.path(), "events"), rows(tmp.path(), "pending")), (0, 0), "held in the journal");
        assert_eq!(segments(tmp.path()), 1);
        assert_eq!(ob.depth(), 3);
        let recs = ob.pending("a", 0, 10).await.unwrap();
        assert_eq!(recs.len(), 3);
        ob.ack(&Arc::from("a"), recs.iter().map(|r| (r.pos, r.seq)).collect()).await.unwrap();
        ob.flush().await.unwrap();
        assert_eq!(ob.depth(), 0);
        assert_eq!((rows(tmp.path(), "events"), rows(tmp.path(), "delivered")), (0, 3));
        // Known as delivered: the same again is a duplicate.
        assert_eq!(ob.append(&events[..3]).await.unwrap().duplicates, 3);
        ob.close().await.unwrap();
        assert_eq!(segments(tmp.path()), 0, "closed: the settled journal is removed");

        // Without the journal, the same event is a row at once.
        let tmp = tempfile::tempdir().unwrap();
        let opts = OutboxOptions { journal: false, ..OutboxOptions::new("lab", vec!["a".into()]) };
        let ob = Outbox::open(tmp.path(), opts).unwrap();
        ob.append(&events[..3]).await.unwrap();
        assert_eq!(rows(tmp.path(), "events"), 3);
        ob.close().await.unwrap();
    }

    /// Held events whose sink does not acknowledge them (slow, down) become
    /// rows after a while without any other request, readable by a sink
    /// behind the tail.
    #[tokio::test]
    async fn held_events_become_rows_when_no_acknowledgement_comes() {
        let tmp = tempfile::tempdir().unwrap();
        let events = a11();
        let ob = open(tmp.path(), &["a"]);
        ob.append(&events[..2]).await.unwrap();
        let t = std::time::Instant::now();
        while rows(tmp.path(), "pending") != 2 {
            assert!(t.elapsed() < Duration::from_secs(10), "never written to the tables");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(t.elapsed() >= Duration::from_millis(500), "settled after a wait, not at once");
        assert_eq!(ob.pending_stored("a", 0, 10).await.unwrap().len(), 2);
        assert_eq!(ob.depth(), 2);
        ob.close().await.unwrap();
    }

    /// A crash leaves events in the journal: the next open reads back those
    /// the store has neither pending nor delivered (once each), after what
    /// the store has, and the first commit writes them to the tables.
    #[tokio::test]
    async fn events_left_in_the_journal_by_a_crash_are_read_back_once() {
        let tmp = tempfile::tempdir().unwrap();
        let events: Vec<Event> = a11().into_iter().take(4).collect();
        let ob = open(tmp.path(), &["a"]);
        ob.append(&events[..2]).await.unwrap();
        let recs = ob.pending("a", 0, 10).await.unwrap();
        ob.ack(&Arc::from("a"), vec![(recs[0].pos, recs[0].seq)]).await.unwrap();
        let records = ob.records(&events);
        ob.close().await.unwrap();
        assert_eq!(segments(tmp.path()), 0);
        // What a crash leaves: events 0 (delivered), 1 (pending), 2, 3 and
        // 2 again, in the journal.
        let mut journal = journal::Journal::open(&tmp.path().join(journaled::JOURNAL_DIR), |_, _| {}).unwrap();
        let mut entry = Vec::new();
        for i in [0, 1, 2, 3, 2] {
            entry.clear();
            journaled::Held::new(&records[i], 0, 5).write_entry(&mut entry);
            journal.push(&entry).unwrap();
        }
        journal.commit().unwrap();
        drop(journal);

        for _ in 0..2 {
            let ob = open(tmp.path(), &["a"]);
            assert_eq!(ob.depth(), 3);
            let recs = ob.pending("a", 0, 10).await.unwrap();
            let ids: Vec<String> = recs.iter().map(|r| r.id.to_string()).collect();
            assert_eq!(ids, events[1..4].iter().map(|e| e.id("lab")).collect::<Vec<_>>());
            assert_eq!(*recs[2].body, events[3].to_cloudevent_json("lab"));
            assert!(ob.contains(&events[3].id("lab")).await.unwrap());
            ob.flush().await.unwrap();
            assert_eq!(rows(tmp.path(), "events"), 3, "written to the tables by the first commit");
            ob.close().await.unwrap();
            assert_eq!(segments(tmp.path()), 0);
        }
    }

    /// A damaged journal stops the outbox from opening, naming it: nothing
    /// accepted is dropped in silence.
    #[tokio::test]
    async fn a_damaged_journal_is_refused_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let mut journal = journal::Journal::open(&tmp.path().join(journaled::JOURNAL_DIR), |_, _| {}).unwrap();
        journal.push(b"not an event entry").unwrap();
        journal.commit().unwrap();
        drop(journal);
        let e = Outbox::open(tmp.path(), OutboxOptions::new("lab", vec!["a".into()])).err().unwrap();
        let shown = format!("{:#}", anyhow::Error::from(e));
        assert!(shown.contains("journal") && shown.contains("unknown kind"), "{shown}");
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_are_idempotent_by_id() {
        let tmp = tempfile::tempdir().unwrap();
        let events = a11();
        let ob = open(tmp.path(), &["a"]);
        let o = ob.append(&events).await.unwrap();
        assert_eq!((o.appended, o.duplicates), (events.len(), 0));
        let o = ob.append(&events[..5]).await.unwrap();
        assert_eq!((o.appended, o.duplicates), (0, 5));
        ob.close().await.unwrap();

        let ob = open(tmp.path(), &["a"]);
        assert_eq!(ob.depth(), events.len() as u64);
        let recs = ob.pending("a", 0, 1000).await.unwrap();
        let ids: Vec<String> = events.iter().map(|e| e.id("lab")).collect();
        assert_eq!(recs.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(), ids);
        assert_eq!(*recs[3].body, events[3].to_cloudevent_json("lab"));
        assert_eq!(recs[3].key, events[3].ordering_key());
        let name: Arc<str> = Arc::from("a");
        ob.ack(&name, recs.iter().map(|r| (r.pos, r.seq)).collect()).await.unwrap();
        ob.flush().await.unwrap();
        assert_eq!(ob.depth(), 0);
        assert!(ob.pending("a", 0, 1000).await.unwrap().is_empty());
        // Delivered ids are remembered: the same trace again is a no-op.
        let o = ob.append(&events).await.unwrap();
        assert_eq!(o.duplicates, events.len());
        assert!(ob.contains(&ids[0]).await.unwrap());
        assert_eq!(ob.oldest_undelivered_age().await.unwrap(), None);
    }

    #[tokio::test]
    async fn settling_marks_what_was_stored_before_a_time_delivered_for_every_sink() {
        let tmp = tempfile::tempdir().unwrap();
        let events = a11();
        let ob = open(tmp.path(), &["a", "b"]);
        assert_eq!(ob.settle_before(now_micros()).await.unwrap(), 0, "an empty outbox");
        ob.append(&events[..40]).await.unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let cut = now_micros();
        std::thread::sleep(Duration::from_millis(5));
        ob.append(&events[40..]).await.unwrap();
        // Sink b already took the first ten of the older ones.
        let b: Arc<str> = Arc::from("b");
        let first = ob.pending("b", 0, 10).await.unwrap();
        ob.ack(&b, first.iter().map(|r| (r.pos, r.seq)).collect()).await.unwrap();
        ob.flush().await.unwrap();
        assert_eq!(ob.oldest_undelivered_at().await.unwrap().map(|t| t < cut), Some(true));

        assert_eq!(ob.settle_before(cut).await.unwrap(), 40 + 30);
        assert_eq!(ob.depth(), (events.len() - 40) as u64);
        for sink in ["a", "b"] {
            let ids: Vec<String> =
                ob.pending(sink, 0, 1000).await.unwrap().into_iter().map(|r| r.id.to_string()).collect();
            let newer: Vec<String> = events[40..].iter().map(|e| e.id("lab")).collect();
            assert_eq!(ids, newer, "{sink}: only what was stored after the cut is pending");
        }
        assert!(ob.oldest_undelivered_at().await.unwrap().is_some_and(|t| t >= cut));
        // Settled ids are remembered as delivered: appending them again is a no-op.
        assert_eq!(ob.append(&events[..40]).await.unwrap().duplicates, 40);
        // Again: nothing more before the cut.
        assert_eq!(ob.settle_before(cut).await.unwrap(), 0);
        assert_eq!(ob.settle_before(now_micros() + 1).await.unwrap(), 2 * (events.len() - 40));
        assert_eq!(ob.depth(), 0);
        assert_eq!(ob.oldest_undelivered_at().await.unwrap(), None);
    }

    fn checkpoint(call: &str, seq: u64, state: &str) -> CallCheckpoint {
        CallCheckpoint { call: crate::event::CallId::new(call), seq, state: state.as_bytes().to_vec() }
    }

    #[tokio::test]
    async fn live_calls_follow_the_stored_events() {
        let tmp = tempfile::tempdir().unwrap();
        let events = a11();
        let call = events[0].call.as_ref().unwrap().id.clone();
        let of_call: Vec<Event> =
            events.iter().filter(|e| e.call.as_ref().is_some_and(|c| c.id == call)).cloned().collect();
        let ob = open(tmp.path(), &["a"]);
        // Two events and the call's state: stored together.
        ob.append_what_fits(&of_call[..2], &[checkpoint(call.as_str(), 2, "s2")]).await.unwrap();
        let rows = ob.live_calls().await.unwrap();
        assert_eq!(rows, vec![checkpoint(call.as_str(), 2, "s2")]);
        // Events without a state raise the call's seq, keep its last state.
        ob.append_what_fits(&of_call[2..3], &[]).await.unwrap();
        assert_eq!(ob.live_calls().await.unwrap(), vec![checkpoint(call.as_str(), 3, "s2")]);
        // A state alone (orderly shutdown).
        ob.append_what_fits(&[], &[checkpoint(call.as_str(), 3, "s3")]).await.unwrap();
        ob.close().await.unwrap();
        let ob = open(tmp.path(), &["a"]);
        assert_eq!(ob.live_calls().await.unwrap(), vec![checkpoint(call.as_str(), 3, "s3")]);
        // The call's call.ended removes it, in the same append.
        let last = of_call.len();
        ob.append_what_fits(&of_call[3..], &[checkpoint("other", 1, "o")]).await.unwrap();
        assert!(matches!(of_call[last - 1].kind, EventKind::Ended { .. }));
        assert_eq!(ob.live_calls().await.unwrap(), vec![checkpoint("other", 1, "o")]);
    }

    #[tokio::test]
    async fn an_event_leaves_only_when_every_sink_acknowledged_it() {
        let tmp = tempfile::tempdir().unwrap();
        let events = a11();
        let ob = open(tmp.path(), &["a", "b"]);
        ob.append(&events[..3]).await.unwrap();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let ra = ob.pending("a", 0, 10).await.unwrap();
        ob.ack(&a, ra.iter().map(|r| (r.pos, r.seq)).collect()).await.unwrap();
        ob.flush().await.unwrap();
        assert_eq!(ob.depth(), 3);
        assert!(ob.pending("a", 0, 10).await.unwrap().is_empty());
        assert_eq!(ob.pending("b", 0, 10).await.unwrap().len(), 3);
        assert!(ob.oldest_undelivered_age().await.unwrap().is_some());
        ob.close().await.unwrap();
        // Sink b removed from the configuration: its queue goes.
        let ob = open(tmp.path(), &["a"]);
        assert_eq!(ob.depth(), 0);
        drop(b);
    }

    #[tokio::test]
    async fn acknowledgements_scattered_repeated_or_of_parked_events_settle_what_they_name() {
        let tmp = tempfile::tempdir().unwrap();
        let events = a11();
        let ob = open(tmp.path(), &["a", "b"]);
        ob.append(&events[..12]).await.unwrap();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let recs = ob.pending("a", 0, 100).await.unwrap();
        let pair = |i: usize| (recs[i].pos, recs[i].seq);
        // b parks #4; then both acknowledge in requests queued together
        // (one commit, as a runner's would be), out of order, #2 twice,
        // and b #4 again after its park.
        ob.park(&b, &recs[4], Some(400), "HTTP 400".into()).await.unwrap();
        ob.flush().await.unwrap();
        let (ob1, ob2, a1, b1) = (ob.clone(), ob.clone(), a.clone(), b.clone());
        let send = tokio::join!(
            ob1.ack(&a1, vec![pair(6), pair(2), pair(0)]),
            ob2.ack(&b1, vec![pair(2), pair(3), pair(4)]),
            ob.ack(&a, vec![pair(1), pair(2), pair(7), pair(5)]),
        );
        assert!(send.0.is_ok() && send.1.is_ok() && send.2.is_ok());
        ob.ack(&b, vec![pair(0), pair(1), pair(2)]).await.unwrap();
        ob.flush().await.unwrap();
        let left = |sink: &'static str| {
            let ob = ob.clone();
            async move { ob.pending(sink, 0, 100).await.unwrap().iter().map(|r| r.seq).collect::<Vec<_>>() }
        };
        let seq = |i: &[usize]| i.iter().map(|&i| recs[i].seq).collect::<Vec<_>>();
        assert_eq!(left("a").await, seq(&[3, 4, 8, 9, 10, 11]));
        assert_eq!(left("b").await, seq(&[5, 6, 7, 8, 9, 10, 11]));
        // Done for both: #0, #1, #2; #4 waits as b's dead letter and in a's queue.
        assert_eq!(ob.depth(), 9);
        assert_eq!(ob.dead_letter_count(), 1);
        for i in [0, 1, 2] {
            assert!(ob.contains(&recs[i].id).await.unwrap());
        }
        ob.close().await.unwrap();
        let ob = open(tmp.path(), &["a", "b"]);
        assert_eq!((ob.depth(), ob.dead_letter_count()), (9, 1), "the same after a restart");
    }

    #[tokio::test]
    async fn dead_letters_are_listed_and_requeued_after_everything_else() {
        let tmp = tempfile::tempdir().unwrap();
        let events = a11();
        let ob = open(tmp.path(), &["a"]);
        ob.append(&events[..4]).await.unwrap();
        let a: Arc<str> = Arc::from("a");
        let recs = ob.pending("a", 0, 10).await.unwrap();
        ob.park(&a, &recs[1], Some(400), "HTTP 400: bad".into()).await.unwrap();
        ob.flush().await.unwrap();
        assert_eq!((ob.depth(), ob.dead_letter_count()), (3, 1));
        let dl = ob.dead_letters().await.unwrap();
        assert_eq!(dl.len(), 1);
        assert_eq!((dl[0].event_id.as_str(), dl[0].status), (&*recs[1].id, Some(400)));
        assert!(matches!(ob.retry_dead_letters(Some("zz"), None).await, Err(OutboxError::UnknownSink(_))));
        assert_eq!(ob.retry_dead_letters(None, Some(&recs[1].id)).await.unwrap(), 1);
        assert_eq!((ob.depth(), ob.dead_letter_count()), (4, 0));
        let again = ob.pending("a", recs[3].pos, 10).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, recs[1].id);
        assert!(again[0].pos > recs[3].pos);
        // A parked id is still known: re-appending it is a no-op.
        assert_eq!(ob.append(&events[1..2]).await.unwrap().duplicates, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_commits_and_all_land() {
        let tmp = tempfile::tempdir().unwrap();
        let events = Arc::new(a11());
        let ob = open(tmp.path(), &["a"]);
        let mut tasks = Vec::new();
        for e in events.iter().cloned() {
            let ob = ob.clone();
            tasks.push(tokio::spawn(async move { ob.append(&[e]).await.unwrap() }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().appended, 1);
        }
        assert_eq!(ob.depth(), events.len() as u64);
        assert_eq!(*ob.subscribe().borrow(), events.len() as i64);
    }
    /// The same event with other content under the same id (a call event:
    /// its id does not depend on the time).
    fn altered(e: &Event) -> Event {
        let mut e = e.clone();
        e.time += 1_000;
        e
    }

    fn counter(snap: &metrics_util::debugging::Snapshotter, name: &str) -> u64 {
        snap.snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(k, _, _, v)| match v {
                metrics_util::debugging::DebugValue::Counter(c) if k.key().name() == name => Some(c),
                _ => None,
            })
            .sum()
    }

    #[tokio::test]
    async fn acknowledgements_alone_wait_for_the_next_append_to_share_its_commit_and_no_longer() {
        let tmp = tempfile::tempdir().unwrap();
        let events = a11();
        assert!(events.len() >= 12);
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        let ob = metrics::with_local_recorder(&recorder, || open(tmp.path(), &["a"]));
        let a: Arc<str> = Arc::from("a");
        // Commits since the last call (a snapshot resets the counter).
        let commits = || counter(&snap, "callbridge_outbox_commits_total");
        let mut next = 0;
        let mut shared = false;
        // An append a few milliseconds after an acknowledgement: one commit
        // for both (the acknowledgement alone would have committed by then).
        // Tried a few times, as a loaded machine may pause this task longer
        // than the hold.
        for _ in 0..5 {
            ob.append(&events[next..next + 2]).await.unwrap();
            next += 2;
            let recs = ob.pending("a", 0, 100).await.unwrap();
            commits();
            ob.ack(&a, recs.iter().map(|r| (r.pos, r.seq)).collect()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            ob.append(&events[next..next + 1]).await.unwrap();
            next += 1;
            assert_eq!(ob.depth(), 1, "the acknowledged events are settled once the append returns");
            if commits() == 1 {
                shared = true;
                break;
            }
            let recs = ob.pending("a", 0, 100).await.unwrap();
            ob.ack(&a, recs.iter().map(|r| (r.pos, r.seq)).collect()).await.unwrap();
            ob.flush().await.unwrap();
        }
        assert!(shared, "the acknowledgement never shared the next append's commit");

        // With nothing after it, an acknowledgement commits on its own once
        // the hold is over, without a flush.
        let recs = ob.pending("a", 0, 100).await.unwrap();
        commits();
        ob.ack(&a, recs.iter().map(|r| (r.pos, r.seq)).collect()).await.unwrap();
        let t = std::time::Instant::now();
        while ob.depth() != 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "an acknowledgement alone was never committed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(commits(), 1);
        ob.close().await.unwrap();
    }

    #[tokio::test]
    async fn an_id_already_stored_with_other_content_is_refused_as_a_conflict() {
        let tmp = tempfile::tempdir().unwrap();
        let events: Vec<Event> = a11().into_iter().filter(|e| e.call.is_some()).collect();
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        let ob = metrics::with_local_recorder(&recorder, || open(tmp.path(), &["a"]));
        assert_eq!(ob.append(&events[..3]).await.unwrap().appended, 3);

        // Pending: other content refused, the stored event untouched; the
        // rest of the batch is stored; identical content is a duplicate.
        let other = altered(&events[1]);
        assert_eq!(other.id("lab"), events[1].id("lab"));
        let o = ob.append(&[other.clone(), events[3].clone(), events[0].clone()]).await.unwrap();
        assert_eq!(o, AppendOutcome { appended: 1, duplicates: 1, conflicts: 1 });
        let recs = ob.pending("a", 0, 10).await.unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!(*recs[1].body, events[1].to_cloudevent_json("lab"));
        assert_eq!(ob.depth(), 4);

        // Within one batch: the second, different event under a new id is refused.
        let o = ob.append(&[events[4].clone(), altered(&events[4])]).await.unwrap();
        assert_eq!(o, AppendOutcome { appended: 1, duplicates: 0, conflicts: 1 });

        // Delivered: only the digest is left, and it still tells them apart.
        let a: Arc<str> = Arc::from("a");
        let recs = ob.pending("a", 0, 10).await.unwrap();
        ob.ack(&a, recs.iter().map(|r| (r.pos, r.seq)).collect()).await.unwrap();
        ob.flush().await.unwrap();
        assert_eq!(ob.depth(), 0);
        let o = ob.append(&[other, events[1].clone()]).await.unwrap();
        assert_eq!(o, AppendOutcome { appended: 0, duplicates: 1, conflicts: 1 });
        assert_eq!(ob.depth(), 0);
        ob.close().await.unwrap();

        // After a restart too.
        let ob = open(tmp.path(), &["a"]);
        let o = ob.append(&[altered(&events[2]), events[2].clone()]).await.unwrap();
        assert_eq!(o, AppendOutcome { appended: 0, duplicates: 1, conflicts: 1 });
        assert_eq!(counter(&snap, "callbridge_outbox_id_conflicts_total"), 3);
    }

    /// Creates `dir`'s store with the layout of format version 1 (before
    /// digests), stamped `stamp` (none: version 0), holding one pending
    /// event, one parked event and one delivered id.
    fn old_store(dir: &Path, stamp: Option<&str>, events: &[Event]) {
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;
             CREATE TABLE meta(k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
             CREATE TABLE events(seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, key TEXT NOT NULL,
                 type TEXT NOT NULL, body TEXT NOT NULL, appended_at INTEGER NOT NULL);
             CREATE TABLE delivered(id TEXT PRIMARY KEY, done_at INTEGER NOT NULL) WITHOUT ROWID;
             CREATE INDEX delivered_done ON delivered(done_at);
             CREATE TABLE pending(sink TEXT NOT NULL, pos INTEGER NOT NULL, seq INTEGER NOT NULL,
                 PRIMARY KEY(sink, pos)) WITHOUT ROWID;
             CREATE INDEX pending_seq ON pending(seq);
             CREATE TABLE dead_letters(seq INTEGER NOT NULL, sink TEXT NOT NULL, parked_at INTEGER NOT NULL,
                 status INTEGER, reason TEXT NOT NULL, PRIMARY KEY(seq, sink)) WITHOUT ROWID;",
        )
        .unwrap();
        if let Some(v) = stamp {
            conn.execute("INSERT INTO meta(k, v) VALUES ('format', ?1)", [v]).unwrap();
        }
        for (seq, e) in events[..2].iter().enumerate() {
            conn.execute(
                "INSERT INTO events(seq, id, key, type, body, appended_at) VALUES (?1, ?2, ?3, ?4, ?5, 7)",
                rusqlite::params![
                    seq as i64 + 1,
                    e.id("lab"),
                    e.ordering_key(),
                    e.kind.type_name(),
                    e.to_cloudevent_json("lab")
                ],
            )
            .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO pending(sink, pos, seq) VALUES ('a', 1, 1);
             INSERT INTO dead_letters(seq, sink, parked_at, status, reason) VALUES (2, 'a', 8, 400, 'HTTP 400');",
        )
        .unwrap();
        conn.execute("INSERT INTO delivered(id, done_at) VALUES (?1, 9)", [events[2].id("lab")]).unwrap();
    }

    #[tokio::test]
    async fn stores_of_older_formats_are_migrated_and_keep_their_rows() {
        let events: Vec<Event> = a11().into_iter().filter(|e| e.call.is_some()).collect();
        for stamp in [Some("1"), None] {
            let tmp = tempfile::tempdir().unwrap();
            old_store(tmp.path(), stamp, &events);
            let ob = open(tmp.path(), &["a"]);
            assert_eq!((ob.depth(), ob.dead_letter_count()), (1, 1), "stamp {stamp:?}");
            let recs = ob.pending("a", 0, 10).await.unwrap();
            assert_eq!(recs.len(), 1);
            assert_eq!(
                (recs[0].id.clone(), recs[0].body.to_string()),
                (Arc::from(events[0].id("lab")), events[0].to_cloudevent_json("lab"))
            );
            let dl = ob.dead_letters().await.unwrap();
            assert_eq!((dl[0].event_id.clone(), dl[0].status), (events[1].id("lab"), Some(400)));
            assert!(ob.contains(&events[2].id("lab")).await.unwrap());
            // Rows from before digests: same content is a duplicate, other
            // content under a stored id a conflict; a delivered id without
            // digest can only count as a duplicate.
            let o = ob.append(&[events[0].clone(), altered(&events[1]), altered(&events[2])]).await.unwrap();
            assert_eq!(o, AppendOutcome { appended: 0, duplicates: 2, conflicts: 1 });
            // New events after the old ones, and delivered with a digest.
            assert_eq!(ob.append(&events[3..5]).await.unwrap().appended, 2);
            let a: Arc<str> = Arc::from("a");
            let recs = ob.pending("a", 0, 10).await.unwrap();
            assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 3, 4]);
            ob.ack(&a, recs.iter().map(|r| (r.pos, r.seq)).collect()).await.unwrap();
            ob.close().await.unwrap();

            let conn = Connection::open(tmp.path().join(DB_FILE)).unwrap();
            let v: String = conn.query_row("SELECT v FROM meta WHERE k = 'format'", [], |r| r.get(0)).unwrap();
            assert_eq!(v, FORMAT_VERSION.to_string());
            // Opening a store of the current format changes nothing.
            assert_eq!(writer::migrate(&conn, tmp.path()).unwrap(), 0);
            drop(conn);
            let ob = open(tmp.path(), &["a"]);
            let o = ob.append(&[altered(&events[3]), events[4].clone()]).await.unwrap();
            assert_eq!(o, AppendOutcome { appended: 0, duplicates: 1, conflicts: 1 });
            assert_eq!(ob.dead_letter_count(), 1);
        }
    }

    /// (page size, WAL checkpoint threshold in pages) of the store in `dir`,
    /// as the writer's connection sets them up.
    fn pages(dir: &Path) -> (i64, i64) {
        let conn = writer::connect(&dir.join(DB_FILE), &OutboxOptions::new("lab", vec!["a".into()])).unwrap();
        let page = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        (page, conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0)).unwrap())
    }

    #[tokio::test]
    async fn a_new_store_has_8_kib_pages_and_an_older_one_keeps_its_own() {
        let tmp = tempfile::tempdir().unwrap();
        let ob = open(tmp.path(), &["a"]);
        assert_eq!(ob.append(&a11()).await.unwrap().appended, a11().len());
        ob.close().await.unwrap();
        // 1 MiB of WAL either way.
        assert_eq!(pages(tmp.path()), (8192, 128));
        let events: Vec<Event> = a11().into_iter().filter(|e| e.call.is_some()).collect();
        let tmp = tempfile::tempdir().unwrap();
        old_store(tmp.path(), Some("1"), &events);
        let ob = open(tmp.path(), &["a"]);
        assert_eq!(ob.append(&events[3..5]).await.unwrap().appended, 2);
        assert_eq!(ob.depth(), 3);
        ob.close().await.unwrap();
        assert_eq!(pages(tmp.path()), (4096, 256));
    }

    #[test]
    fn a_store_from_a_newer_build_is_refused_naming_the_file_and_both_versions() {
        let tmp = tempfile::tempdir().unwrap();
        let events: Vec<Event> = a11().into_iter().filter(|e| e.call.is_some()).collect();
        old_store(tmp.path(), Some("99"), &events);
        let err = match Outbox::open(tmp.path(), OutboxOptions::new("lab", vec!["a".into()])) {
            Ok(_) => panic!("a newer format must be refused"),
            Err(e) => e,
        };
        assert!(
            matches!(&err, OutboxError::Format { found, supported, .. } if found == "99" && *supported == FORMAT_VERSION)
        );
        let text = err.to_string();
        let file = tmp.path().join(DB_FILE);
        assert!(
            text.contains(&format!("{file:?}")) && text.contains("99") && text.contains(&FORMAT_VERSION.to_string()),
            "{text}"
        );
        // Refused, not touched.
        let conn = Connection::open(&file).unwrap();
        let v: String = conn.query_row("SELECT v FROM meta WHERE k = 'format'", [], |r| r.get(0)).unwrap();
        assert_eq!(v, "99");
    }

    #[test]
    fn sqlite_is_built_with_the_options_of_the_repository_build_settings() {
        // `.cargo/config.toml` (`LIBSQLITE3_FLAGS`): a build without them
        // is slower, not wrong, but should not pass unnoticed.
        let conn = Connection::open_in_memory().unwrap();
        let mut st = conn.prepare("SELECT compile_options FROM pragma_compile_options").unwrap();
        let options: Vec<String> = st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        for wanted in ["DEFAULT_MEMSTATUS=0", "OMIT_SHARED_CACHE", "USE_ALLOCA"] {
            assert!(options.iter().any(|o| o == wanted), "{wanted} missing from {options:?}");
        }
        for unwanted in ["ENABLE_MEMORY_MANAGEMENT", "ENABLE_API_ARMOR"] {
            assert!(!options.iter().any(|o| o == unwanted), "{unwanted} in {options:?}");
        }
    }

    #[test]
    fn store_errors_are_values_that_keep_disk_full_recognisable() {
        // A real SQLITE_FULL: a store capped at its current size.
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(b BLOB); INSERT INTO t VALUES (zeroblob(4096));").unwrap();
        let _: i64 = conn.query_row("PRAGMA max_page_count = 1", [], |r| r.get(0)).unwrap();
        let full = StoreError::from(conn.execute("INSERT INTO t VALUES (zeroblob(65536))", []).unwrap_err());
        assert!(full.is_full());
        assert_eq!(full.code(), Some(rusqlite::ErrorCode::DiskFull));
        assert!(matches!(OutboxError::from_store(full.clone()), OutboxError::DiskFull));
        let busy = StoreError::from(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        ));
        assert_eq!(busy.code(), Some(rusqlite::ErrorCode::DatabaseBusy));
        assert!(busy.to_string().contains("database is locked"));
        let e = OutboxError::from_store(busy.clone());
        assert!(matches!(&e, OutboxError::Storage(s) if *s == busy) && e.is_transient());
    }
}
