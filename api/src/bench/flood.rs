//! `tickgraph flood`: a load test of the listeners' connection hygiene. It
//! holds as many half-open connections as it can against each target (new
//! ones as fast as `--open-rate` while the server closes old ones), and
//! meanwhile probes the system as a producer and as a user would, each probe
//! on a connection of its own. It prints what it held, how the server closed
//! the flood, and how each probe was answered.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What each flood connection sends before it goes quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloodMode {
    /// A request line and one header, never the blank line that ends them.
    PartialHeaders,
    /// Whole headers announcing a 1 MB body, then one byte a second.
    SlowBody,
    /// Nothing at all.
    Silent,
}

/// Flags of `tickgraph flood`.
#[derive(clap::Args, Clone, Debug)]
pub struct FloodArgs {
    /// Listener to flood; give it once per listener.
    #[arg(
        long = "target",
        default_values_t = ["127.0.0.1:8081".to_string(), "127.0.0.1:8080".to_string()]
    )]
    pub targets: Vec<String>,
    /// Connections to hold open at once against each target.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// New connections per second per target, at most.
    #[arg(long, default_value_t = 5_000)]
    pub open_rate: u32,
    /// Seconds to flood.
    #[arg(long, default_value_t = 30)]
    pub duration_secs: u64,
    #[arg(long, value_enum, default_value_t = FloodMode::PartialHeaders)]
    pub mode: FloodMode,
    /// Ingest, for the producer's probe.
    #[arg(long, env = "TG_INGEST_URL", default_value = "http://127.0.0.1:8081")]
    pub ingest_url: String,
    /// The api, for the user's probe.
    #[arg(long, env = "TG_API_HTTP_URL", default_value = "http://127.0.0.1:8080")]
    pub api_url: String,
    /// The producer's bearer token (none in dev mode).
    #[arg(long, env = "TG_FEED_TOKEN", hide_env_values = true)]
    pub producer_token: Option<String>,
    /// The source the producer's events carry (one its token owns).
    #[arg(long, default_value = "flood-probe")]
    pub source: String,
    /// Instrument and venue of the producer's quotes.
    #[arg(long, default_value = "AAPL")]
    pub instrument: String,
    #[arg(long, default_value = "XNAS")]
    pub venue: String,
    /// The user's JWT (none in dev mode).
    #[arg(long, env = "TG_USER_TOKEN", hide_env_values = true)]
    pub user_token: Option<String>,
    /// Milliseconds between two rounds of probes.
    #[arg(long, default_value_t = 200)]
    pub probe_interval_ms: u64,
    /// Flood only: another process probes.
    #[arg(long)]
    pub no_probes: bool,
    /// Seconds a probe may wait for its answer.
    #[arg(long, default_value_t = 8)]
    pub probe_timeout_secs: u64,
}

/// What the flood against one target saw.
#[derive(Default)]
struct TargetTally {
    opened: AtomicU64,
    connect_failed: AtomicU64,
    held: AtomicUsize,
    peak_held: AtomicUsize,
    /// Closed by the server after a 503.
    refused: AtomicU64,
    /// Closed by the server after some other answer (a 408, say).
    answered: AtomicU64,
    /// Closed by the server without a byte.
    dropped: AtomicU64,
    /// How long closed connections had lived, in milliseconds.
    lifetimes_ms: Mutex<Vec<f64>>,
}

/// One kind of probe's answers.
#[derive(Default)]
struct ProbeTally {
    statuses: Mutex<std::collections::BTreeMap<String, u64>>,
    latencies_ms: Mutex<Vec<f64>>,
}

impl ProbeTally {
    fn record(&self, outcome: String, took: Duration) {
        *self
            .statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(outcome)
            .or_default() += 1;
        self.latencies_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(took.as_secs_f64() * 1e3);
    }
}

