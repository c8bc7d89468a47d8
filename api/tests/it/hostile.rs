//! Hostile GraphQL through the front door: documents built to crash the parser
//! (deep nesting of selections, values and types), to cost exponential time and
//! memory (fragment fan-out, cycles), or just a lot of it (floods of aliases,
//! directives, arguments, operations, long tokens), generated from a seed and
//! sent over HTTP, WebSocket and SSE to a real server in this process. Every
//! answer must be a well-formed GraphQL response, refusals must say which limit
//! was passed, the server must answer a normal query afterwards, and the
//! process's memory must stay bounded.
//!
//! `TG_HOSTILE_CASES` sets the number of generated documents (default 300) and
//! `TG_HOSTILE_SEED` the seed (default: random, printed, so a failure can be
//! replayed).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{spawn_app, TestApp, Ws, PATIENCE};

/// The defaults of `GuardLimits`, which these tests hold the server to.
const MAX_TOKENS: usize = 10_000;
const MAX_NESTING: usize = 32;
const MAX_SELECTIONS: usize = 10_000;

const TOO_MANY_TOKENS: &str = "Query is too large: more than 10000 tokens.";
const TOO_DEEP_TEXT: &str = "Query is nested too deep: more than 32 levels of brackets.";
const TOO_DEEP_DOC: &str =
    "Query is nested too deep: more than 32 levels of selections and fragment spreads.";
const TOO_MANY_SELECTIONS: &str =
    "Query is too large: more than 10000 selections with its fragments spread.";

/// What the server must answer to a document.
#[derive(Debug, Clone)]
enum Expect {
    /// Refused before it runs, with exactly this message.
    Refused(&'static str),
    /// Refused before it runs, with a message containing this.
    RefusedWith(&'static str),
    /// Any well-formed answer: data, errors, or both.
    Answer,
}

#[derive(Debug, Clone)]
struct Case {
    what: String,
    query: String,
    expect: Expect,
}

fn case(what: impl Into<String>, query: String, expect: Expect) -> Case {
    Case {
        what: what.into(),
        query,
        expect,
    }
}

/// The server runs on the test's own single thread, so a document that costs
/// it unbounded time would hang the test rather than fail it: past
/// [`CASE_DEADLINE`] on one case, this ends the process with the case's name.
struct Watchdog {
    current: Arc<Mutex<(String, Instant)>>,
    _stop: mpsc::Sender<()>,
}

const CASE_DEADLINE: Duration = Duration::from_secs(60);

impl Watchdog {
    fn start() -> Self {
        let current = Arc::new(Mutex::new((String::from("start"), Instant::now())));
        let (stop, stopped) = mpsc::channel::<()>();
        let watched = Arc::clone(&current);
        std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_secs(1))
            {
                let (what, since) = watched
                    .lock()
                    .map(|c| c.clone())
                    .unwrap_or_else(|p| p.into_inner().clone());
                if since.elapsed() > CASE_DEADLINE {
                    eprintln!(
                        "hostile document still being answered after {CASE_DEADLINE:?}: {what}"
                    );
                    std::process::exit(101);
                }
            }
        });
        Watchdog {
            current,
            _stop: stop,
        }
    }

    fn case(&self, what: &str) {
        if let Ok(mut c) = self.current.lock() {
            *c = (what.to_owned(), Instant::now());
        }
    }
}

