//! The history loader: consumer group [`LOAD_GROUP`] on every enriched stream,
//! writing trades and quotes to Postgres. Per batch, one transaction, then the
//! `XACK`; nothing is acked before the commit.
//!
//! A batch is written with `COPY ... FROM STDIN`: Postgres's cheapest way in,
//! with no plan, no speculative insertion and no per-row executor work. COPY
//! has no `ON CONFLICT`, so a batch holding an event that is already stored (a
//! redelivery after a crash between commit and ack, or a producer's resend)
//! fails with a unique violation; that batch is rolled back and written again
//! with `INSERT ... SELECT FROM UNNEST ... ON CONFLICT (source, seq) DO
//! NOTHING`, which skips what is there. Either way at-least-once delivery gives
//! exactly-once rows.

use std::time::Duration;

use redis::aio::ConnectionManager;
use rust_decimal::Decimal;
use tickgraph_ingest::stream::{decode_entry, event_position, is_batch, DeadLetter, LOAD_GROUP};
use tickgraph_ingest::{Event, StreamLayout, Trim};
use tokio_util::sync::CancellationToken;

use crate::consumer::{self, BatchHandler, ConsumerConfig, ConsumerError, Entry};
use crate::record::{Derived, EnrichedRecord};

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
}

impl LoadConfig {
    /// Batches of 100 entries (each up to 256 events), 1 s block, claim after 30 s
    /// idle, 100 ms linger, enriched streams of about 20,000 entries per shard.
    pub fn new(layout: StreamLayout, consumer: impl Into<String>) -> Self {
        Self {
            layout,
            consumer: consumer.into(),
            batch: 100,
            block: Duration::from_secs(1),
            claim_idle: Duration::from_secs(30),
            enriched_retention: Trim::MaxLen(20_000),
            linger: Duration::from_millis(100),
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
    client: redis::Client,
    pool: sqlx::PgPool,
    shutdown: CancellationToken,
) -> Result<(), LoadError> {
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
        ..consumer_cfg
    };
    tracing::info!(consumer = %cfg.consumer, shards = cfg.layout.shards(), "history loader starting");
    let handler = Loader {
        layout: cfg.layout,
        con,
        pool,
    };
    let result = consumer::run(client, consumer_cfg, streams, handler, shutdown).await;
    result?;
    Ok(())
}

/// Load failures are rare (a bug or version skew), but never unbounded.
const DLQ_TRIM: Trim = Trim::MaxLen(100_000);

#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

struct Loader {
    layout: StreamLayout,
    con: ConnectionManager,
    pool: sqlx::PgPool,
}

const TRADES_SQL: &str = "INSERT INTO trades (source, seq, instrument, venue, ts_ns, price, qty, \
     side, trade_id, account, asset_class, currency, notional, notional_usd, ingest_ns, \
     enriched_ns, stream_id) \
     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[], \
     $6::numeric[], $7::numeric[], $8::text[], $9::text[], $10::text[], $11::text[], \
     $12::text[], $13::numeric[], $14::numeric[], $15::int8[], $16::int8[], $17::text[]) \
     ON CONFLICT (source, seq) DO NOTHING";

const QUOTES_SQL: &str = "INSERT INTO quotes (source, seq, instrument, venue, ts_ns, bid, ask, \
     bid_size, ask_size, asset_class, currency, mid, spread, ingest_ns, enriched_ns, stream_id) \
     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[], \
     $6::numeric[], $7::numeric[], $8::numeric[], $9::numeric[], $10::text[], $11::text[], \
     $12::numeric[], $13::numeric[], $14::int8[], $15::int8[], $16::text[]) \
     ON CONFLICT (source, seq) DO NOTHING";

const TRADES_COPY: &str = "COPY trades (source, seq, instrument, venue, ts_ns, price, qty, \
     side, trade_id, account, asset_class, currency, notional, notional_usd, ingest_ns, \
     enriched_ns, stream_id) FROM STDIN";

const QUOTES_COPY: &str = "COPY quotes (source, seq, instrument, venue, ts_ns, bid, ask, \
     bid_size, ask_size, asset_class, currency, mid, spread, ingest_ns, enriched_ns, stream_id) \
     FROM STDIN";

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
    stream_id: Vec<&'a str>,
}

impl<'a> Common<'a> {
    fn push(&mut self, rec: &'a EnrichedRecord, seq: i64, stream_id: &'a str) {
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
        self.stream_id.push(stream_id);
    }

    fn len(&self) -> usize {
        self.seq.len()
    }

