//! The enrich worker end to end: raw streams in, enriched and dead-letter streams
//! out, through crashes of other consumers and of itself.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use redis::AsyncCommands;
use sqlx::PgPool;
use tickgraph_enrich::consumer::{BatchHandler, Entry};
use tickgraph_enrich::refdata::AssetClass;
use tickgraph_enrich::worker::{self, EnrichConfig, Enricher};
use tickgraph_enrich::{Derived, EnrichedRecord, RefCache};
use tickgraph_ingest::stream::{decode_entry, ensure_group, RawRecord, ENRICH_GROUP};
use tickgraph_ingest::Event;
use tokio_util::sync::CancellationToken;

use crate::helpers::{dec, quote, seed_refdata, trade, TestRedis};

fn config(r: &TestRedis, consumer: &str) -> EnrichConfig {
    let mut cfg = EnrichConfig::new(r.layout.clone(), consumer);
    cfg.block = Duration::from_millis(100);
    cfg.batch = 7;
    cfg
}

/// Starts the worker, waits until every raw stream is drained, stops it and
/// checks it returned cleanly.
async fn run_until_drained(r: &mut TestRedis, cfg: EnrichConfig, refs: RefCache) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker::run(cfg, r.client.clone(), refs, shutdown.clone()));
    let raw: Vec<String> = r.layout.shard_ids().map(|s| r.layout.raw(s)).collect();
    r.wait_drained(&raw, ENRICH_GROUP).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("worker stops after shutdown")
        .expect("worker task")
        .expect("worker returns Ok");
}

/// Every enriched record, keyed by event id, with the shard stream it was in.
async fn enriched(r: &mut TestRedis) -> Vec<(u16, EnrichedRecord)> {
    let mut out = Vec::new();
    for s in r.layout.shard_ids().collect::<Vec<_>>() {
        let key = r.layout.enriched(s);
        for e in r.range(&key).await {
            let bytes = e.record.expect("enriched entry has its record");
            for rec in decode_entry::<EnrichedRecord>(&bytes).expect("decodes") {
                out.push((s, rec));
            }
        }
    }
    out
}

async fn raw_pending(r: &mut TestRedis) -> usize {
    let mut total = 0;
    for s in r.layout.shard_ids().collect::<Vec<_>>() {
        total += r.group_state(&r.layout.raw(s), ENRICH_GROUP).await.0;
    }
    total
}

