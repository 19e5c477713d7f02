//! Address and port rewriting with checksum fix-ups, written once for both
//! hooks over [`Packet`].

use crate::{
    ctx::{CSUM_PSEUDO, CSUM_SIZE_2, CSUM_SIZE_4, CSUM_UDP, Packet},
    parse::{Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, L4},
};

/// Where a flow's L4 checksum is and how the helpers must treat it.
#[inline(always)]
fn l4_csum(flow: &Flow) -> (usize, u64) {
    match flow.l4 {
        L4::Tcp => (flow.l4_off + 16, CSUM_PSEUDO),
        L4::Udp => (flow.l4_off + 6, CSUM_PSEUDO | CSUM_UDP),
        // ICMP's checksum covers no pseudo header.
        L4::IcmpEcho | L4::IcmpError => (flow.l4_off + 2, 0),
    }
}

/// Rewrites the source (`source = true`) or destination address and port of
/// `flow` to `addr`/`port`, fixing the IPv4 and L4 checksums. For ICMP echo
/// the port is the identifier.
#[inline(always)]
pub fn rewrite<C: Packet>(
    ctx: &mut C,
    flow: &Flow,
    source: bool,
    addr: [u8; 4],
    port: u16,
) -> Result<(), ()> {
    let (addr_off, old_addr, old_port) = if source {
        (IP_SRC_OFF, flow.key.saddr, flow.key.sport)
    } else {
        (IP_DST_OFF, flow.key.daddr, flow.key.dport)
    };
    let (csum_off, csum_flags) = l4_csum(flow);
    if old_addr != addr {
        let from = u32::from_ne_bytes(old_addr);
        let to = u32::from_ne_bytes(addr);
        if csum_flags & CSUM_PSEUDO != 0 {
            ctx.l4_csum(csum_off, from, to, csum_flags | CSUM_SIZE_4)?;
        }
        ctx.l3_csum(IP_CSUM_OFF, from, to, CSUM_SIZE_4)?;
        ctx.store(addr_off, &addr)?;
    }
    if old_port != port {
        let port_off = match flow.l4 {
            L4::IcmpEcho | L4::IcmpError => flow.l4_off + 4,
            _ if source => flow.l4_off,
            _ => flow.l4_off + 2,
        };
        let new = port.to_be_bytes();
        let from = u32::from(u16::from_ne_bytes(old_port.to_be_bytes()));
        let to = u32::from(u16::from_ne_bytes(new));
        ctx.l4_csum(csum_off, from, to, (csum_flags & CSUM_UDP) | CSUM_SIZE_2)?;
        ctx.store(port_off, &new)?;
    }
    Ok(())
}

/// Decrements the IPv4 TTL as a router does. The caller has checked that it
/// is above one.
#[inline(always)]
pub fn decrement_ttl<C: Packet>(ctx: &mut C) -> Result<(), ()> {
    let [ttl, proto] = ctx.read::<2>(IP_TTL_OFF)?;
    let new = [ttl.wrapping_sub(1), proto];
    ctx.l3_csum(
        IP_CSUM_OFF,
        u32::from(u16::from_ne_bytes([ttl, proto])),
        u32::from(u16::from_ne_bytes(new)),
        CSUM_SIZE_2,
    )?;
    ctx.store(IP_TTL_OFF, &[new[0]])
}
