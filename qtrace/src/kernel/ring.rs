//! The kernel's event ring buffer, read from the event loop.

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, RingBuf},
    Ebpf,
};
use qtrace_common::{maps, Event};
use tokio::io::{unix::AsyncFd, Interest};

use crate::kernel::decode;

pub struct EventRing(AsyncFd<RingBuf<MapData>>);

impl EventRing {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let map = ebpf
            .take_map(maps::EVENTS)
            .context("event ring buffer missing from the eBPF object")?;
        let ring = RingBuf::try_from(map)?;
        // SAFETY: the RingBuf owns its map fd, which stays open until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("register the ring buffer with the event loop")?;
        Ok(Self(fd))
    }

    /// Waits for events and appends them all to `out`: the caller keeps one buffer for every
    /// wake-up, so a burst costs no allocation once the buffer has grown to it.
    pub async fn wait(&mut self, out: &mut Vec<Event>) -> Result<()> {
        let mut guard = self.0.readable_mut().await?;
        drain(guard.get_inner_mut(), out);
        guard.clear_ready();
        // The kernel wakes a reader only when a record lands where the reader has caught up
        // to; records committed while we were draining brought no wakeup, so look again after
        // clearing readiness, or they would wait for an event that never wakes us.
        drain(self.0.get_mut(), out);
        Ok(())
    }

    /// Appends whatever is in the ring now to `out`, without waiting (at shutdown).
    pub fn drain_now(&mut self, out: &mut Vec<Event>) {
        drain(self.0.get_mut(), out);
    }
}

fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<Event>) {
    while let Some(item) = ring.next() {
        out.extend(decode::decode(&item));
    }
}
