//! tickgraph-api: the GraphQL API over the enriched streams and the history.
//!
//! # Layout
//! - [`schema`]: the GraphQL schema, split by domain (reference data, latest
//!   values, history, snapshots, subscriptions) and merged; [`schema_sdl`] exports
//!   it.
//! - [`hub`]: the fan-out hub, one reader per enriched shard feeding every
//!   subscription through bounded queues, plus the latest-value map.
//! - [`tick`]: `TradeTick`/`QuoteTick`, the one shape live events and history rows
//!   both take before they become GraphQL `Trade`/`Quote`.
//! - [`history`]: the SQL of history pages, snapshots and latest-value fallback.
//! - [`http`]: the axum router (`/graphql`, `/graphql/ws`, `/graphql/stream`,
//!   `/graphiql`) and [`serve`].
//! - [`ws`] and [`sse`]: GraphQL over WebSocket (both protocols) and over
//!   Server-Sent Events (graphql-sse, distinct connections mode).
//! - [`dlq`]: `tickgraph dlq list|replay`, the operator's command over dead letters.
//! - [`metrics`]: what the hub and the sockets count, and the api's readiness
//!   (Redis, Postgres, the hub's readers not behind), for
//!   [`tickgraph_ingest::ops`].
//! - [`telemetry`]: logs (text or JSON) and, when configured, span export over
//!   OTLP/HTTP; one span per batch in every worker.
//! - [`pipeline`]: every component in one process (`tickgraph all`, end-to-end
//!   tests).
//!
//! [`Api::build`] wires them: it starts the hub and builds the schema;
//! [`Api::router`] and [`serve`] put it on the network.

pub mod auth;
pub mod bench;
pub mod dlq;
pub mod history;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod page;
pub mod pipeline;
pub mod resume;
pub mod schema;
pub mod shared_json;
pub mod sse;
pub mod telemetry;
pub mod tick;
pub mod ws;

use std::sync::Arc;

use sqlx::PgPool;
use tickgraph_enrich::refdata::RefCache;
use tickgraph_ingest::StreamLayout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use http::serve;
pub use hub::{Filter, Hub, HubError};
pub use schema::ApiSchema;

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Where the enriched streams are; the hub reads every shard of it.
    pub layout: StreamLayout,
    /// Deepest selection nesting a request may have.
    pub max_depth: usize,
    /// Most fields a request may select, counted statically; a field returning a
    /// page or a list counts its selection once per item it may return.
    pub max_complexity: usize,
    /// Whether clients may introspect the schema (GraphiQL needs it).
    pub introspection: bool,
    /// Most tokens, nesting and selections (fragments spread) a document may
    /// have, checked before it is parsed.
    pub guard: schema::guard::GuardLimits,
    /// Events buffered per subscription before it is closed as too slow.
    pub subscriber_queue: usize,
    /// Bytes of events ([`tick::TickMeta::weight`]) buffered per subscription
    /// before it is closed as too slow.
    pub subscriber_queue_bytes: usize,
    /// WebSocket protocol timers and the per-connection outbox limit.
    pub ws: ws::WsConfig,
    /// How users authenticate: JWTs, or the explicit dev mode.
    pub auth: auth::Authenticator,
    /// The listener's connection cap and deadlines.
    pub conn: tickgraph_ingest::listener::ConnLimits,
    /// Connections and requests per user.
    pub users: auth::UserLimits,
}

impl ApiConfig {
    /// Every WebSocket and SSE stream holds one: room for 10,000 subscribers on
    /// connections of their own, with ingest's 4,096 under an open-file limit
    /// of 20,000.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 12_288;

    /// The defaults, on `layout`'s streams.
    pub fn new(layout: StreamLayout) -> Self {
        Self {
            layout,
            max_depth: 16,
            max_complexity: 10_000,
            introspection: true,
            guard: schema::guard::GuardLimits::default(),
            subscriber_queue: 50_000,
            subscriber_queue_bytes: 16 << 20,
            ws: ws::WsConfig::default(),
            auth: auth::Authenticator::Dev,
            users: auth::UserLimits::default(),
            conn: tickgraph_ingest::listener::ConnLimits::with_max_connections(
                Self::DEFAULT_MAX_CONNECTIONS,
            ),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self::new(StreamLayout::default())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot start the subscription hub on Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("dead letters: {0}")]
    DeadLetters(#[from] tickgraph_enrich::DeadLetterError),
}

/// A running API: the hub's readers are live, the schema is built.
#[derive(Clone)]
pub struct Api {
    schema: ApiSchema,
    hub: Hub,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    ws: ws::WsConfig,
    direct: ws::Direct,
    auth: auth::Authenticator,
    users: Arc<auth::Users>,
}

impl Api {
    /// Starts the hub (one reader per enriched shard) and builds the schema.
    /// Everything added to the enriched streams after this returns reaches
    /// matching subscriptions. The hub stops, and all subscriptions complete, when
    /// `shutdown` is cancelled.
    pub async fn build(
        cfg: ApiConfig,
        client: impl Into<tickgraph_ingest::redis_link::RedisTarget>,
        pool: PgPool,
        refs: RefCache,
        shutdown: CancellationToken,
    ) -> Result<Api, ApiError> {
        let tasks = TaskTracker::new();
        let client = client.into();
        let dead_letters = tickgraph_enrich::DeadLetters::new(&client, cfg.layout.clone())?;
        let hub = Hub::start(
            client,
            &cfg.layout,
            hub::QueueLimits {
                events: cfg.subscriber_queue,
                bytes: cfg.subscriber_queue_bytes,
            },
            shutdown.clone(),
            &tasks,
        )
        .await?;
        tasks.close();
        let limits = schema::Limits {
            max_depth: cfg.max_depth,
            max_complexity: cfg.max_complexity,
            introspection: cfg.introspection,
            guard: cfg.guard,
        };
        let users = auth::Users::new(cfg.users);
        let services = schema::Services {
            pool,
            refs,
            hub: hub.clone(),
            shards: cfg.layout.shards(),
            dead_letters,
            users: Arc::clone(&users),
        };
        // In dev mode every request runs as the dev user unless the edge says
        // otherwise; with JWTs a request the edge did not authenticate has no
        // principal and is refused.
        let default_principal = cfg.auth.is_dev().then(auth::Principal::dev);
        let schema = schema::build(limits, services.clone(), default_principal);
        let direct = ws::Direct {
            services: Arc::new(services),
            limits,
        };
        tracing::info!(
            shards = cfg.layout.shards(),
            prefix = cfg.layout.prefix(),
            subscriber_queue = cfg.subscriber_queue,
            subscriber_queue_bytes = cfg.subscriber_queue_bytes,
            dev_mode = cfg.auth.is_dev(),
            "api hub started"
        );
        Ok(Api {
            schema,
            hub,
            tasks,
            shutdown,
            ws: cfg.ws,
            direct,
            auth: cfg.auth,
            users,
        })
    }

    /// `/graphql`, `/graphql/ws`, `/graphql/stream`, `/graphiql` and `/` (a
    /// redirect to GraphiQL).
    pub fn router(&self) -> axum::Router {
        http::router(
            self.schema.clone(),
            self.ws.clone(),
            self.direct.clone(),
            self.shutdown.clone(),
            self.tasks.clone(),
            self.auth.clone(),
            Arc::clone(&self.users),
        )
    }

    pub fn schema(&self) -> &ApiSchema {
        &self.schema
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Resolves once the hub's tasks have finished after `shutdown`.
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }
}

/// The schema as SDL (what `schema.graphql` holds); needs no connections.
pub fn schema_sdl() -> String {
    schema::sdl()
}
