//! The daemon's local events socket: live events to any number of readers, each with its own
//! bounded backlog, plus a short history for `qtrace events --since`, and listener snapshots
//! for `qtrace top`/`doctor`. Client addresses travel only here, never to /metrics. Each
//! event gets its listener's owner from the daemon's [`State`] (never from HTTP).
//!
//! Protocol: the client writes one JSON line, `{"request":"events","since_ns":N}` or
//! `{"request":"listeners"}`; the daemon answers with JSON lines (events, `{"type":"gap",
//! "missed":N}` where a slow reader lost some, and first, for `since_ns`, `{"type":"trimmed",
//! "missed":N}` when N of the events it asked for are no longer kept) or one snapshot line.

use std::{
    collections::VecDeque,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, watch},
};

use crate::{
    api::{Event, Line, Listeners, Request},
    daemon::state::State,
};

/// Events kept for `--since`.
pub const HISTORY: usize = 4096;
/// Timestamps of events trimmed from the history kept, to tell a `--since` reader how many of
/// the events it asked for are gone: 512 KiB at most.
const TRIMMED_KEPT: usize = 16 * HISTORY;
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

/// A new reader's past events, how many more of those it asked for were trimmed, and its
/// live queue.
type Subscription = (
    Vec<Arc<Published>>,
    u64,
    broadcast::Receiver<Arc<Published>>,
);

/// The last [`HISTORY`] events, and the times of those trimmed before them.
#[derive(Default)]
struct History {
    events: VecDeque<Arc<Published>>,
    trimmed: Trimmed,
}

impl History {
    fn push(&mut self, event: Arc<Published>) {
        if self.events.len() == HISTORY {
            if let Some(old) = self.events.pop_front() {
                self.trimmed.push(old.event.ts_ns);
            }
        }
        self.events.push_back(event);
    }

    /// The events kept since `since_ns` (none for 0: live only), and how many more since then
    /// were trimmed.
    fn since(&self, since_ns: u64) -> (Vec<Arc<Published>>, u64) {
        if since_ns == 0 {
            return (Vec::new(), 0);
        }
        let kept = self
            .events
            .iter()
            .filter(|r| r.event.ts_ns >= since_ns)
            .cloned()
            .collect();
        (kept, self.trimmed.since(since_ns))
    }
}

/// When the events trimmed from the history happened: the last [`TRIMMED_KEPT`] exactly, the
/// ones before them as a count and the newest time among them.
#[derive(Default)]
struct Trimmed {
    recent: VecDeque<u64>,
    older: u64,
    older_newest_ns: u64,
}

impl Trimmed {
    fn push(&mut self, ts_ns: u64) {
        if self.recent.len() == TRIMMED_KEPT {
            if let Some(old) = self.recent.pop_front() {
                self.older += 1;
                self.older_newest_ns = self.older_newest_ns.max(old);
            }
        }
        self.recent.push_back(ts_ns);
    }

    /// How many trimmed events happened at or after `since_ns`: exact among the last
    /// [`TRIMMED_KEPT`]; the ones before them count whole once any of them may be that recent.
    fn since(&self, since_ns: u64) -> u64 {
        let recent = self.recent.iter().filter(|&&t| t >= since_ns).count() as u64;
        let older = if self.older > 0 && since_ns <= self.older_newest_ns {
            self.older
        } else {
            0
        };
        recent + older
    }
}

/// Where events go: every reader's queue and the `--since` history.
pub struct Hub {
    live: broadcast::Sender<Arc<Published>>,
    history: Mutex<History>,
    state: Arc<State>,
}

impl Hub {
    /// `per_reader`: events queued for each reader before it is told it missed some.
    pub fn new(per_reader: usize, state: Arc<State>) -> Arc<Self> {
        Arc::new(Self {
            live: broadcast::channel(per_reader).0,
            history: Mutex::new(History::default()),
            state,
        })
    }

