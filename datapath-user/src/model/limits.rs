//! Rate limits as users give them and the API shows them: rates and sizes
//! in tc's units, one direction's [`Limit`], both directions'
//! [`RateLimits`], and the limiter's counters.
//!
//! * Rates ([`parse_rate`]): a number with `bit`, `kbit`, `mbit`, `gbit`,
//!   `tbit` (decimal multipliers, like tc: `k` = 1000), `bps`, `kbps`,
//!   `mbps`, `gbps`, `tbps` (bytes per second), the binary `kibit` …
//!   `tibit` and `kibps` … `tibps`; a bare number is bits per second.
//!   Decimals are fine (`1.5mbit`); units are case-insensitive.
//! * Sizes ([`parse_size`]): a number with `b` (bytes), `k`/`kb`, `m`/`mb`,
//!   `g`/`gb` (binary multipliers, like tc: `kb` = 1024 bytes), `kbit`,
//!   `mbit`, `gbit` (1024-based bits); a bare number is bytes.

use datapath_common::ratelimit::{
    MAX_BURST_BYTES, MAX_RATE_BPS, MIN_BURST_BYTES, MIN_RATE_BPS, RateParams, RateStats,
    default_burst, direction,
};
use serde::{Deserialize, Serialize};

/// The word that removes a limit in an update.
pub const NONE: &str = "none";

/// A rate or size that cannot be used; nothing was changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    /// Not a number with a unit.
    #[error("invalid {what} {input:?}: {reason}; {hint}")]
    Syntax {
        /// `rate` or `burst`.
        what: &'static str,
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: String,
        /// What would be right.
        hint: &'static str,
    },
    /// A number out of the accepted range.
    #[error("{what} {input:?} is {reason}")]
    Range {
        /// `rate` or `burst`.
        what: &'static str,
        /// What was given.
        input: String,
        /// Why it is refused and what the bounds are.
        reason: String,
    },
    /// A burst without a rate.
    #[error("{dir} burst {burst:?} without a rate: give --{dir}-rate too")]
    BurstWithoutRate {
        /// `egress` or `ingress`.
        dir: &'static str,
        /// The burst given.
        burst: String,
    },
}

/// One direction's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    /// Rate in bits per second.
    pub rate_bps: u64,
    /// Bucket size in bytes.
    pub burst_bytes: u64,
    /// Whether the bucket size was given (`--*-burst`) rather than derived
    /// from the rate ([`default_burst`]): a derived one follows the rate
    /// when the rate is updated, a given one stays.
    #[serde(default)]
    pub burst_given: bool,
}

impl Limit {
    /// A limit with a bucket size that was given.
    pub fn given(rate_bps: u64, burst_bytes: u64) -> Self {
        Self {
            rate_bps,
            burst_bytes,
            burst_given: true,
        }
    }

    /// A limit whose bucket size is derived from the rate
    /// ([`default_burst`]) for `dir` (`egress` or `ingress`).
    pub fn derived(dir: &str, rate_bps: u64) -> Self {
        Self {
            rate_bps,
            burst_bytes: default_burst(direction_of(dir), rate_bps),
            burst_given: false,
        }
    }

    /// The bucket parameters (the limit was validated when made).
    pub fn params(&self) -> Option<RateParams> {
        RateParams::new(self.rate_bps, self.burst_bytes).ok()
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} burst {}",
            format_rate(self.rate_bps),
            format_size(self.burst_bytes)
        )
    }
}

/// Both directions' limits; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimits {
    /// Packets sent by the container.
    #[serde(default)]
    pub egress: Option<Limit>,
    /// Packets delivered to the container.
    #[serde(default)]
    pub ingress: Option<Limit>,
}

impl RateLimits {
    /// Whether neither direction is limited.
    pub fn is_empty(&self) -> bool {
        self.egress.is_none() && self.ingress.is_none()
    }

    /// The limit of `direction` (`datapath_common::ratelimit::direction`).
    pub fn get(&self, direction: u32) -> Option<Limit> {
        if direction == direction::EGRESS {
            self.egress
        } else {
            self.ingress
        }
    }
}

