//! Published ports with iptables (legacy or nf_tables), as Docker and CNI
//! portmap install them, and with one nftables map.
//!
//! Both run their commands in the node namespace only.

use std::{
    io::Write,
    net::Ipv4Addr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Backend, Mapping, UNDER_TEST, UPDATE_PORT, filler_ports};
use crate::{
    netns::Netns,
    node::{Node, UPLINK},
};

/// Runs `program args` in `ns` with `input` on its stdin; fails with its
/// stderr unless it succeeds.
fn run_with_input(ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = ns
        .command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} in {}", ns.name()))?;
    child
        .stdin
        .take()
        .context("stdin is piped")?
        .write_all(input.as_bytes())
        .with_context(|| format!("feeding {program}"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} in {} failed: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `program args` in `ns` and returns how long it took; fails with its
/// stderr unless it succeeds.
fn timed(ns: &Netns, program: &str, args: &[String]) -> Result<Duration> {
    let mut cmd = ns.command(program);
    cmd.args(args).stdin(Stdio::null());
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("starting {program} in {}", ns.name()))?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "{program} {args:?} in {} failed: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// Forgets every netfilter connection of the node (`conntrack -F`).
fn flush_nf_conntrack(node: &Node) -> Result<()> {
    let out = node.node.exec("conntrack", ["-F"]);
    if !out.status.success() {
        bail!(
            "conntrack -F in {}: {}",
            node.node.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The chain the per-port DNAT rules live in.
const CHAIN: &str = "BENCH-DNAT";

/// Published ports as iptables rules: `PREROUTING -m addrtype --dst-type
/// LOCAL -j BENCH-DNAT`, one DNAT rule per port in BENCH-DNAT (fillers
/// first, the ports under test last), MASQUERADE of the pool out of the
/// uplink.
#[derive(Debug)]
pub struct Iptables<'n> {
    node: &'n Node,
    /// `iptables-legacy` or `iptables`.
    tool: &'static str,
    pool: String,
    target: Ipv4Addr,
    filler: Ipv4Addr,
    fillers: usize,
}

impl<'n> Iptables<'n> {
    /// Installs the rules for the ports under test (leading to `target`)
    /// with `tool` (`iptables-legacy` or `iptables`). `filler` is where the
    /// filler ports lead (never reached).
    pub fn new(
        node: &'n Node,
        tool: &'static str,
        pool: &str,
        target: Ipv4Addr,
        filler: Ipv4Addr,
    ) -> Result<Self> {
        let me = Self {
            node,
            tool,
            pool: pool.to_owned(),
            target,
            filler,
            fillers: 0,
        };
        me.load(0)?;
        Ok(me)
    }

    fn rule(m: &Mapping, to: Ipv4Addr) -> String {
        let p = m.proto;
        format!(
            "-A {CHAIN} -p {p} -m {p} --dport {} -j DNAT --to-destination {to}:{}",
            m.host_port, m.ctr_port
        )
    }

    /// The whole nat table with `fillers` filler rules.
    fn table(&self, fillers: usize) -> String {
        let mut t = String::with_capacity(100 * (fillers + 10));
        t.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        t.push_str(&format!(":POSTROUTING ACCEPT [0:0]\n:{CHAIN} - [0:0]\n"));
        t.push_str(&format!(
            "-A PREROUTING -m addrtype --dst-type LOCAL -j {CHAIN}\n"
        ));
        t.push_str(&format!(
            "-A POSTROUTING -s {} -o {UPLINK} -j MASQUERADE\n",
            self.pool
        ));
        for port in filler_ports(fillers) {
            let m = Mapping::tcp(port, port);
            t.push_str(&Self::rule(&m, self.filler));
            t.push('\n');
        }
        for m in UNDER_TEST {
            t.push_str(&Self::rule(&m, self.target));
            t.push('\n');
        }
        t.push_str("COMMIT\n");
        t
    }

    fn load(&self, fillers: usize) -> Result<()> {
        let restore = format!("{}-restore", self.tool);
        run_with_input(&self.node.node, &restore, &[], &self.table(fillers))
    }

    fn update_rule(&self, op: &str) -> Vec<String> {
        let m = Mapping::tcp(UPDATE_PORT, 80);
        let rule = Self::rule(&m, self.filler);
        let mut args = vec!["-t".to_owned(), "nat".to_owned()];
        args.extend(
            rule.replacen("-A", op, 1)
                .split_whitespace()
                .map(str::to_owned),
        );
        args
    }
}

impl Backend for Iptables<'_> {
    fn set_fillers(&mut self, n: usize) -> Result<()> {
        self.load(n)?;
        self.fillers = n;
        Ok(())
    }

    fn time_add(&mut self) -> Result<Duration> {
        timed(&self.node.node, self.tool, &self.update_rule("-A"))
    }

    fn time_del(&mut self) -> Result<Duration> {
        timed(&self.node.node, self.tool, &self.update_rule("-D"))
    }

    fn flush_conntrack(&self) -> Result<()> {
        flush_nf_conntrack(self.node)
    }

    fn describe(&self) -> String {
        format!(
            "{}: {} DNAT rules in nat/{CHAIN}, MASQUERADE",
            self.tool,
            self.fillers + UNDER_TEST.len()
        )
    }
}

/// The nftables table's name.
const TABLE: &str = "bench";

/// Published ports as one nftables map: `dnat ip to meta l4proto . th
/// dport map @ports` for local destinations, masquerade of the pool out of
/// the uplink.
#[derive(Debug)]
pub struct NftMap<'n> {
    node: &'n Node,
    target: Ipv4Addr,
    filler: Ipv4Addr,
    fillers: usize,
}

impl<'n> NftMap<'n> {
    /// Creates the table with the ports under test (leading to `target`);
    /// filler ports lead to `filler`.
    pub fn new(node: &'n Node, pool: &str, target: Ipv4Addr, filler: Ipv4Addr) -> Result<Self> {
        let table = format!(
            "table ip {TABLE} {{\n\
             \tmap ports {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}\n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tfib daddr type local dnat ip to meta l4proto . th dport map @ports\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {pool} oifname \"{UPLINK}\" masquerade\n\
             \t}}\n\
             }}\n"
        );
        run_with_input(&node.node, "nft", &["-f", "-"], &table)?;
        let mut me = Self {
            node,
            target,
            filler,
            fillers: 0,
        };
        me.set_fillers(0)?;
        Ok(me)
    }

    fn element(m: &Mapping, to: Ipv4Addr) -> String {
        format!("{} . {} : {to} . {}", m.proto, m.host_port, m.ctr_port)
    }
}

impl Backend for NftMap<'_> {
    fn set_fillers(&mut self, n: usize) -> Result<()> {
        let mut elements: Vec<String> = filler_ports(n)
            .map(|p| Self::element(&Mapping::tcp(p, p), self.filler))
            .collect();
        elements.extend(UNDER_TEST.iter().map(|m| Self::element(m, self.target)));
        let script = format!(
            "flush map ip {TABLE} ports\nadd element ip {TABLE} ports {{ {} }}\n",
            elements.join(", ")
        );
        run_with_input(&self.node.node, "nft", &["-f", "-"], &script)?;
        self.fillers = n;
        Ok(())
    }

    fn time_add(&mut self) -> Result<Duration> {
        let e = Self::element(&Mapping::tcp(UPDATE_PORT, 80), self.filler);
        let args = [
            "add",
            "element",
            "ip",
            TABLE,
            "ports",
            &format!("{{ {e} }}"),
        ];
        timed(&self.node.node, "nft", &args.map(str::to_owned))
    }

    fn time_del(&mut self) -> Result<Duration> {
        let key = format!("{{ tcp . {UPDATE_PORT} }}");
        let args = ["delete", "element", "ip", TABLE, "ports", &key];
        timed(&self.node.node, "nft", &args.map(str::to_owned))
    }

    fn flush_conntrack(&self) -> Result<()> {
        flush_nf_conntrack(self.node)
    }

    fn describe(&self) -> String {
        format!(
            "nft: {} elements in one DNAT map, masquerade",
            self.fillers + UNDER_TEST.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_update_rule_is_the_filler_rule_for_the_update_port() {
        let line = Iptables::rule(&Mapping::tcp(UPDATE_PORT, 80), Ipv4Addr::new(198, 19, 0, 9));
        assert_eq!(
            line,
            format!(
                "-A {CHAIN} -p tcp -m tcp --dport {UPDATE_PORT} -j DNAT --to-destination 198.19.0.9:80"
            )
        );
        let e = NftMap::element(&Mapping::udp(15201, 5201), Ipv4Addr::new(198, 19, 0, 2));
        assert_eq!(e, "udp . 15201 : 198.19.0.2 . 5201");
    }
}
