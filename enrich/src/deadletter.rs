//! Dead letters made usable: list them, across every dead-letter stream or one,
//! with their reasons; and replay those that can succeed once the reference data
//! is fixed.
//!
//! # Listing
//! Entries of `<prefix>:dlq:ingest` and `<prefix>:dlq:{<s>}` merged into one order,
//! by entry id then stream key (newest or oldest first), filtered by stage and by
//! a case-insensitive substring of the reason, a page at a time. A page's cursor is
//! a [`DeadLetterId`], `<stream>/<entry id>`; the next page starts strictly after
//! it. One call reads at most [`SCAN_MAX`] entries, so a filter that matches
//! little costs bounded work: such a page may hold fewer items than asked and
//! still have a next cursor (where the scan stopped).
//!
//! A payload is shown as [`PayloadFormat::Json`] when it is JSON (ingest's JSON
//! and NDJSON input, enrich's and load's events), as JSON converted from
//! MessagePack when it is one complete MessagePack map or array (ingest's
//! MessagePack input), as UTF-8 text when it is text but not JSON (a broken NDJSON
//! line), and else as base64 of all its bytes (at most 2 KiB, see
//! [`DeadLetter::PAYLOAD_MAX`](tickgraph_ingest::stream::DeadLetter::PAYLOAD_MAX)).
//!
//! # What is replayable
//! Only enrich-stage letters whose reason is a reference gap (unknown instrument,
//! venue or account; no USD FX rate): their event was valid and accepted, and
//! only a reference row was missing. Every other letter is reported as not
//! replayable, with why: ingest's are malformed or invalid input (a replay would
//! be refused the same way; the producer must send a corrected event); load's
//! were already in the enriched stream, so subscribers had them (a replay would
//! deliver them twice); an enrich overflow or undecodable entry is the event's
//! own fault.
//!
//! # Why a replay is exactly-once
//! One Lua script per letter, on keys that all carry the shard's `{<s>}` hash tag
//! (the dead-letter stream, the raw stream, the dedupe bitmap), so it is atomic
//! even on Redis Cluster. It XDELs the letter, and only if that XDEL removed it
//! (the letter was still there) appends the event to the raw stream. Two replays
//! of one letter, concurrent or one after the other, or a replay re-run after a
//! crash or a lost reply, append it at most once: the second finds it gone. There
//! is no state between the two steps in which a crash could leave it in both
//! places or in neither. From the raw stream on, the pipeline's own guarantees
//! hold: enrich's XACK-gated commit writes one enriched entry per raw entry, the
//! loader's `history_entries` one history row per enriched event.
//!
//! Enrich sets an event's dedupe bit only when it enriches it, never when it
//! dead-letters it, so a replayed event is not mistaken for a re-send. The
//! script also checks that bit: if it is set, the event was enriched since (the
//! producer re-sent it after the fix, or another letter of the same event was
//! replayed first), and the letter is deleted as a duplicate instead of
//! replayed. Two letters of one event replayed back to back are both appended,
//! and enrich's dedupe drops the second; with `--dedupe-window-secs 0` both
//! reach history, as every re-send does then.
//!
//! A replayed event whose reference row is still missing is dead-lettered again
//! under a new id, with its reason. [`DeadLetters::replay_matching`] only looks
//! at letters up to the newest one when it started ([`ReplayCursor::until`]), so
//! it never meets its own re-dead-lettered events: no loop.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use serde::Serialize;
use tickgraph_ingest::event::now_nanos;
use tickgraph_ingest::redis_link::{RedisConn, RedisTarget};
use tickgraph_ingest::stream::{dlq_bytes_key, encode_batch, value_string, EntryId, RawRecord};
use tickgraph_ingest::{Event, StreamLayout};

use crate::transform::Unenrichable;
use crate::worker::SEEN_BLOCK_BITS;

/// Most entries one list or replay call reads from Redis.
pub const SCAN_MAX: usize = 10_000;

/// The component that refused an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Failed ingest's validation: malformed or invalid input.
    Ingest,
    /// Accepted, but not enrichable (reference gap, overflow, undecodable entry).
    Enrich,
    /// Enriched, but the loader could not store it.
    Load,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Ingest => "ingest",
            Stage::Enrich => "enrich",
            Stage::Load => "load",
        }
    }
}

