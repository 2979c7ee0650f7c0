//! Stock Debian kernels for the matrix, fetched with private apt state (a copy of this
//! system's apt sources with another suite), extracted into the cache, never installed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};

use crate::run;

/// Matrix label, Debian suite: the suite's cloud kernel. A new suite is one line here.
pub const SUITES: [(&str, &str); 4] = [
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "trixie"),
    // Unstable: the newest kernel Debian builds (7.x in late 2026); its label stays while
    // its version moves.
    ("sid", "sid"),
];

/// Kernels of other flavours, by label: the suite and the package their kernel is reached
/// from. Not in `all`: asked for by label (`--kernel 6.12-rt`).
pub const FLAVOURS: [(&str, &str, &str); 1] = [
    // PREEMPT_RT: softirqs run in threads and BPF programs can be preempted on their CPU.
    ("6.12-rt", "trixie", "linux-image-rt-amd64"),
];

/// Suites that have no `-updates` or `-security` companions.
const ROLLING: [&str; 2] = ["sid", "unstable"];

/// The package every suite's cloud kernel is reached from.
const META: &str = "linux-image-cloud-amd64";

pub struct Kernel {
    /// `uname -r` of the kernel, e.g. 6.12.117+deb13-cloud-amd64.
    pub release: String,
    /// Decompressed kernel image, booted directly (PVH).
    pub vmlinux: PathBuf,
    /// `lib/modules/<release>` of the package.
    pub modules: PathBuf,
}

/// apt-get/apt-cache options that point apt at private state for `suite`.
pub(crate) fn apt_options(dir: &Path) -> Vec<String> {
    let p = |s: &str| dir.join(s).display().to_string();
    vec![
        format!("-oDir::Etc::sourcelist={}", p("none.list")),
        format!("-oDir::Etc::sourceparts={}", p("sources")),
        format!("-oDir::State::Lists={}", p("lists")),
        format!("-oDir::Cache={}", p("cache")),
        "-oDir::State::status=/dev/null".into(),
        "-oDebug::NoLocking=1".into(),
        "-oAPT::Sandbox::User=root".into(),
        "-q".into(),
    ]
}

/// Writes the private sources: the system's own deb822 file with its suite names replaced
/// (`bookworm-updates` → `trixie-updates`); for a rolling suite, which has no companions, the
/// companion suites are left out, and a stanza left with no suite goes.
pub(crate) fn private_sources(dir: &Path, suite: &str) -> Result<()> {
    let system = fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .context("this harness needs the system's deb822 apt sources (/etc/apt/sources.list.d/debian.sources)")?;
    let os = fs::read_to_string("/etc/os-release")?;
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .context("no VERSION_CODENAME in /etc/os-release")?
        .trim_matches('"');
    for d in ["sources", "lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::write(dir.join("none.list"), "")?;
    fs::write(
        dir.join("sources/debian.sources"),
        rewrite_sources(&system, codename, suite),
    )?;
    Ok(())
}

/// `sources` (deb822) with the suites of `codename` renamed to those of `suite`.
fn rewrite_sources(sources: &str, codename: &str, suite: &str) -> String {
    let rolling = ROLLING.contains(&suite);
    let mut out = String::new();
    for stanza in sources.split("\n\n") {
        let mut kept = true;
        let stanza: String = stanza
            .lines()
            .map(|l| match l.strip_prefix("Suites:") {
                Some(suites) => {
                    let renamed: Vec<String> = suites
                        .split_whitespace()
                        .filter_map(|s| match s.strip_prefix(codename) {
                            Some("") => Some(suite.to_string()),
                            Some(companion) if !rolling => Some(format!("{suite}{companion}")),
                            Some(_) => None,
                            None => Some(s.to_string()),
                        })
                        .collect();
                    kept = !renamed.is_empty();
                    format!("Suites: {}\n", renamed.join(" "))
                }
                None => format!("{l}\n"),
            })
            .collect();
        if kept && !stanza.trim().is_empty() {
            out += &stanza;
            out.push('\n');
        }
    }
    out
}

fn fresh(path: &Path, max_age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() < max_age)
}

