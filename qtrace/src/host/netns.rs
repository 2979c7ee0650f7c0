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

/// The calling thread's network namespace's cookie (`SO_NETNS_COOKIE`, 5.14+): unlike its
/// inode number, never reused by a later namespace. None on older kernels.
pub fn cookie() -> Option<u64> {
    // A socket is made in the calling thread's namespace, whichever that is.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a socket we own, and a buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    unsafe { libc::close(fd) };
    (rc == 0).then_some(cookie)
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

/// Runs `f` in every network namespace `wanted` admits (by inode), a few at a time in
/// parallel: in this process's own namespace directly, in the others on a thread that joins
/// it (needs CAP_SYS_ADMIN). Returns what `f` found per namespace inode, and the namespaces
/// that could not be entered or read (counted, never guessed).
pub fn for_each<T: Send>(
    wanted: impl Fn(u32) -> bool,
    f: impl Fn() -> Result<T> + Sync,
) -> (Vec<(u32, T)>, Vec<u32>) {
    let own = own().ok();
    // A namespace `wanted` excludes is not entered at all.
    let namespaces: Vec<_> = all().into_iter().filter(|ns| wanted(ns.inode)).collect();
    // At most 4 threads: the service's TasksMax counts each one, whatever the host's size.
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut out = Vec::new();
    let mut unreadable = Vec::new();
    let f = &f;
    for batch in namespaces.chunks(parallel) {
        let found: Vec<Result<T>> = std::thread::scope(|scope| {
            let threads: Vec<_> = batch
                .iter()
                .map(|ns| {
                    let mine = own.as_ref().is_some_and(|o| o.inode == ns.inode);
                    // A thread that cannot be started (TasksMax) is an error for that
                    // namespace, not a panic of the scrape.
                    std::thread::Builder::new().spawn_scoped(scope, move || {
                        if mine {
                            f()
                        } else {
                            enter(ns).and_then(|()| f())
                        }
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| match t {
                    Ok(t) => t
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("namespace thread panicked"))),
                    Err(e) => Err(anyhow::anyhow!("start a namespace thread: {e}")),
                })
                .collect()
        });
        for (ns, found) in batch.iter().zip(found) {
            match found {
                Ok(v) => out.push((ns.inode, v)),
                Err(e) => {
                    tracing::debug!("netns {}: {e:#}", ns.inode);
                    unreadable.push(ns.inode);
                }
            }
        }
    }
    (out, unreadable)
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
