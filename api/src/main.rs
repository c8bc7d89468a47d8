//! The `tickgraph` binary: one subcommand per component, and `all` for every
//! component in one process. Configuration comes from flags or the environment
//! variables named in `--help`; defaults point at 127.0.0.1.

// The flags' doc comments are their `--help` text, where `<host>` is a
// placeholder, not HTML.
#![allow(rustdoc::invalid_html_tags)]

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use tickgraph_api::auth::{Authenticator, JwtConfig, UserLimits};
use tickgraph_api::pipeline::{Pipeline, PipelineConfig};
use tickgraph_api::{Api, ApiConfig};
use tickgraph_enrich::demo::{feed_accounts, feed_instruments};
use tickgraph_enrich::loader::LoadConfig;
use tickgraph_enrich::refdata::RefCache;
use tickgraph_enrich::worker::EnrichConfig;
use tickgraph_ingest::feed::FeedConfig;
use tickgraph_ingest::listener::{self, ConnLimits, ConnMetrics};
use tickgraph_ingest::ops::{CheckLink, Ops, Thresholds};
use tickgraph_ingest::producers::Producers;
use tickgraph_ingest::redis_link::RedisTarget;
use tickgraph_ingest::server::{Ingest, IngestConfig};
use tickgraph_ingest::stream::{DeadLetter, DlqBounds};
use tickgraph_ingest::{StreamLayout, Trim};

/// mimalloc: the pipeline allocates and frees many small buffers per batch on
/// several threads, where glibc malloc spent a third of the CPU (perf, 30k events/s).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Parser)]
#[command(
    name = "tickgraph",
    version,
    about = "Market-data events to live GraphQL"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Redis holding the streams; with --redis-cluster, a comma-separated list
    /// of seed nodes of a Redis Cluster (any reachable one is enough).
    #[arg(
        long,
        env = "TG_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        global = true
    )]
    redis_url: String,
    /// Redis is a Redis Cluster: keys are routed by slot, and a failover is
    /// followed. See the README's "Redis Cluster" section.
    #[arg(long, env = "TG_REDIS_CLUSTER", global = true)]
    redis_cluster: bool,
    /// Replicas that must hold a write before ingest answers a producer, and
    /// what the loader read before it goes into history (Redis WAIT). Set it to
    /// 1 with replicated Redis (a cluster's replicas), so that a failover loses
    /// nothing acknowledged; 0 (no waiting) on a single Redis.
    #[arg(
        long,
        env = "TG_REDIS_WAIT_REPLICAS",
        default_value_t = 0,
        global = true
    )]
    redis_wait_replicas: u32,
    /// Postgres holding reference data and history.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://root@127.0.0.1:5432/tickgraph",
        global = true
    )]
    database_url: String,
    /// Number of stream shards. Every process of a deployment must agree.
    #[arg(long, env = "TG_SHARDS", default_value_t = 4, global = true)]
    shards: u16,
    /// Prefix of every stream key.
    #[arg(long, env = "TG_STREAM_PREFIX", default_value = "tg", global = true)]
    stream_prefix: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "TG_LOG_JSON", global = true)]
    log_json: bool,
    /// `/readyz` of enrich and load fails when a shard's stream has more
    /// entries than this not yet delivered to their group.
    #[arg(
        long,
        env = "TG_READY_MAX_LAG",
        default_value_t = 10_000,
        global = true
    )]
    ready_max_lag: u64,
    /// `/readyz` of the api fails when its hub has left an enriched entry
    /// undispatched for longer than this.
    #[arg(
        long,
        env = "TG_READY_MAX_BEHIND_SECS",
        default_value_t = 30,
        global = true
    )]
    ready_max_behind_secs: u64,
    /// Export spans over OTLP/HTTP to this OpenTelemetry collector (its base
    /// URL; `/v1/traces` is added). Off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,
    /// No authentication at all: anyone may send events (any source) and read
    /// every event as the `dev` user, an administrator. For demos and local
    /// development only; without it ingest needs `--producer-tokens` and the
    /// api a JWT key.
    #[arg(long, env = "TG_DEV_MODE", global = true)]
    dev_mode: bool,
    /// Milliseconds any one Postgres statement may run (history COPY, queries).
    #[arg(
        long,
        env = "TG_PG_STATEMENT_TIMEOUT_MS",
        default_value_t = 30_000,
        global = true
    )]
    pg_statement_timeout_ms: u64,
    /// Seconds every HTTP listener gives a client to send a request's headers,
    /// from the connection's opening or the request's first byte.
    #[arg(
        long,
        env = "TG_HTTP_HEADER_TIMEOUT_SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        global = true
    )]
    http_header_timeout_secs: u64,
    /// Seconds every HTTP listener gives a request's body to arrive in full,
    /// from the end of its headers (else 408).
    #[arg(
        long,
        env = "TG_HTTP_BODY_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        global = true
    )]
    http_body_timeout_secs: u64,
    /// Seconds a kept-alive HTTP connection may wait for its next request.
    #[arg(
        long,
        env = "TG_HTTP_IDLE_TIMEOUT_SECS",
        default_value_t = 75,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        global = true
    )]
    http_idle_timeout_secs: u64,
}

