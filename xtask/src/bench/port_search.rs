//! 3d: connect()'s port search as the ephemeral range fills, in the 6.12 guest where the
//! `port_search` probe attaches (fentry/fexit on `inet_hash_connect`), with the guest's clock
//! counting instructions. A namespace's `ip_local_port_range` holds a few thousand ports;
//! established connections to one destination take a growing share of them, step by step,
//! and at each step a batch of connects to the same destination is timed: qtrace's
//! `qtrace_connect_port_search_seconds` histogram, read before and after the batch, says what
//! the port search cost each of them.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use qtrace_testkit::Netns;
use serde_json::Value;

use super::{sockaddr, Daemon, Sizes};

pub(super) const PORTS_MARKER: &str = "@@QTRACE ports ";
/// The share of the range in use at each step, in percent.
const STEPS: [u32; 6] = [0, 25, 50, 75, 90, 99];
/// The destination of every connection.
const PORT: u16 = 5000;
const LOW: u16 = 40000;
const HISTOGRAM: &str = "qtrace_connect_port_search_seconds";

/// In the guest (`xtask bench-guest --port-search`): qtrace at the fentry tier, then each
/// step's fill and batch, one `@@QTRACE ports` JSON line per step.
pub(super) fn guest_steps(range: u16, batch: usize, qtrace: &Path) -> Result<()> {
    raise_nofile()?;
    let ns = Netns::new("bench-ports")?;
    let high = LOW + range - 1;
    ns.sysctl("net.ipv4.ip_local_port_range", &format!("{LOW} {high}"))?;
    ns.sysctl("net.core.somaxconn", "65535")?;
    let d = Daemon::start(qtrace, &["--attach", "fentry"])?;
    let tier = d.tier("port_search")?;
    let netns = ns.inode.to_string();
    let name = ns.name.clone();
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
    // Everything runs on one thread in the namespace: the listener (which never accepts; its
    // accept queue holds the filling connections), the connections, the batches; /metrics is
    // read by a thread in the root namespace, where the daemon listens.
    let web = d.web.clone();
    let results = std::thread::spawn(move || -> Result<Vec<Value>> {
        Netns::enter(&name)?;
        let listener = TcpListener::bind(to)?;
        // SAFETY: re-listening with a backlog that holds every filling connection.
        unsafe { libc::listen(listener.as_raw_fd(), 65535) };
        let mut held: Vec<TcpStream> = Vec::new();
        let mut out = Vec::new();
        for pct in STEPS {
            let want = usize::from(range) * pct as usize / 100;
            while held.len() < want {
                held.push(TcpStream::connect(to).context("fill the port range")?);
            }
            let before = metrics_from_root(&web)?;
            let t = Instant::now();
            let mut failed = 0usize;
            let sin = sockaddr(to);
            for _ in 0..batch {
                if !connect_and_reset(&sin) {
                    failed += 1;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let after = metrics_from_root(&web)?;
            let (b0, b1) = (buckets(&before, &netns), buckets(&after, &netns));
            let (s0, s1) = (sum(&before, &netns), sum(&after, &netns));
            let count = |m: &str| {
                let name = format!("{HISTOGRAM}_count");
                qtrace_testkit::scrape::sum(m, &name, &[("netns", &netns)]) as u64
            };
            let counted = count(&after).saturating_sub(count(&before));
            // The finite buckets (JSON has no infinity).
            let diff: Vec<(f64, u64)> = b1
                .iter()
                .filter(|(le, _)| le.is_finite())
                .map(|(le, n)| {
                    let was = b0.iter().find(|(l, _)| l == le).map_or(0, |(_, n)| *n);
                    (*le, n.saturating_sub(was))
                })
                .collect();
            out.push(serde_json::json!({
                "pct": pct,
                "in_use": held.len(),
                "range": range,
                "connects": batch,
                "failed": failed,
                "cps": batch as f64 / secs,
                "count": counted,
                "sum_s": s1 - s0,
                "buckets": diff,
            }));
        }
        drop((held, listener));
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the port-search thread panicked"))??;
    for mut line in results {
        line["tier"] = tier.clone().into();
        println!("{PORTS_MARKER}{line}");
    }
    drop(d);
    Ok(())
}

/// GET /metrics from a thread in the root namespace (the daemon listens on its loopback).
fn metrics_from_root(web: &str) -> Result<String> {
    let web = web.to_string();
    std::thread::spawn(move || -> Result<String> {
        let root = std::fs::File::open("/proc/1/ns/net")?;
        // SAFETY: a valid namespace fd; only this thread moves.
        if unsafe { libc::setns(root.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns(root): {}", std::io::Error::last_os_error());
        }
        qtrace_testkit::scrape::http_request(&web, "/metrics", None)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the scrape thread panicked"))?
}

/// A connect (the port search happens in it, before the SYN leaves), then close with a
/// reset (SO_LINGER 0), which frees the port at once: no TIME_WAIT, and no FIN_WAIT2 waiting
/// for a peer that never accepts. The reset peer leaves the 4-tuple too (its socket stays in
/// the accept queue, closed). False when connect() failed.
fn connect_and_reset(to: &libc::sockaddr_in) -> bool {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a fresh socket, valid sockaddr_in and linger values, closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return false;
        }
        let ok = libc::connect(
            fd,
            (to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) == 0;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        );
        libc::close(fd);
        ok
    }
}

/// Room for a range's worth of connections.
fn raise_nofile() -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: 1 << 16,
        rlim_max: 1 << 16,
    };
    // SAFETY: a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        bail!("setrlimit(NOFILE): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The namespace's cumulative buckets of the histogram: (upper bound in s, count).
fn buckets(metrics: &str, netns: &str) -> Vec<(f64, u64)> {
    let name = format!("{HISTOGRAM}_bucket{{");
    let ns = format!("netns=\"{netns}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(&name) && l.contains(&ns))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit_once(' ')?.1.parse::<f64>().ok()? as u64))
        })
        .collect()
}

fn sum(metrics: &str, netns: &str) -> f64 {
    qtrace_testkit::scrape::sum(metrics, &format!("{HISTOGRAM}_sum"), &[("netns", netns)])
}

/// The upper bound (ns) of the bucket holding quantile `q` of `total` observations in
/// cumulative `buckets` (None beyond the last finite bucket).
fn quantile(buckets: &[(f64, u64)], total: u64, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil() as u64;
    buckets
        .iter()
        .find(|(_, n)| *n >= rank.max(1))
        .map(|(le, _)| le * 1e9)
}

/// 3d: boots the 6.12 guest for the port-search steps alone and writes the section.
pub(super) fn port_search(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: port search in the 6.12 guest");
    let cache = crate::matrix::cache_dir()?;
    let xtask = std::env::current_exe()?;
    let mut init = String::from(crate::matrix::INIT_PROLOGUE);
    let _ = writeln!(
        init,
        "ulimit -l unlimited\n{} bench-guest --rounds 1 --millis 1 --qtrace {} --port-search \
         --port-range {} --port-batch {} 2>&1\necho '@@QTRACE done'\npoweroff -f",
        xtask.display(),
        qtrace.display(),
        z.port_range,
        z.port_batch,
    );
    let image = crate::matrix::guest_image(
        &cache,
        "6.12",
        "bench-ports-",
        &[xtask, qtrace.to_path_buf()],
        &[],
        &init,
    )?;
    let (console, log) =
        super::guest::boot_bench_guest(&image, "bench-ports-6.12", Duration::from_secs(1800))?;
    section(&console, &log, &image.release)
}

/// 3d's section from the guest's console.
fn section(console: &str, log: &Path, release: &str) -> Result<String> {
    let steps: Vec<Value> = console
        .lines()
        .filter_map(|l| Some(l.split_once(PORTS_MARKER)?.1.trim_end()))
        .map(|j| serde_json::from_str(j).with_context(|| format!("a step in {}", log.display())))
        .collect::<Result<_>>()?;
    if steps.len() != STEPS.len() {
        bail!(
            "the port-search guest reported {} of {} steps (console in {})",
            steps.len(),
            STEPS.len(),
            log.display()
        );
    }
    let tier = steps[0]["tier"].as_str().unwrap_or("?").to_string();
    let range = steps[0]["range"].as_u64().unwrap_or(0);
    let batch = steps[0]["connects"].as_u64().unwrap_or(0);
    let mut s = format!(
        "## 3d. connect()'s port search as the port range fills (Debian {release} under QEMU, port_search probe: {tier})\n\n"
    );
    let _ = writeln!(
        s,
        "In a guest of its own booted like 1b's (Debian's 6.12 kernel, its clock counting instructions: guest ns are instructions), a namespace's `ip_local_port_range` holds {range} ports; established connections to 127.0.0.1:{PORT} take a growing share of them, and at each step {batch} more connects to that destination (each reset at once with SO_LINGER 0, which frees the port) are timed. The port-search figures are qtrace's `{HISTOGRAM}` histogram for the namespace, read before and after each batch: the count, the mean (`_sum` / `_count`) and the log2 bucket holding the median and the 99th percentile (its upper bound).\n"
    );
    s += "| ports in use | connects counted / made | port search: mean / median ≤ / p99 ≤ (guest ns) | connects/s (per 10⁹ guest instructions) |\n|---|---|---|---|\n";
    for st in &steps {
        let buckets: Vec<(f64, u64)> =
            serde_json::from_value(st["buckets"].clone()).unwrap_or_default();
        let count = st["count"].as_u64().unwrap_or(0);
        let mean = st["sum_s"].as_f64().unwrap_or(0.0) * 1e9 / count.max(1) as f64;
        let q = |q| quantile(&buckets, count, q).map_or("–".to_string(), |v| format!("{v:.0}"));
        let failed = st["failed"].as_u64().unwrap_or(0);
        let _ = writeln!(
            s,
            "| {} of {range} ({} %) | {count} / {batch}{} | {mean:.0} / {} / {} | {:.0} |",
            st["in_use"],
            st["pct"],
            if failed > 0 {
                format!(" ({failed} failed)")
            } else {
                String::new()
            },
            q(0.5),
            q(0.99),
            st["cps"].as_f64().unwrap_or(0.0)
        );
    }
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let b = [(1e-6, 0), (2e-6, 50), (4e-6, 98), (8e-6, 100)];
        assert_eq!(quantile(&b, 100, 0.5), Some(2000.0));
        assert_eq!(quantile(&b, 100, 0.99), Some(8000.0));
        assert_eq!(quantile(&[(1e-6, 0)], 0, 0.5), None);
    }

    #[test]
    fn reads_a_namespaces_buckets() {
        let m = "qtrace_connect_port_search_seconds_bucket{le=\"1e-9\",netns=\"7\"} 0\n\
                 qtrace_connect_port_search_seconds_bucket{le=\"0.000001024\",netns=\"7\"} 3\n\
                 qtrace_connect_port_search_seconds_bucket{le=\"+Inf\",netns=\"7\"} 4\n\
                 qtrace_connect_port_search_seconds_bucket{le=\"+Inf\",netns=\"8\"} 9\n\
                 qtrace_connect_port_search_seconds_sum{netns=\"7\"} 0.5\n";
        assert_eq!(
            buckets(m, "7"),
            vec![(1e-9, 0), (0.000001024, 3), (f64::INFINITY, 4)]
        );
        assert_eq!(sum(m, "7"), 0.5);
    }
}
