//! The agent running in a [`Node`]'s namespace, with every path of its own.
//!
//! ```no_run
//! use datapath_tests::{agent::Agent, node::Node};
//!
//! let node = Node::new();
//! let ctr = node.add_container_netns("web");
//! let agent = Agent::start(&node);
//! agent.cli_ok(["container", "add", "web", "--netns", ctr.name(), "--publish", "8080:80"]);
//! let status = agent.cli_json(["status", "--json"]);
//! ```

use std::{
    ffi::{CString, OsStr},
    fs::{File, OpenOptions},
    net::Ipv4Addr,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU8, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    cgroup::Cgroup,
    names,
    netns::Netns,
    node::{Node, UPLINK},
    sys,
};

/// Where each agent's directory (socket, state, log) is made.
pub const TMP_DIR: &str = "/tmp";
/// How long the agent may take to create its API socket. Loading verifies
/// the programs, about a second of CPU time alone; with several tests
/// starting agents at once on two shared cores it can take ten.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The `datapath` binary: `$DATAPATH_BIN`, else `datapath` next to the test
/// executable's directory (`target/<profile>/datapath`).
pub fn datapath_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DATAPATH_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "DATAPATH_BIN={} does not exist", p.display());
        return p;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("datapath"))
        .unwrap_or_else(|| PathBuf::from("datapath"));
    assert!(
        candidate.is_file(),
        "the agent binary {} is missing: run `cargo xtask test` or build with `cargo build --bins` \
         (or set DATAPATH_BIN)",
        candidate.display()
    );
    candidate
}

/// Options of an [`Agent`].
#[derive(Debug)]
pub struct AgentBuilder<'n> {
    node: &'n Node,
    pool: Option<String>,
    args: Vec<String>,
    cgroup_root: Option<PathBuf>,
    command: Option<Vec<String>>,
    env: Vec<(String, String)>,
    state_tmpfs: Option<String>,
}

impl<'n> AgentBuilder<'n> {
    /// The container pool (default `198.19.<n>.0/24`, n counting agents
    /// started by this process).
    pub fn pool(mut self, cidr: &str) -> Self {
        self.pool = Some(cidr.to_owned());
        self
    }

    /// No `--pool` (cluster mode: the agent claims its pool).
    pub fn without_pool(mut self) -> Self {
        self.pool = None;
        self
    }

    /// Adds arguments to `datapath agent` (e.g. `["--xdp-mode", "off"]`).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs the agent in a mount and cgroup namespace of its own in which
    /// `stand_in` is the cgroup2 root, mounted where the host's is: the
    /// agent sees that mount point as the root of the hierarchy, exactly as
    /// it sees the real one. A test of what the agent does with the root
    /// cannot reach the host's root cgroup even if the agent's check
    /// regresses: the most it can limit is the stand-in.
    pub fn cgroup2_root_stand_in(mut self, stand_in: &Cgroup) -> Self {
        self.cgroup_root = Some(stand_in.path().to_owned());
        self
    }

    /// Runs `datapath WORDS…` instead of `datapath agent` (e.g. a systemd
    /// unit's `ExecStart`, after the binary); the harness's flags (uplink,
    /// pool, paths) and [`AgentBuilder::args`] follow, and win over a
    /// configuration file the words name.
    pub fn command<I, S>(mut self, words: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.command = Some(words.into_iter().map(Into::into).collect());
        self
    }

    /// Sets an environment variable of the agent process.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Keeps the agent's state directory on a tmpfs of its own of `size`
    /// (`mount -o size=…`, e.g. `1m`), unmounted when the agent is dropped:
    /// a test can fill it up to make the agent's writes fail.
    pub fn state_on_tmpfs(mut self, size: &str) -> Self {
        self.state_tmpfs = Some(size.to_owned());
        self
    }

