//! Logs and metrics: the `tracing` subscriber (human or JSON), the Prometheus
//! recorder behind `GET /metrics`, process metrics and build info.
//!
//! Metric names follow `callbridge_<noun>_<unit|total>`; label values always
//! come from small fixed sets (never call ids, numbers or error strings).
//! Every metric is described in one table ([`METRICS`]), so `/metrics`
//! documents itself.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Initialises logging, once for every command. `json` selects one JSON
/// object per line (for log shippers); the default is human-readable.
/// `RUST_LOG` overrides the level.
///
/// Colours only for a person at a terminal, never in journald or files.
/// Under systemd (`JOURNAL_STREAM` names stderr) human-readable lines carry
/// no timestamp: journald stamps every line itself, and a second clock in
/// the text only disagrees with it. (Structured fields through the journal
/// protocol would need a second logging path; `--log-json` already gives
/// log shippers every field.)
pub fn init_logging(json: bool) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // A second initialisation (tests) is harmless: keep the first.
    let _ = match (json, stderr_is_journal()) {
        (true, _) => builder.json().try_init(),
        (false, true) => builder.without_time().try_init(),
        (false, false) => builder.try_init(),
    };
}

/// Whether stderr is the journal stream systemd set up (`JOURNAL_STREAM` is
/// `<device>:<inode>` of it; compared with stderr's own, so that a child
/// process whose stderr was redirected does not count).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_duration_seconds".into()),
                    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_rtt_seconds".into()),
                        &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Another recorder already installed (tests): render what we own.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Renders the exposition text; refreshes process metrics first.
pub fn render() -> String {
    let h = metrics();
    metrics_process::Collector::default().collect();
    h.run_upkeep();
    h.render()
}

/// What a metric family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family: the single table of every `callbridge_` metric, its
/// kind, unit and help text. `/metrics` gets its `# HELP` lines from here;
/// `tests/metrics_table.rs` checks that every metric the code records is in
/// it with the same kind, and that no gauge shares a family with a counter.
#[derive(Debug, Clone, Copy)]
pub struct MetricDoc {
    pub name: &'static str,
    pub kind: MetricKind,
    pub unit: Option<Unit>,
    pub help: &'static str,
}

const fn doc(name: &'static str, kind: MetricKind, unit: Option<Unit>, help: &'static str) -> MetricDoc {
    MetricDoc { name, kind, unit, help }
}

use MetricKind::{Counter, Gauge, Histogram};

