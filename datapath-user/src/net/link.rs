//! The agent's rtnetlink layer: one veth pair per container, no bridge, the
//! way CNI `ptp` and warden wire containers.
//!
//! For a container the agent creates a veth pair whose host end stays in the
//! agent's netns and whose other end is created directly inside the
//! container's netns. The container gets its address as a /32 and two
//! routes: the gateway as a link-scope /32 and a default route via the
//! gateway. Every host end carries that same gateway address as a /32, and
//! the agent's netns routes each container address as a /32 to its host end.
//! Nothing is on-link but the gateway, so every packet a container sends
//! crosses its host-side veth, where the datapath's programs sit.
//!
//! Everything goes through netlink sockets and one ethtool ioctl; no `ip` or
//! `ethtool` process is spawned, and a container link is set up in a handful
//! of round trips.

use std::{
    fmt, io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::PathBuf,
    time::Instant,
};

use ipnet::Ipv4Net;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags},
    link::{InfoData, InfoVeth},
    route::RouteScope,
};
use nix::{
    errno::Errno,
    sys::socket::{self, SockFlag, SockType},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use super::{
    inspect::{self, Link},
    netns::{Netns, NetnsError, NetnsId},
};
use crate::model::{
    GATEWAY6,
    identity::VETH_GROUP,
    names::{InvalidName, MAX_IFNAME_LEN, validate_ifname},
};

/// What can go wrong while configuring links. Every variant says which step
/// failed, on which link and in which netns.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// [`Netlink::new`] was called outside a tokio runtime.
    #[error("the netlink connection needs a tokio runtime to run on")]
    NoRuntime,
    /// An interface name the kernel would refuse.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// A sysctl of a host end could not be set.
    #[error("set the sysctls of {link}: {source}")]
    Sysctl {
        /// The link.
        link: String,
        /// The error.
        source: io::Error,
    },
    /// The container's netns could not be opened or entered.
    #[error("container network namespace")]
    Netns(#[from] NetnsError),
    /// A netlink socket could not be opened.
    #[error("open a netlink socket {netns}")]
    Socket {
        /// Where the socket was to be opened.
        netns: InNetns,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The kernel answered ENODEV or ENOENT: the link, address or route does
    /// not exist.
    #[error("{step} on {link} {netns}: not found")]
    NotFound {
        /// The step that failed.
        step: &'static str,
        /// The link it was about.
        link: String,
        /// The netns it ran in.
        netns: InNetns,
        /// The kernel's answer.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// The kernel answered EEXIST: a link, address or route of that name or
    /// destination is already there.
    #[error("{step} on {link} {netns}: already exists")]
    AlreadyExists {
        /// The step that failed.
        step: &'static str,
        /// The link it was about.
        link: String,
        /// The netns it ran in.
        netns: InNetns,
        /// The kernel's answer.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Any other failure of a netlink request.
    #[error("{step} on {link} {netns}")]
    Request {
        /// The step that failed.
        step: &'static str,
        /// The link it was about.
        link: String,
        /// The netns it ran in.
        netns: InNetns,
        /// The kernel's answer, or the connection's failure.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// The kernel's answer lacked something it always carries.
    #[error("{step} on {link} {netns}: the kernel's reply has no {what}")]
    BadReply {
        /// The step whose reply was incomplete.
        step: &'static str,
        /// The link it was about.
        link: String,
        /// The netns it ran in.
        netns: InNetns,
        /// What was missing.
        what: &'static str,
    },
    /// GRO could not be turned on (ethtool ioctl).
    #[error("enable GRO on {link} {netns}")]
    Gro {
        /// The link.
        link: String,
        /// The netns it is in.
        netns: InNetns,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The netlink connection stopped while requests were pending.
    #[error("the netlink connection {netns} closed")]
    ConnectionClosed {
        /// Where the connection was.
        netns: InNetns,
    },
    /// Deleting by name found a link that is not a veth, which this layer
    /// never creates: it is left alone.
    #[error("{name} is a link of kind {kind:?}, not a veth; not deleting it")]
    NotVeth {
        /// The link's name.
        name: String,
        /// Its kind ("" for links without one, like physical NICs).
        kind: String,
    },
    /// The overlay device's name is taken by a link that is not a VXLAN
    /// device: it is left alone.
    #[error("{name} is a link of kind {kind:?}, not a VXLAN device; not using it")]
    NotVxlan {
        /// The link's name.
        name: String,
        /// Its kind.
        kind: String,
    },
    /// Deleting by name found a veth the agent did not make (not in its
    /// group, [`VETH_GROUP`]): it is left alone.
    #[error(
        "{name} is a veth the agent did not make (group {group}, not the agent's); not deleting it"
    )]
    NotOurs {
        /// The link's name.
        name: String,
        /// Its group.
        group: u32,
    },
    /// A setup step failed and removing what had been created failed too.
    #[error("{source}; removing the half-made link failed too: {rollback}")]
    RollbackFailed {
        /// The failure of the setup step.
        #[source]
        source: Box<NetlinkError>,
        /// The failure of the rollback.
        rollback: Box<NetlinkError>,
    },
}

impl NetlinkError {
    /// Whether the thing acted on does not exist: a link, address or route
    /// the kernel does not know (ENODEV/ENOENT), or a network namespace that
    /// is gone.
    pub fn is_not_found(&self) -> bool {
        match self {
            Self::NotFound { .. } => true,
            Self::Netns(e) => e.is_not_found(),
            Self::RollbackFailed { source, .. } => source.is_not_found(),
            _ => false,
        }
    }

    /// Whether the container's namespace is certainly gone: nothing at its
    /// path, or the path names another namespace now
    /// ([`NetnsError::is_gone`]).
    pub fn is_netns_gone(&self) -> bool {
        match self {
            Self::Netns(e) => e.is_gone(),
            Self::RollbackFailed { source, .. } => source.is_netns_gone(),
            _ => false,
        }
    }

    /// Whether a link, address or route was already there (EEXIST).
    pub fn is_already_exists(&self) -> bool {
        match self {
            Self::AlreadyExists { .. } => true,
            Self::RollbackFailed { source, .. } => source.is_already_exists(),
            _ => false,
        }
    }

    /// Sorts a failed request by the kernel's error code.
    fn request(step: &'static str, link: &str, netns: &InNetns, source: rtnetlink::Error) -> Self {
        let (link, netns) = (link.to_owned(), netns.clone());
        let errno = super::errno(&source);
        let source = Box::new(source);
        match errno {
            Some(Errno::ENODEV | Errno::ENOENT) => Self::NotFound {
                step,
                link,
                netns,
                source,
            },
            Some(Errno::EEXIST) => Self::AlreadyExists {
                step,
                link,
                netns,
                source,
            },
            _ => Self::Request {
                step,
                link,
                netns,
                source,
            },
        }
    }
}

/// The network namespace a step ran in, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InNetns {
    /// The agent's own netns (where [`Netlink`] was created).
    Agent,
    /// A container's netns, by the path it was opened from.
    Container(PathBuf),
}

impl fmt::Display for InNetns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agent => f.write_str("in the agent's netns"),
            Self::Container(path) => write!(f, "in netns {}", path.display()),
        }
    }
}

