//! Control-plane latency: adding and deleting containers through the
//! agent's API, one published port each.

use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::bench::bed::Bed;

/// The first published port of the control-plane containers (below the
/// agent's masquerade ports, above every filler port).
const FIRST_PORT: u16 = 60_100;
/// The most containers one run may add.
pub const MAX_CONTAINERS: usize = 800;

/// Adds `count` containers to `bed`'s agent one after the other (each with
/// one published port), then deletes them; returns each container's add
/// and delete time in milliseconds.
pub fn add_and_delete(bed: &Bed<'_>, count: usize) -> Result<Vec<(f64, f64)>> {
    let api = bed
        .api()
        .with_context(|| format!("{} has no agent", bed.mode()))?;
    if count > MAX_CONTAINERS {
        bail!("at most {MAX_CONTAINERS} control-plane containers");
    }
    let namespaces: Vec<_> = (0..count)
        .map(|i| bed.node().add_container_netns(&format!("c{i}")))
        .collect();
    let names: Vec<String> = (0..count).map(|i| format!("ctl{i}")).collect();
    let mut adds = Vec::with_capacity(count);
    let mut failure = None;
    for (i, ns) in namespaces.iter().enumerate() {
        let publish = [format!("{}:80", FIRST_PORT + i as u16)];
        let start = Instant::now();
        match api.add_container(&names[i], ns.name(), &publish) {
            Ok(_) => adds.push(start.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                failure = Some(e.context(format!("adding container {}", names[i])));
                break;
            }
        }
    }
    let mut times = Vec::with_capacity(adds.len());
    for (i, add) in adds.iter().enumerate() {
        let start = Instant::now();
        match api.del_container(&names[i]) {
            Ok(()) => times.push((*add, start.elapsed().as_secs_f64() * 1e3)),
            Err(e) => {
                failure.get_or_insert(e.context(format!("deleting container {}", names[i])));
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(times),
    }
}
