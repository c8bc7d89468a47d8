//! Fuzzing every decoder ingest owns with proptest: random bytes, valid batches
//! mutated at random, and hostile shapes (deep nesting, lying length prefixes).
//! Whatever the input: no panic, an answer per event or one clear error for the
//! batch, and heap bounded by the input's size. `TG_FUZZ_CASES` raises the case
//! count (default 10,000 per property).

use proptest::prelude::*;
use serde_json::json;

use tickgraph_ingest::stream::{decode_entry, RawRecord};
use tickgraph_ingest::wire::{decode_batch, BatchError, Format};

use crate::alloc::peak_during;

const LIMIT: usize = 1_000;

fn cases() -> u32 {
    std::env::var("TG_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

/// Heap a decode of `len` input bytes may hold: per event a decoded event and
/// its answer, and an event takes at least a few bytes of input.
fn heap_bound(len: usize) -> usize {
    256 * 1024 + 160 * len
}

/// Decodes `body` in `format` and checks the outcome is well-formed and the
/// heap it took bounded.
fn check(format: Format, body: &[u8]) -> Result<(), TestCaseError> {
    let (result, peak) = peak_during(|| {
        decode_batch(format, body, LIMIT).map(|items| {
            items
                .iter()
                .map(|i| i.outcome.as_ref().map(|_| ()).map_err(|r| r.0.clone()))
                .collect::<Vec<_>>()
        })
    });
    prop_assert!(
        peak <= heap_bound(body.len()),
        "{format:?}: {peak} bytes of heap for {} bytes of input",
        body.len()
    );
    match result {
        Ok(outcomes) => {
            prop_assert!(outcomes.len() <= LIMIT);
            for reason in outcomes.iter().filter_map(|o| o.as_ref().err()) {
                prop_assert!(!reason.is_empty() && reason.len() < 1_000, "{reason}");
            }
        }
        Err(BatchError::TooManyEvents { limit }) => prop_assert_eq!(limit, LIMIT),
        Err(BatchError::Malformed(m)) => prop_assert!(!m.is_empty() && m.len() < 2_000, "{m}"),
    }
    Ok(())
}

/// A plausible event as JSON, fields drawn at random (some of them wrong).
fn event_json() -> impl Strategy<Value = serde_json::Value> {
    (
        prop_oneof![Just("quote"), Just("trade"), Just("bogus")],
        "[a-z]{1,8}",
        any::<u64>(),
        prop_oneof![Just("AAPL".to_string()), "[A-Z.]{0,12}"],
        prop_oneof![
            Just("1.25".to_string()),
            "-?[0-9]{0,30}(\\.[0-9]{0,30})?",
            Just("NaN".into())
        ],
        any::<i64>(),
    )
        .prop_map(|(kind, source, seq, instrument, price, ts)| {
            json!({"kind": kind, "source": source, "seq": seq, "instrument": instrument,
                   "venue": "XNAS", "ts": ts, "price": price, "qty": "10", "side": "buy",
                   "bid": price, "ask": "2", "bid_size": "1", "ask_size": "1"})
        })
}

/// A mutation of a valid body: flip, cut, splice in junk, or repeat a slice.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Repeat(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Mutation::Repeat(i, n)),
    ]
}

fn mutate(mut body: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        if body.is_empty() {
            break;
        }
        let at = |i: usize| i % body.len();
        match m {
            Mutation::Flip(i, b) => {
                let i = at(*i);
                body[i] ^= b;
            }
            Mutation::Cut(i) => body.truncate(at(*i)),
            Mutation::Insert(i, v) => {
                let i = at(*i);
                body.splice(i..i, v.iter().copied());
            }
            Mutation::Repeat(i, n) => {
                let i = at(*i);
                let end = (i + n).min(body.len());
                let slice = body[i..end].to_vec();
                body.splice(i..i, slice);
            }
        }
    }
    body
}

/// Encodes events as MessagePack maps, as a MessagePack producer would.
fn msgpack_batch(events: &[serde_json::Value]) -> Vec<u8> {
    // serde_json's arbitrary_precision numbers would encode as maps; go through
    // plain types instead.
    let plain: Vec<std::collections::BTreeMap<String, rmpv_like::V>> = events
        .iter()
        .map(|e| {
            e.as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), rmpv_like::V::from(v)))
                .collect()
        })
        .collect();
    rmp_serde::to_vec_named(&plain).unwrap_or_default()
}

mod rmpv_like {
    //! Just enough of a dynamic value to write test events as MessagePack.

    #[derive(serde::Serialize)]
    #[serde(untagged)]
    pub enum V {
        S(String),
        U(u64),
        I(i64),
        Other(String),
    }

