//! Time connect() spends choosing a local port: `inet_hash_connect()` and
//! `inet6_hash_connect()`, entry to return. Twin of `qtrace-ebpf/src/port_search.rs`.

use qtrace_common::maps;

use super::{attached, client, Area, Hook, Plan, ProbeStatus, Step, Tier};
use crate::kernel::btf::KernelBtf;

const V4: &str = "inet_hash_connect";
const V6: &str = "inet6_hash_connect";

pub const AREA: Area = Area {
    name: "port_search",
    // Its histogram is its own, like the client counters.
    feeds: &[],
    plan,
};

fn plan(tier: Tier, btf: &KernelBtf, before: &[ProbeStatus]) -> Option<Result<Plan, String>> {
    Some(plan_for(tier, btf, attached(before, &client::AREA)))
}

/// `with_client`: the client probe is attached, and its tracepoint at each connect()'s
/// SYN_SENT is the search's start.
fn plan_for(tier: Tier, btf: &KernelBtf, with_client: bool) -> Result<Plan, String> {
    for func in [V4, V6] {
        match btf.func_params(func) {
            Some(2) => {}
            Some(n) => return Err(format!("{func} takes {n} arguments, not (death_row, sk)")),
            None => return Err(format!("{func} is not in the kernel's BTF")),
        }
    }
    let step = |program, hook| Step { program, hook };
    let steps = match tier {
        Tier::Fentry if with_client => vec![
            step("qt_port_fxc", Hook::Fexit(V4)),
            step("qt_port6_fxc", Hook::Fexit(V6)),
        ],
        Tier::Fentry => vec![
            step("qt_port_fe", Hook::Fentry(V4)),
            step("qt_port_fx", Hook::Fexit(V4)),
            step("qt_port6_fe", Hook::Fentry(V6)),
            step("qt_port6_fx", Hook::Fexit(V6)),
        ],
        // The client probe's SYN_SENT fills the thread's slot the returns read, once switched
        // on (a kretprobe has no socket to find the client's record by).
        Tier::Kprobe if with_client => {
            return Ok(Plan {
                steps: vec![
                    step("qt_port_krp", Hook::Kretprobe(V4)),
                    step("qt_port_krp", Hook::Kretprobe(V6)),
                ],
                switch: Some(maps::PORT_START_AT_CONNECT),
            })
        }
        Tier::Kprobe => vec![
            step("qt_port_kp", Hook::Kprobe(V4)),
            step("qt_port_kp", Hook::Kprobe(V6)),
            step("qt_port_krp", Hook::Kretprobe(V4)),
            step("qt_port_krp", Hook::Kretprobe(V6)),
        ],
        Tier::Tracepoint => return Err("no tracepoint fires around the port search".into()),
    };
    Ok(Plan::new(steps))
}
