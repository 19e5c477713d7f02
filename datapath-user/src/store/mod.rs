//! The agent's persisted desired state: its containers, their addresses
//! (the IPAM record), published ports and rate limits ([`State`]), and how
//! it is kept on disk ([`Store`]).
//!
//! # How the state is kept
//!
//! A change writes only what changed, and is durable before the agent
//! acknowledges it: the state directory holds
//!
//! * `state.json`, a **snapshot** of the whole state (the format of the
//!   single state file of earlier versions, plus the sequence number of the
//!   last change it includes), written atomically (temporary file, fsync,
//!   rename, directory fsync);
//! * `journal.<n>`, an **append-only journal** of the changes since (one
//!   record per change, framed with its length and a CRC-32, `fdatasync`ed
//!   before the answer; [`journal`]).
//!
//! A change is one record, whatever it does (a container with 10,000 ports
//! added, 5,000 ports published at once, one port removed): it is written
//! whole or not at all, and applied to the state in memory only once it is
//! durable. So a crash at any point leaves each container all there or not
//! at all. At start the snapshot is read and the journal replayed; a torn
//! last record (a crash in the middle of its write, never acknowledged) is
//! dropped, anything else that does not read back is reported as corrupt,
//! never silently discarded.
//!
//! When the journal has grown past the snapshot's size (at least 1 MiB), a
//! new journal file is started and a snapshot of the state as of the end
//! of the old one is written by a thread of its own, which then deletes the
//! old journal: compaction costs O(state) but runs once every O(state)
//! changes and never holds up a change.
//!
//! Why this and not the alternatives (measured on this project's machines,
//! ext4 on a virtual disk, one 120-byte change): appending a record and
//! `fdatasync` took 0.1–0.2 ms at p50; rewriting and fsyncing a 400 KB
//! state file (10,000 ports) 0.6–3.4 ms, and growing with the state; an
//! embedded B-tree store (`redb`) committing one row 0.13 ms, the same
//! order as the journal, with spikes of the same size (the disk's fsync).
//! Per-container files would still rewrite a container's whole port list
//! for one port. The journal is the cheapest write that is O(1), keeps the
//! human-readable JSON snapshot (and its validation) that earlier versions
//! wrote, needs no new storage engine, and makes upgrading trivial: an
//! existing `state.json` is simply a snapshot with an empty journal.
//!
//! # In memory
//!
//! [`State`] keeps its containers in a persistent map (`imbl`) of shared
//! records, with indexes of published ports ([`index::PortIndex`]), ids and
//! limited cgroups: a change is checked and applied in O(log n), and a copy
//! of the whole state — for the API's snapshot after every change, or for
//! compaction — costs O(1).

mod file;
pub mod index;
pub mod journal;
mod lock;

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use datapath_common::monitor::{CONTAINER_SLOTS, slot};

use imbl::OrdMap;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use self::file::{STATE_FILE, StateError, StateStore};
pub use self::lock::{LockError, StateLock};
use self::{
    index::{Ipam, PortIndex},
    journal::Journal,
};
use crate::model::{PortMapping, RateLimits, identity::NetnsId, ports::PortSet};

/// One container the agent manages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// The agent's number for it (in conntrack entries and the veth name).
    pub id: u32,
    /// The name users gave it.
    pub name: String,
    /// Path of its network namespace.
    pub netns: PathBuf,
    /// Identity of that namespace when the container was added: the path
    /// is trusted only while it names this namespace. Absent in state files
    /// of older agents (the namespace found at the path is recorded then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_id: Option<NetnsId>,
    /// Interface name inside the container.
    pub ifname: String,
    /// Host-side veth name.
    pub host_ifname: String,
    /// Its address from the pool.
    pub addr: Ipv4Addr,
    /// Published ports.
    pub publish: Vec<PortMapping>,
    /// MAC address of the container's interface (hex, `aa:bb:…`).
    #[serde(default)]
    pub mac: String,
    /// Its cgroup v2 directory (canonical), if one was given. It may not
    /// exist yet: runtimes create it after the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// That cgroup's id (inode) while it exists and its limits are
    /// applied; 0 without one, and while it does not exist (its limits are
    /// pending).
    #[serde(default)]
    pub cgroup_id: u64,
    /// Rate limits.
    #[serde(default)]
    pub limits: RateLimits,
    /// The MTU of both ends of its veth pair, if given for it (none: the
    /// agent's `--mtu`, or the uplink's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl Container {
    /// Whether its rate limits wait for its cgroup to appear.
    pub fn limits_pending(&self) -> bool {
        self.cgroup.is_some() && self.cgroup_id == 0 && !self.limits.is_empty()
    }
}

