//! The operations endpoints every component serves, for Prometheus, load
//! balancers and Kubernetes probes:
//!
//! - `GET /metrics`: every metric of the process in the Prometheus text format
//!   (0.0.4), from one [`Registry`] per process (`tickgraph all` serves the same
//!   one on both its listeners);
//! - `GET /healthz`: the process is up: always `200 ok`;
//! - `GET /readyz`: every [`Check`] of the process, run concurrently, each within
//!   [`CHECK_TIMEOUT`]: `200` when none failed, else `503`; the JSON body lists
//!   each check with its status (`ok`, `degraded`, `failed`) and why.
//!
//! Components add their metrics to [`Ops::registry_mut`] and their checks with
//! [`Ops::add_check`]; checks also run before each scrape, so the gauges they
//! set (consumer lag, pending entries, how far the hub is behind) are read at
//! scrape time, never by a background task.
//!
//! Layout: [`histogram`] is the per-batch histogram the hot paths use;
//! [`names`] holds the naming and label rules every metric follows, checked by
//! each component's tests.

pub mod histogram;
pub mod names;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::listener::{ConnLimits, ConnMetrics};
use crate::redis_link::{ConnOpts, RedisConn, RedisTarget};
use axum::{Json, Router};
use futures_util::future::BoxFuture;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use histogram::{Batch, BatchHistogram, FRESHNESS_BUCKETS};

/// When a consuming component stops being ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Entries of a shard's stream not yet delivered to the enrich or load
    /// group (each holds up to 256 events).
    pub max_lag: u64,
    /// How long the oldest enriched entry the api's hub has not dispatched may
    /// have been in its stream.
    pub max_hub_behind: Duration,
}

impl Default for Thresholds {
    /// 10,000 entries (at the default batch of 100 entries, a hundred reads
    /// behind); 30 s.
    fn default() -> Self {
        Self {
            max_lag: 10_000,
            max_hub_behind: Duration::from_secs(30),
        }
    }
}

/// Every metric name starts with `tickgraph_`.
pub const PREFIX: &str = "tickgraph";

/// The longest a check may take; past it, it has failed. Also bounds how long a
/// scrape waits for the gauges that checks refresh.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// A label set of one label: `[("reason", "unknown_venue")]`. Values are
/// `'static`, so only a fixed set of them can exist.
pub type StaticLabel = [(&'static str, &'static str); 1];

/// A label set of one label whose value is made at run time from a bounded
/// set (a shard number).
pub type OwnedLabel = [(&'static str, String); 1];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Working, but not as it should: ingest while Redis is down (it spools).
    /// Does not make the process unready.
    Degraded,
    /// The process cannot do its job: `/readyz` answers 503.
    Failed,
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Status,
    /// Why, when not plainly ok (or what was measured).
    pub detail: Option<String>,
}

impl Outcome {
    pub fn ok() -> Self {
        Self {
            status: Status::Ok,
            detail: None,
        }
    }

    pub fn ok_with(detail: impl Into<String>) -> Self {
        Self {
            status: Status::Ok,
            detail: Some(detail.into()),
        }
    }

    pub fn degraded(detail: impl Into<String>) -> Self {
        Self {
            status: Status::Degraded,
            detail: Some(detail.into()),
        }
    }

    pub fn failed(detail: impl Into<String>) -> Self {
        Self {
            status: Status::Failed,
            detail: Some(detail.into()),
        }
    }
}

/// One readiness check: Redis reachable, Postgres reachable, a consumer group
/// not too far behind.
pub trait Check: Send + Sync + 'static {
    /// A short, stable name: `redis`, `postgres`, `enrich_lag`.
    fn name(&self) -> &'static str;
    fn run(&self) -> BoxFuture<'_, Outcome>;
}

/// One check's line in the `/readyz` body.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub name: &'static str,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The `/readyz` body.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<CheckReport>,
}

/// A process's metrics registry and readiness checks.
pub struct Ops {
    registry: Registry,
    checks: Vec<Arc<dyn Check>>,
}

impl Default for Ops {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.checks.iter().map(|c| c.name()).collect();
        f.debug_struct("Ops").field("checks", &names).finish()
    }
}

