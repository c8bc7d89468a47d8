//! One serialization per event per selection, shared by every subscriber.
//!
//! A subscription's event is resolved and serialized once per subscriber: with
//! many subscribers on the same events, that was most of the api's work. When a
//! selection is only plain leaf fields (the fast path of
//! [`crate::schema`]'s live types), the event's JSON object for that selection is
//! made once, kept in the tick's [`JsonCache`] as text, and handed to every
//! subscriber with the same selection: to a planned subscription as it is
//! (`schema::compiled::Answer::Data`, written around by the WebSocket), to the
//! executor as an `async_graphql::Value::Binary` over the same text ([`binary`]).
//! No field of the schema is binary, so that variant only ever means "already
//! JSON" here; the transports ([`crate::ws`], [`crate::sse`]) write it as it is
//! with [`response_json`], which every consumer of subscription responses uses
//! instead of `serde_json` of the `Response`.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use async_graphql::parser::types::{Selection, SelectionSet};
use async_graphql::{Name, Positioned, Response, ServerError, Value};
use bytes::Bytes;

/// Selections cached per tick, at most: beyond them a tick's JSON is made per
/// subscriber, as before, rather than kept.
const MAX_SELECTIONS: usize = 4;

/// A tick's JSON objects, one per selection that asked for it.
#[derive(Default)]
pub struct JsonCache(Mutex<Vec<Cached>>);

struct Cached {
    key: SelectionKey,
    json: Arc<str>,
}

/// A plain selection (fields without arguments, directives or sub-selections)
/// as its JSON is written: its (response key, field name) pairs in order, a
/// response key selected twice kept once where it first appears (validation
/// made sure they are the same field), and their hash. Made once per
/// subscription where it can be (a planned one), else per event.
#[derive(Debug, Clone)]
pub struct SelectionKey {
    hash: u64,
    fields: Arc<[(Name, Name)]>,
}

impl SelectionKey {
    /// The key of `set`; `None` when it holds anything but plain fields.
    pub fn of(set: &Positioned<SelectionSet>) -> Option<Self> {
        let mut pairs: Vec<(Name, Name)> = Vec::with_capacity(set.node.items.len());
        for (key, name) in fields(set)? {
            if !pairs.iter().any(|(k, _)| k == key) {
                pairs.push((key.clone(), name.clone()));
            }
        }
        let fields: Arc<[(Name, Name)]> = pairs.into();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (key, name) in fields.iter() {
            key.as_str().hash(&mut h);
            name.as_str().hash(&mut h);
        }
        Some(Self {
            hash: h.finish(),
            fields,
        })
    }

    /// The (response key, field name) pairs, each key once.
    pub fn fields(&self) -> &[(Name, Name)] {
        &self.fields
    }

    fn same(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.fields, &other.fields) || self.fields == other.fields)
    }
}

impl std::fmt::Debug for JsonCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonCache")
    }
}

/// A copy starts empty: it is only a cache.
impl Clone for JsonCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Caches never make two ticks differ.
impl PartialEq for JsonCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for JsonCache {}

/// The (response key, field name) pairs of a selection of plain fields, or
/// `None` when it holds anything else (fragments, arguments, directives,
/// sub-selections).
fn fields(set: &Positioned<SelectionSet>) -> Option<impl Iterator<Item = (&Name, &Name)>> {
    let plain = |s: &Selection| match s {
        Selection::Field(f) => {
            let f = &f.node;
            f.arguments.is_empty()
                && f.directives.is_empty()
                && f.selection_set.node.items.is_empty()
        }
        _ => false,
    };
    if !set.node.items.iter().all(|i| plain(&i.node)) {
        return None;
    }
    Some(set.node.items.iter().filter_map(|i| match &i.node {
        Selection::Field(f) => {
            let f = &f.node;
            Some((&f.alias.as_ref().unwrap_or(&f.name).node, &f.name.node))
        }
        _ => None,
    }))
}

