//! The client side of the handshake: connect() failures by reason and SYN retransmits, per
//! (network namespace, owning process, destination). Two tracepoints, no per-packet cost:
//!
//! - `sock:inet_sock_set_state(sk, oldstate, newstate)`, one program for every state change:
//!   - CLOSE→SYN_SENT happens inside connect() (`tcp_v4/v6_connect`, just before the local
//!     port is chosen), so the current task is the owner: kept per socket with the time
//!     (`QT_ACTIVE_OPENS`, where the port search's fexit finds its start; at the kprobe tier
//!     the thread's slot too, see `port_search.rs`).
//!   - SYN_SENT→CLOSE is a failed handshake. The kernel sets `sk_err` before that transition
//!     (`tcp_reset`: ECONNREFUSED; `tcp_write_err`: ETIMEDOUT, or the soft ICMP error;
//!     `tcp_v4_err`: the ICMP's). With no error, a socket that never got a local port
//!     (`inet_sport` still 0) failed in `inet_hash_connect` (EADDRNOTAVAIL: `tcp_v4/v6_connect`'s
//!     failure path closes it before clearing the destination); one that got a port was closed
//!     by its owner mid-handshake (close() or shutdown() in SYN_SENT: `tcp_close_state`).
//!   - Leaving ESTABLISHED ends the record; ESTABLISHED→CLOSE with ECONNRESET before a byte
//!     arrived is `reset`: the handshake an SRE calls reset is one the server never completed
//!     (with `net.ipv4.tcp_abort_on_overflow=1` and a full accept queue the client is
//!     ESTABLISHED once it has the SYN-ACK, and the server answers its final ACK or first data
//!     with a reset). In SYN_SENT the kernel turns a reset into ECONNREFUSED (`tcp_reset`), so
//!     ECONNRESET never ends a handshake the client sees under way. `tcp_sock.bytes_received`
//!     still 0 tells it from a reset later in the connection, and an application's own abort
//!     (`tcp_disconnect`) sets its error only after the state change. The record also tells an
//!     active open from a server's child, which never passes SYN_SENT: a child reset before
//!     sending data is never counted (a leftover record in a child's slot is cleared as the
//!     child is cloned, LISTEN→SYN_RECV).
//! - `tcp:tcp_retransmit_skb(sk, skb, …)` in SYN_SENT: a SYN retransmit.
//!
//! Cost per connection: one record written at connect(), cleared as the socket leaves
//! ESTABLISHED (for the server's child, a look at its slot as it is cloned; a lookup first for
//! a reset); every other state change returns after comparing two integers. The record is
//! kept in the socket's slot of a direct-mapped array (`QT_OPEN_SLOTS`, a few instructions
//! each way) when the slot is free, else in a hash (`QT_ACTIVE_OPENS`, `--max-client-sockets`): exact either way,
//! and the hash is not even looked at while it holds nothing. The record lives as long as the
//! socket is connecting or established; past the hash's bound a failure counts unattributed
//! (pid 0), a reset not at all, each counted in `SelfStat::ActiveOpensMapFull`.

use core::{
    intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering::Relaxed},
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_task_btf, bpf_ktime_get_ns,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuHashMap},
    programs::BtfTracePointContext,
    Global,
};
use qtrace_common::{
    listener::AF_INET6, vocabulary::ECONNRESET, ClientCounter, ClientCounters, ClientKey,
    ClientOffsets, ConnectFailure, ConnectOwner, Event, EventKind, ListenerKey, SelfStat,
};

use crate::{
    account::{submit, take},
    kernel::{netns_cookie, offset, probe_read, slot_hash, words_to_addr, Mem, Typed, Untyped},
    port_search,
    self_stats::self_stat,
};

#[unsafe(no_mangle)]
pub(crate) static QT_CLIENT_OFFSETS: Global<ClientOffsets> =
    Global::new(unsafe { core::mem::zeroed() });

/// A field of the client offsets user space resolved from the kernel's BTF.
macro_rules! client_offset {
    ($field:ident) => {
        $crate::kernel::global_field!(
            $crate::client::QT_CLIENT_OFFSETS,
            qtrace_common::ClientOffsets,
            $field
        )
    };
}

