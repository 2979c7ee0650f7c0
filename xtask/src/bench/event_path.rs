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
    let counter = thread::spawn(move || {
        let mut got = 0usize;
        let mut first = None;
        let mut last = Instant::now();
        for line in out.lines().map_while(Result::ok) {
            if line.contains("\"event\"") {
                got += 1;
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
            }
        }
        (
            got,
            first.map_or(0.0, |f| last.duration_since(f).as_secs_f64()),
        )
    });
    // Half-open handshakes (final ACKs dropped): one retransmit event each after 1 s.
    ns.nft("table inet b {\n chain input {\n type filter hook input priority 0\n tcp flags & (syn | ack | fin | rst) == ack drop\n }\n}\n")?;
    let name = ns.name.clone();
    let cpu0 = d.cpu_precise()?;
    let retrans0 = ns.tcp_ext_value("TCPSynRetrans")?;
    let clients = thread::spawn(move || -> Result<Vec<TcpStream>> {
        Netns::enter(&name)?;
        let l = TcpListener::bind("127.0.0.1:0")?;
        // SAFETY: re-listening with a larger backlog on our socket.
        unsafe { libc::listen(l.as_raw_fd(), 65535) };
        let addr = l.local_addr()?;
        let v: Vec<TcpStream> = (0..n)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        thread::sleep(Duration::from_millis(2500));
        drop(l);
        Ok(v)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let cpu = d.cpu_precise()? - cpu0;
    // The kernel's own count: past somaxconn requests turn into syncookies, not retransmits.
    let happened = ns.tcp_ext_value("TCPSynRetrans")? - retrans0;
    let (_, metrics) = d.get("/metrics")?;
    let (ring_full, limited) = events_lost(&metrics);
    drop(reader); // its output ends: the counter finishes
    let (got, spread) = counter
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    drop(d);
    drop(clients);
    if got == 0 {
        bail!("no events reached `qtrace events`");
    }
    let mut s = String::from("## 5. Event path\n\n");
    let _ = writeln!(s, "{n} handshakes are held half-open (the listener's SYN queue takes up to somaxconn of them, the rest get syncookies); their first SYN-ACK retransmits come together about 1 s later and `qtrace events --json` reads them from the daemon.\n");
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
