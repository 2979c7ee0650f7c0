//! The guest's initramfs (cpio newc, gzip): busybox, bash and the real tools the tests run, the
//! test binaries at their exact host paths, every library `ldd` lists, /init. That part is
//! the same for every kernel; each kernel's modules go in a second archive appended to it
//! (the kernel unpacks concatenated archives in turn).

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::run;

/// Tools the tests run: the real ones (busybox's `ip` cannot make veth pairs), and the host's
/// `sh` (busybox's runs its own applets first, whatever PATH says).
const TOOLS: [&str; 7] = ["busybox", "sh", "bash", "ip", "nft", "bpftool", "setpriv"];
/// Tools only some suites run (daemon, top): packed when installed.
const OPTIONAL: [&str; 6] = ["prometheus", "promtool", "nginx", "wrk", "tmux", "pkill"];
/// Data tmux needs: terminal descriptions and a UTF-8 locale.
const DATA: [&str; 2] = ["/usr/lib/terminfo", "/usr/lib/locale/C.utf8"];

const ETC: [(&str, &str); 4] = [
    ("passwd", "root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/:/bin/false\nnobody:x:65534:65534::/:/bin/false\n"),
    ("group", "root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n"),
    ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n"),
    ("hosts", "127.0.0.1 localhost\n::1 localhost\n"),
];

/// The common archive: `binaries` (stripped of debug info) and the tools, their libraries,
/// the empty `dirs`, and `scripts` (path in the guest, text; made executable).
pub fn common(
    out: &Path,
    binaries: &[PathBuf],
    dirs: &[&Path],
    scripts: &[(&str, &str)],
) -> Result<()> {
    let root = out.with_extension("d");
    let _ = fs::remove_dir_all(&root);
    // The host's merged-/usr links (bin -> usr/bin, ...), so every host path resolves the same.
    for top in ["bin", "sbin", "lib", "lib64"] {
        if let Ok(target) = fs::read_link(Path::new("/").join(top)) {
            fs::create_dir_all(root.join(&target))?;
            symlink(&target, root.join(top))?;
        }
    }
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "etc",
        "var/log/nginx",
        "var/lib/nginx",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    for d in dirs {
        fs::create_dir_all(under(&root, d))?;
    }
    let mut tools = TOOLS
        .iter()
        .map(|t| which(t).with_context(|| format!("{t} is not installed (`cargo xtask setup`)")));
    let tools = tools.by_ref().collect::<Result<Vec<_>>>()?;
    let optional: Vec<PathBuf> = OPTIONAL.iter().filter_map(|t| which(t)).collect();
    let mut libs = BTreeSet::new();
    for elf in tools.iter().chain(&optional) {
        copy(elf, &under(&root, elf))?;
        libs.extend(linked_libraries(elf)?);
    }
    for elf in binaries {
        let dest = under(&root, elf);
        fs::create_dir_all(dest.parent().unwrap())?;
        // Debug info is most of a test binary; symbols stay for backtraces.
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dest)
            .arg(elf))?;
        libs.extend(linked_libraries(elf)?);
    }
    for lib in &libs {
        copy(lib, &under(&root, lib))?;
    }
    for dir in DATA.iter().map(Path::new).filter(|d| d.is_dir()) {
        let dest = under(&root, dir.parent().unwrap());
        fs::create_dir_all(&dest)?;
        run(Command::new("cp").arg("-a").arg(dir).arg(dest))?;
    }
    // busybox's applets, but none named like a real tool (it could come first on PATH).
    let busybox = &tools[0];
    let applets = Command::new(busybox).arg("--list-full").output()?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let link = root.join(applet);
        let real = tools
            .iter()
            .chain(&optional)
            .any(|t| t.file_name() == link.file_name());
        if !real && link.symlink_metadata().is_err() && link.parent().is_some_and(Path::is_dir) {
            symlink(busybox, link)?;
        }
    }
    for (name, text) in ETC {
        fs::write(root.join("etc").join(name), text)?;
    }
    for (path, text) in scripts {
        let dest = under(&root, Path::new(path));
        fs::write(&dest, text)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
    }
    cpio(&root, out)?;
    Ok(fs::remove_dir_all(root)?)
}

/// `common` followed by an archive of `extra` (a directory tree rooted at the guest's `/`).
pub fn append(common: &Path, extra: &Path, out: &Path) -> Result<()> {
    let tail = out.with_extension("tail");
    cpio(extra, &tail)?;
    let mut bytes = fs::read(common)?;
    bytes.extend(fs::read(&tail)?);
    fs::write(out, bytes)?;
    Ok(fs::remove_file(tail)?)
}

fn cpio(root: &Path, out: &Path) -> Result<()> {
    run(Command::new("bash")
        .args(["-o", "pipefail", "-c"])
        .arg("find . -print0 | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 > \"$1\"")
        .arg("cpio")
        .arg(out)
        .current_dir(root))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to.parent().unwrap())?;
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// `/a/b` inside `root`.
fn under(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

/// Where `PATH` finds a command (packed at that path: a symlink's target may be elsewhere).
fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The shared libraries and the loader `ldd` lists (none for a static binary).
fn linked_libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .context("running ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.split_once("=>").map_or(l, |(_, path)| path);
            l.split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}
