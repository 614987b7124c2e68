//! The outbox journal: an append-only log of fsync'd commits, in segment
//! files, the log of the outbox's journal tier (see "The journal tier" in
//! the outbox's documentation). The store's tables cost the writer about
//! eleven b-tree operations per event (an event row and its id, a pending
//! row and its index on append; the same deleted and the id moved to
//! `delivered` on acknowledgement), and most events are acknowledged within
//! a commit or two of being stored. Written here instead, an event costs
//! one sequential write and a share of one `fdatasync`
//! (`benches/outbox_writer.rs`: 0.35 µs of CPU per event against the
//! store's 6–9). This module is the log alone: what its entries say is the
//! outbox's business (`journaled.rs`).
//!
//! # Format
//!
//! A directory of segments named `journal-<16 hex digits>.log` (the
//! segment's number, from 1, in the order written). A segment is a 16-byte
//! header (the magic `CBJRNL\0\x01`, then the number, u64 little-endian)
//! followed by commits, one after another:
//!
//! ```text
//! commit  := len: u32 LE | crc: u32 LE | payload (len bytes, 1 ≤ len ≤ MAX_COMMIT_BYTES)
//! payload := entry+
//! entry   := len: u32 LE | bytes (len bytes)
//! crc     := CRC-32C of the 4 bytes of len, then of the payload
//! ```
//!
//! The checksum covers the length too, so a run of zeros (what a file
//! extended by a crash may hold) is never a valid commit.
//!
//! # Durability
//!
//! [`Journal::commit`] writes the whole commit with one positioned write
//! and returns only after `fdatasync`: then every entry of it survives a
//! crash or a power loss. A commit that fails (a full disk, an I/O error)
//! is cut off the file again, so what follows it starts where it began;
//! if even that fails, the journal refuses further commits
//! ([`JournalError::Broken`]) until it is opened again, which recovers
//! from what is on disk. A new segment is made on the first commit after
//! opening or rotating (opening writes nothing, except to cut a torn
//! tail), and the directory is fsync'd whenever a segment is made or
//! removed.
//!
//! # Recovery
//!
//! [`Journal::open`] reads the segments in order and hands every entry of
//! every valid commit to the caller. Commits are written one at a time,
//! each after the one before is durable, so only the last one written can
//! be torn, and only at the end of the newest segment. A commit that is
//! not valid there (short, a bad length, a bad checksum) is such a torn
//! write: it is dropped and the segment cut before it, *provided* it lies
//! within the room one unfinished commit could have taken
//! (`MAX_COMMIT_BYTES` and its header, from where it starts to the end of
//! the file) and no valid commit follows it. Anything else (a bad commit
//! further from the end, or followed by a valid one, a bad commit in an
//! older segment, a bad header on a segment that holds more than a
//! header) is damage, not a crash: opening fails with
//! [`JournalError::Corrupt`], naming the file and the offset, and changes
//! nothing on disk, so nothing committed is ever dropped in silence. Like
//! every write-ahead log that recovers to the last valid commit (SQLite's
//! WAL, LevelDB's log), a flipped bit inside the very last commit cannot
//! be told from a torn write, and that commit is dropped.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The first bytes of every segment.
const MAGIC: &[u8; 8] = b"CBJRNL\0\x01";
/// Bytes of a segment's header: the magic and the segment's number.
pub const HEADER_BYTES: u64 = 16;
/// Bytes before a commit's payload: its length and its checksum.
const COMMIT_HEADER_BYTES: usize = 8;
/// Bytes before an entry: its length.
const ENTRY_HEADER_BYTES: usize = 4;
/// The largest payload of one commit. It bounds the torn tail recovery
/// accepts (see "Recovery"), and the memory a commit takes. The outbox
/// commits at most a few thousand events (a few MB) at a time.
pub const MAX_COMMIT_BYTES: usize = 32 << 20;