impl Common {
    /// A listener's bounds: the shared deadlines, and its own cap.
    fn conn_limits(&self, max_connections: usize) -> ConnLimits {
        ConnLimits {
            max_connections,
            header_timeout: Duration::from_secs(self.http_header_timeout_secs),
            body_timeout: Duration::from_secs(self.http_body_timeout_secs),
            idle_timeout: Duration::from_secs(self.http_idle_timeout_secs),
        }
    }

    fn thresholds(&self) -> Thresholds {
        Thresholds {
            max_lag: self.ready_max_lag,
            max_hub_behind: Duration::from_secs(self.ready_max_behind_secs),
        }
    }

    fn layout(&self) -> StreamLayout {
        StreamLayout::new(self.stream_prefix.clone(), self.shards)
    }

    fn redis(&self) -> anyhow::Result<RedisTarget> {
        RedisTarget::parse(&self.redis_url, self.redis_cluster).context("bad --redis-url")
    }

    async fn pool(&self) -> anyhow::Result<PgPool> {
        let statement_timeout = format!("{}ms", self.pg_statement_timeout_ms);
        let options = PgConnectOptions::from_str(&self.database_url)
            .context("bad --database-url")?
            .options([("statement_timeout", statement_timeout.as_str())]);
        PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .context("connecting to Postgres (run `tickgraph migrate` to create the database)")
    }
}

#[derive(Subcommand)]
enum Command {
    /// Accept event batches over HTTP and WebSocket and write them to the raw streams.
    Ingest(IngestArgs),
    /// Join raw events with reference data and write the enriched streams.
    Enrich(EnrichCmd),
    /// Write enriched events into the Postgres history tables.
    Load(LoadCmd),
    /// Serve GraphQL queries, subscriptions and GraphiQL.
    Api(ApiArgs),
    /// Run ingest, enrich, load and api in one process (and the demo feed if asked).
    All(Box<AllArgs>),
    /// Create the database if missing and apply migrations.
    Migrate,
    /// Load the demo reference data set (idempotent).
    DemoData,
    /// Send demo quotes and trades to an ingest endpoint.
    Feed(FeedArgs),
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Measure a running system: open-loop load, live subscribers, loss at every
    /// stage, latency percentiles, CPU and memory, Redis's XADD ceiling.
    Bench(tickgraph_api::bench::BenchArgs),
    /// List dead-lettered events with their reasons; replay those a reference-data
    /// fix can cure.
    Dlq(tickgraph_api::dlq::DlqArgs),
    /// Load-test the listeners: hold half-open connections against them while
    /// probing as a producer and a user, and report how each was answered.
    Flood(tickgraph_api::bench::flood::FloodArgs),
    /// Measure the memory one user's subscriptions hold in a running api:
    /// resident memory before, with every subscription open, and after they close.
    PinMemory(tickgraph_api::bench::pin::PinArgs),
}

#[derive(Args, Clone)]
struct IngestArgs {
    #[arg(
        long = "ingest-listen",
        env = "TG_INGEST_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    ingest_listen: SocketAddr,
    /// Events per batch; more gets 413.
    #[arg(long, env = "TG_MAX_BATCH_EVENTS", default_value_t = 10_000)]
    max_batch_events: usize,
    /// Bytes per request body or stream message; more gets 413.
    #[arg(long, env = "TG_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Dead-letter stream trimming by letters or age: maxlen:<letters>,
    /// maxage:<seconds> or none.
    #[arg(long, env = "TG_DLQ_TRIM", default_value = "maxlen:100000")]
    dlq_trim: Trim,
    /// Bytes of letters the ingest dead-letter stream keeps at most (field
    /// names and values; Redis's own overhead comes on top): the oldest go
    /// first. What one producer's invalid events can pin in Redis.
    #[arg(
        long,
        env = "TG_DLQ_MAX_BYTES",
        default_value_t = 64 << 20,
        value_parser = dlq_max_bytes
    )]
    dlq_max_bytes: u64,
    /// Milliseconds the stream writer waits after a batch for more before its
    /// round trip: fewer, larger stream entries for up to this much latency.
    #[arg(long, env = "TG_INGEST_LINGER_MS", default_value_t = 2)]
    ingest_linger_ms: u64,
    /// This ingest process's name in the streams' write markers: unique per
    /// process, stable across its restarts [default: <host>-ingest].
    #[arg(long, env = "TG_INGEST_ID")]
    ingest_id: Option<String>,
    /// Directory of the local spool that holds answered events while Redis
    /// cannot take them. Put it on a persistent volume; one process per spool.
    #[arg(long, env = "TG_SPOOL_DIR", default_value = ".tickgraph/spool")]
    spool_dir: std::path::PathBuf,
    /// Bytes the spool may hold; past it producers get 503.
    #[arg(long, env = "TG_SPOOL_MAX_BYTES", default_value_t = 1 << 30)]
    spool_max_bytes: u64,
    /// `always`: fdatasync each spooled round before answering (survives a
    /// machine crash); `never`: leave it to the OS (survives an ingest crash).
    #[arg(long, env = "TG_SPOOL_FSYNC", default_value = "always")]
    spool_fsync: tickgraph_ingest::spool::Fsync,
    /// Milliseconds a Redis round trip may take before its round is spooled.
    #[arg(long, env = "TG_INGEST_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    ingest_redis_timeout_ms: u64,
    /// JSON file of the producers: per producer the SHA-256 of its bearer
    /// token, the sources it may claim, and optionally its events per second.
    #[arg(long, env = "TG_PRODUCER_TOKENS")]
    producer_tokens: Option<std::path::PathBuf>,
    /// Connections ingest's listener holds at once; past it a new one takes
    /// the place of the longest-waiting connection without a request.
    #[arg(
        long,
        env = "TG_INGEST_MAX_CONNECTIONS",
        default_value_t = IngestConfig::DEFAULT_MAX_CONNECTIONS,
        value_parser = at_least_one()
    )]
    ingest_max_connections: usize,
}

