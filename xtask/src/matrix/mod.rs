//! `cargo xtask vm-test`: qtrace's kernel-facing test suites on stock Debian kernels under
//! QEMU and natively, and a table of kernel × attach mode → tier per probe, tests passed.

pub(crate) mod initramfs;
pub use initramfs::which;
pub(crate) mod kernels;
pub mod qemu;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The suites that exercise the kernel side: qtrace's unit tests (the binary `qtrace`) and
/// these modules of the one integration binary ([`INTEGRATION`]), run by module path. The
/// `daemon`, `top` and `deploy` modules need more of a userland (Prometheus, nginx, tmux) and
/// run on this machine only, with the host tests; so does `hardening` (cgroups, thousands of
/// connections; `cargo xtask stress`).
const SUITES: [&str; 10] = [
    "qtrace",
    "handshake",
    "queues",
    "drops",
    "detach",
    "cli",
    "doctor",
    "events",
    "sockets",
    "client",
];

/// Suites, and tests of other suites, whose outcome does not depend on the attach tier, run
/// in each kernel's `best` row only: the unit tests (their kernel-facing ones read BTF,
/// whatever the tier), the CLI's refusals, doctor's reading of counts and sysctls (the
/// counts' exactness at each tier is what the other suites check), and the events socket's
/// reader queues and filters, fed by refused connects that the `client` probe sees at its
/// tracepoint in both rows. Two to three minutes of each kprobe row when two guests share the
/// machine.
const TIER_FREE: [&str; 8] = [
    "qtrace",
    "cli",
    "doctor",
    "events::a_stuck_reader_costs_nothing_and_learns_what_it_missed",
    "events::a_since_reader_is_told_how_many_of_its_events_were_trimmed",
    "events::a_filtered_reader_loses_nothing_to_other_namespaces",
    "events::a_filter_too_long_to_send_is_refused",
    "events::a_refused_request_is_told_why",
];

/// libtest's options that print each test's time (unstable: with RUSTC_BOOTSTRAP=1).
const REPORT_TIME: &str = "-Zunstable-options --report-time";

/// The integration test binary (`qtrace/tests/it/`).
const INTEGRATION: &str = "it";

#[derive(clap::Args)]
pub struct Options {
    /// Kernels to test: 5.10, 6.1, 6.12, sid (Debian unstable's, 7.x), native (this machine),
    /// or all.
    #[arg(long, default_value = "all")]
    pub kernel: Vec<String>,
    /// Attach modes: best (each probe's best tier), kprobe, tracepoint (forced caps). Default:
    /// best everywhere, and kprobe too on the VM kernels.
    #[arg(long)]
    pub attach: Vec<String>,
    /// Arguments for every test binary, e.g. test-name filters (a test runs if its name
    /// contains any of them; integration tests are named by module path, `handshake::…`) or
    /// `--exact`.
    #[arg(last = true)]
    pub filter: Vec<String>,
}

/// One run: a kernel in an attach mode.
struct Outcome {
    kernel: String,
    mode: String,
    tiers: BTreeMap<String, String>,
    passed: Vec<String>,
    failed: Vec<(String, String)>,
    problem: Option<String>,
    seconds: f64,
}

pub fn vm_test(opts: Options) -> Result<()> {
    vm_test_alongside(opts, || Ok(()))
}