    /// Starts the agent and waits for its API socket.
    pub fn start(self) -> Agent<'n> {
        let mut agent = self.spawn();
        agent.wait_api();
        agent
    }

    /// Starts several agents at once (all processes first, then the waits
    /// for their sockets): agents racing each other at start.
    pub fn start_all(builders: Vec<Self>) -> Vec<Agent<'n>> {
        let mut agents: Vec<Agent<'n>> = builders.into_iter().map(Self::spawn).collect();
        for agent in &mut agents {
            agent.wait_api();
        }
        agents
    }

    /// Starts the agent without waiting for it ([`Agent::wait_api`] does).
    pub fn spawn(self) -> Agent<'n> {
        let bin = datapath_bin();
        sys::ensure_bpffs();
        // Named after the node, so that its leftovers are the node's.
        static AGENTS: AtomicU32 = AtomicU32::new(0);
        let n = AGENTS.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{}-agent{n}", names::PREFIX, self.node.id());
        let bpffs_dir = Path::new(sys::BPFFS).join(&name);
        let tmp_dir = Path::new(TMP_DIR).join(&name);
        let state_dir = tmp_dir.join("state");
        let socket = tmp_dir.join("api.sock");
        std::fs::create_dir_all(&state_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", state_dir.display()));
        if let Some(size) = &self.state_tmpfs {
            nix::mount::mount(
                Some("tmpfs"),
                &state_dir,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some(format!("size={size},mode=0700").as_str()),
            )
            .unwrap_or_else(|e| panic!("mounting a tmpfs on {}: {e}", state_dir.display()));
        }
        let log_path = tmp_dir.join("agent.log");
        File::create(&log_path).unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
        // The socket programs go on a cgroup of the agent's own, never the
        // machine's cgroup2 root (with a stand-in root, the agent's default
        // is the stand-in).
        let socket_cgroup = (self.cgroup_root.is_none()
            && !self.args.iter().any(|a| a == "--socket-cgroup"))
        .then(Cgroup::new);
        let mut agent = Agent {
            node: self.node,
            socket_cgroup,
            bin,
            child: None,
            pool: self.pool,
            args: self.args,
            cgroup_root: self.cgroup_root,
            command: self.command,
            env: self.env,
            state_mounted: self.state_tmpfs.is_some(),
            bpffs_dir,
            tmp_dir,
            socket,
            log_path,
        };
        agent.spawn();
        agent
    }
}

/// The metrics page an agent serves at `/metrics` on API socket `socket`.
pub fn metrics_at(socket: &Path) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| format!("socket timeout: {e}"))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: datapath\r\n\r\n")
        .map_err(|e| format!("send the request: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("read the metrics: {e}"))?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") => Ok(body.to_owned()),
        _ => Err(format!("metrics refused: {answer}")),
    }
}

/// A running agent; stopped (SIGTERM, then SIGKILL) on drop, its bpffs and
/// temporary directories removed.
#[derive(Debug)]
pub struct Agent<'n> {
    node: &'n Node,
    /// Where the socket programs are attached (`--socket-cgroup`).
    socket_cgroup: Option<Cgroup>,
    bin: PathBuf,
    child: Option<Child>,
    pool: Option<String>,
    args: Vec<String>,
    cgroup_root: Option<PathBuf>,
    command: Option<Vec<String>>,
    env: Vec<(String, String)>,
    state_mounted: bool,
    bpffs_dir: PathBuf,
    tmp_dir: PathBuf,
    socket: PathBuf,
    log_path: PathBuf,
}

impl<'n> Agent<'n> {
    /// The cgroup the agent attached its socket programs to: processes
    /// started in it (`Cgroup::enter`) and in the node namespace reach
    /// published ports through the node's addresses and loopback.
    pub fn socket_cgroup(&self) -> &Cgroup {
        self.socket_cgroup
            .as_ref()
            .expect("this agent's socket programs are not on a cgroup of the harness")
    }

