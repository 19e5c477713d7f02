//! What the bench measures (the metric catalogue) and what it measured
//! (samples per metric, mode and number of published ports).

use crate::bench::{
    flowcore::FlowcoreResults,
    mode::Mode,
    ratelimit::{RateRow, RrRow},
    stats::Summary,
    tails::TailsResults,
};

/// Which way is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// More is better (throughput, rates).
    Higher,
    /// Less is better (latency, CPU, loss).
    Lower,
}

/// How a metric's samples are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One sample per repetition: median and spread.
    Repeated,
    /// Many samples of one distribution (update times): p50 and p99.
    Distribution,
    /// Many samples of one distribution: p50, p99 and the worst.
    Tail,
}

/// Where a metric is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The data path with only the ports under test published.
    DataPath,
    /// CPU cost of the data path.
    Cpu,
    /// Adding and removing one mapping.
    Update,
    /// The control plane at scale: changes, listings, restart and memory
    /// with many containers and individually published ports.
    Control,
}

/// One figure the bench reports.
#[derive(Debug, PartialEq, Eq)]
pub struct Metric {
    /// Stable identifier (JSON key).
    pub id: &'static str,
    /// What it is, for people.
    pub label: &'static str,
    /// Unit.
    pub unit: &'static str,
    /// Which way is better.
    pub better: Better,
    /// How its samples are read.
    pub shape: Shape,
    /// Where it is reported.
    pub section: Section,
}

macro_rules! metrics {
    ($($name:ident = $id:literal, $label:literal, $unit:literal, $better:ident, $shape:ident, $section:ident;)*) => {
        $(
            #[doc = $label]
            pub const $name: Metric = Metric {
                id: $id,
                label: $label,
                unit: $unit,
                better: Better::$better,
                shape: Shape::$shape,
                section: Section::$section,
            };
        )*
        /// Every metric, in report order.
        pub const ALL: &[&Metric] = &[$(&$name),*];

        /// The metrics measured again with many published ports.
        pub const SCALING: &[&Metric] = &[&CONN_RATE, &CONN_P99, &CONN_MAX, &RR_P50, &RR_P99, &RR_MAX, &TCP_1];
    };
}

/// The metric catalogue.
pub mod metric {
    use super::{Better, Metric, Section, Shape};

