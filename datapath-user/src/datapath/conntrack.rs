//! Userspace side of connection tracking: reading flows, flushing them,
//! and garbage-collecting expired ones (which frees their masquerade ports).

use std::{collections::HashMap as StdHashMap, net::Ipv4Addr};

use aya::maps::{HashMap, MapData, MapError};
use datapath_common::{
    CT_F_ORIGINAL, CtEntry, CtKey,
    ct::{CtState, Timeouts},
    ct_action, proto,
};

use crate::model::{Flow, FlowEndpoint};

/// The kernel's `bpf_ktime_get_ns` clock (CLOCK_MONOTONIC), in ns.
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// One flow: its original-direction entry and, if present, its reply entry.
pub struct FlowEntries {
    /// Key of the original direction.
    pub key: CtKey,
    /// Original-direction entry.
    pub orig: CtEntry,
    /// Key of the reply direction.
    pub reply_key: CtKey,
    /// Reply-direction entry.
    pub reply: Option<CtEntry>,
}

impl FlowEntries {
    /// The flow's state.
    pub fn state(&self) -> CtState {
        let (rf, replied) = self
            .reply
            .map_or((0, false), |r| (r.tcp_flags, r.packets > 0));
        CtState::of(self.key.proto, self.orig.tcp_flags, rf, replied)
    }

    /// Last packet time in either direction.
    pub fn last_seen_ns(&self) -> u64 {
        self.reply.map_or(self.orig.last_seen_ns, |r| {
            r.last_seen_ns.max(self.orig.last_seen_ns)
        })
    }
}

/// Reads every flow. Reply entries whose original entry is gone are
/// returned separately (as keys) so the collector can remove them.
pub fn read_flows(
    ct: &HashMap<MapData, CtKey, CtEntry>,
) -> Result<(Vec<FlowEntries>, Vec<CtKey>), MapError> {
    let mut all: StdHashMap<CtKey, CtEntry> = StdHashMap::new();
    for item in ct.iter() {
        let (k, v) = item?;
        all.insert(k, v);
    }
    let mut flows = Vec::new();
    let mut paired = std::collections::HashSet::new();
    for (k, v) in &all {
        if v.flags & CT_F_ORIGINAL == 0 {
            continue;
        }
        let reply_key = v.peer_key(k);
        let reply = all.get(&reply_key).copied();
        if reply.is_some() {
            paired.insert(reply_key);
        }
        flows.push(FlowEntries {
            key: *k,
            orig: *v,
            reply_key,
            reply,
        });
    }
    let orphans = all
        .iter()
        .filter(|(k, v)| v.flags & CT_F_ORIGINAL == 0 && !paired.contains(*k))
        .map(|(k, _)| *k)
        .collect();
    Ok((flows, orphans))
}

/// Removes both entries of every flow for which `pred` holds; returns the
/// number of entries removed.
pub fn flush(
    ct: &mut HashMap<MapData, CtKey, CtEntry>,
    mut pred: impl FnMut(&FlowEntries) -> bool,
) -> Result<usize, MapError> {
    let (flows, _) = read_flows(ct)?;
    let mut removed = 0;
    for f in flows.iter().filter(|f| pred(f)) {
        for key in [f.key, f.reply_key] {
            if ct.remove(&key).is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Removes expired flows and orphaned reply entries; returns the number of
/// entries removed. A masqueraded flow's port is free again once its reply
/// entry is gone.
pub fn gc(
    ct: &mut HashMap<MapData, CtKey, CtEntry>,
    timeouts: &Timeouts,
    now: u64,
) -> Result<usize, MapError> {
    let (flows, orphans) = read_flows(ct)?;
    let mut removed = 0;
    for f in &flows {
        let idle_s = now.saturating_sub(f.last_seen_ns()) / 1_000_000_000;
        if idle_s >= timeouts.of(f.state()) {
            for key in [f.key, f.reply_key] {
                if ct.remove(&key).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    for key in orphans {
        // Created together with its original; an orphan older than a
        // second lost its partner (flush or a failed insert).
        if let Ok(e) = ct.get(&key, 0)
            && now.saturating_sub(e.created_ns) > 1_000_000_000
            && ct.remove(&key).is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Collects expired flows periodically, on its own handle of the
/// conntrack map ([`super::Datapath::collector`]).
pub struct Collector {
    ct: HashMap<MapData, CtKey, CtEntry>,
    timeouts: Timeouts,
}

impl Collector {
    /// A collector working on `ct`.
    pub fn new(ct: HashMap<MapData, CtKey, CtEntry>, timeouts: Timeouts) -> Self {
        Self { ct, timeouts }
    }

    /// One pass: removes expired flows; returns the entries removed.
    pub fn collect(&mut self) -> Result<usize, MapError> {
        gc(&mut self.ct, &self.timeouts, now_ns())
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::ICMP => "icmp",
        _ => "other",
    }
}

fn ep(addr: [u8; 4], port: u16) -> FlowEndpoint {
    FlowEndpoint {
        addr: Ipv4Addr::from(addr),
        port,
    }
}

/// How the API shows a flow.
pub fn flow_view(
    f: &FlowEntries,
    timeouts: &Timeouts,
    now: u64,
    container: Option<String>,
) -> Flow {
    let k = &f.key;
    let (nat_src, nat_dst) = if ct_action::rewrites_source(f.orig.action) {
        (ep(f.orig.nat_addr, f.orig.nat_port), ep(k.daddr, k.dport))
    } else {
        (ep(k.saddr, k.sport), ep(f.orig.nat_addr, f.orig.nat_port))
    };
    let state = f.state();
    let idle_s = now.saturating_sub(f.last_seen_ns()) / 1_000_000_000;
    Flow {
        proto: proto_name(k.proto).to_owned(),
        kind: match f.orig.action {
            ct_action::SNAT => "snat",
            ct_action::ROUTED => "routed",
            _ => "dnat",
        }
        .to_owned(),
        orig_src: ep(k.saddr, k.sport),
        orig_dst: ep(k.daddr, k.dport),
        nat_src,
        nat_dst,
        state: state.name().to_owned(),
        age_s: now.saturating_sub(f.orig.created_ns) / 1_000_000_000,
        idle_s,
        expires_in_s: timeouts.of(state).saturating_sub(idle_s),
        packets: f.orig.packets,
        bytes: f.orig.bytes,
        reply_packets: f.reply.map_or(0, |r| r.packets),
        reply_bytes: f.reply.map_or(0, |r| r.bytes),
        container,
    }
}
