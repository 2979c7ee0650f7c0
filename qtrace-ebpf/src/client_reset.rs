//! `reset`: a connection the client opened (connect() succeeded, so the kernel reported no
//! handshake failure) that the server resets before sending a byte, counted per (network
//! namespace, process, destination) with the other connect() failures. In SYN_SENT the kernel
//! turns a reset into ECONNREFUSED (`tcp_reset`), so ECONNRESET never ends a handshake the
//! client sees under way; the handshake an SRE calls reset is one the server never completed:
//! with `net.ipv4.tcp_abort_on_overflow=1` and a full accept queue, the client is
//! ESTABLISHED once it has the SYN-ACK, and the server answers its final ACK or first data
//! with a reset. Counted at ESTABLISHED→CLOSE when `sk_err` is ECONNRESET (`tcp_reset`; an
//! application's own abort, `tcp_disconnect`, sets its error only after the state change) and
//! `tcp_sock.bytes_received` is still 0.
//!
//! One tracepoint, `sock:inet_sock_set_state`, no per-packet cost. The reset arrives in
//! softirq context, where the current task is anyone: the owner is the task that called
//! connect(), kept from CLOSE→SYN_SENT in the socket's own BPF storage (`QT_CLIENT_OWNERS`)
//! until the socket leaves SYN_SENT for anything but ESTABLISHED, or leaves ESTABLISHED. That
//! record is also what tells an active open from a server's child: storage is not cloned
//! into a listener's children, so a child reset before sending data is never counted. The
//! storage lives in the socket and is freed with it by the kernel, so it has no capacity to
//! fill and nothing to leak; it costs one small allocation per connect().
//!
//! Tracing programs may use socket storage from Linux 5.11 (`bpf_sk_storage_get` for
//! tracing): before that the program does not load, and `reset` is unavailable, not 0.

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::{btf_map, btf_tracepoint},
    programs::BtfTracePointContext,
};
use qtrace_common::{vocabulary::ECONNRESET, ClientCounter, ConnectOwner, EventKind};

use crate::{
    client::{
        client_offset, count, current_owner, IPPROTO_TCP, TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT,
    },
    kernel::{probe_read, Mem, Typed},
};

/// Actively opened sockets, from connect() until they leave ESTABLISHED → who called
/// connect().
#[btf_map]
static QT_CLIENT_OWNERS: SkStorage<ConnectOwner> = SkStorage::new();

#[inline(always)]
fn owners() -> *mut core::ffi::c_void {
    core::ptr::addr_of!(QT_CLIENT_OWNERS).cast_mut().cast()
}

#[inline(always)]
fn on_state(sk: *const u8, old: i32, new: i32) -> Result<(), ()> {
    if new == TCP_SYN_SENT {
        // connect(): the current task is the owner.
        let protocol: u16 = Typed.read(sk, client_offset!(sk_protocol))?;
        if protocol == IPPROTO_TCP {
            let mut owner = current_owner();
            // NULL when the allocation fails: then this connection's reset is not counted.
            unsafe {
                bpf_sk_storage_get(
                    owners(),
                    sk.cast_mut().cast(),
                    core::ptr::addr_of_mut!(owner).cast(),
                    BPF_SK_STORAGE_GET_F_CREATE.into(),
                )
            };
        }
        return Ok(());
    }
    // Every TCP state change passes here: only an active open's next steps go further.
    if !(old == TCP_SYN_SENT && new != TCP_ESTABLISHED) && old != TCP_ESTABLISHED {
        return Ok(());
    }
    let record =
        unsafe { bpf_sk_storage_get(owners(), sk.cast_mut().cast(), core::ptr::null_mut(), 0) }
            as *const ConnectOwner;
    if record.is_null() {
        // Not an active open (a server's child), or opened before qtrace started.
        return Ok(());
    }
    let owner = unsafe { *record };
    unsafe { bpf_sk_storage_delete(owners(), sk.cast_mut().cast()) };
    if old != TCP_ESTABLISHED || new != TCP_CLOSE {
        return Ok(());
    }
    let err: i32 = Typed.read(sk, client_offset!(sk_err))?;
    // Through the helper: tcp_sock lies beyond the `struct sock` the tracepoint declares.
    if err != ECONNRESET || probe_read::<u64>(sk, client_offset!(tcp_bytes_received))? != 0 {
        return Ok(());
    }
    count(
        sk,
        owner,
        ClientCounter::ConnectReset,
        EventKind::ConnectReset,
    )
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn qt_client_reset(ctx: BtfTracePointContext) -> i32 {
    let _ = on_state(ctx.arg(0), ctx.arg(1), ctx.arg(2));
    0
}
