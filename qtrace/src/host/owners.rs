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
use qtrace_common::listener::SOCK_INODE;

pub use crate::api::Owner;
use crate::{
    host::{
        names::{self, Resolver},
        workload::{self, Workload},
    },
    listener::ListenerId,
};

/// Who holds the listening sockets, by listener: what the last lookup of
/// [`Owners::lookup_listeners_and`] found, shared with readers that must never wait for a scan
/// (the events socket names each event's owner from it).
#[derive(Clone, Default)]
pub struct OwnerIndex(Arc<RwLock<Index>>);

#[derive(Default)]
struct Index {
    owners: HashMap<ListenerId, Arc<Owner>>,
    /// Listening sockets' inode → cookie, as the last dump found them.
    cookies: HashMap<u32, u64>,
}

impl OwnerIndex {
    pub fn get(&self, id: &ListenerId) -> Option<Arc<Owner>> {
        crate::recover::read(&self.0).owners.get(id).cloned()
    }

    /// The cookie of the socket a kernel key names (`ListenerKey::sock`: a cookie, or an
    /// inode while the socket had none); 0 when the last dump did not know it.
    pub fn cookie(&self, sock: u64) -> u64 {
        if sock & SOCK_INODE == 0 {
            return sock;
        }
        let inode = (sock & !SOCK_INODE) as u32;
        crate::recover::read(&self.0)
            .cookies
            .get(&inode)
            .copied()
            .unwrap_or(0)
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
    /// Container, pod and network namespace names; None leaves them empty.
    names: Option<Arc<Resolver>>,
    /// Sockets whose owner's names are settled (found, known to be unknown, or no container),
    /// skipped by [`Self::name`] until the next scan or for [`names::NETNS_FRESH`]: a scrape
    /// of 10,000 settled listeners then costs a set lookup each.
    settled: HashSet<u32>,
    settled_since: Option<Instant>,
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
        self.settled.clear();
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
        self.lookup(sockets.iter().map(|s| s.1).chain(others.iter().copied()));
        self.name(sockets);
        let by_inode = &self.by_inode;
        let found: HashMap<ListenerId, Arc<Owner>> = sockets
            .iter()
            .filter_map(|(id, inode)| Some((*id, by_inode.get(inode)?.clone())))
            .collect();
        let connections = others
            .iter()
            .filter_map(|inode| Some((*inode, by_inode.get(inode)?.clone())))
            .collect();
        crate::recover::write(&self.index.0).owners = found.clone();
        (found, connections)
    }

    /// Listening sockets' inode → cookie, from the last dump.
    pub fn set_sockets(&mut self, cookies: HashMap<u32, u64>) {
        crate::recover::write(&self.index.0).cookies = cookies;
    }

    /// What the name resolver did so far; None without one.
    pub fn name_counts(&self) -> Option<crate::host::names::NameCounts> {
        self.names.as_ref().map(|n| n.counts())
    }

    /// Names containers, pods and network namespaces from now on.
    pub fn set_names(&mut self, names: Arc<Resolver>) {
        self.names = Some(names);
    }

