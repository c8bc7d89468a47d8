//! Shared test plumbing: a Redis stream prefix of the test's own (deleted on drop,
//! even when the test panics), event builders, seed rows and polling.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use rust_decimal::Decimal;
use tickgraph_ingest::event::{AccountId, Header, Mic, Source, Symbol};
use tickgraph_ingest::stream::{encode_batch, parse_entries, EntryId, RawRecord, StreamEntry};
use tickgraph_ingest::{Event, Quote, Side, StreamLayout, Timestamp, Trade};

pub fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).expect("test decimal")
}

pub struct TestRedis {
    pub client: redis::Client,
    pub con: MultiplexedConnection,
    pub layout: StreamLayout,
}

impl TestRedis {
    pub async fn new(shards: u16) -> Self {
        let url =
            std::env::var("TG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
        let client = redis::Client::open(url).expect("redis url");
        let con = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis is running");
        let layout = StreamLayout::new(format!("t{}", rand::random::<u64>()), shards);
        Self {
            client,
            con,
            layout,
        }
    }

    /// XADDs raw records to their shards, each as a batch entry of one, as ingest
    /// writes them; returns the entry ids in order.
    pub async fn add_raw(&mut self, records: &[RawRecord]) -> Vec<String> {
        let mut ids = Vec::new();
        for rec in records {
            ids.push(self.add_raw_batch(std::slice::from_ref(rec)).await);
        }
        ids
    }

    /// XADDs records of one shard as one batch entry; returns its id.
    pub async fn add_raw_batch(&mut self, records: &[RawRecord]) -> String {
        let key = self
            .layout
            .raw(self.layout.shard_of(&records[0].event.header().instrument));
        let encoded: Vec<Vec<u8>> = records
            .iter()
            .map(|r| r.encode().expect("encode"))
            .collect();
        let bytes = encode_batch(encoded.iter().map(Vec::as_slice));
        self.add(&key, &bytes).await
    }

    pub async fn add(&mut self, key: &str, record: &[u8]) -> String {
        self.con
            .xadd(key, "*", &[("e", record)])
            .await
            .expect("xadd")
    }

    pub async fn range(&mut self, key: &str) -> Vec<StreamEntry> {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut self.con)
            .await
            .expect("xrange");
        parse_entries(v).expect("entries")
    }

    /// Every field of every entry of `key`, as strings or bytes.
    pub async fn range_fields(
        &mut self,
        key: &str,
    ) -> Vec<std::collections::HashMap<String, Vec<u8>>> {
        let reply: redis::streams::StreamRangeReply =
            self.con.xrange_all(key).await.expect("xrange");
        reply
            .ids
            .into_iter()
            .map(|id| {
                id.map
                    .into_iter()
                    .map(|(k, v)| match v {
                        redis::Value::BulkString(b) => (k, b),
                        other => panic!("field {k} is {other:?}"),
                    })
                    .collect()
            })
            .collect()
    }

    /// `(pending, last delivered id)` of `group` on `key`.
    pub async fn group_state(&mut self, key: &str, group: &str) -> (usize, EntryId) {
        let reply: redis::streams::StreamInfoGroupsReply =
            self.con.xinfo_groups(key).await.expect("xinfo groups");
        let g = reply
            .groups
            .into_iter()
            .find(|g| g.name == group)
            .expect("group exists");
        (g.pending, g.last_delivered_id.parse().expect("id"))
    }

    /// Waits until `group` has been handed every entry now in each of `keys` and
    /// has acked all of them.
    pub async fn wait_drained(&mut self, keys: &[String], group: &str) {
        for key in keys {
            let Some(last) = self.range(key).await.last().map(|e| e.id.clone()) else {
                continue;
            };
            let last: EntryId = last.parse().expect("id");
            wait_until(&format!("group {group} drains {key}"), || {
                drained(self.con.clone(), key.clone(), group, last)
            })
            .await;
        }
    }
}

async fn drained(mut con: MultiplexedConnection, key: String, group: &str, last: EntryId) -> bool {
    let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> =
        con.xinfo_groups(&key).await;
    let Ok(groups) = groups else { return false };
    let Some(g) = groups.groups.into_iter().find(|g| g.name == group) else {
        return false;
    };
    let delivered: EntryId = g.last_delivered_id.parse().expect("id");
    g.pending == 0 && delivered >= last
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        // Synchronous, so that keys go even when the test panicked.
        let Ok(mut con) = self.client.get_connection() else {
            return;
        };
        let pattern = format!("{}:*", self.layout.prefix());
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut con)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut con);
        }
    }
}

/// Polls `check` until it holds; fails the test after a generous deadline, which
/// bounds a hang rather than measuring speed.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn header(source: &str, seq: u64, instrument: &str, venue: &str) -> Header {
    Header {
        source: Source::parse(source).expect("source"),
        seq,
        instrument: Symbol::parse(instrument).expect("symbol"),
        venue: Mic::parse(venue).expect("mic"),
        ts: Timestamp::from_nanos(1_732_000_000_000_000_000 + seq as i64).expect("ts"),
    }
}

pub fn trade(
    seq: u64,
    instrument: &str,
    venue: &str,
    price: &str,
    qty: &str,
    account: Option<&str>,
) -> RawRecord {
    RawRecord {
        event: Event::Trade(Trade {
            header: header("it", seq, instrument, venue),
            price: dec(price),
            qty: dec(qty),
            side: if seq.is_multiple_of(2) {
                Side::Buy
            } else {
                Side::Sell
            },
            trade_id: None,
            account: account.map(|a| AccountId::parse(a).expect("account")),
        }),
        ingest_ns: 1_732_000_000_500_000_000 + seq as i64,
    }
}

pub fn quote(seq: u64, instrument: &str, venue: &str, bid: &str, ask: &str) -> RawRecord {
    RawRecord {
        event: Event::Quote(Quote {
            header: header("it", seq, instrument, venue),
            bid: dec(bid),
            ask: dec(ask),
            bid_size: dec("300"),
            ask_size: dec("500"),
        }),
        ingest_ns: 1_732_000_000_500_000_000 + seq as i64,
    }
}

/// A small reference set with hand-checkable numbers: AAPL in USD, VOD.L in pence
/// (GBX, 0.0126 USD), MSFT, and 7203.T in JPY without an FX rate.
pub async fn seed_refdata(pool: &sqlx::PgPool) {
    sqlx::raw_sql(
        "INSERT INTO venues (mic, name, country, timezone) VALUES \
           ('XNAS', 'Nasdaq', 'US', 'America/New_York'), \
           ('XLON', 'London Stock Exchange', 'GB', 'Europe/London'), \
           ('XTKS', 'Tokyo Stock Exchange', 'JP', 'Asia/Tokyo'); \
         INSERT INTO instruments (symbol, name, asset_class, currency, venue, tick_size, lot_size) VALUES \
           ('AAPL', 'Apple Inc.', 'equity', 'USD', 'XNAS', 0.01, 1), \
           ('MSFT', 'Microsoft Corporation', 'equity', 'USD', 'XNAS', 0.01, 1), \
           ('VOD.L', 'Vodafone Group Plc', 'equity', 'GBX', 'XLON', 0.01, 1), \
           ('7203.T', 'Toyota Motor Corporation', 'equity', 'JPY', 'XTKS', 1, 100); \
         INSERT INTO accounts (id, desk, owner) VALUES ('ACC1', 'US Cash Equities', 'Alice Chen'); \
         INSERT INTO fx_rates (currency, usd_rate) VALUES ('USD', 1), ('GBX', 0.0126);",
    )
    .execute(pool)
    .await
    .expect("seed reference data");
}
