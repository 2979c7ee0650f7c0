//! The events socket's request line: parsed, errors short, and what parses reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qtrace_fuzz::events_request::{parse_request, Request};

fuzz_target!(|data: &[u8]| match parse_request(data) {
    Ok(request) => {
        let line = serde_json::to_string(&request).unwrap();
        let back: Request = parse_request(line.as_bytes()).unwrap();
        assert_eq!(back, request);
    }
    Err(e) => assert!(format!("{e:#}").len() < 400),
});