impl FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ingest" => Ok(Stage::Ingest),
            "enrich" => Ok(Stage::Enrich),
            "load" => Ok(Stage::Load),
            _ => Err(format!(
                "unknown stage {s:?}: expected ingest, enrich or load"
            )),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A dead letter's address: `<stream>/<entry id>`, e.g. `tg:dlq:{2}/1732000000000-0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeadLetterId {
    pub stream: String,
    pub entry: EntryId,
}

impl fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.stream, self.entry)
    }
}

impl FromStr for DeadLetterId {
    type Err = DeadLetterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeadLetterError::BadId(s.chars().take(200).collect());
        let (stream, entry) = s.rsplit_once('/').ok_or_else(bad)?;
        if stream.is_empty() || !entry.contains('-') {
            return Err(bad());
        }
        Ok(Self {
            stream: stream.to_owned(),
            entry: entry.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for DeadLetterId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    #[error("{0:?} is not a dead-letter id: expected <stream>/<entry id>, e.g. tg:dlq:{{0}}/1732000000000-0")]
    BadId(String),
    #[error("{stream:?} is not a dead-letter stream of this deployment (those are {known})")]
    UnknownStream { stream: String, known: String },
    #[error("{0:?} is not a replay cursor: expected until=<entry id>[,after=<stream>/<entry id>]")]
    BadCursor(String),
}

/// Newest first is what an operator looking at a problem wants; oldest first is
/// the order replay uses, so a shard's events go back in their original order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// Which dead letters: all by default.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// One dead-letter stream only.
    pub stream: Option<String>,
    pub stage: Option<Stage>,
    /// A substring of the reason, compared without regard to case.
    pub reason: Option<String>,
}

impl Filter {
    fn matches(&self, d: &Stored) -> bool {
        self.stage.is_none_or(|s| d.stage == s.as_str())
            && self
                .reason
                .as_deref()
                .is_none_or(|r| d.reason.to_lowercase().contains(&r.to_lowercase()))
    }
}

/// A page of the list.
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    pub filter: Filter,
    pub order: Order,
    /// Start strictly after this dead letter (a previous page's `next`).
    pub after: Option<DeadLetterId>,
    pub limit: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts; `None` when nothing is left.
    pub next: Option<DeadLetterId>,
}

/// How a payload is shown; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// JSON, as stored.
    Json,
    /// MessagePack, shown converted to JSON (map keys sorted).
    #[serde(rename = "msgpack")]
    MessagePack,
    /// UTF-8 text that is not JSON.
    Text,
    /// Anything else, base64 (standard alphabet, padded).
    Base64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payload {
    pub format: PayloadFormat,
    pub text: String,
    /// Length of the stored payload in bytes.
    pub bytes: usize,
}

impl Payload {
    pub fn render(bytes: &[u8]) -> Self {
        let (format, text) = render(bytes);
        Self {
            format,
            text,
            bytes: bytes.len(),
        }
    }
}

/// Whether a letter can be replayed, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayability {
    Replayable,
    NotReplayable(String),
}

/// One dead letter, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterView {
    pub id: DeadLetterId,
    /// `ingest`, `enrich` or `load` (as stored).
    pub stage: String,
    pub reason: String,
    /// When it was dead-lettered, epoch nanoseconds.
    pub at_ns: Option<i64>,
    /// `source:seq`, when known (enrich and load).
    pub event_id: Option<String>,
    pub payload: Payload,
    pub replayable: bool,
    /// Why not, when not replayable.
    pub not_replayable_reason: Option<String>,
}

/// What happened to one dead letter in a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayStatus {
    /// Put back on its raw stream and removed from the dead-letter stream.
    Replayed,
    /// Dry run: would have been replayed.
    WouldReplay,
    /// Its event was enriched since (a re-send, or another letter of it): the
    /// letter was removed (dry run: would be) and nothing replayed.
    AlreadyEnriched,
    /// Not in the stream: replayed already (by another run), or trimmed away.
    NotFound,
    /// Cannot succeed by replay; the outcome's detail says why.
    NotReplayable,
    /// Redis failed; nothing changed for this letter, and it can be retried.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayOutcome {
    pub id: DeadLetterId,
    pub event_id: Option<String>,
    pub status: ReplayStatus,
    /// Why not replayable or failed; for a replay, the raw entry it became
    /// (`<raw stream>/<entry id>`).
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayCounts {
    pub replayed: usize,
    pub would_replay: usize,
    pub already_enriched: usize,
    pub not_found: usize,
    pub not_replayable: usize,
    pub failed: usize,
}

