//! One consistent view of every listener, a [`Scrape`], assembled on demand (for /metrics,
//! /api/listeners, the queue history, `top --standalone`): the kernel's counters (per listener
//! key), the queues and the sockets' own drop counts sampled now with sock_diag in every
//! network namespace qtrace can enter (before the counters are read: see [`super::drops`]),
//! the drops no probe classified, and each socket's owner from the one owner cache.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use qtrace_common::{listener::SOCK_INODE, SelfStat};

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
        counters::{KernelCounters, ListenerStats, Occupancy},
        probes::{client_available, port_search_available, ProbeStatus, Visibility},
        programs::{ProgramStats, Programs},
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

pub struct Scrape {
    pub listeners: Vec<ListenerView>,
    /// The attached programs' run statistics and recursion misses.
    pub programs: Vec<ProgramStats>,
    pub self_stats: [u64; SelfStat::COUNT],
    /// Network namespaces whose queues could not be sampled (no CAP_SYS_ADMIN, or gone).
    pub netns_unreadable: usize,
    /// Per namespace sampled: its ListenDrops growth minus the drops qtrace attributed to its
    /// listeners (see [`super::drops`]).
    pub netns_unattributed: Vec<(u32, i64)>,
    /// Entries in the kernel's listener maps, and their size.
    pub occupancy: Occupancy,
    /// Entries of closed sockets deleted from the kernel's maps since qtrace started.
    pub reclaimed: u64,
    /// The container name resolver's counts; None where it does not run (`top --standalone`).
    pub names: Option<crate::host::names::NameCounts>,
    /// The client side: connect() failures and SYN retransmits per destination.
    pub clients: Clients,
}

/// Collects [`Scrape`]s: the kernel's counters, the filter, and the owner cache.
pub struct Collector {
    pub counters: std::sync::Arc<KernelCounters>,
    pub programs: std::sync::Arc<Programs>,
    pub probes: Vec<ProbeStatus>,
    pub vis: Visibility,
    owners: Mutex<Owners>,
    filter: Mutex<Filter>,
    drops: Mutex<DropLedger>,
    reclaim: Mutex<Reclaim>,
    /// `--max-destination-series`, reloadable with SIGHUP.
    pub max_destination_series: AtomicUsize,
    /// `--keep-closed-for` in milliseconds, reloadable with SIGHUP.
    keep_closed_for_ms: AtomicU64,
    close_wait_ages: Mutex<CloseWaitAges>,
    /// Client entries of dead namespaces whose inode numbers live ones hold (see
    /// [`Self::clients`]), with the live one's cookie.
    dead_clients: Mutex<crate::aging::Aging<(qtrace_common::ClientKey, u64)>>,
}

/// Kernel entries whose socket no collect finds any more. An entry missing from one dump may
/// belong to a socket made after the dump began; one missing from two consecutive dumps
/// (and read before the second began) belongs to a socket that has closed, or to a namespace
/// that is gone. Such an entry is still exported for `--keep-closed-for`, so scrapes see a
/// closed listener's last counts, then deleted: the maps hold only live sockets, and a socket
/// that comes back on the same address, or a namespace that gets a dead one's inode number,
/// starts from zero (Prometheus' reading of a series that goes away and comes back).
#[derive(Default)]
struct Reclaim {
    /// Entries missing from the last dump, and since when.
    suspects: crate::aging::Aging<qtrace_common::ListenerKey>,
    deleted: u64,
}

impl Collector {
    pub fn new(
        counters: std::sync::Arc<KernelCounters>,
        programs: std::sync::Arc<Programs>,
        probes: Vec<ProbeStatus>,
        filter: Filter,
    ) -> Self {
        Self {
            programs,
            vis: Visibility::of(&probes),
            counters,
            probes,
            owners: Mutex::new(Owners::default()),
            filter: Mutex::new(filter),
            drops: Mutex::new(DropLedger::default()),
            reclaim: Mutex::new(Reclaim::default()),
            max_destination_series: clients::DEFAULT_MAX_SERIES.into(),
            keep_closed_for_ms: (crate::config::DEFAULT_KEEP_CLOSED_FOR.as_millis() as u64).into(),
            close_wait_ages: Mutex::new(CloseWaitAges::default()),
            dead_clients: Mutex::new(crate::aging::Aging::default()),
        }
    }

    /// The owners by listener, as the last collect found them.
    pub fn owner_index(&self) -> OwnerIndex {
        crate::recover::lock(&self.owners).index()
    }

    /// Names containers, pods and network namespaces in the owners from now on.
    pub fn set_names(&self, names: std::sync::Arc<crate::host::names::Resolver>) {
        crate::recover::lock(&self.owners).set_names(names);
    }

    pub fn set_filter(&self, filter: Filter) {
        *crate::recover::lock(&self.filter) = filter;
    }

