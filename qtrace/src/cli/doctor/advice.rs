//! Advice from evidence: the queues now, the effective limits, and what the daemon counted
//! (typed counters and last hour from its snapshot), never boilerplate.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use qtrace_common::Counter;
use serde::{Deserialize, Serialize};

use super::limits::{Backlog, Limits};
use crate::{
    api::{Counters, LastHour, Owner},
    host::sockdiag::ListenerQueues,
};

/// One piece of advice for one listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advice {
    pub listener: String,
    pub advice: String,
    /// Who the listener belongs to (`<pod_namespace>/<pod>/<container>`, else the
    /// container, unit or command, as [`Owner::workload`]); the text groups advice by it.
    #[serde(default)]
    pub workload: String,
}

/// How advice names a listener: `nginx[7] on 0.0.0.0:80 (netns 4026531840)`.
pub fn listener_name(owner: Option<&Owner>, addr: &IpAddr, port: u16, netns: u32) -> String {
    let at = SocketAddr::new(*addr, port);
    match owner {
        Some(o) => format!("{o} on {at} (netns {netns})"),
        None => format!("{at} (netns {netns})"),
    }
}

/// What the daemon knows of a listener, when one runs.
pub struct Evidence<'a> {
    /// Counts since the daemon started.
    pub counters: Option<&'a Counters>,
    pub last_hour: Option<&'a LastHour>,
    pub sample_interval: f64,
}

impl Evidence<'_> {
    /// "; at its limit in 37% of the last hour (sampled every 10 s), 1204 handshakes dropped
    /// in that time", or nothing without a daemon.
    fn accept_queue_history(&self) -> String {
        let Some(h) = self.last_hour.filter(|h| h.samples > 0) else {
            return String::new();
        };
        let span = match h.sampled_seconds {
            s if s >= 3600.0 => "the last hour".to_string(),
            s if s >= 120.0 => format!("the last {:.0} min", s / 60.0),
            s => format!("the last {s:.1} s"),
        };
        format!(
            "; at its limit in {:.0}% of {span} (sampled every {} s), {} handshakes dropped in that time",
            h.accept_queue_at_limit * 100.0,
            self.sample_interval,
            h.drops
        )
    }
}

/// What the daemon counted of drops for a full accept queue, saying what it could not see
/// rather than printing 0 for it.
fn accept_queue_drops(counters: Option<&Counters>) -> String {
    let Some(cs) = counters else {
        return "drops not counted: no qtrace daemon is running".into();
    };
    let mut s = match (
        cs.get(Counter::DropAcceptQueueFullSyn),
        cs.get(Counter::DropAcceptQueueFullAck),
    ) {
        (Some(syn), Some(ack)) => format!(
            "{} connections dropped for a full accept queue since qtrace started",
            syn + ack
        ),
        (None, Some(ack)) => format!(
            "{ack} connections dropped for a full accept queue at the final ACK since qtrace \
             started (drops at SYN time cannot be classified on this kernel)"
        ),
        (Some(syn), None) => format!(
            "{syn} SYNs dropped for a full accept queue since qtrace started (drops at the \
             final ACK cannot be classified on this kernel)"
        ),
        (None, None) => "accept-queue drops cannot be classified on this kernel".into(),
    };
    if let Some(u) = cs.unclassified.filter(|u| *u > 0) {
        s += &format!(
            ", and {u} handshake packets dropped at this listener whose reason this kernel does not \
             show (the listener's own drop count; a full accept queue is the usual cause)"
        );
    }
    s
}

