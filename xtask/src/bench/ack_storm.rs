//! 3b: a final-ACK overflow storm, the drop qtrace sees even where SYN drops have no hook (the
//! `skb:kfree_skb` tracepoint with reason TCP_LISTEN_OVERFLOW, Linux 6.15+).
//!
//! A backlog-1 listener holds two handshakes in its SYN queue (their final ACKs dropped by
//! nftables) while two connections fill its accept queue. Raw sockets then send the held
//! handshakes' final ACK again and again: each one reaches `tcp_v4_syn_recv_sock()`, finds
//! the accept queue full and is dropped (TcpExt ListenOverflows), and the request stays, so
//! the next identical ACK is dropped the same way. The clients' own ACKs leave with TTL 64,
//! the storm's with another TTL, which is how the nftables rule tells them apart.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
    time::Duration,
};

use anyhow::Result;

use qtrace_testkit::{BpfStats, Netns};

use qtrace_testkit::scrape;

use super::{prog_runtimes, program_rows, sockaddr, Daemon, Sizes, StormCost};

/// Where the held handshakes' clients connect from: the rule drops only their ACKs.
const HELD_FROM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The storm's ACKs carry this TTL; the clients' own (dropped) ones carry the default, 64.
const STORM_TTL: u8 = 99;
const SENDERS: usize = 4;

/// A handshake the listener holds: its client (kept open) and the final ACK that completes it.
struct Held {
    _client: TcpStream,
    ack: [u8; 40],
}

pub fn ack_storm(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: final-ACK overflow storm");
    let ns = Netns::new("bench-ackstorm")?;
    // Without timestamps a bare ACK needs no options to be accepted.
    ns.sysctl("net.ipv4.tcp_timestamps", "0")?;
    ns.nft(&format!(
        "table ip qtrace_bench {{\n chain input {{\n type filter hook input priority 0\n \
         ip saddr {HELD_FROM} ip ttl 64 tcp flags & (syn | ack | fin | rst) == ack drop\n }}\n}}\n"
    ))?;
    let d = Daemon::start(qtrace, &[])?;
    let (tx, rx) = mpsc::channel();
    let name = ns.name.clone();
    let done = Arc::new(AtomicBool::new(false));
    // The listener and its clients live on one thread in the namespace until the storm ends.
    let holder = {
        let (done, name) = (done.clone(), name.clone());
        thread::spawn(move || -> Result<()> {
            Netns::enter(&name)?;
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            // SAFETY: re-listening with another backlog (std's is 128) on our socket.
            unsafe { libc::listen(listener.as_raw_fd(), 1) };
            let SocketAddr::V4(at) = listener.local_addr()? else {
                anyhow::bail!("listener is not IPv4");
            };
            // Held first: once the accept queue is full, SYNs are dropped too.
            let held = (0..2).map(|_| hold(at)).collect::<Result<Vec<_>>>()?;
            let _fill: Vec<_> = (0..2)
                .map(|_| TcpStream::connect(at))
                .collect::<std::io::Result<_>>()?;
            tx.send((at.port(), held.iter().map(|h| h.ack).collect::<Vec<_>>()))
                .ok();
            while !done.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
            }
            drop(held);
            Ok(())
        })
    };
    let (port, acks) = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(v) => v,
        Err(_) => {
            done.store(true, Ordering::Relaxed);
            holder
                .join()
                .map_err(|_| anyhow::anyhow!("storm listener panicked"))??;
            anyhow::bail!("the storm's listener and clients did not come up");
        }
    };
    let before = ns.tcp_ext_value("ListenOverflows")?;
    let bpf_stats = BpfStats::save()?;
    bpf_stats.set(true)?;
    let sent = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (done, sent, name, acks) = (done.clone(), sent.clone(), name.clone(), acks.clone());
            thread::spawn(move || -> Result<()> {
                Netns::enter(&name)?;
                let raw = raw_sender()?;
                let to = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    for ack in &acks {
                        send(&raw, ack, &to)?;
                    }
                    n += acks.len() as u64;
                }
                sent.fetch_add(n, Ordering::Relaxed);
                Ok(())
            })
        })
        .collect();
    let cost = StormCost::measure(&d, z, &done, senders)?;
    let secs = cost.secs;
    let programs = prog_runtimes("qt_")?;
    drop(bpf_stats);
    holder
        .join()
        .map_err(|_| anyhow::anyhow!("storm listener panicked"))??;
    let overflows = ns.tcp_ext_value("ListenOverflows")? - before;
    let (_, metrics) = d.get("/metrics")?;
    let tier = d.tier("ack")?;
    drop(d);
    anyhow::ensure!(
        overflows > 0,
        "the final-ACK storm overflowed nothing: the listener's accept queue was not full"
    );
    let port = port.to_string();
    let counted = scrape::sum(
        &metrics,
        "qtrace_listen_drops_total",
        &[("port", &port), ("reason", "accept_queue_full_ack")],
    ) as u64;

    let mut s = format!("## 3b. Final-ACK overflow storm (ack probe: {tier})\n\n");
    let _ = writeln!(
        s,
        "Where the SYN-time drops of 3 have no hook, final-ACK drops may still have one. A backlog-1 listener holds two handshakes whose final ACKs nftables dropped, while two connections fill its accept queue; {SENDERS} threads then send those final ACKs again through raw sockets for {secs:.1} s, each one dropped at the full accept queue (ListenOverflows). kernel.bpf_stats_enabled=1 throughout, for the programs' run time.\n"
    );
    s += "| figure | value | target |\n|---|---|---|\n";
    let _ = writeln!(
        s,
        "| ACKs sent/s | {:.0} | |",
        sent.load(Ordering::Relaxed) as f64 / secs
    );
    let _ = writeln!(
        s,
        "| final-ACK drops/s (kernel ListenOverflows) | {:.0} | ≥ 100k |",
        overflows as f64 / secs
    );
    let _ = writeln!(
        s,
        "| drops qtrace counted / kernel ListenOverflows | {counted} / {overflows} | equal |"
    );
    s += &cost.rows(&metrics);
    s += &program_rows(&programs);
    s += "\n";
    Ok(s)
}

