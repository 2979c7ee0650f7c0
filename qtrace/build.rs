//! Builds the kernel programs (`qtrace-ebpf`) with nightly and bpf-linker and embeds the
//! object in the binary. Without that toolchain the build stops with one line saying how to
//! get it.
use std::process::{exit, Command};

fn toolchain_problem() -> Option<&'static str> {
    if which::which("bpf-linker").is_err() {
        return Some("bpf-linker is not installed");
    }
    let rust_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output();
    match rust_src {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("rust-src") => None,
        _ => Some("the nightly toolchain with rust-src is not installed"),
    }
}

fn main() -> anyhow::Result<()> {
    if let Some(problem) = toolchain_problem() {
        eprintln!("error: cannot build qtrace's eBPF programs: {problem}; run `cargo xtask setup`");
        exit(1);
    }
    let package = aya_build::Package {
        name: "qtrace-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../qtrace-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
