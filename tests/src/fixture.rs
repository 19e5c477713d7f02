//! The start most namespace tests share: a node's agent with one container
//! added, in a namespace of its own.
//!
//! ```no_run
//! use datapath_tests::{fixture::Deployment, node::Node, traffic::{Server, line_exchange}};
//!
//! let node = Node::new();
//! let web = Deployment::start(&node, "web", &["-p", "8080:80"]);
//! let _server = Server::line_echo(&web.ctr, 80, "web");
//! let answer = line_exchange(&node.client, node.node_port(8080), "hi").unwrap();
//! assert_eq!(answer, "web: hi");
//! ```

use crate::{
    agent::{Agent, AgentBuilder, ContainerInfo},
    netns::Netns,
    node::Node,
};

/// An agent running in a node, with one container added. Dropping it stops
/// the agent, then removes the container's namespace.
#[derive(Debug)]
pub struct Deployment<'n> {
    /// The agent.
    pub agent: Agent<'n>,
    /// The container's namespace (`dpt-<node id>-<name>`).
    pub ctr: Netns,
    /// The container as the agent listed it right after the add.
    pub info: ContainerInfo,
}

impl<'n> Deployment<'n> {
    /// Starts an agent with default options in `node` and adds container
    /// `name` with `args` (after `--netns`, e.g. `["-p", "8080:80"]`).
    #[track_caller]
    pub fn start(node: &'n Node, name: &str, args: &[&str]) -> Self {
        Self::start_with(Agent::builder(node), name, args)
    }

    /// Like [`Deployment::start`], with the agent `builder` describes.
    #[track_caller]
    pub fn start_with(builder: AgentBuilder<'n>, name: &str, args: &[&str]) -> Self {
        let agent = builder.start();
        let ctr = agent.node().add_container_netns(name);
        let info = agent.add(name, &ctr, args);
        Self { agent, ctr, info }
    }

    /// The node the agent runs in.
    pub fn node(&self) -> &'n Node {
        self.agent.node()
    }
}
