//! A new `--ct-max` on a restart: the conntrack tables are pinned, and a
//! pinned map keeps the size it was created with, so reusing it would
//! silently ignore the new size. Before the object is loaded,
//! [`set_aside`] moves each conntrack table whose size differs to
//! `resizing_<NAME>`; the loader then creates and pins a table of the new
//! size, and [`Resized::migrate`] copies the flows into it, pair by pair
//! (an original entry and its reply, or neither), and removes the old
//! table.
//!
//! The kernel zeroes the expiry timer of a value written from user space,
//! so the copied confirmed flows are then given timers by the kernel (the
//! flush program's [`FLUSH_F_ARM`](datapath_common::FLUSH_F_ARM) request):
//! they expire like every other flow. Once the old table's last pin and
//! descriptor are gone the kernel cancels its timers and the previous
//! programs (still attached until the new ones replace them) can arm no
//! new ones: a connection opened in that moment is refused once and
//! retried. Flows that do not fit a smaller table are dropped and taken
//! off their container's count.

use std::{
    collections::HashMap as StdHashMap,
    io,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData, MapInfo};
use datapath_common::{CtContainer, CtEntry, CtKey, CtTimedEntry, names};

use super::{BpfError, conntrack::read_all};

/// Prefix of the pin of a conntrack table set aside for a resize (bpffs
/// refuses names with a dot).
pub(crate) const PREFIX: &str = "resizing_";

/// The conntrack tables set aside by [`set_aside`].
#[derive(Debug, Default)]
pub struct Resized {
    /// The main table's old pin, if it was resized.
    ct: Option<PathBuf>,
    /// The unconfirmed table's old pin, if it was resized.
    ct_new: Option<PathBuf>,
}

/// What [`Resized::migrate`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migration {
    /// Flows copied (both tables).
    pub copied: usize,
    /// Flows that did not fit the new tables.
    pub dropped: usize,
}

fn fs_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> BpfError + 'p {
    move |source| BpfError::Fs {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Sets aside, in `maps_dir`, the pinned conntrack tables whose size is
/// not the one wanted (`ct_max` entries for the main table,
/// `ct_new_max` for the unconfirmed one). A table already set aside by an
/// interrupted resize is kept (it holds the flows), and the half-filled
/// new table is removed to be made again.
pub fn set_aside(maps_dir: &Path, ct_max: u32, ct_new_max: u32) -> Result<Resized, BpfError> {
    Ok(Resized {
        ct: set_aside_one(maps_dir, names::CT, ct_max)?,
        ct_new: set_aside_one(maps_dir, names::CT_NEW, ct_new_max)?,
    })
}

fn set_aside_one(
    maps_dir: &Path,
    name: &'static str,
    want: u32,
) -> Result<Option<PathBuf>, BpfError> {
    let pin = maps_dir.join(name);
    let aside = maps_dir.join(format!("{PREFIX}{name}"));
    let size = |path: &Path| MapInfo::from_pin(path).ok().map(|i| i.max_entries());
    if aside.exists() {
        if size(&pin).is_some_and(|n| n != want) {
            std::fs::remove_file(&pin).map_err(fs_err("remove", &pin))?;
        }
        return Ok(Some(aside));
    }
    match size(&pin) {
        Some(n) if n != want => {
            log::info!("conntrack table {name}: resizing from {n} to {want} entries");
            std::fs::rename(&pin, &aside).map_err(fs_err("rename", &pin))?;
            Ok(Some(aside))
        }
        _ => Ok(None),
    }
}

impl Resized {
    /// Whether a table was set aside.
    pub fn any(&self) -> bool {
        self.ct.is_some() || self.ct_new.is_some()
    }

    /// Copies the flows of the set-aside tables into the new ones (`ct`,
    /// `ct_new`), taking flows that do not fit off their container's
    /// count in `containers`, and removes the old tables. The caller arms
    /// the copied flows' timers.
    pub fn migrate(
        self,
        ct: &mut HashMap<MapData, CtKey, CtTimedEntry>,
        ct_new: &mut HashMap<MapData, CtKey, CtEntry>,
        containers: &mut HashMap<MapData, u32, CtContainer>,
    ) -> Result<Migration, BpfError> {
        let mut done = Migration::default();
        if let Some(path) = &self.ct {
            let old: StdHashMap<CtKey, CtTimedEntry> = take(path, names::CT)?;
            let lost = copy_pairs(
                &old,
                |v| &v.entry,
                &mut done,
                |k, v, flags| insert_or_remove(ct, k, v, flags),
            );
            // Only the main table's entries are counted per container.
            uncount(containers, &lost);
        }
        if let Some(path) = &self.ct_new {
            let old: StdHashMap<CtKey, CtEntry> = take(path, names::CT_NEW)?;
            copy_pairs(
                &old,
                |e| e,
                &mut done,
                |k, v, flags| insert_or_remove(ct_new, k, v, flags),
            );
        }
        Ok(done)
    }
}

/// What [`copy_pairs`] asks of a table.
#[derive(Clone, Copy)]
enum Op {
    /// Insert unless the key is there (`BPF_NOEXIST`: a flow the new
    /// programs already created wins).
    Insert,
    /// Remove (the other half of a pair did not fit).
    Remove,
}

/// Whether an insert was refused because the key exists.
fn exists(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST))
}

