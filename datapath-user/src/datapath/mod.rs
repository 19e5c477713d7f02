//! The eBPF object in the kernel: loading it, pinning its maps, attaching
//! its programs ([`attach`]), and every handle on its maps — typed
//! operations for the agent ([`maps`], [`ratelimit`]), a read-only view for
//! the API's reads ([`reader`]) and flow reading ([`conntrack`]). No other
//! module touches a map.
//!
//! Pin layout under the agent's bpffs directory:
//! * `maps/<NAME>`: every map (with BTF: `bpftool map dump pinned` prints
//!   field names). A restarted agent reuses them, so flows survive.
//! * `links/<NAME>`: TCX and XDP links. The datapath keeps forwarding while
//!   the agent is down; a restarted agent swaps its freshly loaded program
//!   into the existing link atomically.
//! * `links/rate_<hook>_<veth>`: the rate limiter's cgroup links of a
//!   container (see [`RateHook`]); re-attached by replacing the pin.

pub mod attach;
pub mod conntrack;
pub mod maps;
pub mod masquerade;
pub mod pins;
pub mod ratelimit;
pub mod reader;
mod resize;
mod sys;

use std::{fs, io, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupSkb, CgroupSockAddr, SchedClassifier, SockOps},
};
use datapath_common::{
    Config, CtContainer, CtEntry, CtKey, CtTimedEntry, Endpoint, EndpointKey, FLUSH_F_ARM,
    FlushRequest, NodeAddr, NodeAddrKey, Peer, ServiceKey, ServiceValue, capacity,
    monitor::{ContainerDrops, ContainerStats},
    names, programs,
    ratelimit::{RateFlows, RateKey, RateLimit, RateStats},
};
use serde::Serialize;

pub use self::{
    attach::RateHook,
    maps::Flows,
    ratelimit::RateTarget,
    reader::{COUNT_PASS_BUDGET, ContainerRef, CountWork, Reader},
};

/// The compiled eBPF object (all programs and maps), embedded at build time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath-ebpf"));

