//! History pages and snapshots over rows inserted straight into Postgres.

use std::collections::HashSet;

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{spawn_app, T0};

/// Inserts a trade row as the loader would.
async fn insert_trade(
    pool: &PgPool,
    source: &str,
    seq: i64,
    instrument: &str,
    ts_ns: i64,
    price: &str,
) {
    sqlx::query(
        "INSERT INTO trades (source, seq, instrument, venue, ts_ns, price, qty, side, trade_id,
             account, asset_class, currency, notional, notional_usd, ingest_ns, enriched_ns, stream_id)
         VALUES ($1, $2, $3, 'XNAS', $4, $5::numeric, 2, 'buy', NULL, 'ACC-1', 'equity', 'USD',
             $5::numeric * 2, $5::numeric * 2, $4 + 1000, $4 + 2000, $6)",
    )
    .bind(source)
    .bind(seq)
    .bind(instrument)
    .bind(ts_ns)
    .bind(price)
    .bind(format!("{}-{}", ts_ns / 1_000_000, seq))
    .execute(pool)
    .await
    .expect("insert trade");
}

async fn insert_quote(
    pool: &PgPool,
    source: &str,
    seq: i64,
    instrument: &str,
    ts_ns: i64,
    bid: &str,
) {
    sqlx::query(
        "INSERT INTO quotes (source, seq, instrument, venue, ts_ns, bid, ask, bid_size, ask_size,
             asset_class, currency, mid, spread, ingest_ns, enriched_ns, stream_id)
         VALUES ($1, $2, $3, 'XNAS', $4, $5::numeric, $5::numeric + 0.02, 100, 200, 'equity', 'USD',
             $5::numeric + 0.01, 0.02, $4 + 1000, $4 + 2000, $6)",
    )
    .bind(source)
    .bind(seq)
    .bind(instrument)
    .bind(ts_ns)
    .bind(bid)
    .bind(format!("{}-{}", ts_ns / 1_000_000, seq))
    .execute(pool)
    .await
    .expect("insert quote");
}

const TRADES_PAGE: &str = "query($i: String!, $first: Int!, $after: String, $order: SortOrder!, $from: DateTime, $to: DateTime) {
    trades(instrument: $i, first: $first, after: $after, order: $order, from: $from, to: $to) {
        edges { cursor node { id instrument ts price notional side account cursor } }
        pageInfo { hasNextPage hasPreviousPage endCursor }
    }
}";

