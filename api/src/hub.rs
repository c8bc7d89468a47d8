//! The fan-out hub: one reader per enriched stream shard, many subscribers.
//!
//! Each process reads every enriched shard exactly once, however many subscriptions
//! it serves: a reader task per shard, on its own blocking Redis connection, runs
//! `XREAD COUNT 32 BLOCK 1000` from the last id it saw, decodes each entry once
//! into an `Arc`'d [`Tick`] and dispatches the batch.
//!
//! Dispatch takes the registry's read lock once per batch. Subscriptions are indexed
//! by instrument; those naming none by venue (asked for or entitled to), then by
//! asset class; only those with none of these in a list of their own. An event
//! visits the subscribers listed under its instrument, its venue and its asset
//! class, and that list; each subscriber's whole filter is checked on those alone. Every subscriber owns a
//! bounded queue filled with `try_send`: the hub never waits for a subscriber and
//! never buffers more than [`QueueLimits`] allow for one, in events and in bytes
//! ([`TickMeta::weight`]). A subscriber past either is closed with
//! [`HubError::TooSlow`] or [`HubError::TooSlowBytes`] instead, since silently
//! skipping events would hand it a gap it cannot see.
//!
//! The hub also keeps the latest trade and quote of every instrument it has seen
//! since start, for the `latest*` queries and snapshots.
//!
//! Batches are dispatched one at a time, across shards too, and each records the
//! shards' dispatched positions in its events' resume base: that is what makes a
//! resume cursor exact (see [`crate::resume`]). [`Hub::resume_trades`] and
//! [`Hub::resume_quotes`] catch a reconnecting subscriber up from the streams
//! before it goes live.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use async_graphql::indexmap::IndexMap;
use futures_util::stream::BoxStream;
use futures_util::task::AtomicWaker;
use futures_util::{Stream, StreamExt};
use tickgraph_enrich::record::EnrichedRecord;
use tickgraph_enrich::refdata::AssetClass;
use tickgraph_ingest::redis_link::{ConnOpts, RedisConn, RedisTarget};
use tickgraph_ingest::stream::{
    decode_entry, is_batch, parse_entries, parse_read_reply, StreamEntry, StreamLayout,
};
use tickgraph_ingest::Side;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Entitlements, Scope};
use crate::metrics::{ApiMetrics, Dispatched};
use crate::resume::{
    entry_id, event_position, parse_position, CursorError, Position, ResumeBase, ResumeCursor,
    WHOLE_ENTRY,
};
use crate::tick::{event_cursor, QuoteTick, Tick, TickMeta, TradeTick};

/// Entries per XREAD. An entry holds up to 256 events, and a read is dispatched
/// to the subscribers' queues before they can run, so this bounds the burst a
/// queue must absorb after a stall: 32 entries, typically a few hundred events.
const READ_COUNT: usize = 32;
/// Milliseconds an XREAD waits for new entries; it also bounds how long a reader
/// takes to notice shutdown when the stream is idle.
const READ_BLOCK_MS: u64 = 1000;
/// The reader connection has no response timeout (a BLOCK would trip it), so this
/// catches a half-open connection that would otherwise hang the reader forever.
const READ_DEADLINE: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HubError {
    #[error("subscriber too slow: queue of {queue} events full")]
    TooSlow { queue: usize },
    #[error("subscriber too slow: over {bytes} bytes of events queued")]
    TooSlowBytes { bytes: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("`{arg}` is an empty list, which selects nothing: omit it to receive every value")]
    EmptyList { arg: &'static str },
    #[error("`maxRate` must be from 0.001 to 1000 updates per second per instrument, got {rate}")]
    BadMaxRate { rate: f64 },
    #[error(transparent)]
    BadCursor(#[from] CursorError),
    #[error(
        "the events after this cursor are no longer held: shard {shard} {why}; \
         reload the current state (for example with `snapshot: true`) and subscribe without `after`"
    )]
    CursorExpired { shard: u16, why: &'static str },
    #[error("cannot read the streams to resume: {0}")]
    Streams(String),
    #[error("this server does not read the streams, so it cannot resume")]
    NoStreams,
}

impl HubError {
    /// A machine-readable code for the errors a client acts on.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            HubError::CursorExpired { .. } => Some("CURSOR_EXPIRED"),
            HubError::TooSlow { .. } | HubError::TooSlowBytes { .. } => Some("TOO_SLOW"),
            _ => None,
        }
    }
}

/// What a subscription asks for. `None` means "any"; every given list must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub instruments: Option<Vec<String>>,
    pub venues: Option<Vec<String>>,
    pub asset_classes: Option<Vec<AssetClass>>,
    /// Ignored for quotes.
    pub sides: Option<Vec<Side>>,
    /// Conflation: at most this many updates per second per instrument, each the
    /// latest; `None` delivers every event.
    pub max_rate: Option<MaxRate>,
    /// Start with the latest tick the hub holds of every selected instrument that
    /// matches, then live ticks: none missed and none repeated between the two.
    pub snapshot: bool,
    /// What the subscriber may see, checked on top of every filter above;
    /// `None`: everything.
    pub entitled: Option<Entitlements>,
}

/// A field of an event that a conflated subscription may keep one latest
/// value per (see [`ConflationKey`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflationField {
    Instrument,
    Venue,
    Source,
    /// Trades only.
    Side,
}

/// What a conflated subscription keeps one latest value of: the combination
/// of the fields it names, by default the instrument alone. Per instrument
/// and venue, a quote screen shows every venue's latest quote of a symbol
/// rather than whichever venue quoted last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConflationKey(u8);

impl ConflationKey {
    pub const INSTRUMENT: Self = Self(1);

    fn bit(f: ConflationField) -> u8 {
        match f {
            ConflationField::Instrument => 1,
            ConflationField::Venue => 2,
            ConflationField::Source => 4,
            ConflationField::Side => 8,
        }
    }

    /// The key of these fields, in any order; an empty list is refused.
    pub fn of(fields: &[ConflationField]) -> Result<Self, HubError> {
        if fields.is_empty() {
            return Err(HubError::EmptyList { arg: "conflateBy" });
        }
        Ok(Self(fields.iter().fold(0, |m, f| m | Self::bit(*f))))
    }

    fn has(self, f: ConflationField) -> bool {
        self.0 & Self::bit(f) != 0
    }

    /// The tick's key: its instrument alone borrowed, else its named fields
    /// joined by a separator no field holds.
    fn key_of<'t, T: TickMeta>(self, t: &'t T) -> std::borrow::Cow<'t, str> {
        if self == Self::INSTRUMENT {
            return std::borrow::Cow::Borrowed(t.instrument());
        }
        let h = t.header();
        let parts = [
            (ConflationField::Instrument, h.instrument.as_str()),
            (ConflationField::Venue, h.venue.as_str()),
            (ConflationField::Source, h.source.as_str()),
            (
                ConflationField::Side,
                t.side().map_or("", |side| side.as_str()),
            ),
        ];
        let mut key = String::new();
        for (f, v) in parts {
            if self.has(f) {
                key.push_str(v);
                key.push('\u{1f}');
            }
        }
        std::borrow::Cow::Owned(key)
    }
}

/// Updates per second per instrument (or per [`ConflationKey`]) a conflated
/// subscription receives at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxRate {
    period: Duration,
    key: ConflationKey,
}

impl MaxRate {
    /// The most a subscription may ask for; above it conflation saves little.
    pub const MAX_PER_SECOND: f64 = 1000.0;
    /// The least: one update per 1,000 seconds. Below about 5e-20 the period
    /// no longer fits a `Duration`, and long before that it means "never".
    pub const MIN_PER_SECOND: f64 = 0.001;

    pub fn per_second(rate: f64) -> Result<Self, HubError> {
        if !(Self::MIN_PER_SECOND..=Self::MAX_PER_SECOND).contains(&rate) {
            return Err(HubError::BadMaxRate { rate });
        }
        let period =
            Duration::try_from_secs_f64(1.0 / rate).map_err(|_| HubError::BadMaxRate { rate })?;
        Ok(Self {
            period,
            key: ConflationKey::INSTRUMENT,
        })
    }

    /// The least time between two deliveries.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The same rate, per `key` instead of per instrument.
    pub fn per(self, key: ConflationKey) -> Self {
        Self { key, ..self }
    }
}

/// The per-subscriber part of a [`Filter`], in the shape dispatch checks fastest.
#[derive(Debug)]
struct Check {
    venues: Option<NameList>,
    asset_classes: Option<u8>,
    sides: Option<u8>,
    /// The subscriber's entitlements; an empty list lets nothing through.
    entitled_venues: Option<NameList>,
    entitled_classes: Option<u8>,
}

/// Names a subscription lists, each shared through [`Names`].
type NameList = Box<[Arc<str>]>;

/// The instrument and venue names subscriptions hold, each held once however
/// many subscriptions name it: a subscription keeps a pointer per name, and
/// the index keys are the same pointers.
#[derive(Debug, Default)]
struct Names {
    held: Mutex<NameSet>,
}

#[derive(Debug, Default)]
struct NameSet {
    names: std::collections::HashSet<Arc<str>>,
    /// Names no subscription holds any more are dropped once the set is this
    /// large: twice what was held after the last sweep, so a sweep's cost is
    /// amortized over as many new names.
    sweep_at: usize,
}

/// The set is never swept below this many names.
const NAMES_SWEEP_MIN: usize = 4096;

impl Names {
    /// `list`, sorted, each name once, as shared names.
    fn intern(&self, mut list: Vec<String>) -> NameList {
        // A repeated name would be indexed, and so delivered, twice.
        list.sort_unstable();
        list.dedup();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.names.len() >= held.sweep_at {
            held.names.retain(|n| Arc::strong_count(n) > 1);
            held.names.shrink_to_fit();
            held.sweep_at = (2 * held.names.len()).max(NAMES_SWEEP_MIN);
        }
        list.into_iter()
            .map(|name| match held.names.get(name.as_str()) {
                Some(n) => Arc::clone(n),
                None => {
                    let n: Arc<str> = Arc::from(name);
                    held.names.insert(Arc::clone(&n));
                    n
                }
            })
            .collect()
    }
}

fn asset_class_bit(a: AssetClass) -> u8 {
    1 << (a as u8)
}

fn side_bit(s: Side) -> u8 {
    match s {
        Side::Buy => 1,
        Side::Sell => 2,
    }
}

fn non_empty<T>(v: Option<Vec<T>>, arg: &'static str) -> Result<Option<Vec<T>>, HubError> {
    match v {
        Some(v) if v.is_empty() => Err(HubError::EmptyList { arg }),
        other => Ok(other),
    }
}

