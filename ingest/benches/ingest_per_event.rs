//! Per-event CPU cost of ingest's hot path, without Redis or HTTP.
//!
//! Batches are 1000 events drawn by the demo feed's own market simulator
//! (`feed::Market`: about 80% quotes, 20% trades with a trade id and an account,
//! activity skewed to the first instruments), so field shapes and sizes are what
//! `tickgraph feed` sends. The instruments are a slice of the demo universe; the
//! full universe lives in `tickgraph-enrich`, which this crate cannot depend on.
//!
//! Allocator: the system one. The `tickgraph` binary runs on mimalloc, so absolute
//! numbers there may differ; ratios between these benches are what to watch.

use std::hint::black_box;
use std::str::FromStr;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use rust_decimal::Decimal;
use tickgraph_ingest::feed::{FeedInstrument, Market};
use tickgraph_ingest::stream::{decode_entry, encode_batch, RawRecord, StreamLayout};
use tickgraph_ingest::wire::{decode_batch, Format};
use tickgraph_ingest::Event;

const BATCH: usize = 1000;
/// Ingest's default `--max-batch-events`.
const MAX_BATCH_EVENTS: usize = 10_000;
const INGEST_NS: i64 = 1_764_066_667_000_000_000;

/// (symbol, primary venue, start price, tick), as in the demo reference data.
const INSTRUMENTS: &[(&str, &str, &str, &str)] = &[
    ("AAPL", "XNAS", "189.84", "0.01"),
    ("MSFT", "XNAS", "415.26", "0.01"),
    ("NVDA", "XNAS", "121.79", "0.01"),
    ("AMZN", "XNAS", "184.70", "0.01"),
    ("JPM", "XNYS", "221.49", "0.01"),
    ("V", "XNYS", "279.86", "0.01"),
    ("SPY", "ARCX", "521.90", "0.01"),
    ("VOD.L", "XLON", "72.34", "0.02"),
    ("7203.T", "XTKS", "2841", "0.5"),
    ("0700.HK", "XHKG", "381.20", "0.2"),
    ("EURUSD", "XOFF", "1.08500", "0.00001"),
    ("BTCUSD", "XOFF", "65120.50", "0.01"),
    ("ESZ5", "XCME", "5325.00", "0.25"),
];

fn market() -> Market {
    let dec = |s: &str| Decimal::from_str(s).expect("instrument literal");
    let instruments = INSTRUMENTS
        .iter()
        .map(|&(symbol, venue, price, tick)| FeedInstrument {
            symbol: symbol.into(),
            venue: venue.into(),
            price: dec(price),
            tick: dec(tick),
        })
        .collect();
    let accounts = ["USEQ-01", "USEQ-02", "EMEQ-01", "FXSP-03", "DIGA-02"]
        .map(String::from)
        .to_vec();
    Market::new(instruments, "demo-feed".into(), 0.2, accounts, 42)
}

/// The same 1000 events in each wire format.
struct Bodies {
    json: Vec<u8>,
    ndjson: Vec<u8>,
    msgpack: Vec<u8>,
}

fn bodies() -> Bodies {
    // Equal seeds draw equal events; only the seq base (from the clock) differs.
    let json = market().batch(BATCH, false);
    let msgpack = market().batch(BATCH, true);
    let items = decode_batch(Format::Json, &json, MAX_BATCH_EVENTS).expect("feed JSON decodes");
    let mut ndjson = Vec::with_capacity(json.len() + BATCH);
    for item in &items {
        ndjson.extend_from_slice(item.raw);
        ndjson.push(b'\n');
    }
    Bodies {
        json,
        ndjson,
        msgpack,
    }
}

fn valid_events(format: Format, body: &[u8]) -> Vec<Event> {
    decode_batch(format, body, MAX_BATCH_EVENTS)
        .expect("framing")
        .into_iter()
        .map(|i| i.outcome.expect("the feed sends only valid events"))
        .collect()
}

fn quick<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(BATCH as u64))
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

/// `wire::decode_batch`: framing, per-item serde decode into `WireEvent` and its
/// validation into `Event` (`WireEvent::into_event`), exactly as `ingest_batch`
/// calls it. Every event of these batches is valid.
fn decode_validate(c: &mut Criterion) {
    let b = bodies();
    for (format, body) in [
        (Format::Json, &b.json),
        (Format::Ndjson, &b.ndjson),
        (Format::MsgPack, &b.msgpack),
    ] {
        assert_eq!(valid_events(format, body).len(), BATCH);
    }
    let mut g = quick(c, "ingest/decode_validate");
    g.bench_function("json_array", |bch| {
        bch.iter(|| decode_batch(Format::Json, black_box(&b.json), MAX_BATCH_EVENTS))
    });
    g.bench_function("ndjson", |bch| {
        bch.iter(|| decode_batch(Format::Ndjson, black_box(&b.ndjson), MAX_BATCH_EVENTS))
    });
    g.bench_function("msgpack", |bch| {
        bch.iter(|| decode_batch(Format::MsgPack, black_box(&b.msgpack), MAX_BATCH_EVENTS))
    });
    g.finish();
}

/// The stream side of `ingest_batch` and the writer, per event:
/// - `record_encode`: `shard_of` + `RawRecord::encode` (named MessagePack).
/// - `encode_batch`: joining 1000 encoded records into one batch entry (the writer
///   does this per shard and chunk; here one chunk of all 1000).
/// - `decode_entry`: what enrich does with that entry, `decode_entry::<RawRecord>`.
///
/// Records are built beforehand, so the event clone `ingest_batch` avoids (it
/// moves the event) is not counted.
fn stream_codec(c: &mut Criterion) {
    let b = bodies();
    let records: Vec<RawRecord> = valid_events(Format::Json, &b.json)
        .into_iter()
        .map(|event| RawRecord {
            event,
            ingest_ns: INGEST_NS,
        })
        .collect();
    let layout = StreamLayout::default();
    let encoded: Vec<Vec<u8>> = records
        .iter()
        .map(|r| r.encode().expect("record encodes"))
        .collect();
    let entry = encode_batch(encoded.iter().map(Vec::as_slice));
    let back: Vec<RawRecord> = decode_entry(&entry).expect("entry decodes");
    assert_eq!(back, records);

    let mut g = quick(c, "ingest/stream");
    g.bench_function("record_encode", |bch| {
        bch.iter(|| {
            black_box(&records)
                .iter()
                .map(|r| {
                    let shard = layout.shard_of(&r.event.header().instrument);
                    r.encode().map(|bytes| (shard, bytes))
                })
                .collect::<Result<Vec<_>, _>>()
        })
    });
    g.bench_function("encode_batch", |bch| {
        bch.iter(|| encode_batch(black_box(&encoded).iter().map(Vec::as_slice)))
    });
    g.bench_function("decode_entry", |bch| {
        bch.iter(|| decode_entry::<RawRecord>(black_box(&entry)))
    });
    g.finish();
}

criterion_group!(benches, decode_validate, stream_codec);
criterion_main!(benches);
