//! The consumer-group loop shared by the enrich worker and the history loader.
//!
//! One task per shard, each with its own connection (a `BLOCK` on a shared
//! multiplexed connection would stall every other user of it). A session of a task:
//!
//! 1. claims entries that dead consumers left pending longer than `claim_idle`
//!    (`XAUTOCLAIM`), and again every `claim_every`, then deletes consumers that
//!    hold nothing and have been idle longer than `forget_idle` (workers with
//!    generated names, pods say, would otherwise pile up in the group);
//! 2. re-reads its own pending entries (`XREADGROUP ... 0`) until none are left:
//!    what a previous run, or a failed batch of this one, read but never acked;
//! 3. reads new entries (`>`) with `COUNT`/`BLOCK`, racing the read against shutdown.
//!
//! Each batch goes to a [`BatchHandler`], which does the work and acks. When it
//! fails nothing was acked; after a back-off the session restarts at step 1, so the
//! batch comes back from the pending list. Retrying from the pending list rather
//! than from memory means entries another consumer claimed in the meantime are not
//! processed twice. Entries whose payload was trimmed away before anyone processed
//! them are acked (they cannot be processed) and reported loudly.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tickgraph_ingest::redis_link::{add_wait, wait_replicas, ConnOpts, RedisConn, RedisTarget};
use tickgraph_ingest::stream::{
    ensure_group, parse_entries, parse_read_reply, value_string, StreamEntry,
};
use tickgraph_ingest::Trim;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::retention;

/// One delivered stream entry with its record bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub record: Vec<u8>,
}

/// The work done on each batch. `handle` must ack every entry it was given when it
/// returns `Ok`, and ack none of them when it returns `Err`, unless acking is
/// atomic with the work it stands for.
pub trait BatchHandler: Send + Sync + 'static {
    type Error: std::fmt::Display + Send;

    /// `stream` is the key the entries were read from, on shard `shard`.
    fn handle(
        &self,
        shard: u16,
        stream: &str,
        entries: Vec<Entry>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub group: String,
    /// This process's consumer name; must be stable across restarts so that a
    /// restart finds its own pending entries.
    pub consumer: String,
    /// Entries per read (`COUNT`).
    pub batch: usize,
    /// How long a read waits for new entries (`BLOCK`).
    pub block: Duration,
    /// Pending entries idle this long belong to a dead consumer and are claimed.
    pub claim_idle: Duration,
    pub claim_every: Duration,
    /// Consumers with nothing pending, idle this long, are deleted from the group.
    pub forget_idle: Duration,
    /// How the consumed streams are trimmed, behind this group (see
    /// [`crate::retention`]).
    pub retention: Trim,
    /// After a read that found fewer than `batch` new entries, wait this long
    /// before the next, so that batches grow with the load instead of one small
    /// batch per arrival (zero: read again at once).
    pub linger: Duration,
    /// Replicas that must hold what a read returned before it is handled (see
    /// [`tickgraph_ingest::redis_link::add_wait`]); 0 on a single Redis. With 1
    /// or more, nothing handled can vanish in a failover and come back under a
    /// new entry id.
    pub wait_replicas: u32,
}

