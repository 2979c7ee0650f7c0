//! A listener's identity ([`ListenerId`]) and the human and JSON forms of listener keys and
//! remote endpoints. Common to every layer; imports only `qtrace_common`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use qtrace_common::{listener::AF_INET6, ListenerKey};
use serde::{Deserialize, Serialize};

/// The address in `bytes` for `family` (IPv4 in the first four bytes).
pub fn ip(family: u16, bytes: [u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// A listening socket as exported: (netns inode, address, port, socket cookie). The sockets
/// of one SO_REUSEPORT group share the first three and are told apart by the cookie, which
/// stays the same for the socket's life and is never reused (`ss -e` shows it as `sk:`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ListenerId {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
    /// The socket's cookie; 0 where it is not known (a table read from the kernel's counters
    /// alone sums each address's sockets).
    #[serde(default, with = "socket_hex")]
    pub socket: u64,
}

impl ListenerId {
    /// `addr:port`, with IPv6 addresses in brackets.
    pub fn endpoint(&self) -> String {
        SocketAddr::new(self.addr, self.port).to_string()
    }

    /// The listening address this socket shares with its SO_REUSEPORT siblings.
    pub fn address(&self) -> (u32, IpAddr, u16) {
        (self.netns, self.addr, self.port)
    }
}

/// The listener of a kernel key, without its socket: the kernel's key carries a cookie or an
/// inode, which only a sock_diag dump tells apart (see `daemon::collect`).
impl From<&ListenerKey> for ListenerId {
    fn from(k: &ListenerKey) -> Self {
        Self {
            netns: k.netns,
            addr: ip(k.family, k.addr),
            port: k.port,
            socket: 0,
        }
    }
}

/// Whether a socket cookie is unknown (0), for `skip_serializing_if`.
pub fn is_unknown(cookie: &u64) -> bool {
    *cookie == 0
}

/// A socket cookie in JSON: a lowercase hex string, as in the `socket` metric label.
pub mod socket_hex {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(cookie: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{cookie:x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(de::Error::custom)
    }
}

/// An address family as JSON names it (`"ipv4"`, `"ipv6"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// The family of an address as qtrace writes it (IPv4 listeners' addresses are IPv4).
    pub fn of_addr(addr: &IpAddr) -> Self {
        if addr.is_ipv6() {
            Self::Ipv6
        } else {
            Self::Ipv4
        }
    }

    /// The family of a kernel `skc_family` value.
    pub fn of(family: u16) -> Self {
        if family == AF_INET6 {
            Self::Ipv6
        } else {
            Self::Ipv4
        }
    }
}

/// `addr:port`, with IPv6 addresses in brackets.
pub fn endpoint(family: u16, addr: [u8; 16], port: u16) -> String {
    SocketAddr::new(ip(family, addr), port).to_string()
}

pub fn listener(key: &ListenerKey) -> String {
    endpoint(key.family, key.addr, key.port)
}

#[cfg(test)]
mod tests {
    use qtrace_common::listener::AF_INET;

    use super::*;

    fn key(family: u16, addr: [u8; 16], port: u16) -> ListenerKey {
        ListenerKey {
            netns: 4026531840,
            family,
            port,
            addr,
            sock: 0,
        }
    }

    #[test]
    fn ipv4_listener_uses_first_four_bytes() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(listener(&key(AF_INET, addr, 8080)), "127.0.0.1:8080");
        assert_eq!(listener(&key(AF_INET, [0; 16], 80)), "0.0.0.0:80");
    }

    #[test]
    fn ipv6_listener_is_bracketed() {
        assert_eq!(listener(&key(AF_INET6, [0; 16], 443)), "[::]:443");
        let loopback = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(listener(&key(AF_INET6, loopback, 8443)), "[::1]:8443");
    }

    #[test]
    fn ipv4_peer_of_ipv6_listener_is_mapped() {
        let mapped = Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets();
        assert_eq!(endpoint(AF_INET6, mapped, 5000), "[::ffff:10.1.2.3]:5000");
        assert_eq!(serde_json::json!(Family::of(AF_INET6)), "ipv6");
        assert_eq!(serde_json::json!(Family::of(AF_INET)), "ipv4");
    }
}
