//! The rate limiter's cgroup_skb programs under BPF_PROG_TEST_RUN.
//!
//! A test run gives the packet a socket in the test process's own cgroup
//! and the program a fresh cgroup storage, so the programs charge the
//! bucket of the test process's cgroup: the tests put their limits there.
//! (The agent's per-attachment keys are exercised by the namespace tests.)
//!
//! Every test freezes the programs' clock (`Programs::freeze_clock`) and
//! moves it by hand: the verdicts depend on the chosen times only, never on
//! how fast the machine runs the test.

use std::os::unix::fs::MetadataExt;

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap, PerCpuValues};
use datapath_common::{
    names,
    programs::{RATE_EGRESS, RATE_INGRESS},
    ratelimit::{
        LOOPBACK_IFINDEX, RateKey, RateLimit, RateParams, RateStats, cgroup_verdict, direction,
    },
};
use datapath_tests::{frame::Frame, packet::verify_checksums, programs::Programs, sys};

/// `BPF_F_LOCK`: update a spin-locked value in place, under its lock.
const BPF_F_LOCK: u64 = 4;

/// The cgroup2 id of the test process (what the test run's socket is in).
fn own_cgroup_id() -> u64 {
    let root = sys::cgroup2_root().expect("cgroup2 is mounted");
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup2 line in /proc/self/cgroup");
    let dir = root.join(rel.trim_start_matches('/'));
    std::fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("stat {}: {e}", dir.display()))
        .ino()
}

fn limits(p: &mut Programs) -> HashMap<&mut MapData, RateKey, RateLimit> {
    HashMap::try_from(p.map_mut(names::RATE_LIMITS)).expect("RATE_LIMITS layout")
}

fn stats_map(p: &mut Programs) -> PerCpuHashMap<&mut MapData, RateKey, RateStats> {
    PerCpuHashMap::try_from(p.map_mut(names::RATE_STATS)).expect("RATE_STATS layout")
}

/// Limits `key` to `rate_bps` with a bucket of `burst` bytes, with zeroed
/// counters, as the agent does.
fn set_limit(p: &mut Programs, key: RateKey, rate_bps: u64, burst: u64) {
    let params = RateParams::new(rate_bps, burst).expect("valid parameters");
    limits(p)
        .insert(key, RateLimit::new(&params), 0)
        .expect("insert the limit");
    let cpus = aya::util::nr_cpus().expect("number of CPUs");
    let zeros = PerCpuValues::try_from(vec![RateStats::default(); cpus]).expect("per-CPU values");
    stats_map(p)
        .insert(key, zeros, 0)
        .expect("insert the counters");
}

/// The counters of `key` summed over CPUs, if it has any.
fn stats(p: &mut Programs, key: RateKey) -> Option<RateStats> {
    match stats_map(p).get(&key, 0) {
        Ok(per_cpu) => Some(per_cpu.iter().fold(RateStats::default(), |a, b| a.sum(b))),
        Err(MapError::KeyNotFound) => None,
        Err(e) => panic!("read RATE_STATS: {e}"),
    }
}

/// A TCP segment whose IP packet is exactly 100 bytes.
fn segment() -> Vec<u8> {
    let f = Frame::tcp("198.19.0.5:40000", "198.18.0.1:80").payload(vec![0x5a; 60]);
    assert_eq!(f.ip_packet().len(), 100);
    f.build()
}

/// The IP packet a run left: the kernel hands cgroup_skb programs the
/// packet without its link header and gives back a zeroed one.
fn ip_of(data: &[u8]) -> &[u8] {
    &data[14..]
}

/// The time the tests start the programs' clock at (any time but 0).
const T0: u64 = 1_000 * NS_PER_S;
const NS_PER_S: u64 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

/// A fresh object with the programs' clock frozen at [`T0`].
fn programs() -> Programs {
    let mut p = Programs::load();
    p.freeze_clock(T0);
    p
}

