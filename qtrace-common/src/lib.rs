//! Types shared by qtrace's kernel programs (`qtrace-ebpf`) and its user-space daemon.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side writes it into maps and the
//! ring buffer, user space reads the same bytes back.
#![no_std]

pub mod client;
pub mod counters;
pub mod event;
pub mod kernel;
pub mod listener;
pub mod vocabulary;

pub use client::{
    ClientCounter, ClientCounters, ClientKey, ClientOffsets, ConnectOwner, PortSearch,
    PortSearchSlot,
};
pub use counters::{Counter, ListenerCounters, SelfStat, WAIT_BUCKETS};
pub use event::{Event, EventKind};
pub use kernel::{HookLayout, Offsets};
pub use listener::ListenerKey;
pub use vocabulary::{ConnectFailure, DropReason};

/// Names of the maps in the eBPF object, used by both sides.
pub mod maps {
    /// Per-CPU hash: [`crate::ListenerKey`] → [`crate::ListenerCounters`], for listening
    /// sockets of system users (`sk_uid` below [`crate::globals::FIRST_USER_UID`]).
    pub const LISTENERS: &str = "QT_LISTENERS";
    /// The same for every other user's listening sockets: a user who opens thousands of
    /// listeners fills this one, never the system's.
    pub const USER_LISTENERS: &str = "QT_USER_LISTENERS";
    /// Ring buffer of [`crate::Event`] records.
    pub const EVENTS: &str = "QT_EVENTS";
    /// Per-CPU array of u64 indexed by [`crate::SelfStat`].
    pub const SELF_STATS: &str = "QT_SELF_STATS";
    /// Per-CPU hash: [`crate::ClientKey`] → [`crate::ClientCounters`].
    pub const CLIENTS: &str = "QT_CLIENTS";
    /// Hash: socket address → [`crate::ConnectOwner`], for active opens from connect() until
    /// they leave ESTABLISHED.
    pub const ACTIVE_OPENS: &str = "QT_ACTIVE_OPENS";
    /// Array of `--client-slots` records: the direct-mapped front of [`ACTIVE_OPENS`], a
    /// socket's record in the slot its address hashes to when that slot is free.
    pub const OPEN_SLOTS: &str = "QT_OPEN_SLOTS";
    /// Per-CPU array of [`crate::PortSearchSlot`]: each CPU's histograms of the namespaces
    /// that took a slot on that CPU (by a hash of the inode), before [`PORT_SEARCH`].
    pub const PORT_SEARCH_SLOTS: &str = "QT_PORT_SEARCH_SLOTS";
    /// Per-CPU hash: network namespace inode → [`crate::PortSearchSlot`] (the namespace and
    /// its histogram), for the namespaces whose slot another took on that CPU.
    pub const PORT_SEARCH: &str = "QT_PORT_SEARCH";
    /// Array of one u32, set to 1 by the loader when the port search's kprobe tier takes its
    /// start from the client probe: the client probe then also fills the connecting thread's
    /// slot as the socket enters SYN_SENT.
    pub const PORT_START_AT_CONNECT: &str = "QT_PORT_START_AT_CONNECT";
}

/// Names of the globals the loader fills in before the programs are verified.
pub mod globals {
    /// [`crate::Offsets`]: struct member offsets read from the running kernel's BTF.
    pub const OFFSETS: &str = "QT_OFFSETS";
    /// [`crate::HookLayout`]: facts about hooked functions and tracepoints read from BTF.
    pub const HOOKS: &str = "QT_HOOKS";
    /// u32: events each listener may emit per second on each CPU before they are suppressed.
    pub const EVENT_RATE: &str = "QT_EVENT_RATE";
    /// u32: the first uid whose listeners go to [`crate::maps::USER_LISTENERS`].
    pub const FIRST_USER_UID: &str = "QT_FIRST_USER_UID";
    /// [`crate::ClientOffsets`]: the members only the client programs read.
    pub const CLIENT_OFFSETS: &str = "QT_CLIENT_OFFSETS";
    /// u32: the number of [`crate::maps::OPEN_SLOTS`] less one (a power of two less one).
    pub const OPEN_SLOT_MASK: &str = "QT_OPEN_SLOT_MASK";
}
