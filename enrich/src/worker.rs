//! The enrich worker: consumer group [`ENRICH_GROUP`] on every raw stream. Each
//! batch is joined against the reference data and written back in ONE
//! `MULTI`/`EXEC`: the enriched entries, the dead letters and the `XACK` of the raw
//! entries. Either all of it happens or none of it, so a retried batch never
//! writes an event twice. A shard's raw, enriched and dead-letter keys share the
//! `{<shard>}` hash tag, so the transaction stays in one Redis Cluster slot.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tickgraph_ingest::event::now_nanos;
use tickgraph_ingest::stream::{DeadLetter, RawRecord, ENRICH_GROUP, RECORD_FIELD};
use tickgraph_ingest::{StreamLayout, Trim};
use tokio_util::sync::CancellationToken;

use crate::consumer::{self, BatchHandler, ConsumerConfig, ConsumerError, Entry};
use crate::refdata::RefCache;
use crate::transform::enrich;

#[derive(Debug, Clone)]
pub struct EnrichConfig {
    pub layout: StreamLayout,
    /// Consumer name in the group; keep it stable across restarts of one process.
    pub consumer: String,
    pub batch: usize,
    pub block: Duration,
    pub claim_idle: Duration,
    pub enriched_trim: Trim,
    pub dlq_trim: Trim,
}

impl EnrichConfig {
    /// Batches of 1000, 1 s block, claim after 30 s idle, enriched streams of about
    /// a million entries per shard, dead-letter streams of about 100k.
    pub fn new(layout: StreamLayout, consumer: impl Into<String>) -> Self {
        Self {
            layout,
            consumer: consumer.into(),
            batch: 1000,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            enriched_trim: Trim::MaxLen(1_000_000),
            dlq_trim: Trim::MaxLen(100_000),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("redis client: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
}

/// Enriches every shard's raw stream until `shutdown`, then returns once each
/// shard has written and acked its in-flight batch.
pub async fn run(
    cfg: EnrichConfig,
    client: redis::Client,
    refs: RefCache,
    shutdown: CancellationToken,
) -> Result<(), EnrichError> {
    let con = client.get_connection_manager_lazy(
        ConnectionManagerConfig::new().set_response_timeout(Some(WRITE_TIMEOUT)),
    )?;
    let streams = cfg
        .layout
        .shard_ids()
        .map(|s| (s, cfg.layout.raw(s)))
        .collect();
    let consumer_cfg = ConsumerConfig {
        group: ENRICH_GROUP.to_string(),
        consumer: cfg.consumer.clone(),
        batch: cfg.batch,
        block: cfg.block,
        claim_idle: cfg.claim_idle,
        claim_every: claim_every(cfg.claim_idle),
    };
    tracing::info!(consumer = %cfg.consumer, shards = cfg.layout.shards(), "enrich worker starting");
    let handler = Enricher { cfg, con, refs };
    consumer::run(client, consumer_cfg, streams, handler, shutdown).await?;
    Ok(())
}

/// A transaction of a few thousand XADDs takes milliseconds; the default 500 ms
/// would turn a busy Redis into needless retries.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Checking twice per idle period bounds how long a dead consumer's entries wait
/// to about 1.5 x `claim_idle`.
pub(crate) fn claim_every(claim_idle: Duration) -> Duration {
    (claim_idle / 2).max(Duration::from_millis(50))
}

struct Enricher {
    cfg: EnrichConfig,
    con: ConnectionManager,
    refs: RefCache,
}

impl BatchHandler for Enricher {
    type Error = redis::RedisError;

    async fn handle(
        &self,
        shard: u16,
        stream: &str,
        entries: Vec<Entry>,
    ) -> Result<(), Self::Error> {
        let enriched_key = self.cfg.layout.enriched(shard);
        let dlq_key = self.cfg.layout.dlq(shard);
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut enriched = 0usize;
        let mut rejected = 0usize;
        let mut first_reason = None;
        let mut reject = |pipe: &mut redis::Pipeline, letter: DeadLetter| {
            rejected += 1;
            first_reason.get_or_insert_with(|| letter.reason.clone());
            pipe.add_command(letter.xadd(&dlq_key, self.cfg.dlq_trim))
                .ignore();
        };
        {
            let now = now_nanos();
            // Once per batch: the listener's writes wait at most one batch.
            let refs = self.refs.read();
            for entry in &entries {
                let raw = match RawRecord::decode(&entry.record) {
                    Ok(raw) => raw,
                    Err(e) => {
                        let reason = format!("undecodable raw entry {}: {e}", entry.id);
                        reject(
                            &mut pipe,
                            DeadLetter::new("enrich", reason, entry.record.clone()),
                        );
                        continue;
                    }
                };
                let outcome = enrich(&raw, &refs, now)
                    .map_err(|e| e.to_string())
                    .and_then(|rec| rec.encode().map_err(|e| e.to_string()));
                match outcome {
                    Ok(bytes) => {
                        enriched += 1;
                        let field: &[u8] = &bytes;
                        pipe.add_command(
                            self.cfg
                                .enriched_trim
                                .xadd(&enriched_key, &[(RECORD_FIELD, field)]),
                        )
                        .ignore();
                    }
                    Err(reason) => {
                        // JSON, so that whoever reads the dead letters sees the event
                        // without a MessagePack decoder.
                        let payload =
                            serde_json::to_vec(&raw.event).unwrap_or_else(|_| entry.record.clone());
                        let mut letter = DeadLetter::new("enrich", reason, payload);
                        letter.event_id = Some(raw.event.id());
                        reject(&mut pipe, letter);
                    }
                }
            }
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(ENRICH_GROUP);
        for entry in &entries {
            ack.arg(&entry.id);
        }
        pipe.add_command(ack).ignore();
        let mut con = self.con.clone();
        pipe.query_async::<()>(&mut con).await?;
        if let Some(reason) = first_reason {
            tracing::warn!(enriched, rejected, first_reason = %reason, "batch enriched; events dead-lettered");
        } else {
            tracing::debug!(enriched, "batch enriched");
        }
        Ok(())
    }
}