    metrics! {
        TCP_1 = "tcp_1", "TCP, 1 stream, client → published port", "Gbit/s", Higher, Repeated, DataPath;
        TCP_4 = "tcp_4", "TCP, 4 streams, client → published port", "Gbit/s", Higher, Repeated, DataPath;
        TCP_REV = "tcp_rev", "TCP, 1 stream, published port → client (-R)", "Gbit/s", Higher, Repeated, DataPath;
        UDP_PPS = "udp_pps", "UDP 64 B through a published port, reaching the container's UDP layer", "kpps", Higher, Repeated, DataPath;
        UDP_LOSS = "udp_loss", "UDP 64 B, sent but not reaching the container's UDP layer", "%", Lower, Repeated, DataPath;
        RR_P50 = "rr_p50", "Request/response over one connection, p50", "µs", Lower, Repeated, DataPath;
        RR_P99 = "rr_p99", "Request/response over one connection, p99", "µs", Lower, Repeated, DataPath;
        RR_MAX = "rr_max", "Request/response over one connection, worst", "µs", Lower, Repeated, DataPath;
        RR_TPS = "rr_tps", "Request/response transactions", "k/s", Higher, Repeated, DataPath;
        CONN_RATE = "conn_rate", "New connections through DNAT", "k/s", Higher, Repeated, DataPath;
        CONN_P50 = "conn_p50", "Connect time through DNAT, p50", "µs", Lower, Repeated, DataPath;
        CONN_P99 = "conn_p99", "Connect time through DNAT, p99", "µs", Lower, Repeated, DataPath;
        CONN_MAX = "conn_max", "Connect time through DNAT, worst", "µs", Lower, Repeated, DataPath;
        EGRESS_TCP = "egress_tcp", "TCP, 1 stream, container → outside (masquerade)", "Gbit/s", Higher, Repeated, DataPath;
        EGRESS_CONN = "egress_conn", "New connections, container → outside (masquerade)", "k/s", Higher, Repeated, DataPath;
        EGRESS_CONN_P99 = "egress_conn_p99", "Connect time, container → outside, p99", "µs", Lower, Repeated, DataPath;
        EGRESS_CONN_MAX = "egress_conn_max", "Connect time, container → outside, worst", "µs", Lower, Repeated, DataPath;
        CPU_SOFTIRQ_GBIT = "cpu_softirq_per_gbit", "softirq CPU per Gbit (TCP, 1 stream →)", "ms", Lower, Repeated, Cpu;
        CPU_SYS_GBIT = "cpu_sys_per_gbit", "system+irq+softirq CPU per Gbit (TCP, 1 stream →)", "ms", Lower, Repeated, Cpu;
        CPU_SOFTIRQ_PKTS = "cpu_softirq_per_100k_pkts", "softirq CPU per 100k UDP packets reaching the container", "ms", Lower, Repeated, Cpu;
        CPU_SYS_PKTS = "cpu_sys_per_100k_pkts", "system+irq+softirq CPU per 100k UDP packets reaching the container", "ms", Lower, Repeated, Cpu;
        CPU_SYS_CONN = "cpu_sys_per_conn", "system+irq+softirq CPU per new connection", "µs", Lower, Repeated, Cpu;
        UPDATE_ADD = "update_add", "Add one mapping (iptables -A / nft add element / API publish)", "ms", Lower, Tail, Update;
        UPDATE_DEL = "update_del", "Remove one mapping (iptables -D / nft delete element / API unpublish)", "ms", Lower, Tail, Update;
        UPDATE_CLI_ADD = "update_cli_add", "Add one mapping, `datapath container publish`", "ms", Lower, Tail, Update;
        UPDATE_CLI_DEL = "update_cli_del", "Remove one mapping, `datapath container unpublish`", "ms", Lower, Tail, Update;
        UPDATE_MAP_ADD = "update_map_add", "Insert one entry into the published-ports BPF map", "µs", Lower, Tail, Update;
        UPDATE_MAP_DEL = "update_map_del", "Delete one entry from the published-ports BPF map", "µs", Lower, Tail, Update;
        CP_PUBLISH = "cp_publish", "Publish one port (API), N individual mappings present", "ms", Lower, Tail, Control;
        CP_UNPUBLISH = "cp_unpublish", "Unpublish one port (API), N individual mappings present", "ms", Lower, Tail, Control;
        CP_PUBLISH_CLI = "cp_publish_cli", "Publish one port (`datapath container publish`), N individual mappings present", "ms", Lower, Tail, Control;
        CP_UNPUBLISH_CLI = "cp_unpublish_cli", "Unpublish one port (`datapath container unpublish`), N individual mappings present", "ms", Lower, Tail, Control;
        CP_PUBLISH_RANGE = "cp_publish_range", "Publish one port (API), N mappings present as one range", "ms", Lower, Tail, Control;
        CP_UNPUBLISH_RANGE = "cp_unpublish_range", "Unpublish one port (API), N mappings present as one range", "ms", Lower, Tail, Control;
        CP_BATCH = "cp_batch", "Publish N ports in one request (API), 10 mappings × 1,000 containers present", "ms", Lower, Tail, Control;
        CONTROL_ADD = "control_add", "Container add with one published port (API), N containers present", "ms", Lower, Tail, Control;
        CONTROL_DEL = "control_del", "Container delete (API), N containers present", "ms", Lower, Tail, Control;
        CP_LIST = "cp_list", "`GET /v1/containers`, N containers present", "ms", Lower, Tail, Control;
        CP_LIST_CLI = "cp_list_cli", "`datapath container list`, N containers present", "ms", Lower, Tail, Control;
        CP_STATUS = "cp_status", "`GET /v1/status`, N containers present", "ms", Lower, Tail, Control;
        CP_RESTART = "cp_restart", "Restart to ready: agent killed, started, API answering with everything adopted, N containers present", "ms", Lower, Tail, Control;
        CP_RSS = "cp_rss", "Agent resident memory, N containers (10 mappings each) present", "MiB", Lower, Repeated, Control;
    }
}

