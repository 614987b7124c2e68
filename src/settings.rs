//! The one translation from the validated configuration file to the plain
//! settings each component owns.
//!
//! Components (`ami`, `sip`, `normalize`, `directory`, `routing`, `outbox`,
//! `sink`, …) never see the TOML file: each takes a settings value of its
//! own, and this module is the only place that builds one from a
//! [`Config`]. Dependencies point one way: from here to `config` and to the
//! components; `config` imports no component, and a component that
//! imported `crate::config` while this module builds its settings would
//! close a cycle (the module-graph test in `tests/architecture.rs` fails on
//! it).
//!
//! Everything here runs after [`Config::validate`] accepted the file, so
//! the conversions do not fail on values validation already checked.

use crate::ami::{AuthMethod, ClientSettings, CodecLimits};
use crate::api::server::ServeLimits;
use crate::config::Config;
use crate::config::SipTransport;
use crate::config::{AmiAuth, AmiConfig, ApiConfig};
use crate::directory::{Agent, Directory, Group};
use crate::ids::{AgentId, GroupId};
use crate::normalize::{AlwaysOpen, Normalizer, Rules, SiteOptions, StuckLimits};
use crate::routing::lookup::{LookupForm, NumberRules};
use crate::routing::{Calendar, CallerLookups, LookupSettings, Redirects, Routing, RoutingError};
use crate::sip::{Mode as SipMode, SipSettings, Transport};
use std::path::PathBuf;
use std::sync::Arc;
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

/// Who is who: the configured agents with an extension, and the groups.
pub fn directory(config: &Config) -> Directory {
    let agents = config.agents.iter().filter_map(|a| {
        Some(Agent {
            id: AgentId::new(&a.id),
            name: a.name.clone(),
            extension: a.extension.clone()?,
            groups: Vec::new(),
        })
    });
    let groups = config.groups.iter().map(|g| Group {
        id: GroupId::new(&g.id),
        queue: g.queue.clone(),
        agents: g.agents.iter().map(|a| AgentId::new(a)).collect(),
    });
    Directory::new(agents, groups)
}

/// The normalizer's options: ticket variable, recording links, dial prefix.
pub fn normalizer_options(config: &Config) -> SiteOptions {
    SiteOptions {
        ticket_variable: config.pbx.ticket_variable.clone(),
        recording_url_base: config.recordings.url_base.clone(),
        outbound_prefix: config.outbound.prefix.clone(),
    }
}

/// The routing rules (calendars, overflow) over a fresh directory.
///
/// The configuration is checked in full first (the same checks as
/// loading), so a configuration assembled in code gets its overflow cycles
/// and unusable calendars refused here too, each named by field.
pub fn routing(config: &Config) -> Result<Routing, RoutingError> {
    routing_with(config, Arc::new(directory(config)))
}

/// As [`routing`], sharing a directory built from the same configuration.
pub fn routing_with(config: &Config, dir: Arc<Directory>) -> Result<Routing, RoutingError> {
    let mut problems = config.validate();
    if !problems.is_empty() {
        return Err(RoutingError { problems });
    }
    let mut groups = Vec::with_capacity(config.groups.len());
    for (i, g) in config.groups.iter().enumerate() {
        match Calendar::from_group(i, g, &config.holidays) {
            Ok(calendar) => {
                groups.push((GroupId::new(&g.id), calendar, g.overflow.iter().map(|o| GroupId::new(o)).collect()))
            }
            Err(e) => problems.extend(e.into_iter().map(|e| e.to_string())),
        }
    }
    if !problems.is_empty() {
        return Err(RoutingError { problems });
    }
    let redirects = config.groups.iter().map(|g| {
        let redirects = Redirects {
            unknown_to: g.redirect_unknown_to.as_deref().map(GroupId::new),
            inactive_to: g.redirect_inactive_to.as_deref().map(GroupId::new),
        };
        (GroupId::new(&g.id), redirects)
    });
    Ok(Routing::new(dir, groups).with_redirects(redirects))
}

/// The caller lookup's settings for `[caller_lookup]` (numbers normalised
/// with `[outbound]`'s country code and international prefix, as for
/// click-to-call); `Ok(None)` without the section. Resolves the token and
/// reads `ca_file`; the error names the field.
pub fn caller_lookup(config: &Config) -> Result<Option<LookupSettings>, String> {
    use crate::config::CallerLookupKind;
    let Some(c) = &config.caller_lookup else { return Ok(None) };
    let token = if c.secret.is_set() {
        Some(c.secret.resolve().map_err(|e| format!("caller_lookup.{}: {e}", c.secret.field()))?)
    } else {
        None
    };
    let roots = match &c.ca_file {
        Some(path) => crate::sink::webhook::load_ca_file(path).map_err(|e| format!("caller_lookup.{e}"))?,
        None => Vec::new(),
    };
    let form = match c.kind {
        CallerLookupKind::Generic => LookupForm::Generic {
            url: c.url.clone(),
            found_pointer: c.found_pointer.clone().unwrap_or_else(|| "/found".into()),
            active_pointer: c.active_pointer.clone().unwrap_or_else(|| "/active".into()),
            contact_id_pointer: c.contact_id_pointer.clone().unwrap_or_else(|| "/contact_id".into()),
        },
        CallerLookupKind::Zammad => LookupForm::Zammad { base_url: c.url.clone() },
    };
    Ok(Some(LookupSettings {
        form,
        token,
        timeout: Duration::from_millis(c.timeout_ms.max(1)),
        cache_ttl: Duration::from_secs(c.cache_ttl_seconds),
        cache_max_entries: c.cache_max_entries.max(1),
        max_concurrent: c.max_concurrent.max(1),
        numbers: NumberRules {
            country_code: config.outbound.country_code.clone(),
            international_prefix: config.outbound.international_prefix.clone(),
        },
        roots,
    }))
}

