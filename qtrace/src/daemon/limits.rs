//! What both transports share to stay within the process's means: the open-files limit they
//! divide between them ([`open_files`]; HTTP takes at most half, the events socket a quarter),
//! and warnings that would repeat per connection logged at most once per [`LOG_EVERY`]
//! ([`Throttled`]).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// The open-files limit (RLIMIT_NOFILE's soft limit; 1,024 if it cannot be read).
pub fn open_files() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } {
        0 => lim.rlim_cur as usize,
        _ => 1024,
    }
}

/// Milliseconds since the first call: a clock that fits an atomic.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A warning logged at most once per [`LOG_EVERY`], with how many times it was due since.
pub struct Throttled {
    last_ms: AtomicU64,
    due: AtomicU64,
}

impl Throttled {
    pub const fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(u64::MAX),
            due: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence; returns how many to report when it is time to log.
    pub fn due(&self) -> Option<u64> {
        let n = self.due.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != u64::MAX && now.saturating_sub(last) < LOG_EVERY.as_millis() as u64 {
            return None;
        }
        self.last_ms.store(now, Ordering::Relaxed);
        self.due.store(0, Ordering::Relaxed);
        Some(n)
    }
}
