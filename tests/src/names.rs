//! Unique names for everything a test creates.

use std::sync::atomic::{AtomicU32, Ordering};

/// The prefix of every namespace, bpffs directory, cgroup and temporary
/// directory the harness creates.
pub const PREFIX: &str = "dpt-";

/// A short id unique among running tests: the process id, a per-process
/// counter and a random byte (against leftovers of an earlier process that
/// had the same pid), in hex. At most 11 characters, so that
/// `dpt-<id>` fits an interface name (15).
pub fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xfff;
    format!("{:x}{n:03x}{:02x}", std::process::id(), random_byte())
}

/// `dpt-<unique id>`.
pub fn unique_name() -> String {
    format!("{PREFIX}{}", unique_id())
}

fn random_byte() -> u8 {
    let mut b = [0u8; 1];
    // SAFETY: writes at most one byte into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, 0) };
    if n == 1 {
        b[0]
    } else {
        // No entropy source: the clock's low bits do as well here.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_fit_an_interface_name() {
        let a = unique_name();
        let b = unique_name();
        assert_ne!(a, b);
        assert!(a.len() <= 15, "{a}");
        assert!(a.starts_with(PREFIX));
    }
}
