//! The GraphQL output types shared by every domain: `Trade`, `Quote`,
//! `Instrument`, `Venue`, `Account`, `FxRate`, their enums and the `UInt64` scalar.
//!
//! `Trade` and `Quote` wrap the same `Arc`'d ticks the hub hands out, so a live
//! event is resolved straight from the shared decoded copy, and a history row
//! (converted to a tick) answers with exactly the same fields.

use std::sync::Arc;

use async_graphql::{
    Context, Enum, InputValueError, InputValueResult, Object, Result, Scalar, ScalarType,
    SimpleObject, Value, ID,
};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tickgraph_enrich::refdata;

use super::Services;
use crate::hub::ConflationField;
use crate::tick::{QuoteTick, TradeTick};

/// GraphQL `UInt64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UInt64(pub u64);

/// An unsigned 64-bit integer, as a decimal string so that JavaScript clients
/// keep every digit (their numbers are exact only up to 2^53).
#[Scalar(name = "UInt64")]
impl ScalarType for UInt64 {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::String(s) => s.parse().map(UInt64).map_err(InputValueError::custom),
            Value::Number(n) => n
                .as_u64()
                .map(UInt64)
                .ok_or_else(|| InputValueError::custom("expected a non-negative integer")),
            _ => Err(InputValueError::expected_type(value)),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

/// The kind of instrument.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "AssetClass", remote = "tickgraph_enrich::refdata::AssetClass")]
pub enum AssetClassKind {
    Equity,
    Etf,
    Fx,
    Future,
    Bond,
    Crypto,
}

/// The side of a trade, as its producer reported it.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "Side", remote = "tickgraph_ingest::Side")]
pub enum SideKind {
    Buy,
    Sell,
}

/// A field of a quote that a conflated `quotes` subscription (`maxRate`) may
/// keep one latest value per (`conflateBy`).
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "QuoteConflationField")]
pub enum QuoteConflationKind {
    Instrument,
    Venue,
    Source,
}

impl From<QuoteConflationKind> for ConflationField {
    fn from(k: QuoteConflationKind) -> Self {
        match k {
            QuoteConflationKind::Instrument => ConflationField::Instrument,
            QuoteConflationKind::Venue => ConflationField::Venue,
            QuoteConflationKind::Source => ConflationField::Source,
        }
    }
}

/// A field of a trade that a conflated `trades` subscription (`maxRate`) may
/// keep one latest value per (`conflateBy`).
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
#[graphql(name = "TradeConflationField")]
pub enum TradeConflationKind {
    Instrument,
    Venue,
    Source,
    Side,
}

impl From<TradeConflationKind> for ConflationField {
    fn from(k: TradeConflationKind) -> Self {
        match k {
            TradeConflationKind::Instrument => ConflationField::Instrument,
            TradeConflationKind::Venue => ConflationField::Venue,
            TradeConflationKind::Source => ConflationField::Source,
            TradeConflationKind::Side => ConflationField::Side,
        }
    }
}

/// Page order of history queries, by event time (ties by source, then seq).
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    /// Oldest first.
    #[default]
    Asc,
    /// Newest first.
    Desc,
}

fn time(ns: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(ns)
}

fn reference(ctx: &Context<'_>, symbol: &str) -> Result<Option<InstrumentNode>> {
    let refs = &ctx.data::<Services>()?.refs;
    let data = refs.read();
    Ok(data.instruments.get(symbol).cloned().map(InstrumentNode))
}

/// GraphQL `Trade`, over a tick shared with every other reader of it.
#[derive(Debug, Clone)]
pub struct TradeNode(pub Arc<TradeTick>);

/// An executed trade, enriched.
#[Object(name = "Trade")]
impl TradeNode {
    /// `source:seq`, the event's stable identity.
    async fn id(&self) -> ID {
        ID(self.0.trade.header.id())
    }

    /// The producer that sent the event.
    async fn source(&self) -> &str {
        self.0.trade.header.source.as_str()
    }

    /// The producer's sequence number; with `source` it identifies the event.
    async fn seq(&self) -> UInt64 {
        UInt64(self.0.trade.header.seq)
    }

