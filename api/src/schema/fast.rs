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

use async_graphql::parser::types::Field;
use async_graphql::registry::Registry;
use async_graphql::resolver_utils::EnumType;
use async_graphql::{ContextSelectionSet, OutputType, Positioned, ServerResult, Value};
use rust_decimal::Decimal;
use tickgraph_enrich::refdata::AssetClass;
use tickgraph_ingest::event::Header;

use super::types::{AssetClassKind, QuoteNode, SideKind, TradeNode};
use crate::resume::ResumeBase;
use crate::shared_json::{binary, JsonCache, SelectionKey};
use crate::tick::{QuoteTick, TradeTick};

/// Writes a leaf field's JSON value by its schema name; `None` when the field is
/// not a plain leaf of the type (it needs the full resolver). Written straight
/// into the output, as `serde_json` would write the `Value` the full resolver
/// gives: no value tree and, but for timestamps and resume cursors, no
/// string per field.
trait Leaves {
    fn write_leaf(&self, name: &str, out: &mut String) -> Option<()>;
    /// The tick's JSON per selection, shared by its subscribers.
    fn json(&self) -> &JsonCache;
}

/// A JSON string, escaped as `serde_json` escapes it.
fn string(out: &mut String, s: &str) {
    out.push('"');
    escaped(out, s);
    out.push('"');
}

/// The inside of a JSON string: `"`, `\` and control characters escaped
/// exactly as `serde_json` escapes them (short forms where JSON has them,
/// else `\u00xx`).
fn escaped(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let short = match b {
            b'"' => '"',
            b'\\' => '\\',
            0x08 => 'b',
            0x0c => 'f',
            b'\n' => 'n',
            b'\r' => 'r',
            b'\t' => 't',
            0x00..=0x1f => '\0',
            _ => continue,
        };
        // `i` is an ASCII byte's index, so a character boundary.
        out.push_str(&s[start..i]);
        start = i + 1;
        out.push('\\');
        if short == '\0' {
            out.push_str("u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push(short);
        }
    }
    out.push_str(&s[start..]);
}

/// A JSON string of what `v` displays, which needs no escaping (digits, signs,
/// dots, dashes, colons and letters: decimals, integers, timestamps).
fn display(out: &mut String, v: impl std::fmt::Display) {
    use std::fmt::Write;
    out.push('"');
    // Writing to a String cannot fail.
    let _ = write!(out, "{v}");
    out.push('"');
}

fn decimal(out: &mut String, d: &Decimal) {
    display(out, d);
}

fn nanos(out: &mut String, ns: i64) {
    display(out, chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339());
}

fn null(out: &mut String) {
    out.push_str("null");
}

/// A GraphQL enum value: its name, as the schema spells it, as a JSON string.
fn enum_name<E: EnumType>(out: &mut String, value: E) {
    match E::items().iter().find(|i| i.value == value) {
        Some(item) => string(out, item.name),
        None => null(out),
    }
}

fn resume(out: &mut String, base: Option<&ResumeBase>, cursor: &str) {
    match base.and_then(|b| b.cursor(cursor)) {
        Some(c) => string(out, &c),
        None => null(out),
    }
}

fn optional(out: &mut String, v: Option<&str>) {
    match v {
        Some(s) => string(out, s),
        None => null(out),
    }
}

/// Fields every live event has, from its header and enrichment.
fn common(h: &Header, name: &str, out: &mut String) -> Option<()> {
    match name {
        "id" => {
            out.push('"');
            escaped(out, h.source.as_str());
            display_raw(out, format_args!(":{}", h.seq));
            out.push('"');
        }
        "source" => string(out, h.source.as_str()),
        "seq" => display(out, h.seq),
        "instrument" => string(out, h.instrument.as_str()),
        "venue" => string(out, h.venue.as_str()),
        "ts" => nanos(out, h.ts.nanos()),
        _ => return None,
    }
    Some(())
}

fn display_raw(out: &mut String, v: std::fmt::Arguments<'_>) {
    use std::fmt::Write;
    // Writing to a String cannot fail.
    let _ = out.write_fmt(v);
}

/// What enrich and the stream add to both kinds of tick.
struct Enrichment<'a> {
    currency: &'a str,
    asset_class: AssetClass,
    ingest_ns: i64,
    enriched_ns: i64,
    cursor: &'a str,
    resume: Option<&'a ResumeBase>,
}

impl Enrichment<'_> {
    /// Its fields, else the header's ([`common`]).
    fn write(&self, h: &Header, name: &str, out: &mut String) -> Option<()> {
        match name {
            "currency" => string(out, self.currency),
            "assetClass" => enum_name(out, AssetClassKind::from(self.asset_class)),
            "ingestedAt" => nanos(out, self.ingest_ns),
            "enrichedAt" => nanos(out, self.enriched_ns),
            "cursor" => string(out, self.cursor),
            "resume" => resume(out, self.resume, self.cursor),
            _ => return common(h, name, out),
        }
        Some(())
    }
}

