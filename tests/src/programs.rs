//! The real eBPF object under `BPF_PROG_TEST_RUN` (the SETUP, RUN and CHECK
//! steps of a packet test).
//!
//! [`Programs`] loads [`datapath::EBPF_OBJECT`] afresh: its maps are new and
//! private to it (nothing is pinned), so tests run in parallel without
//! seeing each other's state. Programs are loaded (verified) on first use.
//!
//! ```no_run
//! use datapath_common::programs::UPLINK_TC;
//! use datapath_tests::{frame::Frame, programs::{Programs, TC_ACT_OK}};
//!
//! let mut p = Programs::load();
//! p.set_config(Programs::config([198, 18, 0, 2], [198, 19, 0, 0], 24, 1));
//! let input = Frame::tcp("198.18.0.1:40000", "198.18.0.2:9999").build();
//! let run = p.run_tc(UPLINK_TC, &input, None);
//! assert_eq!(run.verdict, TC_ACT_OK);
//! assert_eq!(run.data, input);
//! ```

use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{CgroupSkb, CgroupSockAddr, Program, ProgramError, SchedClassifier, SockOps, Xdp},
};
use bytemuck::{Pod, Zeroable};
use datapath_common::{
    CONFIG_F_READY, Config, CtContainer, CtEntry, CtKey, CtTimedEntry, Endpoint, EndpointKey,
    FlushRequest, FragEntry, FragKey, NodeAddr, NodeAddrKey, ServiceKey, ServiceValue, Stat,
    clock::TestClock, ct_state, names, programs as prog_names, proto,
};

/// TC verdict: let the packet continue.
pub const TC_ACT_OK: u32 = 0;
/// TC verdict: drop.
pub const TC_ACT_SHOT: u32 = 2;
/// TC verdict: redirect (what `bpf_redirect*` helpers return).
pub const TC_ACT_REDIRECT: u32 = 7;
/// XDP verdict: abort (program error).
pub const XDP_ABORTED: u32 = 0;
/// XDP verdict: drop.
pub const XDP_DROP: u32 = 1;
/// XDP verdict: pass to the stack.
pub const XDP_PASS: u32 = 2;
/// XDP verdict: send back out of the receiving interface.
pub const XDP_TX: u32 = 3;
/// XDP verdict: redirect.
pub const XDP_REDIRECT: u32 = 4;

/// Errors of the packet harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The object could not be parsed or its maps created.
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    /// The object has no program of that name.
    #[error("program {name} is not in the object")]
    NoProgram {
        /// Program name.
        name: String,
    },
    /// The program is of another type than the caller expected.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: String,
        /// What went wrong.
        #[source]
        source: ProgramError,
    },
    /// The kernel refused the program.
    #[error("program {name} failed to load: {io_error}\nverifier log:\n{verifier_log}")]
    Verifier {
        /// Program name.
        name: String,
        /// The error of `BPF_PROG_LOAD`.
        io_error: std::io::Error,
        /// The verifier's log.
        verifier_log: String,
    },
    /// `BPF_PROG_TEST_RUN` failed.
    #[error("running {name}: {source}")]
    Run {
        /// Program name.
        name: String,
        /// What went wrong.
        #[source]
        source: ProgramError,
    },
    /// The object has no map of that name.
    #[error("map {name} is not in the object")]
    NoMap {
        /// Map name.
        name: &'static str,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: MapError,
    },
}

