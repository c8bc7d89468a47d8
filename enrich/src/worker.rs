//! The enrich worker: consumer group [`ENRICH_GROUP`] on every raw stream. Each
//! batch is joined against the reference data and committed by ONE Lua script that
//! runs atomically in Redis: for every raw entry it XACKs the entry and, only if
//! that XACK took it off the group's pending list, XADDs its outcome (the enriched
//! entry or the dead letter). A batch retried after a crash, or done twice because
//! a slow consumer's entries were claimed by another meanwhile, is therefore
//! written once. A shard's raw, enriched and dead-letter keys share the
//! `{<shard>}` hash tag, so the script stays in one Redis Cluster slot.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tickgraph_ingest::event::now_nanos;
use tickgraph_ingest::stream::{decode_entry, DeadLetter, RawRecord, ENRICH_GROUP, RECORD_FIELD};
use tickgraph_ingest::{StreamLayout, Trim};
use tokio_util::sync::CancellationToken;

use crate::consumer::{self, BatchHandler, ConsumerConfig, ConsumerError, Entry};
use crate::record::EnrichedRecord;
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
    /// Retention of the raw streams, applied behind the group (see [`crate::retention`]).
    pub raw_retention: Trim,
    pub dlq_trim: Trim,
}

impl EnrichConfig {
    /// Batches of 100 entries (each up to 256 events), 1 s block, claim after 30 s
    /// idle, raw streams of about 10,000 entries per shard behind the group,
    /// dead-letter streams of about 100k.
    pub fn new(layout: StreamLayout, consumer: impl Into<String>) -> Self {
        Self {
            layout,
            consumer: consumer.into(),
            batch: 100,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            raw_retention: Trim::MaxLen(10_000),
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
    let handler = Enricher::new(cfg.clone(), &client, refs)?;
    let streams = cfg
        .layout
        .shard_ids()
        .map(|s| (s, cfg.layout.raw(s)))
        .collect();
    let consumer_cfg = ConsumerConfig::new(
        ENRICH_GROUP,
        &cfg.consumer,
        cfg.batch,
        cfg.block,
        cfg.claim_idle,
        cfg.raw_retention,
    );
    tracing::info!(consumer = %cfg.consumer, shards = cfg.layout.shards(), "enrich worker starting");
    let result = consumer::run(client, consumer_cfg, streams, handler, shutdown).await;
    result?;
    Ok(())
}

/// The per-batch work of the enrich worker: join, then commit (see [`COMMIT_LUA`]).
pub struct Enricher {
    cfg: EnrichConfig,
    con: ConnectionManager,
    refs: RefCache,
}

impl Enricher {
    pub fn new(
        cfg: EnrichConfig,
        client: &redis::Client,
        refs: RefCache,
    ) -> Result<Self, EnrichError> {
        let con = consumer::write_connection(client)?;
        Ok(Self { cfg, con, refs })
    }
}

/// KEYS: raw, enriched, dead-letter stream. ARGV: group, the enriched trim (count
/// then arguments), the dead-letter trim (likewise), then per raw entry: its id,
/// the number of outcomes, and per outcome `e` (enriched entry) or `d` (dead
/// letter), the number of field/value arguments, and those. Returns how many raw
/// entries this call acknowledged (and so wrote the outcomes of).
const COMMIT_LUA: &str = r#"
local group = ARGV[1]
local i = 2
local function trim()
  local n = tonumber(ARGV[i])
  local t = {}
  for j = 1, n do t[j] = ARGV[i + j] end
  i = i + n + 1
  return t
end
local etrim = trim()
local dtrim = trim()
local acked = 0
while i <= #ARGV do
  local id, outcomes = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local mine = redis.call('XACK', KEYS[1], group, id) == 1
  if mine then acked = acked + 1 end
  for _ = 1, outcomes do
    local kind, n = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    if mine then
      local args = { KEYS[3] }
      local t = dtrim
      if kind == 'e' then args[1] = KEYS[2]; t = etrim end
      for _, a in ipairs(t) do args[#args + 1] = a end
      args[#args + 1] = '*'
      for j = 0, n - 1 do args[#args + 1] = ARGV[i + j] end
      redis.call('XADD', unpack(args))
    end
    i = i + n
  end
end
return acked
"#;

static COMMIT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(COMMIT_LUA));

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
        let mut commit = COMMIT.prepare_invoke();
        commit.key(stream).key(&enriched_key).key(&dlq_key);
        commit.arg(ENRICH_GROUP);
        // Enriched streams are trimmed by the loader, behind its group.
        for trim in [Vec::new(), self.cfg.dlq_trim.args()] {
            commit.arg(trim.len());
            for a in trim {
                commit.arg(a);
            }
        }
        let mut enriched = 0usize;
        let mut rejected = 0usize;
        let mut first_reason = None;
        {
            let now = now_nanos();
            // Once per batch: the listener's writes wait at most one batch.
            let refs = self.refs.read();
            for entry in &entries {
                let mut records = Vec::new();
                let mut letters = Vec::new();
                match decode_entry::<RawRecord>(&entry.record) {
                    Err(e) => {
                        let reason = format!("undecodable raw entry {}: {e}", entry.id);
                        letters.push(DeadLetter::new("enrich", reason, entry.record.clone()));
                    }
                    Ok(raws) => {
                        records.reserve(raws.len());
                        for raw in &raws {
                            match enrich(raw, &refs, now) {
                                Ok(rec) => records.push(rec),
                                Err(e) => {
                                    // JSON, so that whoever reads the dead letters sees
                                    // the event without a MessagePack decoder.
                                    let payload =
                                        serde_json::to_vec(&raw.event).unwrap_or_default();
                                    let mut letter =
                                        DeadLetter::new("enrich", e.to_string(), payload);
                                    letter.event_id = Some(raw.event.id());
                                    letters.push(letter);
                                }
                            }
                        }
                    }
                }
                let batch = if records.is_empty() {
                    None
                } else {
                    match EnrichedRecord::encode_batch(&records) {
                        Ok(bytes) => Some(bytes),
                        Err(e) => {
                            // Cannot happen for records enrich built; kept loud, not lost.
                            let reason = format!("unencodable enriched batch: {e}");
                            letters.push(DeadLetter::new("enrich", reason, entry.record.clone()));
                            records.clear();
                            None
                        }
                    }
                };
                enriched += records.len();
                rejected += letters.len();
                if let Some(first) = letters.first() {
                    first_reason.get_or_insert_with(|| first.reason.clone());
                }
                commit
                    .arg(&entry.id)
                    .arg(usize::from(batch.is_some()) + letters.len());
                if let Some(bytes) = batch {
                    commit.arg("e").arg(2).arg(RECORD_FIELD).arg(bytes);
                }
                for letter in letters {
                    let fields = letter.fields();
                    commit.arg("d").arg(fields.len() * 2);
                    for (k, v) in fields {
                        commit.arg(k).arg(v);
                    }
                }
            }
        }
        let mut con = self.con.clone();
        let acked: usize = commit.invoke_async(&mut con).await?;
        if acked < entries.len() {
            tracing::warn!(
                skipped = entries.len() - acked,
                "entries already acknowledged by another consumer; their outcomes were not written again"
            );
        }
        if let Some(reason) = first_reason {
            tracing::warn!(enriched, rejected, first_reason = %reason, "batch enriched; events dead-lettered");
        } else {
            tracing::debug!(enriched, "batch enriched");
        }
        Ok(())
    }
}
