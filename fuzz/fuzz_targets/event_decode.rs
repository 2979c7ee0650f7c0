//! A ring-buffer record as the kernel could hand it over: decoded, turned into the record the
//! events socket sends, serialized, and read back as a reader does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qtrace_fuzz::events::{decode, to_human, to_record, Clock, Record};

fuzz_target!(|data: &[u8]| {
    let Some(ev) = decode(data) else {
        return;
    };
    let record = to_record(&ev, &Clock::new());
    let _ = to_human(&record);
    let line = serde_json::to_string(&record).expect("a record serializes");
    let back: Record = serde_json::from_str(&line).expect("a record reads back");
    assert_eq!(back, record);
});
