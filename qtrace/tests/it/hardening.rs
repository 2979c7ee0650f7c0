//! Production hardening (issue 15), against the real daemon: hostile local clients of the HTTP
//! endpoints and of the events socket, and bad inputs. The HTTP load test is the stress
//! stage's (`cargo xtask stress`, ignored otherwise); the others run with the host tests.
//! Figures are printed as `RELIABILITY …` lines (RELIABILITY.md).

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use crate::common::{require_root, sample, wait_until, Qtrace, TempDir};
use socket2::{Domain, Socket, Type};

/// The shipped unit's limits (deploy/systemd/qtrace.service).
const MEMORY_MAX: u64 = 256 << 20;
const TASKS_MAX: u64 = 64;
const NOFILE: u64 = 16384;

fn raise_nofile(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

/// A memory + pids cgroup with the unit's limits, for the daemon: systemd-run's scope where
/// systemd runs, else a child cgroup written by hand (v2, or v1's per-controller hierarchies).
struct Limits {
    wrapper: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Limits {
    fn new() -> Self {
        let name = format!("qtrace-test-{}", std::process::id());
        if Path::new("/run/systemd/system").exists() && which("systemd-run") {
            let wrapper = [
                "systemd-run",
                "--scope",
                "--quiet",
                "-p",
                &format!("MemoryMax={MEMORY_MAX}"),
                "-p",
                &format!("TasksMax={TASKS_MAX}"),
                "--",
            ];
            return Self {
                wrapper: wrapper.map(str::to_string).to_vec(),
                dirs: vec![],
            };
        }
        let root = Path::new("/sys/fs/cgroup");
        let dirs: Vec<(PathBuf, &str, &str)> = if root.join("cgroup.controllers").exists() {
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids");
            let d = root.join(&name);
            vec![(d.clone(), "memory.max", "pids.max")]
        } else {
            vec![
                (root.join("memory").join(&name), "memory.limit_in_bytes", ""),
                (root.join("pids").join(&name), "", "pids.max"),
            ]
        };
        for (dir, mem, pids) in &dirs {
            std::fs::create_dir_all(dir).unwrap();
            if !mem.is_empty() {
                std::fs::write(dir.join(mem), MEMORY_MAX.to_string()).unwrap();
            }
            if !pids.is_empty() {
                std::fs::write(dir.join(pids), TASKS_MAX.to_string()).unwrap();
            }
        }
        let dirs: Vec<PathBuf> = dirs.into_iter().map(|(d, _, _)| d).collect();
        let join: Vec<String> = dirs
            .iter()
            .map(|d| format!("echo $$ > {}/cgroup.procs", d.display()))
            .collect();
        let script = format!("{} && exec \"$0\" \"$@\"", join.join(" && "));
        Self {
            wrapper: vec!["sh".into(), "-c".into(), script],
            dirs,
        }
    }

    fn wrapper(&self) -> Vec<&str> {
        self.wrapper.iter().map(String::as_str).collect()
    }

    /// The cgroup's peak memory, where it says (v1 max_usage_in_bytes, v2 memory.peak).
    fn peak(&self) -> Option<u64> {
        self.dirs.iter().find_map(|d| {
            ["memory.max_usage_in_bytes", "memory.peak"]
                .iter()
                .find_map(|f| std::fs::read_to_string(d.join(f)).ok()?.trim().parse().ok())
        })
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = wait_until(Duration::from_secs(5), || std::fs::remove_dir(d).is_ok());
        }
    }
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// GET over HTTP/1.0: the status (0 for no answer) and how long it took.
fn get(addr: SocketAddr, path: &str) -> (u16, Duration, String) {
    let t = Instant::now();
    let answer = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: qtrace\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })();
    let text = answer.unwrap_or_else(|e| format!("(no answer: {e})"));
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = match text.split_once("\r\n\r\n") {
        Some((_, b)) => b.to_string(),
        None => text,
    };
    (status, t.elapsed(), body)
}

