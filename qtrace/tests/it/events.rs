//! `qtrace events` against a live daemon: what it prints, its filters, `| head -1`, and a
//! reader that stops reading.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use crate::common::{
    connect, delta, http_get, listener, listener_on, local_ports, overflow_at_syn, require_root,
    sample, wait_until, Netns, Qtrace,
};

/// `qtrace events ARGS` on the daemon's socket, its output read as it comes.
struct Reader {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    out: thread::JoinHandle<()>,
}

impl Reader {
    /// With `--since`, so a reader that subscribes late still gets every event.
    fn start(q: &Qtrace, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qtrace"))
            .args(["events", "--since", "10m", "--socket", &q.events_socket()])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let out = thread::spawn(move || {
            for line in stdout.lines() {
                sink.lock().unwrap().push(line.unwrap());
            }
        });
        Self { child, lines, out }
    }

    /// Waits until it has printed `n` lines containing `what` (it prints as it reads).
    fn wait_for(&self, what: &str, n: u64) {
        let count = || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(what))
                .count()
        };
        let t = std::time::Instant::now();
        if !wait_until(Duration::from_secs(60), || count() as u64 >= n) {
            eprintln!(
                "the reader printed {} of {n} lines with {what} in {:?}",
                count(),
                t.elapsed()
            );
        }
    }

    /// Stops it with SIGINT; everything it printed.
    fn stop(mut self) -> String {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        assert!(self.child.wait().unwrap().success());
        self.out.join().unwrap();
        let lines = self.lines.lock().unwrap();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// Final ACKs dropped for `n` clients: each listener retransmits SYN-ACKs at 1 s and 3 s.
fn half_open(ns: &Netns, port: u16, n: usize) -> Vec<std::net::TcpStream> {
    ns.drop_final_acks(&[port]);
    connect(ns, "127.0.0.1", port, n)
}

#[test]
fn json_and_text_events_name_listener_client_and_owner() {
    require_root();
    let q = Qtrace::start(&[]);
    let ns = Netns::new();
    let (server, port) = listener(&ns, "127.0.0.1", 16);
    // The same port in a namespace of its own: only the netns filter tells the two apart, and
    // each namespace's TcpExt counts its own listener's retransmits alone.
    let other_ns = Netns::new();
    let (_other, _) = listener_on(&other_ns, "127.0.0.1", port, 16);
    let (netns, p) = (ns.inode.to_string(), port.to_string());
    let json = Reader::start(&q, &["--json", "--netns", &netns, "--port", &p]);
    let text = Reader::start(&q, &["--netns", &netns, "--port", &p]);
    let (before, other_before) = (ns.tcp_ext(), other_ns.tcp_ext());
    let clients = half_open(&ns, port, 2);
    // Filtered out by --netns.
    let _noise = half_open(&other_ns, port, 1);
    // Both rounds (1 s and 3 s): the listener's owner is looked up after the first.
    ns.wait_for(&before, "TCPSynRetrans", 4, Duration::from_secs(30));
    other_ns.wait_for(&other_before, "TCPSynRetrans", 1, Duration::from_secs(30));
    drop(server);
    let after = ns.tcp_ext();
    let mine = delta(&before, &after, "TCPSynRetrans");
    json.wait_for("synack_retransmit", mine);
    text.wait_for("SYN-ACK retransmit", mine);
    let json_out = json.stop();
    let text_out = text.stop();
    q.stop(libc::SIGTERM);
    let noise = delta(&other_before, &other_ns.tcp_ext(), "TCPSynRetrans");
    assert!(
        noise >= 1,
        "the other namespace's listener retransmitted nothing"
    );

    let events: Vec<serde_json::Value> = json_out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len() as u64, mine, "{json_out}");
    let ports = local_ports(&clients);
    for e in &events {
        assert_eq!(
            (e["kind"].as_str(), e["netns"].as_u64(), e["lport"].as_u64()),
            (
                Some("synack_retransmit"),
                Some(ns.inode.into()),
                Some(port.into())
            ),
            "{e}"
        );
        assert!(ports.contains(&e["rport"].as_u64().unwrap()), "{e}");
    }
    // The owner is known by the second round of retransmits (first-seen listeners are looked up).
    let last = events.last().unwrap();
    assert_eq!(last["owner"]["pid"], std::process::id(), "{last}");
    let lines: Vec<&str> = text_out.lines().collect();
    assert_eq!(lines.len(), events.len(), "{text_out}");
    assert!(
        lines.iter().all(|l| l.contains("SYN-ACK retransmit #")
            && l.contains(&format!("127.0.0.1:{port} <- 127.0.0.1:"))),
        "{text_out}"
    );
    let comm = &last["owner"]["comm"];
    assert!(
        lines.last().unwrap().ends_with(&format!(
            "{}[{}]",
            comm.as_str().unwrap(),
            std::process::id()
        )),
        "{text_out}"
    );
}

