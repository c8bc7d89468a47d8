//! The HTTP edge: GraphQL over HTTP (`GET`/`POST /graphql`), subscriptions over
//! WebSocket (`GET /graphql/ws`, both `graphql-transport-ws` and the legacy
//! `graphql-ws` of subscriptions-transport-ws) and over Server-Sent Events
//! (`GET`/`POST /graphql/stream`, or `/graphql` asking for
//! `text/event-stream`), the GraphiQL page, and graceful serving.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_graphql::http::GraphiQLSource;
use async_graphql_axum::GraphQLBatchRequest;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use tickgraph_ingest::listener::{self, ConnLimits, ConnMetrics};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;

use crate::auth::{AuthError, Authenticator, LimitError, Users};
use crate::schema::ApiSchema;
use crate::sse;
use crate::ws::{self, Protocol, WsConfig};

pub const GRAPHQL_PATH: &str = "/graphql";
pub const WS_PATH: &str = "/graphql/ws";
pub const SSE_PATH: &str = "/graphql/stream";
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
/// Clients send only small control messages; a larger one is read in several
/// calls. The buffer's capacity stays with the connection while it is open.
const WS_READ_BUFFER: usize = 1 << 10;
/// How long, after shutdown, the server waits for open responses: an event
/// stream whose client stopped reading is never polled again, so it cannot
/// end itself.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct AppState {
    schema: ApiSchema,
    ws: WsConfig,
    direct: ws::Direct,
    shutdown: CancellationToken,
    /// The hub's tasks: once they have all finished, every feed has ended.
    hub_tasks: TaskTracker,
    sse: sse::Endpoint,
    auth: Authenticator,
    users: Arc<Users>,
}

/// The routes of the API. `hub_tasks` tracks the hub's tasks, so that at
/// `shutdown` a socket knows when every subscription has ended.
pub fn router(
    schema: ApiSchema,
    ws: WsConfig,
    direct: ws::Direct,
    shutdown: CancellationToken,
    hub_tasks: TaskTracker,
    auth: Authenticator,
    users: Arc<Users>,
) -> Router {
    Router::new()
        .route(
            GRAPHQL_PATH,
            get(graphql)
                .post(graphql)
                .layer(RequestBodyLimitLayer::new(MAX_BODY)),
        )
        .route(
            SSE_PATH,
            get(event_stream)
                .post(event_stream)
                .layer(RequestBodyLimitLayer::new(MAX_BODY)),
        )
        .route(WS_PATH, get(subscriptions))
        .route(GRAPHIQL_PATH, get(graphiql))
        .merge(crate::page::routes())
        .route("/", get(|| async { Redirect::temporary(GRAPHIQL_PATH) }))
        .layer(TraceLayer::new_for_http())
        .with_state(AppState {
            sse: sse::Endpoint::new(
                schema.clone(),
                ws.keepalive,
                shutdown.clone(),
                hub_tasks.clone(),
                auth.clone(),
                Arc::clone(&users),
            )
            .counted(direct.services.hub.metrics().clone()),
            schema,
            ws,
            direct,
            shutdown,
            hub_tasks,
            auth,
            users,
        })
}

/// GraphQL over HTTP. A client that accepts `application/graphql-response+json`
/// gets it, with status 400 when the request could not run (syntax, validation,
/// limits); any other client gets `application/json` and status 200, as legacy
/// clients expect. A client that ranks `text/event-stream` first gets an event
/// stream, as from [`SSE_PATH`].
async fn graphql(State(s): State<AppState>, headers: HeaderMap, request: Request) -> Response {
    if sse::prefers_event_stream(&headers) {
        return s.sse.handle(request).await;
    }
    let who = match s.auth.from_headers(&headers) {
        Ok(p) => p,
        Err(e) => return unauthenticated(&e),
    };
    let get = request.method() == axum::http::Method::GET;
    let req = match <GraphQLBatchRequest>::from_request(request, &s).await {
        Ok(req) => req,
        Err(rejection) => return rejection.into_response(),
    };
    let mut req = req.into_inner();
    // GET must be safe (a link or a prefetch can send it): no mutations.
    if get && req.iter_mut().any(|r| mutates(r, &s.direct.limits)) {
        let mut out = refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "mutations must be sent with POST".into(),
            "METHOD_NOT_ALLOWED",
        );
        out.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return out;
    }
    let ops = req.iter_mut().count();
    if let Err(e) = s.users.request(&who, ops) {
        return limited(&e);
    }
    for r in req.iter_mut() {
        r.data.insert(who.clone());
    }
    let modern = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(GRAPHQL_RESPONSE_JSON));
    let resp = match req {
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

/// GraphQL over Server-Sent Events (graphql-sse, distinct connections mode).
async fn event_stream(State(s): State<AppState>, request: Request) -> Response {
    s.sse.handle(request).await
}

/// The first protocol in the client's list that we speak. A client that names
/// none gets `graphql-transport-ws`, the current protocol.
fn negotiate(headers: &HeaderMap) -> Result<Protocol, (StatusCode, String)> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(Protocol::TransportWs);
    }
    offered
        .iter()
        .find_map(|p| Protocol::from_name(p))
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
    let protocol = match negotiate(&headers) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    // Answer with exactly the protocol chosen above; axum would otherwise pick by
    // our order rather than the client's.
    upgrade
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .read_buffer_size(WS_READ_BUFFER)
        .protocols([protocol.name()])
        .on_upgrade(move |socket| {
            ws::serve(
                socket,
                ws::Handler {
                    schema: s.schema,
                    direct: s.direct,
                    protocol,
                    cfg: s.ws,
                    auth: s.auth,
                    users: s.users,
                },
                s.shutdown,
                s.hub_tasks,
            )
        })
}

