//! The daemon's local events socket: live events to any number of readers, each with its own
//! filter and bounded backlog, plus a short history for `qtrace events --since`, and listener
//! snapshots for `qtrace top`/`doctor`. Client addresses travel only here, never to /metrics.
//! Each event gets its listener's owner from the daemon's [`State`] (never from HTTP).
//!
//! Protocol: the client writes one JSON line, `{"request":"events","since_ns":N,"filter":F}`
//! (`filter` optional: an [`EventFilter`], e.g. `{"netns":4026531840,"kind":["drop_other"]}`)
//! or `{"request":"listeners"}`; the daemon answers with JSON lines (the events the filter
//! admits; `{"type":"gap","missed":N}` where the reader fell behind and lost N of them; and
//! first, for `since_ns`, `{"type":"trimmed","missed":N}` when N of the events it asked for
//! are no longer kept, with `"bound":true` where N is at most that many) or one snapshot line;
//! a request it refuses gets `{"type":"error","message":…}` as the last line.

use std::{
    collections::VecDeque,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use anyhow::{Context, Result};
use qtrace_common::EventKind;
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{watch, Notify},
};

use crate::{
    api::{Event, EventFilter, Line, Listeners, Owner, Request},
    daemon::state::State,
};

/// Events kept for `--since`.
pub const HISTORY: usize = 4096;
/// Trimmed events whose time and filter keys are kept, to tell a `--since` reader how many of
/// the events it asked for are gone: 40 bytes each, and the owners they keep alive (shared
/// with the history's and the owner cache's; a few MiB at worst, where every event had an
/// owner of its own).
const TRIMMED_KEPT: usize = 4 * HISTORY;
/// All readers' queues together hold at most this many readers' worth of events: each reader
/// holds its own events, and readers stuck at different moments would otherwise hold
/// `--events-reader-queue` different events each (1,024 readers x 1,024 events).
const QUEUED_READERS: usize = 16;
/// Kernel buffer per reader: with the queue, what a stuck reader can hold up.
const READER_SNDBUF: libc::c_int = 32 * 1024;

/// An event as published: shared by every reader's queue and the history, with its JSON line
/// written at most once, by the first reader (or `--print --json`) that needs it.
pub struct Published {
    pub event: Event,
    line: OnceLock<String>,
}

impl Published {
    /// The event's JSON line, newline included.
    pub fn line(&self) -> &str {
        self.line.get_or_init(|| {
            let mut s = serde_json::to_string(&self.event).expect("plain data");
            s.push('\n');
            s
        })
    }
}

/// The last [`HISTORY`] events, and what is left of those trimmed before them.
#[derive(Default)]
struct History {
    events: VecDeque<Arc<Published>>,
    trimmed: Trimmed,
}

impl History {
    fn push(&mut self, event: Arc<Published>) {
        if self.events.len() == HISTORY {
            if let Some(old) = self.events.pop_front() {
                self.trimmed.push(TrimmedEvent::of(&old.event));
            }
        }
        self.events.push_back(event);
    }

    /// The events `filter` admits since `since_ns` (none for 0: live only), and how many more
    /// of them were trimmed.
    fn since(&self, since_ns: u64, filter: &EventFilter) -> (Vec<Arc<Published>>, TrimmedCount) {
        if since_ns == 0 {
            return (Vec::new(), TrimmedCount::default());
        }
        let kept = self
            .events
            .iter()
            .filter(|r| r.event.ts_ns >= since_ns && filter.admits(&r.event))
            .cloned()
            .collect();
        (kept, self.trimmed.since(since_ns, filter))
    }
}

/// What a reader's filter needs of a trimmed event (40 bytes; the owner is shared).
struct TrimmedEvent {
    ts_ns: u64,
    owner: Option<Arc<Owner>>,
    netns: u32,
    port: u16,
    kind: EventKind,
    addr: IpAddr,
}

impl TrimmedEvent {
    fn of(e: &Event) -> Self {
        Self {
            ts_ns: e.ts_ns,
            owner: e.owner.clone(),
            netns: e.netns,
            port: e.lport,
            kind: e.kind,
            addr: e.laddr,
        }
    }
}

