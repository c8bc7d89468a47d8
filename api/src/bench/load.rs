//! The load: one open-loop sender per connection. Each keeps a fixed schedule (a
//! batch every `interval`), spawns every request so a slow answer never delays
//! the next batch, and records when each batch left in its [`SendLog`], which
//! subscribers read to time what they receive.
//!
//! Events are a realistic mix, as the demo feed makes them: a random walk on each
//! instrument's tick grid, quotes one to three ticks either side of the mid,
//! trades at the touch, activity skewed towards the head of the instrument list.
//! They are written with `rmp` straight into a reused buffer: the bench shares the
//! cores of the system it measures.

use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tickgraph_enrich::refdata::AssetClass;
use tickgraph_ingest::event::now_nanos;

/// The content type of a MessagePack batch (see `tickgraph_ingest::wire::Format`).
pub const MSGPACK: &str = "application/msgpack";

/// An instrument the bench quotes, its prices kept as whole ticks.
#[derive(Debug, Clone)]
pub struct BenchInstrument {
    pub symbol: String,
    pub venue: String,
    pub asset_class: AssetClass,
    /// The tick is `tick_mantissa * 10^-tick_scale`.
    tick_mantissa: i64,
    tick_scale: u32,
    start_ticks: i64,
}

impl BenchInstrument {
    /// None for a tick that is not positive or too fine to count in i64 ticks.
    pub fn new(
        symbol: String,
        venue: String,
        asset_class: AssetClass,
        price: Decimal,
        tick: Decimal,
    ) -> Option<Self> {
        if tick <= Decimal::ZERO {
            return None;
        }
        let t = tick.normalize();
        let tick_mantissa = i64::try_from(t.mantissa()).ok()?;
        let start_ticks = (price / tick).trunc().to_i64().unwrap_or(1000).max(100);
        Some(Self {
            symbol,
            venue,
            asset_class,
            tick_mantissa,
            tick_scale: t.scale(),
            start_ticks,
        })
    }
}

/// What a batch entry of the send log says: the step the batch belongs to, and
/// whether it was sent during the warm-up (counted, but not timed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub step: u32,
    pub warmup: bool,
}

const WARMUP_BIT: u32 = 1 << 31;

impl Tag {
    fn pack(self) -> u32 {
        (self.step & !WARMUP_BIT) | if self.warmup { WARMUP_BIT } else { 0 }
    }

    fn unpack(v: u32) -> Self {
        Self {
            step: v & !WARMUP_BIT,
            warmup: v & WARMUP_BIT != 0,
        }
    }
}

/// When each batch of one connection was sent, by its first seq: written by the
/// connection's sender only, read lock-free by every subscriber. Seqs grow by
/// one per event, so the batch of a seq is the last one starting at or before it.
pub struct SendLog {
    first_seq: Box<[AtomicU64]>,
    sent_ns: Box<[AtomicI64]>,
    tag: Box<[AtomicU32]>,
    len: AtomicUsize,
}

impl SendLog {
    pub fn with_capacity(batches: usize) -> Self {
        Self {
            first_seq: (0..batches).map(|_| AtomicU64::new(0)).collect(),
            sent_ns: (0..batches).map(|_| AtomicI64::new(0)).collect(),
            tag: (0..batches).map(|_| AtomicU32::new(0)).collect(),
            len: AtomicUsize::new(0),
        }
    }

    /// Records a batch; false when the log is full. One writer at a time.
    pub fn push(&self, first_seq: u64, sent_ns: i64, tag: Tag) -> bool {
        let i = self.len.load(Ordering::Relaxed);
        if i >= self.first_seq.len() {
            return false;
        }
        self.first_seq[i].store(first_seq, Ordering::Relaxed);
        self.sent_ns[i].store(sent_ns, Ordering::Relaxed);
        self.tag[i].store(tag.pack(), Ordering::Relaxed);
        // Publishes the entry: a reader that sees the length sees its fields.
        self.len.store(i + 1, Ordering::Release);
        true
    }

