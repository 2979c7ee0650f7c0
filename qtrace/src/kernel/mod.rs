//! The kernel half of user space, twin of `qtrace-ebpf/src/`: loading the eBPF object with
//! this kernel's BTF offsets ([`tracer`], [`btf`]), attaching each probe area at the best tier
//! that really attaches ([`probes`], one module per area as in `qtrace-ebpf`), reading the
//! per-CPU counter maps ([`counters`]) and the programs' own statistics ([`programs`]), draining the event ring buffer ([`ring`]) into
//! records ([`decode`]).
//!
//! Contract: owns everything that touches the eBPF object and its maps. May import
//! `qtrace_common`, [`crate::api`], [`crate::config`], [`crate::listener`], [`crate::inputs`]
//! and [`crate::host`] (the heap); never `crate::daemon` or `crate::cli`.

pub mod btf;
pub mod clients;
pub mod counters;
pub mod decode;
pub mod probes;
pub mod programs;
pub mod ring;
pub mod tracer;