/// How many of the events a `--since` reader asked for were trimmed; `bound`: at most that
/// many (see [`Trimmed::since`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TrimmedCount {
    missed: u64,
    bound: bool,
}

/// The events trimmed from the history: the last [`TRIMMED_KEPT`] as what a filter needs, the
/// ones before them as a count and the newest time among them.
#[derive(Default)]
struct Trimmed {
    recent: VecDeque<TrimmedEvent>,
    older: u64,
    older_newest_ns: u64,
}

impl Trimmed {
    fn push(&mut self, event: TrimmedEvent) {
        if self.recent.len() == TRIMMED_KEPT {
            if let Some(old) = self.recent.pop_front() {
                self.older += 1;
                self.older_newest_ns = self.older_newest_ns.max(old.ts_ns);
            }
        }
        self.recent.push_back(event);
    }

    /// How many trimmed events `filter` admits at or after `since_ns`: exact among the last
    /// [`TRIMMED_KEPT`]; the ones before them count whole (whatever their kind and time) once
    /// any of them may be that recent, and the figure is then a bound.
    fn since(&self, since_ns: u64, filter: &EventFilter) -> TrimmedCount {
        let recent = self
            .recent
            .iter()
            .filter(|t| {
                t.ts_ns >= since_ns
                    && filter.admits_at(t.netns, t.addr, t.port, t.kind, t.owner.as_deref())
            })
            .count() as u64;
        let bound = self.older > 0 && since_ns <= self.older_newest_ns;
        TrimmedCount {
            missed: recent + if bound { self.older } else { 0 },
            bound,
        }
    }
}

/// Readers subscribed now (the hub's list's length, stored under its lock), and the events
/// readers were not sent because their queue was full
/// (summed over readers; each is told its own with a gap line), for /metrics.
static READERS: AtomicUsize = AtomicUsize::new(0);
static MISSED: AtomicU64 = AtomicU64::new(0);

/// The events socket's own figures, for /metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub readers: usize,
    pub missed: u64,
}

pub fn stats() -> Stats {
    Stats {
        readers: READERS.load(Ordering::Relaxed),
        missed: MISSED.load(Ordering::Relaxed),
    }
}

/// One reader: what it asked for, and its queue.
struct Reader {
    filter: EventFilter,
    queue: Mutex<Queue>,
    /// Set when the queue changes (a permit waits if the reader is busy writing).
    ready: Notify,
    /// Events queued in all readers' queues (see [`QUEUED_READERS`]).
    queued: Arc<AtomicUsize>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        let q = crate::recover::lock(&self.queue);
        self.queued.fetch_sub(q.events, Ordering::Relaxed);
    }
}

/// A reader's events not yet written, in order, bounded; where it lost some (the queue
/// full), a count of them in their place.
#[derive(Default)]
struct Queue {
    entries: VecDeque<Entry>,
    events: usize,
}

enum Entry {
    Event(Arc<Published>),
    Gap(u64),
}

impl Reader {
    /// Queues `event`, or counts it lost if `per_reader` events are queued already, or
    /// `all` in all readers' queues. (Offers are made under the hub's lock, one at a time.)
    fn offer(&self, event: &Arc<Published>, per_reader: usize, all: usize) {
        let mut q = crate::recover::lock(&self.queue);
        if q.events < per_reader && self.queued.load(Ordering::Relaxed) < all {
            q.entries.push_back(Entry::Event(event.clone()));
            q.events += 1;
            self.queued.fetch_add(1, Ordering::Relaxed);
        } else {
            MISSED.fetch_add(1, Ordering::Relaxed);
            match q.entries.back_mut() {
                Some(Entry::Gap(n)) => *n += 1,
                _ => q.entries.push_back(Entry::Gap(1)),
            }
        }
        drop(q);
        self.ready.notify_one();
    }