/// A container's link to create.
///
/// The container's address is assigned as a /32 (no connected prefix route,
/// so nothing is on-link but the gateway), which is why no pool prefix
/// length is needed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerLink {
    /// Name of the host end, in the agent's netns (at most 15 bytes).
    pub host_ifname: String,
    /// Path of the container's netns file (`/var/run/netns/NAME`,
    /// `/proc/PID/ns/net`, ...).
    pub netns: PathBuf,
    /// The namespace the path must name (its identity, recorded when the
    /// container was added); `None` to take whatever namespace is there.
    pub netns_id: Option<NetnsId>,
    /// The alias of the host end (the agent's tag of the veth); none if
    /// empty.
    pub alias: String,
    /// Name of the container end, inside its netns (e.g. `eth0`).
    pub ifname: String,
    /// The container's address (assigned as a /32).
    pub addr: Ipv4Addr,
    /// The gateway: a /32 on the host end, the container's default route.
    pub gateway: Ipv4Addr,
    /// The container's IPv6 address on a dual-stack node (assigned as a
    /// /128, routed via [`GATEWAY6`] on the host end).
    pub addr6: Option<Ipv6Addr>,
    /// MTU of both ends; the kernel's default (1500) when `None`.
    pub mtu: Option<u32>,
    /// Turn GRO on on the container end. Native-mode XDP redirects into the
    /// host end are dropped unless the container end has GRO (or an XDP
    /// program).
    pub gro: bool,
}

impl ContainerLink {
    /// Checks what the kernel would otherwise refuse halfway through.
    pub fn validate(&self) -> Result<(), NetlinkError> {
        validate_ifname(&self.host_ifname)?;
        Ok(validate_ifname(&self.ifname)?)
    }
}

/// What [`Netlink::create_container_link`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// Index of the host end, in the agent's netns.
    pub host_ifindex: u32,
    /// MAC address of the host end (the container's gateway MAC).
    pub host_mac: [u8; 6],
    /// Index of the container end, in the container's netns.
    pub container_ifindex: u32,
    /// MAC address of the container end.
    pub container_mac: [u8; 6],
}

