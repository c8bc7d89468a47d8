//! Connection hygiene for every HTTP listener of tickgraph: ingest's, the
//! api's, and the operations listeners of enrich and load.
//!
//! A collector nobody can reach loses data, so no client may hold a listener
//! without doing its part:
//!
//! - **Request headers** must arrive within [`ConnLimits::header_timeout`] of
//!   the connection opening, or of the first byte of a later request on a
//!   kept-alive connection.
//! - **A request body** must arrive in full within
//!   [`ConnLimits::body_timeout`] of its headers; past it the request is
//!   answered `408` and the connection closed.
//! - **A kept-alive connection** waiting for its next request is closed after
//!   [`ConnLimits::idle_timeout`].
//! - **At most [`ConnLimits::max_connections`]** are open at once, upgraded
//!   WebSockets included. A connection past the cap takes the place of the one
//!   that has waited longest without a request in progress: first one that has
//!   never sent a whole request, then one idle between requests. Only when
//!   every connection is busy is the new one refused, with a `503` at once. A
//!   flood of half-open connections therefore delays nobody by more than the
//!   time it takes to send request headers, and the process never runs out of
//!   descriptors.
//!
//! [`raise_fd_limit`] lifts the process's soft limit on open files to its hard
//! limit, and [`fit_to_fd_limit`] shrinks the caps when they would not fit
//! under it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::ops::StaticLabel;

/// The bounds one listener holds its clients to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, WebSockets and SSE streams included.
    pub max_connections: usize,
    /// From a connection's opening, or from the first byte of a later request,
    /// until the end of the request's headers.
    pub header_timeout: Duration,
    /// From the end of a request's headers until the end of its body.
    pub body_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

impl ConnLimits {
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// Longer than the 60 s most HTTP clients keep an idle connection pooled,
    /// so that a client rarely sends on a connection the server is closing.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

    /// The default deadlines, with this cap.
    pub fn with_max_connections(max_connections: usize) -> Self {
        Self {
            max_connections,
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            body_timeout: Self::DEFAULT_BODY_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self::with_max_connections(1024)
    }
}

/// Why the listener closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its request headers did not arrive in time.
    HeaderTimeout,
    /// Its request body did not arrive in time (answered `408`).
    BodyTimeout,
    /// Kept alive without a request for too long.
    IdleTimeout,
    /// Its place was taken by a new connection at the cap.
    Evicted,
    /// New at the cap with every connection busy (answered `503`).
    Refused,
}

impl CloseReason {
    pub const ALL: [CloseReason; 5] = [
        CloseReason::HeaderTimeout,
        CloseReason::BodyTimeout,
        CloseReason::IdleTimeout,
        CloseReason::Evicted,
        CloseReason::Refused,
    ];

    pub fn code(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::BodyTimeout => "body_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Evicted => "evicted",
            CloseReason::Refused => "refused",
        }
    }
}

/// A listener's connection figures: `tickgraph_<component>_connections_open`,
/// `_connections_limit` and `_connections_closed_total{reason}`. Cheap to
/// clone: every field is shared.
#[derive(Debug, Clone)]
pub struct ConnMetrics {
    component: &'static str,
    open: Gauge,
    limit: Gauge,
    closed: Family<StaticLabel, Counter>,
}

impl ConnMetrics {
    /// `component` names the listener in the metric names: `ingest`, `api`,
    /// `enrich`, `load`.
    pub fn new(component: &'static str) -> Self {
        Self {
            component,
            open: Gauge::default(),
            limit: Gauge::default(),
            closed: Family::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        let c = self.component;
        registry.register(
            format!("{c}_connections_open"),
            "Client connections open on this listener, WebSockets and SSE streams included",
            self.open.clone(),
        );
        registry.register(
            format!("{c}_connections_limit"),
            "Client connections this listener holds at most",
            self.limit.clone(),
        );
        registry.register(
            format!("{c}_connections_closed"),
            "Connections the listener closed itself: header, body or idle deadline passed, \
             evicted for a new connection at the cap, or refused at the cap",
            self.closed.clone(),
        );
    }

    /// Connections open now.
    pub fn open(&self) -> i64 {
        self.open.get()
    }

    /// Connections closed for `reason` so far.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed
            .get_or_create(&[("reason", reason.code())])
            .get()
    }

