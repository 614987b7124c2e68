//! Model-based test of the outbox: random sequences of appends (fresh ids,
//! repeated ids with the same content, ids reused with other content),
//! acknowledgements (some sent twice), dead letters parked and retried,
//! restarts, and disk-full failures (a size cap that makes a group commit
//! fail while another request shares it) run against the real store in a
//! temporary directory, and after every step the store is compared with a
//! plain in-memory model of what it must hold: no accepted event lost, the
//! same pending set per sink, acknowledgements neither lost nor applied
//! twice, the same dead letters, and only the events some sink still
//! needs left in the store (the others leave it for good once delivered,
//! keeping only their ids). It runs with two sinks and with one (the writer
//! takes a shorter path when an acknowledged event cannot be pending
//! elsewhere).
//!
//! `cargo test` runs a few cases; for many more:
//!
//! ```text
//! PROPTEST_CASES=5000 cargo test --release --test outbox_model
//! ```

use callbridge::event::{AgentId, AvailabilitySource, Event, EventKind};
use callbridge::outbox::{AppendOutcome, Outbox, OutboxError, OutboxOptions};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

const PBX: &str = "lab";
const SINKS: [&str; 2] = ["a", "b"];
/// Events of the append that runs into the size cap: more than the free
/// pages a short sequence can leave behind, so it cannot fit.
const FLOOD: usize = 1500;

/// One event of an append request.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// An id never used before.
    Fresh,
    /// An id appended before (the n-th, modulo), with the same content.
    Repeat(usize),
    /// An id appended before, with other content: must be refused.
    Conflict(usize),
}

#[derive(Debug, Clone)]
enum Step {
    Append(Vec<Pick>),
    /// The first `n` events pending for a sink acknowledged; `twice`: the
    /// same acknowledgements sent again.
    Ack {
        sink: usize,
        n: usize,
        twice: bool,
    },
    /// The `nth` event pending for a sink parked as a dead letter.
    Park {
        sink: usize,
        nth: usize,
    },
    /// Dead letters of one sink (or all) requeued.
    Retry {
        sink: Option<usize>,
    },
    /// Close and open again, as after a restart.
    Reopen,
    /// Reopen with a size cap at the current size; an append too large for
    /// it fails with SQLITE_FULL while `beside` shares the group commit;
    /// then reopen without the cap.
    DiskFull {
        beside: Vec<Pick>,
    },
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![
        6 => Just(Pick::Fresh),
        3 => any::<usize>().prop_map(Pick::Repeat),
        1 => any::<usize>().prop_map(Pick::Conflict),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop::collection::vec(pick(), 1..8).prop_map(Step::Append),
        4 => (0..SINKS.len(), 1usize..6, any::<bool>()).prop_map(|(sink, n, twice)| Step::Ack { sink, n, twice }),
        2 => (0..SINKS.len(), 0usize..4).prop_map(|(sink, nth)| Step::Park { sink, nth }),
        1 => prop::option::of(0..SINKS.len()).prop_map(|sink| Step::Retry { sink }),
        1 => Just(Step::Reopen),
        1 => prop::collection::vec(pick(), 1..4).prop_map(|beside| Step::DiskFull { beside }),
    ]
}

/// The event with id number `n`; `other` changes its content, not its id.
fn event(n: i64, other: bool) -> Event {
    Event {
        seq: 0,
        time: 1_700_000_000_000_000 + n,
        kind: EventKind::AgentAvailability {
            agent: AgentId::new("m"),
            available: n % 2 == 0,
            reason: Some(if other { format!("changed {n}") } else { format!("reason {n}") }),
            source: AvailabilitySource::Pbx,
        },
        call: None,
    }
}

fn id(n: i64) -> String {
    event(n, false).id(PBX)
}

/// What the outbox must hold.
struct Model {
    /// How many of [`SINKS`] are configured.
    sinks: usize,
    /// Every id number ever accepted, in order.
    accepted: Vec<i64>,
    next: i64,
    /// Per sink: ids not yet acknowledged (nor parked).
    pending: Vec<BTreeSet<String>>,
    /// (sink, id) parked.
    dead: BTreeSet<(usize, String)>,
}

impl Model {
    fn new(sinks: usize) -> Model {
        Model { sinks, accepted: Vec::new(), next: 0, pending: vec![BTreeSet::new(); sinks], dead: BTreeSet::new() }
    }

