//! Every numeric argument of the schema at its extremes, and every list
//! argument one past its cap, found by introspecting the running server's
//! schema, so a new argument is walked without touching this file. Queries and
//! mutations go over HTTP, subscriptions over graphql-transport-ws (planned,
//! and behind an inline fragment through the executor); each numeric value is
//! sent as a variable and written in the document. Every answer must be
//! clean: data, or errors that name the argument (async-graphql's own
//! coercion errors name its type); never a dropped connection, a 5xx, or a
//! panic anywhere in the server; and the server must answer afterwards.

use std::collections::HashMap;
use std::sync::{Mutex, Once, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{spawn_app, TestApp, PATIENCE};

const INTROSPECTION: &str = r#"{ __schema {
    queryType { name } mutationType { name } subscriptionType { name }
    types { kind name enumValues { name }
        inputFields { name type { ...T } defaultValue }
        fields { name args { name type { ...T } defaultValue } type { ...T } } } } }
fragment T on __Type { kind name ofType { kind name ofType { kind name ofType { kind name ofType { kind name } } } } }"#;

/// Values of the built-in numeric scalars and of every custom scalar, as JSON
/// text so that numbers keep the digits written (serde_json's
/// `arbitrary_precision`). JSON has no NaN or Infinity; a string scalar's
/// variable can still say so.
const INT_EXTREMES: &[&str] = &[
    "0",
    "-1",
    "2147483647",
    "-2147483648",
    "2147483648",
    "-2147483649",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551616",
    "1e300",
    "-1e300",
    "1e-300",
    "0.5",
    "\"NaN\"",
    "\"Infinity\"",
];
const FLOAT_EXTREMES: &[&str] = &[
    "0",
    "-0.0",
    "1e-300",
    "-1e-300",
    "5e-324",
    "4e-20",
    "1e-3",
    "1e300",
    "-1e300",
    "1.7976931348623157e308",
    "1e400",
    "-1",
    "9223372036854775807",
    "\"NaN\"",
    "\"Infinity\"",
    "\"-Infinity\"",
];
const SCALAR_EXTREMES: &[&str] = &[
    "0",
    "-1",
    "1e300",
    "1e-300",
    "18446744073709551615",
    "\"\"",
    "\"0\"",
    "\"-1\"",
    "\"NaN\"",
    "\"Infinity\"",
    "\"-Infinity\"",
    "\"1e300\"",
    "\"1e-300\"",
    "\"18446744073709551616\"",
    "\"79228162514264337593543950336\"",
    "\"0.00000000000000000000000000001\"",
    "\"1970-01-01T00:00:00Z\"",
    "\"0000-01-01T00:00:00Z\"",
    "\"9999-12-31T23:59:59.999999999Z\"",
    "\"1677-09-21T00:12:43.145224191Z\"",
    "\"1677-09-21T00:12:43.145224192Z\"",
    "\"2262-04-11T23:47:16.854775807Z\"",
    "\"2262-04-11T23:47:16.854775808Z\"",
    "\"+262143-12-31T23:59:59Z\"",
    "\"-262144-01-01T00:00:00Z\"",
    "\"2024-11-25T15:53:20+23:59\"",
    "\"2024-11-25T15:53:20-23:59\"",
    "\"2024-02-30T00:00:00Z\"",
    "\"2024-11-25T23:59:60Z\"",
];

/// A valid value of each custom scalar, for the arguments not under test. A
/// new scalar must be added here; the walk says so.
const VALID_SCALARS: &[(&str, &str)] = &[
    ("DateTime", "\"2024-11-25T15:53:20Z\""),
    ("Decimal", "\"1\""),
    ("UInt64", "\"1\""),
];

/// The most values any list argument takes.
const LIST_CAP: usize = 1000;

/// Threads that panicked, by id. `#[sqlx::test]` runs each test on a
/// current-thread runtime, so the server a test spawns runs on the test's own
/// thread: a panic anywhere in it (a connection's task, the hub) is counted
/// against that thread, even when tokio catches it and the test would not
/// otherwise see it.
static PANICKED: Mutex<Vec<ThreadId>> = Mutex::new(Vec::new());

fn watch_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(std::thread::current().id());
            previous(info);
        }));
    });
}

fn panics_here() -> usize {
    let me = std::thread::current().id();
    PANICKED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|t| **t == me)
        .count()
}

