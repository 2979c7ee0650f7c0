//! Facts about the running kernel that user space reads from BTF and hands to the programs
//! as globals, so one object runs on every kernel without a struct layout compiled in.

/// How many bytes at the head of `struct sock_common` the programs copy in one read to build a
/// listener's key; every key field must end inside them (checked against BTF at start).
pub const SOCK_KEY_HEAD: u32 = 96;

/// Byte offsets of the struct members the programs read. Every field is resolved from the
/// running kernel's BTF at start-up; none is assumed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    // struct sock_common (the head of struct sock and of struct request_sock)
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_net: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_cookie: u32,
    // struct net
    pub net_ns_inum: u32,
    pub net_syncookies: u32,
    pub net_abort_on_overflow: u32,
    /// `net_cookie`: unique to a namespace (an inode number is handed on to the next
    /// namespace once one is deleted); 0 where BTF lacks it (it cannot be the first member).
    pub net_cookie: u32,
    // struct sock
    pub sk_drops: u32,
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    pub sk_socket: u32,
    pub sk_uid: u32,
    /// From a `struct socket *` to its inode's `i_ino` (`struct socket_alloc` puts the two
    /// side by side); 0 when this kernel's BTF does not describe it.
    pub socket_ino: u32,
    // struct inet_connection_sock: icsk_accept_queue.qlen
    pub icsk_synq_len: u32,
    // struct tcp_sock: rcvq_space.time, the child's ESTABLISHED stamp in microseconds
    pub tcp_rcvq_time: u32,
    // struct request_sock
    pub req_num_retrans: u32,
    // struct sk_buff
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
}

/// Prototype facts of hooked functions and tracepoints.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookLayout {
    /// Value of `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW` on this kernel, 0 when it has none.
    pub drop_reason_listen_overflow: u32,
    /// Non-zero when the `syn` probe also hooks the kernel's SYN-queue-full and syncookie
    /// decisions (`tcp_syn_flood_action`, `cookie_v*_init_sequence`); else it predicts them.
    pub syn_decisions_hooked: u32,
    /// Value of `SKB_DROP_REASON_NO_SOCKET` (the syncookie path's failed syn_recv_sock).
    pub drop_reason_no_socket: u32,
    /// Byte offset of ListenOverflows in `struct linux_mib` (`LINUX_MIB_LISTENOVERFLOWS`, with
    /// ListenDrops the next counter), 0 when BTF does not place them so: the `syn` probe then
    /// tells a drop by the listener's `sk_drops`, which other CPUs move too.
    pub mib_listen_overflows: u32,
    /// `net.mib.net_statistics`: a namespace's per-CPU TcpExt counters.
    pub net_mib: u32,
    /// `bpf_array.pptrs`: a per-CPU array's per-CPU pointers, from which a program learns its
    /// CPU's offset into the per-CPU areas.
    pub array_pptrs: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Offsets {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for HookLayout {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for crate::Event {}
