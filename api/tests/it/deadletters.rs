//! Dead letters through the front doors: events posted to the real ingest, one
//! malformed and one for an unknown instrument, dead-lettered by ingest and by
//! the real enrich worker; listed with `tickgraph dlq list` (its function) and
//! with GraphQL as an admin; refused to a non-admin; replayed after the
//! instrument is added; found once in the enriched stream and in history.

use std::time::Duration;

use async_graphql::Request;
use serde_json::{json, Value};
use sqlx::PgPool;
use tickgraph_api::auth::{Entitlements, Principal};
use tickgraph_api::dlq::{self, DlqArgs, DlqCommand, ListArgs, ReplayArgs};
use tickgraph_api::pipeline::{Pipeline, PipelineConfig};
use tickgraph_api::schema::{self, ApiSchema, Limits, Services};
use tickgraph_api::{ApiConfig, Hub};
use tickgraph_enrich::loader::LoadConfig;
use tickgraph_enrich::record::EnrichedRecord;
use tickgraph_enrich::refdata::RefCache;
use tickgraph_enrich::worker::EnrichConfig;
use tickgraph_enrich::DeadLetters;
use tickgraph_ingest::server::IngestConfig;
use tickgraph_ingest::stream::{decode_entry, parse_entries, StreamLayout};
use tokio_util::sync::CancellationToken;

use crate::helpers::{redis_url, seed_refdata, PATIENCE};

fn admin() -> Principal {
    Principal::new("ops", Entitlements::all(), true, None)
}

fn viewer() -> Principal {
    Principal::new("trader", Entitlements::all(), false, None)
}

/// The whole pipeline on a stream prefix of its own, and a schema over the
/// same streams that the test calls with the principal it chooses.
struct Rig {
    layout: StreamLayout,
    pool: PgPool,
    refs: RefCache,
    schema: ApiSchema,
    dead: DeadLetters,
    ingest: String,
    redis: redis::aio::MultiplexedConnection,
    client: redis::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), tickgraph_api::pipeline::PipelineError>>,
    _spool: tempfile::TempDir,
}

