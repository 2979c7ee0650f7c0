//! Reading kernel memory through the offsets user space resolved from BTF.

use aya_ebpf::{helpers::bpf_probe_read_kernel, Global};
use qtrace_common::{
    kernel::SOCK_KEY_HEAD,
    listener::{AF_INET, AF_INET6, SOCK_ADDR, SOCK_INODE},
    HookLayout, ListenerKey, Offsets, SelfStat,
};

use crate::self_stats::self_stat;

#[unsafe(no_mangle)]
pub(crate) static QT_OFFSETS: Global<Offsets> = Global::new(unsafe { core::mem::zeroed() });

#[unsafe(no_mangle)]
pub(crate) static QT_HOOKS: Global<HookLayout> = Global::new(unsafe { core::mem::zeroed() });

/// One field of a load-time global, read alone. `Global::load` is a volatile read of the
/// whole struct, which the compiler must carry out in full at every use: twenty loads for
/// `Offsets`, all but one discarded, several times per program run.
macro_rules! global_field {
    ($global:path, $ty:ty, $field:ident) => {
        // SAFETY: `Global` is repr(transparent) over a value the loader initialised.
        unsafe {
            core::ptr::read_volatile(core::ptr::addr_of!(
                (*(core::ptr::addr_of!($global) as *const $ty)).$field
            ))
        }
    };
}

/// A field of the struct offsets user space resolved from the kernel's BTF.
macro_rules! offset {
    ($field:ident) => {
        $crate::kernel::global_field!($crate::kernel::QT_OFFSETS, qtrace_common::Offsets, $field)
    };
}

/// A field of the hook layout user space resolved from the kernel's BTF.
macro_rules! hook {
    ($field:ident) => {
        $crate::kernel::global_field!($crate::kernel::QT_HOOKS, qtrace_common::HookLayout, $field)
    };
}
pub(crate) use {global_field, hook, offset};

/// How a program reads kernel memory.
///
/// fentry/fexit and `tp_btf` programs get their arguments as BTF-typed pointers, which the
/// verifier lets them load from directly: one instruction each, checked against the pointed-to
/// type at load (the offsets are constants to it, read from a frozen read-only map), with a
/// fault caught by the JIT and read as zero. kprobe arguments, and addresses kept in maps, are
/// plain integers to it and go through `bpf_probe_read_kernel`, a helper call of tens of
/// nanoseconds. Functions generic over `Mem` compile once per kind of program.
pub trait Mem: Copy {
    /// Pointers handed to this program's functions are BTF-typed.
    const TYPED: bool;

    /// The `T` at `base + off`. `T` must lie inside one member of `base`'s type when typed
    /// (the verifier rejects a load across members).
    #[inline(always)]
    fn read<T: Copy>(self, base: *const u8, off: u32) -> Result<T, ()> {
        if Self::TYPED {
            // Volatile: the compiler must neither widen nor merge it with its neighbours.
            Ok(unsafe { core::ptr::read_volatile(base.wrapping_add(off as usize).cast::<T>()) })
        } else {
            probe_read(base, off)
        }
    }
}

/// Reads through BTF-typed pointers (fentry, fexit, tp_btf).
#[derive(Clone, Copy)]
pub struct Typed;

impl Mem for Typed {
    const TYPED: bool = true;
}

/// Reads through `bpf_probe_read_kernel` (kprobes, addresses kept in maps).
#[derive(Clone, Copy)]
pub struct Untyped;

impl Mem for Untyped {
    const TYPED: bool = false;
}

/// Reads a `T` at `base + off` through the helper; a failed read is counted, never silently
/// ignored.
#[inline(always)]
pub fn probe_read<T: Copy>(base: *const u8, off: u32) -> Result<T, ()> {
    match unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) } {
        Ok(v) => Ok(v),
        Err(_) => {
            self_stat(SelfStat::ReadFailed);
            Err(())
        }
    }
}

/// A listening socket: its map key, read with one load, and what its full key is read from
/// when needed (the first count on a CPU, an event).
pub struct Listener<M: Mem> {
    /// The counter maps' key: [`ListenerKey::sock`], or [`SOCK_ADDR`] | the socket's address
    /// when it has neither a cookie nor an inode (see [`sock_id`]).
    pub id: u64,
    sk: *const u8,
    /// The socket whose `skc_num` is the port: the listener, or its request (see
    /// [`listener_of_request`]).
    port_of: *const u8,
    /// How the listener was read, for what is read of it next.
    pub m: M,
}

