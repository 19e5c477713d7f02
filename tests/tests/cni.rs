//! The CNI plugin as runtimes drive it: the built `datapath-cni` binary is
//! executed with the CNI environment and a network configuration on stdin,
//! against a real agent in a namespace node, and its stdout, exit status
//! and effects (links, addresses, routes, maps, traffic) are checked.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use datapath_tests::{
    agent::{Agent, ContainerInfo, datapath_bin},
    cgroup::Cgroup,
    cluster::{self, Etcd, Switch},
    lock::TrafficLock,
    netns::Netns,
    node::{self, Node},
    ratebench::{EGRESS_BAND, INGRESS_BAND, Iperf3Options, assert_report, receive_in, send_from},
    sys,
    traffic::{IO_TIMEOUT, Server, UdpPinger, assert_refused, http_get},
    wait,
};
use serde_json::{Value, json};

/// The plugin binary: `datapath-cni` next to the agent binary.
fn plugin_bin() -> PathBuf {
    let bin = datapath_bin()
        .parent()
        .map(|d| d.join("datapath-cni"))
        .unwrap_or_else(|| PathBuf::from("datapath-cni"));
    assert!(
        bin.is_file(),
        "the plugin binary {} is missing: build it with `cargo build --bins`",
        bin.display()
    );
    bin
}

/// A container id unique to this process and call.
fn container_id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{:08x}{:04x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The node's agent and the plugin for its network `dpnet` (CNI 1.1.0).
fn agent_and_plugin(node: &Node) -> (Agent<'_>, Plugin<'_>) {
    let agent = Agent::start(node);
    let plugin = Plugin::new(&agent, "dpnet", "1.1.0");
    (agent, plugin)
}

/// A container namespace for the plugin to attach, and a container id
/// for the attachment, both named after `tag`.
fn attachment(node: &Node, tag: &str) -> (Netns, String) {
    (node.add_container_netns(tag), container_id(tag))
}

/// What one plugin run printed.
#[derive(Debug)]
struct Run {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The stdout as JSON (panics if it is not).
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {self:?}"))
    }

    /// Asserts success and returns the stdout.
    #[track_caller]
    fn ok(&self) -> &str {
        assert!(
            self.success,
            "the plugin failed ({:?}):\n{}\n{}",
            self.code, self.stdout, self.stderr
        );
        &self.stdout
    }

    /// Asserts failure with an error structure of `code` whose details
    /// say `details`; returns it.
    #[track_caller]
    fn err_saying(&self, code: u64, details: &str) -> Value {
        let e = self.err(code);
        assert!(
            e["details"].as_str().unwrap_or_default().contains(details),
            "the details do not say {details:?}: {e:#}"
        );
        e
    }

    /// Asserts failure with an error structure of `code` and returns it.
    #[track_caller]
    fn err(&self, code: u64) -> Value {
        assert!(!self.success, "the plugin succeeded: {self:?}");
        assert_ne!(self.code, Some(0));
        let e = self.json();
        assert_eq!(e["code"], code, "wrong error code: {e:#}");
        assert!(e["msg"].as_str().is_some_and(|m| !m.is_empty()), "{e:#}");
        assert!(e["cniVersion"].is_string(), "{e:#}");
        e
    }
}

/// The plugin bound to a node and a network configuration.
struct Plugin<'n> {
    node: &'n Node,
    bin: PathBuf,
    conf: Value,
}

impl<'n> Plugin<'n> {
    /// A network `name` served by `agent`, version `version`.
    fn new(agent: &Agent<'n>, name: &str, version: &str) -> Self {
        Self {
            node: agent.node(),
            bin: plugin_bin(),
            conf: json!({
                "cniVersion": version,
                "name": name,
                "type": "datapath-cni",
                "agentSocket": agent.socket(),
            }),
        }
    }