    fn count(&self, reason: CloseReason) {
        self.closed
            .get_or_create(&[("reason", reason.code())])
            .inc();
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown`; then stops
/// accepting, lets requests in progress finish and closes idle connections.
/// Upgraded connections (WebSockets) are their handlers' to close.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    metrics: ConnMetrics,
    shutdown: CancellationToken,
) -> io::Result<()> {
    metrics
        .limit
        .set(i64::try_from(limits.max_connections).unwrap_or(i64::MAX));
    let slots = Arc::new(Slots::new(limits, metrics));
    let tasks = TaskTracker::new();
    let mut accept_errors = ErrorLog::default();
    loop {
        let tcp = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    if !is_connection_error(&e) {
                        accept_errors.warn(&e);
                        // Out of descriptors, most likely: give closing
                        // connections a moment instead of spinning.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    continue;
                }
            },
        };
        // Without TCP_NODELAY, Nagle's algorithm holds each small write until the
        // previous one is acked, and the peer delays its acks: a WebSocket pushing
        // tens of thousands of messages a second was held to one burst per ack.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
        match slots.admit() {
            Some(conn) => {
                let io = Io {
                    tcp,
                    conn: Arc::clone(&conn),
                    slots: Arc::clone(&slots),
                };
                tasks.spawn(serve_connection(
                    io,
                    conn,
                    Arc::clone(&slots),
                    router.clone(),
                    shutdown.clone(),
                ));
            }
            None => refuse(tcp, &slots, &tasks),
        }
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Errors of one connection that `accept` reports; the listener is fine.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Logs accept failures at most once a second, with how many were not logged.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    quiet: u64,
}

impl ErrorLog {
    fn warn(&mut self, e: &io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.quiet += 1;
            return;
        }
        tracing::warn!(error = %e, not_logged = self.quiet, "accept failed");
        self.last = Some(now);
        self.quiet = 0;
    }
}

/// Refusals being answered at once; past it a refused connection is just closed.
const MAX_REFUSING: usize = 64;
/// How long a refused client has to take its `503` before the socket is closed.
const REFUSE_LINGER: Duration = Duration::from_millis(200);
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\nretry-after: 1\r\nconnection: close\r\n\
content-length: 51\r\n\r\nevery connection of this server is busy; retry soon\n";

fn refuse(tcp: TcpStream, slots: &Arc<Slots>, tasks: &TaskTracker) {
    slots.metrics.count(CloseReason::Refused);
    if slots.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        slots.refusing.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let slots = Arc::clone(slots);
    tasks.spawn(async move {
        let mut tcp = tcp;
        let answer = async {
            tcp.write_all(REFUSAL).await?;
            tcp.shutdown().await?;
            // Read what the client sent until it closes: closing with unread
            // bytes would reset the connection and could lose the answer.
            let mut sink = [0u8; 1024];
            loop {
                tcp.readable().await?;
                match tcp.try_read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Ok::<(), io::Error>(())
        };
        let _ = tokio::time::timeout(REFUSE_LINGER, answer).await;
        slots.refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

async fn serve_connection(
    io: Io,
    conn: Arc<Conn>,
    slots: Arc<Slots>,
    router: Router,
    shutdown: CancellationToken,
) {
    let limits = slots.limits;
    let service = Tracked {
        router,
        conn: Arc::clone(&conn),
        slots: Arc::clone(&slots),
    };
    let closed = {
        let mut builder = hyper::server::conn::http1::Builder::new();
        // The deadlines are ours (below): hyper's header timeout also runs while
        // a kept-alive connection waits, so it cannot tell idle from slow.
        builder.header_read_timeout(None);
        let mut http = pin!(builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades());
        let mut timer = pin!(tokio::time::sleep(Duration::ZERO));
        let mut draining = false;
        loop {
            let deadline = conn.deadline(&limits);
            if let Some(at) = deadline {
                timer.as_mut().reset(at);
            }
            tokio::select! {
                biased;
                served = http.as_mut() => {
                    if let Err(e) = served {
                        tracing::trace!(error = %e, "connection ended with an error");
                    }
                    break None;
                }
                () = conn.kill.notified() => break Some(CloseReason::Evicted),
                () = &mut timer, if deadline.is_some() => {
                    if let Some(reason) = conn.expired(&limits, Instant::now()) {
                        break Some(reason);
                    }
                }
                () = conn.wake.notified() => {}
                () = shutdown.cancelled(), if !draining => {
                    draining = true;
                    http.as_mut().graceful_shutdown();
                }
            }
        }
        // The connection (and any request it was serving) is dropped here,
        // before it leaves the listener's books.
    };
    slots.release(&conn);
    if let Some(reason) = closed {
        // Evictions were counted by the evictor.
        if reason != CloseReason::Evicted {
            slots.metrics.count(reason);
        }
    }
}

/// The listener's books: how many connections are open, and which of them
/// wait without a request in progress, oldest first.
struct Slots {
    limits: ConnLimits,
    metrics: ConnMetrics,
    /// Admitted and not yet closed (a socket, upgraded or not).
    open: AtomicUsize,
    refusing: AtomicUsize,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    next_key: u64,
    /// Connections that have not yet sent a whole request.
    fresh: BTreeMap<u64, Arc<Conn>>,
    /// Connections between requests.
    idle: BTreeMap<u64, Arc<Conn>>,
}

impl Waiting {
    fn key(&mut self) -> u64 {
        self.next_key += 1;
        self.next_key
    }
}

impl Slots {
    fn new(limits: ConnLimits, metrics: ConnMetrics) -> Self {
        Self {
            limits,
            metrics,
            open: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            waiting: Mutex::new(Waiting::default()),
        }
    }

    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection: free, or taken from the connection that
    /// has waited longest; `None` when every connection is busy.
    fn admit(&self) -> Option<Arc<Conn>> {
        let mut w = self.waiting();
        if self.open.load(Ordering::Acquire) >= self.limits.max_connections {
            let victim = match w.fresh.pop_first() {
                Some((_, c)) => c,
                None => w.idle.pop_first()?.1,
            };
            *victim.phase() = Phase::Done;
            victim.kill.notify_one();
            self.metrics.count(CloseReason::Evicted);
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        self.metrics.open.inc();
        let key = w.key();
        let now = Instant::now();
        let conn = Arc::new(Conn {
            phase: Mutex::new(Phase::Fresh { key, since: now }),
            opened: now,
            first_byte: AtomicU64::new(0),
            watch_first_byte: AtomicBool::new(false),
            wake: Notify::new(),
            kill: Notify::new(),
        });
        w.fresh.insert(key, Arc::clone(&conn));
        Some(conn)
    }

    fn request_started(&self, conn: &Conn) {
        let mut w = self.waiting();
        let mut phase = conn.phase();
        *phase = match *phase {
            Phase::Fresh { key, .. } => {
                w.fresh.remove(&key);
                Phase::Busy { requests: 1 }
            }
            Phase::Idle { key, .. } => {
                w.idle.remove(&key);
                Phase::Busy { requests: 1 }
            }
            Phase::Busy { requests } => Phase::Busy {
                requests: requests + 1,
            },
            Phase::Done => Phase::Done,
        };
        conn.watch_first_byte.store(false, Ordering::Relaxed);
    }

    fn request_finished(&self, conn: &Arc<Conn>) {
        let mut w = self.waiting();
        let mut phase = conn.phase();
        match *phase {
            Phase::Busy { requests } if requests > 1 => {
                *phase = Phase::Busy {
                    requests: requests - 1,
                };
            }
            Phase::Busy { .. } => {
                let key = w.key();
                w.idle.insert(key, Arc::clone(conn));
                *phase = Phase::Idle {
                    key,
                    since: Instant::now(),
                };
                conn.first_byte.store(0, Ordering::Relaxed);
                conn.watch_first_byte.store(true, Ordering::Relaxed);
                conn.wake.notify_one();
            }
            Phase::Fresh { .. } | Phase::Idle { .. } | Phase::Done => {}
        }
    }

    fn upgraded(&self, conn: &Conn) {
        let _w = self.waiting();
        *conn.phase() = Phase::Done;
    }

    /// The connection is no longer served by this listener (closed, or
    /// upgraded: its socket then stays counted until it closes).
    fn release(&self, conn: &Conn) {
        let mut w = self.waiting();
        let mut phase = conn.phase();
        match *phase {
            Phase::Fresh { key, .. } => {
                w.fresh.remove(&key);
            }
            Phase::Idle { key, .. } => {
                w.idle.remove(&key);
            }
            Phase::Busy { .. } | Phase::Done => {}
        }
        *phase = Phase::Done;
    }

    fn closed_socket(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.metrics.open.dec();
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Opened, no whole request yet.
    Fresh { key: u64, since: Instant },
    /// Serving requests (their responses not yet fully written).
    Busy { requests: u32 },
    /// Kept alive, waiting for the next request.
    Idle { key: u64, since: Instant },
    /// Evicted, upgraded or closed.
    Done,
}

/// One connection, as its task and the listener's books see it.
struct Conn {
    /// Changed only with [`Slots::waiting`] held, which keeps the two agreeing.
    phase: Mutex<Phase>,
    opened: Instant,
    /// Nanoseconds after `opened`, plus one, at which the first byte of the
    /// next request arrived on an idle connection; 0: none yet.
    first_byte: AtomicU64,
    /// Set while idle and no byte has arrived yet.
    watch_first_byte: AtomicBool,
    /// The deadline may have changed.
    wake: Notify,
    /// Evicted: close now.
    kill: Notify,
}

impl Conn {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called on every read: the first bytes of a request on an idle
    /// connection start its header deadline.
    fn on_read(&self) {
        if self.watch_first_byte.load(Ordering::Relaxed)
            && self.watch_first_byte.swap(false, Ordering::Relaxed)
        {
            let after = Instant::now().saturating_duration_since(self.opened);
            let nanos = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX - 1);
            self.first_byte.store(nanos + 1, Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    fn first_byte(&self) -> Option<Instant> {
        match self.first_byte.load(Ordering::Relaxed) {
            0 => None,
            n => self.opened.checked_add(Duration::from_nanos(n - 1)),
        }
    }

    /// When the connection's current wait ends, and why; `None` while it
    /// serves a request.
    fn wait_ends(&self, limits: &ConnLimits) -> Option<(Instant, CloseReason)> {
        let phase = *self.phase();
        let (from, wait, reason) = match phase {
            Phase::Fresh { since, .. } => {
                (since, limits.header_timeout, CloseReason::HeaderTimeout)
            }
            Phase::Idle { since, .. } => match self.first_byte() {
                Some(first) => (first, limits.header_timeout, CloseReason::HeaderTimeout),
                None => (since, limits.idle_timeout, CloseReason::IdleTimeout),
            },
            Phase::Busy { .. } | Phase::Done => return None,
        };
        // A deadline past what an Instant can hold never comes.
        Some((from.checked_add(wait)?, reason))
    }

    fn deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        self.wait_ends(limits).map(|(at, _)| at)
    }

    fn expired(&self, limits: &ConnLimits, now: Instant) -> Option<CloseReason> {
        self.wait_ends(limits)
            .filter(|(at, _)| now >= *at)
            .map(|(_, reason)| reason)
    }
}

/// The socket of one admitted connection: it notes the first bytes of each
/// request and gives the slot back when it closes, upgraded or not.
struct Io {
    tcp: TcpStream,
    conn: Arc<Conn>,
    slots: Arc<Slots>,
}

impl Drop for Io {
    fn drop(&mut self) {
        self.slots.closed_socket();
    }
}

impl AsyncRead for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_read();
        }
        polled
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The router as one connection's hyper service: it marks the connection
/// busy from a request's headers until its response is written, and holds the
/// request's body to its deadline.
#[derive(Clone)]
struct Tracked {
    router: Router,
    conn: Arc<Conn>,
    slots: Arc<Slots>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.slots.request_started(&self.conn);
        let busy = Busy {
            conn: Arc::clone(&self.conn),
            slots: Arc::clone(&self.slots),
        };
        let body_timeout = self.slots.limits.body_timeout;
        let late = Arc::new(AtomicBool::new(false));
        let req = req.map(|body| {
            Body::new(DeadlineBody {
                inner: body,
                deadline: Instant::now().checked_add(body_timeout),
                timer: None,
                late: Arc::clone(&late),
            })
        });
        let router = self.router.clone();
        let metrics = self.slots.metrics.clone();
        Box::pin(async move {
            let Ok(response) = router.oneshot(req).await;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                // The socket goes to the upgrade's handler, which has deadlines
                // of its own: from now on it is neither evicted nor timed out.
                busy.slots.upgraded(&busy.conn);
            }
            let response = if late.load(Ordering::Relaxed) {
                metrics.count(CloseReason::BodyTimeout);
                body_too_slow(body_timeout)
            } else {
                response
            };
            Ok(response.map(|body| {
                Body::new(Written {
                    inner: body,
                    _busy: busy,
                })
            }))
        })
    }
}

fn body_too_slow(limit: Duration) -> Response {
    let mut response = (
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the request body did not arrive within {} s of its headers\n",
            limit.as_secs_f64()
        ),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A request in progress; dropped once its response is written (or the
/// connection is gone).
struct Busy {
    conn: Arc<Conn>,
    slots: Arc<Slots>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.slots.request_finished(&self.conn);
    }
}

/// A response body that keeps its request counted as in progress until hyper
/// has written all of it and dropped it.
struct Written {
    inner: Body,
    _busy: Busy,
}

impl HttpBody for Written {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body failed its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimeout;

/// A request body that fails once its deadline passes with the body unfinished.
struct DeadlineBody {
    inner: Incoming,
    /// `None`: never.
    deadline: Option<Instant>,
    /// Made when the body first has to wait: most bodies come with their headers.
    timer: Option<Pin<Box<Sleep>>>,
    late: Arc<AtomicBool>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let Some(deadline) = this.deadline else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.late.store(true, Ordering::Relaxed);
                        Poll::Ready(Some(Err(BodyTimeout.into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Descriptors kept for everything but client connections: connections to
/// Redis and Postgres, the spool's files, logs, the runtime's own.
pub const FD_RESERVE: u64 = 512;

/// Raises the process's soft limit on open files to its hard limit, and
/// returns the limit in force afterwards.
#[cfg(unix)]
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut target = lim.rlim_max;
    if target == libc::RLIM_INFINITY {
        // Linux refuses a soft limit above fs.nr_open, even under an
        // unlimited hard limit.
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if lim.rlim_cur < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = target;
    }
    Ok(lim.rlim_cur)
}

#[cfg(not(unix))]
pub fn raise_fd_limit() -> io::Result<u64> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no open-file limit to raise on this platform",
    ))
}

/// Shrinks the listeners' caps in proportion when together with
/// [`FD_RESERVE`] they would not fit under `fd_limit` open files, so that a
/// flood meets a refusal, never a process out of descriptors. Returns whether
/// it had to.
pub fn fit_to_fd_limit(fd_limit: u64, caps: &mut [(&str, &mut ConnLimits)]) -> bool {
    let budget = fd_limit.saturating_sub(FD_RESERVE).max(caps.len() as u64);
    let wanted: u64 = caps.iter().map(|(_, c)| c.max_connections as u64).sum();
    if wanted <= budget {
        return false;
    }
    for (name, c) in caps.iter_mut() {
        let asked = c.max_connections;
        let share = (asked as u128 * budget as u128 / wanted as u128) as usize;
        c.max_connections = share.max(1);
        tracing::warn!(
            listener = %name,
            asked,
            now = c.max_connections,
            fd_limit,
            "the connection caps do not fit under the open-file limit; this one is lowered \
             (raise the hard limit, `ulimit -Hn`, to keep it)"
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_that_do_not_fit_are_shrunk_in_proportion() {
        let (mut a, mut b) = (
            ConnLimits::with_max_connections(4096),
            ConnLimits::with_max_connections(12_288),
        );
        assert!(!fit_to_fd_limit(
            20_000,
            &mut [("a", &mut a), ("b", &mut b)]
        ));
        assert_eq!((a.max_connections, b.max_connections), (4096, 12_288));

        assert!(fit_to_fd_limit(
            1024 + FD_RESERVE,
            &mut [("a", &mut a), ("b", &mut b)]
        ));
        assert_eq!((a.max_connections, b.max_connections), (256, 768));

        // Never below one each, whatever the limit.
        assert!(fit_to_fd_limit(10, &mut [("a", &mut a), ("b", &mut b)]));
        assert_eq!((a.max_connections, b.max_connections), (1, 1));
    }

    #[test]
    fn deadlines_past_what_an_instant_holds_never_come() {
        let conn = Conn {
            phase: Mutex::new(Phase::Fresh {
                key: 1,
                since: Instant::now(),
            }),
            opened: Instant::now(),
            first_byte: AtomicU64::new(0),
            watch_first_byte: AtomicBool::new(false),
            wake: Notify::new(),
            kill: Notify::new(),
        };
        let forever = ConnLimits {
            header_timeout: Duration::MAX,
            ..ConnLimits::default()
        };
        assert_eq!(conn.deadline(&forever), None);
        assert_eq!(conn.expired(&forever, Instant::now()), None);
    }
}
