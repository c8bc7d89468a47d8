//! The HTTP edge: GraphQL over HTTP media types, GET queries, GraphiQL.

use reqwest::header::{ACCEPT, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::spawn_app;

#[sqlx::test(migrations = "../migrations")]
async fn graphql_over_http_speaks_both_media_types(pool: PgPool) {
    let app = spawn_app(pool).await;
    let post = |accept: &'static str, query: &'static str| {
        app.http
            .post(app.url("/graphql"))
            .header(ACCEPT, accept)
            .json(&json!({ "query": query }))
            .send()
    };

    let resp = post("application/graphql-response+json", "{ venues { mic } }")
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()[CONTENT_TYPE],
        "application/graphql-response+json"
    );
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["data"]["venues"][0]["mic"], "XLON");

    let resp = post("application/json", "{ venues { mic } }")
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");

    // A request that cannot run: 400 for the new media type, 200 for legacy clients.
    let resp = post("application/graphql-response+json", "{ venues { nope } }")
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{body}"
    );
    let resp = post("application/json", "{ venues { nope } }")
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::OK);

    // A field error during execution is still a 200 with partial data.
    let resp = post(
        "application/graphql-response+json",
        "{ venues { mic } trades(instrument: \"A\", first: -1) { nodes { id } } }",
    )
    .await
    .expect("POST");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(
        body["data"]["venues"],
        json!([{"mic": "XLON"}, {"mic": "XNAS"}, {"mic": "XNYS"}]),
        "{body}"
    );
    assert!(body["data"]["trades"].is_null(), "{body}");
    assert_eq!(body["errors"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["errors"][0]["path"], json!(["trades"]), "{body}");
    assert_eq!(
        body["errors"][0]["message"], "`first` must be between 0 and 1000, got -1",
        "{body}"
    );

    let resp = app
        .http
        .get(app.url("/graphql"))
        .query(&[("query", "{ instrument(symbol: \"SPY\") { name } }")])
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["data"]["instrument"]["name"], "SPDR S&P 500 ETF Trust");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn graphiql_is_served_and_the_root_redirects_to_it(pool: PgPool) {
    let app = spawn_app(pool).await;
    let resp = app.http.get(app.url("/")).send().await.expect("GET /");
    assert!(resp.status().is_redirection(), "{}", resp.status());
    assert_eq!(resp.headers()[LOCATION], "/graphiql");
    let resp = app
        .http
        .get(app.url("/graphiql"))
        .send()
        .await
        .expect("GET /graphiql");
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.text().await.expect("html");
    assert!(html.contains("graphiql"), "not a GraphiQL page");
    assert!(
        html.contains("/graphql/ws"),
        "GraphiQL is not wired to the WebSocket endpoint"
    );

    // A WebSocket offering no protocol we speak is refused, not half-served.
    let resp = app
        .http
        .get(app.url("/graphql/ws"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Protocol", "mqtt")
        .send()
        .await
        .expect("GET /graphql/ws");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    app.stop().await;
}

/// Every operation of a batch runs with its own complexity budget, so a batch
/// is capped in length.
#[sqlx::test(migrations = "../migrations")]
async fn a_batch_of_more_than_ten_operations_is_refused(pool: PgPool) {
    let app = spawn_app(pool).await;
    let batch = |n: usize, accept: &'static str| {
        let ops: Vec<Value> = (0..n)
            .map(|_| json!({"query": "{ venues { mic } }"}))
            .collect();
        app.http
            .post(app.url("/graphql"))
            .header(ACCEPT, accept)
            .json(&ops)
            .send()
    };

    let resp = batch(10, "application/graphql-response+json")
        .await
        .expect("POST");
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.expect("json");
    let answers = body.as_array().expect("one answer per operation");
    assert_eq!(answers.len(), 10, "{body}");
    assert!(
        answers
            .iter()
            .all(|a| a["data"]["venues"][0]["mic"] == "XLON"),
        "{body}"
    );

    for (accept, status) in [
        ("application/graphql-response+json", StatusCode::BAD_REQUEST),
        ("application/json", StatusCode::OK),
    ] {
        let resp = batch(11, accept).await.expect("POST");
        assert_eq!(resp.status(), status, "{accept}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["data"], Value::Null, "{body}");
        assert_eq!(
            body["errors"][0]["message"], "at most 10 operations per batch, got 11",
            "{body}"
        );
    }
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn mutations_are_refused_over_get(pool: PgPool) {
    let app = spawn_app(pool).await;
    let mutation = "mutation { replayDeadLetters(all: true, dryRun: true) { replayed } }";
    let res = app
        .http
        .get(app.url("/graphql"))
        .query(&[("query", mutation)])
        .send()
        .await
        .expect("GET /graphql");
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        res.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("POST")
    );
    let body: Value = res.json().await.expect("JSON");
    assert_eq!(
        body["errors"][0]["extensions"]["code"],
        "METHOD_NOT_ALLOWED"
    );
    // A query over GET is still answered.
    let res = app
        .http
        .get(app.url("/graphql"))
        .query(&[("query", "{ venues { mic } }")])
        .send()
        .await
        .expect("GET /graphql");
    assert_eq!(res.status(), StatusCode::OK);
    app.stop().await;
}
