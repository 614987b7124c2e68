//! `callbridge tail --nats URL`: the consuming side of the NATS sink, so an
//! engineer can watch a site's calls, and the smallest working example of
//! how a helpdesk consumes the stream: a pull consumer on the stream,
//! filtered by subject (`callbridge.*.call.>` for every site's call events,
//! `callbridge.lab.>` for one site), each event printed as its CloudEvents
//! JSON line.
//!
//! Without `--durable` the consumer is ephemeral (the server removes it
//! when tail stops) and acknowledges nothing. With `--durable NAME` it is
//! the helpdesk's pattern: a named consumer that remembers what was
//! acknowledged, so a restarted reader goes on where it stopped; each event
//! is acknowledged once printed. This module only reads; it never changes
//! the stream.

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use std::io::Write;
use std::time::Duration;

/// Messages asked for in one pull at most.
const PULL_BATCH: u64 = 256;

/// What to read.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub url: String,
    pub stream: String,
    pub subject: String,
    /// A durable consumer's name (explicit acks); `None`: ephemeral.
    pub durable: Option<String>,
    /// Start at the first event the stream holds rather than the next new one.
    pub all: bool,
    /// A `.creds` file for the connection.
    pub creds_file: Option<String>,
    /// Stop after this many events (`None`: until interrupted).
    pub count: Option<u64>,
}

/// Prints events as they arrive until interrupted (or `count` of them).
pub async fn tail(opts: &TailOptions, out: &mut (impl Write + Send)) -> anyhow::Result<u64> {
    let mut connect = async_nats::ConnectOptions::new().name("callbridge tail");
    if let Some(path) = &opts.creds_file {
        let creds = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("creds_file {path:?}: {e}"))?;
        connect = connect.credentials(&creds).map_err(|e| anyhow::anyhow!("creds_file {path:?}: {e}"))?;
    }
    let servers = super::nats::server_addrs(&opts.url).map_err(anyhow::Error::msg)?;
    let client = connect.connect(servers.as_slice()).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&opts.stream).await.map_err(|e| anyhow::anyhow!("stream {}: {e}", opts.stream))?;
    let config = pull::Config {
        durable_name: opts.durable.clone(),
        filter_subject: opts.subject.clone(),
        deliver_policy: if opts.all { DeliverPolicy::All } else { DeliverPolicy::New },
        ack_policy: if opts.durable.is_some() { AckPolicy::Explicit } else { AckPolicy::None },
        // A durable consumer nobody reads for a week is removed.
        inactive_threshold: Duration::from_secs(7 * 86_400),
        ..Default::default()
    };
    let consumer = match &opts.durable {
        Some(name) => stream.get_or_create_consumer(name, config).await,
        None => stream.create_consumer(config).await,
    }
    .map_err(|e| anyhow::anyhow!("consumer on {}: {e}", opts.stream))?;
    let mut printed = 0u64;
    loop {
        // Pull no more than is still wanted: a message pulled and never
        // acknowledged would come back only after the ack wait.
        let want = opts.count.map_or(PULL_BATCH, |n| n.saturating_sub(printed).min(PULL_BATCH));
        if want == 0 {
            break;
        }
        let mut batch = consumer
            .batch()
            .max_messages(want as usize)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", opts.stream))?;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("reading {}: {e}", opts.stream))?;
            out.write_all(&message.payload)?;
            out.write_all(b"\n")?;
            out.flush()?;
            if opts.durable.is_some() {
                // Confirmed by the server: an ack lost when tail stops would
                // print the event again next time.
                message.double_ack().await.map_err(|e| anyhow::anyhow!("acknowledging: {e}"))?;
            }
            printed += 1;
        }
    }
    Ok(printed)
}
