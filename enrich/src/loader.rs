//! The history loader: consumer group [`LOAD_GROUP`] on every enriched stream,
//! writing trades and quotes to Postgres. Per batch, one transaction, then the
//! `XACK`; nothing is acked before the commit.
//!
//! A batch is written with `COPY ... FROM STDIN`: Postgres's cheapest way in,
//! with no plan, no speculative insertion and no per-row executor work. Rows go
//! in sorted by (instrument, ts), so consecutive inserts into the
//! `(instrument, ts_ns)` index land on the same leaf pages.
//!
//! Exactly-once rows come from the entry, the unit the group redelivers: the
//! same transaction records every entry id of the batch in `history_entries`
//! (primary key `(stream, ms, seq)`). A redelivered batch (a crash between commit
//! and ack, or a claim from a stalled loader) fails that COPY with a unique
//! violation; it is rolled back and written again without the entries already
//! recorded. A producer's resend of an event arrives in a new entry and is
//! dropped earlier, by enrich's `(source, seq)` window. Rows of
//! `history_entries` are pruned once the group can no longer redeliver them.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use tickgraph_ingest::redis_link::{query_atomic, RedisConn, RedisTarget};
use tickgraph_ingest::stream::{
    decode_entry, is_batch, CodecError, DeadLetter, DlqBounds, EntryId, LOAD_GROUP,
};
use tickgraph_ingest::{Event, StreamLayout, Trim};
use tokio_util::sync::CancellationToken;

use crate::consumer::{self, BatchHandler, ConsumerConfig, ConsumerError, Entry};
use crate::metrics::{add_codes, LoadMetrics, LOAD_DEAD_LETTER_CODES};
use crate::record::{Derived, EnrichedRecord};
use crate::retention;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub layout: StreamLayout,
    /// Consumer name in the group; keep it stable across restarts of one process.
    pub consumer: String,
    pub batch: usize,
    pub block: Duration,
    pub claim_idle: Duration,
    /// Retention of the enriched streams, applied behind this group (see
    /// [`crate::retention`]); it also bounds how far back subscribers can resume.
    pub enriched_retention: Trim,
    /// Pause after a short batch (see [`ConsumerConfig::linger`]): each commit
    /// waits for a WAL flush, so a few large transactions cost Postgres far less
    /// than one per arrival. History lags the live streams by about this much.
    pub linger: Duration,
    /// How often each stream's `history_entries` rows that can no longer be
    /// redelivered are deleted.
    pub prune_every: Duration,
    /// Replicas that must hold the entries read before they are loaded (see
    /// [`ConsumerConfig::wait_replicas`]); 0 on a single Redis.
    pub wait_replicas: u32,
    /// Where the loader counts what it does; clone it before [`run`] to
    /// register it with a registry (see [`crate::metrics`]).
    pub metrics: LoadMetrics,
}