    /// Runs the plugin in the node netns with exactly the given CNI
    /// variables and `conf` on stdin.
    fn exec_raw(&self, vars: &[(&str, &str)], stdin: &[u8]) -> Run {
        let mut cmd = self.node.node.command(&self.bin);
        cmd.env_clear()
            .envs(vars.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        let mut input = child.stdin.take().expect("piped stdin");
        input.write_all(stdin).expect("write the configuration");
        drop(input);
        let out = child.wait_with_output().expect("wait for the plugin");
        Run {
            success: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `command` for attachment (`id`, `ifname`) in `netns` with
    /// `conf`.
    fn exec(&self, command: &str, id: &str, netns: Option<&Netns>, conf: &Value) -> Run {
        let path = netns.map(|n| n.path().display().to_string());
        let mut vars = vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ];
        if let Some(p) = &path {
            vars.push(("CNI_NETNS", p));
        }
        self.exec_raw(&vars, conf.to_string().as_bytes())
    }

    /// The configuration with `runtimeConfig` set.
    fn with_runtime(&self, runtime: Value) -> Value {
        let mut c = self.conf.clone();
        c["runtimeConfig"] = runtime;
        c
    }

    /// The configuration with `prevResult` set.
    fn with_prev(conf: &Value, prev: &Value) -> Value {
        let mut c = conf.clone();
        c["prevResult"] = prev.clone();
        c
    }

    fn add(&self, id: &str, netns: &Netns, conf: &Value) -> Value {
        let run = self.exec("ADD", id, Some(netns), conf);
        run.ok();
        run.json()
    }
}

/// Whether the node netns has a link named `name`.
fn node_has_link(node: &Node, name: &str) -> bool {
    node.node
        .exec("ip", ["link", "show", "dev", name])
        .status
        .success()
}

/// The IPv4 routes of `dev` in `ns` (`ip -j`).
fn routes(ns: &Netns, dev: &str) -> Vec<Value> {
    let out = ns.exec_ok("ip", ["-j", "-4", "route", "show", "dev", dev]);
    serde_json::from_str::<Value>(&out)
        .expect("ip -j route")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `A.B.C.D/N` as its network address and prefix length.
fn parse_pool(pool: &str) -> (Ipv4Addr, u32) {
    let (addr, len) = pool.split_once('/').expect("a CIDR pool");
    (
        addr.parse().expect("a pool address"),
        len.parse().expect("a prefix length"),
    )
}

/// `aa:bb:…` as `ip` prints it.
fn fmt_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn attach_and_check_result(version: &str) {
    let node = Node::new();
    let agent = Agent::start(&node);
    let ctr = node.add_container_netns("web");
    let plugin = Plugin::new(&agent, "dpnet", version);
    let mut conf = plugin.with_runtime(json!({
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}],
    }));
    conf["dns"] = json!({"nameservers": ["198.18.0.53"], "search": ["example.test"]});
    conf["ipam"] = json!({"type": "host-local", "ranges": [[{"subnet": agent.pool()}]]});
    let id = container_id("web");
    let result = plugin.add(&id, &ctr, &conf);

    // The result, field by field.
    let list = agent.containers();
    assert_eq!(list.len(), 1, "{list:#?}");
    let ContainerInfo {
        host_ifname,
        addr,
        json: info,
        ..
    } = &list[0];
    let (host_ifname, addr) = (host_ifname.as_str(), *addr);
    let gateway = info["gateway"].as_str().expect("gateway");
    let (network, prefix) = parse_pool(agent.pool());
    let mask = u32::MAX << (32 - prefix);
    assert_eq!(
        u32::from(addr) & mask,
        u32::from(network),
        "{addr} is outside {}",
        agent.pool()
    );
    assert_eq!(gateway, Ipv4Addr::from(u32::from(network) + 1).to_string());
    assert_eq!(result["cniVersion"], version, "{result:#}");
    let ifaces = result["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifaces.len(), 2, "{result:#}");
    assert_eq!(ifaces[0]["name"], host_ifname);
    assert_eq!(
        ifaces[0]["mac"],
        fmt_mac(node::mac(&node.node, host_ifname)),
        "{result:#}"
    );
    assert!(ifaces[0].get("sandbox").is_none(), "{result:#}");
    assert_eq!(ifaces[1]["name"], "eth0");
    assert_eq!(
        ifaces[1]["mac"],
        fmt_mac(node::mac(&ctr, "eth0")),
        "{result:#}"
    );
    assert_eq!(ifaces[1]["sandbox"], ctr.path().display().to_string());
    let ips = result["ips"].as_array().expect("ips");
    assert_eq!(ips.len(), 1, "{result:#}");
    if version.starts_with("0.") {
        // The format before 1.0.0: each address names its IP version, and
        // interfaces have no MTU.
        assert_eq!(ips[0]["version"], "4", "{result:#}");
        assert!(ifaces[1].get("mtu").is_none(), "{result:#}");
    } else {
        assert!(ips[0].get("version").is_none(), "{result:#}");
        assert_eq!(ifaces[1]["mtu"], 1500);
    }
    assert_eq!(ips[0]["address"], format!("{addr}/32"));
    assert_eq!(ips[0]["gateway"], gateway);
    assert_eq!(ips[0]["interface"], 1);
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": gateway}]),
        "{result:#}"
    );
    assert_eq!(
        result["dns"],
        json!({"nameservers": ["198.18.0.53"], "search": ["example.test"]})
    );
    assert_eq!(info["publish"], json!(["8080:80/tcp"]));
    assert!(
        info["name"].as_str().is_some_and(|n| n.starts_with("cni-")),
        "{info:#}"
    );

    // What the result claims is what the container has.
    let addrs = ctr.exec_ok("ip", ["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains(&format!("{addr}/32")), "{addrs}");
    let r = routes(&ctr, "eth0");
    assert!(
        r.iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == gateway),
        "{r:#?}"
    );

    // The published port answers.
    let server = Server::http(&ctr, 80, "cni");
    let body = http_get(&node.client, node.node_port(8080), "/")
        .expect("request through the published port");
    assert!(
        body.starts_with("cni port 80: hello 198.18.0.1:"),
        "{body:?}"
    );

    // CHECK with the ADD's result passes and prints nothing.
    let check = plugin.exec("CHECK", &id, Some(&ctr), &Plugin::with_prev(&conf, &result));
    assert_eq!(check.ok(), "");

    // DEL removes everything; a second DEL succeeds too.
    let del_conf = Plugin::with_prev(&conf, &result);
    assert_eq!(plugin.exec("DEL", &id, Some(&ctr), &del_conf).ok(), "");
    assert!(agent.containers().is_empty());
    assert!(
        !node_has_link(&node, host_ifname),
        "{host_ifname} survived DEL"
    );
    let links = ctr.exec_ok("ip", ["-o", "link", "show"]);
    assert!(!links.contains("eth0"), "{links}");
    // The server still runs: the port is refused because nothing is
    // published any more, not because nothing listens.
    assert_refused(&node.client, node.node_port(8080), "the port after DEL");
    assert_eq!(
        server.peers().len(),
        1,
        "the server saw only the first request"
    );
    assert_eq!(plugin.exec("DEL", &id, Some(&ctr), &del_conf).ok(), "");
}

#[test]
fn add_check_del_with_a_1_1_0_result() {
    attach_and_check_result("1.1.0");
}

#[test]
fn add_check_del_with_a_1_0_0_result() {
    attach_and_check_result("1.0.0");
}

#[test]
fn add_check_del_with_a_0_4_0_result() {
    // podman 3 and containerd before 1.7 ask for 0.4.0.
    attach_and_check_result("0.4.0");
}

#[test]
fn version_lists_the_supported_versions_and_never_echoes_another() {
    let node = Node::new();
    let (_agent, plugin) = agent_and_plugin(&node);
    let supported = json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]);
    for (asked, answered) in [
        ("1.0.0", "1.0.0"),
        ("0.4.0", "0.4.0"),
        ("0.2.0", "1.1.0"),
        ("9.9.9", "1.1.0"),
    ] {
        let stdin = format!(r#"{{"cniVersion":"{asked}"}}"#);
        let run = plugin.exec_raw(&[("CNI_COMMAND", "VERSION")], stdin.as_bytes());
        run.ok();
        assert_eq!(
            run.json(),
            json!({"cniVersion": answered, "supportedVersions": supported}),
            "asked {asked}"
        );
    }
    // A configuration of a version it does not speak is code 1.
    let (ctr, id) = attachment(&node, "old");
    let mut conf = plugin.conf.clone();
    conf["cniVersion"] = json!("0.2.0");
    plugin
        .exec("ADD", &id, Some(&ctr), &conf)
        .err_saying(1, "0.4.0");
}

#[test]
fn check_compares_network_namespaces_by_identity_not_by_path_text() {
    let node = Node::new();
    let (_agent, plugin) = agent_and_plugin(&node);
    let (ctr, id) = attachment(&node, "ident");
    let var_run = ctr.path().display().to_string();
    let run_path = var_run.replacen("/var/run/", "/run/", 1);
    assert_ne!(run_path, var_run, "the harness names netns under /var/run");
    let exec = |command: &str, netns: &str, conf: &Value| {
        plugin.exec_raw(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", id.as_str()),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/nonexistent"),
                ("CNI_NETNS", netns),
            ],
            conf.to_string().as_bytes(),
        )
    };
    // ADD through /run/netns, CHECK through /var/run/netns: one namespace.
    let add = exec("ADD", &run_path, &plugin.conf);
    add.ok();
    let result = add.json();
    assert_eq!(result["interfaces"][1]["sandbox"], run_path);
    let with_prev = Plugin::with_prev(&plugin.conf, &result);
    assert_eq!(exec("CHECK", &var_run, &with_prev).ok(), "");
    assert_eq!(exec("CHECK", &run_path, &with_prev).ok(), "");
    // Another namespace is still told apart.
    let other = node.add_container_netns("other");
    let other_path = other.path().display().to_string();
    exec("CHECK", &other_path, &with_prev).err(999);
    assert_eq!(exec("DEL", &var_run, &with_prev).ok(), "");
}