impl<M: Mem> Listener<M> {
    /// A per-netns `u8` sysctl of the listener's namespace (`net->ipv4.sysctl_*`).
    #[inline(always)]
    pub fn sysctl_u8(&self, off: u32) -> Result<u8, ()> {
        net_sysctl_u8(self.m, self.sk, off)
    }

    /// The uid that created the socket (`sk_uid`): read only when its counters are first
    /// made, to pick the map partition.
    #[inline(always)]
    pub fn uid(&self) -> Result<u32, ()> {
        self.m.read(self.sk, offset!(sk_uid))
    }

    /// `AF_INET` or `AF_INET6`.
    #[inline(always)]
    pub fn family(&self) -> Result<u16, ()> {
        self.m.read(self.sk, offset!(skc_family))
    }

    /// The listener's full key (namespace, address, port, socket): read only when a CPU first
    /// counts for it, and for its counters' map entry to carry.
    #[inline(always)]
    pub fn key(&self) -> Result<ListenerKey, ()> {
        let (m, sk) = (self.m, self.sk);
        let fields = SockFields::of(m, sk)?;
        let family: u16 = fields.get(offset!(skc_family))?;
        let port: u16 = if self.port_of == sk {
            fields.get(offset!(skc_num))?
        } else {
            m.read(self.port_of, offset!(skc_num))?
        };
        let net: *const u8 = fields.get(offset!(skc_net))?;
        let netns: u32 = m.read(net, offset!(net_ns_inum))?;
        let addr = if family == AF_INET6 {
            // As words: a typed load must not cross the address's inner arrays' end, and the
            // compiler may split a 16-byte load any way it likes.
            words_to_addr(fields.get(offset!(skc_v6_rcv_saddr))?)
        } else {
            words_to_addr([fields.get(offset!(skc_rcv_saddr))?, 0, 0, 0])
        };
        Ok(ListenerKey {
            netns,
            family,
            port,
            addr,
            sock: if self.id & SOCK_ADDR != 0 { 0 } else { self.id },
        })
    }
}

/// A listening socket (`struct sock *`).
#[inline(always)]
pub fn listener<M: Mem>(m: M, sk: *const u8) -> Result<Listener<M>, ()> {
    listener_with_port_of(m, sk, sk)
}

/// Listener `sk`, for an event about its request `req`. The port comes from the request
/// (`ir_num`, in the same `sock_common` layout): close() zeroes the listener's while a
/// SYN-ACK retransmit or a final ACK of the request may still be under way.
#[inline(always)]
pub fn listener_of_request<M: Mem>(m: M, sk: *const u8, req: *const u8) -> Result<Listener<M>, ()> {
    listener_with_port_of(m, sk, req)
}

#[inline(always)]
fn listener_with_port_of<M: Mem>(
    m: M,
    sk: *const u8,
    port_of: *const u8,
) -> Result<Listener<M>, ()> {
    Ok(Listener {
        id: sock_id(m, sk, port_of)?,
        sk,
        port_of,
        m,
    })
}

/// The socket's cookie, or, for a socket the kernel has not given one yet, [`SOCK_INODE`] |
/// its inode number, or, for one that has no inode either (closing before qtrace's first dump
/// of it), [`SOCK_ADDR`] | its namespace and port. One 8-byte load on the common path: the
/// counter maps are keyed by it, so a count hashes 8 bytes and reads nothing else of the
/// socket. (Not the socket's address in the last case: the verifier forbids turning a typed
/// pointer into a number.)
#[inline(always)]
fn sock_id<M: Mem>(m: M, sk: *const u8, port_of: *const u8) -> Result<u64, ()> {
    let cookie: u64 = m.read(sk, offset!(skc_cookie))?;
    if cookie != 0 {
        return Ok(cookie);
    }
    if let Ok(inode) = sock_inode(m, sk) {
        return Ok(inode);
    }
    let net: *const u8 = m.read(sk, offset!(skc_net))?;
    let netns: u32 = m.read(net, offset!(net_ns_inum))?;
    let port: u16 = m.read(port_of, offset!(skc_num))?;
    Ok(SOCK_ADDR | (netns as u64) << 16 | port as u64)
}

/// The head of a `struct sock_common`, copied in one helper call: each
/// `bpf_probe_read_kernel` has a fixed cost, and the kernel copies 8 bytes a step only when
/// both ends are 8-byte aligned (byte by byte otherwise), hence the alignment.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct SockHead([u8; SOCK_KEY_HEAD as usize]);

