//! `tickgraph bench`: measures a running system through its front doors. It sends
//! an open-loop mix of quotes and trades to ingest over HTTP, receives them as
//! GraphQL subscriptions over WebSockets, counts every stage in between, and
//! samples the CPU and memory of every process involved.
//!
//! # Layout
//! - `load`: the event generator, the open-loop senders (one per connection)
//!   and the send log every delivered event is timed against.
//! - `subscribers`: `graphql-transport-ws` subscribers, each one connection
//!   running a few filtered operations; latency in one histogram pair per group.
//! - `fanout`: the `--fanout N` mix of filters, and its per-kind summary.
//! - `stages`: what got through each stage: a tail of the enriched streams and
//!   the history tables.
//! - `procstat`: CPU seconds and RSS from /proc, every second.
//! - `ceiling`: Redis's own pipelined XADD ceiling, measured before the load.
//! - [`flood`]: `tickgraph flood`, half-open connections against the listeners
//!   while a producer and a user are probed.
//! - [`pin`]: `tickgraph pin-memory`, the memory one user's subscriptions hold
//!   in the api, before, open and after they close.
//! - `report`: the figures, the judgement of a step, the plain-text report.
//!
//! [`run`] drives them: ceiling, subscribers (with `--fanout`, RSS before and
//! after they sit idle), then each step (send, wait for the answers, drain,
//! collect, judge), then the report on stdout.

mod ceiling;
mod fanout;
pub mod flood;
mod load;
pub mod pin;
mod procstat;
mod report;
mod stages;
mod subscribers;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tickgraph_enrich::refdata::RefData;
use tickgraph_ingest::StreamLayout;

use load::{BenchInstrument, Connection, Generator, Schedule, StepLoad};
use procstat::ProcStat;
use report::{FanoutFigures, FanoutSetup, Percentiles, Report, StepFigures, SubscriberFigures};
use stages::EnrichedTail;
use subscribers::{
    latency_histogram, Accepted, ConnectOptions, Feed, Filter, LatencySink, Op, Origins, Outcomes,
    Subscriber, SubscriberSpec,
};

/// Most events ingest takes in one request by default (`--max-batch-events`).
const MAX_BATCH_EVENTS: f64 = 10_000.0;

/// Where the system under test keeps its streams and history (the global flags).
#[derive(Debug, Clone)]
pub struct Target {
    pub redis_url: String,
    pub database_url: String,
    pub layout: StreamLayout,
}

/// `--ramp START:STEP:MAX`, in events per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    pub start: f64,
    pub step: f64,
    pub max: f64,
}

impl Ramp {
    /// START, START+STEP, ... up to MAX.
    pub fn rates(&self) -> Vec<f64> {
        let n = ((self.max - self.start) / self.step + 1e-9).floor() as usize;
        (0..=n).map(|i| self.start + i as f64 * self.step).collect()
    }
}

impl FromStr for Ramp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("expected START:STEP:MAX events/s, e.g. 50000:25000:250000, got {s:?}");
        let parts: Vec<f64> = s
            .split(':')
            .map(|p| p.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let [start, step, max] = parts[..] else {
            return Err(bad());
        };
        if !(start > 0.0 && step > 0.0 && max >= start && max.is_finite()) {
            return Err(bad());
        }
        if (max - start) / step > 1000.0 {
            return Err(format!("{s:?} makes more than 1000 steps"));
        }
        Ok(Self { start, step, max })
    }
}

impl fmt::Display for Ramp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.step, self.max)
    }
}

/// Flags of `tickgraph bench`.
#[derive(clap::Args, Clone, Debug)]
#[command(after_help = "\
Without --ramp: one run at --rate for --warmup + --duration seconds. Events sent \
during the warm-up count in every loss figure, but their latency is not recorded. \
With --ramp: steps of --step-secs at START, START+STEP, ... MAX events/s (the \
warm-up only before the first step), each drained before the next; a step is \
sustained when nothing is lost at any stage, p99 < --p99-limit-ms and the \
generator kept its schedule. The ramp stops at the first step not sustained.

Latency is the subscriber's arrival time minus the wall-clock time the event's \
batch was sent (its `ts`), both on this machine's clock.

Expected per subscriber: the accepted events its filter selects. The drain after \
sending waits until every count reaches what was accepted, or nothing moved for \
--quiet-secs, at most --drain-secs.