impl JsonCache {
    /// The JSON of the object the selection `key` selects, from the cache or
    /// made by `make` (then kept); `None` when `make` gives `None` (a field
    /// that is not a plain leaf). Text, checked once when made, so a transport
    /// writes it to every subscriber as it is.
    pub fn get_or_make(
        &self,
        key: &SelectionKey,
        make: impl FnOnce() -> Option<String>,
    ) -> Option<Arc<str>> {
        {
            let cached = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = cached.iter().find(|c| c.key.same(key)) {
                return Some(c.json.clone());
            }
        }
        let json: Arc<str> = make()?.into();
        let mut cached = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if cached.len() < MAX_SELECTIONS && !cached.iter().any(|c| c.key.same(key)) {
            cached.push(Cached {
                key: key.clone(),
                json: json.clone(),
            });
        }
        Some(json)
    }
}

/// Shared JSON as the executor carries it, a `Value::Binary`, without a copy.
pub fn binary(json: Arc<str>) -> Value {
    Value::Binary(Bytes::from_owner(Text(json)))
}

/// Text as bytes, for [`Bytes::from_owner`].
struct Text(Arc<str>);

impl AsRef<[u8]> for Text {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// `value` with every `Binary` (already-JSON) replaced by what it holds.
fn materialize(value: Value) -> Value {
    match value {
        Value::Binary(b) => serde_json::from_slice::<serde_json::Value>(&b)
            .ok()
            .and_then(|v| Value::from_json(v).ok())
            .unwrap_or(Value::Null),
        Value::List(items) => Value::List(items.into_iter().map(materialize).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, materialize(v))).collect())
        }
        other => other,
    }
}

/// The JSON of a subscription response (what goes in a `next` message's
/// `payload`), with already-JSON values written as they are.
pub fn response_json(r: &Response) -> Result<String, serde_json::Error> {
    let mut out = String::new();
    write_response_json(r, &mut out)?;
    Ok(out)
}

/// The response `{"data":{<key>:<object>}}`, appended to `out`: `key` is a
/// JSON string (quotes included) and `object` a JSON object.
pub fn write_data(out: &mut String, key: &str, object: &str) {
    out.reserve(object.len() + key.len() + 12);
    out.push_str("{\"data\":{");
    out.push_str(key);
    out.push(':');
    out.push_str(object);
    out.push_str("}}");
}

/// [`response_json`], appended to `out`: a transport writes its envelope
/// around it without copying the payload again.
pub fn write_response_json(r: &Response, out: &mut String) -> Result<(), serde_json::Error> {
    if r.errors.is_empty() && r.extensions.is_empty() {
        if let Value::Object(map) = &r.data {
            if let (1, Some((key, Value::Binary(b)))) = (map.len(), map.iter().next()) {
                if let Ok(object) = std::str::from_utf8(b) {
                    write_data(out, &serde_json::to_string(key.as_str())?, object);
                    return Ok(());
                }
            }
        }
    }
    let json = if contains_binary(&r.data) {
        serde_json::to_string(&View {
            data: materialize(r.data.clone()),
            extensions: &r.extensions,
            errors: &r.errors,
        })?
    } else {
        serde_json::to_string(r)?
    };
    out.push_str(&json);
    Ok(())
}

/// A `Response` as it serializes, with its data replaced.
#[derive(serde::Serialize)]
struct View<'a> {
    data: Value,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extensions: &'a BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "<[ServerError]>::is_empty")]
    errors: &'a [ServerError],
}

fn contains_binary(v: &Value) -> bool {
    match v {
        Value::Binary(_) => true,
        Value::List(items) => items.iter().any(contains_binary),
        Value::Object(map) => map.values().any(contains_binary),
        _ => false,
    }
}

