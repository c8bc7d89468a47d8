//! The fault suite: the real `tickgraph` processes (ingest, enrich, load, each
//! its own process) against a private `redis-server` (append-only file,
//! `appendfsync always`) and, where Postgres is the fault, a private Postgres;
//! a producer sends at a steady rate while one thing fails; then every event
//! ingest acknowledged is looked for in the enriched streams and in the history.
//!
//! Each scenario prints one row: sent / acknowledged / refused (a clear error
//! to the producer) / enriched / loaded / duplicates. Exact means: the enriched
//! streams and the history hold every acknowledged event, once, and nothing
//! else. `bash .ci/faults` runs them one by one and prints the table;
//! `TG_FAULT_SECS` lengthens each load phase (default 2 s).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use tickgraph_enrich::record::EnrichedRecord;
use tickgraph_ingest::stream::{decode_entry, parse_entries};
use tickgraph_ingest::test_support::{free_port, LocalRedis};
use tickgraph_ingest::StreamLayout;

use crate::helpers::{now_ns, seed_refdata};

const BIN: &str = env!("CARGO_BIN_EXE_tickgraph");
const SHARDS: u16 = 2;

/// Starts `tickgraph <redis> --database-url <db> --shards <shards> --dev-mode
/// <role> <args>`, its output in `<dir>/<name>.log`.
pub(crate) fn spawn_tickgraph(
    dir: &Path,
    name: &str,
    redis: &[String],
    db_url: &str,
    shards: u16,
    role: &str,
    args: &[String],
) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    Command::new(BIN)
        .args(redis)
        .args(["--database-url", db_url])
        .args(["--shards", &shards.to_string()])
        .arg("--dev-mode")
        .arg(role)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start tickgraph")
}

/// Length of each load phase.
fn phase() -> Duration {
    phase_from("TG_FAULT_SECS")
}

