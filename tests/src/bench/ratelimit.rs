//! Rate-limit accuracy: the datapath's per-cgroup limiter against tc tbf
//! set up the way the CNI `bandwidth` plugin does it, for TCP at several
//! rates, both directions, one and four streams ([`crate::ratebench`]
//! builds a fresh node for every measurement).
//!
//! Targets (issue 5): within ±5% of the configured rate, and fewer
//! retransmits than tbf.

use anyhow::Result;

use crate::{
    bench::stats::Summary,
    ratebench::{self, Direction, Limiter, RateCase},
};

/// The largest deviation from the configured rate the target allows.
pub const MAX_DEVIATION: f64 = 0.05;

/// One measurement of one limiter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateSample {
    /// Achieved / configured rate.
    pub ratio: f64,
    /// TCP retransmissions of the sender.
    pub retransmits: f64,
}

/// Every measurement of one case.
#[derive(Clone, Debug)]
pub struct RateRow {
    /// The case.
    pub case: RateCase,
    /// The datapath's samples.
    pub datapath: Vec<RateSample>,
    /// tbf's samples.
    pub tbf: Vec<RateSample>,
}

impl RateRow {
    /// `10 Mbit/s egress, 1 stream`.
    pub fn label(&self) -> String {
        let dir = match self.case.direction {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        };
        let s = if self.case.streams == 1 { "" } else { "s" };
        format!(
            "{} Mbit/s {dir}, {} stream{s}",
            self.case.rate_bps / 1_000_000,
            self.case.streams
        )
    }

    fn summaries(samples: &[RateSample]) -> (Option<Summary>, Option<Summary>) {
        let ratios: Vec<f64> = samples.iter().map(|s| s.ratio).collect();
        let retrans: Vec<f64> = samples.iter().map(|s| s.retransmits).collect();
        (Summary::of(&ratios), Summary::of(&retrans))
    }

    /// The datapath's ratio and retransmit summaries.
    pub fn ours(&self) -> (Option<Summary>, Option<Summary>) {
        Self::summaries(&self.datapath)
    }

    /// tbf's ratio and retransmit summaries.
    pub fn theirs(&self) -> (Option<Summary>, Option<Summary>) {
        Self::summaries(&self.tbf)
    }

    /// Whether the datapath's median ratio is within ±5%.
    pub fn accurate(&self) -> Option<bool> {
        self.ours()
            .0
            .map(|s| (s.median - 1.0).abs() <= MAX_DEVIATION)
    }

    /// Whether the datapath's median retransmit count is below tbf's (or
    /// both are zero: there is nothing to beat).
    pub fn fewer_retransmits(&self) -> Option<bool> {
        match (self.ours().1, self.theirs().1) {
            (Some(o), Some(t)) => Some(o.median < t.median || (o.median == 0.0 && t.median == 0.0)),
            _ => None,
        }
    }
}

/// The cases: every rate in `rates_mbit`, both directions, each stream
/// count, measured for `seconds` after a second of warm-up.
pub fn cases(rates_mbit: &[u64], streams: &[u32], seconds: u32) -> Vec<RateCase> {
    let mut out = Vec::new();
    for &rate in rates_mbit {
        for direction in [Direction::Egress, Direction::Ingress] {
            for &n in streams {
                let mut case = RateCase::new(rate * 1_000_000, direction, n);
                case.seconds = seconds;
                out.push(case);
            }
        }
    }
    out
}

/// Measures every case `reps` times with both limiters, taking turns;
/// failures become notes. `between` runs before each measurement (the
/// wait for a quiet machine); returning an error stops the run.
pub fn run(
    cases: &[RateCase],
    reps: usize,
    mut between: impl FnMut() -> Result<()>,
    notes: &mut Vec<String>,
) -> Result<Vec<RateRow>> {
    let mut rows: Vec<RateRow> = cases
        .iter()
        .map(|c| RateRow {
            case: c.clone(),
            datapath: Vec::new(),
            tbf: Vec::new(),
        })
        .collect();
    for rep in 0..reps {
        for row in &mut rows {
            let label = row.label();
            print!("ratelimit    {label} {}/{reps}:", rep + 1);
            let order = if rep % 2 == 0 {
                [Limiter::Datapath, Limiter::Tbf]
            } else {
                [Limiter::Tbf, Limiter::Datapath]
            };
            for limiter in order {
                between()?;
                let name = match limiter {
                    Limiter::Datapath => "datapath",
                    Limiter::Tbf => "tbf",
                };
                match ratebench::measure(&row.case, limiter) {
                    Ok(m) => {
                        let sample = RateSample {
                            ratio: m.ratio,
                            retransmits: m.retransmits as f64,
                        };
                        print!("  {name} {:.3} ({} retr.)", m.ratio, m.retransmits);
                        match limiter {
                            Limiter::Datapath => row.datapath.push(sample),
                            Limiter::Tbf => row.tbf.push(sample),
                        }
                    }
                    Err(e) => {
                        print!("  {name} FAILED");
                        notes.push(format!("rate limit {label} with {name} failed: {e}"));
                    }
                }
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
            }
            println!();
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_judge_accuracy_and_retransmits_on_medians() {
        let s = |ratio, retransmits| RateSample { ratio, retransmits };
        let row = RateRow {
            case: RateCase::new(100_000_000, Direction::Ingress, 4),
            datapath: vec![s(0.97, 3.0), s(0.99, 1.0), s(1.20, 2.0)],
            tbf: vec![s(0.90, 40.0), s(0.93, 50.0)],
        };
        assert_eq!(row.label(), "100 Mbit/s ingress, 4 streams");
        assert_eq!(row.accurate(), Some(true));
        assert_eq!(row.fewer_retransmits(), Some(true));
        let off = RateRow {
            datapath: vec![s(0.80, 0.0)],
            tbf: vec![s(1.0, 0.0)],
            ..row.clone()
        };
        assert_eq!(off.accurate(), Some(false));
        assert_eq!(off.fewer_retransmits(), Some(true), "zero against zero");
        let none = RateRow {
            datapath: vec![],
            ..row
        };
        assert_eq!(none.accurate(), None);
        assert_eq!(cases(&[10, 100], &[1, 4], 3).len(), 8);
    }
}
