//! GraphQL subscribers over real WebSockets (`graphql-transport-ws`): each is
//! one connection running one or more operations (`trades` or `quotes`, each
//! with its filter and maybe `maxRate`), and times every event it receives
//! against the moment its batch was sent.
//!
//! Built to run ten thousand at once beside the system it measures: a `next`
//! message is read by a substring scan, not parsed; each subscriber keeps a few
//! counters per step, and latency goes into one shared histogram pair per group
//! of subscribers ([`LatencySink`]), merged at the end of each step.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::load::Connection;
use tickgraph_enrich::refdata::AssetClass;
use tickgraph_ingest::event::now_nanos;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Latencies are recorded in microseconds, up to a minute (later is a minute).
pub const LATENCY_MAX_US: u64 = 60_000_000;

/// A latency histogram as the bench keeps them.
pub fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).context("latency histogram")
}

/// The stream an operation subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    Trades,
    Quotes,
}

/// What an operation selects besides its stream (the GraphQL arguments).
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    All,
    Instruments(Vec<String>),
    Venues(Vec<String>),
    AssetClasses(Vec<AssetClass>),
}

/// One `subscribe` of a subscriber.
#[derive(Debug, Clone)]
pub struct Op {
    pub feed: Feed,
    pub filter: Filter,
    /// The bench's instrument indexes the filter selects; None: all of them.
    pub selects: Option<Arc<[u32]>>,
    /// `maxRate`: the operation is conflated, so only that it receives can be
    /// checked, not how much.
    pub max_rate: Option<f64>,
}

impl Op {
    /// The GraphQL document and its variables.
    pub fn document(&self) -> (String, Value) {
        let (field, selection) = match self.feed {
            Feed::Trades => ("trades", "id ts instrument price qty"),
            Feed::Quotes => ("quotes", "id ts instrument bid ask"),
        };
        let mut args = Vec::new();
        let (decl, variables) = match &self.filter {
            Filter::All => ("", json!({})),
            Filter::Instruments(s) => {
                args.push("instruments: $i".to_string());
                (" ($i: [String!])", json!({ "i": s }))
            }
            Filter::Venues(v) => {
                args.push("venues: $v".to_string());
                (" ($v: [String!])", json!({ "v": v }))
            }
            Filter::AssetClasses(c) => {
                args.push("assetClasses: $c".to_string());
                let names: Vec<String> = c.iter().map(|a| graphql_asset_class(*a)).collect();
                (" ($c: [AssetClass!])", json!({ "c": names }))
            }
        };
        if let Some(r) = self.max_rate {
            args.push(format!("maxRate: {r}"));
        }
        let args = if args.is_empty() {
            String::new()
        } else {
            format!("({})", args.join(", "))
        };
        (
            format!("subscription{decl} {{ {field}{args} {{ {selection} }} }}"),
            variables,
        )
    }

    /// Accepted events this operation selects.
    pub fn selected(&self, accepted: &Accepted) -> u64 {
        match &self.selects {
            None => accepted.total(self.feed),
            Some(idx) => idx.iter().map(|&i| accepted.of(self.feed, i)).sum(),
        }
    }
}

/// The GraphQL name of an asset class (`ETF`).
pub fn graphql_asset_class(a: AssetClass) -> String {
    a.as_str().to_ascii_uppercase()
}

/// Accepted events of a step per instrument index, split by kind.
#[derive(Debug, Clone, Default)]
pub struct Accepted {
    pub events: Vec<u64>,
    pub trades: Vec<u64>,
}

impl Accepted {
    fn of(&self, feed: Feed, i: u32) -> u64 {
        let i = i as usize;
        let all = self.events.get(i).copied().unwrap_or(0);
        let trades = self.trades.get(i).copied().unwrap_or(0);
        match feed {
            Feed::Trades => trades,
            Feed::Quotes => all.saturating_sub(trades),
        }
    }

    fn total(&self, feed: Feed) -> u64 {
        let trades: u64 = self.trades.iter().sum();
        match feed {
            Feed::Trades => trades,
            Feed::Quotes => self.events.iter().sum::<u64>().saturating_sub(trades),
        }
    }
}

/// What one subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscriberSpec {
    pub name: String,
    /// Its group: the index of the [`LatencySink`] it records into, and the
    /// line of the report it is summed in.
    pub group: usize,
    /// Each operation's id on the socket is its index here.
    pub ops: Vec<Op>,
}