#[test]
fn head_closes_the_pipe_and_events_exits_cleanly() {
    require_root();
    let q = Qtrace::start(&[]);
    let ns = Netns::new();
    let (_server, port) = listener(&ns, "127.0.0.1", 16);
    // --since: the first event counts even if it comes before the reader has subscribed.
    let cmd = format!(
        "set -o pipefail; {} events --since 10m --socket {} | head -1",
        env!("CARGO_BIN_EXE_qtrace"),
        q.events_socket()
    );
    let pipeline = Command::new("bash")
        .args(["-c", &cmd])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _clients = half_open(&ns, port, 3);
    let out = pipeline.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "qtrace events failed behind `head`: {:?}",
        out.status
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    q.stop(libc::SIGTERM);
}

/// `n` connects refused in `ns` (nothing listens on port 1): one `connect_refused` event each.
fn refuse(ns: &Netns, n: u64) {
    ns.run(move || {
        for _ in 0..n {
            std::net::TcpStream::connect(("127.0.0.1", 1)).unwrap_err();
        }
    })
}

/// Refused connects for [`refuse_in_batches`].
const BATCH: u64 = 500;

/// `batches` batches of [`BATCH`] refused connects, each waited for in `live` (which has
/// printed one already) before the next, so it is never more than a batch behind; how many.
fn refuse_in_batches(ns: &Netns, live: &Reader, batches: u64) -> u64 {
    for b in 1..=batches {
        refuse(ns, BATCH);
        live.wait_for("connect_refused", 1 + b * BATCH);
    }
    batches * BATCH
}

/// One reader stops reading: the daemon keeps serving and counting, another reader misses
/// nothing, and the stuck one is told how many events it lost when it reads again.
#[test]
fn a_stuck_reader_costs_nothing_and_learns_what_it_missed() {
    require_root();
    // Every reader's queue holds 4,096 events. The live reader (--netns) is fed batches of
    // 500, each waited for before the next, so it stays far from 4,096 behind however loaded
    // the machine; the stuck one, which asks for every event of the host (other tests'
    // namespaces' too) and reads nothing, falls at least 7,001 behind: more than its queue
    // and its socket hold.
    let q = Qtrace::start(&["--events-reader-queue", "4096", "--event-rate", "100000"]);
    let ns = Netns::new();
    let mut stuck = UnixStream::connect(q.events_socket()).unwrap();
    // since_ns 1: everything since the daemon started, however late it subscribes.
    stuck
        .write_all(b"{\"request\":\"events\",\"since_ns\":1}\n")
        .unwrap();
    let live = Reader::start(&q, &["--json", "--netns", &ns.inode.to_string()]);
    // Once the reader prints one, it is subscribed: the batches reach it live.
    refuse(&ns, 1);
    live.wait_for("connect_refused", 1);
    let sent = 1 + refuse_in_batches(&ns, &live, 14);
    let (status, _) = http_get(&q.web(), "/healthz", None);
    assert_eq!(status, 200, "daemon still serving");
    let live_out = live.stop();
    let gaps: Vec<&str> = live_out.lines().filter(|l| l.contains("\"gap\"")).collect();
    assert!(
        gaps.is_empty(),
        "the reading reader lost events: {gaps:?} ({})",
        q.ready
    );
    assert_eq!(
        live_out.matches("\"connect_refused\"").count() as u64,
        sent,
        "every refused connect, once"
    );

    stuck
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let gap = BufReader::new(&stuck)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("\"gap\""))
        .expect("the stuck reader is told about the gap");
    let v: serde_json::Value = serde_json::from_str(&gap).unwrap();
    let missed = v["missed"].as_u64().unwrap();
    assert!(missed > 0, "{gap}");
    // /metrics counts what readers missed (this one's at least), and the readers connected.
    let metric = |name| {
        let (status, body) = http_get(&q.web(), "/metrics", None);
        assert_eq!(status, 200);
        sample(&body, name, &[]).unwrap_or_else(|| panic!("no {name}")) as u64
    };
    assert!(metric("qtrace_events_reader_missed_total") >= missed);
    // The live reader's process has gone; the daemon lets go of it when it sees the close.
    assert!(
        wait_until(Duration::from_secs(10), || metric("qtrace_events_readers")
            == 1),
        "readers: {} (the stuck one only)",
        metric("qtrace_events_readers")
    );
    q.stop(libc::SIGTERM);
}

