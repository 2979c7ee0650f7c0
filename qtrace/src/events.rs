//! Decoding ring-buffer records and rendering them for people and for machines.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use qtrace_common::{Event, EventKind};
use serde::{Deserialize, Serialize};

use crate::{
    listener::{endpoint_of, family_name, ip},
    owners::Owner,
};

/// Decodes one ring-buffer record; None for a short or unknown record.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is plain old data and read unaligned.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    EventKind::from_u8(ev.kind)?;
    Some(ev)
}

/// Converts the kernel's CLOCK_MONOTONIC timestamps to wall-clock time.
#[derive(Clone, Copy)]
pub struct Clock {
    realtime_minus_monotonic: Duration,
}

impl Clock {
    pub fn new() -> Self {
        let mono = clock(libc::CLOCK_MONOTONIC);
        let real = clock(libc::CLOCK_REALTIME);
        Self {
            realtime_minus_monotonic: real.saturating_sub(mono),
        }
    }

    pub fn wall(&self, ts_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + self.realtime_minus_monotonic + Duration::from_nanos(ts_ns)
    }
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer.
    unsafe { libc::clock_gettime(id, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// An event as qtrace hands it on (JSON Lines, the events socket): a stable interface.
/// `owner` is filled in by the daemon when it knows the listening socket's process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    #[serde(rename = "type")]
    pub record: String,
    pub time: String,
    pub ts_ns: u64,
    pub kind: String,
    pub netns: u32,
    pub family: String,
    pub laddr: String,
    pub lport: u16,
    pub raddr: String,
    pub rport: u16,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retransmit: Option<u8>,
    pub acceptq_len: u32,
    pub acceptq_max: u32,
    pub synq_len: u32,
    pub synq_max: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    /// Shared with the daemon's owner map: an event does not copy its strings.
    pub owner: Option<Arc<Owner>>,
}

fn kind(ev: &Event) -> EventKind {
    EventKind::from_u8(ev.kind).unwrap_or(EventKind::DropOther)
}

pub fn to_record(ev: &Event, clock: &Clock) -> Record {
    let l = &ev.listener;
    let k = kind(ev);
    Record {
        record: "event".into(),
        time: humantime::format_rfc3339_millis(clock.wall(ev.ts_ns)).to_string(),
        ts_ns: ev.ts_ns,
        kind: k.name().into(),
        netns: l.netns,
        family: family_name(l.family).into(),
        laddr: ip(l.family, l.addr).to_string(),
        lport: l.port,
        raddr: ip(l.family, ev.raddr).to_string(),
        rport: ev.rport,
        retransmit: (k == EventKind::SynackRetransmit).then_some(ev.retrans),
        acceptq_len: ev.acceptq_len,
        acceptq_max: ev.acceptq_max,
        synq_len: ev.synq_len,
        synq_max: ev.synq_max,
        owner: None,
    }
}

/// The event's kind as an operator reads it.
pub fn describe(kind: &str) -> &'static str {
    (1..=u8::MAX)
        .map_while(EventKind::from_u8)
        .find(|k| k.name() == kind)
        .map_or("unknown event", EventKind::describe)
}

/// One line for an operator.
pub fn to_human(r: &Record) -> String {
    let what = match r.retransmit {
        Some(n) => format!("{} #{n}", describe(&r.kind)),
        None => describe(&r.kind).to_string(),
    };
    let owner = r.owner.as_ref().map_or(String::new(), |o| format!("  {o}"));
    format!(
        "{} {what:<31} {} <- {}  acceptq {}/{} synq {}/{}  netns {}{owner}",
        r.time,
        endpoint_of(&r.laddr, r.lport),
        endpoint_of(&r.raddr, r.rport),
        r.acceptq_len,
        r.acceptq_max,
        r.synq_len,
        r.synq_max,
        r.netns,
    )
}

#[cfg(test)]
mod tests {
    use qtrace_common::{listener::AF_INET, ListenerKey};

    use super::*;

    fn retransmit() -> Event {
        let mut laddr = [0u8; 16];
        laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut raddr = [0u8; 16];
        raddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        Event {
            ts_ns: 1_000_000_000,
            listener: ListenerKey {
                netns: 4026532000,
                family: AF_INET,
                port: 8080,
                addr: laddr,
            },
            raddr,
            rport: 40000,
            kind: EventKind::SynackRetransmit as u8,
            retrans: 2,
            acceptq_len: 1,
            acceptq_max: 1,
            synq_len: 3,
            synq_max: 1,
            _pad: 0,
        }
    }

    fn bytes(ev: &Event) -> Vec<u8> {
        // SAFETY: Event is plain old data.
        unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    #[test]
    fn decodes_what_the_kernel_writes() {
        let ev = retransmit();
        assert_eq!(decode(&bytes(&ev)), Some(ev));
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let ev = retransmit();
        assert_eq!(decode(&bytes(&ev)[..size_of::<Event>() - 1]), None);
        let mut bad = ev;
        bad.kind = 0;
        assert_eq!(decode(&bytes(&bad)), None);
    }

    #[test]
    fn json_names_listener_and_peer() {
        let j = serde_json::to_value(to_record(&retransmit(), &Clock::new())).unwrap();
        assert_eq!(j["type"], "event");
        assert_eq!(j["kind"], "synack_retransmit");
        assert_eq!(j["laddr"], "127.0.0.1");
        assert_eq!(j["lport"], 8080);
        assert_eq!(j["raddr"], "127.0.0.2");
        assert_eq!(j["rport"], 40000);
        assert_eq!(j["retransmit"], 2);
        assert_eq!(j["netns"], 4026532000u32);
    }

    #[test]
    fn human_line_reads_like_the_kernel_state() {
        let mut r = to_record(&retransmit(), &Clock::new());
        r.owner = Some(Arc::new(Owner {
            pid: 1234,
            comm: "nginx".into(),
            unit: "nginx.service".into(),
        }));
        let line = to_human(&r);
        assert!(line.contains("SYN-ACK retransmit #2"), "{line}");
        assert!(line.contains("127.0.0.1:8080 <- 127.0.0.2:40000"), "{line}");
        assert!(line.contains("acceptq 1/1 synq 3/1"), "{line}");
        assert!(line.ends_with("nginx[1234]"), "{line}");
    }

    #[test]
    fn records_round_trip_through_json() {
        let r = to_record(&retransmit(), &Clock::new());
        let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            describe("syn_drop_accept_queue_full"),
            "SYN dropped: accept queue full"
        );
    }
}
