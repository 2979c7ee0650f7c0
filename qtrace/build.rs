//! Builds the kernel programs (`qtrace-ebpf`) with the pinned nightly and bpf-linker and
//! embeds the object in the binary. Without that toolchain the build stops with one line
//! saying how to get it.
use std::process::{exit, Command};

/// The pinned toolchain of the kernel programs: `channel` in qtrace-ebpf/rust-toolchain.toml.
fn ebpf_toolchain() -> &'static str {
    include_str!("../qtrace-ebpf/rust-toolchain.toml")
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .map(|c| c.trim().trim_matches('"'))
        .expect("qtrace-ebpf/rust-toolchain.toml names a channel")
}

fn toolchain_problem(toolchain: &str) -> Option<String> {
    if which::which("bpf-linker").is_err() {
        return Some("bpf-linker is not installed".into());
    }
    let rust_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", toolchain, "--installed"])
        .output();
    match rust_src {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("rust-src") => None,
        _ => Some(format!(
            "the {toolchain} toolchain with rust-src is not installed"
        )),
    }
}

fn main() -> anyhow::Result<()> {
    let toolchain = ebpf_toolchain();
    if let Some(problem) = toolchain_problem(toolchain) {
        eprintln!("error: cannot build qtrace's eBPF programs: {problem}; run `cargo xtask setup`");
        exit(1);
    }
    let package = aya_build::Package {
        name: "qtrace-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../qtrace-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(toolchain))
}
