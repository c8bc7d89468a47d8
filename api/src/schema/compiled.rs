//! Subscriptions run without the GraphQL executor.
//!
//! Almost every subscription a screen opens is one `trades` or `quotes` field
//! with literal or variable arguments and a selection of plain leaf fields. The
//! executor keeps, per subscription, its parsed document, query environment,
//! contexts and boxed futures, about 10 KiB, and resolves every event through
//! them. A subscription of that shape is instead *planned* here: checked (by
//! rules stricter than GraphQL's, so that anything in doubt is not planned),
//! its arguments coerced by async-graphql's own input types, and then served
//! straight from the hub: per subscription only the feed, the root field's
//! selection and its response key are kept, and every event is the shared JSON
//! of its tick for that selection ([`crate::shared_json`]).
//!
//! Whatever is not planned, and any subscription whose opening fails (a bad
//! argument, an expired cursor), goes to the executor as before, so errors and
//! every other document are answered exactly as they always were. Tests compare
//! the two paths message for message.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_graphql::parser::types::{DocumentOperations, OperationType, Selection, Type};
use async_graphql::{
    InputType, Name, PathSegment, Pos, Request, Response, ServerError, Value, Variables,
};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use super::fast::{QUOTE_LEAVES, TRADE_LEAVES};
use super::live::{conflation_fields, hub_error, open_with, LiveArgs, LiveKind};
use super::types::{QuoteConflationKind, TradeConflationKind};
use super::{Limits, Services};
use crate::auth::Principal;
use crate::hub::Filter;
use crate::shared_json::{write_data, write_response_json, SelectionKey};
use crate::tick::{QuoteTick, TradeTick};
use crate::ws::Gate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Trades,
    Quotes,
}

impl Field {
    fn of(name: &str) -> Option<Self> {
        match name {
            "trades" => Some(Field::Trades),
            "quotes" => Some(Field::Quotes),
            _ => None,
        }
    }

    fn leaves(self) -> &'static [&'static str] {
        match self {
            Field::Trades => TRADE_LEAVES,
            Field::Quotes => QUOTE_LEAVES,
        }
    }

    /// The field's arguments and their types, as the schema declares them.
    fn argument_type(self, arg: &str) -> Option<&'static str> {
        Some(match arg {
            "instruments" | "venues" => "[String!]",
            "assetClasses" => "[AssetClass!]",
            "sides" if self == Field::Trades => "[Side!]",
            "maxRate" => "Float",
            "conflateBy" if self == Field::Trades => "[TradeConflationField!]",
            "conflateBy" => "[QuoteConflationField!]",
            "snapshot" => "Boolean!",
            "after" => "String",
            _ => return None,
        })
    }
}

/// A planned subscription: what to open and how to answer each event.
pub struct Plan {
    field: Field,
    /// The response key (the alias, else `trades`/`quotes`).
    key: Name,
    pos: Pos,
    args: Args,
    /// The root field's selection, made once, not per event.
    selection: SelectionKey,
}

#[derive(Default)]
struct Args {
    live: LiveArgs,
    after: Option<String>,
}

/// Whether a variable declared as `declared` may be used where the schema
/// expects `expected`: the same type, or its non-null form.
fn fits(declared: &Type, expected: &str) -> bool {
    let text = declared.to_string();
    text == expected || (!expected.ends_with('!') && text == format!("{expected}!"))
}

