//! The daemon end to end: /metrics over HTTP against the kernel's own counters, a real
//! Prometheus server scraping it, nginx as a real victim, the label cap, config reload and
//! signals.

use std::{
    io::Write,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::common::{
    connect, delta, http_get, listener, require_root, sample, sh, wait_until, AckOverflow, Netns,
    Qtrace, TempDir, EXPORTED_METRICS,
};

/// Every family exported is one the deploy files (dashboard, alerts) may rely on.
fn families_are_known(text: &str) {
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split_whitespace().next().unwrap_or("");
        assert!(
            EXPORTED_METRICS.contains(&name),
            "{name} is exported but missing from EXPORTED_METRICS (tests/it/common.rs)"
        );
    }
}

fn promtool_check_metrics(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt package prometheus; `cargo xtask setup` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}\n{text}"
    );
}

#[test]
fn metrics_equal_the_kernel_counters() {
    require_root();
    let qtrace = Qtrace::start(&[]);
    let ns = Netns::new();
    let o = AckOverflow::provoke(&ns, "127.0.0.1");
    let port = o.port;

    let (status, text) = http_get(&qtrace.web(), "/metrics", None);
    assert_eq!(status, 200);
    families_are_known(&text);
    let (netns, port_s) = (ns.inode.to_string(), port.to_string());
    let l = [
        ("netns", netns.as_str()),
        ("addr", "127.0.0.1"),
        ("port", port_s.as_str()),
    ];
    let with = |extra: (&'static str, &'static str)| [l[0], l[1], l[2], extra];
    let ack_drops = sample(
        &text,
        "qtrace_listen_drops_total",
        &with(("reason", "accept_queue_full_ack")),
    );
    assert_eq!(ack_drops, Some(o.overflows() as f64), "{text}");
    let rtx = sample(&text, "qtrace_synack_retransmits_total", &l);
    assert_eq!(
        rtx,
        Some(delta(&o.before, &o.after, "TCPSynRetrans") as f64),
        "{text}"
    );
    // What this kernel's probes cannot see is absent, not 0.
    for (probe, metric, extra) in [
        (
            "syn",
            "qtrace_listen_drops_total",
            Some(("reason", "syn_queue_full")),
        ),
        ("syn", "qtrace_syncookies_sent_total", None),
        ("accept", "qtrace_accepted_connections_total", None),
    ] {
        let v = match extra {
            Some(e) => sample(&text, metric, &with(e)),
            None => sample(&text, metric, &l),
        };
        assert_eq!(
            v.is_some(),
            qtrace.tier(probe).is_some(),
            "{metric} vs probe {probe}: {text}"
        );
    }
    let tier = qtrace.tier("ack").unwrap();
    assert_eq!(
        sample(
            &text,
            "qtrace_probe_info",
            &[("probe", "ack"), ("tier", tier.as_str())]
        ),
        Some(1.0)
    );
    assert!(
        !text.contains("rport") && !text.contains("raddr"),
        "no client endpoint on /metrics"
    );
    promtool_check_metrics(&text);
    let (_, om) = http_get(
        &qtrace.web(),
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert!(om.ends_with("# EOF\n"), "OpenMetrics when asked for it");
    assert_eq!(
        http_get(&qtrace.web(), "/healthz", None),
        (200, "ok\n".to_string())
    );
    qtrace.stop(libc::SIGTERM);
}

/// Queue gauges come from the kernel's own view of the socket (sock_diag), in the test's
/// namespace, and the owner is this test process.
#[test]
fn api_listeners_reports_queues_and_owner() {
    require_root();
    let qtrace = Qtrace::start(&[]);
    let ns = Netns::new();
    let (server, port) = listener(&ns, "127.0.0.1", 3);
    let _queued = connect(&ns, "127.0.0.1", port, 1);
    // Their final ACKs stay dropped: they remain in the SYN queue whatever the timers do.
    ns.drop_final_acks(&[port]);
    let _half_open = connect(&ns, "127.0.0.1", port, 2);
    let mine = || {
        let (status, body) = http_get(&qtrace.web(), "/api/listeners", None);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["netns"] == ns.inode && l["port"] == port)
            .cloned()
            .unwrap_or_else(|| panic!("listener missing: {body}"))
    };
    // Owners of new sockets are looked up by a rate-limited scan of /proc: a listener made a
    // moment ago may not have one yet.
    let mut me = mine();
    wait_until(Duration::from_secs(10), || {
        me = mine();
        !me["owner"].is_null()
    });
    assert_eq!(me["queues"]["accept_len"], 1, "{me}");
    assert_eq!(me["queues"]["accept_limit"], 3, "{me}");
    assert_eq!(me["queues"]["syn_len"], 2, "{me}");
    assert_eq!(me["owner"]["pid"], std::process::id(), "{me}");
    drop(server);
    qtrace.stop(libc::SIGINT);
}

