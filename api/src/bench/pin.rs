//! `tickgraph pin-memory`: how much memory one user can make the api hold.
//!
//! One user opens `--connections` WebSockets (or SSE streams) and on each
//! `--subscriptions` idle subscriptions naming `--instruments` instruments
//! (made-up 60-character symbols, or real ones from the reference data), paced
//! under the user's request rate. Once the server counts them live it closes
//! every socket, and waits until the server counts none. It prints the api's
//! resident memory (`VmRSS` of `--server-pid`) before, with everything open,
//! at its highest, and after the close, the bytes per live subscription, and
//! how the server refused what it refused.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::procstat::vmrss_kib;

/// What the subscriptions name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Symbols {
    /// The same made-up 60-character symbols in every subscription.
    MadeUp,
    /// Made-up 60-character symbols of their own in each subscription.
    MadeUpDistinct,
    /// The first instruments of the reference data.
    Real,
}

/// How the subscriptions reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// graphql-transport-ws.
    Ws,
    /// The legacy graphql-ws.
    Legacy,
    /// graphql-sse: one stream per subscription, `--subscriptions` ignored.
    Sse,
}

/// The subscription document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// Plain leaf fields: served without the GraphQL executor on a WebSocket.
    Plain,
    /// With an inline fragment: always run by the executor.
    Executor,
}

/// Flags of `tickgraph pin-memory`.
#[derive(clap::Args, Clone, Debug)]
pub struct PinArgs {
    /// The api.
    #[arg(long, env = "TG_API_HTTP_URL", default_value = "http://127.0.0.1:8080")]
    pub api_url: String,
    /// The user's JWT (none in dev mode).
    #[arg(long, env = "TG_USER_TOKEN", hide_env_values = true)]
    pub user_token: Option<String>,
    /// The api's process, whose resident memory is read from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Connections (SSE: streams) the user opens.
    #[arg(long, default_value_t = 20)]
    pub connections: usize,
    /// Subscriptions per WebSocket connection.
    #[arg(long, default_value_t = 100)]
    pub subscriptions: usize,
    /// Instruments each subscription names (at most 1000).
    #[arg(long, default_value_t = 1000)]
    pub instruments: usize,
    #[arg(long, value_enum, default_value_t = Symbols::MadeUp)]
    pub symbols: Symbols,
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    #[arg(long, value_enum, default_value_t = Shape::Plain)]
    pub shape: Shape,
    /// Fields of the selection besides `instrument` and `bid`, each `bid`
    /// under an alias of its own: the selection's size.
    #[arg(long, default_value_t = 0)]
    pub aliases: usize,
    /// Bytes of each alias (at least what tells them apart).
    #[arg(long, default_value_t = 0)]
    pub alias_bytes: usize,
    /// One-letter strings in a variable the document does not declare, sent
    /// with every subscription.
    #[arg(long, default_value_t = 0)]
    pub undeclared: usize,
    /// Subscriptions started per second, all connections together: under the
    /// user's request rate (`--user-requests-per-sec`, 100 by default).
    #[arg(long, default_value_t = 90.0)]
    pub rate: f64,
    /// Seconds to wait after the server counts no subscription, before the
    /// last reading (the allocator returns freed pages after a delay).
    #[arg(long, default_value_t = 10)]
    pub settle_secs: u64,
    /// Times to open and close everything, one after the other: whether what
    /// one round freed is used again by the next.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
}

/// How long a request that is not a stream may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Made-up symbols are this long.
const MADE_UP_LEN: usize = 60;
/// A refusal for the rate is sent again, at most this many times.
const RATE_RETRIES: u32 = 5;
/// How long the server's count may stand still before the tool stops
/// waiting for it to reach what was sent.
const STILL: Duration = Duration::from_secs(5);

/// What the user's connections saw.
#[derive(Default)]
struct Tally {
    /// Connections that got their `connection_ack` (SSE: status 200).
    connected: AtomicUsize,
    /// Subscriptions sent, refusals for the rate sent again not counted twice.
    sent: AtomicUsize,
    /// Subscriptions whose sending is settled: sent and not refused for the
    /// rate, or refused too often.
    settled: AtomicUsize,
    /// Refusals, connection closes and failures, by code or a short reason.
    outcomes: Mutex<BTreeMap<String, u64>>,
    refused: AtomicU64,
}

