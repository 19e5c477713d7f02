//! The README's examples work as written: every command of every `sh`
//! block, in order, run as a user would on a node, in a sandbox that looks
//! like one:
//!
//! * a namespace node whose uplink is `eth0` with 198.18.0.2, the address
//!   the README uses;
//! * a mount namespace of its own with a fresh `/run` (so `ip netns add`,
//!   `/run/datapath/api.sock` and the agent's other default paths are the
//!   sandbox's), `/var/lib` and `/opt` on tmpfs, `/etc` under an overlay,
//!   a bpffs instance of its own on `/sys/fs/bpf`, and a cgroup namespace
//!   rooted at a cgroup of this test mounted as the cgroup2 hierarchy;
//! * a working directory laid out like the repository after
//!   `cargo build --release` (`target/release/…`, `examples/`), and this
//!   build's `datapath` first on `PATH`.
//!
//! Nothing the commands do reaches the host: the sandbox's mounts, network
//! namespaces and pins go with it. One substitution keeps to the tests'
//! address rule (only 198.18.0.0/15): the README's pool `10.88.0.0/16`
//! becomes `198.19.0.0/16`.
//!
//! `datapath agent` without `--check-config` runs in the background until
//! the next one starts (or the end), `etcd` (cluster mode's store) until
//! the end, once it answers on its client URL; every other command must
//! succeed, a `curl` must print JSON that is no error (a Prometheus page
//! if it asks for `/metrics`), and `--json` output must be JSON. Every
//! fenced block must say its language (`sh` is run; `text`,
//! `toml` and `json` are not commands), so none escapes; the only commands
//! not run are `cargo xtask run` and `cargo xtask test` (this test is part
//! of the latter).

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Child,
};

use datapath_tests::{
    agent::{START_TIMEOUT, STOP_TIMEOUT, datapath_bin},
    names,
    node::{Node, UPLINK},
    sandbox::Sandbox,
    wait,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Commands the test does not run, and why.
const NOT_RUN: &[(&str, &str)] = &[
    (
        "cargo xtask run",
        "builds everything and runs its own sandbox",
    ),
    ("cargo xtask test", "runs this test"),
];

/// The one substitution (see the module's documentation).
const POOL: (&str, &str) = ("10.88.0.0/16", "198.19.0.0/16");

/// One command of a `sh` block, and where it is.
#[derive(Debug)]
struct Example {
    line: usize,
    command: String,
}

/// The commands of the README's `sh` blocks, in order; panics on a fenced
/// block without a known language.
fn examples(readme: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    let mut pending = String::new();
    let mut pending_line = 0;
    for (i, raw) in readme.lines().enumerate() {
        let line_no = i + 1;
        if let Some(info) = raw.strip_prefix("```") {
            match fence.take() {
                Some(_) => {
                    assert!(
                        pending.is_empty(),
                        "README.md:{line_no}: a `\\` before the end of the block"
                    );
                }
                None => {
                    let lang = info.trim().to_owned();
                    assert!(
                        ["sh", "text", "toml", "json"].contains(&lang.as_str()),
                        "README.md:{line_no}: a fenced block says {lang:?}: say `sh` for commands \
                         (this test runs them) or `text`"
                    );
                    fence = Some(lang);
                }
            }
            continue;
        }
        if fence.as_deref() != Some("sh") {
            continue;
        }
        let code = strip_comment(raw);
        if pending.is_empty() {
            pending_line = line_no;
        }
        match code.trim_end().strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head.trim());
                pending.push(' ');
            }
            None => {
                pending.push_str(code.trim());
                let command = std::mem::take(&mut pending).trim().to_owned();
                if !command.is_empty() {
                    out.push(Example {
                        line: pending_line,
                        command,
                    });
                }
            }
        }
    }
    assert!(fence.is_none(), "README.md: a fenced block is not closed");
    out
}

