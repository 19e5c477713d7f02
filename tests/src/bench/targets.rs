//! The performance targets, checked against the medians measured.
//!
//! A target of the form "≥ 1.0×" or "≥ 0.95×" is also met at parity (the
//! two figures' interquartile ranges overlap: the noise cannot tell them
//! apart); a target asking for a real gain ("≥ 1.3×", "≤ 0.9×") is not.

use crate::bench::{
    mode::Mode,
    results::{Metric, Results, metric},
    stats::Summary,
};

/// What a figure is compared with.
#[derive(Clone, Copy, Debug)]
pub enum Against {
    /// The same metric of another mode at the same ports.
    Mode(Mode),
    /// Another metric of the same mode at `ports`.
    Own(&'static Metric, usize),
    /// A fixed number (in the metric's unit).
    Value(f64),
}

/// Which statistic of the figure is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// The median (of repeated figures) or p50 (of distributions).
    Median,
    /// The 99th percentile of the samples.
    P99,
    /// The worst sample.
    Max,
}

/// How the figure must compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// At least `factor` times the baseline.
    AtLeast,
    /// At most `factor` times the baseline.
    AtMost,
}

/// One target.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// As the issue states it.
    pub text: &'static str,
    /// The figure.
    pub metric: &'static Metric,
    /// At how many published ports.
    pub ports: usize,
    /// Which statistic.
    pub stat: Stat,
    /// Compared with.
    pub against: Against,
    /// How.
    pub op: Op,
    /// By how much (a ratio, or 1.0 against a [`Against::Value`]).
    pub factor: f64,
}

/// A target's verdict for one mode.
#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// Met on the medians.
    Met,
    /// Not met on the medians but inside the noise, for a parity target.
    MetAtParity,
    /// Missed.
    Missed,
    /// A figure is missing.
    NotMeasured,
}

impl Status {
    /// A word for the tables.
    pub fn word(&self) -> &'static str {
        match self {
            Status::Met => "met",
            Status::MetAtParity => "met (parity)",
            Status::Missed => "MISSED",
            Status::NotMeasured => "not measured",
        }
    }

    /// Whether the target counts as met.
    pub fn is_met(&self) -> bool {
        matches!(self, Status::Met | Status::MetAtParity)
    }
}

/// A target checked for one mode.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The target.
    pub target: Target,
    /// The mode.
    pub mode: Mode,
    /// The figure compared (a ratio or a value in the metric's unit).
    pub value: Option<f64>,
    /// The verdict.
    pub status: Status,
}

impl Outcome {
    /// The figure and verdict, for a table cell.
    pub fn cell(&self) -> String {
        match (self.value, &self.target.against) {
            (Some(v), Against::Value(_)) => {
                format!("{}: {v:.2} {}", self.status.word(), self.target.metric.unit)
            }
            (Some(v), _) => format!("{}: {v:.2}×", self.status.word()),
            (None, _) => self.status.word().to_owned(),
        }
    }
}

/// The scaling size the targets speak of.
pub const MANY_PORTS: usize = 10_000;

/// The number of containers the control-plane targets speak of.
pub const CONTAINERS: usize = 1_000;

