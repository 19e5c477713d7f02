//! Attacks on the node agent, each as an attacker (or an unlucky operator)
//! would try it, in namespace nodes with the real agent:
//!
//! * a container's network namespace is an identity, not a path: the
//!   agent's own namespace, a relative path and a path whose PID was reused
//!   never get a veth, an address or a route, and CNI `CHECK` notices a
//!   lookalike namespace behind a reused path;
//! * one agent per state directory and socket, and `--cleanup` waits for
//!   the live agent to stop;
//! * a container that cannot be restored is kept (degraded) and retried,
//!   never deleted for a transient reason;
//! * a lost state file is rebuilt from the kernel, not taken for an empty
//!   node;
//! * a pinned map of another layout is refused, one of another capacity
//!   migrated with its entries;
//! * the pool cannot cover a node address or route, or change under
//!   existing containers;
//! * the API socket cannot be held hostage, changes are logged with who
//!   asked, the command line keeps off the CNI plugin's names and gives up
//!   on an agent that does not answer;
//! * a container's router advertisement leaves the node's routes alone.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use datapath_common::{Endpoint, EndpointKey, capacity, names};
use datapath_tests::{
    agent::{Agent, datapath_bin},
    capture::{Capture, contains, send_frames},
    cgroup::Cgroup,
    fixture::Deployment,
    frame::Frame,
    inspect::{self, addrs_of, agent_veths},
    names as test_names,
    netns::Netns,
    node,
    node::Node,
    traffic::{RrFlow, Server, line_exchange, send_router_advertisement},
    wait,
};

// ---- helpers -------------------------------------------------------------------------

/// The links of `ns`.
fn links(ns: &Netns) -> BTreeSet<String> {
    inspect::links(ns).into_iter().collect()
}

/// The IPv4 routes of `ns`'s main table, as `ip` prints them.
fn routes(ns: &Netns) -> String {
    ns.exec_ok("ip", ["-4", "route", "show"])
}

/// The inode of a namespace file.
fn netns_inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

/// Waits up to `timeout` for `child` to exit and returns its output; kills
/// it (and says so) if it is still running then.
fn exit_within(mut child: Child, timeout: Duration) -> Result<Output, String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return child
                .wait_with_output()
                .map_err(|e| format!("collect the output: {e}"));
        }
        std::thread::sleep(wait::POLL);
    }
    let _ = child.kill();
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    Err(format!(
        "still running after {timeout:?}; its output:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A process whose `/proc/PID/ns/net` names one namespace until told to
/// move, then another, under the same PID: what a container runtime sees
/// when a container's PID is reused by a process in another namespace.
struct MovingProcess {
    child: Child,
}

impl MovingProcess {
    /// Starts in `from`; [`MovingProcess::move_on`] takes it into `to`.
    fn start(from: &Netns, to: &Netns) -> Self {
        let script = format!(
            "read line; exec nsenter --net={} sleep 600",
            to.path().display()
        );
        let mut cmd = from.command("sh");
        cmd.args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("start a process in the container");
        Self { child }
    }

    fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.child.id()))
    }

    /// Moves it into the other namespace and waits until its path says so.
    fn move_on(&mut self, to: &Netns) {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"go\n").expect("tell it to move");
        let want = netns_inode(to.path());
        let path = self.netns_path();
        wait::until(
            "the PID's path names the other namespace",
            Duration::from_secs(10),
            || std::fs::metadata(&path).is_ok_and(|m| m.ino() == want),
        );
    }
}

