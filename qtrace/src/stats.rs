//! Reading the kernel's per-CPU counters and summing them per listener.

use anyhow::{Context, Result};
use aya::{
    maps::{PerCpuArray, PerCpuHashMap},
    Ebpf,
};
use qtrace_common::{maps, Counter, ListenerCounters, ListenerKey, SelfStat, WAIT_BUCKETS};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerStats {
    pub key: ListenerKey,
    pub counts: [u64; Counter::COUNT],
    pub wait_buckets: [u64; WAIT_BUCKETS],
    pub wait_sum_ns: u64,
}

impl ListenerStats {
    pub fn get(&self, counter: Counter) -> u64 {
        self.counts[counter as usize]
    }

    fn sum(key: ListenerKey, per_cpu: &[ListenerCounters]) -> Self {
        let mut s = ListenerStats {
            key,
            counts: [0; Counter::COUNT],
            wait_buckets: [0; WAIT_BUCKETS],
            wait_sum_ns: 0,
        };
        for cpu in per_cpu {
            for (total, v) in s.counts.iter_mut().zip(cpu.counts) {
                *total += v;
            }
            for (total, v) in s.wait_buckets.iter_mut().zip(cpu.wait_buckets) {
                *total += v;
            }
            s.wait_sum_ns += cpu.wait_sum_ns;
        }
        s
    }
}

/// Every listener the kernel has counted something for, sorted by key.
pub fn listeners(ebpf: &Ebpf) -> Result<Vec<ListenerStats>> {
    let map = ebpf
        .map(maps::LISTENERS)
        .context("listener map missing from the eBPF object")?;
    let map: PerCpuHashMap<_, ListenerKey, ListenerCounters> = PerCpuHashMap::try_from(map)?;
    let mut out = Vec::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.context("read the listener map")?;
        out.push(ListenerStats::sum(key, &per_cpu));
    }
    out.sort_by_key(|s| s.key);
    Ok(out)
}

/// qtrace's own losses, summed over CPUs, indexed by [`SelfStat`].
pub fn self_stats(ebpf: &Ebpf) -> Result<[u64; SelfStat::COUNT]> {
    let map = ebpf
        .map(maps::SELF_STATS)
        .context("self-stats map missing from the eBPF object")?;
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
    let mut out = [0; SelfStat::COUNT];
    for stat in SelfStat::ALL {
        out[stat as usize] = map.get(&(stat as u32), 0)?.iter().sum();
    }
    Ok(out)
}

/// Upper bound, in seconds, of accept-wait bucket `b` (see `qtrace_common::WAIT_BUCKETS`).
pub fn wait_bucket_le_seconds(b: usize) -> f64 {
    (1u64 << b) as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_over_cpus() {
        let mut a = ListenerCounters::ZERO;
        let mut b = ListenerCounters::ZERO;
        a.counts[Counter::SynackRetransmits as usize] = 2;
        b.counts[Counter::SynackRetransmits as usize] = 5;
        a.wait_buckets[3] = 1;
        b.wait_buckets[3] = 1;
        b.wait_sum_ns = 7;
        let s = ListenerStats::sum(ListenerKey::default(), &[a, b]);
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
