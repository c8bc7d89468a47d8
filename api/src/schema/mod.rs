//! The GraphQL schema, split by domain and merged: reference data
//! ([`refdata`]), latest values ([`latest`]), history pages ([`history`]),
//! snapshots ([`snapshot`]), live subscriptions ([`live`]) and, for admins, dead
//! letters ([`deadletters`]: the only mutation); the shared output types live in
//! [`types`]. [`guard`] bounds a document's size and shape before async-graphql
//! parses it.
//!
//! [`build`] is the one place the schema is assembled, for the server, the tests
//! and the SDL export alike.

pub mod compiled;
pub mod deadletters;
mod fast;
pub mod guard;
pub mod history;
pub mod latest;
pub mod live;
pub mod refdata;
pub mod snapshot;
pub mod types;

use std::sync::Arc;

use async_graphql::{ErrorExtensions, MergedObject, MergedSubscription, Schema, SchemaBuilder};
use sqlx::PgPool;
use tickgraph_enrich::refdata::RefCache;
use tickgraph_enrich::DeadLetters;

use crate::auth::{Principal, Users};
use crate::hub::Hub;

/// Most items one page may hold.
pub const MAX_PAGE: usize = 1000;
/// Most instruments one query may name.
pub const MAX_INSTRUMENTS: usize = 1000;
/// Most values any list argument of a subscription may hold.
pub const MAX_FILTER_VALUES: usize = 1000;

#[derive(MergedObject, Default)]
pub struct Query(
    refdata::RefDataQuery,
    latest::LatestQuery,
    history::HistoryQuery,
    snapshot::SnapshotQuery,
    deadletters::DeadLetterQuery,
);

#[derive(MergedObject, Default)]
pub struct Mutation(deadletters::DeadLetterMutation);

#[derive(MergedSubscription, Default)]
pub struct Subscription(live::TradeSubscription, live::QuoteSubscription);

pub type ApiSchema = Schema<Query, Mutation, Subscription>;

/// What resolvers reach through the context.
#[derive(Clone)]
pub struct Services {
    pub pool: PgPool,
    pub refs: RefCache,
    pub hub: Hub,
    /// Shard count of the stream layout, to give history rows stream cursors.
    pub shards: u16,
    /// The deployment's dead-letter streams (admin queries and replay).
    pub dead_letters: DeadLetters,
    /// Per-user limits; subscriptions count against them while they live.
    pub users: Arc<Users>,
}

/// The limits every request is checked against before it runs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_depth: usize,
    pub max_complexity: usize,
    pub introspection: bool,
    /// Size and shape bounds checked before parsing ([`guard`]).
    pub guard: guard::GuardLimits,
}

fn builder() -> SchemaBuilder<Query, Mutation, Subscription> {
    Schema::build(
        Query::default(),
        Mutation::default(),
        Subscription::default(),
    )
    .override_output_type_description::<chrono::DateTime<chrono::Utc>>(
        "An instant as an RFC 3339 string with up to nanosecond precision, e.g. \
             `2024-11-25T15:53:20.123456789+00:00`. Any offset is accepted as input.",
    )
    .override_output_type_description::<rust_decimal::Decimal>(
        "An exact decimal number as a string, e.g. `\"101.25\"`; never rounded \
             through floating point.",
    )
}

/// The schema a server runs.
pub fn build(limits: Limits, services: Services, default: Option<Principal>) -> ApiSchema {
    let mut b = builder().data(services);
    if let Some(p) = default {
        b = b.data(p);
    }
    let b = b
        // First, so that nothing parses or visits a document it would refuse.
        .extension(guard::Guard(limits.guard))
        .limit_recursive_depth(limits.guard.max_nesting)
        .limit_depth(limits.max_depth)
        .limit_complexity(limits.max_complexity);
    if limits.introspection {
        b.finish()
    } else {
        b.disable_introspection().finish()
    }
}

/// The schema as SDL, sorted so that the checked-in `schema.graphql` only changes
/// when the schema does. Needs no connections: resolvers never run.
pub fn sdl() -> String {
    builder().finish().sdl_with_options(
        async_graphql::SDLExportOptions::new()
            .sorted_fields()
            .sorted_arguments()
            .sorted_enum_items(),
    )
}

