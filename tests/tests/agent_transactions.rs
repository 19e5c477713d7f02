//! A change that fails at its last step is undone whole. Recording the
//! change in the state's journal is the last step of every change, and
//! the test makes it fail: the agent's state directory is a small tmpfs,
//! filled up, so the journal write fails (no space left) after everything
//! else of the change has been done. (The agent is restarted before, so
//! that its journal file is new and empty: a record appended to a file
//! whose last page has room needs no new space.)

use std::{io::Write as _, path::PathBuf};

use datapath_tests::{agent::Agent, inspect, node::Node};

/// The agent's state directory full until dropped.
struct FullStateDir {
    path: PathBuf,
}

impl FullStateDir {
    fn new(agent: &Agent<'_>) -> Self {
        let path = agent.state_dir().join("filler");
        let mut f = std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let block = vec![0xa5u8; 4096];
        // Bounded: the tmpfs is 1 MiB.
        for _ in 0..4096 {
            if f.write_all(&block).and_then(|()| f.flush()).is_err() {
                break;
            }
        }
        Self { path }
    }
}

impl Drop for FullStateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An agent whose state directory is a 1 MiB tmpfs.
fn agent(node: &Node) -> Agent<'_> {
    Agent::builder(node).state_on_tmpfs("1m").start()
}

/// Restarts the agent: it starts a new, empty journal file.
fn fresh_journal(agent: &mut Agent<'_>) {
    agent.stop();
    agent.restart();
}

/// Everything the agent made that a change touches: the node's links, the
/// container program's link pins, and the SERVICES and ENDPOINTS entries.
#[derive(Debug, PartialEq, Eq)]
struct Made {
    links: Vec<String>,
    pins: Vec<String>,
    services: Vec<String>,
    endpoints: Vec<String>,
}

fn made(node: &Node, agent: &Agent<'_>) -> Made {
    let dump = |map: &str| {
        let mut entries: Vec<String> = inspect::map_dump(agent, map)
            .iter()
            .map(ToString::to_string)
            .collect();
        entries.sort();
        entries
    };
    let mut pins: Vec<String> = std::fs::read_dir(agent.bpffs_dir().join("links"))
        .expect("read the link pins")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pins.sort();
    Made {
        links: inspect::links(&node.node),
        pins,
        services: dump("SERVICES"),
        endpoints: dump("ENDPOINTS"),
    }
}

/// Each container's name and published ports, from `container list`.
fn listing(agent: &Agent<'_>) -> Vec<(String, Vec<String>)> {
    let list = agent.cli_json(["container", "list", "--json"]);
    list.as_array()
        .expect("a list")
        .iter()
        .map(|c| {
            let ports = c["publish"]
                .as_array()
                .expect("ports")
                .iter()
                .map(|p| p.as_str().expect("a port").to_owned())
                .collect();
            (c["name"].as_str().expect("a name").to_owned(), ports)
        })
        .collect()
}

fn fails_saving(agent: &Agent<'_>, args: &[&str]) {
    let out = agent.cli(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{args:?} succeeded without its state"
    );
    assert!(err.contains("journal"), "{args:?}: {err}");
    assert!(err.contains("No space left"), "{args:?}: {err}");
}

#[test]
fn an_add_that_cannot_be_saved_is_undone_whole() {
    let node = Node::new();
    let web = node.add_container_netns("web");
    let other = node.add_container_netns("other");
    let mut agent = agent(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        web.name(),
        "-p",
        "8080:80",
    ]);
    fresh_journal(&mut agent);
    let before = made(&node, &agent);

    let broken = FullStateDir::new(&agent);
    fails_saving(
        &agent,
        &[
            "container",
            "add",
            "other",
            "--netns",
            other.name(),
            "-p",
            "9090:90",
        ],
    );
    assert_eq!(made(&node, &agent), before);
    assert_eq!(inspect::links(&other), ["lo"]);
    assert_eq!(
        listing(&agent),
        [("web".into(), vec!["8080:80/tcp".into()])]
    );

    // With its state back, the same add succeeds.
    drop(broken);
    agent.cli_ok([
        "container",
        "add",
        "other",
        "--netns",
        other.name(),
        "-p",
        "9090:90",
    ]);
    assert_eq!(
        listing(&agent),
        [
            ("other".into(), vec!["9090:90/tcp".into()]),
            ("web".into(), vec!["8080:80/tcp".into()])
        ]
    );
    assert_eq!(made(&node, &agent).services.len(), 2);
}

#[test]
fn a_publish_that_cannot_be_saved_is_undone() {
    let node = Node::new();
    let web = node.add_container_netns("web");
    let mut agent = agent(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        web.name(),
        "-p",
        "8080:80",
    ]);
    fresh_journal(&mut agent);
    let before = made(&node, &agent);

    let broken = FullStateDir::new(&agent);
    fails_saving(&agent, &["container", "publish", "web", "9090:90"]);
    assert_eq!(made(&node, &agent), before);
    assert_eq!(
        listing(&agent),
        [("web".into(), vec!["8080:80/tcp".into()])]
    );

    drop(broken);
    agent.cli_ok(["container", "publish", "web", "9090:90"]);
    assert_eq!(made(&node, &agent).services.len(), 2);
}

#[test]
fn an_unpublish_that_cannot_be_saved_changes_nothing() {
    let node = Node::new();
    let web = node.add_container_netns("web");
    let mut agent = agent(&node);
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        web.name(),
        "-p",
        "8080:80",
        "-p",
        "9090:90",
    ]);
    let both = vec!["8080:80/tcp".to_owned(), "9090:90/tcp".to_owned()];
    fresh_journal(&mut agent);
    let before = made(&node, &agent);

    let broken = FullStateDir::new(&agent);
    fails_saving(&agent, &["container", "unpublish", "web", "9090:90"]);
    assert_eq!(made(&node, &agent), before);
    assert_eq!(listing(&agent), [("web".into(), both)]);

    drop(broken);
    agent.cli_ok(["container", "unpublish", "web", "9090:90"]);
    assert_eq!(
        listing(&agent),
        [("web".into(), vec!["8080:80/tcp".into()])]
    );
    assert_eq!(made(&node, &agent).services.len(), 1);
}
