//! What a recorded trace says about reconnections, so that a replay runs the
//! same resync the live daemon ran.
//!
//! A live daemon that loses the PBX reconnects, asks for the channels
//! (`CoreShowChannels`) and reconciles: calls the PBX no longer has end
//! `lost`. A trace must let `replay` do the same at the same point, or a
//! trace spanning an Asterisk crash leaves the crashed calls live forever.
//!
//! `callbridge record` writes, after every (re)connection's banner and the
//! PBX's `FullyBooted`, the listing the recorder asked for, between two
//! markers of our own (Asterisk sends no event with these names):
//!
//! ```text
//! Event: CallbridgeResync              ← Timestamp: the recorder's PBX clock
//! Event: CoreShowChannel … (one per live channel, as Asterisk sent them)
//! Event: QueueMember …     (the QueueStatus items, as Asterisk sent them)
//! Event: CallbridgeResyncComplete
//! ```
//!
//! Traces without the markers (recorded before them, or captured on the
//! wire) are read the way a live daemon would have understood them: a new
//! banner mid-trace is a reconnection, and a `FullyBooted` whose `Uptime`
//! is shorter than the trace has been running means the PBX itself
//! restarted, so no channel survived: the resync is an empty listing, dated
//! by the next timestamped frame (the first moment the new PBX speaks).
//!
//! [`TraceReader`] turns decoded messages into [`TraceItem`]s; it is pure
//! and knows nothing of the normalizer.

use crate::ami::codec::AmiMessage;
use crate::ami::Frame;
use crate::event::Micros;

/// The recorder's marker before a resync listing.
pub const RESYNC_MARKER: &str = "CallbridgeResync";
/// The recorder's marker after a resync listing.
pub const RESYNC_END_MARKER: &str = "CallbridgeResyncComplete";

/// What a trace holds, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceItem {
    /// A PBX frame for the normalizer.
    Frame(Frame),
    /// A (re)connection starts (a banner after the trace's first).
    Reconnected,
    /// The PBX's channels and queue members as of `at` (the resync of the
    /// reconnection).
    Resync { channels: Vec<Frame>, queue_items: Vec<Frame>, at: Micros },
}

/// Reads trace messages into [`TraceItem`]s (see the module doc).
#[derive(Debug, Default)]
pub struct TraceReader {
    banners: u64,
    first_ts: Option<Micros>,
    last_ts: Option<Micros>,
    /// After a mid-trace banner, until the connection's resync is known.
    reconnecting: bool,
    /// The PBX restarted (a short `Uptime`): an empty resync is due at the
    /// next timestamped frame.
    restarted: bool,
    /// Inside a recorded listing: its channels, queue items and time.
    listing: Option<Listing>,
}

#[derive(Debug)]
struct Listing {
    channels: Vec<Frame>,
    queue_items: Vec<Frame>,
    at: Micros,
}

impl TraceReader {
    pub fn new() -> TraceReader {
        TraceReader::default()
    }

    /// Hands the items `msg` makes to `out`.
    pub fn read(&mut self, msg: AmiMessage, mut out: impl FnMut(TraceItem)) {
        match msg {
            AmiMessage::Banner(_) => {
                self.banners += 1;
                if self.banners > 1 {
                    self.flush_restart(self.last_ts, &mut out);
                    self.reconnecting = true;
                    self.listing = None;
                    out(TraceItem::Reconnected);
                }
            }
            AmiMessage::Frame(f) => self.frame(f, &mut out),
            AmiMessage::Malformed(_) => {}
        }
    }

    /// The trace ended: a restart still waiting for a timestamp is resynced
    /// at the last time seen.
    pub fn finish(&mut self, mut out: impl FnMut(TraceItem)) {
        self.flush_restart(self.last_ts, &mut out);
    }

    fn frame(&mut self, f: Frame, out: &mut impl FnMut(TraceItem)) {
        let ts = f.timestamp_micros();
        let event = f.event().unwrap_or("");
        if event == RESYNC_MARKER {
            self.restarted = false;
            self.reconnecting = false;
            // The recorder's reading of the PBX clock: not a PBX event time
            // (before any frame it is the wall clock).
            let at = ts.or(self.last_ts).unwrap_or(0);
            self.listing = Some(Listing { channels: Vec::new(), queue_items: Vec::new(), at });
            return;
        }
        if let Some(listing) = &mut self.listing {
            match event {
                "CoreShowChannel" => return listing.channels.push(f),
                "QueueParams" | "QueueMember" | "QueueEntry" => return listing.queue_items.push(f),
                RESYNC_END_MARKER => {
                    if let Some(Listing { channels, queue_items, at }) = self.listing.take() {
                        out(TraceItem::Resync { channels, queue_items, at });
                    }
                    return;
                }
                _ => {}
            }
        }
        if self.reconnecting && event == "FullyBooted" {
            self.reconnecting = false;
            self.restarted = self.pbx_restarted(&f);
        }
        if ts.is_some() {
            self.flush_restart(ts, out);
        }
        self.note_time(ts);
        out(TraceItem::Frame(f));
    }

