//! Booting a kernel under QEMU (software emulation: no KVM here) and capturing its console.

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// The guest's clock.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Real time, as the tests' kernel timers need.
    Real,
    /// One nanosecond per guest instruction (`-icount shift=0`): durations measured in the
    /// guest count instructions, whatever the emulator's speed or the host's load.
    Instructions,
}

/// Boots `kernel` with `initrd`, `memory_mib` of RAM and `cpus` CPUs, returns the console
/// output; kills the VM after `timeout`.
pub fn boot(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    (memory_mib, cpus): (u32, u32),
    clock: Clock,
    timeout: Duration,
) -> Result<(String, bool)> {
    let mut extra = Vec::new();
    if clock == Clock::Instructions {
        // sleep=off: an idle guest skips ahead to its next timer instead of waiting for it.
        extra = vec!["-icount".into(), "shift=0,sleep=off".into()];
    }
    let machine = Machine {
        memory_mib,
        cpus,
        extra,
        console_log: None,
    };
    boot_with(kernel, initrd, cmdline, machine, timeout)
}

/// The guest's size, more QEMU arguments (disks, clock), and a file to copy the console into
/// as it comes (to follow a long boot).
pub struct Machine {
    pub memory_mib: u32,
    pub cpus: u32,
    pub extra: Vec<String>,
    pub console_log: Option<std::path::PathBuf>,
}

/// [`boot`] with a [`Machine`]: the console output, and whether the VM stopped by itself
/// before `timeout`.
pub fn boot_with(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    machine: Machine,
    timeout: Duration,
) -> Result<(String, bool)> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(&machine.extra)
        .args(["-M", "pc", "-accel", "tcg", "-cpu", "max"])
        .args(["-smp", &machine.cpus.to_string()])
        .args(["-m", &machine.memory_mib.to_string()])
        .args([
            "-nodefaults",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 oops=panic {cmdline}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // QEMU's own complaints (a bad image, no memory) go straight to the caller's stderr.
        .stderr(Stdio::inherit())
        .spawn()
        .context("qemu-system-x86_64 (apt package qemu-system-x86)")?;
    let mut stdout = child.stdout.take().unwrap();
    let mut live = match &machine.console_log {
        Some(path) => Some(std::fs::File::create(path)?),
        None => None,
    };
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut chunk) {
            buf.extend_from_slice(&chunk[..n]);
            if let Some(f) = &mut live {
                let _ = std::io::Write::write_all(f, &chunk[..n]);
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    });
    let start = Instant::now();
    let finished = loop {
        if child.try_wait()?.is_some() {
            break true;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Ok((reader.join().unwrap_or_default(), finished))
}
