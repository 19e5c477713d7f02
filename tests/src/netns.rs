//! A network namespace owned by a test.
//!
//! [`Netns`] creates a named namespace (`ip netns add`, so that `ip -n`,
//! `bpftool` and the agent can name it) and deletes it on drop, after
//! killing whatever still runs in it. Commands and closures enter it with
//! `setns(2)`, never with `ip netns exec`, which remounts `/sys` and would
//! hide `/sys/fs/bpf` and the cgroup tree.
//!
//! ```no_run
//! use datapath_tests::netns::Netns;
//!
//! let ns = Netns::new_unique();
//! ns.exec_ok("ip", ["link", "set", "lo", "up"]);
//! let has_lo = ns.exec_closure(|| nix::net::if_::if_nametoindex("lo").is_ok());
//! assert!(has_lo);
//! ```

use std::{
    ffi::{CString, OsStr},
    fs::File,
    os::unix::{ffi::OsStrExt, fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::names;

/// Where `ip netns` keeps its namespace files.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// A named network namespace, deleted on drop (unless it is another
/// owner's, see [`Netns::attach`]).
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    owned: bool,
    /// Made in-process by [`Netns::new_bare`]: removed the same way.
    bare: bool,
}

impl Netns {
    /// Creates namespace `name`, which must start with [`names::PREFIX`],
    /// with its loopback interface up.
    pub fn new(name: &str) -> Self {
        assert!(
            name.starts_with(names::PREFIX),
            "test namespaces are named {}*: {name}",
            names::PREFIX
        );
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap_or_else(|e| panic!("running `ip netns add {name}`: {e}"));
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Self {
            name: name.to_owned(),
            path: Path::new(NETNS_RUN_DIR).join(name),
            owned: true,
            bare: false,
        };
        ns.exec_ok("ip", ["link", "set", "lo", "up"]);
        ns
    }

    /// Creates namespace `name` (which must start with [`names::PREFIX`])
    /// in-process, as `ip netns add` does but without running it: a thread
    /// unshares its network namespace and bind-mounts it on
    /// `/var/run/netns/<name>`. Nothing is set up inside (loopback stays
    /// down), and on drop it is unmounted and removed without looking for
    /// processes in it: for tests that need hundreds of namespaces that
    /// only the agent puts an interface in.
    pub fn new_bare(name: &str) -> Self {
        assert!(
            name.starts_with(names::PREFIX),
            "test namespaces are named {}*: {name}",
            names::PREFIX
        );
        let path = Path::new(NETNS_RUN_DIR).join(name);
        std::fs::create_dir_all(NETNS_RUN_DIR)
            .unwrap_or_else(|e| panic!("creating {NETNS_RUN_DIR}: {e}"));
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        let target = path.clone();
        let mounted = std::thread::spawn(move || -> nix::Result<()> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .join()
        .unwrap_or_else(|_| panic!("the thread making {name} panicked"));
        if let Err(e) = mounted {
            let _ = std::fs::remove_file(&path);
            panic!("making network namespace {name}: {e}");
        }
        Self {
            name: name.to_owned(),
            path,
            owned: true,
            bare: true,
        }
    }

    /// A handle on a namespace someone else made and removes (a container
    /// runtime's), by its file: commands and threads enter it like any
    /// other, and dropping the handle leaves it and its processes alone.
    pub fn attach(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        assert!(path.exists(), "no network namespace at {}", path.display());
        Self {
            name: path.display().to_string(),
            path,
            owned: false,
            bare: false,
        }
    }

    /// Creates a namespace named `dpt-<unique id>`.
    pub fn new_unique() -> Self {
        Self::new(&names::unique_name())
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, `/var/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a namespace named `name` exists.
    pub fn exists(name: &str) -> bool {
        Path::new(NETNS_RUN_DIR).join(name).exists()
    }

    /// Makes `cmd` enter this namespace between fork and exec. The process
    /// is also killed when the thread that started it goes away (a test
    /// killed outright takes its agent, servers and clients along instead
    /// of leaving them running in a namespace nobody will delete).
    pub fn enter<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let path = CString::new(self.path.as_os_str().as_bytes())
            .expect("namespace paths have no NUL byte");
        // SAFETY: the closure runs in the forked child and only makes
        // async-signal-safe calls (prctl, open, setns, close) on memory
        // prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::setns(fd, libc::CLONE_NEWNET);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if r != 0 {
                    return Err(err);
                }
                Ok(())
            })
        }
    }

    /// A command for `program` that runs in this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.enter(&mut cmd);
        cmd
    }

    /// Runs `cmd` in this namespace and collects its output (whatever its
    /// exit status); panics if it cannot be started.
    pub fn run(&self, cmd: &mut Command) -> Output {
        self.enter(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("starting {cmd:?} in {}: {e}", self.name))
    }

    /// Starts `cmd` in this namespace. Whatever still runs in the namespace
    /// when it is dropped is killed.
    pub fn spawn(&self, cmd: &mut Command) -> Child {
        self.enter(cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?} in {}: {e}", self.name))
    }

    /// Runs `program args…` in this namespace; returns its output whatever
    /// its exit status.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run(Command::new(program).args(args))
    }

    /// Runs `program args…` in this namespace; panics with its stderr unless
    /// it succeeds, else returns its stdout.
    #[track_caller]
    pub fn exec_ok<I, S>(&self, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let out = self.run(&mut cmd);
        assert!(
            out.status.success(),
            "{cmd:?} in {} failed ({}):\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates a veth pair straight between two namespaces: `name` here,
    /// `peer` in `peer_ns` (`ip link add … netns …`: the root namespace
    /// never sees it). Both ends start down. `Err` is `ip`'s message.
    pub fn add_veth(&self, name: &str, peer: &str, peer_ns: &Netns) -> Result<(), String> {
        let args = [
            "link", "add", name, "type", "veth", "peer", "name", peer, "netns",
        ];
        let out = self.run(Command::new("ip").args(args).arg(peer_ns.name()));
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip link add {name} type veth peer name {peer} netns {} in {}: {}",
                peer_ns.name(),
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Waits (up to 10 s) until interface `ifname` is operationally up.
    /// A link set up comes up for traffic only once the kernel's link
    /// watcher has seen its carrier, which a busy machine may take seconds
    /// to do; until then packets (the first ARP requests) are dropped.
    #[track_caller]
    pub fn wait_link_up(&self, ifname: &str) {
        let up = crate::wait::within(std::time::Duration::from_secs(10), || {
            let out = self.exec("ip", ["-j", "link", "show", "dev", ifname]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v[0]["operstate"] == "UP")
        });
        assert!(up, "{ifname} in {} did not come up in 10 s", self.name);
    }

    /// Runs `f` on a new thread that has entered this namespace (and only
    /// this one: the mount namespace, hence `/sys/fs/bpf`, stays the
    /// caller's). A panic in `f` is propagated.
    pub fn exec_closure<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = File::open(&self.path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path.display()));
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
                drop(file);
                f()
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts `f` on a background thread that has entered this namespace
    /// (a server, say). The caller joins it; a thread still blocked when
    /// the namespace goes away keeps the namespace alive until it returns,
    /// so give its sockets timeouts.
    pub fn spawn_thread<F, R>(&self, f: F) -> std::thread::JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = File::open(&self.path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path.display()));
        let name = self.name.clone();
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns into {name}: {e}"));
            drop(file);
            f()
        })
    }

    /// Sends one ICMP echo request to `addr` from this namespace (`ping`, or
    /// busybox's where iputils is missing); true if a reply came within two
    /// seconds.
    pub fn ping(&self, addr: impl std::fmt::Display) -> bool {
        let addr = addr.to_string();
        let mut cmd = if which("ping").is_some() {
            Command::new("ping")
        } else {
            let mut c = Command::new("busybox");
            c.arg("ping");
            c
        };
        cmd.args(["-c1", "-W2", &addr]);
        self.run(&mut cmd).status.success()
    }

    /// The processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return Vec::new();
        };
        let (dev, ino) = (meta.dev(), meta.ino());
        let Ok(proc_dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        proc_dir
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
            })
            .collect()
    }

    /// Kills every process in the namespace and waits (up to 2 s) for them
    /// to be gone.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            for pid in pids {
                // The process may already be gone: nothing to report then.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if self.bare {
            if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("warning: unmounting {}: {e}", self.path.display());
            }
            if let Err(e) = std::fs::remove_file(&self.path) {
                eprintln!("warning: removing {}: {e}", self.path.display());
            }
            return;
        }
        self.kill_all();
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("warning: running ip netns del {}: {e}", self.name),
        }
    }
}

/// The full path of `program` if it is on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
