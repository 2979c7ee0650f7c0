//! Advice on the client side, from evidence: each namespace's census of connections
//! (sock_diag) and, with a daemon, the connect() failures it counted per destination and the
//! ages of CLOSE_WAIT connections it has watched.

use std::net::SocketAddr;

use qtrace_common::{ClientCounter, ConnectFailure};

use super::advice::Advice;
use crate::api::{CloseWaitOwner, Destination, NetnsCensus, PortUse};

/// Share of the usable ports from which a destination counts as close to exhaustion.
const NEAR_EXHAUSTION: f64 = 0.8;
/// CLOSE_WAIT worth a word: this many connections of one process, or one this old.
const CLOSE_WAIT_MANY: u64 = 100;
const CLOSE_WAIT_OLD_SECONDS: f64 = 60.0;

pub fn advise(out: &mut Vec<Advice>, census: &[NetnsCensus], destinations: Option<&[Destination]>) {
    let destinations = destinations.unwrap_or_default();
    for n in census {
        for u in &n.ephemeral {
            ephemeral(out, n, u, destinations);
        }
        time_wait(out, n);
        for o in &n.close_wait_owners {
            close_wait(out, n.netns, o);
        }
    }
    for d in destinations {
        failures(out, d);
    }
}

fn say(out: &mut Vec<Advice>, who: String, advice: String) {
    out.push(Advice {
        listener: who,
        advice,
        workload: String::new(),
    });
}

/// The processes whose connects towards `u`'s destination failed for want of a port.
fn starved<'a>(netns: u32, u: &PortUse, ds: &'a [Destination]) -> Vec<&'a Destination> {
    ds.iter()
        .filter(|d| d.netns == netns && d.addr == u.addr && d.port == u.port)
        .filter(|d| d.get(ClientCounter::ConnectNoPort) > 0)
        .collect()
}

fn ephemeral(out: &mut Vec<Advice>, n: &NetnsCensus, u: &PortUse, ds: &[Destination]) {
    let Some(available) = n.ports_available.filter(|a| *a > 0) else {
        return;
    };
    let failed = starved(n.netns, u, ds);
    if (u.in_use as f64) < NEAR_EXHAUSTION * available as f64 && failed.is_empty() {
        return;
    }
    let dest = SocketAddr::new(u.addr, u.port);
    let who = match failed.as_slice() {
        [] => format!("connections from {} to {dest} (netns {})", u.saddr, n.netns),
        fs => {
            let names: Vec<String> = fs
                .iter()
                .map(|d| format!("{}[{}]", d.comm, d.pid))
                .collect();
            format!("{} to {dest} (netns {})", names.join(", "), n.netns)
        }
    };
    let no_port: u64 = failed
        .iter()
        .map(|d| d.get(ClientCounter::ConnectNoPort))
        .sum();
    let mut advice = format!(
        "{} of {available} usable local ports towards {dest} in use from {}",
        u.in_use, u.saddr
    );
    if no_port > 0 {
        advice += &format!(
            "; {no_port} connects failed with EADDRNOTAVAIL (no free port) since qtrace started"
        );
    }
    let range = n
        .port_range
        .map_or(String::new(), |(lo, hi)| format!(" (now {lo}-{hi})"));
    advice += &format!(
        ": reuse connections (HTTP keep-alive, a connection pool) instead of one per request; \
         widen net.ipv4.ip_local_port_range{range}"
    );
    if n.tw_reuse != Some(1) {
        let now = n.tw_reuse.map_or(String::new(), |v| format!(" (now {v})"));
        advice += &format!("; enable net.ipv4.tcp_tw_reuse=1{now}");
    }
    advice += "; or spread connections over more source addresses, binding them with \
               IP_BIND_ADDRESS_NO_PORT so connect() picks the port per destination";
    say(out, who, advice);
}

fn time_wait(out: &mut Vec<Advice>, n: &NetnsCensus) {
    let Some(limit) = n.time_wait_limit.filter(|l| *l > 0) else {
        return;
    };
    if (n.time_wait as f64) < NEAR_EXHAUSTION * limit as f64 {
        return;
    }
    say(
        out,
        format!("netns {}", n.netns),
        format!(
            "{} connections in TIME_WAIT of net.ipv4.tcp_max_tw_buckets {limit}: past it the \
             kernel destroys new ones at once (TcpExt TCPTimeWaitOverflow) and late segments \
             of old connections may reach new ones; reuse connections (keep-alive, pools) so \
             fewer close, or raise the limit",
            n.time_wait
        ),
    );
}

/// "2 h 14 m", "5 m 3 s", "42 s".
fn age(seconds: f64) -> String {
    let s = seconds as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s} s"),
        (0, m, s) => format!("{m} m {s} s"),
        (h, m, _) => format!("{h} h {m} m"),
    }
}