/// 5,000 idle and slowloris connections and 200 concurrent scrapes, with the daemon under the
/// unit's MemoryMax/TasksMax: it stays up, under the memory limit, and answers a scrape in 1 s.
#[test]
#[ignore = "stress stage: cargo xtask stress"]
fn http_load_under_the_units_limits() {
    require_root();
    raise_nofile(NOFILE);
    let limits = Limits::new();
    let q = Qtrace::start_wrapped(&limits.wrapper(), &[]);
    let pid = q.pid();
    let addr: SocketAddr = q.web().parse().unwrap();
    let rss_before = status_kib(pid, "VmRSS:");

    // 2,500 connections that never send a byte, 2,500 that send a header a byte at a time.
    let t = Instant::now();
    let connections: Vec<Socket> = (0..5000)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into()); // EINPROGRESS; SYNs past the backlog retry
            s
        })
        .collect();
    let slow = &connections[2500..];
    for s in slow {
        let _ = (&*s).write(b"GET /metrics HTTP/1.1\r\nHost: qtrace\r\n");
    }
    let connected = t.elapsed();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow: Vec<Socket> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
    // VmHWM includes start-up's peak (parsing the kernel's BTF): RSS is sampled instead.
    let trickle = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut max_rss = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &slow {
                    let _ = (&*s).write(b"X");
                }
                max_rss = max_rss.max(status_kib(pid, "VmRSS:"));
                thread::sleep(Duration::from_millis(250));
            }
            max_rss
        })
    };

    thread::sleep(Duration::from_secs(1));
    let rss_connected = status_kib(pid, "VmRSS:");
    // 200 scrapes at once.
    let start = Arc::new(Barrier::new(200));
    let scrapes: Vec<_> = (0..200)
        .map(|_| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                get(addr, "/metrics")
            })
        })
        .collect();
    let results: Vec<_> = scrapes.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let slowest = results.iter().map(|r| r.1).max().unwrap();

    // Past the header timeout, with every attacking socket still open on this side.
    thread::sleep(Duration::from_secs(6));
    let (status, took, body) = get(addr, "/metrics");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_rss = trickle.join().unwrap();
    let peak = limits.peak();
    let dropped = |reason| {
        sample(
            &body,
            "qtrace_http_connections_dropped_total",
            &[("reason", reason)],
        )
        .unwrap_or(-1.0)
    };
    eprintln!(
        "RELIABILITY http: 5000 connections (2500 idle, 2500 slowloris) opened in {connected:?}; \
         200 concurrent scrapes: {ok} answered 200, slowest {slowest:?}; then a scrape: {status} \
         in {took:?}; dropped over_limit {}, timeout {}; open {}; daemon RSS {rss_before} KiB \
         before, {rss_connected} KiB with the connections, at most {max_rss} KiB under load; cgroup peak {:?} bytes (limit {MEMORY_MAX}, TasksMax {TASKS_MAX})",
        dropped("over_limit"),
        dropped("timeout"),
        sample(&body, "qtrace_http_connections", &[]).unwrap_or(-1.0),
        peak,
    );
    assert!(alive(pid), "qtrace died under load: {}", q.log());
    // The concurrent scrapes are load, not the claim: past the connection limit some are
    // refused (and counted); none may fail otherwise or hang. The claim is the scrape after.
    let refused: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    for r in &refused {
        assert!(
            r.0 == 0 && (r.2.contains("reset") || r.2.contains("refused")),
            "a concurrent scrape failed other than by refusal: {} {:?} {}",
            r.0,
            r.1,
            r.2.chars().take(200).collect::<String>()
        );
    }
    assert!(
        slowest < Duration::from_secs(10),
        "a scrape hung {slowest:?}"
    );
    assert!(
        dropped("over_limit") >= refused.len() as f64,
        "{} scrapes refused, {} counted: {body}",
        refused.len(),
        dropped("over_limit")
    );
    assert!(ok > 0, "no concurrent scrape answered");
    assert_eq!(status, 200, "a scrape under load failed: {}", q.log());
    assert!(
        took < Duration::from_secs(1),
        "a scrape under load took {took:?}"
    );
    assert!(max_rss * 1024 < MEMORY_MAX, "RSS reached {max_rss} KiB");
    assert!(peak.is_none_or(|p| p < MEMORY_MAX), "cgroup peak {peak:?}");
    // The header timeout cut them (fewer than the limit, 4,096 = half of LimitNOFILE, were
    // open at once here; the limit itself: http_limits' unit test).
    assert!(dropped("timeout") >= 1000.0, "{body}");
    assert!(
        dropped("timeout") >= 1.0,
        "slowloris connections were not cut"
    );
    drop(connections);
    let out = q.stop(libc::SIGTERM);
    assert!(
        !out.stderr.contains("panicked"),
        "qtrace panicked: {}",
        out.stderr
    );
}