    /// Moves queued lines into `text` until it holds [`BATCH_BYTES`] or the queue is empty.
    fn take(&self, text: &mut String) {
        let mut q = crate::recover::lock(&self.queue);
        while text.len() < BATCH_BYTES {
            match q.entries.pop_front() {
                Some(Entry::Event(e)) => {
                    q.events -= 1;
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    text.push_str(e.line());
                }
                Some(Entry::Gap(missed)) => {
                    text.push_str(&serde_json::to_string(&Line::Gap { missed }).expect("plain"));
                    text.push('\n');
                }
                None => break,
            }
        }
    }
}

/// The history and the readers, under one lock: an event published while a reader subscribes
/// is in its past or in its queue, never in both or neither.
#[derive(Default)]
struct Shared {
    history: History,
    readers: Vec<Arc<Reader>>,
    /// Events in all readers' queues.
    queued: Arc<AtomicUsize>,
}

impl Shared {
    /// Keeps `event` in the history and queues it for every reader whose filter admits it,
    /// up to `per_reader` queued each and [`QUEUED_READERS`] readers' worth in all.
    fn publish(&mut self, event: &Arc<Published>, per_reader: usize) {
        self.history.push(event.clone());
        let all = per_reader.saturating_mul(QUEUED_READERS);
        for reader in &self.readers {
            if reader.filter.admits(&event.event) {
                reader.offer(event, per_reader, all);
            }
        }
    }

    /// A new reader of what `filter` admits, its past since `since_ns`, and how many more of
    /// those were trimmed.
    fn subscribe(
        &mut self,
        since_ns: u64,
        filter: EventFilter,
    ) -> (Arc<Reader>, Vec<Arc<Published>>, TrimmedCount) {
        let (past, trimmed) = self.history.since(since_ns, &filter);
        let reader = Arc::new(Reader {
            filter,
            queue: Mutex::default(),
            ready: Notify::new(),
            queued: self.queued.clone(),
        });
        self.readers.push(reader.clone());
        READERS.store(self.readers.len(), Ordering::Relaxed);
        (reader, past, trimmed)
    }
}

/// Where events go: each reader's queue (what its filter admits) and the `--since` history.
pub struct Hub {
    per_reader: usize,
    shared: Mutex<Shared>,
    state: Arc<State>,
}

/// A subscribed reader: it leaves the hub when dropped.
struct Subscription {
    hub: Arc<Hub>,
    reader: Arc<Reader>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut shared = crate::recover::lock(&self.hub.shared);
        shared.readers.retain(|r| !Arc::ptr_eq(r, &self.reader));
        READERS.store(shared.readers.len(), Ordering::Relaxed);
    }
}

impl Hub {
    /// `per_reader`: events queued for each reader before it is told it missed some.
    pub fn new(per_reader: usize, state: Arc<State>) -> Arc<Self> {
        Arc::new(Self {
            per_reader,
            shared: Mutex::new(Shared::default()),
            state,
        })
    }

    /// Hands an event to every reader whose filter admits it, with its listener's owner when
    /// known.
    pub fn publish(&self, mut record: Event) -> Arc<Published> {
        // Client events carry the process that called connect(); a listener's is looked up.
        if !record.kind.is_client() {
            record.socket = self.state.socket_cookie(record.socket);
            record.owner = self.state.owner_of(&record.listener());
        }
        let record = Arc::new(Published {
            event: record,
            line: OnceLock::new(),
        });
        crate::recover::lock(&self.shared).publish(&record, self.per_reader);
        record
    }

    /// A new reader of what `filter` admits: its past since `since_ns`, how many more of
    /// those were trimmed, and from now on its queue.
    fn subscribe(
        self: &Arc<Self>,
        since_ns: u64,
        filter: EventFilter,
    ) -> (Subscription, Vec<Arc<Published>>, TrimmedCount) {
        let (reader, past, trimmed) =
            crate::recover::lock(&self.shared).subscribe(since_ns, filter);
        let sub = Subscription {
            hub: self.clone(),
            reader,
        };
        (sub, past, trimmed)
    }
}