/// The plan of `request`, when it is a subscription of the plain shape.
pub fn plan(request: &Request, limits: &Limits) -> Option<Plan> {
    // The parser must not see what the guard refuses; the executor refuses it.
    super::guard::check_text(&request.query, &limits.guard).ok()?;
    let doc = async_graphql::parser::parse_query(&request.query).ok()?;
    if !doc.fragments.is_empty() {
        return None;
    }
    let op = match (&doc.operations, &request.operation_name) {
        (DocumentOperations::Single(op), None) => op,
        (DocumentOperations::Multiple(ops), Some(name)) if ops.len() == 1 => {
            ops.get(name.as_str())?
        }
        (DocumentOperations::Multiple(ops), None) if ops.len() == 1 => ops.values().next()?,
        _ => return None,
    };
    let op = &op.node;
    if op.ty != OperationType::Subscription || !op.directives.is_empty() {
        return None;
    }
    let [item] = op.selection_set.node.items.as_slice() else {
        return None;
    };
    let Selection::Field(root) = &item.node else {
        return None;
    };
    let root_pos = root.pos;
    let root = &root.node;
    let field = Field::of(root.name.node.as_str())?;
    if !root.directives.is_empty() {
        return None;
    }
    // Depth 2; complexity and selections one per field. Under limits that
    // small, the executor decides.
    let fields = root.selection_set.node.items.len();
    if limits.max_depth < 2
        || limits.max_complexity < fields + 1
        || limits.guard.max_subscription_selections < fields + 1
        || fields == 0
    {
        return None;
    }
    let mut keys = HashSet::new();
    for item in &root.selection_set.node.items {
        let Selection::Field(f) = &item.node else {
            return None;
        };
        let f = &f.node;
        let plain = f.arguments.is_empty()
            && f.directives.is_empty()
            && f.selection_set.node.items.is_empty()
            && field.leaves().contains(&f.name.node.as_str());
        // A key used twice must be merged by the executor's rules.
        if !plain || !keys.insert(f.response_key().node.clone()) {
            return None;
        }
    }
    // Every declared variable used, each where its type fits, none undeclared,
    // none with a default.
    let declared: HashMap<&str, &Type> = op
        .variable_definitions
        .iter()
        .map(|d| (d.node.name.node.as_str(), &d.node.var_type.node))
        .collect();
    if op
        .variable_definitions
        .iter()
        .any(|d| d.node.default_value.is_some() || !d.node.directives.is_empty())
    {
        return None;
    }
    let mut used: HashSet<String> = HashSet::new();
    let mut args = Args::default();
    let mut seen = HashSet::new();
    for (name, value) in &root.arguments {
        let name = name.node.as_str();
        let expected = field.argument_type(name)?;
        if !seen.insert(name) {
            return None;
        }
        let mut vars = Vec::new();
        let value_text = value.node.to_string();
        let value = value
            .node
            .clone()
            .into_const_with(|v| {
                let got = variable(&request.variables, &v);
                vars.push(v);
                got
            })
            .ok()?;
        match vars.as_slice() {
            [] => {}
            // The whole value is one variable: its declared type must fit.
            [var] if value_text == format!("${var}") => {
                if !fits(declared.get(var.as_str())?, expected) {
                    return None;
                }
                used.insert(var.to_string());
            }
            // Variables inside lists are valid GraphQL, but not planned.
            _ => return None,
        }
        set(&mut args, field, name, value)?;
    }
    if used.len() != declared.len() {
        return None;
    }
    Some(Plan {
        field,
        key: root.response_key().node.clone(),
        pos: root_pos,
        args,
        selection: SelectionKey::of(&root.selection_set)?,
    })
}

fn variable(vars: &Variables, name: &Name) -> Result<Value, ()> {
    // A variable declared but not given is null, as the executor reads it.
    Ok(vars.get(name).cloned().unwrap_or(Value::Null))
}

/// Coerces one argument of `field` with the input type the resolver declares.
fn set(args: &mut Args, field: Field, name: &str, value: Value) -> Option<()> {
    fn parse<T: InputType>(v: Value) -> Option<T> {
        T::parse(Some(v)).ok()
    }
    match name {
        "conflateBy" => {
            args.live.conflate_by = match field {
                Field::Trades => {
                    conflation_fields(parse::<Option<Vec<TradeConflationKind>>>(value)?)
                }
                Field::Quotes => {
                    conflation_fields(parse::<Option<Vec<QuoteConflationKind>>>(value)?)
                }
            }
        }
        "instruments" => args.live.instruments = parse(value)?,
        "venues" => args.live.venues = parse(value)?,
        "assetClasses" => args.live.asset_classes = parse(value)?,
        "sides" => args.live.sides = parse(value)?,
        "maxRate" => args.live.max_rate = parse(value)?,
        "snapshot" => args.live.snapshot = parse(value)?,
        "after" => args.after = parse(value)?,
        _ => return None,
    }
    Some(())
}

