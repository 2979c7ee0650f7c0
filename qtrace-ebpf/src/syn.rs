//! SYN at a listener: `tcp_conn_request()` (reached from tcp_v4/v6_conn_request).
//!
//! Entry snapshots the listener (drop count, queues, syncookie mode); exit compares. The
//! kernel calls `tcp_listendrop()` on every path that drops the SYN, which bumps the
//! listener's `sk_drops` and this CPU's ListenDrops of its namespace, and counts ListenOverflows
//! on this CPU first when the accept queue was full. The kernel takes no lock on a listener
//! for a SYN, so other CPUs drop SYNs and final ACKs of the same listener meanwhile: a changed
//! `sk_drops` only says some CPU dropped one. Whether this SYN was dropped, and whether for a
//! full accept queue, is this CPU's ListenDrops and ListenOverflows read before and after
//! (softirqs do not nest on a CPU, so nothing else moves them in between); they are read only
//! when `sk_drops` moved, as a SYN that is queued leaves it be. Which other check dropped it,
//! and whether a syncookie went out, is taken from the kernel's own decisions where it has
//! functions for them, seen on the same CPU while this `tcp_conn_request()` runs:
//! `tcp_syn_flood_action()` (SYN queue full: cookie or drop, counting TCPReqQFullDrop) and
//! `cookie_v4/v6_init_sequence()` (counting SyncookiesSent). Predicting them from the queues
//! alone is ambiguous: the SYN-queue test changed from `>=` to `>` in stable kernels,
//! invisibly to BTF.

use aya_ebpf::{
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use qtrace_common::{Counter, EventKind};

use crate::{
    account::{count, emit, Details},
    kernel::{hook, listener, net_sysctl_u8, offset, Mem, Queues, Remote, Typed, Untyped},
    mib::ListenMib,
};

#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    // Kernel addresses as integers: map values must be Sync.
    sk: u64,
    skb: u64,
    queues: Queues,
    /// The listener's `sk_drops`: unchanged at exit, nothing was dropped.
    drops: u32,
    syncookies: u8,
    /// `tcp_syn_flood_action()` ran: FLOOD_DROP or FLOOD_COOKIE.
    flood: u8,
    /// A syncookie was generated.
    cookie: u8,
    /// This CPU's ListenOverflows and ListenDrops at entry.
    mib: ListenMib,
}

const FLOOD_DROP: u8 = 1;
const FLOOD_COOKIE: u8 = 2;

/// One slot per CPU: tcp_conn_request runs in softirq context and does not nest.
#[map]
static QT_SYN_ENTRY: PerCpuArray<Entry> = PerCpuArray::with_max_entries(1, 0);

/// Whether the kernel's decisions are seen (`decided()`), not predicted from the queues.
#[inline(always)]
fn exact() -> bool {
    hook!(syn_decisions_hooked) != 0
}

#[inline(always)]
fn enter<M: Mem>(m: M, sk: *const u8, skb: *const u8) -> Result<(), ()> {
    let slot = QT_SYN_ENTRY.get_ptr_mut(0).ok_or(())?;
    let mut entry = Entry {
        sk: sk as u64,
        skb: skb as u64,
        queues: Queues::default(),
        drops: m.read(sk, offset!(sk_drops))?,
        syncookies: 0,
        flood: 0,
        cookie: 0,
        mib: ListenMib::read(m, sk),
    };
    // Only a prediction needs the state before the SYN; a seen decision reads the queues at
    // exit, which a dropped SYN or a syncookie leaves as they were. Every SYN pays for this.
    if !exact() {
        entry.queues = Queues::read(m, sk)?;
        entry.syncookies = net_sysctl_u8(m, sk, offset!(net_syncookies))?;
    }
    unsafe { *slot = entry };
    Ok(())
}

/// Whether this SYN was dropped, and whether the kernel found the accept queue full for it
/// (None: not known, where this CPU's counters were not found).
#[inline(always)]
fn drop_seen<M: Mem>(m: M, e: &Entry, sk: *const u8) -> Result<(bool, Option<bool>), ()> {
    let drops: u32 = m.read(sk, offset!(sk_drops))?;
    if drops == e.drops {
        return Ok((false, Some(false)));
    }
    Ok(match e.mib.since() {
        Some((dropped, overflow)) => (dropped, Some(overflow)),
        None => (true, None),
    })
}

