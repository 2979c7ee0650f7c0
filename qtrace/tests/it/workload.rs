//! Workload identity with real parts: a private containerd (Debian's, with runc) running a
//! container from a root file system made here (busybox, static, alone) with the labels
//! kubelet sets, in the kubelet's cgroupfs layout; qtrace must name its pod, pod namespace and
//! container from containerd's API. A runtime socket that answers garbage, and paths that do
//! not exist, leave the names empty with one warning and qtrace serving. An `ip netns`
//! namespace is named by its name. Native (and dist guest) only: the kernel matrix's guests
//! carry no container runtime.

use std::{
    io::{Read, Write},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{http_get, require_root, sh, wait_until, Qtrace, TempDir};

/// A containerd of the test's own (its root, state and socket in a temp dir), stopped with
/// its containers when dropped.
struct Containerd {
    dir: TempDir,
    daemon: Child,
    containers: Vec<String>,
    /// Each container's pod cgroup directories, one per hierarchy, removed with it.
    pod_cgroups: std::collections::HashMap<String, Vec<PathBuf>>,
}

const NAMESPACE: &str = "k8s.io";

impl Containerd {
    fn start() -> Self {
        let dir = TempDir::new();
        // The CRI plugin is left out: it would want CNI and a sandbox image, and qtrace asks
        // containerd's own Containers service, where kubelet's labels are.
        let config = dir.file(
            "config.toml",
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        );
        let daemon = qtrace_testkit::containerd_command(&dir, &config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .expect("containerd (Debian package containerd; cargo xtask setup installs it)");
        let me = Self {
            dir,
            daemon,
            containers: Vec::new(),
            pod_cgroups: Default::default(),
        };
        assert!(
            wait_until(Duration::from_secs(30), || me.ctr(&["version"]).is_ok()),
            "containerd did not start: {}",
            me.log()
        );
        me
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", NAMESPACE])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs `/bin/busybox httpd -f -p PORT` in a container of its own (own network namespace)
    /// in the kubelet's cgroupfs layout, `kubepods/besteffort/pod<uid>/<id>`, with `labels`;
    /// returns the container id and its process.
    fn run_listener(&mut self, port: u16, labels: &[(&str, &str)]) -> (String, i32) {
        // The image: a root file system holding one static binary and the directories the
        // runtime mounts over.
        let rootfs = self.dir.join(format!("rootfs-{port}"));
        for d in ["bin", "proc", "dev", "sys", "etc", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        let id = random_id();
        let cgroup = format!("kubepods/besteffort/pod{}/{id}", &id[..8]);
        let mut args = vec!["run", "-d", "--cgroup", &cgroup];
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for l in &labels {
            args.extend(["--label", l]);
        }
        let port = port.to_string();
        let rootfs = rootfs.display().to_string();
        args.extend([
            "--rootfs",
            &rootfs,
            &id,
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            &port,
        ]);
        self.ctr(&args)
            .unwrap_or_else(|e| panic!("ctr run: {e}\ncontainerd: {}", self.log()));
        self.containers.push(id.clone());
        let pid = self
            .ctr(&["tasks", "ls"])
            .unwrap()
            .lines()
            .find(|l| l.starts_with(&id))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .expect("the container's task");
        self.pod_cgroups.insert(id.clone(), pod_cgroups(pid));
        (id, pid)
    }

    fn remove(&mut self, id: &str) {
        let _ = self.ctr(&["tasks", "kill", "-s", "KILL", id]);
        wait_until(Duration::from_secs(10), || {
            self.ctr(&["tasks", "delete", id]).is_ok()
        });
        let _ = self.ctr(&["containers", "delete", id]);
        self.containers.retain(|c| c != id);
        // runc removes the container's cgroups, not the pod's it made above them.
        for dir in self.pod_cgroups.remove(id).unwrap_or_default() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.containers.clone() {
            self.remove(&id);
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// The directories of process `pid`'s cgroups' parents (the pod's, above the container's), in
/// each hierarchy it is in: v1's per-controller ones (mounted at /sys/fs/cgroup/<controllers>,
/// `name=systemd` at .../systemd) and v2's (/sys/fs/cgroup, or .../unified in hybrid mode).
fn pod_cgroups(pid: i32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(h), Some(c), Some(p)) => (h, c, p),
            _ => continue,
        };
        let mount = match controllers {
            "" if Path::new("/sys/fs/cgroup/unified").is_dir() => "unified".to_string(),
            "" => String::new(),
            c => c.trim_start_matches("name=").to_string(),
        };
        if let Some(pod) = Path::new(path.trim_start_matches('/')).parent() {
            out.push(Path::new("/sys/fs/cgroup").join(mount).join(pod));
        }
    }
    out
}

/// A container id as runtimes write them: 64 hex digits.
fn random_id() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `qtrace_listener_info` line of the listener on `port` whose container id ends in `id`.
fn info_line(q: &Qtrace, port: u16, id: &str) -> Option<String> {
    let (_, body) = http_get(&q.web(), "/metrics", None);
    body.lines()
        .find(|l| {
            l.starts_with("qtrace_listener_info{")
                && l.contains(&format!("port=\"{port}\""))
                && l.contains(id)
        })
        .map(str::to_string)
}

#[test]
fn containerd_names_the_pod_namespace_and_container_from_kubelets_labels() {
    require_root();
    let mut containerd = Containerd::start();
    let (id, pid) = containerd.run_listener(
        8080,
        &[
            ("io.kubernetes.pod.name", "checkout-7d9f"),
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.kubernetes.container.name", "api"),
            ("io.kubernetes.pod.uid", "0d3c9f"),
        ],
    );
    let socket = containerd.socket().display().to_string();
    let start = Instant::now();
    let q = Qtrace::start(&["--containerd-socket", &socket]);
    let named =
        |q: &Qtrace| info_line(q, 8080, &id).filter(|l| l.contains("pod=\"checkout-7d9f\""));
    assert!(
        wait_until(Duration::from_secs(30), || named(&q).is_some()),
        "no named listener_info for container {id}: {:?}\nqtrace: {}",
        info_line(&q, 8080, &id),
        q.log()
    );
    eprintln!(
        "WORKLOAD named {:.2?} after qtrace started (scrapes every 1 s)",
        start.elapsed()
    );
    let line = named(&q).unwrap();
    let netns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let netns = netns.to_string_lossy();
    let netns = netns.trim_start_matches("net:[").trim_end_matches(']');
    for want in [
        format!("netns=\"{netns}\""),
        format!("container_id=\"kubepods://{id}\""),
        "container=\"api\"".into(),
        "pod=\"checkout-7d9f\"".into(),
        "pod_namespace=\"shop\"".into(),
        // The pod's own network namespace is named after it.
        "netns_name=\"shop/checkout-7d9f\"".into(),
        "comm=\"busybox\"".into(),
    ] {
        assert!(line.contains(&want), "{want} not in {line}");
    }
    // /api/listeners, `top` and the events filters see the same owner.
    let (_, api) = http_get(&q.web(), "/api/listeners", None);
    let api: serde_json::Value = serde_json::from_str(&api).unwrap();
    let owner = api["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| {
            l["port"] == 8080
                && l["netns"].as_u64().map(|n| n.to_string()).as_deref() == Some(netns)
        })
        .map(|l| l["owner"].clone())
        .unwrap_or_else(|| panic!("no listener :8080 in {api}"));
    assert_eq!(owner["pod"], "checkout-7d9f", "{owner}");
    assert_eq!(owner["pod_namespace"], "shop", "{owner}");
    assert_eq!(owner["container"], "api", "{owner}");
    let qtrace = Path::new(env!("CARGO_BIN_EXE_qtrace"));
    let top = sh(Command::new(qtrace)
        .args(["top", "--once", "--interval", "1s", "--socket"])
        .arg(q.events_socket()));
    assert!(
        top.lines()
            .any(|l| l.contains(":8080") && l.contains("shop/checkout-7d9f/api")),
        "top shows the workload: {top}"
    );
    // The container goes away: its listener with it, and qtrace serves on.
    containerd.remove(&id);
    assert!(
        wait_until(Duration::from_secs(20), || info_line(&q, 8080, &id)
            .is_none()),
        "the removed container's listener stays: {:?}",
        info_line(&q, 8080, &id)
    );
    let out = q.stop(libc::SIGTERM);
    assert!(
        !out.stderr.contains("container names:"),
        "no runtime warning: {}",
        out.stderr
    );
}

/// A "runtime" that accepts and answers garbage: not HTTP/2, not gRPC.
fn garbage_socket(path: &Path) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut s) = stream else { return };
            let _ = s.write_all(b"HTTP/1.1 418 I'm a teapot\r\n\r\n\x00\xff garbage");
        }
    })
}

