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
//! These endpoints are unauthenticated, so a request must cost Redis nothing
//! but the checks' commands: the checks of a process share one connection
//! ([`CheckLink`]), made again only when it breaks, and requests that arrive
//! while a round of checks runs take that round's result instead of starting
//! their own ([`Ops::readiness`]).
//!
//! Layout: [`histogram`] is the per-batch histogram the hot paths use;
//! [`names`] holds the naming and label rules every metric follows, checked by
//! each component's tests.

pub mod histogram;
pub mod names;

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
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
    /// Held by the request running a round of checks; the others wait here.
    turn: tokio::sync::Mutex<()>,
    /// Rounds finished so far, and the last one's result.
    last: Mutex<(u64, Option<Readiness>)>,
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
            turn: tokio::sync::Mutex::new(()),
            last: Mutex::new((0, None)),
        }
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn add_check(&mut self, check: impl Check) {
        self.checks.push(Arc::new(check));
    }

    /// Every check's outcome, from a round that finished after this call
    /// began: callers that arrive while a round runs wait for it and share its
    /// result, so N scrapes at once cost one round of checks.
    pub async fn readiness(&self) -> Readiness {
        let arrived = self.last.lock().unwrap_or_else(PoisonError::into_inner).0;
        let _turn = self.turn.lock().await;
        {
            let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if let (done, Some(r)) = &*last {
                if *done > arrived {
                    return r.clone();
                }
            }
        }
        let r = self.run_checks().await;
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        *last = (last.0 + 1, Some(r.clone()));
        r
    }

    /// Runs every check concurrently, each within [`CHECK_TIMEOUT`].
    async fn run_checks(&self) -> Readiness {
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

/// Whether a Redis error means the connection itself is gone (and must be
/// made again), not that one command failed.
pub fn is_broken(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

/// The Redis connection a process's checks share. Made on first use, within
/// [`CHECK_TIMEOUT`], every reply bounded by it too; kept while it works, and
/// made again when it breaks, so that checks say whether Redis can be reached
/// now, and a scrape opens no connection. Cheap to clone: clones share it.
#[derive(Clone)]
pub struct CheckLink {
    inner: Arc<LinkInner>,
}

struct LinkInner {
    client: RedisTarget,
    /// The connection and its generation, so that a check that saw an older
    /// connection break does not drop a newer one.
    con: tokio::sync::Mutex<(u64, Option<RedisConn>)>,
}

impl std::fmt::Debug for CheckLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CheckLink")
            .field(&self.inner.client)
            .finish()
    }
}

impl<T: Into<RedisTarget>> From<T> for CheckLink {
    fn from(client: T) -> Self {
        Self {
            inner: Arc::new(LinkInner {
                client: client.into(),
                con: tokio::sync::Mutex::new((0, None)),
            }),
        }
    }
}

impl CheckLink {
    pub fn new(client: impl Into<RedisTarget>) -> Self {
        Self::from(client)
    }

    /// The connection, made now if there is none; whether it was there already,
    /// and its generation.
    async fn connection(&self) -> Result<(RedisConn, bool, u64), String> {
        let mut slot = self.inner.con.lock().await;
        if let (generation, Some(con)) = &*slot {
            return Ok((con.clone(), true, *generation));
        }
        // Made under the lock: checks that arrive meanwhile wait for this one
        // instead of each opening their own.
        let con = self
            .inner
            .client
            .connect(ConnOpts::bounded(CHECK_TIMEOUT))
            .await
            .map_err(|e| format!("redis unreachable: {e}"))?;
        slot.0 += 1;
        slot.1 = Some(con.clone());
        Ok((con, false, slot.0))
    }

    async fn forget(&self, generation: u64) {
        let mut slot = self.inner.con.lock().await;
        if slot.0 == generation {
            slot.1 = None;
        }
    }

