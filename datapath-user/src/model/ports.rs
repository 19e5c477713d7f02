//! Published ports: [`PortMapping`], parsed from Docker's `-p` syntax
//! (`8080:80`, `8080:80/udp`, `198.18.0.2:8080:80`, `8000-8010:8000-8010`);
//! sets of ports in the kernel's syntax ([`PortSet`]).

use std::{fmt, net::Ipv4Addr, str::FromStr};

use datapath_common::proto;
use serde::{Deserialize, Serialize};

/// A bad port specification, with what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The overall shape is wrong.
    #[error(
        "invalid publish spec {spec:?}: expected [HOST_IP:]HOST_PORT[-END]:CONTAINER_PORT[-END][/tcp|/udp]"
    )]
    Shape {
        /// The spec as given.
        spec: String,
    },
    /// A port is not a number in 1..=65535.
    #[error("invalid port {port:?} in {spec:?}: ports are 1-65535")]
    Port {
        /// The offending port text.
        port: String,
        /// The spec as given.
        spec: String,
    },
    /// A range ends before it starts.
    #[error("invalid port range {range:?} in {spec:?}: the end is below the start")]
    Range {
        /// The offending range text.
        range: String,
        /// The spec as given.
        spec: String,
    },
    /// Host and container ranges differ in length.
    #[error(
        "port ranges in {spec:?} differ in length ({host} host ports, {container} container ports); ranges map one-to-one"
    )]
    RangeLength {
        /// The spec as given.
        spec: String,
        /// Number of host ports.
        host: u32,
        /// Number of container ports.
        container: u32,
    },
    /// The protocol is neither TCP nor UDP.
    #[error("invalid protocol {proto:?} in {spec:?}: use tcp or udp")]
    Protocol {
        /// The offending protocol text.
        proto: String,
        /// The spec as given.
        spec: String,
    },
    /// The host address is not an IPv4 address.
    #[error("invalid host address {addr:?} in {spec:?}: expected an IPv4 address")]
    Address {
        /// The offending address text.
        addr: String,
        /// The spec as given.
        spec: String,
    },
}

/// Transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One published port or port range: `host_ip:host_port → container_port`.
/// Deserializing checks what the type cannot say: ports 1-65535, at least
/// one of them, ranges that end within 65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "PortMappingFields")]
pub struct PortMapping {
    /// The host address, or `None` for every node address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    /// First host port.
    pub host_port: u16,
    /// First container port.
    pub container_port: u16,
    /// Number of consecutive ports (1 for a single port).
    #[serde(default = "one")]
    pub count: u16,
    /// Transport protocol.
    pub protocol: Protocol,
}

fn one() -> u16 {
    1
}

/// [`PortMapping`]'s fields as stored, before they are checked.
#[derive(Deserialize)]
struct PortMappingFields {
    #[serde(default)]
    host_ip: Option<Ipv4Addr>,
    host_port: u16,
    container_port: u16,
    #[serde(default = "one")]
    count: u16,
    protocol: Protocol,
}

impl TryFrom<PortMappingFields> for PortMapping {
    type Error = String;

    fn try_from(f: PortMappingFields) -> Result<Self, String> {
        let end = |start: u16| u32::from(start) + u32::from(f.count) - 1;
        if f.count == 0
            || f.host_port == 0
            || f.container_port == 0
            || end(f.host_port) > 65535
            || end(f.container_port) > 65535
        {
            return Err(format!(
                "invalid port mapping: host port {}, container port {}, {} ports: ports are 1-65535",
                f.host_port, f.container_port, f.count
            ));
        }
        Ok(Self {
            host_ip: f.host_ip,
            host_port: f.host_port,
            container_port: f.container_port,
            count: f.count,
            protocol: f.protocol,
        })
    }
}

impl PortMapping {
    /// The `(host port, container port)` pairs this mapping covers.
    pub fn ports(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        (0..self.count).map(|i| (self.host_port + i, self.container_port + i))
    }

    /// The last host port.
    pub fn host_end(&self) -> u16 {
        self.host_port + (self.count - 1)
    }

    /// Whether two mappings claim a common (address, port, protocol). A
    /// mapping on every address overlaps one on a specific address.
    pub fn overlaps(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
            && self.host_port <= other.host_end()
            && other.host_port <= self.host_end()
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        if self.count == 1 {
            write!(f, "{}:{}", self.host_port, self.container_port)?;
        } else {
            write!(
                f,
                "{}-{}:{}-{}",
                self.host_port,
                self.host_end(),
                self.container_port,
                self.container_port + (self.count - 1)
            )?;
        }
        write!(f, "/{}", self.protocol)
    }
}

