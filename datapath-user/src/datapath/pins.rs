//! Pinned maps checked before they are reused.
//!
//! A restarted agent reuses the maps it finds pinned (so flows survive),
//! but only if they are what its programs expect: the map type, key and
//! value sizes, maximum entries and flags the object declares. A pinned map
//! of another layout is never run with:
//!
//! * same key and value sizes, another capacity, flags or a type of the
//!   same kind (hash and LRU hash, say): it is **migrated**. Its pin is
//!   moved aside (`maps/migrate_<NAME>`), the loader creates and pins a new
//!   map, the entries are copied into it, and the old pin is removed. A
//!   migration cut off by a crash is finished by the next start.
//! * another key or value size, or a type that cannot be copied into the
//!   declared one: the agent **refuses** to start, naming the map, the pin
//!   and what differs, and changes nothing.
//!
//! The conntrack tables' capacity is `--ct-max`'s and may change from one
//! start to the next: [`super::resize`] makes them again at the new size,
//! keeping their flows paired and their expiry timers armed. Here only the
//! rest of their layout is checked.

use std::{
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use serde::Serialize;

use super::{BpfError, sys};

/// Prefix of a pinned map moved aside while it is migrated (bpffs names
/// cannot contain dots).
pub const MIGRATE_PREFIX: &str = "migrate_";

/// `BPF_MAP_TYPE_*` numbers of the types handled here.
mod map_type {
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const PERF_EVENT_ARRAY: u32 = 4;
    pub const PERCPU_HASH: u32 = 5;
    pub const PERCPU_ARRAY: u32 = 6;
    pub const LRU_HASH: u32 = 9;
    pub const LRU_PERCPU_HASH: u32 = 10;
    pub const LPM_TRIE: u32 = 11;
    pub const DEVMAP: u32 = 14;
    pub const CPUMAP: u32 = 16;
    pub const DEVMAP_HASH: u32 = 25;
    pub const RINGBUF: u32 = 27;
}

/// A map's layout: what must match for programs to use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapLayout {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Maximum number of entries.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub flags: u32,
}

impl MapLayout {
    /// The layout of the map pinned at `path`; `None` if nothing is pinned
    /// there.
    pub fn of_pin(path: &Path) -> Result<Option<Self>, BpfError> {
        match sys::obj_get(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(BpfError::Fs {
                    action: "open the pinned map",
                    path: path.to_owned(),
                    source,
                });
            }
        }
        let info = MapInfo::from_pin(path).map_err(|e| BpfError::Fs {
            action: "read the pinned map",
            path: path.to_owned(),
            source: io::Error::other(e.to_string()),
        })?;
        Ok(Some(Self {
            map_type: info_type(&info),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        }))
    }

    /// The layout the loader gives map `name` of `object`, with
    /// `max_entries` overriding the declared capacity (as
    /// `EbpfLoader::map_max_entries` does); `None` if there is no such map.
    pub fn declared(
        object: &aya_obj::Object,
        name: &str,
        max_entries: Option<u32>,
    ) -> Result<Option<Self>, BpfError> {
        let Some(map) = object.maps.get(name) else {
            return Ok(None);
        };
        let map_type = map.map_type();
        let mut layout = Self {
            map_type,
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: max_entries.unwrap_or_else(|| map.max_entries()),
            flags: map.map_flags(),
        };
        // What the loader changes before it creates a map (aya's rules).
        match map_type {
            map_type::PERF_EVENT_ARRAY if layout.max_entries == 0 => {
                layout.max_entries = u32::try_from(nr_cpus()?).unwrap_or(u32::MAX);
            }
            map_type::RINGBUF => {
                let page = 4096u32;
                layout.value_size = 0;
                if layout.max_entries != 0 {
                    layout.max_entries =
                        page * layout.max_entries.div_ceil(page).next_power_of_two();
                }
            }
            map_type::DEVMAP | map_type::DEVMAP_HASH | map_type::CPUMAP => layout.value_size = 8,
            _ => {}
        }
        Ok(Some(layout))
    }

    /// Whether entries can be copied from a map of this layout into one of
    /// `to`'s (same key and value sizes, the same kind of map).
    fn copies_into(&self, to: &Self) -> bool {
        self.key_size == to.key_size
            && self.value_size == to.value_size
            && copy_kind(self.map_type).is_some()
            && copy_kind(self.map_type) == copy_kind(to.map_type)
    }

    fn per_cpu(&self) -> bool {
        matches!(
            self.map_type,
            map_type::PERCPU_HASH | map_type::PERCPU_ARRAY | map_type::LRU_PERCPU_HASH
        )
    }

    /// What differs from `want`, for messages.
    fn differences(&self, want: &Self) -> String {
        let mut out = Vec::new();
        for (what, have, expected) in [
            ("type", self.map_type, want.map_type),
            ("key size", self.key_size, want.key_size),
            ("value size", self.value_size, want.value_size),
            ("max entries", self.max_entries, want.max_entries),
            ("flags", self.flags, want.flags),
        ] {
            if have != expected {
                out.push(format!(
                    "{what} {have} where the programs expect {expected}"
                ));
            }
        }
        out.join(", ")
    }
}

