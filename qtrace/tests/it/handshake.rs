//! qtrace against the kernel's own counters: real listeners and clients in a network namespace
//! each test creates, where `/proc/net/netstat` counts only what the test did.

use std::{io::Read, time::Duration};

use crate::common::{
    connect, delta, listener, local_ports, require_root, AckOverflow, Netns, Output, Qtrace,
};
use serde_json::Value;

/// qtrace, started as root, with `probe` attached at some tier (every kernel here has one).
fn qtrace_with(probe: &str) -> Qtrace {
    require_root();
    let qtrace = Qtrace::start(&[]);
    assert!(
        qtrace.tier(probe).is_some(),
        "{probe} probe unavailable: {}",
        qtrace.ready
    );
    qtrace
}

/// The counters and drop events of `o`'s listener on `addr`: its final-ACK drops, counted and
/// as events, must be the namespace's ListenOverflows.
fn ack_drops_counted<'a>(
    out: &'a Output,
    ns: &Netns,
    addr: &str,
    o: &AckOverflow,
) -> (&'a Value, Vec<&'a Value>) {
    let counters = match out.listener(ns, addr, o.port) {
        Some(l) => &l["counters"],
        None => panic!(
            "qtrace counted nothing for {addr}:{} while the namespace counted ListenOverflows {} \
             and TCPSynRetrans {}; qtrace printed {} events ({} of this namespace), its final \
             table: {}\nits BPF links and programs before it stopped: {}\nits log:\n{}",
            o.port,
            o.overflows(),
            delta(&o.before, &o.after, "TCPSynRetrans"),
            out.events.len(),
            out.events.iter().filter(|e| ns.owns(e)).count(),
            out.last,
            out.bpf,
            out.stderr
        ),
    };
    assert_eq!(
        counters["drop_accept_queue_full_ack"],
        o.overflows(),
        "{counters}"
    );
    let events = out.events_of(ns, "drop_accept_queue_full_ack");
    assert_eq!(events.len() as u64, o.overflows(), "{events:?}");
    (counters, events)
}

/// Final ACKs dropped by nftables: the listener retransmits SYN-ACKs, and qtrace's count for
/// that listener must equal the namespace's TCPSynRetrans, each event naming listener and client.
fn synack_retransmits(ip: &'static str) {
    let qtrace = qtrace_with("synack");
    let ns = Netns::new();
    let (server, port) = listener(&ns, ip, 16);
    ns.drop_final_acks(&[port]);
    let before = ns.tcp_ext();
    let clients = connect(&ns, ip, port, 3);
    // SYN-ACK retransmits come 1 s and 3 s after each SYN: both rounds.
    ns.wait_for(&before, "TCPSynRetrans", 6, Duration::from_secs(30));
    drop(server); // ends the handshakes: no retransmit after the reading below
    let after = ns.tcp_ext();
    let out = qtrace.stop(libc::SIGINT);

    let expected = delta(&before, &after, "TCPSynRetrans");
    assert!(
        expected >= 6,
        "the nftables rule provoked only {expected} SYN-ACK retransmits"
    );
    let counters = out.counters(&ns, ip, port);
    assert_eq!(counters["synack_retransmits"], expected, "{counters}");

    let events = out.events_of(&ns, "synack_retransmit");
    assert_eq!(
        events.len() as u64,
        expected,
        "one event per retransmit: {events:?}"
    );
    let ports = local_ports(&clients);
    for e in &events {
        assert_eq!(
            (e["laddr"].as_str(), e["lport"].as_u64()),
            (Some(ip), Some(port.into())),
            "{e}"
        );
        assert_eq!(e["raddr"], ip, "{e}");
        assert!(
            ports.contains(&e["rport"].as_u64().unwrap()),
            "{e} is not from clients {ports:?}"
        );
        assert!(e["retransmit"].as_u64().unwrap() >= 1, "{e}");
        // The three half-open handshakes wait in the SYN queue throughout.
        assert_eq!(e["synq_len"], 3, "{e}");
    }
    for p in &ports {
        assert!(
            events.iter().any(|e| e["rport"] == *p),
            "no retransmit event for client port {p}"
        );
    }
}

