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

/// The fentry tier's programs for one stamp store, as named in `qtrace-ebpf/src/accept.rs`.
struct FentryPrograms {
    queue_add: &'static str,
    hashdance: &'static str,
    accept4: &'static str,
    accept2: &'static str,
}

const IN_SOCKET: FentryPrograms = FentryPrograms {
    queue_add: "qt_acc_qadd_fes",
    hashdance: "qt_acc_hd_fxs",
    accept4: "qt_acc_fx4s",
    accept2: "qt_acc_fx2s",
};

const IN_LRU: FentryPrograms = FentryPrograms {
    queue_add: "qt_acc_qadd_fe",
    hashdance: "qt_acc_hd_fx",
    accept4: "qt_acc_fx4",
    accept2: "qt_acc_fx2",
};

fn plan_for(tier: Tier, btf: &KernelBtf) -> Result<Plan, String> {
    // inet_csk_reqsk_queue_add may be inlined everywhere; the hashdance hook then covers it.
    let queue_add = btf.func_params(QUEUE_ADD).is_some();
    let step = |program, hook| Step { program, hook };
    let steps = |steps: Vec<Option<Step>>| steps.into_iter().flatten().collect();
    let fentry = |p: &FentryPrograms| -> Result<Vec<Step>, String> {
        Ok(steps(vec![
            queue_add.then(|| step(p.queue_add, Hook::Fentry(QUEUE_ADD))),
            Some(step(p.hashdance, Hook::Fexit(HASHDANCE))),
            // (sk, flags, err, kern) before 6.10, (sk, arg) since.
            Some(by_arity(btf, ACCEPT, &[(4, p.accept4), (2, p.accept2)])?),
        ]))
    };
    match tier {
        // Tracing programs may use socket storage since 5.11; before, the verifier refuses
        // the helper and the same hooks keep their stamps in an LRU hash.
        Tier::Fentry => Ok(Plan {
            steps: fentry(&IN_SOCKET)?,
            variant: Some("stamps in socket storage"),
            fallback: Some(Box::new(Plan {
                variant: Some("stamps in an LRU hash"),
                ..Plan::new(fentry(&IN_LRU)?)
            })),
        }),
        Tier::Kprobe => Ok(Plan::new(steps(vec![
            queue_add.then(|| step("qt_acc_qadd_kp", Hook::Kprobe(QUEUE_ADD))),
            Some(step("qt_acc_hd_krp", Hook::Kretprobe(HASHDANCE))),
            Some(step("qt_acc_kp", Hook::Kprobe(ACCEPT))),
            Some(step("qt_acc_krp", Hook::Kretprobe(ACCEPT))),
        ]))),
        Tier::Tracepoint => Err("no tracepoint fires on accept()".into()),
    }
}
