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
    let body = app
        .post(
            "{ trades(instrument: \"AAPL\") { edges { node { id } } } }",
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
