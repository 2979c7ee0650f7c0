//! The Prometheus exposition: per-listener series from a [`Scrape`], label sets capped, and
//! what qtrace cannot see left out rather than exported as zero.

use std::{borrow::Cow, fmt::Write};

use prometheus_client::{
    collector::Collector,
    encoding::{
        text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder, MetricEncoder,
    },
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};
use qtrace_common::{Counter, SelfStat, WAIT_BUCKETS};

use crate::{
    probes::ProbeStatus,
    scrape::{ListenerId, ListenerView, Scrape},
    snapshot::Visibility,
    sockdiag::ListenerQueues,
    stats::{wait_bucket_le_seconds, ListenerStats},
};

/// The `reason` label of a drop counter: its name without `drop_` (`syn_queue_full`, …, `other`).
fn drop_reason(c: Counter) -> &'static str {
    let name = c.name();
    name.strip_prefix("drop_").unwrap_or(name)
}

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

/// Whose series a sample is: a listener's labels are written straight from its id when
/// encoded, so 10,000 listeners do not cost 100,000 label vectors per scrape.
#[derive(Clone, Copy)]
enum Listener {
    None,
    Id(ListenerId),
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
}

impl EncodeLabelSet for Labels {
    fn encode(&self, e: &mut LabelSetEncoder) -> std::fmt::Result {
        match self.listener {
            Listener::None => {}
            Listener::Id(id) => {
                label(e, "netns", id.netns)?;
                label(e, "addr", id.addr)?;
                label(e, "port", id.port)?;
            }
            Listener::Other => {
                for key in ["netns", "addr", "port"] {
                    label(e, key, "other")?;
                }
            }
        }
        for (key, value) in &self.extra {
            label(e, key, value)?;
        }
        Ok(())
    }
}

fn label(e: &mut LabelSetEncoder, key: &str, value: impl std::fmt::Display) -> std::fmt::Result {
    let mut label = e.encode_label();
    let mut k = label.encode_label_key()?;
    k.write_str(key)?;
    let mut v = k.encode_label_value()?;
    write!(v, "{value}")?;
    v.finish()
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
}

/// Renders the scrape as OpenMetrics text, or the classic Prometheus text format.
pub fn render(
    scrape: &Scrape,
    probes: &[ProbeStatus],
    vis: Visibility,
    max_series: usize,
    openmetrics: bool,
) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families {
        body: families(scrape, probes, vis, max_series),
    }));
    let mut out = String::new();
    text::encode(&mut out, &registry).expect("writing to a String");
    if openmetrics {
        out
    } else {
        to_classic_text(&out)
    }
}

/// Families encoded by hand-written closures over prometheus-client's encoder.
struct Families {
    body: Vec<Family>,
}

impl std::fmt::Debug for Families {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Families")
    }
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

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.body {
            if f.samples.is_empty() {
                continue;
            }
            let mut metric = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            if let [(labels, value)] = f.samples.as_slice() {
                if labels.is_empty() && !matches!(value, Value::Info) {
                    encode_value(metric, value)?;
                    continue;
                }
            }
            for (labels, value) in &f.samples {
                // An info metric's labels are its value; others are a family's label set.
                if let Value::Info = value {
                    metric.encode_info(labels)?;
                } else {
                    encode_value(metric.encode_family(labels)?, value)?;
                }
            }
        }
        Ok(())
    }
}

fn encode_value(mut e: MetricEncoder, value: &Value) -> Result<(), std::fmt::Error> {
    match value {
        Value::Counter(v) => ConstCounter::new(*v).encode(e),
        Value::Seconds(v) => ConstCounter::new(*v).encode(e),
        Value::Gauge(v) => ConstGauge::new(*v).encode(e),
        Value::Histogram {
            sum,
            count,
            buckets,
        } => e.encode_histogram::<Labels>(*sum, *count, buckets, None),
        Value::Info => e.encode_info(&Labels::plain(Vec::new())),
    }
}

fn listener_labels(v: &ListenerView) -> Labels {
    Labels::of(Listener::Id(v.id))
}