#[test]
fn a_retried_add_whose_read_back_fails_keeps_the_attachment_it_found() {
    let node = Node::new();
    let (agent, plugin) = agent_and_plugin(&node);
    let (ctr, id) = attachment(&node, "retry");
    let first = plugin.add(&id, &ctr, &plugin.conf);
    let host = first["interfaces"][0]["name"]
        .as_str()
        .expect("host veth")
        .to_owned();
    // Something renames the interface: the retried ADD finds the agent's
    // container but cannot read the interface back.
    ctr.exec_ok("ip", ["link", "set", "eth0", "name", "eth9"]);
    plugin
        .exec("ADD", &id, Some(&ctr), &plugin.conf)
        .err_saying(999, "eth0");
    // The attachment the first ADD made is still there, whole.
    let list = agent.containers();
    assert_eq!(list.len(), 1, "the retried ADD removed the attachment");
    assert_eq!(list[0].host_ifname, host);
    assert!(node_has_link(&node, &host), "{host} was deleted");
    ctr.exec_ok("ip", ["link", "set", "eth9", "name", "eth0"]);
    let again = plugin.add(&id, &ctr, &plugin.conf);
    assert_eq!(again["ips"], first["ips"]);
    let with_prev = Plugin::with_prev(&plugin.conf, &again);
    assert_eq!(plugin.exec("CHECK", &id, Some(&ctr), &with_prev).ok(), "");
}

