//! The uplink at start: the global configuration, the node's addresses,
//! and the uplink program attached with the hook the mode and the device
//! call for.

use std::net::Ipv4Addr;

use anyhow::{Context as _, bail};
use datapath_common::{
    CONFIG_F_ALLOW_DIRECT_ROUTING, CONFIG_F_CHECK_LINKS, CONFIG_F_CLUSTER, CONFIG_F_FIB,
    CONFIG_F_READY, CONFIG_F_SNAT, Config, overlay,
};

use super::{AgentConfig, SocketCgroup, XdpMode, cluster::OVERLAY_IF};
use crate::{
    api::UplinkInfo,
    datapath::{self, Datapath, Flows, UplinkHook},
    net::link::{Netlink, enable_ip_forward, enable_ipv6_forward},
};

/// The uplink as configured at start.
#[derive(Clone, Debug)]
pub struct Uplink {
    /// Interface name.
    pub ifname: String,
    /// Interface index.
    pub ifindex: u32,
    /// The hook serving it.
    pub hook: UplinkHook,
    /// The node's primary address (masquerade source).
    pub node_ip: Ipv4Addr,
    /// Every node address published ports answer on.
    pub node_addrs: Vec<Ipv4Addr>,
    /// Its MTU, if the kernel reported one.
    pub mtu: Option<u32>,
}

impl Uplink {
    /// How the API shows it.
    pub fn info(&self) -> UplinkInfo {
        UplinkInfo {
            ifname: self.ifname.clone(),
            ifindex: self.ifindex,
            hook: match self.hook {
                UplinkHook::Tc => "tc",
                UplinkHook::XdpNative => "xdp-native",
                UplinkHook::XdpGeneric => "xdp-generic",
            }
            .to_owned(),
            node_ip: self.node_ip,
            node_addrs: self.node_addrs.clone(),
        }
    }
}

/// The hook that serves an uplink of kind `kind` (`veth`, ...) in `mode`.
fn hook_for(mode: XdpMode, kind: &str) -> UplinkHook {
    match (mode, kind) {
        (XdpMode::Off, _) | (XdpMode::Auto, "veth") => UplinkHook::Tc,
        (XdpMode::Auto, _) | (XdpMode::Native, _) => UplinkHook::XdpNative,
        (XdpMode::Generic, _) => UplinkHook::XdpGeneric,
    }
}

/// Writes the global configuration and attaches the uplink program; with
/// no uplink configured, only the configuration (nothing is attached).
pub async fn setup(
    cfg: &AgentConfig,
    dp: &mut Datapath,
    net: &Netlink,
) -> anyhow::Result<Option<Uplink>> {
    let pool = cfg.pool;
    let (lo, hi) = cfg.snat_ports;
    let ct_max = datapath::ct_max(cfg.ct_max);
    let share = u32::from(cfg.ct_container_share.min(100));
    let mut config = Config {
        pool_addr: pool.network().octets(),
        pool_mask: pool.netmask().octets(),
        gateway_addr: cfg.gateway().octets(),
        snat_port_min: lo,
        snat_port_max: hi,
        flags: CONFIG_F_FIB | CONFIG_F_CHECK_LINKS,
        ct_container_max: if share == 0 || share == 100 {
            0
        } else {
            u32::try_from(u64::from(ct_max) * u64::from(share) / 100).unwrap_or(u32::MAX)
        },
        timeouts: cfg.timeouts,
        node_netns_cookie: netns_cookie().context("read the network namespace's cookie")?,
        ..Config::default()
    };
    if cfg.masquerade {
        config.flags |= CONFIG_F_SNAT;
    }
    if cfg.allow_direct_routing {
        config.flags |= CONFIG_F_ALLOW_DIRECT_ROUTING;
    }
    dp.set_non_masquerade(&cfg.non_masquerade)?;
    let Some(ifname) = cfg.uplink.clone() else {
        tracing::warn!("no --uplink given: programs loaded and maps pinned, nothing attached");
        // Ready all the same, so that the containers' programs check what
        // they send; with no uplink to masquerade to, the node routes it.
        config.flags = (config.flags & !CONFIG_F_SNAT) | CONFIG_F_READY;
        dp.set_config(config)?;
        return Ok(None);
    };
    let Some(link) = net
        .link(&ifname)
        .await
        .with_context(|| format!("look up uplink {ifname}"))?
    else {
        bail!("uplink {ifname} does not exist in this network namespace");
    };
    let ifindex = link.index;
    let with_len = net
        .ipv4_addrs(ifindex)
        .await
        .with_context(|| format!("read addresses of {ifname}"))?;
    let addrs: Vec<Ipv4Addr> = with_len.iter().map(|(a, _)| *a).collect();
    if cfg.node_ip.is_none() && addrs.is_empty() {
        bail!("uplink {ifname} has no IPv4 address; give one to it or pass --node-ip");
    }
    let (node_ip, node_addrs) = node_addresses(cfg, addrs, Ipv4Addr::UNSPECIFIED);
    let hook = hook_for(cfg.xdp_mode, &link.kind);
    config.node_addr = node_ip.octets();
    config.uplink_ifindex = ifindex;
    if let Some(cl) = &cfg.cluster {
        crate::cluster::check_overlap(cl.cluster_cidr, Some(node_ip), &with_len)?;
        let mtu = link.mtu.map(|m| m.saturating_sub(overlay::OVERHEAD));
        let overlay_ifindex = net
            .ensure_vxlan(OVERLAY_IF, overlay::PORT, mtu)
            .await
            .context("set up the overlay device")?;
        net.route_cluster(OVERLAY_IF, overlay_ifindex, cl.cluster_cidr, cfg.gateway())
            .await
            .context("route the cluster CIDR through the overlay device")?;
        config.cluster_addr = cl.cluster_cidr.network().octets();
        config.cluster_mask = cl.cluster_cidr.netmask().octets();
        config.overlay_ifindex = overlay_ifindex;
        config.flags |= CONFIG_F_CLUSTER;
    } else {
        // Without cluster mode, nothing of an earlier one stays: its
        // device (and with it the cluster CIDR's route) and its programs.
        dp.detach_overlay()?;
        net.delete_vxlan(OVERLAY_IF)
            .await
            .context("remove the overlay device of an earlier cluster mode")?;
    }
    config.flags |= CONFIG_F_READY;
    // Node addresses first, so that no packet sees a ready config without
    // them.
    dp.set_node_addrs(&node_addrs, ifindex)?;
    dp.set_config(config)?;
    enable_ip_forward().context("enable IPv4 forwarding")?;
    if cfg.pool6.is_some() {
        enable_ipv6_forward().context("enable IPv6 forwarding")?;
    }
    dp.attach_uplink(&ifname, hook)?;
    if cfg.cluster.is_some() {
        dp.attach_overlay(OVERLAY_IF)?;
        tracing::info!(device = OVERLAY_IF, "overlay attached");
    }
    tracing::info!(uplink = %ifname, ?hook, %node_ip, "uplink attached");
    Ok(Some(Uplink {
        ifname,
        ifindex,
        hook,
        node_ip,
        node_addrs,
        mtu: link.mtu,
    }))
}

