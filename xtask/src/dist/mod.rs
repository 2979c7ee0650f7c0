//! `cargo xtask dist`: what users install, built into `target/dist/`: a static binary
//! (x86_64-unknown-linux-musl, kernel programs embedded) in a tarball with the service files,
//! completions and man pages; a Debian package; an OCI image archive. `cargo xtask dist-test`
//! installs each of them the way a user would (`check.rs`, `guest.rs`).

mod check;
mod deb;
mod guest;
mod oci;

pub use check::dist_test;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::run;

pub const TARGET: &str = "x86_64-unknown-linux-musl";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The image's name: what the DaemonSet (deploy/kubernetes/daemonset.yaml) names.
pub const IMAGE: &str = "qtrace:0.1.0";

/// What `dist` built, absolute paths.
pub struct Artifacts {
    /// The static binary, stripped.
    pub binary: PathBuf,
    pub tarball: PathBuf,
    pub deb: PathBuf,
    pub image: PathBuf,
}

/// Builds everything into `target/dist/`.
pub fn dist() -> Result<Artifacts> {
    let binary = build_static()?;
    let out = dist_dir()?;
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let epoch = source_date_epoch()?;
    let generated = out.join("generated");
    generate(&binary, &generated)?;
    let tarball = tarball(&binary, &generated, &out, epoch)?;
    let deb = deb::build(&binary, &generated, &out, epoch)?;
    let image = oci::build(&binary, &out, epoch)?;
    for a in [&tarball, &deb, &image] {
        eprintln!("dist: {}", a.display());
    }
    Ok(Artifacts {
        binary,
        tarball,
        deb,
        image,
    })
}

/// `target/dist` (under CARGO_TARGET_DIR when set).
pub fn dist_dir() -> Result<PathBuf> {
    Ok(crate::target_dir()?.join("dist"))
}

/// The static release build of qtrace (eBPF object embedded), stripped: its path.
pub fn build_static() -> Result<PathBuf> {
    crate::setup::musl()?;
    run(Command::new("cargo").args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "qtrace",
        "--target",
        TARGET,
    ]))?;
    let built = crate::target_dir()?.join(TARGET).join("release/qtrace");
    let stripped = built.with_file_name("qtrace-stripped");
    run(Command::new("strip")
        // As dh_strip: no symbols, no .comment/.note sections.
        .args([
            "--strip-all",
            "--remove-section=.comment",
            "--remove-section=.note",
        ])
        .arg("-o")
        .arg(&stripped)
        .arg(&built))?;
    let elf = fs::read(&stripped)?;
    anyhow::ensure!(
        !has_interpreter(&elf),
        "{} asks for a program interpreter: it is not static",
        built.display()
    );
    Ok(stripped)
}

/// Whether an ELF64 file has a PT_INTERP program header (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    let u = |o: usize, n: usize| {
        elf.get(o..o + n)
            .map(|b| b.iter().rev().fold(0u64, |a, x| a << 8 | u64::from(*x)))
            .unwrap_or(0) as usize
    };
    let (phoff, phentsize, phnum) = (u(0x20, 8), u(0x36, 2), u(0x38, 2));
    (0..phnum).any(|i| u(phoff + i * phentsize, 4) == 3)
}

/// The last commit's time: every archive's timestamps, so that a rebuild is identical.
pub fn source_date_epoch() -> Result<u64> {
    if let Ok(e) = std::env::var("SOURCE_DATE_EPOCH") {
        return Ok(e.parse()?);
    }
    let out = Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse().unwrap_or(0))
}

/// Completions (qtrace.bash, _qtrace, qtrace.fish) and man pages (man/*.1) from the binary's
/// own command line.
fn generate(binary: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir.join("man"))?;
    for (shell, file) in [
        ("bash", "qtrace.bash"),
        ("zsh", "_qtrace"),
        ("fish", "qtrace.fish"),
    ] {
        let out = Command::new(binary)
            .args(["generate", "completions", shell])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "qtrace generate completions {shell} failed"
        );
        fs::write(dir.join(file), out.stdout)?;
    }
    run(Command::new(binary)
        .args(["generate", "man"])
        .arg(dir.join("man")))
}

/// The files a service install needs besides the binary, as (source, name in the tarball).
pub const SERVICE_FILES: [(&str, &str); 5] = [
    ("deploy/systemd/qtrace.service", "qtrace.service"),
    (
        "deploy/systemd/qtrace.sysusers.conf",
        "qtrace.sysusers.conf",
    ),
    ("deploy/systemd/dedicated-user.conf", "dedicated-user.conf"),
    ("deploy/systemd/other-netns.conf", "other-netns.conf"),
    ("deploy/qtrace.toml", "qtrace.toml"),
];

fn tarball(binary: &Path, generated: &Path, out: &Path, epoch: u64) -> Result<PathBuf> {
    let name = format!("qtrace-{VERSION}-{TARGET}");
    let stage = out.join("stage").join(&name);
    fs::create_dir_all(stage.join("completions"))?;
    copy(binary, &stage.join("qtrace"), 0o755)?;
    for (from, to) in SERVICE_FILES {
        copy(Path::new(from), &stage.join(to), 0o644)?;
    }
    for f in ["qtrace.bash", "_qtrace", "qtrace.fish"] {
        copy(
            &generated.join(f),
            &stage.join("completions").join(f),
            0o644,
        )?;
    }
    run(Command::new("cp")
        .arg("-r")
        .arg(generated.join("man"))
        .arg(&stage))?;
    for f in ["README.md", "LICENSE-MIT", "LICENSE-APACHE", "LICENSE-GPL2"] {
        copy(Path::new(f), &stage.join(f), 0o644)?;
    }
    let tarball = out.join(format!("{name}.tar.gz"));
    reproducible_tar(stage.parent().unwrap(), &[&name], &tarball, epoch)?;
    Ok(tarball)
}

pub fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(to.parent().unwrap())?;
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A tar of `entries` under `dir` (gzipped when `out` ends in .gz), owned by root, sorted,
/// every timestamp `epoch`.
pub fn reproducible_tar(dir: &Path, entries: &[&str], out: &Path, epoch: u64) -> Result<()> {
    let tar = PathBuf::from(format!("{}.tmp", out.display()));
    run(Command::new("tar")
        .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
        .arg(format!("--mtime=@{epoch}"))
        .args(["--format=gnu", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(&tar)
        .args(entries))?;
    if out.extension().is_some_and(|e| e == "gz") {
        run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(&tar))?;
        fs::rename(format!("{}.gz", tar.display()), out)?;
    } else {
        fs::rename(&tar, out)?;
    }
    Ok(())
}
