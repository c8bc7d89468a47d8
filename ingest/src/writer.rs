//! The group-commit stream writer. Request handlers hand it whole batches; it
//! gathers everything queued since its last round trip, packs each shard's events
//! into batch entries of up to [`WriterConfig::max_entry_events`] (one XADD whose
//! `e` field is a MessagePack array of records, in arrival order), and sends them
//! in one pipeline. Redis then does one command per shard per round trip instead of
//! one per event, and every consumer downstream pays per entry; a round gathers
//! for up to [`WriterConfig::linger`] so that entries are fuller. A batch is
//! answered only after Redis has it.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::stream::{encode_batch, DeadLetter, StreamLayout, Trim, RECORD_FIELD};

/// A valid event, encoded, bound for its shard's raw stream.
#[derive(Debug)]
pub struct RawEntry {
    pub shard: u16,
    pub record: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("the event store is unavailable: {0}")]
    Redis(String),
    #[error("ingest is shutting down")]
    ShuttingDown,
}

struct Job {
    entries: Vec<RawEntry>,
    dead: Vec<DeadLetter>,
    done: oneshot::Sender<Result<(), WriteError>>,
}

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub layout: StreamLayout,
    pub dlq_trim: Trim,
    /// Events per pipeline before a new one is started.
    pub max_pipeline: usize,
    /// Events per raw stream entry at most.
    pub max_entry_events: usize,
    /// Pipelines in flight at once on the connection.
    pub max_in_flight: usize,
    /// How long a round gathers batches after its first before it writes. Each
    /// stream entry costs Redis and every consumer downstream about as much as a
    /// few dozen events in it, and producers' batches are often small: waiting
    /// a little makes entries several times fuller for that much latency. Zero
    /// writes at once.
    pub linger: Duration,
}

impl WriterConfig {
    pub fn new(layout: StreamLayout) -> Self {
        Self {
            layout,
            dlq_trim: Trim::MaxLen(100_000),
            max_pipeline: 16_384,
            max_entry_events: 256,
            max_in_flight: 4,
            linger: Duration::ZERO,
        }
    }
}

/// Handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct StreamWriter {
    tx: mpsc::Sender<Job>,
}

impl StreamWriter {
    /// Starts the writer task. It runs until every handle is dropped and every
    /// queued batch is written; the returned handle finishes then. It does not
    /// watch a shutdown signal itself: requests still finishing during a graceful
    /// shutdown must have their batches written, not refused.
    pub fn spawn(cfg: WriterConfig, con: ConnectionManager) -> (Self, tokio::task::JoinHandle<()>) {
        // Bounded in batches, not events: handlers wait for their answer anyway.
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(run(cfg, con, rx));
        (Self { tx }, task)
    }

    /// Appends a batch's valid entries and dead letters; resolves once Redis has
    /// them all.
    pub async fn write(
        &self,
        entries: Vec<RawEntry>,
        dead: Vec<DeadLetter>,
    ) -> Result<(), WriteError> {
        if entries.is_empty() && dead.is_empty() {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Job {
                entries,
                dead,
                done,
            })
            .await
            .map_err(|_| WriteError::ShuttingDown)?;
        rx.await.map_err(|_| WriteError::ShuttingDown)?
    }
}

/// The keys a writer appends to, named once at start-up.
struct Keys {
    raw: Vec<String>,
    dlq: String,
}