/// Every metric callbridge records (process metrics aside).
pub const METRICS: &[MetricDoc] = &[
    doc("callbridge_build_info", Gauge, None, "Build information (value 1); labels: version"),
    // The PBX's Manager Interface.
    doc("callbridge_ami_connected", Gauge, None, "1 while logged in to the PBX's Manager Interface"),
    doc("callbridge_ami_reconnects_total", Counter, None, "AMI logins after a lost connection (reconnections)"),
    doc(
        "callbridge_ami_connect_attempts_total",
        Counter,
        None,
        "AMI connection attempts, successful or not (the first one included)",
    ),
    doc("callbridge_ami_frames_received_total", Counter, None, "AMI frames received"),
    doc("callbridge_ami_bytes_received_total", Counter, Some(Unit::Bytes), "AMI bytes received"),
    doc("callbridge_ami_malformed_frames_total", Counter, None, "AMI frames skipped as malformed, by reason"),
    doc("callbridge_ami_action_duration_seconds", Histogram, Some(Unit::Seconds), "AMI action round trip, by action"),
    // Calls.
    doc("callbridge_calls_active", Gauge, None, "Live calls, by group and state"),
    // The event stream (`GET /v1/events`).
    doc("callbridge_api_event_clients", Gauge, None, "Clients connected to the event stream"),
    doc(
        "callbridge_api_event_clients_dropped_total",
        Counter,
        None,
        "Event stream clients disconnected for reading too slowly",
    ),
    doc("callbridge_lifecycle_events_total", Counter, None, "Lifecycle events emitted, by type"),
    doc("callbridge_calls_missed_total", Counter, None, "Missed calls, by reason"),
    doc("callbridge_calls_stuck_total", Counter, None, "Calls flagged stuck"),
    doc(
        "callbridge_calls_lost_total",
        Counter,
        None,
        "Calls ended as lost (vanished from the PBX: at a resync or by the stuck-call check)",
    ),
    doc("callbridge_calls_restored_total", Counter, None, "Live calls of a previous run restored at start"),
    // The hot-standby pair.
    doc("callbridge_ha_leader", Gauge, None, "1 while this instance delivers and controls (the leader, or alone)"),
    doc(
        "callbridge_ha_transitions_total",
        Counter,
        None,
        "Role changes of a hot-standby instance, by the role taken (leader, standby)",
    ),
    doc(
        "callbridge_ha_settled_total",
        Counter,
        None,
        "Deliveries a standby marked done because the leader reported them delivered",
    ),
    // The durable outbox.
    doc("callbridge_outbox_depth", Gauge, None, "Events not yet acknowledged by every sink"),
    doc("callbridge_outbox_oldest_age_seconds", Gauge, Some(Unit::Seconds), "Age of the oldest undelivered event"),
    doc("callbridge_outbox_disk_full", Gauge, None, "1 while the outbox cannot write (disk full or write error)"),
    doc("callbridge_outbox_write_errors_total", Counter, None, "Outbox commits that failed (the events are retried)"),
    doc("callbridge_outbox_commits_total", Counter, None, "Outbox commits (group commits of appends and acks)"),
    doc(
        "callbridge_outbox_journal_events_total",
        Counter,
        None,
        "Events held in the outbox journal, by how they left it: delivered (acknowledged in time) or stored (rows)",
    ),
    doc(
        "callbridge_outbox_commit_duration_seconds",
        Histogram,
        Some(Unit::Seconds),
        "Outbox commit duration, fsync included",
    ),
    doc(
        "callbridge_outbox_appends_total",
        Counter,
        None,
        "Events appended to the outbox, by result (stored/duplicate)",
    ),
    doc(
        "callbridge_outbox_id_conflicts_total",
        Counter,
        None,
        "Events refused because their id is already in the outbox with different content",
    ),
    doc("callbridge_dead_letters_waiting", Gauge, None, "Dead letters waiting to be retried or removed"),
    // Sinks.
    doc("callbridge_sink_requests_total", Counter, None, "Sink requests, by sink and status class"),
    doc("callbridge_sink_request_duration_seconds", Histogram, Some(Unit::Seconds), "Sink request duration, by sink"),
    doc("callbridge_sink_retries_total", Counter, None, "Sink retries, by sink"),
    doc("callbridge_dead_letters_total", Counter, None, "Events parked in the dead-letter store, by sink"),
    doc(
        "callbridge_zammad_rejects_total",
        Counter,
        None,
        "Zammad's rejects of inbound callers (blocked caller ids), by sink and result (hung_up/ignored/too_late/failed)",
    ),
    doc(
        "callbridge_task_exits_total",
        Counter,
        None,
        "Essential tasks that stopped unexpectedly (the daemon then exits for a restart), by task",
    ),
    // Configuration.
    doc("callbridge_config_reloads_total", Counter, None, "Configuration reloads, by result (ok/rejected)"),
    // FastAGI routing.
    doc(
        "callbridge_agi_sessions_total",
        Counter,
        None,
        "FastAGI routing sessions, by outcome (queue/missed/error/malformed/timeout/closed/refused)",
    ),
    doc("callbridge_agi_sessions_active", Gauge, None, "FastAGI routing sessions in progress"),
    doc(
        "callbridge_agi_session_duration_seconds",
        Histogram,
        Some(Unit::Seconds),
        "FastAGI routing session duration, accept to close",
    ),
    doc(
        "callbridge_routing_redirects_total",
        Counter,
        None,
        "Calls redirected by who is calling, by reason (caller_unknown/caller_inactive)",
    ),
    // Caller lookup (who is calling).
    doc(
        "callbridge_caller_lookup_requests_total",
        Counter,
        None,
        "Caller lookups asked of the helpdesk, by result (found/not_found/timeout/error/busy)",
    ),
    doc(
        "callbridge_caller_lookup_request_duration_seconds",
        Histogram,
        Some(Unit::Seconds),
        "Caller lookup duration, a wait for a request slot included",
    ),
    doc("callbridge_caller_lookup_cache_hits_total", Counter, None, "Caller lookups answered from the cache"),
    doc("callbridge_caller_lookup_in_flight", Gauge, None, "Caller lookup requests in flight"),
    doc("callbridge_caller_lookup_failing", Gauge, None, "1 while caller lookups fail (an outage: calls fail open)"),
    doc(
        "callbridge_caller_lookup_fail_open_total",
        Counter,
        None,
        "Calls routed without knowing the caller for lack of an answer, by cause (timeout/error/busy)",
    ),
    // SIP dialog subscriptions.
    doc("callbridge_sip_pbx_reachable", Gauge, None, "1 while the PBX answers the SIP agent's OPTIONS"),
    doc(
        "callbridge_sip_subscriptions_active",
        Gauge,
        None,
        "Dialog-event subscriptions the PBX holds now (granted; not ended, forgotten, failed to refresh or lapsed)",
    ),
    doc(
        "callbridge_sip_subscription_failures_total",
        Counter,
        None,
        "Dialog-event subscriptions refused, timed out or terminated, by reason",
    ),
    doc("callbridge_sip_messages_received_total", Counter, None, "SIP messages received, by kind"),
    doc("callbridge_sip_malformed_total", Counter, None, "SIP input skipped as malformed, by what (sip/xml/oversize)"),
    doc(
        "callbridge_sip_options_rtt_seconds",
        Histogram,
        Some(Unit::Seconds),
        "Round trip of the SIP OPTIONS keepalive",
    ),
];

