//! The HTTP edge: GraphQL over HTTP (`GET`/`POST /graphql`), subscriptions over
//! WebSocket (`GET /graphql/ws`, both `graphql-transport-ws` and the legacy
//! `graphql-ws` of subscriptions-transport-ws), the GraphiQL page, and graceful
//! serving.

use std::future::ready;

use async_graphql::http::{
    GraphiQLSource, WebSocket as GraphQLSocket, WebSocketProtocols, WsMessage,
};
use async_graphql_axum::GraphQLBatchRequest;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use futures_util::{FutureExt, SinkExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;

use crate::schema::ApiSchema;

pub const GRAPHQL_PATH: &str = "/graphql";
pub const WS_PATH: &str = "/graphql/ws";
pub const GRAPHIQL_PATH: &str = "/graphiql";
/// Largest GraphQL request body accepted; a query is text, not data.
const MAX_BODY: usize = 1 << 20;
/// Most operations one batched request may hold: each is checked against the
/// depth and complexity limits on its own, so a batch multiplies them.
const MAX_BATCH: usize = 10;
/// Largest WebSocket message (and frame) accepted; subscribe messages are small.
const MAX_WS_MESSAGE: usize = 64 << 10;
const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json";
/// Read buffer of a WebSocket. tungstenite zeroes the whole buffer before every
/// read attempt, and the protocol handler tries a read each time it is polled
/// for output: with the default 128 KiB, that zeroing was the largest caller of
/// `memset`, the top symbol of the process at 25k events/s to two subscribers.
/// Clients send only small control messages.
const WS_READ_BUFFER: usize = 4 << 10;
/// WebSocket close code 1001: the server is going away.
const GOING_AWAY: u16 = 1001;

#[derive(Clone)]
struct AppState {
    schema: ApiSchema,
    shutdown: CancellationToken,
    /// The hub's tasks: once they have all finished, every feed has ended.
    hub_tasks: TaskTracker,
}

/// The routes of the API. `hub_tasks` tracks the hub's tasks, so that at
/// `shutdown` a socket knows when every subscription has ended.
pub fn router(schema: ApiSchema, shutdown: CancellationToken, hub_tasks: TaskTracker) -> Router {
    Router::new()
        .route(
            GRAPHQL_PATH,
            get(graphql)
                .post(graphql)
                .layer(RequestBodyLimitLayer::new(MAX_BODY)),
        )
        .route(WS_PATH, get(subscriptions))
        .route(GRAPHIQL_PATH, get(graphiql))
        .route("/", get(|| async { Redirect::temporary(GRAPHIQL_PATH) }))
        .layer(TraceLayer::new_for_http())
        .with_state(AppState {
            schema,
            shutdown,
            hub_tasks,
        })
}

/// GraphQL over HTTP. A client that accepts `application/graphql-response+json`
/// gets it, with status 400 when the request could not run (syntax, validation,
/// limits); any other client gets `application/json` and status 200, as legacy
/// clients expect.
async fn graphql(
    State(s): State<AppState>,
    headers: HeaderMap,
    req: GraphQLBatchRequest,
) -> Response {
    let modern = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(GRAPHQL_RESPONSE_JSON));
    let resp = match req.into_inner() {
        async_graphql::BatchRequest::Batch(ops) if ops.len() > MAX_BATCH => {
            async_graphql::BatchResponse::Single(async_graphql::Response::from_errors(vec![
                async_graphql::ServerError::new(
                    format!(
                        "at most {MAX_BATCH} operations per batch, got {}",
                        ops.len()
                    ),
                    None,
                ),
            ]))
        }
        req => s.schema.execute_batch(req).await,
    };
    let refused = match &resp {
        async_graphql::BatchResponse::Single(r) => {
            // Errors without a path never reached execution.
            r.data == async_graphql::Value::Null
                && !r.errors.is_empty()
                && r.errors.iter().all(|e| e.path.is_empty())
        }
        async_graphql::BatchResponse::Batch(_) => false,
    };
    let body = match serde_json::to_vec(&resp) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize a GraphQL response");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let (status, content_type) = if modern {
        let status = if refused {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        (status, GRAPHQL_RESPONSE_JSON)
    } else {
        (StatusCode::OK, "application/json")
    };
    let mut out = (status, [(header::CONTENT_TYPE, content_type)], body).into_response();
    if resp.is_ok() {
        if let Some(cc) = resp.cache_control().value() {
            if let Ok(v) = HeaderValue::from_str(&cc) {
                out.headers_mut().insert(header::CACHE_CONTROL, v);
            }
        }
    }
    out.headers_mut().extend(resp.http_headers());
    out
}