impl ConsumerConfig {
    /// Claims are checked twice per idle period, which bounds how long a dead
    /// consumer's entries wait to about 1.5 x `claim_idle`.
    pub fn new(
        group: &str,
        consumer: &str,
        batch: usize,
        block: Duration,
        claim_idle: Duration,
        retention: Trim,
    ) -> Self {
        Self {
            group: group.to_string(),
            consumer: consumer.to_string(),
            batch,
            block,
            claim_idle,
            claim_every: (claim_idle / 2).max(Duration::from_millis(50)),
            forget_idle: FORGET_IDLE,
            retention,
            linger: Duration::ZERO,
            wait_replicas: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("redis client: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("consumer task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Consumes `streams` (`(shard, key)` pairs) with one task each until `shutdown`,
/// and trims them behind the group; returns once every task has finished its
/// in-flight batch.
pub async fn run<H: BatchHandler>(
    client: impl Into<RedisTarget>,
    cfg: ConsumerConfig,
    streams: Vec<(u16, String)>,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let client = client.into();
    let acker = write_connection(&client)?;
    // A child token, so that a panicked task stops its siblings, not the process.
    let shutdown = shutdown.child_token();
    let keys = streams.iter().map(|(_, key)| key.clone()).collect();
    let trimmer = retention::spawn(client.clone(), keys, cfg.retention, shutdown.clone());
    let cfg = Arc::new(cfg);
    let handler = Arc::new(handler);
    let mut tasks = tokio::task::JoinSet::new();
    for (shard, key) in streams {
        let reader = ShardReader {
            client: client.clone(),
            acker: acker.clone(),
            cfg: cfg.clone(),
            handler: handler.clone(),
            shard,
            key,
            shutdown: shutdown.clone(),
            gone_total: 0,
        };
        tasks.spawn(reader.run());
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!(error = %e, group = %cfg.group, "consumer task panicked; stopping the others");
            shutdown.cancel();
            result = Err(e.into());
        }
    }
    shutdown.cancel();
    let _ = trimmer.await;
    result
}

/// A transaction or insert of a few thousand entries takes milliseconds; the
/// default 500 ms would turn a busy Redis into needless retries.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection workers write and acknowledge through (not the blocking reads).
pub(crate) fn write_connection(client: &RedisTarget) -> redis::RedisResult<RedisConn> {
    client.lazy(ConnOpts {
        connect_timeout: None,
        response_timeout: Some(WRITE_TIMEOUT),
    })
}
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// 100 ms doubling to 5 s; reset by the first success.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(BACKOFF_MIN)
    }
}

impl Backoff {
    pub(crate) fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }

    pub(crate) fn current(&self) -> Duration {
        self.0
    }

    /// Sleeps, unless shutdown comes first; false when it did.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// An hour: a live consumer reads at least once per `block`.
const FORGET_IDLE: Duration = Duration::from_secs(3600);

/// KEYS: the stream. ARGV: group, this consumer, idle ms. Deletes every other
/// consumer with nothing pending and idle at least that long; returns their
/// names. A script, so that no consumer can take an entry between the check and
/// the delete (XGROUP DELCONSUMER drops a consumer's pending entries with it).
const FORGET_LUA: &str = r#"
local gone = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for j = 1, #c, 2 do f[c[j]] = c[j + 1] end
  if f['name'] ~= ARGV[2] and f['pending'] == 0 and f['idle'] >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    gone[#gone + 1] = f['name']
  end
end
return gone
"#;

static FORGET: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(FORGET_LUA));

/// Why a session ended early.
enum SessionError {
    /// The connection or a reply is bad: reconnect.
    Redis(String),
    /// The handler failed: keep the connection, retry from the pending list.
    Handler(String),
}

impl From<redis::RedisError> for SessionError {
    fn from(e: redis::RedisError) -> Self {
        SessionError::Redis(e.to_string())
    }
}

struct ShardReader<H> {
    client: RedisTarget,
    acker: RedisConn,
    cfg: Arc<ConsumerConfig>,
    handler: Arc<H>,
    shard: u16,
    key: String,
    shutdown: CancellationToken,
    /// Entries lost to trimming since start, for the warning's running total.
    gone_total: u64,
}

impl<H: BatchHandler> ShardReader<H> {
    async fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut con: Option<RedisConn> = None;
        while !self.shutdown.is_cancelled() {
            let c = match con.as_mut() {
                Some(c) => c,
                None => match self.connect().await {
                    Ok(c) => con.insert(c),
                    Err(e) => {
                        tracing::warn!(error = %e, stream = %self.key, group = %self.cfg.group, retry_in = ?backoff.current(), "cannot connect consumer");
                        if !backoff.wait(&self.shutdown).await {
                            break;
                        }
                        continue;
                    }
                },
            };
            match self.session(c, &mut backoff).await {
                Ok(()) => break,
                Err(SessionError::Redis(e)) => {
                    tracing::warn!(error = %e, stream = %self.key, group = %self.cfg.group, retry_in = ?backoff.current(), "consumer lost redis; reconnecting");
                    con = None;
                }
                Err(SessionError::Handler(e)) => {
                    tracing::error!(error = %e, stream = %self.key, group = %self.cfg.group, retry_in = ?backoff.current(), "batch failed and was not acked; retrying it");
                }
            }
            if !backoff.wait(&self.shutdown).await {
                break;
            }
        }
        tracing::info!(stream = %self.key, group = %self.cfg.group, "consumer stopped");
    }

