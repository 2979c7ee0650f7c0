//! One consistent view of every listener, a [`Scrape`], assembled on demand (for /metrics,
//! /api/listeners, the queue history, `top --standalone`): the kernel's counters (per listener
//! key), the queues and the sockets' own drop counts sampled now with sock_diag in every
//! network namespace qtrace can enter (before the counters are read: see [`super::drops`]),
//! the drops no probe classified, and each socket's owner from the one owner cache.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use qtrace_common::SelfStat;

use crate::{
    config::Filter,
    daemon::{
        clients::{self, Clients, CloseWaitAges},
        drops::{DropLedger, Sample, SocketDrops},
    },
    host::{
        census::{self, Census},
        netns, netstat,
        owners::{Owner, OwnerIndex, Owners},
        sockdiag::{self, ListenerQueues},
    },
    kernel::{
        counters::{KernelCounters, ListenerStats},
        probes::{client_available, port_search_available, ProbeStatus, Visibility},
    },
    listener::ListenerId,
};

/// Everything known about one listener at this moment.
#[derive(Clone, Debug)]
pub struct ListenerView {
    pub id: ListenerId,
    /// Kernel counters; None when nothing was ever counted for it.
    pub stats: Option<ListenerStats>,
    /// Queues now; None when the listener is closed or its namespace was not readable.
    pub queues: Option<ListenerQueues>,
    pub owner: Option<Arc<Owner>>,
    /// Drops no attached probe classified; None where every drop reason has a probe (then
    /// there are none), or while sock_diag has not seen the listener.
    pub unclassified: Option<u64>,
}

impl ListenerView {
    fn new(id: ListenerId) -> Self {
        Self {
            id,
            stats: None,
            queues: None,
            owner: None,
            unclassified: None,
        }
    }

    /// Drops of every reason so far, unclassified ones included (0 when nothing was counted).
    pub fn drops(&self) -> u64 {
        self.stats.as_ref().map_or(0, ListenerStats::drops) + self.unclassified.unwrap_or(0)
    }
}

/// One attached program's run statistics (kernel.bpf_stats_enabled=1).
pub struct ProgramRuntime {
    pub name: String,
    pub runs: u64,
    pub run_time: Duration,
}

pub struct Scrape {
    pub listeners: Vec<ListenerView>,
    /// None when the kernel does not collect them (kernel.bpf_stats_enabled=0).
    pub programs: Option<Vec<ProgramRuntime>>,
    pub self_stats: [u64; SelfStat::COUNT],
    /// Network namespaces whose queues could not be sampled (no CAP_SYS_ADMIN, or gone).
    pub netns_unreadable: usize,
    /// Per namespace sampled: its ListenDrops growth minus the drops qtrace attributed to its
    /// listeners (see [`super::drops`]).
    pub netns_unattributed: Vec<(u32, i64)>,
    /// The client side: connect() failures and SYN retransmits per destination.
    pub clients: Clients,
}

/// Collects [`Scrape`]s: the kernel's counters, the filter, and the owner cache.
pub struct Collector {
    pub counters: std::sync::Arc<KernelCounters>,
    pub program_ids: Vec<u32>,
    pub probes: Vec<ProbeStatus>,
    pub vis: Visibility,
    owners: Mutex<Owners>,
    filter: Mutex<Filter>,
    drops: Mutex<DropLedger>,
    /// `--max-destination-series`, reloadable with SIGHUP.
    pub max_destination_series: AtomicUsize,
    close_wait_ages: Mutex<CloseWaitAges>,
}

impl Collector {
    pub fn new(
        counters: std::sync::Arc<KernelCounters>,
        program_ids: Vec<u32>,
        probes: Vec<ProbeStatus>,
        filter: Filter,
    ) -> Self {
        Self {
            program_ids,
            vis: Visibility::of(&probes),
            counters,
            probes,
            owners: Mutex::new(Owners::default()),
            filter: Mutex::new(filter),
            drops: Mutex::new(DropLedger::default()),
            max_destination_series: clients::DEFAULT_MAX_SERIES.into(),
            close_wait_ages: Mutex::new(CloseWaitAges::default()),
        }
    }

    /// The owners by listener, as the last collect found them.
    pub fn owner_index(&self) -> OwnerIndex {
        crate::recover::lock(&self.owners).index()
    }

    pub fn set_filter(&self, filter: Filter) {
        *crate::recover::lock(&self.filter) = filter;
    }