/// Programs at [`T0`] with the test process's `dir` bucket limited to
/// [`RATE`] and [`BURST`]; its key.
fn limited(dir: u32) -> (Programs, RateKey) {
    let mut p = programs();
    let key = RateKey::new(own_cgroup_id(), dir);
    set_limit(&mut p, key, RATE, BURST);
    (p, key)
}

/// The verdicts of `n` runs of `program` on `frame`.
fn run_many(p: &mut Programs, program: &str, frame: &[u8], n: usize) -> Vec<i32> {
    (0..n)
        .map(|_| p.run_cgroup_skb(program, frame).verdict as i32)
        .collect()
}

#[test]
fn a_cgroup_without_a_limit_passes_untouched_and_uncounted() {
    let mut p = programs();
    let frame = segment();
    for program in [RATE_EGRESS, RATE_INGRESS] {
        let r = p.run_cgroup_skb(program, &frame);
        assert_eq!(r.verdict as i32, cgroup_verdict::PASS, "{program}");
        assert_eq!(
            ip_of(&r.data),
            ip_of(&frame),
            "{program} changed the packet"
        );
    }
    let own = own_cgroup_id();
    for dir in [direction::EGRESS, direction::INGRESS] {
        assert_eq!(stats(&mut p, RateKey::new(own, dir)), None);
    }
}

#[test]
fn packets_on_loopback_are_neither_charged_nor_counted() {
    let frame = segment();
    for (program, dir) in [
        (RATE_EGRESS, direction::EGRESS),
        (RATE_INGRESS, direction::INGRESS),
    ] {
        let (mut p, key) = limited(dir);
        // Far more than the bucket holds: a sidecar on 127.0.0.1.
        for _ in 0..(BURST as usize / frame.len() + 10) * 2 {
            let r = p.run_cgroup_skb_on(program, &frame, LOOPBACK_IFINDEX);
            assert_eq!(r.verdict as i32, cgroup_verdict::PASS, "{program}");
        }
        let counted = stats(&mut p, key).unwrap_or_default();
        assert_eq!(counted, RateStats::default(), "{program} counted loopback");
        // The same packet on the container's veth is charged.
        let r = p.run_cgroup_skb(program, &frame);
        assert_eq!(r.verdict as i32, cgroup_verdict::PASS, "{program}");
        let counted = stats(&mut p, key).unwrap_or_default();
        assert_eq!(counted.passed_packets, 1, "{program}: {counted:?}");
    }
}

#[test]
fn a_limit_on_another_cgroup_is_not_charged() {
    let mut p = programs();
    let other = RateKey::new(own_cgroup_id() + 1_000_003, direction::EGRESS);
    set_limit(&mut p, other, 8_000, 1_514);
    let verdicts = run_many(&mut p, RATE_EGRESS, &segment(), 30);
    assert!(
        verdicts.iter().all(|&v| v == cgroup_verdict::PASS),
        "{verdicts:?}"
    );
    assert_eq!(stats(&mut p, other), Some(RateStats::default()));
}

/// 8 kbit/s (1000 bytes per second, a 100-byte packet costs 100 ms) with a
/// 1514-byte bucket (1514 ms): at one instant, egress packets that find a
/// backlog of 0-700 ms pass, 800-1500 ms pass marked (above half the
/// bucket, 757 ms); ingress ones pass up to 1100 ms and are marked from
/// 1200 ms (the bucket's reserve, its last quarter, starts at 1135 ms); the
/// 17th (1600 ms) is over.
const RATE: u64 = 8_000;
const BURST: u64 = 1_514;