impl Drop for MovingProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Directories a test made for an agent of its own (not the harness's):
/// removed on drop.
struct ExtraDirs(Vec<PathBuf>);

impl Drop for ExtraDirs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// `args` with the value of each `(flag, value)` in `set` replaced.
fn with_flags(args: &[OsString], set: &[(&str, &Path)]) -> Vec<OsString> {
    let mut out = args.to_vec();
    for (flag, value) in set {
        let i = out
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
        out[i + 1] = value.as_os_str().to_owned();
    }
    out
}

// ---- a namespace is an identity ----------------------------------------------------------

#[test]
fn the_agents_own_namespace_a_relative_path_and_other_files_are_refused() {
    let node = Node::new();
    let agent = Agent::start(&node);
    let ctr = node.add_container_netns("rel");
    let before = links(&node.node);

    let err = agent.add_refused("own", "/proc/self/ns/net", &[]);
    assert!(err.contains("the agent's own"), "{err}");

    // A relative path that leads to a real namespace from the agent's
    // working directory (which is this test's).
    let cwd = std::env::current_dir().expect("working directory");
    let up = "../".repeat(cwd.components().count() - 1);
    let relative = format!(
        "{up}{}",
        ctr.path()
            .strip_prefix("/")
            .expect("an absolute path")
            .display()
    );
    assert!(
        cwd.join(&relative).exists(),
        "{relative} leads to the namespace"
    );
    let err = agent.add_refused("rel", &relative, &[]);
    assert!(err.contains("relative"), "{err}");

    let err = agent.add_refused("uts", "/proc/self/ns/uts", &[]);
    assert!(err.contains("not a network namespace"), "{err}");
    let err = agent.add_refused("file", "/proc/self/status", &[]);
    assert!(err.contains("not a network namespace"), "{err}");

    assert_eq!(links(&node.node), before, "nothing was made in the node");
    assert!(!links(&ctr).contains("eth0"));
    assert!(agent.containers().is_empty());
    assert!(agent_veths(&node.node).is_empty());
}

#[test]
fn a_reused_pids_namespace_path_never_gets_the_containers_veth_address_or_routes() {
    let node = Node::new();
    let mut agent = Agent::start(&node);
    let ctr = node.add_container_netns("web");
    let other = node.add_container_netns("other");
    let mut process = MovingProcess::start(&ctr, &other);
    let path = process.netns_path();
    let path_arg = path.display().to_string();
    agent.cli_ok([
        "container",
        "add",
        "web",
        "--netns",
        &path_arg,
        "-p",
        "8080:80",
    ]);
    let web = agent.container("web").expect("web is listed");
    assert!(
        links(&ctr).contains("eth0"),
        "the container got its interface"
    );

    // The agent is down, the container's veth vanished, and its PID now
    // belongs to a process in another namespace.
    agent.kill();
    node.node
        .exec_ok("ip", ["link", "del", web.host_ifname.as_str()]);
    process.move_on(&other);
    let other_routes = routes(&other);
    agent.restart();

    assert!(
        !links(&other).contains("eth0"),
        "the other namespace got no interface: {:?}",
        links(&other)
    );
    let addrs = inspect::ipv4_addrs(&other);
    assert!(
        addrs.iter().all(|(ifname, _)| ifname == "lo"),
        "nor an address: {addrs:?}"
    );
    assert_eq!(routes(&other), other_routes, "nor a route");
    assert!(
        agent.containers().is_empty(),
        "the container whose namespace is gone is removed"
    );
    assert!(agent_veths(&node.node).is_empty());
    assert!(
        agent.log().contains("names another network namespace"),
        "the log says why:\n{}",
        agent.log()
    );
}

/// Runs the CNI plugin (next to the agent binary) in the node namespace.
fn cni(node: &Node, command: &str, id: &str, netns: &str, conf: &serde_json::Value) -> Output {
    let bin = datapath_bin()
        .parent()
        .map(|d| d.join("datapath-cni"))
        .expect("the plugin next to the agent");
    let mut cmd = node.node.command(bin);
    cmd.env_clear()
        .envs([
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
            ("CNI_NETNS", netns),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the plugin");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write the configuration");
    child.wait_with_output().expect("wait for the plugin")
}

#[test]
fn cni_check_sees_through_a_lookalike_namespace_behind_a_reused_pid() {
    let node = Node::new();
    let agent = Agent::start(&node);
    let ctr = node.add_container_netns("web");
    let other = node.add_container_netns("fake");
    let mut process = MovingProcess::start(&ctr, &other);
    let path = process.netns_path().display().to_string();
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "dpnet",
        "type": "datapath-cni",
        "agentSocket": agent.socket(),
    });
    let id = format!("sec{:08x}", std::process::id());
    let add = cni(&node, "ADD", &id, &path, &conf);
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stdout)
    );
    let result: serde_json::Value = serde_json::from_slice(&add.stdout).expect("ADD's result");
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    let check = cni(&node, "CHECK", &id, &path, &with_prev);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // A lookalike of the container's interface in another namespace: the
    // same name, MAC, address and routes.
    let mac = result["interfaces"]
        .as_array()
        .and_then(|i| i.iter().find(|i| i["sandbox"].is_string()))
        .and_then(|i| i["mac"].as_str())
        .expect("the container interface's MAC")
        .to_owned();
    let addr = result["ips"][0]["address"]
        .as_str()
        .expect("address")
        .to_owned();
    let gateway = result["ips"][0]["gateway"]
        .as_str()
        .expect("gateway")
        .to_owned();
    for args in [
        vec![
            "link", "add", "eth0", "address", &mac, "type", "veth", "peer", "name", "x0",
        ],
        vec!["addr", "add", &addr, "dev", "eth0"],
        vec!["link", "set", "x0", "up"],
        vec!["link", "set", "eth0", "up"],
        vec!["route", "add", &gateway, "dev", "eth0", "scope", "link"],
        vec!["route", "add", "default", "via", &gateway, "dev", "eth0"],
    ] {
        other.exec_ok("ip", args);
    }
    process.move_on(&other);

    let check = cni(&node, "CHECK", &id, &path, &with_prev);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        !check.status.success(),
        "CHECK passed on a lookalike: {stdout}"
    );
    assert!(stdout.contains("another network namespace"), "{stdout}");
    let del = cni(&node, "DEL", &id, &path, &conf);
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stdout)
    );
}

