//! The client side of the handshake: `sock:inet_sock_set_state` (connect() failures by
//! reason, resets before the first byte) and `tcp:tcp_retransmit_skb` (SYN retransmits), on
//! every tier. Twin of `qtrace-ebpf/src/client.rs`.

use super::{Area, Hook, Plan, ProbeStatus, Step, Tier};
use crate::kernel::btf::KernelBtf;

pub const AREA: Area = Area {
    name: "client",
    // The listener counters: none. The client counters are all this area's.
    feeds: &[],
    plan,
};

fn plan(tier: Tier, btf: &KernelBtf, _: &[ProbeStatus]) -> Option<Result<Plan, String>> {
    // The state-change tracepoint sees every way a handshake ends (the errno is set before
    // the socket goes to CLOSE) at no per-packet cost; no function hook would see more.
    // `bpf_get_current_task_btf` (5.11) reads the owner's name with two loads, and BPF's
    // compare-and-swap (5.12, with the recursion-miss count `bpf_prog_stats.misses`: BTF has
    // no type for an instruction set) claims a record's slot; before both, through the helper
    // and into the hash alone.
    let typed = btf.func_params("bpf_get_current_task_btf").is_some()
        && btf.offset("bpf_prog_stats", "misses").is_ok();
    let state = if typed {
        "qt_client_state"
    } else {
        "qt_client_state_untyped"
    };
    tracepoints(
        tier,
        btf,
        &[
            Step {
                program: state,
                hook: Hook::Tracepoint("inet_sock_set_state"),
            },
            Step {
                program: "qt_client_rtx",
                hook: Hook::Tracepoint("tcp_retransmit_skb"),
            },
        ],
    )
}

/// A client-side plan: its tracepoint `steps`, at the tracepoint tier alone, where the kernel's
/// BTF has every member the client programs read.
pub(super) fn tracepoints(
    tier: Tier,
    btf: &KernelBtf,
    steps: &[Step],
) -> Option<Result<Plan, String>> {
    (tier == Tier::Tracepoint).then(|| {
        btf.client_offsets().map_err(|e| format!("{e:#}"))?;
        Ok(Plan::new(steps.to_vec()))
    })
}