    impl From<&serde_json::Value> for V {
        fn from(v: &serde_json::Value) -> Self {
            match v {
                serde_json::Value::String(s) => V::S(s.clone()),
                serde_json::Value::Number(n) => n
                    .as_u64()
                    .map(V::U)
                    .or_else(|| n.as_i64().map(V::I))
                    .unwrap_or_else(|| V::Other(n.to_string())),
                other => V::Other(other.to_string()),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn random_bytes_never_break_any_decoder(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        for format in [Format::Json, Format::Ndjson, Format::MsgPack] {
            check(format, &body)?;
        }
        let _ = decode_entry::<RawRecord>(&body);
    }

    #[test]
    fn mutated_json_batches_never_break_the_decoder(
        events in prop::collection::vec(event_json(), 0..20),
        ms in prop::collection::vec(mutation(), 0..6),
    ) {
        let body = serde_json::to_vec(&events).unwrap_or_default();
        check(Format::Json, &mutate(body, &ms))?;
    }

    #[test]
    fn mutated_ndjson_batches_never_break_the_decoder(
        events in prop::collection::vec(event_json(), 0..20),
        ms in prop::collection::vec(mutation(), 0..6),
    ) {
        let body: Vec<u8> = events
            .iter()
            .flat_map(|e| {
                let mut line = e.to_string().into_bytes();
                line.push(b'\n');
                line
            })
            .collect();
        let body = mutate(body, &ms);
        check(Format::Ndjson, &body)?;
        // A broken line fails alone: the other lines are still answered.
        if ms.is_empty() {
            let items = decode_batch(Format::Ndjson, &body, LIMIT).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(items.len(), events.len());
        }
    }

    #[test]
    fn mutated_msgpack_batches_never_break_the_decoder(
        events in prop::collection::vec(event_json(), 0..20),
        ms in prop::collection::vec(mutation(), 0..6),
    ) {
        check(Format::MsgPack, &mutate(msgpack_batch(&events), &ms))?;
    }

    #[test]
    fn mutated_stream_entries_never_break_the_entry_decoder(
        events in prop::collection::vec(event_json(), 1..10),
        ms in prop::collection::vec(mutation(), 1..6),
    ) {
        // Real raw entries: valid events, encoded as ingest encodes them.
        let body = serde_json::to_vec(&events).unwrap_or_default();
        let records: Vec<Vec<u8>> = decode_batch(Format::Json, &body, LIMIT)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|item| item.outcome.ok())
            .filter_map(|event| RawRecord { event, ingest_ns: 1 }.encode().ok())
            .collect();
        let entry = tickgraph_ingest::stream::encode_batch(records.iter().map(Vec::as_slice));
        let body = mutate(entry, &ms);
        // serde caps what a sequence's length prefix may preallocate at 1 MiB.
        let (_, peak) = peak_during(|| decode_entry::<RawRecord>(&body));
        prop_assert!(peak <= (1 << 20) + heap_bound(body.len()), "{peak} bytes for {}", body.len());
    }
}

/// Nesting far deeper than any event has: a clear error (for the batch, or for
/// the event), never a stack overflow.
#[test]
fn deep_nesting_is_refused_clearly_in_every_format() {
    for depth in [200, 10_000, 1_000_000] {
        let nested: Vec<u8> = std::iter::repeat_n(b'[', depth)
            .chain(std::iter::repeat_n(b']', depth))
            .collect();
        let in_array: Vec<u8> = [&b"["[..], &nested, b"]"].concat();
        let object: Vec<u8> = [&b"{\"kind\":"[..], &nested, b"}"].concat();
        for (format, body) in [
            (Format::Json, &in_array),
            (Format::Json, &[&b"["[..], &object, b"]"].concat()),
            (Format::Ndjson, &nested),
            (Format::Ndjson, &object),
        ] {
            match decode_batch(format, body, LIMIT) {
                Err(BatchError::Malformed(m)) => assert!(!m.is_empty()),
                Err(e) => panic!("{format:?} depth {depth}: {e}"),
                Ok(items) => {
                    assert_eq!(items.len(), 1, "{format:?} depth {depth}");
                    let reason = &items[0].outcome.as_ref().expect_err("refused").0;
                    assert!(reason.starts_with("invalid event"), "{reason}");
                }
            }
        }
        let msgpack: Vec<u8> = std::iter::repeat_n(0x91, depth).collect();
        match decode_batch(Format::MsgPack, &msgpack, LIMIT) {
            Err(BatchError::Malformed(m)) => assert!(m.contains("nested deeper"), "{m}"),
            other => panic!("depth {depth}: {other:?}"),
        }
        assert!(decode_entry::<RawRecord>(&msgpack).is_err());
    }
}

/// Length prefixes that promise far more than the body holds are refused
/// without allocating what they promise.
#[test]
fn lying_lengths_allocate_nothing_like_what_they_claim() {
    let lies: [&[u8]; 5] = [
        &[0xdd, 0xff, 0xff, 0xff, 0xff],
        &[0x91, 0xdb, 0xff, 0xff, 0xff, 0xff],
        &[0x91, 0xc6, 0xff, 0xff, 0xff, 0xff],
        &[0x91, 0xdf, 0xff, 0xff, 0xff, 0xff],
        &[0xdc, 0xff, 0xff, 0x81, 0xa4, b'k', b'i', b'n', b'd'],
    ];
    for body in lies {
        let (result, peak) =
            peak_during(|| decode_batch(Format::MsgPack, body, 100_000).map(|v| v.len()));
        assert!(result.is_err(), "{body:?}: {result:?}");
        assert!(peak < 64 * 1024, "{body:?}: {peak} bytes");
        let (result, peak) = peak_during(|| decode_entry::<RawRecord>(body).map(|v| v.len()));
        assert!(result.is_err(), "{body:?}: {result:?}");
        assert!(peak < 2 * 1024 * 1024, "entry {body:?}: {peak} bytes");
    }
}
