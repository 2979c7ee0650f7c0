//! `qtrace top`: a live per-listener table — queue fill, drops/s by reason, SYN-ACK
//! retransmits/s, accept wait — from the daemon (or probes of its own with --standalone).

use std::{
    collections::HashMap,
    io::{self, IsTerminal, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;
use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEvent, KeyModifiers},
    execute, queue,
    terminal::{self, ClearType},
};
use qtrace_common::{vocabulary::UNCLASSIFIED, ClientCounter, ConnectFailure, Counter, DropReason};

use crate::{
    api::{AcceptWait, Counters, Destination, Listeners},
    config::SourceArgs,
    daemon::{collect::Collector, events_socket, state},
    kernel::tracer::Tracer,
};

#[derive(Clone, Debug, clap::Args)]
pub struct TopOptions {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Print one table (rates over --interval) as plain text and exit.
    #[arg(long)]
    pub once: bool,
    /// Refresh interval, and the window rates are measured over.
    #[arg(long, default_value = "1s", value_parser = crate::inputs::positive_duration)]
    pub interval: Duration,
    /// Column to sort by, highest first (keys in the live view: `s` next column, `r` reverse).
    #[arg(long, value_enum, default_value = "drops")]
    pub sort: SortBy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    Drops,
    Fill,
    Retransmits,
    Cookies,
    Wait,
    Listener,
}

impl SortBy {
    const ALL: [SortBy; 6] = [
        Self::Drops,
        Self::Fill,
        Self::Retransmits,
        Self::Cookies,
        Self::Wait,
        Self::Listener,
    ];

    fn next(self) -> Self {
        let i = Self::ALL.iter().position(|s| *s == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }
}

/// Where snapshots come from.
enum Source {
    Daemon(PathBuf),
    /// The tracer is held only to keep the probes attached.
    Local(Box<Collector>, #[allow(dead_code)] Tracer),
}

impl Source {
    fn snapshot(&self) -> Result<Listeners> {
        match self {
            Source::Daemon(socket) => events_socket::listeners_snapshot(socket),
            Source::Local(collector, _) => {
                Ok(state::snapshot(collector, &collector.collect()?, None))
            }
        }
    }
}

/// One table row: a listener's state now and its rates over the last interval.
#[derive(Debug, Clone)]
pub struct Row {
    pub listener: String,
    pub owner: String,
    /// `<pod_namespace>/<pod>/<container>`, else the container, unit or command name.
    pub workload: String,
    pub acceptq: Option<(u32, u32)>,
    pub synq: Option<u32>,
    /// Per second, by reason; None where qtrace cannot see it.
    pub drops: [Option<f64>; 4],
    /// Per second, drops no probe classified; None where every reason has a probe.
    pub unclassified: Option<f64>,
    pub retransmits: Option<f64>,
    pub cookies: Option<f64>,
    /// Accept-queue wait quantiles over the interval, seconds.
    pub wait: Option<(f64, f64)>,
}

impl Row {
    fn drops_total(&self) -> f64 {
        self.drops.iter().flatten().sum::<f64>() + self.unclassified.unwrap_or(0.0)
    }

    fn fill(&self) -> f64 {
        self.acceptq.map_or(0.0, |(len, max)| {
            if max == 0 {
                0.0
            } else {
                len as f64 / max as f64
            }
        })
    }

