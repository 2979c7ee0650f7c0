//! What the daemon keeps between requests, and the typed listener snapshot it serves.
//!
//! [`State`] holds the [`Collector`] (the kernel's counters, the filter, the one owner cache),
//! the label cap and the last hour of queue samples. Both transports read it: HTTP for
//! /metrics and /api/listeners, the events socket for snapshots and for each event's owner.
//! Owners stay fresh without a loop through the service: an event naming a listener the
//! owner cache does not know asks for one collect ([`State::want_owners`]), which
//! [`keep_owners`] runs, at most every two seconds.

use std::{
    sync::{atomic::AtomicUsize, Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use tokio::sync::{watch, Notify};

use crate::{
    api::{self, Counters, Owner, Queues},
    daemon::{
        collect::{Collector, Scrape},
        history::History,
        single_flight::SingleFlight,
    },
    host::owners::OwnerIndex,
    kernel::counters::ListenerStats,
    listener::{Family, ListenerId},
};

pub struct State {
    pub collector: Collector,
    /// Reloadable with SIGHUP.
    pub max_series: AtomicUsize,
    pub history: Mutex<History>,
    owners: OwnerIndex,
    owners_wanted: Notify,
    /// Concurrent collects share one collection.
    scrapes: SingleFlight<Scrape>,
}

impl State {
    pub fn new(collector: Collector, max_series: usize, history: History) -> Arc<Self> {
        let state = Arc::new(Self {
            owners: collector.owner_index(),
            collector,
            max_series: max_series.into(),
            history: Mutex::new(history),
            owners_wanted: Notify::new(),
            scrapes: SingleFlight::default(),
        });
        // The first collect runs at start: it warms the owner cache, so the first /metrics
        // scrape is not the slow one.
        state.want_owners();
        state
    }

    /// Collecting walks /proc and enters namespaces: blocking work, off the event loop, one
    /// collection at a time shared by the callers waiting for it.
    pub async fn collect(self: &Arc<Self>) -> Result<Arc<Scrape>> {
        let s = self.clone();
        self.scrapes.run(move || s.collector.collect()).await
    }

    /// Every listener with its counters, queues, owner and last hour: /api/listeners and the
    /// events socket's snapshot.
    pub async fn snapshot(self: &Arc<Self>) -> Result<api::Listeners> {
        let scrape = self.collect().await?;
        let history = crate::recover::lock(&self.history);
        Ok(snapshot(&self.collector, &scrape, Some(&history)))
    }

    /// The owner of `id`'s socket, as the last collect found it; None asks for a collect.
    pub fn owner_of(&self, id: &ListenerId) -> Option<Arc<Owner>> {
        // In a namespace qtrace cannot dump, listeners are known by address only (socket 0).
        let owner = self
            .owners
            .get(id)
            .or_else(|| self.owners.get(&ListenerId { socket: 0, ..*id }));
        if owner.is_none() {
            self.want_owners();
        }
        owner
    }

    /// The cookie of the socket an event's kernel key names (see `OwnerIndex::cookie`).
    pub fn socket_cookie(&self, sock: u64) -> u64 {
        self.owners.cookie(sock)
    }

    /// Asks [`keep_owners`] for a collect (which refreshes the owner cache).
    pub fn want_owners(&self) {
        self.owners_wanted.notify_one();
    }
}

/// Runs a collect whenever [`State::want_owners`] asked for one, at most every two seconds.
pub async fn keep_owners(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = state.owners_wanted.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = state.collect().await {
            tracing::debug!("owner refresh: {e:#}");
        }
        // Events of a burst that came while this collect ran asked for the owners it has just
        // found: that request is answered, not a reason for another collect (a sock_diag dump
        // of every namespace) two seconds later. An owner still unknown is asked for again by
        // its listener's next event.
        tokio::select! {
            biased;
            _ = state.owners_wanted.notified() => {}
            _ = std::future::ready(()) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// A scrape as the typed snapshot (also what `top --standalone` shows).
pub fn snapshot(
    collector: &Collector,
    scrape: &Scrape,
    history: Option<&History>,
) -> api::Listeners {
    let vis = collector.vis;
    let empty = ListenerStats::empty(Default::default());
    let listeners = scrape
        .listeners
        .iter()
        .map(|v| {
            let stats = v.stats.as_ref().unwrap_or(&empty);
            api::Listener {
                netns: v.id.netns,
                family: Family::of_addr(&v.id.addr),
                addr: v.id.addr,
                port: v.id.port,
                socket: v.id.socket,
                counters: Counters {
                    unclassified: v.unclassified,
                    ..stats.counters(vis)
                },
                accept_wait: stats.accept_wait(vis),
                queues: v.queues.as_ref().map(|q| Queues {
                    accept_len: q.acceptq_len,
                    accept_limit: q.acceptq_max,
                    syn_len: q.synq_len,
                }),
                owner: v.owner.as_deref().cloned(),
                last_hour: history.and_then(|h| h.last_hour(&v.id, v.drops())),
            }
        })
        .collect();
    api::Listeners {
        queue_sample_interval_seconds: history.map(|h| h.interval().as_secs_f64()),
        probes: collector.probes.clone(),
        listeners,
        netns_unreadable: Some(scrape.netns_unreadable),
        clients: Some(scrape.clients.to_api()),
        ..Default::default()
    }
}
