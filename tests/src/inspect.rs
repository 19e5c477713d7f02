//! Looking at what the agent made, with the tools an operator would use:
//! `bpftool` on its pinned maps, `ip` on the namespaces.
//!
//! ```no_run
//! use datapath_tests::{agent::Agent, inspect, node::Node};
//!
//! let node = Node::new();
//! let agent = Agent::start(&node);
//! let services = inspect::map_dump(&agent, "SERVICES");
//! assert!(services.is_empty());
//! assert_eq!(inspect::links(&node.node), ["lo", "up0"]);
//! ```

use std::{path::PathBuf, process::Command};

use serde_json::Value;

use crate::{agent::Agent, netns::Netns};

/// The pin of map `name` of `agent` (`<bpffs>/maps/<name>`).
pub fn map_pin(agent: &Agent<'_>, name: &str) -> PathBuf {
    agent.bpffs_dir().join("maps").join(name)
}

/// The capacity of pinned map `name` of `agent`, as the kernel reports it.
pub fn map_max_entries(agent: &Agent<'_>, name: &str) -> u32 {
    let pin = map_pin(agent, name);
    aya::maps::MapInfo::from_pin(&pin)
        .unwrap_or_else(|e| panic!("map info of {}: {e}", pin.display()))
        .max_entries()
}

/// `bpftool map dump pinned <pin>` as bpftool prints it (with BTF: named
/// fields).
pub fn map_dump_text(agent: &Agent<'_>, name: &str) -> String {
    let pin = map_pin(agent, name);
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool: {e}"));
    assert!(
        out.status.success(),
        "bpftool map dump pinned {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The entries of map `name` of `agent` as bpftool decodes them with BTF:
/// `{"key": {...}, "value": {...}}` objects with named fields.
pub fn map_dump(agent: &Agent<'_>, name: &str) -> Vec<Value> {
    let pin = map_pin(agent, name);
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .unwrap_or_else(|e| panic!("running bpftool: {e}"));
    assert!(
        out.status.success(),
        "bpftool -j map dump pinned {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool output is not JSON ({e})"));
    v.as_array()
        .unwrap_or_else(|| panic!("bpftool printed no list: {v}"))
        .iter()
        .map(|e| {
            e.get("formatted")
                .cloned()
                .unwrap_or_else(|| panic!("map {name} dumps without BTF: {e}"))
        })
        .collect()
}

/// A dotted-quad address from a bpftool address array (`[198,19,0,2]`).
pub fn addr_of(v: &Value) -> Option<std::net::Ipv4Addr> {
    let a = v.as_array()?;
    let b: Vec<u8> = a
        .iter()
        .map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
        .collect::<Option<_>>()?;
    let b: [u8; 4] = b.try_into().ok()?;
    Some(b.into())
}

/// The names of the interfaces in `ns`, sorted.
pub fn links(ns: &Netns) -> Vec<String> {
    let out = ns.exec_ok("ip", ["-j", "link", "show"]);
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("`ip -j link` output: {e}"));
    let mut names: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The IPv4 addresses (with prefix length) of every interface in `ns`, as
/// `(ifname, "a.b.c.d/len")`.
pub fn ipv4_addrs(ns: &Netns) -> Vec<(String, String)> {
    let out = ns.exec_ok("ip", ["-j", "-4", "addr", "show"]);
    let v: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("`ip -j addr` output: {e}"));
    let mut all = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        let ifname = link["ifname"].as_str().unwrap_or_default().to_owned();
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                all.push((ifname.clone(), format!("{local}/{len}")));
            }
        }
    }
    all
}

/// The tools that list every rule of a namespace's firewall: both iptables
/// backends and nftables. A node "without rules" is only known to be so if
/// all of them ran.
pub const FIREWALL_TOOLS: [&str; 3] = ["iptables-legacy-save", "iptables-nft-save", "nft"];

/// Every firewall rule in `ns`: the `-A` lines of both iptables backends
/// and the nftables rule set (tables included: a table alone is a change
/// too). `Err` if a tool is missing or fails: a check that cannot look
/// must not pass.
pub fn firewall_rules(ns: &Netns) -> Result<Vec<String>, String> {
    let mut found = Vec::new();
    for tool in &FIREWALL_TOOLS[..2] {
        if crate::netns::which(tool).is_none() {
            return Err(format!(
                "{tool} is not installed (Debian package iptables): the firewall cannot be checked"
            ));
        }
        let out = ns.exec(tool, std::iter::empty::<&str>());
        if !out.status.success() {
            return Err(format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        found.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A"))
                .map(|l| format!("{tool}: {l}")),
        );
    }
    let out = ns.exec("nft", ["list", "ruleset"]);
    if !out.status.success() {
        return Err(format!(
            "nft list ruleset failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    found.extend(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("nft: {l}")),
    );
    Ok(found)
}

/// Asserts that `ns` has no firewall rule at all ([`firewall_rules`]);
/// `when` says at which point of the test.
#[track_caller]
pub fn assert_no_firewall(ns: &Netns, when: &str) {
    match firewall_rules(ns) {
        Ok(rules) if rules.is_empty() => {}
        Ok(rules) => panic!(
            "{} has firewall rules {when}:\n{}",
            ns.name(),
            rules.join("\n")
        ),
        Err(e) => panic!("{e}"),
    }
}

/// Every entry of the agent's pinned hash map `name`, read through its pin
/// with the layouts of `datapath_common`.
pub fn pinned_hash<K: aya::Pod, V: aya::Pod>(agent: &Agent<'_>, name: &str) -> Vec<(K, V)> {
    let path = agent.bpffs_dir().join("maps").join(name);
    let data = aya::maps::MapData::from_pin(&path)
        .unwrap_or_else(|e| panic!("open pin {}: {e}", path.display()));
    let map: aya::maps::HashMap<_, K, V> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))
            .unwrap_or_else(|e| panic!("map {name}: {e}"));
    map.iter()
        .map(|r| r.unwrap_or_else(|e| panic!("reading {name}: {e}")))
        .collect()
}

/// The IPv4 addresses of `ifname` in `ns` (none if there is no such
/// interface).
pub fn addrs_of(ns: &Netns, ifname: &str) -> Vec<std::net::Ipv4Addr> {
    ipv4_addrs(ns)
        .into_iter()
        .filter(|(i, _)| i == ifname)
        .filter_map(|(_, a)| a.split('/').next()?.parse().ok())
        .collect()
}

/// The host ends of the veth pairs the agent made in `ns` (`dp<hex id>`).
pub fn agent_veths(ns: &Netns) -> std::collections::BTreeSet<String> {
    links(ns)
        .into_iter()
        .filter(|n| {
            n.strip_prefix("dp")
                .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .collect()
}
