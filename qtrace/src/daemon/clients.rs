//! The client side in a scrape: the kernel's per-destination connect() counts, and each
//! namespace's census of connections (TIME_WAIT, CLOSE_WAIT with their owners and the age of
//! the oldest, ephemeral ports in use per destination), capped for export like the listeners
//! (`--max-destination-series`): past the cap, rows are summed into one `other` row and
//! counted.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use qtrace_common::{ClientCounter, ClientKey};

use crate::{
    api,
    host::{
        census::{Census, Lingering},
        owners::Owner,
    },
    kernel::clients::{ClientStats, PortSearchStats},
};

/// Default of `--max-destination-series`.
pub const DEFAULT_MAX_SERIES: usize = 1000;

#[derive(Clone, Debug, Default)]
pub struct Clients {
    /// Time to pick a local port, per namespace; None where the port-search probe is not
    /// attached (the tracepoint tier has none).
    pub port_search: Option<Vec<PortSearchStats>>,
    /// Each sampled namespace's census.
    pub census: Vec<NetnsCensus>,
    /// Whether the client probe is attached: without it every client counter is unavailable.
    pub available: bool,
    /// Destinations with their own series, by key.
    pub rows: Vec<ClientStats>,
    /// The sum of the destinations past the cap (None when nothing was folded).
    pub other: Option<ClientStats>,
    /// How many destinations were folded into `other`.
    pub folded: usize,
}

impl Clients {
    /// `counted` (sorted by key) with at most `max_series` rows of their own.
    pub fn capped(available: bool, mut counted: Vec<ClientStats>, max_series: usize) -> Self {
        let over = counted.split_off(counted.len().min(max_series));
        let folded = over.len();
        let other = over.into_iter().reduce(|mut sum, s| {
            sum.add(&s);
            sum
        });
        Self {
            port_search: None,
            census: Vec::new(),
            available,
            rows: counted,
            other: other.map(|mut o| {
                o.key = ClientKey::default();
                o
            }),
            folded,
        }
    }
}

/// One namespace's census, with its CLOSE_WAIT sockets by owner.
#[derive(Clone, Debug, Default)]
pub struct NetnsCensus {
    pub netns: u32,
    pub census: Census,
    /// Most sockets first.
    pub close_wait_owners: Vec<CloseWaitOwner>,
}

/// The CLOSE_WAIT sockets one process holds in one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseWaitOwner {
    /// 0 and empty where no process was found holding them (yet: see `host::owners`).
    pub pid: i32,
    pub comm: String,
    pub sockets: u64,
    /// How long the oldest has been in CLOSE_WAIT, as qtrace saw it: from the first sample
    /// that found it (the kernel keeps no timestamp of the peer's FIN), so at most one
    /// sample interval short of its true age, and counted from qtrace's start for the
    /// sockets that were there before it.
    pub oldest: Duration,
}

/// When qtrace first saw each CLOSE_WAIT socket, by (namespace, inode); sockets no longer
/// seen are forgotten at the next sample.
#[derive(Default)]
pub struct CloseWaitAges {
    first_seen: HashMap<(u32, u32), Instant>,
}

impl CloseWaitAges {
    /// Each namespace's census with its CLOSE_WAIT sockets grouped by owner (`owners`: by
    /// socket inode), ages updated to `now`.
    pub fn attribute(
        &mut self,
        sampled: Vec<(u32, Census)>,
        owners: &HashMap<u32, Arc<Owner>>,
        now: Instant,
    ) -> Vec<NetnsCensus> {
        let mut seen = HashMap::new();
        let out = sampled
            .into_iter()
            .map(|(netns, census)| {
                let mut by_owner: BTreeMap<(i32, String), (u64, Duration)> = BTreeMap::new();
                for cw in &census.close_wait {
                    let since = *self.first_seen.get(&(netns, cw.inode)).unwrap_or(&now);
                    seen.insert((netns, cw.inode), since);
                    let who = owners
                        .get(&cw.inode)
                        .map_or((0, String::new()), |o| (o.pid, o.comm.clone()));
                    let entry = by_owner.entry(who).or_default();
                    entry.0 += 1;
                    entry.1 = entry.1.max(now.saturating_duration_since(since));
                }
                let mut close_wait_owners: Vec<CloseWaitOwner> = by_owner
                    .into_iter()
                    .map(|((pid, comm), (sockets, oldest))| CloseWaitOwner {
                        pid,
                        comm,
                        sockets,
                        oldest,
                    })
                    .collect();
                close_wait_owners.sort_by_key(|o| std::cmp::Reverse(o.sockets));
                NetnsCensus {
                    netns,
                    census,
                    close_wait_owners,
                }
            })
            .collect();
        self.first_seen = seen;
        out
    }
}