/// One change of the state: what a journal record holds. A record holds
/// one or more, applied together or not at all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// A container added, or replaced whole (adoption at start).
    Put(Box<Container>),
    /// A container removed.
    Remove {
        /// Its name.
        name: String,
    },
    /// Ports published by a container (none of them published before).
    Publish {
        /// The container's name.
        name: String,
        /// The new mappings.
        ports: Vec<PortMapping>,
    },
    /// Ports a container no longer publishes.
    Unpublish {
        /// The container's name.
        name: String,
        /// The mappings removed (each one published before).
        ports: Vec<PortMapping>,
    },
    /// A container's rate limits replaced.
    Limits {
        /// The container's name.
        name: String,
        /// The new limits.
        limits: RateLimits,
    },
    /// The pool and masquerade ports the agent runs with (every
    /// container's address must be in the pool).
    Ranges {
        /// The container pool.
        pool: Ipv4Net,
        /// The masquerade port range.
        snat_ports: (u16, u16),
    },
    /// A container's cgroup appeared, was recreated or went: the id its
    /// limits now use (0: gone, its limits pending).
    Cgroup {
        /// The container's name.
        name: String,
        /// The cgroup's id, 0 while it does not exist.
        cgroup_id: u64,
    },
    /// The ports this agent holds in `ip_local_reserved_ports` replaced.
    ReservedPorts {
        /// All of them.
        ports: PortSet,
    },
}

/// Everything the agent persists, with its indexes. Built and changed only
/// through checks that keep what the types cannot say: every container
/// filed under its own name, ids unique, above 0 and below `next_id` (no
/// id is handed out twice), no two published mappings overlapping.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// The next container id to hand out (ids are never reused).
    next_id: u32,
    /// The pool the containers' addresses come from (absent in state files
    /// of older agents): a restart with another pool is refused while
    /// containers from this one exist, and every container's address is in
    /// it.
    pool: Option<Ipv4Net>,
    /// The masquerade port range the agent ran with.
    snat_ports: Option<(u16, u16)>,
    /// Containers by name.
    containers: OrdMap<String, Arc<Container>>,
    /// Container names by id.
    ids: OrdMap<u32, Arc<str>>,
    /// Published ports.
    ports: PortIndex,
    /// The container whose limits use each cgroup's buckets.
    limited: OrdMap<u64, Arc<str>>,
    /// The container whose limits name each cgroup directory, applied or
    /// pending (see [`Container::limits_pending`]).
    limited_paths: OrdMap<PathBuf, Arc<str>>,
    /// The ports this agent added to the node's
    /// `net.ipv4.ip_local_reserved_ports` (not those reserved before it),
    /// given back when no longer published or masqueraded.
    reserved_ports: PortSet,
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.next_id == other.next_id
            && self.pool == other.pool
            && self.snat_ports == other.snat_ports
            && self.containers == other.containers
            && self.reserved_ports == other.reserved_ports
    }
}

impl Eq for State {}

/// [`State`]'s fields as stored, before they are checked.
#[derive(Deserialize)]
struct StateFields {
    next_id: u32,
    #[serde(default)]
    pool: Option<Ipv4Net>,
    #[serde(default)]
    snat_ports: Option<(u16, u16)>,
    containers: BTreeMap<String, Container>,
    #[serde(default)]
    reserved_ports: PortSet,
}

impl TryFrom<StateFields> for State {
    type Error = String;

