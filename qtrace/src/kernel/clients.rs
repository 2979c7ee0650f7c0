//! The client counters: the per-CPU map of (namespace, process, destination) → connect()
//! failures by reason and SYN retransmits, summed over CPUs whenever someone asks.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use qtrace_common::{ClientCounter, ClientCounters, ClientKey, PortSearch, PortSearchSlot};

use crate::listener::ip;

/// One destination of one process, its counts summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientStats {
    pub key: ClientKey,
    pub counts: [u64; ClientCounter::COUNT],
}

impl ClientStats {
    pub fn get(&self, c: ClientCounter) -> u64 {
        self.counts[c as usize]
    }

    pub fn netns(&self) -> u32 {
        self.key.netns
    }

    pub fn pid(&self) -> u32 {
        self.key.pid
    }

    /// The process name as the kernel recorded it (up to its first NUL).
    pub fn comm(&self) -> String {
        let end = self.key.comm.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.key.comm[..end]).into_owned()
    }

    pub fn daddr(&self) -> IpAddr {
        ip(self.key.family, self.key.daddr)
    }

    pub fn dport(&self) -> u16 {
        self.key.dport
    }

    /// Adds another destination's counts (for series folded past the label cap).
    pub fn add(&mut self, other: &ClientStats) {
        for (total, v) in self.counts.iter_mut().zip(other.counts) {
            *total += v;
        }
    }

    fn sum(key: ClientKey, per_cpu: &[ClientCounters]) -> Self {
        let mut counts = [0; ClientCounter::COUNT];
        for cpu in per_cpu {
            for (total, v) in counts.iter_mut().zip(cpu.counts) {
                *total += v;
            }
        }
        Self { key, counts }
    }
}

/// The namespaces alive now, by inode number, with their cookies where the kernel tells them
/// (`SO_NETNS_COOKIE`, 5.14+). The kernel hands a deleted namespace's inode number to the next
/// namespace created, and the programs keep each namespace's counts under its inode and its
/// cookie (`ClientKey::netns_cookie`; 0 before 5.12, where the kernel makes one only when
/// asked): counts whose cookie is not the live namespace's of that inode were a dead one's,
/// and are left out, so the new namespace starts from zero. Where either cookie is unknown,
/// counts stay under the inode.
#[derive(Clone, Copy)]
pub struct Namespaces<'a>(pub &'a HashMap<u32, u64>);

impl Namespaces<'_> {
    /// Whether counts kept for namespace `inode` with the low `mask` bits of its cookie,
    /// `cookie`, are the live namespace's (or cannot be told from them).
    fn owns(self, inode: u32, cookie: u64, mask: u64) -> bool {
        cookie == 0 || self.0.get(&inode).is_none_or(|&live| live & mask == cookie)
    }

    /// The inode of a port-search map's namespace (see `PortSearchSlot::netns`), if its
    /// counts are the live namespace's.
    fn port_search(self, netns: u64) -> Option<u32> {
        let inode = PortSearchSlot::inode(netns);
        let cookie = PortSearchSlot::cookie(netns);
        self.owns(inode, cookie, u64::from(u32::MAX))
            .then_some(inode)
    }

    /// `counted` without a dead namespace's entries, those differing by cookie alone (a dead
    /// namespace's whose inode is not taken, or whose successor's cookie is not known, beside
    /// the live one's) summed into one series, sorted by key.
    fn clients(self, counted: Vec<ClientStats>) -> ClientReading {
        let mut merged: BTreeMap<ClientKey, ClientStats> = BTreeMap::new();
        let mut dead = Vec::new();
        for mut c in counted {
            if !self.owns(c.netns(), c.key.netns_cookie, u64::MAX) {
                dead.push((c.key, self.0[&c.netns()]));
                continue;
            }
            c.key.netns_cookie = 0;
            match merged.get_mut(&c.key) {
                Some(sum) => sum.add(&c),
                None => {
                    merged.insert(c.key, c);
                }
            }
        }
        ClientReading {
            rows: merged.into_values().collect(),
            dead,
        }
    }
}

/// One namespace's port-search histogram, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSearchStats {
    pub netns: u32,
    pub hist: PortSearch,
}

