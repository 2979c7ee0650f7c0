//! A point-in-time view of every listener's counters, as a table or as JSON.
//!
//! A counter no attached probe can see is `null` in JSON and `n/a` in the table: an SRE must
//! never read "0 drops" where qtrace is blind.

use qtrace_common::{Counter, SelfStat};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    listener::{ip, listener, Family},
    probes::{counter_available, ProbeStatus},
    stats::{wait_bucket_le_seconds, ListenerStats},
};

/// Which counters the attached probes can see.
#[derive(Clone, Copy)]
pub struct Visibility([bool; Counter::COUNT]);

impl Visibility {
    pub fn of(probes: &[ProbeStatus]) -> Self {
        let mut v = [false; Counter::COUNT];
        for c in Counter::ALL {
            v[c as usize] = counter_available(probes, c);
        }
        Self(v)
    }

    pub fn sees(&self, c: Counter) -> bool {
        self.0[c as usize]
    }
}

#[derive(Serialize)]
struct ListenerJson {
    netns: u32,
    family: Family,
    addr: String,
    port: u16,
    counters: Map<String, Value>,
    accept_wait: Option<Value>,
}

#[derive(Serialize)]
struct WaitJson {
    count: u64,
    sum_seconds: f64,
    /// Cumulative counts by upper bound in seconds, as Prometheus buckets.
    buckets: Vec<(f64, u64)>,
}

/// A listener's counters by name; null for what no attached probe sees, 0 for a listener
/// never counted (`stats` None) where the probe does see.
pub fn counters_json(stats: Option<&ListenerStats>, vis: Visibility) -> Map<String, Value> {
    Counter::ALL
        .iter()
        .map(|&c| {
            let v = if vis.sees(c) {
                Value::from(stats.map_or(0, |s| s.get(c)))
            } else {
                Value::Null
            };
            (c.name().to_string(), v)
        })
        .collect()
}

/// The accept-wait histogram, or None when the accept probe is not attached.
pub fn accept_wait_json(stats: Option<&ListenerStats>, vis: Visibility) -> Option<Value> {
    vis.sees(Counter::Accepted).then(|| {
        let empty;
        let s = match stats {
            Some(s) => s,
            None => {
                empty = ListenerStats::empty(Default::default());
                &empty
            }
        };
        serde_json::to_value(wait_json(s)).expect("plain data")
    })
}

pub fn to_json(
    listeners: &[ListenerStats],
    self_stats: &[u64; SelfStat::COUNT],
    vis: Visibility,
    last: bool,
) -> Value {
    let listeners: Vec<_> = listeners
        .iter()
        .map(|s| ListenerJson {
            netns: s.key.netns,
            family: Family::of(s.key.family),
            addr: ip(s.key.family, s.key.addr).to_string(),
            port: s.key.port,
            counters: counters_json(Some(s), vis),
            accept_wait: accept_wait_json(Some(s), vis),
        })
        .collect();
    let self_stats: Map<String, Value> = SelfStat::ALL
        .iter()
        .map(|&st| (st.name().to_string(), Value::from(self_stats[st as usize])))
        .collect();
    serde_json::json!({
        "type": "listeners",
        "final": last,
        "listeners": listeners,
        "self": self_stats,
    })
}

fn wait_json(s: &ListenerStats) -> WaitJson {
    let mut cumulative = 0;
    let buckets = s
        .wait_buckets
        .iter()
        .enumerate()
        .map(|(b, n)| {
            cumulative += n;
            (wait_bucket_le_seconds(b), cumulative)
        })
        .collect();
    WaitJson {
        count: cumulative,
        sum_seconds: s.wait_sum_ns as f64 / 1e9,
        buckets,
    }
}

/// The counters' column titles, for every table (`run --print`, `top`'s drop columns).
const COLUMNS: [(Counter, &str); 9] = [
    (Counter::DropSynQueueFull, "SYNQ-FULL"),
    (Counter::DropAcceptQueueFullSyn, "ACCQ-FULL@SYN"),
    (Counter::DropAcceptQueueFullAck, "ACCQ-FULL@ACK"),
    (Counter::DropOther, "DROP-OTHER"),
    (Counter::SynackRetransmits, "SYNACK-RTX"),
    (Counter::SyncookiesSent, "COOKIES"),
    (Counter::OverflowResets, "RESETS"),
    (Counter::SynQueued, "SYN-QUEUED"),
    (Counter::Accepted, "ACCEPTED"),
];

/// The title of `c`'s column (its name where no table shows it).
pub fn title(c: Counter) -> &'static str {
    COLUMNS
        .iter()
        .find(|(k, _)| *k == c)
        .map_or(c.name(), |(_, t)| t)
}

/// The listeners with any non-zero counter, one row each.
pub fn to_table(listeners: &[ListenerStats], vis: Visibility) -> String {
    let mut out = format!("{:<28} {:>10}", "LISTENER", "NETNS");
    for (_, title) in COLUMNS {
        out += &format!(" {title:>13}");
    }
    out.push('\n');
    for s in listeners.iter().filter(|s| s.counts.iter().any(|&v| v > 0)) {
        out += &format!("{:<28} {:>10}", listener(&s.key), s.key.netns);
        for (c, _) in COLUMNS {
            if vis.sees(c) {
                out += &format!(" {:>13}", s.get(c));
            } else {
                out += &format!(" {:>13}", "n/a");
            }
        }
        out.push('\n');
    }
    out
}
