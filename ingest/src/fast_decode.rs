//! A hand-written decoder for the record field of raw and enriched stream
//! entries, the fast path of [`crate::stream::decode_entry`].
//!
//! Decoding those entries with `rmp_serde` was about a fifth of tickgraph's CPU
//! at 100,000 events/s: the api hub, the history loader and enrich each decode
//! every event, and serde's generic path UTF-8-validates every map key and runs
//! it through an identifier visitor. Here keys are matched as raw bytes (only
//! values that become strings are validated) and the structs are built directly.
//! Per event of a demo entry with named records (the form written before
//! 11-26g), callgrind counts 2,549 instructions against 4,809 for a raw record
//! and 3,758 against 7,141 for an enriched one
//! (`enrich/examples/decode_entry_cost.rs`); Criterion's `decode_entry` benches
//! went 55% (raw) and 61% (enriched) faster, the api hub's decode step 38%.
//! With positional records (11-26g), the same count: 1,835 against 3,073
//! instructions per raw record, 2,658 against 4,378 per enriched one; against
//! named records through serde, as entries were read before 11-26g, 62-63%
//! fewer.
//!
//! It reads the shapes our writers produce (positional arrays since 11-26g,
//! maps with field names before; decimals as `[mantissa, scale]` or text, the
//! text form of older entries too) and nothing else, save what serde reads the same way anyway:
//! fields in any order, integers of any width. Anything unexpected (an unknown or repeated key, another type, a missing
//! field, trailing bytes, the older shapes serde also reads) makes it answer
//! `None`, "not mine", and the caller decodes the whole entry with `rmp_serde`
//! instead. So every entry decodes to what serde gives, and every entry serde
//! refuses is refused with serde's error. Two rules keep that true:
//! - a value is read exactly as its serde impl reads it: transparent newtypes
//!   without their `parse` checks, integers range-checked as serde's visitors
//!   check them, decimals as [`crate::decimal`] reads them;
//! - the slice must be consumed to its end, as entries end where records end.

use compact_str::CompactString;
use rmp::Marker;
use rust_decimal::Decimal;

use crate::decimal::MAX_SCALE;
use crate::event::{
    AccountId, Event, Header, Mic, Quote, Side, Source, Symbol, Timestamp, Trade, TradeId,
};
use crate::stream::{is_batch, RawRecord};

#[cfg(test)]
mod tests;

/// A record we can decode by hand. `None` means "not a shape we write": the
/// caller falls back to `rmp_serde` for the whole entry.
pub trait FastDecode: Sized {
    fn fast_decode(r: &mut Reader<'_>) -> Option<Self>;
}

/// An encoded record is never shorter than this (by position, with every
/// string empty, it still takes about 30 bytes), so a batch's length prefix
/// cannot make us reserve more records than its bytes could hold.
const MIN_RECORD_BYTES: usize = 16;

/// An entry's records by the fast path, or `None` when the entry is not exactly
/// what our writers produce. [`crate::stream::decode_entry`] tries this first;
/// tests assert it is `Some` for the shapes we write.
pub fn try_fast<T: FastDecode>(bytes: &[u8]) -> Option<Vec<T>> {
    let mut r = Reader::new(bytes);
    let records = if is_batch(bytes) {
        let n = r.array_len()?;
        let room = r.rest.len() / MIN_RECORD_BYTES;
        let mut records = Vec::with_capacity((n as usize).min(room));
        for _ in 0..n {
            records.push(T::fast_decode(&mut r)?);
        }
        records
    } else {
        vec![T::fast_decode(&mut r)?]
    };
    r.rest.is_empty().then_some(records)
}

/// Puts a field's value in its slot. A second value for the same field (a key
/// repeated, which serde refuses) or no value is not ours.
pub fn put<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    match value {
        Some(v) if slot.is_none() => {
            *slot = Some(v);
            Some(())
        }
        _ => None,
    }
}

/// How a struct's fields are laid out; see [`Reader::fields`].
pub enum Fields {
    ByPosition,
    /// A map of this many pairs.
    ByName(u32),
}

