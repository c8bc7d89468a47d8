//! Decodes one 256-event stream entry of demo events a given number of times,
//! for counting instructions with callgrind, which (unlike Criterion's wall
//! clock on a shared machine) gives the same count on every run:
//!
//! ```text
//! decode_entry_cost <raw|enriched> <fast|serde> <times>
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/decode_entry_cost enriched fast 200
//! ```
//!
//! `fast` is `decode_entry` (the hand-written decoder, serde only as its
//! fallback), `serde` is `decode_entry_with_serde`, what `decode_entry` was
//! before. Setup is the same for both, so the difference of two runs with
//! different `times` is the cost of the decodes alone.

use std::hint::black_box;
use std::process::ExitCode;

use tickgraph_enrich::demo::{demo_refdata, feed_records};
use tickgraph_enrich::{enrich, EnrichedRecord};
use tickgraph_ingest::stream::{
    decode_entry, decode_entry_with_serde, encode_batch, CodecError, RawRecord,
};

/// Ingest's and enrich's largest batch entry.
const EVENTS: usize = 256;
const INGEST_NS: i64 = 1_764_066_667_000_000_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(kind), Some(path), Some(Ok(times))) = (
        args.first(),
        args.get(1),
        args.get(2).map(|n| n.parse::<usize>()),
    ) else {
        eprintln!("usage: decode_entry_cost <raw|enriched> <fast|serde> <times>");
        return ExitCode::FAILURE;
    };
    let refs = demo_refdata();
    let raws = feed_records(&refs, EVENTS, 0.2, INGEST_NS);
    let decoded = match (kind.as_str(), path.as_str()) {
        ("raw", p) => {
            let encoded: Vec<Vec<u8>> = raws.iter().filter_map(|r| r.encode().ok()).collect();
            let entry = encode_batch(encoded.iter().map(Vec::as_slice));
            run::<RawRecord>(&entry, p, times)
        }
        ("enriched", p) => {
            let records: Vec<EnrichedRecord> = raws
                .iter()
                .filter_map(|r| enrich(r, &refs, INGEST_NS + 250_000).ok())
                .collect();
            let Ok(entry) = EnrichedRecord::encode_batch(&records) else {
                eprintln!("the entry does not encode");
                return ExitCode::FAILURE;
            };
            run::<EnrichedRecord>(&entry, p, times)
        }
        _ => None,
    };
    match decoded {
        Some(Ok(n)) => {
            println!("{kind} {path}: {times} x {n} events");
            ExitCode::SUCCESS
        }
        Some(Err(e)) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
        None => {
            eprintln!("usage: decode_entry_cost <raw|enriched> <fast|serde> <times>");
            ExitCode::FAILURE
        }
    }
}

/// Decodes `entry` `times` times by `path`; the number of events in it.
fn run<T>(entry: &[u8], path: &str, times: usize) -> Option<Result<usize, CodecError>>
where
    T: tickgraph_ingest::fast_decode::FastDecode + serde::de::DeserializeOwned,
{
    let decode: fn(&[u8]) -> Result<Vec<T>, CodecError> = match path {
        "fast" => decode_entry::<T>,
        "serde" => decode_entry_with_serde::<T>,
        _ => return None,
    };
    let n = decode(entry).map(|v| v.len());
    for _ in 0..times {
        if let Err(e) = black_box(decode(black_box(entry))) {
            return Some(Err(e));
        }
    }
    Some(n)
}