    async fn instrument(&self) -> &str {
        self.0.trade.header.instrument.as_str()
    }

    /// MIC of the venue the trade happened on.
    async fn venue(&self) -> &str {
        self.0.trade.header.venue.as_str()
    }

    /// Event time, as the producer stamped it.
    async fn ts(&self) -> DateTime<Utc> {
        self.0.trade.header.ts.to_datetime()
    }

    async fn price(&self) -> Decimal {
        self.0.trade.price
    }

    async fn qty(&self) -> Decimal {
        self.0.trade.qty
    }

    async fn side(&self) -> SideKind {
        self.0.trade.side.into()
    }

    /// The venue's trade id, when the producer sent one.
    async fn trade_id(&self) -> Option<&str> {
        self.0.trade.trade_id.as_ref().map(|t| t.as_str())
    }

    async fn account(&self) -> Option<&str> {
        self.0.trade.account.as_ref().map(|a| a.as_str())
    }

    /// price x qty, in `currency`.
    async fn notional(&self) -> Decimal {
        self.0.notional
    }

    /// `notional` in US dollars at the FX rate enrich used.
    async fn notional_usd(&self) -> Decimal {
        self.0.notional_usd
    }

    /// ISO 4217 currency of the instrument's prices.
    async fn currency(&self) -> &str {
        &self.0.currency
    }

    async fn asset_class(&self) -> AssetClassKind {
        self.0.asset_class.into()
    }

    /// When ingest accepted the event.
    async fn ingested_at(&self) -> DateTime<Utc> {
        time(self.0.ingest_ns)
    }

    /// When enrich wrote the enriched event.
    async fn enriched_at(&self) -> DateTime<Utc> {
        time(self.0.enriched_ns)
    }

    /// The instrument's current reference data; null when it has been removed.
    async fn reference(&self, ctx: &Context<'_>) -> Result<Option<InstrumentNode>> {
        reference(ctx, self.0.trade.header.instrument.as_str())
    }

    /// Position in the enriched streams, `<shard>:<entry id>.<index in the entry>`,
    /// e.g. `2:1732550000000-5.17` (events loaded before batching: no `.<index>`).
    async fn cursor(&self) -> &str {
        &self.0.cursor
    }

    /// On a subscription's events: pass it as the `after` argument of a new
    /// subscription with the same filters to receive, in order, every event this
    /// one would have sent after this event (none twice). Null on query results.
    async fn resume(&self) -> Option<String> {
        self.0
            .resume
            .as_deref()
            .and_then(|r| r.cursor(&self.0.cursor))
    }
}

/// GraphQL `Quote`, over a tick shared with every other reader of it.
#[derive(Debug, Clone)]
pub struct QuoteNode(pub Arc<QuoteTick>);

/// A bid/ask quote, enriched.
#[Object(name = "Quote")]
impl QuoteNode {
    /// `source:seq`, the event's stable identity.
    async fn id(&self) -> ID {
        ID(self.0.quote.header.id())
    }

    /// The producer that sent the event.
    async fn source(&self) -> &str {
        self.0.quote.header.source.as_str()
    }

    /// The producer's sequence number; with `source` it identifies the event.
    async fn seq(&self) -> UInt64 {
        UInt64(self.0.quote.header.seq)
    }

    async fn instrument(&self) -> &str {
        self.0.quote.header.instrument.as_str()
    }

    /// MIC of the quoting venue.
    async fn venue(&self) -> &str {
        self.0.quote.header.venue.as_str()
    }

    /// Event time, as the producer stamped it.
    async fn ts(&self) -> DateTime<Utc> {
        self.0.quote.header.ts.to_datetime()
    }

    async fn bid(&self) -> Decimal {
        self.0.quote.bid
    }

    async fn ask(&self) -> Decimal {
        self.0.quote.ask
    }

    async fn bid_size(&self) -> Decimal {
        self.0.quote.bid_size
    }

    async fn ask_size(&self) -> Decimal {
        self.0.quote.ask_size
    }

    /// (bid + ask) / 2.
    async fn mid(&self) -> Decimal {
        self.0.mid
    }

