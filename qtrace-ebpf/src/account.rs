//! Exact per-listener counting and rate-limited event emission.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
    Global,
};
use qtrace_common::{
    Counter, Event, EventKind, ListenerCounters, ListenerKey, SelfStat, WAIT_BUCKETS,
};

use crate::kernel::{Listener, Mem, Queues, Remote};
use crate::self_stats::self_stat;

/// Listeners of system users (uid below `QT_FIRST_USER_UID`), keyed by [`Listener::id`].
/// Sized by user space (`--max-listeners`) before load; entries of closed sockets are deleted
/// by user space.
#[map]
static QT_LISTENERS: PerCpuHashMap<u64, ListenerCounters> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// Every other user's listeners, sized like `QT_LISTENERS`: a user who opens thousands of
/// listening sockets fills this one and can never push a service's listeners out.
#[map]
static QT_USER_LISTENERS: PerCpuHashMap<u64, ListenerCounters> =
    PerCpuHashMap::with_max_entries(4096, 0);

#[unsafe(no_mangle)]
static QT_FIRST_USER_UID: Global<u32> = Global::new(1000);

/// Sized by user space before load.
#[map]
static QT_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// A zeroed value to insert new listeners from (too large for the BPF stack).
#[map]
static QT_ZERO: PerCpuArray<ListenerCounters> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static QT_EVENT_RATE: Global<u32> = Global::new(100);

/// This CPU's counters of listener `l`, created on first use in its owner's partition, with
/// the listener's key written in on this CPU's first use.
#[inline(always)]
pub fn counters<M: Mem>(l: &Listener<M>) -> Option<*mut ListenerCounters> {
    let c = entry(l)?;
    // SAFETY: this CPU's value of a live map entry; only this CPU writes it.
    if unsafe { (*c).id.netns } == 0 {
        unsafe { (*c).id = l.key().ok()? };
    }
    Some(c)
}

#[inline(always)]
fn entry<M: Mem>(l: &Listener<M>) -> Option<*mut ListenerCounters> {
    let id = &l.id;
    if let Some(c) = QT_LISTENERS.get_ptr_mut(id) {
        return Some(c);
    }
    if let Some(c) = QT_USER_LISTENERS.get_ptr_mut(id) {
        return Some(c);
    }
    let map = if l.uid().ok()? < QT_FIRST_USER_UID.load() {
        &QT_LISTENERS
    } else {
        &QT_USER_LISTENERS
    };
    let zero = QT_ZERO.get_ptr(0)?;
    // EEXIST from a racing CPU is fine: the lookup below finds its entry.
    let _ = map.insert(id, unsafe { &*zero }, BPF_NOEXIST as u64);
    let c = map.get_ptr_mut(id);
    if c.is_none() {
        self_stat(SelfStat::ListenerMapFull);
    }
    c
}

#[inline(always)]
pub fn bump(c: *mut ListenerCounters, counter: Counter) {
    unsafe { (*c).counts[counter as usize] += 1 };
}

/// Counts `counter` for listener `l`; returns the counters so an event can follow.
#[inline(always)]
pub fn count<M: Mem>(l: &Listener<M>, counter: Counter) -> Option<*mut ListenerCounters> {
    let c = counters(l)?;
    bump(c, counter);
    Some(c)
}

const NS_PER_SEC: u64 = 1_000_000_000;

/// Token bucket per listener and CPU: `QT_EVENT_RATE` events a second, bursts of as many.
#[inline(always)]
fn take_token(c: *mut ListenerCounters, now: u64) -> bool {
    let c = unsafe { &mut *c };
    take(
        &mut c.rl_tokens,
        &mut c.rl_refill_ns,
        &mut c.counts[Counter::EventsRateLimited as usize],
        now,
    )
}