/// A load phase's length: seconds from the variable `env`, 2 s when unset.
pub(crate) fn phase_from(env: &str) -> Duration {
    let secs = std::env::var(env)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// The processes of one scenario and the private servers they use.
struct Rig {
    name: &'static str,
    dir: tempfile::TempDir,
    redis: LocalRedis,
    db_url: String,
    ingest_port: u16,
    procs: HashMap<String, Child>,
    ingest_args: Vec<String>,
    /// The producer sends every batch twice, as a producer retrying would.
    resend: bool,
}

impl Rig {
    fn new(name: &'static str, db_url: String) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("redis");
        std::fs::create_dir_all(&data).expect("redis dir");
        let redis = LocalRedis::start(&data, Some("always")).expect("redis-server");
        Self {
            name,
            redis,
            db_url,
            ingest_port: free_port().expect("port"),
            procs: HashMap::new(),
            ingest_args: Vec::new(),
            resend: false,
            dir,
        }
    }

    fn layout(&self) -> StreamLayout {
        StreamLayout::new("tg", SHARDS)
    }

    fn ingest_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/events", self.ingest_port)
    }

    /// Starts `tickgraph <role> <args>` as `name`, its log in the rig's directory.
    fn spawn(&mut self, name: &str, role: &str, args: &[String]) {
        let redis = ["--redis-url".to_string(), self.redis.url()];
        let child = spawn_tickgraph(
            self.dir.path(),
            name,
            &redis,
            &self.db_url,
            SHARDS,
            role,
            args,
        );
        self.procs.insert(name.to_string(), child);
    }

    fn start_ingest(&mut self) {
        let mut args: Vec<String> = [
            "--ingest-listen",
            &format!("127.0.0.1:{}", self.ingest_port),
            "--spool-dir",
            &self.dir.path().join("spool").display().to_string(),
            "--ingest-id",
            "fault-ingest",
            "--ingest-redis-timeout-ms",
            "500",
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.ingest_args.clone());
        self.spawn("ingest", "ingest", &args);
    }

    fn start_enrich(&mut self, consumer: &str) {
        let args = [
            "--enrich-consumer",
            consumer,
            "--claim-idle-secs",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .map(String::from);
        self.spawn(consumer, "enrich", &args);
    }

    fn start_load(&mut self, consumer: &str) {
        let args = [
            "--load-consumer",
            consumer,
            "--load-claim-idle-secs",
            "1",
            "--load-linger-ms",
            "20",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .map(String::from);
        self.spawn(consumer, "load", &args);
    }

    fn start_all(&mut self) {
        self.start_ingest();
        self.start_enrich("enrich-1");
        self.start_load("load-1");
    }

    /// kill -9: no chance to finish anything.
    fn kill9(&mut self, name: &str) {
        let mut child = self.procs.remove(name).expect("running process");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then waits for it to exit by itself.
    fn sigterm(&mut self, name: &str) -> std::process::ExitStatus {
        let mut child = self.procs.remove(name).expect("running process");
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            assert!(Instant::now() < deadline, "{name} did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn wait_ingest(&self) {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{}/healthz", self.ingest_port);
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(&url).send().await.is_err() {
            assert!(Instant::now() < deadline, "ingest did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What the producer knows about each event it sent.
#[derive(Default)]
pub(crate) struct Sent {
    pub(crate) acked: BTreeSet<u64>,
    /// Answered with an error: the producer knows they were not taken.
    pub(crate) refused: BTreeSet<u64>,
    /// No connection: never reached ingest.
    pub(crate) unsent: BTreeSet<u64>,
    /// The request failed after it was sent: taken or not, nobody knows.
    pub(crate) unknown: BTreeSet<u64>,
    pub(crate) first_refusal: Option<String>,
}

/// Sends batches of 20 events every 10 ms (2,000 events/s) until `stop`; with
/// `resend`, each batch goes twice.
pub(crate) fn produce(
    url: String,
    source: String,
    resend: bool,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Sent> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        let mut sent = Sent::default();
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let instruments = [
            ("AAPL", "XNAS"),
            ("MSFT", "XNAS"),
            ("SPY", "ARCX"),
            ("VOD.L", "XLON"),
        ];
        while !stop.is_cancelled() {
            tick.tick().await;
            let seqs: Vec<u64> = (seq..seq + 20).collect();
            seq += 20;
            let batch: Vec<Value> = seqs
                .iter()
                .map(|&s| {
                    let (instrument, venue) = instruments[(s % 4) as usize];
                    if s % 3 == 0 {
                        json!({"kind": "trade", "source": source, "seq": s, "instrument": instrument,
                               "venue": venue, "ts": now_ns(), "price": "100.00", "qty": "5", "side": "buy"})
                    } else {
                        json!({"kind": "quote", "source": source, "seq": s, "instrument": instrument,
                               "venue": venue, "ts": now_ns(), "bid": "99.98", "ask": "100.02",
                               "bid_size": "100", "ask_size": "200"})
                    }
                })
                .collect();
            match http.post(&url).json(&batch).send().await {
                Ok(r) if r.status().is_success() => {
                    let answer: Value = r.json().await.unwrap_or_default();
                    assert_eq!(answer["accepted"], json!(20), "{answer}");
                    if resend {
                        let again = http.post(&url).json(&batch).send().await;
                        let answer: Value = match again {
                            Ok(r) => r.json().await.unwrap_or_default(),
                            Err(e) => json!(e.to_string()),
                        };
                        assert_eq!(answer["accepted"], json!(20), "re-send: {answer}");
                    }
                    sent.acked.extend(seqs);
                }
                Ok(r) => {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    sent.first_refusal.get_or_insert(format!("{status} {body}"));
                    sent.refused.extend(seqs);
                }
                Err(e) if e.is_connect() => sent.unsent.extend(seqs),
                Err(_) => sent.unknown.extend(seqs),
            }
        }
        sent
    })
}

/// Seqs of `source` in the enriched streams, duplicates included.
async fn enriched_seqs(redis_url: &str, layout: &StreamLayout, source: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    for shard in layout.shard_ids() {
        seqs.extend(stream_seqs(redis_url, &layout.enriched(shard), source).await);
    }
    seqs
}

/// Seqs of `source` in one enriched stream on the Redis at `redis_url`,
/// duplicates included; nothing while that Redis does not answer.
pub(crate) async fn stream_seqs(redis_url: &str, key: &str, source: &str) -> Vec<u64> {
    let client = redis::Client::open(redis_url).expect("url");
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return Vec::new();
    };
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .expect("XRANGE");
    let mut seqs = Vec::new();
    for entry in parse_entries(reply).expect("entries") {
        let Some(bytes) = &entry.record else { continue };
        for rec in decode_entry::<EnrichedRecord>(bytes).expect("enriched entry") {
            let h = rec.event.header();
            if h.source.as_str() == source {
                seqs.push(h.seq);
            }
        }
    }
    seqs
}

/// Seqs of `source` in the history tables, duplicates included.
pub(crate) async fn loaded_seqs(db_url: &str, source: &str) -> Vec<u64> {
    let Ok(pool) = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(2))
        .connect(db_url)
        .await
    else {
        return Vec::new();
    };
    let rows: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM trades WHERE source = $1 UNION ALL SELECT seq FROM quotes WHERE source = $1",
    )
    .bind(source)
    .fetch_all(&pool)
    .await
    .unwrap_or_default();
    pool.close().await;
    rows.into_iter().map(|s| s as u64).collect()
}

pub(crate) fn duplicates(seqs: &[u64]) -> usize {
    seqs.len() - seqs.iter().collect::<BTreeSet<_>>().len()
}

/// Waits until the enriched streams and the history hold everything the
/// producer may have had taken, then checks them exactly and prints the row.
async fn settle_and_check(rig: &Rig, source: &str, sent: Sent) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut enriched, mut loaded);
    loop {
        enriched = enriched_seqs(&rig.redis.url(), &rig.layout(), source).await;
        loaded = loaded_seqs(&rig.db_url, source).await;
        let caught_up = enriched.len() >= sent.acked.len() && loaded.len() >= sent.acked.len();
        if caught_up || Instant::now() > deadline {
            // A moment more, so that a late duplicate or stray would show.
            tokio::time::sleep(Duration::from_secs(1)).await;
            enriched = enriched_seqs(&rig.redis.url(), &rig.layout(), source).await;
            loaded = loaded_seqs(&rig.db_url, source).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = sent.acked.len() + sent.refused.len() + sent.unsent.len() + sent.unknown.len();
    println!(
        "fault row: {:<42} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
        rig.name,
        total,
        sent.acked.len(),
        sent.refused.len() + sent.unsent.len(),
        sent.unknown.len(),
        enriched.len(),
        loaded.len(),
        duplicates(&enriched) + duplicates(&loaded),
    );
    let logs = || {
        ["ingest", "enrich-1", "enrich-2", "load-1"]
            .map(|n| format!("--- {n}\n{}", tail(&rig.log(n))))
            .join("\n")
    };
    assert_eq!(
        duplicates(&enriched),
        0,
        "duplicates in the enriched streams\n{}",
        logs()
    );
    assert_eq!(
        duplicates(&loaded),
        0,
        "duplicates in the history\n{}",
        logs()
    );
    let enriched: BTreeSet<u64> = enriched.into_iter().collect();
    let loaded: BTreeSet<u64> = loaded.into_iter().collect();
    let missing: Vec<_> = sent.acked.difference(&enriched).take(10).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not enriched, e.g. {missing:?}\n{}",
        logs()
    );
    let missing: Vec<_> = sent.acked.difference(&loaded).take(10).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in history, e.g. {missing:?}\n{}",
        logs()
    );
    let allowed: BTreeSet<u64> = sent.acked.union(&sent.unknown).copied().collect();
    let extra: Vec<_> = enriched.difference(&allowed).take(10).collect();
    assert!(
        extra.is_empty(),
        "enriched without being acknowledged, e.g. {extra:?}"
    );
    assert_eq!(
        enriched, loaded,
        "the history differs from the enriched streams"
    );
}

