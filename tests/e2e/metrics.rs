//! `/metrics`, `/healthz` and `/readyz` of the real components, scraped over
//! HTTP: counters move by exactly what flowed through the pipeline, and
//! readiness fails with its reason when Redis cannot be reached.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;
use tickgraph_ingest::ops::names::check_exposition;
use tickgraph_ingest::test_support::free_port;

use crate::faults::shared_db;
use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_tickgraph");

/// Every sample of an exposition: `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(http: &reqwest::Client, base: &str) -> HashMap<String, f64> {
    let res = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(res.status(), 200);
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = res.text().await.expect("metrics body");
    assert_eq!(check_exposition(&text), Vec::<String>::new(), "{text}");
    samples(&text)
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

/// Scrapes until `done` holds, or fails after [`DEADLINE`] with the last scrape.
async fn scrape_until(
    http: &reqwest::Client,
    base: &str,
    what: &str,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let start = Instant::now();
    loop {
        let m = scrape(http, base).await;
        if done(&m) {
            return m;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const AAPL_TRADES: &str = "subscription { trades(instruments: [\"AAPL\"]) { id price } }";

#[sqlx::test(migrations = "../migrations")]
async fn counters_move_by_exactly_what_flowed(pool: PgPool) {
    let mut app = spawn_app(pool, 2).await;
    let http = reqwest::Client::new();
    // Three subscribers of the same trades: each event is read and dispatched
    // once, and delivered three times.
    const SUBSCRIBERS: usize = 3;
    let mut subs = Vec::new();
    for _ in 0..SUBSCRIBERS {
        subs.push(Subscription::start(&app.ws, false, AAPL_TRADES).await);
    }
    // Registered with the hub: everything dispatched from now on reaches them.
    scrape_until(&http, &app.api, "the subscriptions", |m| {
        get(m, "tickgraph_api_subscriptions{kind=\"trades\"}") == SUBSCRIBERS as f64
            && get(m, "tickgraph_api_connections{transport=\"ws\"}") == SUBSCRIBERS as f64
    })
    .await;
    // One Redis connection reads each shard for the whole api, whoever subscribes.
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut app.redis)
        .await
        .expect("CLIENT LIST");
    let mut readers: Vec<&str> = list
        .split_whitespace()
        .filter_map(|f| f.strip_prefix("name="))
        .filter(|n| n.starts_with(&format!("{}-hub-", app.layout.prefix())))
        .collect();
    readers.sort_unstable();
    let want: Vec<String> = (0..2)
        .map(|s| tickgraph_api::hub::reader_name(app.layout.prefix(), s))
        .collect();
    assert_eq!(readers, want, "one reader per shard: {list}");

    let mut events: Vec<Value> = (0..6)
        .map(|i| trade("oms", i, "AAPL", "XNAS", "101.5", "10", "buy"))
        .collect();
    // Valid by the contract, unknown to the reference data: enrich dead-letters them.
    events.push(trade("oms", 6, "ZZZZ", "XNAS", "1", "1", "sell"));
    events.push(quote("mm", 1, "ZZZZ", "XNAS", "1", "2"));
    // Refused at ingest, one of each kind.
    events.push(
        json!({"kind": "trade", "source": "oms", "seq": 7, "instrument": "AAPL",
                       "venue": "XNAS", "ts": now_ns(), "qty": "1", "side": "buy"}),
    );
    events.push(
        json!({"kind": "trade", "source": "oms", "seq": 8, "instrument": "AAPL",
                       "venue": "XNAS", "ts": now_ns(), "price": true, "qty": "1", "side": "buy"}),
    );
    events.push(trade("oms", 9, "AAPL", "XNAS", "-1", "1", "buy"));
    let answer = app.post_json(&json!(events)).await;
    assert_eq!(answer["accepted"], 8, "{answer}");

    for sub in &mut subs {
        for _ in 0..6 {
            assert_eq!(sub.next().await["trades"]["price"], "101.5");
        }
    }
    let m = scrape_until(&http, &app.api, "the events to pass every stage", |m| {
        get(m, "tickgraph_enrich_enriched_events_total") >= 6.0
            && get(m, "tickgraph_load_loaded_events_total") >= 6.0
            && get(m, "tickgraph_api_delivered_events_total") >= 18.0
            && get(
                m,
                "tickgraph_enrich_dead_letters_total{reason=\"unknown_instrument\"}",
            ) >= 2.0
    })
    .await;
    for (series, want) in [
        ("tickgraph_ingest_received_events_total", 11.0),
        ("tickgraph_ingest_accepted_events_total", 8.0),
        (
            "tickgraph_ingest_rejected_events_total{reason=\"missing_field\"}",
            1.0,
        ),
        (
            "tickgraph_ingest_rejected_events_total{reason=\"malformed\"}",
            1.0,
        ),
        (
            "tickgraph_ingest_rejected_events_total{reason=\"invalid_value\"}",
            1.0,
        ),
        ("tickgraph_ingest_refused_events_total", 0.0),
        ("tickgraph_enrich_enriched_events_total", 6.0),
        (
            "tickgraph_enrich_dead_letters_total{reason=\"unknown_instrument\"}",
            2.0,
        ),
        ("tickgraph_enrich_resent_events_total", 0.0),
        ("tickgraph_load_loaded_events_total", 6.0),
        // Once per subscriber.
        ("tickgraph_api_delivered_events_total", 18.0),
        ("tickgraph_api_conflated_events_total", 0.0),
        // Every event enrich took, once; every event the hub dispatched, once
        // (not once per subscriber).
        ("tickgraph_enrich_freshness_seconds_count", 8.0),
        ("tickgraph_api_freshness_seconds_count", 6.0),
        ("tickgraph_api_connections{transport=\"ws\"}", 3.0),
    ] {
        assert_eq!(get(&m, series), want, "{series} in {m:#?}");
    }
    for shard in 0..2 {
        for gauge in [
            "tickgraph_enrich_group_lag_entries",
            "tickgraph_enrich_group_pending_entries",
            "tickgraph_load_group_lag_entries",
            "tickgraph_load_group_pending_entries",
            "tickgraph_api_hub_behind_seconds",
        ] {
            let series = format!("{gauge}{{shard=\"{shard}\"}}");
            assert!(m.contains_key(&series), "no {series} in {m:#?}");
        }
    }
    assert!(get(&m, "tickgraph_enrich_freshness_seconds_sum") > 0.0);
    // One registry for the process: the ingest listener serves the same one.
    let on_ingest = scrape(&http, &app.ingest).await;
    assert_eq!(
        get(&on_ingest, "tickgraph_api_delivered_events_total"),
        18.0
    );

    drop(subs);
    scrape_until(&http, &app.api, "the connection to close", |m| {
        get(m, "tickgraph_api_connections{transport=\"ws\"}") == 0.0
    })
    .await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_running_pipeline_is_healthy_and_ready(pool: PgPool) {
    let app = spawn_app(pool, 2).await;
    let http = reqwest::Client::new();
    for base in [&app.api, &app.ingest] {
        let health = http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(health.status(), 200);
        assert_eq!(health.text().await.expect("body"), "ok");
        // Ready once every check passes; on a loaded machine a check can
        // miss its one-second bound for a while, so wait for it.
        let started = Instant::now();
        let body: Value = loop {
            let ready = http
                .get(format!("{base}/readyz"))
                .send()
                .await
                .expect("readyz");
            let status = ready.status();
            let body: Value = ready.json().await.expect("json");
            if status == 200 {
                break body;
            }
            assert_eq!(status, 503, "{body}");
            assert!(started.elapsed() < DEADLINE, "never ready: {body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(body["ready"], true, "{body}");
        let names: Vec<&str> = body["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        for name in ["ingest", "redis", "postgres", "hub", "enrich", "load"] {
            assert!(names.contains(&name), "no {name} check in {body}");
        }
        for check in body["checks"].as_array().expect("checks") {
            assert_eq!(check["status"], "ok", "{body}");
        }
    }
    app.stop().await;
}

/// A `tickgraph` process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(role: &str, redis_url: &str, db_url: &str, args: &[&str]) -> Proc {
    let child = Command::new(BIN)
        .args([
            "--redis-url",
            redis_url,
            "--database-url",
            db_url,
            "--dev-mode",
            role,
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tickgraph");
    Proc(child)
}

/// `/readyz` once `/healthz` answers: its status and body.
async fn readyz(http: &reqwest::Client, base: &str) -> (u16, Value) {
    let start = Instant::now();
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(start.elapsed() < DEADLINE, "{base} never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let res = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    let status = res.status().as_u16();
    (status, res.json().await.expect("json body"))
}

fn check<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name} check in {body}"))
}

/// Redis on a closed port: the loader and enrich are not ready (503, Redis
/// named as the reason); ingest stays ready, since it spools, and says Redis
/// is degraded.
#[sqlx::test(migrations = "../migrations")]
async fn readyz_names_redis_when_it_cannot_be_reached(pool: PgPool) {
    let db = shared_db(&pool).await;
    let closed = format!("redis://127.0.0.1:{}", free_port().expect("port"));
    let http = reqwest::Client::new();
    let spool = tempfile::tempdir().expect("tempdir");
    for role in ["load", "enrich"] {
        let port = free_port().expect("port");
        let _p = start(
            role,
            &closed,
            &db,
            &["--metrics-listen", &format!("127.0.0.1:{port}")],
        );
        let (status, body) = readyz(&http, &format!("http://127.0.0.1:{port}")).await;
        assert_eq!(status, 503, "{role}: {body}");
        assert_eq!(body["ready"], false);
        let redis = check(&body, "redis");
        assert_eq!(redis["status"], "failed", "{body}");
        assert!(
            redis["detail"]
                .as_str()
                .is_some_and(|d| d.contains("redis unreachable")),
            "{body}"
        );
        assert_eq!(check(&body, role)["status"], "failed", "{body}");
        assert_eq!(check(&body, "postgres")["status"], "ok", "{body}");
    }

    let port = free_port().expect("port");
    let _ingest = start(
        "ingest",
        &closed,
        &db,
        &[
            "--ingest-listen",
            &format!("127.0.0.1:{port}"),
            "--spool-dir",
            &spool.path().display().to_string(),
        ],
    );
    let (status, body) = readyz(&http, &format!("http://127.0.0.1:{port}")).await;
    assert_eq!(status, 200, "{body}");
    let ingest = check(&body, "ingest");
    assert_eq!(ingest["status"], "degraded", "{body}");
    assert!(
        ingest["detail"]
            .as_str()
            .is_some_and(|d| d.contains("redis unreachable")),
        "{body}"
    );
}

async fn connections_received(url: &str) -> u64 {
    let client = redis::Client::open(url).expect("url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut con)
        .await
        .expect("INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received")
}

/// `/metrics` and `/readyz` answer anyone, so a request must not cost a Redis
/// connection: 200 at once on both listeners of `tickgraph all` (every check:
/// ingest, Redis, the hub, both groups' lag), against a Redis of its own so
/// that only the pipeline's connections count, open none.
#[sqlx::test(migrations = "../migrations")]
async fn scrapes_open_no_redis_connection(pool: PgPool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis =
        tickgraph_ingest::test_support::LocalRedis::start(dir.path(), None).expect("redis-server");
    let app = spawn_app_on(pool, 2, &redis.url(), |_| {}).await;
    let http = reqwest::Client::new();
    // The checks' connection is made on their first round.
    readyz(&http, &app.ingest).await;
    let before = connections_received(&redis.url()).await;
    let requests = (0..50).flat_map(|_| {
        [&app.ingest, &app.api].into_iter().flat_map(|base| {
            ["/metrics", "/readyz"].map(|path| {
                let req = http.get(format!("{base}{path}"));
                async move { req.send().await.map(|r| r.status().as_u16()) }
            })
        })
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert_eq!(statuses.len(), 200);
    for s in &statuses {
        assert!(matches!(s, Ok(200 | 503)), "{s:?}");
    }
    let opened = connections_received(&redis.url()).await - before;
    // One: the connection that asked.
    assert_eq!(opened, 1, "200 scrapes opened {opened} Redis connections");
    app.stop().await;
}

/// Redis up: the standalone loader is ready, and serves its own metrics.
#[sqlx::test(migrations = "../migrations")]
async fn a_standalone_worker_is_ready_and_serves_its_metrics(pool: PgPool) {
    let db = shared_db(&pool).await;
    let http = reqwest::Client::new();
    let port = free_port().expect("port");
    let prefix = format!("readyz{}", rand::random::<u32>());
    let _load = start(
        "load",
        &redis_url(),
        &db,
        &[
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
            "--stream-prefix",
            &prefix,
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    let body = loop {
        // The group is created once the loader has connected.
        let (status, body) = readyz(&http, &base).await;
        if status == 200 {
            break body;
        }
        assert!(start.elapsed() < DEADLINE, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(check(&body, "load")["status"], "ok", "{body}");
    let m = scrape(&http, &base).await;
    assert_eq!(get(&m, "tickgraph_load_loaded_events_total"), 0.0);
    assert!(
        m.contains_key("tickgraph_load_group_lag_entries{shard=\"0\"}"),
        "{m:#?}"
    );
    drop(_load);
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(&mut con).await;
    }
}
