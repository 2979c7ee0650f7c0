//! Drops no probe classified, and the cross-check of every drop against the kernel.
//!
//! The kernel counts each handshake packet a listener drops twice: in the listener's own
//! `sk_drops` (read with sock_diag, on every kernel, no BPF) and in its namespace's TcpExt
//! ListenDrops. The probes classify drops by reason where they attach; where one cannot attach
//! (no fentry and no kprobes: the syn probe on hardened and micro-VM kernels), the socket's
//! own count still tells how many there were. This ledger keeps, per listener:
//!
//! - `unclassified` = the listener's sockets' drops since qtrace first saw them, minus the
//!   drops the probes classified in that time; monotonic (a Prometheus counter), because a
//!   socket that closes takes its drop count with it, while the probes' counts stay;
//! - per namespace, `unattributed` = ListenDrops growth since qtrace first saw the namespace,
//!   minus every drop attributed to its listeners (0 when all is accounted for).
//!
//! "Since first seen": what a socket or namespace held at qtrace's first collect predates it
//! (and is the base subtracted); one that appears later was created while qtrace ran, so its
//! whole count is new. The queues are sampled before the kernel's counters are read, so a drop
//! in between is seen by the probes first and never shows as unclassified.

use std::collections::{HashMap, HashSet};

use qtrace_common::EventKind;

use crate::{
    api::{Event, EventTag, Family},
    daemon::collect::Scrape,
    listener::ListenerId,
};

/// One listening socket as sock_diag saw it in a collect.
#[derive(Clone, Copy, Debug)]
pub struct SocketDrops {
    pub id: ListenerId,
    pub inode: u32,
    /// `sk_drops` now.
    pub drops: u64,
}

/// What one collect saw: every socket and the ListenDrops of every namespace sampled, and
/// the namespaces that exist but could not be read (their sockets are not taken for closed).
pub struct Sample<'a> {
    pub sockets: &'a [SocketDrops],
    pub listen_drops: &'a [(u32, u64)],
    pub unreadable: &'a [u32],
}

/// The ledger's answer for one collect.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reckoning {
    /// Per listener seen by sock_diag: drops no probe classified.
    pub unclassified: HashMap<ListenerId, u64>,
    /// Per namespace sampled: ListenDrops growth minus the drops attributed to its listeners.
    pub unattributed: Vec<(u32, i64)>,
}

#[derive(Debug)]
struct Socket {
    id: ListenerId,
    base: u64,
    last: u64,
}

#[derive(Debug, Default)]
struct Listener {
    /// Drops of its sockets that have closed, each up to its last sample.
    closed: u64,
    /// The probes' classified count when qtrace first saw the listener (see the module doc).
    classified_base: u64,
    unclassified: u64,
    /// Every drop attributed to it at the last collect.
    total: u64,
}

/// Bounded by what is alive: sockets leave when sock_diag stops listing them (in a namespace
/// that was sampled), listeners when they have neither a socket nor kernel counters, and
/// namespaces when they are no longer sampled.
#[derive(Debug, Default)]
pub struct DropLedger {
    started: bool,
    sockets: HashMap<u32, Socket>,
    listeners: HashMap<ListenerId, Listener>,
    namespaces: HashMap<u32, u64>,
    /// Per namespace: drops attributed to its listeners that have since closed (their kernel
    /// entries are deleted), so the cross-check does not count them as unattributed.
    retired: HashMap<u32, u64>,
    /// Per namespace: its cookie, where the kernel tells it (see [`Self::identify_namespace`]).
    cookies: HashMap<u32, u64>,
}

impl DropLedger {
    /// Tells the ledger namespace `ns`'s cookie. The kernel reuses the inode numbers of
    /// deleted namespaces; a namespace whose cookie changed is a new one, whose ListenDrops
    /// count from zero and owe nothing to the old one's listeners.
    pub fn identify_namespace(&mut self, ns: u32, cookie: u64) {
        if self
            .cookies
            .insert(ns, cookie)
            .is_some_and(|old| old != cookie)
        {
            self.namespaces.remove(&ns);
            self.retired.remove(&ns);
            self.listeners.retain(|id, _| id.netns != ns);
            self.sockets.retain(|_, s| s.id.netns != ns);
        }
    }

