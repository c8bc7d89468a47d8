//! GraphQL over Server-Sent Events, for clients that cannot use WebSockets:
//! the graphql-sse protocol's "distinct connections mode", one operation per
//! request (`GET` or `POST`, as in GraphQL over HTTP, with
//! `Accept: text/event-stream`) and one event stream per operation:
//!
//! ```text
//! :                              opening comment (also the keep-alive)
//!
//! event: next
//! data: {"data":{"quotes":{...}}}    one per result
//!
//! event: complete
//! data:                          the operation is over; the response ends
//! ```
//!
//! - A request that is not a GraphQL request at all (not JSON, no `query`,
//!   `variables` not an object) is answered `400` with
//!   `{"errors":[{"message":...}]}` as `application/json`; a `POST` that is not
//!   `application/json` gets `415`; a client whose `Accept` does not name
//!   `text/event-stream` gets `406`.
//! - Everything GraphQL refuses before running the operation (syntax,
//!   validation, limits, an argument such as `maxRate: 0`) comes on the
//!   accepted stream, as the protocol requires: status `200`, one `next` with
//!   the errors, then `complete`.
//! - **Slow clients.** The stream is polled only as fast as the client reads,
//!   with nothing queued in between: a subscription that must receive every
//!   event backs up into its hub queue (`--subscriber-queue` events and
//!   `--subscriber-queue-bytes` bytes), and when that overflows it gets one
//!   `next` with "subscriber too slow: ..." and
//!   `complete`. A conflated (`maxRate`) subscription waits in the hub, which
//!   keeps only the newest value per instrument, so it is never too slow.
//! - At shutdown the hub ends every feed; the stream sends what is left and
//!   `complete`, as the WebSocket handler does. A client that stopped reading
//!   cannot be sent even that: [`crate::serve`] stops waiting for it after a
//!   grace period.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Query, Request};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{coded_error, AuthError, Authenticator, ConnectionSlot, Principal, Users};
use crate::schema::ApiSchema;
use crate::ws::{expiry, tick};

pub const EVENT_STREAM: &str = "text/event-stream";
/// The response body's first bytes, and the keep-alive: an SSE comment.
const COMMENT: &[u8] = b":\n\n";
/// An empty `data:` line, because an event without data is never dispatched
/// by `EventSource`.
const COMPLETE: &[u8] = b"event: complete\ndata:\n\n";

/// Why a request was not given a stream.
#[derive(Debug, thiserror::Error)]
pub enum SseError {
    #[error("this endpoint answers with an event stream only: send `Accept: text/event-stream`")]
    NotAcceptable,
    #[error("POST a JSON body with `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("{0}")]
    BadRequest(String),
    /// The body could not be read (too large: 413).
    #[error("{message}")]
    Body { status: StatusCode, message: String },
}

impl IntoResponse for SseError {
    fn into_response(self) -> Response {
        let status = match &self {
            SseError::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            SseError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            SseError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SseError::Body { status, .. } => *status,
        };
        let body = json!({ "errors": [{ "message": self.to_string() }] }).to_string();
        let mut out = (
            status,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            body,
        )
            .into_response();
        if status == StatusCode::NOT_ACCEPTABLE {
            out.headers_mut()
                .insert(header::ACCEPT, HeaderValue::from_static(EVENT_STREAM));
        }
        out
    }
}

/// The highest q-value the client's `Accept` gives `media` by naming it
/// (wildcards do not count); 0 when it does not name it.
fn quality(headers: &HeaderMap, media: &str) -> f32 {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|range| {
            let mut parts = range.split(';');
            let essence = parts.next()?.trim();
            if !essence.eq_ignore_ascii_case(media) {
                return None;
            }
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok());
            // A malformed q-value still names the type.
            Some(q.unwrap_or(1.0))
        })
        .fold(0.0, f32::max)
}

/// The client names `text/event-stream` as acceptable. `*/*` does not count:
/// graphql-sse clients name it, and GraphQL over HTTP reads a missing or
/// wildcard `Accept` as JSON.
pub fn accepts_event_stream(headers: &HeaderMap) -> bool {
    quality(headers, EVENT_STREAM) > 0.0
}