impl SubscriberSpec {
    /// Accepted events its unconflated operations select: what it must receive.
    pub fn expected(&self, accepted: &Accepted) -> u64 {
        self.ops
            .iter()
            .filter(|o| o.max_rate.is_none())
            .map(|o| o.selected(accepted))
            .sum()
    }

    /// Accepted events its conflated operations select (it receives at most
    /// these, and at least one when there are any).
    pub fn conflatable(&self, accepted: &Accepted) -> u64 {
        self.ops
            .iter()
            .filter(|o| o.max_rate.is_some())
            .map(|o| o.selected(accepted))
            .sum()
    }

    pub fn has_conflated(&self) -> bool {
        self.ops.iter().any(|o| o.max_rate.is_some())
    }
}

/// What a subscriber received during one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    /// Events of unconflated operations, warm-up included.
    pub counted: u64,
    /// Events of conflated operations, warm-up included.
    pub conflated: u64,
    /// Every event sent after the warm-up, both kinds.
    pub measured: u64,
}

/// The latency of one step of a group: every-event operations (send to
/// arrival) and conflated ones (the age of the value when it arrived).
pub struct StepLatency {
    pub every: Histogram<u64>,
    pub conflated: Histogram<u64>,
}

/// The latency histograms a group of subscribers shares, per step.
pub struct LatencySink {
    steps: Mutex<BTreeMap<u32, StepLatency>>,
    proto: Histogram<u64>,
}

impl LatencySink {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            steps: Mutex::new(BTreeMap::new()),
            proto: latency_histogram()?,
        })
    }

    fn steps(&self) -> MutexGuard<'_, BTreeMap<u32, StepLatency>> {
        self.steps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn empty(&self) -> StepLatency {
        StepLatency {
            every: self.proto.clone(),
            conflated: self.proto.clone(),
        }
    }

    pub fn record(&self, step: u32, conflated: bool, us: u64) {
        let mut steps = self.steps();
        let s = steps.entry(step).or_insert_with(|| self.empty());
        let h = if conflated {
            &mut s.conflated
        } else {
            &mut s.every
        };
        h.saturating_record(us.max(1));
    }

    /// Takes what `step` recorded, and drops any older leftovers.
    pub fn collect(&self, step: u32) -> StepLatency {
        let mut steps = self.steps();
        let taken = steps.remove(&step);
        steps.retain(|&s, _| s > step);
        taken.unwrap_or_else(|| self.empty())
    }
}

/// How connections and operations ended, summed over every subscriber: close
/// codes, socket errors, refusals and server errors, by a short label.
#[derive(Default)]
pub struct Outcomes {
    counts: Mutex<BTreeMap<String, u64>>,
    logged: AtomicU64,
}

/// Subscriber errors logged at WARN; the rest are at DEBUG (ten thousand
/// subscribers cut off at once would otherwise flood the log), and the report
/// counts them all.
const WARN_ERRORS: u64 = 10;

impl Outcomes {
    pub fn add(&self, label: String) {
        *self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(label)
            .or_insert(0) += 1;
    }

    /// Every label with its count, most frequent first.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, &n)| (k.clone(), n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// A message as a low-cardinality label: up to its first `:` (the variable
/// part of our error messages follows it), at most 60 characters.
pub fn short_label(message: &str) -> String {
    let head = message.split(':').next().unwrap_or(message).trim();
    head.chars().take(60).collect()
}

/// Where every event id the bench sends comes from: `<prefix><k>:<seq>` is the
/// event `seq` of connection `k`.
pub struct Origins {
    pub prefix: String,
    pub connections: Vec<Arc<Connection>>,
}

impl Origins {
    /// The send time and tag of an event id, if the bench sent it.
    fn lookup(&self, id: &str) -> Option<(i64, super::load::Tag)> {
        let (source, seq) = id.rsplit_once(':')?;
        let k: usize = source.strip_prefix(&self.prefix)?.parse().ok()?;
        let seq: u64 = seq.parse().ok()?;
        self.connections.get(k)?.log.lookup(seq)
    }
}

/// A running subscriber's counts, shared with the bench.
pub struct Subscriber {
    pub spec: SubscriberSpec,
    counts: Mutex<BTreeMap<u32, StepCounts>>,
    latency: Arc<LatencySink>,
    outcomes: Arc<Outcomes>,
    /// Steps below this have been collected; their stragglers count as late.
    collected: AtomicU32,
    /// Events delivered after their step was collected.
    pub late: AtomicU64,
    /// Events whose id the bench did not send.
    pub foreign: AtomicU64,
    errors: Mutex<Vec<String>>,
    pub closed: AtomicBool,
}

impl Subscriber {
    fn new(spec: SubscriberSpec, latency: Arc<LatencySink>, outcomes: Arc<Outcomes>) -> Self {
        Self {
            spec,
            counts: Mutex::new(BTreeMap::new()),
            latency,
            outcomes,
            collected: AtomicU32::new(0),
            late: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }
    }