impl ReplayCounts {
    fn add(&mut self, s: ReplayStatus) {
        match s {
            ReplayStatus::Replayed => self.replayed += 1,
            ReplayStatus::WouldReplay => self.would_replay += 1,
            ReplayStatus::AlreadyEnriched => self.already_enriched += 1,
            ReplayStatus::NotFound => self.not_found += 1,
            ReplayStatus::NotReplayable => self.not_replayable += 1,
            ReplayStatus::Failed => self.failed += 1,
        }
    }
}

/// Where a [`DeadLetters::replay_matching`] run stands: it replays letters up to
/// `until` (the newest when the run began, so never its own re-dead-lettered
/// events), oldest first, after `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayCursor {
    pub until: EntryId,
    pub after: Option<DeadLetterId>,
}

impl fmt::Display for ReplayCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "until={}", self.until)?;
        if let Some(a) = &self.after {
            write!(f, ",after={a}")?;
        }
        Ok(())
    }
}

impl FromStr for ReplayCursor {
    type Err = DeadLetterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeadLetterError::BadCursor(s.chars().take(200).collect());
        let (until, after) = match s.split_once(",after=") {
            Some((u, a)) => (u, Some(a.parse().map_err(|_| bad())?)),
            None => (s, None),
        };
        let until = until
            .strip_prefix("until=")
            .and_then(|u| u.parse().ok())
            .ok_or_else(bad)?;
        Ok(Self { until, after })
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub counts: ReplayCounts,
    pub outcomes: Vec<ReplayOutcome>,
    /// Set when the run stopped at its limit with letters left to look at:
    /// pass it back to go on.
    pub next: Option<String>,
}

impl ReplayReport {
    fn push(&mut self, o: ReplayOutcome) {
        self.counts.add(o.status);
        self.outcomes.push(o);
    }
}

/// A dead-letter entry as stored.
#[derive(Debug, Clone, Default)]
struct Stored {
    id: Option<DeadLetterId>,
    stage: String,
    reason: String,
    payload: Vec<u8>,
    event_id: Option<String>,
    ingest_ns: Option<i64>,
    at_ns: Option<i64>,
}

impl Stored {
    fn id(&self) -> DeadLetterId {
        self.id.clone().unwrap_or(DeadLetterId {
            stream: String::new(),
            entry: EntryId::default(),
        })
    }
}

/// What a replay puts back: the raw stream's shard and the record.
struct Plan {
    shard: u16,
    record: RawRecord,
}

/// KEYS: the dead-letter stream, the raw stream, the event's dedupe bitmap, the
/// dead-letter stream's byte count (all of one shard, so of one cluster slot).
/// ARGV: the letter's entry id, the event's bit in the bitmap, the raw entry's
/// record field, the letter's address (kept on the raw entry as `replay_of`).
///
/// Returns `{0}` when the letter is gone (replayed by someone else, trimmed),
/// `{1}` when the event was enriched since (the letter is deleted), and
/// `{2, raw entry id}` when it was put back on the raw stream. A deleted
/// letter's `size` leaves the count, as when it is trimmed (see
/// [`DLQ_ADD_LUA`](tickgraph_ingest::stream::DLQ_ADD_LUA)).
const REPLAY_LUA: &str = r#"
local letter = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #letter == 0 or redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return { 0 } end
local f = letter[1][2]
for j = 1, #f, 2 do
  if f[j] == 'size' and redis.call('DECRBY', KEYS[4], tonumber(f[j + 1]) or 0) < 0 then
    redis.call('SET', KEYS[4], 0)
  end
end
if redis.call('GETBIT', KEYS[3], ARGV[2]) == 1 then return { 1 } end
-- 'e' is RECORD_FIELD; readers ignore other fields.
local id = redis.call('XADD', KEYS[2], '*', 'e', ARGV[3], 'replay_of', ARGV[4])
return { 2, id }
"#;

static REPLAY: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REPLAY_LUA));

/// Lists and replays one deployment's dead letters.
#[derive(Clone)]
pub struct DeadLetters {
    layout: StreamLayout,
    con: RedisConn,
}