    /// Options for an agent in `node`.
    pub fn builder(node: &'n Node) -> AgentBuilder<'n> {
        static POOL: AtomicU8 = AtomicU8::new(0);
        AgentBuilder {
            node,
            pool: Some(format!(
                "198.19.{}.0/24",
                POOL.fetch_add(1, Ordering::Relaxed)
            )),
            args: Vec::new(),
            cgroup_root: None,
            command: None,
            env: Vec::new(),
            state_tmpfs: None,
        }
    }

    /// Starts an agent with default options in `node`.
    pub fn start(node: &'n Node) -> Self {
        Self::builder(node).start()
    }

    /// The agent's own arguments (after `datapath`): `agent`, its paths,
    /// pool and the builder's extra arguments.
    fn agent_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = match &self.command {
            Some(words) => words.iter().map(Into::into).collect(),
            None => vec!["agent".into()],
        };
        args.extend(["--uplink", UPLINK].iter().map(Into::into));
        if let Some(pool) = &self.pool {
            args.push("--pool".into());
            args.push(pool.into());
        }
        args.push("--bpffs-dir".into());
        args.push(self.bpffs_dir.clone().into());
        args.push("--api-socket".into());
        args.push(self.socket.clone().into());
        args.push("--state-dir".into());
        args.push(self.state_dir().into());
        if let Some(cg) = &self.socket_cgroup {
            args.push("--socket-cgroup".into());
            args.push(cg.path().into());
        }
        args.extend(self.args.iter().map(Into::into));
        args
    }