impl LoadConfig {
    /// Batches of 100 entries (each up to 256 events), 1 s block, claim after 30 s
    /// idle, 100 ms linger, enriched streams of about 20,000 entries per shard,
    /// loaded entry ids pruned every 30 s.
    pub fn new(layout: StreamLayout, consumer: impl Into<String>) -> Self {
        Self {
            layout,
            consumer: consumer.into(),
            batch: 100,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            enriched_retention: Trim::MaxLen(20_000),
            linger: Duration::from_millis(100),
            prune_every: Duration::from_secs(30),
            wait_replicas: 0,
            metrics: LoadMetrics::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("redis client: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
}

/// Loads every shard's enriched stream into Postgres until `shutdown`, then
/// returns once each shard has committed and acked its in-flight batch.
pub async fn run(
    cfg: LoadConfig,
    client: impl Into<RedisTarget>,
    pool: sqlx::PgPool,
    shutdown: CancellationToken,
) -> Result<(), LoadError> {
    let client = client.into();
    let con = consumer::write_connection(&client)?;
    let streams = cfg
        .layout
        .shard_ids()
        .map(|s| (s, cfg.layout.enriched(s)))
        .collect();
    let consumer_cfg = ConsumerConfig::new(
        LOAD_GROUP,
        &cfg.consumer,
        cfg.batch,
        cfg.block,
        cfg.claim_idle,
        cfg.enriched_retention,
    );
    let consumer_cfg = ConsumerConfig {
        linger: cfg.linger,
        wait_replicas: cfg.wait_replicas,
        ..consumer_cfg
    };
    tracing::info!(consumer = %cfg.consumer, shards = cfg.layout.shards(), "history loader starting");
    let handler = Loader {
        metrics: cfg.metrics,
        layout: cfg.layout,
        con,
        pool,
        prune_every: cfg.prune_every,
        pruned: Mutex::new(HashMap::new()),
    };
    let result = consumer::run(client, consumer_cfg, streams, handler, shutdown).await;
    result?;
    Ok(())
}

/// Load failures are rare (a bug or version skew), but never unbounded: the
/// defaults every dead-letter stream has.
const DLQ_BOUNDS: DlqBounds = DlqBounds::DEFAULT;

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("entry id: {0}")]
    EntryId(String),
}

struct Loader {
    metrics: LoadMetrics,
    layout: StreamLayout,
    con: RedisConn,
    pool: sqlx::PgPool,
    prune_every: Duration,
    /// When each stream's `history_entries` rows were last pruned.
    pruned: Mutex<HashMap<String, Instant>>,
}

const TRADES_COPY: &str = "COPY trades (source, seq, instrument, venue, ts_ns, price, qty, \
     side, trade_id, account, asset_class, currency, notional, notional_usd, ingest_ns, \
     enriched_ns, stream_id) FROM STDIN";

const QUOTES_COPY: &str = "COPY quotes (source, seq, instrument, venue, ts_ns, bid, ask, \
     bid_size, ask_size, asset_class, currency, mid, spread, ingest_ns, enriched_ns, stream_id) \
     FROM STDIN";

const ENTRIES_COPY: &str = "COPY history_entries (stream, ms, seq) FROM STDIN";

/// Which of a batch's entries are already in history.
const LOADED_SQL: &str = "SELECT e.ms, e.seq FROM history_entries e \
     JOIN UNNEST($2::int8[], $3::int8[]) AS b (ms, seq) ON e.ms = b.ms AND e.seq = b.seq \
     WHERE e.stream = $1";

/// Forgets the entries of `stream` that the group can no longer redeliver.
const PRUNE_SQL: &str = "DELETE FROM history_entries WHERE stream = $1 AND (ms, seq) < ($2, $3)";

/// SQLSTATE of a unique violation.
const UNIQUE_VIOLATION: &str = "23505";

/// One row of COPY's text format: fields split by tabs, `\N` for null, and
/// backslash, tab, newline and carriage return escaped in text.
struct CopyRow<'b> {
    buf: &'b mut Vec<u8>,
    first: bool,
}

impl<'b> CopyRow<'b> {
    fn new(buf: &'b mut Vec<u8>) -> Self {
        Self { buf, first: true }
    }

    fn sep(&mut self) {
        if !self.first {
            self.buf.push(b'\t');
        }
        self.first = false;
    }

    fn text(&mut self, s: &str) -> &mut Self {
        self.sep();
        if s.bytes()
            .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
        {
            for b in s.bytes() {
                match b {
                    b'\\' => self.buf.extend_from_slice(b"\\\\"),
                    b'\t' => self.buf.extend_from_slice(b"\\t"),
                    b'\n' => self.buf.extend_from_slice(b"\\n"),
                    b'\r' => self.buf.extend_from_slice(b"\\r"),
                    b => self.buf.push(b),
                }
            }
        } else {
            self.buf.extend_from_slice(s.as_bytes());
        }
        self
    }

