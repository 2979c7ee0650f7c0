//! `cargo xtask vm-test`: qtrace's test binaries on stock Debian kernels under QEMU and on this
//! machine's kernel, and a table: kernel × attach mode → each probe's tier, tests passed.

mod initramfs;
mod kernels;
mod modules;
mod qemu;
mod report;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use report::{Outcome, MARK};
use serde_json::Value;

/// Host-side limit per VM (software emulation: a full run takes minutes).
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Guest-side limit per test binary, in seconds.
const BINARY_TIMEOUT: u32 = 600;
/// Suites that only check files of the source tree (with python3, systemd-analyze…): the
/// guests have neither, and the kernel does not matter to them. They run natively.
const HOST_ONLY: [&str; 1] = ["deploy"];

#[derive(clap::Args, Default)]
pub struct Options {
    /// Kernels: 5.10, 6.1, 6.12 (Debian's cloud kernels, in QEMU), native (this machine's), or
    /// all [default: all]
    #[arg(long, num_args = 1.., value_delimiter = ',', value_parser = ["5.10", "6.1", "6.12", "native", "all"])]
    pub kernel: Vec<String>,
    /// Attach modes: best (each probe's best tier), or a tier to cap every probe at. Default:
    /// best everywhere, and kprobe too on the VM kernels
    #[arg(long, num_args = 1.., value_delimiter = ',', value_parser = ["best", "fentry", "kprobe", "tracepoint"])]
    pub attach: Vec<String>,
    /// Arguments for every test binary, e.g. a test name filter
    #[arg(last = true)]
    pub filter: Vec<String>,
}

/// The guest's /init: the mounts the tests expect, the modules, the tests, power off.
const INIT: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpffs /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /run && mkdir /run/netns
mount -t tmpfs tmpfs /tmp
ip link set lo up
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "@@vm-test module $m failed to load"; done
(sleep $(( $(sed -n 's/.* vmtest.timeout=\([0-9]*\).*/\1/p' /proc/cmdline) - 30 )); echo; echo "@@vm-test guest timeout"; poweroff -f) &
/tests.sh "$(sed -n 's/.* vmtest.attach=\([a-z]*\).*/\1/p' /proc/cmdline)"
poweroff -f
"#;

pub fn vm_test(opts: Options) -> Result<()> {
    let all = opts.kernel.is_empty() || opts.kernel.iter().any(|k| k == "all");
    let kernels: Vec<&str> = ["native", "5.10", "6.1", "6.12"]
        .into_iter()
        .filter(|k| all || opts.kernel.iter().any(|w| w == k))
        .collect();
    let mut jobs = Vec::new();
    for k in &kernels {
        let modes: Vec<&str> = match (opts.attach.is_empty(), *k) {
            (false, _) => opts.attach.iter().map(String::as_str).collect(),
            (true, "native") => vec!["best"],
            (true, _) => vec!["best", "kprobe"],
        };
        jobs.extend(modes.into_iter().map(|m| (*k, m)));
    }
    fs::create_dir_all("target/vm-cache/logs")?;
    let cache = fs::canonicalize("target/vm-cache")?;

    let t = Instant::now();
    let bins = build()?;
    fs::write(
        cache.join("tests.sh"),
        tests_script(&bins, &opts.filter, false),
    )?;
    eprintln!(
        "vm-test: test binaries built ({:.1}s)",
        t.elapsed().as_secs_f64()
    );

    let mut images = BTreeMap::new();
    let vms: Vec<&str> = kernels.iter().copied().filter(|k| *k != "native").collect();
    if !vms.is_empty() {
        let t = Instant::now();
        let dir = cache.join("initramfs");
        fs::create_dir_all(&dir)?;
        let common = dir.join("common.cpio.gz");
        let tests = tests_script(&bins, &opts.filter, true);
        let scripts = [("/init", INIT), ("/tests.sh", tests.as_str())];
        initramfs::common(&common, &bins.all(), &[&bins.workdir], &scripts)?;
        let mb = fs::metadata(&common)?.len() >> 20;
        eprintln!(
            "vm-test: initramfs built, {mb} MiB ({:.1}s)",
            t.elapsed().as_secs_f64()
        );
        for k in vms {
            let t = Instant::now();
            let (_, suite) = kernels::KERNELS.iter().find(|(l, _)| *l == k).unwrap();
            let kernel = kernels::prepare(&cache, suite)?;
            let extra = dir.join(k);
            let order = modules::resolve(&kernel.modules, &extra.join("modules"))?;
            fs::write(extra.join("modules/order"), order.join("\n"))?;
            let initrd = dir.join(format!("{k}.cpio.gz"));
            initramfs::append(&common, &extra, &initrd)?;
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "vm-test: {k}: {} with modules {} ({secs:.1}s)",
                kernel.package,
                order.join(" ")
            );
            images.insert(k, (kernel.vmlinux, initrd));
        }
    }

    // Natively first and alone (the tests time things), then two VMs at a time (two cores).
    let mut outcomes: Vec<(usize, Outcome)> = Vec::new();
    for (i, (_, mode)) in jobs.iter().enumerate().filter(|(_, (k, _))| *k == "native") {
        outcomes.push((i, native(&cache, mode)?));
    }
    let queue = Mutex::new(jobs.iter().enumerate().filter(|(_, (k, _))| *k != "native"));
    let done = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some((i, (k, mode))) = queue.lock().unwrap().next() else {
                    break;
                };
                let (vmlinux, initrd) = &images[k];
                let result = vm(&cache, k, mode, vmlinux, initrd);
                done.lock().unwrap().push((i, result));
            });
        }
    });
    for (i, result) in done.into_inner().unwrap() {
        outcomes.push((i, result?));
    }
    outcomes.sort_by_key(|(i, _)| *i);
    let outcomes: Vec<Outcome> = outcomes.into_iter().map(|(_, o)| o).collect();
    println!("\n{}", report::table(&outcomes));
    let bad: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.ok())
        .map(|o| format!("{} {}", o.target, o.mode))
        .collect();
    if !bad.is_empty() {
        bail!(
            "the kernel matrix failed on {}; console logs in {}",
            bad.join(", "),
            cache.join("logs").display()
        );
    }
    Ok(())
}

