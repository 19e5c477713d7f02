//! The sandbox (`cargo xtask run`): a whole node in network namespaces with
//! the agent running in it and two containers published through it.
//!
//! ```text
//!  client 198.18.0.1 ──veth── up0 198.18.0.2 (node, agent)
//!                                 ├─ web1: HTTP :80            published as 8080
//!                                 └─ web2: HTTP :80, UDP :53   published as 8081, 5353/udp
//! ```
//!
//! It sends real requests from the client through the published ports and
//! prints them with their answers, then what the agent shows (`container
//! list`, `conntrack list`) and the published-port map as bpftool dumps it.
//! With `--once` it then cleans up and exits; otherwise it waits for
//! Ctrl-C (SIGINT) or SIGTERM. Cleanup is the harness's guards: the signal
//! handler only raises a flag, so that `main` returns and every guard runs.
//!
//! With `--cluster` (`cargo xtask run --cluster`) it builds a cluster
//! instead: an underlay switch, etcd and three nodes with an agent each,
//! one container per node, and shows the containers talking across the
//! nodes with their own addresses.
//!
//! ```text
//!              switch (br0) ── etcd 198.18.0.2
//!      ┌──────────────┼──────────────┐
//!   node1 .11      node2 .12      node3 .13      (underlay 198.18.0.0/24)
//!   pod 198.19.0.2 pod 198.19.1.2 pod 198.19.2.2 (cluster 198.19.0.0/16)
//! ```
//!
//! The agent binary is `$DATAPATH_BIN`, else `datapath` next to this one.

use std::{
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use datapath_tests::{
    agent::Agent,
    cluster::{self, Etcd, Switch},
    inspect,
    netns::Netns,
    node::{Node, UPLINK},
    traffic::{Server, http_get, line_exchange, udp_request},
    wait,
};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// Raised by SIGINT or SIGTERM.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("install a {sig} handler"))?;
    }
    Ok(())
}

/// Points `DATAPATH_BIN` at `datapath` next to this executable unless it
/// is set already.
fn find_agent_binary() -> anyhow::Result<()> {
    if std::env::var_os("DATAPATH_BIN").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("find this executable")?;
    let bin = exe
        .parent()
        .map(|d| d.join("datapath"))
        .filter(|p| p.is_file());
    let Some(bin) = bin else {
        bail!(
            "the agent binary is not next to {}: build it (`cargo build --bins`), \
             run `cargo xtask run`, or set DATAPATH_BIN",
            exe.display()
        );
    };
    // SAFETY: called first thing in `main`, before any other thread exists.
    unsafe { std::env::set_var("DATAPATH_BIN", bin) };
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let (mut once, mut cluster) = (false, false);
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--once" => once = true,
            "--cluster" => cluster = true,
            "-h" | "--help" => {
                println!("usage: sandbox [--cluster] [--once]\n\n{}", HELP.trim());
                return Ok(());
            }
            other => bail!("unknown argument {other:?}: usage: sandbox [--cluster] [--once]"),
        }
    }
    find_agent_binary()?;
    install_signal_handlers()?;
    if nix::unistd::geteuid().as_raw() != 0 {
        bail!("the sandbox makes network namespaces: run it as root");
    }
    if cluster {
        return run_cluster(once);
    }
    run(once)
}

/// The cluster sandbox (`--cluster`).
fn run_cluster(once: bool) -> anyhow::Result<()> {
    let switch = Switch::new();
    let etcd = Etcd::start(&switch);
    println!(
        "underlay switch {}, etcd at {}",
        switch.ns.name(),
        etcd.url()
    );
    let nodes: Vec<Node> = (1..=3).map(|n| switch.node(n)).collect();
    let names = ["node1", "node2", "node3"];
    let agents: Vec<Agent<'_>> = nodes
        .iter()
        .zip(names)
        .map(|(node, name)| cluster::agent(node, &etcd, name, &[]))
        .collect();
    for (node, agent) in nodes.iter().zip(&agents) {
        println!(
            "{}: {} on {}, agent pid {}, API {}",
            node.node.name(),
            node.node_addr(),
            UPLINK,
            agent.pid().unwrap_or_default(),
            agent.socket().display()
        );
    }
    for agent in &agents {
        let all = wait::within(Duration::from_secs(20), || {
            agent
                .cli_json(["node", "list", "--json"])
                .as_array()
                .is_some_and(|n| n.len() == names.len())
        });
        if !all {
            bail!("the agents did not all see each other within 20 s");
        }
    }
    let pods: Vec<Netns> = nodes.iter().map(|n| n.add_container_netns("pod")).collect();
    let infos: Vec<_> = agents
        .iter()
        .zip(&pods)
        .map(|(agent, pod)| agent.add("pod", pod, &[]))
        .collect();
    let servers: Vec<Server> = pods
        .iter()
        .zip(names)
        .map(|(pod, name)| Server::line_echo(pod, 7000, name))
        .collect();
    show(&agents[0], &["node", "list"]);
    println!(
        "
TCP between the pods (each server prints the source it saw):"
    );
    for (i, pod) in pods.iter().enumerate() {
        for (j, server) in servers.iter().enumerate().filter(|(j, _)| *j != i) {
            let dst = SocketAddr::from((infos[j].addr, 7000));
            let line = format!("hello from {}", names[i]);
            let answer = line_exchange(pod, dst, &line).with_context(|| format!("TCP to {dst}"))?;
            let seen = server
                .peers()
                .last()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            println!(
                "  {} ({}) -> {dst}: {answer:?}, seen from {seen}",
                names[i], infos[i].addr
            );
        }
    }
    show(&agents[0], &["status"]);
    if once {
        println!("\n--once: cleaning up");
        return Ok(());
    }
    let bin = std::env::var("DATAPATH_BIN").unwrap_or_else(|_| "datapath".into());
    println!(
        "\nThe cluster is up. In another shell, try:\n  \
         nsenter --net={pod1} ping -c1 {addr3}\n  \
         {bin} --api-socket {sock} node list\n\
         Ctrl-C cleans everything up.",
        pod1 = pods[0].path().display(),
        addr3 = infos[2].addr,
        sock = agents[0].socket().display(),
    );
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("\nstopping: removing the agents, etcd and the namespaces");
    Ok(())
}

