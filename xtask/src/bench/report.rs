//! The report: BENCHMARKS.md's generated header and the checks of the smoke run.

use std::{process::Command, thread};

use anyhow::Result;

use super::*;

/// The heading of BENCHMARKS.md's hand-written part, which a new run keeps.
pub(super) const READING: &str = "## Reading these figures";

pub(super) fn header(opts: &Options) -> Result<String> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_string))
        .unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    // Which source the figures belong to ("-dirty": with uncommitted changes).
    let source = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".into(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        });
    Ok(format!(
        "# qtrace benchmarks\n\nReproduce: `cargo xtask bench{}` (as root) at commit {source}. Machine: {cpu}, {cpus} CPUs, kernel {kernel}. \
         Each comparison is a ratio of runs interleaved in the same invocation; figures are \
         min / median / max over the rounds.\n\n",
        if opts.smoke { " --smoke" } else { "" }
    ))
}

/// Every figure line must carry numbers: what the smoke run checks.
pub(super) fn check_well_formed(report: &str) -> Result<()> {
    for section in [
        "## 1.", "## 1b.", "## 2.", "## 3.", "## 3b.", "## 4.", "## 5.",
    ] {
        anyhow::ensure!(report.contains(section), "report lacks section {section}");
    }
    let rows = report
        .lines()
        .filter(|l| l.starts_with("| ") && l.chars().any(|c| c.is_ascii_digit()))
        .count();
    anyhow::ensure!(rows >= 8, "report has only {rows} rows with figures");
    anyhow::ensure!(!report.contains("NaN"), "NaN in the report");
    Ok(())
}

pub(super) fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

pub(super) fn fmt3((a, b, c): (f64, f64, f64)) -> String {
    format!("{a:.0} / {b:.0} / {c:.0}")
}
