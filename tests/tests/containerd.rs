//! containerd drives the datapath through the CNI plugin: `ctr run --cni`
//! with the project's conflist (`examples/cni/containerd.conflist`, its
//! socket and pool set to the test agent's), containerd 1.6 from Debian
//! started by the test with its own socket, root and state directories and
//! the CRI plugin off.
//!
//! Everything runs in a [`Sandbox`] around the node namespace: `ctr`
//! reads the CNI configuration from `/etc/cni/net.d` and runs plugins from
//! `/opt/cni/bin` (it has no flags for them), containerd keeps shim
//! sockets and runc state under `/run`, and libcni caches results in
//! `/var/lib/cni` — all the sandbox's. No registry is reachable: the image
//! is built here (an OCI layout of one layer with busybox-static) and
//! imported. Its containers live under the cgroup `/dpt-<node id>-ctr`.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use datapath_tests::{
    agent::{Agent, datapath_bin},
    cgroup::remove_everywhere,
    inspect::assert_no_firewall,
    names,
    netns::which,
    node::Node,
    sandbox::Sandbox,
    traffic::Server,
    wait,
};
use serde_json::{Value, json};

/// The image's name.
const IMAGE: &str = "docker.io/library/dpt-busybox:latest";

/// `sha256:<hex>` of `path`, and its size.
fn digest(path: &Path) -> (String, u64) {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().expect("a digest").to_owned();
    let size = fs::metadata(path).expect("a blob").len();
    (format!("sha256:{hex}"), size)
}

/// Writes `bytes` as a blob of the OCI layout at `oci`; returns its
/// descriptor's digest and size.
fn blob(oci: &Path, tmp: &Path, bytes: &[u8]) -> (String, u64) {
    fs::write(tmp, bytes).expect("write a blob");
    let (digest, size) = digest(tmp);
    let hex = digest.trim_start_matches("sha256:");
    fs::rename(tmp, oci.join("blobs/sha256").join(hex)).expect("store a blob");
    (digest, size)
}

/// An OCI image archive of busybox-static at `dir/image.tar`.
fn busybox_image(dir: &Path) -> PathBuf {
    let busybox = which("busybox").expect("busybox is not installed (busybox-static)");
    let rootfs = dir.join("image/rootfs");
    let oci = dir.join("image/oci");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        fs::create_dir_all(rootfs.join(d)).expect("the image's rootfs");
    }
    fs::create_dir_all(oci.join("blobs/sha256")).expect("the OCI layout");
    fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    let layer = dir.join("image/layer.tar");
    let out = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
        .arg(&layer)
        .arg("-C")
        .arg(&rootfs)
        .arg(".")
        .output()
        .expect("tar");
    assert!(out.status.success(), "tar the layer");
    let (layer_digest, layer_size) = digest(&layer);
    fs::rename(
        &layer,
        oci.join("blobs/sha256")
            .join(layer_digest.trim_start_matches("sha256:")),
    )
    .expect("store the layer");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let tmp = dir.join("image/blob");
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(&oci, &tmp, config.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = blob(&oci, &tmp, manifest.to_string().as_bytes());
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    });
    fs::write(oci.join("index.json"), index.to_string()).expect("index.json");
    fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let archive = dir.join("image.tar");
    let out = Command::new("tar")
        .args(["--numeric-owner", "-cf"])
        .arg(&archive)
        .arg("-C")
        .arg(&oci)
        .arg(".")
        .output()
        .expect("tar");
    assert!(out.status.success(), "tar the image");
    archive
}

/// containerd in a sandbox around `agent`'s node, with the image
/// imported and the plugin and conflist where `ctr` looks for them.
struct Containerd<'n> {
    sandbox: Sandbox<'n>,
    dir: PathBuf,
    daemon: Option<Child>,
    namespace: String,
    cgroup_parent: String,
}

