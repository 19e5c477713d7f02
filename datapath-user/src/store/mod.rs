//! The agent's persisted desired state: its containers, their addresses
//! (the IPAM record), published ports and rate limits ([`State`]); the
//! file it is kept in ([`StateStore`]: written atomically; a corrupt file is
//! reported, never silently replaced); and the two together ([`Store`]),
//! which the agent changes and saves before it acknowledges a change.

mod file;
mod lock;

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub use self::file::{STATE_FILE, StateError, StateStore};
pub use self::lock::{LockError, StateLock};
use crate::model::{PortMapping, RateLimits, identity::NetnsId};

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
    /// Its cgroup v2 directory (canonical), if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// That cgroup's id (inode) when it was resolved; 0 without one.
    #[serde(default)]
    pub cgroup_id: u64,
    /// Rate limits.
    #[serde(default)]
    pub limits: RateLimits,
}

/// Everything the agent persists. Deserializing checks what the types
/// cannot say: every container filed under its own name, ids unique and
/// below `next_id`, so that no id is handed out twice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StateFields")]
pub struct State {
    /// The next container id to hand out (ids are never reused).
    pub next_id: u32,
    /// The pool the containers' addresses come from (absent in state files
    /// of older agents): a restart with another pool is refused while
    /// containers from this one exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Ipv4Net>,
    /// The masquerade port range the agent ran with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_ports: Option<(u16, u16)>,
    /// Containers by name.
    pub containers: BTreeMap<String, Container>,
}

/// [`State`]'s fields as stored, before they are checked.
#[derive(Deserialize)]
struct StateFields {
    next_id: u32,
    #[serde(default)]
    pool: Option<Ipv4Net>,
    #[serde(default)]
    snat_ports: Option<(u16, u16)>,
    containers: BTreeMap<String, Container>,
}

impl TryFrom<StateFields> for State {
    type Error = String;

    fn try_from(f: StateFields) -> Result<Self, String> {
        let mut ids = std::collections::BTreeSet::new();
        for (name, c) in &f.containers {
            if *name != c.name {
                return Err(format!("container {:?} is filed under {name:?}", c.name));
            }
            if c.id == 0 || c.id >= f.next_id || !ids.insert(c.id) {
                return Err(format!(
                    "container {name:?} has id {}: ids are unique, above 0 and below next_id {}",
                    c.id, f.next_id
                ));
            }
        }
        if f.next_id == u32::MAX {
            return Err("next_id is exhausted".to_owned());
        }
        if let Some(pool) = f.pool
            && let Some(c) = f.containers.values().find(|c| !pool.contains(&c.addr))
        {
            return Err(format!(
                "container {:?} has address {} outside the pool {pool}",
                c.name, c.addr
            ));
        }
        Ok(Self {
            next_id: f.next_id,
            pool: f.pool,
            snat_ports: f.snat_ports,
            containers: f.containers,
        })
    }
}

impl State {
    /// The lowest free address of `pool` for a new container, skipping the
    /// network address, the gateway (first host) and the broadcast address.
    pub fn allocate_addr(&self, pool: Ipv4Net) -> Option<Ipv4Addr> {
        let gateway = gateway_of(pool);
        pool.hosts()
            .filter(|a| *a != gateway)
            .find(|a| !self.containers.values().any(|c| c.addr == *a))
    }