impl Tally {
    fn add(&self, what: String) {
        *self
            .outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(what)
            .or_default() += 1;
    }

    fn refuse(&self, what: String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.add(what);
    }
}

/// Resident memory of the server, highest reading kept.
#[derive(Clone)]
struct Rss {
    pid: Option<u32>,
    peak_kib: Arc<AtomicU64>,
}

impl Rss {
    fn read(&self) -> Option<u64> {
        let pid = self.pid?;
        let kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| vmrss_kib(&s))?;
        self.peak_kib.fetch_max(kib, Ordering::Relaxed);
        Some(kib)
    }
}

pub async fn run(args: PinArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.connections == 0 || args.subscriptions == 0 || args.instruments == 0 {
        bail!("--connections, --subscriptions and --instruments must be above 0");
    }
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--rate must be above 0");
    }
    // No overall timeout: an SSE stream is one response that lasts the round.
    // The other requests set their own.
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let per_connection = match args.transport {
        Transport::Sse => 1,
        _ => args.subscriptions,
    };
    let total = args.connections * per_connection;
    let symbols = Arc::new(symbols(&args, &http, total).await?);
    for round in 1..=args.rounds.max(1) {
        if args.rounds > 1 {
            println!("round {round} of {}:", args.rounds);
        }
        pin(&args, &http, &symbols, total, &shutdown).await;
        if shutdown.is_cancelled() {
            break;
        }
    }
    Ok(())
}

/// One round: opens everything, closes it, and prints what it saw.
async fn pin(
    args: &PinArgs,
    http: &reqwest::Client,
    symbols: &Arc<Vec<Arc<Value>>>,
    total: usize,
    shutdown: &CancellationToken,
) {
    let per_connection = total / args.connections;
    let rss = Rss {
        pid: args.server_pid,
        peak_kib: Arc::new(AtomicU64::new(0)),
    };
    let before = rss.read();
    let tally = Arc::new(Tally::default());
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    let pacer = Arc::new(tokio::sync::Mutex::new({
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }));
    let sampler = {
        let (rss, stop) = (rss.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            while !stop.is_cancelled() {
                every.tick().await;
                rss.read();
            }
        })
    };
    let started = Instant::now();
    for c in 0..args.connections {
        let job = Job {
            args: Arc::new(args.clone()),
            symbols: Arc::clone(symbols),
            first: c * per_connection,
            count: per_connection,
            tally: Arc::clone(&tally),
            pacer: Arc::clone(&pacer),
            stop: stop.clone(),
        };
        match args.transport {
            Transport::Ws | Transport::Legacy => tasks.spawn(job.websocket()),
            Transport::Sse => tasks.spawn(job.sse(http.clone())),
        };
    }
    // Until every subscription is sent and the server counts what it took.
    let mut live = 0;
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if shutdown.is_cancelled() {
            break;
        }
        let settled = tally.settled.load(Ordering::Relaxed);
        let refused = tally.refused.load(Ordering::Relaxed) as usize;
        let now = server_subscriptions(http, &args.api_url).await.unwrap_or(0);
        if now != live {
            live = now;
            still_since = Instant::now();
        }
        if settled >= total && (live + refused >= total || still_since.elapsed() >= STILL) {
            break;
        }
    }
    let opened_in = started.elapsed();
    let full = rss.read();
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    let closing = Instant::now();
    let mut left = live;
    while left > 0 && closing.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = server_subscriptions(http, &args.api_url).await.unwrap_or(0);
    }
    let closed_in = closing.elapsed();
    let at_close = rss.read();
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let after = rss.read();
    sampler.abort();
    let peak = rss.peak_kib.load(Ordering::Relaxed);
    print!(
        "{}",
        report(&Figures {
            args,
            total,
            live,
            left,
            tally: &tally,
            opened_in,
            closed_in,
            before,
            full,
            peak: (peak > 0).then_some(peak),
            at_close,
            after,
        })
    );
}

