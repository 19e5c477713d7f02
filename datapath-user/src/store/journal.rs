//! The append-only journal of changes since the snapshot, and its
//! compaction (see the [module above](super) for why).
//!
//! Files: `journal.<n>` (`n` counting up, ten digits). Each holds records
//! framed as `[length: u32 LE][CRC-32 of the payload: u32 LE][payload]`,
//! the payload being JSON: `{"seq": …, "next_id": …, "changes": […]}`.
//! Sequence numbers count every record ever written; the snapshot says up
//! to which one it includes, so a record is applied at most once even if a
//! crash comes between writing a snapshot and deleting the journal it
//! replaces.
//!
//! Only the last record of the last file can be torn (records are
//! appended one at a time and each is durable before the next one starts,
//! and a new file is started only after the last record of the previous
//! one was durable): such a record was never acknowledged and is dropped.
//!
//! For tests, `DATAPATH_TEST_FAULT=crash-after-journal` in the agent's
//! environment makes it abort right after its first journal record is
//! durable, before the change reaches the maps or is acknowledged: what a
//! power cut at the worst moment leaves behind.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    thread::JoinHandle,
};

use serde::{Deserialize, Serialize};

use super::{
    Change, State,
    file::{StateError, StateStore, io_err, sync_dir},
};

/// Journal files are named this, then a number.
pub(super) const PREFIX: &str = "journal.";
/// The journal is compacted once it is larger than the snapshot, and at
/// least this large.
const MIN_COMPACT_BYTES: u64 = 1 << 20;
/// Larger records are taken as damage (a request's size is limited far
/// below this).
const MAX_RECORD: usize = 256 << 20;
/// The environment variable of the test-only fault point.
pub const FAULT_ENV: &str = "DATAPATH_TEST_FAULT";

/// A record as written.
#[derive(Serialize)]
struct RecordOut<'a> {
    seq: u64,
    next_id: u32,
    changes: &'a [Change],
}

/// A record as read.
#[derive(Deserialize)]
struct RecordIn {
    seq: u64,
    next_id: u32,
    changes: Vec<Change>,
}

/// What the bytes at some offset of a journal file are.
enum Frame<'a> {
    /// A whole record: its payload and its size with the header.
    Record(&'a [u8], usize),
    /// The end of the file, or a record whose write was cut off there.
    Torn,
    /// Damage: bytes that are not a record and are not the file's end.
    Bad(String),
}

fn frame(buf: &[u8]) -> Frame<'_> {
    // A file system may extend a file before the data arrives: zeros to
    // the end are a torn write too.
    let zeros = || buf.iter().all(|b| *b == 0);
    let Some((header, rest)) = buf.split_first_chunk::<8>() else {
        return Frame::Torn;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_RECORD {
        return if zeros() {
            Frame::Torn
        } else {
            Frame::Bad(format!("a record of {len} bytes"))
        };
    }
    let Some(payload) = rest.get(..len) else {
        return Frame::Torn;
    };
    if crc32fast::hash(payload) != crc {
        return if rest.len() == len || zeros() {
            Frame::Torn
        } else {
            Frame::Bad("checksum mismatch".to_owned())
        };
    }
    Frame::Record(payload, 8 + len)
}

