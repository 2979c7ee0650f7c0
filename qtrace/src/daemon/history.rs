//! The last hour of each listener, kept by the daemon for `qtrace doctor`'s advice ("accept
//! queue at its limit in 37% of the last hour's samples, 1,204 drops"): queues sampled every
//! `--queue-sample-interval`, tallied per minute. Bounded: 60 minutes per listener, at most
//! the listener series cap of listeners, and a listener gone for an hour is forgotten.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

pub use crate::api::LastHour;
use crate::{daemon::collect::Scrape, listener::ListenerId};

const MINUTES: u32 = 60;

/// One listener's tally for one minute: 16 bytes, so a listener's hour is under 1 KiB (at
/// most 600 samples a minute, at the shortest interval).
struct Minute {
    /// Minutes since the history began.
    index: u32,
    samples: u16,
    /// Samples where the accept queue held its limit or more.
    at_limit: u16,
    /// The listener's drop count (every reason) when the minute began.
    drops_before: u64,
}

const _: () = assert!(size_of::<Minute>() == 16);

pub struct History {
    start: Instant,
    interval: Duration,
    cap: usize,
    listeners: HashMap<ListenerId, VecDeque<Minute>>,
}

impl History {
    pub fn new(interval: Duration, cap: usize) -> Self {
        Self {
            start: Instant::now(),
            interval,
            cap,
            listeners: HashMap::new(),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Adds one sample of every listener in `scrape` whose queues were read.
    pub fn record(&mut self, scrape: &Scrape) {
        let now = (self.start.elapsed().as_secs() / 60) as u32;
        for v in &scrape.listeners {
            let Some(q) = &v.queues else { continue };
            if !self.listeners.contains_key(&v.id) && self.listeners.len() >= self.cap {
                continue;
            }
            let drops = v.drops();
            let minutes = self.listeners.entry(v.id).or_default();
            if minutes.back().is_none_or(|m| m.index != now) {
                minutes.push_back(Minute {
                    index: now,
                    samples: 0,
                    at_limit: 0,
                    drops_before: drops,
                });
            }
            let m = minutes.back_mut().expect("pushed above");
            m.samples += 1;
            m.at_limit += u16::from(q.acceptq_max > 0 && q.acceptq_len >= q.acceptq_max);
        }
        for minutes in self.listeners.values_mut() {
            while minutes.front().is_some_and(|m| m.index + MINUTES <= now) {
                minutes.pop_front();
            }
        }
        self.listeners.retain(|_, m| !m.is_empty());
    }

    /// The listener's last hour; `drops_now` is its drop count at this moment.
    pub fn last_hour(&self, id: &ListenerId, drops_now: u64) -> Option<LastHour> {
        let minutes = self.listeners.get(id)?;
        let samples: u32 = minutes.iter().map(|m| u32::from(m.samples)).sum();
        let at_limit: u32 = minutes.iter().map(|m| u32::from(m.at_limit)).sum();
        let first = minutes.front()?;
        Some(LastHour {
            sampled_seconds: (self.interval * samples)
                .as_secs_f64()
                .min(f64::from(MINUTES * 60)),
            samples,
            accept_queue_at_limit: f64::from(at_limit) / f64::from(samples.max(1)),
            drops: drops_now.saturating_sub(first.drops_before),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use qtrace_common::Counter;

    use super::*;
    use crate::{
        daemon::collect::ListenerView, host::sockdiag::ListenerQueues,
        kernel::counters::ListenerStats,
    };

    fn view(port: u16, len: u32, drops: u64) -> ListenerView {
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        let mut stats = ListenerStats::empty(Default::default());
        stats.counts[Counter::DropAcceptQueueFullSyn as usize] = drops;
        ListenerView {
            id: ListenerId {
                netns: 1,
                addr,
                port,
                socket: u64::from(port),
            },
            stats: Some(stats),
            queues: Some(ListenerQueues {
                addr,
                port,
                acceptq_len: len,
                acceptq_max: 4,
                synq_len: 0,
                inode: 0,
                cookie: u64::from(port),
                uid: 0,
                drops: 0,
            }),
            owner: None,
            unclassified: None,
        }
    }

    fn scrape(views: Vec<ListenerView>) -> Scrape {
        Scrape {
            listeners: views,
            programs: Vec::new(),
            self_stats: Default::default(),
            netns_unreadable: 0,
            netns_unattributed: Vec::new(),
            occupancy: Default::default(),
            reclaimed: 0,
            names: None,
            clients: Default::default(),
        }
    }

    #[test]
    fn tallies_time_at_the_limit_and_drops_since_the_first_sample() {
        let mut h = History::new(Duration::from_secs(10), 1);
        for (len, drops) in [(0, 5), (4, 5), (5, 9), (1, 12)] {
            h.record(&scrape(vec![view(80, len, drops), view(81, 4, 0)]));
        }
        let id = view(80, 0, 0).id;
        let last = h.last_hour(&id, 12).unwrap();
        assert_eq!(last.samples, 4);
        assert_eq!(last.sampled_seconds, 40.0);
        assert_eq!(last.accept_queue_at_limit, 0.5);
        assert_eq!(last.drops, 7);
        // Past the cap, a listener is not tracked.
        assert_eq!(h.last_hour(&view(81, 0, 0).id, 0), None);
    }
}
