//! A corpus of malformed and unusual frames run through every program
//! (`uplink_tc`, `uplink_xdp`, `container_tc`) with `BPF_PROG_TEST_RUN`,
//! each judged against an oracle: a model of the documented parsing rules
//! (`datapath-ebpf/src/parse.rs`) written here from the rules, not from the
//! code:
//!
//! * not IPv4 (ARP, IPv6 with or without extension headers, VLAN-tagged,
//!   frames too short for an Ethernet header): passed untouched;
//! * a header the kernel itself would drop (IHL < 5, total length below the
//!   header or beyond the frame, TCP data offset < 5, L4 header cut short):
//!   dropped, `drop_malformed`;
//! * a first fragment is judged like a whole packet (its L4 header must be
//!   whole: else it is malformed); a later fragment takes its ports from
//!   the fragment table (where its first fragment left them when it was
//!   translated) and follows its flow; without them it is passed, or
//!   dropped (`drop_fragment`) from a container when it would leave
//!   masqueraded;
//! * otherwise the translation rules (published port, conntrack, TTL,
//!   direct routing, anti-spoofing, masquerade, which TCP segments may
//!   start a flow).
//!
//! For every frame: the verdict is the oracle's; a passed frame is
//! byte-identical to the input; a translated one differs only in the fields
//! translation rewrites, to the values of its conntrack entry, with valid
//! checksums if the input's were; exactly the expected counter moved; and
//! no frame that is not translated leaves conntrack state behind.
//! `packet_edge.rs` has the single, hand-checked cases; this file sweeps.

use std::{collections::BTreeMap, fmt};

use datapath_common::{
    CONFIG_F_SNAT, Config, CtKey, FragKey, Stat, ct_action,
    policy::{ICMP_REDIRECT, martian_source},
    programs::{CONTAINER_TC, UPLINK_TC, UPLINK_XDP},
    proto,
};
use datapath_tests::{
    frame::Frame,
    packet::{changed_offsets, hex, verify_checksums},
    programs::{
        Programs, SkBuff, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    },
    testbed,
};

const NODE: [u8; 4] = testbed::NODE;
const POOL: [u8; 4] = testbed::POOL;
const BACKEND: [u8; 4] = testbed::CTR.addr;
const CTR_IFINDEX: u32 = testbed::CTR.ifindex;
const CTR_MAC: [u8; 6] = testbed::CTR.mac;
const HOST_MAC: [u8; 6] = testbed::CTR.host_mac;
/// Published ports: (host port, protocol) → container port.
const PUBLISHED: [(u16, u8, u16); 2] = [
    (
        testbed::TCP_PUBLISHED.0,
        proto::TCP,
        testbed::TCP_PUBLISHED.1,
    ),
    (
        testbed::UDP_PUBLISHED.0,
        proto::UDP,
        testbed::UDP_PUBLISHED.1,
    ),
];

const ETH: usize = 14;

// ---- the programs ------------------------------------------------------------

/// Which program a frame runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    UplinkTc,
    UplinkXdp,
    ContainerTc,
}

impl Hook {
    const ALL: [Hook; 3] = [Hook::UplinkTc, Hook::UplinkXdp, Hook::ContainerTc];

    fn is_uplink(self) -> bool {
        self != Hook::ContainerTc
    }
}

/// What the oracle expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Passed untouched.
    Pass,
    /// Dropped, counting this.
    Drop(Stat),
    /// Passed untouched, but counted as not forwarded: a container's packet
    /// whose TTL expires here goes to the node's stack, which answers time
    /// exceeded as a router does.
    PassCounted(Stat),
    /// Translated by conntrack: a new or existing flow, or an ICMP error
    /// about one.
    Translate,
}

/// A frame as the oracle reads it.
#[derive(Clone, Copy, Debug)]
enum Model {
    NotOurs,
    Malformed,
    /// A later fragment: the key without ports, and the IP id.
    Later {
        key: CtKey,
        id: u16,
        ttl: u8,
    },
    Flow {
        key: CtKey,
        ttl: u8,
        /// TCP flags (0 for other protocols).
        flags: u8,
        /// An ICMP error (destination unreachable, time exceeded): the
        /// key of the flow it is about, if it quotes one.
        icmp_error: Option<Option<CtKey>>,
    },
}

