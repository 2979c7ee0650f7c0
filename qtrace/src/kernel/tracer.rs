//! Loading the eBPF object with this kernel's offsets and attaching its probes.

use anyhow::{Context, Result};
use aya::{Btf, Ebpf, EbpfLoader, Endianness};
use qtrace_common::{globals, maps};

pub use crate::config::TracerOptions;
use crate::{
    host::heap,
    kernel::{
        btf::KernelBtf,
        counters::KernelCounters,
        probes::{self, ProbeStatus},
        programs::Programs,
    },
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qtrace"));

/// The loaded programs. Dropping it detaches and unloads everything.
pub struct Tracer {
    pub ebpf: Ebpf,
    pub probes: Vec<ProbeStatus>,
    /// The counter maps, shared with whoever reads them (table, scrapes).
    pub counters: std::sync::Arc<KernelCounters>,
    /// The programs attached, for their statistics.
    pub programs: std::sync::Arc<Programs>,
}

impl Tracer {
    pub fn start(opts: &TracerOptions) -> Result<Self> {
        Self::start_with(opts, KernelBtf::load(&opts.btf)?)
    }

    /// With the kernel's BTF already loaded (`opts.btf` is not read again).
    pub fn start_with(opts: &TracerOptions, btf: KernelBtf) -> Result<Self> {
        let (mut ebpf, probes) = load_and_attach(opts, btf)?;
        // The parsed BTF (tens of MB) is gone now, and is never parsed again.
        heap::trim();
        let counters = KernelCounters::take(&mut ebpf)?.into();
        let programs = Programs::of(&ebpf).into();
        Ok(Self {
            ebpf,
            probes,
            counters,
            programs,
        })
    }
}

fn load_and_attach(opts: &TracerOptions, kbtf: KernelBtf) -> Result<(Ebpf, Vec<ProbeStatus>)> {
    let btf = Btf::parse(kbtf.bytes(), Endianness::default())
        .with_context(|| format!("parse {} for attaching", opts.btf.display()))?;
    let offsets = kbtf
        .offsets()
        .context("resolve struct offsets from the kernel's BTF")?;
    let hooks = kbtf.hook_layout();
    let client_offsets = kbtf.client_offsets();
    tracing::debug!(?offsets, ?hooks, "kernel layout from BTF");
    let mut ebpf = EbpfLoader::new()
        // The BTF qtrace was given (`--btf`), not necessarily sysfs's, which the loader reads
        // by default.
        .btf(Some(&btf))
        .override_global(globals::OFFSETS, &offsets, true)
        .override_global(globals::HOOKS, &hooks, true)
        .override_global(globals::EVENT_RATE, &opts.event_rate, true)
        .override_global(globals::FIRST_USER_UID, &opts.first_user_uid, true)
        .override_global(globals::OPEN_SLOT_MASK, &(opts.client_slots - 1), true)
        // Zeroes where the kernel lacks a member: the client probe then refuses to attach
        // (see `probes::client`), and nothing else reads them.
        .override_global(
            globals::CLIENT_OFFSETS,
            &client_offsets.unwrap_or_default(),
            true,
        )
        .map_max_entries(maps::CLIENTS, opts.max_client_destinations)
        .map_max_entries(maps::ACTIVE_OPENS, opts.max_client_sockets)
        .map_max_entries(maps::OPEN_SLOTS, opts.client_slots)
        .map_max_entries(maps::LISTENERS, opts.max_listeners)
        .map_max_entries(maps::USER_LISTENERS, opts.max_listeners)
        .map_max_entries(maps::EVENTS, opts.ringbuf_kib * 1024)
        .load(OBJECT)
        .map_err(|e| {
            permission_hint(anyhow::Error::from(e).context("load qtrace's eBPF object"))
        })?;
    let probes = probes::attach_all(&mut ebpf, &btf, &kbtf, opts.best_tier, &opts.probes_off)?;
    if probes.iter().all(|p| p.tier.is_none()) {
        let why: Vec<_> = probes.iter().flat_map(|p| p.fallbacks.clone()).collect();
        let err = anyhow::anyhow!("no probe could be attached: {}", why.join("; "));
        return Err(permission_hint(err));
    }
    Ok((ebpf, probes))
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

#[cfg(test)]
mod tests {
    use super::OBJECT;

    /// Every helper of the kernel programs is inlined: LLVM outlines a function it finds too
    /// big into a BPF subprogram, whose call, frame and result passed through the stack cost
    /// more than small work itself (`ListenMib::read` was outlined that way, unnoticed, and
    /// cost the SYN and final-ACK entries about 66 instructions each: BENCHMARKS.md, session
    /// 19). Only the compiler's own memory builtins may stay out of line (called where a
    /// struct is zeroed on a cold path).
    #[test]
    fn kernel_programs_call_no_outlined_function() {
        let object = aya_obj::Object::parse(OBJECT).expect("the kernel programs' object");
        let programs: Vec<(usize, u64)> =
            object.programs.values().map(|p| p.function_key()).collect();
        let outlined: Vec<&str> = object
            .functions
            .iter()
            .filter(|(key, _)| !programs.contains(key))
            .map(|(_, f)| f.name.as_str())
            .filter(|name| !matches!(*name, "memset" | "memcpy" | "memmove" | "memcmp" | "bcmp"))
            .collect();
        assert!(
            outlined.is_empty(),
            "functions outlined from the kernel programs (mark them #[inline(always)]): {outlined:?}"
        );
    }
}
