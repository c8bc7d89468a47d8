//! The history loader: enriched streams into Postgres, exactly once in effect.

use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::PgPool;
use tickgraph_enrich::loader::{self, LoadConfig};
use tickgraph_enrich::refdata::AssetClass;
use tickgraph_enrich::{Derived, EnrichedRecord};
use tickgraph_ingest::stream::{RawRecord, LOAD_GROUP};
use tickgraph_ingest::Event;
use tokio_util::sync::CancellationToken;

use crate::helpers::{dec, quote, trade, TestRedis};

fn enriched(raw: RawRecord, currency: &str, derived: Derived) -> EnrichedRecord {
    EnrichedRecord {
        event: raw.event,
        ingest_ns: raw.ingest_ns,
        enriched_ns: raw.ingest_ns + 1_000,
        asset_class: AssetClass::Equity,
        currency: currency.into(),
        derived,
    }
}

fn t(notional: &str, usd: &str) -> Derived {
    Derived::Trade {
        notional: dec(notional),
        notional_usd: dec(usd),
    }
}

/// XADDs to the record's shard, as enrich writes it (a batch entry of one);
/// returns the entry id.
async fn add(r: &mut TestRedis, rec: &EnrichedRecord) -> String {
    let key = r
        .layout
        .enriched(r.layout.shard_of(&rec.event.header().instrument));
    let entry = EnrichedRecord::encode_batch(std::slice::from_ref(rec)).expect("encode");
    r.add(&key, &entry).await
}

fn config(r: &TestRedis) -> LoadConfig {
    let mut cfg = LoadConfig::new(r.layout.clone(), "l1");
    cfg.block = Duration::from_millis(100);
    cfg
}

/// A loader that keeps every loaded entry id, so that [`redeliver`] can stand in
/// for a crash between commit and ack.
fn keeping_ids(r: &TestRedis) -> LoadConfig {
    LoadConfig {
        prune_every: Duration::from_secs(3600),
        ..config(r)
    }
}

/// Delivers every entry of `keys` to the load group again, as a restart after a
/// crash between the history commit and the XACK would.
async fn redeliver(r: &mut TestRedis, keys: &[String]) {
    for key in keys {
        redis::cmd("XGROUP")
            .arg("SETID")
            .arg(key)
            .arg(LOAD_GROUP)
            .arg("0")
            .query_async::<()>(&mut r.con)
            .await
            .expect("XGROUP SETID");
    }
}

async fn history_entries(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM history_entries")
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn stop(
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), loader::LoadError>>,
) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("loader stops after shutdown")
        .expect("loader task")
        .expect("loader returns Ok");
}

type TradeRow = (
    String,
    String,
    i64,
    Decimal,
    Decimal,
    String,
    Option<String>,
    String,
    String,
    Decimal,
    Decimal,
    i64,
    i64,
    String,
);

