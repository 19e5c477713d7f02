//! Internet checksum arithmetic (datapath-common's `csum`, which the XDP
//! program uses for every rewrite): a computed checksum verifies, and an
//! incremental update of one 16- or 32-bit field gives a header that
//! verifies, exactly as recomputing from scratch would; UDP's "no
//! checksum" zero stays zero and a computed zero is sent as 0xffff.
#![no_main]

use arbitrary::Arbitrary;
use datapath_common::csum::{
    checksum, fold, replace16, replace32, sum_bytes, udp_replace16, udp_replace32,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The header's words, its checksum field among them.
    words: Vec<u16>,
    /// Which word holds the checksum.
    csum_at: usize,
    /// Which word (or pair of words) changes.
    at: usize,
    new16: u16,
    new32: [u8; 4],
    /// A checksum to update as UDP does.
    udp_csum: u16,
}

fn bytes(words: &[u16]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// Whether a header verifies: its words, checksum included, sum to
/// one's-complement zero. A header whose other words are all zero verifies
/// with either encoding of zero (0x0000 or 0xffff) as checksum.
fn verifies(words: &[u16], csum_at: usize) -> bool {
    let others_zero = words
        .iter()
        .enumerate()
        .all(|(i, w)| i == csum_at || *w == 0);
    checksum(&bytes(words)) == 0 || (others_zero && matches!(words[csum_at], 0 | 0xffff))
}

fuzz_target!(|input: Input| {
    let mut words = input.words;
    if words.len() < 3 {
        return;
    }
    words.truncate(64);
    let c = input.csum_at % words.len();
    words[c] = 0;
    words[c] = checksum(&bytes(&words));
    assert!(
        verifies(&words, c),
        "a computed checksum verifies: {words:04x?}"
    );
    assert_eq!(
        fold(sum_bytes(0, &bytes(&words))),
        0xffff,
        "sum_bytes and fold agree with checksum"
    );

    // One 16-bit field, not the checksum.
    let i = (c + 1 + input.at % (words.len() - 1)) % words.len();
    let mut one = words.clone();
    let old = one[i];
    one[i] = input.new16;
    one[c] = replace16(one[c], old, input.new16);
    assert!(verifies(&one, c), "replace16 of word {i}: {one:04x?}");

    // One 32-bit field (two consecutive words), neither the checksum.
    let candidates: Vec<usize> = (0..words.len() - 1)
        .filter(|&j| j != c && j + 1 != c)
        .collect();
    if !candidates.is_empty() {
        let j = candidates[input.at % candidates.len()];
        let mut two = words.clone();
        let old = [bytes(&two[j..j + 1]), bytes(&two[j + 1..j + 2])].concat();
        let old = [old[0], old[1], old[2], old[3]];
        two[j] = u16::from_be_bytes([input.new32[0], input.new32[1]]);
        two[j + 1] = u16::from_be_bytes([input.new32[2], input.new32[3]]);
        two[c] = replace32(two[c], old, input.new32);
        assert!(
            verifies(&two, c),
            "replace32 of words {j}-{}: {two:04x?}",
            j + 1
        );
        let udp = udp_replace32(input.udp_csum, old, input.new32);
        if input.udp_csum == 0 {
            assert_eq!(udp, 0, "no checksum stays no checksum");
        } else {
            assert_ne!(udp, 0, "a computed zero is sent as 0xffff");
            let plain = replace32(input.udp_csum, old, input.new32);
            assert_eq!(udp, if plain == 0 { 0xffff } else { plain });
        }
    }
    let udp = udp_replace16(input.udp_csum, old, input.new16);
    if input.udp_csum == 0 {
        assert_eq!(udp, 0);
    } else {
        assert_ne!(udp, 0);
        let plain = replace16(input.udp_csum, old, input.new16);
        assert_eq!(udp, if plain == 0 { 0xffff } else { plain });
    }
});
