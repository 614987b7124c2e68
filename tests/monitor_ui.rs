//! The monitor page (`/ui`) in a real browser: headless Chromium through
//! chromedriver against the real binary, `callbridge replay --serve
//! --speed 10`, over loopback. Skipped with a message when Chromium or
//! chromedriver is not installed (CI installs them); a failure leaves a
//! screenshot in `target/test-artifacts/`.
//!
//! - a11 (12 concurrent calls): the page asks for the token once, shows
//!   every call appearing and ending as the events come, the support
//!   group's indicators as `GET /v1/groups/support/indicators` has them at
//!   the end, and an agent's switch produces `agent.availability`.
//! - A call left hanging (a01 cut before its hang-up) with small `[stuck]`
//!   limits: highlighted as stuck, its time ticking on, removed through
//!   its button after the confirmation (cancelling first keeps it).
//!
//! The traces start with a frame dated 40 s before their first one: at
//! speed 10, four quiet seconds in which the browser opens the page.

mod support;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::browser::Browser;

const TOKEN: &str = "monitor-token";

fn config(dir: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"[pbx]
name = "lab"
[[groups]]
id = "support"
name = "Soporte"
queue = "700"
agents = ["maria", "joao"]
timezone = "America/Sao_Paulo"
overflow = ["sales"]
[[groups]]
id = "sales"
name = "Ventas"
queue = "701"
agents = ["ana"]
timezone = "America/Sao_Paulo"
{agents}
[recordings]
url_base = "https://pbx.example/recordings/"
[api]
listen = "127.0.0.1:0"
secret = "{TOKEN}"
[outbox]
path = {outbox:?}
[[sinks]]
type = "jsonl"
path = {events:?}
{extra}
"#,
        agents = support::LAB_AGENTS,
        outbox = dir.join("outbox"),
        events = dir.join("events.jsonl"),
    );
    let path = dir.join("callbridge.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// `trace` with a harmless frame dated `lead` seconds before its first
/// timestamp, inserted before its first event.
fn with_lead_in(trace: &[u8], lead: u64) -> Vec<u8> {
    let text = String::from_utf8_lossy(trace);
    let first_ts: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Timestamp: "))
        .and_then(|t| t.trim().parse().ok())
        .expect("the trace has timestamps");
    let at = text.find("\r\nEvent: ").map(|i| i + 2).expect("the trace has events");
    let frame = format!(
        "Event: SuccessfulAuth\r\nPrivilege: security,all\r\nTimestamp: {:.6}\r\nService: AMI\r\n\r\n",
        first_ts - lead as f64
    );
    let mut out = trace[..at].to_vec();
    out.extend_from_slice(frame.as_bytes());
    out.extend_from_slice(&trace[at..]);
    out
}

/// `callbridge replay --serve --speed 10`, killed when dropped.
struct Daemon {
    child: Child,
    base: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(dir: &Path, config: &Path, trace: &Path) -> Daemon {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let log = std::fs::File::create(dir.join("daemon.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_callbridge"))
        .args(["replay", "--serve", "--speed", "10", "--config"])
        .arg(config)
        .args(["--api-listen", &format!("127.0.0.1:{port}")])
        .arg(trace)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start callbridge");
    let daemon = Daemon { child, base: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("{}/healthz", daemon.base)).await.is_err() {
        assert!(Instant::now() < deadline, "the daemon's API did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon
}

async fn get_json(url: &str) -> Value {
    let r = reqwest::Client::new().get(url).bearer_auth(TOKEN).send().await.expect("GET");
    serde_json::from_str(&r.text().await.expect("body")).expect("JSON")
}

/// Opens the page, checks that it asks for the token, gives it, waits
/// until the stream is live, and starts recording every state each call
/// row shows.
async fn sign_in(b: &Browser, base: &str) {
    b.goto(&format!("{base}/ui")).await;
    let asked = b
        .wait_for(
            "the token form",
            Duration::from_secs(10),
            "return !document.querySelector('#login').hidden && document.querySelector('#app').hidden \
             && document.activeElement && document.activeElement.id === 'token'",
        )
        .await;
    assert_eq!(asked, true);
    // The policy let the page's own style through (its script runs: the form is up).
    let styled = b.eval("return getComputedStyle(document.querySelector('header.top')).display", json!([])).await;
    assert_eq!(styled, "flex", "the page's style was not applied (Content-Security-Policy?)");
    b.type_into("#token", TOKEN).await;
    b.keys("#token", "\u{E007}").await; // Enter submits
    b.wait_for(
        "the stream to be live",
        Duration::from_secs(10),
        "return document.querySelector('#status').dataset.state === 'live'",
    )
    .await;
    b.eval(
        "window.__seen = {};
         const record = () => { for (const r of document.querySelectorAll('#calls tbody tr')) {
           (window.__seen[r.dataset.callId] = window.__seen[r.dataset.callId] || []).push(r.dataset.state); } };
         new MutationObserver(record).observe(document.querySelector('#calls tbody'), { childList: true });
         record();",
        json!([]),
    )
    .await;
}

fn events_of_type(dir: &Path, t: &str) -> Vec<Value> {
    support::events::events_of(dir).into_iter().filter(|e| e["type"] == t).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_follows_a11_live_matches_the_indicators_and_switches_an_agent() {
    let Some(browser) = Browser::start("monitor_a11").await else { return };
    let browser = Arc::new(browser);
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("a11.ami");
    std::fs::write(&trace, with_lead_in(&support::trace::load("a11-concurrent-mix.ami"), 40)).expect("trace");
    let daemon = serve(dir.path(), &config(dir.path(), ""), &trace).await;
    let (b, base, dir_path) = (browser.clone(), daemon.base.clone(), dir.path().to_path_buf());
    browser
        .run(async move {
            sign_in(&b, &base).await;
            let early = b.eval("return document.querySelectorAll('#calls tbody tr').length", json!([])).await;
            assert_eq!(early, 0, "calls began before the page was ready: the lead-in is too short");

            // The README's picture of the page, taken while calls are live:
            // CALLBRIDGE_UPDATE_SCREENSHOT=1 cargo test --test monitor_ui
            if std::env::var_os("CALLBRIDGE_UPDATE_SCREENSHOT").is_some() {
                b.wait_for(
                    "live and ended calls together",
                    Duration::from_secs(30),
                    "return document.querySelectorAll('#calls tbody tr:not([data-state=\"ended\"])').length >= 4
                       && document.querySelectorAll('#calls tbody tr[data-state=\"ended\"]').length >= 2",
                )
                .await;
                let png = b.screenshot("monitor_readme.png").await;
                let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/monitor.png");
                std::fs::copy(png, docs).expect("docs/monitor.png");
            }

            // The 12 calls appear and end.
            b.wait_for(
                "12 ended calls on the page",
                Duration::from_secs(30),
                "return document.querySelectorAll('#calls tbody tr[data-state=\"ended\"]').length === 12",
            )
            .await;
            let seen = b.eval("return window.__seen", json!([])).await;
            let ended: Vec<String> = events_of_type(&dir_path, "call.ended")
                .iter()
                .map(|e| e["data"]["call"]["id"].as_str().unwrap_or("").to_string())
                .collect();
            assert_eq!(ended.len(), 12);
            for id in &ended {
                let states: Vec<&str> =
                    seen[id].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
                assert!(
                    states.iter().any(|s| ["started", "queued", "ringing", "talking"].contains(s)),
                    "call {id} never showed live: {states:?}"
                );
                assert_eq!(states.last(), Some(&"ended"), "call {id}: {states:?}");
            }
            let links = b
                .eval(
                    "return [...document.querySelectorAll('#calls tbody a')].every(a => a.href.startsWith('https://pbx.example/recordings/'))
                       && document.querySelectorAll('#calls tbody a').length",
                    json!([]),
                )
                .await;
            assert!(links.as_u64().unwrap_or(0) > 0, "ended calls link their recordings: {links}");

            // The support group's indicators, as the API has them.
            let api = get_json(&format!("{base}/v1/groups/support/indicators")).await;
            let sl = match api["service_level"].as_f64() {
                Some(x) => format!("{} %", (x * 100.0).round()),
                None => "—".to_string(),
            };
            let want = json!({
                "waiting_now": api["waiting_now"].to_string(),
                "talking_now": api["talking_now"].to_string(),
                "offered": api["offered"].to_string(),
                "answered": api["answered"].to_string(),
                "missed": api["missed"].to_string(),
                "average_wait_seconds": format!("{} s", api["average_wait_seconds"].as_f64().unwrap_or(-1.0).round()),
                "max_wait_seconds": format!("{} s", api["max_wait_seconds"]),
                "service_level": sl,
            });
            assert!(api["offered"].as_u64().unwrap_or(0) > 0, "{api}");
            let script = "const out = {}; for (const dd of document.querySelectorAll('[data-group=\"support\"] dd[data-indicator]'))
                            out[dd.dataset.indicator] = dd.textContent; delete out.missed_by_reason; return out;";
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let page = b.eval(script, json!([])).await;
                if page == want {
                    break;
                }
                assert!(Instant::now() < deadline, "the page shows {page}, the API {want}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let reasons = b
                .eval("return document.querySelector('[data-group=\"support\"] [data-indicator=\"missed_by_reason\"]').textContent", json!([]))
                .await;
            for (reason, n) in api["missed_by_reason"].as_object().expect("reasons") {
                if n.as_u64().unwrap_or(0) > 0 {
                    let shown = format!("{}: {n}", reason.replace('_', " "));
                    assert!(reasons.as_str().unwrap_or("").contains(&shown), "{reasons} lacks {shown}");
                }
            }

            // Switching an agent off: `agent.availability` from the API.
            b.click("button[data-toggle=\"maria\"]").await;
            support::events::wait_for("maria switched off", &dir_path, |ev| {
                ev.iter().any(|e| {
                    e["type"] == "agent.availability"
                        && e["data"]["agent"] == "maria"
                        && e["data"]["available"] == false
                        && e["data"]["source"] == "api"
                })
            })
            .await;
            b.wait_for(
                "the switch shown off",
                Duration::from_secs(10),
                "return document.querySelector('tr[data-agent=\"maria\"] [data-field=\"helpdesk_available\"]').textContent === 'off'
                   && document.querySelector('button[data-toggle=\"maria\"]').textContent === 'Switch on'",
            )
            .await;

            // The token is asked once per tab: a reload goes straight in.
            b.goto(&format!("{base}/ui")).await;
            b.wait_for(
                "the monitor without the token form",
                Duration::from_secs(10),
                "return document.querySelector('#login').hidden && !document.querySelector('#app').hidden
                   && document.querySelector('#status').dataset.state === 'live'",
            )
            .await;
            b.screenshot("monitor_a11.png").await;
        })
        .await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_call_is_highlighted_and_removed_through_its_button() {
    let Some(browser) = Browser::start("monitor_stuck").await else { return };
    let browser = Arc::new(browser);
    let dir = tempfile::tempdir().expect("tempdir");
    // a01 up to its hang-up: the call stays talking.
    let a01 = support::trace::load("a01-inbound-answered.ami");
    let cut = String::from_utf8_lossy(&a01).find("\r\n\r\nEvent: Hangup\r\n").expect("a01 hangs up") + 4;
    let trace = dir.path().join("a01-hanging.ami");
    std::fs::write(&trace, with_lead_in(&a01[..cut], 40)).expect("trace");
    let stuck = "[stuck]\ntalking_seconds = 1\nsilence_seconds = 1\ncheck_interval_seconds = 1\n";
    let daemon = serve(dir.path(), &config(dir.path(), stuck), &trace).await;
    let (b, base, dir_path) = (browser.clone(), daemon.base.clone(), dir.path().to_path_buf());
    browser
        .run(async move {
            sign_in(&b, &base).await;
            let id = b
                .wait_for(
                    "a stuck call highlighted with its button",
                    Duration::from_secs(30),
                    "const r = document.querySelector('#calls tbody tr.stuck');
                     return r && r.querySelector('button[data-remove]') && r.dataset.callId",
                )
                .await;
            let id = id.as_str().expect("call id").to_string();
            assert_eq!(events_of_type(&dir_path, "call.stuck").len(), 1);

            // Its time ticks on with no event coming (m:ss).
            let time =
                "const t = document.querySelector('#calls tbody tr.stuck td[data-started]').textContent.split(':');
                        return Number(t[0]) * 60 + Number(t[1]);";
            let before = b.eval(time, json!([])).await.as_u64().expect("m:ss");
            tokio::time::sleep(Duration::from_millis(2200)).await;
            let after = b.eval(time, json!([])).await.as_u64().expect("m:ss");
            assert!(
                (before + 2..=before + 3).contains(&after),
                "the elapsed time went from {before} s to {after} s in 2.2 s"
            );

            // Cancelling keeps the call.
            b.click("#calls tbody tr.stuck button[data-remove]").await;
            b.wait_for("the confirmation", Duration::from_secs(5), "return document.querySelector('#confirm').open")
                .await;
            b.click("#confirm-cancel").await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let live = get_json(&format!("{base}/v1/calls/{id}")).await;
            assert_eq!(live["state"], "talking", "cancelled, the call stays: {live}");

            // Confirmed, it is removed.
            b.click("#calls tbody tr.stuck button[data-remove]").await;
            b.wait_for("the confirmation", Duration::from_secs(5), "return document.querySelector('#confirm').open")
                .await;
            b.click("#confirm-remove").await;
            support::events::wait_for("the call removed", &dir_path, |ev| {
                ev.iter().any(|e| {
                    e["type"] == "call.ended"
                        && e["data"]["call"]["id"] == id.as_str()
                        && e["data"]["end_reason"] == "removed"
                })
            })
            .await;
            b.wait_for(
                "the row ended as removed",
                Duration::from_secs(10),
                "const r = document.querySelector('#calls tbody tr[data-state=\"ended\"]');
                 return r && !r.classList.contains('stuck') && r.textContent.includes('ended: removed')",
            )
            .await;
            b.screenshot("monitor_stuck.png").await;
        })
        .await;
    drop(daemon);
}
