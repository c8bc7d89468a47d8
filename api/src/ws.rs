//! GraphQL over WebSocket, both protocols clients speak:
//! - `graphql-transport-ws` (the graphql-ws library's protocol), in full: the
//!   init timeout (close 4408), invalid messages (4400), `subscribe` before the
//!   acknowledgement (4401), a second `connection_init` (4429), an id already in
//!   use (4409), `ping`/`pong` both ways, and the server's own keep-alive `ping`;
//! - the legacy `graphql-ws` of subscriptions-transport-ws (`start`, `stop`,
//!   `data`, keep-alive `ka`).
//!
//! Each connection owns an outbox bounded in bytes, drained by a writer task
//! (while it is empty, the connection's own task writes what the socket takes
//! at once, see `Outbox`), so a client that stops reading costs the server at
//! most
//! [`WsConfig::max_queued_bytes`] and never slows anyone else:
//! - while more than half of it is queued, the connection's [`Gate`] is shut:
//!   conflated (`maxRate`) subscriptions are not polled and the hub keeps only
//!   their newest value per instrument, so they never overflow it;
//! - when the bytes queued would pass the limit (which only subscriptions that
//!   must receive every event can cause), the connection is closed with
//!   [`close::SLOW_CONSUMER`] (4008) and a reason that says how much was queued;
//!   what was queued is dropped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_graphql::Request;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{BoxStream, SplitSink};
use futures_util::{FutureExt, SinkExt, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_stream::StreamMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{coded_error, Authenticator, ConnectionSlot, Principal, Users};
use crate::schema::compiled::{self, Answer};
use crate::schema::{ApiSchema, Limits, Services};

/// WebSocket close codes the server uses; 44xx are graphql-transport-ws's.
pub mod close {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client did not read fast enough: its outbox passed
    /// `max_queued_bytes`. Reconnect (with `after:` to miss nothing) or ask for
    /// less (`maxRate`, fewer instruments).
    pub const SLOW_CONSUMER: u16 = 4008;
    /// A message the protocol does not allow: not JSON, unknown type, no id.
    pub const BAD_REQUEST: u16 = 4400;
    /// `subscribe` before `connection_ack`.
    pub const UNAUTHORIZED: u16 = 4401;
    /// No `connection_init` within the init timeout.
    pub const INIT_TIMEOUT: u16 = 4408;
    /// `subscribe` with an id that is still running.
    pub const DUPLICATE_ID: u16 = 4409;
    /// A second `connection_init`.
    pub const TOO_MANY_INITS: u16 = 4429;
    /// `connection_init` without valid credentials, or the token expired.
    pub const FORBIDDEN: u16 = 4403;
    /// The user holds the most connections allowed (RFC 6455 policy violation).
    pub const POLICY: u16 = 1008;
}

#[derive(Debug, Clone)]
pub struct WsConfig {
    /// How long a client may take to send `connection_init`.
    pub init_timeout: Duration,
    /// How often the server pings (`ping`, or `ka` in the legacy protocol);
    /// `None`: never.
    pub keepalive: Option<Duration>,
    /// Most bytes of messages one connection may have waiting for the client.
    pub max_queued_bytes: usize,
    /// Most operations running at once on one connection.
    pub max_subscriptions: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            init_timeout: Duration::from_secs(3),
            keepalive: Some(Duration::from_secs(15)),
            max_queued_bytes: 16 << 20,
            max_subscriptions: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `graphql-transport-ws`.
    TransportWs,
    /// `graphql-ws`, subscriptions-transport-ws's legacy protocol.
    Legacy,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::TransportWs => "graphql-transport-ws",
            Protocol::Legacy => "graphql-ws",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "graphql-transport-ws" => Some(Protocol::TransportWs),
            "graphql-ws" => Some(Protocol::Legacy),
            _ => None,
        }
    }
}

/// A connection's back-pressure signal to the subscriptions that can wait:
/// shut while its outbox is more than half full. Conflated feeds stop being
/// polled while it is shut; the hub keeps their newest values meanwhile.
#[derive(Debug, Default)]
pub struct Gate {
    shut: AtomicBool,
    waiters: Mutex<Vec<Waker>>,
}