/// The resident set of this process, where the server runs, in KiB.
fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// Nests `inner` `depth` times in one kind of bracket; returns the document
/// and how many levels of brackets it has.
fn nested(rng: &mut StdRng, depth: usize) -> (String, String, usize) {
    let open_close = |o: &str, c: &str| (o.repeat(depth), c.repeat(depth));
    match rng.random_range(0..8) {
        0 => {
            let (o, c) = open_close("a { ", "} ");
            ("selections".into(), format!("{{ {o}b {c}}}"), depth + 1)
        }
        1 => {
            let (o, c) = open_close("[", "]");
            let q = format!("{{ instrument(symbol: {o}\"AAPL\"{c}) {{ name }} }}");
            ("list argument".into(), q, depth + 2)
        }
        2 => {
            let (o, c) = open_close("{x: ", "}");
            let q = format!("{{ instrument(symbol: {o}1{c}) {{ name }} }}");
            ("object argument".into(), q, depth + 2)
        }
        3 => {
            let (o, c) = open_close("[", "]");
            let q = format!("query($v: {o}String{c}) {{ __typename }}");
            ("list type".into(), q, depth + 1)
        }
        4 => {
            let (o, c) = open_close("[", "]");
            let q = format!("query($v: String = {o}1{c}) {{ __typename }}");
            ("default value".into(), q, depth + 1)
        }
        5 => {
            let (o, c) = open_close("[", "]");
            let q = format!("{{ __typename @skip(if: {o}true{c}) }}");
            ("directive argument".into(), q, depth + 2)
        }
        6 => {
            let (o, c) = open_close("... on Query { ", "} ");
            (
                "inline fragments".into(),
                format!("{{ {o}__typename {c}}}"),
                depth + 1,
            )
        }
        _ => {
            // The WebSocket's planned path parses subscriptions itself. At
            // least two levels, so that it is never a valid subscription that
            // would wait for events.
            let depth = depth.max(2);
            let q = format!(
                "subscription {{ trades(instruments: {}\"AAPL\"{}) {{ id }} }}",
                "[".repeat(depth),
                "]".repeat(depth)
            );
            ("subscription argument".into(), q, depth + 2)
        }
    }
}

/// Fragments `F0..Fn`, each spreading the next `fan` times; `Fn` selects one
/// field. Returns the document and how many selections it holds with every
/// spread in place (the operation's and each definition's, as validation
/// visits them all).
fn fan_out(levels: usize, fan: usize) -> (String, usize) {
    let mut q = String::from("{ ...F0 } ");
    for i in 0..levels {
        q.push_str(&format!("fragment F{i} on Query {{ "));
        for _ in 0..fan {
            q.push_str(&format!("...F{} ", i + 1));
        }
        q.push_str("} ");
    }
    q.push_str(&format!("fragment F{levels} on Query {{ __typename }}"));
    // sizes[i]: selections of Fi's set, spreads included.
    let mut sizes = vec![1usize; levels + 1];
    for i in (0..levels).rev() {
        sizes[i] = fan.saturating_mul(sizes[i + 1].saturating_add(1));
    }
    let total = sizes
        .iter()
        .fold(sizes[0].saturating_add(1), |a, s| a.saturating_add(*s));
    (q, total)
}

/// A valid query to mutate.
const SEEDS: [&str; 3] = [
    "query Q($i: String!) { trades(instrument: $i, first: 5) { edges { cursor node { id price qty side venue reference { name } } } pageInfo { hasNextPage endCursor } } }",
    "{ __schema { types { name fields { name type { kind ofType { kind name } } } } } }",
    "{ a: latestQuotes(instruments: [\"AAPL\", \"MSFT\"]) { id mid } ...F } fragment F on Query { venues { mic name } }",
];