/// Errors of the BPF layer, each saying which object was involved.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The object could not be loaded.
    #[error("load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program is missing from the object or has another type.
    #[error("program {name}: {source}")]
    Program {
        /// The program's name.
        name: &'static str,
        /// The error.
        source: aya::programs::ProgramError,
    },
    /// A map is missing from the object.
    #[error("map {name} is missing from the eBPF object")]
    MissingMap {
        /// The map's name.
        name: &'static str,
    },
    /// A map has another type or layout.
    #[error("map {name}: {source}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// The error.
        source: aya::maps::MapError,
    },
    /// Attaching or pinning a link failed.
    #[error("attach {program} to {ifname}: {message}")]
    Attach {
        /// The program.
        program: &'static str,
        /// The interface.
        ifname: String,
        /// What failed.
        message: String,
    },
    /// A pinned map has a layout the programs cannot use and that cannot
    /// be migrated (or its migration failed).
    #[error(
        "pinned map {name} ({}) cannot be used: {reason}. Nothing was changed",
        path.display()
    )]
    PinnedMap {
        /// The map's name.
        name: &'static str,
        /// Its pin.
        path: PathBuf,
        /// What differs, and why it cannot be migrated.
        reason: String,
    },
    /// A second handle on a map could not be made.
    #[error("duplicate the descriptor of map {name}: {source}")]
    Duplicate {
        /// The map's name.
        name: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The kernel refused a flush request.
    #[error("the conntrack flush program refused its request")]
    Flush,
    /// Reading a map failed.
    #[error("read map {name}: {source}")]
    Read {
        /// The map's name.
        name: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A bpffs path could not be created or removed.
    #[error("{action} {path}: {source}")]
    Fs {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Which hook serves the uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UplinkHook {
    /// TCX ingress.
    Tc,
    /// XDP in the driver.
    XdpNative,
    /// XDP on the skb (generic mode).
    XdpGeneric,
}

/// One attached program, for `datapath status`.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    /// Program name.
    pub program: &'static str,
    /// Kernel program id.
    pub program_id: u32,
    /// Interface name in the agent's namespace.
    pub ifname: String,
    /// Hook (`tcx-ingress`, `xdp-native`, `xdp-generic`).
    pub hook: &'static str,
    /// Where the link is pinned.
    pub pin: PathBuf,
}

/// Options for [`Datapath::load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The agent's bpffs directory.
    pub bpffs_dir: PathBuf,
    /// Capacity of the main conntrack table (entries; two per flow), if
    /// not the default. The table of unconfirmed flows gets a quarter.
    pub ct_max: Option<u32>,
    /// Kernel-side log level (aya-log: 0 off … 5 trace).
    pub log_level: u8,
}

/// The loaded programs and their maps: the one owner of every map handle
/// the agent writes through.
pub struct Datapath {
    ebpf: Ebpf,
    bpffs_dir: PathBuf,
    /// Global configuration.
    config: Array<MapData, Config>,
    /// Published ports.
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Containers by address.
    endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    /// Host-side veth ifindex → container id (see [`names::CONTAINER_VETHS`]).
    container_veths: HashMap<MapData, u32, u32>,
    /// The node's addresses.
    node_addrs: HashMap<MapData, NodeAddrKey, NodeAddr>,
    /// Confirmed flows.
    ct: HashMap<MapData, CtKey, CtTimedEntry>,
    /// Unconfirmed flows.
    ct_new: HashMap<MapData, CtKey, CtEntry>,
    /// Each container's use of the main conntrack table.
    ct_containers: HashMap<MapData, u32, CtContainer>,
    /// Per-CPU counters.
    stats: PerCpuArray<MapData, u64>,
    /// The other nodes of the cluster by node CIDR.
    peers: aya::maps::LpmTrie<MapData, [u8; 4], Peer>,
    /// Token buckets per (cgroup, direction).
    rate_limits: HashMap<MapData, RateKey, RateLimit>,
    /// Per-CPU counters of each bucket.
    rate_stats: aya::maps::PerCpuHashMap<MapData, RateKey, RateStats>,
    /// The bucket key of each cgroup attachment.
    #[expect(
        deprecated,
        reason = "cgroup storage is what gives a key per attachment"
    )]
    rate_cgroups: aya::maps::CgroupStorage<MapData, RateKey>,
    /// Each container's packets and bytes, per CPU, by slot.
    container_stats: PerCpuArray<MapData, ContainerStats>,
    /// Each container's drops by reason, by slot.
    container_drops: Array<MapData, ContainerDrops>,
    /// The monitor's ring buffer, until [`Datapath::take_events`].
    events: Option<aya::maps::RingBuf<MapData>>,
    /// The monitor's `CONFIG_F_MONITOR_*` bits, kept across
    /// [`Datapath::set_config`].
    monitor_flags: u32,
    /// TCP sockets sharing each ingress bucket's receive windows.
    rate_flows: HashMap<MapData, RateKey, RateFlows>,
    attachments: imbl::OrdMap<PathBuf, Attachment>,
}

/// Capacity of the table of unconfirmed flows for a main table of
/// `ct_max` entries: a quarter, at least 1,024.
pub fn ct_new_max(ct_max: u32) -> u32 {
    (ct_max / 4).max(1024)
}

/// Capacity of the main conntrack table.
pub fn ct_max(opt: Option<u32>) -> u32 {
    opt.unwrap_or(capacity::CT)
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() -> Result<(), BpfError> {
    let mounts = fs::read_to_string("/proc/self/mounts").map_err(|source| BpfError::Fs {
        action: "read",
        path: "/proc/self/mounts".into(),
        source,
    })?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    tracing::info!("mounting bpffs at /sys/fs/bpf");
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| BpfError::Fs {
        action: "mount bpffs on",
        path: "/sys/fs/bpf".into(),
        source: e.into(),
    })
}

