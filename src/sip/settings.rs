//! What the SIP connector needs to run, as plain values: addresses, the
//! account, timers as [`Duration`]s and bounds.
//!
//! The connector never reads the configuration file; `config/runtime.rs`
//! builds these settings from a validated `[sip]` section, and tests build
//! them directly. Nothing here is checked again: values come validated.

use crate::secret::SecretSource;
use std::time::Duration;

/// How SIP messages travel between callbridge and the PBX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// One UDP socket; requests are retransmitted (RFC 3261 timer E).
    #[default]
    Udp,
    /// One outgoing TCP connection to the PBX, plus a listener on `bind`
    /// for PBXs that open their own connection to deliver NOTIFYs.
    Tcp,
}

impl Transport {
    /// The transport token of `Via` and URIs.
    pub fn token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }
}

/// The SIP connector's settings.
#[derive(Debug, Clone)]
pub struct SipSettings {
    /// Local address of the SIP socket (`ip:port`; port 0 picks one).
    pub bind: String,
    /// The PBX's SIP address, `host:port`.
    pub pbx: String,
    pub transport: Transport,
    /// Host part of the subscribed URIs (`sip:<extension>@<domain>`).
    pub domain: String,
    /// Address (`host` or `host:port`) written in `Via` and `Contact`;
    /// `None`: the local address the system uses to reach the PBX.
    pub contact_host: Option<String>,
    /// The SIP account callbridge authenticates as, also the user part of
    /// `From` and `Contact`.
    pub username: String,
    /// The digest secret, resolved when the connector starts.
    pub secret: SecretSource,
    /// Subscription duration asked for (`Expires`), in seconds.
    pub expires_seconds: u32,
    /// `OPTIONS` keepalive period; `None`: no keepalive (reachability then
    /// means "at least one subscription is active").
    pub options_interval: Option<Duration>,
    /// A request without a final response after this long has failed.
    pub request_timeout: Duration,
    /// Cap of the re-subscription backoff.
    pub retry_max: Duration,
    /// Largest SIP message accepted.
    pub max_message_bytes: usize,
    /// SIP-only mode: how long a ringing phone's `call.offered` waits for
    /// the caller's identity.
    pub offer_identity_wait: Duration,
}
