//! The WebSocket protocols over real sockets: graphql-transport-ws's close codes,
//! pings both ways and operation errors; the legacy protocol's `ka`, `data` and
//! `stop`; and a client that stops reading, which is closed as a slow consumer
//! (4008) while a reading client on the same events gets every one, and a
//! conflated client that stops reading is not closed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::helpers::*;

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Probe events posted, each waited on for a moment, before a subscription
/// that has not gone live fails its test (as `screens::until_live` does).
const PROBES: u64 = 200;

pub(crate) async fn connect(url: &str, protocol: &str) -> Ws {
    let mut req = url.into_client_request().expect("ws request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("ws connects");
    ws
}

pub(crate) async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

/// The next text message as JSON, or the close code and reason.
pub(crate) async fn recv(ws: &mut Ws) -> Result<Value, (u16, String)> {
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a message within the deadline");
        match m {
            Some(Ok(Message::Text(t))) => {
                return Ok(serde_json::from_str(t.as_str()).expect("JSON message"))
            }
            Some(Ok(Message::Close(Some(f)))) => {
                return Err((u16::from(f.code), f.reason.to_string()))
            }
            Some(Ok(Message::Close(None))) | None => return Err((1005, String::new())),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error: {e}"),
        }
    }
}

/// Reads until the server closes; returns the close code and reason.
async fn closed(ws: &mut Ws) -> (u16, String) {
    loop {
        match recv(ws).await {
            Ok(_) => continue,
            Err(c) => return c,
        }
    }
}

/// The next message other than the server's keep-alive `ping`, which can come
/// at any time, failing at `until`: the pings alone would keep [`recv`] from
/// ever timing out.
async fn recv_not_ping(ws: &mut Ws, until: tokio::time::Instant, what: &str) -> Value {
    loop {
        let m = tokio::time::timeout_at(until, recv(ws))
            .await
            .unwrap_or_else(|_| panic!("only pings until the deadline, waiting for {what}"))
            .unwrap_or_else(|c| panic!("closed waiting for {what}: {c:?}"));
        if m["type"] != "ping" {
            return m;
        }
    }
}