impl DeadLetters {
    /// Connects lazily, on first use.
    pub fn new(client: &RedisTarget, layout: StreamLayout) -> Result<Self, DeadLetterError> {
        let con = crate::consumer::write_connection(client)?;
        Ok(Self { layout, con })
    }

    pub fn layout(&self) -> &StreamLayout {
        &self.layout
    }

    /// One page of dead letters.
    pub async fn list(&self, req: &ListRequest) -> Result<Page<DeadLetterView>, DeadLetterError> {
        let streams = self.streams(&req.filter)?;
        if let Some(a) = &req.after {
            self.check_stream(&a.stream)?;
        }
        let (items, next) = self
            .scan(
                &streams,
                req.order,
                req.after.as_ref(),
                None,
                req.limit,
                &req.filter,
            )
            .await?;
        let items = items.into_iter().map(|d| self.view(d)).collect();
        Ok(Page { items, next })
    }

    /// Replays the letters named; each gets an outcome, in the order given.
    pub async fn replay_ids(
        &self,
        ids: &[DeadLetterId],
        dry_run: bool,
    ) -> Result<ReplayReport, DeadLetterError> {
        let mut report = ReplayReport::default();
        for id in ids {
            let outcome = match self.check_stream(&id.stream) {
                Err(e) => ReplayOutcome {
                    id: id.clone(),
                    event_id: None,
                    status: ReplayStatus::NotFound,
                    detail: Some(e.to_string()),
                },
                Ok(()) => match self.get(id).await {
                    Err(e) => failed(id.clone(), None, &e),
                    Ok(None) => ReplayOutcome {
                        id: id.clone(),
                        event_id: None,
                        status: ReplayStatus::NotFound,
                        detail: Some(
                            "not in its dead-letter stream: replayed already, or trimmed".into(),
                        ),
                    },
                    Ok(Some(d)) => self.replay_one(&d, dry_run).await,
                },
            };
            report.push(outcome);
        }
        Ok(report)
    }

    /// Replays every letter `filter` selects, oldest first, looking at no more
    /// than `max` of them (and at most [`SCAN_MAX`] per call); letters that are
    /// not replayable get an outcome saying so. `from` continues an earlier
    /// run (its report's `next`); without it, the run covers the letters there
    /// now.
    pub async fn replay_matching(
        &self,
        filter: &Filter,
        from: Option<ReplayCursor>,
        max: usize,
        dry_run: bool,
    ) -> Result<ReplayReport, DeadLetterError> {
        let streams = self.streams(filter)?;
        let cursor = match from {
            Some(c) => {
                if let Some(a) = &c.after {
                    self.check_stream(&a.stream)?;
                }
                c
            }
            None => ReplayCursor {
                until: self.now_id().await?,
                after: None,
            },
        };
        let (letters, next) = self
            .scan(
                &streams,
                Order::OldestFirst,
                cursor.after.as_ref(),
                Some(cursor.until),
                max.min(SCAN_MAX),
                filter,
            )
            .await?;
        let mut report = ReplayReport::default();
        for d in &letters {
            report.push(self.replay_one(d, dry_run).await);
        }
        report.next = next.map(|after| {
            ReplayCursor {
                until: cursor.until,
                after: Some(after),
            }
            .to_string()
        });
        Ok(report)
    }

    /// The dead-letter streams `filter` covers. The stage narrows them: ingest's
    /// letters are only in ingest's stream, enrich's and load's only in shards'.
    fn streams(&self, filter: &Filter) -> Result<Vec<String>, DeadLetterError> {
        if let Some(s) = &filter.stream {
            self.check_stream(s)?;
        }
        Ok(self
            .layout
            .all_dlqs()
            .into_iter()
            .filter(|k| filter.stream.as_ref().is_none_or(|s| s == k))
            .filter(|k| match filter.stage {
                None => true,
                Some(Stage::Ingest) => *k == self.layout.ingest_dlq(),
                Some(_) => *k != self.layout.ingest_dlq(),
            })
            .collect())
    }

    /// Refuses keys that are not this deployment's dead-letter streams, so a
    /// replay can never XDEL from any other stream.
    fn check_stream(&self, stream: &str) -> Result<(), DeadLetterError> {
        let all = self.layout.all_dlqs();
        if all.iter().any(|k| k == stream) {
            Ok(())
        } else {
            Err(DeadLetterError::UnknownStream {
                stream: stream.chars().take(200).collect(),
                known: all.join(", "),
            })
        }
    }