/// A GraphQL type reference.
#[derive(Debug, Clone)]
enum Ty {
    NonNull(Box<Ty>),
    List(Box<Ty>),
    Named(String),
}

impl Ty {
    fn of(v: &Value) -> Ty {
        match v["kind"].as_str() {
            Some("NON_NULL") => Ty::NonNull(Box::new(Ty::of(&v["ofType"]))),
            Some("LIST") => Ty::List(Box::new(Ty::of(&v["ofType"]))),
            _ => Ty::Named(v["name"].as_str().expect("a named type").to_owned()),
        }
    }

    fn sdl(&self) -> String {
        match self {
            Ty::NonNull(t) => format!("{}!", t.sdl()),
            Ty::List(t) => format!("[{}]", t.sdl()),
            Ty::Named(n) => n.clone(),
        }
    }

    fn base(&self) -> &str {
        match self {
            Ty::NonNull(t) | Ty::List(t) => t.base(),
            Ty::Named(n) => n,
        }
    }

    fn required(&self) -> bool {
        matches!(self, Ty::NonNull(_))
    }

    /// The list this type is, under any non-null.
    fn list(&self) -> Option<&Ty> {
        match self {
            Ty::NonNull(t) => t.list(),
            Ty::List(t) => Some(t),
            Ty::Named(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Arg {
    name: String,
    ty: Ty,
    has_default: bool,
}

#[derive(Debug, Clone)]
struct Field {
    /// `query`, `mutation` or `subscription`.
    operation: &'static str,
    name: String,
    args: Vec<Arg>,
    /// What to select on its result, `{ ... }` or empty for a leaf.
    selection: String,
    /// The same through an inline fragment, which the subscription planner
    /// never takes, so the executor answers.
    fragment_selection: String,
}

/// Where in an argument a value under test goes: the input-object fields
/// leading to it (none: the argument itself) and the type found there.
#[derive(Debug, Clone)]
struct Slot {
    path: Vec<String>,
    ty: Ty,
}

struct Schema {
    types: HashMap<String, Value>,
}

fn args_of(v: &Value) -> Vec<Arg> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|a| Arg {
                    name: a["name"].as_str().expect("arg name").to_owned(),
                    ty: Ty::of(&a["type"]),
                    has_default: !a["defaultValue"].is_null(),
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Schema {
    fn kind(&self, name: &str) -> &str {
        self.types[name]["kind"].as_str().expect("type kind")
    }

    /// Int, Float and every custom scalar (times, decimals, counters): all
    /// but String, ID and Boolean.
    fn numeric(&self, name: &str) -> bool {
        self.kind(name) == "SCALAR" && !matches!(name, "String" | "ID" | "Boolean")
    }

    fn extremes(&self, name: &str) -> &'static [&'static str] {
        match name {
            "Int" => INT_EXTREMES,
            "Float" => FLOAT_EXTREMES,
            _ => SCALAR_EXTREMES,
        }
    }

    /// A value `ty` accepts, with every required input field filled in.
    fn valid(&self, ty: &Ty) -> Value {
        match ty {
            Ty::NonNull(t) => self.valid(t),
            Ty::List(t) => json!([self.valid(t)]),
            Ty::Named(n) => match (n.as_str(), self.kind(n)) {
                ("String", _) => json!("AAPL"),
                ("ID", _) => json!("x"),
                ("Boolean", _) => json!(false),
                ("Int", _) => json!(1),
                ("Float", _) => json!(1.5),
                (_, "SCALAR") => {
                    let (_, v) = VALID_SCALARS
                        .iter()
                        .find(|(s, _)| s == n)
                        .unwrap_or_else(|| {
                            panic!("add a valid value of the new scalar {n} to VALID_SCALARS")
                        });
                    serde_json::from_str(v).expect("JSON")
                }
                (_, "ENUM") => self.types[n]["enumValues"][0]["name"].clone(),
                (_, "INPUT_OBJECT") => Value::Object(
                    args_of(&self.types[n]["inputFields"])
                        .into_iter()
                        .filter(|f| f.ty.required() && !f.has_default)
                        .map(|f| (f.name.clone(), self.valid(&f.ty)))
                        .collect(),
                ),
                (_, kind) => panic!("{n} is a {kind}, not an input type"),
            },
        }
    }

    /// The places in an argument of type `ty` that `wanted` picks, down
    /// through input objects.
    fn slots(&self, ty: &Ty, wanted: &dyn Fn(&Schema, &Ty) -> bool, depth: usize) -> Vec<Slot> {
        if wanted(self, ty) {
            return vec![Slot {
                path: Vec::new(),
                ty: ty.clone(),
            }];
        }
        let base = ty.base();
        if self.kind(base) != "INPUT_OBJECT" || depth > 4 {
            return Vec::new();
        }
        assert!(
            ty.list().is_none(),
            "{}: the walk does not reach into lists of input objects yet",
            ty.sdl()
        );
        let mut out = Vec::new();
        for f in args_of(&self.types[base]["inputFields"]) {
            for mut s in self.slots(&f.ty, wanted, depth + 1) {
                s.path.insert(0, f.name.clone());
                out.push(s);
            }
        }
        out
    }

    /// The argument's value with `value` at `slot` and everything else valid.
    fn place(&self, arg: &Arg, slot: &Slot, value: Value) -> Value {
        fn put(at: &mut Value, path: &[String], value: Value) {
            match path.split_first() {
                None => *at = value,
                Some((first, rest)) => {
                    let entry = at
                        .as_object_mut()
                        .expect("an input object")
                        .entry(first.clone())
                        .or_insert(Value::Null);
                    put(entry, rest, value)
                }
            }
        }
        let mut whole = self.valid(&arg.ty);
        put(&mut whole, &slot.path, value);
        whole
    }

    /// A selection of the first argument-free leaf field of `ty`'s type
    /// (`__typename` when it has none), plain and behind an inline fragment.
    fn selections(&self, ty: &Ty) -> (String, String) {
        let name = ty.base();
        let kind = self.kind(name);
        if kind != "OBJECT" {
            assert!(
                matches!(kind, "SCALAR" | "ENUM"),
                "{name}: a {kind} result; teach the walk to select on it"
            );
            return (String::new(), String::new());
        }
        let leaf = self.types[name]["fields"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| {
                args_of(&f["args"]).is_empty()
                    && matches!(self.kind(Ty::of(&f["type"]).base()), "SCALAR" | "ENUM")
            })
            .and_then(|f| f["name"].as_str())
            .unwrap_or("__typename");
        (
            format!("{{ {leaf} }}"),
            format!("{{ ... on {name} {{ {leaf} }} }}"),
        )
    }

    /// The root fields, and a refusal for any argument the walk cannot reach:
    /// a numeric or list argument of a field below the roots.
    fn roots(&self, schema: &Value) -> Vec<Field> {
        let mut fields = Vec::new();
        let mut roots = Vec::new();
        for (operation, key) in [
            ("query", "queryType"),
            ("mutation", "mutationType"),
            ("subscription", "subscriptionType"),
        ] {
            let Some(root) = schema[key]["name"].as_str() else {
                continue;
            };
            roots.push(root.to_owned());
            for f in self.types[root]["fields"].as_array().expect("root fields") {
                let (selection, fragment_selection) = self.selections(&Ty::of(&f["type"]));
                fields.push(Field {
                    operation,
                    name: f["name"].as_str().expect("field name").to_owned(),
                    args: args_of(&f["args"]),
                    selection,
                    fragment_selection,
                });
            }
        }
        for (name, t) in &self.types {
            if name.starts_with("__") || roots.contains(name) {
                continue;
            }
            for f in t["fields"].as_array().into_iter().flatten() {
                for a in args_of(&f["args"]) {
                    assert!(
                        !self.numeric(a.ty.base()) && a.ty.list().is_none(),
                        "{name}.{}({}: {}) is below the roots, where the walk does not reach: extend it",
                        f["name"],
                        a.name,
                        a.ty.sdl()
                    );
                }
            }
        }
        fields
    }
}

/// One request: the field called with `value` for `arg` (the other arguments
/// valid when required, else left out), as a variable or written in the
/// document.
struct Call {
    document: String,
    variables: Value,
    what: String,
}

/// GraphQL literal syntax of a JSON value.
fn literal(v: &Value) -> String {
    match v {
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{k}: {}", literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

impl Call {
    fn new(
        schema: &Schema,
        f: &Field,
        arg: &Arg,
        value: Value,
        inline: bool,
        fragment: bool,
    ) -> Self {
        let mut decls = Vec::new();
        let mut passed = Vec::new();
        let mut variables = serde_json::Map::new();
        for a in &f.args {
            let v = if a.name == arg.name {
                value.clone()
            } else if a.ty.required() && !a.has_default {
                schema.valid(&a.ty)
            } else {
                continue;
            };
            if inline && a.name == arg.name {
                let written = if schema.kind(a.ty.base()) == "ENUM" {
                    literal_enum(&v)
                } else {
                    literal(&v)
                };
                passed.push(format!("{}: {written}", a.name));
            } else {
                decls.push(format!("${}: {}", a.name, a.ty.sdl()));
                passed.push(format!("{0}: ${0}", a.name));
                variables.insert(a.name.clone(), v);
            }
        }
        let decls = if decls.is_empty() {
            String::new()
        } else {
            format!("({})", decls.join(", "))
        };
        let args = if passed.is_empty() {
            String::new()
        } else {
            format!("({})", passed.join(", "))
        };
        let selection = if fragment {
            &f.fragment_selection
        } else {
            &f.selection
        };
        let document = format!(
            "{} Walk{decls} {{ {}{args} {selection} }}",
            f.operation, f.name
        );
        let shown = match &value {
            Value::Array(items) if items.len() > 3 => format!("[{} values]", items.len()),
            other => other.to_string(),
        };
        let what = format!(
            "{}.{}({}: {shown}){}{}",
            f.operation,
            f.name,
            arg.name,
            if inline {
                " written in the document"
            } else {
                " as a variable"
            },
            if fragment {
                " through the executor"
            } else {
                ""
            },
        );
        Self {
            document,
            variables: Value::Object(variables),
            what,
        }
    }
}

/// GraphQL literal syntax of an enum value (or list of them): a name, not a
/// string.
fn literal_enum(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(literal_enum)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => literal(other),
    }
}

/// How the server took a call.
#[derive(Debug)]
enum Answer {
    Served,
    Refused(Vec<String>),
}

fn messages(errors: &Value) -> Vec<String> {
    errors
        .as_array()
        .expect("errors is a list")
        .iter()
        .map(|e| {
            let m = e["message"].as_str().unwrap_or_default().to_owned();
            assert!(!m.is_empty(), "an error without a message: {errors}");
            m
        })
        .collect()
}

async fn over_http(app: &TestApp, call: &Call) -> Answer {
    let sent = app
        .http
        .post(app.url("/graphql"))
        .json(&json!({"query": call.document, "variables": call.variables}))
        .send();
    let resp = tokio::time::timeout(PATIENCE, sent)
        .await
        .unwrap_or_else(|_| panic!("{}: no answer in time", call.what))
        .unwrap_or_else(|e| panic!("{}: the connection failed: {e}", call.what));
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("{}: the body broke off: {e}", call.what));
    assert_eq!(
        status,
        200,
        "{}: {}",
        call.what,
        String::from_utf8_lossy(&body)
    );
    let body: Value =
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{}: not JSON ({e})", call.what));
    match body.get("errors") {
        Some(errors) => Answer::Refused(messages(errors)),
        None => {
            assert!(
                body.get("data").is_some_and(|d| !d.is_null()),
                "{}: {body}",
                call.what
            );
            Answer::Served
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON message; a close, an error or the end of the socket fails
/// the call: the server must answer every subscribe on an open socket.
async fn next_message(socket: &mut Socket, what: &str) -> Value {
    loop {
        let m = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: no message in time"));
        match m {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON message"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("{what}: the socket dropped: {other:?}"),
        }
    }
}

async fn send(socket: &mut Socket, v: Value, what: &str) {
    socket
        .send(Message::Text(v.to_string().into()))
        .await
        .unwrap_or_else(|e| panic!("{what}: cannot send: {e}"));
}

/// A subscription over `socket`: refused with `error` (or a `next` carrying
/// errors), or taken, which it is once the hub holds it; a taken one is
/// completed before the next call.
async fn over_websocket(app: &TestApp, socket: &mut Socket, id: usize, call: &Call) -> Answer {
    let id = id.to_string();
    send(
        socket,
        json!({"id": id, "type": "subscribe",
               "payload": {"query": call.document, "variables": call.variables}}),
        &call.what,
    )
    .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let answer = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: neither refused nor live",
            call.what
        );
        let m = tokio::select! {
            m = next_message(socket, &call.what) => m,
            () = tokio::time::sleep(Duration::from_millis(5)) => {
                if app.api.hub().subscribers() > 0 {
                    break Answer::Served;
                }
                continue;
            }
        };
        match m["type"].as_str() {
            Some("ping") => send(socket, json!({"type": "pong"}), &call.what).await,
            Some("error") if m["id"] == id.as_str() => {
                break Answer::Refused(messages(&m["payload"]))
            }
            Some("next") if m["id"] == id.as_str() => match m["payload"].get("errors") {
                Some(errors) => {
                    let refused = messages(errors);
                    let done = next_message(socket, &call.what).await;
                    assert_eq!(done["type"], "complete", "{}: {done}", call.what);
                    return Answer::Refused(refused);
                }
                None => break Answer::Served,
            },
            _ => panic!("{}: unexpected {m}", call.what),
        }
    };
    if matches!(answer, Answer::Served) {
        send(socket, json!({"id": id, "type": "complete"}), &call.what).await;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while app.api.hub().subscribers() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: not completed",
                call.what
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    answer
}

/// A numeric value's answer: data, or errors of which one names the argument
/// (or, from async-graphql's coercion of a variable, its type) and none is an
/// internal failure.
fn check_numeric(call: &Call, arg: &Arg, answer: &Answer) {
    if let Answer::Refused(messages) = answer {
        if std::env::var_os("TG_SHOW_REFUSALS").is_some() {
            println!("{}: {messages:?}", call.what);
        }
        let ty = format!("\"{}\"", arg.ty.base());
        assert!(
            messages
                .iter()
                .any(|m| m.contains(&arg.name) || m.contains(&ty)),
            "{}: no error names `{}` or its type: {messages:?}",
            call.what,
            arg.name
        );
        assert!(
            !messages
                .iter()
                .any(|m| m.contains("unavailable") || m.contains("panic")),
            "{}: an internal failure: {messages:?}",
            call.what
        );
    }
}

/// The server answers a plain query, and nothing in it has panicked.
async fn still_serves(app: &TestApp, after: &str) {
    let body = app.post("{ __typename }", json!({})).await;
    assert_eq!(body["data"]["__typename"], "Query", "after {after}: {body}");
    assert_eq!(panics_here(), 0, "the server panicked at {after}");
}

struct Walk {
    schema: Schema,
    fields: Vec<Field>,
}

async fn introspect(app: &TestApp) -> Walk {
    let data = app.data(INTROSPECTION, json!({})).await;
    let s = &data["__schema"];
    let types = s["types"]
        .as_array()
        .expect("types")
        .iter()
        .map(|t| (t["name"].as_str().expect("type name").to_owned(), t.clone()))
        .collect();
    let schema = Schema { types };
    let fields = schema.roots(s);
    Walk { schema, fields }
}

/// The server under test, its schema, and one graphql-transport-ws
/// connection that every subscription of a test goes through.
struct Runner<'a> {
    app: &'a TestApp,
    walk: Walk,
    socket: Socket,
    ids: usize,
}

impl<'a> Runner<'a> {
    async fn start(app: &'a TestApp) -> Self {
        let walk = introspect(app).await;
        let (ws, chosen) = app.ws("graphql-transport-ws").await;
        assert_eq!(chosen.as_deref(), Some("graphql-transport-ws"));
        let mut socket = ws.into_inner();
        send(&mut socket, json!({"type": "connection_init"}), "init").await;
        let ack = next_message(&mut socket, "init").await;
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        Self {
            app,
            walk,
            socket,
            ids: 0,
        }
    }

    /// Runs `call` where its operation goes: HTTP, or the WebSocket.
    async fn run(&mut self, f: &Field, call: &Call) -> Answer {
        let answer = if f.operation == "subscription" {
            self.ids += 1;
            over_websocket(self.app, &mut self.socket, self.ids, call).await
        } else {
            over_http(self.app, call).await
        };
        assert_eq!(panics_here(), 0, "the server panicked at {}", call.what);
        answer
    }

    /// The socket still answers, then the server closes it cleanly.
    async fn finish(mut self) {
        send(&mut self.socket, json!({"type": "ping"}), "ping").await;
        assert_eq!(next_message(&mut self.socket, "ping").await["type"], "pong");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn every_numeric_argument_at_its_extremes_gets_a_clean_answer(pool: PgPool) {
    watch_panics();
    let app = spawn_app(pool).await;
    let mut r = Runner::start(&app).await;
    let mut walked = Vec::new();
    for f in r.walk.fields.clone() {
        for arg in &f.args {
            let numeric = |s: &Schema, t: &Ty| s.numeric(t.base());
            for slot in r.walk.schema.slots(&arg.ty, &numeric, 0) {
                walked.push(format!("{}.{}", f.name, arg.name));
                // A valid value (a fraction, for Float) is taken both ways, so
                // a refusal below is the value's, not the way it was sent.
                for inline in [false, true] {
                    let valid = r.walk.schema.valid(&arg.ty);
                    let call = Call::new(&r.walk.schema, &f, arg, valid, inline, false);
                    let answer = r.run(&f, &call).await;
                    assert!(
                        matches!(answer, Answer::Served),
                        "{}: {answer:?}",
                        call.what
                    );
                }
                for text in r.walk.schema.extremes(slot.ty.base()) {
                    let one: Value = serde_json::from_str(text).expect("JSON");
                    let value = match slot.ty.list() {
                        Some(_) => json!([one]),
                        None => one,
                    };
                    let value = r.walk.schema.place(arg, &slot, value);
                    let executor_too = f.operation == "subscription";
                    for inline in [false, true] {
                        for fragment in [false, true] {
                            if fragment && !executor_too {
                                continue;
                            }
                            let call =
                                Call::new(&r.walk.schema, &f, arg, value.clone(), inline, fragment);
                            let answer = r.run(&f, &call).await;
                            check_numeric(&call, arg, &answer);
                        }
                    }
                }
                still_serves(&app, &format!("{}({})", f.name, arg.name)).await;
            }
        }
    }
    // What the schema has today is found, so the walk walks at all.
    for known in [
        "quotes.first",
        "snapshot.at",
        "trades.from",
        "quotes.maxRate",
        "trades.maxRate",
    ] {
        assert!(
            walked.iter().any(|w| w == known),
            "{known} not walked: {walked:?}"
        );
    }
    r.finish().await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn every_list_argument_is_capped_at_1000_values(pool: PgPool) {
    watch_panics();
    let app = spawn_app(pool).await;
    let mut r = Runner::start(&app).await;
    let mut walked = Vec::new();
    for f in r.walk.fields.clone() {
        for arg in &f.args {
            let lists = |_: &Schema, t: &Ty| t.list().is_some();
            for slot in r.walk.schema.slots(&arg.ty, &lists, 0) {
                walked.push(format!("{}.{}", f.name, arg.name));
                let item = r.walk.schema.valid(slot.ty.list().expect("a list"));
                for n in [LIST_CAP, LIST_CAP + 1] {
                    let value =
                        r.walk
                            .schema
                            .place(arg, &slot, Value::Array(vec![item.clone(); n]));
                    // As a variable only: a literal list this long is bounded
                    // by the token limit before anything reads it.
                    let call = Call::new(&r.walk.schema, &f, arg, value, false, false);
                    let answer = r.run(&f, &call).await;
                    let capped = |m: &String| m.contains(&format!("at most {LIST_CAP}"));
                    match (n > LIST_CAP, answer) {
                        (true, Answer::Refused(m)) => assert!(
                            m.iter().any(|m| capped(m) && m.contains(arg.name.as_str())),
                            "{}: refused, but not for its length: {m:?}",
                            call.what
                        ),
                        (true, Answer::Served) => panic!(
                            "{}: {n} values taken; every list is capped at {LIST_CAP}",
                            call.what
                        ),
                        (false, Answer::Refused(m)) => assert!(
                            !m.iter().any(capped),
                            "{}: {n} values refused for their number: {m:?}",
                            call.what
                        ),
                        (false, Answer::Served) => {}
                    }
                }
                still_serves(&app, &format!("{}({})", f.name, arg.name)).await;
            }
        }
    }
    for known in [
        "instruments.symbols",
        "latestQuotes.instruments",
        "replayDeadLetters.ids",
        "quotes.conflateBy",
    ] {
        assert!(
            walked.iter().any(|w| w == known),
            "{known} not walked: {walked:?}"
        );
    }
    r.finish().await;
    app.stop().await;
}