    /// A fresh container id.
    pub fn take_id(&mut self) -> u32 {
        // Id 0 is never used: conntrack entries of no container carry it.
        self.next_id = self.next_id.max(1);
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

/// The desired state in memory and the file it is saved to. Changes are
/// made in memory ([`Store::put`], [`Store::remove`]) and are durable once
/// [`Store::save`] returns.
#[derive(Debug)]
pub struct Store {
    file: StateStore,
    state: State,
}

impl Store {
    /// Loads the state kept in `dir` (none yet is an empty state).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let file = StateStore::new(dir);
        let state = file.load()?;
        Ok(Self { file, state })
    }

    /// The state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Containers by name.
    pub fn containers(&self) -> &BTreeMap<String, Container> {
        &self.state.containers
    }

    /// The container named `name`.
    pub fn get(&self, name: &str) -> Option<&Container> {
        self.state.containers.get(name)
    }

    /// Adds or replaces a container (in memory); returns the one it
    /// replaced.
    pub fn put(&mut self, c: Container) -> Option<Container> {
        self.state.containers.insert(c.name.clone(), c)
    }

    /// Removes a container (in memory); returns it.
    pub fn remove(&mut self, name: &str) -> Option<Container> {
        self.state.containers.remove(name)
    }

    /// A fresh container id and the lowest free address of `pool` for it;
    /// `None` if the pool is full.
    pub fn allocate(&mut self, pool: Ipv4Net) -> Option<(u32, Ipv4Addr)> {
        let addr = self.state.allocate_addr(pool)?;
        Some((self.state.take_id(), addr))
    }

    /// Makes the state in memory durable.
    pub fn save(&self) -> Result<(), StateError> {
        self.file.save(&self.state)
    }

    /// Records the pool and masquerade ports the agent runs with (saved
    /// with the next [`Store::save`]).
    pub fn set_ranges(&mut self, pool: Ipv4Net, snat_ports: (u16, u16)) {
        self.state.pool = Some(pool);
        self.state.snat_ports = Some(snat_ports);
    }

    /// A store in `dir` holding `state` (not yet saved): the state rebuilt
    /// from the kernel when the file was missing or unreadable.
    pub fn with_state(dir: impl Into<PathBuf>, state: State) -> Self {
        Self {
            file: StateStore::new(dir),
            state,
        }
    }

    /// Whether the state file exists (a missing one loads as empty).
    pub fn file_exists(&self) -> bool {
        self.file.path().exists()
    }
}

/// The gateway address of a pool: its first host address.
pub fn gateway_of(pool: Ipv4Net) -> Ipv4Addr {
    pool.hosts().next().unwrap_or(pool.network())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::model::Limit;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dpt-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn container(name: &str, id: u32, addr: Ipv4Addr) -> Container {
        Container {
            id,
            name: name.into(),
            netns: "/var/run/netns/x".into(),
            netns_id: Some(NetnsId {
                dev: 4,
                ino: 4026531840 + u64::from(id),
            }),
            ifname: "eth0".into(),
            host_ifname: format!("dp{id:x}"),
            addr,
            publish: vec!["8080:80".parse().expect("valid")],
            mac: "02:00:00:00:00:01".into(),
            cgroup: Some("/sys/fs/cgroup/unified/web".into()),
            cgroup_id: 4242,
            limits: RateLimits {
                egress: Some(Limit::given(10_000_000, 65_536)),
                ingress: None,
            },
        }
    }

    #[test]
    fn a_state_file_without_cgroups_or_limits_still_loads() {
        let old = r#"{"next_id": 2, "containers": {"web": {"id": 1, "name": "web",
            "netns": "/var/run/netns/x", "ifname": "eth0", "host_ifname": "dp1",
            "addr": "198.19.0.2", "publish": []}}}"#;
        let st: State = serde_json::from_str(old).expect("an older state file loads");
        let c = &st.containers["web"];
        assert_eq!((&c.cgroup, c.cgroup_id), (&None, 0));
        assert!(c.limits.is_empty());
    }

    #[test]
    fn addresses_are_never_handed_out_twice() {
        let pool: Ipv4Net = "198.19.0.0/29".parse().expect("valid");
        let mut st = State::default();
        let mut seen = Vec::new();
        while let Some(a) = st.allocate_addr(pool) {
            assert!(!seen.contains(&a));
            assert_ne!(a, gateway_of(pool));
            seen.push(a);
            let id = st.take_id();
            st.containers
                .insert(format!("c{id}"), container("c", id, a));
        }
        // /29: 6 hosts minus the gateway.
        assert_eq!(seen.len(), 5);
        st.containers.remove("c2");
        assert_eq!(st.allocate_addr(pool), Some(seen[1]));
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempdir("rt");
        let store = StateStore::new(&dir);
        assert_eq!(store.load().expect("empty"), State::default());
        let mut st = State::default();
        let id = st.take_id();
        st.containers.insert(
            "web".into(),
            container("web", id, Ipv4Addr::new(198, 19, 0, 2)),
        );
        store.save(&st).expect("save");
        assert_eq!(store.load().expect("load"), st);
        assert!(!dir.join(format!(".{STATE_FILE}.tmp")).exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_truncated_state_file_is_reported_not_discarded() {
        let dir = tempdir("corrupt");
        let store = StateStore::new(&dir);
        let mut st = State::default();
        st.take_id();
        store.save(&st).expect("save");
        let bytes = fs::read(store.path()).expect("read");
        fs::write(store.path(), &bytes[..bytes.len() / 2]).expect("truncate");
        let err = store.load().expect_err("corrupt");
        assert!(matches!(err, StateError::Corrupt { .. }));
        assert!(err.to_string().contains("corrupt"), "{err}");
        // The file is left for the operator.
        assert_eq!(
            fs::read(store.path()).expect("still there").len(),
            bytes.len() / 2
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