impl Gate {
    /// Ready while open; otherwise wakes `cx` when it opens.
    pub fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.shut.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        {
            let mut w = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            if !w.iter().any(|x| x.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
        }
        // Opened between the check and the registration: nobody will wake us.
        if self.shut.load(Ordering::Acquire) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    fn shut(&self) {
        self.shut.store(true, Ordering::Release);
    }

    fn open(&self) {
        if self.shut.swap(false, Ordering::AcqRel) {
            let waiters =
                std::mem::take(&mut *self.waiters.lock().unwrap_or_else(PoisonError::into_inner));
            waiters.into_iter().for_each(Waker::wake);
        }
    }
}

/// A stream that is only polled while its [`Gate`] is open.
pub struct Gated<S> {
    inner: S,
    gate: Option<Arc<Gate>>,
}

impl<S> Gated<S> {
    pub fn new(inner: S, gate: Option<Arc<Gate>>) -> Self {
        Self { inner, gate }
    }
}

impl<S: Stream + Unpin> Stream for Gated<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<S::Item>> {
        if let Some(g) = &self.gate {
            if g.poll_open(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.inner.poll_next_unpin(cx)
    }
}

/// A message from the client. `payload` stays raw until the type says what it is.
#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type")]
    kind: String,
    id: Option<String>,
    payload: Option<Box<RawValue>>,
}

#[derive(Serialize)]
struct Outgoing<'a, P: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<P>,
}

fn text<P: Serialize>(kind: &str, id: Option<&str>, payload: Option<P>) -> Message {
    let out = Outgoing { kind, id, payload };
    match serde_json::to_string(&out) {
        Ok(s) => Message::Text(Utf8Bytes::from(s)),
        // Only a value that cannot be JSON (a map with non-string keys) fails;
        // the client still learns the operation went wrong.
        Err(e) => {
            tracing::error!(error = %e, kind, "cannot serialize a WebSocket message");
            Message::Text(Utf8Bytes::from(format!(
                r#"{{"type":"error","id":{},"payload":[{{"message":"internal error"}}]}}"#,
                serde_json::to_string(&id).unwrap_or_else(|_| "null".into())
            )))
        }
    }
}

/// A `next` (or legacy `data`) message: the answer's JSON, shared parts as
/// they are ([`crate::shared_json`]), in its envelope, made in one allocation
/// of the size it needs when the id needs no escaping.
fn result(kind: &str, id: &str, answer: &Answer) -> Message {
    let payload_len = match answer {
        Answer::Data { key, json } => key.len() + json.len() + 12,
        Answer::Response(_) => 64,
    };
    let mut out = String::with_capacity(kind.len() + id.len() + payload_len + 31);
    out.push_str("{\"type\":\"");
    out.push_str(kind);
    out.push_str("\",\"id\":");
    json_string(&mut out, id);
    out.push_str(",\"payload\":");
    if let Err(e) = answer.write_json(&mut out) {
        tracing::error!(error = %e, kind, "cannot serialize a GraphQL response");
        out.push_str(r#"{"errors":[{"message":"internal error"}]}"#);
    }
    out.push('}');
    Message::Text(Utf8Bytes::from(out))
}

/// Appends `s` as a JSON string.
fn json_string(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "null".into()));
    }
}

fn control(kind: &str) -> Message {
    text::<()>(kind, None, None)
}

fn close_frame(code: u16, reason: impl Into<String>) -> Message {
    let mut reason: String = reason.into();
    // A close frame's reason may hold at most 123 bytes.
    if reason.len() > 123 {
        let mut cut = 120;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// What a message counts for in the outbox: never 0, so that a queued message
/// always shows as queued (the connection task writes itself only when nothing
/// is).
fn message_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len().max(1),
        Message::Binary(b) => b.len().max(1),
        _ => 16,
    }
}

/// What the writer task is told.
enum Out {
    Send(Message),
    /// This many bytes were fed to the socket by the connection task, which
    /// could not flush them without waiting: flush them.
    Flush(usize),
    /// Write this close frame after what is queued, then stop.
    Close(Message),
}