#[test]
fn synack_retransmits_ipv4() {
    synack_retransmits("127.0.0.1");
}

#[test]
fn synack_retransmits_ipv6() {
    synack_retransmits("::1");
}

#[test]
fn accept_queue_overflow_at_final_ack() {
    let qtrace = qtrace_with("ack");
    let ns = Netns::new();
    let o = AckOverflow::provoke(&ns, "127.0.0.1");
    let out = qtrace.stop(libc::SIGTERM);

    let (counters, events) = ack_drops_counted(&out, &ns, "127.0.0.1", &o);
    assert_eq!(counters["overflow_resets"], 0, "{counters}");
    let ports = local_ports(&o.held);
    for e in &events {
        assert!(
            ports.contains(&e["rport"].as_u64().unwrap()),
            "{e} is not from {ports:?}"
        );
        assert_eq!(e["acceptq_max"], 1, "{e}");
        assert_eq!(e["acceptq_len"], 2, "{e}");
        // The two held handshakes stay in the SYN queue while their ACKs are dropped.
        assert_eq!(e["synq_len"], 2, "{e}");
    }
}

/// A dual-stack listener's IPv4 final ACKs pass through both tcp_v6_syn_recv_sock() and the
/// tcp_v4_syn_recv_sock() it calls: each dropped one is still one drop.
#[test]
fn dual_stack_listener_counts_ipv4_overflows_once() {
    let qtrace = qtrace_with("ack");
    let ns = Netns::new();
    let o = AckOverflow::provoke_from(&ns, "::", "127.0.0.1");
    let out = qtrace.stop(libc::SIGTERM);

    ack_drops_counted(&out, &ns, "::", &o);
}

#[test]
fn abort_on_overflow_resets_the_client() {
    let qtrace = qtrace_with("ack");
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_abort_on_overflow", "1");
    let o = AckOverflow::provoke(&ns, "127.0.0.1");
    let out = qtrace.stop(libc::SIGINT);

    let overflows = o.overflows();
    let (counters, _) = ack_drops_counted(&out, &ns, "127.0.0.1", &o);
    assert_eq!(counters["overflow_resets"], overflows, "{counters}");
    assert_eq!(out.events_of(&ns, "overflow_reset").len() as u64, overflows);
    for mut c in o.held {
        let err = c
            .read(&mut [0; 1])
            .expect_err("the client should have been reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    }
}

/// With one event a second allowed, a burst of retransmits is mostly suppressed: each
/// suppressed event is counted on its listener, and events + suppressed = what happened.
#[test]
fn rate_limited_events_are_counted() {
    require_root();
    let qtrace = Qtrace::start(&["--event-rate", "1"]);
    let ns = Netns::new();
    let (server, port) = listener(&ns, "127.0.0.1", 16);
    ns.drop_final_acks(&[port]);
    let before = ns.tcp_ext();
    let _clients = connect(&ns, "127.0.0.1", port, 8);
    // The first retransmit of each, all within a few ms of each other.
    ns.wait_for(&before, "TCPSynRetrans", 8, Duration::from_secs(30));
    drop(server);
    let after = ns.tcp_ext();
    let out = qtrace.stop(libc::SIGINT);

    let retransmits = delta(&before, &after, "TCPSynRetrans");
    let c = out.counters(&ns, "127.0.0.1", port);
    assert_eq!(c["synack_retransmits"], retransmits, "{c}");
    let limited = c["events_rate_limited"].as_u64().unwrap();
    let shown = out.events_of(&ns, "synack_retransmit").len() as u64;
    assert!(
        limited > 0,
        "8 retransmits at once passed a limit of 1/s: {c}"
    );
    assert_eq!(shown + limited, retransmits, "{c}");
    assert!(out.last["self"]["rate_limited"].as_u64().unwrap() >= limited);
}
