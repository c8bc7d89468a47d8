//! The enriched stream entry: what enrich writes, and what the loader and the API
//! read. Encoded as named MessagePack; an entry's `e` field holds an array of them,
//! one per event of the raw entry it came from (see `tickgraph_ingest::stream`).

use compact_str::CompactString;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tickgraph_ingest::stream::CodecError;
use tickgraph_ingest::Event;

use crate::refdata::AssetClass;

/// An accepted event joined with its reference data and derived fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrichedRecord {
    pub event: Event,
    /// When ingest received the event (epoch ns); carried for end-to-end latency.
    pub ingest_ns: i64,
    /// When enrich wrote it (epoch ns).
    pub enriched_ns: i64,
    pub asset_class: AssetClass,
    /// ISO 4217 currency of the instrument's prices.
    pub currency: CompactString,
    pub derived: Derived,
}

/// Fields computed by enrich.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Derived {
    Trade {
        /// price x qty, in the instrument's currency.
        #[serde(with = "tickgraph_ingest::decimal")]
        notional: Decimal,
        /// notional x the currency's USD rate.
        #[serde(with = "tickgraph_ingest::decimal")]
        notional_usd: Decimal,
    },
    Quote {
        /// (bid + ask) / 2.
        #[serde(with = "tickgraph_ingest::decimal")]
        mid: Decimal,
        /// ask - bid.
        #[serde(with = "tickgraph_ingest::decimal")]
        spread: Decimal,
    },
}

impl EnrichedRecord {
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }

    /// One enriched batch entry: a MessagePack array of records, in order (read
    /// back with [`tickgraph_ingest::stream::decode_entry`]).
    pub fn encode_batch(records: &[Self]) -> Result<Vec<u8>, CodecError> {
        Ok(rmp_serde::to_vec_named(records)?)
    }
}
