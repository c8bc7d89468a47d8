//! What the loader wrote is what history, snapshot and latest-value queries
//! answer.

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::*;

const SECOND: i64 = 1_000_000_000;

fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn at(mut v: Value, ts: i64) -> Value {
    v["ts"] = json!(ts);
    v
}

#[sqlx::test(migrations = "../migrations")]
async fn history_snapshot_and_latest_answer_what_was_loaded(pool: PgPool) {
    let mut app = spawn_app(pool, 2).await;
    let t0 = (now_ns() / SECOND - 3600) * SECOND;
    let mut batch = Vec::new();
    for i in 1..=5i64 {
        let price = format!("{}.5", 100 + i);
        batch.push(at(
            trade("oms", i as u64, "AAPL", "XNAS", &price, "10", "buy"),
            t0 + i * SECOND,
        ));
        batch.push(at(
            quote(
                "mm",
                i as u64,
                "AAPL",
                "XNAS",
                &format!("{}", 100 + i),
                &format!("{}.01", 100 + i),
            ),
            t0 + i * SECOND,
        ));
    }
    batch.push(at(
        trade("oms", 99, "VOD.L", "XLON", "72.14", "1000", "sell"),
        t0,
    ));
    let answer = app.post_json(&Value::Array(batch)).await;
    assert_eq!(answer["accepted"], 11, "{answer}");
    app.eventually("history loaded", async |app| {
        (app.history_count("trades").await == 6 && app.history_count("quotes").await == 5)
            .then_some(())
    })
    .await;

    // Pages of two, oldest first, across the whole range: every trade once.
    let q = "query($after: String, $from: DateTime, $to: DateTime) {
        trades(instrument: \"AAPL\", from: $from, to: $to, first: 2, after: $after) {
            edges { node { id price notionalUsd ts } }
            pageInfo { hasNextPage endCursor } } }";
    let (mut ids, mut after) = (Vec::new(), Value::Null);
    loop {
        let data = app
            .query(q, json!({"after": after, "from": rfc3339(t0 + 2 * SECOND), "to": rfc3339(t0 + 5 * SECOND)}))
            .await;
        let page = &data["trades"];
        for e in page["edges"].as_array().expect("edges") {
            ids.push(e["node"]["id"].as_str().expect("id").to_string());
        }
        if page["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
    // from is inclusive, to exclusive.
    assert_eq!(ids, ["oms:2", "oms:3", "oms:4"]);

    // The state of the market at t0+2.5s.
    let data = app
        .query(
            "query($at: DateTime!) { snapshot(instruments: [\"AAPL\", \"MSFT\", \"VOD.L\"], at: $at) {
                instrument quote { id bid ask mid } trade { id price notionalUsd } } }",
            json!({"at": rfc3339(t0 + 2 * SECOND + SECOND / 2)}),
        )
        .await;
    let snap = data["snapshot"].as_array().expect("snapshot list");
    assert_eq!(snap.len(), 3);
    assert_eq!(snap[0]["instrument"], "AAPL");
    assert_eq!(snap[0]["quote"]["id"], "mm:2");
    assert_eq!(snap[0]["quote"]["mid"], "102.005");
    assert_eq!(snap[0]["trade"]["id"], "oms:2");
    assert_eq!(snap[0]["trade"]["price"], "102.5");
    assert_eq!(snap[1]["instrument"], "MSFT");
    assert!(
        snap[1]["quote"].is_null() && snap[1]["trade"].is_null(),
        "{snap:?}"
    );
    assert_eq!(snap[2]["trade"]["id"], "oms:99");
    // GBP at 1.25 USD.
    assert_eq!(snap[2]["trade"]["notionalUsd"], "90175");

    // Latest values: the newest of each kind.
    let data = app
        .query("{ latestQuote(instrument: \"AAPL\") { id bid } latestTrade(instrument: \"VOD.L\") { id side } }", json!({}))
        .await;
    assert_eq!(data["latestQuote"]["id"], "mm:5");
    assert_eq!(data["latestTrade"], json!({"id": "oms:99", "side": "SELL"}));

    // Reference data with a filter.
    let data = app
        .query(
            "{ instruments(assetClass: ETF) { edges { node { symbol name } } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        data["instruments"]["edges"],
        json!([{"node": {"symbol": "SPY", "name": "SPDR S&P 500 ETF"}}])
    );

    app.stop().await;
}