    pub fn collect(&self) -> Result<Scrape> {
        let filter = crate::recover::lock(&self.filter).clone();
        // The sockets first, the probes' counts after (see `super::drops`).
        let sampled = sample_all_namespaces(&filter);
        let counted = self.counters.listeners()?;
        let mut rows: BTreeMap<ListenerId, ListenerView> = BTreeMap::new();
        for stats in counted {
            let id = ListenerId::from(&stats.key);
            rows.entry(id)
                .or_insert_with(|| ListenerView::new(id))
                .stats = Some(stats);
        }
        let mut sockets = Vec::new();
        for (netns, queues) in sampled.listeners {
            let id = ListenerId {
                netns,
                addr: queues.addr,
                port: queues.port,
            };
            sockets.push(SocketDrops {
                id,
                inode: queues.inode,
                drops: queues.drops.into(),
            });
            let row = rows.entry(id).or_insert_with(|| ListenerView::new(id));
            // Sockets sharing an address and port (SO_REUSEPORT) are one listener here: their
            // queues add up, and the owner is that of the first.
            match &mut row.queues {
                Some(q) => {
                    q.acceptq_len += queues.acceptq_len;
                    q.acceptq_max += queues.acceptq_max;
                    q.synq_len += queues.synq_len;
                    q.drops += queues.drops;
                }
                None => row.queues = Some(queues),
            }
        }
        let vis = self.vis;
        let classified = |id: &ListenerId| {
            rows.get(id)
                .and_then(|r| r.stats.as_ref())
                .map_or(0, ListenerStats::drops)
        };
        let with_ids: HashSet<ListenerId> = rows
            .values()
            .filter(|r| r.stats.is_some())
            .map(|r| r.id)
            .collect();
        let reckoning = crate::recover::lock(&self.drops).update(
            &Sample {
                sockets: &sockets,
                listen_drops: &sampled.listen_drops,
                unreadable: &sampled.unreadable,
            },
            classified,
            &with_ids,
            !vis.classifies_every_drop(),
        );
        for (id, n) in reckoning.unclassified {
            if let Some(r) = rows.get_mut(&id) {
                r.unclassified = Some(n);
            }
        }
        rows.retain(|id, _| filter.admits(id.netns, id.port));
        let sockets: Vec<(ListenerId, u32)> = rows
            .values()
            .filter_map(|r| Some((r.id, r.queues.as_ref()?.inode)))
            .collect();
        let close_wait: Vec<u32> = sampled
            .census
            .iter()
            .flat_map(|(_, c)| c.close_wait.iter().map(|cw| cw.inode))
            .collect();
        let (mut owners, connection_owners) =
            crate::recover::lock(&self.owners).lookup_listeners_and(&sockets, &close_wait);
        for r in rows.values_mut() {
            r.owner = owners.remove(&r.id);
        }
        let mut clients = self.clients(&filter)?;
        clients.census = crate::recover::lock(&self.close_wait_ages).attribute(
            sampled.census,
            &connection_owners,
            Instant::now(),
        );
        Ok(Scrape {
            listeners: rows.into_values().collect(),
            programs: self.program_runtimes(),
            self_stats: self.counters.self_stats()?,
            netns_unreadable: sampled.unreadable.len(),
            netns_unattributed: reckoning
                .unattributed
                .into_iter()
                .filter(|(ns, _)| filter.admits_netns(*ns))
                .collect(),
            clients,
        })
    }
}

impl Collector {
    /// The kernel's client counts in the namespaces the filter admits, capped for export.
    fn clients(&self, filter: &Filter) -> Result<Clients> {
        let available = client_available(&self.probes);
        let mut counted = if available {
            self.counters.clients()?
        } else {
            Vec::new()
        };
        counted.retain(|c| filter.admits_netns(c.netns()));
        let cap = self.max_destination_series.load(Ordering::Relaxed);
        let mut clients = Clients::capped(available, counted, cap);
        if port_search_available(&self.probes) {
            let mut searched = self.counters.port_search()?;
            searched.retain(|s| filter.admits_netns(s.netns));
            clients.port_search = Some(searched);
        }
        Ok(clients)
    }

    fn program_runtimes(&self) -> Option<Vec<ProgramRuntime>> {
        let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
        if enabled.trim() != "1" {
            return None;
        }
        let mine = aya::programs::loaded_programs()
            .flatten()
            .filter(|p| self.program_ids.contains(&p.id()))
            .map(|p| ProgramRuntime {
                name: p.name_as_str().unwrap_or("?").to_string(),
                runs: p.run_count(),
                run_time: p.run_time(),
            });
        Some(mine.collect())
    }
}

/// What one pass over the namespaces found.
struct Sampled {
    listeners: Vec<(u32, ListenerQueues)>,
    /// Each sampled namespace's TcpExt ListenDrops.
    listen_drops: Vec<(u32, u64)>,
    /// Each sampled namespace's connections.
    census: Vec<(u32, Census)>,
    unreadable: Vec<u32>,
}

/// Listeners and ListenDrops of every namespace the filter admits; entering other namespaces
/// needs CAP_SYS_ADMIN, and those that cannot be entered are counted, not guessed. Each dump
/// walks the kernel's listening hash, which all namespaces share, so namespaces are sampled a
/// few at a time in parallel.
fn sample_all_namespaces(filter: &Filter) -> Sampled {
    let (found, unreadable) = netns::for_each(
        |ns| filter.admits_netns(ns),
        || {
            let listeners = sockdiag::listeners()?;
            let listening = listeners.iter().map(|l| l.port).collect();
            let census = census::sample(&listening)?;
            Ok((listeners, netstat::listen_drops()?, census))
        },
    );
    let mut sampled = Sampled {
        listeners: Vec::new(),
        listen_drops: Vec::new(),
        census: Vec::new(),
        unreadable,
    };
    for (ns, (listeners, listen_drops, census)) in found {
        sampled.listen_drops.push((ns, listen_drops));
        sampled.census.push((ns, census));
        sampled
            .listeners
            .extend(listeners.into_iter().map(|l| (ns, l)));
    }
    sampled
}
