//! 5: a burst of SYN-ACK retransmit events through `qtrace events --json`.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use qtrace_testkit::Netns;

use super::*;

/// 5: a burst of SYN-ACK retransmit events through `qtrace events --json`.
pub(super) fn event_path(qtrace: &Path, z: &Sizes) -> Result<String> {
    eprintln!("bench: event path");
    let ns = Netns::new("bench-events")?;
    let d = Daemon::start(
        qtrace,
        &["--event-rate", "1000000", "--events-reader-queue", "100000"],
    )?;
    let mut reader = Interrupted(
        Command::new(qtrace)
            .args(["events", "--json", "--socket"])
            .arg(&d.socket)
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let out = BufReader::new(reader.0.stdout.take().unwrap());
    let n = z.burst;
    // Every event's arrival: those after the warm-up are the burst's.
    let counter = thread::spawn(move || {
        out.lines()
            .map_while(Result::ok)
            .filter(|line| line.contains("\"event\""))
            .map(|_| Instant::now())
            .collect::<Vec<_>>()
    });
    // Half-open handshakes (final ACKs dropped): one retransmit event each after 1 s.
    ns.nft("table inet b {\n chain input {\n type filter hook input priority 0\n tcp flags & (syn | ack | fin | rst) == ack drop\n }\n}\n")?;
    let name = ns.name.clone();
    let (warm_tx, warm_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let clients = thread::spawn(move || -> Result<Vec<TcpStream>> {
        Netns::enter(&name)?;
        let l = TcpListener::bind("127.0.0.1:0")?;
        // SAFETY: re-listening with a larger backlog on our socket.
        unsafe { libc::listen(l.as_raw_fd(), 65535) };
        let addr = l.local_addr()?;
        // One half-open handshake first: its retransmit (after 1 s) shows the daemon the new
        // listener, whose owner it then looks up once (a walk of every process's fds in
        // /proc, tens of ms); the burst measures what each event costs. Reset before the
        // burst, so it retransmits no more.
        let first = TcpStream::connect(addr)?;
        thread::sleep(Duration::from_millis(2500));
        abortive_close(&first);
        drop(first);
        warm_tx.send(()).ok();
        go_rx.recv()?;
        let v: Vec<TcpStream> = (0..n)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        thread::sleep(Duration::from_millis(2500));
        drop(l);
        Ok(v)
    });
    warm_rx.recv()?;
    let cpu0 = d.cpu_precise()?;
    let retrans0 = ns.tcp_ext_value("TCPSynRetrans")?;
    let go = Instant::now();
    go_tx.send(()).ok();
    let clients = clients
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let cpu = d.cpu_precise()? - cpu0;
    // The kernel's own count: past somaxconn requests turn into syncookies, not retransmits.
    let happened = ns.tcp_ext_value("TCPSynRetrans")? - retrans0;
    let (_, metrics) = d.get("/metrics")?;
    let (ring_full, limited) = events_lost(&metrics);
    drop(reader); // its output ends: the counter finishes
    let arrivals = counter
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    let burst: Vec<&Instant> = arrivals.iter().filter(|t| **t > go).collect();
    let got = burst.len();
    let spread = match (burst.first(), burst.last()) {
        (Some(f), Some(l)) => l.duration_since(**f).as_secs_f64(),
        _ => 0.0,
    };
    drop(d);
    drop(clients);
    if got == 0 {
        bail!("no events reached `qtrace events`");
    }
    let mut s = String::from("## 5. Event path\n\n");
    let _ = writeln!(s, "{n} handshakes are held half-open (the listener's SYN queue takes up to somaxconn of them, the rest get syncookies); their first SYN-ACK retransmits come together about 1 s later and `qtrace events --json` reads them from the daemon. One half-open handshake before the burst has the daemon look up the listener's owner (once per new listener, a walk of /proc), so the CPU below is what the events cost.\n");
    s += "| figure | value |\n|---|---|\n";
    let _ = writeln!(
        s,
        "| events delivered / SYN-ACK retransmits (kernel) | {got} / {happened} |"
    );
    let _ = writeln!(
        s,
        "| not delivered, counted: ring buffer full / rate-limited | {ring_full} / {limited} |"
    );
    let _ = writeln!(
        s,
        "| delivery rate (first to last event) | {:.0} events/s |",
        got as f64 / spread.max(1e-6)
    );
    let _ = writeln!(
        s,
        "| daemon CPU per delivered event | {:.1} µs |",
        cpu / got as f64 * 1e6
    );
    s.push('\n');
    Ok(s)
}