impl Filter {
    /// Splits the filter into the instrument index keys and the remaining
    /// checks, with every name shared through `names`.
    fn compile(self, names: &Names) -> Result<(Option<NameList>, Check), HubError> {
        let instruments = non_empty(self.instruments, "instruments")?;
        let venues = non_empty(self.venues, "venues")?;
        let instruments = instruments.map(|v| names.intern(v));
        let check = Check {
            venues: venues.map(|v| names.intern(v)),
            asset_classes: non_empty(self.asset_classes, "assetClasses")?
                .map(|v| v.into_iter().fold(0, |m, a| m | asset_class_bit(a))),
            sides: non_empty(self.sides, "sides")?
                .map(|v| v.into_iter().fold(0, |m, s| m | side_bit(s))),
            entitled_venues: None,
            entitled_classes: None,
        };
        let check = match self.entitled {
            None => check,
            Some(e) => Check {
                entitled_venues: match e.venues {
                    Scope::All => None,
                    Scope::Only(v) => Some(names.intern(v)),
                },
                entitled_classes: match e.asset_classes {
                    Scope::All => None,
                    Scope::Only(v) => Some(v.into_iter().fold(0, |m, a| m | asset_class_bit(a))),
                },
                ..check
            },
        };
        Ok((instruments, check))
    }
}

/// Whether `venue` is in `list`; `None` allows every venue.
fn venue_in(list: &Option<NameList>, venue: &str) -> bool {
    list.as_ref()
        .is_none_or(|v| v.iter().any(|m| m.as_ref() == venue))
}

/// Whether `bit` is set in `mask`; `None` allows everything.
fn bit_in(mask: Option<u8>, bit: u8) -> bool {
    mask.is_none_or(|m| m & bit != 0)
}

impl Check {
    fn matches<T: TickMeta>(&self, t: &T) -> bool {
        let class = asset_class_bit(t.asset_class());
        venue_in(&self.venues, t.venue())
            && bit_in(self.asset_classes, class)
            && t.side()
                .is_none_or(|side| bit_in(self.sides, side_bit(side)))
            && venue_in(&self.entitled_venues, t.venue())
            && bit_in(self.entitled_classes, class)
    }
}

/// How much an unconflated subscription may have queued before it is closed
/// as too slow: both limits hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub events: usize,
    /// Counted by [`TickMeta::weight`].
    pub bytes: usize,
}

/// A limit in events alone.
impl From<usize> for QueueLimits {
    fn from(events: usize) -> Self {
        Self {
            events,
            bytes: usize::MAX,
        }
    }
}

/// Shared between the hub's copy of a subscriber and its [`Feed`].
#[derive(Debug, Default)]
struct SubState {
    overflowed: AtomicBool,
    /// Set with `overflowed` when the byte limit was the one passed.
    over_bytes: AtomicBool,
    /// [`TickMeta::weight`] of the ticks in the queue.
    queued_bytes: AtomicUsize,
}

struct Subscriber<T> {
    id: u64,
    instruments: Option<NameList>,
    check: Arc<Check>,
    sink: Sink<T>,
    state: Arc<SubState>,
}

/// Where the hub puts a subscriber's ticks.
enum Sink<T> {
    /// Every tick, through a bounded queue.
    Queue(mpsc::Sender<Arc<T>>),
    /// Only the latest tick per instrument, which the feed takes at most once per
    /// period: memory bounded by the instruments selected, whatever the rate.
    Conflate(ConflateTx<T>),
}

/// The ticks a conflated feed has not taken yet, newest per instrument (per
/// [`ConflationKey`]), in the order their keys first updated since the last take.
struct Conflation<T> {
    pending: Mutex<Pending<T>>,
    waker: AtomicWaker,
}

struct Pending<T> {
    latest: IndexMap<String, Arc<T>>,
    /// The hub side is gone: once `latest` is taken, the feed ends.
    closed: bool,
}

