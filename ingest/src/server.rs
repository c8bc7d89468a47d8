//! The HTTP edge of ingest.
//!
//! - `POST /v1/events`: one batch per request, format by Content-Type (see
//!   [`crate::wire::Format`]). 200 with a per-event answer; 400 unreadable body;
//!   401 missing or unknown producer token; 413 too many events or bytes; 415
//!   unknown Content-Type; 429 over the producer's rate (with `Retry-After`,
//!   nothing of the batch taken); 503 event store down. An event whose `source`
//!   the token does not own is rejected, with that reason, like any invalid one.
//!   A refusal made before the body is read to its end (401, 415, 413 on size,
//!   a broken body) says `Connection: close`, since that connection cannot
//!   carry another request.
//! - `GET /v1/stream`: a WebSocket for high-rate producers. Each text message is a
//!   JSON array or NDJSON batch, each binary message a MessagePack array; each gets
//!   one answer message, in order, carrying the batch's number on the connection.
//!   The token goes on the upgrade request (401 before the upgrade).
//!
//! `/metrics`, `/healthz` and `/readyz` come from [`crate::ops`], merged in by
//! whoever serves this router, with what [`Ingest::register_ops`] adds.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::event::now_nanos;
use crate::listener::ConnLimits;
use crate::metrics::IngestMetrics;
use crate::producers::{Producer, ProducerRefusal, Producers};
use crate::redis_link::RedisTarget;
use crate::stream::{DeadLetter, RawRecord, StreamLayout};
use crate::wire::{decode_batch, BatchError, Format};
use crate::writer::{RawEntry, StreamWriter, WriteError, WriterConfig};

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub layout: StreamLayout,
    /// Events per batch; more is refused with 413.
    pub max_batch_events: usize,
    /// Bytes per request body or WebSocket message; more is refused with 413.
    pub max_body_bytes: usize,
    /// The stream writer: linger, spool, Redis timeout, dead-letter trimming.
    pub writer: WriterConfig,
    /// Who may send: producer tokens, or the open dev mode.
    pub producers: Producers,
    /// The listener's connection cap and deadlines.
    pub conn: ConnLimits,
}

impl IngestConfig {
    /// Producers hold few connections each, kept alive.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