/// [`vm_test`], with `alongside` run beside the guests once their kernels are cached (so the
/// two never fetch at once): `xtask test` runs dist-test there, whose guest mostly waits (an
/// alert's five minutes) while the matrix keeps both cores busy. Both must pass.
pub fn vm_test_alongside(
    opts: Options,
    alongside: impl FnOnce() -> Result<()> + Send,
) -> Result<()> {
    let cache = cache_dir()?;
    let binaries = build_test_binaries(&opts.filter)?;
    let wanted: Vec<String> = if opts.kernel.iter().any(|k| k == "all") {
        std::iter::once("native")
            .chain(kernels::SUITES.iter().map(|(label, _)| *label))
            .map(String::from)
            .collect()
    } else {
        opts.kernel.clone()
    };
    let mut jobs = Vec::new();
    for k in &wanted {
        let modes: Vec<String> = match (opts.attach.is_empty(), k.as_str()) {
            (false, _) => opts.attach.clone(),
            (true, "native") => vec!["best".into()],
            (true, _) => vec!["best".into(), "kprobe".into()],
        };
        for m in modes {
            jobs.push((k.clone(), m));
        }
    }
    // The guests run the static build users install (`cargo xtask dist`) where the tests run
    // qtrace; this machine's kernel runs the glibc build.
    let static_qtrace = jobs
        .iter()
        .any(|(k, _)| k != "native")
        .then(crate::dist::build_static)
        .transpose()?;
    let mut images = BTreeMap::new();
    for (k, _) in &jobs {
        if k == "native" || images.contains_key(k) {
            continue;
        }
        let image = guest_image(&cache, k, "", &binaries.all(), &[], &init_script(&binaries))?;
        if let Some(static_qtrace) = &static_qtrace {
            initramfs::overlay(&image.initrd, &binaries.qtrace, static_qtrace)?;
        }
        images.insert(k.clone(), image);
    }
    let (outcomes, beside) = std::thread::scope(|s| {
        let beside = s.spawn(alongside);
        let outcomes = in_two_lanes(jobs, |(k, m)| {
            let image = images
                .get(k)
                .map(|i: &GuestImage| (i.vmlinux.clone(), i.initrd.clone()));
            run_one(k, m, image, &binaries, &cache.join("logs"))
        });
        let beside = beside
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the stage beside the matrix panicked")));
        (outcomes, beside)
    });
    let outcomes = outcomes?;
    print!("{}", table(&outcomes));
    let bad: Vec<String> = outcomes
        .iter()
        .filter(|o| o.problem.is_some() || !o.failed.is_empty())
        .map(|o| format!("{} ({})", o.kernel, o.mode))
        .collect();
    if !bad.is_empty() {
        bail!(
            "the kernel matrix failed on {}; logs in {}",
            bad.join(", "),
            cache.join("logs").display()
        );
    }
    beside
}

/// Runs `run` on every job, two at a time (two cores; one emulated guest keeps about one of
/// them busy), the costliest first so that no lane idles at the end: newer kernels take
/// longer, a kernel's best row longer than its kprobe row (which leaves out [`TIER_FREE`]),
/// this machine's kernel least. Outcomes come back in `jobs`' order.
fn in_two_lanes<T: Send>(
    jobs: Vec<(String, String)>,
    run: impl Fn(&(String, String)) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let cost = |(k, m): &(String, String)| {
        let kernel = std::iter::once("native")
            .chain(kernels::SUITES.iter().map(|(label, _)| *label))
            .position(|l| l == k)
            .unwrap_or(usize::MAX / 4);
        kernel * 2 + usize::from(m != "kprobe")
    };
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(cost(&jobs[i])));
    let queue = std::sync::Mutex::new(order.into_iter());
    let results: Vec<std::sync::Mutex<Option<Result<T>>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some(i) = queue.lock().unwrap().next() else {
                    break;
                };
                *results[i].lock().unwrap() = Some(run(&jobs[i]));
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap()
                .unwrap_or_else(|| Err(anyhow::anyhow!("a matrix job did not run")))
        })
        .collect()
}

/// Where kernels, images and guest logs are kept (`logs/` inside), created if absent;
/// absolute, as apt resolves relative paths against /etc/apt.
pub fn cache_dir() -> Result<PathBuf> {
    let cache = crate::target_dir()?.join("vm-cache");
    fs::create_dir_all(cache.join("logs"))?;
    Ok(cache)
}

/// A kernel to boot and the initramfs made for it.
pub struct GuestImage {
    pub release: String,
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
}