/// One direction's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionCounters {
    /// Bytes let through (marked ones included).
    pub passed_bytes: u64,
    /// Packets let through (a GSO packet counts once).
    pub passed_packets: u64,
    /// Bytes dropped over the limit.
    pub dropped_bytes: u64,
    /// Packets dropped over the limit.
    pub dropped_packets: u64,
    /// Bytes let through with a congestion notification (egress) or an ECN
    /// CE mark (ingress).
    pub marked_bytes: u64,
    /// Packets let through with a congestion notification or CE mark.
    pub marked_packets: u64,
}

impl From<RateStats> for DirectionCounters {
    fn from(s: RateStats) -> Self {
        Self {
            passed_bytes: s.passed_bytes,
            passed_packets: s.passed_packets,
            dropped_bytes: s.dropped_bytes,
            dropped_packets: s.dropped_packets,
            marked_bytes: s.marked_bytes,
            marked_packets: s.marked_packets,
        }
    }
}

/// Both directions' counters (zero while a direction is unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateCounters {
    /// Packets sent by the container.
    pub egress: DirectionCounters,
    /// Packets delivered to the container.
    pub ingress: DirectionCounters,
}

/// Splits `input` into a non-negative decimal number and its unit.
fn number_and_unit<'a>(
    what: &'static str,
    input: &'a str,
    hint: &'static str,
) -> Result<(f64, &'a str), LimitError> {
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let syntax = |reason: String| LimitError::Syntax {
        what,
        input: input.to_owned(),
        reason,
        hint,
    };
    if num.is_empty() {
        return Err(syntax("it does not start with a number".into()));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| syntax(format!("{num:?} is not a number")))?;
    if !value.is_finite() {
        return Err(syntax(format!("{num:?} is not a number")));
    }
    Ok((value, unit))
}

const RATE_HINT: &str =
    "use tc's units, e.g. 10mbit, 500kbit, 1gbit, 2mbps (bytes/s), 1000000 (bit/s)";
const SIZE_HINT: &str = "use tc's units, e.g. 64kb, 1mb, 1500b, 256k (kb = 1024 bytes)";

/// Parses a rate in tc's units into bits per second (not yet range-checked;
/// see [`rate`]).
pub fn parse_rate(input: &str) -> Result<u64, LimitError> {
    let (value, unit) = number_and_unit("rate", input, RATE_HINT)?;
    let k = 1000.0_f64;
    let ki = 1024.0_f64;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "bit" => 1.0,
        "kbit" => k,
        "mbit" => k * k,
        "gbit" => k * k * k,
        "tbit" => k * k * k * k,
        "kibit" => ki,
        "mibit" => ki * ki,
        "gibit" => ki * ki * ki,
        "tibit" => ki * ki * ki * ki,
        "bps" => 8.0,
        "kbps" => 8.0 * k,
        "mbps" => 8.0 * k * k,
        "gbps" => 8.0 * k * k * k,
        "tbps" => 8.0 * k * k * k * k,
        "kibps" => 8.0 * ki,
        "mibps" => 8.0 * ki * ki,
        "gibps" => 8.0 * ki * ki * ki,
        "tibps" => 8.0 * ki * ki * ki * ki,
        other => {
            return Err(LimitError::Syntax {
                what: "rate",
                input: input.to_owned(),
                reason: format!("unknown unit {other:?}"),
                hint: RATE_HINT,
            });
        }
    };
    to_integer("rate", input, value * mult)
}

/// Parses a size in tc's units into bytes (not yet range-checked; see
/// [`burst`]).
pub fn parse_size(input: &str) -> Result<u64, LimitError> {
    let (value, unit) = number_and_unit("burst", input, SIZE_HINT)?;
    let ki = 1024.0_f64;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => ki,
        "m" | "mb" => ki * ki,
        "g" | "gb" => ki * ki * ki,
        "kbit" => ki / 8.0,
        "mbit" => ki * ki / 8.0,
        "gbit" => ki * ki * ki / 8.0,
        other => {
            return Err(LimitError::Syntax {
                what: "burst",
                input: input.to_owned(),
                reason: format!("unknown unit {other:?}"),
                hint: SIZE_HINT,
            });
        }
    };
    to_integer("burst", input, value * mult)
}

