//! AMI connection counters against the scripted server: a reconnection is
//! a login after a lost connection (`callbridge_ami_reconnects_total`);
//! every attempt, failed or not, counts in
//! `callbridge_ami_connect_attempts_total`. One test in this binary: it owns
//! the process's metrics recorder.

mod support;

use callbridge::ami::connection::SourceItem;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use std::collections::HashMap;
use std::sync::Mutex;
use support::client::TestClient;
use support::server::{AmiServer, ServerOptions};

/// Counter totals: a snapshot hands over what was counted since the last
/// one, so they are added up here.
struct Counters {
    snap: Snapshotter,
    totals: Mutex<HashMap<String, u64>>,
}

impl Counters {
    fn get(&self, name: &str) -> u64 {
        let mut totals = self.totals.lock().expect("not poisoned");
        for (k, _, _, v) in self.snap.snapshot().into_vec() {
            if let DebugValue::Counter(c) = v {
                *totals.entry(k.key().name().to_string()).or_default() += c;
            }
        }
        totals.get(name).copied().unwrap_or(0)
    }
}

#[tokio::test]
async fn reconnections_and_attempts_are_counted_apart() {
    let recorder = DebuggingRecorder::new();
    let counters = Counters { snap: recorder.snapshotter(), totals: Mutex::new(HashMap::new()) };
    recorder.install().expect("the only recorder of this test binary");

    // A PBX that closes every connection at once: attempts, no reconnection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            drop(sock);
        }
    });
    let server = AmiServer::start(ServerOptions::default().without_fully_booted()).await;
    let mut refused = server.client_config();
    refused.address = addr.to_string();
    let client = TestClient::spawn(refused);
    support::wait_until("3 attempts", || counters.get("callbridge_ami_connect_attempts_total") >= 3).await;
    assert_eq!(counters.get("callbridge_ami_reconnects_total"), 0, "never logged in: nothing to reconnect");
    client.stop().await.expect("clean stop");
    acceptor.abort();

    // A PBX that logs in, then loses the connection twice.
    let mut client = TestClient::spawn(server.client_config());
    for cut in 0..3 {
        let (_, item) = client.until(|i| matches!(i, SourceItem::Resync(_))).await;
        assert!(matches!(item, SourceItem::Resync(_)));
        if cut < 2 {
            server.cut();
            client.until(|i| matches!(i, SourceItem::Disconnected { .. })).await;
        }
    }
    assert_eq!(counters.get("callbridge_ami_reconnects_total"), 2);
    assert!(counters.get("callbridge_ami_connect_attempts_total") >= 3);
    client.stop().await.expect("clean stop");
}