/// An rtnetlink connection in the netns that was current when it was made
/// (the agent's).
#[derive(Debug)]
pub struct Netlink {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's netns and spawns its
    /// connection on the current tokio runtime.
    pub fn new() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Socket {
                netns: InNetns::Agent,
                source,
            })?;
        Ok(Self {
            handle,
            connection: runtime.spawn(connection),
        })
    }

    /// Creates and configures a container's veth pair (see the module's
    /// documentation for the resulting layout).
    ///
    /// If any step fails, the pair is deleted again and the step's error is
    /// returned. If the host name or the container name is taken, nothing is
    /// created and the error says so ([`NetlinkError::is_already_exists`]).
    /// A missing container netns gives an error that
    /// [`NetlinkError::is_not_found`].
    pub async fn create_container_link(
        &self,
        spec: &ContainerLink,
    ) -> Result<LinkInfo, NetlinkError> {
        let started = Instant::now();
        spec.validate()?;
        let netns = Netns::open_expecting(&spec.netns, spec.netns_id)?;
        netns.check_container_netns()?;
        self.add_veth_pair(spec, &netns).await?;
        // The host end is policed before the container end can send
        // anything: the container end is down until it is configured.
        let result = match self.secure_host_end(spec).await {
            Ok(()) => self.configure_container_link(spec, &netns).await,
            Err(e) => Err(e),
        };
        let info = match result {
            Ok(info) => info,
            Err(error) => {
                return Err(match self.delete_container_link(&spec.host_ifname).await {
                    Ok(()) => error,
                    Err(rollback) => NetlinkError::RollbackFailed {
                        source: Box::new(error),
                        rollback: Box::new(rollback),
                    },
                });
            }
        };
        tracing::debug!(
            host_ifname = %spec.host_ifname,
            netns = %spec.netns.display(),
            elapsed_us = started.elapsed().as_micros(),
            "created container link"
        );
        Ok(info)
    }

    /// Step 1: the veth pair, its container end created right inside the
    /// container's netns under its final name (the kernel checks that name
    /// there, so it cannot clash with the agent's links), the host end up.
    async fn add_veth_pair(&self, spec: &ContainerLink, netns: &Netns) -> Result<(), NetlinkError> {
        // The container end cannot be created up: veth refuses to open
        // (ENOTCONN) until its peer is registered, which happens after.
        let mut peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(spec.ifname.as_str())
            .setns_by_fd(netns.as_fd().as_raw_fd());
        // The group marks the veth as the agent's from the message that
        // creates it: no crash can leave an unmarked veth of the agent's.
        let mut host = LinkVeth::new(&spec.host_ifname, &spec.ifname)
            .up()
            .link_group(VETH_GROUP);
        if let Some(mtu) = spec.mtu {
            peer = peer.mtu(mtu);
            host = host.mtu(mtu);
        }
        let message = host
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| {
                let link = format!(
                    "{} (peer {} in netns {})",
                    spec.host_ifname,
                    spec.ifname,
                    spec.netns.display()
                );
                NetlinkError::request("create veth pair", &link, &InNetns::Agent, e)
            })
    }

    /// Step 2: the host end's alias (the agent's tag) and its sysctls: no
    /// router advertisements or redirects from the container are accepted
    /// (the kernel's defaults would let a container with CAP_NET_RAW become
    /// the node's IPv6 default router).
    async fn secure_host_end(&self, spec: &ContainerLink) -> Result<(), NetlinkError> {
        if spec.alias.is_empty() {
            return harden_host_end(&spec.host_ifname).map_err(|source| NetlinkError::Sysctl {
                link: spec.host_ifname.clone(),
                source,
            });
        }
        self.retag(&spec.host_ifname, &spec.alias).await
    }

    /// Steps 3 to 5: GRO, then the container end and the host end
    /// configured concurrently over their own sockets.
    async fn configure_container_link(
        &self,
        spec: &ContainerLink,
        netns: &Netns,
    ) -> Result<LinkInfo, NetlinkError> {
        let container = InNetns::Container(spec.netns.clone());
        let runtime = tokio::runtime::Handle::current();
        // One short trip into the container's netns: a netlink socket and
        // an ethtool socket bound there (both used from here afterwards).
        let (connection, handle, _, ethtool) = netns.run(|| {
            let _runtime = runtime.enter();
            let (connection, handle, messages) =
                rtnetlink::new_connection().map_err(|source| NetlinkError::Socket {
                    netns: container.clone(),
                    source,
                })?;
            let ethtool = if spec.gro {
                Some(ethtool_socket().map_err(|source| NetlinkError::Gro {
                    link: spec.ifname.clone(),
                    netns: container.clone(),
                    source,
                })?)
            } else {
                None
            };
            Ok::<_, NetlinkError>((connection, handle, messages, ethtool))
        })??;

        let container_side = async {
            let work = configure_container_end(&handle, spec, &container);
            tokio::pin!(connection);
            let closed = || NetlinkError::ConnectionClosed {
                netns: container.clone(),
            };
            tokio::select! {
                biased;
                result = work => result,
                () = &mut connection => Err(closed()),
            }
        };
        let host_side = self.configure_host_end(spec);
        let ((host_ifindex, host_mac), (container_ifindex, container_mac)) =
            futures::try_join!(host_side, container_side)?;
        if let Some(socket) = ethtool {
            // Only now that the container end is up: a veth turns on the
            // NAPI instance that native XDP redirects need when GRO changes
            // while it is running, not when it is brought up with GRO set.
            enable_gro(socket.as_fd(), &spec.ifname).map_err(|source| NetlinkError::Gro {
                link: spec.ifname.clone(),
                netns: container.clone(),
                source,
            })?;
        }
        Ok(LinkInfo {
            host_ifindex,
            host_mac,
            container_ifindex,
            container_mac,
        })
    }

    /// Step 4: the gateway /32 on the host end and the container's /32
    /// route to it.
    async fn configure_host_end(
        &self,
        spec: &ContainerLink,
    ) -> Result<(u32, [u8; 6]), NetlinkError> {
        let agent = InNetns::Agent;
        let name = spec.host_ifname.as_str();
        let (index, mac) = lookup_link(&self.handle, name, &agent).await?;
        let address = async {
            self.handle
                .address()
                .add(index, IpAddr::V4(spec.gateway), 32)
                .execute()
                .await
                .map_err(|e| NetlinkError::request("add the gateway address", name, &agent, e))?;
            if spec.addr6.is_some() {
                add_address6(&self.handle, index, GATEWAY6, 64)
                    .await
                    .map_err(|e| {
                        NetlinkError::request("add the IPv6 gateway address", name, &agent, e)
                    })?;
            }
            Ok::<_, NetlinkError>(())
        };
        let route = async {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(spec.addr, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build();
            self.handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(|e| NetlinkError::request("add the container's route", name, &agent, e))?;
            if let Some(addr6) = spec.addr6 {
                let route = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(addr6, 128)
                    .output_interface(index)
                    .build();
                self.handle
                    .route()
                    .add(route)
                    .execute()
                    .await
                    .map_err(|e| {
                        NetlinkError::request("add the container's IPv6 route", name, &agent, e)
                    })?;
            }
            Ok::<_, NetlinkError>(())
        };
        futures::try_join!(address, route)?;
        Ok((index, mac))
    }

    /// Deletes a container's veth pair by the name of its host end (the
    /// container end goes with it). Succeeds if no such link exists; refuses
    /// to delete a link that is not a veth, or a veth not in the agent's
    /// group ([`VETH_GROUP`]: the agent did not make it).
    pub async fn delete_container_link(&self, host_ifname: &str) -> Result<(), NetlinkError> {
        let Some(link) = self.link(host_ifname).await? else {
            return Ok(());
        };
        if link.kind != "veth" {
            return Err(NetlinkError::NotVeth {
                name: host_ifname.to_owned(),
                kind: link.kind,
            });
        }
        if link.group != VETH_GROUP {
            return Err(NetlinkError::NotOurs {
                name: host_ifname.to_owned(),
                group: link.group,
            });
        }
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) => match NetlinkError::request("delete link", host_ifname, &InNetns::Agent, e) {
                // Gone meanwhile (the container's netns was destroyed).
                e if e.is_not_found() => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Looks a link up by name; `None` if there is none.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        validate_ifname(name)?;
        inspect::find_link(&self.handle, name)
            .await
            .map_err(|e| NetlinkError::request("look up link", name, &InNetns::Agent, e))
    }

    /// The IPv4 addresses of a link, with their prefix lengths.
    pub async fn ipv4_addrs(&self, ifindex: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        inspect::ipv4_addrs(&self.handle, ifindex)
            .await
            .map_err(|e| {
                NetlinkError::request(
                    "list addresses",
                    &format!("ifindex {ifindex}"),
                    &InNetns::Agent,
                    e,
                )
            })
    }

    /// Makes sure the overlay device `name` exists: a collect-metadata
    /// ("external") VXLAN device sending to UDP `port`, with MTU `mtu`, up.
    /// An existing VXLAN device of that name is kept (its traffic goes on
    /// across an agent restart) and only given the MTU and brought up.
    /// Returns its ifindex.
    pub async fn ensure_vxlan(
        &self,
        name: &str,
        port: u16,
        mtu: Option<u32>,
    ) -> Result<u32, NetlinkError> {
        let agent = InNetns::Agent;
        if let Some(link) = self.link(name).await? {
            if link.kind != "vxlan" {
                return Err(NetlinkError::NotVxlan {
                    name: name.to_owned(),
                    kind: link.kind,
                });
            }
            let mut change = LinkUnspec::new_with_index(link.index).up();
            if let Some(mtu) = mtu {
                change = change.mtu(mtu);
            }
            self.handle
                .link()
                .change(change.build())
                .execute()
                .await
                .map_err(|e| {
                    NetlinkError::request("configure the overlay device", name, &agent, e)
                })?;
            return Ok(link.index);
        }
        let mut add = LinkMessageBuilder::<LinkVxlan>::new(name)
            .collect_metadata(true)
            .port(port)
            .up();
        if let Some(mtu) = mtu {
            add = add.mtu(mtu);
        }
        self.handle
            .link()
            .add(add.build())
            .execute()
            .await
            .map_err(|e| NetlinkError::request("create the overlay device", name, &agent, e))?;
        self.link(name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| NetlinkError::NotVxlan {
                name: name.to_owned(),
                kind: "nothing".to_owned(),
            })
    }

    /// Routes `cluster` through the overlay device `ifindex` from source
    /// `gateway` (the node's gateway address, given to the device as a /32),
    /// so that the node itself reaches the containers of the other nodes
    /// with an address of the cluster (never masqueraded by the receiving
    /// node). The device does no ARP: the program on its egress gives the
    /// packets their tunnel key and the receiving node's program their
    /// container's MACs. Replaces what an earlier agent set.
    pub async fn route_cluster(
        &self,
        name: &str,
        ifindex: u32,
        cluster: Ipv4Net,
        gateway: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let agent = InNetns::Agent;
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(ifindex).arp(false).build())
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::request("turn ARP off on the overlay device", name, &agent, e)
            })?;
        self.handle
            .address()
            .add(ifindex, IpAddr::V4(gateway), 32)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::request("add the gateway address", name, &agent, e))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(cluster.network(), cluster.prefix_len())
            .output_interface(ifindex)
            .pref_source(gateway)
            .scope(RouteScope::Link)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::request("route the cluster CIDR", name, &agent, e))
    }

    /// Deletes the overlay device `name` if it exists (and is a VXLAN
    /// device).
    pub async fn delete_vxlan(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        if link.kind != "vxlan" {
            return Err(NetlinkError::NotVxlan {
                name: name.to_owned(),
                kind: link.kind,
            });
        }
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) => match NetlinkError::request("delete link", name, &InNetns::Agent, e) {
                e if e.is_not_found() => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Every IPv4 address of the agent's netns: (link index, address,
    /// prefix length).
    pub async fn all_ipv4_addrs(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>, NetlinkError> {
        inspect::all_ipv4_addrs(&self.handle)
            .await
            .map_err(|e| NetlinkError::request("list addresses", "all links", &InNetns::Agent, e))
    }

    /// Every IPv4 route of the main table of the agent's netns, with its
    /// output interface.
    pub async fn all_ipv4_routes(
        &self,
    ) -> Result<Vec<(inspect::RouteView, Option<u32>)>, NetlinkError> {
        inspect::all_ipv4_routes(&self.handle)
            .await
            .map_err(|e| NetlinkError::request("list routes", "all links", &InNetns::Agent, e))
    }

    /// Hardens link `name` like a new host end ([`harden_host_end`]) and
    /// tags it as the agent's: its group ([`VETH_GROUP`]) and `alias`. For
    /// a new host end, and for a container's veth made by an agent that
    /// did not tag it.
    pub async fn retag(&self, name: &str, alias: &str) -> Result<(), NetlinkError> {
        let agent = InNetns::Agent;
        harden_host_end(name).map_err(|source| NetlinkError::Sysctl {
            link: name.to_owned(),
            source,
        })?;
        let (index, _) = lookup_link(&self.handle, name, &agent).await?;
        self.handle
            .link()
            .change(
                LinkUnspec::new_with_index(index)
                    .alias(alias.to_owned())
                    .link_group(VETH_GROUP)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetlinkError::request("tag", name, &agent, e))
    }

    /// Every link of the agent's netns.
    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        inspect::links(&self.handle)
            .await
            .map_err(|e| NetlinkError::request("list links", "all", &InNetns::Agent, e))
    }

    /// The links whose names start with `prefix` (to find host ends left
    /// behind by containers that are gone).
    pub async fn links_with_prefix(&self, prefix: &str) -> Result<Vec<Link>, NetlinkError> {
        let links = inspect::links(&self.handle).await.map_err(|e| {
            NetlinkError::request("list links", &format!("{prefix}*"), &InNetns::Agent, e)
        })?;
        Ok(links
            .into_iter()
            .filter(|link| link.name.starts_with(prefix))
            .collect())
    }
}

