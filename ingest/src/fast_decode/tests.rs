//! The fast path against `rmp_serde`, record for record: entries as our writers
//! write them must take the fast path and decode to exactly what serde gives;
//! entries changed in ways the writers never produce must decode (or fail) as
//! serde alone decodes them. `TG_FUZZ_CASES` sets the case count (default 2,000).

use proptest::prelude::*;
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::*;
use crate::event::{Header, Quote, Side, Trade};
use crate::stream::{decode_entry, encode_batch, RawRecord};
use crate::test_support::fuzz_cases;
use crate::test_support::msgpack::{self, agrees, Change, Value};

/// A newtype from any string, unchecked, as its transparent `Deserialize` reads
/// it from a stream.
fn newtype<T: DeserializeOwned>(s: String) -> T {
    serde_json::from_value(serde_json::Value::String(s)).expect("a transparent string newtype")
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Z0-9.]{1,8}",
        "[ -~]{0,40}",
        // Any Unicode: serde checks only that it is UTF-8, so must we.
        "\\PC{0,12}",
    ]
}

fn decimal() -> impl Strategy<Value = Decimal> {
    prop_oneof![
        (-1_000_000i64..1_000_000, 0u32..10).prop_map(|(m, s)| Decimal::new(m, s)),
        (any::<i64>(), 0u32..=28).prop_map(|(m, s)| Decimal::new(m, s)),
        // Mantissas past i64 (to 96 bits): written as text.
        (any::<i128>(), 0u32..=28).prop_filter_map("fits 96 bits", |(m, s)| {
            Decimal::try_from_i128_with_scale(m >> 32, s).ok()
        }),
    ]
}

fn header() -> impl Strategy<Value = Header> {
    (text(), any::<u64>(), text(), text(), any::<i64>()).prop_map(
        |(source, seq, instrument, venue, ts)| Header {
            source: newtype(source),
            seq,
            instrument: newtype(instrument),
            venue: newtype(venue),
            ts: Timestamp::from_nanos_unchecked(ts),
        },
    )
}

fn event() -> impl Strategy<Value = Event> {
    let trade = (
        header(),
        decimal(),
        decimal(),
        any::<bool>(),
        proptest::option::of(text()),
        proptest::option::of(text()),
    )
        .prop_map(|(header, price, qty, buy, trade_id, account)| {
            Event::Trade(Trade {
                header,
                price,
                qty,
                side: if buy { Side::Buy } else { Side::Sell },
                trade_id: trade_id.map(newtype),
                account: account.map(newtype),
            })
        });
    let quote = (header(), decimal(), decimal(), decimal(), decimal()).prop_map(
        |(header, bid, ask, bid_size, ask_size)| {
            Event::Quote(Quote {
                header,
                bid,
                ask,
                bid_size,
                ask_size,
            })
        },
    );
    prop_oneof![trade, quote]
}

fn record() -> impl Strategy<Value = RawRecord> {
    (event(), any::<i64>()).prop_map(|(event, ingest_ns)| RawRecord { event, ingest_ns })
}

/// Named MessagePack as ingest wrote a record before 11-26g; with `text`,
/// decimals as text.
fn encode<T: Serialize>(r: &T, text: bool) -> Vec<u8> {
    msgpack::serialize(r, text, true)
}

/// Positional MessagePack as ingest writes a record since 11-26g.
fn positional<T: Serialize>(r: &T, text: bool) -> Vec<u8> {
    msgpack::serialize(r, text, false)
}

/// An entry: a batch (possibly empty) or, as before batching, one record alone.
fn entry() -> impl Strategy<Value = (Vec<(RawRecord, bool)>, bool)> {
    prop_oneof![
        prop::collection::vec((record(), any::<bool>()), 0..8).prop_map(|r| (r, true)),
        (record(), any::<bool>()).prop_map(|r| (vec![r], false)),
    ]
}

fn entry_bytes(records: &[(RawRecord, bool)], batch: bool) -> Vec<u8> {
    let encoded: Vec<Vec<u8>> = records.iter().map(|(r, t)| encode(r, *t)).collect();
    if batch {
        encode_batch(encoded.iter().map(Vec::as_slice))
    } else {
        encoded.concat()
    }
}

