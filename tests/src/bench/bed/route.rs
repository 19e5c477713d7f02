//! The route mode: no translation at all. The client routes the container
//! pool via the node, which forwards in the kernel; nothing is published
//! and nothing is tracked. The limit of the path.

use std::time::Duration;

use anyhow::{Result, bail};

use super::Backend;
use crate::node::Node;

/// The route mode's backend.
#[derive(Debug)]
pub struct Route;

impl Route {
    /// Routes `pool` from the client via the node.
    pub fn new(node: &Node, pool: &str) -> Self {
        node.client.exec_ok(
            "ip",
            ["route", "add", pool, "via", &node.node_addr().to_string()],
        );
        Self
    }
}

impl Backend for Route {
    fn set_fillers(&mut self, _: usize) -> Result<()> {
        Ok(())
    }

    fn time_add(&mut self) -> Result<Duration> {
        bail!("the route mode publishes nothing")
    }

    fn time_del(&mut self) -> Result<Duration> {
        bail!("the route mode publishes nothing")
    }

    fn flush_conntrack(&self) -> Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "forwarding only, no netfilter rules, no programs".to_owned()
    }
}
