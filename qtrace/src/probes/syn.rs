//! SYN arrival at a listener: `tcp_conn_request()` entry and return.

use qtrace_common::Counter;

use super::{Area, Hook, Plan, Step, Tier};
use crate::btf::KernelBtf;

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

fn plan(tier: Tier, _btf: &KernelBtf) -> Option<Result<Plan, String>> {
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
    Some(Ok(Plan {
        steps: vec![enter, exit],
        blind_to: &[],
    }))
}