/// The targets; `base` is the port count of the unscaled figures.
pub fn targets(base: usize) -> Vec<Target> {
    use Against::{Mode as M, Own, Value};
    use Op::{AtLeast, AtMost};
    let t = |text, metric, ports, stat, against, op, factor| Target {
        text,
        metric,
        ports,
        stat,
        against,
        op,
        factor,
    };
    vec![
        t(
            "Bulk TCP through a published port ≥ 1.0× iptables",
            &metric::TCP_1,
            base,
            Stat::Median,
            M(Mode::Iptables),
            AtLeast,
            1.0,
        ),
        t(
            "Bulk TCP through a published port ≥ 0.95× route",
            &metric::TCP_1,
            base,
            Stat::Median,
            M(Mode::Route),
            AtLeast,
            0.95,
        ),
        t(
            "Small-packet UDP pps ≥ 1.3× iptables-nft",
            &metric::UDP_PPS,
            base,
            Stat::Median,
            M(Mode::IptablesNft),
            AtLeast,
            1.3,
        ),
        t(
            "New connections/s ≥ 1.2× iptables (ports under test only)",
            &metric::CONN_RATE,
            base,
            Stat::Median,
            M(Mode::Iptables),
            AtLeast,
            1.2,
        ),
        t(
            "New connections/s at 10,000 ports ≥ 3× iptables",
            &metric::CONN_RATE,
            MANY_PORTS,
            Stat::Median,
            M(Mode::Iptables),
            AtLeast,
            3.0,
        ),
        t(
            "New connections/s at 10,000 ports ≥ 1.0× nftables-map",
            &metric::CONN_RATE,
            MANY_PORTS,
            Stat::Median,
            M(Mode::NftablesMap),
            AtLeast,
            1.0,
        ),
        t(
            "New connections/s at 10,000 ports ≥ 0.95× our own at the base",
            &metric::CONN_RATE,
            MANY_PORTS,
            Stat::Median,
            Own(&metric::CONN_RATE, base),
            AtLeast,
            0.95,
        ),
        t(
            "p99 request/response latency ≤ 0.9× iptables",
            &metric::RR_P99,
            base,
            Stat::Median,
            M(Mode::Iptables),
            AtMost,
            0.9,
        ),
        t(
            "Add one mapping with 10,000 present < 1 ms p99 (API, end to end)",
            &metric::UPDATE_ADD,
            MANY_PORTS,
            Stat::P99,
            Value(1.0),
            AtMost,
            1.0,
        ),
        t(
            "Remove one mapping with 10,000 present < 1 ms p99 (API, end to end)",
            &metric::UPDATE_DEL,
            MANY_PORTS,
            Stat::P99,
            Value(1.0),
            AtMost,
            1.0,
        ),
        t(
            "Publish one port with 10,000 individual mappings present < 1 ms p99 (API)",
            &metric::CP_PUBLISH,
            MANY_PORTS,
            Stat::P99,
            Value(1.0),
            AtMost,
            1.0,
        ),
        t(
            "Unpublish one port with 10,000 individual mappings present < 1 ms p99 (API)",
            &metric::CP_UNPUBLISH,
            MANY_PORTS,
            Stat::P99,
            Value(1.0),
            AtMost,
            1.0,
        ),
        t(
            "Publish one port: flat from 0 to 10,000 individual mappings (p50 ≤ 1.5× at 0)",
            &metric::CP_PUBLISH,
            MANY_PORTS,
            Stat::Median,
            Own(&metric::CP_PUBLISH, 0),
            AtMost,
            1.5,
        ),
        t(
            "Container add < 20 ms p50 with 1,000 containers present",
            &metric::CONTROL_ADD,
            CONTAINERS,
            Stat::Median,
            Value(20.0),
            AtMost,
            1.0,
        ),
        t(
            "`container list` < 100 ms with 1,000 containers (API, p99)",
            &metric::CP_LIST,
            CONTAINERS,
            Stat::P99,
            Value(100.0),
            AtMost,
            1.0,
        ),
        t(
            "`status` < 100 ms with 1,000 containers (API, p99)",
            &metric::CP_STATUS,
            CONTAINERS,
            Stat::P99,
            Value(100.0),
            AtMost,
            1.0,
        ),
        t(
            "Restart to ready < 2 s with 1,000 containers and 10,000 mappings (worst)",
            &metric::CP_RESTART,
            CONTAINERS,
            Stat::Max,
            Value(2000.0),
            AtMost,
            1.0,
        ),
        t(
            "Agent memory < 100 MiB with 1,000 containers and 10,000 mappings",
            &metric::CP_RSS,
            CONTAINERS,
            Stat::Max,
            Value(100.0),
            AtMost,
            1.0,
        ),
    ]
}

