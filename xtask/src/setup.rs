//! `cargo xtask setup`: installs what building and testing qtrace needs. Idempotent and quiet
//! when everything is already there; every step says what it installs before doing it.
use anyhow::{bail, Context, Result};
use std::{path::Path, process::Command};

use crate::run;

/// bpf-linker must match the kernel programs' LLVM: it is built against the pinned nightly's
/// own libLLVM.
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
    // web:: makes a self-signed certificate and speaks TLS with basic auth to the daemon.
    ("openssl", "openssl"),
    ("curl", "curl"),
    // ring (the TLS crypto) compiles C for x86_64-unknown-linux-musl with musl-gcc.
    ("musl-gcc", "musl-tools"),
    // The benchmark's peers, and the C headers their scripts include, run in the 6.12 guest.
    ("bpftrace", "bpftrace"),
    ("/usr/include/x86_64-linux-gnu/sys/socket.h", "libc6-dev"),
    // The benchmark's profile of the fentry tier, taken in the guest.
    ("perf", "linux-perf"),
    // `cargo xtask dist`: mimalloc's C for the static build (musl-gcc), and the dist test:
    // lintian, the guest's root file system (mmdebstrap, mkfs.ext4), loading the image.
    ("musl-gcc", "musl-tools"),
    ("lintian", "lintian"),
    ("mmdebstrap", "mmdebstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("podman", "podman"),
    ("ctr", "containerd"),
    // workload:: runs containers under a containerd of its own (containerd brings runc; named
    // here so that a host where it was removed gets it back) and enters them with nsenter.
    ("runc", "runc"),
    ("nsenter", "util-linux"),
];

/// Everything: the toolchain and the packages the tests, the matrix and the benchmarks use.
pub fn setup() -> Result<()> {
    toolchain()?;
    musl()?;
    apt_packages(APT_PACKAGES)
}

/// The static build's target (`cargo xtask dist`): Rust's musl target and musl-gcc.
pub fn musl() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup: is rustup installed?")?;
    if !String::from_utf8_lossy(&installed.stdout).contains(crate::dist::TARGET) {
        eprintln!("setup: adding the Rust target {}", crate::dist::TARGET);
        run(Command::new("rustup").args(["target", "add", crate::dist::TARGET]))?;
    }
    apt_packages(&[("musl-gcc", "musl-tools")])
}

/// What building and running qtrace needs, and nothing more: `run` and `install` must not
/// put test servers (nginx, Prometheus) on a production host.
pub fn toolchain() -> Result<()> {
    ebpf_rust()?;
    bpf_linker()?;
    tracefs()
}

/// The kernel programs' pinned toolchain: `channel` in qtrace-ebpf/rust-toolchain.toml (the
/// one place it is written; qtrace/build.rs reads it too).
pub fn ebpf_toolchain() -> &'static str {
    include_str!("../../qtrace-ebpf/rust-toolchain.toml")
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .map(|c| c.trim().trim_matches('"'))
        .expect("qtrace-ebpf/rust-toolchain.toml names a channel")
}

/// The pinned nightly with rust-src, installed by rustup if absent (a dated toolchain never
/// moves, so a fresh machine gets the same LLVM as the last one).
fn ebpf_rust() -> Result<()> {
    let toolchain = ebpf_toolchain();
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", toolchain, "--installed"])
        .output()
        .context("running rustup: is rustup installed?")?;
    if installed.status.success() && String::from_utf8_lossy(&installed.stdout).contains("rust-src")
    {
        return Ok(());
    }
    eprintln!("setup: installing the {toolchain} toolchain with rust-src (the kernel programs')");
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

/// The pinned toolchain's `lib` directory and the name of the libLLVM in it, e.g.
/// `LLVM-22-rust-1.97.0-nightly`.
fn ebpf_llvm() -> Result<(std::path::PathBuf, String)> {
    let toolchain = ebpf_toolchain();
    let sysroot = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
        .context("running rustup")?;
    anyhow::ensure!(
        sysroot.status.success(),
        "rustup run {toolchain} rustc failed: {}",
        String::from_utf8_lossy(&sysroot.stderr).trim()
    );
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
                "no libLLVM*.so in {}: is the {toolchain} toolchain complete?",
                lib_dir.display()
            )
        })?;
    Ok((lib_dir, llvm))
}

/// Whether the installed bpf-linker is `BPF_LINKER_VERSION` and loads its LLVM from `lib_dir`
/// (one built against another toolchain's LLVM would mis-link the kernel programs, or fail to
/// start once that toolchain is gone).
fn bpf_linker_matches(lib_dir: &Path) -> bool {
    let Ok(linker) = crate::matrix::which("bpf-linker") else {
        return false;
    };
    let version = Command::new(&linker).arg("--version").output();
    if !version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return false;
    }
    let Ok(ldd) = Command::new("ldd").arg(&linker).output() else {
        return false;
    };
    String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter(|l| l.contains("libLLVM"))
        .any(|l| l.contains(&*lib_dir.to_string_lossy()))
}

fn bpf_linker() -> Result<()> {
    let (lib_dir, llvm) = ebpf_llvm()?;
    if bpf_linker_matches(&lib_dir) {
        return Ok(());
    }
    // bpf-linker's cargo feature names the LLVM major version: derived, never hard-coded.
    let major = llvm
        .strip_prefix("LLVM-")
        .and_then(|v| v.split(['-', '.']).next())
        .with_context(|| format!("cannot read the LLVM version from {llvm}"))?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {}'s {llvm} (about a minute)",
        ebpf_toolchain()
    );
    let dir = lib_dir.display();
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
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

fn apt_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
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