#[test]
fn the_mtu_key_sets_both_ends_of_the_veth_and_the_result() {
    let node = Node::new();
    let (agent, plugin) = agent_and_plugin(&node);
    let (ctr, id) = attachment(&node, "mtu");
    let mut conf = plugin.conf.clone();
    conf["mtu"] = json!(1400);
    let result = plugin.add(&id, &ctr, &conf);
    let host = result["interfaces"][0]["name"]
        .as_str()
        .expect("host veth")
        .to_owned();
    assert_eq!(result["interfaces"][0]["mtu"], 1400, "{result:#}");
    assert_eq!(result["interfaces"][1]["mtu"], 1400, "{result:#}");
    let mtu_of = |ns: &Netns, dev: &str| -> Value {
        let out = ns.exec_ok("ip", ["-j", "link", "show", "dev", dev]);
        serde_json::from_str::<Value>(&out).expect("ip -j link")[0]["mtu"].clone()
    };
    assert_eq!(mtu_of(&ctr, "eth0"), 1400);
    assert_eq!(mtu_of(&node.node, &host), 1400);
    assert_eq!(agent.containers()[0].json["mtu"], 1400);
    let with_prev = Plugin::with_prev(&conf, &result);
    assert_eq!(plugin.exec("CHECK", &id, Some(&ctr), &with_prev).ok(), "");
    assert_eq!(plugin.exec("DEL", &id, Some(&ctr), &with_prev).ok(), "");
    // One the kernel cannot take is an invalid configuration.
    for bad in [0, 67, 70_000] {
        conf["mtu"] = json!(bad);
        plugin
            .exec("ADD", &id, Some(&ctr), &conf)
            .err_saying(7, "mtu");
    }
    assert!(agent.containers().is_empty());
}

#[test]
fn del_succeeds_after_the_netns_is_gone() {
    let node = Node::new();
    let (agent, plugin) = agent_and_plugin(&node);
    let (ctr, id) = attachment(&node, "gone");
    let conf = plugin.with_runtime(json!({"portMappings": [
        {"hostPort": 8081, "containerPort": 80, "protocol": "tcp"}
    ]}));
    let result = plugin.add(&id, &ctr, &conf);
    let host = result["interfaces"][0]["name"]
        .as_str()
        .expect("host veth")
        .to_owned();
    let path = ctr.path().to_owned();
    drop(ctr);
    assert!(!path.exists());
    // The runtime still passes the old path, or none at all.
    let mut vars = vec![
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", id.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let path_text = path.display().to_string();
    vars.push(("CNI_NETNS", &path_text));
    assert_eq!(plugin.exec_raw(&vars, conf.to_string().as_bytes()).ok(), "");
    assert!(agent.containers().is_empty());
    assert!(!node_has_link(&node, &host));
    vars.pop();
    assert_eq!(plugin.exec_raw(&vars, conf.to_string().as_bytes()).ok(), "");
}

#[test]
fn check_names_what_is_broken() {
    let node = Node::new();
    let (agent, plugin) = agent_and_plugin(&node);
    let (ctr, id) = attachment(&node, "chk");
    let conf = plugin.with_runtime(json!({"portMappings": [
        {"hostPort": 8082, "containerPort": 80, "protocol": "tcp"}
    ]}));
    let result = plugin.add(&id, &ctr, &conf);
    let with_prev = Plugin::with_prev(&conf, &result);
    plugin.exec("CHECK", &id, Some(&ctr), &with_prev).ok();
    let addr = result["ips"][0]["address"]
        .as_str()
        .expect("address")
        .to_owned();

    // Mappings other than the ADD's.
    let mut other = plugin.with_runtime(json!({"portMappings": [
        {"hostPort": 8083, "containerPort": 80, "protocol": "tcp"}
    ]}));
    other["prevResult"] = result.clone();
    let e = plugin.exec("CHECK", &id, Some(&ctr), &other).err(999);
    let details = e["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("8083:80/tcp") && details.contains("8082:80/tcp"),
        "{e:#}"
    );

    // No prevResult.
    plugin.exec("CHECK", &id, Some(&ctr), &conf).err(7);

    // A prevResult with another MAC.
    let mut wrong_mac = result.clone();
    wrong_mac["interfaces"][1]["mac"] = json!("02:00:00:00:00:01");
    plugin
        .exec(
            "CHECK",
            &id,
            Some(&ctr),
            &Plugin::with_prev(&conf, &wrong_mac),
        )
        .err_saying(999, "MAC");

    // The default route removed inside the container.
    ctr.exec_ok("ip", ["route", "del", "default"]);
    plugin
        .exec("CHECK", &id, Some(&ctr), &with_prev)
        .err_saying(999, "0.0.0.0/0");

    // The address removed.
    ctr.exec_ok("ip", ["addr", "del", &addr, "dev", "eth0"]);
    plugin
        .exec("CHECK", &id, Some(&ctr), &with_prev)
        .err_saying(999, "lacks its address");

    // The interface down.
    ctr.exec_ok("ip", ["link", "set", "eth0", "down"]);
    plugin
        .exec("CHECK", &id, Some(&ctr), &with_prev)
        .err_saying(999, "down");

    // The container deleted behind the runtime's back.
    let name = agent.containers()[0].name.clone();
    agent.cli_ok(["container", "del", &name]);
    plugin
        .exec("CHECK", &id, Some(&ctr), &with_prev)
        .err_saying(999, &name);
}

#[test]
fn bad_configurations_get_the_specifications_error_codes() {
    let node = Node::new();
    let (agent, plugin) = agent_and_plugin(&node);
    let (ctr, id) = attachment(&node, "bad");
    let add = |conf: &Value| plugin.exec("ADD", &id, Some(&ctr), conf);

    // 6: not JSON.
    let run = plugin.exec_raw(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", &id),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", &ctr.path().display().to_string()),
        ],
        b"{\"cniVersion\": ",
    );
    run.err(6);
    // 1: a version this plugin does not speak.
    let mut old = plugin.conf.clone();
    old["cniVersion"] = json!("0.2.0");
    add(&old).err_saying(1, "0.4.0, 1.0.0, 1.1.0");
    // 7: a subnet other than the agent's pool.
    let mut subnet = plugin.conf.clone();
    subnet["ipam"] = json!({"type": "host-local", "subnet": "198.18.128.0/24"});
    add(&subnet).err_saying(7, agent.pool());
    // 7: no network name.
    let mut nameless = plugin.conf.clone();
    nameless.as_object_mut().expect("object").remove("name");
    add(&nameless).err(7);
    // 7: a rate without a burst.
    let mut rate = plugin.conf.clone();
    rate["egressRate"] = json!(1_000_000);
    add(&rate).err(7);
    // 7: rate limits without a cgroup to apply them to.
    let no_cgroup = plugin.with_runtime(json!({"bandwidth": {
        "egressRate": 1_000_000, "egressBurst": 80_000
    }}));
    add(&no_cgroup).err_saying(7, "cgroup");
    // 2: a protocol the datapath cannot publish.
    let sctp = plugin.with_runtime(json!({"portMappings": [
        {"hostPort": 8084, "containerPort": 80, "protocol": "sctp"}
    ]}));
    add(&sctp).err_saying(2, "sctp");
    // 2: an IPAM plugin the datapath does not run.
    let mut dhcp = plugin.conf.clone();
    dhcp["ipam"] = json!({"type": "dhcp"});
    add(&dhcp).err(2);
    // 4: no CNI_NETNS for ADD.
    let e = plugin.exec("ADD", &id, None, &plugin.conf).err(4);
    assert!(
        e["msg"].as_str().unwrap_or_default().contains("CNI_NETNS"),
        "{e:#}"
    );
    // 999: the agent refuses a port in its masquerade range.
    let snat = plugin.with_runtime(json!({"portMappings": [
        {"hostPort": 62000, "containerPort": 80, "protocol": "tcp"}
    ]}));
    add(&snat).err_saying(999, "62000");

    // None of it left anything behind.
    assert!(agent.containers().is_empty());
    let links = ctr.exec_ok("ip", ["-o", "link", "show"]);
    assert!(!links.contains("eth0"), "{links}");
}