/// Follows `endCursor` until the last page; returns every id in page order.
async fn all_pages(app: &crate::helpers::TestApp, vars: Value, first: i64) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut after = Value::Null;
    let mut pages = 0;
    loop {
        let mut v = vars.clone();
        v["first"] = json!(first);
        v["after"] = after.clone();
        let data = app.data(TRADES_PAGE, v).await;
        let conn = &data["trades"];
        pages += 1;
        let edges = conn["edges"].as_array().expect("edges");
        assert!(edges.len() as i64 <= first);
        assert_eq!(conn["pageInfo"]["hasPreviousPage"], !after.is_null());
        ids.extend(
            edges
                .iter()
                .map(|e| e["node"]["id"].as_str().unwrap_or_default().to_owned()),
        );
        if conn["pageInfo"]["hasNextPage"] == false {
            return (ids, pages);
        }
        assert_eq!(edges.len() as i64, first, "only the last page may be short");
        after = conn["pageInfo"]["endCursor"].clone();
        assert!(pages < 100, "pagination does not end");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn trade_pages_cover_every_row_once_in_order(pool: PgPool) {
    // 23 AAPL trades, several sharing a timestamp (ties order by source, seq),
    // and other instruments' trades that must not appear.
    let mut expected = Vec::new();
    for k in 0..23i64 {
        let (source, seq) = if k % 2 == 0 {
            ("feed-a", k)
        } else {
            ("feed-b", 100 - k)
        };
        let ts = T0 + (k / 4) * 1_000;
        insert_trade(&pool, source, seq, "AAPL", ts, "230.5").await;
        expected.push((ts, source.to_owned(), seq));
        insert_trade(&pool, "feed-a", 1000 + k, "MSFT", ts, "410").await;
    }
    expected.sort();
    let expected: Vec<String> = expected
        .iter()
        .map(|(_, s, q)| format!("{s}:{q}"))
        .collect();
    let app = spawn_app(pool).await;

    let vars = json!({"i": "AAPL", "order": "ASC"});
    for first in [1, 4, 7, 23, 100] {
        let (ids, pages) = all_pages(&app, vars.clone(), first).await;
        assert_eq!(ids, expected, "page size {first}");
        assert_eq!(
            pages,
            23_usize.div_ceil(first as usize),
            "page size {first}"
        );
    }
    let (ids, _) = all_pages(&app, json!({"i": "AAPL", "order": "DESC"}), 5).await;
    let mut reversed = expected.clone();
    reversed.reverse();
    assert_eq!(ids, reversed);
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 23);

    // from is inclusive, to exclusive: timestamps T0+1000 .. T0+3000 hold k = 4..=11.
    let (ids, _) = all_pages(
        &app,
        json!({"i": "AAPL", "order": "ASC", "from": "2024-11-25T15:53:20.000001Z", "to": "2024-11-25T15:53:20.000003Z"}),
        3,
    )
    .await;
    assert_eq!(ids, expected[4..12].to_vec());
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn history_rows_map_to_the_live_types(pool: PgPool) {
    insert_trade(&pool, "feed-a", 7, "AAPL", T0 + 123_456_789, "230.5").await;
    insert_quote(&pool, "feed-a", 8, "AAPL", T0 + 5, "229.99").await;
    let app = spawn_app(pool).await;
    let data = app
        .data(
            "{ trades(instrument: \"AAPL\") { nodes { id source seq ts price qty notional notionalUsd side account
                   currency assetClass ingestedAt enrichedAt cursor reference { symbol sector } } }
               quotes(instrument: \"AAPL\") { nodes { id bid ask mid spread bidSize askSize cursor } } }",
            json!({}),
        )
        .await;
    let t = &data["trades"]["nodes"][0];
    assert_eq!(t["id"], "feed-a:7");
    assert_eq!(t["seq"], "7");
    assert_eq!(t["ts"], "2024-11-25T15:53:20.123456789+00:00");
    assert_eq!(t["ingestedAt"], "2024-11-25T15:53:20.123457789+00:00");
    assert_eq!(t["price"], "230.5");
    assert_eq!(t["notional"], "461.0");
    assert_eq!(t["side"], "BUY");
    assert_eq!(t["account"], "ACC-1");
    assert_eq!(t["assetClass"], "EQUITY");
    assert_eq!(t["reference"]["sector"], "Technology");
    let shard = tickgraph_ingest::stream::shard_of("AAPL", app.layout.shards());
    assert_eq!(t["cursor"], format!("{shard}:1732550000123-7"));
    let q = &data["quotes"]["nodes"][0];
    assert_eq!(q["mid"], "230.00");
    assert_eq!(q["ask"], "230.01");
    assert_eq!(q["cursor"], format!("{shard}:1732550000000-8"));
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn bad_page_arguments_get_clear_errors(pool: PgPool) {
    let app = spawn_app(pool).await;
    let body = app
        .post(
            "{ trades(instrument: \"AAPL\", first: 5000) { nodes { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body["errors"][0]["message"],
        "`first` must be between 0 and 1000, got 5000"
    );
    let body = app
        .post(
            "{ quotes(instrument: \"AAPL\", after: \"garbage!\") { nodes { id } } }",
            json!({}),
        )
        .await;
    let msg = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("`after` is not a cursor of a history page"),
        "{body}"
    );
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn snapshot_returns_the_newest_rows_at_or_before_the_time(pool: PgPool) {
    let at = T0 + 2_000;
    insert_quote(&pool, "q", 1, "AAPL", T0, "100").await;
    insert_quote(&pool, "q", 2, "AAPL", at, "101").await; // exactly at: included
    insert_quote(&pool, "q", 3, "AAPL", at + 1, "102").await;
    insert_trade(&pool, "t", 1, "AAPL", T0 + 500, "100.5").await;
    insert_trade(&pool, "t", 2, "AAPL", at + 10, "103").await;
    insert_quote(&pool, "q", 4, "MSFT", at + 1, "400").await; // only after
    insert_trade(&pool, "t", 3, "MSFT", T0 + 1, "399").await;
    let app = spawn_app(pool).await;
    let data = app
        .data(
            "query($at: DateTime!) { snapshot(instruments: [\"MSFT\", \"NOPE\", \"AAPL\"], at: $at) {
                 instrument quote { id bid ts } trade { id price } reference { name } } }",
            json!({"at": "2024-11-25T15:53:20.000002Z"}),
        )
        .await;
    let snap = data["snapshot"].as_array().expect("list");
    assert_eq!(
        snap.iter()
            .map(|s| s["instrument"].as_str().unwrap_or_default())
            .collect::<Vec<_>>(),
        ["MSFT", "NOPE", "AAPL"]
    );
    assert_eq!(snap[0]["quote"], Value::Null);
    assert_eq!(snap[0]["trade"]["id"], "t:3");
    assert_eq!(snap[1]["quote"], Value::Null);
    assert_eq!(snap[1]["trade"], Value::Null);
    assert_eq!(snap[1]["reference"], Value::Null);
    assert_eq!(snap[2]["quote"]["id"], "q:2");
    assert_eq!(snap[2]["quote"]["bid"], "101");
    assert_eq!(snap[2]["trade"]["id"], "t:1");
    assert_eq!(snap[2]["reference"]["name"], "Apple Inc.");
    app.stop().await;
}
