//! The guest's initramfs: busybox, the real tools the tests call, the test binaries at their
//! host paths, every library they link, data files, the kernel modules nftables needs, and /init.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::run;

/// Tools the tests run inside the guest (the real ones: busybox's `ip` cannot do everything;
/// `ss` is the client suite's ground truth for its census).
const TOOLS: [&str; 6] = ["ip", "nft", "bpftool", "setpriv", "bash", "ss"];

/// Modules the tests need that Debian's cloud kernels build as modules (a host loads them on
/// demand; the guest has no modprobe): nftables with its `reject` (ICMP errors for the client
/// suite), sock_diag for TCP, and veth (namespaces linked as over a network).
pub const MODULES: [&str; 4] = ["nf_tables", "nft_reject_inet", "tcp_diag", "veth"];

/// Modules loaded where the kernel package has them as files: nftables' `counter` (the queues
/// suite counts SYNs with it) is a module of its own in 5.10, part of nf_tables later.
pub const MODULES_IF_PACKAGED: [&str; 1] = ["nft_counter"];

pub fn build(
    out: &Path,
    modules: &[(String, Vec<u8>)],
    binaries: &[PathBuf],
    files: &[PathBuf],
    init: &str,
) -> Result<()> {
    let root = out.with_extension("d");
    let _ = fs::remove_dir_all(&root);
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "run", "etc", "modules", "var",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    symlink("/run", root.join("var/run"))?;
    let busybox = which("busybox")?;
    fs::copy(&busybox, root.join("bin/busybox"))?;
    let applets = Command::new(&busybox).arg("--list").output()?;
    for a in String::from_utf8_lossy(&applets.stdout).lines() {
        let _ = symlink("busybox", root.join("bin").join(a));
    }
    let mut elves: Vec<PathBuf> = TOOLS.iter().map(|t| which(t)).collect::<Result<_>>()?;
    elves.extend(binaries.iter().cloned());
    let mut libs = BTreeSet::new();
    for elf in &elves {
        let dest = under(&root, elf);
        fs::create_dir_all(dest.parent().unwrap())?;
        // Debug info is most of a test binary's size and useless in the guest.
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dest)
            .arg(elf))?;
        libs.extend(linked_libraries(elf)?);
    }
    for lib in libs {
        let dest = under(&root, &lib);
        fs::create_dir_all(dest.parent().unwrap())?;
        fs::copy(&lib, &dest).with_context(|| format!("copy {}", lib.display()))?;
    }
    // Data the binaries read (scripts, headers), copied as they are at their host paths.
    for f in files {
        let dest = under(&root, f);
        fs::create_dir_all(dest.parent().unwrap())?;
        run(Command::new("cp").arg("-a").arg(f).arg(&dest))?;
    }
    let mut order = String::new();
    for (name, ko) in modules {
        fs::write(root.join("modules").join(format!("{name}.ko")), ko)?;
        order += &format!("{name}\n");
    }
    fs::write(root.join("modules/order"), order)?;
    fs::write(root.join("init"), init)?;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;
    cpio(&root, ">", out)
}

/// Archives `root` (newc, as the kernel reads it) into `out` (`>`) or after it (`>>`), and
/// removes `root`.
fn cpio(root: &Path, redirect: &str, out: &Path) -> Result<()> {
    let cpio = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet {redirect} '{}'",
            out.display()
        ))
        .current_dir(root)
        .status()?;
    anyhow::ensure!(cpio.success(), "cpio failed");
    fs::remove_dir_all(root)?;
    Ok(())
}

/// Appends to the initramfs `cpio` an archive holding `file` at `path`: the kernel unpacks
/// concatenated archives in order, so it replaces what the first one had there.
pub fn overlay(cpio_path: &Path, path: &Path, file: &Path) -> Result<()> {
    let root = cpio_path.with_extension("overlay.d");
    let _ = fs::remove_dir_all(&root);
    let dest = under(&root, path);
    fs::create_dir_all(dest.parent().unwrap())?;
    fs::copy(file, &dest)?;
    cpio(&root, ">>", cpio_path)
}

fn under(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

pub fn which(tool: &str) -> Result<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    anyhow::ensure!(
        !path.is_empty(),
        "{tool} is not installed (`cargo xtask setup`)"
    );
    Ok(fs::canonicalize(path)?)
}

/// The shared libraries and loader `ldd` lists for an ELF file.
fn linked_libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(elf).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}
