//! Address and port rewriting with checksum fix-ups, written once for both
//! hooks over [`Packet`].

use datapath_common::csum;

use crate::{
    ctx::{CSUM_PSEUDO, CSUM_SIZE_2, CSUM_SIZE_4, CSUM_UDP, Packet},
    parse::{Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, IP_TTL_OFF, L4, Quoted},
};

/// Where a flow's L4 checksum is and how the helpers must treat it
/// (offset 0 for a later fragment, which carries no L4 header). Plain
/// values, not an `Option`: LLVM reads an `Option`'s payload ahead of the
/// check, from a stack slot that may hold a pointer on the other path,
/// which the verifier refuses.
#[inline(always)]
fn l4_csum(flow: &Flow) -> (usize, u64) {
    match flow.l4 {
        L4::Tcp => (flow.l4_off() + 16, CSUM_PSEUDO),
        L4::Udp => (flow.l4_off() + 6, CSUM_PSEUDO | CSUM_UDP),
        // ICMP's checksum covers no pseudo header.
        L4::IcmpEcho | L4::IcmpError => (flow.l4_off() + 2, 0),
        L4::Fragment => (0, 0),
    }
}

/// Rewrites the source (`source = true`) or destination address and port of
/// `flow` to `addr`/`port`, fixing the IPv4 and L4 checksums. For ICMP echo
/// the port is the identifier. A later fragment gets only its address
/// rewritten: its ports and L4 checksum are in the first fragment (whose
/// checksum, over the whole datagram, was updated by the same amounts).
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
    if flow.l4 == L4::Fragment {
        return Ok(());
    }
    if old_port != port {
        let port_off = match flow.l4 {
            L4::IcmpEcho | L4::IcmpError => flow.l4_off() + 4,
            _ if source => flow.l4_off(),
            _ => flow.l4_off() + 2,
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

/// Translates an ICMP error about a tracked flow. The quoted packet went
/// the opposite way of the error, so when the error's source is rewritten
/// (`source = true`) the quoted destination is, and vice versa; both get
/// `addr`, and the quoted port (ICMP echo: id) gets `port`.
///
/// Checksums: the outer IPv4 header's as usual; the quoted IPv4 header's in
/// place, which leaves the ICMP checksum's sum unchanged (a valid header
/// sums to the same value whatever its contents); the quoted L4 checksum
/// (UDP, ICMP echo, and TCP when the quote is long enough to hold it), so
/// the quote stays what the peer sent; and the ICMP checksum for every
/// quoted L4 word that changed (port and L4 checksum).
#[inline(always)]
pub fn rewrite_icmp_error<C: Packet>(
    ctx: &mut C,
    flow: &Flow,
    quoted: &Quoted,
    source: bool,
    addr: [u8; 4],
    port: u16,
) -> Result<(), ()> {
    // Outer address.
    let (outer_off, outer_old) = if source {
        (IP_SRC_OFF, flow.key.saddr)
    } else {
        (IP_DST_OFF, flow.key.daddr)
    };
    if outer_old != addr {
        ctx.l3_csum(
            IP_CSUM_OFF,
            u32::from_ne_bytes(outer_old),
            u32::from_ne_bytes(addr),
            CSUM_SIZE_4,
        )?;
        ctx.store(outer_off, &addr)?;
    }
    // Quoted address: the opposite side.
    let (q_addr_off, q_old_addr, q_old_port) = if source {
        (quoted.ip_off + 16, quoted.key.daddr, quoted.key.dport)
    } else {
        (quoted.ip_off + 12, quoted.key.saddr, quoted.key.sport)
    };
    if q_old_addr != addr {
        let csum_off = quoted.ip_off + 10;
        let old_csum = u16::from_be_bytes(ctx.read::<2>(csum_off)?);
        let new_csum = csum::replace32(old_csum, q_old_addr, addr);
        ctx.store(q_addr_off, &addr)?;
        ctx.store(csum_off, &new_csum.to_be_bytes())?;
    }
    let icmp_csum_off = flow.l4_off() + 2;
    if q_old_port != port {
        let port_off = match quoted.l4 {
            L4::IcmpEcho | L4::IcmpError | L4::Fragment => quoted.l4_off + 4,
            _ if source => quoted.l4_off + 2,
            _ => quoted.l4_off,
        };
        replace_word(ctx, icmp_csum_off, port_off, q_old_port, port)?;
    }
    // The quoted L4 checksum, where the quote holds it.
    let (l4_csum_off, pseudo, udp) = match quoted.l4 {
        L4::Udp => (quoted.l4_off + 6, true, true),
        L4::Tcp => (quoted.l4_off + 16, true, false),
        L4::IcmpEcho | L4::IcmpError | L4::Fragment => (quoted.l4_off + 2, false, false),
    };
    if ctx.pull(l4_csum_off + 2).is_err() {
        return Ok(());
    }
    let Ok(bytes) = ctx.read::<2>(l4_csum_off) else {
        return Ok(());
    };
    let old = u16::from_be_bytes(bytes);
    if udp && old == 0 {
        return Ok(());
    }
    let mut new = old;
    if pseudo && q_old_addr != addr {
        new = csum::replace32(new, q_old_addr, addr);
    }
    if q_old_port != port {
        new = csum::replace16(new, q_old_port, port);
    }
    if udp && new == 0 {
        new = 0xffff;
    }
    if new != old {
        replace_word(ctx, icmp_csum_off, l4_csum_off, old, new)?;
    }
    Ok(())
}

/// Replaces the 16-bit word at `off` (inside an ICMP message) from `old` to
/// `new` (host order) and updates the ICMP checksum at `icmp_csum_off`.
#[inline(always)]
fn replace_word<C: Packet>(
    ctx: &mut C,
    icmp_csum_off: usize,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    let new = new.to_be_bytes();
    ctx.l4_csum(
        icmp_csum_off,
        u32::from(u16::from_ne_bytes(old.to_be_bytes())),
        u32::from(u16::from_ne_bytes(new)),
        CSUM_SIZE_2,
    )?;
    ctx.store(off, &new)
}
