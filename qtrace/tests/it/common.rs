//! Shared pieces of qtrace's integration tests: network namespaces the test owns, the
//! kernel's own counters inside them as ground truth, nftables rules, and a running qtrace.
//!
//! These tests load real BPF programs and create namespaces, so they need root.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc::{self, Receiver},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use socket2::{Domain, Socket, Type};

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("qtrace's integration tests load BPF programs and create network namespaces: run them as root (`cargo xtask test`)");
    }
}

/// Runs a command to completion; panics with its stderr if it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh path in the temp dir, unique to this test process (nothing is created).
pub fn unique_path(ext: &str) -> std::path::PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("qtrace-test-{}-{n}.{ext}", std::process::id()))
}

/// A directory of this test process in the temp dir, removed with what is in it when dropped,
/// also when the test panics.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = unique_path("d");
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// The file `name` in it, holding `text`.
    pub fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `done` until it holds or `limit` has passed: kernel timers and processes run late on a
/// loaded or emulated machine, so tests wait for what they need, never for a fixed time. Gives
/// up quietly (returning false), for the caller's assertions to say what happened.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A network namespace created for one test and deleted when dropped: the one the
/// benchmarks use too (`qtrace_testkit`), failing as a test does, by panicking.
pub struct Netns(qtrace_testkit::Netns);

impl std::ops::Deref for Netns {
    type Target = qtrace_testkit::Netns;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Netns {
    pub fn new() -> Self {
        Self(qtrace_testkit::Netns::new("test").unwrap())
    }

    /// Whether event `e` happened in this namespace, not in a deleted one whose inode number
    /// the kernel handed on to it (tests running alongside delete theirs).
    pub fn owns(&self, e: &Value) -> bool {
        e["netns"] == self.inode && e["ts_ns"].as_u64().is_some_and(|t| t >= self.born_ns)
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets made there stay in it and
    /// may be used from any thread afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.0.run(f).unwrap()
    }

    /// The namespace's TcpExt counters (`/proc/net/netstat`): exact ground truth for it alone.
    pub fn tcp_ext(&self) -> HashMap<String, u64> {
        self.0.tcp_ext().unwrap()
    }

    /// Waits until TcpExt `counter` has grown by `at_least` since `before`; see `wait_until`.
    pub fn wait_for(
        &self,
        before: &HashMap<String, u64>,
        counter: &str,
        at_least: u64,
        limit: Duration,
    ) {
        wait_until(limit, || {
            delta(before, &self.tcp_ext(), counter) >= at_least
        });
    }

    /// Sets a per-namespace sysctl such as `net.ipv4.tcp_abort_on_overflow`.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.0.sysctl(key, value).unwrap();
    }

    /// Loads an nftables ruleset into this namespace.
    pub fn nft(&self, ruleset: &str) {
        self.0.nft(ruleset).unwrap();
    }

    /// Drops every pure ACK (the handshake's last packet) arriving for `ports` in this
    /// namespace, so their listeners keep retransmitting SYN-ACKs. Undone by `allow_acks`.
    pub fn drop_final_acks(&self, ports: &[u16]) {
        self.drop_final_acks_from(ports, &[]);
    }

    /// [`Self::drop_final_acks`] for the clients bound to `sports` only (all if empty).
    pub fn drop_final_acks_from(&self, ports: &[u16], sports: &[u16]) {
        let set = |ports: &[u16]| {
            let ports: Vec<_> = ports.iter().map(u16::to_string).collect();
            format!("{{ {} }}", ports.join(", "))
        };
        let from = if sports.is_empty() {
            String::new()
        } else {
            format!("tcp sport {} ", set(sports))
        };
        self.nft(&format!(
            "table inet qtrace_test {{\n chain input {{\n type filter hook input priority 0\n \
             tcp dport {} {from}tcp flags & (syn | ack | fin | rst) == ack drop\n }}\n}}\n",
            set(ports)
        ));
    }

    pub fn allow_acks(&self) {
        self.nft("delete table inet qtrace_test");
    }

