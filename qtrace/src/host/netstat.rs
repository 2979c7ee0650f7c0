//! The kernel's own per-namespace TCP counters (`/proc/net/netstat`), read for the calling
//! thread's network namespace: `/proc/thread-self`, since `/proc/self/net` follows the
//! process's main thread, not the thread that joined another namespace.

use anyhow::{Context, Result};

/// TcpExt ListenDrops of the calling thread's network namespace: every handshake packet a
/// listener of that namespace dropped (`tcp_listendrop()`).
pub fn listen_drops() -> Result<u64> {
    const PATH: &str = "/proc/thread-self/net/netstat";
    let text = std::fs::read_to_string(PATH).with_context(|| format!("read {PATH}"))?;
    tcp_ext(&text, "ListenDrops").with_context(|| format!("no TcpExt ListenDrops in {PATH}"))
}

/// Field `name` of the `TcpExt:` lines (a line of names, then one of values).
fn tcp_ext(netstat: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_tcp_ext_field() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                    TcpExt: 3 5 7\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(tcp_ext(text, "ListenDrops"), Some(7));
        assert_eq!(tcp_ext(text, "Nope"), None);
    }

    #[test]
    fn reads_this_namespace() {
        assert!(listen_drops().is_ok());
    }
}