With --fanout N (loopback only): N connections, opened --fanout-concurrency at a \
time; the mix, by share of N: market 0.1% quotes(maxRate: 1) of every \
instrument; watch 30% trades + quotes of 1-5 instruments; grid 50% \
quotes(maxRate: 4) + trades of 1-5 instruments; venue 10% trades of one of the 4 \
venues with the fewest instruments; class 9.9% trades of one of the 4 asset \
classes with the fewest instruments. Unconflated operations are checked for \
every event, conflated ones for receiving at all; their latency is reported \
apart (the age of the value on arrival). The api's RSS is read before \
connecting, after the connections (init and ack only) sat --fanout-idle-secs \
idle, and after their subscriptions did too: the growth per connection and per \
subscription is the memory of an idle one.")]
pub struct BenchArgs {
    /// Base URL of ingest's HTTP edge (`POST /v1/events`).
    #[arg(long, env = "TG_INGEST_URL", default_value = "http://127.0.0.1:8081")]
    pub ingest_url: String,
    /// GraphQL subscriptions WebSocket of the api.
    #[arg(
        long,
        env = "TG_API_URL",
        default_value = "ws://127.0.0.1:8080/graphql/ws"
    )]
    pub api_url: String,
    /// Events per second of the single run (without --ramp).
    #[arg(long, env = "TG_BENCH_RATE", default_value_t = 100_000.0)]
    pub rate: f64,
    /// Seconds measured in the single run, after the warm-up.
    #[arg(long, env = "TG_BENCH_DURATION", default_value_t = 60)]
    pub duration: u64,
    /// Seconds of sending before latency is recorded (events still counted).
    #[arg(long, env = "TG_BENCH_WARMUP", default_value_t = 5)]
    pub warmup: u64,
    /// Rates to ramp through, START:STEP:MAX events/s; stops at the first step
    /// not sustained and reports the highest sustained one.
    #[arg(long, env = "TG_BENCH_RAMP")]
    pub ramp: Option<Ramp>,
    /// Seconds per ramp step.
    #[arg(long, env = "TG_BENCH_STEP_SECS", default_value_t = 30)]
    pub step_secs: u64,
    /// Producer connections, each its own HTTP/1.1 keep-alive client and source.
    #[arg(long, env = "TG_BENCH_CONNECTIONS", default_value_t = 4)]
    pub connections: usize,
    /// Each connection sends one batch per this many milliseconds.
    #[arg(long, env = "TG_BENCH_BATCH_INTERVAL_MS", default_value_t = 5)]
    pub batch_interval_ms: u64,
    /// Share of events that are trades; the rest are quotes.
    #[arg(long, env = "TG_BENCH_TRADE_RATIO", default_value_t = 0.2)]
    pub trade_ratio: f64,
    /// Subscribers to every trade and quote.
    #[arg(long, env = "TG_BENCH_ALL_SUBSCRIBERS", default_value_t = 2)]
    pub all_subscribers: usize,
    /// Subscribers to the trades and quotes of a few instruments.
    #[arg(long, env = "TG_BENCH_FEW_SUBSCRIBERS", default_value_t = 8)]
    pub few_subscribers: usize,
    /// Instruments per few-instrument subscriber, about half of them busy ones.
    #[arg(long, env = "TG_BENCH_FEW_INSTRUMENTS", default_value_t = 5)]
    pub few_instruments: usize,
    /// Fan-out: N subscribers, each on its own WebSocket, with the mix of
    /// filters below, instead of --all-subscribers and --few-subscribers.
    #[arg(long, env = "TG_BENCH_FANOUT")]
    pub fanout: Option<usize>,
    /// Fan-out connections being opened at once.
    #[arg(long, env = "TG_BENCH_FANOUT_CONCURRENCY", default_value_t = 64)]
    pub fanout_concurrency: usize,
    /// Seconds the fan-out connections, then their subscriptions, sit idle
    /// before the api's memory is read (replaces --settle-ms).
    #[arg(long, env = "TG_BENCH_FANOUT_IDLE_SECS", default_value_t = 3)]
    pub fanout_idle_secs: u64,
    /// A step with a p99 latency at or above this is not sustained.
    #[arg(long, env = "TG_BENCH_P99_LIMIT_MS", default_value_t = 100.0)]
    pub p99_limit_ms: f64,
    /// Longest wait after sending for the counts to reach what was accepted.
    #[arg(long, env = "TG_BENCH_DRAIN_SECS", default_value_t = 60)]
    pub drain_secs: u64,
    /// The drain ends early once no count has moved for this long.
    #[arg(long, env = "TG_BENCH_QUIET_SECS", default_value_t = 3.0)]
    pub quiet_secs: f64,
    /// Pause between subscribing and sending, for subscriptions to go live.
    #[arg(long, env = "TG_BENCH_SETTLE_MS", default_value_t = 1000)]
    pub settle_ms: u64,
    /// Do not measure Redis's XADD ceiling.
    #[arg(long, env = "TG_BENCH_SKIP_CEILING")]
    pub skip_ceiling: bool,
    /// XADDs redis-benchmark sends for the ceiling.
    #[arg(long, env = "TG_BENCH_CEILING_REQUESTS", default_value_t = 1_000_000)]
    pub ceiling_requests: u64,
    /// Clock ticks per second of /proc CPU times (`getconf CLK_TCK`).
    #[arg(long, env = "TG_CLK_TCK", default_value_t = 100)]
    pub clk_tck: u64,
    /// Count only this tickgraph process (default: every one but the bench).
    #[arg(long, env = "TG_BENCH_SYSTEM_PID")]
    pub system_pid: Option<u32>,
    /// Run id in the sources `bench-<id>-c<k>` (default: random).
    #[arg(long, env = "TG_BENCH_RUN_ID")]
    pub run_id: Option<String>,
    /// Write the report to this file instead of stdout.
    #[arg(long, env = "TG_BENCH_REPORT")]
    pub report: Option<std::path::PathBuf>,
    #[arg(long, env = "TG_BENCH_SEED", default_value_t = 1)]
    pub seed: u64,
}

