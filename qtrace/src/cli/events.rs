//! `qtrace events`: live drop events from the running daemon's local socket, or from probes
//! of its own with `--standalone`; filtered and printed one per line (or JSON Lines).

use std::{
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use qtrace_common::Event;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    api::{self, EventFilter, Line, Request},
    config::{Settings, SourceArgs},
    daemon::events_socket,
    kernel::{
        decode::{self, Clock},
        ring::EventRing,
        tracer::Tracer,
    },
    listener::ip,
};

#[derive(Clone, Debug, clap::Args)]
pub struct EventsOptions {
    #[command(flatten)]
    pub source: SourceArgs,
    /// JSON Lines (the schema of `qtrace run --print --json` events) instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub filter: EventFilter,
    /// Start with the daemon's recent events of this long ago (e.g. 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
}

/// `--standalone` judges the kernel's event before it builds a record.
impl EventFilter {
    /// The conditions a kernel event can be judged on by itself: `--standalone` builds the
    /// record only for the events that pass (it refuses the owner filters).
    pub fn admits_event(&self, ev: &Event) -> bool {
        let l = &ev.listener;
        self.admits_listener(l.netns, ip(l.family, l.addr), l.port, decode::kind(ev))
    }
}

pub async fn events(opts: EventsOptions) -> Result<()> {
    // Owners come from the daemon's view of the sockets; standalone events carry none.
    if opts.source.standalone && opts.filter.needs_owner() {
        anyhow::bail!(
            "--pid, --comm, --pod, --container and --unit need the daemon (it knows each \
             listener's owner): drop --standalone, or filter by --port/--addr/--netns"
        );
    }
    let settings = opts.source.client.settings()?;
    let mut out = Output {
        json: opts.json,
        buf: Vec::new(),
    };
    let done = if opts.source.standalone {
        standalone(&opts, &mut out, &settings).await
    } else {
        from_daemon(&opts, &mut out, &settings.daemon.events_socket).await
    };
    // A closed stdout (`| head`) is the reader saying it has enough: not an error.
    match done {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Lines are gathered and written together (`flush`): a burst of events is one write to
/// stdout rather than one per line.
struct Output {
    json: bool,
    buf: Vec<u8>,
}

impl Output {
    fn record(&mut self, r: &api::Event) -> Result<()> {
        if self.json {
            serde_json::to_writer(&mut self.buf, r)?;
            writeln!(self.buf)?;
        } else {
            writeln!(self.buf, "{}", to_human(r))?;
        }
        Ok(())
    }

    /// A line that says events are missing, as JSON `line` or as `text`.
    fn missing(&mut self, line: &Line, text: &str) -> Result<()> {
        if self.json {
            serde_json::to_writer(&mut self.buf, line)?;
            writeln!(self.buf)?;
        } else {
            writeln!(self.buf, "-- {text} --")?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            let mut stdout = io::stdout().lock();
            stdout.write_all(&self.buf)?;
            stdout.flush()?;
            self.buf.clear();
        }
        Ok(())
    }
}

async fn from_daemon(opts: &EventsOptions, out: &mut Output, socket: &Path) -> Result<()> {
    let since_ns = match opts.since {
        Some(d) => decode::monotonic_ns()
            .saturating_sub(d.as_nanos() as u64)
            .max(1),
        None => 0,
    };
    // The daemon filters, so this reader's queue and gaps are its own events'; the same
    // filter here again costs little and keeps a daemon that predates it honest.
    let request = Request::Events {
        since_ns,
        filter: opts.filter.clone(),
    };
    let stream = events_socket::request(socket, &request)?;
    // Blocking reads on a helper thread; the signal handlers stay with the runtime.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<String>>(1024);
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            if tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    loop {
        let line = tokio::select! {
            line = rx.recv() => match line {
                Some(Ok(line)) => line,
                Some(Err(e)) => {
                    out.flush()?;
                    return Err(e).context("read from the daemon");
                }
                None => {
                    out.flush()?;
                    anyhow::bail!("the daemon closed the events socket (it stopped)")
                }
            },
            _ = sigint.recv() => return out.flush(),
            _ = sigterm.recv() => return out.flush(),
        };
        let parsed = serde_json::from_str(&line);
        if parsed.is_err() {
            out.flush()?;
        }
        match parsed.context("a line from the daemon")? {
            Line::Event(r) if opts.filter.admits(&r) => out.record(&r)?,
            Line::Event(_) => {}
            Line::Gap { missed } => out.missing(
                &Line::Gap { missed },
                &format!("{missed} events missed: this reader fell behind"),
            )?,
            Line::Trimmed { missed, bound } => out.missing(
                &Line::Trimmed { missed, bound },
                &format!(
                    "{}{missed} earlier events of --since are no longer kept: the daemon keeps \
                     its last {}",
                    if bound { "up to " } else { "" },
                    crate::daemon::events_socket::HISTORY
                ),
            )?,
            Line::Error { message } => {
                out.flush()?;
                anyhow::bail!("the daemon refused the request: {message}")
            }
        }
        // Written when no more lines are waiting: at once when events come one by one.
        if rx.is_empty() {
            out.flush()?;
        }
    }
}

async fn standalone(opts: &EventsOptions, out: &mut Output, settings: &Settings) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tracer = Tracer::start(&settings.tracer)?;
    let mut ring = EventRing::take(&mut tracer.ebpf)?;
    let clock = Clock::new();
    let mut names = decode::ClientNames::default();
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            woke = ring.wait(&mut batch) => {
                woke?;
                // Filtered on the kernel's event: only what passes is made into a record.
                for ev in batch.drain(..).filter(|ev| opts.filter.admits_event(ev)) {
                    out.record(&decode::to_record_named(&ev, &clock, &mut names))?;
                }
                out.flush()?;
            }
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    }
}