const HELP: &str = "
Builds a node in network namespaces, starts the datapath agent in it, publishes
two containers' ports, sends requests through them and shows what the agent and
its maps hold. --cluster: three such nodes, an underlay and etcd, one container
per node, talking across the nodes. --once: exit after that; otherwise wait for
Ctrl-C. Everything made is removed on exit.";

/// Runs `datapath ARGS` against the agent and prints the command and its
/// output.
fn show(agent: &Agent<'_>, args: &[&str]) {
    println!("\n$ datapath {}", args.join(" "));
    print!("{}", agent.cli_ok(args));
}

fn run(once: bool) -> anyhow::Result<()> {
    let node = Node::new();
    let web1 = node.add_container_netns("web1");
    let web2 = node.add_container_netns("web2");
    println!(
        "node: client {} ({}) ── {} {UPLINK} ({}); containers {} and {}",
        node.client.name(),
        node.client_addr(),
        node.node.name(),
        node.node_addr(),
        web1.name(),
        web2.name()
    );
    let agent = Agent::start(&node);
    println!(
        "agent: pid {} in {}, pool {}, API {}, maps in {}",
        agent.pid().unwrap_or_default(),
        node.node.name(),
        agent.pool(),
        agent.socket().display(),
        agent.bpffs_dir().display()
    );
    let _servers = [
        Server::http(&web1, 80, "web1"),
        Server::http(&web2, 80, "web2"),
        Server::udp_echo(&web2, 53, "web2"),
    ];
    add(&agent, "web1", &web1, &["8080:80"]);
    add(&agent, "web2", &web2, &["8081:80", "5353:53/udp"]);

    println!("\nrequests from the client ({}):", node.client_addr());
    for port in [8080, 8081] {
        let addr = SocketAddr::from((node.node_addr(), port));
        let body = http_get(&node.client, addr, "/").with_context(|| format!("GET {addr}"))?;
        println!("  GET http://{addr}/  ->  200 {}", body.trim_end());
    }
    let addr = SocketAddr::from((node.node_addr(), 5353));
    let answer = udp_request(&node.client, addr, b"hello over udp")
        .with_context(|| format!("UDP to {addr}"))?;
    println!(
        "  UDP {addr} \"hello over udp\"  ->  \"{}\"",
        String::from_utf8_lossy(&answer)
    );

    show(&agent, &["container", "list"]);
    show(&agent, &["conntrack", "list"]);
    let pin = inspect::map_pin(&agent, "SERVICES");
    println!("\n$ bpftool map dump pinned {}", pin.display());
    print!("{}", inspect::map_dump_text(&agent, "SERVICES"));

    if once {
        println!("\n--once: cleaning up");
        return Ok(());
    }
    print_hints(&node, &agent, &web1, &pin);
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("\nstopping: removing the agent, its maps and the namespaces");
    Ok(())
}

#[track_caller]
fn add(agent: &Agent<'_>, name: &str, ns: &Netns, publish: &[&str]) {
    let mut args = vec!["container", "add", name, "--netns", ns.name()];
    for p in publish {
        args.extend(["--publish", p]);
    }
    show(agent, &args);
}

fn print_hints(node: &Node, agent: &Agent<'_>, web1: &Netns, services: &Path) {
    let bin = std::env::var("DATAPATH_BIN").unwrap_or_else(|_| "datapath".into());
    println!(
        "\nThe sandbox is up. In another shell, try:\n  \
         nsenter --net={client} curl -s http://{node_ip}:8080/\n  \
         nsenter --net={client} curl -s http://{node_ip}:8081/\n  \
         nsenter --net={web1} ping -c1 {client_ip}        # masqueraded egress\n  \
         {bin} --api-socket {sock} conntrack list\n  \
         {bin} --api-socket {sock} status\n  \
         bpftool map dump pinned {services}\n\
         Ctrl-C cleans everything up.",
        client = node.client.path().display(),
        node_ip = node.node_addr(),
        web1 = web1.path().display(),
        client_ip = node.client_addr(),
        sock = agent.socket().display(),
        services = services.display(),
    );
}
