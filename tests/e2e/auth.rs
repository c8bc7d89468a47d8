//! Who may send and who may see, through the real front doors: producer
//! tokens and the sources they own, per-producer rate limits, user JWTs
//! (HS256, RS256 from a JWK Set) over HTTP, WebSocket `connection_init` and
//! SSE, entitlements on subscriptions, latest values and history, token
//! expiry, and the per-user and per-connection limits.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sqlx::PgPool;
use tickgraph_api::auth::{Authenticator, JwtConfig, UserLimits};
use tickgraph_api::pipeline::PipelineConfig;
use tickgraph_ingest::producers::{token_sha256, Producers};

use crate::helpers::*;
use crate::protocol::{connect, recv, send, Ws};

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes!";
pub(crate) const PRODUCER_TOKEN: &str = "producer-token-of-feed-a";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/auth"
    ))
    .join(name)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A user token signed with the HS256 secret.
pub(crate) fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign HS256")
}

/// A user token signed with the test RSA key, naming its JWK Set `kid`.
fn rs256(claims: Value) -> String {
    let pem = std::fs::read(fixture("test-only-rs256.key.pem")).expect("test key");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-key-1".into());
    encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(&pem).expect("RSA key"),
    )
    .expect("sign RS256")
}

/// Claims of `sub` valid for `secs`, with these entitlements.
pub(crate) fn claims(sub: &str, secs: u64, venues: Value, asset_classes: Value) -> Value {
    json!({"sub": sub, "exp": now_secs() + secs, "venues": venues, "asset_classes": asset_classes})
}

/// The pipeline with producer tokens and JWT users; `tweak` adjusts limits.
pub(crate) async fn secured(
    pool: PgPool,
    tweak: impl FnOnce(&mut PipelineConfig),
) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("hs256.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("write secret");
    let producers = format!(
        r#"{{"producers": [
            {{"name": "feed-a", "token_sha256": "{}", "sources": ["feed-a"]}},
            {{"name": "slow", "token_sha256": "{}", "sources": ["slow"], "max_events_per_sec": 5}}
        ]}}"#,
        token_sha256(PRODUCER_TOKEN),
        token_sha256("slow-token"),
    );
    let auth = Authenticator::jwt(&JwtConfig {
        hs256_secret_file: Some(secret),
        jwks_file: Some(fixture("test-only-jwks.json")),
        leeway: Duration::ZERO,
        ..JwtConfig::default()
    })
    .expect("JWT keys load");
    // One shard: every event in one stream, so its order is the order posted.
    let app = spawn_app_with(pool, 1, move |cfg| {
        cfg.ingest.producers = Producers::parse(producers.as_bytes()).expect("producers");
        cfg.api.auth = auth;
        tweak(cfg);
    })
    .await;
    (app, dir)
}

impl TestApp {
    pub(crate) async fn post_as(&self, token: Option<&str>, events: &Value) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("{}/v1/events", self.ingest))
            .json(events);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("ingest answers")
    }

    pub(crate) async fn graphql_as(&self, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.http.post(format!("{}/graphql", self.api)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.expect("api answers");
        let status = res.status().as_u16();
        (status, res.json().await.expect("JSON answer"))
    }

    async fn query_as(&self, token: &str, query: &str) -> Value {
        let (status, body) = self
            .graphql_as(Some(token), json!({ "query": query }))
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("errors").is_none(), "GraphQL errors: {body}");
        body["data"].clone()
    }
}

/// A graphql-transport-ws connection initialised with `payload`; the first
/// answer: `Ok(connection_ack)` or `Err(close code and reason)`.
async fn init(app: &TestApp, payload: Value) -> (Ws, Result<Value, (u16, String)>) {
    let mut ws = connect(&app.ws, "graphql-transport-ws").await;
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": payload}),
    )
    .await;
    let first = recv(&mut ws).await;
    (ws, first)
}

pub(crate) async fn ws_as(app: &TestApp, token: &str) -> Ws {
    let (ws, first) = init(app, json!({"Authorization": format!("Bearer {token}")})).await;
    let ack = first.expect("connection_ack");
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    ws
}

/// The next message that is not a ping or pong.
async fn next_message(ws: &mut Ws) -> Result<Value, (u16, String)> {
    loop {
        let m = recv(ws).await?;
        if !matches!(m["type"].as_str(), Some("ping" | "pong")) {
            return Ok(m);
        }
    }
}

/// The instrument of a `quotes { instrument }` subscription message.
fn instrument_of(m: &Value) -> String {
    assert_eq!(m["type"], "next", "{m}");
    m["payload"]["data"]["quotes"]["instrument"]
        .as_str()
        .unwrap_or_else(|| panic!("no instrument in {m}"))
        .to_owned()
}