fn families(
    scrape: &Scrape,
    probes: &[ProbeStatus],
    vis: Visibility,
    max_series: usize,
) -> Vec<Family> {
    // Listeners the kernel counted for come first, so a burst of idle listeners cannot push
    // the ones with drops into `other`; within each group the order is stable (by key).
    let mut views: Vec<&ListenerView> = scrape.listeners.iter().collect();
    views.sort_by_key(|v| (v.stats.is_none(), v.id));
    let folded = views.len().saturating_sub(max_series);
    let mut series: Vec<Series> = views
        .iter()
        .take(max_series)
        .filter_map(|v| {
            v.stats.clone().map(|stats| Series {
                labels: listener_labels(v),
                stats,
            })
        })
        .collect();
    let over: Vec<&ListenerStats> = views
        .iter()
        .skip(max_series)
        .filter_map(|v| v.stats.as_ref())
        .collect();
    if let Some(first) = over.first() {
        let mut sum = (*first).clone();
        for s in &over[1..] {
            sum.add(s);
        }
        series.push(Series {
            labels: Labels::of(Listener::Other),
            stats: sum,
        });
    }

    let mut out = Vec::new();
    out.push(Family {
        name: "qtrace_listen_drops",
        help: "Handshake packets the listener dropped, by reason (TcpExt ListenDrops, split).",
        kind: MetricType::Counter,
        samples: series
            .iter()
            .flat_map(|s| {
                Counter::DROPS
                    .into_iter()
                    .filter(|&c| vis.sees(c))
                    .map(|c| {
                        (
                            s.labels.with("reason", drop_reason(c)),
                            Value::Counter(s.stats.get(c)),
                        )
                    })
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
    let shown: Vec<&ListenerView> = views.iter().take(max_series).copied().collect();
    for (name, help, get) in QUEUE_GAUGES {
        out.push(Family {
            name,
            help,
            kind: MetricType::Gauge,
            samples: shown
                .iter()
                .filter_map(|v| {
                    v.queues
                        .as_ref()
                        .map(|q| (listener_labels(v), Value::Gauge(get(q).into())))
                })
                .collect(),
        });
    }
    out.push(Family {
        name: "qtrace_listener",
        help: "The process owning each listening socket, and its systemd unit or container.",
        kind: MetricType::Info,
        samples: shown
            .iter()
            .filter_map(|v| {
                let o = v.owner.as_ref()?;
                let l = Labels {
                    listener: Listener::Id(v.id),
                    extra: vec![
                        ("pid", o.pid.to_string().into()),
                        ("comm", o.comm.clone().into()),
                        ("unit", o.unit.clone().into()),
                    ],
                };
                Some((l, Value::Info))
            })
            .collect(),
    });
    self_families(&mut out, scrape, probes, folded);
    out
}

fn wait_histogram(s: &ListenerStats) -> Value {
    let buckets = s
        .wait_buckets
        .iter()
        .enumerate()
        .map(|(b, n)| {
            // The kernel's last bucket also takes every longer wait.
            let le = if b + 1 == WAIT_BUCKETS {
                f64::INFINITY
            } else {
                wait_bucket_le_seconds(b)
            };
            (le, *n)
        })
        .collect();
    Value::Histogram {
        sum: s.wait_sum_ns as f64 / 1e9,
        count: s.wait_buckets.iter().sum(),
        buckets,
    }
}

fn self_families(out: &mut Vec<Family>, scrape: &Scrape, probes: &[ProbeStatus], folded: usize) {
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
            (
                vec![("map", "accept_queued".into())],
                st(SelfStat::AcceptMapFull),
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
    out.push(gauge(
        "qtrace_listener_series_overflow",
        "Listeners past --max-listener-series, summed into the series labelled `other`.",
        folded,
    ));
    let http = crate::http_limits::stats();
    out.push(counter(
        "qtrace_http_connections_dropped",
        "HTTP connections closed or refused by qtrace: at the connection limit (the longest \
         idle first), or for a request header not sent in time or a connection idle too long.",
        vec![
            (vec![("reason", "over_limit".into())], http.over_limit),
            (vec![("reason", "timeout".into())], http.timed_out),
        ],
    ));
    out.push(gauge(
        "qtrace_http_connections",
        "HTTP connections open now.",
        http.open,
    ));
    out.push(gauge(
        "qtrace_netns_unreadable",
        "Network namespaces whose queues could not be sampled (entering them needs CAP_SYS_ADMIN).",
        scrape.netns_unreadable,
    ));
    if let Some(programs) = &scrape.programs {
        out.push(Family {
            name: "qtrace_bpf_program_runs",
            help: "Invocations of each attached program (kernel.bpf_stats_enabled=1).",
            kind: MetricType::Counter,
            samples: programs
                .iter()
                .map(|p| {
                    (
                        Labels::plain(vec![("program", p.name.clone().into())]),
                        Value::Counter(p.runs),
                    )
                })
                .collect(),
        });
        out.push(Family {
            name: "qtrace_bpf_program_run_seconds",
            help: "Time spent in each attached program (kernel.bpf_stats_enabled=1).",
            kind: MetricType::Counter,
            samples: programs
                .iter()
                .map(|p| {
                    (
                        Labels::plain(vec![("program", p.name.clone().into())]),
                        Value::Seconds(p.run_time.as_secs_f64()),
                    )
                })
                .collect(),
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
        help: "qtrace's version.",
        kind: MetricType::Info,
        samples: vec![(
            Labels::plain(vec![("version", env!("CARGO_PKG_VERSION").into())]),
            Value::Info,
        )],
    });
}

/// OpenMetrics text → classic Prometheus text (0.0.4): counters' TYPE/HELP take the `_total`
/// name, info metrics become gauges named `_info`, and there is no `# EOF`.
pub fn to_classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                k => (name.to_string(), k),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}
