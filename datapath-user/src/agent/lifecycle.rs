//! A container's lifecycle: add, update (rate limits) and delete.
//!
//! `add` and `update` are transactions: each step that changes the kernel
//! or the state is written down in a [`Transaction`] as it is taken, and if
//! a later step fails, the steps taken are undone in reverse order, so a
//! container is all there or not at all. The record is written last (one
//! durable journal record, [`Store::commit`]): a container is recorded
//! only once it is complete, and an agent cut off before that finds only
//! orphans on its next start ([`super::reconcile`]).
//!
//! `add` takes these steps: the veth pair ([`Netlink::create_container_link`]),
//! the endpoint and published ports in the maps and the container program
//! on the host end ([`Lifecycle::fill`]), the rate limits
//! ([`Datapath::apply_limits`]), then the record.
//!
//! `delete` cannot be undone: it records the container's removal first,
//! then tears down whatever is there, going on after failures.

use std::{collections::BTreeMap, path::Path};

use datapath_common::Endpoint;

use super::{
    AgentError, Node, internal, publish, rate_target,
    transaction::{Step, Transaction},
};
use crate::{
    api::{AddContainer, ContainerInfo, UpdateContainer},
    cgroup,
    datapath::{Datapath, Flows, Reader},
    error::error_chain,
    model::{
        RateLimits,
        identity::{MAX_ALIAS_LEN, VethTag},
        limits::{LimitError, limit, updated},
        mac::format_mac,
        mtu::validate_mtu,
        names::{host_veth_name, validate_container_name, validate_ifname},
    },
    net::{
        link::{ContainerLink, LinkInfo, Netlink, NetlinkError},
        netns::{self, Netns},
    },
    store::{Change, Container, Store},
};

/// The container lifecycle, over the parts of the agent it changes.
pub struct Lifecycle<'a> {
    /// The node's configuration and uplink.
    pub node: &'a Node,
    /// The datapath's maps and programs.
    pub dp: &'a mut Datapath,
    /// The netlink connection.
    pub net: &'a Netlink,
    /// The desired state.
    pub store: &'a mut Store,
    /// The read-only view (for the answers' counters).
    pub reader: &'a Reader,
    /// Containers kept though they could not be restored, with why
    /// ([`super::reconcile`] retries them).
    pub degraded: &'a mut BTreeMap<String, String>,
}