#[sqlx::test(migrations = "../migrations")]
async fn producers_need_their_token_and_may_only_claim_their_sources(pool: PgPool) {
    let (mut app, _dir) = secured(pool, |_| {}).await;
    let good = quote("feed-a", 1, "AAPL", "XNAS", "100.00", "100.02");
    let batch = json!([good]);

    let missing = app.post_as(None, &batch).await;
    assert_eq!(missing.status(), 401);
    assert!(missing.headers().contains_key("www-authenticate"));
    let body: Value = missing.json().await.expect("JSON");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("missing credentials"),
        "{body}"
    );
    let wrong = app.post_as(Some("not-a-token"), &batch).await;
    assert_eq!(wrong.status(), 401);
    let body: Value = wrong.json().await.expect("JSON");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("unknown producer token"),
        "{body}"
    );

    // A source the token does not own: that event is refused with the reason
    // and dead-lettered; the others of the batch are taken.
    let mixed = json!([
        quote("feed-a", 2, "AAPL", "XNAS", "100.00", "100.02"),
        quote("feed-b", 1, "AAPL", "XNAS", "100.00", "100.02"),
    ]);
    let res = app.post_as(Some(PRODUCER_TOKEN), &mixed).await;
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.expect("JSON");
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 1, "{answer}");
    let reason = answer["rejected"][0]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("\"feed-b\"") && reason.contains("feed-a"),
        "{reason}"
    );
    let dlq = app
        .eventually("the refused event in the dead-letter stream", async |app| {
            let key = app.layout.ingest_dlq();
            let entries = app.xrange(&key).await;
            (!entries.is_empty()).then_some(entries)
        })
        .await;
    assert_eq!(dlq.len(), 1);
    let reason = dlq[0]
        .1
        .get("reason")
        .map(|r| String::from_utf8_lossy(r).into_owned());
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("feed-b")),
        "{reason:?}"
    );

    // The streaming connection checks the token on the upgrade.
    let url = app.ingest.replacen("http", "ws", 1) + "/v1/stream";
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401)
        }
        other => panic!("expected 401 on the upgrade, got {:?}", other.map(|_| ())),
    }
    app.stop().await;
}