/// Whether a TCP segment with `flags` may start a flow: SYN without ACK,
/// or (loose pickup) an ACK without SYN; never with RST or FIN.
fn may_create(k: &CtKey, flags: u8) -> bool {
    let (syn, ack, rst, fin) = (
        flags & 2 != 0,
        flags & 0x10 != 0,
        flags & 4 != 0,
        flags & 1 != 0,
    );
    k.proto != proto::TCP || (!rst && !fin && syn != ack)
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn key(saddr: &[u8], daddr: &[u8], sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey::v4(
        [saddr[0], saddr[1], saddr[2], saddr[3]],
        sport,
        [daddr[0], daddr[1], daddr[2], daddr[3]],
        dport,
        proto,
    )
}

/// The tuple of the packet an ICMP error at L4 offset `l4` quotes, by the
/// same rules: a version-4 header of at least 20 bytes and 8 bytes of TCP,
/// UDP or ICMP echo after it, all inside the frame.
fn model_quoted(f: &[u8], l4: usize) -> Option<CtKey> {
    let ip = l4 + 8;
    if f.len() < ip + 20 || f[ip] >> 4 != 4 || usize::from(f[ip] & 0xf) * 4 < 20 {
        return None;
    }
    let ql4 = ip + usize::from(f[ip] & 0xf) * 4;
    if f.len() < ql4 + 8 {
        return None;
    }
    let (s, d) = (&f[ip + 12..ip + 16], &f[ip + 16..ip + 20]);
    match f[ip + 9] {
        p @ (proto::TCP | proto::UDP) => Some(key(s, d, be16(f, ql4), be16(f, ql4 + 2), p)),
        proto::ICMP => match f[ql4] {
            8 => Some(key(s, d, be16(f, ql4 + 4), 0, proto::ICMP)),
            0 => Some(key(s, d, 0, be16(f, ql4 + 4), proto::ICMP)),
            _ => None,
        },
        _ => None,
    }
}

/// Reads a frame by the documented rules.
fn model(f: &[u8]) -> Model {
    if f.len() < ETH || be16(f, 12) != 0x0800 {
        return Model::NotOurs;
    }
    if f.len() < ETH + 20 {
        return Model::Malformed;
    }
    let ip = &f[ETH..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || ihl < 20 || tot < ihl || ETH + tot > f.len() {
        return Model::Malformed;
    }
    let frags = be16(ip, 6);
    let (more, offset) = (frags & 0x2000 != 0, frags & 0x1fff);
    let l4 = ETH + ihl;
    let l4_len = tot - ihl;
    let proto = ip[9];
    let hdr = match proto {
        proto::TCP => 20,
        proto::UDP | proto::ICMP => 8,
        _ => return Model::NotOurs,
    };
    let (s, d) = (&ip[12..16], &ip[16..20]);
    if offset != 0 {
        return Model::Later {
            key: key(s, d, 0, 0, proto),
            id: be16(ip, 4),
            ttl: ip[8],
        };
    }
    if l4_len < hdr {
        return Model::Malformed;
    }
    let mut icmp_error = None;
    let mut flags = 0;
    let k = match proto {
        proto::TCP => {
            if usize::from(f[l4 + 12] >> 4) * 4 < 20 {
                return Model::Malformed;
            }
            flags = f[l4 + 13];
            key(s, d, be16(f, l4), be16(f, l4 + 2), proto)
        }
        proto::UDP => key(s, d, be16(f, l4), be16(f, l4 + 2), proto),
        _ => match f[l4] {
            8 => key(s, d, be16(f, l4 + 4), 0, proto),
            0 => key(s, d, 0, be16(f, l4 + 4), proto),
            3 | 11 => {
                icmp_error = Some(model_quoted(f, l4));
                key(s, d, 0, 0, proto)
            }
            _ => return Model::NotOurs,
        },
    };
    let _ = more;
    Model::Flow {
        key: k,
        ttl: ip[8],
        flags,
        icmp_error,
    }
}

/// Whether the kernel runs a program on `f` under `BPF_PROG_TEST_RUN`: not
/// on less than an Ethernet header, and (Linux 6.18) not under TC on an
/// IPv4 or IPv6 frame without a whole IP header. Such frames are then only
/// seen under XDP, which runs on anything from 14 bytes.
fn runnable(hook: Hook, f: &[u8]) -> bool {
    if f.len() < ETH {
        return false;
    }
    match (hook, be16(f, 12)) {
        (Hook::UplinkXdp, _) => true,
        (_, 0x0800) => f.len() >= ETH + 20,
        (_, 0x86dd) => f.len() >= ETH + 40,
        _ => true,
    }
}

/// A datapath configured like a node with one container (198.19.0.5,
/// id 3, behind ifindex 7) publishing 8080/tcp → 80 and 5353/udp → 53.
struct Datapath {
    p: Programs,
    config: Config,
}

impl Datapath {
    fn new() -> Self {
        Self {
            p: testbed::datapath(),
            config: testbed::config(),
        }
    }

    fn published(&self, k: &CtKey) -> bool {
        (k.proto == proto::TCP || k.proto == proto::UDP)
            && k.daddr == NODE
            && PUBLISHED
                .iter()
                .any(|&(hp, l4, _)| hp == k.dport && l4 == k.proto)
    }

    fn in_pool(&self, a: [u8; 4]) -> bool {
        a[..3] == POOL[..3]
    }

    /// The drop reason the checks made from a valid IPv4 header alone give
    /// `f` on `hook`, before any protocol parsing: on the uplink, martian
    /// and spoofed sources and container addresses as destination; from
    /// the container, ICMP redirects. (The datapath checks a node address
    /// as source after the conntrack lookup, skipping it for established
    /// flows; no flow ever has one, so the verdict is the same.)
    fn guarded(&self, hook: Hook, f: &[u8]) -> Option<Stat> {
        if f.len() < ETH + 20 || be16(f, 12) != 0x0800 {
            return None;
        }
        let ip = &f[ETH..];
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let tot = usize::from(be16(ip, 2));
        if ip[0] >> 4 != 4 || ihl < 20 || tot < ihl || ETH + tot > f.len() {
            return None;
        }
        let s = [ip[12], ip[13], ip[14], ip[15]];
        let d = [ip[16], ip[17], ip[18], ip[19]];
        let node = |a: [u8; 4]| a == NODE || a == self.config.gateway_addr;
        if hook.is_uplink() {
            if martian_source(s, d, false) {
                Some(Stat::DropMartian)
            } else if self.in_pool(s) || node(s) {
                Some(Stat::DropUplinkSpoofed)
            } else if self.in_pool(d) && !node(d) {
                Some(Stat::DropDirectRouting)
            } else {
                None
            }
        } else {
            let first = be16(ip, 6) & 0x1fff == 0;
            let redirect =
                ip[9] == proto::ICMP && first && tot >= ihl + 8 && ip[ihl] == ICMP_REDIRECT;
            redirect.then_some(Stat::DropRedirect)
        }
    }

    /// What a frame with a malformed L4 header gets: dropped as malformed
    /// unless the checks of its IP header dropped it first.
    fn malformed(&self, hook: Hook, f: &[u8]) -> Expect {
        Expect::Drop(self.guarded(hook, f).unwrap_or(Stat::DropMalformed))
    }

    /// Whether a container's packet to `dst` leaves masqueraded.
    fn masqueraded(&self, dst: [u8; 4]) -> bool {
        self.config.flags & CONFIG_F_SNAT != 0
            && !self.in_pool(dst)
            && dst != self.config.gateway_addr
            && dst != NODE
    }

    /// The oracle's verdict for `f` on `hook`, given the conntrack table as
    /// it is now.
    fn expect(&mut self, hook: Hook, f: &[u8]) -> Expect {
        let tracked = |p: &mut Programs, k: &CtKey| p.conntrack_get(k);
        if let Some(stat) = self.guarded(hook, f) {
            return Expect::Drop(stat);
        }
        let m = model(f);
        // A container may send IPv4 only from its own address and MAC,
        // whatever the packet: the node would route what is passed.
        let ipv4 = f.len() >= ETH && be16(f, 12) == 0x0800;
        if !hook.is_uplink()
            && ipv4
            && !matches!(m, Model::Malformed)
            && (f[ETH + 12..ETH + 16] != BACKEND || f[6..12] != CTR_MAC)
        {
            return Expect::Drop(Stat::DropSpoofed);
        }
        match m {
            Model::NotOurs => Expect::Pass,
            Model::Malformed => Expect::Drop(Stat::DropMalformed),
            Model::Later { key: k, id, ttl } => {
                let ours: &[u8] = if hook.is_uplink() {
                    &[ct_action::DNAT, ct_action::REV_SNAT]
                } else {
                    &[ct_action::REV_DNAT, ct_action::SNAT]
                };
                let frag = self.p.frag_get(&FragKey {
                    saddr: k.saddr,
                    daddr: k.daddr,
                    id: u32::from(id),
                    proto: k.proto,
                    _pad: [0; 3],
                });
                let Some(frag) = frag else {
                    return if !hook.is_uplink() && self.masqueraded(k.daddr) {
                        Expect::Drop(Stat::DropFragment)
                    } else {
                        Expect::Pass
                    };
                };
                let k = CtKey {
                    sport: frag.sport,
                    dport: frag.dport,
                    ..k
                };
                match tracked(&mut self.p, &k) {
                    Some(e) if ours.contains(&e.action) && ttl <= 1 => {
                        if hook.is_uplink() {
                            Expect::Drop(Stat::DropTtlExceeded)
                        } else {
                            Expect::PassCounted(Stat::DropTtlExceeded)
                        }
                    }
                    Some(e) if ours.contains(&e.action) => Expect::Translate,
                    Some(_) => Expect::Pass,
                    None if !hook.is_uplink() && self.masqueraded(k.daddr) => {
                        Expect::Drop(Stat::DropNoFlow)
                    }
                    None => Expect::Pass,
                }
            }
            Model::Flow {
                key: k,
                ttl,
                flags,
                icmp_error,
            } => {
                let ours: &[u8] = if hook.is_uplink() {
                    &[ct_action::DNAT, ct_action::REV_SNAT]
                } else {
                    &[ct_action::REV_DNAT, ct_action::SNAT]
                };
                if let Some(quoted) = icmp_error {
                    let entry = quoted.and_then(|q| tracked(&mut self.p, &q.reversed()));
                    return match entry {
                        Some(e) if ours.contains(&e.action) && ttl <= 1 => {
                            Expect::Drop(Stat::DropTtlExceeded)
                        }
                        Some(e) if ours.contains(&e.action) => Expect::Translate,
                        _ => Expect::Pass,
                    };
                }
                let ttl_expired = if hook.is_uplink() {
                    Expect::Drop(Stat::DropTtlExceeded)
                } else {
                    Expect::PassCounted(Stat::DropTtlExceeded)
                };
                if let Some(e) = tracked(&mut self.p, &k) {
                    return if ttl <= 1 {
                        ttl_expired
                    } else if ours.contains(&e.action) {
                        Expect::Translate
                    } else {
                        Expect::Pass
                    };
                }
                if hook.is_uplink() {
                    if self.published(&k) {
                        return if ttl <= 1 {
                            Expect::Drop(Stat::DropTtlExceeded)
                        } else if !may_create(&k, flags) {
                            // The node answers for the port itself.
                            Expect::Pass
                        } else {
                            Expect::Translate
                        };
                    }
                    if self.in_pool(k.daddr) && k.daddr == BACKEND {
                        return Expect::Drop(Stat::DropDirectRouting);
                    }
                    return Expect::Pass;
                }
                if !self.masqueraded(k.daddr) {
                    Expect::Pass
                } else if ttl <= 1 {
                    ttl_expired
                } else if !may_create(&k, flags) {
                    // It would leave with the pool address.
                    Expect::Drop(Stat::DropNoFlow)
                } else {
                    Expect::Translate
                }
            }
        }
    }

    /// Runs `f` through `hook`; `None` if the kernel refuses to run it.
    fn run(&mut self, hook: Hook, f: &[u8]) -> Option<(u32, Vec<u8>)> {
        let r = match hook {
            Hook::UplinkTc => self.p.try_run_tc(UPLINK_TC, f, None),
            Hook::UplinkXdp => self.p.try_run_xdp(UPLINK_XDP, f),
            Hook::ContainerTc => {
                self.p
                    .try_run_tc(CONTAINER_TC, f, Some(&SkBuff::ingress(CTR_IFINDEX)))
            }
        };
        match r {
            Ok(r) => Some((r.verdict, r.data)),
            Err(_) if !runnable(hook, f) => None,
            Err(e) => panic!("{hook:?} on {} bytes: {e}\n{}", f.len(), hex(f)),
        }
    }

    fn counters(&mut self) -> BTreeMap<&'static str, u64> {
        Stat::ALL
            .iter()
            .map(|&s| (s.name(), self.p.stat(s)))
            .collect()
    }

    /// Runs `f` through `hook` and checks it against the oracle; returns
    /// what the oracle expected.
    #[track_caller]
    fn check(&mut self, hook: Hook, what: &dyn fmt::Display, f: &[u8]) -> Expect {
        let expect = self.expect(hook, f);
        let ct_before = self.p.conntrack().len();
        let before = self.counters();
        let Some((verdict, out)) = self.run(hook, f) else {
            return expect;
        };
        let after = self.counters();
        let delta: BTreeMap<&str, u64> = after
            .iter()
            .map(|(k, v)| (*k, v - before[k]))
            .filter(|(_, d)| *d != 0)
            .collect();
        let ctx = || {
            format!(
                "{what} through {hook:?} ({} bytes): expected {expect:?}, verdict {verdict}, \
                 counters moved {delta:?}\ninput:  {}\noutput: {}",
                f.len(),
                hex(f),
                hex(&out)
            )
        };
        let (pass, drop, redirect) = match hook {
            Hook::UplinkXdp => (XDP_PASS, XDP_DROP, XDP_REDIRECT),
            _ => (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT),
        };
        match expect {
            Expect::Pass => {
                assert_eq!(verdict, pass, "{}", ctx());
                assert_eq!(out, f, "a passed frame is untouched: {}", ctx());
                let counted: &[&str] = if hook.is_uplink() {
                    &[Stat::Passed.name()]
                } else {
                    &[]
                };
                assert_eq!(
                    delta.keys().copied().collect::<Vec<_>>(),
                    counted,
                    "{}",
                    ctx()
                );
            }
            Expect::PassCounted(stat) => {
                assert_eq!(verdict, pass, "{}", ctx());
                assert_eq!(out, f, "a passed frame is untouched: {}", ctx());
                assert_eq!(
                    delta,
                    BTreeMap::from([(stat.name(), 1)]),
                    "exactly the reason is counted: {}",
                    ctx()
                );
            }
            Expect::Drop(stat) => {
                assert_eq!(verdict, drop, "{}", ctx());
                assert_eq!(
                    delta,
                    BTreeMap::from([(stat.name(), 1)]),
                    "exactly the drop reason is counted: {}",
                    ctx()
                );
            }
            Expect::Translate => {
                assert_eq!(verdict, redirect, "{}", ctx());
                assert!(
                    delta
                        .keys()
                        .all(|k| !k.starts_with("drop_") && *k != Stat::Passed.name()),
                    "a translated frame counts no drop and no pass: {}",
                    ctx()
                );
                self.check_translation(hook, f, &out, &ctx);
            }
        }
        if expect != Expect::Translate {
            assert_eq!(
                self.p.conntrack().len(),
                ct_before,
                "a frame that is not translated creates no flow: {}",
                ctx()
            );
        }
        expect
    }

    /// A translated frame differs from its input only where translation
    /// writes (MACs under XDP, TTL, addresses, ports or ICMP id, checksums),
    /// carries its conntrack entry's address and port, and has valid
    /// checksums if the input had.
    fn check_translation(&mut self, hook: Hook, f: &[u8], out: &[u8], ctx: &dyn Fn() -> String) {
        assert_eq!(out.len(), f.len(), "length kept: {}", ctx());
        if verify_checksums(f).is_ok() {
            verify_checksums(out)
                .unwrap_or_else(|e| panic!("valid checksums stay valid ({e}): {}", ctx()));
        }
        assert_eq!(out[ETH + 8], f[ETH + 8] - 1, "TTL decremented: {}", ctx());
        let (k, icmp_error) = match model(f) {
            Model::Flow {
                key, icmp_error, ..
            } => (key, icmp_error),
            Model::Later { key, id, .. } => {
                let frag = self
                    .p
                    .frag_get(&FragKey {
                        saddr: key.saddr,
                        daddr: key.daddr,
                        id: u32::from(id),
                        proto: key.proto,
                        _pad: [0; 3],
                    })
                    .unwrap_or_else(|| panic!("a translated fragment is known: {}", ctx()));
                let k = CtKey {
                    sport: frag.sport,
                    dport: frag.dport,
                    ..key
                };
                let entry = self
                    .p
                    .conntrack_get(&k)
                    .unwrap_or_else(|| panic!("a translated flow is tracked: {}", ctx()));
                let addr_off = if hook.is_uplink() { ETH + 16 } else { ETH + 12 };
                assert_eq!(out[addr_off..addr_off + 4], entry.nat_addr, "{}", ctx());
                let mut allowed = vec![ETH + 8, ETH + 10, ETH + 11];
                allowed.extend(addr_off..addr_off + 4);
                if hook == Hook::UplinkXdp {
                    allowed.extend(0..12);
                }
                let stray: Vec<usize> = changed_offsets(f, out)
                    .into_iter()
                    .filter(|i| !allowed.contains(i))
                    .collect();
                assert!(
                    stray.is_empty(),
                    "a later fragment has only its address rewritten, not {stray:?}: {}",
                    ctx()
                );
                return;
            }
            _ => panic!("only flows translate: {}", ctx()),
        };
        if icmp_error.is_some() {
            // ICMP errors rewrite the quoted packet too: packet_icmp_error.rs
            // checks them byte by byte.
            return;
        }
        let entry = self
            .p
            .conntrack_get(&k)
            .unwrap_or_else(|| panic!("a translated flow is tracked: {}", ctx()));
        let ihl = usize::from(f[ETH] & 0xf) * 4;
        let l4 = ETH + ihl;
        let source = !hook.is_uplink();
        let (addr_off, port_off) = match (k.proto, source) {
            (proto::ICMP, true) => (ETH + 12, l4 + 4),
            (proto::ICMP, false) => (ETH + 16, l4 + 4),
            (_, true) => (ETH + 12, l4),
            (_, false) => (ETH + 16, l4 + 2),
        };
        let csum_off = match k.proto {
            proto::TCP => l4 + 16,
            proto::UDP => l4 + 6,
            _ => l4 + 2,
        };
        assert_eq!(out[addr_off..addr_off + 4], entry.nat_addr, "{}", ctx());
        assert_eq!(be16(out, port_off), entry.nat_port, "{}", ctx());
        let mut allowed = vec![ETH + 8, ETH + 10, ETH + 11, csum_off, csum_off + 1];
        allowed.extend(addr_off..addr_off + 4);
        allowed.extend(port_off..port_off + 2);
        if hook == Hook::UplinkXdp {
            allowed.extend(0..12);
            assert_eq!(out[0..6], CTR_MAC, "{}", ctx());
            assert_eq!(out[6..12], HOST_MAC, "{}", ctx());
        }
        let stray: Vec<usize> = changed_offsets(f, out)
            .into_iter()
            .filter(|i| !allowed.contains(i))
            .collect();
        assert!(
            stray.is_empty(),
            "bytes changed outside translation at {stray:?}: {}",
            ctx()
        );
    }
}

/// One fresh datapath per program, so that each program's conntrack holds
/// only its own flows.
fn datapaths() -> [(Hook, Datapath); 3] {
    Hook::ALL.map(|h| (h, Datapath::new()))
}

// ---- frames --------------------------------------------------------------------

/// A SYN from the client to the published TCP port.
fn uplink_syn() -> Vec<u8> {
    Frame::tcp("198.18.0.1:40000", "198.18.0.2:8080").build()
}

/// A datagram from the client to the published UDP port.
fn uplink_udp() -> Vec<u8> {
    Frame::udp("198.18.0.1:4000", "198.18.0.2:5353")
        .payload(vec![0x5a; 32])
        .build()
}

/// A SYN from the container to the outside (masqueraded).
fn container_syn() -> Vec<u8> {
    Frame::tcp("198.19.0.5:40000", "198.18.0.1:9000")
        .macs(CTR_MAC, HOST_MAC)
        .build()
}

/// A datagram from the container to the outside (masqueraded).
fn container_udp() -> Vec<u8> {
    Frame::udp("198.19.0.5:5000", "198.18.0.1:9001")
        .macs(CTR_MAC, HOST_MAC)
        .payload(vec![0xa5; 24])
        .build()
}

/// Every base frame, with the program it is meant for.
fn base_frames() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("uplink SYN", uplink_syn()),
        ("uplink UDP", uplink_udp()),
        ("container SYN", container_syn()),
        ("container UDP", container_udp()),
    ]
}