impl Lifecycle<'_> {
    /// How the API shows container `c`.
    pub fn info(&self, c: &Container) -> ContainerInfo {
        super::status::container_info(
            c,
            self.node.cfg.gateway(),
            self.node.cfg.dual(),
            self.reader,
        )
    }

    /// Creates a container's network: veth pair, address, routes, maps,
    /// rate limits. Idempotent: adding an existing container with the same
    /// spec returns it unchanged. Nothing is left half-applied on failure.
    pub async fn add(&mut self, req: AddContainer) -> Result<ContainerInfo, AgentError> {
        let container = match self.plan(req)? {
            Plan::Exists(c) => return Ok(self.info(&c)),
            Plan::New(c) => c,
        };
        let mut tx = Transaction::new();
        match self.create(&mut tx, container).await {
            Ok(c) => {
                tx.commit();
                tracing::info!(container = %c.name, addr = %c.addr, veth = %c.host_ifname, "container added");
                Ok(self.info(&c))
            }
            Err(e) => {
                tx.roll_back(self.dp, self.net).await;
                Err(e)
            }
        }
    }

    /// Checks a request to add a container and decides what it makes:
    /// nothing is changed yet, but an id and an address are taken.
    fn plan(&mut self, req: AddContainer) -> Result<Plan, AgentError> {
        let bad = |e: &dyn std::fmt::Display| AgentError::BadRequest(e.to_string());
        validate_container_name(&req.name).map_err(|e| bad(&e))?;
        let ifname = req.ifname.clone().unwrap_or_else(|| "eth0".to_owned());
        validate_ifname(&ifname).map_err(|e| bad(&e))?;
        let netns_err = |e: &dyn std::error::Error| {
            AgentError::BadRequest(format!(
                "network namespace {:?}: {}",
                req.netns,
                error_chain(e)
            ))
        };
        let netns = netns::resolve(&req.netns).map_err(|e| netns_err(&e))?;
        // The namespace is recorded by identity: its path is trusted only
        // while it names this namespace.
        let ns = Netns::open_path(&netns).map_err(|e| netns_err(&e))?;
        ns.check_container_netns().map_err(|e| netns_err(&e))?;
        let netns_id = ns.id();
        let publish = publish::parse_specs(&req.publish)?;
        let rate = RateRequest::new(
            req.cgroup.as_deref(),
            (req.egress_rate.as_deref(), req.egress_burst.as_deref()),
            (req.ingress_rate.as_deref(), req.ingress_burst.as_deref()),
        )
        .map_err(AgentError::BadRequest)?;
        // A cgroup that does not exist yet (runtimes create it after the
        // network) is recorded with id 0: its limits are pending until it
        // appears ([`super::cgroups`]).
        let (cgroup, cgroup_id) = rate
            .cgroup
            .map_or((None, 0), |cg| (Some(cg.path), cg.id.unwrap_or(0)));
        if let Some(mtu) = req.mtu {
            validate_mtu(mtu).map_err(AgentError::BadRequest)?;
        }
        if let Some(c) = self.store.get(&req.name) {
            if c.netns == netns && c.netns_id.is_some_and(|id| id != netns_id) {
                return Err(AgentError::Conflict(format!(
                    "container {:?} exists, but {} names another network namespace than when it \
                     was added: its namespace is gone; delete it first",
                    req.name,
                    netns.display()
                )));
            }
            if c.netns == netns
                && c.ifname == ifname
                && c.publish == publish
                && c.cgroup == cgroup
                && c.limits == rate.limits
                && c.mtu == req.mtu
            {
                return Ok(Plan::Exists(Container::clone(c)));
            }
            return Err(AgentError::Conflict(format!(
                "container {:?} exists with another network namespace, interface or ports; delete it first",
                req.name
            )));
        }
        publish::check(
            self.node,
            self.store.state(),
            &req.name,
            &publish,
            req.force,
        )?;
        check_cgroup(
            self.store,
            &req.name,
            cgroup.as_deref(),
            cgroup_id,
            &rate.limits,
        )?;
        let tag = VethTag {
            id: u32::MAX,
            name: req.name.clone(),
            ifname: ifname.clone(),
            netns_id,
            netns: netns.clone(),
        };
        if tag.alias().is_none() {
            return Err(AgentError::BadRequest(format!(
                "the network namespace path {} and the name {:?} are too long together: \
                 the container's veth records both in its alias (at most {MAX_ALIAS_LEN} bytes)",
                netns.display(),
                req.name
            )));
        }
        let pool = self.node.cfg.pool;
        let (id, addr) = self
            .store
            .allocate(pool)
            .ok_or_else(|| AgentError::Conflict(format!("the pool {pool} has no free address")))?;
        Ok(Plan::New(Container {
            id,
            name: req.name,
            netns,
            netns_id: Some(netns_id),
            ifname,
            host_ifname: host_veth_name(id),
            addr,
            publish,
            mac: String::new(),
            cgroup,
            cgroup_id,
            limits: rate.limits,
            mtu: req.mtu,
        }))
    }

    /// The steps of `add`: veth pair, maps and program, rate limits, then
    /// the record (one durable write).
    async fn create(
        &mut self,
        tx: &mut Transaction,
        mut c: Container,
    ) -> Result<Container, AgentError> {
        let link = self.create_link(&c).await.map_err(|e| match e {
            NetlinkError::Netns(_) => AgentError::BadRequest(error_chain(&e)),
            e => AgentError::Internal(format!("create the veth pair: {}", error_chain(&e))),
        })?;
        tx.did(Step::Veth {
            host_ifname: c.host_ifname.clone(),
        });
        c.mac = format_mac(link.container_mac);
        let host = HostEnd {
            index: link.host_ifindex,
            mac: link.host_mac,
        };
        // A new container starts from zero: its counters' slot may have
        // served a container deleted before.
        self.dp
            .reset_container_counters(c.id)
            .map_err(internal("reset the container's counters"))?;
        self.fill(tx, &c, host, link.container_mac)?;
        tx.did(Step::Limits {
            container: Box::new(c.clone()),
            previous: None,
        });
        self.dp
            .apply_limits(&rate_target(&c), false)
            .map_err(internal("apply rate limits"))?;
        self.store.commit(vec![Change::Put(Box::new(c.clone()))])?;
        Ok(c)
    }

    /// Creates a container's veth pair, in the namespace the container
    /// was recorded with (by identity) and tagged as the agent's.
    pub async fn create_link(&self, c: &Container) -> Result<LinkInfo, NetlinkError> {
        self.net
            .create_container_link(&ContainerLink {
                host_ifname: c.host_ifname.clone(),
                netns: c.netns.clone(),
                netns_id: c.netns_id,
                alias: veth_tag(c).and_then(|t| t.alias()).unwrap_or_default(),
                ifname: c.ifname.clone(),
                addr: c.addr,
                gateway: self.node.cfg.gateway(),
                addr6: self.node.cfg.addr6(c.addr),
                mtu: c.mtu.or_else(|| self.node.container_mtu()),
                gro: self.node.gro(),
            })
            .await
    }

    /// Puts container `c` into the maps (its endpoint: its veth's host end
    /// `host` and the MAC of its own end; its published ports) and attaches
    /// the container program to the host end.
    pub fn fill(
        &mut self,
        tx: &mut Transaction,
        c: &Container,
        host: HostEnd,
        mac: [u8; 6],
    ) -> Result<(), AgentError> {
        self.dp
            .insert_endpoint(
                c.addr,
                Endpoint {
                    ifindex: host.index,
                    container_id: c.id,
                    mac,
                    host_mac: host.mac,
                    flags: 0,
                },
            )
            .map_err(internal("add the endpoint"))?;
        tx.did(Step::Endpoint {
            addr: c.addr,
            id: c.id,
        });
        tx.did(Step::Flows { id: c.id });
        publish::insert_services(self.dp, tx, c, &c.publish, host.index)?;
        tx.did(Step::Program {
            host_ifname: c.host_ifname.clone(),
        });
        self.dp.attach_container(&c.host_ifname)?;
        Ok(())
    }

    /// Changes a container's rate limits in place: every value is checked
    /// first, then each direction's bucket is created, reconfigured under
    /// its lock (no flow notices more than the new rate) or removed.
    pub async fn update(
        &mut self,
        name: &str,
        req: &UpdateContainer,
    ) -> Result<ContainerInfo, AgentError> {
        let c = self
            .store
            .get(name)
            .map(|c| Container::clone(c))
            .ok_or_else(|| AgentError::no_container(name))?;
        let bad = |e: LimitError| AgentError::BadRequest(e.to_string());
        let limits = RateLimits {
            egress: updated(
                "egress",
                c.limits.egress,
                req.egress_rate.as_deref(),
                req.egress_burst.as_deref(),
            )
            .map_err(bad)?,
            ingress: updated(
                "ingress",
                c.limits.ingress,
                req.ingress_rate.as_deref(),
                req.ingress_burst.as_deref(),
            )
            .map_err(bad)?,
        };
        if limits == c.limits {
            return Ok(self.info(&c));
        }
        if c.cgroup.is_none() && !limits.is_empty() {
            return Err(AgentError::BadRequest(format!(
                "container {name:?} was added without a cgroup: rate limits apply to a cgroup, \
                 so delete it and add it again with --cgroup"
            )));
        }
        check_cgroup(self.store, name, c.cgroup.as_deref(), c.cgroup_id, &limits)?;
        let new = Container {
            limits,
            ..c.clone()
        };
        let mut tx = Transaction::new();
        match self.change_limits(&mut tx, &new, c.limits) {
            Ok(()) => {
                tx.commit();
                tracing::info!(container = %name, egress = ?new.limits.egress, ingress = ?new.limits.ingress, "rate limits changed");
                Ok(self.info(&new))
            }
            Err(e) => {
                tx.roll_back(self.dp, self.net).await;
                Err(e)
            }
        }
    }

    /// The steps of `update`: the limits, then the record.
    fn change_limits(
        &mut self,
        tx: &mut Transaction,
        new: &Container,
        previous: RateLimits,
    ) -> Result<(), AgentError> {
        tx.did(Step::Limits {
            container: Box::new(new.clone()),
            previous: Some(previous),
        });
        self.dp
            .apply_limits(&rate_target(new), false)
            .map_err(internal("apply rate limits"))?;
        self.store.commit(vec![Change::Limits {
            name: new.name.clone(),
            limits: new.limits,
        }])?;
        Ok(())
    }

    /// Deletes a container; deleting an absent one succeeds. The record
    /// goes first: once the deletion is durable, an agent cut off while
    /// tearing down finds only orphans, which it removes when it starts.
    pub async fn delete(&mut self, name: &str) -> Result<(), AgentError> {
        let Some(c) = self.store.get(name).cloned() else {
            return Ok(());
        };
        self.store.commit(vec![Change::Remove {
            name: name.to_owned(),
        }])?;
        self.teardown(&c).await;
        self.degraded.remove(name);
        tracing::info!(container = %name, "container deleted");
        Ok(())
    }

    /// Removes everything of container `c` from the kernel (published
    /// ports, endpoint, programs, rate limits, flows, veth), going on after
    /// failures (logged). Entries another container owns are left alone.
    pub async fn teardown(&mut self, c: &Container) {
        for m in &c.publish {
            for (hp, _) in m.ports() {
                self.dp.remove_service(&publish::service_key(m, hp), c.id);
            }
        }
        self.dp.remove_endpoint(c.addr, c.id);
        if let Err(e) = self.dp.detach_container(&c.host_ifname) {
            tracing::warn!(container = %c.name, "detach: {e}");
        }
        self.dp.remove_limits(&rate_target(c));
        if let Err(e) = self.dp.flush_flows(Flows::Container(c.id)) {
            tracing::warn!(container = %c.name, "flush conntrack: {e}");
        }
        if let Err(e) = self.net.delete_container_link(&c.host_ifname).await {
            tracing::warn!(container = %c.name, "delete veth: {}", error_chain(&e));
        }
    }
}

