//! The SQL behind history, snapshot and latest-value fallback queries: one
//! statement per page or per kind, each walking the `(instrument, ts_ns)` index.
//!
//! Pages use keyset pagination on `(ts_ns, source, seq)`: `(source, seq)`
//! identifies an event (enrich drops re-sends within its dedupe window, and the
//! loader stores each entry once), so the triple orders the rows totally and a
//! page boundary can neither repeat nor skip a row, even among trades sharing a
//! timestamp.

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::auth::{Entitlements, Scope};
use crate::tick::{QuoteRow, TradeRow};

const TRADE_COLUMNS: &str = "source, seq, instrument, venue, ts_ns, price, qty, side, \
     trade_id, account, asset_class, currency::text AS currency, notional, notional_usd, \
     ingest_ns, enriched_ns, stream_id";
const QUOTE_COLUMNS: &str = "source, seq, instrument, venue, ts_ns, bid, ask, bid_size, \
     ask_size, asset_class, currency::text AS currency, mid, spread, ingest_ns, enriched_ns, \
     stream_id";

/// The position of a history row in its page order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryKey {
    pub ts_ns: i64,
    pub source: String,
    pub seq: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Oldest first.
    #[default]
    Asc,
    /// Newest first.
    Desc,
}

/// The rows a user may see, by venue and asset class (`None`: any); see
/// [`crate::auth::Entitlements`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visible {
    pub venues: Option<Vec<String>>,
    pub asset_classes: Option<Vec<String>>,
}

impl Visible {
    pub fn all() -> Self {
        Self::default()
    }

    pub fn of(e: &Entitlements) -> Self {
        Self {
            venues: match &e.venues {
                Scope::All => None,
                Scope::Only(v) => Some(v.clone()),
            },
            asset_classes: match &e.asset_classes {
                Scope::All => None,
                Scope::Only(v) => Some(v.iter().map(|a| a.as_str().to_owned()).collect()),
            },
        }
    }
}

/// The condition [`Visible`] adds, on parameters `$v` and `$v+1`.
fn visible_sql(v: usize) -> String {
    format!(
        " AND (${v}::text[] IS NULL OR venue = ANY(${v})) \
         AND (${w}::text[] IS NULL OR asset_class = ANY(${w}))",
        w = v + 1
    )
}

/// One page of one instrument's history.
#[derive(Debug, Clone)]
pub struct Page {
    pub instrument: String,
    /// Inclusive lower bound, epoch ns.
    pub from_ns: i64,
    /// Exclusive upper bound, epoch ns.
    pub to_ns: i64,
    /// Start after this row (in `order`).
    pub after: Option<HistoryKey>,
    pub limit: i64,
    pub order: Order,
    /// Only rows the asking user may see.
    pub visible: Visible,
}

enum Table {
    Trades,
    Quotes,
}

impl Table {
    fn name(&self) -> &'static str {
        match self {
            Table::Trades => "trades",
            Table::Quotes => "quotes",
        }
    }

    fn columns(&self) -> &'static str {
        match self {
            Table::Trades => TRADE_COLUMNS,
            Table::Quotes => QUOTE_COLUMNS,
        }
    }
}

/// The page statement. The cursor condition repeats `ts_ns` alone before the row
/// comparison because Postgres bounds an index scan only on plain column
/// comparisons; the row comparison then settles ties within one timestamp.
fn page_sql(table: &Table, order: Order, with_cursor: bool) -> String {
    let (dir, cmp, ts_cmp) = match order {
        Order::Asc => ("ASC", ">", ">="),
        Order::Desc => ("DESC", "<", "<="),
    };
    let cursor = if with_cursor {
        format!(" AND ts_ns {ts_cmp} $4 AND (ts_ns, source, seq) {cmp} ($4, $5, $6)")
    } else {
        String::new()
    };
    let (limit, visible) = if with_cursor { ("$7", 8) } else { ("$4", 5) };
    format!(
        "SELECT {cols} FROM {table} \
         WHERE instrument = $1 AND ts_ns >= $2 AND ts_ns < $3{cursor}{visible} \
         ORDER BY ts_ns {dir}, source {dir}, seq {dir} LIMIT {limit}",
        cols = table.columns(),
        table = table.name(),
        visible = visible_sql(visible),
    )
}

async fn page<R>(pool: &PgPool, table: Table, p: &Page) -> Result<Vec<R>, sqlx::Error>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let sql = page_sql(&table, p.order, p.after.is_some());
    let mut q = sqlx::query_as::<_, R>(&sql)
        .bind(&p.instrument)
        .bind(p.from_ns)
        .bind(p.to_ns);
    if let Some(k) = &p.after {
        q = q.bind(k.ts_ns).bind(&k.source).bind(k.seq);
    }
    q.bind(p.limit)
        .bind(&p.visible.venues)
        .bind(&p.visible.asset_classes)
        .fetch_all(pool)
        .await
}

pub async fn trade_page(pool: &PgPool, p: &Page) -> Result<Vec<TradeRow>, sqlx::Error> {
    page(pool, Table::Trades, p).await
}

pub async fn quote_page(pool: &PgPool, p: &Page) -> Result<Vec<QuoteRow>, sqlx::Error> {
    page(pool, Table::Quotes, p).await
}

/// For each instrument, its newest row with `ts_ns <= at_ns`: one statement for
/// all instruments, one index probe each. Instruments without such a row are
/// absent from the result.
fn as_of_sql(table: &Table) -> String {
    format!(
        "SELECT r.* FROM unnest($1::text[]) AS i(symbol) \
         CROSS JOIN LATERAL ( \
             SELECT {cols} FROM {table} \
             WHERE instrument = i.symbol AND ts_ns <= $2{visible} \
             ORDER BY ts_ns DESC, source DESC, seq DESC LIMIT 1 \
         ) r",
        cols = table.columns(),
        table = table.name(),
        visible = visible_sql(3),
    )
}

async fn as_of<R>(
    pool: &PgPool,
    table: Table,
    instruments: &[String],
    at_ns: i64,
    visible: &Visible,
) -> Result<Vec<R>, sqlx::Error>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    if instruments.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as::<_, R>(&as_of_sql(&table))
        .bind(instruments)
        .bind(at_ns)
        .bind(&visible.venues)
        .bind(&visible.asset_classes)
        .fetch_all(pool)
        .await
}

pub async fn trades_as_of(
    pool: &PgPool,
    instruments: &[String],
    at_ns: i64,
    visible: &Visible,
) -> Result<Vec<TradeRow>, sqlx::Error> {
    as_of(pool, Table::Trades, instruments, at_ns, visible).await
}

pub async fn quotes_as_of(
    pool: &PgPool,
    instruments: &[String],
    at_ns: i64,
    visible: &Visible,
) -> Result<Vec<QuoteRow>, sqlx::Error> {
    as_of(pool, Table::Quotes, instruments, at_ns, visible).await
}
