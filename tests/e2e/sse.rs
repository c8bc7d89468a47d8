//! GraphQL over Server-Sent Events (graphql-sse, distinct connections mode)
//! with real HTTP clients: filtered subscriptions over `POST` and `GET`,
//! queries, errors before execution on the stream and malformed requests
//! refused, `maxRate`, keep-alive comments, a client that does not accept an
//! event stream, and clients that stop reading (an unconflated one cut off as
//! too slow, a conflated one held by the hub, neither holding up shutdown).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::*;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    event: String,
    data: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Item {
    /// A comment line (`:`): the opening bytes and the keep-alive.
    Comment,
    Event(Event),
    /// The response ended.
    End,
}

/// The event-stream interpretation of the SSE spec, as `EventSource` does
/// it: an event with no `data:` line is not dispatched.
#[derive(Default)]
struct Parser {
    pending: Vec<u8>,
    event: String,
    data: Option<String>,
}

impl Parser {
    fn push(&mut self, bytes: &[u8]) -> Vec<Item> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=at).collect();
            let line = String::from_utf8(line).expect("UTF-8 event stream");
            let line = line.trim_end_matches('\n').trim_end_matches('\r');
            if line.is_empty() {
                let event = std::mem::take(&mut self.event);
                if let Some(data) = self.data.take() {
                    out.push(Item::Event(Event {
                        event: if event.is_empty() {
                            "message".into()
                        } else {
                            event
                        },
                        data,
                    }));
                }
                continue;
            }
            if line.starts_with(':') {
                out.push(Item::Comment);
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event = value.to_owned(),
                "data" => match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                },
                other => panic!("unexpected field {other:?} in {line:?}"),
            }
        }
        out
    }
}

/// An event stream read incrementally from a real HTTP response.
struct Sse {
    res: reqwest::Response,
    parser: Parser,
    items: VecDeque<Item>,
    ended: bool,
}

impl Sse {
    fn new(res: reqwest::Response) -> Self {
        assert_eq!(res.status(), 200, "an accepted event stream");
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
        Self {
            res,
            parser: Parser::default(),
            items: VecDeque::new(),
            ended: false,
        }
    }

    /// The next item, or None when nothing comes within `wait`.
    async fn item_within(&mut self, wait: Duration) -> Option<Item> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(i) = self.items.pop_front() {
                return Some(i);
            }
            if self.ended {
                return Some(Item::End);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.res.chunk()).await {
                Err(_) => return None,
                Ok(Ok(Some(bytes))) => self.items.extend(self.parser.push(&bytes)),
                Ok(Ok(None)) => self.ended = true,
                Ok(Err(e)) => panic!("event stream failed: {e}"),
            }
        }
    }

    /// The next event or the end, skipping comments.
    async fn event(&mut self) -> Item {
        loop {
            match self.item_within(DEADLINE).await {
                Some(Item::Comment) => continue,
                Some(other) => return other,
                None => panic!("nothing on the event stream within the deadline"),
            }
        }
    }

    /// The `data` of the next `next` event, which must carry no errors.
    async fn next_data(&mut self) -> Value {
        match self.event().await {
            Item::Event(e) if e.event == "next" => {
                let v: Value = serde_json::from_str(&e.data).expect("JSON data");
                assert!(v.get("errors").is_none(), "errors: {v}");
                v["data"].clone()
            }
            other => panic!("expected a `next` event, got {other:?}"),
        }
    }

    /// The rest of the stream must be `complete` (with a `data:` line, or
    /// `EventSource` would not see it) and then the end of the response.
    async fn completes(&mut self) {
        assert_eq!(
            self.event().await,
            Item::Event(Event {
                event: "complete".into(),
                data: String::new()
            })
        );
        assert_eq!(self.event().await, Item::End);
    }
}

impl Payloads for Sse {
    /// The `data` of the next `next`, skipping comments; None at anything
    /// else (`complete`, the end) or when nothing comes within the deadline.
    async fn next_payload(&mut self) -> Option<Value> {
        loop {
            match self.item_within(DEADLINE).await? {
                Item::Event(e) if e.event == "next" => {
                    let v: Value = serde_json::from_str(&e.data).expect("JSON data");
                    assert!(v.get("errors").is_none(), "errors: {v}");
                    return Some(v["data"].clone());
                }
                Item::Comment => continue,
                _ => return None,
            }
        }
    }
}