impl<T> Conflation<T> {
    fn pending(&self) -> MutexGuard<'_, Pending<T>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The hub's end of a [`Conflation`]; dropping it ends the feed, as dropping an
/// mpsc sender does.
struct ConflateTx<T>(Arc<Conflation<T>>, ConflationKey);

impl<T: TickMeta> ConflateTx<T> {
    /// True when `t` replaced a tick the feed had not taken: that one is
    /// conflated away.
    fn put(&self, t: &Arc<T>) -> bool {
        let key = self.1.key_of(t.as_ref());
        let replaced = {
            let mut p = self.0.pending();
            match p.latest.get_mut(key.as_ref()) {
                Some(slot) => {
                    *slot = Arc::clone(t);
                    true
                }
                None => {
                    p.latest.insert(key.into_owned(), Arc::clone(t));
                    false
                }
            }
        };
        self.0.waker.wake();
        replaced
    }
}

impl<T> Drop for ConflateTx<T> {
    fn drop(&mut self) {
        self.0.pending().closed = true;
        self.0.waker.wake();
    }
}

/// Per-batch dispatch counts, logged and counted once per batch.
#[derive(Debug, Default)]
struct Stats {
    delivered: usize,
    overflowed: usize,
    conflated: usize,
}

impl<T> Subscriber<T>
where
    T: TickMeta,
{
    /// Returns false when the subscriber must be removed. `weight` is `t`'s
    /// [`TickMeta::weight`], counted against `max_bytes` if `t` is queued.
    fn offer(&self, t: &Arc<T>, weight: usize, max_bytes: usize, stats: &mut Stats) -> bool {
        if !self.check.matches(t.as_ref()) || self.state.overflowed.load(Ordering::Relaxed) {
            return true;
        }
        let tx = match &self.sink {
            Sink::Queue(tx) => tx,
            Sink::Conflate(c) => {
                stats.conflated += usize::from(c.put(t));
                stats.delivered += 1;
                return true;
            }
        };
        let queued = self.state.queued_bytes.fetch_add(weight, Ordering::Relaxed);
        if queued.saturating_add(weight) > max_bytes {
            self.state.over_bytes.store(true, Ordering::Relaxed);
            self.state.overflowed.store(true, Ordering::Release);
            stats.overflowed += 1;
            return false;
        }
        match tx.try_send(Arc::clone(t)) {
            Ok(()) => {
                stats.delivered += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.state.overflowed.store(true, Ordering::Release);
                stats.overflowed += 1;
                false
            }
            // The feed is being dropped; its guard unregisters it too.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Where a subscriber sits in its [`Index`]: under the narrowest of its
/// filters that a tick's own fields can look up, so that dispatch never scans
/// subscribers whose filter cannot match. Every tick a subscriber's filter
/// matches carries one of the keys it is listed under; its full [`Check`] still
/// runs on each tick looked up.
enum Place<'a> {
    Instruments(&'a [Arc<str>]),
    /// No instruments named: the venues it asks for, else those it is entitled to.
    Venues(&'a [Arc<str>]),
    /// Neither instruments nor venues: the asset classes it asks for and is
    /// entitled to, as a mask.
    Classes(u8),
    Everywhere,
}

impl<T> Subscriber<T> {
    fn place(&self) -> Place<'_> {
        let c = &self.check;
        if let Some(symbols) = &self.instruments {
            return Place::Instruments(symbols);
        }
        if let Some(venues) = c.venues.as_ref().or(c.entitled_venues.as_ref()) {
            return Place::Venues(venues);
        }
        match (c.asset_classes, c.entitled_classes) {
            (None, None) => Place::Everywhere,
            (a, e) => Place::Classes(a.unwrap_or(u8::MAX) & e.unwrap_or(u8::MAX)),
        }
    }
}

const CLASSES: usize = AssetClass::ALL.len();

type Listed<T> = HashMap<Arc<str>, Vec<Arc<Subscriber<T>>>>;

struct Index<T> {
    by_instrument: Listed<T>,
    by_venue: Listed<T>,
    /// By [`AssetClass`] discriminant.
    by_class: [Vec<Arc<Subscriber<T>>>; CLASSES],
    wildcard: Vec<Arc<Subscriber<T>>>,
    by_id: HashMap<u64, Arc<Subscriber<T>>>,
}

impl<T> Default for Index<T> {
    fn default() -> Self {
        Self {
            by_instrument: HashMap::new(),
            by_venue: HashMap::new(),
            by_class: std::array::from_fn(|_| Vec::new()),
            wildcard: Vec::new(),
            by_id: HashMap::new(),
        }
    }
}

/// The asset classes whose bit is set in `mask`.
fn classes_in(mask: u8) -> impl Iterator<Item = usize> {
    (0..CLASSES).filter(move |&i| mask & (1 << i) != 0)
}

fn list<T>(map: &mut Listed<T>, keys: &[Arc<str>], s: &Arc<Subscriber<T>>) {
    for key in keys {
        map.entry(Arc::clone(key)).or_default().push(Arc::clone(s));
    }
}

fn unlist<T>(map: &mut Listed<T>, keys: &[Arc<str>], s: &Arc<Subscriber<T>>) {
    for key in keys {
        if let Some(list) = map.get_mut(key.as_ref()) {
            take_out(list, s);
            if list.is_empty() {
                map.remove(key.as_ref());
            }
        }
    }
    give_back_map(map);
}

/// Removes `s` from `list`. The order of a list does not matter: each
/// subscriber has a queue of its own.
fn take_out<T>(list: &mut Vec<Arc<Subscriber<T>>>, s: &Arc<Subscriber<T>>) {
    if let Some(at) = list.iter().position(|x| Arc::ptr_eq(x, s)) {
        list.swap_remove(at);
    }
    give_back(list);
}

/// Spare room a list or map keeps before it is given back: below it, not
/// worth a reallocation.
const SPARE_MIN: usize = 64;

/// Gives back most of a list's room once it is less than a quarter full, so
/// that what many subscriptions made the index hold is freed when they end.
/// Halving it leaves room to grow again, so each removal costs O(1) amortized.
fn give_back<V>(list: &mut Vec<V>) {
    if list.capacity() > SPARE_MIN && list.len() < list.capacity() / 4 {
        list.shrink_to(list.len() * 2);
    }
}

/// [`give_back`] for a map.
fn give_back_map<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > SPARE_MIN && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

impl<T: TickMeta> Index<T> {
    fn insert(&mut self, s: Arc<Subscriber<T>>) {
        match s.place() {
            Place::Instruments(keys) => list(&mut self.by_instrument, keys, &s),
            Place::Venues(keys) => list(&mut self.by_venue, keys, &s),
            Place::Classes(mask) => {
                for i in classes_in(mask) {
                    self.by_class[i].push(Arc::clone(&s));
                }
            }
            Place::Everywhere => self.wildcard.push(Arc::clone(&s)),
        }
        self.by_id.insert(s.id, s);
    }

    fn remove(&mut self, id: u64) {
        let Some(s) = self.by_id.remove(&id) else {
            return;
        };
        give_back_map(&mut self.by_id);
        match s.place() {
            Place::Instruments(keys) => unlist(&mut self.by_instrument, keys, &s),
            Place::Venues(keys) => unlist(&mut self.by_venue, keys, &s),
            Place::Classes(mask) => {
                for i in classes_in(mask) {
                    take_out(&mut self.by_class[i], &s);
                }
            }
            Place::Everywhere => take_out(&mut self.wildcard, &s),
        }
    }

    /// Offers `t` to the subscribers listed under its instrument, its venue and
    /// its asset class, and to those with none of these filters: each at most
    /// once, since a subscriber is listed under one kind of key only.
    fn deliver(&self, t: &Arc<T>, max_bytes: usize, stats: &mut Stats, dead: &mut Vec<u64>) {
        let weight = t.weight();
        let by_symbol = self.by_instrument.get(t.instrument()).into_iter().flatten();
        let by_venue = self.by_venue.get(t.venue()).into_iter().flatten();
        let by_class = self.by_class[t.asset_class() as usize].iter();
        let candidates = by_symbol
            .chain(by_venue)
            .chain(by_class)
            .chain(self.wildcard.iter());
        for s in candidates {
            if !s.offer(t, weight, max_bytes, stats) {
                dead.push(s.id);
            }
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[derive(Default)]
struct Registry {
    trades: Index<TradeTick>,
    quotes: Index<QuoteTick>,
    /// Set at shutdown: later subscriptions are refused rather than left hanging.
    closed: bool,
}

/// A tick kind the hub indexes subscriptions for.
trait Indexed: TickMeta + Sized + Send + Sync + 'static {
    fn index_mut(r: &mut Registry) -> &mut Index<Self>;
    fn latest_of(l: &Latest) -> Option<&Arc<Self>>;
    /// The tick when it is of this kind.
    fn of(t: Tick) -> Option<Arc<Self>>;
}

impl Indexed for TradeTick {
    fn index_mut(r: &mut Registry) -> &mut Index<Self> {
        &mut r.trades
    }

    fn latest_of(l: &Latest) -> Option<&Arc<Self>> {
        l.trade.as_ref()
    }

    fn of(t: Tick) -> Option<Arc<Self>> {
        match t {
            Tick::Trade(t) => Some(t),
            Tick::Quote(_) => None,
        }
    }
}

impl Indexed for QuoteTick {
    fn index_mut(r: &mut Registry) -> &mut Index<Self> {
        &mut r.quotes
    }

    fn latest_of(l: &Latest) -> Option<&Arc<Self>> {
        l.quote.as_ref()
    }

    fn of(t: Tick) -> Option<Arc<Self>> {
        match t {
            Tick::Quote(q) => Some(q),
            Tick::Trade(_) => None,
        }
    }
}

/// The newest trade and quote the hub has seen for one instrument.
#[derive(Default)]
struct Latest {
    trade: Option<Arc<TradeTick>>,
    quote: Option<Arc<QuoteTick>>,
}

/// Keeps the tick with the greater event time; on a tie the later arrival wins.
/// Event time, not arrival order, so the map agrees with history's "latest".
fn keep_newer<T: TickMeta>(slot: &mut Option<Arc<T>>, t: &Arc<T>) {
    if slot.as_ref().is_none_or(|cur| t.ts() >= cur.ts()) {
        *slot = Some(Arc::clone(t));
    }
}

struct Inner {
    registry: RwLock<Registry>,
    names: Names,
    latest: RwLock<HashMap<String, Latest>>,
    limits: QueueLimits,
    next_id: AtomicU64,
    /// Per shard, the end of the last batch dispatched. Held for the whole of
    /// each dispatch, so batches are dispatched one at a time: that is what makes
    /// resume cursors exact (see [`crate::resume`]). Taken before the registry.
    dispatched: Mutex<Vec<Position>>,
    /// Per shard, the epoch resume cursors carry.
    epochs: RwLock<Arc<[u64]>>,
    /// Where resuming subscriptions read what they missed; `None` for a hub
    /// without readers.
    streams: Option<Streams>,
    /// Readers wait here for their turn to dispatch, asynchronously: waiting on
    /// `dispatched` itself would block a runtime thread for a whole dispatch.
    turn: tokio::sync::Mutex<()>,
    metrics: ApiMetrics,
}

/// The streams a hub reads, for catching up resumed subscriptions.
#[derive(Clone)]
struct Streams {
    con: RedisConn,
    keys: Vec<String>,
    epoch_keys: Vec<String>,
}

impl Inner {
    fn registry(&self) -> RwLockReadGuard<'_, Registry> {
        // Nothing panics while holding these locks except on a bug; the data stays
        // consistent list by list, so keep serving.
        self.registry.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn registry_mut(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn unregister<T: Indexed>(&self, id: u64) {
        T::index_mut(&mut self.registry_mut()).remove(id);
    }

    fn dispatched(&self) -> MutexGuard<'_, Vec<Position>> {
        self.dispatched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn epochs(&self) -> Arc<[u64]> {
        Arc::clone(&self.epochs.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn set_epoch(&self, shard: u16, epoch: u64) {
        let mut epochs = self.epochs.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = epochs.get(usize::from(shard)).copied() {
            if old != epoch {
                tracing::warn!(
                    shard,
                    old,
                    new = epoch,
                    "the shard's epoch changed: Redis lost its streams; earlier resume cursors are expired"
                );
                let mut v = epochs.to_vec();
                v[usize::from(shard)] = epoch;
                *epochs = Arc::from(v);
            }
        }
    }

    /// Hands `ticks` to every matching subscriber and the latest map. `batch` is
    /// the shard they were read from, the position they end at, and the resume
    /// base they share, which gets the positions dispatched before them.
    fn dispatch(&self, batch: Option<(u16, Position, &ResumeBase)>, ticks: &[Tick]) -> Stats {
        let mut stats = Stats::default();
        let mut dead_trades = Vec::new();
        let mut dead_quotes = Vec::new();
        {
            let mut dispatched = self.dispatched();
            if let Some((_, _, base)) = batch {
                base.set(&dispatched);
            }
            let reg = self.registry();
            for t in ticks {
                match t {
                    Tick::Trade(t) => {
                        reg.trades
                            .deliver(t, self.limits.bytes, &mut stats, &mut dead_trades)
                    }
                    Tick::Quote(q) => {
                        reg.quotes
                            .deliver(q, self.limits.bytes, &mut stats, &mut dead_quotes)
                    }
                }
            }
            // Under the registry lock, so that a subscription taking a snapshot
            // (under the write lock) sees each batch either in the latest map and
            // not live, or live and not in the map.
            self.remember_latest(ticks);
            if let Some((shard, end, _)) = batch {
                if let Some(d) = dispatched.get_mut(usize::from(shard)) {
                    *d = end;
                }
            }
        }
        if !dead_trades.is_empty() || !dead_quotes.is_empty() {
            let mut reg = self.registry_mut();
            for id in dead_trades {
                reg.trades.remove(id);
            }
            for id in dead_quotes {
                reg.quotes.remove(id);
            }
        }
        let counts = Dispatched {
            delivered: stats.delivered,
            conflated: stats.conflated,
            overflowed: stats.overflowed,
        };
        self.metrics.dispatched(counts, ticks);
        stats
    }

    fn remember_latest(&self, ticks: &[Tick]) {
        let mut latest = self.latest.write().unwrap_or_else(PoisonError::into_inner);
        for t in ticks {
            let instrument = match t {
                Tick::Trade(t) => t.instrument(),
                Tick::Quote(q) => q.instrument(),
            };
            // Look up by &str first so the key is only allocated for a new symbol.
            let slot = match latest.get_mut(instrument) {
                Some(slot) => slot,
                None => latest.entry(instrument.to_owned()).or_default(),
            };
            match t {
                Tick::Trade(t) => keep_newer(&mut slot.trade, t),
                Tick::Quote(q) => keep_newer(&mut slot.quote, q),
            }
        }
    }

    /// The latest tick of each of `instruments` (every instrument when `None`,
    /// in symbol order) that passes `check`.
    /// Also returns the listed instruments it has no tick of.
    fn snapshot<T: Indexed>(
        &self,
        instruments: Option<&[Arc<str>]>,
        check: &Check,
    ) -> (VecDeque<Arc<T>>, Vec<String>) {
        let latest = self.latest();
        let mut missing = Vec::new();
        let mut picked: Vec<&Arc<T>> = match instruments {
            Some(symbols) => symbols
                .iter()
                .filter_map(|s| {
                    let t = latest.get(s.as_ref()).and_then(T::latest_of);
                    if t.is_none() {
                        missing.push(s.to_string());
                    }
                    t
                })
                .collect(),
            None => {
                let mut all: Vec<&Arc<T>> = latest.values().filter_map(T::latest_of).collect();
                all.sort_unstable_by(|a, b| a.instrument().cmp(b.instrument()));
                all
            }
        };
        picked.retain(|t| check.matches(t.as_ref()));
        (picked.into_iter().cloned().collect(), missing)
    }

    fn latest(&self) -> RwLockReadGuard<'_, HashMap<String, Latest>> {
        self.latest.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn close(&self) {
        let mut reg = self.registry_mut();
        reg.closed = true;
        // Dropping the senders ends every feed, so each subscription completes.
        reg.trades.clear();
        reg.quotes.clear();
    }
}

/// The live stream of one subscription: ticks that match its filter, in stream
/// order per instrument. Ends when the server shuts down; yields one
/// [`HubError::TooSlow`] and ends when its queue overflowed. Dropping it
/// unregisters the subscription.
pub struct Feed<T> {
    /// The snapshot, yielded before anything live.
    initial: VecDeque<Arc<T>>,
    /// Selected instruments the hub had no latest tick of at subscription.
    not_in_snapshot: Vec<String>,
    /// Per instrument, the stream position of a snapshot tick added by
    /// [`Feed::backfill`]: live ticks at or before it are not sent again.
    floors: HashMap<String, Position>,
    /// The resume base of snapshot ticks: where live delivery starts.
    start: Option<Arc<ResumeBase>>,
    check: Arc<Check>,
    rx: Source<T>,
    state: Arc<SubState>,
    hub: Arc<Inner>,
    unregister: fn(&Inner, u64),
    id: u64,
    finished: bool,
}

/// A feed's end of its [`Sink`].
enum Source<T> {
    Queue(mpsc::Receiver<Arc<T>>),
    Conflate {
        from: Arc<Conflation<T>>,
        period: Duration,
        /// Taken at the last period, not yet yielded.
        ready: VecDeque<Arc<T>>,
        /// No take before this fires.
        not_before: Option<Pin<Box<tokio::time::Sleep>>>,
    },
}

/// Where a tick sits in its shard's stream, from its cursor.
fn position(cursor: &str) -> Option<Position> {
    event_position(cursor).map(|(_, p)| p)
}

impl<T: TickMeta> Feed<T> {
    /// Selected instruments that the snapshot lacks: the hub has not seen them
    /// since it started (only set for `snapshot` subscriptions).
    pub fn not_in_snapshot(&self) -> &[String] {
        &self.not_in_snapshot
    }

    /// For a snapshot of every instrument: of `known` (every instrument there
    /// is), those the snapshot lacks become [`Feed::not_in_snapshot`], to be
    /// completed from history.
    pub fn complete_from(&mut self, known: impl IntoIterator<Item = String>) {
        let held: std::collections::HashSet<&str> =
            self.initial.iter().map(|t| t.instrument()).collect();
        let mut missing: Vec<String> = known
            .into_iter()
            .filter(|s| !held.contains(s.as_str()))
            .collect();
        missing.sort_unstable();
        self.not_in_snapshot = missing;
    }

    /// Adds ticks from elsewhere (history) to the snapshot, each the latest of
    /// an instrument in [`Feed::not_in_snapshot`], which is then emptied; ticks
    /// the filters reject are dropped. A live tick of the same instrument at or
    /// before it in the stream (the loader may store an event before the hub
    /// dispatches it) is then not sent.
    pub fn backfill(&mut self, ticks: impl IntoIterator<Item = Arc<T>>) {
        // Only needed to ask history; the feed may live for days.
        self.not_in_snapshot = Vec::new();
        for t in ticks {
            if !self.check.matches(t.as_ref()) {
                continue;
            }
            if let Some((shard, p)) = event_position(t.cursor()) {
                // Live delivery starts after what was dispatched at
                // subscription, so a tick at or before that needs no floor:
                // most do, and a floor is held as long as the feed.
                let live_after = self.start.as_ref().and_then(|s| s.position(shard));
                if live_after.is_none_or(|after| p > after) {
                    self.floors.insert(t.instrument().to_owned(), p);
                }
            }
            let t = match &self.start {
                Some(start) => Arc::new(t.with_resume(Arc::clone(start))),
                None => t,
            };
            self.initial.push_back(t);
        }
    }

    /// False for a live tick that a backfilled one already covers.
    fn is_new(&self, t: &T) -> bool {
        match (self.floors.get(t.instrument()), position(t.cursor())) {
            (Some(floor), Some(p)) => p > *floor,
            _ => true,
        }
    }
}

impl<T> Feed<T> {
    fn too_slow(&mut self) -> Poll<Option<Result<Arc<T>, HubError>>> {
        self.finished = true;
        let limits = self.hub.limits;
        let e = if self.state.over_bytes.load(Ordering::Relaxed) {
            HubError::TooSlowBytes {
                bytes: limits.bytes,
            }
        } else {
            HubError::TooSlow {
                queue: limits.events,
            }
        };
        Poll::Ready(Some(Err(e)))
    }
}

/// Next tick of a conflated feed: what the last take left, else, once the
/// period since that take is over, a new take; `None` when the hub side is gone
/// and nothing is left.
fn poll_conflated<T>(
    from: &Conflation<T>,
    period: Duration,
    ready: &mut VecDeque<Arc<T>>,
    not_before: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Arc<T>>> {
    if let Some(t) = ready.pop_front() {
        return Poll::Ready(Some(t));
    }
    if let Some(sleep) = not_before.as_mut() {
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        *not_before = None;
    }
    // Registered before the take, so a put after it wakes this task.
    from.waker.register(cx.waker());
    let (taken, closed) = {
        let mut p = from.pending();
        (std::mem::take(&mut p.latest), p.closed)
    };
    if taken.is_empty() {
        return if closed {
            Poll::Ready(None)
        } else {
            Poll::Pending
        };
    }
    ready.extend(taken.into_values());
    *not_before = Some(Box::pin(tokio::time::sleep(period)));
    Poll::Ready(ready.pop_front())
}

impl<T: TickMeta> Stream for Feed<T> {
    type Item = Result<Arc<T>, HubError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(t) = self.initial.pop_front() {
            return Poll::Ready(Some(Ok(t)));
        }
        loop {
            match self.as_mut().poll_feed(cx) {
                Poll::Ready(Some(Ok(t))) if !self.floors.is_empty() && !self.is_new(&t) => {}
                other => return other,
            }
        }
    }
}

impl<T: TickMeta> Feed<T> {
    fn poll_feed(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Arc<T>, HubError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        // Checked before the queue: a subscriber that fell behind learns it now,
        // not after reading the stale events still queued.
        if self.state.overflowed.load(Ordering::Acquire) {
            return self.too_slow();
        }
        let this = &mut *self;
        let polled = match &mut this.rx {
            Source::Queue(rx) => {
                let polled = rx.poll_recv(cx);
                if let Poll::Ready(Some(t)) = &polled {
                    this.state
                        .queued_bytes
                        .fetch_sub(t.weight(), Ordering::Relaxed);
                }
                polled
            }
            Source::Conflate {
                from,
                period,
                ready,
                not_before,
            } => poll_conflated(from, *period, ready, not_before, cx),
        };
        match polled {
            Poll::Ready(Some(t)) => Poll::Ready(Some(Ok(t))),
            Poll::Ready(None) if self.state.overflowed.load(Ordering::Acquire) => self.too_slow(),
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T> Drop for Feed<T> {
    fn drop(&mut self) {
        (self.unregister)(&self.hub, self.id);
    }
}

/// A resumed subscription: what it missed, then live.
pub type Resumed<T> = BoxStream<'static, Result<Arc<T>, HubError>>;

/// Entries per catch-up read; an entry holds up to 256 events.
const CATCHUP_PAGE: usize = 64;

/// What a catch-up step yields.
enum Chunk<T> {
    Ticks(Vec<Arc<T>>),
    Live(Box<Feed<T>>),
}

/// A resuming subscription's reads of what it missed.
struct Catchup<T> {
    hub: Hub,
    con: RedisConn,
    keys: Vec<String>,
    epochs: Arc<[u64]>,
    /// Per shard, what has been sent.
    positions: Vec<Position>,
    instruments: Option<std::collections::HashSet<Arc<str>>>,
    check: Check,
    /// Registered with the hub once caught up.
    filter: Option<Filter>,
    /// Per shard, where the reads stop: `None` while following the hub's
    /// dispatch, then where the registered feed's live delivery starts.
    until: Option<Vec<Position>>,
    /// The shard being read.
    shard: usize,
    feed: Option<Feed<T>>,
    done: bool,
}

impl<T: Indexed> Catchup<T> {
    async fn next(mut self) -> Option<(Result<Chunk<T>, HubError>, Self)> {
        if self.done {
            return None;
        }
        loop {
            if self.shard == self.positions.len() {
                if self.until.is_some() {
                    self.done = true;
                    let feed = self.feed.take()?;
                    return Some((Ok(Chunk::Live(Box::new(feed))), self));
                }
                // Caught up with what the hub had dispatched: register, then read
                // what it dispatched meanwhile, up to where live delivery starts.
                let filter = self.filter.take()?;
                match self.hub.subscribe_at::<T>(filter) {
                    Ok((feed, started)) => {
                        self.feed = Some(feed);
                        self.until = Some(started);
                        self.shard = 0;
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some((Err(e), self));
                    }
                }
            }
            match self.page().await {
                Ok(ticks) if ticks.is_empty() => continue,
                Ok(ticks) => return Some((Ok(Chunk::Ticks(ticks)), self)),
                Err(e) => {
                    self.done = true;
                    return Some((Err(streams_error(e)), self));
                }
            }
        }
    }

    /// One read of the current shard; moves to the next shard once it is
    /// caught up.
    async fn page(&mut self) -> redis::RedisResult<Vec<Arc<T>>> {
        let s = self.shard;
        let from = self.positions[s];
        let until = match &self.until {
            Some(u) => u.get(s).copied(),
            None => self.hub.inner.dispatched().get(s).copied(),
        };
        let Some(until) = until.filter(|u| from < *u) else {
            self.shard += 1;
            return Ok(Vec::new());
        };
        // A position inside an entry reads that entry again for the rest of it.
        let start = if from.2 == WHOLE_ENTRY {
            format!("({}", entry_id(from))
        } else {
            entry_id(from)
        };
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&self.keys[s])
            .arg(start)
            .arg(entry_id(until))
            .arg("COUNT")
            .arg(CATCHUP_PAGE)
            .query_async(&mut self.con)
            .await?;
        let entries = parse_entries(reply).map_err(reply_error)?;
        if entries.len() < CATCHUP_PAGE {
            self.shard += 1;
        }
        let Some(last) = entries.last() else {
            return Ok(Vec::new());
        };
        let end = parse_position(&last.id)
            .ok_or_else(|| reply_error(format!("bad entry id {:?}", last.id)))?;
        let base = Arc::new(ResumeBase::page(
            Arc::clone(&self.epochs),
            u16::try_from(s).unwrap_or(u16::MAX),
            &self.positions,
        ));
        let mut decoded = Decoded::default();
        decoded.add(u16::try_from(s).unwrap_or(u16::MAX), entries, &base);
        if let Some(error) = &decoded.first_error {
            tracing::warn!(
                shard = s,
                bad = decoded.bad,
                error,
                "catch-up skipped undecodable enriched entries"
            );
        }
        self.positions[s] = end;
        Ok(decoded
            .ticks
            .into_iter()
            .filter_map(T::of)
            .filter(|t| {
                position(t.cursor()).is_some_and(|p| p > from)
                    && self
                        .instruments
                        .as_ref()
                        .is_none_or(|set| set.contains(t.instrument()))
                    && self.check.matches(t.as_ref())
            })
            .collect())
    }
}

fn streams_error(e: redis::RedisError) -> HubError {
    HubError::Streams(e.to_string())
}

/// Handle to the process's fan-out hub; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("subscribers", &self.subscribers())
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl Hub {
    /// A hub with no readers: it serves subscriptions and the latest-value map,
    /// fed through [`Hub::publish`]. [`Hub::start`] is what a server uses.
    pub fn new(limits: impl Into<QueueLimits>) -> Self {
        Self::with_streams(limits.into(), Vec::new(), Vec::new(), None)
    }

    fn with_streams(
        limits: QueueLimits,
        dispatched: Vec<Position>,
        epochs: Vec<u64>,
        streams: Option<Streams>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry: RwLock::new(Registry::default()),
                names: Names::default(),
                latest: RwLock::new(HashMap::new()),
                limits: QueueLimits {
                    // tokio's bounded channel refuses a capacity of zero.
                    events: limits.events.max(1),
                    bytes: limits.bytes,
                },
                next_id: AtomicU64::new(0),
                dispatched: Mutex::new(dispatched),
                epochs: RwLock::new(Arc::from(epochs)),
                streams,
                turn: tokio::sync::Mutex::new(()),
                metrics: ApiMetrics::default(),
            }),
        }
    }

    /// Starts one reader per enriched shard of `layout`, each on its own
    /// connection, and returns once every reader knows where the stream ends now:
    /// anything added after `start` returns is delivered. Readers stop, and every
    /// feed ends, when `shutdown` is cancelled; `tasks` tracks them.
    pub async fn start(
        client: impl Into<RedisTarget>,
        layout: &StreamLayout,
        limits: impl Into<QueueLimits>,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Self, redis::RedisError> {
        let client = client.into();
        let mut catchup = client
            .connect(ConnOpts {
                connect_timeout: Some(CONNECT_TIMEOUT),
                response_timeout: Some(READ_DEADLINE),
            })
            .await?;
        let mut readers = Vec::new();
        let (mut ends, mut epochs) = (Vec::new(), Vec::new());
        for shard in layout.shard_ids() {
            let key = layout.enriched(shard);
            let name = reader_name(layout.prefix(), shard);
            let mut con = connect(&client, &name).await?;
            // An explicit id instead of `$`: entries added between two XREADs
            // from `$` would be skipped.
            let last_id = stream_end(&mut con, &key).await?;
            ends.push(parse_position(&last_id).ok_or_else(|| {
                reply_error(format!("bad entry id {last_id:?} at the end of {key}"))
            })?);
            epochs.push(epoch(&mut catchup, &layout.epoch(shard)).await?);
            readers.push((key, name, last_id, con));
        }
        let streams = Streams {
            con: catchup,
            keys: layout.shard_ids().map(|s| layout.enriched(s)).collect(),
            epoch_keys: layout.shard_ids().map(|s| layout.epoch(s)).collect(),
        };
        let hub = Self::with_streams(limits.into(), ends, epochs, Some(streams));
        for ((key, name, last_id, con), shard) in readers.into_iter().zip(layout.shard_ids()) {
            let reader = Reader {
                hub: Arc::clone(&hub.inner),
                client: client.clone(),
                shard,
                key,
                epoch_key: layout.epoch(shard),
                name,
                last_id,
            };
            tasks.spawn(reader.run(con, shutdown.clone()));
        }
        let inner = Arc::clone(&hub.inner);
        tasks.spawn(async move {
            shutdown.cancelled().await;
            inner.close();
        });
        Ok(hub)
    }

    pub fn subscribe_trades(&self, filter: Filter) -> Result<Feed<TradeTick>, HubError> {
        self.subscribe(filter)
    }

    pub fn subscribe_quotes(&self, filter: Filter) -> Result<Feed<QuoteTick>, HubError> {
        self.subscribe(Filter {
            sides: None,
            ..filter
        })
    }

    fn subscribe<T: Indexed>(&self, filter: Filter) -> Result<Feed<T>, HubError> {
        self.subscribe_at(filter).map(|(feed, _)| feed)
    }

    /// Trades matching `filter` after the resume cursor `after`, then live ones.
    pub async fn resume_trades(
        &self,
        filter: Filter,
        after: &str,
    ) -> Result<Resumed<TradeTick>, HubError> {
        self.resume(filter, after).await
    }

    /// Quotes matching `filter` after the resume cursor `after`, then live ones.
    pub async fn resume_quotes(
        &self,
        filter: Filter,
        after: &str,
    ) -> Result<Resumed<QuoteTick>, HubError> {
        self.resume(
            Filter {
                sides: None,
                ..filter
            },
            after,
        )
        .await
    }

    /// Checks that the streams still hold everything after `after` (same
    /// epochs, not trimmed past it), then returns a stream of what the filter
    /// selects after it: read from the streams up to what the hub has dispatched,
    /// then registered with the hub, the few entries dispatched meanwhile read
    /// too, then live.
    async fn resume<T: Indexed>(
        &self,
        filter: Filter,
        after: &str,
    ) -> Result<Resumed<T>, HubError> {
        let streams = self.inner.streams.clone().ok_or(HubError::NoStreams)?;
        let shards = u16::try_from(streams.keys.len()).unwrap_or(u16::MAX);
        let cursor = ResumeCursor::parse(after, shards)?;
        let mut con = streams.con.clone();
        for ((shard, (want, at)), (key, epoch_key)) in (0u16..)
            .zip(&cursor.shards)
            .zip(streams.keys.iter().zip(&streams.epoch_keys))
        {
            let now = epoch(&mut con, epoch_key).await.map_err(streams_error)?;
            if now != *want {
                return Err(HubError::CursorExpired {
                    shard,
                    why: "was reset since (Redis lost it)",
                });
            }
            if !holds_after(&mut con, key, *at)
                .await
                .map_err(streams_error)?
            {
                return Err(HubError::CursorExpired {
                    shard,
                    why: "has been trimmed past it",
                });
            }
        }
        let (instruments, check) = filter.clone().compile(&self.inner.names)?;
        let catchup = Catchup {
            hub: self.clone(),
            con,
            keys: streams.keys,
            epochs: cursor.shards.iter().map(|(e, _)| *e).collect(),
            positions: cursor.shards.iter().map(|(_, p)| *p).collect(),
            instruments: instruments.map(|v| v.into_vec().into_iter().collect()),
            check,
            filter: Some(filter),
            until: None,
            shard: 0,
            feed: None,
            done: false,
        };
        let chunks = futures_util::stream::unfold(catchup, Catchup::next);
        Ok(chunks
            .flat_map(|chunk| match chunk {
                Ok(Chunk::Ticks(ticks)) => {
                    futures_util::stream::iter(ticks.into_iter().map(Ok)).boxed()
                }
                Ok(Chunk::Live(feed)) => feed.boxed(),
                Err(e) => futures_util::stream::once(std::future::ready(Err(e))).boxed(),
            })
            .boxed())
    }

    /// Registers a subscription; also returns, per shard, the position live
    /// delivery starts after.
    fn subscribe_at<T: Indexed>(
        &self,
        filter: Filter,
    ) -> Result<(Feed<T>, Vec<Position>), HubError> {
        let (max_rate, snapshot) = (filter.max_rate, filter.snapshot);
        let (instruments, check) = filter.compile(&self.inner.names)?;
        let (sink, rx) = match max_rate {
            None => {
                let (tx, rx) = mpsc::channel(self.inner.limits.events);
                (Sink::Queue(tx), Source::Queue(rx))
            }
            Some(rate) => {
                let c = Arc::new(Conflation {
                    pending: Mutex::new(Pending {
                        latest: IndexMap::new(),
                        closed: false,
                    }),
                    waker: AtomicWaker::new(),
                });
                let source = Source::Conflate {
                    from: Arc::clone(&c),
                    period: rate.period(),
                    ready: VecDeque::new(),
                    not_before: None,
                };
                (Sink::Conflate(ConflateTx(c, rate.key)), source)
            }
        };
        let state = Arc::new(SubState::default());
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let check = Arc::new(check);
        let (mut initial, not_in_snapshot, started);
        {
            // Dispatch is held off by both locks, taken in dispatch's order.
            let dispatched = self.inner.dispatched();
            let mut reg = self.inner.registry_mut();
            if reg.closed {
                return Err(HubError::ShuttingDown);
            }
            started = dispatched.clone();
            // Taken with dispatch locked out, and registered before it resumes.
            (initial, not_in_snapshot) = if snapshot {
                self.inner.snapshot::<T>(instruments.as_deref(), &check)
            } else {
                (VecDeque::new(), Vec::new())
            };
            T::index_mut(&mut reg).insert(Arc::new(Subscriber {
                id,
                instruments,
                check: Arc::clone(&check),
                sink,
                state: Arc::clone(&state),
            }));
        }
        // Resuming after a snapshot tick means resuming where live began.
        let start = (!started.is_empty())
            .then(|| Arc::new(ResumeBase::fixed(self.inner.epochs(), &started)));
        if let Some(start) = &start {
            for t in initial.iter_mut() {
                *t = Arc::new(t.with_resume(Arc::clone(start)));
            }
        }
        let feed = Feed {
            initial,
            not_in_snapshot,
            floors: HashMap::new(),
            start,
            check,
            rx,
            state,
            hub: Arc::clone(&self.inner),
            unregister: Inner::unregister::<T>,
            id,
            finished: false,
        };
        Ok((feed, started))
    }

    /// Dispatches ticks as a reader does: to matching feeds and the latest map.
    pub fn publish(&self, ticks: &[Tick]) {
        self.inner.dispatch(None, ticks);
    }

    /// Live subscriptions, trades and quotes together.
    pub fn subscribers(&self) -> usize {
        let (trades, quotes) = self.subscriber_counts();
        trades + quotes
    }

    /// Live subscriptions: trades, quotes.
    pub fn subscriber_counts(&self) -> (usize, usize) {
        let reg = self.inner.registry();
        (reg.trades.by_id.len(), reg.quotes.by_id.len())
    }

    /// What the hub counts (see [`crate::metrics`]).
    pub fn metrics(&self) -> &ApiMetrics {
        &self.inner.metrics
    }

    /// The enriched stream keys the readers read, by shard; `None` for a hub
    /// without readers.
    pub fn stream_keys(&self) -> Option<Vec<String>> {
        self.inner.streams.as_ref().map(|s| s.keys.clone())
    }

    /// Per shard, the end of the last batch dispatched.
    pub fn dispatched_positions(&self) -> Vec<Position> {
        self.inner.dispatched().clone()
    }

    pub fn latest_trades(&self, instruments: &[String]) -> Vec<Option<Arc<TradeTick>>> {
        let latest = self.inner.latest();
        instruments
            .iter()
            .map(|s| latest.get(s).and_then(|l| l.trade.clone()))
            .collect()
    }

    pub fn latest_quotes(&self, instruments: &[String]) -> Vec<Option<Arc<QuoteTick>>> {
        let latest = self.inner.latest();
        instruments
            .iter()
            .map(|s| latest.get(s).and_then(|l| l.quote.clone()))
            .collect()
    }
}

/// The Redis client name of a shard's reader, so `CLIENT LIST` shows who blocks.
pub fn reader_name(prefix: &str, shard: u16) -> String {
    format!("{prefix}-hub-{shard}")
}

async fn connect(client: &RedisTarget, name: &str) -> redis::RedisResult<RedisConn> {
    // A connection of its own with no response timeout: XREAD BLOCK holds it for
    // up to READ_BLOCK_MS, which would stall or trip a shared connection.
    let mut con = client
        .connect(ConnOpts {
            connect_timeout: Some(CONNECT_TIMEOUT),
            response_timeout: None,
        })
        .await?;
    // Only a convenience for operators; a server that refuses it still serves XREAD.
    if let Err(e) = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query_async::<()>(&mut con)
        .await
    {
        tracing::debug!(error = %e, name, "cannot name the hub reader connection");
    }
    Ok(con)
}

/// The id of the stream's newest entry, or `0-0` when it is empty or missing.
async fn stream_end(con: &mut RedisConn, key: &str) -> redis::RedisResult<String> {
    let reply: redis::Value = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(con)
        .await?;
    let entries = parse_entries(reply).map_err(reply_error)?;
    Ok(entries
        .into_iter()
        .next()
        .map_or_else(|| "0-0".to_owned(), |e| e.id))
}

/// Whether the stream still holds every entry after `at`: its first entry is
/// at or before it, or, when it is empty, nothing was ever added after it.
async fn holds_after(con: &mut RedisConn, key: &str, at: Position) -> redis::RedisResult<bool> {
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(con)
        .await?;
    let entries = parse_entries(reply).map_err(reply_error)?;
    if let Some(first) = entries.first() {
        let first = parse_position(&first.id)
            .ok_or_else(|| reply_error(format!("bad entry id {:?}", first.id)))?;
        return Ok((first.0, first.1) <= (at.0, at.1));
    }
    // Empty: trimmed to nothing, or never written (no key at all).
    let info: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(con)
        .await;
    let info = match info {
        Ok(v) => v,
        // No such key: never written.
        Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => return Ok(true),
        Err(e) => return Err(e),
    };
    let fields: Vec<(String, redis::Value)> = match info {
        redis::Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => redis::from_redis_value_ref::<String>(k)
                    .ok()
                    .map(|k| (k, v.clone())),
                _ => None,
            })
            .collect(),
        redis::Value::Map(items) => items
            .into_iter()
            .filter_map(|(k, v)| {
                redis::from_redis_value_ref::<String>(&k)
                    .ok()
                    .map(|k| (k, v))
            })
            .collect(),
        other => return Err(reply_error(format!("unexpected XINFO reply {other:?}"))),
    };
    let last = fields
        .iter()
        .find(|(k, _)| k == "last-generated-id")
        .and_then(|(_, v)| redis::from_redis_value_ref::<String>(v).ok())
        .and_then(|id| parse_position(&id))
        .ok_or_else(|| reply_error("XINFO STREAM without last-generated-id".into()))?;
    Ok((last.0, last.1) <= (at.0, at.1))
}

/// The epoch at `key`, made (the current Unix time in milliseconds) when it
/// is missing; one round trip.
async fn epoch(con: &mut RedisConn, key: &str) -> redis::RedisResult<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let old: Option<u64> = redis::cmd("SET")
        .arg(key)
        .arg(now)
        .arg("NX")
        .arg("GET")
        .query_async(con)
        .await?;
    Ok(old.unwrap_or(now))
}

fn reply_error(msg: String) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected stream reply",
        msg,
    ))
}

/// Reads one enriched shard for the hub.
struct Reader {
    hub: Arc<Inner>,
    client: RedisTarget,
    shard: u16,
    key: String,
    epoch_key: String,
    name: String,
    /// The last entry handed to the hub; reads resume after it, also after a
    /// reconnect, so a Redis blip loses nothing the stream still holds.
    last_id: String,
}

/// How a read step ended.
enum Step {
    Read,
    Shutdown,
}

/// Ticks decoded from stream entries, and what could not be.
#[derive(Default)]
struct Decoded {
    ticks: Vec<Tick>,
    entries: usize,
    bad: usize,
    first_error: Option<String>,
}

impl Decoded {
    /// Decodes `list`, entries of `shard`, into ticks sharing `base`.
    fn add(&mut self, shard: u16, list: Vec<StreamEntry>, base: &Arc<ResumeBase>) {
        for entry in list {
            self.entries += 1;
            let decoded = match entry.record.as_deref() {
                Some(bytes) => decode_entry::<EnrichedRecord>(bytes)
                    .map(|recs| (is_batch(bytes), recs))
                    .map_err(|e| e.to_string()),
                None => Err("entry has no record field".to_owned()),
            };
            match decoded {
                Ok((batch, recs)) => {
                    self.ticks.reserve(recs.len());
                    for (i, r) in recs.into_iter().enumerate() {
                        let at = event_cursor(shard, &entry.id, i, batch);
                        match Tick::from_record(at, Some(Arc::clone(base)), r) {
                            Ok(t) => self.ticks.push(t),
                            Err(e) => self.fail(e.to_string()),
                        }
                    }
                }
                Err(e) => self.fail(e),
            }
        }
    }

    fn fail(&mut self, e: String) {
        self.bad += 1;
        self.first_error.get_or_insert(e);
    }
}

impl Reader {
    /// A new connection, and the shard's epoch read again: Redis may have
    /// restarted without its data.
    async fn reconnect(&self) -> redis::RedisResult<RedisConn> {
        let mut c = connect(&self.client, &self.name).await?;
        let e = epoch(&mut c, &self.epoch_key).await?;
        self.hub.set_epoch(self.shard, e);
        Ok(c)
    }

    async fn run(mut self, con: RedisConn, shutdown: CancellationToken) {
        let mut con = Some(con);
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut c = match con.take() {
                Some(c) => c,
                None => {
                    let connected = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        c = self.reconnect() => c,
                    };
                    match connected {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(shard = self.shard, error = %e, ?backoff, "hub reader cannot connect; retrying");
                            if sleep_or_shutdown(&shutdown, &mut backoff).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            match self.step(&mut c, &shutdown).await {
                Ok(Step::Read) => {
                    backoff = BACKOFF_MIN;
                    con = Some(c);
                }
                Ok(Step::Shutdown) => return,
                Err(e) => {
                    tracing::warn!(shard = self.shard, key = %self.key, error = %e, ?backoff, "hub reader failed; reconnecting");
                    if sleep_or_shutdown(&shutdown, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// One XREAD and the dispatch of what it returned.
    async fn step(
        &mut self,
        con: &mut RedisConn,
        shutdown: &CancellationToken,
    ) -> redis::RedisResult<Step> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(READ_BLOCK_MS)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last_id);
        let reply: redis::Value = tokio::select! {
            // Nothing is in flight while waiting: a reader holds no batch to finish.
            _ = shutdown.cancelled() => return Ok(Step::Shutdown),
            r = tokio::time::timeout(READ_DEADLINE, cmd.query_async(con)) => match r {
                Ok(r) => r?,
                Err(_) => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "XREAD got no reply in time",
                    )))
                }
            },
        };
        let streams = parse_read_reply(reply).map_err(reply_error)?;
        if streams.iter().all(|(_, list)| list.is_empty()) {
            return Ok(Step::Read);
        }
        // One span per batch read, decoded and dispatched; never per event.
        let span = tracing::info_span!("batch", stage = "hub", shard = self.shard);
        let base = Arc::new(ResumeBase::batch(self.hub.epochs(), self.shard));
        let mut decoded = Decoded::default();
        span.in_scope(|| {
            for (_, list) in streams {
                if let Some(last) = list.last() {
                    self.last_id.clone_from(&last.id);
                }
                decoded.add(self.shard, list, &base);
            }
        });
        let Decoded {
            ticks,
            entries,
            bad,
            first_error,
        } = decoded;
        if entries == 0 {
            return Ok(Step::Read);
        }
        let end = parse_position(&self.last_id)
            .ok_or_else(|| reply_error(format!("bad entry id {:?}", self.last_id)))?;
        // Readers take turns without blocking a runtime thread: the dispatch lock
        // itself is then free when taken, except against a new subscription.
        let dispatch = async {
            let _turn = self.hub.turn.lock().await;
            self.hub.dispatch(Some((self.shard, end, &base)), &ticks)
        };
        // Not imported: `Instrument::instrument` would shadow `TickMeta::instrument`.
        let stats = tracing::Instrument::instrument(dispatch, span.clone()).await;
        let _in_batch = span.enter();
        if let Some(error) = first_error {
            tracing::warn!(
                shard = self.shard,
                bad,
                error,
                "hub skipped undecodable enriched entries"
            );
        }
        if stats.overflowed > 0 {
            tracing::warn!(
                shard = self.shard,
                overflowed = stats.overflowed,
                queue = self.hub.limits.events,
                queue_bytes = self.hub.limits.bytes,
                "closed subscribers whose queue was full"
            );
        }
        tracing::debug!(
            shard = self.shard,
            entries,
            delivered = stats.delivered,
            last_id = %self.last_id,
            "hub batch"
        );
        Ok(Step::Read)
    }
}

/// Sleeps for the back-off, doubling it; true when shutdown came first.
async fn sleep_or_shutdown(shutdown: &CancellationToken, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{FutureExt, StreamExt};
    use rust_decimal::Decimal;
    use tickgraph_ingest::event::{Header, Mic, Source, Symbol};
    use tickgraph_ingest::{Quote, Timestamp, Trade};

    use super::*;
    use crate::tick::cursor;

    fn header(instrument: &str, venue: &str, seq: u64, ts: i64) -> Header {
        Header {
            source: Source::parse("s").expect("source"),
            seq,
            instrument: Symbol::parse(instrument).expect("symbol"),
            venue: Mic::parse(venue).expect("mic"),
            ts: Timestamp::from_nanos_unchecked(ts),
        }
    }

    fn trade(instrument: &str, venue: &str, seq: u64, side: Side, ac: AssetClass) -> Tick {
        Tick::Trade(Arc::new(TradeTick {
            cursor: cursor(0, &format!("{seq}-0")),
            trade: Trade {
                header: header(instrument, venue, seq, seq as i64),
                price: Decimal::ONE,
                qty: Decimal::ONE,
                side,
                trade_id: None,
                account: None,
            },
            notional: Decimal::ONE,
            notional_usd: Decimal::ONE,
            asset_class: ac,
            currency: "USD".into(),
            ingest_ns: 0,
            enriched_ns: 0,
            resume: None,
            json: Default::default(),
        }))
    }

    fn quote(instrument: &str, seq: u64, ts: i64) -> Tick {
        Tick::Quote(Arc::new(QuoteTick {
            cursor: cursor(0, &format!("{seq}-0")),
            quote: Quote {
                header: header(instrument, "XNAS", seq, ts),
                bid: Decimal::ONE,
                ask: Decimal::TWO,
                bid_size: Decimal::ONE,
                ask_size: Decimal::ONE,
            },
            mid: Decimal::ONE,
            spread: Decimal::ONE,
            asset_class: AssetClass::Equity,
            currency: "USD".into(),
            ingest_ns: 0,
            enriched_ns: 0,
            resume: None,
            json: Default::default(),
        }))
    }

    /// An index's keys, each with how many subscribers it lists, sorted.
    fn listed<V>(map: &HashMap<Arc<str>, Vec<V>>) -> Vec<(&str, usize)> {
        let mut keys: Vec<_> = map.iter().map(|(k, l)| (k.as_ref(), l.len())).collect();
        keys.sort_unstable();
        keys
    }

    /// Seqs of everything queued for the feed right now.
    fn drain<T: TickMeta>(feed: &mut Feed<T>) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Some(Some(Ok(t))) = feed.next().now_or_never() {
            seqs.push(t.header().seq);
        }
        seqs
    }

    fn strings(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| (*s).to_owned()).collect())
    }

