//! Hot standby: two instances beside one PBX, one of which delivers.
//!
//! Both instances connect to the PBX, normalize every frame and store every
//! event in their own outbox, so the standby is warm: it knows every live
//! call and holds every event. Only the holder of a **lease**, one key of a
//! NATS key-value bucket, delivers to the sinks and sends control actions;
//! the other answers reads and refuses control (`503 not_leader`).
//!
//! # The lease
//!
//! The bucket keeps one revision per key and drops a value `lease_seconds`
//! after it was written (the stream's maximum age). The leader renews its
//! value every third of that with *update at revision* (compare-and-set).
//! A standby reads the key every twelfth of the lease (a quarter of a
//! second to a second) and *creates* it once it is gone; create fails while any value is there, so there is one holder at a
//! time.
//!
//! # Never two deliverers
//!
//! The leader stops delivering (closes the sink runners' gate, abandoning
//! requests in flight) at once when a renewal fails, when a renewal takes
//! longer than a third of the lease, and when its NATS connection drops.
//! Its last renewal was written after it was sent, so the value outlives
//! that send by a whole lease, while the leader stops at most two thirds of
//! a lease after it: the old leader has stopped before the key can expire
//! and a standby can create it. Clocks only have to run at the same rate.
//!
//! # Handing over without loss or duplicates
//!
//! Each renewal carries `delivered_before`: when the oldest event the
//! leader's sinks have not all acknowledged was stored (or the renewal's
//! time when nothing waits). The standby marks everything it stored before
//! that time, less `overlap_seconds`, as delivered, so its outbox holds
//! only what the leader may not have delivered yet. On taking over it
//! delivers exactly that: every event the old leader had not delivered,
//! and again the few it did in the overlap. Event ids are deterministic, so
//! the NATS stream's duplicate window (and any receiver de-duplicating by
//! id) drops those. A publish in flight when the leader was cut off may
//! still reach the stream when the network heals: it carries the same id
//! as the new leader's, and the duplicate window drops it too.
//!
//! The overlap covers the two machines' clock difference (both use their
//! own clock for "stored at") and events stored in a slightly different
//! order; keep the clocks within it (NTP).
//!
//! Without NATS nobody holds the lease: both instances keep storing and
//! nothing is delivered until one of them gets it again. A leader that
//! shuts down cleanly stops delivering, then deletes its lease, so the
//! standby takes over at its next look instead of after a lease.

use crate::config::HaConfig;
use crate::outbox::Outbox;
use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How often a standby looks at the lease: a twelfth of the lease, from a
/// quarter of a second to a second (the takeover comes at most this long
/// after the lease expired; 10,000 standbys read 10,000 times a second at
/// most).
pub fn poll_interval(lease: Duration) -> Duration {
    (lease / 12).clamp(Duration::from_millis(250), Duration::from_secs(1))
}

/// The value of the lease key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder's `[ha] node`.
    pub node: String,
    /// Which run of that node (random at each start): a restarted instance
    /// waits for its previous run's lease to expire like anyone else.
    pub instance: String,
    /// The holder's API, as `[ha] advertise` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// When the holder took the lease (RFC 3339).
    pub since: String,
    /// Everything the holder stored before this (µs since the epoch, its
    /// clock) was delivered to every sink.
    #[serde(default)]
    pub delivered_before: Option<i64>,
}

/// What this instance is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// No `[ha]`: alone, always delivers.
    Single,
    /// Holds the lease: delivers and controls.
    Leader { since: String },
    /// Does not hold the lease; `leader`: the holder as last read, if any.
    Standby { leader: Option<Lease> },
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Leader { .. } => "leader",
            Role::Standby { .. } => "standby",
        }
    }
}

/// This instance's role, for the API and the sink runners.
#[derive(Debug)]
pub struct Leadership {
    node: Option<String>,
    role: watch::Sender<Role>,
    /// Open: the sink runners deliver.
    gate: watch::Sender<bool>,
}

impl Leadership {
    /// Alone: always the one delivering.
    pub fn single() -> Leadership {
        metrics::gauge!("callbridge_ha_leader").set(1.0);
        Leadership { node: None, role: watch::channel(Role::Single).0, gate: watch::channel(true).0 }
    }

