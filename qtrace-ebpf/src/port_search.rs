//! Time connect() spends choosing a local port: `inet_hash_connect()` /
//! `inet6_hash_connect()` (both `(death_row, sk)` on every kernel qtrace knows), from entry to
//! return, into a histogram per network namespace. When most ports of the range are taken
//! (each towards the destination, or in TIME_WAIT), the search walks thousands of them under a
//! lock per bucket: this shows it before connect() starts failing with EADDRNOTAVAIL. No
//! tracepoint fires around the search, so the tracepoint tier has none.
//!
//! With the client probe attached, no entry hook is needed: `tcp_v4/v6_connect` moves the
//! socket to SYN_SENT right before the search, and the client probe's tracepoint at that
//! moment is the start. The fentry tier's exit finds it in the client's record of the socket
//! (`client::recall`); a kretprobe has no arguments to find a socket by, so at the
//! kprobe tier the tracepoint also fills the thread's slot the return reads
//! (`QT_PORT_START_AT_CONNECT` switches that on). Either way one hook and one map update fewer
//! per connect() than an entry hook of its own (BENCHMARKS.md 1b), which is what remains with
//! `--probes=-client`.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use qtrace_common::{PortSearch, PortSearchSlot, SelfStat};

use crate::{
    account::wait_bucket,
    client,
    kernel::{netns_cookie, offset, slot_hash, Mem, Typed, Untyped},
    self_stats::self_stat,
};

/// pid_tgid → [start ns, network namespace (see [`netns_of`])], between the search's start
/// and return. A thread's slot is written at the start and zeroed at return in place, and
/// reused by its next connect().
#[map]
static QT_PORT_START: LruHashMap<u64, [u64; 2]> = LruHashMap::with_max_entries(4096, 0);

/// 1 when the client probe's SYN_SENT is the start of the kprobe tier's search (set by the
/// loader before the returns attach).
#[map]
static QT_PORT_START_AT_CONNECT: Array<u32> = Array::with_max_entries(1, 0);

/// Sized by user space before load: by inode number, one entry per network namespace whose
/// slot another namespace took on that CPU, holding the namespace (see [`netns_of`]) its
/// histogram is for (see [`own`]).
#[map]
static QT_PORT_SEARCH: PerCpuHashMap<u32, PortSearchSlot> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// The direct-mapped front of `QT_PORT_SEARCH`: on each CPU, a namespace's histogram lives in
/// the slot its inode hashes to if no other live namespace took that slot on that CPU first,
/// where finding it is a few inlined instructions against the hash's helper call and bucket
/// walk. Only the running CPU writes its copy of a slot, and a slot once taken stays with its
/// namespace (as a hash entry does) until another takes that namespace's inode number (see
/// [`own`]), so no live namespace's count moves or is lost; user space adds each CPU's slots
/// and the hash's entries up per namespace. 64 slots of 272 bytes per CPU: the first half
/// for the IPv4 search's exit, the second for IPv6's (see [`slot_of`]).
#[map]
static QT_PORT_SEARCH_SLOTS: PerCpuArray<PortSearchSlot> = PerCpuArray::with_max_entries(64, 0);

/// A zeroed entry to insert new namespaces from (kept off the BPF stack).
#[map]
static QT_PORT_ZERO: PerCpuArray<PortSearchSlot> = PerCpuArray::with_max_entries(1, 0);

/// Called by the client probe as `sk` enters SYN_SENT at `now`, just before its search: the
/// start, when the kprobe tier's returns read it.
#[inline(always)]
pub(crate) fn connecting(sk: *const u8, now: u64) {
    if QT_PORT_START_AT_CONNECT.get(0).is_some_and(|on| *on != 0) {
        enter_at(Typed, sk, now);
    }
}

/// An entry hook's start of `sk`'s search.
#[inline(always)]
fn enter<M: Mem>(m: M, sk: *const u8) {
    enter_at(m, sk, unsafe { bpf_ktime_get_ns() });
}

