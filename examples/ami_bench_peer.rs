//! callbridge as a peer of the AMI client benchmark in the shared bench
//! (`benches/ami_peers.py` runs it beside the other libraries): connects to
//! the fake AMI server, logs in, and runs every event through the real
//! pipeline front — the connection task (codec, bounded channel with
//! backpressure) and the normalizer — on ONE core (current-thread runtime),
//! until `UserEvent: BenchEnd`. Prints the harness's `RESULT` line.
//!
//! `cargo run --release --example ami_bench_peer -- --port 5038 --expect 1000000`

use callbridge::ami::connection::{spawn, SourceItem};
use callbridge::config::Config;
use std::time::Instant;

const CONFIG: &str = r#"
[pbx]
name = "bench"
[[groups]]
id = "support"
queue = "700"
agents = ["a1", "a2", "a3"]
[[agents]]
id = "a1"
extension = "1001"
[[agents]]
id = "a2"
extension = "1002"
[[agents]]
id = "a3"
extension = "1003"
"#;

fn main() {
    let mut port = 5038u16;
    let mut expect = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).unwrap_or(port),
            "--expect" => expect = args.next().and_then(|p| p.parse().ok()).unwrap_or(0),
            "--host" => {
                args.next();
            }
            other => eprintln!("ignoring argument {other}"),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let config = Config::parse(CONFIG, "bench").expect("bench config");
        let ami: callbridge::config::AmiConfig = toml::from_str(&format!(
            "address = \"127.0.0.1:{port}\"\nusername = \"bench\"\nsecret = \"bench\"\n\
             ping_interval_seconds = 600.0\nevent_queue_capacity = 8192\n"
        ))
        .expect("AMI config");
        let mut normalizer = callbridge::settings::normalizer(&config);
        let (tx, mut rx) = tokio::sync::mpsc::channel(8192);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (_handle, task) = spawn(callbridge::settings::ami_client(&ami), tx, shutdown.clone());
        let mut out = Vec::with_capacity(64);
        let (mut events, mut lifecycle) = (0u64, 0u64);
        let mut t0: Option<Instant> = None;
        let mut t_end = Instant::now();
        // The pipeline takes what the reader has queued in one go.
        let mut items = Vec::with_capacity(256);
        'read: while rx.recv_many(&mut items, 256).await > 0 {
            for item in items.drain(..) {
                let SourceItem::Frame(f) = item else { continue };
                if f.event() == Some("UserEvent") && f.get("UserEvent") == Some("BenchEnd") {
                    t_end = Instant::now();
                    break 'read;
                }
                if f.event().is_none() {
                    continue;
                }
                t0.get_or_insert_with(Instant::now);
                events += 1;
                normalizer.handle(&f, 0, &mut out);
                lifecycle += out.len() as u64;
                out.clear();
            }
        }
        shutdown.cancel();
        let _ = task.await;
        let secs = t0.map(|t| t_end.duration_since(t).as_secs_f64()).unwrap_or(0.0);
        println!(
            "RESULT peer=callbridge events={events} seconds={secs:.6} lifecycle_events={lifecycle} expected={expect} dropped=0"
        );
    });
}