// ---- one agent per state directory and socket ----------------------------------------------

#[test]
fn a_second_agent_on_the_same_state_directory_or_socket_is_refused_and_cleanup_waits() {
    let node = Node::new();
    let web = Deployment::start(&node, "web", &[]);
    let first = web.agent.pid().expect("running");
    let name = format!("{}{}-second", test_names::PREFIX, node.id());
    let tmp = Path::new("/tmp").join(&name);
    let bpffs = Path::new("/sys/fs/bpf").join(&name);
    let _dirs = ExtraDirs(vec![tmp.clone(), bpffs.clone()]);
    std::fs::create_dir_all(&tmp).expect("a directory for the second agent");
    let base = web.agent.command_line();
    let start = |args: Vec<OsString>| {
        let mut cmd = Command::new(datapath_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        exit_within(node.node.spawn(&mut cmd), Duration::from_secs(20))
    };

    // The same state directory, a socket and pins of its own.
    let out = start(with_flags(
        &base,
        &[
            ("--api-socket", &tmp.join("api.sock")),
            ("--bpffs-dir", &bpffs),
        ],
    ))
    .expect("the second agent exits");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("pid {first}"))
            && err.contains(&web.agent.state_dir().display().to_string()),
        "the refusal names the holder and the directory: {err}"
    );

    // Another state directory, the same socket.
    let out = start(with_flags(
        &base,
        &[("--state-dir", &tmp.join("state")), ("--bpffs-dir", &bpffs)],
    ))
    .expect("the second agent exits");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("answers on"), "{err}");

    // --cleanup with the live agent's paths.
    let mut args = base.clone();
    args.push("--cleanup".into());
    let out = start(args).expect("cleanup exits");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("live agent") && err.contains(&format!("pid {first}")),
        "{err}"
    );

    // The first agent is untouched.
    assert!(web.agent.socket().exists(), "its socket is still there");
    assert!(web.agent.container("web").is_some(), "it answers");
    assert!(agent_veths(&node.node).contains(&web.info.host_ifname));
    assert!(inspect::map_pin(&web.agent, names::ENDPOINTS).exists());
}