/// Carries out `op` on `map`; `Ok(false)` when an insert found the key
/// there already.
fn insert_or_remove<V: aya::Pod>(
    map: &mut HashMap<MapData, CtKey, V>,
    key: CtKey,
    value: V,
    op: Op,
) -> Result<bool, aya::maps::MapError> {
    match op {
        Op::Insert => match map.insert(key, value, NO_EXIST) {
            Ok(()) => Ok(true),
            Err(e) if exists(&e) => Ok(false),
            Err(e) => Err(e),
        },
        Op::Remove => map.remove(&key).map(|()| true),
    }
}

/// `BPF_NOEXIST`.
const NO_EXIST: u64 = 1;

/// Reads every entry of the set-aside table at `path` and removes it:
/// with its pin and this descriptor gone the kernel cancels its timers.
fn take<V: bytemuck::Pod>(
    path: &Path,
    name: &'static str,
) -> Result<StdHashMap<CtKey, V>, BpfError> {
    let map = MapData::from_pin(path).map_err(|source| BpfError::Map { name, source })?;
    let all: Vec<(CtKey, V)> = read_all(&map).map_err(|source| BpfError::Read { name, source })?;
    std::fs::remove_file(path).map_err(fs_err("remove", path))?;
    Ok(all.into_iter().collect())
}

/// Inserts each flow of `old` (original and reply entry together, or
/// neither) with `apply`; returns the container and entry count of each
/// flow that did not fit.
fn copy_pairs<V: Copy>(
    old: &StdHashMap<CtKey, V>,
    entry: impl Fn(&V) -> &CtEntry,
    done: &mut Migration,
    mut apply: impl FnMut(CtKey, V, Op) -> Result<bool, aya::maps::MapError>,
) -> Vec<(u32, u64)> {
    let mut lost = Vec::new();
    for (key, v) in old.iter().filter(|(_, v)| entry(v).is_original()) {
        let e = entry(v);
        let peer = e.peer_key(key);
        let reply = old.get(&peer).copied();
        let fits = match apply(*key, *v, Op::Insert) {
            // The new programs created this flow already: theirs wins.
            Ok(false) => true,
            Ok(true) => match reply.map(|r| apply(peer, r, Op::Insert)) {
                None | Some(Ok(_)) => true,
                Some(Err(_)) => {
                    // Best effort: a stray original is removed by a flush.
                    let _ = apply(*key, *v, Op::Remove);
                    false
                }
            },
            Err(_) => false,
        };
        if fits {
            done.copied += 1;
        } else {
            done.dropped += 1;
            lost.push((e.container_id, 1 + u64::from(reply.is_some())));
        }
    }
    lost
}

