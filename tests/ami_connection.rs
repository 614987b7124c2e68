//! The live AMI client against the scripted server on loopback: login,
//! correlation of concurrent actions, lists, resync, reconnects after cuts,
//! keepalive, backpressure and TLS.

mod support;

use callbridge::ami::connection::{ActionError, AmiError, ConnectionState, SourceItem};
use callbridge::ami::{Action, Frame};
use callbridge::config::AmiAuth;
use md5::{Digest, Md5};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::client::{event_names, frames_of, TestClient};
use support::server::{headers, AmiServer, Reply, ServerOptions};
use support::trace;
use tokio::sync::mpsc;

fn md5_hex(s: &str) -> String {
    format!("{:x}", Md5::digest(s.as_bytes()))
}

/// Reads Connected, the login's FullyBooted and the Resync of a fresh
/// connection; returns the Resync.
async fn expect_session_start(client: &mut TestClient) -> callbridge::ami::Resync {
    match client.next().await {
        SourceItem::Connected { banner } => assert_eq!(banner, "9.0.0"),
        other => panic!("expected Connected, got {other:?}"),
    }
    let (before, resync) = client.until(|i| matches!(i, SourceItem::Resync(_))).await;
    assert!(
        event_names(&before).iter().all(|e| e == "FullyBooted"),
        "only the login's events before the resync: {before:?}"
    );
    match resync {
        SourceItem::Resync(r) => r,
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn md5_login_connects_and_resyncs() {
    let server = AmiServer::start(ServerOptions::default()).await;
    let mut client = TestClient::spawn(server.client_config());
    let resync = expect_session_start(&mut client).await;
    assert!(resync.channels.is_empty() && resync.queue_items.is_empty());
    assert!(client.handle.is_connected());

    let actions = server.actions();
    let names: Vec<&str> = actions.iter().map(|a| a.name()).collect();
    assert_eq!(names, ["Challenge", "Login", "CoreShowChannels", "QueueStatus"]);
    assert_eq!(actions[0].get("AuthType"), Some("MD5"));
    let challenge = "100007919"; // the server's challenge for connection 1
    let login = &actions[1];
    let mut fields = login.headers();
    fields.retain(|(k, _)| k != "ActionID");
    assert_eq!(
        fields,
        headers(&[
            ("Action", "Login"),
            ("Username", "callbridge"),
            ("AuthType", "MD5"),
            ("Key", &md5_hex(&format!("{challenge}s3cret-lab"))),
        ]),
        "MD5 login never sends the secret"
    );
    let ids: HashSet<&str> = actions.iter().filter_map(|a| a.get("ActionID")).collect();
    assert_eq!(ids.len(), actions.len(), "every action has its own ActionID");

    assert_eq!(client.stop().await.ok(), Some(()));
    server.wait_actions("Logoff", 1).await;
}

#[tokio::test]
async fn plaintext_login_only_when_configured() {
    let server = AmiServer::start(ServerOptions::default()).await;
    let mut config = server.client_config();
    config.auth = AmiAuth::Plain;
    let mut client = TestClient::spawn(config);
    expect_session_start(&mut client).await;
    let login = &server.actions_named("Login")[0];
    assert_eq!(login.get("Secret"), Some("s3cret-lab"));
    assert_eq!(login.get("Key"), None);
    assert!(server.actions_named("Challenge").is_empty());
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn wrong_secret_fails_once_and_does_not_retry() {
    let server = AmiServer::start(ServerOptions::default()).await;
    let mut config = server.client_config();
    config.secret.secret = Some("wrong".into());
    let client = TestClient::spawn(config);
    let result = tokio::time::timeout(support::WAIT, client.task).await.expect("task ends").expect("no panic");
    let err = result.expect_err("bad credentials end the task");
    assert!(matches!(err, AmiError::AuthenticationFailed { ref message, .. } if message == "Authentication failed"));
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert_eq!(*client.handle.state().borrow(), ConnectionState::Stopped);
    // Well past the reconnect cap (200 ms): still exactly one attempt.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!((server.accepted(), server.failed_logins(), server.actions_named("Login").len()), (1, 1, 1));
    assert_eq!(client.handle.send(Action::new("Ping")).await, Err(ActionError::Stopped));
}

#[tokio::test]
async fn concurrent_actions_get_their_own_replies_out_of_order() {
    const N: usize = 50;
    // The server answers later actions first, so replies come back in the
    // reverse order of the requests.
    let options = ServerOptions::default()
        .on("Getvar", |a| {
            let var = a.get("Variable").unwrap_or("").to_string();
            let i: u64 = var.trim_start_matches("v").parse().unwrap_or(0);
            Reply::success(&[("Variable", &var), ("Value", &format!("value-of-{var}"))])
                .after(Duration::from_millis((N as u64 - i) * 4))
        })
        .on("Status", |a| {
            let chan = a.get("Channel").unwrap_or("").to_string();
            let item = |n: &str| headers(&[("Event", "Status"), ("Channel", &chan), ("Item", n)]);
            let i: u64 = chan.trim_start_matches("SIP/").parse().unwrap_or(0);
            Reply::list(vec![item("1"), item("2")], "StatusComplete").after(Duration::from_millis((10 - i) * 7))
        });
    let server = AmiServer::start(options).await;
    let mut client = TestClient::spawn(server.client_config());
    expect_session_start(&mut client).await;

    let mut tasks = Vec::new();
    for i in 0..N {
        let h = client.handle.clone();
        tasks.push(tokio::spawn(async move {
            let reply = h.send(Action::new("Getvar").header("Variable", format!("v{i}"))).await.expect("reply");
            assert_eq!(reply.get("Value"), Some(format!("value-of-v{i}").as_str()));
        }));
    }
    for i in 0..10 {
        let h = client.handle.clone();
        tasks.push(tokio::spawn(async move {
            let chan = format!("SIP/{i}");
            let list = h.send_list(Action::new("Status").header("Channel", chan.clone())).await.expect("list");
            let items: Vec<(Option<&str>, Option<&str>)> =
                list.items.iter().map(|f| (f.get("Channel"), f.get("Item"))).collect();
            assert_eq!(items, vec![(Some(chan.as_str()), Some("1")), (Some(chan.as_str()), Some("2"))]);
        }));
    }
    for t in tasks {
        t.await.expect("correlated reply");
    }
    let ids: HashSet<String> = server.actions().iter().filter_map(|a| a.get("ActionID").map(str::to_string)).collect();
    assert_eq!(ids.len(), server.actions().len());
    // No reply or list item leaked into the event stream.
    assert!(client.try_next(Duration::from_millis(100)).await.is_none());
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn lists_are_collected_while_events_keep_flowing() {
    // The test writes the list itself, with unsolicited events in between.
    let (ids_tx, mut ids_rx) = mpsc::unbounded_channel::<String>();
    let seen = AtomicUsize::new(0);
    let options = ServerOptions::default().on("CoreShowChannels", move |a| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            // The resync's own list, right after login.
            return Reply::list(Vec::new(), "CoreShowChannelsComplete");
        }
        let _ = ids_tx.send(a.get("ActionID").unwrap_or("").to_string());
        Reply::Silence
    });
    let server = AmiServer::start(options).await;
    let mut client = TestClient::spawn(server.client_config());
    expect_session_start(&mut client).await;

    let h = client.handle.clone();
    let list = tokio::spawn(async move { h.send_list(Action::new("CoreShowChannels")).await });
    let id = tokio::time::timeout(support::WAIT, ids_rx.recv()).await.expect("action arrives").expect("id");
    let chan = |n: &str| {
        server.send_frame(&[("Event", "CoreShowChannel"), ("ActionID", &id), ("Channel", n), ("Linkedid", "1.1")])
    };
    server.send_frame(&[("Response", "Success"), ("ActionID", &id), ("EventList", "start")]);
    chan("SIP/carrier00-00000002");
    server.send_frame(&[("Event", "Newchannel"), ("Channel", "SIP/2000-00000003")]);
    chan("SIP/2000-00000003");
    server.send_frame(&[("Event", "OriginateResponse"), ("ActionID", "not-ours-1"), ("Response", "Failure")]);
    server.send_frame(&[
        ("Event", "CoreShowChannelsComplete"),
        ("ActionID", &id),
        ("EventList", "Complete"),
        ("ListItems", "2"),
    ]);
    server.send_frame(&[("Event", "Hangup"), ("Channel", "SIP/2000-00000003")]);

    let list = list.await.expect("no panic").expect("list collected");
    assert_eq!(list.response.get("EventList"), Some("start"));
    let channels: Vec<&str> = list.items.iter().filter_map(|f| f.get("Channel")).collect();
    assert_eq!(channels, ["SIP/carrier00-00000002", "SIP/2000-00000003"]);
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(client.next().await);
    }
    assert_eq!(event_names(&events), ["Newchannel", "OriginateResponse", "Hangup"]);
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn resync_carries_channels_and_queue_state() {
    let options = ServerOptions::default()
        .on("CoreShowChannels", |_| {
            Reply::list(
                vec![
                    headers(&[("Event", "CoreShowChannel"), ("Channel", "SIP/carrier00-1"), ("Linkedid", "1.1")]),
                    headers(&[("Event", "CoreShowChannel"), ("Channel", "SIP/2000-2"), ("Linkedid", "1.1")]),
                ],
                "CoreShowChannelsComplete",
            )
        })
        .on("QueueStatus", |_| {
            Reply::list(
                vec![
                    headers(&[("Event", "QueueParams"), ("Queue", "700")]),
                    headers(&[("Event", "QueueMember"), ("Queue", "700"), ("Name", "Local/2000@agents/n")]),
                    headers(&[("Event", "QueueEntry"), ("Queue", "700"), ("Position", "1")]),
                ],
                "QueueStatusComplete",
            )
        });
    let server = AmiServer::start(options).await;
    let mut client = TestClient::spawn(server.client_config());
    let resync = expect_session_start(&mut client).await;
    let channels: Vec<&str> = resync.channels.iter().filter_map(|f| f.get("Channel")).collect();
    assert_eq!(channels, ["SIP/carrier00-1", "SIP/2000-2"]);
    let queue: Vec<&str> = resync.queue_items.iter().filter_map(|f| f.event()).collect();
    assert_eq!(queue, ["QueueParams", "QueueMember", "QueueEntry"]);
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn connection_cuts_reconnect_resync_and_lose_or_repeat_nothing() {
    let options = ServerOptions::default().without_fully_booted();
    let server = AmiServer::start(options).await;
    let mut client = TestClient::spawn(server.client_config());
    expect_session_start(&mut client).await;

    let events = trace::events_part(&trace::load("a01-inbound-answered.ami")).to_vec();
    let expected = trace::frames(&trace::decode(&events));
    let ends = trace::frame_ends(&events);
    assert_eq!(ends.len(), expected.len());
    // Cuts: inside a header line, at a line end inside a frame, one byte
    // before a frame's end (the closing "\n" missing), exactly at a frame end.
    let line_end_inside = |frame: usize| {
        let start = ends[frame - 1];
        start + events[start..].windows(2).position(|w| w == b"\r\n").expect("a line") + 2
    };
    let cuts = [ends[4] + 7, line_end_inside(20), ends[40] - 1, ends[60]];

    let mut delivered: Vec<Frame> = Vec::new();
    let mut sent_from = 0;
    for (round, &cut) in cuts.iter().enumerate() {
        // Resend from the start of the first frame not fully sent before.
        server.send_bytes_then_cut(&events[sent_from..], cut - sent_from);
        let fully_sent = ends.iter().filter(|&&e| e <= cut).count();
        let (before, gone) = client.until(|i| matches!(i, SourceItem::Disconnected { .. })).await;
        assert!(matches!(gone, SourceItem::Disconnected { ref reason } if reason.contains("closed")), "{gone:?}");
        delivered.extend(frames_of(&before));
        assert_eq!(delivered.len(), fully_sent, "round {round}: frames fully sent before the cut, once each");
        expect_session_start(&mut client).await;
        assert_eq!(server.current_conn(), round + 2);
        sent_from = ends[fully_sent - 1];
    }
    server.send_bytes(&events[sent_from..]);
    while delivered.len() < expected.len() {
        match client.next().await {
            SourceItem::Frame(f) => delivered.push(f),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delivered, expected, "every frame exactly once, in order");
    assert!(client.try_next(Duration::from_millis(100)).await.is_none());

    // Every connection ran the resync.
    for name in ["CoreShowChannels", "QueueStatus"] {
        let conns: Vec<usize> = server.actions_named(name).iter().map(|a| a.conn).collect();
        assert_eq!(conns, [1, 2, 3, 4, 5], "{name} after every (re)connection");
    }
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn reconnect_delays_stay_under_the_cap() {
    // A PBX that accepts and closes at once: the client keeps retrying,
    // each wait at most reconnect_max_seconds (0.2 s) plus connect time.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let times = Arc::new(Mutex::new(Vec::new()));
    let t = times.clone();
    let acceptor = tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            t.lock().expect("not poisoned").push(tokio::time::Instant::now());
            drop(sock);
        }
    });
    let server = AmiServer::start(ServerOptions::default()).await; // only for a config
    let mut config = server.client_config();
    config.address = addr.to_string();
    let mut client = TestClient::spawn(config);
    support::wait_until("6 connection attempts", || times.lock().expect("not poisoned").len() >= 6).await;
    assert!(!client.handle.is_connected());
    assert_eq!(client.handle.send(Action::new("Ping")).await, Err(ActionError::NotConnected));
    assert!(client.try_next(Duration::from_millis(50)).await.is_none(), "no Connected/Disconnected without a login");
    let times = times.lock().expect("not poisoned").clone();
    for gap in times.windows(2).map(|w| w[1] - w[0]) {
        assert!(gap <= Duration::from_millis(200 + 250), "gap {gap:?} exceeds the cap");
    }
    client.stop().await.expect("clean stop");
    acceptor.abort();
}

#[tokio::test]
async fn slow_consumer_makes_the_reader_wait_and_nothing_is_dropped() {
    const N: usize = 5000;
    // The first keepalive Ping is answered by the test, behind a burst.
    let (ping_tx, mut ping_rx) = mpsc::unbounded_channel::<String>();
    let first = AtomicUsize::new(0);
    let options = ServerOptions::default().on("Ping", move |a| {
        if first.fetch_add(1, Ordering::SeqCst) == 0 {
            let _ = ping_tx.send(a.get("ActionID").unwrap_or("").to_string());
            return Reply::Silence;
        }
        Reply::success(&[("Ping", "Pong")])
    });
    let server = AmiServer::start(options).await;
    let mut config = server.client_config();
    config.event_queue_capacity = 4;
    config.ping_interval_seconds = 0.1;
    config.action_timeout_seconds = 0.3;
    let mut client = TestClient::spawn(config);
    expect_session_start(&mut client).await;

    let ping_id = tokio::time::timeout(support::WAIT, ping_rx.recv()).await.expect("idle ping").expect("id");
    let event = |i: usize| {
        support::server::encode(&headers(&[("Event", "UserEvent"), ("UserEvent", "Load"), ("Seq", &i.to_string())]))
    };
    // Four bursts; before each is read the consumer stalls longer than ping
    // interval + action timeout while the Ping's reply is still to come:
    // the blocked reader must neither drop events nor take the stall for a
    // dead PBX, even when the socket runs dry right after the stall.
    for chunk in 0..4 {
        let burst: Vec<u8> = (chunk * N / 4..(chunk + 1) * N / 4).flat_map(event).collect();
        server.send_bytes(&burst);
        tokio::time::sleep(Duration::from_millis(600)).await;
        for i in chunk * N / 4..(chunk + 1) * N / 4 {
            match client.next().await {
                SourceItem::Frame(f) => assert_eq!(f.get("Seq"), Some(i.to_string().as_str())),
                other => panic!("unexpected {other:?} at {i}"),
            }
        }
    }
    server.send_frame(&[("Response", "Success"), ("ActionID", &ping_id), ("Ping", "Pong")]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.accepted(), 1, "no reconnect");
    assert!(client.handle.is_connected());
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn pings_when_idle() {
    let server = AmiServer::start(ServerOptions::default()).await;
    let mut config = server.client_config();
    config.ping_interval_seconds = 0.1;
    let mut client = TestClient::spawn(config);
    expect_session_start(&mut client).await;
    server.wait_actions("Ping", 3).await;
    assert_eq!(server.accepted(), 1);
    assert!(client.try_next(Duration::from_millis(10)).await.is_none(), "pongs are not events");
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn unanswered_ping_is_a_connection_loss() {
    let server = AmiServer::start(ServerOptions::default().on("Ping", |_| Reply::Silence)).await;
    let mut config = server.client_config();
    config.ping_interval_seconds = 0.1;
    config.action_timeout_seconds = 0.3;
    let mut client = TestClient::spawn(config);
    expect_session_start(&mut client).await;
    let (_, gone) = client.until(|i| matches!(i, SourceItem::Disconnected { .. })).await;
    assert!(matches!(gone, SourceItem::Disconnected { ref reason } if reason.contains("Ping")), "{gone:?}");
    expect_session_start(&mut client).await;
    assert_eq!(server.logins(), 2);
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn action_errors_are_clear() {
    let server = AmiServer::start(ServerOptions::default().on("Getvar", |_| Reply::Silence)).await;
    let mut config = server.client_config();
    config.action_timeout_seconds = 0.3;
    let mut client = TestClient::spawn(config);
    expect_session_start(&mut client).await;

    let r = client.handle.send(Action::new("NoSuchAction")).await;
    assert!(
        matches!(r, Err(ActionError::Rejected { ref message, .. }) if message == "Invalid/unknown command"),
        "{r:?}"
    );
    let r = client.handle.send(Action::new("Getvar").header("Variable", "X")).await;
    assert!(matches!(r, Err(ActionError::Timeout { .. })), "{r:?}");
    let before = server.actions().len();
    let r = client.handle.send(Action::new("Setvar").header("Value", "x\r\nAction: Originate")).await;
    assert!(matches!(r, Err(ActionError::Invalid(_))), "{r:?}");
    let pong = client.handle.send(Action::new("Ping")).await.expect("still connected after a timeout");
    assert_eq!(pong.get("Ping"), Some("Pong"));
    assert_eq!(server.actions().len(), before + 1, "the refused action never reached the PBX");
    assert_eq!(server.accepted(), 1);
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn tls_login_and_events() {
    let server = AmiServer::start(ServerOptions::default().tls()).await;
    let mut client = TestClient::spawn(server.client_config());
    expect_session_start(&mut client).await;
    server.send_frame(&[("Event", "Newchannel"), ("Channel", "SIP/2000-1")]);
    match client.next().await {
        SourceItem::Frame(f) => assert_eq!(f.get("Channel"), Some("SIP/2000-1")),
        other => panic!("unexpected {other:?}"),
    }
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn tls_with_an_untrusted_certificate_never_logs_in_but_retries() {
    let server = AmiServer::start(ServerOptions::default().tls()).await;
    let mut config = server.client_config();
    config.tls_ca_file = None; // the test CA is not a public root
    let mut client = TestClient::spawn(config);
    server.wait_accepted(3).await;
    assert_eq!(server.logins(), 0);
    assert!(client.try_next(Duration::from_millis(10)).await.is_none());
    client.stop().await.expect("clean stop");
}

#[tokio::test]
async fn invalid_settings_end_the_task_at_once() {
    let server = AmiServer::start(ServerOptions::default()).await;
    let mut config = server.client_config();
    config.reconnect_max_seconds = 0.0;
    let client = TestClient::spawn(config);
    let r = tokio::time::timeout(support::WAIT, client.task).await.expect("ends").expect("no panic");
    assert!(matches!(r, Err(AmiError::InvalidSetting { field: "reconnect_max_seconds", .. })), "{r:?}");
    assert_eq!(server.accepted(), 0);
}
