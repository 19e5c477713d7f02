//! Finding and removing what tests left behind. Tests name everything they
//! create with the prefix `dpt-`, so anything by that name after a run is a
//! leak, unless it belongs to a test that is still running (other test runs
//! may share the machine).
//!
//! Tests put their process id in every name, either `dpt-<pid>-…` (decimal)
//! or `dpt-<id>…` where `<id>` is the pid in hex followed by five hex digits
//! of counter and randomness. That tells whether an entry's creator is
//! still alive. Where a name reads both ways, either pid being alive counts:
//! a leak may then go unreported, but another run's objects are never
//! removed.
//!
//! Cgroups are looked for in every hierarchy, v1 ones included: podman
//! (cgroupfs) makes its containers' `--cgroup-parent` in each. podman also
//! names the network namespaces it makes itself (`netns-<uuid>` in
//! `/run/netns`). One of those is a test's when the processes using it are
//! in a test's cgroup (a test's container left running: it belongs to that
//! cgroup's test), or a leftover of unknown owner when no process uses it
//! on two looks a few seconds apart (so that one another run is setting up
//! is never taken); the latter counts only if it appeared during the run.

use std::{
    collections::BTreeSet,
    fmt, fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{output, run};

/// The prefix of every name a test creates.
pub const PREFIX: &str = "dpt-";

/// Where bpffs is mounted.
const BPFFS: &str = "/sys/fs/bpf";

/// Where tests make their temporary directories.
const TMP: &str = "/tmp";

/// Hex digits after the pid in the hex form of a test id (a 3-digit counter
/// and a random byte).
const HEX_ID_SUFFIX: usize = 5;

/// How long to wait for killed processes to leave a cgroup before removing it.
const CGROUP_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Where `ip netns` (and podman) keep named network namespaces.
const NETNS_DIR: &str = "/run/netns";

/// How long a podman namespace must stay unused to count as left behind.
const ORPHAN_RECHECK: Duration = Duration::from_secs(3);

/// One object a test created.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Leftover {
    /// A named network namespace (`ip netns`).
    Netns(String),
    /// An interface in the root network namespace (tests must never make
    /// these).
    Link(String),
    /// A pin or directory at the top of bpffs.
    Pin(PathBuf),
    /// A cgroup directory (the outermost matching one of its subtree), in
    /// any hierarchy.
    Cgroup(PathBuf),
    /// A network namespace podman made (`netns-<uuid>`), used by no process
    /// or only by processes in a test's cgroup (named here).
    PodmanNetns {
        /// Its name in `/run/netns`.
        name: String,
        /// The test cgroup (`dpt-…`) its processes are in, if any.
        cgroup: Option<String>,
    },
    /// A temporary file or directory.
    Temp(PathBuf),
}

/// Whether the process that created an object still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Its process (this pid) is alive: a test that is running now.
    Running(u32),
    /// Its name carries a pid and no such process exists.
    Gone,
    /// Its name carries no pid.
    Unknown,
}

