//! Loading the eBPF object, pinning its maps, attaching its programs.
//!
//! Pin layout under the agent's bpffs directory:
//! * `maps/<NAME>`: every map (with BTF: `bpftool map dump pinned` prints
//!   field names). A restarted agent reuses them, so flows survive.
//! * `links/<NAME>`: TCX and XDP links. The datapath keeps forwarding while
//!   the agent is down; a restarted agent swaps its freshly loaded program
//!   into the existing link atomically.
//! * `links/rate_<hook>_<veth>`: the rate limiter's cgroup links of a
//!   container (see [`RateHook`]); re-attached by replacing the pin.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, SchedClassifier, SockOps,
        TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use datapath_common::{
    Config, CtEntry, CtKey, Endpoint, EndpointKey, NodeAddr, NodeAddrKey, ServiceKey, ServiceValue,
    names, programs,
    ratelimit::{ATTACH_SOCK_OPS, RateFlows, RateKey, RateLimit, RateStats, direction},
};
use serde::Serialize;

use crate::EBPF_OBJECT;

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
    /// Conntrack capacity (entries; two per flow), if not the default.
    pub ct_max: Option<u32>,
    /// Kernel-side log level (aya-log: 0 off … 5 trace).
    pub log_level: u8,
}

/// The loaded programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    bpffs_dir: PathBuf,
    /// Global configuration.
    pub config: Array<MapData, Config>,
    /// Published ports.
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Containers by address.
    pub endpoints: HashMap<MapData, EndpointKey, Endpoint>,
    /// The node's addresses.
    pub node_addrs: HashMap<MapData, NodeAddrKey, NodeAddr>,
    /// Connection tracking.
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    /// Per-CPU counters.
    pub stats: PerCpuArray<MapData, u64>,
    /// Token buckets per (cgroup, direction).
    pub rate_limits: HashMap<MapData, RateKey, RateLimit>,
    /// Per-CPU counters of each bucket.
    pub rate_stats: aya::maps::PerCpuHashMap<MapData, RateKey, RateStats>,
    /// The bucket key of each cgroup attachment.
    #[expect(
        deprecated,
        reason = "cgroup storage is what gives a key per attachment"
    )]
    pub rate_cgroups: aya::maps::CgroupStorage<MapData, RateKey>,
    /// TCP sockets sharing each ingress bucket's receive windows.
    pub rate_flows: HashMap<MapData, RateKey, RateFlows>,
    attachments: Vec<Attachment>,
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
    pub fn load(opts: &LoadOptions) -> Result<Self, BpfError> {
        let maps_dir = opts.bpffs_dir.join("maps");
        for dir in [&maps_dir, &opts.bpffs_dir.join("links")] {
            fs::create_dir_all(dir).map_err(|source| BpfError::Fs {
                action: "create",
                path: dir.clone(),
                source,
            })?;
        }
        let pins: Vec<(&'static str, PathBuf)> =
            names::ALL.iter().map(|n| (*n, maps_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(n) = opts.ct_max {
            loader.map_max_entries(names::CONNTRACK, n);
        }
        loader.override_global(aya_log::LEVEL, &opts.log_level, false);
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [programs::UPLINK_TC, programs::CONTAINER_TC] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        let xdp: &mut Xdp = program(&mut ebpf, programs::UPLINK_XDP)?;
        xdp.load().map_err(|source| BpfError::Program {
            name: programs::UPLINK_XDP,
            source,
        })?;
        for name in [programs::RATE_EGRESS, programs::RATE_INGRESS] {
            let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, programs::RATE_SOCKOPS)?;
        sock_ops.load().map_err(|source| BpfError::Program {
            name: programs::RATE_SOCKOPS,
            source,
        })?;

        Ok(Self {
            config: typed_map!(&mut ebpf, names::CONFIG, Array<MapData, Config>),
            services: typed_map!(&mut ebpf, names::SERVICES, HashMap<MapData, ServiceKey, ServiceValue>),
            endpoints: typed_map!(&mut ebpf, names::ENDPOINTS, HashMap<MapData, EndpointKey, Endpoint>),
            node_addrs: typed_map!(&mut ebpf, names::NODE_ADDRS, HashMap<MapData, NodeAddrKey, NodeAddr>),
            conntrack: typed_map!(&mut ebpf, names::CONNTRACK, HashMap<MapData, CtKey, CtEntry>),
            stats: typed_map!(&mut ebpf, names::STATS, PerCpuArray<MapData, u64>),
            rate_limits: typed_map!(&mut ebpf, names::RATE_LIMITS, HashMap<MapData, RateKey, RateLimit>),
            rate_stats: typed_map!(&mut ebpf, names::RATE_STATS, aya::maps::PerCpuHashMap<MapData, RateKey, RateStats>),
            #[expect(
                deprecated,
                reason = "cgroup storage is what gives a key per attachment"
            )]
            rate_cgroups: typed_map!(&mut ebpf, names::RATE_CGROUPS, aya::maps::CgroupStorage<MapData, RateKey>),
            rate_flows: typed_map!(&mut ebpf, names::RATE_FLOWS, HashMap<MapData, RateKey, RateFlows>),
            ebpf,
            bpffs_dir: opts.bpffs_dir.clone(),
            attachments: Vec::new(),
        })
    }

    /// The aya-log ring buffer, to forward kernel-side log events.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Pin path of the link named `name`.
    pub fn link_pin(&self, name: &str) -> PathBuf {
        self.bpffs_dir.join("links").join(name)
    }

    /// Attaches the uplink program for `hook` to `ifname`, replacing the
    /// program of an already pinned link of the same hook in place and
    /// removing pinned links of the other hooks. The pin name carries the
    /// hook (`uplink_tc`, `uplink_xdp_native`, `uplink_xdp_generic`): a
    /// pinned XDP link keeps the mode it was created with.
    pub fn attach_uplink(&mut self, ifname: &str, hook: UplinkHook) -> Result<(), BpfError> {
        for other in UPLINK_LINKS.iter().filter(|(h, _)| *h != hook) {
            remove_pin(&self.link_pin(other.1))?;
        }
        let name = UPLINK_LINKS
            .iter()
            .find(|(h, _)| *h == hook)
            .map_or("uplink_tc", |(_, n)| n);
        match hook {
            UplinkHook::Tc => self.attach_tc(programs::UPLINK_TC, ifname, name),
            _ => self.attach_xdp(ifname, hook, name),
        }
    }

    /// Attaches the container program to a host-side veth.
    pub fn attach_container(&mut self, host_ifname: &str) -> Result<(), BpfError> {
        self.attach_tc(
            programs::CONTAINER_TC,
            host_ifname,
            &container_link_name(host_ifname),
        )
    }

    /// Detaches the container program from a host-side veth (idempotent).
    pub fn detach_container(&mut self, host_ifname: &str) -> Result<(), BpfError> {
        let name = container_link_name(host_ifname);
        let pin = self.link_pin(&name);
        self.attachments.retain(|a| a.pin != pin);
        remove_pin(&pin)
    }

    /// What is attached where.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    fn attach_tc(
        &mut self,
        program_name: &'static str,
        ifname: &str,
        link_name: &str,
    ) -> Result<(), BpfError> {
        let pin = self.link_pin(link_name);
        let prog: &mut SchedClassifier = program(&mut self.ebpf, program_name)?;
        let program_id = prog.info().map(|i| i.id()).unwrap_or_default();
        attach_through_pin!(prog, SchedClassifierLink, &pin, {
            prog.attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
        })
        .map_err(|message| BpfError::Attach {
            program: program_name,
            ifname: ifname.to_owned(),
            message,
        })?;
        self.record(program_name, program_id, ifname, "tcx-ingress", pin);
        Ok(())
    }

    fn attach_xdp(
        &mut self,
        ifname: &str,
        hook: UplinkHook,
        link_name: &str,
    ) -> Result<(), BpfError> {
        let program_name = programs::UPLINK_XDP;
        let pin = self.link_pin(link_name);
        let (mode, hook_name) = match hook {
            UplinkHook::XdpGeneric => (XdpMode::Skb, "xdp-generic"),
            _ => (XdpMode::Driver, "xdp-native"),
        };
        let prog: &mut Xdp = program(&mut self.ebpf, program_name)?;
        let program_id = prog.info().map(|i| i.id()).unwrap_or_default();
        attach_through_pin!(prog, XdpLink, &pin, { prog.attach(ifname, mode) }).map_err(
            |message| BpfError::Attach {
                program: program_name,
                ifname: ifname.to_owned(),
                message: format!("{hook_name}: {message}"),
            },
        )?;
        self.record(program_name, program_id, ifname, hook_name, pin);
        Ok(())
    }

    /// Attaches rate limiter hook `hook` to the cgroup directory `cgroup`
    /// (id `cgroup_id`) of the container with host-side veth `host_ifname`,
    /// and gives the attachment its bucket key. A link already pinned for
    /// it is replaced: the new one is attached and keyed first, then pinned
    /// over the old one, which detaches it, so the cgroup is never
    /// unlimited in between.
    pub fn attach_rate(
        &mut self,
        hook: RateHook,
        cgroup: &Path,
        cgroup_id: u64,
        host_ifname: &str,
    ) -> Result<(), BpfError> {
        let link_name = rate_link_name(hook, host_ifname);
        let pin = self.link_pin(&link_name);
        let staging = self.link_pin(&format!("{STAGING_LINK_PREFIX}{link_name}"));
        let program_name = hook.program();
        let err = |message: String| BpfError::Attach {
            program: program_name,
            ifname: cgroup.display().to_string(),
            message,
        };
        remove_pin(&staging)?;
        let dir = fs::File::open(cgroup).map_err(|e| err(format!("open the cgroup: {e}")))?;
        let (link, program_id) = match hook {
            RateHook::Egress | RateHook::Ingress => {
                let prog: &mut CgroupSkb = program(&mut self.ebpf, program_name)?;
                let program_id = prog.info().map(|i| i.id()).unwrap_or_default();
                let attach_type = if hook == RateHook::Egress {
                    CgroupSkbAttachType::Egress
                } else {
                    CgroupSkbAttachType::Ingress
                };
                let id = prog
                    .attach(&dir, attach_type, CgroupAttachMode::Single)
                    .map_err(|e| err(format!("attach: {e}")))?;
                let link = prog
                    .take_link(id)
                    .map_err(|e| err(format!("take link: {e}")))?;
                (
                    FdLink::try_from(link).map_err(|e| err(format!("link: {e}")))?,
                    program_id,
                )
            }
            RateHook::SockOps => {
                let prog: &mut SockOps = program(&mut self.ebpf, program_name)?;
                let program_id = prog.info().map(|i| i.id()).unwrap_or_default();
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(|e| err(format!("attach: {e}")))?;
                let link = prog
                    .take_link(id)
                    .map_err(|e| err(format!("take link: {e}")))?;
                (
                    FdLink::try_from(link).map_err(|e| err(format!("link: {e}")))?,
                    program_id,
                )
            }
        };
        let key = RateKey::new(cgroup_id, hook.direction());
        let storage_key = aya::maps::CgroupStorageKey::new(cgroup_id, hook.attach_type());
        self.rate_cgroups
            .insert(storage_key, key, 0)
            .map_err(|e| err(format!("write the attachment's key: {e}")))?;
        link.pin(&staging)
            .map_err(|e| err(format!("pin link at {}: {e}", staging.display())))?;
        fs::rename(&staging, &pin).map_err(|source| BpfError::Fs {
            action: "rename a link pin to",
            path: pin.clone(),
            source,
        })?;
        self.record(
            program_name,
            program_id,
            &cgroup.display().to_string(),
            hook.name(),
            pin,
        );
        Ok(())
    }

    /// Detaches rate limiter hook `hook` of a container (idempotent).
    pub fn detach_rate(&mut self, hook: RateHook, host_ifname: &str) -> Result<(), BpfError> {
        let pin = self.link_pin(&rate_link_name(hook, host_ifname));
        self.attachments.retain(|a| a.pin != pin);
        remove_pin(&pin)
    }

    /// Whether rate limiter hook `hook` of a container is pinned.
    pub fn rate_attached(&self, hook: RateHook, host_ifname: &str) -> bool {
        self.link_pin(&rate_link_name(hook, host_ifname)).exists()
    }

    fn record(
        &mut self,
        program: &'static str,
        program_id: u32,
        ifname: &str,
        hook: &'static str,
        pin: PathBuf,
    ) {
        self.attachments.retain(|a| a.pin != pin);
        self.attachments.push(Attachment {
            program,
            program_id,
            ifname: ifname.to_owned(),
            hook,
            pin,
        });
    }
}