/// Past --max-listener-series, listeners fold into one `other` series; nothing is lost.
#[test]
fn listener_series_are_capped() {
    require_root();
    let ns = Netns::new();
    let netns = ns.inode.to_string();
    let qtrace = Qtrace::start(&["--max-listener-series", "2", "--include-netns", &netns]);
    let servers: Vec<_> = (0..4).map(|_| listener(&ns, "127.0.0.1", 8)).collect();
    let ports: Vec<u16> = servers.iter().map(|s| s.1).collect();
    ns.drop_final_acks(&ports);
    let before = ns.tcp_ext();
    let _clients: Vec<_> = ports
        .iter()
        .map(|p| connect(&ns, "127.0.0.1", *p, 1))
        .collect();
    ns.wait_for(&before, "TCPSynRetrans", 4, Duration::from_secs(30)); // one per client
    drop(servers);
    let after = ns.tcp_ext();
    let (_, text) = http_get(&qtrace.web(), "/metrics", None);
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("qtrace_synack_retransmits_total{"))
        .collect();
    assert_eq!(series.len(), 3, "two listeners and `other`: {series:?}");
    let other = [
        ("netns", "other"),
        ("addr", "other"),
        ("port", "other"),
        ("socket", "other"),
    ];
    assert!(
        sample(&text, "qtrace_synack_retransmits_total", &other).unwrap() >= 2.0,
        "{text}"
    );
    let total: f64 = series
        .iter()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        total,
        delta(&before, &after, "TCPSynRetrans") as f64,
        "{series:?}"
    );
    assert_eq!(
        sample(&text, "qtrace_listener_series_overflow", &[]),
        Some(2.0),
        "{text}"
    );
    qtrace.stop(libc::SIGTERM);
}

/// SIGHUP re-reads the config file: a valid change applies, an invalid one is refused and the
/// daemon keeps running with what it had.
#[test]
fn sighup_reloads_the_config_file() {
    require_root();
    let ns = Netns::new();
    let netns = ns.inode;
    let dir = TempDir::new();
    let path = dir.file("qtrace.toml", &format!("include_netns = [{netns}]\n"));
    let qtrace = Qtrace::start(&["--config", path.to_str().unwrap()]);
    let (_server, port) = listener(&ns, "127.0.0.1", 8);
    let has = |q: &Qtrace| {
        sample(
            &http_get(&q.web(), "/metrics", None).1,
            "qtrace_accept_queue_limit",
            &[("port", &port.to_string())],
        )
        .is_some()
    };
    assert!(
        has(&qtrace),
        "listener exported while its netns is included"
    );
    std::fs::write(&path, format!("exclude_netns = [{netns}]\n")).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(qtrace.pid(), libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while has(&qtrace) {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not apply the new filter"
        );
        thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&path, "exclude_netns = \"all of them\"\n").unwrap();
    unsafe { libc::kill(qtrace.pid(), libc::SIGHUP) };
    // Its refusal says the reload was processed: only after it does "unchanged" mean "kept".
    let refused = "config reload failed, keeping the running settings";
    assert!(
        qtrace.logged(refused, Duration::from_secs(10)),
        "no `{refused}` after a bad reload"
    );
    assert_eq!(
        http_get(&qtrace.web(), "/healthz", None).0,
        200,
        "still serving after a bad reload"
    );
    assert!(!has(&qtrace), "kept the last good settings");
    qtrace.stop(libc::SIGTERM);
}

