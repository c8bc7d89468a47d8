//! The live path's resolvers. A subscription resolves its selection once per
//! event per subscriber, so at tens of thousands of events a second the generic
//! resolver machinery (a boxed future per field, a context per field) was the
//! largest cost of the API: 5.6 to 13.4 µs per event per subscriber.
//!
//! [`LiveTrade`] and [`LiveQuote`] are the `Trade` and `Quote` types of the
//! subscriptions. When a selection is only plain leaf fields (any aliases, no
//! directives, no fragments, no arguments) they build the value straight from
//! the tick; anything else (`reference`, `@skip`, fragments) goes to the
//! `#[Object]` resolvers of [`TradeNode`] and [`QuoteNode`], which stay the one
//! definition of the types in the schema. Both paths give identical values: the
//! tests compare them field by field. A plain selection's object is made once
//! per event and selection and shared by every subscriber that selects the same
//! fields ([`crate::shared_json`]).

use std::borrow::Cow;
use std::sync::Arc;

use async_graphql::indexmap::IndexMap;
use async_graphql::parser::types::{Field, Selection, SelectionSet};
use async_graphql::registry::Registry;
use async_graphql::resolver_utils::enum_value;
use async_graphql::{ContextSelectionSet, OutputType, Positioned, ServerResult, Value};
use rust_decimal::Decimal;
use tickgraph_ingest::event::Header;

use super::types::{AssetClassKind, QuoteNode, SideKind, TradeNode};
use crate::resume::ResumeBase;
use crate::shared_json::{JsonCache, SelectionKey};
use crate::tick::{QuoteTick, TradeTick};
use bytes::Bytes;

/// A value for a leaf field by its schema name, or `None` when the field is not
/// a plain leaf of the type (it needs the full resolver).
trait Leaves {
    fn leaf(&self, name: &str) -> Option<Value>;
    /// The tick's JSON per selection, shared by its subscribers.
    fn json(&self) -> &JsonCache;
}

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn decimal(d: &Decimal) -> Value {
    Value::String(d.to_string())
}

fn nanos(ns: i64) -> Value {
    Value::String(chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339())
}

fn resume(base: Option<&ResumeBase>, cursor: &str) -> Value {
    base.and_then(|b| b.cursor(cursor))
        .map_or(Value::Null, Value::String)
}

/// Fields every live event has, from its header and enrichment.
fn common(h: &Header, name: &str) -> Option<Value> {
    Some(match name {
        "id" => Value::String(h.id()),
        "source" => string(h.source.as_str()),
        "seq" => Value::String(h.seq.to_string()),
        "instrument" => string(h.instrument.as_str()),
        "venue" => string(h.venue.as_str()),
        "ts" => Value::String(h.ts.to_datetime().to_rfc3339()),
        _ => return None,
    })
}

impl Leaves for TradeTick {
    fn json(&self) -> &JsonCache {
        &self.json
    }

    fn leaf(&self, name: &str) -> Option<Value> {
        let t = &self.trade;
        Some(match name {
            "price" => decimal(&t.price),
            "qty" => decimal(&t.qty),
            "side" => enum_value(SideKind::from(t.side)),
            "tradeId" => t
                .trade_id
                .as_ref()
                .map_or(Value::Null, |x| string(x.as_str())),
            "account" => t
                .account
                .as_ref()
                .map_or(Value::Null, |x| string(x.as_str())),
            "notional" => decimal(&self.notional),
            "notionalUsd" => decimal(&self.notional_usd),
            "currency" => string(&self.currency),
            "assetClass" => enum_value(AssetClassKind::from(self.asset_class)),
            "ingestedAt" => nanos(self.ingest_ns),
            "enrichedAt" => nanos(self.enriched_ns),
            "cursor" => string(&self.cursor),
            "resume" => resume(self.resume.as_deref(), &self.cursor),
            _ => return common(&t.header, name),
        })
    }
}

impl Leaves for QuoteTick {
    fn json(&self) -> &JsonCache {
        &self.json
    }

    fn leaf(&self, name: &str) -> Option<Value> {
        let q = &self.quote;
        Some(match name {
            "bid" => decimal(&q.bid),
            "ask" => decimal(&q.ask),
            "bidSize" => decimal(&q.bid_size),
            "askSize" => decimal(&q.ask_size),
            "mid" => decimal(&self.mid),
            "spread" => decimal(&self.spread),
            "currency" => string(&self.currency),
            "assetClass" => enum_value(AssetClassKind::from(self.asset_class)),
            "ingestedAt" => nanos(self.ingest_ns),
            "enrichedAt" => nanos(self.enriched_ns),
            "cursor" => string(&self.cursor),
            "resume" => resume(self.resume.as_deref(), &self.cursor),
            _ => return common(&q.header, name),
        })
    }
}

