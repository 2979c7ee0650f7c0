//! Attaching each probe area at the best tier the running kernel allows.
//!
//! Tiers, best first: fentry/fexit (BPF trampolines), kprobe/kretprobe, tracepoint. Support is
//! decided by loading and attaching for real — feature probes lie on some kernels — and any
//! error falls down one tier. What no tier can see is reported as unavailable, never as zero.
//! One module per area, named as its kernel twin in `qtrace-ebpf/src/`.

mod accept;
mod ack;
mod client;
mod port_search;
mod syn;
mod synack;

use std::{collections::HashSet, fmt};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::Array,
    programs::{BtfTracePoint, FEntry, FExit, KProbe, Program},
    Btf, Ebpf,
};
use qtrace_common::{Counter, DropReason};

pub use crate::api::{ProbeStatus, Tier};
use crate::kernel::btf::KernelBtf;

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
    /// A one-entry u32 array map set to 1 before the steps attach (and back to 0 if they
    /// fail): a program already attached does work for this plan only when it is.
    pub switch: Option<&'static str>,
}

impl Plan {
    pub fn new(steps: Vec<Step>) -> Self {
        Plan {
            steps,
            switch: None,
        }
    }
}

/// An area's plan for a tier (see [`Area::plan`]).
pub type PlanFn = fn(Tier, &KernelBtf, &[ProbeStatus]) -> Option<Result<Plan, String>>;

/// A probe area: one module here and one in `qtrace-ebpf/src/`.
pub struct Area {
    pub name: &'static str,
    /// The counters this area feeds at its best tier.
    pub feeds: &'static [Counter],
    /// The plan for a tier on this kernel, given the areas attached before it (in [`AREAS`]'
    /// order), or why the kernel cannot offer that tier; None when the area has no programs of
    /// that tier (a tracepoint-only area).
    pub plan: PlanFn,
}

pub const AREAS: [&Area; 6] = [
    &syn::AREA,
    &ack::AREA,
    &synack::AREA,
    &accept::AREA,
    // Before port_search, whose fentry tier reads the client probe's record.
    &client::AREA,
    &port_search::AREA,
];

/// Whether the client probe is attached: the client counters are all its own, so without it
/// they are unavailable (absent), never 0.
pub fn client_available(statuses: &[ProbeStatus]) -> bool {
    attached(statuses, &client::AREA)
}

/// Whether the port-search probe is attached (fentry or kprobe tiers only): without it the
/// histogram is unavailable (absent), never empty.
pub fn port_search_available(statuses: &[ProbeStatus]) -> bool {
    attached(statuses, &port_search::AREA)
}

fn attached(statuses: &[ProbeStatus], area: &Area) -> bool {
    statuses
        .iter()
        .any(|s| s.probe == area.name && s.tier.is_some())
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

/// Which counters the attached probes can see: what no attached probe sees is unavailable
/// (`null` in JSON, `n/a` in tables, absent from /metrics), never 0.
#[derive(Clone, Copy, Debug)]
pub struct Visibility([bool; Counter::COUNT]);

impl Visibility {
    pub fn of(probes: &[ProbeStatus]) -> Self {
        let mut v = [false; Counter::COUNT];
        for c in Counter::ALL {
            v[c as usize] = counter_available(probes, c);
        }
        Self(v)
    }

    pub fn sees(&self, c: Counter) -> bool {
        self.0[c as usize]
    }

    /// Whether every drop reason has its probe attached: only where one is missing are there
    /// drops no probe classifies (`unclassified`, from the sockets' own drop counts).
    pub fn classifies_every_drop(&self) -> bool {
        DropReason::ALL.iter().all(|r| self.sees(r.counter()))
    }
}

/// The attach step of a plan, apart from the fallback logic so that logic can be tested
/// without a kernel.
pub trait Attach {
    /// Loads and attaches every step of one tier's plan.
    fn attach(&mut self, plan: &Plan) -> Result<()>;
    /// Detaches and unloads a program after a failed tier.
    fn unload(&mut self, program: &str);
}

/// The eBPF object: programs load and attach for real.
struct Kernel<'a> {
    ebpf: &'a mut Ebpf,
    btf: &'a Btf,
}

impl Attach for Kernel<'_> {
    fn attach(&mut self, plan: &Plan) -> Result<()> {
        let Some(switch) = plan.switch else {
            return attach_plan(self.ebpf, self.btf, &plan.steps);
        };
        set_switch(self.ebpf, switch, 1)?;
        let attached = attach_plan(self.ebpf, self.btf, &plan.steps);
        if attached.is_err() {
            if let Err(err) = set_switch(self.ebpf, switch, 0) {
                tracing::warn!("{err:#}");
            }
        }
        attached
    }

    fn unload(&mut self, program: &str) {
        unload(self.ebpf, program)
    }
}