const STREAM: &str = "/graphql/stream";

fn post(app: &TestApp, path: &str, accept: &str, body: &Value) -> reqwest::RequestBuilder {
    app.http
        .post(format!("{}{path}", app.api))
        .header("accept", accept)
        .json(body)
}

/// The answer to `query` posted to `path`, read as an event stream.
async fn posted(app: &TestApp, path: &str, accept: &str, query: &str) -> Sse {
    Sse::new(
        post(app, path, accept, &json!({ "query": query }))
            .send()
            .await
            .expect("api answers"),
    )
}

/// Opens a stream with `POST /graphql/stream`. Once its first bytes have
/// arrived the subscription is registered, so anything posted after it is
/// delivered.
async fn open(app: &TestApp, query: &str) -> Sse {
    let mut sse = posted(app, STREAM, "text/event-stream", query).await;
    assert_eq!(
        sse.item_within(DEADLINE).await,
        Some(Item::Comment),
        "the stream opens with a comment"
    );
    sse
}

/// Reads `next` events until `done` says the last wanted one has come.
async fn collect(sse: &mut Sse, field: &str, mut done: impl FnMut(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = sse.next_data().await[field].clone();
        let last = done(&v);
        seen.push(v);
        if last {
            return seen;
        }
    }
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    k.sort();
    k
}

