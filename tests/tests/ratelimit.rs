//! Per-cgroup rate limits on a namespace node: real TCP senders (iperf3)
//! in a container's cgroup, the limits applied, changed and removed through
//! the CLI, and bad input refused with nothing applied.
//!
//! Rate assertions are deliberately generous (0.5x to 1.5x of the limit):
//! they check that the limit is what holds the traffic, not how precisely
//! (the benchmark measures that). Every test that measures takes the
//! traffic lock.

use std::{
    ffi::CString,
    net::{Ipv4Addr, SocketAddr},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use datapath_tests::{
    agent::Agent,
    cgroup::Cgroup,
    inspect,
    lock::TrafficLock,
    netns::Netns,
    node::Node,
    ratebench::{Iperf3Client, Iperf3Options, Iperf3Report, Iperf3Server, iperf3},
    sys,
};
use serde_json::Value;

const MBIT: f64 = 1e6;
const PORT: u16 = 5201;

/// `container add NAME --netns NS ARGS…`, panicking on failure.
fn add(agent: &Agent<'_>, name: &str, ns: &Netns, args: &[&str]) {
    let mut all = vec!["container", "add", name, "--netns", ns.name()];
    all.extend_from_slice(args);
    agent.cli_ok(all);
}

/// `container add …` that must fail; returns its stderr.
#[track_caller]
fn add_refused(agent: &Agent<'_>, name: &str, ns: &Netns, args: &[&str]) -> String {
    let mut all = vec!["container", "add", name, "--netns", ns.name()];
    all.extend_from_slice(args);
    let out = agent.cli(&all);
    assert!(
        !out.status.success(),
        "datapath {all:?} succeeded:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `container update NAME ARGS…`; returns whether it succeeded and stderr.
fn update(agent: &Agent<'_>, name: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["container", "update", name];
    all.extend_from_slice(args);
    let out = agent.cli(&all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The container named `name` in `container list --json`.
fn container(agent: &Agent<'_>, name: &str) -> Option<Value> {
    agent
        .cli_json(["container", "list", "--json"])
        .as_array()
        .expect("a list")
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
}

/// The agent's rate limiter link pins.
fn rate_pins(agent: &Agent<'_>) -> Vec<String> {
    let mut pins: Vec<String> = std::fs::read_dir(agent.bpffs_dir().join("links"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("rate_"))
                .collect()
        })
        .unwrap_or_default();
    pins.sort();
    pins
}

fn cg_arg(cg: &Cgroup) -> String {
    cg.path().to_string_lossy().into_owned()
}

fn mbit(bps: f64) -> String {
    format!("{:.1} Mbit/s", bps / MBIT)
}

/// Asserts `bps` is within 0.5x..1.5x of `limit_bps`.
#[track_caller]
fn assert_near(what: &str, bps: f64, limit_bps: f64, report: &Iperf3Report) {
    assert!(
        bps > 0.5 * limit_bps && bps < 1.5 * limit_bps,
        "{what}: {} is not within 0.5x-1.5x of the {} limit; per second sent {:?}, received {:?}",
        mbit(bps),
        mbit(limit_bps),
        report
            .intervals
            .iter()
            .map(|b| mbit(*b))
            .collect::<Vec<_>>(),
        report
            .received_intervals
            .iter()
            .map(|b| mbit(*b))
            .collect::<Vec<_>>()
    );
}

/// A cgroup below another one, removed on drop.
struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    fn new(parent: &Path, name: &str) -> Self {
        let path = parent.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// Makes `cmd` join this cgroup between fork and exec.
    fn enter<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let procs = CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes())
            .expect("no NUL byte");
        // SAFETY: only async-signal-safe calls on memory prepared before
        // the fork.
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
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..200 {
            match std::fs::remove_dir(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => return,
            }
        }
    }
}

#[test]
fn bad_limits_are_refused_with_clear_errors_and_nothing_is_applied() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    let cg = Cgroup::new();
    let cgroup = cg_arg(&cg);
    let root = sys::cgroup2_root().expect("cgroup2 is mounted");
    let missing = format!("{}/dpt-no-such-cgroup", root.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--cgroup", &missing, "--egress-rate", "10mbit"],
            "does not exist",
        ),
        (
            vec!["--cgroup", "/tmp", "--egress-rate", "10mbit"],
            "not a cgroup v2 directory",
        ),
        (
            vec!["--cgroup", "/proc", "--egress-rate", "10mbit"],
            "not a cgroup v2 directory",
        ),
        (
            vec![
                "--cgroup",
                root.to_str().expect("utf-8"),
                "--egress-rate",
                "10mbit",
            ],
            "cgroup2 root",
        ),
        (vec!["--cgroup", &cgroup, "--egress-rate", "0"], "zero"),
        (vec!["--cgroup", &cgroup, "--ingress-rate", "0mbit"], "zero"),
        (vec!["--cgroup", &cgroup, "--egress-rate", "2tbit"], "1tbit"),
        (
            vec![
                "--cgroup",
                &cgroup,
                "--egress-rate",
                "10mbit",
                "--egress-burst",
                "2gb",
            ],
            "1gb",
        ),
        (
            vec!["--cgroup", &cgroup, "--egress-rate", "10furlongs"],
            "unknown unit",
        ),
        (
            vec!["--cgroup", &cgroup, "--ingress-burst", "64kb"],
            "without a rate",
        ),
        (vec!["--egress-rate", "10mbit"], "--cgroup"),
    ];
    for (args, expected) in &cases {
        let err = add_refused(&agent, "web", &ctr, args);
        assert!(
            err.contains(expected),
            "{args:?}: expected {expected:?} in the error:\n{err}"
        );
        assert_eq!(container(&agent, "web"), None, "{args:?} added a container");
        assert_eq!(rate_pins(&agent), Vec::<String>::new(), "{args:?}");
        assert_eq!(
            inspect::map_dump(&agent, "RATE_LIMITS"),
            Vec::<Value>::new(),
            "{args:?} left a bucket"
        );
        assert_eq!(
            inspect::links(&node.node),
            ["lo", "up0"],
            "{args:?} left a veth"
        );
    }

    // Bad updates of a limited container change nothing either.
    add(
        &agent,
        "web",
        &ctr,
        &["--cgroup", &cgroup, "--egress-rate", "10mbit"],
    );
    let before = container(&agent, "web").expect("added");
    for (args, expected) in [
        (vec!["--egress-rate", "0"], "zero"),
        (vec!["--egress-rate", "5tbit"], "1tbit"),
        (vec!["--ingress-burst", "1mb"], "without a rate"),
        (
            vec!["--egress-rate", "none", "--egress-burst", "1mb"],
            "without a rate",
        ),
        (vec!["--egress-burst", "3gb"], "1gb"),
        (vec!["--ingress-rate", "fast"], "rate"),
    ] {
        let (ok, err) = update(&agent, "web", &args);
        assert!(!ok && err.contains(expected), "{args:?}: {err}");
        assert_eq!(container(&agent, "web"), Some(before.clone()), "{args:?}");
    }
    let (ok, err) = update(&agent, "nobody", &["--egress-rate", "1mbit"]);
    assert!(!ok && err.contains("no container"), "{err}");
}

