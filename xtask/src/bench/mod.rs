//! `cargo xtask bench`: qtrace's cost, measured as ratios in one interleaved run, written to
//! BENCHMARKS.md with the command that reproduces it. Never timing asserts: `--smoke` runs
//! every benchmark at a tiny size and checks only that results are well formed.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};

mod ack_storm;
mod churn;
mod daemon;
mod event_path;
mod exhaust;
mod guest;
mod nginx;
mod port_search;
mod report;
mod scale;
mod storm;

pub use self::guest::guest;
use self::{churn::*, daemon::*, event_path::*, guest::*, report::*, scale::*, storm::*};

#[derive(clap::Args)]
pub struct Options {
    /// Tiny sizes, to check the harness works (part of `cargo xtask test`).
    #[arg(long)]
    pub smoke: bool,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Only these sections (e.g. `--only 4,5`): each replaces its own section of the report
    /// and the rest is kept as it was, so one change's figures can be regenerated alone. `1`
    /// writes 1 and 2; `1b`, the guest's, writes 1b and 1c (nginx); `1c` boots a guest for
    /// nginx alone; `3d` boots a guest of its own.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// This qtrace binary instead of a fresh release build: to compare two builds back to
    /// back under the same load (`--out` elsewhere, so BENCHMARKS.md is left alone).
    #[arg(long)]
    pub qtrace: Option<PathBuf>,
}

/// `xtask bench-guest`: what the benchmark's guest kernel runs.
#[derive(clap::Args)]
pub struct GuestOptions {
    #[arg(long)]
    rounds: usize,
    #[arg(long)]
    millis: u64,
    /// The qtrace binary (packed at its host path).
    #[arg(long)]
    qtrace: PathBuf,
    /// Only nginx's rounds (1c), not the churn (1b).
    #[arg(long)]
    nginx_only: bool,
    /// Only the port-search steps (3d).
    #[arg(long)]
    port_search: bool,
    /// 3d: ports in the namespace's `ip_local_port_range`.
    #[arg(long, default_value_t = 4000)]
    port_range: u16,
    /// 3d: connects timed at each step.
    #[arg(long, default_value_t = 2000)]
    port_batch: usize,
}

struct Sizes {
    rounds: usize,
    round: Duration,
    guest_rounds: usize,
    guest_round: Duration,
    storm: Duration,
    namespaces: usize,
    listeners_per_ns: usize,
    /// /metrics scrapes at scale: enough for a p99 that is not just the maximum.
    scrapes: usize,
    burst: usize,
    /// 3d: the port range's size, and the connects timed at each step.
    port_range: u16,
    port_batch: usize,
}

pub fn bench(opts: Options) -> Result<()> {
    let sizes = if opts.smoke {
        Sizes {
            rounds: 1,
            round: Duration::from_millis(300),
            // The guest's statistics round only (see `Churn::run`): its emulated time is
            // mostly the tracers' start-ups, bpftrace's above all.
            guest_rounds: 0,
            guest_round: Duration::from_millis(1000),
            storm: Duration::from_millis(500),
            namespaces: 2,
            listeners_per_ns: 10,
            scrapes: 5,
            burst: 50,
            port_range: 400,
            port_batch: 50,
        }
    } else {
        Sizes {
            rounds: 5,
            round: Duration::from_secs(3),
            guest_rounds: 5,
            guest_round: Duration::from_secs(3),
            storm: Duration::from_secs(10),
            namespaces: 10,
            listeners_per_ns: 1000,
            scrapes: 200,
            burst: 5000,
            port_range: 4000,
            port_batch: 2000,
        }
    };
    let qtrace = match &opts.qtrace {
        Some(path) => std::fs::canonicalize(path)?,
        None => crate::build_release()?,
    };
    type Section = fn(&Path, &Sizes) -> Result<String>;
    let sections: [(&str, Section); 9] = [
        ("1", churn),
        ("1b", guest_churn),
        ("1c", guest_nginx),
        ("3", storm),
        ("3b", ack_storm::ack_storm),
        ("3c", exhaust::connect_storm),
        ("3d", port_search::port_search),
        ("4", scale),
        ("5", event_path),
    ];
    if let Some(unknown) = opts
        .only
        .iter()
        .find(|o| !sections.iter().any(|(n, _)| n == o))
    {
        anyhow::bail!("--only {unknown}: no such section (1, 1b, 1c, 3, 3b, 3c, 3d, 4, 5)");
    }
    if !opts.only.is_empty() {
        let mut new = Vec::new();
        for (_, run) in sections
            .iter()
            .filter(|(n, _)| opts.only.contains(&n.to_string()))
        {
            let section = run(&qtrace, &sizes)?;
            print!("{section}");
            new.push(section);
        }
        // Read once every section has run (a guest takes half an hour): edits made to the
        // report meanwhile stay.
        let mut report = std::fs::read_to_string(&opts.out).unwrap_or_default();
        for section in &new {
            report = splice(&report, section);
        }
        return std::fs::write(&opts.out, &report)
            .with_context(|| format!("write {}", opts.out.display()));
    }
    let mut report = header(&opts)?;
    // 1b's guest runs 1c too: not twice.
    for (_, run) in sections.iter().filter(|(n, _)| *n != "1c") {
        report += &run(&qtrace, &sizes)?;
    }
    print!("{report}");
    // The people's reading of the last figures stays, under its heading, to be revised.
    if let Some(reading) = std::fs::read_to_string(&opts.out)
        .ok()
        .and_then(|old| Some(old[old.find(READING)?..].to_string()))
    {
        report += &reading;
    }
    std::fs::write(&opts.out, &report).with_context(|| format!("write {}", opts.out.display()))?;
    if opts.smoke {
        check_well_formed(&report)?;
    }
    Ok(())
}