#[test]
fn add_refuses_an_interface_name_the_container_already_has() {
    let node = Node::new();
    let (agent, plugin) = agent_and_plugin(&node);
    let ctr = node.add_container_netns("taken");
    ctr.exec_ok("ip", ["link", "add", "eth0", "type", "bridge"]);
    let id = container_id("taken");
    plugin
        .exec("ADD", &id, Some(&ctr), &plugin.conf)
        .err_saying(999, "eth0");
    assert!(agent.containers().is_empty());
    let eth0 = ctr.exec_ok("ip", ["-d", "-o", "link", "show", "dev", "eth0"]);
    assert!(
        eth0.contains("bridge"),
        "the existing eth0 was replaced: {eth0}"
    );
    // The runtime's DEL after the failed ADD succeeds and leaves it alone.
    plugin.exec("DEL", &id, Some(&ctr), &plugin.conf).ok();
    let eth0 = ctr.exec_ok("ip", ["-d", "-o", "link", "show", "dev", "eth0"]);
    assert!(
        eth0.contains("bridge"),
        "DEL removed a link it did not make: {eth0}"
    );
}

#[test]
fn an_agent_that_is_down_means_try_again_later() {
    let node = Node::new();
    let mut agent = Agent::start(&node);
    let plugin = Plugin::new(&agent, "dpnet", "1.1.0");
    let (ctr, id) = attachment(&node, "down");
    plugin.exec("STATUS", &id, None, &plugin.conf).ok();
    assert!(
        agent.stop(),
        "the agent did not stop cleanly:\n{}",
        agent.log()
    );
    for command in ["ADD", "DEL", "CHECK"] {
        let mut conf = plugin.conf.clone();
        conf["prevResult"] = json!({"cniVersion": "1.1.0"});
        let e = plugin.exec(command, &id, Some(&ctr), &conf).err(11);
        assert!(
            e["details"]
                .as_str()
                .unwrap_or_default()
                .contains(&agent.socket().display().to_string()),
            "{command}: {e:#}"
        );
    }
    plugin.exec("STATUS", &id, None, &plugin.conf).err(50);
}