/// Sized by user space (`--max-client-destinations`) before load.
#[map]
static QT_CLIENTS: PerCpuHashMap<ClientKey, ClientCounters> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// Active opens, from connect() until they leave SYN_SENT for anything but ESTABLISHED or
/// leave ESTABLISHED → who called connect(), and when: those whose slot in `QT_OPEN_SLOTS` was
/// taken by another live socket, and every one on kernels without BPF's compare-and-swap
/// (before 5.12, `qt_client_state_untyped`). Sized by user space before load
/// (`--max-client-sockets`). Keyed by the socket's address: a socket always passes a state
/// change before it is freed, which deletes its record, so a reused address finds none.
/// Preallocated: a map that allocates as used (`BPF_F_NO_PREALLOC`) costs the same per insert
/// (BENCHMARKS.md 1b, session 10) but takes its elements from per-CPU caches refilled
/// asynchronously, so an insert in a burst can fail with ENOMEM and lose an owner. With it, a
/// test that counts every timed-out connect() for its process failed once among parallel
/// tests (the cause not confirmed; that is the one way such an insert fails). A state
/// change the kernel skips the program for (the same program already running on that CPU: a
/// recursion miss, exported by user space) leaves its record behind until the address is
/// reused.
#[map]
static QT_ACTIVE_OPENS: HashMap<u64, ConnectOwner> = HashMap::with_max_entries(65536, 0);

/// A record in the socket's own slot of [`QT_OPEN_SLOTS`].
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct OpenSlot {
    /// The socket the slot's record is for, 0 when free. Claimed with a compare-and-swap (two
    /// CPUs may connect sockets of the same slot at once), cleared by that socket alone: its
    /// state changes are serialized by the kernel, and no other socket writes a slot it holds.
    sk: u64,
    owner: ConnectOwner,
}

/// The direct-mapped front of `QT_ACTIVE_OPENS`: a socket's record goes into the slot its
/// address hashes to when that slot is free, where writing, finding and clearing it are a few
/// inlined instructions against a hash's helper calls, bucket lock and element free list (the
/// dearest part of the client side: BENCHMARKS.md, session 12). A busy slot (another live
/// socket's) sends the record to the hash: nothing is lost to a collision. Sized by user space
/// (`--client-slots`, 32,768 of 40 bytes by default); with more connecting or established
/// client sockets than slots, the rest go to the hash, which they would all use without this.
#[map]
static QT_OPEN_SLOTS: Array<OpenSlot> = Array::with_max_entries(1, 0);

/// The number of `QT_OPEN_SLOTS` less one, a power of two less one (set by user space).
#[unsafe(no_mangle)]
static QT_OPEN_SLOT_MASK: Global<u32> = Global::new(0);

/// Records put into `QT_ACTIVE_OPENS` minus those deleted from it, never fewer than it holds
/// (an insert that replaces a leftover counts too): while 0, a socket not in its slot has no
/// record, and the hash is not looked at.
#[map]
static QT_OPENS_SPILLED: Array<u64> = Array::with_max_entries(1, 0);

// include/net/tcp_states.h, the same on every kernel.
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
const IPPROTO_TCP: u16 = 6;
// include/uapi/linux/errqueue.h.
const SO_EE_ORIGIN_ICMP: u8 = 2;
const SO_EE_ORIGIN_ICMP6: u8 = 3;

/// The calling process: its tgid and its group leader's name (the thread's own name would
/// make one series per worker thread). Typed (`bpf_get_current_task_btf`, Linux 5.11): two
/// loads; untyped (5.10): two reads through the helper.
#[inline(always)]
fn current_owner<M: Mem>(m: M) -> ConnectOwner {
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let task = if M::TYPED {
        unsafe { bpf_get_current_task_btf() as *const u8 }
    } else {
        unsafe { bpf_get_current_task() as *const u8 }
    };
    let mut owner = ConnectOwner {
        connect_ns: unsafe { bpf_ktime_get_ns() },
        comm: [0; 16],
        pid,
    };
    // As two words, loaded and stored: a byte array is copied a byte at a time.
    if let Ok(words) = m
        .read::<*const u8>(task, client_offset!(task_group_leader))
        .and_then(|leader| m.read::<[u64; 2]>(leader, client_offset!(task_comm)))
    {
        // SAFETY: `comm` follows a u64 in a repr(C) struct, so it is 8-byte aligned.
        unsafe {
            core::ptr::addr_of_mut!(owner.comm)
                .cast::<[u64; 2]>()
                .write(words)
        };
    }
    owner
}