/// The client ranks `text/event-stream` above both JSON responses: what
/// `/graphql` serves an event stream for; on a tie it keeps to JSON.
pub fn prefers_event_stream(headers: &HeaderMap) -> bool {
    let stream = quality(headers, EVENT_STREAM);
    let json = quality(headers, "application/json")
        .max(quality(headers, "application/graphql-response+json"));
    stream > 0.0 && stream > json
}

/// GraphQL over HTTP's `GET` parameters; `variables` and `extensions` are
/// JSON text.
#[derive(Deserialize)]
struct GetParams {
    query: Option<String>,
    #[serde(rename = "operationName")]
    operation_name: Option<String>,
    variables: Option<String>,
    extensions: Option<String>,
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The request's GraphQL parameters, as a JSON object.
async fn read_params(req: Request) -> Result<Map<String, Value>, SseError> {
    if req.method() == Method::GET {
        let Query(p) = Query::<GetParams>::try_from_uri(req.uri()).map_err(|e| {
            SseError::BadRequest(format!("unparsable URL query: {}", e.body_text()))
        })?;
        let mut params = Map::new();
        if let Some(q) = p.query {
            params.insert("query".into(), Value::String(q));
        }
        if let Some(name) = p.operation_name {
            params.insert("operationName".into(), Value::String(name));
        }
        for (key, text) in [("variables", p.variables), ("extensions", p.extensions)] {
            if let Some(text) = text {
                let v = serde_json::from_str(&text)
                    .map_err(|e| SseError::BadRequest(format!("`{key}` is not JSON: {e}")))?;
                params.insert(key.into(), v);
            }
        }
        return Ok(params);
    }
    if !is_json(req.headers()) {
        return Err(SseError::UnsupportedMediaType);
    }
    let body = Bytes::from_request(req, &())
        .await
        .map_err(|r| SseError::Body {
            status: r.status(),
            message: r.body_text(),
        })?;
    match serde_json::from_slice(&body) {
        Ok(Value::Object(params)) => Ok(params),
        Ok(_) => Err(SseError::BadRequest(
            "the JSON body must be an object".into(),
        )),
        Err(e) => Err(SseError::BadRequest(format!("unparsable JSON body: {e}"))),
    }
}

/// Checks the parameters' shapes, as GraphQL over HTTP defines them.
fn into_request(mut params: Map<String, Value>) -> Result<async_graphql::Request, SseError> {
    match params.get("query") {
        Some(Value::String(_)) => {}
        None | Some(Value::Null) => return Err(SseError::BadRequest("missing `query`".into())),
        Some(_) => return Err(SseError::BadRequest("`query` must be a string".into())),
    }
    if !matches!(
        params.get("operationName"),
        None | Some(Value::Null | Value::String(_))
    ) {
        return Err(SseError::BadRequest(
            "`operationName` must be a string".into(),
        ));
    }
    for key in ["variables", "extensions"] {
        if !matches!(params.get(key), None | Some(Value::Null | Value::Object(_))) {
            return Err(SseError::BadRequest(format!("`{key}` must be an object")));
        }
    }
    params.retain(|_, v| !v.is_null());
    serde_json::from_value(Value::Object(params))
        .map_err(|e| SseError::BadRequest(format!("invalid GraphQL request: {e}")))
}

/// What an event stream needs from the server.
#[derive(Clone)]
pub struct Endpoint {
    schema: ApiSchema,
    keepalive: Option<Duration>,
    shutdown: CancellationToken,
    hub_tasks: TaskTracker,
    /// Where open streams are counted.
    metrics: Option<crate::metrics::ApiMetrics>,
    auth: Authenticator,
    users: Arc<Users>,
}

impl Endpoint {
    /// `keepalive`: how often an idle stream gets a comment (`None`: never);
    /// `hub_tasks`: the hub's tasks, finished once every feed has ended after
    /// `shutdown`.
    pub fn new(
        schema: ApiSchema,
        keepalive: Option<Duration>,
        shutdown: CancellationToken,
        hub_tasks: TaskTracker,
        auth: Authenticator,
        users: Arc<Users>,
    ) -> Self {
        Self {
            schema,
            keepalive,
            shutdown,
            hub_tasks,
            metrics: None,
            auth,
            users,
        }
    }

