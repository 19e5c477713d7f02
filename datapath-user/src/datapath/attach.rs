//! Attaching the programs: the uplink's (TC or XDP), each container's
//! host-side veth (TC) and the rate limiter's cgroup hooks, every one
//! through a link pinned under `links/` so that it outlives the agent and
//! a restarted agent swaps its fresh program in atomically.

use std::{
    collections::HashSet,
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, LinkOrder, SchedClassifier,
    SockOps, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
};
use datapath_common::{
    programs,
    ratelimit::{ATTACH_SOCK_OPS, RateKey, direction},
};

use super::{Attachment, BpfError, Datapath, UplinkHook, program};
use crate::model::names::is_host_veth_name;

impl Datapath {
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

    /// Attaches the overlay program to the overlay (VXLAN) device.
    /// On its ingress, the program delivering decapsulated packets; on its
    /// egress, the one keying the node's own packets.
    pub fn attach_overlay(&mut self, ifname: &str) -> Result<(), BpfError> {
        self.attach_tc(programs::OVERLAY_TC, ifname, OVERLAY_LINK)?;
        self.attach_tc_on(
            programs::OVERLAY_EGRESS_TC,
            ifname,
            OVERLAY_EGRESS_LINK,
            TcAttachType::Egress,
        )
    }

    /// Detaches the overlay device's programs (idempotent): a node that
    /// left cluster mode.
    pub fn detach_overlay(&mut self) -> Result<(), BpfError> {
        for name in [OVERLAY_LINK, OVERLAY_EGRESS_LINK] {
            let pin = self.link_pin(name);
            self.attachments.remove(&pin);
            remove_pin(&pin)?;
        }
        Ok(())
    }

    /// Detaches the container program from a host-side veth (idempotent).
    pub fn detach_container(&mut self, host_ifname: &str) -> Result<(), BpfError> {
        let name = container_link_name(host_ifname);
        let pin = self.link_pin(&name);
        self.attachments.remove(&pin);
        remove_pin(&pin)
    }

    /// What is attached where, by pin (a copy costs O(1)).
    pub fn attachments(&self) -> &imbl::OrdMap<PathBuf, Attachment> {
        &self.attachments
    }

    fn attach_tc(
        &mut self,
        program_name: &'static str,
        ifname: &str,
        link_name: &str,
    ) -> Result<(), BpfError> {
        self.attach_tc_on(program_name, ifname, link_name, TcAttachType::Ingress)
    }

