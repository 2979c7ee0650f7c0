//! qtrace's one vocabulary for what happened at a listener, defined here once and used by the
//! metrics, the events, the JSON API, `top`, `doctor` and the README.
//!
//! A handshake packet the listener dropped has a [`DropReason`]. Its name (`syn_queue_full`,
//! …, `other`) is the `reason` label of `qtrace_listen_drops_total`; `drop_<reason>` is both
//! the JSON key of its counter and the `kind` of its event. Other counters and events follow
//! the same rule: the counter is the plural (`synack_retransmits`), the event the singular
//! (`synack_retransmit`).

use crate::{ClientCounter, Counter, EventKind};

/// Why a handshake packet was dropped at the listener. Together, the kernel's ListenDrops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// A SYN, because the SYN queue was full and syncookies were off (TcpExtTCPReqQFullDrop).
    SynQueueFull,
    /// A SYN, because the accept queue was full (TcpExtListenOverflows at SYN time).
    AcceptQueueFullSyn,
    /// The final ACK, because the accept queue was full (TcpExtListenOverflows at ACK time).
    AcceptQueueFullAck,
    /// Any other listen drop (TcpExtListenDrops not explained by the reasons above).
    Other,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::SynQueueFull,
        DropReason::AcceptQueueFullSyn,
        DropReason::AcceptQueueFullAck,
        DropReason::Other,
    ];

    /// The reason's name: the metric label value.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::SynQueueFull => "syn_queue_full",
            DropReason::AcceptQueueFullSyn => "accept_queue_full_syn",
            DropReason::AcceptQueueFullAck => "accept_queue_full_ack",
            DropReason::Other => "other",
        }
    }

    /// `drop_<name>`: the JSON key of its counter and the kind of its events.
    pub const fn key(self) -> &'static str {
        match self {
            DropReason::SynQueueFull => "drop_syn_queue_full",
            DropReason::AcceptQueueFullSyn => "drop_accept_queue_full_syn",
            DropReason::AcceptQueueFullAck => "drop_accept_queue_full_ack",
            DropReason::Other => "drop_other",
        }
    }

    /// What an operator reads.
    pub const fn describe(self) -> &'static str {
        match self {
            DropReason::SynQueueFull => "SYN dropped: SYN queue full",
            DropReason::AcceptQueueFullSyn => "SYN dropped: accept queue full",
            DropReason::AcceptQueueFullAck => "ACK dropped: accept queue full",
            DropReason::Other => "handshake packet dropped (other)",
        }
    }

    /// The column title of its counter in every table.
    pub const fn title(self) -> &'static str {
        match self {
            DropReason::SynQueueFull => "SYNQ-FULL",
            DropReason::AcceptQueueFullSyn => "ACCQ-FULL@SYN",
            DropReason::AcceptQueueFullAck => "ACCQ-FULL@ACK",
            DropReason::Other => "DROP-OTHER",
        }
    }

    pub const fn counter(self) -> Counter {
        match self {
            DropReason::SynQueueFull => Counter::DropSynQueueFull,
            DropReason::AcceptQueueFullSyn => Counter::DropAcceptQueueFullSyn,
            DropReason::AcceptQueueFullAck => Counter::DropAcceptQueueFullAck,
            DropReason::Other => Counter::DropOther,
        }
    }

    pub const fn event(self) -> EventKind {
        match self {
            DropReason::SynQueueFull => EventKind::DropSynQueueFull,
            DropReason::AcceptQueueFullSyn => EventKind::DropAcceptQueueFullSyn,
            DropReason::AcceptQueueFullAck => EventKind::DropAcceptQueueFullAck,
            DropReason::Other => EventKind::DropOther,
        }
    }
}

/// How the vocabulary names a kind of drop: the metric's `reason`, the JSON key, the column
/// title, and what an operator reads.
pub struct DropTerm {
    pub name: &'static str,
    pub key: &'static str,
    pub title: &'static str,
    pub describe: &'static str,
}

/// Drops the listener itself counted (`sk_drops`, read with sock_diag) that no attached probe
/// classified: they exist only where a probe that classifies drops cannot attach (the `syn`
/// probe needs fentry or kprobes). No kernel program counts them, so they have no
/// [`Counter`] and no event.
pub const UNCLASSIFIED: DropTerm = DropTerm {
    name: "unclassified",
    key: "drop_unclassified",
    title: "DROP-UNCLASS",
    describe: "dropped at the listener, reason not visible on this kernel",
};

impl Counter {
    /// The drop reason this counter counts, if it counts drops.
    pub const fn drop_reason(self) -> Option<DropReason> {
        match self {
            Counter::DropSynQueueFull => Some(DropReason::SynQueueFull),
            Counter::DropAcceptQueueFullSyn => Some(DropReason::AcceptQueueFullSyn),
            Counter::DropAcceptQueueFullAck => Some(DropReason::AcceptQueueFullAck),
            Counter::DropOther => Some(DropReason::Other),
            _ => None,
        }
    }