impl Clients {
    /// Whether counter `k` is exported: the rate limiter's is internal.
    pub fn shows(&self, k: ClientCounter) -> bool {
        k != ClientCounter::EventsRateLimited
    }

    /// The client side as the listener snapshot carries it (`clients`).
    pub fn to_api(&self) -> api::ClientSide {
        api::ClientSide {
            destinations: self.available.then(|| {
                self.rows
                    .iter()
                    .map(|c| api::Destination {
                        netns: c.netns(),
                        pid: c.pid(),
                        comm: c.comm(),
                        addr: c.daddr(),
                        port: c.dport(),
                        counters: ClientCounter::ALL
                            .into_iter()
                            .filter(|k| self.shows(*k))
                            .map(|k| (k.name().to_string(), c.get(k)))
                            .collect(),
                    })
                    .collect()
            }),
            destinations_folded: self.folded,
            census: self.census.iter().map(NetnsCensus::to_api).collect(),
        }
    }
}

impl NetnsCensus {
    pub fn to_api(&self) -> api::NetnsCensus {
        let c = &self.census;
        api::NetnsCensus {
            netns: self.netns,
            time_wait: c.total(Lingering::TimeWait),
            close_wait: c.total(Lingering::CloseWait),
            time_wait_limit: c.max_tw_buckets,
            port_range: c.port_range,
            ports_available: c.ports_available,
            tw_reuse: c.tw_reuse,
            close_wait_owners: self
                .close_wait_owners
                .iter()
                .map(|o| api::CloseWaitOwner {
                    pid: o.pid,
                    comm: o.comm.clone(),
                    sockets: o.sockets,
                    oldest_seconds: o.oldest.as_secs_f64(),
                })
                .collect(),
            ephemeral: c
                .ephemeral
                .iter()
                .map(|u| api::PortUse {
                    saddr: u.saddr,
                    addr: u.daddr,
                    port: u.dport,
                    in_use: u.in_use,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use qtrace_common::{ClientCounter, ClientCounter::ConnectNoPort};

    use super::*;

    fn stats(port: u16, no_port: u64) -> ClientStats {
        let mut counts = [0; ClientCounter::COUNT];
        counts[ConnectNoPort as usize] = no_port;
        ClientStats {
            key: ClientKey {
                dport: port,
                ..Default::default()
            },
            counts,
        }
    }

    #[test]
    fn close_wait_sockets_are_grouped_by_owner_and_aged_from_first_seen() {
        use crate::host::census::CloseWait;
        let census = |inodes: &[u32]| Census {
            close_wait: inodes.iter().map(|&inode| CloseWait { inode }).collect(),
            ..Default::default()
        };
        let owner = Arc::new(Owner {
            pid: 77,
            comm: "mysqld-client".into(),
            ..Default::default()
        });
        let owners = HashMap::from([(1, owner.clone()), (2, owner)]);
        let mut ages = CloseWaitAges::default();
        let t0 = Instant::now();
        ages.attribute(vec![(9, census(&[1]))], &owners, t0);
        let later = t0 + Duration::from_secs(30);
        let got = ages.attribute(vec![(9, census(&[1, 2, 3]))], &owners, later);
        let owners = &got[0].close_wait_owners;
        assert_eq!(owners[0].pid, 77);
        assert_eq!(owners[0].sockets, 2);
        assert_eq!(owners[0].oldest, Duration::from_secs(30));
        // Inode 3: no process found holding it.
        assert_eq!((owners[1].pid, owners[1].sockets), (0, 1));
        // Gone sockets are forgotten: seen again, they are new.
        let again = ages.attribute(vec![(9, census(&[]))], &HashMap::new(), later);
        assert!(again[0].close_wait_owners.is_empty());
        assert!(ages.first_seen.is_empty());
    }

    /// Every reason is in the JSON, `reset` too (counted on every kernel); the rate limiter's
    /// internal count is not.
    #[test]
    fn every_reason_is_shown_and_the_rate_limiter_is_not() {
        let c = Clients::capped(true, vec![stats(1, 1)], 5);
        let keys = |c: &Clients| -> Vec<String> {
            c.to_api().destinations.unwrap()[0]
                .counters
                .keys()
                .cloned()
                .collect()
        };
        assert!(keys(&c).contains(&"connect_reset".to_string()));
        assert!(!keys(&c).contains(&"events_rate_limited".to_string()));
    }

    #[test]
    fn destinations_past_the_cap_are_summed_and_counted() {
        let c = Clients::capped(true, vec![stats(1, 1), stats(2, 2), stats(3, 4)], 1);
        assert_eq!(c.rows, vec![stats(1, 1)]);
        assert_eq!(c.folded, 2);
        assert_eq!(c.other.unwrap().get(ConnectNoPort), 6);
        let all = Clients::capped(true, vec![stats(1, 1)], 5);
        assert_eq!((all.folded, all.other), (0, None));
    }
}