    fn shard_of_dlq(&self, stream: &str) -> Option<u16> {
        self.layout
            .shard_ids()
            .find(|s| self.layout.dlq(*s) == stream)
    }

    /// The id an entry added now would get at most: Redis's clock, not ours.
    /// Returns only once that millisecond is over on Redis's clock: a letter
    /// written in it later (a replayed event dead-lettered again within the
    /// millisecond, which a fast enrich does) would otherwise fall inside the
    /// run and be replayed by it a second time.
    async fn now_id(&self) -> Result<EntryId, DeadLetterError> {
        let mut con = self.con.clone();
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut con).await?;
        let left = 1000 - micros % 1000;
        tokio::time::sleep(std::time::Duration::from_micros(left + 100)).await;
        Ok(EntryId {
            ms: secs * 1000 + micros / 1000,
            seq: u64::MAX,
        })
    }

    async fn get(&self, id: &DeadLetterId) -> Result<Option<Stored>, DeadLetterError> {
        let mut con = self.con.clone();
        let entry = id.entry.to_string();
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&id.stream)
            .arg(&entry)
            .arg(&entry)
            .query_async(&mut con)
            .await?;
        Ok(parse_letters(&id.stream, reply)?.into_iter().next())
    }

    /// Merges the streams' entries in `order`, from after `after` (up to
    /// `until`, oldest first only), keeping those `filter` selects; returns up
    /// to `limit` of them and where the next call starts.
    async fn scan(
        &self,
        streams: &[String],
        order: Order,
        after: Option<&DeadLetterId>,
        until: Option<EntryId>,
        limit: usize,
        filter: &Filter,
    ) -> Result<(Vec<Stored>, Option<DeadLetterId>), DeadLetterError> {
        let chunk = (limit + 1).clamp(16, 256);
        let mut scans: Vec<StreamScan> = streams
            .iter()
            .map(|k| StreamScan::new(k, order, after, until))
            .collect();
        let mut con = self.con.clone();
        let mut out = Vec::new();
        let mut scanned = 0usize;
        let mut last = None;
        loop {
            for s in scans.iter_mut().filter(|s| s.buf.is_empty() && !s.done) {
                s.fetch(&mut con, chunk).await?;
            }
            let best = scans
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.buf.front().map(|d| (i, d.id())))
                .reduce(|a, b| {
                    let b_first = match order {
                        Order::NewestFirst => (b.1.entry, &b.1.stream) > (a.1.entry, &a.1.stream),
                        Order::OldestFirst => (b.1.entry, &b.1.stream) < (a.1.entry, &a.1.stream),
                    };
                    if b_first {
                        b
                    } else {
                        a
                    }
                });
            let Some((i, id)) = best else {
                // Every stream is exhausted.
                return Ok((out, None));
            };
            let Some(d) = scans[i].buf.pop_front() else {
                return Ok((out, None));
            };
            if filter.matches(&d) {
                if out.len() == limit {
                    // One more match exists: the page ends at the previous one.
                    return Ok((out, last));
                }
                out.push(d);
                last = Some(id.clone());
            }
            scanned += 1;
            if scanned >= SCAN_MAX {
                return Ok((out, Some(id)));
            }
        }
    }

    fn plan(&self, d: &Stored) -> Result<Plan, String> {
        match d.stage.as_str() {
            "ingest" => {
                return Err(
                    "refused by ingest as malformed or invalid input: a replay would be \
                     refused the same way; the producer must send a corrected event"
                        .into(),
                )
            }
            "load" => {
                return Err(
                    "refused by the loader after enrich had written it to the enriched \
                     stream, so subscribers have had it: a replay would deliver it twice; it \
                     needs a fix of the loader"
                        .into(),
                )
            }
            "enrich" => {}
            other => return Err(format!("unknown stage {other:?}")),
        }
        if !Unenrichable::reason_is_reference_gap(&d.reason) {
            return Err(format!(
                "not a reference-data gap ({}): the event itself cannot be enriched, so fixing \
                 reference data would not change the outcome",
                d.reason
            ));
        }
        let stream = d.id.as_ref().map(|i| i.stream.as_str()).unwrap_or_default();
        let shard = self
            .shard_of_dlq(stream)
            .ok_or_else(|| format!("{stream} is not a shard's dead-letter stream"))?;
        let event: Event = serde_json::from_slice(&d.payload)
            .map_err(|e| format!("payload is not a decodable event: {e}"))?;
        let home = self.layout.shard_of(&event.header().instrument);
        if home != shard {
            return Err(format!(
                "instrument {} belongs to shard {home} of {}, not to this letter's shard {shard}: \
                 replay with the --shards the letter was written with",
                event.header().instrument,
                self.layout.shards()
            ));
        }
        let ingest_ns = d.ingest_ns.or(d.at_ns).unwrap_or_else(now_nanos);
        Ok(Plan {
            shard,
            record: RawRecord { event, ingest_ns },
        })
    }

    fn view(&self, d: Stored) -> DeadLetterView {
        let (replayable, not_replayable_reason) = match self.plan(&d) {
            Ok(_) => (true, None),
            Err(why) => (false, Some(why)),
        };
        DeadLetterView {
            id: d.id(),
            payload: Payload::render(&d.payload),
            stage: d.stage,
            reason: d.reason,
            at_ns: d.at_ns,
            event_id: d.event_id,
            replayable,
            not_replayable_reason,
        }
    }

    async fn replay_one(&self, d: &Stored, dry_run: bool) -> ReplayOutcome {
        let id = d.id();
        let event_id = d.event_id.clone();
        let plan = match self.plan(d) {
            Ok(p) => p,
            Err(why) => {
                return ReplayOutcome {
                    id,
                    event_id,
                    status: ReplayStatus::NotReplayable,
                    detail: Some(why),
                }
            }
        };
        let header = plan.record.event.header();
        let seen = self.layout.seen(
            plan.shard,
            header.source.as_str(),
            header.seq / SEEN_BLOCK_BITS,
        );
        let bit = header.seq % SEEN_BLOCK_BITS;
        let raw = self.layout.raw(plan.shard);
        let mut con = self.con.clone();
        if dry_run {
            let set: Result<u8, _> = redis::cmd("GETBIT")
                .arg(&seen)
                .arg(bit)
                .query_async(&mut con)
                .await;
            let status = match set {
                Err(e) => return failed(id, event_id, &e.into()),
                Ok(1) => ReplayStatus::AlreadyEnriched,
                Ok(_) => ReplayStatus::WouldReplay,
            };
            return ReplayOutcome {
                id,
                event_id,
                status,
                detail: Some(raw),
            };
        }
        let record = match plan.record.encode() {
            Ok(r) => r,
            Err(e) => {
                return ReplayOutcome {
                    id,
                    event_id,
                    status: ReplayStatus::NotReplayable,
                    detail: Some(format!("the event does not encode as a raw record: {e}")),
                }
            }
        };
        let entry = encode_batch(std::iter::once(record.as_slice()));
        let reply: Result<redis::Value, _> = REPLAY
            .key(&id.stream)
            .key(&raw)
            .key(&seen)
            .key(dlq_bytes_key(&id.stream))
            .arg(id.entry.to_string())
            .arg(bit)
            .arg(entry)
            .arg(id.to_string())
            .invoke_async(&mut con)
            .await;
        let (status, detail) = match reply.map_err(DeadLetterError::from).and_then(replay_reply) {
            Err(e) => return failed(id, event_id, &e),
            Ok(None) => (
                ReplayStatus::NotFound,
                "not in its dead-letter stream: replayed by another run, or trimmed".to_string(),
            ),
            Ok(Some(None)) => (
                ReplayStatus::AlreadyEnriched,
                "its event was enriched since (re-sent, or replayed from another letter); \
                 the letter was removed"
                    .to_string(),
            ),
            Ok(Some(Some(raw_id))) => (ReplayStatus::Replayed, format!("{raw}/{raw_id}")),
        };
        if status == ReplayStatus::Replayed {
            tracing::info!(dead_letter = %id, raw_entry = %detail, event = ?event_id, "dead letter replayed");
        }
        ReplayOutcome {
            id,
            event_id,
            status,
            detail: Some(detail),
        }
    }
}

