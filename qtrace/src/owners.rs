//! Which process owns a listening socket (by socket inode), and its systemd unit or container.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use procfs::process::{all_processes, FDTarget};
use serde::Serialize;

/// The process holding a socket. A socket shared by several processes (pre-forked servers)
/// is attributed to the lowest pid, the parent in the usual case.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Owner {
    pub pid: i32,
    pub comm: String,
    /// The last component of the process's cgroup: `nginx.service`, `docker-<id>.scope`, …
    pub unit: String,
}

/// Socket inode → owner, rescanned from /proc only when an unknown socket shows up, and at
/// most every `min_rescan`: walking every process's fds is the expensive part.
pub struct Owners {
    by_inode: HashMap<u32, Owner>,
    scanned: Option<Instant>,
    min_rescan: Duration,
}

impl Owners {
    pub fn new(min_rescan: Duration) -> Self {
        Self {
            by_inode: HashMap::new(),
            scanned: None,
            min_rescan,
        }
    }

    /// Owners of `inodes`; unknown ones trigger a rescan when allowed.
    pub fn lookup(
        &mut self,
        inodes: impl IntoIterator<Item = u32> + Clone,
    ) -> &HashMap<u32, Owner> {
        let missing = inodes
            .clone()
            .into_iter()
            .any(|i| !self.by_inode.contains_key(&i));
        let due = self.scanned.is_none_or(|t| t.elapsed() >= self.min_rescan);
        if missing && due {
            let wanted: std::collections::HashSet<u32> = inodes.into_iter().collect();
            self.by_inode = scan(&wanted);
            self.scanned = Some(Instant::now());
        }
        &self.by_inode
    }
}

fn scan(wanted: &std::collections::HashSet<u32>) -> HashMap<u32, Owner> {
    let mut out: HashMap<u32, Owner> = HashMap::new();
    let Ok(procs) = all_processes() else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(fds) = p.fd() else { continue };
        for fd in fds.flatten() {
            let FDTarget::Socket(inode) = fd.target else {
                continue;
            };
            let inode = inode as u32;
            if !wanted.contains(&inode) || out.get(&inode).is_some_and(|o| o.pid < p.pid) {
                continue;
            }
            let comm = p.stat().map(|s| s.comm).unwrap_or_default();
            let cgroups = p.cgroups().map(|cgs| cgs.into_iter().collect::<Vec<_>>());
            let unit = cgroups.map_or_else(
                |_| String::new(),
                |cgs| {
                    unit_of(
                        cgs.into_iter()
                            .map(|c| (c.hierarchy, c.controllers, c.pathname)),
                    )
                },
            );
            out.insert(
                inode,
                Owner {
                    pid: p.pid,
                    comm,
                    unit,
                },
            );
        }
    }
    out
}

/// The unit or container a process runs in: the last component of its cgroup path, from the
/// unified hierarchy, else systemd's named one, else the first controller not at the root.
fn unit_of(cgroups: impl Iterator<Item = (u32, Vec<String>, String)>) -> String {
    let mut best: Option<(u8, String)> = None;
    for (hierarchy, controllers, path) in cgroups {
        if path == "/" {
            continue;
        }
        let rank = if hierarchy == 0 {
            0
        } else if controllers.iter().any(|c| c == "name=systemd") {
            1
        } else {
            2
        };
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((rank, path));
        }
    }
    best.and_then(|(_, path)| path.rsplit('/').next().map(str::to_string))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::AsRawFd};

    use super::*;

    #[test]
    fn finds_this_process_as_the_owner_of_its_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap();
        let inode: u32 = link
            .to_string_lossy()
            .trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap();
        let mut owners = Owners::new(Duration::ZERO);
        let o = owners.lookup([inode])[&inode].clone();
        assert_eq!(o.pid, std::process::id() as i32);
        assert!(!o.comm.is_empty());
    }

    #[test]
    fn unit_prefers_the_unified_then_the_systemd_hierarchy() {
        let cg = |h: u32, c: &str, p: &str| (h, vec![c.to_string()], p.to_string());
        let v1 = [
            cg(9, "name=systemd", "/"),
            cg(4, "memory", "/x/abc"),
            cg(0, "", "/"),
        ];
        assert_eq!(unit_of(v1.into_iter()), "abc");
        let hybrid = [
            cg(4, "memory", "/x/abc"),
            cg(1, "name=systemd", "/system.slice/nginx.service"),
        ];
        assert_eq!(unit_of(hybrid.into_iter()), "nginx.service");
        let v2 = [cg(0, "", "/system.slice/docker-1f2e.scope")];
        assert_eq!(unit_of(v2.into_iter()), "docker-1f2e.scope");
        assert_eq!(unit_of([cg(0, "", "/")].into_iter()), "");
    }
}