/// Recomputes the IPv4 header checksum of frame `f` (IPv4 at `ETH`) over
/// `ihl` bytes, as far as the frame holds them.
fn fix_ip_csum(f: &mut [u8]) {
    let ihl = usize::from(f[ETH] & 0xf) * 4;
    let end = (ETH + ihl.max(20)).min(f.len());
    f[ETH + 10] = 0;
    f[ETH + 11] = 0;
    let c = datapath_common::csum::checksum(&f[ETH..end]);
    f[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
}

/// Sets the IPv4 total length and fixes the header checksum.
fn with_tot_len(mut f: Vec<u8>, tot: u16) -> Vec<u8> {
    f[ETH + 2..ETH + 4].copy_from_slice(&tot.to_be_bytes());
    fix_ip_csum(&mut f);
    f
}

struct Label(String);

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn label(s: impl Into<String>) -> Label {
    Label(s.into())
}

// ---- tests -----------------------------------------------------------------------

#[test]
fn every_truncation_of_a_valid_frame_is_passed_or_dropped_never_translated() {
    let mut dps = datapaths();
    for (name, full) in base_frames() {
        for len in 0..full.len() {
            let cut = &full[..len];
            for (hook, dp) in &mut dps {
                let e = dp.check(*hook, &label(format!("{name} cut to {len}")), cut);
                assert_ne!(e, Expect::Translate, "{name} cut to {len} on {hook:?}");
            }
        }
        // The whole frame is the control: it translates on its own program.
        let own = if name.starts_with("uplink") {
            [Hook::UplinkTc, Hook::UplinkXdp].as_slice()
        } else {
            [Hook::ContainerTc].as_slice()
        };
        for (hook, dp) in &mut dps {
            let e = dp.check(*hook, &label(format!("{name} whole")), &full);
            assert_eq!(
                e == Expect::Translate,
                own.contains(hook),
                "{name} on {hook:?}"
            );
        }
    }
}

#[test]
fn frames_cut_at_every_byte_with_consistent_lengths_are_judged_by_the_rules() {
    // The IPv4 total length follows the cut, so the IP header is valid and
    // only the L4 header is short: dropped unless whole.
    let mut dps = datapaths();
    let mut malformed = 0;
    for (name, full) in base_frames() {
        for len in ETH + 20..full.len() {
            let cut = with_tot_len(full[..len].to_vec(), (len - ETH) as u16);
            for (hook, dp) in &mut dps {
                let what = label(format!("{name} cut to {len}, total length {}", len - ETH));
                if dp.check(*hook, &what, &cut) == dp.malformed(*hook, &cut) {
                    malformed += 1;
                }
            }
        }
    }
    // TCP: 20 cuts inside the header, UDP: 8, on each of three programs
    // (the container's anti-spoofing sees only whole headers).
    assert!(malformed >= 2 * (20 + 8) * 3, "{malformed} drops");
}

#[test]
fn ipv4_headers_with_a_bad_ihl_are_dropped_as_malformed() {
    let mut dps = datapaths();
    for (name, full) in base_frames() {
        for ihl in 0..5u8 {
            let mut f = full.clone();
            f[ETH] = 0x40 | ihl;
            fix_ip_csum(&mut f);
            for (hook, dp) in &mut dps {
                let e = dp.check(*hook, &label(format!("{name} IHL {ihl}")), &f);
                assert_eq!(e, Expect::Drop(Stat::DropMalformed));
            }
        }
        // An IHL claiming options the packet does not have: the L4 header
        // is read further on, or is beyond the total length.
        for ihl in 6..16u8 {
            let mut f = full.clone();
            f[ETH] = 0x40 | ihl;
            fix_ip_csum(&mut f);
            for (hook, dp) in &mut dps {
                dp.check(
                    *hook,
                    &label(format!("{name} IHL {ihl} without options")),
                    &f,
                );
            }
        }
        for version in [0u8, 5, 6, 15] {
            let mut f = full.clone();
            f[ETH] = (version << 4) | 5;
            fix_ip_csum(&mut f);
            for (hook, dp) in &mut dps {
                let e = dp.check(*hook, &label(format!("{name} IP version {version}")), &f);
                assert_eq!(e, Expect::Drop(Stat::DropMalformed));
            }
        }
    }
}

#[test]
fn ipv4_options_of_every_length_are_skipped_and_translated() {
    let mut dps = datapaths();
    for words in 1..=10usize {
        // NOPs, then end of options.
        let mut opts = vec![1u8; words * 4];
        opts[words * 4 - 1] = 0;
        let frames = [
            (
                "uplink SYN",
                Frame::tcp("198.18.0.1:40001", "198.18.0.2:8080")
                    .ipv4_options(&opts)
                    .build(),
            ),
            (
                "uplink UDP",
                Frame::udp("198.18.0.1:4001", "198.18.0.2:5353")
                    .ipv4_options(&opts)
                    .payload(vec![1; 9])
                    .build(),
            ),
            (
                "container SYN",
                Frame::tcp("198.19.0.5:40001", "198.18.0.1:9000")
                    .macs(CTR_MAC, HOST_MAC)
                    .ipv4_options(&opts)
                    .build(),
            ),
        ];
        for (name, f) in frames {
            for (hook, dp) in &mut dps {
                let e = dp.check(
                    *hook,
                    &label(format!("{name} with {} bytes of options", words * 4)),
                    &f,
                );
                let own = name.starts_with("uplink") == hook.is_uplink();
                assert_eq!(e == Expect::Translate, own, "{name} on {hook:?}");
            }
        }
    }
}

#[test]
fn total_lengths_shorter_or_longer_than_the_frame_are_judged_by_the_rules() {
    let mut dps = datapaths();
    for (name, full) in base_frames() {
        let real = full.len() - ETH;
        for tot in (0..=real + 8).chain([0xffff]) {
            let f = with_tot_len(full.clone(), tot as u16);
            let mut outcomes = Vec::new();
            for (hook, dp) in &mut dps {
                outcomes.push(dp.check(*hook, &label(format!("{name} total length {tot}")), &f));
            }
            if tot > real || tot < 20 {
                assert!(
                    outcomes
                        .iter()
                        .all(|e| *e == Expect::Drop(Stat::DropMalformed)),
                    "{name} total length {tot}: {outcomes:?}"
                );
            }
        }
        // Ethernet padding after a correct total length is translated and
        // kept (the frame is longer than the packet).
        let mut padded = full.clone();
        padded.extend_from_slice(&[0; 18]);
        for (hook, dp) in &mut dps {
            dp.check(*hook, &label(format!("{name} padded")), &padded);
        }
    }
}

#[test]
fn tcp_data_offsets_below_five_are_dropped_as_malformed() {
    let mut dps = datapaths();
    for (name, full) in [
        ("uplink SYN", uplink_syn()),
        ("container SYN", container_syn()),
    ] {
        for doff in 0..16u8 {
            let mut f = full.clone();
            let l4 = ETH + 20;
            f[l4 + 12] = (doff << 4) | (f[l4 + 12] & 0x0f);
            for (hook, dp) in &mut dps {
                let e = dp.check(*hook, &label(format!("{name} data offset {doff}")), &f);
                if doff < 5 {
                    // Parsed, and judged, before anything else is looked at.
                    assert_eq!(e, dp.malformed(*hook, &f), "{name} {doff}");
                }
            }
        }
    }
}

/// `f` with an 802.1Q (or 802.1ad) tag of ethertype `tpid` inserted after
/// the MAC addresses.
fn tagged(f: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut out = f[..12].to_vec();
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&f[12..]);
    out
}