    async fn connect(&self) -> redis::RedisResult<RedisConn> {
        // A blocking read may legitimately wait `block`; a response timeout would
        // turn every quiet second into a reconnect.
        let mut con = self.client.connect(ConnOpts::blocking()).await?;
        // On every connect, not once: a Redis restarted without persistence has
        // lost the group, and recreating it is what lets consumption resume.
        ensure_group(&mut con, &self.key, &self.cfg.group).await?;
        Ok(con)
    }

    /// Runs until shutdown (`Ok`) or a failure.
    async fn session(
        &mut self,
        con: &mut RedisConn,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        // `Some(cursor)` while draining our own pending list.
        let mut pending_from = Some("0".to_string());
        let mut next_claim = Instant::now();
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            if Instant::now() >= next_claim {
                self.claim(con, backoff).await?;
                next_claim = Instant::now() + self.cfg.claim_every;
                if self.shutdown.is_cancelled() {
                    return Ok(());
                }
            }
            let entries = match &pending_from {
                Some(from) => {
                    let entries = self.read(con, from, None).await?;
                    match entries.last() {
                        Some(last) => pending_from = Some(last.id.clone()),
                        None => {
                            pending_from = None;
                            continue;
                        }
                    }
                    entries
                }
                // Not raced with shutdown: a read Redis has already answered would
                // be dropped, leaving its entries pending until claimed. BLOCK is
                // short, so shutdown still waits at most one block and one batch.
                None => self.read(con, ">", Some(self.cfg.block)).await?,
            };
            let short = entries.len() < self.cfg.batch && pending_from.is_none();
            self.process(entries, backoff).await?;
            if short && !self.cfg.linger.is_zero() {
                tokio::select! {
                    () = self.shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(self.cfg.linger) => {}
                }
            }
        }
    }

    /// Runs a read (`XREADGROUP`, `XAUTOCLAIM`) and, with `wait_replicas`, waits
    /// in the same round trip until that many replicas hold what it returned.
    async fn replicated(
        &self,
        read: redis::Cmd,
        con: &mut RedisConn,
    ) -> Result<redis::Value, SessionError> {
        let replicas = self.cfg.wait_replicas;
        if replicas == 0 {
            return Ok(read.query_async(con).await?);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(read);
        add_wait(&mut pipe, &self.key, replicas, WRITE_TIMEOUT / 2);
        let mut replies: Vec<redis::Value> = pipe.query_async(con).await?;
        let acked = replies
            .pop()
            .map(redis::from_redis_value::<i64>)
            .transpose()
            .map_err(|e| SessionError::Redis(format!("bad WAIT reply: {e}")))?
            .unwrap_or(0);
        // Not handled now: read again from the pending list after a back-off.
        wait_replicas(acked, replicas)?;
        replies
            .into_iter()
            .next()
            .ok_or_else(|| SessionError::Redis("no reply to the read".into()))
    }

    async fn read(
        &self,
        con: &mut RedisConn,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, SessionError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(self.cfg.batch.max(1));
        if let Some(block) = block {
            // BLOCK 0 waits forever, which would starve claiming.
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&self.key).arg(from);
        // The connection has no response timeout (a blocking read may wait
        // `block`), so a Redis that stops answering is caught here.
        let deadline = block.unwrap_or_default() + WRITE_TIMEOUT;
        let reply = tokio::time::timeout(deadline, self.replicated(cmd, con))
            .await
            .map_err(|_| {
                SessionError::Redis(format!("no reply to XREADGROUP within {deadline:?}"))
            })??;
        let streams = parse_read_reply(reply).map_err(SessionError::Redis)?;
        Ok(streams
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .collect())
    }

    /// Takes over entries other consumers left idle, and processes them.
    async fn claim(
        &mut self,
        con: &mut RedisConn,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let min_idle = self.cfg.claim_idle.as_millis() as u64;
        let mut start = "0-0".to_string();
        loop {
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(&self.key)
                .arg(&self.cfg.group)
                .arg(&self.cfg.consumer)
                .arg(min_idle)
                .arg(&start)
                .arg("COUNT")
                .arg(self.cfg.batch.max(1));
            let reply = self.replicated(cmd, con).await?;
            let (next, entries, deleted) = parse_autoclaim(reply).map_err(SessionError::Redis)?;
            if deleted > 0 {
                // Redis already dropped these from the pending list.
                self.report_gone(deleted);
            }
            if !entries.is_empty() {
                tracing::info!(stream = %self.key, group = %self.cfg.group, claimed = entries.len(), "claimed entries of a stalled consumer");
                self.process(entries, backoff).await?;
            }
            if next == "0-0" || self.shutdown.is_cancelled() {
                break;
            }
            start = next;
        }
        let forgotten: Vec<String> = FORGET
            .key(&self.key)
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg(self.cfg.forget_idle.as_millis() as u64)
            .invoke_async(con)
            .await?;
        if !forgotten.is_empty() {
            tracing::info!(stream = %self.key, group = %self.cfg.group, consumers = ?forgotten, "deleted idle consumers that held nothing");
        }
        Ok(())
    }

    async fn process(
        &mut self,
        entries: Vec<StreamEntry>,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let mut present = Vec::with_capacity(entries.len());
        let mut gone = Vec::new();
        for e in entries {
            match e.record {
                Some(record) => present.push(Entry { id: e.id, record }),
                None => gone.push(e.id),
            }
        }
        if !gone.is_empty() {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&self.key).arg(&self.cfg.group).arg(&gone);
            let _: i64 = cmd.query_async(&mut self.acker).await?;
            self.report_gone(gone.len() as u64);
        }
        if present.is_empty() {
            return Ok(());
        }
        let span = tracing::info_span!(
            "batch",
            group = %self.cfg.group,
            shard = self.shard,
            entries = present.len(),
            first = %present[0].id,
        );
        self.handler
            .handle(self.shard, &self.key, present)
            .instrument(span)
            .await
            .map_err(|e| SessionError::Handler(e.to_string()))?;
        backoff.reset();
        Ok(())
    }

    fn report_gone(&mut self, n: u64) {
        self.gone_total += n;
        tracing::warn!(
            stream = %self.key,
            group = %self.cfg.group,
            count = n,
            total = self.gone_total,
            "pending entries were trimmed before they were processed; acked them, \
             their events are LOST downstream (raise the stream's trim limit)"
        );
    }
}