    /// Counts, from now on, the SYNs (not SYN-ACKs) that reach this namespace's TCP for
    /// `port`: what the listener's `tcp_conn_request()` is given. A client's count of its
    /// connects can be more: a packet may be lost before IP (a full per-CPU backlog of the
    /// loopback device), counted in no namespace's TcpExt. Read with [`Self::syns_counted`].
    pub fn count_syns(&self, port: u16) {
        // An anonymous counter: named ones need nft_objref, a module the guests do not load.
        self.nft(&format!(
            "table inet qtrace_syns {{\n chain input {{\n type filter hook input priority 0\n \
             tcp dport {port} tcp flags & (syn | ack) == syn counter\n }}\n}}\n"
        ));
    }

    /// The SYNs [`Self::count_syns`] has counted.
    pub fn syns_counted(&self) -> u64 {
        let listed = sh(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(["nft", "-j", "list", "chain", "inet", "qtrace_syns", "input"]));
        let v: Value = serde_json::from_str(&listed).unwrap();
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o["rule"]["expr"].as_array())
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64())
            .unwrap_or_else(|| panic!("no SYN counter in {listed}"))
    }
}

/// A listener that never accepts, bound to `ip` on an ephemeral port.
pub fn listener(ns: &Netns, ip: &'static str, backlog: i32) -> (Socket, u16) {
    listener_on(ns, ip, 0, backlog)
}

/// A listener that never accepts, bound to `ip`:`port` (0 for an ephemeral one).
pub fn listener_on(ns: &Netns, ip: &'static str, port: u16, backlog: i32) -> (Socket, u16) {
    ns.run(move || {
        let addr: SocketAddr = format!("{}:{port}", bracket(ip)).parse().unwrap();
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(backlog).unwrap();
        let port = s.local_addr().unwrap().as_socket().unwrap().port();
        (s, port)
    })
}

/// Sets a TCP-level `int` socket option (TCP_DEFER_ACCEPT, TCP_FASTOPEN: none socket2 has).
pub fn set_tcp_option(s: &Socket, option: libc::c_int, value: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "TCP option {option}: {}",
        std::io::Error::last_os_error()
    );
}

pub fn bracket(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// A namespace with the inode number of one deleted before it: namespaces are made, given
/// counts by `leave` (called with the namespace and how many went before it, returning what it
/// left there), and deleted, until the kernel hands one of their inode numbers (freed
/// asynchronously, then handed out lowest first) to a new one. That namespace, and what its
/// predecessor was left.
pub fn netns_reusing_an_inode<T: Copy>(mut leave: impl FnMut(&Netns, usize) -> T) -> (Netns, T) {
    let mut dead = HashMap::new();
    loop {
        let ns = Netns::new();
        if let Some(&old) = dead.get(&ns.inode) {
            return (ns, old);
        }
        assert!(
            dead.len() < 30,
            "the kernel reused no namespace inode number in 30 tries"
        );
        let left = leave(&ns, dead.len());
        dead.insert(ns.inode, left);
        drop(ns);
        thread::sleep(Duration::from_millis(300));
    }
}

/// Connects `n` clients from inside the namespace. Connect returns once the client has the
/// SYN-ACK, whether or not the server ever sees the final ACK.
pub fn connect(ns: &Netns, ip: &'static str, port: u16, n: usize) -> Vec<TcpStream> {
    ns.run(move || {
        let addr: SocketAddr = format!("{}:{port}", bracket(ip)).parse().unwrap();
        (0..n)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap())
            .collect()
    })
}

/// The children in `listener`'s accept queue (on a listener, TCP_INFO's `tcpi_unacked` is its
/// `sk_ack_backlog`).
pub fn accept_queue_len(listener: &Socket) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_unacked
}

/// Connects `n` clients to `listener` one at a time, each once the one before is a child in
/// the accept queue. A client's connect() returns when it has the SYN-ACK; on a machine with
/// more than one CPU the server may not have taken the final ACK yet, and a SYN then finds
/// the request still in a backlog-1 listener's SYN queue ("full": a syncookie, not a queued
/// request).
pub fn connect_queued(
    ns: &Netns,
    listener: &Socket,
    ip: &'static str,
    port: u16,
    n: usize,
) -> Vec<TcpStream> {
    let before = accept_queue_len(listener);
    (0..n as u32)
        .map(|i| {
            let c = connect(ns, ip, port, 1).remove(0);
            assert!(
                wait_until(Duration::from_secs(10), || accept_queue_len(listener)
                    > before + i),
                "connection {i} never reached the accept queue"
            );
            c
        })
        .collect()
}

