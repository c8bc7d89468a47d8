//! Starting a pipeline for a test, and the clients that talk to it.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use tickgraph_api::pipeline::{Pipeline, PipelineConfig, PipelineError};
use tickgraph_api::ApiConfig;
use tickgraph_enrich::loader::LoadConfig;
use tickgraph_enrich::refdata::RefCache;
use tickgraph_enrich::worker::EnrichConfig;
use tickgraph_ingest::server::IngestConfig;
use tickgraph_ingest::StreamLayout;

/// Generous bound for anything asynchronous to show up; never a speed check.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn redis_url() -> String {
    std::env::var("TG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A small, known reference data set.
pub async fn seed_refdata(pool: &PgPool) {
    sqlx::raw_sql(
        "INSERT INTO venues (mic, name, country, timezone) VALUES
            ('XNAS', 'Nasdaq', 'US', 'America/New_York'),
            ('ARCX', 'NYSE Arca', 'US', 'America/New_York'),
            ('XLON', 'London Stock Exchange', 'GB', 'Europe/London');
         INSERT INTO instruments (symbol, name, asset_class, currency, venue, tick_size, lot_size, sector) VALUES
            ('AAPL', 'Apple Inc.', 'equity', 'USD', 'XNAS', 0.01, 1, 'Technology'),
            ('MSFT', 'Microsoft Corp.', 'equity', 'USD', 'XNAS', 0.01, 1, 'Technology'),
            ('SPY', 'SPDR S&P 500 ETF', 'etf', 'USD', 'ARCX', 0.01, 1, NULL),
            ('VOD.L', 'Vodafone Group', 'equity', 'GBP', 'XLON', 0.02, 1, 'Telecom');
         INSERT INTO accounts (id, desk, owner) VALUES ('ACC-1', 'equities', 'alice');
         INSERT INTO fx_rates (currency, usd_rate) VALUES ('USD', 1), ('GBP', 1.25);",
    )
    .execute(pool)
    .await
    .expect("seed reference data");
}

pub struct TestApp {
    pub ingest: String,
    pub api: String,
    pub ws: String,
    pub layout: StreamLayout,
    pub pool: PgPool,
    pub redis: redis::aio::MultiplexedConnection,
    pub http: reqwest::Client,
    pub hub: tickgraph_api::Hub,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), PipelineError>>,
}

/// Starts the whole pipeline on port 0 with its own stream prefix; `tweak` may
/// change the configuration first.
pub async fn spawn_app_with(
    pool: PgPool,
    shards: u16,
    tweak: impl FnOnce(&mut PipelineConfig),
) -> TestApp {
    spawn_app_on(pool, shards, &redis_url(), tweak).await
}

/// [`spawn_app_with`] against the Redis at `redis_url`.
pub async fn spawn_app_on(
    pool: PgPool,
    shards: u16,
    redis_url: &str,
    tweak: impl FnOnce(&mut PipelineConfig),
) -> TestApp {
    seed_refdata(&pool).await;
    let layout = StreamLayout::new(format!("e2e{}", rand::random::<u64>()), shards);
    let shutdown = CancellationToken::new();
    let refs = RefCache::load(&pool).await.expect("load refdata");
    refs.spawn_listener(pool.clone(), shutdown.clone());
    let mut enrich = EnrichConfig::new(layout.clone(), "e2e-enrich");
    enrich.claim_idle = Duration::from_secs(2);
    let mut load = LoadConfig::new(layout.clone(), "e2e-load");
    load.claim_idle = Duration::from_secs(2);
    let mut cfg = PipelineConfig {
        ingest: IngestConfig::new(layout.clone()),
        ingest_listen: "127.0.0.1:0".parse().expect("addr"),
        enrich,
        load,
        api: ApiConfig::new(layout.clone()),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        ready: Default::default(),
    };
    tweak(&mut cfg);
    let client = redis::Client::open(redis_url).expect("redis url");
    let redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let pipeline = Pipeline::start(cfg, client, pool.clone(), refs, shutdown.clone())
        .await
        .expect("pipeline starts");
    let (ingest, api) = (pipeline.ingest_addr, pipeline.api_addr);
    let hub = pipeline.hub.clone();
    TestApp {
        ingest: format!("http://{ingest}"),
        api: format!("http://{api}"),
        ws: format!("ws://{api}/graphql/ws"),
        layout,
        pool,
        redis,
        http: reqwest::Client::new(),
        hub,
        shutdown,
        task: tokio::spawn(pipeline.wait()),
    }
}