    /// Stable name: the JSON key of the counter (and, for drops, of the metric's reason).
    pub const fn name(self) -> &'static str {
        if let Some(r) = self.drop_reason() {
            return r.key();
        }
        match self {
            Counter::SynQueued => "syn_queued",
            Counter::SyncookiesSent => "syncookies_sent",
            Counter::SynackRetransmits => "synack_retransmits",
            Counter::OverflowResets => "overflow_resets",
            Counter::Accepted => "accepted",
            Counter::EventsRateLimited => "events_rate_limited",
            _ => "",
        }
    }
}

impl EventKind {
    /// The drop reason of a drop event.
    pub const fn drop_reason(self) -> Option<DropReason> {
        match self {
            EventKind::DropSynQueueFull => Some(DropReason::SynQueueFull),
            EventKind::DropAcceptQueueFullSyn => Some(DropReason::AcceptQueueFullSyn),
            EventKind::DropAcceptQueueFullAck => Some(DropReason::AcceptQueueFullAck),
            EventKind::DropOther => Some(DropReason::Other),
            _ => None,
        }
    }

    /// The connect() failure of a client event.
    pub const fn connect_failure(self) -> Option<ConnectFailure> {
        match self {
            EventKind::ConnectNoPort => Some(ConnectFailure::NoPort),
            EventKind::ConnectRefused => Some(ConnectFailure::Refused),
            EventKind::ConnectTimedOut => Some(ConnectFailure::TimedOut),
            EventKind::ConnectReset => Some(ConnectFailure::Reset),
            EventKind::ConnectOther => Some(ConnectFailure::Other),
            EventKind::ConnectAborted => Some(ConnectFailure::Aborted),
            _ => None,
        }
    }

    /// Whether it happened at a connecting socket rather than at a listener.
    pub const fn is_client(self) -> bool {
        self.connect_failure().is_some() || matches!(self, EventKind::SynRetransmit)
    }

    /// Stable name: the event's `kind` in JSON and for `qtrace events --kind`.
    pub const fn name(self) -> &'static str {
        if let Some(r) = self.drop_reason() {
            return r.key();
        }
        if let Some(f) = self.connect_failure() {
            return f.key();
        }
        match self {
            EventKind::SynackRetransmit => "synack_retransmit",
            EventKind::OverflowReset => "overflow_reset",
            EventKind::SyncookieSent => "syncookie_sent",
            EventKind::DropUnclassified => UNCLASSIFIED.key,
            EventKind::SynRetransmit => "syn_retransmit",
            _ => "",
        }
    }

    /// The kind's name before the vocabulary was unified (accepted on input only).
    pub const fn old_name(self) -> Option<&'static str> {
        match self {
            EventKind::DropSynQueueFull => Some("syn_drop_syn_queue_full"),
            EventKind::DropAcceptQueueFullSyn => Some("syn_drop_accept_queue_full"),
            EventKind::DropAcceptQueueFullAck => Some("ack_drop_accept_queue_full"),
            _ => None,
        }
    }

    /// What an operator reads.
    pub const fn describe(self) -> &'static str {
        if let Some(r) = self.drop_reason() {
            return r.describe();
        }
        if let Some(f) = self.connect_failure() {
            return f.describe();
        }
        match self {
            EventKind::SynackRetransmit => "SYN-ACK retransmit",
            EventKind::OverflowReset => "reset (abort_on_overflow)",
            EventKind::SyncookieSent => "syncookie sent",
            EventKind::DropUnclassified => UNCLASSIFIED.describe,
            EventKind::SynRetransmit => "SYN retransmit (client)",
            _ => "",
        }
    }
}

