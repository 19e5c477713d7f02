//! The API's way into the agent. Changes are sent to the owner task and
//! answered when it has made them; reads are served here, from the last
//! [`Snapshot`] the owner published and the read-only [`Reader`], so that
//! `status` or a listing never waits behind a slow change.

use std::sync::Arc;

use datapath_common::monitor::event_kind;
use futures::{StreamExt as _, stream::BoxStream};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::{
    AgentError,
    observe::{self, Monitor, ProgramStats},
    owner::{Command, Message, Reply},
    status::Snapshot,
};
use crate::{
    api::{
        AddContainer, ContainerInfo, FlowQuery, MonitorEvent, MonitorQuery, NodeInfo, Status,
        UpdateContainer,
        server::{Backend, Failure, FlowBatches},
    },
    cluster::View,
    datapath::Reader,
    metrics,
};

/// How many batches of flows a listing reads ahead of its client.
const FLOW_BATCHES_AHEAD: usize = 4;

/// A handle on the running agent (cheap to clone).
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Message>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    reader: Arc<Reader>,
    program_stats: Arc<ProgramStats>,
    monitor: Arc<Monitor>,
    /// The cluster as the synchronisation sees it (cluster mode only).
    nodes: Option<watch::Receiver<Arc<View>>>,
}

impl Handle {
    pub(super) fn new(
        commands: mpsc::Sender<Message>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        reader: Arc<Reader>,
        program_stats: Arc<ProgramStats>,
        monitor: Arc<Monitor>,
        nodes: Option<watch::Receiver<Arc<View>>>,
    ) -> Self {
        Self {
            commands,
            snapshot,
            reader,
            program_stats,
            monitor,
            nodes,
        }
    }

    /// Sends a command to the owner and waits for its outcome.
    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, AgentError> {
        let (reply, outcome) = oneshot::channel();
        let gone = || AgentError::Internal("the agent's owner task has stopped".to_owned());
        self.commands
            .send(Message::Command(Box::new(command(reply))))
            .await
            .map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }

    /// Runs `read` on the current snapshot and the reader, on a blocking
    /// thread (reads walk maps with syscalls).
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Snapshot, &Reader) -> Result<T, AgentError> + Send + 'static,
    ) -> Result<T, AgentError> {
        let snapshot = Arc::clone(&self.snapshot.borrow());
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || read(&snapshot, &reader))
            .await
            .map_err(|e| AgentError::Internal(format!("read the datapath: {e}")))?
    }

    /// The snapshots the owner publishes after every change.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Asks the owner to apply or remove the rate limits whose cgroup
    /// appeared or went; returns how many containers changed.
    pub async fn sync_cgroups(&self) -> Result<usize, AgentError> {
        self.call(Command::SyncCgroups).await
    }

    /// Asks the owner to stop once the commands before have been carried
    /// out, and waits for it to take the request.
    pub async fn stop(&self) {
        let _ = self.commands.send(Message::Stop).await;
    }
}

impl Backend for Handle {
    async fn status(&self) -> Result<Status, Failure> {
        let stats = self.program_stats.enabled();
        Ok(self.read(move |s, r| Ok(s.status(r, stats))).await?)
    }

    async fn containers(&self) -> Result<Vec<ContainerInfo>, Failure> {
        Ok(self.read(|s, r| Ok(s.containers(r))).await?)
    }

    async fn container(&self, name: String) -> Result<ContainerInfo, Failure> {
        Ok(self.read(move |s, r| s.container(&name, r)).await?)
    }

    async fn add(&self, req: AddContainer) -> Result<ContainerInfo, Failure> {
        Ok(self.call(|reply| Command::Add(req, reply)).await?)
    }

    async fn update(&self, name: String, req: UpdateContainer) -> Result<ContainerInfo, Failure> {
        Ok(self.call(|reply| Command::Update(name, req, reply)).await?)
    }

    async fn publish(
        &self,
        name: String,
        specs: Vec<String>,
        force: bool,
    ) -> Result<ContainerInfo, Failure> {
        Ok(self
            .call(|reply| Command::Publish(name, specs, force, reply))
            .await?)
    }

    async fn unpublish(&self, name: String, specs: Vec<String>) -> Result<ContainerInfo, Failure> {
        Ok(self
            .call(|reply| Command::Unpublish(name, specs, reply))
            .await?)
    }

    async fn delete(&self, name: String) -> Result<(), Failure> {
        Ok(self.call(|reply| Command::Delete(name, reply)).await?)
    }

    async fn conntrack(&self, query: FlowQuery) -> Result<FlowBatches, Failure> {
        let snapshot = Arc::clone(&self.snapshot.borrow());
        let container = match &query.container {
            Some(name) => Some(
                snapshot
                    .container_id(name)
                    .ok_or_else(|| AgentError::no_container(name))?,
            ),
            None => None,
        };
        let reader = Arc::clone(&self.reader);
        let (batches, receiver) = mpsc::channel(FLOW_BATCHES_AHEAD);
        tokio::task::spawn_blocking(move || {
            snapshot.stream_flows(&reader, container, query.limit, &batches);
        });
        Ok(receiver)
    }

    async fn flush(&self, container: Option<String>) -> Result<usize, Failure> {
        Ok(self.call(|reply| Command::Flush(container, reply)).await?)
    }

    async fn metrics(&self) -> Result<String, Failure> {
        self.program_stats.scraped();
        let page = self
            .read(|s, r| {
                metrics::render(&s.figures(r, true))
                    .map_err(|e| AgentError::Internal(format!("encode the metrics: {e}")))
            })
            .await?;
        Ok(page)
    }

    async fn monitor(
        &self,
        query: MonitorQuery,
    ) -> Result<BoxStream<'static, MonitorEvent>, Failure> {
        let only = match &query.container {
            Some(name) => Some(
                self.snapshot
                    .borrow()
                    .container_id(name)
                    .ok_or_else(|| AgentError::no_container(name))?,
            ),
            None => None,
        };
        let (drops, flows) = (query.wants_drops(), query.wants_flows());
        let sub = self.monitor.subscribe(drops, flows).await?;
        let snapshot = self.snapshot.clone();
        let stream = futures::stream::unfold(sub, move |mut sub| {
            let snapshot = snapshot.clone();
            async move {
                loop {
                    match sub.events.recv().await {
                        Ok(ev) => {
                            let is_drop = ev.kind == event_kind::DROP;
                            if (is_drop && !drops) || (!is_drop && !flows) {
                                continue;
                            }
                            if only.is_some_and(|id| id != ev.container_id) {
                                continue;
                            }
                            let snap = Arc::clone(&snapshot.borrow());
                            let view = observe::event_view(&ev, |id| snap.container_name(id));
                            return Some((view, sub));
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let lost = MonitorEvent {
                                kind: "lost".to_owned(),
                                count: n,
                                ..MonitorEvent::default()
                            };
                            return Some((lost, sub));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, Failure> {
        let Some(nodes) = &self.nodes else {
            return Err(AgentError::BadRequest(
                "the agent is not in cluster mode (start it with --cluster-store)".to_owned(),
            )
            .into());
        };
        let view = Arc::clone(&nodes.borrow());
        Ok(super::cluster::node_infos(&view))
    }
}
