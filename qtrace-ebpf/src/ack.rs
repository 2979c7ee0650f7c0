//! Final ACK at a listener: `tcp_v4_syn_recv_sock()` / `tcp_v6_syn_recv_sock()`.
//!
//! A NULL child means the kernel dropped the ACK (`tcp_listendrop()`); the accept queue being
//! full is the overflow case (ListenOverflows at the third packet), told by this CPU's
//! ListenOverflows before and after the call (`mib.rs`): the queue itself, read at return,
//! may have been emptied by an accept() on another CPU since the kernel's check. With
//! `tcp_abort_on_overflow=1`, `tcp_check_req()` then answers with a reset — but only there:
//! the syncookie and Fast Open paths call syn_recv_sock without `req_unhash` and send none.
//!
//! The prototype gained a 7th argument in stable backports (6.1.192, 6.12), and fexit reads
//! the return value after the arguments, so there is one fexit program per arity; user space
//! loads the one that matches the running kernel's BTF.

use aya_ebpf::{
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use qtrace_common::{Counter, EventKind};

use crate::{
    account::{bump, count, emit_two, Details},
    kernel::{
        hook, listener, listener_of_request, offset, skb_is_ipv4, AcceptQueue, Listener, Mem,
        Remote, Typed, Untyped,
    },
    mib::ListenMib,
};

/// syn_recv_sock returned `child`; `v6_exit`: this is `tcp_v6_syn_recv_sock()`'s return;
/// `overflow`: whether the kernel counted ListenDrops and ListenOverflows in the call, if known.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn on_return<M: Mem>(
    m: M,
    sk: *const u8,
    skb: *const u8,
    req: *const u8,
    req_unhash: u64,
    child: *const u8,
    v6_exit: bool,
    overflow: impl FnOnce() -> Option<(bool, bool)>,
) -> Result<(), ()> {
    if !child.is_null() {
        return Ok(());
    }
    // A dual-stack listener's IPv4 ACK goes from tcp_v6_syn_recv_sock() to
    // tcp_v4_syn_recv_sock(), whose return has counted it already. (The request's family is
    // the listener's, AF_INET6, either way: the packet tells.)
    if v6_exit && skb_is_ipv4(m, skb)? {
        return Ok(());
    }
    // The kernel's verdict where this CPU's counters were read: a NULL child it counted no
    // drop for (a duplicate of a request another CPU completed, on the syncookie path) is
    // not a drop.
    let overflow = match overflow() {
        Some((false, _)) => return Ok(()),
        seen => seen.map(|(_, overflow)| overflow),
    };
    // Inside a Fast Open SYN's tcp_conn_request(): this drop is the ACK path's, not the SYN's.
    crate::syn::absorb_nested_drop(m, sk);
    let l = listener_of_request(m, sk, req)?;
    let family = l.family()?;
    dropped(
        sk,
        &l,
        #[inline(always)]
        || Remote::of_request(m, req, family).unwrap_or_default(),
        req_unhash != 0,
        overflow,
    )
}

/// Counts a dropped final ACK, and the reset `tcp_check_req()` answers it with when
/// `tcp_abort_on_overflow=1` (`may_reset`: the drop happened there); `overflow` as in
/// [`on_return`], else the accept queue as it is now tells.
#[inline(always)]
fn dropped<M: Mem>(
    sk: *const u8,
    l: &Listener<M>,
    remote: impl Fn() -> Remote,
    may_reset: bool,
    overflow: Option<bool>,
) -> Result<(), ()> {
    let acceptq = AcceptQueue::read(l.m, sk)?;
    let (counter, kind) = if overflow.unwrap_or_else(|| acceptq.full()) {
        (
            Counter::DropAcceptQueueFullAck,
            EventKind::DropAcceptQueueFullAck,
        )
    } else {
        (Counter::DropOther, EventKind::DropOther)
    };
    let c = count(l, counter).ok_or(())?;
    // A failed read is counted (ReadFailed) and costs the reset its count, not the drop its event.
    let reset = may_reset
        && l.sysctl_u8(offset!(net_abort_on_overflow))
            .is_ok_and(|v| v != 0);
    if reset {
        bump(c, Counter::OverflowResets);
    }
    emit_two(
        c,
        kind,
        reset.then_some(EventKind::OverflowReset),
        #[inline(always)]
        || Details {
            remote: remote(),
            queues: acceptq.with_synq(sk),
            retrans: 0,
        },
    );
    Ok(())
}

// (sk, skb, req, dst, req_unhash, own_req[, opt_child_init]) -> struct sock *

/// The fexit programs differ only in where the return value sits (after 6 or 7 arguments)
/// and in which function they trace.
#[inline(always)]
fn fexit_return(ctx: &FExitContext, ret: usize, v6_exit: bool) {
    let req: *const u8 = ctx.arg(2);
    let _ = on_return(
        Typed,
        ctx.arg(0),
        ctx.arg(1),
        req,
        ctx.arg(4),
        ctx.arg(ret),
        v6_exit,
        #[inline(always)]
        || overflowed(req as u64),
    );
}

/// Whether this CPU's ListenDrops and ListenOverflows moved since the entry of the call for
/// `req`, which ends that entry; None when no entry of this call was kept (its program
/// skipped) or its counters were not found.
#[inline(always)]
fn overflowed(req: u64) -> Option<(bool, bool)> {
    let slot = QT_ACK_ENTRY.get_ptr_mut(0)?;
    // SAFETY: this CPU's map value, written by this call's entry.
    let e = unsafe { &mut *slot };
    if e.req != req {
        return None;
    }
    e.req = 0;
    e.mib.since()
}

