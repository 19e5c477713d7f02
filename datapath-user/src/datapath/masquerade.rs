//! The destinations container traffic is not masqueraded for
//! (`--non-masquerade-cidr`): an LPM trie the container program consults
//! before it masquerades a new flow.

use aya::maps::{
    MapError,
    lpm_trie::{Key, LpmTrie},
};
use datapath_common::names;
use ipnet::Ipv4Net;

use super::{BpfError, Datapath};

impl Datapath {
    /// Makes the non-masquerade prefixes exactly `cidrs`.
    pub fn set_non_masquerade(&mut self, cidrs: &[Ipv4Net]) -> Result<(), BpfError> {
        let name = names::NON_MASQUERADE;
        let map_err = |source: MapError| BpfError::Map { name, source };
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(BpfError::MissingMap { name })?;
        let mut trie: LpmTrie<_, [u8; 4], u8> = LpmTrie::try_from(map).map_err(map_err)?;
        let want: Vec<(u32, [u8; 4])> = cidrs
            .iter()
            .map(|c| (u32::from(c.prefix_len()), c.network().octets()))
            .collect();
        let stale: Vec<Key<[u8; 4]>> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stale {
            trie.remove(&k).map_err(map_err)?;
        }
        for (len, addr) in want {
            trie.insert(&Key::new(len, addr), 1, 0).map_err(map_err)?;
        }
        Ok(())
    }
}
