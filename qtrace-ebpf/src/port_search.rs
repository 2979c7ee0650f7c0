//! Time connect() spends choosing a local port: `inet_hash_connect()` /
//! `inet6_hash_connect()` (both `(death_row, sk)` on every kernel qtrace knows), from entry to
//! return, into a histogram per network namespace. When most ports of the range are taken
//! (each towards the destination, or in TIME_WAIT), the search walks thousands of them under a
//! lock per bucket: this shows it before connect() starts failing with EADDRNOTAVAIL. No
//! tracepoint fires around the search, so the tracepoint tier has none.
//!
//! With the client probe attached, the fentry tier needs no entry hook: `tcp_v4/v6_connect`
//! moves the socket to SYN_SENT right before the search, and the client probe's record of that
//! moment (`client::QT_ACTIVE_OPENS`) is the start the exit reads (one trampoline and one map
//! update fewer per connect()). Without it, the entry hook keeps its own start per thread.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use qtrace_common::{PortSearch, SelfStat};

use crate::{
    account::wait_bucket,
    client::QT_ACTIVE_OPENS,
    kernel::{offset, Mem, Typed, Untyped},
    self_stats::self_stat,
};

/// pid_tgid → [start ns, socket], between the search's entry and return. A thread's slot is
/// written at entry and zeroed at return in place, and reused by its next connect().
#[map]
static QT_PORT_START: LruHashMap<u64, [u64; 2]> = LruHashMap::with_max_entries(4096, 0);

/// Sized by user space before load: one entry per network namespace.
#[map]
static QT_PORT_SEARCH: PerCpuHashMap<u32, PortSearch> = PerCpuHashMap::with_max_entries(4096, 0);

/// A zeroed histogram to insert new namespaces from (kept off the BPF stack).
#[map]
static QT_PORT_ZERO: PerCpuArray<PortSearch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn enter(sk: u64) {
    let id = bpf_get_current_pid_tgid();
    let start = [unsafe { bpf_ktime_get_ns() }, sk];
    match QT_PORT_START.get_ptr_mut(&id) {
        // Only this thread touches its slot.
        Some(slot) => unsafe { *slot = start },
        None => {
            let _ = QT_PORT_START.insert(&id, &start, 0);
        }
    }
}

#[inline(always)]
fn exit() -> Result<(), ()> {
    let slot = QT_PORT_START
        .get_ptr_mut(&bpf_get_current_pid_tgid())
        .ok_or(())?;
    // Zero: this return is accounted for (a return without its entry finds zero).
    let [start, sk] = unsafe { core::ptr::replace(slot, [0, 0]) };
    if start == 0 {
        return Ok(());
    }
    // The socket is an integer kept in a map: read through the helper at either tier.
    record(Untyped, sk as *const u8, start)
}

/// The exit of a search whose start the client probe recorded as `sk` entered SYN_SENT.
#[inline(always)]
fn exit_after_connect(sk: *const u8) -> Result<(), ()> {
    let start = unsafe { QT_ACTIVE_OPENS.get(&(sk as u64)) }
        .ok_or(())?
        .connect_ns;
    record(Typed, sk, start)
}

/// One search of `sk`'s namespace that started at `start`, into its histogram.
#[inline(always)]
fn record<M: Mem>(m: M, sk: *const u8, start: u64) -> Result<(), ()> {
    let took = unsafe { bpf_ktime_get_ns() }.saturating_sub(start);
    let net: *const u8 = m.read(sk, offset!(skc_net))?;
    let netns: u32 = m.read(net, offset!(net_ns_inum))?;
    let h = match QT_PORT_SEARCH.get_ptr_mut(&netns) {
        Some(h) => h,
        None => {
            let zero = QT_PORT_ZERO.get_ptr(0).ok_or(())?;
            // EEXIST from a racing CPU is fine: the lookup below finds its entry.
            let _ = QT_PORT_SEARCH.insert(&netns, unsafe { &*zero }, BPF_NOEXIST as u64);
            QT_PORT_SEARCH.get_ptr_mut(&netns).ok_or_else(|| {
                self_stat(SelfStat::PortSearchMapFull);
            })?
        }
    };
    let h = unsafe { &mut *h };
    if let Some(b) = h.buckets.get_mut(wait_bucket(took)) {
        *b += 1;
    }
    h.sum_ns += took;
    Ok(())
}

// inet_hash_connect(death_row, sk), inet6_hash_connect(death_row, sk) -> int
#[fentry(function = "inet_hash_connect")]
pub fn qt_port_fe(ctx: FEntryContext) -> i32 {
    enter(ctx.arg::<u64>(1));
    0
}

#[fexit(function = "inet_hash_connect")]
pub fn qt_port_fx(_ctx: FExitContext) -> i32 {
    let _ = exit();
    0
}

// The exits alone, the start from the client probe's record.
#[fexit(function = "inet_hash_connect")]
pub fn qt_port_fxc(ctx: FExitContext) -> i32 {
    let _ = exit_after_connect(ctx.arg(1));
    0
}

#[fexit(function = "inet6_hash_connect")]
pub fn qt_port6_fxc(ctx: FExitContext) -> i32 {
    let _ = exit_after_connect(ctx.arg(1));
    0
}

#[fentry(function = "inet6_hash_connect")]
pub fn qt_port6_fe(ctx: FEntryContext) -> i32 {
    enter(ctx.arg::<u64>(1));
    0
}

#[fexit(function = "inet6_hash_connect")]
pub fn qt_port6_fx(_ctx: FExitContext) -> i32 {
    let _ = exit();
    0
}

// One program at both functions: kprobes see no types.
#[kprobe]
pub fn qt_port_kp(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(1) {
        enter(sk);
    }
    0
}

#[kretprobe]
pub fn qt_port_krp(_ctx: RetProbeContext) -> u32 {
    let _ = exit();
    0
}
