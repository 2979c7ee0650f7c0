//! accept(): `inet_csk_accept()` returning a connection, and the time it waited in the accept
//! queue.
//!
//! The wait needs no hook where a connection joins the queue: the kernel stamps every child
//! itself. `tcp_init_buffer_space()` sets `tcp_sock.rcvq_space.time` to the microsecond clock
//! (`tcp_clock_us()`, CLOCK_MONOTONIC like `bpf_ktime_get_ns()`) when the child turns
//! ESTABLISHED, just after `inet_csk_reqsk_queue_add()` queued it (final ACK, syncookie and
//! Fast Open children alike), and only the receive path of an accepted socket
//! (`tcp_rcv_space_adjust()`, from recvmsg) moves it again. Reading it at accept() replaced a
//! hand-off hook and an LRU insert and delete per connection (BENCHMARKS.md 1b). A child
//! accepted before the CPU that queued it has stamped it (a few instructions apart) reads the
//! listener's copy, 0: it waited no time, and is counted so.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_skc_to_tcp_sock},
    macros::{fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use qtrace_common::Counter;

use crate::{
    account::{count, observe_wait},
    kernel::{listener, offset, probe_read, Mem, Typed, Untyped},
};

/// pid_tgid → listener, between inet_csk_accept's entry and return (kprobe tier only). A
/// thread's slot is written at entry and zeroed at return in place, and reused by its next
/// accept(): an LRU insert and delete per accept() cost more than the rest of the probe.
#[map]
static QT_ACCEPT_ENTRY: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// How long `child` waited in the accept queue, from its own stamp.
#[inline(always)]
fn queued_for<M: Mem>(child: *const u8) -> u64 {
    let stamp_us: u64 = if M::TYPED {
        // tcp_sock lies beyond the `struct sock` the hook declares: the helper gives it typed
        // (one call, then a load), or NULL for a child that is not TCP (`inet_csk_accept`
        // also serves DCCP before 6.16, whose sockets have no such stamp).
        let tp = unsafe { bpf_skc_to_tcp_sock(child.cast_mut().cast()) } as *const u8;
        if tp.is_null() {
            return 0;
        }
        Typed.read(tp, offset!(tcp_rcvq_time)).unwrap_or(0)
    } else {
        probe_read(child, offset!(tcp_rcvq_time)).unwrap_or(0)
    };
    if stamp_us == 0 {
        return 0;
    }
    unsafe { bpf_ktime_get_ns() }.saturating_sub(stamp_us.wrapping_mul(1000))
}

#[inline(always)]
fn accepted<M: Mem>(m: M, sk: *const u8, child: *const u8) -> Result<(), ()> {
    if child.is_null() {
        return Ok(());
    }
    let c = count(&listener(m, sk)?, Counter::Accepted).ok_or(())?;
    observe_wait(c, queued_for::<M>(child));
    Ok(())
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