/// Leaf fields of `Trade`: what [`Leaves::leaf`] answers for a trade.
pub(crate) const TRADE_LEAVES: &[&str] = &[
    "id",
    "source",
    "seq",
    "instrument",
    "venue",
    "ts",
    "price",
    "qty",
    "side",
    "tradeId",
    "account",
    "notional",
    "notionalUsd",
    "currency",
    "assetClass",
    "ingestedAt",
    "enrichedAt",
    "cursor",
    "resume",
    "__typename",
];
/// Leaf fields of `Quote`: what [`Leaves::leaf`] answers for a quote.
pub(crate) const QUOTE_LEAVES: &[&str] = &[
    "id",
    "source",
    "seq",
    "instrument",
    "venue",
    "ts",
    "bid",
    "ask",
    "bidSize",
    "askSize",
    "mid",
    "spread",
    "currency",
    "assetClass",
    "ingestedAt",
    "enrichedAt",
    "cursor",
    "resume",
    "__typename",
];

/// The shared JSON of a trade for a plain selection (see [`crate::shared_json`]).
pub(crate) fn trade_json(
    t: &TradeTick,
    key: &SelectionKey,
    set: &Positioned<SelectionSet>,
) -> Option<Bytes> {
    t.json.get_or_make_keyed(key, || plain(t, "Trade", set))
}

/// The shared JSON of a quote for a plain selection (see [`crate::shared_json`]).
pub(crate) fn quote_json(
    q: &QuoteTick,
    key: &SelectionKey,
    set: &Positioned<SelectionSet>,
) -> Option<Bytes> {
    q.json.get_or_make_keyed(key, || plain(q, "Quote", set))
}

/// The object for `set` when it is only plain leaf fields; `None` sends the
/// caller to the full resolver. The document has passed validation, so every
/// field exists and fields sharing a response key are the same field.
fn plain<T: Leaves>(tick: &T, type_name: &str, set: &Positioned<SelectionSet>) -> Option<Value> {
    let mut out = IndexMap::with_capacity(set.node.items.len());
    for item in &set.node.items {
        let Selection::Field(field) = &item.node else {
            return None;
        };
        let Field {
            alias,
            name,
            arguments,
            directives,
            selection_set,
        } = &field.node;
        if !arguments.is_empty() || !directives.is_empty() || !selection_set.node.items.is_empty() {
            return None;
        }
        let value = match name.node.as_str() {
            "__typename" => string(type_name),
            other => tick.leaf(other)?,
        };
        let key = alias.as_ref().unwrap_or(name).node.clone();
        out.insert(key, value);
    }
    Some(Value::Object(out))
}

/// A subscription's output type over the ticks of one kind: plain selections are
/// built by [`plain`], anything else by the `#[Object]` type `$node`, whose name
/// and schema entry it shares.
macro_rules! live_type {
    ($(#[$doc:meta])* $name:ident, $tick:ty, $node:ident, $type_name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name(pub Arc<$tick>);

        impl OutputType for $name {
            fn type_name() -> Cow<'static, str> {
                <$node as OutputType>::type_name()
            }

            fn create_type_info(registry: &mut Registry) -> String {
                <$node as OutputType>::create_type_info(registry)
            }

            async fn resolve(
                &self,
                ctx: &ContextSelectionSet<'_>,
                field: &Positioned<Field>,
            ) -> ServerResult<Value> {
                // Made once per tick and selection, whatever the number of
                // subscribers: see `crate::shared_json`.
                let shared = self
                    .0
                    .json()
                    .get_or_make(ctx.item, || plain(&*self.0, $type_name, ctx.item));
                match shared {
                    Some(json) => Ok(Value::Binary(json)),
                    None => $node(self.0.clone()).resolve(ctx, field).await,
                }
            }
        }
    };
}

live_type!(
    /// `Trade` as a subscription yields it.
    LiveTrade,
    TradeTick,
    TradeNode,
    "Trade"
);
live_type!(
    /// `Quote` as a subscription yields it.
    LiveQuote,
    QuoteTick,
    QuoteNode,
    "Quote"
);
