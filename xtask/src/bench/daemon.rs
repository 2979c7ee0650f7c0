//! The daemon under benchmark: `qtrace run` started and ready, its CPU, memory and HTTP
//! answers, stopped (SIGTERM, reaped) however the benchmark ends.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use qtrace_testkit::probe_tier;
use serde_json::Value;

/// The daemon, started and ready (probes attached), with its HTTP address.
pub(super) struct Daemon {
    pub(super) child: Child,
    pub(super) web: String,
    /// Its `ready` line: the address it serves and the tier each probe got.
    pub(super) ready: Value,
    pub(super) socket: PathBuf,
    pub(super) startup: Duration,
}

impl Daemon {
    pub(super) fn start(qtrace: &Path, extra: &[&str]) -> Result<Self> {
        let socket = std::env::temp_dir().join(format!("qtrace-bench-{}.sock", std::process::id()));
        let t = Instant::now();
        let mut child = qtrace_testkit::daemon_command(qtrace, "1h", &socket)
            .args(extra)
            .stdout(Stdio::piped())
            // Its errors (why it did not start) reach the benchmark's stderr; QTRACE_BENCH_LOG
            // asks for more (`error,qtrace::daemon::http=debug`: each scrape's collect and
            // render times).
            .env(
                "QTRACE_LOG",
                std::env::var("QTRACE_BENCH_LOG").unwrap_or("error".into()),
            )
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first)?;
        // Keep reading: a closed pipe would end the daemon at its next printed event.
        thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let startup = t.elapsed();
        let ready = qtrace_testkit::ready_line(&first)?;
        let web = qtrace_testkit::ready_listen(&ready)?;
        Ok(Self {
            child,
            web,
            ready,
            socket,
            startup,
        })
    }

    /// The tier `probe` got ("unavailable" when none).
    pub(super) fn tier(&self, probe: &str) -> Result<String> {
        Ok(probe_tier(&self.ready, probe)?.unwrap_or_else(|| "unavailable".into()))
    }

    /// CPU seconds used so far (user + system).
    pub(super) fn cpu(&self) -> Result<f64> {
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

    /// CPU seconds its threads have run so far, to the nanosecond (`/proc/PID/task/*/schedstat`;
    /// `cpu` counts in clock ticks, 10 ms, too coarse for a burst that takes tens of ms). A
    /// thread that exited is not counted: the event path's threads all live through it.
    pub(super) fn cpu_precise(&self) -> Result<f64> {
        let mut ns = 0u64;
        for task in std::fs::read_dir(format!("/proc/{}/task", self.child.id()))? {
            let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
                continue; // exited meanwhile
            };
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .context("schedstat")?;
        }
        Ok(ns as f64 / 1e9)
    }

    pub(super) fn rss_mib(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmRSS")?;
        Ok(kib / 1024.0)
    }

    /// `GET path`: how long the answer took, and the whole response.
    pub(super) fn get(&self, path: &str) -> Result<(Duration, String)> {
        let t = Instant::now();
        let response = qtrace_testkit::scrape::http_request(&self.web, path, None)?;
        Ok((t.elapsed(), response))
    }
}

/// A stopped benchmark leaves nothing attached: on every path out, errors included, the daemon
/// gets SIGTERM and is waited for.
impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM);
    }
}

/// Signals a child of ours and reaps it.
pub(super) fn stop_child(child: &mut Child, signal: i32) {
    // SAFETY: signalling our own, not yet reaped, child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let _ = child.wait();
}