#[sqlx::test(migrations = "../migrations")]
async fn loads_each_event_once_even_when_redelivered(pool: PgPool) {
    let mut r = TestRedis::new(2).await;
    let t1 = enriched(
        trade(1, "AAPL", "XNAS", "187.25", "100", Some("ACC1")),
        "USD",
        t("18725", "18725"),
    );
    let t2 = enriched(
        trade(2, "VOD.L", "XLON", "72.34", "1000", None),
        "GBX",
        t("72340", "911.484"),
    );
    let t3 = enriched(
        trade(3, "MSFT", "XNAS", "415.10", "3", None),
        "USD",
        t("1245.3", "1245.3"),
    );
    let q1 = enriched(
        quote(4, "AAPL", "XNAS", "187.25", "187.26"),
        "USD",
        Derived::Quote {
            mid: dec("187.255"),
            spread: dec("0.01"),
        },
    );
    let q2 = enriched(
        quote(5, "VOD.L", "XLON", "72.30", "72.36"),
        "GBX",
        Derived::Quote {
            mid: dec("72.33"),
            spread: dec("0.06"),
        },
    );
    // t1 and q1 (both AAPL, one shard) in one batch entry, the rest one per entry.
    let key = r
        .layout
        .enriched(r.layout.shard_of(&t1.event.header().instrument));
    let batch = EnrichedRecord::encode_batch(&[t1.clone(), q1.clone()]).expect("encode");
    let batch_id = r.add(&key, &batch).await;
    let (t1_id, q1_id) = (format!("{batch_id}.0"), format!("{batch_id}.1"));
    add(&mut r, &t2).await;
    add(&mut r, &t3).await;
    add(&mut r, &q2).await;
    let garbage_id = r.add(&r.layout.enriched(1), b"\xc1 not a record").await;

    let keys: Vec<String> = r.layout.shard_ids().map(|s| r.layout.enriched(s)).collect();
    for round in 0..2 {
        if round == 1 {
            // Its letter went out with the first ack; only the rows are at stake.
            let _: i64 =
                redis::AsyncCommands::xdel(&mut r.con, r.layout.enriched(1), &[&garbage_id])
                    .await
                    .expect("XDEL");
            redeliver(&mut r, &keys).await;
        }
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(loader::run(
            keeping_ids(&r),
            r.client.clone(),
            pool.clone(),
            shutdown.clone(),
        ));
        r.wait_drained(&keys, LOAD_GROUP).await;
        stop(shutdown, task).await;
    }

    let trades: i64 = sqlx::query_scalar("SELECT count(*) FROM trades")
        .fetch_one(&pool)
        .await
        .expect("count");
    let quotes: i64 = sqlx::query_scalar("SELECT count(*) FROM quotes")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!((trades, quotes), (3, 2));

    let row: TradeRow = sqlx::query_as(
        "SELECT source, instrument, ts_ns, price, qty, side, account, asset_class, currency::text, \
         notional, notional_usd, ingest_ns, enriched_ns, stream_id FROM trades WHERE source = 'it' AND seq = 1",
    )
    .fetch_one(&pool)
    .await
    .expect("t1 row");
    let Event::Trade(t1_event) = &t1.event else {
        unreachable!()
    };
    assert_eq!(row.0, "it");
    assert_eq!(row.1, "AAPL");
    assert_eq!(row.2, t1_event.header.ts.nanos());
    assert_eq!((row.3, row.4), (dec("187.25"), dec("100")));
    assert_eq!(row.5, t1_event.side.as_str());
    assert_eq!(row.6.as_deref(), Some("ACC1"));
    assert_eq!((row.7.as_str(), row.8.as_str()), ("equity", "USD"));
    assert_eq!((row.9, row.10), (dec("18725"), dec("18725")));
    assert_eq!((row.11, row.12), (t1.ingest_ns, t1.enriched_ns));
    assert_eq!(row.13, t1_id, "the first delivery's row is kept");

    let usd: Decimal = sqlx::query_scalar("SELECT notional_usd FROM trades WHERE seq = 2")
        .fetch_one(&pool)
        .await
        .expect("t2");
    assert_eq!(usd, dec("911.484"));
    let account: Option<String> = sqlx::query_scalar("SELECT account FROM trades WHERE seq = 2")
        .fetch_one(&pool)
        .await
        .expect("t2");
    assert_eq!(account, None);

    let q: (Decimal, Decimal, Decimal, Decimal, Decimal, Decimal, String, String) = sqlx::query_as(
        "SELECT bid, ask, bid_size, ask_size, mid, spread, currency::text, stream_id FROM quotes WHERE seq = 4",
    )
    .fetch_one(&pool)
    .await
    .expect("q1 row");
    assert_eq!(
        q,
        (
            dec("187.25"),
            dec("187.26"),
            dec("300"),
            dec("500"),
            dec("187.255"),
            dec("0.01"),
            "USD".into(),
            q1_id
        )
    );

    let letters = r.range_fields(&r.layout.dlq(1)).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["stage"], b"load");
    let reason = String::from_utf8_lossy(&letters[0]["reason"]).to_string();
    assert!(
        reason.starts_with(&format!("unloadable enriched entry {garbage_id}")),
        "{reason}"
    );
    for key in &keys {
        assert_eq!(r.group_state(key, LOAD_GROUP).await.0, 0, "{key} pending");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn nothing_is_acked_until_postgres_commits(pool: PgPool) {
    let mut r = TestRedis::new(1).await;
    let records: Vec<EnrichedRecord> = (0..20u64)
        .map(|i| {
            enriched(
                trade(100 + i, "AAPL", "XNAS", "10", "2", None),
                "USD",
                t("20", "20"),
            )
        })
        .collect();
    let mut last = String::new();
    for rec in &records {
        last = add(&mut r, rec).await;
    }
    // Every insert fails while the table is away.
    sqlx::query("ALTER TABLE trades RENAME TO trades_away")
        .execute(&pool)
        .await
        .expect("rename");

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(loader::run(
        config(&r),
        r.client.clone(),
        pool.clone(),
        shutdown.clone(),
    ));
    let key = r.layout.enriched(0);
    let last_id: tickgraph_ingest::stream::EntryId = last.parse().expect("id");
    crate::helpers::wait_until("the loader reads every entry", || {
        let mut con = r.con.clone();
        let key = key.clone();
        async move {
            use redis::AsyncCommands;
            let g: redis::streams::StreamInfoGroupsReply = match con.xinfo_groups(&key).await {
                Ok(g) => g,
                Err(_) => return false,
            };
            g.groups.iter().any(|g| {
                g.name == LOAD_GROUP
                    && g.last_delivered_id
                        .parse::<tickgraph_ingest::stream::EntryId>()
                        .is_ok_and(|d| d >= last_id)
            })
        }
    })
    .await;
    assert_eq!(
        r.group_state(&key, LOAD_GROUP).await.0,
        records.len(),
        "acked without a commit"
    );

    sqlx::query("ALTER TABLE trades_away RENAME TO trades")
        .execute(&pool)
        .await
        .expect("rename back");
    r.wait_drained(&[key], LOAD_GROUP).await;
    stop(shutdown, task).await;

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM trades")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(n, records.len() as i64);
}

/// Batches are written with COPY, whose text format gives `\` a meaning: ids
/// that hold backslashes are stored exactly as sent. A later batch holding an
/// entry already stored (a redelivery after a crash between commit and ack)
/// fails the COPY; it is written again without that entry, and the new entry of
/// the same batch is stored.
#[sqlx::test(migrations = "../migrations")]
async fn copy_keeps_text_exact_and_a_later_redelivery_stores_only_the_new(pool: PgPool) {
    let mut r = TestRedis::new(1).await;
    let mut odd = enriched(
        trade(1, "AAPL", "XNAS", "187.25", "100", Some(r"A\tB\\C\N")),
        "USD",
        t("18725", "18725"),
    );
    if let Event::Trade(tr) = &mut odd.event {
        tr.trade_id = Some(tickgraph_ingest::event::TradeId::parse(r"\N").expect("trade id"));
    }
    add(&mut r, &odd).await;
    let key = r.layout.enriched(0);

    let run = |r: &TestRedis| {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(loader::run(
            keeping_ids(r),
            r.client.clone(),
            pool.clone(),
            shutdown.clone(),
        ));
        (shutdown, task)
    };
    let (shutdown, task) = run(&r);
    r.wait_drained(std::slice::from_ref(&key), LOAD_GROUP).await;
    stop(shutdown, task).await;

    let (account, trade_id): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT account, trade_id FROM trades WHERE seq = 1")
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(account.as_deref(), Some(r"A\tB\\C\N"));
    assert_eq!(trade_id.as_deref(), Some(r"\N"));

    // The stored entry comes again in one batch with a new one.
    let new = EnrichedRecord::encode_batch(&[
        enriched(trade(2, "AAPL", "XNAS", "1", "1", None), "USD", t("1", "1")),
        enriched(trade(3, "AAPL", "XNAS", "2", "1", None), "USD", t("2", "2")),
    ])
    .expect("encode");
    r.add(&key, &new).await;
    redeliver(&mut r, std::slice::from_ref(&key)).await;
    let (shutdown, task) = run(&r);
    r.wait_drained(std::slice::from_ref(&key), LOAD_GROUP).await;
    stop(shutdown, task).await;

    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM trades ORDER BY seq")
        .fetch_all(&pool)
        .await
        .expect("seqs");
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(r.group_state(&key, LOAD_GROUP).await.0, 0, "pending");
}

/// Loaded entry ids are kept while the group may deliver them again (while they
/// or an older entry are pending) and pruned after.
#[sqlx::test(migrations = "../migrations")]
async fn loaded_entry_ids_are_kept_only_while_they_can_come_again(pool: PgPool) {
    let mut r = TestRedis::new(1).await;
    let key = r.layout.enriched(0);
    for i in 0..5u64 {
        let rec = enriched(
            trade(1 + i, "AAPL", "XNAS", "10", "1", None),
            "USD",
            t("10", "10"),
        );
        add(&mut r, &rec).await;
    }
    // A consumer that took the first entry and died without acking it.
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&key)
        .arg(LOAD_GROUP)
        .arg("0")
        .query_async::<()>(&mut r.con)
        .await
        .expect("XGROUP CREATE");
    redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(LOAD_GROUP)
        .arg("ghost")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&key)
        .arg(">")
        .query_async::<redis::Value>(&mut r.con)
        .await
        .expect("XREADGROUP");

    let base = LoadConfig {
        prune_every: Duration::ZERO,
        ..config(&r)
    };
    let client = r.client.clone();
    let run = |claim_idle: Duration| {
        let cfg = LoadConfig {
            claim_idle,
            ..base.clone()
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(loader::run(
            cfg,
            client.clone(),
            pool.clone(),
            shutdown.clone(),
        ));
        (shutdown, task)
    };
    let (shutdown, task) = run(Duration::from_secs(3600));
    crate::helpers::wait_until("the loader stores the four entries it was given", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM trades")
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n == 4)
        }
    })
    .await;
    stop(shutdown, task).await;
    assert_eq!(
        r.group_state(&key, LOAD_GROUP).await.0,
        1,
        "ghost's entry pending"
    );
    assert_eq!(
        history_entries(&pool).await,
        4,
        "the ghost's pending entry is older: every loaded id may come again"
    );

    let (shutdown, task) = run(Duration::from_millis(200));
    r.wait_drained(std::slice::from_ref(&key), LOAD_GROUP).await;
    stop(shutdown, task).await;
    let trades: i64 = sqlx::query_scalar("SELECT count(*) FROM trades")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(trades, 5);
    assert_eq!(history_entries(&pool).await, 0, "nothing can come again");
}
