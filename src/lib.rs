//! callbridge: turns an on-premises PBX's call signalling into the call
//! lifecycle a helpdesk needs, and delivers it durably.
//!
//! Data flows one way:
//!
//! ```text
//! sources ──► normalizer ──► registry ──► outbox ──► sinks
//!  AMI (live)   pure state     live calls   durable    webhook, Zammad, JSON lines
//!  trace replay machine        + ended
//! ```
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

pub mod ami;
pub mod api;
pub mod config;
pub mod control;
pub mod delivery;
pub mod directory;
pub mod event;
pub mod exit;
pub mod ids;
pub mod indicators;
pub mod normalize;
pub mod outbox;
pub mod pipeline;
pub mod registry;
pub mod replay;
pub mod routing;
pub mod secret;
pub mod settings;
pub mod sink;
pub mod sip;
pub mod state;
pub mod systemd;
pub mod telemetry;
pub mod text;
pub mod tracegen;

pub mod app;
pub mod record;
