//! The enriched entry's fast path against `rmp_serde`, record for record (the
//! event inside is fuzzed in `tickgraph-ingest`'s own tests): entries as enrich
//! writes them take the fast path and decode to exactly what serde gives;
//! entries changed in ways enrich never writes decode (or fail) as serde alone
//! decodes them. `TG_FUZZ_CASES` sets the case count (default 1,000).

use std::sync::LazyLock;

use proptest::prelude::*;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;
use tickgraph_enrich::demo::{demo_refdata, feed_records};
use tickgraph_enrich::refdata::AssetClass;
use tickgraph_enrich::{enrich, Derived, EnrichedRecord};
use tickgraph_ingest::fast_decode::try_fast;
use tickgraph_ingest::stream::decode_entry;
use tickgraph_ingest::stream::encode_batch;
use tickgraph_ingest::test_support::fuzz_cases;
use tickgraph_ingest::test_support::msgpack::{self, agrees, Change, Value};
use tickgraph_ingest::Event;

const INGEST_NS: i64 = 1_764_066_667_000_000_000;

/// Demo events as `tickgraph all` feeds them, enriched against the demo data.
static DEMO: LazyLock<Vec<EnrichedRecord>> = LazyLock::new(|| {
    let refs = demo_refdata();
    let raws = feed_records(&refs, 1000, 0.2, INGEST_NS);
    assert_eq!(raws.len(), 1000, "the feed sends only valid events");
    raws.iter()
        .map(|raw| enrich(raw, &refs, INGEST_NS + 250_000).expect("demo events enrich"))
        .collect()
});

/// Demo events and a few the feed never draws: decimals past 64 bits, a
/// trade id, a symbol that `Symbol::parse` would refuse.
static EVENTS: LazyLock<Vec<Event>> = LazyLock::new(|| {
    let header = json!({"source": "s", "seq": 1, "instrument": "A VERY LONG SYMBOL, NOT VALID AT INGEST",
                        "venue": "xx", "ts": -5});
    let odd = [
        json!({"quote": {"header": header, "bid": "79228162514264337593543950335",
                         "ask": "-0.0000000000000000000000000001", "bid_size": "0", "ask_size": "1.000"}}),
        json!({"trade": {"header": header, "price": "12345678901234567890.5", "qty": "1",
                         "side": "sell", "trade_id": "T-1", "account": "ACC-1"}}),
    ];
    DEMO.iter()
        .take(50)
        .map(|r| r.event.clone())
        .chain(
            odd.into_iter()
                .map(|v| serde_json::from_value(v).expect("an event")),
        )
        .collect()
});

fn decimal() -> impl Strategy<Value = Decimal> {
    prop_oneof![
        (-1_000_000_000i64..1_000_000_000, 0u32..12).prop_map(|(m, s)| Decimal::new(m, s)),
        (any::<i64>(), 0u32..=28).prop_map(|(m, s)| Decimal::new(m, s)),
        (any::<i128>(), 0u32..=28).prop_filter_map("fits 96 bits", |(m, s)| {
            Decimal::try_from_i128_with_scale(m >> 32, s).ok()
        }),
    ]
}

fn record() -> impl Strategy<Value = EnrichedRecord> {
    let derived = prop_oneof![
        (decimal(), decimal()).prop_map(|(notional, notional_usd)| Derived::Trade {
            notional,
            notional_usd
        }),
        (decimal(), decimal()).prop_map(|(mid, spread)| Derived::Quote { mid, spread }),
    ];
    (
        any::<prop::sample::Index>(),
        any::<i64>(),
        any::<i64>(),
        prop::sample::select(AssetClass::ALL.to_vec()),
        prop_oneof!["[A-Z]{3}", "\\PC{0,8}"],
        derived,
    )
        .prop_map(
            |(event, ingest_ns, enriched_ns, asset_class, currency, derived)| EnrichedRecord {
                event: event.get(EVENTS.as_slice()).clone(),
                ingest_ns,
                enriched_ns,
                asset_class,
                currency: currency.into(),
                derived,
            },
        )
}

/// Named MessagePack as enrich wrote a record before 11-26g; with `text`,
/// decimals as text, as before the `[mantissa, scale]` pair.
fn encode(r: &EnrichedRecord, text: bool) -> Vec<u8> {
    msgpack::serialize(r, text, true)
}

