//! Userspace side of connection tracking: reading and describing flows.
//!
//! The kernel expires flows itself (see the eBPF crate's `conntrack`
//! module): the agent never removes an entry. It reads the tables with
//! `BPF_MAP_LOOKUP_BATCH` (a few syscalls per thousand entries, where
//! iterating key by key costs two per entry), and flushes by asking the
//! kernel ([`super::Datapath::flush_flows`]), so the per-container
//! accounting stays exact and no check-then-delete race can remove a flow
//! that just became active.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    io,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::MapData;
use datapath_common::{
    CtEntry, CtKey, CtTimedEntry,
    ct::{self, Timeouts},
    ct_action, ct_state, proto,
};

use crate::model::{Flow, FlowEndpoint};

/// The kernel's `bpf_ktime_get_ns` clock (CLOCK_MONOTONIC), in ns.
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reads every entry of hash map `map` with `BPF_MAP_LOOKUP_BATCH`. The
/// result is a consistent view of each bucket, not of the whole map: a
/// flow created or removed meanwhile may or may not be in it.
pub fn read_all<K: bytemuck::Pod, V: bytemuck::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    walk_batches(map, 4096, |batch: &[(K, V)]| {
        out.extend_from_slice(batch);
        Ok(true)
    })?;
    Ok(out)
}

/// Reads the entries of hash map `map` with `BPF_MAP_LOOKUP_BATCH`, about
/// `chunk` at a time (more for a bucket that holds more), calling `visit`
/// with each batch until it returns `false` or fails. Memory stays that
/// of one batch whatever the map's size; like [`read_all`], each bucket
/// is seen consistently, the whole map is not.
pub fn walk_batches<K: bytemuck::Pod, V: bytemuck::Pod>(
    map: &MapData,
    chunk: usize,
    mut visit: impl FnMut(&[(K, V)]) -> io::Result<bool>,
) -> io::Result<()> {
    let mut cursor = BatchCursor::default();
    let mut batch: Vec<(K, V)> = Vec::with_capacity(chunk.max(1));
    while !cursor.done() {
        cursor.next(map, chunk, &mut batch)?;
        if !batch.is_empty() && !visit(&batch)? {
            return Ok(());
        }
    }
    Ok(())
}

/// A position in a walk of a hash map with `BPF_MAP_LOOKUP_BATCH`, kept
/// between calls: a walk of a large table can be spread over many
/// passes, each reading a bounded number of entries, and pick up where
/// the last one stopped.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchCursor {
    /// The batch token of the next read (a hash map's bucket index).
    token: u64,
    /// Whether a read was made (the first read passes no token).
    started: bool,
    /// Whether the walk reached the map's end.
    done: bool,
}

impl BatchCursor {
    /// Whether the walk has read the whole map.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Reads the next batch of at most `chunk` entries into `out` (emptied
    /// first; more than `chunk` only for a bucket that holds more), with
    /// one `BPF_MAP_LOOKUP_BATCH` (a few more only for such a bucket).
    /// Reading past the end yields nothing.
    pub fn next<K: bytemuck::Pod, V: bytemuck::Pod>(
        &mut self,
        map: &MapData,
        chunk: usize,
        out: &mut Vec<(K, V)>,
    ) -> io::Result<()> {
        out.clear();
        if self.done {
            return Ok(());
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let mut chunk = chunk.max(1);
        loop {
            let token = [self.token];
            let mut next = [0u64; 1];
            let mut keys = vec![K::zeroed(); chunk];
            let mut values = vec![V::zeroed(); chunk];
            let mut attr = BatchAttr {
                in_batch: if self.started {
                    token.as_ptr() as u64
                } else {
                    0
                },
                out_batch: next.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: fd as u32,
                ..BatchAttr::default()
            };
            // SAFETY: `attr` points at live buffers of `chunk` keys and
            // values of the map's sizes; the kernel writes at most that
            // many.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &raw mut attr,
                    size_of::<BatchAttr>(),
                )
            };
            let err = (rc < 0).then(io::Error::last_os_error);
            let n = (attr.count as usize).min(chunk);
            match err.as_ref().and_then(io::Error::raw_os_error) {
                None => {}
                Some(libc::ENOENT) => self.done = true,
                // A bucket holds more entries than fit: retry it larger.
                Some(libc::ENOSPC) if n == 0 => {
                    chunk *= 2;
                    continue;
                }
                Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
            }
            out.extend(keys.into_iter().zip(values).take(n));
            self.token = next[0];
            self.started = true;
            return Ok(());
        }
    }
}