/// Every namespace whose connects searched for a port, sorted by namespace: each CPU's slots
/// (a namespace's histogram on a CPU where it took its slot) and the hash's entries (on CPUs
/// where another namespace had), added up.
pub fn read_port_search(
    slots: &PerCpuArray<MapData, PortSearchSlot>,
    map: &PerCpuHashMap<MapData, u32, PortSearchSlot>,
    live: Namespaces,
) -> Result<Vec<PortSearchStats>> {
    let mut sums: BTreeMap<u32, PortSearch> = BTreeMap::new();
    let mut add_up = |per_cpu: &[PortSearchSlot]| {
        for s in per_cpu.iter().filter(|s| s.netns != 0) {
            if let Some(inode) = live.port_search(s.netns) {
                add(sums.entry(inode).or_insert(PortSearch::ZERO), &s.hist);
            }
        }
    };
    for i in 0..slots.len() {
        add_up(&slots.get(&i, 0).context("read the port-search slots")?);
    }
    for entry in map.iter() {
        add_up(&entry.context("read the port-search map")?.1);
    }
    Ok(sums
        .into_iter()
        .map(|(netns, hist)| PortSearchStats { netns, hist })
        .collect())
}

fn add(total: &mut PortSearch, h: &PortSearch) {
    for (t, v) in total.buckets.iter_mut().zip(h.buckets) {
        *t += v;
    }
    total.sum_ns += h.sum_ns;
}

/// The client map as the live namespaces see it.
pub struct ClientReading {
    /// Every destination the kernel counted something for, sorted by key (cookie zeroed).
    pub rows: Vec<ClientStats>,
    /// The entries of dead namespaces whose inode numbers live ones hold, each with the
    /// cookie of the live one (the entry's namespace is dead for as long as that one lives).
    pub dead: Vec<(ClientKey, u64)>,
}

/// The client map, summed over CPUs, as the `live` namespaces see it.
pub fn read(
    map: &PerCpuHashMap<MapData, ClientKey, ClientCounters>,
    live: Namespaces,
) -> Result<ClientReading> {
    let mut counted = Vec::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.context("read the client map")?;
        counted.push(ClientStats::sum(key, &per_cpu));
    }
    Ok(live.clients(counted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_cpus_and_reads_the_key() {
        let mut a = ClientCounters::default();
        let mut b = ClientCounters::default();
        a.counts[ClientCounter::ConnectNoPort as usize] = 2;
        b.counts[ClientCounter::ConnectNoPort as usize] = 3;
        b.counts[ClientCounter::SynRetransmits as usize] = 1;
        let mut key = ClientKey {
            netns: 7,
            pid: 42,
            family: qtrace_common::listener::AF_INET,
            dport: 3306,
            ..Default::default()
        };
        key.comm[..4].copy_from_slice(b"java");
        key.daddr[..4].copy_from_slice(&[10, 0, 0, 5]);
        let s = ClientStats::sum(key, &[a, b]);
        assert_eq!(s.get(ClientCounter::ConnectNoPort), 5);
        assert_eq!(s.comm(), "java");
        assert_eq!(s.daddr().to_string(), "10.0.0.5");
    }

    /// A namespace that took a deleted one's inode number starts from zero; entries of one
    /// namespace differing only in a cookie the kernel did not tell are one series.
    #[test]
    fn a_dead_namespaces_counts_are_not_the_next_ones() {
        let entry = |netns, cookie, no_port| {
            let mut counts = [0; ClientCounter::COUNT];
            counts[ClientCounter::ConnectNoPort as usize] = no_port;
            let key = ClientKey {
                netns,
                netns_cookie: cookie,
                dport: 80,
                ..Default::default()
            };
            ClientStats { key, counts }
        };
        let live = HashMap::from([(7, 0x1_0000_00c8)]);
        let live = Namespaces(&live);
        let counted = vec![
            entry(7, 100, 5),           // the dead namespace that had inode 7
            entry(7, 0x1_0000_00c8, 1), // the live one
            entry(8, 300, 2),           // a namespace not sampled (unreadable, filtered, gone)
            entry(8, 0, 3),             // and its cookie not made (before 5.12)
        ];
        let reading = live.clients(counted);
        assert_eq!(reading.rows, vec![entry(7, 0, 1), entry(8, 0, 5)]);
        assert_eq!(reading.dead, vec![(entry(7, 100, 5).key, 0x1_0000_00c8)]);
        // The port-search maps keep the cookie's low half above the inode.
        let netns = PortSearchSlot::netns;
        assert_eq!(live.port_search(netns(7, 0xc8)), Some(7));
        assert_eq!(live.port_search(netns(7, 100)), None);
        assert_eq!(live.port_search(netns(7, 0)), Some(7));
        assert_eq!(live.port_search(netns(8, 300)), Some(8));
    }
}
