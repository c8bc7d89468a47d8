//! Redis Cluster end to end (issue 7): the real `tickgraph` processes, two of
//! each (`ingest`, `enrich`, `load`, `api`), in cluster mode against a private
//! six-node cluster ([`LocalCluster`]: three primaries, one replica each), with
//! `--redis-wait-replicas 1` so that what a primary acknowledged is on its
//! replica too.
//!
//! Two producers send 2,000 events/s each, one to each ingest, while an enrich
//! worker is killed (the other claims its entries) and then the primary serving
//! a shard is killed (its replica takes over). Then every event ingest
//! acknowledged is looked for in the enriched streams and in the history: once
//! each, and nothing else. It prints one row, as the fault suite does: sent /
//! acknowledged / refused (a clear error to the producer) / unknown / enriched /
//! loaded / duplicates. `bash .ci/cluster` runs it and prints the table;
//! `TG_CLUSTER_SECS` lengthens each load phase (default 2 s); with
//! `TG_CLUSTER_KEEP` set, the processes' logs and the nodes' directories are
//! kept.
//!
//! On the same cluster afterwards: a subscriber takes some events from one api
//! process, drops, and resumes on the other with `after:`, receiving exactly
//! what it missed; and the shards' slots are on more than one primary.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use tickgraph_ingest::test_support::{free_port, LocalCluster};
use tickgraph_ingest::StreamLayout;

use crate::faults::{
    duplicates, loaded_seqs, phase_from, produce, shared_db, spawn_tickgraph, stream_seqs, tail,
    Sent,
};
use crate::helpers::quote;
use crate::protocol::Ws;
use crate::resume::{next_quote, subscribe_quotes};

/// Four shards over three primaries: every primary serves at least one.
const SHARDS: u16 = 4;
const ROLES: [&str; 8] = [
    "ingest-1", "ingest-2", "enrich-1", "enrich-2", "load-1", "load-2", "api-1", "api-2",
];

/// Length of each load phase.
fn phase() -> Duration {
    phase_from("TG_CLUSTER_SECS")
}

/// The processes, the cluster they share and the database.
struct Rig {
    dir: tempfile::TempDir,
    /// None only while a blocking wait on it runs off the test's runtime.
    cluster: Option<LocalCluster>,
    db_url: String,
    ingest_ports: [u16; 2],
    api_ports: [u16; 2],
    procs: HashMap<String, Child>,
}

impl Rig {
    fn layout(&self) -> StreamLayout {
        StreamLayout::new("tg", SHARDS)
    }

    fn cluster(&self) -> &LocalCluster {
        self.cluster.as_ref().expect("the cluster")
    }