/// SIGTERM with a scrape in flight (a client stalled halfway through its request): the
/// daemon gives it a moment, then exits 0 within a second rather than wait for it.
#[test]
fn sigterm_stops_within_a_second_with_a_scrape_in_flight() {
    require_root();
    let qtrace = Qtrace::start(&[]);
    let web = qtrace.web();
    assert_eq!(http_get(&web, "/healthz", None).0, 200);
    let mut stalled = std::net::TcpStream::connect(&web).unwrap();
    write!(stalled, "GET /metrics HTTP/1.1\r\nHost: {web}\r\n").unwrap();
    let t = Instant::now();
    qtrace.stop(libc::SIGTERM);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?} to stop");
    // Its connection went with the daemon: end of stream (or a reset), not a hang.
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let read = std::io::Read::read(&mut stalled, &mut [0; 1024]);
    assert!(
        matches!(&read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the stalled scrape's connection is still open: {read:?}"
    );
    assert!(
        std::net::TcpStream::connect(&web).is_err(),
        "still listening after exit"
    );
}

/// A real Prometheus server scrapes the daemon; its query API returns the drop series.
#[test]
fn prometheus_scrapes_the_drop_series() {
    require_root();
    let qtrace = Qtrace::start(&[]);
    let ns = Netns::new();
    let o = AckOverflow::provoke(&ns, "127.0.0.1");
    let port = o.port;
    let dir = TempDir::new();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: qtrace\n    static_configs: [{{targets: ['{}']}}]\n",
            qtrace.web()
        ),
    )
    .unwrap();
    let prom_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (apt package prometheus; `cargo xtask setup` installs it)");
    let query = format!(
        "/api/v1/query?query=qtrace_listen_drops_total%7Bport%3D%22{port}%22%2Creason%3D%22accept_queue_full_ack%22%7D"
    );
    let expected = o.overflows().to_string();
    // Generous: a cold Prometheus among parallel tests on two CPUs has taken over 30 s.
    let deadline = Instant::now() + Duration::from_secs(90);
    let found = loop {
        if let Ok(std::net::TcpStream { .. }) = std::net::TcpStream::connect(&prom_addr) {
            let (_, body) = http_get(&prom_addr, &query, None);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(r) = v["data"]["result"].as_array().and_then(|r| r.first()) {
                break Some(r.clone());
            }
        }
        if Instant::now() > deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(250));
    };
    // What Prometheus made of its target, for a failure's message.
    let targets = match found {
        Some(_) => String::new(),
        None => match qtrace_testkit::scrape::http_get(&prom_addr, "/api/v1/targets", None) {
            Ok((_, body)) => body,
            Err(e) => format!("none: {e:#}"),
        },
    };
    let _ = prom.kill();
    let _ = prom.wait();
    qtrace.stop(libc::SIGTERM);
    let Some(r) = found else {
        let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!(
            "Prometheus never returned the series; its targets: {targets}; its log, last lines first: {tail:#?}"
        );
    };
    assert_eq!(r["metric"]["netns"], ns.inode.to_string(), "{r}");
    assert_eq!(r["value"][1], expected, "{r}");
}

