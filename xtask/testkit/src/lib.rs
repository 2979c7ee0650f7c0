//! What qtrace's integration tests and its benchmarks both need: network namespaces of their
//! own (with their own TcpExt counters, the ground truth qtrace is held to) and the BPF
//! run-time statistics switch, each undone when dropped; the reading of qtrace's ready
//! line; and its HTTP endpoints and Prometheus exposition ([`scrape`]).

pub mod scrape;

use std::{
    collections::HashMap,
    fs::File,
    io::Write,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{bail, ensure, Context, Result};

/// Runs a command to completion; its stderr is the error when it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{cmd:?} (`cargo xtask setup` installs what it needs)"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A network namespace made for one test or benchmark, deleted when dropped.
pub struct Netns {
    pub name: String,
    /// The namespace's inode number: what qtrace reports as `netns`. The kernel hands a
    /// deleted namespace's number to the next one made, so it names this namespace only
    /// together with `born_ns`.
    pub inode: u32,
    /// CLOCK_MONOTONIC (the events' `ts_ns` clock) just before the namespace was made: an
    /// event with this inode and an earlier time was another, deleted namespace's.
    pub born_ns: u64,
}

impl Netns {
    /// `qtrace-<tag>-<pid>-<n>`, with its loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "qtrace-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let born_ns = monotonic_ns();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on a failure deletes it again.
        let mut ns = Self {
            name,
            inode: 0,
            born_ns,
        };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        ns.inode = std::fs::metadata(format!("/run/netns/{}", ns.name))?.ino() as u32;
        Ok(ns)
    }

    /// Moves the calling thread into namespace `name`. Sockets it makes there stay in it and
    /// may be used from any thread afterwards.
    pub fn enter(name: &str) -> Result<()> {
        let path = format!("/run/netns/{name}");
        let ns = File::open(&path).with_context(|| path.clone())?;
        // SAFETY: a valid namespace fd; only the calling thread changes namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns({path}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a thread of its own that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let name = self.name.clone();
        thread::spawn(move || Netns::enter(&name).map(|()| f()))
            .join()
            .map_err(|_| anyhow::anyhow!("a thread in namespace {} panicked", self.name))?
    }

    /// Sets one of the namespace's sysctls, named as sysctl(8) does (`net.ipv4.tcp_syncookies`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let (path, value) = (
            format!("/proc/sys/{}", key.replace('.', "/")),
            value.to_string(),
        );
        self.run(move || std::fs::write(&path, value).with_context(|| path))?
    }

    /// Loads an nftables ruleset into the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("nft (apt package nftables; `cargo xtask setup` installs it)")?;
        child
            .stdin
            .take()
            .context("nft's stdin")?
            .write_all(ruleset.as_bytes())?;
        ensure!(child.wait()?.success(), "nft -f failed for:\n{ruleset}");
        Ok(())
    }

    /// The namespace's TcpExt counters (`/proc/net/netstat`): exact ground truth for it alone.
    pub fn tcp_ext(&self) -> Result<HashMap<String, u64>> {
        let text = self.run(|| std::fs::read_to_string("/proc/thread-self/net/netstat"))??;
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            bail!("no TcpExt lines in /proc/net/netstat");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
            .map(|(n, v)| Ok((n.to_string(), v.parse()?)))
            .collect()
    }

    /// One TcpExt counter of the namespace.
    pub fn tcp_ext_value(&self, name: &str) -> Result<u64> {
        self.tcp_ext()?
            .get(name)
            .copied()
            .with_context(|| format!("no TcpExt {name} on this kernel"))
    }

    /// A veth link from this namespace to `client`, on its own /30 (`10.77.<subnet>.0`):
    /// returns this end's address, which `client` reaches over the link.
    pub fn link(&self, client: &Netns, subnet: u8) -> Result<Ipv4Addr> {
        let (here, there) = (format!("s{subnet}"), format!("c{subnet}"));
        let ip =
            |ns: &Netns, args: &[&str]| run(Command::new("ip").arg("-n").arg(&ns.name).args(args));
        ip(
            self,
            &[
                "link",
                "add",
                &here,
                "type",
                "veth",
                "peer",
                "name",
                &there,
                "netns",
                &client.name,
            ],
        )?;
        for (ns, dev, host) in [(self, &here, 1), (client, &there, 2)] {
            ip(
                ns,
                &[
                    "addr",
                    "add",
                    &format!("10.77.{subnet}.{host}/30"),
                    "dev",
                    dev,
                ],
            )?;
            ip(ns, &["link", "set", dev, "up"])?;
        }
        Ok(Ipv4Addr::new(10, 77, subnet, 1))
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `kernel.bpf_stats_enabled`, restored to what it was when dropped: the statistics cost
/// every BPF program two clock reads a run, so nothing may leave them on.
pub struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    /// Remembers the present setting.
    pub fn save() -> Result<Self> {
        Ok(Self(
            std::fs::read_to_string(Self::PATH).context(Self::PATH)?,
        ))
    }

    pub fn set(&self, on: bool) -> Result<()> {
        std::fs::write(Self::PATH, if on { "1" } else { "0" }).context(Self::PATH)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

/// A containerd of one's own (Debian's package), as the dist test and the workload tests
/// start it: root, state and API socket (`containerd.sock`) under `dir`, the configuration
/// `config` (a file the caller wrote). The caller sets its output and spawns it.
pub fn containerd_command(dir: &std::path::Path, config: &std::path::Path) -> Command {
    let mut cmd = Command::new("containerd");
    cmd.arg("--config")
        .arg(config)
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--address")
        .arg(dir.join("containerd.sock"));
    cmd
}

/// `qtrace run` as the tests and the benchmarks start it: JSON Lines on stdout (the ready line
/// first, then events and a listener table every `interval`), HTTP on an ephemeral loopback
/// port, and an events socket of its own at `socket`. The caller adds its own arguments.
pub fn daemon_command(
    qtrace: &std::path::Path,
    interval: &str,
    socket: &std::path::Path,
) -> Command {
    let mut cmd = Command::new(qtrace);
    cmd.args(["run", "--print", "--json", "--interval", interval])
        .args(["--web.listen-address", "127.0.0.1:0"])
        .arg("--events-socket")
        .arg(socket);
    cmd
}

/// qtrace's ready line (`{"type":"ready","listen":…,"probes":[…]}`), checked.
pub fn ready_line(line: &str) -> Result<serde_json::Value> {
    let ready: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("qtrace's ready line: {line}"))?;
    ensure!(ready["type"] == "ready", "not qtrace's ready line: {line}");
    ensure!(
        ready["listen"].is_string(),
        "the ready line names no address: {line}"
    );
    Ok(ready)
}

/// The HTTP address (`host:port`) a ready line names.
pub fn ready_listen(ready: &serde_json::Value) -> Result<String> {
    ready["listen"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("the ready line names no address: {ready}"))
}

/// The tier `probe` got by qtrace's `ready` line (`run --json`): `None` when it got none
/// (unavailable on this kernel). A probe the line does not list is an error, not "none".
pub fn probe_tier(ready: &serde_json::Value, probe: &str) -> Result<Option<String>> {
    Ok(probe_status(ready, probe)?["tier"]
        .as_str()
        .map(str::to_string))
}

/// Where `probe`'s programs are attached by qtrace's `ready` line (`fentry:FUNC`,
/// `tp_btf:NAME`, …): none when it got no tier.
pub fn probe_hooks(ready: &serde_json::Value, probe: &str) -> Result<Vec<String>> {
    Ok(probe_status(ready, probe)?["hooks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().map(str::to_string))
        .collect())
}

fn probe_status<'a>(ready: &'a serde_json::Value, probe: &str) -> Result<&'a serde_json::Value> {
    ready["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["probe"] == probe)
        .with_context(|| format!("qtrace's ready line lists no probe {probe}: {ready}"))
}

/// The BPF programs loaded now whose name is `name`, as `bpftool -j prog show name` describes
/// them. bpftool prints one JSON object when one program matches and an array when several do
/// (e.g. two qtraces loaded at once): both read as a list.
pub fn bpf_programs_named(name: &str) -> Result<Vec<serde_json::Value>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "name", name])
        .output()
        .context("bpftool (`cargo xtask setup` installs it)")?;
    ensure!(
        out.status.success(),
        "bpftool prog show name {name}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(
        match serde_json::from_slice(&out.stdout).context("bpftool's JSON")? {
            serde_json::Value::Array(progs) => progs,
            serde_json::Value::Null => Vec::new(),
            one => vec![one],
        },
    )
}