#[test]
fn limits_cgroup_and_counters_show_in_the_listing_and_go_with_the_container() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    let cg = Cgroup::new();
    add(
        &agent,
        "web",
        &ctr,
        &[
            "--cgroup",
            &cg_arg(&cg),
            "--egress-rate",
            "10mbit",
            "--ingress-rate",
            "50mbit",
            "--egress-burst",
            "64kb",
        ],
    );
    let c = container(&agent, "web").expect("added");
    assert_eq!(c["cgroup"], cg_arg(&cg), "{c:#}");
    assert_eq!(c["limits"]["egress"]["rate_bps"], 10_000_000, "{c:#}");
    assert_eq!(c["limits"]["egress"]["burst_bytes"], 65_536, "{c:#}");
    assert_eq!(c["limits"]["ingress"]["rate_bps"], 50_000_000, "{c:#}");
    assert_eq!(
        c["limits"]["ingress"]["burst_bytes"],
        datapath_common::ratelimit::default_burst(
            datapath_common::ratelimit::direction::INGRESS,
            50_000_000
        ),
        "{c:#}"
    );
    for dir in ["egress", "ingress"] {
        for counter in [
            "passed_bytes",
            "passed_packets",
            "dropped_packets",
            "marked_packets",
        ] {
            assert_eq!(c["counters"][dir][counter], 0, "{c:#}");
        }
    }
    let text = agent.cli_ok(["container", "list"]);
    assert!(
        text.contains("egress  10mbit burst 64kb") && text.contains("ingress 50mbit"),
        "{text}"
    );
    // One bucket per direction, keyed by the cgroup's id, with named fields.
    let buckets = inspect::map_dump(&agent, "RATE_LIMITS");
    assert_eq!(buckets.len(), 2, "{buckets:#?}");
    assert!(
        buckets
            .iter()
            .all(|b| b["key"]["cgroup_id"] == cg.id() && b["value"]["rate_bps"].is_u64()),
        "{buckets:#?}"
    );
    let host_if = c["host_ifname"].as_str().expect("veth").to_owned();
    assert_eq!(
        rate_pins(&agent),
        [
            format!("rate_cgroup-egress_{host_if}"),
            format!("rate_cgroup-ingress_{host_if}"),
            format!("rate_cgroup-sock-ops_{host_if}"),
        ]
    );
    let st = agent.cli_json(["status", "--json"]);
    let hooks: Vec<&str> = st["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .filter_map(|a| a["hook"].as_str())
        .collect();
    for hook in ["cgroup-egress", "cgroup-ingress", "cgroup-sock-ops"] {
        assert!(hooks.contains(&hook), "{hook} not in {hooks:?}");
    }

    // Removing one direction's limit detaches its program and bucket only.
    let (ok, err) = update(&agent, "web", &["--ingress-rate", "none"]);
    assert!(ok, "{err}");
    let c = container(&agent, "web").expect("still there");
    assert_eq!(c["limits"]["ingress"], Value::Null, "{c:#}");
    assert_eq!(inspect::map_dump(&agent, "RATE_LIMITS").len(), 1);
    assert!(!rate_pins(&agent).iter().any(|p| p.contains("ingress")));

    // A second container cannot put limits on the same cgroup.
    let other = node.add_container_netns("other");
    let err = add_refused(
        &agent,
        "other",
        &other,
        &["--cgroup", &cg_arg(&cg), "--ingress-rate", "1mbit"],
    );
    assert!(err.contains("already limits"), "{err}");

    agent.cli_ok(["container", "del", "web"]);
    assert_eq!(rate_pins(&agent), Vec::<String>::new());
    assert_eq!(
        inspect::map_dump(&agent, "RATE_LIMITS"),
        Vec::<Value>::new()
    );
    assert_eq!(inspect::map_dump(&agent, "RATE_STATS"), Vec::<Value>::new());
}