/// The node address and the published-port addresses for link addresses
/// `addrs`: `--node-ip` if given, else the first address (else `before`,
/// when the link has none).
fn node_addresses(
    cfg: &AgentConfig,
    addrs: Vec<Ipv4Addr>,
    before: Ipv4Addr,
) -> (Ipv4Addr, Vec<Ipv4Addr>) {
    let node_ip = cfg.node_ip.or(addrs.first().copied()).unwrap_or(before);
    let mut node_addrs = addrs;
    if !node_addrs.contains(&node_ip) {
        node_addrs.push(node_ip);
    }
    (node_ip, node_addrs)
}

/// Follows a change of the uplink's addresses without a restart: reads
/// them again and rewrites the node-address map and, if the node's address
/// changed, the masquerade source; flows masqueraded as the address the
/// node gave up are removed, so that their next packet leaves as the new
/// one. Whether anything changed.
pub async fn follow_addresses(
    cfg: &AgentConfig,
    uplink: &mut Uplink,
    dp: &mut Datapath,
    net: &Netlink,
) -> anyhow::Result<bool> {
    let addrs: Vec<Ipv4Addr> = net
        .ipv4_addrs(uplink.ifindex)
        .await
        .with_context(|| format!("read addresses of {}", uplink.ifname))?
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    let (node_ip, node_addrs) = node_addresses(cfg, addrs, uplink.node_ip);
    let sorted = |a: &[Ipv4Addr]| {
        let mut a = a.to_vec();
        a.sort_unstable();
        a
    };
    if node_ip == uplink.node_ip && sorted(&node_addrs) == sorted(&uplink.node_addrs) {
        return Ok(false);
    }
    dp.set_node_addrs(&node_addrs, uplink.ifindex)?;
    let before = uplink.node_ip;
    if node_ip != before {
        let mut config = dp.config()?;
        config.node_addr = node_ip.octets();
        dp.set_config(config)?;
        match dp.flush_flows(Flows::Masqueraded(before)) {
            Ok(n) => {
                tracing::info!(entries = n, %before, "flows masqueraded as the old address removed")
            }
            Err(e) => tracing::warn!(%before, "flush the old address's flows: {e}"),
        }
    }
    tracing::info!(uplink = %uplink.ifname, %node_ip, addrs = ?node_addrs, "uplink addresses changed");
    uplink.node_ip = node_ip;
    uplink.node_addrs = node_addrs;
    Ok(true)
}

/// The cookie of this thread's network namespace (`SO_NETNS_COOKIE`), the
/// node's: the socket programs translate that namespace's sockets only.
fn netns_cookie() -> std::io::Result<u64> {
    let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are live locals of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Attaches the socket programs (published ports for the node's own
/// processes) to `--socket-cgroup`, or detaches them with `none`.
pub fn attach_sockets(cfg: &AgentConfig, dp: &mut Datapath) -> anyhow::Result<()> {
    let dir = match &cfg.socket_cgroup {
        SocketCgroup::None => {
            dp.detach_sockets()?;
            return Ok(());
        }
        SocketCgroup::Dir(dir) => dir.clone(),
        SocketCgroup::Root => crate::cgroup::cgroup2_mount()
            .context("find the cgroup2 root for the socket programs (or pass --socket-cgroup)")?,
    };
    dp.attach_sockets(&dir)
        .with_context(|| format!("attach the socket programs to {}", dir.display()))?;
    tracing::info!(cgroup = %dir.display(), "socket programs attached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_uplinks_get_tc_unless_xdp_is_asked_for() {
        assert_eq!(hook_for(XdpMode::Auto, "veth"), UplinkHook::Tc);
        assert_eq!(hook_for(XdpMode::Auto, ""), UplinkHook::XdpNative);
        assert_eq!(hook_for(XdpMode::Native, "veth"), UplinkHook::XdpNative);
        assert_eq!(hook_for(XdpMode::Generic, "veth"), UplinkHook::XdpGeneric);
        assert_eq!(hook_for(XdpMode::Off, ""), UplinkHook::Tc);
    }
}
