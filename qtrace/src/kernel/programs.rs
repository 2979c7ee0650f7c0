//! qtrace's own programs as the kernel accounts for them, read from each program's fdinfo
//! (`/proc/self/fdinfo/<fd>`: no walk over every program on the host):
//!
//! - runs and run time, kept only while `kernel.bpf_stats_enabled=1` (they cost time of their
//!   own);
//! - recursion misses (Linux 5.12+, always kept): the times the kernel skipped a program
//!   because the same program was already running on that CPU, e.g. a state change in a
//!   softirq that interrupted the program's run for another socket. Each is an event no
//!   counter saw, so it is exported as a loss, like a full map's.

use std::{
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use aya::{programs::ProgramFd, Ebpf};

/// The programs attached: their names and a descriptor of each.
pub struct Programs(Vec<(String, ProgramFd)>);

/// One program's statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramStats {
    pub name: String,
    /// Runs and the time spent in them; None unless `kernel.bpf_stats_enabled=1`.
    pub runs: Option<(u64, Duration)>,
    /// None where the kernel does not report them (before 5.12).
    pub recursion_misses: Option<u64>,
}

impl Programs {
    /// The loaded programs of `ebpf` (a program of a tier that did not attach is unloaded).
    pub fn of(ebpf: &Ebpf) -> Self {
        Programs(
            ebpf.programs()
                .filter_map(|(name, p)| Some((name.to_string(), p.fd().ok()?.try_clone().ok()?)))
                .collect(),
        )
    }

    /// Every program's statistics now; a program whose fdinfo cannot be read is left out.
    pub fn stats(&self) -> Vec<ProgramStats> {
        let timed = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .is_ok_and(|s| s.trim() == "1");
        self.0
            .iter()
            .filter_map(|(name, fd)| {
                let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
                let info = std::fs::read_to_string(path).ok()?;
                Some(parse(name, &info, timed))
            })
            .collect()
    }
}

/// A program's fdinfo (`kernel/bpf/syscall.c`: `bpf_prog_show_fdinfo`, "key:\tvalue" lines).
fn parse(name: &str, info: &str, timed: bool) -> ProgramStats {
    let field = |key: &str| -> Option<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    let runs = match (timed, field("run_cnt"), field("run_time_ns")) {
        (true, Some(n), Some(ns)) => Some((n, Duration::from_nanos(ns))),
        _ => None,
    };
    ProgramStats {
        name: name.to_string(),
        runs,
        recursion_misses: field("recursion_misses"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FDINFO_6_12: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2075\n\
        prog_type:\t26\nprog_jited:\t1\nprog_tag:\t5c051d54b8691a8b\nmemlock:\t4096\n\
        prog_id:\t412\nrun_time_ns:\t69000\nrun_cnt:\t276\nrecursion_misses:\t3\n\
        verified_insns:\t1024\n";

    #[test]
    fn fdinfo_gives_misses_always_and_runs_only_while_timed() {
        let s = parse("qt_client_state", FDINFO_6_12, true);
        assert_eq!(s.runs, Some((276, Duration::from_micros(69))));
        assert_eq!(s.recursion_misses, Some(3));
        let s = parse("qt_client_state", FDINFO_6_12, false);
        assert_eq!(s.runs, None);
        assert_eq!(s.recursion_misses, Some(3));
    }

    #[test]
    fn a_kernel_without_the_field_reports_no_misses_not_zero() {
        let before_5_12 = FDINFO_6_12.replace("recursion_misses:\t3\n", "");
        assert_eq!(parse("p", &before_5_12, true).recursion_misses, None);
        // A longer key sharing the prefix is not the field.
        assert_eq!(parse("p", "run_cnt_x:\t5\n", true).runs, None);
    }
}
