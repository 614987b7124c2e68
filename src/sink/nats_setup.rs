//! `callbridge nats-setup`: creates the JetStream stream each NATS sink
//! publishes into, or checks the one that exists, and prints what it found.
//!
//! A separate command rather than a side effect of starting the daemon: the
//! stream is shared by every site, usually owned by the platform's operators
//! and created with rights a site's credentials need not have. This module
//! creates what is missing and never changes or deletes an existing
//! stream: where one differs from the configuration it says how, and the
//! command fails, for an operator to decide (`nats stream edit`).

use super::nats::{connect_options, default_stream_subjects, server_addrs};
use crate::config::{Config, SinkConfig};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use std::fmt::Write as _;
use std::time::Duration;

/// The NATS default duplicate window; the floor of ours.
pub const MIN_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The stream one NATS sink needs.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamPlan {
    pub sink: String,
    pub name: String,
    pub subjects: Vec<String>,
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub max_age: Duration,
}

/// The duplicate window: as configured, else [`MIN_DUPLICATE_WINDOW`]; with
/// a hot standby at least three lease periods and a minute (a new leader
/// delivers again what its predecessor may have published since the last
/// renewal it saw, plus a safety margin of one period).
pub fn duplicate_window(configured: Option<f64>, lease_seconds: Option<u64>) -> Duration {
    let floor = lease_seconds.map_or(MIN_DUPLICATE_WINDOW, |l| {
        MIN_DUPLICATE_WINDOW.max(Duration::from_secs(l.saturating_mul(3).saturating_add(60)))
    });
    configured.and_then(|s| Duration::try_from_secs_f64(s).ok()).unwrap_or(floor)
}

/// One plan per NATS sink of the configuration.
pub fn plans(config: &Config) -> Vec<(StreamPlan, &crate::config::NatsConnectionConfig, &crate::config::SecretSource)> {
    let names = super::sink_names(config).unwrap_or_default();
    config
        .sinks
        .iter()
        .zip(names)
        .filter_map(|(s, sink)| match s {
            SinkConfig::Nats {
                connection,
                secret,
                subject,
                stream,
                stream_subjects,
                replicas,
                duplicate_window_seconds,
                max_age_seconds,
                ..
            } => Some((
                StreamPlan {
                    sink,
                    name: stream.clone(),
                    subjects: if stream_subjects.is_empty() {
                        default_stream_subjects(subject)
                    } else {
                        stream_subjects.clone()
                    },
                    replicas: *replicas,
                    duplicate_window: duplicate_window(*duplicate_window_seconds, None),
                    max_age: Duration::try_from_secs_f64(*max_age_seconds).unwrap_or_default(),
                },
                connection,
                secret,
            )),
            _ => None,
        })
        .collect()
}

/// How an existing stream differs from the plan (empty: it fits).
pub fn differences(plan: &StreamPlan, have: &StreamConfig) -> Vec<String> {
    let mut out = Vec::new();
    let missing: Vec<&String> = plan.subjects.iter().filter(|s| !have.subjects.contains(s)).collect();
    if !missing.is_empty() {
        out.push(format!("subjects {:?} are not among the stream's {:?}", missing, have.subjects));
    }
    if have.storage != StorageType::File {
        out.push("storage is memory: events would not survive a server restart; file storage is needed".into());
    }
    if have.num_replicas != plan.replicas {
        out.push(format!("replicas: {} (configured {})", have.num_replicas, plan.replicas));
    }
    if have.duplicate_window < plan.duplicate_window {
        out.push(format!(
            "duplicate window {} s is shorter than the {} s needed: redeliveries after it would be stored twice",
            have.duplicate_window.as_secs(),
            plan.duplicate_window.as_secs()
        ));
    }
    out
}

fn describe(c: &StreamConfig) -> String {
    format!(
        "subjects {:?}, {} storage, {} replica(s), duplicate window {} s, max age {}",
        c.subjects,
        if c.storage == StorageType::File { "file" } else { "memory" },
        c.num_replicas,
        c.duplicate_window.as_secs(),
        if c.max_age.is_zero() { "unlimited".to_string() } else { format!("{} s", c.max_age.as_secs()) }
    )
}

