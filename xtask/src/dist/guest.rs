//! The dist test's guest: Debian trixie (mmdebstrap, from the system's apt sources with the
//! suite rewritten, as the matrix's kernels) with systemd as PID 1, Prometheus and Podman, on an
//! ext4 disk image cached under `target/vm-cache/dist/`; booted on the matrix's 6.12 kernel by
//! a small initramfs that loads the disk's modules and switches root. A second, read-only disk
//! carries the artifacts and `test.sh`, whose `@@QTRACE dist` console lines are the results.

use std::{
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::matrix::{initramfs, kernels, qemu};
use crate::run;

const SUITE: &str = "trixie";
const KERNEL: &str = "6.12";
/// What the guest has besides Debian's required packages and apt: nothing qtrace's package
/// depends on (it depends on nothing), only the tools the test uses.
const PACKAGES: &[&str] = &[
    "systemd",
    "iproute2",
    "bpftool",
    "curl",
    "jq",
    "procps",
    "prometheus",
    "podman",
];
const HOOK: &str = include_str!("rootfs-hook.sh");
const TEST: &str = include_str!("test.sh");
/// Built in (virtio_pci, ext4 on some kernels) or loaded by the initramfs before systemd.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "ext4",
    "veth",
    "sch_netem",
    "tcp_diag",
];

const INIT: &str = "#!/bin/sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo \"@@QTRACE dist FAIL module $m\"; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot || { echo '@@QTRACE dist FAIL mounting the root disk'; poweroff -f; }
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot /lib/systemd/systemd
";

/// The root file system image, built once per package list and hook.
pub fn rootfs(cache: &Path) -> Result<PathBuf> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (PACKAGES, HOOK).hash(&mut h);
    let dir = cache.join("dist");
    fs::create_dir_all(&dir)?;
    let image = dir.join(format!("rootfs-{SUITE}-{:016x}.ext4", h.finish()));
    if image.exists() {
        return Ok(image);
    }
    let t = Instant::now();
    eprintln!("dist-test: building the {SUITE} root file system (mmdebstrap, a few minutes)");
    let apt = cache.join("apt").join(SUITE);
    kernels::private_sources(&apt, SUITE)?;
    let root = dir.join("rootfs.d");
    let _ = fs::remove_dir_all(&root);
    let hook = dir.join("rootfs-hook.sh");
    fs::write(&hook, HOOK)?;
    run(Command::new("mmdebstrap")
        .args(["--quiet", "--variant=apt", "--mode=root"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg(format!("--customize-hook=sh {} \"$1\"", hook.display()))
        .arg(SUITE)
        .arg(&root)
        .arg(apt.join("sources/debian.sources")))?;
    let tmp = image.with_extension("tmp");
    // Room for Podman's vfs layers, Prometheus' data and the journal.
    let mib = du_mib(&root)? + 1024;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&root)
        .arg(&tmp)
        .arg(format!("{mib}M")))?;
    fs::rename(&tmp, &image)?;
    fs::remove_dir_all(&root)?;
    eprintln!(
        "dist-test: root file system ready in {:.0}s",
        t.elapsed().as_secs_f64()
    );
    Ok(image)
}

fn du_mib(dir: &Path) -> Result<u64> {
    let out = Command::new("du").args(["-sm"]).arg(dir).output()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .context("du printed nothing")?
        .parse()
        .context("du's size")
}

/// Boots the guest with `files` (name in /dist, source) on its second disk; the console.
pub fn boot(cache: &Path, rootfs: &Path, files: &[(&str, PathBuf)]) -> Result<String> {
    let kernel = kernels::fetch(cache, KERNEL)?;
    let modules = kernels::module_closure(&kernel.modules, MODULES, &[])?;
    let initrd = cache.join("dist/initramfs.cpio");
    initramfs::build(&initrd, &modules, &[], &[], INIT)?;
    let data = cache.join("dist/data.d");
    let _ = fs::remove_dir_all(&data);
    fs::create_dir_all(&data)?;
    fs::write(data.join("test.sh"), TEST)?;
    for (name, from) in files {
        fs::copy(from, data.join(name)).with_context(|| format!("copy {}", from.display()))?;
    }
    let disk = cache.join("dist/data.ext4");
    let _ = fs::remove_file(&disk);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "dist", "-d"])
        .arg(&data)
        .arg(&disk)
        .arg(format!("{}M", du_mib(&data)? + 32)))?;
    eprintln!(
        "dist-test: booting Debian {SUITE} with systemd on {} (about 10 minutes: the alert's \
         `for: 5m`); console in {}",
        kernel.release,
        cache.join("logs/dist-6.12.log").display()
    );
    let drive =
        |file: &Path, opts: &str| format!("file={},if=virtio,format=raw,{opts}", file.display());
    let (console, finished) = qemu::boot_with(
        &kernel.vmlinux,
        &initrd,
        "systemd.show_status=0 rw",
        qemu::Machine {
            memory_mib: 2048,
            cpus: 2,
            extra: vec![
                "-drive".into(),
                // The cached image stays as built: writes go to a temporary overlay.
                drive(rootfs, "snapshot=on"),
                "-drive".into(),
                drive(&disk, "readonly=on"),
            ],
            console_log: Some(cache.join("logs/dist-6.12.log")),
        },
        Duration::from_secs(25 * 60),
    )?;
    if !finished {
        bail!("the dist guest timed out");
    }
    Ok(console)
}
