//! A ring-buffer record as the kernel could hand it over: decoded, turned into the event the
//! events socket sends, serialized as the daemon writes it (the event carries its own
//! `"type":"event"`), and read back as a reader does (as a [`Line`]).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qtrace_fuzz::{
    api::Line,
    decode::{decode, to_record_named, ClientNames, Clock},
};

fuzz_target!(|data: &[u8]| {
    let Some(ev) = decode(data) else {
        return;
    };
    let record = to_record_named(&ev, &Clock::new(), &mut ClientNames::default());
    let line = serde_json::to_string(&record).expect("an event serializes");
    match serde_json::from_str(&line).expect("an event line reads back") {
        Line::Event(back) => assert_eq!(back, record),
        other => panic!("read back as {other:?}"),
    }
});
