//! Opening an AMI session: the live socket's codec, the banner, and the
//! login exchange (MD5 challenge or plain secret), before any event flows.
//!
//! [`Opener::establish`] hands the connection loop a logged-in [`Conn`] or
//! the reason there is none. This module must never route events, never
//! keep anything across connections, and never log or return the secret:
//! it leaves only inside the `Login` action (as an MD5 key, or in clear
//! with `plain`).

use super::action::{Action, EncodeError};
use super::codec::{AmiCodec, AmiMessage, Malformed};
use super::connection::record_duration;
use super::correlation::{is_error, message_of, ActionIds, Answered};
use super::error::AmiError;
use super::frame::Frame;
use super::settings::{AuthMethod, ClientSettings};
use super::transport::{CountingIo, Transport};
use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use md5::{Digest, Md5};
use std::io;
use std::time::{Duration, Instant};
use tokio_util::codec::{Decoder, Encoder, Framed};
use tracing::{debug, warn};

/// How often a repeated malformed-frame warning may be logged.
const MALFORMED_WARN_EVERY: Duration = Duration::from_secs(10);
/// Initial read buffer; it grows up to `max_frame_bytes` + one read.
const READ_BUFFER: usize = 64 * 1024;

/// The codec as a live connection needs it: bytes left at end of stream are
/// a frame cut by the connection loss and are dropped, where a trace file
/// (`AmiCodec::decode_eof`) would close them into a frame.
pub(super) struct LiveCodec(AmiCodec);

impl Decoder for LiveCodec {
    type Item = AmiMessage;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<AmiMessage>, io::Error> {
        self.0.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<AmiMessage>, io::Error> {
        if let Some(m) = self.0.decode(src)? {
            return Ok(Some(m));
        }
        if src.iter().any(|&c| c != b'\r' && c != b'\n') {
            debug!(bytes = src.len(), "AMI connection ended inside a frame; partial frame dropped");
        }
        src.clear();
        Ok(None)
    }
}

impl Encoder<Action> for LiveCodec {
    type Error = super::action::EncodeError;

    fn encode(&mut self, item: Action, dst: &mut BytesMut) -> Result<(), Self::Error> {
        self.0.encode(item, dst)
    }
}

/// The live connection: framed with [`LiveCodec`].
pub(super) type Conn = Framed<CountingIo, LiveCodec>;

/// What opening one session borrows from the client.
pub(super) struct Opener<'a> {
    pub(super) settings: &'a ClientSettings,
    pub(super) transport: &'a Transport,
    pub(super) ids: &'a mut ActionIds,
    pub(super) malformed: &'a mut MalformedLog,
    /// Counts the bytes read on the connection.
    pub(super) received: metrics::Counter,
}

