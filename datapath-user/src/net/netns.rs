//! Network namespaces: open one by name or path, check that a path still is
//! one, and run code inside one.
//!
//! A socket stays bound to the network namespace it was created in, whatever
//! thread later uses it. So to talk to a container's kernel objects, the agent
//! creates the socket on a short-lived thread that entered the container's
//! namespace ([`run_in_netns`]) and then drives it from its own runtime. The
//! agent's own threads never change namespace.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Component, Path, PathBuf},
    thread,
};

use nix::{
    errno::Errno,
    sched::{CloneFlags, setns},
    sys::statfs::{NSFS_MAGIC, fstatfs},
};

pub use crate::model::identity::NetnsId;

/// Where `ip netns add NAME` mounts named network namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// The inode number of the initial network namespace on kernels that give
/// it a fixed one (`PROC_NET_INIT_INO`; older kernels number every
/// namespace from 0xF0000000 up, so no other namespace can have it).
pub const INIT_NET_INO: u64 = 0xEFFF_FFF9;

/// The longest namespace path a container may have (it is recorded in the
/// tag of the container's veth, see [`crate::model::identity::VethTag`]).
pub const MAX_NETNS_PATH_LEN: usize = 128;

/// What can go wrong when opening or entering a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The name cannot be a network namespace name.
    #[error("invalid network namespace name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Nothing exists at the path (the namespace was deleted, or the
    /// process owning `/proc/PID/ns/net` exited).
    #[error("network namespace {} does not exist", path.display())]
    NotFound {
        /// The path that was looked up.
        path: PathBuf,
    },
    /// The path exists but is not a network namespace (a stale file left in
    /// /var/run/netns, or a namespace of another type).
    #[error("{} is not a network namespace", path.display())]
    NotNetns {
        /// The path that was looked up.
        path: PathBuf,
    },
    /// The path names another namespace than the one recorded: the
    /// container's namespace is gone and its path was reused (a PID taken
    /// by a new process, a name re-created).
    #[error(
        "{} now names another network namespace ({found}) than the container's ({expected}): \
         the container's namespace is gone",
        path.display()
    )]
    Replaced {
        /// The path that was looked up.
        path: PathBuf,
        /// The recorded identity.
        expected: NetnsId,
        /// What the path names now.
        found: NetnsId,
    },
    /// A namespace that no container may have: the agent's own or the
    /// root namespace (PID 1's).
    #[error(
        "{} is {which} network namespace: a container needs a namespace of its own",
        path.display()
    )]
    Forbidden {
        /// The path given.
        path: PathBuf,
        /// Whose namespace it is.
        which: &'static str,
    },
    /// Opening or inspecting the namespace file failed.
    #[error("open network namespace {}", path.display())]
    Open {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The thread that should run inside the namespace could not be started.
    #[error("start a thread to enter a network namespace")]
    Spawn {
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// setns(2) refused to enter the namespace.
    #[error("enter a network namespace")]
    Enter {
        /// The errno setns returned.
        #[source]
        source: Errno,
    },
}

impl NetnsError {
    /// Whether the namespace is gone (or never existed): the error to treat
    /// as "nothing left to clean up".
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. } | Self::NotNetns { .. })
    }

    /// Whether the namespace a container was recorded with is certainly
    /// gone: nothing is at its path (ENOENT), or the path names another
    /// namespace now. Any other failure says nothing about the namespace.
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::NotFound { .. } | Self::Replaced { .. })
    }
}

/// Resolves how users name a network namespace to the path of its file.
///
/// An absolute path is returned as it is (for example `/proc/PID/ns/net`
/// or `/var/run/netns/web1`); a bare name is one made by `ip netns add
/// NAME` and maps to `/var/run/netns/NAME`. Relative paths (they would
/// depend on the agent's working directory), paths with `..`, control
/// characters or more than [`MAX_NETNS_PATH_LEN`] bytes are refused.
pub fn resolve(spec: &str) -> Result<PathBuf, NetnsError> {
    let reason = if spec.is_empty() {
        Some("empty")
    } else if spec.bytes().any(|b| b.is_ascii_control()) {
        Some("contains a control character")
    } else if spec == "." || spec == ".." {
        Some("not a file name")
    } else if spec.contains('/') && !spec.starts_with('/') {
        Some("a relative path: give an absolute path or a name under /var/run/netns")
    } else if Path::new(spec)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        Some("contains '..'")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Err(NetnsError::InvalidName {
            name: spec.to_owned(),
            reason,
        });
    }
    let path = if spec.starts_with('/') {
        PathBuf::from(spec)
    } else {
        Path::new(NETNS_RUN_DIR).join(spec)
    };
    if path.as_os_str().len() > MAX_NETNS_PATH_LEN {
        return Err(NetnsError::InvalidName {
            name: spec.to_owned(),
            reason: "longer than 128 bytes",
        });
    }
    Ok(path)
}

