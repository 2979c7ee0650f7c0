//! The final ACK at a listener: `tcp_v4/v6_syn_recv_sock()` failing, or (tracepoint tier)
//! `skb:kfree_skb` with reason TCP_LISTEN_OVERFLOW.

use qtrace_common::Counter;

use super::{by_arity, Area, Hook, Plan, ProbeStatus, Step, Tier};
use crate::kernel::btf::KernelBtf;

const V4: &str = "tcp_v4_syn_recv_sock";
const V6: &str = "tcp_v6_syn_recv_sock";

pub const AREA: Area = Area {
    name: "ack",
    feeds: &[
        Counter::DropAcceptQueueFullAck,
        Counter::DropOther,
        Counter::OverflowResets,
    ],
    plan,
};

fn plan(tier: Tier, btf: &KernelBtf, _: &[ProbeStatus]) -> Option<Result<Plan, String>> {
    Some(plan_for(tier, btf))
}

fn plan_for(tier: Tier, btf: &KernelBtf) -> Result<Plan, String> {
    let steps = match tier {
        // The entries keep this CPU's listen-drop counters for the returns (the kernel's own
        // "accept queue full" verdict); the kprobe tier's entry does the same.
        Tier::Fentry => vec![
            Step {
                program: "qt_ack4_fe",
                hook: Hook::Fentry(V4),
            },
            Step {
                program: "qt_ack6_fe",
                hook: Hook::Fentry(V6),
            },
            by_arity(btf, V4, &[(6, "qt_ack4_fx6"), (7, "qt_ack4_fx7")])?,
            by_arity(btf, V6, &[(6, "qt_ack6_fx6"), (7, "qt_ack6_fx7")])?,
        ],
        Tier::Kprobe => vec![
            Step {
                program: "qt_ack_kp",
                hook: Hook::Kprobe(V4),
            },
            Step {
                program: "qt_ack_kp",
                hook: Hook::Kprobe(V6),
            },
            Step {
                program: "qt_ack_krp",
                hook: Hook::Kretprobe(V4),
            },
            Step {
                program: "qt_ack_krp",
                hook: Hook::Kretprobe(V6),
            },
        ],
        Tier::Tracepoint => {
            if btf.listen_overflow_drop_reason().is_none() {
                return Err("skb:kfree_skb has no TCP_LISTEN_OVERFLOW reason with the \
                            receiving socket before Linux 6.15"
                    .into());
            }
            return Ok(Plan::new(vec![Step {
                program: "qt_ack_tp",
                hook: Hook::Tracepoint("kfree_skb"),
            }]));
        }
    };
    Ok(Plan::new(steps))
}
