//! 4: 10,000 listeners in 10 namespaces: /metrics and /api/listeners at scale.

use std::{fmt::Write as _, net::TcpListener, path::Path, thread};

use anyhow::Result;
use qtrace_testkit::Netns;

use super::*;

/// 4: 10,000 listeners in 10 namespaces.
pub(super) fn scale(qtrace: &Path, z: &Sizes) -> Result<String> {
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
