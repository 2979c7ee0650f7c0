//! Debian's cloud kernels, fetched with private apt state (a copy of this system's apt sources
//! with another suite) and unpacked into the cache, never installed: the plain ELF `vmlinux`
//! QEMU boots, and the package's module tree.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};

use crate::run;

/// Matrix label, Debian suite.
pub const KERNELS: [(&str, &str); 3] = [
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "trixie"),
];

pub struct Kernel {
    /// `linux-image-<abi>-cloud-amd64=<version>`.
    pub package: String,
    pub vmlinux: PathBuf,
    /// `lib/modules/<release>` (or `usr/lib/modules/<release>`) of the package.
    pub modules: PathBuf,
}

/// The suite's current cloud kernel; downloads only when the suite has a newer one.
pub fn prepare(cache: &Path, suite: &str) -> Result<Kernel> {
    let apt = cache.join("apt").join(suite);
    private_sources(&apt, suite)?;
    let stamp = apt.join("updated");
    let age = fs::metadata(&stamp).and_then(|m| m.modified()).ok();
    let age = age.and_then(|t| SystemTime::now().duration_since(t).ok());
    if age.is_none_or(|a| a > Duration::from_secs(24 * 3600)) {
        eprintln!("vm-test: refreshing {suite}'s package lists");
        match run(apt_command("apt-get", &apt).arg("update")) {
            Ok(()) => fs::write(&stamp, "")?,
            Err(e) if age.is_some() => eprintln!("vm-test: {e:#}; using the lists from before"),
            Err(e) => return Err(e),
        }
    }
    let meta = apt_field(&apt, "linux-image-cloud-amd64", "Depends")?;
    let name = meta
        .split([',', ' ', '|'])
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| format!("{suite}: linux-image-cloud-amd64 depends on no image: {meta}"))?;
    let package = format!("{name}={}", apt_field(&apt, name, "Version")?);
    let root = cache.join("kernels").join(suite);
    let marker = root.join(".package");
    if fs::read_to_string(&marker).ok().as_deref() != Some(package.as_str()) {
        eprintln!("vm-test: downloading {package}");
        let debs = apt.join("debs");
        let _ = fs::remove_dir_all(&debs);
        fs::create_dir_all(&debs)?;
        run(apt_command("apt-get", &apt)
            .args(["download", &package])
            .current_dir(&debs))?;
        let deb = fs::read_dir(&debs)?
            .next()
            .context("apt-get download left no file")??
            .path();
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        let vmlinuz = only_entry(&root.join("boot"), "vmlinuz-")?;
        let vmlinux = extract_vmlinux(&fs::read(&vmlinuz)?)
            .with_context(|| format!("decompressing {}", vmlinuz.display()))?;
        fs::write(root.join("vmlinux"), vmlinux)?;
        fs::write(&marker, &package)?;
        fs::remove_dir_all(&debs)?;
    }
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .context("the kernel package has no lib/modules")?;
    Ok(Kernel {
        package,
        vmlinux: root.join("vmlinux"),
        modules: only_entry(&modules, "")?,
    })
}

/// The system's deb822 sources with the host's codename replaced by `suite` on `Suites:`.
fn private_sources(dir: &Path, suite: &str) -> Result<()> {
    let system = "/etc/apt/sources.list.d/debian.sources";
    let sources = fs::read_to_string(system).with_context(|| format!("reading {system}"))?;
    let os = fs::read_to_string("/etc/os-release")?;
    let host = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .context("no VERSION_CODENAME in /etc/os-release")?
        .trim_matches('"');
    let rewritten: String = sources
        .lines()
        .map(|l| match l.strip_prefix("Suites:") {
            Some(s) => format!("Suites:{}\n", s.replace(host, suite)),
            None => format!("{l}\n"),
        })
        .collect();
    for d in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::write(dir.join("debian.sources"), rewritten)?;
    Ok(())
}

/// apt-get / apt-cache on the private state in `dir` (the system's apt.conf still applies).
fn apt_command(tool: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(tool);
    let d = |p: &str| dir.join(p).display().to_string();
    for opt in [
        format!("Dir::Etc::sourcelist={}", d("debian.sources")),
        "Dir::Etc::sourceparts=-".into(),
        format!("Dir::State::Lists={}", d("lists")),
        format!("Dir::Cache={}", d("cache")),
        "Dir::State::status=/dev/null".into(),
        "APT::Sandbox::User=root".into(),
        "Acquire::Languages=none".into(),
    ] {
        cmd.arg("-o").arg(opt);
    }
    cmd.arg("-qq");
    cmd
}

/// A field of the candidate version of `package`.
fn apt_field(dir: &Path, package: &str, field: &str) -> Result<String> {
    let out = apt_command("apt-cache", dir)
        .args(["show", "--no-all-versions", package])
        .output()?;
    ensure!(
        out.status.success(),
        "apt-cache show {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}: ")).map(str::to_string))
        .with_context(|| format!("{package} has no {field}"))
}

/// The one entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found = fs::read_dir(dir)?
        .map(|e| Ok(e?.path()))
        .filter(|p| match p {
            Ok(p) => p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix)),
            Err(_) => true,
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        found.len() == 1,
        "expected one {prefix}* in {}, found {found:?}",
        dir.display()
    );
    Ok(found.remove(0))
}

/// The ELF kernel inside a bzImage, as the kernel's `scripts/extract-vmlinux` finds it: the
/// compressed payload (located by the boot header, identified by its magic: Debian's 6.1
/// kernels use lz4) decompressed.
fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>> {
    ensure!(image.get(0x202..0x206) == Some(b"HdrS"), "not a bzImage");
    let u32_at = |o: usize| u32::from_le_bytes(image[o..o + 4].try_into().unwrap()) as usize;
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248);
    // The payload ends with the decompressed size (4 bytes), not part of the stream.
    let payload = image
        .get(start..start + u32_at(0x24c).saturating_sub(4))
        .context("payload outside the image")?;
    let tool: &[&str] = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        _ => bail!(
            "unknown compression (magic {:02x?})",
            &payload[..payload.len().min(6)]
        ),
    };
    let elf = filter(Command::new(tool[0]).args(&tool[1..]), payload)?;
    ensure!(
        elf.starts_with(b"\x7fELF"),
        "{} did not produce an ELF file",
        tool[0]
    );
    Ok(elf)
}

/// Runs `cmd` with `input` on stdin; its stdout.
pub fn filter(cmd: &mut Command, input: &[u8]) -> Result<Vec<u8>> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?} (`cargo xtask setup` installs it)"))?;
    let mut stdin = child.stdin.take().unwrap();
    let out = std::thread::scope(|s| {
        s.spawn(move || stdin.write_all(input));
        child.wait_with_output()
    })?;
    ensure!(out.status.success(), "{cmd:?} failed ({})", out.status);
    Ok(out.stdout)
}