/// The current kernel whose matrix label is `label`: a suite's cloud kernel (see `SUITES`)
/// or another flavour's (`FLAVOURS`).
pub fn fetch(cache: &Path, label: &str) -> Result<Kernel> {
    let suites = SUITES.iter().map(|&(l, suite)| (l, suite, META));
    let (_, suite, meta) = suites
        .chain(FLAVOURS)
        .find(|(l, _, _)| *l == label)
        .with_context(|| {
            let labels: Vec<&str> = SUITES
                .iter()
                .map(|(l, _)| *l)
                .chain(FLAVOURS.iter().map(|(l, _, _)| *l))
                .collect();
            format!(
                "unknown kernel {label}: use {}, native or all",
                labels.join(", ")
            )
        })?;
    let apt = cache.join("apt").join(suite);
    private_sources(&apt, suite)?;
    let stamp = apt.join("updated");
    if !fresh(&stamp, Duration::from_secs(24 * 3600)) {
        eprintln!("vm-test: refreshing the package lists of {suite}");
        run(Command::new("apt-get")
            .args(apt_options(&apt))
            .arg("update"))?;
        fs::write(&stamp, "")?;
    }
    let version = Command::new("apt-cache")
        .args(apt_options(&apt))
        .args(["show", "--no-all-versions", meta])
        .output()?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Version: ").map(str::to_string))
        .with_context(|| format!("{suite} has no {meta}"))?;
    // A flavour's version is its suite's cloud kernel's: the package names them apart.
    let name = if meta == META {
        format!("{suite}_{version}")
    } else {
        format!("{suite}_{meta}_{version}")
    };
    let root = cache.join("kernels").join(name);
    if !root.join(".done").exists() {
        let packages = kernel_packages(&apt, meta)?;
        eprintln!("vm-test: downloading {}", packages.join(" "));
        let debs = cache.join("debs").join(suite);
        let _ = fs::remove_dir_all(&debs);
        fs::create_dir_all(&debs)?;
        // One at a time, and a failed one is no error by itself: the packages are the closure
        // of every `linux-*` dependency, and some hold no file the matrix needs (the
        // meta-package, linux-base) and have been seen missing from a mirror's pool. The
        // vmlinuz check below says whether what matters arrived.
        for package in &packages {
            let got = Command::new("apt-get")
                .args(apt_options(&apt))
                .args(["download", package])
                .current_dir(&debs)
                .status()?;
            if !got.success() {
                eprintln!(
                    "vm-test: {package} could not be downloaded ({got}); going on without it"
                );
            }
        }
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        for deb in fs::read_dir(&debs)?.flatten() {
            run(Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb.path())
                .arg(&root))?;
        }
        let vmlinuz = find_vmlinuz(&root).with_context(|| {
            format!("no vmlinuz in the kernel's packages that could be downloaded ({packages:?})")
        })?;
        fs::write(
            root.join("vmlinux"),
            decompress_kernel(&fs::read(&vmlinuz)?)?,
        )?;
        fs::write(root.join(".done"), "")?;
        let _ = fs::remove_dir_all(&debs);
    }
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|d| {
            fs::read_dir(root.join(d))
                .ok()?
                .flatten()
                .next()
                .map(|e| e.path())
        })
        .next()
        .context("no lib/modules in the package")?;
    Ok(Kernel {
        release: modules
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        vmlinux: root.join("vmlinux"),
        modules,
    })
}

/// The packages that make up a kernel: the `linux-*` packages reachable from `meta` by
/// `Depends` (the kernel image, and since 7.x its separate binary and modules packages),
/// whichever of them holds the vmlinuz.
fn kernel_packages(apt: &Path, meta: &str) -> Result<Vec<String>> {
    let mut seen = vec![meta.to_string()];
    let mut next = 0;
    while let Some(package) = seen.get(next).cloned() {
        next += 1;
        let depends = Command::new("apt-cache")
            .args(apt_options(apt))
            .args(["depends", &package])
            .output()?;
        anyhow::ensure!(
            depends.status.success(),
            "apt-cache depends {package}: {}",
            String::from_utf8_lossy(&depends.stderr).trim()
        );
        for dep in String::from_utf8_lossy(&depends.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("  Depends: "))
        {
            if dep.starts_with("linux-") && !seen.iter().any(|p| p == dep) {
                seen.push(dep.to_string());
            }
        }
    }
    Ok(seen)
}

