//! The namespace harness itself: a node's namespaces are wired as
//! described, entered without hiding bpffs, and removed on every exit path.

use std::{
    os::unix::fs::MetadataExt,
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
    process::Command,
    sync::Mutex,
    time::Duration,
};

use datapath_tests::{
    cgroup::Cgroup,
    leaks,
    lock::TrafficLock,
    names,
    netns::Netns,
    node::{CLIENT_IF, Node, UPLINK, ifindex, mac},
    sys,
};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

#[test]
fn client_pings_the_node_through_the_uplink() {
    let node = Node::new();
    assert!(
        node.client.ping(node.node_addr()),
        "client cannot ping the node"
    );
    // The reply came over the veth: the node learnt the client's MAC on up0.
    let neigh = node.node.exec_ok("ip", ["neigh", "show", "dev", UPLINK]);
    let client_mac = node.client_mac();
    let mac_text = client_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(
        neigh.contains(&node.client_addr().to_string()) && neigh.contains(&mac_text),
        "node's neighbour table: {neigh}"
    );
}

#[test]
fn namespaces_are_isolated_from_each_other() {
    let node = Node::new();
    // The client's interface is not in the node's namespace and vice versa.
    let in_node = node
        .node
        .exec_closure(|| nix::net::if_::if_nametoindex(CLIENT_IF).is_ok());
    let in_client = node
        .client
        .exec_closure(|| nix::net::if_::if_nametoindex(UPLINK).is_ok());
    assert!(!in_node && !in_client);
    // An unrelated address is unreachable: there is no route out.
    assert!(!node.client.ping("198.18.5.5"));
}

#[test]
fn closure_in_the_node_namespace_sees_up0_and_bpffs() {
    let node = Node::new();
    sys::ensure_bpffs();
    let probe = Path::new(sys::BPFFS).join(format!("{}{}-probe", names::PREFIX, node.id()));
    let (up0, addr_on_up0, bpffs_type) = node.node.exec_closure(|| {
        let up0 = nix::net::if_::if_nametoindex(UPLINK).ok();
        // A socket bound to the node's address only works in its namespace.
        let bound = std::net::UdpSocket::bind((node.node_addr(), 0)).is_ok();
        let fs = statfs(sys::BPFFS).map(|s| s.filesystem_type());
        std::fs::create_dir(&probe).expect("mkdir in bpffs from inside the namespace");
        (up0, bound, fs)
    });
    // What the closure made in bpffs is visible outside: one mount namespace.
    let made = probe.is_dir();
    std::fs::remove_dir(&probe).expect("remove the probe directory");
    assert!(
        made,
        "{} made inside is not visible outside",
        probe.display()
    );
    assert!(up0.is_some(), "up0 is missing in the node namespace");
    assert_eq!(up0, Some(ifindex(&node.node, UPLINK)));
    assert!(addr_on_up0, "cannot bind the node address");
    assert_eq!(
        bpffs_type.ok(),
        Some(BPF_FS_MAGIC),
        "/sys/fs/bpf is not bpffs inside the closure"
    );
    // The calling thread stays where it was.
    assert!(std::net::UdpSocket::bind((node.node_addr(), 0)).is_err());
}

#[test]
fn closure_panics_propagate_to_the_caller() {
    let ns = Netns::new_unique();
    let r = catch_unwind(AssertUnwindSafe(|| ns.exec_closure(|| panic!("inside"))));
    let msg = r.expect_err("the panic propagates");
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"inside"));
}

#[test]
fn dropping_a_node_removes_its_namespaces() {
    let node = Node::new();
    let id = node.id().to_owned();
    let names = [node.client.name().to_owned(), node.node.name().to_owned()];
    let ctr = node.add_container_netns("c1");
    let ctr_name = ctr.name().to_owned();
    assert!(Netns::exists(&ctr_name));
    assert_eq!(leaks::leftovers_of(&id).len(), 3);
    drop(ctr);
    drop(node);
    for n in names.iter().chain([&ctr_name]) {
        assert!(!Netns::exists(n), "{n} still exists");
    }
    let listed = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    assert!(
        !listed.contains(&id),
        "ip netns list still shows {id}: {listed}"
    );
    assert!(leaks::leftovers_of(&id).is_empty());
}