/// The destination of connecting socket `sk`, attributed to `owner`.
#[inline(always)]
fn key_of(sk: *const u8, owner: ConnectOwner) -> Result<ClientKey, ()> {
    let family: u16 = Typed.read(sk, offset!(skc_family))?;
    let net: *const u8 = Typed.read(sk, offset!(skc_net))?;
    let netns: u32 = Typed.read(net, offset!(net_ns_inum))?;
    let netns_cookie = netns_cookie(Typed, net);
    let dport: u16 = Typed.read(sk, offset!(skc_dport))?;
    let daddr = if family == AF_INET6 {
        words_to_addr(Typed.read(sk, offset!(skc_v6_daddr))?)
    } else {
        words_to_addr([Typed.read(sk, offset!(skc_daddr))?, 0, 0, 0])
    };
    Ok(ClientKey {
        netns,
        pid: owner.pid,
        comm: owner.comm,
        daddr,
        family,
        dport: u16::from_be(dport),
        _pad: 0,
        netns_cookie,
    })
}

/// Counts `counter` for `sk`'s destination, creating its entry on first use, and emits its
/// event unless the destination's rate limit (as a listener's: `QT_EVENT_RATE` a second per
/// CPU) or a full ring buffer stops it, either way counted.
#[inline(always)]
fn count(
    sk: *const u8,
    owner: ConnectOwner,
    counter: ClientCounter,
    kind: EventKind,
) -> Result<(), ()> {
    let key = key_of(sk, owner)?;
    let c = match QT_CLIENTS.get_ptr_mut(&key) {
        Some(c) => c,
        None => {
            // EEXIST from a racing CPU is fine: the lookup below finds its entry.
            let _ = QT_CLIENTS.insert(&key, &ClientCounters::default(), BPF_NOEXIST as u64);
            match QT_CLIENTS.get_ptr_mut(&key) {
                Some(c) => c,
                None => {
                    self_stat(SelfStat::ClientMapFull);
                    return Err(());
                }
            }
        }
    };
    let c = unsafe { &mut *c };
    c.counts[counter as usize] += 1;
    let now = unsafe { bpf_ktime_get_ns() };
    let limited = &mut c.counts[ClientCounter::EventsRateLimited as usize];
    if !take(&mut c.rl_tokens, &mut c.rl_refill_ns, limited, now) {
        return Ok(());
    }
    // Read only for an event that goes out: the connecting socket's own address and port.
    let sport: u16 = probe_read(sk, client_offset!(inet_sport)).unwrap_or(0);
    let laddr = if key.family == AF_INET6 {
        words_to_addr(Typed.read(sk, offset!(skc_v6_rcv_saddr))?)
    } else {
        words_to_addr([Typed.read(sk, offset!(skc_rcv_saddr))?, 0, 0, 0])
    };
    submit(Event {
        ts_ns: now,
        // The connecting socket's own endpoint, in the listener key's place.
        listener: ListenerKey {
            netns: key.netns,
            family: key.family,
            port: u16::from_be(sport),
            addr: laddr,
            ..ListenerKey::default()
        },
        raddr: key.daddr,
        rport: key.dport,
        kind: kind as u8,
        pid: key.pid,
        ..Event::default()
    });
    Ok(())
}

/// Socket `sk` as a plain number, which its records are keyed by: its distance from this map.
/// The verifier allows no arithmetic on a typed socket pointer (the slot's hash multiplies it)
/// but makes the difference of two pointers a number for programs trusted with kernel addresses
/// (CAP_PERFMON), and the map's address stays put while the programs run.
#[inline(always)]
pub(crate) fn id_of(sk: *const u8) -> u64 {
    (sk as u64).wrapping_sub(addr_of!(QT_OPEN_SLOTS) as u64)
}

#[inline(always)]
fn slot_of(sk: u64) -> Option<*mut OpenSlot> {
    QT_OPEN_SLOTS.get_ptr_mut(slot_hash(sk) & QT_OPEN_SLOT_MASK.load())
}

/// Adds `n` (wrapping: `u64::MAX` takes one) to the count of records in the hash.
#[inline(always)]
fn spill(n: u64) {
    if let Some(p) = QT_OPENS_SPILLED.get_ptr_mut(0) {
        // SAFETY: a map value, changed in place by a BPF atomic add (its result unused: the
        // plain `lock xadd` every kernel verifies).
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(p, n) };
    }
}

/// Whether the hash may hold records (true if that cannot be told).
#[inline(always)]
fn any_spilled() -> bool {
    QT_OPENS_SPILLED
        .get_ptr(0)
        .is_none_or(|p| unsafe { read_volatile(p) } != 0)
}