/// Advice from evidence: the queues now and what the daemon counted, never boilerplate.
pub fn advise(
    out: &mut Vec<Advice>,
    who: &str,
    l: &ListenerQueues,
    lim: &Limits,
    sysctl: &BTreeMap<String, String>,
    evidence: &Evidence,
) {
    let counters = evidence.counters;
    let n = |c: Counter| counters.and_then(|cs| cs.get(c)).unwrap_or(0);
    let sys = |k: &str| sysctl.get(k).cloned().unwrap_or_default();
    let accept_drops = n(Counter::DropAcceptQueueFullSyn) + n(Counter::DropAcceptQueueFullAck);
    let unclassified = counters.and_then(|c| c.unclassified).unwrap_or(0);
    let mut say = |advice: String| {
        out.push(Advice {
            listener: who.to_string(),
            advice,
            workload: String::new(),
        })
    };
    let was_full = evidence
        .last_hour
        .is_some_and(|h| h.accept_queue_at_limit > 0.0);
    if accept_drops > 0
        || unclassified > 0
        || was_full
        || (lim.accept_limit > 0 && l.acceptq_len >= lim.accept_limit)
    {
        let cap = match lim.backlog {
            Backlog::AtLeast(_) => format!(
                "raise net.core.somaxconn (now {} caps it) and the listen() backlog",
                sys("net/core/somaxconn")
            ),
            Backlog::Exactly(b) => {
                format!("raise the listen() backlog (now {b}; the application sets it)")
            }
        };
        say(format!(
            "accept queue {}/{} now{}; {}: the application accepts too slowly for its load; {cap}",
            l.acceptq_len,
            lim.accept_limit,
            evidence.accept_queue_history(),
            accept_queue_drops(counters)
        ));
    }
    if n(Counter::DropSynQueueFull) > 0 && sys("net/ipv4/tcp_syncookies") == "0" {
        say(format!(
            "{} SYNs dropped for a full SYN queue with tcp_syncookies=0: enable tcp_syncookies=1",
            n(Counter::DropSynQueueFull)
        ));
    }
    if n(Counter::SyncookiesSent) > 0 {
        say(format!(
            "{} syncookies sent: the SYN queue overflowed (a SYN flood, or a backlog too small for the connection rate); \
             cookie connections lose TCP options such as window scaling",
            n(Counter::SyncookiesSent)
        ));
    }
    if sys("net/ipv4/tcp_abort_on_overflow") == "1" {
        say(format!(
            "tcp_abort_on_overflow=1 turns accept-queue overflows into resets ({} so far): clients see \
             'connection reset' instead of a retry; set it to 0 unless resets are wanted",
            n(Counter::OverflowResets)
        ));
    }
    if n(Counter::SynackRetransmits) > 0 && n(Counter::DropAcceptQueueFullAck) == 0 {
        say(format!(
            "{} SYN-ACK retransmits without accept-queue drops: final ACKs are lost on the way (network loss or a firewall)",
            n(Counter::SynackRetransmits)
        ));
    }
}

/// SO_REUSEPORT groups in which some sockets' accept queues are full and others' are not:
/// the kernel spreads connections over a group by hash, so those hashed to a socket whose
/// process stopped accepting wait or are dropped while its siblings idle. `owner` names a
/// socket's process by its inode.
pub fn reuseport_imbalance(
    out: &mut Vec<Advice>,
    netns: u32,
    sockets: &[ListenerQueues],
    owner: impl Fn(u32) -> Option<Owner>,
) {
    let mut groups: BTreeMap<(IpAddr, u16), Vec<&ListenerQueues>> = BTreeMap::new();
    for l in sockets {
        groups.entry((l.addr, l.port)).or_default().push(l);
    }
    for ((addr, port), group) in groups.iter().filter(|(_, g)| g.len() > 1) {
        let full: Vec<&&ListenerQueues> = group
            .iter()
            .filter(|l| l.acceptq_max > 0 && l.acceptq_len >= l.acceptq_max)
            .collect();
        if full.is_empty() || full.len() == group.len() {
            continue;
        }
        let owners: Vec<Option<Owner>> = full.iter().map(|l| owner(l.inode)).collect();
        let which: Vec<String> = full
            .iter()
            .zip(&owners)
            .map(|(l, o)| match o {
                Some(o) => format!("socket {:x} of {o}", l.cookie),
                None => format!("socket {:x}", l.cookie),
            })
            .collect();
        out.push(Advice {
            workload: owners
                .iter()
                .flatten()
                .next()
                .map_or(String::new(), Owner::workload),
            listener: listener_name(None, addr, *port, netns),
            advice: format!(
                "{} of {} sockets on {} are full ({}) while the others are not: SO_REUSEPORT \
                 hashes each connection to one socket, and the process behind a full one \
                 stopped accepting; its connections wait or are dropped while its siblings idle",
                full.len(),
                group.len(),
                SocketAddr::new(*addr, *port),
                which.join(", ")
            ),
        });
    }
}