#[test]
fn the_cgroup_may_be_named_under_the_cgroup2_mount() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let agent = Agent::start(&node);
    let cg = Cgroup::new();
    let name = cg
        .path()
        .file_name()
        .expect("a name")
        .to_string_lossy()
        .into_owned();
    add(
        &agent,
        "web",
        &ctr,
        &["--cgroup", &name, "--ingress-rate", "1gbit"],
    );
    let c = container(&agent, "web").expect("added");
    assert_eq!(c["cgroup"], cg_arg(&cg), "{c:#}");
    // The way runtimes write cgroup paths: from the hierarchy's root.
    let other = node.add_container_netns("other");
    let cg2 = Cgroup::new();
    let rooted = format!(
        "/{}",
        cg2.path().file_name().expect("a name").to_string_lossy()
    );
    add(
        &agent,
        "other",
        &other,
        &["--cgroup", &rooted, "--egress-rate", "1gbit"],
    );
    let c = container(&agent, "other").expect("added");
    assert_eq!(c["cgroup"], cg_arg(&cg2), "{c:#}");
}

/// A node with an agent and a container `web` in cgroup `cg`.
struct Limited<'n> {
    node: &'n Node,
    agent: Agent<'n>,
    ctr: Netns,
    cg: Cgroup,
}

impl<'n> Limited<'n> {
    fn new(node: &'n Node, args: &[&str]) -> Self {
        let ctr = node.add_container_netns("web");
        let agent = Agent::start(node);
        let cg = Cgroup::new();
        let mut all = vec!["--cgroup".to_owned(), cg_arg(&cg)];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        add(&agent, "web", &ctr, &all);
        Self {
            node,
            agent,
            ctr,
            cg,
        }
    }

    /// The client's iperf3 server address.
    fn client_server(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.node.client_addr(), port))
    }

    fn counters(&self, dir: &str) -> Value {
        container(&self.agent, "web").expect("web")["counters"][dir].clone()
    }
}

