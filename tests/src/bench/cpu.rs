//! CPU time from `/proc/stat`: what a measurement cost the machine, and
//! whether the machine is quiet enough to measure.

use std::time::{Duration, Instant};

/// The machine-wide CPU counters of `/proc/stat`'s first line, in clock
/// ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// User time (with nice).
    pub user: u64,
    /// Kernel time outside interrupts.
    pub system: u64,
    /// Idle time (with iowait).
    pub idle: u64,
    /// Hardware interrupts.
    pub irq: u64,
    /// Software interrupts (where packet processing runs).
    pub softirq: u64,
    /// Time stolen by the hypervisor.
    pub steal: u64,
}

impl CpuTimes {
    /// The counters now; zero if `/proc/stat` cannot be read.
    pub fn now() -> Self {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| Self::parse(&s))
            .unwrap_or_default()
    }

    /// Parses the aggregate `cpu` line of `/proc/stat`.
    pub fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let get = |i: usize| v.get(i).copied().unwrap_or(0);
        Some(Self {
            user: get(0) + get(1),
            system: get(2),
            idle: get(3) + get(4),
            irq: get(5),
            softirq: get(6),
            steal: get(7),
        })
    }

    /// All ticks counted.
    pub fn total(&self) -> u64 {
        self.user + self.system + self.idle + self.irq + self.softirq + self.steal
    }

    /// The counters' growth since `earlier`.
    pub fn since(&self, earlier: &Self) -> CpuDelta {
        CpuDelta {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }
}

/// CPU ticks spent over an interval.
pub type CpuDelta = CpuTimes;

impl CpuDelta {
    /// Seconds of CPU spent in the kernel: system plus softirq plus irq
    /// (packet processing runs in all three, depending on who drives it).
    pub fn kernel_secs(&self) -> f64 {
        (self.system + self.softirq + self.irq) as f64 / ticks_per_sec()
    }

    /// Seconds of CPU spent in softirq.
    pub fn softirq_secs(&self) -> f64 {
        self.softirq as f64 / ticks_per_sec()
    }

    /// The idle share of all ticks (1.0 when nothing was counted).
    pub fn idle_fraction(&self) -> f64 {
        let total = self.total();
        if total == 0 {
            1.0
        } else {
            self.idle as f64 / total as f64
        }
    }
}

/// The CPU seconds (user and system, all threads) process `pid` has used
/// so far, from `/proc/<pid>/stat`.
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 here.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_sec())
}

/// Clock ticks per second (`USER_HZ`).
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// How [`wait_quiet`] decides.
#[derive(Clone, Copy, Debug)]
pub struct QuietPolicy {
    /// The idle share a sample must reach.
    pub min_idle: f64,
    /// How long one sample lasts.
    pub sample: Duration,
    /// The longest wait before measuring anyway.
    pub max_wait: Duration,
}

/// What [`wait_quiet`] saw.
#[derive(Clone, Copy, Debug)]
pub struct Quiet {
    /// Whether the last sample reached the policy's idle share.
    pub quiet: bool,
    /// The last sample's idle share.
    pub idle: f64,
    /// Time spent waiting.
    pub waited: Duration,
}

/// Samples the machine's idle share until it reaches `policy.min_idle` or
/// `policy.max_wait` has passed.
pub fn wait_quiet(policy: &QuietPolicy) -> Quiet {
    let start = Instant::now();
    loop {
        let before = CpuTimes::now();
        std::thread::sleep(policy.sample);
        let idle = CpuTimes::now().since(&before).idle_fraction();
        let waited = start.elapsed();
        if idle >= policy.min_idle || waited >= policy.max_wait {
            return Quiet {
                quiet: idle >= policy.min_idle,
                idle,
                waited,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aggregate_line_is_parsed_and_differenced() {
        let a = CpuTimes::parse("cpu  10 2 30 400 5 6 7 8 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n")
            .expect("parses");
        assert_eq!(
            a,
            CpuTimes {
                user: 12,
                system: 30,
                idle: 405,
                irq: 6,
                softirq: 7,
                steal: 8
            }
        );
        let b = CpuTimes {
            idle: 505,
            softirq: 107,
            ..a
        };
        let d = b.since(&a);
        assert_eq!((d.idle, d.softirq, d.total()), (100, 100, 200));
        assert!((d.idle_fraction() - 0.5).abs() < 1e-9);
        assert!(CpuTimes::parse("intr 1 2 3").is_none());
    }
}
