//! The AMI client as the rest of callbridge sees it: the [`AmiHandle`] that
//! sends actions, and the [`SourceItem`]s the client puts into the pipeline.
//!
//! A handle only queues requests for the connection task and reads its
//! state; it must never touch the socket, wait for a connection to come
//! back, or queue an action for a later connection.

use super::action::Action;
use super::error::ActionError;
use super::frame::Frame;
use tokio::sync::{mpsc, oneshot, watch};

/// What the client sends into the pipeline, in stream order.
// `Frame` is the hot variant and keeps its header index inline; boxing it
// would cost an allocation per event to save room in the rare variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceItem {
    /// Logged in to the PBX. `banner` is the version after
    /// `Asterisk Call Manager/`. Followed, on the same connection, by the
    /// PBX's events and, once both lists are in, one [`SourceItem::Resync`]
    /// (none if the PBX refused `CoreShowChannels`: logged).
    Connected { banner: String },
    /// An unsolicited event (not a reply to, or list item of, our actions).
    Frame(Frame),
    /// The PBX's view after a (re)connection, for the registry to end calls
    /// that vanished and adopt unknown ones.
    Resync(Resync),
    /// The connection was lost after `Connected`; a reconnect follows.
    Disconnected { reason: String },
}

/// What the PBX reported right after a (re)connection.
///
/// The snapshot was taken at some moment between [`SourceItem::Connected`]
/// and this item, while events kept flowing: a call that had any event after
/// `Connected` is known to exist (or to have ended) from those events and must
/// not be ended for missing from `channels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    /// `CoreShowChannel` items, one per live channel.
    pub channels: Vec<Frame>,
    /// `QueueParams`, `QueueMember` and `QueueEntry` items. Empty when the
    /// PBX refused `QueueStatus` (no `app_queue`, no permission): logged.
    pub queue_items: Vec<Frame>,
}

/// The reply to a list action (`CoreShowChannels`, `QueueStatus`, `Status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResponse {
    /// The `Response: Success` frame that opened the list.
    pub response: Frame,
    /// The items, in order, without the closing `…Complete` event.
    pub items: Vec<Frame>,
}

/// Whether the client is logged in; for readiness probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting, logging in, or waiting to reconnect.
    Disconnected,
    /// Logged in: actions can be sent.
    Connected,
    /// The task has ended (shutdown or a fatal error).
    Stopped,
}

/// How the rest of callbridge talks to the PBX. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AmiHandle {
    /// Full = the caller waits (the connection writes actions faster than
    /// any caller produces them; the bound only stops a runaway caller).
    pub(super) requests: mpsc::Sender<Request>,
    pub(super) state: watch::Receiver<ConnectionState>,
}

impl AmiHandle {
    /// Sends `action` and waits for its reply (`action_timeout_seconds`).
    /// A `Response: Error` reply is [`ActionError::Rejected`]. Use
    /// [`AmiHandle::send_list`] for actions that answer with a list.
    pub async fn send(&self, action: Action) -> Result<Frame, ActionError> {
        let (tx, rx) = oneshot::channel();
        self.submit(action, Reply::Single(tx)).await?;
        rx.await.map_err(|_| ActionError::Stopped)?
    }

    /// Sends a list action and collects the events carrying its `ActionID`
    /// until `EventList: Complete`. The deadline restarts with every item,
    /// so long lists are fine as long as they keep coming.
    pub async fn send_list(&self, action: Action) -> Result<ListResponse, ActionError> {
        let (tx, rx) = oneshot::channel();
        self.submit(action, Reply::List(tx)).await?;
        rx.await.map_err(|_| ActionError::Stopped)?
    }

    async fn submit(&self, action: Action, reply: Reply) -> Result<(), ActionError> {
        action.validate()?;
        match *self.state.borrow() {
            ConnectionState::Connected => {}
            ConnectionState::Disconnected => return Err(ActionError::NotConnected),
            ConnectionState::Stopped => return Err(ActionError::Stopped),
        }
        self.requests.send(Request { action, reply }).await.map_err(|_| ActionError::Stopped)
    }

    /// True while logged in to the PBX.
    pub fn is_connected(&self) -> bool {
        *self.state.borrow() == ConnectionState::Connected
    }

    /// The connection state, to watch for changes (readiness).
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Waits until logged in; `Err(Stopped)` if the task ended first.
    pub async fn wait_connected(&self) -> Result<(), ActionError> {
        let mut state = self.state.clone();
        let seen = state.wait_for(|s| *s != ConnectionState::Disconnected).await.map_err(|_| ActionError::Stopped)?;
        match *seen {
            ConnectionState::Connected => Ok(()),
            _ => Err(ActionError::Stopped),
        }
    }
}

/// An action queued by a handle for the connection task.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) action: Action,
    pub(super) reply: Reply,
}

/// Where the answer to a queued action goes.
#[derive(Debug)]
pub(super) enum Reply {
    Single(oneshot::Sender<Result<Frame, ActionError>>),
    List(oneshot::Sender<Result<ListResponse, ActionError>>),
}

impl Reply {
    pub(super) fn fail(self, e: ActionError) {
        // The caller may have given up (dropped its future): nothing to do.
        match self {
            Reply::Single(tx) => drop(tx.send(Err(e))),
            Reply::List(tx) => drop(tx.send(Err(e))),
        }
    }
}