    fn conflated(per_second: f64) -> Filter {
        Filter {
            max_rate: Some(MaxRate::per_second(per_second).expect("rate")),
            ..Filter::default()
        }
    }

    /// `(instrument, seq)` of a feed's next tick, waiting (in paused time) for it.
    async fn next_quote(feed: &mut Feed<QuoteTick>) -> (String, u64) {
        let t = feed.next().await.expect("feed open").expect("not too slow");
        (t.instrument().to_owned(), t.header().seq)
    }

    #[tokio::test(start_paused = true)]
    async fn a_conflated_feed_gets_the_latest_per_instrument_at_most_once_per_period() {
        let hub = Hub::new(4);
        let mut feed = hub.subscribe_quotes(conflated(2.0)).expect("subscribe");
        let mut every = hub
            .subscribe_quotes(Filter {
                instruments: strings(&["B"]),
                ..Filter::default()
            })
            .expect("subscribe");
        // Far more than the queue of 4 holds, without the feed reading.
        for seq in 1..=100 {
            hub.publish(&[quote("A", seq, seq as i64)]);
            if seq % 10 == 0 {
                hub.publish(&[quote("B", 1000 + seq, seq as i64)]);
            }
        }
        let start = tokio::time::Instant::now();
        assert_eq!(next_quote(&mut feed).await, ("A".into(), 100));
        assert_eq!(next_quote(&mut feed).await, ("B".into(), 1100));
        assert_eq!(start.elapsed(), Duration::ZERO, "the first take is at once");
        // The unconflated feed of the same queue size fell behind.
        assert!(matches!(
            every.next().await,
            Some(Err(HubError::TooSlow { queue: 4 }))
        ));

        // Updates within the period: only the newest goes out, at its end.
        hub.publish(&[quote("B", 2000, 200)]);
        hub.publish(&[quote("B", 2001, 201)]);
        assert_eq!(next_quote(&mut feed).await, ("B".into(), 2001));
        assert_eq!(start.elapsed(), Duration::from_millis(500));

        // Quiet for longer than a period: the next update goes out at once.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let quiet = tokio::time::Instant::now();
        hub.publish(&[quote("A", 300, 300)]);
        assert_eq!(next_quote(&mut feed).await, ("A".into(), 300));
        assert_eq!(quiet.elapsed(), Duration::ZERO);

        // Shutdown: what is pending still goes out, then the feed ends.
        hub.publish(&[quote("A", 301, 301)]);
        hub.inner.close();
        assert_eq!(next_quote(&mut feed).await, ("A".into(), 301));
        assert!(feed.next().await.is_none());
    }