    fn ingest_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/v1/events", self.ingest_ports[i])
    }

    fn ws_url(&self, i: usize) -> String {
        format!("ws://127.0.0.1:{}/graphql/ws", self.api_ports[i])
    }

    /// Starts `tickgraph <role> <args>` in cluster mode as `name`, its log in the
    /// rig's directory.
    fn spawn(&mut self, name: &str, role: &str, args: &[String]) {
        let redis = [
            "--redis-url".to_string(),
            self.cluster().url_list(),
            "--redis-cluster".into(),
            "--redis-wait-replicas".into(),
            "1".into(),
        ];
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

    fn start_all(&mut self) {
        for i in 0..2 {
            let n = i + 1;
            let args = [
                "--ingest-listen".into(),
                format!("127.0.0.1:{}", self.ingest_ports[i]),
                "--spool-dir".into(),
                self.dir
                    .path()
                    .join(format!("spool-{n}"))
                    .display()
                    .to_string(),
                "--ingest-id".into(),
                format!("cluster-ingest-{n}"),
                "--ingest-redis-timeout-ms".into(),
                "500".into(),
            ];
            self.spawn(&format!("ingest-{n}"), "ingest", &args);
            let args = [
                "--enrich-consumer",
                &format!("enrich-{n}"),
                "--claim-idle-secs",
                "1",
                "--metrics-listen",
                "127.0.0.1:0",
            ]
            .map(String::from);
            self.spawn(&format!("enrich-{n}"), "enrich", &args);
            // Untrimmed, so the enriched streams can be counted however long
            // the run.
            let args = [
                "--load-consumer",
                &format!("load-{n}"),
                "--load-claim-idle-secs",
                "1",
                "--load-linger-ms",
                "20",
                "--enriched-trim",
                "none",
                "--metrics-listen",
                "127.0.0.1:0",
            ]
            .map(String::from);
            self.spawn(&format!("load-{n}"), "load", &args);
            let args = [
                "--api-listen".into(),
                format!("127.0.0.1:{}", self.api_ports[i]),
            ];
            self.spawn(&format!("api-{n}"), "api", &args);
        }
    }

    /// Until both ingests and both apis answer `/healthz`.
    async fn wait_up(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for port in self.ingest_ports.iter().chain(&self.api_ports) {
            let url = format!("http://127.0.0.1:{port}/healthz");
            while http.get(&url).send().await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "{url} did not come up\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// kill -9: no chance to finish anything.
    fn kill9(&mut self, name: &str) {
        let mut child = self.procs.remove(name).expect("running process");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Runs a blocking wait on the cluster off the test's runtime, so the
    /// producers and the processes' clients keep going meanwhile.
    async fn with_cluster<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut LocalCluster) -> T + Send + 'static,
    ) -> T {
        let mut cluster = self.cluster.take().expect("the cluster");
        let (cluster, out) = tokio::task::spawn_blocking(move || {
            let out = f(&mut cluster);
            (cluster, out)
        })
        .await
        .expect("cluster task");
        self.cluster = Some(cluster);
        out
    }

    /// Seqs of `source` in the enriched streams, read from whichever primary
    /// serves each shard now.
    async fn enriched_seqs(&self, source: &str) -> Vec<u64> {
        let layout = self.layout();
        let mut seqs = Vec::new();
        for shard in layout.shard_ids() {
            let key = layout.enriched(shard);
            let url = self.cluster().node_url(self.cluster().primary_of_key(&key));
            seqs.extend(stream_seqs(&url, &key, source).await);
        }
        seqs
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        ROLES
            .map(|n| format!("--- {n}\n{}", tail(&self.log(n))))
            .join("\n")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("TG_CLUSTER_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            println!(
                "cluster: process logs and node directories kept in {}",
                self.dir.path().display()
            );
        }
    }
}

/// Issue 7: the shards' streams are spread over the primaries, and each
/// shard's raw, enriched and dead-letter streams share one slot.
fn assert_shards_spread(rig: &Rig) -> BTreeMap<u16, u16> {
    let (cluster, layout) = (rig.cluster(), rig.layout());
    let mut primary_of = BTreeMap::new();
    for shard in layout.shard_ids() {
        let slot = cluster.keyslot(&layout.raw(shard));
        for key in [layout.enriched(shard), layout.dlq(shard)] {
            assert_eq!(
                cluster.keyslot(&key),
                slot,
                "{key} is not in its shard's slot"
            );
        }
        primary_of.insert(shard, cluster.primary_of_slot(slot));
    }
    let primaries: BTreeSet<u16> = primary_of.values().copied().collect();
    assert!(
        primaries.len() > 1,
        "every shard is on one primary: {primary_of:?} (slot map {:?})",
        cluster.slot_map()
    );
    primary_of
}

