//! Per-event CPU cost of the API's live path, without Redis or Postgres.
//!
//! Events are drawn by the demo feed's market simulator over the whole demo
//! universe (`demo_refdata()`), validated by ingest and enriched by
//! `tickgraph_enrich::enrich`, as in `tickgraph all --feed-rate`.
//!
//! The hub is a reader-less `Hub::new`, fed with `Hub::publish`, which is the
//! dispatch a shard reader runs after its XREAD. The GraphQL benches run the real
//! schema (`schema::build`) over that hub; its `Services` hold a lazy Postgres
//! pool that never connects, since live `Trade`/`Quote` fields never touch it.
//!
//! Allocator: the system one, like the other crates' benches. The `tickgraph`
//! binary runs on mimalloc, so absolute numbers there may differ.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::Response;
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tickgraph_api::hub::Feed;
use tickgraph_api::schema::{self, Limits, Services};
use tickgraph_api::shared_json::response_json;
use tickgraph_api::tick::{event_cursor, QuoteTick, Tick, TickMeta, TradeTick};
use tickgraph_api::{ApiConfig, Filter, Hub};
use tickgraph_enrich::demo::{demo_refdata, feed_records};
use tickgraph_enrich::refdata::{AssetClass, RefCache, RefData};
use tickgraph_enrich::{enrich, EnrichedRecord};
use tickgraph_ingest::stream::{decode_entry, is_batch, shard_of};
use tickgraph_ingest::Side;

const BATCH: usize = 1000;
const SHARDS: u16 = 4;
/// Far above one batch: no subscriber is ever cut off as too slow here.
const QUEUE: usize = 1 << 16;
const INGEST_NS: i64 = 1_764_066_667_000_000_000;
const ENTRY_ID: &str = "1764066667000-0";

/// `BATCH` enriched demo events, `trade_ratio` of them trades.
fn enriched(refs: &RefData, trade_ratio: f64) -> Vec<EnrichedRecord> {
    let raws = feed_records(refs, BATCH, trade_ratio, INGEST_NS);
    assert_eq!(raws.len(), BATCH, "the feed sends only valid events");
    raws.iter()
        .map(|raw| enrich(raw, refs, INGEST_NS + 250_000).expect("demo events enrich"))
        .collect()
}

/// Ticks as the hub reader builds them from one batch entry.
fn ticks_of(entry: &[u8]) -> Vec<Tick> {
    let batch = is_batch(entry);
    decode_entry::<EnrichedRecord>(entry)
        .expect("entry decodes")
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let shard = shard_of(r.event.header().instrument.as_str(), SHARDS);
            let at = event_cursor(shard, ENTRY_ID, i, batch);
            Tick::from_record(at, None, r).expect("kinds match")
        })
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

/// `decode_entry::<EnrichedRecord>` of a 1000-event entry plus `Tick::from_record`
/// (with its cursor string) per event: the decode half of the hub reader's step.
fn hub_decode(c: &mut Criterion) {
    let refs = demo_refdata();
    let entry = EnrichedRecord::encode_batch(&enriched(&refs, 0.2)).expect("batch encodes");
    assert_eq!(ticks_of(&entry).len(), BATCH);
    let mut g = quick(c, "api/hub");
    g.bench_function("decode_to_ticks", |b| {
        b.iter(|| ticks_of(black_box(&entry)))
    });
    g.finish();
}

fn symbols(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| (*s).to_owned()).collect())
}

/// Subscriptions a busy API might hold: per-instrument watchers of the busiest
/// names, plus wildcards with venue, asset-class and side filters.
fn realistic_subscriptions(
    hub: &Hub,
    busiest: &[String],
) -> (Vec<Feed<TradeTick>>, Vec<Feed<QuoteTick>>) {
    let mut trades = Vec::new();
    let mut quotes = Vec::new();
    for (i, chunk) in busiest.chunks(2).enumerate() {
        let f = Filter {
            instruments: Some(chunk.to_vec()),
            ..Filter::default()
        };
        if i % 2 == 0 {
            quotes.push(hub.subscribe_quotes(f).expect("subscribe"));
        } else {
            trades.push(hub.subscribe_trades(f).expect("subscribe"));
        }
    }
    trades.push(hub.subscribe_trades(Filter::default()).expect("subscribe"));
    quotes.push(hub.subscribe_quotes(Filter::default()).expect("subscribe"));
    quotes.push(
        hub.subscribe_quotes(Filter {
            venues: symbols(&["XLON", "XPAR", "XETR"]),
            ..Filter::default()
        })
        .expect("subscribe"),
    );
    trades.push(
        hub.subscribe_trades(Filter {
            asset_classes: Some(vec![AssetClass::Fx, AssetClass::Crypto]),
            ..Filter::default()
        })
        .expect("subscribe"),
    );
    trades.push(
        hub.subscribe_trades(Filter {
            venues: symbols(&["XNAS", "XNYS", "ARCX"]),
            asset_classes: Some(vec![AssetClass::Equity, AssetClass::Etf]),
            sides: Some(vec![Side::Sell]),
            ..Filter::default()
        })
        .expect("subscribe"),
    );
    (trades, quotes)
}