#[test]
fn vlan_tagged_frames_pass_untouched() {
    let mut dps = datapaths();
    for (name, full) in base_frames() {
        let frames = [
            ("802.1Q VLAN 5", tagged(&full, 0x8100, 5)),
            ("802.1Q priority tag", tagged(&full, 0x8100, 0)),
            ("802.1ad", tagged(&full, 0x88a8, 100)),
            (
                "802.1ad + 802.1Q",
                tagged(&tagged(&full, 0x8100, 5), 0x88a8, 100),
            ),
        ];
        for (tag, f) in frames {
            for (hook, dp) in &mut dps {
                let e = dp.check(*hook, &label(format!("{name}, {tag}")), &f);
                assert_eq!(e, Expect::Pass);
            }
        }
    }
}

/// An IPv6 frame whose TCP segment to port 8080 follows the extension
/// headers `chain` (next-header numbers, each 8 bytes long).
fn ipv6_with_extensions(chain: &[u8]) -> Vec<u8> {
    let plain = Frame::tcp("[2001:db8::1]:40000", "[2001:db8::2]:8080").build();
    let (head, tcp) = plain.split_at(ETH + 40);
    let mut f = head.to_vec();
    let mut exts = Vec::new();
    for (i, _) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(proto::TCP);
        // Next header, length 0 (8 bytes), then padding (PadN / zeroes;
        // for the fragment header: offset 0, M = 0, an identification).
        exts.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    let first = chain.first().copied().unwrap_or(proto::TCP);
    f[ETH + 6] = first;
    let payload_len = (exts.len() + tcp.len()) as u16;
    f[ETH + 4..ETH + 6].copy_from_slice(&payload_len.to_be_bytes());
    f.extend_from_slice(&exts);
    f.extend_from_slice(tcp);
    f
}

