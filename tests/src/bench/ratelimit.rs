//! The rate limiter against tc tbf (what CNI `bandwidth` uses), side by
//! side on the same topology: achieved/configured ratio and the sender's
//! retransmissions, per rate, direction and stream count.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::ratebench::{self, Direction, Limiter, RateCase, RateMeasurement};

/// The cases of a run: 10, 100 and 1000 mbit, both directions, one and four
/// streams; `--quick` keeps 10 mbit with one stream (about half a minute).
pub fn cases(quick: bool) -> Vec<RateCase> {
    let rates: &[u64] = if quick {
        &[10_000_000]
    } else {
        &[10_000_000, 100_000_000, 1_000_000_000]
    };
    let streams: &[u32] = if quick { &[1] } else { &[1, 4] };
    let mut out = Vec::new();
    for dir in [Direction::Egress, Direction::Ingress] {
        for &rate in rates {
            for &n in streams {
                out.push(RateCase::new(rate, dir, n));
            }
        }
    }
    out
}

/// Measures every case with both limiters; a case that fails is reported
/// and left out.
pub fn run(cases: &[RateCase]) -> (Vec<[RateMeasurement; 2]>, Vec<String>) {
    let mut results = Vec::new();
    let mut notes = Vec::new();
    for case in cases {
        println!(
            "rate limit: {} {} mbit × {}",
            dir_name(case.direction),
            case.rate_bps / 1_000_000,
            case.streams
        );
        match ratebench::compare(case) {
            Ok(pair) => results.push(pair),
            Err(e) => notes.push(format!(
                "rate limit {} {} mbit × {}: {e}",
                dir_name(case.direction),
                case.rate_bps / 1_000_000,
                case.streams
            )),
        }
    }
    (results, notes)
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    }
}

fn limiter_name(l: Limiter) -> &'static str {
    match l {
        Limiter::Datapath => "datapath",
        Limiter::Tbf => "tbf",
    }
}

/// The markdown section.
pub fn markdown(results: &[[RateMeasurement; 2]], notes: &[String]) -> String {
    let mut md = String::from(
        "\n## Rate limiting: this datapath against tc tbf (CNI `bandwidth`)\n\n\
         TCP (bbr) through a limited container, 5 s measured after 1 s of warm-up, the same \
         burst for both. Ratio: receiver goodput / configured rate (target: within ±5%); \
         retransmits: the sender's (target: fewer than tbf).\n\n\
         | Direction | Rate (mbit) | Streams | datapath ratio | datapath retransmits | tbf ratio | tbf retransmits |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for [ours, tbf] in results {
        let c = &ours.case;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.3} | {} | {:.3} | {} |",
            dir_name(c.direction),
            c.rate_bps / 1_000_000,
            c.streams,
            ours.ratio,
            ours.retransmits,
            tbf.ratio,
            tbf.retransmits
        );
    }
    for n in notes {
        let _ = writeln!(md, "\n- {n}");
    }
    md
}

/// The JSON value.
pub fn json(results: &[[RateMeasurement; 2]]) -> Value {
    Value::Array(
        results
            .iter()
            .flat_map(|pair| pair.iter())
            .map(|m| {
                json!({
                    "limiter": limiter_name(m.limiter),
                    "direction": dir_name(m.case.direction),
                    "rate_bps": m.case.rate_bps,
                    "burst_bytes": m.case.burst_bytes,
                    "streams": m.case.streams,
                    "achieved_bps": m.achieved_bps,
                    "ratio": m.ratio,
                    "retransmits": m.retransmits,
                })
            })
            .collect(),
    )
}
