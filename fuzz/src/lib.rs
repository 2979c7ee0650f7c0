//! qtrace's parsers of untrusted input, compiled from qtrace's own source files: the config
//! file parser (`config`), the ring-buffer record decoder (`decode`), the events socket's
//! request parser (`events_request`), the decoder of container runtimes' answers (`protobuf`),
//! with the common modules they name as `crate::…` (`api`,
//! `inputs`, `listener`: none of them needs the eBPF side).
#![allow(dead_code)]

#[path = "../../qtrace/src/api.rs"]
pub mod api;
#[path = "../../qtrace/src/config.rs"]
pub mod config;
#[path = "../../qtrace/src/kernel/decode.rs"]
pub mod decode;
#[path = "../../qtrace/src/daemon/events_request.rs"]
pub mod events_request;
#[path = "../../qtrace/src/inputs.rs"]
pub mod inputs;
#[path = "../../qtrace/src/listener.rs"]
pub mod listener;
#[path = "../../qtrace/src/host/protobuf.rs"]
pub mod protobuf;
