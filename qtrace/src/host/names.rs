//! Names for what qtrace otherwise shows as numbers: a container's name, pod and pod namespace
//! from its runtime ([`super::runtimes`]), and a network namespace's `ip netns` name.
//!
//! [`Resolver`] answers from memory only, so a scrape or an event never waits for a runtime:
//! an id it has not seen is queued for its own thread (at most [`QUEUE`] waiting; more are
//! counted and asked for on the next lookup) and shows up named from a later scrape on. It keeps at most
//! `capacity` containers (the oldest go first, counted), remembers what no runtime knew for
//! `retry` before asking again, and warns about a runtime that fails at most once per
//! [`WARN_EVERY`].

use std::{
    collections::{HashMap, VecDeque},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

pub use super::runtimes::{Names, Runtimes};

/// Lookups waiting for the thread at most.
pub const QUEUE: usize = 256;

/// One warning per runtime this often at most.
pub const WARN_EVERY: Duration = Duration::from_secs(600);

/// Where `ip netns` keeps its names (bind mounts of the namespaces).
pub const NETNS_DIR: &str = "/run/netns";

/// `ip netns` names are read again after this long (a name removed or given to another
/// namespace must not stay), or when a namespace without a name shows up, at most every
/// [`NETNS_RETRY`]; owners named are looked at again after as long.
pub const NETNS_FRESH: Duration = Duration::from_secs(30);
const NETNS_RETRY: Duration = Duration::from_secs(5);

/// Names kept at most in /run/netns (a directory anyone with CAP_SYS_ADMIN can fill).
const MAX_NETNS: usize = 4096;

#[derive(Clone, Debug)]
pub struct Options {
    pub runtimes: Runtimes,
    /// How long a container no runtime knew stays unnamed before it is asked for again.
    pub retry: Duration,
    /// Containers remembered at most.
    pub capacity: usize,
    pub netns_dir: PathBuf,
}

enum Entry {
    Pending,
    Found(Arc<Names>),
    Missing(Instant),
}

enum Request {
    Container(String),
    Netns,
}

#[derive(Default)]
struct Cache {
    containers: HashMap<String, Entry>,
    /// Insertion order, for evicting the oldest.
    order: VecDeque<String>,
    netns: HashMap<u32, Arc<str>>,
    netns_read: Option<Instant>,
    netns_asked: Option<Instant>,
}

/// What the resolver did, for its self metrics.
#[derive(Default)]
pub struct Stats {
    /// Lookups made of a runtime, by outcome.
    pub found: AtomicU64,
    pub not_found: AtomicU64,
    pub failed: AtomicU64,
    /// Ids not queued because [`QUEUE`] lookups were waiting (asked again after `retry`).
    pub queue_full: AtomicU64,
    /// Containers forgotten to stay within `capacity`.
    pub evicted: AtomicU64,
}

/// What [`Resolver::lookup`] knows of a listener's owner now.
pub struct Lookup {
    pub names: Option<Arc<Names>>,
    pub ip: Option<Arc<str>>,
    /// Asking again before the retry interval would give the same answer.
    pub settled: bool,
}

/// [`Stats`] read at one moment, with the containers remembered then.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameCounts {
    pub cached: u64,
    pub found: u64,
    pub not_found: u64,
    pub failed: u64,
    pub queue_full: u64,
    pub evicted: u64,
}

pub struct Resolver {
    cache: Mutex<Cache>,
    tx: mpsc::SyncSender<Request>,
    retry: Duration,
    capacity: usize,
    /// The namespace of qtrace's PID 1 (the host's, with hostPID): named by no container.
    host_netns: Option<u32>,
    pub stats: Stats,
}

