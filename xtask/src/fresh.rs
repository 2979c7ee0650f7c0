//! `cargo xtask fresh-test`: the README's test command as a new user runs it — from a fresh
//! clone of HEAD in a new directory under /tmp, with a new, empty CARGO_TARGET_DIR. It
//! catches what a warm checkout hides: paths assumed to be `./target`, guests that mount over
//! the checkout's directory, tools installed by hand. Run it before resolving anything that
//! touches the build or the harness (DEVELOPERS.md).

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::run;

pub fn fresh_test(args: &[String]) -> Result<()> {
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .context("running git")?;
    if !dirty.stdout.is_empty() {
        eprintln!("fresh-test: uncommitted changes are not tested: the clone holds HEAD only");
    }
    let base = PathBuf::from(format!("/tmp/qtrace-fresh-{}", std::process::id()));
    let (clone, target) = (base.join("qtrace"), base.join("target"));
    fs::create_dir_all(&base)?;
    run(Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks", "."])
        .arg(&clone))?;
    eprintln!(
        "fresh-test: cargo xtask test in {} with CARGO_TARGET_DIR={}",
        clone.display(),
        target.display()
    );
    let result = run(Command::new("cargo")
        .args(["xtask", "test", "--"])
        .args(args)
        .current_dir(&clone)
        .env("CARGO_TARGET_DIR", &target));
    match &result {
        Ok(()) => fs::remove_dir_all(&base)?,
        Err(_) => eprintln!(
            "fresh-test: failed; the clone and its target are kept in {}",
            base.display()
        ),
    }
    result
}