/// The journal files in `dir` with their numbers, in order.
fn numbered(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut files = Vec::new();
    for e in entries {
        let e = e?;
        let name = e.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            files.push((n, e.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// The journal files in `dir`, in order.
pub fn files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(numbered(dir)?.into_iter().map(|(_, p)| p).collect())
}

fn file_name(n: u64) -> String {
    format!("{PREFIX}{n:010}")
}

/// Journal files with their numbers.
type Files = Vec<(u64, PathBuf)>;

/// Reads the state kept in `dir` (snapshot, then every journal record
/// after it) without changing anything there; returns it with the last
/// sequence number and the journal files read.
fn read(dir: &Path) -> Result<(State, u64, Files), StateError> {
    let (mut state, mut seq) = StateStore::new(dir).load()?;
    let files = numbered(dir).map_err(io_err("list", dir))?;
    for (i, (_, path)) in files.iter().enumerate() {
        let bytes = fs::read(path).map_err(io_err("read", path))?;
        let corrupt = |offset: usize, reason: String| StateError::CorruptJournal {
            path: path.clone(),
            offset: offset as u64,
            reason,
        };
        let mut off = 0;
        while off < bytes.len() {
            match frame(&bytes[off..]) {
                Frame::Record(payload, size) => {
                    let rec: RecordIn =
                        serde_json::from_slice(payload).map_err(|e| corrupt(off, e.to_string()))?;
                    if rec.seq > seq {
                        if rec.seq != seq + 1 {
                            return Err(corrupt(
                                off,
                                format!("record {} follows record {seq}", rec.seq),
                            ));
                        }
                        let mut next = state.clone();
                        next.next_id = next.next_id.max(rec.next_id);
                        for change in &rec.changes {
                            next.apply(change).map_err(|e| corrupt(off, e))?;
                        }
                        state = next;
                        seq = rec.seq;
                    }
                    off += size;
                }
                Frame::Torn if i + 1 == files.len() => {
                    tracing::warn!(
                        journal = %path.display(),
                        offset = off,
                        "dropping a torn last record (its change was never acknowledged)"
                    );
                    break;
                }
                Frame::Torn => {
                    return Err(corrupt(off, "a cut-off record before the last file".into()));
                }
                Frame::Bad(reason) => return Err(corrupt(off, reason)),
            }
        }
    }
    Ok((state, seq, files))
}

/// Reads the state kept in `dir` without changing anything there (for
/// `datapath agent --cleanup`).
pub fn load(dir: &Path) -> Result<State, StateError> {
    read(dir).map(|(state, _, _)| state)
}

/// The journal being written, and the compaction running beside it.
#[derive(Debug)]
pub struct Journal {
    snapshot: StateStore,
    /// The file records are appended to; `None` once a write to it failed
    /// (the next change then starts afresh from a snapshot).
    file: Option<File>,
    /// Its number.
    number: u64,
    /// Its length: where the next record starts.
    len: u64,
    /// The sequence number of the last record written.
    seq: u64,
    /// Bytes written to the journal since the last snapshot started.
    since_snapshot: u64,
    /// The last snapshot's size.
    snapshot_bytes: u64,
    /// The compaction in progress: it returns the snapshot's size.
    compaction: Option<JoinHandle<Result<u64, StateError>>>,
    /// Abort after the first record (a test's fault point).
    crash_after_write: bool,
}

impl Journal {
    /// Reads the state kept in `dir` and opens its journal for the next
    /// changes. A journal left by an earlier run is folded into a fresh
    /// snapshot first (and a missing snapshot written), so that a run
    /// starts with a snapshot and an empty journal file.
    pub fn open(dir: PathBuf) -> Result<(State, Self), StateError> {
        let (state, seq, files) = read(&dir)?;
        let snapshot = StateStore::new(&dir);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let existing = fs::metadata(snapshot.path()).map(|m| m.len());
        let snapshot_bytes = if let (true, Ok(size)) = (files.is_empty(), &existing) {
            *size
        } else {
            let size = snapshot.save(&state, seq)?;
            for (_, path) in &files {
                fs::remove_file(path).map_err(io_err("remove", path))?;
            }
            size
        };
        let number = files.last().map_or(1, |(n, _)| n + 1);
        let mut journal = Self {
            snapshot,
            file: None,
            number,
            len: 0,
            seq,
            since_snapshot: 0,
            snapshot_bytes,
            compaction: None,
            crash_after_write: std::env::var(FAULT_ENV).is_ok_and(|v| v == "crash-after-journal"),
        };
        journal.start_file(number)?;
        Ok((state, journal))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        self.snapshot.dir()
    }

    /// The path of journal file `n`.
    fn path(&self, n: u64) -> PathBuf {
        self.dir().join(file_name(n))
    }

    /// Creates journal file `n` and makes it the one written.
    fn start_file(&mut self, n: u64) -> Result<(), StateError> {
        let path = self.path(n);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        // A record in a file whose name is not durable would be lost.
        sync_dir(self.dir())?;
        self.file = Some(file);
        self.number = n;
        self.len = 0;
        Ok(())
    }

    /// Makes `changes` durable; `next` is the state with them applied.
    pub fn append(&mut self, next: &State, changes: &[Change]) -> Result<(), StateError> {
        self.reap(false);
        let seq = self.seq + 1;
        let path = self.path(self.number);
        let Some(file) = self.file.as_mut() else {
            // An earlier write failed: start afresh from a snapshot that
            // includes this change.
            self.wait();
            self.snapshot_bytes = self.snapshot.save(next, seq)?;
            self.seq = seq;
            self.since_snapshot = 0;
            let n = self.number + 1;
            self.start_file(n)?;
            self.remove_before(n);
            return Ok(());
        };
        let payload = serde_json::to_vec(&RecordOut {
            seq,
            next_id: next.next_id,
            changes,
        })
        .map_err(|e| StateError::Refused {
            dir: self.snapshot.dir().to_owned(),
            reason: format!("serialize: {e}"),
        })?;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l as usize <= MAX_RECORD)
            .ok_or_else(|| StateError::Refused {
                dir: self.snapshot.dir().to_owned(),
                reason: format!("a change of {} bytes", payload.len()),
            })?;
        let mut record = Vec::with_capacity(8 + payload.len());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        let written = file
            .write_all(&record)
            .map_err(io_err("write", &path))
            .and_then(|()| file.sync_data().map_err(io_err("fdatasync", &path)));
        if let Err(e) = written {
            // What reached the file is unknown: cut it back to the last
            // whole record, and write the next change to a fresh file.
            let _ = file.set_len(self.len);
            let _ = file.sync_data();
            self.file = None;
            return Err(e);
        }
        self.len += record.len() as u64;
        self.seq = seq;
        self.since_snapshot += record.len() as u64;
        if self.crash_after_write {
            tracing::error!("{FAULT_ENV}=crash-after-journal: aborting after record {seq}");
            std::process::abort();
        }
        if self.since_snapshot > self.snapshot_bytes.max(MIN_COMPACT_BYTES)
            && self.compaction.is_none()
            && let Err(e) = self.rotate(next)
        {
            tracing::warn!("cannot start a new journal file (the change is durable): {e}");
        }
        Ok(())
    }

    /// Starts a new journal file and a snapshot of `state` (which includes
    /// every record written so far) on a thread of its own; the snapshot
    /// then replaces the older journal files.
    fn rotate(&mut self, state: &State) -> Result<(), StateError> {
        let n = self.number + 1;
        self.start_file(n)?;
        self.since_snapshot = 0;
        let snapshot = self.snapshot.clone();
        let state = state.clone();
        let seq = self.seq;
        let dir = self.dir().to_owned();
        let thread = std::thread::Builder::new()
            .name("state-compaction".into())
            .spawn(move || {
                let size = snapshot.save(&state, seq)?;
                remove_before(&dir, n);
                Ok(size)
            })
            .map_err(io_err("start the compaction thread for", self.dir()))?;
        self.compaction = Some(thread);
        Ok(())
    }

    /// Takes the outcome of a finished compaction (or waits for it).
    fn reap(&mut self, wait: bool) {
        if !wait && !self.compaction.as_ref().is_some_and(|t| t.is_finished()) {
            return;
        }
        let Some(thread) = self.compaction.take() else {
            return;
        };
        match thread.join() {
            Ok(Ok(size)) => self.snapshot_bytes = size,
            Ok(Err(e)) => tracing::warn!("state compaction failed (the journal is kept): {e}"),
            Err(_) => tracing::warn!("state compaction panicked (the journal is kept)"),
        }
    }

    /// Waits for a compaction in progress.
    pub(super) fn wait(&mut self) {
        self.reap(true);
    }

    fn remove_before(&self, n: u64) {
        remove_before(self.dir(), n);
    }

    /// Writes a snapshot of `state` (the state as of the last record) now,
    /// starts a new, empty journal file and removes the others.
    pub fn compact_now(&mut self, state: &State) -> Result<(), StateError> {
        self.wait();
        self.snapshot_bytes = self.snapshot.save(state, self.seq)?;
        self.since_snapshot = 0;
        self.start_file(self.number + 1)?;
        self.remove_before(self.number);
        Ok(())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.wait();
    }
}

/// Removes the journal files numbered below `n` in `dir` (their records
/// are in the snapshot), logging failures: a file left behind is only
/// replayed as far as the snapshot does not include it.
fn remove_before(dir: &Path, n: u64) {
    let files = match numbered(dir) {
        Ok(files) => files,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "list the journal files: {e}");
            return;
        }
    };
    for (_, path) in files.into_iter().filter(|(m, _)| *m < n) {
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(journal = %path.display(), "remove: {e}");
        }
    }
    if let Err(e) = sync_dir(dir) {
        tracing::warn!("{e}");
    }
}
