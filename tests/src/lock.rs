//! A lock across test processes, for tests whose traffic would disturb
//! each other (rates, bulk transfers, floods). Take it once the test is
//! set up, right before its traffic: setting up needs no quiet machine.
//! `.config/nextest.toml` lists the tests that take it (the `traffic`
//! group), so that they do not fill every parallel slot waiting for it.

use std::fs::{File, OpenOptions};

use nix::fcntl::{Flock, FlockArg};

/// The lock file.
pub const TRAFFIC_LOCK: &str = "/tmp/datapath-tests-traffic.lock";

/// Held while a traffic-heavy test runs; released on drop.
#[derive(Debug)]
pub struct TrafficLock {
    _lock: Flock<File>,
}

impl TrafficLock {
    /// Blocks until no other test (in any process) holds the lock.
    pub fn acquire() -> Self {
        Self::acquire_at(TRAFFIC_LOCK)
    }

    /// Takes the lock if it is free.
    pub fn try_acquire() -> Option<Self> {
        Self::try_acquire_at(TRAFFIC_LOCK)
    }

    /// [`Self::acquire`] on the lock file `path`.
    pub fn acquire_at(path: &str) -> Self {
        let lock = Flock::lock(open(path), FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("flock {path}: {e}"));
        Self { _lock: lock }
    }

    /// [`Self::try_acquire`] on the lock file `path`.
    pub fn try_acquire_at(path: &str) -> Option<Self> {
        Flock::lock(open(path), FlockArg::LockExclusiveNonblock)
            .ok()
            .map(|lock| Self { _lock: lock })
    }
}

fn open(path: &str) -> File {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {path}: {e}"))
}