/// Types whose entries can be copied into each other with the element
/// commands, grouped by kind.
fn copy_kind(map_type: u32) -> Option<u8> {
    match map_type {
        map_type::HASH | map_type::LRU_HASH => Some(1),
        map_type::PERCPU_HASH | map_type::LRU_PERCPU_HASH => Some(2),
        map_type::ARRAY => Some(3),
        map_type::PERCPU_ARRAY => Some(4),
        map_type::LPM_TRIE => Some(5),
        _ => None,
    }
}

fn info_type(info: &MapInfo) -> u32 {
    // aya's MapInfo gives the type as an enum; the number is what is
    // compared with the object's.
    info.map_type().map_or(u32::MAX, |t| t as u32)
}

fn nr_cpus() -> Result<usize, BpfError> {
    aya::util::nr_cpus().map_err(|(path, source)| BpfError::Fs {
        action: "read",
        path: path.into(),
        source,
    })
}

/// A pinned map moved aside, to be copied into the new map of its name.
#[derive(Debug)]
pub struct Migration {
    name: &'static str,
    /// Where the old map is pinned meanwhile.
    staged: PathBuf,
    /// Where the new one is pinned.
    pin: PathBuf,
    layout: MapLayout,
}

/// Checks every map pinned under `maps_dir` against what `object`
/// declares, before the object is loaded; of the maps in `resized`
/// (whose capacity another step sets, [`super::resize`]) every property
/// but the capacity. Maps to migrate are moved aside and returned; a map
/// that cannot be used or migrated is refused, and nothing is changed.
pub fn prepare(
    object: &[u8],
    maps_dir: &Path,
    names: &[&'static str],
    resized: &[&'static str],
) -> Result<Vec<Migration>, BpfError> {
    let object = aya_obj::Object::parse(object).map_err(|e| BpfError::Fs {
        action: "parse the eBPF object",
        path: PathBuf::from("(embedded)"),
        source: io::Error::other(e.to_string()),
    })?;
    let mut plan = Vec::new();
    for &name in names {
        let pin = maps_dir.join(name);
        let staged = maps_dir.join(format!("{MIGRATE_PREFIX}{name}"));
        let max = if resized.contains(&name) {
            MapLayout::of_pin(&pin)?.map(|have| have.max_entries)
        } else {
            None
        };
        let Some(want) = MapLayout::declared(&object, name, max)? else {
            continue;
        };
        let refuse = |path: &Path, have: &MapLayout, why: &str| BpfError::PinnedMap {
            name,
            path: path.to_owned(),
            reason: format!("{}{why}", have.differences(&want)),
        };
        // A migration cut off by a crash: its source is still aside.
        if let Some(old) = MapLayout::of_pin(&staged)? {
            if !old.copies_into(&want) {
                return Err(refuse(
                    &staged,
                    &old,
                    "; it cannot be copied into the new layout",
                ));
            }
            if let Some(current) = MapLayout::of_pin(&pin)?
                && current != want
            {
                return Err(refuse(&pin, &current, " (a migration of it was cut off)"));
            }
            plan.push((name, pin, staged, old, false));
            continue;
        }
        match MapLayout::of_pin(&pin)? {
            None => {}
            Some(have) if have == want => {}
            Some(have) if have.copies_into(&want) => plan.push((name, pin, staged, have, true)),
            Some(have) => {
                return Err(refuse(
                    &pin,
                    &have,
                    "; an agent of another version made it. It cannot be reused or migrated: \
                     the maps of this datapath need a restart without it",
                ));
            }
        }
    }
    // Only once every map passed: move the ones to migrate aside.
    let mut migrations = Vec::new();
    for (name, pin, staged, layout, move_aside) in plan {
        if move_aside {
            fs::rename(&pin, &staged).map_err(|source| BpfError::Fs {
                action: "move aside the pinned map",
                path: pin.clone(),
                source,
            })?;
            tracing::warn!(map = name, from = ?layout, "migrating a pinned map of another layout");
        }
        migrations.push(Migration {
            name,
            staged,
            pin,
            layout,
        });
    }
    Ok(migrations)
}

/// Copies every migrated map's entries into the new map pinned in its
/// place and removes the old pin. On failure the new pin is removed and the
/// old one put back, so that the next start finds what this one found.
pub fn finish(migrations: Vec<Migration>) -> Result<(), BpfError> {
    for m in migrations {
        match copy(&m) {
            Ok(n) => {
                tracing::info!(map = m.name, entries = n, "pinned map migrated");
                fs::remove_file(&m.staged).map_err(|source| BpfError::Fs {
                    action: "remove the migrated map's old pin",
                    path: m.staged.clone(),
                    source,
                })?;
            }
            Err(source) => {
                let _ = fs::remove_file(&m.pin);
                let _ = fs::rename(&m.staged, &m.pin);
                return Err(BpfError::PinnedMap {
                    name: m.name,
                    path: m.pin.clone(),
                    reason: format!("migrating its entries into the new layout failed: {source}"),
                });
            }
        }
    }
    Ok(())
}

/// Copies the entries of `m`'s old map into its new one; the number
/// copied. Array slots beyond the new capacity must be zero.
fn copy(m: &Migration) -> io::Result<usize> {
    let old = sys::obj_get(&m.staged)?;
    let new = sys::obj_get(&m.pin)?;
    let key_size = usize::try_from(m.layout.key_size).map_err(io::Error::other)?;
    let value_size = usize::try_from(m.layout.value_size).map_err(io::Error::other)?;
    let value_len = if m.layout.per_cpu() {
        value_size.div_ceil(8) * 8 * nr_cpus().map_err(io::Error::other)?
    } else {
        value_size
    };
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_len];
    let mut first = true;
    let mut copied = 0;
    while sys::next_key(old.as_fd(), (!first).then_some(key.as_slice()), &mut next)? {
        first = false;
        key.copy_from_slice(&next);
        if !sys::lookup(old.as_fd(), &key, &mut value)? {
            continue;
        }
        match sys::update(new.as_fd(), &key, &value) {
            Ok(()) => copied += 1,
            // An array slot beyond the new capacity: only zeros may be lost.
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) && value.iter().all(|b| *b == 0) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("entry {copied}: {e} (does the new capacity hold every entry?)"),
                ));
            }
        }
    }
    Ok(copied)
}

