//! A lost state file never wipes the node: when the state file is missing
//! (or the operator moved a corrupt one away) but the kernel still holds
//! what an agent made, the state is rebuilt from it instead of starting
//! empty (which would remove every container as an orphan).
//!
//! Each of the agent's veths (in its group, with its tag in the alias,
//! [`VethTag`]) names a container: its id, name, interface and namespace.
//! Its address and MAC come from its ENDPOINTS entry, its published ports
//! from the SERVICES entries it owns, its rate limits from the buckets of
//! the cgroup its limiter's links are attached to, its MTU from the veth
//! (recorded as asked for only where it differs from the agent's default).
//! A veth without an endpoint is what a cut-off add left: it stays an
//! orphan.

use datapath_common::{ServiceKey, ServiceValue, proto, ratelimit::direction};
use ipnet::Ipv4Net;

use crate::{
    cgroup,
    datapath::Datapath,
    model::{
        PortMapping, Protocol, RateLimits,
        identity::{VETH_GROUP, VethTag},
        mac::format_mac,
        names::host_veth_name,
    },
    net::link::Netlink,
    store::{Container, State},
};

/// The state the kernel describes, or `None` if it holds nothing of an
/// agent's (a fresh node: the empty state is right). `mtu` is the agent's
/// `--mtu`; without it, the MTU of `uplink` is the containers' default.
pub async fn rebuild(
    pool: Ipv4Net,
    snat_ports: (u16, u16),
    mtu: Option<u32>,
    uplink: Option<&str>,
    dp: &Datapath,
    net: &Netlink,
) -> anyhow::Result<Option<State>> {
    use anyhow::Context as _;
    let links = net.links().await.context("list links")?;
    let default_mtu = mtu.or_else(|| {
        links
            .iter()
            .find(|l| Some(l.name.as_str()) == uplink)
            .and_then(|l| l.mtu)
    });
    let tagged: Vec<(String, VethTag, Option<u32>)> = links
        .into_iter()
        .filter(|l| l.group == VETH_GROUP && l.kind == "veth")
        .filter_map(|l| {
            let tag = VethTag::parse(l.alias.as_deref()?)?;
            (host_veth_name(tag.id) == l.name).then_some((l.name, tag, l.mtu))
        })
        .collect();
    let endpoints = dp.endpoints().context("read ENDPOINTS")?;
    let services = dp.services().context("read SERVICES")?;
    if tagged.is_empty() && endpoints.is_empty() && services.is_empty() {
        return Ok(None);
    }
    let buckets = dp.buckets();
    let mut state = State::with_ranges(pool, snat_ports);
    for (host_ifname, tag, veth_mtu) in tagged {
        let Some((addr, ep)) = endpoints.iter().find(|(_, e)| e.container_id == tag.id) else {
            tracing::warn!(veth = %host_ifname, "no endpoint: an add that was cut off; not adopted");
            continue;
        };
        if !pool.contains(addr) {
            tracing::warn!(veth = %host_ifname, %addr, %pool, "its address is outside the pool; not adopted");
            continue;
        }
        if state.get(&tag.name).is_some() {
            tracing::warn!(veth = %host_ifname, name = %tag.name, "a second veth tagged with this name; not adopted");
            continue;
        }
        let cgroup_id = dp.rate_cgroup_of(&host_ifname).unwrap_or(0);
        let cgroup = (cgroup_id != 0)
            .then(|| cgroup::find_cgroup_by_id(cgroup_id))
            .flatten();
        let limit = |dir: u32| {
            buckets
                .iter()
                .find(|(k, _)| k.cgroup_id == cgroup_id && k.direction == dir)
                .map(|(_, l)| *l)
        };
        let limits = if cgroup_id == 0 {
            RateLimits::default()
        } else {
            RateLimits {
                egress: limit(direction::EGRESS),
                ingress: limit(direction::INGRESS),
            }
        };
        let c = Container {
            id: tag.id,
            name: tag.name.clone(),
            netns: tag.netns,
            netns_id: Some(tag.netns_id),
            ifname: tag.ifname,
            host_ifname: host_ifname.clone(),
            addr: *addr,
            publish: mappings(services.iter().filter(|(_, v)| v.container_id == tag.id)),
            mac: format_mac(ep.mac),
            cgroup,
            cgroup_id,
            limits,
            mtu: veth_mtu.filter(|m| Some(*m) != default_mtu),
        };
        let (name, id, addr) = (c.name.clone(), c.id, c.addr);
        match state.adopt(c) {
            Ok(()) => tracing::warn!(container = %name, id, %addr, "rebuilt from the kernel"),
            Err(e) => tracing::warn!(veth = %host_ifname, "{e}; not adopted"),
        }
    }
    Ok(Some(state))
}

/// The published ports of one container's SERVICES entries, consecutive
/// ports merged back into ranges.
pub fn mappings<'a>(
    entries: impl Iterator<Item = (&'a ServiceKey, &'a ServiceValue)>,
) -> Vec<PortMapping> {
    let mut singles: Vec<PortMapping> = entries
        .filter_map(|(k, v)| {
            let protocol = match k.proto {
                proto::TCP => Protocol::Tcp,
                proto::UDP => Protocol::Udp,
                _ => return None,
            };
            Some(PortMapping {
                host_ip: (k.addr != [0; 4]).then(|| k.addr.into()),
                host_port: k.port,
                container_port: v.backend_port,
                count: 1,
                protocol,
            })
        })
        .collect();
    singles.sort_by_key(|m| (m.protocol, m.host_ip, m.host_port));
    let mut out: Vec<PortMapping> = Vec::new();
    for m in singles {
        if let Some(last) = out.last_mut()
            && last.protocol == m.protocol
            && last.host_ip == m.host_ip
            && u32::from(last.host_port) + u32::from(last.count) == u32::from(m.host_port)
            && u32::from(last.container_port) + u32::from(last.count) == u32::from(m.container_port)
        {
            last.count += 1;
            continue;
        }
        out.push(m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16, backend: u16, p: u8) -> (ServiceKey, ServiceValue) {
        (
            ServiceKey {
                addr: [0; 4],
                port,
                proto: p,
                _pad: 0,
            },
            ServiceValue {
                backend_addr: [0; 4],
                backend_port: backend,
                _pad: 0,
                ifindex: 1,
                container_id: 1,
            },
        )
    }

    #[test]
    fn published_ports_come_back_as_the_ranges_they_were() {
        let entries = [
            entry(9002, 9002, proto::TCP),
            entry(8080, 80, proto::TCP),
            entry(9000, 9000, proto::TCP),
            entry(9001, 9001, proto::TCP),
            entry(5353, 53, proto::UDP),
        ];
        let got: Vec<String> = mappings(entries.iter().map(|(k, v)| (k, v)))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            ["8080:80/tcp", "9000-9002:9000-9002/tcp", "5353:53/udp"]
        );
    }
}
