//! The connections of one network namespace, counted with sock_diag (no BPF, so on every
//! kernel): TIME_WAIT and CLOSE_WAIT sockets by port, and the ephemeral ports in use per
//! (source address, destination) against what the namespace's sysctls leave for connect().
//! Read in the calling thread's namespace, like [`super::sockdiag::listeners`].

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use anyhow::{Context, Result};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, TCP_CLOSE_WAIT, TCP_LISTEN, TCP_SYN_RECV, TCP_TIME_WAIT},
    inet::{InetResponseHeader, StateFlags},
};

use super::sockdiag;

/// A state in which a connection lingers after one side closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lingering {
    /// The side that closed first waits 2 MSL (60 s on Linux); no process owns it.
    TimeWait,
    /// The peer closed and the owning process has not: a leak when it lasts.
    CloseWait,
}

impl Lingering {
    /// The `state` label value.
    pub const fn name(self) -> &'static str {
        match self {
            Lingering::TimeWait => "time_wait",
            Lingering::CloseWait => "close_wait",
        }
    }
}

/// Which port of a connection names it: the remote one for the namespace's own outgoing
/// connections (local port ephemeral), the local one for connections to its services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Local,
    Remote,
}

impl Side {
    pub const fn name(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Remote => "remote",
        }
    }
}

/// One CLOSE_WAIT socket: its inode names its owner, and tells it apart across samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseWait {
    pub inode: u32,
}

/// Ephemeral ports taken towards one destination from one source address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortUse {
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    pub dport: u16,
    pub in_use: u64,
}

/// The census of one namespace at this moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Sockets in each lingering state by (state, side, port).
    pub by_port: BTreeMap<(Lingering, Side, u16), u64>,
    pub close_wait: Vec<CloseWait>,
    /// `net.ipv4.tcp_max_tw_buckets`: past it the kernel drops new TIME_WAIT sockets
    /// (TcpExt TCPTimeWaitOverflow). None if unreadable.
    pub max_tw_buckets: Option<u64>,
    /// `ip_local_port_range`.
    pub port_range: Option<(u16, u16)>,
    /// Ports connect() may pick: `ip_local_port_range` minus `ip_local_reserved_ports`.
    pub ports_available: Option<u64>,
    /// `net.ipv4.tcp_tw_reuse` (0, 1, or 2: loopback only), for advice.
    pub tw_reuse: Option<u8>,
    /// Ephemeral ports in use per destination, most used first.
    pub ephemeral: Vec<PortUse>,
}

impl Census {
    /// Sockets in `state`, every port.
    pub fn total(&self, state: Lingering) -> u64 {
        self.by_port
            .iter()
            .filter(|((s, _, _), _)| *s == state)
            .map(|(_, n)| n)
            .sum()
    }
}

/// The census of the calling thread's namespace; `listening` are its listeners' local ports
/// (a connection on one of them was accepted, not connected, even inside the port range).
pub fn sample(listening: &HashSet<u16>) -> Result<Census> {
    // Every state but LISTEN and SYN_RECV (request sockets: the listener's port).
    let states = || StateFlags::all() - StateFlags::LISTEN - StateFlags::SYN_RECV;
    let mut connections = Vec::new();
    for family in [AF_INET, AF_INET6] {
        connections.extend(sockdiag::sockets(family, states()).context("dump TCP connections")?);
    }
    Ok(of(listening, &connections))
}

/// The census of the calling thread's namespace from its connections as sock_diag dumped them
/// (LISTEN and SYN_RECV sockets, if any, are left out).
pub fn of(listening: &HashSet<u16>, connections: &[InetResponseHeader]) -> Census {
    let range = read_sysctl("ip_local_port_range").and_then(|t| parse_range(&t));
    let reserved = read_sysctl("ip_local_reserved_ports")
        .map(|t| parse_ports(&t))
        .unwrap_or_default();
    let ephemeral = |port: u16| {
        range.is_some_and(|(lo, hi)| (lo..=hi).contains(&port))
            && !reserved.contains(&port)
            && !listening.contains(&port)
    };
    let mut census = Census {
        max_tw_buckets: read_sysctl("tcp_max_tw_buckets").and_then(|t| t.trim().parse().ok()),
        port_range: range,
        tw_reuse: read_sysctl("tcp_tw_reuse").and_then(|t| t.trim().parse().ok()),
        ports_available: range.map(|(lo, hi)| {
            let all = u64::from(hi - lo) + 1;
            all - reserved.iter().filter(|p| (lo..=hi).contains(*p)).count() as u64
        }),
        ..Default::default()
    };
    let mut uses: BTreeMap<(IpAddr, IpAddr, u16), u64> = BTreeMap::new();
    for s in connections {
        if s.state == TCP_LISTEN || s.state == TCP_SYN_RECV {
            continue;
        }
        let id = &s.socket_id;
        let outgoing = ephemeral(id.source_port);
        if outgoing {
            *uses
                .entry((
                    id.source_address,
                    id.destination_address,
                    id.destination_port,
                ))
                .or_default() += 1;
        }
        let lingering = match s.state {
            TCP_TIME_WAIT => Lingering::TimeWait,
            TCP_CLOSE_WAIT => {
                census.close_wait.push(CloseWait { inode: s.inode });
                Lingering::CloseWait
            }
            _ => continue,
        };
        let key = if outgoing {
            (lingering, Side::Remote, id.destination_port)
        } else {
            (lingering, Side::Local, id.source_port)
        };
        *census.by_port.entry(key).or_default() += 1;
    }
    census.ephemeral = uses
        .into_iter()
        .map(|((saddr, daddr, dport), in_use)| PortUse {
            saddr,
            daddr,
            dport,
            in_use,
        })
        .collect();
    // Closest to exhaustion first (one namespace: one number of ports available).
    census
        .ephemeral
        .sort_by_key(|u| std::cmp::Reverse(u.in_use));
    census
}

/// `net.ipv4.<name>` of the calling thread's namespace (`/proc/sys/net` follows the thread).
fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok()
}

/// `ip_local_port_range`: "32768\t60999".
fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    (lo <= hi).then_some((lo, hi))
}

/// `ip_local_reserved_ports`: "8080,9000-9010" (empty when none).
fn parse_ports(text: &str) -> HashSet<u16> {
    let mut out = HashSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
            out.extend(lo..=hi);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_port_range_and_reserved_ports() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_range("9 1"), None);
        let r = parse_ports("8080,9000-9002\n");
        assert_eq!(r.len(), 4);
        assert!(r.contains(&9001) && r.contains(&8080));
        assert!(parse_ports("\n").is_empty());
    }

    #[test]
    fn counts_this_namespace() {
        let c = sample(&HashSet::new()).unwrap();
        assert!(c.ports_available.is_some_and(|n| n > 0), "{c:?}");
    }
}