/// `XAUTOCLAIM` reply: `[next cursor, entries, deleted ids]` (the third item since
/// Redis 7; older servers return trimmed entries with nil fields instead).
fn parse_autoclaim(v: redis::Value) -> Result<(String, Vec<StreamEntry>, u64), String> {
    let redis::Value::Array(items) = v else {
        return Err(format!("unexpected XAUTOCLAIM reply {v:?}"));
    };
    let mut it = items.into_iter();
    let next = value_string(it.next().ok_or("XAUTOCLAIM reply has no cursor")?)?;
    let entries = parse_entries(it.next().unwrap_or(redis::Value::Nil))?;
    let deleted = match it.next() {
        Some(redis::Value::Array(ids)) => ids.len() as u64,
        _ => 0,
    };
    Ok((next, entries, deleted))
}

#[cfg(test)]
mod tests {
    use redis::Value;

    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn autoclaim_reply_parses_entries_and_deletions() {
        let reply = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![bulk("e"), bulk("x")]),
            ])]),
            Value::Array(vec![bulk("2-0"), bulk("3-0")]),
        ]);
        let (next, entries, deleted) = parse_autoclaim(reply).expect("parses");
        assert_eq!(next, "5-0");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(entries[0].record.as_deref(), Some(&b"x"[..]));
        assert_eq!(deleted, 2);
    }

    #[test]
    fn autoclaim_reply_of_old_servers_has_no_deletions() {
        let reply = Value::Array(vec![bulk("0-0"), Value::Array(vec![])]);
        let (next, entries, deleted) = parse_autoclaim(reply).expect("parses");
        assert_eq!((next.as_str(), entries.len(), deleted), ("0-0", 0, 0));
        assert!(parse_autoclaim(Value::Nil).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_five_seconds_and_resets() {
        let never = CancellationToken::new();
        let mut b = Backoff::default();
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(b.current());
            assert!(b.wait(&never).await);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.current(), BACKOFF_MIN);
        let cancelled = CancellationToken::new();
        cancelled.cancel();
        assert!(!b.wait(&cancelled).await);
    }
}