/// Attaches every area at the best tier not better than `best`, except the areas named in
/// `off`, which are left unavailable.
pub fn attach_all(
    ebpf: &mut Ebpf,
    btf: &Btf,
    kbtf: &KernelBtf,
    best: Tier,
    off: &[String],
) -> Result<Vec<ProbeStatus>> {
    check_names(off)?;
    let mut kernel = Kernel { ebpf, btf };
    let mut statuses = Vec::with_capacity(AREAS.len());
    for area in AREAS {
        let status = if off.iter().any(|o| o == area.name) {
            turned_off(area.name)
        } else {
            let before = &statuses[..];
            attach_area(
                area.name,
                |tier| (area.plan)(tier, kbtf, before),
                best,
                &mut kernel,
            )
        };
        statuses.push(status);
    }
    Ok(statuses)
}

/// Every name in `names` is a probe area's.
fn check_names(names: &[String]) -> Result<()> {
    match names
        .iter()
        .find(|n| AREAS.iter().all(|a| a.name != n.as_str()))
    {
        None => Ok(()),
        Some(unknown) => {
            let known: Vec<_> = AREAS.iter().map(|a| a.name).collect();
            anyhow::bail!(
                "unknown probe {unknown:?} in --probes; the probes are {}",
                known.join(", ")
            )
        }
    }
}

/// An area left off by `--probes -NAME`: unavailable, and saying why.
fn turned_off(name: &str) -> ProbeStatus {
    ProbeStatus {
        probe: name.to_string(),
        tier: None,
        hooks: Vec::new(),
        fallbacks: vec!["turned off by --probes".into()],
    }
}

/// One area: its plans tried in tier order from `best` down, the first that attaches kept;
/// each failure is recorded, and what it loaded unloaded.
pub fn attach_area(
    name: &str,
    plan: impl Fn(Tier) -> Option<Result<Plan, String>>,
    best: Tier,
    attach: &mut impl Attach,
) -> ProbeStatus {
    let mut status = ProbeStatus {
        probe: name.to_string(),
        tier: None,
        hooks: Vec::new(),
        fallbacks: Vec::new(),
    };
    for tier in Tier::ALL.into_iter().filter(|t| *t >= best) {
        let plan = match plan(tier) {
            None => continue,
            Some(Ok(plan)) => plan,
            Some(Err(why)) => {
                status.fallbacks.push(format!("{tier}: {why}"));
                continue;
            }
        };
        match attach.attach(&plan) {
            Ok(()) => {
                status.tier = Some(tier);
                status.hooks = plan.steps.iter().map(|s| s.hook.to_string()).collect();
                break;
            }
            Err(err) => {
                tracing::debug!("probe {name}: {tier} failed: {err:?}");
                status
                    .fallbacks
                    .push(format!("{tier}: {}", first_line(&err)));
                for step in &plan.steps {
                    attach.unload(step.program);
                }
            }
        }
    }
    status
}

/// The error's first line; for a program the verifier rejected, with the verifier's reason
/// (the last line of its log before its statistics), which says what to look at. The whole
/// log is at debug level.
fn first_line(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    let line = text.lines().next().unwrap_or_default();
    let Some(cut) = text.find(". Verifier output") else {
        return line.to_string();
    };
    let summary = &text[..cut.min(line.len())];
    let reason = text[cut..]
        .lines()
        .skip(1)
        .map(str::trim)
        // After the log, `{:#}` appends the error's source (": Permission denied …").
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with(':')
                && !l.starts_with("processed ")
                && !l.starts_with("verification time")
                // 6.x and later print the frame sizes after the time.
                && !l.starts_with("stack depth")
        })
        .last();
    match reason {
        Some(r) => format!("{summary} (verifier: {r})"),
        None => summary.to_string(),
    }
}

