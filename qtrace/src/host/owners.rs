//! Which process owns a listening socket (by socket inode), and its systemd unit or container.
//! One cache, [`Owners`], answers by socket inode (scrapes, doctor) and, through its
//! [`OwnerIndex`], by listener (events).

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use procfs::process::{all_processes, FDTarget, Process};

pub use crate::api::Owner;
use crate::{
    host::workload::{self, Workload},
    listener::ListenerId,
};

/// Who holds the listening sockets, by listener: what the last lookup of
/// [`Owners::lookup_listeners_and`] found, shared with readers that must never wait for a scan
/// (the events socket names each event's owner from it).
#[derive(Clone, Default)]
pub struct OwnerIndex(Arc<RwLock<HashMap<ListenerId, Arc<Owner>>>>);

impl OwnerIndex {
    pub fn get(&self, id: &ListenerId) -> Option<Arc<Owner>> {
        crate::recover::read(&self.0).get(id).cloned()
    }
}

/// Socket inode → owner. Walking every process's fds is the expensive part, so it happens
/// only when a socket shows up that no scan has looked for yet, or when an owner has exited
/// (a binary upgrade hands the socket to another process), and takes at most a tenth of the
/// time: after a scan of `d`, the next waits `9 d`. A lookup that would wait up to
/// [`MAX_WAIT`] for that (a small host) waits and is exact; past it (a host with tens of
/// thousands of sockets) it answers with what it knows and a later lookup fills the gap.
/// Sockets no process holds (kernel sockets, processes in another PID namespace) are
/// remembered as looked for, so they do not cause a rescan on every scrape.
#[derive(Default)]
pub struct Owners {
    by_inode: HashMap<u32, Arc<Owner>>,
    looked_for: HashSet<u32>,
    /// When the last scan ended, and how long it took.
    scanned: Option<(Instant, Duration)>,
    /// Full /proc walks so far.
    scans: u64,
    index: OwnerIndex,
}

const MAX_WAIT: Duration = Duration::from_millis(100);

impl Owners {
    /// Owners of `inodes`; new sockets or exited owners trigger a rescan.
    pub fn lookup(&mut self, inodes: impl IntoIterator<Item = u32>) -> &HashMap<u32, Arc<Owner>> {
        let wanted: HashSet<u32> = inodes.into_iter().collect();
        if wanted.is_subset(&self.looked_for) && !self.an_owner_exited(&wanted) {
            return &self.by_inode;
        }
        let wait = self.scanned.map_or(Duration::ZERO, |(end, took)| {
            (took * 9).saturating_sub(end.elapsed())
        });
        if wait > MAX_WAIT {
            return &self.by_inode;
        }
        std::thread::sleep(wait);
        let start = Instant::now();
        self.by_inode = scan(&wanted);
        let took = start.elapsed();
        tracing::debug!(sockets = wanted.len(), ?took, "owner scan");
        self.looked_for = wanted;
        self.scanned = Some((Instant::now(), took));
        self.scans += 1;
        &self.by_inode
    }

    /// Owners of these listening sockets (listener, socket inode), as [`Self::lookup`]; the
    /// index answers with them from now on. And the owners of `others` (connections: the CLOSE_WAIT
    /// census) by inode, in the same lookup: one set of sockets wanted, so neither evicts the
    /// other from the cache.
    pub fn lookup_listeners_and(
        &mut self,
        sockets: &[(ListenerId, u32)],
        others: &[u32],
    ) -> (HashMap<ListenerId, Arc<Owner>>, HashMap<u32, Arc<Owner>>) {
        let by_inode = self.lookup(sockets.iter().map(|s| s.1).chain(others.iter().copied()));
        let found: HashMap<ListenerId, Arc<Owner>> = sockets
            .iter()
            .filter_map(|(id, inode)| Some((*id, by_inode.get(inode)?.clone())))
            .collect();
        let connections = others
            .iter()
            .filter_map(|inode| Some((*inode, by_inode.get(inode)?.clone())))
            .collect();
        *crate::recover::write(&self.index.0) = found.clone();
        (found, connections)
    }

    /// The owners by listener, as the last [`Self::lookup_listeners_and`] found them.
    pub fn index(&self) -> OwnerIndex {
        self.index.clone()
    }