fn drain<T: TickMeta>(feeds: &mut [Feed<T>]) -> usize {
    let mut n = 0;
    for f in feeds {
        while let Some(Some(_)) = f.next().now_or_never() {
            n += 1;
        }
    }
    n
}

/// `Hub::publish` of 1000 ticks (about 80% quotes, 20% trades), timed alone; queued deliveries are drained outside the timing. Each
/// publish takes the registry read lock once, visits per event the subscribers
/// indexed under its instrument plus the wildcards of its kind, runs their filter
/// check, `try_send`s an `Arc` to each match, and updates the latest-value map.
///
/// - `no_subscribers`: lock, index lookup and latest-value map only.
/// - `reject_x10`: 10 wildcard trade and 10 wildcard quote subscriptions whose
///   3-venue filter never matches, so each event runs 10 filter checks and
///   delivers nothing. (reject_x10 - no_subscribers) / 10 is the cost of one
///   filter check; the check itself (`Check::matches`) is private, see the report.
/// - `realistic`: 25 instrument watchers over the 50 busiest names and 5
///   filtered wildcards; most events are delivered to one to three feeds.
fn hub_dispatch(c: &mut Criterion) {
    let refs = demo_refdata();
    let entry = EnrichedRecord::encode_batch(&enriched(&refs, 0.2)).expect("batch encodes");
    let ticks = ticks_of(&entry);
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for t in &ticks {
        let sym = match t {
            Tick::Trade(t) => t.trade.header.instrument.as_str(),
            Tick::Quote(q) => q.quote.header.instrument.as_str(),
        };
        *counts.entry(sym.to_owned()).or_default() += 1;
    }
    let mut busiest: Vec<(String, usize)> = counts.into_iter().collect();
    busiest.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let busiest: Vec<String> = busiest.into_iter().take(50).map(|(s, _)| s).collect();

    let timed_publish =
        |hub: &Hub, trades: &mut [Feed<TradeTick>], quotes: &mut [Feed<QuoteTick>], iters: u64| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                hub.publish(black_box(&ticks));
                total += start.elapsed();
                drain(trades);
                drain(quotes);
            }
            total
        };

    let mut g = quick(c, "api/hub_dispatch");
    {
        let hub = Hub::new(QUEUE);
        g.bench_function("no_subscribers", |b| {
            b.iter_custom(|iters| timed_publish(&hub, &mut [], &mut [], iters))
        });
    }
    {
        let hub = Hub::new(QUEUE);
        let never = || Filter {
            venues: symbols(&["ZZZ1", "ZZZ2", "ZZZ3"]),
            ..Filter::default()
        };
        let mut trades: Vec<_> = (0..10)
            .map(|_| hub.subscribe_trades(never()).expect("subscribe"))
            .collect();
        let mut quotes: Vec<_> = (0..10)
            .map(|_| hub.subscribe_quotes(never()).expect("subscribe"))
            .collect();
        hub.publish(&ticks);
        assert_eq!(drain(&mut trades) + drain(&mut quotes), 0);
        g.bench_function("reject_x10", |b| {
            b.iter_custom(|iters| timed_publish(&hub, &mut trades, &mut quotes, iters))
        });
    }
    {
        let hub = Hub::new(QUEUE);
        let (mut trades, mut quotes) = realistic_subscriptions(&hub, &busiest);
        hub.publish(&ticks);
        let delivered = drain(&mut trades) + drain(&mut quotes);
        assert!(delivered >= BATCH, "every event reaches a wildcard");
        g.bench_function("realistic", |b| {
            b.iter_custom(|iters| timed_publish(&hub, &mut trades, &mut quotes, iters))
        });
    }
    g.finish();
}

const TRADE_FIELDS: &str = "id source seq instrument venue ts price qty side tradeId account \
     notional notionalUsd currency assetClass ingestedAt enrichedAt cursor";
const QUOTE_FIELDS: &str = "id source seq instrument venue ts bid ask bidSize askSize mid spread \
     currency assetClass ingestedAt enrichedAt cursor";

/// A subscription running on the real schema, already registered with the hub.
struct Live {
    hub: Hub,
    streams: Vec<BoxStream<'static, Response>>,
    ticks: Vec<Tick>,
}

