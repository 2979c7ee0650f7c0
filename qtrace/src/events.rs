//! Decoding ring-buffer records and rendering them for people and for machines.

use std::time::{Duration, SystemTime};

use qtrace_common::{Event, EventKind};
use serde::Serialize;

use crate::listener::{endpoint, family_name, ip, listener};

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

/// The JSON Lines form of an event (`"type": "event"`); field names are a stable interface.
#[derive(Serialize)]
pub struct EventJson {
    #[serde(rename = "type")]
    pub kind_of_record: &'static str,
    pub time: String,
    pub ts_ns: u64,
    pub kind: &'static str,
    pub netns: u32,
    pub family: &'static str,
    pub laddr: String,
    pub lport: u16,
    pub raddr: String,
    pub rport: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retransmit: Option<u8>,
    pub acceptq_len: u32,
    pub acceptq_max: u32,
    pub synq_len: u32,
    pub synq_max: u32,
}

fn kind(ev: &Event) -> EventKind {
    EventKind::from_u8(ev.kind).unwrap_or(EventKind::DropOther)
}

pub fn to_json(ev: &Event, clock: &Clock) -> EventJson {
    let l = &ev.listener;
    let k = kind(ev);
    EventJson {
        kind_of_record: "event",
        time: humantime::format_rfc3339_millis(clock.wall(ev.ts_ns)).to_string(),
        ts_ns: ev.ts_ns,
        kind: k.name(),
        netns: l.netns,
        family: family_name(l.family),
        laddr: ip(l.family, l.addr).to_string(),
        lport: l.port,
        raddr: ip(l.family, ev.raddr).to_string(),
        rport: ev.rport,
        retransmit: (k == EventKind::SynackRetransmit).then_some(ev.retrans),
        acceptq_len: ev.acceptq_len,
        acceptq_max: ev.acceptq_max,
        synq_len: ev.synq_len,
        synq_max: ev.synq_max,
    }
}

/// One line for an operator.
pub fn to_human(ev: &Event, clock: &Clock) -> String {
    let k = kind(ev);
    let what = if k == EventKind::SynackRetransmit {
        format!("{} #{}", k.describe(), ev.retrans)
    } else {
        k.describe().to_string()
    };
    format!(
        "{} {what:<31} {} <- {}  acceptq {}/{} synq {}/{}  netns {}",
        humantime::format_rfc3339_millis(clock.wall(ev.ts_ns)),
        listener(&ev.listener),
        endpoint(ev.listener.family, ev.raddr, ev.rport),
        ev.acceptq_len,
        ev.acceptq_max,
        ev.synq_len,
        ev.synq_max,
        ev.listener.netns,
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
        let j = serde_json::to_value(to_json(&retransmit(), &Clock::new())).unwrap();
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
        let line = to_human(&retransmit(), &Clock::new());
        assert!(line.contains("SYN-ACK retransmit #2"), "{line}");
        assert!(line.contains("127.0.0.1:8080 <- 127.0.0.2:40000"), "{line}");
        assert!(line.contains("acceptq 1/1 synq 3/1"), "{line}");
    }
}