/// Connects from `HELD_FROM` to `to`: the client is established once the SYN-ACK arrives,
/// while the listener, its final ACK dropped, holds the request. Returns the final ACK the
/// listener is waiting for, read from the client in TCP repair mode (which also keeps the
/// client from sending anything more, even at close).
fn hold(to: SocketAddrV4) -> Result<Held> {
    // SAFETY: a new socket, owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is ours and open.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let from = sockaddr(SocketAddrV4::new(HELD_FROM, 0));
    let dest = sockaddr(to);
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid sockaddr_in values of the length given.
    unsafe {
        anyhow::ensure!(
            libc::bind(
                fd.as_raw_fd(),
                (&from as *const libc::sockaddr_in).cast(),
                len
            ) == 0,
            "bind {HELD_FROM}: {}",
            std::io::Error::last_os_error()
        );
        anyhow::ensure!(
            libc::connect(
                fd.as_raw_fd(),
                (&dest as *const libc::sockaddr_in).cast(),
                len
            ) == 0,
            "connect {to}: {}",
            std::io::Error::last_os_error()
        );
    }
    let client = TcpStream::from(fd);
    let SocketAddr::V4(local) = client.local_addr()? else {
        anyhow::bail!("client is not IPv4");
    };
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    set_tcp(&client, libc::TCP_REPAIR, 1)?;
    set_tcp(&client, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    let seq = queue_seq(&client)?;
    set_tcp(&client, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    let ack_seq = queue_seq(&client)?;
    Ok(Held {
        ack: bare_ack(local, to, seq, ack_seq),
        _client: client,
    })
}

fn set_tcp(s: &TcpStream, opt: libc::c_int, value: libc::c_int) -> Result<()> {
    // SAFETY: an int option of the right size on our socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "TCP option {opt}: {} (TCP repair needs CAP_NET_ADMIN)",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The next sequence number of the repair queue selected (send: ours; receive: the peer's).
fn queue_seq(s: &TcpStream) -> Result<u32> {
    let mut seq: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: a u32 buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUEUE_SEQ,
            (&mut seq as *mut u32).cast(),
            &mut len,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "TCP_QUEUE_SEQ: {}",
        std::io::Error::last_os_error()
    );
    Ok(seq)
}

/// An IPv4 packet carrying a bare ACK from `from` to `to` (the kernel fills in the IP
/// checksum, length and id of a raw IPPROTO_RAW send; the TCP checksum is ours).
fn bare_ack(from: SocketAddrV4, to: SocketAddrV4, seq: u32, ack_seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // version 4, 5 words of header
    p[8] = STORM_TTL;
    p[9] = libc::IPPROTO_TCP as u8;
    p[12..16].copy_from_slice(&from.ip().octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&from.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack_seq.to_be_bytes());
    tcp[12] = 5 << 4; // 5 words, no options
    tcp[13] = 0x10; // ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let checksum = tcp_checksum(from.ip(), to.ip(), tcp);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    p
}

/// RFC 793's checksum over the IPv4 pseudo-header and the segment.
fn tcp_checksum(src: &Ipv4Addr, dst: &Ipv4Addr, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A send-only raw socket (IPPROTO_RAW receives nothing, so it never queues copies of the
/// storm's packets).
fn raw_sender() -> Result<OwnedFd> {
    // SAFETY: a new socket, owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    anyhow::ensure!(
        fd >= 0,
        "raw socket: {} (needs CAP_NET_RAW)",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is ours and open.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(raw: &OwnedFd, packet: &[u8], to: &libc::sockaddr_in) -> Result<()> {
    // SAFETY: a valid buffer and sockaddr_in of the lengths given.
    let n = unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(n >= 0, "raw send: {}", std::io::Error::last_os_error());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of a segment with its own checksum filled in verifies to zero.
    #[test]
    fn checksum_of_a_checksummed_segment_is_zero() {
        let (a, b) = (
            SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 40000),
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080),
        );
        let p = bare_ack(a, b, 0x1234_5678, 0x9abc_def0);
        assert_eq!(tcp_checksum(a.ip(), b.ip(), &p[20..]), 0);
    }
}