    /// Accounts for one collect. `classified` is a listener's drops as the probes counted them
    /// (0 for one they never counted); `counted` lists the listeners the kernel has counters
    /// for; `with_unclassified` is false where every drop reason has a probe attached, and
    /// then unclassified drops are not attributed to anyone.
    pub fn update(
        &mut self,
        sample: &Sample,
        classified: impl Fn(&ListenerId) -> u64,
        counted: &HashSet<ListenerId>,
        with_unclassified: bool,
    ) -> Reckoning {
        let first = !std::mem::replace(&mut self.started, true);
        let sampled_netns: HashSet<u32> = sample.listen_drops.iter().map(|(ns, _)| *ns).collect();
        let new_listener = |id: &ListenerId| Listener {
            classified_base: if first { classified(id) } else { 0 },
            ..Default::default()
        };
        let mut seen = HashSet::new();
        for s in sample.sockets {
            seen.insert(s.inode);
            let socket = self.sockets.entry(s.inode).or_insert(Socket {
                id: s.id,
                base: if first { s.drops } else { 0 },
                last: s.drops,
            });
            socket.last = s.drops;
            self.listeners
                .entry(s.id)
                .or_insert_with(|| new_listener(&s.id));
        }
        for id in counted {
            self.listeners
                .entry(*id)
                .or_insert_with(|| new_listener(id));
        }
        // A socket sock_diag no longer lists has closed, unless its namespace could not be
        // read this time.
        let listeners = &mut self.listeners;
        self.sockets.retain(|inode, s| {
            let alive = seen.contains(inode) || sample.unreadable.contains(&s.id.netns);
            if !alive {
                if let Some(l) = listeners.get_mut(&s.id) {
                    l.closed += s.last.saturating_sub(s.base);
                }
            }
            alive
        });
        let mut open: HashMap<ListenerId, u64> = HashMap::new();
        for s in self.sockets.values() {
            *open.entry(s.id).or_default() += s.last.saturating_sub(s.base);
        }
        let retired = &mut self.retired;
        self.listeners.retain(|id, l| {
            let keep = open.contains_key(id) || counted.contains(id);
            if !keep {
                *retired.entry(id.netns).or_default() += l.total;
            }
            keep
        });
        let mut reckoning = Reckoning::default();
        let mut attributed: HashMap<u32, u64> = HashMap::new();
        for (id, l) in &mut self.listeners {
            let own = l.closed + open.get(id).copied().unwrap_or(0);
            let classified = classified(id).saturating_sub(l.classified_base);
            l.unclassified = l.unclassified.max(own.saturating_sub(classified));
            let mut total = classified;
            if with_unclassified {
                total += l.unclassified;
                if open.contains_key(id) {
                    reckoning.unclassified.insert(*id, l.unclassified);
                }
            }
            l.total = total;
            *attributed.entry(id.netns).or_default() += total;
        }
        self.namespaces
            .retain(|ns, _| sampled_netns.contains(ns) || sample.unreadable.contains(ns));
        let namespaces = &self.namespaces;
        self.retired.retain(|ns, _| namespaces.contains_key(ns));
        self.cookies
            .retain(|ns, _| sampled_netns.contains(ns) || sample.unreadable.contains(ns));
        for &(ns, listen_drops) in sample.listen_drops {
            let base = *self
                .namespaces
                .entry(ns)
                .or_insert(if first { listen_drops } else { 0 });
            let growth = listen_drops.saturating_sub(base) as i64;
            let attributed = attributed.get(&ns).copied().unwrap_or(0)
                + self.retired.get(&ns).copied().unwrap_or(0);
            let gap = growth - attributed as i64;
            reckoning.unattributed.push((ns, gap));
        }
        reckoning.unattributed.sort();
        reckoning
    }
}

/// What the events socket was last told of each listener's unclassified drops.
#[derive(Default)]
pub struct Announced(HashMap<ListenerId, u64>);

