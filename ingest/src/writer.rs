//! The group-commit stream writer. Request handlers hand it whole batches; it
//! gathers everything queued since its last round trip, packs each shard's events
//! into batch entries of up to [`WriterConfig::max_entry_events`] (one XADD whose
//! `e` field is a MessagePack array of records, in arrival order), and sends them
//! in one pipeline. Redis then does one command per shard per round trip instead of
//! one per event, and every consumer downstream pays per entry; a round gathers
//! for up to [`WriterConfig::linger`] so that entries are fuller.
//!
//! A batch is answered once its round is in Redis or in the local spool
//! ([`crate::spool`]). Each round has an id, unique to this writer and increasing,
//! and is appended to each stream by [`APPEND_LUA`], which does nothing for a round
//! the stream's marker says it already has. So a round may be sent again whenever
//! its outcome is unknown (a timeout, a dropped connection, a crash between a
//! drain and the spool's delete) and is stored once. One round is in flight at a
//! time, which is what makes "the marker is at or past this id" mean "this round
//! is in".
//!
//! While Redis fails, rounds go to the spool, and keep going there until it has
//! drained in order, so no round overtakes an older one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use crate::event::now_nanos;
use crate::redis_link::{
    add_wait, hash_tag, query_by_slot, wait_replicas, ConnOpts, RedisConn, RedisTarget,
};
use crate::spool::{Append, Fields, Round, Spool, SpoolConfig, SpoolError};
use crate::stream::{
    dlq_bytes_key, encode_batch, DeadLetter, DlqBounds, StreamLayout, Trim, DLQ_ADD_LUA,
    RECORD_FIELD,
};

/// A valid event, encoded, bound for its shard's raw stream.
#[derive(Debug)]
pub struct RawEntry {
    pub shard: u16,
    pub record: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("the event store is unavailable and the spool cannot take the batch: {0}")]
    Spool(String),
    #[error("ingest is shutting down")]
    ShuttingDown,
}

/// Where an answered batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Stream,
    Spool,
}

struct Job {
    entries: Vec<RawEntry>,
    dead: Vec<DeadLetter>,
    done: oneshot::Sender<Result<Stored, WriteError>>,
}

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub layout: StreamLayout,
    /// The bounds of the ingest dead-letter stream.
    pub dlq: DlqBounds,
    /// Events per round at most.
    pub max_pipeline: usize,
    /// Events per raw stream entry at most.
    pub max_entry_events: usize,
    /// How long a round gathers batches after its first before it writes. Each
    /// stream entry costs Redis and every consumer downstream about as much as a
    /// few dozen events in it, and producers' batches are often small: waiting
    /// a little makes entries several times fuller for that much latency. Zero
    /// writes at once.
    pub linger: Duration,
    /// This writer's name in the streams' markers: unique per ingest process and
    /// stable across its restarts (its spool is drained under it).
    pub writer_id: String,
    /// How long a round trip to Redis may take before the round is spooled.
    pub redis_timeout: Duration,
    /// Replicas that must have a round before it counts as stored (`WAIT`); 0
    /// on a single Redis. With 1 or more, a failover loses nothing answered.
    pub wait_replicas: u32,
    pub spool: SpoolConfig,
}

impl WriterConfig {
    pub fn new(layout: StreamLayout) -> Self {
        let spool = SpoolConfig::new(
            std::env::temp_dir()
                .join("tickgraph-spool")
                .join(layout.prefix()),
        );
        Self {
            layout,
            dlq: DlqBounds::DEFAULT,
            max_pipeline: 16_384,
            max_entry_events: 256,
            linger: Duration::ZERO,
            writer_id: "ingest".into(),
            redis_timeout: Duration::from_secs(2),
            wait_replicas: 0,
            spool,
        }
    }
}

/// What the writer has done, for `/metrics` (see [`crate::metrics`]). The
/// figures are prometheus-client metrics, shared with the registry.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Rounds in the spool now.
    pub spool_rounds: Gauge,
    /// Bytes the spool holds on disk now.
    pub spool_bytes: Gauge,
    /// Events answered from the spool (Redis could not take them then).
    pub spooled_events: Counter,
    /// Events refused because neither Redis nor the spool could take them.
    pub refused_events: Counter,
    /// Round trips to Redis that failed or timed out.
    pub redis_failures: Counter,
    /// The last round was refused (spool full or failing), and none stored
    /// since: ingest cannot take events now, so it is not ready.
    pub refusing: AtomicBool,
    /// Whether the last round trip to Redis failed (rounds go to the spool).
    pub redis_down: AtomicBool,
}

