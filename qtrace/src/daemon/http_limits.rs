//! Serving the HTTP endpoints' connections so that no client can starve or kill qtrace: at most
//! [`MAX_CONNECTIONS`] open at once, a request's header must arrive within [`HEADER_TIMEOUT`],
//! and a connection that moves no byte for [`IDLE_TIMEOUT`] while no request of its is being
//! answered is closed. At the limit a new connection closes the one that has waited longest
//! without a request being answered (idle keep-alive, slowloris), so a scraper still gets in
//! while thousands of idle connections are held; only when every connection is inside a
//! request is the new one refused. The limit is also at most half the open-files limit, so
//! HTTP clients never take the fds the rest of qtrace needs. An open connection costs about
//! 7 KiB, so the limit is generous: a new connection's request is read long before as many
//! newer ones could push it out. Each closing is counted (`qtrace_http_connections_dropped`)
//! and logged at most once per [`LOG_EVERY`](crate::daemon::limits::LOG_EVERY). With TLS
//! (`--web.config.file`) the handshake happens inside the same connection loop, under the
//! same cap and within [`HEADER_TIMEOUT`]: a client that never sends its ClientHello is cut
//! like a slow header.

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{watch, Notify},
};

use crate::daemon::{
    limits::{now_ms, open_files, Throttled},
    web_config::Web,
};

pub const MAX_CONNECTIONS: usize = 4096;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Most bytes buffered for one connection's request (hyper's least): /metrics requests are
/// small, and MAX_CONNECTIONS of these stay far below the unit's MemoryMax.
const MAX_REQUEST_BUFFER: usize = 8192;

static OVER_LIMIT: AtomicU64 = AtomicU64::new(0);
static TIMED_OUT: AtomicU64 = AtomicU64::new(0);
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// The HTTP server's own figures, for /metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub open: usize,
    /// Closed or refused at the connection limit.
    pub over_limit: u64,
    /// Closed for a header not sent in time, or idle too long.
    pub timed_out: u64,
}

pub fn stats() -> Stats {
    Stats {
        open: OPEN.load(Ordering::Relaxed),
        over_limit: OVER_LIMIT.load(Ordering::Relaxed),
        timed_out: TIMED_OUT.load(Ordering::Relaxed),
    }
}

static LIMIT_LOG: Throttled = Throttled::new();
static ACCEPT_LOG: Throttled = Throttled::new();
static HANDSHAKE_LOG: Throttled = Throttled::new();

/// One open connection, as the limit sees it.
struct Conn {
    /// When it was accepted or last answered a request (ms): the oldest is closed first.
    waiting_since: AtomicU64,
    /// When it last moved a byte (ms).
    last_io: AtomicU64,
    /// Requests of it being answered now.
    busy: AtomicUsize,
    close: Notify,
}

#[derive(Default)]
struct Table {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
}

