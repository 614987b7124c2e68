//! What the AMI client needs to know before it connects: where the PBX is,
//! how to log in, how long to wait, how much to accept.
//!
//! [`ClientSettings`] is a plain value: whoever starts the client builds it
//! (the daemon from its configuration file, in `config::runtime`; tests in
//! code). The client checks it when it starts ([`ClientSettings::validate`])
//! and refuses to run on a value it cannot honour.
//!
//! This module must never know how settings are written down (no file
//! format, no defaults of a file), never resolve the secret except in
//! [`ClientSettings::check`], and never show the secret.

use super::codec::CodecLimits;
use super::error::AmiError;
use super::frame::Frame;
use super::transport::{Transport, TransportError};
use crate::secret::SecretSource;
use std::path::PathBuf;
use std::time::Duration;

/// How the client proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMethod {
    /// `Action: Challenge` + `AuthType: MD5`: the secret never crosses the wire.
    #[default]
    Md5,
    /// `Action: Login` with `Secret:` in clear text.
    Plain,
}

/// Everything the AMI client needs, with durations as [`Duration`]s.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `host:port` of the Manager Interface.
    pub address: String,
    /// The `manager.conf` user.
    pub username: String,
    /// Its secret, resolved at every login (a rotated file is picked up on
    /// the next reconnect).
    pub secret: SecretSource,
    pub auth: AuthMethod,
    /// Connect with TLS.
    pub tls: bool,
    /// Name the PBX's certificate must carry (default: the host of `address`).
    pub tls_server_name: Option<String>,
    /// Extra PEM CA file to trust.
    pub tls_ca_file: Option<PathBuf>,
    /// Give up a connection attempt (TCP, TLS, banner) after this long.
    pub connect_timeout: Duration,
    /// Give up waiting for an action's reply (or a list's next item) after this long.
    pub action_timeout: Duration,
    /// Send `Ping` after this long without traffic.
    pub ping_interval: Duration,
    /// Cap of the reconnect backoff.
    pub reconnect_max: Duration,
    /// Frame bounds of the codec.
    pub limits: CodecLimits,
    /// Capacity the caller should give the events channel (full = the reader
    /// waits); the client itself only checks that it is not zero.
    pub event_queue_capacity: usize,
    /// Events the consumer has no use for, dropped before the events
    /// channel (the daemon: the `VarSet`s its normalizer ignores). `None`:
    /// every event goes through (`record` captures them all).
    pub skip: Option<FrameFilter>,
}

/// Which events the client need not pass on (see [`ClientSettings::skip`]).
#[derive(Clone)]
pub struct FrameFilter(std::sync::Arc<dyn Fn(&Frame) -> bool + Send + Sync>);

impl FrameFilter {
    /// `skip` returns true for the events to drop.
    pub fn new(skip: impl Fn(&Frame) -> bool + Send + Sync + 'static) -> FrameFilter {
        FrameFilter(std::sync::Arc::new(skip))
    }

    pub fn skips(&self, frame: &Frame) -> bool {
        (self.0)(frame)
    }
}

impl std::fmt::Debug for FrameFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameFilter")
    }
}

impl ClientSettings {
    /// Checks what the client cannot run with: an empty address, a zero
    /// duration, a zero bound. The error names the setting as operators know
    /// it (`reconnect_max_seconds`), whichever way the settings were built.
    pub fn validate(&self) -> Result<(), AmiError> {
        let invalid = |field: &'static str, reason: &str| AmiError::InvalidSetting { field, reason: reason.into() };
        if self.address.trim().is_empty() {
            return Err(invalid("address", "must not be empty"));
        }
        let durations = [
            ("connect_timeout_seconds", self.connect_timeout),
            ("action_timeout_seconds", self.action_timeout),
            ("ping_interval_seconds", self.ping_interval),
            ("reconnect_max_seconds", self.reconnect_max),
        ];
        let bounds = [("max_frame_bytes", self.limits.max_frame_bytes), ("max_headers", self.limits.max_headers)];
        if self.event_queue_capacity == 0 {
            return Err(invalid("event_queue_capacity", "must be greater than zero"));
        }
        if let Some((field, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(invalid(field, "must be a positive number of seconds"));
        }
        if let Some((field, _)) = bounds.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(field, "must be greater than zero"));
        }
        Ok(())
    }

    /// Everything a connection would need, without connecting (for
    /// `check-config`): valid settings, a usable TLS setup, a readable
    /// secret (read, never shown).
    pub fn check(&self) -> Result<(), AmiError> {
        self.validate()?;
        self.transport()?;
        self.secret.resolve().map_err(AmiError::Secret)?;
        Ok(())
    }

    /// The connector for [`ClientSettings::address`] (TCP or TLS).
    pub(super) fn transport(&self) -> Result<Transport, TransportError> {
        Transport::new(&self.address, self.tls, self.tls_server_name.as_deref(), self.tls_ca_file.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ClientSettings {
        ClientSettings {
            address: "127.0.0.1:5038".into(),
            username: "cb".into(),
            secret: SecretSource { secret: Some("x".into()), ..SecretSource::default() },
            auth: AuthMethod::Md5,
            tls: false,
            tls_server_name: None,
            tls_ca_file: None,
            connect_timeout: Duration::from_secs(5),
            action_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            reconnect_max: Duration::from_secs(30),
            limits: CodecLimits::default(),
            event_queue_capacity: 8192,
            skip: None,
        }
    }

    fn field_of(r: Result<(), AmiError>) -> Option<&'static str> {
        match r {
            Err(AmiError::InvalidSetting { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn settings_reject_zero_durations_and_sizes() {
        assert!(settings().validate().is_ok());
        assert!(settings().check().is_ok());
        let mut s = settings();
        s.ping_interval = Duration::ZERO;
        assert_eq!(field_of(s.validate()), Some("ping_interval_seconds"));
        let mut s = settings();
        s.reconnect_max = Duration::ZERO;
        assert_eq!(field_of(s.validate()), Some("reconnect_max_seconds"));
        let mut s = settings();
        s.event_queue_capacity = 0;
        assert_eq!(field_of(s.validate()), Some("event_queue_capacity"));
        let mut s = settings();
        s.limits.max_headers = 0;
        assert_eq!(field_of(s.validate()), Some("max_headers"));
        let mut s = settings();
        s.address = "  ".into();
        assert_eq!(field_of(s.validate()), Some("address"));
    }

    #[test]
    fn check_rejects_a_bad_tls_name_and_a_missing_secret() {
        let mut s = settings();
        s.tls = true;
        s.tls_server_name = Some("not a host name!".into());
        assert!(matches!(s.check(), Err(ref e @ AmiError::Transport(_)) if e.is_fatal()));
        let mut s = settings();
        s.secret = SecretSource::default();
        assert!(matches!(s.check(), Err(ref e @ AmiError::Secret(_)) if e.is_fatal()));
    }
}
