//! `cargo xtask setup`: installs what building and testing qtrace needs. Idempotent and quiet
//! when everything is already there; every step says what it installs before doing it.
use anyhow::{bail, Context, Result};
use std::{path::Path, process::Command};

use crate::run;

/// bpf-linker must match the kernel programs' LLVM: it is built against nightly's own libLLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and the kernel matrix use (command or file they provide, package).
const APT_PACKAGES: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("zstd", "zstd"),
    ("xz", "xz-utils"),
    ("lz4", "lz4"),
    ("promtool", "prometheus"),
    ("nginx", "nginx"),
    ("wrk", "wrk"),
    ("tmux", "tmux"),
    ("setpriv", "util-linux"),
    ("pkill", "procps"),
    ("bash", "bash"),
    ("strip", "binutils"),
    ("systemd-analyze", "systemd"),
    // The benchmark's peers, and the C headers their scripts include, run in the 6.12 guest.
    ("bpftrace", "bpftrace"),
    ("/usr/include/x86_64-linux-gnu/sys/socket.h", "libc6-dev"),
    // The benchmark's profile of the fentry tier, taken in the guest.
    ("perf", "linux-perf"),
];

/// Everything: the toolchain and the packages the tests, the matrix and the benchmarks use.
pub fn setup() -> Result<()> {
    toolchain()?;
    apt_packages()
}

/// What building and running qtrace needs, and nothing more: `run` and `install` must not
/// put test servers (nginx, Prometheus) on a production host.
pub fn toolchain() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    tracefs()
}

fn rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup: is rustup installed?")?;
    if String::from_utf8_lossy(&installed.stdout).contains("rust-src") {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output() {
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    let sysroot = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()?;
    let lib_dir = Path::new(String::from_utf8(sysroot.stdout)?.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| {
            Some(n.strip_prefix("lib")?.strip_suffix(".so")?.to_owned())
                .filter(|n| n.starts_with("LLVM"))
        })
        .with_context(|| {
            format!(
                "no libLLVM*.so in {}: is the nightly toolchain complete?",
                lib_dir.display()
            )
        })?;
    let major = llvm
        .strip_prefix("LLVM-")
        .and_then(|v| v.split(['-', '.']).next())
        .with_context(|| format!("cannot read the LLVM version from {llvm}"))?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's {llvm} (about a minute)"
    );
    let dir = lib_dir.display();
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major},no-llvm-linking"))
        .env(
            "RUSTFLAGS",
            format!("-L {dir} -l dylib={llvm} -C link-arg=-Wl,-rpath,{dir}"),
        ))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(cmd, _)| {
            !if cmd.starts_with('/') {
                Path::new(cmd).exists()
            } else {
                crate::matrix::which(cmd).is_ok()
            }
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if crate::matrix::which("apt-get").is_err() {
        bail!("missing packages {missing:?} and no apt-get here: install them by hand");
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Classic tracepoints are attached through tracefs; some machines do not mount it.
fn tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    eprintln!("setup: mounting tracefs on /sys/kernel/tracing");
    run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
}
