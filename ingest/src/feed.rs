//! The demo feed: a producer that sends realistic quotes and trades for a set of
//! instruments through ingest's real HTTP path, at a fixed rate.
//!
//! Prices follow a random walk on each instrument's tick grid; quotes straddle the
//! mid by one to three ticks; trades print at the touch on the aggressor's side.
//! Activity is skewed, as in real markets: the first instruments of the list tick
//! far more often than the tail.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::event::now_nanos;

/// An instrument the feed quotes: where it trades, a starting price and its tick.
#[derive(Debug, Clone)]
pub struct FeedInstrument {
    pub symbol: String,
    pub venue: String,
    pub price: Decimal,
    pub tick: Decimal,
}

#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// Base URL of ingest, e.g. `http://127.0.0.1:8081`.
    pub ingest_url: String,
    /// Events per second.
    pub rate: f64,
    /// Events per request.
    pub batch: usize,
    /// Requests in flight at once.
    pub in_flight: usize,
    /// The producer id the events carry.
    pub source: String,
    /// Share of events that are trades (the rest are quotes).
    pub trade_ratio: f64,
    /// Accounts trades are booked to (none: trades carry no account).
    pub accounts: Vec<String>,
    /// Send MessagePack instead of JSON.
    pub msgpack: bool,
    /// Stop after this long (None: until shutdown).
    pub duration: Option<Duration>,
    pub seed: u64,
    /// The producer's bearer token (none in dev mode).
    pub token: Option<String>,
}

