//! Shared helpers for integration tests: a scripted AMI server on loopback,
//! a test-side wrapper around the AMI client, and fixture-trace helpers.
//!
//! - [`server::AmiServer`] listens on `127.0.0.1:0` (plain TCP or TLS with the
//!   test CA in `tests/support/tls/`), greets with a banner, performs
//!   `Challenge`/`Login` against a configured secret (MD5 or plaintext, and
//!   rejects a wrong one like Asterisk does: error reply, then close), answers
//!   every other action from a script (per-action-name handlers returning
//!   [`server::Reply`], with sensible defaults for `Ping`, `CoreShowChannels`,
//!   `QueueStatus`, `Status` and `Logoff`), records every action received, and
//!   lets the test push raw bytes, whole frames or a fixture trace to the
//!   client and cut the connection at any byte offset.
//! - [`client::TestClient`] spawns `callbridge::ami::connection::spawn`
//!   against a server and reads what it sends into the pipeline.
//! - [`events`] reads what a daemon under test delivered to its JSON-lines
//!   sink and waits for it.
//! - [`browser::Browser`] drives headless Chromium through chromedriver.
//! - [`sse::SseReader`] reads `GET /v1/events` as Server-Sent Events.
//! - [`trace`] loads `fixtures/ami/*.ami` and strips a trace's own banner and
//!   login reply so its events can be streamed after a live login.
//!
//! Use from a test file with `mod support;`. Every helper that waits has a
//! deadline and panics with a message saying what it waited for, so a broken
//! test fails fast instead of hanging.
//!
//! These helpers must never touch anything but loopback addresses.

#![allow(dead_code)] // each test file uses a different subset

pub mod browser;
pub mod client;
pub mod events;
pub mod openapi;
pub mod server;
pub mod sse;
pub mod trace;

use std::time::Duration;

/// The lab's three agents (`../shared/fixtures/README.md`) as configuration
/// text, for tests that write their own configuration around them.
pub const LAB_AGENTS: &str = r#"[[agents]]
id = "maria"
name = "Maria Silva"
extension = "2000"
[[agents]]
id = "joao"
name = "Joao Souza"
extension = "2001"
[[agents]]
id = "ana"
name = "Ana Costa"
extension = "2002""#;

/// Default deadline of the waiting helpers.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` every few milliseconds until it holds; panics after `WAIT`
/// naming `what`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