/// One answer of an operation's stream.
pub enum Answer {
    /// A GraphQL response: the executor's, or a planned subscription's error.
    Response(Response),
    /// A planned subscription's event: the response `{"data":{<key>:<json>}}`,
    /// written by the transport around the tick's shared JSON, with no
    /// `Response` or value tree made per event and subscriber.
    Data {
        /// The response key, as a JSON string (quotes included).
        key: Arc<str>,
        /// The tick's shared JSON for the subscription's selection.
        json: Arc<str>,
    },
}

impl Answer {
    /// Appends the response's JSON (a `next` message's `payload`) to `out`.
    pub fn write_json(&self, out: &mut String) -> Result<(), serde_json::Error> {
        match self {
            Answer::Response(r) => write_response_json(r, out),
            Answer::Data { key, json } => {
                write_data(out, key, json);
                Ok(())
            }
        }
    }
}

/// Runs a plan: opens the feed and answers each event with its shared JSON.
/// When opening fails, `fallback` (the executor) answers instead, so the error
/// is the executor's own.
pub fn run(
    plan: Plan,
    services: Arc<Services>,
    who: Principal,
    gate: Option<Arc<Gate>>,
    fallback: impl FnOnce() -> BoxStream<'static, Response> + Send + 'static,
) -> BoxStream<'static, Answer> {
    futures_util::stream::once(async move {
        let Plan {
            field,
            key,
            pos,
            args,
            selection,
        } = plan;
        let values = args.live.values();
        let Ok(f) = args.live.filter() else {
            return fallback().map(Answer::Response).boxed();
        };
        // Boxed: this block stays in the subscription's stream for its whole
        // life, and inline it would keep the opening's state machine (snapshot
        // and history queries) there after opening.
        let opened = match field {
            Field::Trades => {
                Box::pin(serve::<TradeTick>(
                    &services, &who, gate, f, args.after, values, selection, key, pos,
                ))
                .await
            }
            Field::Quotes => {
                Box::pin(serve::<QuoteTick>(
                    &services, &who, gate, f, args.after, values, selection, key, pos,
                ))
                .await
            }
        };
        opened.unwrap_or_else(|| fallback().map(Answer::Response).boxed())
    })
    .flatten()
    .boxed()
}

