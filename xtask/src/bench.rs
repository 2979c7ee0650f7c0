//! `cargo xtask bench`: qtrace's cost, measured as ratios in one interleaved run, written to
//! BENCHMARKS.md with the command that reproduces it. Never timing asserts: `--smoke` runs
//! every benchmark at a tiny size and checks only that results are well formed.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use qtrace_testkit::{probe_tier, BpfStats, Netns};
use serde_json::Value;

mod ack_storm;

#[derive(clap::Args)]
pub struct Options {
    /// Tiny sizes, to check the harness works (part of `cargo xtask test`).
    #[arg(long)]
    pub smoke: bool,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
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
}

pub fn bench(opts: Options) -> Result<()> {
    let sizes = if opts.smoke {
        Sizes {
            rounds: 1,
            round: Duration::from_millis(300),
            guest_rounds: 1,
            guest_round: Duration::from_millis(1000),
            storm: Duration::from_millis(500),
            namespaces: 2,
            listeners_per_ns: 10,
            scrapes: 5,
            burst: 50,
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
        }
    };
    let qtrace = crate::build_release()?;
    let mut report = header(&opts)?;
    report += &churn(&qtrace, &sizes)?;
    report += &guest_churn(&qtrace, &sizes)?;
    report += &storm(&qtrace, &sizes)?;
    report += &ack_storm::ack_storm(&qtrace, &sizes)?;
    report += &scale(&qtrace, &sizes)?;
    report += &event_path(&qtrace, &sizes)?;
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

/// The heading of BENCHMARKS.md's hand-written part, which a new run keeps.
const READING: &str = "## Reading these figures";

fn header(opts: &Options) -> Result<String> {
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
fn check_well_formed(report: &str) -> Result<()> {
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

/// The daemon, started and ready (probes attached), with its HTTP address.
struct Daemon {
    child: Child,
    web: String,
    /// Its `ready` line: the address it serves and the tier each probe got.
    ready: Value,
    socket: PathBuf,
    startup: Duration,
}

impl Daemon {
    fn start(qtrace: &Path, extra: &[&str]) -> Result<Self> {
        let socket = std::env::temp_dir().join(format!("qtrace-bench-{}.sock", std::process::id()));
        let t = Instant::now();
        let mut child = Command::new(qtrace)
            .args([
                "run",
                "--print",
                "--json",
                "--interval",
                "1h",
                "--web.listen-address",
                "127.0.0.1:0",
            ])
            .arg("--events-socket")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::piped())
            // Its errors (why it did not start) reach the benchmark's stderr.
            .env("QTRACE_LOG", "error")
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        // Keep reading: a closed pipe would end the daemon at its next printed event.
        thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let startup = t.elapsed();
        let ready: Value = serde_json::from_str(&first).context("daemon ready line")?;
        let web = ready["listen"]
            .as_str()
            .context("no listen address")?
            .to_string();
        Ok(Self {
            child,
            web,
            ready,
            socket,
            startup,
        })
    }

    /// The tier `probe` got ("unavailable" when none).
    fn tier(&self, probe: &str) -> Result<String> {
        Ok(probe_tier(&self.ready, probe)?.unwrap_or_else(|| "unavailable".into()))
    }

    /// CPU seconds used so far (user + system).
    fn cpu(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        Ok(ticks / 100.0)
    }

    fn rss_mib(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmRSS")?;
        Ok(kib / 1024.0)
    }

    fn get(&self, path: &str) -> Result<(Duration, String)> {
        // A daemon that stops answering fails the benchmark instead of hanging it.
        const TIMEOUT: Duration = Duration::from_secs(10);
        let t = Instant::now();
        let addr: SocketAddr = self.web.parse()?;
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok((t.elapsed(), body))
    }
}

/// A stopped benchmark leaves nothing attached: on every path out, errors included, the daemon
/// gets SIGTERM and is waited for.
impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM);
    }
}

