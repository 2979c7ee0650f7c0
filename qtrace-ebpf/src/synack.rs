//! SYN-ACK retransmits: tracepoint `tcp:tcp_retransmit_synack(sk, req)`, fired by
//! `tcp_rtx_synack()` exactly where it counts TcpExtTCPSynRetrans.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use qtrace_common::{Counter, EventKind};

use crate::{
    account::{count, emit, Details},
    kernel::{listener_of_request, offset, AcceptQueue, Mem, Remote, Typed},
};

#[inline(always)]
fn on_retransmit(sk: *const u8, req: *const u8) -> Result<(), ()> {
    let l = listener_of_request(Typed, sk, req)?;
    let c = count(&l, Counter::SynackRetransmits).ok_or(())?;
    emit(c, EventKind::SynackRetransmit, || {
        // num_retrans is incremented by the caller after this tracepoint: retransmit n+1.
        let n: u8 = Typed.read(req, offset!(req_num_retrans)).unwrap_or(0);
        Details {
            remote: Remote::of_request(Typed, req, unsafe { (*c).id.family }).unwrap_or_default(),
            // Like a drop's: a SYN-queue length the helper fails to read is 0 alone.
            queues: AcceptQueue::read(Typed, sk)
                .unwrap_or_default()
                .with_synq(sk),
            retrans: n.wrapping_add(1),
        }
    });
    Ok(())
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn qt_synack_tp(ctx: BtfTracePointContext) -> i32 {
    let _ = on_retransmit(ctx.arg(0), ctx.arg(1));
    0
}