pub async fn spawn_app(pool: PgPool, shards: u16) -> TestApp {
    spawn_app_with(pool, shards, |_| {}).await
}

impl TestApp {
    /// Posts a batch and returns the status and the JSON answer.
    pub async fn post(&self, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let res = self
            .http
            .post(format!("{}/v1/events", self.ingest))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("ingest answers");
        let status = res.status().as_u16();
        let body = res.json::<Value>().await.expect("JSON answer");
        (status, body)
    }

    pub async fn post_json(&self, events: &Value) -> Value {
        let (status, answer) = self
            .post(
                "application/json",
                serde_json::to_vec(events).expect("json"),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// Runs a GraphQL query over HTTP and returns `data`, failing on errors.
    pub async fn query(&self, query: &str, variables: Value) -> Value {
        let answer = self.query_raw(query, variables).await;
        assert!(answer.get("errors").is_none(), "GraphQL errors: {answer}");
        answer["data"].clone()
    }

    pub async fn query_raw(&self, query: &str, variables: Value) -> Value {
        self.http
            .post(format!("{}/graphql", self.api))
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .expect("api answers")
            .json::<Value>()
            .await
            .expect("JSON answer")
    }

    /// Reads a whole stream as (id, field map) pairs.
    pub async fn xrange(
        &mut self,
        key: &str,
    ) -> Vec<(String, std::collections::HashMap<String, Vec<u8>>)> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut self.redis)
            .await
            .expect("xrange");
        reply
            .ids
            .into_iter()
            .map(|e| {
                let fields = e
                    .map
                    .into_iter()
                    .filter_map(|(k, v)| match v {
                        redis::Value::BulkString(b) => Some((k, b)),
                        _ => None,
                    })
                    .collect();
                (e.id, fields)
            })
            .collect()
    }

    /// Polls `f` until it returns Some, or fails after [`DEADLINE`].
    pub async fn eventually<T>(
        &mut self,
        what: &str,
        mut f: impl AsyncFnMut(&mut Self) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self).await {
                return v;
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn history_count(&self, table: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Stops the pipeline (as SIGTERM would) and removes the test's streams.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(DEADLINE, self.task).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.layout.prefix()))
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut self.redis)
                .await;
        }
        let result = stopped
            .expect("pipeline stops within the deadline")
            .expect("no panic");
        result.expect("pipeline stopped cleanly");
    }
}

pub fn now_ns() -> i64 {
    tickgraph_ingest::event::now_nanos()
}

pub fn trade(
    source: &str,
    seq: u64,
    instrument: &str,
    venue: &str,
    price: &str,
    qty: &str,
    side: &str,
) -> Value {
    json!({"kind": "trade", "source": source, "seq": seq, "instrument": instrument, "venue": venue,
           "ts": now_ns(), "price": price, "qty": qty, "side": side})
}

pub fn quote(source: &str, seq: u64, instrument: &str, venue: &str, bid: &str, ask: &str) -> Value {
    json!({"kind": "quote", "source": source, "seq": seq, "instrument": instrument, "venue": venue,
           "ts": now_ns(), "bid": bid, "ask": ask, "bid_size": "100", "ask_size": "200"})
}

/// A quote as a MessagePack producer would send it (serde_json::Value cannot be
/// used: under arbitrary_precision its numbers encode as maps).
#[derive(Serialize)]
pub struct MsgQuote<'a> {
    pub kind: &'a str,
    pub source: &'a str,
    pub seq: u64,
    pub instrument: &'a str,
    pub venue: &'a str,
    pub ts: i64,
    pub bid: f64,
    pub ask: &'a str,
    pub bid_size: u32,
    pub ask_size: u32,
}

