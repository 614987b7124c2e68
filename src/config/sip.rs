//! The `[sip]` section of the configuration file: where the SIP user agent
//! binds, which PBX it talks to, how it authenticates and its timers and
//! bounds.
//!
//! Field doc comments are the user documentation of the keys. This is the
//! file schema only: the SIP connector never sees it, it takes the plain
//! [`crate::sip::SipSettings`] that `runtime.rs` builds from it.
//! [`SipConfig::validate`] holds the range checks the key walk
//! (`schema.rs`) does not express; [`super::Config::parse`] runs it once
//! the walk found nothing.
//!
//! This module must never open sockets, resolve names or read secrets:
//! secrets are resolved only when the agent starts (validation checks that
//! one is set).

use crate::secret::SecretSource;
use serde::Deserialize;
use std::time::Duration;

/// How SIP messages travel between callbridge and the PBX.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SipTransport {
    /// One UDP socket; requests are retransmitted (RFC 3261 timer E).
    #[default]
    Udp,
    /// One outgoing TCP connection to the PBX, plus a listener on `bind`
    /// for PBXs that open their own connection to deliver NOTIFYs.
    Tcp,
}

/// `[sip]`: dialog-event subscriptions (RFC 4235) to every agent's extension.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SipConfig {
    /// Local address of the SIP socket (`0.0.0.0:5065`; port 0 picks one).
    #[serde(default = "default_bind")]
    pub bind: String,
    /// The PBX's SIP address, `host:port` (`127.0.0.1:5060`).
    pub pbx: String,
    /// `udp` (default) or `tcp`.
    #[serde(default)]
    pub transport: SipTransport,
    /// Host part of the subscribed URIs (`sip:<extension>@<domain>`);
    /// default: the host part of `pbx`.
    #[serde(default)]
    pub domain: Option<String>,
    /// Address (`host` or `host:port`) written in `Via` and `Contact`, for a
    /// callbridge behind NAT or bound to `0.0.0.0`; default: the local
    /// address the system uses to reach the PBX.
    #[serde(default)]
    pub contact_host: Option<String>,
    /// The SIP account callbridge authenticates as (the PBX's subscriber
    /// peer), also the user part of `From` and `Contact`.
    pub username: String,
    /// Digest authentication secret: `secret`, `secret_file` or `secret_env`.
    #[serde(flatten)]
    pub secret: SecretSource,
    /// Subscription duration asked for (`Expires`); refreshed at 85 % of
    /// what the PBX grants.
    #[serde(default = "default_expires")]
    pub expires_seconds: u32,
    /// `OPTIONS` keepalive period (reachability and round-trip time); 0
    /// turns the keepalive off, and reachability then means "at least one
    /// subscription is active" (for PBXs that refuse OPTIONS).
    #[serde(default = "default_options_interval")]
    pub options_interval_seconds: f64,
    /// A request without a final response after this long has failed
    /// (UDP requests are retransmitted meanwhile).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_seconds: f64,
    /// Cap of the re-subscription backoff (1 s, 2 s, 4 s… with jitter).
    #[serde(default = "default_retry_max")]
    pub retry_max_seconds: f64,
    /// Largest SIP message accepted; larger ones are counted and dropped.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// SIP-only mode: how long an agent's ringing phone may wait for the
    /// caller's identity (some PBXs send it in a second NOTIFY) before
    /// `call.offered` goes out without it.
    #[serde(default = "default_offer_identity_wait")]
    pub offer_identity_wait_seconds: f64,
}

fn default_bind() -> String {
    "0.0.0.0:5065".to_string()
}
fn default_expires() -> u32 {
    600
}
fn default_options_interval() -> f64 {
    30.0
}
fn default_request_timeout() -> f64 {
    10.0
}
fn default_retry_max() -> f64 {
    60.0
}
fn default_max_message_bytes() -> usize {
    65_535
}
fn default_offer_identity_wait() -> f64 {
    0.5
}

fn seconds(value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or(Duration::ZERO)
}

