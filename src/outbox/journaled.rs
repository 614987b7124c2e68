//! Events held in the journal (see "The journal tier" in the module
//! documentation): what the writer keeps of each, how it is written to and
//! read back from the journal, and how it leaves: as delivered when its
//! sink acknowledged it in time, as a row of the store otherwise.

use super::journal::{Journal, JournalError};
use super::{NewRecord, OutboxError, Record, StoreError};
use rusqlite::{params, Connection};
use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// The journal's directory inside the outbox directory.
pub(crate) const JOURNAL_DIR: &str = "journal";

/// An event row, as an append or a settle writes it (`?7` the digest);
/// `ON CONFLICT(id) DO NOTHING`: an id the store has is not written again.
pub(crate) const INSERT_EVENT: &str =
    "INSERT INTO events(seq, id, key, type, body, appended_at, digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
     ON CONFLICT(id) DO NOTHING";
/// A sink's pending row for the event at `?2` (its position is its seq).
pub(crate) const INSERT_PENDING: &str = "INSERT INTO pending(sink, pos, seq) VALUES (?1, ?2, ?2)";
/// An id (and digest) remembered as delivered.
pub(crate) const INSERT_DELIVERED: &str = "INSERT OR IGNORE INTO delivered(id, done_at, digest) VALUES (?1, ?2, ?3)";

/// Whether the store has this id, pending, parked or delivered.
pub(crate) fn stored_or_delivered(c: &Connection, id: &str) -> Result<bool, rusqlite::Error> {
    c.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM events WHERE id = ?1) OR EXISTS(SELECT 1 FROM delivered WHERE id = ?1)",
    )?
    .query_row([id], |r| r.get(0))
}

/// The tag of an event's entry (the only kind so far).
const EVENT: u8 = b'E';

/// An event stored in the journal and not (yet) in the store's tables.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub pos: i64,
    pub id: Arc<str>,
    key: Arc<str>,
    kind: Cow<'static, str>,
    pub body: Arc<str>,
    digest: [u8; 32],
    pub appended_at: i64,
    /// Its only sink acknowledged it: it leaves as delivered.
    pub acked: bool,
    /// The journal segment it is in.
    pub segment: u64,
}

impl Held {
    pub(crate) fn new(r: &NewRecord, pos: i64, appended_at: i64) -> Held {
        Held {
            pos,
            id: r.id.clone(),
            key: r.key.clone(),
            kind: Cow::Borrowed(r.kind),
            body: r.body.clone(),
            digest: r.digest,
            appended_at,
            acked: false,
            segment: 0,
        }
    }

    /// As sinks read it.
    pub(crate) fn record(&self) -> Record {
        Record {
            pos: self.pos,
            seq: self.pos,
            id: self.id.clone(),
            key: self.key.clone(),
            kind: self.kind.clone(),
            body: self.body.clone(),
            appended_at: self.appended_at,
        }
    }

    /// Its journal entry: the tag, `appended_at`, then id, key, type and
    /// JSON (each a u32 length and its bytes), then the digest. The
    /// position is not in it: one is given again when it is read back.
    pub(crate) fn write_entry(&self, out: &mut Vec<u8>) {
        out.push(EVENT);
        out.extend_from_slice(&self.appended_at.to_le_bytes());
        for field in [self.id.as_bytes(), self.key.as_bytes(), self.kind.as_bytes(), self.body.as_bytes()] {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field);
        }
        out.extend_from_slice(&self.digest);
    }

    /// Reads an entry written by [`Held::write_entry`], at position `pos`,
    /// found in journal segment `segment`.
    pub(crate) fn parse(entry: &[u8], pos: i64, segment: u64) -> Result<Held, String> {
        let mut rest = entry;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let (head, tail) =
                rest.split_at_checked(n).ok_or_else(|| format!("an event entry cut short ({} bytes)", entry.len()))?;
            rest = tail;
            Ok(head)
        };
        if take(1)? != [EVENT] {
            return Err(format!("an entry of unknown kind {:?}", entry.first()));
        }
        let appended_at = i64::from_le_bytes(take(8)?.try_into().map_err(|_| "appended_at")?);
        let mut text = |what: &str| -> Result<String, String> {
            let len = u32::from_le_bytes(take(4)?.try_into().map_err(|_| "a length")?) as usize;
            String::from_utf8(take(len)?.to_vec()).map_err(|_| format!("an event entry whose {what} is not UTF-8"))
        };
        let (id, key, kind, body) = (text("id")?, text("key")?, text("type")?, text("JSON")?);
        let digest: [u8; 32] = take(32)?.try_into().map_err(|_| "the digest")?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after an event entry", rest.len()));
        }
        Ok(Held {
            pos,
            id: Arc::from(id),
            key: Arc::from(key),
            kind: Cow::Owned(kind),
            body: Arc::from(body),
            digest,
            appended_at,
            acked: false,
            segment,
        })
    }
}

