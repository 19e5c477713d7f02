//! The results as markdown (for people and the README) and JSON (for
//! tools), with ratios against `iptables`, `nftables-map` and `route`.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::bench::{
    mode::Mode,
    ratelimit::{self, RateRow, RrRow},
    results::{Better, Metric, Results, Section, Shape, metric},
    run::{BASE_PORTS, Config},
    stats::{Summary, percentile},
    tails::{self, Path},
    targets::{self, Outcome},
};

/// Where and how the run happened.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    /// Start time, UTC, ISO 8601.
    pub started: String,
    /// The command that reproduces the run.
    pub command: String,
    /// Wall-clock seconds the run took.
    pub duration_s: f64,
    /// `git describe` of the tree measured.
    pub commit: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// The versions of the tools compared.
    pub tools: Vec<String>,
    /// What each mode installed.
    pub beds: Vec<(Mode, String)>,
}

/// The baselines ratios are given against.
pub const BASELINES: [Mode; 3] = [Mode::Iptables, Mode::NftablesMap, Mode::Route];

/// A number with a sensible number of digits.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn arrow(m: &Metric) -> &'static str {
    match m.better {
        Better::Higher => "↑",
        Better::Lower => "↓",
    }
}

fn cell(m: &Metric, s: Option<Summary>) -> String {
    match (s, m.shape) {
        (None, _) => "—".to_owned(),
        (Some(s), Shape::Repeated) => {
            format!("{} ({}–{})", num(s.median), num(s.min), num(s.max))
        }
        (Some(s), Shape::Distribution) => format!("{} / {}", num(s.median), num(s.p99)),
        (Some(s), Shape::Tail) => {
            format!("{} / {} / {}", num(s.median), num(s.p99), num(s.max))
        }
    }
}

fn ratio_cell(ours: Option<Summary>, base: Option<Summary>) -> String {
    match (ours, base) {
        (Some(o), Some(b)) => match o.ratio(&b) {
            Some(r) if o.parity(&b) => format!("≈ {r:.2}×"),
            Some(r) => format!("{r:.2}×"),
            None => "—".to_owned(),
        },
        _ => "—".to_owned(),
    }
}

fn header(out: &mut String, first: &[&str], modes: &[Mode]) {
    let cols: Vec<String> = first
        .iter()
        .map(|s| (*s).to_owned())
        .chain(modes.iter().map(|m| m.name().to_owned()))
        .collect();
    let _ = writeln!(out, "| {} |", cols.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        cols.iter()
            .enumerate()
            .map(|(i, _)| if i < first.len() { "---|" } else { "---:|" })
            .collect::<String>()
    );
}

fn metrics_of(section: Section) -> Vec<&'static Metric> {
    metric::ALL
        .iter()
        .copied()
        .filter(|m| m.section == section)
        .collect()
}

/// The control-plane section's heading and how it is measured.
fn control_plane_text(cfg: &Config) -> String {
    format!(
        "## Control plane at scale (p50 / p99 / max; `Ports` is N)\n\n\
         One agent in a node of its own (the control plane does not depend on the uplink hook; \
         shown under datapath-tc). Mappings are published one API call at a time, as Docker, \
         CNI portmap and Kubernetes hostPorts add them, onto a filler container; the timed port \
         belongs to another container. {} samples per figure; the CLI figures include the \
         process start. Then {} containers with 10 ports each are added (the node's 10,000 \
         mappings), and container add/delete ({} containers, one port each), the listings, the \
         memory and a restart (SIGKILL, start, API answering with everything adopted, {} times) \
         are measured with them present. The range rows have the same number of ports present \
         as one range mapping.\n\n",
        cfg.control.samples, cfg.control.containers, cfg.control.churn, cfg.control.restarts
    )
}

/// A table of `section`'s figures at `ports` for every mode measured.
fn figures_table(out: &mut String, r: &Results, section: Section, modes: &[Mode]) {
    header(out, &["Figure"], modes);
    for m in metrics_of(section) {
        if r.modes(m).is_empty() {
            continue;
        }
        let cells: Vec<String> = modes
            .iter()
            .map(|mode| cell(m, r.summary(m, *mode, BASE_PORTS)))
            .collect();
        let _ = writeln!(
            out,
            "| {} ({}, {}) | {} |",
            m.label,
            m.unit,
            arrow(m),
            cells.join(" | ")
        );
    }
    out.push('\n');
}

