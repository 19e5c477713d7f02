//! Finding what tests left behind: namespaces, bpffs directories, cgroups
//! and temporary directories named `dpt-*`.

use std::path::Path;

use crate::{names::PREFIX, netns::NETNS_RUN_DIR, sys};

/// Full paths of the entries of every place tests create things in whose
/// names satisfy `pred`: netns files, bpffs and cgroup2 top-level
/// directories, `/tmp`.
fn find(pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut dirs = vec![
        Path::new(NETNS_RUN_DIR).to_path_buf(),
        Path::new(sys::BPFFS).to_path_buf(),
        Path::new("/tmp").to_path_buf(),
    ];
    dirs.extend(sys::cgroup2_root());
    let mut out = Vec::new();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        out.extend(
            rd.filter_map(|e| e.ok())
                .filter(|e| pred(&e.file_name().to_string_lossy()))
                .map(|e| e.path().display().to_string()),
        );
    }
    out.sort();
    out
}

/// Everything any test left behind (including the resources of tests
/// running right now: call it when none is).
pub fn leftovers() -> Vec<String> {
    find(|n| n.starts_with(PREFIX))
}

/// What the resources of id `id` (see [`crate::names::unique_id`]) left
/// behind: entries named `dpt-<id>` or `dpt-<id>-…`.
pub fn leftovers_of(id: &str) -> Vec<String> {
    let exact = format!("{PREFIX}{id}");
    let sub = format!("{exact}-");
    find(|n| n == exact || n.starts_with(&sub))
}
