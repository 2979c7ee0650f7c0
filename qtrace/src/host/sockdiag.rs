//! Queue gauges of every listener in the current network namespace, from sock_diag
//! (`ss -lnt` uses the same interface): the accept queue's length and limit from the
//! listener itself, the SYN queue's length by counting its request sockets, and the
//! listener's own drop counter (`sk_drops`, `ss -ltm`'s `d<N>`), which the kernel keeps on
//! every kernel with no BPF at all.

use std::{collections::HashMap, net::IpAddr};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN, TCP_SYN_RECV},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// One listening socket as the kernel reports it right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerQueues {
    pub addr: IpAddr,
    pub port: u16,
    /// Connections waiting for accept() (`sk_ack_backlog`).
    pub acceptq_len: u32,
    /// The accept queue's limit: min(backlog, somaxconn) (`sk_max_ack_backlog`).
    pub acceptq_max: u32,
    /// Handshakes waiting for their final ACK (request sockets).
    pub synq_len: u32,
    /// Socket inode, to find the owning process.
    pub inode: u32,
    /// Socket cookie (`ss -e`'s `sk:`): the dump makes one for every socket it lists, so
    /// from here on the kernel programs key the socket by it.
    pub cookie: u64,
    /// The uid that created the socket.
    pub uid: u32,
    /// The socket's own drop count (`sk_drops`: `tcp_listendrop()` bumps it for every
    /// handshake packet the listener drops), since the socket was created.
    pub drops: u32,
}

/// Every TCP listener of this thread's network namespace, both families.
pub fn listeners() -> Result<Vec<ListenerQueues>> {
    let socket = connect().context("open a sock_diag netlink socket")?;
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        found.extend(dump(&socket, family)?);
    }
    Ok(split(found, false).listeners)
}

/// What one pass over a namespace's TCP sockets found: its listeners with their queues, and
/// its other connections (every state but LISTEN and SYN_RECV) for the census.
#[derive(Debug, Default)]
pub struct NamespaceSockets {
    pub listeners: Vec<ListenerQueues>,
    pub connections: Vec<InetResponseHeader>,
}

/// The listeners and connections of this thread's network namespace in one dump per family.
/// Each dump of other states than LISTEN walks the kernel's whole established hash (shared by
/// every namespace: 262,144 buckets on a 23 GB host, most of them empty), which costs the same
/// whatever the namespace holds; so the listeners' request sockets and the census's
/// connections come from the same walk (the listeners themselves, with their drop counts, from
/// a dump of LISTEN alone, which walks only the listening hash), and a family with no TCP socket and no TIME_WAIT in
/// the namespace (by `/proc/net/sockstat`, read just before) is not dumped at all.
pub fn namespace_sockets() -> Result<NamespaceSockets> {
    let socket = connect().context("open a sock_diag netlink socket")?;
    let in_use = families_in_use();
    let mut found = Vec::new();
    for (family, used) in [(AF_INET, in_use.0), (AF_INET6, in_use.1)] {
        if used {
            // The listeners with their drop counts (a walk of the listening hash only), then
            // every other socket, request sockets included, without extensions (the one walk
            // of the established hash).
            let (listening, others) = (StateFlags::LISTEN, StateFlags::all() - StateFlags::LISTEN);
            found.extend(dump_states(
                &socket,
                family,
                listening,
                ExtensionFlags::SKMEMINFO,
            )?);
            found.extend(dump_states(
                &socket,
                family,
                others,
                ExtensionFlags::empty(),
            )?);
        }
    }
    Ok(split(found, true))
}

/// Whether the calling thread's namespace has any IPv4 and any IPv6 TCP socket now (listeners,
/// connections, orphans: every hashed socket is `inuse`) or a TIME_WAIT one (`tw`, both
/// families). (true, true) when sockstat cannot be read.
fn families_in_use() -> (bool, bool) {
    let read = |name: &str| std::fs::read_to_string(format!("/proc/thread-self/net/{name}")).ok();
    let (Some(v4), Some(v6)) = (read("sockstat"), read("sockstat6")) else {
        return (true, true);
    };
    let field = |text: &str, line: &str, name: &str| -> Option<u64> {
        let rest = text.lines().find_map(|l| l.strip_prefix(line))?;
        let mut words = rest.split_whitespace();
        while let Some(w) = words.next() {
            if w == name {
                return words.next()?.parse().ok();
            }
        }
        None
    };
    let (Some(tcp), Some(tw), Some(tcp6)) = (
        field(&v4, "TCP:", "inuse"),
        field(&v4, "TCP:", "tw"),
        field(&v6, "TCP6:", "inuse"),
    ) else {
        return (true, true);
    };
    (tcp > 0 || tw > 0, tcp6 > 0 || tw > 0)
}

/// Sorts a dump's sockets: listeners (with their request sockets counted as their SYN queue)
/// and, with `connections`, the rest.
fn split(found: Vec<(InetResponseHeader, Option<u32>)>, connections: bool) -> NamespaceSockets {
    let mut out = NamespaceSockets::default();
    let mut requests = Vec::new();
    for (r, drops) in found {
        let id = &r.socket_id;
        match r.state {
            TCP_LISTEN => out.listeners.push(ListenerQueues {
                addr: id.source_address,
                port: id.source_port,
                acceptq_len: r.recv_queue,
                acceptq_max: r.send_queue,
                synq_len: 0,
                inode: r.inode,
                cookie: u64::from_ne_bytes(id.cookie),
                uid: r.uid,
                drops: drops.unwrap_or(0),
            }),
            TCP_SYN_RECV => requests.push((id.source_address, id.source_port)),
            _ if connections => out.connections.push(r),
            _ => {}
        }
    }
    let index = ListenerIndex::new(&out.listeners);
    for (addr, port) in requests {
        if let Some(i) = index.find(&out.listeners, addr, port) {
            out.listeners[i].synq_len += 1;
        }
    }
    out
}