/// The symbols of every subscription: one list shared by all, or one each.
async fn symbols(
    args: &PinArgs,
    http: &reqwest::Client,
    total: usize,
) -> anyhow::Result<Vec<Arc<Value>>> {
    let k = args.instruments;
    Ok(match args.symbols {
        Symbols::MadeUp => vec![Arc::new(json!(made_up(0, k)))],
        Symbols::MadeUpDistinct => (0..total)
            .map(|s| Arc::new(json!(made_up(s + 1, k))))
            .collect(),
        Symbols::Real => {
            let mut req = http
                .post(format!("{}/graphql", args.api_url))
                .timeout(REQUEST_TIMEOUT)
                .json(&json!({"query": format!("{{ instruments(first: {k}) {{ nodes {{ symbol }} }} }}")}));
            if let Some(t) = &args.user_token {
                req = req.bearer_auth(t);
            }
            let body: Value = req
                .send()
                .await
                .context("asking the api for instruments")?
                .json()
                .await
                .context("the api's answer to `instruments`")?;
            let nodes = body["data"]["instruments"]["nodes"]
                .as_array()
                .with_context(|| format!("no instruments in {body}"))?;
            let list: Vec<&str> = nodes.iter().filter_map(|n| n["symbol"].as_str()).collect();
            if list.len() < k {
                bail!(
                    "the reference data holds {} instruments, not {k}",
                    list.len()
                );
            }
            vec![Arc::new(json!(list))]
        }
    })
}

/// `k` symbols of [`MADE_UP_LEN`] characters; `set` tells lists apart.
fn made_up(set: usize, k: usize) -> Vec<String> {
    (0..k)
        .map(|i| {
            let head = format!("PIN{set}X{i}X");
            format!(
                "{head}{}",
                "Z".repeat(MADE_UP_LEN.saturating_sub(head.len()))
            )
        })
        .collect()
}

