//! Per-listener counters aggregated in the kernel, and qtrace's own accounting.

/// Indexes into [`ListenerCounters::counts`]. Each is exact: one kernel event, one increment.
/// Names: [`crate::vocabulary`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A SYN was accepted into the SYN (request) queue.
    SynQueued = 0,
    /// A SYN was dropped because the SYN queue was full and syncookies were off
    /// (the kernel's TcpExtTCPReqQFullDrop).
    DropSynQueueFull,
    /// A SYN was dropped because the accept queue was full (TcpExtListenOverflows at SYN time).
    DropAcceptQueueFullSyn,
    /// The final ACK was dropped because the accept queue was full
    /// (TcpExtListenOverflows at the third handshake packet).
    DropAcceptQueueFullAck,
    /// Any other listen drop (TcpExtListenDrops not explained by the reasons above).
    DropOther,
    /// A SYN was answered with a syncookie instead of a queued request.
    SyncookiesSent,
    /// The listener retransmitted a SYN-ACK (TcpExtTCPSynRetrans).
    SynackRetransmits,
    /// A reset was sent for a failed final ACK because `tcp_abort_on_overflow=1`.
    OverflowResets,
    /// accept() returned a connection.
    Accepted,
    /// Events of this listener not put on the ring buffer because of the rate limit.
    EventsRateLimited,
}

impl Counter {
    pub const COUNT: usize = Counter::EventsRateLimited as usize + 1;
    pub const ALL: [Counter; Counter::COUNT] = [
        Counter::SynQueued,
        Counter::DropSynQueueFull,
        Counter::DropAcceptQueueFullSyn,
        Counter::DropAcceptQueueFullAck,
        Counter::DropOther,
        Counter::SyncookiesSent,
        Counter::SynackRetransmits,
        Counter::OverflowResets,
        Counter::Accepted,
        Counter::EventsRateLimited,
    ];
}

/// Accept-queue wait histogram: bucket 0 holds waits under 1 µs, bucket `b` (b ≥ 1) waits in
/// [2^(b-1), 2^b) µs; the last bucket also takes everything longer.
pub const WAIT_BUCKETS: usize = 32;

/// The value of the per-CPU listener maps, keyed by the socket ([`crate::ListenerKey::sock`]
/// or its stand-in); user space sums it over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ListenerCounters {
    /// Which listener this is, written by each CPU when it first counts for it (all zeros on
    /// a CPU that has not): the map key is the socket alone, so a count hashes 8 bytes and
    /// reads nothing else of the socket.
    pub id: crate::ListenerKey,
    pub counts: [u64; Counter::COUNT],
    pub wait_buckets: [u64; WAIT_BUCKETS],
    /// Sum of all accept-queue waits, nanoseconds.
    pub wait_sum_ns: u64,
    /// Event rate limiter state of this CPU (token bucket): tokens left, and when last refilled.
    pub rl_tokens: u64,
    pub rl_refill_ns: u64,
}

impl ListenerCounters {
    pub const ZERO: ListenerCounters = ListenerCounters {
        id: crate::ListenerKey {
            netns: 0,
            family: 0,
            port: 0,
            addr: [0; 16],
            sock: 0,
        },
        counts: [0; Counter::COUNT],
        wait_buckets: [0; WAIT_BUCKETS],
        wait_sum_ns: 0,
        rl_tokens: 0,
        rl_refill_ns: 0,
    };
}

impl Default for ListenerCounters {
    fn default() -> Self {
        Self::ZERO
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenerCounters {}

/// Indexes into the per-CPU self-accounting array: what qtrace itself lost or could not track.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfStat {
    /// An event was due but the ring buffer was full.
    RingbufFull = 0,
    /// An event was suppressed by a listener's rate limit.
    RateLimited,
    /// A listener could not be added because the listener map was full; its counts are lost.
    ListenerMapFull,
    /// A kernel read failed (bpf_probe_read_kernel returned an error).
    ReadFailed,
    /// A destination could not be added because the client map was full; its counts are lost.
    ClientMapFull,
    /// An active open's owner could not be recorded (map full, `--max-client-sockets`): its
    /// handshake failures count for pid 0, and a reset of it is not counted.
    ActiveOpensMapFull,
    /// A namespace's port-search histogram could not be created (map full): its searches
    /// are lost.
    PortSearchMapFull,
}

impl SelfStat {
    pub const COUNT: usize = SelfStat::PortSearchMapFull as usize + 1;
    pub const ALL: [SelfStat; SelfStat::COUNT] = [
        SelfStat::RingbufFull,
        SelfStat::RateLimited,
        SelfStat::ListenerMapFull,
        SelfStat::ReadFailed,
        SelfStat::ClientMapFull,
        SelfStat::ActiveOpensMapFull,
        SelfStat::PortSearchMapFull,
    ];
}

impl SelfStat {
    pub const fn name(self) -> &'static str {
        match self {
            SelfStat::RingbufFull => "ringbuf_full",
            SelfStat::RateLimited => "rate_limited",
            SelfStat::ListenerMapFull => "listener_map_full",
            SelfStat::ReadFailed => "read_failed",
            SelfStat::ClientMapFull => "client_map_full",
            SelfStat::ActiveOpensMapFull => "active_opens_map_full",
            SelfStat::PortSearchMapFull => "port_search_map_full",
        }
    }
}
