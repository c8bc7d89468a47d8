//! Counting what each stage of the pipeline let through: a tail reader of the
//! enriched streams (events per entry, read from the record's array header
//! only), and the history tables.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use redis::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use tickgraph_ingest::stream::RECORD_FIELD;
use tickgraph_ingest::StreamLayout;

/// Events in an entry's record field: a batch is a MessagePack array of records,
/// of which only the length header is read; anything else is one record.
pub fn events_in_record(bytes: &[u8]) -> u64 {
    match bytes.first() {
        Some(0x90..=0x9f | 0xdc | 0xdd) => {
            rmp::decode::read_array_len(&mut &bytes[..]).map_or(0, u64::from)
        }
        Some(_) => 1,
        None => 0,
    }
}

/// Counts the events added to every enriched stream since it started.
pub struct EnrichedTail {
    events: Arc<AtomicU64>,
    entries: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl EnrichedTail {
    /// Takes the end of every enriched stream now, then reads on until `stop`.
    pub async fn start(
        client: &redis::Client,
        layout: &StreamLayout,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        let mut con = connect(client).await?;
        let keys: Vec<String> = layout.shard_ids().map(|s| layout.enriched(s)).collect();
        let mut last = Vec::with_capacity(keys.len());
        for key in &keys {
            let reply: Value = redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut con)
                .await
                .with_context(|| format!("XREVRANGE {key}"))?;
            let id = items(&reply)
                .first()
                .and_then(|e| items(e).first().and_then(bulk))
                .map_or_else(
                    || "0-0".to_owned(),
                    |b| String::from_utf8_lossy(b).into_owned(),
                );
            last.push(id);
        }
        let events = Arc::new(AtomicU64::new(0));
        let entries = Arc::new(AtomicU64::new(0));
        let reader = Reader {
            client: client.clone(),
            keys,
            last,
            events: events.clone(),
            entries: entries.clone(),
        };
        let task = tokio::spawn(reader.run(con, stop));
        Ok(Self {
            events,
            entries,
            task,
        })
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

async fn connect(client: &redis::Client) -> redis::RedisResult<MultiplexedConnection> {
    // No response timeout: XREAD BLOCK holds the connection.
    client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(None),
        )
        .await
}

struct Reader {
    client: redis::Client,
    keys: Vec<String>,
    last: Vec<String>,
    events: Arc<AtomicU64>,
    entries: Arc<AtomicU64>,
}

impl Reader {
    async fn run(mut self, con: MultiplexedConnection, stop: CancellationToken) {
        let mut con = Some(con);
        loop {
            let mut c = match con.take() {
                Some(c) => c,
                None => match connect(&self.client).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "enriched tail cannot connect; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        }
                    }
                },
            };
            let mut cmd = redis::cmd("XREAD");
            // Batch entries hold many events each: a small COUNT keeps a reply
            // after a stall from growing to tens of megabytes.
            cmd.arg("COUNT")
                .arg(100)
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS")
                .arg(&self.keys)
                .arg(&self.last);
            let reply: redis::RedisResult<Value> = tokio::select! {
                _ = stop.cancelled() => return,
                r = cmd.query_async(&mut c) => r,
            };
            match reply {
                Ok(v) => {
                    self.absorb(&v);
                    con = Some(c);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "enriched tail read failed; reconnecting");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    fn absorb(&mut self, reply: &Value) {
        let streams: Vec<(&Value, &Value)> = match reply {
            Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
            other => items(other)
                .iter()
                .filter_map(|s| match items(s) {
                    [k, v] => Some((k, v)),
                    _ => None,
                })
                .collect(),
        };
        let (mut events, mut entries) = (0, 0);
        for (key, list) in streams {
            let Some(i) = bulk(key).and_then(|k| self.keys.iter().position(|x| x.as_bytes() == k))
            else {
                continue;
            };
            for entry in items(list) {
                let [id, fields] = items(entry) else { continue };
                let Some(id) = bulk(id) else { continue };
                entries += 1;
                events += record_field(fields).map_or(0, events_in_record);
                self.last[i] = String::from_utf8_lossy(id).into_owned();
            }
        }
        self.events.fetch_add(events, Ordering::Relaxed);
        self.entries.fetch_add(entries, Ordering::Relaxed);
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn record_field(fields: &Value) -> Option<&[u8]> {
    match fields {
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| bulk(k) == Some(RECORD_FIELD.as_bytes()))
            .and_then(|(_, v)| bulk(v)),
        other => items(other)
            .chunks_exact(2)
            .find(|kv| bulk(&kv[0]) == Some(RECORD_FIELD.as_bytes()))
            .and_then(|kv| bulk(&kv[1])),
    }
}

/// Rows in history of the given per-source seq ranges (inclusive), trades and
/// quotes; each range is one primary-key index scan.
pub async fn loaded_in(pool: &PgPool, ranges: &[(String, u64, u64)]) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for (source, first, last) in ranges {
        if last < first {
            continue;
        }
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM trades WHERE source = $1 AND seq BETWEEN $2 AND $3) \
                  + (SELECT count(*) FROM quotes WHERE source = $1 AND seq BETWEEN $2 AND $3)",
        )
        .bind(source)
        .bind(i64::try_from(*first).unwrap_or(i64::MAX))
        .bind(i64::try_from(*last).unwrap_or(i64::MAX))
        .fetch_one(pool)
        .await
        .context("counting history rows")?;
        total += u64::try_from(n).unwrap_or(0);
    }
    Ok(total)
}