/// nginx with `backlog=1`, stopped (SIGSTOP) so it cannot accept, under `wrk`: the drops are
/// attributed to nginx's port, to the nginx master process and to its cgroup.
#[test]
fn nginx_drops_are_attributed_to_nginx() {
    require_root();
    let qtrace = Qtrace::start(&[]);
    let ns = Netns::new();
    let port = ns.run(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    });
    let dir = TempDir::new();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port} backlog=1; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    // nginx runs in a cgroup named like a systemd unit, which qtrace must report.
    let unit = format!("qtrace-test-nginx-{}.service", std::process::id());
    let cgroup = Cgroup::new(&unit);
    let mut nginx = Command::new("sh")
        .args(["-c", "echo $$ > \"$0\"/cgroup.procs && exec \"$@\""])
        .arg(&cgroup.0)
        .args([
            "ip",
            "netns",
            "exec",
            &ns.name,
            "nginx",
            "-c",
            conf.to_str().unwrap(),
        ])
        .args(["-p", dir.to_str().unwrap()])
        .spawn()
        .expect("nginx (apt package nginx; `cargo xtask setup` installs it)");
    let pid_file = dir.join("nginx.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pid_file.exists() {
        assert!(Instant::now() < deadline, "nginx did not start");
        thread::sleep(Duration::from_millis(50));
    }
    let master: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let before = ns.tcp_ext();
    // Hold the handshakes, stop nginx, release them: the final ACKs meet a full queue.
    ns.drop_final_acks(&[port]);
    unsafe { libc::kill(master, libc::SIGSTOP) };
    sh(Command::new("pkill").args(["-STOP", "-P", &master.to_string()]));
    let mut wrk = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "wrk",
            "-t1",
            "-c10",
            "-d3s",
            "--timeout",
            "5s",
        ])
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("wrk (apt package wrk; `cargo xtask setup` installs it)");
    // All 10 of wrk's connections have their SYN-ACK (or cookie) before their ACKs go through.
    wait_until(Duration::from_secs(10), || connected_to(&ns, port) >= 10);
    ns.allow_acks();
    ns.wait_for(&before, "ListenOverflows", 2, Duration::from_secs(30));
    // The load stops, then nginx accepts again: no handshake is left to overflow the queue, and
    // no new SYN meets it full (a drop at SYN, which kernels without a `syn` tier do not show).
    let _ = wrk.kill();
    let _ = wrk.wait();
    sh(Command::new("pkill").args(["-CONT", "-P", &master.to_string()]));
    unsafe { libc::kill(master, libc::SIGCONT) };
    // The kernel's count read on both sides of the scrape: equal, nothing happened during it.
    let mut scraped = None;
    wait_until(Duration::from_secs(30), || {
        let after = ns.tcp_ext();
        let text = http_get(&qtrace.web(), "/metrics", None).1;
        let quiet = ns.tcp_ext()["ListenOverflows"] == after["ListenOverflows"];
        scraped = Some((after, text));
        quiet
    });
    let (after, text) = scraped.unwrap();
    unsafe { libc::kill(master, libc::SIGQUIT) };
    let _ = nginx.wait();
    qtrace.stop(libc::SIGTERM);

    let netns = ns.inode.to_string();
    let port_s = port.to_string();
    let l = [
        ("netns", netns.as_str()),
        ("addr", "127.0.0.1"),
        ("port", port_s.as_str()),
    ];
    let overflows = delta(&before, &after, "ListenOverflows");
    assert!(
        overflows >= 2,
        "the scenario overflowed nginx's queue {overflows} times"
    );
    let ack = sample(
        &text,
        "qtrace_listen_drops_total",
        &[l[0], l[1], l[2], ("reason", "accept_queue_full_ack")],
    );
    let syn = sample(
        &text,
        "qtrace_listen_drops_total",
        &[l[0], l[1], l[2], ("reason", "accept_queue_full_syn")],
    );
    assert_eq!(
        ack.unwrap() + syn.unwrap_or(0.0),
        overflows as f64,
        "{text}"
    );
    let info = text
        .lines()
        .find(|x| x.starts_with("qtrace_listener_info{") && x.contains(&format!("port=\"{port}\"")))
        .unwrap_or_else(|| panic!("no owner for nginx's listener: {text}"));
    assert!(
        info.contains(&format!("pid=\"{master}\"")) && info.contains("comm=\"nginx\""),
        "{info}"
    );
    assert!(
        info.contains(&format!("unit=\"{unit}\"")),
        "{info}, expected unit {unit}"
    );
    drop(cgroup);
}

/// Client sockets in `ns` connected to `port` (ESTABLISHED on their side, whether or not the
/// server has their final ACK), from its /proc/net/tcp.
fn connected_to(ns: &Netns, port: u16) -> usize {
    let table = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap());
    let remote = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f[2].ends_with(&remote) && f[3] == "01")
        .count()
}

