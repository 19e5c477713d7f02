//! The node's `net.ipv4.ip_local_reserved_ports` (of the agent's network
//! namespace): every published host port and the masquerade range are
//! reserved, so that the node's own connections never pick one as their
//! source port (whose replies a published port would otherwise claim). The
//! ports the agent added are recorded in the state and given back once
//! nothing needs them; ports reserved by anyone else are left alone.

use anyhow::Context as _;

use super::Node;
use crate::{
    model::ports::PortSet,
    net::sockets,
    store::{Change, Reserver, State, Store},
};

/// The ports the agent wants reserved: the masquerade range `snat` (when
/// it masquerades) and every published host port of `state`.
pub fn wanted(snat: Option<(u16, u16)>, state: &State) -> PortSet {
    let mut ports = PortSet::default();
    if let Some((lo, hi)) = snat {
        ports.extend(&PortSet::range(lo, hi));
    }
    for c in state.containers().values() {
        for m in &c.publish {
            for (hp, _) in m.ports() {
                ports.insert(hp);
            }
        }
    }
    ports
}

/// What keeps the reservation in line with each change of the store (in
/// that change's record): the agent's masquerade range `snat`, if it
/// masquerades, and the published ports.
pub fn reserver(snat: Option<(u16, u16)>) -> Reserver {
    Reserver::new(move |state| {
        reserve(&wanted(snat, state), state.reserved_ports()).map_err(|e| format!("{e:#}"))
    })
}

/// The masquerade range the agent reserves: `--snat-ports` when it
/// masquerades.
pub fn snat_range(node: &Node) -> Option<(u16, u16)> {
    node.cfg.masquerade.then_some(node.cfg.snat_ports)
}

/// Makes the reservation `wanted`: adds what is missing, gives back what
/// the agent reserved and no longer needs, and records (one journal
/// record, when it changed) what is the agent's.
pub fn apply(wanted: &PortSet, store: &mut Store) -> anyhow::Result<()> {
    let ours_before = store.state().reserved_ports();
    let ours = reserve(wanted, ours_before)?;
    if ours != *ours_before {
        store.commit(vec![Change::ReservedPorts { ports: ours }])?;
    }
    Ok(())
}

/// Makes the reservation `wanted` where `ours_before` are the ports the
/// agent reserved so far; returns those that are the agent's now.
pub fn reserve(wanted: &PortSet, ours_before: &PortSet) -> anyhow::Result<PortSet> {
    let current = sockets::reserved_ports().context("read ip_local_reserved_ports")?;
    let others = current.minus(ours_before);
    let ours = wanted.minus(&others);
    let mut target = others;
    target.extend(wanted);
    if target != current {
        sockets::set_reserved_ports(&target).context("write ip_local_reserved_ports")?;
        tracing::debug!(reserved = %target, "ip_local_reserved_ports");
    }
    Ok(ours)
}