impl WriterStats {
    /// Adds these figures to `registry` (prefixed `tickgraph_` by it).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ingest_spool_rounds",
            "Writer rounds held in the local spool",
            self.spool_rounds.clone(),
        );
        registry.register_with_unit(
            "ingest_spool",
            "Bytes the local spool holds on disk",
            Unit::Bytes,
            self.spool_bytes.clone(),
        );
        registry.register(
            "ingest_spooled_events",
            "Events answered from the spool while Redis could not take them",
            self.spooled_events.clone(),
        );
        registry.register(
            "ingest_refused_events",
            "Events refused with 503: neither Redis nor the spool could take them",
            self.refused_events.clone(),
        );
        registry.register(
            "ingest_redis_failures",
            "Round trips to Redis that failed or timed out",
            self.redis_failures.clone(),
        );
    }
}

/// Handle to the writer task; cheap to clone.
#[derive(Clone)]
pub struct StreamWriter {
    tx: mpsc::Sender<Job>,
    stats: Arc<WriterStats>,
}

impl StreamWriter {
    /// Opens the spool and starts the writer task, which drains whatever an
    /// earlier run left spooled. The task runs until every handle is dropped and
    /// every queued batch is stored; the returned handle finishes then. It does
    /// not watch a shutdown signal itself: requests still finishing during a
    /// graceful shutdown must have their batches stored, not refused.
    pub fn spawn(
        cfg: WriterConfig,
        client: impl Into<RedisTarget>,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), SpoolError> {
        let spool = Spool::open(cfg.spool.clone())?;
        if !spool.is_empty() {
            tracing::warn!(rounds = spool.rounds(), bytes = spool.bytes(), dir = %spool.dir().display(),
                "the spool holds rounds from an earlier run; draining them before anything new");
        }
        // Bounded in batches, not events: handlers wait for their answer anyway.
        let (tx, rx) = mpsc::channel(1024);
        let writer = Writer::new(cfg, client, spool);
        let stats = writer.stats.clone();
        let task = tokio::spawn(writer.run(rx));
        Ok((Self { tx, stats }, task))
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    pub fn stats_handle(&self) -> Arc<WriterStats> {
        Arc::clone(&self.stats)
    }

    /// Appends a batch's valid entries and dead letters; resolves once Redis or
    /// the spool has them all.
    pub async fn write(
        &self,
        entries: Vec<RawEntry>,
        dead: Vec<DeadLetter>,
    ) -> Result<Stored, WriteError> {
        if entries.is_empty() && dead.is_empty() {
            return Ok(Stored::Stream);
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

/// Appends one round's entries to one stream, unless the stream already has it.
///
/// `KEYS[1]`: the stream; `KEYS[2]`: this writer's marker for it (same slot);
/// for a dead-letter stream `KEYS[3]`, its byte count ([`dlq_bytes_key`]).
/// `ARGV[1]`: the round id; `ARGV[2]`: the marker's lifetime in seconds;
/// `ARGV[3]`: `1` for a round never sent before, else `0`;
/// `ARGV[4]`: how many trim arguments follow; then the trim arguments: XADD's,
/// or for a dead-letter stream [`DLQ_MARK`] and the three bounds
/// [`DLQ_ADD_LUA`] keeps; then each entry as its field count followed by
/// field, value pairs.
/// Returns the entries added; 0 when the round was there already; and, for a
/// round never sent before whose id the marker is already at or past (another
/// process with the same writer id, or the clock gone back across a restart),
/// minus the marker, having added nothing: the writer then sends it again under
/// an id above the marker, where skipping it would have lost it.
pub const APPEND_LUA: &str = r#"
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if last >= tonumber(ARGV[1]) then
  if ARGV[3] == '1' then return -last end
  return 0
end
local ntrim = tonumber(ARGV[4])
local dlq = ARGV[5] == 'DLQ'
local i = 5 + ntrim
local added = 0
while i <= #ARGV do
  local nf = tonumber(ARGV[i])
  if dlq then
    local fields = {}
    for f = i + 1, i + 2 * nf do fields[#fields + 1] = ARGV[f] end
    dlq_add(KEYS[1], KEYS[3], { ARGV[6], ARGV[7], ARGV[8] }, fields)
  else
    local cmd = {'XADD', KEYS[1]}
    for t = 5, 4 + ntrim do cmd[#cmd + 1] = ARGV[t] end
    cmd[#cmd + 1] = '*'
    for f = i + 1, i + 2 * nf do cmd[#cmd + 1] = ARGV[f] end
    redis.call(unpack(cmd))
  end
  added = added + 1
  i = i + 1 + 2 * nf
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return added
"#;

/// The first trim argument of a dead-letter append: its bounds follow, kept by
/// [`DLQ_ADD_LUA`]. Rounds spooled before it carry XADD's `MAXLEN` instead,
/// and are appended as they were.
pub const DLQ_MARK: &str = "DLQ";

static APPEND: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{DLQ_ADD_LUA}\n{APPEND_LUA}")));

/// How long a marker outlives its last round: a spool older than this that is
/// drained could store its rounds a second time.
const MARKER_TTL_SECS: u64 = 7 * 24 * 3600;

/// The key under which `writer` records the last round it appended to `stream`.
/// It shares the stream's hash tag (or, for a key without one, takes the whole
/// key as its tag), so the append script never crosses cluster slots.
pub fn writer_marker(stream: &str, writer: &str) -> String {
    if stream.contains('{') {
        format!("{stream}:writer:{writer}")
    } else {
        format!("{{{stream}}}:writer:{writer}")
    }
}

/// A gauge holds an i64; counts and sizes here are far below its limit.
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Round ids reserved on disk at a time: an hour of microseconds.
const ID_LEASE_US: u64 = 3_600_000_000;

/// Rounds drained per round trip.
const DRAIN_ROUNDS: usize = 16;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

struct Writer {
    cfg: WriterConfig,
    client: RedisTarget,
    con: Option<RedisConn>,
    spool: Arc<Mutex<Spool>>,
    /// Mirrors the spool's round count, so the loop need not lock it to ask.
    spooled: u64,
    last_id: u64,
    /// Ids below this are reserved on disk (see [`Writer::next_id`]).
    id_floor: u64,
    /// No round trip to Redis before this, after a failure.
    retry_at: Instant,
    backoff: Duration,
    raw_keys: Vec<String>,
    dlq_key: String,
    stats: Arc<WriterStats>,
}

impl Writer {
    fn new(cfg: WriterConfig, client: impl Into<RedisTarget>, spool: Spool) -> Self {
        let client = client.into();
        let stats = WriterStats::default();
        stats.spool_rounds.set(gauge_value(spool.rounds()));
        stats.spool_bytes.set(gauge_value(spool.bytes()));
        Self {
            stats: Arc::new(stats),
            raw_keys: cfg.layout.shard_ids().map(|s| cfg.layout.raw(s)).collect(),
            dlq_key: cfg.layout.ingest_dlq(),
            spooled: spool.rounds(),
            last_id: spool.last_id().max(spool.id_floor()),
            id_floor: spool.id_floor(),
            spool: Arc::new(Mutex::new(spool)),
            retry_at: Instant::now(),
            backoff: BACKOFF_MIN,
            con: None,
            client,
            cfg,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        loop {
            if self.spooled > 0 && Instant::now() >= self.retry_at {
                self.drain_some().await;
            }
            let first = if self.spooled == 0 {
                rx.recv().await
            } else if Instant::now() >= self.retry_at {
                // Draining: take what is waiting, else go on draining.
                match rx.try_recv() {
                    Ok(j) => Some(j),
                    Err(mpsc::error::TryRecvError::Empty) => continue,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            } else {
                tokio::select! {
                    j = rx.recv() => j,
                    _ = tokio::time::sleep_until(self.retry_at) => continue,
                }
            };
            let Some(first) = first else { break };
            let jobs = self.gather(first, &mut rx).await;
            let events: usize = jobs.iter().map(|j| j.entries.len()).sum();
            // One span per round (many producers' batches), never per event.
            let span = tracing::info_span!("batch", stage = "ingest", batches = jobs.len(), events);
            let round = span.in_scope(|| self.round(&jobs));
            let result = self.store(round).instrument(span).await;
            let counter = match result {
                Ok(Stored::Stream) => None,
                Ok(Stored::Spool) => Some(&self.stats.spooled_events),
                Err(_) => Some(&self.stats.refused_events),
            };
            if let Some(c) = counter {
                c.inc_by(events as u64);
            }
            self.stats
                .refusing
                .store(result.is_err(), Ordering::Relaxed);
            for j in jobs {
                // The handler may have gone (client hung up); its events are stored.
                let _ = j.done.send(result.clone());
            }
        }
        // Shutting down: give a healthy Redis what the spool holds now.
        while self.spooled > 0 && Instant::now() >= self.retry_at {
            self.drain_some().await;
        }
        if self.spooled > 0 {
            // Under `--spool-fsync never` the last appends may be in the OS cache
            // only; a clean stop leaves them on disk.
            let spool = self.spool.clone();
            let synced = tokio::task::spawn_blocking(move || {
                spool.lock().unwrap_or_else(|p| p.into_inner()).sync()
            })
            .await;
            if !matches!(synced, Ok(Ok(()))) {
                tracing::error!(?synced, "cannot flush the spool to disk");
            }
            tracing::warn!(
                rounds = self.spooled,
                dir = %self.cfg.spool.dir.display(),
                "stopping with rounds in the spool; the next start drains them"
            );
        }
    }

    /// The batches of one round: `first`, what arrives within the linger (not
    /// while spooling: nothing is gained by fuller entries on disk), and what is
    /// already waiting, up to the round's size.
    async fn gather(&self, first: Job, rx: &mut mpsc::Receiver<Job>) -> Vec<Job> {
        let size = |j: &Job| j.entries.len() + j.dead.len();
        let mut commands = size(&first);
        let mut jobs = vec![first];
        if !self.cfg.linger.is_zero() && self.spooled == 0 {
            let deadline = Instant::now() + self.cfg.linger;
            while commands < self.cfg.max_pipeline {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(j)) => {
                        commands += size(&j);
                        jobs.push(j);
                    }
                    // Closed: write what is here; the next recv ends the loop.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        while commands < self.cfg.max_pipeline {
            match rx.try_recv() {
                Ok(j) => {
                    commands += size(&j);
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        jobs
    }

    /// The round that stores `jobs`: per shard, batch entries in arrival order;
    /// then the dead letters.
    fn round(&mut self, jobs: &[Job]) -> Round {
        let id = self.next_id();
        let mut per_shard: Vec<Vec<&[u8]>> = vec![Vec::new(); self.raw_keys.len()];
        let mut dead: Vec<Fields> = Vec::new();
        for job in jobs {
            for e in &job.entries {
                per_shard[usize::from(e.shard) % self.raw_keys.len()].push(&e.record);
            }
            for d in &job.dead {
                dead.push(
                    d.fields()
                        .into_iter()
                        .map(|(f, v)| (f.to_string(), v))
                        .collect(),
                );
            }
        }
        let mut appends = Vec::new();
        for (key, records) in self.raw_keys.iter().zip(&per_shard) {
            if records.is_empty() {
                continue;
            }
            let entries = records
                .chunks(self.cfg.max_entry_events.max(1))
                .map(|chunk| {
                    vec![(
                        RECORD_FIELD.to_string(),
                        encode_batch(chunk.iter().copied()),
                    )]
                })
                .collect();
            // Never trimmed here: the enrich workers trim raw streams behind their
            // consumer group (see tickgraph_enrich::retention).
            appends.push(Append {
                key: key.clone(),
                trim: Trim::None.args(),
                entries,
            });
        }
        if !dead.is_empty() {
            let bounds = self.cfg.dlq.args().map(|b| b.to_string());
            appends.push(Append {
                key: self.dlq_key.clone(),
                trim: std::iter::once(DLQ_MARK.to_string())
                    .chain(bounds)
                    .collect(),
                entries: dead,
            });
        }
        Round { id, appends }
    }

    /// A round id: microseconds since the epoch, above every id this writer
    /// used, in this run or (through the spool's id floor) an earlier one.
    fn next_id(&mut self) -> u64 {
        let now_us = u64::try_from(now_nanos() / 1_000).unwrap_or(0);
        self.last_id = now_us.max(self.last_id + 1);
        if self.last_id >= self.id_floor {
            // Reserve the next hour of ids on disk, so that a restart under a
            // clock that went back still starts above them. Once an hour.
            let floor = self.last_id + ID_LEASE_US;
            let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
            match spool.raise_id_floor(floor) {
                Ok(()) => self.id_floor = floor,
                Err(e) => tracing::error!(error = %e, "cannot record the round id floor"),
            }
        }
        self.last_id
    }

    /// Stores a round in Redis, or in the spool when Redis fails or older rounds
    /// are still spooled.
    async fn store(&mut self, mut round: Round) -> Result<Stored, WriteError> {
        if self.spooled == 0 && Instant::now() >= self.retry_at {
            match self.send_fresh(round).await {
                Ok(()) => {
                    self.stats.redis_down.store(false, Ordering::Relaxed);
                    return Ok(Stored::Stream);
                }
                Err((unsent, e)) => {
                    tracing::error!(error = %e, round = unsent.id, "raw stream write failed; spooling until Redis is back");
                    self.failed();
                    round = unsent;
                }
            }
        }
        let spool = self.spool.clone();
        let appended = tokio::task::spawn_blocking(move || {
            let mut spool = spool.lock().unwrap_or_else(|p| p.into_inner());
            spool.append(&round).map(|()| spool.bytes())
        })
        .await;
        match appended {
            Ok(Ok(bytes)) => {
                self.spooled += 1;
                self.stats.spool_rounds.set(gauge_value(self.spooled));
                self.stats.spool_bytes.set(gauge_value(bytes));
                Ok(Stored::Spool)
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "SPOOL REFUSED A ROUND: its producers are told it was not stored");
                Err(WriteError::Spool(e.to_string()))
            }
            Err(e) => {
                tracing::error!(error = %e, "the spool append task failed");
                Err(WriteError::Spool(e.to_string()))
            }
        }
    }

    /// One round trip of spooled rounds, oldest first; they leave the spool once
    /// Redis has them.
    async fn drain_some(&mut self) {
        let spool = self.spool.clone();
        let peeked = tokio::task::spawn_blocking(move || {
            spool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .peek(DRAIN_ROUNDS)
        })
        .await;
        let (rounds, cursor) = match peeked {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot read the spool");
                self.failed();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "the spool read task failed");
                self.failed();
                return;
            }
        };
        // A count with nothing behind it would spin this loop: what the spool
        // cannot hand out is not in it.
        let n = if rounds.is_empty() {
            tracing::error!(
                counted = self.spooled,
                "the spool counts rounds it cannot hand out; treating it as drained"
            );
            usize::try_from(self.spooled).unwrap_or(usize::MAX)
        } else {
            rounds.len()
        };
        if let Err(e) = self.send(&rounds, false).await {
            tracing::warn!(error = %e, spooled = self.spooled, "spool drain failed; retrying");
            self.failed();
            return;
        }
        let spool = self.spool.clone();
        let consumed = tokio::task::spawn_blocking(move || {
            let mut spool = spool.lock().unwrap_or_else(|p| p.into_inner());
            spool
                .consume(cursor, n)
                .map(|()| (spool.rounds(), spool.bytes()))
        })
        .await;
        match consumed {
            Ok(Ok((left, bytes))) => {
                self.spooled = left;
                self.stats.spool_rounds.set(gauge_value(left));
                self.stats.spool_bytes.set(gauge_value(bytes));
                self.stats.redis_down.store(false, Ordering::Relaxed);
                self.backoff = BACKOFF_MIN;
                if left == 0 {
                    tracing::info!("spool drained; writing to Redis directly again");
                }
            }
            // The rounds are in Redis; draining them again is harmless.
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot delete drained spool segments");
                self.failed();
            }
            Err(e) => {
                tracing::error!(error = %e, "the spool consume task failed");
                self.failed();
            }
        }
    }

    fn failed(&mut self) {
        self.stats.redis_failures.inc();
        self.stats.redis_down.store(true, Ordering::Relaxed);
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// One pipelined round trip appending `rounds`, in order; `fresh` when they
    /// were never sent before. Returns the script's answer per append, in order.
    /// Not MULTI: the streams of different shards live in different cluster
    /// slots. On a cluster each slot's appends are one pipeline, sent at once.
    /// With `wait_replicas`, each pipeline ends in a `WAIT`, and a round is only
    /// stored once that many replicas have it: otherwise it is spooled, and sent
    /// again later without duplicating (the markers see to that).
    async fn send(&mut self, rounds: &[Round], fresh: bool) -> Result<Vec<i64>, String> {
        let cluster = self.client.is_cluster();
        // Per slot (on a single Redis, one for all): its hash tag, a key of it,
        // its pipeline, and the replies before its appends' (the script load)
        // and its appends so far.
        let mut groups: Vec<(&str, &str, redis::Pipeline, usize, usize)> = Vec::new();
        // Per append, in order: its group and its place there.
        let mut order = Vec::new();
        for round in rounds {
            for a in &round.appends {
                let tag = if cluster { hash_tag(&a.key) } else { "" };
                let g = match groups.iter().position(|(t, ..)| *t == tag) {
                    Some(g) => g,
                    None => {
                        let mut pipe = redis::pipe();
                        // Loaded every time: after a Redis restart (or a failover)
                        // the script cache is empty.
                        pipe.load_script(&APPEND);
                        groups.push((tag, &a.key, pipe, 1, 0));
                        groups.len() - 1
                    }
                };
                let mut inv = APPEND.key(&a.key);
                inv.key(writer_marker(&a.key, &self.cfg.writer_id));
                if a.trim.first().is_some_and(|t| t == DLQ_MARK) {
                    inv.key(dlq_bytes_key(&a.key));
                }
                inv.arg(round.id)
                    .arg(MARKER_TTL_SECS)
                    .arg(u8::from(fresh))
                    .arg(a.trim.len())
                    .arg(&a.trim);
                for e in &a.entries {
                    inv.arg(e.len());
                    for (f, v) in e {
                        inv.arg(f).arg(v);
                    }
                }
                let (_, _, pipe, front, n) = &mut groups[g];
                pipe.invoke_script(&inv);
                order.push((g, *front + *n));
                *n += 1;
            }
        }
        let replicas = self.cfg.wait_replicas;
        let timeout = self.cfg.redis_timeout;
        let pipes: Vec<redis::Pipeline> = groups
            .into_iter()
            .map(|(_, key, mut pipe, _, _)| {
                // Half the round trip's budget, so a short WAIT is told apart
                // from a lost connection.
                add_wait(&mut pipe, key, replicas, timeout / 2);
                pipe
            })
            .collect();
        let con = self.connection().await?;
        let replies =
            match tokio::time::timeout(timeout, query_by_slot::<redis::Value>(con, &pipes)).await {
                Ok(Ok(replies)) => replies,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("no answer from Redis within {timeout:?}")),
            };
        if replicas > 0 {
            for group in &replies {
                let acked = group
                    .last()
                    .map(redis::from_redis_value_ref::<i64>)
                    .transpose()
                    .map_err(|e| format!("bad WAIT reply: {e}"))?
                    .unwrap_or(0);
                wait_replicas(acked, replicas).map_err(|e| e.to_string())?;
            }
        }
        order
            .into_iter()
            .map(|(g, i)| {
                replies
                    .get(g)
                    .and_then(|r| r.get(i))
                    .ok_or_else(|| "fewer replies than appends".to_string())
                    .and_then(|v| {
                        redis::from_redis_value_ref::<i64>(v)
                            .map_err(|e| format!("bad append reply: {e}"))
                    })
            })
            .collect()
    }

    /// Sends a round never sent before. Appends refused because a marker is
    /// already past the round's id go again under a new id above it.
    async fn send_fresh(&mut self, mut round: Round) -> Result<(), (Round, String)> {
        for _ in 0..3 {
            let answers = match self.send(std::slice::from_ref(&round), true).await {
                Ok(a) => a,
                Err(e) => return Err((round, e)),
            };
            let ahead = answers
                .iter()
                .filter(|&&a| a < 0)
                .map(|a| a.unsigned_abs())
                .max();
            let Some(marker) = ahead else { return Ok(()) };
            tracing::error!(
                writer = %self.cfg.writer_id, round = round.id, marker,
                "a stream's marker for this writer id is ahead of this round: another ingest \
                 process uses the same --ingest-id, or the clock went back; re-sending under a higher id"
            );
            let refused: Vec<Append> = round
                .appends
                .into_iter()
                .zip(&answers)
                .filter(|(_, &a)| a < 0)
                .map(|(append, _)| append)
                .collect();
            self.last_id = self.last_id.max(marker);
            round = Round {
                id: self.next_id(),
                appends: refused,
            };
        }
        Err((
            round,
            "stream markers keep moving past this writer's ids".into(),
        ))
    }

    /// The connection, made on first use: ingest starts, and answers from the
    /// spool, while Redis is down. Once made it reconnects by itself.
    async fn connection(&mut self) -> Result<&mut RedisConn, String> {
        if self.con.is_none() {
            let t = self.cfg.redis_timeout;
            let made = self.client.managed(ConnOpts::bounded(t)).await;
            self.con = Some(made.map_err(|e| format!("cannot connect to Redis: {e}"))?);
        }
        self.con.as_mut().ok_or_else(|| "no connection".to_string())
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

    /// Batches that arrive within the linger share a round trip, so each shard
    /// gets one entry holding all their events; without a linger, batches that
    /// arrive one after another each make their own entry.
    #[tokio::test]
    async fn batches_within_the_linger_share_one_entry() {
        let client = redis::Client::open(redis_url()).expect("redis url");
        let mut con = redis::aio::ConnectionManager::new(client.clone())
            .await
            .expect("redis");
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
            let (writer, task) = StreamWriter::spawn(cfg, client.clone()).expect("spool");
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
            let sizes: Vec<usize> = entries(&client, &key).await.iter().map(Vec::len).collect();
            assert_eq!(sizes, expected, "linger {linger:?}");
            let _: () = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut con)
                .await
                .expect("DEL");
        }
    }

    fn spooling_config(prefix: &str, spool: &std::path::Path) -> WriterConfig {
        let mut cfg = WriterConfig::new(StreamLayout::new(prefix, 1));
        cfg.spool = SpoolConfig::new(spool);
        cfg.redis_timeout = Duration::from_millis(500);
        cfg
    }

    /// The stream's entries in order, each as the test records (`r<seq>`) it
    /// holds.
    async fn entries(client: &redis::Client, key: &str) -> Vec<Vec<String>> {
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
            .expect("XRANGE");
        let mut out = Vec::new();
        for id in reply.ids {
            let Some(redis::Value::BulkString(b)) = id.map.get(RECORD_FIELD) else {
                panic!("entry without a record");
            };
            let mut rd = b.as_slice();
            let n = rmp::decode::read_array_len(&mut rd).expect("batch entry");
            // Test records are `r<seq>`, raw bytes one after another.
            let text = String::from_utf8(rd.to_vec()).expect("utf-8");
            let parts: Vec<String> = text.split('r').skip(1).map(|s| format!("r{s}")).collect();
            assert_eq!(parts.len(), n as usize, "{text}");
            out.push(parts);
        }
        out
    }

    /// Records of the stream, in stream order.
    async fn records(client: &redis::Client, key: &str) -> Vec<String> {
        entries(client, key).await.concat()
    }

    async fn eventually_drained(client: &redis::Client, key: &str, want: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = records(client, key).await;
            if got == want || Instant::now() > deadline {
                assert_eq!(got, want);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn expected(seqs: std::ops::Range<u64>) -> Vec<String> {
        seqs.map(|s| format!("r{s}")).collect()
    }

    /// A round whose outcome was unknown and is sent again (a timeout, a drain
    /// repeated after a crash) is stored once; a later round still goes in.
    #[tokio::test]
    async fn a_round_sent_again_is_stored_once() {
        let client = redis::Client::open(redis_url()).expect("redis url");
        let spool = tempfile::tempdir().expect("tempdir");
        let prefix = format!("writer-again-{}", std::process::id());
        let cfg = spooling_config(&prefix, spool.path());
        let key = cfg.layout.raw(0);
        let mut w = Writer::new(
            cfg,
            client.clone(),
            Spool::open(SpoolConfig::new(spool.path())).expect("spool"),
        );
        let job = |seq| Job {
            entries: vec![entry(seq)],
            dead: vec![DeadLetter::new("ingest", "bad".into(), b"x".to_vec())],
            done: oneshot::channel().0,
        };
        let first = w.round(&[job(0)]);
        let second = w.round(&[job(1)]);
        let added = w
            .send(std::slice::from_ref(&first), true)
            .await
            .expect("send");
        assert_eq!(added, vec![1, 1], "one raw entry, one dead letter");
        let again = w
            .send(&[first.clone(), second], false)
            .await
            .expect("send again");
        assert_eq!(again, vec![0, 0, 1, 1]);
        w.send(&[first], false).await.expect("and again");
        assert_eq!(records(&client, &key).await, expected(0..2));
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let dead: usize = redis::cmd("XLEN")
            .arg(w.dlq_key.clone())
            .query_async(&mut con)
            .await
            .expect("XLEN");
        assert_eq!(dead, 2, "dead letters are stored once too");
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .arg(&w.dlq_key)
            .arg(writer_marker(&key, "ingest"))
            .arg(writer_marker(&w.dlq_key, "ingest"))
            .query_async(&mut con)
            .await
            .expect("DEL");
    }

    /// Redis dies between batches: the next batches are answered from the
    /// spool, and once Redis is back they follow the earlier ones, in order, once.
    #[tokio::test]
    async fn batches_answered_while_redis_is_down_arrive_in_order_once_it_is_back() {
        let data = tempfile::tempdir().expect("tempdir");
        let spool = tempfile::tempdir().expect("tempdir");
        let mut redis =
            crate::test_support::LocalRedis::start(data.path(), Some("always")).expect("redis");
        let client = redis::Client::open(redis.url()).expect("redis url");
        let cfg = spooling_config("down", spool.path());
        let key = cfg.layout.raw(0);
        let (writer, task) = StreamWriter::spawn(cfg, client.clone()).expect("spool");
        for seq in 0..3 {
            let stored = writer
                .write(vec![entry(seq)], Vec::new())
                .await
                .expect("write");
            assert_eq!(stored, Stored::Stream);
        }
        redis.kill();
        for seq in 3..6 {
            let stored = writer
                .write(vec![entry(seq)], Vec::new())
                .await
                .expect("write");
            assert_eq!(stored, Stored::Spool, "batch {seq}");
        }
        redis.restart().expect("restart redis");
        // Spooled rounds drain before any new batch overtakes them.
        for seq in 6..8 {
            writer
                .write(vec![entry(seq)], Vec::new())
                .await
                .expect("write");
        }
        eventually_drained(&client, &key, &expected(0..8)).await;
        drop(writer);
        task.await.expect("writer task");
        let left = Spool::open(SpoolConfig::new(spool.path())).expect("spool");
        assert!(left.is_empty(), "a drained spool is empty on disk");
    }

    /// With `wait_replicas` and no replica, Redis takes each round but cannot
    /// say a replica has it: the round counts as not stored and is spooled (the
    /// producer is answered from the spool). Once a replica attaches, the spool
    /// drains, and the rounds Redis already held are not written again.
    #[tokio::test]
    async fn rounds_no_replica_has_are_spooled_until_one_does() {
        let dirs: Vec<_> = (0..3)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let primary = crate::test_support::LocalRedis::start(dirs[0].path(), None).expect("redis");
        let client = redis::Client::open(primary.url()).expect("redis url");
        let mut cfg = spooling_config("wait", dirs[1].path());
        cfg.wait_replicas = 1;
        let key = cfg.layout.raw(0);
        let (writer, task) = StreamWriter::spawn(cfg, client.clone()).expect("spool");
        for seq in 0..3 {
            let stored = writer
                .write(vec![entry(seq)], Vec::new())
                .await
                .expect("write");
            assert_eq!(stored, Stored::Spool, "batch {seq} with no replica");
        }
        assert!(writer.stats().spool_rounds.get() > 0);

        let replica = crate::test_support::LocalRedis::start(dirs[2].path(), None).expect("redis");
        let port = primary.url().rsplit(':').next().expect("port").to_string();
        let mut con = redis::Client::open(replica.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("replica");
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(port)
            .query_async(&mut con)
            .await
            .expect("REPLICAOF");
        writer
            .write(vec![entry(3)], Vec::new())
            .await
            .expect("write");
        let deadline = Instant::now() + Duration::from_secs(30);
        while writer.stats().spool_rounds.get() > 0 {
            assert!(Instant::now() < deadline, "the spool never drained");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Drained, and each round once though Redis had the first three before.
        assert_eq!(records(&client, &key).await, expected(0..4));
        drop(writer);
        task.await.expect("writer task");
    }

    /// A writer stopped with rounds in its spool (Redis down the whole time)
    /// leaves them there; the next writer on that spool drains them first.
    #[tokio::test]
    async fn a_restarted_writer_drains_what_the_last_one_spooled() {
        let spool = tempfile::tempdir().expect("tempdir");
        let nobody = format!(
            "redis://127.0.0.1:{}",
            crate::test_support::free_port().expect("port")
        );
        let cfg = spooling_config("restart", spool.path());
        let key = cfg.layout.raw(0);
        {
            let down = redis::Client::open(nobody).expect("url");
            let (writer, task) = StreamWriter::spawn(cfg.clone(), down).expect("spool");
            for seq in 0..4 {
                let stored = writer
                    .write(vec![entry(seq)], Vec::new())
                    .await
                    .expect("write");
                assert_eq!(stored, Stored::Spool);
            }
            drop(writer);
            task.await.expect("writer task");
        }
        let data = tempfile::tempdir().expect("tempdir");
        let redis = crate::test_support::LocalRedis::start(data.path(), None).expect("redis");
        let client = redis::Client::open(redis.url()).expect("redis url");
        let (writer, task) = StreamWriter::spawn(cfg, client.clone()).expect("spool");
        writer
            .write(vec![entry(4)], Vec::new())
            .await
            .expect("write");
        eventually_drained(&client, &key, &expected(0..5)).await;
        drop(writer);
        task.await.expect("writer task");
    }

    /// No Redis and a full spool: the producer is told, and nothing it was told
    /// was stored is lost.
    #[tokio::test]
    async fn a_full_spool_is_an_error_to_the_producer() {
        let spool = tempfile::tempdir().expect("tempdir");
        let nobody = format!(
            "redis://127.0.0.1:{}",
            crate::test_support::free_port().expect("port")
        );
        let mut cfg = spooling_config("full", spool.path());
        cfg.spool.max_bytes = 200;
        let (writer, task) =
            StreamWriter::spawn(cfg, redis::Client::open(nobody).expect("url")).expect("spool");
        let mut stored = 0;
        let err = loop {
            match writer.write(vec![entry(stored)], Vec::new()).await {
                Ok(_) => stored += 1,
                Err(e) => break e,
            }
        };
        assert!(stored > 0);
        assert!(err.to_string().contains("the spool is full"), "{err}");
        drop(writer);
        task.await.expect("writer task");
        let left = Spool::open(SpoolConfig::new(spool.path())).expect("spool");
        assert_eq!(left.rounds(), stored);
    }

    /// Two processes under one writer id (or a clock gone back): a new round
    /// whose id is below the stream's marker is not skipped as already there,
    /// but stored under a new id above it.
    #[tokio::test]
    async fn a_new_round_behind_the_marker_is_stored_under_a_higher_id() {
        let client = redis::Client::open(redis_url()).expect("redis url");
        let prefix = format!("writer-behind-{}", std::process::id());
        let (dir_a, dir_b) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let mut a = Writer::new(
            spooling_config(&prefix, dir_a.path()),
            client.clone(),
            Spool::open(SpoolConfig::new(dir_a.path())).expect("spool"),
        );
        let mut b = Writer::new(
            spooling_config(&prefix, dir_b.path()),
            client.clone(),
            Spool::open(SpoolConfig::new(dir_b.path())).expect("spool"),
        );
        let job = |seq| Job {
            entries: vec![entry(seq)],
            dead: Vec::new(),
            done: oneshot::channel().0,
        };
        // A's clock runs an hour ahead of B's.
        a.last_id = u64::try_from(now_nanos() / 1_000).expect("now") + ID_LEASE_US;
        let ahead = a.round(&[job(0)]);
        assert_eq!(a.store(ahead).await, Ok(Stored::Stream));
        let behind = b.round(&[job(1)]);
        let behind_id = behind.id;
        assert_eq!(b.store(behind).await, Ok(Stored::Stream));
        assert!(b.last_id > a.last_id && behind_id < a.last_id);
        let key = a.raw_keys[0].clone();
        assert_eq!(records(&client, &key).await, expected(0..2));
        let mut con = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .arg(writer_marker(&key, "ingest"))
            .query_async(&mut con)
            .await
            .expect("DEL");
    }

    /// The id floor on disk keeps a restarted writer's ids above the last
    /// run's, whatever the clock says.
    #[test]
    fn round_ids_stay_above_the_floor_the_last_run_reserved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = redis::Client::open("redis://127.0.0.1:1").expect("url");
        let cfg = spooling_config("floor", dir.path());
        let first = {
            let mut w = Writer::new(
                cfg.clone(),
                client.clone(),
                Spool::open(cfg.spool.clone()).expect("spool"),
            );
            w.next_id()
        };
        let mut w = Writer::new(cfg.clone(), client, Spool::open(cfg.spool).expect("spool"));
        let again = w.next_id();
        assert!(again >= first + ID_LEASE_US, "{again} after {first}");
    }
}