impl SockHead {
    /// The `T` at `off` (the offsets are constants to the verifier: a frozen read-only map).
    #[inline(always)]
    fn get<T: Copy>(&self, off: u32) -> Result<T, ()> {
        let off = off as usize;
        if off + size_of::<T>() > self.0.len() {
            return Err(());
        }
        // SAFETY: in bounds, checked above; any bit pattern is a valid T here.
        Ok(unsafe { core::ptr::read_unaligned(self.0.as_ptr().add(off).cast::<T>()) })
    }
}

/// A socket's key fields: loaded one by one through a typed pointer, or from one copy of the
/// head through the helper.
enum SockFields {
    Typed(*const u8),
    Copied(SockHead),
}

impl SockFields {
    #[inline(always)]
    fn of<M: Mem>(m: M, sk: *const u8) -> Result<Self, ()> {
        Ok(if M::TYPED {
            SockFields::Typed(sk)
        } else {
            SockFields::Copied(m.read(sk, 0)?)
        })
    }

    #[inline(always)]
    fn get<T: Copy>(&self, off: u32) -> Result<T, ()> {
        match self {
            SockFields::Typed(sk) => Typed.read(*sk, off),
            SockFields::Copied(head) => head.get(off),
        }
    }
}

/// [`SOCK_INODE`] | the socket's inode number, for a socket the kernel has not given a cookie
/// yet: only a listener's first events before qtrace's next sock_diag dump (which makes
/// cookies) take this path. The inode lies beyond `struct socket`, so the helper reads it.
#[inline(always)]
fn sock_inode<M: Mem>(m: M, sk: *const u8) -> Result<u64, ()> {
    let off = offset!(socket_ino);
    if off == 0 {
        return Err(());
    }
    let socket: *const u8 = m.read(sk, offset!(sk_socket))?;
    if socket.is_null() {
        return Err(());
    }
    let ino: u64 = probe_read(socket, off)?;
    Ok(SOCK_INODE | ino)
}

