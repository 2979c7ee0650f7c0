//! Every drop at a listener, on every kernel and tier: where no probe classifies a drop, the
//! listener's own drop count (sk_drops, read with sock_diag) still counts it as
//! `unclassified`, so a listener's drops add up to its namespace's ListenDrops; counters exist
//! from the first scrape; the per-namespace cross-check against ListenDrops stays 0.

use std::time::Duration;

use serde_json::Value;

use crate::common::{
    http_get, listener, overflow_at_syn, require_root, sample, wait_until, Netns, Qtrace,
};

const REASONS: [&str; 4] = [
    "drop_syn_queue_full",
    "drop_accept_queue_full_syn",
    "drop_accept_queue_full_ack",
    "drop_other",
];

/// `port`'s listener in `ns` as /api/listeners shows it now.
fn api_listener(q: &Qtrace, ns: &Netns, port: u16) -> Option<Value> {
    let (status, body) = http_get(&q.web(), "/api/listeners", None);
    assert_eq!(status, 200, "{body}");
    let snapshot: Value = serde_json::from_str(&body).unwrap();
    snapshot["listeners"]
        .as_array()?
        .iter()
        .find(|l| l["netns"] == ns.inode && l["port"] == port)
        .cloned()
}

/// Every drop qtrace attributed to a listener: its reasons that a probe sees, and the
/// unclassified ones.
fn attributed(counters: &Value) -> u64 {
    REASONS
        .iter()
        .chain(["drop_unclassified"].iter())
        .filter_map(|r| counters[*r].as_u64())
        .sum()
}

/// Waits until qtrace attributes `want` drops to the listener (its next collects see the
/// socket's count); the listener's counters then.
fn counted(q: &Qtrace, ns: &Netns, port: u16, want: u64) -> Value {
    let mut last = Value::Null;
    wait_until(Duration::from_secs(10), || {
        last = api_listener(q, ns, port).map_or(Value::Null, |l| l["counters"].clone());
        attributed(&last) == want
    });
    last
}

/// The sample of `name` for the listener on 127.0.0.1:`port` in `ns`, with `extra` labels.
fn listener_sample(
    text: &str,
    name: &str,
    ns: &Netns,
    port: u16,
    extra: &[(&str, &str)],
) -> Option<f64> {
    let (inode, port) = (ns.inode.to_string(), port.to_string());
    let mut labels = vec![
        ("netns", inode.as_str()),
        ("addr", "127.0.0.1"),
        ("port", &port),
    ];
    labels.extend_from_slice(extra);
    sample(text, name, &labels)
}

/// `qtrace_listen_drops_total` of that listener for one `reason`.
fn drops_sample(text: &str, ns: &Netns, port: u16, reason: &str) -> Option<f64> {
    listener_sample(
        text,
        "qtrace_listen_drops_total",
        ns,
        port,
        &[("reason", reason)],
    )
}

/// The cross-check of `ns`: its ListenDrops growth minus what qtrace attributed.
fn unattributed(q: &Qtrace, ns: &Netns) -> f64 {
    let text = http_get(&q.web(), "/metrics", None).1;
    let inode = ns.inode.to_string();
    sample(
        &text,
        "qtrace_netns_listen_drops_unattributed",
        &[("netns", &inode)],
    )
    .unwrap_or_else(|| panic!("no cross-check for netns {inode}: {text}"))
}

/// With the syn probe turned off, SYN-time drops have no probe: they are counted, exactly,
/// as unclassified, and the listener's drops add up to ListenDrops.
#[test]
fn syn_time_drops_without_the_syn_probe_are_unclassified() {
    require_root();
    let q = Qtrace::start(&["--probes=-syn"]);
    assert_eq!(q.tier("syn"), None, "{}", q.ready);
    let ns = Netns::new();
    let (server, port, drops) = overflow_at_syn(&ns);
    let c = counted(&q, &ns, port, drops);
    assert_eq!(attributed(&c), drops, "{c}");
    assert!(c["drop_accept_queue_full_syn"].is_null(), "{c}");
    // Nothing else saw these drops: every one of them is unclassified.
    assert_eq!(c["drop_unclassified"], drops, "{c}");
    assert_eq!(unattributed(&q, &ns), 0.0);
    let text = http_get(&q.web(), "/metrics", None).1;
    assert_eq!(
        drops_sample(&text, &ns, port, "unclassified"),
        Some(drops as f64),
        "{text}"
    );
    drop(server);
}

/// At the best tier: where every probe that classifies drops attached (fentry or kprobes),
/// nothing is unclassified and the reasons add up to ListenDrops; where one cannot attach
/// (this machine's kernel), the unclassified drops make up the difference.
#[test]
fn every_drop_is_attributed_at_the_best_tier() {
    require_root();
    let q = Qtrace::start(&[]);
    let every = q.tier("syn").is_some() && q.tier("ack").is_some();
    let ns = Netns::new();
    let (server, port, drops) = overflow_at_syn(&ns);
    let c = counted(&q, &ns, port, drops);
    assert_eq!(attributed(&c), drops, "{c}");
    if every {
        assert!(c.get("drop_unclassified").is_none(), "{c}");
        assert_eq!(c["drop_accept_queue_full_syn"], drops, "{c}");
        let text = http_get(&q.web(), "/metrics", None).1;
        assert!(!text.contains("reason=\"unclassified\"}"), "{text}");
    } else {
        assert_eq!(c["drop_unclassified"], drops, "{c}");
    }
    assert_eq!(unattributed(&q, &ns), 0.0);
    drop(server);
}

/// A listener nothing has happened to has its counters, at 0, in the first scrape that sees
/// it: rate() and increase() then see its first burst.
#[test]
fn a_new_listener_has_its_counters_at_zero_in_the_first_scrape() {
    require_root();
    let q = Qtrace::start(&[]);
    let ns = Netns::new();
    let (server, port) = listener(&ns, "127.0.0.1", 16);
    let text = http_get(&q.web(), "/metrics", None).1;
    let visible = |probe: &str| q.tier(probe).is_some();
    // Each reason whose probe is attached, and the counters of the attached probes.
    let reasons: Vec<&str> = [
        (&["syn"][..], "syn_queue_full"),
        (&["syn"], "accept_queue_full_syn"),
        (&["ack"], "accept_queue_full_ack"),
        (&["syn", "ack"], "other"),
    ]
    .iter()
    .filter(|(probes, _)| probes.iter().all(|p| visible(p)))
    .map(|(_, r)| *r)
    .chain((!(visible("syn") && visible("ack"))).then_some("unclassified"))
    .collect();
    assert!(!reasons.is_empty());
    for r in reasons {
        assert_eq!(drops_sample(&text, &ns, port, r), Some(0.0), "{r}: {text}");
    }
    let counters = [
        ("synack", "qtrace_synack_retransmits_total"),
        ("syn", "qtrace_syns_queued_total"),
        ("accept", "qtrace_accepted_connections_total"),
    ];
    for (_, name) in counters.iter().filter(|(p, _)| visible(p)) {
        assert_eq!(
            listener_sample(&text, name, &ns, port, &[]),
            Some(0.0),
            "{name}: {text}"
        );
    }
    assert_eq!(unattributed(&q, &ns), 0.0);
    drop(server);
}