pub fn local_ports(clients: &[TcpStream]) -> Vec<u64> {
    clients
        .iter()
        .map(|c| c.local_addr().unwrap().port().into())
        .collect()
}

/// Starts `n` connects without waiting for them: for SYNs the listener may drop.
pub fn connect_nonblocking(ns: &Netns, ip: &'static str, port: u16, n: usize) -> Vec<Socket> {
    ns.run(move || {
        let addr: SocketAddr = format!("{}:{port}", bracket(ip)).parse().unwrap();
        (0..n)
            .map(|_| {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
                s.set_nonblocking(true).unwrap();
                match s.connect(&addr.into()) {
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    other => panic!("non-blocking connect to {addr}: {other:?}"),
                }
                s
            })
            .collect()
    })
}

/// `listen(fd, 1)`, never accepting: 2 connections fill the accept queue, 18 more SYNs are
/// dropped at SYN time ("accept queue full"). Returns the listener (kept open: sock_diag must
/// still see it) and the namespace's ListenDrops growth.
pub fn overflow_at_syn(ns: &Netns) -> (Socket, u16, u64) {
    let (server, port) = listener(ns, "127.0.0.1", 1);
    let before = ns.tcp_ext();
    let full = connect_queued(ns, &server, "127.0.0.1", port, 2);
    let clients = connect_nonblocking(ns, "127.0.0.1", port, 18);
    ns.wait_for(&before, "ListenOverflows", 18, Duration::from_secs(10));
    // Closing the clients stops their SYN retries: no drop after the reading below.
    drop(clients);
    let after = ns.tcp_ext();
    drop(full);
    let drops = delta(&before, &after, "ListenDrops");
    assert!(drops >= 18, "the setup dropped only {drops} SYNs");
    (server, port, drops)
}

/// A backlog-1 listener whose final ACKs hit a full accept queue: two handshakes wait on
/// their final ACK (dropped by nftables, by their clients' ports) while two more fill the
/// queue; when the held ACKs come, after a SYN-ACK retransmit once the queue is full, the
/// kernel drops them. The listener closes as
/// soon as the namespace has counted both, before the next retransmit. With the namespace's
/// TcpExt counters around it; the clients stay open until the value is dropped.
pub struct AckOverflow {
    pub port: u16,
    /// The clients whose final ACKs overflowed.
    pub held: Vec<TcpStream>,
    /// The clients in the accept queue.
    _fill: Vec<TcpStream>,
    pub before: HashMap<String, u64>,
    pub after: HashMap<String, u64>,
}

impl AckOverflow {
    pub fn provoke(ns: &Netns, ip: &'static str) -> Self {
        Self::provoke_from(ns, ip, ip)
    }

