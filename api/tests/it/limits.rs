//! Request limits: depth, complexity and introspection, as configured.

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{spawn_app, spawn_app_with};

/// The introspection query GraphiQL sends on load.
const INTROSPECTION: &str = "query IntrospectionQuery { __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types { ...FullType }
    directives { name description locations args { ...InputValue } } } }
  fragment FullType on __Type { kind name description
    fields(includeDeprecated: true) { name description args { ...InputValue } type { ...TypeRef }
      isDeprecated deprecationReason }
    inputFields { ...InputValue } interfaces { ...TypeRef }
    enumValues(includeDeprecated: true) { name description isDeprecated deprecationReason }
    possibleTypes { ...TypeRef } }
  fragment InputValue on __InputValue { name description type { ...TypeRef } defaultValue }
  fragment TypeRef on __Type { kind name ofType { kind name ofType { kind name ofType { kind name
    ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } } } } }";

#[sqlx::test(migrations = "../migrations")]
async fn default_limits_refuse_a_too_deep_query_but_let_graphiql_in(pool: PgPool) {
    let app = spawn_app(pool).await;
    let data = app.data(INTROSPECTION, json!({})).await;
    assert_eq!(data["__schema"]["subscriptionType"]["name"], "Subscription");

    let mut deep = String::from("{ __schema { types { fields { type { kind ");
    for _ in 0..14 {
        deep.push_str("ofType { kind ");
    }
    deep.push_str(&"}".repeat(14 + 5));
    let body = app.post(&deep, json!({})).await;
    assert_eq!(body["data"], serde_json::Value::Null, "{body}");
    assert_eq!(
        body["errors"][0]["message"], "Query is nested too deep.",
        "{body}"
    );
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn configured_limits_apply(pool: PgPool) {
    let app = spawn_app_with(pool, 1, |c| {
        c.max_depth = 3;
        c.max_complexity = 4;
        c.introspection = false;
    })
    .await;
    // Depth 3 and four fields: allowed.
    app.data(
        "{ instrument(symbol: \"AAPL\") { listingVenue { mic name } } }",
        json!({}),
    )
    .await;
    // Depth 4; a page of one keeps it within the complexity limit too.
    let body = app
        .post(
            "{ trades(instrument: \"AAPL\", first: 1) { edges { node { id } } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body["errors"][0]["message"], "Query is nested too deep.",
        "{body}"
    );
    let body = app
        .post("{ venues { mic name country timezone } }", json!({}))
        .await;
    assert_eq!(
        body["errors"][0]["message"], "Query is too complex.",
        "{body}"
    );
    // With introspection off, async-graphql answers the meta fields with null.
    let data = app
        .data("{ __schema { queryType { name } } }", json!({}))
        .await;
    assert_eq!(data, json!({"__schema": null}));
    let data = app
        .data("{ __type(name: \"Query\") { name } }", json!({}))
        .await;
    assert_eq!(data, json!({"__type": null}));
    app.stop().await;
}

/// Pages and lists cost their selection once per item they may return, so
/// aliasing a big page many times cannot hide under the limit.
#[sqlx::test(migrations = "../migrations")]
async fn pages_and_lists_cost_their_selection_per_item(pool: PgPool) {
    let app = spawn_app(pool).await;
    let many: Vec<String> = (0..1000).map(|i| format!("S{i}")).collect();
    // Each costs just over the default limit of 10000; each was 12 at most when
    // complexity ignored sizes.
    let too_complex = [
        (
            "{ trades(instrument: \"AAPL\", first: 1000) { nodes {
                id source seq instrument venue ts price qty side notional } } }",
            json!({}),
        ),
        (
            "{ quotes(instrument: \"AAPL\", first: 1000) { nodes {
                id source seq instrument venue ts bid ask bidSize askSize } } }",
            json!({}),
        ),
        (
            "{ instruments(first: 1000) { nodes {
                symbol name assetClass currency venue tickSize lotSize sector isin
                listingVenue { mic } } } }",
            json!({}),
        ),
        (
            "query($i: [String!]!) { snapshot(instruments: $i, at: \"2024-11-25T15:53:20Z\") {
                instrument quote { id bid ask mid } trade { id price qty side } } }",
            json!({ "i": many }),
        ),
        (
            "query($i: [String!]!) { latestQuotes(instruments: $i) {
                id source seq instrument venue ts bid ask bidSize askSize } }",
            json!({ "i": many }),
        ),
        (
            "query($i: [String!]!) { latestTrades(instruments: $i) {
                id source seq instrument venue ts price qty side notional } }",
            json!({ "i": many }),
        ),
    ];
    for (query, vars) in too_complex {
        let body = app.post(query, vars).await;
        // Only the errors: the data of 1000 items would drown the message.
        let errors = &body["errors"];
        assert_eq!(
            errors[0]["message"], "Query is too complex.",
            "{query}: {errors}"
        );
        assert_eq!(body["data"], serde_json::Value::Null, "{query}");
    }

    // The reviewer's case: one modest page, aliased.
    let aliased: String = (0..10)
        .map(|i| {
            format!(
                "t{i}: trades(instrument: \"AAPL\", first: 1000) {{ edges {{ node {{ id }} }} }} "
            )
        })
        .collect();
    let body = app.post(&format!("{{ {aliased} }}"), json!({})).await;
    assert_eq!(
        body["errors"][0]["message"], "Query is too complex.",
        "{body}"
    );

    // What a GraphiQL user writes still runs: a default page with its page info,
    // a full page of a few fields, reference data, a few latest values.
    let data = app
        .data(
            "{ trades(instrument: \"AAPL\") {
                 edges { cursor node { id ts price qty side venue reference { name } } }
                 pageInfo { hasNextPage endCursor } }
               full: quotes(instrument: \"AAPL\", first: 1000) { nodes { id ts bid ask } }
               instruments { totalCount nodes { symbol name currency } }
               latestQuotes(instruments: [\"AAPL\", \"MSFT\"]) { id mid } }",
            json!({}),
        )
        .await;
    assert_eq!(data["instruments"]["totalCount"], 5, "{data}");
    app.stop().await;
}

/// A subscription keeps its document as long as it lives, so its selections
/// and names are bounded more tightly than a query's.
#[sqlx::test(migrations = "../migrations")]
async fn a_subscription_document_is_bounded_in_selections_and_names(pool: PgPool) {
    let app = spawn_app_with(pool, 1, |c| c.guard.max_subscription_selections = 10).await;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    let fields = |n: usize| -> String { (0..n).map(|i| format!("f{i}: bid ")).collect() };
    let long = "a".repeat(tickgraph_api::schema::guard::MAX_NAME_BYTES + 1);
    let cases = [
        (
            format!("subscription {{ quotes {{ {} }} }}", fields(10)),
            "Subscription is too large: more than 10 selections with its fragments spread \
             (the server keeps a subscription's document for as long as it lives).",
        ),
        (
            format!("subscription {{ quotes {{ {long}: bid }} }}"),
            "Query has a name or number longer than 256 bytes.",
        ),
    ];
    for (id, (query, error)) in cases.into_iter().enumerate() {
        let id = id.to_string();
        ws.send(json!({"id": id, "type": "subscribe", "payload": {"query": query}}))
            .await;
        let msg = ws.expect().await;
        assert_eq!(
            (msg["type"].as_str(), msg["id"].as_str()),
            (Some("error"), Some(id.as_str())),
            "{msg}"
        );
        assert_eq!(msg["payload"][0]["message"], error, "{msg}");
    }
    // At the limit it is served; a query may still select more.
    ws.send(json!({"id": "ok", "type": "subscribe", "payload": {
        "query": format!("subscription {{ quotes {{ {} }} }}", fields(9))}}))
        .await;
    app.wait_for_subscribers(1).await;
    let data = app
        .data(
            &format!("{{ venues {{ {} }} }}", "mic ".repeat(20)),
            json!({}),
        )
        .await;
    assert!(data["venues"].is_array(), "{data}");
    app.stop().await;
}

/// In dev mode there are no users: only the per-connection limit applies.
#[sqlx::test(migrations = "../migrations")]
async fn dev_mode_has_no_per_user_subscription_limit(pool: PgPool) {
    let app = spawn_app_with(pool, 1, |c| {
        c.users.max_subscriptions = 1;
        c.users.max_filter_values = 1;
    })
    .await;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    for id in ["a", "b", "c"] {
        ws.send(json!({"id": id, "type": "subscribe", "payload": {
            "query": "subscription { quotes(instruments: [\"AAPL\", \"MSFT\"]) { bid } }"}}))
            .await;
    }
    app.wait_for_subscribers(3).await;
    app.stop().await;
}
