//! The control plane at scale (issue 21): one agent in a node of its own,
//! mappings published one API call at a time (as Docker, CNI portmap and
//! Kubernetes hostPorts add them), then 1,000 containers with 10 ports
//! each; what one change costs with 0, 1,000 and 10,000 mappings present,
//! container add and delete with 0 and 1,000 containers present, the
//! listings, a restart to ready and the agent's memory.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{
    agent::Agent,
    bench::{
        api::Api,
        mode::Mode,
        results::{Metric, Results, metric},
    },
    names,
    netns::Netns,
    node::Node,
};

/// How much of the control plane to measure.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// Whether to measure it at all.
    pub enabled: bool,
    /// Samples of each update and listing figure.
    pub samples: usize,
    /// Containers present for the "at scale" figures (10 ports each).
    pub containers: usize,
    /// Containers added and deleted for the add/delete figures.
    pub churn: usize,
    /// Restarts timed.
    pub restarts: usize,
}

/// Ports each of the containers present publishes.
const PORTS_EACH: usize = 10;
/// The port published and unpublished for the update figures.
const UPDATE_PORT: u16 = 60_000;
/// First filler port (individual mappings).
const FILLER_BASE: usize = 20_000;
/// First port of the containers present.
const SCALE_BASE: usize = 1_000;
/// First port of the containers added and deleted.
const CHURN_BASE: usize = 40_000;
/// First port of the batch publishes.
const BATCH_BASE: usize = 50_000;

/// The node, its agent and the API.
struct Plane<'n> {
    node: &'n Node,
    agent: Agent<'n>,
    api: Api,
    namespaces: Vec<Netns>,
}

impl<'n> Plane<'n> {
    /// An empty namespace for a container, made in-process.
    fn netns(&mut self, tag: &str) -> String {
        let ns = Netns::new_bare(&format!("{}{}-{tag}", names::PREFIX, self.node.id()));
        let name = ns.name().to_owned();
        self.namespaces.push(ns);
        name
    }

    fn add(&mut self, name: &str, ports: &[String]) -> Result<Duration> {
        let ns = self.netns(name);
        let start = Instant::now();
        self.api
            .add_container(name, &ns, ports)
            .with_context(|| format!("adding {name}"))?;
        Ok(start.elapsed())
    }