    fn key(&self, by: SortBy) -> f64 {
        match by {
            SortBy::Drops => self.drops_total(),
            SortBy::Fill => self.fill(),
            SortBy::Retransmits => self.retransmits.unwrap_or(0.0),
            SortBy::Cookies => self.cookies.unwrap_or(0.0),
            SortBy::Wait => self.wait.map_or(0.0, |w| w.1),
            SortBy::Listener => 0.0,
        }
    }
}

/// Rows from two snapshots `secs` apart. The sockets of a SO_REUSEPORT group are a row each,
/// marked `[i/n]` (by cookie), so one full socket among idle siblings stands out.
pub fn rows(prev: &Listeners, cur: &Listeners, secs: f64) -> Vec<Row> {
    let before = prev.by_id();
    let mut groups: HashMap<_, Vec<u64>> = HashMap::new();
    for l in &cur.listeners {
        groups.entry(l.id().address()).or_default().push(l.socket);
    }
    for sockets in groups.values_mut() {
        sockets.sort_unstable();
    }
    let name = |l: &crate::api::Listener| {
        let id = l.id();
        match groups.get(&id.address()).map(Vec::as_slice) {
            Some(group @ [_, _, ..]) => {
                let i = group.iter().position(|s| *s == l.socket).unwrap_or(0);
                format!("{} [{}/{}]", id.endpoint(), i + 1, group.len())
            }
            _ => id.endpoint(),
        }
    };
    cur.listeners
        .iter()
        .map(|l| {
            let p = before.get(&l.id()).copied();
            let per_second = |get: &dyn Fn(&Counters) -> Option<u64>| {
                let now = get(&l.counters)?;
                let then = p.and_then(|p| get(&p.counters)).unwrap_or(0);
                Some(now.saturating_sub(then) as f64 / secs)
            };
            let rate = |c: Counter| per_second(&|cs| cs.get(c));
            Row {
                listener: name(l),
                owner: l.owner.as_ref().map_or(String::new(), |o| o.to_string()),
                workload: l.owner.as_ref().map_or(String::new(), |o| o.workload()),
                acceptq: l.queues.map(|q| (q.accept_len, q.accept_limit)),
                synq: l.queues.map(|q| q.syn_len),
                drops: DropReason::ALL.map(|r| rate(r.counter())),
                unclassified: per_second(&|cs| cs.unclassified),
                retransmits: rate(Counter::SynackRetransmits),
                cookies: rate(Counter::SyncookiesSent),
                wait: wait_quantiles(
                    p.and_then(|p| p.accept_wait.as_ref()),
                    l.accept_wait.as_ref(),
                ),
            }
        })
        .collect()
}

/// p50 and p99 of the waits observed between two cumulative histograms (upper bounds).
fn wait_quantiles(prev: Option<&AcceptWait>, cur: Option<&AcceptWait>) -> Option<(f64, f64)> {
    let (c, p) = (&cur?.buckets, prev.map_or(&[][..], |p| &p.buckets[..]));
    let delta: Vec<(f64, u64)> = c
        .iter()
        .enumerate()
        .map(|(i, (le, n))| (*le, n.saturating_sub(p.get(i).map_or(0, |x| x.1))))
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let q = |f: f64| {
        delta
            .iter()
            .find(|(_, n)| *n as f64 >= f * total as f64)
            .map_or(f64::INFINITY, |b| b.0)
    };
    Some((q(0.5), q(0.99)))
}

fn rate(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |r| format!("{r:.1}"))
}

fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.1}s")
    } else {
        format!("{:.1}ms", s * 1e3)
    }
}

/// The drop columns' titles: one per reason, and unclassified drops where a probe is missing.
fn drop_titles(with_unclassified: bool) -> Vec<&'static str> {
    let mut titles: Vec<_> = DropReason::ALL.map(DropReason::title).to_vec();
    if with_unclassified {
        titles.push(UNCLASSIFIED.title);
    }
    titles
}

/// The WORKLOAD column's width: a namespace, pod and container name are often longer, and
/// keep their start (the namespace and the pod's name) in it.
const WORKLOAD_WIDTH: usize = 28;

/// `s` cut to `width` characters, the cut marked with `..`.
fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width - 2).collect();
    out.push_str("..");
    out
}

/// One line of the table; a drop column is as wide as its title.
fn line(head: [&str; 6], drops: &[(&str, &str)], tail: [&str; 4]) -> String {
    let [listener, owner, workload, accq, fill, synq] = head;
    let workload = clip(workload, WORKLOAD_WIDTH);
    let mut s = format!(
        "{listener:<26} {owner:<18} {workload:<w$} {accq:>11} {fill:>5} {synq:>6}",
        w = WORKLOAD_WIDTH
    );
    for (title, v) in drops {
        s += &format!(" {v:>w$}", w = title.len());
    }
    let [rtx, cookies, p50, p99] = tail;
    s += &format!(" {rtx:>8} {cookies:>8} {p50:>9} {p99:>9}\n");
    s
}