    pub fn new(layout: StreamLayout) -> Self {
        Self {
            writer: WriterConfig::new(layout.clone()),
            layout,
            max_batch_events: 10_000,
            max_body_bytes: 16 * 1024 * 1024,
            producers: Producers::Open,
            conn: ConnLimits::with_max_connections(Self::DEFAULT_MAX_CONNECTIONS),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("opening the spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
}

struct Shared {
    cfg: IngestConfig,
    writer: StreamWriter,
    metrics: IngestMetrics,
    /// Streaming sessions end on it; HTTP requests are drained by axum.
    shutdown: CancellationToken,
}

/// A built ingest service: its router, and the writer task to wait for at shutdown.
pub struct Ingest {
    shared: Arc<Shared>,
    writer_task: tokio::task::JoinHandle<()>,
}

impl Ingest {
    pub async fn build(
        cfg: IngestConfig,
        client: impl Into<RedisTarget>,
        shutdown: CancellationToken,
    ) -> Result<Self, IngestError> {
        let (writer, writer_task) = StreamWriter::spawn(cfg.writer.clone(), client)?;
        Ok(Self {
            shared: Arc::new(Shared {
                cfg,
                writer,
                metrics: IngestMetrics::default(),
                shutdown,
            }),
            writer_task,
        })
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/events", post(post_events))
            .route("/v1/stream", get(stream_events))
            // The batch limit is enforced while reading, with our own error body.
            .layer(DefaultBodyLimit::disable())
            .with_state(self.shared.clone())
    }

    /// Adds ingest's metrics and readiness check to `ops`; the check talks to
    /// Redis over `link`, the process's check connection.
    pub fn register_ops(&self, ops: &mut crate::ops::Ops, link: impl Into<crate::ops::CheckLink>) {
        crate::metrics::register_ops(
            ops,
            &self.shared.metrics,
            self.shared.writer.stats_handle(),
            link.into(),
            self.shared.cfg.writer.spool.max_bytes,
        );
    }

    pub fn metrics(&self) -> &IngestMetrics {
        &self.shared.metrics
    }

    /// Resolves once every accepted batch has been written: after shutdown, when
    /// the server has drained its requests and every streaming session has ended.
    pub async fn finished(self) {
        drop(self.shared);
        let _ = self.writer_task.await;
    }
}

/// The answer to one batch.
#[derive(Debug, Serialize)]
pub struct BatchAnswer {
    /// Sequence number of the batch on a streaming connection (absent over HTTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<u64>,
    pub received: usize,
    pub accepted: usize,
    pub rejected: Vec<RejectedEvent>,
}

#[derive(Debug, Serialize)]
pub struct RejectedEvent {
    /// Position of the event in the batch (NDJSON: among non-blank lines).
    pub index: usize,
    pub reason: String,
}

/// Everything that can fail a whole batch, as the producer sees it.
#[derive(Debug, thiserror::Error)]
enum BatchFailure {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("body is larger than {0} bytes")]
    TooLarge(usize),
    /// The header as [`crate::event::shown`] quotes it: a hostile one is not
    /// echoed whole.
    #[error("unsupported Content-Type {0}; use one of: {accepted}", accepted = Format::ACCEPTED)]
    UnsupportedType(String),
    #[error("could not read the body: {0}")]
    Body(String),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Refused(#[from] ProducerRefusal),
}

impl BatchFailure {
    fn status(&self) -> StatusCode {
        match self {
            BatchFailure::Batch(BatchError::TooManyEvents { .. }) | BatchFailure::TooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            BatchFailure::Batch(BatchError::Malformed(_)) | BatchFailure::Body(_) => {
                StatusCode::BAD_REQUEST
            }
            BatchFailure::UnsupportedType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BatchFailure::Write(_) => StatusCode::SERVICE_UNAVAILABLE,
            BatchFailure::Refused(ProducerRefusal::RateLimited { .. }) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            BatchFailure::Refused(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

impl IntoResponse for BatchFailure {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        let mut out = (self.status(), body).into_response();
        match &self {
            BatchFailure::Refused(ProducerRefusal::RateLimited { retry_after, .. }) => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                out.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            BatchFailure::Refused(_) => {
                out.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tickgraph-ingest\""),
                );
            }
            _ => {}
        }
        out
    }
}

/// A refusal answered before the request's body was read to its end. hyper
/// cannot reuse such a connection (the rest of the body is still in it) and
/// closes it after the answer; without `Connection: close` the client would
/// send its next request into a closed connection.
struct BeforeBody(BatchFailure);

impl IntoResponse for BeforeBody {
    fn into_response(self) -> Response {
        let mut out = self.0.into_response();
        out.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        out
    }
}

/// Validates a batch, writes its valid events to their raw streams and its invalid
/// ones to the dead-letter stream, and answers per event.
async fn ingest_batch(
    shared: &Shared,
    producer: Option<&Producer>,
    format: Format,
    body: &[u8],
) -> Result<BatchAnswer, BatchFailure> {
    let ingest_ns = now_nanos();
    let items = decode_batch(format, body, shared.cfg.max_batch_events)?;
    let received = items.len();
    if let Some(p) = producer {
        p.admit(received)?;
    }
    let mut entries = Vec::with_capacity(received);
    let mut dead = Vec::new();
    let mut rejected = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let outcome = item.outcome.and_then(|event| {
            if let Some(p) = producer {
                let source = &event.header().source;
                if !p.owns(source.as_str()) {
                    return Err(p.unowned(source.as_str()));
                }
            }
            let shard = shared.cfg.layout.shard_of(&event.header().instrument);
            RawRecord { event, ingest_ns }
                .encode()
                .map(|record| RawEntry { shard, record })
                .map_err(|e| crate::Rejection(e.to_string()))
        });
        match outcome {
            Ok(entry) => entries.push(entry),
            Err(r) => {
                dead.push(DeadLetter::new("ingest", r.0.clone(), item.raw.to_vec()));
                rejected.push(RejectedEvent { index, reason: r.0 });
            }
        }
    }
    let accepted = entries.len();
    if let Err(e) = shared.writer.write(entries, dead).await {
        shared.metrics.refused_batch(received);
        return Err(e.into());
    }
    let reasons = rejected.iter().map(|r| r.reason.as_str());
    shared.metrics.stored_batch(received, accepted, reasons);
    if !rejected.is_empty() {
        tracing::debug!(
            received,
            rejected = rejected.len(),
            "batch had rejected events"
        );
    }
    Ok(BatchAnswer {
        batch: None,
        received,
        accepted,
        rejected,
    })
}

async fn post_events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<BatchAnswer>, Response> {
    let early = |e: BatchFailure| BeforeBody(e).into_response();
    // Nothing of an unknown caller's body is read.
    let producer = shared
        .cfg
        .producers
        .authenticate(&headers)
        .map_err(|e| early(e.into()))?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = Format::from_content_type(ct)
        .ok_or_else(|| early(BatchFailure::UnsupportedType(crate::event::shown(ct))))?;
    let limit = shared.cfg.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(early(BatchFailure::TooLarge(limit)));
    }
    let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        // to_bytes reports the limit through a LengthLimitError source.
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            early(BatchFailure::TooLarge(limit))
        } else {
            early(BatchFailure::Body(e.to_string()))
        }
    })?;
    ingest_batch(&shared, producer.as_deref(), format, &bytes)
        .await
        .map(Json)
        .map_err(IntoResponse::into_response)
}

