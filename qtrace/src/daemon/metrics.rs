//! The Prometheus exposition: per-listener series from a [`Scrape`], label sets capped, and
//! what qtrace cannot see left out rather than exported as zero.
//!
//! The text is written here directly, in either format, byte for byte as prometheus-client's
//! encoder wrote it (the golden files in `testdata/` pin it): at 10,000 listeners a scrape
//! has about 100,000 series, and the library's encoder formatted each listener's labels
//! anew for every one of them, through a chain of `dyn Write` calls, into OpenMetrics text that
//! was then copied line by line into the classic format.

use std::{
    borrow::Cow, collections::BTreeMap, rc::Rc, sync::atomic::AtomicUsize, sync::atomic::Ordering,
};

use prometheus_client::metrics::MetricType;
use qtrace_common::{
    vocabulary::UNCLASSIFIED, ClientCounter, ConnectFailure, Counter, DropReason, SelfStat,
    WAIT_BUCKETS,
};

use crate::{
    build_info,
    daemon::{
        clients::{Clients, CloseWaitOwner, NetnsCensus},
        collect::{ListenerView, Scrape},
        events_socket::Stats as EventsStats,
        http_limits::Stats as HttpStats,
    },
    host::census::Lingering,
    host::sockdiag::ListenerQueues,
    kernel::{
        clients::ClientStats,
        counters::{wait_bucket_le_seconds, ListenerStats},
        probes::{ProbeStatus, Visibility},
    },
    listener::ListenerId,
};

const LISTENER_COUNTERS: [(Counter, &str, &str); 5] = [
    (
        Counter::SynackRetransmits,
        "qtrace_synack_retransmits",
        "SYN-ACKs the listener retransmitted (final ACK not received).",
    ),
    (
        Counter::SyncookiesSent,
        "qtrace_syncookies_sent",
        "SYNs answered with a syncookie instead of a queued request.",
    ),
    (
        Counter::OverflowResets,
        "qtrace_overflow_resets",
        "Handshakes reset because tcp_abort_on_overflow=1.",
    ),
    (
        Counter::Accepted,
        "qtrace_accepted_connections",
        "Connections returned by accept().",
    ),
    (
        Counter::SynQueued,
        "qtrace_syns_queued",
        "SYNs accepted into the SYN queue.",
    ),
];

/// Whose series a sample is: a listener's labels are encoded once per scrape and shared by
/// each of its samples, so 10,000 listeners do not cost 100,000 label encodings.
#[derive(Clone)]
enum Listener {
    None,
    /// `netns="…",addr="…",port="…"`, from [`listener_label_text`].
    Id(Rc<str>),
    /// The sum of the listeners past the series cap.
    Other,
}

/// Labels other than a listener's.
type Extra = Vec<(&'static str, Cow<'static, str>)>;

/// A sample's label set: its listener's labels, then any others.
#[derive(Clone)]
struct Labels {
    listener: Listener,
    extra: Extra,
}

impl Labels {
    fn of(listener: Listener) -> Self {
        Self {
            listener,
            extra: Vec::new(),
        }
    }

    fn plain(extra: Extra) -> Self {
        Self {
            listener: Listener::None,
            extra,
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self.listener, Listener::None) && self.extra.is_empty()
    }

    fn with(&self, key: &'static str, value: impl Into<Cow<'static, str>>) -> Self {
        let mut l = self.clone();
        l.extra.push((key, value.into()));
        l
    }

