//! The metric table (`telemetry::METRICS`) against the code: every
//! `callbridge_` metric recorded anywhere in `src/` is in the table with the
//! same kind, every entry is recorded somewhere, names follow the house
//! rules, and `/metrics` carries a `# HELP` line for every family.

use callbridge::telemetry::{MetricKind, METRICS};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `(name, kind)` of every `counter!("callbridge_…"`-style call in `src/`.
fn recorded() -> BTreeSet<(String, &'static str)> {
    let mut out = BTreeSet::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source readable");
            for (macro_name, kind) in [("counter!(", "counter"), ("gauge!(", "gauge"), ("histogram!(", "histogram")] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = text[at + macro_name.len()..].trim_start();
                    let Some(rest) = rest.strip_prefix('"') else { continue };
                    let name: String = rest.chars().take_while(|c| *c != '"').collect();
                    // `describe_counter!(`… ends in `counter!(` too; it takes names from the table.
                    let before = &text[..at];
                    if name.starts_with("callbridge_") && !before.ends_with("describe_") {
                        out.insert((name, kind));
                    }
                }
            }
        }
    }
    out
}

fn kind_name(k: MetricKind) -> &'static str {
    match k {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
        MetricKind::Histogram => "histogram",
    }
}

#[test]
fn every_recorded_metric_is_in_the_table_with_its_kind() {
    let table: BTreeMap<&str, &str> = METRICS.iter().map(|m| (m.name, kind_name(m.kind))).collect();
    assert_eq!(table.len(), METRICS.len(), "a name appears twice in the table");
    let used = recorded();
    assert!(used.len() > 20, "the scan found too little: {used:?}");
    for (name, kind) in &used {
        match table.get(name.as_str()) {
            Some(k) => assert_eq!(k, kind, "{name} is recorded as a {kind} but described as a {k}"),
            None => panic!("{name} ({kind}) is recorded but not in telemetry::METRICS"),
        }
    }
    let used_names: BTreeSet<&str> = used.iter().map(|(n, _)| n.as_str()).collect();
    let stale: Vec<&str> = table.keys().filter(|n| !used_names.contains(**n)).copied().collect();
    assert!(stale.is_empty(), "described but never recorded: {stale:?}");
}

#[test]
fn names_follow_the_rules() {
    let counters: BTreeSet<&str> = METRICS.iter().filter(|m| m.kind == MetricKind::Counter).map(|m| m.name).collect();
    for m in METRICS {
        assert!(m.name.starts_with("callbridge_"), "{}", m.name);
        assert!(!m.help.is_empty(), "{} has no help", m.name);
        match m.kind {
            MetricKind::Counter => assert!(m.name.ends_with("_total"), "counter {} must end in _total", m.name),
            _ => {
                assert!(!m.name.ends_with("_total"), "{} is not a counter but ends in _total", m.name);
                // OpenMetrics names a counter's family without `_total`.
                let clash = format!("{}_total", m.name);
                assert!(!counters.contains(clash.as_str()), "{} shares its family with the counter {clash}", m.name);
            }
        }
        if m.name.ends_with("_seconds") || m.name.ends_with("_bytes") {
            assert!(m.unit.is_some(), "{} names a unit but declares none", m.name);
        }
    }
}

#[test]
fn metrics_page_describes_every_family() {
    callbridge::telemetry::metrics();
    for m in METRICS {
        match m.kind {
            MetricKind::Counter => metrics::counter!(m.name).increment(0),
            MetricKind::Gauge => metrics::gauge!(m.name).increment(0.0),
            MetricKind::Histogram => metrics::histogram!(m.name).record(0.0),
        }
    }
    let text = callbridge::telemetry::render();
    for m in METRICS {
        assert!(text.contains(&format!("# HELP {} ", m.name)), "no HELP for {}:\n{text}", m.name);
    }
}
