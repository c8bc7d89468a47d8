//! GraphQL subscribers over real WebSockets (`graphql-transport-ws`): each
//! subscribes to `trades` and `quotes`, unfiltered or for a few instruments, and
//! times every event it receives against the moment its batch was sent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::load::Connection;
use tickgraph_ingest::event::now_nanos;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Latencies are recorded in microseconds, up to a minute (later is a minute).
pub const LATENCY_MAX_US: u64 = 60_000_000;

const TRADES_ALL: &str = "subscription { trades { id ts instrument price qty } }";
const QUOTES_ALL: &str = "subscription { quotes { id ts instrument bid ask } }";
const TRADES_FEW: &str =
    "subscription ($i: [String!]) { trades(instruments: $i) { id ts instrument price qty } }";
const QUOTES_FEW: &str =
    "subscription ($i: [String!]) { quotes(instruments: $i) { id ts instrument bid ask } }";

/// What one subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscriberSpec {
    pub name: String,
    /// None: every trade and quote; else the trades and quotes of these
    /// instruments (indexes into the bench's instrument list, and their symbols).
    pub instruments: Option<(Vec<u32>, Vec<String>)>,
}

/// What a subscriber received during one step.
pub struct StepTally {
    /// Send-to-arrival latency, microseconds, of events sent after the warm-up.
    pub latency: Histogram<u64>,
    /// Every event of the step, warm-up included.
    pub delivered: u64,
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
    tallies: Mutex<BTreeMap<u32, StepTally>>,
    proto: Histogram<u64>,
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
    fn new(spec: SubscriberSpec) -> anyhow::Result<Self> {
        Ok(Self {
            spec,
            tallies: Mutex::new(BTreeMap::new()),
            proto: Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).context("latency histogram")?,
            collected: AtomicU32::new(0),
            late: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        })
    }

    fn tallies(&self) -> MutexGuard<'_, BTreeMap<u32, StepTally>> {
        self.tallies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Events of `step` delivered so far.
    pub fn delivered_in(&self, step: u32) -> u64 {
        self.tallies().get(&step).map_or(0, |t| t.delivered)
    }

    /// Takes what `step` received; later arrivals for it count as late.
    pub fn collect(&self, step: u32) -> StepTally {
        self.collected.fetch_max(step + 1, Ordering::Relaxed);
        self.tallies().remove(&step).unwrap_or_else(|| StepTally {
            latency: self.proto.clone(),
            delivered: 0,
        })
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn error(&self, e: String) {
        tracing::warn!(subscriber = %self.spec.name, error = %e, "bench subscriber");
        let mut errors = self
            .errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if errors.len() < 5 {
            errors.push(e);
        }
    }

    fn record(&self, origins: &Origins, id: &str, arrived_ns: i64) {
        let Some((sent_ns, tag)) = origins.lookup(id) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if tag.step < self.collected.load(Ordering::Relaxed) {
            self.late.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut tallies = self.tallies();
        let tally = tallies.entry(tag.step).or_insert_with(|| StepTally {
            latency: self.proto.clone(),
            delivered: 0,
        });
        tally.delivered += 1;
        if !tag.warmup {
            let us = (arrived_ns.saturating_sub(sent_ns) / 1_000).max(1);
            tally
                .latency
                .saturating_record(u64::try_from(us).unwrap_or(1));
        }
    }
}

/// The id of the event a `next` message carries, found without parsing the
/// JSON: the first `"id"` inside `data`. None for anything else (errors,
/// `complete`, pings), which the slow path reads.
pub fn next_event_id(text: &str) -> Option<&str> {
    let rest = text.strip_prefix(r#"{"type":"next""#)?;
    let rest = &rest[rest.find(r#""data":{""#)?..];
    let start = rest.find(r#"{"id":""#)? + r#"{"id":""#.len();
    let rest = &rest[start..];
    let id = &rest[..rest.find('"')?];
    (!id.contains('\\')).then_some(id)
}

/// Connects, says `connection_init`, waits for the ack and subscribes.
async fn connect(url: &str, spec: &SubscriberSpec) -> anyhow::Result<Ws> {
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
            Some(WebSocketConfig::default().read_buffer_size(32 << 10)),
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
    let subs = match &spec.instruments {
        None => [("t", TRADES_ALL, json!({})), ("q", QUOTES_ALL, json!({}))],
        Some((_, symbols)) => [
            ("t", TRADES_FEW, json!({ "i": symbols })),
            ("q", QUOTES_FEW, json!({ "i": symbols })),
        ],
    };
    for (id, query, variables) in subs {
        ws.send(text(json!({
            "id": id,
            "type": "subscribe",
            "payload": {"query": query, "variables": variables},
        })))
        .await?;
    }
    Ok(ws)
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

/// Connects and subscribes every spec; returns once all have subscribed, with
/// their readers running until `stop`.
pub async fn start(
    url: &str,
    specs: Vec<SubscriberSpec>,
    origins: Arc<Origins>,
    stop: CancellationToken,
) -> anyhow::Result<(Vec<Arc<Subscriber>>, Vec<tokio::task::JoinHandle<()>>)> {
    let mut subs = Vec::with_capacity(specs.len());
    let mut tasks = Vec::with_capacity(specs.len());
    for spec in specs {
        let ws = connect(url, &spec)
            .await
            .with_context(|| format!("subscriber {}", spec.name))?;
        let sub = Arc::new(Subscriber::new(spec)?);
        tasks.push(tokio::spawn(read(
            ws,
            sub.clone(),
            origins.clone(),
            stop.clone(),
        )));
        subs.push(sub);
    }
    Ok((subs, tasks))
}

async fn read(mut ws: Ws, sub: Arc<Subscriber>, origins: Arc<Origins>, stop: CancellationToken) {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = ws.next() => m,
        };
        let arrived = now_nanos();
        match msg {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                if let Some(id) = next_event_id(t) {
                    sub.record(&origins, id, arrived);
                    continue;
                }
                match slow_path(t, &sub, &origins, arrived) {
                    Reply::None => {}
                    Reply::Pong => {
                        if let Err(e) = ws.send(text(json!({"type": "pong"}))).await {
                            sub.error(format!("sending pong: {e}"));
                            break;
                        }
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                sub.error(format!("server closed the socket: {frame:?}"));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                sub.error(format!("socket error: {e}"));
                break;
            }
            None => {
                sub.error("socket ended".into());
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
            sub.error(format!("unreadable message ({e}): {t:.200}"));
            return Reply::None;
        }
    };
    match v["type"].as_str() {
        Some("next") => {
            let payload = &v["payload"];
            if let Some(errors) = payload.get("errors") {
                sub.error(format!(
                    "subscription {} error: {}",
                    v["id"],
                    messages(errors)
                ));
            }
            if let Some(data) = payload["data"].as_object() {
                for node in data.values() {
                    if let Some(id) = node["id"].as_str() {
                        sub.record(origins, id, arrived);
                    }
                }
            }
            Reply::None
        }
        Some("ping") => Reply::Pong,
        Some("pong") => Reply::None,
        Some("error") => {
            sub.error(format!(
                "subscription {} refused: {}",
                v["id"],
                messages(&v["payload"])
            ));
            Reply::None
        }
        Some("complete") => {
            sub.error(format!("server completed subscription {}", v["id"]));
            Reply::None
        }
        _ => {
            sub.error(format!("unexpected message: {t:.300}"));
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
    use super::next_event_id;

    #[test]
    fn the_fast_path_reads_the_event_id_of_a_next_message() {
        let m = r#"{"type":"next","id":"t","payload":{"data":{"trades":{"id":"bench-ab-c1:42","ts":"2026-11-25T10:00:00.000000001Z","instrument":"AAPL"}}}}"#;
        assert_eq!(next_event_id(m), Some("bench-ab-c1:42"));
        let errors = r#"{"type":"next","id":"t","payload":{"data":null,"errors":[{"message":"subscriber too slow: x"}]}}"#;
        assert_eq!(next_event_id(errors), None);
        assert_eq!(next_event_id(r#"{"type":"complete","id":"t"}"#), None);
        assert_eq!(next_event_id(r#"{"type":"ping"}"#), None);
    }
}