    /// `conflateBy`: one latest value per combination of the fields named,
    /// where per instrument alone the last venue's would replace the others.
    #[tokio::test(start_paused = true)]
    async fn a_conflated_feed_keeps_the_latest_per_key_it_names() {
        let hub = Hub::new(4);
        let per = |fields: &[ConflationField]| Filter {
            max_rate: Some(
                MaxRate::per_second(1.0)
                    .expect("rate")
                    .per(ConflationKey::of(fields).expect("key")),
            ),
            ..Filter::default()
        };
        let mut by_instrument = hub.subscribe_trades(conflated(1.0)).expect("subscribe");
        let mut by_venue = hub
            .subscribe_trades(per(&[ConflationField::Instrument, ConflationField::Venue]))
            .expect("subscribe");
        let mut by_side = hub
            .subscribe_trades(per(&[ConflationField::Side]))
            .expect("subscribe");
        let eq = AssetClass::Equity;
        hub.publish(&[
            trade("A", "XNAS", 1, Side::Buy, eq),
            trade("A", "ARCX", 2, Side::Buy, eq),
            trade("A", "XNAS", 3, Side::Sell, eq),
            trade("B", "XNAS", 4, Side::Buy, eq),
        ]);
        // In the order each key first updated, its newest tick.
        assert_eq!(drain(&mut by_instrument), [3, 4]);
        assert_eq!(drain(&mut by_venue), [3, 2, 4]);
        assert_eq!(drain(&mut by_side), [4, 3]);

        assert_eq!(
            ConflationKey::of(&[]).err(),
            Some(HubError::EmptyList { arg: "conflateBy" })
        );
        assert_eq!(
            ConflationKey::of(&[ConflationField::Instrument, ConflationField::Instrument]),
            Ok(ConflationKey::INSTRUMENT)
        );
    }