#[inline(always)]
fn enter_at<M: Mem>(m: M, sk: *const u8, now: u64) {
    if let Ok(netns) = netns_of(m, sk) {
        start(netns, now);
    }
}

/// `sk`'s namespace, with its cookie (`PortSearchSlot::netns`: the kernel hands a deleted
/// namespace's inode number on; the cookie tells the two apart).
#[inline(always)]
fn netns_of<M: Mem>(m: M, sk: *const u8) -> Result<u64, ()> {
    let net: *const u8 = m.read(sk, offset!(skc_net))?;
    let inode: u32 = m.read(net, offset!(net_ns_inum))?;
    Ok(PortSearchSlot::netns(inode, netns_cookie(m, net)))
}

#[inline(always)]
fn start(netns: u64, now: u64) {
    let id = bpf_get_current_pid_tgid();
    let start = [now, netns];
    match QT_PORT_START.get_ptr_mut(&id) {
        // Only this thread touches its slot.
        Some(slot) => unsafe { *slot = start },
        None => {
            let _ = QT_PORT_START.insert(&id, &start, 0);
        }
    }
}

#[inline(always)]
fn exit(half: u32) -> Result<(), ()> {
    let slot = QT_PORT_START
        .get_ptr_mut(&bpf_get_current_pid_tgid())
        .ok_or(())?;
    // The start zeroed: this return is accounted for (a return without its start finds zero).
    // The start alone: a 16-byte replace compiles to a call of memset.
    let [start, netns] = unsafe { *slot };
    unsafe { core::ptr::write_volatile(slot.cast::<u64>(), 0) };
    if start == 0 {
        return Ok(());
    }
    record(netns, start, half)
}

/// The exit of a search whose start the client probe recorded as `sk` entered SYN_SENT.
#[inline(always)]
fn exit_after_connect(sk: *const u8, half: u32) -> Result<(), ()> {
    let (true, owner) = client::recall(client::id_of(sk)) else {
        return Err(());
    };
    let start = owner.connect_ns;
    record(netns_of(Typed, sk)?, start, half)
}

/// Which half of the slots an exit program uses.
const V4: u32 = 0;
const V6: u32 = 32;

/// One search in namespace `netns` that started at `start`, into its histogram (a slot in
/// `half`).
#[inline(always)]
fn record(netns: u64, start: u64, half: u32) -> Result<(), ()> {
    let took = unsafe { bpf_ktime_get_ns() }.saturating_sub(start);
    let h = match slot_of(netns, half) {
        Some(h) => h,
        None => hashed(netns)?,
    };
    let h = unsafe { &mut *h };
    if let Some(b) = h.buckets.get_mut(wait_bucket(took)) {
        *b += 1;
    }
    h.sum_ns += took;
    Ok(())
}

/// This CPU's histogram of `netns` in its slot of `half`, taking the slot if it is free on
/// this CPU.
#[inline(always)]
fn slot_of(netns: u64, half: u32) -> Option<*mut PortSearch> {
    // By the inode alone: the tests that aim namespaces at one slot compute the same.
    let i = slot_hash(PortSearchSlot::inode(netns).into()) & 31 | half;
    let slot = QT_PORT_SEARCH_SLOTS.get_ptr_mut(i)?;
    // SAFETY: this CPU's copy of the slot, which only this CPU writes, and of a half that only
    // this program writes. fexit programs run with migration disabled, not preemption: on a
    // kernel booted with preempt=full the IPv4 and IPv6 exits (two programs) of two tasks on
    // one CPU can interleave, which the halves keep apart; one program does not run twice at
    // once on a CPU (the kernel skips and counts the second run). (The hash's per-CPU values
    // are shared by both exits: such an interleaving could lose a count there.)
    let s = unsafe { &mut *slot };
    own(s, netns).then(|| core::ptr::addr_of_mut!(s.hist))
}