/// One generated hostile document and what the server must say to it.
fn generate(rng: &mut StdRng) -> Case {
    match rng.random_range(0..9) {
        0 => {
            let depth = rng.random_range(1..=3 * MAX_NESTING);
            let (what, q, levels) = nested(rng, depth);
            let expect = if levels > MAX_NESTING {
                Expect::Refused(TOO_DEEP_TEXT)
            } else {
                Expect::Answer
            };
            case(format!("{what} nested {depth} deep"), q, expect)
        }
        1 => {
            // Deep enough to have crashed the parser, if it ever got there.
            let depth = rng.random_range(2_000..50_000);
            let (what, q, _) = nested(rng, depth);
            case(
                format!("{what} nested {depth} deep"),
                q,
                Expect::Refused(TOO_DEEP_TEXT),
            )
        }
        2 => {
            let (field, tokens) = [
                ("__typename", 3),
                ("venues { mic }", 6),
                (
                    "trades(instrument: \"AAPL\", first: 1000) { nodes { id } }",
                    17,
                ),
            ][rng.random_range(0..3)];
            let n = rng.random_range(1..8_000);
            let q: String = (0..n).map(|i| format!("a{i}: {field} ")).collect();
            let expect = if 2 + n * tokens > MAX_TOKENS {
                Expect::Refused(TOO_MANY_TOKENS)
            } else {
                Expect::Answer
            };
            case(
                format!("{n} aliases of {field}"),
                format!("{{ {q}}}"),
                expect,
            )
        }
        3 => {
            let levels = rng.random_range(1..40);
            let fan = rng.random_range(1..=4);
            let (q, total) = fan_out(levels, fan);
            let expect = if levels + 1 > MAX_NESTING {
                Expect::Refused(TOO_DEEP_DOC)
            } else if total > MAX_SELECTIONS {
                Expect::Refused(TOO_MANY_SELECTIONS)
            } else {
                Expect::Answer
            };
            case(format!("{levels} fragments spread {fan} times"), q, expect)
        }
        4 => {
            let ring = rng.random_range(1..10);
            let mut q = String::from("{ ...C0 } ");
            for i in 0..ring {
                q.push_str(&format!(
                    "fragment C{i} on Query {{ __typename ...C{} }} ",
                    (i + 1) % ring
                ));
            }
            case(
                format!("fragment cycle of {ring}"),
                q,
                Expect::RefusedWith("within itself"),
            )
        }
        5 => {
            let n = rng.random_range(1..3_000);
            let q = format!("{{ __typename {}}}", "@skip(if: false) ".repeat(n));
            let expect = if 3 + 7 * n > MAX_TOKENS {
                Expect::Refused(TOO_MANY_TOKENS)
            } else {
                Expect::Answer
            };
            case(format!("{n} directives"), q, expect)
        }
        6 => {
            let n = rng.random_range(1..4_000);
            let q: String = (0..n)
                .map(|i| format!("query q{i} {{ __typename }} "))
                .collect();
            let expect = if 5 * n > MAX_TOKENS {
                Expect::Refused(TOO_MANY_TOKENS)
            } else {
                Expect::Answer
            };
            case(format!("{n} operations"), q, expect)
        }
        7 => {
            let len = rng.random_range(1..200_000);
            let q = match rng.random_range(0..3) {
                0 => format!(
                    "{{ instrument(symbol: \"{}\") {{ name }} }}",
                    "x".repeat(len)
                ),
                1 => format!("{{ {} }}", "x".repeat(len)),
                _ => format!("{{ instrument(symbol: \"{}", "é".repeat(len)),
            };
            case(format!("a token of {len} characters"), q, Expect::Answer)
        }
        _ => {
            // A valid document mangled: ranges cut, repeated, brackets thrown in.
            let mut q: Vec<char> = SEEDS[rng.random_range(0..SEEDS.len())].chars().collect();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..=q.len());
                match rng.random_range(0..3) {
                    0 => {
                        let end = rng.random_range(at..=q.len());
                        q.drain(at..end);
                    }
                    1 => {
                        let end = rng.random_range(at..=q.len().min(at + 40));
                        let chunk: Vec<char> = q[at..end].to_vec();
                        for _ in 0..rng.random_range(1..200) {
                            q.splice(at..at, chunk.iter().copied());
                        }
                    }
                    _ => {
                        let c = [
                            '{', '}', '[', ']', '(', ')', '"', '.', '@', '$', '#', '\u{0}',
                        ];
                        q.insert(at, c[rng.random_range(0..c.len())]);
                    }
                }
            }
            case(
                "a mangled valid document",
                q.into_iter().collect(),
                Expect::Answer,
            )
        }
    }
}