/// 5 events per second. A batch that does not fit is refused whole and told
/// when it will; one larger than a second's worth fits once the bucket is
/// full, instead of never.
#[sqlx::test(migrations = "../migrations")]
async fn a_producer_over_its_rate_is_told_when_to_retry_and_nothing_is_taken(pool: PgPool) {
    let (mut app, _dir) = secured(pool, |_| {}).await;
    let quotes: Vec<Value> = (1..=11)
        .map(|seq| quote("slow", seq, "AAPL", "XNAS", "100.00", "100.02"))
        .collect();
    let five = json!(quotes[..5]);
    let six = json!(quotes[5..]);
    let res = app.post_as(Some("slow-token"), &five).await;
    assert_eq!(res.status(), 200);
    let res = app.post_as(Some("slow-token"), &six).await;
    assert_eq!(res.status(), 429);
    let retry_after: u64 = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    let body: Value = res.json().await.expect("JSON");
    assert!(
        body["error"].as_str().unwrap_or("").contains("rate limit"),
        "{body}"
    );
    // Waiting as told is enough, though six is more than a second's worth.
    tokio::time::sleep(std::time::Duration::from_secs(retry_after)).await;
    let res = app.post_as(Some("slow-token"), &six).await;
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await.expect("JSON");
    assert_eq!(answer["accepted"], 6, "{answer}");
    // Exactly the eleven reach history: the refused attempt left nothing.
    app.eventually("eleven quotes", async |app| {
        let n = app.history_count("quotes").await;
        (n == 11).then_some(())
    })
    .await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn users_need_a_valid_token_over_http(pool: PgPool) {
    let (app, _dir) = secured(pool, |_| {}).await;
    let q = json!({"query": "{ venues { mic } }"});

    let (status, body) = app.graphql_as(None, q.clone()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED",
        "{body}"
    );

    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims("mallory", 60, json!("*"), json!("*")),
        &EncodingKey::from_secret(b"some-other-secret-of-32-bytes-or-more"),
    )
    .expect("sign");
    let (status, body) = app.graphql_as(Some(&forged), q.clone()).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap_or("")
        .contains("invalid token"));

    let expired =
        hs256(json!({"sub": "alice", "exp": now_secs() - 5, "venues": "*", "asset_classes": "*"}));
    let (status, body) = app.graphql_as(Some(&expired), q.clone()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "TOKEN_EXPIRED",
        "{body}"
    );

    // Both key kinds are accepted: HS256 by secret, RS256 by the set's `kid`.
    for token in [
        hs256(claims("alice", 60, json!("*"), json!("*"))),
        rs256(claims("bob", 60, json!("*"), json!("*"))),
    ] {
        let data = app.query_as(&token, "{ venues { mic } }").await;
        assert_eq!(data["venues"].as_array().map(Vec::len), Some(3), "{data}");
    }
    // An RS256 token naming a key the set does not hold is refused.
    let pem = std::fs::read(fixture("test-only-rs256.key.pem")).expect("test key");
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("unknown-kid".into());
    let unknown = encode(
        &header,
        &claims("bob", 60, json!("*"), json!("*")),
        &EncodingKey::from_rsa_pem(&pem).expect("key"),
    )
    .expect("sign");
    let (status, _) = app.graphql_as(Some(&unknown), q).await;
    assert_eq!(status, 401);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn websocket_init_without_a_valid_token_is_closed_4403(pool: PgPool) {
    let (app, _dir) = secured(pool, |_| {}).await;
    let (_ws, first) = init(&app, json!({})).await;
    let (code, reason) = first.expect_err("closed");
    assert_eq!(code, 4403, "{reason}");
    assert!(reason.contains("missing credentials"), "{reason}");

    let (_ws, first) = init(&app, json!({"Authorization": "Bearer nope"})).await;
    let (code, reason) = first.expect_err("closed");
    assert_eq!(code, 4403, "{reason}");
    assert!(reason.contains("invalid token"), "{reason}");

    // `token` is accepted as well as `Authorization`.
    let token = hs256(claims("alice", 60, json!("*"), json!("*")));
    let (_ws, first) = init(&app, json!({ "token": token })).await;
    assert_eq!(first.expect("ack")["type"], "connection_ack");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_user_never_receives_an_event_outside_their_entitlements(pool: PgPool) {
    let (mut app, _dir) = secured(pool, |_| {}).await;
    // Entitled to Nasdaq only; AAPL trades there, VOD.L in London.
    let nasdaq = hs256(claims("nasdaq-user", 300, json!(["XNAS"]), json!("*")));
    let everything = rs256(claims("admin", 300, json!("*"), json!("*")));

    let mut restricted = ws_as(&app, &nasdaq).await;
    send(
        &mut restricted,
        json!({"id": "all", "type": "subscribe",
        "payload": {"query": "subscription { quotes { instrument } }"}}),
    )
    .await;
    send(
        &mut restricted,
        json!({"id": "vod", "type": "subscribe",
        "payload": {"query": "subscription { quotes(instruments: [\"VOD.L\"]) { instrument } }"}}),
    )
    .await;
    send(
        &mut restricted,
        json!({"id": "xlon", "type": "subscribe",
        "payload": {"query": "subscription { quotes(venues: [\"XLON\"]) { instrument } }"}}),
    )
    .await;
    let mut full = ws_as(&app, &everything).await;
    send(
        &mut full,
        json!({"id": "all", "type": "subscribe",
        "payload": {"query": "subscription { quotes { instrument } }"}}),
    )
    .await;
    app.eventually("four subscriptions", async |app| {
        (app.hub.subscribers() == 4).then_some(())
    })
    .await;

    let mut events = Vec::new();
    for seq in 1..=10u64 {
        let (instrument, venue) = if seq % 2 == 0 {
            ("VOD.L", "XLON")
        } else {
            ("AAPL", "XNAS")
        };
        events.push(quote("feed-a", seq, instrument, venue, "100.5", "100.52"));
    }
    // The last one after every London quote, on the one shard: once the
    // restricted subscriber has it, it has been offered everything before it.
    events.push(quote("feed-a", 11, "AAPL", "XNAS", "101.25", "101.27"));
    let res = app.post_as(Some(PRODUCER_TOKEN), &json!(events)).await;
    assert_eq!(res.status(), 200);

    let mut seen_full = Vec::new();
    while seen_full.len() < 11 {
        seen_full.push(instrument_of(
            &next_message(&mut full).await.expect("message"),
        ));
    }
    assert_eq!(seen_full.iter().filter(|i| *i == "VOD.L").count(), 5);

    let mut seen = Vec::new();
    while seen.len() < 6 {
        let m = next_message(&mut restricted).await.expect("message");
        assert_eq!(
            m["id"], "all",
            "only the unrestricted filter may deliver: {m}"
        );
        seen.push(instrument_of(&m));
    }
    assert!(seen.iter().all(|i| i == "AAPL"), "{seen:?}");

    // Latest values and history: what the user may see, or nothing.
    app.eventually("history loaded", async |app| {
        (app.history_count("quotes").await == 11).then_some(())
    })
    .await;
    let q = r#"{ latestQuote(instrument: "VOD.L") { bid }
                 aapl: latestQuote(instrument: "AAPL") { bid }
                 quotes(instrument: "VOD.L") { edges { node { bid } } }
                 snapshot(instruments: ["VOD.L", "AAPL"], at: "2100-01-01T00:00:00Z") { instrument quote { bid } } }"#;
    let data = app.query_as(&nasdaq, q).await;
    assert_eq!(data["latestQuote"], Value::Null, "{data}");
    assert_eq!(data["aapl"]["bid"], "101.25", "{data}");
    assert_eq!(
        data["quotes"]["edges"].as_array().map(Vec::len),
        Some(0),
        "{data}"
    );
    assert_eq!(data["snapshot"][0]["quote"], Value::Null, "{data}");
    assert_eq!(data["snapshot"][1]["quote"]["bid"], "101.25", "{data}");
    let data = app.query_as(&everything, q).await;
    assert_eq!(data["latestQuote"]["bid"], "100.5", "{data}");
    assert_eq!(
        data["quotes"]["edges"].as_array().map(Vec::len),
        Some(5),
        "{data}"
    );

    // A snapshot subscription starts from the visible instruments only.
    let mut snap = ws_as(&app, &nasdaq).await;
    send(
        &mut snap,
        json!({"id": "s", "type": "subscribe",
        "payload": {"query": "subscription { quotes(snapshot: true) { instrument } }"}}),
    )
    .await;
    let first = next_message(&mut snap).await.expect("snapshot");
    assert_eq!(instrument_of(&first), "AAPL");

    // A token without entitlements sees no market data at all.
    let nothing = hs256(json!({"sub": "nobody", "exp": now_secs() + 60}));
    let data = app
        .query_as(&nothing, r#"{ latestQuote(instrument: "AAPL") { bid } }"#)
        .await;
    assert_eq!(data["latestQuote"], Value::Null, "{data}");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn an_expired_token_ends_its_subscriptions_with_a_reason(pool: PgPool) {
    let (app, _dir) = secured(pool, |_| {}).await;
    let short = hs256(claims("alice", 2, json!("*"), json!("*")));
    let mut ws = ws_as(&app, &short).await;
    send(
        &mut ws,
        json!({"id": "1", "type": "subscribe",
        "payload": {"query": "subscription { quotes { instrument } }"}}),
    )
    .await;

    let sse = app
        .http
        .post(format!("{}/graphql/stream", app.api))
        .header("accept", "text/event-stream")
        .bearer_auth(&short)
        .json(&json!({"query": "subscription { trades { instrument } }"}))
        .send()
        .await
        .expect("SSE answers");
    assert_eq!(sse.status(), 200);

    let (code, reason) = loop {
        match recv(&mut ws).await {
            Ok(m) => assert!(matches!(m["type"].as_str(), Some("ping" | "pong")), "{m}"),
            Err(closed) => break closed,
        }
    };
    assert_eq!(code, 4403, "{reason}");
    assert!(reason.contains("token expired"), "{reason}");

    let mut sse = sse;
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, sse.chunk())
        .await
        .expect("SSE chunk in time")
        .expect("SSE body")
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("TOKEN_EXPIRED"), "{text}");
    assert!(
        text.trim_end().ends_with("event: complete\ndata:"),
        "{text}"
    );
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn per_user_and_per_connection_limits_refuse_with_clear_errors(pool: PgPool) {
    let (mut app, _dir) = secured(pool, |cfg| {
        cfg.api.users = UserLimits {
            max_connections: 2,
            requests_per_sec: 3.0,
            ..UserLimits::default()
        };
        cfg.api.ws.max_subscriptions = 2;
    })
    .await;
    let alice = hs256(claims("alice", 300, json!("*"), json!("*")));
    let bob = hs256(claims("bob", 300, json!("*"), json!("*")));

    // Requests: a batch of four is more than three a second can ever take,
    // so it is told so, not to retry.
    let batch = |n: usize| -> Value {
        json!((0..n)
            .map(|_| json!({"query": "{ venues { mic } }"}))
            .collect::<Vec<_>>())
    };
    let (status, body) = app.graphql_as(Some(&alice), batch(4)).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "BATCH_TOO_LARGE",
        "{body}"
    );
    // Three fit, once; then the second's worth is spent.
    let carol = hs256(claims("carol", 300, json!("*"), json!("*")));
    let (status, body) = app.graphql_as(Some(&carol), batch(3)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.graphql_as(Some(&carol), batch(1)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "RATE_LIMITED",
        "{body}"
    );
    // Limits are per user: bob is untouched.
    app.query_as(&bob, "{ venues { mic } }").await;

    // Connections: alice may hold two; a third is closed, bob's is not.
    let mut first = ws_as(&app, &alice).await;
    let _second = ws_as(&app, &alice).await;
    let (_third, answer) = init(&app, json!({"Authorization": format!("Bearer {alice}")})).await;
    let (code, reason) = answer.expect_err("closed");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too many connections"), "{reason}");
    let _bobs = ws_as(&app, &bob).await;

    // Subscriptions per connection: the third gets `error`, the socket stays.
    for id in ["a", "b", "c"] {
        send(
            &mut first,
            json!({"id": id, "type": "subscribe",
            "payload": {"query": "subscription { quotes { instrument } }"}}),
        )
        .await;
    }
    let refused = next_message(&mut first).await.expect("error message");
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["id"], "c", "{refused}");
    assert_eq!(
        refused["payload"][0]["extensions"]["code"],
        "TOO_MANY_SUBSCRIPTIONS"
    );
    send(&mut first, json!({"id": "x", "type": "ping"})).await;
    assert_eq!(next_message_any(&mut first).await["type"], "pong");

    // A closed connection gives its place back.
    drop(first);
    app.eventually("alice's connection released", async |app| {
        let (_ws, answer) = init(app, json!({"Authorization": format!("Bearer {alice}")})).await;
        answer.ok().filter(|m| m["type"] == "connection_ack")
    })
    .await;
    app.stop().await;
}