/// A subscription response's data as plain JSON, for tests and tools.
pub fn data_json(r: &Response) -> serde_json::Value {
    materialize(r.data.clone())
        .into_json()
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use async_graphql::indexmap::IndexMap;

    use super::*;

    fn selection(query: &str) -> Positioned<SelectionSet> {
        let doc = async_graphql::parser::parse_query(query).expect("query");
        let op = doc.operations.iter().next().expect("operation").1;
        let Selection::Field(f) = &op.node.selection_set.node.items[0].node else {
            panic!("a field");
        };
        f.node.selection_set.clone()
    }

    fn object(pairs: &[(&str, &str)]) -> Value {
        Value::Object(
            pairs
                .iter()
                .map(|(k, v)| (Name::new(*k), Value::String((*v).to_owned())))
                .collect::<IndexMap<_, _>>(),
        )
    }

    #[test]
    fn the_same_selection_is_made_once_and_another_gets_its_own() {
        let cache = JsonCache::default();
        let key = |q: &str| SelectionKey::of(&selection(q)).expect("a plain selection");
        let a = key("subscription { quotes { bid ask } }");
        let again = key("subscription { quotes { bid ask } }");
        let aliased = key("subscription { quotes { b: bid ask } }");
        let made = std::cell::Cell::new(0);
        let make = |pairs: &'static [(&'static str, &'static str)]| {
            made.set(made.get() + 1);
            serde_json::to_string(&object(pairs)).ok()
        };
        let first = cache.get_or_make(&a, || make(&[("bid", "1"), ("ask", "2")]));
        assert_eq!(first.as_deref(), Some(r#"{"bid":"1","ask":"2"}"#));
        let second = cache.get_or_make(&again, || make(&[("bid", "x"), ("ask", "y")]));
        assert_eq!(second, first, "the cached JSON, not made again");
        let other = cache.get_or_make(&aliased, || make(&[("b", "1"), ("ask", "2")]));
        assert_eq!(other.as_deref(), Some(r#"{"b":"1","ask":"2"}"#));
        assert_eq!(made.get(), 2);
        assert_eq!(cache.get_or_make(&a, || None), first);
    }

    #[test]
    fn a_selection_key_is_plain_fields_each_response_key_once() {
        let names = |q: &str| {
            SelectionKey::of(&selection(q)).map(|k| {
                k.fields()
                    .iter()
                    .map(|(key, name)| format!("{key}={name}"))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            names("subscription { quotes { bid ask b: bid bid } }"),
            Some(vec!["bid=bid".into(), "ask=ask".into(), "b=bid".into()])
        );
        for not_plain in [
            "subscription { quotes { ... on Quote { bid } } }",
            "subscription { quotes { bid @skip(if: true) } }",
            "subscription { quotes { reference { name } } }",
            "subscription { quotes { bid(x: 1) } }",
        ] {
            assert_eq!(names(not_plain), None, "{not_plain}");
        }
    }

    #[test]
    fn a_response_with_shared_json_serializes_as_if_it_were_a_value() {
        let json = br#"{"bid":"1","n":null}"#;
        let mut data = IndexMap::new();
        data.insert(Name::new("q"), Value::Binary(Bytes::from_static(json)));
        let shared = Response::new(Value::Object(data.clone()));
        let mut plain = IndexMap::new();
        plain.insert(
            Name::new("q"),
            Value::from_json(serde_json::from_slice(json).expect("json")).expect("value"),
        );
        let expected = serde_json::to_string(&Response::new(Value::Object(plain))).expect("json");
        assert_eq!(response_json(&shared).expect("json"), expected);
        assert_eq!(
            data_json(&shared),
            serde_json::json!({"q": {"bid": "1", "n": null}})
        );
        // With an error beside it, the shared part is still written as JSON.
        let mut with_error = Response::new(Value::Object(data));
        with_error.errors.push(ServerError::new("boom", None));
        let mut expected: serde_json::Value = serde_json::from_str(&expected).expect("json");
        expected["errors"] = serde_json::json!([{"message": "boom"}]);
        let got: serde_json::Value =
            serde_json::from_str(&response_json(&with_error).expect("json")).expect("json");
        assert_eq!(got, expected);
    }
}