/// A slot index's bits from a key whose own low bits say little (socket addresses, slab objects
/// a few KiB apart; namespace inode numbers): Fibonacci hashing, the product's upper half, to
/// be masked to a power-of-two table. The tests that aim at a slot compute the same.
#[inline(always)]
pub fn slot_hash(key: u64) -> u32 {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// Namespace `net`'s cookie (see `Offsets::net_cookie`); 0 where this kernel has none, or
/// has not made it (before 5.12, only when something asked).
#[inline(always)]
pub fn netns_cookie<M: Mem>(m: M, net: *const u8) -> u64 {
    let off = offset!(net_cookie);
    if off == 0 {
        return 0;
    }
    m.read(net, off).unwrap_or(0)
}

/// An address assembled from 32-bit words: zeroing part of a byte array instead compiles to
/// a call to a byte-by-byte memset.
#[inline(always)]
pub fn words_to_addr(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, any bit pattern is valid.
    unsafe { core::mem::transmute(words) }
}

/// A per-netns `u8` sysctl of the socket's namespace (`net->ipv4.sysctl_*`), before its
/// listener key is known (see [`Listener::sysctl_u8`]).
#[inline(always)]
pub fn net_sysctl_u8<M: Mem>(m: M, sk: *const u8, off: u32) -> Result<u8, ()> {
    let net: *const u8 = m.read(sk, offset!(skc_net))?;
    m.read(net, off)
}

/// A listener's accept queue at this moment: all a drop's accounting needs.
#[derive(Clone, Copy, Default)]
pub struct AcceptQueue {
    pub len: u32,
    pub max: u32,
}

impl AcceptQueue {
    #[inline(always)]
    pub fn read<M: Mem>(m: M, sk: *const u8) -> Result<AcceptQueue, ()> {
        // Adjacent u32s in every kernel qtrace knows: one helper call when the helper reads
        // (each has a fixed cost). Typed loads are one member each.
        let [len, max] = if !M::TYPED && offset!(sk_max_ack_backlog) == offset!(sk_ack_backlog) + 4
        {
            m.read::<[u32; 2]>(sk, offset!(sk_ack_backlog))?
        } else {
            [
                m.read(sk, offset!(sk_ack_backlog))?,
                m.read(sk, offset!(sk_max_ack_backlog))?,
            ]
        };
        Ok(AcceptQueue { len, max })
    }

    /// `sk_acceptq_is_full()`.
    #[inline(always)]
    pub fn full(&self) -> bool {
        self.len > self.max
    }

    /// With the SYN queue's length, for an event (0 if unreadable, counted as a failed read).
    #[inline(always)]
    pub fn with_synq(self, sk: *const u8) -> Queues {
        Queues {
            acceptq: self,
            synq_len: synq_len(sk).unwrap_or(0),
        }
    }
}

/// `icsk_accept_queue.qlen`. Always through the helper: it lies beyond `struct sock`, the
/// type every hooked function declares its listener as, so a typed load is rejected.
#[inline(always)]
fn synq_len(sk: *const u8) -> Result<u32, ()> {
    probe_read(sk, offset!(icsk_synq_len))
}

/// The listener's queues at this moment.
#[derive(Clone, Copy, Default)]
pub struct Queues {
    pub acceptq: AcceptQueue,
    pub synq_len: u32,
}

impl Queues {
    #[inline(always)]
    pub fn read<M: Mem>(m: M, sk: *const u8) -> Result<Queues, ()> {
        Ok(Queues {
            acceptq: AcceptQueue::read(m, sk)?,
            synq_len: synq_len(sk)?,
        })
    }

    /// `inet_csk_reqsk_queue_is_full()`: the SYN queue is bounded by the same backlog.
    #[inline(always)]
    pub fn synq_full(&self) -> bool {
        self.synq_len >= self.acceptq.max
    }
}

/// A remote endpoint in the listener's address family (IPv4 peers of an IPv6 listener are
/// written v4-mapped).
#[derive(Clone, Copy, Default)]
pub struct Remote {
    pub addr: [u8; 16],
    pub port: u16,
}

#[inline(always)]
fn put_v4(listener_family: u16, v4: u32) -> [u8; 16] {
    if listener_family == AF_INET6 {
        // ::ffff:a.b.c.d
        words_to_addr([0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4])
    } else {
        words_to_addr([v4, 0, 0, 0])
    }
}

impl Remote {
    /// The peer of a request socket (`struct request_sock *`).
    #[inline(always)]
    pub fn of_request<M: Mem>(m: M, req: *const u8, listener_family: u16) -> Result<Remote, ()> {
        let family: u16 = m.read(req, offset!(skc_family))?;
        let port: u16 = m.read(req, offset!(skc_dport))?;
        let addr = if family == AF_INET {
            put_v4(listener_family, m.read(req, offset!(skc_daddr))?)
        } else {
            words_to_addr(m.read(req, offset!(skc_v6_daddr))?)
        };
        Ok(Remote {
            addr,
            port: u16::from_be(port),
        })
    }

    /// The sender of a received packet (`struct sk_buff *` with its headers set). The packet's
    /// bytes go through the helper either way: `skb->head` is a byte pointer, not a typed one.
    #[inline(always)]
    pub fn of_skb<M: Mem>(m: M, skb: *const u8, listener_family: u16) -> Result<Remote, ()> {
        let (head, ip) = ip_header(m, skb)?;
        let th: u16 = m.read(skb, offset!(skb_transport_header))?;
        let addr = if is_ipv4(ip)? {
            put_v4(listener_family, probe_read(ip, 12)?)
        } else {
            probe_read(ip, 8)?
        };
        let port: u16 = probe_read(head.wrapping_add(th as usize), 0)?;
        Ok(Remote {
            addr,
            port: u16::from_be(port),
        })
    }
}

/// A received packet's buffer head and its IP header.
#[inline(always)]
fn ip_header<M: Mem>(m: M, skb: *const u8) -> Result<(*const u8, *const u8), ()> {
    let head: *const u8 = m.read(skb, offset!(skb_head))?;
    let nh: u16 = m.read(skb, offset!(skb_network_header))?;
    Ok((head, head.wrapping_add(nh as usize)))
}

#[inline(always)]
fn is_ipv4(ip: *const u8) -> Result<bool, ()> {
    Ok(probe_read::<u8>(ip, 0)? >> 4 == 4)
}

/// Whether a received packet (`struct sk_buff *` with its headers set) is IPv4.
#[inline(always)]
pub fn skb_is_ipv4<M: Mem>(m: M, skb: *const u8) -> Result<bool, ()> {
    is_ipv4(ip_header(m, skb)?.1)
}