/// The caller lookup client of `[caller_lookup]`, if configured.
pub fn caller_lookups(config: &Config) -> Result<Option<Arc<CallerLookups>>, String> {
    match caller_lookup(config)? {
        Some(s) => CallerLookups::new(s).map(|l| Some(Arc::new(l))).map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

/// The business rules (hours, holidays) the normalizer consults.
///
/// The configuration was validated when it was loaded, so building the
/// rules does not fail; if it ever did, every group is treated as open and
/// the problem is logged.
pub fn rules(config: &Config, dir: Arc<Directory>) -> Arc<dyn Rules> {
    match routing_with(config, dir) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::error!(problems = %e, "cannot build the routing rules; treating every group as open");
            Arc::new(AlwaysOpen)
        }
    }
}

/// What a normalizer for `config` is made of: its directory, business
/// rules and options (a new normalizer, or a reload of a running one).
pub fn normalizer_parts(config: &Config) -> (Arc<Directory>, Arc<dyn Rules>, SiteOptions) {
    let dir = Arc::new(directory(config));
    (dir.clone(), rules(config, dir), normalizer_options(config))
}

/// The normalizer a configuration describes.
pub fn normalizer(config: &Config) -> Normalizer {
    let (dir, rules, opts) = normalizer_parts(config);
    Normalizer::new(dir, rules, opts)
}

/// The AMI reader's filter of the frames the normalizer ignores.
pub fn ignored_frames(config: &Config) -> crate::normalize::IgnoredFrames {
    crate::normalize::IgnoredFrames::new(&config.pbx.ticket_variable)
}

/// The stuck-call limits of `[stuck]`.
pub fn stuck_limits(config: &Config) -> StuckLimits {
    let s = &config.stuck;
    StuckLimits {
        started_seconds: s.started_seconds,
        queued_seconds: s.queued_seconds,
        ringing_seconds: s.ringing_seconds,
        talking_seconds: s.talking_seconds,
        silence_seconds: s.silence_seconds,
    }
}

/// The SIP connector's settings, when `[sip]` is configured.
pub fn sip_settings(config: &Config) -> Option<SipSettings> {
    let sip = config.sip.as_ref()?;
    Some(SipSettings {
        bind: sip.bind.clone(),
        pbx: sip.pbx.clone(),
        transport: match sip.transport {
            SipTransport::Udp => Transport::Udp,
            SipTransport::Tcp => Transport::Tcp,
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
pub fn sip_mode(config: &Config) -> SipMode {
    SipMode::with_ami(config.pbx.ami.is_some())
}

/// The limits `[api]` sets for each of its listeners.
pub fn api_serve_limits(api: &ApiConfig) -> ServeLimits {
    // The schema walk refuses non-finite or non-positive seconds; a value
    // that still does not fit (a configuration built in code) falls back to
    // the default.
    let seconds = |s: f64, default: Duration| Duration::try_from_secs_f64(s).unwrap_or(default);
    let d = ServeLimits::default();
    ServeLimits {
        max_connections: api.max_connections.max(1),
        header_read_timeout: seconds(api.header_read_timeout_seconds, d.header_read_timeout),
        idle_timeout: seconds(api.idle_timeout_seconds, d.idle_timeout),
    }
}

/// The live event feed (`[api] events_window`). The pipeline publishes a
/// whole batch at once: a window of less than two batches would drop a
/// reader that keeps up.
pub fn feed(config: &Config) -> crate::feed::FeedSettings {
    let window = config.api.as_ref().map_or(crate::feed::DEFAULT_WINDOW, |a| a.events_window);
    let floor = config.outbox.max_batch_events.max(1).saturating_mul(2);
    crate::feed::FeedSettings { pbx: config.pbx.name.clone(), window: window.max(floor) }
}

/// The hot-standby controller's settings (`[ha]`), when paired.
pub fn ha(config: &Config) -> Option<crate::ha::HaSettings> {
    let ha = config.ha.as_ref()?;
    Some(crate::ha::HaSettings {
        config: ha.clone(),
        key: ha.key(config).to_string(),
        node: ha.node_name(),
        pbx: config.pbx.name.clone(),
    })
}

/// What one API request may take (`[api]`).
pub fn api_request_limits(api: &ApiConfig) -> crate::api::RequestLimits {
    let d = crate::api::RequestLimits::default();
    crate::api::RequestLimits {
        timeout: Duration::try_from_secs_f64(api.request_timeout_seconds).unwrap_or(d.timeout),
        max_body_bytes: api.max_body_bytes.max(1),
    }
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
        skip: None,
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
