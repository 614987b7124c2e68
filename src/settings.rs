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

use crate::config::Config;
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