/// The compressed kernel in an extracted package tree: `boot/vmlinuz-<release>` up to Debian
/// 13, `usr/lib/modules/<release>/vmlinuz` since.
fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    let in_boot = fs::read_dir(root.join("boot"))
        .into_iter()
        .flatten()
        .flatten();
    let in_modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .flat_map(|d| fs::read_dir(root.join(d)).into_iter().flatten().flatten())
        .map(|release| release.path().join("vmlinuz"));
    in_boot
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .chain(in_modules.filter(|p| p.is_file()))
        .next()
}

/// The ELF kernel inside a bzImage: its payload (located by the boot header's
/// `payload_offset`/`payload_length`), decompressed by the tool its magic names.
fn decompress_kernel(image: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |o: usize| {
        image
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let setup_sects = match image.get(0x1f1) {
        Some(0) | None => 4,
        Some(n) => *n as usize,
    };
    let (offset, length) = u32_at(0x248).zip(u32_at(0x24c)).context("not a bzImage")?;
    let start = (setup_sects + 1) * 512 + offset as usize;
    let payload = image
        .get(start..start + length as usize)
        .context("bzImage payload out of range")?;
    let kernel = decompress(payload)?.context("unknown kernel compression")?;
    anyhow::ensure!(
        kernel.starts_with(b"\x7fELF"),
        "the bzImage payload did not decompress to an ELF kernel"
    );
    Ok(kernel)
}

/// `data` decompressed by the tool its magic bytes name; None when it is not compressed in a
/// format known here (a kernel payload, or a `.ko.xz`/`.zst`/`.gz` module).
fn decompress(data: &[u8]) -> Result<Option<Vec<u8>>> {
    const FORMATS: [(&[u8], &[&str]); 6] = [
        (b"\xfd7zXZ\x00", &["xz", "-dc"]),
        (b"\x28\xb5\x2f\xfd", &["zstd", "-dc"]),
        (b"\x1f\x8b", &["gzip", "-dc"]),
        (b"\x02\x21\x4c\x18", &["lz4", "-dc"]),
        (b"\x5d\x00\x00", &["xz", "--format=lzma", "-dc"]),
        (b"BZh", &["bzip2", "-dc"]),
    ];
    let Some((_, tool)) = FORMATS.iter().find(|(magic, _)| data.starts_with(magic)) else {
        return Ok(None);
    };
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("{} (`cargo xtask setup` installs it)", tool[0]))?;
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    // A kernel payload ends with its decompressed size, which some tools call trailing garbage:
    // the exit status is not checked, the caller checks what came out.
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(Some(out.stdout))
}

/// The package's file of module `name` (`-` and `_` alike), compressed or not.
fn module_file<'a>(name: &str, files: &'a [PathBuf]) -> Option<&'a PathBuf> {
    let canon = name.replace('-', "_");
    files.iter().find(|p| {
        let f = p.file_name().unwrap().to_string_lossy().replace('-', "_");
        f == format!("{canon}.ko") || f.starts_with(&format!("{canon}.ko."))
    })
}

