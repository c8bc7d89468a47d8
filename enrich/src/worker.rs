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
    /// How long an event's `source` + `seq` is remembered, so that a producer's
    /// re-send within it is dropped before the enriched stream. Zero turns this
    /// off (the history still stores each event once).
    pub dedupe_window: Duration,
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
            dedupe_window: Duration::from_secs(600),
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
/// then arguments), the dead-letter trim (likewise), the lifetime in seconds of
/// the dedupe bitmaps, then per raw entry: its id, the number of outcomes, and
/// per outcome one of
/// - `e`, the number of field/value arguments, and those: an enriched entry;
/// - `d`, likewise: a dead letter;
/// - `E`, the number of events, then per event its dedupe bitmap key, its bit in
///   it and its encoded record: an enriched entry of the events whose bit was
///   not yet set (a producer's re-send of `source` + `seq` is dropped here).
///
/// The bitmaps share the shard's hash tag. Returns how many raw entries this call
/// acknowledged (and so wrote the outcomes of), and how many events it dropped
/// as re-sent.
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
local seen_ttl = ARGV[i]
i = i + 1
local function array_header(n)
  if n < 16 then return string.char(0x90 + n) end
  if n < 65536 then return string.char(0xdc, math.floor(n / 256), n % 256) end
  return string.char(0xdd, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256)
end
local function xadd(key, t, fields)
  local args = { key }
  for _, a in ipairs(t) do args[#args + 1] = a end
  args[#args + 1] = '*'
  for _, f in ipairs(fields) do args[#args + 1] = f end
  redis.call('XADD', unpack(args))
end
local acked, resent = 0, 0
local touched = {}
while i <= #ARGV do
  local id, outcomes = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local mine = redis.call('XACK', KEYS[1], group, id) == 1
  if mine then acked = acked + 1 end
  for _ = 1, outcomes do
    local kind, n = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    if kind == 'E' then
      if mine then
        local parts = {}
        for j = i, i + 3 * (n - 1), 3 do
          local key = ARGV[j]
          if redis.call('SETBIT', key, ARGV[j + 1], 1) == 0 then
            parts[#parts + 1] = ARGV[j + 2]
          else
            resent = resent + 1
          end
          if not touched[key] then
            touched[key] = true
            redis.call('EXPIRE', key, seen_ttl)
          end
        end
        if #parts > 0 then
          -- 'e' is RECORD_FIELD.
          xadd(KEYS[2], etrim, { 'e', array_header(#parts) .. table.concat(parts) })
        end
      end
      i = i + 3 * n
    else
      if mine then
        local fields = {}
        for j = 0, n - 1 do fields[#fields + 1] = ARGV[i + j] end
        if kind == 'e' then xadd(KEYS[2], etrim, fields) else xadd(KEYS[3], dtrim, fields) end
      end
      i = i + n
    end
  end
end
return { acked, resent }
"#;

/// An entry's enriched outcome, as the commit script takes it.
enum Outcome {
    /// The whole entry, events not checked for re-sends.
    Entry(Vec<u8>),
    /// Each event with its dedupe bit and its encoded record.
    Deduped(Vec<((String, u64), Vec<u8>)>),
}

/// Events per dedupe bitmap: 1 KiB of Redis memory holds 8,192 consecutive seqs
/// of one source on one shard.
const SEEN_BLOCK_BITS: u64 = 8192;

/// The bitmap and bit that remember `record`'s `source` + `seq`. A re-sent
/// event has the same instrument, so the same shard, so the same bitmap.
fn seen_bit(layout: &StreamLayout, shard: u16, record: &EnrichedRecord) -> (String, u64) {
    let h = record.event.header();
    (
        layout.seen(shard, h.source.as_str(), h.seq / SEEN_BLOCK_BITS),
        h.seq % SEEN_BLOCK_BITS,
    )
}

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
        let dedupe = !self.cfg.dedupe_window.is_zero();
        commit.arg(self.cfg.dedupe_window.as_secs().max(1));
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
                let outcome = if records.is_empty() {
                    Ok(None)
                } else if dedupe {
                    records
                        .iter()
                        .map(|r| {
                            r.encode()
                                .map(|bytes| (seen_bit(&self.cfg.layout, shard, r), bytes))
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map(|events| Some(Outcome::Deduped(events)))
                } else {
                    EnrichedRecord::encode_batch(&records).map(|b| Some(Outcome::Entry(b)))
                };
                let outcome = match outcome {
                    Ok(o) => o,
                    Err(e) => {
                        // Cannot happen for records enrich built; kept loud, not lost.
                        let reason = format!("unencodable enriched batch: {e}");
                        letters.push(DeadLetter::new("enrich", reason, entry.record.clone()));
                        records.clear();
                        None
                    }
                };
                enriched += records.len();
                rejected += letters.len();
                if let Some(first) = letters.first() {
                    first_reason.get_or_insert_with(|| first.reason.clone());
                }
                commit
                    .arg(&entry.id)
                    .arg(usize::from(outcome.is_some()) + letters.len());
                match outcome {
                    Some(Outcome::Entry(bytes)) => {
                        commit.arg("e").arg(2).arg(RECORD_FIELD).arg(bytes);
                    }
                    Some(Outcome::Deduped(events)) => {
                        commit.arg("E").arg(events.len());
                        for ((key, bit), bytes) in events {
                            commit.arg(key).arg(bit).arg(bytes);
                        }
                    }
                    None => {}
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
        let (acked, resent): (usize, usize) = commit.invoke_async(&mut con).await?;
        if resent > 0 {
            tracing::info!(
                resent,
                "events re-sent by their producers were dropped (same source and seq)"
            );
        }
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