    fn try_from(f: StateFields) -> Result<Self, String> {
        if f.next_id == u32::MAX {
            return Err("next_id is exhausted".to_owned());
        }
        let mut st = State {
            next_id: f.next_id,
            pool: f.pool,
            snat_ports: f.snat_ports,
            reserved_ports: f.reserved_ports,
            ..State::default()
        };
        for (name, c) in f.containers {
            if name != c.name {
                return Err(format!("container {:?} is filed under {name:?}", c.name));
            }
            st.apply(&Change::Put(Box::new(c)))?;
        }
        Ok(st)
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fields = StateFields::deserialize(d)?;
        State::try_from(fields).map_err(serde::de::Error::custom)
    }
}

/// The containers of a [`State`] as a JSON object by name.
struct ContainersByName<'a>(&'a OrdMap<String, Arc<Container>>);

impl Serialize for ContainersByName<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, &**v)))
    }
}

impl Serialize for State {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut st = s.serialize_struct("State", 5)?;
        st.serialize_field("next_id", &self.next_id)?;
        if let Some(pool) = &self.pool {
            st.serialize_field("pool", pool)?;
        } else {
            st.skip_field("pool")?;
        }
        if let Some(ports) = &self.snat_ports {
            st.serialize_field("snat_ports", ports)?;
        } else {
            st.skip_field("snat_ports")?;
        }
        st.serialize_field("containers", &ContainersByName(&self.containers))?;
        if self.reserved_ports.is_empty() {
            st.skip_field("reserved_ports")?;
        } else {
            st.serialize_field("reserved_ports", &self.reserved_ports)?;
        }
        st.end()
    }
}

impl State {
    /// The next container id to hand out.
    pub fn next_id(&self) -> u32 {
        self.next_id
    }

    /// Containers by name.
    pub fn containers(&self) -> &OrdMap<String, Arc<Container>> {
        &self.containers
    }

