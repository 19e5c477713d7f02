//! The second address family of a container: with `--pool6`, each
//! container's IPv6 address is derived from its IPv4 one.
//!
//! The address is the IPv6 pool's prefix plus the IPv4 address's offset in
//! the IPv4 pool (`10.88.0.5` in `10.88.0.0/16` with `fd00:88::/64` is
//! `fd00:88::5`). Nothing more is allocated or recorded: the state, its
//! journal, adoption and rebuilding after a lost state file stay what they
//! are for IPv4, and an address can never be taken twice. The IPv6 pool
//! must therefore hold at least as many host bits as the IPv4 pool.
//!
//! The gateway is link-local ([`GATEWAY6`] on every host end, as Calico
//! and Cilium use one fixed link-local next hop): the container's default
//! route needs no address of the pool, and neighbour discovery stays on
//! the link.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The IPv6 gateway of every container: a link-local address on the host
/// end of its veth pair.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The two pools of a dual-stack node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DualPool {
    /// The IPv4 pool.
    pub pool: Ipv4Net,
    /// The IPv6 pool.
    pub pool6: Ipv6Net,
}

impl DualPool {
    /// The pools, if `pool6` can hold every address of `pool`: at least as
    /// many host bits, and not a link-local, multicast or loopback prefix.
    pub fn new(pool: Ipv4Net, pool6: Ipv6Net) -> Result<Self, String> {
        let pool6 = pool6.trunc();
        let host4 = 32 - u32::from(pool.prefix_len());
        let host6 = 128 - u32::from(pool6.prefix_len());
        if host6 < host4 {
            return Err(format!(
                "--pool6 {pool6}: each container's IPv6 address is its IPv4 address's offset \
                 in --pool {pool}, so the IPv6 pool needs at least {host4} host bits \
                 (a /{} or shorter prefix)",
                128 - host4
            ));
        }
        let first = pool6.network().segments()[0];
        if first & 0xffc0 == 0xfe80 || first & 0xff00 == 0xff00 || pool6.network().is_loopback() {
            return Err(format!(
                "--pool6 {pool6}: give a global or unique-local prefix (not link-local, \
                 multicast or loopback)"
            ));
        }
        Ok(Self {
            pool: pool.trunc(),
            pool6,
        })
    }

    /// The IPv6 address of the container with IPv4 address `addr`; `None`
    /// if `addr` is not in the IPv4 pool.
    pub fn addr6(&self, addr: Ipv4Addr) -> Option<Ipv6Addr> {
        if !self.pool.contains(&addr) {
            return None;
        }
        let offset = u32::from(addr) - u32::from(self.pool.network());
        Some(Ipv6Addr::from(
            u128::from(self.pool6.network()) | u128::from(offset),
        ))
    }

    /// The IPv4 address of the container with IPv6 address `addr6`; `None`
    /// if it is not one this pool derives.
    pub fn addr4(&self, addr6: Ipv6Addr) -> Option<Ipv4Addr> {
        if !self.pool6.contains(&addr6) {
            return None;
        }
        let offset = u128::from(addr6) - u128::from(self.pool6.network());
        let offset = u32::try_from(offset).ok()?;
        let addr = Ipv4Addr::from(u32::from(self.pool.network()).checked_add(offset)?);
        self.pool.contains(&addr).then_some(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(v4: &str, v6: &str) -> Result<DualPool, String> {
        DualPool::new(v4.parse().expect("a pool"), v6.parse().expect("a prefix"))
    }

    #[test]
    fn the_ipv6_address_is_the_ipv4_offset_in_the_ipv6_pool() {
        let p = pools("198.19.0.0/16", "fd00:db8:1::/64").expect("fits");
        assert_eq!(
            p.addr6(Ipv4Addr::new(198, 19, 1, 5)),
            Some("fd00:db8:1::105".parse().expect("an address"))
        );
        assert_eq!(
            p.addr4("fd00:db8:1::105".parse().expect("an address")),
            Some(Ipv4Addr::new(198, 19, 1, 5))
        );
        assert_eq!(p.addr6(Ipv4Addr::new(198, 20, 0, 1)), None);
        assert_eq!(
            p.addr4("fd00:db8:1::1:0:0".parse().expect("an address")),
            None
        );
        assert_eq!(p.addr4("fd00:db8:2::1".parse().expect("an address")), None);
    }

    #[test]
    fn an_ipv6_pool_smaller_than_the_ipv4_pool_is_refused() {
        assert!(pools("198.19.0.0/16", "2001:db8::/112").is_ok());
        let e = pools("198.19.0.0/16", "2001:db8::/113").expect_err("too small");
        assert!(e.contains("16 host bits"), "{e}");
        assert!(pools("198.19.0.0/24", "fe80::/64").is_err());
        assert!(pools("198.19.0.0/24", "ff02::/64").is_err());
    }
}
