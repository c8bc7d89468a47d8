//! Live subscriptions over real WebSockets, fed by real XADDs to the enriched
//! streams: each subscriber gets exactly what its arguments select.

use std::collections::HashSet;

use serde_json::{json, Value};
use sqlx::PgPool;
use tickgraph_ingest::Side;

use crate::helpers::{quote, spawn_app, spawn_app_with, trade, T0};

const TRADES: &str = "subscription($i: [String!], $s: [Side!]) {
    trades(instruments: $i, sides: $s) {
        id instrument venue side price qty notional assetClass cursor ts
        reference { name listingVenue { mic } }
    }
}";
const QUOTES: &str = "subscription($v: [String!]) {
    quotes(venues: $v) { id instrument venue bid ask mid spread cursor }
}";

/// One shard, so the stream order is total and a trailing matching event proves
/// every earlier non-matching one was dispatched (and skipped) before it.
#[sqlx::test(migrations = "../migrations")]
async fn graphql_transport_ws_delivers_exactly_what_the_filters_select(pool: PgPool) {
    let mut app = spawn_app_with(pool, 1, |_| {}).await;
    let (mut ws, chosen) = app.ws("graphql-transport-ws").await;
    assert_eq!(chosen.as_deref(), Some("graphql-transport-ws"));
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    ws.send(json!({"id": "t", "type": "subscribe", "payload": {
        "query": TRADES, "variables": {"i": ["AAPL", "MSFT"], "s": ["BUY"]}}}))
        .await;
    ws.send(json!({"id": "q", "type": "subscribe", "payload": {
        "query": QUOTES, "variables": {"v": ["XLON"]}}}))
        .await;
    app.wait_for_subscribers(2).await;

    let cursors = app
        .publish(&[
            trade("AAPL", "XNAS", 1, T0 + 1, Side::Buy),  // t: yes
            trade("AAPL", "XNAS", 2, T0 + 2, Side::Sell), // t: wrong side
            trade("SPY", "XNYS", 3, T0 + 3, Side::Buy),   // t: wrong instrument
            quote("AAPL", "XNAS", 4, T0 + 4, "100.00"),   // q: wrong venue
            quote("VOD.L", "XLON", 5, T0 + 5, "72.10"),   // q: yes
            trade("VOD.L", "XLON", 6, T0 + 6, Side::Buy), // t: wrong instrument
            trade("MSFT", "XNAS", 7, T0 + 7, Side::Buy),  // t: yes
            quote("BP.L", "XLON", 8, T0 + 8, "480.00"),   // q: yes
        ])
        .await;

    let mut trades = Vec::new();
    let mut quotes = Vec::new();
    while trades.len() < 2 || quotes.len() < 2 {
        let msg = ws.expect().await;
        assert_eq!(msg["type"], "next", "{msg}");
        assert!(msg["payload"].get("errors").is_none(), "{msg}");
        match msg["id"].as_str() {
            Some("t") => trades.push(msg["payload"]["data"]["trades"].clone()),
            Some("q") => quotes.push(msg["payload"]["data"]["quotes"].clone()),
            other => panic!("message for unknown subscription {other:?}: {msg}"),
        }
    }
    let ids = |v: &[Value]| {
        v.iter()
            .map(|x| x["id"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&trades), ["test-feed:1", "test-feed:7"]);
    assert_eq!(ids(&quotes), ["test-feed:5", "test-feed:8"]);
    assert_eq!(trades[0]["cursor"], cursors[0].as_str());
    assert_eq!(trades[1]["cursor"], cursors[6].as_str());
    assert_eq!(quotes[0]["cursor"], cursors[4].as_str());
    assert!(cursors[0].starts_with("0:"), "{}", cursors[0]);
    assert_eq!(trades[0]["side"], "BUY");
    assert_eq!(trades[0]["price"], "101.25");
    assert_eq!(trades[0]["notional"], "1012.50");
    assert_eq!(trades[0]["assetClass"], "EQUITY");
    assert_eq!(trades[0]["reference"]["name"], "Apple Inc.");
    assert_eq!(trades[0]["reference"]["listingVenue"]["mic"], "XNAS");
    assert_eq!(trades[0]["ts"], "2024-11-25T15:53:20.000000001+00:00");
    assert_eq!(quotes[0]["mid"], "72.11");
    assert_eq!(quotes[0]["spread"], "0.02");

    // Nothing else is on its way: a last matching event arrives next.
    app.publish(&[trade("AAPL", "XNAS", 9, T0 + 9, Side::Buy)])
        .await;
    let msg = ws.expect().await;
    assert_eq!(
        (
            msg["id"].as_str(),
            msg["payload"]["data"]["trades"]["id"].as_str()
        ),
        (Some("t"), Some("test-feed:9")),
        "{msg}"
    );

    ws.send(json!({"id": "t", "type": "complete"})).await;
    app.wait_for_subscribers(1).await;
    drop(ws);
    app.wait_for_subscribers(0).await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn legacy_graphql_ws_protocol_is_served_too(pool: PgPool) {
    let mut app = spawn_app(pool).await;
    // The client's first known choice wins, not our order.
    let (mut ws, chosen) = app.ws("graphql-ws, graphql-transport-ws").await;
    assert_eq!(chosen.as_deref(), Some("graphql-ws"));
    ws.send(json!({"type": "connection_init", "payload": {}}))
        .await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    ws.send(json!({"id": "1", "type": "start", "payload": {
        "query": "subscription { quotes(instruments: [\"MSFT\"]) { id instrument cursor } }"}}))
        .await;
    app.wait_for_subscribers(1).await;
    let cursors = app
        .publish(&[
            quote("AAPL", "XNAS", 1, T0 + 1, "230.00"),
            quote("MSFT", "XNAS", 2, T0 + 2, "410.00"),
        ])
        .await;
    let msg = ws.expect().await;
    assert_eq!(msg["type"], "data", "{msg}");
    assert_eq!(msg["id"], "1");
    assert_eq!(msg["payload"]["data"]["quotes"]["id"], "test-feed:2");
    assert_eq!(
        msg["payload"]["data"]["quotes"]["cursor"],
        cursors[1].as_str()
    );
    ws.send(json!({"id": "1", "type": "stop"})).await;
    let msg = ws.expect().await;
    assert_eq!(
        (msg["type"].as_str(), msg["id"].as_str()),
        (Some("complete"), Some("1"))
    );
    app.wait_for_subscribers(0).await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn every_shard_reaches_an_unfiltered_subscriber_once(pool: PgPool) {
    let mut app = spawn_app_with(pool, 4, |_| {}).await;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    ws.send(json!({"id": "all", "type": "subscribe", "payload": {
        "query": "subscription { trades { id cursor } }"}}))
        .await;
    app.wait_for_subscribers(1).await;
    let symbols = ["AAPL", "MSFT", "SPY", "VOD.L", "BP.L"];
    let records: Vec<_> = (0..50u64)
        .map(|i| {
            let side = if i % 2 == 0 { Side::Buy } else { Side::Sell };
            trade(symbols[(i % 5) as usize], "XNAS", i, T0 + i as i64, side)
        })
        .collect();
    let cursors = app.publish(&records).await;
    let shards: HashSet<&str> = cursors.iter().filter_map(|c| c.split(':').next()).collect();
    assert!(
        shards.len() > 1,
        "the test instruments should span shards: {cursors:?}"
    );

    let mut seen = HashSet::new();
    while seen.len() < records.len() {
        let msg = ws.expect().await;
        let t = &msg["payload"]["data"]["trades"];
        let pair = (
            t["id"].as_str().unwrap_or_default().to_owned(),
            t["cursor"].as_str().unwrap_or_default().to_owned(),
        );
        assert!(seen.insert(pair.clone()), "delivered twice: {pair:?}");
    }
    let expected: HashSet<(String, String)> = (0..50)
        .map(|i| (format!("test-feed:{i}"), cursors[i].clone()))
        .collect();
    assert_eq!(seen, expected);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn an_empty_filter_list_is_refused_with_a_clear_error(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    ws.send(json!({"id": "1", "type": "subscribe", "payload": {
        "query": "subscription { trades(venues: []) { id } }"}}))
        .await;
    // Refused when its source stream is created: `error`, and no `complete`.
    let msg = ws.expect().await;
    assert_eq!(
        (msg["type"].as_str(), msg["id"].as_str()),
        (Some("error"), Some("1")),
        "{msg}"
    );
    let error = msg["payload"][0]["message"].as_str().unwrap_or_default();
    assert!(error.contains("`venues` is an empty list"), "{msg}");
    assert_eq!(app.api.hub().subscribers(), 0);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_filter_list_of_more_than_1000_values_is_refused(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    let venues: Vec<String> = (0..1001).map(|i| format!("V{i:04}")).collect();
    let sides = vec!["BUY"; 1001];
    let cases = [
        (
            "subscription($l: [String!]) { trades(venues: $l) { id } }",
            json!(venues),
            "at most 1000 `venues` per subscription, got 1001",
        ),
        (
            "subscription($l: [String!]) { quotes(instruments: $l) { id } }",
            json!(venues),
            "at most 1000 `instruments` per subscription, got 1001",
        ),
        (
            "subscription($l: [Side!]) { trades(sides: $l) { id } }",
            json!(sides),
            "at most 1000 `sides` per subscription, got 1001",
        ),
    ];
    for (id, (query, list, error)) in cases.into_iter().enumerate() {
        let id = id.to_string();
        ws.send(json!({"id": id, "type": "subscribe", "payload": {
            "query": query, "variables": {"l": list}}}))
            .await;
        // `error`, and no `complete`: the next message is the next case's.
        let msg = ws.expect().await;
        assert_eq!(
            (msg["type"].as_str(), msg["id"].as_str()),
            (Some("error"), Some(id.as_str())),
            "{msg}"
        );
        assert_eq!(msg["payload"][0]["message"], error, "{msg}");
    }
    assert_eq!(app.api.hub().subscribers(), 0);
    app.stop().await;
}

/// A message over 64 KiB closes the socket instead of being read into memory.
#[sqlx::test(migrations = "../migrations")]
async fn a_websocket_message_over_64_kib_closes_the_socket(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init", "payload": {"pad": "x".repeat(64 << 10)}}))
        .await;
    assert_eq!(ws.recv().await, None, "the socket closes");

    // A message of a normal size is served as ever.
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init", "payload": {"pad": "x".repeat(60 << 10)}}))
        .await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    app.stop().await;
}

/// A subscriber that does not keep up is closed with an error, and the hub
/// neither waits for it nor keeps its events.
#[sqlx::test(migrations = "../migrations")]
async fn a_slow_subscriber_is_closed_with_an_error(pool: PgPool) {
    use futures_util::{FutureExt, StreamExt};

    let mut app = spawn_app_with(pool, 1, |c| c.subscriber_queue = 3).await;
    let mut stream = app
        .api
        .schema()
        .execute_stream("subscription { quotes(instruments: [\"AAPL\"]) { id } }");
    // The subscription registers on its first poll; nothing is published yet.
    assert!(
        stream.next().now_or_never().is_none(),
        "no event was published yet"
    );
    app.wait_for_subscribers(1).await;
    let records: Vec<_> = (0..10u64)
        .map(|i| quote("AAPL", "XNAS", i, T0 + i as i64, "230.00"))
        .collect();
    app.publish(&records).await;
    // The hub drops an overflowed subscriber from its registry.
    app.wait_for_subscribers(0).await;
    let resp = stream.next().await.expect("an error response");
    assert_eq!(
        resp.errors.first().map(|e| e.message.as_str()),
        Some("subscriber too slow: queue of 3 events full")
    );
    assert!(
        stream.next().await.is_none(),
        "the subscription ends after the error"
    );
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn shutdown_completes_subscriptions_and_closes_sockets(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    ws.send(json!({"id": "1", "type": "subscribe", "payload": {
        "query": "subscription { trades { id } }"}}))
        .await;
    ws.send(json!({"id": "2", "type": "subscribe", "payload": {
        "query": "subscription { quotes { id } }"}}))
        .await;
    app.wait_for_subscribers(2).await;
    app.stop().await;
    let mut completed = HashSet::new();
    while completed.len() < 2 {
        let msg = ws
            .recv()
            .await
            .expect("`complete` before the socket closes");
        assert_eq!(msg["type"], "complete", "{msg}");
        completed.insert(msg["id"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(completed, HashSet::from(["1".to_owned(), "2".to_owned()]));
    assert_eq!(ws.recv().await, None, "the socket closes after `complete`");
}

/// The id of the Redis connection named `name`, from CLIENT LIST.
async fn client_id(con: &mut redis::aio::MultiplexedConnection, name: &str) -> Option<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(con)
        .await
        .expect("CLIENT LIST");
    let name_field = format!("name={name}");
    list.lines()
        .find(|l| l.split(' ').any(|f| f == name_field))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
}

/// A reader whose connection dies reconnects and resumes after the last entry
/// it saw, so events added meanwhile still arrive.
#[sqlx::test(migrations = "../migrations")]
async fn the_hub_reconnects_and_resumes_after_a_lost_connection(pool: PgPool) {
    let mut app = spawn_app_with(pool, 1, |_| {}).await;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    ws.send(json!({"id": "1", "type": "subscribe", "payload": {
        "query": "subscription { trades { id } }"}}))
        .await;
    app.wait_for_subscribers(1).await;

    let client = redis::Client::open(crate::helpers::redis_url()).expect("redis url");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let name = tickgraph_api::hub::reader_name(app.layout.prefix(), 0);
    let killed = client_id(&mut admin, &name)
        .await
        .expect("the reader is connected");
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&killed)
        .query_async(&mut admin)
        .await
        .expect("CLIENT KILL");
    app.publish(&[trade("AAPL", "XNAS", 1, T0, Side::Buy)])
        .await;
    let msg = ws.expect().await;
    assert_eq!(
        msg["payload"]["data"]["trades"]["id"], "test-feed:1",
        "{msg}"
    );
    let now = client_id(&mut admin, &name)
        .await
        .expect("the reader reconnected");
    assert_ne!(now, killed);
    app.stop().await;
}

/// Every leaf field of `Trade` and `Quote`, some twice (once under an alias,
/// once repeated under the same key), and `__typename`.
const TRADE_LEAVES: &str = "id source seq instrument venue ts price qty side tradeId account \
    notional notionalUsd currency assetClass ingestedAt enrichedAt cursor resume __typename \
    p: price t: ts kind: __typename qty";
const QUOTE_LEAVES: &str = "id source seq instrument venue ts bid ask bidSize askSize mid \
    spread currency assetClass ingestedAt enrichedAt cursor resume __typename b: bid a: ask \
    kind: __typename bid";

/// A selection of plain leaf fields is answered without the field resolvers
/// (`schema::fast`); the same fields behind an inline fragment take the full
/// resolvers. Both must give the very same data, for every field.
#[sqlx::test(migrations = "../migrations")]
async fn plain_leaf_selections_answer_exactly_as_the_full_resolvers(pool: PgPool) {
    use futures_util::StreamExt;
    use tickgraph_enrich::EnrichedRecord;
    use tickgraph_ingest::event::AccountId;
    use tickgraph_ingest::Event;

    let mut app = spawn_app_with(pool, 1, |_| {}).await;
    let schema = app.api.schema();
    let queries = [
        format!("subscription {{ trades {{ {TRADE_LEAVES} }} }}"),
        format!("subscription {{ trades {{ ... on Trade {{ {TRADE_LEAVES} }} }} }}"),
        format!("subscription {{ quotes {{ {QUOTE_LEAVES} }} }}"),
        format!("subscription {{ quotes {{ ... on Quote {{ {QUOTE_LEAVES} }} }} }}"),
    ];
    let mut streams: Vec<_> = queries
        .iter()
        .map(|q| schema.execute_stream(q.as_str()))
        .collect();
    for s in &mut streams {
        use futures_util::FutureExt;
        assert!(s.next().now_or_never().is_none(), "nothing published yet");
    }
    app.wait_for_subscribers(4).await;

    let mut with_account: EnrichedRecord = trade("MSFT", "XNAS", 2, T0 + 2, Side::Sell);
    if let Event::Trade(t) = &mut with_account.event {
        t.trade_id = None;
        t.account = Some(AccountId::parse("ACC-7").expect("account id"));
    }
    app.publish(&[
        trade("AAPL", "XNAS", 1, T0 + 1, Side::Buy),
        with_account,
        quote("VOD.L", "XLON", 3, T0 + 123_456_789, "72.3450"),
    ])
    .await;

    let mut data = Vec::new();
    for (i, s) in streams.iter_mut().enumerate() {
        let n = if i < 2 { 2 } else { 1 };
        let mut got = Vec::new();
        for _ in 0..n {
            let resp = s.next().await.expect("an event");
            assert!(resp.errors.is_empty(), "{:?}", resp.errors);
            // As the transports write it: shared JSON included.
            let json = tickgraph_api::shared_json::response_json(&resp).expect("json");
            let parsed: Value = serde_json::from_str(&json).expect("valid JSON");
            assert_eq!(parsed["data"], tickgraph_api::shared_json::data_json(&resp));
            got.push((json, parsed["data"].clone()));
        }
        data.push(got);
    }
    // Byte for byte: key order, a repeated key written once, escaping and
    // every value's text, not only what a parsed comparison sees.
    let text = |i: usize| data[i].iter().map(|(j, _)| j.clone()).collect::<Vec<_>>();
    assert_eq!(text(0), text(1), "trades: plain fields vs full resolvers");
    assert_eq!(text(2), text(3), "quotes: plain fields vs full resolvers");
    let data: Vec<Vec<Value>> = data
        .into_iter()
        .map(|g| g.into_iter().map(|(_, v)| v).collect())
        .collect();
    // Not vacuous: the values are there, and absent options are null.
    assert_eq!(data[0][0]["trades"]["kind"], "Trade");
    assert_eq!(data[0][0]["trades"]["side"], "BUY");
    assert_eq!(data[0][0]["trades"]["tradeId"], "T1");
    assert_eq!(data[0][1]["trades"]["tradeId"], Value::Null);
    assert_eq!(data[0][1]["trades"]["account"], "ACC-7");
    assert_eq!(data[2][0]["quotes"]["b"], "72.3450");
    assert!(
        data[2][0]["quotes"]["resume"].is_string(),
        "a resume cursor"
    );
    assert_eq!(
        data[2][0]["quotes"]["ts"],
        "2024-11-25T15:53:20.123456789+00:00"
    );
    app.stop().await;
}

/// Subscribers that select the same plain fields share one serialization of
/// each event: the very same bytes reach both, and a third with other fields
/// gets its own.
#[sqlx::test(migrations = "../migrations")]
async fn the_same_selection_shares_one_serialization_per_event(pool: PgPool) {
    use async_graphql::Value as GqlValue;
    use futures_util::{FutureExt, StreamExt};

    let mut app = spawn_app_with(pool, 1, |_| {}).await;
    let schema = app.api.schema();
    let same = "subscription { quotes { instrument bid ask } }";
    let other = "subscription { quotes { instrument mid } }";
    let mut streams: Vec<_> = [same, same, other]
        .iter()
        .map(|q| schema.execute_stream(*q))
        .collect();
    for s in &mut streams {
        assert!(s.next().now_or_never().is_none(), "nothing published yet");
    }
    app.wait_for_subscribers(3).await;
    app.publish(&[quote("AAPL", "XNAS", 1, T0, "230.00")]).await;
    let mut shared = Vec::new();
    for s in &mut streams {
        let resp = s.next().await.expect("an event");
        let GqlValue::Object(data) = &resp.data else {
            panic!("data is an object: {:?}", resp.data);
        };
        let Some(GqlValue::Binary(json)) = data.get("quotes") else {
            panic!("a plain selection is shared JSON: {:?}", resp.data);
        };
        shared.push(json.clone());
    }
    assert_eq!(shared[0].as_ptr(), shared[1].as_ptr(), "one serialization");
    assert_ne!(shared[0].as_ptr(), shared[2].as_ptr());
    assert_eq!(
        serde_json::from_slice::<Value>(&shared[0]).expect("json"),
        json!({"instrument": "AAPL", "bid": "230.00", "ask": "230.02"})
    );
    app.stop().await;
}

/// Instruments and venues must be in the reference data: nothing could match
/// the others, and a subscription would hold them for as long as it lives.
/// Planned and executed subscriptions alike.
#[sqlx::test(migrations = "../migrations")]
async fn unknown_instruments_and_venues_are_refused_with_a_code(pool: PgPool) {
    let app = spawn_app(pool).await;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    let made_up: Vec<String> = (0..8).map(|i| format!("MADE-UP-{i}")).collect();
    let mut instruments = vec!["AAPL".to_owned()];
    instruments.extend(made_up);
    let cases = [
        (
            "subscription($l: [String!]) { quotes(instruments: $l) { bid } }",
            json!(instruments),
            "UNKNOWN_INSTRUMENT",
            "unknown instruments, not in the reference data: \"MADE-UP-0\", \"MADE-UP-1\", \
             \"MADE-UP-2\", \"MADE-UP-3\", \"MADE-UP-4\" and 3 more",
        ),
        (
            "subscription($l: [String!]) { quotes(instruments: $l) { ... on Quote { bid } } }",
            json!(instruments),
            "UNKNOWN_INSTRUMENT",
            "unknown instruments, not in the reference data: \"MADE-UP-0\", \"MADE-UP-1\", \
             \"MADE-UP-2\", \"MADE-UP-3\", \"MADE-UP-4\" and 3 more",
        ),
        (
            "subscription($l: [String!]) { trades(venues: $l) { id } }",
            json!(["XNAS", "XXXX"]),
            "UNKNOWN_VENUE",
            "unknown venues, not in the reference data: \"XXXX\"",
        ),
    ];
    for (id, (query, list, code, error)) in cases.into_iter().enumerate() {
        let id = id.to_string();
        ws.send(json!({"id": id, "type": "subscribe", "payload": {
            "query": query, "variables": {"l": list}}}))
            .await;
        let msg = ws.expect().await;
        assert_eq!(
            (msg["type"].as_str(), msg["id"].as_str()),
            (Some("error"), Some(id.as_str())),
            "{msg}"
        );
        assert_eq!(msg["payload"][0]["extensions"]["code"], code, "{msg}");
        assert_eq!(msg["payload"][0]["message"], error, "{msg}");
    }
    assert_eq!(app.api.hub().subscribers(), 0);
    // Known ones are served.
    ws.send(json!({"id": "known", "type": "subscribe", "payload": {
        "query": "subscription { quotes(instruments: [\"AAPL\"], venues: [\"XNAS\"]) { bid } }"}}))
        .await;
    app.wait_for_subscribers(1).await;
    app.stop().await;
}