#[derive(Args, Clone)]
struct EnrichArgs {
    /// Raw stream retention, applied behind the enrich group (never drops unread
    /// entries): maxlen:<entries>, maxage:<seconds> or none.
    #[arg(long, env = "TG_RAW_TRIM", default_value = "maxlen:10000")]
    raw_trim: Trim,
    /// Consumer name in the group; unique per process (default: host-pid).
    #[arg(long = "enrich-consumer", env = "TG_ENRICH_CONSUMER")]
    enrich_consumer: Option<String>,
    /// Raw entries per read; each holds up to 256 events.
    #[arg(long = "enrich-batch", env = "TG_ENRICH_BATCH", default_value_t = 100)]
    enrich_batch: usize,
    /// Pending entries idle this long are taken over from their (dead) consumer.
    #[arg(
        long = "claim-idle-secs",
        env = "TG_CLAIM_IDLE_SECS",
        default_value_t = 30
    )]
    enrich_claim_idle_secs: u64,
    /// Trimming of each shard's dead-letter stream by letters or age.
    #[arg(
        long = "enrich-dlq-trim",
        env = "TG_DLQ_TRIM",
        default_value = "maxlen:100000"
    )]
    enrich_dlq_trim: Trim,
    /// Bytes of letters each shard's dead-letter stream keeps at most; the
    /// oldest go first.
    #[arg(
        long = "enrich-dlq-max-bytes",
        env = "TG_ENRICH_DLQ_MAX_BYTES",
        default_value_t = 32 << 20,
        value_parser = dlq_max_bytes
    )]
    enrich_dlq_max_bytes: u64,
    /// Seconds an event's source + seq is remembered so that a producer's
    /// re-send is dropped before the enriched stream; 0 turns it off (a re-send
    /// then reaches the enriched stream and history again). Costs about one bit
    /// of Redis memory per event in the window, when seq is a per-source counter.
    #[arg(long, env = "TG_DEDUPE_WINDOW_SECS", default_value_t = 600)]
    dedupe_window_secs: u64,
}

/// `tickgraph enrich`: the worker, and its own listener for `/metrics`,
/// `/healthz`, `/readyz` (in `all` they are on the ingest and api listeners).
#[derive(Args, Clone)]
struct EnrichCmd {
    #[command(flatten)]
    enrich: EnrichArgs,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(
        long = "metrics-listen",
        env = "TG_ENRICH_METRICS_LISTEN",
        default_value = "127.0.0.1:8082"
    )]
    metrics_listen: SocketAddr,
    #[command(flatten)]
    metrics_conn: MetricsConnArgs,
}

/// `tickgraph load`: the loader, and its own listener for the operations
/// endpoints.
#[derive(Args, Clone)]
struct LoadCmd {
    #[command(flatten)]
    load: LoadArgs,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(
        long = "metrics-listen",
        env = "TG_LOAD_METRICS_LISTEN",
        default_value = "127.0.0.1:8083"
    )]
    metrics_listen: SocketAddr,
    #[command(flatten)]
    metrics_conn: MetricsConnArgs,
}

/// The cap of a worker's operations listener.
#[derive(Args, Clone)]
struct MetricsConnArgs {
    /// Connections the operations listener (`/metrics`, `/healthz`, `/readyz`)
    /// holds at once.
    #[arg(
        long,
        env = "TG_METRICS_MAX_CONNECTIONS",
        default_value_t = 256,
        value_parser = at_least_one()
    )]
    metrics_max_connections: usize,
}

fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Enriched stream retention, applied behind the load group; also bounds how
    /// far back subscribers can resume: maxlen:<entries>, maxage:<seconds> or none.
    #[arg(long, env = "TG_ENRICHED_TRIM", default_value = "maxlen:20000")]
    enriched_trim: Trim,
    #[arg(long = "load-consumer", env = "TG_LOAD_CONSUMER")]
    load_consumer: Option<String>,
    /// Enriched entries per read; each holds up to 256 events.
    #[arg(long = "load-batch", env = "TG_LOAD_BATCH", default_value_t = 100)]
    load_batch: usize,
    /// Pause after a short batch so that each transaction carries more rows.
    #[arg(
        long = "load-linger-ms",
        env = "TG_LOAD_LINGER_MS",
        default_value_t = 100
    )]
    load_linger_ms: u64,
    #[arg(
        long = "load-claim-idle-secs",
        env = "TG_CLAIM_IDLE_SECS",
        default_value_t = 30
    )]
    load_claim_idle_secs: u64,
}