impl FeedConfig {
    pub fn new(ingest_url: impl Into<String>) -> Self {
        Self {
            ingest_url: ingest_url.into(),
            rate: 1_000.0,
            batch: 100,
            in_flight: 8,
            source: "demo-feed".into(),
            trade_ratio: 0.2,
            accounts: Vec::new(),
            msgpack: false,
            duration: None,
            seed: 42,
            token: None,
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct FeedStats {
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Events in batches that failed as a whole (transport error or non-200).
    pub failed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("the feed has no instruments to quote")]
    NoInstruments,
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("the producer token cannot be an HTTP header value")]
    BadToken,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> FeedStats {
        FeedStats {
            sent: self.sent.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

struct Book {
    inst: FeedInstrument,
    /// Mid price in ticks.
    mid_ticks: i64,
}

/// The simulated market: it produces the next event, as the wire format a
/// producer would send.
pub struct Market {
    books: Vec<Book>,
    rng: SmallRng,
    seq: u64,
    source: String,
    trade_ratio: f64,
    accounts: Vec<String>,
}

/// One drawn event, before it borrows its book's names.
struct Drawn {
    idx: usize,
    seq: u64,
    mid_ticks: i64,
    half_spread: i64,
    is_trade: bool,
    lot: Decimal,
    buy: bool,
    account: Option<usize>,
}

#[derive(Serialize)]
struct OutEvent<'a> {
    kind: &'static str,
    source: &'a str,
    seq: u64,
    instrument: &'a str,
    venue: &'a str,
    ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qty: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    side: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trade_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bid: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ask: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bid_size: Option<Decimal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ask_size: Option<Decimal>,
}

impl Market {
    pub fn new(
        instruments: Vec<FeedInstrument>,
        source: String,
        trade_ratio: f64,
        accounts: Vec<String>,
        seed: u64,
    ) -> Self {
        let books = instruments
            .into_iter()
            .filter(|i| !i.tick.is_zero())
            .map(|inst| {
                let ticks = (inst.price / inst.tick).trunc();
                let mid_ticks = i64::try_from(ticks.mantissa() / 10i128.pow(ticks.scale()))
                    .unwrap_or(1000)
                    .max(100);
                Book { inst, mid_ticks }
            })
            .collect();
        Self {
            books,
            rng: SmallRng::seed_from_u64(seed),
            // Start from the clock so a restarted feed never reuses an event id.
            seq: u64::try_from(now_nanos() / 1_000).unwrap_or(0),
            source,
            trade_ratio,
            accounts,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.books.is_empty()
    }

    /// Appends `n` events to a batch in the chosen encoding.
    pub fn batch(&mut self, n: usize, msgpack: bool) -> Vec<u8> {
        let ts = now_nanos();
        // Move the books first, then borrow them for the wire structs.
        let mut drawn = Vec::with_capacity(n);
        for _ in 0..n {
            // Squaring a uniform draw skews activity towards the head of the list.
            let u: f64 = self.rng.random();
            let idx = (((u * u) * self.books.len() as f64) as usize).min(self.books.len() - 1);
            let step: i64 = match self.rng.random_range(0..10) {
                0 => -1,
                1 => 1,
                _ => 0,
            };
            let half_spread = self.rng.random_range(1..=3i64);
            let book = &mut self.books[idx];
            book.mid_ticks = (book.mid_ticks + step).max(half_spread + 1);
            self.seq += 1;
            drawn.push(Drawn {
                idx,
                seq: self.seq,
                mid_ticks: book.mid_ticks,
                half_spread,
                is_trade: self.rng.random_bool(self.trade_ratio.clamp(0.0, 1.0)),
                lot: Decimal::from(self.rng.random_range(1..=50i64) * 100),
                buy: self.rng.random_bool(0.5),
                account: (!self.accounts.is_empty())
                    .then(|| self.rng.random_range(0..self.accounts.len())),
            });
        }
        let events: Vec<OutEvent> = drawn
            .into_iter()
            .map(|d| {
                let book = &self.books[d.idx];
                let tick = book.inst.tick;
                let bid = Decimal::from(d.mid_ticks - d.half_spread) * tick;
                let ask = Decimal::from(d.mid_ticks + d.half_spread) * tick;
                let base = OutEvent {
                    kind: "quote",
                    source: &self.source,
                    seq: d.seq,
                    instrument: &book.inst.symbol,
                    venue: &book.inst.venue,
                    ts,
                    price: None,
                    qty: None,
                    side: None,
                    account: None,
                    trade_id: None,
                    bid: None,
                    ask: None,
                    bid_size: None,
                    ask_size: None,
                };
                if d.is_trade {
                    OutEvent {
                        kind: "trade",
                        price: Some(if d.buy { ask } else { bid }),
                        qty: Some(d.lot),
                        side: Some(if d.buy { "buy" } else { "sell" }),
                        account: d.account.map(|i| self.accounts[i].as_str()),
                        trade_id: Some(format!("T{}", d.seq)),
                        ..base
                    }
                } else {
                    OutEvent {
                        bid: Some(bid),
                        ask: Some(ask),
                        bid_size: Some(d.lot),
                        ask_size: Some(Decimal::from(100) + d.lot),
                        ..base
                    }
                }
            })
            .collect();
        let encoded = if msgpack {
            rmp_serde::to_vec_named(&events).map_err(|e| e.to_string())
        } else {
            serde_json::to_vec(&events).map_err(|e| e.to_string())
        };
        // Our own plain structs always encode; an empty body would be refused loudly.
        encoded.unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct Answer {
    accepted: u64,
    rejected: Vec<serde_json::Value>,
}

/// Sends events until `shutdown` or the configured duration, and returns counts.
pub async fn run(
    cfg: FeedConfig,
    instruments: Vec<FeedInstrument>,
    shutdown: CancellationToken,
) -> Result<FeedStats, FeedError> {
    let mut market = Market::new(
        instruments,
        cfg.source.clone(),
        cfg.trade_ratio,
        cfg.accounts.clone(),
        cfg.seed,
    );
    if market.is_empty() {
        return Err(FeedError::NoInstruments);
    }
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &cfg.token {
        let mut value = reqwest::header::HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| FeedError::BadToken)?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()?;
    let url = format!("{}/v1/events", cfg.ingest_url.trim_end_matches('/'));
    let content_type = if cfg.msgpack {
        "application/msgpack"
    } else {
        "application/json"
    };
    let batch = cfg.batch.max(1);
    let period = Duration::from_secs_f64(batch as f64 / cfg.rate.max(0.001));
    let mut ticker = tokio::time::interval(period);
    // Open loop: a late tick is sent at once, so the schedule holds on average.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let permits = Arc::new(Semaphore::new(cfg.in_flight.max(1)));
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if cfg.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        let body = market.batch(batch, cfg.msgpack);
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        counters.sent.fetch_add(batch as u64, Ordering::Relaxed);
        let (client, url, tally) = (client.clone(), url.clone(), counters.clone());
        tokio::spawn(async move {
            let counters = tally;
            let res = client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body)
                .send()
                .await;
            let answer = match res {
                Ok(r) if r.status().is_success() => r.json::<Answer>().await.ok(),
                Ok(r) => {
                    tracing::warn!(status = %r.status(), "feed batch refused");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "feed batch failed");
                    None
                }
            };
            match answer {
                Some(a) => {
                    counters.accepted.fetch_add(a.accepted, Ordering::Relaxed);
                    counters
                        .rejected
                        .fetch_add(a.rejected.len() as u64, Ordering::Relaxed);
                }
                None => {
                    counters.failed.fetch_add(batch as u64, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let s = counters.snapshot();
            tracing::info!(
                sent = s.sent,
                accepted = s.accepted,
                rejected = s.rejected,
                failed = s.failed,
                "demo feed"
            );
        }
    }
    // Let the requests in flight finish before counting.
    let _ = permits.acquire_many(cfg.in_flight.max(1) as u32).await;
    Ok(counters.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_batch, Format};

    fn market() -> Market {
        let inst = |s: &str, p: &str, t: &str| FeedInstrument {
            symbol: s.into(),
            venue: "XNAS".into(),
            price: p.parse().expect("price"),
            tick: t.parse().expect("tick"),
        };
        Market::new(
            vec![
                inst("AAPL", "189.25", "0.01"),
                inst("EURUSD", "1.0831", "0.00005"),
            ],
            "feed-test".into(),
            0.3,
            vec!["ACC-1".into()],
            7,
        )
    }

    #[test]
    fn every_generated_event_passes_ingest_validation() {
        let mut m = market();
        for msgpack in [false, true] {
            let body = m.batch(500, msgpack);
            let format = if msgpack {
                Format::MsgPack
            } else {
                Format::Json
            };
            let items = decode_batch(format, &body, 1_000).expect("framing");
            assert_eq!(items.len(), 500);
            for it in items {
                assert!(it.outcome.is_ok(), "{:?}", it.outcome);
            }
        }
    }

    #[test]
    fn prices_stay_on_the_tick_grid() {
        let mut m = market();
        let body = m.batch(200, false);
        let items = decode_batch(Format::Json, &body, 1_000).expect("framing");
        for it in items {
            match it.outcome.expect("valid") {
                crate::Event::Quote(q) => {
                    let tick: Decimal = if q.header.instrument.as_str() == "AAPL" {
                        "0.01".parse().expect("tick")
                    } else {
                        "0.00005".parse().expect("tick")
                    };
                    assert!((q.bid % tick).is_zero() && (q.ask % tick).is_zero());
                    assert!(q.bid < q.ask);
                }
                crate::Event::Trade(t) => assert!(t.price > Decimal::ZERO),
            }
        }
    }
}