    pub fn collect(&self) -> Result<Scrape> {
        let filter = crate::recover::lock(&self.filter).clone();
        // The sockets first, the probes' counts after (see `super::drops`).
        let sampled = sample_all_namespaces(&filter);
        let counted = self.counters.listeners()?;
        let occupancy = self.counters.occupancy(&counted);
        let mut rows: BTreeMap<ListenerId, ListenerView> = BTreeMap::new();
        let mut sockets = Vec::new();
        let mut index = SocketIndex::default();
        for (netns, queues) in sampled.listeners {
            let id = ListenerId {
                netns,
                addr: queues.addr,
                port: queues.port,
                socket: queues.cookie,
            };
            index.add(id, queues.inode);
            sockets.push(SocketDrops {
                id,
                inode: queues.inode,
                drops: queues.drops.into(),
            });
            rows.entry(id)
                .or_insert_with(|| ListenerView::new(id))
                .queues = Some(queues);
        }
        let sampled_netns: HashSet<u32> = sampled.listen_drops.iter().map(|(ns, _)| *ns).collect();
        let mut unmatched = Vec::new();
        for stats in counted {
            let id = match index.find(&stats.key) {
                Some(id) => id,
                // A namespace that exists but could not be read, or that the filter leaves
                // out: its sockets are not known to be closed.
                None if sample_skipped(
                    &stats.key,
                    &sampled_netns,
                    &sampled.unreadable,
                    &filter,
                ) =>
                {
                    ListenerId::from(&stats.key)
                }
                None => {
                    unmatched.push(stats);
                    continue;
                }
            };
            add_stats(&mut rows, id, stats);
        }
        let (reclaimed, closing) = self.reclaim(unmatched);
        for stats in closing {
            // A socket that closed: its last counts, under its cookie when the key has one.
            let mut id = ListenerId::from(&stats.key);
            if stats.key.sock & SOCK_INODE == 0 {
                id.socket = stats.key.sock;
            }
            add_stats(&mut rows, id, stats);
        }
        crate::recover::lock(&self.owners).set_sockets(index.inodes);
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
        let mut ledger = crate::recover::lock(&self.drops);
        for &(ns, cookie) in &sampled.netns_cookies {
            ledger.identify_namespace(ns, cookie);
        }
        let reckoning = ledger.update(
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
        let mut sockets: Vec<(ListenerId, u32)> = rows
            .values()
            .filter_map(|r| Some((r.id, r.queues.as_ref()?.inode)))
            .collect();
        // Namespaces qtrace cannot enter (no CAP_SYS_ADMIN: pods' own, under the unit's and the
        // DaemonSet's capabilities) have no queues, but their counted listeners still get
        // their owner, and so their workload names, from /proc/<pid>/net/tcp.
        if !sampled.unreadable.is_empty() {
            let unreadable: HashSet<u32> = sampled.unreadable.iter().copied().collect();
            let have: HashSet<ListenerId> = sockets.iter().map(|s| s.0).collect();
            sockets.extend(
                crate::host::owners::listeners_via_proc(&unreadable)
                    .into_iter()
                    .filter(|(id, _)| rows.contains_key(id) && !have.contains(id)),
            );
        }
        let close_wait: Vec<u32> = sampled
            .census
            .iter()
            .flat_map(|(_, c)| c.close_wait.iter().map(|cw| cw.inode))
            .collect();
        let ((mut owners, connection_owners), names) = {
            let mut o = crate::recover::lock(&self.owners);
            (
                o.lookup_listeners_and(&sockets, &close_wait),
                o.name_counts(),
            )
        };
        for r in rows.values_mut() {
            r.owner = owners.remove(&r.id);
        }
        let live: HashMap<u32, u64> = sampled.netns_cookies.iter().copied().collect();
        let mut clients = self.clients(&filter, &live)?;
        clients.census = crate::recover::lock(&self.close_wait_ages).attribute(
            sampled.census,
            &connection_owners,
            Instant::now(),
        );
        Ok(Scrape {
            listeners: rows.into_values().collect(),
            occupancy,
            reclaimed,
            programs: self.programs.stats(),
            self_stats: self.counters.self_stats()?,
            netns_unreadable: sampled.unreadable.len(),
            netns_unattributed: reckoning
                .unattributed
                .into_iter()
                .filter(|(ns, _)| filter.admits_netns(*ns))
                .collect(),
            names,
            clients,
        })
    }
}

impl Collector {
    /// How long a closed socket's or deleted namespace's counts stay exported.
    pub fn keep_closed_for(&self) -> Duration {
        Duration::from_millis(self.keep_closed_for_ms.load(Ordering::Relaxed))
    }

