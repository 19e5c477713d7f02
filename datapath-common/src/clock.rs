//! The programs' clock and the test clock that can stand in for it.
//!
//! Every program reads the time through one function (`clock::now_ns` in
//! the eBPF crate): `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`), unless entry 0
//! of the [`crate::names::CLOCK`] array holds a [`TestClock`] that freezes
//! it. Nothing in production writes that map, so its zeroed entry means the
//! real clock. Packet tests write it to run programs at exact, chosen times:
//! a verdict that depends on elapsed time (a token bucket refilling, a flow
//! expiring) then depends on nothing else.

use bytemuck::{Pod, Zeroable};

/// Entry 0 of the [`crate::names::CLOCK`] array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TestClock {
    /// The time every program reads, in `bpf_ktime_get_ns` nanoseconds; 0
    /// (the default) means the real clock.
    pub frozen_ns: u64,
}

impl TestClock {
    /// The real clock: what production leaves in the map.
    pub const REAL: Self = Self { frozen_ns: 0 };

    /// A clock stopped at `ns` (not 0, which means the real clock).
    pub const fn frozen(ns: u64) -> Self {
        Self { frozen_ns: ns }
    }

    /// The time a program reads when the real clock says `real_ns`.
    #[inline(always)]
    pub const fn now(&self, real_ns: u64) -> u64 {
        if self.frozen_ns != 0 {
            self.frozen_ns
        } else {
            real_ns
        }
    }
}

const _: () = assert!(size_of::<TestClock>() == 8);

// SAFETY: `#[repr(C)]`, one u64, every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for TestClock {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zeroed_entry_is_the_real_clock_and_a_frozen_one_wins() {
        assert_eq!(TestClock::default(), TestClock::REAL);
        assert_eq!(TestClock::REAL.now(123), 123);
        assert_eq!(TestClock::frozen(7).now(123), 7);
    }
}
