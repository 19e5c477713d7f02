//! cgroup v2 directories, as rate limits name them: where the cgroup2
//! hierarchy is mounted, and a directory in it located (it may not exist
//! yet) and, once it exists, resolved to its canonical path and id.
//!
//! A cgroup is given as a directory of the cgroup2 hierarchy. An absolute
//! path inside the cgroup2 mount is taken as it is; anything else is taken
//! under the cgroup2 mount (`web1`, or `/machine.slice/web1` the way
//! container runtimes write cgroup paths). The cgroup2 mount is found in
//! `/proc/self/mountinfo` (`/sys/fs/cgroup` on a unified hierarchy,
//! `/sys/fs/cgroup/unified` on a hybrid one). A path with `..`, or one that
//! names a place outside the mount, is refused ([`locate_in`]).

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
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
    /// The path names a place outside the cgroup2 hierarchy.
    #[error("{} is outside the cgroup2 hierarchy (mounted at {}): give a cgroup v2 directory, or a path under the mount", path.display(), mount.display())]
    Outside {
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
    /// A path with a `..` component.
    #[error("cgroup {spec:?}: a cgroup path may not contain \"..\"")]
    DotDot {
        /// What was given.
        spec: String,
    },
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

/// A cgroup located in the cgroup2 hierarchy, which may not exist yet:
/// container runtimes set up the network before the OCI runtime creates
/// the container's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// Its path: canonical where it exists, otherwise the canonical path of
    /// its nearest existing ancestor joined with the rest.
    pub path: PathBuf,
    /// Its id, if it exists now.
    pub id: Option<u64>,
}

/// Resolves `spec` (see the module documentation) to an existing cgroup v2
/// directory other than the root.
pub fn resolve_cgroup(spec: &str) -> Result<CgroupDir, CgroupError> {
    resolve_cgroup_in(spec, &cgroup2_mount()?)
}

/// [`resolve_cgroup`] with a given cgroup2 mount point.
pub fn resolve_cgroup_in(spec: &str, mount: &Path) -> Result<CgroupDir, CgroupError> {
    let located = locate_in(spec, mount)?;
    match located.id {
        Some(id) => Ok(CgroupDir {
            path: located.path,
            id,
        }),
        None => Err(CgroupError::NotFound {
            spec: spec.to_owned(),
            tried: located.path,
            mount: canonical_mount(mount)?,
        }),
    }
}

/// Locates `spec` (see the module documentation) in the cgroup2 hierarchy,
/// whether or not the cgroup exists yet.
pub fn locate(spec: &str) -> Result<Located, CgroupError> {
    locate_in(spec, &cgroup2_mount()?)
}

fn canonical_mount(mount: &Path) -> Result<PathBuf, CgroupError> {
    fs::canonicalize(mount).map_err(|source| CgroupError::Io {
        path: mount.to_owned(),
        source,
    })
}

