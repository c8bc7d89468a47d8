//! Who may send events.
//!
//! Every producer has a bearer token. Ingest knows only the token's SHA-256,
//! from the producers file, so the file holds no secret; a request's token is
//! hashed and looked up. The token fixes the `source` values its events may
//! claim, and optionally how many events per second it may send.
//!
//! ```json
//! {"producers": [
//!   {"name": "md-gateway", "token_sha256": "<hex of sha256(token)>",
//!    "sources": ["md-gw-1", "md-gw-2"], "max_events_per_sec": 200000}
//! ]}
//! ```
//!
//! `printf %s "$TOKEN" | sha256sum` gives the hash. Without a producers file,
//! ingest runs only in the explicit dev mode, where anyone may send anything.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};
use compact_str::CompactString;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A token bucket: `rate` tokens a second, holding at most one second's worth.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    /// Below zero while in debt (see [`TokenBucket::take_or_owe`]).
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A bucket that holds a second's worth at `rate`.
    pub fn full(rate: f64) -> Self {
        Self {
            tokens: Self::capacity(rate),
            at: Instant::now(),
        }
    }

    fn capacity(rate: f64) -> f64 {
        rate.max(1.0)
    }

    /// The most one take may ask for at `rate` and ever get with [`TokenBucket::take`].
    pub fn burst(rate: f64) -> f64 {
        Self::capacity(rate)
    }

    /// Takes `n` tokens, or tells how long until they would be there. More than
    /// a second's worth never fits.
    pub fn take(&mut self, n: f64, rate: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        self.take_once_there(n, n, rate)
    }

    /// Takes `n` tokens like [`TokenBucket::take`], except that more than a
    /// second's worth is taken once the bucket is full, leaving it in debt: the
    /// average rate still holds, and the takes after it wait until the debt is
    /// repaid. The wait told is until `n` are there or, for more than the
    /// bucket holds, until it is full. For a sender that cannot split what it
    /// sends, which `take` would refuse however long it waited.
    pub fn take_or_owe(&mut self, n: f64, rate: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        self.take_once_there(n, n.min(Self::capacity(rate)), rate)
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(Self::capacity(rate));
        self.at = now;
    }

    /// Takes `n` once `needed` are there.
    fn take_once_there(&mut self, n: f64, needed: f64, rate: f64) -> Result<(), Duration> {
        // A refill computed from the wait we answered can fall short of
        // `needed` by a rounding error; a millionth of a token is not worth a
        // second refusal.
        if self.tokens + Self::capacity(rate) * 1e-9 >= needed {
            self.tokens -= n;
            Ok(())
        } else {
            // A rate near zero makes the wait longer than a Duration holds.
            Err(
                Duration::try_from_secs_f64((needed - self.tokens) / rate.max(f64::MIN_POSITIVE))
                    .unwrap_or(Duration::MAX),
            )
        }
    }

    /// Whether it has refilled: a user who has been idle for a second.
    pub fn is_full(&self, rate: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate
            >= Self::capacity(rate)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProducersFile {
    producers: Vec<ProducerEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProducerEntry {
    name: String,
    token_sha256: String,
    sources: Vec<CompactString>,
    #[serde(default)]
    max_events_per_sec: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProducersError {
    #[error("reading the producers file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the producers file {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
}

/// A known producer.
#[derive(Debug)]
pub struct Producer {
    name: String,
    sources: Vec<CompactString>,
    max_events_per_sec: Option<f64>,
    bucket: Mutex<TokenBucket>,
}

impl Producer {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this producer may send events claiming `source`.
    pub fn owns(&self, source: &str) -> bool {
        self.sources.iter().any(|s| s == source)
    }

    /// Why an event claiming `source`, which this producer does not own, is
    /// rejected.
    pub fn unowned(&self, source: &str) -> crate::Rejection {
        crate::Rejection(format!(
            "source {source:?} is not one producer {:?} may send for",
            self.name
        ))
    }

    /// Counts a batch of `n` events against the producer's rate; a batch of
    /// more than a second's worth is taken once the bucket is full, into debt.
    pub fn admit(&self, n: usize) -> Result<(), ProducerRefusal> {
        let Some(rate) = self.max_events_per_sec else {
            return Ok(());
        };
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        // Sources cannot always split a batch, and what they do not send is lost.
        bucket
            .take_or_owe(n as f64, rate, Instant::now())
            .map_err(|wait| ProducerRefusal::RateLimited {
                producer: self.name.clone(),
                per_sec: rate,
                events: n,
                retry_after: wait,
            })
    }
}

/// Why a request is turned away before any of its events is looked at.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProducerRefusal {
    #[error("missing credentials: send `Authorization: Bearer <producer token>`")]
    Missing,
    #[error("unknown producer token")]
    Unknown,
    #[error(
        "rate limit: producer {producer:?} may send {per_sec} events per second; \
         a batch of {events} fits in {} ms",
        retry_after.as_millis().max(1)
    )]
    RateLimited {
        producer: String,
        per_sec: f64,
        events: usize,
        retry_after: Duration,
    },
}