#[test]
fn processes_left_in_a_namespace_are_killed_on_drop() {
    let ns = Netns::new_unique();
    let mut child = ns.spawn(Command::new("sleep").arg("600"));
    assert_eq!(ns.pids(), vec![i32::try_from(child.id()).expect("pid")]);
    drop(ns);
    let status = child.wait().expect("wait for sleep");
    assert!(
        !status.success(),
        "sleep was killed, not finished: {status}"
    );
}

#[test]
fn a_panicking_test_body_still_cleans_up() {
    let seen = Mutex::new(Vec::<String>::new());
    let r = catch_unwind(AssertUnwindSafe(|| {
        let node = Node::new();
        let ctr = node.add_container_netns("c1");
        let mut s = seen.lock().expect("not poisoned");
        s.extend([
            node.client.name().to_owned(),
            node.node.name().to_owned(),
            ctr.name().to_owned(),
        ]);
        drop(s);
        panic!("test body fails");
    }));
    assert!(r.is_err());
    let seen = seen.into_inner().expect("not poisoned");
    assert_eq!(seen.len(), 3);
    for n in &seen {
        assert!(!Netns::exists(n), "{n} survived the panic");
    }
}

#[test]
fn client_tx_offload_can_be_turned_off() {
    let node = Node::builder().client_tx_offload(false).build();
    let features = node.client.exec_ok("ethtool", ["-k", CLIENT_IF]);
    assert!(
        features.lines().any(|l| l.trim() == "tx-checksumming: off"),
        "{features}"
    );
    let default = Node::new();
    let features = default.client.exec_ok("ethtool", ["-k", CLIENT_IF]);
    assert!(
        features.lines().any(|l| l.trim() == "tx-checksumming: on"),
        "{features}"
    );
    // Both ends got a MAC address.
    assert_ne!(mac(&node.node, UPLINK), [0; 6]);
}

#[test]
fn traffic_lock_excludes_a_second_holder_until_released() {
    // A private lock file: the shared one may be held by another test run.
    let path = format!("/tmp/{}.lock", datapath_tests::names::unique_name());
    let _cleanup = RemoveOnDrop(path.clone());
    let held = TrafficLock::acquire_at(&path);
    // flock locks belong to open files: a second open in this process
    // contends exactly like another process would.
    assert!(TrafficLock::try_acquire_at(&path).is_none());
    drop(held);
    let again = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(l) = TrafficLock::try_acquire_at(&path) {
                return Some(l);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .join()
    .expect("no panic");
    assert!(again.is_some());
}

/// Removes a file when dropped.
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn cgroup_holds_spawned_processes_and_is_removed_with_them() {
    let ns = Netns::new_unique();
    let cg = Cgroup::new();
    let path = cg.path().to_owned();
    let ino = std::fs::metadata(&path).expect("stat").ino();
    assert_eq!(cg.id(), ino);
    let mut child = ns.spawn(cg.enter(Command::new("sleep").arg("600")));
    let pid = child.id();
    assert_eq!(cg.pids(), vec![pid]);
    // The process is in the namespace too.
    assert_eq!(ns.pids(), vec![i32::try_from(pid).expect("pid")]);
    drop(cg);
    assert!(!path.exists(), "{} survived", path.display());
    assert!(!child.wait().expect("wait").success(), "sleep was killed");
}

#[test]
fn background_thread_serves_tcp_in_the_node_namespace() {
    use std::io::{Read, Write};
    let node = Node::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = std::net::SocketAddr::from((node.node_addr(), 7000));
    let server = node.node.spawn_thread(move || {
        let l = std::net::TcpListener::bind(addr).expect("bind in the node namespace");
        tx.send(()).expect("ready");
        let (mut c, peer) = l.accept().expect("accept");
        c.write_all(b"hi").expect("write");
        peer
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server ready");
    let got = node.client.exec_closure(|| {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .expect("connect from the client");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    });
    assert_eq!(got, "hi");
    let peer = server.join().expect("server thread");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(node.client_addr()));
}
