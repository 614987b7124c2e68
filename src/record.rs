//! `callbridge record`: captures a live PBX's AMI event stream into trace
//! files that `callbridge replay` reads, so a support engineer can ship an
//! incident.
//!
//! A trace written here looks exactly like one captured on the wire: the
//! banner, a login reply, then every event frame byte for byte as Asterisk
//! sent it (the codec keeps each frame's raw bytes). What is never written:
//! the login exchange itself (challenge, key or secret — the reply line is a
//! fixed `Authentication accepted`), and the replies to callbridge's own
//! actions (pings). A reconnection starts with a new banner; the resync
//! listings the recorder asked for at each connection (`CoreShowChannels`,
//! `QueueStatus`) are written between two markers, dated by the PBX's clock,
//! so that `replay` runs the same resync at the same point (see
//! `crate::reconnect`): a trace spanning a PBX crash ends the crashed calls
//! `lost` exactly as the live daemon did.
//!
//! With `rotate_bytes`, a file that grew past the limit is closed at the next
//! frame boundary and the next one starts (`trace.ami`, `trace.1.ami`, …),
//! each a complete trace with its own banner.
//!
//! Trace files are created with mode 0600 (owner only): they hold callers'
//! phone numbers.

use crate::ami::connection::{spawn, SourceItem};
use crate::ami::ClientSettings;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// What a recording wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub files: Vec<PathBuf>,
    pub frames: u64,
    pub bytes: u64,
}

struct Writer {
    base: PathBuf,
    rotate_bytes: Option<u64>,
    file: Option<std::io::BufWriter<std::fs::File>>,
    written: u64,
    banner: String,
    stats: Recorded,
    /// The PBX's clock: the latest frame `Timestamp` and when it was seen.
    clock: Option<(i64, std::time::Instant)>,
}

impl Writer {
    fn path_for(&self, n: usize) -> PathBuf {
        if n == 0 {
            return self.base.clone();
        }
        let stem = self.base.file_stem().and_then(|s| s.to_str()).unwrap_or("trace");
        let ext = self.base.extension().and_then(|s| s.to_str()).unwrap_or("ami");
        self.base.with_file_name(format!("{stem}.{n}.{ext}"))
    }

    fn open_next(&mut self) -> std::io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        let path = self.path_for(self.stats.files.len());
        let f = create_trace(&path)?;
        info!(trace = %path.display(), "recording");
        self.stats.files.push(path);
        self.file = Some(std::io::BufWriter::new(f));
        self.written = 0;
        self.greet()
    }

    /// The banner and a login reply without any credential.
    fn greet(&mut self) -> std::io::Result<()> {
        let head = format!(
            "Asterisk Call Manager/{}\r\nResponse: Success\r\nActionID: rec-1\r\nMessage: Authentication accepted\r\n\r\n",
            self.banner
        );
        self.write(head.as_bytes())
    }

    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            self.open_next()?;
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(b)?;
        }
        self.written += b.len() as u64;
        self.stats.bytes += b.len() as u64;
        Ok(())
    }

    fn frame(&mut self, raw: &[u8]) -> std::io::Result<()> {
        if self.rotate_bytes.is_some_and(|max| self.written >= max) {
            self.open_next()?;
        }
        self.write(raw)?;
        self.write(b"\r\n")?;
        self.stats.frames += 1;
        Ok(())
    }

    /// The PBX's time now, as the daemon's pipeline reckons it.
    fn pbx_now(&self) -> i64 {
        match self.clock {
            Some((t, at)) => t.saturating_add(i64::try_from(at.elapsed().as_micros()).unwrap_or(i64::MAX)),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// Creates (or truncates) a trace file readable by its owner only: traces
/// hold callers' phone numbers. An existing file keeps its mode. The error
/// names the path.
fn create_trace(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create trace {}: {e}", path.display())))
}

/// Fails early, naming the directory, when `out` cannot be created because
/// its directory does not exist (rather than after connecting to the PBX).
fn check_out_dir(out: &Path) -> std::io::Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("cannot create trace {}: {} is not a directory", out.display(), dir.display()),
        )),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("cannot create trace {}: directory {}: {e}", out.display(), dir.display()),
        )),
    }
}

/// Records until `shutdown` (or the AMI client gives up, e.g. bad
/// credentials). `rotate_bytes`: start a new file past this size. `ami`:
/// the client's settings (a `[pbx.ami]` converts through
/// `settings::ami_client`).
pub async fn record(
    ami: impl Into<ClientSettings>,
    out: &Path,
    rotate_bytes: Option<u64>,
    shutdown: CancellationToken,
) -> anyhow::Result<Recorded> {
    check_out_dir(out)?;
    let ami = ami.into();
    let capacity = ami.event_queue_capacity.max(1);
    // Full channel: the AMI reader waits for the disk.
    let (tx, mut rx) = mpsc::channel(capacity);
    let (_handle, task) = spawn(ami, tx, shutdown.clone());
    let mut w = Writer {
        base: out.to_path_buf(),
        rotate_bytes,
        file: None,
        written: 0,
        banner: String::new(),
        stats: Recorded::default(),
        clock: None,
    };
    let mut flush = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                Some(SourceItem::Connected { banner }) => {
                    w.banner = banner;
                    if w.file.is_none() { w.open_next()?; } else { w.greet()?; }
                }
                Some(SourceItem::Frame(f)) => {
                    if let Some(t) = f.timestamp_micros() {
                        w.clock = Some((t, std::time::Instant::now()));
                    }
                    w.frame(f.as_bytes())?
                }
                Some(SourceItem::Resync(r)) => {
                    let at = w.pbx_now();
                    w.write(&crate::reconnect::resync_frames(at, &r.channels, &r.queue_items))?;
                }
                Some(SourceItem::Disconnected { .. }) => {}
                None => break,
            },
            _ = flush.tick() => w.flush()?,
        }
    }
    w.flush()?;
    match task.await {
        Ok(Err(e)) if e.is_fatal() => Err(e.into()),
        _ => Ok(w.stats),
    }
}