impl Ops {
    /// An empty registry with the `tickgraph` prefix, and no checks.
    pub fn new() -> Self {
        Self {
            registry: Registry::with_prefix(PREFIX),
            checks: Vec::new(),
        }
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn add_check(&mut self, check: impl Check) {
        self.checks.push(Arc::new(check));
    }

    /// Runs every check concurrently, each within [`CHECK_TIMEOUT`].
    pub async fn readiness(&self) -> Readiness {
        let runs = self.checks.iter().map(|c| async move {
            let outcome = match tokio::time::timeout(CHECK_TIMEOUT, c.run()).await {
                Ok(o) => o,
                Err(_) => Outcome::failed(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            CheckReport {
                name: c.name(),
                status: outcome.status,
                detail: outcome.detail,
            }
        });
        let checks = futures_util::future::join_all(runs).await;
        Readiness {
            ready: checks.iter().all(|c| c.status != Status::Failed),
            checks,
        }
    }

    /// The registry in the Prometheus text format, as it is now.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String only fails when a metric's own encoder does, which
        // ours never do; a partial answer is still better than none.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// `/metrics`, `/healthz` and `/readyz`, to merge into a component's router.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .with_state(Arc::clone(self))
    }
}

async fn metrics(axum::extract::State(ops): axum::extract::State<Arc<Ops>>) -> Response {
    // The checks set the gauges read at scrape time (lag, pending, behind).
    let _ = ops.readiness().await;
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        ops.encode(),
    )
        .into_response()
}

async fn readyz(axum::extract::State(ops): axum::extract::State<Arc<Ops>>) -> Response {
    let r = ops.readiness().await;
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

/// Serves only the operations endpoints: the listener of `tickgraph enrich` and
/// `tickgraph load`, which have no other HTTP edge.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ops: Arc<Ops>,
    limits: ConnLimits,
    metrics: ConnMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    crate::listener::serve(listener, ops.router(), limits, metrics, shutdown).await
}

/// A new connection for a check: connecting and every reply bounded by
/// `timeout`. New, so that it says whether Redis can be reached now, not
/// whether an old socket still looks open.
pub async fn check_connection(
    client: &RedisTarget,
    timeout: Duration,
) -> Result<RedisConn, String> {
    client
        .connect(ConnOpts::bounded(timeout))
        .await
        .map_err(|e| format!("redis unreachable: {e}"))
}

/// `PING` on a new connection, within `timeout`.
pub async fn ping_redis(client: &RedisTarget, timeout: Duration) -> Result<(), String> {
    let ping = async {
        let mut con = check_connection(client, timeout).await?;
        redis::cmd("PING")
            .query_async::<String>(&mut con)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(timeout, ping).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Redis reachable: `failed` when not.
pub struct RedisPing {
    client: RedisTarget,
}

impl RedisPing {
    pub fn new(client: impl Into<RedisTarget>) -> Self {
        Self {
            client: client.into(),
        }
    }
}

impl Check for RedisPing {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn run(&self) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            match ping_redis(&self.client, CHECK_TIMEOUT).await {
                Ok(()) => Outcome::ok(),
                Err(e) => Outcome::failed(format!("redis unreachable: {e}")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(&'static str, Outcome);

    impl Check for Fixed {
        fn name(&self) -> &'static str {
            self.0
        }

        fn run(&self) -> BoxFuture<'_, Outcome> {
            let o = self.1.clone();
            Box::pin(async move { o })
        }
    }

    struct Hangs;

    impl Check for Hangs {
        fn name(&self) -> &'static str {
            "hangs"
        }

        fn run(&self) -> BoxFuture<'_, Outcome> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn degraded_is_ready_failed_is_not() {
        let mut ops = Ops::new();
        ops.add_check(Fixed("a", Outcome::ok()));
        ops.add_check(Fixed("b", Outcome::degraded("spooling")));
        assert!(ops.readiness().await.ready);
        ops.add_check(Fixed("c", Outcome::failed("down")));
        let r = ops.readiness().await;
        assert!(!r.ready);
        let body = serde_json::to_value(&r).expect("json");
        assert_eq!(body["checks"][1]["status"], "degraded");
        assert_eq!(body["checks"][2]["detail"], "down");
    }

    /// Takes the check timeout (a second) of real time.
    #[tokio::test]
    async fn a_check_that_hangs_fails_after_the_timeout() {
        let mut ops = Ops::new();
        ops.add_check(Hangs);
        let r = ops.readiness().await;
        assert!(!r.ready);
        assert!(r.checks[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("no answer")));
    }

    #[tokio::test]
    async fn redis_on_a_closed_port_fails_the_check() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
        let o = RedisPing::new(client).run().await;
        assert_eq!(o.status, Status::Failed, "{o:?}");
    }
}