pub fn msgpack_quotes(quotes: &[MsgQuote<'_>]) -> Vec<u8> {
    rmp_serde::to_vec_named(quotes).expect("msgpack")
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A GraphQL subscription over a real WebSocket, in either protocol.
pub struct Subscription {
    ws: Ws,
    legacy: bool,
}

impl Subscription {
    /// `legacy` picks subscriptions-transport-ws (`graphql-ws`) instead of
    /// graphql-transport-ws.
    pub async fn start(url: &str, legacy: bool, query: &str) -> Self {
        let mut req = url.into_client_request().expect("ws request");
        let proto = if legacy {
            "graphql-ws"
        } else {
            "graphql-transport-ws"
        };
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", proto.parse().expect("header"));
        let (mut ws, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("ws connects");
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some(proto)
        );
        let send = |v: Value| Message::Text(v.to_string().into());
        ws.send(send(json!({"type": "connection_init", "payload": {}})))
            .await
            .expect("init");
        loop {
            let msg = next_json(&mut ws).await;
            match msg["type"].as_str() {
                Some("connection_ack") => break,
                Some("ka") => continue,
                other => panic!("expected connection_ack, got {other:?}: {msg}"),
            }
        }
        let start = if legacy { "start" } else { "subscribe" };
        ws.send(send(
            json!({"id": "1", "type": start, "payload": {"query": query}}),
        ))
        .await
        .expect("subscribe");
        Self { ws, legacy }
    }

    /// The next `data` payload, or None if nothing arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, next_json(&mut self.ws))
                .await
                .ok()?;
            match (msg["type"].as_str(), self.legacy) {
                (Some("next"), false) | (Some("data"), true) => {
                    assert!(
                        msg["payload"].get("errors").is_none(),
                        "subscription error: {msg}"
                    );
                    return Some(msg["payload"]["data"].clone());
                }
                (Some("ka" | "ping" | "pong"), _) => continue,
                _ => panic!("unexpected subscription message: {msg}"),
            }
        }
    }

    pub async fn next(&mut self) -> Value {
        self.next_within(DEADLINE)
            .await
            .expect("a subscription event within the deadline")
    }
}

impl Payloads for Subscription {
    fn next_payload(&mut self) -> impl std::future::Future<Output = Option<Value>> + Send + '_ {
        self.next_within(DEADLINE)
    }
}

/// A subscription read one `data` payload at a time, whatever the transport.
pub trait Payloads: Send + Sized + 'static {
    /// The next payload; None when the subscription is over or nothing came
    /// within [`DEADLINE`].
    fn next_payload(&mut self) -> impl std::future::Future<Output = Option<Value>> + Send + '_;

    /// Reads on in a task of its own, handing over each payload as it
    /// arrives, with its arrival time; stops when the receiver is dropped.
    fn forward(mut self) -> Arrivals {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    v = self.next_payload() => {
                        let Some(v) = v else { return };
                        if tx.send((Instant::now(), v)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        rx
    }
}

/// A subscription's `data` payloads as they arrive, each with its arrival time.
pub type Arrivals = tokio::sync::mpsc::UnboundedReceiver<(Instant, Value)>;

/// The `maxRate` of the conflated subscription [`conflation_holds`] checks.
pub const CONFLATED_RATE: u32 = 2;
/// What the subscriptions [`conflation_holds`] checks select. It also posts
/// quotes of SPY, which neither may receive.
pub const CONFLATED_INSTRUMENTS: [&str; 2] = ["AAPL", "MSFT"];

/// The `seq` of an event as the API sends it (a string of digits).
pub fn seq_of(v: &Value) -> u64 {
    v["seq"].as_str().and_then(|s| s.parse().ok()).expect("seq")
}

/// One quote a subscription received: when, its instrument and seq.
type Got = (Instant, String, u64);

/// Takes the `quotes` of source `mm` from `rx` into `got` until `done` holds
/// (skipping probes), failing after [`DEADLINE`].
async fn quotes_until(rx: &mut Arrivals, got: &mut Vec<Got>, done: impl Fn(&[Got]) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done(got) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, v) = tokio::time::timeout(left, rx.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("timed out; received so far: {got:?}"));
        let q = &v["quotes"];
        if q["source"] != "mm" {
            continue;
        }
        let seq = seq_of(q);
        let instrument = q["instrument"].as_str().expect("instrument").to_owned();
        got.push((at, instrument, seq));
    }
}

