//! The agent's other command-line values: durations (`30s`, `500ms`, `5m`,
//! `6h`, bare seconds) and port ranges (`61000-65535`). Whatever parses
//! means what an independent reading of the text says; whatever does not
//! is refused with a message quoting it.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use datapath::cli::{parse_duration, parse_port_range};
use libfuzzer_sys::fuzz_target;

/// Values built from their parts.
#[derive(Arbitrary, Debug)]
struct Parts {
    /// A number and a unit, as a user writes a duration.
    n: u64,
    unit: u8,
    /// The two ends of a port range.
    low: u16,
    high: u16,
}

const UNITS: [(&str, u128); 5] = [
    ("", 1000),
    ("s", 1000),
    ("ms", 1),
    ("m", 60_000),
    ("h", 3_600_000),
];

/// Milliseconds `text` stands for, by its own reading: digits, then a unit.
fn expected_ms(text: &str) -> Option<u128> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let n: u128 = num.parse().ok()?;
    if n > u128::from(u64::MAX) {
        return None;
    }
    let (_, factor) = UNITS.iter().find(|(u, _)| *u == unit)?;
    let ms = n * factor;
    (ms <= u128::from(u64::MAX)).then_some(ms)
}

fn duration(text: &str) {
    match (parse_duration(text), expected_ms(text)) {
        (Ok(d), Some(ms)) => assert_eq!(d.as_millis(), ms, "{text:?}"),
        (Err(msg), None) => assert!(msg.contains(&format!("{text:?}")), "{msg}"),
        (got, want) => panic!("{text:?}: parsed {got:?}, expected {want:?} ms"),
    }
}

fn port_range(text: &str) {
    match parse_port_range(text) {
        Ok((a, b)) => {
            assert!(1 <= a && a <= b, "{text:?} gave {a}-{b}");
            assert_eq!(parse_port_range(&format!("{a}-{b}")), Ok((a, b)));
        }
        Err(msg) => assert!(msg.contains(&format!("{text:?}")), "{msg}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        duration(text);
        port_range(text);
    }
    if let Ok(p) = Parts::arbitrary(&mut Unstructured::new(data)) {
        let (u, _) = UNITS[usize::from(p.unit) % UNITS.len()];
        duration(&format!("{}{u}", p.n));
        let text = format!("{}-{}", p.low, p.high);
        let ok = p.low >= 1 && p.low <= p.high;
        assert_eq!(parse_port_range(&text).is_ok(), ok, "{text:?}");
        port_range(&text);
    }
});