/// Removes the pins an agent makes under `bpffs_dir` — the maps of
/// [`names::ALL`] (and any left aside by a migration), the links
/// [`attach::is_link_pin_name`] recognises — detaching the programs, then
/// the directories if nothing else is left in them. Nothing the agent
/// did not name is removed: what remains is returned.
pub fn remove_pins(bpffs_dir: &std::path::Path) -> Result<Vec<PathBuf>, BpfError> {
    let fs_err = |action: &'static str, path: &std::path::Path| {
        let path = path.to_owned();
        move |source| BpfError::Fs {
            action,
            path,
            source,
        }
    };
    let remove = |path: &std::path::Path| match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(fs_err("remove", path)(e)),
    };
    let maps_dir = bpffs_dir.join("maps");
    for name in names::ALL {
        remove(&maps_dir.join(name))?;
        remove(&maps_dir.join(format!("{}{name}", pins::MIGRATE_PREFIX)))?;
        remove(&maps_dir.join(format!("{}{name}", resize::PREFIX)))?;
    }
    let links_dir = bpffs_dir.join("links");
    match fs::read_dir(&links_dir) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(fs_err("read", &links_dir))?;
                if attach::is_link_pin_name(&e.file_name().to_string_lossy()) {
                    remove(&e.path())?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fs_err("read", &links_dir)(e)),
    }
    let mut left = Vec::new();
    for dir in [&links_dir, &maps_dir, &bpffs_dir.to_owned()] {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                if let Ok(entries) = fs::read_dir(dir) {
                    left.extend(
                        entries
                            .flatten()
                            .map(|e| e.path())
                            .filter(|p| p != &maps_dir && p != &links_dir),
                    );
                }
            }
            Err(e) => return Err(fs_err("remove", dir)(e)),
        }
    }
    Ok(left)
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, BpfError> {
    ebpf.take_map(name).ok_or(BpfError::MissingMap { name })
}

macro_rules! typed_map {
    ($ebpf:expr, $name:expr, $ty:ty) => {{
        let name = $name;
        <$ty>::try_from(take_map($ebpf, name)?).map_err(|source| BpfError::Map { name, source })?
    }};
}