    fn an_owner_exited(&self, wanted: &HashSet<u32>) -> bool {
        let pids: HashSet<i32> = wanted
            .iter()
            .filter_map(|i| self.by_inode.get(i).map(|o| o.pid))
            .collect();
        pids.iter()
            .any(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    }
}

fn scan(wanted: &HashSet<u32>) -> HashMap<u32, Arc<Owner>> {
    let mut out: HashMap<u32, Arc<Owner>> = HashMap::new();
    let Ok(procs) = all_processes() else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(fds) = p.fd() else { continue };
        // Read once per process, and only for one holding a wanted socket.
        let mut who: Option<(String, Workload)> = None;
        for fd in fds.flatten() {
            let FDTarget::Socket(inode) = fd.target else {
                continue;
            };
            let inode = inode as u32;
            if !wanted.contains(&inode) || out.get(&inode).is_some_and(|o| o.pid < p.pid) {
                continue;
            }
            let (comm, workload) = who.get_or_insert_with(|| describe(&p)).clone();
            out.insert(
                inode,
                Arc::new(Owner {
                    pid: p.pid,
                    comm,
                    unit: workload.unit,
                    container_id: workload
                        .container
                        .map_or(String::new(), |c| format!("{}://{}", c.runtime, c.id)),
                }),
            );
        }
    }
    out
}

/// A process's command name and workload.
fn describe(p: &Process) -> (String, Workload) {
    let comm = p.stat().map(|s| s.comm).unwrap_or_default();
    let path = p.cgroups().map_or_else(
        |_| String::new(),
        |cgs| {
            cgroup_path(
                cgs.into_iter()
                    .map(|c| (c.hierarchy, c.controllers, c.pathname)),
            )
        },
    );
    (comm, workload::of_path(&path))
}

/// The cgroup path that says most about a process's workload: the unified hierarchy's, else
/// systemd's named one (cgroup v1), else the first controller's not at the root.
fn cgroup_path(cgroups: impl Iterator<Item = (u32, Vec<String>, String)>) -> String {
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
    best.map(|(_, path)| path).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::AsRawFd};

    use super::*;

    fn socket_inode(l: &TcpListener) -> u32 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap();
        link.to_string_lossy()
            .trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    #[test]
    fn finds_this_process_as_the_owner_of_its_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = socket_inode(&l);
        let mut owners = Owners::default();
        let o = owners.lookup([inode])[&inode].clone();
        assert_eq!(o.pid, std::process::id() as i32);
        assert!(!o.comm.is_empty());
    }

    #[test]
    fn a_socket_no_process_holds_is_looked_for_once() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut owners = Owners::default();
        let held = socket_inode(&l);
        // No process has an fd for inode 1 (inode numbers of sockets start far above it).
        owners.lookup([held, 1]);
        owners.lookup([held, 1]);
        assert_eq!(
            owners.scans, 1,
            "an unowned socket must not cause a rescan per lookup"
        );
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        // Past the pause that keeps scans to a tenth of the time (long on an emulated CPU).
        std::thread::sleep(owners.scanned.unwrap().1 * 9);
        let o = owners.lookup([held, 1, socket_inode(&other)]).clone();
        assert_eq!(owners.scans, 2, "a new socket is looked up");
        assert_eq!(o[&socket_inode(&other)].pid, std::process::id() as i32);
    }

    #[test]
    fn the_path_of_the_unified_then_the_systemd_hierarchy() {
        let cg = |h: u32, c: &str, p: &str| (h, vec![c.to_string()], p.to_string());
        let v1 = [
            cg(9, "name=systemd", "/"),
            cg(4, "memory", "/docker/abc"),
            cg(0, "", "/"),
        ];
        assert_eq!(cgroup_path(v1.into_iter()), "/docker/abc");
        let hybrid = [
            cg(4, "memory", "/x/abc"),
            cg(1, "name=systemd", "/system.slice/nginx.service"),
        ];
        assert_eq!(
            cgroup_path(hybrid.into_iter()),
            "/system.slice/nginx.service"
        );
        let v2 = [cg(0, "", "/system.slice/docker-1f2e.scope")];
        assert_eq!(
            cgroup_path(v2.into_iter()),
            "/system.slice/docker-1f2e.scope"
        );
        assert_eq!(cgroup_path([cg(0, "", "/")].into_iter()), "");
    }
}