pub(crate) async fn init(ws: &mut Ws) {
    send(ws, json!({"type": "connection_init"})).await;
    loop {
        match recv(ws).await.expect("ack") {
            m if m["type"] == "connection_ack" => return,
            m if m["type"] == "ka" => continue,
            m => panic!("expected connection_ack, got {m}"),
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn graphql_transport_ws_breaches_close_with_the_spec_codes(pool: PgPool) {
    let app = spawn_app_with(pool, 1, |c| {
        c.api.ws.init_timeout = Duration::from_millis(300);
    })
    .await;
    let proto = "graphql-transport-ws";
    let sub =
        |id: &str, query: &str| json!({"id": id, "type": "subscribe", "payload": {"query": query}});
    let quotes = "subscription { quotes(instruments: [\"AAPL\"]) { seq } }";

    let mut ws = connect(&app.ws, proto).await;
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(
        (code, reason.as_str()),
        (4408, "Connection initialisation timeout")
    );

    let mut ws = connect(&app.ws, proto).await;
    send(&mut ws, sub("1", quotes)).await;
    assert_eq!(closed(&mut ws).await, (4401, "Unauthorized".into()));

    for bad in [
        Message::Text("{not json".into()),
        Message::Text(json!({"type": "bogus"}).to_string().into()),
        Message::Text(
            json!({"type": "subscribe", "payload": {"query": quotes}})
                .to_string()
                .into(),
        ),
        Message::Text(
            json!({"type": "subscribe", "id": "1", "payload": 7})
                .to_string()
                .into(),
        ),
    ] {
        let mut ws = connect(&app.ws, proto).await;
        init(&mut ws).await;
        ws.send(bad.clone()).await.expect("send");
        let (code, reason) = closed(&mut ws).await;
        assert_eq!(code, 4400, "{bad:?} got {code} {reason}");
    }

    let mut ws = connect(&app.ws, proto).await;
    init(&mut ws).await;
    send(&mut ws, json!({"type": "connection_init"})).await;
    assert_eq!(
        closed(&mut ws).await,
        (4429, "Too many initialisation requests".into())
    );

    let mut ws = connect(&app.ws, proto).await;
    init(&mut ws).await;
    send(&mut ws, sub("a", quotes)).await;
    send(&mut ws, sub("a", quotes)).await;
    assert_eq!(
        closed(&mut ws).await,
        (4409, "Subscriber for a already exists".into())
    );
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn graphql_transport_ws_pings_errors_and_completes(pool: PgPool) {
    let app = spawn_app_with(pool, 1, |c| {
        c.api.ws.keepalive = Some(Duration::from_millis(200));
    })
    .await;
    let mut ws = connect(&app.ws, "graphql-transport-ws").await;
    init(&mut ws).await;
    let deadline = || tokio::time::Instant::now() + DEADLINE;

    // The server's keep-alive ping, then our ping answered.
    assert_eq!(recv(&mut ws).await.expect("ping")["type"], "ping");
    send(&mut ws, json!({"type": "pong"})).await;
    send(&mut ws, json!({"type": "ping"})).await;
    let m = recv_not_ping(&mut ws, deadline(), "pong").await;
    assert_eq!(m["type"], "pong", "{m}");

    // An operation the server refuses: `error` with its id, and no `complete`;
    // the id is free again at once.
    send(
        &mut ws,
        json!({"id": "x", "type": "subscribe", "payload": {"query": "subscription { quotes { nope } }"}}),
    )
    .await;
    let err = recv_not_ping(&mut ws, deadline(), "error").await;
    assert_eq!(
        (err["type"].as_str(), err["id"].as_str()),
        (Some("error"), Some("x")),
        "{err}"
    );
    assert!(
        err["payload"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{err}"
    );

    // A query over the socket: `next` then `complete`.
    send(
        &mut ws,
        json!({"id": "x", "type": "subscribe", "payload": {"query": "{ fxRates { currency } }"}}),
    )
    .await;
    let mut kinds = Vec::new();
    let until = deadline();
    while kinds.last() != Some(&"complete".to_string()) {
        let m = recv_not_ping(&mut ws, until, "result").await;
        assert_eq!(m["id"], "x", "{m}");
        kinds.push(m["type"].as_str().expect("type").to_owned());
    }
    assert_eq!(kinds, ["next", "complete"]);

    // A subscription the client completes gets nothing more, and no echo. A
    // witness on the same socket with the same filter stays: once it has an
    // event published after the `complete`, so would the completed one have.
    let quotes = json!({"query": "subscription { quotes { seq source } }"});
    for id in ["s", "w"] {
        send(
            &mut ws,
            json!({"id": id, "type": "subscribe", "payload": quotes}),
        )
        .await;
    }
    let mut seq = 0u64;
    let mut live = HashSet::new();
    for _ in 0..PROBES {
        if live.len() == 2 {
            break;
        }
        seq += 1;
        app.post_json(&json!([quote("p", seq, "AAPL", "XNAS", "1", "2")]))
            .await;
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(m) = tokio::time::timeout_at(until, recv(&mut ws)).await {
            let m = m.expect("open");
            if m["type"] == "next" {
                live.insert(m["id"].as_str().expect("id").to_owned());
            }
        }
    }
    assert_eq!(live.len(), 2, "only {live:?} went live");
    send(&mut ws, json!({"id": "s", "type": "complete"})).await;
    // The server handles a socket's messages in order: once our ping is
    // answered, it has dropped `s`, and whatever `s` had sent is before the pong.
    send(&mut ws, json!({"type": "ping"})).await;
    let until = deadline();
    loop {
        let m = recv_not_ping(&mut ws, until, "pong").await;
        if m["type"] == "pong" {
            break;
        }
        assert_eq!(m["type"], "next", "{m}");
    }
    seq += 1;
    app.post_json(&json!([quote("p", seq, "AAPL", "XNAS", "1", "2")]))
        .await;
    let is_last = |m: &Value| m["payload"]["data"]["quotes"]["seq"] == json!(seq.to_string());
    let mut after_complete = Vec::new();
    let until = deadline();
    loop {
        let m = recv_not_ping(&mut ws, until, "the witness's quote").await;
        let witnessed = m["id"] == "w" && is_last(&m);
        after_complete.push(m);
        if witnessed {
            break;
        }
    }
    // Anything else already on its way. (A deadline, not a quiet spell: the
    // pings come more often than that.)
    let until = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(m) = tokio::time::timeout_at(until, recv(&mut ws)).await {
        let m = m.expect("open");
        if m["type"] != "ping" {
            after_complete.push(m);
        }
    }
    assert!(
        after_complete.iter().all(|m| m["id"] != "s"),
        "after complete: {after_complete:?}"
    );

    // The client closes: the server answers the closing handshake.
    ws.close(None).await.expect("close sent");
    loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("an answer")
        {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("no closing handshake: {e}"),
        }
    }
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn the_legacy_protocol_keeps_alive_sends_data_and_stops(pool: PgPool) {
    let app = spawn_app_with(pool, 1, |c| {
        c.api.ws.keepalive = Some(Duration::from_millis(200));
    })
    .await;
    let mut ws = connect(&app.ws, "graphql-ws").await;
    send(&mut ws, json!({"type": "connection_init", "payload": {}})).await;
    assert_eq!(recv(&mut ws).await.expect("ack")["type"], "connection_ack");
    assert_eq!(recv(&mut ws).await.expect("ka")["type"], "ka");
    assert_eq!(
        recv(&mut ws).await.expect("ka")["type"],
        "ka",
        "periodic ka"
    );
    send(
        &mut ws,
        json!({"id": "1", "type": "start", "payload": {"query": "subscription { quotes { seq } }"}}),
    )
    .await;
    let data = 'live: {
        for seq in 1..=PROBES {
            app.post_json(&json!([quote("p", seq, "AAPL", "XNAS", "1", "2")]))
                .await;
            match tokio::time::timeout(Duration::from_millis(500), recv(&mut ws)).await {
                Ok(Ok(m)) if m["type"] == "data" => break 'live m,
                _ => continue,
            }
        }
        panic!("the subscription never went live");
    };
    assert_eq!(data["id"], "1");
    assert!(
        data["payload"]["data"]["quotes"]["seq"].is_string(),
        "{data}"
    );
    send(&mut ws, json!({"id": "1", "type": "stop"})).await;
    loop {
        let m = recv(&mut ws).await.expect("complete");
        if m["type"] == "complete" {
            assert_eq!(m["id"], "1");
            break;
        }
        assert!(m["type"] == "data" || m["type"] == "ka", "{m}");
    }
    send(&mut ws, json!({"type": "connection_terminate"})).await;
    assert_eq!(closed(&mut ws).await.0, 1000);
    app.stop().await;
}

/// A WebSocket whose client-side receive buffer is tiny, so that a client that
/// stops reading fills up fast.
async fn connect_small_window(app: &TestApp) -> Ws {
    let addr: std::net::SocketAddr = app
        .api
        .trim_start_matches("http://")
        .parse()
        .expect("api address");
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(addr).await.expect("tcp connects");
    let mut req = app.ws.as_str().into_client_request().expect("ws request");
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().expect("header"),
    );
    let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
        .await
        .expect("ws handshake");
    ws
}

/// An app whose WebSocket outboxes hold `limit` bytes, without keep-alive pings.
async fn app_with_outbox_limit(pool: PgPool, limit: usize) -> TestApp {
    spawn_app_with(pool, 2, |c| {
        c.api.ws.max_queued_bytes = limit;
        c.api.ws.keepalive = None;
    })
    .await
}

/// A small-window client, initialised, with `query` subscribed as `id`.
async fn subscribed_small_window(app: &TestApp, id: &str, query: &str) -> Ws {
    let mut ws = connect_small_window(app).await;
    init(&mut ws).await;
    send(
        &mut ws,
        json!({"id": id, "type": "subscribe", "payload": {"query": query}}),
    )
    .await;
    ws
}

const HEAVY: &str = "{ id source seq instrument venue bid ask bidSize askSize mid spread ts ingestedAt enrichedAt cursor currency assetClass }";

#[sqlx::test(migrations = "../migrations")]
async fn a_client_that_stops_reading_is_cut_off_and_others_keep_receiving(pool: PgPool) {
    let app = app_with_outbox_limit(pool, 4 << 20).await;
    let mut stalled =
        subscribed_small_window(&app, "all", &format!("subscription {{ quotes {HEAVY} }}")).await;
    // Many conflated subscriptions on one connection: unheld, their output
    // alone would pass the limit (40 batches x 4 instruments x 100 x ~600
    // bytes: about 9.6 MB against 4 MiB).
    let mut conflated = connect_small_window(&app).await;
    init(&mut conflated).await;
    let conflated_ids: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    for id in &conflated_ids {
        send(
            &mut conflated,
            json!({"id": id, "type": "subscribe", "payload": {"query": format!("subscription {{ quotes(maxRate: 1000) {HEAVY} }}")}}),
        )
        .await;
    }
    let mut reader = Subscription::start(
        &app.ws,
        false,
        &format!("subscription {{ quotes {HEAVY} }}"),
    )
    .await;
    // Registered once the reader sees a probe (all three subscribed before it).
    'live: {
        for n in 0..PROBES {
            app.post_json(&json!([quote("probe", n, "AAPL", "XNAS", "1", "2")]))
                .await;
            if reader
                .next_within(Duration::from_millis(500))
                .await
                .is_some()
            {
                break 'live;
            }
        }
        panic!("the reading subscription never went live");
    }

    // Far more than the limit plus what the sockets buffer: ~600 bytes each.
    let (batches, per) = (40u64, 500u64);
    let total = batches * per;
    let symbols = ["AAPL", "MSFT", "SPY", "VOD.L"];
    // The reading client reads all along: every quote, in order per instrument
    // (instruments are spread over shards).
    let reading = tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        let mut last_of = std::collections::HashMap::new();
        while (seen.len() as u64) < total {
            let q = reader.next().await["quotes"].clone();
            if q["source"] == "probe" {
                continue;
            }
            let seq = seq_of(&q);
            let sym = q["instrument"].as_str().expect("instrument").to_owned();
            let prev = last_of.insert(sym.clone(), seq).unwrap_or(0);
            assert!(seq > prev, "{sym}: {seq} after {prev}");
            assert!(seen.insert(seq), "{seq} twice");
        }
    });
    for b in 0..batches {
        let quotes: Vec<Value> = (0..per)
            .map(|i| {
                let seq = b * per + i + 1;
                let sym = symbols[(seq % 4) as usize];
                let venue = if sym == "VOD.L" { "XLON" } else { "XNAS" };
                quote("mm", seq, sym, venue, &format!("100.{seq:05}"), "101")
            })
            .collect();
        assert_eq!(app.post_json(&json!(quotes)).await["accepted"], per);
        // Spread over about five seconds: long enough for the conflated client,
        // at up to 1000 updates a second per instrument, to pass the limit too
        // if it were not held back.
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    reading.await.expect("the reading client got every quote");

    let (code, reason) = closed(&mut stalled).await;
    assert_eq!(code, 4008, "{reason}");
    assert!(reason.starts_with("slow consumer"), "{reason}");

    // The conflated client was never cut off: reading now, each of its
    // subscriptions gets the newest quote of every instrument.
    let newest_seq = |idx: u64| (1..=total).rev().find(|q| q % 4 == idx).expect("seq");
    let want: std::collections::HashMap<(String, String), u64> = conflated_ids
        .iter()
        .flat_map(|id| {
            symbols
                .iter()
                .enumerate()
                .map(move |(i, s)| ((id.clone(), s.to_string()), newest_seq(i as u64)))
        })
        .collect();
    let mut newest = std::collections::HashMap::new();
    while want.iter().any(|(k, q)| newest.get(k) != Some(q)) {
        match recv(&mut conflated).await {
            Ok(m) => {
                assert_eq!(m["type"], "next", "{m}");
                let q = &m["payload"]["data"]["quotes"];
                if q["source"] == "mm" {
                    let seq = seq_of(q);
                    let key = (
                        m["id"].as_str().expect("id").to_owned(),
                        q["instrument"].as_str().expect("instrument").to_owned(),
                    );
                    newest.insert(key, seq);
                }
            }
            Err(c) => panic!("the conflated client was closed: {c:?}"),
        }
    }
    app.stop().await;
}

/// The quotes of `source` in the next `n` `next` messages, as their `seq`.
async fn next_seqs(ws: &mut Ws, source: &str, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    while seqs.len() < n {
        let m = recv(ws).await.unwrap_or_else(|c| panic!("closed: {c:?}"));
        assert_eq!(m["type"], "next", "{m}");
        let q = &m["payload"]["data"]["quotes"];
        if q["source"] == source {
            seqs.push(seq_of(q));
        }
    }
    seqs
}

/// The server writes to a socket itself while the client keeps up and hands
/// over to its writer task when the socket is full: a client that pauses for
/// longer than the sockets can buffer (but not past the outbox limit) still
/// gets every event, in order, and keeps getting them once it reads again.
/// Meanwhile another client receives every one of them before the paused one
/// reads any: delivery never waits on a full socket.
#[sqlx::test(migrations = "../migrations")]
async fn a_client_that_pauses_gets_every_event_in_order_when_it_reads_again(pool: PgPool) {
    let app = app_with_outbox_limit(pool, 256 << 20).await;
    let query = format!("subscription {{ quotes(instruments: [\"AAPL\"]) {HEAVY} }}");
    let mut ws = subscribed_small_window(&app, "q", &query).await;
    let mut reader = Subscription::start(&app.ws, false, &query).await;
    'live: {
        for n in 0..PROBES {
            app.post_json(&json!([quote("probe", n, "AAPL", "XNAS", "1", "2")]))
                .await;
            let seen = tokio::time::timeout(Duration::from_millis(500), recv(&mut ws)).await;
            if seen.is_ok()
                && reader
                    .next_within(Duration::from_millis(500))
                    .await
                    .is_some()
            {
                break 'live;
            }
        }
        panic!("the subscriptions never went live");
    }
    // Drain the probes that arrived late.
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(300), recv(&mut ws)).await {
        m.expect("open");
    }

    // About 12 MB of messages while the client reads nothing: more than the
    // server's send buffer (4 MiB at most here) and the client's 4 KiB window.
    let (batches, per) = (40u64, 500u64);
    let mut seq = 0;
    for _ in 0..batches {
        let quotes: Vec<Value> = (0..per)
            .map(|_| {
                seq += 1;
                quote("mm", seq, "AAPL", "XNAS", &format!("100.{seq:05}"), "101")
            })
            .collect();
        assert_eq!(app.post_json(&json!(quotes)).await["accepted"], per);
    }
    let mut read = Vec::new();
    while read.last() != Some(&seq) {
        let q = reader.next().await["quotes"].clone();
        if q["source"] == "mm" {
            read.push(seq_of(&q));
        }
    }
    assert_eq!(
        read,
        (1..=seq).collect::<Vec<_>>(),
        "the reader got every event, in order"
    );
    let paused = (batches * per) as usize;
    let got = next_seqs(&mut ws, "mm", paused).await;
    assert_eq!(got, (1..=seq).collect::<Vec<_>>(), "every event, in order");

    // Reading along again: the next ones come as well, in order.
    let first = seq + 1;
    let quotes: Vec<Value> = (0..per)
        .map(|_| {
            seq += 1;
            quote("mm", seq, "AAPL", "XNAS", "100", "101")
        })
        .collect();
    assert_eq!(app.post_json(&json!(quotes)).await["accepted"], per);
    let got = next_seqs(&mut ws, "mm", per as usize).await;
    assert_eq!(got, (first..=seq).collect::<Vec<_>>());
    app.stop().await;
}