/// The userspace layout of the kernel's `struct __sk_buff` (uapi
/// `linux/bpf.h`), the context a TC program's test run may be given.
///
/// `BPF_PROG_TEST_RUN` accepts only a few fields (`mark`, `priority`,
/// `ingress_ifindex`, `ifindex`, `cb`, `tstamp`, `wire_len`, `gso_segs`,
/// `gso_size`, `hwtstamp`) and rejects a context with any other byte set.
/// `ifindex` above 1 must name an interface of the caller's namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SkBuff {
    /// Must be zero.
    pub len: u32,
    /// Must be zero.
    pub pkt_type: u32,
    /// `skb->mark`.
    pub mark: u32,
    /// Must be zero.
    pub queue_mapping: u32,
    /// Must be zero.
    pub protocol: u32,
    /// Must be zero.
    pub vlan_present: u32,
    /// Must be zero.
    pub vlan_tci: u32,
    /// Must be zero.
    pub vlan_proto: u32,
    /// `skb->priority`.
    pub priority: u32,
    /// `skb->skb_iif`: the interface the packet arrived on.
    pub ingress_ifindex: u32,
    /// The device the packet is on (0 or 1: loopback).
    pub ifindex: u32,
    /// Must be zero.
    pub tc_index: u32,
    /// Control buffer.
    pub cb: [u32; 5],
    /// Must be zero.
    pub hash: u32,
    /// Must be zero.
    pub tc_classid: u32,
    /// Must be zero.
    pub data: u32,
    /// Must be zero.
    pub data_end: u32,
    /// Must be zero.
    pub napi_id: u32,
    /// Must be zero.
    pub family: u32,
    /// Must be zero.
    pub remote_ip4: u32,
    /// Must be zero.
    pub local_ip4: u32,
    /// Must be zero.
    pub remote_ip6: [u32; 4],
    /// Must be zero.
    pub local_ip6: [u32; 4],
    /// Must be zero.
    pub remote_port: u32,
    /// Must be zero.
    pub local_port: u32,
    /// Must be zero.
    pub data_meta: u32,
    /// Must be zero (a pointer in the kernel's view).
    pub flow_keys: u64,
    /// `skb->tstamp`.
    pub tstamp: u64,
    /// Length on the wire (0: the data length).
    pub wire_len: u32,
    /// GSO segments.
    pub gso_segs: u32,
    /// Must be zero (a pointer in the kernel's view).
    pub sk: u64,
    /// GSO segment size.
    pub gso_size: u32,
    /// Must be zero.
    pub tstamp_type: u8,
    /// Padding.
    pub _pad: [u8; 3],
    /// Hardware timestamp.
    pub hwtstamp: u64,
}

const _: () = {
    assert!(size_of::<SkBuff>() == 192);
    assert!(std::mem::offset_of!(SkBuff, ingress_ifindex) == 36);
    assert!(std::mem::offset_of!(SkBuff, cb) == 48);
    assert!(std::mem::offset_of!(SkBuff, flow_keys) == 144);
    assert!(std::mem::offset_of!(SkBuff, tstamp) == 152);
    assert!(std::mem::offset_of!(SkBuff, gso_size) == 176);
    assert!(std::mem::offset_of!(SkBuff, hwtstamp) == 184);
};

impl SkBuff {
    /// A context saying the packet arrived on interface `ifindex`.
    pub fn ingress(ifindex: u32) -> Self {
        Self {
            ingress_ifindex: ifindex,
            ..Self::default()
        }
    }
}

/// The two conntrack tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// [`names::CT`]: confirmed flows.
    Main,
    /// [`names::CT_NEW`]: unconfirmed flows.
    New,
}

/// The kernel's clock (`bpf_ktime_get_ns`), in ns.
pub fn now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|e| panic!("clock_gettime: {e}"));
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// `entry` with zero timestamps set to now.
fn fresh(mut entry: CtEntry) -> CtEntry {
    let now = now_ns();
    if entry.created_ns == 0 {
        entry.created_ns = now;
    }
    if entry.last_seen_ns == 0 {
        entry.last_seen_ns = now;
    }
    entry
}

/// The outcome of one test run.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// The program's return value.
    pub verdict: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// The kernel's measured run time.
    pub duration: Duration,
}

/// Headroom for programs that grow the packet.
const DATA_OUT_SLACK: usize = 256;

/// The eBPF object, loaded once, private to its owner.
pub struct Programs {
    ebpf: Ebpf,
    loaded: HashSet<String>,
    /// A namespace with a veth pair, made on the first cgroup_skb run, and
    /// the index of one end (see [`Programs::try_run_cgroup_skb_on`]).
    device: Option<(crate::netns::Netns, u32)>,
}