/// The layout of every map pinned under `maps_dir` among `names`, for
/// `datapath status`.
pub fn layouts(maps_dir: &Path, names: &[&'static str]) -> Vec<(&'static str, Option<MapLayout>)> {
    names
        .iter()
        .map(|n| (*n, MapLayout::of_pin(&maps_dir.join(n)).ok().flatten()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(max: u32) -> MapLayout {
        MapLayout {
            map_type: map_type::HASH,
            key_size: 16,
            value_size: 48,
            max_entries: max,
            flags: 0,
        }
    }

    #[test]
    fn only_maps_of_the_same_sizes_and_kind_can_be_migrated() {
        assert!(hash(10).copies_into(&hash(20)));
        let lru = MapLayout {
            map_type: map_type::LRU_HASH,
            ..hash(20)
        };
        assert!(hash(10).copies_into(&lru));
        let bigger = MapLayout {
            value_size: 56,
            ..hash(10)
        };
        assert!(!bigger.copies_into(&hash(10)));
        let array = MapLayout {
            map_type: map_type::ARRAY,
            ..hash(10)
        };
        assert!(!array.copies_into(&hash(10)));
        let storage = MapLayout {
            map_type: 19,
            ..hash(10)
        };
        assert!(!storage.copies_into(&storage));
        assert_eq!(
            bigger.differences(&hash(10)),
            "value size 56 where the programs expect 48"
        );
    }
}