/// Ratio tables of `metrics` against each baseline (at the base port
/// count, or at every port count measured if `sized`).
fn ratio_tables(
    out: &mut String,
    r: &Results,
    metrics: &[&'static Metric],
    modes: &[Mode],
    sized: bool,
) {
    for base in BASELINES {
        if !modes.contains(&base) {
            continue;
        }
        let others: Vec<Mode> = modes.iter().copied().filter(|m| *m != base).collect();
        let _ = writeln!(out, "Against **{base}**:\n");
        let first: &[&str] = if sized {
            &["Figure", "Ports"]
        } else {
            &["Figure"]
        };
        header(out, first, &others);
        let mut rows = 0;
        for m in metrics.iter().copied() {
            let sizes = if sized { r.sizes(m) } else { vec![BASE_PORTS] };
            for ports in sizes {
                let Some(b) = r.summary(m, base, ports) else {
                    continue;
                };
                rows += 1;
                let cells: Vec<String> = others
                    .iter()
                    .map(|mode| ratio_cell(r.summary(m, *mode, ports), Some(b)))
                    .collect();
                let lead = if sized {
                    format!("{} ({}) | {ports}", m.label, arrow(m))
                } else {
                    format!("{} ({})", m.label, arrow(m))
                };
                let _ = writeln!(out, "| {lead} | {} |", cells.join(" | "));
            }
        }
        if rows == 0 {
            out.push_str("| (no figures) |\n");
        }
        out.push('\n');
    }
}

/// A table of `metrics` by port count.
fn sized_table(out: &mut String, r: &Results, metrics: &[&'static Metric], modes: &[Mode]) {
    header(out, &["Figure", "Ports"], modes);
    for m in metrics.iter().copied() {
        for ports in r.sizes(m) {
            let cells: Vec<String> = modes
                .iter()
                .map(|mode| cell(m, r.summary(m, *mode, ports)))
                .collect();
            let _ = writeln!(
                out,
                "| {} ({}, {}) | {ports} | {} |",
                m.label,
                m.unit,
                arrow(m),
                cells.join(" | ")
            );
        }
    }
    out.push('\n');
}

/// The targets table.
fn targets_table(out: &mut String, outcomes: &[Outcome]) {
    let modes: Vec<Mode> = Mode::OURS.to_vec();
    header(out, &["Target"], &modes);
    let mut seen: Vec<&str> = Vec::new();
    for o in outcomes {
        if seen.contains(&o.target.text) {
            continue;
        }
        seen.push(o.target.text);
        let cells: Vec<String> = modes
            .iter()
            .map(|m| {
                outcomes
                    .iter()
                    .find(|x| x.target.text == o.target.text && x.mode == *m)
                    .map_or_else(|| "—".to_owned(), Outcome::cell)
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", o.target.text, cells.join(" | "));
    }
    out.push('\n');
}

/// The whole report as markdown.
pub fn markdown(meta: &Meta, cfg: &Config, r: &Results) -> String {
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| cfg.modes.contains(m))
        .collect();
    let outcomes = targets::check_all(r, BASE_PORTS);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmark: this datapath against iptables, nftables and plain routing\n"
    );
    let _ = writeln!(
        out,
        "- Run: {} (UTC), {:.0} s, `{}` at {}",
        meta.started, meta.duration_s, meta.command, meta.commit
    );
    let _ = writeln!(
        out,
        "- Machine: {}, {} CPUs, Linux {}; {}",
        meta.cpu,
        meta.cpus,
        meta.kernel,
        meta.tools.join(", ")
    );
    // Only the rate section (`--only ratelimit`): no mode was measured.
    let modes_measured = !cfg.kinds.is_empty();
    if modes_measured {
        let _ = writeln!(
            out,
            "- Each figure: {} runs per mode, modes interleaved; iperf3 runs of {} s, request/response and connection runs of {:.1} s. \
             Cells: median (min–max). Ratios: median / median; `≈` marks parity (the interquartile ranges overlap, the noise cannot tell the two apart). \
             ↑ higher is better, ↓ lower is better.",
            cfg.reps,
            cfg.iperf_secs,
            cfg.window.as_secs_f64()
        );
    }
    let _ = writeln!(
        out,
        "- Noise: {} of {} measurements started while the machine was less than {:.0}% idle (after waiting up to {:.1} s).\n",
        r.not_quiet,
        r.measurements,
        cfg.quiet.min_idle * 100.0,
        cfg.quiet.max_wait.as_secs_f64()
    );

    out.push_str("## Targets\n\n");
    if !r.entries.is_empty() {
        targets_table(&mut out, &outcomes);
    }
    for line in crate::bench::local::targets(&r.local) {
        let _ = writeln!(out, "- {line} (see the loopback section).");
    }
    for (text, met, measured) in ratelimit_targets(r) {
        if measured > 0 {
            let word = if met == measured { "met" } else { "MISSED" };
            let _ = writeln!(
                out,
                "- {text}: {word}, in {met} of {measured} cases (the limiter does not depend on \
                 the uplink hook; see the rate-limit section)."
            );
        }
    }
    out.push('\n');
    if modes_measured {
        modes_sections(&mut out, cfg, r, &modes);
    }
    // A node of its own: measured with or without the modes.
    if !r.modes(&metric::CP_PUBLISH).is_empty() || !r.modes(&metric::CONTROL_ADD).is_empty() {
        out.push_str(&control_plane_text(cfg));
        sized_table(
            &mut out,
            r,
            &metrics_of(Section::Control),
            &[Mode::DatapathTc],
        );
    }
    if !r.local.is_empty() {
        out.push_str(&crate::bench::local::markdown(&r.local));
    }
    if !r.ratelimit.is_empty() {
        ratelimit_section(&mut out, r);
    }
    if !r.ratelimit_rr.is_empty() {
        ratelimit_rr_section(&mut out, r);
    }
    flowcore_section(&mut out, r);
    cluster_section(&mut out, r);
    tails_section(&mut out, r);
    if !meta.beds.is_empty() {
        out.push_str("## Setup\n\n");
        for (mode, what) in &meta.beds {
            let _ = writeln!(out, "- `{mode}`: {what}");
        }
    }
    if !r.notes.is_empty() {
        out.push_str("\n## Notes\n\n");
        for n in &r.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}

/// The sections of the figures measured in each mode.
fn modes_sections(dest: &mut String, cfg: &Config, r: &Results, modes: &[Mode]) {
    let modes = modes.to_vec();
    let publishing: Vec<Mode> = modes.iter().copied().filter(|m| m.publishes()).collect();
    let mut out = std::mem::take(dest);
    let _ = writeln!(
        out,
        "## Data path ({BASE_PORTS} published ports: the ports under test)\n"
    );
    figures_table(&mut out, r, Section::DataPath, &modes);
    out.push_str("### Ratios\n\n");
    ratio_tables(&mut out, r, &metrics_of(Section::DataPath), &modes, false);

    out.push_str("## CPU per unit of work (machine-wide /proc/stat deltas)\n\n");
    figures_table(&mut out, r, Section::Cpu, &modes);
    ratio_tables(&mut out, r, &metrics_of(Section::Cpu), &modes, false);

    let _ = writeln!(
        out,
        "## Scaling: hitting the last of N published ports\n\n\
         Each repetition goes through every size in turn (the filler ports are re-installed \
         each time), so the sizes of one mode are measured minutes, not a whole run, apart.\n"
    );
    sized_table(&mut out, r, metric::SCALING, &modes);
    out.push_str("### Ratios\n\n");
    ratio_tables(&mut out, r, metric::SCALING, &publishing, true);

    let _ = writeln!(
        out,
        "## Updating one mapping (p50 / p99 / max of {} samples)\n\n\
         iptables and nft: one command each (`iptables -t nat -A|-D`, `nft add|delete element`), \
         process start included, as Docker and CNI plugins run them. This datapath: one API call \
         publishing or unpublishing a port of a running container (map entry plus one record \
         of the agent's state journal, written and fsynced), the same through the `datapath` CLI (process start \
         included), and the BPF map update alone.\n",
        cfg.update_samples
    );
    sized_table(&mut out, r, &metrics_of(Section::Update), &publishing);
    agent_cpu_table(&mut out, r);

    *dest = out;
}

/// The agent's CPU time during each data-path measurement, by kind.
fn agent_cpu_table(out: &mut String, r: &Results) {
    if r.agent_cpu.is_empty() {
        return;
    }
    out.push_str(
        "## The agent's CPU time during each data-path measurement\n\n\
         `/proc/<pid>/stat` user + system of the agent process around each measurement \
         (the packets themselves are the kernel's work, not the agent's).\n\n\
         | Kind | Mode | Ports | Runs | Median (ms) | Max (ms) |\n|---|---|---:|---:|---:|---:|\n",
    );
    let mut keys: Vec<(&str, Mode, usize)> = r
        .agent_cpu
        .iter()
        .map(|a| (a.kind, a.mode, a.ports))
        .collect();
    keys.dedup();
    let mut seen = Vec::new();
    for key in keys {
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let ms: Vec<f64> = r
            .agent_cpu
            .iter()
            .filter(|a| (a.kind, a.mode, a.ports) == key)
            .map(|a| a.secs * 1e3)
            .collect();
        let (p50, _, max) = tails::tail(&ms);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            key.0,
            key.1,
            key.2,
            ms.len(),
            num(p50),
            num(max)
        );
    }
    out.push('\n');
}

/// The targets of the latency-tail section: (text, datapath's figure,
/// whether met), `None` where a figure is missing.
pub fn tails_targets(r: &Results) -> Vec<(String, Option<(String, bool)>)> {
    let t = &r.tails;
    let mut out = Vec::new();
    if t.connect.is_empty() && t.updates.is_empty() {
        return out;
    }
    for path in Path::ALL {
        let ours = t.runs(Mode::DatapathTc, path);
        let base = t.runs(Mode::IptablesNft, path);
        for (which, pick) in [("first", 0usize), ("last", usize::MAX)] {
            let at = |v: &[&tails::ConnectRow]| {
                if pick == 0 { v.first() } else { v.last() }.map(|r| r.p99)
            };
            let text = format!(
                "Connect p99 {}, {which} repetition ≤ 0.9× iptables-nft",
                path.label()
            );
            let cell = at(&ours).zip(at(&base)).map(|(o, b)| {
                let ratio = o / b;
                (
                    format!("{}×: {} against {} µs", num(ratio), num(o), num(b)),
                    ratio <= 0.9,
                )
            });
            out.push((text, cell));
        }
    }
    let update = t.updates.iter().find(|u| u.mode == Mode::DatapathTc);
    for (what, pick) in [("added", 0), ("removed", 1)] {
        let cell = update.map(|u| {
            let v = if pick == 0 { &u.add_ms } else { &u.del_ms };
            let (_, _, max) = tails::tail(v);
            (format!("{} ms", num(max)), max <= 10.0)
        });
        out.push((
            format!(
                "One mapping {what} under load with {} present: max ≤ 10 ms",
                t.ports
            ),
            cell,
        ));
    }
    out
}

/// The latency-tail section.
fn tails_section(out: &mut String, r: &Results) {
    let t = &r.tails;
    if t.connect.is_empty() && t.updates.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Latency tails: {} published ports, this datapath against iptables-nft\n\n\
         New connections (connect, 1 byte each way, close) through a published port and from \
         the container through the masquerade, repeated in turn (modes interleaved), each \
         repetition on its own so that drift within a run shows. Cells: connect p50 / p99 / \
         max (µs), rate, and the agent's CPU time during the run. Then one mapping added and \
         removed repeatedly while new connections run through another published port.\n",
        t.ports
    );
    for (text, cell) in tails_targets(r) {
        let cell = match cell {
            Some((figure, true)) => format!("met: {figure}"),
            Some((figure, false)) => format!("MISSED: {figure}"),
            None => "not measured".to_owned(),
        };
        let _ = writeln!(out, "- {text}: {cell}");
    }
    out.push('\n');
    for path in Path::ALL {
        let _ = writeln!(
            out,
            "### Connect {}\n\n| Repetition | Mode | p50 / p99 / max (µs) | Rate (k/s) | Failed | Agent CPU (ms) |\n|---:|---|---:|---:|---:|---:|",
            path.label()
        );
        let mut rows: Vec<&tails::ConnectRow> =
            t.connect.iter().filter(|c| c.path == path).collect();
        rows.sort_by_key(|c| (c.rep, c.mode != Mode::DatapathTc));
        for c in rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} / {} / {} | {} | {} | {} |",
                c.rep + 1,
                c.mode,
                num(c.p50),
                num(c.p99),
                num(c.max),
                num(c.rate),
                c.failed,
                c.agent_cpu_s.map_or("–".to_owned(), |s| num(s * 1e3))
            );
        }
        out.push('\n');
    }
    out.push_str(
        "### One mapping added and removed under load\n\n\
         | Mode | Samples | Add p50 / p99 / max (ms) | Remove p50 / p99 / max (ms) | Load (k conn/s) | Load connect p99 (µs) | Agent CPU (ms) |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for u in &t.updates {
        let (a50, a99, amax) = tails::tail(&u.add_ms);
        let (d50, d99, dmax) = tails::tail(&u.del_ms);
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} / {} | {} / {} / {} | {} | {} | {} |",
            u.mode,
            u.add_ms.len(),
            num(a50),
            num(a99),
            num(amax),
            num(d50),
            num(d99),
            num(dmax),
            num(u.load_rate),
            num(u.load_p99),
            u.agent_cpu_s.map_or("–".to_owned(), |s| num(s * 1e3))
        );
    }
    out.push('\n');
}

