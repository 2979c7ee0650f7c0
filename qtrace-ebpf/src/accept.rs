//! accept(): `inet_csk_accept()` returning a connection, and the time it waited in the accept
//! queue since `inet_csk_reqsk_queue_add()` put it there.
//!
//! The queue-add is hooked both directly (syncookie and Fast Open children are added from other
//! files) and through `inet_csk_complete_hashdance()`'s return, because the compiler may inline
//! the add into it; the two stamps of one child are microseconds apart. A stamp always
//! overwrites: a child closed before accept() leaves one behind, and its address may be reused.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use qtrace_common::{Counter, SelfStat};

use crate::{
    account::{count, observe_wait},
    kernel::{listener, Mem, Typed, Untyped},
    self_stats::self_stat,
};

/// child socket → when it joined the accept queue. LRU: children closed before accept() age out.
#[map]
static QT_ACCEPT_QUEUED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// pid_tgid → listener, between inet_csk_accept's entry and return (kprobe tier only). A
/// thread's slot is written at entry and zeroed at return in place, and reused by its next
/// accept(): an LRU insert and delete per accept() cost more than the rest of the probe.
#[map]
static QT_ACCEPT_ENTRY: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn queued(child: *const u8) {
    if child.is_null() {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if QT_ACCEPT_QUEUED.insert(&(child as u64), &now, 0).is_err() {
        self_stat(SelfStat::AcceptMapFull);
    }
}

#[inline(always)]
fn accepted<M: Mem>(m: M, sk: *const u8, child: *const u8) -> Result<(), ()> {
    if child.is_null() {
        return Ok(());
    }
    let c = count(&listener(m, sk)?, Counter::Accepted).ok_or(())?;
    let id = child as u64;
    if let Some(t) = QT_ACCEPT_QUEUED.get_ptr(&id) {
        let wait = unsafe { bpf_ktime_get_ns() }.saturating_sub(unsafe { *t });
        observe_wait(c, wait);
        let _ = QT_ACCEPT_QUEUED.remove(&id);
    }
    Ok(())
}

// inet_csk_reqsk_queue_add(sk, req, child) -> struct sock *
#[fentry(function = "inet_csk_reqsk_queue_add")]
pub fn qt_acc_qadd_fe(ctx: FEntryContext) -> i32 {
    queued(ctx.arg(2));
    0
}

// inet_csk_complete_hashdance(sk, child, req, own_req) -> child if it was queued
#[fexit(function = "inet_csk_complete_hashdance")]
pub fn qt_acc_hd_fx(ctx: FExitContext) -> i32 {
    queued(ctx.arg(4));
    0
}

// inet_csk_accept(sk, flags, err, kern) before 6.10, inet_csk_accept(sk, arg) since.
#[fexit(function = "inet_csk_accept")]
pub fn qt_acc_fx4(ctx: FExitContext) -> i32 {
    let _ = accepted(Typed, ctx.arg(0), ctx.arg(4));
    0
}

#[fexit(function = "inet_csk_accept")]
pub fn qt_acc_fx2(ctx: FExitContext) -> i32 {
    let _ = accepted(Typed, ctx.arg(0), ctx.arg(2));
    0
}

#[kprobe]
pub fn qt_acc_qadd_kp(ctx: ProbeContext) -> u32 {
    if let Some(child) = ctx.arg(2) {
        queued(child);
    }
    0
}

#[kretprobe]
pub fn qt_acc_hd_krp(ctx: RetProbeContext) -> u32 {
    queued(ctx.ret());
    0
}

#[kprobe]
pub fn qt_acc_kp(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        let id = bpf_get_current_pid_tgid();
        match QT_ACCEPT_ENTRY.get_ptr_mut(&id) {
            // Only this thread touches its slot.
            Some(slot) => unsafe { *slot = sk },
            None => {
                let _ = QT_ACCEPT_ENTRY.insert(&id, &sk, 0);
            }
        }
    }
    0
}

#[kretprobe]
pub fn qt_acc_krp(ctx: RetProbeContext) -> u32 {
    if let Some(slot) = QT_ACCEPT_ENTRY.get_ptr_mut(&bpf_get_current_pid_tgid()) {
        // Zero: this return is accounted for (a return without its entry finds zero).
        let sk = unsafe { core::ptr::replace(slot, 0) } as *const u8;
        if !sk.is_null() {
            let _ = accepted(Untyped, sk, ctx.ret());
        }
    }
    0
}
