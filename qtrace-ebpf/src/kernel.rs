//! Reading kernel memory through the offsets user space resolved from BTF.

use aya_ebpf::{helpers::bpf_probe_read_kernel, Global};
use qtrace_common::{
    kernel::SOCK_KEY_HEAD,
    listener::{AF_INET, AF_INET6},
    HookLayout, ListenerKey, Offsets, SelfStat,
};

use crate::account::self_stat;

#[unsafe(no_mangle)]
static QT_OFFSETS: Global<Offsets> = Global::new(unsafe { core::mem::zeroed() });

#[unsafe(no_mangle)]
static QT_HOOKS: Global<HookLayout> = Global::new(unsafe { core::mem::zeroed() });

#[inline(always)]
pub fn offsets() -> Offsets {
    QT_OFFSETS.load()
}

#[inline(always)]
pub fn hooks() -> HookLayout {
    QT_HOOKS.load()
}

/// Reads a `T` at `base + off`; a failed read is counted, never silently ignored.
#[inline(always)]
pub fn read<T: Copy>(base: *const u8, off: u32) -> Result<T, ()> {
    match unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) } {
        Ok(v) => Ok(v),
        Err(_) => {
            self_stat(SelfStat::ReadFailed);
            Err(())
        }
    }
}

/// The listener key of a listening socket (`struct sock *`).
#[inline(always)]
pub fn listener_key(sk: *const u8) -> Result<ListenerKey, ()> {
    key_with_port_of(sk, sk)
}

/// The key of listener `sk` for an event about its request `req`. The port comes from the
/// request (`ir_num`, in the same `sock_common` layout): close() zeroes the listener's while a
/// SYN-ACK retransmit or a final ACK of the request may still be under way.
#[inline(always)]
pub fn listener_key_of_request(sk: *const u8, req: *const u8) -> Result<ListenerKey, ()> {
    key_with_port_of(sk, req)
}

/// The head of a `struct sock_common`, copied in one helper call: each
/// `bpf_probe_read_kernel` has a fixed cost, and the kernel copies 8 bytes a step only when
/// both ends are 8-byte aligned (byte by byte otherwise), hence the alignment.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct SockHead([u8; SOCK_KEY_HEAD as usize]);

impl SockHead {
    #[inline(always)]
    fn read(sk: *const u8) -> Result<Self, ()> {
        read(sk, 0)
    }

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

#[inline(always)]
fn key_with_port_of(sk: *const u8, port_of: *const u8) -> Result<ListenerKey, ()> {
    let o = offsets();
    let head = SockHead::read(sk)?;
    let family: u16 = head.get(o.skc_family)?;
    let port: u16 = if port_of == sk {
        head.get(o.skc_num)?
    } else {
        read(port_of, o.skc_num)?
    };
    let net: *const u8 = head.get(o.skc_net)?;
    let netns: u32 = read(net, o.net_ns_inum)?;
    let addr = if family == AF_INET6 {
        head.get(o.skc_v6_rcv_saddr)?
    } else {
        words_to_addr([head.get(o.skc_rcv_saddr)?, 0, 0, 0])
    };
    Ok(ListenerKey {
        netns,
        family,
        port,
        addr,
    })
}

/// An address assembled from 32-bit words: zeroing part of a byte array instead compiles to
/// a call to a byte-by-byte memset.
#[inline(always)]
fn words_to_addr(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, any bit pattern is valid.
    unsafe { core::mem::transmute(words) }
}

/// A per-netns `u8` sysctl of the socket's namespace (`net->ipv4.sysctl_*`).
#[inline(always)]
pub fn net_sysctl_u8(sk: *const u8, off: u32) -> Result<u8, ()> {
    let net: *const u8 = read(sk, offsets().skc_net)?;
    read(net, off)
}

/// The listener's queues at this moment.
#[derive(Clone, Copy, Default)]
pub struct Queues {
    pub acceptq_len: u32,
    pub acceptq_max: u32,
    pub synq_len: u32,
}

impl Queues {
    #[inline(always)]
    pub fn read(sk: *const u8) -> Result<Queues, ()> {
        let o = offsets();
        Ok(Queues {
            acceptq_len: read(sk, o.sk_ack_backlog)?,
            acceptq_max: read(sk, o.sk_max_ack_backlog)?,
            synq_len: read(sk, o.icsk_synq_len)?,
        })
    }

    /// `sk_acceptq_is_full()`.
    #[inline(always)]
    pub fn acceptq_full(&self) -> bool {
        self.acceptq_len > self.acceptq_max
    }

    /// `inet_csk_reqsk_queue_is_full()`: the SYN queue is bounded by the same backlog.
    #[inline(always)]
    pub fn synq_full(&self) -> bool {
        self.synq_len >= self.acceptq_max
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
    pub fn of_request(req: *const u8, listener_family: u16) -> Result<Remote, ()> {
        let o = offsets();
        let family: u16 = read(req, o.skc_family)?;
        let port: u16 = read(req, o.skc_dport)?;
        let addr = if family == AF_INET {
            put_v4(listener_family, read(req, o.skc_daddr)?)
        } else {
            read(req, o.skc_v6_daddr)?
        };
        Ok(Remote {
            addr,
            port: u16::from_be(port),
        })
    }

    /// The sender of a received packet (`struct sk_buff *` with its headers set).
    #[inline(always)]
    pub fn of_skb(skb: *const u8, listener_family: u16) -> Result<Remote, ()> {
        let o = offsets();
        let (head, ip) = ip_header(skb)?;
        let th: u16 = read(skb, o.skb_transport_header)?;
        let addr = if is_ipv4(ip)? {
            put_v4(listener_family, read(ip, 12)?)
        } else {
            read(ip, 8)?
        };
        let port: u16 = read(head.wrapping_add(th as usize), 0)?;
        Ok(Remote {
            addr,
            port: u16::from_be(port),
        })
    }
}

/// A received packet's buffer head and its IP header.
#[inline(always)]
fn ip_header(skb: *const u8) -> Result<(*const u8, *const u8), ()> {
    let o = offsets();
    let head: *const u8 = read(skb, o.skb_head)?;
    let nh: u16 = read(skb, o.skb_network_header)?;
    Ok((head, head.wrapping_add(nh as usize)))
}

#[inline(always)]
fn is_ipv4(ip: *const u8) -> Result<bool, ()> {
    Ok(read::<u8>(ip, 0)? >> 4 == 4)
}

/// Whether a received packet (`struct sk_buff *` with its headers set) is IPv4.
#[inline(always)]
pub fn skb_is_ipv4(skb: *const u8) -> Result<bool, ()> {
    is_ipv4(ip_header(skb)?.1)
}
