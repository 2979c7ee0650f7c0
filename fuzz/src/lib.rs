//! qtrace's parsers of untrusted input, compiled from qtrace's own source files: the config
//! file parser (`config`), the ring-buffer record decoder (`events`), the events socket's
//! request parser (`events_request`), with the modules they name as `crate::…`.
#![allow(dead_code)]

#[path = "../../qtrace/src/config.rs"]
pub mod config;
#[path = "../../qtrace/src/events.rs"]
pub mod events;
#[path = "../../qtrace/src/events_request.rs"]
pub mod events_request;
#[path = "../../qtrace/src/inputs.rs"]
pub mod inputs;
#[path = "../../qtrace/src/listener.rs"]
pub mod listener;
#[path = "../../qtrace/src/owners.rs"]
pub mod owners;
#[path = "../../qtrace/src/probes/tier.rs"]
mod tier;

pub mod probes {
    pub use crate::tier::Tier;
}

/// The one name config.rs takes from btf.rs (which needs the kernel-side crates).
pub mod btf {
    pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
}
