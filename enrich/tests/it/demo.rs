//! Demo reference data in a real database: idempotent, complete, and exactly
//! what the generator produced.

use std::collections::HashSet;

use sqlx::PgPool;
use tickgraph_enrich::demo::demo_refdata;
use tickgraph_enrich::{load_demo_data, reference_price, RefData};

async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count")
}

#[sqlx::test(migrations = "../migrations")]
async fn loads_twice_without_changes(pool: PgPool) {
    let first = load_demo_data(&pool).await.expect("first load");
    assert!(first.instruments >= 2000, "{first:?}");
    assert!(
        first.venues >= 6 && first.currencies >= 5 && first.accounts >= 24,
        "{first:?}"
    );
    assert_eq!(
        first.changed_rows as usize,
        first.instruments + first.venues + first.accounts + first.currencies
    );
    let counts = (
        count(&pool, "instruments").await,
        count(&pool, "venues").await,
        count(&pool, "accounts").await,
        count(&pool, "fx_rates").await,
    );
    assert_eq!(
        counts,
        (
            first.instruments as i64,
            first.venues as i64,
            first.accounts as i64,
            first.currencies as i64
        )
    );

    let second = load_demo_data(&pool).await.expect("second load");
    assert_eq!(second.changed_rows, 0, "a second run rewrote rows");
    assert_eq!(second.instruments, first.instruments);
    assert_eq!(count(&pool, "instruments").await, counts.0);

    // A changed row is put back by the next run, and only that row.
    sqlx::query("UPDATE instruments SET name = 'edited' WHERE symbol = 'AAPL'")
        .execute(&pool)
        .await
        .expect("edit");
    let third = load_demo_data(&pool).await.expect("third load");
    assert_eq!(third.changed_rows, 1);

    let loaded = RefData::load(&pool).await.expect("refdata loads");
    assert_eq!(
        loaded,
        demo_refdata(),
        "the database holds exactly the generated set"
    );
    assert_eq!(loaded.instruments["AAPL"].name, "Apple Inc.");
}

#[sqlx::test(migrations = "../migrations")]
async fn demo_data_is_joinable_and_priced(pool: PgPool) {
    load_demo_data(&pool).await.expect("load");
    let missing_fx: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM instruments i LEFT JOIN fx_rates f ON f.currency = i.currency \
         WHERE f.currency IS NULL",
    )
    .fetch_one(&pool)
    .await
    .expect("query");
    assert_eq!(missing_fx, 0, "every instrument's currency has a USD rate");

    let classes: Vec<String> = sqlx::query_scalar("SELECT DISTINCT asset_class FROM instruments")
        .fetch_all(&pool)
        .await
        .expect("query");
    let classes: HashSet<&str> = classes.iter().map(String::as_str).collect();
    for c in ["equity", "etf", "fx", "future", "crypto"] {
        assert!(classes.contains(c), "no {c} instruments");
    }
    let venues_used: i64 = sqlx::query_scalar("SELECT count(DISTINCT venue) FROM instruments")
        .fetch_one(&pool)
        .await
        .expect("query");
    assert!(venues_used >= 6);
    let usd: rust_decimal::Decimal =
        sqlx::query_scalar("SELECT usd_rate FROM fx_rates WHERE currency = 'USD'")
            .fetch_one(&pool)
            .await
            .expect("USD row");
    assert_eq!(usd, rust_decimal::Decimal::ONE);

    let data = RefData::load(&pool).await.expect("load");
    for symbol in [
        "AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "JPM", "VOD.L", "HSBA.L", "BP.L",
        "AIR.PA", "MC.PA", "SAP.DE", "SIE.DE", "7203.T", "0700.HK", "SPY", "QQQ", "EURUSD",
        "BTCUSD",
    ] {
        let i = &data.instruments[symbol];
        let p = reference_price(i);
        assert!(
            p > rust_decimal::Decimal::ZERO && (p % i.tick_size).is_zero(),
            "{symbol} {p}"
        );
    }
}