const QUOTE_FIELDS: &str = "id source seq instrument venue ts bid ask bidSize askSize mid spread \
    currency assetClass ingestedAt enrichedAt cursor resume __typename b: bid";
const TRADE_FIELDS: &str = "id source seq instrument venue ts price qty side tradeId account \
    notional notionalUsd currency assetClass ingestedAt enrichedAt cursor resume __typename \
    p: price";

/// A subscription served without the executor (`schema::compiled`) answers
/// exactly as the executor does: the same documents behind an inline fragment
/// (which is never planned) receive the very same payloads.
#[sqlx::test(migrations = "../migrations")]
async fn planned_subscriptions_answer_exactly_as_the_executor(pool: PgPool) {
    use tickgraph_api::schema::{compiled, Limits};

    let mut app = spawn_app(pool, 2).await;
    let quotes = |sel: &str| {
        format!("subscription Q($i: [String!]!) {{ q: quotes(instruments: $i, venues: \"XNAS\", snapshot: true) {sel} }}")
    };
    let trades = |sel: &str| format!("subscription {{ t: trades(sides: BUY) {sel} }}");
    let ops = [
        ("qp", quotes(&format!("{{ {QUOTE_FIELDS} }}"))),
        (
            "qe",
            quotes(&format!("{{ ... on Quote {{ {QUOTE_FIELDS} }} }}")),
        ),
        ("tp", trades(&format!("{{ {TRADE_FIELDS} }}"))),
        (
            "te",
            trades(&format!("{{ ... on Trade {{ {TRADE_FIELDS} }} }}")),
        ),
    ];
    let vars = json!({"i": ["AAPL", "MSFT"]});
    let limits = Limits {
        max_depth: 16,
        max_complexity: 10_000,
        introspection: true,
        guard: Default::default(),
    };
    for (id, query) in &ops {
        let req = async_graphql::Request::new(query.as_str())
            .variables(async_graphql::Variables::from_json(vars.clone()));
        let planned = compiled::plan(&req, &limits).is_some();
        assert_eq!(planned, id.ends_with('p'), "{id} planned: {planned}");
    }
    // A quote of each instrument first, so the snapshots have something.
    app.post_json(&json!([
        quote("old", 1, "AAPL", "XNAS", "1.5", "1.75"),
        quote("old", 2, "MSFT", "XNAS", "2.5", "2.75")
    ]))
    .await;
    app.eventually("the first quotes in history", async |a| {
        (a.history_count("quotes").await >= 2).then_some(())
    })
    .await;

    let mut ws = connect(&app.ws, "graphql-transport-ws").await;
    init(&mut ws).await;
    for (id, query) in &ops {
        send(
            &mut ws,
            json!({"id": id, "type": "subscribe", "payload": {"query": query, "variables": vars}}),
        )
        .await;
    }
    // Events for all four, until each has answered a probe.
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    let mut probe = 0u64;
    let mut probed = HashSet::new();
    let started = tokio::time::Instant::now();
    while probed.len() < 4 {
        assert!(
            started.elapsed() < DEADLINE,
            "only {probed:?} went live: {by_id:?}"
        );
        probe += 1;
        app.post_json(&json!([
            quote("probe", probe, "AAPL", "XNAS", "9", "9.5"),
            trade("probe", probe + 10_000, "AAPL", "XNAS", "9", "1", "buy")
        ]))
        .await;
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(m) = tokio::time::timeout_at(until, recv(&mut ws)).await {
            let m = m.expect("open");
            assert!(m["type"] != "error", "refused: {m}");
            if m["type"] != "next" {
                continue;
            }
            let id = m["id"].as_str().expect("id").to_owned();
            let data = m["payload"]["data"].clone();
            if data.to_string().contains("\"probe\"") {
                probed.insert(id.clone());
            }
            by_id.entry(id).or_default().push(m["payload"].clone());
        }
    }
    let mut events = Vec::new();
    for n in 1..=20u64 {
        let (sym, venue) = [("AAPL", "XNAS"), ("MSFT", "XNAS"), ("SPY", "ARCX")][(n % 3) as usize];
        events.push(quote(
            "mm",
            n,
            sym,
            venue,
            &format!("{n}.25"),
            &format!("{n}.5"),
        ));
        let side = if n % 2 == 0 { "buy" } else { "sell" };
        events.push(trade(
            "mm",
            100 + n,
            sym,
            venue,
            &format!("{n}.25"),
            "3",
            side,
        ));
    }
    app.post_json(&json!(events)).await;
    // AAPL/MSFT quotes on XNAS (13 of 20), buys (10 of 20).
    let real = |v: &Vec<Value>| {
        v.iter()
            .filter(|p| p.to_string().contains("\"source\":\"mm\""))
            .count()
    };
    let started = tokio::time::Instant::now();
    while real(by_id.get("qe").unwrap_or(&Vec::new())) < 13
        || real(by_id.get("qp").unwrap_or(&Vec::new())) < 13
        || real(by_id.get("te").unwrap_or(&Vec::new())) < 10
        || real(by_id.get("tp").unwrap_or(&Vec::new())) < 10
    {
        assert!(started.elapsed() < DEADLINE, "not all arrived: {by_id:?}");
        let m = recv(&mut ws).await.expect("open");
        if m["type"] == "next" {
            let id = m["id"].as_str().expect("id").to_owned();
            by_id.entry(id).or_default().push(m["payload"].clone());
        }
    }
    let from_mm = |id: &str| -> Vec<Value> {
        by_id[id]
            .iter()
            .filter(|p| !p.to_string().contains("\"probe\""))
            .cloned()
            .collect()
    };
    assert_eq!(from_mm("qp"), from_mm("qe"), "quotes: planned vs executor");
    assert_eq!(from_mm("tp"), from_mm("te"), "trades: planned vs executor");
    // Not vacuous: the snapshot came first, and the fields are there.
    let q = &from_mm("qp")[0]["data"]["q"];
    assert_eq!(q["source"], "old", "{q}");
    assert!(q["resume"].is_string() && q["b"] == q["bid"], "{q}");
    app.stop().await;
}
