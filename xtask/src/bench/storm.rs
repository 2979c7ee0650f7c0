//! 3: a connect storm against a backlog-1 listener that never accepts, and what the daemon
//! cost meanwhile.

use std::{
    fmt::Write as _,
    net::{SocketAddr, SocketAddrV4, TcpListener},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use qtrace_testkit::{scrape, Netns};

use super::*;

/// 3: a connect storm against a backlog-1 listener that never accepts.
pub(super) fn storm(qtrace: &Path, z: &Sizes) -> Result<String> {
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
    let d_syn_tier = d.tier("syn")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let name = ns.name.clone();
    let done = Arc::new(AtomicBool::new(false));
    let server = {
        let (done, name) = (done.clone(), name.clone());
        thread::spawn(move || -> Result<TcpListener> {
            Netns::enter(&name)?;
            let l = TcpListener::bind("0.0.0.0:0")?;
            // SAFETY: re-listening with another backlog (std's is 128) on our socket.
            unsafe { libc::listen(l.as_raw_fd(), 1) };
            tx.send(l.local_addr()?.port()).ok();
            while !done.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
            }
            // Still listening when the daemon is scraped: drops the probes could not classify
            // are read from the socket itself (`unclassified`), so a closed one has no series.
            Ok(l)
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
    let listener = server
        .join()
        .map_err(|_| anyhow::anyhow!("storm server panicked"))??;
    let after = ns.tcp_ext_value("ListenDrops")?;
    let (_, metrics) = d.get("/metrics")?;
    drop(d);
    drop(listener);
    let drops = after - before;
    let port_label = port.to_string();
    // Every reason the exposition has for the listener, `unclassified` included (the drops no
    // attached probe classified, where the `syn` probe cannot attach).
    let by_reason: Vec<(String, u64)> = reasons(&metrics, &port_label);
    let visible: u64 = by_reason.iter().map(|(_, n)| n).sum();
    let split = by_reason
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
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
    let _ = writeln!(
        s,
        "| drops qtrace counted / kernel ListenDrops | {visible} / {drops} (by reason: {}) | equal |",
        if split.is_empty() { "none" } else { &split }
    );
    s += &cost.rows(&metrics);
    let tier = d_syn_tier;
    let _ = writeln!(
        s,
        "\nThe `syn` probe's tier here: {tier}. Where it is unavailable, the SYN-time drops are counted as reason `unclassified` (the listener's own drop count, read with sock_diag, less the classified ones); the QEMU matrix checks the classified counts.\n"
    );
    Ok(s)
}

/// `(reason, drops)` of `qtrace_listen_drops_total` for the listener on `port`: the
/// vocabulary's reasons, `unclassified` included.
fn reasons(metrics: &str, port: &str) -> Vec<(String, u64)> {
    [
        "syn_queue_full",
        "accept_queue_full_syn",
        "accept_queue_full_ack",
        "other",
        "unclassified",
    ]
    .into_iter()
    .map(|r| {
        let labels = [("port", port), ("reason", r)];
        let n = scrape::sum(metrics, "qtrace_listen_drops_total", &labels);
        (r.to_string(), n as u64)
    })
    .collect()
}

/// Connecting threads of the storm, each in its own namespace.
pub(super) const STORM_WORKERS: usize = 4;

/// What the daemon cost during a storm: its CPU and memory, and how fast /metrics answered.
pub(super) struct StormCost {
    pub(super) secs: f64,
    /// Percent of one core.
    pub(super) cpu: f64,
    pub(super) rss_mib: f64,
    /// /metrics response times (ms).
    pub(super) scrapes: Vec<f64>,
}

impl StormCost {
    /// Lets `workers` storm for `z.storm`, scraping /metrics every 200 ms meanwhile, then
    /// stops them through `done` and joins them.
    pub(super) fn measure(
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
    pub(super) fn rows(&self, metrics: &str) -> String {
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

/// A storm's rows for the BPF programs that ran in it (kernel.bpf_stats_enabled=1): their
/// invocations and mean run time, against the per-invocation target, and the runs the kernel
/// skipped (recursion misses: events no counter saw).
pub(super) fn program_rows(programs: &Programs) -> String {
    let mut s = String::new();
    for (name, cnt, ns_total, missed) in programs {
        let _ = writeln!(
            s,
            "| {name}: invocations, mean ns per invocation | {cnt}, {:.0} | ≤ 250 ns |",
            *ns_total as f64 / (*cnt).max(1) as f64
        );
        let _ = writeln!(
            s,
            "| {name}: runs the kernel skipped (recursion misses) | {missed} | 0 |"
        );
    }
    s
}

/// The events the daemon's kernel side did not deliver, by cause: (ring buffer full,
/// rate-limited).
pub(super) fn events_lost(metrics: &str) -> (u64, u64) {
    let lost =
        |cause: &str| scrape::sum(metrics, "qtrace_events_lost_total", &[("cause", cause)]) as u64;
    (lost("ringbuf_full"), lost("rate_limited"))
}

/// Sends one SYN to `addr` and forgets the socket: a non-blocking connect, then close
/// (a socket closed in SYN_SENT sends nothing more and is never retried).
pub(super) fn syn(addr: SocketAddr) {
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

pub(super) fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}