    fn opt(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.text(s),
            None => {
                self.sep();
                self.buf.extend_from_slice(b"\\N");
                self
            }
        }
    }

    fn int(&mut self, i: i64) -> &mut Self {
        use std::io::Write;
        self.sep();
        // Writing to a Vec cannot fail.
        let _ = write!(self.buf, "{i}");
        self
    }

    /// `Decimal`'s `Display` is plain notation, never an exponent: what
    /// `numeric` reads back exactly.
    fn decimal(&mut self, d: &Decimal) -> &mut Self {
        use std::io::Write;
        self.sep();
        // Writing to a Vec cannot fail.
        let _ = write!(self.buf, "{d}");
        self
    }

    /// An event's place in its stream: the entry id, and `.<index>` in a batch
    /// entry.
    fn position(&mut self, entry_id: &str, index: Option<u32>) -> &mut Self {
        use std::io::Write;
        self.text(entry_id);
        if let Some(i) = index {
            // Writing to a Vec cannot fail.
            let _ = write!(self.buf, ".{i}");
        }
        self
    }

    fn end(&mut self) {
        self.buf.push(b'\n');
    }
}

/// Columns shared by both tables, one vector per column.
#[derive(Default)]
struct Common<'a> {
    source: Vec<&'a str>,
    seq: Vec<i64>,
    instrument: Vec<&'a str>,
    venue: Vec<&'a str>,
    ts_ns: Vec<i64>,
    asset_class: Vec<&'static str>,
    currency: Vec<&'a str>,
    ingest_ns: Vec<i64>,
    enriched_ns: Vec<i64>,
    entry_id: Vec<&'a str>,
    index: Vec<Option<u32>>,
}

impl<'a> Common<'a> {
    fn push(&mut self, rec: &'a EnrichedRecord, seq: i64, position: Position<'a>) {
        let h = rec.event.header();
        self.source.push(h.source.as_str());
        self.seq.push(seq);
        self.instrument.push(h.instrument.as_str());
        self.venue.push(h.venue.as_str());
        self.ts_ns.push(h.ts.nanos());
        self.asset_class.push(rec.asset_class.as_str());
        self.currency.push(&rec.currency);
        self.ingest_ns.push(rec.ingest_ns);
        self.enriched_ns.push(rec.enriched_ns);
        self.entry_id.push(position.0);
        self.index.push(position.1);
    }

    fn len(&self) -> usize {
        self.seq.len()
    }

    /// Row indexes in (instrument, ts) order: the order COPY sends them in.
    fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_unstable_by(|&a, &b| {
            self.instrument[a]
                .cmp(self.instrument[b])
                .then(self.ts_ns[a].cmp(&self.ts_ns[b]))
        });
        order
    }

    /// The first columns of both tables: source, seq, instrument, venue, ts_ns.
    fn copy_head(&self, row: &mut CopyRow<'_>, i: usize) {
        row.text(self.source[i])
            .int(self.seq[i])
            .text(self.instrument[i])
            .text(self.venue[i])
            .int(self.ts_ns[i]);
    }

    /// The last columns of both tables: ingest_ns, enriched_ns, stream_id; ends
    /// the row.
    fn copy_tail(&self, row: &mut CopyRow<'_>, i: usize) {
        row.int(self.ingest_ns[i])
            .int(self.enriched_ns[i])
            .position(self.entry_id[i], self.index[i])
            .end();
    }
}

#[derive(Default)]
struct TradeRows<'a> {
    common: Common<'a>,
    price: Vec<Decimal>,
    qty: Vec<Decimal>,
    side: Vec<&'static str>,
    trade_id: Vec<Option<&'a str>>,
    account: Vec<Option<&'a str>>,
    notional: Vec<Decimal>,
    notional_usd: Vec<Decimal>,
}

impl TradeRows<'_> {
    /// The rows in COPY text format, columns as in [`TRADES_COPY`].
    fn copy_text(&self, buf: &mut Vec<u8>) {
        let c = &self.common;
        for i in c.order() {
            let mut row = CopyRow::new(buf);
            c.copy_head(&mut row, i);
            row.decimal(&self.price[i])
                .decimal(&self.qty[i])
                .text(self.side[i])
                .opt(self.trade_id[i])
                .opt(self.account[i])
                .text(c.asset_class[i])
                .text(c.currency[i])
                .decimal(&self.notional[i])
                .decimal(&self.notional_usd[i]);
            c.copy_tail(&mut row, i);
        }
    }
}