fn set_switch(ebpf: &mut Ebpf, name: &str, on: u32) -> Result<()> {
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| anyhow!("map {name} is not in the eBPF object"))?;
    let mut array: Array<_, u32> = Array::try_from(map)?;
    array
        .set(0, on, 0)
        .with_context(|| format!("set {name} to {on}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Attaches only programs of the tiers it is told work; records what happened.
    #[derive(Default)]
    struct Fake {
        works: Vec<&'static str>,
        attached: Vec<&'static str>,
        unloaded: Vec<String>,
    }

    impl Attach for Fake {
        fn attach(&mut self, plan: &Plan) -> Result<()> {
            for s in &plan.steps {
                if !self.works.contains(&s.program) {
                    anyhow::bail!(
                        "{} at {}: load failed. Verifier output: …",
                        s.program,
                        s.hook
                    );
                }
                self.attached.push(s.program);
            }
            Ok(())
        }

        fn unload(&mut self, program: &str) {
            self.unloaded.push(program.to_string());
        }
    }

    /// An area with two programs at fentry, one at kprobe (whose plan may be refused) and,
    /// unless `tp` is false, one tracepoint.
    fn plan(kprobe_refused: bool, tp: bool) -> impl Fn(Tier) -> Option<Result<Plan, String>> {
        move |tier| match tier {
            Tier::Fentry => Some(Ok(Plan::new(vec![
                Step {
                    program: "fe",
                    hook: Hook::Fentry("f"),
                },
                Step {
                    program: "fx",
                    hook: Hook::Fexit("f"),
                },
            ]))),
            Tier::Kprobe if kprobe_refused => Some(Err("f takes 9 arguments".into())),
            Tier::Kprobe => Some(Ok(Plan::new(vec![Step {
                program: "kp",
                hook: Hook::Kprobe("f"),
            }]))),
            Tier::Tracepoint => tp.then(|| {
                Ok(Plan::new(vec![Step {
                    program: "tp",
                    hook: Hook::Tracepoint("t"),
                }]))
            }),
        }
    }

    #[test]
    fn a_verifier_rejection_says_why_in_one_line() {
        let err = anyhow!(
            "qt_ack_krp at kretprobe:f: the BPF_PROG_LOAD syscall returned Permission denied \
             (os error 13). Verifier output: 0: (bf) r6 = r1\n1: (79) r1 = *(u64 *)(r6 +104)\n\
             R1 invalid mem access 'inv'\nverification time 9 usec\nstack depth 80\n\
             processed 12 insns (limit 1000000)\n: Permission denied (os error 13)"
        );
        assert_eq!(
            first_line(&err),
            "qt_ack_krp at kretprobe:f: the BPF_PROG_LOAD syscall returned Permission denied \
             (os error 13) (verifier: R1 invalid mem access 'inv')"
        );
        assert_eq!(
            first_line(&anyhow!("no such function\nmore")),
            "no such function"
        );
    }

    #[test]
    fn the_best_tier_that_attaches_is_kept() {
        let mut k = Fake {
            works: vec!["fe", "fx", "kp", "tp"],
            ..Default::default()
        };
        let s = attach_area("x", plan(false, true), Tier::Fentry, &mut k);
        assert_eq!(s.tier, Some(Tier::Fentry));
        assert_eq!(s.hooks, ["fentry:f", "fexit:f"]);
        assert!(s.fallbacks.is_empty());
        assert_eq!(k.attached, ["fe", "fx"], "lower tiers are not tried");
    }

    #[test]
    fn a_failed_tier_is_unloaded_and_the_next_tried_in_order() {
        // fexit fails after fentry loaded: both are unloaded; kprobe's plan is refused.
        let mut k = Fake {
            works: vec!["fe", "tp"],
            ..Default::default()
        };
        let s = attach_area("x", plan(true, true), Tier::Fentry, &mut k);
        assert_eq!(s.tier, Some(Tier::Tracepoint));
        assert_eq!(s.hooks, ["tp_btf:t"]);
        assert_eq!(
            s.fallbacks,
            [
                "fentry: fx at fexit:f: load failed",
                "kprobe: f takes 9 arguments"
            ]
        );
        assert_eq!(k.unloaded, ["fe", "fx"]);
    }

    #[test]
    fn a_cap_skips_better_tiers_and_nothing_attached_is_unavailable() {
        let mut k = Fake {
            works: vec!["fe", "fx"],
            ..Default::default()
        };
        // Capped at kprobe: fentry, which would work, is never tried; no tracepoint plan.
        let s = attach_area("x", plan(false, false), Tier::Kprobe, &mut k);
        assert_eq!(s.tier, None);
        assert!(s.hooks.is_empty());
        assert_eq!(s.fallbacks.len(), 1, "{:?}", s.fallbacks);
        assert!(s.fallbacks[0].starts_with("kprobe: "), "{:?}", s.fallbacks);
        assert!(k.attached.is_empty());
    }

    #[test]
    fn a_counter_is_visible_only_when_every_area_feeding_it_attached() {
        let status = |probe: &str, tier| ProbeStatus {
            probe: probe.into(),
            tier,
            hooks: Vec::new(),
            fallbacks: Vec::new(),
        };
        let mut probes: Vec<ProbeStatus> = AREAS
            .iter()
            .map(|a| status(a.name, Some(Tier::Fentry)))
            .collect();
        assert!(Counter::ALL
            .iter()
            .all(|&c| Visibility::of(&probes).sees(c)));
        probes[0].tier = None; // syn
        let vis = Visibility::of(&probes);
        assert!(
            !vis.sees(Counter::DropOther),
            "ack feeds it too, syn is missing"
        );
        assert!(!vis.sees(Counter::DropSynQueueFull));
        assert!(vis.sees(Counter::DropAcceptQueueFullAck));
        assert!(vis.sees(Counter::EventsRateLimited));
    }
}