    /// The listener on `listen_ip`, its clients from `client_ip` (an IPv4 client of a
    /// dual-stack `::` listener).
    pub fn provoke_from(ns: &Netns, listen_ip: &'static str, client_ip: &'static str) -> Self {
        let (server, port) = listener(ns, listen_ip, 1);
        let before = ns.tcp_ext();
        // Only the held clients' ACKs are dropped, so the queue fills before any of theirs
        // passes, however long this takes: when all ACKs were dropped and let through again
        // before the filling connects, a loaded machine once took past the held requests'
        // first SYN-ACK retransmit (1 s), queued the held ones, and the filling connects' SYNs
        // met a full queue.
        const HELD: [u16; 2] = [40_001, 40_002];
        ns.drop_final_acks_from(&[port], &HELD);
        let held = ns.run(move || {
            HELD.into_iter()
                .map(|sport| {
                    let addr: SocketAddr =
                        format!("{}:{port}", bracket(client_ip)).parse().unwrap();
                    let from: SocketAddr =
                        format!("{}:{sport}", bracket(client_ip)).parse().unwrap();
                    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
                    s.bind(&from.into()).unwrap();
                    s.connect_timeout(&addr.into(), Duration::from_secs(5))
                        .unwrap();
                    TcpStream::from(s)
                })
                .collect()
        });
        // backlog 1 holds two children (full means more than the backlog); these complete at once.
        let fill = connect(ns, client_ip, port, 2);
        ns.allow_acks();
        ns.wait_for(&before, "ListenOverflows", 2, Duration::from_secs(20));
        drop(server);
        let after = ns.tcp_ext();
        // Whether the kernel did its part, so a failure says which side missed it.
        let counted = |name| delta(&before, &after, name);
        assert!(
            counted("ListenOverflows") >= 2,
            "the setup did not overflow: ListenOverflows {}, TCPSynRetrans {}, ListenDrops {}",
            counted("ListenOverflows"),
            counted("TCPSynRetrans"),
            counted("ListenDrops")
        );
        Self {
            port,
            held,
            _fill: fill,
            before,
            after,
        }
    }

    /// ListenOverflows at the final ACK, as the namespace counted them; at least the two held.
    pub fn overflows(&self) -> u64 {
        let n = delta(&self.before, &self.after, "ListenOverflows");
        assert!(n >= 2, "the scenario provoked only {n} ACK-time overflows");
        n
    }
}

/// The delta of one TcpExt counter between two readings.
pub fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, name: &str) -> u64 {
    after[name] - before[name]
}

/// A `qtrace run --json` child process and the JSON lines it printed.
pub struct Qtrace {
    child: Child,
    lines: Receiver<Value>,
    /// Its log so far, read as it comes: a test can wait for a line, and a chatty qtrace never
    /// blocks on a full pipe.
    log: Arc<Mutex<String>>,
    log_reader: Option<thread::JoinHandle<()>>,
    /// Its events socket, removed by qtrace when it stops, and by `drop` if it was killed.
    socket: std::path::PathBuf,
    pub ready: Value,
}

/// What qtrace printed from start to exit.
pub struct Output {
    pub ready: Value,
    pub events: Vec<Value>,
    /// The last listener snapshot (`"final": true`).
    pub last: Value,
    pub stderr: String,
    /// Its BPF links and programs just before it was stopped (see `bpf_fds`).
    pub bpf: String,
}

/// The BPF links and programs process `pid` holds, from /proc/PID/fdinfo: what each link
/// is attached to and each program's run and recursion-miss counts. For failure messages:
/// it tells whether the programs were attached and ran.
pub fn bpf_fds(pid: u32) -> String {
    const KEEP: [&str; 6] = [
        "link_type:",
        "tp_name:",
        "prog_id:",
        "run_cnt:",
        "recursion_misses:",
        "attach_type:",
    ];
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return format!("(process {pid} gone)");
    };
    let mut out = Vec::new();
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        if !(target.contains("bpf_link") || target.contains("bpf-prog")) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let fields: Vec<_> = info
            .lines()
            .filter(|l| KEEP.iter().any(|k| l.starts_with(k)))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        out.push(format!("{target} {}", fields.join(", ")));
    }
    out.sort();
    out.join("; ")
}

impl Qtrace {
    /// Starts qtrace and waits until its probes are attached. `QTRACE_TEST_ATTACH` (fentry,
    /// kprobe, tracepoint) caps the tier, so the kernel matrix can test lower tiers too.
    pub fn start(args: &[&str]) -> Self {
        Self::start_wrapped(&[], args)
    }