/// The latency-tail section's figures.
fn tails_json(r: &Results) -> Value {
    let t = &r.tails;
    json!({
        "ports": t.ports,
        "connect": t.connect.iter().map(|c| json!({
            "mode": c.mode.name(),
            "path": c.path.id(),
            "rep": c.rep,
            "rate_kps": c.rate,
            "p50_us": c.p50,
            "p99_us": c.p99,
            "max_us": c.max,
            "failed": c.failed,
            "agent_cpu_s": c.agent_cpu_s,
        })).collect::<Vec<_>>(),
        "updates": t.updates.iter().map(|u| {
            let (a50, a99, amax) = tails::tail(&u.add_ms);
            let (d50, d99, dmax) = tails::tail(&u.del_ms);
            json!({
                "mode": u.mode.name(),
                "samples": u.add_ms.len(),
                "add_ms": { "p50": a50, "p99": a99, "max": amax },
                "del_ms": { "p50": d50, "p99": d99, "max": dmax },
                "load_rate_kps": u.load_rate,
                "load_p99_us": u.load_p99,
                "agent_cpu_s": u.agent_cpu_s,
            })
        }).collect::<Vec<_>>(),
        "targets": tails_targets(r).into_iter().map(|(text, cell)| json!({
            "target": text,
            "figure": cell.as_ref().map(|c| c.0.clone()),
            "met": cell.map(|c| c.1),
        })).collect::<Vec<_>>(),
    })
}