    /// One of a pair: a standby until it holds the lease.
    pub fn paired(node: &str) -> Leadership {
        metrics::gauge!("callbridge_ha_leader").set(0.0);
        Leadership {
            node: Some(node.to_string()),
            role: watch::channel(Role::Standby { leader: None }).0,
            gate: watch::channel(false).0,
        }
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Whether this instance delivers and controls (the leader, or alone).
    pub fn leads(&self) -> bool {
        *self.gate.borrow()
    }

    /// `[ha] node`, when paired.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Follows whether the sink runners may deliver.
    pub fn gate(&self) -> watch::Receiver<bool> {
        self.gate.subscribe()
    }

    /// Starts delivering (the gate opens after the role is set: the API
    /// never refuses control while the sinks already run).
    fn lead(&self, since: String) {
        self.role.send_replace(Role::Leader { since });
        self.gate.send_replace(true);
        metrics::gauge!("callbridge_ha_leader").set(1.0);
        metrics::counter!("callbridge_ha_transitions_total", "role" => "leader").increment(1);
    }

    /// Stops delivering at once (the gate closes first), then records who
    /// leads.
    fn follow(&self, leader: Option<Lease>) {
        let was_leading = self.gate.send_replace(false);
        metrics::gauge!("callbridge_ha_leader").set(0.0);
        if was_leading {
            metrics::counter!("callbridge_ha_transitions_total", "role" => "standby").increment(1);
        }
        self.role.send_if_modified(|r| {
            let next = Role::Standby { leader: leader.clone() };
            let changed = *r != next;
            *r = next;
            changed
        });
    }
}

/// Why a session with the lease's NATS servers ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot prepare the connection: {0}")]
    Options(String),
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("lease bucket {bucket:?}: {detail}")]
    Bucket { bucket: String, detail: String },
}

/// What the controller needs to know.
#[derive(Debug, Clone)]
pub struct HaSettings {
    pub config: HaConfig,
    /// The lease's key (default: the PBX name).
    pub key: String,
    pub node: String,
    pub pbx: String,
}

impl HaSettings {
    fn lease(&self) -> Duration {
        Duration::from_secs(self.config.lease_seconds.max(3))
    }

    fn third(&self) -> Duration {
        self.lease() / 3
    }

    fn overlap_micros(&self) -> i64 {
        i64::try_from(self.config.overlap_seconds).unwrap_or(i64::MAX / 2_000_000).saturating_mul(1_000_000)
    }
}

/// Holds or follows the lease until `shutdown`; `leadership` says which.
pub async fn run(settings: HaSettings, leadership: Arc<Leadership>, outbox: Outbox, shutdown: CancellationToken) {
    let mut state = State {
        settings: &settings,
        leadership,
        outbox: &outbox,
        instance: format!("{:016x}", rand::random::<u64>()),
        held: None,
        since: String::new(),
        renewed_at: Instant::now(),
        seen_delivered_before: None,
        settled_before: None,
        last_warning: None,
    };
    info!(node = %settings.node, bucket = %settings.config.bucket, key = %settings.key,
          lease_seconds = settings.lease().as_secs(), "hot standby: following the lease");
    let mut failures = 0u32;
    loop {
        match state.session(&shutdown).await {
            Ok(()) => return,
            Err(e) => {
                state.step_down("the lease's NATS servers cannot be reached");
                if failures % 20 == 0 {
                    error!(error = %e, "hot standby: cannot reach the lease; not delivering, retrying");
                }
                failures = failures.saturating_add(1);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(settings.third().min(Duration::from_secs(1))) => {}
        }
    }
}

struct State<'a> {
    settings: &'a HaSettings,
    leadership: Arc<Leadership>,
    outbox: &'a Outbox,
    instance: String,
    /// Our lease's revision while we hold it.
    held: Option<u64>,
    since: String,
    /// When the last successful renewal (or the creation) was sent.
    renewed_at: Instant,
    /// The leader's `delivered_before` as last read, and up to where this
    /// outbox was settled.
    seen_delivered_before: Option<i64>,
    settled_before: Option<i64>,
    /// When something about the lease was last logged as a warning (at
    /// most every 10 s).
    last_warning: Option<Instant>,
}