    /// Counts each open stream in `metrics`.
    pub fn counted(mut self, metrics: crate::metrics::ApiMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Answers one `GET` or `POST`: an event stream with the operation's
    /// results, or a refusal before any stream (see the module's notes).
    pub async fn handle(&self, req: Request) -> Response {
        if !accepts_event_stream(req.headers()) {
            return SseError::NotAcceptable.into_response();
        }
        let who = match self.auth.from_headers(req.headers()) {
            Ok(p) => p,
            Err(e) => return crate::http::unauthenticated(&e),
        };
        let slot = match self
            .users
            .request(&who, 1)
            .and_then(|()| self.users.connect(&who))
        {
            Ok(slot) => slot,
            Err(e) => return crate::http::limited(&e),
        };
        match read_params(req).await.and_then(into_request) {
            Ok(request) => self.stream(request, who, slot),
            Err(e) => e.into_response(),
        }
    }

    fn stream(
        &self,
        request: async_graphql::Request,
        who: Principal,
        slot: ConnectionSlot,
    ) -> Response {
        let expiry = who
            .expires_in()
            .map(|left| Box::pin(tokio::time::sleep(left)));
        let request = request.data(who);
        let keepalive = self.keepalive.map(|every| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let (shutdown, hub_tasks) = (self.shutdown.clone(), self.hub_tasks.clone());
        let pump = Pump {
            _slot: slot,
            expiry,
            results: self.schema.execute_stream(request).boxed(),
            early: None,
            phase: Phase::Opening,
            keepalive,
            shutdown: self.shutdown.clone(),
            hub_stopped: Box::pin(async move {
                shutdown.cancelled().await;
                hub_tasks.wait().await;
            }),
            _live: self
                .metrics
                .as_ref()
                .map(|m| m.connection(crate::metrics::Transport::Sse)),
        };
        let chunks = futures_util::stream::unfold(pump, |mut pump| async move {
            let chunk = pump.next_chunk().await?;
            Some((Ok::<_, Infallible>(chunk), pump))
        });
        let mut out = (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/event-stream; charset=utf-8"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(chunks),
        )
            .into_response();
        // Proxies such as nginx would otherwise hold events back.
        out.headers_mut().insert(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        );
        out
    }
}

enum Phase {
    /// Nothing sent yet.
    Opening,
    Live,
    /// The hub has ended every feed: send what is ready, then `complete`.
    Draining,
    Done,
}

/// Turns an operation's results into the event stream, one chunk per poll of
/// the response body, so nothing waits here for a client that does not read.
struct Pump {
    /// The stream's place in its user's connection count.
    _slot: ConnectionSlot,
    /// When the token the stream was opened with expires.
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    results: BoxStream<'static, async_graphql::Response>,
    /// What the operation had ready when it started, sent after the opening
    /// comment.
    early: Option<Option<async_graphql::Response>>,
    phase: Phase,
    keepalive: Option<tokio::time::Interval>,
    shutdown: CancellationToken,
    hub_stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// This stream in the connections gauge, until the response is dropped.
    _live: Option<crate::metrics::Connection>,
}

impl Pump {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            match self.phase {
                Phase::Opening => {
                    // Started before the first byte goes out, so a client that
                    // sees it knows its subscription is registered with the hub
                    // (a snapshot from history may still be loading).
                    self.early = self.results.next().now_or_never();
                    self.phase = Phase::Live;
                    return Some(Bytes::from_static(COMMENT));
                }
                Phase::Live => {
                    if let Some(item) = self.early.take() {
                        return Some(self.on_item(item));
                    }
                    tokio::select! {
                        biased;
                        item = self.results.next() => return Some(self.on_item(item)),
                        () = &mut self.hub_stopped => self.phase = Phase::Draining,
                        () = expiry(&mut self.expiry) => {
                            // The operation ends here: its error, then `complete`.
                            self.results = futures_util::stream::empty().boxed();
                            let err = AuthError::Expired;
                            return Some(next_event(&async_graphql::Response::from_errors(
                                vec![coded_error(err.to_string(), err.code())],
                            )));
                        }
                        () = tick(&mut self.keepalive), if !self.shutdown.is_cancelled() => {
                            return Some(Bytes::from_static(COMMENT));
                        }
                    }
                }
                Phase::Draining => {
                    // Every feed has ended: what is left is ready now; anything
                    // still waiting (a query in flight) is cut short.
                    let item = self.results.next().now_or_never().flatten();
                    return Some(self.on_item(item));
                }
                Phase::Done => return None,
            }
        }
    }