/// The sum of a Prometheus exposition's samples of `family` whose labels include each of
/// `labels` (`name="value"`).
fn sum_samples(exposition: &str, family: &str, labels: &[&str]) -> u64 {
    exposition
        .lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && labels.iter().all(|label| l.contains(label))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// Signals a child of ours and reaps it.
fn stop_child(child: &mut Child, signal: i32) {
    // SAFETY: signalling our own, not yet reaped, child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let _ = child.wait();
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn fmt3((a, b, c): (f64, f64, f64)) -> String {
    format!("{a:.0} / {b:.0} / {c:.0}")
}

/// Closes without TIME_WAIT (RST), so churn does not run out of ports.
fn abortive_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER with a valid struct linger.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Connections/s of an accept loop under `clients` connect+close loops for `secs`.
fn churn_round(ns: &Netns, secs: Duration, clients: usize) -> Result<f64> {
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let name = ns.name.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = {
        let (done, name) = (done.clone(), name.clone());
        thread::spawn(move || -> Result<()> {
            Netns::enter(&name)?;
            pin_to_cpu(0);
            let l = TcpListener::bind("127.0.0.1:0")?;
            // SAFETY: re-listening with a deep backlog: the accept loop is not under test.
            unsafe { libc::listen(l.as_raw_fd(), 4096) };
            tx.send(l.local_addr()?).ok();
            // Blocking accepts; the last connection after `done` wakes it to finish.
            while !done.load(Ordering::Relaxed) {
                drop(l.accept()?);
            }
            Ok(())
        })
    };
    let addr: SocketAddr = rx.recv_timeout(Duration::from_secs(5))?;
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (done, count, name) = (done.clone(), count.clone(), name.clone());
            thread::spawn(move || -> Result<()> {
                Netns::enter(&name)?;
                pin_to_cpu(0);
                while !done.load(Ordering::Relaxed) {
                    if let Ok(s) = TcpStream::connect(addr) {
                        abortive_close(&s);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        })
        .collect();
    let t = Instant::now();
    thread::sleep(secs);
    done.store(true, Ordering::Relaxed);
    let n = count.load(Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    // The server may have taken the last connection before `done`: one more wakes it.
    thread::spawn(move || -> Result<()> {
        Netns::enter(&name)?;
        let _ = TcpStream::connect(addr);
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("waker panicked"))??;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    Ok(n as f64 / elapsed)
}

/// Pins the calling thread to `cpu` where the machine has it. The churn's accept loop and its
/// clients share CPU 0, as they share the guest's one CPU, leaving the daemon the rest: left to
/// the scheduler, host rounds ran at one of two rates a third apart, depending on where the
/// threads (and with them loopback's softirq work) happened to land.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if cpu < libc::sysconf(libc::_SC_NPROCESSORS_ONLN) as usize {
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// Clients of the churn: each connects and resets in a loop.
const CLIENTS: usize = 4;

/// What traces the handshakes during a churn round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    NoTracer,
    /// qtrace at the best tier this kernel gives each probe.
    Qtrace,
    QtraceFentry,
    QtraceKprobe,
    /// bpftrace's tcpsynbl.bt and tcpaccept.bt (Debian's bpftrace), side by side.
    Bpftrace,
}

const HOST_CONFIGS: [Config; 2] = [Config::NoTracer, Config::Qtrace];
const GUEST_CONFIGS: [Config; 4] = [
    Config::NoTracer,
    Config::QtraceFentry,
    Config::QtraceKprobe,
    Config::Bpftrace,
];

const BPFTRACE_TOOLS: [&str; 2] = ["/usr/sbin/tcpsynbl.bt", "/usr/sbin/tcpaccept.bt"];

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::NoTracer => "no tracer",
            Self::Qtrace => "qtrace (this kernel's tiers)",
            Self::QtraceFentry => "qtrace, fentry tier",
            Self::QtraceKprobe => "qtrace, forced to kprobes",
            Self::Bpftrace => "bpftrace tcpsynbl.bt + tcpaccept.bt",
        }
    }

    /// The least ratio to no tracer the issue asks for.
    fn target(self) -> &'static str {
        match self {
            Self::QtraceFentry => "≥ 0.99",
            Self::QtraceKprobe => "≥ 0.98",
            Self::Bpftrace => "peer: qtrace must lose less",
            Self::NoTracer | Self::Qtrace => "",
        }
    }

    /// Starts the tracer; dropping what it returns stops it.
    fn start(self, qtrace: &Path) -> Result<Running> {
        Ok(match self {
            Self::NoTracer => Running::Nothing,
            Self::Qtrace => Running::Qtrace(Daemon::start(qtrace, &[])?),
            Self::QtraceFentry => Running::Qtrace(Daemon::start(qtrace, &["--attach", "fentry"])?),
            Self::QtraceKprobe => Running::Qtrace(Daemon::start(qtrace, &["--attach", "kprobe"])?),
            Self::Bpftrace => Running::Bpftrace(start_bpftrace(&BPFTRACE_TOOLS)?),
        })
    }
}

/// A tracer running during one round; dropping it stops it.
enum Running {
    Nothing,
    Qtrace(#[allow(dead_code)] Daemon),
    Bpftrace(#[allow(dead_code)] Vec<Interrupted>),
}

/// A child stopped with SIGINT (as Ctrl-C stops bpftrace) when dropped.
struct Interrupted(Child);

impl Drop for Interrupted {
    fn drop(&mut self) {
        stop_child(&mut self.0, libc::SIGINT);
    }
}

/// Starts bpftrace on each tool at once (its start-up compiles the script and reads the
/// kernel's BTF: slow under emulation) and waits until each has attached (BEGIN has printed).
fn start_bpftrace(tools: &[&str]) -> Result<Vec<Interrupted>> {
    let mut children = Vec::new();
    for tool in tools {
        let child = Command::new("bpftrace")
            .args(["-B", "line", tool])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("bpftrace (apt package bpftrace)")?;
        children.push(Interrupted(child));
    }
    for (Interrupted(child), tool) in children.iter_mut().zip(tools) {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("Tracing") {
            line.clear();
            if out.read_line(&mut line)? == 0 {
                bail!("bpftrace {tool} exited before tracing");
            }
        }
        // Its per-event output goes on being read, as a terminal would.
        thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    }
    Ok(children)
}

/// BPF programs that ran: name, run count, total run time (ns).
type Programs = Vec<(String, u64, u64)>;

/// Connections/s of each configuration over the timed rounds, and the programs that ran in
/// its statistics round.
#[derive(Default)]
struct Churn {
    cps: BTreeMap<Config, Vec<f64>>,
    programs: BTreeMap<Config, Programs>,
}

impl Churn {
    /// A warm-up round, then `rounds` rounds of every configuration, interleaved (each round
    /// starting with the next configuration), with BPF statistics off; then one
    /// more of each with kernel.bpf_stats_enabled=1 for the programs' run time (statistics
    /// cost time of their own, so that round's rate is not used). `each` gets every
    /// measurement as it comes: (configuration, timed, connections/s, programs named
    /// `prefix…`).
    fn run(
        ns: &Netns,
        configs: &[Config],
        (rounds, round): (usize, Duration),
        qtrace: &Path,
        prefix: &str,
        mut each: impl FnMut(Config, bool, f64, Programs),
    ) -> Result<()> {
        let stats = BpfStats::save()?;
        // Not counted: a fresh kernel's first connections also grow its slab caches.
        eprintln!("bench: churn warm-up round");
        churn_round(ns, round, CLIENTS)?;
        for r in 1..=rounds + 1 {
            eprintln!("bench: churn round {r}/{}", rounds + 1);
            let timed = r <= rounds;
            stats.set(!timed)?;
            // Each round starts with another configuration, so none always follows the same.
            let order = configs.iter().cycle().skip(r % configs.len());
            for &config in order.take(configs.len()) {
                let running = config.start(qtrace)?;
                let cps = churn_round(ns, round, CLIENTS)?;
                let programs = if timed {
                    Vec::new()
                } else {
                    prog_runtimes(prefix)?
                };
                drop(running);
                each(config, timed, cps, programs);
            }
        }
        Ok(())
    }

    fn add(&mut self, config: Config, timed: bool, cps: f64, programs: Programs) {
        if timed {
            self.cps.entry(config).or_default().push(cps);
        } else {
            self.programs.insert(config, programs);
        }
    }

    /// Connections/s and the ratio to no tracer, one row per configuration.
    fn rates(&self, configs: &[Config]) -> Result<String> {
        let of = |c: Config| {
            self.cps
                .get(&c)
                .map(|v| stats(v.clone()))
                .with_context(|| format!("no rounds of {}", c.name()))
        };
        let base = of(Config::NoTracer)?;
        let mut s = String::from(
            "| configuration | connections/s (min / median / max) | ratio to no tracer (median) | target |\n|---|---|---|---|\n",
        );
        for &c in configs {
            let st = of(c)?;
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {} |",
                c.name(),
                fmt3(st),
                st.1 / base.1,
                c.target()
            );
        }
        Ok(s)
    }

    /// Mean run time per invocation of each program that ran, by configuration.
    fn run_times(&self, configs: &[Config]) -> String {
        let mut s = String::from(
            "| configuration | program | invocations | mean ns per invocation |\n|---|---|---|---|\n",
        );
        for c in configs {
            for (name, cnt, ns_total) in self.programs.get(c).into_iter().flatten() {
                let _ = writeln!(
                    s,
                    "| {} | {name} | {cnt} | {:.0} |",
                    c.name(),
                    *ns_total as f64 / (*cnt).max(1) as f64
                );
            }
        }
        s
    }
}

/// 1 and 2: connection churn with and without qtrace on this machine's kernel.
fn churn(qtrace: &Path, z: &Sizes) -> Result<String> {
    let ns = Netns::new("bench-churn")?;
    let mut churn = Churn::default();
    Churn::run(
        &ns,
        &HOST_CONFIGS,
        (z.rounds, z.round),
        qtrace,
        "qt_",
        |c, timed, cps, p| churn.add(c, timed, cps, p),
    )?;
    let mut s = String::from("## 1. Handshake-path overhead (loopback connection churn)\n\n");
    let _ = writeln!(s, "{CLIENTS} clients connect and reset as fast as they can to an accept loop, {} rounds of {:?} per configuration, interleaved.\n", z.rounds, z.round);
    s += &churn.rates(&HOST_CONFIGS)?;
    s += "\nbpftrace's tcpsynbl.bt + tcpaccept.bt cannot run on this kernel (no kprobes): the peers are compared in the 6.12 guest, 1b.\n\n";
    s += "## 2. In-kernel cost per program invocation (kernel.bpf_stats_enabled=1, in one more round with qtrace)\n\n";
    if churn
        .programs
        .get(&Config::Qtrace)
        .is_none_or(Vec::is_empty)
    {
        s += "No qtrace program ran.\n";
    }
    s += &churn.run_times(&[Config::Qtrace]);
    s += "\nTarget ≤ 250 ns. On this kernel only the tracepoint-tier programs load; the fentry/kprobe ones are measured in the 6.12 guest (1b), in instructions.\n\n";
    Ok(s)
}

/// In the guest: the interleaved churn of every guest configuration, one `@@QTRACE bench`
/// JSON line per measurement. Nothing else in the guest loads BPF programs, so every program
/// that ran is the tracer's.
pub fn guest(opts: GuestOptions) -> Result<()> {
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

const GUEST_MARKER: &str = "@@QTRACE bench ";
const PROFILE_MARKER: &str = "@@QTRACE profile ";

fn fifo(path: &str) -> Result<PathBuf> {
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
fn profile_round(ns: &Netns, round: Duration, qtrace: &Path) -> Result<()> {
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

/// 1b: the same churn in Debian's 6.12 kernel under QEMU, where fentry and kprobes exist:
/// qtrace at both tiers against no tracer and against bpftrace, interleaved in one guest.
fn guest_churn(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: churn in the 6.12 guest");
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
        "ulimit -l unlimited\n{} bench-guest --rounds {} --millis {} --qtrace {} 2>&1\n\
         echo '@@QTRACE done'\npoweroff -f",
        xtask.display(),
        z.guest_rounds,
        z.guest_round.as_millis(),
        qtrace.display()
    );
    let image = crate::matrix::guest_image(
        &cache,
        "6.12",
        "bench-",
        &[xtask, qtrace.to_path_buf(), bpftrace, perf],
        &files,
        &init,
    )?;
    let (console, finished) = crate::matrix::qemu::boot(
        &image.vmlinux,
        &image.initrd,
        "",
        2048,
        crate::matrix::qemu::Clock::Instructions,
        Duration::from_secs(1800),
    )?;
    let log = cache.join("logs/bench-6.12.log");
    std::fs::write(&log, &console)?;
    anyhow::ensure!(
        finished,
        "the benchmark guest timed out (console in {})",
        log.display()
    );
    let mut churn = Churn::default();
    let profile: Vec<&str> = console
        .lines()
        .filter_map(|l| Some(l.split_once(PROFILE_MARKER)?.1.trim_end()))
        .collect();
    for line in console.lines() {
        let Some((_, json)) = line.split_once(GUEST_MARKER) else {
            continue;
        };
        let v: Value = serde_json::from_str(json.trim_end())
            .with_context(|| format!("a guest result in {}", log.display()))?;
        let config = GUEST_CONFIGS
            .into_iter()
            .find(|c| v["config"] == c.name())
            .context("an unknown configuration")?;
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
        image.release
    );
    let _ = writeln!(
        s,
        "The same churn ({CLIENTS} clients, an accept loop) inside one guest booted from Debian's \
         kernel: {} rounds of {:?} per configuration, interleaved, after a warm-up round. The \
         guest's CPU is emulated (TCG, no KVM here) with its clock counting instructions \
         (`-icount shift=0`: one nanosecond per instruction), so its connections/s are \
         connections per 10⁹ guest instructions and the ratios compare instruction counts, \
         repeatable and untouched by the emulator's speed or the host's load. They leave out \
         what costs more than its instructions natively (cache misses, atomics).\n",
        z.guest_rounds, z.guest_round
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
    Ok(s)
}

/// What a symbol of the guest's profile is to a traced connection, by name.
const PROFILE_GROUPS: [(&str, &[&str]); 3] = [
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
fn profile_table(profile: &[&str]) -> String {
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

/// The programs named `prefix…` that ran.
fn prog_runtimes(prefix: &str) -> Result<Programs> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()?;
    let progs: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    Ok(progs
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .filter_map(|p| {
            let cnt = p["run_cnt"].as_u64()?;
            (cnt > 0).then(|| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    cnt,
                    p["run_time_ns"].as_u64().unwrap_or(0),
                )
            })
        })
        .collect())
}

/// 3: a connect storm against a backlog-1 listener that never accepts.
fn storm(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: overflow storm");
    let ns = Netns::new("bench-storm")?;
    ns.sysctl("net.ipv4.tcp_syncookies", "0")?;
    // Each worker storms from a namespace of its own, over a veth link: the listener's
    // namespace counts the drops, theirs do not.
    let clients = (0..STORM_WORKERS)
        .map(|i| {
            let c = Netns::new(&format!("bench-stormc{i}"))?;
            let server = ns.link(&c, i as u8)?;
            Ok((c, server))
        })
        .collect::<Result<Vec<_>>>()?;
    let d = Daemon::start(qtrace, &[])?;
    let (tx, rx) = std::sync::mpsc::channel();
    let name = ns.name.clone();
    let done = Arc::new(AtomicBool::new(false));
    let server = {
        let (done, name) = (done.clone(), name.clone());
        thread::spawn(move || -> Result<()> {
            Netns::enter(&name)?;
            let l = TcpListener::bind("0.0.0.0:0")?;
            // SAFETY: re-listening with another backlog (std's is 128) on our socket.
            unsafe { libc::listen(l.as_raw_fd(), 1) };
            tx.send(l.local_addr()?.port()).ok();
            while !done.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })
    };
    let port: u16 = rx.recv_timeout(Duration::from_secs(5))?;
    let before = ns.tcp_ext_value("ListenDrops")?;
    let attempts = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = clients
        .iter()
        .map(|(client, server)| {
            let addr = SocketAddr::from((*server, port));
            let (done, attempts, name) = (done.clone(), attempts.clone(), client.name.clone());
            thread::spawn(move || -> Result<()> {
                Netns::enter(&name)?;
                while !done.load(Ordering::Relaxed) {
                    syn(addr);
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let cost = StormCost::measure(&d, z, &done, workers)?;
    let secs = cost.secs;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("storm server panicked"))??;
    let after = ns.tcp_ext_value("ListenDrops")?;
    let (_, metrics) = d.get("/metrics")?;
    drop(d);
    let drops = after - before;
    let port_label = format!("port=\"{port}\"");
    let visible = sum_samples(&metrics, "qtrace_listen_drops_total", &[&port_label]);
    let seen_reasons = metrics.matches(&format!("port=\"{port}\",reason")).count();
    let mut s = String::from("## 3. Overflow storm\n\n");
    let _ = writeln!(s, "{STORM_WORKERS} threads, each in a namespace of its own linked to the listener's by veth, connect (1 SYN each) to a backlog-1 listener that never accepts, syncookies off, for {secs:.1} s.\n");
    s += "| figure | value | target |\n|---|---|---|\n";
    let _ = writeln!(
        s,
        "| connect attempts/s | {:.0} | |",
        attempts.load(Ordering::Relaxed) as f64 / secs
    );
    let _ = writeln!(
        s,
        "| listen drops/s (kernel) | {:.0} | ≥ 100k |",
        drops as f64 / secs
    );
    let _ = writeln!(s, "| drops qtrace counted / kernel ListenDrops | {visible} / {drops} ({seen_reasons} reasons visible on this kernel) | equal where visible |");
    s += &cost.rows(&metrics);
    s += "\nOn this kernel the SYN-time drops have no hook (the `syn` probe is unavailable), so they are not counted here; the QEMU matrix checks them.\n\n";
    Ok(s)
}

/// Connecting threads of the storm, each in its own namespace.
const STORM_WORKERS: usize = 4;

/// What the daemon cost during a storm: its CPU and memory, and how fast /metrics answered.
struct StormCost {
    secs: f64,
    /// Percent of one core.
    cpu: f64,
    rss_mib: f64,
    /// /metrics response times (ms).
    scrapes: Vec<f64>,
}

impl StormCost {
    /// Lets `workers` storm for `z.storm`, scraping /metrics every 200 ms meanwhile, then
    /// stops them through `done` and joins them.
    fn measure(
        d: &Daemon,
        z: &Sizes,
        done: &AtomicBool,
        workers: Vec<thread::JoinHandle<Result<()>>>,
    ) -> Result<Self> {
        let cpu0 = d.cpu()?;
        let t = Instant::now();
        let mut scrapes = Vec::new();
        while t.elapsed() < z.storm {
            scrapes.push(d.get("/metrics")?.0.as_secs_f64() * 1e3);
            thread::sleep(Duration::from_millis(200));
        }
        done.store(true, Ordering::Relaxed);
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("storm worker panicked"))??;
        }
        let secs = t.elapsed().as_secs_f64();
        Ok(Self {
            secs,
            cpu: (d.cpu()? - cpu0) / secs * 100.0,
            rss_mib: d.rss_mib()?,
            scrapes,
        })
    }

    /// The daemon's rows of a storm's table, with the events it lost by `metrics`' count.
    fn rows(&self, metrics: &str) -> String {
        let scr = stats(self.scrapes.clone());
        let (ring_full, limited) = events_lost(metrics);
        let mut s = String::new();
        let _ = writeln!(s, "| daemon CPU | {:.1} % of one core | ≤ 5 % |", self.cpu);
        let _ = writeln!(s, "| daemon RSS | {:.1} MiB | ≤ 30 MB |", self.rss_mib);
        let _ = writeln!(
            s,
            "| /metrics during the storm (ms, min / median / max) | {:.1} / {:.1} / {:.1} | < 50 ms |",
            scr.0, scr.1, scr.2
        );
        let _ = writeln!(
            s,
            "| events not delivered, counted: ring buffer full / rate-limited | {ring_full} / {limited} | all counted |"
        );
        s
    }
}

/// The events the daemon's kernel side did not deliver, by cause: (ring buffer full,
/// rate-limited).
fn events_lost(metrics: &str) -> (u64, u64) {
    let lost = |cause: &str| {
        let label = format!("cause=\"{cause}\"");
        sum_samples(metrics, "qtrace_events_lost_total", &[&label])
    };
    (lost("ringbuf_full"), lost("rate_limited"))
}

/// Sends one SYN to `addr` and forgets the socket: a non-blocking connect, then close
/// (a socket closed in SYN_SENT sends nothing more and is never retried).
fn syn(addr: SocketAddr) {
    let SocketAddr::V4(v4) = addr else { return };
    let sin = sockaddr(v4);
    // SAFETY: a fresh socket, a valid sockaddr_in, closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        if fd < 0 {
            return;
        }
        libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        libc::close(fd);
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// 4: 10,000 listeners in 10 namespaces.
fn scale(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: scale");
    // One process holds every listener: more descriptors than the usual soft limit of 1024.
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile);
        nofile.rlim_cur = nofile.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &nofile);
    }
    let namespaces: Vec<Netns> = (0..z.namespaces)
        .map(|i| Netns::new(&format!("bench-scale{i}")))
        .collect::<Result<_>>()?;
    let mut holders = Vec::new();
    for ns in &namespaces {
        let (name, n) = (ns.name.clone(), z.listeners_per_ns);
        holders.push(
            thread::spawn(move || -> Result<Vec<TcpListener>> {
                Netns::enter(&name)?;
                (0..n)
                    .map(|_| TcpListener::bind("127.0.0.1:0").map_err(Into::into))
                    .collect()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("listener thread panicked"))??,
        );
    }
    let total = z.namespaces * z.listeners_per_ns;
    let d = Daemon::start(qtrace, &["--max-listener-series", &total.to_string()])?;
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..z.scrapes {
        let (t, body) = d.get("/metrics")?;
        times.push(t.as_secs_f64() * 1e3);
        size = body.len();
    }
    let (api, _) = d.get("/api/listeners")?;
    let rss = d.rss_mib()?;
    let startup = d.startup;
    drop(d);
    drop(holders);
    times.sort_by(f64::total_cmp);
    let p = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    let mut s = format!(
        "## 4. Scale: {total} listeners in {} namespaces\n\n",
        z.namespaces
    );
    s += "| figure | value | target |\n|---|---|---|\n";
    let _ = writeln!(
        s,
        "| startup to all probes attached | {:.0} ms | ≤ 1 s |",
        startup.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        s,
        "| /metrics scrape p50 / p99 ({} scrapes) | {:.1} / {:.1} ms | p99 ≤ 100 ms |",
        times.len(),
        p(0.5),
        p(0.99)
    );
    let _ = writeln!(s, "| /metrics size | {:.0} KiB | |", size as f64 / 1024.0);
    let _ = writeln!(
        s,
        "| /api/listeners | {:.1} ms | |",
        api.as_secs_f64() * 1e3
    );
    let _ = writeln!(s, "| daemon RSS | {rss:.1} MiB | ≤ 50 MB |");
    s.push('\n');
    Ok(s)
}

/// 5: a burst of SYN-ACK retransmit events through `qtrace events --json`.
fn event_path(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: event path");
    let ns = Netns::new("bench-events")?;
    let d = Daemon::start(
        qtrace,
        &["--event-rate", "1000000", "--events-reader-queue", "100000"],
    )?;
    let mut reader = Interrupted(
        Command::new(qtrace)
            .args(["events", "--json", "--socket"])
            .arg(&d.socket)
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let out = BufReader::new(reader.0.stdout.take().unwrap());
    let n = z.burst;
    let counter = thread::spawn(move || {
        let mut got = 0usize;
        let mut first = None;
        let mut last = Instant::now();
        for line in out.lines().map_while(Result::ok) {
            if line.contains("\"event\"") {
                got += 1;
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
            }
        }
        (
            got,
            first.map_or(0.0, |f| last.duration_since(f).as_secs_f64()),
        )
    });
    // Half-open handshakes (final ACKs dropped): one retransmit event each after 1 s.
    ns.nft("table inet b {\n chain input {\n type filter hook input priority 0\n tcp flags & (syn | ack | fin | rst) == ack drop\n }\n}\n")?;
    let name = ns.name.clone();
    let cpu0 = d.cpu()?;
    let retrans0 = ns.tcp_ext_value("TCPSynRetrans")?;
    let clients = thread::spawn(move || -> Result<Vec<TcpStream>> {
        Netns::enter(&name)?;
        let l = TcpListener::bind("127.0.0.1:0")?;
        // SAFETY: re-listening with a larger backlog on our socket.
        unsafe { libc::listen(l.as_raw_fd(), 65535) };
        let addr = l.local_addr()?;
        let v: Vec<TcpStream> = (0..n)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        thread::sleep(Duration::from_millis(2500));
        drop(l);
        Ok(v)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let cpu = d.cpu()? - cpu0;
    // The kernel's own count: past somaxconn requests turn into syncookies, not retransmits.
    let happened = ns.tcp_ext_value("TCPSynRetrans")? - retrans0;
    let (_, metrics) = d.get("/metrics")?;
    let (ring_full, limited) = events_lost(&metrics);
    drop(reader); // its output ends: the counter finishes
    let (got, spread) = counter
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    drop(d);
    drop(clients);
    if got == 0 {
        bail!("no events reached `qtrace events`");
    }
    let mut s = String::from("## 5. Event path\n\n");
    let _ = writeln!(s, "{n} handshakes are held half-open (the listener's SYN queue takes up to somaxconn of them, the rest get syncookies); their first SYN-ACK retransmits come together about 1 s later and `qtrace events --json` reads them from the daemon.\n");
    s += "| figure | value |\n|---|---|\n";
    let _ = writeln!(
        s,
        "| events delivered / SYN-ACK retransmits (kernel) | {got} / {happened} |"
    );
    let _ = writeln!(
        s,
        "| not delivered, counted: ring buffer full / rate-limited | {ring_full} / {limited} |"
    );
    let _ = writeln!(
        s,
        "| delivery rate (first to last event) | {:.0} events/s |",
        got as f64 / spread.max(1e-6)
    );
    let _ = writeln!(
        s,
        "| daemon CPU per delivered event | {:.1} µs |",
        cpu / got as f64 * 1e6
    );
    s.push('\n');
    Ok(s)
}