impl Leftover {
    /// The object's own `dpt-…` name.
    fn name(&self) -> String {
        match self {
            Self::Netns(name) | Self::Link(name) => name.clone(),
            Self::PodmanNetns { name, cgroup } => cgroup.clone().unwrap_or_else(|| name.clone()),
            Self::Pin(path) | Self::Cgroup(path) | Self::Temp(path) => path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// Whose object this is, judged by the pid in its name.
    pub fn owner(&self) -> Owner {
        let candidates = owner_pids(&self.name());
        if candidates.is_empty() {
            return Owner::Unknown;
        }
        candidates
            .into_iter()
            .find(|pid| is_user_process(*pid))
            .map_or(Owner::Gone, Owner::Running)
    }

    /// Removes the object; a cgroup's remaining processes are killed first.
    fn remove(&self) -> Result<()> {
        match self {
            Self::Netns(name) | Self::PodmanNetns { name, .. } => {
                run(Command::new("ip").args(["netns", "delete", name]))
            }
            Self::Link(name) => run(Command::new("ip").args(["link", "delete", name])),
            Self::Pin(path) | Self::Temp(path) => {
                // podman's storage leaves mounts (a container's shm) below
                // its directory when its test is killed.
                for mount in mounts_below(path) {
                    run(Command::new("umount").arg("-l").arg(&mount))?;
                }
                let removed = if path.is_dir() {
                    fs::remove_dir_all(path)
                } else {
                    fs::remove_file(path)
                };
                removed.with_context(|| format!("cannot remove {}", path.display()))
            }
            Self::Cgroup(path) => remove_cgroup(path),
        }
    }
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Netns(name) => write!(f, "network namespace {name}"),
            Self::Link(name) => write!(f, "link {name} in the root network namespace"),
            Self::Pin(path) => write!(f, "bpffs entry {}", path.display()),
            Self::Cgroup(path) => write!(f, "cgroup {}", path.display()),
            Self::PodmanNetns {
                name,
                cgroup: Some(cgroup),
            } => write!(
                f,
                "podman's network namespace {name}, used in cgroup {cgroup}"
            ),
            Self::PodmanNetns { name, cgroup: None } => {
                write!(f, "podman's network namespace {name}, unused")
            }
            Self::Temp(path) => write!(f, "temporary {}", path.display()),
        }
    }
}

/// The pids a `dpt-…` name may carry: its first `-`-separated field read
/// as a decimal pid, and as a hex pid followed by [`HEX_ID_SUFFIX`] digits.
fn owner_pids(name: &str) -> Vec<u32> {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return Vec::new();
    };
    let id = rest.split('-').next().unwrap_or_default();
    let mut pids = Vec::new();
    if let Ok(pid) = id.parse::<u32>() {
        pids.push(pid);
    }
    if id.len() > HEX_ID_SUFFIX && id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        if let Ok(pid) = u32::from_str_radix(&id[..id.len() - HEX_ID_SUFFIX], 16) {
            pids.push(pid);
        }
    }
    pids.retain(|pid| *pid > 1);
    pids
}

/// Whether `pid` is a live userspace process (kernel threads have an empty
/// command line; a misread pid often lands on one).
fn is_user_process(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| !cmdline.is_empty())
}

/// A set of test objects present on the machine.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers(BTreeSet<Leftover>);

