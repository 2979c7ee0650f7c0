//! 1b: the churn in Debian's 6.12 kernel under QEMU (`xtask bench-guest` inside), with the
//! fentry round under `perf record` and its profile table.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use qtrace_testkit::Netns;
use serde_json::Value;

use super::*;

/// In the guest: the interleaved churn of every guest configuration, one `@@QTRACE bench`
/// JSON line per measurement. Nothing else in the guest loads BPF programs, so every program
/// that ran is the tracer's.
pub fn guest(opts: GuestOptions) -> Result<()> {
    if opts.port_search {
        return super::port_search::guest_steps(opts.port_range, opts.port_batch, &opts.qtrace);
    }
    if !opts.nginx_only {
        guest_churn_rounds(&opts)?;
    }
    super::nginx::guest_rounds(
        opts.rounds,
        Duration::from_millis(opts.millis),
        &opts.qtrace,
    )
}

fn guest_churn_rounds(opts: &GuestOptions) -> Result<()> {
    let ns = Netns::new("bench-guest")?;
    Churn::run(
        &ns,
        &GUEST_CONFIGS,
        (opts.rounds, Duration::from_millis(opts.millis)),
        &opts.qtrace,
        "",
        |c, timed, cps, programs| {
            let line = serde_json::json!({
                "config": c.name(), "timed": timed, "cps": cps, "programs": programs,
            });
            println!("{GUEST_MARKER}{line}");
        },
    )?;
    profile_round(&ns, Duration::from_millis(opts.millis), &opts.qtrace)
}

/// How the guest's rounds ran, for the report.
pub(super) fn rounds_phrase(z: &Sizes) -> String {
    match z.guest_rounds {
        0 => format!(
            "one round of {:?} per configuration (a smoke run: no warm-up)",
            z.guest_round
        ),
        n => format!(
            "{n} rounds of {:?} per configuration, interleaved, after a warm-up round",
            z.guest_round
        ),
    }
}

pub(super) const GUEST_MARKER: &str = "@@QTRACE bench ";
pub(super) const PROFILE_MARKER: &str = "@@QTRACE profile ";

pub(super) fn fifo(path: &str) -> Result<PathBuf> {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path)?;
    // SAFETY: a valid C string.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        bail!("mkfifo {path}: {}", std::io::Error::last_os_error());
    }
    Ok(PathBuf::from(path))
}

/// One more round at the fentry tier under `perf record` (cpu-clock: with the guest's clock
/// counting instructions, each sample stands for as many instructions), printed as the
/// share of samples per symbol: where a traced connection's instructions go.
pub(super) fn profile_round(ns: &Netns, round: Duration, qtrace: &Path) -> Result<()> {
    let data = Path::new("/tmp/qtrace-bench.perf");
    let (ctl, ack) = (fifo("/tmp/qtrace-perf.ctl")?, fifo("/tmp/qtrace-perf.ack")?);
    let running = Config::QtraceFentry.start(qtrace)?;
    // Started disabled (-D -1) and switched on and off through its control fifo, so neither
    // perf's own start-up nor its exit is in the samples.
    let record = Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            "4000",
            "-a",
            "-B",
            "-N",
            "-q",
            "-D",
            "-1",
        ])
        .arg(format!(
            "--control=fifo:{},{}",
            ctl.display(),
            ack.display()
        ))
        .arg("-o")
        .arg(data)
        .stdout(Stdio::null())
        .spawn()
        .context("perf (apt package linux-perf)")?;
    let recording = Interrupted(record);
    // Read-write, so opening does not wait for perf to open its end.
    let rw = || std::fs::OpenOptions::new().read(true).write(true).clone();
    let mut ctl_w = rw().open(&ctl)?;
    let mut ack_r = BufReader::new(rw().open(&ack)?);
    let mut command = |c: &str| -> Result<()> {
        writeln!(ctl_w, "{c}")?;
        let mut line = String::new();
        ack_r.read_line(&mut line)?;
        // perf writes its acknowledgement with the string's terminating NUL.
        let reply = line.trim_matches(|c: char| c == '\0' || c.is_whitespace());
        anyhow::ensure!(reply == "ack", "perf did not acknowledge {c}: {line:?}");
        Ok(())
    };
    command("enable")?;
    churn_round(ns, round, CLIENTS)?;
    command("disable")?;
    drop(recording);
    drop(running);
    let report = Command::new("perf")
        .args(["report", "--stdio", "--sort", "sym", "-i"])
        .arg(data)
        .output()?;
    let text = String::from_utf8_lossy(&report.stdout);
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        println!("{PROFILE_MARKER}{line}");
    }
    Ok(())
}