/// `args`: the listener and the SYN, from the exit's own context when it has them typed.
#[inline(always)]
fn exit<M: Mem>(m: M, args: impl FnOnce(u64, u64) -> (*const u8, *const u8)) -> Result<(), ()> {
    let slot = QT_SYN_ENTRY.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's map value, written by this SYN's entry.
    let e = unsafe { &mut *slot };
    if e.sk == 0 {
        return Ok(());
    }
    let (sk, skb) = args(e.sk, e.skb);
    e.sk = 0;
    let e = &*e;
    let exact = exact();
    let (dropped, overflow) = drop_seen(m, e, sk)?;
    let cookie = if exact {
        e.cookie != 0
    } else {
        e.syncookies == 2 || (e.syncookies == 1 && e.queues.synq_full())
    };
    if !dropped && !cookie {
        count(&listener(m, sk)?, Counter::SynQueued);
        return Ok(());
    }
    let q = if exact {
        Queues::read(m, sk)?
    } else {
        e.queues
    };
    let (counter, kind) = if dropped {
        let synq_full = if exact {
            e.flood == FLOOD_DROP
        } else {
            e.syncookies == 0 && q.synq_full()
        };
        // ListenOverflows on this CPU is the kernel's own "accept queue full"; without it,
        // the queue as it is now.
        if overflow != Some(true) && synq_full {
            (Counter::DropSynQueueFull, EventKind::DropSynQueueFull)
        } else if overflow.unwrap_or_else(|| q.acceptq.full()) {
            (
                Counter::DropAcceptQueueFullSyn,
                EventKind::DropAcceptQueueFullSyn,
            )
        } else {
            (Counter::DropOther, EventKind::DropOther)
        }
    } else {
        (Counter::SyncookiesSent, EventKind::SyncookieSent)
    };
    let l = listener(m, sk)?;
    let c = count(&l, counter).ok_or(())?;
    emit(c, kind, || Details {
        remote: Remote::of_skb(m, skb, unsafe { (*c).id.family }).unwrap_or_default(),
        queues: q,
        retrans: 0,
    });
    Ok(())
}

// tcp_conn_request(rsk_ops, af_ops, sk, skb): the prototype is stable across 5.x–6.x.

#[fentry(function = "tcp_conn_request")]
pub fn qt_syn_fe(ctx: FEntryContext) -> i32 {
    let _ = enter(Typed, ctx.arg(2), ctx.arg(3));
    0
}

#[fexit(function = "tcp_conn_request")]
pub fn qt_syn_fx(ctx: FExitContext) -> i32 {
    let _ = exit(Typed, |_, _| (ctx.arg(2), ctx.arg(3)));
    0
}

#[kprobe]
pub fn qt_syn_kp(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(skb)) = (ctx.arg(2), ctx.arg(3)) {
        let _ = enter(Untyped, sk, skb);
    }
    0
}

#[kretprobe]
pub fn qt_syn_krp(_ctx: RetProbeContext) -> u32 {
    let _ = exit(Untyped, |sk, skb| (sk as *const u8, skb as *const u8));
    0
}

/// A drop the final-ACK probe counted inside this CPU's running `tcp_conn_request()` for
/// listener `sk`: a Fast Open SYN whose child `syn_recv_sock()` could not make (the accept
/// queue filled by another CPU since the SYN's own check, or no memory). The kernel counts
/// that drop once, there, and queues the SYN as an ordinary one; the SYN's exit would take the
/// moved `sk_drops` and ListenDrops for its own drop, so its baseline moves past them.
#[inline(always)]
pub fn absorb_nested_drop<M: Mem>(m: M, sk: *const u8) {
    if let Some(slot) = QT_SYN_ENTRY.get_ptr_mut(0) {
        // SAFETY: this CPU's map value; the running tcp_conn_request's entry wrote it.
        let e = unsafe { &mut *slot };
        if e.sk == sk as u64 {
            if let Ok(drops) = m.read(sk, offset!(sk_drops)) {
                e.drops = drops;
            }
            e.mib = ListenMib::read(m, sk);
        }
    }
}

/// Records one of the kernel's decisions in the running `tcp_conn_request()` of this CPU.
#[inline(always)]
fn decided(set: impl FnOnce(&mut Entry)) {
    if let Some(slot) = QT_SYN_ENTRY.get_ptr_mut(0) {
        let e = unsafe { &mut *slot };
        if e.sk != 0 {
            set(e);
        }
    }
}

#[inline(always)]
fn flood_action(want_cookie: bool) {
    decided(|e| {
        e.flood = if want_cookie {
            FLOOD_COOKIE
        } else {
            FLOOD_DROP
        }
    });
}

// tcp_syn_flood_action(sk, proto) -> bool want_cookie

#[fexit(function = "tcp_syn_flood_action")]
pub fn qt_flood_fx(ctx: FExitContext) -> i32 {
    flood_action(ctx.arg::<u8>(2) != 0);
    0
}

#[kretprobe]
pub fn qt_flood_krp(ctx: RetProbeContext) -> u32 {
    flood_action(ctx.ret::<u8>() != 0);
    0
}

// cookie_v4_init_sequence(skb, mss), cookie_v6_init_sequence(skb, mss)

#[fentry(function = "cookie_v4_init_sequence")]
pub fn qt_cookie4_fe(_ctx: FEntryContext) -> i32 {
    decided(|e| e.cookie = 1);
    0
}

#[fentry(function = "cookie_v6_init_sequence")]
pub fn qt_cookie6_fe(_ctx: FEntryContext) -> i32 {
    decided(|e| e.cookie = 1);
    0
}

#[kprobe]
pub fn qt_cookie_kp(_ctx: ProbeContext) -> u32 {
    decided(|e| e.cookie = 1);
    0
}
