//! The commands, one module (or folder) per verb: [`run`] (the service), [`probes`],
//! [`events`], [`top`], [`doctor`], [`generate`] (hidden: completions and man pages
//! for packaging); [`table`] is the listener table `run --print` and `top`
//! share; [`logging`] sets up the log (`--log.level`, `--log.format`).
//!
//! Contract: the top of the import order. May import [`crate::daemon`], [`crate::kernel`],
//! [`crate::host`] and the common modules; nothing imports from here but `main.rs` and other
//! commands.

pub mod doctor;
pub mod events;
pub mod generate;
pub mod logging;
pub mod probes;
pub mod run;
pub mod table;
pub mod top;