/// The socket: `path` with mode 0660 and, if given, group `group`. Returns a guard that
/// removes the file.
pub fn bind(path: &Path, group: Option<&str>) -> Result<(UnixListener, SocketFile)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // Refuses a non-socket file and a live daemon's socket; replaces a dead one's.
    let (listener, guard) = crate::daemon::socket_file::bind(path)?;
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(group) = group {
        let gid = gid_of(group)?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("give {} to group {group}", path.display()))?;
    }
    Ok((listener, guard))
}

fn gid_of(group: &str) -> Result<u32> {
    let name = std::ffi::CString::new(group)?;
    // SAFETY: a valid C string; getgrnam's result is read at once, before any other call.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    anyhow::ensure!(
        !entry.is_null(),
        "no group named {} (events_socket_group)",
        crate::inputs::clip(group)
    );
    Ok(unsafe { (*entry).gr_gid })
}

pub use crate::daemon::socket_file::SocketFile;

pub async fn serve(listener: UnixListener, hub: Arc<Hub>, stop: watch::Receiver<bool>) {
    let mut stopped = stop.clone();
    // Clients at once: past it a new one is closed at once (see client_slots).
    let slots = Arc::new(tokio::sync::Semaphore::new(client_slots()));
    static REFUSED: crate::daemon::limits::Throttled = crate::daemon::limits::Throttled::new();
    static FAILED: crate::daemon::limits::Throttled = crate::daemon::limits::Throttled::new();
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        if let Some(n) = REFUSED.due() {
                            tracing::warn!("events socket: {n} client(s) refused at the limit of \
                                            {} since the last report", client_slots());
                        }
                        continue;
                    };
                    limit_send_buffer(&stream);
                    let (hub, stop) = (hub.clone(), stop.clone());
                    tokio::spawn(async move {
                        if let Err(e) = client(stream, hub, stop).await {
                            tracing::debug!("events socket client: {e:#}");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    if let Some(n) = FAILED.due() {
                        tracing::warn!("events socket: accept failed {n} time(s): {e}");
                    }
                    // Out of fds or memory: a pause, not a busy loop.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            () = async { let _ = stopped.wait_for(|s| *s).await; } => return,
        }
    }
}

async fn client(stream: UnixStream, hub: Arc<Hub>, mut stop: watch::Receiver<bool>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    // Bounded in size and time; then the read side only watches for the client going away.
    let mut read = BufReader::new(read);
    let request = match crate::daemon::events_request::read_request(&mut read).await {
        Ok(request) => request,
        Err(e) => {
            // Said to the client (its last line), not only logged: a request the daemon
            // refuses must not look like a daemon that stopped.
            let message = crate::inputs::clip_to(&format!("{e:#}"), 300);
            let line = serde_json::to_string(&Line::Error { message }).expect("plain data");
            let _ = write.write_all(format!("{line}\n").as_bytes()).await;
            return Err(e);
        }
    };
    let (since_ns, filter) = match request {
        Request::Listeners => {
            let snapshot = serde_json::to_string(&hub.state.snapshot().await?)?;
            write.write_all(format!("{snapshot}\n").as_bytes()).await?;
            return Ok(());
        }
        Request::Events { since_ns, filter } => (since_ns, filter),
    };
    let (sub, past, trimmed) = hub.subscribe(since_ns, filter);
    let mut text = String::new();
    if trimmed.missed > 0 {
        text = serde_json::to_string(&Line::Trimmed {
            missed: trimmed.missed,
            bound: trimmed.bound,
        })
        .expect("plain data");
        text.push('\n');
    }
    for r in past {
        text.push_str(r.line());
    }
    write.write_all(text.as_bytes()).await?;
    loop {
        // What is queued goes in one write: a burst costs one write per BATCH_BYTES, not one
        // per event.
        text.clear();
        sub.reader.take(&mut text);
        if text.is_empty() {
            tokio::select! {
                () = sub.reader.ready.notified() => continue,
                () = crate::daemon::events_request::closed(&mut read) => return Ok(()),
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
        write.write_all(text.as_bytes()).await?;
    }
}

/// How much of a reader's queue one write takes at most: a burst costs one write per dozen
/// events or so, and a stuck reader holds up hardly more than READER_SNDBUF and its queue
/// (a larger batch would be a buffer of its own that the queue's bound does not count).
const BATCH_BYTES: usize = 4 * 1024;

/// Events socket clients served at once: 1,024, or a quarter of the open-files limit when that
/// is lower (the HTTP server may take half), so neither can take every fd.
fn client_slots() -> usize {
    (crate::daemon::limits::open_files() / 4).clamp(16, 1024)
}

fn limit_send_buffer(stream: &UnixStream) {
    use std::os::fd::AsRawFd;
    let size = READER_SNDBUF;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Client side: connects to the daemon's socket and sends `request`.
pub fn request(socket: &Path, request: &Request) -> Result<std::os::unix::net::UnixStream> {
    use std::io::Write;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    let most = crate::daemon::events_request::MAX_REQUEST;
    anyhow::ensure!(
        line.len() <= most,
        "the request is {} bytes, more than the daemon reads ({most}): give fewer --port or \
         --kind values, or shorter names",
        line.len()
    );
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "no qtrace daemon at {} (start it: `systemctl start qtrace`), or run with \
             --standalone",
            socket.display()
        )
    })?;
    (&stream).write_all(line.as_bytes())?;
    Ok(stream)
}

