//! Reading one link's state (flags, MAC, addresses, routes) over rtnetlink,
//! in the plugin's own netns or inside a container's, for the result's
//! MAC addresses and for `CHECK`.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
};
use nix::errno::Errno;
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::netns::{Netns, NetnsError};

/// What can go wrong while reading a link.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The netns could not be opened or entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// No netlink socket could be opened.
    #[error("open a netlink socket{}: {source}", in_netns(.netns))]
    Socket {
        /// The netns, if not the plugin's own.
        netns: Option<PathBuf>,
        /// The error.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{what}{}: {source}", in_netns(.netns))]
    Request {
        /// What was asked.
        what: String,
        /// The netns, if not the plugin's own.
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

/// One IPv4 route through the link, from the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteView {
    /// Destination.
    pub dst: Ipv4Net,
    /// Next hop, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Scope (0 universe, 253 link, 254 host).
    pub scope: u8,
}

/// A link as the kernel reports it.
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
}

/// Reads link `ifname` in `netns` (the plugin's own netns if `None`).
/// `Ok(None)` if there is no such link.
pub async fn link(netns: Option<&Path>, ifname: &str) -> Result<Option<LinkView>, InspectError> {
    let owned = netns.map(Path::to_path_buf);
    let socket_err = |source| InspectError::Socket {
        netns: owned.clone(),
        source,
    };
    let (connection, handle, _) = match netns {
        Some(path) => {
            let ns = Netns::open_path(path)?;
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
    let mut links = handle.link().get().match_name(ifname.to_owned()).execute();
    let message = match links.try_next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(None),
        Err(e) if matches!(errno(&e), Some(Errno::ENODEV | Errno::ENOENT)) => return Ok(None),
        Err(e) => return Err(request_err(format!("look up link {ifname}"))(e)),
    };
    let index = message.header.index;
    let mut request = handle.address().get().set_link_index_filter(index);
    request.message_mut().header.family = AddressFamily::Inet;
    let addrs = request
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(request_err(format!("list addresses of {ifname}")))?
        .iter()
        .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == index)
        .filter_map(|m| {
            m.attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })
                .or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    })
                })
                .map(|ip| (ip, m.header.prefix_len))
        })
        .collect();
    let routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(request_err("list routes".to_owned()))?
        .iter()
        .filter(|r| table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
        .filter(|r| {
            r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
        })
        .filter_map(route_view)
        .collect();
    Ok(Some(LinkView {
        index,
        mac: mac(&message),
        up: message.header.flags.contains(LinkFlags::Up),
        kind: kind(&message),
        mtu: message.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        }),
        addrs,
        routes,
    }))
}

fn errno(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) => {
            m.code.map(|c| Errno::from_raw(c.get().saturating_abs()))
        }
        _ => None,
    }
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

fn mac(m: &LinkMessage) -> [u8; 6] {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
            _ => None,
        })
        .unwrap_or_default()
}

fn kind(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::Kind(k) => Some(k.to_string()),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or_default()
}