    /// The sinks configured.
    fn sink_names(&self) -> &'static [&'static str] {
        &SINKS[..self.sinks]
    }

    /// The events of an append request and the outcome it must have.
    fn request(&mut self, picks: &[Pick]) -> (Vec<Event>, Vec<i64>, AppendOutcome) {
        let mut events = Vec::new();
        let mut fresh = Vec::new();
        let mut want = AppendOutcome::default();
        for p in picks {
            let known = self.accepted.len();
            match *p {
                Pick::Repeat(i) if known > 0 => {
                    events.push(event(self.accepted[i % known], false));
                    want.duplicates += 1;
                }
                Pick::Conflict(i) if known > 0 => {
                    events.push(event(self.accepted[i % known], true));
                    want.conflicts += 1;
                }
                _ => {
                    self.next += 1;
                    events.push(event(self.next, false));
                    fresh.push(self.next);
                    want.appended += 1;
                }
            }
        }
        (events, fresh, want)
    }

    /// An append request was stored.
    fn stored(&mut self, fresh: &[i64]) {
        for &n in fresh {
            self.accepted.push(n);
            for q in &mut self.pending {
                q.insert(id(n));
            }
        }
    }

    fn depth(&self) -> u64 {
        let all: BTreeSet<&String> = self.pending.iter().flatten().collect();
        all.len() as u64
    }

    /// The events still needed: pending for some sink, or parked.
    fn needed(&self) -> BTreeSet<String> {
        self.pending.iter().flatten().chain(self.dead.iter().map(|(_, id)| id)).cloned().collect()
    }
}

fn options(max_bytes: u64, sinks: usize) -> OutboxOptions {
    let mut opts = OutboxOptions::new(PBX, SINKS[..sinks].iter().map(|s| s.to_string()).collect());
    opts.max_bytes = max_bytes;
    opts.reserve_bytes = 64 * 1024;
    // One sink: a tail of recent events that holds only a few of them, so
    // reads fall back to the store at every turn. Two sinks: the default,
    // and only the first sink reads as a runner (see `check`), so the tail
    // keeps what the second has not read, acknowledged or not by the first.
    if sinks == 1 {
        opts.tail_bytes = 1500;
    }
    opts
}

fn open(dir: &Path, max_bytes: u64, sinks: usize) -> Outbox {
    Outbox::open(dir, options(max_bytes, sinks)).expect("the outbox opens")
}