/// Creates or checks every NATS sink's stream; the report, and whether
/// every stream fits the configuration.
pub async fn setup(config: &Config) -> anyhow::Result<(String, bool)> {
    let mut report = String::new();
    let mut fits = true;
    let plans = plans(config);
    if plans.is_empty() {
        anyhow::bail!("the configuration has no [[sinks]] type = \"nats\"");
    }
    for (plan, connection, secret) in plans {
        let options = connect_options(connection, secret, &format!("callbridge {} nats-setup", config.pbx.name))
            .map_err(|e| anyhow::anyhow!("sink {}: {e}", plan.sink))?;
        let servers = server_addrs(&connection.url).map_err(|e| anyhow::anyhow!("sink {}: {e}", plan.sink))?;
        let client = options
            .connect(servers.as_slice())
            .await
            .map_err(|e| anyhow::anyhow!("sink {}: cannot connect to NATS: {e}", plan.sink))?;
        let js = async_nats::jetstream::new(client);
        let wanted = StreamConfig {
            name: plan.name.clone(),
            subjects: plan.subjects.clone(),
            storage: StorageType::File,
            num_replicas: plan.replicas,
            duplicate_window: plan.duplicate_window,
            max_age: plan.max_age,
            description: Some("callbridge call lifecycle events (CloudEvents)".into()),
            ..Default::default()
        };
        match js.get_stream(&plan.name).await {
            Ok(stream) => {
                let info = stream.cached_info();
                writeln!(report, "stream {}: exists (sink {})", plan.name, plan.sink)?;
                writeln!(report, "  {}", describe(&info.config))?;
                writeln!(report, "  {} message(s), {} byte(s)", info.state.messages, info.state.bytes)?;
                let diffs = differences(&plan, &info.config);
                for d in &diffs {
                    writeln!(report, "  differs: {d}")?;
                }
                if diffs.is_empty() {
                    writeln!(report, "  fits the configuration; nothing changed")?;
                } else {
                    fits = false;
                    writeln!(report, "  not changed: adjust it by hand (nats stream edit) or fix the configuration")?;
                }
            }
            Err(e) if is_not_found(&e) => {
                let stream = js
                    .create_stream(wanted)
                    .await
                    .map_err(|e| anyhow::anyhow!("stream {}: cannot create it: {e}", plan.name))?;
                writeln!(report, "stream {}: created (sink {})", plan.name, plan.sink)?;
                writeln!(report, "  {}", describe(&stream.cached_info().config))?;
            }
            Err(e) => anyhow::bail!("stream {}: cannot look it up: {e}", plan.name),
        }
    }
    Ok((report, fits))
}

fn is_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_duplicate_window_covers_a_lease_handover() {
        assert_eq!(duplicate_window(None, None), MIN_DUPLICATE_WINDOW);
        assert_eq!(duplicate_window(None, Some(10)), MIN_DUPLICATE_WINDOW);
        assert_eq!(duplicate_window(None, Some(60)), Duration::from_secs(240));
        assert_eq!(duplicate_window(Some(3600.0), Some(60)), Duration::from_secs(3600));
    }

    #[test]
    fn differences_name_what_does_not_fit() {
        let plan = StreamPlan {
            sink: "nats".into(),
            name: "CALLBRIDGE".into(),
            subjects: vec!["callbridge.>".into()],
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
        };
        let mut have = StreamConfig {
            name: "CALLBRIDGE".into(),
            subjects: vec!["callbridge.>".into()],
            storage: StorageType::File,
            num_replicas: 1,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        assert!(differences(&plan, &have).is_empty());
        have.storage = StorageType::Memory;
        have.duplicate_window = Duration::from_secs(60);
        have.subjects = vec!["other.>".into()];
        let d = differences(&plan, &have).join("\n");
        assert!(d.contains("memory") && d.contains("duplicate window") && d.contains("callbridge.>"), "{d}");
    }
}