#[derive(Args, Clone)]
struct ApiArgs {
    #[arg(
        long = "api-listen",
        env = "TG_API_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    api_listen: SocketAddr,
    /// Connections the api's listener holds at once, WebSockets and SSE
    /// streams included; past it a new one takes the place of the
    /// longest-waiting connection without a request.
    #[arg(
        long,
        env = "TG_API_MAX_CONNECTIONS",
        default_value_t = ApiConfig::DEFAULT_MAX_CONNECTIONS,
        value_parser = at_least_one()
    )]
    api_max_connections: usize,
    #[arg(long, env = "TG_MAX_DEPTH", default_value_t = 16)]
    max_depth: usize,
    #[arg(long, env = "TG_MAX_COMPLEXITY", default_value_t = 10_000)]
    max_complexity: usize,
    /// Turn off schema introspection (production).
    #[arg(long, env = "TG_NO_INTROSPECTION")]
    no_introspection: bool,
    /// Most lexical tokens a GraphQL document may hold (variables do not count).
    #[arg(long, env = "TG_MAX_TOKENS", default_value_t = 10_000)]
    max_tokens: usize,
    /// Most levels of brackets, and of selection sets and fragment spreads, in
    /// a GraphQL document.
    #[arg(long, env = "TG_MAX_NESTING", default_value_t = 32)]
    max_nesting: usize,
    /// Most selections a GraphQL document may hold with its fragments spread.
    #[arg(long, env = "TG_MAX_SELECTIONS", default_value_t = 10_000)]
    max_selections: usize,
    /// Most selections a document holding a subscription may hold with its
    /// fragments spread: the server keeps it as long as the subscription lives.
    #[arg(long, env = "TG_MAX_SUBSCRIPTION_SELECTIONS", default_value_t = 100)]
    max_subscription_selections: usize,
    /// Events buffered per subscription before it is cut off as too slow.
    #[arg(long, env = "TG_SUBSCRIBER_QUEUE", default_value_t = 50_000)]
    subscriber_queue: usize,
    /// Bytes of events (as held in memory, shared between subscribers)
    /// buffered per subscription before it is cut off as too slow.
    #[arg(long, env = "TG_SUBSCRIBER_QUEUE_BYTES", default_value_t = 16 << 20)]
    subscriber_queue_bytes: usize,
    /// Milliseconds a WebSocket client has to send `connection_init` (else 4408).
    #[arg(long, env = "TG_WS_INIT_TIMEOUT_MS", default_value_t = 3_000)]
    ws_init_timeout_ms: u64,
    /// Seconds between the server's keep-alive pings on a WebSocket (0: none).
    #[arg(long, env = "TG_WS_KEEPALIVE_SECS", default_value_t = 15)]
    ws_keepalive_secs: u64,
    /// Bytes one WebSocket connection may have waiting for its client before it
    /// is closed as a slow consumer (4008).
    #[arg(long, env = "TG_WS_MAX_QUEUED_BYTES", default_value_t = 16 << 20)]
    ws_max_queued_bytes: usize,
    /// Operations one WebSocket connection may run at once.
    #[arg(
        long,
        env = "TG_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        default_value_t = 100
    )]
    max_subscriptions_per_connection: usize,
    /// WebSocket and SSE connections one user may hold at once.
    #[arg(long, env = "TG_MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    max_connections_per_user: usize,
    /// Subscriptions one user may hold at once, over all its WebSocket and
    /// SSE connections.
    #[arg(
        long,
        env = "TG_MAX_SUBSCRIPTIONS_PER_USER",
        default_value_t = UserLimits::default().max_subscriptions
    )]
    max_subscriptions_per_user: usize,
    /// Values one user's live subscriptions may name together in their filter
    /// lists, as given: instruments, venues, asset classes, sides and
    /// conflateBy fields.
    #[arg(
        long,
        env = "TG_MAX_FILTER_VALUES_PER_USER",
        default_value_t = UserLimits::default().max_filter_values
    )]
    max_filter_values_per_user: usize,
    /// GraphQL operations (queries, and subscriptions started) per second per
    /// user, with a burst of as many; 0: no limit.
    #[arg(long, env = "TG_USER_REQUESTS_PER_SEC", default_value_t = 100.0)]
    user_requests_per_sec: f64,
    /// File holding the HS256 secret that signs user JWTs (at least 32 bytes).
    #[arg(long, env = "TG_JWT_HS256_SECRET_FILE")]
    jwt_hs256_secret_file: Option<std::path::PathBuf>,
    /// File holding the RS256 public key (PEM) that verifies user JWTs.
    #[arg(long, env = "TG_JWT_RS256_PUBLIC_KEY_FILE")]
    jwt_rs256_public_key_file: Option<std::path::PathBuf>,
    /// File holding a JWK Set of RS256 public keys, picked by the token's `kid`.
    #[arg(long, env = "TG_JWT_JWKS_FILE")]
    jwt_jwks_file: Option<std::path::PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "TG_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "TG_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    #[arg(long, env = "TG_JWT_LEEWAY_SECS", default_value_t = 30)]
    jwt_leeway_secs: u64,
}