fn parse_port(text: &str, spec: &str) -> Result<u16, SpecError> {
    match text.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(SpecError::Port {
            port: text.to_owned(),
            spec: spec.to_owned(),
        }),
    }
}

fn parse_range(text: &str, spec: &str) -> Result<(u16, u16), SpecError> {
    match text.split_once('-') {
        None => {
            let p = parse_port(text, spec)?;
            Ok((p, p))
        }
        Some((a, b)) => {
            let (a, b) = (parse_port(a, spec)?, parse_port(b, spec)?);
            if b < a {
                return Err(SpecError::Range {
                    range: text.to_owned(),
                    spec: spec.to_owned(),
                });
            }
            Ok((a, b))
        }
    }
}

impl FromStr for PortMapping {
    type Err = SpecError;

    /// Parses Docker's `-p` syntax: `8080:80`, `8080:80/udp`,
    /// `198.18.0.2:8080:80`, `8000-8010:8000-8010/tcp`.
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let shape = || SpecError::Shape {
            spec: spec.to_owned(),
        };
        let (ports, protocol) = match spec.rsplit_once('/') {
            None => (spec, Protocol::Tcp),
            Some((ports, p)) => (
                ports,
                match p.to_ascii_lowercase().as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    _ => {
                        return Err(SpecError::Protocol {
                            proto: p.to_owned(),
                            spec: spec.to_owned(),
                        });
                    }
                },
            ),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host, container) = match parts.as_slice() {
            [h, c] => (None, *h, *c),
            [ip, h, c] => {
                let addr = ip.parse::<Ipv4Addr>().map_err(|_| SpecError::Address {
                    addr: (*ip).to_owned(),
                    spec: spec.to_owned(),
                })?;
                ((!addr.is_unspecified()).then_some(addr), *h, *c)
            }
            _ => return Err(shape()),
        };
        if host.is_empty() || container.is_empty() {
            return Err(shape());
        }
        let (h0, h1) = parse_range(host, spec)?;
        let (c0, c1) = parse_range(container, spec)?;
        let (hn, cn) = (u32::from(h1 - h0) + 1, u32::from(c1 - c0) + 1);
        if hn != cn {
            return Err(SpecError::RangeLength {
                spec: spec.to_owned(),
                host: hn,
                container: cn,
            });
        }
        Ok(PortMapping {
            host_ip,
            host_port: h0,
            container_port: c0,
            count: hn as u16,
            protocol,
        })
    }
}

/// A set of ports, written as the kernel writes
/// `net.ipv4.ip_local_reserved_ports`: comma-separated ports and ranges in
/// increasing order (`8080,61000-65535`; empty for none).
///
/// A bitmap of all 65,536 ports (8 KiB), like the kernel's own: adding a
/// port is O(1) and the set operations cost the same whatever the set
/// holds, so keeping the reservation in line costs a mapping update no
/// more with 10,000 ports published than with none.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct PortSet(Box<[u64; PORT_WORDS]>);

/// Words of a [`PortSet`]'s bitmap.
const PORT_WORDS: usize = 65_536 / 64;

impl Default for PortSet {
    fn default() -> Self {
        Self(Box::new([0; PORT_WORDS]))
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({self})")
    }
}

impl PortSet {
    /// The ports `lo..=hi`.
    pub fn range(lo: u16, hi: u16) -> Self {
        let mut set = Self::default();
        set.insert_range(lo, hi);
        set
    }

    /// Adds the ports `lo..=hi`.
    fn insert_range(&mut self, lo: u16, hi: u16) {
        for port in lo..=hi {
            self.insert(port);
        }
    }

    /// Adds the ports of `other`.
    pub fn extend(&mut self, other: &Self) {
        for (w, o) in self.0.iter_mut().zip(other.0.iter()) {
            *w |= o;
        }
    }

    /// Adds `port`.
    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port) / 64] |= 1 << (port % 64);
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    /// The ports of this set that are not in `other`.
    pub fn minus(&self, other: &Self) -> Self {
        let mut out = self.clone();
        for (w, o) in out.0.iter_mut().zip(other.0.iter()) {
            *w &= !o;
        }
        out
    }

    /// The ports in both sets.
    pub fn and(&self, other: &Self) -> Self {
        let mut out = self.clone();
        for (w, o) in out.0.iter_mut().zip(other.0.iter()) {
            *w &= o;
        }
        out
    }

    /// Whether the set holds no port.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The set's ports as ranges `(lo, hi)`, in increasing order.
    fn ranges(&self) -> impl Iterator<Item = (u16, u16)> + '_ {
        let mut port: u32 = 0;
        std::iter::from_fn(move || {
            // The next port in the set, skipping empty words whole.
            while port <= u32::from(u16::MAX) {
                let word = self.0[port as usize / 64] >> (port % 64);
                if word == 0 {
                    port = (port / 64 + 1) * 64;
                    continue;
                }
                port += word.trailing_zeros();
                break;
            }
            if port > u32::from(u16::MAX) {
                return None;
            }
            let lo = port;
            while port <= u32::from(u16::MAX) && self.contains(port as u16) {
                port += 1;
            }
            Some((lo as u16, (port - 1) as u16))
        })
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (lo, hi)) in self.ranges().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for PortSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut set = Self::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let port = |p: &str| {
                p.trim()
                    .parse::<u16>()
                    .map_err(|e| format!("port {p:?} in {s:?}: {e}"))
            };
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (port(lo)?, port(hi)?),
                None => (port(part)?, port(part)?),
            };
            if lo > hi {
                return Err(format!("range {part:?} in {s:?} runs backwards"));
            }
            set.insert_range(lo, hi);
        }
        Ok(set)
    }
}