    /// The container named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Container>> {
        self.containers.get(name)
    }

    /// The pool recorded (`None` in the state of an older agent).
    pub fn pool(&self) -> Option<Ipv4Net> {
        self.pool
    }

    /// The masquerade ports recorded (`None` in the state of an older
    /// agent).
    pub fn snat_ports(&self) -> Option<(u16, u16)> {
        self.snat_ports
    }

    /// An empty state recording the pool and masquerade ports (the start
    /// of a state rebuilt from the kernel).
    pub fn with_ranges(pool: Ipv4Net, snat_ports: (u16, u16)) -> Self {
        Self {
            next_id: 1,
            pool: Some(pool),
            snat_ports: Some(snat_ports),
            ..Self::default()
        }
    }

    /// Adds a container found in the kernel, with the id it has there
    /// (ids up to it are never handed out again), checked as any other;
    /// on error nothing is changed.
    pub fn adopt(&mut self, c: Container) -> Result<(), String> {
        let mut next = self.clone();
        next.next_id = next.next_id.max(c.id.saturating_add(1));
        next.put(&c)?;
        *self = next;
        Ok(())
    }

    /// The name of the container with id `id`.
    pub fn name_of(&self, id: u32) -> Option<&str> {
        self.ids.get(&id).map(|n| &**n)
    }

    /// Whether a container has id `id`.
    pub fn has_id(&self, id: u32) -> bool {
        self.ids.contains_key(&id)
    }

    /// The published ports.
    pub fn ports(&self) -> &PortIndex {
        &self.ports
    }

    /// The ports this agent added to `ip_local_reserved_ports`.
    pub fn reserved_ports(&self) -> &PortSet {
        &self.reserved_ports
    }

    /// The container whose limits use the buckets of cgroup `cgroup_id`.
    pub fn limiting(&self, cgroup_id: u64) -> Option<&str> {
        self.limited.get(&cgroup_id).map(|n| &**n)
    }

    /// The container whose limits name cgroup directory `path`, applied or
    /// pending.
    pub fn limiting_path(&self, path: &Path) -> Option<&str> {
        self.limited_paths.get(path).map(|n| &**n)
    }

    /// The cgroup directories named by containers' limits, applied or
    /// pending.
    pub fn limited_cgroups(&self) -> impl Iterator<Item = &Path> {
        self.limited_paths.keys().map(PathBuf::as_path)
    }

    /// A fresh container id.
    pub fn take_id(&mut self) -> u32 {
        // Id 0 is never used: conntrack entries of no container carry it.
        self.next_id = self.next_id.max(1);
        // The kernel counts each container in slot `id % CONTAINER_SLOTS`
        // of its per-container counters: an id whose slot a live container
        // holds is skipped (ids are never reused either way). Live ids are
        // below `next_id`, so those sharing a slot with `id` are
        // `id - k * CONTAINER_SLOTS`.
        let full = self.ids.len() >= CONTAINER_SLOTS as usize;
        loop {
            let id = self.next_id;
            self.next_id += 1;
            let mut other = id;
            let mut busy = false;
            while !full && other >= CONTAINER_SLOTS && !busy {
                other -= CONTAINER_SLOTS;
                busy = self.ids.contains_key(&other);
            }
            if !busy {
                debug_assert!(full || self.ids.keys().all(|&i| slot(i) != slot(id)));
                return id;
            }
        }
    }

    /// Applies one change, checking it first; on error nothing is changed
    /// (the caller works on a copy: copies are O(1)).
    pub fn apply(&mut self, change: &Change) -> Result<(), String> {
        match change {
            Change::Put(c) => self.put(c),
            Change::Remove { name } => {
                let c = self
                    .containers
                    .remove(name)
                    .ok_or_else(|| format!("no container {name:?} to remove"))?;
                self.unindex(&c);
                Ok(())
            }
            Change::Publish { name, ports } => {
                let (owner, mut c) = self.take_for_change(name)?;
                for m in ports {
                    self.ports.insert(&owner, m)?;
                    c.publish.push(*m);
                }
                self.containers.insert(name.clone(), Arc::new(c));
                Ok(())
            }
            Change::Unpublish { name, ports } => {
                let (owner, mut c) = self.take_for_change(name)?;
                let gone: HashSet<&PortMapping> = ports.iter().collect();
                let before = c.publish.len();
                c.publish.retain(|o| !gone.contains(o));
                if gone.len() != ports.len() || before - c.publish.len() != gone.len() {
                    return Err(format!(
                        "container {name:?} does not publish each of {} ports exactly once",
                        ports.len()
                    ));
                }
                for m in ports {
                    self.ports.remove(&owner, m);
                }
                self.containers.insert(name.clone(), Arc::new(c));
                Ok(())
            }
            Change::Limits { name, limits } => {
                let (owner, mut c) = self.take_for_change(name)?;
                self.unlimit(&c);
                c.limits = *limits;
                self.limit(&owner, &c)?;
                self.containers.insert(name.clone(), Arc::new(c));
                Ok(())
            }
            Change::Ranges { pool, snat_ports } => {
                if let Some(c) = self.containers.values().find(|c| !pool.contains(&c.addr)) {
                    return Err(format!(
                        "container {:?} has address {} outside the pool {pool}",
                        c.name, c.addr
                    ));
                }
                self.pool = Some(*pool);
                self.snat_ports = Some(*snat_ports);
                Ok(())
            }
            Change::Cgroup { name, cgroup_id } => {
                let (owner, mut c) = self.take_for_change(name)?;
                if c.cgroup.is_none() {
                    return Err(format!("container {name:?} has no cgroup"));
                }
                self.unlimit(&c);
                c.cgroup_id = *cgroup_id;
                self.limit(&owner, &c)?;
                self.containers.insert(name.clone(), Arc::new(c));
                Ok(())
            }
            Change::ReservedPorts { ports } => {
                self.reserved_ports = ports.clone();
                Ok(())
            }
        }
    }

    /// Container `name` to change (a copy of its record) and its name as
    /// the indexes hold it.
    fn take_for_change(&self, name: &str) -> Result<(Arc<str>, Container), String> {
        let c = self
            .containers
            .get(name)
            .ok_or_else(|| format!("no container {name:?}"))?;
        let owner = self
            .ids
            .get(&c.id)
            .cloned()
            .unwrap_or_else(|| Arc::from(name));
        Ok((owner, Container::clone(c)))
    }

    fn put(&mut self, c: &Container) -> Result<(), String> {
        if c.id == 0 || c.id >= self.next_id {
            return Err(format!(
                "container {:?} has id {}: ids are above 0 and below next_id {}",
                c.name, c.id, self.next_id
            ));
        }
        if let Some(pool) = self.pool
            && !pool.contains(&c.addr)
        {
            return Err(format!(
                "container {:?} has address {} outside the pool {pool}",
                c.name, c.addr
            ));
        }
        if let Some(old) = self.containers.remove(&c.name) {
            self.unindex(&old);
        }
        if let Some(other) = self.ids.get(&c.id) {
            return Err(format!(
                "container {:?} has id {}, which container {other:?} has too",
                c.name, c.id
            ));
        }
        let owner: Arc<str> = Arc::from(c.name.as_str());
        self.ids.insert(c.id, Arc::clone(&owner));
        for m in &c.publish {
            self.ports.insert(&owner, m)?;
        }
        self.limit(&owner, c)?;
        self.containers.insert(c.name.clone(), Arc::new(c.clone()));
        Ok(())
    }

    fn unindex(&mut self, c: &Container) {
        self.ids.remove(&c.id);
        for m in &c.publish {
            self.ports.remove(&c.name, m);
        }
        self.unlimit(c);
    }

    fn limit(&mut self, owner: &Arc<str>, c: &Container) -> Result<(), String> {
        if c.limits.is_empty() {
            return Ok(());
        }
        if let Some(path) = &c.cgroup
            && let Some(other) = self.limited_paths.get(path)
            && **other != *c.name
        {
            return Err(format!(
                "containers {other:?} and {:?} both limit cgroup {}",
                c.name,
                path.display()
            ));
        }
        if c.cgroup_id != 0
            && let Some(other) = self.limited.get(&c.cgroup_id)
            && **other != *c.name
        {
            return Err(format!(
                "containers {other:?} and {:?} both limit cgroup {}",
                c.name, c.cgroup_id
            ));
        }
        if let Some(path) = &c.cgroup {
            self.limited_paths.insert(path.clone(), Arc::clone(owner));
        }
        if c.cgroup_id != 0 {
            self.limited.insert(c.cgroup_id, Arc::clone(owner));
        }
        Ok(())
    }

    fn unlimit(&mut self, c: &Container) {
        if self
            .limited
            .get(&c.cgroup_id)
            .is_some_and(|n| **n == *c.name)
        {
            self.limited.remove(&c.cgroup_id);
        }
        if let Some(path) = &c.cgroup
            && self.limited_paths.get(path).is_some_and(|n| **n == *c.name)
        {
            self.limited_paths.remove(path);
        }
    }
}