/// Positional MessagePack, as enrich writes a record since 11-26g.
fn positional<T: Serialize + ?Sized>(r: &T, text: bool) -> Vec<u8> {
    msgpack::serialize(r, text, false)
}

fn tree(r: &EnrichedRecord, text: bool) -> Value {
    let d = |x: &Decimal| msgpack::decimal(x, text);
    let derived = match &r.derived {
        Derived::Trade {
            notional,
            notional_usd,
        } => Value::map([(
            "trade",
            Value::map([("notional", d(notional)), ("notional_usd", d(notional_usd))]),
        )]),
        Derived::Quote { mid, spread } => Value::map([(
            "quote",
            Value::map([("mid", d(mid)), ("spread", d(spread))]),
        )]),
    };
    Value::map([
        ("event", msgpack::event(&r.event, text)),
        ("ingest_ns", Value::Int(r.ingest_ns)),
        ("enriched_ns", Value::Int(r.enriched_ns)),
        ("asset_class", Value::str(r.asset_class.as_str())),
        ("currency", Value::str(&r.currency)),
        ("derived", derived),
    ])
}

/// A batch entry (possibly empty) or, as before batching, one record alone.
fn entry() -> impl Strategy<Value = (Vec<(EnrichedRecord, bool)>, bool)> {
    prop_oneof![
        prop::collection::vec((record(), any::<bool>()), 0..6).prop_map(|r| (r, true)),
        (record(), any::<bool>()).prop_map(|r| (vec![r], false)),
    ]
}

fn entry_tree(records: &[(EnrichedRecord, bool)], batch: bool) -> Value {
    msgpack::entry(records.iter().map(|(r, t)| tree(r, *t)).collect(), batch)
}

