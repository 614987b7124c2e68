//! Logs and metrics: the `tracing` subscriber (human or JSON), the Prometheus
//! recorder behind `GET /metrics`, process metrics and build info.
//!
//! Metric names follow `callbridge_<noun>_<unit|total>`; label values always
//! come from small fixed sets (never call ids, numbers or error strings).
//! Every metric is described here, so `/metrics` documents itself.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Initialises logging. `json` selects one JSON object per line (for log
/// shippers); the default is human-readable. `RUST_LOG` overrides the level.
pub fn init_logging(json: bool) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second initialisation (tests) is harmless: keep the first.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
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

fn describe() {
    metrics_process::Collector::default().describe();
    describe_gauge!("callbridge_build_info", "Build information (value 1); labels: version");
    metrics::gauge!("callbridge_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);

    describe_gauge!("callbridge_ami_connected", "1 while logged in to the PBX's Manager Interface");
    describe_counter!("callbridge_ami_reconnects_total", "AMI reconnections");
    describe_counter!("callbridge_ami_frames_received_total", "AMI frames received");
    describe_counter!("callbridge_ami_bytes_received_total", Unit::Bytes, "AMI bytes received");
    describe_counter!("callbridge_ami_malformed_frames_total", "AMI frames skipped as malformed, by reason");
    describe_histogram!("callbridge_ami_action_duration_seconds", Unit::Seconds, "AMI action round trip, by action");

    describe_gauge!("callbridge_calls_active", "Live calls, by group and state");
    describe_counter!("callbridge_lifecycle_events_total", "Lifecycle events emitted, by type");
    describe_counter!("callbridge_calls_missed_total", "Missed calls, by reason");
    describe_counter!("callbridge_calls_stuck_total", "Calls flagged stuck");
    describe_counter!("callbridge_calls_lost_total", "Calls ended as lost (vanished from the PBX)");

    describe_gauge!("callbridge_outbox_depth", "Events not yet acknowledged by every sink");
    describe_gauge!("callbridge_outbox_oldest_age_seconds", Unit::Seconds, "Age of the oldest undelivered event");
    describe_counter!(
        "callbridge_outbox_id_conflicts_total",
        "Events refused because their id is already in the outbox with different content"
    );
    describe_counter!("callbridge_sink_requests_total", "Sink requests, by sink and status class");
    describe_histogram!("callbridge_sink_request_duration_seconds", Unit::Seconds, "Sink request duration, by sink");
    describe_counter!("callbridge_sink_retries_total", "Sink retries, by sink");
    describe_counter!("callbridge_dead_letters_total", "Events parked in the dead-letter store, by sink");

    describe_counter!("callbridge_config_reloads_total", "Configuration reloads, by result (ok/rejected)");

    describe_counter!(
        "callbridge_agi_sessions_total",
        "FastAGI routing sessions, by outcome (queue/missed/error/malformed/timeout/closed/refused)"
    );
    describe_gauge!("callbridge_agi_sessions_active", "FastAGI routing sessions in progress");
    describe_histogram!(
        "callbridge_agi_session_duration_seconds",
        Unit::Seconds,
        "FastAGI routing session duration, accept to close"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn exposition_has_build_info_and_process_metrics() {
        let text = super::render();
        assert!(text.contains("callbridge_build_info{version=\""), "{text}");
        assert!(text.contains("process_"), "{text}");
    }
}
