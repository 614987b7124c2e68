//! Opening the outbox on a full disk (issue 18, item 3), on a real
//! size-capped filesystem (a tmpfs; skipped with a message where `mount`
//! is not permitted): a store at the current format opens without writing
//! and starts full (not writable, ballast released), delivers, and takes
//! events again once space returns; a format upgrade is written into the
//! ballast's room; with no room at all, the error says so, and the daemon's
//! open waits for room instead of exiting.
//!
//! `tests/delivery_diskfull.rs` runs the same through the `callbridge run`
//! binary (a crash while the outbox filled the disk, a clean stop while
//! full).

mod delivery_common;

use callbridge::outbox::{Outbox, OutboxError, OutboxOptions, DB_FILE, FORMAT_VERSION};
use callbridge::sink::webhook::{WebhookSettings, WebhookSink};
use callbridge::sink::{RunnerOptions, Runners};
use delivery_common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A tmpfs of `size` mounted for the test, unmounted when dropped.
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs { _dir: dir, path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a store left open on purpose (closed while the disk was
        // full) keeps its files open until the process exits.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn skipped(what: &str) {
    eprintln!("{what}: SKIPPED (mount -t tmpfs not permitted here; run as root to test it)");
}

/// Writes `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

fn opts() -> OutboxOptions {
    OutboxOptions::new("lab", vec!["webhook".into()])
}

/// A store holding `events` undelivered, closed cleanly (its `-wal` and
/// `-shm` files are gone: opening must create them again).
async fn stored(dir: &Path, events: &[callbridge::event::Event]) {
    let ob = Outbox::open(dir, opts()).unwrap();
    assert_eq!(ob.append(events).await.unwrap().appended, events.len());
    ob.close().await.unwrap();
    assert!(!dir.join(format!("{DB_FILE}-shm")).exists(), "closed cleanly");
}

fn runners(ob: &Outbox, rx: &Receiver) -> Runners {
    let settings = WebhookSettings {
        url: rx.url(),
        batch_size: 50,
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        max_backoff: Duration::from_millis(200),
        concurrency: 8,
    };
    let mut d = Runners::new(ob, RunnerOptions::default());
    d.spawn(Arc::new(WebhookSink::new("webhook", settings, SECRET).unwrap()));
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_on_a_full_disk_opens_delivers_and_recovers() {
    let Some(fs) = Tmpfs::mount("8m") else { return skipped("open on a full disk") };
    let dir = fs.path.join("outbox");
    let events = many_events(20);
    stored(&dir, &events).await;
    assert!(dir.join("reserve").exists());
    fill(&fs.path.join("filler"));

    let ob = Outbox::open(&dir, opts()).expect("opens on a full disk");
    assert!(!ob.is_writable(), "full at start: not writable");
    assert!(!dir.join("reserve").exists(), "the ballast is released");
    assert_eq!(ob.depth(), events.len() as u64);
    assert!(matches!(ob.append(&many_events(21)[events.len()..][..5]).await, Err(OutboxError::DiskFull)));

    // Delivering needs no more room than the ballast's.
    let rx = Receiver::start().await;
    let d = runners(&ob, &rx);
    assert!(ob.wait_drained(Duration::from_secs(20)).await, "depth {}", ob.depth());
    let want: std::collections::HashSet<String> = events.iter().map(|e| e.id("lab")).collect();
    assert_eq!(rx.accepted_ids(), want);

    // Space returns: writable again, new events go through.
    std::fs::remove_file(fs.path.join("filler")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !ob.is_writable() {
        assert!(std::time::Instant::now() < deadline, "never writable again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dir.join("reserve").exists(), "the ballast is back");
    let more = &many_events(21)[events.len()..];
    assert_eq!(ob.append(more).await.unwrap().appended, more.len());
    assert!(ob.wait_drained(Duration::from_secs(10)).await);
    d.shutdown().await.unwrap();
    ob.close().await.unwrap();
}

/// Turns a current store back into format 2 (before `live_calls`).
fn downgrade(dir: &Path) {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    conn.execute_batch("DROP TABLE live_calls; UPDATE meta SET v = '2' WHERE k = 'format';").unwrap();
}

fn format_of(dir: &Path) -> String {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    conn.query_row("SELECT v FROM meta WHERE k = 'format'", [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_upgrade_on_a_full_disk_uses_the_ballast_or_says_there_is_no_room() {
    let Some(fs) = Tmpfs::mount("8m") else { return skipped("format upgrade on a full disk") };
    let events = many_events(5);

    // With the ballast: upgraded in its room; the store starts full.
    let dir = fs.path.join("with-ballast");
    stored(&dir, &events).await;
    downgrade(&dir);
    fill(&fs.path.join("filler"));
    let ob = Outbox::open(&dir, opts()).expect("the upgrade fits in the ballast's room");
    assert!(!ob.is_writable());
    assert_eq!(ob.depth(), events.len() as u64);
    assert!(ob.live_calls().await.unwrap().is_empty());
    ob.close().await.unwrap();
    assert_eq!(format_of(&dir), FORMAT_VERSION.to_string());
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(fs.path.join("filler")).unwrap();

    // Without any room: a clear error, the store untouched.
    let dir = fs.path.join("no-room");
    stored(&dir, &events).await;
    downgrade(&dir);
    std::fs::remove_file(dir.join("reserve")).unwrap();
    fill(&fs.path.join("filler"));
    let err = match Outbox::open(&dir, opts()) {
        Ok(_) => panic!("a format upgrade cannot be written on a full disk"),
        Err(e) => e,
    };
    assert!(matches!(err, OutboxError::NoRoom { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("no room") && text.contains(DB_FILE), "{text}");
    std::fs::remove_file(fs.path.join("filler")).unwrap();
    assert_eq!(format_of(&dir), "2", "refused, not touched");

    // The daemon's open waits for room, then goes on.
    fill(&fs.path.join("filler"));
    let config_text = lab_config_text(&format!(
        "[[sinks]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/hooks\"\nsecret = \"{SECRET}\"\n\n[outbox]\npath = \"{}\"\n",
        dir.display()
    ));
    let config = callbridge::config::Config::parse(&config_text, "test").unwrap();
    let opening = tokio::spawn(async move {
        let readiness = Arc::new(callbridge::state::Readiness::default());
        callbridge::delivery::Delivery::for_daemon(&config, readiness, &Default::default()).await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!opening.is_finished(), "waits while there is no room");
    std::fs::remove_file(fs.path.join("filler")).unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(15), opening).await.expect("opens once there is room");
    let delivery = delivery.unwrap().expect("opened");
    assert_eq!(delivery.outbox().map(Outbox::depth), Some(events.len() as u64));
    delivery.close(Duration::ZERO).await.unwrap();
    assert_eq!(format_of(&dir), FORMAT_VERSION.to_string());
}
