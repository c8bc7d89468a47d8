//! The API's view of one enriched event: a [`TradeTick`] or a [`QuoteTick`].
//!
//! Live events (decoded once from the enriched stream by the hub) and history rows
//! (read from Postgres) both become these types, so a subscription and a history
//! query answer with the same GraphQL `Trade` and `Quote`. Ticks are shared behind
//! an `Arc`: one decoded event is handed to every matching subscriber.

use std::sync::Arc;

use compact_str::CompactString;
use rust_decimal::Decimal;
use tickgraph_enrich::record::{Derived, EnrichedRecord};
use tickgraph_enrich::refdata::AssetClass;
use tickgraph_ingest::event::{AccountId, Header, Mic, Source, Symbol, TradeId};
use tickgraph_ingest::{Event, Quote, Side, Timestamp, Trade};

use crate::resume::ResumeBase;
use crate::shared_json::JsonCache;

/// An enriched trade and where it sits in the enriched streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradeTick {
    /// `<shard>:<entry id>` in the enriched streams, e.g. `2:1732550000000-5`.
    pub cursor: CompactString,
    pub trade: Trade,
    pub notional: Decimal,
    pub notional_usd: Decimal,
    pub asset_class: AssetClass,
    pub currency: CompactString,
    pub ingest_ns: i64,
    pub enriched_ns: i64,
    /// What the event's resume cursor is made from; `None` outside a
    /// subscription (history rows).
    pub resume: Option<Arc<ResumeBase>>,
    /// Its GraphQL JSON per selection, shared by the subscribers.
    pub json: JsonCache,
}

/// An enriched quote and where it sits in the enriched streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteTick {
    /// `<shard>:<entry id>` in the enriched streams, e.g. `2:1732550000000-5`.
    pub cursor: CompactString,
    pub quote: Quote,
    pub mid: Decimal,
    pub spread: Decimal,
    pub asset_class: AssetClass,
    pub currency: CompactString,
    pub ingest_ns: i64,
    pub enriched_ns: i64,
    /// What the event's resume cursor is made from; `None` outside a
    /// subscription (history rows).
    pub resume: Option<Arc<ResumeBase>>,
    /// Its GraphQL JSON per selection, shared by the subscribers.
    pub json: JsonCache,
}

/// One decoded enriched stream entry.
#[derive(Debug, Clone)]
pub enum Tick {
    Trade(Arc<TradeTick>),
    Quote(Arc<QuoteTick>),
}

