//! Disk full: the outbox reports it loudly (error log, write-error counter,
//! `callbridge_outbox_disk_full`, `is_writable() == false`), refuses new
//! events without touching what it accepted, delivers everything it accepted
//! and accepts again once delivery freed the space.
//!
//! Two paths: a store capped by `max_bytes` (SQLite's `max_page_count`,
//! which fails exactly like a full disk; always runs) and a real 8 MiB tmpfs
//! (runs when `mount -t tmpfs` is permitted, e.g. as root in CI; otherwise
//! the test says it skipped that path).

mod delivery_common;

use callbridge::outbox::{Outbox, OutboxError, OutboxOptions};
use callbridge::sink::webhook::{WebhookSettings, WebhookSink};
use callbridge::sink::{RunnerOptions, Runners};
use delivery_common::*;
use metrics_util::debugging::DebuggingRecorder;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Fills the outbox until it refuses, delivers, and checks nothing accepted
/// was lost and that it accepts again afterwards.
async fn fill_deliver_recover(
    dir: &Path,
    opts: OutboxOptions,
    strict: bool,
    snap: &metrics_util::debugging::Snapshotter,
) {
    let outbox = Outbox::open(dir, opts).unwrap();
    let events = many_events(400);
    let mut accepted: HashSet<String> = HashSet::new();
    let mut refused_at = None;
    for (i, chunk) in events.chunks(50).enumerate() {
        match outbox.append(chunk).await {
            Ok(o) => {
                assert_eq!(o.appended, chunk.len());
                accepted.extend(chunk.iter().map(|e| e.id("lab")));
            }
            Err(OutboxError::DiskFull) => {
                refused_at = Some(i);
                break;
            }
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    let refused_at = refused_at.expect("the store filled up");
    assert!(accepted.len() >= 100, "accepted {} before full", accepted.len());
    assert!(!outbox.is_writable(), "readiness must be false while full");
    let m = Metrics::take(snap);
    assert_eq!(m.gauge("callbridge_outbox_disk_full"), Some(1.0));
    assert!(m.counter("callbridge_outbox_write_errors_total") >= 1);
    // Still refused right after (with a size cap; a real filesystem may
    // already have recovered the space a failed commit took), and nothing
    // accepted is touched.
    let one = &events[refused_at * 50..refused_at * 50 + 1];
    match outbox.append(one).await {
        Err(OutboxError::DiskFull) => {}
        Ok(_) if !strict => {
            accepted.insert(one[0].id("lab"));
        }
        other => panic!("expected DiskFull, got {other:?}"),
    }
    assert_eq!(outbox.depth(), accepted.len() as u64);

    // The helpdesk takes everything that was accepted.
    let rx = Receiver::start().await;
    let settings = WebhookSettings {
        url: rx.url(),
        batch_size: 20,
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        max_backoff: Duration::from_millis(200),
        concurrency: 8,
    };
    let mut d = Runners::new(&outbox, RunnerOptions::default());
    d.spawn(Arc::new(WebhookSink::new("webhook", settings, SECRET).unwrap()));
    assert!(outbox.wait_drained(Duration::from_secs(20)).await, "depth {}", outbox.depth());
    assert_eq!(rx.accepted_ids(), accepted, "exactly what was accepted arrived");

    // Delivery freed the space: writable again, and new events go through.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !outbox.is_writable() {
        assert!(std::time::Instant::now() < deadline, "the outbox never became writable again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retry = &events[refused_at * 50..refused_at * 50 + 50];
    outbox.append(retry).await.expect("accepts again after delivery freed space");
    assert!(outbox.wait_drained(Duration::from_secs(10)).await);
    d.shutdown().await.unwrap();
    outbox.close().await.unwrap();
    let got = rx.accepted_ids();
    assert!(retry.iter().all(|e| got.contains(&e.id("lab"))));
    assert_eq!(Metrics::take(snap).gauge("callbridge_outbox_disk_full"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_loud_and_loses_nothing() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("callbridge=info").try_init();
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder.install().expect("first recorder in this test binary");

    // Path 1: size cap enforced by the store itself.
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = OutboxOptions::new("lab", vec!["webhook".into()]);
    opts.max_bytes = 512 * 1024;
    opts.reserve_bytes = 0;
    fill_deliver_recover(tmp.path(), opts, true, &snap).await;
    eprintln!("disk full via max_bytes: ran");

    // Path 2: a real, tiny filesystem.
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("disk full via tmpfs: SKIPPED (mount -t tmpfs not permitted here); the max_bytes path ran");
        return;
    }
    let mut opts = OutboxOptions::new("lab", vec!["webhook".into()]);
    opts.reserve_bytes = 2 << 20;
    let result = tokio::spawn({
        let dir = mnt.path().join("outbox");
        async move { fill_deliver_recover(&dir, opts, false, &snap).await }
    })
    .await;
    let _ = std::process::Command::new("umount").arg(mnt.path()).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
    eprintln!("disk full via a 8 MiB tmpfs: ran");
}
