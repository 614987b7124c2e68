//! HTTP sinks over TLS to a helpdesk behind a private certificate authority:
//! with `ca_file` naming that CA the webhook is delivered; without it the
//! attempt fails with an error that names the certificate problem (and is
//! retried, never acknowledged); an unreadable `ca_file` is refused when the
//! sink is built, naming the sink and the file.

mod support;

use callbridge::config::{Config, SinkConfig};
use callbridge::outbox::Record;
use callbridge::sink::webhook::WebhookSink;
use callbridge::sink::{Attempt, Sink};
use std::net::SocketAddr;
use support::server::{tls_acceptor, tls_file};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTPS receiver on 127.0.0.1 answering 204 to every request.
async fn https_receiver() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tls_acceptor();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then Content-Length bytes of body.
                loop {
                    let Ok(n) = tls.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                            })
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ =
                    tls.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

fn webhook(addr: SocketAddr, ca_file: Option<&str>) -> (String, SinkConfig) {
    let ca = ca_file.map(|f| format!("ca_file = {f:?}\n")).unwrap_or_default();
    let text = format!(
        "[pbx]\nname = \"lab\"\n[[sinks]]\ntype = \"webhook\"\nname = \"helpdesk\"\n\
         url = \"https://localhost:{}/hooks\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n{ca}",
        addr.port()
    );
    let config = Config::parse(&text, "tls test").expect("valid configuration");
    ("helpdesk".into(), config.sinks[0].clone())
}

fn record() -> Record {
    Record {
        pos: 1,
        seq: 1,
        id: "lab:1.1:1".into(),
        key: "1.1".into(),
        kind: "call.started".into(),
        body: r#"{"specversion":"1.0","id":"lab:1.1:1","type":"call.started"}"#.into(),
        appended_at: 0,
    }
}

#[tokio::test]
async fn a_private_ca_in_ca_file_is_trusted() {
    let addr = https_receiver().await;
    let ca = tls_file("ca.pem");
    let (name, config) = webhook(addr, Some(&ca));
    let sink = WebhookSink::from_config(0, &name, &config).expect("sink builds");
    assert_eq!(sink.deliver(&[record()], 0).await, Attempt::Delivered);
}

#[tokio::test]
async fn an_unknown_ca_fails_with_the_certificate_problem() {
    let addr = https_receiver().await;
    let (name, config) = webhook(addr, None);
    let sink = WebhookSink::from_config(0, &name, &config).expect("sink builds");
    match sink.deliver(&[record()], 0).await {
        Attempt::Retry { detail, .. } => {
            assert!(detail.to_lowercase().contains("certificate"), "the error names the certificate problem: {detail}")
        }
        other => panic!("an untrusted server must not count as delivered: {other:?}"),
    }
}

#[test]
fn an_unreadable_ca_file_is_refused_naming_the_sink_and_the_file() {
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let (name, config) = webhook(addr, Some("/nonexistent/ca.pem"));
    let Err(e) = WebhookSink::from_config(0, &name, &config) else { panic!("an unreadable ca_file must be refused") };
    let e = e.to_string();
    assert!(e.contains("sinks[0]") && e.contains("helpdesk") && e.contains("/nonexistent/ca.pem"), "{e}");
}
