//! What can go wrong with the AMI client: [`AmiError`] for the connection
//! task as a whole, [`ActionError`] for one action sent through a handle.
//!
//! Plain error values: this module must never log, retry or decide what a
//! failure leads to (the connection task does), and an error message must
//! never carry the secret.

use super::action::InvalidAction;
use super::frame::Frame;
use super::transport::TransportError;
use crate::backoff::InvalidBackoff;
use std::io;
use std::time::Duration;

/// Failures of the connection task. Only [`AmiError::is_fatal`] ones end it.
#[derive(Debug, thiserror::Error)]
pub enum AmiError {
    #[error("invalid AMI setting {field}: {reason}")]
    InvalidSetting { field: &'static str, reason: String },
    #[error("invalid AMI reconnect backoff")]
    InvalidBackoff(#[source] InvalidBackoff),
    #[error("cannot resolve the AMI secret: {0}")]
    Secret(String),
    #[error("AMI authentication failed for user {username:?} (PBX said {message:?}); not retrying")]
    AuthenticationFailed { username: String, message: String },
    #[error("connecting to {address} timed out after {timeout:?}")]
    ConnectTimeout { address: String, timeout: Duration },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("I/O error on the AMI connection")]
    Io(#[source] io::Error),
    #[error("the PBX closed the AMI connection")]
    Closed,
    #[error("AMI protocol error: {0}")]
    Protocol(String),
    #[error("the PBX rejected {action}: {message}")]
    LoginRejected { action: &'static str, message: String },
    #[error("{action} got no reply within {timeout:?}")]
    LoginTimeout { action: &'static str, timeout: Duration },
    #[error("keepalive Ping got no reply within {0:?}")]
    PingTimeout(Duration),
    #[error("writing to the PBX timed out after {0:?}")]
    WriteTimeout(Duration),
    #[error("the events channel was closed by its consumer")]
    EventsClosed,
}

impl AmiError {
    /// Errors that reconnecting cannot fix: the task ends with them.
    pub fn is_fatal(&self) -> bool {
        if let AmiError::Transport(t) = self {
            return t.is_fatal();
        }
        matches!(
            self,
            AmiError::InvalidSetting { .. }
                | AmiError::InvalidBackoff(_)
                | AmiError::Secret(_)
                | AmiError::AuthenticationFailed { .. }
                | AmiError::EventsClosed
        )
    }
}

/// Why an action got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Invalid(#[from] InvalidAction),
    #[error("not connected to the PBX")]
    NotConnected,
    #[error("the AMI connection was lost before {action} was answered")]
    ConnectionLost { action: String },
    #[error("{action} got no reply within {timeout:?}")]
    Timeout { action: String, timeout: Duration },
    #[error("the PBX rejected {action}: {message}")]
    Rejected {
        action: String,
        message: String,
        /// The PBX's error reply (boxed: frames are large and errors rare).
        response: Box<Frame>,
    },
    #[error("too many AMI actions in flight (limit {0})")]
    Busy(usize),
    #[error("{action} returned more than {limit} list items")]
    ListTooLong { action: String, limit: usize },
    #[error("the AMI client has stopped")]
    Stopped,
}