    /// The send time and tag of the batch holding `seq`.
    pub fn lookup(&self, seq: u64) -> Option<(i64, Tag)> {
        let n = self.len.load(Ordering::Acquire);
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.first_seq[mid].load(Ordering::Relaxed) <= seq {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let i = lo.checked_sub(1)?;
        Some((
            self.sent_ns[i].load(Ordering::Relaxed),
            Tag::unpack(self.tag[i].load(Ordering::Relaxed)),
        ))
    }
}

/// The simulated market of one connection; it writes events as MessagePack.
pub struct Generator {
    instruments: Arc<[BenchInstrument]>,
    accounts: Arc<[String]>,
    mid_ticks: Vec<i64>,
    rng: SmallRng,
    source: String,
    trade_ratio: f64,
    next_seq: u64,
    buf: Vec<u8>,
    num: String,
}

impl Generator {
    pub fn new(
        instruments: Arc<[BenchInstrument]>,
        accounts: Arc<[String]>,
        source: String,
        trade_ratio: f64,
        seed: u64,
    ) -> Self {
        let mid_ticks = instruments.iter().map(|i| i.start_ticks).collect();
        Self {
            instruments,
            accounts,
            mid_ticks,
            rng: SmallRng::seed_from_u64(seed),
            source,
            trade_ratio: trade_ratio.clamp(0.0, 1.0),
            next_seq: 1,
            buf: Vec::with_capacity(64 * 1024),
            num: String::with_capacity(32),
        }
    }

    /// The seq the next event will carry (seqs start at 1).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// A batch of `n` events stamped `ts`, as a MessagePack array; `picked` gets
    /// each event's [`Picked`] (instrument index and kind), in order.
    pub fn batch(&mut self, n: usize, ts: i64, picked: &mut Vec<Picked>) -> io::Result<Vec<u8>> {
        self.buf.clear();
        picked.clear();
        let len = u32::try_from(n).map_err(|_| io::Error::other("batch too large"))?;
        rmp::encode::write_array_len(&mut self.buf, len)?;
        let count = self.instruments.len();
        if count == 0 {
            return Err(io::Error::other("no instruments"));
        }
        for _ in 0..n {
            // Squaring a uniform draw skews activity towards the head of the list.
            let u: f64 = self.rng.random();
            let idx = ((u * u * count as f64) as usize).min(count - 1);
            let trade = self.event(idx, ts)?;
            picked.push(Picked::new(idx as u32, trade));
        }
        Ok(self.buf.clone())
    }

    /// Writes one event of instrument `idx`; true when it is a trade.
    fn event(&mut self, idx: usize, ts: i64) -> io::Result<bool> {
        use rmp::encode::{write_map_len, write_sint, write_str, write_uint};
        let Self {
            instruments,
            accounts,
            mid_ticks,
            rng,
            source,
            trade_ratio,
            next_seq,
            buf,
            num,
        } = self;
        let inst = &instruments[idx];
        let step: i64 = match rng.random_range(0..10u8) {
            0 => -1,
            1 => 1,
            _ => 0,
        };
        let half = rng.random_range(1..=3i64);
        let mid = (mid_ticks[idx] + step).max(half + 1);
        mid_ticks[idx] = mid;
        let seq = *next_seq;
        *next_seq += 1;
        let lot = rng.random_range(1..=50u64) * 100;
        let trade = rng.random_bool(*trade_ratio);
        let account = if trade && !accounts.is_empty() {
            Some(&accounts[rng.random_range(0..accounts.len())])
        } else {
            None
        };
        // Both kinds have ten fields; a trade may add its account.
        let fields = 10 + u32::from(account.is_some());
        write_map_len(buf, fields)?;
        write_str(buf, "kind")?;
        write_str(buf, if trade { "trade" } else { "quote" })?;
        write_str(buf, "source")?;
        write_str(buf, source)?;
        write_str(buf, "seq")?;
        write_uint(buf, seq)?;
        write_str(buf, "instrument")?;
        write_str(buf, &inst.symbol)?;
        write_str(buf, "venue")?;
        write_str(buf, &inst.venue)?;
        write_str(buf, "ts")?;
        write_sint(buf, ts)?;
        if trade {
            let buy = rng.random_bool(0.5);
            let px = if buy { mid + half } else { mid - half };
            write_str(buf, "price")?;
            write_str(buf, decimal(num, px, inst))?;
            write_str(buf, "qty")?;
            write_uint(buf, lot)?;
            write_str(buf, "side")?;
            write_str(buf, if buy { "buy" } else { "sell" })?;
            write_str(buf, "trade_id")?;
            num.clear();
            let _ = write!(num, "T{seq}");
            write_str(buf, num)?;
            if let Some(a) = account {
                write_str(buf, "account")?;
                write_str(buf, a)?;
            }
        } else {
            write_str(buf, "bid")?;
            write_str(buf, decimal(num, mid - half, inst))?;
            write_str(buf, "ask")?;
            write_str(buf, decimal(num, mid + half, inst))?;
            write_str(buf, "bid_size")?;
            write_uint(buf, lot)?;
            write_str(buf, "ask_size")?;
            write_uint(buf, lot + 100)?;
        }
        Ok(trade)
    }
}

/// One generated event: its instrument index and whether it is a trade, in a
/// `u32` (the top bit is the kind), as the send path keeps one per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Picked(u32);

impl Picked {
    const TRADE: u32 = 1 << 31;