fn failed(id: DeadLetterId, event_id: Option<String>, e: &DeadLetterError) -> ReplayOutcome {
    tracing::warn!(dead_letter = %id, error = %e, "dead letter replay failed");
    ReplayOutcome {
        id,
        event_id,
        status: ReplayStatus::Failed,
        detail: Some(e.to_string()),
    }
}

/// The script's reply: `None` gone, `Some(None)` already enriched,
/// `Some(Some(id))` replayed as raw entry `id`.
fn replay_reply(v: redis::Value) -> Result<Option<Option<String>>, DeadLetterError> {
    let redis::Value::Array(items) = v else {
        return Err(DeadLetterError::Reply(format!(
            "replay script returned {v:?}"
        )));
    };
    let mut it = items.into_iter();
    match it.next() {
        Some(redis::Value::Int(0)) => Ok(None),
        Some(redis::Value::Int(1)) => Ok(Some(None)),
        Some(redis::Value::Int(2)) => {
            let id = it
                .next()
                .ok_or_else(|| DeadLetterError::Reply("replay script returned no id".into()))?;
            Ok(Some(Some(
                value_string(id).map_err(DeadLetterError::Reply)?,
            )))
        }
        other => Err(DeadLetterError::Reply(format!(
            "replay script returned {other:?}"
        ))),
    }
}

