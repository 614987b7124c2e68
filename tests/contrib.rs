//! The operator files in contrib/: every metric the Grafana dashboard and the
//! Prometheus rules query is one callbridge describes (`telemetry::METRICS`)
//! and, unless it belongs to a live PBX connection (AMI, SIP, FastAGI), one
//! that a daemon replaying a trace really exports; `promtool` checks and
//! unit-tests the rules when it is installed (`.ci/run` installs it).

use callbridge::app::{self, RunOptions, SourceSpec};
use callbridge::replay::Speed;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const TOKEN: &str = "contrib-token";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Metric names in a query text (`callbridge_…`, `process_…`), histogram
/// series suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["callbridge_", "process_"] {
        for (at, _) in text.match_indices(prefix) {
            if text[..at].chars().next_back().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = text[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
            names.insert(base.to_string());
        }
    }
    names
}

fn queried() -> BTreeSet<String> {
    let dashboard =
        std::fs::read_to_string(root().join("contrib/grafana/callbridge-dashboard.json")).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut exprs = String::new();
    for panel in json["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push_str(target["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    let rules = std::fs::read_to_string(root().join("contrib/prometheus/callbridge.rules.yml")).expect("rules");
    let rule_exprs: String = rules
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("groups:"))
        .filter(|l| !l.trim_start().starts_with('#') && !l.contains("summary:") && !l.contains("runbook:"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = metric_names(&exprs);
    names.extend(metric_names(&rule_exprs));
    assert!(names.len() > 10, "{names:?}");
    names
}

#[test]
fn every_queried_metric_is_described() {
    let described: BTreeSet<&str> = callbridge::telemetry::METRICS.iter().map(|m| m.name).collect();
    for name in queried() {
        assert!(
            name.starts_with("process_") || described.contains(name.as_str()),
            "{name} is queried in contrib/ but callbridge does not describe it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queried_metric_is_exported_by_a_replaying_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = std::fs::read_to_string(root().join("config/lab.toml")).expect("lab.toml");
    let lab = &lab[..lab.find("[[sinks]]").expect("lab.toml has sinks")];
    let config = dir.path().join("callbridge.toml");
    let events = dir.path().join("events.jsonl");
    std::fs::write(
        &config,
        format!(
            "{lab}\n[[sinks]]\ntype = \"jsonl\"\npath = {events:?}\n[outbox]\npath = {:?}\n[api]\nlisten = \"127.0.0.1:0\"\nsecret = \"{TOKEN}\"\n",
            dir.path().join("outbox")
        ),
    )
    .expect("config");
    let trace = root().join("fixtures/ami/a11-concurrent-mix.ami");
    let running = app::start(RunOptions {
        config_path: config,
        source: SourceSpec::Traces { paths: vec![trace], speed: Speed::Max },
        api_listen: None,
        shutdown_deadline: Duration::from_secs(5),
    })
    .await
    .expect("daemon starts");
    let url = format!("http://{}/metrics", running.api_addr.expect("API listens"));
    let client = reqwest::Client::new();
    let expected: Vec<String> = queried()
        .into_iter()
        .filter(|name| {
            let live_only =
                ["callbridge_ami_", "callbridge_sip_", "callbridge_agi_"].iter().any(|p| name.starts_with(p))
                    && name != "callbridge_ami_reconnects_total";
            !live_only
        })
        .collect();
    // The replay runs while we scrape: series appear as the trace reaches
    // them (a gauge once the pipeline publishes it), so scrape until all
    // are there or the bound passes, then check.
    let mut text = String::new();
    for _ in 0..100 {
        text = client.get(&url).bearer_auth(TOKEN).send().await.expect("GET /metrics").text().await.expect("body");
        let exported = metric_names(&text);
        if expected.iter().all(|name| exported.contains(name)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exported = metric_names(&text);
    for name in &expected {
        assert!(exported.contains(name), "{name} is queried in contrib/ but not exported:\n{text}");
    }
    running.stop().await.expect("stops");
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("promtool not installed (Debian package prometheus): rules not checked here; .ci/run checks them");
        return;
    }
    let dir = root().join("contrib/prometheus");
    for args in [&["check", "rules", "callbridge.rules.yml"][..], &["test", "rules", "callbridge.rules.test.yml"][..]] {
        let out = Command::new("promtool").args(args).current_dir(&dir).output().expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