    fn on_item(&mut self, item: Option<async_graphql::Response>) -> Bytes {
        match item {
            Some(response) => next_event(&response),
            None => {
                self.phase = Phase::Done;
                Bytes::from_static(COMPLETE)
            }
        }
    }
}

/// A `next` event. Compact JSON has no line breaks, so one `data:` line holds it.
fn next_event(response: &async_graphql::Response) -> Bytes {
    let json = crate::shared_json::response_json(response)
        .map(String::into_bytes)
        .unwrap_or_else(|e| {
            // Only a value that cannot be JSON (a map with non-string keys) fails.
            tracing::error!(error = %e, "cannot serialize a GraphQL response");
            br#"{"errors":[{"message":"internal error"}]}"#.to_vec()
        });
    let mut event = Vec::with_capacity(json.len() + 20);
    event.extend_from_slice(b"event: next\ndata: ");
    event.extend_from_slice(&json);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).expect("header"));
        h
    }

    #[test]
    fn accept_must_name_the_event_stream() {
        assert!(accepts_event_stream(&accept("text/event-stream")));
        assert!(accepts_event_stream(&accept(
            "application/json;q=0.9, Text/Event-Stream; charset=utf-8"
        )));
        assert!(!accepts_event_stream(&accept("*/*")));
        assert!(!accepts_event_stream(&accept("text/*")));
        assert!(!accepts_event_stream(&accept("text/event-stream;q=0")));
        assert!(!accepts_event_stream(&HeaderMap::new()));
    }

    #[test]
    fn graphql_serves_a_stream_only_when_it_ranks_first() {
        assert!(prefers_event_stream(&accept("text/event-stream")));
        assert!(prefers_event_stream(&accept(
            "text/event-stream, application/json;q=0.5"
        )));
        assert!(!prefers_event_stream(&accept(
            "application/json, text/event-stream"
        )));
        assert!(!prefers_event_stream(&accept(
            "application/graphql-response+json, text/event-stream;q=0.9"
        )));
        assert!(!prefers_event_stream(&accept("*/*")));
    }

    fn params(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn request_shapes_are_checked() {
        let r = into_request(params(json!({
            "query": "query Q($n: Int) { a }",
            "operationName": "Q",
            "variables": {"n": 2, "x": 1.5, "s": "t"},
            "extensions": null,
        })))
        .expect("valid");
        assert_eq!(r.operation_name.as_deref(), Some("Q"));
        assert_eq!(
            r.variables.into_value().into_json().expect("json"),
            json!({"n": 2, "x": 1.5, "s": "t"})
        );
        for bad in [
            json!({}),
            json!({"query": 1}),
            json!({"query": "{ a }", "variables": [1]}),
            json!({"query": "{ a }", "variables": "{}"}),
            json!({"query": "{ a }", "extensions": 2}),
            json!({"query": "{ a }", "operationName": 2}),
        ] {
            assert!(
                matches!(
                    into_request(params(bad.clone())),
                    Err(SseError::BadRequest(_))
                ),
                "{bad}"
            );
        }
    }
}
