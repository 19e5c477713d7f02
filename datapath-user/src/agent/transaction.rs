//! The undo log of a change: every step that changes the kernel or the
//! state is written down as it is taken ([`Step`]), and a change that
//! fails is undone step by step in reverse order
//! ([`Transaction::roll_back`]), so that it is all there or not at all.

use std::net::Ipv4Addr;

use datapath_common::ServiceKey;

use super::rate_target;
use crate::{
    datapath::{Datapath, Flows},
    error::error_chain,
    model::RateLimits,
    net::link::Netlink,
    store::Container,
};

/// One step a transaction took, and what undoes it.
#[derive(Debug)]
pub enum Step {
    /// Created the container's veth pair: delete it.
    Veth {
        /// The host end.
        host_ifname: String,
    },
    /// Added the container's endpoint: remove it (if still its own).
    Endpoint {
        /// The container's address.
        addr: Ipv4Addr,
        /// The container's id.
        id: u32,
    },
    /// Traffic of the container may be tracked from here on: flush its
    /// flows.
    Flows {
        /// The container's id.
        id: u32,
    },
    /// Published a port: remove it (if still the container's).
    Service {
        /// The port's key.
        key: ServiceKey,
        /// The container's id.
        id: u32,
    },
    /// Attached (or began to attach) the container program to the host
    /// end: detach it.
    Program {
        /// The host end.
        host_ifname: String,
    },
    /// Changed (or began to change) the rate limiter's buckets and hooks
    /// of `container` (which carries the new limits): restore `previous`,
    /// or remove them all if there were none.
    Limits {
        /// The container, with the limits applied.
        container: Box<Container>,
        /// Its limits before, if it had been there before.
        previous: Option<RateLimits>,
    },
}

/// The steps of one change so far. It ends in [`Transaction::commit`] or
/// [`Transaction::roll_back`], which undoes every step in reverse order.
///
/// Recording the change in the store ([`crate::store::Store::commit`]) is
/// always the last step, and it is atomic: if it fails, the store is as it
/// was, and only the steps before it are undone.
#[derive(Debug, Default)]
#[must_use = "a transaction ends in commit() or roll_back()"]
pub struct Transaction {
    done: Vec<Step>,
}

impl Transaction {
    /// A transaction that has done nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes down a step taken (or begun: undoing a step that did not
    /// happen is harmless).
    pub fn did(&mut self, step: Step) {
        self.done.push(step);
    }

    /// The change is complete: nothing is undone.
    pub fn commit(self) {}

    /// Undoes every step in reverse order, going on after failures (which
    /// are logged).
    pub async fn roll_back(self, dp: &mut Datapath, net: &Netlink) {
        for step in self.done.into_iter().rev() {
            match step {
                Step::Limits {
                    container,
                    previous,
                } => match previous {
                    None => dp.remove_limits(&rate_target(&container)),
                    Some(limits) => {
                        let before = Container {
                            limits,
                            ..*container
                        };
                        if let Err(e) = dp.apply_limits(&rate_target(&before), false) {
                            tracing::warn!(container = %before.name, "restore the previous limits: {e}");
                        }
                    }
                },
                Step::Program { host_ifname } => {
                    if let Err(e) = dp.detach_container(&host_ifname) {
                        tracing::warn!(veth = %host_ifname, "detach: {e}");
                    }
                }
                Step::Service { key, id } => dp.remove_service(&key, id),
                Step::Flows { id } => {
                    if let Err(e) = dp.flush_flows(Flows::Container(id)) {
                        tracing::warn!(id, "flush conntrack: {e}");
                    }
                }
                Step::Endpoint { addr, id } => dp.remove_endpoint(addr, id),
                Step::Veth { host_ifname } => {
                    if let Err(e) = net.delete_container_link(&host_ifname).await {
                        tracing::warn!(veth = %host_ifname, "delete veth: {}", error_chain(&e));
                    }
                }
            }
        }
    }
}
