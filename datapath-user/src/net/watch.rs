//! Following the node's IPv4 addresses as they change: an rtnetlink socket
//! in the kernel's IPv4 address multicast group (`RTNLGRP_IPV4_IFADDR`),
//! which tells of every address added to or removed from a link of the
//! agent's network namespace.
//!
//! The events say only which link changed: the caller reads that link's
//! addresses again, so an event lost to a full socket buffer costs nothing
//! as long as a later one arrives.

use futures::{StreamExt as _, channel::mpsc::UnboundedReceiver};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::{
    MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    sys::SocketAddr,
};
use tokio::task::JoinHandle;

use super::link::{InNetns, NetlinkError};

/// A subscription to the IPv4 address changes of the agent's namespace;
/// the socket closes on drop.
#[derive(Debug)]
pub struct AddressEvents {
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    connection: JoinHandle<()>,
}

impl AddressEvents {
    /// Subscribes, on the current tokio runtime.
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let socket_err = |source| NetlinkError::Socket {
            netns: InNetns::Agent,
            source,
        };
        let (connection, _handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Ipv4Ifaddr])
                .map_err(socket_err)?;
        Ok(Self {
            messages,
            connection: runtime.spawn(connection),
        })
    }

    /// Waits for the next IPv4 address added to or removed from a link;
    /// that link's index. `None` once the socket is closed.
    pub async fn next(&mut self) -> Option<u32> {
        while let Some((message, _)) = self.messages.next().await {
            if let NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a),
            ) = message.payload
            {
                return Some(a.header.index);
            }
        }
        None
    }
}

impl Drop for AddressEvents {
    fn drop(&mut self) {
        self.connection.abort();
    }
}
