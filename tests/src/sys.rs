//! The machine's shared filesystems: bpffs and the cgroup2 tree.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The mount points of filesystems of type `fstype`, from `/proc/mounts`.
fn mounts_of(fstype: &str) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == fstype).then(|| PathBuf::from(dir))
        })
        .collect()
}

/// Mounts bpffs at [`BPFFS`] unless it is mounted already.
pub fn ensure_bpffs() {
    if mounts_of("bpf").iter().any(|p| p == Path::new(BPFFS)) {
        return;
    }
    mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("mount -t bpf bpf {BPFFS}: {e}"));
}

/// The cgroup2 mount point (`/sys/fs/cgroup/unified` on a hybrid
/// hierarchy, `/sys/fs/cgroup` on a unified one), if any.
pub fn cgroup2_root() -> Option<PathBuf> {
    let all = mounts_of("cgroup2");
    all.iter()
        .find(|p| p.as_path() == Path::new("/sys/fs/cgroup/unified"))
        .or_else(|| all.first())
        .cloned()
}

/// One datagram (a frame, a netlink message batch) from socket `fd`, up to
/// 64 KiB, with `recv(2)` flags `flags`; `None` if there was none (a
/// timeout, `EAGAIN`) or the call failed.
pub fn recv(fd: &impl std::os::fd::AsRawFd, flags: libc::c_int) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: `buf` is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    let n = usize::try_from(n).ok()?;
    buf.truncate(n);
    Some(buf)
}
