//! cgroup v2 directories, as rate limits name them: where the cgroup2
//! hierarchy is mounted, and a directory in it resolved to its canonical
//! path and id.
//!
//! A cgroup is given as a directory of the cgroup2 hierarchy. An absolute
//! path inside the cgroup2 mount is taken as it is; anything else is taken
//! under the cgroup2 mount (`web1`, or `/machine.slice/web1` the way
//! container runtimes write cgroup paths). The cgroup2 mount is found in
//! `/proc/self/mountinfo` (`/sys/fs/cgroup` on a unified hierarchy,
//! `/sys/fs/cgroup/unified` on a hybrid one).

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The cgroup given is not one a limit can apply to.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 hierarchy is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); rate limits need cgroup v2"
    )]
    NoCgroup2,
    /// `/proc/self/mountinfo` could not be read.
    #[error("read /proc/self/mountinfo: {0}")]
    Mountinfo(std::io::Error),
    /// The cgroup does not exist.
    #[error("no cgroup {spec:?}: {} does not exist (cgroup2 is mounted at {})", tried.display(), mount.display())]
    NotFound {
        /// What was given.
        spec: String,
        /// The directory looked for.
        tried: PathBuf,
        /// The cgroup2 mount.
        mount: PathBuf,
    },
    /// The path is not a directory of the cgroup2 hierarchy.
    #[error("{} is not a cgroup v2 directory (cgroup2 is mounted at {})", path.display(), mount.display())]
    NotCgroup2 {
        /// The path.
        path: PathBuf,
        /// The cgroup2 mount.
        mount: PathBuf,
    },
    /// The cgroup2 root itself.
    #[error("{} is the cgroup2 root: limits apply to a container's own cgroup, never to the root", path.display())]
    Root {
        /// The root.
        path: PathBuf,
    },
    /// An empty name.
    #[error("an empty cgroup name")]
    Empty,
    /// The directory could not be examined.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The mount point of the cgroup2 hierarchy in a `/proc/<pid>/mountinfo`
/// text: the first cgroup2 mount of the hierarchy's root, else the first
/// cgroup2 mount.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.get(sep + 1) != Some(&"cgroup2") || fields.len() < 5 {
            continue;
        }
        let mount = PathBuf::from(unescape_mountinfo(fields[4]));
        if fields[3] == "/" {
            return Some(mount);
        }
        fallback.get_or_insert(mount);
    }
    fallback
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mount point of this process's mount namespace.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
    cgroup2_mount_in(&text).ok_or(CgroupError::NoCgroup2)
}

/// A resolved cgroup: its canonical directory and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupDir {
    /// The canonical path of the directory.
    pub path: PathBuf,
    /// The cgroup id (what `bpf_skb_cgroup_id` returns): the inode number.
    pub id: u64,
}

/// The cgroup v2 directory whose id (inode) is `id`, searched under the
/// cgroup2 mount; `None` if there is none (it was removed).
pub fn find_cgroup_by_id(id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut stack = vec![cgroup2_mount().ok()?];
    while let Some(dir) = stack.pop() {
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

/// Resolves `spec` (see the module documentation) to a cgroup v2 directory
/// other than the root.
pub fn resolve_cgroup(spec: &str) -> Result<CgroupDir, CgroupError> {
    resolve_cgroup_in(spec, &cgroup2_mount()?)
}

/// [`resolve_cgroup`] with a given cgroup2 mount point.
pub fn resolve_cgroup_in(spec: &str, mount: &Path) -> Result<CgroupDir, CgroupError> {
    if spec.trim().is_empty() {
        return Err(CgroupError::Empty);
    }
    let mount = fs::canonicalize(mount).map_err(|source| CgroupError::Io {
        path: mount.to_owned(),
        source,
    })?;
    let given = Path::new(spec);
    let candidate = if given.is_absolute() {
        if given.starts_with(&mount) {
            given.to_owned()
        } else if given.exists() {
            return Err(CgroupError::NotCgroup2 {
                path: given.to_owned(),
                mount,
            });
        } else {
            // Runtimes write cgroup paths from the hierarchy's root.
            mount.join(given.strip_prefix("/").unwrap_or(given))
        }
    } else {
        mount.join(given)
    };
    let path = match fs::canonicalize(&candidate) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CgroupError::NotFound {
                spec: spec.to_owned(),
                tried: candidate,
                mount,
            });
        }
        Err(source) => {
            return Err(CgroupError::Io {
                path: candidate,
                source,
            });
        }
    };
    let not_cgroup2 = || CgroupError::NotCgroup2 {
        path: path.clone(),
        mount: mount.clone(),
    };
    if !path.starts_with(&mount) {
        return Err(not_cgroup2());
    }
    let meta = fs::metadata(&path).map_err(|source| CgroupError::Io {
        path: path.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(not_cgroup2());
    }
    let fs_type = nix::sys::statfs::statfs(&path)
        .map_err(|e| CgroupError::Io {
            path: path.clone(),
            source: e.into(),
        })?
        .filesystem_type();
    if fs_type != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(not_cgroup2());
    }
    if path == mount {
        return Err(CgroupError::Root { path });
    }
    Ok(CgroupDir {
        id: meta.ino(),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_mountinfo() {
        let hybrid = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory
";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "\
40 30 0:30 /user.slice /mnt/inner rw - cgroup2 cgroup2 rw
41 30 0:30 / /sys/fs/cgroup rw shared:4 master:1 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let spaced = "50 30 0:30 / /mnt/with\\040space rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount_in(spaced),
            Some(PathBuf::from("/mnt/with space"))
        );
        assert_eq!(
            cgroup2_mount_in("25 30 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}
