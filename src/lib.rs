//! callbridge: turns an on-premises PBX's call signalling into the call
//! lifecycle a helpdesk needs, and delivers it durably.
//!
//! Data flows one way:
//!
//! ```text
//! sources ──► normalizer ──► outbox ──────────► sinks
//!  AMI (live)   pure state     durable (fsync)    webhook, Zammad, JSON lines
//!  trace replay machine        └─► registry ─► HTTP API
//!  SIP dialogs                     live calls + ended
//! ```
//!
//! An event reaches the registry (and every reader) only once it is durable.
//!
//! **Architecture invariant:** the normalizer is a pure, deterministic function
//! of (its state, one AMI frame, the clock). It does no I/O, reads no clock of
//! its own and never calls downstream components; live ingestion and replay run
//! exactly the same code and differ only in the byte source and the clock.
//!
//! **Architecture invariant:** nothing downstream calls back upstream. The HTTP
//! API reads the registry and sends AMI actions; it never mutates call state
//! except through the normalizer's own entry points.
//!
//! **Architecture invariant:** every channel between tasks is bounded, and a
//! full channel means *wait* for call events (backpressure), never *drop*.
//!
//! **Architecture invariant:** components take plain settings of their own;
//! only [`settings`] translates the configuration file into them, and
//! [`config`] imports no component, so the module graph has no cycle
//! (`tests/architecture.rs`).

// No product function longer than clippy.toml's threshold: one that needs
// more is several roles that each deserve a name. Tests may be long.
#![deny(clippy::too_many_lines)]
#![cfg_attr(test, allow(clippy::too_many_lines))]

// Leaves: plain data and helpers every layer may use.
pub mod backoff;
pub mod event;
pub mod exit;
pub mod ids;
pub mod secret;
pub mod text;

// The configuration file (imports no component).
pub mod config;

// Sources: bytes from the PBX become frames and line states.
pub mod ami;
pub mod sip;

// The core: pure decisions over frames and the directory.
pub mod control;
pub mod directory;
pub mod indicators;
pub mod normalize;
pub mod routing;

// State and delivery.
pub mod delivery;
pub mod feed;
pub mod ha;
pub mod outbox;
pub mod registry;
pub mod sink;
pub mod state;

// Tasks and interfaces.
pub mod api;
pub mod pipeline;
pub mod provenance;
pub mod reconnect;
pub mod record;
pub mod replay;
pub mod systemd;
pub mod telemetry;
pub mod tracegen;

// Composition: the only modules that know the file and every component.
pub mod app;
pub mod settings;

// The fuzz targets' bodies (`fuzz/`, `tests/fuzz_corpus.rs`).
#[doc(hidden)]
pub mod fuzzing;