/// The ids of the events the store holds (not those only remembered as
/// delivered), read from its file.
fn stored_ids(dir: &Path) -> BTreeSet<String> {
    let c = rusqlite::Connection::open_with_flags(
        dir.join("outbox.sqlite3"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the store read-only");
    let mut st = c.prepare("SELECT id FROM events").expect("prepare");
    let ids = st.query_map([], |r| r.get::<_, String>(0)).expect("query");
    ids.collect::<Result<_, _>>().expect("ids")
}

/// The store holds exactly what the model says.
async fn check(dir: &Path, ob: &Outbox, m: &Model) -> Result<(), TestCaseError> {
    for (s, name) in m.sink_names().iter().enumerate() {
        let recs = ob.pending(name, 0, 1_000_000).await.expect("pending");
        let ids: BTreeSet<String> = recs.iter().map(|r| r.id.to_string()).collect();
        prop_assert_eq!(ids.len(), recs.len(), "an event twice in sink {}'s queue", name);
        prop_assert_eq!(&ids, &m.pending[s], "pending events of sink {}", name);
        prop_assert!(recs.windows(2).all(|w| w[0].pos < w[1].pos), "queue out of order");
        // As a sink's runner reads: a few at a time after its cursor.
        if s > 0 {
            continue;
        }
        let (mut walked, mut after) = (Vec::new(), 0);
        loop {
            let next = ob.pending(name, after, 3).await.expect("pending");
            let Some(last) = next.last() else { break };
            after = last.pos;
            walked.extend(next);
        }
        prop_assert_eq!(&walked, &recs, "sink {}'s queue read a few at a time", name);
        for r in &recs {
            let n = r.id.rsplit(':').next().and_then(|t| t.parse::<i64>().ok()).map(|t| t - 1_700_000_000_000_000);
            let body = n.map(|n| event(n, false).to_cloudevent_json(PBX));
            prop_assert_eq!(Some(&*r.body), body.as_deref(), "content of {}", r.id);
        }
    }
    let dead: BTreeSet<(usize, String)> = ob
        .dead_letters()
        .await
        .expect("dead letters")
        .into_iter()
        .map(|d| (SINKS.iter().position(|s| *s == d.sink).unwrap_or(usize::MAX), d.event_id))
        .collect();
    prop_assert_eq!(&dead, &m.dead, "dead letters");
    prop_assert_eq!(ob.depth(), m.depth(), "depth");
    prop_assert_eq!(ob.dead_letter_count(), m.dead.len() as u64, "dead letter count");
    for &n in &m.accepted {
        prop_assert!(ob.contains(&id(n)).await.expect("contains"), "accepted event {} lost", n);
    }
    ob.flush().await.expect("flush");
    prop_assert_eq!(stored_ids(dir), m.needed(), "events kept in the store");
    Ok(())
}

async fn append(ob: &Outbox, m: &mut Model, picks: &[Pick]) -> Result<(), TestCaseError> {
    let (events, fresh, want) = m.request(picks);
    let got = ob.append(&events).await;
    prop_assert_eq!(got.ok(), Some(want));
    m.stored(&fresh);
    Ok(())
}

async fn ack(ob: &Outbox, m: &mut Model, sink: usize, n: usize, twice: bool) -> Result<(), TestCaseError> {
    let sink = sink % m.sinks;
    let name: Arc<str> = Arc::from(SINKS[sink]);
    let recs = ob.pending(SINKS[sink], 0, n).await.expect("pending");
    let acks: Vec<(i64, i64)> = recs.iter().map(|r| (r.pos, r.seq)).collect();
    ob.ack(&name, acks.clone()).await.expect("ack");
    if twice {
        ob.flush().await.expect("flush");
        ob.ack(&name, acks).await.expect("ack again");
    }
    ob.flush().await.expect("flush");
    for r in recs {
        prop_assert!(m.pending[sink].remove(&*r.id), "{} was not pending", r.id);
    }
    Ok(())
}

async fn park(ob: &Outbox, m: &mut Model, sink: usize, nth: usize) -> Result<(), TestCaseError> {
    let sink = sink % m.sinks;
    let name: Arc<str> = Arc::from(SINKS[sink]);
    let recs = ob.pending(SINKS[sink], 0, nth + 1).await.expect("pending");
    if let Some(r) = recs.get(nth) {
        ob.park(&name, r, Some(400), "HTTP 400: refused".into()).await.expect("park");
        ob.flush().await.expect("flush");
        prop_assert!(m.pending[sink].remove(&*r.id));
        m.dead.insert((sink, r.id.to_string()));
    }
    Ok(())
}

async fn retry(ob: &Outbox, m: &mut Model, sink: Option<usize>) -> Result<(), TestCaseError> {
    let sink = sink.map(|s| s % m.sinks);
    let n = ob.retry_dead_letters(sink.map(|s| SINKS[s]), None).await.expect("retry");
    let moved: Vec<(usize, String)> = m.dead.iter().filter(|(s, _)| sink.is_none_or(|x| x == *s)).cloned().collect();
    prop_assert_eq!(n, moved.len());
    for (s, id) in moved {
        m.dead.remove(&(s, id.clone()));
        m.pending[s].insert(id);
    }
    Ok(())
}

/// A request that may fail with DiskFull: all of it stored, or none.
fn all_or_nothing(
    m: &mut Model,
    got: Result<AppendOutcome, OutboxError>,
    fresh: &[i64],
    want: AppendOutcome,
) -> Result<bool, TestCaseError> {
    match got {
        Ok(o) => {
            prop_assert_eq!(o, want);
            m.stored(fresh);
            Ok(true)
        }
        Err(OutboxError::DiskFull) => Ok(false),
        Err(e) => Err(TestCaseError::fail(format!("unexpected error: {e}"))),
    }
}

async fn disk_full(dir: &Path, ob: Outbox, m: &mut Model, beside: &[Pick]) -> Result<Outbox, TestCaseError> {
    ob.close().await.expect("close");
    // A cap below the current size is raised to it by SQLite: no room left
    // but the free pages.
    let ob = open(dir, 1, m.sinks);
    let flood: Vec<Pick> = vec![Pick::Fresh; FLOOD];
    let (big, big_fresh, big_want) = m.request(&flood);
    let (small, small_fresh, small_want) = m.request(beside);
    let (got_big, got_small) = tokio::join!(ob.append(&big), ob.append(&small));
    let big_stored = all_or_nothing(m, got_big, &big_fresh, big_want)?;
    all_or_nothing(m, got_small, &small_fresh, small_want)?;
    prop_assert!(!big_stored, "{} events fit under the cap", FLOOD);
    prop_assert!(!ob.is_writable(), "full, yet writable");
    check(dir, &ob, m).await?;
    ob.close().await.expect("close");
    Ok(open(dir, 0, m.sinks))
}

async fn run(steps: Vec<Step>, sinks: usize) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut ob = open(dir, 0, sinks);
    let mut m = Model::new(sinks);
    for step in steps {
        match step {
            Step::Append(picks) => append(&ob, &mut m, &picks).await?,
            Step::Ack { sink, n, twice } => ack(&ob, &mut m, sink, n, twice).await?,
            Step::Park { sink, nth } => park(&ob, &mut m, sink, nth).await?,
            Step::Retry { sink } => retry(&ob, &mut m, sink).await?,
            Step::Reopen => {
                ob.close().await.expect("close");
                ob = open(dir, 0, sinks);
            }
            Step::DiskFull { beside } => ob = disk_full(dir, ob, &mut m, &beside).await?,
        }
        check(dir, &ob, &m).await?;
    }
    ob.close().await.expect("close");
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_outbox_behaves_like_its_model(steps in prop::collection::vec(step(), 1..30)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run(steps, 2))?;
    }

    #[test]
    fn the_outbox_with_one_sink_behaves_like_its_model(steps in prop::collection::vec(step(), 1..30)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run(steps, 1))?;
    }
}