/// One flow: its original-direction entry and, if present, its reply entry.
#[derive(Clone, Debug)]
pub struct FlowEntries {
    /// Key of the original direction.
    pub key: CtKey,
    /// Original-direction entry.
    pub orig: CtEntry,
    /// Key of the reply direction.
    pub reply_key: CtKey,
    /// Reply-direction entry.
    pub reply: Option<CtEntry>,
    /// Whether it is in the main table (confirmed).
    pub confirmed: bool,
}

impl FlowEntries {
    /// The flow's [`ct_state`]. A reply marks only the reply entry
    /// `replied` (the datapath touches one entry per packet); the flow is.
    pub fn state(&self) -> u8 {
        match (self.orig.state, self.reply) {
            (ct_state::UNREPLIED, Some(r)) if r.packets > 0 => ct_state::REPLIED,
            (s, _) => s,
        }
    }

    /// Last packet time in either direction.
    pub fn last_seen_ns(&self) -> u64 {
        self.reply.map_or(self.orig.last_seen_ns, |r| {
            r.last_seen_ns.max(self.orig.last_seen_ns)
        })
    }

    /// Whether the kernel would treat the flow as expired at `now` (it
    /// removes such a flow when a packet or its timer finds it).
    pub fn expired(&self, timeouts: &Timeouts, now: u64) -> bool {
        ct::idle_expired(
            now,
            self.last_seen_ns(),
            timeouts.of_ns(self.key.proto, self.state()),
        )
    }
}

/// The flows of one table's entries.
fn pair(entries: Vec<(CtKey, CtEntry)>, confirmed: bool, out: &mut Vec<FlowEntries>) {
    let all: StdHashMap<CtKey, CtEntry> = entries.into_iter().collect();
    for (k, v) in &all {
        if !v.is_original() {
            continue;
        }
        let reply_key = v.peer_key(k);
        out.push(FlowEntries {
            key: *k,
            orig: *v,
            reply_key,
            reply: all.get(&reply_key).copied(),
            confirmed,
        });
    }
}

/// Reads every live flow of both tables (main: `ct`, unconfirmed:
/// `ct_new`); flows the kernel would find expired are left out.
pub fn read_flows(
    ct: &MapData,
    ct_new: &MapData,
    timeouts: &Timeouts,
    now: u64,
) -> io::Result<Vec<FlowEntries>> {
    let main: Vec<(CtKey, CtTimedEntry)> = read_all(ct)?;
    let new: Vec<(CtKey, CtEntry)> = read_all(ct_new)?;
    let mut flows = Vec::with_capacity((main.len() + new.len()) / 2);
    pair(
        main.into_iter().map(|(k, v)| (k, v.entry)).collect(),
        true,
        &mut flows,
    );
    pair(new, false, &mut flows);
    flows.retain(|f| !f.expired(timeouts, now));
    Ok(flows)
}

/// The ids of the containers owning an entry of either table (`0`: flows
/// of no container).
pub fn container_ids(ct: &MapData, ct_new: &MapData) -> io::Result<BTreeSet<u32>> {
    let main: Vec<(CtKey, CtTimedEntry)> = read_all(ct)?;
    let new: Vec<(CtKey, CtEntry)> = read_all(ct_new)?;
    Ok(main
        .iter()
        .map(|(_, v)| v.entry.container_id)
        .chain(new.iter().map(|(_, v)| v.container_id))
        .collect())
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
    let (nat_src, nat_dst) = if f.orig.action == ct_action::HAIRPIN {
        // To the container itself, from the node address it dialed.
        (ep(k.daddr, k.sport), ep(f.orig.nat_addr, f.orig.nat_port))
    } else if ct_action::rewrites_source(f.orig.action) {
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
            ct_action::HAIRPIN => "hairpin",
            _ => "dnat",
        }
        .to_owned(),
        orig_src: ep(k.saddr, k.sport),
        orig_dst: ep(k.daddr, k.dport),
        nat_src,
        nat_dst,
        state: ct_state::name(state).to_owned(),
        age_s: now.saturating_sub(f.orig.created_ns) / 1_000_000_000,
        idle_s,
        expires_in_s: u64::from(timeouts.of(k.proto, state)).saturating_sub(idle_s),
        packets: f.orig.packets,
        bytes: f.orig.bytes,
        reply_packets: f.reply.map_or(0, |r| r.packets),
        reply_bytes: f.reply.map_or(0, |r| r.bytes),
        container,
    }
}