/// The connection task's side of the outbox: bytes queued are counted until
/// written. While nothing is queued, the connection task writes to the socket
/// itself, without waiting; it hands over to the writer task whatever would
/// wait. That saves a task wake-up and a channel hop per message when the
/// client keeps up, which is nearly always.
struct Outbox {
    tx: mpsc::UnboundedSender<Out>,
    sink: SharedSink,
    /// Bytes fed to the socket by this task and not yet flushed.
    fed: usize,
    queued: Arc<AtomicUsize>,
    gate: Arc<Gate>,
    /// Set when the connection must close at once, dropping what is queued.
    abort: CancellationToken,
    abort_frame: Arc<Mutex<Option<Message>>>,
    max: usize,
    /// This connection in the metrics, until the outbox is dropped.
    live: crate::metrics::Connection,
}

/// The outbox passed its limit: the connection has been aborted.
struct Overflow;

impl Outbox {
    fn send(&mut self, m: Message) -> Result<(), Overflow> {
        let len = message_len(&m);
        let m = match self.feed_now(m) {
            None => {
                self.fed += len;
                return Ok(());
            }
            Some(m) => m,
        };
        let queued = self.queued.fetch_add(len, Ordering::AcqRel) + len;
        if queued > self.max {
            self.live.dropped_slow();
            self.abort(close_frame(
                close::SLOW_CONSUMER,
                format!("slow consumer: {queued} bytes waiting, limit {}", self.max),
            ));
            return Err(Overflow);
        }
        if queued > self.max / 2 {
            self.gate.shut();
        }
        // The writer is gone only once the socket failed; the loop sees that.
        let _ = self.tx.send(Out::Send(m));
        Ok(())
    }

    /// Feeds `m` to the socket when the writer task has nothing queued (so
    /// order is kept) and the socket takes it without waiting; else gives it
    /// back, for the writer task.
    fn feed_now(&mut self, m: Message) -> Option<Message> {
        if self.queued.load(Ordering::Acquire) != 0 {
            return Some(m);
        }
        let Ok(mut sink) = self.sink.try_lock() else {
            return Some(m);
        };
        let mut cx = Context::from_waker(Waker::noop());
        match sink.poll_ready_unpin(&mut cx) {
            Poll::Ready(Ok(())) => match sink.start_send_unpin(m) {
                Ok(()) => None,
                // The socket failed: nothing more will be written to it, and
                // the connection's read side sees it end.
                Err(e) => {
                    tracing::debug!(error = %e, "websocket write failed");
                    None
                }
            },
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "websocket write failed");
                None
            }
            Poll::Pending => Some(m),
        }
    }

    /// Flushes what this task fed, or, when that would wait, leaves it to the
    /// writer task, counted as queued until it is written. Called at the end of
    /// every turn of the connection loop.
    fn flush_fed(&mut self) {
        if self.fed == 0 {
            return;
        }
        let fed = std::mem::take(&mut self.fed);
        if let Ok(mut sink) = self.sink.try_lock() {
            let mut cx = Context::from_waker(Waker::noop());
            match sink.poll_flush_unpin(&mut cx) {
                Poll::Ready(Ok(())) => return,
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "websocket write failed");
                    return;
                }
                Poll::Pending => {}
            }
        }
        let queued = self.queued.fetch_add(fed, Ordering::AcqRel) + fed;
        if queued > self.max / 2 {
            self.gate.shut();
        }
        let _ = self.tx.send(Out::Flush(fed));
    }

    fn close(&mut self, frame: Message) {
        self.flush_fed();
        let _ = self.tx.send(Out::Close(frame));
    }

    fn abort(&self, frame: Message) {
        *self
            .abort_frame
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(frame);
        self.abort.cancel();
    }
}

/// Messages written to a socket before it is flushed, at most.
const MAX_COALESCED: usize = 256;
/// How long a close frame may take to go out before the socket is dropped: a
/// slow client that reads again within it learns why it was cut off.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to write what it has queued.
const WRITER_GRACE: Duration = Duration::from_secs(15);

type WsSink = SplitSink<WebSocket, Message>;
/// The socket's write half: the connection task writes to it while the writer
/// task has nothing queued, the writer task otherwise.
type SharedSink = Arc<tokio::sync::Mutex<WsSink>>;