    /// Starts the agent process (in the node namespace), its output
    /// appended to the log.
    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicating {}: {e}", self.log_path.display()));
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.agent_args())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(stand_in) = &self.cgroup_root {
            let mount = sys::cgroup2_root().expect("no cgroup2 hierarchy is mounted");
            enter_cgroup2_stand_in(&mut cmd, stand_in, &mount);
        }
        self.child = Some(self.node.node.spawn(&mut cmd));
    }

    /// Waits for the API socket; panics with the agent's log if it exits
    /// first or is too slow.
    pub fn wait_api(&mut self) {
        if let Err(e) = self.wait_ready() {
            panic!("{e}");
        }
    }

    /// Waits for the API socket; if the agent exits first (it is reaped)
    /// or is too slow, says so with its log.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.socket.exists() {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "the agent exited ({status}) before creating {}:\n{}",
                    self.socket.display(),
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the agent did not create {} within {START_TIMEOUT:?}:\n{}",
                    self.socket.display(),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node the agent runs in.
    pub fn node(&self) -> &'n Node {
        self.node
    }

    /// The container pool given with `--pool` (empty without one: a
    /// cluster agent claims its own).
    pub fn pool(&self) -> &str {
        self.pool.as_deref().unwrap_or_default()
    }

    /// The agent's bpffs directory (pinned maps and links).
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.tmp_dir.join("state")
    }

    /// The agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Runs `datapath --api-socket <socket> ARGS` (in the node namespace)
    /// and returns its output whatever its exit status.
    pub fn cli<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--api-socket").arg(&self.socket).args(args);
        self.node.node.run(&mut cmd)
    }

    /// Like [`Agent::cli`]; panics with the CLI's stderr (and the agent's
    /// log) unless it succeeds, else returns its stdout.
    #[track_caller]
    pub fn cli_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "datapath {args:?} failed ({}):\n{}{}\nagent log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like [`Agent::cli_ok`], parsing stdout as JSON.
    #[track_caller]
    pub fn cli_json<I, S>(&self, args: I) -> serde_json::Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.cli_ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("CLI output is not JSON ({e}):\n{out}"))
    }

    /// `datapath status --json`.
    #[track_caller]
    pub fn status(&self) -> serde_json::Value {
        self.cli_json(["status", "--json"])
    }

    /// Counter `name` of `datapath status --json` (e.g. `drop_spoofed`).
    #[track_caller]
    pub fn counter(&self, name: &str) -> u64 {
        let st = self.status();
        st["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {st:#}"))
    }

    /// The metrics page the agent serves at `/metrics` on its API socket.
    #[track_caller]
    pub fn metrics(&self) -> String {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.socket.display()));
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("socket timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: datapath\r\n\r\n")
            .expect("send the request");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read the metrics");
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP answer: {answer}"));
        assert!(
            head.starts_with("HTTP/1.0 200"),
            "metrics refused: {answer}"
        );
        body.to_owned()
    }

    /// Starts `datapath monitor ARGS` in the node namespace, its stdout
    /// piped (killed when dropped, with the node).
    pub fn monitor(&self, args: &[&str]) -> Child {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--api-socket")
            .arg(&self.socket)
            .arg("monitor")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        self.node.node.spawn(&mut cmd)
    }

    /// The flows of `datapath conntrack list --json`.
    #[track_caller]
    pub fn flows(&self) -> Vec<serde_json::Value> {
        match self.cli_json(["conntrack", "list", "--json"]) {
            serde_json::Value::Array(a) => a,
            other => panic!("conntrack list is not a list: {other}"),
        }
    }

    /// The containers of `datapath container list --json`.
    #[track_caller]
    pub fn containers(&self) -> Vec<ContainerInfo> {
        match self.cli_json(["container", "list", "--json"]) {
            serde_json::Value::Array(a) => a.into_iter().map(ContainerInfo::from_json).collect(),
            other => panic!("container list is not a list: {other}"),
        }
    }

    /// Container `name`, if listed.
    #[track_caller]
    pub fn container(&self, name: &str) -> Option<ContainerInfo> {
        self.containers().into_iter().find(|c| c.name == name)
    }

    /// `datapath container add NAME --netns NETNS ARGS…`, which must succeed;
    /// returns the container as listed.
    #[track_caller]
    pub fn add(&self, name: &str, netns: &Netns, args: &[&str]) -> ContainerInfo {
        let mut all = vec!["container", "add", name, "--netns", netns.name()];
        all.extend_from_slice(args);
        self.cli_ok(&all);
        self.container(name)
            .unwrap_or_else(|| panic!("{name} is not listed after `datapath {all:?}`"))
    }

    /// `datapath container add NAME --netns NETNS ARGS…`, which must fail;
    /// returns its stderr.
    #[track_caller]
    pub fn add_refused(&self, name: &str, netns: &str, args: &[&str]) -> String {
        let mut all = vec!["container", "add", name, "--netns", netns];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            !out.status.success(),
            "datapath {all:?} succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Kills the agent with SIGKILL, as a crash would, and reaps it: it
    /// gets no chance to clean up (its stale API socket stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already gone is fine: it is reaped below either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Replaces the extra arguments (the builder's [`AgentBuilder::args`])
    /// and the pool the next [`Agent::restart`] starts the agent with.
    pub fn set_pool_and_args(&mut self, pool: &str, args: &[&str]) {
        self.pool = Some(pool.to_owned());
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// The full command line (after the binary) of `datapath agent` with
    /// this agent's paths, pool and arguments.
    pub fn command_line(&self) -> Vec<std::ffi::OsString> {
        self.agent_args()
    }

    /// Sets (`Some`) or unsets (`None`) an environment variable of the
    /// agent processes started from now on ([`Agent::restart`]).
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// Replaces the arguments given with [`AgentBuilder::args`] for the
    /// agent processes started from now on ([`Agent::restart`]).
    pub fn set_args<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
    }

    /// Waits up to `timeout` for the agent process to exit by itself (a
    /// crash), reaping it; returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts a new agent process with the same paths and arguments, after
    /// [`Agent::kill`] or [`Agent::stop`]; returns the log if it does not
    /// come up (it is then not running).
    pub fn try_restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "the agent is still running");
        // A killed agent leaves its socket: readiness is a new one.
        match std::fs::remove_file(&self.socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                panic!("removing {}: {e}", self.socket.display())
            }
            _ => {}
        }
        self.spawn();
        self.wait_ready()
    }

    /// [`Agent::try_restart`], panicking with the log on failure.
    #[track_caller]
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    /// Stops the agent (SIGTERM) and runs `datapath agent --cleanup` with
    /// the same paths and arguments in the node namespace; returns its
    /// output whatever its exit status.
    pub fn cleanup(&mut self) -> Output {
        self.stop();
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.agent_args()).arg("--cleanup");
        self.node.node.run(&mut cmd)
    }

    /// Stops the agent: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
    /// Returns whether it exited by itself (on SIGTERM) and successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        if kill(pid, Signal::SIGTERM).is_err() {
            // Already gone: reap it.
            return child.wait().is_ok_and(|s| s.success());
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        eprintln!("warning: the agent ignored SIGTERM for {STOP_TIMEOUT:?}; killing it");
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("agent log ({}):\n{}", self.log_path.display(), self.log());
        }
        if self.state_mounted {
            let state = self.state_dir();
            if let Err(e) = nix::mount::umount2(&state, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("warning: unmounting {}: {e}", state.display());
            }
        }
        for dir in [&self.bpffs_dir, &self.tmp_dir] {
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    eprintln!("warning: removing {}: {e}", dir.display());
                }
                _ => {}
            }
        }
    }
}

