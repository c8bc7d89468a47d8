//! The enriched entry decoder (what the loader and the api hub read) against
//! mutated real entries and random bytes: an error, never a panic.
//! `TG_FUZZ_CASES` sets the case count (default 5,000).

use proptest::prelude::*;
use tickgraph_enrich::EnrichedRecord;
use tickgraph_ingest::stream::decode_entry;
use tickgraph_ingest::test_support::fuzz_cases;

use crate::helpers::{quote, trade};

/// A real enriched entry: demo reference data, a quote and a trade.
static ENTRY: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(entry);

fn entry() -> Vec<u8> {
    let refs = tickgraph_enrich::demo::demo_refdata();
    let now = 1_700_000_000_000_000_000;
    let records: Vec<EnrichedRecord> = [
        quote(1, "AAPL", "XNAS", "187.25", "187.26"),
        trade(2, "AAPL", "XNAS", "187.25", "100", None),
    ]
    .iter()
    .filter_map(|raw| tickgraph_enrich::transform::enrich(raw, &refs, now).ok())
    .collect();
    assert_eq!(records.len(), 2, "fixture events enrich");
    EnrichedRecord::encode_batch(&records).expect("encode")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzz_cases(5_000)))]

    #[test]
    fn mutated_enriched_entries_never_panic(
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = ENTRY.clone();
        for (i, b) in flips {
            let i = i % bytes.len();
            bytes[i] ^= b;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let _ = decode_entry::<EnrichedRecord>(&bytes);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let _ = decode_entry::<EnrichedRecord>(&bytes);
    }
}