/// MessagePack values read off the front of a byte slice. Every method returns
/// `None` when the next value is not of the kind asked for.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn marker(&mut self) -> Option<Marker> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(Marker::from_u8(b))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(head)
    }

    fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u16_len(&mut self) -> Option<u32> {
        self.be().map(u16::from_be_bytes).map(u32::from)
    }

    fn u32_len(&mut self) -> Option<u32> {
        self.be().map(u32::from_be_bytes)
    }

    /// The number of pairs of a map.
    pub fn map_len(&mut self) -> Option<u32> {
        match self.marker()? {
            Marker::FixMap(n) => Some(u32::from(n)),
            Marker::Map16 => self.u16_len(),
            Marker::Map32 => self.u32_len(),
            _ => None,
        }
    }

    /// The start of a struct of `n` fields: an array of exactly `n` (by
    /// position, as the writers write records since 11-26g), or a map (by name,
    /// as before). Any other length is not ours: serde decides about it.
    pub fn fields(&mut self, n: u8) -> Option<Fields> {
        match self.marker()? {
            Marker::FixArray(len) if len == n => Some(Fields::ByPosition),
            Marker::FixMap(len) => Some(Fields::ByName(u32::from(len))),
            Marker::Map16 => self.u16_len().map(Fields::ByName),
            Marker::Map32 => self.u32_len().map(Fields::ByName),
            _ => None,
        }
    }

    /// An optional string as serde reads `Option<T>`: nil is `None`.
    pub fn opt_compact_str(&mut self) -> Option<Option<CompactString>> {
        if self.rest.first() == Some(&0xc0) {
            self.rest = &self.rest[1..];
            return Some(None);
        }
        self.compact_str().map(Some)
    }

    /// The number of items of an array.
    pub fn array_len(&mut self) -> Option<u32> {
        match self.marker()? {
            Marker::FixArray(n) => Some(u32::from(n)),
            Marker::Array16 => self.u16_len(),
            Marker::Array32 => self.u32_len(),
            _ => None,
        }
    }

    fn str_bytes_after(&mut self, marker: Marker) -> Option<&'a [u8]> {
        let len = match marker {
            Marker::FixStr(n) => u32::from(n),
            Marker::Str8 => u32::from(self.take(1)?[0]),
            Marker::Str16 => self.u16_len()?,
            Marker::Str32 => self.u32_len()?,
            _ => return None,
        };
        self.take(usize::try_from(len).ok()?)
    }

    /// A string's bytes, not UTF-8-checked: for matching against the ASCII names
    /// of fields and unit variants only, where any other bytes are not ours.
    pub fn name(&mut self) -> Option<&'a [u8]> {
        let m = self.marker()?;
        self.str_bytes_after(m)
    }

    /// A string value, UTF-8-checked as serde checks it.
    pub fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.name()?).ok()
    }

    /// A string value as `compact_str`'s `Deserialize` builds it.
    pub fn compact_str(&mut self) -> Option<CompactString> {
        self.str().map(CompactString::from)
    }

    /// An integer of any MessagePack width. Wide enough for every one of them,
    /// so a target type range-checks it as serde's integer visitors do.
    fn int_after(&mut self, marker: Marker) -> Option<i128> {
        Some(match marker {
            Marker::FixPos(v) => i128::from(v),
            Marker::FixNeg(v) => i128::from(v),
            Marker::U8 => i128::from(u8::from_be_bytes(self.be()?)),
            Marker::U16 => i128::from(u16::from_be_bytes(self.be()?)),
            Marker::U32 => i128::from(u32::from_be_bytes(self.be()?)),
            Marker::U64 => i128::from(u64::from_be_bytes(self.be()?)),
            Marker::I8 => i128::from(i8::from_be_bytes(self.be()?)),
            Marker::I16 => i128::from(i16::from_be_bytes(self.be()?)),
            Marker::I32 => i128::from(i32::from_be_bytes(self.be()?)),
            Marker::I64 => i128::from(i64::from_be_bytes(self.be()?)),
            _ => return None,
        })
    }

    fn int<T: TryFrom<i128>>(&mut self) -> Option<T> {
        let m = self.marker()?;
        T::try_from(self.int_after(m)?).ok()
    }

    pub fn i64(&mut self) -> Option<i64> {
        self.int()
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.int()
    }

    /// A decimal as [`crate::decimal`] reads it: `[mantissa, scale]` or text.
    pub fn decimal(&mut self) -> Option<Decimal> {
        match self.marker()? {
            Marker::FixArray(2) => {
                let mantissa: i64 = self.int()?;
                let scale: u32 = self.int()?;
                (scale <= MAX_SCALE).then(|| Decimal::new(mantissa, scale))
            }
            m @ (Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32) => {
                let text = std::str::from_utf8(self.str_bytes_after(m)?).ok()?;
                crate::decimal::parse_plain(text).ok()
            }
            _ => None,
        }
    }
}

impl FastDecode for RawRecord {
    fn fast_decode(r: &mut Reader<'_>) -> Option<Self> {
        let n = match r.fields(2)? {
            Fields::ByPosition => {
                return Some(RawRecord {
                    event: Event::fast_decode(r)?,
                    ingest_ns: r.i64()?,
                })
            }
            Fields::ByName(n) => n,
        };
        let (mut event, mut ingest_ns) = (None, None);
        for _ in 0..n {
            match r.name()? {
                b"event" => put(&mut event, Event::fast_decode(r))?,
                b"ingest_ns" => put(&mut ingest_ns, r.i64())?,
                _ => return None,
            }
        }
        Some(RawRecord {
            event: event?,
            ingest_ns: ingest_ns?,
        })
    }
}

