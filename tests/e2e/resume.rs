//! Gap-free resume over real WebSockets: a client that drops mid-stream and
//! reconnects with `after: <resume>` receives exactly the events it had not
//! received (none twice, none missing, in order per instrument) across shards,
//! then live ones; a cursor the streams no longer hold is refused with
//! `CURSOR_EXPIRED`, whether the stream was trimmed past it or reset.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::*;
use crate::protocol::{connect, init, recv, send, Ws};

const SYMBOLS: [(&str, &str); 4] = [
    ("AAPL", "XNAS"),
    ("MSFT", "XNAS"),
    ("SPY", "ARCX"),
    ("VOD.L", "XLON"),
];

/// Posts quotes `seqs` from source `mm`, spread over the four instruments,
/// in batches of 50.
async fn post_quotes(app: &TestApp, seqs: std::ops::RangeInclusive<u64>) {
    let all: Vec<Value> = seqs
        .map(|seq| {
            let (sym, venue) = SYMBOLS[(seq % 4) as usize];
            quote(
                "mm",
                seq,
                sym,
                venue,
                &format!("{seq}.5"),
                &format!("{seq}.75"),
            )
        })
        .collect();
    for batch in all.chunks(50) {
        let answer = app.post_json(&json!(batch)).await;
        assert_eq!(answer["accepted"], batch.len(), "{answer}");
    }
}

/// A quote subscription over a raw socket to the api at `url`, with its
/// arguments.
pub(crate) async fn subscribe_quotes(url: &str, args: &str) -> Ws {
    let mut ws = connect(url, "graphql-transport-ws").await;
    init(&mut ws).await;
    let query = format!("subscription {{ quotes{args} {{ source seq instrument resume }} }}");
    send(
        &mut ws,
        json!({"id": "q", "type": "subscribe", "payload": {"query": query}}),
    )
    .await;
    ws
}

/// The next quote: (source, seq, instrument, resume).
pub(crate) async fn next_quote(ws: &mut Ws) -> (String, u64, String, String) {
    loop {
        let m = recv(ws).await.expect("socket open");
        match m["type"].as_str() {
            Some("next") => {
                let q = &m["payload"]["data"]["quotes"];
                assert!(m["payload"].get("errors").is_none(), "{m}");
                return (
                    q["source"].as_str().expect("source").to_owned(),
                    seq_of(q),
                    q["instrument"].as_str().expect("instrument").to_owned(),
                    q["resume"].as_str().expect("a resume cursor").to_owned(),
                );
            }
            Some("ping") => continue,
            _ => panic!("unexpected message {m}"),
        }
    }
}

/// The seq of the next quote from `mm` (probes skipped).
async fn next_mm(ws: &mut Ws) -> u64 {
    loop {
        let (source, seq, _, _) = next_quote(ws).await;
        if source == "mm" {
            return seq;
        }
    }
}