#[test]
fn egress_is_held_near_the_limit_and_an_unlimited_neighbour_is_not() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let web = Limited::new(&node, &["--egress-rate", "10mbit"]);
    let nb = node.add_container_netns("nb");
    let nb_cg = Cgroup::new();
    add(&web.agent, "nb", &nb, &["--cgroup", &cg_arg(&nb_cg)]);
    let _s1 = Iperf3Server::start(&node.client, None, node.client_addr(), PORT).expect("server");
    let _s2 =
        Iperf3Server::start(&node.client, None, node.client_addr(), PORT + 1).expect("server");
    let opts = Iperf3Options {
        seconds: 3,
        ..Default::default()
    };
    let limited = Iperf3Client::spawn(&web.ctr, Some(&web.cg), web.client_server(PORT), &opts)
        .expect("start the limited sender");
    let free = iperf3(&nb, Some(&nb_cg), web.client_server(PORT + 1), &opts)
        .unwrap_or_else(|e| panic!("{e}"));
    let limited = limited.wait().unwrap_or_else(|e| panic!("{e}"));
    assert_near(
        "limited egress",
        limited.received_bps,
        10.0 * MBIT,
        &limited,
    );
    assert!(
        free.received_bps > 100.0 * MBIT,
        "the unlimited neighbour got only {}",
        mbit(free.received_bps)
    );
    let n = web.counters("egress");
    assert!(
        n["passed_bytes"].as_u64().unwrap_or(0) > 1_000_000,
        "counters did not move: {n}"
    );
    assert_eq!(
        container(&web.agent, "nb").expect("nb")["counters"]["egress"]["passed_bytes"],
        0,
        "the unlimited neighbour has no bucket"
    );
}

#[test]
fn egress_updates_apply_within_a_second_and_removal_restores_full_speed_in_one_flow() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let web = Limited::new(&node, &["--egress-rate", "10mbit"]);
    let _server =
        Iperf3Server::start(&node.client, None, node.client_addr(), PORT).expect("server");
    let opts = Iperf3Options {
        seconds: 6,
        ..Default::default()
    };
    let flow = Iperf3Client::spawn(&web.ctr, Some(&web.cg), web.client_server(PORT), &opts)
        .expect("start the sender");
    std::thread::sleep(Duration::from_millis(2_000));
    let (ok, err) = update(&web.agent, "web", &["--egress-rate", "100mbit"]);
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(2_000));
    let (ok, err) = update(&web.agent, "web", &["--egress-rate", "none"]);
    assert!(ok, "{err}");
    let r = flow
        .wait()
        .unwrap_or_else(|e| panic!("the flow did not survive the updates: {e}"));
    assert!(r.intervals.len() >= 6, "{:?}", r.intervals);
    let per_second = &r.intervals;
    assert_near("second 1 at 10mbit", per_second[0], 10.0 * MBIT, &r);
    // Updated at ~2 s: the second after the next one runs at the new rate.
    assert_near("second 4 at 100mbit", per_second[3], 100.0 * MBIT, &r);
    // Removed at ~4 s.
    assert!(
        per_second[5] > 500.0 * MBIT,
        "second 6 without a limit ran at {}; per second: {:?}",
        mbit(per_second[5]),
        per_second.iter().map(|b| mbit(*b)).collect::<Vec<_>>()
    );
}

#[test]
fn nested_cgroups_count_against_the_containers_limit() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let web = Limited::new(&node, &["--egress-rate", "20mbit"]);
    let inner = ChildCgroup::new(web.cg.path(), "inner");
    let _server =
        Iperf3Server::start(&node.client, None, node.client_addr(), PORT).expect("server");
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        &node.client_addr().to_string(),
        "-p",
        &PORT.to_string(),
        "-t",
        "3",
        "-J",
    ]);
    inner.enter(&mut cmd);
    let out = web.ctr.run(&mut cmd);
    let r = Iperf3Report::parse(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}\n{}", String::from_utf8_lossy(&out.stderr));
    });
    assert_near(
        "egress from a nested cgroup",
        r.received_bps,
        20.0 * MBIT,
        &r,
    );
    let n = web.counters("egress");
    assert!(n["passed_bytes"].as_u64().unwrap_or(0) > 1_000_000, "{n}");
}

