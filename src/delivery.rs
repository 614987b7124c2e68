//! Where the pipeline hands events once they are final.
//!
//! `deliver` returns when the events are safe by the sink's standard: for
//! JSON lines, written and flushed to the file or stdout. The durable outbox
//! with HTTP sinks plugs in here too.

use crate::event::Event;
use std::io::Write;

pub enum Delivery {
    /// JSON lines to stdout or a file (appended).
    Jsonl(Box<dyn Write + Send>),
    /// Events are only published to the registry (tests, `--quiet`).
    Discard,
}

impl Delivery {
    /// JSON lines to `path` (`-` = stdout).
    pub fn jsonl(path: &str) -> std::io::Result<Delivery> {
        if path == "-" {
            return Ok(Delivery::Jsonl(Box::new(std::io::stdout())));
        }
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Delivery::Jsonl(Box::new(std::io::BufWriter::new(f))))
    }

    pub async fn deliver(&mut self, events: &[Event], pbx: &str) -> std::io::Result<()> {
        match self {
            Delivery::Jsonl(w) => {
                let mut buf = String::with_capacity(events.len() * 900);
                for e in events {
                    buf.push_str(&e.to_cloudevent_json(pbx));
                    buf.push('\n');
                }
                w.write_all(buf.as_bytes())?;
                w.flush()
            }
            Delivery::Discard => Ok(()),
        }
    }

    pub async fn close(&mut self) -> std::io::Result<()> {
        match self {
            Delivery::Jsonl(w) => w.flush(),
            Delivery::Discard => Ok(()),
        }
    }
}