/// Module files (decompressed) to load, dependencies first, skipping built-in ones: each of
/// `wanted`, and each of `if_packaged` that the package has as a module file (one a later
/// kernel folded into another module is neither a file nor built in).
pub fn module_closure(
    modules_dir: &Path,
    wanted: &[&str],
    if_packaged: &[&str],
) -> Result<Vec<(String, Vec<u8>)>> {
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let mut files = Vec::new();
    collect(modules_dir.join("kernel").as_path(), &mut files)?;
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    fn visit(
        name: &str,
        files: &[PathBuf],
        builtin: &str,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        let canon = name.replace('-', "_");
        if order.iter().any(|(n, _)| *n == canon)
            || builtin.lines().any(|l| {
                l.rsplit('/')
                    .next()
                    .is_some_and(|f| f.starts_with(&format!("{canon}.ko")))
            })
        {
            return Ok(());
        }
        let file = module_file(&canon, files)
            .with_context(|| format!("module {name} not in the kernel package"))?;
        let ko = decompress_module(file)?;
        for dep in modinfo_list(&ko, "depends=") {
            visit(&dep, files, builtin, order)?;
        }
        // What the module needs at its init without linking to it: libcrc32c asks the crypto
        // API for "crc32c", built into the cloud kernels, a module in the others.
        for soft in soft_pre_deps(&ko) {
            if let Some(provider) = provider_of(&soft, files)? {
                visit(&provider, files, builtin, order)?;
            }
        }
        order.push((canon, ko));
        Ok(())
    }
    let packaged = if_packaged
        .iter()
        .filter(|m| module_file(m, &files).is_some());
    for w in wanted.iter().chain(packaged) {
        visit(w, &files, &builtin, &mut order)?;
    }
    Ok(order)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn decompress_module(path: &Path) -> Result<Vec<u8>> {
    let raw = fs::read(path)?;
    let ko = decompress(&raw)?.unwrap_or(raw);
    anyhow::ensure!(
        ko.starts_with(b"\x7fELF"),
        "{} did not decompress to an ELF module",
        path.display()
    );
    Ok(ko)
}

/// The comma-separated list of a module's .modinfo `key` (`depends=`; NUL-separated
/// key=value strings).
fn modinfo_list(ko: &[u8], key: &str) -> Vec<String> {
    modinfo(ko, key)
        .map(|d| {
            d.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Every value of a module's .modinfo `key`.
fn modinfo_all<'a>(ko: &'a [u8], key: &'a str) -> impl Iterator<Item = String> + 'a {
    ko.split(|b| *b == 0)
        .filter_map(move |s| s.strip_prefix(key.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn modinfo(ko: &[u8], key: &str) -> Option<String> {
    modinfo_all(ko, key).next()
}

/// The `pre:` names of a module's `softdep=` (`pre: a b post: c`): modules or aliases.
fn soft_pre_deps(ko: &[u8]) -> Vec<String> {
    let Some(soft) = modinfo(ko, "softdep=") else {
        return Vec::new();
    };
    let mut pre = false;
    let mut out = Vec::new();
    for word in soft.split_whitespace() {
        match word {
            "pre:" => pre = true,
            "post:" => pre = false,
            name if pre => out.push(name.to_string()),
            _ => {}
        }
    }
    out
}

/// The module a soft dependency `name` stands for: the module of that name, else one under a
/// `crypto` directory that has it as an alias (a generic implementation first: it loads on
/// any CPU the emulator gives); None when there is none.
fn provider_of(name: &str, files: &[PathBuf]) -> Result<Option<String>> {
    let stem = |p: &PathBuf| {
        let f = p.file_name().unwrap().to_string_lossy().into_owned();
        f.split(".ko").next().unwrap_or_default().replace('-', "_")
    };
    let canon = name.replace('-', "_");
    if files.iter().any(|p| stem(p) == canon) {
        return Ok(Some(canon));
    }
    let mut candidates: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "crypto"))
        .collect();
    candidates.sort_by_key(|p| !stem(p).ends_with("_generic"));
    for p in candidates {
        if modinfo_all(&decompress_module(p)?, "alias=").any(|a| a == name) {
            return Ok(Some(stem(p)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::{rewrite_sources, soft_pre_deps};

    #[test]
    fn soft_dependencies_are_read_before_post() {
        let ko = b"license=GPL\0softdep=pre: crc32c sha256 post: zstd\0depends=\0";
        assert_eq!(soft_pre_deps(ko), ["crc32c", "sha256"]);
        assert!(soft_pre_deps(b"depends=a\0").is_empty());
    }

    const BOOKWORM: &str = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n";

    #[test]
    fn a_stable_suite_keeps_its_companions() {
        let out = rewrite_sources(BOOKWORM, "bookworm", "trixie");
        assert!(out.contains("Suites: trixie trixie-updates\n"), "{out}");
        assert!(out.contains("Suites: trixie-security\n"), "{out}");
    }

    #[test]
    fn a_rolling_suite_has_no_companions() {
        let out = rewrite_sources(BOOKWORM, "bookworm", "sid");
        assert!(out.contains("Suites: sid\n"), "{out}");
        assert!(!out.contains("security"), "{out}");
        assert!(!out.contains("updates"), "{out}");
        assert_eq!(out.matches("Types:").count(), 1, "{out}");
    }
}