macro_rules! enrichment {
    ($tick:ty) => {
        impl $tick {
            fn enrichment(&self) -> Enrichment<'_> {
                Enrichment {
                    currency: &self.currency,
                    asset_class: self.asset_class,
                    ingest_ns: self.ingest_ns,
                    enriched_ns: self.enriched_ns,
                    cursor: &self.cursor,
                    resume: self.resume.as_deref(),
                }
            }
        }
    };
}

enrichment!(TradeTick);
enrichment!(QuoteTick);

impl Leaves for TradeTick {
    fn json(&self) -> &JsonCache {
        &self.json
    }

    fn write_leaf(&self, name: &str, out: &mut String) -> Option<()> {
        let t = &self.trade;
        match name {
            "price" => decimal(out, &t.price),
            "qty" => decimal(out, &t.qty),
            "side" => enum_name(out, SideKind::from(t.side)),
            "tradeId" => optional(out, t.trade_id.as_ref().map(|x| x.as_str())),
            "account" => optional(out, t.account.as_ref().map(|x| x.as_str())),
            "notional" => decimal(out, &self.notional),
            "notionalUsd" => decimal(out, &self.notional_usd),
            _ => return self.enrichment().write(&t.header, name, out),
        }
        Some(())
    }
}

impl Leaves for QuoteTick {
    fn json(&self) -> &JsonCache {
        &self.json
    }

    fn write_leaf(&self, name: &str, out: &mut String) -> Option<()> {
        let q = &self.quote;
        match name {
            "bid" => decimal(out, &q.bid),
            "ask" => decimal(out, &q.ask),
            "bidSize" => decimal(out, &q.bid_size),
            "askSize" => decimal(out, &q.ask_size),
            "mid" => decimal(out, &self.mid),
            "spread" => decimal(out, &self.spread),
            _ => return self.enrichment().write(&q.header, name, out),
        }
        Some(())
    }
}

/// Leaf fields of `Trade`: what [`Leaves::write_leaf`] answers for a trade.
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
/// Leaf fields of `Quote`: what [`Leaves::write_leaf`] answers for a quote.
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
pub(crate) fn trade_json(t: &TradeTick, key: &SelectionKey) -> Option<Arc<str>> {
    t.json.get_or_make(key, || plain(t, "Trade", key))
}

/// The shared JSON of a quote for a plain selection (see [`crate::shared_json`]).
pub(crate) fn quote_json(q: &QuoteTick, key: &SelectionKey) -> Option<Arc<str>> {
    q.json.get_or_make(key, || plain(q, "Quote", key))
}

/// The JSON object for the plain selection `key`; `None` when a field is not a
/// plain leaf of the type, which sends the caller to the full resolver. The
/// text is what `serde_json` makes of the value the full resolver gives; the
/// tests compare the two, byte for byte, for every field.
fn plain<T: Leaves>(tick: &T, type_name: &str, key: &SelectionKey) -> Option<String> {
    let fields = key.fields();
    let mut out = String::with_capacity(32 + 40 * fields.len());
    out.push('{');
    for (response_key, name) in fields {
        if out.len() > 1 {
            out.push(',');
        }
        string(&mut out, response_key);
        out.push(':');
        match name.as_str() {
            "__typename" => string(&mut out, type_name),
            other => tick.write_leaf(other, &mut out)?,
        }
    }
    out.push('}');
    Some(out)
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
                let shared = SelectionKey::of(ctx.item).and_then(|key| {
                    self.0
                        .json()
                        .get_or_make(&key, || plain(&*self.0, $type_name, &key))
                });
                match shared {
                    Some(json) => Ok(binary(json)),
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

#[cfg(test)]
mod tests {
    use async_graphql::resolver_utils::enum_value;

    use super::*;

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut every_control: String = (0u8..0x20).map(char::from).collect();
        every_control.push_str("\"\\/\u{7f}é€😀 plain");
        for s in [
            "",
            "AAPL",
            "a\"b",
            "back\\slash",
            "tab\tnew\nline",
            &every_control,
        ] {
            let mut out = String::new();
            string(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).expect("json"), "{s:?}");
        }
    }

    #[test]
    fn enum_values_are_the_names_the_schema_gives_them() {
        let expected = |v: async_graphql::Value| serde_json::to_string(&v).expect("json");
        for side in [SideKind::Buy, SideKind::Sell] {
            let mut out = String::new();
            enum_name(&mut out, side);
            assert_eq!(out, expected(enum_value(side)));
        }
        for class in [
            AssetClassKind::Equity,
            AssetClassKind::Etf,
            AssetClassKind::Fx,
            AssetClassKind::Future,
            AssetClassKind::Bond,
            AssetClassKind::Crypto,
        ] {
            let mut out = String::new();
            enum_name(&mut out, class);
            assert_eq!(out, expected(enum_value(class)));
        }
    }
}
