//! podman drives the datapath through the CNI plugin, end to end: a real
//! `podman run -p` inside a namespace node, traffic from the client
//! namespace, and `podman rm` leaving no trace. podman's every state
//! directory lives in a per-test directory; nothing in /etc changes.
//!
//! podman runs in the node namespace (`setns`, like `nsenter --net`), with
//! `runc` (crun fails on this machine's hybrid cgroup layout), the CNI
//! backend reading this test's configuration directory and a busybox
//! rootfs, so no image is pulled.

use std::{
    ffi::OsStr,
    fs,
    net::Ipv4Addr,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use datapath_tests::{
    agent::{Agent, datapath_bin},
    cgroup::{Cgroup, remove_everywhere},
    inspect::{self, assert_no_firewall},
    lock::TrafficLock,
    names,
    netns::{Netns, which},
    node::Node,
    ratebench::{Iperf3Options, assert_report, receive_in, send_from},
    sys,
    traffic::{IO_TIMEOUT, Server, UdpPinger},
    wait,
};
use serde_json::{Value, json};

/// podman with all its state under `/tmp/dpt-<node id>-podman`, containers
/// under the cgroup `/dpt-<node id>-podman`, networks from this test.
struct Podman<'n> {
    node: &'n Node,
    dir: PathBuf,
    cgroup_parent: String,
    rootfs: PathBuf,
}

impl<'n> Podman<'n> {
    /// Prepares podman's configuration and a busybox rootfs, and the
    /// network `name` served by `agent` (with `extra` merged into the
    /// plugin's configuration).
    fn new(agent: &Agent<'n>, name: &str, extra: &Value) -> Self {
        which("podman").expect(
            "podman is not installed: `apt-get install podman runc` (cargo xtask bootstrap does)",
        );
        assert!(
            which("runc").is_some(),
            "runc is not installed: `apt-get install runc`"
        );
        let busybox = which("busybox").expect("busybox is not installed (busybox-static)");
        let node = agent.node();
        let tag = format!("{}{}-podman", names::PREFIX, node.id());
        let dir = Path::new("/tmp").join(&tag);
        let _ = fs::remove_dir_all(&dir);
        let p = Self {
            node,
            cgroup_parent: cgroup_parent(node),
            rootfs: dir.join("rootfs"),
            dir,
        };
        for d in ["cni", "net.d", "root", "runroot", "tmp"] {
            mkdir(&p.dir.join(d));
        }
        for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "www"] {
            mkdir(&p.rootfs.join(d));
        }
        fs::copy(&busybox, p.rootfs.join("bin/busybox")).expect("copy busybox");
        fs::write(p.rootfs.join("www/index.html"), "hello from podman\n").expect("index");
        let plugin = datapath_bin()
            .parent()
            .map(|d| d.join("datapath-cni"))
            .expect("a binary directory");
        assert!(plugin.is_file(), "{} is missing", plugin.display());
        symlink(&plugin, p.dir.join("cni/datapath-cni")).expect("link the plugin");
        let d = p.dir.display();
        fs::write(
            p.dir.join("containers.conf"),
            format!(
                r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{d}/events.log"
tmp_dir = "{d}/tmp"
static_dir = "{d}/root/libpod"
volume_path = "{d}/root/volumes"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{d}/cni"]
network_config_dir = "{d}/net.d"
"#
            ),
        )
        .expect("containers.conf");
        fs::write(
            p.dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{d}/root\"\nrunroot = \"{d}/runroot\"\n"
            ),
        )
        .expect("storage.conf");
        let mut plugin_conf = json!({
            "type": "datapath-cni",
            "agentSocket": agent.socket(),
            "ipam": {"type": "datapath", "ranges": [[{"subnet": agent.pool()}]]},
            "capabilities": {"portMappings": true},
        });
        if let (Some(conf), Some(extra)) = (plugin_conf.as_object_mut(), extra.as_object()) {
            conf.extend(extra.clone());
        }
        let conflist = json!({"cniVersion": "1.0.0", "name": name, "plugins": [plugin_conf]});
        fs::write(
            p.dir.join(format!("net.d/{name}.conflist")),
            serde_json::to_vec_pretty(&conflist).expect("conflist"),
        )
        .expect("write the conflist");
        p
    }

    /// Runs `podman ARGS` in the node namespace.
    fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(args)
            .current_dir(&self.dir);
        self.node.node.run(&mut cmd)
    }

    /// Like [`Podman::run`]; panics unless it succeeds, else returns the
    /// trimmed stdout.
    #[track_caller]
    fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "podman {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `podman run -d` of `command` on the busybox rootfs in network
    /// `network`, publishing `publish`; returns the container id.
    fn run_container(&self, name: &str, network: &str, publish: &str, command: &[&str]) -> String {
        let mut args = vec![
            "run".to_owned(),
            "-d".to_owned(),
            "--name".to_owned(),
            name.to_owned(),
            "--network".to_owned(),
            network.to_owned(),
            "-p".to_owned(),
            publish.to_owned(),
            format!("--cgroup-parent={}", self.cgroup_parent),
            "--rootfs".to_owned(),
            self.rootfs.display().to_string(),
        ];
        args.extend(command.iter().map(|s| (*s).to_owned()));
        self.ok(&args)
    }

    /// The container's network namespace file.
    fn sandbox(&self, name: &str) -> PathBuf {
        PathBuf::from(self.ok([
            "inspect",
            name,
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
        ]))
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let out = self.run(["rm", "-a", "-f", "-t", "0"]);
        if !out.status.success() {
            eprintln!(
                "warning: podman rm -a: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The parent cgroup (and conmon's) in every hierarchy, deepest first.
        remove_everywhere(&self.cgroup_parent);
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: removing {}: {e}", self.dir.display());
        }
    }
}

