//! Network namespaces on this host, and running code inside one of them.

use std::{
    collections::BTreeMap,
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

/// A network namespace and a path that names it.
#[derive(Clone, Debug)]
pub struct Namespace {
    pub inode: u32,
    pub path: PathBuf,
}

/// The inode of this process's own network namespace.
pub fn own() -> Result<Namespace> {
    namespace(Path::new("/proc/self/ns/net")).context("read /proc/self/ns/net")
}

fn namespace(path: &Path) -> Result<Namespace> {
    Ok(Namespace {
        inode: std::fs::metadata(path)?.ino() as u32,
        path: path.to_path_buf(),
    })
}

/// Every network namespace in use: those of processes and those pinned under /run/netns
/// (`ip netns add`), one path each, by inode.
pub fn all() -> Vec<Namespace> {
    let mut found = BTreeMap::new();
    let pinned = std::fs::read_dir("/run/netns").into_iter().flatten();
    let procs = std::fs::read_dir("/proc").into_iter().flatten();
    let paths = pinned.flatten().map(|e| e.path()).chain(
        procs
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .map(|e| e.path().join("ns/net")),
    );
    for path in paths {
        if let Ok(ns) = namespace(&path) {
            found.entry(ns.inode).or_insert(ns);
        }
    }
    found.into_values().collect()
}

/// Runs `f` on a thread that has joined `ns` (needs CAP_SYS_ADMIN for other namespaces).
pub fn run_in<T: Send>(ns: &Namespace, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| enter(ns).and_then(|()| f()))
            .join()
            .unwrap_or_else(|_| anyhow::bail!("thread for namespace {} panicked", ns.inode))
    })
}

/// Moves the calling thread into `ns`: only for a thread of its own, which then stays there.
pub fn enter(ns: &Namespace) -> Result<()> {
    let file = File::open(&ns.path).with_context(|| format!("open {}", ns.path.display()))?;
    // SAFETY: a namespace fd we own; the caller's thread is the only one that moves.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("enter network namespace {}", ns.inode));
    }
    Ok(())
}