#[test]
fn cleanup_removes_only_what_the_agent_made() {
    let node = Node::new();
    let mut web = Deployment::start(&node, "web", &[]);
    // A veth with a name like the agent's, and a directory in its bpffs
    // directory, neither made by the agent.
    node.node.exec_ok(
        "ip",
        [
            "link", "add", "dpfeed", "type", "veth", "peer", "name", "feed1",
        ],
    );
    let foreign = web.agent.bpffs_dir().join("someone-elses");
    std::fs::create_dir(&foreign).expect("a foreign directory in bpffs");
    let out = web.agent.cleanup();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = links(&node.node);
    assert!(
        !after.contains(&web.info.host_ifname),
        "the agent's veth is gone"
    );
    assert!(
        after.contains("dpfeed") && after.contains("feed1"),
        "{after:?}"
    );
    assert!(foreign.is_dir(), "the foreign directory is kept");
    assert!(
        !web.agent.bpffs_dir().join("maps").exists()
            && !web.agent.bpffs_dir().join("links").exists(),
        "the agent's pins are gone"
    );
}

// ---- transient errors never delete ---------------------------------------------------------

#[test]
fn a_container_that_cannot_be_restored_is_kept_degraded_and_comes_back_once_it_can() {
    let node = Node::new();
    let mut web = Deployment::start(&node, "web", &["-p", "8080:80"]);
    web.agent.kill();
    node.node
        .exec_ok("ip", ["link", "del", web.info.host_ifname.as_str()]);
    // Something in the way of recreating its veth: an eth0 of another kind.
    web.ctr.exec_ok(
        "ip",
        [
            "link", "add", "eth0", "type", "veth", "peer", "name", "blk0",
        ],
    );
    web.agent.restart();

    let kept = web.agent.container("web").expect("the container is kept");
    assert_eq!((kept.id, kept.addr), (web.info.id, web.info.addr));
    let why = kept.json["degraded"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.contains("veth"),
        "listed as degraded, saying why: {:#}",
        kept.json
    );

    // The obstacle goes: the agent's retries bring the container back.
    web.ctr.exec_ok("ip", ["link", "del", "eth0"]);
    wait::until("the container is restored", Duration::from_secs(30), || {
        web.agent
            .container("web")
            .is_some_and(|c| c.json["degraded"].is_null())
    });
    assert_eq!(addrs_of(&web.ctr, "eth0"), [web.info.addr]);
    let _server = Server::line_echo(&web.ctr, 80, "web");
    let answer =
        line_exchange(&node.client, node.node_port(8080), "back").expect("through the port");
    assert_eq!(answer, "web: back");
}

// ---- a lost state file --------------------------------------------------------------------

/// What a listing entry says of a container, without its counters.
fn listed(c: &datapath_tests::agent::ContainerInfo) -> serde_json::Value {
    let mut v = c.json.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("counters");
    }
    v
}

#[test]
fn a_lost_state_file_is_rebuilt_from_the_kernel_and_nothing_is_removed() {
    let node = Node::new();
    let cg = Cgroup::new();
    let cgroup = cg.path().display().to_string();
    let mut web = Deployment::start(
        &node,
        "web",
        &["-p", "8080:80", "-p", "9000-9002:9000-9002/udp"],
    );
    let db_ns = node.add_container_netns("db");
    let db = web.agent.add(
        "db",
        &db_ns,
        &[
            "--cgroup",
            &cgroup,
            "--egress-rate",
            "10mbit",
            "--ingress-rate",
            "20mbit",
        ],
    );
    let before: Vec<serde_json::Value> = web.agent.containers().iter().map(listed).collect();
    let state = web.agent.state_dir().join("state.json");
    web.agent.kill();
    std::fs::remove_file(&state).expect("lose the state file");
    web.agent.restart();

    let after: Vec<serde_json::Value> = web.agent.containers().iter().map(listed).collect();
    assert_eq!(after, before, "every container is back as it was");
    assert!(state.exists(), "the rebuilt state is saved");
    assert_eq!(
        agent_veths(&node.node),
        BTreeSet::from([web.info.host_ifname.clone(), db.host_ifname.clone()])
    );
    let _server = Server::line_echo(&web.ctr, 80, "web");
    let answer = line_exchange(&node.client, node.node_port(8080), "kept").expect("the port");
    assert_eq!(answer, "web: kept");
    // Ids are not handed out again.
    let new_ns = node.add_container_netns("new");
    let new = web.agent.add("new", &new_ns, &[]);
    assert!(new.id > db.id, "{} after {}", new.id, db.id);
}

// ---- pinned maps of another layout ----------------------------------------------------------