    #[test]
    fn a_snapshot_holds_the_latest_of_each_selected_instrument_that_matches() {
        let hub = Hub::new(100);
        hub.publish(&[
            trade("A", "XNAS", 1, Side::Buy, AssetClass::Equity),
            trade("A", "XNAS", 2, Side::Sell, AssetClass::Equity),
            trade("B", "XLON", 3, Side::Buy, AssetClass::Equity),
            trade("C", "XNAS", 4, Side::Buy, AssetClass::Etf),
        ]);
        let mut chosen = hub
            .subscribe_trades(Filter {
                instruments: strings(&["A", "B", "Z"]),
                snapshot: true,
                ..Filter::default()
            })
            .expect("subscribe");
        let mut nasdaq = hub
            .subscribe_trades(Filter {
                venues: strings(&["XNAS"]),
                snapshot: true,
                ..Filter::default()
            })
            .expect("subscribe");
        let mut live_only = hub.subscribe_trades(Filter::default()).expect("subscribe");
        hub.publish(&[trade("A", "XNAS", 5, Side::Buy, AssetClass::Equity)]);
        assert_eq!(drain(&mut chosen), vec![2, 3, 5]);
        assert_eq!(drain(&mut nasdaq), vec![2, 4, 5], "symbol order, then live");
        assert_eq!(drain(&mut live_only), vec![5]);
    }

