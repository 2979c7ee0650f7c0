//! Final ACK at a listener: `tcp_v4_syn_recv_sock()` / `tcp_v6_syn_recv_sock()`.
//!
//! A NULL child means the kernel dropped the ACK (`tcp_listendrop()`); the accept queue being
//! full is the overflow case (ListenOverflows at the third packet). With
//! `tcp_abort_on_overflow=1`, `tcp_check_req()` then answers with a reset.
//!
//! The prototype gained a 7th argument in stable backports (6.1.192, 6.12), and fexit reads
//! the return value after the arguments, so there is one fexit program per arity; user space
//! loads the one that matches the running kernel's BTF.

use aya_ebpf::{
    macros::{btf_tracepoint, fexit, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, FExitContext, ProbeContext, RetProbeContext},
};
use qtrace_common::{Counter, EventKind, ListenerKey};

use crate::{
    account::{bump, count, emit},
    kernel::{hooks, listener_key, net_sysctl_u8, offsets, Queues, Remote},
};

#[inline(always)]
fn on_return(sk: *const u8, req: *const u8, child: *const u8) -> Result<(), ()> {
    if !child.is_null() {
        return Ok(());
    }
    let key = listener_key(sk)?;
    let q = Queues::read(sk)?;
    let counter = if q.acceptq_full() {
        Counter::DropAcceptQueueFullAck
    } else {
        Counter::DropOther
    };
    let remote = Remote::of_request(req, key.family).unwrap_or_default();
    dropped(sk, &key, counter, q, remote)
}

/// Counts a dropped final ACK, and the reset `tcp_check_req()` answers it with when
/// `tcp_abort_on_overflow=1`.
#[inline(always)]
fn dropped(
    sk: *const u8,
    key: &ListenerKey,
    counter: Counter,
    q: Queues,
    remote: Remote,
) -> Result<(), ()> {
    let kind = if counter == Counter::DropAcceptQueueFullAck {
        EventKind::AckDropAcceptQueueFull
    } else {
        EventKind::DropOther
    };
    let c = count(key, counter).ok_or(())?;
    emit(c, key, kind, remote, q, 0);
    if net_sysctl_u8(sk, offsets().net_abort_on_overflow)? != 0 {
        bump(c, Counter::OverflowResets);
        emit(c, key, EventKind::OverflowReset, remote, q, 0);
    }
    Ok(())
}

// (sk, skb, req, dst, req_unhash, own_req[, opt_child_init]) -> struct sock *

#[fexit(function = "tcp_v4_syn_recv_sock")]
pub fn qt_ack4_fx6(ctx: FExitContext) -> i32 {
    let _ = on_return(ctx.arg(0), ctx.arg(2), ctx.arg(6));
    0
}

#[fexit(function = "tcp_v4_syn_recv_sock")]
pub fn qt_ack4_fx7(ctx: FExitContext) -> i32 {
    let _ = on_return(ctx.arg(0), ctx.arg(2), ctx.arg(7));
    0
}

#[fexit(function = "tcp_v6_syn_recv_sock")]
pub fn qt_ack6_fx6(ctx: FExitContext) -> i32 {
    let _ = on_return(ctx.arg(0), ctx.arg(2), ctx.arg(6));
    0
}

#[fexit(function = "tcp_v6_syn_recv_sock")]
pub fn qt_ack6_fx7(ctx: FExitContext) -> i32 {
    let _ = on_return(ctx.arg(0), ctx.arg(2), ctx.arg(7));
    0
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    // Kernel addresses as integers: map values must be Sync.
    sk: u64,
    req: u64,
}

/// One slot per CPU: syn_recv_sock runs in softirq context and does not nest.
#[map]
static QT_ACK_ENTRY: PerCpuArray<Entry> = PerCpuArray::with_max_entries(1, 0);

#[kprobe]
pub fn qt_ack_kp(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(req), Some(slot)) = (ctx.arg(0), ctx.arg(2), QT_ACK_ENTRY.get_ptr_mut(0))
    {
        unsafe { *slot = Entry { sk, req } };
    }
    0
}

#[kretprobe]
pub fn qt_ack_krp(ctx: RetProbeContext) -> u32 {
    if let Some(slot) = QT_ACK_ENTRY.get_ptr_mut(0) {
        let e = unsafe { *slot };
        if e.sk != 0 {
            unsafe { (*slot).sk = 0 };
            let _ = on_return(e.sk as *const u8, e.req as *const u8, ctx.ret());
        }
    }
    0
}

/// Tracepoint tier, for kernels without fexit or kprobes: `skb:kfree_skb(skb, location,
/// reason, rx_sk)` with reason TCP_LISTEN_OVERFLOW (6.15+) and the receiving socket (6.11+).
/// User space loads it only where BTF shows both. It sees overflows only, not other failures.
#[inline(always)]
fn on_drop(skb: *const u8, reason: u32, sk: *const u8) -> Result<(), ()> {
    let want = hooks().drop_reason_listen_overflow;
    if want == 0 || reason != want || sk.is_null() {
        return Ok(());
    }
    let key = listener_key(sk)?;
    let q = Queues::read(sk).unwrap_or_default();
    let remote = Remote::of_skb(skb, key.family).unwrap_or_default();
    dropped(sk, &key, Counter::DropAcceptQueueFullAck, q, remote)
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn qt_ack_tp(ctx: BtfTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(2);
    let _ = on_drop(ctx.arg(0), reason as u32, ctx.arg(3));
    0
}
