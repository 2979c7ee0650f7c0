//! qtrace's kernel programs. Each probe area is one module, named like its loader in
//! `qtrace/src/kernel/probes/`. Struct offsets and prototype facts arrive as globals from user
//! space (see `qtrace_common::kernel`), so nothing here depends on one kernel's layout.
//! `account` counts and emits events, `kernel` reads kernel memory, `mib` the kernel's own
//! per-CPU listen-drop counters, and all record qtrace's own losses in the leaf module
//! `self_stats`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has no compare-and-swap or fetch-and-add in `core::sync::atomic` (rustc's
// target leaves `atomic_cas` off); the intrinsics lower to BPF's atomics (`client.rs`).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// Map keys and values go by reference: passed by value, a map value (the listener counters)
// would be copied onto the 512-byte BPF stack, which the linker then rejects.
#![allow(clippy::needless_borrows_for_generic_args)]

#[cfg(target_arch = "bpf")]
mod accept;
#[cfg(target_arch = "bpf")]
mod account;
#[cfg(target_arch = "bpf")]
mod ack;
#[cfg(target_arch = "bpf")]
mod client;
#[cfg(target_arch = "bpf")]
mod kernel;
#[cfg(target_arch = "bpf")]
mod mib;
#[cfg(target_arch = "bpf")]
mod port_search;
#[cfg(target_arch = "bpf")]
mod self_stats;
#[cfg(target_arch = "bpf")]
mod syn;
#[cfg(target_arch = "bpf")]
mod synack;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so it is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
