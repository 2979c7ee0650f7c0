//! `qtrace probes`: attach every probe as `run` would, say which tier each got and why better
//! tiers failed, then detach. What an operator (and the kernel-matrix harness) asks first.

use std::io::{self, Write};

use anyhow::Result;

use crate::{
    api::ProbesReport,
    config::{ConfigArg, DaemonArgs, TracerArgs},
    kernel::tracer::Tracer,
};

#[derive(Clone, Debug, clap::Args)]
pub struct ProbesOptions {
    #[command(flatten)]
    pub tracer: TracerArgs,
    #[command(flatten)]
    pub config: ConfigArg,
    /// One JSON object: {"kernel": …, "probes": [{probe, tier, hooks, fallbacks}]}.
    #[arg(long)]
    pub json: bool,
}

pub fn probes(opts: ProbesOptions) -> Result<()> {
    let settings = opts.config.settings(&opts.tracer, &DaemonArgs::default())?;
    let tracer = Tracer::start(&settings.tracer)?;
    let kernel = kernel_release();
    let mut out = io::stdout().lock();
    if opts.json {
        let report = ProbesReport {
            kernel,
            probes: tracer.probes.clone(),
        };
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
        return Ok(());
    }
    writeln!(out, "kernel {kernel}")?;
    for p in &tracer.probes {
        let tier = p.tier.map_or("unavailable".to_string(), |t| t.to_string());
        writeln!(out, "{:<8} {tier:<12} {}", p.probe, p.hooks.join(", "))?;
        for why in &p.fallbacks {
            writeln!(out, "{:<8} {:<12} not: {why}", "", "")?;
        }
    }
    Ok(())
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}
