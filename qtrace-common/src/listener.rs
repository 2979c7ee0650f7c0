//! The key every counter and event is attributed to: one listening socket.

/// Address family values as the kernel stores them in `skc_family`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Identifies a listening socket: network namespace, family, local address and port.
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
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ListenerKey {}