/// An open handle on a network namespace. Holding it keeps the namespace
/// alive, even if its name is deleted meanwhile.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    id: NetnsId,
}

impl Netns {
    /// Opens a namespace given by name or path (see [`resolve`]).
    pub fn open(spec: &str) -> Result<Self, NetnsError> {
        Self::open_path(&resolve(spec)?)
    }

    /// Opens the namespace file at `path` and checks that it is a network
    /// namespace.
    pub fn open_path(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => NetnsError::NotFound {
                path: path.to_owned(),
            },
            _ => NetnsError::Open {
                path: path.to_owned(),
                source,
            },
        })?;
        let open_error = |errno: Errno| NetnsError::Open {
            path: path.to_owned(),
            source: errno.into(),
        };
        // A namespace file lives on nsfs (as a bind mount in /var/run/netns,
        // or as a /proc magic link); anything else is a stale or wrong file.
        let fs = fstatfs(&file).map_err(open_error)?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(NetnsError::NotNetns {
                path: path.to_owned(),
            });
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the
        // namespace behind a file descriptor that `file` keeps open.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if nstype == -1 {
            return Err(open_error(Errno::last()));
        }
        if nstype != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns {
                path: path.to_owned(),
            });
        }
        let meta = file.metadata().map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            file,
            path: path.to_owned(),
            id: NetnsId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    /// Opens the namespace at `path` and checks that it still is the one
    /// recorded as `expected` (when one is): a path that names another
    /// namespace now is [`NetnsError::Replaced`].
    pub fn open_expecting(path: &Path, expected: Option<NetnsId>) -> Result<Self, NetnsError> {
        let ns = Self::open_path(path)?;
        match expected {
            Some(expected) if expected != ns.id => Err(NetnsError::Replaced {
                path: path.to_owned(),
                expected,
                found: ns.id,
            }),
            _ => Ok(ns),
        }
    }

    /// The path this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its identity.
    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Refuses a namespace no container may have: the calling process's
    /// own (the agent's) and the root namespace (PID 1's, or the initial
    /// namespace, which has inode [`INIT_NET_INO`] on current kernels). A
    /// container there would put its veth end, address and default route
    /// into the node itself.
    pub fn check_container_netns(&self) -> Result<(), NetnsError> {
        let forbidden = |which| NetnsError::Forbidden {
            path: self.path.clone(),
            which,
        };
        if self.id.ino == INIT_NET_INO {
            return Err(forbidden("the root (initial)"));
        }
        let own = std::fs::metadata("/proc/self/ns/net").map_err(|source| NetnsError::Open {
            path: PathBuf::from("/proc/self/ns/net"),
            source,
        })?;
        if (own.dev(), own.ino()) == (self.id.dev, self.id.ino) {
            return Err(forbidden("the agent's own"));
        }
        // PID 1's may be out of reach (a sandbox without ptrace rights on
        // it); the initial namespace was checked above.
        if let Ok(init) = std::fs::metadata("/proc/1/ns/net")
            && (init.dev(), init.ino()) == (self.id.dev, self.id.ino)
        {
            return Err(forbidden("the root (PID 1's)"));
        }
        Ok(())
    }

    /// Runs `f` inside this namespace; see [`run_in_netns`].
    pub fn run<F, T>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        run_in_netns(self.as_fd(), f)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Whether `path` is (still) a network namespace.
