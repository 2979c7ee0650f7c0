//! SYN arrival at a listener: `tcp_conn_request()` entry and return.

use qtrace_common::Counter;

use super::{Area, Hook, Plan, ProbeStatus, Step, Tier};
use crate::kernel::btf::KernelBtf;

const FUNC: &str = "tcp_conn_request";

pub const AREA: Area = Area {
    name: "syn",
    feeds: &[
        Counter::SynQueued,
        Counter::DropSynQueueFull,
        Counter::DropAcceptQueueFullSyn,
        Counter::DropOther,
        Counter::SyncookiesSent,
    ],
    plan,
};

fn plan(tier: Tier, btf: &KernelBtf, _: &[ProbeStatus]) -> Option<Result<Plan, String>> {
    let (enter, exit) = match tier {
        Tier::Fentry => (
            Step {
                program: "qt_syn_fe",
                hook: Hook::Fentry(FUNC),
            },
            Step {
                program: "qt_syn_fx",
                hook: Hook::Fexit(FUNC),
            },
        ),
        Tier::Kprobe => (
            Step {
                program: "qt_syn_kp",
                hook: Hook::Kprobe(FUNC),
            },
            Step {
                program: "qt_syn_krp",
                hook: Hook::Kretprobe(FUNC),
            },
        ),
        Tier::Tracepoint => {
            return Some(Err(
                "no tracepoint fires when a SYN is queued or dropped".into()
            ));
        }
    };
    let mut steps = vec![enter, exit];
    // Must match `HookLayout::syn_decisions_hooked`, which tells the programs to rely on these.
    if let Some((flood, cookies)) = btf.syn_decision_functions() {
        let fentry = tier == Tier::Fentry;
        steps.push(Step {
            program: if fentry {
                "qt_flood_fx"
            } else {
                "qt_flood_krp"
            },
            hook: if fentry {
                Hook::Fexit(flood)
            } else {
                Hook::Kretprobe(flood)
            },
        });
        for func in cookies {
            let (program, hook) = match (fentry, func.contains("v6")) {
                (true, false) => ("qt_cookie4_fe", Hook::Fentry(func)),
                (true, true) => ("qt_cookie6_fe", Hook::Fentry(func)),
                (false, _) => ("qt_cookie_kp", Hook::Kprobe(func)),
            };
            steps.push(Step { program, hook });
        }
    }
    Some(Ok(Plan::new(steps)))
}