/// One stream's side of a merged scan: the entries read and not yet merged, and
/// the bound of the next read.
struct StreamScan {
    key: String,
    order: Order,
    /// Start of the next read (inclusive, or exclusive with `(`).
    from: String,
    /// Where reads stop: `+`/`-` or an entry id (inclusive).
    to: String,
    buf: VecDeque<Stored>,
    done: bool,
}

impl StreamScan {
    /// Entries of this stream strictly after `after` in the merged order
    /// (entry id, then stream key).
    fn new(key: &str, order: Order, after: Option<&DeadLetterId>, until: Option<EntryId>) -> Self {
        let from = match (order, after) {
            (Order::NewestFirst, None) => "+".to_string(),
            (Order::OldestFirst, None) => "-".to_string(),
            (Order::NewestFirst, Some(a)) if key < a.stream.as_str() => a.entry.to_string(),
            (Order::OldestFirst, Some(a)) if key > a.stream.as_str() => a.entry.to_string(),
            (_, Some(a)) => format!("({}", a.entry),
        };
        let to = match (order, until) {
            (Order::NewestFirst, _) => "-".to_string(),
            (Order::OldestFirst, None) => "+".to_string(),
            (Order::OldestFirst, Some(u)) => u.to_string(),
        };
        Self {
            key: key.to_owned(),
            order,
            from,
            to,
            buf: VecDeque::new(),
            done: false,
        }
    }

    async fn fetch(&mut self, con: &mut RedisConn, count: usize) -> Result<(), DeadLetterError> {
        let cmd = match self.order {
            Order::NewestFirst => "XREVRANGE",
            Order::OldestFirst => "XRANGE",
        };
        let reply: redis::Value = redis::cmd(cmd)
            .arg(&self.key)
            .arg(&self.from)
            .arg(&self.to)
            .arg("COUNT")
            .arg(count)
            .query_async(con)
            .await?;
        let letters = parse_letters(&self.key, reply)?;
        self.done = letters.len() < count;
        if let Some(last) = letters.last() {
            self.from = format!("({}", last.id().entry);
        }
        self.buf.extend(letters);
        Ok(())
    }
}

/// Parses an XRANGE/XREVRANGE reply of dead-letter entries.
fn parse_letters(stream: &str, v: redis::Value) -> Result<Vec<Stored>, DeadLetterError> {
    use redis::Value;
    let items = match v {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(DeadLetterError::Reply(format!("XRANGE returned {other:?}"))),
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut parts) = item else {
                return Err(DeadLetterError::Reply(
                    "stream entry is not an array".into(),
                ));
            };
            if parts.len() != 2 {
                return Err(DeadLetterError::Reply(
                    "stream entry is not [id, fields]".into(),
                ));
            }
            let fields = parts.pop().unwrap_or(Value::Nil);
            let id =
                value_string(parts.pop().unwrap_or(Value::Nil)).map_err(DeadLetterError::Reply)?;
            let entry = id.parse().map_err(|e: String| DeadLetterError::Reply(e))?;
            let mut d = Stored {
                id: Some(DeadLetterId {
                    stream: stream.to_owned(),
                    entry,
                }),
                ..Stored::default()
            };
            let fields = match fields {
                Value::Array(f) => f,
                Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => Vec::new(),
            };
            let mut it = fields.into_iter();
            while let (Some(Value::BulkString(k)), Some(Value::BulkString(v))) =
                (it.next(), it.next())
            {
                let text = || String::from_utf8_lossy(&v).into_owned();
                match k.as_slice() {
                    b"stage" => d.stage = text(),
                    b"reason" => d.reason = text(),
                    b"event_id" => d.event_id = Some(text()),
                    b"at_ns" => d.at_ns = text().parse().ok(),
                    b"ingest_ns" => d.ingest_ns = text().parse().ok(),
                    b"payload" => d.payload = v,
                    _ => {}
                }
            }
            Ok(d)
        })
        .collect()
}