    /// Started through `wrapper` (a command that ends by exec'ing its arguments, e.g.
    /// `systemd-run --scope …`), which then keeps qtrace's pid.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Self {
        let tier = std::env::var("QTRACE_TEST_ATTACH").unwrap_or_else(|_| "fentry".into());
        let socket = unique_path("sock");
        let qtrace = std::path::Path::new(env!("CARGO_BIN_EXE_qtrace"));
        let direct = qtrace_testkit::daemon_command(qtrace, "1s", &socket);
        let mut command = match wrapper {
            [] => direct,
            [program, rest @ ..] => {
                let mut c = Command::new(program);
                c.args(rest)
                    .arg(direct.get_program())
                    .args(direct.get_args());
                c
            }
        };
        let mut child = command
            .args(["--attach", &tier])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let log_reader = thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in stdout.lines() {
                let line = line.unwrap();
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("qtrace printed a line that is not JSON ({e}): {line}")
                });
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let ready = match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                log_reader.join().unwrap();
                panic!("qtrace did not start: {}", log.lock().unwrap());
            }
        };
        assert_eq!(ready["type"], "ready", "first line: {ready}");
        qtrace_testkit::ready_listen(&ready).unwrap();
        Self {
            child,
            lines,
            log,
            log_reader: Some(log_reader),
            socket,
            ready,
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until qtrace has logged a line containing `text`; whether it did within `limit`.
    pub fn logged(&self, text: &str, limit: Duration) -> bool {
        wait_until(limit, || self.log.lock().unwrap().contains(text))
    }

    /// The tier the named probe got (`None` when unavailable).
    pub fn tier(&self, probe: &str) -> Option<String> {
        qtrace_testkit::probe_tier(&self.ready, probe).unwrap()
    }

    /// Where the named probe's programs are attached (`fentry:FUNC`, `tp_btf:NAME`, …).
    pub fn hooks(&self, probe: &str) -> Vec<String> {
        qtrace_testkit::probe_hooks(&self.ready, probe).unwrap()
    }

    /// Stops qtrace with `signal` and collects everything it printed.
    pub fn stop(mut self, signal: i32) -> Output {
        let bpf = bpf_fds(self.child.id());
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut events = Vec::new();
        let mut last = Value::Null;
        while let Ok(v) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            match v["type"].as_str() {
                Some("event") => events.push(v),
                Some("listeners") if v["final"] == true => last = v,
                _ => {}
            }
        }
        let status = self.child.wait().unwrap();
        self.log_reader.take().unwrap().join().unwrap();
        let stderr = std::mem::take(&mut *self.log.lock().unwrap());
        assert!(status.success(), "qtrace exited with {status}: {stderr}");
        assert!(
            !last.is_null(),
            "qtrace printed no final snapshot: {stderr}"
        );
        Output {
            ready: std::mem::take(&mut self.ready),
            events,
            last,
            stderr,
            bpf,
        }
    }
}

/// A test that fails before `stop` leaves no qtrace running, nor its socket file.
impl Drop for Qtrace {
    fn drop(&mut self) {
        let _ = self.child.kill(); // nothing, once `stop` has reaped it
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Output {
    pub fn tier(&self, probe: &str) -> Option<String> {
        qtrace_testkit::probe_tier(&self.ready, probe).unwrap()
    }

    /// The final snapshot of the listener on (`netns`, `addr`, `port`), if it had any count.
    pub fn listener(&self, netns: &Netns, addr: &str, port: u16) -> Option<&Value> {
        let listeners = self.last["listeners"].as_array().unwrap();
        listeners
            .iter()
            .find(|l| l["netns"] == netns.inode && l["addr"] == addr && l["port"] == port)
    }

    /// The final counters of the listener on (`netns`, `addr`, `port`).
    pub fn counters(&self, netns: &Netns, addr: &str, port: u16) -> &Value {
        self.listener(netns, addr, port)
            .map(|l| &l["counters"])
            .unwrap_or_else(|| {
                panic!(
                    "no listener {addr}:{port} in netns {} in {}",
                    netns.inode, self.last
                )
            })
    }

    /// Events of one kind for one namespace.
    pub fn events_of(&self, netns: &Netns, kind: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| netns.owns(e) && e["kind"] == kind)
            .collect()
    }
}

pub use qtrace_testkit::scrape::sample;

/// A plain HTTP/1.0 GET (the tests need no client library): status and body.
pub fn http_get(addr: &str, path: &str, accept: Option<&str>) -> (u16, String) {
    qtrace_testkit::scrape::http_get(addr, path, accept)
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e:#}"))
}

impl Qtrace {
    /// The daemon's HTTP address (`host:port`), from its ready line.
    pub fn web(&self) -> String {
        qtrace_testkit::ready_listen(&self.ready).unwrap()
    }