impl Rig {
    async fn start(pool: PgPool) -> Self {
        seed_refdata(&pool).await;
        let layout = StreamLayout::new(format!("dlq{}", rand::random::<u64>()), 2);
        let shutdown = CancellationToken::new();
        let refs = RefCache::load(&pool).await.expect("load refdata");
        refs.spawn_listener(pool.clone(), shutdown.clone());
        let spool = tempfile::tempdir().expect("spool dir");
        let mut ingest = IngestConfig::new(layout.clone());
        ingest.writer.spool.dir = spool.path().to_path_buf();
        let mut enrich = EnrichConfig::new(layout.clone(), "dlq-enrich");
        enrich.block = Duration::from_millis(50);
        let mut load = LoadConfig::new(layout.clone(), "dlq-load");
        load.block = Duration::from_millis(50);
        load.linger = Duration::ZERO;
        let cfg = PipelineConfig {
            ingest,
            ingest_listen: "127.0.0.1:0".parse().expect("addr"),
            enrich,
            load,
            api: ApiConfig::new(layout.clone()),
            api_listen: "127.0.0.1:0".parse().expect("addr"),
            ready: Default::default(),
        };
        let client = redis::Client::open(redis_url()).expect("redis url");
        let pipeline = Pipeline::start(
            cfg,
            client.clone(),
            pool.clone(),
            refs.clone(),
            shutdown.clone(),
        )
        .await
        .expect("pipeline starts");
        let dead = DeadLetters::new(&client.clone().into(), layout.clone()).expect("dead letters");
        let defaults = ApiConfig::default();
        let schema = schema::build(
            Limits {
                max_depth: defaults.max_depth,
                max_complexity: defaults.max_complexity,
                introspection: true,
                guard: defaults.guard,
            },
            Services {
                pool: pool.clone(),
                refs: refs.clone(),
                hub: Hub::new(16),
                shards: layout.shards(),
                dead_letters: dead.clone(),
                users: tickgraph_api::auth::Users::new(Default::default()),
            },
            None,
        );
        let redis = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection");
        Self {
            layout,
            pool,
            refs,
            schema,
            dead,
            ingest: format!("http://{}/v1/events", pipeline.ingest_addr),
            redis,
            client,
            shutdown,
            task: tokio::spawn(pipeline.wait()),
            _spool: spool,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("pipeline stops")
            .expect("pipeline task")
            .expect("pipeline ends cleanly");
        if let Ok(mut con) = self.client.get_connection() {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.layout.prefix()))
                .query(&mut con)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut con);
            }
        }
    }

    async fn gql(&self, who: Option<Principal>, query: &str, variables: Value) -> Value {
        let mut req = Request::new(query).variables(async_graphql::Variables::from_json(variables));
        if let Some(p) = who {
            req = req.data(p);
        }
        serde_json::to_value(self.schema.execute(req).await).expect("response as JSON")
    }

    async fn letters(&mut self) -> usize {
        let mut n = 0;
        for key in self.layout.all_dlqs() {
            let len: usize = redis::cmd("XLEN")
                .arg(&key)
                .query_async(&mut self.redis)
                .await
                .expect("xlen");
            n += len;
        }
        n
    }

    async fn wait_for(&mut self, what: &str, mut done: impl AsyncFnMut(&mut Self) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !done(self).await {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many times `source:seq` is in the enriched streams.
    async fn enriched(&mut self, id: &str) -> usize {
        let mut n = 0;
        for s in self.layout.shard_ids().collect::<Vec<_>>() {
            let reply: redis::Value = redis::cmd("XRANGE")
                .arg(self.layout.enriched(s))
                .arg("-")
                .arg("+")
                .query_async(&mut self.redis)
                .await
                .expect("xrange");
            for e in parse_entries(reply).expect("entries") {
                let bytes = e.record.expect("record");
                let recs: Vec<EnrichedRecord> = decode_entry(&bytes).expect("decodes");
                n += recs.iter().filter(|r| r.event.id() == id).count();
            }
        }
        n
    }

    async fn history(&self, source: &str, seq: i64) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM quotes WHERE source = $1 AND seq = $2")
            .bind(source)
            .bind(seq)
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

const LIST: &str = "query($stage: DeadLetterStage) { deadLetters(first: 10, stage: $stage) {
    items { id stream stage reason eventId payload payloadFormat payloadBytes replayable notReplayableReason at }
    endCursor hasNextPage } }";

const REPLAY_ALL: &str = "mutation($dry: Boolean!) { replayDeadLetters(all: true, dryRun: $dry) {
    replayed wouldReplay alreadyEnriched notFound notReplayable failed next
    outcomes { id eventId status detail } } }";

fn quote(seq: u64, instrument: &str) -> Value {
    json!({"kind": "quote", "source": "desk", "seq": seq, "instrument": instrument,
           "venue": "XNAS", "ts": "2026-11-25T10:00:00Z",
           "bid": "10.00", "ask": "10.02", "bid_size": "100", "ask_size": "200"})
}

async fn run_cli(dead: &DeadLetters, command: DlqCommand) -> String {
    let mut out = Vec::new();
    dlq::run(&DlqArgs { command }, dead, &mut out)
        .await
        .expect("dlq command");
    String::from_utf8(out).expect("utf-8 output")
}