#[test]
fn ipv6_with_extension_headers_passes_untouched() {
    let mut dps = datapaths();
    // Hop-by-hop 0, routing 43, fragment 44, destination options 60.
    for chain in [
        &[0u8][..],
        &[60],
        &[43],
        &[44],
        &[0, 43, 44, 60],
        &[0, 60, 60, 60, 60, 60],
    ] {
        let f = ipv6_with_extensions(chain);
        for (hook, dp) in &mut dps {
            let e = dp.check(*hook, &label(format!("IPv6 with {chain:?}")), &f);
            assert_eq!(e, Expect::Pass);
        }
    }
    // And with the IPv4 ethertype on an IPv6 packet: version 6 is malformed.
    let mut f = ipv6_with_extensions(&[0]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    for (hook, dp) in &mut dps {
        let e = dp.check(*hook, &label("IPv6 under the IPv4 ethertype"), &f);
        assert_eq!(e, Expect::Drop(Stat::DropMalformed));
    }
}

#[test]
fn ipv4_fragments_follow_the_flow_of_their_first_fragment() {
    let mut dps = datapaths();
    let payload = vec![7u8; 64];
    let uplink = [
        (
            "TCP",
            Frame::tcp("198.18.0.1:40002", "198.18.0.2:8080").payload(payload.clone()),
        ),
        (
            "UDP",
            Frame::udp("198.18.0.1:4002", "198.18.0.2:5353").payload(payload.clone()),
        ),
    ];
    for (name, f) in &uplink {
        let first = f.clone().fragment(true, 0).build();
        let later = f.clone().fragment(true, 8).build();
        let last = f.clone().fragment(false, 16).build();
        for (hook, dp) in dps.iter_mut().filter(|(h, _)| h.is_uplink()) {
            // Later fragments before their first: nothing to go by.
            let e = dp.check(
                *hook,
                &label(format!("{name} early later fragment")),
                &later,
            );
            assert_eq!(e, Expect::Pass, "{name} on {hook:?}");
            let e = dp.check(*hook, &label(format!("{name} first fragment")), &first);
            assert_eq!(e, Expect::Translate, "{name} on {hook:?}");
            for (what, frag) in [("later", &later), ("last", &last)] {
                let e = dp.check(*hook, &label(format!("{name} {what} fragment")), frag);
                assert_eq!(e, Expect::Translate, "{name} {what} on {hook:?}");
            }
        }
    }
    // A first fragment too short to carry its L4 header: malformed.
    let short = with_tot_len(
        Frame::udp("198.18.0.1:4003", "198.18.0.2:5353")
            .fragment(true, 0)
            .build()[..ETH + 24]
            .to_vec(),
        24,
    );
    // A datagram that is not ours: passed whole, fragments too.
    let other = Frame::udp("198.18.0.1:4004", "198.18.0.2:9999")
        .payload(payload.clone())
        .ident(0x4004);
    for (hook, dp) in dps.iter_mut().filter(|(h, _)| h.is_uplink()) {
        assert_eq!(
            dp.check(*hook, &label("short first fragment"), &short),
            Expect::Drop(Stat::DropMalformed)
        );
        for (what, f) in [
            ("first", other.clone().fragment(true, 0).build()),
            ("later", other.clone().fragment(false, 8).build()),
        ] {
            assert_eq!(
                dp.check(*hook, &label(format!("{what} fragment, not published")), &f),
                Expect::Pass
            );
        }
    }

    // The container side: a datagram leaving masqueraded is translated
    // fragment by fragment; a later fragment without its first never
    // leaves with the pool address.
    let (_, dp) = &mut dps[2];
    let flow = Frame::udp("198.19.0.5:5002", "198.18.0.1:9001").macs(CTR_MAC, HOST_MAC);
    let orphan = flow
        .clone()
        .payload(payload.clone())
        .ident(77)
        .fragment(false, 8)
        .build();
    assert_eq!(
        dp.check(Hook::ContainerTc, &label("orphan later fragment"), &orphan),
        Expect::Drop(Stat::DropFragment)
    );
    let first = flow
        .clone()
        .payload(payload.clone())
        .fragment(true, 0)
        .build();
    assert_eq!(
        dp.check(Hook::ContainerTc, &label("first fragment"), &first),
        Expect::Translate
    );
    let later = flow.payload(payload).fragment(false, 8).build();
    assert_eq!(
        dp.check(Hook::ContainerTc, &label("later fragment"), &later),
        Expect::Translate
    );
}

#[test]
fn fragments_and_other_protocols_from_a_container_are_checked_for_spoofing() {
    let mut dp = Datapath::new();
    let own = |f: Frame| f.macs(CTR_MAC, HOST_MAC);
    let foreign = |f: Frame| f.src_ip([198, 18, 0, 77]).macs(CTR_MAC, HOST_MAC);
    let udp = || Frame::udp("198.19.0.5:5003", "198.18.0.1:9001").payload(vec![9u8; 64]);
    let raw = || Frame::raw_ip(BACKEND, [198, 18, 0, 1], 253).payload(&b"other protocol"[..]);
    let cases = [
        ("first fragment", udp().fragment(true, 0)),
        ("later fragment", udp().fragment(true, 8)),
        ("last fragment", udp().fragment(false, 16)),
        ("IP protocol 253", raw()),
        (
            "GRE",
            Frame::raw_ip(BACKEND, [198, 18, 0, 1], 47).payload(vec![0u8; 8]),
        ),
    ];
    for (what, f) in cases {
        let spoofed = foreign(f.clone()).build();
        assert_eq!(
            dp.check(
                Hook::ContainerTc,
                &label(format!("{what}, foreign source")),
                &spoofed
            ),
            Expect::Drop(Stat::DropSpoofed),
            "{what}"
        );
        let wrong_mac = f.clone().macs([2, 0x66, 0, 0, 0, 1], HOST_MAC).build();
        assert_eq!(
            dp.check(
                Hook::ContainerTc,
                &label(format!("{what}, foreign MAC")),
                &wrong_mac
            ),
            Expect::Drop(Stat::DropSpoofed),
            "{what}"
        );
        // The container's own: fragments of a UDP datagram to the outside
        // are masqueraded (the first records the ports its later ones
        // follow), other protocols pass.
        let genuine = own(f).build();
        let expected = if what.contains("fragment") {
            Expect::Translate
        } else {
            Expect::Pass
        };
        assert_eq!(
            dp.check(
                Hook::ContainerTc,
                &label(format!("{what}, own source")),
                &genuine
            ),
            expected,
            "{what}"
        );
    }
}

/// A small deterministic generator (xorshift64*), so that the sweep is the
/// same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Every single-byte corruption of the base frames' headers (a few values
/// per byte) through the programs `hooks`; returns how often each outcome
/// was expected.
fn single_byte_sweep(hooks: &[Hook]) -> BTreeMap<String, usize> {
    let mut dps = datapaths();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (name, full) in base_frames() {
        let headers = full.len().min(ETH + 20 + 20);
        for off in 0..headers {
            let orig = full[off];
            let mut values = vec![
                0x00,
                0xff,
                orig ^ 0x01,
                orig ^ 0x04,
                orig ^ 0x10,
                // The more-fragments bit, among others.
                orig ^ 0x20,
                orig ^ 0x80,
            ];
            values.retain(|v| *v != orig);
            values.dedup();
            for v in values {
                let mut f = full.clone();
                f[off] = v;
                for (hook, dp) in dps.iter_mut().filter(|(h, _)| hooks.contains(h)) {
                    let e = dp.check(*hook, &label(format!("{name}[{off}] = {v:#04x}")), &f);
                    *outcomes.entry(format!("{e:?}")).or_default() += 1;
                }
            }
        }
    }
    outcomes
}

/// Random corruptions (a few bytes, sometimes a cut) of the base frames
/// through the programs `hooks`, the same on every run.
fn random_sweep(hooks: &[Hook]) {
    let mut dps = datapaths();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (name, full) in base_frames() {
        for round in 0..250 {
            let mut f = full.clone();
            let n = 1 + (rng.next() % 4) as usize;
            for _ in 0..n {
                // Mostly the IP and L4 headers, where the rules look.
                let off = ETH + (rng.next() as usize) % (f.len() - ETH);
                f[off] = rng.next() as u8;
            }
            if rng.next().is_multiple_of(4) {
                let len = ETH + (rng.next() as usize) % (f.len() - ETH);
                f.truncate(len);
            }
            for (hook, dp) in dps.iter_mut().filter(|(h, _)| hooks.contains(h)) {
                dp.check(*hook, &label(format!("{name} corruption {round}")), &f);
            }
        }
    }
}

#[test]
fn single_byte_corruptions_of_the_headers_follow_the_rules_on_the_uplink() {
    let outcomes = single_byte_sweep(&[Hook::UplinkTc, Hook::UplinkXdp]);
    // The sweep reaches every kind of outcome.
    for kind in [
        "Pass",
        "Translate",
        "Drop(DropMalformed)",
        "Drop(DropTtlExceeded)",
    ] {
        assert!(outcomes.contains_key(kind), "no {kind} in {outcomes:?}");
    }
}

#[test]
fn single_byte_corruptions_of_the_headers_follow_the_rules_on_a_container_veth() {
    let outcomes = single_byte_sweep(&[Hook::ContainerTc]);
    for kind in [
        "Pass",
        "Translate",
        "Drop(DropMalformed)",
        "Drop(DropSpoofed)",
    ] {
        assert!(outcomes.contains_key(kind), "no {kind} in {outcomes:?}");
    }
}

#[test]
fn random_multi_byte_corruptions_follow_the_rules_on_the_uplink() {
    random_sweep(&[Hook::UplinkTc, Hook::UplinkXdp]);
}

#[test]
fn random_multi_byte_corruptions_follow_the_rules_on_a_container_veth() {
    random_sweep(&[Hook::ContainerTc]);
}
