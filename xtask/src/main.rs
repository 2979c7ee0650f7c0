//! Developer tasks: `cargo xtask setup | test | run | dist`.
mod bench;
mod dist;
mod fresh;
mod matrix;
mod setup;
mod stress;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::{path::PathBuf, process::Command, sync::OnceLock};

#[derive(Parser)]
#[command(about = "qtrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (rust-src, bpf-linker) and the packages the tests use.
    Setup,
    /// Run every test: unit and integration tests on this machine's kernel, the benchmark
    /// harness's smoke run, and the kernel matrix (Debian 5.10, 6.1, 6.12 and
    /// unstable's 7.x in QEMU).
    Test {
        /// Arguments for every test binary, on this kernel and in the matrix (e.g. a test
        /// name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// `test` as a new user runs it: from a fresh clone of HEAD under /tmp with a new, empty
    /// CARGO_TARGET_DIR (run it before resolving build or harness changes).
    FreshTest {
        /// Arguments for every test binary, as for `test`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the kernel-facing suites on stock Debian kernels in QEMU and natively.
    VmTest(matrix::Options),
    /// qtrace under hostile load and bad inputs (as root), then its parsers under a fuzzer.
    Stress(stress::Options),
    /// Measure qtrace's cost (writes BENCHMARKS.md); --smoke checks the harness only.
    Bench(bench::Options),
    /// Inside the benchmark's guest kernel: the interleaved churn rounds (see `bench`).
    #[command(hide = true)]
    BenchGuest(bench::GuestOptions),
    /// Install qtrace as a systemd service: binary, unit, example config.
    Install {
        #[arg(long, default_value = "/usr/local")]
        prefix: String,
    },
    /// Build what users install into target/dist/: the static binary's tarball, the Debian
    /// package, the OCI image.
    Dist,
    /// Build them and install each as a user would (lintian, podman load, ctr import; the
    /// package under systemd with Prometheus and the image under Podman in a Debian guest).
    DistTest,
    /// Build qtrace (release) and run it with these arguments, e.g. `cargo xtask run -- run`.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    // Paths below are relative to the workspace root, wherever cargo was invoked from (a
    // benchmark guest has no workspace).
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let in_workspace = match cli.task {
        Task::BenchGuest(_) => Ok(()),
        _ => std::env::set_current_dir(root),
    };
    if let Err(e) = in_workspace
        .map_err(Into::into)
        .and_then(|()| dispatch(cli.task))
    {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup::setup(),
        Task::Test { args } => {
            let t = std::time::Instant::now();
            stage("setup", setup::setup)?;
            stage("unit and integration tests", || {
                run(Command::new("cargo")
                    .args(["test", "--workspace", "--exclude", "qtrace-ebpf", "--"])
                    .args(&args))
            })?;
            // Hostile clients, bad inputs, fuzzing: a few minutes (see stress.rs).
            stage("stress", || {
                stress::stress(&stress::Options {
                    fuzz_seconds: 20,
                    fuzz_only: false,
                    after_host_tests: true,
                })
            })?;
            // The benchmark harness works (tiny sizes; no timing is asserted).
            stage("benchmark smoke run", || {
                bench::bench(bench::Options {
                    smoke: true,
                    out: target_dir()?.join("BENCHMARKS.smoke.md"),
                    only: Vec::new(),
                    qtrace: None,
                })
            })?;
            // The kernel-facing suites on Debian's kernels in QEMU and natively; beside them,
            // the artifacts users install, installed as they would.
            stage("kernel matrix and dist-test", || {
                matrix::vm_test_alongside(
                    matrix::Options {
                        kernel: vec!["all".into()],
                        attach: vec![],
                        filter: args.clone(),
                    },
                    || stage("dist-test", dist::dist_test),
                )
            })?;
            eprintln!("xtask: every stage passed in {:.0?}", t.elapsed());
            Ok(())
        }
        Task::FreshTest { args } => fresh::fresh_test(&args),
        Task::VmTest(opts) => {
            setup::setup()?;
            matrix::vm_test(opts)
        }
        Task::Stress(opts) => {
            setup::setup()?;
            stress::stress(&opts)
        }
        Task::Install { prefix } => install(&prefix),
        Task::Bench(opts) => {
            setup::setup()?;
            bench::bench(opts)
        }
        Task::BenchGuest(opts) => bench::guest(opts),
        Task::Dist => {
            setup::toolchain()?;
            dist::dist().map(|_| ())
        }
        Task::DistTest => {
            setup::setup()?;
            dist::dist_test()
        }
        Task::Run { args } => {
            setup::toolchain()?;
            run(Command::new(build_release()?).args(args))
        }
    }
}

/// Runs one stage of `cargo xtask test` and says how long it took (CI's time is bounded).
fn stage(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let t = std::time::Instant::now();
    let result = f();
    let outcome = if result.is_ok() { "passed" } else { "FAILED" };
    eprintln!("xtask: stage {name}: {outcome} in {:.0?}", t.elapsed());
    result
}

/// Runs a command inheriting stdio; a non-zero exit is an error naming the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Builds qtrace in release mode; its absolute path.
pub fn build_release() -> Result<PathBuf> {
    run(Command::new("cargo").args(["build", "--quiet", "--release", "--package", "qtrace"]))?;
    Ok(std::fs::canonicalize(target_dir()?.join("release/qtrace"))?)
}

/// Cargo's target directory, absolute, as cargo itself resolves it (`CARGO_TARGET_DIR`,
/// `build.target-dir`, or `target/` in the workspace): builds, kernels and images live there.
pub fn target_dir() -> Result<PathBuf> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = DIR.get() {
        return Ok(dir.clone());
    }
    let out = Command::new("cargo")
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    anyhow::ensure!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let dir = PathBuf::from(
        meta["target_directory"]
            .as_str()
            .context("cargo metadata names no target_directory")?,
    );
    Ok(DIR.get_or_init(|| dir).clone())
}

fn install(prefix: &str) -> Result<()> {
    setup::toolchain()?;
    let built = build_release()?;
    let bin = format!("{prefix}/bin/qtrace");
    run(Command::new("install")
        .args(["-D", "-m", "0755"])
        .arg(&built)
        .arg(&bin))?;
    let unit = std::fs::read_to_string("deploy/systemd/qtrace.service")?
        .replace("/usr/local/bin/qtrace", &bin);
    std::fs::write("/etc/systemd/system/qtrace.service", unit)
        .context("write /etc/systemd/system/qtrace.service")?;
    if !std::path::Path::new("/etc/qtrace/qtrace.toml").exists() {
        run(Command::new("install").args([
            "-D",
            "-m",
            "0644",
            "deploy/qtrace.toml",
            "/etc/qtrace/qtrace.toml",
        ]))?;
    }
    if std::path::Path::new("/run/systemd/system").exists() {
        run(Command::new("systemctl").arg("daemon-reload"))?;
    }
    eprintln!("installed {bin} and qtrace.service: `systemctl enable --now qtrace`");
    Ok(())
}
