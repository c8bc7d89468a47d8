//! A flood of half-open connections against both listeners of a secured
//! pipeline (producer tokens, user JWTs): a producer and a user are still
//! served, from new connections, while the flood fills every slot.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use tickgraph_ingest::listener::ConnLimits;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::auth::{claims, hs256, secured, ws_as, PRODUCER_TOKEN};
use crate::helpers::*;
use crate::protocol::{recv, send};

/// Per listener; the flood opens four times as many.
const CAP: usize = 40;
const FLOOD: usize = 4 * CAP;
const PARTIAL: &[u8] = b"POST /v1/events HTTP/1.1\r\nHost: x\r\n";

async fn half_open(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // The server may already have closed it to make room: that is the point.
        let _ = s.write_all(PARTIAL).await;
        held.push(s);
    }
    held
}

#[sqlx::test(migrations = "../migrations")]
async fn a_producer_and_a_user_are_served_through_a_flood_of_half_open_connections(pool: PgPool) {
    let (app, _dir) = secured(pool, |cfg| {
        // Deadlines far off: only the cap and its eviction make room here.
        let limits = ConnLimits {
            header_timeout: Duration::from_secs(600),
            ..ConnLimits::with_max_connections(CAP)
        };
        cfg.ingest.conn = limits;
        cfg.api.conn = limits;
    })
    .await;
    let user = hs256(claims("flood-user", 600, json!("*"), json!("*")));
    let ingest_addr = app.ingest.trim_start_matches("http://").to_owned();
    let api_addr = app.api.trim_start_matches("http://").to_owned();
    let mut flood = half_open(&ingest_addr, FLOOD).await;
    flood.extend(half_open(&api_addr, FLOOD).await);

    // The user subscribes over a new WebSocket while the flood holds every slot.
    let mut ws = ws_as(&app, &user).await;
    send(
        &mut ws,
        json!({"id": "1", "type": "subscribe", "payload": {
            "query": "subscription { quotes(instruments: [\"AAPL\"]) { instrument bid } }"}}),
    )
    .await;
    // More of the flood, so the subscription's socket has to keep its slot.
    flood.extend(half_open(&api_addr, FLOOD).await);

    // Each request on a connection of its own, as a producer starting up would.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut delivered = false;
    for seq in 1..=20u64 {
        let batch = json!([quote("feed-a", seq, "AAPL", "XNAS", "100.00", "100.02")]);
        let answer: Value = fresh
            .post(format!("{}/v1/events", app.ingest))
            .bearer_auth(PRODUCER_TOKEN)
            .json(&batch)
            .send()
            .await
            .expect("the producer is answered")
            .json()
            .await
            .expect("JSON answer");
        assert_eq!(answer["accepted"], 1, "{answer}");
        let (status, body): (u16, Value) = {
            let res = fresh
                .post(format!("{}/graphql", app.api))
                .bearer_auth(&user)
                .json(&json!({"query": "{ venues { mic } }"}))
                .send()
                .await
                .expect("the user is answered");
            (
                res.status().as_u16(),
                res.json().await.expect("JSON answer"),
            )
        };
        assert_eq!(status, 200, "{body}");
        assert!(
            body["data"]["venues"]
                .as_array()
                .is_some_and(|v| !v.is_empty()),
            "{body}"
        );
        flood.extend(half_open(&ingest_addr, CAP / 4).await);
        flood.extend(half_open(&api_addr, CAP / 4).await);
        if !delivered {
            let m = tokio::time::timeout(Duration::from_millis(500), recv(&mut ws)).await;
            if let Ok(m) = m {
                let m = m.expect("the subscription is alive");
                assert_eq!(m["payload"]["data"]["quotes"]["instrument"], "AAPL", "{m}");
                delivered = true;
            }
        }
    }
    assert!(
        delivered,
        "the subscriber received nothing through the flood"
    );

    let metrics = fresh
        .get(format!("{}/metrics", app.ingest))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("text");
    for listener in ["ingest", "api"] {
        let evicted = metric(
            &metrics,
            &format!("tickgraph_{listener}_connections_closed_total{{reason=\"evicted\"}}"),
        );
        assert!(
            evicted >= (FLOOD - CAP) as f64,
            "{listener}: {evicted} evicted"
        );
        let open = metric(&metrics, &format!("tickgraph_{listener}_connections_open"));
        assert!(open <= (CAP + 1) as f64, "{listener}: {open} open");
    }
    drop(flood);
}

fn metric(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}