#[test]
fn gc_removes_only_this_networks_stale_attachments() {
    let node = Node::new();
    let (agent, plugin) = agent_and_plugin(&node);
    let other = Plugin::new(&agent, "othernet", "1.1.0");
    let (a, b, c) = (
        node.add_container_netns("gca"),
        node.add_container_netns("gcb"),
        node.add_container_netns("gcc"),
    );
    let manual = node.add_container_netns("gcm");
    let (ida, idb, idc) = (container_id("a"), container_id("b"), container_id("c"));
    let valid = plugin.add(&ida, &a, &plugin.conf);
    let stale = plugin.add(&idb, &b, &plugin.conf);
    other.add(&idc, &c, &other.conf);
    agent.cli_ok(["container", "add", "manual", "--netns", manual.name()]);
    assert_eq!(agent.containers().len(), 4);

    let mut gc = plugin.conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": ida, "ifname": "eth0"}]);
    assert_eq!(plugin.exec("GC", "", None, &gc).ok(), "");
    let left = agent.containers();
    assert_eq!(left.len(), 3, "{left:#?}");
    let stale_host = stale["interfaces"][0]["name"].as_str().expect("veth");
    assert!(!node_has_link(&node, stale_host));
    assert!(left.iter().any(|c| c.name == "manual"));
    let other_netns = c.path().display().to_string();
    assert!(
        left.iter().any(|x| x.json["netns"] == other_netns.as_str()),
        "the other network's attachment survives: {left:#?}"
    );
    // The valid one is still intact.
    plugin
        .exec(
            "CHECK",
            &ida,
            Some(&a),
            &Plugin::with_prev(&plugin.conf, &valid),
        )
        .ok();

    // GC needs the key; 1.0.0 has no GC.
    plugin.exec("GC", "", None, &plugin.conf).err(7);
    let mut old = gc.clone();
    old["cniVersion"] = json!("1.0.0");
    plugin.exec("GC", "", None, &old).err(1);

    // An empty (null) list removes the rest of this network.
    gc["cni.dev/valid-attachments"] = Value::Null;
    plugin.exec("GC", "", None, &gc).ok();
    let left = agent.containers();
    assert_eq!(left.len(), 2, "{left:#?}");
}

#[test]
fn a_replaced_container_gets_the_udp_flow_of_a_client_that_kept_sending() {
    let node = Node::new();
    let (agent, plugin) = agent_and_plugin(&node);
    let conf = plugin.with_runtime(json!({"portMappings": [
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp"}
    ]}));
    let old = node.add_container_netns("udpold");
    let old_id = container_id("old");
    let old_server = Server::udp_echo(&old, 53, "old");
    let old_result = plugin.add(&old_id, &old, &conf);
    let old_addr = old_result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .expect("address")
        .to_owned();

    // One client socket (one 5-tuple) sending every 20 ms throughout.
    let client = UdpPinger::start(&node.client, node.node_port(5353), b"ping");
    assert!(
        client.wait_answer(b"old port 53: ping", IO_TIMEOUT),
        "the first container never answered"
    );

    // Replace the container: DEL, then ADD of a new one on the same port.
    plugin
        .exec(
            "DEL",
            &old_id,
            Some(&old),
            &Plugin::with_prev(&conf, &old_result),
        )
        .ok();
    drop(old_server);
    let stale: Vec<Value> = agent
        .flows()
        .into_iter()
        .filter(|f| {
            f["nat_dst"]["addr"] == old_addr.as_str() || f["orig_src"]["addr"] == old_addr.as_str()
        })
        .collect();
    assert!(
        stale.is_empty(),
        "flows of the deleted container survive: {stale:#?}"
    );

    let new = node.add_container_netns("udpnew");
    let _new_server = Server::udp_echo(&new, 53, "new");
    plugin.add(&container_id("new"), &new, &conf);
    let reached = client.wait_answer(b"new port 53: ping", Duration::from_secs(10));
    let sent = client.finish();
    assert!(
        reached,
        "the client that kept sending ({sent} datagrams) never reached the new container:\n{:#?}",
        agent.flows()
    );
}

