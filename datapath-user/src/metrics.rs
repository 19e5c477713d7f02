//! The agent's Prometheus metrics, made with `prometheus-client`: the
//! datapath's [`Figures`] (read from the maps at each scrape), and what the
//! agent measures of itself as it runs (map update latencies, API requests),
//! kept here in process-wide families.
//!
//! Names follow Prometheus conventions: `datapath_` prefix, base units
//! (seconds, bytes), `_total` for counters. Per-container series carry a
//! `container` label and exist only while the container does (the families
//! of a scrape are built from the live containers).

use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

use crate::model::Figures;

/// The content type of the metrics page (OpenMetrics text, which
/// Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// What the agent measures of itself, for the life of the process.
struct Telemetry {
    map_updates: Family<Labels, Histogram>,
    api_requests: Family<Labels, Counter>,
    api_durations: Family<Labels, Histogram>,
}

fn latency_histogram() -> Histogram {
    // 1 µs … ~1 s.
    Histogram::new(exponential_buckets(1e-6, 4.0, 11))
}

static TELEMETRY: LazyLock<Telemetry> = LazyLock::new(|| Telemetry {
    map_updates: Family::new_with_constructor(latency_histogram),
    api_requests: Family::default(),
    api_durations: Family::new_with_constructor(latency_histogram),
});

/// Records one update of map `map` that took `took`.
pub fn map_update(map: &'static str, took: Duration) {
    TELEMETRY
        .map_updates
        .get_or_create(&vec![("map", map.to_owned())])
        .observe(took.as_secs_f64());
}

/// Runs `update` (an update of map `map`) and records its latency.
pub fn timed<T>(map: &'static str, update: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = update();
    map_update(map, start.elapsed());
    out
}

/// Records one API request: its method, route (the pattern, not the
/// path, so names do not become labels), HTTP status and duration.
pub fn api_request(method: &str, route: &str, status: u16, took: Duration) {
    let route = route.to_owned();
    TELEMETRY
        .api_requests
        .get_or_create(&vec![
            ("method", method.to_owned()),
            ("route", route.clone()),
            ("code", status.to_string()),
        ])
        .inc();
    TELEMETRY
        .api_durations
        .get_or_create(&vec![("method", method.to_owned()), ("route", route)])
        .observe(took.as_secs_f64());
}