/// Debian's kernel `k` (a label of `kernels::SUITES`) from the cache, and an initramfs (named with `tag`)
/// holding `binaries` with their libraries, `files` as they are, the modules the tests need
/// and `init`.
pub fn guest_image(
    cache: &Path,
    k: &str,
    tag: &str,
    binaries: &[PathBuf],
    files: &[PathBuf],
    init: &str,
) -> Result<GuestImage> {
    let t = Instant::now();
    let kernel = kernels::fetch(cache, k)?;
    let modules = kernels::module_closure(
        &kernel.modules,
        &initramfs::MODULES,
        &initramfs::MODULES_IF_PACKAGED,
    )?;
    let initrd = cache.join(format!("initramfs-{tag}{k}.cpio"));
    initramfs::build(&initrd, &modules, binaries, files, init)?;
    eprintln!(
        "vm-test: {k} ({}) ready in {:.1}s",
        kernel.release,
        t.elapsed().as_secs_f64()
    );
    Ok(GuestImage {
        release: kernel.release,
        vmlinux: kernel.vmlinux,
        initrd,
    })
}

/// The start of every guest's /init: filesystems, /run/netns, loopback, the modules.
/// /tmp stays on the initramfs (itself a writable tmpfs): the binaries are packed at their host
/// paths, which lie under /tmp when the checkout or CARGO_TARGET_DIR does, and a tmpfs mounted
/// there would hide them.
pub const INIT_PROLOGUE: &str = "#!/bin/sh\nexport PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
     mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
     mount -t tmpfs run /run; mkdir -p /run/netns\n\
     mount -t tracefs tracefs /sys/kernel/tracing; mount -t debugfs debugfs /sys/kernel/debug\n\
     mount -t bpf bpf /sys/fs/bpf; mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
     ip link set lo up\n\
     for m in $(cat /modules/order); do insmod /modules/$m.ko || echo \"@@QTRACE module $m failed\"; done\n";

#[derive(Clone)]
struct Binaries {
    qtrace: PathBuf,
    /// Each suite: its name, the test binary, and the arguments that run just that suite.
    suites: Vec<Suite>,
}

#[derive(Clone)]
struct Suite {
    name: String,
    exe: PathBuf,
    args: Vec<String>,
}

impl Suite {
    /// The arguments that run the suite at tier `attach` (`fentry`: all of them; lower: all
    /// but [`TIER_FREE`]), or None where nothing of it runs there.
    fn args_at(&self, attach: &str) -> Option<Vec<String>> {
        if attach == "fentry" {
            return Some(self.args.clone());
        }
        if TIER_FREE.contains(&self.name.as_str()) {
            return None;
        }
        let args: Vec<String> = self
            .args
            .iter()
            .filter(|a| !TIER_FREE.contains(&a.as_str()))
            .cloned()
            .collect();
        // With every named test left out, `--exact` and no name would run them all.
        let named = |args: &[String]| {
            args.iter()
                .any(|a| a.starts_with(&format!("{}::", self.name)))
        };
        (named(&args) || !named(&self.args)).then_some(args)
    }
}

impl Binaries {
    fn all(&self) -> Vec<PathBuf> {
        let mut all = vec![self.qtrace.clone()];
        for s in &self.suites {
            if !all.contains(&s.exe) {
                all.push(s.exe.clone());
            }
        }
        all
    }
}