#[test]
fn ingress_through_a_published_port_is_held_updated_and_released() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let web = Limited::new(
        &node,
        &["--publish", "18080:5201", "--ingress-rate", "50mbit"],
    );
    let published = SocketAddr::from((node.node_addr(), 18080));
    let opts = Iperf3Options {
        seconds: 3,
        ..Default::default()
    };
    let run = || {
        let _server = Iperf3Server::start(&web.ctr, Some(&web.cg), Ipv4Addr::UNSPECIFIED, PORT)
            .expect("server in the container");
        iperf3(&node.client, None, published, &opts).unwrap_or_else(|e| panic!("{e}"))
    };
    let r = run();
    assert_near("ingress at 50mbit", r.received_bps, 50.0 * MBIT, &r);
    let n = web.counters("ingress");
    assert!(n["passed_bytes"].as_u64().unwrap_or(0) > 1_000_000, "{n}");

    let (ok, err) = update(&web.agent, "web", &["--ingress-rate", "10mbit"]);
    assert!(ok, "{err}");
    let r = run();
    assert_near("ingress at 10mbit", r.received_bps, 10.0 * MBIT, &r);

    let (ok, err) = update(&web.agent, "web", &["--ingress-rate", "none"]);
    assert!(ok, "{err}");
    let r = run();
    assert!(
        r.received_bps > 500.0 * MBIT,
        "without a limit ingress ran at {}",
        mbit(r.received_bps)
    );
}

#[test]
fn an_ingress_update_applies_within_a_second_in_one_flow() {
    let _lock = TrafficLock::acquire();
    let node = Node::new();
    let web = Limited::new(
        &node,
        &["--publish", "18080:5201", "--ingress-rate", "20mbit"],
    );
    let _server = Iperf3Server::start(&web.ctr, Some(&web.cg), Ipv4Addr::UNSPECIFIED, PORT)
        .expect("server in the container");
    let opts = Iperf3Options {
        seconds: 4,
        ..Default::default()
    };
    let flow = Iperf3Client::spawn(
        &node.client,
        None,
        SocketAddr::from((node.node_addr(), 18080)),
        &opts,
    )
    .expect("start the sender");
    std::thread::sleep(Duration::from_millis(1_500));
    let (ok, err) = update(&web.agent, "web", &["--ingress-rate", "80mbit"]);
    assert!(ok, "{err}");
    let r = flow
        .wait()
        .unwrap_or_else(|e| panic!("the flow did not survive the update: {e}"));
    // What the container received, second by second.
    let received = &r.received_intervals;
    assert!(received.len() >= 4, "{received:?}");
    assert_near("second 1 at 20mbit", received[0], 20.0 * MBIT, &r);
    assert_near("second 4 at 80mbit", received[3], 80.0 * MBIT, &r);
}

#[test]
fn limits_survive_an_agent_restart_with_fresh_programs_attached() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    let cg = Cgroup::new();
    add(
        &agent,
        "web",
        &ctr,
        &[
            "--cgroup",
            &cg_arg(&cg),
            "--egress-rate",
            "10mbit",
            "--ingress-rate",
            "20mbit",
        ],
    );
    let before = container(&agent, "web").expect("added");
    let pins = rate_pins(&agent);
    assert_eq!(pins.len(), 3, "{pins:?}");
    let program_ids = |agent: &Agent<'_>| -> Vec<u64> {
        let st = agent.cli_json(["status", "--json"]);
        let mut ids: Vec<u64> = st["attachments"]
            .as_array()
            .expect("attachments")
            .iter()
            .filter(|a| a["hook"].as_str().is_some_and(|h| h.starts_with("cgroup-")))
            .filter_map(|a| a["program_id"].as_u64())
            .collect();
        ids.sort_unstable();
        ids
    };
    let old_ids = program_ids(&agent);
    assert_eq!(old_ids.len(), 3);
    assert!(agent.stop(), "the agent stops on SIGTERM");
    agent.restart();
    assert_eq!(container(&agent, "web"), Some(before));
    assert_eq!(rate_pins(&agent), pins);
    let new_ids = program_ids(&agent);
    assert_eq!(new_ids.len(), 3, "the restarted agent reports its hooks");
    assert!(
        new_ids.iter().all(|id| !old_ids.contains(id)),
        "the freshly loaded programs replaced the old ones: {old_ids:?} -> {new_ids:?}"
    );
    assert_eq!(inspect::map_dump(&agent, "RATE_LIMITS").len(), 2);
    // The links are the pinned ones: bpftool sees each cgroup program once.
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cg.path())
        .output()
        .expect("bpftool");
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["rate_egress", "rate_ingress", "rate_sockops"] {
        assert_eq!(
            text.matches(name).count(),
            1,
            "{name} attached once to the cgroup:\n{text}"
        );
    }
}