/// qtrace's test binaries, built on the host, and the qtrace binary they run.
struct Binaries {
    qtrace: PathBuf,
    /// Unit tests first, then each integration test.
    tests: Vec<(String, PathBuf)>,
    /// The package's directory, where `cargo test` runs them.
    workdir: PathBuf,
}

impl Binaries {
    fn all(&self) -> Vec<PathBuf> {
        std::iter::once(&self.qtrace)
            .chain(self.tests.iter().map(|t| &t.1))
            .cloned()
            .collect()
    }
}

fn build() -> Result<Binaries> {
    let out = Command::new("cargo")
        .args(["test", "--no-run", "--message-format=json", "-p", "qtrace"])
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "building qtrace's tests failed");
    let (mut qtrace, mut tests, mut workdir) = (None, Vec::new(), None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(exe), Some(name)) = (v["executable"].as_str(), v["target"]["name"].as_str())
        else {
            continue;
        };
        let unit = v["target"]["kind"] != serde_json::json!(["test"]);
        if v["profile"]["test"] == true {
            tests.push((!unit, name.to_string(), PathBuf::from(exe)));
            workdir = v["manifest_path"]
                .as_str()
                .and_then(|m| Path::new(m).parent())
                .map(Path::to_path_buf);
        } else if name == "qtrace" {
            qtrace = Some(PathBuf::from(exe));
        }
    }
    tests.sort();
    Ok(Binaries {
        qtrace: qtrace.context("cargo built no qtrace binary")?,
        tests: tests.into_iter().map(|(_, n, e)| (n, e)).collect(),
        workdir: workdir.context("cargo built no test binary")?,
    })
}

/// Runs every test binary between markers `report` reads; `$1` is the attach mode. The same
/// script runs natively and, without the host-only suites, in the guests (from /init).
fn tests_script(b: &Binaries, filter: &[String], guest: bool) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let filter: Vec<String> = filter.iter().map(|f| quote(f)).collect();
    let mut s = format!(
        "#!/bin/sh\nmode=${{1:-best}} attach=\nexport RUST_BACKTRACE=1\n\
         [ \"$mode\" = best ] || {{ export QTRACE_TEST_ATTACH=$mode; attach=\"--attach $mode\"; }}\n\
         echo; echo \"{MARK} probes $({} probes --json $attach 2>&1 | tr '\\n' ' ')\"\n\
         cd {} || exit 1\n",
        quote(&b.qtrace.to_string_lossy()),
        quote(&b.workdir.to_string_lossy())
    );
    for (name, exe) in b
        .tests
        .iter()
        .filter(|(n, _)| !guest || !HOST_ONLY.contains(&n.as_str()))
    {
        let _ = writeln!(
            s,
            "echo '{MARK} begin {name}'\ntimeout -s KILL {BINARY_TIMEOUT} {} --test-threads=1 --color never {} 2>&1\n\
             rc=$?; echo; echo \"{MARK} end {name} exit=$rc\"",
            quote(&exe.to_string_lossy()),
            filter.join(" ")
        );
    }
    s + &format!("echo '{MARK} done'\n")
}

fn native(cache: &Path, mode: &str) -> Result<Outcome> {
    let t = Instant::now();
    let log = cache.join(format!("logs/native-{mode}.console.log"));
    let status = Command::new("sh")
        .arg(cache.join("tests.sh"))
        .arg(mode)
        .stdout(fs::File::create(&log)?)
        .status()?;
    let console = fs::read_to_string(&log)?;
    let mut o = report::parse("native", mode, &console, status.success());
    o.seconds = t.elapsed().as_secs_f64();
    progress(&o);
    Ok(o)
}

fn vm(cache: &Path, kernel: &str, mode: &str, vmlinux: &Path, initrd: &Path) -> Result<Outcome> {
    let t = Instant::now();
    let log = cache.join(format!("logs/{kernel}-{mode}.console.log"));
    let cmdline = format!(
        "vmtest.attach={mode} vmtest.timeout={}",
        VM_TIMEOUT.as_secs()
    );
    let (console, finished) = qemu::boot(vmlinux, initrd, &cmdline, &log, VM_TIMEOUT)?;
    let mut o = report::parse(kernel, mode, &console, finished);
    o.seconds = t.elapsed().as_secs_f64();
    progress(&o);
    Ok(o)
}

fn progress(o: &Outcome) {
    let (passed, failed, secs) = (o.passed, o.failed.len(), o.seconds);
    let problem = o
        .problem
        .as_deref()
        .map(|p| format!("; {p}"))
        .unwrap_or_default();
    eprintln!(
        "vm-test: {} ({}): {passed} passed, {failed} failed ({secs:.0}s){problem}",
        o.target, o.mode
    );
}