impl SipConfig {
    /// Every problem of this section, each naming its key (`sip.<key>`).
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.pbx.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()) {
            problems.push(format!("sip.pbx: {:?} is not host:port", self.pbx));
        }
        if self.bind.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!("sip.bind: {:?} is not an ip:port socket address", self.bind));
        }
        if self.username.trim().is_empty() {
            problems.push("sip.username: must not be empty".to_string());
        }
        if !self.secret.is_set() {
            problems.push("sip.secret: set one of secret, secret_file, secret_env".to_string());
        }
        if self.expires_seconds < 60 {
            problems.push(format!("sip.expires_seconds: {} is below 60", self.expires_seconds));
        }
        let options = self.options_interval_seconds;
        if !options.is_finite() || (options != 0.0 && !(1.0..=86_400.0).contains(&options)) {
            problems.push(format!("sip.options_interval_seconds: {options} is neither 0 (off) nor within 1..86400"));
        }
        for (key, value, min) in [
            ("request_timeout_seconds", self.request_timeout_seconds, 0.5),
            ("retry_max_seconds", self.retry_max_seconds, 1.0),
            ("offer_identity_wait_seconds", self.offer_identity_wait_seconds, 0.0),
        ] {
            if !value.is_finite() || value < min || value > 86_400.0 {
                problems.push(format!("sip.{key}: {value} is outside {min}..86400"));
            }
        }
        if !(1024..=1 << 20).contains(&self.max_message_bytes) {
            problems.push(format!("sip.max_message_bytes: {} is outside 1024..1048576", self.max_message_bytes));
        }
        problems
    }

    /// The host part of subscribed URIs.
    pub fn domain(&self) -> &str {
        match &self.domain {
            Some(d) => d,
            None => self.pbx.rsplit_once(':').map_or(self.pbx.as_str(), |(host, _)| host),
        }
    }

    /// `None` when the keepalive is off.
    pub fn options_interval(&self) -> Option<Duration> {
        (self.options_interval_seconds > 0.0).then(|| seconds(self.options_interval_seconds))
    }

    pub fn request_timeout(&self) -> Duration {
        seconds(self.request_timeout_seconds)
    }

    pub fn retry_max(&self) -> Duration {
        seconds(self.retry_max_seconds)
    }

    pub fn offer_identity_wait(&self) -> Duration {
        seconds(self.offer_identity_wait_seconds)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::string_slice)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SipConfig, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_and_secret_sources() {
        let c = parse("pbx = \"10.0.0.5:5060\"\nusername = \"callbridge\"\nsecret_env = \"SIP_SECRET\"\n").unwrap();
        assert_eq!(c.bind, "0.0.0.0:5065");
        assert_eq!(c.transport, SipTransport::Udp);
        assert_eq!(c.domain(), "10.0.0.5");
        assert_eq!(c.expires_seconds, 600);
        assert_eq!(c.secret.secret_env.as_deref(), Some("SIP_SECRET"));
        assert!(c.validate().is_empty(), "{:?}", c.validate());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = parse("pbx = \"a:1\"\nusername = \"u\"\nsecret = \"s\"\nexpiry = 5\n").unwrap_err();
        assert!(e.to_string().contains("expiry"), "{e}");
    }

    #[test]
    fn every_problem_is_named() {
        let c = parse(
            "pbx = \"nohost\"\nbind = \"x\"\nusername = \"\"\ntransport = \"tcp\"\nexpires_seconds = 5\n\
             options_interval_seconds = 0.5\nmax_message_bytes = 10\n",
        )
        .unwrap();
        let p = c.validate().join("\n");
        for key in [
            "sip.pbx",
            "sip.bind",
            "sip.username",
            "sip.secret",
            "sip.expires_seconds",
            "sip.options_interval_seconds",
            "sip.max_message_bytes",
        ] {
            assert!(p.contains(key), "{key} missing from {p}");
        }
    }

    fn file(sip: &str) -> String {
        format!("[pbx]\nname = \"lab\"\n\n[sip]\npbx = \"10.0.0.5:5060\"\nusername = \"cb\"\nsecret = \"s\"\n{sip}")
    }

    #[test]
    fn ranges_the_key_walk_does_not_express_are_refused_when_loading() {
        let e = crate::config::Config::parse(&file("retry_max_seconds = 0.5\nmax_message_bytes = 2000000\n"), "t")
            .unwrap_err();
        assert_eq!(
            e.problems,
            [
                "sip.retry_max_seconds: 0.5 is outside 1..86400",
                "sip.max_message_bytes: 2000000 is outside 1024..1048576"
            ]
        );
        let mut ok = crate::config::Config::parse(&file(""), "t").unwrap();
        assert!(ok.validate().is_empty());
        if let Some(sip) = ok.sip.as_mut() {
            sip.options_interval_seconds = 0.25;
        }
        assert_eq!(ok.validate(), ["sip.options_interval_seconds: 0.25 is neither 0 (off) nor within 1..86400"]);
    }

    #[test]
    fn runtime_settings_carry_durations_and_the_default_domain() {
        use crate::settings::{sip_mode, sip_settings};
        let c = crate::config::Config::parse(
            &file("transport = \"tcp\"\noptions_interval_seconds = 0\nrequest_timeout_seconds = 2.5\n"),
            "t",
        )
        .unwrap();
        let s = sip_settings(&c).unwrap();
        assert_eq!(s.domain, "10.0.0.5");
        assert_eq!(s.transport, crate::sip::Transport::Tcp);
        assert_eq!(s.options_interval, None);
        assert_eq!(s.request_timeout, Duration::from_millis(2500));
        assert_eq!(s.retry_max, Duration::from_secs(60));
        assert_eq!(s.offer_identity_wait, Duration::from_millis(500));
        assert_eq!((s.expires_seconds, s.max_message_bytes), (600, 65_535));
        assert_eq!(s.secret.resolve().as_deref(), Ok("s"));
        assert_eq!(sip_mode(&c), crate::sip::Mode::SipOnly);
        let c = crate::config::Config::parse(&file("domain = \"pbx.example\"\noptions_interval_seconds = 5\n"), "t")
            .unwrap();
        let s = sip_settings(&c).unwrap();
        assert_eq!((s.domain.as_str(), s.options_interval), ("pbx.example", Some(Duration::from_secs(5))));
        assert!(sip_settings(&crate::config::Config::parse("[pbx]\nname = \"lab\"\n", "t").unwrap()).is_none());
    }
}