    fn is_empty(&self) -> bool {
        self.seq.is_empty()
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
            .text(self.stream_id[i])
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
        for i in 0..c.len() {
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
        for i in 0..c.len() {
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

/// Splits decoded records into column vectors; a record that cannot become a row
/// comes back as its reason.
fn add_row<'a>(
    trades: &mut TradeRows<'a>,
    quotes: &mut QuoteRows<'a>,
    rec: &'a EnrichedRecord,
    stream_id: &'a str,
) -> Result<(), String> {
    let seq = i64::try_from(rec.event.header().seq)
        .map_err(|_| format!("`seq` {} does not fit a bigint", rec.event.header().seq))?;
    match (&rec.event, &rec.derived) {
        (
            Event::Trade(t),
            Derived::Trade {
                notional,
                notional_usd,
            },
        ) => {
            trades.common.push(rec, seq, stream_id);
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
            quotes.common.push(rec, seq, stream_id);
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

impl Loader {
    /// Writes the batch in one transaction: by COPY, or, when some of it is
    /// already stored, by INSERT that skips those rows.
    async fn store(
        &self,
        trades: &TradeRows<'_>,
        quotes: &QuoteRows<'_>,
    ) -> Result<(), sqlx::Error> {
        match self.copy(trades, quotes).await {
            Err(e) if is_unique_violation(&e) => {
                tracing::info!(
                    error = %e,
                    "batch holds events already in history (a redelivery or a resend); \
                     storing the rest"
                );
                self.insert(trades, quotes).await
            }
            other => other,
        }
    }

    async fn copy(
        &self,
        trades: &TradeRows<'_>,
        quotes: &QuoteRows<'_>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut buf = Vec::with_capacity(256 * trades.common.len().max(quotes.common.len()));
        trades.copy_text(&mut buf);
        copy_rows(&mut tx, TRADES_COPY, &buf).await?;
        buf.clear();
        quotes.copy_text(&mut buf);
        copy_rows(&mut tx, QUOTES_COPY, &buf).await?;
        tx.commit().await
    }

    async fn insert(
        &self,
        trades: &TradeRows<'_>,
        quotes: &QuoteRows<'_>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        if !trades.common.is_empty() {
            let c = &trades.common;
            sqlx::query(TRADES_SQL)
                .bind(&c.source)
                .bind(&c.seq)
                .bind(&c.instrument)
                .bind(&c.venue)
                .bind(&c.ts_ns)
                .bind(&trades.price)
                .bind(&trades.qty)
                .bind(&trades.side)
                .bind(&trades.trade_id)
                .bind(&trades.account)
                .bind(&c.asset_class)
                .bind(&c.currency)
                .bind(&trades.notional)
                .bind(&trades.notional_usd)
                .bind(&c.ingest_ns)
                .bind(&c.enriched_ns)
                .bind(&c.stream_id)
                .execute(&mut *tx)
                .await?;
        }
        if !quotes.common.is_empty() {
            let c = &quotes.common;
            sqlx::query(QUOTES_SQL)
                .bind(&c.source)
                .bind(&c.seq)
                .bind(&c.instrument)
                .bind(&c.venue)
                .bind(&c.ts_ns)
                .bind(&quotes.bid)
                .bind(&quotes.ask)
                .bind(&quotes.bid_size)
                .bind(&quotes.ask_size)
                .bind(&c.asset_class)
                .bind(&c.currency)
                .bind(&quotes.mid)
                .bind(&quotes.spread)
                .bind(&c.ingest_ns)
                .bind(&c.enriched_ns)
                .bind(&c.stream_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
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
        // Each event's place in the stream: the entry id, and its index in a batch entry.
        let decoded: Vec<_> = entries
            .iter()
            .map(|e| {
                let batch = is_batch(&e.record);
                decode_entry::<EnrichedRecord>(&e.record).map(|recs| {
                    recs.into_iter()
                        .enumerate()
                        .map(|(i, r)| (event_position(&e.id, i, batch), r))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut trades = TradeRows::default();
        let mut quotes = QuoteRows::default();
        let mut bad = Vec::new();
        for (entry, recs) in entries.iter().zip(&decoded) {
            let recs = match recs {
                Ok(recs) => recs,
                Err(e) => {
                    bad.push(DeadLetter::new(
                        "load",
                        format!("unloadable enriched entry {}: {e}", entry.id),
                        entry.record.clone(),
                    ));
                    continue;
                }
            };
            for (position, rec) in recs {
                if let Err(reason) = add_row(&mut trades, &mut quotes, rec, position) {
                    // Enrich wrote it, so this is a bug or a version skew: keep the
                    // event for a replay rather than stall the shard on it forever.
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
        self.store(&trades, &quotes).await?;
        let dlq = self.layout.dlq(shard);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for letter in &bad {
            pipe.add_command(letter.xadd(&dlq, DLQ_TRIM)).ignore();
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(LOAD_GROUP);
        for entry in &entries {
            ack.arg(&entry.id);
        }
        pipe.add_command(ack).ignore();
        let mut con = self.con.clone();
        pipe.query_async::<()>(&mut con).await?;
        if bad.is_empty() {
            tracing::debug!(
                trades = trades.common.len(),
                quotes = quotes.common.len(),
                "batch loaded"
            );
        } else {
            tracing::error!(
                trades = trades.common.len(),
                quotes = quotes.common.len(),
                dead_lettered = bad.len(),
                first_reason = %bad[0].reason,
                "batch loaded; entries dead-lettered"
            );
        }
        Ok(())
    }
}
