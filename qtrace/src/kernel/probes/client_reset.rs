//! `reset` of the client side: `sock:inet_sock_set_state` with the connecting task kept in the
//! socket's own BPF storage, which tracing programs may use from Linux 5.11; before that the
//! program does not load and `reset` is unavailable. Twin of `qtrace-ebpf/src/client_reset.rs`.

use super::{client::tracepoints, Area, Hook, Step, Tier};

pub const AREA: Area = Area {
    name: "client_reset",
    // The listener counters: none. Its client counter (`reset`) is shown only where it is
    // attached (`client_reset_available`).
    feeds: &[],
    plan: |tier, btf| {
        // The helper tracing programs get from 5.11 on: its absence says why in one line
        // where the verifier's own refusal would name a register.
        if tier == Tier::Tracepoint && btf.func_params("bpf_sk_storage_delete_tracing").is_none() {
            return Some(Err(
                "socket storage in tracing programs needs Linux 5.11 or later".into(),
            ));
        }
        tracepoints(
            tier,
            btf,
            &[Step {
                program: "qt_client_reset",
                hook: Hook::Tracepoint("inet_sock_set_state"),
            }],
        )
    },
};