#[derive(Debug, thiserror::Error)]
pub enum TickError {
    /// enrich wrote quote-derived fields onto a trade, or the reverse.
    #[error("event {id} is a {kind} but carries the derived fields of the other kind")]
    KindMismatch { id: String, kind: &'static str },
    #[error("history row {id} is invalid: {msg}")]
    BadRow { id: String, msg: String },
}

/// The stream position a subscriber sees: the shard and the event's position in
/// that shard's stream (`tickgraph_ingest::stream::event_position`).
pub fn cursor(shard: u16, entry_id: &str) -> CompactString {
    compact_str::format_compact!("{shard}:{entry_id}")
}

/// The cursor of the `index`th event of an entry: `cursor(shard,
/// event_position(entry_id, index, batch))`, made in one step, inline (no
/// allocation) up to 24 bytes, which a 13-digit entry id with a short sequence
/// and index fits.
pub fn event_cursor(shard: u16, entry_id: &str, index: usize, batch: bool) -> CompactString {
    if batch {
        compact_str::format_compact!("{shard}:{entry_id}.{index}")
    } else {
        cursor(shard, entry_id)
    }
}

impl Tick {
    /// The tick of an enriched record at `cursor`; `resume` is shared by the
    /// ticks of one batch.
    pub fn from_record(
        cursor: CompactString,
        resume: Option<Arc<ResumeBase>>,
        r: EnrichedRecord,
    ) -> Result<Self, TickError> {
        match (r.event, r.derived) {
            (
                Event::Trade(trade),
                Derived::Trade {
                    notional,
                    notional_usd,
                },
            ) => Ok(Tick::Trade(Arc::new(TradeTick {
                cursor,
                trade,
                notional,
                notional_usd,
                asset_class: r.asset_class,
                currency: r.currency,
                ingest_ns: r.ingest_ns,
                enriched_ns: r.enriched_ns,
                resume,
                json: JsonCache::default(),
            }))),
            (Event::Quote(quote), Derived::Quote { mid, spread }) => {
                Ok(Tick::Quote(Arc::new(QuoteTick {
                    cursor,
                    quote,
                    mid,
                    spread,
                    asset_class: r.asset_class,
                    currency: r.currency,
                    ingest_ns: r.ingest_ns,
                    enriched_ns: r.enriched_ns,
                    resume,
                    json: JsonCache::default(),
                })))
            }
            (event, _) => Err(TickError::KindMismatch {
                id: event.id(),
                kind: event.kind().as_str(),
            }),
        }
    }
}

/// What the hub's filters and the latest-value map need from a tick.
pub trait TickMeta {
    fn header(&self) -> &Header;
    fn asset_class(&self) -> AssetClass;
    /// `None` for quotes, which have no side.
    fn side(&self) -> Option<Side>;
    /// `<shard>:<entry id>[.<index>]`, its place in the enriched streams.
    fn cursor(&self) -> &str;
    /// The same event with another resume base (a snapshot's start).
    fn with_resume(&self, resume: Arc<ResumeBase>) -> Self
    where
        Self: Sized;

    fn instrument(&self) -> &str {
        self.header().instrument.as_str()
    }

    fn venue(&self) -> &str {
        self.header().venue.as_str()
    }

    fn ts(&self) -> Timestamp {
        self.header().ts
    }

    /// Bytes the event takes in memory as decoded (the struct and its
    /// strings), without the JSON rendered for subscribers: what a queued
    /// event counts against a subscriber's byte limit. The same every time,
    /// so a queue adds and takes away the same amount.
    fn weight(&self) -> usize;
}

/// The strings every tick holds: cursor and header.
fn header_bytes<T: TickMeta>(t: &T) -> usize {
    let h = t.header();
    t.cursor().len()
        + h.source.as_str().len()
        + h.instrument.as_str().len()
        + h.venue.as_str().len()
}

impl TickMeta for TradeTick {
    fn header(&self) -> &Header {
        &self.trade.header
    }

    fn asset_class(&self) -> AssetClass {
        self.asset_class
    }

    fn side(&self) -> Option<Side> {
        Some(self.trade.side)
    }

    fn cursor(&self) -> &str {
        &self.cursor
    }

    fn with_resume(&self, resume: Arc<ResumeBase>) -> Self {
        Self {
            resume: Some(resume),
            ..self.clone()
        }
    }

    fn weight(&self) -> usize {
        let t = &self.trade;
        std::mem::size_of::<Self>()
            + header_bytes(self)
            + self.currency.len()
            + t.trade_id.as_ref().map_or(0, |x| x.as_str().len())
            + t.account.as_ref().map_or(0, |x| x.as_str().len())
    }
}

impl TickMeta for QuoteTick {
    fn header(&self) -> &Header {
        &self.quote.header
    }

    fn asset_class(&self) -> AssetClass {
        self.asset_class
    }

    fn side(&self) -> Option<Side> {
        None
    }

    fn cursor(&self) -> &str {
        &self.cursor
    }

    fn with_resume(&self, resume: Arc<ResumeBase>) -> Self {
        Self {
            resume: Some(resume),
            ..self.clone()
        }
    }