/// The flow core under load: sustained connections, a SYN flood, the
/// masquerade to one destination, table walks.
fn flowcore_section(out: &mut String, r: &Results) {
    let f = &r.flowcore;
    if f.sustained.is_empty() && f.fill.is_empty() && f.snat.is_empty() && f.gc.is_empty() {
        return;
    }
    out.push_str(
        "## Conntrack under load (issue 12)\n\n\
         New connections through a published port, as fast as the client goes, from its 64 \
         addresses, in consecutive windows: their rate over time and the failures. nf_conntrack \
         keeps every closed connection for TIME_WAIT (120 s); this datapath's closed flows give \
         way to new ones.\n\n\
         | Mode | windows | first (k/s) | lowest | last | completed | failed |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in &f.sustained {
        let low = row.rates.iter().copied().fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} | {} | {} |",
            row.mode,
            row.rates.len(),
            row.rates.first().map_or("—".to_owned(), |v| num(*v)),
            if low.is_finite() {
                num(low)
            } else {
                "—".to_owned()
            },
            row.rates.last().map_or("—".to_owned(), |v| num(*v)),
            row.completed,
            row.failed
        );
    }
    if !f.fill.is_empty() {
        out.push_str(
            "\nNew connections during a spoofed SYN flood at the same port (hping3 \
             `--rand-source --flood`):\n\n\
             | Mode | connections (k/s) | completed | failed | tracked entries after |\n\
             |---|---:|---:|---:|---:|\n",
        );
        for row in &f.fill {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} |",
                row.mode,
                num(row.rate),
                row.completed,
                row.failed,
                row.entries
            );
        }
    }
    if !f.snat.is_empty() {
        out.push_str(
            "\nMasqueraded UDP flows from the container to one destination, one more at a time, \
             each answered, until the first is not:\n\n\
             | Mode | ports | flows | first 100 (µs each) | last 100 (µs each) |\n\
             |---|---|---:|---:|---:|\n",
        );
        for row in &f.snat {
            let flows = if row.capped {
                format!("≥ {}", row.flows)
            } else {
                row.flows.to_string()
            };
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} |",
                row.mode,
                row.range,
                flows,
                num(row.first_us),
                num(row.last_us)
            );
        }
    }
    if !f.gc.is_empty() {
        out.push_str(
            "\nWalking the main conntrack table (established flows, two entries each): \
             `BPF_MAP_LOOKUP_BATCH` as the agent does, key by key as it did before, \
             `datapath conntrack list --json` (API and JSON included), and `conntrack flush` \
             (the kernel removes every flow):\n\n\
             | Entries | batch (ms) | key by key (ms) | list (ms) | flush (ms) |\n\
             |---:|---:|---:|---:|---:|\n",
        );
        for row in &f.gc {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                row.entries,
                num(row.batch_ms),
                num(row.per_key_ms),
                row.list_ms.map_or("—".to_owned(), num),
                num(row.flush_ms)
            );
        }
    }
    out.push('\n');
}