    /// Hands an event to every reader, with its listener's owner when known.
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
        let mut history = crate::recover::lock(&self.history);
        history.push(record.clone());
        let _ = self.live.send(record.clone()); // no reader is fine
        record
    }

    /// History since `since_ns`, then live events: `publish` sends while holding the history
    /// lock, so no event is in neither or both.
    fn subscribe(&self, since_ns: u64) -> Subscription {
        let history = crate::recover::lock(&self.history);
        let rx = self.live.subscribe();
        let (past, trimmed) = history.since(since_ns);
        (past, trimmed, rx)
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
    let request = crate::daemon::events_request::read_request(&mut read).await?;
    let since_ns = match request {
        Request::Listeners => {
            let snapshot = serde_json::to_string(&hub.state.snapshot().await?)?;
            write.write_all(format!("{snapshot}\n").as_bytes()).await?;
            return Ok(());
        }
        Request::Events { since_ns } => since_ns,
    };
    let (past, trimmed, mut live) = hub.subscribe(since_ns);
    let mut text = String::new();
    if trimmed > 0 {
        text = serde_json::to_string(&Line::Trimmed { missed: trimmed }).expect("plain data");
        text.push('\n');
    }
    for r in past {
        text.push_str(r.line());
    }
    write.write_all(text.as_bytes()).await?;
    loop {
        let r = tokio::select! {
            r = live.recv() => r,
            () = crate::daemon::events_request::closed(&mut read) => return Ok(()),
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        // What else is queued goes in the same write: a burst costs one write per
        // BATCH_BYTES, not one per event.
        text.clear();
        let mut next = Some(r);
        while let Some(r) = next.take() {
            match r {
                Ok(r) => text.push_str(r.line()),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let gap = serde_json::to_string(&Line::Gap { missed: n }).expect("plain data");
                    text.push_str(&gap);
                    text.push('\n');
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
            if text.len() < BATCH_BYTES {
                next = match live.try_recv() {
                    Ok(r) => Some(Ok(r)),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Some(Err(broadcast::error::RecvError::Lagged(n)))
                    }
                    Err(_) => None,
                };
            }
        }
        if text.is_empty() {
            return Ok(()); // closed
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
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "no qtrace daemon at {} (start it: `systemctl start qtrace`), or run with \
             --standalone",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
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
        let line = format!(
            r#"{{"type":"event","time":"t","ts_ns":{ts_ns},"kind":"connect_refused","netns":1,
            "family":"ipv4","laddr":"127.0.0.1","lport":1,"acceptq_len":0,"acceptq_max":0,
            "synq_len":0,"synq_max":0}}"#
        );
        Arc::new(Published {
            event: serde_json::from_str(&line).unwrap(),
            line: OnceLock::new(),
        })
    }

    #[test]
    fn a_since_reader_is_told_how_many_of_its_events_were_trimmed() {
        let mut h = History::default();
        for ts in 1..=HISTORY as u64 + 100 {
            h.push(published(ts));
        }
        // Events 1..=100 were trimmed: asked from 51, it gets what is kept and 50 missing.
        let (kept, trimmed) = h.since(51);
        assert_eq!((kept.len(), trimmed), (HISTORY, 50));
        assert_eq!(kept[0].event.ts_ns, 101);
        // Asked from after the trimmed ones, nothing is missing; live only asks for nothing.
        assert_eq!(h.since(101).1, 0);
        let (kept, trimmed) = h.since(0);
        assert!(kept.is_empty() && trimmed == 0);
    }

    #[test]
    fn trimmed_times_past_their_bound_count_whole() {
        let mut t = Trimmed::default();
        for ts in 1..=TRIMMED_KEPT as u64 + 10 {
            t.push(ts);
        }
        assert_eq!(t.recent.len(), TRIMMED_KEPT);
        // The 10 oldest are a count: whole once the request reaches back to any of them.
        assert_eq!(t.since(11), TRIMMED_KEPT as u64);
        assert_eq!(t.since(5), TRIMMED_KEPT as u64 + 10);
        assert_eq!(t.since(TRIMMED_KEPT as u64 + 10), 1);
    }
}