/// A reader's queue holds only what its filter admits: a `--netns` reader that stops reading
/// while another namespace makes far more events than its queue holds loses none of its own
/// and is told of no gap. (When readers filtered for themselves, every namespace's events
/// went through every reader's queue, and a burst elsewhere showed as gaps.)
#[test]
fn a_filtered_reader_loses_nothing_to_other_namespaces() {
    require_root();
    let q = Qtrace::start(&["--events-reader-queue", "64", "--event-rate", "100000"]);
    let (mine, other) = (Netns::new(), Netns::new());
    let netns = mine.inode.to_string();
    let (live, stopped) = (
        Reader::start(&q, &["--json", "--netns", &netns]),
        Reader::start(&q, &["--json", "--netns", &netns]),
    );
    refuse(&mine, 1);
    live.wait_for("connect_refused", 1);
    stopped.wait_for("connect_refused", 1);
    unsafe { libc::kill(stopped.child.id() as i32, libc::SIGSTOP) };
    // 2,000 events elsewhere, 500 at a time, each followed by 5 of its own: once the live
    // reader has those, the daemon has taken the 500 before them from the kernel's ring (one
    // ring, read in order), so the ring never holds more than a batch.
    for batch in 1..=4 {
        refuse(&other, 500);
        refuse(&mine, 5);
        live.wait_for("connect_refused", 1 + 5 * batch);
    }
    unsafe { libc::kill(stopped.child.id() as i32, libc::SIGCONT) };
    stopped.wait_for("connect_refused", 21);
    for (who, out) in [("live", live.stop()), ("stopped", stopped.stop())] {
        assert!(
            !out.contains("\"gap\""),
            "the {who} reader was told of a gap:\n{out}"
        );
        assert_eq!(
            out.matches("\"connect_refused\"").count(),
            21,
            "the {who} reader's events:\n{out}"
        );
    }
    q.stop(libc::SIGTERM);
}

/// A `--since` reader whose events the daemon's history (its last 4,096, every namespace's)
/// no longer holds is told how many first: every event of the namespace since the one it
/// asked from is either delivered or counted missing, in JSON and in text.
#[test]
fn a_since_reader_is_told_how_many_of_its_events_were_trimmed() {
    require_root();
    // The live reader's queue as the stuck-reader test's.
    let q = Qtrace::start(&["--events-reader-queue", "4096", "--event-rate", "100000"]);
    let ns = Netns::new();
    let live = Reader::start(&q, &["--json", "--netns", &ns.inode.to_string()]);
    refuse(&ns, 1);
    live.wait_for("connect_refused", 1);
    let first = live.lines.lock().unwrap()[0].clone();
    let since_ns = serde_json::from_str::<serde_json::Value>(&first).unwrap()["ts_ns"]
        .as_u64()
        .unwrap();
    // More than the history holds, from this namespace alone, in batches the kernel's ring
    // and the live reader's queue take whole: none lost on the way, so all are published.
    const SENT: u64 = 1 + 10 * BATCH;
    assert_eq!(1 + refuse_in_batches(&ns, &live, 10), SENT);
    let out = live.stop();
    assert!(!out.contains("\"gap\""), "the live reader fell behind");
    assert_eq!(out.matches("\"connect_refused\"").count() as u64, SENT);

    // Asked with a filter, as `qtrace events --netns` asks: its count is this namespace's.
    let mut since = UnixStream::connect(q.events_socket()).unwrap();
    writeln!(
        since,
        "{{\"request\":\"events\",\"since_ns\":{since_ns},\"filter\":{{\"netns\":{}}}}}",
        ns.inode
    )
    .unwrap();
    since
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let lines: Vec<String> = BufReader::new(&since)
        .lines()
        .map_while(Result::ok)
        .collect();
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["type"], "trimmed", "{}", lines[0]);
    let missed = v["missed"].as_u64().unwrap();
    // A bound only if the host made some 16,000 events meanwhile (the daemon keeps what a
    // filter needs of its last 16,384 trimmed).
    let bound = v["bound"] == true;
    let inode = format!("\"netns\":{},", ns.inode);
    let delivered = lines
        .iter()
        .filter(|l| l.contains(&inode) && l.contains("\"connect_refused\""))
        .count() as u64;
    assert_eq!(
        delivered as usize,
        lines.len() - 1,
        "only this namespace's lines"
    );
    if bound {
        assert!(
            delivered + missed >= SENT,
            "{delivered} delivered, {missed} missing"
        );
    } else {
        assert_eq!(
            delivered + missed,
            SENT,
            "{delivered} delivered, {missed} missing"
        );
    }

    // In text, the first line (the reader's `--since 10m` reaches back past the trimmed).
    let text = Reader::start(&q, &["--netns", &ns.inode.to_string()]);
    text.wait_for("no longer kept", 1);
    let out = text.stop();
    let head = out.lines().next().unwrap_or_default();
    assert!(
        head.starts_with("-- ") && head.contains("earlier events of --since are no longer kept"),
        "{head}"
    );
    q.stop(libc::SIGTERM);
}