pub async fn run(args: FloodArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.connections == 0 || args.open_rate == 0 || args.targets.is_empty() {
        bail!("--connections, --open-rate and --target must be given and above 0");
    }
    match tickgraph_ingest::listener::raise_fd_limit() {
        Ok(limit) if (limit as usize) < args.connections * args.targets.len() + 256 => {
            tracing::warn!(
                limit,
                "the open-file limit is below what the flood holds: it will hold less"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let stop = shutdown.child_token();
    let tasks = TaskTracker::new();
    let tallies: Vec<Arc<TargetTally>> = args
        .targets
        .iter()
        .map(|_| Arc::new(TargetTally::default()))
        .collect();
    for (target, tally) in args.targets.iter().zip(&tallies) {
        tasks.spawn(flood(
            target.clone(),
            args.clone(),
            Arc::clone(tally),
            tasks.clone(),
            stop.clone(),
        ));
    }
    let probes = Probes::new(&args)?;
    let started = Instant::now();
    let until = started + Duration::from_secs(args.duration_secs);
    let mut every = tokio::time::interval(Duration::from_millis(args.probe_interval_ms.max(1)));
    while Instant::now() < until && !shutdown.is_cancelled() {
        every.tick().await;
        // Once the flood has had a second to fill the slots.
        if !args.no_probes && started.elapsed() >= Duration::from_secs(1) {
            tasks.spawn(probes.clone().round());
        }
    }
    let held_at_end: Vec<usize> = tallies
        .iter()
        .map(|t| t.held.load(Ordering::Relaxed))
        .collect();
    let server = probes.server_metrics().await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    print!(
        "{}",
        report(&args, &tallies, &held_at_end, &probes, &server)
    );
    Ok(())
}

async fn flood(
    target: String,
    args: FloodArgs,
    tally: Arc<TargetTally>,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.open_rate)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = pace.tick() => {}
        }
        // Held ones let go as the flood stops: no new ones then.
        if tally.held.load(Ordering::Relaxed) >= args.connections || stop.is_cancelled() {
            continue;
        }
        let s =
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&target)).await {
                Ok(Ok(s)) => s,
                _ => {
                    tally.connect_failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
        tally.opened.fetch_add(1, Ordering::Relaxed);
        let held = tally.held.fetch_add(1, Ordering::Relaxed) + 1;
        tally.peak_held.fetch_max(held, Ordering::Relaxed);
        tasks.spawn(hold(s, args.mode, Arc::clone(&tally), stop.clone()));
    }
}

/// Holds one connection until the server closes it or the flood ends.
async fn hold(mut s: TcpStream, mode: FloodMode, tally: Arc<TargetTally>, stop: CancellationToken) {
    let opened = Instant::now();
    let opening: &[u8] = match mode {
        FloodMode::PartialHeaders => b"POST /v1/events HTTP/1.1\r\nHost: flood\r\n",
        FloodMode::SlowBody => {
            b"POST /v1/events HTTP/1.1\r\nHost: flood\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n["
        }
        FloodMode::Silent => b"",
    };
    let (mut rd, mut wr) = s.split();
    let mut first = [0u8; 16];
    let held = async {
        if wr.write_all(opening).await.is_err() {
            return 0;
        }
        let trickle = async {
            if mode != FloodMode::SlowBody {
                return std::future::pending::<()>().await;
            }
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if wr.write_all(b" ").await.is_err() {
                    return std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            n = rd.read(&mut first) => n.unwrap_or(0),
            () = trickle => 0,
        }
    };
    let got = tokio::select! {
        () = stop.cancelled() => {
            tally.held.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        n = held => n,
    };
    tally.held.fetch_sub(1, Ordering::Relaxed);
    let counter = if got == 0 {
        &tally.dropped
    } else if first[..got].starts_with(b"HTTP/1.1 503") {
        &tally.refused
    } else {
        &tally.answered
    };
    counter.fetch_add(1, Ordering::Relaxed);
    tally
        .lifetimes_ms
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(opened.elapsed().as_secs_f64() * 1e3);
}

#[derive(Clone)]
struct Probes {
    args: Arc<FloodArgs>,
    /// No connection is reused: every probe opens its own, as a producer or a
    /// user arriving during the flood would.
    http: reqwest::Client,
    seq: Arc<AtomicU64>,
    producer: Arc<ProbeTally>,
    user: Arc<ProbeTally>,
    health: Arc<ProbeTally>,
}

impl Probes {
    fn new(args: &FloodArgs) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(args.probe_timeout_secs))
            .build()
            .context("building the probes' HTTP client")?;
        Ok(Self {
            args: Arc::new(args.clone()),
            http,
            seq: Arc::new(AtomicU64::new(1)),
            producer: Arc::default(),
            user: Arc::default(),
            health: Arc::default(),
        })
    }

    async fn round(self) {
        tokio::join!(self.produce(), self.query(), self.healthz());
    }

    async fn produce(&self) {
        let a = &self.args;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let ts = tickgraph_ingest::event::now_nanos();
        let batch = serde_json::json!([{"kind": "quote", "source": a.source, "seq": seq,
            "instrument": a.instrument, "venue": a.venue, "ts": ts,
            "bid": "100.00", "ask": "100.02", "bid_size": "100", "ask_size": "100"}]);
        let req = self
            .http
            .post(format!("{}/v1/events", a.ingest_url))
            .json(&batch);
        let (outcome, took) = probe(req, a.producer_token.as_deref(), |body| {
            (body["accepted"] == 1).then_some("200 accepted")
        })
        .await;
        self.producer.record(outcome, took);
    }

    async fn query(&self) {
        let a = &self.args;
        let req = self
            .http
            .post(format!("{}/graphql", a.api_url))
            .json(&serde_json::json!({"query": "{ venues { mic } }"}));
        let (outcome, took) = probe(req, a.user_token.as_deref(), |body| {
            body["data"]["venues"].is_array().then_some("200 data")
        })
        .await;
        self.user.record(outcome, took);
    }

    async fn healthz(&self) {
        let started = Instant::now();
        let outcome = match self
            .http
            .get(format!("{}/healthz", self.args.ingest_url))
            .send()
            .await
        {
            Ok(res) => res.status().as_u16().to_string(),
            Err(e) => failure(&e),
        };
        self.health.record(outcome, started.elapsed());
    }

    /// Each listener's connection figures, from its own `/metrics`.
    async fn server_metrics(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (component, base) in [
            ("ingest", &self.args.ingest_url),
            ("api", &self.args.api_url),
        ] {
            let prefix = format!("tickgraph_{component}_connections_");
            match self.http.get(format!("{base}/metrics")).send().await {
                Ok(res) => {
                    let text = res.text().await.unwrap_or_default();
                    lines.extend(
                        text.lines()
                            .filter(|l| l.starts_with(&prefix))
                            .map(str::to_owned),
                    );
                }
                Err(e) => lines.push(format!("{base}/metrics: {}", failure(&e))),
            }
        }
        lines
    }
}

