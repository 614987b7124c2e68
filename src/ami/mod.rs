//! Asterisk Manager Interface: framing (`frame`, `codec`), and the live
//! conversation with the PBX (`connection`, `action`).
//!
//! Bytes in, frames out: the codec never sees a socket and the connection
//! never parses a header by hand.

pub mod codec;
pub mod frame;

pub use codec::{AmiCodec, AmiMessage, CodecLimits, Malformed, MalformedReason};
pub use frame::Frame;