#[derive(Default)]
struct QuoteRows<'a> {
    common: Common<'a>,
    bid: Vec<Decimal>,
    ask: Vec<Decimal>,
    bid_size: Vec<Decimal>,
    ask_size: Vec<Decimal>,
    mid: Vec<Decimal>,
    spread: Vec<Decimal>,
}

impl QuoteRows<'_> {
    /// The rows in COPY text format, columns as in [`QUOTES_COPY`].
    fn copy_text(&self, buf: &mut Vec<u8>) {
        let c = &self.common;
        for i in c.order() {
            let mut row = CopyRow::new(buf);
            c.copy_head(&mut row, i);
            row.decimal(&self.bid[i])
                .decimal(&self.ask[i])
                .decimal(&self.bid_size[i])
                .decimal(&self.ask_size[i])
                .text(c.asset_class[i])
                .text(c.currency[i])
                .decimal(&self.mid[i])
                .decimal(&self.spread[i]);
            c.copy_tail(&mut row, i);
        }
    }
}

/// Where an event sits in its stream: entry id, and index when the entry is a
/// batch.
type Position<'a> = (&'a str, Option<u32>);

/// Splits a decoded record into column vectors (only checks it when `load` is
/// false); a record that cannot become a row comes back as its reason.
fn add_row<'a>(
    rows: &mut Rows<'a>,
    rec: &'a EnrichedRecord,
    position: Position<'a>,
    load: bool,
) -> Result<(), String> {
    let seq = i64::try_from(rec.event.header().seq)
        .map_err(|_| format!("`seq` {} does not fit a bigint", rec.event.header().seq))?;
    let (trades, quotes) = (&mut rows.trades, &mut rows.quotes);
    match (&rec.event, &rec.derived) {
        (Event::Trade(_), Derived::Trade { .. }) | (Event::Quote(_), Derived::Quote { .. })
            if !load => {}
        (
            Event::Trade(t),
            Derived::Trade {
                notional,
                notional_usd,
            },
        ) => {
            trades.common.push(rec, seq, position);
            trades.price.push(t.price);
            trades.qty.push(t.qty);
            trades.side.push(t.side.as_str());
            trades
                .trade_id
                .push(t.trade_id.as_ref().map(|x| x.as_str()));
            trades.account.push(t.account.as_ref().map(|x| x.as_str()));
            trades.notional.push(*notional);
            trades.notional_usd.push(*notional_usd);
        }
        (Event::Quote(q), Derived::Quote { mid, spread }) => {
            quotes.common.push(rec, seq, position);
            quotes.bid.push(q.bid);
            quotes.ask.push(q.ask);
            quotes.bid_size.push(q.bid_size);
            quotes.ask_size.push(q.ask_size);
            quotes.mid.push(*mid);
            quotes.spread.push(*spread);
        }
        _ => return Err("derived fields do not match the event kind".to_string()),
    }
    Ok(())
}

/// One `COPY ... FROM STDIN` of rows already in text format; none, no COPY.
async fn copy_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sql: &str,
    rows: &[u8],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut copy = tx.copy_in_raw(sql).await?;
    copy.send(rows).await?;
    copy.finish().await?;
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(UNIQUE_VIOLATION))
}

/// Entry ids are `<ms>-<seq>` of u64s; Postgres keeps them as bigints.
fn id_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A batch's decoded entries.
struct Decoded<'a> {
    entry: &'a Entry,
    id: EntryId,
    batch: bool,
    records: Result<Vec<EnrichedRecord>, CodecError>,
}

/// What one transaction writes: the rows, and the entries they came from.
#[derive(Default)]
struct Rows<'a> {
    trades: TradeRows<'a>,
    quotes: QuoteRows<'a>,
    entries: Vec<EntryId>,
}

