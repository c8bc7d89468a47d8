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

/// The `(tag, value)` of each `attr` of each `<tag` in `html`.
fn attributes<'a>(html: &'a str, tag: &str, attr: &str) -> Vec<(&'a str, &'a str)> {
    let open = format!("<{tag}");
    let key = format!("{attr}=\"");
    html.split(open.as_str())
        .skip(1)
        .filter_map(|rest| {
            let (inside, _) = rest.split_once('>')?;
            let (_, value) = inside.split_once(key.as_str())?;
            let (value, _) = value.split_once('"')?;
            Some((inside, value))
        })
        .collect()
}

/// `scheme://host` of an absolute URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..]
        .find('/')
        .map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

#[sqlx::test(migrations = "../migrations")]
async fn graphiql_may_not_be_framed_and_runs_only_its_own_scripts(pool: PgPool) {
    use base64::Engine;
    use sha2::Digest;
    let app = spawn_app(pool).await;
    let resp = app
        .http
        .get(app.url("/graphiql"))
        .send()
        .await
        .expect("GET /graphiql");
    assert_eq!(resp.status(), StatusCode::OK);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_owned()
    };
    assert_eq!(header("x-frame-options"), "DENY");
    assert_eq!(header("x-content-type-options"), "nosniff");
    let csp = header("content-security-policy");
    let policy: std::collections::HashMap<&str, Vec<&str>> = csp
        .split(';')
        .filter_map(|d| {
            let mut words = d.split_whitespace();
            Some((words.next()?, words.collect()))
        })
        .collect();
    let sources = |d: &str| {
        policy
            .get(d)
            .unwrap_or_else(|| panic!("no {d} in {csp}"))
            .clone()
    };
    assert_eq!(sources("default-src"), ["'none'"], "{csp}");
    assert_eq!(sources("frame-ancestors"), ["'none'"], "{csp}");
    let scripts = sources("script-src");
    assert!(
        !scripts.contains(&"'unsafe-inline'") && !scripts.contains(&"'unsafe-eval'"),
        "{csp}"
    );
    let connect = sources("connect-src");
    assert!(connect.contains(&"'self'"), "{csp}");
    let socket = format!("ws://{}", app.addr);
    assert!(connect.contains(&socket.as_str()), "{csp}");

    // Today's page still works under it: everything it loads is allowed, and
    // its inline script is, by its hash.
    let html = resp.text().await.expect("html");
    let external = attributes(&html, "script", "src");
    assert!(!external.is_empty(), "no external script: {html}");
    for (_, src) in external {
        assert!(scripts.contains(&origin(src)), "script {src}: {csp}");
    }
    for (tag, href) in attributes(&html, "link", "href") {
        let directive = if tag.contains("stylesheet") {
            "style-src"
        } else {
            "img-src"
        };
        assert!(
            sources(directive).contains(&origin(href)),
            "{href} ({directive}): {csp}"
        );
    }
    let mut inline = 0;
    for body in html.split("<script>").skip(1) {
        let (body, _) = body.split_once("</script>").expect("a closed script");
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body));
        assert!(
            scripts.contains(&format!("'sha256-{hash}'").as_str()),
            "the inline script is not allowed: {csp}"
        );
        inline += 1;
    }
    assert_eq!(inline, 1, "{html}");
    for path in ["'/graphql'", "'/graphql/ws'"] {
        assert!(
            html.contains(path),
            "GraphiQL talks to another origin: {html}"
        );
    }
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