pub(crate) fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Seeds the reference data into a `#[sqlx::test]` database and returns its URL
/// for the child processes.
pub(crate) async fn shared_db(pool: &PgPool) -> String {
    seed_refdata(pool).await;
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into());
    let db = pool
        .connect_options()
        .get_database()
        .unwrap_or("postgres")
        .to_string();
    match base.rfind('/') {
        Some(i) => format!("{}/{db}", &base[..i]),
        None => base,
    }
}

/// Runs a scenario: start everything, load for a phase, `fault` (which returns
/// once the system is whole again), load for another phase, check. With
/// `answers_through_it`, every batch must have been answered with success.
async fn scenario<F, Fut>(
    name: &'static str,
    db_url: String,
    answers_through_it: bool,
    setup: impl FnOnce(&mut Rig),
    fault: F,
) where
    F: FnOnce(Rig) -> Fut,
    Fut: std::future::Future<Output = Rig>,
{
    let mut rig = Rig::new(name, db_url);
    setup(&mut rig);
    rig.start_all();
    rig.wait_ingest().await;
    let slug: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let source = format!("fault-{slug}");
    let stop = CancellationToken::new();
    let producer = produce(rig.ingest_url(), source.clone(), rig.resend, stop.clone());
    tokio::time::sleep(phase()).await;
    let rig = fault(rig).await;
    tokio::time::sleep(phase()).await;
    stop.cancel();
    let sent = producer.await.expect("producer");
    assert!(!sent.acked.is_empty(), "nothing was acknowledged");
    if answers_through_it {
        assert!(
            sent.refused.is_empty() && sent.unsent.is_empty() && sent.unknown.is_empty(),
            "ingest failed to answer through this fault: {} refused, first: {:?}",
            sent.refused.len(),
            sent.first_refusal
        );
    }
    settle_and_check(&rig, &source, sent).await;
}