fn close_wait(out: &mut Vec<Advice>, netns: u32, o: &CloseWaitOwner) {
    if o.sockets < CLOSE_WAIT_MANY && o.oldest_seconds < CLOSE_WAIT_OLD_SECONDS {
        return;
    }
    let who = if o.pid == 0 {
        format!("an unknown process (netns {netns})")
    } else {
        format!("{}[{}] (netns {netns})", o.comm, o.pid)
    };
    say(
        out,
        who,
        format!(
            "holds {} connections in CLOSE_WAIT, oldest {} (seen by qtrace): it does not \
             close sockets its peer closed; each holds a descriptor (and a pool slot) until \
             it does",
            o.sockets,
            age(o.oldest_seconds)
        ),
    );
}

fn failures(out: &mut Vec<Advice>, d: &Destination) {
    let dest = SocketAddr::new(d.addr, d.port);
    let who = format!("{}[{}] to {dest} (netns {})", d.comm, d.pid, d.netns);
    let n = |f: ConnectFailure| d.get(f.counter());
    let retrans = d.get(ClientCounter::SynRetransmits);
    if n(ConnectFailure::TimedOut) > 0 || retrans > 0 {
        say(
            out,
            who.clone(),
            format!(
                "{} connects timed out (SYN retries exhausted) and {retrans} SYNs were \
                 retransmitted (each a 1 s, 2 s, 4 s … stall): the destination drops SYNs (its \
                 listen queue overflows: run qtrace there) or something on the way does",
                n(ConnectFailure::TimedOut)
            ),
        );
    }
    if n(ConnectFailure::Refused) > 0 {
        say(
            out,
            who.clone(),
            format!(
                "{} connects refused: nothing listens on {dest}, or a firewall rejects them",
                n(ConnectFailure::Refused)
            ),
        );
    }
    if n(ConnectFailure::Aborted) > 0 {
        say(
            out,
            who,
            format!(
                "{} connects abandoned by the process before the handshake ended (its own \
                 connect timeout is shorter than the destination's answer)",
                n(ConnectFailure::Aborted)
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn census() -> NetnsCensus {
        NetnsCensus {
            netns: 4026531840,
            time_wait: 27901,
            close_wait: 412,
            time_wait_limit: Some(262144),
            port_range: Some((32768, 60999)),
            ports_available: Some(28232),
            tw_reuse: Some(2),
            close_wait_owners: vec![CloseWaitOwner {
                pid: 77,
                comm: "mysqld-client".into(),
                sockets: 412,
                oldest_seconds: 8040.0,
            }],
            ephemeral: vec![PortUse {
                saddr: "10.0.0.1".parse().unwrap(),
                addr: "10.0.0.5".parse().unwrap(),
                port: 3306,
                in_use: 27901,
            }],
        }
    }

    fn java(no_port: u64) -> Destination {
        Destination {
            netns: 4026531840,
            pid: 812,
            comm: "java".into(),
            addr: "10.0.0.5".parse().unwrap(),
            port: 3306,
            counters: BTreeMap::from([(ClientCounter::ConnectNoPort.name().into(), no_port)]),
        }
    }

    #[test]
    fn names_the_process_near_exhaustion_and_the_close_wait_leak() {
        let mut out = Vec::new();
        advise(&mut out, &[census()], Some(&[java(12)]));
        let ports = &out[0];
        assert_eq!(
            ports.listener,
            "java[812] to 10.0.0.5:3306 (netns 4026531840)"
        );
        assert!(
            ports.advice.starts_with(
                "27901 of 28232 usable local ports towards 10.0.0.5:3306 in use from 10.0.0.1; \
                 12 connects failed with EADDRNOTAVAIL"
            ),
            "{}",
            ports.advice
        );
        assert!(
            ports.advice.contains("tcp_tw_reuse=1 (now 2)"),
            "{}",
            ports.advice
        );
        assert!(ports
            .advice
            .contains("ip_local_port_range (now 32768-60999)"));
        let leak = &out[1];
        assert_eq!(leak.listener, "mysqld-client[77] (netns 4026531840)");
        assert!(leak
            .advice
            .starts_with("holds 412 connections in CLOSE_WAIT, oldest 2 h 14 m"));
    }

    #[test]
    fn says_nothing_without_evidence() {
        let mut quiet = census();
        quiet.ephemeral[0].in_use = 10;
        quiet.close_wait_owners[0].sockets = 3;
        quiet.close_wait_owners[0].oldest_seconds = 5.0;
        let mut out = Vec::new();
        advise(&mut out, &[quiet], Some(&[java(0)]));
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(age(42.0), "42 s");
        assert_eq!(age(303.0), "5 m 3 s");
    }
}