/// Posts probe quotes until `ws`'s subscription delivers one.
async fn until_live(app: &TestApp, ws: &mut Ws) -> String {
    for n in 0..200u64 {
        app.post_json(&json!([quote("probe", n, "AAPL", "XNAS", "1", "2")]))
            .await;
        if let Ok(q) = tokio::time::timeout(Duration::from_millis(600), next_quote(ws)).await {
            return q.3;
        }
    }
    panic!("subscription never went live");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_reconnect_with_after_gets_exactly_what_it_missed(pool: PgPool) {
    let app = spawn_app(pool, 2).await;
    let shards: HashSet<u16> = SYMBOLS
        .iter()
        .map(|(s, _)| tickgraph_ingest::stream::shard_of(s, 2))
        .collect();
    assert_eq!(shards.len(), 2, "the instruments span both shards");

    let mut ws = subscribe_quotes(&app.ws, "").await;
    until_live(&app, &mut ws).await;
    post_quotes(&app, 1..=400).await;

    // Take 150 of them, then drop the connection mid-stream.
    let mut received = HashSet::new();
    let mut resume = String::new();
    while received.len() < 150 {
        let (source, seq, _, r) = next_quote(&mut ws).await;
        if source == "mm" {
            received.insert(seq);
        }
        resume = r;
    }
    drop(ws);

    // Missed while away, then sent after the reconnect.
    post_quotes(&app, 401..=800).await;
    let mut ws = subscribe_quotes(&app.ws, &format!("(after: {})", json!(resume))).await;
    let expected: HashSet<u64> = (1..=850).filter(|s| !received.contains(s)).collect();
    let mut again = HashSet::new();
    let mut last_of: HashMap<String, u64> = HashMap::new();
    let mut live_posted = false;
    while again.len() < expected.len() {
        let (source, seq, instrument, _) = next_quote(&mut ws).await;
        if source != "mm" {
            continue;
        }
        assert!(
            !received.contains(&seq),
            "{seq} was received before the drop"
        );
        assert!(again.insert(seq), "{seq} arrived twice");
        let prev = last_of.insert(instrument.clone(), seq).unwrap_or(0);
        assert!(seq > prev, "{instrument}: {seq} after {prev}");
        if seq > 700 && !live_posted {
            post_quotes(&app, 801..=850).await;
            live_posted = true;
        }
    }
    assert_eq!(again, expected);
    // And nothing more: no repeat arrives late.
    post_quotes(&app, 851..=851).await;
    assert_eq!(next_mm(&mut ws).await, 851);
    app.stop().await;
}

/// Expects the subscription to be refused with `CURSOR_EXPIRED`.
async fn expect_expired(ws: &mut Ws) -> String {
    loop {
        let m = recv(ws).await.expect("socket open");
        if m["type"] == "ping" {
            continue;
        }
        assert_eq!(m["type"], "error", "{m}");
        assert_eq!(
            m["payload"][0]["extensions"]["code"], "CURSOR_EXPIRED",
            "{m}"
        );
        return m["payload"][0]["message"]
            .as_str()
            .expect("message")
            .to_owned();
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_cursor_the_streams_no_longer_hold_is_refused_as_expired(pool: PgPool) {
    let app = spawn_app(pool, 1).await;
    let mut ws = subscribe_quotes(&app.ws, "").await;
    let resume = until_live(&app, &mut ws).await;
    drop(ws);
    let after = format!("(after: {})", json!(resume));

    // Still held: resuming works.
    post_quotes(&app, 1..=4).await;
    let mut ws = subscribe_quotes(&app.ws, &after).await;
    assert_eq!(next_mm(&mut ws).await, 1);
    drop(ws);

    // Trimmed past it.
    let key = app.layout.enriched(0);
    let mut redis = app.redis.clone();
    let _: () = redis::cmd("XTRIM")
        .arg(&key)
        .arg("MAXLEN")
        .arg(1)
        .query_async(&mut redis)
        .await
        .expect("xtrim");
    let mut ws = subscribe_quotes(&app.ws, &after).await;
    let message = expect_expired(&mut ws).await;
    assert!(message.contains("trimmed"), "{message}");

    // Trimmed to nothing: still known to be gone.
    let _: () = redis::cmd("XTRIM")
        .arg(&key)
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut redis)
        .await
        .expect("xtrim");
    let mut ws = subscribe_quotes(&app.ws, &after).await;
    expect_expired(&mut ws).await;

    // Reset: Redis lost the shard (its epoch with it).
    let _: () = redis::cmd("DEL")
        .arg(app.layout.epoch(0))
        .query_async(&mut redis)
        .await
        .expect("del");
    let mut ws = subscribe_quotes(&app.ws, &after).await;
    let message = expect_expired(&mut ws).await;
    assert!(message.contains("reset"), "{message}");

    // Not a cursor at all: a plain error.
    let mut ws = subscribe_quotes(&app.ws, "(after: \"3:junk\")").await;
    let m = recv(&mut ws).await.expect("error");
    assert_eq!(m["type"], "error", "{m}");
    assert!(
        m["payload"][0]["message"]
            .as_str()
            .is_some_and(|s| s.contains("not a resume cursor")),
        "{m}"
    );
    app.stop().await;
}