/// Waits until the enriched streams and the history hold everything acked for
/// each source, then checks them exactly; prints the row.
async fn settle_and_check(rig: &Rig, sent: &[(String, Sent)]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut found: Vec<(Vec<u64>, Vec<u64>)> = Vec::new();
    loop {
        found.clear();
        for (source, _) in sent {
            let enriched = rig.enriched_seqs(source).await;
            let loaded = loaded_seqs(&rig.db_url, source).await;
            found.push((enriched, loaded));
        }
        let caught_up = sent
            .iter()
            .zip(&found)
            .all(|((_, s), (e, l))| e.len() >= s.acked.len() && l.len() >= s.acked.len());
        if caught_up || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A moment more, so that a late duplicate or stray would show.
    tokio::time::sleep(Duration::from_secs(1)).await;
    found.clear();
    for (source, _) in sent {
        found.push((
            rig.enriched_seqs(source).await,
            loaded_seqs(&rig.db_url, source).await,
        ));
    }

    let sum = |f: &dyn Fn(&Sent) -> usize| sent.iter().map(|(_, s)| f(s)).sum::<usize>();
    let acked = sum(&|s| s.acked.len());
    let refused = sum(&|s| s.refused.len() + s.unsent.len());
    let unknown = sum(&|s| s.unknown.len());
    let enriched: usize = found.iter().map(|(e, _)| e.len()).sum();
    let loaded: usize = found.iter().map(|(_, l)| l.len()).sum();
    let dups: usize = found
        .iter()
        .map(|(e, l)| duplicates(e) + duplicates(l))
        .sum();
    println!(
        "cluster row: {:<42} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "kill -9 enrich, kill -9 a primary",
        acked + refused + unknown,
        acked,
        refused,
        unknown,
        enriched,
        loaded,
        dups,
    );
    for (source, s) in sent {
        if let Some(why) = &s.first_refusal {
            println!("cluster: {source}: first refusal: {why}");
        }
        // Both ingests run throughout: every batch gets an answer, and a
        // refusal says why.
        assert!(
            s.unsent.is_empty() && s.unknown.is_empty(),
            "{source}: {} batches unsent, {} unanswered\n{}",
            s.unsent.len(),
            s.unknown.len(),
            rig.logs()
        );
    }

    for ((source, s), (enriched, loaded)) in sent.iter().zip(found) {
        assert_eq!(
            duplicates(&enriched),
            0,
            "{source}: duplicates in the enriched streams\n{}",
            rig.logs()
        );
        assert_eq!(
            duplicates(&loaded),
            0,
            "{source}: duplicates in the history\n{}",
            rig.logs()
        );
        let enriched: BTreeSet<u64> = enriched.into_iter().collect();
        let loaded: BTreeSet<u64> = loaded.into_iter().collect();
        let missing: Vec<_> = s.acked.difference(&enriched).take(10).collect();
        assert!(
            missing.is_empty(),
            "{source}: acknowledged but not enriched, e.g. {missing:?}\n{}",
            rig.logs()
        );
        let missing: Vec<_> = s.acked.difference(&loaded).take(10).collect();
        assert!(
            missing.is_empty(),
            "{source}: acknowledged but not in history, e.g. {missing:?}\n{}",
            rig.logs()
        );
        let allowed: BTreeSet<u64> = s.acked.union(&s.unknown).copied().collect();
        let extra: Vec<_> = enriched.difference(&allowed).take(10).collect();
        assert!(
            extra.is_empty(),
            "{source}: enriched without being acknowledged, e.g. {extra:?}"
        );
        assert_eq!(
            enriched, loaded,
            "{source}: the history differs from the enriched streams"
        );
    }
}

const SYMBOLS: [(&str, &str); 4] = [
    ("AAPL", "XNAS"),
    ("MSFT", "XNAS"),
    ("SPY", "ARCX"),
    ("VOD.L", "XLON"),
];

/// Posts quotes `seqs` of `source` to ingest `url`, over the four instruments,
/// in batches of 50; each must be accepted.
async fn post_quotes(url: &str, source: &str, seqs: std::ops::RangeInclusive<u64>) {
    let http = reqwest::Client::new();
    let all: Vec<Value> = seqs
        .map(|seq| {
            let (sym, venue) = SYMBOLS[(seq % 4) as usize];
            quote(source, seq, sym, venue, "10.5", "10.75")
        })
        .collect();
    for batch in all.chunks(50) {
        let answer: Value = http
            .post(url)
            .json(&batch)
            .send()
            .await
            .expect("ingest answers")
            .json()
            .await
            .expect("JSON answer");
        assert_eq!(answer["accepted"], batch.len(), "{answer}");
    }
}

/// Posts probe quotes until `ws`'s subscription delivers one.
async fn until_live(ingest: &str, ws: &mut Ws) {
    for n in 0..200u64 {
        post_quotes(ingest, "probe", n..=n).await;
        if tokio::time::timeout(Duration::from_millis(600), next_quote(ws))
            .await
            .is_ok()
        {
            return;
        }
    }
    panic!("subscription never went live");
}

/// A subscriber takes 100 of 200 quotes from api #1 and drops; 200 more are
/// posted; it resumes on api #2 with the last `resume` it got, and receives
/// exactly the 300 it had not, none twice, in order per instrument, then the
/// live ones.
async fn resume_across_apis(rig: &Rig) {
    let source = "cluster-resume";
    let mut ws = subscribe_quotes(&rig.ws_url(0), "").await;
    until_live(&rig.ingest_url(0), &mut ws).await;
    post_quotes(&rig.ingest_url(0), source, 1..=200).await;
    let mut received = HashSet::new();
    let mut resume = String::new();
    while received.len() < 100 {
        let (from, seq, _, r) = next_quote(&mut ws).await;
        if from == source {
            received.insert(seq);
        }
        resume = r;
    }
    drop(ws);

    post_quotes(&rig.ingest_url(1), source, 201..=400).await;
    let mut ws = subscribe_quotes(&rig.ws_url(1), &format!("(after: {})", json!(resume))).await;
    let expected: BTreeSet<u64> = (1..=400).filter(|s| !received.contains(s)).collect();
    let mut again = BTreeSet::new();
    let mut last_of: HashMap<String, u64> = HashMap::new();
    while again.len() < expected.len() {
        let (from, seq, instrument, _) = next_quote(&mut ws).await;
        if from != source {
            continue;
        }
        assert!(
            !received.contains(&seq),
            "{seq} was received from api #1 before the drop"
        );
        assert!(again.insert(seq), "{seq} arrived twice");
        let prev = last_of.insert(instrument.clone(), seq).unwrap_or(0);
        assert!(seq > prev, "{instrument}: {seq} after {prev}");
    }
    assert_eq!(again, expected);
    // And nothing more: the next one is live.
    post_quotes(&rig.ingest_url(0), source, 401..=401).await;
    loop {
        let (from, seq, _, _) = next_quote(&mut ws).await;
        if from == source {
            assert_eq!(seq, 401, "a repeat after the missed ones");
            break;
        }
    }
    println!(
        "cluster: resumed on api #2 after {} of 400 from api #1: {} missed, all received once, in order",
        received.len(),
        expected.len()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn cluster_failover_loses_nothing_acknowledged_and_resume_spans_apis(pool: PgPool) {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = dir.path().join("cluster");
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(&nodes))
        .await
        .expect("cluster task")
        .expect("a local Redis Cluster");
    let mut rig = Rig {
        dir,
        cluster: Some(cluster),
        db_url: shared_db(&pool).await,
        ingest_ports: [free_port().expect("port"), free_port().expect("port")],
        api_ports: [free_port().expect("port"), free_port().expect("port")],
        procs: HashMap::new(),
    };
    let primary_of = assert_shards_spread(&rig);
    println!("cluster: shard -> primary port: {primary_of:?}");
    rig.start_all();
    rig.wait_up().await;

    let stop = CancellationToken::new();
    let producers: Vec<_> = (0..2)
        .map(|i| {
            let source = format!("cluster-{}", i + 1);
            let task = produce(rig.ingest_url(i), source.clone(), false, stop.clone());
            (source, task)
        })
        .collect();
    tokio::time::sleep(phase()).await;

    rig.kill9("enrich-1");
    tokio::time::sleep(phase()).await;

    let key = rig.layout().raw(0);
    let killed = rig.with_cluster(move |c| c.kill_primary_of_key(&key)).await;
    let failover = Instant::now();
    rig.with_cluster(|c| c.wait_failover()).await;
    println!(
        "cluster: killed primary {killed} (shard 0); a replica took over in {:?}",
        failover.elapsed()
    );
    tokio::time::sleep(phase()).await;

    // The promoted replica has no replica of its own, so no write to its slots
    // can be WAITed for until the old primary is back as its replica.
    let back = Instant::now();
    rig.with_cluster(move |c| {
        c.restart(killed).expect("restart the killed primary");
        c.wait_replicated();
    })
    .await;
    println!(
        "cluster: {killed} restarted, in sync as a replica after {:?}",
        back.elapsed()
    );
    tokio::time::sleep(phase()).await;

    stop.cancel();
    let mut sent = Vec::new();
    for (source, task) in producers {
        let s = task.await.expect("producer");
        assert!(!s.acked.is_empty(), "{source}: nothing was acknowledged");
        sent.push((source, s));
    }
    settle_and_check(&rig, &sent).await;

    resume_across_apis(&rig).await;
    assert_shards_spread(&rig);
    println!("cluster: took {:?}", started.elapsed());
}
