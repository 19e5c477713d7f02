//! A sandbox that looks like a node's filesystem to the programs run in
//! it, for tests that run programs as a user would (the README's commands,
//! containerd and `ctr`), with their default paths:
//!
//! * a mount namespace of its own (private propagation) with a fresh
//!   `/run` (so `ip netns add`, `/run/datapath`, `/run/containerd` are the
//!   sandbox's), `/var/lib` and `/opt` on tmpfs, `/etc` under an overlay
//!   whose changes stay in the sandbox, and a bpffs instance of its own on
//!   `/sys/fs/bpf`;
//! * optionally a cgroup namespace rooted at a cgroup of the test, mounted
//!   as the cgroup2 hierarchy ([`SandboxBuilder::cgroup2_stand_in`]): what
//!   the programs do to cgroups stays below it;
//! * the network namespace of a [`Node`]'s node.
//!
//! Everything in it goes when it is dropped: the mounts, the network
//! namespaces named in its `/run/netns`, the pins of its bpffs.
//!
//! ```no_run
//! use datapath_tests::{node::Node, sandbox::Sandbox};
//!
//! let node = Node::new();
//! let sandbox = Sandbox::builder(&node).start();
//! assert!(sandbox.run("ip netns add web1 && ip netns list").status.success());
//! ```

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use crate::{
    cgroup::{Cgroup, join_on_exec},
    node::Node,
    sys,
};

/// Options of a [`Sandbox`].
#[derive(Debug)]
pub struct SandboxBuilder<'n> {
    node: &'n Node,
    cgroup2_stand_in: bool,
    path_first: Option<PathBuf>,
    dir: Option<PathBuf>,
}

impl<'n> SandboxBuilder<'n> {
    /// Mounts a cgroup of the test as the cgroup2 hierarchy, in a cgroup
    /// namespace rooted at it.
    pub fn cgroup2_stand_in(mut self) -> Self {
        self.cgroup2_stand_in = true;
        self
    }

    /// Puts `dir` first on the commands' `PATH`.
    pub fn path_first(mut self, dir: impl Into<PathBuf>) -> Self {
        self.path_first = Some(dir.into());
        self
    }

    /// Runs the commands in `dir` (default `/`).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Sets the sandbox up and returns once it is ready.
    pub fn start(self) -> Sandbox<'n> {
        let root = self.cgroup2_stand_in.then(Cgroup::new);
        let mut script = String::from("set -e\n");
        if root.is_some() {
            let cgroup2 = sys::cgroup2_root().expect("no cgroup2 hierarchy is mounted");
            let cg = cgroup2.display();
            script.push_str(&format!("umount -l {cg}\nmount -t cgroup2 cgroup2 {cg}\n"));
        }
        script.push_str(
            "mount -t bpf bpf /sys/fs/bpf
             mount -t tmpfs tmpfs /run
             mkdir -p /run/netns /run/.etc/upper /run/.etc/work
             mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/.etc/upper,workdir=/run/.etc/work /etc
             mount -t tmpfs tmpfs /opt
             mount -t tmpfs tmpfs /var/lib
             echo ready
             exec sleep 3600",
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private"]);
        if root.is_some() {
            cmd.arg("--cgroup");
        }
        cmd.args(["--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(root) = &root {
            join_on_exec(&mut cmd, root.path());
        }
        let mut holder = cmd.spawn().expect("start the sandbox (unshare)");
        let mut first = String::new();
        if let Some(out) = holder.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut first);
        }
        if first.trim() != "ready" {
            let _ = holder.kill();
            let _ = holder.wait();
            panic!("the sandbox did not set up");
        }
        let mut path_env =
            String::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        if let Some(first) = &self.path_first {
            path_env = format!("{}:{path_env}", first.display());
        }
        Sandbox {
            node: self.node,
            holder,
            path_env,
            dir: self.dir.unwrap_or_else(|| PathBuf::from("/")),
            root,
        }
    }
}

/// A running sandbox (see the module's documentation); its holder process
/// is killed on drop, which takes its mounts with it.
#[derive(Debug)]
pub struct Sandbox<'n> {
    node: &'n Node,
    holder: Child,
    path_env: String,
    dir: PathBuf,
    root: Option<Cgroup>,
}

impl<'n> Sandbox<'n> {
    /// Options for a sandbox around `node`'s node namespace.
    pub fn builder(node: &'n Node) -> SandboxBuilder<'n> {
        SandboxBuilder {
            node,
            cgroup2_stand_in: false,
            path_first: None,
            dir: None,
        }
    }

    /// The directory commands run in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shell line `line`, to run in the sandbox (in its namespaces and
    /// directory, with a plain environment: `PATH` and `HOME` only).
    pub fn command(&self, line: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("--target")
            .arg(self.holder.id().to_string())
            .arg("--mount");
        if self.root.is_some() {
            cmd.arg("--cgroup");
        }
        cmd.arg(format!("--net={}", self.node.node.path().display()))
            .args(["--", "sh", "-c"])
            .arg(format!("cd '{}' && exec {line}", self.dir.display()))
            .env_clear()
            .env("PATH", &self.path_env)
            .env("HOME", "/root")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `line` and collects its output, whatever its exit status.
    pub fn run(&self, line: &str) -> Output {
        self.command(line)
            .output()
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    /// Runs `line`; panics with its output unless it succeeds, else
    /// returns its stdout.
    #[track_caller]
    pub fn run_ok(&self, line: &str) -> String {
        let out = self.run(line);
        assert!(
            out.status.success(),
            "{line}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `line` in the background, its output appended to `log`.
    pub fn spawn(&self, line: &str, log: &Path) -> Child {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = file.try_clone().expect("duplicate the log");
        self.command(line)
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }
}

impl Drop for Sandbox<'_> {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
