//! Bad input gets a clear per-event or per-batch error, lands in a dead-letter
//! stream with its reason, and never stops the good events around it.

use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::*;

fn reason_of(answer: &Value, index: usize) -> String {
    answer["rejected"]
        .as_array()
        .and_then(|r| r.iter().find(|x| x["index"] == index))
        .and_then(|x| x["reason"].as_str())
        .unwrap_or_else(|| panic!("event {index} was not rejected: {answer}"))
        .to_string()
}

#[sqlx::test(migrations = "../migrations")]
async fn bad_events_are_dead_lettered_and_good_ones_in_the_same_batch_pass(pool: PgPool) {
    let mut app = spawn_app(pool, 2).await;

    let body = format!(
        "[{}, {}, {}, {}, {}]",
        trade("oms", 1, "AAPL", "XNAS", "189.5", "10", "buy"),
        r#"{"kind":"trade","source":"oms","seq":2,"instrument":"AAPL","venue":"XNAS","ts":1764066667000000000,"price":true,"qty":1,"side":"buy"}"#,
        trade("oms", 3, "NOPE", "XNAS", "1", "1", "buy"),
        r#"{"kind":"quote","source":"oms","seq":4}"#,
        trade("oms", 5, "MSFT", "XXXX", "1", "1", "sell"),
    );
    let (status, answer) = app.post("application/json", body.into_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["received"], 5);
    // NOPE and venue XXXX are well-formed: ingest takes them, enrich refuses them.
    assert_eq!(answer["accepted"], 3, "{answer}");
    assert!(reason_of(&answer, 1).contains("`price`"), "{answer}");
    assert!(
        reason_of(&answer, 3).contains("missing required field"),
        "{answer}"
    );

    // NDJSON: a line that is not JSON is one rejected event, not a failed batch.
    let nd = format!(
        "{}\n{{\"kind\": \"trade\", oops\n",
        trade("oms", 6, "AAPL", "XNAS", "190", "5", "sell")
    );
    let (status, nd_answer) = app.post("application/x-ndjson", nd.into_bytes()).await;
    assert_eq!(
        (status, &nd_answer["accepted"]),
        (200, &json!(1)),
        "{nd_answer}"
    );
    assert!(
        reason_of(&nd_answer, 1).starts_with("invalid event"),
        "{nd_answer}"
    );

    // Whole-batch errors: unreadable body, unknown type, too many events.
    let (status, err) = app
        .post("application/json", b"{\"not\": \"an array\"}".to_vec())
        .await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|e| e.contains("malformed")),
        "{err}"
    );
    let (status, err) = app.post("application/msgpack", vec![0xc1]).await;
    assert_eq!(status, 400, "{err}");
    let (status, err) = app.post("text/csv", b"a,b".to_vec()).await;
    assert_eq!(status, 415, "{err}");
    let many: Vec<Value> = (0..10_001)
        .map(|i| trade("oms", 100 + i, "AAPL", "XNAS", "1", "1", "buy"))
        .collect();
    let (status, err) = app
        .post("application/json", serde_json::to_vec(&many).expect("json"))
        .await;
    assert_eq!(status, 413, "{err}");

    // Ingest's dead letters: reason and the producer's original bytes.
    let dlq = app.xrange(&app.layout.ingest_dlq()).await;
    assert_eq!(dlq.len(), 3, "two from the JSON batch, one from NDJSON");
    let payloads: Vec<String> = dlq
        .iter()
        .map(|(_, f)| String::from_utf8_lossy(&f["payload"]).into_owned())
        .collect();
    assert!(payloads[0].contains("\"price\":true"), "{payloads:?}");
    assert_eq!(payloads[2], "{\"kind\": \"trade\", oops");
    for (_, f) in &dlq {
        assert_eq!(f["stage"], b"ingest");
        assert!(!f["reason"].is_empty());
    }

    // Enrich's dead letters: unknown instrument and unknown venue, with reasons.
    let layout = app.layout.clone();
    let enrich_dlq = app
        .eventually("enrich dead letters", async |app| {
            let mut all = Vec::new();
            for s in layout.shard_ids() {
                all.extend(app.xrange(&layout.dlq(s)).await);
            }
            (all.len() >= 2).then_some(all)
        })
        .await;
    let mut reasons: Vec<String> = enrich_dlq
        .iter()
        .map(|(_, f)| String::from_utf8_lossy(&f["reason"]).into_owned())
        .collect();
    reasons.sort();
    assert_eq!(enrich_dlq.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("NOPE") && reasons[0].contains("instrument"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("XXXX") && reasons[1].contains("venue"),
        "{reasons:?}"
    );

    // The good events went all the way to history.
    app.eventually("good trades in history", async |app| {
        (app.history_count("trades").await == 2).then_some(())
    })
    .await;
    let ids: Vec<(String, i64)> = sqlx::query_as("SELECT source, seq FROM trades ORDER BY seq")
        .fetch_all(&app.pool)
        .await
        .expect("trades");
    assert_eq!(ids, vec![("oms".to_string(), 1), ("oms".to_string(), 6)]);

    app.stop().await;
}