    /// ask - bid.
    async fn spread(&self) -> Decimal {
        self.0.spread
    }

    /// ISO 4217 currency of the instrument's prices.
    async fn currency(&self) -> &str {
        &self.0.currency
    }

    async fn asset_class(&self) -> AssetClassKind {
        self.0.asset_class.into()
    }

    /// When ingest accepted the event.
    async fn ingested_at(&self) -> DateTime<Utc> {
        time(self.0.ingest_ns)
    }

    /// When enrich wrote the enriched event.
    async fn enriched_at(&self) -> DateTime<Utc> {
        time(self.0.enriched_ns)
    }

    /// The instrument's current reference data; null when it has been removed.
    async fn reference(&self, ctx: &Context<'_>) -> Result<Option<InstrumentNode>> {
        reference(ctx, self.0.quote.header.instrument.as_str())
    }

    /// Position in the enriched streams, `<shard>:<entry id>.<index in the entry>`,
    /// e.g. `2:1732550000000-5.17` (events loaded before batching: no `.<index>`).
    async fn cursor(&self) -> &str {
        &self.0.cursor
    }

    /// On a subscription's events: pass it as the `after` argument of a new
    /// subscription with the same filters to receive, in order, every event this
    /// one would have sent after this event (none twice). Null on query results.
    async fn resume(&self) -> Option<String> {
        self.0
            .resume
            .as_deref()
            .and_then(|r| r.cursor(&self.0.cursor))
    }
}

/// GraphQL `Instrument`.
#[derive(Debug, Clone)]
pub struct InstrumentNode(pub refdata::Instrument);

/// A tradable instrument's reference data.
#[Object(name = "Instrument")]
impl InstrumentNode {
    async fn symbol(&self) -> &str {
        &self.0.symbol
    }

    async fn name(&self) -> &str {
        &self.0.name
    }

    async fn asset_class(&self) -> AssetClassKind {
        self.0.asset_class.into()
    }

    /// ISO 4217 currency of the instrument's prices.
    async fn currency(&self) -> &str {
        &self.0.currency
    }

    /// MIC of the primary listing.
    async fn venue(&self) -> &str {
        &self.0.venue
    }

    /// The primary listing venue's reference data.
    async fn listing_venue(&self, ctx: &Context<'_>) -> Result<Option<VenueNode>> {
        let refs = &ctx.data::<Services>()?.refs;
        let data = refs.read();
        Ok(data.venues.get(&self.0.venue).map(VenueNode::from))
    }

    async fn tick_size(&self) -> Decimal {
        self.0.tick_size
    }

    async fn lot_size(&self) -> Decimal {
        self.0.lot_size
    }

    async fn sector(&self) -> Option<&str> {
        self.0.sector.as_deref()
    }

    async fn isin(&self) -> Option<&str> {
        self.0.isin.as_deref()
    }
}

/// A trading venue.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(name = "Venue")]
pub struct VenueNode {
    /// ISO 10383 market identifier code.
    pub mic: String,
    pub name: String,
    /// ISO 3166-1 alpha-2 country code.
    pub country: String,
    /// IANA time zone, e.g. `Europe/London`.
    pub timezone: String,
}

impl From<&refdata::Venue> for VenueNode {
    fn from(v: &refdata::Venue) -> Self {
        Self {
            mic: v.mic.clone(),
            name: v.name.clone(),
            country: v.country.clone(),
            timezone: v.timezone.clone(),
        }
    }
}

/// A trading account.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(name = "Account")]
pub struct AccountNode {
    pub id: String,
    pub desk: String,
    pub owner: String,
}

impl From<&refdata::Account> for AccountNode {
    fn from(a: &refdata::Account) -> Self {
        Self {
            id: a.id.clone(),
            desk: a.desk.clone(),
            owner: a.owner.clone(),
        }
    }
}

/// What one unit of a currency is worth in US dollars.
#[derive(SimpleObject, Debug, Clone)]
pub struct FxRate {
    /// ISO 4217 currency code.
    pub currency: String,
    pub usd_rate: Decimal,
}
