//! The bench's schedule: which measurement runs when, in which bed, how
//! often, and where its samples go.
//!
//! Modes are interleaved: each repetition of a measurement goes through
//! every bed (in an order rotated per repetition) before the next
//! repetition starts, so that a noisy minute hurts every mode alike. The
//! machine's idle share is checked before each measurement.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bench::{
        bed::{Bed, CONN_PORT, IPERF_PORT, RR_PORT, UNDER_TEST},
        connrate,
        control::ControlConfig,
        cpu::{QuietPolicy, wait_quiet},
        flowcore,
        iperf::{self, Test},
        local::LocalConfig,
        mode::Mode,
        ratelimit,
        results::{AgentCpu, Metric, Results, metric},
        rr,
        snmp::UdpCounters,
        stats::percentile,
        tails,
    },
    ratebench::RateCase,
};

/// Set by SIGINT/SIGTERM: the run stops between measurements and cleans
/// up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM stop the run between two measurements (so
/// that every namespace is removed) instead of killing it.
pub fn install_interrupt_handler() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("handling {sig}"))?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// The published ports present when only the ports under test are.
pub const BASE_PORTS: usize = UNDER_TEST.len();

/// One kind of data-path measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// iperf3 TCP, 1 stream, client → container.
    Tcp1,
    /// iperf3 TCP, 4 streams.
    Tcp4,
    /// iperf3 TCP, container → client (`-R`).
    TcpRev,
    /// iperf3 UDP, 64-byte datagrams, unlimited rate.
    Udp,
    /// Request/response over one connection.
    Rr,
    /// New connections per second.
    Conn,
    /// iperf3 TCP from the container to the outside (masquerade).
    EgressTcp,
    /// New connections from the container to the outside.
    EgressConn,
}

impl Kind {
    /// Every kind, in schedule order.
    pub const ALL: [Kind; 8] = [
        Kind::Tcp1,
        Kind::Tcp4,
        Kind::TcpRev,
        Kind::Udp,
        Kind::Rr,
        Kind::Conn,
        Kind::EgressTcp,
        Kind::EgressConn,
    ];

    /// The kinds repeated with many published ports.
    pub const SCALING: [Kind; 3] = [Kind::Conn, Kind::Rr, Kind::Tcp1];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tcp1 => "tcp1",
            Kind::Tcp4 => "tcp4",
            Kind::TcpRev => "tcprev",
            Kind::Udp => "udp",
            Kind::Rr => "rr",
            Kind::Conn => "conn",
            Kind::EgressTcp => "egress-tcp",
            Kind::EgressConn => "egress-conn",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Config {
    /// `--quick`.
    pub quick: bool,
    /// Repetitions of each data-path figure.
    pub reps: usize,
    /// Seconds of each iperf3 run.
    pub iperf_secs: u32,
    /// Length of each request/response and connection-rate run.
    pub window: Duration,
    /// The most transactions or connections in one run.
    pub max_ops: usize,
    /// Client threads of the connection-rate runs.
    pub conn_threads: usize,
    /// Published ports present in the scaling runs (besides the base).
    pub sizes: Vec<usize>,
    /// Samples of each update time.
    pub update_samples: usize,
    /// The control plane at scale.
    pub control: ControlConfig,
    /// The node's own connections to a published port on its loopback.
    pub local: LocalConfig,
    /// Modes to set up.
    pub modes: Vec<Mode>,
    /// Data-path measurements to run.
    pub kinds: Vec<Kind>,
    /// When the machine is quiet enough to measure.
    pub quiet: QuietPolicy,
    /// Rate-limit cases (empty: none).
    pub rate_cases: Vec<RateCase>,
    /// Request/response-under-load cases of the rate limiter (empty: none).
    pub rr_cases: Vec<RateCase>,
    /// Repetitions of each rate-limit case.
    pub rate_reps: usize,
    /// The most time spent waiting for quiet over the whole run (on a
    /// machine that is never quiet, the run would otherwise wait before
    /// every measurement).
    pub quiet_budget: Duration,
    /// The flow-core section (`None`: not run).
    pub flowcore: Option<flowcore::Plan>,
    /// The cluster section (`None`: not run).
    pub cluster: Option<crate::bench::cluster::Plan>,
    /// The latency-tail section (`None`: not run).
    pub tails: Option<tails::Plan>,
}

impl Config {
    /// The full run (under 30 minutes).
    pub fn full() -> Self {
        Self {
            quick: false,
            reps: 5,
            iperf_secs: 2,
            window: Duration::from_secs(2),
            max_ops: 500_000,
            conn_threads: 2,
            sizes: vec![1_000, 10_000],
            update_samples: 20,
            control: ControlConfig {
                enabled: true,
                samples: 100,
                containers: 1_000,
                churn: 50,
                restarts: 5,
            },
            local: LocalConfig {
                enabled: true,
                reps: 5,
                window: Duration::from_secs(2),
                threads: 2,
            },
            modes: Mode::ALL.to_vec(),
            kinds: Kind::ALL.to_vec(),
            quiet: QuietPolicy {
                min_idle: 0.8,
                sample: Duration::from_millis(400),
                max_wait: Duration::from_secs(4),
            },
            quiet_budget: Duration::from_secs(150),
            rate_cases: ratelimit::cases(&[10, 100, 1000], &[1, 4], 5),
            rr_cases: ratelimit::rr_cases(&[10, 100, 1000], 5),
            rate_reps: 2,
            flowcore: Some(flowcore::Plan::full(4)),
            cluster: Some(crate::bench::cluster::Plan::full()),
            tails: Some(tails::Plan::full(2)),
        }
    }