#[sqlx::test(migrations = "../migrations")]
async fn enriches_good_events_and_dead_letters_bad_ones(pool: PgPool) {
    seed_refdata(&pool).await;
    let refs = RefCache::load(&pool).await.expect("refdata");
    let mut r = TestRedis::new(2).await;

    let good = vec![
        quote(1, "AAPL", "XNAS", "187.25", "187.26"),
        trade(2, "AAPL", "XNAS", "187.25", "100", Some("ACC1")),
        trade(3, "VOD.L", "XLON", "72.34", "1000", None),
        quote(4, "VOD.L", "XLON", "72.30", "72.36"),
        // Trading away from the primary listing is normal.
        trade(5, "MSFT", "XLON", "415.10", "3", None),
    ];
    let bad = vec![
        (
            quote(10, "ZZZZ", "XNAS", "1", "2"),
            "unknown instrument \"ZZZZ\"",
        ),
        (
            trade(11, "AAPL", "XXXX", "1", "1", None),
            "unknown venue \"XXXX\"",
        ),
        (
            trade(12, "AAPL", "XNAS", "1", "1", Some("NOPE")),
            "unknown account \"NOPE\"",
        ),
        (
            trade(13, "7203.T", "XTKS", "2841", "100", None),
            "no USD FX rate for currency \"JPY\"",
        ),
    ];
    let mut all: Vec<RawRecord> = good.clone();
    all.extend(bad.iter().map(|(rec, _)| rec.clone()));
    r.add_raw(&all).await;
    let raw0 = r.layout.raw(0);
    let garbage_id = r.add(&raw0, b"not messagepack").await;

    let cfg = config(&r, "w1");
    run_until_drained(&mut r, cfg, refs).await;

    let out = enriched(&mut r).await;
    assert_eq!(out.len(), good.len(), "exactly the good events: {out:?}");
    let by_seq: HashMap<u64, (u16, EnrichedRecord)> = out
        .into_iter()
        .map(|(s, rec)| (rec.event.header().seq, (s, rec)))
        .collect();
    for rec in &good {
        let (shard, e) = &by_seq[&rec.event.header().seq];
        assert_eq!(&e.event, &rec.event);
        assert_eq!(e.ingest_ns, rec.ingest_ns);
        assert!(e.enriched_ns > 0);
        assert_eq!(e.asset_class, AssetClass::Equity);
        assert_eq!(*shard, r.layout.shard_of(&rec.event.header().instrument));
    }
    let derived = |seq: u64| by_seq[&seq].1.derived.clone();
    assert_eq!(
        derived(1),
        Derived::Quote {
            mid: dec("187.255"),
            spread: dec("0.01")
        }
    );
    assert_eq!(
        derived(2),
        Derived::Trade {
            notional: dec("18725"),
            notional_usd: dec("18725")
        }
    );
    assert_eq!(
        derived(3),
        Derived::Trade {
            notional: dec("72340"),
            notional_usd: dec("911.484")
        }
    );
    assert_eq!(
        derived(4),
        Derived::Quote {
            mid: dec("72.33"),
            spread: dec("0.06")
        }
    );
    assert_eq!(by_seq[&3].1.currency, "GBX");
    assert_eq!(by_seq[&5].1.currency, "USD");

    let mut letters = Vec::new();
    for key in r.layout.all_dlqs() {
        letters.extend(r.range_fields(&key).await);
    }
    assert_eq!(
        letters.len(),
        bad.len() + 1,
        "every bad entry dead-lettered once"
    );
    for (rec, reason) in &bad {
        let id = rec.event.id();
        let letter = letters
            .iter()
            .find(|l| l.get("event_id").map(Vec::as_slice) == Some(id.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {id}"));
        assert_eq!(letter["stage"], b"enrich");
        assert_eq!(String::from_utf8_lossy(&letter["reason"]), *reason);
        let payload: Event =
            serde_json::from_slice(&letter["payload"]).expect("payload is the event as JSON");
        assert_eq!(payload, rec.event);
    }
    let garbage = letters
        .iter()
        .find(|l| !l.contains_key("event_id"))
        .expect("dead letter for the undecodable entry");
    let reason = String::from_utf8_lossy(&garbage["reason"]).to_string();
    assert!(
        reason.starts_with(&format!("undecodable raw entry {garbage_id}")),
        "{reason}"
    );
    assert_eq!(garbage["payload"], b"not messagepack");

    assert_eq!(raw_pending(&mut r).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_batch_entry_becomes_one_enriched_entry_in_order_minus_its_bad_events(pool: PgPool) {
    seed_refdata(&pool).await;
    let refs = RefCache::load(&pool).await.expect("refdata");
    let mut r = TestRedis::new(1).await;
    let batch = vec![
        quote(1, "AAPL", "XNAS", "187.25", "187.26"),
        quote(2, "ZZZZ", "XNAS", "1", "2"),
        trade(3, "AAPL", "XNAS", "187.25", "100", None),
        trade(4, "MSFT", "XNAS", "415.10", "3", None),
    ];
    r.add_raw_batch(&batch).await;

    let cfg = config(&r, "w1");
    run_until_drained(&mut r, cfg, refs).await;

    let entries = r.range(&r.layout.enriched(0)).await;
    assert_eq!(entries.len(), 1, "one enriched entry per raw entry");
    let bytes = entries[0].record.clone().expect("record");
    let recs = decode_entry::<EnrichedRecord>(&bytes).expect("a batch");
    let seqs: Vec<u64> = recs.iter().map(|r| r.event.header().seq).collect();
    assert_eq!(
        seqs,
        vec![1, 3, 4],
        "same events, same order, minus the bad one"
    );
    let letters = r.range_fields(&r.layout.dlq(0)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["event_id"], batch[1].event.id().into_bytes());
    assert_eq!(raw_pending(&mut r).await, 0);
}

/// Events spread over both shards, seq 100.. .
fn many(n: u64) -> Vec<RawRecord> {
    (0..n)
        .map(|i| {
            let instrument = ["AAPL", "MSFT", "VOD.L"][(i % 3) as usize];
            let venue = if instrument == "VOD.L" {
                "XLON"
            } else {
                "XNAS"
            };
            if i % 2 == 0 {
                quote(100 + i, instrument, venue, "10.00", "10.02")
            } else {
                trade(100 + i, instrument, venue, "10.01", "5", None)
            }
        })
        .collect()
}

async fn read_without_ack(r: &mut TestRedis, consumer: &str) -> usize {
    let mut taken = 0;
    for s in r.layout.shard_ids().collect::<Vec<_>>() {
        let key = r.layout.raw(s);
        ensure_group(&mut r.con, &key, ENRICH_GROUP)
            .await
            .expect("group");
        let opts = redis::streams::StreamReadOptions::default()
            .group(ENRICH_GROUP, consumer)
            .count(10_000);
        let reply: redis::streams::StreamReadReply = r
            .con
            .xread_options(&[&key], &[">"], &opts)
            .await
            .expect("xreadgroup");
        taken += reply.keys.iter().map(|k| k.ids.len()).sum::<usize>();
    }
    taken
}

fn assert_each_once(out: &[(u16, EnrichedRecord)], expected: &[RawRecord]) {
    let seen: Vec<u64> = out.iter().map(|(_, e)| e.event.header().seq).collect();
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    let want: BTreeSet<u64> = expected.iter().map(|e| e.event.header().seq).collect();
    assert_eq!(seen.len(), unique.len(), "an event was enriched twice");
    assert_eq!(unique, want);
}

#[sqlx::test(migrations = "../migrations")]
async fn claims_the_entries_of_a_dead_consumer(pool: PgPool) {
    seed_refdata(&pool).await;
    let refs = RefCache::load(&pool).await.expect("refdata");
    let mut r = TestRedis::new(2).await;
    let before = many(40);
    r.add_raw(&before).await;
    assert_eq!(read_without_ack(&mut r, "dead").await, before.len());
    // And some that nobody has read yet.
    let after: Vec<RawRecord> = many(60).split_off(40);
    r.add_raw(&after).await;

    let mut cfg = config(&r, "live");
    cfg.claim_idle = Duration::from_millis(200);
    run_until_drained(&mut r, cfg, refs).await;

    let mut expected = before;
    expected.extend(after);
    assert_each_once(&enriched(&mut r).await, &expected);
    assert_eq!(raw_pending(&mut r).await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_restarted_consumer_finishes_its_own_pending_entries(pool: PgPool) {
    seed_refdata(&pool).await;
    let refs = RefCache::load(&pool).await.expect("refdata");
    let mut r = TestRedis::new(2).await;
    let events = many(30);
    r.add_raw(&events).await;
    // The same name as the worker: its previous life read these and crashed.
    assert_eq!(read_without_ack(&mut r, "w1").await, events.len());

    let mut cfg = config(&r, "w1");
    // Far too long to claim anything: only the own-pending pass can find them.
    cfg.claim_idle = Duration::from_secs(3600);
    run_until_drained(&mut r, cfg, refs).await;

    assert_each_once(&enriched(&mut r).await, &events);
}

#[sqlx::test(migrations = "../migrations")]
async fn pending_entries_trimmed_away_are_acked_not_stuck(pool: PgPool) {
    seed_refdata(&pool).await;
    let refs = RefCache::load(&pool).await.expect("refdata");
    let mut r = TestRedis::new(1).await;
    let lost = many(5);
    let ids = r.add_raw(&lost).await;
    assert_eq!(read_without_ack(&mut r, "w1").await, lost.len());
    let key = r.layout.raw(0);
    let _: usize = r.con.xdel(&key, &ids).await.expect("xdel");
    let fresh = vec![quote(999, "AAPL", "XNAS", "1.00", "1.01")];
    r.add_raw(&fresh).await;

    let mut cfg = config(&r, "w1");
    cfg.claim_idle = Duration::from_secs(3600);
    run_until_drained(&mut r, cfg, refs).await;

    assert_each_once(&enriched(&mut r).await, &fresh);
    assert_eq!(raw_pending(&mut r).await, 0);
}

/// The entries of an XREADGROUP reply, as the consumer hands them to a handler.
fn entries_of(reply: redis::streams::StreamReadReply) -> Vec<Entry> {
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|id| {
            let record = match id.map.get("e") {
                Some(redis::Value::BulkString(b)) => b.clone(),
                other => panic!("entry without record: {other:?}"),
            };
            Entry { id: id.id, record }
        })
        .collect()
}

/// The entries `consumer` holds pending, with their payloads, per shard.
async fn own_pending(r: &mut TestRedis, consumer: &str) -> Vec<(u16, String, Vec<Entry>)> {
    let mut out = Vec::new();
    for s in r.layout.shard_ids().collect::<Vec<_>>() {
        let key = r.layout.raw(s);
        let opts = redis::streams::StreamReadOptions::default()
            .group(ENRICH_GROUP, consumer)
            .count(10_000);
        let reply: redis::streams::StreamReadReply = r
            .con
            .xread_options(&[&key], &["0"], &opts)
            .await
            .expect("xreadgroup own pending");
        let entries = entries_of(reply);
        out.push((s, key, entries));
    }
    out
}

#[sqlx::test(migrations = "../migrations")]
async fn a_batch_done_twice_is_written_once(pool: PgPool) {
    // A slow consumer holds a batch past claim_idle; another consumer claims and
    // commits it; then the slow one commits the same batch. The second commit
    // must write nothing.
    seed_refdata(&pool).await;
    let refs = RefCache::load(&pool).await.expect("refdata");
    let mut r = TestRedis::new(2).await;
    let events = many(30);
    r.add_raw(&events).await;
    assert_eq!(read_without_ack(&mut r, "slow").await, events.len());
    let held = own_pending(&mut r, "slow").await;
    assert_eq!(
        held.iter().map(|(_, _, e)| e.len()).sum::<usize>(),
        events.len()
    );

    let mut cfg = config(&r, "claimer");
    cfg.claim_idle = Duration::from_millis(200);
    run_until_drained(&mut r, cfg, refs.clone()).await;
    assert_each_once(&enriched(&mut r).await, &events);

    let slow = Enricher::new(config(&r, "slow"), &r.client.clone().into(), refs).expect("enricher");
    for (shard, key, entries) in held {
        slow.handle(shard, &key, entries)
            .await
            .expect("late commit succeeds");
    }
    assert_each_once(&enriched(&mut r).await, &events);
    assert_eq!(raw_pending(&mut r).await, 0);
}

/// A producer's re-send (same source and seq) is enriched once, whether it comes
/// in the same raw entry or a later one; turning the window off lets it through
/// (the history would still store it once). A long batch checks that the entry
/// the commit script assembles is one array of every new event, in order.
#[sqlx::test(migrations = "../migrations")]
async fn a_resent_event_is_enriched_once(pool: PgPool) {
    seed_refdata(&pool).await;
    let refs = RefCache::load(&pool).await.expect("refdata");
    let long = many(40);
    for (window, expected) in [
        (Duration::from_secs(600), vec![1, 2, 3]),
        (Duration::ZERO, vec![1, 1, 2, 2, 3]),
    ] {
        // One shard: a raw batch entry holds the events of one shard.
        let mut r = TestRedis::new(1).await;
        let first = quote(1, "AAPL", "XNAS", "187.25", "187.26");
        let second = trade(2, "VOD.L", "XLON", "72.34", "1000", None);
        r.add_raw_batch(&[first.clone(), second.clone(), first.clone()])
            .await;
        r.add_raw_batch(&[second, quote(3, "MSFT", "XNAS", "415.00", "415.02")])
            .await;
        r.add_raw_batch(&long).await;
        r.add_raw_batch(&long).await;
        let mut cfg = config(&r, "w1");
        cfg.dedupe_window = window;
        run_until_drained(&mut r, cfg, refs.clone()).await;
        let out = enriched(&mut r).await;
        let mut seqs: Vec<u64> = out
            .iter()
            .map(|(_, e)| e.event.header().seq)
            .filter(|&s| s < 100)
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, expected, "window {window:?}");
        let long_seen = out.iter().filter(|(_, e)| e.event.header().seq >= 100);
        let per_shard: Vec<Vec<u64>> = r
            .layout
            .shard_ids()
            .map(|s| {
                long_seen
                    .clone()
                    .filter(|(shard, _)| *shard == s)
                    .map(|(_, e)| e.event.header().seq)
                    .collect()
            })
            .collect();
        let copies = if window.is_zero() { 2 } else { 1 };
        assert_eq!(
            per_shard.iter().map(Vec::len).sum::<usize>(),
            40 * copies,
            "window {window:?}"
        );
        if !window.is_zero() {
            for seqs in per_shard {
                assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
            }
        }
        assert_eq!(raw_pending(&mut r).await, 0);
    }
}

/// One entry whose events use several dedupe bitmaps (two sources, and a
/// second block of one source's seqs), with re-sends in the later bitmaps: each
/// bitmap's answers are matched to its own events, and the entry keeps every
/// first sending, in order.
#[sqlx::test(migrations = "../migrations")]
async fn re_sends_spread_over_several_bitmaps_are_each_dropped(pool: PgPool) {
    seed_refdata(&pool).await;
    let refs = RefCache::load(&pool).await.expect("refdata");
    let from = |source: &str, seq: u64| {
        let mut q = quote(seq, "AAPL", "XNAS", "187.25", "187.26");
        if let Event::Quote(q) = &mut q.event {
            q.header.source = tickgraph_ingest::event::Source::parse(source).expect("source");
        }
        q
    };
    let far = worker::SEEN_BLOCK_BITS + 5;
    let mut r = TestRedis::new(1).await;
    r.add_raw_batch(&[
        from("a", 1),
        from("b", 1),
        from("a", far),
        from("b", 1),
        from("a", 2),
        from("a", far),
        from("b", 2),
    ])
    .await;
    let cfg = config(&r, "w1");
    run_until_drained(&mut r, cfg, refs).await;
    let got: Vec<(String, u64)> = enriched(&mut r)
        .await
        .into_iter()
        .map(|(_, e)| {
            let h = e.event.header();
            (h.source.as_str().to_owned(), h.seq)
        })
        .collect();
    let want = [("a", 1), ("b", 1), ("a", far), ("a", 2), ("b", 2)];
    let want: Vec<(String, u64)> = want.iter().map(|(s, q)| ((*s).to_owned(), *q)).collect();
    assert_eq!(got, want);
}

/// Takes the next `n` entries of shard 0's raw stream for `consumer`, unacked.
async fn take(r: &mut TestRedis, consumer: &str, n: usize) -> Vec<Entry> {
    let key = r.layout.raw(0);
    ensure_group(&mut r.con, &key, ENRICH_GROUP)
        .await
        .expect("group");
    let opts = redis::streams::StreamReadOptions::default()
        .group(ENRICH_GROUP, consumer)
        .count(n);
    let reply: redis::streams::StreamReadReply = r
        .con
        .xread_options(&[&key], &[">"], &opts)
        .await
        .expect("xreadgroup");
    let entries = entries_of(reply);
    assert_eq!(entries.len(), n);
    entries
}

/// Two workers in the group hold consecutive runs of one shard. The later run
/// is not written before the earlier one, whichever finishes first: the
/// enriched stream keeps the raw stream's order, so each instrument's events
/// reach subscribers in order.
#[sqlx::test(migrations = "../migrations")]
async fn two_workers_keep_a_shard_in_order(pool: PgPool) {
    seed_refdata(&pool).await;
    let refs = RefCache::load(&pool).await.expect("refdata");
    let mut r = TestRedis::new(1).await;
    let events = many(20);
    r.add_raw(&events).await;
    let key = r.layout.raw(0);
    let first = take(&mut r, "a", 10).await;
    let second = take(&mut r, "b", 10).await;
    let a = Enricher::new(config(&r, "a"), &r.client.clone().into(), refs.clone()).expect("a");
    let b = Enricher::new(config(&r, "b"), &r.client.clone().into(), refs).expect("b");

    // "a" never commits: "b" gives up, naming what it waits for, and writes nothing.
    let e = b
        .handle(0, &key, second.clone())
        .await
        .expect_err("b must wait for a's older entries");
    assert!(e.to_string().contains("with consumer a"), "{e}");
    assert!(enriched(&mut r).await.is_empty(), "b wrote before a");

    // "a" commits while "b" waits: "b" follows.
    let b = std::sync::Arc::new(b);
    let waiting = {
        let (b, key) = (b.clone(), key.clone());
        tokio::spawn(async move { b.handle(0, &key, second).await })
    };
    tokio::time::sleep(Duration::from_millis(40)).await;
    a.handle(0, &key, first).await.expect("a commits");
    waiting.await.expect("task").expect("b commits once a has");

    let seqs: Vec<u64> = enriched(&mut r)
        .await
        .iter()
        .map(|(_, e)| e.event.header().seq)
        .collect();
    let want: Vec<u64> = events.iter().map(|e| e.event.header().seq).collect();
    assert_eq!(
        seqs, want,
        "the enriched stream is out of the raw stream's order"
    );
    assert_eq!(raw_pending(&mut r).await, 0);
}