/// Finds the listener a request socket belongs to: same port, same address or a wildcard
/// one (an IPv6 wildcard also takes IPv4 peers unless it is v6-only; the exact match wins).
/// sock_diag does not say which socket of a SO_REUSEPORT group holds a request, so a group's
/// SYN queue shows on its first socket.
/// Indexed: a SYN flood leaves thousands of requests, and a host may have thousands of listeners.
struct ListenerIndex {
    exact: HashMap<(u16, IpAddr), usize>,
    wildcard: HashMap<u16, Vec<usize>>,
}

impl ListenerIndex {
    fn new(ls: &[ListenerQueues]) -> Self {
        let mut index = Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (i, l) in ls.iter().enumerate() {
            index.exact.entry((l.port, canonical(l.addr))).or_insert(i);
            if l.addr.is_unspecified() {
                index.wildcard.entry(l.port).or_default().push(i);
            }
        }
        index
    }

    fn find(&self, ls: &[ListenerQueues], addr: IpAddr, port: u16) -> Option<usize> {
        let peer = canonical(addr);
        self.exact.get(&(port, peer)).copied().or_else(|| {
            let wild = self.wildcard.get(&port)?;
            wild.iter()
                .copied()
                .find(|&i| ls[i].addr.is_ipv6() || peer.is_ipv4())
        })
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

fn connect() -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Every listener and request socket of `family`, with the listener's drop count
/// (`INET_DIAG_SKMEMINFO`; request sockets carry no extensions).
fn dump(socket: &Socket, family: u8) -> Result<Vec<(InetResponseHeader, Option<u32>)>> {
    // The kernel adds request sockets (TCP_NEW_SYN_RECV) when SYN_RECV is asked for.
    let states = StateFlags::LISTEN | StateFlags::SYN_RECV;
    dump_states(socket, family, states, ExtensionFlags::SKMEMINFO)
}

/// Every TCP socket of `family` in `states` (the census's connections, without extensions).
pub fn sockets(family: u8, states: StateFlags) -> Result<Vec<InetResponseHeader>> {
    let socket = connect().context("open a sock_diag netlink socket")?;
    let found = dump_states(&socket, family, states, ExtensionFlags::empty())?;
    Ok(found.into_iter().map(|(r, _)| r).collect())
}

fn dump_states(
    socket: &Socket,
    family: u8,
    states: StateFlags,
    extensions: ExtensionFlags,
) -> Result<Vec<(InetResponseHeader, Option<u32>)>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions,
        states,
        socket_id: if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        },
    });
    let mut packet = NetlinkMessage::new(header, request.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut out = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = &datagram[..];
        while !rest.is_empty() {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                .context("decode a sock_diag reply")?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let drops = r.nlas.iter().find_map(|nla| match nla {
                        Nla::MemInfo(m) => Some(m.drops),
                        _ => None,
                    });
                    out.push((r.header, drops))
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => bail!("sock_diag dump failed: {e}"),
                _ => {}
            }
            if len == 0 || len > rest.len() {
                break;
            }
            rest = &rest[len..];
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn sees_a_listener_and_its_backlog() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = listeners().unwrap();
        let me = found.iter().find(|q| q.port == port).expect("our listener");
        assert_eq!(me.addr, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(me.acceptq_len, 0);
        assert!(me.acceptq_max > 0 && me.inode > 0, "{me:?}");
        // The dump made the cookie; SO_COOKIE reads the same one.
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        const SO_COOKIE: libc::c_int = 57;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(me.cookie, cookie);
        assert_eq!(me.uid, unsafe { libc::geteuid() });
    }

    /// The collect's one dump per family finds what the listener dump and the census's
    /// connection dump found apart.
    #[test]
    fn one_dump_finds_listeners_and_connections() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let local = client.local_addr().unwrap().port();
        let found = namespace_sockets().unwrap();
        assert!(found.listeners.iter().any(|q| q.port == port));
        let mine = found
            .connections
            .iter()
            .find(|c| c.socket_id.source_port == local)
            .expect("our connection");
        assert_eq!(mine.socket_id.destination_port, port);
        assert!(found
            .connections
            .iter()
            .all(|c| c.state != TCP_LISTEN && c.state != TCP_SYN_RECV));
        assert!(families_in_use().0);
    }

    #[test]
    fn requests_belong_to_exact_then_wildcard_listeners() {
        let l = |addr: &str, port| ListenerQueues {
            addr: addr.parse().unwrap(),
            port,
            acceptq_len: 0,
            acceptq_max: 1,
            synq_len: 0,
            inode: 0,
            cookie: 0,
            uid: 0,
            drops: 0,
        };
        let ls = vec![
            l("0.0.0.0", 80),
            l("127.0.0.1", 80),
            l("::", 443),
            l("::1", 22),
        ];
        let index = ListenerIndex::new(&ls);
        let owner = |addr: &str, port| {
            let i = index.find(&ls, addr.parse().unwrap(), port)?;
            Some(ls[i].addr.to_string())
        };
        assert_eq!(owner("127.0.0.1", 80).as_deref(), Some("127.0.0.1"));
        assert_eq!(owner("10.0.0.1", 80).as_deref(), Some("0.0.0.0"));
        assert_eq!(owner("::ffff:10.0.0.1", 443).as_deref(), Some("::"));
        assert_eq!(owner("::ffff:127.0.0.1", 80).as_deref(), Some("127.0.0.1"));
        assert_eq!(owner("127.0.0.1", 22), None);
    }
}