fn entry_tree(records: &[(RawRecord, bool)], batch: bool) -> Value {
    let trees = records.iter().map(|(r, t)| msgpack::raw_record(r, *t));
    msgpack::entry(trees.collect(), batch)
}

fn change() -> impl Strategy<Value = Change> {
    (any::<u8>(), any::<usize>(), any::<usize>(), any::<usize>())
        .prop_map(|(k, a, b, c)| Change::pick(k, a, b, c))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases(2_000)))]

    /// The tree the other tests change is byte for byte what ingest writes.
    #[test]
    fn the_test_tree_is_what_the_writer_writes(rec in record(), text in any::<bool>()) {
        prop_assert_eq!(msgpack::raw_record(&rec, text).encode(), encode(&rec, text));
        if !text {
            // As ingest wrote records before 11-26g; `positional` is what it writes now.
            prop_assert_eq!(msgpack::raw_record(&rec, false).encode(), rmp_serde::to_vec_named(&rec).map_err(|e| TestCaseError::fail(e.to_string()))?);
            prop_assert_eq!(positional(&rec, false), rec.encode().map_err(|e| TestCaseError::fail(e.to_string()))?);
        }
    }

    /// Records by position, as ingest writes them, in batches.
    #[test]
    fn positional_entries_take_the_fast_path_and_decode_as_serde_does(
        records in prop::collection::vec((record(), any::<bool>()), 0..8),
    ) {
        let encoded: Vec<Vec<u8>> = records.iter().map(|(r, t)| positional(r, *t)).collect();
        let bytes = encode_batch(encoded.iter().map(Vec::as_slice));
        prop_assert_eq!(agrees::<RawRecord>(&bytes), Ok(true));
        let fast = try_fast::<RawRecord>(&bytes).ok_or_else(|| TestCaseError::fail("not fast"))?;
        let want: Vec<RawRecord> = records.into_iter().map(|(r, _)| r).collect();
        prop_assert_eq!(fast, want);
    }

    /// Positional entries with bytes changed, cut or added decode (or fail)
    /// exactly as serde alone decodes them.
    #[test]
    fn changed_positional_entries_decode_or_fail_exactly_as_serde_alone(
        records in prop::collection::vec((record(), any::<bool>()), 1..4),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        cut in any::<usize>(),
        cut_it in any::<bool>(),
        garbage in prop::collection::vec(any::<u8>(), 0..3),
    ) {
        let encoded: Vec<Vec<u8>> = records.iter().map(|(r, t)| positional(r, *t)).collect();
        let mut bytes = encode_batch(encoded.iter().map(Vec::as_slice));
        for (at, b) in flips {
            let at = at % bytes.len();
            bytes[at] = b;
        }
        if cut_it {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        bytes.extend_from_slice(&garbage);
        agrees::<RawRecord>(&bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn entries_we_write_take_the_fast_path_and_decode_as_serde_does(
        (records, batch) in entry(),
    ) {
        let bytes = entry_bytes(&records, batch);
        prop_assert_eq!(agrees::<RawRecord>(&bytes), Ok(true));
        let fast = try_fast::<RawRecord>(&bytes).ok_or_else(|| TestCaseError::fail("not fast"))?;
        let want: Vec<RawRecord> = records.into_iter().map(|(r, _)| r).collect();
        prop_assert_eq!(fast, want);
    }

    #[test]
    fn changed_entries_decode_or_fail_exactly_as_serde_alone(
        (records, batch) in entry(),
        changes in prop::collection::vec(change(), 1..4),
        cut in any::<usize>(),
        cut_it in any::<bool>(),
        garbage in prop::collection::vec(any::<u8>(), 0..3),
    ) {
        let mut tree = entry_tree(&records, batch);
        for c in &changes {
            c.apply(&mut tree);
        }
        let mut bytes = tree.encode();
        if cut_it {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        bytes.extend_from_slice(&garbage);
        agrees::<RawRecord>(&bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn random_bytes_decode_or_fail_exactly_as_serde_alone(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        agrees::<RawRecord>(&bytes).map_err(TestCaseError::fail)?;
    }
}

fn a_trade() -> RawRecord {
    RawRecord {
        event: Event::Trade(Trade {
            header: Header {
                source: newtype("oms-1".into()),
                seq: 7,
                instrument: newtype("AAPL".into()),
                venue: newtype("XNAS".into()),
                ts: Timestamp::from_nanos_unchecked(1_764_066_667_000_000_001),
            },
            price: Decimal::new(18_725, 2),
            qty: Decimal::new(100, 0),
            side: Side::Buy,
            trade_id: Some(newtype("T-1".into())),
            account: None,
        }),
        ingest_ns: 1_764_066_667_000_000_002,
    }
}

/// The trade's record by position, in a batch of one, with `f` applied to its
/// trade's fields.
fn changed_positional(f: impl FnOnce(&mut Vec<Value>)) -> Vec<u8> {
    let rec = a_trade();
    let Event::Trade(t) = &rec.event else {
        panic!("a trade")
    };
    let h = &t.header;
    let mut fields = vec![
        Value::Array(vec![
            Value::str(h.source.as_str()),
            Value::UInt(h.seq),
            Value::str(h.instrument.as_str()),
            Value::str(h.venue.as_str()),
            Value::Int(h.ts.nanos()),
        ]),
        msgpack::decimal(&t.price, false),
        msgpack::decimal(&t.qty, false),
        Value::str("buy"),
        Value::str("T-1"),
        Value::Nil,
    ];
    f(&mut fields);
    let tree = Value::Array(vec![
        Value::map([("trade", Value::Array(fields))]),
        Value::Int(rec.ingest_ns),
    ]);
    encode_batch([tree.encode().as_slice()])
}

#[test]
fn the_positional_test_tree_is_what_the_writer_writes() {
    let written = a_trade().encode().expect("encodes");
    assert_eq!(
        changed_positional(|_| {}),
        encode_batch([written.as_slice()])
    );
    assert_eq!(
        try_fast::<RawRecord>(&changed_positional(|_| {})),
        Some(vec![a_trade()])
    );
}

/// The trade tree with `f` applied to its trade's fields (a map).
fn changed(f: impl FnOnce(&mut Vec<(Value, Value)>)) -> Vec<u8> {
    let mut tree = msgpack::raw_record(&a_trade(), false);
    let fields = tree
        .get_mut("event")
        .and_then(|e| e.get_mut("trade"))
        .expect("a trade tree");
    let Value::Map(pairs) = fields else {
        panic!("the trade is a map")
    };
    f(pairs);
    tree.encode()
}

fn set(pairs: &mut [(Value, Value)], key: &str, v: Value) {
    for (k, old) in pairs.iter_mut() {
        if *k == Value::str(key) {
            *old = v.clone();
        }
    }
}

/// Shapes our writers never produce, each named, with whether serde reads it:
/// the fast path must refuse every one, and `decode_entry` answer as serde does.
#[test]
fn shapes_we_do_not_write_go_to_serde() {
    let good = rmp_serde::to_vec_named(&a_trade()).expect("encodes");
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "an unknown key",
            changed(|p| p.push((Value::str("venue_ts"), Value::Int(1)))),
            true,
        ),
        (
            "a repeated key",
            changed(|p| p.push((Value::str("qty"), msgpack::decimal(&Decimal::ONE, false)))),
            false,
        ),
        (
            "a missing field",
            changed(|p| {
                p.remove(1);
            }),
            false,
        ),
        (
            "a key as bin",
            changed(|p| p[0].0 = Value::Bin(b"header".to_vec())),
            true,
        ),
        (
            "side as a map",
            changed(|p| set(p, "side", Value::map([("buy", Value::Nil)]))),
            true,
        ),
        (
            "side unknown",
            changed(|p| set(p, "side", Value::str("hold"))),
            false,
        ),
        (
            "price of three items",
            changed(|p| {
                set(
                    p,
                    "price",
                    Value::Array(vec![Value::Int(1), Value::UInt(2), Value::UInt(3)]),
                )
            }),
            false,
        ),
        (
            "price of scale 29",
            changed(|p| {
                set(
                    p,
                    "price",
                    Value::Array(vec![Value::Int(1), Value::UInt(29)]),
                )
            }),
            false,
        ),
        (
            "price as a float",
            changed(|p| set(p, "price", Value::F64(1.5))),
            false,
        ),
        (
            "price as bad text",
            changed(|p| set(p, "price", Value::str("1e3"))),
            false,
        ),
        (
            "price text not UTF-8",
            changed(|p| set(p, "price", Value::RawStr(vec![b'1', 0xff]))),
            false,
        ),
        (
            "a string not UTF-8",
            changed(|p| set(p, "trade_id", Value::RawStr(vec![b'T', 0xff]))),
            false,
        ),
        (
            "a string as bin",
            changed(|p| set(p, "trade_id", Value::Bin(b"T-2".to_vec()))),
            true,
        ),
        // An array at the top is a batch: of two records here, neither one a record.
        (
            "a record by position, not in a batch",
            positional(&a_trade(), false),
            false,
        ),
        (
            "a trade by position one field short",
            changed_positional(|f| {
                f.pop();
            }),
            true,
        ),
        (
            "a trade by position one field long",
            changed_positional(|f| f.push(Value::Nil)),
            false,
        ),
        (
            "a trade by position with nil for its price",
            changed_positional(|f| f[1] = Value::Nil),
            false,
        ),
        (
            "a trade by position with trade_id as bin",
            changed_positional(|f| f[4] = Value::Bin(b"T-2".to_vec())),
            true,
        ),
        ("trailing bytes", [good.clone(), vec![0xc0]].concat(), true),
        (
            "a batch with trailing bytes",
            [encode_batch([good.as_slice()]), vec![0x01]].concat(),
            true,
        ),
        (
            "a batch one short",
            encode_batch([good.as_slice(), good.as_slice()])[..good.len() + 1].to_vec(),
            false,
        ),
        ("a truncated record", good[..good.len() - 1].to_vec(), false),
        ("nothing", Vec::new(), false),
        (
            "a lying batch length",
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],
            false,
        ),
    ];
    for (what, bytes, serde_reads) in cases {
        assert!(
            try_fast::<RawRecord>(&bytes).is_none(),
            "{what}: fast path took it"
        );
        assert_eq!(agrees::<RawRecord>(&bytes), Ok(false), "{what}");
        assert_eq!(
            decode_entry::<RawRecord>(&bytes).is_ok(),
            serde_reads,
            "{what}"
        );
    }
}

/// Shapes serde reads and our writers could produce just as well: the fast path
/// takes them, and reads them as serde does.
#[test]
fn fields_in_any_order_and_every_integer_width_take_the_fast_path() {
    let reordered = changed(|p| p.reverse());
    let wide = |v: i64| {
        let mut b = vec![0xd3];
        b.extend_from_slice(&v.to_be_bytes());
        b
    };
    // ingest_ns as an int64 where rmp_serde would pick a uint64.
    let mut widened = msgpack::raw_record(&a_trade(), false).encode();
    let small = [0xcf_u8]
        .into_iter()
        .chain(1_764_066_667_000_000_002_u64.to_be_bytes())
        .collect::<Vec<u8>>();
    let at = widened
        .windows(small.len())
        .position(|w| w == small)
        .expect("ingest_ns as uint64");
    widened.splice(at..at + small.len(), wide(1_764_066_667_000_000_002));
    // As writers before 11-26g wrote a trade: absent options left out.
    let left_out = changed(|p| p.retain(|(k, _)| *k != Value::str("account")));
    for (what, bytes) in [
        ("reordered", reordered),
        ("widened", widened),
        ("left out", left_out),
    ] {
        assert_eq!(agrees::<RawRecord>(&bytes), Ok(true), "{what}");
        assert_eq!(
            try_fast::<RawRecord>(&bytes).expect("fast"),
            vec![a_trade()],
            "{what}"
        );
    }
}

#[test]
fn an_empty_batch_is_no_records() {
    assert_eq!(try_fast::<RawRecord>(&[0x90]), Some(Vec::new()));
    assert_eq!(agrees::<RawRecord>(&[0x90]), Ok(true));
}