#[sqlx::test(migrations = "../migrations")]
async fn enrich_killed_mid_batch_its_pending_claimed_by_another(pool: PgPool) {
    scenario(
        "kill -9 enrich, another claims",
        shared_db(&pool).await,
        true,
        |_| {},
        |mut rig| async move {
            rig.kill9("enrich-1");
            rig.start_enrich("enrich-2");
            rig
        },
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn enrich_killed_and_restarted_finishes_its_own_pending(pool: PgPool) {
    scenario(
        "kill -9 enrich, restart",
        shared_db(&pool).await,
        true,
        |_| {},
        |mut rig| async move {
            rig.kill9("enrich-1");
            tokio::time::sleep(Duration::from_millis(500)).await;
            rig.start_enrich("enrich-1");
            rig
        },
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn loader_killed_mid_batch_and_restarted(pool: PgPool) {
    scenario(
        "kill -9 load, restart",
        shared_db(&pool).await,
        true,
        |_| {},
        |mut rig| async move {
            rig.kill9("load-1");
            tokio::time::sleep(Duration::from_millis(500)).await;
            rig.start_load("load-1");
            rig
        },
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn redis_killed_and_restarted_from_its_append_only_file(pool: PgPool) {
    scenario(
        "kill -9 redis (AOF always), restart",
        shared_db(&pool).await,
        true,
        |_| {},
        |mut rig| async move {
            rig.redis.kill();
            // Producers keep being answered, from the spool.
            tokio::time::sleep(phase()).await;
            rig.redis.restart().expect("restart redis");
            rig
        },
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn ingest_spool_full_refuses_clearly_and_loses_nothing_it_took(pool: PgPool) {
    scenario(
        "redis down, spool full",
        shared_db(&pool).await,
        false,
        |rig| rig.ingest_args = ["--spool-max-bytes", "100000"].map(String::from).to_vec(),
        |mut rig| async move {
            rig.redis.kill();
            tokio::time::sleep(phase()).await;
            assert!(
                rig.log("ingest").contains("the spool is full"),
                "the spool never filled:\n{}",
                tail(&rig.log("ingest"))
            );
            let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", rig.ingest_port))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics body");
            let refused = metrics
                .lines()
                .find_map(|l| l.strip_prefix("tickgraph_ingest_refused_events_total "))
                .and_then(|v| v.parse::<u64>().ok());
            assert!(refused.is_some_and(|n| n > 0), "{metrics}");
            rig.redis.restart().expect("restart redis");
            rig
        },
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn ingest_stopped_with_sigterm_finishes_what_it_took(pool: PgPool) {
    scenario(
        "SIGTERM ingest, restart",
        shared_db(&pool).await,
        false,
        |_| {},
        |mut rig| async move {
            let status = rig.sigterm("ingest");
            assert!(status.success(), "ingest exited with {status}");
            rig.start_ingest();
            rig.wait_ingest().await;
            rig
        },
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn ingest_killed_with_a_full_spool_drains_it_after_restart(pool: PgPool) {
    scenario(
        "redis down, kill -9 ingest, restart both",
        shared_db(&pool).await,
        false,
        |_| {},
        |mut rig| async move {
            rig.redis.kill();
            // Answered from the spool, then gone without a chance to drain it.
            tokio::time::sleep(phase()).await;
            rig.kill9("ingest");
            rig.redis.restart().expect("restart redis");
            rig.start_ingest();
            rig.wait_ingest().await;
            rig
        },
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn workers_stopped_with_sigterm_finish_and_ack(pool: PgPool) {
    scenario(
        "SIGTERM enrich and load, restart",
        shared_db(&pool).await,
        true,
        |_| {},
        |mut rig| async move {
            for name in ["enrich-1", "load-1"] {
                let status = rig.sigterm(name);
                assert!(status.success(), "{name} exited with {status}");
            }
            rig.start_enrich("enrich-1");
            rig.start_load("load-1");
            rig
        },
    )
    .await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_producer_resending_every_batch_has_each_event_stored_once(pool: PgPool) {
    scenario(
        "producer re-sends every batch",
        shared_db(&pool).await,
        true,
        |rig| rig.resend = true,
        |rig| async move { rig },
    )
    .await;
}

/// A Postgres of the scenario's own, stopped and started by it.
struct LocalPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl LocalPostgres {
    fn start(parent: &Path) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("/usr/lib/postgresql: install postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("no initdb under /usr/lib/postgresql");
        let dir = parent.join("pg");
        std::fs::create_dir_all(&dir).expect("pg dir");
        // Postgres will not run as root: the cluster belongs to `postgres`.
        let owner = |p: &Path| {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(p)
                .status();
            assert!(ok.is_ok_and(|s| s.success()), "chown {}", p.display());
        };
        let perms = Command::new("chmod").args(["755"]).arg(parent).status();
        assert!(perms.is_ok_and(|s| s.success()));
        owner(&dir);
        let pg = Self {
            dir,
            bin,
            port: free_port().expect("port"),
        };
        pg.as_postgres(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-U",
                "root",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        pg.start_server();
        pg
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/postgres", self.port)
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .output()
            .expect("runuser");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
    }

    /// An immediate stop: like a crash, no checkpoint.
    fn stop(&self) {
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

#[tokio::test]
async fn postgres_down_enrich_goes_on_from_cache_and_the_loader_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = Arc::new(Mutex::new(LocalPostgres::start(dir.path())));
    let url = pg.lock().expect("pg").url();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("local postgres");
    sqlx::migrate!("../migrations")
        .run(&pool)
        .await
        .expect("migrate");
    seed_refdata(&pool).await;
    pool.close().await;
    let during = pg.clone();
    scenario(
        "postgres stopped, restarted",
        url,
        true,
        |_| {},
        |rig| async move {
            during.lock().expect("pg").stop();
            tokio::time::sleep(phase()).await;
            during.lock().expect("pg").start_server();
            rig
        },
    )
    .await;
}