    fn attach_tc_on(
        &mut self,
        program_name: &'static str,
        ifname: &str,
        link_name: &str,
        side: TcAttachType,
    ) -> Result<(), BpfError> {
        let pin = self.link_pin(link_name);
        let prog: &mut SchedClassifier = program(&mut self.ebpf, program_name)?;
        let program_id = prog.info().map(|i| i.id()).unwrap_or_default();
        attach_through_pin!(prog, SchedClassifierLink, &pin, {
            prog.attach_with_options(
                ifname,
                side,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
        })
        .map_err(|message| BpfError::Attach {
            program: program_name,
            ifname: ifname.to_owned(),
            message,
        })?;
        let hook = match side {
            TcAttachType::Egress => "tcx-egress",
            _ => "tcx-ingress",
        };
        self.record(program_name, program_id, ifname, hook, pin);
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
        // Loaded (verified) only for an uplink served by XDP.
        if prog.fd().is_err() {
            prog.load().map_err(|source| BpfError::Program {
                name: program_name,
                source,
            })?;
        }
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
        self.pin_over(link, &staging, pin, err)?;
        self.record(
            program_name,
            program_id,
            &cgroup.display().to_string(),
            hook.name(),
            self.link_pin(&link_name),
        );
        Ok(())
    }

    /// Pins `link` at `staging`, then renames it over `pin`: a link pinned
    /// there before (on whatever target) is detached only once the new
    /// one holds the hook.
    fn pin_over(
        &self,
        link: FdLink,
        staging: &Path,
        pin: PathBuf,
        err: impl Fn(String) -> BpfError,
    ) -> Result<(), BpfError> {
        link.pin(staging)
            .map_err(|e| err(format!("pin link at {}: {e}", staging.display())))?;
        fs::rename(staging, &pin).map_err(|source| BpfError::Fs {
            action: "rename a link pin to",
            path: pin,
            source,
        })
    }

    /// Attaches the socket programs to cgroup directory `cgroup`. Each
    /// link is pinned aside, then renamed over the pin of the previous
    /// one (on whatever cgroup), which detaches it: the hooks are never
    /// empty, and running twice for a moment is harmless (a translated
    /// address is no published port; a reversed one no container's).
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<(), BpfError> {
        let dir = fs::File::open(cgroup).map_err(|source| BpfError::Fs {
            action: "open the cgroup",
            path: cgroup.to_owned(),
            source,
        })?;
        for (program_name, hook) in SOCKET_HOOKS {
            let pin = self.link_pin(hook);
            let staging = self.link_pin(&format!("{STAGING_LINK_PREFIX}{hook}"));
            let err = |message: String| BpfError::Attach {
                program: program_name,
                ifname: cgroup.display().to_string(),
                message,
            };
            remove_pin(&staging)?;
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, program_name)?;
            let program_id = prog.info().map(|i| i.id()).unwrap_or_default();
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| err(format!("attach: {e}")))?;
            let link = prog
                .take_link(id)
                .map_err(|e| err(format!("take link: {e}")))?;
            let link = FdLink::try_from(link).map_err(|e| err(format!("link: {e}")))?;
            self.pin_over(link, &staging, pin.clone(), err)?;
            self.record(
                program_name,
                program_id,
                &cgroup.display().to_string(),
                hook,
                pin,
            );
        }
        Ok(())
    }

    /// Detaches the socket programs (idempotent).
    pub fn detach_sockets(&mut self) -> Result<(), BpfError> {
        for (_, hook) in SOCKET_HOOKS {
            let pin = self.link_pin(hook);
            self.attachments.remove(&pin);
            remove_pin(&pin)?;
        }
        Ok(())
    }

    /// Detaches rate limiter hook `hook` of a container (idempotent).
    pub fn detach_rate(&mut self, hook: RateHook, host_ifname: &str) -> Result<(), BpfError> {
        let pin = self.link_pin(&rate_link_name(hook, host_ifname));
        self.attachments.remove(&pin);
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
        self.attachments.insert(
            pin.clone(),
            Attachment {
                program,
                program_id,
                ifname: ifname.to_owned(),
                hook,
                pin,
            },
        );
    }

    /// The cgroup id the rate limiter's links of a container are attached
    /// to, read from the kernel (to rebuild a lost state); `None` if it has
    /// none.
    pub fn rate_cgroup_of(&self, host_ifname: &str) -> Option<u64> {
        RateHook::ALL.iter().find_map(|hook| {
            let pin = self.link_pin(&rate_link_name(*hook, host_ifname));
            let fd = super::sys::obj_get(&pin).ok()?;
            super::sys::link_cgroup_id(std::os::fd::AsFd::as_fd(&fd))
                .ok()
                .flatten()
        })
    }

    /// Removes the link pins of no known container (`known` holds the
    /// host-side veth names of the containers there are), detaching their
    /// programs, and staging pins left by an attach that was cut off. Only
    /// names the agent gives its pins are looked at.
    pub fn remove_orphan_links(&mut self, known: &HashSet<String>) {
        let Ok(entries) = fs::read_dir(self.bpffs_dir.join("links")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(veth) = name.strip_prefix(CONTAINER_LINK_PREFIX)
                && is_host_veth_name(veth)
                && !known.contains(veth)
            {
                tracing::warn!(link = %name, "removing an orphaned link");
                let _ = self.detach_container(veth);
            }
            if is_link_pin_name(&name) && name.starts_with(STAGING_LINK_PREFIX) {
                let _ = fs::remove_file(e.path());
            }
            for hook in RateHook::ALL {
                let prefix = rate_link_name(hook, "");
                if let Some(veth) = name.strip_prefix(&prefix)
                    && is_host_veth_name(veth)
                    && !known.contains(veth)
                {
                    tracing::warn!(link = %name, "removing an orphaned link");
                    let _ = self.detach_rate(hook, veth);
                }
            }
        }
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

/// Pin name of the overlay device's link.
pub const OVERLAY_LINK: &str = "overlay_tc";
/// Pin name of the overlay device's egress link.
pub const OVERLAY_EGRESS_LINK: &str = "overlay_egress_tc";

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

/// The socket programs and their hooks' names (in pins and `datapath
/// status`).
pub const SOCKET_HOOKS: [(&str, &str); 8] = [
    (programs::SOCK_CONNECT4, "sock-connect4"),
    (programs::SOCK_SENDMSG4, "sock-sendmsg4"),
    (programs::SOCK_RECVMSG4, "sock-recvmsg4"),
    (programs::SOCK_GETPEERNAME4, "sock-getpeername4"),
    (programs::SOCK_CONNECT6, "sock-connect6"),
    (programs::SOCK_SENDMSG6, "sock-sendmsg6"),
    (programs::SOCK_RECVMSG6, "sock-recvmsg6"),
    (programs::SOCK_GETPEERNAME6, "sock-getpeername6"),
];

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

/// Whether `name` is a link pin name the agent gives: an uplink's, a
/// container's (`container_dp<hex>`), a rate limiter hook's
/// (`rate_<hook>_dp<hex>`), a socket program's (`sock-<hook>`), the
/// overlay device's, or one of those staged (`new_…`). `--cleanup`
/// and orphan removal touch no other pin.
pub fn is_link_pin_name(name: &str) -> bool {
    let name = name.strip_prefix(STAGING_LINK_PREFIX).unwrap_or(name);
    UPLINK_LINKS.iter().any(|(_, n)| *n == name)
        || name
            .strip_prefix(CONTAINER_LINK_PREFIX)
            .is_some_and(is_host_veth_name)
        || RateHook::ALL.iter().any(|hook| {
            name.strip_prefix(&rate_link_name(*hook, ""))
                .is_some_and(is_host_veth_name)
        })
        || SOCKET_HOOKS.iter().any(|(_, hook)| *hook == name)
        || [OVERLAY_LINK, OVERLAY_EGRESS_LINK].contains(&name)
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
