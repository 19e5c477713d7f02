//! Published-port specs (Docker's `-p`): any text either parses to a valid
//! mapping whose normal form (`Display`) parses back to it, or is refused
//! with a message quoting it; and every valid mapping, however it was
//! made, round-trips through its text.
#![no_main]

use std::net::Ipv4Addr;

use arbitrary::{Arbitrary, Unstructured};
use datapath::model::{PortMapping, Protocol};
use libfuzzer_sys::fuzz_target;

/// A mapping built field by field.
#[derive(Arbitrary, Debug)]
struct Fields {
    host_ip: Option<[u8; 4]>,
    host_port: u16,
    container_port: u16,
    count: u16,
    udp: bool,
}

fuzz_target!(|data: &[u8]| {
    // The bytes as what a user types, and as the fields of a mapping.
    if let Ok(text) = std::str::from_utf8(data) {
        text_parses_to_a_valid_mapping_or_says_why(text);
    }
    if let Ok(f) = Fields::arbitrary(&mut Unstructured::new(data)) {
        let m = PortMapping {
            host_ip: f
                .host_ip
                .map(Ipv4Addr::from)
                .filter(|ip| !ip.is_unspecified()),
            host_port: f.host_port,
            container_port: f.container_port,
            count: f.count,
            protocol: if f.udp { Protocol::Udp } else { Protocol::Tcp },
        };
        if is_valid(&m) {
            round_trips(&m, "built");
        }
    }
});

/// Ports 1-65535 and at least one of them, on both sides.
fn is_valid(m: &PortMapping) -> bool {
    let end = |start: u16| u32::from(start) + u32::from(m.count) - 1;
    m.count >= 1
        && m.host_port >= 1
        && m.container_port >= 1
        && end(m.host_port) <= 65535
        && end(m.container_port) <= 65535
}

fn round_trips(m: &PortMapping, origin: &str) {
    let shown = m.to_string();
    assert_eq!(
        shown.parse::<PortMapping>().as_ref(),
        Ok(m),
        "{origin} {m:?} shows as {shown:?}"
    );
    assert_eq!(m.ports().count(), usize::from(m.count));
    assert_eq!(m.ports().last().map(|(h, _)| h), Some(m.host_end()));
    assert!(m.overlaps(m));
}

fn text_parses_to_a_valid_mapping_or_says_why(text: &str) {
    match text.parse::<PortMapping>() {
        Ok(m) => {
            assert!(is_valid(&m), "{text:?} parsed to an invalid {m:?}");
            round_trips(&m, &format!("{text:?} parsed to"));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{text:?}")),
                "the error quotes the spec: {msg}"
            );
        }
    }
}