/// The `max_entries` of map `name` as `datapath status` reports it.
fn status_max_entries(agent: &Agent, name: &str) -> Option<u64> {
    let st = agent.status();
    st["maps"].as_array()?.iter().find(|m| m["name"] == name)?["max_entries"].as_u64()
}

#[test]
fn a_pinned_map_of_another_layout_is_refused_and_one_of_another_capacity_migrated() {
    let node = Node::new();
    let mut web = Deployment::start_with(
        Agent::builder(&node).args(["--ct-max", "1024"]),
        "web",
        &["-p", "8080:80"],
    );
    let pool = web.agent.pool().to_owned();
    assert_eq!(status_max_entries(&web.agent, names::CT), Some(1024));

    // An older layout of ENDPOINTS (another value size) pinned in place.
    let pin = inspect::map_pin(&web.agent, names::ENDPOINTS);
    web.agent.kill();
    std::fs::rename(&pin, pin.with_file_name("kept_ENDPOINTS")).expect("move the real map aside");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "hash",
            "key",
            "4",
            "value",
            "8",
            "entries",
            "64",
            "name",
            "ENDPOINTS",
        ])
        .output()
        .expect("run bpftool");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let pins_in = |dir: &Path| std::fs::read_dir(dir).map_or(0, Iterator::count);
    let maps_dir = pin.parent().expect("maps dir").to_owned();
    let old = pins_in(&maps_dir);
    let err = web
        .agent
        .try_restart()
        .expect_err("the agent refuses a map its programs cannot use");
    assert!(
        err.contains("pinned map ENDPOINTS")
            && err.contains("value size 8 where the programs expect"),
        "{err}"
    );
    let shown = Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(&pin)
        .output()
        .expect("run bpftool");
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("value 8B"),
        "the refused map is left as it was"
    );
    assert_eq!(pins_in(&maps_dir), old, "nothing else was pinned");
    std::fs::remove_file(&pin).expect("remove the old layout");
    std::fs::rename(pin.with_file_name("kept_ENDPOINTS"), &pin).expect("put the real map back");

    // Another capacity (an older agent's smaller ENDPOINTS): migrated,
    // with every entry.
    let kept = pin.with_file_name("kept_ENDPOINTS");
    std::fs::rename(&pin, &kept).expect("move the real map aside");
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args(["type", "hash", "key"])
        .arg(size_of::<EndpointKey>().to_string())
        .arg("value")
        .arg(size_of::<Endpoint>().to_string())
        .args(["entries", "64", "name", "ENDPOINTS"])
        .output()
        .expect("run bpftool");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let open = |path: &Path| {
        let data = aya::maps::MapData::from_pin(path).expect("an ENDPOINTS pin");
        aya::maps::HashMap::<_, EndpointKey, Endpoint>::try_from(aya::maps::Map::HashMap(data))
            .expect("the ENDPOINTS layout")
    };
    let entries: Vec<(EndpointKey, Endpoint)> = open(&kept)
        .iter()
        .collect::<Result<_, _>>()
        .expect("read ENDPOINTS");
    assert!(!entries.is_empty(), "the container has an endpoint");
    let mut small = open(&pin);
    for (k, v) in &entries {
        small.insert(k, v, 0).expect("copy an endpoint");
    }
    drop(small);
    std::fs::remove_file(&kept).expect("remove the real map's pin");
    web.agent.restart();
    assert_eq!(
        status_max_entries(&web.agent, names::ENDPOINTS),
        Some(u64::from(capacity::ENDPOINTS)),
        "made again at the programs' capacity"
    );
    let mut migrated: Vec<(EndpointKey, Endpoint)> = open(&pin)
        .iter()
        .collect::<Result<_, _>>()
        .expect("read ENDPOINTS");
    let bytes =
        |e: &(EndpointKey, Endpoint)| [bytemuck::bytes_of(&e.0), bytemuck::bytes_of(&e.1)].concat();
    migrated.sort_by_key(bytes);
    let mut entries = entries;
    entries.sort_by_key(bytes);
    assert!(
        migrated.iter().map(bytes).eq(entries.iter().map(bytes)),
        "every endpoint was copied"
    );
    assert!(
        !pin.with_file_name("migrate_ENDPOINTS").exists(),
        "the old map's pin is gone"
    );

    // A new --ct-max: the conntrack tables made again, with every flow.
    let _server = Server::line_echo(&web.ctr, 80, "web");
    let flow = RrFlow::start(&node.client, node.node_port(8080), "web");
    flow.wait_more("before the restart", 3);
    let flows = web.agent.flows().len();
    assert!(flows >= 1, "{flows}");
    web.agent.kill();
    web.agent.set_pool_and_args(&pool, &["--ct-max", "2048"]);
    web.agent.restart();
    assert_eq!(status_max_entries(&web.agent, names::CT), Some(2048));
    assert_eq!(web.agent.status()["conntrack_max"], 2048);
    assert_eq!(web.agent.flows().len(), flows, "every flow was copied");
    flow.wait_more("after the migration", 3);
    flow.finish().expect("the flow went on");
    assert!(
        !pin.with_file_name(format!("migrate_{}", names::CT))
            .exists(),
        "the old map's pin is gone"
    );
}