/// [`locate`] with a given cgroup2 mount point.
///
/// Refused: an empty spec, a spec with a `..` component, an absolute path
/// naming a place outside the cgroup2 mount (one whose nearest existing
/// ancestor, `/` aside, lies outside it), a path that leaves the mount
/// through a symbolic link, anything that is not a directory of the
/// cgroup2 filesystem, and the cgroup2 root itself.
pub fn locate_in(spec: &str, mount: &Path) -> Result<Located, CgroupError> {
    if spec.trim().is_empty() {
        return Err(CgroupError::Empty);
    }
    let given = Path::new(spec);
    if given.components().any(|c| c == Component::ParentDir) {
        return Err(CgroupError::DotDot {
            spec: spec.to_owned(),
        });
    }
    let mount = canonical_mount(mount)?;
    let outside = |path: &Path| CgroupError::Outside {
        path: path.to_owned(),
        mount: mount.clone(),
    };
    // Normal components only: `.` and repeated separators are dropped.
    let relative = |p: &Path| -> PathBuf {
        p.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect()
    };
    let candidate = if given.is_absolute() {
        if given.starts_with(&mount) {
            mount.join(relative(given.strip_prefix(&mount).unwrap_or(given)))
        } else {
            // Runtimes write cgroup paths from the hierarchy's root
            // (`/machine.slice/web1`), but a path that names an existing
            // place outside the mount (`/sys/fs/cgroup/memory/x`, `/etc/x`)
            // is a mistake, not a cgroup.
            if let Some(existing) = nearest_existing(given)
                && existing != Path::new("/")
            {
                return Err(outside(given));
            }
            mount.join(relative(given))
        }
    } else {
        mount.join(relative(given))
    };
    if candidate == mount {
        return Err(CgroupError::Root { path: mount });
    }
    let Some(existing) = nearest_existing(&candidate) else {
        return Err(outside(&candidate));
    };
    let real = fs::canonicalize(&existing).map_err(|source| CgroupError::Io {
        path: existing.clone(),
        source,
    })?;
    if !real.starts_with(&mount) {
        return Err(outside(&candidate));
    }
    let path = match candidate.strip_prefix(&existing) {
        Ok(rest) if !rest.as_os_str().is_empty() => real.join(rest),
        _ => real.clone(),
    };
    if path == mount {
        return Err(CgroupError::Root { path });
    }
    check_cgroup2_dir(&real, &mount)?;
    let id = if existing == candidate {
        Some(dir_id(&real, &mount)?)
    } else {
        None
    };
    Ok(Located { path, id })
}

/// The nearest ancestor of `path` (itself included) that exists.
pub fn nearest_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .find(|p| !p.as_os_str().is_empty() && fs::symlink_metadata(p).is_ok())
        .map(Path::to_owned)
}

/// The id of the cgroup at `path` (a path [`locate`] gave), or `None` if
/// it does not exist (now).
pub fn lookup(path: &Path) -> Result<Option<u64>, CgroupError> {
    let mount = canonical_mount(&cgroup2_mount()?)?;
    match fs::symlink_metadata(path) {
        Ok(_) => {
            check_cgroup2_dir(path, &mount)?;
            dir_id(path, &mount).map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks that `path` is a directory of the cgroup2 filesystem.
fn check_cgroup2_dir(path: &Path, mount: &Path) -> Result<(), CgroupError> {
    let not_cgroup2 = || CgroupError::NotCgroup2 {
        path: path.to_owned(),
        mount: mount.to_owned(),
    };
    let meta = fs::metadata(path).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(not_cgroup2());
    }
    let fs_type = nix::sys::statfs::statfs(path)
        .map_err(|e| CgroupError::Io {
            path: path.to_owned(),
            source: e.into(),
        })?
        .filesystem_type();
    if fs_type != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(not_cgroup2());
    }
    Ok(())
}

/// The id (inode) of the cgroup2 directory `path`.
fn dir_id(path: &Path, mount: &Path) -> Result<u64, CgroupError> {
    let meta = fs::metadata(path).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })?;
    if path == mount {
        return Err(CgroupError::Root {
            path: path.to_owned(),
        });
    }
    Ok(meta.ino())
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

    #[test]
    fn dot_dot_and_places_outside_the_mount_are_refused() {
        // Refused before the filesystem is asked: any directory will do as
        // the mount.
        let mount = std::env::temp_dir();
        for spec in ["../x", "a/../b", "/machine.slice/../../etc", ".."] {
            assert!(
                matches!(locate_in(spec, &mount), Err(CgroupError::DotDot { .. })),
                "{spec}: {:?}",
                locate_in(spec, &mount)
            );
        }
        // An absolute path naming an existing place outside the mount.
        for spec in ["/etc/passwd-not-a-cgroup", "/proc/self"] {
            assert!(
                matches!(locate_in(spec, &mount), Err(CgroupError::Outside { .. })),
                "{spec}: {:?}",
                locate_in(spec, &mount)
            );
        }
        assert!(matches!(locate_in(" ", &mount), Err(CgroupError::Empty)));
        // Inside the mount, but not a cgroup2 filesystem.
        assert!(matches!(
            locate_in("web1/child", &mount),
            Err(CgroupError::NotCgroup2 { .. })
        ));
    }
}
