//! `qtrace doctor`: effective queue limits as the running kernel computes them, checked
//! against the kernel itself — the accept limit it enforces, and how many handshakes its SYN
//! queue really holds.

use std::{process::Command, time::Duration};

use crate::common::{
    connect_nonblocking, delta, listener, overflow_at_syn, require_root, wait_until, Netns, Qtrace,
};
use serde_json::Value;
use socket2::Socket;

fn doctor() -> Value {
    doctor_of("/nonexistent/qtrace.sock")
}

/// The report, with what the daemon listening on `socket` has seen.
pub fn doctor_of(socket: &str) -> Value {
    doctor_with(&["--socket", socket])
}

fn doctor_with(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_qtrace"))
        .args(["doctor", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(report: &'a Value, ns: &Netns, port: u16) -> &'a Value {
    report["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["netns"] == ns.inode && l["port"] == port)
        .unwrap_or_else(|| panic!("listener {port} in netns {} missing", ns.inode))
}

/// TCP_DEFER_ACCEPT: a bare final ACK leaves the request in the SYN queue, so handshakes pile
/// up there without any packet filter.
fn defer_accept(s: &Socket) {
    crate::common::set_tcp_option(s, libc::TCP_DEFER_ACCEPT, 30);
}

#[test]
fn effective_limits_for_common_backlogs() {
    require_root();
    let mut checked = Vec::new();
    for somaxconn in [128u32, 4096] {
        let ns = Netns::new();
        ns.sysctl("net.core.somaxconn", &somaxconn.to_string());
        ns.sysctl("net.ipv4.tcp_syncookies", "1");
        let listeners: Vec<_> = [1u32, 50, 511, 65535]
            .into_iter()
            .map(|b| (b, listener(&ns, "127.0.0.1", b as i32)))
            .collect();
        // Fill the SYN queues of the small ones to see what the kernel really holds.
        let before = ns.tcp_ext();
        let mut clients = Vec::new();
        for (b, (s, port)) in &listeners {
            if *b <= 50 {
                defer_accept(s);
                clients.extend(connect_nonblocking(&ns, "127.0.0.1", *port, 60));
            }
        }
        // The queues really overflowed: the kernel answered the rest with syncookies.
        assert!(
            wait_until(Duration::from_secs(10), || {
                delta(&before, &ns.tcp_ext(), "TCPReqQFullDoCookies") > 0
            }),
            "no SYN queue filled (somaxconn {somaxconn})"
        );
        let report = doctor();
        assert!(
            report["kernel"]["synq_full_rule"].is_string(),
            "measured as root: {}",
            report["kernel"]
        );
        for (b, (_, port)) in &listeners {
            let l = find(&report, &ns, *port);
            let limit = (*b).min(somaxconn);
            assert_eq!(
                l["accept_queue"]["limit"], limit,
                "backlog {b}, somaxconn {somaxconn}: {l}"
            );
            let backlog = &l["accept_queue"]["backlog"];
            if *b < somaxconn {
                assert_eq!(backlog["exactly"], *b, "{l}");
            } else {
                assert_eq!(backlog["at_least"], somaxconn, "{l}");
            }
            if *b <= 50 {
                // 60 handshakes offered: the kernel's own count of requests (sock_diag) is the
                // limit doctor computed; the rest got cookies.
                assert_eq!(
                    l["syn_queue"]["len"], l["syn_queue"]["limit"],
                    "backlog {b}: {l}"
                );
            }
            checked.push((somaxconn, *b, l["syn_queue"]["limit"].clone()));
        }
        drop(clients);
    }
    println!("(somaxconn, backlog, SYN queue limit): {checked:?}");
}

#[test]
fn advice_names_the_full_accept_queue_and_abort_on_overflow() {
    require_root();
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_abort_on_overflow", "1");
    let (_server, port) = listener(&ns, "127.0.0.1", 2);
    let _clients = crate::common::connect(&ns, "127.0.0.1", port, 3); // 3 > 2: the queue is full
    let report = doctor();
    let l = find(&report, &ns, port);
    assert_eq!(l["accept_queue"]["len"], 3, "{l}");
    let advice: Vec<&str> = report["advice"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            a["listener"]
                .as_str()
                .unwrap()
                .contains(&format!(":{port} (netns {})", ns.inode))
        })
        .map(|a| a["advice"].as_str().unwrap())
        .collect();
    assert!(
        advice.iter().any(|a| a.starts_with("accept queue 3/2 now")),
        "{advice:?}"
    );
    assert!(
        advice
            .iter()
            .any(|a| a.starts_with("tcp_abort_on_overflow=1")),
        "{advice:?}"
    );
    assert!(
        advice
            .iter()
            .any(|a| a.contains("raise the listen() backlog (now 2")),
        "{advice:?}"
    );
}

/// With a daemon sampling the queues, the advice says for how much of the recent past the
/// accept queue was at its limit, not only how it is now.
#[test]
fn advice_reports_the_share_of_time_the_accept_queue_was_full() {
    require_root();
    let qtrace = Qtrace::start(&["--queue-sample-interval", "100ms"]);
    let ns = Netns::new();
    let (_server, port) = listener(&ns, "127.0.0.1", 2);
    let _clients = crate::common::connect(&ns, "127.0.0.1", port, 3); // 3 > 2: full from now on
    let mut report = doctor_of(&qtrace.events_socket());
    wait_until(Duration::from_secs(15), || {
        report = doctor_of(&qtrace.events_socket());
        find(&report, &ns, port)["last_hour"]["samples"]
            .as_u64()
            .is_some_and(|n| n >= 5)
    });
    let l = find(&report, &ns, port);
    let hour = &l["last_hour"];
    assert!(hour["samples"].as_u64().unwrap() >= 5, "{l}");
    // Every sample since the clients connected found the queue full; one or two (on an
    // emulated CPU) may have come between listen() and the connects.
    let samples = hour["samples"].as_f64().unwrap();
    let share = hour["accept_queue_at_limit"].as_f64().unwrap();
    assert!(share >= (samples - 2.0) / samples, "{l}");
    assert_eq!(hour["drops"], 0, "{l}");
    let sampled = samples * 0.1;
    let advice = format!(
        "accept queue 3/2 now; at its limit in {:.0}% of the last {sampled:.1} s (sampled every 0.1 s), \
         0 handshakes dropped in that time; 0 connections dropped",
        share * 100.0
    );
    assert!(
        report["advice"].to_string().contains(&advice),
        "{advice} not in {report}"
    );
    qtrace.stop(libc::SIGTERM);
}

/// Where no probe can classify SYN-time drops (here the syn probe is off), doctor still counts
/// them from the listener's own drop count and never says 0 for them.
#[test]
fn advice_counts_drops_no_probe_classified() {
    require_root();
    let qtrace = Qtrace::start(&["--probes=-syn"]);
    let ns = Netns::new();
    let (_server, port, drops) = overflow_at_syn(&ns);
    let want = format!("{drops} handshake packets dropped at this listener whose reason");
    let mut report = doctor_of(&qtrace.events_socket());
    wait_until(Duration::from_secs(10), || {
        report = doctor_of(&qtrace.events_socket());
        report["advice"].to_string().contains(&want)
    });
    let advice = report["advice"].to_string();
    assert!(advice.contains(&want), "{want} not in {report}");
    assert!(
        advice.contains("drops at SYN time cannot be classified on this kernel"),
        "{advice}"
    );
    assert_eq!(
        find(&report, &ns, port)["counters"]["drop_unclassified"],
        drops
    );
    qtrace.stop(libc::SIGTERM);
}

/// The BTF verdict is about the file --btf names: parsed when doctor attaches probes of its
/// own, only opened when a daemon's attached probes already show its BTF parses.
#[test]
fn btf_is_checked_where_told() {
    require_root();
    assert_eq!(doctor()["kernel"]["btf"], true);
    let unreadable = "kernel BTF not readable at /nonexistent/vmlinux";
    let no_daemon = "/nonexistent/qtrace.sock";
    for (btf, why) in [
        ("/nonexistent/vmlinux", unreadable),
        ("/proc/self/cmdline", "parse /proc/self/cmdline"),
    ] {
        let report = doctor_with(&["--socket", no_daemon, "--btf", btf]);
        let kernel = &report["kernel"];
        assert_eq!(
            (&kernel["btf"], &kernel["btf_file"]),
            (&false.into(), &btf.into())
        );
        assert!(
            kernel["btf_error"].as_str().unwrap().contains(why),
            "{kernel}"
        );
        assert!(
            report["probes"]["error"].as_str().unwrap().contains(why),
            "{report}"
        );
    }
    let qtrace = Qtrace::start(&[]);
    let report = doctor_with(&[
        "--socket",
        &qtrace.events_socket(),
        "--btf",
        "/nonexistent/vmlinux",
    ]);
    qtrace.stop(libc::SIGTERM);
    assert_eq!(report["daemon"], true);
    assert!(report["probes"].is_array(), "the daemon's: {report}");
    assert_eq!(report["kernel"]["btf"], false, "{}", report["kernel"]);
    assert!(report["kernel"]["btf_error"]
        .as_str()
        .unwrap()
        .contains(unreadable));
}