/// What went wrong, with the file (and the offset) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("outbox journal: cannot {op} {path:?}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox journal {path:?} is damaged at byte {offset}: {reason}; nothing was changed on disk (move the file aside to start without it)")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("outbox journal: an entry of {entry} bytes does not fit in one commit ({MAX_COMMIT_BYTES} bytes at most, {pending} pending)")]
    TooLarge { entry: usize, pending: usize },
    #[error("outbox journal {path:?}: a failed commit could not be cut off the file; it must be opened again")]
    Broken { path: PathBuf },
}

impl JournalError {
    /// The disk (or the user's quota) is full.
    pub fn is_full(&self) -> bool {
        match self {
            JournalError::Io { source, .. } => {
                source.kind() == ErrorKind::StorageFull
                    || source.kind() == ErrorKind::QuotaExceeded
                    || source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
            }
            _ => false,
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io { op, path: path.to_path_buf(), source }
}

/// The file name of segment `n`.
fn segment_name(n: u64) -> String {
    format!("journal-{n:016x}.log")
}

/// The number of the segment named `name`, if it is one.
fn segment_number(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("journal-")?.strip_suffix(".log")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn checksum(len: u32, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), payload)
}

/// An append-only log of commits (see the module documentation).
pub struct Journal {
    dir: PathBuf,
    /// The segment commits go to; `None` until the first commit after
    /// opening or rotating makes it.
    open: Option<Segment>,
    /// The number of the newest segment made (0: none yet).
    newest: u64,
    /// Every segment on disk, by number, with its length up to its last
    /// durable commit (the open one included).
    sizes: BTreeMap<u64, u64>,
    /// The commit being gathered: room for its header, then its entries.
    block: Vec<u8>,
    /// A failed commit could not be cut off the open segment.
    broken: bool,
}

struct Segment {
    number: u64,
    path: PathBuf,
    file: File,
    /// Bytes up to the end of the last durable commit.
    len: u64,
}

impl Journal {
    /// Opens the journal in `dir` (made if missing), handing every entry of
    /// every valid commit to `each`, in the order written, with the number
    /// of the segment it is in. See "Recovery" for what is cut and what is
    /// refused.
    pub fn open(dir: &Path, mut each: impl FnMut(u64, &[u8])) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(io("create the directory", dir))?;
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io("list the directory", dir))? {
            let entry = entry.map_err(io("list the directory", dir))?;
            if let Some(n) = entry.file_name().to_str().and_then(segment_number) {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        // Every segment is read and checked before any entry is handed
        // over or anything is cut: a damaged journal is refused whole.
        let mut scans = Vec::with_capacity(numbers.len());
        for (i, &n) in numbers.iter().enumerate() {
            let path = dir.join(segment_name(n));
            let newest = i + 1 == numbers.len();
            scans.push((n, path.clone(), scan_segment(&path, n, newest)?));
        }
        let mut sizes = BTreeMap::new();
        let mut scratch = Vec::new();
        let mut removed = false;
        for (n, path, scan) in &scans {
            if scan.empty {
                // Torn while it was made: nothing was ever committed to it.
                match std::fs::remove_file(path) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io("remove", path)(e)),
                }
                continue;
            }
            if let Some(cut) = scan.cut {
                cut_file(path, cut)?;
            }
            replay_segment(path, scan, &mut scratch, |entry| each(*n, entry))?;
            sizes.insert(*n, scan.valid_len);
        }
        if removed {
            sync_dir(dir)?;
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
            open: None,
            newest: numbers.last().copied().unwrap_or(0),
            sizes,
            block: vec![0; COMMIT_HEADER_BYTES],
            broken: false,
        })
    }

    /// Adds an entry to the commit being gathered (nothing is written until
    /// [`Journal::commit`]). An entry that would take the commit past
    /// `MAX_COMMIT_BYTES` is refused and the commit is left as it was:
    /// commit what is gathered first.
    pub fn push(&mut self, entry: &[u8]) -> Result<(), JournalError> {
        self.push_with(|out| out.extend_from_slice(entry))
    }

    /// [`Journal::push`] of the entry `write` appends to the buffer it is
    /// given, written in place (no copy of it first).
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), JournalError> {
        let start = self.block.len();
        let pending = start - COMMIT_HEADER_BYTES;
        self.block.extend_from_slice(&[0; ENTRY_HEADER_BYTES]);
        write(&mut self.block);
        let entry = self.block.len() - start - ENTRY_HEADER_BYTES;
        let len = u32::try_from(entry).ok().filter(|_| pending + ENTRY_HEADER_BYTES + entry <= MAX_COMMIT_BYTES);
        let Some(len) = len else {
            self.block.truncate(start);
            return Err(JournalError::TooLarge { entry, pending });
        };
        if let Some(header) = self.block.get_mut(start..start + ENTRY_HEADER_BYTES) {
            header.copy_from_slice(&len.to_le_bytes());
        }
        Ok(())
    }

    /// Bytes gathered for the next commit (entries and their lengths).
    pub fn pending_bytes(&self) -> usize {
        self.block.len() - COMMIT_HEADER_BYTES
    }

    /// Drops the entries gathered since the last commit.
    pub fn discard(&mut self) {
        self.block.truncate(COMMIT_HEADER_BYTES);
    }

    /// Writes the entries gathered as one commit and returns once it is
    /// durable, with the number of the segment it is in (nothing gathered:
    /// nothing written). On an error the commit is not in the journal (it
    /// was cut off again) and its entries are dropped: gather them again to
    /// retry.
    pub fn commit(&mut self) -> Result<u64, JournalError> {
        if self.broken {
            let path = self.open.as_ref().map(|s| s.path.clone()).unwrap_or_else(|| self.dir.clone());
            return Err(JournalError::Broken { path });
        }
        if self.block.len() == COMMIT_HEADER_BYTES {
            return Ok(self.open.as_ref().map_or(self.newest, |s| s.number));
        }
        let result = self.write_block();
        self.block.truncate(COMMIT_HEADER_BYTES);
        result
    }

    fn write_block(&mut self) -> Result<u64, JournalError> {
        let payload_len = self.block.len() - COMMIT_HEADER_BYTES;
        // `push` keeps the payload within MAX_COMMIT_BYTES, which fits.
        let len = u32::try_from(payload_len).unwrap_or(u32::MAX);
        let crc = checksum(len, self.block.get(COMMIT_HEADER_BYTES..).unwrap_or_default());
        if let Some(header) = self.block.get_mut(..COMMIT_HEADER_BYTES) {
            header[..4].copy_from_slice(&len.to_le_bytes());
            header[4..].copy_from_slice(&crc.to_le_bytes());
        }
        let seg = match self.open.take() {
            Some(seg) => seg,
            None => self.make_segment()?,
        };
        let seg = self.open.insert(seg);
        let written = seg
            .file
            .write_all_at(&self.block, seg.len)
            .and_then(|()| seg.file.sync_data())
            .map_err(io("write to", &seg.path));
        match written {
            Ok(()) => {
                seg.len += self.block.len() as u64;
                self.sizes.insert(seg.number, seg.len);
                Ok(seg.number)
            }
            Err(e) => {
                // Cut the failed commit off, so the next one starts where
                // it began (and recovery never sees it as damage).
                if seg.file.set_len(seg.len).and_then(|()| seg.file.sync_data()).is_err() {
                    self.broken = true;
                }
                Err(e)
            }
        }
    }

    fn make_segment(&mut self) -> Result<Segment, JournalError> {
        let number = self.newest + 1;
        let path = self.dir.join(segment_name(number));
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io("create", &path))?;
        let mut header = [0u8; HEADER_BYTES as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&number.to_le_bytes());
        let made = file
            .write_all_at(&header, 0)
            .and_then(|()| file.sync_data())
            .map_err(io("write to", &path))
            .and_then(|()| sync_dir(&self.dir));
        if let Err(e) = made {
            // Nothing was committed to it: it goes (and a header torn by a
            // crash here is what recovery takes for an empty segment).
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.newest = number;
        self.sizes.insert(number, HEADER_BYTES);
        Ok(Segment { number, path, file, len: HEADER_BYTES })
    }

    /// Closes the open segment: the next commit goes to a new one. Returns
    /// the number of the newest segment made so far (every commit up to
    /// now is in it or an older one). Entries gathered stay gathered.
    pub fn rotate(&mut self) -> u64 {
        self.open = None;
        self.newest
    }

    /// Removes the segments numbered `through` and below, except the open
    /// one: their entries are kept elsewhere now.
    pub fn remove_through(&mut self, through: u64) -> Result<(), JournalError> {
        let open = self.open.as_ref().map(|s| s.number);
        let gone: Vec<u64> = self.sizes.range(..=through).map(|(&n, _)| n).filter(|&n| Some(n) != open).collect();
        if gone.is_empty() {
            return Ok(());
        }
        for n in gone {
            let path = self.dir.join(segment_name(n));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &path)(e)),
            }
            self.sizes.remove(&n);
        }
        sync_dir(&self.dir)
    }

    /// The segments on disk, oldest first.
    pub fn segments(&self) -> impl Iterator<Item = u64> + '_ {
        self.sizes.keys().copied()
    }

    /// Bytes of the open segment (0: none open).
    pub fn open_bytes(&self) -> u64 {
        self.open.as_ref().map_or(0, |s| s.len)
    }

    /// Bytes the journal's durable commits take on disk (segment headers
    /// included).
    pub fn bytes(&self) -> u64 {
        self.sizes.values().sum()
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync the directory", dir))
}

