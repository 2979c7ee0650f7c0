//! SYN-ACK retransmits: the `tcp:tcp_retransmit_synack` tracepoint, on every tier.

use qtrace_common::Counter;

use super::{Area, Hook, Plan, ProbeStatus, Step, Tier};
use crate::kernel::btf::KernelBtf;

pub const AREA: Area = Area {
    name: "synack",
    feeds: &[Counter::SynackRetransmits],
    plan,
};

fn plan(tier: Tier, _btf: &KernelBtf, _: &[ProbeStatus]) -> Option<Result<Plan, String>> {
    // The tracepoint fires exactly where TCPSynRetrans is counted: no other hook is better.
    (tier == Tier::Tracepoint).then(|| {
        Ok(Plan::new(vec![Step {
            program: "qt_synack_tp",
            hook: Hook::Tracepoint("tcp_retransmit_synack"),
        }]))
    })
}