    pub fn new(instrument: u32, trade: bool) -> Self {
        Self((instrument & !Self::TRADE) | if trade { Self::TRADE } else { 0 })
    }

    pub fn instrument(self) -> usize {
        (self.0 & !Self::TRADE) as usize
    }

    pub fn is_trade(self) -> bool {
        self.0 & Self::TRADE != 0
    }
}

/// `ticks` ticks of `inst` as an exact decimal string, in `num`.
fn decimal<'a>(num: &'a mut String, ticks: i64, inst: &BenchInstrument) -> &'a str {
    num.clear();
    let v = ticks.saturating_mul(inst.tick_mantissa);
    // Writing to a String cannot fail.
    let _ = write!(num, "{v}");
    let scale = inst.tick_scale as usize;
    if scale > 0 {
        while num.len() <= scale {
            num.insert(0, '0');
        }
        num.insert(num.len() - scale, '.');
    }
    num
}

/// One producer connection: its own HTTP/1.1 keep-alive client and source id.
pub struct Connection {
    pub source: String,
    pub log: SendLog,
    client: reqwest::Client,
    url: String,
}

impl Connection {
    pub fn new(ingest_url: &str, source: String, log_capacity: usize) -> reqwest::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Self {
            source,
            log: SendLog::with_capacity(log_capacity),
            client,
            url: format!("{}/v1/events", ingest_url.trim_end_matches('/')),
        })
    }
}

/// The counts of one step, shared by its senders and their requests.
pub struct StepLoad {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    /// Events in requests that failed whole (transport error, non-200).
    pub failed: AtomicU64,
    pub requests: AtomicU64,
    pub failed_requests: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    /// Batches sent more than one interval after their due time.
    pub late_batches: AtomicU64,
    pub max_lag_us: AtomicU64,
    /// Batches the send log had no room for (their events cannot be timed).
    pub untracked_batches: AtomicU64,
    /// Accepted events per instrument index.
    pub accepted_by_instrument: Box<[AtomicU64]>,
    /// Accepted trades per instrument index (the rest of each count are quotes).
    pub accepted_trades_by_instrument: Box<[AtomicU64]>,
    pub first_error: Mutex<Option<String>>,
}

impl StepLoad {
    pub fn new(instruments: usize) -> Self {
        Self {
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failed_requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            late_batches: AtomicU64::new(0),
            max_lag_us: AtomicU64::new(0),
            untracked_batches: AtomicU64::new(0),
            accepted_by_instrument: (0..instruments).map(|_| AtomicU64::new(0)).collect(),
            accepted_trades_by_instrument: (0..instruments).map(|_| AtomicU64::new(0)).collect(),
            first_error: Mutex::new(None),
        }
    }