    /// Fills in the names the resolver knows now (from memory: what it does not know yet is
    /// queued, and named on a later lookup). An owner is copied only when a name changed.
    fn name(&mut self, sockets: &[(ListenerId, u32)]) {
        let Some(names) = &self.names else { return };
        if self
            .settled_since
            .is_none_or(|t| t.elapsed() >= names::NETNS_FRESH)
        {
            self.settled.clear();
            self.settled_since = Some(Instant::now());
        }
        for (id, inode) in sockets {
            if self.settled.contains(inode) {
                continue;
            }
            let Some(o) = self.by_inode.get(inode) else {
                continue;
            };
            let names::Lookup {
                names: found,
                ip,
                settled,
            } = names.lookup(&o.container_id, id.netns);
            if settled {
                self.settled.insert(*inode);
            }
            let n = found.as_deref();
            let field = |f: fn(&super::runtimes::Names) -> &str| n.map_or("", f);
            let (container, pod, pod_namespace) = (
                field(|n| &n.container),
                field(|n| &n.pod),
                field(|n| &n.pod_namespace),
            );
            let netns_name = names.netns_name(id.netns, ip.as_deref(), n);
            // Compared in place: a scrape of 10,000 unchanged listeners allocates nothing.
            if o.container == container
                && o.pod == pod
                && o.pod_namespace == pod_namespace
                && is_joined(&o.netns_name, netns_name)
            {
                continue;
            }
            let named = Owner {
                container: container.to_string(),
                pod: pod.to_string(),
                pod_namespace: pod_namespace.to_string(),
                netns_name: netns_name.concat(),
                ..(**o).clone()
            };
            self.by_inode.insert(*inode, Arc::new(named));
        }
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

/// The listening TCP sockets of the network namespaces `wanted`, as (listener, socket inode),
/// read from `/proc/<pid>/net/tcp` and `tcp6` of one process in each: that needs ptrace access
/// to the process (CAP_SYS_PTRACE), not setns (CAP_SYS_ADMIN), so the owners, and with them
/// the workload names, of listeners in namespaces qtrace cannot enter (pods' own, under the
/// unit's and the DaemonSet's capabilities) are found all the same. At most one process is
/// read per namespace.
pub fn listeners_via_proc(wanted: &HashSet<u32>) -> Vec<(ListenerId, u32)> {
    let mut out = Vec::new();
    let mut done = HashSet::new();
    let Ok(procs) = all_processes() else {
        return out;
    };
    for p in procs.flatten() {
        if done.len() == wanted.len() {
            break;
        }
        let Ok(netns) = std::fs::metadata(format!("/proc/{}/ns/net", p.pid)) else {
            continue;
        };
        let netns = std::os::unix::fs::MetadataExt::ino(&netns) as u32;
        if !wanted.contains(&netns) || done.contains(&netns) {
            continue;
        }
        let (Ok(v4), Ok(v6)) = (p.tcp(), p.tcp6()) else {
            continue;
        };
        done.insert(netns);
        for e in v4.into_iter().chain(v6) {
            if e.state == procfs::net::TcpState::Listen {
                let id = ListenerId {
                    netns,
                    addr: e.local_address.ip(),
                    port: e.local_address.port(),
                    // /proc/net/tcp has no cookie: these listeners' rows are per address,
                    // as are the kernel's entries of a namespace qtrace cannot dump.
                    socket: 0,
                };
                out.push((id, e.inode as u32));
            }
        }
    }
    out
}

/// Whether `s` is `parts` joined.
fn is_joined(s: &str, parts: [&str; 3]) -> bool {
    let mut rest = s;
    for p in parts {
        match rest.strip_prefix(p) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
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
                    ..Owner::default()
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
    fn listening_sockets_of_a_namespace_from_proc() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let own = std::fs::metadata("/proc/self/ns/net").unwrap();
        let netns = std::os::unix::fs::MetadataExt::ino(&own) as u32;
        let found = listeners_via_proc(&HashSet::from([netns]));
        let id = ListenerId {
            netns,
            addr: "127.0.0.1".parse().unwrap(),
            port: l.local_addr().unwrap().port(),
            socket: 0,
        };
        assert!(
            found.contains(&(id, socket_inode(&l))),
            "{id:?} not in {found:?}"
        );
        assert!(listeners_via_proc(&HashSet::from([1])).is_empty());
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

#[cfg(test)]
mod cost {
    use super::*;
    use crate::host::names::{Options, Resolver, Runtimes};

    #[test]
    #[ignore]
    fn naming_ten_thousand_listeners() {
        let dir = std::env::temp_dir().join(format!("qtrace-cost-{}", std::process::id()));
        let ids: Vec<String> = (0..100).map(|i| format!("{i:064x}")).collect();
        for id in &ids {
            let d = dir.join("containers").join(id);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config.v2.json"), r#"{"Name":"/web","Config":{"Labels":{"io.kubernetes.pod.name":"p","io.kubernetes.pod.namespace":"n"}}}"#).unwrap();
        }
        let names = Resolver::start(Options {
            runtimes: Runtimes {
                containerd_socket: None,
                cri_socket: None,
                docker_root: Some(dir.clone()),
                podman_root: None,
            },
            retry: Duration::from_secs(60),
            capacity: 4096,
            netns_dir: dir.join("netns"),
        });
        let mut owners = Owners::default();
        let mut sockets = Vec::new();
        for i in 0..10_000u32 {
            let id = ListenerId {
                netns: 4026532000 + i / 100,
                addr: "10.0.0.1".parse().unwrap(),
                port: (i % 60000) as u16,
                socket: u64::from(i) + 1,
            };
            owners.by_inode.insert(
                i,
                Arc::new(Owner {
                    pid: i as i32,
                    comm: "x".into(),
                    container_id: format!("docker://{}", ids[(i % 100) as usize]),
                    ..Owner::default()
                }),
            );
            sockets.push((id, i));
        }
        owners.looked_for = (0..10_000).collect();
        owners.scanned = Some((Instant::now(), Duration::ZERO));
        owners.set_names(names.clone());
        let t = Instant::now();
        owners.name(&sockets);
        eprintln!("first pass (queues 100 lookups): {:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        owners.name(&sockets);
        eprintln!(
            "second pass (names filled, owners copied): {:?}",
            t.elapsed()
        );
        for _ in 0..3 {
            let t = Instant::now();
            owners.name(&sockets);
            eprintln!("steady pass: {:?}", t.elapsed());
        }
        eprintln!("{:?}", names.counts());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