/// Connections of the daemon's events socket (accepted sockets carry its path).
fn events_connections(socket: &str) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    // The listener is one of the lines; its state is 01 (listening) with flag 00010000.
    table
        .lines()
        .filter(|l| l.ends_with(socket) && !l.contains(" 00010000 "))
        .count()
}

#[test]
fn events_socket_cuts_oversized_and_silent_clients_and_releases_gone_readers() {
    require_root();
    raise_nofile(NOFILE);
    let q = Qtrace::start(&[]);
    let socket = q.events_socket();
    let rss = status_kib(q.pid(), "VmRSS:");

    // 16 MiB of request line with no newline: cut at once, and nothing kept.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let sent = (0..256).try_for_each(|_| s.write_all(&[b'a'; 64 << 10]));
    let mut buf = [0u8; 64];
    let cut = matches!(s.read(&mut buf), Ok(0) | Err(_));
    assert!(sent.is_err() || cut, "an oversized request was read whole");
    let oversized_cut = t.elapsed();
    assert!(oversized_cut < Duration::from_secs(3), "{oversized_cut:?}");
    drop(s);
    let grown = status_kib(q.pid(), "VmRSS:").saturating_sub(rss);
    assert!(grown < 8 << 10, "RSS grew {grown} KiB");

    // 3,000 clients that never send a request: past 1,024 (a quarter of LimitNOFILE) refused at
    // once, the others cut after the request timeout (5 s); the endpoints answer meanwhile.
    let silent: Vec<_> = (0..3000)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let t = Instant::now();
    // What the daemon holds: its fds (the kernel's table also lists those not accepted yet).
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", q.pid()))
            .unwrap()
            .count()
    };
    assert!(wait_until(Duration::from_secs(2), || fds() >= 1000));
    thread::sleep(Duration::from_millis(500));
    let held = fds();
    assert!(
        held <= 1024 + 64,
        "{held} fds held with 3,000 silent clients"
    );
    let (health, _, _) = get(q.web().parse().unwrap(), "/healthz");
    assert_eq!(health, 200);
    assert!(
        wait_until(Duration::from_secs(10), || events_connections(&socket) == 0),
        "{} silent connections still held",
        events_connections(&socket)
    );
    let silent_cut = t.elapsed();
    assert!(
        silent_cut > Duration::from_secs(3),
        "cut after {silent_cut:?}"
    );
    drop(silent);

    // Readers that go away on a quiet host: released within a second.
    let readers: Vec<_> = (0..50)
        .map(|_| {
            let mut r = UnixStream::connect(&socket).unwrap();
            r.write_all(b"{\"request\":\"events\"}\n").unwrap();
            r
        })
        .collect();
    assert!(wait_until(Duration::from_secs(5), || events_connections(
        &socket
    ) >= 50));
    // Still there past the request timeout: they are readers, not silent clients.
    thread::sleep(Duration::from_secs(6));
    assert_eq!(events_connections(&socket), 50);
    drop(readers);
    let t = Instant::now();
    let released = wait_until(Duration::from_secs(1), || events_connections(&socket) == 0);
    eprintln!(
        "RELIABILITY events socket: 16 MiB request cut in {oversized_cut:?} (RSS +{grown} KiB); \
         3000 silent clients: daemon at {held} fds, the rest refused, all cut after {silent_cut:?}; 50 \
         gone readers released in {:?}",
        t.elapsed()
    );
    assert!(
        released,
        "{} gone readers held",
        events_connections(&socket)
    );
    q.stop(libc::SIGTERM);
}

