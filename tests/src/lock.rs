//! A lock across test processes, for tests whose traffic would disturb
//! each other (rates, bulk transfers).

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
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(TRAFFIC_LOCK)
            .unwrap_or_else(|e| panic!("opening {TRAFFIC_LOCK}: {e}"));
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("flock {TRAFFIC_LOCK}: {e}"));
        Self { _lock: lock }
    }

    /// Takes the lock if it is free.
    pub fn try_acquire() -> Option<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(TRAFFIC_LOCK)
            .unwrap_or_else(|e| panic!("opening {TRAFFIC_LOCK}: {e}"));
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .ok()
            .map(|lock| Self { _lock: lock })
    }
}