fn to_integer(what: &'static str, input: &str, v: f64) -> Result<u64, LimitError> {
    // 2^63 is exact in f64; anything at or above it is absurd anyway.
    if v >= 2f64.powi(63) {
        return Err(LimitError::Range {
            what,
            input: input.to_owned(),
            reason: "far too large".into(),
        });
    }
    Ok(v.round() as u64)
}

/// A rate for a limit: parsed and within 8 bit/s .. 1 tbit/s.
pub fn rate(input: &str) -> Result<u64, LimitError> {
    let bps = parse_rate(input)?;
    let range = |reason: String| LimitError::Range {
        what: "rate",
        input: input.to_owned(),
        reason,
    };
    if bps == 0 {
        return Err(range(
            "zero: a limit needs a positive rate (use \"none\" to remove a limit)".into(),
        ));
    }
    if bps < MIN_RATE_BPS {
        return Err(range(format!("below the smallest rate, {MIN_RATE_BPS}bit")));
    }
    if bps > MAX_RATE_BPS {
        return Err(range(format!(
            "{}: above the largest rate, 1tbit",
            format_rate(bps)
        )));
    }
    Ok(bps)
}

/// A burst for a limit: parsed and within one full-size frame .. 1gb.
pub fn burst(input: &str) -> Result<u64, LimitError> {
    let bytes = parse_size(input)?;
    let range = |reason: String| LimitError::Range {
        what: "burst",
        input: input.to_owned(),
        reason,
    };
    if bytes < MIN_BURST_BYTES {
        return Err(range(format!(
            "{bytes} bytes: below one full-size frame, {MIN_BURST_BYTES}b"
        )));
    }
    if bytes > MAX_BURST_BYTES {
        return Err(range(format!(
            "{}: above the largest burst, 1gb",
            format_size(bytes)
        )));
    }
    Ok(bytes)
}

/// The direction named `dir` (`egress` or `ingress`).
fn direction_of(dir: &str) -> u32 {
    if dir == "ingress" {
        direction::INGRESS
    } else {
        direction::EGRESS
    }
}

/// The limit asked for by a rate and an optional burst (`none` or no rate:
/// unlimited). Without a burst the bucket is [`default_burst`].
pub fn limit(
    dir: &'static str,
    rate_in: Option<&str>,
    burst_in: Option<&str>,
) -> Result<Option<Limit>, LimitError> {
    match (rate_in.map(str::trim), burst_in) {
        (None, None) => Ok(None),
        (None, Some(b)) | (Some(NONE), Some(b)) => Err(LimitError::BurstWithoutRate {
            dir,
            burst: b.to_owned(),
        }),
        (Some(NONE), None) => Ok(None),
        (Some(r), b) => {
            let rate_bps = rate(r)?;
            Ok(Some(match b {
                Some(b) => Limit::given(rate_bps, burst(b)?),
                None => Limit::derived(dir, rate_bps),
            }))
        }
    }
}

/// The limit after an update of `current` with a rate (`none` removes it)
/// and a burst, either of which may be absent (unchanged). A new rate
/// without a burst keeps a burst that was given and derives a new one from
/// the rate otherwise ([`default_burst`]), as for a new limit.
pub fn updated(
    dir: &'static str,
    current: Option<Limit>,
    rate_in: Option<&str>,
    burst_in: Option<&str>,
) -> Result<Option<Limit>, LimitError> {
    match (rate_in.map(str::trim), burst_in, current) {
        (None, None, cur) => Ok(cur),
        (Some(NONE), None, _) => Ok(None),
        (Some(NONE), Some(b), _) | (None, Some(b), None) => Err(LimitError::BurstWithoutRate {
            dir,
            burst: b.to_owned(),
        }),
        (None, Some(b), Some(cur)) => Ok(Some(Limit::given(cur.rate_bps, burst(b)?))),
        (Some(r), b, cur) => {
            let rate_bps = rate(r)?;
            Ok(Some(match (b, cur) {
                (Some(b), _) => Limit::given(rate_bps, burst(b)?),
                (None, Some(cur)) if cur.burst_given => Limit::given(rate_bps, cur.burst_bytes),
                (None, _) => Limit::derived(dir, rate_bps),
            }))
        }
    }
}

