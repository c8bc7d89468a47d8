//! The enriched stream entry: what enrich writes, and what the loader and the API
//! read. Encoded as positional MessagePack arrays (maps with field names before
//! 11-27, which still read); an entry's `e` field holds an array of them,
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
    /// A positional MessagePack array, as raw records are (see
    /// `tickgraph_ingest::stream::RawRecord::encode`); the map form written
    /// before still reads.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        Ok(rmp_serde::to_vec(self)?)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }

    /// One enriched batch entry: a MessagePack array of records, in order (read
    /// back with [`tickgraph_ingest::stream::decode_entry`]).
    pub fn encode_batch(records: &[Self]) -> Result<Vec<u8>, CodecError> {
        Ok(rmp_serde::to_vec(records)?)
    }
}

#[cfg(test)]
mod tests {
    use tickgraph_ingest::stream::decode_entry;

    use super::*;

    fn quote() -> EnrichedRecord {
        serde_json::from_value(serde_json::json!({
            "event": {"quote": {
                "header": {"source": "s", "seq": 9, "instrument": "VOD.L",
                           "venue": "XLON", "ts": 1},
                "bid": "72.34", "ask": "72.36", "bid_size": "100", "ask_size": "200"}},
            "ingest_ns": 2, "enriched_ns": 3, "asset_class": "equity", "currency": "GBP",
            "derived": {"quote": {"mid": "72.35", "spread": "0.02"}}
        }))
        .expect("an enriched quote")
    }

    #[test]
    fn batches_are_positional_and_the_named_form_still_reads() {
        let rec = quote();
        let positional = EnrichedRecord::encode_batch(std::slice::from_ref(&rec)).expect("encodes");
        let named = rmp_serde::to_vec_named(&[&rec]).expect("encodes");
        assert!(positional.len() * 2 < named.len(), "names were most of it");
        for bytes in [&positional, &named] {
            let back: Vec<EnrichedRecord> = decode_entry(bytes).expect("decodes");
            assert_eq!(back, vec![rec.clone()]);
        }
        // One record alone, from before batching: a map.
        let single = rmp_serde::to_vec_named(&rec).expect("encodes");
        let back: Vec<EnrichedRecord> = decode_entry(&single).expect("decodes");
        assert_eq!(back, vec![rec]);
    }
}
