//! The systemd notify protocol (`Type=notify`): `READY=1` once the AMI login
//! succeeded and the outbox is open, `WATCHDOG=1` from the main loop,
//! `STATUS=` lines for `systemctl status`, `STOPPING=1` on shutdown.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op. A failure
//! to notify is logged and otherwise ignored: it must never stop the daemon.

use sd_notify::NotifyState;
use std::time::Duration;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The service is up: AMI logged in (or replaying), outbox open.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A one-line status for `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Start-up is waiting (for room on the disk): a status line, and the
/// start timeout extended by `extend` so systemd does not kill a start
/// that waits on purpose.
pub fn waiting(status: &str, extend: Duration) {
    let usec = u32::try_from(extend.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::Status(status), NotifyState::ExtendTimeoutUsec(usec)]);
}

/// The main loop is alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// A reload started (SIGHUP) / finished.
pub fn reloading() {
    send(&[NotifyState::Reloading]);
}

/// Shutdown started.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec=`, or `None` when
/// the watchdog is off.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}
