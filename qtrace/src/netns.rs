//! Network namespaces on this host, and running code inside one of them.

use std::{
    collections::BTreeMap,
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};

/// A network namespace, held open: the fd found by a scan is the one entered, so a process
/// that exits and whose PID is reused before then cannot swap in another namespace.
#[derive(Clone, Debug)]
pub struct Namespace {
    pub inode: u32,
    pub path: PathBuf,
    file: Arc<File>,
}

/// The inode of this process's own network namespace.
pub fn own() -> Result<Namespace> {
    namespace(Path::new("/proc/self/ns/net")).context("read /proc/self/ns/net")
}

fn namespace(path: &Path) -> Result<Namespace> {
    let file = File::open(path)?;
    Ok(Namespace {
        inode: file.metadata()?.ino() as u32,
        path: path.to_path_buf(),
        file: Arc::new(file),
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
        // A stat per path to skip known namespaces; the first path of a new one is opened, and
        // its fd (whose inode is read again from it) is what names it from then on.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if found.contains_key(&(meta.ino() as u32)) {
            continue;
        }
        if let Ok(ns) = namespace(&path) {
            found.entry(ns.inode).or_insert(ns);
        }
    }
    found.into_values().collect()
}

/// Runs `f` on a thread that has joined `ns` (needs CAP_SYS_ADMIN for other namespaces).
pub fn run_in<T: Send>(ns: &Namespace, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .spawn_scoped(scope, || enter(ns).and_then(|()| f()))
            .context("start a thread to enter a network namespace")?
            .join()
            .unwrap_or_else(|_| anyhow::bail!("thread for namespace {} panicked", ns.inode))
    })
}

/// Moves the calling thread into `ns`: only for a thread of its own, which then stays there.
pub fn enter(ns: &Namespace) -> Result<()> {
    // SAFETY: a namespace fd we hold; the caller's thread is the only one that moves.
    if unsafe { libc::setns(ns.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "enter network namespace {} ({})",
                ns.inode,
                ns.path.display()
            )
        });
    }
    Ok(())
}