/// Checks that `errors` is a non-empty list of errors with messages, and that
/// a refusal says what it must.
fn check_errors(c: &Case, errors: &Value, data: Option<&Value>) {
    let list = errors
        .as_array()
        .unwrap_or_else(|| panic!("{}: errors is not a list: {errors}", c.what));
    assert!(!list.is_empty(), "{}: an empty error list", c.what);
    for e in list {
        assert!(
            e["message"].is_string(),
            "{}: error without a message: {e}",
            c.what
        );
    }
    let first = list[0]["message"].as_str().unwrap_or_default();
    match c.expect {
        Expect::Refused(m) => {
            assert_eq!(first, m, "{}", c.what);
            assert!(
                data.is_none_or(Value::is_null),
                "{}: data with a refusal",
                c.what
            );
        }
        Expect::RefusedWith(m) => {
            assert!(first.contains(m), "{}: {first:?} lacks {m:?}", c.what);
            assert!(
                data.is_none_or(Value::is_null),
                "{}: data with a refusal",
                c.what
            );
        }
        Expect::Answer => {}
    }
}

/// A GraphQL response over HTTP: JSON with data or errors, of a bounded size.
fn check_http(c: &Case, status: StatusCode, body: &[u8]) {
    assert_eq!(status, StatusCode::OK, "{}", c.what);
    assert!(
        body.len() <= 2 << 20,
        "{}: a response of {} bytes",
        c.what,
        body.len()
    );
    let body: Value =
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("{}: not JSON ({e})", c.what));
    match body.get("errors") {
        Some(errors) => check_errors(c, errors, body.get("data")),
        None => {
            assert!(
                matches!(c.expect, Expect::Answer),
                "{}: answered, not refused: {}",
                c.what,
                &body.to_string()[..body.to_string().len().min(300)]
            );
            assert!(body["data"].is_object(), "{}: no data, no errors", c.what);
        }
    }
}

async fn post(app: &TestApp, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    let resp = app
        .http
        .post(app.url("/graphql"))
        .header("content-type", "application/json")
        .timeout(PATIENCE)
        .body(body)
        .send()
        .await
        .expect("POST /graphql answered in time");
    let status = resp.status();
    (status, resp.bytes().await.expect("response body").to_vec())
}

async fn post_query(app: &TestApp, c: &Case) -> (StatusCode, Vec<u8>) {
    let body = serde_json::to_vec(&json!({ "query": c.query })).expect("JSON");
    post(app, body).await
}

/// A normal query still gets its data.
async fn still_serves(app: &TestApp) {
    let data = app.data("{ venues { mic } }", json!({})).await;
    assert_eq!(data["venues"][0]["mic"], "XLON", "{data}");
}

/// The generated documents, one at a time: held all at once, thousands of
/// them would weigh on the memory this process measures.
struct Cases {
    seed: u64,
    n: usize,
}

impl Cases {
    fn from_env() -> Self {
        let n = std::env::var("TG_HOSTILE_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let seed = std::env::var("TG_HOSTILE_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!("hostile documents: TG_HOSTILE_SEED={seed} TG_HOSTILE_CASES={n}");
        Cases { seed, n }
    }

    fn iter(&self) -> impl Iterator<Item = Case> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        (0..self.n).map(move |_| generate(&mut rng))
    }
}