/// One token of a bucket (`tokens`, last refilled at `refill_ns`), or the event counted as
/// rate-limited in `limited` and qtrace's own statistics. Shared by the listeners' buckets and
/// the client destinations'.
#[inline(always)]
pub fn take(tokens: &mut u64, refill_ns: &mut u64, limited: &mut u64, now: u64) -> bool {
    let rate = QT_EVENT_RATE.load() as u64;
    let elapsed = now.wrapping_sub(*refill_ns);
    if elapsed >= NS_PER_SEC {
        *tokens = rate;
        *refill_ns = now;
    } else {
        let add = elapsed * rate / NS_PER_SEC;
        if add > 0 {
            *tokens = core::cmp::min(rate, *tokens + add);
            // Advance by the time those tokens took, keeping the remainder for the next one.
            *refill_ns += add * NS_PER_SEC / rate;
        }
    }
    if *tokens == 0 {
        *limited += 1;
        self_stat(SelfStat::RateLimited);
        return false;
    }
    *tokens -= 1;
    true
}

/// What an event tells beyond its listener and kind.
pub struct Details {
    pub remote: Remote,
    pub queues: Queues,
    /// Which retransmit this is (SYN-ACK retransmits; 0 otherwise).
    pub retrans: u8,
}

/// Puts one event on the ring buffer unless the listener's rate limit or a full ring buffer
/// stops it; either way it is counted. Its details are read only for an event that goes
/// out: in a storm almost every event is rate-limited, and reading the packet's or the
/// request's addresses would cost more than the rest of the drop's accounting.
#[inline(always)]
pub fn emit(c: *mut ListenerCounters, kind: EventKind, details: impl FnOnce() -> Details) {
    emit_two(c, kind, None, details)
}

/// [`emit`] for a packet that makes two events (a dropped final ACK answered with a reset),
/// each under the rate limit, sharing one reading of the details. `details` is called at one
/// place only, so it is inlined: as a closure called twice it became a BPF subprogram whose
/// stack frame, added to the caller's, passed the 512-byte limit on 5.10.
#[inline(always)]
pub fn emit_two(
    c: *mut ListenerCounters,
    kind: EventKind,
    then: Option<EventKind>,
    details: impl FnOnce() -> Details,
) {
    let now = unsafe { bpf_ktime_get_ns() };
    let first = take_token(c, now);
    let second = match then {
        Some(k) if take_token(c, now) => Some(k),
        _ => None,
    };
    if !first && second.is_none() {
        return;
    }
    let d = details();
    // SAFETY: `c` came from `counters()`, which wrote this CPU's copy of the key.
    let key = unsafe { &(*c).id };
    if first {
        put(key, kind, &d, now);
    }
    if let Some(k) = second {
        put(key, k, &d, now);
    }
}

#[inline(always)]
fn put(key: &ListenerKey, kind: EventKind, d: &Details, now: u64) {
    submit(Event {
        ts_ns: now,
        listener: *key,
        raddr: d.remote.addr,
        rport: d.remote.port,
        kind: kind as u8,
        retrans: d.retrans,
        acceptq_len: d.queues.acceptq.len,
        acceptq_max: d.queues.acceptq.max,
        synq_len: d.queues.synq_len,
        synq_max: d.queues.acceptq.max,
        pid: 0,
    });
}

/// Puts `event` on the ring buffer, or counts it lost to a full one.
#[inline(always)]
pub fn submit(event: Event) {
    let Some(mut entry) = QT_EVENTS.reserve::<Event>(0) else {
        self_stat(SelfStat::RingbufFull);
        return;
    };
    entry.write(event);
    entry.submit(0);
}

/// Log2 bucket of a wait in microseconds (see `WAIT_BUCKETS`), without loops or clz; of any
/// duration in its unit (the port search's nanoseconds).
#[inline(always)]
pub fn wait_bucket(us: u64) -> usize {
    if us == 0 {
        return 0;
    }
    let mut v = us;
    let mut b = 1usize;
    if v >= 1 << 32 {
        v >>= 32;
        b += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        b += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        b += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        b += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        b += 2;
    }
    if v >= 1 << 1 {
        b += 1;
    }
    if b >= WAIT_BUCKETS {
        WAIT_BUCKETS - 1
    } else {
        b
    }
}

/// Records one accept-queue wait.
#[inline(always)]
pub fn observe_wait(c: *mut ListenerCounters, wait_ns: u64) {
    let b = wait_bucket(wait_ns / 1000);
    let c = unsafe { &mut *c };
    if let Some(slot) = c.wait_buckets.get_mut(b) {
        *slot += 1;
    }
    c.wait_sum_ns += wait_ns;
}
