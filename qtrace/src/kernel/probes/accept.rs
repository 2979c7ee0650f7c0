//! accept() and the accept-queue wait: `inet_csk_accept()`, the wait from the child's own
//! stamp (see the kernel half).

use qtrace_common::Counter;

use super::{by_arity, Area, Hook, Plan, ProbeStatus, Step, Tier};
use crate::kernel::btf::KernelBtf;

const ACCEPT: &str = "inet_csk_accept";

pub const AREA: Area = Area {
    name: "accept",
    feeds: &[Counter::Accepted],
    plan,
};

fn plan(tier: Tier, btf: &KernelBtf, _: &[ProbeStatus]) -> Option<Result<Plan, String>> {
    Some(plan_for(tier, btf))
}

fn plan_for(tier: Tier, btf: &KernelBtf) -> Result<Plan, String> {
    let step = |program, hook| Step { program, hook };
    let steps = match tier {
        // (sk, flags, err, kern) before 6.10, (sk, arg) since.
        Tier::Fentry => vec![by_arity(
            btf,
            ACCEPT,
            &[(4, "qt_acc_fx4"), (2, "qt_acc_fx2")],
        )?],
        Tier::Kprobe => vec![
            step("qt_acc_kp", Hook::Kprobe(ACCEPT)),
            step("qt_acc_krp", Hook::Kretprobe(ACCEPT)),
        ],
        Tier::Tracepoint => return Err("no tracepoint fires on accept()".into()),
    };
    Ok(Plan::new(steps))
}