#[sqlx::test(migrations = "../migrations")]
async fn filtered_subscriptions_over_post_and_get_receive_exactly_their_events(pool: PgPool) {
    // One shard: one order over all instruments.
    let app = spawn_app(pool, 1).await;
    let mut buys = open(
        &app,
        r#"subscription { trades(instruments: ["AAPL", "MSFT"], sides: [BUY]) { instrument side seq price } }"#,
    )
    .await;
    // GET, with variables and an operation picked by name.
    let res = app
        .http
        .get(format!("{}{STREAM}", app.api))
        .header("accept", "text/event-stream")
        .query(&[
            (
                "query",
                "subscription Other { trades { seq } } \
                 subscription London($venues: [String!]) { quotes(venues: $venues) { instrument seq bid } }",
            ),
            ("variables", r#"{"venues": ["XLON"]}"#),
            ("operationName", "London"),
        ])
        .send()
        .await
        .expect("api answers");
    let mut london = Sse::new(res);
    assert_eq!(london.item_within(DEADLINE).await, Some(Item::Comment));

    let answer = app
        .post_json(&json!([
            trade("mm", 1, "AAPL", "XNAS", "189.1", "10", "buy"),
            trade("mm", 2, "AAPL", "XNAS", "189.2", "10", "sell"),
            trade("mm", 3, "SPY", "ARCX", "590.1", "10", "buy"),
            trade("mm", 4, "MSFT", "XNAS", "410.1", "5", "buy"),
            quote("mm", 5, "VOD.L", "XLON", "72.1", "72.2"),
            quote("mm", 6, "AAPL", "XNAS", "189.1", "189.2"),
            trade("mm", 7, "VOD.L", "XLON", "72.1", "100", "buy"),
            quote("mm", 8, "VOD.L", "XLON", "72.3", "72.4"),
            trade("mm", 9, "MSFT", "XNAS", "410.2", "5", "buy"),
            trade("mm", 10, "AAPL", "XNAS", "189.3", "1", "buy"),
            quote("mm", 11, "VOD.L", "XLON", "72.5", "72.6"),
        ]))
        .await;
    assert_eq!(answer["accepted"], 11, "{answer}");

    let got = collect(&mut buys, "trades", |t| seq_of(t) == 10).await;
    assert_eq!(
        got,
        vec![
            json!({"instrument": "AAPL", "side": "BUY", "seq": "1", "price": "189.1"}),
            json!({"instrument": "MSFT", "side": "BUY", "seq": "4", "price": "410.1"}),
            json!({"instrument": "MSFT", "side": "BUY", "seq": "9", "price": "410.2"}),
            json!({"instrument": "AAPL", "side": "BUY", "seq": "10", "price": "189.3"}),
        ],
        "exactly the Apple and Microsoft buys, in order, with the fields selected"
    );
    let got = collect(&mut london, "quotes", |q| seq_of(q) == 11).await;
    assert_eq!(
        got.iter().map(seq_of).collect::<Vec<_>>(),
        vec![5, 8, 11],
        "exactly the London quotes: {got:?}"
    );
    assert!(got
        .iter()
        .all(|q| keys(q) == ["bid", "instrument", "seq"] && q["instrument"] == "VOD.L"));

    // At shutdown each stream says `complete` and ends; the server does not
    // wait for the clients to leave.
    let stopping = tokio::spawn(app.stop());
    buys.completes().await;
    london.completes().await;
    stopping.await.expect("stopped");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_query_gets_one_next_then_complete(pool: PgPool) {
    let app = spawn_app(pool, 1).await;
    let query =
        r#"{ instruments(venue: "XNAS", first: 10) { totalCount edges { node { symbol } } } }"#;
    let want = json!({"instruments": {"totalCount": 2, "edges": [
        {"node": {"symbol": "AAPL"}}, {"node": {"symbol": "MSFT"}}]}});

    let mut sse = posted(&app, STREAM, "text/event-stream", query).await;
    assert_eq!(sse.next_data().await, want);
    sse.completes().await;

    let mut sse = Sse::new(
        app.http
            .get(format!("{}{STREAM}", app.api))
            .header("accept", "text/event-stream")
            .query(&[("query", query)])
            .send()
            .await
            .expect("api answers"),
    );
    assert_eq!(sse.next_data().await, want);
    sse.completes().await;

    // `/graphql` serves a stream to a client that ranks it first, JSON to others.
    let mut sse = posted(
        &app,
        "/graphql",
        "text/event-stream, application/json;q=0.5",
        query,
    )
    .await;
    assert_eq!(sse.next_data().await, want);
    sse.completes().await;
    let res = post(
        &app,
        "/graphql",
        "application/json, text/event-stream",
        &json!({ "query": query }),
    )
    .send()
    .await
    .expect("api answers");
    assert_eq!(
        res.headers()["content-type"].to_str().ok(),
        Some("application/json")
    );
    assert_eq!(res.json::<Value>().await.expect("JSON")["data"], want);
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn refused_operations_come_on_the_stream_and_malformed_requests_are_refused(pool: PgPool) {
    let app = spawn_app(pool, 1).await;
    // Refused before execution: status 200, the errors in one `next`, then
    // `complete`, as the protocol requires.
    for (query, says) in [
        ("subscription { quotes(", "expected"),
        ("subscription { quotes { nope } }", "Unknown field \"nope\""),
        ("subscription { quotes(maxRate: 0) { seq } }", "maxRate"),
        (
            "subscription { quotes(instruments: []) { seq } }",
            "instruments",
        ),
    ] {
        let mut sse = posted(&app, STREAM, "text/event-stream", query).await;
        match sse.event().await {
            Item::Event(e) if e.event == "next" => {
                let v: Value = serde_json::from_str(&e.data).expect("JSON data");
                assert!(v["data"].is_null(), "{query}: {v}");
                let message = v["errors"][0]["message"].as_str().unwrap_or_default();
                assert!(message.contains(says), "{query}: {v}");
            }
            other => panic!("{query}: expected `next` with errors, got {other:?}"),
        }
        sse.completes().await;
    }

    // Not a GraphQL request at all: 400 with a JSON error, no stream.
    let bad = |status: u16, res: reqwest::Response| async move {
        assert_eq!(res.status(), status);
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("application/json"));
        let v: Value = res.json().await.expect("JSON error");
        v["errors"][0]["message"]
            .as_str()
            .expect("a message")
            .to_owned()
    };
    let not_json = app
        .http
        .post(format!("{}{STREAM}", app.api))
        .header("accept", "text/event-stream")
        .header("content-type", "application/json")
        .body("{ not json")
        .send()
        .await
        .expect("api answers");
    assert!(bad(400, not_json).await.contains("unparsable JSON body"));
    for (body, says) in [
        (json!({"variables": {}}), "missing `query`"),
        (json!([{"query": "{ a }"}]), "must be an object"),
        (json!({"query": "{ a }", "variables": [1]}), "`variables`"),
    ] {
        let res = post(&app, STREAM, "text/event-stream", &body)
            .send()
            .await
            .expect("api answers");
        let message = bad(400, res).await;
        assert!(message.contains(says), "{body}: {message}");
    }
    let res = app
        .http
        .get(format!("{}{STREAM}", app.api))
        .header("accept", "text/event-stream")
        .query(&[("query", "{ a }"), ("variables", "{not json")])
        .send()
        .await
        .expect("api answers");
    assert!(bad(400, res).await.contains("`variables` is not JSON"));
    let text = app
        .http
        .post(format!("{}{STREAM}", app.api))
        .header("accept", "text/event-stream")
        .header("content-type", "text/plain")
        .body("{ instruments { totalCount } }")
        .send()
        .await
        .expect("api answers");
    bad(415, text).await;
    let huge = post(
        &app,
        STREAM,
        "text/event-stream",
        &json!({ "query": "x".repeat(2 << 20) }),
    )
    .send()
    .await
    .expect("api answers");
    assert_eq!(huge.status(), 413, "the 1 MiB body limit");
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn a_client_that_does_not_accept_an_event_stream_gets_406(pool: PgPool) {
    let app = spawn_app(pool, 1).await;
    let body = json!({ "query": "subscription { quotes { seq } }" });
    for accept in [
        "application/json",
        "application/graphql-response+json",
        "*/*",
        "text/event-stream;q=0",
    ] {
        let res = post(&app, STREAM, accept, &body)
            .send()
            .await
            .expect("api answers");
        assert_eq!(res.status(), 406, "Accept: {accept}");
        assert_eq!(
            res.headers()["accept"].to_str().ok(),
            Some("text/event-stream")
        );
        let v: Value = res.json().await.expect("JSON error");
        assert!(
            v["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Accept: text/event-stream")),
            "{v}"
        );
    }
    let res = app
        .http
        .get(format!("{}{STREAM}", app.api))
        .header("accept", "application/json")
        .query(&[("query", "{ instruments { totalCount } }")])
        .send()
        .await
        .expect("api answers");
    assert_eq!(res.status(), 406);
    app.stop().await;
}

/// The same checks as over a WebSocket ([`conflation_holds`]).
#[sqlx::test(migrations = "../migrations")]
async fn max_rate_over_sse_keeps_to_its_rate_and_ends_on_the_latest(pool: PgPool) {
    let app = spawn_app(pool, 1).await;
    let filter = format!("instruments: {}", json!(CONFLATED_INSTRUMENTS));
    let select = "{ source seq instrument }";
    let conflated = open(
        &app,
        &format!("subscription {{ quotes({filter}, maxRate: {CONFLATED_RATE}) {select} }}"),
    )
    .await;
    let every = open(
        &app,
        &format!("subscription {{ quotes({filter}) {select} }}"),
    )
    .await;
    conflation_holds(&app, conflated.forward(), every.forward()).await;
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn an_idle_stream_gets_keepalive_comments(pool: PgPool) {
    let every = Duration::from_millis(200);
    let app = spawn_app_with(pool, 1, |c| c.api.ws.keepalive = Some(every)).await;
    // Before the request: the server's stream, and so its keep-alive clock,
    // starts later than this.
    let asked = Instant::now();
    let mut sse = open(
        &app,
        r#"subscription { quotes(instruments: ["SPY"]) { seq } }"#,
    )
    .await;
    // Ten periods: a late scheduler costs a few keep-alives, not the lower bound.
    let window = 10 * every;
    let started = Instant::now();
    let mut comments = 0u32;
    while let Some(item) = sse
        .item_within(window.saturating_sub(started.elapsed()))
        .await
    {
        assert_eq!(item, Item::Comment, "nothing but keep-alives while idle");
        comments += 1;
    }
    let open_for = asked.elapsed();
    assert!(
        comments >= 3,
        "{comments} keep-alives in {window:?} at one per {every:?}"
    );
    // Spaced, not a burst: however late the server's timer fires, the next
    // keep-alive is a full period after it, so the stream's lifetime so far
    // holds at most one per period. (Timed over the whole stream rather than
    // between arrivals, since two keep-alives may reach a late reader at once.)
    let most = open_for.as_millis() / every.as_millis();
    assert!(
        u128::from(comments) <= most,
        "{comments} keep-alives in {open_for:?}: more than one per {every:?}"
    );
    app.stop().await;
}

/// Fields enough to make each event about 600 bytes.
const HEAVY: &str = "{ id source seq instrument venue bid ask bidSize askSize mid spread ts ingestedAt enrichedAt cursor currency assetClass }";

/// A raw HTTP/1.1 client with a tiny receive window, so that when it stops
/// reading the server's side fills up fast. Returns once the stream has opened
/// (the subscription is registered), with the bytes read so far.
async fn stalled(app: &TestApp, query: &str) -> (TcpStream, Vec<u8>) {
    let addr: std::net::SocketAddr = app
        .api
        .trim_start_matches("http://")
        .parse()
        .expect("api address");
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut tcp = socket.connect(addr).await.expect("tcp connects");
    let body = json!({ "query": query }).to_string();
    let head = format!(
        "POST {STREAM} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("request sent");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(DEADLINE, tcp.read(&mut buf))
            .await
            .expect("the stream opens within the deadline")
            .expect("read");
        assert!(n > 0, "closed before the stream opened");
        got.extend_from_slice(&buf[..n]);
        if let Some(at) = find(&got, b"\r\n\r\n") {
            assert!(
                got.starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            if find(&got[at..], b":\n\n").is_some() {
                return (tcp, got);
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads a stalled client's response to its end and returns its events.
async fn read_to_end(tcp: &mut TcpStream, mut got: Vec<u8>) -> Vec<Item> {
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut got))
        .await
        .expect("the response ends within the deadline")
        .expect("read");
    let at = find(&got, b"\r\n\r\n").expect("head") + 4;
    let (head, mut body) = (
        String::from_utf8_lossy(&got[..at]).to_lowercase(),
        &got[at..],
    );
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut parser = Parser::default();
    let mut items = Vec::new();
    loop {
        let line = find(body, b"\r\n").expect("chunk size");
        let size = std::str::from_utf8(&body[..line])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .expect("hex chunk size");
        body = &body[line + 2..];
        if size == 0 {
            items.push(Item::End);
            return items;
        }
        items.extend(parser.push(&body[..size]));
        body = &body[size + 2..];
    }
}

/// Reads a stalled client's stream, cut off as too slow out of `total`
/// quotes: what it had (in order per instrument, some but not all), then one
/// `next` with the error, then `complete`, and the response is over. Returns
/// the error's message.
async fn cut_off(tcp: &mut TcpStream, head: Vec<u8>, total: u64) -> String {
    let items = read_to_end(tcp, head).await;
    let (last, rest) = items.split_last().expect("items");
    assert_eq!(*last, Item::End);
    let events: Vec<&Event> = rest
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    let (complete, nexts) = events.split_last().expect("events");
    assert_eq!(complete.event, "complete");
    let (error, quotes) = nexts.split_last().expect("nexts");
    let error: Value = serde_json::from_str(&error.data).expect("JSON");
    let message = error["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("subscriber too slow"),
        "{error} after {} quotes",
        quotes.len()
    );
    assert_eq!(
        error["errors"][0]["extensions"]["code"], "TOO_SLOW",
        "{error}"
    );
    assert!(!quotes.is_empty(), "it had quotes before it fell behind");
    assert!(
        (quotes.len() as u64) < total,
        "cut off before the end: {} of {total}",
        quotes.len()
    );
    let mut last_of = HashMap::new();
    for e in quotes {
        assert_eq!(e.event, "next");
        let v: Value = serde_json::from_str(&e.data).expect("JSON");
        let q = &v["data"]["quotes"];
        let sym = q["instrument"].as_str().expect("instrument").to_owned();
        let s = seq_of(q);
        let prev = last_of.insert(sym.clone(), s).unwrap_or(0);
        assert!(s > prev, "{sym}: {s} after {prev}");
    }
    message.to_owned()
}

/// Posts `batches` batches of `per` quotes of four instruments, `seq` 1 up.
async fn post_quotes(app: &TestApp, batches: u64, per: u64) {
    let symbols = ["AAPL", "MSFT", "SPY", "VOD.L"];
    for b in 0..batches {
        let quotes: Vec<Value> = (0..per)
            .map(|i| {
                let seq = b * per + i + 1;
                let sym = symbols[(seq % 4) as usize];
                let venue = match sym {
                    "VOD.L" => "XLON",
                    "SPY" => "ARCX",
                    _ => "XNAS",
                };
                quote("mm", seq, sym, venue, &format!("100.{seq:05}"), "101")
            })
            .collect();
        assert_eq!(app.post_json(&json!(quotes)).await["accepted"], per);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The byte limit holds for an event stream as for any subscription: a
/// stalled client is cut off once the events queued for it pass
/// `subscriber_queue_bytes`, long before its event limit.
#[sqlx::test(migrations = "../migrations")]
async fn a_stream_past_its_byte_limit_is_cut_off(pool: PgPool) {
    let bytes = 256 << 10;
    let app = spawn_app_with(pool, 1, |c| {
        c.api.subscriber_queue = 1_000_000;
        c.api.subscriber_queue_bytes = bytes;
        c.api.ws.keepalive = None;
    })
    .await;
    let (mut stalled, head) = stalled(&app, &format!("subscription {{ quotes {HEAVY} }}")).await;
    // A conflated client (never too slow) shows when the hub has dispatched
    // the last quote, and so every one before it (one shard).
    let mut watcher = open(&app, "subscription { quotes(maxRate: 1000) { seq } }").await;
    let (batches, per) = (80u64, 250u64);
    let total = batches * per;
    let watching = tokio::spawn(async move {
        collect(&mut watcher, "quotes", |q| seq_of(q) == total).await;
    });
    post_quotes(&app, batches, per).await;
    watching.await.expect("the watcher saw the last quote");
    let message = cut_off(&mut stalled, head, total).await;
    assert_eq!(
        message,
        format!("subscriber too slow: over {bytes} bytes of events queued")
    );
    app.stop().await;
}

#[sqlx::test(migrations = "../migrations")]
async fn clients_that_stop_reading_are_cut_off_or_held_and_never_hold_up_shutdown(pool: PgPool) {
    // More than a batch, which the hub dispatches at once.
    let queue = 1000;
    let app = spawn_app_with(pool, 2, |c| {
        c.api.subscriber_queue = queue;
        c.api.ws.keepalive = None;
    })
    .await;
    let (mut every, head_every) =
        stalled(&app, &format!("subscription {{ quotes {HEAVY} }}")).await;
    let (mut conflated, head_conflated) = stalled(
        &app,
        &format!("subscription {{ quotes(maxRate: 1000) {HEAVY} }}"),
    )
    .await;
    // Never reads again, not even at shutdown.
    let (_never, _) = stalled(&app, &format!("subscription {{ quotes {HEAVY} }}")).await;

    // Far more than the queue plus what the sockets buffer: ~600 bytes each.
    let (batches, per) = (80u64, 250u64);
    let total = batches * per;
    let symbols = ["AAPL", "MSFT", "SPY", "VOD.L"];
    let newest: HashMap<&str, u64> = symbols
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                *s,
                (1..=total).rev().find(|q| q % 4 == i as u64).expect("seq"),
            )
        })
        .collect();
    // A reading conflated client shows when the hub has dispatched everything.
    let mut watcher = open(
        &app,
        "subscription { quotes(maxRate: 1000) { instrument seq } }",
    )
    .await;
    let want = newest.clone();
    let watching = tokio::spawn(async move {
        let mut last = HashMap::new();
        while want.iter().any(|(s, q)| last.get(*s).copied() != Some(*q)) {
            let q = watcher.next_data().await["quotes"].clone();
            last.insert(
                q["instrument"].as_str().expect("instrument").to_owned(),
                seq_of(&q),
            );
        }
        watcher
    });
    post_quotes(&app, batches, per).await;
    let mut watcher = watching.await.expect("the watcher saw the newest quotes");

    // The unconflated client fell `queue` events behind.
    let message = cut_off(&mut every, head_every, total).await;
    assert_eq!(
        message,
        format!("subscriber too slow: queue of {queue} events full")
    );

    // Shutdown does not wait for the client that never reads. The conflated
    // one was never cut off: read now, it ends on the newest quote of every
    // instrument, then `complete`.
    let stopping = tokio::spawn(app.stop());
    watcher.completes().await;
    let items = read_to_end(&mut conflated, head_conflated).await;
    let mut last_of = HashMap::new();
    let mut ended = false;
    for item in &items {
        match item {
            Item::Event(e) if e.event == "next" => {
                let v: Value = serde_json::from_str(&e.data).expect("JSON");
                assert!(v.get("errors").is_none(), "{v}");
                let q = &v["data"]["quotes"];
                last_of.insert(
                    q["instrument"].as_str().expect("instrument").to_owned(),
                    seq_of(q),
                );
            }
            Item::Event(e) => {
                assert_eq!(e.event, "complete");
                ended = true;
            }
            Item::Comment | Item::End => {}
        }
    }
    assert!(ended, "the conflated stream completes at shutdown");
    for (sym, q) in &newest {
        assert_eq!(last_of.get(*sym), Some(q), "{sym} ends on its newest quote");
    }
    stopping.await.expect("stopped");
}