/// Whether `r` holds a mutation. A document the guard refuses is left to the
/// executor, which refuses it without running anything.
/// The parse is kept in the request, so the executor does not parse again.
fn mutates(r: &mut async_graphql::Request, limits: &crate::schema::Limits) -> bool {
    if crate::schema::guard::check_text(&r.query, &limits.guard).is_err() {
        return false;
    }
    r.parsed_query().is_ok_and(|doc| {
        doc.operations
            .iter()
            .any(|(_, op)| op.node.ty == async_graphql::parser::types::OperationType::Mutation)
    })
}

/// A GraphQL-shaped refusal before any operation ran.
fn refusal(status: StatusCode, message: String, code: &str) -> Response {
    let body = serde_json::json!({
        "errors": [{ "message": message, "extensions": { "code": code } }]
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `401`: no credentials, or credentials that do not hold.
pub(crate) fn unauthenticated(e: &AuthError) -> Response {
    let mut out = refusal(StatusCode::UNAUTHORIZED, e.to_string(), e.code());
    out.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tickgraph\""),
    );
    out
}

/// `429` with `Retry-After`: a per-user limit; `413` for a batch no wait
/// would let in.
pub(crate) fn limited(e: &LimitError) -> Response {
    if !e.is_retryable() {
        return refusal(StatusCode::PAYLOAD_TOO_LARGE, e.to_string(), e.code());
    }
    let mut out = refusal(StatusCode::TOO_MANY_REQUESTS, e.to_string(), e.code());
    out.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(e.retry_after_secs()));
    out
}

/// The GraphiQL page and the part of its Content-Security-Policy that does
/// not depend on the request, built once.
struct GraphiqlPage {
    html: String,
    csp: String,
}

static GRAPHIQL: LazyLock<GraphiqlPage> = LazyLock::new(|| {
    let html = GraphiQLSource::build()
        .endpoint(GRAPHQL_PATH)
        .subscription_endpoint(WS_PATH)
        .title("tickgraph")
        .finish();
    let csp = graphiql_csp(&html);
    GraphiqlPage { html, csp }
});

/// Where the page may load from: its scripts, styles and fonts come from
/// unpkg.com, its icon from graphql.org, and its one inline script is allowed
/// by its hash, so no other script runs even if something were injected.
/// Styles allow inline ones: the page has a `<style>` and GraphiQL's
/// components add their own at run time; a style cannot run code. It may
/// be framed by no one, and talks only to its own origin.
fn graphiql_csp(html: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let hashes: String = inline_scripts(html)
        .map(|body| {
            let digest = sha2::Sha256::digest(body.as_bytes());
            format!(
                " 'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        })
        .collect();
    format!(
        "default-src 'none'; script-src https://unpkg.com{hashes}; \
         style-src https://unpkg.com 'unsafe-inline'; font-src https://unpkg.com data:; \
         img-src https://graphql.org data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// The bodies of the `<script>` elements without `src`.
fn inline_scripts(html: &str) -> impl Iterator<Item = &str> {
    html.split("<script").skip(1).filter_map(|rest| {
        let (tag, rest) = rest.split_once('>')?;
        let (body, _) = rest.split_once("</script>")?;
        (!tag.contains("src=")).then_some(body)
    })
}

/// `connect-src`: the page's own origin over HTTP and WebSocket. `'self'`
/// covers `ws:`/`wss:` only in browsers that follow CSP 3, so the socket's
/// origin is named too when the `Host` header is a plain host and port.
fn connect_src(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    match host {
        Some(h) => format!("connect-src 'self' ws://{h} wss://{h}"),
        None => "connect-src 'self'".into(),
    }
}

async fn graphiql(headers: HeaderMap) -> Response {
    let page = &*GRAPHIQL;
    let csp = match HeaderValue::from_str(&format!("{}; {}", page.csp, connect_src(&headers))) {
        Ok(v) => v,
        // Never the page without its policy.
        Err(e) => {
            tracing::error!(error = %e, "cannot build GraphiQL's Content-Security-Policy");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    let mut out = Html(page.html.clone()).into_response();
    let h = out.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, csp);
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out
}

/// Serves `router` on `listener` until `shutdown`, then stops accepting and waits
/// for in-flight requests, at most `DRAIN_GRACE`; WebSocket connections close
/// themselves on `shutdown`. Otherwise the same edge as ingest's (connection cap
/// and deadlines: [`listener`]), so both stop alike.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnLimits,
    metrics: ConnMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let server = listener::serve(listener, router, limits, metrics, shutdown.clone());
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    tokio::select! {
        served = server => served,
        () = grace => {
            // Their connections' tasks end with the runtime, as the process exits.
            tracing::warn!(
                grace_secs = DRAIN_GRACE.as_secs(),
                "responses still open after the shutdown grace; leaving them"
            );
            Ok(())
        }
    }
}