/// The first protocol in the client's list that we speak. A client that names
/// none gets `graphql-transport-ws`, the current protocol.
fn negotiate(
    headers: &HeaderMap,
) -> Result<(WebSocketProtocols, &'static str), (StatusCode, String)> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok((WebSocketProtocols::GraphQLWS, "graphql-transport-ws"));
    }
    offered
        .iter()
        .find_map(|p| match *p {
            "graphql-transport-ws" => Some((WebSocketProtocols::GraphQLWS, "graphql-transport-ws")),
            "graphql-ws" => Some((WebSocketProtocols::SubscriptionsTransportWS, "graphql-ws")),
            _ => None,
        })
        .ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!(
                    "unsupported WebSocket subprotocol {offered:?}: use graphql-transport-ws or graphql-ws"
                ),
            )
        })
}

async fn subscriptions(
    State(s): State<AppState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let (protocol, name) = match negotiate(&headers) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    // Answer with exactly the protocol chosen above; axum would otherwise pick by
    // our order rather than the client's.
    upgrade
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .read_buffer_size(WS_READ_BUFFER)
        .protocols([name])
        .on_upgrade(move |socket| serve_socket(socket, s.schema, protocol, s.shutdown, s.hub_tasks))
}

/// Messages written to a socket before it is flushed, at most.
const MAX_COALESCED: usize = 256;

/// The client's messages until it leaves; from `shutdown` on, none are read, yet
/// the stream never ends: the protocol handler stops at the end of its input,
/// before it has said `complete` for the subscriptions the hub is ending.
fn read_until_shutdown<S: Stream + Unpin>(
    client: S,
    shutdown: CancellationToken,
) -> impl Stream<Item = S::Item> {
    futures_util::stream::unfold((client, shutdown), |(mut client, shutdown)| async move {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => std::future::pending().await,
            m = client.next() => m.map(|m| (m, (client, shutdown))),
        }
    })
}

/// Runs one WebSocket connection until the client leaves or the server shuts
/// down. axum's graceful shutdown does not wait for upgraded connections, so each
/// watches `shutdown` itself: it stops reading, waits for the hub to end every
/// feed, says `complete` for each subscription, then goodbye with close code
/// 1001.
async fn serve_socket(
    socket: WebSocket,
    schema: ApiSchema,
    protocol: WebSocketProtocols,
    shutdown: CancellationToken,
    hub_tasks: TaskTracker,
) {
    let (mut sink, stream) = socket.split();
    let input = read_until_shutdown(stream, shutdown.clone())
        .take_while(|m| ready(m.is_ok()))
        .filter_map(|m| {
            ready(match m {
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => Some(m.into_data()),
                _ => None,
            })
        });
    let output = GraphQLSocket::new(schema, input, protocol).map(|m| match m {
        WsMessage::Text(t) => Message::Text(t.into()),
        WsMessage::Close(code, reason) => Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })),
    });
    let mut output = std::pin::pin!(output);
    let hub_stopped = async {
        shutdown.cancelled().await;
        hub_tasks.wait().await;
    };
    let mut hub_stopped = std::pin::pin!(hub_stopped);
    let stopping = loop {
        let m = tokio::select! {
            m = output.next() => m,
            () = &mut hub_stopped => break true,
        };
        let Some(m) = m else { break false };
        // Everything the handler has ready goes out in one write: a subscriber of
        // thousands of events a second must not cost a syscall per event.
        let mut ended = false;
        let mut next = Some(m);
        let mut coalesced = 0;
        while let Some(m) = next.take() {
            if sink.feed(m).await.is_err() {
                return;
            }
            coalesced += 1;
            if coalesced < MAX_COALESCED {
                match output.next().now_or_never() {
                    Some(Some(m)) => next = Some(m),
                    Some(None) => ended = true,
                    None => {}
                }
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
        if ended {
            break false;
        }
    };
    if stopping {
        // Every feed has ended and the input is idle, so all the handler has left
        // to say is ready now. Unconstrained: tokio's cooperative budget could
        // otherwise make a ready feed look pending.
        let rest = tokio::task::unconstrained(async {
            let mut rest = Vec::new();
            while let Some(Some(m)) = output.next().now_or_never() {
                rest.push(m);
            }
            rest
        })
        .await;
        for m in rest {
            if sink.send(m).await.is_err() {
                return;
            }
        }
    }
    if shutdown.is_cancelled() {
        let bye = Message::Close(Some(CloseFrame {
            code: GOING_AWAY,
            reason: "server shutting down".into(),
        }));
        // The client may already be gone; there is nobody left to tell.
        let _ = sink.send(bye).await;
    }
    let _ = sink.close().await;
}

async fn graphiql() -> Html<String> {
    Html(
        GraphiQLSource::build()
            .endpoint(GRAPHQL_PATH)
            .subscription_endpoint(WS_PATH)
            .title("tickgraph")
            .finish(),
    )
}

/// Serves `router` on `listener` until `shutdown`, then stops accepting and waits
/// for in-flight requests; WebSocket connections close themselves on `shutdown`.
/// The same edge as ingest's, so both stop alike.
pub use tickgraph_ingest::server::serve;