/// The producer is authenticated once, on the upgrade request.
async fn stream_events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let producer = match shared.cfg.producers.authenticate(&headers) {
        Ok(p) => p,
        Err(e) => return BatchFailure::from(e).into_response(),
    };
    let limit = shared.cfg.max_body_bytes;
    ws.max_message_size(limit)
        .on_upgrade(move |socket| stream_session(shared, producer, socket))
}

/// One producer's streaming session. Batches are taken one at a time, so a
/// producer's events keep their order across batches. On shutdown the batch in
/// hand is finished and answered, then the session closes with 1001 (going away).
async fn stream_session(
    shared: Arc<Shared>,
    producer: Option<Arc<Producer>>,
    mut socket: WebSocket,
) {
    let mut batch = 0u64;
    loop {
        let msg = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => {
                let frame = axum::extract::ws::CloseFrame {
                    code: axum::extract::ws::close_code::AWAY,
                    reason: "ingest is shutting down".into(),
                };
                let _ = socket.send(Message::Close(Some(frame))).await;
                break;
            }
            m = socket.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let (format, bytes) = match msg {
            Ok(Message::Text(t)) => {
                let first = t.as_str().trim_start().as_bytes().first().copied();
                let format = if first == Some(b'[') {
                    Format::Json
                } else {
                    Format::Ndjson
                };
                (format, Bytes::from(t))
            }
            Ok(Message::Binary(b)) => (Format::MsgPack, b),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        batch += 1;
        let reply = match ingest_batch(&shared, producer.as_deref(), format, &bytes).await {
            Ok(mut answer) => {
                answer.batch = Some(batch);
                serde_json::to_string(&answer)
            }
            Err(e) => serde_json::to_string(&serde_json::json!({
                "batch": batch,
                "status": e.status().as_u16(),
                "error": e.to_string(),
            })),
        };
        let Ok(reply) = reply else { break };
        if socket.send(Message::Text(reply.into())).await.is_err() {
            break;
        }
    }
}
