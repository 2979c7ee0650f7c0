//! The client counters: the per-CPU map of (namespace, process, destination) → connect()
//! failures by reason and SYN retransmits, summed over CPUs whenever someone asks.

use std::{collections::BTreeMap, net::IpAddr};

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
    map: &PerCpuHashMap<MapData, u32, PortSearch>,
) -> Result<Vec<PortSearchStats>> {
    let mut sums: BTreeMap<u32, PortSearch> = BTreeMap::new();
    for i in 0..slots.len() {
        let per_cpu = slots.get(&i, 0).context("read the port-search slots")?;
        for slot in per_cpu.iter().filter(|s| s.netns != 0) {
            add(
                sums.entry(slot.netns).or_insert(PortSearch::ZERO),
                &slot.hist,
            );
        }
    }
    for entry in map.iter() {
        let (netns, per_cpu) = entry.context("read the port-search map")?;
        let hist = sums.entry(netns).or_insert(PortSearch::ZERO);
        for cpu in per_cpu.iter() {
            add(hist, cpu);
        }
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

/// Every destination the kernel counted something for, sorted by key.
pub fn read(map: &PerCpuHashMap<MapData, ClientKey, ClientCounters>) -> Result<Vec<ClientStats>> {
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.context("read the client map")?;
        out.push(ClientStats::sum(key, &per_cpu));
    }
    out.sort_by_key(|s| s.key);
    Ok(out)
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
}