impl Resolver {
    /// The resolver and its thread, which ends when the resolver is dropped.
    pub fn start(opts: Options) -> Arc<Self> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let me = Arc::new(Self {
            cache: Mutex::default(),
            tx,
            retry: opts.retry,
            capacity: opts.capacity.max(1),
            host_netns: std::fs::metadata("/proc/1/ns/net")
                .ok()
                .map(|m| m.ino() as u32),
            stats: Stats::default(),
        });
        let weak = Arc::downgrade(&me);
        let spawned = std::thread::Builder::new()
            .name("qtrace-names".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                let mut warned: HashMap<&'static str, Instant> = HashMap::new();
                while let Ok(request) = rx.recv() {
                    let Some(me) = weak.upgrade() else { return };
                    match request {
                        Request::Container(cid) => {
                            let entry = me.resolve(&rt, &opts.runtimes, &cid, &mut warned);
                            if let Some(e) =
                                crate::recover::lock(&me.cache).containers.get_mut(&cid)
                            {
                                *e = entry;
                            }
                        }
                        Request::Netns => {
                            let names = read_netns(&opts.netns_dir);
                            let mut c = crate::recover::lock(&me.cache);
                            c.netns = names;
                            c.netns_read = Some(Instant::now());
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("container names: no thread ({e}); they stay empty");
        }
        me
    }

    fn resolve(
        &self,
        rt: &tokio::runtime::Runtime,
        runtimes: &Runtimes,
        cid: &str,
        warned: &mut HashMap<&'static str, Instant>,
    ) -> Entry {
        let Some((runtime, id)) = cid.split_once("://") else {
            return Entry::Missing(Instant::now());
        };
        let started = Instant::now();
        let result = rt.block_on(runtimes.lookup(runtime, id));
        tracing::debug!(container = cid, took = ?started.elapsed(), found = ?result.as_ref().map(|n| n.is_some()), "container names");
        match result {
            Ok(Some(names)) => {
                self.stats.found.fetch_add(1, Ordering::Relaxed);
                Entry::Found(Arc::new(names))
            }
            Ok(None) => {
                self.stats.not_found.fetch_add(1, Ordering::Relaxed);
                Entry::Missing(Instant::now())
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let key = match runtime {
                    "docker" => "docker",
                    "podman" => "podman",
                    "cri-o" => "cri-o",
                    _ => "containerd",
                };
                if warned.get(key).is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warned.insert(key, Instant::now());
                    tracing::warn!(
                        "container names: {e:#}; names stay empty, asked again after {:?} \
                         (this warning at most every {WARN_EVERY:?})",
                        self.retry
                    );
                }
                Entry::Missing(Instant::now())
            }
        }
    }

    /// The names of container `<runtime>://<id>` if known now; an unknown one is queued.
    #[cfg(test)]
    pub fn container(&self, container_id: &str) -> Option<Arc<Names>> {
        self.container_in(&mut crate::recover::lock(&self.cache), container_id)
    }

    /// The names of container `container_id` and the `ip netns` name of namespace `netns`,
    /// under one lock (a scrape asks this for every listener), and whether that is the answer
    /// until `retry` passes: the container's names found, or known to be unknown, and the
    /// `ip netns` names read.
    pub fn lookup(&self, container_id: &str, netns: u32) -> Lookup {
        let mut c = crate::recover::lock(&self.cache);
        let names = self.container_in(&mut c, container_id);
        let ip = self.netns_in(&mut c, netns);
        let settled = c.netns_read.is_some()
            && (container_id.is_empty()
                || matches!(
                    c.containers.get(container_id),
                    Some(Entry::Found(_) | Entry::Missing(_))
                ));
        Lookup { names, ip, settled }
    }

    fn container_in(&self, c: &mut Cache, container_id: &str) -> Option<Arc<Names>> {
        if container_id.is_empty() {
            return None;
        }
        match c.containers.get(container_id) {
            Some(Entry::Found(n)) => return Some(n.clone()),
            Some(Entry::Pending) => return None,
            Some(Entry::Missing(at)) if at.elapsed() < self.retry => return None,
            Some(Entry::Missing(_)) => {}
            None => {
                while c.order.len() >= self.capacity {
                    if let Some(old) = c.order.pop_front() {
                        c.containers.remove(&old);
                        self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                    }
                }
                c.order.push_back(container_id.to_string());
            }
        }
        match self
            .tx
            .try_send(Request::Container(container_id.to_string()))
        {
            Ok(()) => {
                c.containers
                    .insert(container_id.to_string(), Entry::Pending);
            }
            Err(_) => {
                // Asked again on the next lookup (the next scrape), not after `retry`: a
                // burst of new containers is named a queue's worth per scrape.
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                if !c.containers.contains_key(container_id) {
                    c.order.retain(|id| id != container_id);
                }
            }
        }
        None
    }

    fn netns_in(&self, c: &mut Cache, inode: u32) -> Option<Arc<str>> {
        let name = c.netns.get(&inode).cloned();
        let stale = c.netns_read.is_none_or(|t| t.elapsed() >= NETNS_FRESH);
        let ask =
            (stale || name.is_none()) && c.netns_asked.is_none_or(|t| t.elapsed() >= NETNS_RETRY);
        if ask && self.tx.try_send(Request::Netns).is_ok() {
            c.netns_asked = Some(Instant::now());
        }
        name
    }

    /// The name of namespace `inode` in three parts to join (so that a scrape compares it
    /// without building it): its `ip netns` name `ip`, else (outside the host's namespace)
    /// `<pod_namespace>/<pod>` of the pod, or the name of the container, whose process holds
    /// a socket in it; else empty.
    pub fn netns_name<'a>(
        &self,
        inode: u32,
        ip: Option<&'a str>,
        holder: Option<&'a Names>,
    ) -> [&'a str; 3] {
        if let Some(n) = ip {
            return [n, "", ""];
        }
        match holder {
            Some(h) if Some(inode) != self.host_netns => {
                if !h.pod.is_empty() {
                    [&h.pod_namespace, "/", &h.pod]
                } else {
                    [&h.container, "", ""]
                }
            }
            _ => ["", "", ""],
        }
    }

