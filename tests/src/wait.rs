//! Waiting on conditions instead of sleeping: every wait polls what it
//! waits for and is bounded.
//!
//! ```no_run
//! use std::time::Duration;
//! use datapath_tests::wait;
//!
//! let mut n = 0;
//! wait::until("the counter reaches 3", Duration::from_secs(1), || {
//!     n += 1;
//!     n >= 3
//! });
//! ```

use std::time::{Duration, Instant};

/// How often a condition is checked.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` every [`POLL`] until it holds or `timeout` passes; whether
/// it held.
pub fn within(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Like [`within`], panicking with `what` if `cond` does not hold in time.
#[track_caller]
pub fn until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(within(timeout, cond), "{what}: not within {timeout:?}");
}

/// Polls `f` until it returns `Some`, for up to `timeout`.
pub fn for_some<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let mut out = None;
    within(timeout, || {
        out = f();
        out.is_some()
    });
    out
}