/// The error code of a refused subscription: graphql-transport-ws sends
/// `error`, the legacy protocol `data` with the errors (then `complete`).
async fn refusal_code(ws: &mut Ws, id: &str) -> String {
    let answer = async {
        loop {
            let m = next_message(ws).await.expect("an answer");
            if !matches!(m["type"].as_str(), Some("ka" | "complete")) {
                return m;
            }
        }
    };
    let m = tokio::time::timeout(DEADLINE, answer)
        .await
        .unwrap_or_else(|_| panic!("subscription {id} was not refused in time"));
    assert_eq!(m["id"], id, "{m}");
    let errors = match m["type"].as_str() {
        Some("error") => &m["payload"],
        Some("data" | "next") => &m["payload"]["errors"],
        _ => panic!("expected a refusal, got {m}"),
    };
    errors[0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code in {m}"))
        .to_owned()
}

/// Everything an SSE stream sends, to its end.
async fn sse_text(app: &TestApp, token: &str, query: &str) -> String {
    let mut sse = app
        .http
        .post(format!("{}/graphql/stream", app.api))
        .header("accept", "text/event-stream")
        .bearer_auth(token)
        .json(&json!({ "query": query }))
        .send()
        .await
        .expect("SSE answers");
    assert_eq!(sse.status(), 200);
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, sse.chunk())
        .await
        .expect("SSE chunk in time")
        .expect("SSE body")
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

/// One user's live subscriptions, and the filter values they name, are
/// bounded over all its connections and transports, whatever each connection
/// holds: the memory one user can make the api hold.
#[sqlx::test(migrations = "../migrations")]
async fn a_users_subscriptions_are_bounded_over_all_its_connections_and_transports(pool: PgPool) {
    let (mut app, _dir) = secured(pool, |cfg| {
        cfg.api.users = UserLimits {
            max_subscriptions: 3,
            max_filter_values: 6,
            ..UserLimits::default()
        };
    })
    .await;
    let alice = hs256(claims("alice", 300, json!("*"), json!("*")));
    let bob = hs256(claims("bob", 300, json!("*"), json!("*")));
    let subscribe =
        |id: &str, query: &str| json!({"id": id, "type": "subscribe", "payload": {"query": query}});
    let live = async |app: &mut TestApp, n: usize| {
        app.eventually(&format!("{n} live subscriptions"), async |app| {
            (app.hub.subscribers() == n).then_some(())
        })
        .await
    };

    // Two on one connection, planned and executed, one value each.
    let mut first = ws_as(&app, &alice).await;
    send(
        &mut first,
        subscribe(
            "a",
            "subscription { quotes(instruments: [\"AAPL\"]) { bid } }",
        ),
    )
    .await;
    send(
        &mut first,
        subscribe(
            "b",
            "subscription { trades(venues: [\"XNAS\"]) { ... on Trade { id } } }",
        ),
    )
    .await;
    live(&mut app, 2).await;
    // The third on a legacy connection of its own.
    let mut legacy = connect(&app.ws, "graphql-ws").await;
    send(
        &mut legacy,
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {alice}")}}),
    )
    .await;
    assert_eq!(
        next_message(&mut legacy).await.expect("ack")["type"],
        "connection_ack"
    );
    send(&mut legacy, json!({"id": "c", "type": "start", "payload": {"query": "subscription { quotes(instruments: [\"MSFT\"]) { bid } }"}})).await;
    live(&mut app, 3).await;

    // A fourth is refused on every transport, each connection far below its own limit.
    let quotes = "subscription { quotes(instruments: [\"SPY\"]) { bid } }";
    send(&mut first, subscribe("d", quotes)).await;
    assert_eq!(
        refusal_code(&mut first, "d").await,
        "TOO_MANY_SUBSCRIPTIONS"
    );
    send(
        &mut legacy,
        json!({"id": "e", "type": "start", "payload": {"query": quotes}}),
    )
    .await;
    assert_eq!(
        refusal_code(&mut legacy, "e").await,
        "TOO_MANY_SUBSCRIPTIONS"
    );
    let text = sse_text(&app, &alice, quotes).await;
    assert!(
        text.contains("\"code\":\"TOO_MANY_SUBSCRIPTIONS\""),
        "{text}"
    );
    assert!(
        text.contains("at most 3 at once over all its connections"),
        "{text}"
    );
    assert_eq!(app.hub.subscribers(), 3);
    // Limits are per user: bob is served.
    let mut bobs = ws_as(&app, &bob).await;
    send(&mut bobs, subscribe("b1", quotes)).await;
    live(&mut app, 4).await;

    // An ended subscription gives its place back, and so does a closed connection.
    send(&mut first, json!({"id": "a", "type": "complete"})).await;
    live(&mut app, 3).await;
    // Values: two are named; five more would pass six.
    let five = "subscription { quotes(instruments: [\"AAPL\", \"MSFT\", \"SPY\"], venues: [\"XNAS\", \"XLON\"]) { bid } }";
    send(&mut first, subscribe("f", five)).await;
    assert_eq!(
        refusal_code(&mut first, "f").await,
        "TOO_MANY_FILTER_VALUES"
    );
    let four = "subscription { quotes(instruments: [\"AAPL\", \"MSFT\"], venues: [\"XNAS\", \"XLON\"]) { bid } }";
    send(&mut first, subscribe("g", four)).await;
    live(&mut app, 4).await;
    drop(legacy);
    live(&mut app, 3).await;
    send(&mut first, subscribe("h", quotes)).await;
    live(&mut app, 4).await;
    app.stop().await;
}

/// The next message, pings included.
async fn next_message_any(ws: &mut Ws) -> Value {
    recv(ws).await.expect("message")
}

/// What one transport made of a token.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// It served the user.
    Served,
    /// It refused with this message (HTTP and SSE: 401; WebSocket: 4403).
    Refused(String),
}