/// One step of the run.
#[derive(Debug, Clone, Copy)]
struct StepPlan {
    index: u32,
    rate: f64,
    warmup: Duration,
    measure: Duration,
}

impl BenchArgs {
    fn interval(&self) -> Duration {
        Duration::from_millis(self.batch_interval_ms.max(1))
    }

    fn plan(&self) -> anyhow::Result<Vec<StepPlan>> {
        let warmup = Duration::from_secs(self.warmup);
        let steps: Vec<StepPlan> = match &self.ramp {
            None => vec![StepPlan {
                index: 0,
                rate: self.rate,
                warmup,
                measure: Duration::from_secs(self.duration),
            }],
            Some(r) => r
                .rates()
                .into_iter()
                .enumerate()
                .map(|(i, rate)| StepPlan {
                    index: i as u32,
                    rate,
                    warmup: if i == 0 { warmup } else { Duration::ZERO },
                    measure: Duration::from_secs(self.step_secs),
                })
                .collect(),
        };
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        for s in &steps {
            if !(s.rate > 0.0 && s.rate.is_finite()) {
                bail!("a rate must be positive, got {}", s.rate);
            }
            let per_batch = s.rate * self.interval().as_secs_f64() / self.connections as f64;
            if per_batch > MAX_BATCH_EVENTS {
                bail!(
                    "{} events/s makes batches of {per_batch:.0} events, over ingest's {MAX_BATCH_EVENTS}: \
                     raise --connections or lower --batch-interval-ms",
                    s.rate
                );
            }
        }
        if !(0.0..=1.0).contains(&self.trade_ratio) {
            bail!("--trade-ratio must be between 0 and 1");
        }
        if self.fanout == Some(0) {
            bail!("--fanout must be at least 1");
        }
        if self.fanout.is_some() && !is_loopback_url(&self.api_url) {
            bail!(
                "--fanout opens thousands of sockets and is for loopback only; --api-url {} is not on 127.0.0.1",
                self.api_url
            );
        }
        Ok(steps)
    }
}

/// The demo instruments from the reference data, sorted by symbol so the
/// skewed activity lands on the same names every run, and the accounts.
fn universe(data: &RefData) -> (Arc<[BenchInstrument]>, Arc<[String]>) {
    let mut list: Vec<BenchInstrument> = data
        .instruments
        .values()
        .filter(|i| data.venues.contains_key(&i.venue))
        .filter_map(|i| {
            BenchInstrument::new(
                i.symbol.clone(),
                i.venue.clone(),
                i.asset_class,
                tickgraph_enrich::demo::reference_price(i),
                i.tick_size,
            )
        })
        .collect();
    list.sort_by(|a, b| a.symbol.cmp(&b.symbol));
    let mut accounts: Vec<String> = data.accounts.keys().cloned().collect();
    accounts.sort();
    (list.into(), accounts.into())
}

