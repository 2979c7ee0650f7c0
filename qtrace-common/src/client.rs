//! The client side of the handshake: connect() failures and SYN retransmits, counted in the
//! kernel per (network namespace, owning process, destination). Twin of the listener types in
//! [`crate::counters`]; names in [`crate::vocabulary`].

/// Identifies one destination of one process: where its connect() calls went.
///
/// The owner is the process (thread group) that called connect(), with the process's own name
/// (its group leader's `comm`, not the thread's: thread names such as `pool-3-thread-17` would
/// multiply the series). IPv4 addresses occupy the first four bytes of `daddr`, the rest stays
/// zero, so two keys of one destination compare equal byte for byte (a BPF hash-map key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    /// The process (tgid) that called connect(); 0 when it could not be recorded (see
    /// [`crate::SelfStat::ActiveOpensMapFull`]).
    pub pid: u32,
    /// Its name, NUL-padded (`/proc/<pid>/comm`).
    pub comm: [u8; 16],
    /// Destination address, network byte order.
    pub daddr: [u8; 16],
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// Zero: a hash key's padding must be.
    pub _pad: u32,
    /// The namespace's cookie (`net->net_cookie`: made when the namespace is, on 5.12+; 0 on
    /// older kernels until something asks for it). The kernel hands a deleted namespace's
    /// inode number to the next one created; the cookie tells them apart.
    pub netns_cookie: u64,
}

/// Who called connect() on a socket, and when: kept from connect() (where the caller is the
/// current task) until the socket leaves SYN_SENT for anything but ESTABLISHED, or leaves
/// ESTABLISHED. Those tracepoints may run in softirq context (an RST, a retransmit timer)
/// where the current task is anyone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectOwner {
    /// `bpf_ktime_get_ns()` as the socket entered SYN_SENT, just before connect() looks for a
    /// local port: where the port search's time starts.
    pub connect_ns: u64,
    /// After the u64: 8-byte aligned, so it is copied as two words.
    pub comm: [u8; 16],
    pub pid: u32,
}

/// Indexes into [`ClientCounters::counts`]. Each is exact: one kernel event, one increment.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCounter {
    /// connect() found no free local port for the destination (EADDRNOTAVAIL).
    ConnectNoPort = 0,
    /// The destination answered the SYN with a reset, or an ICMP port unreachable
    /// (ECONNREFUSED).
    ConnectRefused,
    /// The SYN retries ran out (`tcp_syn_retries`; ETIMEDOUT).
    ConnectTimedOut,
    /// Reset by the server before it sent a byte: an actively opened connection, established
    /// (connect() succeeded), that got a reset (ECONNRESET) before receiving any data, as from
    /// a server with `tcp_abort_on_overflow` and a full accept queue.
    ConnectReset,
    /// Any other error that ended the handshake (an ICMP host or network unreachable, …).
    ConnectOther,
    /// Closed by its owner before the handshake ended: an application's own connect timeout
    /// (or, rarely, a failure of connect() after the port was chosen, such as ENOBUFS).
    ConnectAborted,
    /// A SYN the client retransmitted (TcpExtTCPSynRetrans, client side).
    SynRetransmits,
    /// Events of this destination not put on the ring buffer because of the rate limit.
    EventsRateLimited,
}

impl ClientCounter {
    pub const COUNT: usize = ClientCounter::EventsRateLimited as usize + 1;
    pub const ALL: [ClientCounter; ClientCounter::COUNT] = [
        ClientCounter::ConnectNoPort,
        ClientCounter::ConnectRefused,
        ClientCounter::ConnectTimedOut,
        ClientCounter::ConnectReset,
        ClientCounter::ConnectOther,
        ClientCounter::ConnectAborted,
        ClientCounter::SynRetransmits,
        ClientCounter::EventsRateLimited,
    ];
}

/// The value of the per-CPU client map; user space sums it over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientCounters {
    pub counts: [u64; ClientCounter::COUNT],
    /// Event rate limiter state of this CPU (token bucket), as a listener's.
    pub rl_tokens: u64,
    pub rl_refill_ns: u64,
}

/// Struct members only the client programs read, resolved from BTF like
/// [`crate::Offsets`] (kept apart so the listener layout does not change with them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientOffsets {
    /// `struct sock`: `sk_err`, `sk_protocol` (a plain u16 since 5.6).
    pub sk_err: u32,
    pub sk_protocol: u32,
    /// `struct sock`: `sk_err_soft` and `sk_error_queue.next`, where a handshake's ICMP error
    /// lies when it came while connect() held the socket (see the kernel program).
    pub sk_err_soft: u32,
    pub sk_error_queue: u32,
    /// `struct sk_buff`'s `cb` plus `struct sock_exterr_skb`'s `ee`: the queued error.
    pub skb_ee: u32,
    /// `struct inet_sock`: `inet_sport`, set when connect() got a local port and not cleared
    /// when the socket closes (unlike `skc_num`, which releasing the port zeroes before the
    /// state-change tracepoint runs).
    pub inet_sport: u32,
    /// `struct task_struct`: `group_leader`, `comm`.
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// `struct tcp_sock`: `bytes_received` (RFC 4898 tcpEStatsAppHCThruOctetsReceived; 0
    /// until the first byte from the peer), for `reset`.
    pub tcp_bytes_received: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ClientKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ClientCounters {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ClientOffsets {}

/// Time connect() spent choosing a local port (`inet_hash_connect`), per network namespace:
/// bucket 0 holds searches under 1 ns, bucket `b` (b ≥ 1) those in [2^(b-1), 2^b) ns; the
/// last bucket also takes everything longer. The value of the per-CPU port-search map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSearch {
    pub buckets: [u64; crate::WAIT_BUCKETS],
    pub sum_ns: u64,
}

impl PortSearch {
    pub const ZERO: PortSearch = PortSearch {
        buckets: [0; crate::WAIT_BUCKETS],
        sum_ns: 0,
    };
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PortSearch {}

/// One CPU's copy of a slot of the per-CPU port-search array: the histogram of namespace
/// `netns` on that CPU (0: the slot is free on that CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSearchSlot {
    /// The namespace its histogram is for, as [`Self::netns`] makes it (0: none).
    pub netns: u64,
    pub hist: PortSearch,
}

impl PortSearchSlot {
    /// A namespace as the port-search maps keep it: its inode number in the low half, the low
    /// half of its cookie ([`ClientKey::netns_cookie`]) above it.
    pub const fn netns(inode: u32, cookie: u64) -> u64 {
        inode as u64 | cookie << 32
    }

    /// The inode number of such a namespace.
    pub const fn inode(netns: u64) -> u32 {
        netns as u32
    }

    /// The low half of its cookie (0: not made when it was read).
    pub const fn cookie(netns: u64) -> u64 {
        netns >> 32
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PortSearchSlot {}
