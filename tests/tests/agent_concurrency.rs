//! The agent's reads never wait behind a change in progress: while a
//! `container add` is stuck in a system call, `status`, `container list`
//! and `GET /v1/containers/{name}` still answer.
//!
//! The add is held by the test: its network namespace "path" is a FIFO,
//! and opening a FIFO for reading blocks until a writer opens it. The test
//! sees the agent blocked there (a thread of it waits in the kernel's
//! `wait_for_partner`), asks its questions, and only then lets the add go
//! on (it then fails: a FIFO is not a network namespace).

use std::{
    fs::OpenOptions,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use datapath_tests::{
    agent::{Agent, datapath_bin},
    node::Node,
};
use nix::{sys::stat::Mode, unistd::mkfifo};

/// How long an answer may take before the test calls it stuck. Far above
/// any real answer: it only turns a hang into a failure.
const STUCK: Duration = Duration::from_secs(30);

/// Lets an agent blocked opening `path` go on (on every exit path of the
/// test), and kills the client waiting for it.
struct Release {
    fifo: PathBuf,
    client: Option<Child>,
}

impl Release {
    /// Opens the FIFO for writing without blocking: if a reader waits in
    /// `open`, both opens complete; if none does, nothing happens.
    fn release(&self) {
        let _ = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.fifo);
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        self.release();
        if let Some(mut client) = self.client.take() {
            let _ = client.kill();
            let _ = client.wait();
        }
        let _ = std::fs::remove_file(&self.fifo);
    }
}

/// `datapath --api-socket SOCKET ARGS`, with its output captured.
fn cli(agent: &Agent<'_>, args: &[&str]) -> Command {
    let mut cmd = Command::new(datapath_bin());
    cmd.arg("--api-socket")
        .arg(agent.socket())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `cmd` to completion, or gives up after [`STUCK`] (killing it).
fn run_unless_stuck(mut cmd: Command) -> Option<Output> {
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let deadline = Instant::now() + STUCK;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) => return Some(child.wait_with_output().expect("collect the output")),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Whether a thread of process `pid` waits in the kernel for the other end
/// of a FIFO.
fn waits_on_a_fifo(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("wchan"))
            .is_ok_and(|w| w.trim() == "wait_for_partner")
    })
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn names(list: &serde_json::Value) -> Vec<&str> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|c| c["name"].as_str().expect("a name"))
        .collect()
}

#[test]
fn status_and_listings_answer_while_an_add_is_stuck() {
    let node = Node::new();
    let web = node.add_container_netns("web");
    let agent = Agent::start(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        web.name(),
        "--publish",
        "8080:80",
    ]);
    let pid = agent.pid().expect("the agent runs");
    assert!(!waits_on_a_fifo(pid), "the agent waits on a FIFO already");

    let fifo = agent
        .socket()
        .parent()
        .map_or_else(|| PathBuf::from("netns-fifo"), |d| d.join("netns-fifo"));
    mkfifo(&fifo, Mode::S_IRUSR | Mode::S_IWUSR).expect("make the FIFO");
    let fifo_arg = fifo.to_str().expect("a UTF-8 path").to_owned();
    let mut release = Release {
        fifo: fifo.clone(),
        client: None,
    };
    release.client = Some(
        cli(
            &agent,
            &[
                "container",
                "add",
                "slow",
                "--netns",
                &fifo_arg,
                "-p",
                "9090:90",
            ],
        )
        .spawn()
        .expect("start the slow add"),
    );

    // The add is in progress: the agent is blocked opening the FIFO.
    let deadline = Instant::now() + STUCK;
    while !waits_on_a_fifo(pid) {
        assert!(
            Instant::now() < deadline,
            "the agent never opened the FIFO:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let status = run_unless_stuck(cli(&agent, &["status", "--json"]))
        .expect("status did not answer while an add was in progress");
    let status = json(&status);
    assert_eq!(status["containers"], 1, "{status}");
    let list = run_unless_stuck(cli(&agent, &["container", "list", "--json"]))
        .expect("container list did not answer while an add was in progress");
    assert_eq!(names(&json(&list)), ["web"]);
    let show = run_unless_stuck(curl(agent.socket(), "/v1/containers/web"))
        .expect("GET /v1/containers/web did not answer while an add was in progress");
    assert_eq!(json(&show)["name"], "web");

    // All of that while the add was still held.
    assert!(waits_on_a_fifo(pid), "the add was let go too early");
    let client = release.client.as_mut().expect("the slow add's client");
    assert!(
        client.try_wait().expect("poll the slow add").is_none(),
        "the slow add finished before it was let go"
    );

    // Let it go: it fails (a FIFO is no network namespace) and leaves
    // nothing behind.
    release.release();
    let client = release.client.take().expect("the slow add's client");
    let out = client.wait_with_output().expect("wait for the slow add");
    assert!(!out.status.success(), "a FIFO was taken for a netns");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a network namespace"), "{err}");
    let list = agent.cli_json(["container", "list", "--json"]);
    assert_eq!(names(&list), ["web"]);
    assert_eq!(agent.cli_json(["status", "--json"])["containers"], 1);
}

/// `curl` on the API socket: the HTTP route without the CLI.
fn curl(socket: &Path, route: &str) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--fail", "--unix-socket"])
        .arg(socket)
        .arg(format!("http://datapath{route}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}
