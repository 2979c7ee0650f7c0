//! Records the kernel programs put on the ring buffer, one per drop, retransmit or reset.

use crate::ListenerKey;

/// What happened. Stable numbering: it is part of the event wire format. Names and
/// descriptions: [`crate::vocabulary`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    DropSynQueueFull = 1,
    DropAcceptQueueFullSyn = 2,
    DropAcceptQueueFullAck = 3,
    DropOther = 4,
    SynackRetransmit = 5,
    OverflowReset = 6,
    SyncookieSent = 7,
    /// Never on the ring buffer: the daemon's periodic account of the drops at a listener that
    /// no probe classified (where one cannot attach), from the listener's own drop count.
    DropUnclassified = 8,
    /// The client side (see [`crate::ConnectFailure`]): a connect() that failed, by reason,
    /// and a SYN the client retransmitted. `listener` is then the connecting socket's own
    /// address and port (0 when none was assigned), `raddr`/`rport` its destination.
    ConnectNoPort = 9,
    ConnectRefused = 10,
    ConnectTimedOut = 11,
    ConnectReset = 12,
    ConnectOther = 13,
    ConnectAborted = 14,
    SynRetransmit = 15,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::DropSynQueueFull,
            2 => Self::DropAcceptQueueFullSyn,
            3 => Self::DropAcceptQueueFullAck,
            4 => Self::DropOther,
            5 => Self::SynackRetransmit,
            6 => Self::OverflowReset,
            7 => Self::SyncookieSent,
            8 => Self::DropUnclassified,
            9 => Self::ConnectNoPort,
            10 => Self::ConnectRefused,
            11 => Self::ConnectTimedOut,
            12 => Self::ConnectReset,
            13 => Self::ConnectOther,
            14 => Self::ConnectAborted,
            15 => Self::SynRetransmit,
            _ => return None,
        })
    }
}

/// One event. Queue figures are read from the listener at the moment of the event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub listener: ListenerKey,
    /// Remote (client) address, network byte order; same family as the listener.
    pub raddr: [u8; 16],
    /// Remote port, host byte order.
    pub rport: u16,
    /// An [`EventKind`] value.
    pub kind: u8,
    /// For SYN-ACK retransmits: which retransmit of this request this is (1 = first).
    pub retrans: u8,
    pub acceptq_len: u32,
    pub acceptq_max: u32,
    pub synq_len: u32,
    pub synq_max: u32,
    /// Client events: the process (tgid) that called connect(); 0 for listener events.
    pub pid: u32,
}
