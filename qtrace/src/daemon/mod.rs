//! The daemon's state and transports. [`collect`] joins the kernel's counters, the queues
//! sampled now in every namespace and each socket's owner into one view, with [`drops`]
//! reconciling the probes' drop counts with the sockets' and namespaces' own; [`state`] holds what
//! the daemon keeps (the collector, the owner cache, the last hour in [`history`]) and makes
//! the typed listener snapshot of [`crate::api`]; [`metrics`] renders the Prometheus
//! exposition; [`http`] serves /metrics, /healthz and /api/listeners; [`events_socket`] hands
//! events and snapshots to local readers.
//!
//! Contract: may import [`crate::kernel`], [`crate::host`] and the common modules
//! ([`crate::api`], [`crate::config`], [`crate::listener`]); never `crate::cli`. Transports do
//! not import each other: the events socket and HTTP both go through [`state`].

pub mod collect;
pub mod drops;
pub mod events_socket;
pub mod history;
pub mod http;
pub mod metrics;
pub mod state;