impl State<'_> {
    /// One connection to the lease's servers: until shutdown (`Ok`) or a
    /// failure to connect or to open the bucket.
    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), SessionError> {
        let s = self.settings;
        let (events_tx, mut events) = mpsc::channel::<async_nats::Event>(16);
        let name = format!("callbridge {} ha {}", s.pbx, s.node);
        let options = crate::sink::nats::connect_options(&s.config.connection, &s.config.secret, &name)
            .map_err(SessionError::Options)?
            .event_callback({
                let leadership = self.leadership.clone();
                move |event| {
                    // A dropped connection closes the gate here, at once;
                    // the session records the step-down when it sees it.
                    if matches!(event, async_nats::Event::Disconnected) {
                        leadership.follow(None);
                    }
                    let tx = events_tx.clone();
                    async move {
                        let _ = tx.try_send(event);
                    }
                }
            });
        let servers = crate::sink::nats::server_addrs(&s.config.connection.url).map_err(SessionError::Options)?;
        let client = options.connect(servers.as_slice()).await.map_err(|e| SessionError::Connect(e.to_string()))?;
        let js = async_nats::jetstream::context::ContextBuilder::new().timeout(s.third()).build(client);
        let bucket = open_bucket(&js, s).await?;
        let mut tick = tokio::time::interval(poll_interval(s.lease()));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.release(&bucket).await;
                    return Ok(());
                }
                Some(event) = events.recv() => match event {
                    async_nats::Event::Disconnected => self.step_down("the connection to NATS dropped"),
                    async_nats::Event::Connected => info!("hot standby: connected to NATS"),
                    _ => {}
                },
                _ = tick.tick() => match self.held {
                    Some(revision) => self.renew(&bucket, revision).await,
                    None => self.poll(&bucket).await,
                },
            }
        }
    }

    /// The leader: renews every third of the lease. A failure, or no
    /// renewal within two thirds of a lease of the last one sent, stops
    /// delivering at once (the value written by that one outlives it by a
    /// third of a lease at least).
    async fn renew(&mut self, bucket: &kv::Store, revision: u64) {
        let third = self.settings.third();
        if self.renewed_at.elapsed() < third {
            return;
        }
        let deadline = tokio::time::Instant::from_std(self.renewed_at + third * 2);
        let attempt = async {
            let value = self.value(true).await;
            let sent = Instant::now();
            (sent, bucket.update(&self.settings.key, value, revision).await)
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok((sent, Ok(next))) => {
                self.held = Some(next);
                self.renewed_at = sent;
                // The gate closed on a dropped connection that came back
                // before the lease expired: still ours, deliver again.
                if !self.leadership.leads() {
                    self.leadership.lead(self.since.clone());
                    info!(node = %self.settings.node, "hot standby: kept the lease; delivering again");
                }
            }
            Ok((_, Err(e))) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.step_down("another instance holds the lease")
            }
            Ok((_, Err(e))) => self.step_down(&format!("the lease could not be renewed: {e}")),
            Err(_) => self.step_down("the lease was not renewed in time"),
        }
    }

    /// A standby: reads the lease; settles what the leader delivered;
    /// creates the lease once it is gone.
    async fn poll(&mut self, bucket: &kv::Store) {
        let key = self.settings.key.clone();
        let entry = match tokio::time::timeout(self.settings.third(), bucket.entry(key.clone())).await {
            Ok(Ok(entry)) => entry.filter(|e| e.operation == kv::Operation::Put),
            Ok(Err(e)) => return self.warn(&format!("cannot read the lease: {e}")),
            Err(_) => return self.warn("reading the lease timed out"),
        };
        if let Some(entry) = entry {
            match serde_json::from_slice::<Lease>(&entry.value) {
                // Still ours (the connection dropped and came back before
                // it expired): nobody else can hold it while it exists.
                Ok(lease) if lease.instance == self.instance => self.take_back(bucket, entry.revision).await,
                Ok(lease) => {
                    self.seen_delivered_before = lease.delivered_before.or(self.seen_delivered_before);
                    self.leadership.follow(Some(lease));
                    self.settle().await;
                }
                Err(e) => {
                    self.warn(&format!("the lease holds something else than a lease ({e}); waiting for it to expire"))
                }
            }
            return;
        }
        // Nobody holds it: take it. What the old leader delivered is
        // settled first, so the sinks start from what it may not have.
        self.settle().await;
        let sent = Instant::now();
        let since = jiff::Timestamp::now().to_string();
        self.since = since.clone();
        let value = self.value(false).await;
        match tokio::time::timeout(self.settings.third(), bucket.create(&key, value)).await {
            Ok(Ok(revision)) => {
                self.held = Some(revision);
                self.renewed_at = sent;
                let previous = match self.leadership.role() {
                    Role::Standby { leader: Some(l) } => l.node,
                    _ => "nobody".to_string(),
                };
                self.leadership.lead(since);
                info!(node = %self.settings.node, previous = %previous, "hot standby: took over the lease; delivering");
            }
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Ok(Err(e)) => self.warn(&format!("cannot take the lease: {e}")),
            Err(_) => self.warn("taking the lease timed out"),
        }
    }

    /// Renews our own lease found after a step-down, and delivers again.
    async fn take_back(&mut self, bucket: &kv::Store, revision: u64) {
        let sent = Instant::now();
        let value = self.value(true).await;
        match tokio::time::timeout(self.settings.third(), bucket.update(&self.settings.key, value, revision)).await {
            Ok(Ok(next)) => {
                self.held = Some(next);
                self.renewed_at = sent;
                self.leadership.lead(self.since.clone());
                info!(node = %self.settings.node, "hot standby: kept the lease; delivering again");
            }
            Ok(Err(e)) => self.warn(&format!("cannot renew the lease: {e}")),
            Err(_) => self.warn("renewing the lease timed out"),
        }
    }

    /// Marks delivered what the leader reported delivered (less the
    /// overlap), once per new report.
    async fn settle(&mut self) {
        let Some(before) = self.seen_delivered_before.map(|t| t.saturating_sub(self.settings.overlap_micros())) else {
            return;
        };
        if self.settled_before.is_some_and(|s| s >= before) {
            return;
        }
        match self.outbox.settle_before(before).await {
            Ok(n) => {
                self.settled_before = Some(before);
                metrics::counter!("callbridge_ha_settled_total").increment(n as u64);
            }
            Err(e) => self.warn(&format!("cannot mark the leader's deliveries in the outbox: {e}")),
        }
    }

    /// The lease's value now; `delivered`: with this outbox's progress.
    async fn value(&self, delivered: bool) -> bytes::Bytes {
        let delivered_before = if delivered {
            match self.outbox.oldest_undelivered_at().await {
                Ok(Some(t)) => Some(t),
                Ok(None) => Some(crate::outbox::now_micros()),
                // Unknown: the standby keeps what it has.
                Err(_) => None,
            }
        } else {
            None
        };
        let lease = Lease {
            node: self.settings.node.clone(),
            instance: self.instance.clone(),
            advertise: self.settings.config.advertise.clone(),
            since: self.since.clone(),
            delivered_before,
        };
        bytes::Bytes::from(serde_json::to_vec(&lease).unwrap_or_default())
    }

    /// Stops delivering at once (if leading) and forgets the lease.
    fn step_down(&mut self, why: &str) {
        if self.held.take().is_some() {
            self.leadership.follow(None);
            warn!(node = %self.settings.node, reason = why, "hot standby: stopped delivering");
        } else {
            self.leadership.follow(match self.leadership.role() {
                Role::Standby { leader } => leader,
                _ => None,
            });
        }
    }

    /// At shutdown: stops delivering, then deletes the lease (only if it
    /// is still ours) so the standby takes over at its next look.
    async fn release(&mut self, bucket: &kv::Store) {
        let Some(revision) = self.held.take() else { return };
        self.leadership.follow(None);
        let delete = bucket.delete_expect_revision(&self.settings.key, Some(revision));
        match tokio::time::timeout(Duration::from_secs(1), delete).await {
            Ok(Ok(())) => info!(node = %self.settings.node, "hot standby: stopped delivering and released the lease"),
            _ => warn!(node = %self.settings.node, "hot standby: stopped delivering; the lease expires on its own"),
        }
    }

    fn warn(&mut self, what: &str) {
        if self.last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            self.last_warning = Some(Instant::now());
            warn!(node = %self.settings.node, "hot standby: {what}");
        }
    }
}

