//! accept() and the accept-queue wait: `inet_csk_reqsk_queue_add()` /
//! `inet_csk_complete_hashdance()` to `inet_csk_accept()`.

use qtrace_common::Counter;

use super::{by_arity, Area, Hook, Plan, Step, Tier};
use crate::btf::KernelBtf;

const QUEUE_ADD: &str = "inet_csk_reqsk_queue_add";
const HASHDANCE: &str = "inet_csk_complete_hashdance";
const ACCEPT: &str = "inet_csk_accept";

pub const AREA: Area = Area {
    name: "accept",
    feeds: &[Counter::Accepted],
    plan,
};

fn plan(tier: Tier, btf: &KernelBtf) -> Option<Result<Plan, String>> {
    Some(plan_for(tier, btf))
}

fn plan_for(tier: Tier, btf: &KernelBtf) -> Result<Plan, String> {
    let steps = match tier {
        Tier::Fentry => vec![
            Step {
                program: "qt_acc_qadd_fe",
                hook: Hook::Fentry(QUEUE_ADD),
            },
            Step {
                program: "qt_acc_hd_fx",
                hook: Hook::Fexit(HASHDANCE),
            },
            // (sk, flags, err, kern) before 6.10, (sk, arg) since.
            by_arity(btf, ACCEPT, &[(4, "qt_acc_fx4"), (2, "qt_acc_fx2")])?,
        ],
        Tier::Kprobe => vec![
            Step {
                program: "qt_acc_qadd_kp",
                hook: Hook::Kprobe(QUEUE_ADD),
            },
            Step {
                program: "qt_acc_hd_krp",
                hook: Hook::Kretprobe(HASHDANCE),
            },
            Step {
                program: "qt_acc_kp",
                hook: Hook::Kprobe(ACCEPT),
            },
            Step {
                program: "qt_acc_krp",
                hook: Hook::Kretprobe(ACCEPT),
            },
        ],
        Tier::Tracepoint => return Err("no tracepoint fires on accept()".into()),
    };
    Ok(Plan {
        steps,
        blind_to: &[],
    })
}