/// A cgroup made for one test (unified hierarchy if mounted, else the v1 memory one).
struct Cgroup(std::path::PathBuf);

impl Cgroup {
    fn new(name: &str) -> Self {
        let root = if std::path::Path::new("/sys/fs/cgroup/cgroup.procs").exists() {
            "/sys/fs/cgroup"
        } else {
            "/sys/fs/cgroup/memory"
        };
        let path = std::path::Path::new(root).join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes left in it go back to the root; then the directory can go.
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            let parent = self.0.parent().unwrap().join("cgroup.procs");
            for pid in procs.lines() {
                let _ = std::fs::write(&parent, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// With kernel.bpf_stats_enabled=1 the daemon exports each attached program's runs and run
/// time; without, it exports none (never zeros for what the kernel does not measure).
#[test]
fn bpf_program_run_time_follows_the_kernel_switch() {
    require_root();
    let q = Qtrace::start(&[]);
    let ns = Netns::new();
    let (server, port) = listener(&ns, "127.0.0.1", 8);
    // Put back however the test ends.
    let stats = qtrace_testkit::BpfStats::save().unwrap();
    stats.set(true).unwrap();
    let before = ns.tcp_ext();
    ns.drop_final_acks(&[port]);
    let _half_open = connect(&ns, "127.0.0.1", port, 1);
    ns.wait_for(&before, "TCPSynRetrans", 1, Duration::from_secs(10));
    let on = http_get(&q.web(), "/metrics", None).1;
    // The kernel's own figure for the program, read after the scrape: at least as large.
    let kernel = qtrace_testkit::bpf_programs_named("qt_synack_tp").unwrap();
    stats.set(false).unwrap();
    let off = http_get(&q.web(), "/metrics", None).1;
    drop(server);
    q.stop(libc::SIGTERM);
    // One entry per qtrace loaded now (tests run in parallel): ours is among them.
    let prog = [("program", "qt_synack_tp")];
    families_are_known(&on);
    let runs = sample(&on, "qtrace_bpf_program_runs_total", &prog).unwrap_or(0.0);
    let secs = sample(&on, "qtrace_bpf_program_run_seconds_total", &prog).unwrap_or(0.0);
    assert!(runs >= 1.0 && secs > 0.0, "{on}");
    assert!(
        kernel.iter().any(|p| {
            p["run_cnt"].as_f64().unwrap_or(0.0) >= runs
                && p["run_time_ns"].as_f64().unwrap_or(0.0) / 1e9 >= secs
        }),
        "runs {runs}, {secs} s: not what the kernel counted: {kernel:?}"
    );
    assert!(!off.contains("qtrace_bpf_program_runs_total"), "{off}");
}

/// `GET path` with `Accept-Encoding: gzip`: the response head and the raw body bytes.
fn get_gzip(addr: &str, path: &str) -> (String, Vec<u8>) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept-Encoding: gzip\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    (head, raw[split + 4..].to_vec())
}

/// The families of an exposition, with their help (the series and values move between two
/// scrapes while other tests run).
fn families(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with('#')).collect()
}

/// `--web.telemetry-path` moves /metrics; a scraper that accepts gzip gets the same
/// exposition gzip-compressed, one that does not gets plain text.
#[test]
fn telemetry_path_and_gzip() {
    require_root();
    let q = Qtrace::start(&["--web.telemetry-path", "/qtrace/metrics"]);
    let web = q.web();
    let (status, plain) = http_get(&web, "/qtrace/metrics", None);
    assert_eq!(status, 200, "{plain}");
    assert!(plain.contains("# TYPE qtrace_build_info"), "{plain}");
    assert_eq!(http_get(&web, "/metrics", None).0, 404);
    let (head, body) = get_gzip(&web, "/qtrace/metrics");
    q.stop(libc::SIGTERM);
    assert!(
        head.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{head}"
    );
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text)
        .expect("a gzip body");
    assert_eq!(families(&text), families(&plain));
    assert!(text.contains("\nqtrace_build_info{"), "{text}");
}
