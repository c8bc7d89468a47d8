//! Starts the real API (the same `Api::build` + `serve` as production) on port 0
//! against real Redis and the test's own Postgres database, and talks to it
//! through its front door: reqwest for HTTP, tokio-tungstenite for WebSocket.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;
use tickgraph_api::{Api, ApiConfig};
use tickgraph_enrich::record::{Derived, EnrichedRecord};
use tickgraph_enrich::refdata::{AssetClass, RefCache};
use tickgraph_ingest::event::{Header, Mic, Source, Symbol};
use tickgraph_ingest::stream::{shard_of, StreamLayout};
use tickgraph_ingest::{Event, Quote, Side, Timestamp, Trade};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// The Redis the tests use: `TG_TEST_REDIS_URL`, as `.ci/run` sets it.
pub fn redis_url() -> String {
    std::env::var("TG_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}
/// Upper bound on waiting for something that should happen; reaching it fails the
/// test instead of hanging it. Never an assertion on speed.
pub const PATIENCE: Duration = Duration::from_secs(15);
/// 2024-11-25T15:53:20Z in epoch nanoseconds.
pub const T0: i64 = 1_732_550_000_000_000_000;

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal literal")
}

/// Reference data every test starts with.
pub async fn seed_refdata(pool: &PgPool) {
    sqlx::raw_sql(
        "INSERT INTO venues (mic, name, country, timezone) VALUES
             ('XNAS', 'Nasdaq', 'US', 'America/New_York'),
             ('XNYS', 'New York Stock Exchange', 'US', 'America/New_York'),
             ('XLON', 'London Stock Exchange', 'GB', 'Europe/London');
         INSERT INTO instruments (symbol, name, asset_class, currency, venue, tick_size, lot_size, sector, isin) VALUES
             ('AAPL', 'Apple Inc.', 'equity', 'USD', 'XNAS', 0.01, 1, 'Technology', 'US0378331005'),
             ('MSFT', 'Microsoft Corporation', 'equity', 'USD', 'XNAS', 0.01, 1, 'Technology', 'US5949181045'),
             ('SPY', 'SPDR S&P 500 ETF Trust', 'etf', 'USD', 'XNYS', 0.01, 1, NULL, NULL),
             ('VOD.L', 'Vodafone Group', 'equity', 'GBP', 'XLON', 0.02, 1, 'Telecommunications', NULL),
             ('BP.L', 'BP plc', 'equity', 'GBP', 'XLON', 0.05, 1, 'Energy', NULL);
         INSERT INTO accounts (id, desk, owner) VALUES
             ('ACC-1', 'equities', 'alice'),
             ('ACC-2', 'equities', 'bob'),
             ('ACC-3', 'etf', 'carol');
         INSERT INTO fx_rates (currency, usd_rate) VALUES ('USD', 1), ('GBP', 1.27);",
    )
    .execute(pool)
    .await
    .expect("seed reference data");
}

fn asset_class(symbol: &str) -> AssetClass {
    if symbol == "SPY" {
        AssetClass::Etf
    } else {
        AssetClass::Equity
    }
}

fn currency(symbol: &str) -> &'static str {
    if symbol.ends_with(".L") {
        "GBP"
    } else {
        "USD"
    }
}

fn header(instrument: &str, venue: &str, seq: u64, ts_ns: i64) -> Header {
    Header {
        source: Source::parse("test-feed").expect("source"),
        seq,
        instrument: Symbol::parse(instrument).expect("symbol"),
        venue: Mic::parse(venue).expect("mic"),
        ts: Timestamp::from_nanos(ts_ns).expect("ts"),
    }
}

pub fn trade(instrument: &str, venue: &str, seq: u64, ts_ns: i64, side: Side) -> EnrichedRecord {
    let (price, qty) = (d("101.25"), d("10"));
    EnrichedRecord {
        event: Event::Trade(Trade {
            header: header(instrument, venue, seq, ts_ns),
            price,
            qty,
            side,
            trade_id: Some(
                tickgraph_ingest::event::TradeId::parse(&format!("T{seq}")).expect("id"),
            ),
            account: None,
        }),
        ingest_ns: ts_ns + 1_000,
        enriched_ns: ts_ns + 2_000,
        asset_class: asset_class(instrument),
        currency: currency(instrument).into(),
        derived: Derived::Trade {
            notional: price * qty,
            notional_usd: price * qty,
        },
    }
}

pub fn quote(instrument: &str, venue: &str, seq: u64, ts_ns: i64, bid: &str) -> EnrichedRecord {
    let (bid, ask) = (d(bid), d(bid) + d("0.02"));
    EnrichedRecord {
        event: Event::Quote(Quote {
            header: header(instrument, venue, seq, ts_ns),
            bid,
            ask,
            bid_size: d("100"),
            ask_size: d("200"),
        }),
        ingest_ns: ts_ns + 1_000,
        enriched_ns: ts_ns + 2_000,
        asset_class: asset_class(instrument),
        currency: currency(instrument).into(),
        derived: Derived::Quote {
            mid: (bid + ask) / d("2"),
            spread: ask - bid,
        },
    }
}

