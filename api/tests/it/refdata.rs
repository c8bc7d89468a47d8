//! Reference-data queries, served from the cache loaded at start.

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::spawn_app;

fn symbols(conn: &Value) -> Vec<&str> {
    conn["edges"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|e| e["node"]["symbol"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

const INSTRUMENTS: &str = "query($symbols: [String!], $venue: String, $ac: AssetClass, $ccy: String,
        $sector: String, $search: String, $first: Int! = 100, $after: String) {
    instruments(symbols: $symbols, venue: $venue, assetClass: $ac, currency: $ccy, sector: $sector,
        search: $search, first: $first, after: $after) {
        totalCount
        edges { cursor node { symbol name assetClass currency tickSize listingVenue { name country } } }
        pageInfo { hasNextPage endCursor }
    }
}";

#[sqlx::test(migrations = "../migrations")]
async fn instruments_filter_and_page(pool: PgPool) {
    let app = spawn_app(pool).await;
    let q = |vars: Value| {
        let app = &app;
        async move { app.data(INSTRUMENTS, vars).await["instruments"].clone() }
    };
    assert_eq!(
        symbols(&q(json!({})).await),
        ["AAPL", "BP.L", "MSFT", "SPY", "VOD.L"]
    );
    assert_eq!(
        symbols(&q(json!({"venue": "XLON"})).await),
        ["BP.L", "VOD.L"]
    );
    assert_eq!(symbols(&q(json!({"ac": "ETF"})).await), ["SPY"]);
    assert_eq!(symbols(&q(json!({"ccy": "gbp"})).await), ["BP.L", "VOD.L"]);
    assert_eq!(
        symbols(&q(json!({"sector": "technology"})).await),
        ["AAPL", "MSFT"]
    );
    assert_eq!(symbols(&q(json!({"search": "CORP"})).await), ["MSFT"]);
    assert_eq!(symbols(&q(json!({"search": "vod"})).await), ["VOD.L"]);
    assert_eq!(
        symbols(&q(json!({"symbols": ["SPY", "AAPL", "NOPE"]})).await),
        ["AAPL", "SPY"]
    );
    assert_eq!(
        symbols(&q(json!({"venue": "XNAS", "search": "apple"})).await),
        ["AAPL"]
    );
    assert_eq!(
        symbols(&q(json!({"venue": "XNYS", "search": "apple"})).await),
        Vec::<&str>::new()
    );

    let first = q(json!({"first": 2})).await;
    assert_eq!(first["totalCount"], 5);
    assert_eq!(symbols(&first), ["AAPL", "BP.L"]);
    assert_eq!(first["pageInfo"]["hasNextPage"], true);
    let second = q(json!({"first": 2, "after": first["pageInfo"]["endCursor"]})).await;
    assert_eq!(symbols(&second), ["MSFT", "SPY"]);
    let third = q(json!({"first": 2, "after": second["pageInfo"]["endCursor"]})).await;
    assert_eq!(symbols(&third), ["VOD.L"]);
    assert_eq!(third["pageInfo"]["hasNextPage"], false);

    let aapl = &q(json!({"symbols": ["AAPL"]})).await["edges"][0]["node"];
    assert_eq!(aapl["tickSize"], "0.01");
    assert_eq!(aapl["assetClass"], "EQUITY");
    assert_eq!(
        aapl["listingVenue"],
        json!({"name": "Nasdaq", "country": "US"})
    );
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn instruments_takes_at_most_1000_symbols(pool: PgPool) {
    let app = spawn_app(pool).await;
    let many = |n: usize| -> Vec<String> {
        std::iter::once("AAPL".to_owned())
            .chain((1..n).map(|i| format!("S{i}")))
            .collect()
    };
    let at_most = app.data(INSTRUMENTS, json!({"symbols": many(1000)})).await;
    assert_eq!(symbols(&at_most["instruments"]), ["AAPL"]);
    // One more, and the size that held a worker for half a second.
    for n in [1001, 100_000] {
        let body = app.post(INSTRUMENTS, json!({"symbols": many(n)})).await;
        assert_eq!(body["data"], Value::Null, "{n}");
        let message = body["errors"][0]["message"].as_str().unwrap_or("");
        assert_eq!(
            message,
            format!("at most 1000 `symbols` per request, got {n}"),
            "{body}"
        );
    }
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn venues_accounts_and_fx_rates(pool: PgPool) {
    let app = spawn_app(pool).await;
    let data = app
        .data(
            "{ venues { mic timezone } accounts(desk: \"equities\") { id owner }
               fxRates { currency usdRate } instrument(symbol: \"VOD.L\") { name currency isin }
               missing: instrument(symbol: \"NOPE\") { name } }",
            json!({}),
        )
        .await;
    assert_eq!(
        data["venues"],
        json!([
            {"mic": "XLON", "timezone": "Europe/London"},
            {"mic": "XNAS", "timezone": "America/New_York"},
            {"mic": "XNYS", "timezone": "America/New_York"},
        ])
    );
    assert_eq!(
        data["accounts"],
        json!([{"id": "ACC-1", "owner": "alice"}, {"id": "ACC-2", "owner": "bob"}])
    );
    assert_eq!(
        data["fxRates"],
        json!([{"currency": "GBP", "usdRate": "1.27"}, {"currency": "USD", "usdRate": "1"}])
    );
    assert_eq!(
        data["instrument"],
        json!({"name": "Vodafone Group", "currency": "GBP", "isin": null})
    );
    assert_eq!(data["missing"], Value::Null);
    app.stop().await;
}
