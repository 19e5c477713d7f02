//! Rate limits whose cgroup appears later.
//!
//! Container runtimes set up the network before the OCI runtime creates
//! the container's cgroup (podman calls CNI `ADD` a few hundred
//! milliseconds before `…/libpod-<id>` exists). A container added with a
//! cgroup that does not exist yet is recorded with its limits pending
//! (cgroup id 0, shown as `pending`); [`watch`] follows the cgroup2
//! hierarchy with inotify, and [`Cgroups::sync`] (run by the owner) attaches
//! the limits when the cgroup appears, moves them when it is recreated (a
//! new id: `podman stop` and `start`), and detaches them when it goes,
//! leaving them pending again.
//!
//! Each pending cgroup is watched through its nearest existing ancestor
//! (creations below it), each existing one through its parent (its removal
//! and re-creation). A watched directory that goes is replaced by the next
//! ancestor. After the watches change, the owner syncs once more, so a
//! cgroup that appeared before its watch was in place is not missed.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use futures::{FutureExt as _, StreamExt as _};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use super::{AgentError, Handle, rate_target};
use crate::{
    cgroup,
    datapath::Datapath,
    store::{Change, Container, Store},
};

/// The owner's side: the containers' limits and the datapath.
pub struct Cgroups<'a> {
    /// The datapath's maps and programs.
    pub dp: &'a mut Datapath,
    /// The desired state.
    pub store: &'a mut Store,
}

impl Cgroups<'_> {
    /// Attaches the pending limits whose cgroup exists now, follows a
    /// cgroup that was recreated, and detaches the limits of a cgroup that
    /// is gone (they are pending again); records what changed (one journal
    /// record). Returns how many containers changed.
    pub fn sync(&mut self) -> Result<usize, AgentError> {
        let limited: Vec<Container> = self
            .store
            .containers()
            .values()
            .filter(|c| c.cgroup.is_some() && !c.limits.is_empty())
            .map(|c| Container::clone(c))
            .collect();
        let mut changes = Vec::new();
        for mut c in limited {
            let Some(path) = c.cgroup.clone() else {
                continue;
            };
            let now = match cgroup::lookup(&path) {
                Ok(now) => now,
                Err(e) => {
                    tracing::warn!(container = %c.name, "cgroup {}: {e}", path.display());
                    continue;
                }
            };
            match now {
                Some(id) if id == c.cgroup_id => continue,
                None if c.cgroup_id == 0 => continue,
                Some(id) => {
                    if c.cgroup_id != 0 {
                        // Recreated: the old cgroup's hooks and buckets go.
                        self.dp.remove_limits(&rate_target(&c));
                    }
                    c.cgroup_id = id;
                    if let Err(e) = self.dp.apply_limits(&rate_target(&c), true) {
                        // Gone again already, or a failure: still pending,
                        // tried again on the next change.
                        tracing::warn!(container = %c.name, "rate limits not applied: {e}");
                        self.dp.remove_limits(&rate_target(&c));
                        c.cgroup_id = 0;
                    } else {
                        tracing::info!(container = %c.name, cgroup = %path.display(), id, "cgroup appeared: rate limits applied");
                    }
                }
                None => {
                    self.dp.remove_limits(&rate_target(&c));
                    c.cgroup_id = 0;
                    tracing::info!(container = %c.name, cgroup = %path.display(), "cgroup gone: rate limits pending");
                }
            }
            changes.push(Change::Cgroup {
                name: c.name,
                cgroup_id: c.cgroup_id,
            });
        }
        let changed = changes.len();
        self.store.commit(changes)?;
        Ok(changed)
    }
}

/// The directory that shows a change of cgroup `path`: its parent while it
/// exists (its removal), else its nearest existing ancestor (the next
/// creation on the way to it).
fn watch_dir(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        path.parent().map(Path::to_owned)
    } else {
        cgroup::nearest_existing(path)
    }
}

/// What a watched directory reports.
fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// Follows the cgroups of the agent's limited containers (from the
/// snapshots the owner publishes) and asks the owner to sync whenever one
/// of them may have appeared or gone. Runs until the agent stops; without
/// inotify, limits are applied only at `add`, at start and on updates.
pub async fn watch(handle: Handle) {
    let inotify = match Inotify::init() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("inotify: {e}; pending rate limits will not follow their cgroups");
            return;
        }
    };
    let mut watches = inotify.watches();
    let mut events = match inotify.into_event_stream([0u8; 4096]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("inotify: {e}; pending rate limits will not follow their cgroups");
            return;
        }
    };
    let mut snapshots = handle.snapshots();
    let mut watched: HashMap<PathBuf, WatchDescriptor> = HashMap::new();
    loop {
        let wanted: BTreeSet<PathBuf> = snapshots
            .borrow_and_update()
            .limited_cgroups()
            .iter()
            .filter_map(|p| watch_dir(p))
            .collect();
        let mut changed = false;
        watched.retain(|dir, wd| {
            let keep = wanted.contains(dir);
            if !keep {
                // Already gone if the directory went.
                let _ = watches.remove(wd.clone());
                changed = true;
            }
            keep
        });
        for dir in wanted {
            if watched.contains_key(&dir) {
                continue;
            }
            match watches.add(&dir, mask()) {
                Ok(wd) => {
                    watched.insert(dir, wd);
                    changed = true;
                }
                // Gone meanwhile: the next sync finds another directory.
                Err(e) => tracing::debug!("watch {}: {e}", dir.display()),
            }
        }
        if changed {
            sync(&handle).await;
            continue;
        }
        tokio::select! {
            event = events.next() => {
                let Some(Ok(event)) = event else {
                    tracing::warn!("inotify stream ended; pending rate limits will not follow their cgroups");
                    return;
                };
                if event.mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                    watched.retain(|_, wd| *wd != event.wd);
                }
                // Take every event already queued: one sync covers them.
                while let Some(Some(Ok(event))) = events.next().now_or_never() {
                    if event.mask.intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                        watched.retain(|_, wd| *wd != event.wd);
                    }
                }
                sync(&handle).await;
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

async fn sync(handle: &Handle) {
    if let Err(e) = handle.sync_cgroups().await {
        tracing::warn!("following cgroups: {e}");
    }
}