#[derive(Args, Clone)]
struct AllArgs {
    #[command(flatten)]
    ingest: IngestArgs,
    #[command(flatten)]
    enrich: EnrichArgs,
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    api: ApiArgs,
    /// Also run the demo feed at this many events/s (0: off).
    #[arg(long, env = "TG_FEED_RATE", default_value_t = 0.0)]
    feed_rate: f64,
    /// The demo feed's producer token, when ingest requires tokens.
    #[arg(long, env = "TG_FEED_TOKEN", hide_env_values = true)]
    feed_token: Option<String>,
}

#[derive(Args, Clone)]
struct FeedArgs {
    #[arg(long, env = "TG_INGEST_URL", default_value = "http://127.0.0.1:8081")]
    ingest_url: String,
    /// Events per second.
    #[arg(long, env = "TG_FEED_RATE", default_value_t = 1000.0)]
    rate: f64,
    /// Events per request.
    #[arg(long, env = "TG_FEED_BATCH", default_value_t = 100)]
    batch: usize,
    /// Send MessagePack instead of JSON.
    #[arg(long, env = "TG_FEED_MSGPACK")]
    msgpack: bool,
    /// Stop after this many seconds (default: run until ctrl-c).
    #[arg(long, env = "TG_FEED_DURATION_SECS")]
    duration_secs: Option<u64>,
    /// Producer id the events carry.
    #[arg(long, env = "TG_FEED_SOURCE", default_value = "demo-feed")]
    source: String,
    /// The producer's bearer token, when ingest requires tokens.
    #[arg(long, env = "TG_FEED_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// A dead-letter byte bound: at least one letter, else every letter would be
/// deleted as the next arrives.
fn dlq_max_bytes(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let min = DeadLetter::MAX_BYTES as u64;
    if n < min {
        return Err(format!("{n} is less than one dead letter ({min} bytes)"));
    }
    Ok(n)
}

/// The default consumer name is the host's and the role's, stable across restarts,
/// so a restarted worker finishes its own pending entries at once instead of
/// waiting for them to be claimed. Two workers sharing a name stay correct (the
/// enrich commit and the loader are idempotent), but run them with distinct names.
fn consumer_name(given: &Option<String>, role: &str) -> String {
    given.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "local".into());
        format!("{host}-{role}")
    })
}

impl IngestArgs {
    fn config(&self, common: &Common) -> anyhow::Result<IngestConfig> {
        let mut c = IngestConfig::new(common.layout());
        c.producers = match (&self.producer_tokens, common.dev_mode) {
            (Some(_), true) => {
                anyhow::bail!("--dev-mode and --producer-tokens both given: choose one")
            }
            (Some(path), false) => Producers::load(path)?,
            (None, true) => {
                tracing::warn!("dev mode: ingest accepts events from anyone, for any source");
                Producers::Open
            }
            (None, false) => anyhow::bail!(
                "ingest needs --producer-tokens FILE (see the README's Security section), \
                 or --dev-mode to accept events from anyone"
            ),
        };
        c.max_batch_events = self.max_batch_events;
        c.max_body_bytes = self.max_body_bytes;
        c.conn = common.conn_limits(self.ingest_max_connections);
        let w = &mut c.writer;
        w.dlq = DlqBounds {
            trim: self.dlq_trim,
            max_bytes: self.dlq_max_bytes,
        };
        w.linger = Duration::from_millis(self.ingest_linger_ms);
        w.writer_id = consumer_name(&self.ingest_id, "ingest");
        w.redis_timeout = Duration::from_millis(self.ingest_redis_timeout_ms);
        w.wait_replicas = common.redis_wait_replicas;
        w.spool.dir = self.spool_dir.clone();
        w.spool.max_bytes = self.spool_max_bytes;
        w.spool.fsync = self.spool_fsync;
        Ok(c)
    }
}

impl EnrichArgs {
    fn config(&self, layout: StreamLayout) -> EnrichConfig {
        let mut c = EnrichConfig::new(layout, consumer_name(&self.enrich_consumer, "enrich"));
        c.batch = self.enrich_batch;
        c.claim_idle = Duration::from_secs(self.enrich_claim_idle_secs);
        c.raw_retention = self.raw_trim;
        c.dlq = DlqBounds {
            trim: self.enrich_dlq_trim,
            max_bytes: self.enrich_dlq_max_bytes,
        };
        c.dedupe_window = Duration::from_secs(self.dedupe_window_secs);
        c
    }
}

impl LoadArgs {
    fn config(&self, common: &Common) -> LoadConfig {
        let mut c = LoadConfig::new(common.layout(), consumer_name(&self.load_consumer, "load"));
        c.wait_replicas = common.redis_wait_replicas;
        c.batch = self.load_batch;
        c.claim_idle = Duration::from_secs(self.load_claim_idle_secs);
        c.enriched_retention = self.enriched_trim;
        c.linger = Duration::from_millis(self.load_linger_ms);
        c
    }
}