#[test]
fn egress_over_a_tiny_bucket_is_dropped_with_congestion_notification() {
    let (mut p, key) = limited(direction::EGRESS);
    let verdicts = run_many(&mut p, RATE_EGRESS, &segment(), 17);
    let mut expected = vec![cgroup_verdict::PASS; 8];
    expected.extend([cgroup_verdict::PASS_CN; 8]);
    expected.push(cgroup_verdict::DROP_CN);
    assert_eq!(verdicts, expected);
    assert_eq!(
        stats(&mut p, key),
        Some(RateStats {
            passed_bytes: 1600,
            passed_packets: 16,
            marked_bytes: 800,
            marked_packets: 8,
            dropped_bytes: 100,
            dropped_packets: 1,
        })
    );
    // The ingress bucket of the same cgroup is separate and absent.
    assert_eq!(
        p.run_cgroup_skb(RATE_INGRESS, &segment()).verdict as i32,
        cgroup_verdict::PASS
    );
}

#[test]
fn ingress_over_a_tiny_bucket_is_dropped_and_ecn_capable_packets_are_marked_ce() {
    let (mut p, key) = limited(direction::INGRESS);
    // ECT(0): the marking band (the reserve) sets Congestion Experienced.
    let ect = Frame::tcp("198.18.0.1:80", "198.19.0.5:40000")
        .payload(vec![0x5a; 60])
        .tos(0x02)
        .build();
    let mut verdicts = Vec::new();
    for i in 0..17 {
        let r = p.run_cgroup_skb(RATE_INGRESS, &ect);
        verdicts.push(r.verdict as i32);
        if (12..16).contains(&i) {
            let tos = ip_of(&r.data)[1];
            assert_eq!(tos & 0x03, 0x03, "packet {i} not marked CE: tos {tos:#x}");
            let mut marked = ect[..14].to_vec();
            marked.extend_from_slice(ip_of(&r.data));
            verify_checksums(&marked).expect("the CE mark keeps the IP checksum valid");
        } else if i < 12 {
            assert_eq!(ip_of(&r.data), ip_of(&ect), "packet {i} was changed");
        }
    }
    let mut expected = vec![cgroup_verdict::PASS; 16];
    expected.push(cgroup_verdict::DROP);
    assert_eq!(verdicts, expected);
    let s = stats(&mut p, key).expect("counters");
    assert_eq!(
        (s.passed_packets, s.marked_packets, s.dropped_packets),
        (16, 4, 1)
    );
}

#[test]
fn ingress_packets_that_cannot_carry_ecn_pass_unmarked_in_the_marking_band() {
    let (mut p, key) = limited(direction::INGRESS);
    let frame = segment();
    for _ in 0..16 {
        let r = p.run_cgroup_skb(RATE_INGRESS, &frame);
        assert_eq!(r.verdict as i32, cgroup_verdict::PASS);
        assert_eq!(ip_of(&r.data), ip_of(&frame));
    }
    let s = stats(&mut p, key).expect("counters");
    assert_eq!((s.passed_packets, s.marked_packets), (16, 0));
}

#[test]
fn a_locked_in_place_update_applies_to_the_next_packet_and_keeps_the_counters() {
    let (mut p, key) = limited(direction::EGRESS);
    let frame = segment();
    let verdicts = run_many(&mut p, RATE_EGRESS, &frame, 17);
    assert_eq!(verdicts.last(), Some(&cgroup_verdict::DROP_CN));
    // What the agent does: read under the lock, reconfigure at the
    // programs' time, write under the lock.
    let now = T0;
    let mut value = limits(&mut p)
        .get(&key, BPF_F_LOCK)
        .expect("read the limit");
    let faster = RateParams::new(1_000_000_000, 1 << 20).expect("valid");
    value.reconfigure(&faster, now);
    limits(&mut p)
        .insert(key, value, BPF_F_LOCK)
        .expect("update in place");
    let verdicts = run_many(&mut p, RATE_EGRESS, &frame, 100);
    assert!(
        verdicts.iter().all(|&v| v == cgroup_verdict::PASS),
        "{verdicts:?}"
    );
    let s = stats(&mut p, key).expect("counters");
    assert_eq!(s.passed_packets, 116, "counters survived the update: {s:?}");
    assert_eq!(s.dropped_packets, 1);
    let after = limits(&mut p).get(&key, BPF_F_LOCK).expect("read");
    assert_eq!(after.rate_bps, 1_000_000_000);
}