/// The producers ingest accepts events from.
#[derive(Debug, Clone)]
pub enum Producers {
    /// Dev mode: no token needed, any source allowed.
    Open,
    /// Producers by the SHA-256 of their token.
    Known(Arc<HashMap<[u8; 32], Arc<Producer>>>),
}

impl Producers {
    pub fn load(path: &Path) -> Result<Self, ProducersError> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| ProducersError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| ProducersError::Invalid {
            path: shown,
            reason,
        })
    }

    /// The producers of a producers file's contents.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let file: ProducersFile = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        let mut known = HashMap::with_capacity(file.producers.len());
        for p in file.producers {
            let hash = parse_hash(&p.token_sha256)
                .ok_or_else(|| format!("{:?}: token_sha256 must be 64 hex digits", p.name))?;
            if p.sources.is_empty() {
                return Err(format!("{:?}: sources must not be empty", p.name));
            }
            if let Some(rate) = p.max_events_per_sec {
                if !(rate.is_finite() && rate > 0.0) {
                    return Err(format!("{:?}: max_events_per_sec must be above 0", p.name));
                }
            }
            let producer = Producer {
                bucket: Mutex::new(TokenBucket::full(p.max_events_per_sec.unwrap_or(1.0))),
                name: p.name,
                sources: p.sources,
                max_events_per_sec: p.max_events_per_sec,
            };
            if known.insert(hash, Arc::new(producer)).is_some() {
                return Err("two producers share a token".into());
            }
        }
        Ok(Producers::Known(Arc::new(known)))
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Producers::Open)
    }

    /// The producer a request's `Authorization: Bearer` header names; `None`
    /// in dev mode.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Producer>>, ProducerRefusal> {
        let Producers::Known(known) = self else {
            return Ok(None);
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .ok_or(ProducerRefusal::Missing)?
            .to_str()
            .ok()
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(ProducerRefusal::Unknown)?;
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        known
            .get(&hash)
            .cloned()
            .map(Some)
            .ok_or(ProducerRefusal::Unknown)
    }
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