impl From<PortSet> for String {
    fn from(p: PortSet) -> Self {
        p.to_string()
    }
}

impl TryFrom<String> for PortSet {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<PortMapping, SpecError> {
        s.parse()
    }

    #[test]
    fn docker_forms_parse() {
        let m = p("8080:80").expect("valid");
        assert_eq!(
            (
                m.host_ip,
                m.host_port,
                m.container_port,
                m.count,
                m.protocol
            ),
            (None, 8080, 80, 1, Protocol::Tcp)
        );
        assert_eq!(p("5353:53/udp").expect("valid").protocol, Protocol::Udp);
        let m = p("198.18.0.2:9000-9009:9000-9009/tcp").expect("valid");
        assert_eq!(m.host_ip, Some(Ipv4Addr::new(198, 18, 0, 2)));
        assert_eq!(m.count, 10);
        assert_eq!(m.ports().last(), Some((9009, 9009)));
        assert_eq!(p("0.0.0.0:80:80").expect("valid").host_ip, None);
    }

    #[test]
    fn display_round_trips() {
        for s in ["8080:80/tcp", "198.18.0.2:9000-9009:7000-7009/udp"] {
            assert_eq!(p(s).expect("valid").to_string(), s);
        }
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert!(matches!(p("0:80"), Err(SpecError::Port { .. })));
        assert!(matches!(p("70000:80"), Err(SpecError::Port { .. })));
        assert!(matches!(
            p("8000-8010:80-81"),
            Err(SpecError::RangeLength { .. })
        ));
        assert!(matches!(
            p("8010-8000:8010-8000"),
            Err(SpecError::Range { .. })
        ));
        assert!(matches!(p("80:80/sctp"), Err(SpecError::Protocol { .. })));
        assert!(matches!(p("1.2.3:80:80"), Err(SpecError::Address { .. })));
        assert!(matches!(p("80"), Err(SpecError::Shape { .. })));
        assert!(matches!(p(":80"), Err(SpecError::Shape { .. })));
        let msg = p("70000:80").expect_err("invalid").to_string();
        assert!(msg.contains("1-65535"), "{msg}");
    }

    #[test]
    fn overlap_considers_wildcards_ranges_and_protocols() {
        let a = p("8080:80").expect("valid");
        assert!(a.overlaps(&p("198.18.0.2:8080:81").expect("valid")));
        assert!(!a.overlaps(&p("8080:80/udp").expect("valid")));
        assert!(!p("8000-8010:8000-8010").expect("valid").overlaps(&a));
        assert!(p("8000-8080:8000-8080").expect("valid").overlaps(&a));
        assert!(
            !p("198.18.0.2:8080:80")
                .expect("valid")
                .overlaps(&p("198.18.0.3:8080:80").expect("valid"))
        );
    }

    #[test]
    fn port_sets_read_and_write_the_kernels_syntax() {
        let set: PortSet = "8080, 61000-61003,80,8081".parse().expect("valid");
        assert_eq!(set.to_string(), "80,8080-8081,61000-61003");
        assert_eq!("".parse::<PortSet>(), Ok(PortSet::default()));
        assert!("5-3".parse::<PortSet>().is_err());
        assert!("70000".parse::<PortSet>().is_err());
        let ours = PortSet::range(8081, 8082);
        assert_eq!(set.minus(&ours).to_string(), "80,8080,61000-61003");
        assert_eq!(set.and(&ours).to_string(), "8081");
        assert_eq!(PortSet::range(65534, 65535).to_string(), "65534-65535");
        let edges: PortSet = "0,63-64,127,65535".parse().expect("valid");
        assert_eq!(edges.to_string(), "0,63-64,127,65535");
        assert_eq!(PortSet::range(0, 65535).to_string(), "0-65535");
        assert!(PortSet::default().is_empty() && !edges.is_empty());
    }
}