/// `line` without a `#` comment (one preceded by a blank, outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '#' && prev.is_whitespace() => return &line[..i],
            None => {}
        }
        prev = c;
    }
    line
}

/// The node with its uplink named as the README names it, and the
/// sandbox around it, working in a copy of the repository's layout.
fn sandbox<'n>(node: &'n Node, dir: &Path) -> Sandbox<'n> {
    for args in [
        vec!["link", "set", UPLINK, "down"],
        vec!["link", "set", UPLINK, "name", "eth0"],
        vec!["link", "set", "eth0", "up"],
    ] {
        node.node.exec_ok("ip", args);
    }
    node.node.wait_link_up("eth0");
    // The repository after `cargo build --release`, as the README assumes,
    // with this build's binaries.
    let _ = fs::remove_dir_all(dir);
    let bin = dir.join("bin");
    let release = dir.join("target/release");
    for d in [&bin, &release] {
        fs::create_dir_all(d).expect("create the working directory");
    }
    let built = datapath_bin();
    let built_dir = built.parent().expect("a binary directory");
    for name in ["datapath", "datapath-cni"] {
        symlink(built_dir.join(name), release.join(name)).expect("link a binary");
        symlink(built_dir.join(name), bin.join(name)).expect("link a binary");
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository");
    symlink(repo.join("examples"), dir.join("examples")).expect("link the examples");
    Sandbox::builder(node)
        .cgroup2_stand_in()
        .path_first(bin)
        .dir(dir)
        .start()
}

/// The working directory, removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A background agent and its log.
struct Running {
    child: Child,
    log: PathBuf,
    example: String,
}

