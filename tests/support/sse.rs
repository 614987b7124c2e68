//! A Server-Sent Events reader over a real HTTP response (reqwest), for
//! `GET /v1/events`: messages with their `id`, `event` and `data`, comments
//! (keep-alives) skipped.

use std::time::Duration;

/// One message of the stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

pub struct SseReader {
    response: reqwest::Response,
    buf: String,
    ended: bool,
}

impl SseReader {
    /// Opens the stream; panics unless it answers `200 text/event-stream`.
    pub async fn open(url: &str, token: &str, last_event_id: Option<&str>) -> SseReader {
        let mut req = reqwest::Client::new().get(url).bearer_auth(token);
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let response = req.send().await.expect("GET /v1/events");
        assert_eq!(response.status().as_u16(), 200, "GET {url}");
        let ct = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        SseReader { response, buf: String::new(), ended: false }
    }

    /// The next message if one arrives within `wait`; `None` otherwise or
    /// once the stream ended.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(m) = self.parse_one() {
                return Some(m);
            }
            if self.ended {
                return None;
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await.ok()?;
            match chunk {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes).replace("\r\n", "\n")),
                Ok(None) | Err(_) => self.ended = true,
            }
        }
    }

    /// The next message, or a panic after `super::WAIT` naming `what`.
    pub async fn next(&mut self, what: &str) -> Message {
        match self.next_within(super::WAIT).await {
            Some(m) => m,
            None => panic!("no event stream message ({what}) within {:?}", super::WAIT),
        }
    }

    /// `n` messages.
    pub async fn take(&mut self, n: usize, what: &str) -> Vec<Message> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(self.next(&format!("{what}: {} of {n}", i + 1)).await);
        }
        out
    }

    fn parse_one(&mut self) -> Option<Message> {
        loop {
            let end = self.buf.find("\n\n")?;
            let block: String = self.buf.drain(..end + 2).collect();
            let mut m = Message::default();
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if line.starts_with(':') || line.is_empty() {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => m.id = Some(value.to_string()),
                    "event" => m.event = Some(value.to_string()),
                    "data" => data.push(value),
                    _ => {}
                }
            }
            if m.id.is_none() && m.event.is_none() && data.is_empty() {
                continue; // a comment block (keep-alive)
            }
            m.data = data.join("\n");
            return Some(m);
        }
    }
}
