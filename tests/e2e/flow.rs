//! JSON and MessagePack batches in through ingest, out through filtered GraphQL
//! subscriptions over real WebSockets, in both protocols.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::*;

const TRADES: &str = "subscription { trades(instruments: [\"AAPL\"]) { id source instrument venue price qty side notional notionalUsd currency assetClass reference { name sector } } }";
const ETF_QUOTES: &str =
    "subscription { quotes(assetClasses: [ETF]) { id source instrument bid ask mid spread } }";

/// Posts probe events that match `sub` until one arrives, so the subscription is
/// known to be registered before the real events are sent.
async fn until_live(app: &TestApp, sub: &mut Subscription, probe: impl Fn(u64) -> Value) {
    for n in 0..200u64 {
        app.post_json(&json!([probe(n)])).await;
        if sub.next_within(Duration::from_millis(250)).await.is_some() {
            return;
        }
    }
    panic!("subscription never went live");
}

/// Next event that is not a probe.
async fn next_real(sub: &mut Subscription, field: &str) -> Value {
    loop {
        let data = sub.next().await;
        if data[field]["source"] != "probe" {
            return data[field].clone();
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn batches_reach_only_the_subscribers_whose_filters_select_them(pool: PgPool) {
    // One shard: a single ordered stream, so "the sentinel arrived" proves that
    // everything posted before it was either delivered or filtered out.
    let app = spawn_app(pool, 1).await;
    let mut trades = Subscription::start(&app.ws, false, TRADES).await;
    let mut etf = Subscription::start(&app.ws, true, ETF_QUOTES).await;
    until_live(&app, &mut trades, |n| {
        trade("probe", n, "AAPL", "XNAS", "1", "1", "buy")
    })
    .await;
    until_live(&app, &mut etf, |n| {
        quote("probe", n, "SPY", "ARCX", "1", "2")
    })
    .await;

    // JSON: an excluded trade, then an included one with a price of 22 digits.
    let answer = app
        .post_json(&json!([
            trade("oms", 1, "MSFT", "XNAS", "410.5", "10", "sell"),
            trade(
                "oms",
                2,
                "AAPL",
                "XNAS",
                "189.1234567890123456789",
                "100",
                "buy"
            ),
            quote("mm", 1, "AAPL", "XNAS", "189.1", "189.2"),
        ]))
        .await;
    assert_eq!(answer["accepted"], 3, "{answer}");
    // MessagePack: an ETF quote (included for `etf`) and an equity quote (not).
    let body = msgpack_quotes(&[
        MsgQuote {
            kind: "quote",
            source: "mm",
            seq: 2,
            instrument: "SPY",
            venue: "ARCX",
            ts: now_ns(),
            bid: 601.25,
            ask: "601.27",
            bid_size: 300,
            ask_size: 500,
        },
        MsgQuote {
            kind: "quote",
            source: "mm",
            seq: 3,
            instrument: "MSFT",
            venue: "XNAS",
            ts: now_ns(),
            bid: 410.1,
            ask: "410.2",
            bid_size: 100,
            ask_size: 100,
        },
    ]);
    let (status, answer) = app.post("application/msgpack", body).await;
    assert_eq!((status, &answer["accepted"]), (200, &json!(2)), "{answer}");
    // NDJSON sentinels, one per subscription.
    let nd = format!(
        "{}\n{}\n",
        trade("oms", 3, "AAPL", "XNAS", "190", "1", "sell"),
        quote("mm", 4, "SPY", "ARCX", "601.3", "601.4")
    );
    let (status, answer) = app.post("application/x-ndjson", nd.into_bytes()).await;
    assert_eq!((status, &answer["accepted"]), (200, &json!(2)), "{answer}");

    let t = next_real(&mut trades, "trades").await;
    assert_eq!(t["id"], "oms:2");
    assert_eq!(t["price"], "189.1234567890123456789");
    assert_eq!(t["side"], "BUY");
    assert_eq!(t["notional"], "18912.34567890123456789");
    assert_eq!(t["notionalUsd"], "18912.34567890123456789");
    assert_eq!(t["currency"], "USD");
    assert_eq!(t["assetClass"], "EQUITY");
    assert_eq!(t["reference"]["name"], "Apple Inc.");
    assert_eq!(
        t.as_object().map(|o| o.len()),
        Some(12),
        "only the selected fields: {t}"
    );
    let sentinel = next_real(&mut trades, "trades").await;
    assert_eq!(
        sentinel["id"], "oms:3",
        "MSFT or a quote leaked through the filter: {sentinel}"
    );

    let q = next_real(&mut etf, "quotes").await;
    assert_eq!(q["id"], "mm:2");
    assert_eq!(q["bid"], "601.25");
    assert_eq!(q["mid"], "601.26");
    assert_eq!(q["spread"], "0.02");
    let sentinel = next_real(&mut etf, "quotes").await;
    assert_eq!(
        sentinel["id"], "mm:4",
        "an equity quote leaked through the filter: {sentinel}"
    );

    app.stop().await;
}