impl Table {
    /// A place for a new connection, closing the longest-waiting idle one at the limit; None
    /// when every connection is inside a request.
    fn admit(&self, max: usize) -> Option<(u64, Arc<Conn>)> {
        let mut conns = crate::recover::lock(&self.conns);
        if conns.len() >= max {
            let oldest = conns
                .iter()
                .filter(|(_, c)| c.busy.load(Ordering::Relaxed) == 0)
                .min_by_key(|(_, c)| c.waiting_since.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            OVER_LIMIT.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = LIMIT_LOG.due() {
                tracing::warn!(
                    "HTTP connection limit ({max}) reached: {n} connection(s) closed or refused \
                     since the last report (the longest idle is closed first)"
                );
            }
            let evicted = conns.remove(&oldest?)?;
            evicted.close.notify_one();
        }
        let now = now_ms();
        let conn = Arc::new(Conn {
            waiting_since: AtomicU64::new(now),
            last_io: AtomicU64::new(now),
            busy: AtomicUsize::new(0),
            close: Notify::new(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        conns.insert(id, conn.clone());
        OPEN.store(conns.len(), Ordering::Relaxed);
        Some((id, conn))
    }

    fn remove(&self, id: u64) {
        let mut conns = crate::recover::lock(&self.conns);
        conns.remove(&id);
        OPEN.store(conns.len(), Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` until `stop` turns true, then lets requests in flight finish;
/// over TLS when `web` says so at the time a connection is accepted.
pub async fn serve(listener: TcpListener, app: Router, web: Arc<Web>, stop: watch::Receiver<bool>) {
    serve_with(listener, app, web, stop, limit()).await
}

/// [`MAX_CONNECTIONS`], or half the open-files limit when that is lower.
pub fn limit() -> usize {
    MAX_CONNECTIONS.min(open_files() / 2).max(16)
}

async fn serve_with(
    listener: TcpListener,
    app: Router,
    web: Arc<Web>,
    stop: watch::Receiver<bool>,
    max: usize,
) {
    let table = Arc::new(Table::default());
    // Held by each connection's task until it has ended: a closed connection's memory is
    // freed before another is taken on, so the tasks alive are bounded too, not just the table.
    let tasks_alive = Arc::new(tokio::sync::Semaphore::new(max));
    let mut tasks = tokio::task::JoinSet::new();
    let mut stopped = stop.clone();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stopping(&mut stopped) => break,
        };
        while tasks.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(n) = ACCEPT_LOG.due() {
                    tracing::warn!("HTTP accept failed {n} time(s) since the last report: {e}");
                }
                // Out of fds or memory: give the connections a moment to close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some((id, conn)) = table.admit(max) else {
            continue; // dropped: every connection is inside a request
        };
        let Ok(alive) = tasks_alive.clone().acquire_owned().await else {
            break;
        };
        let (app, table, stop, tls) = (app.clone(), table.clone(), stop.clone(), web.tls());
        tasks.spawn(async move {
            serve_one(stream, tls, app, &conn, stop).await;
            table.remove(id);
            drop(alive);
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn serve_one(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    conn: &Arc<Conn>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let watched = Watched {
        inner: stream,
        conn: conn.clone(),
    };
    let Some(tls) = tls else {
        return serve_http(TokioIo::new(watched), app, conn, stop).await;
    };
    let handshake = tokio::select! {
        r = tokio::time::timeout(HEADER_TIMEOUT, tls.accept(watched)) => r,
        _ = conn.close.notified() => return,
        () = stopping(&mut stop) => return,
    };
    match handshake {
        Ok(Ok(stream)) => serve_http(TokioIo::new(stream), app, conn, stop).await,
        Ok(Err(e)) => {
            if let Some(n) = HANDSHAKE_LOG.due() {
                tracing::debug!("TLS handshake failed {n} time(s) since the last report: {e}");
            }
        }
        Err(_) => {
            TIMED_OUT.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn serve_http<I>(
    io: TokioIo<I>,
    app: Router,
    conn: &Arc<Conn>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tower = TowerToHyperService::new(app);
    let tracked = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let _busy = Busy::new(&tracked);
        let answer = hyper::service::Service::call(&tower, req);
        async move {
            let response = answer.await;
            drop(_busy);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BUFFER)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let check = (IDLE_TIMEOUT / 4).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = connection.as_mut() => {
                if r.as_ref().is_err_and(hyper::Error::is_timeout) {
                    TIMED_OUT.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            _ = conn.close.notified() => return,
            _ = tokio::time::sleep(check) => {
                let idle = now_ms().saturating_sub(conn.last_io.load(Ordering::Relaxed));
                if conn.busy.load(Ordering::Relaxed) == 0
                    && idle >= IDLE_TIMEOUT.as_millis() as u64
                {
                    TIMED_OUT.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            () = stopping(&mut stop) => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_millis(500), connection).await;
                return;
            }
        }
    }
}

/// Until `stop` turns true (holding no borrow of it across later awaits).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Marks a connection inside a request while alive.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: &Arc<Conn>) -> Self {
        conn.busy.fetch_add(1, Ordering::Relaxed);
        Self(conn.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.waiting_since.store(now_ms(), Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that notes when it last moved a byte.
struct Watched {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl Watched {
    fn moved<T>(&self, r: &Poll<io::Result<T>>, bytes: bool) {
        if bytes && matches!(r, Poll::Ready(Ok(_))) {
            self.conn.last_io.store(now_ms(), Ordering::Relaxed);
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let bytes = buf.filled().len() > before;
        self.moved(&r, bytes);
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        let bytes = matches!(r, Poll::Ready(Ok(n)) if n > 0);
        self.moved(&r, bytes);
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use axum::routing::get;

    use super::*;

    fn get_ok(addr: std::net::SocketAddr) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = write!(s, "GET / HTTP/1.0\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_limit_the_longest_idle_connection_makes_room() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "ok" }));
        let (stop_tx, stop) = watch::channel(false);
        let web = Arc::new(Web::load(None).unwrap());
        let server = tokio::spawn(serve_with(listener, app, web, stop, 8));
        let before = stats().over_limit;
        let held = tokio::task::spawn_blocking(move || {
            // Twice the limit of idle connections, then a real request still gets in.
            let idle: Vec<_> = (0..16)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(200));
            let ok = get_ok(addr);
            (idle, ok)
        })
        .await
        .unwrap();
        assert!(held.1, "a request at the limit was not answered");
        assert!(stats().over_limit >= before + 8);
        let _ = stop_tx.send(true);
        server.await.unwrap();
    }
}