    #[test]
    fn a_backfilled_snapshot_tick_is_not_sent_again_live() {
        let hub = Hub::new(100);
        let mut feed = hub
            .subscribe_quotes(Filter {
                instruments: strings(&["A"]),
                snapshot: true,
                ..Filter::default()
            })
            .expect("subscribe");
        assert_eq!(feed.not_in_snapshot(), ["A".to_owned()]);
        // From history: stored by the loader before the hub dispatched it.
        let Tick::Quote(stored) = quote("A", 5, 5) else {
            unreachable!()
        };
        feed.backfill([stored]);
        hub.publish(&[quote("A", 4, 4), quote("A", 5, 5), quote("A", 6, 6)]);
        assert_eq!(drain(&mut feed), vec![5, 6]);
    }

    /// Feeds subscribing while a publisher runs: each gets its snapshot's seq,
    /// then every later one, with no gap and no repeat. The feeds subscribe at
    /// staggered points of the run (one after every `K` publishes) while the
    /// publisher keeps going, so that the snapshot/live handover happens
    /// mid-stream, against concurrent dispatch, even on a busy machine.
    #[test]
    fn a_snapshot_then_live_has_no_gap_and_no_repeat() {
        const N: u64 = 20_000;
        const K: u64 = 100;
        /// How many chunks of `K` the publisher may run ahead of the feeds.
        const AHEAD: u64 = 2;
        let hub = Hub::new(N as usize);
        let snapshot = || Filter {
            snapshot: true,
            ..Filter::default()
        };
        let published = Arc::new(AtomicU64::new(0));
        let subscribed = Arc::new(AtomicU64::new(0));
        // Before the first publish: an empty snapshot, then every seq.
        let mut feeds = vec![(0, hub.subscribe_quotes(snapshot()).expect("subscribe"))];
        let publisher = {
            let hub = hub.clone();
            let (published, subscribed) = (Arc::clone(&published), Arc::clone(&subscribed));
            std::thread::spawn(move || {
                for seq in 1..=N {
                    // Never far ahead of the feeds, so that they do subscribe
                    // mid-run; but not waiting for the feed due now either, which
                    // subscribes while this thread goes on publishing.
                    let chunk = (seq - 1) / K;
                    while subscribed.load(Ordering::Acquire) + AHEAD < chunk {
                        std::thread::yield_now();
                    }
                    hub.publish(&[quote("A", seq, seq as i64)]);
                    published.store(seq, Ordering::Release);
                }
            })
        };
        for i in 1..N / K {
            let after = i * K;
            while published.load(Ordering::Acquire) < after {
                std::thread::yield_now();
            }
            feeds.push((after, hub.subscribe_quotes(snapshot()).expect("subscribe")));
            subscribed.store(i, Ordering::Release);
        }
        publisher.join().expect("publisher");
        let mut mid_stream = 0;
        for (after, mut feed) in feeds {
            let seqs = drain(&mut feed);
            let first = *seqs.first().expect("a snapshot or the live quotes");
            if after == 0 {
                assert_eq!(first, 1, "subscribed before the first publish");
            } else {
                assert!(first >= after, "subscribed after {after}, from {first}");
            }
            // The first seq out of line, rather than 20,000 of them.
            let wrong = seqs.iter().zip(first..).find(|(got, due)| **got != *due);
            assert_eq!(wrong, None, "subscribed after {after}: (got, due)");
            assert_eq!(seqs.last(), Some(&N), "subscribed after {after}");
            if 1 < first && first < N {
                mid_stream += 1;
            }
        }
        assert!(
            mid_stream > 0,
            "no feed took its snapshot while the publisher ran"
        );
    }

    #[test]
    fn max_rate_outside_its_range_is_refused() {
        for bad in [
            0.0,
            -0.0,
            -1.0,
            1000.5,
            1e-300,
            5e-20,
            f64::MIN_POSITIVE,
            0.000_999,
            1e300,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let refused = MaxRate::per_second(bad).expect_err("refused");
            assert!(refused.to_string().contains("`maxRate`"), "{refused}");
        }
        assert_eq!(
            MaxRate::per_second(4.0).expect("rate").period(),
            Duration::from_millis(250)
        );
        assert_eq!(
            MaxRate::per_second(MaxRate::MIN_PER_SECOND)
                .expect("the least rate")
                .period(),
            Duration::from_secs(1000)
        );
    }

    #[test]
    fn each_feed_gets_only_what_its_filter_selects() {
        let hub = Hub::new(100);
        let mut by_symbol = hub
            .subscribe_trades(Filter {
                instruments: strings(&["AAPL", "MSFT", "AAPL"]),
                ..Filter::default()
            })
            .expect("subscribe");
        let mut london_sells = hub
            .subscribe_trades(Filter {
                venues: strings(&["XLON"]),
                sides: Some(vec![Side::Sell]),
                ..Filter::default()
            })
            .expect("subscribe");
        let mut etf_buys_of_spy = hub
            .subscribe_trades(Filter {
                instruments: strings(&["SPY"]),
                asset_classes: Some(vec![AssetClass::Etf]),
                sides: Some(vec![Side::Buy]),
                ..Filter::default()
            })
            .expect("subscribe");
        let mut all_quotes = hub.subscribe_quotes(Filter::default()).expect("subscribe");

        hub.publish(&[
            trade("AAPL", "XNAS", 1, Side::Buy, AssetClass::Equity),
            trade("VOD.L", "XLON", 2, Side::Sell, AssetClass::Equity),
            trade("VOD.L", "XLON", 3, Side::Buy, AssetClass::Equity),
            trade("SPY", "XNYS", 4, Side::Buy, AssetClass::Etf),
            trade("SPY", "XNYS", 5, Side::Sell, AssetClass::Etf),
            quote("AAPL", 6, 6),
            trade("MSFT", "XLON", 7, Side::Sell, AssetClass::Equity),
        ]);

        assert_eq!(
            drain(&mut by_symbol),
            [1, 7],
            "instrument filter, each event once"
        );
        assert_eq!(drain(&mut london_sells), [2, 7]);
        assert_eq!(drain(&mut etf_buys_of_spy), [4]);
        assert_eq!(drain(&mut all_quotes), [6]);
    }

