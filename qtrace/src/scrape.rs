//! One consistent view of every listener, assembled on demand for /metrics and
//! /api/listeners: the kernel's counters (per listener key), the queues sampled now with
//! sock_diag in every network namespace qtrace can enter, and each socket's owner.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Mutex,
    time::Duration,
};

use anyhow::{anyhow, Result};
use qtrace_common::{ListenerKey, SelfStat};
use serde::Serialize;

use crate::{
    config::Filter,
    listener::ip,
    netns,
    owners::{Owner, Owners},
    probes::ProbeStatus,
    snapshot::Visibility,
    sockdiag::{self, ListenerQueues},
    stats::{KernelCounters, ListenerStats},
};

/// A listener as exported: (netns inode, address, port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ListenerId {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
}

impl ListenerId {
    /// The listener of an entry of a JSON snapshot (`netns`, `addr`, `port`).
    pub fn of_json(l: &serde_json::Value) -> Option<Self> {
        Some(Self {
            netns: l["netns"].as_u64()?.try_into().ok()?,
            addr: l["addr"].as_str()?.parse().ok()?,
            port: l["port"].as_u64()?.try_into().ok()?,
        })
    }

    /// A JSON snapshot's listeners by their id.
    pub fn index(snapshot: &serde_json::Value) -> HashMap<Self, &serde_json::Value> {
        snapshot["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| Some((Self::of_json(l)?, l)))
            .collect()
    }
}

impl From<&ListenerKey> for ListenerId {
    fn from(k: &ListenerKey) -> Self {
        Self {
            netns: k.netns,
            addr: ip(k.family, k.addr),
            port: k.port,
        }
    }
}

/// Everything known about one listener at this moment.
#[derive(Clone, Debug)]
pub struct ListenerView {
    pub id: ListenerId,
    /// Kernel counters; None when nothing was ever counted for it.
    pub stats: Option<ListenerStats>,
    /// Queues now; None when the listener is closed or its namespace was not readable.
    pub queues: Option<ListenerQueues>,
    pub owner: Option<Owner>,
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

pub struct Scraper {
    pub counters: std::sync::Arc<KernelCounters>,
    pub program_ids: Vec<u32>,
    pub probes: Vec<ProbeStatus>,
    pub vis: Visibility,
    owners: Mutex<Owners>,
    filter: Mutex<Filter>,
}

impl Scraper {
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

    pub fn set_filter(&self, filter: Filter) {
        *crate::recover::lock(&self.filter) = filter;
    }

    pub fn collect(&self) -> Result<Scrape> {
        let filter = crate::recover::lock(&self.filter).clone();
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
        let inodes = rows
            .values()
            .filter_map(|r| r.queues.as_ref().map(|q| q.inode));
        let mut owners = crate::recover::lock(&self.owners);
        let owners = owners.lookup(inodes.collect::<Vec<_>>());
        for r in rows.values_mut() {
            r.owner = r
                .queues
                .as_ref()
                .and_then(|q| owners.get(&q.inode).cloned());
        }
        Ok(Scrape {
            listeners: rows.into_values().collect(),
            programs: self.program_runtimes(),
            self_stats: self.counters.self_stats()?,
            netns_unreadable,
        })
    }
}

impl Scraper {
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

/// Listeners of every namespace; entering other namespaces needs CAP_SYS_ADMIN, and those
/// that cannot be entered are counted, not guessed. Each dump walks the kernel's listening
/// hash, which all namespaces share, so namespaces are sampled a few at a time in parallel.
fn sample_all_namespaces(filter: &Filter) -> (Vec<(u32, ListenerQueues)>, usize) {
    let own = netns::own().ok();
    // A namespace the filter excludes is not entered at all.
    let namespaces: Vec<_> = netns::all()
        .into_iter()
        .filter(|ns| filter.admits_netns(ns.inode))
        .collect();
    // At most 4 threads: the service's TasksMax counts each one, whatever the host's size.
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut out = Vec::new();
    let mut unreadable = 0;
    for batch in namespaces.chunks(parallel) {
        let sampled: Vec<_> = std::thread::scope(|scope| {
            let threads: Vec<_> = batch
                .iter()
                .map(|ns| {
                    let mine = own.as_ref().is_some_and(|o| o.inode == ns.inode);
                    // A thread that cannot be started (TasksMax) is an error for that
                    // namespace, not a panic of the scrape.
                    std::thread::Builder::new().spawn_scoped(scope, move || {
                        if mine {
                            sockdiag::listeners()
                        } else {
                            netns::enter(ns).and_then(|()| sockdiag::listeners())
                        }
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| match t {
                    Ok(t) => t
                        .join()
                        .unwrap_or_else(|_| Err(anyhow!("sampling panicked"))),
                    Err(e) => Err(anyhow!("start a sampling thread: {e}")),
                })
                .collect()
        });
        for (ns, sampled) in batch.iter().zip(sampled) {
            match sampled {
                Ok(ls) => out.extend(ls.into_iter().map(|l| (ns.inode, l))),
                Err(e) => {
                    tracing::debug!("netns {}: {e:#}", ns.inode);
                    unreadable += 1;
                }
            }
        }
    }
    (out, unreadable)
}
