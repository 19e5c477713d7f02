//! Reading links over rtnetlink: one link's index, MAC, flags, kind and
//! MTU ([`Link`]), its IPv4 addresses and the main table's routes through
//! it. The agent reads its uplink and container veths with it
//! ([`super::link::Netlink`]); the CNI plugin reads a container's interface
//! and its host end for results and `CHECK` ([`link`], in the plugin's own
//! netns or inside a container's).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use ipnet::{Ipv4Net, Ipv6Net};
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::netns::{Netns, NetnsError};

/// A link as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// MAC address (zeros for links without a 6-byte hardware address).
    pub mac: [u8; 6],
    /// Administratively up.
    pub up: bool,
    /// Kind (`veth`, ...; empty for links without one, like physical NICs).
    pub kind: String,
    /// MTU.
    pub mtu: Option<u32>,
    /// Interface group (0, the default, for most links).
    pub group: u32,
    /// Interface alias, if set.
    pub alias: Option<String>,
}

impl Link {
    /// The link an `RTM_NEWLINK` message describes.
    pub fn from_message(m: &LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: [0; 6],
            up: m.header.flags.contains(LinkFlags::Up),
            kind: String::new(),
            mtu: None,
            group: 0,
            alias: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name.clone_from(name),
                LinkAttribute::Address(bytes) => {
                    if let Ok(mac) = <[u8; 6]>::try_from(bytes.as_slice()) {
                        link.mac = mac;
                    }
                }
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::Group(group) => link.group = *group,
                LinkAttribute::IfAlias(alias) if !alias.is_empty() => {
                    link.alias = Some(alias.clone());
                }
                LinkAttribute::LinkInfo(infos) => {
                    if let Some(kind) = infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k.to_string()),
                        _ => None,
                    }) {
                        link.kind = kind;
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// Link `name` in the netns of `handle`'s socket; `None` if there is none.
pub async fn find_link(handle: &Handle, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(m) => Ok(m.as_ref().map(Link::from_message)),
        Err(e) if super::is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every link in the netns of `handle`'s socket.
pub async fn links(handle: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    let messages: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    Ok(messages.iter().map(Link::from_message).collect())
}

/// The IPv4 addresses of link `index`, with their prefix lengths.
pub async fn ipv4_addrs(
    handle: &Handle,
    index: u32,
) -> Result<Vec<(Ipv4Addr, u8)>, rtnetlink::Error> {
    let mut request = handle.address().get().set_link_index_filter(index);
    request.message_mut().header.family = AddressFamily::Inet;
    let messages: Vec<_> = request.execute().try_collect().await?;
    Ok(messages
        .iter()
        .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
        .filter_map(|m| {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS differs
            // from it only on point-to-point links.
            let attr = |local| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) if local => Some(*ip),
                    AddressAttribute::Address(IpAddr::V4(ip)) if !local => Some(*ip),
                    _ => None,
                })
            };
            attr(true)
                .or_else(|| attr(false))
                .map(|ip| (ip, m.header.prefix_len))
        })
        .collect())
}

/// The IPv6 addresses of link `index`, with their prefix lengths.
pub async fn ipv6_addrs(
    handle: &Handle,
    index: u32,
) -> Result<Vec<(Ipv6Addr, u8)>, rtnetlink::Error> {
    let mut request = handle.address().get().set_link_index_filter(index);
    request.message_mut().header.family = AddressFamily::Inet6;
    let messages: Vec<_> = request.execute().try_collect().await?;
    Ok(messages
        .iter()
        .filter(|m| m.header.family == AddressFamily::Inet6 && m.header.index == index)
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V6(ip)) => Some((*ip, m.header.prefix_len)),
                _ => None,
            })
        })
        .collect())
}

/// The IPv6 routes of the main table whose output interface is link
/// `index`: destination and gateway.
pub async fn ipv6_routes(
    handle: &Handle,
    index: u32,
) -> Result<Vec<(Ipv6Net, Option<Ipv6Addr>)>, rtnetlink::Error> {
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await?;
    Ok(routes
        .iter()
        .filter(|r| table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .filter(|r| {
            r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
        })
        .filter_map(|r| {
            let addr = |want_dst: bool| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) if want_dst => Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet6(ip)) if !want_dst => Some(*ip),
                    _ => None,
                })
            };
            let dst = Ipv6Net::new(
                addr(true).unwrap_or(Ipv6Addr::UNSPECIFIED),
                r.header.destination_prefix_length,
            )
            .ok()?;
            Some((dst, addr(false)))
        })
        .collect())
}

/// One IPv4 route through a link, from the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteView {
    /// Destination.
    pub dst: Ipv4Net,
    /// Next hop, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Scope (0 universe, 253 link, 254 host).
    pub scope: u8,
}