/// Achieved/configured ratio and retransmits of the rate limiter and tbf.
fn ratelimit_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## Rate limits: the datapath's limiter against tc tbf\n\n\
         TCP through iperf3 from (egress) or to (ingress, through a published port) a container \
         in its own cgroup, BBR senders both ways and Reno senders into the container; tbf set up \
         as the CNI `bandwidth` plugin does (ingress: on the host veth; egress: on an ifb fed from \
         the host veth; latency 25 ms); both get the datapath's default bucket for the direction. \
         A fresh node for every measurement. Cells: median (min–max) over the repetitions. \
         Targets (issues 5 and 18): within ±{:.0}% of the configured rate, retransmits no more \
         than tbf's. Retransmits are the sender's (iperf3, warm-up left out); in brackets, the \
         segments the receiver reported as received twice (D-SACK) over the whole transfer, \
         warm-up included: retransmissions of segments that were not lost, only late.\n",
        ratelimit::MAX_DEVIATION * 100.0
    );
    out.push_str(
        "| Case | datapath achieved / configured | tbf achieved / configured | \
         datapath retransmits | tbf retransmits | within ±5% | retransmits ≤ tbf |\n\
         |---|---:|---:|---:|---:|---|---|\n",
    );
    for row in &r.ratelimit {
        let (our_ratio, our_retr) = row.ours();
        let (tbf_ratio, tbf_retr) = row.theirs();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.label(),
            fraction_cell(our_ratio),
            fraction_cell(tbf_ratio),
            retransmit_cell(our_retr, RateRow::spurious(&row.datapath)),
            retransmit_cell(tbf_retr, RateRow::spurious(&row.tbf)),
            verdict_word(row.accurate()),
            verdict_word(row.retransmits_at_most_tbf()),
        );
    }
    out.push('\n');
}

/// Request/response latency into a container through its ingress limit
/// while a bulk transfer fills it, datapath against tbf.
fn ratelimit_rr_section(out: &mut String, r: &Results) {
    out.push_str(
        "### Request/response through an ingress limit under load\n\n\
         One-byte transactions over one TCP connection from the client into the container \
         (socat echo in the container's cgroup), one every 2 ms, while one BBR stream fills the \
         ingress limit; \
         the requests share the bucket, or tbf's queue, with the bulk transfer. Cells: median \
         (min–max) over the repetitions of each run's figure. Target (issue 18): p99 latency no \
         more than tbf's.\n\n\
         | Bulk transfer | datapath p50 (µs) | tbf p50 (µs) | datapath p99 (µs) | tbf p99 (µs) | \
         datapath bulk achieved / configured | tbf bulk achieved / configured | p99 ≤ tbf |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let us = |s: Option<Summary>| {
        s.map_or_else(
            || "—".to_owned(),
            |s| format!("{} ({}–{})", fmt_us(s.median), fmt_us(s.min), fmt_us(s.max)),
        )
    };
    for row in &r.ratelimit_rr {
        let (ours, tbf) = (&row.datapath, &row.tbf);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.label(),
            us(RrRow::summary(ours, |s| s.p50_us)),
            us(RrRow::summary(tbf, |s| s.p50_us)),
            us(RrRow::summary(ours, |s| s.p99_us)),
            us(RrRow::summary(tbf, |s| s.p99_us)),
            fraction_cell(RrRow::summary(ours, |s| s.bulk_ratio)),
            fraction_cell(RrRow::summary(tbf, |s| s.bulk_ratio)),
            verdict_word(row.latency_at_most_tbf()),
        );
    }
    out.push('\n');
}

/// A latency in µs with three significant digits.
fn fmt_us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// `median (min–max)` of a ratio.
fn fraction_cell(s: Option<Summary>) -> String {
    s.map_or_else(
        || "—".to_owned(),
        |s| format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max),
    )
}

/// `median (min–max)` of a count.
fn count_cell(s: Option<Summary>) -> String {
    s.map_or_else(
        || "—".to_owned(),
        |s| format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max),
    )
}

