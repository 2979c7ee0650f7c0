//! The events socket's file: bound without replacing anything but a dead qtrace's socket, and
//! removed at exit only while it is still the one this process bound.
//!
//! `bind` fails with EADDRINUSE whatever sits at the path, so nothing is ever bound over; a
//! non-socket there is refused, a socket a live daemon answers on is refused, and a dead one
//! (connection refused) is removed — only if the path still names the same inode that was
//! probed, so a socket another qtrace bound in the meantime is left alone — and bound again.

use std::{
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// Binds a Unix stream socket at `path` (see the module's comment).
pub fn bind(path: &Path) -> Result<(std::os::unix::net::UnixListener, SocketFile)> {
    for _ in 0..3 {
        match std::os::unix::net::UnixListener::bind(path) {
            Ok(listener) => {
                let meta = std::fs::symlink_metadata(path)
                    .with_context(|| format!("stat {}", path.display()))?;
                let file = SocketFile {
                    path: path.to_path_buf(),
                    id: identity(&meta),
                };
                return Ok((listener, file));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e).with_context(|| format!("bind {}", path.display())),
        }
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(_) => continue, // gone since: bind again
        };
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket: refusing to replace it (remove it, or give \
                 another --events-socket)",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use: is another qtrace running?", path.display());
        }
        // A dead daemon's socket: remove it if it is still the one probed.
        remove_if_same(path, identity(&meta));
    }
    bail!(
        "{}: another process keeps binding this path",
        path.display()
    )
}

/// A file's identity: device and inode, with its change time, since a file system hands a
/// freed inode number to the next file (a socket's ctime is when it was bound).
type Identity = (u64, u64, i64, i64);

fn identity(m: &std::fs::Metadata) -> Identity {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

fn remove_if_same(path: &Path, id: Identity) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(m) if identity(&m) == id => std::fs::remove_file(path).is_ok(),
        _ => false,
    }
}

/// The bound socket's file, removed when dropped if the path still names it.
pub struct SocketFile {
    path: PathBuf,
    id: Identity,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        remove_if_same(&self.path, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("qtrace-sock-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_regular_file_is_refused_and_kept() {
        let d = dir();
        let path = d.join("events.sock");
        std::fs::write(&path, "precious").unwrap();
        let e = bind(&path).err().unwrap().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_live_socket_is_refused_a_dead_one_replaced() {
        let d = dir();
        let path = d.join("events.sock");
        let (live, file) = bind(&path).unwrap();
        assert!(bind(&path).err().unwrap().to_string().contains("in use"));
        drop(live); // dead now, but its file stays (as after SIGKILL)
        std::mem::forget(file);
        let (_l, _file) = bind(&path).unwrap();
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_file_is_removed_only_while_it_is_ours() {
        let d = dir();
        let path = d.join("events.sock");
        let (l, file) = bind(&path).unwrap();
        drop(l);
        // Another daemon replaced it: ours must not remove theirs.
        std::fs::remove_file(&path).unwrap();
        let (_theirs, their_file) = bind(&path).unwrap();
        drop(file);
        assert!(path.exists(), "removed another daemon's socket");
        drop(their_file);
        assert!(!path.exists());
        std::fs::remove_dir_all(d).unwrap();
    }
}