/// The server's live subscriptions, from its gauge (refreshed by `/readyz`).
async fn server_subscriptions(http: &reqwest::Client, api: &str) -> anyhow::Result<usize> {
    // Its answer does not matter: it sets the gauge read below.
    let _ = http
        .get(format!("{api}/readyz"))
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await;
    let text = http
        .get(format!("{api}/metrics"))
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("tickgraph_api_subscriptions{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize)
}

/// One connection's share of the subscriptions.
struct Job {
    args: Arc<PinArgs>,
    symbols: Arc<Vec<Arc<Value>>>,
    /// Index of its first subscription among all.
    first: usize,
    count: usize,
    tally: Arc<Tally>,
    pacer: Arc<tokio::sync::Mutex<tokio::time::Interval>>,
    stop: CancellationToken,
}

impl Job {
    /// The document and variables of subscription `n`.
    fn request(&self, n: usize) -> Value {
        let aliases: String = (0..self.args.aliases)
            .map(|i| {
                let name = format!("f{i}_");
                let pad = self.args.alias_bytes.saturating_sub(name.len());
                format!(" {name}{}: bid", "x".repeat(pad))
            })
            .collect();
        let selection = match self.args.shape {
            Shape::Plain => format!("instrument bid{aliases}"),
            Shape::Executor => format!("instrument ... on Quote {{ bid{aliases} }}"),
        };
        let list = &self.symbols[n % self.symbols.len()];
        let mut variables = json!({"i": list.as_ref()});
        if self.args.undeclared > 0 {
            variables["undeclared"] = json!(vec!["x"; self.args.undeclared]);
        }
        json!({
            "query": format!("subscription($i: [String!]) {{ quotes(instruments: $i) {{ {selection} }} }}"),
            "variables": variables,
        })
    }

    async fn pace(&self) {
        self.pacer.lock().await.tick().await;
    }

    async fn websocket(self) {
        if let Err(e) = self.run_websocket().await {
            self.tally.add(format!("connection failed: {e:#}"));
        }
    }

    async fn run_websocket(&self) -> anyhow::Result<()> {
        let ws_url = self.args.api_url.replacen("http", "ws", 1) + crate::http::WS_PATH;
        let mut req = ws_url.as_str().into_client_request()?;
        let (protocol, start) = match self.args.transport {
            Transport::Legacy => ("graphql-ws", "start"),
            _ => ("graphql-transport-ws", "subscribe"),
        };
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(
                req,
                Some(WebSocketConfig::default().read_buffer_size(4096)),
                true,
            ),
        )
        .await
        .context("connect timed out")??;
        let payload = match &self.args.user_token {
            Some(t) => json!({"Authorization": format!("Bearer {t}")}),
            None => json!({}),
        };
        ws.send(text(
            &json!({"type": "connection_init", "payload": payload}),
        ))
        .await?;
        let mut pending: VecDeque<(usize, u32)> = (0..self.count).map(|i| (i, 0)).collect();
        let mut acked = false;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => {
                    let _ = ws.close(None).await;
                    return Ok(());
                }
                () = self.pace(), if acked && !pending.is_empty() => {
                    if let Some((i, tries)) = pending.pop_front() {
                        let msg = json!({"id": i.to_string(), "type": start,
                            "payload": self.request(self.first + i)});
                        ws.send(text(&msg)).await?;
                        if tries == 0 {
                            self.tally.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        // Taken unless a refusal for the rate comes back.
                        self.tally.settled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                msg = ws.next() => {
                    let v: Value = match msg {
                        Some(Ok(Message::Text(t))) => serde_json::from_str(t.as_str())?,
                        Some(Ok(Message::Close(frame))) => {
                            let why = frame.map_or_else(|| "no reason".to_owned(), |f| format!("{} {}", u16::from(f.code), f.reason));
                            self.tally.add(format!("connection closed by the server: {why}"));
                            self.tally.settled.fetch_add(pending.len(), Ordering::Relaxed);
                            return Ok(());
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e.into()),
                        None => {
                            self.tally.settled.fetch_add(pending.len(), Ordering::Relaxed);
                            return Ok(());
                        }
                    };
                    match v["type"].as_str() {
                        Some("connection_ack") => {
                            acked = true;
                            self.tally.connected.fetch_add(1, Ordering::Relaxed);
                        }
                        Some("ping") => ws.send(text(&json!({"type": "pong"}))).await?,
                        Some("error") => {
                            let code = code_of(&v["payload"][0]);
                            let retry = code == "RATE_LIMITED";
                            match v["id"].as_str().and_then(|id| id.parse::<usize>().ok()) {
                                Some(i) if retry => {
                                    let tries = 1 + pending.iter().find(|p| p.0 == i).map_or(0, |p| p.1);
                                    if tries <= RATE_RETRIES {
                                        self.tally.settled.fetch_sub(1, Ordering::Relaxed);
                                        pending.push_back((i, tries));
                                    } else {
                                        self.tally.refuse(code);
                                    }
                                }
                                _ => self.tally.refuse(code),
                            }
                        }
                        Some("next" | "data") if v["payload"]["errors"].is_array() => {
                            self.tally.refuse(code_of(&v["payload"]["errors"][0]));
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    async fn sse(self, http: reqwest::Client) {
        let mut settled = false;
        if let Err(e) = self.run_sse(&http, &mut settled).await {
            self.tally.add(format!("stream failed: {e:#}"));
        }
        if !settled {
            self.tally.settled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sets `settled` once the stream is open, for as long as it stays so.
    async fn run_sse(&self, http: &reqwest::Client, settled: &mut bool) -> anyhow::Result<()> {
        let mut tries = 0;
        let mut res = loop {
            self.pace().await;
            let mut req = http
                .post(format!("{}/graphql/stream", self.args.api_url))
                .header("accept", "text/event-stream")
                .json(&self.request(self.first));
            if let Some(t) = &self.args.user_token {
                req = req.bearer_auth(t);
            }
            if tries == 0 {
                self.tally.sent.fetch_add(1, Ordering::Relaxed);
            }
            let res = req.send().await?;
            if res.status() == reqwest::StatusCode::OK {
                break res;
            }
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            let code = code_of(&body["errors"][0]);
            tries += 1;
            if code != "RATE_LIMITED" || tries > RATE_RETRIES {
                self.tally.refuse(format!("{status} {code}"));
                return Ok(());
            }
        };
        self.tally.connected.fetch_add(1, Ordering::Relaxed);
        self.tally.settled.fetch_add(1, Ordering::Relaxed);
        *settled = true;
        let mut seen = String::new();
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                chunk = res.chunk() => match chunk? {
                    Some(bytes) => {
                        seen.push_str(&String::from_utf8_lossy(&bytes));
                        if let Some(at) = seen.find("event: next\ndata: ") {
                            let line = seen[at + 18..].lines().next().unwrap_or("");
                            let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
                            if v["errors"].is_array() {
                                self.tally.refuse(code_of(&v["errors"][0]));
                            }
                            return Ok(());
                        }
                        // Only the opening comment and keep-alives are kept.
                        if seen.len() > 64 << 10 {
                            seen.clear();
                        }
                    }
                    None => return Ok(()),
                },
            }
        }
    }
}

/// A GraphQL error's `extensions.code`, else its message up to the first `:`.
fn code_of(error: &Value) -> String {
    match error["extensions"]["code"].as_str() {
        Some(code) => code.to_owned(),
        None => super::subscribers::short_label(error["message"].as_str().unwrap_or("no message")),
    }
}

fn text(v: &Value) -> Message {
    Message::Text(v.to_string().into())
}

struct Figures<'a> {
    args: &'a PinArgs,
    total: usize,
    /// Live on the server with everything open.
    live: usize,
    /// Still live on the server after the close.
    left: usize,
    tally: &'a Tally,
    opened_in: Duration,
    closed_in: Duration,
    before: Option<u64>,
    full: Option<u64>,
    peak: Option<u64>,
    at_close: Option<u64>,
    after: Option<u64>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn report(f: &Figures<'_>) -> String {
    use std::fmt::Write;
    let a = f.args;
    let mut out = String::new();
    let per = match a.transport {
        Transport::Sse => String::new(),
        _ => format!(" x {} subscriptions", a.subscriptions),
    };
    let names = match a.symbols {
        Symbols::MadeUp => "made-up symbols of 60 characters, the same in each",
        Symbols::MadeUpDistinct => "made-up symbols of 60 characters, distinct in each",
        Symbols::Real => "instruments of the reference data",
    };
    let shape = match (a.shape, a.aliases) {
        (Shape::Plain, 0) => "plain documents".to_owned(),
        (Shape::Executor, 0) => "executed documents".to_owned(),
        (shape, n) => format!(
            "{} documents of {n} more fields aliased in {} bytes",
            if shape == Shape::Plain {
                "plain"
            } else {
                "executed"
            },
            a.alias_bytes
        ),
    };
    let _ = writeln!(
        out,
        "pin-memory: one user, {} {:?} connections{per}, {} {names}, {shape}, {}/s",
        a.connections, a.transport, a.instruments, a.rate
    );
    if a.undeclared > 0 {
        let _ = writeln!(
            out,
            "  each with {} strings in a variable its document does not declare",
            a.undeclared
        );
    }
    let _ = writeln!(
        out,
        "  subscriptions: {} of {} sent, {} live on the server after {:.1} s, {} refused; {} connections accepted",
        f.tally.sent.load(Ordering::Relaxed),
        f.total,
        f.live,
        f.opened_in.as_secs_f64(),
        f.tally.refused.load(Ordering::Relaxed),
        f.tally.connected.load(Ordering::Relaxed),
    );
    for (what, n) in f
        .tally
        .outcomes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        let _ = writeln!(out, "    {n} x {what}");
    }
    let _ = writeln!(
        out,
        "  after the close: {} live on the server after {:.1} s",
        f.left,
        f.closed_in.as_secs_f64()
    );
    let (Some(before), Some(full), Some(peak), Some(at_close), Some(after)) =
        (f.before, f.full, f.peak, f.at_close, f.after)
    else {
        let _ = writeln!(out, "  api RSS: not read (give --server-pid)");
        return out;
    };
    let grew = |kib: u64| kib as f64 / 1024.0 - before as f64 / 1024.0;
    let _ = writeln!(
        out,
        "  api RSS: before {:.1} MiB; all open {:.1} MiB ({:+.1}); highest {:.1} MiB ({:+.1}); \
         closed {:.1} MiB ({:+.1}); {} s later {:.1} MiB ({:+.1})",
        mib(before),
        mib(full),
        grew(full),
        mib(peak),
        grew(peak),
        mib(at_close),
        grew(at_close),
        a.settle_secs,
        mib(after),
        grew(after),
    );
    if f.live > 0 {
        let per_sub = |kib: u64| kib.saturating_sub(before) as f64 / f.live as f64;
        let _ = writeln!(
            out,
            "  per live subscription: {:.1} KiB all open, {:.1} KiB still held {} s after the close",
            per_sub(full),
            per_sub(after),
            a.settle_secs,
        );
    }
    out
}