/// The lease bucket: opened, or created (maximum age = the lease). An
/// existing bucket with another maximum age is refused: the two instances
/// of a pair must agree on the lease.
async fn open_bucket(js: &async_nats::jetstream::Context, s: &HaSettings) -> Result<kv::Store, SessionError> {
    let bucket = s.config.bucket.clone();
    let err = |detail: String| SessionError::Bucket { bucket: bucket.clone(), detail };
    let store = match js.get_key_value(&bucket).await {
        Ok(store) => store,
        Err(_) => {
            // The bucket's stream as the client library would make it,
            // created directly: its own creation path asks for account
            // details older servers (2.9) answer in a form it cannot read.
            js.create_stream(async_nats::jetstream::stream::Config {
                name: format!("KV_{bucket}"),
                description: Some("callbridge hot-standby leases".to_string()),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: s.lease(),
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: s.config.replicas.max(1),
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: async_nats::jetstream::stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| err(format!("cannot create it: {e}")))?;
            js.get_key_value(&bucket).await.map_err(|e| err(format!("cannot open it: {e}")))?
        }
    };
    let max_age = store.status().await.map_err(|e| err(e.to_string()))?.max_age();
    if max_age != s.lease() {
        return Err(err(format!(
            "its values expire after {} s, but lease_seconds is {}: both instances of a pair need the same lease",
            max_age.as_secs_f64(),
            s.lease().as_secs()
        )));
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_looks_more_often_with_a_shorter_lease_within_bounds() {
        assert_eq!(poll_interval(Duration::from_secs(3)), Duration::from_millis(250));
        assert_eq!(poll_interval(Duration::from_secs(6)), Duration::from_millis(500));
        assert_eq!(poll_interval(Duration::from_secs(10)).as_millis(), 833);
        assert_eq!(poll_interval(Duration::from_secs(60)), Duration::from_secs(1));
    }

    #[test]
    fn ha_settings_are_checked_with_the_field_named() {
        let parse = |rest: &str| crate::config::Config::parse(&format!("[pbx]\nname = \"lab\"\n{rest}"), "t");
        let webhook = "[[sinks]]\ntype = \"webhook\"\nurl = \"https://h.example/cti\"\nsecret = \"s\"\n";
        let c = parse(&format!("{webhook}[ha]\nurl = \"nats://127.0.0.1:4222\"\nnode = \"cb-a\"\n")).unwrap();
        let ha = c.ha.as_ref().unwrap();
        assert_eq!((ha.key(&c), ha.bucket.as_str(), ha.lease_seconds), ("lab", "callbridge_leader", 10));
        assert_eq!((ha.node_name(), ha.overlap_seconds), ("cb-a".to_string(), 30));
        let e = parse("[ha]\nurl = \"nats://127.0.0.1:4222\"\n").unwrap_err().to_string();
        assert!(e.contains("ha: a hot standby") && e.contains("sink other than"), "{e}");
        let e = parse(&format!("{webhook}[ha]\nurl = \"nats://x:4222\"\nlease_seconds = 1\n")).unwrap_err().to_string();
        assert!(e.contains("ha.lease_seconds"), "{e}");
        let e = parse(&format!("{webhook}[ha]\nurl = \"nats://x:4222\"\nbucket = \"a.b\"\n")).unwrap_err().to_string();
        assert!(e.contains("ha.bucket"), "{e}");
        let e = parse(&format!("{webhook}[ha]\nurl = \"nats://x:4222\"\nleas_seconds = 5\n")).unwrap_err().to_string();
        assert!(e.contains("ha.leas_seconds") && e.contains("lease_seconds"), "{e}");
        let e = parse(&format!("{webhook}[ha]\nurl = \"nats://x:4222\"\nuser = \"u\"\n")).unwrap_err().to_string();
        assert!(e.contains("ha"), "{e}");
    }

    #[test]
    fn a_lease_round_trips_and_reads_without_optional_fields() {
        let lease = Lease {
            node: "cb-a".into(),
            instance: "00ff".into(),
            advertise: Some("https://cb-a:8080".into()),
            since: "2026-11-30T21:00:00Z".into(),
            delivered_before: Some(1_795_000_000_000_000),
        };
        let json = serde_json::to_string(&lease).unwrap();
        assert_eq!(serde_json::from_str::<Lease>(&json).unwrap(), lease);
        let bare: Lease = serde_json::from_str(r#"{"node":"b","instance":"1","since":"x"}"#).unwrap();
        assert_eq!((bare.advertise, bare.delivered_before), (None, None));
    }

    #[test]
    fn the_gate_closes_before_the_role_says_standby_and_opens_after_it_says_leader() {
        let l = Leadership::paired("cb-a");
        assert_eq!(l.role(), Role::Standby { leader: None });
        assert!(!l.leads());
        let gate = l.gate();
        l.lead("2026-11-30T21:00:00Z".into());
        assert!(l.leads() && *gate.borrow());
        assert_eq!(l.role().name(), "leader");
        l.follow(None);
        assert!(!l.leads() && !*gate.borrow());
        assert_eq!(l.role().name(), "standby");
        let single = Leadership::single();
        assert!(single.leads());
        assert_eq!(single.role(), Role::Single);
    }
}
