//! A cgroup2 directory owned by a test (for the rate limiter's cgroup_skb
//! programs, which are only ever attached to cgroups a test made).
//!
//! ```no_run
//! use std::process::Command;
//! use datapath_tests::{cgroup::Cgroup, netns::Netns};
//!
//! let ns = Netns::new_unique();
//! let cg = Cgroup::new();
//! let child = ns.spawn(cg.enter(&mut Command::new("sleep").arg("1")));
//! assert!(cg.pids().contains(&child.id()));
//! ```

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{names, sys};

/// A cgroup `dpt-<unique id>` under the cgroup2 root; its processes are
/// killed and the directory removed on drop (unless it is someone else's:
/// [`Cgroup::attach`]).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    owned: bool,
}

impl Cgroup {
    /// Creates the cgroup; panics if there is no cgroup2 hierarchy.
    pub fn new() -> Self {
        let root = sys::cgroup2_root().expect("no cgroup2 hierarchy is mounted");
        let path = root.join(names::unique_name());
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path, owned: true }
    }

    /// A handle on a cgroup2 directory someone else made and removes (a
    /// container runtime's): processes join it like any other, and
    /// dropping the handle leaves it and its processes alone.
    pub fn attach(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        assert!(path.is_dir(), "no cgroup at {}", path.display());
        Self { path, owned: false }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id (what `bpf_skb_cgroup_id` returns): the directory's
    /// inode number.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    /// Moves process `pid` into the cgroup.
    pub fn add_pid(&self, pid: u32) {
        let procs = self.path.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("writing {pid} to {}: {e}", procs.display()));
    }

    /// Makes `cmd` join the cgroup between fork and exec (combine with
    /// [`crate::netns::Netns::enter`] to also enter a namespace).
    pub fn enter<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        join_on_exec(cmd, &self.path)
    }

    /// A cgroup `name` below this one, removed on drop (drop it first).
    pub fn child(&self, name: &str) -> Cgroup {
        let path = self.path.join(name);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Self { path, owned: true }
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every process in the cgroup (`cgroup.kill`) and waits up to
    /// 2 s for it to be empty.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.pids().is_empty() && Instant::now() < deadline {
            if std::fs::write(self.path.join("cgroup.kill"), "1").is_err() {
                // Kernels before 5.14 have no cgroup.kill: signal each.
                for pid in self.pids() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        self.kill_all();
        // An exited process leaves the cgroup only once reaped by its
        // parent; retry the removal for a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() > deadline => {
                    eprintln!("warning: removing cgroup {}: {e}", self.path.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// Makes `cmd` join the cgroup directory `dir` between fork and exec.
pub fn join_on_exec<'c>(cmd: &'c mut Command, dir: &Path) -> &'c mut Command {
    let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup paths have no NUL byte");
    // SAFETY: the closure runs in the forked child and only makes
    // async-signal-safe calls (open, write, close) on memory prepared
    // before the fork. Writing "0" moves the writing process.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        })
    }
}

/// Mount points of every cgroup hierarchy (v1 and v2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// Removes the cgroup `path` (from the hierarchies' root, e.g.
/// `/dpt-1-podman`) and every cgroup below it, in every hierarchy: what a
/// container runtime a test drove left under the parent it was given.
pub fn remove_everywhere(path: &str) {
    for root in cgroup_mounts() {
        remove_tree(&root.join(path.trim_start_matches('/')));
    }
}

/// Removes a cgroup directory and its children (rmdir, deepest first).
/// A runtime's processes may still be leaving (`podman rm -f` returns before
/// conmon and the container's processes are reaped): whatever is still in a
/// cgroup is killed, and the removal is retried for a moment.
fn remove_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() > deadline => {
                eprintln!("warning: rmdir {}: {e}", dir.display());
                return;
            }
            Err(_) => {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    // Gone already is fine: the retry sees it either way.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
