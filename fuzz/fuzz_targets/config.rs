//! The config file parser, then validation of what it accepted: errors, never a panic, and an
//! error never echoes the input whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qtrace_fuzz::config::{DaemonArgs, FileConfig, TracerArgs};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match FileConfig::parse(text) {
        Ok(file) => {
            let _ = TracerArgs::default().resolve(&file.tracer);
            if let Err(e) = DaemonArgs::default().resolve(&file.daemon) {
                assert!(format!("{e:#}").len() < 4096);
            }
        }
        Err(e) => assert!(format!("{e:#}").len() < 4096 + 2 * text.lines().count()),
    }
});
