//! Indexes over the desired state, so that a change is checked without
//! looking at every container: who publishes which host ports
//! ([`PortIndex`]) and which addresses of the pool are free ([`Ipam`]).
//!
//! The port index is a persistent ordered map (`imbl`): copying it, as the
//! [`super::State`] it belongs to is copied for every change and every
//! snapshot the API reads, costs O(1), and a change to it O(log n).

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use imbl::OrdMap;
use ipnet::Ipv4Net;

use crate::model::PortMapping;

/// Where a mapping lives in the index: its protocol, its host address
/// (`0`: every address of the node) and its first host port. Within one
/// (protocol, address) pair the published ranges never overlap, so the
/// one range that can contain a port is the last one starting at or below
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    proto: u8,
    addr: u32,
    start: u16,
}

impl Slot {
    fn of(m: &PortMapping) -> Self {
        Self {
            proto: m.protocol.number(),
            addr: host_addr(m),
            start: m.host_port,
        }
    }
}

fn host_addr(m: &PortMapping) -> u32 {
    m.host_ip.map_or(0, u32::from)
}

/// A published mapping and the container that publishes it.
#[derive(Clone, Debug)]
struct Owned {
    mapping: PortMapping,
    owner: Arc<str>,
}

/// Every published mapping, by protocol, host address and first port.
#[derive(Clone, Debug, Default)]
pub struct PortIndex {
    slots: OrdMap<Slot, Owned>,
    /// How many mappings each (protocol, host address) pair has: the
    /// addresses a mapping on every address must be checked against.
    addrs: OrdMap<(u8, u32), usize>,
}

impl PortIndex {
    /// The published mapping that `m` would overlap and its owner, if any
    /// ([`PortMapping::overlaps`]); O(log n) in the mappings published,
    /// times the distinct host addresses in use for a mapping on every
    /// address.
    pub fn overlap(&self, m: &PortMapping) -> Option<(&str, &PortMapping)> {
        let proto = m.protocol.number();
        let addr = host_addr(m);
        let check = |a: u32| self.overlap_at(proto, a, m);
        if addr == 0 {
            self.addrs
                .range((proto, 0)..=(proto, u32::MAX))
                .find_map(|((_, a), _)| check(*a))
        } else {
            check(0).or_else(|| check(addr))
        }
    }

    fn overlap_at(&self, proto: u8, addr: u32, m: &PortMapping) -> Option<(&str, &PortMapping)> {
        let from = Slot {
            proto,
            addr,
            start: 0,
        };
        let to = Slot {
            proto,
            addr,
            start: m.host_end(),
        };
        let (_, o) = self.slots.range(from..=to).next_back()?;
        (o.mapping.host_end() >= m.host_port).then_some((&*o.owner, &o.mapping))
    }

    /// Records that `owner` publishes `m`; refuses a mapping that overlaps
    /// one already there (nothing is changed then).
    pub fn insert(&mut self, owner: &Arc<str>, m: &PortMapping) -> Result<(), String> {
        if let Some((other, om)) = self.overlap(m) {
            return Err(format!(
                "{m} of container {owner:?} overlaps {om} of container {other:?}"
            ));
        }
        self.slots.insert(
            Slot::of(m),
            Owned {
                mapping: *m,
                owner: Arc::clone(owner),
            },
        );
        *self
            .addrs
            .entry((m.protocol.number(), host_addr(m)))
            .or_insert(0) += 1;
        Ok(())
    }

    /// Forgets mapping `m` of `owner` (nothing if another container owns
    /// that slot).
    pub fn remove(&mut self, owner: &str, m: &PortMapping) {
        let slot = Slot::of(m);
        if !self
            .slots
            .get(&slot)
            .is_some_and(|o| &*o.owner == owner && o.mapping == *m)
        {
            return;
        }
        self.slots.remove(&slot);
        let key = (slot.proto, slot.addr);
        match self.addrs.get(&key).copied() {
            Some(n) if n > 1 => {
                self.addrs.insert(key, n - 1);
            }
            _ => {
                self.addrs.remove(&key);
            }
        }
    }