/// New ticks with the same content: a tick keeps the JSON made for it, so
/// publishing the same ticks again would time the cache, not the work.
fn fresh(ticks: &[Tick]) -> Vec<Tick> {
    ticks
        .iter()
        .map(|t| match t {
            Tick::Trade(t) => Tick::Trade(Arc::new(TradeTick::clone(t))),
            Tick::Quote(q) => Tick::Quote(Arc::new(QuoteTick::clone(q))),
        })
        .collect()
}

/// `queries` subscribed on one schema and hub.
fn live(refs: &RefData, queries: &[String], trade_ratio: f64) -> Live {
    let records = enriched(refs, trade_ratio);
    let ticks = ticks_of(&EnrichedRecord::encode_batch(&records).expect("batch encodes"));
    let hub = Hub::new(QUEUE);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://bench@127.0.0.1:1/never-connected")
        .expect("lazy pool");
    let defaults = ApiConfig::default();
    let schema = schema::build(
        Limits {
            max_depth: defaults.max_depth,
            max_complexity: defaults.max_complexity,
            introspection: defaults.introspection,
            guard: defaults.guard,
        },
        Services {
            pool,
            refs: RefCache::new(refs.clone()),
            hub: hub.clone(),
            shards: SHARDS,
            dead_letters: tickgraph_enrich::DeadLetters::new(
                &tickgraph_ingest::redis_link::RedisTarget::single("redis://127.0.0.1:1")
                    .expect("redis url"),
                tickgraph_ingest::StreamLayout::new("bench", SHARDS),
            )
            .expect("lazy dead-letter client"),
            users: tickgraph_api::auth::Users::new(Default::default()),
        },
        Some(tickgraph_api::auth::Principal::dev()),
    );
    let mut streams: Vec<_> = queries
        .iter()
        .map(|q| schema.execute_stream(q.as_str()))
        .collect();
    // The first poll runs the subscription resolver, which subscribes to the hub.
    for s in &mut streams {
        assert!(s.next().now_or_never().is_none(), "no event yet");
    }
    assert_eq!(hub.subscribers(), queries.len());
    Live {
        hub,
        streams,
        ticks,
    }
}

/// One subscription event as a `graphql-ws` subscriber gets it: the next item of
/// the schema's `execute_stream` (hub feed -> `TradeNode`/`QuoteNode` -> every
/// selected field resolved into a `Response`) plus `serde_json` of that response,
/// which is the `payload` of the `next` message (the envelope is not counted).
/// Publishing the 1000 ticks into the hub is outside the timing.
fn graphql(c: &mut Criterion) {
    let refs = demo_refdata();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The lazy pool spawns its maintenance task on the ambient runtime.
    let _rt = rt.enter();
    let cases = [
        (
            "trade_all_fields",
            format!("subscription {{ trades {{ {TRADE_FIELDS} }} }}"),
            1.0,
        ),
        (
            "quote_all_fields",
            format!("subscription {{ quotes {{ {QUOTE_FIELDS} }} }}"),
            0.0,
        ),
        (
            "quote_typical",
            "subscription { quotes { instrument venue ts bid ask mid } }".to_owned(),
            0.0,
        ),
    ];
    let typical = |alias: &str| {
        format!("subscription {{ quotes {{ instrument {alias}venue ts bid ask mid }} }}")
    };
    let mut cases: Vec<(String, Vec<String>, f64)> = cases
        .into_iter()
        .map(|(name, q, ratio)| (name.to_owned(), vec![q], ratio))
        .collect();
    // Ten subscribers per event: with the same fields they share one
    // serialization; with ten different aliases each makes its own.
    cases.push((
        "quote_typical_x10_same_fields".into(),
        vec![typical(""); 10],
        0.0,
    ));
    cases.push((
        "quote_typical_x10_distinct_fields".into(),
        (0..10).map(|i| typical(&format!("v{i}: "))).collect(),
        0.0,
    ));
    let mut g = quick(c, "api/graphql_event");
    for (name, queries, trade_ratio) in cases {
        let mut l = live(&refs, &queries, trade_ratio);
        l.hub.publish(&fresh(&l.ticks));
        for s in &mut l.streams {
            for _ in 0..BATCH {
                let resp = s.next().now_or_never().flatten().expect("an event");
                assert!(resp.errors.is_empty(), "{name}: {:?}", resp.errors);
            }
        }
        // Per delivery: each event to each subscriber.
        let deliveries = (BATCH * l.streams.len()) as u64;
        g.throughput(Throughput::Elements(deliveries));
        g.bench_function(name.as_str(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    l.hub.publish(&fresh(&l.ticks));
                    let start = Instant::now();
                    for _ in 0..BATCH {
                        for s in &mut l.streams {
                            let resp = s.next().now_or_never().flatten();
                            let resp = resp.expect("one response per published tick");
                            black_box(response_json(&resp).expect("response serializes"));
                        }
                    }
                    total += start.elapsed();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hub_decode, hub_dispatch, graphql);
criterion_main!(benches);