/// Attaches `$prog` through the link pinned at `$pin`: if a link is pinned
/// there, the program is swapped into it atomically (traffic never sees the
/// hook empty); otherwise `$attach` creates a new link, which is pinned.
/// aya's link types share no trait for this, hence a macro.
macro_rules! attach_through_pin {
    ($prog:ident, $link_ty:ty, $pin:expr, $attach:block) => {{
        let pin: &Path = $pin;
        match pinned_link(pin) {
            Err(e) => Err(e),
            Ok(existing) => {
                let fresh = existing.is_none();
                let id = match existing {
                    Some(old) => <$link_ty>::try_from(old)
                        .map_err(|e| format!("reuse pinned link {}: {e}", pin.display()))
                        .and_then(|link| {
                            $prog.attach_to_link(link).map_err(|e| {
                                format!("replace the program in pinned link {}: {e}", pin.display())
                            })
                        }),
                    None => $attach.map_err(|e| format!("attach: {e}")),
                };
                id.and_then(|id| $prog.take_link(id).map_err(|e| format!("take link: {e}")))
                    .and_then(|link| FdLink::try_from(link).map_err(|e| format!("link: {e}")))
                    .and_then(|link| {
                        if fresh {
                            link.pin(pin)
                                .map(drop)
                                .map_err(|e| format!("pin link at {}: {e}", pin.display()))
                        } else {
                            Ok(())
                        }
                    })
            }
        }
    }};
}
use attach_through_pin;