/// The table, sorted; `reverse` flips the order.
pub fn render(mut rows: Vec<Row>, by: SortBy, reverse: bool) -> String {
    rows.sort_by(|a, b| match by {
        SortBy::Listener => a.listener.cmp(&b.listener),
        _ => b
            .key(by)
            .total_cmp(&a.key(by))
            .then(b.fill().total_cmp(&a.fill())),
    });
    if reverse {
        rows.reverse();
    }
    // The unclassified column exists where the daemon reports such drops (a probe missing).
    let titles = drop_titles(rows.iter().any(|r| r.unclassified.is_some()));
    let header: Vec<_> = titles.iter().map(|t| (*t, *t)).collect();
    let mut s = line(
        ["LISTENER", "OWNER", "WORKLOAD", "ACCEPTQ", "FILL%", "SYNQ"],
        &header,
        ["RTX/s", "COOKIE/s", "WAIT-P50", "WAIT-P99"],
    );
    for r in rows {
        let accq = r.acceptq.map_or("-".into(), |(l, m)| format!("{l}/{m}"));
        let fill = r
            .acceptq
            .map_or("-".into(), |_| format!("{:.0}", r.fill() * 100.0));
        let synq = r.synq.map_or("-".into(), |q| q.to_string());
        let (p50, p99) = r
            .wait
            .map_or(("-".into(), "-".into()), |(a, b)| (seconds(a), seconds(b)));
        let values: Vec<String> = r
            .drops
            .iter()
            .chain([&r.unclassified])
            .map(|v| rate(*v))
            .collect();
        let drops: Vec<_> = titles
            .iter()
            .zip(&values)
            .map(|(t, v)| (*t, v.as_str()))
            .collect();
        s += &line(
            [&r.listener, &r.owner, &r.workload, &accq, &fill, &synq],
            &drops,
            [&rate(r.retransmits), &rate(r.cookies), &p50, &p99],
        );
    }
    s
}

pub fn top(opts: TopOptions) -> Result<()> {
    let settings = opts.source.client.settings()?;
    let source = if opts.source.standalone {
        let tracer = Tracer::start(&settings.tracer)?;
        let collector = Collector::new(
            tracer.counters.clone(),
            tracer.programs.clone(),
            tracer.probes.clone(),
            Default::default(),
        );
        // The WORKLOAD column names containers from the runtimes the config file names.
        collector.set_names(super::run::start_names(&settings.daemon));
        Source::Local(Box::new(collector), tracer)
    } else {
        Source::Daemon(settings.daemon.events_socket)
    };
    let mut prev = source.snapshot()?;
    if opts.once || !io::stdout().is_terminal() {
        loop {
            std::thread::sleep(opts.interval);
            let cur = source.snapshot()?;
            let secs = opts.interval.as_secs_f64();
            let table = render(rows(&prev, &cur, secs), opts.sort, false)
                + &destinations(&prev, &cur, secs);
            if let Err(e) = io::stdout().write_all(table.as_bytes()) {
                return if e.kind() == io::ErrorKind::BrokenPipe {
                    Ok(())
                } else {
                    Err(e.into())
                };
            }
            if opts.once {
                return Ok(());
            }
            prev = cur;
        }
    }
    live(&source, prev, &opts)
}

/// The refreshing view: alternate screen, raw mode for the keys, restored however it ends.
fn live(source: &Source, mut prev: Listeners, opts: &TopOptions) -> Result<()> {
    let mut out = io::stdout();
    terminal::enable_raw_mode()?;
    execute!(out, terminal::EnterAlternateScreen, cursor::Hide)?;
    let result = (|| -> Result<()> {
        let (mut by, mut reverse) = (opts.sort, false);
        let mut last = Instant::now();
        // The last interval's rows: a new sort order applies to them at once.
        let mut shown: Option<Vec<Row>> = None;
        // The client section of the last interval.
        let mut shown_destinations = String::new();
        loop {
            let table = shown.as_ref().map_or_else(
                || "waiting for the first interval…\n".to_string(),
                |r| render(r.clone(), by, reverse) + &shown_destinations,
            );
            queue!(out, terminal::Clear(ClearType::All), cursor::MoveTo(0, 0))?;
            let header = format!(
                "qtrace top — sorted by {by:?}{} — q quit, s sort, r reverse\n\n",
                if reverse { " (reversed)" } else { "" }
            );
            for line in header.lines().chain(table.lines()) {
                queue!(
                    out,
                    crossterm::style::Print(line),
                    cursor::MoveToNextLine(1)
                )?;
            }
            out.flush()?;
            let wait = opts.interval.saturating_sub(last.elapsed());
            if event::poll(wait)? {
                if let Event::Key(KeyEvent {
                    code, modifiers, ..
                }) = event::read()?
                {
                    match code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        // In raw mode Ctrl-C is a key, not SIGINT: it quits like everywhere.
                        KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => {
                            return Ok(())
                        }
                        KeyCode::Char('s') => by = by.next(),
                        KeyCode::Char('r') => reverse = !reverse,
                        _ => {}
                    }
                }
            }
            if last.elapsed() >= opts.interval {
                let cur = source.snapshot()?;
                let secs = last.elapsed().as_secs_f64();
                shown = Some(rows(&prev, &cur, secs));
                shown_destinations = destinations(&prev, &cur, secs);
                prev = cur;
                last = Instant::now();
            }
        }
    })();
    execute!(out, cursor::Show, terminal::LeaveAlternateScreen)?;
    terminal::disable_raw_mode()?;
    result
}