// ---- the pool -------------------------------------------------------------------------

/// The panic message of starting an agent with `pool` (which must fail).
fn refused_pool(node: &Node, pool: &str) -> String {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Agent::builder(node).pool(pool).start();
    }));
    let msg = r.expect_err("the agent refuses the pool");
    msg.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn a_pool_over_a_node_address_or_route_or_unlike_the_containers_is_refused() {
    let node = Node::new();
    let msg = refused_pool(&node, "198.18.0.0/16");
    assert!(msg.contains(&node.node_addr().to_string()), "{msg}");
    node.node.exec_ok(
        "ip",
        [
            "route",
            "add",
            "198.19.250.0/24",
            "via",
            &node.client_addr().to_string(),
        ],
    );
    let msg = refused_pool(&node, "198.19.250.0/25");
    assert!(msg.contains("route to 198.19.250.0/24"), "{msg}");

    let mut web = Deployment::start(&node, "web", &[]);
    let pool = web.agent.pool().to_owned();
    web.agent.kill();
    web.agent.set_pool_and_args("198.19.251.0/24", &[]);
    let err = web
        .agent
        .try_restart()
        .expect_err("another pool under a container");
    assert!(err.contains(&format!("--pool {pool}")), "{err}");
    web.agent.set_pool_and_args(&pool, &[]);
    web.agent.restart();
    let c = web.agent.container("web").expect("web is kept");
    assert_eq!(c.addr, web.info.addr);
}

// ---- the API socket ---------------------------------------------------------------------

/// Connections one process may hold (the agent's per-peer limit).
const PER_PEER: usize = 16;

/// Reads `s` until the agent closes it or `timeout` passes; what it read,
/// or `None` if it was still open.
fn read_until_closed(s: &mut UnixStream, timeout: Duration) -> Option<String> {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(String::from_utf8_lossy(&got).into_owned()),
        }
    }
    None
}