impl Leftovers {
    /// Every object named with [`PREFIX`] now on the machine.
    pub fn find() -> Result<Self> {
        let mut found = BTreeSet::new();
        let netns = output(Command::new("ip").args(["netns", "list"]))?;
        found.extend(prefixed(netns_names(&netns)).map(Leftover::Netns));
        let links = output(Command::new("ip").args(["-o", "link", "show"]))?;
        found.extend(prefixed(link_names(&links)).map(Leftover::Link));
        found.extend(
            prefixed_entries(Path::new(BPFFS))?
                .into_iter()
                .map(Leftover::Pin),
        );
        found.extend(
            prefixed_entries(Path::new(TMP))?
                .into_iter()
                .map(Leftover::Temp),
        );
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .context("cannot read /proc/self/mountinfo")?;
        for mount in cgroup_mounts(&mountinfo) {
            let mut cgroups = Vec::new();
            find_cgroups(&mount, &mut cgroups)?;
            found.extend(cgroups.into_iter().map(Leftover::Cgroup));
        }
        let podman: Vec<String> = netns_names(&netns)
            .into_iter()
            .filter(|n| is_podman_netns(n))
            .collect();
        let users = netns_cgroups(&podman);
        let mut unused = Vec::new();
        for name in podman {
            match users.get(&name) {
                None => unused.push(name),
                Some(cgroups) => {
                    // Only a test's, if every process using it is.
                    let tests: BTreeSet<&String> =
                        cgroups.iter().filter(|c| c.starts_with(PREFIX)).collect();
                    if tests.len() == 1 && cgroups.iter().all(|c| c.starts_with(PREFIX)) {
                        let cgroup = tests.into_iter().next().cloned();
                        found.insert(Leftover::PodmanNetns { name, cgroup });
                    }
                }
            }
        }
        if !unused.is_empty() {
            // One being set up right now gets its process in a moment.
            thread::sleep(ORPHAN_RECHECK);
            let users = netns_cgroups(&unused);
            found.extend(
                unused
                    .into_iter()
                    .filter(|n| !users.contains_key(n) && Path::new(NETNS_DIR).join(n).exists())
                    .map(|name| Leftover::PodmanNetns { name, cgroup: None }),
            );
        }
        Ok(Self(found))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The objects in `self` but not in `other`.
    pub fn without(&self, other: &Self) -> Self {
        Self(self.0.difference(&other.0).cloned().collect())
    }

    /// Splits off the objects whose owner satisfies `pred`.
    pub fn split(self, pred: impl Fn(Owner) -> bool) -> (Self, Self) {
        let (matching, rest) = self.0.into_iter().partition(|item| pred(item.owner()));
        (Self(matching), Self(rest))
    }

    /// Removes every object: namespaces and links first, then pins (which
    /// detaches pinned links), then cgroups. Carries on past failures and
    /// reports them all.
    pub fn remove(&self) -> Result<()> {
        let failures: Vec<String> = self
            .0
            .iter()
            .filter_map(|item| item.remove().err().map(|err| format!("{item}: {err:#}")))
            .collect();
        if !failures.is_empty() {
            bail!("could not remove:\n  {}", failures.join("\n  "));
        }
        Ok(())
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in &self.0 {
            match item.owner() {
                Owner::Running(pid) => writeln!(f, "  {item} (process {pid} is running)")?,
                Owner::Gone | Owner::Unknown => writeln!(f, "  {item}")?,
            }
        }
        Ok(())
    }
}

/// The names in `names` that start with [`PREFIX`].
fn prefixed(names: Vec<String>) -> impl Iterator<Item = String> {
    names.into_iter().filter(|name| name.starts_with(PREFIX))
}

/// Names from `ip netns list`, whose lines read `NAME` or `NAME (id: N)`.
fn netns_names(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Interface names from `ip -o link show`, whose lines read
/// `IDX: NAME[@PEER]: <FLAGS> …`.
fn link_names(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

/// The mount points at or below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// Whether `name` is one podman gives the network namespaces it makes:
/// `netns-` and a UUID.
fn is_podman_netns(name: &str) -> bool {
    let Some(uuid) = name.strip_prefix("netns-") else {
        return false;
    };
    let groups: Vec<&str> = uuid.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// For each namespace among `names` (in [`NETNS_DIR`]) that a process
/// uses, the outermost `dpt-…` cgroup of each such process, or the
/// process's whole cgroup path when it is in none.
fn netns_cgroups(names: &[String]) -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let mut users = std::collections::BTreeMap::new();
    if names.is_empty() {
        return users;
    }
    let by_inode: std::collections::BTreeMap<(u64, u64), &String> = names
        .iter()
        .filter_map(|n| {
            let m = fs::metadata(Path::new(NETNS_DIR).join(n)).ok()?;
            Some(((m.dev(), m.ino()), n))
        })
        .collect();
    let Ok(procs) = fs::read_dir("/proc") else {
        return users;
    };
    for entry in procs.flatten() {
        if entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none()
        {
            continue;
        }
        let Ok(m) = fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        let Some(name) = by_inode.get(&(m.dev(), m.ino())) else {
            continue;
        };
        let cgroup = fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        users
            .entry((*name).clone())
            .or_insert_with(BTreeSet::new)
            .insert(test_cgroup(&cgroup).unwrap_or(cgroup));
    }
    users
}

/// The first `dpt-…` component of any hierarchy's path in a
/// `/proc/<pid>/cgroup` text (`ID:CONTROLLERS:PATH` lines).
fn test_cgroup(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        path.split('/')
            .find(|c| c.starts_with(PREFIX))
            .map(str::to_owned)
    })
}

/// Mount points of every cgroup filesystem (v1 hierarchies and cgroup2) in
/// a `/proc/self/mountinfo` listing.
fn cgroup_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let fstype = rest.split_whitespace().next()?;
            let mount_point = fields.split_whitespace().nth(4)?;
            matches!(fstype, "cgroup" | "cgroup2")
                .then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect();
    mounts.sort();
    mounts.dedup();
    mounts
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Entries of `dir` named with [`PREFIX`]; none when `dir` does not exist.
fn prefixed_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with(PREFIX) {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Collects the outermost cgroups named with [`PREFIX`] under `dir`.
fn find_cgroups(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            continue;
        }
        if entry.file_name().to_string_lossy().starts_with(PREFIX) {
            found.push(entry.path());
        } else {
            find_cgroups(&entry.path(), found)?;
        }
    }
    Ok(())
}