impl ApiArgs {
    fn config(&self, common: &Common) -> anyhow::Result<ApiConfig> {
        let mut c = ApiConfig::new(common.layout());
        c.conn = common.conn_limits(self.api_max_connections);
        let dev_mode = common.dev_mode;
        let jwt = JwtConfig {
            hs256_secret_file: self.jwt_hs256_secret_file.clone(),
            rs256_public_key_file: self.jwt_rs256_public_key_file.clone(),
            jwks_file: self.jwt_jwks_file.clone(),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway: Duration::from_secs(self.jwt_leeway_secs),
        };
        c.auth = match (jwt.is_configured(), dev_mode) {
            (true, true) => anyhow::bail!("--dev-mode and a JWT key both given: choose one"),
            (true, false) => Authenticator::jwt(&jwt)?,
            (false, true) => {
                tracing::warn!(
                    "dev mode: the api serves everyone as the `dev` user, unauthenticated"
                );
                Authenticator::Dev
            }
            (false, false) => anyhow::bail!(
                "the api needs a JWT key (--jwt-hs256-secret-file, --jwt-rs256-public-key-file \
                 or --jwt-jwks-file; see the README's Security section), or --dev-mode"
            ),
        };
        c.users = UserLimits {
            max_connections: self.max_connections_per_user,
            requests_per_sec: self.user_requests_per_sec,
            max_subscriptions: self.max_subscriptions_per_user,
            max_filter_values: self.max_filter_values_per_user,
        };
        c.ws.max_subscriptions = self.max_subscriptions_per_connection;
        c.max_depth = self.max_depth;
        c.max_complexity = self.max_complexity;
        c.introspection = !self.no_introspection;
        c.guard.max_tokens = self.max_tokens;
        c.guard.max_nesting = self.max_nesting;
        c.guard.max_selections = self.max_selections;
        c.guard.max_subscription_selections = self.max_subscription_selections;
        c.subscriber_queue = self.subscriber_queue;
        c.subscriber_queue_bytes = self.subscriber_queue_bytes;
        c.ws.init_timeout = Duration::from_millis(self.ws_init_timeout_ms);
        c.ws.keepalive =
            (self.ws_keepalive_secs > 0).then(|| Duration::from_secs(self.ws_keepalive_secs));
        c.ws.max_queued_bytes = self.ws_max_queued_bytes;
        Ok(c)
    }
}

/// Raises the open-file limit to the hard limit, then lowers the listeners'
/// caps if they would still not fit under it: a flood of connections must
/// meet the caps, never the process's limit.
fn fit_to_fd_limit(caps: &mut [(&str, &mut ConnLimits)]) {
    match listener::raise_fd_limit() {
        Ok(limit) => {
            tracing::debug!(limit, "open-file limit");
            listener::fit_to_fd_limit(limit, caps);
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// Cancels `token` on ctrl-c or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
        tracing::info!("shutdown requested; finishing in-flight batches");
        token.cancel();
    });
}

async fn run_ingest(
    common: &Common,
    args: &IngestArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut cfg = args.config(common)?;
    fit_to_fd_limit(&mut [("ingest", &mut cfg.conn)]);
    let conn = cfg.conn;
    let ingest = Ingest::build(cfg, common.redis()?, shutdown.clone())
        .await
        .context("starting ingest")?;
    let mut ops = Ops::new();
    ingest.register_ops(&mut ops, CheckLink::new(common.redis()?));
    let conns = ConnMetrics::new("ingest");
    conns.register(ops.registry_mut());
    let router = ingest.router().merge(Arc::new(ops).router());
    let listener = tokio::net::TcpListener::bind(args.ingest_listen)
        .await
        .with_context(|| format!("binding ingest to {}", args.ingest_listen))?;
    tracing::info!(addr = %args.ingest_listen, "ingest listening: POST /v1/events, GET /v1/stream, /metrics, /healthz, /readyz");
    listener::serve(listener, router, conn, conns, shutdown).await?;
    ingest.finished().await;
    Ok(())
}

async fn run_api(
    common: &Common,
    args: &ApiArgs,
    mut cfg: ApiConfig,
    pool: PgPool,
    refs: RefCache,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    fit_to_fd_limit(&mut [("api", &mut cfg.conn)]);
    let conn = cfg.conn;
    let api = Api::build(cfg, common.redis()?, pool.clone(), refs, shutdown.clone())
        .await
        .context("starting api")?;
    let mut ops = Ops::new();
    tickgraph_api::metrics::register_ops(
        &mut ops,
        &api,
        CheckLink::new(common.redis()?),
        pool,
        common.thresholds().max_hub_behind,
    );
    let conns = ConnMetrics::new("api");
    conns.register(ops.registry_mut());
    let router = api.router().merge(Arc::new(ops).router());
    let listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("binding api to {}", args.api_listen))?;
    tracing::info!(
        graphiql = %format!("http://{}/graphiql", args.api_listen),
        "api listening: POST /graphql, WebSocket /graphql/ws"
    );
    tickgraph_api::serve(listener, router, conn, conns, shutdown).await?;
    Ok(())
}