async fn run(cfg: WriterConfig, con: ConnectionManager, mut rx: mpsc::Receiver<Job>) {
    let keys = Arc::new(Keys {
        raw: cfg.layout.shard_ids().map(|s| cfg.layout.raw(s)).collect(),
        dlq: cfg.layout.ingest_dlq(),
    });
    let cfg = Arc::new(cfg);
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut commands = jobs[0].entries.len() + jobs[0].dead.len();
        if !cfg.linger.is_zero() {
            let deadline = tokio::time::Instant::now() + cfg.linger;
            while commands < cfg.max_pipeline {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(j)) => {
                        commands += j.entries.len() + j.dead.len();
                        jobs.push(j);
                    }
                    // Closed: write what is here; the next recv ends the loop.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        while commands < cfg.max_pipeline {
            match rx.try_recv() {
                Ok(j) => {
                    commands += j.entries.len() + j.dead.len();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (cfg, keys) = (cfg.clone(), keys.clone());
        let mut con = con.clone();
        tokio::spawn(async move {
            let result = write_jobs(&cfg, &keys, &mut con, &jobs).await;
            drop(permit);
            if let Err(e) = &result {
                tracing::error!(error = %e, batches = jobs.len(), "raw stream write failed");
            }
            for j in jobs {
                // The handler may have gone (client hung up); its events are written.
                let _ = j.done.send(result.clone());
            }
        });
    }
    // Wait for the pipelines still in flight.
    let _ = in_flight
        .acquire_many(cfg.max_in_flight.max(1) as u32)
        .await;
}

/// One pipelined round trip for several batches. Not MULTI: the raw streams of
/// different shards live in different cluster slots.
async fn write_jobs(
    cfg: &WriterConfig,
    keys: &Keys,
    con: &mut ConnectionManager,
    jobs: &[Job],
) -> Result<(), WriteError> {
    let mut pipe = redis::pipe();
    let mut per_shard: Vec<Vec<&[u8]>> = vec![Vec::new(); keys.raw.len()];
    for job in jobs {
        for e in &job.entries {
            per_shard[usize::from(e.shard) % keys.raw.len()].push(&e.record);
        }
        for d in &job.dead {
            pipe.add_command(d.xadd(&keys.dlq, cfg.dlq_trim)).ignore();
        }
    }
    for (key, records) in keys.raw.iter().zip(&per_shard) {
        for chunk in records.chunks(cfg.max_entry_events.max(1)) {
            let entry = encode_batch(chunk.iter().copied());
            // Never trimmed here: the enrich workers trim raw streams behind their
            // consumer group (see tickgraph_enrich::retention).
            pipe.add_command(Trim::None.xadd(key, &[(RECORD_FIELD, &entry)]))
                .ignore();
        }
    }
    // Bounded: a hung Redis must not hold producers' answers forever.
    match tokio::time::timeout(Duration::from_secs(10), pipe.query_async::<()>(con)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(WriteError::Redis(e.to_string())),
        Err(_) => Err(WriteError::Redis("timed out after 10s".into())),
    }
}

#[cfg(test)]
mod tests {
    //! Against a real Redis (`TG_TEST_REDIS_URL`, default 127.0.0.1:6379), on
    //! stream keys of this test's own.

    use super::*;

    fn redis_url() -> String {
        std::env::var("TG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    fn entry(seq: u64) -> RawEntry {
        RawEntry {
            shard: 0,
            record: format!("r{seq}").into_bytes(),
        }
    }

    /// Entries of the shard-0 raw stream, each as the records it holds.
    async fn entries(con: &mut ConnectionManager, key: &str) -> Vec<usize> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(con)
            .await
            .expect("XRANGE");
        reply
            .ids
            .iter()
            .map(|id| match id.map.get(RECORD_FIELD) {
                Some(redis::Value::BulkString(b)) => {
                    // Records here are not RawRecords; count the array's items.
                    let mut rd = b.as_slice();
                    rmp::decode::read_array_len(&mut rd).expect("batch entry") as usize
                }
                other => panic!("entry without a record: {other:?}"),
            })
            .collect()
    }

    /// Batches that arrive within the linger share a round trip, so each shard
    /// gets one entry holding all their events; without a linger, batches that
    /// arrive one after another each make their own entry.
    #[tokio::test]
    async fn batches_within_the_linger_share_one_entry() {
        let client = redis::Client::open(redis_url()).expect("redis url");
        let mut con = ConnectionManager::new(client).await.expect("redis");
        for (linger, expected) in [
            (Duration::from_millis(300), vec![3]),
            (Duration::ZERO, vec![1, 1, 1]),
        ] {
            let layout = StreamLayout::new(
                format!("writer-test-{}-{}", std::process::id(), linger.as_millis()),
                1,
            );
            let key = layout.raw(0);
            let _: () = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut con)
                .await
                .expect("DEL");
            let mut cfg = WriterConfig::new(layout);
            cfg.linger = linger;
            let (writer, task) = StreamWriter::spawn(cfg, con.clone());
            if linger.is_zero() {
                for seq in 0..3 {
                    writer
                        .write(vec![entry(seq)], Vec::new())
                        .await
                        .expect("write");
                }
            } else {
                let writes = (0..3).map(|seq| {
                    let w = writer.clone();
                    tokio::spawn(async move { w.write(vec![entry(seq)], Vec::new()).await })
                });
                for w in futures_util::future::join_all(writes).await {
                    w.expect("task").expect("write");
                }
            }
            drop(writer);
            task.await.expect("writer task");
            assert_eq!(entries(&mut con, &key).await, expected, "linger {linger:?}");
            let _: () = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut con)
                .await
                .expect("DEL");
        }
    }
}