fn cut_file(path: &Path, len: u64) -> Result<(), JournalError> {
    let file = OpenOptions::new().write(true).open(path).map_err(io("open", path))?;
    file.set_len(len).and_then(|()| file.sync_all()).map_err(io("cut the torn tail of", path))
}

/// What reading a segment found.
struct Scan {
    /// The valid commits end here (the header's end when there are none).
    valid_len: u64,
    /// The file is longer: cut it here (a torn tail).
    cut: Option<u64>,
    /// The header is missing or torn (only for the newest segment, with
    /// nothing after it): no commits, and the file goes.
    empty: bool,
}

/// Reads one commit at `offset` of `data`: `Ok(Some(end))` if valid,
/// `Ok(None)` at the end of the data, `Err(reason)` if not valid.
fn read_commit(data: &[u8], offset: usize) -> Result<Option<usize>, String> {
    let rest = data.get(offset..).unwrap_or_default();
    if rest.is_empty() {
        return Ok(None);
    }
    let Some(head) = rest.first_chunk::<COMMIT_HEADER_BYTES>() else {
        return Err(format!("a commit header cut short ({} of {COMMIT_HEADER_BYTES} bytes)", rest.len()));
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len as usize > MAX_COMMIT_BYTES {
        return Err(format!("a commit length of {len} bytes"));
    }
    let end = COMMIT_HEADER_BYTES + len as usize;
    let Some(payload) = rest.get(COMMIT_HEADER_BYTES..end) else {
        return Err(format!("a commit of {len} bytes cut short ({} there)", rest.len() - COMMIT_HEADER_BYTES));
    };
    if checksum(len, payload) != crc {
        return Err(format!("a commit of {len} bytes whose checksum does not match"));
    }
    entries(payload, |_| {})?;
    Ok(Some(offset + end))
}

/// Calls `each` with every entry of a commit's payload.
fn entries(payload: &[u8], mut each: impl FnMut(&[u8])) -> Result<(), String> {
    let mut at = 0;
    while at < payload.len() {
        let rest = payload.get(at..).unwrap_or_default();
        let Some(len) = rest.first_chunk::<ENTRY_HEADER_BYTES>() else {
            return Err("an entry header cut short inside a commit".into());
        };
        let len = u32::from_le_bytes(*len) as usize;
        let Some(entry) = rest.get(ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + len) else {
            return Err(format!("an entry of {len} bytes overrunning its commit"));
        };
        each(entry);
        at += ENTRY_HEADER_BYTES + len;
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>, JournalError> {
    let mut data = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(io("read", path))?;
    Ok(data)
}

/// Checks segment `n` at `path` (see "Recovery"): where its valid commits
/// end, and where a torn tail of the newest segment is to be cut.
fn scan_segment(path: &Path, n: u64, newest: bool) -> Result<Scan, JournalError> {
    let data = read_file(path)?;
    let corrupt = |offset: u64, reason: String| JournalError::Corrupt { path: path.to_path_buf(), offset, reason };
    let header_ok =
        data.get(..8) == Some(&MAGIC[..]) && data.get(8..HEADER_BYTES as usize).is_some_and(|b| b == n.to_le_bytes());
    if !header_ok {
        // A crash while the segment was made leaves a short or unwritten
        // header and nothing after it: an empty segment. Anything else
        // is not ours, or damaged.
        if newest && data.len() as u64 <= HEADER_BYTES {
            return Ok(Scan { valid_len: 0, cut: None, empty: true });
        }
        return Err(corrupt(0, format!("not a journal segment header for segment {n}")));
    }
    let mut offset = HEADER_BYTES as usize;
    loop {
        match read_commit(&data, offset) {
            Ok(Some(end)) => offset = end,
            Ok(None) => return Ok(Scan { valid_len: offset as u64, cut: None, empty: false }),
            Err(reason) => {
                let torn = newest
                    && data.len() - offset <= COMMIT_HEADER_BYTES + MAX_COMMIT_BYTES
                    && !valid_commit_follows(&data, offset);
                if torn {
                    return Ok(Scan { valid_len: offset as u64, cut: Some(offset as u64), empty: false });
                }
                let reason = if newest {
                    format!("{reason}, with more after it than one unfinished commit leaves")
                } else {
                    format!("{reason}, in a segment older than the newest")
                };
                return Err(corrupt(offset as u64, reason));
            }
        }
    }
}

/// Whether the bad commit at `offset` states a length that ends inside the
/// data, right where a valid commit starts: then it is damage, as a torn
/// write is the last thing written.
fn valid_commit_follows(data: &[u8], offset: usize) -> bool {
    let Some(head) = data.get(offset..).and_then(|r| r.first_chunk::<4>()) else { return false };
    let next = offset + COMMIT_HEADER_BYTES + u32::from_le_bytes(*head) as usize;
    next < data.len() && matches!(read_commit(data, next), Ok(Some(_)))
}

fn replay_segment(
    path: &Path,
    scan: &Scan,
    scratch: &mut Vec<u8>,
    mut each: impl FnMut(&[u8]),
) -> Result<(), JournalError> {
    if scan.empty {
        return Ok(());
    }
    scratch.clear();
    File::open(path).and_then(|mut f| f.read_to_end(scratch)).map_err(io("read", path))?;
    let valid = scratch.get(..scan.valid_len as usize).unwrap_or_default();
    let mut offset = HEADER_BYTES as usize;
    while let Some(head) = valid.get(offset..).and_then(|r| r.first_chunk::<COMMIT_HEADER_BYTES>()) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let payload = valid.get(offset + COMMIT_HEADER_BYTES..offset + COMMIT_HEADER_BYTES + len).unwrap_or_default();
        // Checked by the scan: cannot fail.
        let _ = entries(payload, &mut each);
        offset += COMMIT_HEADER_BYTES + len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries_of(dir: &Path) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        let mut out = Vec::new();
        Journal::open(dir, |n, e| out.push((n, e.to_vec())))?;
        Ok(out)
    }

    fn commit_all(j: &mut Journal, entries: &[&[u8]]) -> u64 {
        for e in entries {
            j.push(e).unwrap();
        }
        j.commit().unwrap()
    }

    fn only_segment(dir: &Path) -> PathBuf {
        let mut segs: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).and_then(segment_number).is_some())
            .collect();
        assert_eq!(segs.len(), 1, "{segs:?}");
        segs.remove(0)
    }

    #[test]
    fn entries_come_back_in_order_with_their_segment_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| panic!("empty")).unwrap();
        assert_eq!(commit_all(&mut j, &[b"a", b"", b"ccc"]), 1);
        assert_eq!(commit_all(&mut j, &[b"d"]), 1);
        assert_eq!(j.commit().unwrap(), 1, "nothing gathered: nothing written");
        assert_eq!(j.rotate(), 1);
        assert_eq!(commit_all(&mut j, &[b"e"]), 2);
        let on_disk: u64 =
            j.segments().map(|n| std::fs::metadata(dir.path().join(segment_name(n))).unwrap().len()).sum();
        assert_eq!(j.bytes(), on_disk);
        drop(j);
        let got = entries_of(dir.path()).unwrap();
        let want: Vec<(u64, Vec<u8>)> =
            vec![(1, b"a".to_vec()), (1, vec![]), (1, b"ccc".to_vec()), (1, b"d".to_vec()), (2, b"e".to_vec())];
        assert_eq!(got, want);
        // Opened again: commits go to a new segment, after the others.
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        assert_eq!(commit_all(&mut j, &[b"f"]), 3);
        assert_eq!(entries_of(dir.path()).unwrap().last(), Some(&(3, b"f".to_vec())));
    }

    #[test]
    fn opening_writes_nothing_and_makes_no_segment_until_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j"), |_, _| {}).unwrap();
        assert_eq!(j.segments().count(), 0);
        assert_eq!(std::fs::read_dir(dir.path().join("j")).unwrap().count(), 0);
    }

    #[test]
    fn removed_segments_are_gone_and_the_open_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        commit_all(&mut j, &[b"1"]);
        let first = j.rotate();
        commit_all(&mut j, &[b"2"]);
        j.remove_through(first).unwrap();
        j.remove_through(99).unwrap();
        assert_eq!(j.segments().collect::<Vec<_>>(), vec![2], "the open segment is never removed");
        commit_all(&mut j, &[b"3"]);
        drop(j);
        assert_eq!(entries_of(dir.path()).unwrap(), vec![(2, b"2".to_vec()), (2, b"3".to_vec())]);
    }

    /// A crash can leave the newest segment cut anywhere inside the commit
    /// being written, or that commit's bytes partly written: recovery keeps
    /// exactly the commits that were whole, cuts the rest, and the journal
    /// goes on from there.
    #[test]
    fn a_torn_last_commit_is_cut_wherever_the_crash_left_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        commit_all(&mut j, &[b"first", b"second"]);
        let kept = std::fs::metadata(only_segment(dir.path())).unwrap().len();
        commit_all(&mut j, &[b"third commit, the one being written at the crash"]);
        drop(j);
        let seg = only_segment(dir.path());
        let whole = std::fs::read(&seg).unwrap();
        let mut tails: Vec<Vec<u8>> = (kept as usize..whole.len()).map(|n| whole[..n].to_vec()).collect();
        // The last commit's length written, its bytes not (zeros), or in
        // part (a hole of zeros inside).
        let mut zeros = whole.clone();
        zeros[kept as usize + 8..].fill(0);
        tails.push(zeros);
        let mut hole = whole.clone();
        hole[kept as usize + 12..kept as usize + 20].fill(0);
        tails.push(hole);
        let mut all_zero = whole.clone();
        all_zero[kept as usize..].fill(0);
        tails.push(all_zero);
        for tail in tails {
            std::fs::write(&seg, &tail).unwrap();
            let got = entries_of(dir.path()).unwrap_or_else(|e| panic!("{} bytes: {e}", tail.len()));
            assert_eq!(got, vec![(1, b"first".to_vec()), (1, b"second".to_vec())], "{} bytes", tail.len());
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), kept, "the torn tail is cut");
        }
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        commit_all(&mut j, &[b"after"]);
        drop(j);
        let got: Vec<Vec<u8>> = entries_of(dir.path()).unwrap().into_iter().map(|(_, e)| e).collect();
        assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec(), b"after".to_vec()]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever commits were made, and whatever a crash did to the last
        /// one (cut it anywhere, zeroed a run of its bytes) or left after
        /// it (bytes of no commit), recovery gives back every commit before
        /// it, whole and in order, and the journal goes on.
        #[test]
        fn recovery_keeps_every_commit_before_the_torn_one(
            commits in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..40), 1..5), 1..6),
            cut in 0.0f64..1.0,
            zero_from in 0.0f64..1.0,
            zero_len in 1usize..32,
            garbage in proptest::collection::vec(proptest::num::u8::ANY, 1..64),
            how in 0u8..3,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
            let mut ends = Vec::new();
            for c in &commits {
                for e in c {
                    j.push(e).unwrap();
                }
                j.commit().unwrap();
                ends.push(j.bytes() as usize);
            }
            drop(j);
            let seg = only_segment(dir.path());
            let mut data = std::fs::read(&seg).unwrap();
            let last_start = if ends.len() > 1 { ends[ends.len() - 2] } else { HEADER_BYTES as usize };
            let last_len = data.len() - last_start;
            let mut kept = commits.len() - 1;
            match how {
                0 => data.truncate(last_start + (cut * last_len as f64) as usize),
                1 => {
                    let from = last_start + (zero_from * last_len as f64) as usize;
                    let to = (from + zero_len).min(data.len());
                    if data[from..to].iter().all(|&b| b == 0) {
                        kept += 1; // nothing changed
                    }
                    data[from..to].fill(0);
                }
                _ => {
                    kept += 1;
                    data.extend_from_slice(&garbage);
                }
            }
            std::fs::write(&seg, &data).unwrap();
            let got: Vec<Vec<u8>> = entries_of(dir.path()).unwrap().into_iter().map(|(_, e)| e).collect();
            let want: Vec<Vec<u8>> = commits[..kept].iter().flatten().cloned().collect();
            proptest::prop_assert_eq!(got, want);
            let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
            j.push(b"after").unwrap();
            j.commit().unwrap();
            drop(j);
            let got = entries_of(dir.path()).unwrap();
            proptest::prop_assert_eq!(got.last().map(|(_, e)| e.as_slice()), Some(&b"after"[..]));
        }
    }

    #[test]
    fn a_segment_torn_while_it_was_made_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        commit_all(&mut j, &[b"kept"]);
        drop(j);
        for torn in [&b""[..], b"CBJ", &[0u8; 16]] {
            std::fs::write(dir.path().join(segment_name(2)), torn).unwrap();
            assert_eq!(entries_of(dir.path()).unwrap(), vec![(1, b"kept".to_vec())]);
            assert!(!dir.path().join(segment_name(2)).exists(), "the torn segment goes");
        }
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        assert_eq!(commit_all(&mut j, &[b"next"]), 2);
        drop(j);
        assert_eq!(entries_of(dir.path()).unwrap(), vec![(1, b"kept".to_vec()), (2, b"next".to_vec())]);
    }

    fn assert_refused_untouched(dir: &Path, seg: &Path, offset: u64) {
        let before = std::fs::read(seg).unwrap();
        match entries_of(dir) {
            Err(JournalError::Corrupt { path, offset: at, reason }) => {
                assert_eq!(path, seg);
                assert_eq!(at, offset, "{reason}");
                let shown = JournalError::Corrupt { path, offset: at, reason }.to_string();
                assert!(
                    shown.contains(&seg.display().to_string()) && shown.contains(&format!("byte {offset}")),
                    "{shown}"
                );
            }
            other => panic!("expected Corrupt at {offset}, got {other:?}"),
        }
        assert_eq!(std::fs::read(seg).unwrap(), before, "nothing is changed on disk");
    }

    #[test]
    fn a_damaged_commit_followed_by_a_valid_one_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        commit_all(&mut j, &[b"one"]);
        let second = std::fs::metadata(only_segment(dir.path())).unwrap().len();
        commit_all(&mut j, &[b"two"]);
        commit_all(&mut j, &[b"three"]);
        drop(j);
        let seg = only_segment(dir.path());
        let mut data = std::fs::read(&seg).unwrap();
        data[second as usize + 9] ^= 0x20; // a bit of "two"
        std::fs::write(&seg, &data).unwrap();
        assert_refused_untouched(dir.path(), &seg, second);
    }

    #[test]
    fn damage_further_from_the_end_than_one_commit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        commit_all(&mut j, &[b"one"]);
        drop(j);
        let seg = only_segment(dir.path());
        let mut data = std::fs::read(&seg).unwrap();
        let at = data.len() as u64;
        // A length field out of range, then more than any one commit.
        data.extend_from_slice(&[0xff; 8]);
        data.resize(data.len() + MAX_COMMIT_BYTES + 1, 7);
        std::fs::write(&seg, &data).unwrap();
        assert_refused_untouched(dir.path(), &seg, at);
    }

    #[test]
    fn a_torn_or_damaged_older_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        commit_all(&mut j, &[b"old"]);
        j.rotate();
        commit_all(&mut j, &[b"new"]);
        drop(j);
        let old = dir.path().join(segment_name(1));
        let data = std::fs::read(&old).unwrap();
        std::fs::write(&old, &data[..data.len() - 1]).unwrap();
        assert_refused_untouched(dir.path(), &old, HEADER_BYTES);
        let mut other = data.clone();
        other[3] = b'X';
        std::fs::write(&old, &other).unwrap();
        assert_refused_untouched(dir.path(), &old, 0);
    }

    #[test]
    fn a_segment_under_another_number_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        commit_all(&mut j, &[b"x"]);
        drop(j);
        let renamed = dir.path().join(segment_name(5));
        std::fs::rename(dir.path().join(segment_name(1)), &renamed).unwrap();
        assert_refused_untouched(dir.path(), &renamed, 0);
    }

    #[test]
    fn an_entry_that_does_not_fit_a_commit_is_refused_and_the_commit_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        j.push(b"small").unwrap();
        let big = vec![1u8; MAX_COMMIT_BYTES];
        let err = j.push(&big).unwrap_err();
        assert!(
            matches!(err, JournalError::TooLarge { entry, pending } if entry == big.len() && pending == 9),
            "{err}"
        );
        assert_eq!(j.pending_bytes(), 9);
        j.commit().unwrap();
        // The largest that fits on its own does.
        j.push(&big[..MAX_COMMIT_BYTES - ENTRY_HEADER_BYTES]).unwrap();
        j.commit().unwrap();
        drop(j);
        let got = entries_of(dir.path()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1.len(), MAX_COMMIT_BYTES - ENTRY_HEADER_BYTES);
    }

    #[test]
    fn discarded_entries_are_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), |_, _| {}).unwrap();
        j.push(b"dropped").unwrap();
        j.discard();
        commit_all(&mut j, &[b"kept"]);
        drop(j);
        assert_eq!(entries_of(dir.path()).unwrap(), vec![(1, b"kept".to_vec())]);
    }

    #[test]
    fn files_that_are_not_segments_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["journal-1.log", "journal-000000000000000g.log", "notes.txt", "journal-0000000000000001.log.bak"] {
            std::fs::write(dir.path().join(name), b"not ours").unwrap();
        }
        let mut j = Journal::open(dir.path(), |_, _| panic!("no segments")).unwrap();
        assert_eq!(commit_all(&mut j, &[b"x"]), 1);
    }
}