/// Step 3: inside the container, loopback and the link up, the address as
/// a /32, the gateway as a link-scope /32 and the default route via the
/// gateway.
async fn configure_container_end(
    handle: &Handle,
    spec: &ContainerLink,
    netns: &InNetns,
) -> Result<(u32, [u8; 6]), NetlinkError> {
    let name = spec.ifname.as_str();
    let (index, mac) = lookup_link(handle, name, netns).await?;
    let loopback = async {
        handle
            .link()
            .change(LinkUnspec::new_with_name("lo").up().build())
            .execute()
            .await
            .map_err(|e| NetlinkError::request("bring up", "lo", netns, e))
    };
    let address = async {
        handle
            .address()
            .add(index, IpAddr::V4(spec.addr), 32)
            .execute()
            .await
            .map_err(|e| NetlinkError::request("add the container address", name, netns, e))?;
        if let Some(addr6) = spec.addr6 {
            add_address6(handle, index, addr6, 128).await.map_err(|e| {
                NetlinkError::request("add the container's IPv6 address", name, netns, e)
            })?;
        }
        Ok::<_, NetlinkError>(())
    };
    // Routes need the link up.
    let routes =
        async {
            handle
                .link()
                .change(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(|e| NetlinkError::request("bring up", name, netns, e))?;
            let gateway = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(spec.gateway, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build();
            handle
                .route()
                .add(gateway)
                .execute()
                .await
                .map_err(|e| NetlinkError::request("add the gateway route", name, netns, e))?;
            let default = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(spec.gateway)
                .output_interface(index)
                .build();
            handle
                .route()
                .add(default)
                .execute()
                .await
                .map_err(|e| NetlinkError::request("add the default route", name, netns, e))?;
            if spec.addr6.is_some() {
                // A link-local next hop needs only the interface.
                let default6 = RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(GATEWAY6)
                    .output_interface(index)
                    .build();
                handle.route().add(default6).execute().await.map_err(|e| {
                    NetlinkError::request("add the IPv6 default route", name, netns, e)
                })?;
            }
            Ok::<_, NetlinkError>(())
        };
    futures::try_join!(loopback, address, routes)?;
    Ok((index, mac))
}

/// Adds IPv6 address `addr`/`prefix_len` to link `index` without duplicate
/// address detection: usable at once (a tentative address cannot be a
/// source or answer neighbour solicitations), and on a veth pair nobody
/// else can hold it.
async fn add_address6(
    handle: &Handle,
    index: u32,
    addr: Ipv6Addr,
    prefix_len: u8,
) -> Result<(), rtnetlink::Error> {
    let mut req = handle.address().add(index, IpAddr::V6(addr), prefix_len);
    req.message_mut()
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    req.execute().await
}

/// A link's index and MAC address, by name; a missing link is an error.
async fn lookup_link(
    handle: &Handle,
    name: &str,
    netns: &InNetns,
) -> Result<(u32, [u8; 6]), NetlinkError> {
    match inspect::find_link(handle, name).await {
        Ok(Some(link)) => Ok((link.index, link.mac)),
        Ok(None) => Err(NetlinkError::BadReply {
            step: "look up link",
            link: name.to_owned(),
            netns: netns.clone(),
            what: "link",
        }),
        Err(e) => Err(NetlinkError::request("look up link", name, netns, e)),
    }
}

/// `ETHTOOL_GGRO` and `ETHTOOL_SGRO` from linux/ethtool.h.
const ETHTOOL_GGRO: u32 = 0x0000_002b;
const ETHTOOL_SGRO: u32 = 0x0000_002c;

/// `struct ethtool_value` from linux/ethtool.h.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Runs one `ETHTOOL_{G,S}*` command that takes a `struct ethtool_value`
/// and returns the value's data afterwards.
fn ethtool_value(socket: BorrowedFd<'_>, ifname: &str, cmd: u32, data: u32) -> io::Result<u32> {
    if ifname.len() > MAX_IFNAME_LEN {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: ifreq is plain data (a name and a union of integers, addresses
    // and a pointer), for which all zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: the name is NUL-terminated (at most 15 bytes copied into 16
    // zeroed ones) and ifru_data points to an ethtool_value that outlives
    // the call, as SIOCETHTOOL with a *_GRO command expects.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

/// A socket for ethtool ioctls on the links of the calling thread's netns.
fn ethtool_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        socket::AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Turns GRO on for `ifname` (in the netns `socket` was opened in), off
/// first so that the kernel sees a change, and checks that it stayed on.
fn enable_gro(socket: BorrowedFd<'_>, ifname: &str) -> io::Result<()> {
    ethtool_value(socket, ifname, ETHTOOL_SGRO, 0)?;
    ethtool_value(socket, ifname, ETHTOOL_SGRO, 1)?;
    if ethtool_value(socket, ifname, ETHTOOL_GGRO, 0)? == 0 {
        return Err(io::Error::other("the kernel left GRO off"));
    }
    Ok(())
}

/// Enables IPv4 forwarding in the calling thread's netns (the agent's).
pub fn enable_ip_forward() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
}

/// Enables IPv6 forwarding in the calling thread's netns (the agent's), on
/// a dual-stack node. Only this namespace's: `all.forwarding` also makes
/// its interfaces act as routers (no router advertisements accepted),
/// which the host ends must do anyway.
pub fn enable_ipv6_forward() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
}

/// The sysctls of a host-side veth (in the calling thread's netns) that
/// keep a container from steering the node: `accept_ra=0` and
/// `accept_redirects=0` for IPv6, `accept_redirects=0` for IPv4.
pub fn harden_host_end(ifname: &str) -> io::Result<()> {
    validate_ifname(ifname).map_err(io::Error::other)?;
    for (family, key) in [
        ("ipv6", "accept_ra"),
        ("ipv6", "accept_redirects"),
        ("ipv4", "accept_redirects"),
    ] {
        let path = format!("/proc/sys/net/{family}/conf/{ifname}/{key}");
        match std::fs::write(&path, "0") {
            Ok(()) => {}
            // IPv6 disabled on the node: nothing to accept.
            Err(e) if e.kind() == io::ErrorKind::NotFound && family == "ipv6" => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! These tests build a node from throwaway namespaces: a "node" netns
    //! stands for the agent's, and every container gets its own. Nothing
    //! is created in the namespace the tests run in.

    use std::{
        future::Future,
        net::SocketAddrV4,
        path::Path,
        process::Command,
        sync::atomic::{AtomicU16, Ordering},
        time::Duration,
    };

    use nix::sys::{
        socket::{MsgFlags, SockProtocol, SockaddrIn, sockopt},
        time::TimeVal,
    };

    use super::{super::netns::testing::TestNetns, *};
    use crate::model::mac::format_mac;

    /// Runs `f` on a thread inside `netns`, on a runtime of its own: there,
    /// [`Netlink::new`] talks to that netns as the agent would to its own.
    fn in_netns<F, Fut, T>(netns: &TestNetns, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        netns
            .open()
            .run(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build a runtime")
                    .block_on(f())
            })
            .expect("enter the test netns")
    }

    fn spec(container: &TestNetns, host_ifname: &str, subnet: u8) -> ContainerLink {
        ContainerLink {
            host_ifname: host_ifname.to_owned(),
            netns: container.path.clone(),
            netns_id: None,
            alias: format!("datapath test {host_ifname}"),
            ifname: "eth0".to_owned(),
            addr: Ipv4Addr::new(198, 19, subnet, 2),
            gateway: Ipv4Addr::new(198, 19, subnet, 1),
            addr6: None,
            mtu: None,
            gro: false,
        }
    }

    /// `ip -j ARGS` run with `nsenter --net=PATH`, parsed.
    fn ip_json(netns: &Path, args: &[&str]) -> serde_json::Value {
        let output = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["ip", "-j"])
            .args(args)
            .output()
            .expect("run nsenter ip");
        assert!(
            output.status.success(),
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("parse ip's JSON")
    }

    fn ip_cmd(netns: &Path, args: &[&str]) {
        let status = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("ip")
            .args(args)
            .status()
            .expect("run nsenter ip");
        assert!(status.success(), "ip {args:?} failed");
    }

    fn link_names(netns: &Path) -> Vec<String> {
        ip_json(netns, &["link", "show"])
            .as_array()
            .expect("a list of links")
            .iter()
            .filter_map(|link| link["ifname"].as_str().map(str::to_owned))
            .collect()
    }

    fn gro_is_on(netns: &Path, ifname: &str) -> bool {
        let output = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["ethtool", "-k", ifname])
            .output()
            .expect("run nsenter ethtool");
        assert!(output.status.success(), "ethtool -k {ifname} failed");
        let features = String::from_utf8_lossy(&output.stdout);
        let line = features
            .lines()
            .find(|line| line.starts_with("generic-receive-offload:"))
            .expect("ethtool lists generic-receive-offload");
        line.contains(": on")
    }

    fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Sends one ICMP echo request to `dst` from the calling thread's netns
    /// and waits up to two seconds for the matching reply (a raw socket: no
    /// ping binary needed). False if it cannot be sent (no route) or no
    /// reply came.
    fn icmp_echo(dst: Ipv4Addr) -> bool {
        static NEXT_ID: AtomicU16 = AtomicU16::new(0);
        let id = (std::process::id() as u16) ^ NEXT_ID.fetch_add(0x101, Ordering::Relaxed);
        let socket = socket::socket(
            socket::AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        )
        .expect("open a raw ICMP socket");
        socket::setsockopt(&socket, sockopt::ReceiveTimeout, &TimeVal::new(0, 200_000))
            .expect("set a receive timeout");
        let mut request = [0u8; 16];
        request[0] = 8; // echo request
        request[4..6].copy_from_slice(&id.to_be_bytes());
        request[6..8].copy_from_slice(&1u16.to_be_bytes());
        request[8..].copy_from_slice(b"datapath");
        let sum = checksum(&request);
        request[2..4].copy_from_slice(&sum.to_be_bytes());
        let to = SockaddrIn::from(SocketAddrV4::new(dst, 0));
        if let Err(e) = socket::sendto(socket.as_raw_fd(), &request, &to, MsgFlags::empty()) {
            println!("echo request to {dst}: {e}");
            return false;
        }

        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            let len = match socket::recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(len) => len,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => panic!("receive ICMP: {e}"),
            };
            let packet = &buf[..len];
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let Some(icmp) = packet.get(header_len..header_len + 8) else {
                continue;
            };
            let from = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            if from == dst && icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() {
                return true;
            }
        }
        false
    }

    fn host_ifname(n: u32) -> String {
        format!("dp{n:08x}")
    }

    #[tokio::test]
    async fn new_without_a_runtime_is_an_error() {
        // A runtime exists here, but not on this plain thread.
        let result = std::thread::spawn(Netlink::new)
            .join()
            .expect("join the thread");
        assert!(matches!(result, Err(NetlinkError::NoRuntime)), "{result:?}");
    }

    #[test]
    fn validate_rejects_names_the_kernel_would_refuse() {
        let container = PathBuf::from("/var/run/netns/dpt-unused");
        let good = ContainerLink {
            host_ifname: "dp0123abcd".to_owned(),
            netns: container,
            netns_id: None,
            alias: String::new(),
            ifname: "eth0".to_owned(),
            addr: Ipv4Addr::new(198, 19, 0, 2),
            gateway: Ipv4Addr::new(198, 19, 0, 1),
            addr6: None,
            mtu: None,
            gro: false,
        };
        good.validate().expect("a valid spec");
        for bad in ["", "dp0123456789abcd", "a/b", "a b", "eth0:1", ".."] {
            let mut host = good.clone();
            host.host_ifname = bad.to_owned();
            assert!(
                matches!(host.validate(), Err(NetlinkError::InvalidName(_))),
                "host name {bad:?} was accepted"
            );
            let mut peer = good.clone();
            peer.ifname = bad.to_owned();
            assert!(
                matches!(peer.validate(), Err(NetlinkError::InvalidName(_))),
                "container name {bad:?} was accepted"
            );
        }
    }

    #[test]
    fn create_container_link_wires_container_and_host_like_ptp() {
        let node = TestNetns::new("node");
        let container = TestNetns::new("ctr");
        let mut spec = spec(&container, &host_ifname(1), 1);
        spec.mtu = Some(1400);
        spec.gro = true;

        let (info, host) = in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            let started = Instant::now();
            let info = netlink
                .create_container_link(&spec)
                .await
                .expect("create the container link");
            println!("create_container_link took {:?}", started.elapsed());

            let host = netlink
                .link(&spec.host_ifname)
                .await
                .expect("look up the host end")
                .expect("the host end exists");
            let addrs = netlink
                .ipv4_addrs(info.host_ifindex)
                .await
                .expect("list the host end's addresses");
            assert_eq!(addrs, vec![(spec.gateway, 32)]);
            // Through the host end's /32 route, and back.
            assert!(icmp_echo(spec.addr), "the node cannot reach the container");
            (info, host)
        });
        assert_eq!(
            (host.index, host.mac, host.kind.as_str()),
            (info.host_ifindex, info.host_mac, "veth")
        );

        // Container side.
        let links = ip_json(&container.path, &["link", "show", "dev", "eth0"]);
        let eth0 = &links[0];
        assert_eq!(eth0["ifindex"], info.container_ifindex);
        assert_eq!(eth0["address"], format_mac(info.container_mac));
        assert_eq!(eth0["mtu"], 1400);
        assert_eq!(eth0["operstate"], "UP");
        let addrs = ip_json(&container.path, &["-4", "addr", "show", "dev", "eth0"]);
        let addr_info = addrs[0]["addr_info"].as_array().expect("addr_info");
        assert_eq!(addr_info.len(), 1, "{addrs}");
        assert_eq!(addr_info[0]["local"], "198.19.1.2");
        assert_eq!(addr_info[0]["prefixlen"], 32);
        let lo = ip_json(&container.path, &["link", "show", "dev", "lo"]);
        let lo_flags = lo[0]["flags"].as_array().expect("flags");
        assert!(lo_flags.iter().any(|flag| flag == "UP"), "{lo}");
        let routes = ip_json(&container.path, &["-4", "route", "show"]);
        let routes = routes.as_array().expect("a list of routes");
        assert_eq!(routes.len(), 2, "{routes:?}");
        assert!(
            routes.iter().any(|r| r["dst"] == "default"
                && r["gateway"] == "198.19.1.1"
                && r["dev"] == "eth0"),
            "no default route via the gateway: {routes:?}"
        );
        assert!(
            routes
                .iter()
                .any(|r| r["dst"] == "198.19.1.1" && r["dev"] == "eth0" && r["scope"] == "link"),
            "no link route to the gateway: {routes:?}"
        );
        assert!(gro_is_on(&container.path, "eth0"));

        // Host side, seen by ip.
        let host_links = ip_json(&node.path, &["link", "show", "dev", &spec.host_ifname]);
        assert_eq!(host_links[0]["mtu"], 1400);
        assert_eq!(host_links[0]["address"], format_mac(info.host_mac));
        // The agent's tag: its group from creation, its alias.
        let detail = ip_json(
            &node.path,
            &["-d", "link", "show", "dev", &spec.host_ifname],
        );
        assert_eq!(detail[0]["group"], format!("{VETH_GROUP}"), "{detail}");
        assert_eq!(detail[0]["ifalias"], spec.alias.as_str(), "{detail}");
        // No router advertisement or redirect from the container counts.
        let sysctl = |family: &str, key: &str| {
            node.open()
                .run(|| {
                    std::fs::read_to_string(format!(
                        "/proc/sys/net/{family}/conf/{}/{key}",
                        spec.host_ifname
                    ))
                    .expect("read a sysctl")
                })
                .expect("enter the node")
        };
        for (family, key) in [
            ("ipv6", "accept_ra"),
            ("ipv6", "accept_redirects"),
            ("ipv4", "accept_redirects"),
        ] {
            assert_eq!(sysctl(family, key).trim(), "0", "{family} {key}");
        }
        let host_routes = ip_json(&node.path, &["-4", "route", "show"]);
        let host_routes = host_routes.as_array().expect("a list of routes");
        assert!(
            host_routes.iter().any(|r| r["dst"] == "198.19.1.2"
                && r["dev"] == spec.host_ifname.as_str()
                && r["scope"] == "link"),
            "no /32 route to the container: {host_routes:?}"
        );

        // The container reaches its gateway.
        let reached = container
            .open()
            .run(|| icmp_echo(spec.gateway))
            .expect("enter the container");
        assert!(reached, "the container cannot reach its gateway");
    }

    #[test]
    fn create_container_link_leaves_gro_off_unless_asked() {
        let node = TestNetns::new("node");
        let container = TestNetns::new("ctr");
        let spec = spec(&container, &host_ifname(2), 2);
        in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            netlink
                .create_container_link(&spec)
                .await
                .expect("create the container link");
        });
        assert!(!gro_is_on(&container.path, "eth0"));
        let eth0 = ip_json(&container.path, &["link", "show", "dev", "eth0"]);
        assert_eq!(eth0[0]["mtu"], 1500);
    }

    #[test]
    fn delete_container_link_removes_both_ends_and_is_idempotent() {
        let node = TestNetns::new("node");
        let container = TestNetns::new("ctr");
        let spec = spec(&container, &host_ifname(3), 3);
        in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            netlink
                .create_container_link(&spec)
                .await
                .expect("create the container link");
            netlink
                .delete_container_link(&spec.host_ifname)
                .await
                .expect("delete the container link");
            assert_eq!(
                netlink.link(&spec.host_ifname).await.expect("look up"),
                None
            );
            netlink
                .delete_container_link(&spec.host_ifname)
                .await
                .expect("delete it again");
        });
        assert_eq!(link_names(&container.path), vec!["lo".to_owned()]);
        assert!(!link_names(&node.path).contains(&spec.host_ifname));
    }

    #[test]
    fn delete_container_link_refuses_a_link_that_is_not_a_veth() {
        let node = TestNetns::new("node");
        ip_cmd(&node.path, &["link", "add", "dp0000dead", "type", "bridge"]);
        in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            let err = netlink
                .delete_container_link("dp0000dead")
                .await
                .expect_err("deleted a bridge");
            assert!(
                matches!(&err, NetlinkError::NotVeth { kind, .. } if kind == "bridge"),
                "{err:?}"
            );
        });
        assert!(link_names(&node.path).contains(&"dp0000dead".to_owned()));
    }

    #[test]
    fn delete_container_link_refuses_a_veth_the_agent_did_not_make() {
        let node = TestNetns::new("node");
        ip_cmd(
            &node.path,
            &[
                "link",
                "add",
                "dp0000beef",
                "type",
                "veth",
                "peer",
                "name",
                "x0",
            ],
        );
        in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            let err = netlink
                .delete_container_link("dp0000beef")
                .await
                .expect_err("deleted a foreign veth");
            assert!(
                matches!(&err, NetlinkError::NotOurs { group: 0, .. }),
                "{err:?}"
            );
        });
        assert!(link_names(&node.path).contains(&"dp0000beef".to_owned()));
    }

    #[test]
    fn create_container_link_into_a_missing_netns_fails_cleanly() {
        let node = TestNetns::new("node");
        let gone = TestNetns::new("gone");
        let mut spec = spec(&gone, &host_ifname(4), 4);
        drop(gone);
        spec.netns = PathBuf::from(format!("{}-missing", spec.netns.display()));
        in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            let err = netlink
                .create_container_link(&spec)
                .await
                .expect_err("created a link into a missing netns");
            assert!(err.is_not_found(), "{err:?}");
            let chain = format!(
                "{err}: {}",
                std::error::Error::source(&err)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            assert!(chain.contains(&spec.netns.display().to_string()), "{chain}");
            assert_eq!(
                netlink.links_with_prefix("dp").await.expect("list links"),
                vec![]
            );
        });
    }

    #[test]
    fn create_container_link_fails_without_side_effects_when_the_name_is_taken() {
        let node = TestNetns::new("node");
        let container = TestNetns::new("ctr");
        ip_cmd(&container.path, &["link", "add", "eth0", "type", "bridge"]);
        let spec = spec(&container, &host_ifname(5), 5);
        in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            let err = netlink
                .create_container_link(&spec)
                .await
                .expect_err("created a second eth0");
            assert!(err.is_already_exists(), "{err:?}");
            assert_eq!(
                netlink.link(&spec.host_ifname).await.expect("look up"),
                None
            );
        });
        let eth0 = ip_json(&container.path, &["-d", "link", "show", "dev", "eth0"]);
        assert_eq!(eth0[0]["linkinfo"]["info_kind"], "bridge");
    }

    #[test]
    fn create_container_link_rolls_back_when_a_later_step_fails() {
        let node = TestNetns::new("node");
        let container = TestNetns::new("ctr");
        let spec = spec(&container, &host_ifname(6), 6);
        // The node already routes the container's address: the host route
        // step fails after the pair exists.
        ip_cmd(&node.path, &["route", "add", "blackhole", "198.19.6.2/32"]);
        in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            let err = netlink
                .create_container_link(&spec)
                .await
                .expect_err("created a link over an existing route");
            assert!(
                matches!(&err, NetlinkError::AlreadyExists { step, .. } if *step == "add the container's route"),
                "{err:?}"
            );
            assert_eq!(
                netlink.link(&spec.host_ifname).await.expect("look up"),
                None
            );
        });
        assert_eq!(link_names(&container.path), vec!["lo".to_owned()]);
    }

    #[test]
    fn containers_share_the_gateway_address_and_outlive_each_other() {
        let node = TestNetns::new("node");
        let first = TestNetns::new("ctr1");
        let second = TestNetns::new("ctr2");
        let mut a = spec(&first, &host_ifname(7), 7);
        let mut b = spec(&second, &host_ifname(8), 7);
        b.addr = Ipv4Addr::new(198, 19, 7, 3);
        a.gro = true;
        b.gro = true;

        in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            for spec in [&a, &b] {
                let started = Instant::now();
                netlink
                    .create_container_link(spec)
                    .await
                    .expect("create a container link");
                println!("create_container_link took {:?}", started.elapsed());
            }
            let hosts = netlink.links_with_prefix("dp").await.expect("list links");
            let mut names: Vec<_> = hosts.into_iter().map(|link| link.name).collect();
            names.sort();
            assert_eq!(names, vec![a.host_ifname.clone(), b.host_ifname.clone()]);
        });
        let ping = |netns: &TestNetns, dst| netns.open().run(|| icmp_echo(dst)).expect("enter");
        assert!(
            ping(&first, a.gateway),
            "first container cannot reach the gateway"
        );
        assert!(
            ping(&second, b.gateway),
            "second container cannot reach the gateway"
        );

        in_netns(&node, || async {
            let netlink = Netlink::new().expect("connect to the node netns");
            netlink
                .delete_container_link(&a.host_ifname)
                .await
                .expect("delete the first link");
        });
        assert!(
            ping(&second, b.gateway),
            "the second container lost its gateway"
        );
        assert!(
            ping(&node, b.addr),
            "the node lost its route to the second container"
        );
        assert!(
            !ping(&node, a.addr),
            "the node still reaches the deleted container"
        );
    }

    #[test]
    fn enable_ip_forward_changes_only_the_current_netns() {
        let read =
            || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read ip_forward");
        let outside = read();
        let node = TestNetns::new("node");
        let inside = node
            .open()
            .run(|| {
                let before = read();
                enable_ip_forward().expect("enable forwarding");
                (before, read())
            })
            .expect("enter the node netns");
        assert_eq!(inside, ("0\n".to_owned(), "1\n".to_owned()));
        assert_eq!(read(), outside);
    }
}