/// The cgroup (from the hierarchies' root) podman puts the containers of
/// `node`'s test under: `/dpt-<node id>-podman`.
fn cgroup_parent(node: &Node) -> String {
    format!("/{}{}-podman", names::PREFIX, node.id())
}

fn mkdir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
}

/// `curl` from the client namespace until it answers (the server may still
/// be starting) or `IO_TIMEOUT` passes.
fn curl(node: &Node, url: &str) -> Option<String> {
    wait::for_some(IO_TIMEOUT, || {
        let out = node.client.exec("curl", ["-sf", "-m", "2", url]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

#[test]
fn podman_run_publishes_a_port_and_rm_removes_every_trace() {
    let node = Node::new();
    let agent = Agent::start(&node);
    let podman = Podman::new(&agent, "dpnet", &json!({}));
    assert_no_firewall(&node.node, "before podman ran");
    let name = format!("{}{}-web", names::PREFIX, node.id());
    let id = podman.run_container(
        &name,
        "dpnet",
        "8080:80",
        &["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"],
    );
    let sandbox = podman.sandbox(&name);
    assert!(sandbox.exists(), "{}", sandbox.display());

    // The agent holds one container for it, in its netns, with the port.
    let list = agent.containers();
    assert_eq!(list.len(), 1, "{list:#?}");
    let c = &list[0].json;
    assert_eq!(c["netns"], sandbox.display().to_string(), "{c:#}");
    assert_eq!(c["publish"], json!(["8080:80/tcp"]), "{c:#}");
    assert!(
        list[0].name.contains(&id[..12]),
        "the agent's name carries the container id: {c:#}"
    );
    let addr = list[0].addr.to_string();
    let host = list[0].host_ifname.clone();
    // podman took its address from the plugin's result.
    let ip = podman.ok([
        "inspect",
        &name,
        "--format",
        "{{(index .NetworkSettings.Networks \"dpnet\").IPAddress}}",
    ]);
    assert_eq!(ip, addr);

    // A client reaches httpd through the published port.
    let url = format!("http://{}:8080/index.html", node.node_addr());
    assert_eq!(
        curl(&node, &url).as_deref(),
        Some("hello from podman\n"),
        "no answer through the published port"
    );
    assert!(
        agent
            .flows()
            .iter()
            .any(|f| f["kind"] == "dnat" && f["nat_dst"]["addr"] == addr.as_str()),
        "no DNAT flow to {addr}"
    );
    assert_no_firewall(&node.node, "while the container ran");

    // podman rm removes every trace: veth, map entries, flows, netns.
    podman.ok(["rm", "-f", "-t", "0", &name]);
    assert!(agent.containers().is_empty(), "{:#?}", agent.containers());
    let links = node.node.exec_ok("ip", ["-o", "link", "show"]);
    assert!(
        !links.contains(&format!("{host}@")),
        "{host} survived:\n{links}"
    );
    let left: Vec<Value> = agent
        .flows()
        .into_iter()
        .filter(|f| f["nat_dst"]["addr"] == addr.as_str() || f["orig_src"]["addr"] == addr.as_str())
        .collect();
    assert!(left.is_empty(), "flows survived podman rm: {left:#?}");
    assert!(!sandbox.exists(), "{} survived", sandbox.display());
    assert!(
        curl(&node, &url).is_none(),
        "the port still answers after podman rm"
    );
    let status = agent.cli_json(["status", "--json"]);
    assert_eq!(status["containers"], 0, "{status:#}");
    assert_eq!(podman.ok(["ps", "-a", "-q"]), "");
    assert_no_firewall(&node.node, "after podman rm");
}

/// busybox has no UDP server here, so each container runs `sleep` and the
/// test answers UDP from a thread inside the container's network
/// namespace: for the datapath that is the container.
#[test]
fn podman_replacing_a_container_hands_it_a_udp_client_that_kept_sending() {
    let node = Node::new();
    let agent = Agent::start(&node);
    let podman = Podman::new(&agent, "dpnet", &json!({}));
    let sleep = ["/bin/busybox", "sleep", "120"];
    let name = format!("{}{}-dns", names::PREFIX, node.id());
    podman.run_container(&name, "dpnet", "5353:53/udp", &sleep);
    let old = Server::udp_echo(&Netns::attach(podman.sandbox(&name)), 53, "old");

    let client = UdpPinger::start(&node.client, node.node_port(5353), b"query");
    assert!(
        client.wait_answer(b"old port 53: query", IO_TIMEOUT),
        "the first container never answered"
    );

    // Replace it: podman rm, then a new container on the same host port.
    drop(old);
    podman.ok(["rm", "-f", "-t", "0", &name]);
    podman.run_container(&name, "dpnet", "5353:53/udp", &sleep);
    let _new = Server::udp_echo(&Netns::attach(podman.sandbox(&name)), 53, "new");
    let reached = client.wait_answer(b"new port 53: query", Duration::from_secs(10));
    client.finish();
    assert!(
        reached,
        "the client never reached the new container; flows:\n{:#?}",
        agent.flows()
    );
    assert_no_firewall(&node.node, "after the replacement");
    podman.ok(["rm", "-f", "-t", "0", &name]);
    assert!(agent.containers().is_empty());
}

#[test]
fn a_podman_container_that_exits_is_detached_and_reattached_on_start() {
    let node = Node::new();
    let agent = Agent::start(&node);
    let podman = Podman::new(&agent, "dpnet", &json!({}));
    let name = format!("{}{}-exit", names::PREFIX, node.id());
    // Exits at once the first time, serves HTTP when started again.
    let script = "/bin/busybox test -e /tmp/started && \
                  exec /bin/busybox httpd -f -p 80 -h /www; \
                  /bin/busybox touch /tmp/started";
    podman.run_container(
        &name,
        "dpnet",
        "8085:80",
        &["/bin/busybox", "sh", "-c", script],
    );
    // podman's cleanup process runs DEL once the container exits, with
    // whatever environment conmon gives it.
    let detached = wait::within(Duration::from_secs(10), || agent.containers().is_empty());
    assert!(
        detached,
        "still attached after exiting: {:#?}",
        agent.containers()
    );
    let state = podman.ok(["inspect", &name, "--format", "{{.State.Status}}"]);
    assert_eq!(state, "exited");
    let url = format!("http://{}:8085/index.html", node.node_addr());
    let down = node.client.exec("curl", ["-sf", "-m", "2", url.as_str()]);
    assert!(!down.status.success(), "nothing answers while it is down");
    podman.ok(["start", &name]);
    let list = agent.containers();
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0].json["publish"], json!(["8085:80/tcp"]));
    // Re-attached for real: the published port reaches the new process.
    assert_eq!(
        curl(&node, &url).as_deref(),
        Some("hello from podman\n"),
        "no answer through the re-attached container's port"
    );
    podman.ok(["rm", "-f", "-t", "0", &name]);
    assert!(agent.containers().is_empty());
}

/// The agent's rate limiter link pins.
fn rate_pins(agent: &Agent<'_>) -> Vec<String> {
    fs::read_dir(agent.bpffs_dir().join("links"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("rate_"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the agent holds exactly one container whose limits are
/// applied (not pending), and returns it.
fn applied(agent: &Agent<'_>) -> Value {
    let mut last = Vec::new();
    let done = wait::within(Duration::from_secs(10), || {
        last = agent.containers();
        last.len() == 1 && last[0].json["pending"] == false
    });
    assert!(done, "the limits were never applied: {last:#?}");
    last[0].json.clone()
}

/// The rate limits in the conflist, the way the `bandwidth` plugin takes
/// them: bits per second and bits.
const RATE_BPS: u64 = 20_000_000;
/// A 1 MiB bucket, in bits (buckets of 1 MB and more hold the rate best:
/// see `ratebench::EGRESS_BAND`).
const BURST_BITS: u64 = 8 * 1024 * 1024;
/// Both directions must be measured within ±10% of the rate.
const BAND: (f64, f64) = (0.9, 1.1);

/// What a podman user does for limits: the rate keys and a `cgroup`
/// template in the conflist, then `podman run -p`. podman calls ADD before
/// runc creates the container's cgroup, so the limits are pending at
/// first and applied when it appears; `podman stop` removes the
/// attachment and `podman start` makes it again, limits included; `podman
/// rm` leaves nothing.
#[test]
fn podman_limits_from_the_conflist_hold_through_stop_and_start_and_go_with_rm() {
    let node = Node::new();
    let agent = Agent::start(&node);
    let parent = cgroup_parent(&node);
    let podman = Podman::new(
        &agent,
        "dpnet",
        &json!({
            "egressRate": RATE_BPS,
            "egressBurst": BURST_BITS,
            "ingressRate": RATE_BPS,
            "ingressBurst": BURST_BITS,
            "cgroup": format!("{parent}/libpod-{{containerID}}"),
        }),
    );
    let name = format!("{}{}-lim", names::PREFIX, node.id());
    let id = podman.run_container(
        &name,
        "dpnet",
        "5201:5201",
        &["/bin/busybox", "sleep", "600"],
    );
    let root = sys::cgroup2_root().expect("cgroup2 is mounted");
    let dir = root
        .join(parent.trim_start_matches('/'))
        .join(format!("libpod-{id}"));
    let c = applied(&agent);
    assert_eq!(c["cgroup"], dir.display().to_string(), "{c:#}");
    assert_eq!(c["limits"]["egress"]["rate_bps"], RATE_BPS, "{c:#}");
    assert_eq!(
        c["limits"]["egress"]["burst_bytes"],
        BURST_BITS / 8,
        "{c:#}"
    );
    assert_eq!(c["limits"]["ingress"]["rate_bps"], RATE_BPS, "{c:#}");
    assert_eq!(rate_pins(&agent).len(), 3, "{:?}", rate_pins(&agent));

    // The container's own cgroup and namespace: what the limiter sees of
    // its processes.
    let measure = |what: &str, ingress: bool| {
        let ctr = Netns::attach(podman.sandbox(&name));
        let cg = Cgroup::attach(&dir);
        let _lock = TrafficLock::acquire();
        let report = if ingress {
            let target = (Ipv4Addr::UNSPECIFIED, node.node_port(5201));
            receive_in(
                &node,
                &ctr,
                Some(&cg),
                target,
                &Iperf3Options::measured_ingress(),
            )
        } else {
            send_from(&node, &ctr, Some(&cg), &Iperf3Options::measured())
        }
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_report(what, &report, RATE_BPS as f64, BAND);
    };
    measure("podman egress", false);
    measure("podman ingress through -p 5201:5201", true);

    // podman stop: the cgroup goes and podman's cleanup detaches the
    // container; podman start attaches it again, limits included.
    podman.ok(["stop", "-t", "0", &name]);
    let detached = wait::within(Duration::from_secs(10), || agent.containers().is_empty());
    assert!(
        detached,
        "still attached after stop: {:#?}",
        agent.containers()
    );
    assert_eq!(rate_pins(&agent), Vec::<String>::new());
    podman.ok(["start", &name]);
    let c = applied(&agent);
    assert_eq!(c["limits"]["egress"]["rate_bps"], RATE_BPS, "{c:#}");
    let buckets = inspect::map_dump(&agent, "RATE_LIMITS");
    let id_now = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&dir).expect("the cgroup"));
    assert!(
        buckets.len() == 2 && buckets.iter().all(|b| b["key"]["cgroup_id"] == id_now),
        "{buckets:#?}"
    );
    measure("podman egress after stop and start", false);

    // podman rm: nothing of the container or its limits is left.
    podman.ok(["rm", "-f", "-t", "0", &name]);
    assert!(agent.containers().is_empty(), "{:#?}", agent.containers());
    assert_eq!(rate_pins(&agent), Vec::<String>::new());
    assert_eq!(
        inspect::map_dump(&agent, "RATE_LIMITS"),
        Vec::<Value>::new()
    );
    assert_eq!(inspect::map_dump(&agent, "RATE_STATS"), Vec::<Value>::new());
    assert!(!dir.exists(), "{} survived podman rm", dir.display());
    assert_no_firewall(&node.node, "after podman rm");
}
