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

/// What `git` prints for `args` in the source tree, if it can.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_string())
}

/// `--version` and `qtrace_build_info`: the git revision, the build date (SOURCE_DATE_EPOCH
/// when set, for reproducible package builds) and the compiler. Rebuilt when HEAD moves.
fn build_info() {
    let revision = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    for file in ["HEAD", "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", file]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    if let Some(path) = git(&["symbolic-ref", "-q", "HEAD"])
        .and_then(|r| git(&["rev-parse", "--path-format=absolute", "--git-path", &r]))
    {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let when = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or_else(std::time::SystemTime::now, |secs| {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
        });
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |v| v.trim().to_string());
    println!("cargo:rustc-env=QTRACE_REVISION={revision}");
    println!(
        "cargo:rustc-env=QTRACE_BUILD_DATE={}",
        humantime::format_rfc3339_seconds(when)
    );
    println!("cargo:rustc-env=QTRACE_RUSTC_VERSION={rustc}");
}

fn main() -> anyhow::Result<()> {
    build_info();
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