/// One line for an operator.
pub fn to_human(r: &api::Event) -> String {
    let what = match r.retransmit {
        Some(n) => format!("{} #{n}", r.kind.describe()),
        None => r.kind.describe().to_string(),
    };
    // The process, and what it belongs to where that says more than its name.
    let owner = r.owner.as_ref().map_or(String::new(), |o| {
        let workload = o.workload();
        if workload == o.comm {
            format!("  {o}")
        } else {
            format!("  {o} in {workload}")
        }
    });
    let netns_name = match r.owner.as_ref().map(|o| o.netns_name.as_str()) {
        Some(n) if !n.is_empty() => format!(" ({n})"),
        _ => String::new(),
    };
    if r.kind.is_client() {
        // A connecting socket and its destination: no listener queues.
        let to = match (r.raddr, r.rport) {
            (Some(a), Some(p)) => SocketAddr::new(a, p).to_string(),
            _ => "?".into(),
        };
        return format!(
            "{} {what:<31} {} -> {to}  netns {}{owner}",
            r.time,
            SocketAddr::new(r.laddr, r.lport),
            r.netns,
        );
    }
    // A client, or for unclassified drops how many there were.
    let from = match (r.raddr, r.rport, r.drops) {
        (Some(a), Some(p), _) => format!("<- {}", SocketAddr::new(a, p)),
        (_, _, Some(n)) => format!("x{n}"),
        _ => "<- ?".into(),
    };
    format!(
        "{} {what:<31} {} {from}  acceptq {}/{} synq {}/{}  netns {}{netns_name}{owner}",
        r.time,
        SocketAddr::new(r.laddr, r.lport),
        r.acceptq_len,
        r.acceptq_max,
        r.synq_len,
        r.synq_max,
        r.netns,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use qtrace_common::EventKind;

    use super::*;
    use crate::{
        api::Owner,
        kernel::decode::{tests::retransmit, to_record},
    };

    #[test]
    fn human_line_reads_like_the_kernel_state() {
        let mut r = to_record(&retransmit(), &Clock::new());
        r.owner = Some(Arc::new(Owner {
            pid: 1234,
            comm: "nginx".into(),
            unit: "nginx.service".into(),
            ..Owner::default()
        }));
        let line = to_human(&r);
        assert!(line.contains("SYN-ACK retransmit #2"), "{line}");
        assert!(line.contains("127.0.0.1:8080 <- 127.0.0.2:40000"), "{line}");
        assert!(line.contains("acceptq 1/1 synq 3/1"), "{line}");
        assert!(line.ends_with("nginx[1234] in nginx.service"), "{line}");
    }

    #[test]
    fn a_client_event_names_its_process_and_destination() {
        let mut ev = retransmit();
        ev.kind = EventKind::ConnectRefused as u8;
        ev.pid = std::process::id();
        ev.listener.port = 40001;
        let r = to_record(&ev, &Clock::new());
        assert_eq!(r.kind.name(), "connect_refused");
        let owner = r.owner.as_ref().expect("the kernel's pid, named");
        assert_eq!(owner.pid, std::process::id() as i32);
        assert!(!owner.comm.is_empty());
        let line = to_human(&r);
        assert!(line.contains("connect refused (ECONNREFUSED)"), "{line}");
        assert!(
            line.contains("127.0.0.1:40001 -> 127.0.0.2:40000"),
            "{line}"
        );
        assert!(!line.contains("acceptq"), "{line}");
    }

    /// Standalone filters the kernel's event, the daemon path its record: the same verdicts.
    #[test]
    fn events_and_their_records_pass_the_same_filters() {
        let ev = retransmit();
        let r = to_record(&ev, &Clock::new());
        let filters = [
            EventFilter::default(),
            EventFilter {
                port: vec![80, 8080],
                ..Default::default()
            },
            EventFilter {
                port: vec![80],
                ..Default::default()
            },
            EventFilter {
                addr: "127.0.0.1".parse().ok(),
                ..Default::default()
            },
            EventFilter {
                addr: "::1".parse().ok(),
                ..Default::default()
            },
            EventFilter {
                kind: vec![EventKind::SynackRetransmit],
                ..Default::default()
            },
            EventFilter {
                kind: vec![EventKind::DropOther],
                ..Default::default()
            },
            EventFilter {
                netns: Some(4026532000),
                ..Default::default()
            },
            EventFilter {
                netns: Some(1),
                ..Default::default()
            },
        ];
        let verdicts: Vec<_> = filters.iter().map(|f| f.admits_event(&ev)).collect();
        assert_eq!(
            verdicts,
            [true, true, false, true, false, true, false, true, false]
        );
        for f in &filters {
            assert_eq!(f.admits(&r), f.admits_event(&ev), "{f:?}");
        }
    }

    #[test]
    fn workload_filters_match_the_owner() {
        let mut r = to_record(&retransmit(), &Clock::new());
        let id = "4f1c0b1e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";
        let f = |pod: Option<&str>, container: Option<&str>, unit: Option<&str>| EventFilter {
            pod: pod.map(Into::into),
            container: container.map(Into::into),
            unit: unit.map(Into::into),
            ..Default::default()
        };
        assert!(!f(Some("checkout-7d9f"), None, None).admits(&r), "no owner");
        r.owner = Some(Arc::new(Owner {
            pid: 7,
            comm: "api".into(),
            unit: String::new(),
            container_id: format!("containerd://{id}"),
            container: "api".into(),
            pod: "checkout-7d9f".into(),
            pod_namespace: "shop".into(),
            netns_name: "shop/checkout-7d9f".into(),
        }));
        for yes in [
            f(Some("checkout-7d9f"), None, None),
            f(Some("shop/checkout-7d9f"), Some("api"), None),
            f(None, Some(&id[..12]), None),
            f(None, Some(&format!("containerd://{id}")), None),
        ] {
            assert!(yes.admits(&r), "{yes:?}");
        }
        for no in [
            f(Some("other/checkout-7d9f"), None, None),
            f(None, Some(&id[..6]), None),
            f(None, Some("web"), None),
            f(None, None, Some("api.service")),
        ] {
            assert!(!no.admits(&r), "{no:?}");
        }
        assert!(
            to_human(&r).ends_with(
                "netns 4026532000 (shop/checkout-7d9f)  api[7] in shop/checkout-7d9f/api"
            ),
            "{}",
            to_human(&r)
        );
    }
}
