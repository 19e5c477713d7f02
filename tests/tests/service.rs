//! The agent as a service: the systemd unit in `examples/systemd` (its
//! `ExecStart` run as written, in a namespace node, with `NOTIFY_SOCKET`
//! at a socket of this test), and the configuration file
//! (`examples/systemd/agent.toml`, every flag a key, flags win,
//! `--check-config`).

use std::{
    collections::BTreeMap,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use datapath_tests::{
    agent::{Agent, START_TIMEOUT, datapath_bin},
    names,
    node::Node,
};

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_owned()
}

/// The `[Service]` settings of the example unit (the last value of each).
fn unit_service() -> BTreeMap<String, String> {
    let path = repo().join("examples/systemd/datapath.service");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut section = String::new();
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        if section == "Service"
            && let Some((k, v)) = line.split_once('=')
        {
            out.insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

/// Splits a unit's command line into words the way systemd does for
/// lines without quotes or specifiers (which the example does not use).
fn exec_words(line: &str) -> Vec<String> {
    assert!(
        !line.contains(['"', '\'', '%', '$', '\\']),
        "ExecStart uses quoting or specifiers this test does not parse: {line}"
    );
    line.split_whitespace().map(str::to_owned).collect()
}

/// The flags of `datapath agent` that are settings (keys of the file).
fn agent_settings() -> Vec<String> {
    let out = Command::new(datapath_bin())
        .args(["agent", "--help"])
        .output()
        .expect("datapath agent --help");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut keys: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("-h, ").unwrap_or(l);
            l.strip_prefix("--")
                .and_then(|rest| rest.split([' ', '=', '<']).next())
                .map(str::to_owned)
        })
        // `--timeout` is the client commands' (a global flag).
        .filter(|k| {
            ![
                "config",
                "check-config",
                "cleanup",
                "help",
                "version",
                "timeout",
            ]
            .contains(&k.as_str())
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// `datapath agent ARGS --check-config` with `env`; its stdout parsed as
/// TOML, or its stderr.
fn check_config(args: &[&str], env: &[(&str, &str)]) -> Result<toml_table::Table, String> {
    let out = Command::new(datapath_bin())
        .arg("agent")
        .args(args)
        .arg("--check-config")
        .env_remove("DATAPATH_API_SOCKET")
        .envs(env.iter().copied())
        .output()
        .expect("datapath agent --check-config");
    if out.status.success() {
        Ok(toml_table::parse(&String::from_utf8_lossy(&out.stdout)))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A minimal reader of what `--check-config` prints: `key = "string"`,
/// `key = true|false`, `key = ["a", "b"]`, one per line (comments
/// skipped). The agent writes it with a TOML library; this reads it back
/// independently.
mod toml_table {
    use std::collections::BTreeMap;

    /// Key → value as text (arrays joined with `,`).
    pub type Table = BTreeMap<String, String>;

    pub fn parse(text: &str) -> Table {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l
                    .split_once(" = ")
                    .unwrap_or_else(|| panic!("not `key = value`: {l}"));
                let v = v.trim();
                let v = match v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
                    Some(items) => items
                        .split(',')
                        .map(|i| i.trim().trim_matches('"'))
                        .filter(|i| !i.is_empty())
                        .collect::<Vec<_>>()
                        .join(","),
                    None => v.trim_matches('"').to_owned(),
                };
                (k.to_owned(), v)
            })
            .collect()
    }
}

/// A value for each setting, none of them the default.
fn every_key(dir: &Path) -> Vec<(&'static str, String)> {
    let d = dir.display();
    vec![
        ("uplink", "\"up9\"".into()),
        ("node-ip", "\"198.18.7.2\"".into()),
        ("pool", "\"10.99.0.0/20\"".into()),
        ("pool6", "\"fd00:99::/64\"".into()),
        ("xdp-mode", "\"off\"".into()),
        (
            "bpffs-dir",
            format!(
                "\"/sys/fs/bpf/{}\"",
                dir.file_name().unwrap_or_default().to_string_lossy()
            ),
        ),
        ("state-dir", format!("\"{d}/state\"")),
        ("api-socket", format!("\"{d}/api.sock\"")),
        ("snat-ports", "\"40000-40999\"".into()),
        ("no-masquerade", "true".into()),
        (
            "non-masquerade-cidr",
            "[\"10.96.0.0/12\", \"10.244.0.0/16\"]".into(),
        ),
        ("ct-max", "4096".into()),
        ("ct-container-share", "30".into()),
        ("allow-direct-routing", "true".into()),
        ("mtu", "1400".into()),
        ("ct-timeout-tcp", "\"2h\"".into()),
        ("ct-timeout-tcp-close", "\"7s\"".into()),
        ("ct-timeout-tcp-syn", "\"20s\"".into()),
        ("ct-timeout-udp", "\"10s\"".into()),
        ("ct-timeout-udp-stream", "\"90s\"".into()),
        ("ct-timeout-icmp", "\"15s\"".into()),
        ("kernel-debug-logs", "true".into()),
        ("metrics", "\"127.0.0.1:9465\"".into()),
        ("bpf-stats", "true".into()),
        ("cluster-store", "[\"http://198.18.7.1:2379\"]".into()),
        ("node-name", "\"n7\"".into()),
        ("cluster-cidr", "\"198.19.0.0/16\"".into()),
        ("node-cidr-size", "26".into()),
        ("cluster-wait", "true".into()),
        ("cluster-lease-ttl", "\"9s\"".into()),
        ("socket-cgroup", "\"none\"".into()),
    ]
}

/// A temporary directory of this test, removed on drop.
struct TmpDir(PathBuf);

impl TmpDir {
    fn new() -> Self {
        let dir = Path::new("/tmp").join(names::unique_name());
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_configuration_file_sets_every_flag_and_flags_win() {
    let tmp = TmpDir::new();
    let file = tmp.0.join("agent.toml");
    let keys = every_key(&tmp.0);
    // Every setting of `datapath agent --help` is here, and nothing else.
    let mut listed: Vec<String> = keys.iter().map(|(k, _)| (*k).to_owned()).collect();
    listed.sort();
    assert_eq!(
        listed,
        agent_settings(),
        "a flag without a key, or the other way"
    );
    let text: String = keys.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
    std::fs::write(&file, &text).expect("write the configuration");
    let path = file.to_string_lossy().into_owned();

    // Every key took effect.
    let got = check_config(&["--config", &path], &[]).unwrap_or_else(|e| panic!("{e}"));
    let want = toml_table::parse(&text);
    assert_eq!(got, want, "the file:\n{text}");

    // Flags (and the environment) win over the file.
    let got = check_config(
        &[
            "--config",
            &path,
            "--pool",
            "10.55.0.0/16",
            "--non-masquerade-cidr",
            "10.0.0.0/8",
        ],
        &[("DATAPATH_API_SOCKET", "/tmp/elsewhere.sock")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got["pool"], "10.55.0.0/16");
    assert_eq!(got["non-masquerade-cidr"], "10.0.0.0/8");
    assert_eq!(got["api-socket"], "/tmp/elsewhere.sock");
    assert_eq!(got["ct-max"], "4096");

    // The example file, every line uncommented, is a valid configuration
    // with every key.
    let example = std::fs::read_to_string(repo().join("examples/systemd/agent.toml"))
        .expect("examples/systemd/agent.toml");
    let uncommented: String = example
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter(|l| l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&file, &uncommented).expect("write the example");
    let got = check_config(&["--config", &path], &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        agent_settings(),
        "the example does not show every key:\n{uncommented}"
    );

    // Mistakes are named.
    for (bad, says) in [
        ("pool = \"10.1.0.0/33\"\n", "--pool"),
        ("colour = \"blue\"\n", "unknown key \"colour\""),
        ("no-masquerade = \"yes\"\n", "true or false"),
        ("pool = [\"10.1.0.0/16\"]\n", "not an array"),
        ("pool = \"10.1.0.0/31\"\n", "/30"),
        ("pool = \n", "agent.toml"),
    ] {
        std::fs::write(&file, bad).expect("write");
        let err = check_config(&["--config", &path], &[]).expect_err(bad);
        assert!(err.contains(says), "{bad}: {err}");
    }
    let missing = tmp.0.join("missing.toml");
    let err = check_config(&["--config", &missing.to_string_lossy()], &[])
        .expect_err("a missing --config file");
    assert!(err.contains("missing.toml"), "{err}");
}

#[test]
fn the_units_exec_start_runs_the_agent_which_tells_systemd_once_it_serves() {
    let unit = unit_service();
    assert_eq!(unit.get("Type").map(String::as_str), Some("notify"));
    assert_eq!(unit.get("Restart").map(String::as_str), Some("on-failure"));
    // The API socket's default directory is the unit's runtime directory.
    assert_eq!(
        unit.get("RuntimeDirectory").map(String::as_str),
        Some("datapath")
    );
    let default_socket =
        check_config(&[], &[]).unwrap_or_else(|e| panic!("{e}"))["api-socket"].clone();
    assert_eq!(default_socket, "/run/datapath/api.sock");
    let words = exec_words(unit.get("ExecStart").expect("ExecStart"));
    assert!(
        words[0].ends_with("/datapath") && Path::new(&words[0]).is_absolute(),
        "{words:?}"
    );
    let config = "/etc/datapath/agent.toml";
    assert!(words.iter().any(|w| w == config), "{words:?}");

    // The unit's command line, with this build's binary and a
    // configuration file of this test in place of /etc's.
    let tmp = TmpDir::new();
    let file = tmp.0.join("agent.toml");
    std::fs::write(
        &file,
        "ct-max = 4096\nnon-masquerade-cidr = [\"10.96.0.0/12\"]\n",
    )
    .expect("write the configuration");
    let args: Vec<String> = words[1..]
        .iter()
        .map(|w| {
            if w == config {
                file.to_string_lossy().into_owned()
            } else {
                w.clone()
            }
        })
        .collect();
    let notify_path = tmp.0.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify
        .set_read_timeout(Some(START_TIMEOUT))
        .expect("a read timeout");
    let node = Node::new();
    let mut agent = Agent::builder(&node)
        .command(args)
        .env("NOTIFY_SOCKET", notify_path.to_string_lossy())
        .spawn();

    // READY=1 comes once the maps are pinned and the API answers.
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no notification within {START_TIMEOUT:?}: {e}\n{}",
            agent.log()
        )
    });
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        message.lines().any(|l| l == "READY=1"),
        "not READY=1: {message:?}"
    );
    assert!(
        agent.bpffs_dir().join("maps/CONFIG").exists(),
        "READY before the maps were pinned"
    );
    let status = agent.cli_json(["status", "--json"]);
    assert_eq!(
        status["conntrack_max"], 4096,
        "the file's ct-max: {status:#}"
    );
    agent.wait_api();

    // On SIGTERM it says it is stopping, and exits cleanly.
    assert!(
        agent.stop(),
        "the agent did not exit cleanly:\n{}",
        agent.log()
    );
    notify
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    let n = notify.recv(&mut buf).expect("a notification when stopping");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        message.lines().any(|l| l == "STOPPING=1"),
        "not STOPPING=1: {message:?}"
    );
}