/// Sends `req` (with `token` as its bearer) and says how it was answered: the
/// label `ok` gives a 200 whose JSON it accepts, else the status and a piece
/// of the body, or why there was no answer.
async fn probe(
    mut req: reqwest::RequestBuilder,
    token: Option<&str>,
    ok: impl Fn(&serde_json::Value) -> Option<&'static str>,
) -> (String, Duration) {
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let started = Instant::now();
    let outcome = match req.send().await {
        Ok(res) => {
            let status = res.status().as_u16();
            match res.json::<serde_json::Value>().await {
                Ok(body) => match ok(&body).filter(|_| status == 200) {
                    Some(label) => label.to_owned(),
                    None => format!("{status} {}", brief(&body)),
                },
                Err(_) => format!("{status} unreadable answer"),
            }
        }
        Err(e) => failure(&e),
    };
    (outcome, started.elapsed())
}

fn brief(body: &serde_json::Value) -> String {
    let mut s = body.to_string();
    s.truncate(80);
    s
}

fn failure(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connect failed".into()
    } else {
        "connection failed".into()
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(v: &Mutex<Vec<f64>>) -> Vec<f64> {
    let mut v = v.lock().unwrap_or_else(PoisonError::into_inner).clone();
    v.sort_by(f64::total_cmp);
    v
}

fn report(
    args: &FloodArgs,
    tallies: &[Arc<TargetTally>],
    held_at_end: &[usize],
    probes: &Probes,
    server: &[String],
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flood: {:?} for {} s, up to {} connections per target, opened at most {}/s",
        args.mode, args.duration_secs, args.connections, args.open_rate
    );
    for ((target, t), end) in args.targets.iter().zip(tallies).zip(held_at_end) {
        let life = sorted(&t.lifetimes_ms);
        let _ = writeln!(
            out,
            "  {target}: opened {}, held at most {} at once ({end} at the end); closed by the server: \
             {} without an answer, {} refused with 503, {} after another answer; \
             connects failed {}; a closed one had lived p50 {:.0} ms, p99 {:.0} ms",
            t.opened.load(Ordering::Relaxed),
            t.peak_held.load(Ordering::Relaxed),
            t.dropped.load(Ordering::Relaxed),
            t.refused.load(Ordering::Relaxed),
            t.answered.load(Ordering::Relaxed),
            t.connect_failed.load(Ordering::Relaxed),
            percentile(&life, 0.5),
            percentile(&life, 0.99),
        );
    }
    if args.no_probes {
        return out;
    }
    let _ = writeln!(
        out,
        "probes, each on a new connection, every {} ms during the flood:",
        args.probe_interval_ms
    );
    for (name, tally) in [
        ("producer POST /v1/events", &probes.producer),
        ("user POST /graphql", &probes.user),
        ("ingest GET /healthz", &probes.health),
    ] {
        let lat = sorted(&tally.latencies_ms);
        let statuses = tally
            .statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "  {name}: {} sent: {statuses}; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            lat.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN),
        );
    }
    let _ = writeln!(out, "server, at the end of the flood:");
    for l in server {
        let _ = writeln!(out, "  {l}");
    }
    out
}
