//! Asterisk Manager Interface: framing (`frame`, `codec`), and the live
//! conversation with the PBX (`connection`, `action`, `backoff`, `transport`).
//!
//! Bytes in, frames out: the codec never sees a socket and the connection
//! never parses a header by hand.

pub mod action;
pub mod backoff;
pub mod codec;
pub mod connection;
pub mod frame;
pub mod transport;

pub use action::Action;
pub use codec::{AmiCodec, AmiMessage, CodecLimits, Malformed, MalformedReason};
pub use connection::{ActionError, AmiError, AmiHandle, ConnectionState, ListResponse, Resync, SourceItem};
pub use frame::Frame;