/// The tag of container `c`'s veth (none for a container recorded by an
/// older agent without its namespace's identity).
pub fn veth_tag(c: &Container) -> Option<VethTag> {
    Some(VethTag {
        id: c.id,
        name: c.name.clone(),
        ifname: c.ifname.clone(),
        netns_id: c.netns_id?,
        netns: c.netns.clone(),
    })
}

/// The host end of a container's veth pair, as the maps need it.
#[derive(Clone, Copy, Debug)]
pub struct HostEnd {
    /// Interface index.
    pub index: u32,
    /// MAC address (the container's gateway MAC).
    pub mac: [u8; 6],
}

/// What an add request comes to.
enum Plan {
    /// The same container exists already.
    Exists(Container),
    /// A new container, to be created.
    New(Container),
}

/// The rate-limiting part of a request to add a container: the cgroup
/// (resolved) and the limits, every value checked before anything is
/// changed.
struct RateRequest {
    cgroup: Option<cgroup::Located>,
    limits: RateLimits,
}

impl RateRequest {
    fn new(
        cgroup: Option<&str>,
        egress: (Option<&str>, Option<&str>),
        ingress: (Option<&str>, Option<&str>),
    ) -> Result<Self, String> {
        let limits = RateLimits {
            egress: limit("egress", egress.0, egress.1).map_err(|e| e.to_string())?,
            ingress: limit("ingress", ingress.0, ingress.1).map_err(|e| e.to_string())?,
        };
        let cgroup = match cgroup {
            Some(spec) => Some(cgroup::locate(spec).map_err(|e| format!("cgroup: {e}"))?),
            None if !limits.is_empty() => {
                return Err(
                    "rate limits apply to the container's cgroup: give its cgroup v2 directory \
                     (--cgroup, or \"cgroup\" in the API)"
                        .into(),
                );
            }
            None => None,
        };
        Ok(Self { cgroup, limits })
    }
}

/// Refuses a second container with limits on a cgroup (existing or
/// pending) whose buckets another container's limits already use: the
/// same directory, or the same cgroup (`cgroup_id`; 0: not there yet).
fn check_cgroup(
    store: &Store,
    name: &str,
    cgroup: Option<&Path>,
    cgroup_id: u64,
    limits: &RateLimits,
) -> Result<(), AgentError> {
    let Some(cgroup) = cgroup else {
        return Ok(());
    };
    if limits.is_empty() {
        return Ok(());
    }
    let state = store.state();
    let by_id = (cgroup_id != 0)
        .then(|| state.limiting(cgroup_id))
        .flatten();
    match [state.limiting_path(cgroup), by_id]
        .into_iter()
        .flatten()
        .find(|other| *other != name)
        .and_then(|other| store.get(other))
    {
        Some(other) => Err(AgentError::Conflict(format!(
            "container {:?} already limits the cgroup {}; one cgroup has one set of limits",
            other.name,
            other.cgroup.as_deref().unwrap_or(Path::new("?")).display()
        ))),
        None => Ok(()),
    }
}