fn pick(s: &Summary, stat: Stat) -> f64 {
    match stat {
        Stat::Median => s.median,
        Stat::P99 => s.p99,
        Stat::Max => s.max,
    }
}

/// Checks `target` for `mode`.
pub fn check(results: &Results, target: &Target, mode: Mode) -> Outcome {
    let outcome = |value, status| Outcome {
        target: *target,
        mode,
        value,
        status,
    };
    let Some(ours) = results.summary(target.metric, mode, target.ports) else {
        return outcome(None, Status::NotMeasured);
    };
    let (value, baseline) = match target.against {
        Against::Value(limit) => {
            let v = pick(&ours, target.stat);
            let met = match target.op {
                Op::AtLeast => v >= limit,
                Op::AtMost => v < limit,
            };
            let status = if met { Status::Met } else { Status::Missed };
            return outcome(Some(v), status);
        }
        Against::Mode(other) => (ours, results.summary(target.metric, other, target.ports)),
        Against::Own(m, ports) => (ours, results.summary(m, mode, ports)),
    };
    let Some(baseline) = baseline else {
        return outcome(None, Status::NotMeasured);
    };
    let base = pick(&baseline, target.stat);
    if base == 0.0 {
        return outcome(None, Status::NotMeasured);
    }
    let ratio = pick(&value, target.stat) / base;
    let met = match target.op {
        Op::AtLeast => ratio >= target.factor,
        Op::AtMost => ratio <= target.factor,
    };
    let parity_target = target.op == Op::AtLeast && target.factor <= 1.0;
    let status = if met {
        Status::Met
    } else if parity_target && value.parity(&baseline) {
        Status::MetAtParity
    } else {
        Status::Missed
    };
    outcome(Some(ratio), status)
}

/// Every target for every one of our modes that was measured.
pub fn check_all(results: &Results, base: usize) -> Vec<Outcome> {
    let mut out = Vec::new();
    for target in targets(base) {
        for mode in Mode::OURS {
            out.push(check(results, &target, mode));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(ours: &[f64], theirs: &[f64]) -> Results {
        let mut r = Results::default();
        for v in ours {
            r.record(&metric::TCP_1, Mode::DatapathTc, 4, *v);
        }
        for v in theirs {
            r.record(&metric::TCP_1, Mode::Iptables, 4, *v);
        }
        r
    }

    #[test]
    fn parity_meets_a_parity_target_but_a_clear_loss_does_not() {
        let target = targets(4)[0];
        let noisy = results(
            &[20.0, 23.0, 24.0, 25.0, 27.0],
            &[21.0, 24.0, 25.0, 26.0, 28.0],
        );
        assert_eq!(
            check(&noisy, &target, Mode::DatapathTc).status,
            Status::MetAtParity
        );
        let loss = results(&[10.0, 10.5, 11.0], &[24.0, 25.0, 26.0]);
        assert_eq!(
            check(&loss, &target, Mode::DatapathTc).status,
            Status::Missed
        );
        let win = results(&[30.0, 31.0, 32.0], &[24.0, 25.0, 26.0]);
        assert_eq!(check(&win, &target, Mode::DatapathTc).status, Status::Met);
        assert_eq!(
            check(&win, &target, Mode::DatapathXdp).status,
            Status::NotMeasured
        );
    }

    #[test]
    fn absolute_targets_compare_the_chosen_statistic() {
        let mut r = Results::default();
        for v in [0.2, 0.3, 0.3, 0.4, 5.0] {
            r.record(&metric::UPDATE_ADD, Mode::DatapathTc, MANY_PORTS, v);
        }
        let add = targets(4)
            .into_iter()
            .find(|t| t.metric.id == metric::UPDATE_ADD.id)
            .expect("an add target");
        let o = check(&r, &add, Mode::DatapathTc);
        assert_eq!(o.status, Status::Missed, "p99 is the outlier: {o:?}");
    }
}