#[test]
fn a_deleted_limit_stops_charging_at_once() {
    let (mut p, key) = limited(direction::EGRESS);
    let frame = segment();
    run_many(&mut p, RATE_EGRESS, &frame, 17);
    limits(&mut p).remove(&key).expect("remove the limit");
    let verdicts = run_many(&mut p, RATE_EGRESS, &frame, 20);
    assert!(
        verdicts.iter().all(|&v| v == cgroup_verdict::PASS),
        "{verdicts:?}"
    );
}

#[test]
fn the_bucket_refills_at_the_configured_rate_as_time_passes() {
    let (mut p, key) = limited(direction::EGRESS);
    let frame = segment();
    // Empty the bucket at T0: 16 admitted (1600 ms of backlog), then over.
    assert_eq!(
        run_many(&mut p, RATE_EGRESS, &frame, 17).last(),
        Some(&cgroup_verdict::DROP_CN)
    );
    // 99 ms later the backlog is 1501 ms: one more packet (100 ms) fits a
    // 1514 ms bucket only once it is down to 1414 ms... not yet.
    p.freeze_clock(T0 + 99 * NS_PER_MS);
    assert_eq!(
        run_many(&mut p, RATE_EGRESS, &frame, 1),
        [cgroup_verdict::PASS_CN],
        "a backlog of 1501 ms is within the 1514 ms bucket"
    );
    assert_eq!(
        run_many(&mut p, RATE_EGRESS, &frame, 1),
        [cgroup_verdict::DROP_CN],
        "1601 ms is not"
    );
    // After exactly the backlog (1701 ms from T0), the bucket is full
    // again: the same 8 unmarked, 8 marked, 1 over as at the start.
    p.freeze_clock(T0 + 1_701 * NS_PER_MS);
    let mut expected = vec![cgroup_verdict::PASS; 8];
    expected.extend([cgroup_verdict::PASS_CN; 8]);
    expected.push(cgroup_verdict::DROP_CN);
    assert_eq!(run_many(&mut p, RATE_EGRESS, &frame, 17), expected);
    // Over 10 s, 1000 bytes per second are admitted and no more, however
    // the packets are spread: one every 50 ms offers twice the rate.
    let before = stats(&mut p, key).expect("counters");
    let start = T0 + 1_701 * NS_PER_MS;
    for i in 1..=200 {
        p.freeze_clock(start + i * 50 * NS_PER_MS);
        p.run_cgroup_skb(RATE_EGRESS, &frame);
    }
    let after = stats(&mut p, key).expect("counters");
    assert_eq!(
        after.passed_bytes - before.passed_bytes,
        10_000,
        "10 s at 8 kbit/s: {after:?}"
    );
    assert_eq!(after.dropped_packets - before.dropped_packets, 100);
}

#[test]
fn the_programs_read_the_real_clock_unless_it_is_frozen() {
    let mut p = Programs::load();
    let key = RateKey::new(own_cgroup_id(), direction::EGRESS);
    set_limit(&mut p, key, RATE, BURST);
    let frame = segment();
    // The bucket emptied 1 ns after boot is full again by now on the real
    // clock, which has run for far longer than its 1.6 s backlog...
    let uptime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    assert!(uptime.tv_sec() > 2, "the machine booted {uptime} ago");
    p.freeze_clock(1);
    assert_eq!(
        run_many(&mut p, RATE_EGRESS, &frame, 17).last(),
        Some(&cgroup_verdict::DROP_CN)
    );
    p.real_clock();
    assert_eq!(
        run_many(&mut p, RATE_EGRESS, &frame, 1),
        [cgroup_verdict::PASS],
        "a zeroed test clock is the real clock, not time 0"
    );
    // ...and frozen at 1 ns again, that packet's charge lies far ahead.
    p.freeze_clock(1);
    assert_eq!(
        run_many(&mut p, RATE_EGRESS, &frame, 1),
        [cgroup_verdict::DROP_CN]
    );
}