/// The unfiltered subscribers, then the few-instrument ones: about half their
/// instruments among the busiest (the head 1% of the list), the rest from the
/// quieter remainder.
fn subscriber_specs(args: &BenchArgs, instruments: &[BenchInstrument]) -> Vec<SubscriberSpec> {
    use rand::seq::index::sample;
    let every = |feed, filter: Filter, selects: Option<Arc<[u32]>>| Op {
        feed,
        filter,
        selects,
        max_rate: None,
    };
    let mut specs: Vec<SubscriberSpec> = (0..args.all_subscribers)
        .map(|i| SubscriberSpec {
            name: format!("all-{}", i + 1),
            group: 0,
            ops: vec![
                every(Feed::Trades, Filter::All, None),
                every(Feed::Quotes, Filter::All, None),
            ],
        })
        .collect();
    let n = instruments.len();
    let k = args.few_instruments.clamp(1, n.max(1));
    let busy = (n / 100).max(k).min(n);
    let mut rng = SmallRng::seed_from_u64(args.seed ^ 0x5eed_5eed);
    for j in 0..args.few_subscribers {
        let from_busy = (k / 2).min(busy);
        let mut picked: Vec<u32> = sample(&mut rng, busy, from_busy)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let quiet = n - busy;
        picked.extend(
            sample(&mut rng, quiet, (k - from_busy).min(quiet))
                .into_iter()
                .map(|i| (busy + i) as u32),
        );
        picked.sort_unstable();
        let symbols: Vec<String> = picked
            .iter()
            .map(|&i| instruments[i as usize].symbol.clone())
            .collect();
        let picked: Arc<[u32]> = Arc::from(picked);
        specs.push(SubscriberSpec {
            name: format!("few-{}", j + 1),
            group: 1,
            ops: vec![
                every(
                    Feed::Trades,
                    Filter::Instruments(symbols.clone()),
                    Some(picked.clone()),
                ),
                every(Feed::Quotes, Filter::Instruments(symbols), Some(picked)),
            ],
        });
    }
    specs
}

/// Everything a step needs.
struct Ctx<'a> {
    args: &'a BenchArgs,
    pool: &'a PgPool,
    conns: &'a [Arc<Connection>],
    subs: &'a [Arc<Subscriber>],
    /// One per group of subscribers, and the groups' names.
    sinks: &'a [Arc<LatencySink>],
    groups: &'a [&'static str],
    outcomes: &'a Outcomes,
    tail: &'a EnrichedTail,
    procs: &'a ProcStat,
    instruments: usize,
    shutdown: &'a CancellationToken,
}