/// Whether this CPU's entry `s` (a slot, or the hash's entry of the inode) is now `netns`'s:
/// a free one (0) is taken; one of the namespace that had this inode number before (both
/// cookies made, and different: two live namespaces never share an inode, and a cookie once
/// made never changes) is taken and zeroed, so the key space stays that of the inodes in
/// use; one of the same inode whose cookie was not made when it was taken (0: before 5.12,
/// until something asks) is kept as it is.
#[inline(always)]
fn own(s: &mut PortSearchSlot, netns: u64) -> bool {
    if s.netns == netns {
        return true;
    }
    if s.netns == 0 {
        s.netns = netns;
        return true;
    }
    if PortSearchSlot::inode(s.netns) != PortSearchSlot::inode(netns) {
        return false;
    }
    if PortSearchSlot::cookie(s.netns) != 0 && PortSearchSlot::cookie(netns) != 0 {
        for b in s.hist.buckets.iter_mut() {
            // SAFETY: a map value of this CPU's, as above. Stores one by one: a zeroed
            // struct written at once compiles to a call of memset.
            unsafe { core::ptr::write_volatile(b, 0) };
        }
        s.hist.sum_ns = 0;
        s.netns = netns;
    }
    true
}

/// This CPU's histogram of `netns` in the hash, created on first use.
#[inline(always)]
fn hashed(netns: u64) -> Result<*mut PortSearch, ()> {
    let inode = PortSearchSlot::inode(netns);
    let entry = match QT_PORT_SEARCH.get_ptr_mut(&inode) {
        Some(e) => e,
        None => {
            let zero = QT_PORT_ZERO.get_ptr(0).ok_or(())?;
            // EEXIST from a racing CPU is fine: the lookup below finds its entry.
            let _ = QT_PORT_SEARCH.insert(&inode, unsafe { &*zero }, BPF_NOEXIST as u64);
            QT_PORT_SEARCH.get_ptr_mut(&inode).ok_or_else(|| {
                self_stat(SelfStat::PortSearchMapFull);
            })?
        }
    };
    // SAFETY: this CPU's value of the entry (see `slot_of` on interleaving exits).
    let e = unsafe { &mut *entry };
    // The entry is keyed by this inode: always this namespace's once `own` has looked.
    own(e, netns);
    Ok(core::ptr::addr_of_mut!(e.hist))
}

// inet_hash_connect(death_row, sk), inet6_hash_connect(death_row, sk) -> int
#[fentry(function = "inet_hash_connect")]
pub fn qt_port_fe(ctx: FEntryContext) -> i32 {
    enter(Typed, ctx.arg(1));
    0
}

#[fexit(function = "inet_hash_connect")]
pub fn qt_port_fx(_ctx: FExitContext) -> i32 {
    let _ = exit(V4);
    0
}

// The exits alone, the start from the client probe's record.
#[fexit(function = "inet_hash_connect")]
pub fn qt_port_fxc(ctx: FExitContext) -> i32 {
    let _ = exit_after_connect(ctx.arg(1), V4);
    0
}

#[fexit(function = "inet6_hash_connect")]
pub fn qt_port6_fxc(ctx: FExitContext) -> i32 {
    let _ = exit_after_connect(ctx.arg(1), V6);
    0
}

#[fentry(function = "inet6_hash_connect")]
pub fn qt_port6_fe(ctx: FEntryContext) -> i32 {
    enter(Typed, ctx.arg(1));
    0
}

#[fexit(function = "inet6_hash_connect")]
pub fn qt_port6_fx(_ctx: FExitContext) -> i32 {
    let _ = exit(V6);
    0
}

// One program at both functions: kprobes see no types. The entry only without the client
// probe; the return either way.
#[kprobe]
pub fn qt_port_kp(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<*const u8>(1) {
        enter(Untyped, sk);
    }
    0
}

#[kretprobe]
pub fn qt_port_krp(_ctx: RetProbeContext) -> u32 {
    // Both families: kprobe programs run with preemption disabled, so nothing interleaves.
    let _ = exit(V4);
    0
}