/// The desired state in memory and on disk. [`Store::commit`] makes a
/// change durable (one journal record), then applies it in memory.
#[derive(Debug)]
pub struct Store {
    state: State,
    journal: Journal,
    ipam: Option<Ipam>,
    reserver: Option<Reserver>,
}

/// Keeps the node's reserved ports in line with each change: given the
/// state a change leads to, reserves what it needs and returns the ports
/// that are then the agent's, recorded in the change's own record.
pub struct Reserver(Box<ReserveFn>);

/// What a [`Reserver`] calls.
type ReserveFn = dyn FnMut(&State) -> Result<PortSet, String> + Send;

impl Reserver {
    /// A reserver calling `f`.
    pub fn new(f: impl FnMut(&State) -> Result<PortSet, String> + Send + 'static) -> Self {
        Self(Box::new(f))
    }
}

impl std::fmt::Debug for Reserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reserver")
    }
}

impl Store {
    /// Loads the state kept in `dir` (none yet is an empty state): the
    /// snapshot, then the journal.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let (state, journal) = Journal::open(dir.into())?;
        Ok(Self {
            state,
            journal,
            ipam: None,
            reserver: None,
        })
    }

    /// The state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Containers by name.
    pub fn containers(&self) -> &OrdMap<String, Arc<Container>> {
        self.state.containers()
    }

    /// The container named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Container>> {
        self.state.get(name)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        self.journal.dir()
    }

    /// Follows every change with `reserver` from now on.
    pub fn set_reserver(&mut self, reserver: Reserver) {
        self.reserver = Some(reserver);
    }

    /// A fresh container id and the lowest free address of `pool` for it;
    /// `None` if the pool is full. The address is taken once a container
    /// with it is committed.
    pub fn allocate(&mut self, pool: Ipv4Net) -> Option<(u32, Ipv4Addr)> {
        let ipam = match &mut self.ipam {
            Some(ipam) if ipam.pool() == pool => ipam,
            slot => slot.insert(Ipam::new(
                pool,
                self.state.containers.values().map(|c| c.addr),
            )),
        };
        let addr = ipam.lowest()?;
        Some((self.state.take_id(), addr))
    }

    /// Makes `changes` durable as one journal record, then applies them
    /// in memory. Changes that do not apply (a bug of the caller) are
    /// refused before anything is written; a record that cannot be
    /// written leaves the state as it was.
    ///
    /// With a [`Reserver`], the reserved ports the change leads to go into
    /// the same record.
    pub fn commit(&mut self, mut changes: Vec<Change>) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut next = self.state.clone();
        for change in &changes {
            next.apply(change).map_err(|reason| StateError::Refused {
                reason,
                dir: self.journal.dir().to_owned(),
            })?;
        }
        if let Some(Reserver(reserve)) = &mut self.reserver {
            match reserve(&next) {
                Ok(ports) if ports != *next.reserved_ports() => {
                    let change = Change::ReservedPorts { ports };
                    next.apply(&change).map_err(|reason| StateError::Refused {
                        reason,
                        dir: self.journal.dir().to_owned(),
                    })?;
                    changes.push(change);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("reserve the published ports: {e}"),
            }
        }
        self.journal.append(&next, &changes)?;
        if let Some(ipam) = &mut self.ipam {
            for change in &changes {
                match change {
                    Change::Put(c) => ipam.take(c.addr),
                    Change::Remove { name } => {
                        if let Some(c) = self.state.get(name) {
                            ipam.release(c.addr);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.state = next;
        Ok(())
    }

    /// Writes a snapshot of the state now and empties the journal
    /// (waiting for a compaction in progress first).
    pub fn compact(&mut self) -> Result<(), StateError> {
        self.journal.compact_now(&self.state)
    }

    /// Records the pool and masquerade ports the agent runs with (one
    /// journal record, written only when they differ from those recorded).
    pub fn set_ranges(&mut self, pool: Ipv4Net, snat_ports: (u16, u16)) -> Result<(), StateError> {
        if self.state.pool == Some(pool) && self.state.snat_ports == Some(snat_ports) {
            return Ok(());
        }
        self.commit(vec![Change::Ranges { pool, snat_ports }])
    }

    /// Starts the state kept in `dir` with `state` (the state rebuilt from
    /// the kernel when no snapshot was kept): journal files left without
    /// their snapshot are set aside (renamed `….lost`, never replayed onto
    /// it), the state is written as a snapshot, then opened as any other.
    pub fn create(dir: impl Into<PathBuf>, state: &State) -> Result<Self, StateError> {
        let dir = dir.into();
        for path in journal::files(&dir).map_err(|source| StateError::Io {
            action: "list",
            path: dir.clone(),
            source,
        })? {
            let mut lost = path.clone().into_os_string();
            lost.push(LOST_SUFFIX);
            tracing::warn!(journal = %path.display(), "a journal without its snapshot: set aside");
            std::fs::rename(&path, &lost).map_err(|source| StateError::Io {
                action: "rename",
                path: path.clone(),
                source,
            })?;
        }
        StateStore::new(&dir).save(state, 0)?;
        Self::open(dir)
    }
}

/// What a journal file set aside by [`Store::create`] is renamed with.
const LOST_SUFFIX: &str = ".lost";

/// Whether `dir` keeps a snapshot of the state. Without one the journal
/// is not the whole state (its first records were compacted away): the
/// agent then rebuilds the state from the kernel ([`Store::create`]).
pub fn exists(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists()
}

/// The gateway address of a pool: its first host address.
pub fn gateway_of(pool: Ipv4Net) -> Ipv4Addr {
    pool.hosts().next().unwrap_or(pool.network())
}

/// Removes the state kept in `dir` (snapshot and journal), and the
/// directory if nothing else is in it.
pub fn remove_all(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let lost = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(journal::PREFIX) && n.ends_with(LOST_SUFFIX))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    for path in journal::files(dir)?
        .into_iter()
        .chain(lost)
        .chain([dir.join(STATE_FILE)])
    {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

#[cfg(test)]
mod tests;