/// Samples of one metric for one mode at one number of published ports.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The metric.
    pub metric: &'static Metric,
    /// The mode.
    pub mode: Mode,
    /// Published ports present.
    pub ports: usize,
    /// The samples.
    pub samples: Vec<f64>,
}

impl Entry {
    /// The samples' summary.
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.samples)
    }
}

/// Every sample taken, and what went wrong.
#[derive(Clone, Debug, Default)]
pub struct Results {
    /// Samples by metric, mode and size.
    pub entries: Vec<Entry>,
    /// Measurements that failed, and other remarks.
    pub notes: Vec<String>,
    /// Measurements started.
    pub measurements: usize,
    /// Measurements started although the machine was not quiet.
    pub not_quiet: usize,
    /// Rate-limit accuracy, one row per case.
    pub ratelimit: Vec<RateRow>,
    /// Request/response latency through an ingress limit under load.
    pub ratelimit_rr: Vec<RrRow>,
    /// The flow core under load.
    pub flowcore: FlowcoreResults,
    /// Pod to pod across nodes, and the cluster's control plane.
    pub cluster: crate::bench::cluster::ClusterResults,
    /// Latency tails (issue 22).
    pub tails: TailsResults,
    /// The agent's CPU time during each data-path measurement.
    pub agent_cpu: Vec<AgentCpu>,
    /// The node's own connections to a published port on its loopback.
    pub local: Vec<crate::bench::local::LocalRow>,
}

/// The agent's CPU seconds during one data-path measurement.
#[derive(Clone, Debug)]
pub struct AgentCpu {
    /// The measurement's kind (its `--only` name).
    pub kind: &'static str,
    /// The mode.
    pub mode: Mode,
    /// Published ports present.
    pub ports: usize,
    /// CPU seconds, user and system.
    pub secs: f64,
}

impl Results {
    /// Adds one sample.
    pub fn record(&mut self, metric: &'static Metric, mode: Mode, ports: usize, value: f64) {
        match self
            .entries
            .iter_mut()
            .find(|e| e.metric.id == metric.id && e.mode == mode && e.ports == ports)
        {
            Some(e) => e.samples.push(value),
            None => self.entries.push(Entry {
                metric,
                mode,
                ports,
                samples: vec![value],
            }),
        }
    }

    /// The samples of `metric` for `mode` at `ports`.
    pub fn get(&self, metric: &Metric, mode: Mode, ports: usize) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.metric.id == metric.id && e.mode == mode && e.ports == ports)
    }

    /// The summary of `metric` for `mode` at `ports`.
    pub fn summary(&self, metric: &Metric, mode: Mode, ports: usize) -> Option<Summary> {
        self.get(metric, mode, ports).and_then(Entry::summary)
    }

    /// The port counts `metric` was measured at, ascending.
    pub fn sizes(&self, metric: &Metric) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .entries
            .iter()
            .filter(|e| e.metric.id == metric.id)
            .map(|e| e.ports)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The modes with samples of `metric`, in report order.
    pub fn modes(&self, metric: &Metric) -> Vec<Mode> {
        Mode::ALL
            .into_iter()
            .filter(|m| {
                self.entries
                    .iter()
                    .any(|e| e.metric.id == metric.id && e.mode == *m)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_accumulate_per_metric_mode_and_size() {
        let mut r = Results::default();
        r.record(&metric::TCP_1, Mode::Iptables, 4, 20.0);
        r.record(&metric::TCP_1, Mode::Iptables, 4, 22.0);
        r.record(&metric::TCP_1, Mode::Iptables, 10_000, 21.0);
        r.record(&metric::TCP_1, Mode::DatapathTc, 4, 25.0);
        assert_eq!(
            r.get(&metric::TCP_1, Mode::Iptables, 4)
                .map(|e| e.samples.len()),
            Some(2)
        );
        assert_eq!(r.sizes(&metric::TCP_1), vec![4, 10_000]);
        assert_eq!(
            r.modes(&metric::TCP_1),
            vec![Mode::Iptables, Mode::DatapathTc]
        );
        assert_eq!(
            r.summary(&metric::TCP_1, Mode::Iptables, 4)
                .map(|s| s.median),
            Some(21.0)
        );
        let ids: std::collections::HashSet<_> = metric::ALL.iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), metric::ALL.len(), "metric ids are unique");
    }
}