/// Generated hostile documents over HTTP, one by one and in batches, with the
/// process's memory measured around them.
#[sqlx::test(migrations = "../migrations")]
async fn hostile_documents_over_http_get_clear_errors_in_bounded_memory(pool: PgPool) {
    let app = spawn_app(pool).await;
    let cases = Cases::from_env();
    let seed = cases.seed;
    // Warm up, so that what the first requests allocate for good is not counted.
    for c in cases.iter().take(20) {
        post_query(&app, &c).await;
    }
    let (rss, peak) = (memory_kib("VmRSS:"), memory_kib("VmHWM:"));
    let watchdog = Watchdog::start();
    for c in cases.iter() {
        watchdog.case(&c.what);
        let (status, body) = post_query(&app, &c).await;
        check_http(&c, status, &body);
    }
    // Ten at a time, as one batch: each answered on its own.
    let mut all = cases.iter().peekable();
    while all.peek().is_some() {
        let chunk: Vec<Case> = all.by_ref().take(10).collect();
        watchdog.case(&format!("a batch with {}", chunk[0].what));
        let ops: Vec<Value> = chunk.iter().map(|c| json!({ "query": c.query })).collect();
        let batch = serde_json::to_vec(&ops).expect("JSON");
        let too_big = batch.len() > 1 << 20;
        let (status, body) = post(&app, batch).await;
        if too_big {
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "seed {seed}");
            continue;
        }
        assert_eq!(status, StatusCode::OK, "seed {seed}");
        let answers: Vec<Value> = serde_json::from_slice(&body).expect("a JSON list");
        assert_eq!(answers.len(), chunk.len(), "seed {seed}");
        for (c, a) in chunk.iter().zip(&answers) {
            match a.get("errors") {
                Some(errors) => check_errors(c, errors, a.get("data")),
                None => assert!(matches!(c.expect, Expect::Answer), "{}", c.what),
            }
        }
    }
    let (rss_after, peak_after) = (memory_kib("VmRSS:"), memory_kib("VmHWM:"));
    eprintln!("VmRSS {rss} -> {rss_after} KiB, VmHWM {peak} -> {peak_after} KiB");
    // Generous: without the guard, one fan-out document takes gigabytes.
    const BOUND_KIB: u64 = 256 << 10;
    assert!(
        rss_after.saturating_sub(rss) < BOUND_KIB,
        "seed {seed}: resident memory grew from {rss} to {rss_after} KiB"
    );
    assert!(
        peak_after.saturating_sub(peak) < BOUND_KIB,
        "seed {seed}: peak resident memory grew from {peak} to {peak_after} KiB"
    );
    still_serves(&app).await;
    app.stop().await;
}

/// The next message that is not the server's keep-alive `ping`.
async fn next_answer(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = ws.recv().await?;
        if msg["type"] != "ping" {
            return Some(msg);
        }
    }
}

/// The same generated documents over graphql-transport-ws: each answered with
/// `error` (refused) or `next` and `complete`, on a socket that stays open and
/// serves a normal query afterwards.
#[sqlx::test(migrations = "../migrations")]
async fn hostile_documents_over_websocket_get_clear_errors(pool: PgPool) {
    let app = spawn_app(pool).await;
    let cases = Cases::from_env();
    let seed = cases.seed;
    let (mut ws, _) = app.ws("graphql-transport-ws").await;
    ws.send(json!({"type": "connection_init"})).await;
    assert_eq!(ws.expect().await["type"], "connection_ack");
    let mut sent = 0;
    let watchdog = Watchdog::start();
    for (i, c) in cases.iter().enumerate() {
        let c = &c;
        watchdog.case(&c.what);
        let msg = json!({"id": i.to_string(), "type": "subscribe", "payload": {"query": c.query}});
        // Larger messages close the socket by design (see subscriptions.rs).
        if msg.to_string().len() > 60 << 10 {
            continue;
        }
        sent += 1;
        ws.send(msg).await;
        let answer = next_answer(&mut ws)
            .await
            .unwrap_or_else(|| panic!("seed {seed}: {}: the socket closed", c.what));
        assert_eq!(answer["id"], i.to_string(), "{}: {answer}", c.what);
        match answer["type"].as_str() {
            Some("error") => check_errors(c, &answer["payload"], None),
            Some("next") => {
                let payload = &answer["payload"];
                match payload.get("errors") {
                    Some(errors) => check_errors(c, errors, payload.get("data")),
                    None => assert!(matches!(c.expect, Expect::Answer), "{}", c.what),
                }
                let done = next_answer(&mut ws).await;
                assert_eq!(
                    done.as_ref().map(|d| &d["type"]),
                    Some(&json!("complete")),
                    "{}: {done:?}",
                    c.what
                );
            }
            _ => panic!("seed {seed}: {}: {answer}", c.what),
        }
    }
    assert!(sent > cases.n / 2, "most documents fit a message");
    ws.send(json!({"id": "last", "type": "subscribe", "payload": {"query": "{ venues { mic } }"}}))
        .await;
    let answer = ws.expect().await;
    assert_eq!(
        answer["payload"]["data"]["venues"][0]["mic"], "XLON",
        "{answer}"
    );
    still_serves(&app).await;
    app.stop().await;
}

