//! One consistent view of every listener, a [`Scrape`], assembled on demand (for /metrics,
//! /api/listeners, the queue history, `top --standalone`): the kernel's counters (per listener
//! key), the queues sampled now with sock_diag in every network namespace qtrace can enter,
//! and each socket's owner from the one owner cache.

use std::{collections::BTreeMap, sync::Arc, sync::Mutex, time::Duration};

use anyhow::Result;
use qtrace_common::SelfStat;

use crate::{
    config::Filter,
    host::{
        netns,
        owners::{Owner, OwnerIndex, Owners},
        sockdiag::{self, ListenerQueues},
    },
    kernel::{
        counters::{KernelCounters, ListenerStats},
        probes::{ProbeStatus, Visibility},
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
}

impl ListenerView {
    /// Drops of every reason so far (0 when nothing was counted).
    pub fn drops(&self) -> u64 {
        self.stats.as_ref().map_or(0, ListenerStats::drops)
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
}

/// Collects [`Scrape`]s: the kernel's counters, the filter, and the owner cache.
pub struct Collector {
    pub counters: std::sync::Arc<KernelCounters>,
    pub program_ids: Vec<u32>,
    pub probes: Vec<ProbeStatus>,
    pub vis: Visibility,
    owners: Mutex<Owners>,
    filter: Mutex<Filter>,
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
        }
    }

    /// The owners by listener, as the last collect found them.
    pub fn owner_index(&self) -> OwnerIndex {
        self.owners.lock().unwrap().index()
    }

    pub fn set_filter(&self, filter: Filter) {
        *self.filter.lock().unwrap() = filter;
    }

    pub fn collect(&self) -> Result<Scrape> {
        let filter = self.filter.lock().unwrap().clone();
        let mut rows: BTreeMap<ListenerId, ListenerView> = BTreeMap::new();
        for stats in self.counters.listeners()? {
            let id = ListenerId::from(&stats.key);
            rows.insert(
                id,
                ListenerView {
                    id,
                    stats: Some(stats),
                    queues: None,
                    owner: None,
                },
            );
        }
        let (sampled, netns_unreadable) = sample_all_namespaces(&filter);
        for (netns, queues) in sampled {
            let id = ListenerId {
                netns,
                addr: queues.addr,
                port: queues.port,
            };
            rows.entry(id)
                .or_insert(ListenerView {
                    id,
                    stats: None,
                    queues: None,
                    owner: None,
                })
                .queues = Some(queues);
        }
        rows.retain(|id, _| filter.admits(id.netns, id.port));
        let sockets: Vec<(ListenerId, u32)> = rows
            .values()
            .filter_map(|r| Some((r.id, r.queues.as_ref()?.inode)))
            .collect();
        let mut owners = self.owners.lock().unwrap().lookup_listeners(&sockets);
        for r in rows.values_mut() {
            r.owner = owners.remove(&r.id);
        }
        Ok(Scrape {
            listeners: rows.into_values().collect(),
            programs: self.program_runtimes(),
            self_stats: self.counters.self_stats()?,
            netns_unreadable,
        })
    }
}

impl Collector {
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

/// Listeners of every namespace the filter admits; entering other namespaces needs
/// CAP_SYS_ADMIN, and those that cannot be entered are counted, not guessed. Each dump walks
/// the kernel's listening hash, which all namespaces share, so namespaces are sampled a few
/// at a time in parallel.
fn sample_all_namespaces(filter: &Filter) -> (Vec<(u32, ListenerQueues)>, usize) {
    let (found, unreadable) = netns::for_each(|ns| filter.admits_netns(ns), sockdiag::listeners);
    let sampled = found
        .into_iter()
        .flat_map(|(ns, ls)| ls.into_iter().map(move |l| (ns, l)))
        .collect();
    (sampled, unreadable)
}
