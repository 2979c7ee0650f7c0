//! qtrace's integration tests: one binary, one module per suite. Most need root: they load
//! qtrace's probes into this machine's kernel and provoke real drops in network namespaces of
//! their own. The kernel matrix (`cargo xtask vm-test`) runs the kernel-facing suites by
//! module path (`handshake::`, `queues::`, …); `daemon::`, `top::`, `web::` and `deploy::` need
//! outside servers and tools and run on this machine only, as do `hardening::` (hostile
//! clients and bad inputs; its ignored load test is `cargo xtask stress`'s) and `workload::`
//! (a private containerd running containers; the dist test's guest covers cgroup v2).

mod common;

mod cli;
mod client;
mod daemon;
mod deploy;
mod detach;
mod doctor;
mod drops;
mod events;
mod handshake;
mod hardening;
mod queues;
mod sockets;
mod top;
mod web;
mod workload;