#[test]
fn a_slow_client_on_the_api_socket_does_not_block_others_and_is_cut_off() {
    let node = Node::new();
    let ctr = node.add_container_netns("web");
    let mut agent = Agent::start(&node);
    let connect = || UnixStream::connect(agent.socket()).expect("connect to the API");
    // Clients that never finish their headers, and one its body.
    let mut slow: Vec<UnixStream> = (0..PER_PEER - 1)
        .map(|_| {
            let mut s = connect();
            s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
                .expect("half a request");
            s
        })
        .collect();
    let mut slow_body = connect();
    slow_body
        .write_all(b"POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"na")
        .expect("half a body");
    // One more from the same process is turned away at once.
    let mut extra = connect();
    let answer = read_until_closed(&mut extra, Duration::from_secs(10)).unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");

    // Another client is answered meanwhile.
    let st = agent.status();
    assert_eq!(st["containers"], 0, "{st:#}");

    // The slow ones are cut off.
    for s in &mut slow {
        assert!(
            read_until_closed(s, Duration::from_secs(30)).is_some(),
            "a client that never sends its headers is disconnected"
        );
    }
    let answer = read_until_closed(&mut slow_body, Duration::from_secs(60))
        .expect("a client that never sends its body is disconnected");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");

    // Every change is logged with who asked.
    let mut cmd = Command::new(datapath_bin());
    cmd.arg("--api-socket")
        .arg(agent.socket())
        .args(["container", "add", "web", "--netns", ctr.name()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = node.node.spawn(&mut cmd);
    let pid = child.id();
    let out = exit_within(child, Duration::from_secs(60)).expect("the CLI exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("API change")
            && l.contains("path=/v1/containers")
            && l.contains("uid=0")
            && l.contains(&format!("pid={pid}"))),
        "the add is logged with the CLI's uid and pid {pid}:\n{log}"
    );

    // The command line keeps off the CNI plugin's names.
    let out = agent.cli(["container", "add", "cni-1234abcd", "--netns", ctr.name()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("CNI plugin"), "{err}");
    assert!(agent.container("cni-1234abcd").is_none());

    // A client gives up on an agent that does not answer.
    let name = format!("{}{}-mute", test_names::PREFIX, node.id());
    let mute = Path::new("/tmp").join(format!("{name}.sock"));
    let listener = std::os::unix::net::UnixListener::bind(&mute).expect("bind a mute socket");
    listener.set_nonblocking(true).expect("nonblocking");
    // Accepts and holds one connection (for at most half a minute).
    let held = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((s, _)) = listener.accept() {
                std::thread::sleep(Duration::from_secs(3));
                return Some(s);
            }
            std::thread::sleep(wait::POLL);
        }
        None
    });
    let mut cmd = Command::new(datapath_bin());
    cmd.arg("--api-socket")
        .arg(&mute)
        .args(["--timeout", "1s", "status"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = exit_within(cmd.spawn().expect("start the CLI"), Duration::from_secs(30));
    let _ = std::fs::remove_file(&mute);
    let _connection = held.join();
    let out = out.expect("the CLI gives up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("did not answer"),
        "{err}"
    );

    // Shutdown does not wait for a client in the middle of a request.
    let mut stuck = connect();
    stuck
        .write_all(b"POST /v1/containers HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .expect("half a body");
    assert!(
        agent.stop(),
        "the agent exits on SIGTERM with a request in progress"
    );
}

// ---- router advertisements ------------------------------------------------------------------

/// `Icmp6InRouterAdvertisements` of link `ifname` in `ns`.
fn router_advertisements_in(ns: &Netns, ifname: &str) -> u64 {
    let text = ns.exec_ok("cat", [format!("/proc/net/dev_snmp6/{ifname}")]);
    text.lines()
        .find_map(|l| l.strip_prefix("Icmp6InRouterAdvertisements"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_router_advertisement_from_a_container_leaves_the_nodes_routes_unchanged() {
    let node = Node::new();
    let web = Deployment::start(&node, "web", &[]);
    let host = web.info.host_ifname.clone();
    let before = node.node.exec_ok("ip", ["-6", "route", "show"]);
    let dropped = web.agent.counter("drop_router_advertisement");
    web.ctr
        .exec_closure(|| send_router_advertisement("eth0"))
        .expect("send a router advertisement");
    // The container's program dropped it: the node's stack never saw it.
    wait::until(
        "the advertisement was dropped",
        Duration::from_secs(10),
        || web.agent.counter("drop_router_advertisement") == dropped + 1,
    );
    assert_eq!(router_advertisements_in(&node.node, &host), 0);
    let after = node.node.exec_ok("ip", ["-6", "route", "show"]);
    assert_eq!(after, before, "the node's IPv6 routes are unchanged");
    assert!(!after.contains("default"), "{after}");
    for (family, key) in [
        ("ipv6", "accept_ra"),
        ("ipv6", "accept_redirects"),
        ("ipv4", "accept_redirects"),
    ] {
        let v = node
            .node
            .exec_ok("cat", [format!("/proc/sys/net/{family}/conf/{host}/{key}")]);
        assert_eq!(v.trim(), "0", "{family} {key} on {host}");
    }
}

// ---- the uplink: spoofed sources and direct routing ----------------------------------------------

/// A UDP frame from the client's interface to the node's uplink.
fn from_client(node: &Node, src: Ipv4Addr, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    Frame::udp((src, 40000), (*dst.ip(), dst.port()))
        .payload(payload.to_vec())
        .macs(node.client_mac(), node.uplink_mac())
        .build()
}

#[test]
fn spoofed_and_martian_sources_from_the_uplink_never_reach_a_published_port() {
    let node = Node::new();
    let web = Deployment::start(&node, "web", &["-p", "9053:53/udp"]);
    let sink = Server::udp_sink(&web.ctr, 53, "web");
    let to = SocketAddrV4::new(node.node_addr(), 9053);
    let pool_other = Ipv4Addr::from(u32::from(web.info.addr) + 1);
    let spoofed = [web.info.addr, pool_other, node.node_addr()];
    let martians = [
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(0, 1, 2, 3),
        Ipv4Addr::new(224, 0, 0, 9),
        Ipv4Addr::new(240, 0, 0, 1),
        Ipv4Addr::new(169, 254, 0, 1),
    ];
    let before = (
        web.agent.counter("drop_uplink_spoofed"),
        web.agent.counter("drop_martian"),
    );
    let mut frames: Vec<Vec<u8>> = spoofed
        .iter()
        .chain(&martians)
        .map(|&src| from_client(&node, src, to, b"spoofed"))
        .collect();
    // Sent after the others on the same path: once it arrived, so would
    // they have.
    frames.push(from_client(&node, node.client_addr(), to, b"genuine"));
    send_frames(&node.client, node::CLIENT_IF, &frames);
    assert_eq!(sink.wait_payload(b"genuine", 1, Duration::from_secs(10)), 1);
    assert_eq!(sink.count_payload(b"spoofed"), 0, "{:?}", sink.datagrams());
    let after = (
        web.agent.counter("drop_uplink_spoofed"),
        web.agent.counter("drop_martian"),
    );
    assert_eq!(after.0 - before.0, spoofed.len() as u64, "spoofed counted");
    assert_eq!(
        after.1 - before.1,
        martians.len() as u64,
        "martians counted"
    );
}

#[test]
fn fragments_sctp_gre_esp_and_odd_icmp_never_reach_a_container_address() {
    let node = Node::new();
    let web = Deployment::start(&node, "web", &["-p", "9053:53/udp"]);
    let sink = Server::udp_sink(&web.ctr, 53, "web");
    let capture = Capture::start(&web.ctr, "eth0");
    let (client, ctr) = (node.client_addr(), web.info.addr);
    let macs = |f: Frame| f.macs(node.client_mac(), node.uplink_mac()).build();
    let marker = b"direct-attempt-0123456789".to_vec();
    let attempts = [
        macs(
            Frame::udp((client, 4000), (ctr, 53))
                .payload(marker.clone())
                .fragment(true, 0),
        ),
        macs(
            Frame::udp((client, 4000), (ctr, 53))
                .payload(marker.clone())
                .fragment(false, 8),
        ),
        macs(Frame::raw_ip(client, ctr, 132).payload(marker.clone())),
        macs(Frame::raw_ip(client, ctr, 47).payload(marker.clone())),
        macs(Frame::raw_ip(client, ctr, 50).payload(marker.clone())),
        macs(Frame::raw_ip(client, ctr, 1).payload([&[13u8, 0, 0, 0][..], &marker].concat())),
    ];
    let before = web.agent.counter("drop_direct_routing");
    let mut frames = attempts.to_vec();
    // The control, last: through the published port.
    frames.push(from_client(
        &node,
        client,
        SocketAddrV4::new(node.node_addr(), 9053),
        b"genuine",
    ));
    send_frames(&node.client, node::CLIENT_IF, &frames);
    assert_eq!(sink.wait_payload(b"genuine", 1, Duration::from_secs(10)), 1);
    let seen = capture.finish();
    let leaked: Vec<&Vec<u8>> = seen.iter().filter(|f| contains(f, &marker)).collect();
    assert!(leaked.is_empty(), "{} reached the container", leaked.len());
    let dropped = web.agent.counter("drop_direct_routing") - before;
    assert_eq!(dropped, attempts.len() as u64);
}