/// Most destinations the client section shows (the busiest).
const DESTINATION_ROWS: usize = 20;

/// The client section: connect() failures/s by reason and SYN retransmits/s per destination
/// over the interval, with its local ports in use against the usable ones; busiest first.
pub fn destinations(prev: &Listeners, cur: &Listeners, secs: f64) -> String {
    let Some(side) = &cur.clients else {
        return String::new();
    };
    let Some(now) = &side.destinations else {
        return "\nDESTINATIONS: n/a (the client probe is not attached)\n".into();
    };
    let before = prev.clients.as_ref().and_then(|c| c.destinations.as_ref());
    let key = |d: &Destination| (d.netns, d.pid, d.addr, d.port);
    let counters: Vec<ClientCounter> = ConnectFailure::ALL
        .iter()
        .map(|f| f.counter())
        .chain([ClientCounter::SynRetransmits])
        .collect();
    let mut rows: Vec<(f64, Vec<String>)> = now
        .iter()
        .map(|d| {
            let then = before.and_then(|b| b.iter().find(|p| key(p) == key(d)));
            // A counter the daemon leaves out is unavailable on its kernel (`reset` before 5.11).
            let rates: Vec<Option<f64>> = counters
                .iter()
                .map(|c| {
                    let was = then.map_or(0, |p| p.get(*c));
                    d.counters
                        .contains_key(c.name())
                        .then(|| d.get(*c).saturating_sub(was) as f64 / secs)
                })
                .collect();
            let census = side.census.iter().find(|n| n.netns == d.netns);
            let in_use: u64 = census.map_or(0, |n| {
                n.ephemeral
                    .iter()
                    .filter(|u| u.addr == d.addr && u.port == d.port)
                    .map(|u| u.in_use)
                    .sum()
            });
            let usable = census
                .and_then(|n| n.ports_available)
                .map_or("n/a".into(), |a| a.to_string());
            let mut cells = vec![
                std::net::SocketAddr::new(d.addr, d.port).to_string(),
                format!("{}[{}]", d.comm, d.pid),
            ];
            cells.extend(
                rates
                    .iter()
                    .map(|r| r.map_or("n/a".into(), |r| format!("{r:.1}"))),
            );
            cells.push(format!("{in_use}/{usable}"));
            (rates.iter().flatten().sum(), cells)
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut titles: Vec<String> = ["DESTINATION", "PROCESS"].map(String::from).to_vec();
    titles.extend(
        ConnectFailure::ALL
            .iter()
            .map(|f| format!("{}/s", f.title())),
    );
    titles.push("SYN-RTX/s".into());
    titles.push("PORTS".into());
    let line = |cells: &[String]| {
        let mut s = format!("{:<26} {:<18}", cells[0], cells[1]);
        for (t, v) in titles[2..].iter().zip(&cells[2..]) {
            s += &format!(" {v:>w$}", w = t.len().max(6));
        }
        s + "\n"
    };
    let mut s = format!("\n{}", line(&titles));
    for (_, cells) in rows.into_iter().take(DESTINATION_ROWS) {
        s += &line(&cells);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A daemon's snapshot, as its JSON reaches `top`.
    fn snap(drops: u64, len: u64) -> Listeners {
        serde_json::from_value(json!({ "type": "listeners", "listeners": [
            { "netns": 1, "family": "ipv4", "addr": "127.0.0.1", "port": 80,
              "owner": { "pid": 7, "comm": "nginx", "pod": "checkout-7d9f-5c6b8d4f9-x2k4q",
                         "pod_namespace": "shop", "container": "nginx" },
              "queues": { "accept_len": len, "accept_limit": 10, "syn_len": 0 },
              "counters": { "drop_accept_queue_full_syn": drops, "drop_syn_queue_full": null,
                            "drop_accept_queue_full_ack": 0, "drop_other": null, "synack_retransmits": 0,
                            "syncookies_sent": null },
              "accept_wait": { "count": drops, "sum_seconds": 0.0,
                               "buckets": [[0.001, 0], [0.002, drops], [f64::MAX, drops]] } },
            { "netns": 1, "family": "ipv6", "addr": "::", "port": 22, "owner": null,
              "queues": null, "counters": {} }
        ]}))
        .unwrap()
    }

    #[test]
    fn reuseport_sockets_are_rows_of_their_group() {
        let socket = |cookie: &str, len: u64| {
            json!({ "netns": 1, "family": "ipv4", "addr": "0.0.0.0", "port": 443, "socket": cookie,
                    "queues": { "accept_len": len, "accept_limit": 10, "syn_len": 0 },
                    "counters": {} })
        };
        let snap: Listeners = serde_json::from_value(json!({ "type": "listeners", "listeners": [
            socket("2b", 10), socket("1a", 0),
            { "netns": 1, "family": "ipv4", "addr": "0.0.0.0", "port": 80, "socket": "3c",
              "counters": {} }
        ]}))
        .unwrap();
        let names: Vec<String> = rows(&snap, &snap, 1.0)
            .into_iter()
            .map(|r| r.listener)
            .collect();
        assert_eq!(
            names,
            ["0.0.0.0:443 [2/2]", "0.0.0.0:443 [1/2]", "0.0.0.0:80"]
        );
    }

    #[test]
    fn rates_fill_and_unavailable_columns() {
        let rows = rows(&snap(0, 0), &snap(20, 10), 2.0);
        let nginx = &rows[0];
        assert_eq!(nginx.drops[1], Some(10.0));
        assert_eq!(nginx.drops[0], None, "unavailable stays unavailable");
        assert_eq!(nginx.fill(), 1.0);
        assert_eq!(nginx.wait, Some((0.002, 0.002)));
        let table = render(rows, SortBy::Drops, false);
        let header = table.lines().next().unwrap();
        assert!(
            DropReason::ALL.iter().all(|r| header.contains(r.title())),
            "the drop columns are titled as in every table: {table}"
        );
        assert!(
            table.lines().all(|l| l.len() == header.len()),
            "columns line up: {table}"
        );
        let first = table.lines().nth(1).unwrap();
        assert!(
            first.starts_with("127.0.0.1:80")
                && first.contains("nginx[7]")
                && first.contains(" shop/checkout-7d9f-5c6b8d4.. ")
                && first.contains("n/a"),
            "{table}"
        );
        assert!(
            table.lines().nth(2).unwrap().starts_with("[::]:22"),
            "{table}"
        );
    }

    /// A daemon's snapshot with java[812]'s connects to 10.0.0.5:3306, `no_port` failed.
    fn with_clients(no_port: u64) -> Listeners {
        use crate::api::{ClientSide, NetnsCensus, PortUse};
        let d = Destination {
            netns: 1,
            pid: 812,
            comm: "java".into(),
            addr: "10.0.0.5".parse().unwrap(),
            port: 3306,
            counters: [(ClientCounter::ConnectNoPort.name().to_string(), no_port)].into(),
        };
        Listeners {
            clients: Some(ClientSide {
                destinations: Some(vec![d]),
                destinations_folded: 0,
                census: vec![NetnsCensus {
                    netns: 1,
                    ports_available: Some(64),
                    ephemeral: vec![PortUse {
                        saddr: "10.0.0.1".parse().unwrap(),
                        addr: "10.0.0.5".parse().unwrap(),
                        port: 3306,
                        in_use: 64,
                    }],
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn destinations_show_failures_per_second_and_ports_in_use() {
        let table = destinations(&with_clients(0), &with_clients(10), 2.0);
        let mut lines = table.lines().skip(1);
        let header = lines.next().unwrap();
        assert!(header.starts_with("DESTINATION"), "{table}");
        assert!(header.contains("NO-PORT/s"), "{table}");
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(row[..3], ["10.0.0.5:3306", "java[812]", "5.0"], "{table}");
        assert_eq!(row.last(), Some(&"64/64"), "{table}");
        // Without the client probe: unavailable, not zero.
        let mut blind = with_clients(0);
        blind.clients.as_mut().unwrap().destinations = None;
        assert!(destinations(&blind, &blind, 1.0).contains("n/a"));
    }
}