/// Removes a cgroup and its descendants, bottom up, killing the processes
/// still in them first (`cgroup.kill`; in a v1 hierarchy, which has none,
/// each process of `cgroup.procs`).
fn remove_cgroup(cgroup: &Path) -> Result<()> {
    let children =
        fs::read_dir(cgroup).with_context(|| format!("cannot list {}", cgroup.display()))?;
    for child in children {
        let child = child.with_context(|| format!("cannot list {}", cgroup.display()))?;
        if child.file_type().is_ok_and(|kind| kind.is_dir()) {
            remove_cgroup(&child.path())?;
        }
    }
    let procs = cgroup.join("cgroup.procs");
    let populated = || fs::read_to_string(&procs).is_ok_and(|pids| !pids.trim().is_empty());
    if populated() {
        if fs::write(cgroup.join("cgroup.kill"), "1").is_err() {
            let pids = fs::read_to_string(&procs)
                .with_context(|| format!("cannot list the processes in {}", cgroup.display()))?;
            for pid in pids.lines().filter_map(|p| p.trim().parse::<u32>().ok()) {
                // Gone already is fine: the wait below sees it either way.
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .output();
            }
        }
        let deadline = Instant::now() + CGROUP_DRAIN_TIMEOUT;
        while populated() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
    fs::remove_dir(cgroup).with_context(|| format!("cannot remove {}", cgroup.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names_drop_the_id_suffix() {
        assert_eq!(netns_names("dpt-a (id: 3)\nother\n\n"), ["dpt-a", "other"]);
    }

    #[test]
    fn link_names_drop_the_peer_suffix() {
        let listing = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT\\    link/loopback 00:00:00:00:00:00\n\
                       7: dpt-h0@if6: <BROADCAST,MULTICAST> mtu 1500 qdisc noop state DOWN\\    link/ether 0a:1b:2c:3d:4e:5f\n";
        assert_eq!(link_names(listing), ["lo", "dpt-h0"]);
    }

    #[test]
    fn cgroup_mounts_of_both_versions_are_found_by_filesystem_type() {
        let mountinfo = "25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                         31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                         40 31 0:37 / /sys/fs/cgroup/cpu rw shared:16 - cgroup cgroup rw,cpu\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                         42 31 0:39 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_mounts(mountinfo),
            [
                PathBuf::from("/mnt/with space"),
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/unified")
            ]
        );
    }

    #[test]
    fn podman_namespaces_are_told_by_their_uuid_names() {
        assert!(is_podman_netns(
            "netns-5c1d8e2a-0b1f-4a3e-9c2d-7e8f9a0b1c2d"
        ));
        for other in [
            "netns-5c1d8e2a",
            "netns-5c1d8e2a-0b1f-4a3e-9c2d-7e8f9a0b1c2z",
            "cni-5c1d8e2a-0b1f-4a3e-9c2d-7e8f9a0b1c2d",
            "dpt-1a2b00c7f-cl",
        ] {
            assert!(!is_podman_netns(other), "{other}");
        }
    }

    #[test]
    fn a_test_cgroup_is_read_from_any_hierarchy() {
        let text = "12:pids:/dpt-1a2b00c7f-podman/libpod-abc\n0::/user.slice\n";
        assert_eq!(test_cgroup(text).as_deref(), Some("dpt-1a2b00c7f-podman"));
        assert_eq!(test_cgroup("0::/system.slice/podman.service\n"), None);
    }

    #[test]
    fn the_users_of_a_namespace_are_found_with_their_cgroups() {
        let name = format!("dpt-{}-xtask-users", std::process::id());
        if Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!("skipped: cannot make network namespaces here");
            return;
        }
        let unused = netns_cgroups(std::slice::from_ref(&name));
        let holder = Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "30"])
            .spawn();
        let used = (0..100).find_map(|_| {
            thread::sleep(Duration::from_millis(20));
            netns_cgroups(std::slice::from_ref(&name)).remove(&name)
        });
        if let Ok(mut holder) = holder {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        assert!(unused.is_empty(), "{unused:?}");
        let own = fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
        let own = test_cgroup(&own).unwrap_or(own);
        assert_eq!(
            used,
            Some(BTreeSet::from([own])),
            "the holder's cgroup is ours"
        );
    }

    #[test]
    fn unescape_leaves_lone_backslashes_alone() {
        assert_eq!(unescape_mountinfo(r"a\134b\0"), r"a\b\0");
    }

    #[test]
    fn cgroup_search_reports_the_outermost_prefixed_directory() {
        let root = std::env::temp_dir().join(format!("xtask-cgroups-{}", std::process::id()));
        fs::create_dir_all(root.join("system.slice/dpt-inner/dpt-nested")).expect("create dirs");
        fs::create_dir_all(root.join("dpt-top")).expect("create dirs");
        fs::write(root.join("dpt-file"), "").expect("create file");
        let mut found = Vec::new();
        find_cgroups(&root, &mut found).expect("search");
        found.sort();
        assert_eq!(
            found,
            [root.join("dpt-top"), root.join("system.slice/dpt-inner")]
        );
        fs::remove_dir_all(&root).expect("remove temp dir");
    }

    #[test]
    fn owner_pids_read_decimal_and_hex_ids() {
        assert_eq!(owner_pids("dpt-4778-0-node"), [4778]);
        // pid 0x1a2b, counter 0x00c, random byte 0x7f.
        assert_eq!(owner_pids("dpt-1a2b00c7f"), [0x1a2b]);
        assert_eq!(owner_pids("dpt-1a2b00c7f-ns"), [0x1a2b]);
        // All digits and long enough: both readings.
        assert_eq!(owner_pids("dpt-123456007"), [123_456_007, 0x1234]);
        assert!(owner_pids("dpt-leak").is_empty());
        assert!(owner_pids("other-1234").is_empty());
    }

    #[test]
    fn owner_of_this_process_is_running_and_of_a_dead_pid_is_gone() {
        let me = std::process::id();
        let mine = Leftover::Netns(format!("dpt-{me}-0-ctr"));
        assert_eq!(mine.owner(), Owner::Running(me));

        let mut child = Command::new("true").spawn().expect("spawn");
        let dead = child.id();
        child.wait().expect("wait");
        let theirs = Leftover::Pin(PathBuf::from(format!("/sys/fs/bpf/dpt-{dead}-1")));
        assert_eq!(theirs.owner(), Owner::Gone);

        assert_eq!(
            Leftover::Temp(PathBuf::from("/tmp/dpt-leak")).owner(),
            Owner::Unknown
        );
    }

    #[test]
    fn without_keeps_only_new_objects() {
        let old = Leftover::Netns("dpt-1-a".into());
        let new = Leftover::Netns("dpt-2-b".into());
        let before = Leftovers([old.clone()].into());
        let after = Leftovers([old, new.clone()].into());
        assert_eq!(after.without(&before), Leftovers([new].into()));
    }
}