#[test]
fn bandwidth_limits_reach_the_agent_hold_the_traffic_and_go_with_del() {
    let node = Node::new();
    let (agent, plugin) = agent_and_plugin(&node);
    let ctr = node.add_container_netns("bw");
    let cgroup = Cgroup::new();
    let root = sys::cgroup2_root().expect("a cgroup2 hierarchy");
    let relative = format!(
        "/{}",
        cgroup
            .path()
            .strip_prefix(&root)
            .expect("under the cgroup2 root")
            .display()
    );
    // Buckets of 1 MB: the limiter holds its measured bands with them.
    let conf = plugin.with_runtime(json!({
        "bandwidth": {
            "ingressRate": 8_000_000, "ingressBurst": 8_000_000,
            "egressRate": 4_000_000, "egressBurst": 8_000_000,
        },
        "portMappings": [{"hostPort": 18080, "containerPort": 5201, "protocol": "tcp"}],
        "cgroupPath": relative,
    }));
    let id = container_id("bw");
    let result = plugin.add(&id, &ctr, &conf);
    let list = agent.containers();
    assert_eq!(list.len(), 1, "{list:#?}");
    let info = &list[0].json;
    // CNI gives bits/s and bits; the agent keeps bits/s and bytes.
    assert_eq!(info["limits"]["ingress"]["rate_bps"], 8_000_000, "{info:#}");
    assert_eq!(
        info["limits"]["ingress"]["burst_bytes"], 1_000_000,
        "{info:#}"
    );
    assert_eq!(info["limits"]["egress"]["rate_bps"], 4_000_000, "{info:#}");
    assert_eq!(
        info["limits"]["egress"]["burst_bytes"], 1_000_000,
        "{info:#}"
    );
    assert!(
        info.to_string().contains(&relative),
        "the agent reports another cgroup than {relative}: {info:#}"
    );

    // Set up before, measured under, the traffic lock.
    let _lock = TrafficLock::acquire();
    // The limits hold the container's traffic, both ways.
    let opts = Iperf3Options::measured();
    let out = send_from(&node, &ctr, Some(&cgroup), &opts).unwrap_or_else(|e| panic!("{e}"));
    assert_report("egress at the CNI's 4 Mbit/s", &out, 4e6, EGRESS_BAND);
    let target = (Ipv4Addr::UNSPECIFIED, node.node_port(18080));
    let inbound = receive_in(
        &node,
        &ctr,
        Some(&cgroup),
        target,
        &Iperf3Options::measured_ingress(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_report("ingress at the CNI's 8 Mbit/s", &inbound, 8e6, INGRESS_BAND);

    plugin
        .exec("CHECK", &id, Some(&ctr), &Plugin::with_prev(&conf, &result))
        .ok();
    plugin
        .exec("DEL", &id, Some(&ctr), &Plugin::with_prev(&conf, &result))
        .ok();
    assert!(agent.containers().is_empty());
}

/// Kubernetes semantics on one node: the agent started with the cluster's
/// service CIDR and another node's pod CIDR as `--non-masquerade-cidr`
/// (and `--allow-direct-routing`, so the other node's answers reach the
/// pod); a pod attached through the plugin with a `hostPort` and a
/// `hostIP`, as kubelet's CRI passes them.
#[test]
fn kubernetes_pods_keep_their_address_to_cluster_cidrs_and_host_ports_bind_their_host_ip() {
    const SERVICE_CIDR: &str = "198.18.64.0/18";
    const SERVICE_IP: &str = "198.18.64.10";
    const REMOTE_PODS: &str = "198.18.128.0/24";
    const REMOTE_POD: &str = "198.18.128.7";
    const HOST_IP: &str = "198.18.0.3";
    let node = Node::new();
    // A second node address for the hostIP; a service address on the
    // node's own stack (where kube-proxy would translate it); the other
    // node's pods behind the client.
    node.node.exec_ok(
        "ip",
        ["addr", "add", &format!("{HOST_IP}/24"), "dev", node::UPLINK],
    );
    node.node.exec_ok(
        "ip",
        ["addr", "add", &format!("{SERVICE_IP}/32"), "dev", "lo"],
    );
    node.node.exec_ok(
        "ip",
        [
            "route",
            "add",
            REMOTE_PODS,
            "via",
            &node.client_addr().to_string(),
        ],
    );
    node.client.exec_ok(
        "ip",
        ["addr", "add", &format!("{REMOTE_POD}/32"), "dev", "lo"],
    );
    let agent = Agent::builder(&node)
        .args([
            "--non-masquerade-cidr",
            SERVICE_CIDR,
            "--non-masquerade-cidr",
            REMOTE_PODS,
            "--allow-direct-routing",
        ])
        .start();
    node.route_from_client_via_node(agent.pool());
    let plugin = Plugin::new(&agent, "k8s-datapath", "1.0.0");
    let (pod, id) = attachment(&node, "pod");
    let conf = plugin.with_runtime(json!({"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": HOST_IP}
    ]}));
    let result = plugin.add(&id, &pod, &conf);
    let pod_addr = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .expect("the pod's address")
        .to_owned();
    let seen_by = |server: &str, addr: SocketAddr| -> String {
        let body = http_get(&pod, addr, "/").unwrap_or_else(|e| panic!("{server}: {e}"));
        body.split("hello ")
            .nth(1)
            .and_then(|p| p.split(':').next())
            .unwrap_or_else(|| panic!("{server}: {body:?}"))
            .to_owned()
    };

    // Pod to service: to the node's stack, with the pod's own address.
    let _svc = Server::http(&node.node, 7000, "svc");
    let to_service = format!("{SERVICE_IP}:7000").parse().expect("an address");
    assert_eq!(seen_by("service", to_service), pod_addr);
    // Pod to a pod of another node: routed by the node, address kept.
    let _remote = Server::http(&node.client, 7001, "remote");
    let to_remote = format!("{REMOTE_POD}:7001").parse().expect("an address");
    assert_eq!(seen_by("remote pod", to_remote), pod_addr);
    // Anywhere else: masqueraded to the node's address.
    let _out = Server::http(&node.client, 7002, "out");
    assert_eq!(
        seen_by("outside", node.client_port(7002)),
        node.node_addr().to_string()
    );

    // The hostPort answers on its hostIP, and only there.
    let _web = Server::http(&pod, 80, "web");
    let on_host_ip: SocketAddr = format!("{HOST_IP}:8080").parse().expect("an address");
    let body = http_get(&node.client, on_host_ip, "/").expect("the hostPort on its hostIP");
    assert!(
        body.starts_with("web port 80: hello 198.18.0.1:"),
        "{body:?}"
    );
    assert_refused(
        &node.client,
        node.node_port(8080),
        "the hostPort on another address",
    );
}