// (sk, skb, req, ...): the same first arguments on every kernel, for both families.

#[fentry(function = "tcp_v4_syn_recv_sock")]
pub fn qt_ack4_fe(ctx: FEntryContext) -> i32 {
    remember(Typed, ctx.arg(0), ctx.arg(2), 0);
    0
}

#[fentry(function = "tcp_v6_syn_recv_sock")]
pub fn qt_ack6_fe(ctx: FEntryContext) -> i32 {
    remember(Typed, ctx.arg(0), ctx.arg(2), 0);
    0
}

#[fexit(function = "tcp_v4_syn_recv_sock")]
pub fn qt_ack4_fx6(ctx: FExitContext) -> i32 {
    fexit_return(&ctx, 6, false);
    0
}

#[fexit(function = "tcp_v4_syn_recv_sock")]
pub fn qt_ack4_fx7(ctx: FExitContext) -> i32 {
    fexit_return(&ctx, 7, false);
    0
}

#[fexit(function = "tcp_v6_syn_recv_sock")]
pub fn qt_ack6_fx6(ctx: FExitContext) -> i32 {
    fexit_return(&ctx, 6, true);
    0
}

#[fexit(function = "tcp_v6_syn_recv_sock")]
pub fn qt_ack6_fx7(ctx: FExitContext) -> i32 {
    fexit_return(&ctx, 7, true);
    0
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Entry {
    // Kernel addresses as integers: map values must be Sync.
    sk: u64,
    req: u64,
    req_unhash: u64,
    /// This CPU's ListenOverflows and ListenDrops at entry.
    mib: ListenMib,
}

/// One slot per CPU: syn_recv_sock runs in softirq context and nests only as
/// tcp_v6_syn_recv_sock() → tcp_v4_syn_recv_sock() for a dual-stack listener's IPv4 request;
/// the inner entry overwrites the slot with the same request and counters, the inner return
/// counts and clears it, and the outer return finds it empty (the kretprobe) or skips the
/// IPv4 packet (fexit): one count.
#[map]
static QT_ACK_ENTRY: PerCpuArray<Entry> = PerCpuArray::with_max_entries(1, 0);

/// Keeps the call's request and this CPU's counters for its return.
#[inline(always)]
fn remember<M: Mem>(m: M, sk: *const u8, req: *const u8, req_unhash: u64) {
    if let Some(slot) = QT_ACK_ENTRY.get_ptr_mut(0) {
        unsafe {
            *slot = Entry {
                sk: sk as u64,
                req: req as u64,
                req_unhash,
                mib: ListenMib::read(m, sk),
            }
        };
    }
}

#[kprobe]
pub fn qt_ack_kp(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(req), Some(req_unhash)) = (ctx.arg(0), ctx.arg(2), ctx.arg(4)) {
        remember(Untyped, sk, req, req_unhash);
    }
    0
}

#[kretprobe]
pub fn qt_ack_krp(ctx: RetProbeContext) -> u32 {
    if let Some(slot) = QT_ACK_ENTRY.get_ptr_mut(0) {
        let e = unsafe { *slot };
        if e.sk != 0 {
            unsafe { (*slot).sk = 0 };
            let _ = on_return(
                Untyped,
                e.sk as *const u8,
                core::ptr::null(),
                e.req as *const u8,
                e.req_unhash,
                ctx.ret(),
                false,
                #[inline(always)]
                || e.mib.since(),
            );
        }
    }
    0
}

/// Tracepoint tier, for kernels without fexit or kprobes: `skb:kfree_skb(skb, location,
/// reason, rx_sk)`, user-loaded only where BTF shows `rx_sk` (6.11+) and the
/// TCP_LISTEN_OVERFLOW reason (6.15+). A failed syn_recv_sock shows as TCP_LISTEN_OVERFLOW
/// from `tcp_check_req()` (whatever the cause), and as NO_SOCKET with the listener as `rx_sk`
/// from `cookie_v4/v6_check()` (the syncookie path, which sends no reset).
#[inline(always)]
fn on_drop(skb: *const u8, reason: u32, sk: *const u8) -> Result<(), ()> {
    let from_check_req = reason == hook!(drop_reason_listen_overflow);
    if hook!(drop_reason_listen_overflow) == 0 || sk.is_null() {
        return Ok(());
    }
    if !from_check_req && (reason != hook!(drop_reason_no_socket) || !is_listener(sk)?) {
        return Ok(());
    }
    let l = listener(Typed, sk)?;
    let family = l.family()?;
    dropped(
        sk,
        &l,
        #[inline(always)]
        || Remote::of_skb(Typed, skb, family).unwrap_or_default(),
        from_check_req,
        None,
    )
}

#[inline(always)]
fn is_listener(sk: *const u8) -> Result<bool, ()> {
    const TCP_LISTEN: u8 = 10;
    Ok(Typed.read::<u8>(sk, offset!(skc_state))? == TCP_LISTEN)
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn qt_ack_tp(ctx: BtfTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(2);
    let _ = on_drop(ctx.arg(0), reason as u32, ctx.arg(3));
    0
}
