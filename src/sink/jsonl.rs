//! The JSON-lines sink: one CloudEvent per line to stdout (`path = "-"`) or
//! appended to a file (SPEC §6).
//!
//! Writes are serialized (concurrency 1), so lines come out in outbox order.
//! A batch is acknowledged once written and flushed, and, for a file,
//! `fdatasync`'d. This module must never write a partial batch twice on
//! purpose: a failed write is retried whole (at-least-once, same ids).

use super::{Attempt, Sink, StatusClass};
use crate::backoff::{Backoff, Jitter};
use crate::outbox::Record;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

enum Target {
    Stdout,
    File(File),
}

/// Writes events as JSON lines.
pub struct JsonlSink {
    name: Arc<str>,
    // Held only inside `spawn_blocking`, never across an `.await`.
    target: Arc<Mutex<Target>>,
}

impl JsonlSink {
    /// `path` "-" is stdout; anything else a file opened for appending.
    pub fn open(name: &str, path: &str) -> std::io::Result<JsonlSink> {
        let target = if path == "-" {
            Target::Stdout
        } else {
            Target::File(OpenOptions::new().create(true).append(true).open(path)?)
        };
        Ok(JsonlSink { name: Arc::from(name), target: Arc::new(Mutex::new(target)) })
    }
}

impl Sink for JsonlSink {
    fn name(&self) -> &Arc<str> {
        &self.name
    }

    fn batch_size(&self) -> usize {
        512
    }

    fn concurrency(&self) -> usize {
        1
    }

    fn retry_policy(&self) -> Backoff {
        Backoff::clamped(Duration::from_millis(100), Duration::from_secs(10), Jitter::Wide)
    }

    async fn deliver(&self, batch: &[Record], _attempt: u32) -> Attempt {
        let mut text = String::with_capacity(batch.iter().map(|r| r.body.len() + 1).sum());
        for r in batch {
            text.push_str(&r.body);
            text.push('\n');
        }
        let target = self.target.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut t = target.lock().map_err(|_| std::io::Error::other("jsonl writer poisoned"))?;
            match &mut *t {
                Target::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(text.as_bytes())?;
                    out.flush()
                }
                Target::File(f) => {
                    f.write_all(text.as_bytes())?;
                    f.sync_data()
                }
            }
        })
        .await;
        match written {
            Ok(Ok(())) => Attempt::Delivered,
            Ok(Err(e)) => Attempt::Retry { class: StatusClass::Io, retry_after: None, detail: e.to_string() },
            Err(e) => Attempt::Retry { class: StatusClass::Io, retry_after: None, detail: e.to_string() },
        }
    }
}
