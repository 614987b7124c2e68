//! The helpdesk is down (nothing listens on its port) for a whole replay,
//! then comes back: everything is delivered, and while it is down the outbox
//! depth and the oldest undelivered event's age are visible as metrics.

mod delivery_common;

use callbridge::outbox::{Outbox, OutboxOptions};
use callbridge::sink::webhook::{WebhookSettings, WebhookSink};
use callbridge::sink::{RunnerOptions, Runners};
use delivery_common::*;
use metrics_util::debugging::DebuggingRecorder;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helpdesk_down_for_the_whole_replay_then_up() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    recorder.install().expect("first recorder in this test binary");

    // A port nobody listens on: connection refused, like a helpdesk that is down.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let events = a11_events();
    {
        // First run: the whole trace is accepted while the helpdesk is down,
        // then the daemon stops with everything still pending.
        let outbox = Outbox::open(tmp.path(), OutboxOptions::new("lab", vec!["webhook".into()])).unwrap();
        let settings = WebhookSettings {
            url: format!("http://{addr}/hooks"),
            batch_size: 1,
            timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_millis(300),
            max_backoff: Duration::from_millis(300),
            concurrency: 4,
        };
        let sink = WebhookSink::new("webhook", settings, SECRET).unwrap();
        let opts = RunnerOptions { gauge_interval: Duration::from_millis(100), ..RunnerOptions::default() };
        let mut d = Runners::new(&outbox, opts);
        d.spawn(Arc::new(sink));
        for chunk in events.chunks(5) {
            outbox.append(chunk).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(outbox.depth(), events.len() as u64);
        let m = Metrics::take(&snap);
        assert_eq!(m.gauge("callbridge_outbox_depth"), Some(events.len() as f64));
        let age = m.gauge("callbridge_outbox_oldest_age_seconds").expect("age gauge");
        assert!(age >= 1.0, "oldest age {age}");
        assert!(m.counter("callbridge_sink_retries_total") > 0);
        assert!(m.counter("callbridge_sink_requests_total") > 0);
        assert!(outbox.is_writable());
        d.shutdown().await.unwrap();
        outbox.close().await.unwrap();
    }

    // Restart, the helpdesk comes back on its port: everything pending goes.
    let rx = Receiver::start_on(addr).await;
    let outbox = Outbox::open(tmp.path(), OutboxOptions::new("lab", vec!["webhook".into()])).unwrap();
    assert_eq!(outbox.depth(), events.len() as u64, "nothing lost across the restart");
    let settings = WebhookSettings {
        url: rx.url(),
        batch_size: 1,
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(300),
        max_backoff: Duration::from_millis(300),
        concurrency: 4,
    };
    let opts = RunnerOptions { gauge_interval: Duration::from_millis(100), ..RunnerOptions::default() };
    let mut d = Runners::new(&outbox, opts);
    d.spawn(Arc::new(WebhookSink::new("webhook", settings, SECRET).unwrap()));
    // The replay runs again (the trace is re-emitted): already known ids are no-ops.
    let again = outbox.append(&events).await.unwrap();
    assert_eq!((again.appended, again.duplicates), (0, events.len()));
    assert!(outbox.wait_drained(Duration::from_secs(15)).await, "depth {}", outbox.depth());
    d.shutdown().await.unwrap();
    let dups = check_delivery(&rx.requests(), &events, "lab");
    assert_eq!(dups, 0, "each event delivered once after the outage");
    let m = Metrics::take(&snap);
    assert_eq!(m.gauge("callbridge_outbox_depth"), Some(0.0));
    assert_eq!(m.gauge("callbridge_outbox_oldest_age_seconds"), Some(0.0));
}