    pub fn set_keep_closed_for(&self, d: Duration) {
        self.keep_closed_for_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Deletes the entries missing from this dump and the one before, for
    /// `--keep-closed-for` (see [`Reclaim`]); returns how many were deleted so far, and the
    /// entries still to export.
    fn reclaim(&self, unmatched: Vec<ListenerStats>) -> (u64, Vec<ListenerStats>) {
        let mut r = crate::recover::lock(&self.reclaim);
        let (gone, kept) =
            r.suspects
                .split(unmatched, |s| s.key, Instant::now(), self.keep_closed_for());
        r.deleted += self.counters.forget(&gone) as u64;
        (r.deleted + self.counters.unidentified_deleted(), kept)
    }

    /// The kernel's client counts in the namespaces the filter admits, each namespace's own
    /// (`live`: the sampled namespaces' cookies), capped for export.
    fn clients(&self, filter: &Filter, live: &HashMap<u32, u64>) -> Result<Clients> {
        let available = client_available(&self.probes);
        let mut counted = if available {
            let reading = self.counters.clients(live)?;
            // An entry left out for the same live namespace's cookie at readings
            // `--keep-closed-for` apart was read while that namespace held its inode, which it
            // held throughout: the entry's namespace died before, and counts nothing any more.
            // Deleted: it would come back (summed) once the inode is free again, and it holds a
            // place in the map.
            let (overdue, _) = crate::recover::lock(&self.dead_clients).split(
                reading.dead,
                |d| *d,
                Instant::now(),
                self.keep_closed_for(),
            );
            let keys: Vec<_> = overdue.into_iter().map(|(k, _)| k).collect();
            self.counters.forget_clients(&keys);
            reading.rows
        } else {
            Vec::new()
        };
        counted.retain(|c| filter.admits_netns(c.netns()));
        let cap = self.max_destination_series.load(Ordering::Relaxed);
        let mut clients = Clients::capped(available, counted, cap);
        if port_search_available(&self.probes) {
            let mut searched = self.counters.port_search(live)?;
            searched.retain(|s| filter.admits_netns(s.netns));
            clients.port_search = Some(searched);
        }
        Ok(clients)
    }
}

/// Adds a kernel entry's counts to its socket's row (a socket counted first under its inode,
/// then under its cookie, has two entries).
fn add_stats(rows: &mut BTreeMap<ListenerId, ListenerView>, id: ListenerId, stats: ListenerStats) {
    let row = rows.entry(id).or_insert_with(|| ListenerView::new(id));
    match &mut row.stats {
        Some(s) => s.add(&stats),
        None => row.stats = Some(stats),
    }
}

/// Whether the socket of `key` lives in a namespace this collect did not dump: one that could
/// not be read, or one the filter leaves out (which is not entered at all).
fn sample_skipped(
    key: &qtrace_common::ListenerKey,
    sampled: &HashSet<u32>,
    unreadable: &[u32],
    filter: &Filter,
) -> bool {
    !sampled.contains(&key.netns)
        && (unreadable.contains(&key.netns) || !filter.admits_netns(key.netns))
}

/// The sockets one dump found, by each identity the kernel programs may key them by: the
/// cookie, or the inode while the socket had none (see `ListenerKey::sock`).
#[derive(Default)]
struct SocketIndex {
    by_sock: HashMap<u64, ListenerId>,
    by_address: HashMap<(u32, IpAddr, u16), Vec<ListenerId>>,
    /// Inode → cookie, for events keyed by an inode.
    inodes: HashMap<u32, u64>,
}

impl SocketIndex {
    fn add(&mut self, id: ListenerId, inode: u32) {
        self.by_sock.insert(id.socket, id);
        self.by_sock.insert(SOCK_INODE | u64::from(inode), id);
        self.by_address.entry(id.address()).or_default().push(id);
        self.inodes.insert(inode, id.socket);
    }

    /// The live socket a kernel entry counts for. An entry keyed by neither cookie nor inode
    /// (a socket whose inode was already gone) goes to the only socket on its address, if
    /// there is one.
    fn find(&self, key: &qtrace_common::ListenerKey) -> Option<ListenerId> {
        let id = ListenerId::from(key);
        if key.sock == 0 {
            return match self.by_address.get(&id.address())?.as_slice() {
                [only] => Some(*only),
                _ => None,
            };
        }
        self.by_sock
            .get(&key.sock)
            .copied()
            .filter(|found| found.address() == id.address())
    }
}

/// What one pass over the namespaces found.
struct Sampled {
    listeners: Vec<(u32, ListenerQueues)>,
    /// Each sampled namespace's TcpExt ListenDrops.
    listen_drops: Vec<(u32, u64)>,
    /// Each sampled namespace's cookie, where the kernel tells it.
    netns_cookies: Vec<(u32, u64)>,
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
            // One dump per family for the listeners and the census (see
            // `sockdiag::namespace_sockets`).
            let found = sockdiag::namespace_sockets()?;
            let listening = found.listeners.iter().map(|l| l.port).collect();
            let census = census::of(&listening, &found.connections);
            let drops = netstat::listen_drops()?;
            Ok((found.listeners, drops, census, netns::cookie()))
        },
    );
    let mut sampled = Sampled {
        listeners: Vec::new(),
        listen_drops: Vec::new(),
        netns_cookies: Vec::new(),
        census: Vec::new(),
        unreadable,
    };
    for (ns, (listeners, listen_drops, census, cookie)) in found {
        sampled.listen_drops.push((ns, listen_drops));
        sampled.netns_cookies.extend(cookie.map(|c| (ns, c)));
        sampled.census.push((ns, census));
        sampled
            .listeners
            .extend(listeners.into_iter().map(|l| (ns, l)));
    }
    sampled
}