/// The IPv4 routes of the main table whose output interface is link
/// `index`.
pub async fn ipv4_routes(handle: &Handle, index: u32) -> Result<Vec<RouteView>, rtnetlink::Error> {
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await?;
    Ok(routes
        .iter()
        .filter(|r| table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .filter(|r| {
            r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
        })
        .filter_map(route_view)
        .collect())
}

/// Every IPv4 route of the main table, with its output interface (if it
/// has one).
pub async fn all_ipv4_routes(
    handle: &Handle,
) -> Result<Vec<(RouteView, Option<u32>)>, rtnetlink::Error> {
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await?;
    Ok(routes
        .iter()
        .filter(|r| table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .filter_map(|r| {
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            route_view(r).map(|v| (v, oif))
        })
        .collect())
}

/// Every IPv4 address of every link, as (link index, address, prefix
/// length).
pub async fn all_ipv4_addrs(handle: &Handle) -> Result<Vec<(u32, Ipv4Addr, u8)>, rtnetlink::Error> {
    let mut request = handle.address().get();
    request.message_mut().header.family = AddressFamily::Inet;
    let messages: Vec<_> = request.execute().try_collect().await?;
    Ok(messages
        .iter()
        .filter(|m| m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => {
                    Some((m.header.index, *ip, m.header.prefix_len))
                }
                _ => None,
            })
        })
        .collect())
}

fn table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn route_view(r: &RouteMessage) -> Option<RouteView> {
    let addr = |want_dst: bool| {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) if want_dst => Some(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) if !want_dst => Some(*ip),
            _ => None,
        })
    };
    let dst = Ipv4Net::new(
        addr(true).unwrap_or(Ipv4Addr::UNSPECIFIED),
        r.header.destination_prefix_length,
    )
    .ok()?;
    Some(RouteView {
        dst,
        gateway: addr(false),
        scope: u8::from(r.header.scope),
    })
}

/// What can go wrong while reading a link with [`link`].
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The netns could not be opened or entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// No netlink socket could be opened.
    #[error("open a netlink socket{}: {source}", in_netns(.netns))]
    Socket {
        /// The netns, if not the caller's own.
        netns: Option<PathBuf>,
        /// The error.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{what}{}: {source}", in_netns(.netns))]
    Request {
        /// What was asked.
        what: String,
        /// The netns, if not the caller's own.
        netns: Option<PathBuf>,
        /// The error.
        source: rtnetlink::Error,
    },
}

fn in_netns(netns: &Option<PathBuf>) -> String {
    netns
        .as_ref()
        .map(|p| format!(" in netns {}", p.display()))
        .unwrap_or_default()
}

/// A link with its IPv4 addresses and routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkView {
    /// Interface index.
    pub index: u32,
    /// MAC address.
    pub mac: [u8; 6],
    /// Administratively up.
    pub up: bool,
    /// Kind (`veth`, ...; empty if none).
    pub kind: String,
    /// MTU.
    pub mtu: Option<u32>,
    /// IPv4 addresses with their prefix lengths.
    pub addrs: Vec<(Ipv4Addr, u8)>,
    /// IPv4 routes of the main table whose output interface it is.
    pub routes: Vec<RouteView>,
    /// IPv6 addresses with their prefix lengths.
    pub addrs6: Vec<(Ipv6Addr, u8)>,
    /// IPv6 routes of the main table whose output interface it is:
    /// destination and gateway.
    pub routes6: Vec<(Ipv6Net, Option<Ipv6Addr>)>,
}

/// Reads link `ifname` with its addresses and routes in `netns` (the
/// caller's own netns if `None`), over a netlink connection of its own.
/// `Ok(None)` if there is no such link.
pub async fn link(netns: Option<&Path>, ifname: &str) -> Result<Option<LinkView>, InspectError> {
    match netns {
        Some(path) => link_in(Some(&Netns::open_path(path)?), ifname).await,
        None => link_in(None, ifname).await,
    }
}

/// Like [`link`], in a namespace already opened (and checked by the
/// caller).
pub async fn link_in(
    netns: Option<&Netns>,
    ifname: &str,
) -> Result<Option<LinkView>, InspectError> {
    let owned = netns.map(|ns| ns.path().to_path_buf());
    let socket_err = |source| InspectError::Socket {
        netns: owned.clone(),
        source,
    };
    let (connection, handle, _) = match netns {
        Some(ns) => {
            let runtime = tokio::runtime::Handle::current();
            ns.run(|| {
                let _runtime = runtime.enter();
                rtnetlink::new_connection()
            })?
            .map_err(socket_err)?
        }
        None => rtnetlink::new_connection().map_err(socket_err)?,
    };
    let connection = tokio::spawn(connection);
    let result = read(&handle, ifname, &owned).await;
    connection.abort();
    result
}

async fn read(
    handle: &Handle,
    ifname: &str,
    netns: &Option<PathBuf>,
) -> Result<Option<LinkView>, InspectError> {
    let request_err = |what: String| {
        let netns = netns.clone();
        move |source| InspectError::Request {
            what,
            netns,
            source,
        }
    };
    let Some(link) = find_link(handle, ifname)
        .await
        .map_err(request_err(format!("look up link {ifname}")))?
    else {
        return Ok(None);
    };
    let addrs = ipv4_addrs(handle, link.index)
        .await
        .map_err(request_err(format!("list addresses of {ifname}")))?;
    let routes = ipv4_routes(handle, link.index)
        .await
        .map_err(request_err("list routes".to_owned()))?;
    let addrs6 = ipv6_addrs(handle, link.index)
        .await
        .map_err(request_err(format!("list IPv6 addresses of {ifname}")))?;
    let routes6 = ipv6_routes(handle, link.index)
        .await
        .map_err(request_err("list IPv6 routes".to_owned()))?;
    Ok(Some(LinkView {
        index: link.index,
        mac: link.mac,
        up: link.up,
        kind: link.kind,
        mtu: link.mtu,
        addrs,
        routes,
        addrs6,
        routes6,
    }))
}