/// The daemon's listener snapshot (what /api/listeners serves).
pub fn listeners_snapshot(socket: &Path) -> Result<Listeners> {
    use std::io::BufRead;
    let stream = request(socket, &Request::Listeners)?;
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).context("the daemon's listener snapshot")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(ts_ns: u64) -> Arc<Published> {
        published_in(1, ts_ns)
    }

    fn published_in(netns: u32, ts_ns: u64) -> Arc<Published> {
        let line = format!(
            r#"{{"type":"event","time":"t","ts_ns":{ts_ns},"kind":"connect_refused",
            "netns":{netns},"family":"ipv4","laddr":"127.0.0.1","lport":1,"acceptq_len":0,
            "acceptq_max":0,"synq_len":0,"synq_max":0}}"#
        );
        Arc::new(Published {
            event: serde_json::from_str(&line).unwrap(),
            line: OnceLock::new(),
        })
    }

    fn in_netns(netns: u32) -> EventFilter {
        EventFilter {
            netns: Some(netns),
            ..EventFilter::default()
        }
    }

    /// Each line a reader would be written, in order: `e<ts>` for an event, `gap<n>`.
    fn drained(reader: &Reader) -> Vec<String> {
        let mut text = String::new();
        let mut out = Vec::new();
        loop {
            text.clear();
            reader.take(&mut text);
            if text.is_empty() {
                return out;
            }
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                out.push(match v["type"].as_str() {
                    Some("gap") => format!("gap{}", v["missed"]),
                    _ => format!("e{}", v["ts_ns"]),
                });
            }
        }
    }

    /// A reader's queue holds what its filter admits: another namespace's burst, however
    /// large, neither fills it nor shows as a gap; its own events past the bound are counted
    /// where they were lost, and the queue takes events again once read.
    #[test]
    fn a_reader_queues_and_loses_only_its_own_events() {
        let mut shared = Shared::default();
        let (mine, _, _) = shared.subscribe(0, in_netns(7));
        let (all, _, _) = shared.subscribe(0, EventFilter::default());
        shared.publish(&published_in(7, 1), 3);
        for ts in 2..1000 {
            shared.publish(&published_in(8, ts), 3);
        }
        for ts in 1000..1005 {
            shared.publish(&published_in(7, ts), 3);
        }
        assert_eq!(drained(&mine), ["e1", "e1000", "e1001", "gap3"]);
        assert_eq!(drained(&all), ["e1", "e2", "e3", "gap1001"]);
        shared.publish(&published_in(7, 2000), 3);
        assert_eq!(drained(&mine), ["e2000"]);
        // A reader that leaves is no longer offered anything.
        shared.readers.retain(|r| !Arc::ptr_eq(r, &all));
        assert_eq!(shared.readers.len(), 1);
    }

    /// All readers' queues together hold [`QUEUED_READERS`] readers' worth: readers stuck at
    /// different moments cannot hold `per_reader` different events each without bound. What
    /// a reader that leaves held is free again.
    #[test]
    fn all_readers_queues_together_are_bounded() {
        let mut shared = Shared::default();
        let stuck: Vec<_> = (0..QUEUED_READERS + 4)
            .map(|i| {
                let reader = shared.subscribe(0, EventFilter::default()).0;
                // Each reader stops reading after a different event, so each holds its own.
                shared.publish(&published(i as u64), 1);
                reader
            })
            .collect();
        assert_eq!(shared.queued.load(Ordering::Relaxed), QUEUED_READERS);
        let held = |r: &Reader| crate::recover::lock(&r.queue).events;
        assert!(stuck[..QUEUED_READERS].iter().all(|r| held(r) == 1));
        assert!(stuck[QUEUED_READERS..].iter().all(|r| held(r) == 0));
        // The last ones were told they missed theirs.
        assert_eq!(drained(&stuck[QUEUED_READERS]), ["gap4"]);
        // One leaves: its event's room is free for the others.
        let first = stuck[0].clone();
        shared.readers.retain(|r| !Arc::ptr_eq(r, &first));
        drop(stuck);
        drop(first);
        assert_eq!(shared.queued.load(Ordering::Relaxed), QUEUED_READERS - 1);
        shared.publish(&published(100), 1);
        assert_eq!(shared.queued.load(Ordering::Relaxed), QUEUED_READERS);
    }

    /// `--since` with a filter: the kept events it admits, and a trimmed count of its own.
    #[test]
    fn a_filtered_since_reader_counts_only_its_trimmed_events() {
        let mut h = History::default();
        for ts in 1..=HISTORY as u64 + 100 {
            // Every tenth event is namespace 7's.
            h.push(published_in(if ts % 10 == 0 { 7 } else { 8 }, ts));
        }
        let (kept, trimmed) = h.since(1, &in_netns(7));
        let exact = |missed| TrimmedCount {
            missed,
            bound: false,
        };
        assert_eq!(trimmed, exact(10), "events 10, 20, .. 100 were trimmed");
        assert_eq!(kept.len(), HISTORY / 10);
        assert!(kept.iter().all(|p| p.event.netns == 7));
        let (kept, trimmed) = h.since(1, &in_netns(9));
        assert!(kept.is_empty() && trimmed == exact(0));
    }

    #[test]
    fn a_since_reader_is_told_how_many_of_its_events_were_trimmed() {
        let mut h = History::default();
        for ts in 1..=HISTORY as u64 + 100 {
            h.push(published(ts));
        }
        // Events 1..=100 were trimmed: asked from 51, it gets what is kept and 50 missing.
        let all = EventFilter::default();
        let (kept, trimmed) = h.since(51, &all);
        let exact = |missed| TrimmedCount {
            missed,
            bound: false,
        };
        assert_eq!((kept.len(), trimmed), (HISTORY, exact(50)));
        assert_eq!(kept[0].event.ts_ns, 101);
        // Asked from after the trimmed ones, nothing is missing; live only asks for nothing.
        assert_eq!(h.since(101, &all).1, exact(0));
        let (kept, trimmed) = h.since(0, &all);
        assert!(kept.is_empty() && trimmed == exact(0));
    }

    #[test]
    fn trimmed_times_past_their_bound_count_whole() {
        let mut t = Trimmed::default();
        for ts in 1..=TRIMMED_KEPT as u64 + 10 {
            t.push(TrimmedEvent::of(&published(ts).event));
        }
        assert_eq!(t.recent.len(), TRIMMED_KEPT);
        // The 10 oldest are a count: whole once the request reaches back to any of them.
        let all = EventFilter::default();
        let count = |missed, bound| TrimmedCount { missed, bound };
        assert_eq!(t.since(11, &all), count(TRIMMED_KEPT as u64, false));
        // Reaching back to them, all 10 count, those before 5 too: a bound.
        assert_eq!(t.since(5, &all), count(TRIMMED_KEPT as u64 + 10, true));
        assert_eq!(t.since(TRIMMED_KEPT as u64 + 10, &all), count(1, false));
    }
}