/// A journal failure as the writer reports store failures: a full disk is
/// [`StoreError::Full`], as SQLite's own.
pub(crate) fn store_error(e: &JournalError) -> StoreError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    if e.is_full() {
        StoreError::Full { extended: rusqlite::ffi::SQLITE_FULL, message }
    } else {
        StoreError::Other { message }
    }
}

/// Opens the journal of the outbox in `dir` and reads back the events it
/// holds that the store has neither pending nor delivered: the writer holds
/// them again, at positions from `next_pos` (advanced past them), and the
/// next commit settles them. Opening writes nothing to the store (a full
/// disk must not stop it, see "Starting on a full disk").
pub(crate) fn recover(dir: &Path, conn: &Connection, next_pos: &mut i64) -> Result<(Journal, Vec<Held>), OutboxError> {
    let path = dir.join(JOURNAL_DIR);
    let mut entries: Vec<(u64, Vec<u8>)> = Vec::new();
    let journal = Journal::open(&path, |n, e| entries.push((n, e.to_vec()))).map_err(OutboxError::Journal)?;
    let mut seen: HashSet<Arc<str>> = HashSet::new();
    let mut held = Vec::new();
    for (segment, entry) in entries {
        let h = Held::parse(&entry, *next_pos, segment)
            .map_err(|reason| OutboxError::Journal(JournalError::Corrupt { path: path.clone(), offset: 0, reason }))?;
        if seen.contains(&h.id) {
            continue;
        }
        let known = stored_or_delivered(conn, &h.id).map_err(super::writer::storage)?;
        seen.insert(h.id.clone());
        if !known {
            *next_pos += 1;
            held.push(h);
        }
    }
    Ok((journal, held))
}

/// What [`settle`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Settled {
    /// Written as pending rows.
    pub promoted: usize,
    /// Gone as delivered (acknowledged, or no sink to deliver to), or
    /// found stored already: the depth falls by this much.
    pub left: usize,
}

/// Writes `held` into the store: an acknowledged event (or every event,
/// without sinks) as delivered, its id kept; the others as events pending
/// for every sink. An id the store has already leaves as a duplicate.
pub(crate) fn settle(c: &Connection, held: &[Held], sinks: &[Arc<str>], now: i64) -> Result<Settled, rusqlite::Error> {
    let mut done = c.prepare_cached(INSERT_DELIVERED)?;
    let mut ins = c.prepare_cached(INSERT_EVENT)?;
    let mut pend = c.prepare_cached(INSERT_PENDING)?;
    let mut out = Settled::default();
    for h in held {
        if h.acked || sinks.is_empty() {
            done.execute(params![&*h.id, now, &h.digest[..]])?;
            out.left += 1;
            continue;
        }
        let n = ins.execute(params![h.pos, &*h.id, &*h.key, &*h.kind, &*h.body, h.appended_at, &h.digest[..]])?;
        if n == 0 {
            out.left += 1;
            continue;
        }
        for s in sinks {
            pend.execute(params![&**s, h.pos])?;
        }
        out.promoted += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(id: &str) -> Held {
        Held {
            pos: 7,
            id: Arc::from(id),
            key: Arc::from("call-1"),
            kind: Cow::Borrowed("call.answered"),
            body: Arc::from(r#"{"id":"x","data":{"é":1}}"#),
            digest: [9; 32],
            appended_at: -5,
            acked: true,
            segment: 3,
        }
    }

    #[test]
    fn an_entry_reads_back_as_written_at_the_position_given() {
        let h = held("lab:1.2:3");
        let mut entry = Vec::new();
        h.write_entry(&mut entry);
        let back = Held::parse(&entry, 42, 8).unwrap();
        assert_eq!((back.pos, back.segment), (42, 8));
        assert!(!back.acked);
        assert_eq!((&*back.id, &*back.key, &*back.kind, &*back.body), (&*h.id, &*h.key, &*h.kind, &*h.body));
        assert_eq!((back.digest, back.appended_at), (h.digest, h.appended_at));
        for cut in 0..entry.len() {
            assert!(Held::parse(&entry[..cut], 0, 0).is_err(), "cut at {cut}");
        }
        let mut longer = entry.clone();
        longer.push(0);
        assert!(Held::parse(&longer, 0, 0).is_err());
        let mut other = entry;
        other[0] = b'Z';
        assert!(Held::parse(&other, 0, 0).unwrap_err().contains("unknown kind"));
    }
}