impl Rows<'_> {
    /// History rows, trades and quotes.
    fn len(&self) -> usize {
        self.trades.common.len() + self.quotes.common.len()
    }
}

/// The rows of every entry not in `skip`, and a dead letter for each entry or
/// event that cannot become a row (of every entry: a skipped entry's letters
/// were not written, since they go out with the ack).
fn collect<'a>(decoded: &'a [Decoded<'a>], skip: &HashSet<EntryId>) -> (Rows<'a>, Vec<DeadLetter>) {
    let mut rows = Rows::default();
    let mut bad = Vec::new();
    for d in decoded {
        let load = !skip.contains(&d.id);
        if load {
            rows.entries.push(d.id);
        }
        let recs = match &d.records {
            Ok(recs) => recs,
            Err(e) => {
                bad.push(DeadLetter::new(
                    "load",
                    format!("unloadable enriched entry {}: {e}", d.entry.id),
                    d.entry.record.clone(),
                ));
                continue;
            }
        };
        for (i, rec) in recs.iter().enumerate() {
            let index = d.batch.then(|| u32::try_from(i).unwrap_or(u32::MAX));
            // A skipped entry's records are only checked, for their letters.
            if let Err(reason) = add_row(&mut rows, rec, (&d.entry.id, index), load) {
                // Enrich wrote it, so this is a bug or a version skew: keep the
                // event for a replay rather than stall the shard on it forever.
                let position = match index {
                    Some(i) => format!("{}.{i}", d.entry.id),
                    None => d.entry.id.clone(),
                };
                let payload = serde_json::to_vec(rec).unwrap_or_default();
                let mut letter = DeadLetter::new(
                    "load",
                    format!("unloadable enriched event {position}: {reason}"),
                    payload,
                );
                letter.event_id = Some(rec.event.id());
                bad.push(letter);
            }
        }
    }
    (rows, bad)
}

impl Loader {
    /// Writes the batch in one transaction; when some of its entries are already
    /// stored (a redelivery), writes the others. Returns the rows written.
    async fn store<'a>(
        &self,
        stream: &str,
        decoded: &'a [Decoded<'a>],
        rows: &Rows<'a>,
    ) -> Result<usize, BatchError> {
        match self.copy(stream, rows).await {
            Err(e) if is_unique_violation(&e) => {
                let skip = self.loaded(stream, &rows.entries).await?;
                tracing::info!(
                    stream,
                    entries = rows.entries.len(),
                    already_loaded = skip.len(),
                    "batch redelivered after its commit; storing the entries not yet loaded"
                );
                let (rest, _) = collect(decoded, &skip);
                self.copy(stream, &rest).await?;
                Ok(rest.len())
            }
            Ok(()) => Ok(rows.len()),
            Err(e) => Err(e.into()),
        }
    }

    async fn copy(&self, stream: &str, rows: &Rows<'_>) -> Result<(), sqlx::Error> {
        if rows.entries.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let mut buf =
            Vec::with_capacity(256 * rows.trades.common.len().max(rows.quotes.common.len()));
        for id in &rows.entries {
            CopyRow::new(&mut buf)
                .text(stream)
                .int(id_i64(id.ms))
                .int(id_i64(id.seq))
                .end();
        }
        copy_rows(&mut tx, ENTRIES_COPY, &buf).await?;
        buf.clear();
        rows.trades.copy_text(&mut buf);
        copy_rows(&mut tx, TRADES_COPY, &buf).await?;
        buf.clear();
        rows.quotes.copy_text(&mut buf);
        copy_rows(&mut tx, QUOTES_COPY, &buf).await?;
        tx.commit().await
    }

    /// Which of `entries` of `stream` are already in history.
    async fn loaded(
        &self,
        stream: &str,
        entries: &[EntryId],
    ) -> Result<HashSet<EntryId>, sqlx::Error> {
        let ms: Vec<i64> = entries.iter().map(|e| id_i64(e.ms)).collect();
        let seq: Vec<i64> = entries.iter().map(|e| id_i64(e.seq)).collect();
        let found: Vec<(i64, i64)> = sqlx::query_as(LOADED_SQL)
            .bind(stream)
            .bind(&ms)
            .bind(&seq)
            .fetch_all(&self.pool)
            .await?;
        Ok(found
            .into_iter()
            .map(|(ms, seq)| EntryId {
                ms: u64::try_from(ms).unwrap_or_default(),
                seq: u64::try_from(seq).unwrap_or_default(),
            })
            .collect())
    }

    /// Every `prune_every` per stream, deletes the `history_entries` rows below
    /// the oldest entry the group may still deliver (its oldest pending entry, or
    /// the one after its last delivered): those were acked and never come again.
    async fn prune(&self, stream: &str) -> Result<(), BatchError> {
        {
            let mut pruned = self.pruned.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let last = pruned.entry(stream.to_owned()).or_insert(now);
            if now.duration_since(*last) < self.prune_every {
                return Ok(());
            }
            *last = now;
        }
        let mut con = self.con.clone();
        let Some(needed) = retention::needed_from(&mut con, stream).await? else {
            return Ok(());
        };
        let done = sqlx::query(PRUNE_SQL)
            .bind(stream)
            .bind(id_i64(needed.ms))
            .bind(id_i64(needed.seq))
            .execute(&self.pool)
            .await?;
        tracing::debug!(
            stream,
            pruned = done.rows_affected(),
            "history_entries pruned"
        );
        Ok(())
    }
}