#[test]
fn without_a_daemon_it_says_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_qtrace"))
        .args(["events", "--socket", "/nonexistent/qtrace.sock"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("no qtrace daemon at /nonexistent/qtrace.sock")
            && err.contains("--standalone"),
        "{err}"
    );
}

/// The filter travels in the request line, which the daemon reads up to 4,096 bytes: a longer
/// one is refused before anything is sent, saying what to shorten.
#[test]
fn a_filter_too_long_to_send_is_refused() {
    let ports: Vec<String> = (1..=2000).map(|p| format!("--port={p}")).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_qtrace"))
        .args(["events", "--socket", "/nonexistent/qtrace.sock"])
        .args(&ports)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("more than the daemon reads (4096): give fewer --port or --kind values"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// A request the daemon refuses (here a misspelt filter field) is answered with an error line
/// saying why, not a silent close that would look like a daemon that stopped.
#[test]
fn a_refused_request_is_told_why() {
    require_root();
    let q = Qtrace::start(&[]);
    let mut s = UnixStream::connect(q.events_socket()).unwrap();
    s.write_all(b"{\"request\":\"events\",\"filter\":{\"netNS\":1}}\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let lines: Vec<String> = BufReader::new(&s).lines().map_while(Result::ok).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `netNS`"),
        "{v}"
    );
    q.stop(libc::SIGTERM);
}

/// Owners are the daemon's knowledge: a standalone reader filtering by owner would print
/// nothing forever, so it refuses and says why, before loading anything.
#[test]
fn standalone_refuses_owner_filters() {
    let out = Command::new(env!("CARGO_BIN_EXE_qtrace"))
        .args(["events", "--standalone", "--comm", "nginx"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("need the daemon (it knows each listener's owner): drop --standalone,"),
        "{err}"
    );
}

/// Where a probe is missing (here, turned off), the drops no probe classifies reach `qtrace
/// events` too: one `drop_unclassified` line per listener and queue sample, with the count,
/// adding up to the namespace's ListenDrops.
#[test]
fn unclassified_drops_reach_readers_counted() {
    require_root();
    let q = Qtrace::start(&["--probes=-syn", "--queue-sample-interval", "200ms"]);
    let reader = Reader::start(&q, &["--json", "--kind", "drop_unclassified"]);
    let ns = Netns::new();
    let (server, port, drops) = overflow_at_syn(&ns);
    let counted = || counted_in(&reader.lines.lock().unwrap().join("\n"), ns.inode, port);
    wait_until(Duration::from_secs(10), || counted() >= drops);
    drop(server);
    let out = reader.stop();
    assert_eq!(counted_in(&out, ns.inode, port), drops, "{out}");
    for line in out.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(e["kind"], "drop_unclassified", "{e}");
        assert!(e.get("raddr").is_none(), "no client for many drops: {e}");
    }
}

/// The `drops` of the `drop_unclassified` lines of one listener.
fn counted_in(out: &str, netns: u32, port: u16) -> u64 {
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["netns"] == netns && e["lport"] == port)
        .map(|e| e["drops"].as_u64().unwrap())
        .sum()
}
