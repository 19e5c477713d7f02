//! The datapath most packet tests run on: the node of the namespace tests
//! (198.18.0.2, uplink ifindex 1) with the container pool 198.19.0.0/24
//! and container [`CTR`] publishing TCP 8080 → 80 and UDP 5353 → 53 on
//! every node address; [`add_container`] adds a second one ([`CTR_B`]).
//!
//! ```no_run
//! use datapath_tests::{frame::Frame, programs::TC_ACT_REDIRECT, testbed};
//!
//! let mut p = testbed::datapath();
//! let syn = Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").build();
//! assert_eq!(p.uplink_tc(&syn).verdict, TC_ACT_REDIRECT);
//! let reply = testbed::CTR.frame(Frame::tcp("198.19.0.5:80", "198.18.0.1:40000"));
//! assert_eq!(p.container_tc(&reply, testbed::CTR.ifindex).verdict, TC_ACT_REDIRECT);
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};

use datapath_common::{Config, CtKey, Endpoint, proto};

use crate::{frame::Frame, programs::Programs};

/// The node's address.
pub const NODE: [u8; 4] = [198, 18, 0, 2];
/// The client's address, on the uplink's link.
pub const CLIENT: [u8; 4] = [198, 18, 0, 1];
/// The container pool (a /24).
pub const POOL: [u8; 4] = [198, 19, 0, 0];
/// The pool's prefix length.
pub const POOL_LEN: u8 = 24;
/// The uplink's ifindex.
pub const UPLINK_IFINDEX: u32 = 1;
/// TCP port 8080 of the node is published to [`CTR`]'s port 80.
pub const TCP_PUBLISHED: (u16, u16) = (8080, 80);
/// UDP port 5353 of the node is published to [`CTR`]'s port 53.
pub const UDP_PUBLISHED: (u16, u16) = (5353, 53);

/// A container of the test datapath: its address, the ifindex of its
/// host-side veth, the agent's id for it and both ends' MACs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestContainer {
    /// Its address in the pool.
    pub addr: [u8; 4],
    /// The host end of its veth pair.
    pub ifindex: u32,
    /// The agent's id.
    pub id: u32,
    /// Its own MAC.
    pub mac: [u8; 6],
    /// The host end's MAC (its gateway's).
    pub host_mac: [u8; 6],
}

/// The container the published ports lead to.
pub const CTR: TestContainer = TestContainer {
    addr: [198, 19, 0, 5],
    ifindex: 7,
    id: 3,
    mac: [0x02, 0xc0, 0, 0, 0, 5],
    host_mac: [0x02, 0xee, 0, 0, 0, 7],
};

/// A second container, publishing nothing.
pub const CTR_B: TestContainer = TestContainer {
    addr: [198, 19, 0, 6],
    ifindex: 8,
    id: 4,
    mac: [0x02, 0xc0, 0, 0, 0, 6],
    host_mac: [0x02, 0xee, 0, 0, 0, 8],
};

impl TestContainer {
    /// Its address.
    pub fn ip(&self) -> Ipv4Addr {
        self.addr.into()
    }

    /// Its entry of the endpoint map.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            ifindex: self.ifindex,
            container_id: self.id,
            mac: self.mac,
            host_mac: self.host_mac,
            flags: 0,
        }
    }

    /// `f` as the container sends it: from its MAC to its gateway's.
    pub fn frame(&self, f: Frame) -> Vec<u8> {
        f.macs(self.mac, self.host_mac).build()
    }
}

/// The node's configuration (masquerade on, ports 61000-65535).
pub fn config() -> Config {
    Programs::config(NODE, POOL, POOL_LEN, UPLINK_IFINDEX)
}

/// The test datapath: [`config`], the node's address, [`CTR`] and its
/// published ports.
pub fn datapath() -> Programs {
    datapath_with(config())
}

/// [`datapath`] with another configuration (another masquerade range,
/// say).
pub fn datapath_with(config: Config) -> Programs {
    let mut p = Programs::load();
    p.set_config(config);
    p.insert_node_addr(NODE, UPLINK_IFINDEX);
    add_container(&mut p, &CTR);
    for (proto, (host, ctr)) in [(proto::TCP, TCP_PUBLISHED), (proto::UDP, UDP_PUBLISHED)] {
        p.publish([0; 4], host, proto, CTR.addr, ctr, CTR.ifindex, CTR.id);
    }
    p
}

/// Adds container `c` (its endpoint) to the datapath.
pub fn add_container(p: &mut Programs, c: &TestContainer) {
    p.insert_endpoint(c.addr, c.endpoint());
}

/// The conntrack key of `proto` packets from `src` to `dst`
/// (`"198.18.0.1:40000"`), as the frames of [`crate::frame::Frame`] are
/// written.
pub fn ct_key(src: &str, dst: &str, proto: u8) -> CtKey {
    let addr = |a: &str| -> SocketAddrV4 {
        a.parse()
            .unwrap_or_else(|e| panic!("not an IPv4 address and port: {a}: {e}"))
    };
    let (src, dst) = (addr(src), addr(dst));
    CtKey {
        saddr: src.ip().octets(),
        daddr: dst.ip().octets(),
        sport: src.port(),
        dport: dst.port(),
        proto,
        _pad: [0; 3],
    }
}