    /// `k="v",…`, without braces.
    fn write(&self, out: &mut String) {
        let mut first = match &self.listener {
            Listener::None => true,
            Listener::Id(text) => {
                out.push_str(text);
                false
            }
            Listener::Other => {
                out.push_str(r#"netns="other",addr="other",port="other",socket="other""#);
                false
            }
        };
        for (key, value) in &self.extra {
            if !first {
                out.push(',');
            }
            first = false;
            label(out, key, value);
        }
    }
}

/// A listener's labels as the exposition writes them.
fn listener_label_text(id: &ListenerId) -> Rc<str> {
    let mut out = String::with_capacity(64);
    label(&mut out, "netns", itoa::Buffer::new().format(id.netns));
    out.push(',');
    label(&mut out, "addr", &id.addr.to_string());
    out.push(',');
    label(&mut out, "port", itoa::Buffer::new().format(id.port));
    out.push(',');
    label(&mut out, "socket", &format!("{:x}", id.socket));
    out.into()
}

/// `key="value"`, the value escaped as the exposition formats require (`\\`, `\"`, `\n`).
fn label(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push_str("=\"");
    let mut rest = value;
    while let Some(i) = rest.find(['\\', '"', '\n']) {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

type QueueGauge = (&'static str, &'static str, fn(&ListenerQueues) -> u32);

const QUEUE_GAUGES: [QueueGauge; 4] = [
    (
        "qtrace_accept_queue_length",
        "Connections waiting for accept() now.",
        |q| q.acceptq_len,
    ),
    (
        "qtrace_accept_queue_limit",
        "Accept queue limit: min(backlog, net.core.somaxconn).",
        |q| q.acceptq_max,
    ),
    (
        "qtrace_syn_queue_length",
        "Handshakes waiting for their final ACK now.",
        |q| q.synq_len,
    ),
    (
        "qtrace_syn_queue_limit",
        "Request count at which the SYN queue counts as full (the accept queue limit).",
        |q| q.acceptq_max,
    ),
];

/// One exported listener series: a real listener, or the sum of those past the cap.
struct Series {
    labels: Labels,
    stats: ListenerStats,
    /// Drops no probe classified (see `daemon::drops`); None where every reason has a probe.
    unclassified: Option<u64>,
}

/// The daemon's own servers' figures: the HTTP server's and the events socket's.
pub struct Servers {
    pub http: HttpStats,
    pub events: EventsStats,
}

impl Servers {
    pub fn now() -> Self {
        Self {
            http: crate::daemon::http_limits::stats(),
            events: crate::daemon::events_socket::stats(),
        }
    }
}

/// Renders the scrape as OpenMetrics text, or the classic Prometheus text format.
pub fn render(
    scrape: &Scrape,
    probes: &[ProbeStatus],
    vis: Visibility,
    max_series: usize,
    openmetrics: bool,
    servers: &Servers,
) -> String {
    // The last scrape's size, plus some: a multi-MB text is not grown by doubling each time.
    static LAST_SIZE: AtomicUsize = AtomicUsize::new(0);
    let last = LAST_SIZE.load(Ordering::Relaxed);
    let mut e = Exposition {
        out: String::with_capacity(last + last / 8),
        openmetrics,
    };
    for f in &families(scrape, probes, vis, max_series, servers) {
        e.family(f);
    }
    if openmetrics {
        e.out.push_str("# EOF\n");
    }
    LAST_SIZE.store(e.out.len(), Ordering::Relaxed);
    e.out
}

enum Value {
    Counter(u64),
    /// A counter of seconds.
    Seconds(f64),
    Gauge(i64),
    Info,
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

/// The text of a scrape, in OpenMetrics or the classic Prometheus text format (0.0.4: counters'
/// TYPE and HELP take the `_total` name, info metrics are gauges named `_info`, no `# EOF`).
struct Exposition {
    out: String,
    openmetrics: bool,
}

impl Exposition {
    fn family(&mut self, f: &Family) {
        if f.samples.is_empty() {
            return;
        }
        let (suffix, kind) = match (self.openmetrics, &f.kind) {
            (true, kind) => ("", kind.as_str()),
            (false, MetricType::Counter) => ("_total", "counter"),
            (false, MetricType::Info) => ("_info", "gauge"),
            (false, MetricType::Unknown) => ("", "untyped"),
            (false, kind) => ("", kind.as_str()),
        };
        for line in ["# HELP ", "# TYPE "] {
            self.out.push_str(line);
            self.out.push_str(f.name);
            self.out.push_str(suffix);
            self.out.push(' ');
            self.out
                .push_str(if line == "# HELP " { f.help } else { kind });
            self.out.push('\n');
        }
        // A lone sample without labels is written without braces.
        if let [(labels, value)] = f.samples.as_slice() {
            if labels.is_empty() && !matches!(value, Value::Info) {
                self.sample(f.name, None, value);
                return;
            }
        }
        for (labels, value) in &f.samples {
            self.sample(f.name, Some(labels), value);
        }
    }

    fn sample(&mut self, name: &str, labels: Option<&Labels>, value: &Value) {
        let mut itoa = itoa::Buffer::new();
        let mut dtoa = dtoa::Buffer::new();
        let (suffix, text) = match value {
            Value::Counter(v) => ("_total", itoa.format(*v)),
            Value::Seconds(v) => ("_total", dtoa.format(*v)),
            Value::Gauge(v) => ("", itoa.format(*v)),
            // An info metric's labels are its value: braces even when there are none.
            Value::Info => {
                let empty = Labels::plain(Vec::new());
                return self.line(name, "_info", Some(labels.unwrap_or(&empty)), "1");
            }
            Value::Histogram {
                sum,
                count,
                buckets,
            } => return self.histogram(name, labels, *sum, *count, buckets),
        };
        self.line(name, suffix, labels, text);
    }

    /// `name{labels} value`; no braces without a label set.
    fn line(&mut self, name: &str, suffix: &str, labels: Option<&Labels>, value: &str) {
        self.out.push_str(name);
        self.out.push_str(suffix);
        if let Some(labels) = labels {
            self.out.push('{');
            labels.write(&mut self.out);
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(value);
        self.out.push('\n');
    }

    /// `_sum`, `_count`, then cumulative `_bucket`s whose `le` comes before the other labels.
    fn histogram(
        &mut self,
        name: &str,
        labels: Option<&Labels>,
        sum: f64,
        count: u64,
        buckets: &[(f64, u64)],
    ) {
        self.line(name, "_sum", labels, dtoa::Buffer::new().format(sum));
        self.line(name, "_count", labels, itoa::Buffer::new().format(count));
        let mut cumulative = 0;
        for (le, n) in buckets {
            cumulative += n;
            self.out.push_str(name);
            self.out.push_str("_bucket{");
            let mut dtoa = dtoa::Buffer::new();
            let le = if *le == f64::INFINITY {
                "+Inf"
            } else {
                dtoa.format(*le)
            };
            label(&mut self.out, "le", le);
            if let Some(labels) = labels.filter(|l| !l.is_empty()) {
                self.out.push(',');
                labels.write(&mut self.out);
            }
            self.out.push_str("} ");
            self.out.push_str(itoa::Buffer::new().format(cumulative));
            self.out.push('\n');
        }
    }
}

fn listener_labels(v: &ListenerView) -> Labels {
    Labels::of(Listener::Id(listener_label_text(&v.id)))
}

fn families(
    scrape: &Scrape,
    probes: &[ProbeStatus],
    vis: Visibility,
    max_series: usize,
    servers: &Servers,
) -> Vec<Family> {
    // Listeners the kernel counted for come first, so a burst of idle listeners cannot push
    // the ones with drops into `other`; within each group the order is stable (by key).
    let mut views: Vec<&ListenerView> = scrape.listeners.iter().collect();
    // Users' listeners (see `--first-user-uid`) after the system's: no user can push a
    // service into `other` by opening sockets.
    views.sort_by_key(|v| {
        (
            v.stats.is_none(),
            v.stats.as_ref().is_some_and(|s| s.user),
            v.id,
        )
    });
    let folded = views.len().saturating_sub(max_series);
    // Every listener sock_diag sees has its counters from the first scrape, at 0 until
    // something happens, so rate() and increase() see its first burst.
    let zero = ListenerStats::empty(Default::default());
    let counted = |v: &ListenerView| v.stats.clone().unwrap_or_else(|| zero.clone());
    // Each shown listener's labels, encoded once for all its series.
    let shown: Vec<(&ListenerView, Labels)> = views
        .iter()
        .take(max_series)
        .map(|v| (*v, listener_labels(v)))
        .collect();
    let mut series: Vec<Series> = shown
        .iter()
        .map(|(v, labels)| Series {
            labels: labels.clone(),
            stats: counted(v),
            unclassified: v.unclassified,
        })
        .collect();
    let over = &views[views.len().min(max_series)..];
    if let Some((first, rest)) = over.split_first() {
        let mut sum = Series {
            labels: Labels::of(Listener::Other),
            stats: counted(first),
            unclassified: first.unclassified,
        };
        for v in rest {
            if let Some(stats) = &v.stats {
                sum.stats.add(stats);
            }
            if let Some(n) = v.unclassified {
                sum.unclassified = Some(sum.unclassified.unwrap_or(0) + n);
            }
        }
        series.push(sum);
    }

    let mut out = Vec::new();
    out.push(Family {
        name: "qtrace_listen_drops",
        help: "Handshake packets the listener dropped, by reason (TcpExt ListenDrops, split). \
               Where a probe is missing, reason=\"unclassified\" holds the drops of the \
               listener's own count (sk_drops, from sock_diag) that no probe classified.",
        kind: MetricType::Counter,
        samples: series
            .iter()
            .flat_map(|s| {
                let classified = DropReason::ALL
                    .into_iter()
                    .filter(|r| vis.sees(r.counter()))
                    .map(|r| {
                        (
                            s.labels.with("reason", r.name()),
                            Value::Counter(s.stats.get(r.counter())),
                        )
                    });
                let unclassified = s.unclassified.filter(|_| !vis.classifies_every_drop());
                classified.chain(unclassified.map(|n| {
                    (
                        s.labels.with("reason", UNCLASSIFIED.name),
                        Value::Counter(n),
                    )
                }))
            })
            .collect(),
    });
    out.push(Family {
        name: "qtrace_netns_listen_drops_unattributed",
        help: "Cross-check: the network namespace's TcpExt ListenDrops since qtrace first saw \
               it, minus the drops qtrace attributed to its listeners (every reason). 0 when \
               every drop is accounted for; a listener that closed between two scrapes takes \
               the drops since the last one with it, which is one cause of a difference.",
        kind: MetricType::Gauge,
        samples: scrape
            .netns_unattributed
            .iter()
            .map(|(ns, gap)| {
                (
                    Labels::plain(vec![("netns", ns.to_string().into())]),
                    Value::Gauge(*gap),
                )
            })
            .collect(),
    });
    for (c, name, help) in LISTENER_COUNTERS {
        if vis.sees(c) {
            out.push(Family {
                name,
                help,
                kind: MetricType::Counter,
                samples: series
                    .iter()
                    .map(|s| (s.labels.clone(), Value::Counter(s.stats.get(c))))
                    .collect(),
            });
        }
    }
    if vis.sees(Counter::Accepted) {
        out.push(Family {
            name: "qtrace_accept_queue_wait_seconds",
            help: "Time connections waited in the accept queue before accept().",
            kind: MetricType::Histogram,
            samples: series
                .iter()
                .map(|s| (s.labels.clone(), wait_histogram(&s.stats)))
                .collect(),
        });
    }
    for (name, help, get) in QUEUE_GAUGES {
        out.push(Family {
            name,
            help,
            kind: MetricType::Gauge,
            samples: shown
                .iter()
                .filter_map(|(v, labels)| {
                    v.queues
                        .as_ref()
                        .map(|q| (labels.clone(), Value::Gauge(get(q).into())))
                })
                .collect(),
        });
    }
    out.push(Family {
        name: "qtrace_listener",
        help: "The process owning each listening socket, its innermost systemd unit, its \
               container as <runtime>://<id> with the container's name, Kubernetes pod and pod \
               namespace, and the network namespace's name (each empty where unknown).",
        kind: MetricType::Info,
        samples: shown
            .iter()
            .filter_map(|(v, labels)| {
                let o = v.owner.as_ref()?;
                let l = Labels {
                    listener: labels.listener.clone(),
                    extra: vec![
                        ("pid", o.pid.to_string().into()),
                        ("comm", o.comm.clone().into()),
                        ("unit", o.unit.clone().into()),
                        ("container_id", o.container_id.clone().into()),
                        ("container", o.container.clone().into()),
                        ("pod", o.pod.clone().into()),
                        ("pod_namespace", o.pod_namespace.clone().into()),
                        ("netns_name", o.netns_name.clone().into()),
                    ],
                };
                Some((l, Value::Info))
            })
            .collect(),
    });
    client_families(&mut out, &scrape.clients);
    port_search_family(&mut out, &scrape.clients);
    census_families(&mut out, &scrape.clients, max_series);
    self_families(&mut out, scrape, probes, folded, servers);
    out
}

/// The labels of one destination's series: who connected (namespace, process) and where.
fn destination_labels(c: &ClientStats) -> Labels {
    Labels::plain(vec![
        ("netns", c.netns().to_string().into()),
        ("pid", c.pid().to_string().into()),
        ("comm", c.comm().into()),
        ("addr", c.daddr().to_string().into()),
        ("port", c.dport().to_string().into()),
    ])
}

/// The destinations past `--max-destination-series`, summed.
fn other_destination() -> Labels {
    let other = || Cow::Borrowed("other");
    Labels::plain(
        ["netns", "pid", "comm", "addr", "port"]
            .into_iter()
            .map(|k| (k, other()))
            .collect(),
    )
}

/// connect() failures and SYN retransmits per destination; absent where the client probe
/// is not attached (nothing else sees them).
fn client_families(out: &mut Vec<Family>, clients: &Clients) {
    if !clients.available {
        return;
    }
    let series: Vec<(Labels, &ClientStats)> = clients
        .rows
        .iter()
        .map(|c| (destination_labels(c), c))
        .chain(clients.other.iter().map(|o| (other_destination(), o)))
        .collect();
    out.push(Family {
        name: "qtrace_connect_failures",
        help: "connect() calls whose handshake failed, by reason, per network namespace, \
               process and destination. refused, timed_out and other together are the \
               namespace's Tcp AttemptFails from SYN_SENT; no_port (EADDRNOTAVAIL) has no \
               kernel counter; aborted: closed by the process mid-handshake; reset: \
               established, then reset by the server before its first byte (ECONNRESET, as \
               from tcp_abort_on_overflow; absent before Linux 5.11).",
        kind: MetricType::Counter,
        samples: series
            .iter()
            .flat_map(|(labels, c)| {
                ConnectFailure::ALL
                    .into_iter()
                    .filter(|f| clients.shows(f.counter()))
                    .map(move |f| {
                        (
                            labels.with("reason", f.name()),
                            Value::Counter(c.get(f.counter())),
                        )
                    })
            })
            .collect(),
    });
    out.push(Family {
        name: "qtrace_syn_retransmits",
        help: "SYNs the client retransmitted (no SYN-ACK in time), per network namespace, \
               process and destination: the client's side of TcpExt TCPSynRetrans.",
        kind: MetricType::Counter,
        samples: series
            .iter()
            .map(|(labels, c)| {
                (
                    labels.clone(),
                    Value::Counter(c.get(ClientCounter::SynRetransmits)),
                )
            })
            .collect(),
    });
    out.push(Family {
        name: "qtrace_destination_series_overflow",
        help: "Destinations past --max-destination-series, summed into the series labelled \
               `other`.",
        kind: MetricType::Gauge,
        samples: vec![(
            Labels::plain(Vec::new()),
            Value::Gauge(clients.folded as i64),
        )],
    });
}

/// Time connect() spent picking a local port, per namespace; absent where no probe times it.
fn port_search_family(out: &mut Vec<Family>, clients: &Clients) {
    let Some(searched) = &clients.port_search else {
        return;
    };
    out.push(Family {
        name: "qtrace_connect_port_search_seconds",
        help: "Time connect() spent choosing a local port (inet_hash_connect), per network \
               namespace: it grows as ip_local_port_range fills, before connects fail with \
               EADDRNOTAVAIL.",
        kind: MetricType::Histogram,
        samples: searched
            .iter()
            .map(|s| {
                let labels = Labels::plain(vec![("netns", s.netns.to_string().into())]);
                let le = |b: usize| (1u64 << b) as f64 / 1e9;
                (labels, log2_histogram(&s.hist.buckets, s.hist.sum_ns, le))
            })
            .collect(),
    });
}

/// Each namespace's census of connections (sock_diag, no BPF: on every kernel).
fn census_families(out: &mut Vec<Family>, clients: &Clients, max_series: usize) {
    let netns = |n: &NetnsCensus| ("netns", Cow::Owned(n.netns.to_string()));
    let gauge = |name, help, samples: Vec<(Extra, u64)>| Family {
        name,
        help,
        kind: MetricType::Gauge,
        samples: samples
            .into_iter()
            .map(|(l, v)| (Labels::plain(l), Value::Gauge(v as i64)))
            .collect(),
    };
    out.push(gauge(
        "qtrace_tcp_connections",
        "TCP connections lingering after a close, by state (time_wait: this side closed \
         first; close_wait: the peer closed and the owning process has not), per network \
         namespace, sampled with sock_diag as `ss -tan state ...` counts them.",
        clients
            .census
            .iter()
            .flat_map(|n| {
                [Lingering::TimeWait, Lingering::CloseWait].map(|s| {
                    (
                        vec![netns(n), ("state", s.name().into())],
                        n.census.total(s),
                    )
                })
            })
            .collect(),
    ));
    // Per port, the largest first; past the cap, summed per state into `other`.
    let mut by_port: Vec<(u64, Extra)> = clients
        .census
        .iter()
        .flat_map(|n| {
            n.census
                .by_port
                .iter()
                .map(move |((state, side, port), count)| {
                    let labels = vec![
                        netns(n),
                        ("state", state.name().into()),
                        ("side", side.name().into()),
                        ("port", port.to_string().into()),
                    ];
                    (*count, labels)
                })
        })
        .collect();
    by_port.sort_by_key(|p| std::cmp::Reverse(p.0));
    let mut port_samples: Vec<(Extra, u64)> = Vec::new();
    let mut folded_ports: BTreeMap<Cow<'static, str>, u64> = BTreeMap::new();
    for (i, (count, labels)) in by_port.into_iter().enumerate() {
        if i < max_series {
            port_samples.push((labels, count));
        } else {
            *folded_ports.entry(labels[1].1.clone()).or_default() += count;
        }
    }
    for (state, count) in folded_ports {
        let other = || Cow::Borrowed("other");
        port_samples.push((
            vec![
                ("netns", other()),
                ("state", state),
                ("side", other()),
                ("port", other()),
            ],
            count,
        ));
    }
    out.push(gauge(
        "qtrace_tcp_connections_by_port",
        "TCP connections in time_wait or close_wait by port: the remote port (side=remote) \
         of the namespace's own connections (local port in ip_local_port_range), else the \
         local one (side=local, a service's). The largest --max-destination-series; the rest \
         summed per state into port=\"other\".",
        port_samples,
    ));
    out.push(gauge(
        "qtrace_time_wait_limit",
        "net.ipv4.tcp_max_tw_buckets of the network namespace: past it the kernel destroys \
         new TIME_WAIT sockets at once (TcpExt TCPTimeWaitOverflow).",
        clients
            .census
            .iter()
            .filter_map(|n| Some((vec![netns(n)], n.census.max_tw_buckets?)))
            .collect(),
    ));
    let owners: Vec<(Extra, &CloseWaitOwner)> = clients
        .census
        .iter()
        .flat_map(|n| {
            n.close_wait_owners.iter().map(move |o| {
                let labels = vec![
                    netns(n),
                    ("pid", o.pid.to_string().into()),
                    ("comm", o.comm.clone().into()),
                ];
                (labels, o)
            })
        })
        .take(max_series)
        .collect();
    out.push(gauge(
        "qtrace_close_wait_connections",
        "CLOSE_WAIT connections per owning process (pid 0: no process found holding them): \
         the peer closed, the process has not.",
        owners.iter().map(|(l, o)| (l.clone(), o.sockets)).collect(),
    ));
    out.push(Family {
        name: "qtrace_close_wait_oldest_seconds",
        help: "Age of the process's oldest CLOSE_WAIT connection, from the first sample that \
               found it (the kernel keeps no timestamp of the peer's FIN): at most one sample \
               short, and from qtrace's start for connections older than it.",
        kind: MetricType::Gauge,
        samples: owners
            .iter()
            .map(|(l, o)| {
                (
                    Labels::plain(l.clone()),
                    Value::Gauge(o.oldest.as_secs() as i64),
                )
            })
            .collect(),
    });
    out.push(gauge(
        "qtrace_ephemeral_ports_available",
        "Local ports connect() may pick in the network namespace: ip_local_port_range minus \
         ip_local_reserved_ports. One source address can use each once per destination.",
        clients
            .census
            .iter()
            .filter_map(|n| Some((vec![netns(n)], n.census.ports_available?)))
            .collect(),
    ));
    // Closest to exhaustion first, across namespaces.
    let mut uses: Vec<(f64, Extra, u64)> = clients
        .census
        .iter()
        .flat_map(|n| {
            let available = n.census.ports_available.unwrap_or(0).max(1) as f64;
            n.census.ephemeral.iter().map(move |u| {
                let labels = vec![
                    netns(n),
                    ("saddr", u.saddr.to_string().into()),
                    ("addr", u.daddr.to_string().into()),
                    ("port", u.dport.to_string().into()),
                ];
                (u.in_use as f64 / available, labels, u.in_use)
            })
        })
        .collect();
    uses.sort_by(|a, b| b.0.total_cmp(&a.0));
    out.push(gauge(
        "qtrace_ephemeral_ports_in_use",
        "Local ports in ip_local_port_range in use (any state, TIME_WAIT included) from one \
         source address towards one destination; connect() fails with EADDRNOTAVAIL when \
         it reaches qtrace_ephemeral_ports_available. The --max-destination-series closest to \
         exhaustion.",
        uses.into_iter()
            .take(max_series)
            .map(|(_, l, n)| (l, n))
            .collect(),
    ));
}

fn wait_histogram(s: &ListenerStats) -> Value {
    log2_histogram(&s.wait_buckets, s.wait_sum_ns, wait_bucket_le_seconds)
}

/// A kernel log2 histogram (see `qtrace_common::WAIT_BUCKETS`) with `le(b)` the upper bound
/// of bucket `b` in seconds.
fn log2_histogram(counts: &[u64; WAIT_BUCKETS], sum_ns: u64, le: fn(usize) -> f64) -> Value {
    let buckets = counts
        .iter()
        .enumerate()
        .map(|(b, n)| {
            // The kernel's last bucket also takes everything longer.
            let le = if b + 1 == WAIT_BUCKETS {
                f64::INFINITY
            } else {
                le(b)
            };
            (le, *n)
        })
        .collect();
    Value::Histogram {
        sum: sum_ns as f64 / 1e9,
        count: counts.iter().sum(),
        buckets,
    }
}

fn self_families(
    out: &mut Vec<Family>,
    scrape: &Scrape,
    probes: &[ProbeStatus],
    folded: usize,
    servers: &Servers,
) {
    let st = |s: SelfStat| scrape.self_stats[s as usize];
    let counter = |name, help, samples: Vec<(Extra, u64)>| Family {
        name,
        help,
        kind: MetricType::Counter,
        samples: samples
            .into_iter()
            .map(|(l, v)| (Labels::plain(l), Value::Counter(v)))
            .collect(),
    };
    out.push(counter(
        "qtrace_events_lost",
        "Events not delivered to the ring buffer: rate-limited, or the buffer was full.",
        vec![
            (
                vec![("cause", "rate_limited".into())],
                st(SelfStat::RateLimited),
            ),
            (
                vec![("cause", "ringbuf_full".into())],
                st(SelfStat::RingbufFull),
            ),
        ],
    ));
    out.push(counter(
        "qtrace_kernel_map_full",
        "Updates the kernel programs could not make because a map was full.",
        vec![
            (
                vec![("map", "listeners".into())],
                st(SelfStat::ListenerMapFull),
            ),
            (vec![("map", "clients".into())], st(SelfStat::ClientMapFull)),
            (
                vec![("map", "active_opens".into())],
                st(SelfStat::ActiveOpensMapFull),
            ),
            (
                vec![("map", "port_search".into())],
                st(SelfStat::PortSearchMapFull),
            ),
        ],
    ));
    out.push(counter(
        "qtrace_kernel_read_errors",
        "Kernel memory reads that failed in the programs.",
        vec![(vec![], st(SelfStat::ReadFailed))],
    ));
    let gauge = |name, help, v: usize| Family {
        name,
        help,
        kind: MetricType::Gauge,
        samples: vec![(Labels::plain(Vec::new()), Value::Gauge(v as i64))],
    };
    let occ = &scrape.occupancy;
    out.push(Family {
        name: "qtrace_kernel_listener_entries",
        help: "Listening sockets in the kernel's counter maps now: the system's (created by a uid \
               below --first-user-uid) and users' each fill a map of their own. Entries of \
               closed sockets are deleted.",
        kind: MetricType::Gauge,
        samples: [("system", occ.system), ("user", occ.user)]
            .into_iter()
            .map(|(p, n)| {
                (
                    Labels::plain(vec![("partition", p.into())]),
                    Value::Gauge(n as i64),
                )
            })
            .collect(),
    });
    out.push(gauge(
        "qtrace_kernel_listener_entries_max",
        "Size of each kernel listener map (--max-listeners); past it new sockets go uncounted \
         (qtrace_kernel_map_full).",
        occ.capacity,
    ));
    out.push(counter(
        "qtrace_kernel_listener_entries_reclaimed",
        "Kernel listener map entries deleted because their socket had closed or its network \
         namespace was gone, or the kernel could not name their socket for 10 s.",
        vec![(vec![], scrape.reclaimed)],
    ));
    out.push(gauge(
        "qtrace_listener_series_overflow",
        "Listeners past --max-listener-series, summed into the series labelled `other`.",
        folded,
    ));
    out.push(counter(
        "qtrace_http_connections_dropped",
        "HTTP connections closed or refused by qtrace: at the connection limit (the longest \
         idle first), or for a request header not sent in time or a connection idle too long.",
        vec![
            (
                vec![("reason", "over_limit".into())],
                servers.http.over_limit,
            ),
            (vec![("reason", "timeout".into())], servers.http.timed_out),
        ],
    ));
    out.push(gauge(
        "qtrace_http_connections",
        "HTTP connections open now.",
        servers.http.open,
    ));
    out.push(gauge(
        "qtrace_events_readers",
        "Readers of the local events socket (qtrace events) connected now.",
        servers.events.readers,
    ));
    out.push(counter(
        "qtrace_events_reader_missed",
        "Events a local reader (qtrace events) was not sent because it had fallen behind by \
         --events-reader-queue of the events its filters admit (or all readers' queues held \
         16 readers' worth); summed over readers, each told how many it missed, where.",
        vec![(vec![], servers.events.missed)],
    ));
    if let Some(n) = scrape.names {
        out.push(counter(
            "qtrace_container_name_lookups",
            "Lookups of container names from their runtime (one per container id not seen \
             before, and again after --container-names-retry for those not found), by result; \
             queue_full: not asked yet, 256 lookups were waiting (asked on a later scrape).",
            vec![
                (vec![("result", "found".into())], n.found),
                (vec![("result", "not_found".into())], n.not_found),
                (vec![("result", "failed".into())], n.failed),
                (vec![("result", "queue_full".into())], n.queue_full),
            ],
        ));
        out.push(counter(
            "qtrace_container_names_evicted",
            "Containers forgotten to stay within --max-container-names.",
            vec![(vec![], n.evicted)],
        ));
        out.push(gauge(
            "qtrace_container_names_cached",
            "Containers whose names (or absence of one) qtrace remembers now.",
            n.cached as usize,
        ));
    }
    out.push(gauge(
        "qtrace_netns_unreadable",
        "Network namespaces whose queues could not be sampled (entering them needs CAP_SYS_ADMIN).",
        scrape.netns_unreadable,
    ));
    // Runs and run time only while the kernel keeps them (kernel.bpf_stats_enabled=1);
    // recursion misses wherever it reports them (5.12+): absent, never 0, where it does not.
    let timed: Vec<_> = scrape
        .programs
        .iter()
        .filter_map(|p| Some((p.name.clone(), p.runs?)))
        .collect();
    if !timed.is_empty() {
        let per_program = |value: fn(&(u64, std::time::Duration)) -> Value| {
            timed
                .iter()
                .map(|(name, runs)| {
                    (
                        Labels::plain(vec![("program", name.clone().into())]),
                        value(runs),
                    )
                })
                .collect()
        };
        out.push(Family {
            name: "qtrace_bpf_program_runs",
            help: "Invocations of each attached program (kernel.bpf_stats_enabled=1).",
            kind: MetricType::Counter,
            samples: per_program(|(n, _)| Value::Counter(*n)),
        });
        out.push(Family {
            name: "qtrace_bpf_program_run_seconds",
            help: "Time spent in each attached program (kernel.bpf_stats_enabled=1).",
            kind: MetricType::Counter,
            samples: per_program(|(_, t)| Value::Seconds(t.as_secs_f64())),
        });
    }
    let missed: Vec<_> = scrape
        .programs
        .iter()
        .filter_map(|p| {
            Some((
                Labels::plain(vec![("program", p.name.clone().into())]),
                Value::Counter(p.recursion_misses?),
            ))
        })
        .collect();
    if !missed.is_empty() {
        out.push(Family {
            name: "qtrace_bpf_program_recursion_misses",
            help: "Times the kernel skipped an attached program because it was already running \
                   on that CPU (an event in a softirq that interrupted it): events no counter \
                   saw, like a full map's (Linux 5.12+).",
            kind: MetricType::Counter,
            samples: missed,
        });
    }
    out.push(Family {
        name: "qtrace_probe",
        help: "The attach tier each probe got on this kernel.",
        kind: MetricType::Info,
        samples: probes
            .iter()
            .map(|p| {
                let tier = p.tier.map_or("unavailable".to_string(), |t| t.to_string());
                (
                    Labels::plain(vec![
                        ("probe", p.probe.to_string().into()),
                        ("tier", tier.into()),
                    ]),
                    Value::Info,
                )
            })
            .collect(),
    });
    out.push(Family {
        name: "qtrace_build",
        help: "qtrace's version, the git revision and date it was built from, and its compiler.",
        kind: MetricType::Info,
        samples: vec![(
            Labels::plain(vec![
                ("version", build_info::VERSION.into()),
                ("revision", build_info::REVISION.into()),
                ("build_date", build_info::BUILD_DATE.into()),
                ("rustc_version", build_info::RUSTC_VERSION.into()),
            ]),
            Value::Info,
        )],
    });
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, sync::Arc, time::Duration};

    use qtrace_common::{listener::AF_INET, ListenerKey};

    use super::*;
    use crate::{
        api::{Owner, Tier},
        kernel::programs::ProgramStats,
    };

    /// The probes of a kernel without fentry and kprobes (this project's CI machine): the
    /// SYN-side and accept counters are unavailable, so absent from the exposition.
    /// This machine's kernel: tracepoints only.
    fn probes() -> Vec<ProbeStatus> {
        probes_at([None, Some(Tier::Tracepoint), Some(Tier::Tracepoint), None])
    }

    /// syn, ack, synack, accept at these tiers.
    fn probes_at(tiers: [Option<Tier>; 4]) -> Vec<ProbeStatus> {
        ["syn", "ack", "synack", "accept"]
            .into_iter()
            .zip(tiers)
            .map(|(probe, tier)| ProbeStatus {
                probe: probe.into(),
                tier,
                hooks: Vec::new(),
                fallbacks: Vec::new(),
            })
            .collect()
    }

    fn view(
        netns: u32,
        addr: &str,
        port: u16,
        counts: &[(Counter, u64)],
        len: u32,
    ) -> ListenerView {
        let addr: IpAddr = addr.parse().unwrap();
        let IpAddr::V4(v4) = addr else { unreachable!() };
        let mut key_addr = [0u8; 16];
        key_addr[..4].copy_from_slice(&v4.octets());
        let key = ListenerKey {
            netns,
            family: AF_INET,
            port,
            addr: key_addr,
            sock: u64::from(port),
        };
        let stats = (!counts.is_empty()).then(|| {
            let mut s = ListenerStats::empty(key);
            for &(c, v) in counts {
                s.counts[c as usize] = v;
            }
            s.wait_buckets[3] = 2;
            s.wait_sum_ns = 12_000;
            s
        });
        ListenerView {
            id: ListenerId {
                netns,
                addr,
                port,
                socket: u64::from(port),
            },
            stats,
            queues: Some(ListenerQueues {
                addr,
                port,
                acceptq_len: len,
                acceptq_max: 128,
                synq_len: 1,
                inode: 0,
                cookie: u64::from(port),
                uid: 0,
                drops: 0,
            }),
            owner: Some(Arc::new(Owner {
                pid: 4242,
                comm: "nginx".into(),
                unit: "cri-containerd-4f1c0b1e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678.scope".into(),
                container_id: "containerd://4f1c0b1e2d3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9012345678".into(),
                container: "web".into(),
                pod: "web-7d9f".into(),
                pod_namespace: "shop".into(),
                netns_name: "shop/web-7d9f".into(),
            })),
            unclassified: None,
        }
    }

    /// A fixed scrape: two listeners with counts, one idle, qtrace's own losses, two programs.
    fn scrape() -> Scrape {
        let mut self_stats = [0; SelfStat::COUNT];
        self_stats[SelfStat::RateLimited as usize] = 3;
        self_stats[SelfStat::RingbufFull as usize] = 1;
        Scrape {
            listeners: vec![
                view(
                    4026531840,
                    "127.0.0.1",
                    8080,
                    &[
                        (Counter::DropAcceptQueueFullAck, 7),
                        (Counter::DropOther, 1),
                        (Counter::SynackRetransmits, 21),
                        (Counter::OverflowResets, 0),
                    ],
                    128,
                ),
                view(
                    4026532000,
                    "10.0.0.1",
                    443,
                    &[(Counter::SynackRetransmits, 2)],
                    0,
                ),
                view(4026531840, "0.0.0.0", 22, &[], 0),
            ],
            programs: vec![ProgramStats {
                name: "qt_ack_tp".into(),
                runs: Some((8, Duration::from_micros(3))),
                recursion_misses: Some(2),
            }],
            self_stats,
            netns_unreadable: 1,
            netns_unattributed: vec![(4026531840, 0), (4026532000, 0)],
            occupancy: crate::kernel::counters::Occupancy {
                system: 2,
                user: 1,
                capacity: 4096,
            },
            reclaimed: 5,
            names: Some(crate::host::names::NameCounts {
                cached: 3,
                found: 2,
                not_found: 1,
                failed: 0,
                queue_full: 0,
                evicted: 0,
            }),
            clients: clients(),
        }
    }

    /// java[812] failing towards 10.0.0.5:3306, and its namespace's census.
    fn clients() -> Clients {
        use qtrace_common::{listener::AF_INET, ClientKey};

        use crate::host::census::{Census, PortUse, Side};

        let mut key = ClientKey {
            netns: 4026531840,
            pid: 812,
            family: AF_INET,
            dport: 3306,
            ..Default::default()
        };
        key.comm[..4].copy_from_slice(b"java");
        key.daddr[..4].copy_from_slice(&[10, 0, 0, 5]);
        let mut counts = [0; ClientCounter::COUNT];
        counts[ClientCounter::ConnectNoPort as usize] = 12;
        counts[ClientCounter::ConnectTimedOut as usize] = 1;
        counts[ClientCounter::SynRetransmits as usize] = 4;
        let mut c = Clients::capped(true, vec![ClientStats { key, counts }], 1000);
        let mut hist = qtrace_common::PortSearch::ZERO;
        hist.buckets[10] = 3;
        hist.buckets[17] = 1;
        hist.sum_ns = 3 * 700 + 90_000;
        c.port_search = Some(vec![crate::kernel::clients::PortSearchStats {
            netns: 4026531840,
            hist,
        }]);
        let census = Census {
            by_port: [
                ((Lingering::TimeWait, Side::Remote, 3306), 27901),
                ((Lingering::CloseWait, Side::Local, 8080), 412),
            ]
            .into(),
            close_wait: Vec::new(),
            max_tw_buckets: Some(262144),
            port_range: Some((32768, 60999)),
            ports_available: Some(28232),
            tw_reuse: Some(2),
            ephemeral: vec![PortUse {
                saddr: "10.0.0.1".parse().unwrap(),
                daddr: "10.0.0.5".parse().unwrap(),
                dport: 3306,
                in_use: 27901,
            }],
        };
        c.census = vec![NetnsCensus {
            netns: 4026531840,
            census,
            close_wait_owners: vec![CloseWaitOwner {
                pid: 77,
                comm: "mysqld-client".into(),
                sockets: 412,
                oldest: Duration::from_secs(8040),
            }],
        }];
        c
    }

    fn servers() -> Servers {
        Servers {
            http: HttpStats {
                open: 3,
                over_limit: 5,
                timed_out: 2,
            },
            events: EventsStats {
                readers: 2,
                missed: 11,
            },
        }
    }

    fn render_fixed(max_series: usize, openmetrics: bool) -> String {
        let probes = probes();
        let vis = Visibility::of(&probes);
        redact_build(&render(
            &scrape(),
            &probes,
            vis,
            max_series,
            openmetrics,
            &servers(),
        ))
    }

    /// The build's own details as placeholders, so the golden files hold for every build.
    fn redact_build(text: &str) -> String {
        // Longest first: the version is a part of none of the others.
        text.replace(build_info::RUSTC_VERSION, "RUSTC_VERSION")
            .replace(build_info::BUILD_DATE, "BUILD_DATE")
            .replace(build_info::REVISION, "REVISION")
            .replace(build_info::VERSION, "VERSION")
    }

    /// Compares with a checked-in exposition, compiled in (the kernel matrix runs this test in
    /// guests without the source tree); `QTRACE_UPDATE_GOLDEN=1` rewrites the file.
    fn golden(name: &str, want: &str, got: &str) {
        if std::env::var_os("QTRACE_UPDATE_GOLDEN").is_some() {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/daemon/testdata")
                .join(name);
            std::fs::write(&path, got).unwrap();
            return;
        }
        assert!(
            got == want,
            "src/daemon/testdata/{name} differs (QTRACE_UPDATE_GOLDEN=1 rewrites it):\n{got}"
        );
    }

    #[test]
    fn exposition_matches_the_golden_files() {
        golden(
            "metrics.prom",
            include_str!("testdata/metrics.prom"),
            &render_fixed(1000, false),
        );
        golden(
            "metrics.openmetrics",
            include_str!("testdata/metrics.openmetrics"),
            &render_fixed(1000, true),
        );
    }

    /// Every family and label shape the encoder writes: every probe attached (the wait
    /// histogram, every reason), a listener past the cap (`other`), and escaped label values.
    #[test]
    fn exposition_at_every_tier_matches_the_golden_files() {
        let probes = probes_at([Some(Tier::Fentry); 4]);
        let mut fixed = scrape();
        fixed.listeners[1].unclassified = Some(4);
        let odd = Arc::new(Owner {
            pid: 7,
            comm: "a \"quoted\\ name\n".into(),
            ..Default::default()
        });
        fixed.listeners[0].owner = Some(odd);
        for (name, openmetrics) in [
            ("metrics-fentry.prom", false),
            ("metrics-fentry.openmetrics", true),
        ] {
            let text = redact_build(&render(
                &fixed,
                &probes,
                Visibility::of(&probes),
                2,
                openmetrics,
                &servers(),
            ));
            let want = match openmetrics {
                false => include_str!("testdata/metrics-fentry.prom"),
                true => include_str!("testdata/metrics-fentry.openmetrics"),
            };
            golden(name, want, &text);
        }
    }

    #[test]
    fn unclassified_drops_exist_only_where_a_probe_is_missing() {
        let mut fixed = scrape();
        fixed.listeners[2].unclassified = Some(4);
        let exposition = |probes: &[ProbeStatus]| {
            render(
                &fixed,
                probes,
                Visibility::of(probes),
                1000,
                false,
                &servers(),
            )
        };
        let blind = exposition(&probes());
        assert!(
            blind.contains(
                "qtrace_listen_drops_total{netns=\"4026531840\",addr=\"0.0.0.0\",port=\"22\",socket=\"16\",reason=\"unclassified\"} 4\n"
            ),
            "{blind}"
        );
        let fentry = Some(Tier::Fentry);
        let every = exposition(&probes_at([fentry; 4]));
        assert!(!every.contains("reason=\"unclassified\"}"), "{every}");
        // Every reason has its series, at 0 for the listener nothing was counted for.
        for r in DropReason::ALL {
            let sample = format!(
                "qtrace_listen_drops_total{{netns=\"4026531840\",addr=\"0.0.0.0\",port=\"22\",socket=\"16\",reason=\"{}\"}} 0\n",
                r.name()
            );
            assert!(every.contains(&sample), "{sample} in {every}");
        }
    }

    #[test]
    fn listeners_past_the_cap_are_summed_into_other() {
        let text = render_fixed(1, false);
        // The counted listeners sort first (by id): 127.0.0.1:8080 keeps its series, the
        // other counted one and the idle one are folded.
        assert!(text.contains(
            "qtrace_synack_retransmits_total{netns=\"4026531840\",addr=\"127.0.0.1\",port=\"8080\",socket=\"1f90\"} 21"
        ));
        assert!(text.contains(
            "qtrace_synack_retransmits_total{netns=\"other\",addr=\"other\",port=\"other\",socket=\"other\"} 2"
        ));
        assert!(
            text.contains("qtrace_listener_series_overflow 2\n"),
            "{text}"
        );
        // Gauges and owners only for the listeners shown: no per-listener `other` queue.
        assert!(!text.contains("qtrace_accept_queue_length{netns=\"other\""));
        assert!(!text.contains("port=\"443\""), "{text}");
        assert_eq!(text.matches("qtrace_listener_info{").count(), 1);
        // A cap that fits everyone folds nothing.
        assert!(render_fixed(3, false).contains("qtrace_listener_series_overflow 0\n"));
    }

    #[test]
    fn what_no_probe_sees_is_absent_not_zero() {
        let text = render_fixed(1000, false);
        // `other` is fed by the syn probe too: without it, it is incomplete, so absent.
        // (`qtrace_connect_failures_total` has its own `reason="other"`.)
        let drops: String = text
            .lines()
            .filter(|l| l.starts_with("qtrace_listen_drops_total{"))
            .collect();
        for r in DropReason::ALL {
            let shown = drops.contains(&format!("reason=\"{}\"", r.name()));
            assert_eq!(shown, r == DropReason::AcceptQueueFullAck, "{r:?}: {text}");
        }
        assert!(!text.contains("qtrace_accept_queue_wait_seconds"), "{text}");
        assert!(!text.contains("qtrace_syncookies_sent_total"), "{text}");
    }
}