impl Verdict {
    fn refused_saying(&self, words: &str) -> bool {
        matches!(self, Verdict::Refused(m) if m.contains(words))
    }
}

/// `token` over HTTP, graphql-transport-ws, the legacy graphql-ws and SSE, in
/// that order. A transport that neither serves nor refuses cleanly (a dropped
/// connection, another status or close code) fails the test.
async fn everywhere(app: &TestApp, token: &str) -> [Verdict; 4] {
    let (status, body) = app
        .graphql_as(Some(token), json!({"query": "{ venues { mic } }"}))
        .await;
    let http = match status {
        200 if body["data"]["venues"].is_array() => Verdict::Served,
        401 => Verdict::Refused(body["errors"][0]["message"].as_str().unwrap_or("").into()),
        _ => panic!("HTTP answered {status}: {body}"),
    };

    let mut ws = [Verdict::Served, Verdict::Served];
    for (verdict, (protocol, start)) in ws.iter_mut().zip([
        ("graphql-transport-ws", "subscribe"),
        ("graphql-ws", "start"),
    ]) {
        let mut socket = connect(&app.ws, protocol).await;
        send(
            &mut socket,
            json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}}),
        )
        .await;
        match recv(&mut socket).await {
            Ok(m) if m["type"] == "connection_ack" => {
                // The connection goes on serving once its expiry is armed.
                send(
                    &mut socket,
                    json!({"id": "q", "type": start, "payload": {"query": "{ venues { mic } }"}}),
                )
                .await;
                loop {
                    match recv(&mut socket).await {
                        Ok(m) if matches!(m["type"].as_str(), Some("next" | "data")) => {
                            assert!(m["payload"]["data"]["venues"].is_array(), "{m}");
                            break;
                        }
                        Ok(m) if matches!(m["type"].as_str(), Some("ka" | "ping" | "pong")) => {}
                        other => panic!("{protocol}: expected the query's result, got {other:?}"),
                    }
                }
            }
            Err((4403, reason)) => *verdict = Verdict::Refused(reason),
            other => panic!("{protocol}: expected connection_ack or 4403, got {other:?}"),
        }
    }

    let mut sse = app
        .http
        .post(format!("{}/graphql/stream", app.api))
        .header("accept", "text/event-stream")
        .bearer_auth(token)
        .json(&json!({"query": "subscription { quotes { instrument } }"}))
        .send()
        .await
        .expect("SSE answers");
    let sse = match sse.status().as_u16() {
        200 => {
            let first = tokio::time::timeout(DEADLINE, sse.chunk())
                .await
                .expect("the stream opens in time")
                .expect("SSE body");
            assert!(first.is_some(), "the stream ended at once");
            Verdict::Served
        }
        401 => {
            let body: Value = sse.json().await.expect("JSON refusal");
            Verdict::Refused(body["errors"][0]["message"].as_str().unwrap_or("").into())
        }
        other => panic!("SSE answered {other}"),
    };
    let [transport_ws, legacy] = ws;
    [http, transport_ws, legacy, sse]
}