async fn run_step(
    ctx: &Ctx<'_>,
    plan: StepPlan,
    gens: &mut Vec<Generator>,
) -> anyhow::Result<StepFigures> {
    let load = Arc::new(StepLoad::new(ctx.instruments));
    let first_seqs: Vec<u64> = gens.iter().map(Generator::next_seq).collect();
    let (enriched0, entries0) = (ctx.tail.events(), ctx.tail.entries());
    let mark0 = ctx.procs.mark().await;
    let sched = Schedule {
        rate: plan.rate / ctx.conns.len() as f64,
        interval: ctx.args.interval(),
        warmup: plan.warmup,
        measure: plan.measure,
        step: plan.index,
    };
    tracing::info!(
        step = plan.index + 1,
        rate = plan.rate,
        secs = (plan.warmup + plan.measure).as_secs(),
        "bench step sending"
    );
    let requests = TaskTracker::new();
    let started = Instant::now();
    let senders: Vec<_> = ctx
        .conns
        .iter()
        .zip(gens.drain(..))
        .map(|(c, g)| {
            tokio::spawn(load::send_step(
                c.clone(),
                g,
                sched,
                load.clone(),
                requests.clone(),
                ctx.shutdown.clone(),
            ))
        })
        .collect();
    for s in senders {
        gens.push(s.await.context("a sender task failed")?);
    }
    let send_secs = started.elapsed().as_secs_f64();
    requests.close();
    requests.wait().await;
    let answered = Instant::now();

    let ranges: Vec<(String, u64, u64)> = ctx
        .conns
        .iter()
        .zip(&first_seqs)
        .zip(gens.iter())
        .map(|((c, &first), g)| (c.source.clone(), first, g.next_seq().saturating_sub(1)))
        .collect();
    let count = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let accepted = count(&load.accepted);
    let by_instrument = Accepted {
        events: load.accepted_by_instrument.iter().map(count).collect(),
        trades: load
            .accepted_trades_by_instrument
            .iter()
            .map(count)
            .collect(),
    };
    let expected: Vec<u64> = ctx
        .subs
        .iter()
        .map(|s| s.spec.expected(&by_instrument))
        .collect();
    tracing::info!(
        step = plan.index + 1,
        sent = count(&load.sent),
        accepted,
        "bench step sent; draining"
    );

    let quiet = Duration::from_secs_f64(ctx.args.quiet_secs.max(0.1));
    let cap = Duration::from_secs(ctx.args.drain_secs);
    let mut loaded = 0u64;
    let mut polled: Option<Instant> = None;
    let mut seen = (u64::MAX, u64::MAX, u64::MAX);
    let mut moved = Instant::now();
    let drained = loop {
        let enriched = ctx.tail.events() - enriched0;
        if loaded < accepted && polled.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            loaded = stages::loaded_in(ctx.pool, &ranges).await?;
            polled = Some(Instant::now());
        }
        let counts: Vec<subscribers::StepCounts> =
            ctx.subs.iter().map(|s| s.counts_in(plan.index)).collect();
        if enriched >= accepted
            && loaded >= accepted
            && counts.iter().zip(&expected).all(|(c, e)| c.counted >= *e)
        {
            break true;
        }
        let received: u64 = counts.iter().map(|c| c.counted + c.conflated).sum();
        let now = (enriched, loaded, received);
        if now != seen {
            seen = now;
            moved = Instant::now();
        }
        if moved.elapsed() >= quiet || answered.elapsed() >= cap || ctx.shutdown.is_cancelled() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let drain_secs = answered.elapsed().as_secs_f64();
    let loaded = stages::loaded_in(ctx.pool, &ranges).await?;
    let mark1 = ctx.procs.mark().await;
    let (resources_secs, resources) = ctx.procs.window(mark0, mark1);

    // Every subscriber before the sinks: stragglers then count as late.
    let tallies: Vec<subscribers::StepCounts> =
        ctx.subs.iter().map(|s| s.collect(plan.index)).collect();
    let mut latency = latency_histogram()?;
    let mut conflated_age = latency_histogram()?;
    let mut by_group = Vec::with_capacity(ctx.sinks.len());
    for sink in ctx.sinks {
        let l = sink.collect(plan.index);
        latency
            .add(&l.every)
            .context("merging latency histograms")?;
        conflated_age
            .add(&l.conflated)
            .context("merging latency histograms")?;
        by_group.push(l);
    }
    let fanout = ctx.args.fanout.map(|_| {
        let steps =
            ctx.subs
                .iter()
                .zip(&expected)
                .zip(&tallies)
                .map(|((s, &expected), &counts)| fanout::SubscriberStep {
                    group: s.spec.group,
                    expected,
                    conflatable: s.spec.conflatable(&by_instrument),
                    has_conflated: s.spec.has_conflated(),
                    counts,
                    closed: s.closed.load(Ordering::Relaxed),
                    late: s.late.load(Ordering::Relaxed),
                    foreign: s.foreign.load(Ordering::Relaxed),
                });
        let mut kinds = fanout::summarize(ctx.groups, steps);
        for k in &mut kinds {
            if let Some(g) = ctx.groups.iter().position(|n| *n == k.kind) {
                k.every = by_group.get(g).and_then(|l| Percentiles::of(&l.every));
                k.conflated_age = by_group.get(g).and_then(|l| Percentiles::of(&l.conflated));
            }
        }
        FanoutFigures {
            kinds,
            conflated_age: Percentiles::of(&conflated_age),
            outcomes: ctx.outcomes.snapshot(),
        }
    });
    let mut subscribers = Vec::new();
    let per_subscriber = fanout.is_none();
    for ((s, expected), tally) in ctx.subs.iter().zip(expected).zip(&tallies) {
        if !per_subscriber {
            break;
        }
        let mut errors = s.errors();
        let late = s.late.load(Ordering::Relaxed);
        if late > 0 {
            errors.push(format!("{late} events of earlier steps"));
        }
        let foreign = s.foreign.load(Ordering::Relaxed);
        if foreign > 0 {
            errors.push(format!("{foreign} events this run did not send"));
        }
        subscribers.push(SubscriberFigures {
            name: s.spec.name.clone(),
            expected,
            delivered: tally.counted,
            errors,
        });
    }
    let mut first_error = load.first_error();
    let untracked = count(&load.untracked_batches);
    if untracked > 0 && first_error.is_none() {
        first_error = Some(format!(
            "{untracked} batches missing from the send log (not timed)"
        ));
    }
    Ok(StepFigures {
        index: plan.index,
        target_rate: plan.rate,
        warmup_secs: plan.warmup.as_secs_f64(),
        measure_secs: plan.measure.as_secs_f64(),
        send_secs,
        sent: count(&load.sent),
        accepted,
        rejected: count(&load.rejected),
        failed: count(&load.failed),
        requests: count(&load.requests),
        failed_requests: count(&load.failed_requests),
        max_in_flight: count(&load.max_in_flight),
        late_batches: count(&load.late_batches),
        max_lag_ms: count(&load.max_lag_us) as f64 / 1000.0,
        enriched: ctx.tail.events() - enriched0,
        enriched_entries: ctx.tail.entries() - entries0,
        loaded,
        subscribers,
        fanout,
        latency: Percentiles::of(&latency),
        drain_secs,
        drained,
        resources,
        resources_secs,
        first_error,
    })
}