    fn cli(&self, args: &[&str]) -> Result<Duration> {
        let start = Instant::now();
        let out = self.agent.cli(args);
        let took = start.elapsed();
        if !out.status.success() {
            bail!(
                "datapath {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    }

    fn timed(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Duration> {
        let start = Instant::now();
        self.api.call(method, path, body)?;
        Ok(start.elapsed())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn record(r: &mut Results, m: &'static Metric, present: usize, d: Duration) {
    r.record(m, Mode::DatapathTc, present, ms(d));
}

/// Times publishing and unpublishing [`UPDATE_PORT`] of container
/// `update`, `samples` times each way, through the API (`api` metrics) and
/// the CLI, with `present` mappings present.
fn updates(
    p: &Plane<'_>,
    r: &mut Results,
    cfg: &ControlConfig,
    present: usize,
    api: (&'static Metric, &'static Metric),
    cli: bool,
) -> Result<()> {
    let spec = format!("{UPDATE_PORT}:80");
    for _ in 0..cfg.samples {
        let start = Instant::now();
        p.api.publish("update", &spec)?;
        record(r, api.0, present, start.elapsed());
        let start = Instant::now();
        p.api.unpublish("update", &spec)?;
        record(r, api.1, present, start.elapsed());
    }
    if cli {
        for _ in 0..cfg.samples.div_ceil(2) {
            let d = p.cli(&["container", "publish", "update", &spec])?;
            record(r, &metric::CP_PUBLISH_CLI, present, d);
            let d = p.cli(&["container", "unpublish", "update", &spec])?;
            record(r, &metric::CP_UNPUBLISH_CLI, present, d);
        }
    }
    Ok(())
}

/// Publishes individual filler ports, one API call each, until `n` are
/// published.
fn fill_to(p: &Plane<'_>, have: &mut usize, n: usize) -> Result<()> {
    while *have < n {
        let port = FILLER_BASE + *have;
        p.api
            .publish("filler", &format!("{port}:{port}"))
            .with_context(|| format!("publishing filler port {port}"))?;
        *have += 1;
    }
    Ok(())
}

/// The agent's resident memory in MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// Adds and deletes `cfg.churn` containers (one port each), one at a time,
/// with `present` containers present.
fn churn(p: &mut Plane<'_>, r: &mut Results, cfg: &ControlConfig, present: usize) -> Result<()> {
    let tag = format!("churn{present}");
    let mut added = Vec::new();
    for i in 0..cfg.churn {
        let name = format!("{tag}-{i}");
        let d = p.add(&name, &[format!("{}:80", CHURN_BASE + i)])?;
        record(r, &metric::CONTROL_ADD, present, d);
        added.push(name);
    }
    for name in added {
        let d = p.timed("DELETE", &format!("/v1/containers/{name}"), None)?;
        record(r, &metric::CONTROL_DEL, present, d);
    }
    Ok(())
}

/// Measures the control plane (see the module's documentation); samples
/// go to `r`, progress to stdout.
pub fn run(cfg: &ControlConfig, r: &mut Results) -> Result<()> {
    let node = Node::new();
    let agent = Agent::builder(&node).pool("198.19.128.0/20").start();
    let api = Api::new(agent.socket());
    let mut p = Plane {
        node: &node,
        agent,
        api,
        namespaces: Vec::new(),
    };
    p.add("update", &[])?;
    p.add("filler", &[])?;

    // One change with 0, 1,000 and 10,000 individual mappings present.
    let mut fillers = 0;
    for present in [0, 1_000, 10_000] {
        let start = Instant::now();
        fill_to(&p, &mut fillers, present)?;
        println!(
            "control     : {present} individual mappings present (published one by one in {:.1} s)",
            start.elapsed().as_secs_f64()
        );
        updates(
            &p,
            r,
            cfg,
            present,
            (&metric::CP_PUBLISH, &metric::CP_UNPUBLISH),
            true,
        )?;
    }
    // The same number present as one range.
    p.timed("DELETE", "/v1/containers/filler", None)?;
    let last = FILLER_BASE + 10_000 - 1;
    p.add(
        "filler-range",
        &[format!("{FILLER_BASE}-{last}:{FILLER_BASE}-{last}")],
    )?;
    updates(
        &p,
        r,
        cfg,
        10_000,
        (&metric::CP_PUBLISH_RANGE, &metric::CP_UNPUBLISH_RANGE),
        false,
    )?;
    p.timed("DELETE", "/v1/containers/filler-range", None)?;

    // Containers added and deleted with none present.
    churn(&mut p, r, cfg, 0)?;

    // 1,000 containers with 10 individual ports each.
    let start = Instant::now();
    for i in 0..cfg.containers {
        let ports: Vec<String> = (0..PORTS_EACH)
            .map(|j| format!("{}:{}", SCALE_BASE + i * PORTS_EACH + j, 80 + j))
            .collect();
        p.add(&format!("c{i}"), &ports)?;
    }
    println!(
        "control     : {} containers with {PORTS_EACH} ports each added in {:.1} s",
        cfg.containers,
        start.elapsed().as_secs_f64()
    );
    let n = cfg.containers;
    for size in [100, 1_000, 5_000] {
        let specs: Vec<String> = (0..size)
            .map(|k| format!("{}:80", BATCH_BASE + k))
            .collect();
        let body = serde_json::json!({ "publish": specs });
        let d = p.timed("POST", "/v1/containers/update/ports", Some(&body))?;
        record(r, &metric::CP_BATCH, size, d);
        p.timed("DELETE", "/v1/containers/update/ports", Some(&body))?;
    }
    for _ in 0..cfg.samples {
        let d = p.timed("GET", "/v1/containers", None)?;
        record(r, &metric::CP_LIST, n, d);
        let d = p.timed("GET", "/v1/status", None)?;
        record(r, &metric::CP_STATUS, n, d);
    }
    for _ in 0..cfg.samples.div_ceil(4) {
        let d = p.cli(&["container", "list", "--json"])?;
        record(r, &metric::CP_LIST_CLI, n, d);
    }
    churn(&mut p, r, cfg, n)?;
    let pid = p.agent.pid().context("the agent is not running")?;
    let rss = rss_mib(pid)?;
    r.record(&metric::CP_RSS, Mode::DatapathTc, n, rss);

    // Restarts: killed, started, answering.
    for _ in 0..cfg.restarts {
        p.agent.kill();
        let start = Instant::now();
        p.agent.try_restart().map_err(anyhow::Error::msg)?;
        let st = p.api.call("GET", "/v1/status", None)?;
        let took = start.elapsed();
        if st["containers"].as_u64() != Some(n as u64 + 1) {
            bail!(
                "after a restart the agent has {} containers",
                st["containers"]
            );
        }
        record(r, &metric::CP_RESTART, n, took);
        let pid = p.agent.pid().context("the agent is not running")?;
        r.record(&metric::CP_RSS, Mode::DatapathTc, n, rss_mib(pid)?);
    }
    println!(
        "control     : restart to ready at {n} containers: {}",
        r.summary(&metric::CP_RESTART, Mode::DatapathTc, n)
            .map_or("—".to_owned(), |s| format!(
                "{:.0} ms (worst {:.0} ms)",
                s.median, s.max
            ))
    );
    // The agent goes first (it is dropped with the plane), then the
    // namespaces.
    let Plane {
        agent, namespaces, ..
    } = p;
    drop(agent);
    drop(namespaces);
    Ok(())
}
