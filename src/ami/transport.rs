//! Opens the byte stream to the PBX: TCP, or TLS over TCP with rustls
//! (webpki roots plus an optional extra CA file), counting received bytes.
//!
//! The TLS client configuration is built once, when the transport is
//! created, so a bad CA file or server name is reported at start-up and not
//! at every reconnect. The crypto provider (`ring`) is passed explicitly:
//! nothing here depends on a process-wide default provider.
//!
//! This module must never read or write AMI frames: it hands a plain
//! `AsyncRead + AsyncWrite` to the connection, which frames it with the codec.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

/// Failures to set up or open the byte stream.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid TLS server name {name:?} (set tls_server_name)")]
    ServerName {
        name: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("TLS setup for the AMI connection failed: {reason}")]
    TlsSetup {
        reason: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("cannot connect to {address}")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {address} failed")]
    TlsHandshake {
        address: String,
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// Configuration problems: retrying cannot fix them.
    pub fn is_fatal(&self) -> bool {
        matches!(self, TransportError::ServerName { .. } | TransportError::TlsSetup { .. })
    }
}

/// Where and how to connect.
pub struct Transport {
    address: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Transport {
    /// Plain TCP to `address` (`host:port`), or TLS when `tls` is set; the
    /// certificate must name `server_name` (default: the host of `address`).
    pub fn new(
        address: &str,
        tls: bool,
        server_name: Option<&str>,
        ca_file: Option<&Path>,
    ) -> Result<Transport, TransportError> {
        let tls = if tls {
            let name = server_name.unwrap_or_else(|| host_of(address)).to_string();
            let server_name =
                ServerName::try_from(name.clone()).map_err(|source| TransportError::ServerName { name, source })?;
            Some((tls_connector(ca_file)?, server_name))
        } else {
            None
        };
        Ok(Transport { address: address.to_string(), tls })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Connects (and completes the TLS handshake). Received bytes are added
    /// to `received`.
    pub async fn connect(&self, received: metrics::Counter) -> Result<CountingIo, TransportError> {
        let address = &self.address;
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|source| TransportError::Connect { address: address.clone(), source })?;
        // Actions are small and latency-sensitive (click-to-call).
        tcp.set_nodelay(true).map_err(|source| TransportError::Connect { address: address.clone(), source })?;
        let inner: Box<dyn AmiIo> = match &self.tls {
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| TransportError::TlsHandshake { address: address.clone(), source })?,
            ),
            None => Box::new(tcp),
        };
        Ok(CountingIo { inner, received })
    }
}

/// The host part of `host:port` / `[v6]:port`.
fn host_of(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

fn tls_connector(ca_file: Option<&Path>) -> Result<TlsConnector, TransportError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let setup = |reason: String, source: Option<Box<dyn std::error::Error + Send + Sync>>| TransportError::TlsSetup {
        reason,
        source,
    };
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = ca_file {
        let shown = path.display();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| setup(format!("cannot read tls_ca_file {shown}"), Some(Box::new(e))))?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| setup(format!("bad PEM in tls_ca_file {shown}"), Some(Box::new(e))))?;
            roots.add(cert).map_err(|e| setup(format!("bad certificate in tls_ca_file {shown}"), Some(Box::new(e))))?;
            added += 1;
        }
        if added == 0 {
            return Err(setup(format!("tls_ca_file {shown} holds no certificate"), None));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| setup("no usable TLS protocol version".into(), Some(Box::new(e))))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Byte stream to the PBX: TCP or TLS over TCP.
trait AmiIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AmiIo for T {}

/// The open stream; counts received bytes (for
/// `callbridge_ami_bytes_received_total`).
pub struct CountingIo {
    inner: Box<dyn AmiIo>,
    received: metrics::Counter,
}

impl AsyncRead for CountingIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.received.increment(n as u64);
        }
        poll
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("pbx.example:5039"), "pbx.example");
        assert_eq!(host_of("[::1]:5039"), "::1");
        assert_eq!(host_of("pbx.example"), "pbx.example");
    }

    #[test]
    fn tls_setup_problems_are_fatal_and_named() {
        let bad_name = Transport::new("127.0.0.1:5039", true, Some("not a host name!"), None);
        assert!(matches!(bad_name, Err(ref e @ TransportError::ServerName { .. }) if e.is_fatal()));
        let missing = Transport::new("pbx:5039", true, None, Some(Path::new("/nonexistent/ca.pem")));
        let err = missing.err().expect("missing CA file is an error");
        assert!(err.is_fatal() && err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        assert!(Transport::new("pbx.example:5039", true, None, None).is_ok());
        assert!(Transport::new("pbx.example:5038", false, None, None).is_ok());
    }
}
