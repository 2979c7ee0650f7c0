//! Developer tasks: `cargo xtask setup | test | run`.
mod matrix;
mod setup;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::process::Command;

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
    /// Run every test: unit tests, and integration tests against this machine's kernel.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the kernel-facing suites on stock Debian kernels in QEMU and natively.
    VmTest(matrix::Options),
    /// Build qtrace (release) and run it with these arguments, e.g. `cargo xtask run -- run`.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    // Paths below are relative to the workspace root, wherever cargo was invoked from.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    if let Err(e) = std::env::set_current_dir(root)
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
            setup::setup()?;
            run(Command::new("cargo")
                .args(["test", "--workspace", "--exclude", "qtrace-ebpf"])
                .args(args))
        }
        Task::VmTest(opts) => {
            setup::setup()?;
            matrix::vm_test(opts)
        }
        Task::Run { args } => {
            setup::setup()?;
            run(Command::new("cargo").args([
                "build",
                "--quiet",
                "--release",
                "--package",
                "qtrace",
            ]))?;
            run(Command::new("target/release/qtrace").args(args))
        }
    }
}

/// Runs a command inheriting stdio; a non-zero exit is an error naming the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// True when a shell snippet succeeds (used for `command -v` checks).
pub fn sh_ok(script: &str) -> bool {
    Command::new("sh")
        .args(["-c", script])
        .output()
        .is_ok_and(|o| o.status.success())
}
