//! The AMI client as a test drives it: spawned against a config, with the
//! receiving end of its events channel and helpers to read it.

use callbridge::ami::connection::{self, AmiError, AmiHandle, SourceItem};
use callbridge::ami::Frame;
use callbridge::config::AmiConfig;
use callbridge::settings;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct TestClient {
    pub handle: AmiHandle,
    pub events: mpsc::Receiver<SourceItem>,
    pub task: JoinHandle<Result<(), AmiError>>,
    pub shutdown: CancellationToken,
}

impl TestClient {
    /// Spawns the client with the settings of `config` (as the daemon
    /// builds them) and an events channel of `config.event_queue_capacity`.
    pub fn spawn(config: AmiConfig) -> TestClient {
        let (tx, events) = mpsc::channel(config.event_queue_capacity);
        let shutdown = CancellationToken::new();
        let (handle, task) = connection::spawn(settings::ami_client(&config), tx, shutdown.clone());
        TestClient { handle, events, task, shutdown }
    }

    /// The next item, or a panic after `super::WAIT`.
    pub async fn next(&mut self) -> SourceItem {
        match tokio::time::timeout(super::WAIT, self.events.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("the events channel closed"),
            Err(_) => panic!("no item from the AMI client within {:?}", super::WAIT),
        }
    }

    /// The next item if one arrives within `wait`.
    pub async fn try_next(&mut self, wait: Duration) -> Option<SourceItem> {
        tokio::time::timeout(wait, self.events.recv()).await.ok().flatten()
    }

    /// Reads items until `pred` matches one; returns the ones before it and
    /// the match.
    pub async fn until(&mut self, mut pred: impl FnMut(&SourceItem) -> bool) -> (Vec<SourceItem>, SourceItem) {
        let mut before = Vec::new();
        loop {
            let item = self.next().await;
            if pred(&item) {
                return (before, item);
            }
            before.push(item);
        }
    }

    /// Reads until the next `Resync`; returns the event frames seen before it.
    pub async fn until_resync(&mut self) -> Vec<Frame> {
        let (before, _) = self.until(|i| matches!(i, SourceItem::Resync(_))).await;
        frames_of(&before)
    }

    /// Cancels the shutdown token and waits for the task's result.
    pub async fn stop(self) -> Result<(), AmiError> {
        self.shutdown.cancel();
        match tokio::time::timeout(super::WAIT, self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("AMI client task panicked: {e}"),
            Err(_) => panic!("AMI client did not stop within {:?}", super::WAIT),
        }
    }
}

/// The event frames among `items`.
pub fn frames_of(items: &[SourceItem]) -> Vec<Frame> {
    items
        .iter()
        .filter_map(|i| match i {
            SourceItem::Frame(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

/// The `Event:` names of event frames among `items`.
pub fn event_names(items: &[SourceItem]) -> Vec<String> {
    frames_of(items).iter().filter_map(|f| f.event().map(str::to_string)).collect()
}