impl<'n> Containerd<'n> {
    /// containerd with the project's conflist, at `cni_version` if given
    /// (instead of the list's own).
    fn start(agent: &Agent<'n>, cni_version: Option<&str>) -> Self {
        for tool in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
            assert!(
                which(tool).is_some(),
                "{tool} is not installed: `apt-get install containerd runc` (cargo xtask bootstrap does)"
            );
        }
        let node = agent.node();
        let tag = format!("{}{}-ctr", names::PREFIX, node.id());
        let dir = Path::new("/tmp").join(&tag);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("containerd's directory");
        let d = dir.display();
        fs::write(
            dir.join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
"#
            ),
        )
        .expect("config.toml");
        // The project's conflist, pointed at this test's agent.
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the repository");
        let mut conflist: Value = serde_json::from_str(
            &fs::read_to_string(repo.join("examples/cni/containerd.conflist"))
                .expect("examples/cni/containerd.conflist"),
        )
        .expect("a JSON conflist");
        conflist["plugins"][0]["agentSocket"] = json!(agent.socket());
        conflist["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": agent.pool()}]]);
        if let (Some(v), Some(list)) = (cni_version, conflist.as_object_mut()) {
            list.insert("cniVersion".into(), json!(v));
            list.remove("cniVersions");
        }
        fs::write(dir.join("datapath.conflist"), conflist.to_string()).expect("the conflist");
        let plugin = datapath_bin()
            .parent()
            .map(|p| p.join("datapath-cni"))
            .expect("a binary directory");
        let image = busybox_image(&dir);

        let sandbox = Sandbox::builder(node).dir(&dir).start();
        sandbox.run_ok(&format!(
            "sh -c 'mkdir -p /opt/cni/bin /etc/cni/net.d && \
             cp {} /opt/cni/bin/datapath-cni && \
             cp {d}/datapath.conflist /etc/cni/net.d/10-datapath.conflist'",
            plugin.display()
        ));
        let daemon = sandbox.spawn(
            &format!("containerd --config {d}/config.toml"),
            &dir.join("containerd.log"),
        );
        let c = Self {
            sandbox,
            dir,
            daemon: Some(daemon),
            namespace: tag.clone(),
            cgroup_parent: format!("/{tag}"),
        };
        let up = wait::within(Duration::from_secs(20), || {
            c.ctr_raw("version").status.success()
        });
        assert!(up, "containerd did not start:\n{}", c.log());
        c.ctr(&format!(
            "images import --snapshotter native {}",
            image.display()
        ));
        let images = c.ctr("images ls -q");
        assert!(
            images.contains(IMAGE),
            "the image was not imported: {images}"
        );
        c
    }

    fn ctr_line(&self, args: &str) -> String {
        format!(
            "ctr --address {}/containerd.sock --namespace {} {args}",
            self.dir.display(),
            self.namespace
        )
    }

    fn ctr_raw(&self, args: &str) -> std::process::Output {
        self.sandbox.run(&self.ctr_line(args))
    }

    #[track_caller]
    fn ctr(&self, args: &str) -> String {
        self.sandbox.run_ok(&self.ctr_line(args))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr run --cni --rm` of `script` (a shell line for busybox sh) as
    /// container `id`, in the foreground (it detaches the network when the
    /// task exits); its output lines arrive on the returned channel.
    fn run(&self, id: &str, script: &str) -> (Child, mpsc::Receiver<String>) {
        let line = self.ctr_line(&format!(
            "run --cni --rm --snapshotter native --cgroup {}/{id} {IMAGE} {id} \
             /bin/busybox sh -c '{script}'",
            self.cgroup_parent
        ));
        let mut child = self
            .sandbox
            .command(&line)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        let (tx, rx) = mpsc::channel();
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
            });
        }
        (child, rx)
    }
}

impl Drop for Containerd<'_> {
    fn drop(&mut self) {
        // Tasks and containers first: their shims exit with them.
        let list = self.ctr_raw("containers ls -q");
        for id in String::from_utf8_lossy(&list.stdout).split_whitespace() {
            let _ = self.ctr_raw(&format!("tasks kill --signal SIGKILL {id}"));
            let _ = self.ctr_raw(&format!("tasks rm --force {id}"));
            let _ = self.ctr_raw(&format!("containers rm {id}"));
        }
        if let Some(mut daemon) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(daemon.id()).unwrap_or(i32::MAX)),
                nix::sys::signal::Signal::SIGTERM,
            );
            let stopped = wait::within(Duration::from_secs(5), || {
                daemon.try_wait().ok().flatten().is_some()
            });
            if !stopped {
                let _ = daemon.kill();
            }
            let _ = daemon.wait();
        }
        remove_everywhere(&self.cgroup_parent);
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: removing {}: {e}", self.dir.display());
        }
    }
}

/// The next line from `rx` that `want` accepts, within `timeout`.
fn line_where(
    rx: &mpsc::Receiver<String>,
    timeout: Duration,
    seen: &mut Vec<String>,
    want: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        let line = rx.recv_timeout(left).ok()?;
        seen.push(line.clone());
        if want(&line) {
            return Some(line);
        }
    }
}

#[test]
fn ctr_run_with_the_cni_plugin_gets_an_address_masquerades_and_detaches_on_exit() {
    run_attach_masquerade_detach(None);
}

/// The conflists of containerd 1.6's own documentation and install
/// scripts say `"cniVersion": "0.4.0"`.
#[test]
fn ctr_run_with_a_0_4_0_conflist_works_the_same() {
    run_attach_masquerade_detach(Some("0.4.0"));
}

fn run_attach_masquerade_detach(cni_version: Option<&str>) {
    let node = Node::new();
    let agent = Agent::start(&node);
    let containerd = Containerd::start(&agent, cni_version);
    let _server = Server::http(&node.client, 7000, "outside");
    let url = format!("http://{}:7000/", node.client_addr());
    let (mut ctr, lines) = containerd.run(
        "c1",
        &format!(
            "/bin/busybox ip -4 -o addr show dev eth0; \
             /bin/busybox wget -q -O - {url}; \
             exec /bin/busybox sleep 120"
        ),
    );
    let mut seen = Vec::new();
    let timeout = Duration::from_secs(30);

    // The task's eth0 has the address the agent gave the attachment.
    let inet = line_where(&lines, timeout, &mut seen, |l| l.contains(" inet "))
        .unwrap_or_else(|| panic!("no address printed: {seen:#?}\n{}", containerd.log()));
    let addr = inet
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .expect("an address")
        .to_owned();
    let list = agent.containers();
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0].addr.to_string(), addr, "{:#}", list[0].json);
    assert!(list[0].name.starts_with("cni-"), "{}", list[0].name);
    assert!(
        list[0].json["netns"]
            .as_str()
            .is_some_and(|n| n.starts_with("/proc/") && n.ends_with("/ns/net")),
        "{:#}",
        list[0].json
    );
    let host_veth = list[0].host_ifname.clone();

    // Its traffic to the outside leaves with the node's address.
    let answer = line_where(&lines, timeout, &mut seen, |l| l.contains("hello "))
        .unwrap_or_else(|| panic!("no answer from outside: {seen:#?}"));
    assert!(
        answer.starts_with(&format!("outside port 7000: hello {}:", node.node_addr())),
        "not masqueraded: {answer}"
    );
    assert!(
        agent
            .flows()
            .iter()
            .any(|f| f["kind"] == "snat" && f["orig_src"]["addr"] == addr.as_str()),
        "no masquerade flow of {addr}: {:#?}",
        agent.flows()
    );
    assert_no_firewall(&node.node, "while the task ran");

    // The task exits: ctr runs DEL, and nothing of the attachment is left.
    containerd.ctr("tasks kill --signal SIGKILL c1");
    let exited = wait::within(timeout, || ctr.try_wait().ok().flatten().is_some());
    assert!(exited, "ctr run did not return after the task exited");
    let detached = wait::within(Duration::from_secs(5), || agent.containers().is_empty());
    assert!(detached, "still attached: {:#?}", agent.containers());
    let links = node.node.exec_ok("ip", ["-o", "link", "show"]);
    assert!(
        !links.contains(&format!("{host_veth}@")),
        "{host_veth} survived:\n{links}"
    );
    assert_eq!(
        containerd.ctr("containers ls -q").trim(),
        "",
        "--rm left it"
    );
}
