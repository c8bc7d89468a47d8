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

use tickgraph_ingest::event::now_nanos;
use tickgraph_ingest::redis_link::{RedisConn, RedisTarget};
use tickgraph_ingest::stream::{
    decode_entry, dlq_bytes_key, DeadLetter, DlqBounds, RawRecord, DLQ_ADD_LUA, ENRICH_GROUP,
    RECORD_FIELD,
};
use tickgraph_ingest::{StreamLayout, Trim};
use tokio_util::sync::CancellationToken;

use crate::consumer::{self, BatchHandler, ConsumerConfig, ConsumerError, Entry};
use crate::metrics::{add_codes, EnrichMetrics, ENRICH_DEAD_LETTER_CODES};
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
    /// The bounds of each shard's dead-letter stream.
    pub dlq: DlqBounds,
    /// How long an event's `source` + `seq` is remembered, so that a producer's
    /// re-send within it is dropped before the enriched stream. Zero turns this
    /// off: a re-send then reaches the enriched stream and history again.
    pub dedupe_window: Duration,
    /// Where the worker counts what it does; clone it before [`run`] to
    /// register it with a registry (see [`crate::metrics`]).
    pub metrics: EnrichMetrics,
}

impl EnrichConfig {
    /// Batches of 100 entries (each up to 256 events), 1 s block, claim after 30 s
    /// idle, raw streams of about 10,000 entries per shard behind the group,
    /// dead-letter streams of at most 100k letters and 32 MiB per shard.
    pub fn new(layout: StreamLayout, consumer: impl Into<String>) -> Self {
        Self {
            layout,
            consumer: consumer.into(),
            batch: 100,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            raw_retention: Trim::MaxLen(10_000),
            dlq: DlqBounds {
                max_bytes: 32 << 20,
                ..DlqBounds::DEFAULT
            },
            dedupe_window: Duration::from_secs(600),
            metrics: EnrichMetrics::default(),
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
    client: impl Into<RedisTarget>,
    refs: RefCache,
    shutdown: CancellationToken,
) -> Result<(), EnrichError> {
    let client = client.into();
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

/// The per-batch work of the enrich worker: join, then commit (see `COMMIT_LUA`).
pub struct Enricher {
    cfg: EnrichConfig,
    con: RedisConn,
    refs: RefCache,
}

impl Enricher {
    pub fn new(
        cfg: EnrichConfig,
        client: &RedisTarget,
        refs: RefCache,
    ) -> Result<Self, EnrichError> {
        let con = consumer::write_connection(client)?;
        Ok(Self { cfg, con, refs })
    }
}

/// KEYS: raw, enriched, dead-letter stream, the dead-letter stream's byte count
/// ([`dlq_bytes_key`]). ARGV: group, the enriched trim (count then arguments),
/// the dead-letter bounds (3, as [`DlqBounds::args`]), the lifetime in seconds
/// of the dedupe bitmaps, then per raw entry: its id, the number of outcomes,
/// and per outcome one of
/// - `e`, the number of field/value arguments, and those: an enriched entry;
/// - `d`, likewise: a dead letter;
/// - `E`, the number of events, the number of dedupe bitmap keys, those keys,
///   the enriched entry (one MessagePack array), the length of its array
///   header, then per key the number of its events and their bits in that
///   bitmap (in event order), then per event its key's index (from 1) and the
///   offset in the entry where its record ends: the entry, minus the events
///   whose bit was already set (a producer's re-send of `source` + `seq` is
///   dropped here). An entry with no re-send is written as it came. The bits
///   are set with one `BITFIELD` per key and entry (each `SET` returns the bit
///   before it, in order, as `SETBIT` did), not a call per event: per-event
///   calls, with their number conversions, were a fifth of Redis's CPU.
///
/// The bitmaps share the shard's hash tag. Returns how many raw entries this call
/// acknowledged (and so wrote the outcomes of), how many events it dropped as
/// re-sent, and per raw entry `1` when this call acknowledged it, else `0`.
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
local dbounds = { ARGV[i], ARGV[i + 1], ARGV[i + 2] }
i = i + 3
local seen_ttl = ARGV[i]
i = i + 1
-- Order: with several workers in the group, each holds a different run of a
-- shard's entries. A batch is written only once no older entry of the stream is
-- pending with anyone (the group delivers in id order, so every older entry has
-- been committed), which keeps the enriched stream in the raw stream's order and
-- each instrument's events in order. Otherwise nothing is done, and the worker
-- tries again shortly.
if i <= #ARGV then
  local older = redis.call('XPENDING', KEYS[1], group, '-', '(' .. ARGV[i], 1)
  if #older > 0 then return { -1, 0, older[1][2] } end
end
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
local flags = {}
while i <= #ARGV do
  local id, outcomes = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local mine = redis.call('XACK', KEYS[1], group, id) == 1
  if mine then acked = acked + 1 end
  flags[#flags + 1] = mine and '1' or '0'
  for _ = 1, outcomes do
    local kind, n = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    if kind == 'E' then
      local nkeys = tonumber(ARGV[i])
      local keys = {}
      for k = 1, nkeys do keys[k] = ARGV[i + k] end
      i = i + nkeys + 1
      local entry, start = ARGV[i], tonumber(ARGV[i + 1]) + 1
      i = i + 2
      local groups = {}
      for k = 1, nkeys do
        local c = tonumber(ARGV[i])
        groups[k] = { i + 1, c }
        i = i + 1 + c
      end
      if mine then
        local olds, dups = {}, 0
        for k = 1, nkeys do
          local first, c = groups[k][1], groups[k][2]
          local old = {}
          -- At most 1,000 bits per call, well inside unpack's limit.
          for from = first, first + c - 1, 1000 do
            local args = { 'BITFIELD', keys[k] }
            for j = from, math.min(from + 999, first + c - 1) do
              args[#args + 1] = 'SET'
              args[#args + 1] = 'u1'
              args[#args + 1] = ARGV[j]
              args[#args + 1] = '1'
            end
            for _, v in ipairs(redis.call(unpack(args))) do
              old[#old + 1] = v
              if v == 1 then dups = dups + 1 end
            end
          end
          olds[k] = old
          redis.call('EXPIRE', keys[k], seen_ttl)
        end
        -- 'e' is RECORD_FIELD.
        if dups == 0 then
          xadd(KEYS[2], etrim, { 'e', entry })
        else
          resent = resent + dups
          local kept, pos = {}, {}
          for j = i, i + 2 * (n - 1), 2 do
            local k, stop = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
            pos[k] = (pos[k] or 0) + 1
            if olds[k][pos[k]] == 0 then
              kept[#kept + 1] = string.sub(entry, start, stop)
            end
            start = stop + 1
          end
          if #kept > 0 then
            xadd(KEYS[2], etrim, { 'e', array_header(#kept) .. table.concat(kept) })
          end
        end
      end
      i = i + 2 * n
    else
      if mine then
        local fields = {}
        for j = 0, n - 1 do fields[#fields + 1] = ARGV[i + j] end
        if kind == 'e' then xadd(KEYS[2], etrim, fields) else dlq_add(KEYS[3], KEYS[4], dbounds, fields) end
      end
      i = i + n
    end
  end
end
return { acked, resent, table.concat(flags) }
"#;

/// An entry's enriched outcome, as the commit script takes it.
enum Outcome {
    /// The whole entry, events not checked for re-sends.
    Entry(Vec<u8>),
    /// The entry with what the script needs to drop re-sent events from it.
    Deduped(Deduped),
}

/// Events per dedupe bitmap: 1 KiB of Redis memory holds 8,192 consecutive seqs
/// of one source on one shard.
pub const SEEN_BLOCK_BITS: u64 = 8192;

/// An enriched entry encoded once, with each event's dedupe bit and where its
/// record ends; the bitmap keys, one per source and block of seqs, named once
/// per entry.
struct Deduped {
    entry: Vec<u8>,
    header_len: usize,
    keys: Vec<String>,
    /// Per key, its events' bits in that bitmap, in event order.
    bits: Vec<Vec<u64>>,
    /// Per event: index into `keys`, end offset of its record in `entry`.
    events: Vec<(usize, usize)>,
}

impl Deduped {
    /// A re-sent event has the same instrument, so the same shard, so the same
    /// bitmap as the first.
    fn encode(
        layout: &StreamLayout,
        shard: u16,
        records: &[EnrichedRecord],
    ) -> Result<Self, rmp_serde::encode::Error> {
        let mut entry = Vec::with_capacity(16 + records.len() * 256);
        // Writing to a Vec cannot fail; entries hold at most a few hundred events.
        let _ = rmp::encode::write_array_len(
            &mut entry,
            u32::try_from(records.len()).unwrap_or(u32::MAX),
        );
        let header_len = entry.len();
        let mut blocks: Vec<(&str, u64)> = Vec::new();
        let mut bits: Vec<Vec<u64>> = Vec::new();
        let mut events = Vec::with_capacity(records.len());
        for r in records {
            let h = r.event.header();
            let block = (h.source.as_str(), h.seq / SEEN_BLOCK_BITS);
            let key = match blocks.iter().position(|b| *b == block) {
                Some(k) => k,
                None => {
                    blocks.push(block);
                    bits.push(Vec::new());
                    blocks.len() - 1
                }
            };
            // Positional, as `EnrichedRecord::encode` writes it.
            rmp_serde::encode::write(&mut entry, r)?;
            bits[key].push(h.seq % SEEN_BLOCK_BITS);
            events.push((key, entry.len()));
        }
        let keys = blocks
            .iter()
            .map(|(source, block)| layout.seen(shard, source, *block))
            .collect();
        Ok(Self {
            entry,
            header_len,
            keys,
            bits,
            events,
        })
    }
}

/// How long a batch waits, in doubling steps, for an older one of another
/// worker to be committed before the attempt fails (and is retried from the
/// pending list after the consumer's back-off): 1 + 2 + ... + 256 ms.
const ORDER_WAIT_FIRST: Duration = Duration::from_millis(1);
const ORDER_WAIT_LAST: Duration = Duration::from_millis(256);

static COMMIT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{DLQ_ADD_LUA}\n{COMMIT_LUA}")));

fn count_code(codes: &mut [u64; ENRICH_DEAD_LETTER_CODES.len()], code: &str) {
    if let Some(i) = ENRICH_DEAD_LETTER_CODES.iter().position(|c| *c == code) {
        codes[i] += 1;
    }
}

impl Enricher {
    /// Adds a committed batch to the metrics: the entries `flags` says this
    /// commit acknowledged (another consumer's are theirs to count), minus the
    /// events dropped as re-sent.
    fn count(
        &self,
        per_entry: &[(u64, [u64; ENRICH_DEAD_LETTER_CODES.len()])],
        flags: &str,
        resent: usize,
        freshness: &tickgraph_ingest::ops::Batch<'_>,
    ) {
        let m = &self.cfg.metrics;
        let mut events = 0u64;
        let mut codes = [0u64; ENRICH_DEAD_LETTER_CODES.len()];
        for ((n, letters), flag) in per_entry.iter().zip(flags.bytes()) {
            if flag == b'1' {
                events += n;
                for (total, k) in codes.iter_mut().zip(letters) {
                    *total += k;
                }
            }
        }
        let resent = resent as u64;
        m.enriched.inc_by(events.saturating_sub(resent));
        m.resent.inc_by(resent);
        add_codes(&m.dead_letters, ENRICH_DEAD_LETTER_CODES, &codes);
        m.freshness.add(freshness);
    }
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
        let mut commit = COMMIT.prepare_invoke();
        commit
            .key(stream)
            .key(&enriched_key)
            .key(&dlq_key)
            .key(dlq_bytes_key(&dlq_key));
        // Enriched streams are trimmed by the loader, behind its group.
        commit
            .arg(ENRICH_GROUP)
            .arg(0)
            .arg(&self.cfg.dlq.args()[..]);
        let dedupe = !self.cfg.dedupe_window.is_zero();
        commit.arg(self.cfg.dedupe_window.as_secs().max(1));
        let mut enriched = 0usize;
        let mut rejected = 0usize;
        let mut first_reason = None;
        // Per entry, the events it enriched and its dead letters by code: only
        // the entries this call acknowledges are counted, after the commit.
        let mut per_entry: Vec<(u64, [u64; ENRICH_DEAD_LETTER_CODES.len()])> =
            Vec::with_capacity(entries.len());
        let mut freshness = self.cfg.metrics.freshness.batch();
        {
            let now = now_nanos();
            // Once per batch: the listener's writes wait at most one batch.
            let refs = self.refs.read();
            for entry in &entries {
                let mut records = Vec::new();
                let mut letters = Vec::new();
                let mut codes = [0u64; ENRICH_DEAD_LETTER_CODES.len()];
                match decode_entry::<RawRecord>(&entry.record) {
                    Err(e) => {
                        let reason = format!("undecodable raw entry {}: {e}", entry.id);
                        letters.push(DeadLetter::new("enrich", reason, entry.record.clone()));
                        count_code(&mut codes, "undecodable");
                    }
                    Ok(raws) => {
                        records.reserve(raws.len());
                        for raw in &raws {
                            freshness.observe_ns(now - raw.event.header().ts.nanos());
                            match enrich(raw, &refs, now) {
                                Ok(rec) => records.push(rec),
                                Err(e) => {
                                    count_code(&mut codes, e.code());
                                    // JSON, so that whoever reads the dead letters sees
                                    // the event without a MessagePack decoder.
                                    let payload =
                                        serde_json::to_vec(&raw.event).unwrap_or_default();
                                    let mut letter =
                                        DeadLetter::new("enrich", e.to_string(), payload);
                                    letter.event_id = Some(raw.event.id());
                                    letter.ingest_ns = Some(raw.ingest_ns);
                                    letters.push(letter);
                                }
                            }
                        }
                    }
                }
                let outcome = if records.is_empty() {
                    Ok(None)
                } else if dedupe {
                    Deduped::encode(&self.cfg.layout, shard, &records)
                        .map(|d| Some(Outcome::Deduped(d)))
                        .map_err(|e| e.to_string())
                } else {
                    EnrichedRecord::encode_batch(&records)
                        .map(|b| Some(Outcome::Entry(b)))
                        .map_err(|e| e.to_string())
                };
                let outcome = match outcome {
                    Ok(o) => o,
                    Err(e) => {
                        // Cannot happen for records enrich built; kept loud, not lost.
                        let reason = format!("unencodable enriched batch: {e}");
                        letters.push(DeadLetter::new("enrich", reason, entry.record.clone()));
                        count_code(&mut codes, "unencodable");
                        records.clear();
                        None
                    }
                };
                per_entry.push((records.len() as u64, codes));
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
                    Some(Outcome::Deduped(d)) => {
                        commit.arg("E").arg(d.events.len()).arg(d.keys.len());
                        for key in &d.keys {
                            commit.arg(key);
                        }
                        commit.arg(d.entry).arg(d.header_len);
                        for bits in &d.bits {
                            commit.arg(bits.len()).arg(bits);
                        }
                        for (key, end) in d.events {
                            commit.arg(key + 1).arg(end);
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
        let mut wait = ORDER_WAIT_FIRST;
        let (acked, resent, flags) = loop {
            let (acked, resent, flags): (i64, usize, String) =
                commit.invoke_async(&mut con).await?;
            if let Ok(acked) = usize::try_from(acked) {
                break (acked, resent, flags);
            }
            // An older entry is still with another worker (`flags` names it).
            if wait > ORDER_WAIT_LAST {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "an older entry of the shard is still pending",
                    format!(
                        "with consumer {flags}; this batch waits for it to be committed, \
                         or claimed after --claim-idle-secs if that consumer died"
                    ),
                )));
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        };
        self.count(&per_entry, &flags, resent, &freshness);
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
