//! 1c: a real server in the 6.12 guest: nginx answering a small response to wrk, every
//! request on a new connection (`Connection: close`), under each guest configuration.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use super::*;
use anyhow::{bail, Context, Result};

pub(super) const NGINX_MARKER: &str = "@@QTRACE nginx ";

/// Where nginx listens in the guest (its own loopback: the guest has no other network).
const ADDR: &str = "127.0.0.1:8080";
/// wrk's connections, one thread: as many clients as the churn has.
const CONNECTIONS: usize = CLIENTS;
/// What the host packs into the guest for this benchmark.
pub(super) const BINARIES: [&str; 2] = ["/usr/sbin/nginx", "/usr/bin/wrk"];

/// Debian's nginx with no file of its own: error log to stderr, temporary paths, pid file and
/// prefix under /tmp, one worker, no access log; `return 200` answers without touching a
/// file. The `user` directive names root, which the guest's /etc/passwd has (see [`start`]).
const CONF: &str = "daemon off;\nworker_processes 1;\nuser root root;\npid /tmp/nginx/nginx.pid;\n\
error_log stderr crit;\nevents { worker_connections 4096; }\nhttp {\n access_log off;\n \
client_body_temp_path /tmp/nginx/body;\n proxy_temp_path /tmp/nginx/proxy;\n \
fastcgi_temp_path /tmp/nginx/fastcgi;\n uwsgi_temp_path /tmp/nginx/uwsgi;\n \
scgi_temp_path /tmp/nginx/scgi;\n server {\n  listen 127.0.0.1:8080 backlog=4096;\n  \
location / { return 200 \"ok\\n\"; }\n }\n}\n";

/// nginx running in the guest; stopped (SIGTERM, reaped) when dropped.
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        stop_child(&mut self.0, libc::SIGTERM);
    }
}

