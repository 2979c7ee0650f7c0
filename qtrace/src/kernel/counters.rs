//! The kernel's counters: the per-CPU listener and self-accounting maps, read and summed
//! per listener whenever someone asks (a scrape, a table); nothing is cached in user space.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap},
    Ebpf,
};
use qtrace_common::{
    maps, ClientCounters, ClientKey, Counter, DropReason, ListenerCounters, ListenerKey,
    PortSearchSlot, SelfStat, WAIT_BUCKETS,
};

use crate::{
    aging::Aging,
    api::{self, AcceptWait, Counters, Family},
    kernel::{
        clients::{self, PortSearchStats},
        probes::Visibility,
    },
    listener::{ip, ListenerId},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerStats {
    pub key: ListenerKey,
    /// Its entry in the kernel's map: `key.sock`, or the stand-in for a socket that had
    /// neither cookie nor inode (`qtrace_common::listener::SOCK_ADDR`).
    pub entry: u64,
    /// Counted in the partition of users' listeners (`sk_uid` ≥ `--first-user-uid`).
    pub user: bool,
    pub counts: [u64; Counter::COUNT],
    pub wait_buckets: [u64; WAIT_BUCKETS],
    pub wait_sum_ns: u64,
}

impl ListenerStats {
    pub fn get(&self, counter: Counter) -> u64 {
        self.counts[counter as usize]
    }

    /// Drops of every reason.
    pub fn drops(&self) -> u64 {
        DropReason::ALL.iter().map(|r| self.get(r.counter())).sum()
    }

    pub fn empty(key: ListenerKey) -> Self {
        ListenerStats {
            key,
            entry: key.sock,
            user: false,
            counts: [0; Counter::COUNT],
            wait_buckets: [0; WAIT_BUCKETS],
            wait_sum_ns: 0,
        }
    }

    /// Its counters by name: None for what no attached probe sees.
    pub fn counters(&self, vis: Visibility) -> Counters {
        Counters {
            kernel: Counter::ALL.map(|c| vis.sees(c).then(|| self.get(c))),
            unclassified: None,
        }
    }

    /// The accept-wait histogram, or None when the accept probe is not attached.
    pub fn accept_wait(&self, vis: Visibility) -> Option<AcceptWait> {
        vis.sees(Counter::Accepted).then(|| {
            let mut cumulative = 0;
            let buckets = self
                .wait_buckets
                .iter()
                .enumerate()
                .map(|(b, n)| {
                    cumulative += n;
                    (wait_bucket_le_seconds(b), cumulative)
                })
                .collect();
            AcceptWait {
                count: cumulative,
                sum_seconds: self.wait_sum_ns as f64 / 1e9,
                buckets,
            }
        })
    }

    /// The listener as the wire snapshot shows it from the kernel's counters alone.
    pub fn to_api(&self, vis: Visibility) -> api::Listener {
        let id = ListenerId::from(&self.key);
        api::Listener {
            netns: id.netns,
            family: Family::of(self.key.family),
            addr: ip(self.key.family, self.key.addr),
            port: id.port,
            socket: 0,
            counters: self.counters(vis),
            accept_wait: self.accept_wait(vis),
            queues: None,
            owner: None,
            last_hour: None,
        }
    }

    /// An entry's counters summed over CPUs, under the key the CPUs that counted wrote in;
    /// None while no CPU has (the instant between its creation and its first count).
    fn sum(entry: u64, per_cpu: &[ListenerCounters]) -> Option<Self> {
        let mut ids = per_cpu.iter().map(|c| c.id).filter(|id| id.netns != 0);
        let first = ids.next()?;
        // close() zeroes a listener's port: a CPU whose first count came after it (a
        // request's SYN-ACK retransmit) wrote port 0. Any copy made while it listened wins.
        let key = if first.port != 0 {
            first
        } else {
            ids.find(|id| id.port != 0).unwrap_or(first)
        };
        let mut s = Self::empty(key);
        s.entry = entry;
        for cpu in per_cpu {
            s.add_parts(&cpu.counts, &cpu.wait_buckets, cpu.wait_sum_ns);
        }
        Some(s)
    }

    /// Sums the entries of each listening address (netns, family, address, port), whatever
    /// their socket, sorted by key; their `key.sock` is 0.
    pub fn by_address(stats: Vec<ListenerStats>) -> Vec<ListenerStats> {
        let mut out: std::collections::BTreeMap<ListenerKey, ListenerStats> = Default::default();
        for s in stats {
            let key = ListenerKey { sock: 0, ..s.key };
            out.entry(key)
                .and_modify(|sum| sum.add(&s))
                .or_insert(ListenerStats { key, entry: 0, ..s });
        }
        out.into_values().collect()
    }

    /// Adds another listener's counts (for series summed past the label cap).
    pub fn add(&mut self, other: &ListenerStats) {
        self.add_parts(&other.counts, &other.wait_buckets, other.wait_sum_ns);
    }

    fn add_parts(&mut self, counts: &[u64], buckets: &[u64], wait_sum_ns: u64) {
        for (total, v) in self.counts.iter_mut().zip(counts) {
            *total += v;
        }
        for (total, v) in self.wait_buckets.iter_mut().zip(buckets) {
            *total += v;
        }
        self.wait_sum_ns += wait_sum_ns;
    }
}

type ListenerMap = PerCpuHashMap<MapData, u64, ListenerCounters>;

/// The kernel's counter maps, taken out of the eBPF object so readers (the periodic table,
/// every scrape) need not hold the tracer.
pub struct KernelCounters {
    /// The system's listeners, then users' (see `qtrace_common::maps::USER_LISTENERS`).
    /// Locked only to delete entries of closed sockets.
    listeners: Mutex<[ListenerMap; 2]>,
    /// Entries each listener map holds at most.
    capacity: usize,
    self_stats: PerCpuArray<MapData, u64>,
    /// Locked to delete dead namespaces' entries (`forget_clients`).
    clients: Mutex<PerCpuHashMap<MapData, ClientKey, ClientCounters>>,
    port_search_slots: PerCpuArray<MapData, PortSearchSlot>,
    port_search: PerCpuHashMap<MapData, u32, PortSearchSlot>,
    /// Listener entries no CPU had written its key into at the last reading (partition,
    /// entry), since when, and how many such entries were deleted (see [`Self::listeners`]).
    unidentified: Mutex<Aging<(bool, u64)>>,
    unidentified_deleted: AtomicU64,
}

/// How full the listener maps are: entries in each partition, and the size of each.
#[derive(Clone, Copy, Debug, Default)]
pub struct Occupancy {
    pub system: usize,
    pub user: usize,
    pub capacity: usize,
}

impl KernelCounters {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let system = take(maps::LISTENERS)?;
        let capacity = match &system {
            aya::maps::Map::PerCpuHashMap(m) => m.info()?.max_entries() as usize,
            _ => 0,
        };
        Ok(Self {
            capacity,
            listeners: Mutex::new([
                PerCpuHashMap::try_from(system)?,
                PerCpuHashMap::try_from(take(maps::USER_LISTENERS)?)?,
            ]),
            self_stats: PerCpuArray::try_from(take(maps::SELF_STATS)?)?,
            clients: Mutex::new(PerCpuHashMap::try_from(take(maps::CLIENTS)?)?),
            port_search_slots: PerCpuArray::try_from(take(maps::PORT_SEARCH_SLOTS)?)?,
            port_search: PerCpuHashMap::try_from(take(maps::PORT_SEARCH)?)?,
            unidentified: Mutex::new(Aging::default()),
            unidentified_deleted: AtomicU64::new(0),
        })
    }

    /// Every listening socket the kernel has counted something for, sorted by key.
    ///
    /// An entry no CPU has written its key into is the instant between its creation and its
    /// first count, unless reading the socket failed in the kernel (then it holds no count
    /// either): one still unidentified [`UNIDENTIFIED_FOR`] later is deleted, so it cannot
    /// hold a slot for good. By time, not by readings: callers read concurrently.
    pub fn listeners(&self) -> Result<Vec<ListenerStats>> {
        let mut maps = crate::recover::lock(&self.listeners);
        let mut out = Vec::new();
        let mut unidentified = Vec::new();
        for (i, map) in maps.iter().enumerate() {
            for entry in map.iter() {
                let (entry, per_cpu) = entry.context("read the listener map")?;
                match ListenerStats::sum(entry, &per_cpu) {
                    Some(mut stats) => {
                        stats.user = i == 1;
                        out.push(stats);
                    }
                    None => unidentified.push((i == 1, entry)),
                }
            }
        }
        let (stale, _) = crate::recover::lock(&self.unidentified).split(
            unidentified,
            |k| *k,
            Instant::now(),
            UNIDENTIFIED_FOR,
        );
        for (user, entry) in stale {
            if maps[usize::from(user)].remove(&entry).is_ok() {
                self.unidentified_deleted.fetch_add(1, Ordering::Relaxed);
            }
        }
        out.sort_by_key(|s| s.key);
        Ok(out)
    }

    /// Listener entries deleted because no CPU ever wrote their key (see [`Self::listeners`]).
    pub fn unidentified_deleted(&self) -> u64 {
        self.unidentified_deleted.load(Ordering::Relaxed)
    }

    /// Deletes the entries of sockets that no longer exist; returns how many went.
    pub fn forget(&self, gone: &[ListenerStats]) -> usize {
        let mut maps = crate::recover::lock(&self.listeners);
        gone.iter()
            .filter(|s| maps[usize::from(s.user)].remove(&s.entry).is_ok())
            .count()
    }

    /// Entries per partition (from a [`Self::listeners`] reading) and each map's size.
    pub fn occupancy(&self, listeners: &[ListenerStats]) -> Occupancy {
        let user = listeners.iter().filter(|s| s.user).count();
        Occupancy {
            system: listeners.len() - user,
            user,
            capacity: self.capacity,
        }
    }

    /// Every destination whose connects the kernel counted something for, sorted by key, as
    /// the namespaces holding their inode numbers now see them (`live`: their cookies, see
    /// [`clients::Namespaces`]).
    pub fn clients(&self, live: &HashMap<u32, u64>) -> Result<clients::ClientReading> {
        clients::read(
            &crate::recover::lock(&self.clients),
            clients::Namespaces(live),
        )
    }

    /// Deletes these client entries (those already gone are no error).
    pub fn forget_clients(&self, keys: &[ClientKey]) {
        let mut map = crate::recover::lock(&self.clients);
        for k in keys {
            let _ = map.remove(k);
        }
    }

    /// Each namespace's port-search histogram, likewise.
    pub fn port_search(&self, live: &HashMap<u32, u64>) -> Result<Vec<PortSearchStats>> {
        clients::read_port_search(
            &self.port_search_slots,
            &self.port_search,
            clients::Namespaces(live),
        )
    }

    /// qtrace's own losses, summed over CPUs, indexed by [`SelfStat`].
    pub fn self_stats(&self) -> Result<[u64; SelfStat::COUNT]> {
        let mut out = [0; SelfStat::COUNT];
        for stat in SelfStat::ALL {
            out[stat as usize] = self.self_stats.get(&(stat as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

/// Upper bound, in seconds, of accept-wait bucket `b` (see `qtrace_common::WAIT_BUCKETS`).
pub fn wait_bucket_le_seconds(b: usize) -> f64 {
    (1u64 << b) as f64 / 1e6
}

/// How long an entry may stay without its key before it is deleted: a kernel program writes
/// the key a few instructions after it creates the entry.
const UNIDENTIFIED_FOR: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_of_the_key_made_while_listening_wins_over_one_made_after_close() {
        let mut a = ListenerCounters::ZERO;
        let mut b = ListenerCounters::ZERO;
        let key = ListenerKey {
            netns: 4026531840,
            port: 80,
            ..ListenerKey::default()
        };
        a.id = ListenerKey { port: 0, ..key };
        b.id = key;
        let s = ListenerStats::sum(7, &[a, b]).unwrap();
        assert_eq!(s.key, key);
    }

    #[test]
    fn sums_over_cpus() {
        let mut a = ListenerCounters::ZERO;
        let mut b = ListenerCounters::ZERO;
        a.counts[Counter::SynackRetransmits as usize] = 2;
        b.counts[Counter::SynackRetransmits as usize] = 5;
        a.wait_buckets[3] = 1;
        b.wait_buckets[3] = 1;
        b.wait_sum_ns = 7;
        // Only the CPU that counted first wrote the key in.
        b.id = ListenerKey {
            netns: 4026531840,
            port: 80,
            sock: 9,
            ..ListenerKey::default()
        };
        assert_eq!(
            ListenerStats::sum(9, &[a, a]),
            None,
            "no CPU has counted yet"
        );
        let s = ListenerStats::sum(9, &[a, b]).unwrap();
        assert_eq!((s.key, s.entry), (b.id, 9));
        assert_eq!(s.get(Counter::SynackRetransmits), 7);
        assert_eq!(s.wait_buckets[3], 2);
        assert_eq!(s.wait_sum_ns, 7);
    }

    #[test]
    fn bucket_bounds_are_powers_of_two_microseconds() {
        assert_eq!(wait_bucket_le_seconds(0), 1e-6);
        assert_eq!(wait_bucket_le_seconds(10), 1024e-6);
    }
}