/// The hex SHA-256 of a token, as the producers file holds it.
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        h
    }

    fn producers() -> Producers {
        let file = format!(
            r#"{{"producers":[{{"name":"gw","token_sha256":"{}","sources":["gw-1"],"max_events_per_sec":100}}]}}"#,
            token_sha256("s3cret")
        );
        Producers::parse(file.as_bytes()).expect("parses")
    }

    #[test]
    fn a_token_is_known_by_its_hash_and_fixes_its_sources() {
        let p = producers();
        let gw = p
            .authenticate(&with_bearer("s3cret"))
            .expect("known")
            .expect("producer");
        assert_eq!(gw.name(), "gw");
        assert!(gw.owns("gw-1"));
        assert!(!gw.owns("gw-2"));
        assert_eq!(
            p.authenticate(&with_bearer("wrong")).err(),
            Some(ProducerRefusal::Unknown)
        );
        assert_eq!(
            p.authenticate(&HeaderMap::new()).err(),
            Some(ProducerRefusal::Missing)
        );
        assert!(Producers::Open
            .authenticate(&HeaderMap::new())
            .expect("open")
            .is_none());
    }

    #[test]
    fn a_producer_may_send_a_second_of_its_rate_at_once_then_waits() {
        let p = producers();
        let gw = p
            .authenticate(&with_bearer("s3cret"))
            .expect("known")
            .expect("producer");
        assert!(gw.admit(100).is_ok());
        match gw.admit(50) {
            Err(ProducerRefusal::RateLimited { retry_after, .. }) => {
                assert!(retry_after > Duration::from_millis(400), "{retry_after:?}");
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
    }

    #[test]
    fn a_bad_file_says_what_is_wrong() {
        let short = br#"{"producers":[{"name":"gw","token_sha256":"abc","sources":["a"]}]}"#;
        assert!(Producers::parse(short)
            .expect_err("refused")
            .contains("64 hex digits"));
        let no_sources = format!(
            r#"{{"producers":[{{"name":"gw","token_sha256":"{}","sources":[]}}]}}"#,
            token_sha256("x")
        );
        assert!(Producers::parse(no_sources.as_bytes())
            .expect_err("refused")
            .contains("sources"));
        assert!(Producers::parse(br#"{"producers":[{"name":"gw","tokn":"x"}]}"#).is_err());
    }

    #[test]
    fn a_rate_near_zero_tells_the_longest_wait_instead_of_panicking() {
        let now = Instant::now();
        let mut b = TokenBucket::full(1e-300);
        assert_eq!(b.take(1.0, 1e-300, now), Ok(()));
        assert_eq!(b.take(1.0, 1e-300, now), Err(Duration::MAX));
        assert!(b.take_or_owe(5.0, 1e-300, now).is_err());
    }

    /// A batch over a second's worth waited for, as its 429 said, is taken,
    /// and the bucket is in debt for the excess.
    #[test]
    fn a_batch_over_a_seconds_worth_is_taken_once_the_bucket_is_full() {
        let t0 = Instant::now();
        let mut b = TokenBucket {
            tokens: 40.0,
            at: t0,
        };
        let wait = b.take_or_owe(250.0, 100.0, t0).expect_err("not full yet");
        assert!(
            (wait.as_secs_f64() - 0.6).abs() < 1e-6,
            "until full: {wait:?}"
        );
        b.take_or_owe(250.0, 100.0, t0 + wait)
            .expect("full: taken, into debt");
        // 150 events of debt and a second's refill: 1.5 s before 1 more fits.
        let wait = b
            .take_or_owe(1.0, 100.0, t0 + Duration::from_millis(600))
            .expect_err("in debt");
        assert!((wait.as_secs_f64() - 1.51).abs() < 1e-6, "{wait:?}");
        assert!(!b.is_full(100.0, t0 + Duration::from_millis(3000)));
        assert!(b.is_full(100.0, t0 + Duration::from_millis(3100)));
    }

    /// Users' operations (the api) keep the plain bucket: more than a second's
    /// worth never fits.
    #[test]
    fn a_plain_take_of_more_than_a_seconds_worth_never_fits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3.0);
        assert!(b.take(4.0, 3.0, t0 + Duration::from_secs(10)).is_err());
        assert!(b.take(3.0, 3.0, t0 + Duration::from_secs(10)).is_ok());
    }

    /// A producer's batch over its second's worth is taken from a full bucket,
    /// and the next waits.
    #[test]
    fn a_producer_may_send_more_than_a_seconds_worth_once_full() {
        let p = producers();
        let gw = p
            .authenticate(&with_bearer("s3cret"))
            .expect("known")
            .expect("producer");
        assert!(gw.admit(250).is_ok(), "a full bucket takes it");
        assert!(matches!(
            gw.admit(1),
            Err(ProducerRefusal::RateLimited { .. })
        ));
    }

    #[test]
    fn a_bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket {
            tokens: 0.0,
            at: t0,
        };
        assert!(b.take(10.0, 100.0, t0).is_err());
        assert!(b.take(10.0, 100.0, t0 + Duration::from_millis(100)).is_ok());
        assert!(b.is_full(100.0, t0 + Duration::from_secs(2)));
    }
}
