//! A listener's effective queue limits as the running kernel computes them, from its
//! `sk_max_ack_backlog`, its namespace's sysctls and the SYN-queue rule measured here.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::Duration,
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::host::sockdiag;

/// The sysctls that shape listen queues, per network namespace (`net.core.*` ones included:
/// they are per namespace too on current kernels).
pub const SYSCTLS: [&str; 9] = [
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SynqRule {
    /// Full when requests ≥ the accept queue limit.
    AtLimit,
    /// Full when requests > the accept queue limit (one more fits).
    AboveLimit,
}

impl SynqRule {
    /// Its name, as in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            SynqRule::AtLimit => "at_limit",
            SynqRule::AboveLimit => "above_limit",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
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

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
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
    // The request's type is c_ulong on glibc, c_int on musl (the static build).
    #[allow(clippy::unnecessary_cast)]
    let (get, set) = (
        libc::SIOCGIFFLAGS as libc::Ioctl,
        libc::SIOCSIFFLAGS as libc::Ioctl,
    );
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS with a valid ifreq for "lo".
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), get, &mut req) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), set, &req) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// The listen-queue sysctls of the calling thread's namespace, whitespace folded.
pub fn read_sysctls() -> BTreeMap<String, String> {
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