/// Why a connect() failed: the client side's counterpart of [`DropReason`]. Its name is the
/// `reason` label of `qtrace_connect_failures_total`; `connect_<name>` is the JSON key of its
/// counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConnectFailure {
    /// No free local port towards the destination (EADDRNOTAVAIL).
    NoPort,
    /// Reset (or ICMP port unreachable) in answer to the SYN (ECONNREFUSED).
    Refused,
    /// The SYN retries ran out (ETIMEDOUT).
    TimedOut,
    /// Reset by the server before it sent a byte (ECONNRESET), after connect() succeeded: the
    /// handshake as the server saw it did not complete (`tcp_abort_on_overflow` with a full
    /// accept queue). In SYN_SENT the kernel reports a reset as ECONNREFUSED (`refused`).
    Reset,
    /// Any other error that ended the handshake.
    Other,
    /// Closed by its owner before the handshake ended (an application's own connect timeout).
    Aborted,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 6] = [
        ConnectFailure::NoPort,
        ConnectFailure::Refused,
        ConnectFailure::TimedOut,
        ConnectFailure::Reset,
        ConnectFailure::Other,
        ConnectFailure::Aborted,
    ];

    /// The reason's name: the metric label value.
    pub const fn name(self) -> &'static str {
        match self {
            ConnectFailure::NoPort => "no_port",
            ConnectFailure::Refused => "refused",
            ConnectFailure::TimedOut => "timed_out",
            ConnectFailure::Reset => "reset",
            ConnectFailure::Other => "other",
            ConnectFailure::Aborted => "aborted",
        }
    }

    /// `connect_<name>`: the JSON key of its counter.
    pub const fn key(self) -> &'static str {
        match self {
            ConnectFailure::NoPort => "connect_no_port",
            ConnectFailure::Refused => "connect_refused",
            ConnectFailure::TimedOut => "connect_timed_out",
            ConnectFailure::Reset => "connect_reset",
            ConnectFailure::Other => "connect_other",
            ConnectFailure::Aborted => "connect_aborted",
        }
    }

    /// What an operator reads.
    pub const fn describe(self) -> &'static str {
        match self {
            ConnectFailure::NoPort => "connect failed: no free local port (EADDRNOTAVAIL)",
            ConnectFailure::Refused => "connect refused (ECONNREFUSED)",
            ConnectFailure::TimedOut => "connect timed out: SYN retries exhausted (ETIMEDOUT)",
            ConnectFailure::Reset => "connection reset before the server's first byte (ECONNRESET)",
            ConnectFailure::Other => "connect failed (other error)",
            ConnectFailure::Aborted => "connect abandoned: closed by its owner mid-handshake",
        }
    }

    /// The column title of its counter in every table.
    pub const fn title(self) -> &'static str {
        match self {
            ConnectFailure::NoPort => "NO-PORT",
            ConnectFailure::Refused => "REFUSED",
            ConnectFailure::TimedOut => "TIMED-OUT",
            ConnectFailure::Reset => "RESET",
            ConnectFailure::Other => "FAIL-OTHER",
            ConnectFailure::Aborted => "ABORTED",
        }
    }

    pub const fn counter(self) -> ClientCounter {
        match self {
            ConnectFailure::NoPort => ClientCounter::ConnectNoPort,
            ConnectFailure::Refused => ClientCounter::ConnectRefused,
            ConnectFailure::TimedOut => ClientCounter::ConnectTimedOut,
            ConnectFailure::Reset => ClientCounter::ConnectReset,
            ConnectFailure::Other => ClientCounter::ConnectOther,
            ConnectFailure::Aborted => ClientCounter::ConnectAborted,
        }
    }

    /// Its event kind: `connect_<name>`, as its counter's key.
    pub const fn event(self) -> EventKind {
        match self {
            ConnectFailure::NoPort => EventKind::ConnectNoPort,
            ConnectFailure::Refused => EventKind::ConnectRefused,
            ConnectFailure::TimedOut => EventKind::ConnectTimedOut,
            ConnectFailure::Reset => EventKind::ConnectReset,
            ConnectFailure::Other => EventKind::ConnectOther,
            ConnectFailure::Aborted => EventKind::ConnectAborted,
        }
    }

    /// The failure a socket's `sk_err` names when it leaves SYN_SENT for CLOSE; `no_port` is
    /// told apart by the socket having no local port (see the kernel program).
    pub const fn of_errno(errno: i32) -> ConnectFailure {
        match errno {
            ECONNREFUSED => ConnectFailure::Refused,
            ETIMEDOUT => ConnectFailure::TimedOut,
            ECONNRESET => ConnectFailure::Reset,
            _ => ConnectFailure::Other,
        }
    }
}

/// Linux errno values (the same on every architecture qtrace builds for).
pub const ECONNRESET: i32 = 104;
pub const ETIMEDOUT: i32 = 110;
pub const ECONNREFUSED: i32 = 111;

impl ClientCounter {
    /// Stable name: the JSON key of the counter.
    pub const fn name(self) -> &'static str {
        match self {
            ClientCounter::ConnectNoPort => ConnectFailure::NoPort.key(),
            ClientCounter::ConnectRefused => ConnectFailure::Refused.key(),
            ClientCounter::ConnectTimedOut => ConnectFailure::TimedOut.key(),
            ClientCounter::ConnectReset => ConnectFailure::Reset.key(),
            ClientCounter::ConnectOther => ConnectFailure::Other.key(),
            ClientCounter::ConnectAborted => ConnectFailure::Aborted.key(),
            ClientCounter::SynRetransmits => "syn_retransmits",
            ClientCounter::EventsRateLimited => "events_rate_limited",
        }
    }
}