    fn weight(&self) -> usize {
        std::mem::size_of::<Self>() + header_bytes(self) + self.currency.len()
    }
}

/// A `trades` row as selected by [`crate::history`].
#[derive(Debug, sqlx::FromRow)]
pub struct TradeRow {
    pub source: String,
    pub seq: i64,
    pub instrument: String,
    pub venue: String,
    pub ts_ns: i64,
    pub price: Decimal,
    pub qty: Decimal,
    pub side: String,
    pub trade_id: Option<String>,
    pub account: Option<String>,
    pub asset_class: String,
    pub currency: String,
    pub notional: Decimal,
    pub notional_usd: Decimal,
    pub ingest_ns: i64,
    pub enriched_ns: i64,
    pub stream_id: String,
}

/// A `quotes` row as selected by [`crate::history`].
#[derive(Debug, sqlx::FromRow)]
pub struct QuoteRow {
    pub source: String,
    pub seq: i64,
    pub instrument: String,
    pub venue: String,
    pub ts_ns: i64,
    pub bid: Decimal,
    pub ask: Decimal,
    pub bid_size: Decimal,
    pub ask_size: Decimal,
    pub asset_class: String,
    pub currency: String,
    pub mid: Decimal,
    pub spread: Decimal,
    pub ingest_ns: i64,
    pub enriched_ns: i64,
    pub stream_id: String,
}

/// History keeps the bare entry id; the cursor adds the shard the instrument maps
/// to, so history rows and live events carry cursors of one form.
fn row_cursor(stream_id: &str, instrument: &Symbol, shards: u16) -> CompactString {
    if stream_id.contains(':') {
        CompactString::from(stream_id)
    } else {
        cursor(
            tickgraph_ingest::stream::shard_of(instrument.as_str(), shards),
            stream_id,
        )
    }
}

fn header(
    source: &str,
    seq: i64,
    instrument: &str,
    venue: &str,
    ts_ns: i64,
) -> Result<Header, TickError> {
    let bad = |msg: String| TickError::BadRow {
        id: format!("{source}:{seq}"),
        msg,
    };
    Ok(Header {
        source: Source::parse(source).map_err(|e| bad(e.0))?,
        seq: u64::try_from(seq).map_err(|_| bad(format!("negative seq {seq}")))?,
        instrument: Symbol::parse(instrument).map_err(|e| bad(e.0))?,
        venue: Mic::parse(venue).map_err(|e| bad(e.0))?,
        ts: Timestamp::from_nanos_unchecked(ts_ns),
    })
}

impl TradeRow {
    pub fn into_tick(self, shards: u16) -> Result<TradeTick, TickError> {
        let h = header(
            &self.source,
            self.seq,
            &self.instrument,
            &self.venue,
            self.ts_ns,
        )?;
        let bad = |msg: String| TickError::BadRow {
            id: format!("{}:{}", self.source, self.seq),
            msg,
        };
        let side = match self.side.as_str() {
            "buy" => Side::Buy,
            "sell" => Side::Sell,
            other => return Err(bad(format!("unknown side {other:?}"))),
        };
        let trade_id = self
            .trade_id
            .as_deref()
            .map(TradeId::parse)
            .transpose()
            .map_err(|e| bad(e.0))?;
        let account = self
            .account
            .as_deref()
            .map(AccountId::parse)
            .transpose()
            .map_err(|e| bad(e.0))?;
        let asset_class = self.asset_class.parse().map_err(bad)?;
        Ok(TradeTick {
            cursor: row_cursor(&self.stream_id, &h.instrument, shards),
            trade: Trade {
                header: h,
                price: self.price,
                qty: self.qty,
                side,
                trade_id,
                account,
            },
            notional: self.notional,
            notional_usd: self.notional_usd,
            asset_class,
            currency: self.currency.into(),
            ingest_ns: self.ingest_ns,
            enriched_ns: self.enriched_ns,
            resume: None,
            json: JsonCache::default(),
        })
    }
}

impl QuoteRow {
    pub fn into_tick(self, shards: u16) -> Result<QuoteTick, TickError> {
        let h = header(
            &self.source,
            self.seq,
            &self.instrument,
            &self.venue,
            self.ts_ns,
        )?;
        let asset_class = self.asset_class.parse().map_err(|msg| TickError::BadRow {
            id: format!("{}:{}", self.source, self.seq),
            msg,
        })?;
        Ok(QuoteTick {
            cursor: row_cursor(&self.stream_id, &h.instrument, shards),
            quote: Quote {
                header: h,
                bid: self.bid,
                ask: self.ask,
                bid_size: self.bid_size,
                ask_size: self.ask_size,
            },
            mid: self.mid,
            spread: self.spread,
            asset_class,
            currency: self.currency.into(),
            ingest_ns: self.ingest_ns,
            enriched_ns: self.enriched_ns,
            resume: None,
            json: JsonCache::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).expect("decimal")
    }

    fn quote_record() -> EnrichedRecord {
        EnrichedRecord {
            event: Event::Quote(Quote {
                header: Header {
                    source: Source::parse("feed-1").expect("source"),
                    seq: 7,
                    instrument: Symbol::parse("AAPL").expect("symbol"),
                    venue: Mic::parse("XNAS").expect("mic"),
                    ts: Timestamp::from_nanos_unchecked(1_732_550_000_123_456_789),
                },
                bid: d("100.1"),
                ask: d("100.3"),
                bid_size: d("5"),
                ask_size: d("7"),
            }),
            ingest_ns: 1,
            enriched_ns: 2,
            asset_class: AssetClass::Equity,
            currency: "USD".into(),
            derived: Derived::Quote {
                mid: d("100.2"),
                spread: d("0.2"),
            },
        }
    }

    #[test]
    fn a_record_becomes_a_tick_of_its_kind() {
        let Ok(Tick::Quote(q)) = Tick::from_record(cursor(1, "5-0"), None, quote_record()) else {
            panic!("expected a quote tick");
        };
        assert_eq!(q.cursor, "1:5-0");
        assert_eq!(q.mid, d("100.2"));
        assert_eq!(q.instrument(), "AAPL");
        assert_eq!(q.side(), None);
    }

    #[test]
    fn mismatched_derived_fields_are_refused() {
        let mut r = quote_record();
        r.derived = Derived::Trade {
            notional: d("1"),
            notional_usd: d("1"),
        };
        let err = Tick::from_record(cursor(0, "1-0"), None, r).expect_err("mismatch");
        assert!(err.to_string().contains("feed-1:7"), "{err}");
    }

    #[test]
    fn history_rows_get_shard_qualified_cursors() {
        let row = QuoteRow {
            source: "feed-1".into(),
            seq: 7,
            instrument: "AAPL".into(),
            venue: "XNAS".into(),
            ts_ns: 1_732_550_000_000_000_000,
            bid: d("1"),
            ask: d("2"),
            bid_size: d("3"),
            ask_size: d("4"),
            asset_class: "equity".into(),
            currency: "USD".into(),
            mid: d("1.5"),
            spread: d("1"),
            ingest_ns: 0,
            enriched_ns: 0,
            stream_id: "1732550000000-5".into(),
        };
        let shard = tickgraph_ingest::stream::shard_of("AAPL", 16);
        let tick = row.into_tick(16).expect("valid row");
        assert_eq!(tick.cursor, format!("{shard}:1732550000000-5"));
    }

    #[test]
    fn history_rows_with_bad_values_are_refused() {
        let row = TradeRow {
            source: "feed-1".into(),
            seq: 1,
            instrument: "AAPL".into(),
            venue: "XNAS".into(),
            ts_ns: 1,
            price: d("1"),
            qty: d("1"),
            side: "short".into(),
            trade_id: None,
            account: None,
            asset_class: "equity".into(),
            currency: "USD".into(),
            notional: d("1"),
            notional_usd: d("1"),
            ingest_ns: 0,
            enriched_ns: 0,
            stream_id: "1-0".into(),
        };
        let err = row.into_tick(4).expect_err("bad side");
        assert!(err.to_string().contains("short"), "{err}");
    }
}
