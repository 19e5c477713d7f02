//! One packet interface over the two hooks, so that parsing and translation
//! are written once and run under both XDP and TC (the way Cilium's `ctx_*`
//! wrappers do).
//!
//! TC has kernel helpers that keep `skb->csum` and `CHECKSUM_PARTIAL` packets
//! right; XDP sees full checksums only and updates them incrementally with
//! the same arithmetic the helpers use (`datapath_common::csum`).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use datapath_common::csum;

/// Size flag of the checksum helpers: the changed field is 4 bytes.
pub const CSUM_SIZE_4: u64 = 4;
/// Size flag of the checksum helpers: the changed field is 2 bytes.
pub const CSUM_SIZE_2: u64 = 2;
/// Checksum flag: the field is part of the TCP/UDP pseudo header.
pub const CSUM_PSEUDO: u64 = BPF_F_PSEUDO_HDR as u64;
/// Checksum flag: a UDP checksum of zero means "none" and stays zero.
pub const CSUM_UDP: u64 = BPF_F_MARK_MANGLED_0 as u64;

/// A packet under either hook.
pub trait Packet {
    /// Start of the linear packet data.
    fn data(&self) -> usize;
    /// End of the linear packet data.
    fn data_end(&self) -> usize;
    /// Makes the first `len` bytes linear if they are not (TC only).
    fn pull(&self, len: usize) -> Result<(), ()>;
    /// Overwrites `N` bytes at `off`.
    fn store<const N: usize>(&mut self, off: usize, bytes: &[u8; N]) -> Result<(), ()>;
    /// Updates the IPv4 header checksum at `csum_off` for a field of `size`
    /// ([`CSUM_SIZE_2`] or [`CSUM_SIZE_4`]) changing from `from` to `to`
    /// (wire bytes read as native integers, as the kernel helpers take them).
    fn l3_csum(&mut self, csum_off: usize, from: u32, to: u32, size: u64) -> Result<(), ()>;
    /// Updates the L4 checksum at `csum_off`; `flags` is a size ORed with
    /// [`CSUM_PSEUDO`] and [`CSUM_UDP`] as needed.
    fn l4_csum(&mut self, csum_off: usize, from: u32, to: u32, flags: u64) -> Result<(), ()>;

    /// A pointer to a `T` at `off`, bounds-checked against the packet end.
    #[inline(always)]
    fn ptr_at<T>(&self, off: usize) -> Result<*mut T, ()> {
        let start = self.data();
        let end = self.data_end();
        if start + off + size_of::<T>() > end {
            return Err(());
        }
        Ok((start + off) as *mut T)
    }

    /// Reads `N` bytes at `off`.
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Result<[u8; N], ()> {
        let p = self.ptr_at::<[u8; N]>(off)?;
        // SAFETY: bounds checked above; [u8; N] has alignment 1.
        Ok(unsafe { *p })
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn pull(&self, len: usize) -> Result<(), ()> {
        if self.data() + len <= self.data_end() {
            return Ok(());
        }
        self.pull_data(len as u32).map_err(|_| ())
    }

    #[inline(always)]
    fn store<const N: usize>(&mut self, off: usize, bytes: &[u8; N]) -> Result<(), ()> {
        TcContext::store(self, off, bytes, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn l3_csum(&mut self, csum_off: usize, from: u32, to: u32, size: u64) -> Result<(), ()> {
        self.l3_csum_replace(csum_off, u64::from(from), u64::from(to), size)
            .map_err(|_| ())
    }

    #[inline(always)]
    fn l4_csum(&mut self, csum_off: usize, from: u32, to: u32, flags: u64) -> Result<(), ()> {
        self.l4_csum_replace(csum_off, u64::from(from), u64::from(to), flags)
            .map_err(|_| ())
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    /// Read afresh (volatile) for every bounds check: with one read, LLVM
    /// drops a check that an earlier, wider one implies, and the verifier,
    /// which tracks each computed packet pointer separately, then sees an
    /// access without a check.
    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: `ctx` is the program's context; `data_end` a field of it.
        unsafe { core::ptr::read_volatile(&raw const (*self.ctx).data_end) as usize }
    }

    /// XDP frames are always linear. No bounds check here: LLVM would use it
    /// to drop the `ptr_at` checks that follow, and the verifier cannot
    /// relate the two (it tracks each computed offset separately).
    #[inline(always)]
    fn pull(&self, _len: usize) -> Result<(), ()> {
        Ok(())
    }

    #[inline(always)]
    fn store<const N: usize>(&mut self, off: usize, bytes: &[u8; N]) -> Result<(), ()> {
        let p = self.ptr_at::<[u8; N]>(off)?;
        // SAFETY: bounds checked; [u8; N] has alignment 1.
        unsafe { *p = *bytes };
        Ok(())
    }

    #[inline(always)]
    fn l3_csum(&mut self, csum_off: usize, from: u32, to: u32, size: u64) -> Result<(), ()> {
        update_csum(self, csum_off, from, to, size & 0xf, false)
    }

    #[inline(always)]
    fn l4_csum(&mut self, csum_off: usize, from: u32, to: u32, flags: u64) -> Result<(), ()> {
        update_csum(self, csum_off, from, to, flags & 0xf, flags & CSUM_UDP != 0)
    }
}

/// Incremental checksum update of a full (not partial) checksum in place.
#[inline(always)]
fn update_csum(
    ctx: &mut XdpContext,
    csum_off: usize,
    from: u32,
    to: u32,
    size: u64,
    udp: bool,
) -> Result<(), ()> {
    let p = ctx.ptr_at::<[u8; 2]>(csum_off)?;
    // SAFETY: bounds checked by ptr_at.
    let old = u16::from_be_bytes(unsafe { *p });
    let new = if size == CSUM_SIZE_4 {
        let (f, t) = (from.to_ne_bytes(), to.to_ne_bytes());
        if udp {
            csum::udp_replace32(old, f, t)
        } else {
            csum::replace32(old, f, t)
        }
    } else {
        let f = u16::from_be_bytes((from as u16).to_ne_bytes());
        let t = u16::from_be_bytes((to as u16).to_ne_bytes());
        if udp {
            csum::udp_replace16(old, f, t)
        } else {
            csum::replace16(old, f, t)
        }
    };
    // SAFETY: as above.
    unsafe { *p = new.to_be_bytes() };
    Ok(())
}