/// Rows in history whose source matches a LIKE pattern, trades and quotes.
pub async fn loaded_like(pool: &PgPool, pattern: &str) -> anyhow::Result<(u64, u64)> {
    let (trades, quotes): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM trades WHERE source LIKE $1), \
                (SELECT count(*) FROM quotes WHERE source LIKE $1)",
    )
    .bind(pattern)
    .fetch_one(pool)
    .await
    .context("counting history rows")?;
    Ok((
        u64::try_from(trades).unwrap_or(0),
        u64::try_from(quotes).unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickgraph_ingest::stream::{encode_batch, RawRecord};
    use tickgraph_ingest::wire::{decode_batch, Format};

    fn records(n: usize) -> Vec<Vec<u8>> {
        let events: Vec<String> = (1..=n)
            .map(|seq| {
                format!(
                    r#"{{"kind":"quote","source":"b","seq":{seq},"instrument":"AAPL","venue":"XNAS","ts":1764064800000000000,"bid":"1.00","ask":"1.01","bid_size":1,"ask_size":2}}"#
                )
            })
            .collect();
        let body = format!("[{}]", events.join(","));
        decode_batch(Format::Json, body.as_bytes(), 100_000)
            .expect("framing")
            .into_iter()
            .map(|it| {
                RawRecord {
                    event: it.outcome.expect("valid"),
                    ingest_ns: 1,
                }
                .encode()
                .expect("encodes")
            })
            .collect()
    }

    /// A record as entries of one record held it, before batching: a map.
    fn single(rec: &[u8]) -> Vec<u8> {
        let rec: RawRecord = rmp_serde::from_slice(rec).expect("a record");
        rmp_serde::to_vec_named(&rec).expect("encodes")
    }

    #[test]
    fn counts_the_events_of_batch_and_single_entries_from_the_header() {
        let recs = records(3);
        for n in [0usize, 1, 3] {
            let entry = encode_batch(recs[..n].iter().map(Vec::as_slice));
            assert_eq!(events_in_record(&entry), n as u64, "batch of {n}");
        }
        // Past 15 and 65,535 records the array header takes 3, then 5 bytes.
        for n in [15usize, 16, 300, 65_535, 65_536, 70_000] {
            let entry = encode_batch(std::iter::repeat_n(recs[0].as_slice(), n));
            assert_eq!(events_in_record(&entry), n as u64, "batch of {n}");
        }
        assert_eq!(
            events_in_record(&single(&recs[0])),
            1,
            "a single record is a map"
        );
        assert_eq!(events_in_record(&[]), 0);
    }

    #[test]
    fn reads_the_record_field_of_an_xread_reply() {
        let bs = |s: &[u8]| Value::BulkString(s.to_vec());
        let batch = encode_batch(records(4).iter().map(Vec::as_slice));
        let entry = |id: &[u8], rec: &[u8]| {
            Value::Array(vec![bs(id), Value::Array(vec![bs(b"e"), bs(rec)])])
        };
        let reply = Value::Array(vec![Value::Array(vec![
            bs(b"p:enriched:{1}"),
            Value::Array(vec![
                entry(b"1-0", &batch),
                entry(b"2-0", &single(&records(1)[0])),
            ]),
        ])]);
        let mut r = Reader {
            client: redis::Client::open("redis://127.0.0.1:1").expect("client"),
            keys: vec!["p:enriched:{0}".into(), "p:enriched:{1}".into()],
            last: vec!["0-0".into(), "0-0".into()],
            events: Arc::new(AtomicU64::new(0)),
            entries: Arc::new(AtomicU64::new(0)),
        };
        r.absorb(&reply);
        assert_eq!(r.events.load(Ordering::Relaxed), 5);
        assert_eq!(r.entries.load(Ordering::Relaxed), 2);
        assert_eq!(r.last, vec!["0-0".to_string(), "2-0".to_string()]);
    }
}