/// `median (min–max) [spurious median]` of retransmissions.
fn retransmit_cell(all: Option<Summary>, spurious: Option<Summary>) -> String {
    match spurious {
        Some(sp) => format!("{} [{:.0}]", count_cell(all), sp.median),
        None => count_cell(all),
    }
}

fn verdict_word(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "not measured",
    }
}

/// How many rate-limit cases meet each of issues 5's and 18's targets, as
/// `(target, met, measured)`.
pub fn ratelimit_targets(r: &Results) -> [(&'static str, usize, usize); 3] {
    let tally = |verdicts: Vec<bool>| (verdicts.iter().filter(|v| **v).count(), verdicts.len());
    let (acc, acc_n) = tally(r.ratelimit.iter().filter_map(RateRow::accurate).collect());
    let (ret, ret_n) = tally(
        r.ratelimit
            .iter()
            .filter_map(RateRow::retransmits_at_most_tbf)
            .collect(),
    );
    let (rr, rr_n) = tally(
        r.ratelimit_rr
            .iter()
            .filter_map(RrRow::latency_at_most_tbf)
            .collect(),
    );
    [
        (
            "Rate limit within ±5% of the configured rate (TCP)",
            acc,
            acc_n,
        ),
        ("Rate limit: retransmits ≤ tbf's", ret, ret_n),
        (
            "Request/response p99 through an ingress limit under load ≤ tbf's",
            rr,
            rr_n,
        ),
    ]
}

fn summary_json(s: &Summary) -> Value {
    json!({
        "n": s.n, "min": s.min, "q1": s.q1, "median": s.median,
        "q3": s.q3, "p99": s.p99, "max": s.max,
    })
}

/// The whole report as JSON.
pub fn json(meta: &Meta, cfg: &Config, r: &Results) -> Value {
    let figures: Vec<Value> = r
        .entries
        .iter()
        .map(|e| {
            let mut ratios = serde_json::Map::new();
            for base in BASELINES {
                if let (Some(o), Some(b)) = (e.summary(), r.summary(e.metric, base, e.ports))
                    && base != e.mode
                    && let Some(ratio) = o.ratio(&b)
                {
                    ratios.insert(
                        base.name().to_owned(),
                        json!({ "ratio": ratio, "parity": o.parity(&b) }),
                    );
                }
            }
            json!({
                "metric": e.metric.id,
                "label": e.metric.label,
                "unit": e.metric.unit,
                "better": match e.metric.better { Better::Higher => "higher", Better::Lower => "lower" },
                "mode": e.mode.name(),
                "ports": e.ports,
                "samples": e.samples,
                "summary": e.summary().as_ref().map(summary_json),
                "ratios": ratios,
            })
        })
        .collect();
    let targets: Vec<Value> = targets::check_all(r, BASE_PORTS)
        .iter()
        .map(|o| {
            json!({
                "target": o.target.text,
                "mode": o.mode.name(),
                "value": o.value,
                "status": o.status.word(),
                "met": o.status.is_met(),
            })
        })
        .collect();
    let ratelimit: Vec<Value> = r
        .ratelimit
        .iter()
        .map(|row| {
            let samples = |v: &[ratelimit::RateSample]| {
                v.iter()
                    .map(|s| {
                        json!({
                            "ratio": s.ratio,
                            "retransmits": s.retransmits,
                            "spurious_retransmits": s.spurious,
                        })
                    })
                    .collect::<Vec<_>>()
            };
            json!({
                "case": row.label(),
                "rate_bps": row.case.rate_bps,
                "burst_bytes": row.case.burst_bytes,
                "streams": row.case.streams,
                "congestion": row.case.congestion.name(),
                "seconds": row.case.seconds,
                "datapath": samples(&row.datapath),
                "tbf": samples(&row.tbf),
                "within_5_percent": row.accurate(),
                "retransmits_at_most_tbf": row.retransmits_at_most_tbf(),
            })
        })
        .collect();
    let ratelimit_rr: Vec<Value> = r
        .ratelimit_rr
        .iter()
        .map(|row| {
            let samples = |v: &[ratelimit::RrSample]| {
                v.iter()
                    .map(|s| {
                        json!({
                            "p50_us": s.p50_us,
                            "p99_us": s.p99_us,
                            "transactions": s.transactions,
                            "bulk_ratio": s.bulk_ratio,
                            "bulk_retransmits": s.bulk_retransmits,
                        })
                    })
                    .collect::<Vec<_>>()
            };
            json!({
                "case": row.label(),
                "rate_bps": row.case.rate_bps,
                "burst_bytes": row.case.burst_bytes,
                "seconds": row.case.seconds,
                "datapath": samples(&row.datapath),
                "tbf": samples(&row.tbf),
                "p99_at_most_tbf": row.latency_at_most_tbf(),
            })
        })
        .collect();
    let mut targets = targets;
    for (text, met, measured) in ratelimit_targets(r) {
        if measured > 0 {
            targets.push(json!({
                "target": text,
                "mode": "datapath",
                "value": met,
                "status": format!("{met} of {measured} cases"),
                "met": met == measured,
            }));
        }
    }
    json!({
        "meta": {
            "started": meta.started,
            "command": meta.command,
            "duration_s": meta.duration_s,
            "commit": meta.commit,
            "kernel": meta.kernel,
            "cpu": meta.cpu,
            "cpus": meta.cpus,
            "tools": meta.tools,
            "beds": meta.beds.iter().map(|(m, d)| json!({"mode": m.name(), "setup": d})).collect::<Vec<_>>(),
        },
        "config": {
            "quick": cfg.quick,
            "reps": cfg.reps,
            "iperf_secs": cfg.iperf_secs,
            "window_s": cfg.window.as_secs_f64(),
            "conn_threads": cfg.conn_threads,
            "sizes": cfg.sizes,
            "base_ports": BASE_PORTS,
            "update_samples": cfg.update_samples,
            "control": {
                "samples": cfg.control.samples,
                "containers": cfg.control.containers,
                "churn": cfg.control.churn,
                "restarts": cfg.control.restarts,
            },
            "quiet_min_idle": cfg.quiet.min_idle,
        },
        "noise": { "measurements": r.measurements, "not_quiet": r.not_quiet },
        "figures": figures,
        "ratelimit": ratelimit,
        "ratelimit_rr": ratelimit_rr,
        "flowcore": flowcore_json(r),
        "cluster": cluster_json(r),
        "tails": tails_json(r),
        "agent_cpu": r.agent_cpu.iter().map(|a| json!({
            "kind": a.kind,
            "mode": a.mode.name(),
            "ports": a.ports,
            "secs": a.secs,
        })).collect::<Vec<_>>(),
        "local": crate::bench::local::json(&r.local),
        "targets": targets,
        "notes": r.notes,
    })
}

/// The flow-core section's figures.
fn flowcore_json(r: &Results) -> Value {
    let f = &r.flowcore;
    json!({
        "sustained": f.sustained.iter().map(|row| json!({
            "mode": row.mode.name(),
            "rates_kps": row.rates,
            "completed": row.completed,
            "failed": row.failed,
            "first_error": row.first_error,
        })).collect::<Vec<_>>(),
        "fill": f.fill.iter().map(|row| json!({
            "mode": row.mode.name(),
            "rate_kps": row.rate,
            "completed": row.completed,
            "failed": row.failed,
            "entries_after": row.entries,
            "first_error": row.first_error,
        })).collect::<Vec<_>>(),
        "snat": f.snat.iter().map(|row| json!({
            "mode": row.mode.name(),
            "ports": row.range,
            "flows": row.flows,
            "capped": row.capped,
            "first_us": row.first_us,
            "last_us": row.last_us,
        })).collect::<Vec<_>>(),
        "gc": f.gc.iter().map(|row| json!({
            "entries": row.entries,
            "batch_ms": row.batch_ms,
            "per_key_ms": row.per_key_ms,
            "list_ms": row.list_ms,
            "flush_ms": row.flush_ms,
        })).collect::<Vec<_>>(),
    })
}

/// The targets, one line each, for the terminal.
pub fn targets_text(r: &Results) -> String {
    let mut out = String::new();
    // A run of the rate section alone measured no mode.
    let outcomes = if r.entries.is_empty() {
        Vec::new()
    } else {
        targets::check_all(r, BASE_PORTS)
    };
    for o in outcomes {
        let _ = writeln!(
            out,
            "{:<14} {:<70} {}",
            o.mode.name(),
            o.target.text,
            o.cell()
        );
    }
    for line in crate::bench::local::targets(&r.local) {
        let _ = writeln!(out, "{:<14} {line}", "datapath");
    }
    for (text, met, measured) in ratelimit_targets(r) {
        if measured > 0 {
            let word = if met == measured { "met" } else { "MISSED" };
            let _ = writeln!(
                out,
                "{:<14} {:<70} {word}, in {met} of {measured} cases",
                "datapath", text
            );
        }
    }
    for (text, cell) in tails_targets(r) {
        let cell = match cell {
            Some((figure, true)) => format!("met: {figure}"),
            Some((figure, false)) => format!("MISSED: {figure}"),
            None => "not measured".to_owned(),
        };
        let _ = writeln!(out, "{:<14} {text:<70} {cell}", Mode::DatapathTc.name());
    }
    out
}

/// The cluster section: pod to pod across two nodes, three ways, and the
/// control plane.
fn cluster_section(out: &mut String, r: &Results) {
    let c = &r.cluster;
    if c.rows.is_empty() && c.reach_ms.is_empty() {
        return;
    }
    out.push_str(
        "## Cluster: pod to pod across two nodes (issue 19)\n\n\
         From a pod on node 1 to a pod on node 2 of one underlay switch (medians of the \
         repetitions). `route`: plain routing between the nodes, no encapsulation (the limit); \
         `kernel-vxlan`: flannel's VXLAN backend (a kernel VXLAN device, static FDB and \
         neighbour entries, a route per peer, iptables MASQUERADE of traffic leaving the \
         cluster); `datapath`: this datapath's cluster mode (etcd, the agents, VXLAN driven \
         from the programs).\n\n\
         | Mode | bulk TCP (Gbit/s) | UDP 64 B (k pps) | RR p50 (µs) | RR p99 (µs) | connections (k/s) |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for row in &c.rows {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} | {} |",
            row.mode,
            num(row.tcp_gbits),
            num(row.udp_pps / 1000.0),
            num(row.rr_p50_us),
            num(row.rr_p99_us),
            num(row.conn_rate / 1000.0)
        );
    }
    if let (Some(ours), Some(kernel)) = (c.row("datapath"), c.row("kernel-vxlan")) {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                num(a / b)
            } else {
                "—".to_owned()
            }
        };
        let _ = writeln!(
            out,
            "\n`datapath` / `kernel-vxlan`: bulk TCP {}× (goal ≥ 1.0), connections/s {}× \
             (goal ≥ 1.2), UDP {}×, RR p99 {}× (lower is better).",
            ratio(ours.tcp_gbits, kernel.tcp_gbits),
            ratio(ours.conn_rate, kernel.conn_rate),
            ratio(ours.udp_pps, kernel.udp_pps),
            ratio(ours.rr_p99_us, kernel.rr_p99_us)
        );
    }
    if !c.reach_ms.is_empty() {
        let _ = writeln!(
            out,
            "\nControl plane: from `datapath container add` on node 1 (CLI process start \
             included) to the first UDP answer the new pod gives a pod on node 3, over {} \
             pods: p50 {} ms, p99 {} ms (goal p99 < 100 ms).",
            c.reach_ms.len(),
            num(percentile(&c.reach_ms, 50.0)),
            num(percentile(&c.reach_ms, 99.0))
        );
    }
    if let Some(ms) = c.peers_ms {
        let _ = writeln!(
            out,
            "\n{} simulated peers registered in etcd: node 1's agent listed every one of them \
             {} ms after the last registration.",
            c.peers,
            num(ms)
        );
    }
    out.push('\n');
}