#[sqlx::test(migrations = "../migrations")]
async fn dead_letters_are_listed_refused_to_non_admins_and_replayed_once_after_the_fix(
    pool: PgPool,
) {
    let mut rig = Rig::start(pool).await;
    let batch = json!([
        quote(1, "AAPL"),
        quote(2, "NEWCO"),
        {"kind": "quote", "source": "desk", "seq": 3, "instrument": "AAPL", "bid": true},
    ]);
    let answer: Value = reqwest::Client::new()
        .post(&rig.ingest)
        .json(&batch)
        .send()
        .await
        .expect("ingest answers")
        .json()
        .await
        .expect("JSON answer");
    assert_eq!(answer["accepted"], 2, "{answer}");
    rig.wait_for("two dead letters", async |r| r.letters().await == 2)
        .await;

    // Not an admin, or nobody: FORBIDDEN, and nothing changes.
    for who in [Some(viewer()), None] {
        let body = rig.gql(who.clone(), LIST, json!({})).await;
        assert_eq!(body["data"], Value::Null, "{body}");
        assert_eq!(
            body["errors"][0]["extensions"]["code"], "FORBIDDEN",
            "{body}"
        );
        let body = rig.gql(who, REPLAY_ALL, json!({"dry": false})).await;
        assert_eq!(body["data"], Value::Null, "{body}");
        assert_eq!(
            body["errors"][0]["extensions"]["code"], "FORBIDDEN",
            "{body}"
        );
    }
    assert_eq!(rig.letters().await, 2, "a refused replay changed nothing");

    // An admin sees both, with reasons.
    let body = rig.gql(Some(admin()), LIST, json!({})).await;
    assert!(body.get("errors").is_none(), "{body}");
    let items = body["data"]["deadLetters"]["items"]
        .as_array()
        .expect("items")
        .clone();
    assert_eq!(items.len(), 2, "{body}");
    assert_eq!(body["data"]["deadLetters"]["hasNextPage"], false);
    let enrich = items
        .iter()
        .find(|i| i["stage"] == "enrich")
        .expect("enrich letter");
    assert_eq!(enrich["reason"], "unknown instrument \"NEWCO\"");
    assert_eq!(enrich["eventId"], "desk:2");
    assert_eq!(enrich["replayable"], true);
    assert_eq!(enrich["payloadFormat"], "JSON");
    let ingest = items
        .iter()
        .find(|i| i["stage"] == "ingest")
        .expect("ingest letter");
    assert_eq!(ingest["replayable"], false);
    assert!(
        ingest["notReplayableReason"]
            .as_str()
            .unwrap_or("")
            .contains("malformed"),
        "{ingest}"
    );
    assert!(
        ingest["reason"].as_str().unwrap_or("").contains("bid"),
        "{ingest}"
    );
    assert_eq!(ingest["stream"], rig.layout.ingest_dlq());
    let enrich_id = enrich["id"].as_str().expect("id").to_owned();
    let ingest_id = ingest["id"].as_str().expect("id").to_owned();
    let only_ingest = rig
        .gql(Some(admin()), LIST, json!({"stage": "INGEST"}))
        .await;
    assert_eq!(
        only_ingest["data"]["deadLetters"]["items"][0]["id"],
        ingest_id.as_str()
    );
    assert_eq!(
        only_ingest["data"]["deadLetters"]["items"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // The command lists the same.
    let listed = run_cli(
        &rig.dead,
        DlqCommand::List(ListArgs {
            stage: None,
            reason: Some("unknown INSTRUMENT".into()),
            stream: None,
            limit: 50,
            after: None,
            oldest_first: false,
            json: false,
        }),
    )
    .await;
    assert!(listed.contains(&enrich_id), "{listed}");
    assert!(!listed.contains(&ingest_id), "{listed}");
    assert!(listed.contains("replayable"), "{listed}");
    assert!(listed.contains("1 shown; no more"), "{listed}");

    // A dry run before the fix: would replay one, the other not replayable.
    let body = rig
        .gql(Some(admin()), REPLAY_ALL, json!({"dry": true}))
        .await;
    let r = &body["data"]["replayDeadLetters"];
    assert_eq!(
        (r["wouldReplay"].as_i64(), r["notReplayable"].as_i64()),
        (Some(1), Some(1)),
        "{body}"
    );
    assert_eq!(rig.letters().await, 2);

    // Fix the reference data, then replay by id through GraphQL and, at the same
    // time, everything through the command.
    sqlx::query(
        "INSERT INTO instruments (symbol, name, asset_class, currency, venue, tick_size, lot_size) \
         VALUES ('NEWCO', 'New Company', 'equity', 'USD', 'XNAS', 0.01, 1)",
    )
    .execute(&rig.pool)
    .await
    .expect("insert instrument");
    let refs = rig.refs.clone();
    rig.wait_for("the api's reference data has NEWCO", async |_| {
        refs.read().instruments.contains_key("NEWCO")
    })
    .await;
    let by_id = "mutation($ids: [ID!]) { replayDeadLetters(ids: $ids) {
        replayed notFound notReplayable failed outcomes { id status detail } } }";
    let dead = rig.dead.clone();
    let (gql, cli) = tokio::join!(
        rig.gql(Some(admin()), by_id, json!({"ids": [enrich_id, ingest_id]})),
        run_cli(
            &dead,
            DlqCommand::Replay(ReplayArgs {
                ids: Vec::new(),
                all: true,
                stage: None,
                reason: None,
                dry_run: false,
                json: false,
            }),
        ),
    );
    let r = &gql["data"]["replayDeadLetters"];
    assert_eq!(r["notReplayable"], 1, "{gql}");
    assert_eq!(r["failed"], 0, "{gql}");
    let by_gql = r["replayed"].as_i64().unwrap_or(-1);
    let by_cli = i64::from(cli.contains(" replayed  event desk:2"));
    assert_eq!(
        by_gql + by_cli,
        1,
        "exactly one of them replayed it:\n{gql}\n{cli}"
    );
    assert!(cli.contains("not_replayable"), "{cli}");
    assert!(cli.contains("failed"), "the summary line: {cli}");

    rig.wait_for("the replayed event in history", async |r| {
        r.history("desk", 2).await == 1
    })
    .await;
    // Let enrich and load settle: a duplicate would show up by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rig.enriched("desk:2").await, 1);
    assert_eq!(rig.history("desk", 2).await, 1);
    assert_eq!(rig.letters().await, 1, "only the ingest letter is left");

    // Once more: nothing to replay, the ingest letter still reported.
    let again = rig
        .gql(Some(admin()), REPLAY_ALL, json!({"dry": false}))
        .await;
    let r = &again["data"]["replayDeadLetters"];
    assert_eq!(
        (r["replayed"].as_i64(), r["notReplayable"].as_i64()),
        (Some(0), Some(1)),
        "{again}"
    );
    assert_eq!(r["outcomes"][0]["status"], "NOT_REPLAYABLE");
    assert_eq!(rig.history("desk", 2).await, 1);
    rig.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn replay_arguments_are_checked(pool: PgPool) {
    let rig = Rig::start(pool).await;
    for (query, wants) in [
        ("mutation { replayDeadLetters { replayed } }", "pass `ids`"),
        (
            "mutation { replayDeadLetters(ids: [\"x\"], all: true) { replayed } }",
            "not both",
        ),
        (
            "mutation { replayDeadLetters(ids: [\"nope\"]) { replayed } }",
            "not a dead-letter id",
        ),
        (
            "mutation { replayDeadLetters(ids: [], reason: \"x\") { replayed } }",
            "go with `all: true`",
        ),
        (
            "{ deadLetters(after: \"garbage\") { endCursor } }",
            "not a dead-letter id",
        ),
        (
            "{ deadLetters(stream: \"tg:raw:{0}\") { endCursor } }",
            "not a dead-letter stream",
        ),
    ] {
        let body = rig.gql(Some(admin()), query, json!({})).await;
        let message = body["errors"][0]["message"].as_str().unwrap_or("");
        assert!(message.contains(wants), "{query}: {body}");
    }
    // A raw stream's entry is never touched through a forged id.
    let forged = format!("{}/1-0", rig.layout.raw(0));
    let body = rig
        .gql(
            Some(admin()),
            "mutation($ids: [ID!]) { replayDeadLetters(ids: $ids) { notFound outcomes { detail } } }",
            json!({"ids": [forged]}),
        )
        .await;
    assert_eq!(body["data"]["replayDeadLetters"]["notFound"], 1, "{body}");
    rig.stop().await;
}