/// The deterministic worst cases of each kind, over all three transports.
fn worst_cases() -> Vec<Case> {
    let deep = 100_000;
    let (fan, _) = fan_out(30, 2);
    vec![
        case(
            "selections 100,000 deep",
            format!("{{ {}b {}}}", "a { ".repeat(deep), "} ".repeat(deep)),
            Expect::Refused(TOO_DEEP_TEXT),
        ),
        case(
            "a list argument 100,000 deep",
            format!(
                "{{ instrument(symbol: {}1{}) {{ name }} }}",
                "[".repeat(deep),
                "]".repeat(deep)
            ),
            Expect::Refused(TOO_DEEP_TEXT),
        ),
        case(
            "a subscription argument 20,000 deep",
            format!(
                "subscription {{ quotes(instruments: {}\"AAPL\"{}) {{ bid }} }}",
                "[".repeat(20_000),
                "]".repeat(20_000)
            ),
            Expect::Refused(TOO_DEEP_TEXT),
        ),
        case(
            "2^30 selections by fragment fan-out",
            fan,
            Expect::Refused(TOO_MANY_SELECTIONS),
        ),
        case(
            "a fragment cycle",
            "{ ...A } fragment A on Query { ...B } fragment B on Query { venues { ...A } }".into(),
            Expect::Refused("Cannot spread fragment \"A\" within itself."),
        ),
        case(
            "50,000 aliases",
            format!(
                "{{ {}}}",
                (0..50_000)
                    .map(|i| format!("a{i}: __typename "))
                    .collect::<String>()
            ),
            Expect::Refused(TOO_MANY_TOKENS),
        ),
        case(
            "two fields of 3,000 arguments each",
            format!(
                "{{ {0} {0} }}",
                format!(
                    "a: instrument({}) {{ name }}",
                    (0..3_000).map(|i| format!("x{i}: 1 ")).collect::<String>()
                )
            ),
            Expect::Refused(TOO_MANY_TOKENS),
        ),
    ]
}

#[sqlx::test(migrations = "../migrations")]
async fn the_worst_of_each_kind_is_refused_on_every_transport(pool: PgPool) {
    let app = spawn_app(pool).await;
    let watchdog = Watchdog::start();
    for c in worst_cases() {
        watchdog.case(&c.what);
        // HTTP.
        let (status, body) = post_query(&app, &c).await;
        check_http(&c, status, &body);

        // SSE: refusals come on the stream as `next` with errors, then `complete`.
        let resp = app
            .http
            .post(app.url("/graphql/stream"))
            .header("accept", "text/event-stream")
            .timeout(PATIENCE)
            .json(&json!({ "query": c.query }))
            .send()
            .await
            .expect("POST /graphql/stream");
        assert_eq!(resp.status(), StatusCode::OK, "{}", c.what);
        let text = resp.text().await.expect("event stream");
        let data = text
            .lines()
            .skip_while(|l| *l != "event: next")
            .nth(1)
            .and_then(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("{}: no `next` in {text:.300}", c.what));
        let next: Value = serde_json::from_str(data).expect("JSON event");
        check_errors(&c, &next["errors"], next.get("data"));
        assert!(text.contains("event: complete"), "{}: {text:.300}", c.what);

        // WebSocket, when the document fits a message.
        let msg = json!({"id": "1", "type": "subscribe", "payload": {"query": c.query}});
        if msg.to_string().len() <= 60 << 10 {
            let (mut ws, _) = app.ws("graphql-transport-ws").await;
            ws.send(json!({"type": "connection_init"})).await;
            assert_eq!(ws.expect().await["type"], "connection_ack");
            ws.send(msg).await;
            let answer = ws.expect().await;
            assert_eq!(answer["type"], "error", "{}: {answer}", c.what);
            check_errors(&c, &answer["payload"], None);
        }
    }

    // A syntax error quotes its line, not a whole document on one line.
    let unterminated = format!("{{ instrument(symbol: \"{}", "x".repeat(500_000));
    let body = app.post(&unterminated, json!({})).await;
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with(" --> 1:22"), "{message:.300}");
    assert!(message.len() < 4096, "an error of {} bytes", message.len());
    still_serves(&app).await;
    app.stop().await;
}