/// Externally tagged, as serde writes an enum: a map of one pair, variant name
/// to variant.
impl FastDecode for Event {
    fn fast_decode(r: &mut Reader<'_>) -> Option<Self> {
        if r.map_len()? != 1 {
            return None;
        }
        match r.name()? {
            b"trade" => trade(r).map(Event::Trade),
            b"quote" => quote(r).map(Event::Quote),
            _ => None,
        }
    }
}

fn header(r: &mut Reader<'_>) -> Option<Header> {
    let n = match r.fields(5)? {
        Fields::ByPosition => {
            return Some(Header {
                source: r.compact_str().map(Source::from_stream)?,
                seq: r.u64()?,
                instrument: r.compact_str().map(Symbol::from_stream)?,
                venue: r.compact_str().map(Mic::from_stream)?,
                ts: r.i64().map(Timestamp::from_nanos_unchecked)?,
            })
        }
        Fields::ByName(n) => n,
    };
    let (mut source, mut seq, mut instrument, mut venue, mut ts) = (None, None, None, None, None);
    for _ in 0..n {
        match r.name()? {
            b"source" => put(&mut source, r.compact_str().map(Source::from_stream))?,
            b"seq" => put(&mut seq, r.u64())?,
            b"instrument" => put(&mut instrument, r.compact_str().map(Symbol::from_stream))?,
            b"venue" => put(&mut venue, r.compact_str().map(Mic::from_stream))?,
            b"ts" => put(&mut ts, r.i64().map(Timestamp::from_nanos_unchecked))?,
            _ => return None,
        }
    }
    Some(Header {
        source: source?,
        seq: seq?,
        instrument: instrument?,
        venue: venue?,
        ts: ts?,
    })
}

fn side(r: &mut Reader<'_>) -> Option<Side> {
    match r.name()? {
        b"buy" => Some(Side::Buy),
        b"sell" => Some(Side::Sell),
        _ => None,
    }
}

/// `trade_id` and `account` are nil when `None` (by position, and by name as
/// serde writes maps now); by name, the writers before 11-26g left them out
/// (`skip_serializing_if`), and they default to `None` when missing, as
/// serde's `default` does.
fn trade(r: &mut Reader<'_>) -> Option<Trade> {
    let n = match r.fields(6)? {
        Fields::ByPosition => {
            return Some(Trade {
                header: header(r)?,
                price: r.decimal()?,
                qty: r.decimal()?,
                side: side(r)?,
                trade_id: r.opt_compact_str()?.map(TradeId::from_stream),
                account: r.opt_compact_str()?.map(AccountId::from_stream),
            })
        }
        Fields::ByName(n) => n,
    };
    let (mut header_, mut price, mut qty, mut side_) = (None, None, None, None);
    let (mut trade_id, mut account): (Option<Option<CompactString>>, _) = (None, None);
    for _ in 0..n {
        match r.name()? {
            b"header" => put(&mut header_, header(r))?,
            b"price" => put(&mut price, r.decimal())?,
            b"qty" => put(&mut qty, r.decimal())?,
            b"side" => put(&mut side_, side(r))?,
            b"trade_id" => put(&mut trade_id, r.opt_compact_str())?,
            b"account" => put(&mut account, r.opt_compact_str())?,
            _ => return None,
        }
    }
    Some(Trade {
        header: header_?,
        price: price?,
        qty: qty?,
        side: side_?,
        trade_id: trade_id.flatten().map(TradeId::from_stream),
        account: account.flatten().map(AccountId::from_stream),
    })
}

fn quote(r: &mut Reader<'_>) -> Option<Quote> {
    let n = match r.fields(5)? {
        Fields::ByPosition => {
            return Some(Quote {
                header: header(r)?,
                bid: r.decimal()?,
                ask: r.decimal()?,
                bid_size: r.decimal()?,
                ask_size: r.decimal()?,
            })
        }
        Fields::ByName(n) => n,
    };
    let (mut header_, mut bid, mut ask, mut bid_size, mut ask_size) =
        (None, None, None, None, None);
    for _ in 0..n {
        match r.name()? {
            b"header" => put(&mut header_, header(r))?,
            b"bid" => put(&mut bid, r.decimal())?,
            b"ask" => put(&mut ask, r.decimal())?,
            b"bid_size" => put(&mut bid_size, r.decimal())?,
            b"ask_size" => put(&mut ask_size, r.decimal())?,
            _ => return None,
        }
    }
    Some(Quote {
        header: header_?,
        bid: bid?,
        ask: ask?,
        bid_size: bid_size?,
        ask_size: ask_size?,
    })
}
