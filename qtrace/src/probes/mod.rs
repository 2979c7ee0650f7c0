//! Attaching each probe area at the best tier the running kernel allows.
//!
//! Tiers, best first: fentry/fexit (BPF trampolines), kprobe/kretprobe, tracepoint. Support is
//! decided by loading and attaching for real — feature probes lie on some kernels — and any
//! error falls down one tier. What no tier can see is reported as unavailable, never as zero.

mod accept;
mod ack;
mod syn;
mod synack;
mod tier;

pub use tier::Tier;

use std::{collections::HashSet, fmt};

use anyhow::{anyhow, Context, Result};
use aya::{
    programs::{BtfTracePoint, FEntry, FExit, KProbe, Program},
    Btf, Ebpf,
};
use qtrace_common::Counter;
use serde::Serialize;

use crate::btf::KernelBtf;

/// Where one program attaches.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    Fentry(&'static str),
    Fexit(&'static str),
    Kprobe(&'static str),
    Kretprobe(&'static str),
    /// A BTF-typed (raw) tracepoint.
    Tracepoint(&'static str),
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::Fentry(s) => write!(f, "fentry:{s}"),
            Hook::Fexit(s) => write!(f, "fexit:{s}"),
            Hook::Kprobe(s) => write!(f, "kprobe:{s}"),
            Hook::Kretprobe(s) => write!(f, "kretprobe:{s}"),
            Hook::Tracepoint(s) => write!(f, "tp_btf:{s}"),
        }
    }
}

/// One program of the eBPF object at one hook.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub program: &'static str,
    pub hook: Hook,
}

/// What a probe area attaches at one tier (every tier of an area sees all it feeds).
pub struct Plan {
    pub steps: Vec<Step>,
}

/// A probe area: one module here and one in `qtrace-ebpf/src/`.
pub struct Area {
    pub name: &'static str,
    /// The counters this area feeds at its best tier.
    pub feeds: &'static [Counter],
    /// The plan for a tier on this kernel, or why the kernel cannot offer that tier; None
    /// when the area has no programs of that tier (a tracepoint-only area).
    pub plan: fn(Tier, &KernelBtf) -> Option<Result<Plan, String>>,
}

pub const AREAS: [&Area; 4] = [&syn::AREA, &ack::AREA, &synack::AREA, &accept::AREA];

/// How one area ended up attached.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeStatus {
    pub probe: &'static str,
    /// None: unavailable on this kernel.
    pub tier: Option<Tier>,
    pub hooks: Vec<String>,
    /// Why better tiers (or all tiers) failed.
    pub fallbacks: Vec<String>,
}

/// Whether `counter` is complete: every area that feeds it is attached.
pub fn counter_available(statuses: &[ProbeStatus], counter: Counter) -> bool {
    if counter == Counter::EventsRateLimited {
        return true;
    }
    AREAS
        .iter()
        .zip(statuses)
        .filter(|(area, _)| area.feeds.contains(&counter))
        .all(|(_, status)| status.tier.is_some())
}

/// Attaches every area at the best tier not better than `best`.
pub fn attach_all(
    ebpf: &mut Ebpf,
    btf: &Btf,
    kbtf: &KernelBtf,
    best: Tier,
) -> Result<Vec<ProbeStatus>> {
    let mut statuses = Vec::new();
    for area in AREAS {
        let mut status = ProbeStatus {
            probe: area.name,
            tier: None,
            hooks: Vec::new(),
            fallbacks: Vec::new(),
        };
        for tier in Tier::ALL.into_iter().filter(|t| *t >= best) {
            let plan = match (area.plan)(tier, kbtf) {
                None => continue,
                Some(Ok(plan)) => plan,
                Some(Err(why)) => {
                    status.fallbacks.push(format!("{tier}: {why}"));
                    continue;
                }
            };
            match attach_plan(ebpf, btf, &plan.steps) {
                Ok(()) => {
                    status.tier = Some(tier);
                    status.hooks = plan.steps.iter().map(|s| s.hook.to_string()).collect();
                    break;
                }
                Err(err) => {
                    tracing::debug!("probe {}: {tier} failed: {err:?}", area.name);
                    status
                        .fallbacks
                        .push(format!("{tier}: {}", first_line(&err)));
                    for step in &plan.steps {
                        unload(ebpf, step.program);
                    }
                }
            }
        }
        statuses.push(status);
    }
    Ok(statuses)
}

fn first_line(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    let line = text.lines().next().unwrap_or_default();
    // Verifier logs follow the first line; the summary is enough here.
    match line.find(". Verifier output") {
        Some(cut) => line[..cut].to_string(),
        None => line.to_string(),
    }
}

fn attach_plan(ebpf: &mut Ebpf, btf: &Btf, steps: &[Step]) -> Result<()> {
    let mut loaded = HashSet::new();
    for step in steps {
        let program = ebpf
            .program_mut(step.program)
            .ok_or_else(|| anyhow!("program {} is not in the eBPF object", step.program))?;
        let first = loaded.insert(step.program);
        let what = || format!("{} at {}", step.program, step.hook);
        match step.hook {
            Hook::Fentry(func) => {
                let p: &mut FEntry = program.try_into()?;
                p.load(func, btf).with_context(what)?;
                p.attach().with_context(what)?;
            }
            Hook::Fexit(func) => {
                let p: &mut FExit = program.try_into()?;
                p.load(func, btf).with_context(what)?;
                p.attach().with_context(what)?;
            }
            Hook::Kprobe(func) | Hook::Kretprobe(func) => {
                let p: &mut KProbe = program.try_into()?;
                if first {
                    p.load().with_context(what)?;
                }
                p.attach(func, 0).with_context(what)?;
            }
            Hook::Tracepoint(tp) => {
                let p: &mut BtfTracePoint = program.try_into()?;
                p.load(tp, btf).with_context(what)?;
                p.attach().with_context(what)?;
            }
        }
    }
    Ok(())
}

/// Detaches and unloads a program after a failed tier, so nothing of it stays in the kernel.
fn unload(ebpf: &mut Ebpf, name: &str) {
    let result = match ebpf.program_mut(name) {
        Some(Program::FEntry(p)) => p.unload(),
        Some(Program::FExit(p)) => p.unload(),
        Some(Program::KProbe(p)) => p.unload(),
        Some(Program::BtfTracePoint(p)) => p.unload(),
        _ => Ok(()),
    };
    // NotLoaded is expected for the steps after the one that failed.
    if let Err(err) = result {
        tracing::debug!("unload {name}: {err}");
    }
}

/// The fexit program of a family whose variants differ only in the traced function's arity
/// (fexit reads the return value right after the arguments).
fn by_arity(
    kbtf: &KernelBtf,
    func: &'static str,
    variants: &[(usize, &'static str)],
) -> Result<Step, String> {
    let n = kbtf
        .func_params(func)
        .ok_or_else(|| format!("{func} is not in the kernel's BTF"))?;
    variants
        .iter()
        .find(|(arity, _)| *arity == n)
        .map(|(_, program)| Step {
            program,
            hook: Hook::Fexit(func),
        })
        .ok_or_else(|| format!("{func} takes {n} arguments, which qtrace does not know"))
}
