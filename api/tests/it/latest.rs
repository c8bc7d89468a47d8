//! Latest values: the hub's map for instruments it has seen, history for the rest.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{quote, spawn_app, TestApp, PATIENCE, T0};

const LATEST: &str = "query($i: String!) { latestQuote(instrument: $i) { id bid cursor ts } }";

/// Polls `latestQuote` until it reports `cursor`: the hub applies XADDs
/// asynchronously.
async fn wait_for_latest(app: &TestApp, instrument: &str, cursor: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let data = app.data(LATEST, json!({"i": instrument})).await;
        if data["latestQuote"]["cursor"] == cursor {
            return data["latestQuote"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "latest never became {cursor}: {data}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn latest_comes_from_history_until_the_hub_sees_newer(pool: PgPool) {
    sqlx::query(
        "INSERT INTO quotes (source, seq, instrument, venue, ts_ns, bid, ask, bid_size, ask_size,
             asset_class, currency, mid, spread, ingest_ns, enriched_ns, stream_id)
         SELECT 'hist', s, 'AAPL', 'XNAS', $1 + s, 200 + s, 201 + s, 1, 1, 'equity', 'USD',
             200.5 + s, 1, 0, 0, '1-' || s
         FROM generate_series(1, 3) AS s",
    )
    .bind(T0)
    .execute(&pool)
    .await
    .expect("insert history");
    let mut app = spawn_app(pool).await;

    let data = app.data(LATEST, json!({"i": "AAPL"})).await;
    assert_eq!(data["latestQuote"]["id"], "hist:3", "{data}");
    let data = app.data(LATEST, json!({"i": "MSFT"})).await;
    assert_eq!(data["latestQuote"], Value::Null);

    let cursors = app
        .publish(&[quote("AAPL", "XNAS", 9, T0 + 100, "250.00")])
        .await;
    let latest = wait_for_latest(&app, "AAPL", &cursors[0]).await;
    assert_eq!(latest["id"], "test-feed:9");
    assert_eq!(latest["bid"], "250.00");

    // An older event arriving later does not replace the newer one; a newer one does.
    let cursors = app
        .publish(&[
            quote("AAPL", "XNAS", 10, T0 + 50, "240.00"),
            quote("MSFT", "XNAS", 11, T0 + 60, "410.00"),
            quote("AAPL", "XNAS", 12, T0 + 200, "260.00"),
        ])
        .await;
    let latest = wait_for_latest(&app, "AAPL", &cursors[2]).await;
    assert_eq!(latest["id"], "test-feed:12");

    let data = app
        .data(
            "{ latestQuotes(instruments: [\"MSFT\", \"SPY\", \"AAPL\"]) { id }
               latestTrades(instruments: [\"AAPL\"]) { id } latestTrade(instrument: \"AAPL\") { id } }",
            json!({}),
        )
        .await;
    assert_eq!(
        data["latestQuotes"],
        json!([{"id": "test-feed:11"}, null, {"id": "test-feed:12"}])
    );
    assert_eq!(data["latestTrades"], json!([null]));
    assert_eq!(data["latestTrade"], Value::Null);
    app.stop().await;
}