/// Keeps `owner` as `sk`'s record: in its slot when `slots` (the compare-and-swap verifies
/// only on 5.12+) and the slot is free, else in the hash.
#[inline(always)]
fn remember(sk: u64, owner: &ConnectOwner, slots: bool) {
    if slots {
        if let Some(slot) = slot_of(sk) {
            // SAFETY: `slot` points into the map's value. A slot holding this very address is
            // a leftover (a skipped state change of an earlier socket there): this socket's now.
            let (held, _) = unsafe {
                atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(addr_of_mut!((*slot).sk), 0, sk)
            };
            let mine = held == 0 || held == sk;
            if mine {
                unsafe { addr_of_mut!((*slot).owner).write(*owner) };
                // A leftover of this address in the hash would outlive this record.
                if any_spilled() {
                    unspill(sk);
                }
                return;
            }
        }
    }
    if QT_ACTIVE_OPENS.insert(&sk, owner, 0).is_err() {
        self_stat(SelfStat::ActiveOpensMapFull);
    } else {
        spill(1);
    }
}

/// Deletes `sk`'s record from the hash, if it has one there.
#[inline(always)]
fn unspill(sk: u64) {
    if QT_ACTIVE_OPENS.remove(&sk).is_ok() {
        spill(u64::MAX);
    }
}

// The records come back initialized whether found or not (pid 0 when not): an `Option` of one
// leaves its payload undefined when `None`, and LLVM then copies uninitialized registers,
// which the verifier rejects.

/// `sk`'s record (pid 0 when it has none), and whether it has one.
#[inline(always)]
pub(crate) fn recall(sk: u64) -> (bool, ConnectOwner) {
    let mut owner = ConnectOwner::default();
    if let Some(slot) = slot_of(sk) {
        // SAFETY: `slot` points into the map's value.
        if unsafe { read_volatile(addr_of_mut!((*slot).sk)) } == sk {
            owner = unsafe { (*slot).owner };
            return (true, owner);
        }
    }
    if !any_spilled() {
        return (false, owner);
    }
    match unsafe { QT_ACTIVE_OPENS.get(&sk) } {
        Some(o) => (true, *o),
        None => (false, owner),
    }
}

/// Ends `sk`'s record in its slot; false when the slot holds none of `sk`'s.
#[inline(always)]
fn clear_slot(sk: u64) -> bool {
    let Some(slot) = slot_of(sk) else {
        return false;
    };
    // SAFETY: `slot` points into the map's value; only `sk` clears a slot it holds.
    let mine = unsafe { read_volatile(addr_of_mut!((*slot).sk)) } == sk;
    if mine {
        unsafe { write_volatile(addr_of_mut!((*slot).sk), 0) };
    }
    mine
}

/// Ends `sk`'s record.
#[inline(always)]
fn forget(sk: u64) {
    if !clear_slot(sk) && any_spilled() {
        unspill(sk);
    }
}

/// Ends `sk`'s record and returns it, as [`recall`] does.
#[inline(always)]
fn take_record(sk: u64) -> (bool, ConnectOwner) {
    let found = recall(sk);
    if found.0 {
        forget(sk);
    }
    found
}

/// Who called connect() on `sk`, as recorded when it entered SYN_SENT (pid 0 if it could not
/// be: attached mid-handshake, or the map was full, which is counted).
#[inline(always)]
fn owner_of(sk: *const u8) -> ConnectOwner {
    recall(id_of(sk)).1
}

#[inline(always)]
fn on_state<M: Mem>(m: M, sk: *const u8, old: i32, new: i32) -> Result<(), ()> {
    // Every state change of every TCP socket passes here: most return after these compares.
    if new == TCP_SYN_SENT {
        let owner = current_owner(m);
        port_search::connecting(sk, owner.connect_ns);
        let protocol: u16 = Typed.read(sk, client_offset!(sk_protocol))?;
        if protocol == IPPROTO_TCP {
            // The typed program loads only where the compare-and-swap verifies (5.12+).
            remember(id_of(sk), &owner, M::TYPED);
        }
        return Ok(());
    }
    if old == TCP_SYN_SENT {
        if new == TCP_ESTABLISHED {
            // Connected: the record stays until the socket leaves ESTABLISHED (`reset`).
            return Ok(());
        }
        let protocol: u16 = Typed.read(sk, client_offset!(sk_protocol))?;
        if protocol != IPPROTO_TCP {
            return Ok(());
        }
        let (_, owner) = take_record(id_of(sk));
        return failed(sk, owner);
    }
    if old != TCP_ESTABLISHED {
        if old == TCP_LISTEN {
            // A listener's child, just cloned (LISTEN→SYN_RECV): no record can be its own. A
            // leftover at its address (an earlier socket's last state change skipped: a
            // recursion miss) would count the child's reset for that socket's owner. Cleared
            // where it is cheap, in the slot; one in the hash stays (a helper call and a
            // bucket lock on every accepted connection: on 5.10, whose records are all there).
            clear_slot(id_of(sk));
        }
        return Ok(());
    }
    // Leaving ESTABLISHED ends an active open's record. Only a reset needs what it holds: any
    // other way out just ends it (nothing to end for a server's child, or a socket connected
    // before qtrace started).
    if new != TCP_CLOSE || Typed.read::<i32>(sk, client_offset!(sk_err))? != ECONNRESET {
        forget(id_of(sk));
        return Ok(());
    }
    let (true, owner) = take_record(id_of(sk)) else {
        return Ok(());
    };
    // Through the helper: tcp_sock lies beyond the `struct sock` the tracepoint declares.
    if probe_read::<u64>(sk, client_offset!(tcp_bytes_received))? != 0 {
        return Ok(());
    }
    count(
        sk,
        owner,
        ClientCounter::ConnectReset,
        EventKind::ConnectReset,
    )
}