    /// Runs `query` on the shared connection. When the connection turns out to
    /// be broken (Redis restarted since it was made, say), it is dropped and
    /// `query` runs once more on a new one: the answer is about Redis now, not
    /// about an old socket.
    pub async fn run<T, F, Fut>(&self, query: F) -> Result<T, String>
    where
        F: Fn(RedisConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (con, kept, generation) = self.connection().await?;
        match query(con).await {
            Ok(v) => return Ok(v),
            Err(e) if !is_broken(&e) => return Err(e.to_string()),
            Err(e) => {
                self.forget(generation).await;
                if !kept {
                    return Err(format!("redis unreachable: {e}"));
                }
            }
        }
        let (con, _, generation) = self.connection().await?;
        match query(con).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if is_broken(&e) {
                    self.forget(generation).await;
                }
                Err(format!("redis unreachable: {e}"))
            }
        }
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), String> {
        self.run(|mut con| async move { redis::cmd("PING").query_async::<String>(&mut con).await })
            .await
            .map(drop)
    }
}

/// Redis reachable: `failed` when not.
pub struct RedisPing {
    link: CheckLink,
}

impl RedisPing {
    pub fn new(link: impl Into<CheckLink>) -> Self {
        Self { link: link.into() }
    }
}

impl Check for RedisPing {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn run(&self) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            match self.link.ping().await {
                Ok(()) => Outcome::ok(),
                Err(e) if e.starts_with("redis unreachable") => Outcome::failed(e),
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

    /// Counts its runs, and holds each until told to finish.
    struct Gated {
        runs: Arc<std::sync::atomic::AtomicUsize>,
        open: Arc<tokio::sync::Notify>,
    }

    impl Check for Gated {
        fn name(&self) -> &'static str {
            "gated"
        }

        fn run(&self) -> BoxFuture<'_, Outcome> {
            self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let open = Arc::clone(&self.open);
            Box::pin(async move {
                open.notified().await;
                Outcome::ok()
            })
        }
    }

    /// Callers that arrive while a round runs share it: 50 at once, one run.
    #[tokio::test]
    async fn concurrent_callers_share_one_round_of_checks() {
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open = Arc::new(tokio::sync::Notify::new());
        let mut ops = Ops::new();
        ops.add_check(Gated {
            runs: Arc::clone(&runs),
            open: Arc::clone(&open),
        });
        let ops = Arc::new(ops);
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let ops = Arc::clone(&ops);
                tokio::spawn(async move { ops.readiness().await })
            })
            .collect();
        // On this current-thread runtime, each spawned caller runs until it
        // waits: the first in the check, the others for its round.
        tokio::task::yield_now().await;
        open.notify_one();
        for c in callers {
            assert!(c.await.expect("no panic").ready);
        }
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A caller after that round runs a new one.
        let later = {
            let ops = Arc::clone(&ops);
            tokio::spawn(async move { ops.readiness().await })
        };
        tokio::task::yield_now().await;
        open.notify_one();
        assert!(later.await.expect("no panic").ready);
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    async fn connections_received(url: &str) -> u64 {
        let client = redis::Client::open(url).expect("url");
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut con)
            .await
            .expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("total_connections_received")
    }

    /// Checks keep one connection, and make it again when Redis restarts: the
    /// first check after a restart already says Redis is there.
    #[tokio::test]
    async fn the_check_connection_is_kept_and_made_again_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut redis =
            crate::test_support::LocalRedis::start(dir.path(), None).expect("redis-server");
        let link = CheckLink::new(redis::Client::open(redis.url()).expect("url"));
        link.ping().await.expect("reachable");
        let before = connections_received(&redis.url()).await;
        for _ in 0..100 {
            RedisPing::new(link.clone()).run().await;
            link.ping().await.expect("reachable");
        }
        // One more: the connection that asked.
        assert_eq!(connections_received(&redis.url()).await, before + 1);

        redis.kill();
        let down = RedisPing::new(link.clone()).run().await;
        assert_eq!(down.status, Status::Failed, "{down:?}");
        redis.restart().expect("restart");
        let up = RedisPing::new(link.clone()).run().await;
        assert_eq!(up.status, Status::Ok, "{up:?}");
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