#[test]
fn a_runtime_that_answers_garbage_or_is_missing_leaves_names_empty_with_one_warning() {
    require_root();
    let mut containerd = Containerd::start();
    let (id, _) = containerd.run_listener(8081, &[("io.kubernetes.pod.name", "web-1")]);
    let garbage = containerd.dir.join("garbage.sock");
    let _server = garbage_socket(&garbage);
    let q = Qtrace::start(&[
        "--containerd-socket",
        &garbage.display().to_string(),
        "--docker-root",
        "/nonexistent/qtrace-test/docker",
        "--container-names-retry",
        "1s",
    ]);
    assert!(
        q.logged(
            "container runtime path /nonexistent/qtrace-test/docker does not exist",
            Duration::from_secs(10)
        ),
        "{}",
        q.log()
    );
    assert!(
        q.logged(
            &format!("container names: containerd at {}", garbage.display()),
            Duration::from_secs(30)
        ),
        "{}",
        q.log()
    );
    // Retried every second, warned about once; the listener is exported, its names empty.
    std::thread::sleep(Duration::from_secs(4));
    let line = info_line(&q, 8081, &id).expect("the listener is exported");
    assert!(line.contains("pod=\"\""), "{line}");
    assert!(
        line.contains(&format!("container_id=\"kubepods://{id}\"")),
        "{line}"
    );
    let out = q.stop(libc::SIGTERM);
    assert_eq!(
        out.stderr.matches("container names: containerd at").count(),
        1,
        "one warning: {}",
        out.stderr
    );
}