/// What is wrong before GraphQL: the body, its JSON, the batch.
#[sqlx::test(migrations = "../migrations")]
async fn hostile_request_bodies_get_clear_4xx(pool: PgPool) {
    let app = spawn_app(pool).await;
    let deep_json = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));

    // JSON nested past serde_json's recursion limit, in the variables and elsewhere.
    for body in [
        format!(
            "{{\"query\": \"{{ __typename }}\", \"variables\": {{\"v\": {}}}}}",
            deep_json(200_000)
        ),
        format!(
            "{{\"query\": \"{{ __typename }}\", \"extensions\": {}}}",
            deep_json(200_000)
        ),
        format!("[{}]", deep_json(200_000)),
    ] {
        let (status, body) = post(&app, body.into_bytes()).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    // Not UTF-8.
    let (status, _) = post(&app, b"{\"query\": \"{ \xff\xfe }\"}".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Over the body limit.
    let big = json!({ "query": "{ __typename }", "variables": {"v": "x".repeat(1 << 20)} });
    let (status, _) = post(&app, serde_json::to_vec(&big).expect("JSON")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Variables of nearly a MiB, within the limit: answered.
    let v: Vec<String> = (0..80_000).map(|i| format!("S{i}")).collect();
    let body = json!({ "query": "query($i: [String!]!) { latestQuotes(instruments: $i) { id } }",
                       "variables": {"i": v} });
    let (status, body) = post(&app, serde_json::to_vec(&body).expect("JSON")).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert!(body["errors"][0]["message"].is_string(), "{body:.300}");
    // Variables nested as deep as serde_json allows, where a list is expected.
    let body = format!(
        "{{\"query\": \"query($i: [String!]!) {{ latestQuotes(instruments: $i) {{ id }} }}\", \
         \"variables\": {{\"i\": {}}}}}",
        deep_json(120)
    );
    let (status, body) = post(&app, body.into_bytes()).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert!(body["errors"][0]["message"].is_string(), "{body}");
    // A batch over the limit is refused whole.
    let ops: Vec<Value> = (0..11)
        .map(|_| json!({"query": "{ __typename }"}))
        .collect();
    let (status, body) = post(&app, serde_json::to_vec(&ops).expect("JSON")).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        body["errors"][0]["message"],
        "at most 10 operations per batch, got 11"
    );

    // A subscribe payload nested past the recursion limit closes the socket
    // with 4400, like any other malformed message.
    let (ws, _) = app.ws("graphql-transport-ws").await;
    let mut socket = ws.into_inner();
    socket
        .send(Message::Text(
            json!({"type": "connection_init"}).to_string().into(),
        ))
        .await
        .expect("send");
    let _ack = socket.next().await;
    let msg = format!(
        "{{\"id\": \"1\", \"type\": \"subscribe\", \"payload\": {{\"query\": \"{{ __typename }}\", \
         \"variables\": {{\"v\": {}}}}}}}",
        deep_json(20_000)
    );
    socket.send(Message::Text(msg.into())).await.expect("send");
    let close = tokio::time::timeout(PATIENCE, async {
        while let Some(m) = socket.next().await {
            if let Ok(Message::Close(frame)) = m {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("the socket closes in time");
    assert_eq!(close, Some(4400));

    still_serves(&app).await;
    app.stop().await;
}
