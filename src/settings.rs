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

use crate::ami::CodecLimits;
use crate::config::Config;
use crate::config::SipTransport;
use crate::directory::{Agent, Directory, Group};
use crate::ids::{AgentId, GroupId};
use crate::normalize::{AlwaysOpen, Normalizer, Options, Rules, StuckLimits};
use crate::routing::{Calendar, Routing, RoutingError};
use crate::sip::{Mode as SipMode, SipSettings, Transport};
use std::sync::Arc;

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
pub fn normalizer_options(config: &Config) -> Options {
    Options {
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
    Ok(Routing::new(dir, groups))
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
pub fn normalizer_parts(config: &Config) -> (Arc<Directory>, Arc<dyn Rules>, Options) {
    let dir = Arc::new(directory(config));
    (dir.clone(), rules(config, dir), normalizer_options(config))
}

/// The normalizer a configuration describes.
pub fn normalizer(config: &Config) -> Normalizer {
    let (dir, rules, opts) = normalizer_parts(config);
    Normalizer::new(dir, rules, opts)
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