#[test]
fn on_cluster_nodes_the_plugin_hands_out_node_cidr_addresses_that_reach_across_nodes() {
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    let (n1, n2) = (switch.node(1), switch.node(2));
    let a1 = cluster::agent(&n1, &etcd, "n1", &[]);
    let a2 = cluster::agent(&n2, &etcd, "n2", &[]);
    let seen = wait::within(Duration::from_secs(20), || {
        [&a1, &a2].iter().all(|a| {
            a.cli_json(["node", "list", "--json"])
                .as_array()
                .is_some_and(|nodes| nodes.len() == 2)
        })
    });
    assert!(seen, "the nodes do not see each other");
    // The plugin, unchanged, on each node: an address of the node's CIDR.
    let mut addrs = Vec::new();
    for (agent, node, tag) in [(&a1, &n1, "a"), (&a2, &n2, "b")] {
        let plugin = Plugin::new(agent, "dpnet", "1.1.0");
        let (ctr, id) = attachment(node, tag);
        let result = plugin.add(&id, &ctr, &plugin.conf);
        let addr = result["ips"][0]["address"].as_str().expect("an address");
        let addr: Ipv4Addr = addr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("not an address: {addr}"));
        let cidr = agent.status()["pool"].as_str().expect("a pool").to_owned();
        let (network, prefix) = parse_pool(&cidr);
        assert_eq!(
            u32::from(addr) & (u32::MAX << (32 - prefix)),
            u32::from(network),
            "{addr} is not in the node CIDR {cidr}"
        );
        addrs.push((ctr, addr, cidr));
    }
    let (a, b) = (&addrs[0], &addrs[1]);
    assert_ne!(a.2, b.2, "the nodes' CIDRs");
    assert!(
        wait::within(Duration::from_secs(20), || a.0.ping(b.1)),
        "{} does not reach {} on the other node",
        a.1,
        b.1
    );
}

#[test]
fn a_dual_stack_agent_returns_both_families_and_check_verifies_both() {
    let node = Node::new();
    let agent = Agent::builder(&node)
        .args(["--pool6", "fd00:db8:77::/64"])
        .start();
    let plugin = Plugin::new(&agent, "dpnet", "1.1.0");
    let (ctr, id) = attachment(&node, "dual");
    let mut conf = plugin.with_runtime(json!({}));
    conf["ipam"] = json!({"type": "host-local",
        "ranges": [[{"subnet": agent.pool()}], [{"subnet": "fd00:db8:77::/64"}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]});
    let result = plugin.add(&id, &ctr, &conf);
    let info = &agent.containers()[0];
    let addr6 = info.addr6.expect("an IPv6 address");
    let ips = result["ips"].as_array().expect("ips");
    assert_eq!(ips.len(), 2, "{result:#}");
    assert_eq!(ips[0]["address"], format!("{}/32", info.addr), "{result:#}");
    assert_eq!(ips[1]["address"], format!("{addr6}/128"), "{result:#}");
    assert_eq!(ips[1]["gateway"], "fe80::1", "{result:#}");
    assert_eq!(ips[1]["interface"], 1, "{result:#}");
    assert!(
        result["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["dst"] == "::/0" && r["gw"] == "fe80::1"),
        "{result:#}"
    );
    let with_prev = Plugin::with_prev(&conf, &result);
    assert_eq!(plugin.exec("CHECK", &id, Some(&ctr), &with_prev).ok(), "");

    // Another IPv6 address in the previous result.
    let mut wrong = result.clone();
    wrong["ips"][1]["address"] = json!("fd00:db8:77::99/128");
    plugin
        .exec("CHECK", &id, Some(&ctr), &Plugin::with_prev(&conf, &wrong))
        .err_saying(999, "the agent gave it");

    // The IPv6 default route removed inside the container.
    ctr.exec_ok("ip", ["-6", "route", "del", "default"]);
    plugin
        .exec("CHECK", &id, Some(&ctr), &with_prev)
        .err_saying(999, "IPv6 default route");

    // The IPv6 address removed.
    let a = format!("{addr6}/128");
    ctr.exec_ok("ip", ["-6", "addr", "del", &a, "dev", "eth0"]);
    plugin
        .exec("CHECK", &id, Some(&ctr), &with_prev)
        .err_saying(999, "lacks its IPv6 address");

    // An IPv6 range the agent does not have.
    let mut other = plugin.with_runtime(json!({}));
    other["ipam"] = json!({"ranges": [[{"subnet": "fd00:db8:78::/64"}]]});
    let (ctr2, id2) = attachment(&node, "dual2");
    plugin
        .exec("ADD", &id2, Some(&ctr2), &other)
        .err_saying(7, "fd00:db8:77::/64");
}
