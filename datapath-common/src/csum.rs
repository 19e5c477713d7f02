//! Internet checksum arithmetic.
//!
//! All functions take and return checksums as they appear on the wire, read
//! as a big-endian `u16`. Incremental updates follow RFC 1624 (`HC' = ~(~HC +
//! ~m + m')`), which, unlike RFC 1141, never produces `0xffff` from a valid
//! header by accident.

/// Adds `data` (big-endian 16-bit words, odd trailing byte padded with zero)
/// to the running one's-complement sum `sum` without folding.
pub fn sum_bytes(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([pair[0], pair[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds a 32-bit one's-complement sum to 16 bits.
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum of `data`: the complement of its folded sum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(0, data))
}

/// Updates checksum `csum` for one 16-bit word changing from `old` to `new`.
#[inline(always)]
pub const fn replace16(csum: u16, old: u16, new: u16) -> u16 {
    let sum = (!csum as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

/// Updates checksum `csum` for one 32-bit field (two words) changing from
/// `old` to `new`, both given as the four bytes on the wire.
#[inline(always)]
pub const fn replace32(csum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let old_hi = u16::from_be_bytes([old[0], old[1]]) as u32;
    let old_lo = u16::from_be_bytes([old[2], old[3]]) as u32;
    let new_hi = u16::from_be_bytes([new[0], new[1]]) as u32;
    let new_lo = u16::from_be_bytes([new[2], new[3]]) as u32;
    let sum = (!csum as u32) + (!old_hi & 0xffff) + (!old_lo & 0xffff) + new_hi + new_lo;
    !fold(sum)
}

/// Like [`replace16`] for a UDP checksum, where zero means "no checksum" and
/// must stay zero, and a computed zero is sent as `0xffff` (RFC 768).
#[inline(always)]
pub const fn udp_replace16(csum: u16, old: u16, new: u16) -> u16 {
    if csum == 0 {
        return 0;
    }
    match replace16(csum, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Like [`replace32`] for a UDP checksum (see [`udp_replace16`]).
#[inline(always)]
pub const fn udp_replace32(csum: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    if csum == 0 {
        return 0;
    }
    match replace32(csum, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Builds a fake header of `words`, computes its checksum, changes word
    /// `i` and compares the incremental update with a full recomputation.
    fn recompute(words: &[u16]) -> u16 {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        checksum(&bytes)
    }

    proptest! {
        #[test]
        fn replace16_matches_full_recomputation(
            mut words in proptest::collection::vec(any::<u16>(), 2..40),
            idx in any::<prop::sample::Index>(),
            new in any::<u16>(),
        ) {
            let i = idx.index(words.len());
            let before = recompute(&words);
            let old = words[i];
            words[i] = new;
            let after = recompute(&words);
            // Both are valid encodings of the same sum; compare the sums.
            let inc = replace16(before, old, new);
            prop_assert_eq!(fold(!inc as u32) % 0xffff, fold(!after as u32) % 0xffff);
        }

        #[test]
        fn replace32_matches_full_recomputation(
            mut words in proptest::collection::vec(any::<u16>(), 4..40),
            idx in any::<prop::sample::Index>(),
            new in any::<[u8; 4]>(),
        ) {
            let i = idx.index(words.len() - 1);
            let before = recompute(&words);
            let old = [words[i].to_be_bytes(), words[i + 1].to_be_bytes()].concat();
            let old: [u8; 4] = [old[0], old[1], old[2], old[3]];
            words[i] = u16::from_be_bytes([new[0], new[1]]);
            words[i + 1] = u16::from_be_bytes([new[2], new[3]]);
            let after = recompute(&words);
            let inc = replace32(before, old, new);
            prop_assert_eq!(fold(!inc as u32) % 0xffff, fold(!after as u32) % 0xffff);
        }

        #[test]
        fn udp_zero_checksum_stays_zero(old in any::<u16>(), new in any::<u16>()) {
            prop_assert_eq!(udp_replace16(0, old, new), 0);
        }
    }

    #[test]
    fn checksum_of_known_ipv4_header() {
        // Example header from RFC 1071 discussions / Wikipedia (checksum b861).
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&hdr), 0xb861);
    }

    #[test]
    fn incremental_update_of_known_header_verifies() {
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let new_dst = [198, 19, 0, 5];
        let old_dst = [hdr[16], hdr[17], hdr[18], hdr[19]];
        let c = replace32(u16::from_be_bytes([hdr[10], hdr[11]]), old_dst, new_dst);
        hdr[16..20].copy_from_slice(&new_dst);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(
            checksum(&hdr),
            0,
            "a header with a valid checksum sums to zero"
        );
    }
}
