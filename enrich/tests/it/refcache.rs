//! The reference-data cache follows the tables through LISTEN/NOTIFY.

use std::time::Duration;

use sqlx::PgPool;
use tickgraph_enrich::{RefCache, RefData};
use tokio_util::sync::CancellationToken;

use crate::helpers::{dec, seed_refdata, wait_until};

async fn follows(cache: &RefCache, what: &str, check: impl Fn(&RefData) -> bool) {
    wait_until(what, || {
        let ok = check(&cache.read());
        async move { ok }
    })
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn cache_follows_inserts_updates_deletes_and_truncates(pool: PgPool) {
    seed_refdata(&pool).await;
    let cache = RefCache::load(&pool).await.expect("load");
    assert_eq!(cache.read().instruments["AAPL"].name, "Apple Inc.");
    let shutdown = CancellationToken::new();
    let listener = cache.spawn_listener(pool.clone(), shutdown.clone());

    sqlx::query("UPDATE instruments SET name = 'Apple Inc. (renamed)', tick_size = 0.005 WHERE symbol = 'AAPL'")
        .execute(&pool)
        .await
        .expect("update");
    follows(&cache, "instrument update", |d| {
        d.instruments["AAPL"].name == "Apple Inc. (renamed)"
            && d.instruments["AAPL"].tick_size == dec("0.005")
    })
    .await;

    sqlx::query("INSERT INTO fx_rates (currency, usd_rate) VALUES ('JPY', 0.00665)")
        .execute(&pool)
        .await
        .expect("insert");
    follows(&cache, "fx insert", |d| {
        d.fx_usd.get("JPY") == Some(&dec("0.00665"))
    })
    .await;

    sqlx::query("UPDATE fx_rates SET usd_rate = 0.0127 WHERE currency = 'GBX'")
        .execute(&pool)
        .await
        .expect("update");
    follows(&cache, "fx update", |d| {
        d.fx_usd.get("GBX") == Some(&dec("0.0127"))
    })
    .await;

    sqlx::query("INSERT INTO accounts (id, desk, owner) VALUES ('ACC2', 'FX Spot', 'Wei Tanaka')")
        .execute(&pool)
        .await
        .expect("insert");
    follows(&cache, "account insert", |d| {
        d.accounts.get("ACC2").is_some_and(|a| a.desk == "FX Spot")
    })
    .await;

    sqlx::query("DELETE FROM instruments WHERE symbol = 'MSFT'")
        .execute(&pool)
        .await
        .expect("delete");
    follows(&cache, "instrument delete", |d| {
        !d.instruments.contains_key("MSFT")
    })
    .await;

    sqlx::query("INSERT INTO venues (mic, name, country, timezone) VALUES ('XPAR', 'Euronext Paris', 'FR', 'Europe/Paris')")
        .execute(&pool)
        .await
        .expect("insert");
    follows(&cache, "venue insert", |d| {
        d.venues
            .get("XPAR")
            .is_some_and(|v| v.timezone == "Europe/Paris")
    })
    .await;

    // TRUNCATE fires no row trigger; the statement trigger makes caches reload.
    sqlx::query("TRUNCATE accounts")
        .execute(&pool)
        .await
        .expect("truncate");
    follows(&cache, "truncate", |d| d.accounts.is_empty()).await;

    // Whatever the cache holds now is what a fresh load reads.
    let fresh = RefData::load(&pool).await.expect("load");
    assert_eq!(*cache.read(), fresh);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), listener)
        .await
        .expect("listener stops after shutdown")
        .expect("listener task");
}