/// Serves `ops` on `addr` until `stop`; binds before returning, so a port in use
/// stops the process at start.
async fn serve_ops(
    common: &Common,
    component: &'static str,
    addr: SocketAddr,
    conn: &MetricsConnArgs,
    mut ops: Ops,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut limits = common.conn_limits(conn.metrics_max_connections);
    fit_to_fd_limit(&mut [(component, &mut limits)]);
    let conns = ConnMetrics::new(component);
    conns.register(ops.registry_mut());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener to {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    Ok(tokio::spawn(async move {
        if let Err(e) =
            tickgraph_ingest::ops::serve(listener, Arc::new(ops), limits, conns, stop).await
        {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    }))
}

/// A worker's operations endpoints: its group's lag, Redis, Postgres.
fn worker_ops(
    common: &Common,
    name: &'static str,
    group: &str,
    streams: Vec<(u16, String)>,
    pool: &PgPool,
) -> anyhow::Result<Ops> {
    let mut ops = Ops::new();
    // One connection for every check of the process.
    let link = CheckLink::new(common.redis()?);
    let lag = tickgraph_enrich::metrics::GroupLag::new(
        name,
        link.clone(),
        group,
        streams,
        common.thresholds().max_lag,
    );
    lag.register(ops.registry_mut());
    ops.add_check(lag);
    ops.add_check(tickgraph_ingest::ops::RedisPing::new(link));
    ops.add_check(tickgraph_enrich::metrics::PostgresPing::new(pool.clone()));
    Ok(ops)
}

/// Reference data for the workers, kept fresh until shutdown.
async fn refdata(pool: &PgPool, shutdown: &CancellationToken) -> anyhow::Result<RefCache> {
    let refs = RefCache::load(pool)
        .await
        .context("loading reference data")?;
    refs.spawn_listener(pool.clone(), shutdown.clone());
    Ok(refs)
}

async fn run_feed_against(
    cfg: FeedConfig,
    refs: &RefCache,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let instruments = feed_instruments(&refs.read());
    tracing::info!(instruments = instruments.len(), rate = cfg.rate, url = %cfg.ingest_url, "demo feed starting");
    let stats = tickgraph_ingest::feed::run(cfg, instruments, shutdown).await?;
    tracing::info!(?stats, "demo feed stopped");
    Ok(())
}

async fn migrate(url: &str) -> anyhow::Result<()> {
    if !sqlx::Postgres::database_exists(url).await? {
        sqlx::Postgres::create_database(url).await?;
        tracing::info!("created database");
    }
    let pool = PgPoolOptions::new().max_connections(2).connect(url).await?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Held to the end of main: dropping it sends the spans still queued.
    let _telemetry =
        tickgraph_api::telemetry::init(cli.common.log_json, cli.common.otlp_endpoint.as_deref())?;
    let common = cli.common;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());

    match cli.command {
        Command::Schema => {
            print!("{}", tickgraph_api::schema_sdl());
        }
        Command::Migrate => migrate(&common.database_url).await?,
        Command::DemoData => {
            let pool = common.pool().await?;
            let summary = tickgraph_enrich::demo::load_demo_data(&pool).await?;
            tracing::info!(?summary, "demo reference data loaded");
        }
        Command::Ingest(args) => run_ingest(&common, &args, shutdown).await?,
        Command::Enrich(cmd) => {
            let pool = common.pool().await?;
            let layout = common.layout();
            let cfg = cmd.enrich.config(layout.clone());
            let streams = layout.shard_ids().map(|s| (s, layout.raw(s))).collect();
            let mut ops = worker_ops(
                &common,
                "enrich",
                tickgraph_ingest::stream::ENRICH_GROUP,
                streams,
                &pool,
            )?;
            cfg.metrics.register(ops.registry_mut());
            let stop = shutdown.child_token();
            let server = serve_ops(
                &common,
                "enrich",
                cmd.metrics_listen,
                &cmd.metrics_conn,
                ops,
                stop.clone(),
            )
            .await?;
            let refs = refdata(&pool, &shutdown).await?;
            let result = tickgraph_enrich::worker::run(cfg, common.redis()?, refs, shutdown).await;
            stop.cancel();
            let _ = server.await;
            result?;
        }
        Command::Load(cmd) => {
            let pool = common.pool().await?;
            let layout = common.layout();
            let cfg = cmd.load.config(&common);
            let streams = layout
                .shard_ids()
                .map(|s| (s, layout.enriched(s)))
                .collect();
            let mut ops = worker_ops(
                &common,
                "load",
                tickgraph_ingest::stream::LOAD_GROUP,
                streams,
                &pool,
            )?;
            cfg.metrics.register(ops.registry_mut());
            let stop = shutdown.child_token();
            let server = serve_ops(
                &common,
                "load",
                cmd.metrics_listen,
                &cmd.metrics_conn,
                ops,
                stop.clone(),
            )
            .await?;
            let result = tickgraph_enrich::loader::run(cfg, common.redis()?, pool, shutdown).await;
            stop.cancel();
            let _ = server.await;
            result?;
        }
        Command::Api(args) => {
            // Configuration errors first, before any connection is tried.
            let cfg = args.config(&common)?;
            let pool = common.pool().await?;
            let refs = refdata(&pool, &shutdown).await?;
            run_api(&common, &args, cfg, pool, refs, shutdown).await?;
        }
        Command::Feed(args) => {
            let pool = common.pool().await?;
            let refs = RefCache::load(&pool).await?;
            let mut cfg = FeedConfig::new(args.ingest_url);
            cfg.rate = args.rate;
            cfg.batch = args.batch;
            cfg.msgpack = args.msgpack;
            cfg.source = args.source;
            cfg.token = args.token;
            cfg.duration = args.duration_secs.map(Duration::from_secs);
            cfg.accounts = feed_accounts(&refs.read());
            run_feed_against(cfg, &refs, shutdown).await?;
        }
        Command::All(args) => run_all(&common, *args, shutdown).await?,
        Command::Bench(args) => {
            // Its stage counters read every shard in one XREAD, and its ceiling
            // is one server's: it measures this machine's single Redis.
            anyhow::ensure!(
                !common.redis_cluster,
                "the bench runs against a single Redis, not --redis-cluster"
            );
            let target = tickgraph_api::bench::Target {
                redis_url: common.redis_url.clone(),
                database_url: common.database_url.clone(),
                layout: common.layout(),
            };
            tickgraph_api::bench::run(target, args, shutdown).await?;
        }
        Command::Flood(args) => tickgraph_api::bench::flood::run(args, shutdown).await?,
        Command::PinMemory(args) => tickgraph_api::bench::pin::run(args, shutdown).await?,
        Command::Dlq(args) => {
            let dead = tickgraph_enrich::DeadLetters::new(&common.redis()?, common.layout())?;
            let counts = tickgraph_api::dlq::run(&args, &dead, &mut std::io::stdout()).await?;
            anyhow::ensure!(
                counts.failed == 0,
                "{} dead letters failed to replay (Redis errors; they are unchanged, run again)",
                counts.failed
            );
        }
    }
    Ok(())
}

async fn run_all(
    common: &Common,
    args: AllArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let layout = common.layout();
    let mut cfg = PipelineConfig {
        ingest: args.ingest.config(common)?,
        ingest_listen: args.ingest.ingest_listen,
        enrich: args.enrich.config(layout.clone()),
        load: args.load.config(common),
        api: args.api.config(common)?,
        api_listen: args.api.api_listen,
        ready: common.thresholds(),
    };
    fit_to_fd_limit(&mut [("ingest", &mut cfg.ingest.conn), ("api", &mut cfg.api.conn)]);
    let pool = common.pool().await?;
    let refs = refdata(&pool, &shutdown).await?;
    let mut pipeline = Pipeline::start(cfg, common.redis()?, pool, refs.clone(), shutdown.clone())
        .await
        .context("starting the pipeline")?;
    tracing::info!(
        graphiql = %format!("http://{}/graphiql", pipeline.api_addr),
        ingest = %format!("http://{}/v1/events", pipeline.ingest_addr),
        "tickgraph is running"
    );
    if args.feed_rate > 0.0 {
        let mut cfg = FeedConfig::new(format!("http://{}", pipeline.ingest_addr));
        cfg.rate = args.feed_rate;
        cfg.token = args.feed_token.clone();
        cfg.batch = ((args.feed_rate / 20.0) as usize).clamp(1, 1000);
        cfg.accounts = feed_accounts(&refs.read());
        let instruments = feed_instruments(&refs.read());
        pipeline.spawn(async move {
            let stats = tickgraph_ingest::feed::run(cfg, instruments, shutdown).await?;
            tracing::info!(?stats, "demo feed stopped");
            Ok(())
        });
    }
    pipeline.wait().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    #[test]
    fn the_command_line_is_well_formed() {
        // Catches argument ids that collide once `all` flattens every component's.
        Cli::command().debug_assert();
    }

    #[test]
    fn a_dead_letter_byte_bound_holds_at_least_one_letter() {
        for flag in ["--dlq-max-bytes", "--enrich-dlq-max-bytes"] {
            let cmd = if flag == "--dlq-max-bytes" {
                "ingest"
            } else {
                "enrich"
            };
            assert!(Cli::try_parse_from(["tickgraph", cmd, flag, "100"]).is_err());
            assert!(Cli::try_parse_from(["tickgraph", cmd, flag, "1048576"]).is_ok());
        }
    }

    #[test]
    fn all_takes_every_components_flags() {
        let cli = Cli::try_parse_from([
            "tickgraph",
            "all",
            "--ingest-listen",
            "127.0.0.1:9001",
            "--api-listen",
            "127.0.0.1:9002",
            "--enrich-batch",
            "7",
            "--load-batch",
            "9",
            "--raw-trim",
            "maxage:60",
            "--feed-rate",
            "10",
        ])
        .expect("parses");
        let Command::All(a) = cli.command else {
            panic!("not `all`")
        };
        assert_eq!(a.ingest.ingest_listen.port(), 9001);
        assert_eq!(a.api.api_listen.port(), 9002);
        assert_eq!((a.enrich.enrich_batch, a.load.load_batch), (7, 9));
        assert_eq!(a.enrich.raw_trim.to_string(), "maxage:60");
        assert_eq!(a.feed_rate, 10.0);
    }
}