/// Release builds: the guests emulate the CPU, and qtrace's BTF parsing is slow unoptimised.
fn build_test_binaries(filter: &[String]) -> Result<Binaries> {
    let out = Command::new("cargo")
        .args([
            "test",
            "--release",
            "--no-run",
            "--message-format=json",
            "--package",
            "qtrace",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "building the test binaries failed");
    let mut exes = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if v["profile"]["test"] == true && (name == SUITES[0] || name == INTEGRATION) {
            exes.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    let exe = |name: &str| {
        exes.get(name)
            .cloned()
            .with_context(|| format!("no test binary {name} was built"))
    };
    let mut suites = vec![Suite {
        name: SUITES[0].to_string(),
        exe: exe(SUITES[0])?,
        args: filter.to_vec(),
    }];
    let it = exe(INTEGRATION)?;
    let tests = list_tests(&it, filter)?;
    for name in &SUITES[1..] {
        suites.push(Suite {
            name: name.to_string(),
            exe: it.clone(),
            args: suite_args(name, &tests, filter),
        });
    }
    let qtrace = fs::canonicalize(crate::target_dir()?.join("release/qtrace"))?;
    Ok(Binaries { qtrace, suites })
}

/// The tests of a test binary that `filter` selects (listing needs no privileges).
fn list_tests(exe: &Path, filter: &[String]) -> Result<Vec<String>> {
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .args(filter)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "listing the tests of {}",
        exe.display()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

/// The arguments that run exactly `suite`'s tests among `tests` (module `suite::`): their
/// full names with `--exact`, and the options of `filter` (its name filters already chose
/// `tests`). None selected: a filter matching nothing, as `--exact` with no name would run all.
fn suite_args(suite: &str, tests: &[String], filter: &[String]) -> Vec<String> {
    let prefix = format!("{suite}::");
    let mine: Vec<String> = tests
        .iter()
        .filter(|t| t.starts_with(&prefix))
        .cloned()
        .collect();
    if mine.is_empty() {
        return vec!["--exact".into(), format!("{prefix}(no test selected)")];
    }
    let mut args = vec!["--exact".to_string()];
    let mut options = filter.iter();
    while let Some(a) = options.next() {
        match a.as_str() {
            "--exact" => {}
            "--skip" => {
                args.push(a.clone());
                args.extend(options.next().cloned());
            }
            o if o.starts_with("--") => args.push(a.clone()),
            _ => {}
        }
    }
    args.extend(mine);
    args
}

/// The guest's /init: mounts, modules, the probe report, each suite, power off.
fn init_script(b: &Binaries) -> String {
    let mut s = String::from(INIT_PROLOGUE);
    // RUSTC_BOOTSTRAP unlocks libtest's `--report-time` (REPORT_TIME) in the test binaries:
    // each test's time in the row's log, where a row's emulated minutes go.
    s += "ATTACH=$(sed -n 's/.*qtrace.attach=\\([a-z]*\\).*/\\1/p' /proc/cmdline)\n\
          export QTRACE_TEST_ATTACH=$ATTACH RUST_BACKTRACE=1 RUSTC_BOOTSTRAP=1\n";
    let _ = writeln!(
        s,
        "echo \"@@QTRACE probes $({} probes --json --attach $ATTACH 2>&1 | tr -d '\\n')\"",
        b.qtrace.display()
    );
    for suite in &b.suites {
        let run = |args: Option<Vec<String>>| match args {
            None => ":".to_string(),
            Some(args) => {
                let args: Vec<String> = args.iter().map(|a| sh_quote(a)).collect();
                format!(
                    "echo '@@QTRACE begin {0}'\n{1} --test-threads=1 {REPORT_TIME} {2} 2>&1\n\
                     echo \"@@QTRACE end {0} rc=$?\"",
                    suite.name,
                    suite.exe.display(),
                    args.join(" ")
                )
            }
        };
        let (best, lower) = (suite.args_at("fentry"), suite.args_at("kprobe"));
        if best == lower {
            let _ = writeln!(s, "{}", run(best));
        } else {
            let _ = writeln!(
                s,
                "if [ \"$ATTACH\" = fentry ]; then\n{}\nelse\n{}\nfi",
                run(best),
                run(lower)
            );
        }
    }
    s += "echo '@@QTRACE done'\npoweroff -f\n";
    s
}

/// `arg` as one word of a POSIX shell command line.
fn sh_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// The tier qtrace is capped at in an attach mode: `best` is no cap, i.e. fentry.
fn attach_tier(mode: &str) -> &str {
    if mode == "best" {
        "fentry"
    } else {
        mode
    }
}

/// How long a guest may take for every suite: 15 minutes (a cloud kernel takes 5 to 10 on
/// two busy cores), twice that for the other flavours (PREEMPT_RT runs softirqs and
/// interrupts in threads, slower to emulate: about 17 minutes).
fn guest_limit(kernel: &str) -> Duration {
    let flavour = kernels::FLAVOURS
        .iter()
        .any(|(label, _, _)| *label == kernel);
    Duration::from_secs(if flavour { 1800 } else { 900 })
}

fn run_one(
    kernel: &str,
    mode: &str,
    image: Option<(PathBuf, PathBuf)>,
    b: &Binaries,
    logs: &Path,
) -> Result<Outcome> {
    let t = Instant::now();
    let (console, problem) = match image {
        None => native(b, mode)?,
        Some((vmlinux, initrd)) => {
            let (console, finished) = qemu::boot(
                &vmlinux,
                &initrd,
                &format!("qtrace.attach={}", attach_tier(mode)),
                // Two CPUs: the kernel handles one listener's packets on several at once,
                // which the counting must survive (`queues::syns_on_two_cpus…`).
                (1024, 2),
                qemu::Clock::Real,
                guest_limit(kernel),
            )?;
            let problem = if !finished {
                Some("timed out".to_string())
            } else if !console.contains("@@QTRACE done") {
                Some("the guest stopped before the tests ended".to_string())
            } else {
                None
            };
            (console, problem)
        }
    };
    fs::write(logs.join(format!("{kernel}-{mode}.log")), &console)?;
    let mut o = parse(kernel, mode, &console);
    o.problem = problem.or(o.problem);
    o.seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "vm-test: {kernel} ({mode}): {} passed, {} failed in {:.0}s",
        o.passed.len(),
        o.failed.len(),
        o.seconds
    );
    Ok(o)
}

/// The same suites on this machine's kernel, with the same markers as in a guest.
fn native(b: &Binaries, mode: &str) -> Result<(String, Option<String>)> {
    let attach = attach_tier(mode);
    let probes = Command::new(&b.qtrace)
        .args(["probes", "--json", "--attach", attach])
        .output()?;
    let mut console = format!(
        "@@QTRACE probes {}\n",
        String::from_utf8_lossy(&probes.stdout).trim()
    );
    for suite in &b.suites {
        let Some(args) = suite.args_at(attach) else {
            continue;
        };
        let (name, exe) = (&suite.name, &suite.exe);
        let out = Command::new(exe)
            .arg("--test-threads=1")
            .args(REPORT_TIME.split(' '))
            .env("RUSTC_BOOTSTRAP", "1")
            .args(args)
            .env("QTRACE_TEST_ATTACH", attach)
            .output()?;
        let _ = write!(
            console,
            "@@QTRACE begin {name}\n{}{}@@QTRACE end {name} rc={}\n",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            out.status.code().unwrap_or(-1)
        );
    }
    console += "@@QTRACE done\n";
    Ok((console, None))
}

fn parse(kernel: &str, mode: &str, console: &str) -> Outcome {
    let mut o = Outcome {
        kernel: kernel.to_string(),
        mode: mode.to_string(),
        tiers: BTreeMap::new(),
        passed: Vec::new(),
        failed: Vec::new(),
        problem: None,
        seconds: 0.0,
    };
    let mut suite = String::new();
    for line in console.lines() {
        // Console lines may carry firmware noise before a marker.
        let line = line.trim_end_matches('\r');
        let line = line.find("@@QTRACE").map_or(line, |at| &line[at..]);
        if let Some(json) = line.strip_prefix("@@QTRACE probes ") {
            match serde_json::from_str::<Value>(json) {
                Ok(v) => {
                    o.kernel = format!("{kernel} ({})", v["kernel"].as_str().unwrap_or("?"));
                    for p in v["probes"].as_array().into_iter().flatten() {
                        let tier = p["tier"].as_str().unwrap_or("unavailable").to_string();
                        o.tiers
                            .insert(p["probe"].as_str().unwrap_or("?").to_string(), tier);
                    }
                }
                Err(_) => o.problem = Some(format!("qtrace probes failed: {json}")),
            }
        } else if let Some(name) = line.strip_prefix("@@QTRACE begin ") {
            suite = name.to_string();
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, result)) = rest.rsplit_once(" ... ") {
                // Integration tests are named by their module path already.
                let name = if name.starts_with(&format!("{suite}::")) {
                    name.to_string()
                } else {
                    format!("{suite}::{name}")
                };
                let result = result.split_once(" <").map_or(result, |(r, _)| r);
                match result {
                    "ok" => o.passed.push(name),
                    "FAILED" => o.failed.push((name, String::new())),
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("@@QTRACE end ") {
            if !rest.ends_with("rc=0")
                && o.failed
                    .iter()
                    .all(|(n, _)| !n.starts_with(&format!("{suite}::")))
            {
                o.failed
                    .push((format!("{suite} (exit {rest})"), String::new()));
            }
        }
    }
    // The panic message of each failure, for the summary: whole (a test's diagnosis, such as
    // qtrace's log, is in it) up to the backtrace note, bounded.
    for (name, why) in &mut o.failed {
        let test = name.split("::").skip(1).collect::<Vec<_>>().join("::");
        let at = console
            .find(&format!("---- {name} stdout ----"))
            .or_else(|| console.find(&format!("---- {test} stdout ----")));
        if let Some(at) = at {
            *why = console[at..]
                .lines()
                .skip(1)
                .take_while(|l| {
                    !["note: run with", "stack backtrace:", "---- "]
                        .iter()
                        .any(|end| l.starts_with(end))
                })
                .take(60)
                .collect::<Vec<_>>()
                .join("\n    ");
        }
    }
    o
}

fn table(outcomes: &[Outcome]) -> String {
    let probes = ["syn", "ack", "synack", "accept", "client", "port_search"];
    let mut s = format!("\n{:<34} {:<10}", "KERNEL", "ATTACH");
    for p in probes {
        let _ = write!(s, " {p:<12}");
    }
    s += " TESTS\n";
    for o in outcomes {
        let _ = write!(s, "{:<34} {:<10}", o.kernel, o.mode);
        for p in probes {
            let _ = write!(s, " {:<12}", o.tiers.get(p).map_or("?", String::as_str));
        }
        let status = match &o.problem {
            Some(p) => format!("{} passed, {} failed; {p}", o.passed.len(), o.failed.len()),
            None => format!(
                "{} passed, {} failed ({:.0}s)",
                o.passed.len(),
                o.failed.len(),
                o.seconds
            ),
        };
        s += &status;
        s.push('\n');
    }
    for o in outcomes {
        for (name, why) in &o.failed {
            let _ = writeln!(s, "FAILED {} ({}): {name}: {why}", o.kernel, o.mode);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite(name: &str, args: &[&str]) -> Suite {
        Suite {
            name: name.into(),
            exe: "/t".into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn kprobe_rows_leave_out_the_tier_free_suites_and_tests() {
        let events = suite("events", &["--exact", "events::json", TIER_FREE[3]]);
        assert_eq!(events.args_at("fentry"), Some(events.args.clone()));
        assert_eq!(
            events.args_at("kprobe"),
            Some(vec!["--exact".to_string(), "events::json".to_string()])
        );
        // Every named test left out: nothing runs, not the whole binary.
        assert_eq!(
            suite("events", &["--exact", TIER_FREE[4]]).args_at("kprobe"),
            None
        );
        assert_eq!(suite("cli", &["--exact", "cli::x"]).args_at("kprobe"), None);
        assert_eq!(suite("qtrace", &[]).args_at("kprobe"), None);
        let none = suite("queues", &["--exact", "queues::(no test selected)"]);
        assert_eq!(none.args_at("kprobe"), Some(none.args.clone()));
    }

    #[test]
    fn the_init_script_picks_each_suites_tests_by_tier() {
        let b = Binaries {
            qtrace: "/q".into(),
            suites: vec![
                suite("qtrace", &[]),
                suite("events", &["--exact", "events::json", TIER_FREE[3]]),
                suite("queues", &["--exact", "queues::a"]),
            ],
        };
        let init = init_script(&b);
        let (ifs, elses, fis) = ["if ", "else\n", "fi\n"]
            .map(|w| init.matches(w).count())
            .into();
        assert_eq!((ifs, elses, fis), (2, 2, 2), "{init}");
        assert_eq!(init.matches("@@QTRACE begin queues").count(), 1, "{init}");
        assert!(
            init.contains("else\n:\nfi"),
            "the unit tests: nothing below fentry\n{init}"
        );
    }
}