/// `qtrace run` with `args`: its exit status and stderr; fails if it has not exited in 20 s.
fn run_refused(dir: &Path, args: &[&str]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_qtrace"));
    command.args(["run", "--web.listen-address", "127.0.0.1:0"]);
    if !args.contains(&"--events-socket") {
        command.arg("--events-socket").arg(dir.join("events.sock"));
    }
    let mut child = command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(20), || {
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(exited, "qtrace {args:?} did not exit (blocked)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_inputs_are_refused_on_one_line() {
    require_root();
    let dir = TempDir::new();
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let huge_key = dir.file("key.toml", &format!("{} = 1\n", "k".repeat(20 << 20)));
    let huge_value = dir.file(
        "value.toml",
        &format!("event_rate = \"{}\"\n", "v".repeat(20 << 20)),
    );
    let (fifo, dir_s) = (fifo.to_str().unwrap(), dir.to_str().unwrap());
    let cases: [(&[&str], &str); 7] = [
        (&["--config", fifo], "not a regular file (a FIFO)"),
        (
            &["--config", "/dev/zero"],
            "not a regular file (a character device)",
        ),
        (&["--config", dir_s], "not a regular file (a directory)"),
        (&["--config", huge_key.to_str().unwrap()], "larger than"),
        (&["--config", huge_value.to_str().unwrap()], "larger than"),
        (
            &["--btf", "/dev/zero"],
            "not a regular file (a character device)",
        ),
        (&["--btf", fifo], "not a regular file (a FIFO)"),
    ];
    for (args, why) in cases {
        let (code, stderr) = run_refused(&dir, args);
        let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert_eq!(lines.len(), 1, "{args:?}: not one line: {stderr}");
        assert!(
            lines[0].starts_with("qtrace: error: ") && lines[0].contains(why),
            "{args:?}: {}",
            lines[0]
        );
        assert!(lines[0].len() < 1000, "{args:?}: {} bytes", lines[0].len());
    }
    // Within the size bound, a huge key is named but not echoed whole.
    let key = dir.file("key2.toml", &format!("{} = 1\n", "k".repeat(500_000)));
    let (code, stderr) = run_refused(&dir, &["--config", key.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("unknown key") && stderr.len() < 2000,
        "{} bytes",
        stderr.len()
    );
    // A zero interval is refused by the parser, before anything is attached.
    let (code, stderr) = run_refused(&dir, &["--print", "--interval", "0s"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("must be more than 0"), "{stderr}");
    // A regular file where the events socket goes is refused and kept.
    let taken = dir.file("taken", "precious");
    let (code, stderr) = run_refused(&dir, &["--events-socket", taken.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), "precious");
    eprintln!(
        "RELIABILITY bad inputs: FIFO, /dev/zero, a directory, 20 MiB key and value as --config; \
         /dev/zero and a FIFO as --btf; --interval 0s; a regular file as --events-socket: each \
         refused on one line"
    );
}

#[test]
fn a_bad_config_on_sighup_is_one_log_line_and_qtrace_keeps_running() {
    require_root();
    let dir = TempDir::new();
    let config = dir.file("qtrace.toml", "max_listener_series = 10\n");
    let q = Qtrace::start(&["--config", config.to_str().unwrap()]);
    std::fs::write(&config, "event_rate = [\n  1,\n  \"x\n").unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(q.pid(), libc::SIGHUP) };
    assert!(q.logged("config reload failed", Duration::from_secs(10)));
    let log = q.log();
    let lines: Vec<&str> = log.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.contains("config reload failed"))
        .unwrap();
    assert!(lines[i].contains("line"), "{}", lines[i]);
    let next = lines.get(i + 1).copied().unwrap_or("");
    assert!(
        next.is_empty() || !next.starts_with(' ') && !next.starts_with('|'),
        "the reload error spans lines: {log}"
    );
    let (status, _, _) = get(q.web().parse().unwrap(), "/healthz");
    assert_eq!(status, 200);
    q.stop(libc::SIGTERM);
}
