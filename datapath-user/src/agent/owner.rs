//! The owner task: the one place where the agent's state changes.
//!
//! It runs on a thread of its own with a single-threaded runtime (for its
//! netlink connection), and takes [`Command`]s from the API in the order
//! they come, one at a time. Everything a change does — BPF map updates
//! and attachments, netlink round trips, the `setns` thread of a veth
//! pair, the state journal's fsync — blocks that thread and no other: the
//! API's async workers stay free to answer reads. After each change it
//! publishes a fresh [`Snapshot`] before it answers.
//!
//! New kinds of work (cluster sync, services) become new [`Command`]s.

use std::{sync::Arc, thread::JoinHandle};

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Agent, AgentConfig, AgentError, status::Snapshot};
use crate::{
    api::{AddContainer, ContainerInfo, UpdateContainer},
    cluster::PeerRoute,
    datapath::Reader,
    net::watch::AddressEvents,
};

/// How many commands may wait for the owner; senders wait beyond that.
const QUEUE: usize = 64;

/// Where the owner sends a command's outcome.
pub(super) type Reply<T> = oneshot::Sender<Result<T, AgentError>>;

/// A change for the owner to make.
pub(super) enum Command {
    /// Add a container.
    Add(AddContainer, Reply<ContainerInfo>),
    /// Change a container's rate limits.
    Update(String, UpdateContainer, Reply<ContainerInfo>),
    /// Delete a container.
    Delete(String, Reply<()>),
    /// Publish ports of a container (all or none); `true`: even ports a
    /// node process listens on.
    Publish(String, Vec<String>, bool, Reply<ContainerInfo>),
    /// Stop publishing ports of a container.
    Unpublish(String, Vec<String>, Reply<ContainerInfo>),
    /// Remove tracked flows (one container's, or all).
    Flush(Option<String>, Reply<usize>),
    /// Turn the monitor's events on or off in the kernel
    /// (`CONFIG_F_MONITOR_*` bits).
    Monitor(u32, Reply<()>),
    /// Apply or remove rate limits whose cgroup appeared or went.
    SyncCgroups(Reply<usize>),
}

/// What the owner sends its inbox: a command, or the end.
pub(super) enum Message {
    /// A command to carry out.
    Command(Box<Command>),
    /// Stop after the commands before this one.
    Stop,
}

/// A started owner and what the rest of the agent needs from it.
pub(super) struct Started {
    /// Where commands go.
    pub commands: mpsc::Sender<Message>,
    /// The snapshots the owner publishes.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The read-only view of the maps.
    pub reader: Arc<Reader>,
    /// The owner's thread (it ends after [`Message::Stop`]).
    pub owner: JoinHandle<()>,
    /// Completes when the owner's thread ends, for whatever reason (a
    /// panic included).
    pub gone: oneshot::Receiver<()>,
    /// The kernel-side log ring buffer, if the object has one.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The monitor's ring buffer.
    pub events: Option<aya::maps::RingBuf<aya::maps::MapData>>,
}

/// What the owner hands back once the agent has started.
struct Ready {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    reader: Arc<Reader>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    events: Option<aya::maps::RingBuf<aya::maps::MapData>>,
}

/// Starts the agent (load, uplink, adoption) on the owner's thread and
/// returns once it is ready to take commands, or with the reason it could
/// not start.
pub(super) async fn spawn(cfg: AgentConfig, peers: PeersRx) -> anyhow::Result<Started> {
    let (commands, inbox) = mpsc::channel(QUEUE);
    let (ready_tx, ready_rx) = oneshot::channel();
    let (alive, gone) = oneshot::channel::<()>();
    let owner = std::thread::Builder::new()
        .name("datapath-owner".into())
        .spawn(move || {
            // Dropped when the thread ends, unwinding or not.
            let _alive = alive;
            run(cfg, inbox, ready_tx, peers);
        })
        .context("start the owner thread")?;
    let ready = ready_rx
        .await
        .context("the owner thread stopped while starting")??;
    Ok(Started {
        commands,
        snapshot: ready.snapshot,
        reader: ready.reader,
        owner,
        gone,
        logger: ready.logger,
        events: ready.events,
    })
}

/// The next address event, or never without a subscription.
async fn next_event(events: Option<&mut AddressEvents>) -> Option<u32> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// The cluster's peers as the cluster's synchronisation publishes them
/// (`None` until its first listing: the datapath keeps what it has).
pub(super) type PeersRx = watch::Receiver<Option<Arc<Vec<PeerRoute>>>>;

/// The next set of peers, or never once the publisher is gone.
async fn next_peers(peers: &mut PeersRx) -> Arc<Vec<PeerRoute>> {
    loop {
        if peers.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Some(p) = peers.borrow_and_update().clone() {
            return p;
        }
    }
}

/// The owner thread's body.
fn run(
    cfg: AgentConfig,
    mut inbox: mpsc::Receiver<Message>,
    ready: oneshot::Sender<anyhow::Result<Ready>>,
    mut peers: PeersRx,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(e).context("start the owner's runtime"));
            return;
        }
    };
    runtime.block_on(async move {
        let mut agent = match Agent::start(cfg).await {
            Ok(agent) => agent,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let (snapshots, snapshot) = watch::channel(Arc::new(agent.snapshot()));
        let handed = Ready {
            snapshot,
            reader: Arc::clone(&agent.reader),
            logger: agent.dp.take_logger(),
            events: agent.dp.take_events(),
        };
        if ready.send(Ok(handed)).is_err() {
            return;
        }
        let publish = |snapshot: Snapshot| {
            snapshots.send_replace(Arc::new(snapshot));
        };
        let mut retry = tokio::time::interval(super::RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The uplink's address changes, watched from now on; one may have
        // come since the uplink was set up, so its addresses are read once
        // more right away.
        let mut events = None;
        if let Some(ifindex) = agent.node.uplink.as_ref().map(|u| u.ifindex) {
            match AddressEvents::subscribe() {
                Ok(e) => events = Some(e),
                Err(e) => tracing::warn!("the node's address changes will not be followed: {e}"),
            }
            agent.addresses_changed(ifindex, publish).await;
        }
        loop {
            tokio::select! {
                message = inbox.recv() => match message {
                    Some(Message::Command(command)) => agent.execute(*command, publish).await,
                    Some(Message::Stop) | None => break,
                },
                _ = retry.tick(), if !agent.degraded.is_empty() => {
                    agent.retry().await;
                    publish(agent.snapshot());
                }
                Some(ifindex) = next_event(events.as_mut()) => {
                    agent.addresses_changed(ifindex, publish).await;
                }
                routes = next_peers(&mut peers) => agent.peers_changed(&routes),
            }
        }
        // A clean stop leaves the whole state in the snapshot and an empty
        // journal (what an operator reading the state directory expects).
        if let Err(e) = agent.store.compact() {
            tracing::warn!("write the state snapshot at shutdown: {e}");
        }
    });
}