    fn error(&self, e: String) {
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if first.is_none() {
            tracing::warn!(error = %e, "bench batch failed");
            *first = Some(e);
        }
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The schedule of one connection for one step.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Events per second on this connection.
    pub rate: f64,
    pub interval: Duration,
    pub warmup: Duration,
    pub measure: Duration,
    pub step: u32,
}

#[derive(Deserialize)]
struct Answer {
    accepted: u64,
    #[serde(default)]
    rejected: Vec<Rejected>,
}

#[derive(Deserialize)]
struct Rejected {
    index: usize,
    #[serde(default)]
    reason: String,
}

/// Sends on `conn` for one step and hands the generator back. Requests are
/// spawned on `requests`; wait on it for their answers.
pub async fn send_step(
    conn: Arc<Connection>,
    mut generator: Generator,
    sched: Schedule,
    load: Arc<StepLoad>,
    requests: TaskTracker,
    shutdown: CancellationToken,
) -> Generator {
    let total = sched.warmup + sched.measure;
    let interval = sched.interval.as_secs_f64();
    let start = Instant::now();
    let mut scheduled = 0u64;
    for i in 0u64.. {
        let offset = Duration::from_secs_f64(i as f64 * interval);
        if offset >= total {
            break;
        }
        let due = start + offset;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(due) => {}
        }
        let lag = Instant::now().saturating_duration_since(due);
        if lag > sched.interval {
            load.late_batches.fetch_add(1, Ordering::Relaxed);
        }
        load.max_lag_us.fetch_max(
            u64::try_from(lag.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        // Batch sizes follow the cumulative target, so a fractional rate per
        // batch still adds up to the exact rate.
        let target = ((i + 1) as f64 * interval * sched.rate).round() as u64;
        let n = target.saturating_sub(scheduled) as usize;
        scheduled = scheduled.max(target);
        if n == 0 {
            continue;
        }
        let ts = now_nanos();
        let first_seq = generator.next_seq();
        let mut picked = Vec::with_capacity(n);
        let body = match generator.batch(n, ts, &mut picked) {
            Ok(b) => b,
            Err(e) => {
                load.error(format!("encoding a batch: {e}"));
                break;
            }
        };
        let tag = Tag {
            step: sched.step,
            warmup: offset < sched.warmup,
        };
        if !conn.log.push(first_seq, ts, tag) {
            load.untracked_batches.fetch_add(1, Ordering::Relaxed);
        }
        load.sent.fetch_add(n as u64, Ordering::Relaxed);
        load.requests.fetch_add(1, Ordering::Relaxed);
        let now_in_flight = load.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        load.max_in_flight
            .fetch_max(now_in_flight, Ordering::Relaxed);
        requests.spawn(post(conn.clone(), body, picked, load.clone()));
    }
    generator
}

async fn post(conn: Arc<Connection>, body: Vec<u8>, picked: Vec<Picked>, load: Arc<StepLoad>) {
    let sent = conn
        .client
        .post(&conn.url)
        .header(reqwest::header::CONTENT_TYPE, MSGPACK)
        .body(body)
        .send()
        .await;
    let answer = match sent {
        Ok(r) if r.status().is_success() => match r.bytes().await {
            Ok(b) => serde_json::from_slice::<Answer>(&b)
                .map_err(|e| format!("unreadable ingest answer: {e}")),
            Err(e) => Err(format!("reading the ingest answer: {e}")),
        },
        Ok(r) => Err(format!("ingest answered HTTP {}", r.status())),
        Err(e) => Err(format!("POST {}: {}", conn.url, with_sources(&e))),
    };
    match answer {
        Ok(a) => {
            load.accepted.fetch_add(a.accepted, Ordering::Relaxed);
            load.rejected
                .fetch_add(a.rejected.len() as u64, Ordering::Relaxed);
            let mut refused: Vec<usize> = a.rejected.iter().map(|r| r.index).collect();
            refused.sort_unstable();
            for (pos, &p) in picked.iter().enumerate() {
                if refused.binary_search(&pos).is_err() {
                    if let Some(c) = load.accepted_by_instrument.get(p.instrument()) {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    if p.is_trade() {
                        if let Some(c) = load.accepted_trades_by_instrument.get(p.instrument()) {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            if let Some(r) = a.rejected.first() {
                load.error(format!("event rejected: {}", r.reason));
            }
        }
        Err(e) => {
            load.failed
                .fetch_add(picked.len() as u64, Ordering::Relaxed);
            load.failed_requests.fetch_add(1, Ordering::Relaxed);
            load.error(e);
        }
    }
    load.in_flight.fetch_sub(1, Ordering::Relaxed);
}

/// An error with its chain of sources, which reqwest leaves out of its own
/// message ("error sending request" says neither timeout nor refusal).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickgraph_ingest::wire::{decode_batch, Format};
    use tickgraph_ingest::Event;

    fn instruments() -> Arc<[BenchInstrument]> {
        let i = |s: &str, v: &str, p: &str, t: &str| {
            BenchInstrument::new(
                s.into(),
                v.into(),
                AssetClass::Equity,
                p.parse().expect("price"),
                t.parse().expect("tick"),
            )
            .expect("instrument")
        };
        vec![
            i("AAPL", "XNAS", "189.25", "0.01"),
            i("EURUSD", "XOFF", "1.0831", "0.00005"),
            i("VOD.L", "XLON", "72.5", "0.02"),
        ]
        .into()
    }

    #[test]
    fn every_generated_event_passes_ingest_validation_on_its_tick_grid() {
        let mut g = Generator::new(
            instruments(),
            vec!["ACC-1".to_string()].into(),
            "bench-t-c0".into(),
            0.3,
            7,
        );
        let mut picked = Vec::new();
        let body = g.batch(2_000, now_nanos(), &mut picked).expect("encodes");
        assert_eq!(picked.len(), 2_000);
        let items = decode_batch(Format::MsgPack, &body, 10_000).expect("framing");
        assert_eq!(items.len(), 2_000);
        let (mut trades, mut seq) = (0, 0);
        for (it, &p) in items.into_iter().zip(&picked) {
            let ev = it.outcome.expect("valid event");
            let tick: Decimal = ["0.01", "0.00005", "0.02"][p.instrument()]
                .parse()
                .expect("tick");
            seq += 1;
            assert_eq!(ev.header().seq, seq);
            assert_eq!(p.is_trade(), matches!(ev, Event::Trade(_)));
            match ev {
                Event::Quote(q) => {
                    assert!((q.bid % tick).is_zero() && (q.ask % tick).is_zero());
                    assert!(q.bid < q.ask);
                }
                Event::Trade(t) => {
                    trades += 1;
                    assert!((t.price % tick).is_zero(), "{} off {tick}", t.price);
                }
            }
        }
        assert!((400..800).contains(&trades), "{trades} trades of 2000");
        assert_eq!(g.next_seq(), 2_001);
    }

    #[test]
    fn an_error_is_told_with_its_sources() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        assert_eq!(with_sources(&e), "error sending request: timed out");
        let e = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(with_sources(&e), "refused");
    }

    #[test]
    fn a_picked_event_keeps_its_instrument_and_kind_in_one_word() {
        let p = Picked::new(2_397, true);
        assert_eq!((p.instrument(), p.is_trade()), (2_397, true));
        let q = Picked::new(0, false);
        assert_eq!((q.instrument(), q.is_trade()), (0, false));
        assert_eq!(std::mem::size_of::<Picked>(), 4);
    }

    #[test]
    fn the_send_log_finds_the_batch_of_a_seq() {
        let log = SendLog::with_capacity(3);
        assert_eq!(log.lookup(1), None);
        let t = |step, warmup| Tag { step, warmup };
        assert!(log.push(1, 100, t(0, true)));
        assert!(log.push(11, 200, t(0, false)));
        assert!(log.push(15, 300, t(1, false)));
        assert!(!log.push(20, 400, t(1, false)), "full");
        assert_eq!(log.lookup(0), None);
        assert_eq!(log.lookup(1), Some((100, t(0, true))));
        assert_eq!(log.lookup(10), Some((100, t(0, true))));
        assert_eq!(log.lookup(11), Some((200, t(0, false))));
        assert_eq!(log.lookup(14), Some((200, t(0, false))));
        assert_eq!(log.lookup(99), Some((300, t(1, false))));
    }
}
