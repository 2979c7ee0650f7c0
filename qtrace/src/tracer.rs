//! Loading the eBPF object with this kernel's offsets and attaching its probes.

use anyhow::{Context, Result};
use aya::{Btf, Ebpf, EbpfLoader, Endianness};
use qtrace_common::{globals, maps};

use crate::{
    btf::KernelBtf,
    probes::{self, ProbeStatus, Tier},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qtrace"));

#[derive(Clone, Debug, clap::Args)]
pub struct TracerOptions {
    /// Best attach tier to try; qtrace falls down from it (fentry → kprobe → tracepoint).
    #[arg(long = "attach", value_enum, default_value = "fentry")]
    pub best_tier: Tier,
    /// Events each listener may emit per second and CPU before they are suppressed (and
    /// counted as suppressed).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub event_rate: u32,
    /// Most listening sockets tracked; past it counts are lost and the loss is counted.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_listeners: u32,
    /// Ring buffer size for events, KiB (a power of two).
    #[arg(long, default_value_t = 256, value_parser = parse_ringbuf_kib)]
    pub ringbuf_kib: u32,
    /// The kernel's BTF, for kernels that do not expose it in sysfs (e.g. a BTFHub file).
    #[arg(long, value_name = "FILE", default_value = crate::btf::VMLINUX_BTF)]
    pub btf: std::path::PathBuf,
}

fn parse_ringbuf_kib(s: &str) -> Result<u32, String> {
    let kib: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if !(4..=1 << 20).contains(&kib) || !kib.is_power_of_two() {
        return Err(format!("{kib} is not a power of two between 4 and 1048576"));
    }
    Ok(kib)
}

/// The loaded programs. Dropping it detaches and unloads everything.
pub struct Tracer {
    pub ebpf: Ebpf,
    pub probes: Vec<ProbeStatus>,
}

impl Tracer {
    pub fn start(opts: &TracerOptions) -> Result<Self> {
        let kbtf = KernelBtf::load(&opts.btf)?;
        let btf = Btf::parse_file(&opts.btf, Endianness::default())
            .with_context(|| format!("parse {} for attaching", opts.btf.display()))?;
        let offsets = kbtf
            .offsets()
            .context("resolve struct offsets from the kernel's BTF")?;
        let hooks = kbtf.hook_layout();
        tracing::debug!(?offsets, ?hooks, "kernel layout from BTF");
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::OFFSETS, &offsets, true)
            .override_global(globals::HOOKS, &hooks, true)
            .override_global(globals::EVENT_RATE, &opts.event_rate, true)
            .map_max_entries(maps::LISTENERS, opts.max_listeners)
            .map_max_entries(maps::EVENTS, opts.ringbuf_kib * 1024)
            .load(OBJECT)
            .map_err(|e| {
                permission_hint(anyhow::Error::from(e).context("load qtrace's eBPF object"))
            })?;
        let probes = probes::attach_all(&mut ebpf, &btf, &kbtf, opts.best_tier)?;
        if probes.iter().all(|p| p.tier.is_none()) {
            let why: Vec<_> = probes.iter().flat_map(|p| p.fallbacks.clone()).collect();
            let err = anyhow::anyhow!("no probe could be attached: {}", why.join("; "));
            return Err(permission_hint(err));
        }
        Ok(Self { ebpf, probes })
    }
}

/// Capabilities qtrace needs that this process lacks. CAP_SYS_ADMIN stands in for CAP_BPF and
/// CAP_PERFMON (and is required for both before 5.8).
fn missing_capabilities() -> Vec<&'static str> {
    const NEEDED: [(u32, &str); 2] = [(39, "CAP_BPF"), (38, "CAP_PERFMON")];
    const CAP_SYS_ADMIN: u32 = 21;
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .unwrap_or(0);
    if eff & (1 << CAP_SYS_ADMIN) != 0 {
        return Vec::new();
    }
    NEEDED
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Puts the likely cause first when the kernel refused us.
fn permission_hint(err: anyhow::Error) -> anyhow::Error {
    let missing = missing_capabilities();
    if missing.is_empty() {
        return err;
    }
    err.context(format!(
        "qtrace lacks {}: run it as root or grant it CAP_BPF and CAP_PERFMON \
         (CAP_SYS_ADMIN on kernels before 5.8)",
        missing.join(" and ")
    ))
}
