//! The daemon's state and transports. [`collect`] joins the kernel's counters, the queues
//! sampled now in every namespace and each socket's owner into one view, with [`drops`]
//! reconciling the probes' drop counts with the sockets' and namespaces' own; [`state`] holds what
//! the daemon keeps (the collector, the owner cache, the last hour in [`history`]) and makes
//! the typed listener snapshot of [`crate::api`]; [`metrics`] renders the Prometheus
//! exposition; [`http`] serves /metrics, /healthz and /api/listeners over the connections
//! [`http_limits`] accepts (a cap, timeouts), with the TLS and basic auth of [`web_config`]
//! (`--web.config.file`); [`events_socket`] hands events and snapshots to
//! local readers, reading each request through [`events_request`] and binding its file with
//! [`socket_file`]. [`single_flight`] lets concurrent collects share one; [`limits`] holds what
//! both transports share (the open-files budget, throttled warnings).
//!
//! Contract: may import [`crate::kernel`], [`crate::host`] and the common modules
//! ([`crate::api`], [`crate::config`], [`crate::listener`], [`crate::inputs`],
//! [`crate::recover`]); never `crate::cli`. Transports do not import each other: the events
//! socket and HTTP both go through [`state`] (and [`limits`]).

pub mod clients;
pub mod collect;
pub mod drops;
pub mod events_request;
pub mod events_socket;
pub mod history;
pub mod http;
pub mod http_limits;
pub mod limits;
pub mod metrics;
pub mod single_flight;
pub mod socket_file;
pub mod state;
pub mod web_config;