    /// The number of mappings.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is published.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// The free addresses of one pool, so that handing out the lowest free one
/// costs O(log n): the holes below the highest address in use, and the
/// first address above it. Built from the addresses in use the first time
/// an address of a pool is asked for, then kept up to date.
#[derive(Clone, Debug)]
pub struct Ipam {
    pool: Ipv4Net,
    gateway: Ipv4Addr,
    last: Ipv4Addr,
    holes: BTreeSet<Ipv4Addr>,
    /// The first host address above every address in use (`None`: the
    /// pool is used up to its end).
    next: Option<Ipv4Addr>,
}

impl Ipam {
    /// The free addresses of `pool` (without its gateway, its first host)
    /// given the addresses `used`, in order.
    pub fn new(pool: Ipv4Net, used: impl Iterator<Item = Ipv4Addr>) -> Self {
        let gateway = super::gateway_of(pool);
        let last = match pool.prefix_len() {
            31 | 32 => pool.broadcast(),
            _ => Ipv4Addr::from(u32::from(pool.broadcast()) - 1),
        };
        let mut ipam = Self {
            pool,
            gateway,
            last,
            holes: BTreeSet::new(),
            next: pool.hosts().find(|a| *a != gateway),
        };
        for a in used {
            ipam.take(a);
        }
        ipam
    }

    /// The pool this is of.
    pub fn pool(&self) -> Ipv4Net {
        self.pool
    }

    /// The lowest free address, if any.
    pub fn lowest(&self) -> Option<Ipv4Addr> {
        match (self.holes.first(), self.next) {
            (Some(h), _) => Some(*h),
            (None, next) => next,
        }
    }

    /// The first usable host address after `a` in the pool.
    fn after(&self, a: Ipv4Addr) -> Option<Ipv4Addr> {
        let mut n = u32::from(a).checked_add(1)?;
        if Ipv4Addr::from(n) == self.gateway {
            n = n.checked_add(1)?;
        }
        let next = Ipv4Addr::from(n);
        (next <= self.last).then_some(next)
    }

    /// Marks `a` as in use.
    pub fn take(&mut self, a: Ipv4Addr) {
        if !self.pool.contains(&a) || a == self.gateway {
            return;
        }
        if self.holes.remove(&a) {
            return;
        }
        let Some(next) = self.next else {
            return;
        };
        if a < next {
            // Already in use (an address handed out twice is refused
            // before it gets here).
            return;
        }
        // Everything between the old end and `a` becomes a hole.
        let mut h = next;
        while h < a {
            if h != self.gateway {
                self.holes.insert(h);
            }
            match self.after(h) {
                Some(n) => h = n,
                None => break,
            }
        }
        self.next = self.after(a);
    }

    /// Marks `a` as free again.
    pub fn release(&mut self, a: Ipv4Addr) {
        if !self.pool.contains(&a) || a == self.gateway {
            return;
        }
        if self.next.is_none_or(|next| a < next) {
            self.holes.insert(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(spec: &str) -> PortMapping {
        spec.parse().expect("valid spec")
    }

    #[test]
    fn overlaps_are_found_as_a_linear_scan_would() {
        let specs = [
            "8080:80",
            "8000-8010:8000-8010",
            "198.18.0.2:9000:90",
            "198.18.0.3:9000:90",
            "9100:91/udp",
        ];
        let mut idx = PortIndex::default();
        let owner: Arc<str> = Arc::from("a");
        for s in specs {
            idx.insert(&owner, &m(s)).expect("no overlap");
        }
        let probes = [
            "8080:1",
            "8081:1",
            "8010:1",
            "8011:1",
            "7990-8000:1-11",
            "198.18.0.2:8005:1",
            "9000:1",
            "198.18.0.4:9000:1",
            "198.18.0.2:9000:1/udp",
            "9100:1/udp",
            "9100:1",
            "1-65535:1-65535/udp",
        ];
        for p in probes {
            let p = m(p);
            let linear = specs.iter().map(|s| m(s)).find(|o| o.overlaps(&p));
            assert_eq!(idx.overlap(&p).map(|(_, o)| *o), linear, "{p}");
        }
        idx.remove("a", &m("8080:80"));
        assert!(idx.overlap(&m("8080:1")).is_none());
        assert_eq!(idx.len(), specs.len() - 1);
        idx.remove("b", &m("9100:91/udp"));
        assert_eq!(idx.len(), specs.len() - 1, "only the owner removes");
    }

    #[test]
    fn the_lowest_free_address_is_handed_out() {
        let pool: Ipv4Net = "198.19.0.0/29".parse().expect("valid");
        let a = |n: u8| Ipv4Addr::new(198, 19, 0, n);
        // .1 is the gateway; .2-.6 are for containers.
        let mut ipam = Ipam::new(pool, [a(2), a(5)].into_iter());
        assert_eq!(ipam.lowest(), Some(a(3)));
        ipam.take(a(3));
        ipam.take(a(4));
        assert_eq!(ipam.lowest(), Some(a(6)));
        ipam.take(a(6));
        assert_eq!(ipam.lowest(), None);
        ipam.release(a(4));
        assert_eq!(ipam.lowest(), Some(a(4)));
        ipam.release(a(2));
        assert_eq!(ipam.lowest(), Some(a(2)));
    }
}
