//! What qtrace reads about the host outside its eBPF programs: network namespaces and running
//! code inside one ([`netns`]), every listener's queues and own drop count from sock_diag
//! ([`sockdiag`]), each namespace's ListenDrops ([`netstat`]), the process owning each
//! listening socket ([`owners`]) and the service or container it belongs to ([`workload`]),
//! the names of containers, pods and network namespaces ([`names`], asking the container
//! runtimes of [`runtimes`] over [`grpc`] and [`protobuf`]), the connections' census of each
//! namespace: TIME_WAIT, CLOSE_WAIT and ephemeral ports in use ([`census`]), and the process
//! heap ([`heap`]).
//!
//! Contract: owns /proc, setns, netlink and container runtime access. May import
//! `qtrace_common`, [`crate::api`], [`crate::listener`], [`crate::inputs`] and
//! [`crate::recover`]; never `crate::kernel`, `crate::daemon` or `crate::cli`.

pub mod census;
pub mod grpc;
pub mod heap;
pub mod names;
pub mod netns;
pub mod netstat;
pub mod owners;
pub mod protobuf;
pub mod runtimes;
pub mod sockdiag;
pub mod workload;