/// The command line, as typed (arguments with spaces quoted).
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Redis's address without credentials.
fn redis_addr(client: &redis::Client) -> String {
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
        other => format!("{other:?}"),
    }
}

/// Runs the bench against the system at `target` and prints the report.
pub async fn run(
    target: Target,
    args: BenchArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let steps = args.plan()?;
    let run_id = match &args.run_id {
        Some(id) if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()) => id.clone(),
        Some(id) => bail!("--run-id must be letters and digits, got {id:?}"),
        None => format!("{:08x}", rand::random::<u32>()),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&target.database_url)
        .await
        .context("connecting to Postgres")?;
    let (instruments, accounts) = universe(
        &RefData::load(&pool)
            .await
            .context("loading reference data")?,
    );
    if instruments.is_empty() {
        bail!("no instruments in the reference data: run `tickgraph demo-data`");
    }
    let client = redis::Client::open(target.redis_url.as_str()).context("bad --redis-url")?;

    // Before the load, so it disturbs nothing measured.
    let ceiling = if args.skip_ceiling {
        Err("skipped (--skip-ceiling)".to_string())
    } else {
        let key = format!("{}:ceiling", target.layout.prefix());
        let measured = ceiling::measure(&client, &key, args.ceiling_requests)
            .await
            .map_err(|e| {
                tracing::warn!(error = %format!("{e:#}"), "cannot measure the Redis ceiling");
                format!("{e:#}")
            });
        ceiling::wait_persistence_idle(&client, Duration::from_secs(120)).await?;
        measured
    };

    let stop = CancellationToken::new();
    let procs = ProcStat::start(args.clk_tck, args.system_pid, stop.clone()).await;
    let prefix = format!("bench-{run_id}-c");
    let interval = args.interval();
    let log_capacity: usize = steps
        .iter()
        .map(|s| {
            ((s.warmup + s.measure).as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 2
        })
        .sum();
    let conns: Vec<Arc<Connection>> = (0..args.connections)
        .map(|k| {
            Connection::new(&args.ingest_url, format!("{prefix}{k}"), log_capacity).map(Arc::new)
        })
        .collect::<Result<_, _>>()
        .context("building the HTTP clients")?;
    let mut gens: Vec<Generator> = conns
        .iter()
        .enumerate()
        .map(|(k, c)| {
            Generator::new(
                instruments.clone(),
                accounts.clone(),
                c.source.clone(),
                args.trade_ratio,
                args.seed.wrapping_add(k as u64),
            )
        })
        .collect();

    let tail = EnrichedTail::start(&client, &target.layout, stop.clone())
        .await
        .context("starting the enriched-stream tail")?;
    let origins = Arc::new(Origins {
        prefix: prefix.clone(),
        connections: conns.clone(),
    });
    let outcomes = Arc::new(Outcomes::default());
    let (specs, subscriber_lines, groups, opts): (_, _, Vec<&'static str>, _) = match args.fanout {
        Some(n) => {
            let (specs, lines) = fanout::specs(n, &instruments, args.seed);
            let mut all = vec![format!(
                "graphql-transport-ws, fan-out: {} subscribers, each on its own connection (kind, count, operations, check):",
                report::int(n as u64)
            )];
            all.extend(lines);
            (
                specs,
                all,
                fanout::Kind::ALL.iter().map(|k| k.name()).collect(),
                ConnectOptions {
                    concurrency: args.fanout_concurrency,
                    // Messages are a few hundred bytes; 4 KiB each keeps 10,000
                    // connections at 40 MB of read buffers.
                    read_buffer: 4 << 10,
                    tolerate_failures: true,
                },
            )
        }
        None => {
            let specs = subscriber_specs(&args, &instruments);
            let lines = describe_subscribers(&specs);
            (
                specs,
                lines,
                vec!["all", "few"],
                ConnectOptions {
                    concurrency: 1,
                    read_buffer: 32 << 10,
                    tolerate_failures: false,
                },
            )
        }
    };
    let sinks: Vec<Arc<LatencySink>> = groups
        .iter()
        .map(|_| LatencySink::new().map(Arc::new))
        .collect::<Result<_, _>>()?;
    let bench_nofile = fanout::open_files_limit("self");
    let system_nofile = args
        .system_pid
        .and_then(|p| fanout::open_files_limit(&p.to_string()));
    if let Some(n) = args.fanout {
        let needed = n as u64 + 256;
        if bench_nofile.is_some_and(|l| l < needed) {
            bail!(
                "--fanout {n} needs about {needed} open files, the bench may open {}: raise `ulimit -n` (.ci/bench raises it to the hard limit)",
                limit_text(bench_nofile)
            );
        }
        if system_nofile.is_some_and(|l| l < needed) {
            tracing::warn!(
                limit = limit_text(system_nofile),
                needed,
                "the system under test may not accept every fan-out connection: raise its `ulimit -n`"
            );
        }
    }
    // Fan-out connects first and subscribes on a signal, so that an idle
    // connection and an idle subscription are measured apart.
    let go = CancellationToken::new();
    if args.fanout.is_none() {
        go.cancel();
    }
    let idle = Duration::from_secs(args.fanout_idle_secs);
    // With --fanout, an idle window before connecting is the baseline of the
    // idle CPU figures.
    let baseline = procs.mark().await;
    if args.fanout.is_some() {
        tokio::time::sleep(idle).await;
    }
    let before = procs.mark().await;
    let started = subscribers::start(
        &args.api_url,
        specs,
        &sinks,
        origins,
        outcomes.clone(),
        opts,
        go.clone(),
        stop.clone(),
    )
    .await?;
    if started.subs.is_empty() && args.fanout.is_some() {
        bail!(
            "no fan-out subscriber could connect: {:?}",
            outcomes.snapshot()
        );
    }
    tracing::info!(
        subscribers = started.subs.len(),
        failed = started.failed,
        secs = started.took.as_secs_f64(),
        "bench subscribers connected"
    );
    let connected = procs.mark().await;
    let open = if args.fanout.is_some() {
        tokio::time::sleep(idle).await;
        let open = procs.mark().await;
        go.cancel();
        open
    } else {
        before
    };
    let subscribing = Instant::now();
    let all_subscribed = wait_subscribed(&started, Duration::from_secs(60)).await;
    let subscribe_secs = subscribing.elapsed().as_secs_f64();
    if !all_subscribed {
        tracing::warn!(
            subscribed = started.subscribed.load(Ordering::Relaxed),
            of = started.subs.len(),
            "not every subscriber could send its subscriptions within 60 s"
        );
    }
    let fanout_setup = match args.fanout {
        Some(n) => {
            // A second for the server to register what was sent, then idle.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let settled = procs.mark().await;
            tokio::time::sleep(idle).await;
            let subscribed = procs.mark().await;
            let cores = |from, to| {
                let (_, groups) = procs.window(from, to);
                let of = |g: usize| groups.get(g).map_or(0.0, |u| u.cores);
                (of(procstat::TICKGRAPH), of(procstat::BENCH))
            };
            let idle_cores = [
                cores(baseline, before),
                cores(connected, open),
                cores(settled, subscribed),
            ];
            let rss = [
                procs.rss_at(before),
                procs.rss_at(open),
                procs.rss_at(subscribed),
            ];
            let of = |g: usize| (rss[0][g], rss[1][g], rss[2][g]);
            let setup = FanoutSetup {
                requested: n as u64,
                connected: started.subs.len() as u64,
                failed: started.failed as u64,
                subscriptions: started.subs.iter().map(|s| s.spec.ops.len() as u64).sum(),
                concurrency: opts.concurrency,
                connect_secs: started.took.as_secs_f64(),
                subscribe_secs,
                connect: Percentiles::of(&started.connect_us),
                idle_secs: idle.as_secs_f64(),
                system_rss_kib: of(procstat::TICKGRAPH),
                idle_cores,
                bench_rss_kib: of(procstat::BENCH),
                bench_nofile,
                system_nofile,
            };
            let m = setup.idle_memory();
            tracing::info!(
                per_connection_kib = format!("{:.1}", m.connection),
                per_subscription_kib = format!("{:.1}", m.subscription),
                "fan-out subscribers idle"
            );
            Some(setup)
        }
        None => {
            tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
            None
        }
    };
    let subs = started.subs;
    let sub_tasks = started.tasks;

    let ctx = Ctx {
        args: &args,
        pool: &pool,
        conns: &conns,
        subs: &subs,
        sinks: &sinks,
        groups: &groups,
        outcomes: &outcomes,
        tail: &tail,
        procs: &procs,
        instruments: instruments.len(),
        shutdown: &shutdown,
    };
    let first_mark = procs.mark().await;
    let mut results = Vec::new();
    for plan in steps {
        if shutdown.is_cancelled() {
            break;
        }
        let figures = run_step(&ctx, plan, &mut gens).await?;
        let verdict = report::judge(&figures, args.p99_limit_ms);
        tracing::info!(
            step = plan.index + 1,
            rate = plan.rate,
            sustained = verdict.sustained,
            reasons = ?verdict.reasons,
            "bench step done"
        );
        let last = args.ramp.is_some() && !verdict.sustained;
        results.push((figures, verdict));
        if last {
            break;
        }
    }
    let last_mark = procs.mark().await;
    let (whole_secs, whole) = procs.window(first_mark, last_mark);
    let history = stages::loaded_like(&pool, &format!("bench-{run_id}-%")).await?;
    stop.cancel();
    for t in sub_tasks {
        let _ = t.await;
    }
    tail.stopped().await;

    let per_batch = args.rate * interval.as_secs_f64() / args.connections as f64;
    let busiest: Vec<&str> = instruments
        .iter()
        .take(3)
        .map(|i| i.symbol.as_str())
        .collect();
    let report = Report {
        command: command_line(),
        run_id: run_id.clone(),
        cores,
        system: format!(
            "ingest {}, api {}, Redis {} (streams {}:*, {} shards), history in Postgres",
            args.ingest_url,
            args.api_url,
            redis_addr(&client),
            target.layout.prefix(),
            target.layout.shards()
        ),
        load: format!(
            "open loop: {} connections (own HTTP/1.1 keep-alive client, source {prefix}<k>), one MessagePack \
             batch each per {} ms{}; {:.0}% trades, the rest quotes, over {} instruments, activity \
             skewed to the head of the list ({}, ...); ts = send time",
            args.connections,
            interval.as_millis(),
            if args.ramp.is_none() {
                format!(" ({per_batch:.1} events per batch)")
            } else {
                String::new()
            },
            args.trade_ratio * 100.0,
            instruments.len(),
            busiest.join(", ")
        ),
        subscribers: subscriber_lines,
        fanout: fanout_setup,
        ceiling,
        ramp: args.ramp.is_some(),
        p99_limit_ms: args.p99_limit_ms,
        steps: results,
        history,
        whole,
        whole_secs,
    };
    let text = report::render(&report);
    match &args.report {
        Some(path) => std::fs::write(path, &text)
            .with_context(|| format!("writing the report to {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

fn describe_subscribers(specs: &[SubscriberSpec]) -> Vec<String> {
    let all = specs.iter().filter(|s| s.group == 0).count();
    let mut lines = vec![format!(
        "graphql-transport-ws; {all} to every trade and quote (id ts instrument price qty | bid ask)"
    )];
    for s in specs.iter().filter(|s| s.group != 0) {
        if let Some(Filter::Instruments(symbols)) = s.ops.first().map(|o| &o.filter) {
            lines.push(format!(
                "{}: trades and quotes of {}",
                s.name,
                symbols.join(", ")
            ));
        }
    }
    lines
}

/// Waits until every subscriber still open has sent its subscriptions; false
/// after `cap`.
async fn wait_subscribed(started: &subscribers::Started, cap: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        let closed = started
            .subs
            .iter()
            .filter(|s| s.closed.load(Ordering::Relaxed))
            .count();
        if started.subscribed.load(Ordering::Relaxed) + closed >= started.subs.len() {
            return true;
        }
        if t0.elapsed() >= cap {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn limit_text(v: Option<u64>) -> String {
    v.map_or_else(|| "unknown".into(), |v| v.to_string())
}

/// Whether a WebSocket URL points at this machine's loopback interface.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_is_for_loopback_only() {
        for ok in [
            "ws://127.0.0.1:18180/graphql/ws",
            "ws://localhost/graphql/ws",
            "ws://[::1]:8080/graphql/ws",
            "ws://127.0.0.2:80",
        ] {
            assert!(is_loopback_url(ok), "{ok}");
        }
        for bad in [
            "ws://10.0.0.1:8080/graphql/ws",
            "ws://example.com/graphql/ws",
            "ws://127.0.0.1.example.com/x",
            "ws://[2001:db8::1]:80/",
        ] {
            assert!(!is_loopback_url(bad), "{bad}");
        }
    }

    #[test]
    fn a_ramp_runs_from_start_to_max_by_step() {
        let r: Ramp = "50000:25000:250000".parse().expect("ramp");
        assert_eq!(
            r.rates(),
            vec![
                50000.0, 75000.0, 100000.0, 125000.0, 150000.0, 175000.0, 200000.0, 225000.0,
                250000.0
            ]
        );
        let r: Ramp = "1000:300:2000".parse().expect("ramp");
        assert_eq!(r.rates(), vec![1000.0, 1300.0, 1600.0, 1900.0]);
        for bad in [
            "",
            "1000",
            "1000:0:2000",
            "2000:100:1000",
            "a:b:c",
            "1:1:1:1",
            "1:0.0001:1000",
        ] {
            assert!(bad.parse::<Ramp>().is_err(), "{bad:?} parsed");
        }
    }
}