    /// Whether a `FullyBooted` says the PBX started after the trace began.
    fn pbx_restarted(&self, f: &Frame) -> bool {
        let (Some(first), Some(last)) = (self.first_ts, self.last_ts) else {
            return false;
        };
        let Some(uptime) = f.get("Uptime").and_then(|u| u.trim().parse::<i64>().ok()) else {
            return false;
        };
        uptime.saturating_mul(1_000_000) < last - first
    }

    fn flush_restart(&mut self, at: Option<Micros>, out: &mut impl FnMut(TraceItem)) {
        if std::mem::take(&mut self.restarted) {
            out(TraceItem::Resync { channels: Vec::new(), queue_items: Vec::new(), at: at.unwrap_or(0) });
        }
    }

    fn note_time(&mut self, ts: Option<Micros>) {
        if let Some(t) = ts {
            self.first_ts.get_or_insert(t);
            self.last_ts = Some(self.last_ts.map_or(t, |l| l.max(t)));
        }
    }
}

/// The frames the recorder writes for one resync: the marker (dated `at`),
/// the listing's channels and queue items as received, the end marker.
pub fn resync_frames(at: Micros, channels: &[Frame], queue_items: &[Frame]) -> Vec<u8> {
    let mut out = format!(
        "Event: {RESYNC_MARKER}\r\nTimestamp: {}.{:06}\r\nListItems: {}\r\n\r\n",
        at.div_euclid(1_000_000),
        at.rem_euclid(1_000_000),
        channels.len()
    )
    .into_bytes();
    for c in channels.iter().chain(queue_items) {
        out.extend_from_slice(c.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Event: {RESYNC_END_MARKER}\r\n\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ami::codec::{decode_all, AmiCodec};

    fn items(bytes: &[u8]) -> Vec<TraceItem> {
        let mut r = TraceReader::new();
        let mut out = Vec::new();
        decode_all(&mut AmiCodec::default(), bytes, |m| r.read(m, |i| out.push(i)));
        r.finish(|i| out.push(i));
        out
    }

    fn kinds(items: &[TraceItem]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                TraceItem::Frame(f) => f.event().or(f.response().map(|_| "Response")).unwrap_or("?").to_string(),
                TraceItem::Reconnected => "reconnected".into(),
                TraceItem::Resync { channels, at, .. } => format!("resync {} @{at}", channels.len()),
            })
            .collect()
    }

    const HEAD: &str = "Asterisk Call Manager/9.0.0\r\nResponse: Success\r\nMessage: Authentication accepted\r\n\r\n";

    #[test]
    fn a_restarted_pbx_is_an_empty_resync_at_its_first_timestamp() {
        let text = format!(
            "{HEAD}Event: FullyBooted\r\nUptime: 35\r\n\r\nEvent: Newchannel\r\nTimestamp: 100.000000\r\n\r\n\
             Event: VarSet\r\nTimestamp: 110.000000\r\n\r\n\
             {HEAD}Event: FullyBooted\r\nUptime: 2\r\n\r\nEvent: SuccessfulAuth\r\nTimestamp: 120.500000\r\n\r\n"
        );
        let got = kinds(&items(text.as_bytes()));
        assert_eq!(
            got,
            [
                "Response",
                "FullyBooted",
                "Newchannel",
                "VarSet",
                "reconnected",
                "Response",
                "FullyBooted",
                "resync 0 @120500000",
                "SuccessfulAuth"
            ]
        );
    }

    #[test]
    fn a_long_uptime_is_a_reconnection_without_a_known_listing() {
        let text = format!(
            "{HEAD}Event: Newchannel\r\nTimestamp: 100.0\r\n\r\nEvent: VarSet\r\nTimestamp: 110.0\r\n\r\n\
             {HEAD}Event: FullyBooted\r\nUptime: 3600\r\n\r\nEvent: Hangup\r\nTimestamp: 120.0\r\n\r\n"
        );
        assert!(!kinds(&items(text.as_bytes())).iter().any(|k| k.starts_with("resync")));
    }

    #[test]
    fn a_recorded_listing_is_replayed_as_recorded() {
        let channel = Frame::from_pairs(&[("Event", "CoreShowChannel"), ("Uniqueid", "1.1"), ("Linkedid", "1.1")]);
        let mut text =
            format!("{HEAD}Event: Newchannel\r\nTimestamp: 100.0\r\n\r\n{HEAD}Event: FullyBooted\r\nUptime: 1\r\n\r\n")
                .into_bytes();
        text.extend(resync_frames(115_250_000, &[channel], &[]));
        text.extend(b"Event: Hangup\r\nTimestamp: 120.0\r\n\r\n");
        let got = items(&text);
        assert_eq!(
            kinds(&got),
            ["Response", "Newchannel", "reconnected", "Response", "FullyBooted", "resync 1 @115250000", "Hangup"]
        );
        let Some(TraceItem::Resync { channels, .. }) = got.iter().find(|i| matches!(i, TraceItem::Resync { .. }))
        else {
            unreachable!()
        };
        assert_eq!(channels[0].get("Uniqueid"), Some("1.1"));
    }
}
