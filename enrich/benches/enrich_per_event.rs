//! Per-event CPU cost of the enrich worker's hot path, without Redis or Postgres.
//!
//! Reference data is the whole demo universe (`demo::demo_refdata()`, 2,000+
//! instruments, in memory). Events are 1000 drawn by the demo feed's market
//! simulator over those instruments and accounts, as `tickgraph all --feed-rate`
//! does (about 80% quotes, 20% trades with an account), decoded and validated by
//! ingest into `RawRecord`s. Every one of them enriches.
//!
//! Allocator: the system one. The `tickgraph` binary runs on mimalloc, so absolute
//! numbers there may differ; ratios between these benches are what to watch.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use tickgraph_enrich::demo::{demo_refdata, feed_records};
use tickgraph_enrich::{enrich, EnrichedRecord, RefData};
use tickgraph_ingest::stream::{decode_entry, encode_batch, RawRecord};

const BATCH: usize = 1000;
const INGEST_NS: i64 = 1_764_066_667_000_000_000;
const ENRICHED_NS: i64 = INGEST_NS + 250_000;

/// Demo events over `refs`, built the way `tickgraph all` builds its feed.
fn raw_records(refs: &RefData) -> Vec<RawRecord> {
    let raws = feed_records(refs, BATCH, 0.2, INGEST_NS);
    assert_eq!(raws.len(), BATCH, "the feed sends only valid events");
    raws
}

fn enriched(raws: &[RawRecord], refs: &RefData) -> Vec<EnrichedRecord> {
    raws.iter()
        .map(|r| enrich(r, refs, ENRICHED_NS).expect("demo events enrich"))
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

/// - `transform`: `enrich()` alone, the pure join (instrument, venue, account and
///   FX lookups) plus derived fields, one call per event, results collected.
/// - `worker_cpu`: what `worker::Enricher::handle` does per raw batch entry
///   before its Lua commit: `decode_entry::<RawRecord>`, `enrich` each, then
///   `EnrichedRecord::encode_batch`. The RefCache read lock is taken outside the
///   loop, as the worker takes it once per batch.
fn transform(c: &mut Criterion) {
    let refs = demo_refdata();
    let raws = raw_records(&refs);
    assert_eq!(enriched(&raws, &refs).len(), BATCH);
    let encoded: Vec<Vec<u8>> = raws
        .iter()
        .map(|r| r.encode().expect("raw record encodes"))
        .collect();
    let raw_entry = encode_batch(encoded.iter().map(Vec::as_slice));

    let mut g = quick(c, "enrich/transform");
    g.bench_function("enrich", |b| {
        b.iter(|| {
            black_box(&raws)
                .iter()
                .map(|r| enrich(r, &refs, ENRICHED_NS))
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("worker_cpu", |b| {
        b.iter(|| {
            let raws = decode_entry::<RawRecord>(black_box(&raw_entry)).expect("raw entry");
            let records: Vec<EnrichedRecord> = raws
                .iter()
                .filter_map(|r| enrich(r, &refs, ENRICHED_NS).ok())
                .collect();
            EnrichedRecord::encode_batch(&records)
        })
    });
    g.finish();
}

/// The enriched stream codec:
/// - `record_encode`: `EnrichedRecord::encode` of each event on its own.
/// - `encode_batch`: `EnrichedRecord::encode_batch` of all 1000 (what the worker
///   writes as one entry).
/// - `decode_entry`: `decode_entry::<EnrichedRecord>` of that entry (what the
///   loader and the API hub do with it).
fn codec(c: &mut Criterion) {
    let refs = demo_refdata();
    let records = enriched(&raw_records(&refs), &refs);
    let entry = EnrichedRecord::encode_batch(&records).expect("batch encodes");
    let back: Vec<EnrichedRecord> = decode_entry(&entry).expect("entry decodes");
    assert_eq!(back, records);

    let mut g = quick(c, "enrich/codec");
    g.bench_function("record_encode", |b| {
        b.iter(|| {
            black_box(&records)
                .iter()
                .map(EnrichedRecord::encode)
                .collect::<Result<Vec<_>, _>>()
        })
    });
    g.bench_function("encode_batch", |b| {
        b.iter(|| EnrichedRecord::encode_batch(black_box(&records)))
    });
    g.bench_function("decode_entry", |b| {
        b.iter(|| decode_entry::<EnrichedRecord>(black_box(&entry)))
    });
    g.finish();
}

criterion_group!(benches, transform, codec);
criterion_main!(benches);