    /// The daemon's events socket.
    pub fn events_socket(&self) -> String {
        let args: Vec<String> = std::fs::read_to_string(format!("/proc/{}/cmdline", self.pid()))
            .unwrap()
            .split('\0')
            .map(str::to_string)
            .collect();
        let i = args.iter().position(|a| a == "--events-socket").unwrap();
        args[i + 1].clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

/// Every metric family qtrace exports, as named in the classic text format (README "Metrics").
/// The histogram is named without its `_bucket`/`_sum`/`_count` suffixes. The daemon tests
/// check a real exposition against it; deploy.rs checks dashboards and alerts use only these.
pub const EXPORTED_METRICS: &[&str] = &[
    "qtrace_listen_drops_total",
    "qtrace_synack_retransmits_total",
    "qtrace_syncookies_sent_total",
    "qtrace_overflow_resets_total",
    "qtrace_accepted_connections_total",
    "qtrace_syns_queued_total",
    "qtrace_accept_queue_wait_seconds",
    "qtrace_accept_queue_length",
    "qtrace_accept_queue_limit",
    "qtrace_syn_queue_length",
    "qtrace_syn_queue_limit",
    "qtrace_listener_info",
    "qtrace_events_lost_total",
    "qtrace_kernel_map_full_total",
    "qtrace_kernel_read_errors_total",
    "qtrace_kernel_listener_entries",
    "qtrace_kernel_listener_entries_max",
    "qtrace_kernel_listener_entries_reclaimed_total",
    "qtrace_netns_unreadable",
    "qtrace_container_name_lookups_total",
    "qtrace_container_names_evicted_total",
    "qtrace_container_names_cached",
    "qtrace_netns_listen_drops_unattributed",
    "qtrace_http_connections",
    "qtrace_http_connections_dropped_total",
    "qtrace_events_readers",
    "qtrace_events_reader_missed_total",
    "qtrace_probe_info",
    "qtrace_build_info",
    "qtrace_listener_series_overflow",
    "qtrace_bpf_program_runs_total",
    "qtrace_bpf_program_run_seconds_total",
    "qtrace_bpf_program_recursion_misses_total",
    "qtrace_connect_failures_total",
    "qtrace_syn_retransmits_total",
    "qtrace_connect_port_search_seconds",
    "qtrace_destination_series_overflow",
    "qtrace_tcp_connections",
    "qtrace_tcp_connections_by_port",
    "qtrace_time_wait_limit",
    "qtrace_close_wait_connections",
    "qtrace_close_wait_oldest_seconds",
    "qtrace_ephemeral_ports_available",
    "qtrace_ephemeral_ports_in_use",
];

/// The bytes of a key or value in bpftool's JSON dump (an array of "0x.." strings).
pub fn dump_bytes(v: &Value) -> Vec<u8> {
    v.as_array()
        .expect("an array of bytes")
        .iter()
        .map(|b| u8::from_str_radix(&b.as_str().unwrap()[2..], 16).unwrap())
        .collect()
}

/// bpftool's JSON dump of the daemon `q`'s own map `name` (found among the maps its file
/// descriptors hold). Keys and values are arrays of "0x.." byte strings.
pub fn daemon_map_dump(q: &Qtrace, name: &str) -> Value {
    let ids: Vec<u64> = std::fs::read_dir(format!("/proc/{}/fdinfo", q.pid()))
        .unwrap()
        .filter_map(|f| std::fs::read_to_string(f.ok()?.path()).ok())
        .filter_map(|info| {
            let line = info.lines().find(|l| l.starts_with("map_id:"))?;
            line["map_id:".len()..].trim().parse().ok()
        })
        .collect();
    let json = |args: &[&str]| -> Value {
        let out = Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let maps = json(&["map", "show"]);
    let id = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name && ids.contains(&m["id"].as_u64().unwrap()))
        .unwrap_or_else(|| panic!("the daemon's map {name}"))["id"]
        .to_string();
    json(&["map", "dump", "id", &id])
}