/// The cluster section's figures.
fn cluster_json(r: &Results) -> Value {
    let c = &r.cluster;
    json!({
        "rows": c.rows.iter().map(|row| json!({
            "mode": row.mode,
            "tcp_gbits": row.tcp_gbits,
            "udp_pps": row.udp_pps,
            "rr_p50_us": row.rr_p50_us,
            "rr_p99_us": row.rr_p99_us,
            "conn_per_s": row.conn_rate,
        })).collect::<Vec<_>>(),
        "reach_ms": c.reach_ms,
        "peers": c.peers,
        "peers_ms": c.peers_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_json_carry_figures_ratios_and_targets() {
        let mut r = Results::default();
        for (mode, v) in [
            (Mode::Iptables, [20.0, 21.0, 22.0]),
            (Mode::DatapathTc, [30.0, 31.0, 32.0]),
        ] {
            for x in v {
                r.record(&metric::CONN_RATE, mode, BASE_PORTS, x);
            }
        }
        let cfg = Config::quick();
        let md = markdown(&Meta::default(), &cfg, &r);
        assert!(
            md.contains("| New connections through DNAT (k/s, ↑) |"),
            "{md}"
        );
        assert!(md.contains("1.48×"), "{md}");
        assert!(md.contains("met: 1.48×"), "{md}");
        let j = json(&Meta::default(), &cfg, &r);
        let fig = j["figures"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["mode"] == "datapath-tc"))
            .expect("our figure");
        assert_eq!(fig["summary"]["median"], 31.0);
        assert_eq!(fig["ratios"]["iptables"]["parity"], false);
        assert_eq!(num(25.345), "25.3");
        assert_eq!(num(0.0123), "0.012");
    }

    #[test]
    fn the_tail_targets_compare_the_first_and_the_last_repetition_and_the_worst_update() {
        use crate::bench::tails::{ConnectRow, UpdateRow};
        let mut r = Results::default();
        r.tails.ports = 10_004;
        // Ours: 80 µs at first, drifting to 200 µs; theirs: 100 µs flat.
        for (mode, p99s) in [
            (Mode::DatapathTc, [80.0, 150.0, 200.0]),
            (Mode::IptablesNft, [100.0, 100.0, 100.0]),
        ] {
            for (rep, p99) in p99s.into_iter().enumerate() {
                r.tails.connect.push(ConnectRow {
                    mode,
                    path: Path::Published,
                    rep,
                    rate: 10.0,
                    p50: 50.0,
                    p99,
                    max: 2.0 * p99,
                    failed: 0,
                    agent_cpu_s: None,
                });
            }
        }
        r.tails.updates.push(UpdateRow {
            mode: Mode::DatapathTc,
            add_ms: vec![0.3, 0.4, 12.5],
            del_ms: vec![0.3, 0.3, 0.5],
            load_rate: 10.0,
            load_p99: 120.0,
            agent_cpu_s: Some(0.01),
        });
        let t = tails_targets(&r);
        let find = |needle: &str| {
            t.iter()
                .find(|(text, _)| text.contains(needle))
                .and_then(|(_, cell)| cell.clone())
        };
        assert_eq!(
            find("published port, first").map(|c| c.1),
            Some(true),
            "{t:?}"
        );
        assert_eq!(find("published port, last").map(|c| c.1), Some(false));
        assert_eq!(find("masquerade, first"), None, "not measured");
        assert_eq!(find("added").map(|c| c.1), Some(false), "worst 12.5 ms");
        assert_eq!(find("removed").map(|c| c.1), Some(true));
        let md = markdown(&Meta::default(), &Config::quick(), &r);
        assert!(
            md.contains("## Latency tails: 10004 published ports"),
            "{md}"
        );
        assert!(md.contains("MISSED: 2.00×: 200 against 100 µs"), "{md}");
        let j = json(&Meta::default(), &Config::quick(), &r);
        assert_eq!(j["tails"]["updates"][0]["add_ms"]["max"], 12.5);
    }
}