/// Complexity of a field that returns up to `items` of its selection: each item
/// costs what its selection does, plus one for the field itself. `cap` is the
/// most the resolver will ever return (it refuses more), so an out-of-range
/// argument is costed at the cap and gets the resolver's clearer error.
pub(crate) fn list_cost(items: usize, cap: usize, child_complexity: usize) -> usize {
    items
        .min(cap)
        .saturating_mul(child_complexity)
        .saturating_add(1)
}

/// [`list_cost`] of a page of `first` items.
pub(crate) fn page_cost(first: i32, child_complexity: usize) -> usize {
    list_cost(
        usize::try_from(first).unwrap_or(0),
        MAX_PAGE,
        child_complexity,
    )
}

pub(crate) fn page_size(first: i32) -> async_graphql::Result<usize> {
    usize::try_from(first)
        .ok()
        .filter(|f| *f <= MAX_PAGE)
        .ok_or_else(|| format!("`first` must be between 0 and {MAX_PAGE}, got {first}").into())
}

/// The key under which serde_json's `arbitrary_precision` (on in this
/// workspace, for exact decimals) hands over a number that is not a 64-bit
/// integer, as a one-entry map, to a deserializer that takes any value.
const PRIVATE_NUMBER: &str = "$serde_json::private::Number";

/// Puts back as numbers the variables that were deserialized straight into a
/// request: async-graphql's `ConstValue` reads the map above as an object, so
/// `{"maxRate": 0.5}` was refused as not a Float, and `1e300` as an Int showed
/// the private key in its error.
pub fn restore_numbers(variables: &mut async_graphql::Variables) {
    fn restore(v: &mut async_graphql::Value) {
        match v {
            async_graphql::Value::List(items) => items.iter_mut().for_each(restore),
            async_graphql::Value::Object(fields) => {
                let number = match (fields.len(), fields.get(PRIVATE_NUMBER)) {
                    (1, Some(async_graphql::Value::String(text))) => text.parse().ok(),
                    _ => None,
                };
                match number {
                    Some(n) => *v = async_graphql::Value::Number(n),
                    None => fields.values_mut().for_each(restore),
                }
            }
            _ => {}
        }
    }
    variables.values_mut().for_each(restore);
}

/// The principal the request runs as: the request's own (authenticated at
/// the edge), else the schema's (dev mode). None at all is refused, so a
/// forgotten edge can never serve data unauthenticated.
pub(crate) fn principal<'a>(
    ctx: &async_graphql::Context<'a>,
) -> async_graphql::Result<&'a Principal> {
    ctx.data_opt::<Principal>().ok_or_else(|| {
        async_graphql::Error::new(crate::auth::AuthError::Missing.to_string())
            .extend_with(|_, e| e.set("code", "UNAUTHENTICATED"))
    })
}

/// A failure the client cannot fix: logged here in full, reported to the client
/// without internals.
pub(crate) fn internal(what: &'static str, e: impl std::fmt::Display) -> async_graphql::Error {
    tracing::error!(error = %e, what, "query failed");
    async_graphql::Error::new(format!("{what} is unavailable, try again later"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_deserialized_into_a_request_are_numbers() {
        let mut r: async_graphql::Request = serde_json::from_str(
            r#"{"query": "{ a }", "variables": {"f": 0.5, "big": 1e400, "i": 7,
                "l": [1.5, [2e-3]], "o": {"x": -0.25, "s": "t"}}}"#,
        )
        .expect("a request");
        super::restore_numbers(&mut r.variables);
        let back = r.variables.into_value().into_json().expect("JSON");
        assert_eq!(back["f"].as_f64(), Some(0.5), "{back}");
        assert_eq!(back["i"].as_u64(), Some(7), "{back}");
        assert_eq!(back["l"][0].as_f64(), Some(1.5), "{back}");
        assert_eq!(back["l"][1][0].as_f64(), Some(0.002), "{back}");
        assert_eq!(back["o"]["x"].as_f64(), Some(-0.25), "{back}");
        assert_eq!(back["o"]["s"], "t", "{back}");
        // Kept as written: too large for a float, so no Float takes it.
        assert!(
            back["big"].is_number() && back["big"].as_f64().is_none(),
            "{back}"
        );
    }

    #[test]
    fn schema_graphql_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../schema.graphql");
        let sdl = super::sdl();
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::write(path, &sdl).expect("write schema.graphql");
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == sdl,
            "schema.graphql differs from the schema in the code; regenerate it with \
             `tickgraph schema > schema.graphql` (or `UPDATE_SCHEMA=1 cargo test -p \
             tickgraph-api schema_graphql_is_up_to_date`) and review the diff"
        );
    }
}
