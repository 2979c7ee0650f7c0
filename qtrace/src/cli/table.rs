//! The listener table of `qtrace run --print` and the column titles every table shares
//! (`top`'s drop columns are titled the same).
//!
//! A counter no attached probe can see is `n/a`: an SRE must never read "0 drops" where
//! qtrace is blind.

use qtrace_common::{Counter, DropReason};

use crate::{
    kernel::{counters::ListenerStats, probes::Visibility},
    listener::listener,
};

/// The counters' columns, in table order.
const COLUMNS: [Counter; 9] = [
    Counter::DropSynQueueFull,
    Counter::DropAcceptQueueFullSyn,
    Counter::DropAcceptQueueFullAck,
    Counter::DropOther,
    Counter::SynackRetransmits,
    Counter::SyncookiesSent,
    Counter::OverflowResets,
    Counter::SynQueued,
    Counter::Accepted,
];

/// The title of `c`'s column (its name where no table shows it).
pub fn title(c: Counter) -> &'static str {
    if let Some(r) = c.drop_reason() {
        return DropReason::title(r);
    }
    match c {
        Counter::SynackRetransmits => "SYNACK-RTX",
        Counter::SyncookiesSent => "COOKIES",
        Counter::OverflowResets => "RESETS",
        Counter::SynQueued => "SYN-QUEUED",
        Counter::Accepted => "ACCEPTED",
        c => c.name(),
    }
}

/// The listeners with any non-zero counter, one row each.
pub fn to_table(listeners: &[ListenerStats], vis: Visibility) -> String {
    let mut out = format!("{:<28} {:>10}", "LISTENER", "NETNS");
    for c in COLUMNS {
        out += &format!(" {:>13}", title(c));
    }
    out.push('\n');
    for s in listeners.iter().filter(|s| s.counts.iter().any(|&v| v > 0)) {
        out += &format!("{:<28} {:>10}", listener(&s.key), s.key.netns);
        for c in COLUMNS {
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
