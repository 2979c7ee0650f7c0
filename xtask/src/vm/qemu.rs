//! Booting a kernel under QEMU (TCG: no KVM here) and capturing its serial console.

use std::{
    fs::File,
    io::{Read, Write},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// Boots `vmlinux` with `initrd`; the console is written to `log` as it comes and returned,
/// with false when the VM was still running after `timeout` (it is killed).
pub fn boot(
    vmlinux: &Path,
    initrd: &Path,
    cmdline: &str,
    log: &Path,
    timeout: Duration,
) -> Result<(String, bool)> {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-M", "pc", "-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 oops=panic {cmdline}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (`cargo xtask setup` installs it)")?;
    let mut stdout = child.stdout.take().unwrap();
    let mut file = File::create(log)?;
    let reader = std::thread::spawn(move || {
        let (mut all, mut buf) = (Vec::new(), [0; 8192]);
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            let _ = file.write_all(&buf[..n]);
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&all).replace('\r', "")
    });
    let start = Instant::now();
    let finished = loop {
        if child.try_wait()?.is_some() {
            break true;
        }
        if start.elapsed() > timeout {
            child.kill()?;
            child.wait()?;
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    Ok((reader.join().unwrap_or_default(), finished))
}
