//! The shared consumer loop with a handler that fails: nothing is dropped, and a
//! failed batch comes back until it succeeds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tickgraph_enrich::consumer::{self, BatchHandler, ConsumerConfig, Entry};
use tokio_util::sync::CancellationToken;

use crate::helpers::TestRedis;

const GROUP: &str = "flaky";

#[derive(Default)]
struct Seen {
    calls: usize,
    /// (stream, entry id) -> (record, times handled successfully). Ids repeat
    /// across streams.
    done: BTreeMap<(String, String), (Vec<u8>, usize)>,
    /// Entries handed to the failing calls.
    failed: Vec<(String, String)>,
}

/// Fails its first `fail_first` calls without acking; afterwards records and acks.
struct Flaky {
    con: redis::aio::ConnectionManager,
    fail_first: usize,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Debug)]
struct Boom;

impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("boom")
    }
}

impl BatchHandler for Flaky {
    type Error = Boom;

    async fn handle(&self, _shard: u16, stream: &str, entries: Vec<Entry>) -> Result<(), Boom> {
        {
            let mut seen = self.seen.lock().expect("lock");
            seen.calls += 1;
            if seen.calls <= self.fail_first {
                seen.failed
                    .extend(entries.iter().map(|e| (stream.to_string(), e.id.clone())));
                return Err(Boom);
            }
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(stream).arg(GROUP);
        for e in &entries {
            ack.arg(&e.id);
        }
        let mut con = self.con.clone();
        let _: i64 = ack.query_async(&mut con).await.map_err(|_| Boom)?;
        let mut seen = self.seen.lock().expect("lock");
        for e in entries {
            seen.done
                .entry((stream.to_string(), e.id))
                .or_insert((e.record, 0))
                .1 += 1;
        }
        Ok(())
    }
}

#[tokio::test]
async fn failed_batches_are_retried_until_they_succeed() {
    let mut r = TestRedis::new(2).await;
    let keys: Vec<String> = r
        .layout
        .shard_ids()
        .map(|s| format!("{}:flaky:{{{s}}}", r.layout.prefix()))
        .collect();
    let mut added = BTreeMap::new();
    for i in 0..50u32 {
        let key = &keys[(i % 2) as usize];
        let payload = format!("payload {i}").into_bytes();
        let id = r.add(key, &payload).await;
        added.insert((key.clone(), id), payload);
    }

    let seen = Arc::new(Mutex::new(Seen::default()));
    let handler = Flaky {
        con: r.client.get_connection_manager().await.expect("redis"),
        fail_first: 3,
        seen: seen.clone(),
    };
    // Nobody else consumes here: claiming and trimming stay out of the way.
    let cfg = ConsumerConfig::new(
        GROUP,
        "c1",
        8,
        Duration::from_millis(100),
        Duration::from_secs(3600),
        tickgraph_ingest::Trim::None,
    );
    let shutdown = CancellationToken::new();
    let streams: Vec<(u16, String)> = keys
        .iter()
        .cloned()
        .enumerate()
        .map(|(s, k)| (s as u16, k))
        .collect();
    let task = tokio::spawn(consumer::run(
        r.client.clone(),
        cfg,
        streams,
        handler,
        shutdown.clone(),
    ));
    r.wait_drained(&keys, GROUP).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("consumer stops after shutdown")
        .expect("task")
        .expect("run returns Ok");

    let seen = seen.lock().expect("lock");
    assert!(
        seen.failed.len() >= 3,
        "the failing calls got entries: {:?}",
        seen.failed
    );
    for id in &seen.failed {
        assert!(
            seen.done.contains_key(id),
            "{id:?} was dropped after its batch failed"
        );
    }
    assert_eq!(seen.done.len(), added.len());
    for (id, payload) in &added {
        let (record, times) = &seen.done[id];
        assert_eq!(record, payload, "{id:?}");
        assert_eq!(*times, 1, "{id:?} handled {times} times");
    }
}

/// The consumers in `key`'s group, by name, with their pending counts.
async fn consumers(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> BTreeMap<String, usize> {
    let reply: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(key)
        .arg(GROUP)
        .query_async(con)
        .await
        .expect("XINFO CONSUMERS");
    reply
        .consumers
        .into_iter()
        .map(|c| (c.name, c.pending))
        .collect()
}

/// Workers named per pod come and go; a consumer that holds nothing and has
/// been idle past `forget_idle` is deleted, one that still holds an entry is
/// kept (its entries would be lost with it), and so is the worker itself.
#[tokio::test]
async fn idle_consumers_holding_nothing_are_forgotten() {
    let mut r = TestRedis::new(1).await;
    let key = format!("{}:forget:{{0}}", r.layout.prefix());
    r.add(&key, b"held").await;
    tickgraph_ingest::stream::ensure_group(&mut r.con, &key, GROUP)
        .await
        .expect("group");
    for (name, count) in [("gone-holding", 1), ("gone-empty", 0)] {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(name)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("STREAMS")
            .arg(&key)
            .arg(if count > 0 { ">" } else { "0" })
            .query_async(&mut r.con)
            .await
            .expect("XREADGROUP");
    }
    assert_eq!(
        consumers(&mut r.con, &key).await,
        BTreeMap::from([("gone-empty".into(), 0), ("gone-holding".into(), 1)])
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let handler = Flaky {
        con: r.client.get_connection_manager().await.expect("redis"),
        fail_first: 0,
        seen: Arc::default(),
    };
    let mut cfg = ConsumerConfig::new(
        GROUP,
        "live",
        8,
        Duration::from_millis(100),
        Duration::from_secs(3600),
        tickgraph_ingest::Trim::None,
    );
    cfg.forget_idle = Duration::from_millis(200);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer::run(
        r.client.clone(),
        cfg,
        vec![(0, key.clone())],
        handler,
        shutdown.clone(),
    ));
    crate::helpers::wait_until("the empty consumer is forgotten", || {
        let (mut con, key) = (r.con.clone(), key.clone());
        async move { !consumers(&mut con, &key).await.contains_key("gone-empty") }
    })
    .await;
    shutdown.cancel();
    task.await.expect("task").expect("run returns Ok");
    let left = consumers(&mut r.con, &key).await;
    assert_eq!(left.get("gone-holding"), Some(&1), "{left:?}");
    assert!(left.contains_key("live"), "{left:?}");
}