/// See [`PayloadFormat`].
fn render(bytes: &[u8]) -> (PayloadFormat, String) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            return (PayloadFormat::Json, text.to_owned());
        }
    }
    // Only a map or an array: any byte below 0x80 is also a one-byte MessagePack
    // integer, so text would otherwise pass for MessagePack.
    if matches!(bytes.first(), Some(0x80..=0x9f | 0xdc..=0xdf)) {
        let mut rest = bytes;
        let mut de = rmp_serde::Deserializer::new(&mut rest);
        // As deep as serde_json itself goes.
        de.set_max_depth(128);
        let value = <serde_json::Value as serde::Deserialize>::deserialize(&mut de);
        if let Ok(v) = value {
            if rest.is_empty() {
                if let Ok(json) = serde_json::to_string(&v) {
                    return (PayloadFormat::MessagePack, json);
                }
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        if !text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return (PayloadFormat::Text, text.to_owned());
        }
    }
    (PayloadFormat::Base64, base64(bytes))
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse() {
        let id: DeadLetterId = "tg:dlq:{2}/1732000000000-3".parse().expect("parses");
        assert_eq!(id.stream, "tg:dlq:{2}");
        assert_eq!(
            id.entry,
            EntryId {
                ms: 1_732_000_000_000,
                seq: 3
            }
        );
        assert_eq!(id.to_string(), "tg:dlq:{2}/1732000000000-3");
        for bad in ["", "tg:dlq:{2}", "/1-0", "tg:dlq:{2}/x-0", "tg:dlq:{2}/17"] {
            assert!(bad.parse::<DeadLetterId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replay_cursors_print_and_parse() {
        for s in [
            "until=5-18446744073709551615",
            "until=5-0,after=tg:dlq:ingest/4-2",
        ] {
            assert_eq!(s.parse::<ReplayCursor>().expect(s).to_string(), s);
        }
        assert!("after=tg:dlq:ingest/4-2".parse::<ReplayCursor>().is_err());
    }

    #[test]
    fn stages_parse_in_any_case() {
        assert_eq!("ENRICH".parse::<Stage>(), Ok(Stage::Enrich));
        assert!("transform".parse::<Stage>().is_err());
    }

    #[test]
    fn payloads_render_as_json_messagepack_text_or_base64() {
        let json = br#"{"kind":"quote","price":1.5}"#;
        assert_eq!(
            render(json),
            (
                PayloadFormat::Json,
                String::from_utf8_lossy(json).into_owned()
            )
        );
        #[derive(Serialize)]
        struct Wire {
            kind: &'static str,
            seq: u64,
            price: f64,
            ok: bool,
        }
        let wire = Wire {
            kind: "trade",
            seq: 7,
            price: 1.5,
            ok: true,
        };
        let mp = rmp_serde::to_vec_named(&wire).expect("encodes");
        assert_eq!(
            render(&mp),
            (
                PayloadFormat::MessagePack,
                r#"{"kind":"trade","ok":true,"price":1.5,"seq":7}"#.to_string()
            )
        );
        // A MessagePack map cut short is not MessagePack.
        assert_eq!(render(&mp[..mp.len() - 1]).0, PayloadFormat::Base64);
        assert_eq!(
            render(b"{\"kind\": tra"),
            (PayloadFormat::Text, "{\"kind\": tra".to_string())
        );
        // One ASCII byte is also a MessagePack integer; text wins.
        assert_eq!(render(b"x"), (PayloadFormat::Text, "x".to_string()));
        assert_eq!(
            render(&[0xff, 0x00, 0x10]),
            (PayloadFormat::Base64, "/wAQ".to_string())
        );
        assert_eq!(
            render(b"a\x01"),
            (PayloadFormat::Base64, "YQE=".to_string())
        );
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input), want);
        }
    }
}