#[sqlx::test(migrations = "../migrations")]
async fn a_configured_issuer_and_audience_are_required_on_every_transport(pool: PgPool) {
    const ISSUER: &str = "https://idp.example";
    const AUDIENCE: &str = "tickgraph";
    let (app, _dir) = secured(pool, |cfg| {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("hs256.secret");
        std::fs::write(&secret, SECRET).expect("write secret");
        cfg.api.auth = Authenticator::jwt(&JwtConfig {
            hs256_secret_file: Some(secret),
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            ..JwtConfig::default()
        })
        .expect("JWT keys load");
    })
    .await;
    let token = |sub: &str, iss: Option<&str>, aud: Option<&str>| {
        let mut c = claims(sub, 300, json!("*"), json!("*"));
        if let Some(iss) = iss {
            c["iss"] = iss.into();
        }
        if let Some(aud) = aud {
            c["aud"] = aud.into();
        }
        hs256(c)
    };

    let good = token("alice", Some(ISSUER), Some(AUDIENCE));
    assert_eq!(
        everywhere(&app, &good).await,
        [const { Verdict::Served }; 4]
    );
    for (sub, iss, aud, says) in [
        ("no-iss", None, Some(AUDIENCE), "`iss` is missing"),
        ("no-aud", Some(ISSUER), None, "`aud` is missing"),
        ("neither", None, None, "is missing"),
        (
            "wrong-iss",
            Some("https://evil.example"),
            Some(AUDIENCE),
            "`iss`",
        ),
        ("wrong-aud", Some(ISSUER), Some("another-service"), "`aud`"),
    ] {
        for (transport, verdict) in ["HTTP", "graphql-transport-ws", "graphql-ws", "SSE"]
            .into_iter()
            .zip(everywhere(&app, &token(sub, iss, aud)).await)
        {
            assert!(
                verdict.refused_saying(says),
                "{sub} over {transport}: expected a refusal saying {says:?}, got {verdict:?}"
            );
        }
    }
    app.stop().await;
}