/// The benchmark guest's console after `xtask bench-guest` ran in it (only nginx's rounds
/// with `nginx_only`), its log file, and the kernel's release.
fn run_guest(qtrace: &Path, z: &Sizes, nginx_only: bool) -> Result<(String, PathBuf, String)> {
    let cache = crate::matrix::cache_dir()?;
    let xtask = std::env::current_exe()?;
    let bpftrace = crate::matrix::which("bpftrace")?;
    let perf = crate::matrix::which("perf")?;
    let mut files: Vec<PathBuf> = BPFTRACE_TOOLS.iter().map(PathBuf::from).collect();
    // tcpaccept.bt includes <sys/socket.h>: the headers that reaches.
    let headers = [
        "x86_64-linux-gnu",
        "asm-generic",
        "linux",
        "features.h",
        "features-time64.h",
        "stdc-predef.h",
        "endian.h",
    ];
    files.extend(headers.map(|h| Path::new("/usr/include").join(h)));
    let mut init = String::from(crate::matrix::INIT_PROLOGUE);
    let _ = writeln!(
        init,
        "ulimit -l unlimited\n{} bench-guest --rounds {} --millis {} --qtrace {}{} 2>&1\n\
         echo '@@QTRACE done'\npoweroff -f",
        xtask.display(),
        z.guest_rounds,
        z.guest_round.as_millis(),
        qtrace.display(),
        if nginx_only { " --nginx-only" } else { "" }
    );
    let image = crate::matrix::guest_image(
        &cache,
        "6.12",
        "bench-",
        &[
            &[xtask, qtrace.to_path_buf(), bpftrace, perf][..],
            &super::nginx::binaries()?,
        ]
        .concat(),
        &files,
        &init,
    )?;
    // The churn's rounds and nginx's, each configuration starting its tracer (bpftrace
    // compiles its scripts: minutes under emulation; three of the churn's configurations run
    // it) on a busy two-core host: about 40 minutes on a quiet one, an hour was once too
    // little on a busy one.
    let (console, log) = boot_bench_guest(&image, "bench-6.12", Duration::from_secs(7200))?;
    Ok((console, log, image.release))
}

/// Boots a benchmark guest with the instruction-counting clock; its console, also kept in
/// `logs/<name>.log` under the cache.
pub(super) fn boot_bench_guest(
    image: &crate::matrix::GuestImage,
    name: &str,
    timeout: Duration,
) -> Result<(String, PathBuf)> {
    let (console, finished) = crate::matrix::qemu::boot(
        &image.vmlinux,
        &image.initrd,
        "",
        // One CPU: the instruction-counting clock runs the guest's CPUs in turn on one thread.
        (2048, 1),
        crate::matrix::qemu::Clock::Instructions,
        timeout,
    )?;
    let log = crate::matrix::cache_dir()?.join(format!("logs/{name}.log"));
    std::fs::write(&log, &console)?;
    anyhow::ensure!(
        finished,
        "the benchmark guest {name} timed out (console in {})",
        log.display()
    );
    Ok((console, log))
}

/// The guest's JSON lines after `marker`, each with the configuration it names.
pub(super) fn guest_results(
    console: &str,
    marker: &str,
    log: &Path,
) -> Result<Vec<(Config, Value)>> {
    let mut out = Vec::new();
    for line in console.lines() {
        let Some((_, json)) = line.split_once(marker) else {
            continue;
        };
        let v: Value = serde_json::from_str(json.trim_end())
            .with_context(|| format!("a guest result in {}", log.display()))?;
        let config = ALL_CONFIGS
            .into_iter()
            .find(|c| v["config"] == c.name())
            .context("an unknown configuration")?;
        out.push((config, v));
    }
    Ok(out)
}

/// 1c alone: a guest that runs only nginx's rounds.
pub(super) fn guest_nginx(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: nginx in the 6.12 guest");
    let (console, log, _) = run_guest(qtrace, z, true)?;
    super::nginx::section(&console, &log, z)
}