///
/// `Ok(false)` when nothing is there or it is not a network namespace: the
/// container is gone, so there is nothing in it to clean up. Other failures
/// (permissions, I/O) are errors, since they say nothing about the namespace.
pub fn is_netns(path: &Path) -> Result<bool, NetnsError> {
    match Netns::open_path(path) {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs `f` on a new thread that first enters the network namespace `netns`
/// (setns with CLONE_NEWNET), and returns its result.
///
/// Only that thread changes namespace, and it exits when `f` returns, so the
/// caller's threads (and a runtime's pooled threads) never do. Sockets `f`
/// creates stay bound to `netns` after they are handed back. The caller
/// blocks until `f` returns, so keep `f` short. A panic in `f` is resumed in
/// the caller.
pub fn run_in_netns<F, T>(netns: BorrowedFd<'_>, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    thread::scope(|scope| {
        let thread = thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(scope, move || {
                setns(netns, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Enter { source })?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Spawn { source })?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Throwaway namespaces for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::{
        path::PathBuf,
        process::Command,
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::{NETNS_RUN_DIR, Netns};

    /// A network namespace made with `ip netns add`, named `dpt-PID-N-TAG`,
    /// deleted on drop.
    pub(crate) struct TestNetns {
        pub(crate) name: String,
        pub(crate) path: PathBuf,
    }

    impl TestNetns {
        pub(crate) fn new(tag: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "dpt-{}-{}-{tag}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let status = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("run ip netns add");
            assert!(status.success(), "ip netns add {name} failed");
            let path = PathBuf::from(NETNS_RUN_DIR).join(&name);
            Self { name, path }
        }

        pub(crate) fn open(&self) -> Netns {
            Netns::open_path(&self.path).expect("open a test netns")
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::MetadataExt};

    use super::{testing::TestNetns, *};

    fn netns_inode(path: &str) -> u64 {
        fs::metadata(path).expect("stat a netns file").ino()
    }

    #[test]
    fn resolve_maps_names_under_var_run_netns_and_keeps_paths() {
        assert_eq!(
            resolve("web1").expect("a plain name resolves"),
            Path::new("/var/run/netns/web1")
        );
        assert_eq!(
            resolve("/proc/42/ns/net").expect("a path resolves"),
            Path::new("/proc/42/ns/net")
        );
    }

    #[test]
    fn resolve_rejects_names_that_are_not_file_names() {
        let long = format!("/{}", "x".repeat(MAX_NETNS_PATH_LEN));
        for bad in [
            "",
            ".",
            "..",
            "./ns",
            "ns/net",
            "/var/run/netns/../x",
            "a\nb",
            "a\0b",
            &long,
        ] {
            assert!(
                matches!(resolve(bad), Err(NetnsError::InvalidName { .. })),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn is_netns_tells_network_namespaces_from_other_files() {
        assert!(is_netns(Path::new("/proc/self/ns/net")).expect("check /proc/self/ns/net"));
        // A namespace, but not a network one.
        assert!(!is_netns(Path::new("/proc/self/ns/uts")).expect("check /proc/self/ns/uts"));
        // An ordinary file, like a stale entry in /var/run/netns.
        assert!(!is_netns(Path::new("/proc/self/status")).expect("check an ordinary file"));
        assert!(
            !is_netns(Path::new("/var/run/netns/dpt-does-not-exist"))
                .expect("check a missing file")
        );
    }

    #[test]
    fn open_reports_a_missing_namespace_as_not_found() {
        let err = Netns::open("dpt-does-not-exist").expect_err("opened a missing netns");
        assert!(matches!(err, NetnsError::NotFound { .. }), "{err:?}");
        assert!(err.is_not_found());
        assert!(
            err.to_string()
                .contains("/var/run/netns/dpt-does-not-exist"),
            "{err}"
        );
    }

    #[test]
    fn is_netns_follows_a_named_namespace_until_it_is_deleted() {
        let ns = TestNetns::new("life");
        let path = ns.path.clone();
        assert!(is_netns(&path).expect("check a live netns"));
        drop(ns);
        assert!(!is_netns(&path).expect("check a deleted netns"));
    }

    #[test]
    fn run_in_netns_runs_only_the_closure_inside_the_namespace() {
        let ns = TestNetns::new("run");
        let netns = Netns::open(&ns.name).expect("open the test netns by name");
        let target = netns_inode(&format!("/var/run/netns/{}", ns.name));
        let before = netns_inode("/proc/thread-self/ns/net");
        assert_ne!(before, target);

        let inside = netns
            .run(|| netns_inode("/proc/thread-self/ns/net"))
            .expect("run in the test netns");
        assert_eq!(inside, target);
        assert_eq!(netns_inode("/proc/thread-self/ns/net"), before);
    }

    #[test]
    fn the_agents_own_namespace_is_refused_and_a_replaced_one_told_apart() {
        let own = Netns::open("/proc/self/ns/net").expect("open our own netns");
        let e = own.check_container_netns().expect_err("our own is refused");
        assert!(matches!(e, NetnsError::Forbidden { .. }), "{e}");
        let ns = TestNetns::new("id");
        let opened = ns.open();
        opened
            .check_container_netns()
            .expect("a namespace of its own");
        let id = opened.id();
        assert_eq!(id.ino, netns_inode(&ns.path.to_string_lossy()));
        Netns::open_expecting(&ns.path, Some(id)).expect("the same namespace");
        // The path naming another namespace than the recorded one.
        let e = Netns::open_expecting(&ns.path, Some(own.id())).expect_err("replaced");
        assert!(
            matches!(e, NetnsError::Replaced { .. }) && e.is_gone(),
            "{e}"
        );
    }

    #[test]
    fn run_in_netns_resumes_a_panic_of_the_closure() {
        let netns = Netns::open("/proc/self/ns/net").expect("open our own netns");
        let result = std::panic::catch_unwind(|| netns.run(|| panic!("inside")));
        assert!(result.is_err());
    }
}
