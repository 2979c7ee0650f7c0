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
        "## 1.", "## 1b.", "## 1c.", "## 2.", "## 3.", "## 3b.", "## 3c.", "## 3d.", "## 4.",
        "## 5.",
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

/// `report` with the section that `section` (`## N. …` up to the next `## `) regenerates
/// replaced, or inserted before the hand-written part when it has none yet. Churn (1) writes
/// section 2 too: a section runs until the next heading that is not one of its own.
pub(super) fn splice(report: &str, section: &str) -> String {
    let number = |s: &str| {
        s.strip_prefix("## ")?
            .split_once(". ")
            .map(|(n, _)| n.to_string())
    };
    let headings: Vec<String> = section.lines().filter_map(number).collect();
    let Some(first) = headings.first() else {
        return report.to_string();
    };
    let starts = |l: &str, n: &str| number(l).as_deref() == Some(n);
    let mut lines: Vec<&str> = report.lines().collect();
    let start = lines.iter().position(|l| starts(l, first));
    let (start, end) = match start {
        Some(s) => {
            let end = lines[s + 1..]
                .iter()
                .position(|l| l.starts_with("## ") && !headings.iter().any(|h| starts(l, h)))
                .map_or(lines.len(), |e| s + 1 + e);
            (s, end)
        }
        None => {
            let at = lines
                .iter()
                .position(|l| l.starts_with(READING))
                .unwrap_or(lines.len());
            (at, at)
        }
    };
    let new: Vec<&str> = section.lines().collect();
    lines.splice(start..end, new);
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

pub(super) fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

pub(super) fn fmt3((a, b, c): (f64, f64, f64)) -> String {
    format!("{a:.0} / {b:.0} / {c:.0}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_replaces_its_own_and_keeps_the_rest() {
        let report = "# h\n\n## 1. A\n\nold 1\n\n## 2. B\n\nold 2\n\n## 3. C\n\nold 3\n\n\
                      ## Reading these figures\n\nprose\n";
        // Churn writes 1 and 2 together.
        let both = splice(report, "## 1. A\n\nnew 1\n\n## 2. B\n\nnew 2\n\n");
        assert_eq!(
            both,
            "# h\n\n## 1. A\n\nnew 1\n\n## 2. B\n\nnew 2\n\n## 3. C\n\nold 3\n\n\
             ## Reading these figures\n\nprose\n"
        );
        // A section the report lacks goes before the hand-written part.
        let added = splice(report, "## 6. F\n\nnew 6\n\n");
        assert!(
            added.ends_with("old 3\n\n## 6. F\n\nnew 6\n\n## Reading these figures\n\nprose\n"),
            "{added}"
        );
    }
}
