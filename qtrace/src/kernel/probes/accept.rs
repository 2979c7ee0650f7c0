//! accept() and the accept-queue wait: `inet_csk_reqsk_queue_add()` /
//! `inet_csk_complete_hashdance()` to `inet_csk_accept()`.

use qtrace_common::Counter;

use super::{by_arity, Area, Hook, Plan, Step, Tier};
use crate::kernel::btf::KernelBtf;

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
    // inet_csk_reqsk_queue_add may be inlined everywhere; the hashdance hook then covers it.
    let queue_add = btf.func_params(QUEUE_ADD).is_some();
    let step = |program, hook| Step { program, hook };
    let steps = match tier {
        Tier::Fentry => vec![
            queue_add.then(|| step("qt_acc_qadd_fe", Hook::Fentry(QUEUE_ADD))),
            Some(step("qt_acc_hd_fx", Hook::Fexit(HASHDANCE))),
            // (sk, flags, err, kern) before 6.10, (sk, arg) since.
            Some(by_arity(
                btf,
                ACCEPT,
                &[(4, "qt_acc_fx4"), (2, "qt_acc_fx2")],
            )?),
        ],
        Tier::Kprobe => vec![
            queue_add.then(|| step("qt_acc_qadd_kp", Hook::Kprobe(QUEUE_ADD))),
            Some(step("qt_acc_hd_krp", Hook::Kretprobe(HASHDANCE))),
            Some(step("qt_acc_kp", Hook::Kprobe(ACCEPT))),
            Some(step("qt_acc_krp", Hook::Kretprobe(ACCEPT))),
        ],
        Tier::Tracepoint => return Err("no tracepoint fires on accept()".into()),
    };
    Ok(Plan {
        steps: steps.into_iter().flatten().collect(),
    })
}