/// 1b: the same churn in Debian's 6.12 kernel under QEMU, where fentry and kprobes exist:
/// qtrace at both tiers against no tracer and against bpftrace, interleaved in one guest;
/// then 1c, nginx, in the same guest.
pub(super) fn guest_churn(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: churn in the 6.12 guest");
    let (console, log, release) = run_guest(qtrace, z, false)?;
    let mut churn = Churn::default();
    let profile: Vec<&str> = console
        .lines()
        .filter_map(|l| Some(l.split_once(PROFILE_MARKER)?.1.trim_end()))
        .collect();
    for (config, v) in guest_results(&console, GUEST_MARKER, &log)? {
        let programs = serde_json::from_value(v["programs"].clone())?;
        churn.add(
            config,
            v["timed"] == true,
            v["cps"].as_f64().unwrap_or(0.0),
            programs,
        );
    }
    if churn.programs.len() != GUEST_CONFIGS.len() {
        bail!(
            "the benchmark guest did not measure every configuration (console in {})",
            log.display()
        );
    }
    let mut s = format!(
        "## 1b. Handshake-path overhead at the fentry and kprobe tiers (Debian {} under QEMU)\n\n",
        release
    );
    let _ = writeln!(
        s,
        "The same churn ({CLIENTS} clients, an accept loop) inside one guest booted from Debian's \
         kernel: {}. The guest's CPU is emulated (TCG, no KVM here) with its clock counting instructions \
         (`-icount shift=0`: one nanosecond per instruction), so its connections/s are \
         connections per 10⁹ guest instructions and the ratios compare instruction counts, \
         repeatable and untouched by the emulator's speed or the host's load. They leave out \
         what costs more than its instructions natively (cache misses, atomics).\n",
        rounds_phrase(z)
    );
    s += &churn.rates(&GUEST_CONFIGS)?;
    s += "\nBPF programs that ran in one more round of each configuration, with kernel.bpf_stats_enabled=1 \
          (not in the rates above: the statistics cost time of their own). In guest \
          nanoseconds, so each is the instructions one invocation takes:\n\n";
    s += &churn.run_times(&GUEST_CONFIGS);
    if profile.is_empty() {
        bail!(
            "the benchmark guest printed no profile (console in {})",
            log.display()
        );
    }
    s += &profile_table(&profile);
    s += &super::nginx::section(&console, &log, z)?;
    Ok(s)
}

/// What a symbol of the guest's profile is to a traced connection, by name.
pub(super) const PROFILE_GROUPS: [(&str, &[&str]); 3] = [
    ("BPF programs (their own instructions)", &["bpf_prog_"]),
    (
        "trampolines and their entry/exit",
        &[
            "bpf_trampoline_",
            "__bpf_prog_enter",
            "__bpf_prog_exit",
            "__bpf_tramp_",
            "migrate_disable",
            "migrate_enable",
        ],
    ),
    (
        "helpers the programs call (maps, kernel reads, clock)",
        &[
            "htab_",
            "__htab_",
            "bpf_lru_",
            "pcpu_freelist_",
            "lookup_nulls_elem_raw",
            "jhash",
            "bpf_probe_read_kernel",
            "copy_from_kernel_nofault",
            "bpf_ktime_get_ns",
            "ktime_get_mono_fast_ns",
            "prealloc_lru_pop",
            "bpf_ringbuf_",
            "bpf_get_current_pid_tgid",
            "bpf_map_",
        ],
    ),
];

/// The profile's shares grouped by what they are to the tracer, with every BPF-related symbol.
pub(super) fn profile_table(profile: &[&str]) -> String {
    let parsed: Vec<(f64, &str)> = profile
        .iter()
        .filter_map(|l| {
            let (pct, rest) = l.trim().split_once('%')?;
            Some((pct.trim().parse().ok()?, rest.rsplit(' ').next()?))
        })
        .collect();
    let mut s = String::from(
        "\nProfile of one more round at the fentry tier: `perf record -e cpu-clock -a` in the guest, \
         whose clock counts instructions, so a symbol's share of samples is its share of the \
         instructions executed (`perf report --sort sym`), grouped by what the symbol is to the tracer:\n\n\
         | part of the traced handshake path | share of all instructions | symbols |\n|---|---|---|\n",
    );
    for (group, prefixes) in PROFILE_GROUPS {
        let members: Vec<_> = parsed
            .iter()
            .filter(|(_, sym)| prefixes.iter().any(|p| sym.starts_with(p)))
            .collect();
        let total: f64 = members.iter().map(|(pct, _)| pct).sum();
        let names: Vec<String> = members
            .iter()
            .map(|(pct, sym)| format!("{sym} {pct:.2} %"))
            .collect();
        let _ = writeln!(s, "| {group} | {total:.2} % | {} |", names.join(", "));
    }
    s.push('\n');
    s
}
