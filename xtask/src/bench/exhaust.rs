//! 3c: a connect() storm at ephemeral-port exhaustion. In a namespace whose
//! `ip_local_port_range` holds a few ports, established connections take every one of them
//! towards one destination; threads then loop socket() + connect() + close(), and every
//! connect() fails with EADDRNOTAVAIL before any packet leaves. The `client` probe counts
//! each as `qtrace_connect_failures_total{reason="no_port"}` for that destination.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread,
    time::Duration,
};

use anyhow::Result;
use qtrace_testkit::{scrape, BpfStats, Netns};

use super::{prog_runtimes, program_rows, sockaddr, Daemon, Sizes, StormCost};

/// The namespace's `ip_local_port_range`: 64 ports.
const RANGE: (u16, u16) = (40000, 40063);
/// The destination every connection goes to, outside the range.
const PORT: u16 = 5000;
/// The reasons of `qtrace_connect_failures_total`.
const REASONS: [&str; 6] = [
    "no_port",
    "refused",
    "timed_out",
    "reset",
    "other",
    "aborted",
];

pub(super) fn connect_storm(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: connect() storm at port exhaustion");
    let ns = Netns::new("bench-exhaust")?;
    ns.sysctl(
        "net.ipv4.ip_local_port_range",
        &format!("{} {}", RANGE.0, RANGE.1),
    )?;
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
    let done = Arc::new(AtomicBool::new(false));
    // The listener (never accepting: its accept queue holds the connections) and the
    // connections that take every port live on one thread in the namespace until the end.
    let (tx, rx) = mpsc::channel();
    let holder = {
        let (done, name) = (done.clone(), ns.name.clone());
        thread::spawn(move || -> Result<()> {
            Netns::enter(&name)?;
            let listener = TcpListener::bind(to)?;
            // SAFETY: re-listening with a backlog that holds every connection of the range.
            unsafe { libc::listen(listener.as_raw_fd(), 1024) };
            let mut held = Vec::new();
            let result = loop {
                match TcpStream::connect(to) {
                    Ok(s) => held.push(s),
                    Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => break Ok(held.len()),
                    Err(e) => break Err(e),
                }
            };
            tx.send(result.map_err(anyhow::Error::from)).ok();
            while !done.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
            }
            drop((held, listener));
            Ok(())
        })
    };
    let held = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(n)) => n,
        other => {
            done.store(true, Ordering::Relaxed);
            let _ = holder.join();
            anyhow::bail!("the connections to exhaust the port range did not come up: {other:?}");
        }
    };
    let threads = thread::available_parallelism().map_or(2, |n| n.get());
    // The same storm with no tracer first, for comparison.
    let untraced = {
        let stop = Arc::new(AtomicBool::new(false));
        let (failed, other) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let t = std::time::Instant::now();
        let workers = storm_threads(&ns.name, threads, &stop, &failed, &other);
        thread::sleep(z.storm);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("storm worker panicked"))??;
        }
        failed.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
    };
    let d = Daemon::start(qtrace, &[])?;
    let tier = d.tier("client")?;
    let port = PORT.to_string();
    let netns = ns.inode.to_string();
    let labels = |reason: &'static str| {
        [
            ("netns", netns.clone()),
            ("addr", "127.0.0.1".to_string()),
            ("port", port.clone()),
            ("reason", reason.to_string()),
        ]
    };
    let counted = |metrics: &str, reason: &'static str| {
        let l = labels(reason);
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        scrape::sum(metrics, "qtrace_connect_failures_total", &l) as u64
    };
    // Counted before the storm (none: qtrace started after the connections that fill the range).
    let (_, before) = d.get("/metrics")?;
    let base: Vec<u64> = REASONS.iter().map(|r| counted(&before, r)).collect();
    let bpf_stats = BpfStats::save()?;
    bpf_stats.set(true)?;
    let (failed, other) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers = storm_threads(&ns.name, threads, &done, &failed, &other);
    let cost = StormCost::measure(&d, z, &done, workers)?;
    let secs = cost.secs;
    let programs = prog_runtimes("qt_client")?;
    drop(bpf_stats);
    holder
        .join()
        .map_err(|_| anyhow::anyhow!("the storm's listener panicked"))??;
    let (_, metrics) = d.get("/metrics")?;
    drop(d);
    let (failed, other) = (
        failed.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    anyhow::ensure!(
        failed > 0,
        "no connect() failed with EADDRNOTAVAIL: the port range was not exhausted"
    );
    let by_reason: Vec<(&str, u64)> = REASONS
        .iter()
        .zip(&base)
        .map(|(r, b)| (*r, counted(&metrics, r).saturating_sub(*b)))
        .collect();
    let no_port = by_reason[0].1;
    let others = by_reason
        .iter()
        .skip(1)
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect::<Vec<_>>();

    let mut s = format!("## 3c. connect() storm at port exhaustion (client probe: {tier})\n\n");
    let _ = writeln!(
        s,
        "A namespace's `ip_local_port_range` holds {} ports ({}–{}); {held} established connections to 127.0.0.1:{PORT} take every one of them. {threads} threads (one per CPU) then loop socket() + connect() to that destination + close() for {secs:.1} s, every connect() failing with EADDRNOTAVAIL before any packet leaves: first with no tracer, then with qtrace, whose counts are read before and after. kernel.bpf_stats_enabled=1 during qtrace's storm, for the programs' run time.\n",
        RANGE.1 - RANGE.0 + 1,
        RANGE.0,
        RANGE.1
    );
    s += "| figure | value | target |\n|---|---|---|\n";
    let _ = writeln!(
        s,
        "| connect() failures/s (EADDRNOTAVAIL, seen by the threads) | {:.0} | ≥ 100k |",
        failed as f64 / secs
    );
    let _ = writeln!(
        s,
        "| the same storm with no tracer, just before (failures/s) | {untraced:.0} | |"
    );
    let _ = writeln!(
        s,
        "| failures qtrace counted (`no_port`, this destination) / failures the threads saw | {no_port} / {failed} (other reasons: {}; other outcomes seen: {other}) | equal |",
        if others.is_empty() {
            "none".to_string()
        } else {
            others.join(", ")
        }
    );
    s += &cost.rows(&metrics);
    s += &program_rows(&programs);
    s += "\n";
    Ok(s)
}