#[test]
fn an_ip_netns_namespace_is_named() {
    require_root();
    let name = format!("qtrace-test-{}", std::process::id());
    sh(Command::new("ip").args(["netns", "add", &name]));
    struct Cleanup(String, Option<Child>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(c) = &mut self.1 {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let mut cleanup = Cleanup(name.clone(), None);
    cleanup.1 = Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                "/bin/busybox",
                "httpd",
                "-f",
                "-p",
                "9000",
            ])
            .spawn()
            .unwrap(),
    );
    let inode = std::fs::metadata(format!("/run/netns/{name}")).unwrap();
    let inode = std::os::unix::fs::MetadataExt::ino(&inode);
    let q = Qtrace::start(&[]);
    let named = || {
        let (_, body) = http_get(&q.web(), "/metrics", None);
        body.lines()
            .find(|l| {
                l.starts_with("qtrace_listener_info{")
                    && l.contains(&format!("netns=\"{inode}\""))
                    && l.contains("port=\"9000\"")
            })
            .map(str::to_string)
    };
    assert!(
        wait_until(Duration::from_secs(30), || named()
            .is_some_and(|l| l.contains(&format!("netns_name=\"{name}\"")))),
        "{:?}\n{}",
        named(),
        q.log()
    );
    q.stop(libc::SIGTERM);
}

/// The DaemonSet's and the unit's capabilities: no CAP_SYS_ADMIN, so qtrace cannot enter the
/// pod's network namespace to sample its queues; the listener's counters still come from the
/// kernel, and its owner and names from /proc/<pid>/net/tcp. Its events carry the names, and
/// `qtrace events --pod` selects them.
#[test]
fn a_pods_listener_is_named_without_cap_sys_admin() {
    require_root();
    let mut containerd = Containerd::start();
    let (id, pid) = containerd.run_listener(
        8082,
        &[
            ("io.kubernetes.pod.name", "web-2"),
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.kubernetes.container.name", "nginx"),
        ],
    );
    // Final ACKs dropped in the pod's namespace: the listener retransmits SYN-ACKs, which
    // qtrace counts at every tier.
    let mut nft = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin
        .take()
        .unwrap()
        .write_all(
            b"table inet qtrace_test {\n chain input {\n type filter hook input priority 0\n \
              tcp dport 8082 tcp flags & (syn | ack | fin | rst) == ack drop\n }\n}\n",
        )
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft in the pod's namespace");
    let socket = containerd.socket().display().to_string();
    let q = Qtrace::start_wrapped(
        &[
            "setpriv",
            "--bounding-set=-sys_admin",
            "--inh-caps=-sys_admin",
            "--",
        ],
        &["--containerd-socket", &socket],
    );
    // Clients in the pod's namespace, held open while the SYN-ACKs are retransmitted.
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    let clients = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: a namespace fd we hold; this thread is the only one that moves.
        assert_eq!(
            unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let held: Vec<_> = (0..3)
            .filter_map(|_| std::net::TcpStream::connect("127.0.0.1:8082").ok())
            .collect();
        // SYN-ACKs are retransmitted 1, 3, 7 and 15 s after the SYN: events for a while.
        std::thread::sleep(Duration::from_secs(20));
        held.len()
    });
    let named = || info_line(&q, 8082, &id).filter(|l| l.contains("pod=\"web-2\""));
    assert!(
        wait_until(Duration::from_secs(30), || named().is_some()),
        "{:?}\n{}",
        info_line(&q, 8082, &id),
        q.log()
    );
    let line = named().unwrap();
    for want in [
        "pod_namespace=\"shop\"",
        "container=\"nginx\"",
        "netns_name=\"shop/web-2\"",
    ] {
        assert!(line.contains(want), "{want} not in {line}");
    }
    // `qtrace events --pod` picks the pod's events, which name it (the daemon's owner index
    // has the names from the scrape above on).
    let mut reader = Command::new(env!("CARGO_BIN_EXE_qtrace"))
        .args(["events", "--json", "--pod", "shop/web-2", "--socket"])
        .arg(q.events_socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(reader.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let event = rx.recv_timeout(Duration::from_secs(25));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(reader.id() as i32, libc::SIGINT) };
    let _ = reader.wait();
    let event = event.expect("no event of pod shop/web-2 within 25 s");
    for want in [
        "\"kind\":\"synack_retransmit\"",
        "\"pod\":\"web-2\"",
        "\"pod_namespace\":\"shop\"",
        "\"container\":\"nginx\"",
        "\"netns_name\":\"shop/web-2\"",
    ] {
        assert!(event.contains(want), "{want} not in {event}");
    }
    let (_, body) = http_get(&q.web(), "/metrics", None);
    let unreadable = crate::common::sample(&body, "qtrace_netns_unreadable", &[]);
    assert!(
        unreadable.is_some_and(|n| n >= 1.0),
        "qtrace entered the pod's namespace after all: {unreadable:?}"
    );
    assert_eq!(clients.join().unwrap(), 3);
    q.stop(libc::SIGTERM);
}