/// Opens the feed and answers each event with its shared JSON under `key`;
/// `None` when opening fails.
#[allow(clippy::too_many_arguments)]
async fn serve<T: LiveKind>(
    services: &Services,
    who: &Principal,
    gate: Option<Arc<Gate>>,
    filter: Filter,
    after: Option<String>,
    values: usize,
    selection: SelectionKey,
    key: Name,
    pos: Pos,
) -> Option<BoxStream<'static, Answer>> {
    let feed = open_with::<T>(services, who, gate, filter, after, values)
        .await
        .ok()?;
    let key_json: Arc<str> = serde_json::to_string(key.as_str()).ok()?.into();
    Some(
        feed.map(move |r| match r {
            Ok(t) => match t.json(&selection) {
                Some(json) => Answer::Data {
                    key: Arc::clone(&key_json),
                    json,
                },
                None => Answer::Response(Response::from_errors(vec![ServerError::new(
                    "internal error: a planned selection was not plain",
                    Some(pos),
                )])),
            },
            Err(e) => Answer::Response(Response::from_errors(vec![hub_error(e)
                .into_server_error(pos)
                .with_path(vec![PathSegment::Field(key.to_string())])])),
        })
        .boxed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_depth: 16,
            max_complexity: 10_000,
            introspection: true,
            guard: Default::default(),
        }
    }

    fn planned(query: &str, vars: serde_json::Value) -> bool {
        let req = Request::new(query).variables(Variables::from_json(vars));
        plan(&req, &limits()).is_some()
    }

    #[test]
    fn plain_subscriptions_are_planned_and_anything_in_doubt_is_not() {
        let none = serde_json::json!({});
        assert!(planned("subscription { quotes { bid ask } }", none.clone()));
        assert!(planned(
            "subscription Q($i: [String!]!, $r: Float) { q: quotes(instruments: $i, maxRate: $r, snapshot: true) { b: bid __typename } }",
            serde_json::json!({"i": ["AAPL"], "r": 4})
        ));
        assert!(planned(
            "subscription { trades(sides: BUY, assetClasses: [EQUITY], venues: \"XNAS\") { price } }",
            none.clone()
        ));
        for doubtful in [
            "{ fxRates { currency } }",
            "subscription { quotes { reference { name } } }",
            "subscription { quotes { ... on Quote { bid } } }",
            "subscription { quotes { bid @skip(if: true) } }",
            "subscription { quotes { a: bid a: ask } }",
            "subscription { quotes { bid } trades { price } }",
            "subscription { quotes(sides: [BUY]) { bid } }",
            "subscription { quotes { nope } }",
            "subscription { quotes(instruments: [1]) { bid } }",
            "subscription($v: [String]) { quotes(venues: $v) { bid } }",
            "subscription($v: [String!], $unused: Int) { quotes(venues: $v) { bid } }",
            "subscription { quotes(venues: [$undeclared]) { bid } }",
            "subscription { quotes(snapshot: null) { bid } }",
            "subscription { quotes(venues: [\"A\"], venues: [\"B\"]) { bid } }",
            "subscription { quotes { } }",
            "subscription",
        ] {
            assert!(!planned(doubtful, none.clone()), "{doubtful}");
        }
    }

    /// The leaf lists match the schema: every field of `Trade`/`Quote` but
    /// `reference`, plus `__typename`.
    #[test]
    fn the_leaf_lists_are_the_schemas_fields() {
        let sdl = super::super::sdl();
        for (ty, leaves) in [("Trade", TRADE_LEAVES), ("Quote", QUOTE_LEAVES)] {
            let body = sdl
                .split(&format!("type {ty} {{"))
                .nth(1)
                .and_then(|rest| rest.split("\n}").next())
                .expect("type in SDL");
            let mut in_doc = false;
            let mut fields: Vec<&str> = Vec::new();
            for line in body.lines().map(str::trim) {
                if line.starts_with("\"\"\"") {
                    // A one-line description opens and closes on its line.
                    let one_line = line.len() > 3 && line.ends_with("\"\"\"");
                    if !one_line {
                        in_doc = !in_doc;
                    }
                    continue;
                }
                if in_doc || line.is_empty() {
                    continue;
                }
                if let Some((name, _)) = line.split_once(':') {
                    fields.push(name.trim());
                }
            }
            let mut want: Vec<&str> = fields.into_iter().filter(|f| *f != "reference").collect();
            want.push("__typename");
            want.sort_unstable();
            let mut have = leaves.to_vec();
            have.sort_unstable();
            assert_eq!(have, want, "{ty}");
        }
    }

    #[test]
    fn a_variable_fits_its_type_or_the_non_null_form() {
        let ty = |s: &str| Type::new(s).expect("type");
        assert!(fits(&ty("[String!]"), "[String!]"));
        assert!(fits(&ty("[String!]!"), "[String!]"));
        assert!(!fits(&ty("[String]"), "[String!]"));
        assert!(!fits(&ty("Boolean"), "Boolean!"));
    }
}
