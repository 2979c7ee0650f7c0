//! Decoding ring-buffer records into [`crate::api::Event`]s, with wall-clock time.

use std::time::{Duration, Instant, SystemTime};

use qtrace_common::{Event, EventKind};

use crate::{
    api::{self, EventTag},
    listener::{ip, Family},
};

/// Decodes one ring-buffer record; None for a short or unknown record.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is plain old data and read unaligned.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
    // Unclassified drops are the daemon's own account, never a kernel record.
    match EventKind::from_u8(ev.kind)? {
        EventKind::DropUnclassified => None,
        _ => Some(ev),
    }
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

    /// CLOCK_MONOTONIC now, in the kernel events' `ts_ns` terms.
    pub fn monotonic_ns(&self) -> u64 {
        monotonic_ns()
    }

    pub fn wall(&self, ts_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + self.realtime_minus_monotonic + Duration::from_nanos(ts_ns)
    }
}

/// CLOCK_MONOTONIC now: the clock of `bpf_ktime_get_ns()`, so of every event's `ts_ns`.
pub fn monotonic_ns() -> u64 {
    clock(libc::CLOCK_MONOTONIC).as_nanos() as u64
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

/// The kind of a decoded event (`decode` let no unknown kind through).
pub fn kind(ev: &Event) -> EventKind {
    EventKind::from_u8(ev.kind).unwrap_or(EventKind::DropOther)
}

/// The event as qtrace hands it on, without its owner (the daemon adds it).
#[cfg(test)]
pub fn to_record(ev: &Event, clock: &Clock) -> api::Event {
    to_record_named(ev, clock, &mut ClientNames::default())
}

/// [`to_record`], a client event's process named through `names` (a storm of failing
/// connects from one process reads its name once a second, not once per event).
pub fn to_record_named(ev: &Event, clock: &Clock, names: &mut ClientNames) -> api::Event {
    let l = &ev.listener;
    let kind = kind(ev);
    api::Event {
        record: EventTag::Event,
        time: humantime::format_rfc3339_millis(clock.wall(ev.ts_ns)).to_string(),
        ts_ns: ev.ts_ns,
        kind,
        netns: l.netns,
        family: Family::of(l.family),
        laddr: ip(l.family, l.addr),
        lport: l.port,
        // A cookie, or an inode the daemon turns into one (`OwnerIndex::cookie`).
        socket: l.sock,
        raddr: Some(ip(l.family, ev.raddr)),
        rport: Some(ev.rport),
        drops: None,
        retransmit: (kind == EventKind::SynackRetransmit).then_some(ev.retrans),
        acceptq_len: ev.acceptq_len,
        acceptq_max: ev.acceptq_max,
        synq_len: ev.synq_len,
        synq_max: ev.synq_max,
        owner: kind.is_client().then(|| names.owner(ev.pid)),
    }
}

/// The processes that called connect(), as the kernel recorded them (by pid), named from
/// /proc: each name read at most once per [`ClientNames::FRESH`] (a process that exits, or a
/// pid reused, within that time keeps the name read last).
#[derive(Default)]
pub struct ClientNames {
    read: std::collections::HashMap<u32, (std::sync::Arc<api::Owner>, Instant)>,
}

impl ClientNames {
    pub const FRESH: Duration = Duration::from_secs(1);
    /// Names kept at most; past it the cache starts over.
    const CAPACITY: usize = 4096;

    fn owner(&mut self, pid: u32) -> std::sync::Arc<api::Owner> {
        let now = Instant::now();
        if let Some((owner, at)) = self.read.get(&pid) {
            if now.duration_since(*at) < Self::FRESH {
                return owner.clone();
            }
        }
        if self.read.len() >= Self::CAPACITY {
            self.read
                .retain(|_, (_, at)| now.duration_since(*at) < Self::FRESH);
            if self.read.len() >= Self::CAPACITY {
                self.read.clear();
            }
        }
        let owner = client_owner(pid);
        self.read.insert(pid, (owner.clone(), now));
        owner
    }
}

/// The process that called connect(), as the kernel recorded it, named from /proc now (it may
/// have exited: then with no name). Client events carry their owner; the daemon adds a
/// listener's.
fn client_owner(pid: u32) -> std::sync::Arc<api::Owner> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    std::sync::Arc::new(api::Owner {
        pid: pid as i32,
        comm: comm.trim_end().to_string(),
        ..Default::default()
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use qtrace_common::{listener::AF_INET, ListenerKey};

    use super::*;
    use crate::api::{parse_kind, Line};

    /// A SYN-ACK retransmit at 127.0.0.1:8080 in netns 4026532000.
    pub(crate) fn retransmit() -> Event {
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
                sock: 0x1f2e,
            },
            raddr,
            rport: 40000,
            kind: EventKind::SynackRetransmit as u8,
            retrans: 2,
            acceptq_len: 1,
            acceptq_max: 1,
            synq_len: 3,
            synq_max: 1,
            pid: 0,
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
    fn records_round_trip_through_json() {
        let r = to_record(&retransmit(), &Clock::new());
        let back: api::Event = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            parse_kind("drop_accept_queue_full_syn"),
            Ok(EventKind::DropAcceptQueueFullSyn)
        );
        // The name before the vocabulary was unified is still understood.
        assert_eq!(
            parse_kind("syn_drop_accept_queue_full"),
            Ok(EventKind::DropAcceptQueueFullSyn)
        );
        let e = parse_kind("syn_drop").unwrap_err();
        assert!(e.contains("known: drop_syn_queue_full, "), "{e}");
    }

    #[test]
    fn daemon_lines_are_events_or_gaps() {
        let r = to_record(&retransmit(), &Clock::new());
        let line = serde_json::to_string(&r).unwrap();
        assert!(matches!(serde_json::from_str(&line).unwrap(), Line::Event(back) if back == r));
        let gap = serde_json::from_str(r#"{"type":"gap","missed":7}"#).unwrap();
        assert!(matches!(gap, Line::Gap { missed: 7 }));
    }

    #[test]
    fn ipv6_addresses_are_written_as_before() {
        let mut ev = retransmit();
        ev.listener.family = qtrace_common::listener::AF_INET6;
        ev.listener.addr = std::net::Ipv6Addr::LOCALHOST.octets();
        ev.raddr = std::net::Ipv4Addr::new(10, 1, 2, 3)
            .to_ipv6_mapped()
            .octets();
        let j = serde_json::to_value(to_record(&ev, &Clock::new())).unwrap();
        assert_eq!(
            (&j["family"], &j["laddr"], &j["raddr"]),
            (&"ipv6".into(), &"::1".into(), &"::ffff:10.1.2.3".into())
        );
    }

    /// The exact text: readers of the daemon's JSON Lines depend on it.
    #[test]
    fn json_text_is_the_wire_format() {
        let mut r = to_record(&retransmit(), &Clock::new());
        r.time = "2026-11-23T05:01:22.923Z".into();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            "{\"type\":\"event\",\"time\":\"2026-11-23T05:01:22.923Z\",\"ts_ns\":1000000000,\
             \"kind\":\"synack_retransmit\",\"netns\":4026532000,\"family\":\"ipv4\",\
             \"laddr\":\"127.0.0.1\",\"lport\":8080,\"socket\":\"1f2e\",\"raddr\":\"127.0.0.2\",\"rport\":40000,\
             \"retransmit\":2,\"acceptq_len\":1,\"acceptq_max\":1,\"synq_len\":3,\"synq_max\":1}"
        );
    }
}