impl Announced {
    /// One `drop_unclassified` event per listener whose unclassified drops grew since the last
    /// call: there is no probe to make one per drop, so readers of `qtrace events` learn of
    /// them every queue sample, counted. `ts_ns` is CLOCK_MONOTONIC (as the kernel's events),
    /// `time` its wall-clock form.
    pub fn events(&mut self, scrape: &Scrape, ts_ns: u64, time: &str) -> Vec<Event> {
        let mut out = Vec::new();
        let mut now = HashMap::new();
        for v in &scrape.listeners {
            let Some(n) = v.unclassified else { continue };
            now.insert(v.id, n);
            let before = self.0.get(&v.id).copied().unwrap_or(0);
            if n <= before {
                continue;
            }
            let q = v.queues.as_ref();
            out.push(Event {
                record: EventTag::Event,
                time: time.to_string(),
                ts_ns,
                kind: EventKind::DropUnclassified,
                netns: v.id.netns,
                family: Family::of_addr(&v.id.addr),
                laddr: v.id.addr,
                socket: v.id.socket,
                lport: v.id.port,
                raddr: None,
                rport: None,
                drops: Some(n - before),
                retransmit: None,
                acceptq_len: q.map_or(0, |q| q.acceptq_len),
                acceptq_max: q.map_or(0, |q| q.acceptq_max),
                synq_len: q.map_or(0, |q| q.synq_len),
                synq_max: q.map_or(0, |q| q.acceptq_max),
                owner: None,
            });
        }
        // Listeners gone from the scrape are forgotten: bounded by what is alive.
        self.0 = now;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(netns: u32, port: u16) -> ListenerId {
        ListenerId {
            netns,
            addr: "127.0.0.1".parse().unwrap(),
            port,
            socket: u64::from(port),
        }
    }

    fn sock(netns: u32, port: u16, inode: u32, drops: u64) -> SocketDrops {
        SocketDrops {
            id: id(netns, port),
            inode,
            drops,
        }
    }

    /// One collect: sockets, namespaces' ListenDrops, classified counts by port.
    fn collect(
        ledger: &mut DropLedger,
        sockets: &[SocketDrops],
        listen_drops: &[(u32, u64)],
        classified: &[(u16, u64)],
        with_unclassified: bool,
    ) -> Reckoning {
        let counted: HashSet<ListenerId> = classified.iter().map(|(p, _)| id(1, *p)).collect();
        let classified = |l: &ListenerId| {
            classified
                .iter()
                .find(|(p, _)| *p == l.port)
                .map_or(0, |(_, n)| *n)
        };
        ledger.update(
            &Sample {
                sockets,
                listen_drops,
                unreadable: &[],
            },
            classified,
            &counted,
            with_unclassified,
        )
    }

    #[test]
    fn what_predates_qtrace_is_the_base() {
        let mut l = DropLedger::default();
        let r = collect(&mut l, &[sock(1, 80, 10, 5)], &[(1, 100)], &[(80, 2)], true);
        assert_eq!(r.unclassified[&id(1, 80)], 0);
        assert_eq!(r.unattributed, vec![(1, 0)]);
        // 4 more drops, 1 of them classified: 3 unclassified, and all 4 attributed.
        let r = collect(&mut l, &[sock(1, 80, 10, 9)], &[(1, 104)], &[(80, 3)], true);
        assert_eq!(r.unclassified[&id(1, 80)], 3);
        assert_eq!(r.unattributed, vec![(1, 0)]);
    }

    #[test]
    fn with_every_probe_attached_nothing_is_unclassified() {
        let mut l = DropLedger::default();
        collect(&mut l, &[sock(1, 80, 10, 0)], &[(1, 0)], &[], false);
        let r = collect(&mut l, &[sock(1, 80, 10, 4)], &[(1, 4)], &[(80, 4)], false);
        assert!(r.unclassified.is_empty());
        assert_eq!(r.unattributed, vec![(1, 0)]);
        // A drop the probes missed shows in the namespace's cross-check.
        let r = collect(&mut l, &[sock(1, 80, 10, 5)], &[(1, 5)], &[(80, 4)], false);
        assert_eq!(r.unattributed, vec![(1, 1)]);
    }

    #[test]
    fn a_socket_born_after_the_start_counts_from_zero() {
        let mut l = DropLedger::default();
        collect(&mut l, &[], &[(1, 0)], &[], true);
        let r = collect(&mut l, &[sock(1, 81, 11, 7)], &[(1, 7)], &[(81, 2)], true);
        assert_eq!(r.unclassified[&id(1, 81)], 5);
        assert_eq!(r.unattributed, vec![(1, 0)]);
    }

    #[test]
    fn a_closed_sockets_drops_stay_and_the_counter_never_falls() {
        let mut l = DropLedger::default();
        collect(&mut l, &[], &[(1, 0)], &[], true);
        // Two sockets of one reuseport group: 3 + 4 drops, none classified.
        let both = [sock(1, 80, 10, 3), sock(1, 80, 11, 4)];
        let r = collect(&mut l, &both, &[(1, 7)], &[], true);
        assert_eq!(r.unclassified[&id(1, 80)], 7);
        let r = collect(&mut l, &[sock(1, 80, 11, 4)], &[(1, 7)], &[], true);
        assert_eq!(r.unclassified[&id(1, 80)], 7);
        assert_eq!(r.unattributed, vec![(1, 0)]);
        // Counted late by the probes (they raced the sample): still never less.
        let r = collect(&mut l, &[sock(1, 80, 11, 4)], &[(1, 7)], &[(80, 2)], true);
        assert_eq!(r.unclassified[&id(1, 80)], 7);
    }

    #[test]
    fn an_unreadable_namespace_keeps_its_sockets() {
        let mut l = DropLedger::default();
        collect(&mut l, &[], &[(1, 0), (2, 0)], &[], true);
        collect(&mut l, &[sock(2, 80, 20, 3)], &[(1, 0), (2, 3)], &[], true);
        // Namespace 2 unreadable this time: its socket is not taken for closed.
        let unreadable = Sample {
            sockets: &[],
            listen_drops: &[(1, 0)],
            unreadable: &[2],
        };
        l.update(&unreadable, |_| 0, &HashSet::new(), true);
        let r = collect(&mut l, &[sock(2, 80, 20, 3)], &[(1, 0), (2, 3)], &[], true);
        assert_eq!(r.unclassified[&id(2, 80)], 3);
        assert_eq!(r.unattributed, vec![(1, 0), (2, 0)]);
    }

    #[test]
    fn what_is_gone_is_forgotten() {
        let mut l = DropLedger::default();
        collect(&mut l, &[], &[(1, 0)], &[], true);
        collect(&mut l, &[sock(1, 80, 10, 3)], &[(1, 3)], &[], true);
        collect(&mut l, &[], &[], &[], true);
        assert!(l.sockets.is_empty() && l.listeners.is_empty() && l.namespaces.is_empty());
    }

    #[test]
    fn readers_hear_of_each_growth_once() {
        use crate::daemon::collect::ListenerView;
        let scrape = |n: Option<u64>| Scrape {
            listeners: vec![ListenerView {
                id: id(1, 80),
                stats: None,
                queues: None,
                owner: None,
                unclassified: n,
            }],
            programs: Vec::new(),
            self_stats: Default::default(),
            netns_unreadable: 0,
            netns_unattributed: Vec::new(),
            occupancy: Default::default(),
            reclaimed: 0,
            names: None,
            clients: Default::default(),
        };
        let mut a = Announced::default();
        assert!(a.events(&scrape(Some(0)), 1, "t").is_empty());
        let grown = a.events(&scrape(Some(5)), 2, "t");
        assert_eq!(grown.len(), 1);
        assert_eq!((grown[0].drops, grown[0].raddr), (Some(5), None));
        assert_eq!(grown[0].kind, EventKind::DropUnclassified);
        assert!(a.events(&scrape(Some(5)), 3, "t").is_empty());
        assert_eq!(a.events(&scrape(Some(7)), 4, "t")[0].drops, Some(2));
        // Where every probe is attached there is nothing to tell.
        assert!(a.events(&scrape(None), 5, "t").is_empty());
        assert!(a.0.is_empty());
    }
}
