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

/// Boots `kernel` with `initrd` and `memory_mib` of RAM, returns the console output; kills the
/// VM after `timeout`.
pub fn boot(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    memory_mib: u32,
    clock: Clock,
    timeout: Duration,
) -> Result<(String, bool)> {
    let mut qemu = Command::new("qemu-system-x86_64");
    if clock == Clock::Instructions {
        // sleep=off: an idle guest skips ahead to its next timer instead of waiting for it.
        qemu.args(["-icount", "shift=0,sleep=off"]);
    }
    let mut child = qemu
        .args(["-M", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(["-m", &memory_mib.to_string()])
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
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
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