    /// Containers remembered now (found, pending or unknown).
    pub fn cached(&self) -> usize {
        crate::recover::lock(&self.cache).containers.len()
    }

    /// The counts so far, for the self metrics.
    pub fn counts(&self) -> NameCounts {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NameCounts {
            cached: self.cached() as u64,
            found: n(&self.stats.found),
            not_found: n(&self.stats.not_found),
            failed: n(&self.stats.failed),
            queue_full: n(&self.stats.queue_full),
            evicted: n(&self.stats.evicted),
        }
    }
}

/// `ip netns` names by namespace inode: each entry of `dir` is a bind mount of one.
fn read_netns(dir: &std::path::Path) -> HashMap<u32, Arc<str>> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten().take(MAX_NETNS) {
        // A bind-mounted namespace file is on nsfs; anything else (a plain file left behind
        // by a failed `ip netns add`) names nothing.
        let Ok(m) = std::fs::metadata(e.path()) else {
            continue;
        };
        if m.dev() == std::fs::metadata(dir).map(|d| d.dev()).unwrap_or(0) {
            continue;
        }
        out.insert(m.ino() as u32, e.file_name().to_string_lossy().into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(dir: &std::path::Path, capacity: usize) -> Arc<Resolver> {
        Resolver::start(Options {
            runtimes: Runtimes {
                containerd_socket: None,
                cri_socket: None,
                docker_root: Some(dir.to_path_buf()),
                podman_root: None,
            },
            retry: Duration::from_secs(3600),
            capacity,
            netns_dir: dir.join("netns"),
        })
    }

    fn wait_for(r: &Resolver, cid: &str) -> Option<Arc<Names>> {
        for _ in 0..200 {
            if let Some(n) = r.container(cid) {
                return Some(n);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn answers_from_memory_and_asks_the_runtime_once() {
        let dir = std::env::temp_dir().join(format!("qtrace-names-{}", std::process::id()));
        let id = "ab".repeat(32);
        let d = dir.join("containers").join(&id);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.v2.json"), r#"{"Name":"/web"}"#).unwrap();
        let r = resolver(&dir, 2);
        let cid = format!("docker://{id}");
        assert_eq!(r.container(&cid), None, "the first ask never waits");
        assert_eq!(wait_for(&r, &cid).unwrap().container, "web");
        // Unknown: asked once, then remembered as unknown until the retry interval.
        let unknown = format!("docker://{}", "cd".repeat(32));
        r.container(&unknown);
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..10 {
            assert_eq!(r.container(&unknown), None);
        }
        assert_eq!(r.stats.not_found.load(Ordering::Relaxed), 1);
        assert_eq!(r.stats.found.load(Ordering::Relaxed), 1);
        // Bounded: a third id evicts the oldest.
        r.container(&format!("docker://{}", "ef".repeat(32)));
        assert_eq!(r.cached(), 2);
        assert_eq!(r.stats.evicted.load(Ordering::Relaxed), 1);
        assert_eq!(r.container("not an id"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_netns_is_named_by_its_pod_outside_the_host_namespace_only() {
        let dir = std::env::temp_dir().join(format!("qtrace-names-ns-{}", std::process::id()));
        let r = resolver(&dir, 8);
        let pod = Names {
            container: "api".into(),
            pod: "checkout-7d9f".into(),
            pod_namespace: "shop".into(),
        };
        assert_eq!(
            r.netns_name(1, None, Some(&pod)).concat(),
            "shop/checkout-7d9f"
        );
        assert_eq!(r.netns_name(1, Some("blue"), Some(&pod)).concat(), "blue");
        assert_eq!(r.netns_name(1, None, None).concat(), "");
        if let Some(host) = r.host_netns {
            assert_eq!(r.netns_name(host, None, Some(&pod)).concat(), "");
        }
    }
}