/// The last seq of `instrument` in `got`.
fn last_of(got: &[Got], instrument: &str) -> Option<u64> {
    got.iter()
        .rev()
        .find(|(_, i, _)| i == instrument)
        .map(|(_, _, s)| *s)
}

/// `maxRate` with a filter, whatever the transport: `conflated` is
/// `quotes(instruments: CONFLATED_INSTRUMENTS, maxRate: CONFLATED_RATE)` and
/// `every` the same without `maxRate`, both live (selecting `source seq
/// instrument`). Posts four phases of quotes of AAPL, MSFT and SPY (three
/// batches 100 ms apart, ten of each instrument per batch), and checks:
/// - `every` receives every quote of AAPL and MSFT, in order, and no SPY;
/// - `conflated` receives no SPY, and per instrument only ever a newer value;
/// - after each phase, `conflated` comes to the latest value of each
///   instrument: it is never left on a stale one, and the rate applies per
///   instrument (a single limit, or a single latest value, for the whole
///   subscription would hold one of them back);
/// - per instrument, `conflated` receives at most `CONFLATED_RATE + 1` quotes
///   in any second (sends are `1 / CONFLATED_RATE` apart; one that arrives
///   late may bunch with the next), where the phases post 100 of each.
pub async fn conflation_holds(app: &TestApp, mut conflated: Arrivals, mut every: Arrivals) {
    let mut seq = 0u64;
    let mut posted: Vec<(&str, u64)> = Vec::new();
    let (mut got_every, mut got_conflated) = (Vec::new(), Vec::new());
    for _phase in 0..4 {
        for _batch in 0..3 {
            let mut quotes = Vec::new();
            for _ in 0..10 {
                for sym in ["AAPL", "MSFT", "SPY"] {
                    seq += 1;
                    posted.push((sym, seq));
                    quotes.push(quote(
                        "mm",
                        seq,
                        sym,
                        "XNAS",
                        &format!("100.{seq:05}"),
                        "101",
                    ));
                }
            }
            assert_eq!(app.post_json(&json!(quotes)).await["accepted"], 30);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let latest: Vec<(&str, u64)> = CONFLATED_INSTRUMENTS
            .iter()
            .map(|sym| {
                let last = posted.iter().rev().find(|(s, _)| s == sym).map(|(_, q)| *q);
                (*sym, last.expect("posted"))
            })
            .collect();
        let caught_up = |got: &[Got]| latest.iter().all(|(s, q)| last_of(got, s) == Some(*q));
        quotes_until(&mut every, &mut got_every, caught_up).await;
        quotes_until(&mut conflated, &mut got_conflated, caught_up).await;
    }
    // Nothing newer was posted: anything more is a repeat, or SPY.
    while let Ok((_, v)) = every.try_recv().or_else(|_| conflated.try_recv()) {
        assert_ne!(v["quotes"]["source"], "mm", "after the latest: {v}");
    }

    for sym in CONFLATED_INSTRUMENTS {
        let want: Vec<u64> = posted
            .iter()
            .filter(|(s, _)| *s == sym)
            .map(|(_, q)| *q)
            .collect();
        let every_got: Vec<u64> = got_every
            .iter()
            .filter(|(_, s, _)| s == sym)
            .map(|(_, _, q)| *q)
            .collect();
        assert_eq!(
            every_got, want,
            "without maxRate every {sym} quote, in order"
        );

        let conflated_got: Vec<&Got> = got_conflated.iter().filter(|(_, s, _)| s == sym).collect();
        let seqs: Vec<u64> = conflated_got.iter().map(|(_, _, q)| *q).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{sym}: never an older value after a newer one: {seqs:?}"
        );
        let burst = CONFLATED_RATE as usize + 1;
        for w in conflated_got.windows(burst + 1) {
            let (first, last) = (w[0].0, w[burst].0);
            assert!(
                last.duration_since(first) >= Duration::from_secs(1),
                "{sym}: {} quotes within {:?} at maxRate {CONFLATED_RATE}: {seqs:?}",
                burst + 1,
                last.duration_since(first)
            );
        }
    }
    for (_, sym, q) in got_every.iter().chain(&got_conflated) {
        assert!(
            CONFLATED_INSTRUMENTS.contains(&sym.as_str()),
            "{sym} {q} is outside the filter"
        );
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.expect("socket open").expect("socket ok") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON message"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}