/// Takes the entries of flows that were not copied off their containers'
/// counts. The datapath adds to the counts atomically; this runs before
/// the new programs are attached, while the previous ones may still add,
/// so a count may be off by a flow created in that moment.
fn uncount(containers: &mut HashMap<MapData, u32, CtContainer>, lost: &[(u32, u64)]) {
    for &(id, n) in lost {
        if let Ok(mut c) = containers.get(&id, 0) {
            c.entries = c.entries.saturating_sub(n);
            if let Err(e) = containers.insert(id, c, 0) {
                log::warn!("conntrack count of container {id}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use datapath_common::{CT_F_ORIGINAL, ct_action, proto};

    use super::*;

    /// Flow `i`: its original entry (client port `i` to a published port,
    /// DNAT to a container) and its reply entry.
    fn flow(i: u16) -> [(CtKey, CtEntry); 2] {
        let key = CtKey {
            saddr: [198, 18, 0, 1],
            daddr: [198, 18, 0, 2],
            sport: i,
            dport: 8080,
            proto: proto::TCP,
            _pad: [0; 3],
        };
        let orig = CtEntry {
            nat_addr: [198, 19, 0, 2],
            nat_port: 80,
            action: ct_action::DNAT,
            flags: CT_F_ORIGINAL,
            container_id: 7,
            ..bytemuck::Zeroable::zeroed()
        };
        let reply = CtEntry { flags: 0, ..orig };
        [(key, orig), (orig.peer_key(&key), reply)]
    }

    /// A table of `capacity` entries holding `present` already.
    fn copy_into(
        old: &StdHashMap<CtKey, CtEntry>,
        capacity: usize,
        present: &[CtKey],
    ) -> (Migration, Vec<(u32, u64)>, StdHashMap<CtKey, CtEntry>) {
        let mut table: StdHashMap<CtKey, CtEntry> = present.iter().map(|k| (*k, old[k])).collect();
        let mut done = Migration::default();
        let lost = copy_pairs(
            old,
            |e| e,
            &mut done,
            |k, v, op| match op {
                Op::Insert if table.contains_key(&k) => Ok(false),
                Op::Insert if table.len() == capacity => Err(aya::maps::MapError::KeyNotFound),
                Op::Insert => Ok(table.insert(k, v).is_none()),
                Op::Remove => Ok(table.remove(&k).is_some()),
            },
        );
        (done, lost, table)
    }

    #[test]
    fn flows_are_copied_as_whole_pairs_and_those_that_do_not_fit_are_uncounted() {
        let old: StdHashMap<CtKey, CtEntry> = (1..=3).flat_map(flow).collect();
        // Room for two and a half flows: the third's reply does not fit,
        // so its original is taken out again.
        let (done, lost, table) = copy_into(&old, 5, &[]);
        assert_eq!(
            done,
            Migration {
                copied: 2,
                dropped: 1
            }
        );
        assert_eq!(lost, vec![(7, 2)]);
        assert_eq!(table.len(), 4);
        for (k, e) in table.iter().filter(|(_, e)| e.is_original()) {
            assert!(
                table.contains_key(&e.peer_key(k)),
                "each flow has its reply"
            );
        }
    }

    #[test]
    fn a_flow_the_new_programs_created_already_is_kept_as_theirs() {
        let old: StdHashMap<CtKey, CtEntry> = flow(1).into_iter().collect();
        let [(orig, _), _] = flow(1);
        let (done, lost, table) = copy_into(&old, 4, &[orig]);
        assert_eq!(
            done,
            Migration {
                copied: 1,
                dropped: 0
            }
        );
        assert!(lost.is_empty());
        assert_eq!(table.len(), 1, "nothing written over the new flow");
    }
}