fn gauge(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

fn ratio(used: u64, max: u64) -> Gauge<f64, std::sync::atomic::AtomicU64> {
    let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    if max > 0 {
        g.set(used as f64 / max as f64);
    }
    g
}

/// Adds a family of counters built from `(labels, value)` pairs.
fn counters(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    let fam = Family::<Labels, Counter>::default();
    for (labels, v) in values {
        fam.get_or_create(&labels).inc_by(v);
    }
    reg.register(name, help, fam);
}

/// Adds a family of gauges built from `(labels, value)` pairs.
fn gauges(
    reg: &mut Registry,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (Labels, u64)>,
) {
    let fam = Family::<Labels, Gauge>::default();
    for (labels, v) in values {
        fam.get_or_create(&labels).set(gauge(v).get());
    }
    reg.register(name, help, fam);
}

fn label(k: &'static str, v: impl Into<String>) -> (&'static str, String) {
    (k, v.into())
}

/// The metrics page: `figures` and the agent's own measurements, in the
/// OpenMetrics text format.
pub fn render(figures: &Figures) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::default();
    reg.register(
        "datapath_build",
        "The agent's version",
        Info::new(vec![label("version", env!("CARGO_PKG_VERSION"))]),
    );

    counters(
        &mut reg,
        "datapath_drops",
        "Packets the datapath dropped, by reason",
        figures
            .counters
            .iter()
            .filter_map(|(k, v)| Some((vec![label("reason", k.strip_prefix("drop_")?)], *v))),
    );
    counters(
        &mut reg,
        "datapath_events",
        "What the datapath did besides dropping (new and translated flows, conntrack transitions, monitor events lost), by event",
        figures
            .counters
            .iter()
            .filter(|(k, _)| !k.starts_with("drop_"))
            .map(|(k, v)| (vec![label("event", k.as_str())], *v)),
    );

    let per_dir = |rx: fn(&crate::model::figures::ContainerFigures) -> u64,
                   tx: fn(&crate::model::figures::ContainerFigures) -> u64| {
        figures.containers.iter().flat_map(move |c| {
            [
                (
                    vec![label("container", &c.name), label("direction", "rx")],
                    rx(c),
                ),
                (
                    vec![label("container", &c.name), label("direction", "tx")],
                    tx(c),
                ),
            ]
        })
    };
    counters(
        &mut reg,
        "datapath_container_packets",
        "Packets of each container through the datapath: rx delivered to it, tx sent by it",
        per_dir(|c| c.rx_packets, |c| c.tx_packets),
    );
    counters(
        &mut reg,
        "datapath_container_bytes",
        "Bytes (whole frames) of each container through the datapath: rx delivered to it, tx sent by it",
        per_dir(|c| c.rx_bytes, |c| c.tx_bytes),
    );
    counters(
        &mut reg,
        "datapath_container_drops",
        "Packets of each container the datapath dropped, by reason",
        figures.containers.iter().flat_map(|c| {
            c.drops.iter().filter_map(|(k, v)| {
                Some((
                    vec![
                        label("container", &c.name),
                        label("reason", k.strip_prefix("drop_")?),
                    ],
                    *v,
                ))
            })
        }),
    );
    gauges(
        &mut reg,
        "datapath_container_conntrack_entries",
        "Entries of each container's flows in the main conntrack table (two per flow)",
        figures
            .containers
            .iter()
            .map(|c| (vec![label("container", &c.name)], c.conntrack_entries)),
    );
    counters(
        &mut reg,
        "datapath_container_conntrack_over_share",
        "Flows of each container kept out of the main conntrack table: its share was used up",
        figures
            .containers
            .iter()
            .map(|c| (vec![label("container", &c.name)], c.conntrack_over_share)),
    );
    counters(
        &mut reg,
        "datapath_container_masquerade_exhausted",
        "New flows of each container dropped: no free masquerade port for their destination",
        figures
            .containers
            .iter()
            .map(|c| (vec![label("container", &c.name)], c.masquerade_exhausted)),
    );

    let rate = |pick: fn(&crate::model::DirectionCounters) -> [u64; 3]| {
        figures.containers.iter().flat_map(move |c| {
            [("egress", &c.rate.egress), ("ingress", &c.rate.ingress)]
                .into_iter()
                .flat_map(move |(dir, d)| {
                    ["passed", "marked", "dropped"]
                        .into_iter()
                        .zip(pick(d))
                        .map(move |(outcome, v)| {
                            (
                                vec![
                                    label("container", &c.name),
                                    label("direction", dir),
                                    label("outcome", outcome),
                                ],
                                v,
                            )
                        })
                })
        })
    };
    counters(
        &mut reg,
        "datapath_ratelimit_packets",
        "Packets through each container's rate limiter, by direction and outcome (marked ones are also passed)",
        rate(|d| [d.passed_packets, d.marked_packets, d.dropped_packets]),
    );
    counters(
        &mut reg,
        "datapath_ratelimit_bytes",
        "Bytes through each container's rate limiter, by direction and outcome (marked ones are also passed)",
        rate(|d| [d.passed_bytes, d.marked_bytes, d.dropped_bytes]),
    );

    gauges(
        &mut reg,
        "datapath_conntrack_entries",
        "Conntrack entries (two per flow) by table (main: confirmed, new: unconfirmed), protocol and state",
        figures.conntrack.iter().map(|f| {
            (
                vec![
                    label("table", &f.table),
                    label("protocol", &f.protocol),
                    label("state", &f.state),
                ],
                f.entries,
            )
        }),
    );
    let used = |table: &str| {
        figures
            .conntrack
            .iter()
            .filter(|f| f.table == table)
            .map(|f| f.entries)
            .sum::<u64>()
    };
    gauges(
        &mut reg,
        "datapath_conntrack_capacity_entries",
        "Capacity of each conntrack table (entries)",
        [
            (vec![label("table", "main")], figures.conntrack_max),
            (vec![label("table", "new")], figures.conntrack_new_max),
        ],
    );
    let fill = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (table, max) in [
        ("main", figures.conntrack_max),
        ("new", figures.conntrack_new_max),
    ] {
        fill.get_or_create(&vec![label("table", table)])
            .set(ratio(used(table), max).get());
    }
    reg.register(
        "datapath_conntrack_fill_ratio",
        "Fraction of each conntrack table in use",
        fill,
    );

    gauges(
        &mut reg,
        "datapath_masquerade_ports_in_use",
        "Masquerade ports in use per destination (address:port/protocol), the busiest destinations",
        figures
            .masquerade
            .iter()
            .map(|m| (vec![label("destination", &m.destination)], m.ports)),
    );
    reg.register(
        "datapath_masquerade_ports_per_destination",
        "Ports of the masquerade range: the most flows to one destination",
        gauge(figures.masquerade_range),
    );

    reg.register(
        "datapath_program_stats_enabled",
        "Whether the kernel gathers the programs' run time (while metrics are scraped, or by --bpf-stats)",
        gauge(u64::from(figures.program_stats)),
    );
    let run_time = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    let runs = Family::<Labels, Counter>::default();
    for p in &figures.programs {
        let labels = vec![
            label("program", &p.program),
            label("attachment", &p.attachment),
        ];
        run_time
            .get_or_create(&labels)
            .inc_by(p.run_time_ns as f64 / 1e9);
        runs.get_or_create(&labels).inc_by(p.run_count);
    }
    reg.register(
        "datapath_program_run_time_seconds",
        "Time the kernel spent running each attached program (counted while program stats are enabled)",
        run_time,
    );
    reg.register(
        "datapath_program_runs",
        "Runs of each attached program (counted while program stats are enabled)",
        runs,
    );

    let cpu = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    for (mode, us) in [
        ("user", figures.agent_cpu_user_us),
        ("system", figures.agent_cpu_system_us),
    ] {
        cpu.get_or_create(&vec![label("mode", mode)])
            .inc_by(us as f64 / 1e6);
    }
    reg.register(
        "datapath_agent_cpu_seconds",
        "CPU time the agent used since it started, in user mode and in the kernel on its behalf",
        cpu,
    );
    let passes = Counter::<u64>::default();
    passes.inc_by(figures.conntrack_count_passes);
    reg.register(
        "datapath_conntrack_count_passes",
        "Passes of the background count of the conntrack entries (the figures above come from it)",
        passes,
    );
    reg.register(
        "datapath_conntrack_count_max_pass_entries",
        "The most conntrack entries one pass of the background count touched",
        gauge(figures.conntrack_count_max_pass_entries),
    );

    let t = &*TELEMETRY;
    reg.register(
        "datapath_map_update_duration_seconds",
        "Latency of the agent's updates of each BPF map",
        t.map_updates.clone(),
    );
    reg.register(
        "datapath_api_requests",
        "API requests by method, route and HTTP status",
        t.api_requests.clone(),
    );
    reg.register(
        "datapath_api_request_duration_seconds",
        "Latency of API requests by method and route",
        t.api_durations.clone(),
    );

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::figures::ContainerFigures;

    fn figures(containers: &[&str]) -> Figures {
        Figures {
            counters: [("drop_spoofed".to_owned(), 3), ("dnat_new".to_owned(), 5)].into(),
            containers: containers
                .iter()
                .map(|n| ContainerFigures {
                    name: (*n).to_owned(),
                    rx_packets: 11,
                    ..ContainerFigures::default()
                })
                .collect(),
            conntrack_max: 100,
            conntrack_new_max: 25,
            agent_cpu_user_us: 1_500_000,
            ..Figures::default()
        }
    }

    #[test]
    fn the_page_names_drops_by_reason_and_containers_by_label() {
        let page = render(&figures(&["web"])).expect("render");
        assert!(
            page.contains("datapath_drops_total{reason=\"spoofed\"} 3"),
            "{page}"
        );
        assert!(
            page.contains("datapath_events_total{event=\"dnat_new\"} 5"),
            "{page}"
        );
        assert!(
            page.contains(
                "datapath_container_packets_total{container=\"web\",direction=\"rx\"} 11"
            ),
            "{page}"
        );
        assert!(
            page.contains("datapath_agent_cpu_seconds_total{mode=\"user\"} 1.5"),
            "{page}"
        );
        assert!(
            page.contains("# TYPE datapath_conntrack_fill_ratio gauge"),
            "{page}"
        );
        assert!(page.ends_with("# EOF\n"), "{page}");
    }

    #[test]
    fn a_container_no_longer_listed_has_no_series() {
        let page = render(&figures(&[])).expect("render");
        assert!(!page.contains("container=\"web\""), "{page}");
    }
}
