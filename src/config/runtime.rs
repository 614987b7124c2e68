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
use crate::ami::CodecLimits;

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

/// The SIP connector's settings, when `[sip]` is configured.
pub fn sip_settings(config: &Config) -> Option<crate::sip::SipSettings> {
    use crate::sip::Transport;
    let sip = config.sip.as_ref()?;
    Some(crate::sip::SipSettings {
        bind: sip.bind.clone(),
        pbx: sip.pbx.clone(),
        transport: match sip.transport {
            super::SipTransport::Udp => Transport::Udp,
            super::SipTransport::Tcp => Transport::Tcp,
        },
        domain: sip.domain().to_string(),
        contact_host: sip.contact_host.clone(),
        username: sip.username.clone(),
        secret: sip.secret.clone(),
        expires_seconds: sip.expires_seconds,
        options_interval: sip.options_interval(),
        request_timeout: sip.request_timeout(),
        retry_max: sip.retry_max(),
        max_message_bytes: sip.max_message_bytes,
        offer_identity_wait: sip.offer_identity_wait(),
    })
}

/// What the SIP connector reports: the whole (reduced) call lifecycle
/// without `[pbx.ami]`, line states only when AMI reports the calls.
pub fn sip_mode(config: &Config) -> crate::sip::Mode {
    crate::sip::Mode::with_ami(config.pbx.ami.is_some())
}
