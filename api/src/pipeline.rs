//! Every component in one process: what `tickgraph all` runs, and what the
//! end-to-end tests start (on port 0), so tests never run a different app than
//! production does.

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use tickgraph_enrich::loader::{self, LoadConfig};
use tickgraph_enrich::refdata::RefCache;
use tickgraph_enrich::worker::{self, EnrichConfig};
use tickgraph_ingest::listener::{self, ConnMetrics};
use tickgraph_ingest::ops::{CheckLink, Ops, Thresholds};
use tickgraph_ingest::redis_link::RedisTarget;
use tickgraph_ingest::server::{Ingest, IngestConfig};
use tickgraph_ingest::stream::{ENRICH_GROUP, LOAD_GROUP};

use crate::{Api, ApiConfig};

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub ingest: IngestConfig,
    pub ingest_listen: SocketAddr,
    pub enrich: EnrichConfig,
    pub load: LoadConfig,
    pub api: ApiConfig,
    pub api_listen: SocketAddr,
    /// When `/readyz` says the workers are behind.
    pub ready: Thresholds,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("ingest: {0}")]
    Ingest(#[from] tickgraph_ingest::server::IngestError),
    #[error("serving: {0}")]
    Serve(#[from] std::io::Error),
    #[error("enrich: {0}")]
    Enrich(#[from] worker::EnrichError),
    #[error("load: {0}")]
    Load(#[from] loader::LoadError),
    #[error("api: {0}")]
    Api(#[from] crate::ApiError),
    #[error("demo feed: {0}")]
    Feed(#[from] tickgraph_ingest::feed::FeedError),
    #[error("a component panicked: {0}")]
    Panicked(String),
}

/// A running pipeline: where it listens, and its component tasks.
pub struct Pipeline {
    pub ingest_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// The process's one registry and its checks, served on both listeners.
    pub ops: Arc<Ops>,
    /// The api's fan-out hub (to see its subscriptions).
    pub hub: crate::Hub,
    tasks: JoinSet<Result<(), PipelineError>>,
    shutdown: CancellationToken,
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, PipelineError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| PipelineError::Bind { addr, source })
}

impl Pipeline {
    /// Binds both listeners and starts ingest, enrich, load and api. `refs` should
    /// already have its listener running (see [`RefCache::spawn_listener`]).
    pub async fn start(
        cfg: PipelineConfig,
        client: impl Into<RedisTarget>,
        pool: PgPool,
        refs: RefCache,
        shutdown: CancellationToken,
    ) -> Result<Self, PipelineError> {
        let client: RedisTarget = client.into();
        let ingest_listener = bind(cfg.ingest_listen).await?;
        let api_listener = bind(cfg.api_listen).await?;
        let ingest_addr = ingest_listener.local_addr()?;
        let api_addr = api_listener.local_addr()?;
        let (ingest_conn, api_conn) = (cfg.ingest.conn, cfg.api.conn);
        let (ingest_conns, api_conns) = (ConnMetrics::new("ingest"), ConnMetrics::new("api"));

        let ingest = Ingest::build(cfg.ingest, client.clone(), shutdown.clone()).await?;
        let api = Api::build(
            cfg.api,
            client.clone(),
            pool.clone(),
            refs.clone(),
            shutdown.clone(),
        )
        .await?;

        let mut ops = Ops::new();
        // One connection for every check of the process.
        let link = CheckLink::new(client.clone());
        ingest.register_ops(&mut ops, link.clone());
        crate::metrics::register_ops(
            &mut ops,
            &api,
            link.clone(),
            pool.clone(),
            cfg.ready.max_hub_behind,
        );
        cfg.enrich.metrics.register(ops.registry_mut());
        cfg.load.metrics.register(ops.registry_mut());
        ingest_conns.register(ops.registry_mut());
        api_conns.register(ops.registry_mut());
        let layout = &cfg.enrich.layout;
        let raw = layout.shard_ids().map(|s| (s, layout.raw(s))).collect();
        let enriched = layout
            .shard_ids()
            .map(|s| (s, layout.enriched(s)))
            .collect();
        for (name, group, streams) in [
            ("enrich", ENRICH_GROUP, raw),
            ("load", LOAD_GROUP, enriched),
        ] {
            let lag = tickgraph_enrich::metrics::GroupLag::new(
                name,
                link.clone(),
                group,
                streams,
                cfg.ready.max_lag,
            );
            lag.register(ops.registry_mut());
            ops.add_check(lag);
        }
        let ops = Arc::new(ops);

        let mut tasks = JoinSet::new();
        let s = shutdown.clone();
        let router = ingest.router().merge(ops.router());
        tasks.spawn(async move {
            listener::serve(ingest_listener, router, ingest_conn, ingest_conns, s).await?;
            ingest.finished().await;
            Ok(())
        });
        let hub = api.hub().clone();
        let s = shutdown.clone();
        let router = api.router().merge(ops.router());
        tasks.spawn(async move {
            crate::serve(api_listener, router, api_conn, api_conns, s).await?;
            drop(api);
            Ok(())
        });
        let (c, r, s) = (client.clone(), refs, shutdown.clone());
        tasks.spawn(async move { Ok(worker::run(cfg.enrich, c, r, s).await?) });
        let (c, s) = (client, shutdown.clone());
        tasks.spawn(async move { Ok(loader::run(cfg.load, c, pool, s).await?) });
        tracing::info!(%ingest_addr, %api_addr, "pipeline started");
        Ok(Self {
            ingest_addr,
            api_addr,
            ops,
            hub,
            tasks,
            shutdown,
        })
    }

    /// Adds a task (the demo feed, say) that is stopped and awaited with the rest.
    pub fn spawn<F>(&mut self, task: F)
    where
        F: std::future::Future<Output = Result<(), PipelineError>> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Runs until shutdown. One component failing stops the others: a half-running
    /// pipeline loses data silently, a stopped one is noticed.
    pub async fn wait(mut self) -> Result<(), PipelineError> {
        let mut result = Ok(());
        while let Some(done) = self.tasks.join_next().await {
            let outcome = done
                .map_err(|e| PipelineError::Panicked(e.to_string()))
                .and_then(|r| r);
            if let Err(e) = outcome {
                tracing::error!(error = %e, "component failed; stopping the pipeline");
                self.shutdown.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}
