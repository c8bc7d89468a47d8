//! The enriched stream entry: what enrich writes, and what the loader and the API
//! read. Encoded as positional MessagePack arrays (maps with field names before
//! 11-26g, which still read); an entry's `e` field holds an array of them,
//! one per event of the raw entry it came from (see `tickgraph_ingest::stream`).

use compact_str::CompactString;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tickgraph_ingest::fast_decode::{put, FastDecode, Fields, Reader};
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

/// The fast path of `decode_entry::<EnrichedRecord>` (the api hub and the
/// loader decode every event): the shape `encode` writes, anything else `None`,
/// so that serde reads it (see `tickgraph_ingest::fast_decode`).
impl FastDecode for EnrichedRecord {
    fn fast_decode(r: &mut Reader<'_>) -> Option<Self> {
        let n = match r.fields(6)? {
            Fields::ByPosition => {
                return Some(EnrichedRecord {
                    event: Event::fast_decode(r)?,
                    ingest_ns: r.i64()?,
                    enriched_ns: r.i64()?,
                    asset_class: asset_class_of(r)?,
                    currency: r.compact_str()?,
                    derived: Derived::fast_decode(r)?,
                })
            }
            Fields::ByName(n) => n,
        };
        let (mut event, mut ingest_ns, mut enriched_ns) = (None, None, None);
        let (mut asset_class, mut currency, mut derived) = (None, None, None);
        for _ in 0..n {
            match r.name()? {
                b"event" => put(&mut event, Event::fast_decode(r))?,
                b"ingest_ns" => put(&mut ingest_ns, r.i64())?,
                b"enriched_ns" => put(&mut enriched_ns, r.i64())?,
                b"asset_class" => put(&mut asset_class, asset_class_of(r))?,
                b"currency" => put(&mut currency, r.compact_str())?,
                b"derived" => put(&mut derived, Derived::fast_decode(r))?,
                _ => return None,
            }
        }
        Some(EnrichedRecord {
            event: event?,
            ingest_ns: ingest_ns?,
            enriched_ns: enriched_ns?,
            asset_class: asset_class?,
            currency: currency?,
            derived: derived?,
        })
    }
}

/// A unit variant, as serde writes it: its name alone.
fn asset_class_of(r: &mut Reader<'_>) -> Option<AssetClass> {
    Some(match r.name()? {
        b"equity" => AssetClass::Equity,
        b"etf" => AssetClass::Etf,
        b"fx" => AssetClass::Fx,
        b"future" => AssetClass::Future,
        b"bond" => AssetClass::Bond,
        b"crypto" => AssetClass::Crypto,
        _ => return None,
    })
}

/// Externally tagged: a map of one pair, variant name to its fields.
impl FastDecode for Derived {
    fn fast_decode(r: &mut Reader<'_>) -> Option<Self> {
        if r.map_len()? != 1 {
            return None;
        }
        match r.name()? {
            b"trade" => {
                let (notional, notional_usd) = two_decimals(r, b"notional", b"notional_usd")?;
                Some(Derived::Trade {
                    notional,
                    notional_usd,
                })
            }
            b"quote" => {
                let (mid, spread) = two_decimals(r, b"mid", b"spread")?;
                Some(Derived::Quote { mid, spread })
            }
            _ => None,
        }
    }
}

/// The fields of a struct variant of two decimals named `first` and `second`.
fn two_decimals(r: &mut Reader<'_>, first: &[u8], second: &[u8]) -> Option<(Decimal, Decimal)> {
    let n = match r.fields(2)? {
        Fields::ByPosition => return Some((r.decimal()?, r.decimal()?)),
        Fields::ByName(n) => n,
    };
    let (mut a, mut b) = (None, None);
    for _ in 0..n {
        match r.name()? {
            k if k == first => put(&mut a, r.decimal())?,
            k if k == second => put(&mut b, r.decimal())?,
            _ => return None,
        }
    }
    Some((a?, b?))
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
