//! The one translation from the validated configuration file to the plain
//! settings each component owns.
//!
//! Components (`ami`, `sip`, `normalize`, `directory`, `routing`, `outbox`,
//! `sink`, …) never see the TOML file: each takes a settings value of its
//! own, and this module is the only place that builds one from a
//! [`Config`]. The dependency points one way, from here to the components;
//! a component that imported `crate::config` would close a cycle (the
//! module-graph test in `tests/architecture.rs` fails on it).
//!
//! Everything here runs after [`Config::validate`] accepted the file, so
//! the conversions do not fail on values validation already checked.

use super::Config;
use super::{AmiAuth, AmiConfig};
use crate::ami::CodecLimits;
use crate::ami::{AuthMethod, ClientSettings};
use std::path::PathBuf;
use std::time::Duration;

/// The codec bounds of `[pbx.ami]` (the defaults without it): the same for
/// a live connection, a recorded trace and a replay.
pub fn codec_limits(config: &Config) -> CodecLimits {
    config
        .pbx
        .ami
        .as_ref()
        .map(|a| CodecLimits { max_frame_bytes: a.max_frame_bytes, max_headers: a.max_headers })
        .unwrap_or_default()
}

/// The AMI client's settings for `[pbx.ami]`.
///
/// Infallible: validation accepted every duration as a finite number of
/// seconds > 0. One that validation never saw (a configuration built in
/// code) and that is not a valid duration becomes zero, which the client
/// refuses at start, naming the setting.
pub fn ami_client(c: &AmiConfig) -> ClientSettings {
    let seconds = |v: f64| Duration::try_from_secs_f64(v).unwrap_or(Duration::ZERO);
    ClientSettings {
        address: c.address.clone(),
        username: c.username.clone(),
        secret: c.secret.clone(),
        auth: match c.auth {
            AmiAuth::Md5 => AuthMethod::Md5,
            AmiAuth::Plain => AuthMethod::Plain,
        },
        tls: c.tls,
        tls_server_name: c.tls_server_name.clone(),
        tls_ca_file: c.tls_ca_file.as_ref().map(PathBuf::from),
        connect_timeout: seconds(c.connect_timeout_seconds),
        action_timeout: seconds(c.action_timeout_seconds),
        ping_interval: seconds(c.ping_interval_seconds),
        reconnect_max: seconds(c.reconnect_max_seconds),
        limits: CodecLimits { max_frame_bytes: c.max_frame_bytes, max_headers: c.max_headers },
        event_queue_capacity: c.event_queue_capacity,
    }
}

/// [`ami_client`], for callers that take `impl Into<ClientSettings>`.
impl From<AmiConfig> for ClientSettings {
    fn from(c: AmiConfig) -> Self {
        ami_client(&c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ami::AmiError;

    fn ami(extra: &str) -> AmiConfig {
        let text = format!("address = \"pbx.example:5039\"\nusername = \"cb\"\nsecret = \"x\"\n{extra}");
        toml::from_str(&text).expect("valid [pbx.ami]")
    }

    #[test]
    fn ami_client_carries_every_setting_over() {
        let c = ami("auth = \"plain\"\ntls = true\ntls_ca_file = \"/etc/ca.pem\"\naction_timeout_seconds = 0.25\nmax_headers = 64\nevent_queue_capacity = 16");
        let s = ami_client(&c);
        assert_eq!((s.address.as_str(), s.username.as_str()), ("pbx.example:5039", "cb"));
        assert_eq!(s.secret.secret.as_deref(), Some("x"));
        assert_eq!(s.auth, AuthMethod::Plain);
        assert!(s.tls);
        assert_eq!(s.tls_ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(s.action_timeout, Duration::from_millis(250));
        assert_eq!(s.connect_timeout, Duration::from_secs(5));
        assert_eq!((s.limits.max_frame_bytes, s.limits.max_headers), (1 << 20, 64));
        assert_eq!(s.event_queue_capacity, 16);
        assert_eq!(ami_client(&ami("")).auth, AuthMethod::Md5);
        assert!(ami_client(&ami("")).validate().is_ok());
    }

    #[test]
    fn durations_validation_never_saw_are_refused_by_name() {
        for (field, value) in
            [("ping_interval_seconds", -1.0), ("reconnect_max_seconds", f64::NAN), ("connect_timeout_seconds", 0.0)]
        {
            let mut c = ami("");
            match field {
                "ping_interval_seconds" => c.ping_interval_seconds = value,
                "reconnect_max_seconds" => c.reconnect_max_seconds = value,
                _ => c.connect_timeout_seconds = value,
            }
            let r = ClientSettings::from(c).validate();
            assert!(matches!(r, Err(AmiError::InvalidSetting { field: f, .. }) if f == field), "{field}: {r:?}");
        }
    }
}