/// `threads` threads in namespace `name` looping [`connect_once`] until `done`, adding the
/// EADDRNOTAVAIL failures they saw to `failed` and any other outcome to `other`.
fn storm_threads(
    name: &str,
    threads: usize,
    done: &Arc<AtomicBool>,
    failed: &Arc<AtomicU64>,
    other: &Arc<AtomicU64>,
) -> Vec<thread::JoinHandle<Result<()>>> {
    let to = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT));
    (0..threads)
        .map(|_| {
            let (done, failed, other, name) = (
                done.clone(),
                failed.clone(),
                other.clone(),
                name.to_string(),
            );
            thread::spawn(move || -> Result<()> {
                Netns::enter(&name)?;
                let (mut f, mut o) = (0u64, 0u64);
                while !done.load(Ordering::Relaxed) {
                    if connect_once(&to) == Some(libc::EADDRNOTAVAIL) {
                        f += 1;
                    } else {
                        o += 1;
                    }
                }
                failed.fetch_add(f, Ordering::Relaxed);
                other.fetch_add(o, Ordering::Relaxed);
                Ok(())
            })
        })
        .collect()
}

/// One socket(), a blocking connect() to `to` and close(): the connect's errno (None when it
/// connected).
fn connect_once(to: &libc::sockaddr_in) -> Option<i32> {
    // SAFETY: a fresh socket, a valid sockaddr_in, closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Some(*libc::__errno_location());
        }
        let rc = libc::connect(
            fd,
            (to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        let errno = (rc != 0).then(|| *libc::__errno_location());
        libc::close(fd);
        errno
    }
}