    fn counts(&self) -> MutexGuard<'_, BTreeMap<u32, StepCounts>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What `step` has received so far.
    pub fn counts_in(&self, step: u32) -> StepCounts {
        self.counts().get(&step).copied().unwrap_or_default()
    }

    /// Takes what `step` received; later arrivals for it count as late. Collect
    /// every subscriber of a group before its [`LatencySink`].
    pub fn collect(&self, step: u32) -> StepCounts {
        self.collected.fetch_max(step + 1, Ordering::Relaxed);
        self.counts().remove(&step).unwrap_or_default()
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// An error for this subscriber's list and, under `label`, the outcomes.
    fn error(&self, label: String, e: String) {
        if self.outcomes.logged.fetch_add(1, Ordering::Relaxed) < WARN_ERRORS {
            tracing::warn!(subscriber = %self.spec.name, error = %e, "bench subscriber");
        } else {
            tracing::debug!(subscriber = %self.spec.name, error = %e, "bench subscriber");
        }
        self.outcomes.add(label);
        let mut errors = self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if errors.len() < 5 {
            errors.push(e);
        }
    }

    fn record(&self, origins: &Origins, op: Option<usize>, id: &str, arrived_ns: i64) {
        let Some((sent_ns, tag)) = origins.lookup(id) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if tag.step < self.collected.load(Ordering::Relaxed) {
            self.late.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let conflated = op
            .and_then(|i| self.spec.ops.get(i))
            .is_some_and(|o| o.max_rate.is_some());
        {
            let mut counts = self.counts();
            let c = counts.entry(tag.step).or_default();
            if conflated {
                c.conflated += 1;
            } else {
                c.counted += 1;
            }
            if !tag.warmup {
                c.measured += 1;
            }
        }
        if !tag.warmup {
            let us = arrived_ns.saturating_sub(sent_ns) / 1_000;
            self.latency
                .record(tag.step, conflated, u64::try_from(us).unwrap_or(1));
        }
    }
}

/// The operation id and the event id a `next` message carries, found without
/// parsing the JSON: the message's `id`, then the first `"id"` inside `data`.
/// None for anything else (errors, `complete`, pings), which the slow path
/// reads.
pub fn next_ids(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix(r#"{"type":"next","id":""#)?;
    let op = &rest[..rest.find('"')?];
    let rest = &rest[rest.find(r#""data":{""#)?..];
    let start = rest.find(r#"{"id":""#)? + r#"{"id":""#.len();
    let rest = &rest[start..];
    let id = &rest[..rest.find('"')?];
    (!id.contains('\\') && !op.contains('\\')).then_some((op, id))
}

/// How subscribers connect.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Connections being opened at once (the rest wait), so the server's
    /// accept queue is never overrun.
    pub concurrency: usize,
    /// tungstenite's read buffer per connection, which it zeroes before every
    /// read: large for a few busy subscribers, small for thousands of quiet ones.
    pub read_buffer: usize,
    /// A connection that fails is counted in the outcomes instead of failing
    /// the bench.
    pub tolerate_failures: bool,
}

/// Connects, says `connection_init` and waits for the ack.
async fn connect(url: &str, read_buffer: usize) -> anyhow::Result<Ws> {
    let mut req = url
        .into_client_request()
        .with_context(|| format!("bad --api-url {url}"))?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("graphql-transport-ws"),
    );
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        // tungstenite zeroes its whole read buffer before every read: 128 KiB by
        // default, which cost the bench more than parsing the messages.
        tokio_tungstenite::connect_async_with_config(
            req,
            Some(WebSocketConfig::default().read_buffer_size(read_buffer)),
            true,
        ),
    )
    .await
    .context("WebSocket connect timed out")?
    .with_context(|| format!("WebSocket connect to {url}"))?;
    ws.send(text(json!({"type": "connection_init", "payload": {}})))
        .await?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no connection_ack within 10 s")?;
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str())?;
                match v["type"].as_str() {
                    Some("connection_ack") => break,
                    Some("ping") => ws.send(text(json!({"type": "pong"}))).await?,
                    _ => bail!("expected connection_ack, got {v}"),
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => bail!("expected connection_ack, got {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("socket closed before connection_ack"),
        }
    }
    Ok(ws)
}

/// Sends a `subscribe` per operation, its index as id.
async fn subscribe(ws: &mut Ws, spec: &SubscriberSpec) -> Result<(), tungstenite::Error> {
    for (i, op) in spec.ops.iter().enumerate() {
        let (query, variables) = op.document();
        ws.feed(text(json!({
            "id": i.to_string(),
            "type": "subscribe",
            "payload": {"query": query, "variables": variables},
        })))
        .await?;
    }
    ws.flush().await
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

/// The subscribers that connected, their reader tasks, and how connecting went.
pub struct Started {
    pub subs: Vec<Arc<Subscriber>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Connections that failed (only with `tolerate_failures`).
    pub failed: usize,
    /// From the first connect to the last `connection_ack`.
    pub took: Duration,
    /// Connect + `connection_init` + ack of each connection, us.
    pub connect_us: Histogram<u64>,
    /// Subscribers that have sent their `subscribe`s (after `go`).
    pub subscribed: Arc<AtomicUsize>,
}

/// Connects every spec and waits for its `connection_ack`, `concurrency` at a
/// time; returns once all are done, with their readers running until `stop`.
/// Each reader subscribes once `go` is cancelled (at once if it already is),
/// so an idle connection and its idle subscriptions can be measured apart.
/// `sinks[g]` takes the latency of group `g`.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    url: &str,
    specs: Vec<SubscriberSpec>,
    sinks: &[Arc<LatencySink>],
    origins: Arc<Origins>,
    outcomes: Arc<Outcomes>,
    opts: ConnectOptions,
    go: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<Started> {
    let started = Instant::now();
    let total = specs.len();
    let mut subs = Vec::with_capacity(total);
    let mut tasks = Vec::with_capacity(total);
    let mut failed = 0;
    let mut connect_us = latency_histogram()?;
    let subscribed = Arc::new(AtomicUsize::new(0));
    let read_buffer = opts.read_buffer;
    let mut connecting = futures_util::stream::iter(specs.into_iter().map(|spec| async move {
        let t0 = Instant::now();
        let ws = connect(url, read_buffer).await;
        (spec, ws, t0.elapsed())
    }))
    .buffer_unordered(opts.concurrency.max(1));
    while let Some((spec, ws, took)) = connecting.next().await {
        let ws = match ws {
            Ok(ws) => ws,
            Err(e) if opts.tolerate_failures => {
                outcomes.add(format!(
                    "connect failed: {}",
                    short_label(&format!("{e:#}"))
                ));
                tracing::debug!(subscriber = %spec.name, error = %format!("{e:#}"), "bench subscriber did not connect");
                failed += 1;
                continue;
            }
            Err(e) => return Err(e.context(format!("subscriber {}", spec.name))),
        };
        connect_us.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        let sink = sinks
            .get(spec.group)
            .with_context(|| format!("no latency sink for group {}", spec.group))?
            .clone();
        let sub = Arc::new(Subscriber::new(spec, sink, outcomes.clone()));
        tasks.push(tokio::spawn(read(
            ws,
            sub.clone(),
            origins.clone(),
            Gate {
                go: go.clone(),
                subscribed: subscribed.clone(),
            },
            stop.clone(),
        )));
        subs.push(sub);
        if subs.len() % 1000 == 0 {
            tracing::info!(
                connected = subs.len(),
                of = total,
                "bench subscribers connecting"
            );
        }
    }
    Ok(Started {
        subs,
        tasks,
        failed,
        took: started.elapsed(),
        connect_us,
        subscribed,
    })
}

/// When a reader subscribes, and where it says it did.
struct Gate {
    go: CancellationToken,
    subscribed: Arc<AtomicUsize>,
}

async fn read(
    mut ws: Ws,
    sub: Arc<Subscriber>,
    origins: Arc<Origins>,
    gate: Gate,
    stop: CancellationToken,
) {
    let mut pending = true;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            _ = gate.go.cancelled(), if pending => {
                pending = false;
                if let Err(e) = subscribe(&mut ws, &sub.spec).await {
                    sub.error("socket error".into(), format!("subscribing: {e}"));
                    break;
                }
                gate.subscribed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            m = ws.next() => m,
        };
        let arrived = now_nanos();
        match msg {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                if let Some((op, id)) = next_ids(t) {
                    sub.record(&origins, op.parse().ok(), id, arrived);
                    continue;
                }
                match slow_path(t, &sub, &origins, arrived) {
                    Reply::None => {}
                    Reply::Pong => {
                        if let Err(e) = ws.send(text(json!({"type": "pong"}))).await {
                            sub.error("socket error".into(), format!("sending pong: {e}"));
                            break;
                        }
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let label = match &frame {
                    Some(f) => format!(
                        "closed by the server: {} {}",
                        u16::from(f.code),
                        short_label(f.reason.as_str())
                    ),
                    None => "closed by the server without a code".to_string(),
                };
                sub.error(label, format!("server closed the socket: {frame:?}"));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                sub.error("socket error".into(), format!("socket error: {e}"));
                break;
            }
            None => {
                sub.error("socket ended without a close".into(), "socket ended".into());
                break;
            }
        }
    }
    sub.closed.store(true, Ordering::Relaxed);
    // The server may already be gone; nothing left to tell it.
    let _ = ws.close(None).await;
}

enum Reply {
    None,
    Pong,
}

/// Any message the fast path did not take: a `next` it could not read, errors,
/// `complete`, pings.
fn slow_path(t: &str, sub: &Subscriber, origins: &Origins, arrived: i64) -> Reply {
    let v: Value = match serde_json::from_str(t) {
        Ok(v) => v,
        Err(e) => {
            sub.error(
                "unreadable message".into(),
                format!("unreadable message ({e}): {t:.200}"),
            );
            return Reply::None;
        }
    };
    let op: Option<usize> = v["id"].as_str().and_then(|s| s.parse().ok());
    match v["type"].as_str() {
        Some("next") => {
            let payload = &v["payload"];
            if let Some(errors) = payload.get("errors") {
                let m = messages(errors);
                sub.error(
                    format!("error: {}", short_label(&m)),
                    format!("subscription {} error: {m}", v["id"]),
                );
            }
            if let Some(data) = payload["data"].as_object() {
                for node in data.values() {
                    if let Some(id) = node["id"].as_str() {
                        sub.record(origins, op, id, arrived);
                    }
                }
            }
            Reply::None
        }
        Some("ping") => Reply::Pong,
        Some("pong") => Reply::None,
        Some("error") => {
            let m = messages(&v["payload"]);
            sub.error(
                format!("refused: {}", short_label(&m)),
                format!("subscription {} refused: {m}", v["id"]),
            );
            Reply::None
        }
        Some("complete") => {
            sub.error(
                "completed by the server".into(),
                format!("server completed subscription {}", v["id"]),
            );
            Reply::None
        }
        _ => {
            sub.error(
                "unexpected message".into(),
                format!("unexpected message: {t:.300}"),
            );
            Reply::None
        }
    }
}

/// The `message` of each GraphQL error in a list, joined.
fn messages(errors: &Value) -> String {
    match errors.as_array() {
        Some(list) => list
            .iter()
            .map(|e| e["message"].as_str().unwrap_or("?"))
            .collect::<Vec<_>>()
            .join("; "),
        None => format!("{errors:.200}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_reads_the_operation_and_event_ids_of_a_next_message() {
        let m = r#"{"type":"next","id":"1","payload":{"data":{"trades":{"id":"bench-ab-c1:42","ts":"2026-11-25T10:00:00.000000001Z","instrument":"AAPL"}}}}"#;
        assert_eq!(next_ids(m), Some(("1", "bench-ab-c1:42")));
        let errors = r#"{"type":"next","id":"0","payload":{"data":null,"errors":[{"message":"subscriber too slow: x"}]}}"#;
        assert_eq!(next_ids(errors), None);
        assert_eq!(next_ids(r#"{"type":"complete","id":"0"}"#), None);
        assert_eq!(next_ids(r#"{"type":"ping"}"#), None);
    }

    fn op(feed: Feed, filter: Filter, selects: Option<&[u32]>, max_rate: Option<f64>) -> Op {
        Op {
            feed,
            filter,
            selects: selects.map(Arc::from),
            max_rate,
        }
    }

    #[test]
    fn documents_carry_the_filter_as_variables_and_max_rate_inline() {
        let (q, v) = op(Feed::Trades, Filter::All, None, None).document();
        assert_eq!(q, "subscription { trades { id ts instrument price qty } }");
        assert_eq!(v, json!({}));
        let (q, v) = op(
            Feed::Quotes,
            Filter::Instruments(vec!["AAPL".into(), "VOD.L".into()]),
            Some(&[0, 1]),
            Some(4.0),
        )
        .document();
        assert_eq!(
            q,
            "subscription ($i: [String!]) { quotes(instruments: $i, maxRate: 4) { id ts instrument bid ask } }"
        );
        assert_eq!(v, json!({"i": ["AAPL", "VOD.L"]}));
        let (q, v) = op(
            Feed::Trades,
            Filter::AssetClasses(vec![AssetClass::Etf]),
            Some(&[2]),
            None,
        )
        .document();
        assert_eq!(
            q,
            "subscription ($c: [AssetClass!]) { trades(assetClasses: $c) { id ts instrument price qty } }"
        );
        assert_eq!(v, json!({"c": ["ETF"]}));
        let (q, _) = op(Feed::Quotes, Filter::All, None, Some(0.5)).document();
        assert_eq!(
            q,
            "subscription { quotes(maxRate: 0.5) { id ts instrument bid ask } }"
        );
    }

    #[test]
    fn expected_counts_only_unconflated_operations_by_kind_and_instrument() {
        let accepted = Accepted {
            events: vec![10, 20, 30],
            trades: vec![1, 2, 3],
        };
        let spec = SubscriberSpec {
            name: "grid-1".into(),
            group: 0,
            ops: vec![
                op(
                    Feed::Quotes,
                    Filter::Instruments(vec!["A".into(), "C".into()]),
                    Some(&[0, 2]),
                    Some(4.0),
                ),
                op(
                    Feed::Trades,
                    Filter::Instruments(vec!["A".into(), "C".into()]),
                    Some(&[0, 2]),
                    None,
                ),
            ],
        };
        assert_eq!(spec.expected(&accepted), 1 + 3);
        assert_eq!(spec.conflatable(&accepted), 9 + 27);
        let all = SubscriberSpec {
            name: "all-1".into(),
            group: 0,
            ops: vec![
                op(Feed::Trades, Filter::All, None, None),
                op(Feed::Quotes, Filter::All, None, None),
            ],
        };
        assert_eq!(all.expected(&accepted), 60);
        assert_eq!(all.conflatable(&accepted), 0);
        assert!(!all.has_conflated() && spec.has_conflated());
    }

    #[test]
    fn a_shared_sink_keeps_steps_and_kinds_apart_and_drops_leftovers() {
        let sink = LatencySink::new().expect("sink");
        sink.record(0, false, 1_000);
        sink.record(0, false, 3_000);
        sink.record(0, true, 250_000);
        sink.record(1, false, 7);
        sink.record(2, false, 0);
        let s0 = sink.collect(0);
        assert_eq!(s0.every.len(), 2);
        assert_eq!(s0.conflated.len(), 1);
        assert!(s0.every.max() >= 3_000 && s0.every.max() < 3_010);
        // Collecting step 2 drops step 1's leftovers with it.
        let s2 = sink.collect(2);
        assert_eq!((s2.every.len(), s2.every.min()), (1, 1), "0 us counts as 1");
        assert!(sink.collect(1).every.is_empty());
    }

    #[test]
    fn outcomes_are_counted_by_short_label_most_frequent_first() {
        let o = Outcomes::default();
        o.add(format!(
            "closed by the server: 4008 {}",
            short_label("slow consumer: 1048576 bytes queued")
        ));
        o.add("socket error".into());
        o.add(format!(
            "closed by the server: 4008 {}",
            short_label("slow consumer: 2000000 bytes queued")
        ));
        assert_eq!(
            o.snapshot(),
            vec![
                ("closed by the server: 4008 slow consumer".to_string(), 2),
                ("socket error".to_string(), 1)
            ]
        );
    }
}