fn change() -> impl Strategy<Value = Change> {
    (any::<u8>(), any::<usize>(), any::<usize>(), any::<usize>())
        .prop_map(|(k, a, b, c)| Change::pick(k, a, b, c))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases(1_000)))]

    /// The tree the other tests change is byte for byte what enrich writes.
    #[test]
    fn the_test_tree_is_what_enrich_writes(rec in record(), text in any::<bool>()) {
        prop_assert_eq!(tree(&rec, text).encode(), encode(&rec, text));
    }

    /// Positional records, as enrich writes them now, in batches; and with
    /// bytes changed, cut or added, decoded (or refused) as serde alone does.
    #[test]
    fn positional_entries_take_the_fast_path_and_decode_as_serde_does(
        records in prop::collection::vec((record(), any::<bool>()), 0..6),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
        cut in prop::option::of(any::<usize>()),
    ) {
        if !records.iter().any(|(_, t)| *t) {
            let plain: Vec<EnrichedRecord> = records.iter().map(|(r, _)| r.clone()).collect();
            prop_assert_eq!(positional(&plain[..], false), EnrichedRecord::encode_batch(&plain).map_err(|e| TestCaseError::fail(e.to_string()))?);
        }
        let encoded: Vec<Vec<u8>> = records.iter().map(|(r, t)| positional(r, *t)).collect();
        let mut bytes = encode_batch(encoded.iter().map(Vec::as_slice));
        prop_assert_eq!(agrees::<EnrichedRecord>(&bytes), Ok(true));
        let want: Vec<EnrichedRecord> = records.into_iter().map(|(r, _)| r).collect();
        prop_assert_eq!(try_fast::<EnrichedRecord>(&bytes), Some(want));
        for (at, b) in flips {
            let at = at % bytes.len();
            bytes[at] = b;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        agrees::<EnrichedRecord>(&bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn entries_we_write_take_the_fast_path_and_decode_as_serde_does(
        (records, batch) in entry(),
    ) {
        let bytes = entry_tree(&records, batch).encode();
        prop_assert_eq!(agrees::<EnrichedRecord>(&bytes), Ok(true));
        let want: Vec<EnrichedRecord> = records.into_iter().map(|(r, _)| r).collect();
        prop_assert_eq!(try_fast::<EnrichedRecord>(&bytes), Some(want));
    }

    #[test]
    fn changed_entries_decode_or_fail_exactly_as_serde_alone(
        (records, batch) in entry(),
        changes in prop::collection::vec(change(), 1..4),
        cut in prop::option::of(any::<usize>()),
    ) {
        let mut tree = entry_tree(&records, batch);
        for c in &changes {
            c.apply(&mut tree);
        }
        let mut bytes = tree.encode();
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        agrees::<EnrichedRecord>(&bytes).map_err(TestCaseError::fail)?;
    }
}

/// What the worker writes for the demo feed: one entry of 1000, fast.
#[test]
fn a_demo_entry_takes_the_fast_path() {
    let entry = EnrichedRecord::encode_batch(&DEMO).expect("encodes");
    assert_eq!(agrees::<EnrichedRecord>(&entry), Ok(true));
    assert_eq!(
        try_fast::<EnrichedRecord>(&entry).as_deref(),
        Some(&DEMO[..])
    );
}

/// Enriched fields in shapes enrich never writes, each named, with whether
/// serde reads it: the fast path refuses every one, and `decode_entry` answers
/// as serde does.
#[test]
fn shapes_enrich_does_not_write_go_to_serde() {
    let rec = DEMO
        .iter()
        .find(|r| matches!(r.derived, Derived::Trade { .. }))
        .expect("the demo feed trades");
    let changed = |f: &dyn Fn(&mut Value)| {
        let mut t = tree(rec, false);
        f(&mut t);
        t.encode()
    };
    let set = |key: &'static str, v: Value| {
        move |t: &mut Value| *t.get_mut(key).expect("a field") = v.clone()
    };
    let one = Value::Array(vec![Value::Int(1), Value::UInt(0)]);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "an unknown key",
            changed(&|t| {
                if let Value::Map(p) = t {
                    p.push((Value::str("region"), Value::str("EU")));
                }
            }),
            true,
        ),
        (
            "asset class unknown",
            changed(&set("asset_class", Value::str("stock"))),
            false,
        ),
        (
            "asset class as a map",
            changed(&set("asset_class", Value::map([("fx", Value::Nil)]))),
            true,
        ),
        (
            "currency as nil",
            changed(&set("currency", Value::Nil)),
            false,
        ),
        (
            "currency as bin",
            changed(&set("currency", Value::Bin(b"USD".to_vec()))),
            true,
        ),
        (
            "enriched_ns as text",
            changed(&set("enriched_ns", Value::str("1"))),
            false,
        ),
        (
            "derived of two variants",
            changed(&set(
                "derived",
                Value::map([
                    (
                        "trade",
                        Value::map([("notional", one.clone()), ("notional_usd", one.clone())]),
                    ),
                    (
                        "quote",
                        Value::map([("mid", one.clone()), ("spread", one.clone())]),
                    ),
                ]),
            )),
            false,
        ),
        (
            "derived unknown variant",
            changed(&set(
                "derived",
                Value::map([("order", Value::Map(Vec::new()))]),
            )),
            false,
        ),
        (
            "derived with an extra field",
            changed(&set(
                "derived",
                Value::map([(
                    "trade",
                    Value::map([
                        ("notional", one.clone()),
                        ("notional_usd", one.clone()),
                        ("fx", one.clone()),
                    ]),
                )]),
            )),
            true,
        ),
        (
            "derived of the other kind",
            changed(&set(
                "derived",
                Value::map([(
                    "quote",
                    Value::map([("notional", one.clone()), ("notional_usd", one.clone())]),
                )]),
            )),
            false,
        ),
        (
            "trailing bytes",
            [encode(rec, false), vec![0x00]].concat(),
            true,
        ),
    ];
    // Positional derived fields inside a named record: a mix no writer made,
    // but read alike by both paths.
    let mixed = changed(&set(
        "derived",
        Value::map([("trade", Value::Array(vec![one.clone(), one.clone()]))]),
    ));
    assert_eq!(agrees::<EnrichedRecord>(&mixed), Ok(true));
    for (what, bytes, serde_reads) in cases {
        assert!(
            try_fast::<EnrichedRecord>(&bytes).is_none(),
            "{what}: fast path took it"
        );
        assert_eq!(agrees::<EnrichedRecord>(&bytes), Ok(false), "{what}");
        assert_eq!(
            decode_entry::<EnrichedRecord>(&bytes).is_ok(),
            serde_reads,
            "{what}"
        );
    }
}
