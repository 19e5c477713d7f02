//! The snapshot file: [`State`] as JSON in the state directory, with the
//! sequence number of the last journal record it includes; replaced
//! atomically.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::model::ports::PortSet;

use super::State;

/// The snapshot's name inside the state directory (the name of the single
/// state file of earlier versions, which is read as a snapshot).
pub const STATE_FILE: &str = "state.json";

/// Errors reading or writing the persisted state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The snapshot exists but is not valid state.
    #[error(
        "state file {path} is corrupt ({source}); the agent changed nothing and the datapath keeps \
         forwarding. Fix the file, or move it away: the agent then rebuilds its state from the \
         pinned maps and its veths"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A journal record other than a torn last one does not read back, or
    /// does not apply to the state before it.
    #[error(
        "state journal {path} is corrupt at byte {offset} ({reason}); move the journal files away \
         (the agent then starts from {STATE_FILE} and re-adopts what it finds), then restart the agent"
    )]
    CorruptJournal {
        /// The journal file.
        path: PathBuf,
        /// Where in it the bad record starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A change that does not apply to the state (an agent bug): nothing
    /// was written.
    #[error("refused to record an inconsistent change in {dir}: {reason}")]
    Refused {
        /// The state directory.
        dir: PathBuf,
        /// Why it does not apply.
        reason: String,
    },
}

/// The snapshot as written: the state's fields and the journal's position.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    next_id: u32,
    journal_seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<ipnet::Ipv4Net>,
    #[serde(skip_serializing_if = "Option::is_none")]
    snat_ports: Option<(u16, u16)>,
    containers: super::ContainersByName<'a>,
    #[serde(skip_serializing_if = "PortSet::is_empty")]
    reserved_ports: &'a PortSet,
}

/// The snapshot as read; a file of an earlier version has no
/// `journal_seq`.
#[derive(Deserialize)]
struct SnapshotIn {
    next_id: u32,
    #[serde(default)]
    journal_seq: u64,
    #[serde(default)]
    pool: Option<ipnet::Ipv4Net>,
    #[serde(default)]
    snat_ports: Option<(u16, u16)>,
    containers: std::collections::BTreeMap<String, super::Container>,
    #[serde(default)]
    reserved_ports: PortSet,
}

/// Loads and saves the snapshot in a directory.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// A snapshot in `dir` (created on the first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The snapshot's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the snapshot and the sequence number of the last journal
    /// record it includes; a missing file is an empty state.
    pub fn load(&self) -> Result<(State, u64), StateError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => {
                let corrupt = |source| StateError::Corrupt {
                    path: path.clone(),
                    source,
                };
                let s: SnapshotIn = serde_json::from_slice(&bytes).map_err(corrupt)?;
                let state = State::try_from(super::StateFields {
                    next_id: s.next_id,
                    pool: s.pool,
                    snat_ports: s.snat_ports,
                    containers: s.containers,
                    reserved_ports: s.reserved_ports,
                })
                .map_err(|e| corrupt(serde::de::Error::custom(e)))?;
                Ok((state, s.journal_seq))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((State::default(), 0)),
            Err(source) => Err(StateError::Io {
                action: "read",
                path,
                source,
            }),
        }
    }

    /// Writes the snapshot of `state`, which includes the journal up to
    /// record `journal_seq`, atomically: a temporary file, fsync, rename
    /// over the old one, fsync of the directory (the journal it replaces
    /// is deleted next, so the rename must be durable first). Returns its
    /// size.
    pub fn save(&self, state: &State, journal_seq: u64) -> Result<u64, StateError> {
        fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))?;
        let path = self.path();
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let out = SnapshotOut {
            next_id: state.next_id(),
            journal_seq,
            pool: state.pool(),
            snat_ports: state.snat_ports(),
            containers: super::ContainersByName(state.containers()),
            reserved_ports: state.reserved_ports(),
        };
        let bytes = serde_json::to_vec(&out).map_err(|e| StateError::Io {
            action: "serialize",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let mut f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        sync_dir(&self.dir)?;
        Ok(bytes.len() as u64)
    }
}

/// An [`StateError::Io`] maker for `action` on `path`.
pub(super) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_owned();
    move |source| StateError::Io {
        action,
        path,
        source,
    }
}

/// Makes the entries of `dir` (created, renamed, removed files) durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StateError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}