    #[test]
    fn venue_and_class_filters_are_looked_up_not_scanned() {
        let hub = Hub::new(100);
        let mut london = hub
            .subscribe_trades(Filter {
                venues: strings(&["XLON", "XLON", "XEUR"]),
                ..Filter::default()
            })
            .expect("subscribe");
        let mut entitled_to_xeur = hub
            .subscribe_trades(Filter {
                entitled: Some(Entitlements {
                    venues: Scope::Only(vec!["XEUR".to_owned()]),
                    asset_classes: Scope::All,
                }),
                ..Filter::default()
            })
            .expect("subscribe");
        let mut bonds_not_fx = hub
            .subscribe_trades(Filter {
                asset_classes: Some(vec![AssetClass::Bond, AssetClass::Fx]),
                entitled: Some(Entitlements {
                    venues: Scope::All,
                    asset_classes: Scope::Only(vec![AssetClass::Bond, AssetClass::Equity]),
                }),
                ..Filter::default()
            })
            .expect("subscribe");
        let mut sells = hub
            .subscribe_trades(Filter {
                sides: Some(vec![Side::Sell]),
                ..Filter::default()
            })
            .expect("subscribe");
        {
            let reg = hub.inner.registry();
            let t = &reg.trades;
            assert_eq!(
                listed(&t.by_venue),
                [("XEUR", 2), ("XLON", 1)],
                "each venue once per subscriber"
            );
            let by_class: Vec<usize> = t.by_class.iter().map(Vec::len).collect();
            assert_eq!(by_class[AssetClass::Bond as usize], 1);
            assert_eq!(
                by_class.iter().sum::<usize>(),
                1,
                "only classes both asked and entitled"
            );
            assert_eq!(
                t.wildcard.len(),
                1,
                "only the filter no tick field can look up"
            );
        }

        hub.publish(&[
            trade("VOD.L", "XLON", 1, Side::Buy, AssetClass::Equity),
            trade("BUND", "XEUR", 2, Side::Sell, AssetClass::Bond),
            trade("EURUSD", "XOFF", 3, Side::Sell, AssetClass::Fx),
            trade("GILT", "XLON", 4, Side::Buy, AssetClass::Bond),
            trade("AAPL", "XNAS", 5, Side::Buy, AssetClass::Equity),
        ]);

        assert_eq!(
            drain(&mut london),
            [1, 2, 4],
            "a repeated venue delivers once"
        );
        assert_eq!(drain(&mut entitled_to_xeur), [2]);
        assert_eq!(drain(&mut bonds_not_fx), [2, 4]);
        assert_eq!(drain(&mut sells), [2, 3]);

        drop((london, entitled_to_xeur, bonds_not_fx, sells));
        let reg = hub.inner.registry();
        assert!(reg.trades.by_venue.is_empty());
        assert!(reg.trades.by_class.iter().all(Vec::is_empty));
        assert!(reg.trades.wildcard.is_empty());
    }

    /// A name many subscriptions list is held once: each subscription and the
    /// index share it.
    #[test]
    fn subscriptions_share_the_names_they_list() {
        let hub = Hub::new(10);
        let symbols: Vec<String> = (0..20).map(|i| format!("SYMBOL{i}")).collect();
        let _feeds: Vec<_> = (0..50)
            .map(|_| {
                hub.subscribe_quotes(Filter {
                    instruments: Some(symbols.clone()),
                    venues: strings(&["XNAS", "XLON"]),
                    ..Filter::default()
                })
                .expect("subscribe")
            })
            .collect();
        let reg = hub.inner.registry();
        let q = &reg.quotes;
        assert_eq!(q.by_instrument.len(), 20);
        for (key, list) in &q.by_instrument {
            assert_eq!(list.len(), 50);
            for s in list {
                let theirs = s.instruments.as_deref().unwrap_or_default();
                let same = theirs.iter().filter(|n| Arc::ptr_eq(n, key)).count();
                assert_eq!(same, 1, "{key}: the subscriber's name is the index's");
            }
        }
        let venues: Vec<&Arc<str>> = q
            .by_id
            .values()
            .filter_map(|s| s.check.venues.as_deref())
            .flatten()
            .collect();
        assert_eq!(venues.len(), 100);
        assert!(
            venues
                .iter()
                .all(|v| Arc::ptr_eq(v, venues[0]) || Arc::ptr_eq(v, venues[1])),
            "two venues, each held once"
        );
    }

    /// After a burst of subscriptions ends, the index holds room for what is
    /// left, not for the burst.
    #[test]
    fn the_index_gives_its_room_back_as_subscriptions_end() {
        let hub = Hub::new(10);
        let symbols: Vec<String> = (0..200).map(|i| format!("SYMBOL{i}")).collect();
        let mut feeds: Vec<_> = (0..1000)
            .map(|i| {
                let filter = match i % 4 {
                    0 => Filter {
                        instruments: Some(symbols.clone()),
                        ..Filter::default()
                    },
                    1 => Filter {
                        venues: strings(&["XNAS"]),
                        ..Filter::default()
                    },
                    2 => Filter {
                        asset_classes: Some(vec![AssetClass::Bond]),
                        ..Filter::default()
                    },
                    _ => Filter::default(),
                };
                hub.subscribe_trades(filter).expect("subscribe")
            })
            .collect();
        feeds.truncate(4);
        {
            let reg = hub.inner.registry();
            let t = &reg.trades;
            assert_eq!(t.by_id.len(), 4);
            let room = |n: usize| n <= 2 * SPARE_MIN;
            assert!(room(t.by_id.capacity()), "{}", t.by_id.capacity());
            assert!(t.by_instrument.values().all(|l| room(l.capacity())));
            assert!(t.by_venue.values().all(|l| room(l.capacity())));
            assert!(t.by_class.iter().all(|l| room(l.capacity())));
            assert!(room(t.wildcard.capacity()), "{}", t.wildcard.capacity());
        }
        drop(feeds);
        let reg = hub.inner.registry();
        assert_eq!(
            reg.trades.by_instrument.capacity(),
            0,
            "its last 200 keys went at once"
        );
        assert!(reg.trades.by_id.capacity() <= SPARE_MIN);
    }

    #[test]
    fn dropping_a_feed_unregisters_it() {
        let hub = Hub::new(10);
        let a = hub
            .subscribe_quotes(Filter {
                instruments: strings(&["AAPL", "MSFT"]),
                ..Filter::default()
            })
            .expect("subscribe");
        let b = hub.subscribe_trades(Filter::default()).expect("subscribe");
        assert_eq!(hub.subscribers(), 2);
        {
            let reg = hub.inner.registry();
            let q = &reg.quotes;
            assert_eq!(
                listed(&q.by_instrument),
                [("AAPL", 1), ("MSFT", 1)],
                "listed under each instrument once"
            );
            assert!(q.wildcard.is_empty(), "an instrument filter is looked up");
            assert_eq!(reg.trades.wildcard.len(), 1, "no filter: everywhere");
        }
        drop(a);
        assert_eq!(hub.subscribers(), 1);
        assert!(hub.inner.registry().quotes.by_instrument.is_empty());
        drop(b);
        assert_eq!(hub.subscribers(), 0);
        assert!(hub.inner.registry().trades.wildcard.is_empty());
    }

    #[test]
    fn a_full_queue_closes_only_that_subscriber_with_an_error() {
        let hub = Hub::new(2);
        let mut slow = hub.subscribe_quotes(Filter::default()).expect("subscribe");
        let mut other = hub
            .subscribe_quotes(Filter {
                instruments: strings(&["MSFT"]),
                ..Filter::default()
            })
            .expect("subscribe");
        hub.publish(&[
            quote("AAPL", 1, 1),
            quote("AAPL", 2, 2),
            quote("AAPL", 3, 3),
        ]);
        assert_eq!(hub.subscribers(), 1, "the overflowed subscriber is removed");
        let first = slow.next().now_or_never().flatten();
        assert_eq!(
            first.map(|r| r.err()),
            Some(Some(HubError::TooSlow { queue: 2 }))
        );
        assert!(
            slow.next().now_or_never().flatten().is_none(),
            "it ends after the error"
        );
        assert_eq!(
            HubError::TooSlow { queue: 2 }.to_string(),
            "subscriber too slow: queue of 2 events full"
        );
        hub.publish(&[quote("MSFT", 4, 4)]);
        assert_eq!(drain(&mut other), [4]);
    }

    /// The byte limit counts what is queued now: taking ticks frees their
    /// bytes, and only a backlog past the limit closes the subscriber.
    #[test]
    fn a_queue_past_its_byte_limit_closes_that_subscriber() {
        let weight = |t: &Tick| match t {
            Tick::Quote(q) => q.weight(),
            Tick::Trade(t) => t.weight(),
        };
        let ticks: Vec<Tick> = (1..=8).map(|n| quote("AAPL", n, n as i64)).collect();
        // Same-sized ticks: the limit holds three.
        let bytes = 3 * weight(&ticks[0]);
        assert!(ticks.iter().all(|t| weight(t) == weight(&ticks[0])));
        let hub = Hub::new(QueueLimits {
            events: 1000,
            bytes,
        });
        let mut slow = hub.subscribe_quotes(Filter::default()).expect("subscribe");
        let mut other = hub.subscribe_quotes(Filter::default()).expect("subscribe");

        hub.publish(&ticks[0..3]);
        assert_eq!(drain(&mut slow), [1, 2, 3]);
        assert_eq!(drain(&mut other), [1, 2, 3]);
        hub.publish(&ticks[3..6]);
        assert_eq!(drain(&mut other), [4, 5, 6]);
        assert_eq!(hub.subscribers(), 2, "three queued is within the limit");
        hub.publish(&ticks[6..7]);
        assert_eq!(hub.subscribers(), 1, "the fourth passes it");
        assert_eq!(
            slow.next().now_or_never().flatten().map(|r| r.err()),
            Some(Some(HubError::TooSlowBytes { bytes }))
        );
        assert!(slow.next().now_or_never().flatten().is_none());
        assert_eq!(
            HubError::TooSlowBytes { bytes: 900 }.to_string(),
            "subscriber too slow: over 900 bytes of events queued"
        );
        hub.publish(&ticks[7..8]);
        assert_eq!(drain(&mut other), [7, 8]);
    }

    #[test]
    fn empty_filter_lists_are_refused() {
        let hub = Hub::new(10);
        let err = hub
            .subscribe_trades(Filter {
                sides: Some(Vec::new()),
                ..Filter::default()
            })
            .err();
        assert_eq!(err, Some(HubError::EmptyList { arg: "sides" }));
        assert_eq!(hub.subscribers(), 0);
    }

    #[test]
    fn latest_keeps_the_newest_event_time() {
        let hub = Hub::new(10);
        hub.publish(&[quote("AAPL", 1, 100), quote("AAPL", 2, 50)]);
        hub.publish(&[quote("MSFT", 3, 10)]);
        let seqs = |v: Vec<Option<Arc<QuoteTick>>>| {
            v.into_iter()
                .map(|q| q.map(|q| q.header().seq))
                .collect::<Vec<_>>()
        };
        let names = ["AAPL".to_owned(), "SPY".to_owned(), "MSFT".to_owned()];
        assert_eq!(seqs(hub.latest_quotes(&names)), [Some(1), None, Some(3)]);
        hub.publish(&[quote("AAPL", 4, 100)]);
        assert_eq!(
            seqs(hub.latest_quotes(&names[..1])),
            [Some(4)],
            "ties go to the later arrival"
        );
        assert!(hub.latest_trades(&names).iter().all(Option::is_none));
    }

    #[test]
    fn closing_ends_feeds_and_refuses_new_ones() {
        let hub = Hub::new(10);
        let mut feed = hub.subscribe_trades(Filter::default()).expect("subscribe");
        hub.inner.close();
        assert!(feed.next().now_or_never().flatten().is_none());
        assert_eq!(
            hub.subscribe_quotes(Filter::default()).err(),
            Some(HubError::ShuttingDown)
        );
    }
}
