//! Subscriptions for screens, over a real WebSocket: `maxRate` (a conflated
//! subscription receives at most the rate per instrument, in order, and always
//! ends on the latest value, while an unconflated one receives every event), and
//! `snapshot` (the latest value first, then live updates).

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

/// Posts probe quotes until `sub` has one, so it is known to be registered.
async fn until_live(app: &TestApp, sub: &mut Subscription) {
    for n in 0..200u64 {
        app.post_json(&json!([quote("probe", n, "AAPL", "XNAS", "1", "2")]))
            .await;
        if sub.next_within(Duration::from_millis(600)).await.is_some() {
            return;
        }
    }
    panic!("subscription never went live");
}

/// See [`conflation_holds`] for what is checked.
#[sqlx::test(migrations = "../migrations")]
async fn a_conflated_subscription_gets_at_most_its_rate_and_always_the_latest(pool: PgPool) {
    let app = spawn_app(pool, 1).await;
    let filter = format!("instruments: {}", json!(CONFLATED_INSTRUMENTS));
    let select = "{ source seq instrument }";
    let mut conflated = Subscription::start(
        &app.ws,
        false,
        &format!("subscription {{ quotes({filter}, maxRate: {CONFLATED_RATE}) {select} }}"),
    )
    .await;
    let mut every = Subscription::start(
        &app.ws,
        false,
        &format!("subscription {{ quotes({filter}) {select} }}"),
    )
    .await;
    until_live(&app, &mut conflated).await;
    until_live(&app, &mut every).await;
    conflation_holds(&app, conflated.forward(), every.forward()).await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_snapshot_subscription_starts_with_the_latest_values_then_goes_live(pool: PgPool) {
    let app = spawn_app(pool, 2).await;
    // A plain subscriber shows when the api's hub has dispatched the quotes.
    let mut watcher = Subscription::start(
        &app.ws,
        false,
        "subscription { quotes(instruments: [\"AAPL\", \"MSFT\"]) { source seq } }",
    )
    .await;
    until_live(&app, &mut watcher).await;
    let answer = app
        .post_json(&json!([
            quote("mm", 1, "AAPL", "XNAS", "189.1", "189.2"),
            quote("mm", 2, "AAPL", "XNAS", "189.3", "189.4"),
            quote("mm", 3, "MSFT", "XNAS", "410.1", "410.2"),
            quote("mm", 4, "VOD.L", "XLON", "72.1", "72.2"),
        ]))
        .await;
    assert_eq!(answer["accepted"], 4, "{answer}");
    let mut seen = Vec::new();
    while !(seen.contains(&"2".to_owned()) && seen.contains(&"3".to_owned())) {
        let q = watcher.next().await["quotes"].clone();
        if q["source"] == "mm" {
            seen.push(q["seq"].as_str().unwrap_or_default().to_owned());
        }
    }

    let mut sub = Subscription::start(
        &app.ws,
        false,
        "subscription { quotes(instruments: [\"MSFT\", \"AAPL\", \"SPY\"], snapshot: true) { instrument seq bid } }",
    )
    .await;
    let first = sub.next().await["quotes"].clone();
    let second = sub.next().await["quotes"].clone();
    assert_eq!(
        (first, second),
        (
            json!({"instrument": "AAPL", "seq": "2", "bid": "189.3"}),
            json!({"instrument": "MSFT", "seq": "3", "bid": "410.1"})
        ),
        "the latest of each selected instrument the server has seen, in symbol order"
    );
    app.post_json(&json!([
        quote("mm", 5, "VOD.L", "XLON", "72.3", "72.4"),
        quote("mm", 6, "AAPL", "XNAS", "189.5", "189.6"),
    ]))
    .await;
    assert_eq!(
        sub.next().await["quotes"],
        json!({"instrument": "AAPL", "seq": "6", "bid": "189.5"}),
        "then live, nothing repeated"
    );
    app.stop().await;
}

/// An instrument the api has not seen since it started comes from history.
#[sqlx::test(migrations = "../migrations")]
async fn a_snapshot_takes_what_the_server_has_not_seen_from_history(pool: PgPool) {
    sqlx::query(
        "INSERT INTO quotes (source, seq, instrument, venue, ts_ns, bid, ask, bid_size, \
         ask_size, asset_class, currency, mid, spread, ingest_ns, enriched_ns, stream_id) \
         VALUES ('old', 7, 'AAPL', 'XNAS', 1, 180.5, 180.6, 1, 1, 'equity', 'USD', 180.55, \
         0.1, 1, 1, '1-0')",
    )
    .execute(&pool)
    .await
    .expect("history row");
    let app = spawn_app(pool, 2).await;
    let mut sub = Subscription::start(
        &app.ws,
        false,
        "subscription { quotes(instruments: [\"AAPL\"], snapshot: true) { source seq bid } }",
    )
    .await;
    // Without an instrument list, the snapshot still covers every instrument.
    let mut every = Subscription::start(
        &app.ws,
        false,
        "subscription { quotes(snapshot: true) { source seq bid resume } }",
    )
    .await;
    let mut etfs = Subscription::start(
        &app.ws,
        false,
        "subscription { quotes(snapshot: true, assetClasses: [ETF]) { source seq instrument } }",
    )
    .await;
    assert_eq!(
        sub.next().await["quotes"],
        json!({"source": "old", "seq": "7", "bid": "180.5"})
    );
    let first = every.next().await["quotes"].clone();
    assert_eq!(
        (&first["source"], &first["seq"], &first["bid"]),
        (&json!("old"), &json!("7"), &json!("180.5"))
    );
    assert!(
        first["resume"].is_string(),
        "a snapshot event resumes too: {first}"
    );
    app.post_json(&json!([
        quote("mm", 1, "AAPL", "XNAS", "181", "181.1"),
        quote("mm", 2, "SPY", "ARCX", "560", "560.1")
    ]))
    .await;
    assert_eq!(
        sub.next().await["quotes"],
        json!({"source": "mm", "seq": "1", "bid": "181"})
    );
    // Two shards: the two may come in either order.
    let mut live = vec![
        every.next().await["quotes"]["seq"].clone(),
        every.next().await["quotes"]["seq"].clone(),
    ];
    live.sort_by_key(|v| v.to_string());
    assert_eq!(live, [json!("1"), json!("2")]);
    assert_eq!(
        etfs.next().await["quotes"],
        json!({"source": "mm", "seq": "2", "instrument": "SPY"}),
        "an equity's history row is not in an ETF snapshot"
    );
    app.stop().await;
}

/// `conflateBy: [INSTRUMENT, VENUE]`: each venue's latest quote of an
/// instrument, where per instrument alone the last venue's replaces the rest.
/// Planned (plain selection) and executed (behind a fragment) alike.
#[sqlx::test(migrations = "../migrations")]
async fn conflate_by_venue_sends_each_venues_latest_quote(pool: PgPool) {
    let app = spawn_app(pool, 1).await;
    let args = r#"instruments: ["AAPL"], maxRate: 1, conflateBy: [INSTRUMENT, VENUE]"#;
    let mut planned = Subscription::start(
        &app.ws,
        false,
        &format!("subscription {{ quotes({args}) {{ source seq venue }} }}"),
    )
    .await;
    let mut executed = Subscription::start(
        &app.ws,
        false,
        &format!("subscription {{ quotes({args}) {{ ... on Quote {{ source seq venue }} }} }}"),
    )
    .await;
    until_live(&app, &mut planned).await;
    until_live(&app, &mut executed).await;
    // After the probes' period, one batch: XNAS twice, ARCX between.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    app.post_json(&json!([
        quote("mm", 1, "AAPL", "XNAS", "189.1", "189.2"),
        quote("mm", 2, "AAPL", "ARCX", "189.0", "189.3"),
        quote("mm", 3, "AAPL", "XNAS", "189.2", "189.3"),
    ]))
    .await;
    for sub in [&mut planned, &mut executed] {
        let mut latest = std::collections::HashMap::new();
        while latest.get("XNAS") != Some(&3) || latest.get("ARCX") != Some(&2) {
            let q = sub.next().await["quotes"].clone();
            if q["source"] != "mm" {
                continue;
            }
            let venue = q["venue"].as_str().expect("venue").to_owned();
            let seq = seq_of(&q);
            let before = latest.insert(venue.clone(), seq).unwrap_or(0);
            assert!(seq > before, "{venue}: {seq} after {before}");
        }
    }
    app.stop().await;
}
