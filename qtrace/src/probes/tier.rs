//! The attach tiers, best first (alone in a file of its own: the config parser needs it, and the
//! fuzz targets include that parser without the rest of the probes).

use std::fmt;

use serde::Serialize;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Fentry, Tier::Kprobe, Tier::Tracepoint];
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Fentry => "fentry",
            Tier::Kprobe => "kprobe",
            Tier::Tracepoint => "tracepoint",
        })
    }
}