/// Deletes the test's stream keys even when the test panics.
struct KeyGuard {
    client: redis::Client,
    keys: Vec<String>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Ok(mut con) = self.client.get_connection() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&self.keys).query(&mut con);
        }
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub api: Api,
    pub layout: StreamLayout,
    pub http: reqwest::Client,
    redis: redis::aio::MultiplexedConnection,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _keys: KeyGuard,
}

pub async fn spawn_app(pool: PgPool) -> TestApp {
    spawn_app_with(pool, 2, |_| {}).await
}

/// Seeds reference data and starts the API on a stream prefix of its own.
pub async fn spawn_app_with(
    pool: PgPool,
    shards: u16,
    tweak: impl FnOnce(&mut ApiConfig),
) -> TestApp {
    seed_refdata(&pool).await;
    let layout = StreamLayout::new(format!("t{}", rand::random::<u64>()), shards);
    let client = redis::Client::open(redis_url()).expect("redis url");
    let keys = KeyGuard {
        client: client.clone(),
        keys: layout.shard_ids().map(|s| layout.enriched(s)).collect(),
    };
    let mut cfg = ApiConfig::new(layout.clone());
    tweak(&mut cfg);
    let conn = cfg.conn;
    let refs = RefCache::load(&pool).await.expect("load reference data");
    let shutdown = CancellationToken::new();
    let api = Api::build(cfg, client.clone(), pool.clone(), refs, shutdown.clone())
        .await
        .expect("build api");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(tickgraph_api::serve(
        listener,
        api.router(),
        conn,
        tickgraph_ingest::listener::ConnMetrics::new("api"),
        shutdown.clone(),
    ));
    let redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    TestApp {
        addr,
        api,
        layout,

        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client"),
        redis,
        shutdown,
        server,
        _keys: keys,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs a GraphQL request and returns the whole response body.
    pub async fn post(&self, query: &str, variables: Value) -> Value {
        let resp = self
            .http
            .post(self.url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .expect("POST /graphql");
        resp.json().await.expect("JSON body")
    }

    /// POSTs a query that must succeed and returns its `data`.
    pub async fn data(&self, query: &str, variables: Value) -> Value {
        let body = self.post(query, variables).await;
        assert!(body.get("errors").is_none(), "unexpected errors: {body}");
        body["data"].clone()
    }

    /// XADDs each record to the enriched stream of its instrument's shard, as a
    /// batch entry of one, and returns each event's cursor (`<shard>:<id>.0`).
    pub async fn publish(&mut self, records: &[EnrichedRecord]) -> Vec<String> {
        let mut pipe = redis::pipe();
        let mut shards = Vec::new();
        for r in records {
            let shard = shard_of(r.event.header().instrument.as_str(), self.layout.shards());
            shards.push(shard);
            pipe.cmd("XADD")
                .arg(self.layout.enriched(shard))
                .arg("*")
                .arg("e")
                .arg(EnrichedRecord::encode_batch(std::slice::from_ref(r)).expect("encode record"));
        }
        let ids: Vec<String> = pipe.query_async(&mut self.redis).await.expect("XADD");
        shards
            .into_iter()
            .zip(ids)
            .map(|(s, id)| format!("{s}:{id}.0"))
            .collect()
    }

    /// Waits until the hub has `n` live subscriptions: a subscription is only
    /// registered once the server has processed the subscribe message.
    pub async fn wait_for_subscribers(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.api.hub().subscribers() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "hub has {} subscribers, expected {n}",
                self.api.hub().subscribers()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Opens a WebSocket to `/graphql/ws` offering `protocols`; returns the socket
    /// and the protocol the server chose.
    pub async fn ws(&self, protocols: &str) -> (Ws, Option<String>) {
        let mut req = format!("ws://{}/graphql/ws", self.addr)
            .into_client_request()
            .expect("ws request");
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            protocols.parse().expect("header value"),
        );
        let (socket, resp) = tokio_tungstenite::connect_async(req)
            .await
            .expect("WebSocket connect");
        let chosen = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (Ws { socket }, chosen)
    }

    /// Cancels shutdown and waits for the server and the hub to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.server)
            .await
            .expect("server stops after shutdown")
            .expect("server task")
            .expect("server result");
        tokio::time::timeout(PATIENCE, self.api.stopped())
            .await
            .expect("hub stops after shutdown");
    }
}

pub struct Ws {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn send(&mut self, msg: Value) {
        self.socket
            .send(Message::Text(msg.to_string().into()))
            .await
            .expect("send WebSocket message");
    }

    /// The next JSON text message; `None` once the server closed the socket.
    pub async fn recv(&mut self) -> Option<Value> {
        loop {
            let next = tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("a WebSocket message in time");
            match next {
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(&t).expect("JSON message"))
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next message, which must exist.
    pub async fn expect(&mut self) -> Value {
        self.recv().await.expect("the server closed the WebSocket")
    }

    /// The socket itself, for messages that are not JSON text.
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.socket
    }
}
