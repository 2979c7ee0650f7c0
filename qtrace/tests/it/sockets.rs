//! Every listening socket is its own listener: the sockets of a SO_REUSEPORT group are
//! counted apart (by their cookie), entries of closed sockets and deleted namespaces are
//! reclaimed from the kernel's maps, and no unprivileged user can crowd a service's
//! listeners out of them.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use serde_json::Value;
use socket2::{Domain, Socket, Type};

use crate::common::{
    connect, connect_nonblocking, delta, http_get, listener, require_root, sample, wait_until,
    Netns, Qtrace,
};

/// The socket's cookie (`SO_COOKIE`), as qtrace labels it: lowercase hex.
fn cookie(s: &Socket) -> String {
    const SO_COOKIE: libc::c_int = 57;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a socket we own, and a buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    format!("{cookie:x}")
}

/// The listeners on `port` in `ns`, as /api/listeners shows them now.
fn api_sockets(q: &Qtrace, ns: &Netns, port: u16) -> Vec<Value> {
    let (status, body) = http_get(&q.web(), "/api/listeners", None);
    assert_eq!(status, 200, "{body}");
    let snapshot: Value = serde_json::from_str(&body).unwrap();
    snapshot["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["netns"] == ns.inode && l["port"] == port)
        .cloned()
        .collect()
}

/// Drops of every reason qtrace attributed to one socket.
fn drops(l: &Value) -> u64 {
    l["counters"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .filter_map(|(_, v)| v.as_u64())
        .sum()
}

/// Four sockets share 127.0.0.1:port with SO_REUSEPORT; three are accepted from, one is not.
/// The kernel spreads connections over the four by hash: the fourth's accept queue fills and
/// its SYNs are dropped while its siblings stay empty. qtrace shows four listeners, each
/// labelled with its own cookie, the full one holding every drop of the namespace.
#[test]
fn reuseport_sockets_are_counted_apart() {
    require_root();
    let q = Qtrace::start(&[]);
    let ns = Netns::new();
    let sockets: Vec<Socket> = ns.run(|| {
        let mut port = 0;
        (0..4)
            .map(|i| {
                let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                s.set_reuse_port(true).unwrap();
                s.bind(&addr.into()).unwrap();
                // The stuck one holds two connections; the others take a whole burst.
                s.listen(if i == 0 { 1 } else { 256 }).unwrap();
                port = s.local_addr().unwrap().as_socket().unwrap().port();
                s
            })
            .collect()
    });
    let port = sockets[0].local_addr().unwrap().as_socket().unwrap().port();
    let cookies: Vec<String> = sockets.iter().map(cookie).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut sockets = sockets.into_iter();
    let stuck = sockets.next().unwrap();
    let acceptors: Vec<_> = sockets
        .map(|s| {
            let stop = stop.clone();
            s.set_nonblocking(true).unwrap();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match s.accept() {
                        Ok(conn) => drop(conn),
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
                s
            })
        })
        .collect();

    let before = ns.tcp_ext();
    let clients = connect_nonblocking(&ns, "127.0.0.1", port, 80);
    // The stuck socket's share of 80 connections is about 20: two fill its queue, the rest
    // are dropped at SYN time (and retried).
    ns.wait_for(&before, "ListenDrops", 5, Duration::from_secs(10));
    drop(clients);
    let after = ns.tcp_ext();
    let dropped = delta(&before, &after, "ListenDrops");

    let mut seen = Vec::new();
    wait_until(Duration::from_secs(10), || {
        seen = api_sockets(&q, &ns, port);
        seen.len() == 4 && seen.iter().map(drops).sum::<u64>() == dropped
    });
    assert_eq!(seen.len(), 4, "one listener per socket: {seen:?}");
    let mut labels: Vec<String> = seen
        .iter()
        .map(|l| l["socket"].as_str().unwrap().to_string())
        .collect();
    labels.sort();
    let mut want = cookies.clone();
    want.sort();
    assert_eq!(labels, want, "each socket labelled with its own cookie");
    for l in &seen {
        let full = l["socket"] == cookies[0];
        let d = drops(l);
        let q = &l["queues"];
        if full {
            assert_eq!(d, dropped, "the stuck socket has every drop: {l}");
            assert_eq!(q["accept_len"], 2, "{l}");
        } else {
            assert_eq!(d, 0, "a socket that accepts drops nothing: {l}");
            assert_eq!(q["accept_len"], 0, "{l}");
        }
    }
    // The metrics carry the same four series, by the `socket` label.
    let text = http_get(&q.web(), "/metrics", None).1;
    let (inode, port_s) = (ns.inode.to_string(), port.to_string());
    for (i, c) in cookies.iter().enumerate() {
        let len = sample(
            &text,
            "qtrace_accept_queue_length",
            &[("netns", &inode), ("port", &port_s), ("socket", c)],
        );
        assert_eq!(len, Some(if i == 0 { 2.0 } else { 0.0 }), "{c}: {text}");
    }
    // doctor names the group's imbalance and the full socket.
    let report = crate::doctor::doctor_of(&q.events_socket());
    let endpoint = format!("127.0.0.1:{port}");
    let advice: Vec<&str> = report["advice"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["advice"].as_str())
        .filter(|a| a.contains(&endpoint) && a.contains("SO_REUSEPORT"))
        .collect();
    assert_eq!(advice.len(), 1, "{report}");
    assert!(
        advice[0].starts_with(&format!(
            "1 of 4 sockets on {endpoint} are full (socket {}",
            cookies[0]
        )),
        "{}",
        advice[0]
    );
    stop.store(true, Ordering::Relaxed);
    for a in acceptors {
        drop(a.join().unwrap());
    }
    drop(stuck);
}

/// `qtrace_kernel_listener_entries{partition}` now.
fn entries(q: &Qtrace, partition: &str) -> f64 {
    let text = http_get(&q.web(), "/metrics", None).1;
    sample(
        &text,
        "qtrace_kernel_listener_entries",
        &[("partition", partition)],
    )
    .unwrap_or_else(|| panic!("no qtrace_kernel_listener_entries: {text}"))
}

/// Listeners on `n` ports of `ns` whose final ACKs are dropped, each with one client: every
/// one retransmits SYN-ACKs, which the synack probe (attached on every kernel) counts, so each
/// gets a kernel entry. Made on a thread whose file-system uid is `uid`: the sockets are
/// that user's (`sk_uid`).
fn retransmitting(ns: &Netns, n: usize, uid: u32) -> (Vec<Socket>, Vec<Socket>) {
    let listeners: Vec<Socket> = ns.run(move || {
        // SAFETY: changes this thread's file-system uid only (credentials are per thread).
        unsafe { libc::setfsuid(uid) };
        (0..n)
            .map(|_| {
                let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
                s.bind(&addr.into()).unwrap();
                s.listen(16).unwrap();
                s
            })
            .collect()
    });
    let ports: Vec<u16> = listeners
        .iter()
        .map(|s| s.local_addr().unwrap().as_socket().unwrap().port())
        .collect();
    ns.drop_final_acks(&ports);
    let clients = ports
        .iter()
        .flat_map(|p| connect_nonblocking(ns, "127.0.0.1", *p, 1))
        .collect();
    (listeners, clients)
}

/// An unprivileged user fills the users' map ten times over; a root service's SYN-ACK
/// retransmits are still counted exactly, and the overflow is counted, not silent.
#[test]
fn a_user_cannot_crowd_out_a_service() {
    require_root();
    // 640 listeners and as many clients: more descriptors than a guest's default soft limit.
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile);
        nofile.rlim_cur = nofile.rlim_max.max(4096);
        nofile.rlim_max = nofile.rlim_cur;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &nofile), 0);
    }
    // Large enough for the system listeners of the tests running beside this one.
    let q = Qtrace::start(&["--max-listeners", "64"]);
    let crowd = Netns::new();
    let before = crowd.tcp_ext();
    let (_crowd, _clients) = retransmitting(&crowd, 640, 65534);
    crowd.wait_for(&before, "TCPSynRetrans", 640, Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(5), || entries(&q, "user") == 64.0));
    let text = http_get(&q.web(), "/metrics", None).1;
    let full = sample(
        &text,
        "qtrace_kernel_map_full_total",
        &[("map", "listeners")],
    );
    assert!(
        full.unwrap_or(0.0) > 0.0,
        "the users' map overflowed uncounted: {text}"
    );

    let ns = Netns::new();
    let (server, port) = listener(&ns, "127.0.0.1", 16);
    ns.drop_final_acks(&[port]);
    let before = ns.tcp_ext();
    let clients = connect(&ns, "127.0.0.1", port, 2);
    ns.wait_for(&before, "TCPSynRetrans", 2, Duration::from_secs(10));
    drop(server);
    let expected = delta(&before, &ns.tcp_ext(), "TCPSynRetrans");
    drop(clients);
    let out = q.stop(libc::SIGTERM);
    let counters = out.counters(&ns, "127.0.0.1", port);
    assert_eq!(counters["synack_retransmits"], expected, "{counters}");
}

