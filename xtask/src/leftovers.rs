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

use std::{
    collections::BTreeSet,
    fmt, fs,
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
    /// A cgroup directory (the outermost matching one of its subtree).
    Cgroup(PathBuf),
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
            Self::Netns(name) => run(Command::new("ip").args(["netns", "delete", name])),
            Self::Link(name) => run(Command::new("ip").args(["link", "delete", name])),
            Self::Pin(path) | Self::Temp(path) => {
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
        for mount in cgroup2_mounts(&mountinfo) {
            let mut cgroups = Vec::new();
            find_cgroups(&mount, &mut cgroups)?;
            found.extend(cgroups.into_iter().map(Leftover::Cgroup));
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

/// Mount points of every cgroup2 filesystem in a `/proc/self/mountinfo`
/// listing.
fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let fstype = rest.split_whitespace().next()?;
            let mount_point = fields.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
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
/// still in them (`cgroup.kill`) first.
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
        fs::write(cgroup.join("cgroup.kill"), "1")
            .with_context(|| format!("cannot kill the processes in {}", cgroup.display()))?;
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
    fn cgroup2_mounts_are_found_by_filesystem_type() {
        let mountinfo = "25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                         40 31 0:37 / /sys/fs/cgroup/cpu rw shared:16 - cgroup cgroup rw,cpu\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                         42 31 0:39 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mounts(mountinfo),
            [
                PathBuf::from("/mnt/with space"),
                PathBuf::from("/sys/fs/cgroup/unified")
            ]
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