/// SYN_SENT→CLOSE: why the handshake ended, counted for its owner. `getsockopt(SO_ERROR)`
/// takes `sk_err` without the socket's lock: an owner that reads it between the kernel
/// setting it and this state change (5.10's timeout wakes the owner in that instant) leaves
/// none here, and its failure counts as `aborted`.
#[inline(always)]
fn failed(sk: *const u8, owner: ConnectOwner) -> Result<(), ()> {
    let err: i32 = Typed.read(sk, client_offset!(sk_err))?;
    let soft = if err == 0 { soft_error(sk) } else { 0 };
    let failure = if err != 0 {
        ConnectFailure::of_errno(err)
    } else if soft != 0 {
        ConnectFailure::of_errno(soft)
    } else if probe_read::<u16>(sk, client_offset!(inet_sport))? == 0 {
        // Through the helper: inet_sock lies beyond the `struct sock` the tracepoint declares.
        ConnectFailure::NoPort
    } else {
        ConnectFailure::Aborted
    };
    count(sk, owner, failure.counter(), failure.event())
}

/// The ICMP error a handshake got while connect() held the socket (owned by the user, so
/// `tcp_v4/v6_err` left it soft: `sk_err_soft`, and a copy on the error queue), when the owner
/// closes it before the kernel ends the handshake: what a non-blocking caller's SO_ERROR
/// returned (SO_ERROR falls back to the soft error, and poll() reports the queued one at once),
/// so its connect failed with it, not abandoned. SO_ERROR consumes `sk_err_soft`; the queued
/// copy stays until the socket is destroyed. 0 when there is none.
#[inline(always)]
fn soft_error(sk: *const u8) -> i32 {
    let soft: i32 = Typed.read(sk, client_offset!(sk_err_soft)).unwrap_or(0);
    if soft != 0 {
        return soft;
    }
    // Compared as numbers: an empty queue's head points at itself.
    let head = (sk as u64).wrapping_add(client_offset!(sk_error_queue) as u64);
    let skb = match probe_read::<u64>(sk, client_offset!(sk_error_queue)) {
        Ok(skb) if skb != 0 && skb != head => skb as *const u8,
        _ => return 0,
    };
    // `struct sock_extended_err`: ee_errno (u32), then ee_origin (u8).
    match probe_read::<[u8; 5]>(skb, client_offset!(skb_ee)) {
        Ok(ee) if ee[4] == SO_EE_ORIGIN_ICMP || ee[4] == SO_EE_ORIGIN_ICMP6 => {
            i32::from_ne_bytes([ee[0], ee[1], ee[2], ee[3]])
        }
        _ => 0,
    }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn qt_client_state(ctx: BtfTracePointContext) -> i32 {
    let _ = on_state(Typed, ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

/// `qt_client_state` for kernels without `bpf_get_current_task_btf` (before 5.11): the
/// owner's name read through the helper.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn qt_client_state_untyped(ctx: BtfTracePointContext) -> i32 {
    let _ = on_state(Untyped, ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}

#[inline(always)]
fn on_retransmit(sk: *const u8) -> Result<(), ()> {
    let state: u8 = Typed.read(sk, offset!(skc_state))?;
    if state as i32 != TCP_SYN_SENT {
        return Ok(());
    }
    count(
        sk,
        owner_of(sk),
        ClientCounter::SynRetransmits,
        EventKind::SynRetransmit,
    )
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn qt_client_rtx(ctx: BtfTracePointContext) -> i32 {
    let _ = on_retransmit(ctx.arg(0));
    0
}
