//! accept(): `inet_csk_accept()` returning a connection, and the time it waited in the accept
//! queue since `inet_csk_reqsk_queue_add()` put it there.
//!
//! The queue-add is hooked both directly (syncookie and Fast Open children are added from other
//! files) and through `inet_csk_complete_hashdance()`'s return, because the compiler may inline
//! the add into it; the two stamps of one child are microseconds apart. A stamp always
//! overwrites.
//!
//! Where the stamp lives: on the fentry tier of kernels that let tracing programs use socket
//! storage (5.11+), on the child socket itself — no hashing, no shared LRU lists, and a child
//! closed before accept() takes its stamp with it. Elsewhere (5.10, kprobes) in an LRU hash
//! keyed by the child's address, where such a child's stamp ages out or is overwritten when the
//! address is reused.

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE},
    cty::c_void,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    },
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use qtrace_common::{Counter, SelfStat};

use crate::{
    account::{count, observe_wait, self_stat},
    kernel::listener_key,
};

/// Where a child's queue-add time waits for accept().
trait Stamps {
    fn put(child: *const u8, now: u64);
    /// The stamp, removed.
    fn take(child: *const u8) -> Option<u64>;
}

/// child socket → when it joined the accept queue. LRU: children closed before accept() age out.
#[map]
static QT_ACCEPT_QUEUED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

struct InLru;

impl Stamps for InLru {
    #[inline(always)]
    fn put(child: *const u8, now: u64) {
        if QT_ACCEPT_QUEUED.insert(&(child as u64), &now, 0).is_err() {
            self_stat(SelfStat::AcceptMapFull);
        }
    }

    #[inline(always)]
    fn take(child: *const u8) -> Option<u64> {
        let id = child as u64;
        let t = unsafe { *QT_ACCEPT_QUEUED.get_ptr(&id)? };
        let _ = QT_ACCEPT_QUEUED.remove(&id);
        Some(t)
    }
}

/// A BTF-defined map, as the kernel requires for socket storage (aya-ebpf 0.2 has no type for
/// it): the members' types carry the map type, flags, key and value.
#[repr(C)]
struct SkStorageDef {
    r#type: *const [i32; 24], // BPF_MAP_TYPE_SK_STORAGE
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    key: *const i32,
    value: *const u64,
}

// SAFETY: never dereferenced; the kernel owns the map this describes.
unsafe impl Sync for SkStorageDef {}

/// The child socket's queue-add time, stored on the socket.
#[unsafe(link_section = ".maps")]
#[unsafe(no_mangle)]
static QT_ACCEPT_STAMP: SkStorageDef = SkStorageDef {
    r#type: null_mut(),
    map_flags: null_mut(),
    key: null_mut(),
    value: null_mut(),
};

struct InSocket;

impl InSocket {
    #[inline(always)]
    fn map() -> *mut c_void {
        &QT_ACCEPT_STAMP as *const SkStorageDef as *mut c_void
    }
}

impl Stamps for InSocket {
    #[inline(always)]
    fn put(child: *const u8, now: u64) {
        let flags = BPF_SK_STORAGE_GET_F_CREATE as u64;
        let slot =
            unsafe { bpf_sk_storage_get(Self::map(), child as *mut c_void, null_mut(), flags) };
        if slot.is_null() {
            self_stat(SelfStat::AcceptMapFull);
            return;
        }
        unsafe { *(slot as *mut u64) = now };
    }

    #[inline(always)]
    fn take(child: *const u8) -> Option<u64> {
        let slot = unsafe { bpf_sk_storage_get(Self::map(), child as *mut c_void, null_mut(), 0) };
        if slot.is_null() {
            return None;
        }
        let t = unsafe { *(slot as *const u64) };
        // Freed now rather than with the socket, which may stay open for days.
        unsafe { bpf_sk_storage_delete(Self::map(), child as *mut c_void) };
        Some(t)
    }
}

/// pid_tgid → listener, between inet_csk_accept's entry and return (kprobe tier only).
#[map]
static QT_ACCEPT_ENTRY: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn queued<S: Stamps>(child: *const u8) {
    if !child.is_null() {
        S::put(child, unsafe { bpf_ktime_get_ns() });
    }
}

#[inline(always)]
fn accepted<S: Stamps>(sk: *const u8, child: *const u8) -> Result<(), ()> {
    if child.is_null() {
        return Ok(());
    }
    let key = listener_key(sk)?;
    let c = count(&key, Counter::Accepted).ok_or(())?;
    if let Some(t) = S::take(child) {
        observe_wait(c, unsafe { bpf_ktime_get_ns() }.saturating_sub(t));
    }
    Ok(())
}

/// The fentry-tier programs for one stamp store (their names end in `s` for socket storage).
macro_rules! fentry_tier {
    ($store:ty, $qadd:ident, $hashdance:ident, $accept4:ident, $accept2:ident) => {
        // inet_csk_reqsk_queue_add(sk, req, child) -> struct sock *
        #[fentry(function = "inet_csk_reqsk_queue_add")]
        pub fn $qadd(ctx: FEntryContext) -> i32 {
            queued::<$store>(ctx.arg(2));
            0
        }

        // inet_csk_complete_hashdance(sk, child, req, own_req) -> child if it was queued
        #[fexit(function = "inet_csk_complete_hashdance")]
        pub fn $hashdance(ctx: FExitContext) -> i32 {
            queued::<$store>(ctx.arg(4));
            0
        }

        // inet_csk_accept(sk, flags, err, kern) before 6.10, inet_csk_accept(sk, arg) since.
        #[fexit(function = "inet_csk_accept")]
        pub fn $accept4(ctx: FExitContext) -> i32 {
            let _ = accepted::<$store>(ctx.arg(0), ctx.arg(4));
            0
        }

        #[fexit(function = "inet_csk_accept")]
        pub fn $accept2(ctx: FExitContext) -> i32 {
            let _ = accepted::<$store>(ctx.arg(0), ctx.arg(2));
            0
        }
    };
}

fentry_tier!(
    InSocket,
    qt_acc_qadd_fes,
    qt_acc_hd_fxs,
    qt_acc_fx4s,
    qt_acc_fx2s
);
fentry_tier!(InLru, qt_acc_qadd_fe, qt_acc_hd_fx, qt_acc_fx4, qt_acc_fx2);

#[kprobe]
pub fn qt_acc_qadd_kp(ctx: ProbeContext) -> u32 {
    if let Some(child) = ctx.arg(2) {
        queued::<InLru>(child);
    }
    0
}

#[kretprobe]
pub fn qt_acc_hd_krp(ctx: RetProbeContext) -> u32 {
    queued::<InLru>(ctx.ret());
    0
}

#[kprobe]
pub fn qt_acc_kp(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        let _ = QT_ACCEPT_ENTRY.insert(&bpf_get_current_pid_tgid(), &sk, 0);
    }
    0
}

#[kretprobe]
pub fn qt_acc_krp(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if let Some(sk) = QT_ACCEPT_ENTRY.get_ptr(&id) {
        let sk = unsafe { *sk } as *const u8;
        let _ = QT_ACCEPT_ENTRY.remove(&id);
        let _ = accepted::<InLru>(sk, ctx.ret());
    }
    0
}
