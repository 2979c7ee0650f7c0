//! The key every counter and event is attributed to: one listening socket.

/// Address family values as the kernel stores them in `skc_family`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Identifies a listening socket: network namespace, family, local address and port, and the
/// socket itself ([`ListenerKey::sock`]), so the sockets of one SO_REUSEPORT group are counted
/// apart and a socket that closes leaves nothing a later one could inherit (namespace inode
/// numbers and ports are reused; socket cookies never are).
///
/// IPv4 addresses occupy the first four bytes of `addr`, the rest stays zero, so two keys of
/// the same listener always compare equal byte for byte (it is a BPF hash-map key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    /// Inode number of the listener's network namespace (`ls -l /proc/<pid>/ns/net`).
    pub netns: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Local port, host byte order.
    pub port: u16,
    /// Local address, network byte order.
    pub addr: [u8; 16],
    /// The socket: its cookie (`SO_COOKIE`, `ss -e`'s `sk:`), or, while the kernel has not
    /// assigned one yet (cookies are made on first request: sock_diag's dump makes them for
    /// every socket it lists), [`SOCK_INODE`] | its inode number. 0 when neither could be read
    /// (a closing socket no longer has an inode).
    pub sock: u64,
}

/// Marks [`ListenerKey::sock`] as an inode number rather than a cookie (cookies count up from
/// 1 and never reach it).
pub const SOCK_INODE: u64 = 1 << 63;

/// Marks a counter map key as standing for a socket that had neither a cookie nor an inode (a
/// listener closing before qtrace's first dump of it), by its namespace and port: its entry's
/// [`ListenerKey::sock`] is 0. Two such sockets on one port of one namespace would share it.
pub const SOCK_ADDR: u64 = 1 << 62;

#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenerKey {}
