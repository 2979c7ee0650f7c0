//! `qtrace doctor`: what this kernel lets qtrace see, the listen-queue sysctls of every network
//! namespace, each listener's effective queue limits as the running kernel computes them, and
//! advice drawn from what the daemon counted.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::Duration,
};

use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Value};

use crate::{
    btf::KernelBtf,
    config::ClientArgs,
    history::LastHour,
    hub,
    listener::endpoint_of,
    netns,
    owners::{Owner, Owners},
    probe_report::kernel_release,
    scrape::ListenerId,
    sockdiag::{self, ListenerQueues},
    tracer::Tracer,
};

#[derive(Clone, Debug, clap::Args)]
pub struct DoctorOptions {
    // The daemon is asked for what it has counted; without one, doctor attaches probes.
    #[command(flatten)]
    pub client: ClientArgs,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The sysctls that shape listen queues, per network namespace (`net.core.*` ones included:
/// they are per namespace too on current kernels).
const SYSCTLS: [&str; 9] = [
    "net/core/somaxconn",
    "net/ipv4/tcp_max_syn_backlog",
    "net/ipv4/tcp_syncookies",
    "net/ipv4/tcp_synack_retries",
    "net/ipv4/tcp_abort_on_overflow",
    "net/ipv4/ip_local_port_range",
    "net/ipv4/tcp_fin_timeout",
    "net/ipv4/tcp_tw_reuse",
    "net/core/netdev_max_backlog",
];

/// How the running kernel decides the SYN queue is full (`inet_csk_reqsk_queue_is_full`):
/// the comparison changed from `>=` to `>` in mainline and in stable backports, invisibly to
/// BTF, so doctor measures it in a private namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SynqRule {
    /// Full when requests ≥ the accept queue limit.
    AtLimit,
    /// Full when requests > the accept queue limit (one more fits).
    AboveLimit,
}

#[derive(Debug, Serialize)]
pub struct Limits {
    /// min(backlog, somaxconn): the kernel's `sk_max_ack_backlog` for this socket.
    pub accept_limit: u32,
    /// The backlog passed to listen(): exact when below somaxconn, else only "at least".
    pub backlog: Backlog,
    /// Requests the SYN queue holds before SYNs are dropped (syncookies off) or answered with
    /// cookies (syncookies on); None with tcp_syncookies=2 (every SYN gets a cookie).
    pub syn_limit: Option<u32>,
    pub syn_rule: String,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backlog {
    Exactly(u32),
    AtLeast(u32),
}

/// The effective limits of a listener whose `sk_max_ack_backlog` is `accept_limit`.
pub fn limits(
    accept_limit: u32,
    sysctl: &BTreeMap<String, String>,
    rule: Option<SynqRule>,
) -> Limits {
    let get = |k: &str| sysctl.get(k).and_then(|v| v.trim().parse::<u32>().ok());
    let somaxconn = get("net/core/somaxconn").unwrap_or(4096);
    let cookies = get("net/ipv4/tcp_syncookies").unwrap_or(1);
    let max_syn = get("net/ipv4/tcp_max_syn_backlog").unwrap_or(128);
    let backlog = if accept_limit < somaxconn {
        Backlog::Exactly(accept_limit)
    } else {
        Backlog::AtLeast(accept_limit)
    };
    let full_at = match rule {
        Some(SynqRule::AboveLimit) => accept_limit + 1,
        _ => accept_limit.max(1),
    };
    let compare = match rule {
        Some(SynqRule::AtLimit) => "requests >= limit (measured on this kernel)",
        Some(SynqRule::AboveLimit) => "requests > limit (measured on this kernel)",
        None => "requests >= limit, or > limit on newer kernels (not measured: needs root)",
    };
    // With syncookies off, tcp_conn_request also drops SYNs from unproven peers once fewer
    // than a quarter of tcp_max_syn_backlog is left.
    let syn_backlog_cap = max_syn - (max_syn >> 2) + 1;
    let (syn_limit, syn_rule) = match cookies {
        0 => (
            Some(full_at.min(syn_backlog_cap)),
            format!("syncookies off: SYNs dropped when {compare}, or at {syn_backlog_cap} requests (tcp_max_syn_backlog {max_syn} - 1/4)"),
        ),
        2 => (None, "tcp_syncookies=2: every SYN is answered with a cookie".to_string()),
        _ => (Some(full_at), format!("syncookies on: cookies instead of queued requests when {compare}")),
    };
    Limits {
        accept_limit,
        backlog,
        syn_limit,
        syn_rule,
    }
}

/// Measures the SYN-queue rule: in a private network namespace, a listener with backlog 1
/// and TCP_DEFER_ACCEPT (bare final ACKs leave the request queued) takes three handshakes;
/// one queued request means `>=`, two mean `>`.
pub fn measure_synq_rule() -> Result<SynqRule> {
    std::thread::spawn(|| -> Result<SynqRule> {
        // SAFETY: unshare affects only this thread, which ends here.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        loopback_up()?;
        // /proc/sys/net is the namespace of the thread that opens it.
        std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "1")?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let defer: libc::c_int = 5;
        // SAFETY: a valid socket and an int option.
        unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&defer as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
            libc::listen(listener.as_raw_fd(), 1);
        }
        let addr = listener.local_addr()?;
        let _clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            .collect::<Result<_, _>>()?;
        let me = sockdiag::listeners()?
            .into_iter()
            .find(|l| l.port == addr.port());
        match me.map(|l| l.synq_len) {
            Some(1) => Ok(SynqRule::AtLimit),
            Some(2) => Ok(SynqRule::AboveLimit),
            other => anyhow::bail!("unexpected SYN queue length {other:?}"),
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("measuring thread panicked"))?
}

fn loopback_up() -> Result<()> {
    // Any AF_INET socket of the namespace carries the interface ioctls.
    let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS with a valid ifreq for "lo".
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

fn read_sysctls() -> BTreeMap<String, String> {
    SYSCTLS
        .iter()
        .filter_map(|k| {
            let v = std::fs::read_to_string(Path::new("/proc/sys").join(k)).ok()?;
            Some((
                k.to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            ))
        })
        .collect()
}

struct Namespace {
    inode: u32,
    sysctls: BTreeMap<String, String>,
    listeners: Vec<ListenerQueues>,
}

fn namespaces() -> (Vec<Namespace>, usize) {
    let own = netns::own().ok().map(|n| n.inode);
    let mut out = Vec::new();
    let mut unreadable = 0;
    for ns in netns::all() {
        let look = || Ok((read_sysctls(), sockdiag::listeners()?));
        let found = if Some(ns.inode) == own {
            look()
        } else {
            netns::run_in(&ns, look)
        };
        match found {
            Ok((sysctls, listeners)) => out.push(Namespace {
                inode: ns.inode,
                sysctls,
                listeners,
            }),
            Err(_) => unreadable += 1,
        }
    }
    (out, unreadable)
}

pub fn doctor(opts: DoctorOptions) -> Result<()> {
    let settings = opts.client.settings()?;
    let daemon = hub::listeners_snapshot(&settings.daemon.events_socket).ok();
    let sample_interval = daemon
        .as_ref()
        .and_then(|d| d["queue_sample_interval_seconds"].as_f64())
        .unwrap_or_default();
    let btf_file = &settings.tracer.btf;
    // The BTF is parsed at most once, for doctor's own probes, which need it anyway. A running
    // daemon's attached probes show its BTF parses: then the file need only be readable.
    let (btf, probes) = match &daemon {
        Some(d) => (KernelBtf::check_readable(btf_file), d["probes"].clone()),
        None => match KernelBtf::load(btf_file) {
            Ok(loaded) => match Tracer::start_with(&settings.tracer, loaded) {
                Ok(tracer) => (Ok(()), serde_json::to_value(&tracer.probes)?),
                Err(e) => (Ok(()), json!({ "error": format!("{e:#}") })),
            },
            Err(e) => {
                let why = format!("{e:#}");
                (Err(e), json!({ "error": why }))
            }
        },
    };
    let rule = measure_synq_rule().ok();
    let (namespaces, unreadable) = namespaces();
    let counted = daemon.as_ref().map(ListenerId::index).unwrap_or_default();
    let mut owners = Owners::default();
    let inodes: Vec<u32> = namespaces
        .iter()
        .flat_map(|n| n.listeners.iter().map(|l| l.inode))
        .collect();
    let owners = owners.lookup(inodes).clone();
    let mut listeners = Vec::new();
    let mut advice = Vec::new();
    for ns in &namespaces {
        for l in &ns.listeners {
            let lim = limits(l.acceptq_max, &ns.sysctls, rule);
            let owner = owners.get(&l.inode);
            let id = ListenerId {
                netns: ns.inode,
                addr: l.addr,
                port: l.port,
            };
            let seen = counted.get(&id).copied();
            let counters = seen.map(|c| c["counters"].clone());
            let last_hour: Option<LastHour> =
                seen.and_then(|c| serde_json::from_value(c["last_hour"].clone()).ok());
            let name = listener_name(owner, &l.addr, l.port, ns.inode);
            let evidence = Evidence {
                counters: counters.as_ref(),
                last_hour: last_hour.as_ref(),
                sample_interval,
            };
            advise(&mut advice, &name, l, &lim, &ns.sysctls, &evidence);
            listeners.push(json!({
                "netns": ns.inode, "addr": l.addr.to_string(), "port": l.port, "owner": owner,
                "accept_queue": { "len": l.acceptq_len, "limit": lim.accept_limit, "backlog": lim.backlog },
                "syn_queue": { "len": l.synq_len, "limit": lim.syn_limit, "rule": lim.syn_rule },
                "counters": counters,
                "last_hour": last_hour,
            }));
        }
    }
    let report = json!({
        "kernel": {
            "release": kernel_release(),
            "btf": btf.is_ok(),
            "btf_file": btf_file,
            "btf_error": btf.err().map(|e| format!("{e:#}")),
            "synq_full_rule": rule,
        },
        "probes": probes,
        "daemon": daemon.is_some(),
        "namespaces": namespaces.iter().map(|n| json!({ "netns": n.inode, "sysctls": n.sysctls })).collect::<Vec<_>>(),
        "namespaces_unreadable": unreadable,
        "listeners": listeners,
        "advice": advice,
    });
    let mut out = std::io::stdout().lock();
    if opts.json {
        writeln!(out, "{report}")?;
    } else {
        write!(out, "{}", human(&report))?;
    }
    Ok(())
}

fn listener_name(owner: Option<&Owner>, addr: &IpAddr, port: u16, netns: u32) -> String {
    let at = SocketAddr::new(*addr, port);
    match owner {
        Some(o) => format!("{o} on {at} (netns {netns})"),
        None => format!("{at} (netns {netns})"),
    }
}

/// What the daemon knows of a listener, when one runs.
struct Evidence<'a> {
    /// Counts since the daemon started.
    counters: Option<&'a Value>,
    last_hour: Option<&'a LastHour>,
    sample_interval: f64,
}

impl Evidence<'_> {
    /// "; at its limit in 37% of the last hour (sampled every 10 s), 1204 handshakes dropped
    /// in that time", or nothing without a daemon.
    fn accept_queue_history(&self) -> String {
        let Some(h) = self.last_hour.filter(|h| h.samples > 0) else {
            return String::new();
        };
        let span = match h.sampled_seconds {
            s if s >= 3600.0 => "the last hour".to_string(),
            s if s >= 120.0 => format!("the last {:.0} min", s / 60.0),
            s => format!("the last {s:.1} s"),
        };
        format!(
            "; at its limit in {:.0}% of {span} (sampled every {} s), {} handshakes dropped in that time",
            h.accept_queue_at_limit * 100.0,
            self.sample_interval,
            h.drops
        )
    }
}

/// Advice from evidence: the queues now and what the daemon counted, never boilerplate.
fn advise(
    out: &mut Vec<Value>,
    who: &str,
    l: &ListenerQueues,
    lim: &Limits,
    sysctl: &BTreeMap<String, String>,
    evidence: &Evidence,
) {
    let counters = evidence.counters;
    let n = |k: &str| counters.and_then(|c| c[k].as_u64()).unwrap_or(0);
    let sys = |k: &str| sysctl.get(k).cloned().unwrap_or_default();
    let accept_drops = n("drop_accept_queue_full_syn") + n("drop_accept_queue_full_ack");
    let mut say = |text: String| out.push(json!({ "listener": who, "advice": text }));
    let was_full = evidence
        .last_hour
        .is_some_and(|h| h.accept_queue_at_limit > 0.0);
    if accept_drops > 0 || was_full || (lim.accept_limit > 0 && l.acceptq_len >= lim.accept_limit) {
        let cap = match lim.backlog {
            Backlog::AtLeast(_) => format!(
                "raise net.core.somaxconn (now {} caps it) and the listen() backlog",
                sys("net/core/somaxconn")
            ),
            Backlog::Exactly(b) => {
                format!("raise the listen() backlog (now {b}; the application sets it)")
            }
        };
        say(format!(
            "accept queue {}/{} now{}; {accept_drops} connections dropped for a full accept queue \
             since qtrace started: the application accepts too slowly for its load; {cap}",
            l.acceptq_len,
            lim.accept_limit,
            evidence.accept_queue_history()
        ));
    }
    if n("drop_syn_queue_full") > 0 && sys("net/ipv4/tcp_syncookies") == "0" {
        say(format!(
            "{} SYNs dropped for a full SYN queue with tcp_syncookies=0: enable tcp_syncookies=1",
            n("drop_syn_queue_full")
        ));
    }
    if n("syncookies_sent") > 0 {
        say(format!(
            "{} syncookies sent: the SYN queue overflowed (a SYN flood, or a backlog too small for the connection rate); \
             cookie connections lose TCP options such as window scaling",
            n("syncookies_sent")
        ));
    }
    if sys("net/ipv4/tcp_abort_on_overflow") == "1" {
        say(format!(
            "tcp_abort_on_overflow=1 turns accept-queue overflows into resets ({} so far): clients see \
             'connection reset' instead of a retry; set it to 0 unless resets are wanted",
            n("overflow_resets")
        ));
    }
    if n("synack_retransmits") > 0 && n("drop_accept_queue_full_ack") == 0 {
        say(format!(
            "{} SYN-ACK retransmits without accept-queue drops: final ACKs are lost on the way (network loss or a firewall)",
            n("synack_retransmits")
        ));
    }
}

fn human(r: &Value) -> String {
    let mut s = String::new();
    let k = &r["kernel"];
    s += &format!(
        "kernel {}  BTF {}\n",
        k["release"].as_str().unwrap_or("?"),
        match k["btf_error"].as_str() {
            Some(why) => format!("NO: {why}"),
            None => "yes".into(),
        }
    );
    s += &format!(
        "SYN queue full rule: {}\n",
        k["synq_full_rule"]
            .as_str()
            .unwrap_or("not measured (needs root)")
    );
    match r["probes"].as_array() {
        Some(ps) => {
            for p in ps {
                let tier = p["tier"].as_str().unwrap_or("unavailable");
                s += &format!("probe {:<7} {tier}", p["probe"].as_str().unwrap_or("?"));
                if p["tier"].is_null() {
                    let why = p["fallbacks"].as_array().map(|f| {
                        f.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    });
                    s += &format!("  ({})", why.unwrap_or_default());
                }
                s.push('\n');
            }
        }
        None => {
            s += &format!(
                "probes: cannot attach: {}\n",
                r["probes"]["error"].as_str().unwrap_or("?")
            )
        }
    }
    for n in r["namespaces"].as_array().into_iter().flatten() {
        s += &format!("\nnetns {}\n", n["netns"]);
        for (k, v) in n["sysctls"].as_object().into_iter().flatten() {
            s += &format!(
                "  {:<32} {}\n",
                k.replace('/', "."),
                v.as_str().unwrap_or("")
            );
        }
    }
    s += "\nLISTENER                                  ACCEPT Q (len/limit, backlog)     SYN Q (len/limit)\n";
    for l in r["listeners"].as_array().into_iter().flatten() {
        let at = endpoint_of(
            l["addr"].as_str().unwrap_or(""),
            l["port"].as_u64().unwrap_or(0) as u16,
        );
        let owner = Owner::of_json(&l["owner"]).map_or(String::new(), |o| format!(" {o}"));
        let a = &l["accept_queue"];
        let backlog = match (&a["backlog"]["exactly"], &a["backlog"]["at_least"]) {
            (Value::Number(n), _) => format!("backlog {n}"),
            (_, Value::Number(n)) => format!("backlog >= {n}, capped by somaxconn"),
            _ => String::new(),
        };
        let q = &l["syn_queue"];
        let syn_limit = q["limit"]
            .as_u64()
            .map_or("cookies".into(), |v| v.to_string());
        s += &format!(
            "{:<41} {:>5}/{:<5} {backlog:<24} {}/{}\n",
            format!("{at}{owner}"),
            a["len"],
            a["limit"],
            q["len"],
            syn_limit
        );
    }
    let advice = r["advice"].as_array().cloned().unwrap_or_default();
    if !advice.is_empty() {
        s += "\nADVICE\n";
        for a in advice {
            s += &format!(
                "- {}: {}\n",
                a["listener"].as_str().unwrap_or(""),
                a["advice"].as_str().unwrap_or("")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctls(somaxconn: u32, cookies: u32, max_syn: u32) -> BTreeMap<String, String> {
        [
            ("net/core/somaxconn", somaxconn),
            ("net/ipv4/tcp_syncookies", cookies),
            ("net/ipv4/tcp_max_syn_backlog", max_syn),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn backlog_is_exact_below_somaxconn_and_a_floor_at_it() {
        let s = sysctls(128, 1, 128);
        assert_eq!(limits(50, &s, None).backlog, Backlog::Exactly(50));
        assert_eq!(limits(128, &s, None).backlog, Backlog::AtLeast(128));
    }

    #[test]
    fn syn_limit_follows_the_measured_rule_and_syncookies() {
        let on = sysctls(4096, 1, 128);
        assert_eq!(limits(50, &on, Some(SynqRule::AtLimit)).syn_limit, Some(50));
        assert_eq!(
            limits(50, &on, Some(SynqRule::AboveLimit)).syn_limit,
            Some(51)
        );
        let off = sysctls(4096, 0, 128);
        // 128 - 32 + 1: the unproven-peer cut of tcp_max_syn_backlog.
        assert_eq!(
            limits(511, &off, Some(SynqRule::AboveLimit)).syn_limit,
            Some(97)
        );
        assert_eq!(
            limits(50, &off, Some(SynqRule::AboveLimit)).syn_limit,
            Some(51)
        );
        assert_eq!(limits(50, &sysctls(4096, 2, 128), None).syn_limit, None);
    }
}