/// A rate in the largest tc unit that shows it without a fraction
/// (`10mbit`, `1500kbit`, `12bit`).
pub fn format_rate(bps: u64) -> String {
    for (unit, m) in [
        ("tbit", 1_000_000_000_000u64),
        ("gbit", 1_000_000_000),
        ("mbit", 1_000_000),
        ("kbit", 1_000),
    ] {
        if bps >= m && bps.is_multiple_of(m) {
            return format!("{}{unit}", bps / m);
        }
    }
    format!("{bps}bit")
}

/// A size in the largest tc unit that shows it without a fraction (`64kb`,
/// `1mb`, `1514b`).
pub fn format_size(bytes: u64) -> String {
    for (unit, m) in [("gb", 1u64 << 30), ("mb", 1 << 20), ("kb", 1 << 10)] {
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{unit}", bytes / m);
        }
    }
    format!("{bytes}b")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_use_tc_units() {
        for (input, bps) in [
            ("10mbit", 10_000_000),
            ("10Mbit", 10_000_000),
            ("500kbit", 500_000),
            ("1gbit", 1_000_000_000),
            ("1tbit", 1_000_000_000_000),
            ("1.5mbit", 1_500_000),
            ("800bit", 800),
            ("1000000", 1_000_000),
            ("100bps", 800),
            ("2kbps", 16_000),
            ("1mbps", 8_000_000),
            ("1gbps", 8_000_000_000),
            ("1kibit", 1024),
            ("1mibps", 8 * 1024 * 1024),
            (" 10mbit ", 10_000_000),
        ] {
            assert_eq!(parse_rate(input), Ok(bps), "{input}");
        }
    }

    #[test]
    fn sizes_use_tc_units() {
        for (input, bytes) in [
            ("64kb", 65_536),
            ("64k", 65_536),
            ("1mb", 1 << 20),
            ("1m", 1 << 20),
            ("1gb", 1 << 30),
            ("1514b", 1514),
            ("1514", 1514),
            ("256K", 262_144),
            ("8kbit", 1024),
            ("1.5kb", 1536),
        ] {
            assert_eq!(parse_size(input), Ok(bytes), "{input}");
        }
    }

    #[test]
    fn nonsense_rates_and_sizes_are_refused_with_the_units_to_use() {
        for input in [
            "",
            "mbit",
            "ten",
            "10 furlongs",
            "-5mbit",
            "1e3mbit",
            "1.2.3mbit",
        ] {
            let e = parse_rate(input).expect_err(input).to_string();
            assert!(e.contains("10mbit"), "{input}: {e}");
        }
        let e = parse_size("64 parsecs").expect_err("unit").to_string();
        assert!(e.contains("unknown unit") && e.contains("64kb"), "{e}");
    }

    #[test]
    fn zero_and_absurd_values_are_out_of_range() {
        assert!(
            rate("0mbit")
                .expect_err("zero")
                .to_string()
                .contains("zero")
        );
        assert!(rate("0").is_err());
        assert!(rate("4bit").is_err());
        let e = rate("2tbit").expect_err("absurd").to_string();
        assert!(e.contains("1tbit"), "{e}");
        assert!(rate("99999999999999999999999tbit").is_err());
        assert!(
            burst("2gb")
                .expect_err("absurd")
                .to_string()
                .contains("1gb")
        );
        assert!(
            burst("100b")
                .expect_err("tiny")
                .to_string()
                .contains("1514b")
        );
        assert_eq!(rate("1tbit"), Ok(MAX_RATE_BPS));
        assert_eq!(burst("1gb"), Ok(MAX_BURST_BYTES));
    }

    #[test]
    fn a_limit_without_a_burst_gets_the_default_bucket() {
        assert_eq!(
            limit("egress", Some("10mbit"), None),
            Ok(Some(Limit {
                rate_bps: 10_000_000,
                burst_bytes: default_burst(direction::EGRESS, 10_000_000),
                burst_given: false,
            }))
        );
        assert_eq!(
            limit("egress", Some("10mbit"), Some("64kb")),
            Ok(Some(Limit {
                rate_bps: 10_000_000,
                burst_bytes: 65_536,
                burst_given: true,
            }))
        );
        assert_eq!(limit("ingress", None, None), Ok(None));
        assert_eq!(limit("ingress", Some("none"), None), Ok(None));
        assert!(matches!(
            limit("ingress", None, Some("64kb")),
            Err(LimitError::BurstWithoutRate { .. })
        ));
    }

    #[test]
    fn updates_change_only_what_is_given() {
        let cur = Some(Limit::given(10_000_000, 65_536));
        assert_eq!(updated("egress", cur, None, None), Ok(cur));
        assert_eq!(updated("egress", cur, Some("none"), None), Ok(None));
        assert_eq!(
            updated("egress", cur, Some("100mbit"), None),
            Ok(Some(Limit::given(100_000_000, 65_536)))
        );
        assert_eq!(
            updated("egress", cur, None, Some("1mb")),
            Ok(Some(Limit::given(10_000_000, 1 << 20)))
        );
        assert_eq!(
            updated("egress", None, Some("1gbit"), None),
            Ok(Some(Limit {
                rate_bps: 1_000_000_000,
                burst_bytes: default_burst(direction::EGRESS, 1_000_000_000),
                burst_given: false,
            }))
        );
        assert!(updated("egress", None, None, Some("1mb")).is_err());
        assert!(updated("egress", cur, Some("none"), Some("1mb")).is_err());
        assert!(updated("egress", cur, Some("0"), None).is_err());
    }

    #[test]
    fn a_derived_bucket_follows_an_updated_rate_and_a_given_one_stays() {
        // 20 Mbit/s in: the default bucket (1.25 MB) follows the rate.
        let derived = limit("ingress", Some("20mbit"), None).expect("valid");
        assert_eq!(
            updated("ingress", derived, Some("80mbit"), None),
            Ok(Some(Limit {
                rate_bps: 80_000_000,
                burst_bytes: default_burst(direction::INGRESS, 80_000_000),
                burst_given: false,
            }))
        );
        // Even when the given size equals the default, it was given.
        let default_size = default_burst(direction::INGRESS, 20_000_000);
        let given =
            limit("ingress", Some("20mbit"), Some(&format!("{default_size}b"))).expect("valid");
        assert_eq!(
            updated("ingress", given, Some("80mbit"), None),
            Ok(Some(Limit::given(80_000_000, default_size)))
        );
        // A burst given alone keeps the rate and is kept from then on.
        let resized = updated(
            "egress",
            limit("egress", Some("10mbit"), None).expect("valid"),
            None,
            Some("2mb"),
        );
        assert_eq!(resized, Ok(Some(Limit::given(10_000_000, 2 << 20))));
        assert_eq!(
            updated("egress", resized.expect("valid"), Some("50mbit"), None),
            Ok(Some(Limit::given(50_000_000, 2 << 20)))
        );
    }

    #[test]
    fn limits_saved_before_bursts_were_marked_given_read_as_derived() {
        let l: Limit = serde_json::from_str(r#"{"rate_bps": 8000000, "burst_bytes": 1048576}"#)
            .expect("valid");
        assert_eq!(
            l,
            Limit {
                rate_bps: 8_000_000,
                burst_bytes: 1 << 20,
                burst_given: false,
            }
        );
    }

    #[test]
    fn rates_and_sizes_print_in_tc_units() {
        assert_eq!(format_rate(10_000_000), "10mbit");
        assert_eq!(format_rate(1_500_000), "1500kbit");
        assert_eq!(format_rate(12), "12bit");
        assert_eq!(format_size(65_536), "64kb");
        assert_eq!(format_size(1 << 20), "1mb");
        assert_eq!(format_size(1514), "1514b");
        for r in ["10mbit", "1500kbit", "3gbit", "7bit"] {
            assert_eq!(format_rate(parse_rate(r).expect("valid")), r);
        }
    }
}
