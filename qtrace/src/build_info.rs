//! What this binary is: its version, the git revision and date it was built from and with which
//! compiler (set by build.rs), for `qtrace --version` and `qtrace_build_info`. Common to every
//! layer; imports nothing.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const REVISION: &str = env!("QTRACE_REVISION");
pub const BUILD_DATE: &str = env!("QTRACE_BUILD_DATE");
pub const RUSTC_VERSION: &str = env!("QTRACE_RUSTC_VERSION");

/// `qtrace --version`, laid out as node_exporter's.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (revision: ",
    env!("QTRACE_REVISION"),
    ")\n  build date:       ",
    env!("QTRACE_BUILD_DATE"),
    "\n  rustc version:    ",
    env!("QTRACE_RUSTC_VERSION"),
);
