//! Watching the datapath: the kernel's program statistics (on only while
//! metrics are scraped, or by `--bpf-stats`) and the monitor (the ring
//! buffer's reader and its subscribers, which turn the kernel's events on
//! and off).

use std::{
    os::fd::OwnedFd,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use datapath_common::{
    CONFIG_F_MONITOR_DROPS, CONFIG_F_MONITOR_FLOWS, Stat, monitor::Event, proto,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::owner::{Command, Message};
use crate::api::MonitorEvent;

/// How long program statistics stay on after the last scrape.
const STATS_LINGER: Duration = Duration::from_secs(120);

/// Events buffered for each monitor subscriber; one that falls further
/// behind skips events and is told how many (`lost`).
const SUBSCRIBER_BUFFER: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The kernel's run time and count statistics of BPF programs
/// (`BPF_ENABLE_STATS`): they cost a clock read per program run, so they
/// are on only while metrics are being scraped, or always with
/// `--bpf-stats`.
pub struct ProgramStats {
    always: bool,
    state: Mutex<(Option<OwnedFd>, Instant)>,
}

impl ProgramStats {
    /// Statistics off until scraped (`always`: on from now on).
    pub fn new(always: bool) -> Self {
        let s = Self {
            always,
            state: Mutex::new((None, Instant::now())),
        };
        if always {
            s.scraped();
        }
        s
    }

    /// A scrape: turns the statistics on (for [`STATS_LINGER`]).
    pub fn scraped(&self) {
        let mut st = lock(&self.state);
        st.1 = Instant::now();
        if st.0.is_none() {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => st.0 = Some(fd),
                Err(e) => tracing::warn!("cannot enable BPF program statistics: {e}"),
            }
        }
    }

    /// Whether the kernel gathers the statistics now.
    pub fn enabled(&self) -> bool {
        lock(&self.state).0.is_some()
    }

    /// Turns the statistics off if nothing scraped for a while.
    pub fn expire(&self) {
        let mut st = lock(&self.state);
        if !self.always && st.0.is_some() && st.1.elapsed() > STATS_LINGER {
            st.0 = None;
            tracing::debug!("BPF program statistics off: no scrape lately");
        }
    }
}

/// The monitor: one reader of the kernel's ring buffer, any number of
/// subscribers. The kernel writes events only while someone subscribes.
pub struct Monitor {
    events: broadcast::Sender<Event>,
    subscribers: Mutex<(usize, usize)>,
    commands: mpsc::Sender<Message>,
}

/// A subscription: while it lives, the kernel sends its kinds of events.
pub struct Subscription {
    monitor: Arc<Monitor>,
    drops: bool,
    flows: bool,
    /// The events.
    pub events: broadcast::Receiver<Event>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let monitor = Arc::clone(&self.monitor);
        let flags = monitor.count(self.drops, self.flows, false);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = monitor.set_flags(flags).await;
            });
        }
    }
}

impl Monitor {
    /// A monitor whose kernel switches go through `commands`.
    pub(super) fn new(commands: mpsc::Sender<Message>) -> Arc<Self> {
        let (events, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Arc::new(Self {
            events,
            subscribers: Mutex::new((0, 0)),
            commands,
        })
    }

    /// Adds (`add`) or removes a subscriber; returns the kernel flags
    /// wanted now.
    fn count(&self, drops: bool, flows: bool, add: bool) -> u32 {
        let mut s = lock(&self.subscribers);
        let step = |n: &mut usize, on: bool| {
            if on {
                *n = if add { *n + 1 } else { n.saturating_sub(1) };
            }
        };
        step(&mut s.0, drops);
        step(&mut s.1, flows);
        let mut flags = 0;
        if s.0 > 0 {
            flags |= CONFIG_F_MONITOR_DROPS;
        }
        if s.1 > 0 {
            flags |= CONFIG_F_MONITOR_FLOWS;
        }
        flags
    }

    async fn set_flags(&self, flags: u32) -> Result<(), super::AgentError> {
        let (reply, outcome) = oneshot::channel();
        let gone = || super::AgentError::Internal("the agent's owner task has stopped".into());
        self.commands
            .send(Message::Command(Box::new(Command::Monitor(flags, reply))))
            .await
            .map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }

    /// Subscribes to drops and/or flows; the kernel starts sending them
    /// before this returns.
    pub async fn subscribe(
        self: &Arc<Self>,
        drops: bool,
        flows: bool,
    ) -> Result<Subscription, super::AgentError> {
        let events = self.events.subscribe();
        let flags = self.count(drops, flows, true);
        let sub = Subscription {
            monitor: Arc::clone(self),
            drops,
            flows,
            events,
        };
        self.set_flags(flags).await?;
        Ok(sub)
    }

    /// Reads the ring buffer until the agent stops, handing each event to
    /// the subscribers.
    pub async fn read(self: Arc<Self>, ring: RingBuf<MapData>) {
        // SAFETY: the ring buffer owns its fd, which stays open for as
        // long as the AsyncFd owns the ring buffer.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
        };
        let Ok(mut fd) = registered else {
            tracing::warn!("cannot poll the monitor's ring buffer");
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<Event>() {
                    let ev: Event = bytemuck::pod_read_unaligned(&item[..size_of::<Event>()]);
                    // No subscriber: nothing to do (the kernel stops soon).
                    let _ = self.events.send(ev);
                }
            }
            guard.clear_ready();
        }
    }
}

/// What a subscriber sees of kernel event `ev`, with its container's name
/// from `name_of`.
pub fn event_view(ev: &Event, name_of: impl Fn(u32) -> Option<String>) -> MonitorEvent {
    use datapath_common::monitor::{event_kind, hook};
    let k = ev.key;
    let protocol = match k.proto {
        proto::TCP => "tcp".to_owned(),
        proto::UDP => "udp".to_owned(),
        proto::ICMP => "icmp".to_owned(),
        p => p.to_string(),
    };
    let parsed = k.proto != 0;
    MonitorEvent {
        kind: event_kind::name(ev.kind).to_owned(),
        time_ns: ev.time_ns,
        reason: (ev.kind == event_kind::DROP).then(|| {
            let name = Stat::from_index(u32::from(ev.reason)).name();
            name.strip_prefix("drop_").unwrap_or(name).to_owned()
        }),
        hook: hook::name(ev.hook).to_owned(),
        container: if ev.container_id == 0 {
            None
        } else {
            name_of(ev.container_id)
        },
        protocol: if parsed { protocol } else { String::new() },
        src: parsed.then(|| k.saddr.into()),
        sport: k.sport,
        dst: parsed.then(|| k.daddr.into()),
        dport: k.dport,
        ifindex: ev.ifindex,
        len: ev.len,
        count: 0,
    }
}