    /// The quick run (under 5 minutes).
    pub fn quick() -> Self {
        Self {
            quick: true,
            reps: 3,
            iperf_secs: 1,
            window: Duration::from_millis(750),
            sizes: vec![10_000],
            update_samples: 6,
            control: ControlConfig {
                enabled: true,
                samples: 40,
                containers: 1_000,
                churn: 20,
                restarts: 3,
            },
            local: LocalConfig {
                enabled: true,
                reps: 3,
                window: Duration::from_millis(750),
                threads: 2,
            },
            quiet: QuietPolicy {
                min_idle: 0.8,
                sample: Duration::from_millis(150),
                max_wait: Duration::from_secs(1),
            },
            quiet_budget: Duration::from_secs(20),
            rate_cases: ratelimit::cases(&[100], &[1], 3),
            rr_cases: ratelimit::rr_cases(&[100], 3),
            rate_reps: 1,
            flowcore: Some(flowcore::Plan::quick(4)),
            cluster: Some(crate::bench::cluster::Plan::quick()),
            tails: Some(tails::Plan::quick(2)),
            ..Self::full()
        }
    }
}

/// Runs the measurements in the beds and collects their samples.
pub struct Runner<'b, 'n> {
    cfg: Config,
    beds: &'b mut [Bed<'n>],
    results: Results,
    quiet_left: Duration,
}