fn describe() {
    metrics_process::Collector::default().describe();
    for m in METRICS {
        match (m.kind, m.unit) {
            (Counter, Some(u)) => describe_counter!(m.name, u, m.help),
            (Counter, None) => describe_counter!(m.name, m.help),
            (Gauge, Some(u)) => describe_gauge!(m.name, u, m.help),
            (Gauge, None) => describe_gauge!(m.name, m.help),
            (Histogram, Some(u)) => describe_histogram!(m.name, u, m.help),
            (Histogram, None) => describe_histogram!(m.name, m.help),
        }
    }
    metrics::gauge!("callbridge_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    export_known_series();
}

/// Registers, at 0, every counter series whose labels are known before
/// anything happens, so that `rate()` and alerts work before the first
/// incident instead of seeing no series at all. Series labelled by runtime
/// values (sink names) are registered when their component starts.
fn export_known_series() {
    for name in [
        "callbridge_calls_lost_total",
        "callbridge_calls_restored_total",
        "callbridge_calls_stuck_total",
        "callbridge_ami_reconnects_total",
        "callbridge_ami_connect_attempts_total",
        "callbridge_api_event_clients_dropped_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("callbridge_api_event_clients").set(0.0);
    for t in crate::event::EventKind::TYPE_NAMES {
        metrics::counter!("callbridge_lifecycle_events_total", "type" => t).increment(0);
    }
    for r in crate::event::MissedReason::ALL {
        metrics::counter!("callbridge_calls_missed_total", "reason" => r.as_str()).increment(0);
    }
    for result in ["ok", "rejected"] {
        metrics::counter!("callbridge_config_reloads_total", "result" => result).increment(0);
    }
    for task in ["pipeline", "sip", "agi", "api", "metrics"] {
        metrics::counter!("callbridge_task_exits_total", "task" => task).increment(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exposition_has_build_info_and_process_metrics() {
        let text = super::render();
        assert!(text.contains("callbridge_build_info{version=\""), "{text}");
        assert!(text.contains("process_"), "{text}");
    }

    #[test]
    fn counters_with_known_labels_are_exported_before_anything_happens() {
        let text = super::render();
        for series in [
            "callbridge_calls_lost_total ",
            "callbridge_calls_missed_total{reason=\"queue_timeout\"} ",
            "callbridge_lifecycle_events_total{type=\"agent.line\"} ",
            "callbridge_config_reloads_total{result=\"rejected\"} ",
            "callbridge_task_exits_total{task=\"sip\"} ",
        ] {
            assert!(text.lines().any(|l| l.starts_with(series)), "{series}missing:\n{text}");
        }
    }

    /// The process's CPU time from /proc/self/stat (USER_HZ is 100 on
    /// Linux's ABIs).
    fn proc_cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("procfs");
        let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).expect("stat format");
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        ticks as f64 / 100.0
    }

    #[test]
    fn process_cpu_time_is_exact_not_whole_seconds() {
        // Burn CPU until the process's time is mid-way between two whole
        // seconds: whole-second truncation is then off by at least 0.3 s.
        let mut x = 0u64;
        for _ in 0..400 {
            let f = proc_cpu_seconds().fract();
            if (0.35..0.65).contains(&f) {
                break;
            }
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_millis(20) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let text = super::render();
        let exact = proc_cpu_seconds();
        let cpu: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("process_cpu_seconds_total exported");
        assert!((cpu - exact).abs() < 0.2, "process_cpu_seconds_total {cpu}, /proc says {exact}");
    }
}
