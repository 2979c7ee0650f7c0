//! `cargo xtask stress`: qtrace under hostile load, then its parsers under a fuzzer.
//!
//! 1. The `hardening` suite of `qtrace/tests/it` with its ignored load test: the daemon under
//!    the unit's MemoryMax/TasksMax/LimitNOFILE takes 5,000 idle and slowloris connections and 200
//!    concurrent scrapes; the events socket's oversized, silent and vanished clients; bad
//!    inputs. Each prints its figures as `RELIABILITY …` lines (BENCHMARKS.md, "Reliability").
//! 2. The fuzz targets of `fuzz/` (libFuzzer, cargo-fuzz's layout) built with the pinned nightly
//!    and run for `--fuzz-seconds` each: the config parser, the ring-record decoder, the events
//!    socket's request parser, the decoder of container runtimes' answers. Corpora persist in `target/fuzz/corpus/<target>`, so each run
//!    goes on from the last; a crash fails the stage and leaves its input in
//!    `target/fuzz/artifacts/<target>/`.

use std::{path::Path, process::Command};

use anyhow::{Context, Result};

use crate::run;

/// The toolchain of the kernel programs, which libFuzzer's instrumentation needs (nightly).
pub const FUZZ_TOOLCHAIN: &str = "nightly-2026-05-20";
const FUZZ_TARGETS: [&str; 4] = ["config", "event_decode", "events_request", "runtime_answer"];
const FUZZ_TRIPLE: &str = "x86_64-unknown-linux-gnu";

#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// Seconds each fuzz target runs.
    #[arg(long, default_value_t = 25)]
    pub fuzz_seconds: u32,
    /// Only the fuzz targets (no daemon, no root needed).
    #[arg(long)]
    pub fuzz_only: bool,
    /// Run by `xtask test` after the host tests, which ran the hardening suite's other tests
    /// already.
    #[arg(skip)]
    pub after_host_tests: bool,
}

pub fn stress(opts: &Options) -> Result<()> {
    if !opts.fuzz_only {
        run(Command::new("cargo").args([
            "test",
            "--package",
            "qtrace",
            "--test",
            "it",
            "--",
            "hardening::",
            if opts.after_host_tests {
                "--ignored"
            } else {
                "--include-ignored"
            },
            "--test-threads=1",
            "--nocapture",
        ]))?;
    }
    fuzz(opts.fuzz_seconds)
}

fn fuzz(seconds: u32) -> Result<()> {
    let root = std::env::current_dir()?;
    let flags = [
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "--cfg",
        "fuzzing",
        "-Zsanitizer=address",
        "-Cdebug-assertions",
        "-Coverflow-checks",
    ];
    eprintln!("stress: building the fuzz targets ({FUZZ_TOOLCHAIN}, AddressSanitizer)");
    run(Command::new("cargo")
        .arg(format!("+{FUZZ_TOOLCHAIN}"))
        .args([
            "build",
            "--quiet",
            "--release",
            "--bins",
            "--target",
            FUZZ_TRIPLE,
        ])
        .arg("--manifest-path")
        .arg(root.join("fuzz/Cargo.toml"))
        // Beside qtrace's own build, which these flags would otherwise rebuild.
        .env("CARGO_TARGET_DIR", root.join("target/fuzz/build"))
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env_remove("RUSTFLAGS"))?;
    let bin_dir = root.join(format!("target/fuzz/build/{FUZZ_TRIPLE}/release"));
    for target in FUZZ_TARGETS {
        let corpus = root.join("target/fuzz/corpus").join(target);
        let artifacts = root.join("target/fuzz/artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        seed(target, &root, &corpus)?;
        eprintln!("stress: fuzzing {target} for {seconds} s");
        run(Command::new(bin_dir.join(target))
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(&corpus))
        .with_context(|| format!("fuzz target {target} failed: see {}", artifacts.display()))?;
    }
    Ok(())
}

/// Valid inputs to start from, written into the corpus (no seed files in the repository).
fn seed(target: &str, root: &Path, corpus: &Path) -> Result<()> {
    let seeds: Vec<(&str, Vec<u8>)> = match target {
        "config" => vec![
            ("example", std::fs::read(root.join("deploy/qtrace.toml"))?),
            (
                "set",
                b"event_rate = 50\nmax_listeners = 100\nattach = \"kprobe\"\n\
                  include_ports = [80, 443]\nqueue_sample_interval = \"30s\"\n\
                  web_listen_address = \"127.0.0.1:9860\"\n"
                    .to_vec(),
            ),
        ],
        "events_request" => vec![
            (
                "events",
                b"{\"request\":\"events\",\"since_ns\":12345}\n".to_vec(),
            ),
            ("listeners", b"{\"request\":\"listeners\"}\n".to_vec()),
        ],
        _ => vec![],
    };
    for (name, bytes) in seeds {
        std::fs::write(corpus.join(format!("seed-{name}")), bytes)?;
    }
    Ok(())
}