/// The link pinned at `pin`, if there is one.
fn pinned_link(pin: &Path) -> Result<Option<FdLink>, String> {
    match PinnedLink::from_pin(pin) {
        Ok(old) => Ok(Some(FdLink::from(old))),
        Err(aya::programs::links::LinkError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(format!("open pinned link {}: {e}", pin.display())),
    }
}

/// Pin names of the uplink links, by hook.
const UPLINK_LINKS: [(UplinkHook, &str); 3] = [
    (UplinkHook::Tc, "uplink_tc"),
    (UplinkHook::XdpNative, "uplink_xdp_native"),
    (UplinkHook::XdpGeneric, "uplink_xdp_generic"),
];

/// The rate limiter's hooks on a container's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateHook {
    /// cgroup_skb egress: the egress bucket.
    Egress,
    /// cgroup_skb ingress: the ingress bucket.
    Ingress,
    /// sock_ops: pacing of the cgroup's TCP senders by the egress bucket,
    /// receive windows of its TCP receivers by the ingress bucket.
    SockOps,
}

impl RateHook {
    /// Every hook.
    pub const ALL: [RateHook; 3] = [RateHook::Egress, RateHook::Ingress, RateHook::SockOps];

    /// The program.
    pub fn program(self) -> &'static str {
        match self {
            RateHook::Egress => programs::RATE_EGRESS,
            RateHook::Ingress => programs::RATE_INGRESS,
            RateHook::SockOps => programs::RATE_SOCKOPS,
        }
    }

    /// The bucket's direction.
    pub fn direction(self) -> u32 {
        match self {
            RateHook::Ingress => direction::INGRESS,
            RateHook::Egress | RateHook::SockOps => direction::EGRESS,
        }
    }

    /// The kernel attach type (the cgroup storage key's).
    fn attach_type(self) -> u32 {
        match self {
            RateHook::Egress => direction::EGRESS,
            RateHook::Ingress => direction::INGRESS,
            RateHook::SockOps => ATTACH_SOCK_OPS,
        }
    }

    /// The name in pins and `datapath status`.
    pub fn name(self) -> &'static str {
        match self {
            RateHook::Egress => "cgroup-egress",
            RateHook::Ingress => "cgroup-ingress",
            RateHook::SockOps => "cgroup-sock-ops",
        }
    }
}

/// Prefix of the pinned link names of the rate limiter.
pub const RATE_LINK_PREFIX: &str = "rate_";

/// Prefix of a link pinned for a moment before it replaces another (bpffs
/// names cannot contain dots); one left over was cut off and is removed.
pub const STAGING_LINK_PREFIX: &str = "new_";

/// The pinned link name of rate limiter hook `hook` of the container with
/// host-side veth `host_ifname`.
pub fn rate_link_name(hook: RateHook, host_ifname: &str) -> String {
    format!("{RATE_LINK_PREFIX}{}_{host_ifname}", hook.name())
}

/// Prefix of the pinned link names of containers' host-side veths.
pub const CONTAINER_LINK_PREFIX: &str = "container_";

/// The pinned link name of a container's host-side veth.
pub fn container_link_name(host_ifname: &str) -> String {
    format!("{CONTAINER_LINK_PREFIX}{host_ifname}")
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

/// Removes a pin (detaching a pinned link); absent is fine.
fn remove_pin(path: &Path) -> Result<(), BpfError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::Fs {
            action: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}
