//! qtrace's integration tests: one binary, one module per suite. Most need root: they load
//! qtrace's probes into this machine's kernel and provoke real drops in network namespaces of
//! their own. The kernel matrix (`cargo xtask vm-test`) runs the kernel-facing suites by
//! module path (`handshake::`, `queues::`, …); `daemon::`, `top::`, `web::` and `deploy::` need
//! outside servers and tools and run on this machine only, as does `hardening::` (hostile
//! clients and bad inputs; its ignored load test is `cargo xtask stress`'s).

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
mod top;
mod web;
