//! Asterisk Manager Interface: framing (`frame`, `codec`), and the live
//! conversation with the PBX (`connection`, `correlation`, `login`,
//! `action`, `backoff`, `transport`), started with [`ClientSettings`] and used through
//! an [`AmiHandle`].
//!
//! Bytes in, frames out: the codec never sees a socket and the connection
//! never parses a header by hand.

pub mod action;
pub mod codec;
pub mod connection;
mod correlation;
pub mod error;
pub mod frame;
pub mod handle;
mod login;
pub mod settings;
pub mod transport;

pub use action::Action;
pub use codec::{AmiCodec, AmiMessage, CodecLimits, Malformed, MalformedReason};
pub use error::{ActionError, AmiError};
pub use frame::Frame;
pub use handle::{AmiHandle, ConnectionState, ListResponse, Resync, SourceItem};
pub use settings::{AuthMethod, ClientSettings};