impl Opener<'_> {
    /// Connects, reads the banner and logs in.
    pub(super) async fn establish(mut self) -> Result<(Conn, String), AmiError> {
        let timeout = self.settings.connect_timeout;
        let address = self.transport.address().to_string();
        let (mut conn, banner) = tokio::time::timeout(timeout, self.connect())
            .await
            .map_err(|_| AmiError::ConnectTimeout { address, timeout })??;
        self.login(&mut conn).await?;
        Ok((conn, banner))
    }

    async fn connect(&mut self) -> Result<(Conn, String), AmiError> {
        let io = self.transport.connect(self.received.clone()).await?;
        let mut conn = Framed::with_capacity(io, LiveCodec(AmiCodec::new(self.settings.limits)), READ_BUFFER);
        loop {
            match conn.next().await {
                Some(Ok(AmiMessage::Banner(b))) => return Ok((conn, b)),
                Some(Ok(AmiMessage::Malformed(m))) => self.malformed.record(m),
                Some(Ok(AmiMessage::Frame(f))) => {
                    return Err(AmiError::Protocol(format!("expected the AMI banner, got a frame {f:?}")));
                }
                Some(Err(e)) => return Err(AmiError::Io(e)),
                None => return Err(AmiError::Closed),
            }
        }
    }

    async fn login(&mut self, conn: &mut Conn) -> Result<(), AmiError> {
        let secret = self.settings.secret.resolve().map_err(AmiError::Secret)?;
        let mut login = Action::new("Login").header("Username", self.settings.username.clone());
        match self.settings.auth {
            AuthMethod::Md5 => {
                let reply = self.call(conn, "Challenge", Action::new("Challenge").header("AuthType", "MD5")).await?;
                if is_error(&reply) {
                    return Err(AmiError::LoginRejected { action: "Challenge", message: message_of(&reply) });
                }
                let challenge = reply
                    .get("Challenge")
                    .ok_or_else(|| AmiError::Protocol("Challenge reply without a Challenge header".into()))?;
                login.push("AuthType", "MD5");
                login.push("Key", md5_key(challenge, &secret));
            }
            AuthMethod::Plain => login.push("Secret", secret),
        }
        let reply = self.call(conn, "Login", login).await?;
        if is_error(&reply) {
            return Err(AmiError::AuthenticationFailed {
                username: self.settings.username.clone(),
                message: message_of(&reply),
            });
        }
        Ok(())
    }

    /// One action during login, before events flow: write it, then read
    /// until its reply.
    async fn call(&mut self, conn: &mut Conn, label: &'static str, action: Action) -> Result<Frame, AmiError> {
        let id = self.ids.next();
        let started = Instant::now();
        let timeout = self.settings.action_timeout;
        let exchange = async {
            conn.send(action.with_action_id(id.clone())).await.map_err(|e| match e {
                EncodeError::Io(e) => AmiError::Io(e),
                EncodeError::Invalid(e) => AmiError::Protocol(e.to_string()),
            })?;
            loop {
                match conn.next().await {
                    Some(Ok(AmiMessage::Frame(f))) if f.action_id() == Some(id.as_str()) => return Ok(f),
                    Some(Ok(AmiMessage::Frame(f))) => debug!(?f, "AMI frame before login ignored"),
                    Some(Ok(AmiMessage::Malformed(m))) => self.malformed.record(m),
                    Some(Ok(AmiMessage::Banner(_))) => {}
                    Some(Err(e)) => return Err(AmiError::Io(e)),
                    None => return Err(AmiError::Closed),
                }
            }
        };
        let reply = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AmiError::LoginTimeout { action: label, timeout })??;
        record_duration(Answered { label, elapsed: started.elapsed() });
        Ok(reply)
    }
}

fn md5_key(challenge: &str, secret: &str) -> String {
    let digest = Md5::new().chain_update(challenge.as_bytes()).chain_update(secret.as_bytes()).finalize();
    let mut key = String::with_capacity(32);
    crate::text::push_hex(&mut key, &digest);
    key
}

/// Logs malformed frames at `warn` at most every [`MALFORMED_WARN_EVERY`]
/// (a hostile or broken peer could send millions), at `debug` otherwise.
#[derive(Default)]
pub(super) struct MalformedLog {
    next_warn: Option<Instant>,
    suppressed: u64,
}

impl MalformedLog {
    pub(super) fn record(&mut self, m: Malformed) {
        metrics::counter!("callbridge_ami_malformed_frames_total", "reason" => m.reason.as_str()).increment(1);
        let now = Instant::now();
        if self.next_warn.is_none_or(|t| now >= t) {
            warn!(
                reason = m.reason.as_str(),
                bytes = m.bytes,
                suppressed = self.suppressed,
                "skipped a malformed AMI frame"
            );
            self.suppressed = 0;
            self.next_warn = Some(now + MALFORMED_WARN_EVERY);
        } else {
            self.suppressed += 1;
            debug!(reason = m.reason.as_str(), bytes = m.bytes, "skipped a malformed AMI frame");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_key_matches_asterisk() {
        // md5("1234" + "secret"), as Asterisk's manager.c computes it.
        assert_eq!(md5_key("1234", "secret"), format!("{:x}", Md5::digest(b"1234secret")));
        assert_eq!(md5_key("", ""), "d41d8cd98f00b204e9800998ecf8427e");
    }

    #[test]
    fn live_codec_drops_a_frame_cut_by_eof() {
        let mut codec = LiveCodec(AmiCodec::default());
        let mut buf = BytesMut::from(&b"Event: A\r\n\r\nEvent: B\r\nChannel: SIP/x"[..]);
        let first = codec.decode_eof(&mut buf).expect("no I/O error");
        assert!(matches!(first, Some(AmiMessage::Frame(ref f)) if f.event() == Some("A")));
        assert_eq!(codec.decode_eof(&mut buf).expect("no I/O error"), None);
        assert!(buf.is_empty());
    }
}