impl Loader {
    /// Adds a committed and acknowledged batch to the metrics: `written` rows;
    /// `bad` dead letters, which went out with the ack.
    fn count(&self, written: usize, bad: &[DeadLetter]) {
        self.metrics.loaded.inc_by(written as u64);
        let mut codes = [0u64; LOAD_DEAD_LETTER_CODES.len()];
        for letter in bad {
            let i = usize::from(letter.reason.starts_with("unloadable enriched event"));
            codes[i] += 1;
        }
        add_codes(&self.metrics.dead_letters, LOAD_DEAD_LETTER_CODES, &codes);
    }
}

impl BatchHandler for Loader {
    type Error = BatchError;

    async fn handle(
        &self,
        shard: u16,
        stream: &str,
        entries: Vec<Entry>,
    ) -> Result<(), Self::Error> {
        let decoded = entries
            .iter()
            .map(|e| {
                Ok(Decoded {
                    entry: e,
                    id: e.id.parse().map_err(BatchError::EntryId)?,
                    batch: is_batch(&e.record),
                    records: decode_entry::<EnrichedRecord>(&e.record),
                })
            })
            .collect::<Result<Vec<_>, BatchError>>()?;
        let (rows, bad) = collect(&decoded, &HashSet::new());
        let written = self.store(stream, &decoded, &rows).await?;
        let dlq = self.layout.dlq(shard);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for letter in &bad {
            pipe.add_command(letter.append(&dlq, DLQ_BOUNDS)).ignore();
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(LOAD_GROUP);
        for entry in &entries {
            ack.arg(&entry.id);
        }
        pipe.add_command(ack).ignore();
        let mut con = self.con.clone();
        query_atomic::<()>(&mut con, &pipe, stream).await?;
        self.count(written, &bad);
        let (trades, quotes) = (rows.trades.common.len(), rows.quotes.common.len());
        if bad.is_empty() {
            tracing::debug!(trades, quotes, "batch loaded");
        } else {
            tracing::error!(
                trades,
                quotes,
                dead_lettered = bad.len(),
                first_reason = %bad[0].reason,
                "batch loaded; entries dead-lettered"
            );
        }
        if let Err(e) = self.prune(stream).await {
            // Only bookkeeping: the next prune covers it.
            tracing::warn!(error = %e, stream, "pruning history_entries failed; will retry");
        }
        Ok(())
    }
}
