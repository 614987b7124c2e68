//! How a caller the helpdesk rejects (Zammad's blocked caller ids) is hung
//! up: the sink asks, the control path acts.
//!
//! 1. The pipeline marks the call blocked ([`Command::BlockCaller`]) and
//!    names the caller's channel. Marked first, so that the PBX's hangup
//!    events find the mark and the call ends `missed`/`blocked`.
//! 2. The PBX hangs the caller's channel up (`Hangup`, cause 21, planned by
//!    [`crate::control::plan_reject_hangup`]).
//! 3. If the PBX could not be asked or refused, the mark is taken back
//!    ([`Command::UnblockCaller`]): the call goes on, and ends for whatever
//!    reason it will.
//!
//! It never changes call state itself (only the pipeline does, on its
//! commands), and never waits on the pipeline for longer than
//! [`PIPELINE_WAIT`]: a sink must not be held by a busy pipeline.

use crate::ami::{Action, AmiHandle};
use crate::sink::zammad::{BlockOutcome, CallBlocker};
use crate::state::Command;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long the pipeline may take to mark the call (it answers commands
/// between batches of events: normally at once).
const PIPELINE_WAIT: Duration = Duration::from_secs(5);

/// Hangs up rejected callers on the PBX of `[pbx.ami]`.
pub(super) struct PbxBlocker {
    commands: mpsc::Sender<Command>,
    /// `None`: no AMI connection (SIP-only mode, a replayed trace).
    ami: Option<AmiHandle>,
}

impl PbxBlocker {
    pub(super) fn new(commands: mpsc::Sender<Command>, ami: Option<AmiHandle>) -> PbxBlocker {
        PbxBlocker { commands, ami }
    }

    async fn block_caller(&self, call: &str) -> BlockOutcome {
        let Some(ami) = &self.ami else {
            return BlockOutcome::Failed("no AMI connection to hang up with".into());
        };
        let (reply, marked) = oneshot::channel();
        let mark = async {
            self.commands.send(Command::BlockCaller { call: call.to_string(), reply }).await.ok()?;
            marked.await.ok()
        };
        let channel = match tokio::time::timeout(PIPELINE_WAIT, mark).await {
            Ok(Some(Some(channel))) => channel,
            Ok(Some(None)) => return BlockOutcome::TooLate,
            // Stopping, or the pipeline is busy: nothing is marked (a mark
            // it makes later is taken back below).
            Ok(None) | Err(_) => {
                let _ = self.commands.try_send(Command::UnblockCaller { call: call.to_string() });
                return BlockOutcome::Failed("the pipeline did not answer".into());
            }
        };
        let planned = crate::control::plan_reject_hangup(&channel);
        let mut action = Action::new(planned.name);
        for (k, v) in &planned.headers {
            action.push(k.clone(), v.clone());
        }
        match ami.send(action).await {
            Ok(_) => BlockOutcome::HungUp { channel },
            Err(e) => {
                let _ = self.commands.send(Command::UnblockCaller { call: call.to_string() }).await;
                BlockOutcome::Failed(format!("Hangup of {channel}: {e}"))
            }
        }
    }
}

impl CallBlocker for PbxBlocker {
    fn block<'a>(&'a self, call: &'a str) -> Pin<Box<dyn Future<Output = BlockOutcome> + Send + 'a>> {
        Box::pin(self.block_caller(call))
    }
}
