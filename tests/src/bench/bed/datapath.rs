//! Published ports with this datapath: the agent runs in the node, every
//! change goes through its API.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use datapath_common::{ServiceKey, ServiceValue, names, proto};

use super::{Backend, Mapping, UPDATE_PORT, filler_ports};
use crate::{agent::Agent, bench::api::Api, netns::Netns};

/// The container whose ports are the fillers.
const FILLER: &str = "filler";
/// The container whose port is published and unpublished to time one
/// mapping's update.
const UPDATE: &str = "update";

/// The agent of one node, with the namespaces of the filler and update
/// containers.
#[derive(Debug)]
pub struct AgentBackend<'n> {
    agent: Agent<'n>,
    api: Api,
    filler_ns: Netns,
    _update_ns: Netns,
    fillers: usize,
}

impl<'n> AgentBackend<'n> {
    /// Takes over a running agent; `filler_ns` and `update_ns` are empty
    /// namespaces for the filler and update containers. The update
    /// container is added now, without ports.
    pub fn new(agent: Agent<'n>, filler_ns: Netns, update_ns: Netns) -> Result<Self> {
        let api = Api::new(agent.socket());
        api.add_container(UPDATE, update_ns.name(), &[])
            .context("adding the update container")?;
        Ok(Self {
            agent,
            api,
            filler_ns,
            _update_ns: update_ns,
            fillers: 0,
        })
    }

    /// The agent's API.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The agent.
    pub fn agent(&self) -> &Agent<'n> {
        &self.agent
    }

    /// Times the `datapath` CLI (a process of its own, like `iptables`)
    /// running `args`.
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

    /// The agent's published-ports map, opened from its pin.
    fn services(&self) -> Result<HashMap<MapData, ServiceKey, ServiceValue>> {
        let pin = self.agent.bpffs_dir().join("maps").join(names::SERVICES);
        let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        HashMap::try_from(Map::HashMap(data)).context("SERVICES is not a hash map")
    }
}

impl Backend for AgentBackend<'_> {
    fn agent_pid(&self) -> Option<u32> {
        self.agent.pid()
    }

    fn set_fillers(&mut self, n: usize) -> Result<()> {
        if self.fillers > 0 {
            self.api.del_container(FILLER)?;
            self.fillers = 0;
        }
        // Individual mappings, as Docker and CNI portmap publish them (in
        // one request: the control-plane section times one at a time).
        let specs: Vec<String> = filler_ports(n).map(|p| format!("{p}:{p}")).collect();
        if !specs.is_empty() {
            self.api
                .add_container(FILLER, self.filler_ns.name(), &specs)?;
        }
        self.fillers = n;
        Ok(())
    }

    fn time_add(&mut self) -> Result<Duration> {
        let spec = Mapping::tcp(UPDATE_PORT, 80).spec();
        let start = Instant::now();
        self.api.publish(UPDATE, &spec)?;
        Ok(start.elapsed())
    }

    fn time_del(&mut self) -> Result<Duration> {
        let spec = Mapping::tcp(UPDATE_PORT, 80).spec();
        let start = Instant::now();
        self.api.unpublish(UPDATE, &spec)?;
        Ok(start.elapsed())
    }

    fn time_cli_add(&mut self) -> Option<Result<Duration>> {
        let spec = Mapping::tcp(UPDATE_PORT, 80).spec();
        Some(self.cli(&["container", "publish", UPDATE, &spec]))
    }

    fn time_cli_del(&mut self) -> Option<Result<Duration>> {
        let spec = Mapping::tcp(UPDATE_PORT, 80).spec();
        Some(self.cli(&["container", "unpublish", UPDATE, &spec]))
    }

    fn time_map_update(&mut self) -> Option<Result<(Duration, Duration)>> {
        let run = || -> Result<(Duration, Duration)> {
            let mut map = self.services()?;
            let key = ServiceKey {
                addr: [0; 4],
                port: UPDATE_PORT + 1,
                proto: proto::TCP,
                _pad: 0,
            };
            let value = ServiceValue {
                backend_addr: Ipv4Addr::new(198, 19, 255, 254).octets(),
                backend_port: 80,
                ..ServiceValue::default()
            };
            let start = Instant::now();
            map.insert(key, value, 0)
                .context("insert a published port")?;
            let add = start.elapsed();
            let start = Instant::now();
            map.remove(&key).context("remove a published port")?;
            Ok((add, start.elapsed()))
        };
        Some(run())
    }

    fn flush_conntrack(&self) -> Result<()> {
        self.api.flush_conntrack()
    }

    fn describe(&self) -> String {
        let hook = self
            .api
            .call("GET", "/v1/status", None)
            .ok()
            .and_then(|s| s["uplink"]["hook"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned());
        format!(
            "datapath agent, uplink hook {hook}: {} published ports in SERVICES",
            self.fillers + super::UNDER_TEST.len()
        )
    }
}