impl<'b, 'n> Runner<'b, 'n> {
    /// A runner over `beds` (one per mode).
    pub fn new(cfg: Config, beds: &'b mut [Bed<'n>]) -> Self {
        Self {
            quiet_left: cfg.quiet_budget,
            cfg,
            beds,
            results: Results::default(),
        }
    }

    /// The samples so far.
    pub fn results(&self) -> &Results {
        &self.results
    }

    /// Hands the samples over.
    pub fn into_results(self) -> Results {
        self.results
    }

    /// Everything. First the kinds that run with the base ports only,
    /// then the scaling kinds: each repetition goes through every size
    /// (base first), re-installing the filler ports, and times a share of
    /// the update samples at each size. The sizes of one mode are thus
    /// measured minutes apart, not a whole run apart. Then the control
    /// plane at scale (a node of its own), and last the rate-limit cases.
    pub fn run_all(&mut self) -> Result<()> {
        let kinds = self.cfg.kinds.clone();
        let (scaling, plain): (Vec<Kind>, Vec<Kind>) =
            kinds.iter().partition(|k| Kind::SCALING.contains(k));
        for kind in plain {
            for rep in 0..self.cfg.reps {
                self.round(kind, rep)?;
            }
        }
        if !kinds.is_empty() {
            self.scaling(&scaling)?;
        }
        if self.cfg.control.enabled {
            self.control_plane()?;
        }
        if self.cfg.local.enabled {
            self.local()?;
        }
        if !self.cfg.rate_cases.is_empty() || !self.cfg.rr_cases.is_empty() {
            self.ratelimit()?;
        }
        if self.cfg.flowcore.is_some() {
            self.flowcore()?;
        }
        if self.cfg.cluster.is_some() {
            self.cluster()?;
        }
        if self.cfg.tails.is_some() {
            self.tails()?;
        }
        Ok(())
    }

    /// The cluster section, in namespaces of its own.
    fn cluster(&mut self) -> Result<()> {
        let Some(plan) = self.cfg.cluster.clone() else {
            return Ok(());
        };
        let mut notes = Vec::new();
        let quiet = self.cfg.quiet;
        let mut quiet_left = self.quiet_left;
        let results = crate::bench::cluster::run(
            &plan,
            || {
                check_interrupted()?;
                let policy = QuietPolicy {
                    max_wait: quiet.max_wait.min(quiet_left),
                    ..quiet
                };
                let q = wait_quiet(&policy);
                quiet_left = quiet_left.saturating_sub(q.waited);
                Ok(())
            },
            &mut notes,
        );
        self.quiet_left = quiet_left;
        self.results.notes.extend(notes);
        match results {
            Ok(r) => self.results.cluster = r,
            Err(e) => self
                .results
                .notes
                .push(format!("cluster section failed: {e:#}")),
        }
        Ok(())
    }

    /// The latency-tail section, with the most published ports of the
    /// run (10,000 unless `--sizes` says otherwise).
    fn tails(&mut self) -> Result<()> {
        let Some(plan) = self.cfg.tails.clone() else {
            return Ok(());
        };
        let size = self
            .cfg
            .sizes
            .iter()
            .copied()
            .max()
            .unwrap_or(BASE_PORTS)
            .max(BASE_PORTS);
        self.set_size(size)?;
        let mut notes = Vec::new();
        let quiet = self.cfg.quiet;
        let mut quiet_left = self.quiet_left;
        let mut measurements = 0;
        let results = tails::run(
            self.beds,
            &plan,
            || {
                check_interrupted()?;
                let policy = QuietPolicy {
                    max_wait: quiet.max_wait.min(quiet_left),
                    ..quiet
                };
                let q = wait_quiet(&policy);
                quiet_left = quiet_left.saturating_sub(q.waited);
                measurements += 1;
                Ok(())
            },
            &mut notes,
        )?;
        self.quiet_left = quiet_left;
        self.results.measurements += measurements;
        self.results.notes.extend(notes);
        self.results.tails = results;
        Ok(())
    }

    /// The flow-core section, over the beds with only the base ports.
    fn flowcore(&mut self) -> Result<()> {
        let Some(plan) = self.cfg.flowcore.clone() else {
            return Ok(());
        };
        self.set_size(BASE_PORTS)?;
        let mut notes = Vec::new();
        let quiet = self.cfg.quiet;
        let mut quiet_left = self.quiet_left;
        let results = flowcore::run(
            self.beds,
            &plan,
            || {
                check_interrupted()?;
                let policy = QuietPolicy {
                    max_wait: quiet.max_wait.min(quiet_left),
                    ..quiet
                };
                let q = wait_quiet(&policy);
                quiet_left = quiet_left.saturating_sub(q.waited);
                Ok(())
            },
            &mut notes,
        )?;
        self.quiet_left = quiet_left;
        self.results.notes.extend(notes);
        self.results.flowcore = results;
        Ok(())
    }

    /// The scaling kinds: each repetition goes through every size.
    fn scaling(&mut self, kinds: &[Kind]) -> Result<()> {
        let mut sizes = vec![BASE_PORTS];
        sizes.extend(self.cfg.sizes.iter().filter(|s| **s > BASE_PORTS));
        let reps = self.cfg.reps.max(1);
        let samples = self.cfg.update_samples.div_ceil(reps);
        for rep in 0..reps {
            for &size in &sizes {
                self.set_size(size)?;
                for kind in kinds {
                    self.round(*kind, rep)?;
                }
                self.updates(samples)?;
            }
        }
        Ok(())
    }

    /// The rate-limit cases, then the request/response ones, each on a
    /// fresh node of its own.
    fn ratelimit(&mut self) -> Result<()> {
        let cases = self.cfg.rate_cases.clone();
        let mut notes = Vec::new();
        let rows = ratelimit::run(
            &cases,
            self.cfg.rate_reps,
            || {
                check_interrupted()?;
                self.wait_quiet();
                Ok(())
            },
            &mut notes,
        )?;
        let rr_cases = self.cfg.rr_cases.clone();
        let rr_rows = ratelimit::run_rr(
            &rr_cases,
            self.cfg.rate_reps,
            || {
                check_interrupted()?;
                self.wait_quiet();
                Ok(())
            },
            &mut notes,
        )?;
        self.results.notes.extend(notes);
        self.results.ratelimit = rows;
        self.results.ratelimit_rr = rr_rows;
        Ok(())
    }

    /// Makes `size` ports published in every publishing bed.
    fn set_size(&mut self, size: usize) -> Result<()> {
        check_interrupted()?;
        let fillers = size.saturating_sub(BASE_PORTS);
        let start = Instant::now();
        for bed in self.beds.iter_mut().filter(|b| b.mode().publishes()) {
            bed.set_fillers(fillers)?;
        }
        println!(
            "== {size} published ports ({fillers} fillers before the ports under test), \
             installed in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Repetition `rep` of `kind`: once in every bed that takes part (all
    /// of them with the base ports, the publishing ones with more), in an
    /// order rotated by `rep`.
    fn round(&mut self, kind: Kind, rep: usize) -> Result<()> {
        let ports = self
            .beds
            .iter()
            .map(|b| b.fillers() + BASE_PORTS)
            .max()
            .unwrap_or(BASE_PORTS);
        let idx: Vec<usize> = (0..self.beds.len())
            .filter(|&i| ports == BASE_PORTS || self.beds[i].mode().publishes())
            .collect();
        print!(
            "{:<12} {:>5} ports {}/{}:",
            kind.name(),
            ports,
            rep + 1,
            self.cfg.reps
        );
        for k in 0..idx.len() {
            check_interrupted()?;
            let i = idx[(k + rep) % idx.len()];
            self.wait_quiet();
            let mode = self.beds[i].mode();
            let cpu0 = self.beds[i].agent_cpu_secs();
            let measured = self.measure(i, kind);
            if let (Some(a), Some(b), Ok(_)) = (cpu0, self.beds[i].agent_cpu_secs(), &measured) {
                self.results.agent_cpu.push(AgentCpu {
                    kind: kind.name(),
                    mode,
                    ports,
                    secs: b - a,
                });
            }
            match measured {
                Ok(shown) => print!("  {mode} {shown}"),
                Err(e) => {
                    print!("  {mode} FAILED");
                    self.results
                        .notes
                        .push(format!("{mode} {} failed: {e:#}", kind.name()));
                }
            }
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        }
        println!();
        Ok(())
    }

    /// Waits for a quiet machine (within what is left of the budget) and
    /// counts the measurement about to start.
    fn wait_quiet(&mut self) {
        let policy = QuietPolicy {
            max_wait: self.cfg.quiet.max_wait.min(self.quiet_left),
            ..self.cfg.quiet
        };
        let quiet = wait_quiet(&policy);
        self.quiet_left = self
            .quiet_left
            .saturating_sub(quiet.waited.saturating_sub(policy.sample));
        self.results.measurements += 1;
        if !quiet.quiet {
            self.results.not_quiet += 1;
        }
    }

    /// One measurement of `kind` in bed `i`; returns its headline figure
    /// for the progress line.
    fn measure(&mut self, i: usize, kind: Kind) -> Result<String> {
        let bed = &self.beds[i];
        let mode = bed.mode();
        let ports = bed.fillers() + BASE_PORTS;
        let cfg = &self.cfg;
        let r = &mut self.results;
        let client = &bed.node().client;
        match kind {
            Kind::Tcp1 | Kind::Tcp4 | Kind::TcpRev => {
                let (streams, reverse) = match kind {
                    Kind::Tcp4 => (4, false),
                    Kind::TcpRev => (1, true),
                    _ => (1, false),
                };
                let test = Test::Tcp { streams, reverse };
                let res = iperf::run(client, bed.ingress(IPERF_PORT), test, cfg.iperf_secs)?;
                let gbps = res.bits_per_second / 1e9;
                let m: &'static Metric = match kind {
                    Kind::Tcp1 => &metric::TCP_1,
                    Kind::Tcp4 => &metric::TCP_4,
                    _ => &metric::TCP_REV,
                };
                r.record(m, mode, ports, gbps);
                if kind == Kind::Tcp1 && ports == BASE_PORTS && res.gbits() > 0.0 {
                    r.record(
                        &metric::CPU_SOFTIRQ_GBIT,
                        mode,
                        ports,
                        res.cpu.softirq_secs() * 1e3 / res.gbits(),
                    );
                    r.record(
                        &metric::CPU_SYS_GBIT,
                        mode,
                        ports,
                        res.cpu.kernel_secs() * 1e3 / res.gbits(),
                    );
                }
                Ok(format!("{gbps:.1}"))
            }
            Kind::Udp => {
                let before = UdpCounters::read(bed.container())?;
                let res = iperf::run(
                    client,
                    bed.ingress(IPERF_PORT),
                    Test::Udp { payload: 64 },
                    cfg.iperf_secs,
                )?;
                let after = UdpCounters::read(bed.container())?;
                if after.in_csum_errors > before.in_csum_errors {
                    r.notes.push(format!(
                        "{mode} udp: {} datagrams with bad checksums reached the container",
                        after.in_csum_errors - before.in_csum_errors
                    ));
                }
                let arrived = after.arrived_since(&before) as f64;
                let kpps = arrived / res.secs / 1e3;
                let sent = res.packets as f64;
                let loss = if sent > 0.0 {
                    (100.0 * (sent - arrived) / sent).max(0.0)
                } else {
                    0.0
                };
                r.record(&metric::UDP_PPS, mode, ports, kpps);
                r.record(&metric::UDP_LOSS, mode, ports, loss);
                if arrived > 0.0 {
                    let per = 1e5 / arrived * 1e3;
                    r.record(
                        &metric::CPU_SOFTIRQ_PKTS,
                        mode,
                        ports,
                        res.cpu.softirq_secs() * per,
                    );
                    r.record(
                        &metric::CPU_SYS_PKTS,
                        mode,
                        ports,
                        res.cpu.kernel_secs() * per,
                    );
                }
                Ok(format!("{kpps:.0}k ({loss:.1}% lost)"))
            }
            Kind::Rr => {
                let res = rr::run(client, bed.ingress(RR_PORT), cfg.window, cfg.max_ops)?;
                let (p50, p99) = (
                    percentile(&res.latencies_us, 50.0),
                    percentile(&res.latencies_us, 99.0),
                );
                r.record(&metric::RR_P50, mode, ports, p50);
                r.record(&metric::RR_P99, mode, ports, p99);
                r.record(
                    &metric::RR_MAX,
                    mode,
                    ports,
                    res.latencies_us.iter().copied().fold(0.0, f64::max),
                );
                r.record(&metric::RR_TPS, mode, ports, res.tps() / 1e3);
                Ok(format!("{p50:.0}/{p99:.0}µs"))
            }
            Kind::Conn | Kind::EgressConn => {
                bed.flush_conntrack()?;
                let egress = kind == Kind::EgressConn;
                let plan = if egress {
                    connrate::Plan {
                        sources: vec![None],
                        dests: bed.egress_conn_dests(),
                        threads: cfg.conn_threads,
                        duration: cfg.window,
                        max: cfg.max_ops,
                    }
                } else {
                    connrate::Plan {
                        sources: bed.client_addrs().iter().copied().map(Some).collect(),
                        dests: vec![bed.ingress(CONN_PORT)],
                        threads: cfg.conn_threads,
                        duration: cfg.window,
                        max: cfg.max_ops,
                    }
                };
                let from = if egress { bed.container() } else { client };
                let res = connrate::run(from, &plan)?;
                let rate = res.rate() / 1e3;
                let p50 = percentile(&res.connect_us, 50.0);
                let p99 = percentile(&res.connect_us, 99.0);
                let max = res.connect_us.iter().copied().fold(0.0, f64::max);
                if egress {
                    r.record(&metric::EGRESS_CONN_MAX, mode, ports, max);
                    r.record(&metric::EGRESS_CONN, mode, ports, rate);
                    r.record(&metric::EGRESS_CONN_P99, mode, ports, p99);
                } else {
                    r.record(&metric::CONN_RATE, mode, ports, rate);
                    r.record(&metric::CONN_P50, mode, ports, p50);
                    r.record(&metric::CONN_P99, mode, ports, p99);
                    r.record(&metric::CONN_MAX, mode, ports, max);
                    if ports == BASE_PORTS && res.completed > 0 {
                        r.record(
                            &metric::CPU_SYS_CONN,
                            mode,
                            ports,
                            res.cpu.kernel_secs() * 1e6 / res.completed as f64,
                        );
                    }
                }
                if res.failed > 0 {
                    r.notes.push(format!(
                        "{mode} {}: {} of {} connections failed (first: {})",
                        kind.name(),
                        res.failed,
                        res.failed + res.completed,
                        res.first_error.as_deref().unwrap_or("?")
                    ));
                }
                Ok(format!("{rate:.1}k/s p99 {p99:.0}µs"))
            }
            Kind::EgressTcp => {
                let test = Test::Tcp {
                    streams: 1,
                    reverse: false,
                };
                let res = iperf::run(bed.container(), bed.egress_iperf(), test, cfg.iperf_secs)?;
                let gbps = res.bits_per_second / 1e9;
                r.record(&metric::EGRESS_TCP, mode, ports, gbps);
                Ok(format!("{gbps:.1}"))
            }
        }
    }

    /// Forgets every bed's tracked connections, so that control-plane
    /// figures do not depend on what the measurements before left behind.
    fn flush_all(&mut self) {
        for bed in self.beds.iter() {
            if let Err(e) = bed.flush_conntrack() {
                self.results.notes.push(format!("{e:#}"));
            }
        }
    }

    /// Times adding and removing one mapping `samples` times in every
    /// publishing bed, interleaved (with empty connection tables).
    fn updates(&mut self, samples: usize) -> Result<()> {
        self.flush_all();
        print!("updates     :");
        for n in 0..samples {
            check_interrupted()?;
            let len = self.beds.len();
            for k in 0..len {
                let bed = &mut self.beds[(k + n) % len];
                let mode = bed.mode();
                if !mode.publishes() {
                    continue;
                }
                let ports = bed.fillers() + BASE_PORTS;
                let r = &mut self.results;
                let outcome = (|| -> Result<()> {
                    let b = bed.backend();
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    r.record(&metric::UPDATE_ADD, mode, ports, ms(b.time_add()?));
                    r.record(&metric::UPDATE_DEL, mode, ports, ms(b.time_del()?));
                    if let Some(add) = b.time_cli_add() {
                        r.record(&metric::UPDATE_CLI_ADD, mode, ports, ms(add?));
                    }
                    if let Some(del) = b.time_cli_del() {
                        r.record(&metric::UPDATE_CLI_DEL, mode, ports, ms(del?));
                    }
                    if let Some(map) = b.time_map_update() {
                        let (add, del) = map?;
                        let us = |d: Duration| d.as_secs_f64() * 1e6;
                        r.record(&metric::UPDATE_MAP_ADD, mode, ports, us(add));
                        r.record(&metric::UPDATE_MAP_DEL, mode, ports, us(del));
                    }
                    Ok(())
                })();
                if let Err(e) = outcome {
                    self.results
                        .notes
                        .push(format!("{mode} update at {ports} ports failed: {e:#}"));
                }
            }
            print!(" {}", n + 1);
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
        }
        println!();
        Ok(())
    }

    /// The node's own connections to a published port on its loopback, in
    /// a node of its own.
    fn local(&mut self) -> Result<()> {
        check_interrupted()?;
        let mut cfg = self.cfg.local.clone();
        cfg.threads = self.cfg.conn_threads;
        match crate::bench::local::run(&cfg) {
            Ok(rows) => self.results.local = rows,
            Err(e) => self
                .results
                .notes
                .push(format!("node to loopback published port failed: {e:#}")),
        }
        Ok(())
    }

    /// The control plane at scale, in a node of its own.
    fn control_plane(&mut self) -> Result<()> {
        check_interrupted()?;
        if let Err(e) = crate::bench::control::run(&self.cfg.control, &mut self.results) {
            self.results
                .notes
                .push(format!("control plane failed: {e:#}"));
        }
        Ok(())
    }
}