fn start() -> Result<Nginx> {
    // nginx looks its user up even as root; the initramfs has no passwd file of its own.
    for (file, line) in [
        ("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("/etc/group", "root:x:0:\n"),
    ] {
        if !Path::new(file).exists() {
            std::fs::write(file, line)?;
        }
    }
    std::fs::create_dir_all("/tmp/nginx")?;
    std::fs::write("/tmp/nginx/nginx.conf", CONF)?;
    let child = Command::new("nginx")
        .args([
            "-p",
            "/tmp/nginx/",
            "-e",
            "stderr",
            "-c",
            "/tmp/nginx/nginx.conf",
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("nginx (apt package nginx)")?;
    let nginx = Nginx(child);
    // Serving once it answers.
    for _ in 0..100 {
        if std::net::TcpStream::connect(ADDR).is_ok() {
            return Ok(nginx);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nginx did not start listening on {ADDR}")
}

/// Requests/s wrk reached against nginx for `round`, each request on a new connection.
fn wrk_round(round: Duration) -> Result<f64> {
    let out = Command::new("wrk")
        .args(["-t", "1", "-c", &CONNECTIONS.to_string()])
        // wrk takes whole seconds (s, m, h).
        .arg(format!("-d{}s", round.as_secs().max(1)))
        .args(["-H", "Connection: close"])
        .arg(format!("http://{ADDR}/"))
        .output()
        .context("wrk (apt package wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
}

/// In the guest: a warm-up round, then `rounds` rounds of each configuration interleaved as
/// the churn's are, one `@@QTRACE nginx` JSON line per round.
pub(super) fn guest_rounds(rounds: usize, round: Duration, qtrace: &Path) -> Result<()> {
    let _nginx = start()?;
    // 0 (the smoke run): one round, no warm-up.
    if rounds > 0 {
        eprintln!("bench: nginx warm-up round");
        wrk_round(round)?;
    }
    let rounds = rounds.max(1);
    for r in 1..=rounds {
        eprintln!("bench: nginx round {r}/{rounds}");
        let order = NGINX_CONFIGS.iter().cycle().skip(r % NGINX_CONFIGS.len());
        for &config in order.take(NGINX_CONFIGS.len()) {
            let running = config.start(qtrace)?;
            let rps = wrk_round(round)?;
            drop(running);
            let line = serde_json::json!({ "config": config.name(), "rps": rps });
            println!("{NGINX_MARKER}{line}");
        }
    }
    Ok(())
}

/// The host's side: the binaries to pack.
pub(super) fn binaries() -> Result<Vec<PathBuf>> {
    BINARIES
        .iter()
        .map(|b| {
            let p = PathBuf::from(b);
            anyhow::ensure!(p.exists(), "{b} missing (apt packages nginx and wrk)");
            Ok(p)
        })
        .collect()
}

/// 1c's section from the guest's console.
pub(super) fn section(console: &str, log: &Path, z: &Sizes) -> Result<String> {
    let mut rps: std::collections::BTreeMap<Config, Vec<f64>> = Default::default();
    for (config, v) in guest_results(console, NGINX_MARKER, log)? {
        rps.entry(config)
            .or_default()
            .push(v["rps"].as_f64().unwrap_or(0.0));
    }
    if rps.len() != NGINX_CONFIGS.len() {
        bail!(
            "the benchmark guest did not run nginx under every configuration (console in {})",
            log.display()
        );
    }
    let median = |c: Config| stats(rps[&c].clone());
    let base = median(Config::NoTracer).1;
    let mut s = String::from("## 1c. A real server: nginx and wrk in the same guest\n\n");
    let _ = writeln!(
        s,
        "Debian's nginx (one worker) answers `GET /` with a 3-byte body (`return 200`) to wrk \
         (one thread, {CONNECTIONS} connections, `Connection: close`: every request on a new \
         connection), in the 1b guest with the same instruction-counting clock, so requests/s \
         are requests per 10⁹ guest instructions: {}.\n",
        super::guest::rounds_phrase(z)
    );
    s += "| configuration | requests/s (min / median / max) | ratio to no tracer (median) | target |\n|---|---|---|---|\n";
    for c in NGINX_CONFIGS {
        let st = median(c);
        let ratio = st.1 / base;
        let target = match c {
            Config::QtraceFentry => {
                format!("≥ 0.99: {}", if ratio >= 0.99 { "met" } else { "missed" })
            }
            Config::Bpftrace => "peer".to_string(),
            _ => String::new(),
        };
        let _ = writeln!(s, "| {} | {} | {ratio:.3} | {target} |", c.name(), fmt3(st));
    }
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_has_every_configuration_and_marks_the_target() {
        let console: String = [
            ("no tracer", 1000.0),
            ("qtrace, fentry tier", 995.0),
            ("qtrace, forced to kprobes", 950.0),
            ("bpftrace tcpsynbl.bt + tcpaccept.bt", 800.0),
        ]
        .iter()
        .map(|(c, rps)| {
            format!(
                "{NGINX_MARKER}{}\n",
                serde_json::json!({"config": c, "rps": rps})
            )
        })
        .collect();
        let z = Sizes {
            rounds: 1,
            round: Duration::from_secs(1),
            guest_rounds: 1,
            guest_round: Duration::from_secs(1),
            storm: Duration::from_secs(1),
            namespaces: 1,
            listeners_per_ns: 1,
            scrapes: 1,
            burst: 1,
            port_range: 1,
            port_batch: 1,
        };
        let s = section(&console, Path::new("log"), &z).unwrap();
        assert!(
            s.contains("| qtrace, fentry tier | 995 / 995 / 995 | 0.995 | ≥ 0.99: met |"),
            "{s}"
        );
        assert!(
            s.contains("| no tracer | 1000 / 1000 / 1000 | 1.000 |"),
            "{s}"
        );
        // A configuration missing from the console is an error, not a row of zeros.
        let partial: String = console.lines().take(3).map(|l| format!("{l}\n")).collect();
        assert!(section(&partial, Path::new("log"), &z).is_err());
    }
}