/// One container as `datapath container list --json` shows it: the fields
/// tests use most, and the whole entry.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerInfo {
    /// Its name.
    pub name: String,
    /// The agent's id of it (`container_id` in the maps).
    pub id: u32,
    /// Its address.
    pub addr: Ipv4Addr,
    /// Its IPv6 address, on a dual-stack node (`--pool6`).
    pub addr6: Option<std::net::Ipv6Addr>,
    /// The host end of its veth pair.
    pub host_ifname: String,
    /// The whole listing entry.
    pub json: serde_json::Value,
}

impl ContainerInfo {
    /// Reads a listing entry; panics if a field is missing.
    pub fn from_json(json: serde_json::Value) -> Self {
        let field = |name: &str| {
            json[name]
                .as_str()
                .unwrap_or_else(|| panic!("no {name} in {json:#}"))
                .to_owned()
        };
        Self {
            name: field("name"),
            id: json["id"]
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .unwrap_or_else(|| panic!("no id in {json:#}")),
            addr: field("addr")
                .parse()
                .unwrap_or_else(|e| panic!("bad addr in {json:#}: {e}")),
            addr6: json["addr6"].as_str().map(|a| {
                a.parse()
                    .unwrap_or_else(|e| panic!("bad addr6 in {json:#}: {e}"))
            }),
            host_ifname: field("host_ifname"),
            json,
        }
    }
}

/// Makes `cmd` (between fork and exec) join cgroup `stand_in`, enter new
/// mount and cgroup namespaces (whose cgroup root is then `stand_in`), and
/// mount that namespace's cgroup2 view over `mount`, the host's cgroup2
/// mount point. The new mount namespace is a slave of the host's: mounts
/// made later on the host (`ip netns add`) reach it, its own cgroup2 mount
/// never leaves it.
fn enter_cgroup2_stand_in(cmd: &mut Command, stand_in: &Path, mount: &Path) {
    crate::cgroup::join_on_exec(cmd, stand_in);
    let target = CString::new(mount.as_os_str().as_bytes()).expect("no NUL byte in a path");
    // SAFETY: the closure runs in the forked child, after the one joining
    // the cgroup, and only makes async-signal-safe system calls on memory
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            check(libc::umount2(target.as_ptr(), libc::MNT_DETACH))?;
            check(libc::mount(
                c"cgroup2".as_ptr(),
                target.as_ptr(),
                c"cgroup2".as_ptr(),
                0,
                std::ptr::null(),
            ))
        });
    }
}
