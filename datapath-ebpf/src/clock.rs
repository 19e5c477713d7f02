//! The one clock every program reads (see `datapath_common::clock`).
//!
//! ```ignore
//! let now = crate::clock::now_ns();
//! ```
//!
//! Use [`now_ns`] wherever a program needs the time; never call
//! `bpf_ktime_get_ns` directly, or packet tests cannot control that part.

use aya_ebpf::{btf_maps::Array, helpers::generated::bpf_ktime_get_ns, macros::btf_map};
use datapath_common::clock::TestClock;

/// The test clock, one entry; zero (the real clock) unless a test wrote it.
#[btf_map]
pub static CLOCK: Array<TestClock, 1> = Array::new();

/// Now, in `bpf_ktime_get_ns` nanoseconds (`CLOCK_MONOTONIC`), or the time
/// a packet test froze the programs at. Safe to call anywhere but under a
/// `bpf_spin_lock` (it may call a helper).
#[inline(always)]
pub fn now_ns() -> u64 {
    if let Some(clock) = CLOCK.get(0)
        && clock.frozen_ns != 0
    {
        return clock.frozen_ns;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}