/// Listeners in namespaces that are then deleted leave the kernel's maps within two collects
/// and `--keep-closed-for`; the entries gauge comes back down and the deletions are counted.
#[test]
fn entries_of_closed_sockets_and_deleted_namespaces_are_reclaimed() {
    require_root();
    let q = Qtrace::start(&["--keep-closed-for", "3s"]);
    let system_before = entries(&q, "system");
    let namespaces: Vec<Netns> = (0..20).map(|_| Netns::new()).collect();
    let befores: Vec<_> = namespaces.iter().map(|ns| ns.tcp_ext()).collect();
    let held: Vec<_> = namespaces
        .iter()
        .map(|ns| retransmitting(ns, 1, 0))
        .collect();
    let cookies: Vec<String> = held.iter().map(|(ls, _)| cookie(&ls[0])).collect();
    for (ns, before) in namespaces.iter().zip(&befores) {
        ns.wait_for(before, "TCPSynRetrans", 1, Duration::from_secs(10));
    }
    // Counted: each has its row, and the system map its entry (other tests' listeners, which
    // this qtrace counts too, come and go beside them: the gauge is compared loosely).
    let ours = |q: &Qtrace| {
        let (_, body) = http_get(&q.web(), "/api/listeners", None);
        let snapshot: Value = serde_json::from_str(&body).unwrap();
        snapshot["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| cookies.iter().any(|c| l["socket"] == c.as_str()))
            .count()
    };
    assert!(wait_until(Duration::from_secs(10), || ours(&q) == 20));
    assert!(entries(&q, "system") >= system_before + 20.0);
    drop(held);
    drop(namespaces);
    // Each scrape collects: an entry missing from two dumps in a row is deleted once its
    // socket has been gone for `--keep-closed-for` (its last counts stay exported until then);
    // sooner than the default 30 s would allow.
    assert!(
        wait_until(Duration::from_secs(25), || ours(&q) == 0),
        "{} of the closed sockets still exported",
        ours(&q)
    );
    let text = http_get(&q.web(), "/metrics", None).1;
    let reclaimed = sample(&text, "qtrace_kernel_listener_entries_reclaimed_total", &[]);
    assert!(reclaimed.unwrap_or(0.0) >= 20.0, "{text}");
}

/// A listener on 127.0.0.1:`port` in `ns` whose final ACKs are dropped, with one client:
/// the listener, the client, and the namespace's SYN-ACK retransmits once there are `n`.
fn retransmits_at(ns: &Netns, port: u16, n: u64) -> (Socket, u64) {
    let (server, port) = crate::common::listener_on(ns, "127.0.0.1", port, 16);
    ns.drop_final_acks(&[port]);
    let before = ns.tcp_ext();
    let client = connect_nonblocking(ns, "127.0.0.1", port, 1);
    ns.wait_for(&before, "TCPSynRetrans", n, Duration::from_secs(20));
    drop(client);
    let after = ns.tcp_ext();
    (server, delta(&before, &after, "TCPSynRetrans"))
}

/// The kernel gives a new network namespace the inode number of a deleted one. A listener
/// there, on the same address and port as one the deleted namespace had, is another socket:
/// its counters start from zero instead of inheriting the dead one's.
#[test]
fn a_namespace_that_reuses_an_inode_starts_from_zero() {
    require_root();
    let q = Qtrace::start(&[]);
    const PORT: u16 = 40123;
    // Namespaces that had a counted listener on PORT, until one reuses an inode.
    let (ns, old) = crate::common::netns_reusing_an_inode(|ns, _| {
        let (server, n) = retransmits_at(ns, PORT, 1);
        assert!(wait_until(Duration::from_secs(10), || {
            api_sockets(&q, ns, PORT)
                .iter()
                .any(|l| l["counters"]["synack_retransmits"].as_u64() >= Some(n))
        }));
        drop(server);
        n
    });
    let (server, n) = retransmits_at(&ns, PORT, 2);
    let mine = cookie(&server);
    let mut seen = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            seen = api_sockets(&q, &ns, PORT);
            seen.iter().any(|l| l["socket"] == mine.as_str())
        }),
        "{seen:?}"
    );
    let row = seen.iter().find(|l| l["socket"] == mine.as_str()).unwrap();
    assert_eq!(
        row["counters"]["synack_retransmits"], n,
        "its own {n} retransmits, not the dead namespace's {old} on top: {row}"
    );
    drop(server);
}
