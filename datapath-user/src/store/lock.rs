//! One agent per state directory: an exclusive lock (`flock`) on a file in
//! it, taken before anything in the directory is read and held for as long
//! as the agent runs. The file holds the holder's PID, so that a refused
//! agent (or `--cleanup`) can say which process has it. The kernel drops
//! the lock when the holder exits, however it exits: a stale file is never
//! mistaken for a live agent.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, Write},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";

/// Errors taking the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "another agent (pid {}) is running with state directory {}: stop it first, \
         or give this one a --state-dir (and --api-socket, --bpffs-dir) of its own",
        pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
        dir.display()
    )]
    Held {
        /// The state directory.
        dir: PathBuf,
        /// The holder's PID, as it wrote it.
        pid: Option<u32>,
    },
    /// The lock file could not be created, read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// The held lock on a state directory; released when dropped (or when the
/// process ends).
#[derive(Debug)]
pub struct StateLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock on `dir` (created if missing) without waiting, and
    /// writes this process's PID into the lock file.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let io_err = |action, path: &Path| {
            let path = path.to_owned();
            move |source| LockError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                return Err(LockError::Held {
                    dir: dir.to_owned(),
                    pid: read_pid(&mut file),
                });
            }
            Err((_, errno)) => return Err(io_err("lock", &path)(errno.into())),
        };
        file.set_len(0).map_err(io_err("truncate", &path))?;
        file.rewind().map_err(io_err("rewind", &path))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err("write", &path))?;
        Ok(Self { _file: file, path })
    }

    /// Removes the lock file while still holding the lock (for
    /// `--cleanup`), then releases it.
    pub fn remove(self) -> Result<(), LockError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LockError::Io {
                action: "remove",
                path: self.path.clone(),
                source,
            }),
        }
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_directory_is_refused_with_the_holders_pid() {
        let dir = std::env::temp_dir().join(format!("dpt-lock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let held = StateLock::acquire(&dir).expect("the first lock");
        let e = StateLock::acquire(&dir).expect_err("a second one");
        match &e {
            LockError::Held { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("{other}"),
        }
        assert!(
            e.to_string().contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(held);
        let again = StateLock::acquire(&dir).expect("free once dropped");
        again.remove().expect("remove");
        assert!(!dir.join(LOCK_FILE).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
