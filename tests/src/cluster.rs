//! A cluster built from namespaces: an underlay switch (a bridge in a
//! namespace of its own), nodes plugged into it ([`crate::node::NodeBuilder::switch`]),
//! and etcd in a namespace of its own on an underlay address, its data in a
//! temporary directory.
//!
//! ```text
//!            switch netns: br0
//!   ┌──────────┬──────┴─────┬────────────┐
//!  etcd      node 1       node 2   …   (each node's client too)
//! 198.18.0.2 198.18.0.11  198.18.0.12
//! ```
//!
//! ```no_run
//! use datapath_tests::cluster::{Etcd, Switch};
//!
//! let switch = Switch::new();
//! let etcd = Etcd::start(&switch);
//! let node = switch.node(1);
//! let agent = datapath_tests::cluster::agent(&node, &etcd, "n1", &[]);
//! ```

use std::{
    fs::File,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{
    agent::{Agent, AgentBuilder, TMP_DIR},
    names,
    netns::Netns,
    node::{Node, SWITCH_BRIDGE},
    wait,
};

/// The cluster's container network in tests.
pub const CLUSTER_CIDR: &str = "198.19.0.0/16";
/// The underlay's prefix length.
pub const UNDERLAY_LEN: u8 = 24;
/// etcd's address on the underlay.
pub const ETCD_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// How long etcd may take to answer its health check after a start.
pub const ETCD_START: Duration = Duration::from_secs(30);

/// The underlay switch: a bridge in a namespace of its own.
#[derive(Debug)]
pub struct Switch {
    /// The switch's namespace (bridge [`SWITCH_BRIDGE`]).
    pub ns: Netns,
}

impl Switch {
    /// A new switch with its bridge up.
    pub fn new() -> Self {
        let ns = Netns::new(&format!("{}{}-sw", names::PREFIX, names::unique_id()));
        ns.exec_ok("ip", ["link", "add", SWITCH_BRIDGE, "type", "bridge"]);
        ns.exec_ok("ip", ["link", "set", SWITCH_BRIDGE, "up"]);
        Self { ns }
    }

    /// Node `n` (1..=99) on this switch: node address `198.18.0.(10+n)`,
    /// its client `198.18.0.(100+n)`.
    pub fn node(&self, n: u8) -> Node {
        assert!((1..=99).contains(&n), "node numbers are 1..=99");
        Node::builder()
            .switch(&self.ns)
            .node_addr(Ipv4Addr::new(198, 18, 0, 10 + n))
            .client_addr(Ipv4Addr::new(198, 18, 0, 100 + n))
            .prefix_len(UNDERLAY_LEN)
            .build()
    }

    /// Plugs a new interface `ifname` of `ns` into the switch, with
    /// address `addr`, and waits for it to come up.
    pub fn plug(&self, ns: &Netns, ifname: &str, addr: Ipv4Addr) {
        static PORTS: AtomicU32 = AtomicU32::new(0);
        let port = format!("p{}", PORTS.fetch_add(1, Ordering::Relaxed));
        ns.add_veth(ifname, &port, &self.ns)
            .unwrap_or_else(|e| panic!("{e}"));
        self.ns
            .exec_ok("ip", ["link", "set", &port, "master", SWITCH_BRIDGE, "up"]);
        let cidr = format!("{addr}/{UNDERLAY_LEN}");
        ns.exec_ok("ip", ["addr", "add", &cidr, "dev", ifname]);
        ns.exec_ok("ip", ["link", "set", ifname, "up"]);
        ns.wait_link_up(ifname);
    }
}

impl Default for Switch {
    fn default() -> Self {
        Self::new()
    }
}

/// etcd in a namespace of its own on the underlay; killed and its data
/// directory removed on drop.
#[derive(Debug)]
pub struct Etcd {
    ns: Netns,
    dir: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd on [`ETCD_ADDR`] of `switch` and waits until it is
    /// healthy.
    pub fn start(switch: &Switch) -> Self {
        let name = format!("{}{}-etcd", names::PREFIX, names::unique_id());
        let ns = Netns::new(&name);
        switch.plug(&ns, "eth0", ETCD_ADDR);
        let dir = PathBuf::from(TMP_DIR).join(&name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut etcd = Self {
            ns,
            dir,
            child: None,
        };
        etcd.restart();
        etcd
    }

    /// The client URL (`http://198.18.0.2:2379`).
    pub fn url(&self) -> String {
        format!("http://{ETCD_ADDR}:2379")
    }

    /// Kills etcd (as a crash would), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on its data (after [`Etcd::stop`]) and waits
    /// until it is healthy.
    #[track_caller]
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is still running");
        let log_path = self.dir.join("etcd.log");
        let log = File::options()
            .append(true)
            .create(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log_path.display()));
        let log_err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let client = self.url();
        let peer = format!("http://{ETCD_ADDR}:2380");
        let data = self.dir.join("data");
        let mut cmd = self.ns.command("etcd");
        cmd.args(["--name", "dpt", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("dpt={peer}"),
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("starting etcd: {e}")));
        let healthy = wait::within(ETCD_START, || {
            let out = self
                .ns
                .exec("curl", ["-s", "-m", "1", &format!("{client}/health")]);
            String::from_utf8_lossy(&out.stdout).contains("\"health\":\"true\"")
        });
        assert!(
            healthy,
            "etcd did not become healthy in {ETCD_START:?}:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }

    /// Writes `value` at `key` (through etcd's JSON gateway).
    pub fn put(&self, key: &str, value: &str) {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let body = format!("{{\"key\":\"{}\",\"value\":\"{}\"}}", b64(key), b64(value));
        let out = self.ns.exec(
            "curl",
            [
                "-s",
                "-m",
                "5",
                "-X",
                "POST",
                "-d",
                &body,
                &format!("{}/v3/kv/put", self.url()),
            ],
        );
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("header"),
            "etcd put {key}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        self.ns.kill_all();
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("warning: removing {}: {e}", self.dir.display());
            }
            _ => {}
        }
    }
}

/// A cluster agent on `node` named `name`, using `etcd`, with the test
/// cluster CIDR, /24 node CIDRs and any `extra` arguments.
pub fn agent<'n>(node: &'n Node, etcd: &Etcd, name: &str, extra: &[&str]) -> Agent<'n> {
    builder(node, etcd, name, extra).start()
}

/// The options of [`agent`], to start it later (e.g. with
/// [`AgentBuilder::start_all`]).
pub fn builder<'n>(node: &'n Node, etcd: &Etcd, name: &str, extra: &[&str]) -> AgentBuilder<'n> {
    Agent::builder(node)
        .without_pool()
        .args(cluster_args(etcd, name))
        .args(extra.iter().copied())
}

/// The cluster arguments of an agent named `name`.
pub fn cluster_args(etcd: &Etcd, name: &str) -> Vec<String> {
    [
        "--cluster-store",
        &etcd.url(),
        "--node-name",
        name,
        "--cluster-cidr",
        CLUSTER_CIDR,
        "--node-cidr-size",
        "24",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}