/// Every numeric claim the server reads, and `iat` which it does not, at the
/// extremes of what JSON can write: each token is served or refused cleanly,
/// alike on every transport, and the server goes on serving.
#[sqlx::test(migrations = "../migrations")]
async fn numeric_claims_at_their_extremes_are_served_or_refused_on_every_transport(pool: PgPool) {
    let (app, _dir) = secured(pool, |_| {}).await;
    let later = format!("{}.5", now_secs() + 300);
    let extremes = [
        "0",
        "-1",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "1e300",
        "-1e300",
        later.as_str(),
    ];
    for (claim, served) in [
        // Past 9999 the expiry is kept as then; a fraction is refused, as
        // jsonwebtoken reads only whole seconds.
        ("exp", &["9223372036854775808", "18446744073709551615"][..]),
        ("nbf", &["0"][..]),
        ("iat", &extremes[..]),
    ] {
        for (n, literal) in extremes.iter().enumerate() {
            let sub = format!("{claim}-{n}");
            let mut c = claims(&sub, 300, json!("*"), json!("*"));
            c[claim] = serde_json::from_str(literal).expect("a JSON number");
            let verdicts = everywhere(&app, &hs256(c)).await;
            for (transport, verdict) in ["HTTP", "graphql-transport-ws", "graphql-ws", "SSE"]
                .into_iter()
                .zip(verdicts)
            {
                if served.contains(literal) {
                    assert_eq!(
                        verdict,
                        Verdict::Served,
                        "{claim}: {literal} over {transport}"
                    );
                } else {
                    assert!(
                        verdict.refused_saying(claim) || verdict.refused_saying("token expired"),
                        "{claim}: {literal} over {transport}: expected a refusal naming it, got {verdict:?}"
                    );
                }
            }
        }
    }
    let fine = hs256(claims("after", 300, json!("*"), json!("*")));
    assert_eq!(
        everywhere(&app, &fine).await,
        [const { Verdict::Served }; 4]
    );
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn an_admin_sees_only_the_dead_letters_of_its_venues(pool: PgPool) {
    let (mut app, _dir) = secured(pool, |_| {}).await;
    let bad = |seq: u64, venue: Option<&str>| {
        let mut e = json!({"kind": "quote", "source": "feed-a", "seq": seq,
                           "instrument": "AAPL", "bid": true});
        if let Some(v) = venue {
            e["venue"] = v.into();
        }
        e
    };
    // Unknown instruments (enrich's letters, the event as accepted), invalid
    // events (ingest's, as sent), and one whose venue nobody can tell.
    let batch = json!([
        quote("feed-a", 1, "NEWCO", "XNAS", "10.00", "10.02"),
        quote("feed-a", 2, "NEWCO.L", "XLON", "10.00", "10.02"),
        bad(3, Some("XNAS")),
        bad(4, Some("XLON")),
        bad(5, None),
    ]);
    let res = app.post_as(Some(PRODUCER_TOKEN), &batch).await;
    assert_eq!(res.status(), 200);
    app.eventually("five dead letters", async |app| {
        let mut n = 0;
        for key in app.layout.all_dlqs() {
            n += app.xrange(&key).await.len();
        }
        (n == 5).then_some(())
    })
    .await;

    let admin = |sub: &str, venues: Value| {
        hs256(
            json!({"sub": sub, "exp": now_secs() + 300, "venues": venues,
                     "asset_classes": "*", "roles": ["admin"]}),
        )
    };
    let list =
        json!({"query": "{ deadLetters(first: 50) { items { stage payload } hasNextPage } }"});
    let listed = async |token: &str| {
        let (status, body) = app.graphql_as(Some(token), list.clone()).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("errors").is_none(), "{body}");
        body
    };

    let everything = listed(&admin("ops", json!("*"))).await;
    assert_eq!(
        everything["data"]["deadLetters"]["items"]
            .as_array()
            .map(Vec::len),
        Some(5),
        "{everything}"
    );
    let nasdaq = listed(&admin("ops-ny", json!(["XNAS"]))).await;
    let items = nasdaq["data"]["deadLetters"]["items"]
        .as_array()
        .expect("items");
    let mut stages: Vec<&str> = items.iter().filter_map(|i| i["stage"].as_str()).collect();
    stages.sort_unstable();
    assert_eq!(stages, ["enrich", "ingest"], "{nasdaq}");
    assert!(
        items
            .iter()
            .all(|i| i["payload"].as_str().unwrap_or("").contains("XNAS")),
        "{nasdaq}"
    );
    // Not a byte of another venue's letters.
    let text = nasdaq.to_string();
    assert!(
        !text.contains("XLON") && !text.contains("NEWCO.L"),
        "{text}"
    );
    // No `venues` claim: no venue, so no letters.
    let none = hs256(json!({"sub": "ops-none", "exp": now_secs() + 300, "roles": ["admin"]}));
    let nothing = listed(&none).await;
    assert_eq!(
        nothing["data"]["deadLetters"]["items"],
        json!([]),
        "{nothing}"
    );

    // Replay acts on letters an admin of some venues has not seen.
    let replay =
        json!({"query": "mutation { replayDeadLetters(all: true, dryRun: true) { wouldReplay } }"});
    let (status, body) = app
        .graphql_as(Some(&admin("ops-ny", json!(["XNAS"]))), replay.clone())
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], Value::Null, "{body}");
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "FORBIDDEN",
        "{body}"
    );
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("every venue"),
        "{body}"
    );
    let (_, body) = app
        .graphql_as(Some(&admin("ops", json!("*"))), replay)
        .await;
    assert_eq!(
        body["data"]["replayDeadLetters"]["wouldReplay"], 2,
        "{body}"
    );
    app.stop().await;
}