impl Drop for Running {
    /// Whatever happens to the test, nothing it started outlives it.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client URL `etcd` command `command` advertises, which answers
/// `/health` once it serves.
fn etcd_url(command: &str) -> &str {
    let mut words = command.split_whitespace();
    words
        .find(|w| *w == "--advertise-client-urls")
        .and_then(|_| words.next())
        .and_then(|urls| urls.split(',').next())
        .unwrap_or_else(|| panic!("`{command}` names no --advertise-client-urls"))
}

impl Running {
    /// SIGTERM, then SIGKILL; whether it exited cleanly.
    fn stop(mut self) -> bool {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGTERM);
        let exited = wait::within(STOP_TIMEOUT, || {
            self.child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = self.child.kill();
        }
        self.child.wait().is_ok_and(|s| s.success()) && exited
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[test]
fn every_command_the_readme_shows_runs_as_written() {
    let readme = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the repository")
            .join("README.md"),
    )
    .expect("read README.md");
    let examples = examples(&readme);
    assert!(examples.len() > 20, "{examples:#?}");
    let node = Node::new();
    let work = WorkDir(Path::new("/tmp").join(format!("{}{}-readme", names::PREFIX, node.id())));
    let sandbox = sandbox(&node, &work.0);
    let mut agent: Option<Running> = None;
    let mut store: Option<Running> = None;
    let mut not_run = Vec::new();
    for (n, ex) in examples.iter().enumerate() {
        let what = format!("README.md:{}: {}", ex.line, ex.command);
        if let Some((_, why)) = NOT_RUN.iter().find(|(c, _)| ex.command.starts_with(c)) {
            eprintln!("not run ({why}): {what}");
            not_run.push(
                ex.command
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            continue;
        }
        let command = ex.command.replace(POOL.0, POOL.1);
        if command.starts_with("etcd ") {
            assert!(store.is_none(), "{what}: a second etcd");
            let log = work.0.join(format!("etcd{n}.log"));
            let mut running = Running {
                child: sandbox.spawn(&command, &log),
                log,
                example: what.clone(),
            };
            let health = format!("curl -sf {}/health", etcd_url(&command));
            let up = wait::within(START_TIMEOUT, || {
                running.child.try_wait().ok().flatten().is_some()
                    || sandbox.run(&health).status.success()
            });
            assert!(
                up && running.child.try_wait().ok().flatten().is_none(),
                "{what}: etcd did not start:\n{}",
                running.log()
            );
            store = Some(running);
            continue;
        }
        let daemon = command.starts_with("datapath agent")
            && !command.contains("--check-config")
            && !command.contains("--cleanup");
        if daemon {
            if let Some(previous) = agent.take() {
                let example = previous.example.clone();
                assert!(
                    previous.stop(),
                    "the agent of `{example}` did not stop cleanly"
                );
            }
            let log = work.0.join(format!("agent{n}.log"));
            let mut running = Running {
                child: sandbox.spawn(&command, &log),
                log,
                example: what.clone(),
            };
            let up = wait::within(START_TIMEOUT, || {
                if running.child.try_wait().ok().flatten().is_some() {
                    return true;
                }
                sandbox.run("datapath status").status.success()
            });
            assert!(
                up && running.child.try_wait().ok().flatten().is_none(),
                "{what}: the agent did not start:\n{}",
                running.log()
            );
            agent = Some(running);
            continue;
        }
        let out = sandbox.run(&command);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let agent_log = agent.as_ref().map(Running::log).unwrap_or_default();
        assert!(
            out.status.success(),
            "{what}: {}\n{stdout}{}\nagent log:\n{agent_log}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        if command.starts_with("curl") && command.ends_with("/metrics") {
            let lines = stdout.lines().map(|l| Ok(l.to_owned()));
            let page = prometheus_parse::Scrape::parse(lines)
                .unwrap_or_else(|e| panic!("{what}: not a metrics page ({e}): {stdout}"));
            assert!(
                page.samples
                    .iter()
                    .any(|s| s.metric == "datapath_build_info"),
                "{what}: {stdout}"
            );
        } else if command.starts_with("curl") || command.contains("--json") {
            let json: serde_json::Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {stdout}"));
            assert!(json.get("error").is_none(), "{what}: {json:#}");
        }
    }
    if let Some(running) = agent.take() {
        let example = running.example.clone();
        assert!(
            running.stop(),
            "the agent of `{example}` did not stop cleanly"
        );
    }
    drop(store);
    not_run.sort();
    not_run.dedup();
    let mut expected: Vec<String> = NOT_RUN.iter().map(|(c, _)| (*c).to_owned()).collect();
    expected.sort();
    assert_eq!(not_run, expected, "the commands not run changed");
}

/// The pinned names are an interface: the README's table of them lists
/// every map the agent pins and every program it attaches.
#[test]
fn the_readme_lists_every_pinned_map_and_attached_program() {
    use datapath_common::maps::{names, programs};
    let readme = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the repository")
            .join("README.md"),
    )
    .expect("read README.md");
    let table: Vec<&str> = readme
        .split("### Pinned names")
        .nth(1)
        .expect("a section `Pinned names`")
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    for map in names::ALL {
        let pin = format!("| `maps/{map}` |");
        assert!(
            table.iter().any(|row| row.starts_with(&pin)),
            "the README's pinned names do not list map {map}"
        );
    }
    for program in [
        programs::UPLINK_TC,
        programs::UPLINK_XDP,
        programs::CONTAINER_TC,
        programs::RATE_EGRESS,
        programs::RATE_INGRESS,
        programs::RATE_SOCKOPS,
        programs::OVERLAY_TC,
        programs::OVERLAY_EGRESS_TC,
        programs::SOCK_CONNECT4,
        programs::SOCK_SENDMSG4,
        programs::SOCK_RECVMSG4,
        programs::SOCK_GETPEERNAME4,
        programs::SOCK_CONNECT6,
        programs::SOCK_SENDMSG6,
        programs::SOCK_RECVMSG6,
        programs::SOCK_GETPEERNAME6,
    ] {
        assert!(
            table
                .iter()
                .any(|row| row.contains(&format!("`{program}`"))),
            "the README's pinned names do not say where program {program} is attached"
        );
    }
}