impl Datapath {
    /// Loads the embedded object, reusing maps already pinned under
    /// `bpffs_dir/maps` (so a restart keeps every flow) and pinning new ones.
    /// A pinned map of another layout is migrated or refused
    /// ([`pins`]); conntrack tables of another size than `--ct-max` asks
    /// for are made again at that size with their flows ([`resize`]).
    pub fn load(opts: &LoadOptions) -> Result<Self, BpfError> {
        let maps_dir = opts.bpffs_dir.join("maps");
        for dir in [&maps_dir, &opts.bpffs_dir.join("links")] {
            fs::create_dir_all(dir).map_err(|source| BpfError::Fs {
                action: "create",
                path: dir.clone(),
                source,
            })?;
        }
        // The conntrack tables' capacity (`--ct-max`) is changed by
        // `resize`, which keeps their flows paired and their timers armed:
        // here only the rest of their layout is checked.
        let migrations = pins::prepare(
            EBPF_OBJECT,
            &maps_dir,
            &names::ALL,
            &[names::CT, names::CT_NEW],
        )?;
        let pins: Vec<(&'static str, PathBuf)> =
            names::ALL.iter().map(|n| (*n, maps_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        // A pinned table keeps its size: one of another size is set aside
        // and its flows moved into a new one below.
        let ct_entries = ct_max(opts.ct_max);
        let resized = resize::set_aside(&maps_dir, ct_entries, ct_new_max(ct_entries))?;
        loader.map_max_entries(names::CT, ct_entries);
        loader.map_max_entries(names::CT_NEW, ct_new_max(ct_entries));
        loader.override_global(aya_log::LEVEL, &opts.log_level, false);
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        pins::finish(migrations)?;
        for name in [
            programs::UPLINK_TC,
            programs::CONTAINER_TC,
            programs::OVERLAY_TC,
            programs::OVERLAY_EGRESS_TC,
            programs::CT_FLUSH,
        ] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        // The XDP program is loaded when an uplink needs it
        // (`attach_xdp`): most uplinks are served by TC.
        for name in [programs::RATE_EGRESS, programs::RATE_INGRESS] {
            let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        for (name, _) in attach::SOCKET_HOOKS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, programs::RATE_SOCKOPS)?;
        sock_ops.load().map_err(|source| BpfError::Program {
            name: programs::RATE_SOCKOPS,
            source,
        })?;

        let mut dp = Self {
            config: typed_map!(&mut ebpf, names::CONFIG, Array<MapData, Config>),
            services: typed_map!(&mut ebpf, names::SERVICES, HashMap<MapData, ServiceKey, ServiceValue>),
            endpoints: typed_map!(&mut ebpf, names::ENDPOINTS, HashMap<MapData, EndpointKey, Endpoint>),
            container_veths: typed_map!(&mut ebpf, names::CONTAINER_VETHS, HashMap<MapData, u32, u32>),
            node_addrs: typed_map!(&mut ebpf, names::NODE_ADDRS, HashMap<MapData, NodeAddrKey, NodeAddr>),
            ct: typed_map!(&mut ebpf, names::CT, HashMap<MapData, CtKey, CtTimedEntry>),
            ct_new: typed_map!(&mut ebpf, names::CT_NEW, HashMap<MapData, CtKey, CtEntry>),
            ct_containers: typed_map!(&mut ebpf, names::CT_CONTAINERS, HashMap<MapData, u32, CtContainer>),
            stats: typed_map!(&mut ebpf, names::STATS, PerCpuArray<MapData, u64>),
            peers: typed_map!(&mut ebpf, names::PEERS, aya::maps::LpmTrie<MapData, [u8; 4], Peer>),
            rate_limits: typed_map!(&mut ebpf, names::RATE_LIMITS, HashMap<MapData, RateKey, RateLimit>),
            rate_stats: typed_map!(&mut ebpf, names::RATE_STATS, aya::maps::PerCpuHashMap<MapData, RateKey, RateStats>),
            #[expect(
                deprecated,
                reason = "cgroup storage is what gives a key per attachment"
            )]
            rate_cgroups: typed_map!(&mut ebpf, names::RATE_CGROUPS, aya::maps::CgroupStorage<MapData, RateKey>),
            container_stats: typed_map!(&mut ebpf, names::CONTAINER_STATS, PerCpuArray<MapData, ContainerStats>),
            container_drops: typed_map!(&mut ebpf, names::CONTAINER_DROPS, Array<MapData, ContainerDrops>),
            events: Some(typed_map!(
                &mut ebpf,
                names::EVENTS,
                aya::maps::RingBuf<MapData>
            )),
            monitor_flags: 0,
            rate_flows: typed_map!(&mut ebpf, names::RATE_FLOWS, HashMap<MapData, RateKey, RateFlows>),
            ebpf,
            bpffs_dir: opts.bpffs_dir.clone(),
            attachments: imbl::OrdMap::new(),
        };
        if resized.any() {
            let moved = resized.migrate(&mut dp.ct, &mut dp.ct_new, &mut dp.ct_containers)?;
            let armed = dp.run_flush(FlushRequest {
                flags: FLUSH_F_ARM,
                ..FlushRequest::default()
            })?;
            log::info!(
                "conntrack tables resized: {} flows kept ({armed} timers armed), {} did not fit",
                moved.copied,
                moved.dropped
            );
        }
        Ok(dp)
    }

    /// The aya-log ring buffer, to forward kernel-side log events.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// A read-only view of the counters and flows, on handles of its own:
    /// the API's reads use it without waiting for the owner of this
    /// datapath.
    pub fn reader(&self) -> Result<Reader, BpfError> {
        Reader::new(self)
    }

    /// Removes the flows `req` names, in the kernel (the `ct_flush`
    /// program under `BPF_PROG_TEST_RUN`); returns how many.
    fn run_flush(&mut self, req: FlushRequest) -> Result<u64, BpfError> {
        let name = programs::CT_FLUSH;
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let frame = req.frame();
        let mut out = [0u8; 64];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(|source| BpfError::Program { name, source })?;
        // The program returns -1 when the request is cut short.
        u64::try_from(res.return_value as i32).map_err(|_| BpfError::Flush)
    }
}

/// Another handle on the map behind `map` (a duplicated file descriptor),
/// typed as `M`.
fn second_handle<K: aya::Pod, V, T, M>(map: &T, name: &'static str) -> Result<M, BpfError>
where
    T: aya::maps::IterableMap<K, V>,
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    use std::os::fd::AsFd as _;
    let map_err = |source| BpfError::Map { name, source };
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| BpfError::Duplicate { name, source })?;
    let data = MapData::from_fd(fd).map_err(map_err)?;
    let map = aya::maps::Map::from_map_data(data).map_err(map_err)?;
    M::try_from(map).map_err(map_err)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(BpfError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    prog.try_into()
        .map_err(|source| BpfError::Program { name, source })
}