impl Programs {
    /// Loads the object with its maps at their compiled sizes; panics with
    /// the error (see [`Programs::try_load`]).
    pub fn load() -> Self {
        Self::try_load().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Loads the object. Programs are verified on first use.
    pub fn try_load() -> Result<Self, HarnessError> {
        Self::try_load_with(&[])
    }

    /// Loads the object with `max_entries` overridden per map name, e.g.
    /// `[(names::CT, 4)]` to test a full table.
    pub fn try_load_with(max_entries: &[(&'static str, u32)]) -> Result<Self, HarnessError> {
        let mut loader = EbpfLoader::new();
        for (name, n) in max_entries {
            loader.map_max_entries(name, *n);
        }
        let ebpf = loader.load(datapath::EBPF_OBJECT)?;
        Ok(Self {
            ebpf,
            loaded: HashSet::new(),
            device: None,
        })
    }

    /// Loads every program of the object, as the agent does; returns their
    /// names.
    pub fn load_all(&mut self) -> Result<Vec<String>, HarnessError> {
        let mut all: Vec<String> = self.ebpf.programs().map(|(n, _)| n.to_owned()).collect();
        all.sort();
        for name in &all {
            match self.ebpf.program(name) {
                Some(Program::Xdp(_)) => self.xdp(name).map(|_| ())?,
                Some(Program::CgroupSkb(_)) => self.cgroup_skb(name).map(|_| ())?,
                Some(Program::SockOps(_)) => self.program(name, SockOps::load).map(|_| ())?,
                Some(Program::CgroupSockAddr(_)) => {
                    self.program(name, CgroupSockAddr::load).map(|_| ())?
                }
                _ => self.classifier(name).map(|_| ())?,
            }
        }
        Ok(all)
    }

    fn load_error(name: &str, e: ProgramError) -> HarnessError {
        match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => HarnessError::Verifier {
                name: name.to_owned(),
                io_error,
                verifier_log: format!("{verifier_log}"),
            },
            source => HarnessError::Program {
                name: name.to_owned(),
                source,
            },
        }
    }

    /// Program `name` as a `T`, loaded (verified) by `load` on first use.
    fn program<T>(
        &mut self,
        name: &str,
        load: fn(&mut T) -> Result<(), ProgramError>,
    ) -> Result<&mut T, HarnessError>
    where
        for<'p> &'p mut T: TryFrom<&'p mut Program, Error = ProgramError>,
    {
        let first = !self.loaded.contains(name);
        let prog: &mut T = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| HarnessError::NoProgram { name: name.into() })?
            .try_into()
            .map_err(|source| HarnessError::Program {
                name: name.into(),
                source,
            })?;
        if first {
            load(prog).map_err(|e| Self::load_error(name, e))?;
            self.loaded.insert(name.to_owned());
        }
        Ok(prog)
    }

    /// The TC program `name`, loaded.
    pub fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier, HarnessError> {
        self.program(name, SchedClassifier::load)
    }

    /// The XDP program `name`, loaded.
    pub fn xdp(&mut self, name: &str) -> Result<&mut Xdp, HarnessError> {
        self.program(name, Xdp::load)
    }

    /// The cgroup_skb program `name`, loaded.
    pub fn cgroup_skb(&mut self, name: &str) -> Result<&mut CgroupSkb, HarnessError> {
        self.program(name, CgroupSkb::load)
    }

    /// Runs cgroup_skb program `name` on `frame` (an Ethernet frame: the
    /// kernel strips the link header, the program sees the IP packet) on a
    /// veth of a namespace of its own. The test run gives the packet a
    /// socket in the calling process's cgroup, and the program fresh cgroup
    /// storage.
    pub fn try_run_cgroup_skb(
        &mut self,
        name: &str,
        frame: &[u8],
    ) -> Result<RunResult, HarnessError> {
        self.try_run_cgroup_skb_on(name, frame, None)
    }

    /// Like [`Programs::try_run_cgroup_skb`], with the packet on device
    /// `ifindex` (1: loopback) instead of the veth. A test run puts the
    /// packet on a device of the caller's namespace (loopback unless told
    /// otherwise), so the runs happen in a namespace this object made.
    pub fn try_run_cgroup_skb_on(
        &mut self,
        name: &str,
        frame: &[u8],
        ifindex: Option<u32>,
    ) -> Result<RunResult, HarnessError> {
        self.cgroup_skb(name)?;
        if self.device.is_none() {
            let ns = crate::netns::Netns::new_unique();
            ns.exec_ok(
                "ip",
                [
                    "link", "add", "pkt0", "type", "veth", "peer", "name", "pkt1",
                ],
            );
            let index = crate::node::ifindex(&ns, "pkt0");
            self.device = Some((ns, index));
        }
        let (ns, veth) =
            self.device
                .as_ref()
                .map(|(n, i)| (n, *i))
                .ok_or_else(|| HarnessError::NoProgram {
                    name: "a namespace for cgroup_skb runs".into(),
                })?;
        let prog: &CgroupSkb = self
            .ebpf
            .program(name)
            .ok_or_else(|| HarnessError::NoProgram { name: name.into() })?
            .try_into()
            .map_err(|source| HarnessError::Program {
                name: name.into(),
                source,
            })?;
        let ctx = SkBuff {
            ifindex: ifindex.unwrap_or(veth),
            ..SkBuff::default()
        };
        ns.exec_closure(|| test_run(prog, name, frame, Some(&ctx)))
    }

    /// [`Programs::try_run_cgroup_skb`], panicking on error.
    pub fn run_cgroup_skb(&mut self, name: &str, frame: &[u8]) -> RunResult {
        self.try_run_cgroup_skb(name, frame)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Programs::try_run_cgroup_skb_on`], panicking on error.
    pub fn run_cgroup_skb_on(&mut self, name: &str, frame: &[u8], ifindex: u32) -> RunResult {
        self.try_run_cgroup_skb_on(name, frame, Some(ifindex))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Map `name` of the object, for typed access in a test.
    pub fn map_mut(&mut self, name: &'static str) -> &mut aya::maps::Map {
        self.map_data(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs TC program `name` on `frame` with context `ctx` (a zeroed
    /// `__sk_buff` when `None`).
    pub fn try_run_tc(
        &mut self,
        name: &str,
        frame: &[u8],
        ctx: Option<&SkBuff>,
    ) -> Result<RunResult, HarnessError> {
        test_run(self.classifier(name)?, name, frame, ctx)
    }

    /// Runs XDP program `name` on `frame`.
    pub fn try_run_xdp(&mut self, name: &str, frame: &[u8]) -> Result<RunResult, HarnessError> {
        test_run(self.xdp(name)?, name, frame, None)
    }

    /// [`Programs::try_run_tc`], panicking on error.
    pub fn run_tc(&mut self, name: &str, frame: &[u8], ctx: Option<&SkBuff>) -> RunResult {
        self.try_run_tc(name, frame, ctx)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Programs::try_run_xdp`], panicking on error.
    pub fn run_xdp(&mut self, name: &str, frame: &[u8]) -> RunResult {
        self.try_run_xdp(name, frame)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `uplink_tc` on `frame` (zeroed context).
    pub fn uplink_tc(&mut self, frame: &[u8]) -> RunResult {
        self.run_tc(prog_names::UPLINK_TC, frame, None)
    }

    /// Runs `uplink_xdp` on `frame`.
    pub fn uplink_xdp(&mut self, frame: &[u8]) -> RunResult {
        self.run_xdp(prog_names::UPLINK_XDP, frame)
    }

    /// Runs `container_tc` on `frame` as if it arrived on the host-side
    /// veth `ingress_ifindex`.
    pub fn container_tc(&mut self, frame: &[u8], ingress_ifindex: u32) -> RunResult {
        self.run_tc(
            prog_names::CONTAINER_TC,
            frame,
            Some(&SkBuff::ingress(ingress_ifindex)),
        )
    }

    // ---- maps -------------------------------------------------------------

    fn map_data(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, HarnessError> {
        self.ebpf.map_mut(name).ok_or(HarnessError::NoMap { name })
    }

    fn map_err(name: &'static str) -> impl FnOnce(MapError) -> HarnessError {
        move |source| HarnessError::Map { name, source }
    }

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> HashMap<&mut MapData, K, V> {
        let map = self.map_data(name).unwrap_or_else(|e| panic!("{e}"));
        HashMap::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    /// A ready configuration: node address, pool (address and prefix
    /// length), uplink ifindex; the gateway is the pool's first address,
    /// masquerade is on, SNAT ports are 61000-65535.
    pub fn config(node: [u8; 4], pool: [u8; 4], prefix_len: u8, uplink_ifindex: u32) -> Config {
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix_len.min(32)))
        };
        let pool_net = u32::from(Ipv4Addr::from(pool)) & mask;
        let gateway = Ipv4Addr::from(pool_net | 1).octets();
        Config {
            node_addr: node,
            pool_addr: Ipv4Addr::from(pool_net).octets(),
            pool_mask: Ipv4Addr::from(mask).octets(),
            gateway_addr: gateway,
            uplink_ifindex,
            snat_port_min: 61000,
            snat_port_max: 65535,
            flags: datapath_common::CONFIG_F_SNAT | CONFIG_F_READY,
            ct_container_max: 0,
            timeouts: datapath_common::ct::Timeouts::UNSET,
            ..Config::default()
        }
    }

    /// Writes the configuration as given (callers wanting a ready datapath
    /// set [`CONFIG_F_READY`], as [`Programs::config`] does).
    pub fn set_config(&mut self, config: Config) {
        let name = names::CONFIG;
        let map = self.map_data(name).unwrap_or_else(|e| panic!("{e}"));
        let mut arr: Array<&mut MapData, Config> =
            Array::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"));
        arr.set(0, config, 0)
            .map_err(Self::map_err(name))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Reads the configuration.
    pub fn get_config(&mut self) -> Config {
        let name = names::CONFIG;
        let map = self.map_data(name).unwrap_or_else(|e| panic!("{e}"));
        let arr: Array<&mut MapData, Config> =
            Array::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"));
        arr.get(&0, 0).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    /// Freezes the programs' clock at `ns` (see `datapath_common::clock`):
    /// until the next call, every program run reads exactly this time. `ns`
    /// must not be 0, which means the real clock.
    pub fn freeze_clock(&mut self, ns: u64) {
        assert_ne!(
            ns, 0,
            "0 is the real clock; freeze the programs at another time"
        );
        self.set_clock(TestClock::frozen(ns));
    }

    /// Gives the programs the real clock back.
    pub fn real_clock(&mut self) {
        self.set_clock(TestClock::REAL);
    }

    fn set_clock(&mut self, clock: TestClock) {
        let name = names::CLOCK;
        let map = self.map_data(name).unwrap_or_else(|e| panic!("{e}"));
        let mut arr: Array<&mut MapData, TestClock> =
            Array::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"));
        arr.set(0, clock, 0)
            .map_err(Self::map_err(name))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Publishes `(addr, port, proto)` (addr `[0; 4]`: every node address)
    /// to `value`.
    pub fn insert_service(&mut self, key: ServiceKey, value: ServiceValue) {
        let mut m = self.hash::<ServiceKey, ServiceValue>(names::SERVICES);
        m.insert(key, value, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", names::SERVICES));
    }

    /// Publishes a TCP or UDP port: `addr:port/proto` → `backend:backend_port`
    /// behind host-side veth `ifindex`, container id `container_id`.
    #[expect(clippy::too_many_arguments, reason = "one argument per map field")]
    pub fn publish(
        &mut self,
        addr: [u8; 4],
        port: u16,
        l4_proto: u8,
        backend: [u8; 4],
        backend_port: u16,
        ifindex: u32,
        container_id: u32,
    ) {
        assert!(
            l4_proto == proto::TCP || l4_proto == proto::UDP,
            "only TCP and UDP ports are published"
        );
        self.insert_service(
            ServiceKey {
                addr,
                port,
                proto: l4_proto,
                _pad: 0,
            },
            ServiceValue {
                backend_addr: backend,
                backend_port,
                _pad: 0,
                ifindex,
                container_id,
            },
        );
    }

    /// Removes a published port; returns whether it was there.
    pub fn remove_service(&mut self, key: &ServiceKey) -> bool {
        let mut m = self.hash::<ServiceKey, ServiceValue>(names::SERVICES);
        match m.remove(key) {
            Ok(()) => true,
            Err(MapError::KeyNotFound) => false,
            Err(e) => panic!("remove from {}: {e}", names::SERVICES),
        }
    }

    /// Adds a container endpoint.
    pub fn insert_endpoint(&mut self, addr: [u8; 4], endpoint: Endpoint) {
        let mut m = self.hash::<EndpointKey, Endpoint>(names::ENDPOINTS);
        m.insert(EndpointKey { addr }, endpoint, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", names::ENDPOINTS));
    }

    /// Removes a container endpoint; returns whether it was there.
    pub fn remove_endpoint(&mut self, addr: [u8; 4]) -> bool {
        let mut m = self.hash::<EndpointKey, Endpoint>(names::ENDPOINTS);
        match m.remove(&EndpointKey { addr }) {
            Ok(()) => true,
            Err(MapError::KeyNotFound) => false,
            Err(e) => panic!("remove from {}: {e}", names::ENDPOINTS),
        }
    }

    /// Adds a node address on interface `ifindex`.
    pub fn insert_node_addr(&mut self, addr: [u8; 4], ifindex: u32) {
        let mut m = self.hash::<NodeAddrKey, NodeAddr>(names::NODE_ADDRS);
        m.insert(NodeAddrKey { addr }, NodeAddr { ifindex }, 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", names::NODE_ADDRS));
    }

    /// Inserts a confirmed conntrack entry into the main table (to set up
    /// an established flow). A zero state becomes the confirmed state of
    /// the key's protocol, zero timestamps become now; no expiry timer is
    /// armed (the entry expires when a packet finds it idle).
    pub fn insert_conntrack(&mut self, key: CtKey, entry: CtEntry) {
        let mut entry = fresh(entry);
        if entry.state == 0 {
            entry.state = if key.proto == proto::TCP {
                ct_state::TCP_ESTABLISHED
            } else {
                ct_state::STREAM
            };
        }
        let mut m = self.hash::<CtKey, CtTimedEntry>(names::CT);
        m.insert(
            key,
            CtTimedEntry {
                entry,
                ..CtTimedEntry::default()
            },
            0,
        )
        .unwrap_or_else(|e| panic!("insert into {}: {e}", names::CT));
    }

    /// Inserts an entry into the table of unconfirmed flows as given
    /// (zero timestamps become now).
    pub fn insert_conntrack_new(&mut self, key: CtKey, entry: CtEntry) {
        let mut m = self.hash::<CtKey, CtEntry>(names::CT_NEW);
        m.insert(key, fresh(entry), 0)
            .unwrap_or_else(|e| panic!("insert into {}: {e}", names::CT_NEW));
    }

    /// The conntrack entry for `key` and its table, if any.
    pub fn conntrack_lookup(&mut self, key: &CtKey) -> Option<(Table, CtEntry)> {
        let main = self.hash::<CtKey, CtTimedEntry>(names::CT);
        match main.get(key, 0) {
            Ok(v) => return Some((Table::Main, v.entry)),
            Err(MapError::KeyNotFound) => {}
            Err(e) => panic!("lookup in {}: {e}", names::CT),
        }
        let new = self.hash::<CtKey, CtEntry>(names::CT_NEW);
        match new.get(key, 0) {
            Ok(v) => Some((Table::New, v)),
            Err(MapError::KeyNotFound) => None,
            Err(e) => panic!("lookup in {}: {e}", names::CT_NEW),
        }
    }

    /// The conntrack entry for `key`, in either table, if any.
    pub fn conntrack_get(&mut self, key: &CtKey) -> Option<CtEntry> {
        self.conntrack_lookup(key).map(|(_, e)| e)
    }

    /// Every conntrack entry of both tables, sorted by key bytes for
    /// stable comparisons.
    pub fn conntrack(&mut self) -> Vec<(CtKey, CtEntry)> {
        let mut all: Vec<(CtKey, CtEntry)> = self
            .conntrack_table(Table::Main)
            .into_iter()
            .chain(self.conntrack_table(Table::New))
            .collect();
        all.sort_by(|a, b| bytemuck::bytes_of(&a.0).cmp(bytemuck::bytes_of(&b.0)));
        all
    }

    /// Every entry of one conntrack table, sorted by key bytes.
    pub fn conntrack_table(&mut self, table: Table) -> Vec<(CtKey, CtEntry)> {
        let mut all: Vec<(CtKey, CtEntry)> = match table {
            Table::Main => self
                .hash::<CtKey, CtTimedEntry>(names::CT)
                .iter()
                .map(|r| r.map(|(k, v)| (k, v.entry)))
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("iterating {}: {e}", names::CT)),
            Table::New => self
                .hash::<CtKey, CtEntry>(names::CT_NEW)
                .iter()
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("iterating {}: {e}", names::CT_NEW)),
        };
        all.sort_by(|a, b| bytemuck::bytes_of(&a.0).cmp(bytemuck::bytes_of(&b.0)));
        all
    }

    /// The fragment-table entry of `key`, if any.
    pub fn frag_get(&mut self, key: &FragKey) -> Option<FragEntry> {
        let m = self.hash::<FragKey, FragEntry>(names::CT_FRAGS);
        match m.get(key, 0) {
            Ok(v) => Some(v),
            Err(MapError::KeyNotFound) => None,
            Err(e) => panic!("lookup in {}: {e}", names::CT_FRAGS),
        }
    }

    /// The conntrack record of container `id` (zero if it has none).
    pub fn ct_container(&mut self, id: u32) -> CtContainer {
        let m = self.hash::<u32, CtContainer>(names::CT_CONTAINERS);
        match m.get(&id, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => CtContainer::default(),
            Err(e) => panic!("lookup in {}: {e}", names::CT_CONTAINERS),
        }
    }

    /// Runs the flush program on `req`; returns the flows it removed.
    pub fn flush(&mut self, req: FlushRequest) -> u32 {
        let frame = req.frame();
        let r = self.run_tc(prog_names::CT_FLUSH, &frame, None);
        assert!(
            (r.verdict as i32) >= 0,
            "flush refused its request: {}",
            r.verdict as i32
        );
        r.verdict
    }

    /// Removes every flow (through the kernel's flush, as the agent does).
    pub fn clear_conntrack(&mut self) {
        self.flush(FlushRequest::default());
    }

    /// Counter `stat`, summed over CPUs.
    pub fn stat(&mut self, stat: Stat) -> u64 {
        let name = names::STATS;
        let map = self.map_data(name).unwrap_or_else(|e| panic!("{e}"));
        let arr: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"));
        let values = arr
            .get(&(stat as u32), 0)
            .unwrap_or_else(|e| panic!("map {name}[{}]: {e}", stat.name()));
        values.iter().sum()
    }

    /// Every counter that is not zero, summed over CPUs, in index order.
    pub fn stats(&mut self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|&s| (s, self.stat(s)))
            .filter(|&(_, n)| n != 0)
            .collect()
    }
}

/// One `BPF_PROG_TEST_RUN` of `prog` (named `name`) on `frame`, with the
/// `__sk_buff` context `ctx` if given, with room for the program to grow
/// the packet.
fn test_run<T>(
    prog: &T,
    name: &str,
    frame: &[u8],
    ctx: Option<&SkBuff>,
) -> Result<RunResult, HarnessError>
where
    T: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + DATA_OUT_SLACK];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx.map(bytemuck::bytes_of),
            ..TestRunOptions::default()
        })
        .map_err(|source| HarnessError::Run {
            name: name.into(),
            source,
        })?;
    out.truncate(res.data_size_out as usize);
    Ok(RunResult {
        verdict: res.return_value,
        data: out,
        duration: res.duration,
    })
}