/// Writes what the outbox holds, everything ready in one flush, until told to
/// close, aborted, or the socket fails.
async fn write_loop(
    sink: SharedSink,
    mut rx: mpsc::UnboundedReceiver<Out>,
    queued: Arc<AtomicUsize>,
    gate: Arc<Gate>,
    abort: CancellationToken,
    abort_frame: Arc<Mutex<Option<Message>>>,
    max: usize,
) {
    let wrote = tokio::select! {
        biased;
        () = abort.cancelled() => None,
        r = drain(&sink, &mut rx, &queued, &gate, max) => Some(r),
    };
    let mut sink = sink.lock().await;
    let frame = match wrote {
        Some(Some(frame)) => frame,
        // The socket failed or the connection dropped its outbox.
        Some(None) => return,
        None => match take_frame(&abort_frame) {
            Some(f) => f,
            None => {
                // The client left: answer its close frame, if it sent one (the
                // reply is queued inside the socket), without waiting long.
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                return;
            }
        },
    };
    // The client may not be reading at all: do not wait on it for long.
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        sink.send(frame).await?;
        sink.close().await
    })
    .await;
}

fn take_frame(frame: &Mutex<Option<Message>>) -> Option<Message> {
    frame.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// Returns the close frame to end with, or `None` when the socket failed or
/// the sender is gone.
async fn drain(
    sink: &tokio::sync::Mutex<WsSink>,
    rx: &mut mpsc::UnboundedReceiver<Out>,
    queued: &AtomicUsize,
    gate: &Gate,
    max: usize,
) -> Option<Message> {
    loop {
        let first = rx.recv().await?;
        let mut sink = sink.lock().await;
        let mut bytes = 0;
        let mut next = Some(first);
        let mut n = 0;
        let mut closing = None;
        while let Some(out) = next.take() {
            match out {
                Out::Send(m) => {
                    bytes += message_len(&m);
                    sink.feed(m).await.ok()?;
                }
                Out::Flush(fed) => bytes += fed,
                Out::Close(frame) => {
                    closing = Some(frame);
                    break;
                }
            }
            n += 1;
            if n < MAX_COALESCED {
                next = rx.try_recv().ok();
            }
        }
        sink.flush().await.ok()?;
        // Released before the count drops to zero: the connection task writes
        // itself only once nothing is queued, and must then find it free.
        drop(sink);
        let left = queued.fetch_sub(bytes, Ordering::AcqRel) - bytes;
        if left <= max / 2 {
            gate.open();
        }
        if closing.is_some() {
            return closing;
        }
    }
}

/// What one operation's stream yields: a response, then `None` at its end.
type OpStream = BoxStream<'static, Option<(bool, Answer)>>;

/// How the connection loop ended.
enum End {
    /// Close with this frame after what is queued.
    Close(Message),
    /// The client went away or the writer failed: nothing more to say.
    Gone,
}

/// What subscriptions run without the executor need (see
/// [`crate::schema::compiled`]).
#[derive(Clone)]
pub struct Direct {
    pub services: Arc<Services>,
    pub limits: Limits,
}

/// What a connection serves: the schema, its direct path, the protocol, the
/// WebSocket settings, and who may use it.
pub struct Handler {
    pub schema: ApiSchema,
    pub direct: Direct,
    pub protocol: Protocol,
    pub cfg: WsConfig,
    pub auth: Authenticator,
    pub users: Arc<Users>,
}

/// One connection's state.
struct Connection {
    protocol: Protocol,
    schema: ApiSchema,
    direct: Direct,
    outbox: Outbox,
    ops: StreamMap<String, OpStream>,
    auth: Authenticator,
    users: Arc<Users>,
    max_subscriptions: usize,
    /// Set by `connection_init`: who the connection runs as, and its place in
    /// the user's connection count.
    session: Option<(Principal, ConnectionSlot)>,
}

impl Connection {
    fn initialised(&self) -> bool {
        self.session.is_some()
    }

    /// When the connection's token expires.
    fn expires_in(&self) -> Option<Duration> {
        self.session.as_ref().and_then(|(p, _)| p.expires_in())
    }

    fn start(&mut self, id: String, request: Request, who: Principal) {
        let gate = Arc::clone(&self.outbox.gate);
        let request = request.data(who.clone());
        let results = match compiled::plan(&request, &self.direct.limits) {
            Some(plan) => {
                let schema = self.schema.clone();
                let fallback_gate = Arc::clone(&gate);
                compiled::run(
                    plan,
                    Arc::clone(&self.direct.services),
                    who,
                    Some(gate),
                    move || schema.execute_stream(request.data(fallback_gate)),
                )
            }
            None => self
                .schema
                .execute_stream(request.data(gate))
                .map(Answer::Response)
                .boxed(),
        };
        let stream = results
            .enumerate()
            .map(|(i, r)| Some((i == 0, r)))
            .chain(futures_util::stream::once(async { None }))
            .boxed();
        self.ops.insert(id, stream);
    }

    /// Handles one client message; `Some` ends the connection.
    fn on_message(&mut self, raw: &[u8]) -> Option<End> {
        let msg: Incoming = match serde_json::from_slice(raw) {
            Ok(m) => m,
            Err(e) => return Some(bad_request(format!("invalid message: {e}"))),
        };
        match (self.protocol, msg.kind.as_str()) {
            (_, "connection_init") => {
                if self.initialised() {
                    return Some(End::Close(close_frame(
                        close::TOO_MANY_INITS,
                        "Too many initialisation requests",
                    )));
                }
                let payload = match msg
                    .payload
                    .as_deref()
                    .map(|p| serde_json::from_str(p.get()))
                {
                    None => None,
                    Some(Ok(v)) => Some(v),
                    Some(Err(e)) => {
                        return Some(bad_request(format!("invalid connection_init payload: {e}")))
                    }
                };
                let who = match self.auth.from_init_payload(payload.as_ref()) {
                    Ok(p) => p,
                    Err(e) => {
                        return Some(End::Close(close_frame(
                            close::FORBIDDEN,
                            format!("Forbidden: {e}"),
                        )))
                    }
                };
                let slot = match self.users.connect(&who) {
                    Ok(s) => s,
                    Err(e) => return Some(End::Close(close_frame(close::POLICY, e.to_string()))),
                };
                self.session = Some((who, slot));
                self.send(control("connection_ack"))?;
                if self.protocol == Protocol::Legacy {
                    self.send(control("ka"))?;
                }
                None
            }
            (Protocol::TransportWs, "ping") => self.send(control("pong")),
            (Protocol::TransportWs, "pong") => None,
            (Protocol::TransportWs, "subscribe") | (Protocol::Legacy, "start") => {
                let Some((who, _)) = &self.session else {
                    return Some(End::Close(close_frame(close::UNAUTHORIZED, "Unauthorized")));
                };
                let who = who.clone();
                let Some(id) = msg.id.filter(|id| !id.is_empty()) else {
                    return Some(bad_request(format!("`{}` without an id", msg.kind)));
                };
                let request: Request = match msg
                    .payload
                    .as_deref()
                    .map(|p| serde_json::from_str::<Request>(p.get()))
                {
                    // Before the planner reads them, which comes before the
                    // executor's own pass.
                    Some(Ok(mut r)) => {
                        crate::schema::restore_numbers(&mut r.variables);
                        r
                    }
                    Some(Err(e)) => {
                        return Some(bad_request(format!("invalid subscribe payload: {e}")))
                    }
                    None => return Some(bad_request(format!("`{}` without a payload", msg.kind))),
                };
                if self.ops.contains_key(&id) {
                    return Some(End::Close(close_frame(
                        close::DUPLICATE_ID,
                        format!("Subscriber for {id} already exists"),
                    )));
                }
                // Refused operations get `error` and the connection stays.
                let refused = if self.ops.len() >= self.max_subscriptions {
                    Some((
                        format!(
                            "at most {} operations at once on one connection",
                            self.max_subscriptions
                        ),
                        "TOO_MANY_SUBSCRIPTIONS",
                    ))
                } else {
                    self.users
                        .request(&who, 1)
                        .err()
                        .map(|e| (e.to_string(), e.code()))
                };
                if let Some((message, code)) = refused {
                    return self.send(text(
                        "error",
                        Some(&id),
                        Some(&[coded_error(message, code)]),
                    ));
                }
                self.start(id, request, who);
                None
            }
            (Protocol::TransportWs, "complete") => {
                // The client stopped listening: no answer is due.
                if let Some(id) = msg.id {
                    self.ops.remove(&id);
                }
                None
            }
            (Protocol::Legacy, "stop") => {
                let id = msg.id?;
                if self.ops.remove(&id).is_some() {
                    return self.send(text::<()>("complete", Some(&id), None));
                }
                None
            }
            (Protocol::Legacy, "connection_terminate") => {
                Some(End::Close(close_frame(1000, "terminated by the client")))
            }
            (_, other) => Some(bad_request(format!(
                "unknown message type {other:?} in {}",
                self.protocol.name()
            ))),
        }
    }

    /// One item of an operation's stream as the protocol says it.
    fn on_result(&mut self, id: &str, item: Option<(bool, Answer)>) -> Option<End> {
        let Some((first, answer)) = item else {
            // Removed now, so that the id is free for a new operation at once.
            self.ops.remove(id);
            return self.send(text::<()>("complete", Some(id), None));
        };
        // Errors before the operation ran (syntax, validation) or while its
        // source stream was created (the root field refused: a bad argument, an
        // expired cursor) end it with `error`; graphql-transport-ws sends no
        // `complete` after it. Errors of nested fields have longer paths.
        let refused = match &answer {
            Answer::Response(r) => {
                first
                    && r.data == async_graphql::Value::Null
                    && !r.errors.is_empty()
                    && r.errors.iter().all(|e| e.path.len() <= 1)
            }
            Answer::Data { .. } => false,
        };
        match (self.protocol, &answer) {
            (Protocol::TransportWs, Answer::Response(r)) if refused => {
                self.ops.remove(id);
                self.send(text("error", Some(id), Some(&r.errors)))
            }
            (Protocol::TransportWs, _) => self.send(result("next", id, &answer)),
            (Protocol::Legacy, _) => self.send(result("data", id, &answer)),
        }
    }

    fn send(&mut self, m: Message) -> Option<End> {
        match self.outbox.send(m) {
            Ok(()) => None,
            Err(Overflow) => Some(End::Gone),
        }
    }
}

fn bad_request(reason: String) -> End {
    End::Close(close_frame(close::BAD_REQUEST, reason))
}

/// The client's messages, as bytes, until it leaves; `None` when it has gone.
async fn next_client_message(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
) -> Option<Result<Vec<u8>, String>> {
    loop {
        match stream.next().await? {
            Ok(Message::Text(t)) => return Some(Ok(t.as_bytes().to_vec())),
            Ok(Message::Binary(b)) => return Some(Ok(b.to_vec())),
            Ok(Message::Close(_)) => return None,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Err(e) => return Some(Err(e.to_string())),
        }
    }
}

/// Runs one WebSocket connection until the client leaves, breaks the protocol,
/// falls too far behind, or the server shuts down. axum's graceful shutdown
/// does not wait for upgraded connections, so each watches `shutdown` itself:
/// it stops reading, lets the hub end every feed (each operation says
/// `complete`), then says goodbye with close code 1001.
pub async fn serve(
    socket: WebSocket,
    handler: Handler,
    shutdown: CancellationToken,
    hub_tasks: TaskTracker,
) {
    let Handler {
        schema,
        direct,
        protocol,
        cfg,
        auth,
        users,
    } = handler;
    let (sink, mut stream) = socket.split();
    let sink: SharedSink = Arc::new(tokio::sync::Mutex::new(sink));
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Gate::default());
    let abort = CancellationToken::new();
    let abort_frame = Arc::new(Mutex::new(None));
    let writer = tokio::spawn(write_loop(
        Arc::clone(&sink),
        rx,
        Arc::clone(&queued),
        Arc::clone(&gate),
        abort.clone(),
        Arc::clone(&abort_frame),
        cfg.max_queued_bytes,
    ));
    let live = (direct.services.hub.metrics()).connection(crate::metrics::Transport::Ws);
    let mut conn = Connection {
        protocol,
        schema,
        direct,
        outbox: Outbox {
            tx,
            sink,
            fed: 0,
            queued,
            gate,
            abort: abort.clone(),
            abort_frame,
            max: cfg.max_queued_bytes,
            live,
        },
        ops: StreamMap::new(),
        auth,
        users,
        max_subscriptions: cfg.max_subscriptions,
        session: None,
    };
    let init_deadline = tokio::time::sleep(cfg.init_timeout);
    let mut init_deadline = std::pin::pin!(init_deadline);
    let mut keepalive = cfg.keepalive.map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let hub_stopped = async {
        shutdown.cancelled().await;
        hub_tasks.wait().await;
    };
    let mut hub_stopped = std::pin::pin!(hub_stopped);
    let mut stopping = false;
    let mut token_expiry = None;
    // Made once: a new one per turn of the loop took the token's lock twice per
    // wake, and the shutdown token is shared by every connection.
    let mut aborted = std::pin::pin!(abort.cancelled());
    let mut shutting_down = std::pin::pin!(shutdown.cancelled());
    let end = loop {
        let end = tokio::select! {
            () = &mut aborted => Some(End::Gone),
            () = &mut shutting_down, if !stopping => {
                stopping = true;
                // Conflated feeds must be polled to see their end.
                conn.outbox.gate.open();
                None
            }
            () = &mut hub_stopped, if stopping => {
                // Every feed has ended: what is left is ready now; take it.
                while let Some(Some((id, item))) =
                    futures_util::FutureExt::now_or_never(conn.ops.next())
                {
                    if conn.on_result(&id, item).is_some() {
                        break;
                    }
                }
                Some(End::Close(close_frame(close::GOING_AWAY, "server shutting down")))
            }
            m = next_client_message(&mut stream), if !stopping => match m {
                Some(Ok(raw)) => conn.on_message(&raw),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket read failed");
                    Some(End::Gone)
                }
                None => Some(End::Gone),
            },
            () = expiry(&mut token_expiry), if !stopping => Some(End::Close(
                close_frame(close::FORBIDDEN, "Forbidden: token expired"),
            )),
            () = &mut init_deadline, if !conn.initialised() && !stopping => Some(End::Close(close_frame(
                close::INIT_TIMEOUT,
                "Connection initialisation timeout",
            ))),
            () = tick(&mut keepalive), if conn.initialised() && !stopping => {
                let kind = match protocol {
                    Protocol::TransportWs => "ping",
                    Protocol::Legacy => "ka",
                };
                conn.send(control(kind))
            }
            Some((id, item)) = conn.ops.next(), if !conn.ops.is_empty() => {
                // Everything else ready too, before the socket and timers are
                // polled again: a read attempt per event was a syscall each.
                let mut end = conn.on_result(&id, item);
                let mut n = 1;
                while end.is_none() && n < MAX_COALESCED {
                    match conn.ops.next().now_or_never() {
                        Some(Some((id, item))) => end = conn.on_result(&id, item),
                        _ => break,
                    }
                    n += 1;
                }
                end
            }
        };
        conn.outbox.flush_fed();
        if let Some(end) = end {
            break end;
        }
        if token_expiry.is_none() {
            token_expiry = conn
                .expires_in()
                .map(|left| Box::pin(tokio::time::sleep(left)));
        }
    };
    match end {
        End::Close(frame) => conn.outbox.close(frame),
        // Nobody to write to, or the outbox was dropped for a close frame.
        End::Gone => abort.cancel(),
    }
    drop(conn);
    // The writer ends once it has written the close frame, or at once when the
    // connection was aborted or the socket failed.
    let mut writer = writer;
    match tokio::time::timeout(WRITER_GRACE, &mut writer).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "websocket writer task failed"),
        // A client that reads nothing cannot hold the connection open.
        Err(_) => writer.abort(),
    }
}

/// Resolves when the connection's token expires; never before it has one.
pub(crate) async fn expiry(timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

/// The next keep-alive tick; never without keep-alive.
pub(crate) async fn tick(keepalive: &mut Option<tokio::time::Interval>) {
    match keepalive {
        Some(k) => {
            k.tick().await;
        }
        None => std::future::pending().await,
    }
}
