//! Summaries of repeated measurements: median, spread, percentiles, and
//! the parity rule that turns noise into "no difference".

/// A set of samples summarized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Smallest sample.
    pub min: f64,
    /// First quartile.
    pub q1: f64,
    /// Median.
    pub median: f64,
    /// Third quartile.
    pub q3: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

impl Summary {
    /// Summarizes `samples`; `None` if there are none (NaNs are dropped).
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Self {
            n: v.len(),
            min: v[0],
            q1: percentile_sorted(&v, 25.0),
            median: percentile_sorted(&v, 50.0),
            q3: percentile_sorted(&v, 75.0),
            p99: percentile_sorted(&v, 99.0),
            max: v[v.len() - 1],
        })
    }

    /// Whether this and `other` cannot be told apart: their interquartile
    /// ranges overlap.
    pub fn parity(&self, other: &Self) -> bool {
        self.q1 <= other.q3 && other.q1 <= self.q3
    }

    /// `self.median / other.median`, if defined.
    pub fn ratio(&self, other: &Self) -> Option<f64> {
        (other.median != 0.0).then(|| self.median / other.median)
    }
}

/// The `p`th percentile (0–100) of sorted, non-empty `v`, interpolating
/// linearly between ranks.
pub fn percentile_sorted(v: &[f64], p: f64) -> f64 {
    debug_assert!(!v.is_empty());
    let rank = (p / 100.0) * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    let frac = rank - lo as f64;
    v[lo] + (v[hi] - v[lo]) * frac
}

/// The `p`th percentile (0–100) of `samples` (any order); `NaN` if empty.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        percentile_sorted(&v, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_interpolate_and_parity_needs_overlapping_quartiles() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).expect("samples");
        assert_eq!(
            (s.min, s.q1, s.median, s.q3, s.max),
            (1.0, 2.0, 3.0, 4.0, 5.0)
        );
        assert!((s.p99 - 4.96).abs() < 1e-9);
        let higher = Summary::of(&[10.0, 11.0, 12.0]).expect("samples");
        assert!(!s.parity(&higher));
        assert_eq!(higher.ratio(&s), Some(11.0 / 3.0));
        let close = Summary::of(&[3.5, 4.5, 6.0]).expect("samples");
        assert!(s.parity(&close));
        assert!(Summary::of(&[]).is_none());
        assert!(Summary::of(&[f64::NAN]).is_none());
    }
}
