//! The Redis Streams layout every component shares: key names, sharding, trimming
//! and the entry codecs. This is the one place those contracts are written down.
//!
//! | key                        | written by | entry fields                                  |
//! |----------------------------|------------|-----------------------------------------------|
//! | `<prefix>:raw:{<s>}`       | ingest     | `e` = MessagePack array of [`RawRecord`]      |
//! | `<prefix>:enriched:{<s>}`  | enrich     | `e` = MessagePack array of enriched records   |
//! | `<prefix>:dlq:{<s>}`       | enrich     | [`DeadLetter`] fields                         |
//! | `<prefix>:dlq:ingest`      | ingest     | [`DeadLetter`] fields                         |
//!
//! `<s>` is the shard, `fnv1a(instrument) % shards`, so one instrument's events stay
//! in order. The `{<s>}` hash tag puts a shard's raw, enriched and dead-letter
//! streams in one Redis Cluster slot, so enrich can XADD and XACK in one script.
//! Consumer groups: [`ENRICH_GROUP`] on raw streams, [`LOAD_GROUP`] on enriched ones.
//!
//! An entry is a batch: the events of one shard that ingest wrote in one round trip
//! (at most 256), in order, so Redis and every reader pay per batch, not per event.
//! Each raw entry becomes at most one enriched entry, with the same events in the
//! same order minus the dead-lettered ones. An event's position is
//! `<entry id>.<index>` ([`event_position`]). Readers also accept an entry holding a
//! single record (a map), the format before batching.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::{now_nanos, Event, Symbol};
use crate::fast_decode::{try_fast, FastDecode};

pub const ENRICH_GROUP: &str = "enrich";
pub const LOAD_GROUP: &str = "load";
/// Field holding the MessagePack record in raw and enriched entries.
pub const RECORD_FIELD: &str = "e";

/// Where a deployment's streams live: a key prefix and a shard count. Tests use a
/// prefix of their own so they can run in parallel against one Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLayout {
    prefix: String,
    shards: u16,
}

impl StreamLayout {
    pub fn new(prefix: impl Into<String>, shards: u16) -> Self {
        Self {
            prefix: prefix.into(),
            shards: shards.max(1),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    pub fn shard_ids(&self) -> impl Iterator<Item = u16> {
        0..self.shards
    }

    pub fn shard_of(&self, instrument: &Symbol) -> u16 {
        shard_of(instrument.as_str(), self.shards)
    }

    pub fn raw(&self, shard: u16) -> String {
        format!("{}:raw:{{{shard}}}", self.prefix)
    }

    pub fn enriched(&self, shard: u16) -> String {
        format!("{}:enriched:{{{shard}}}", self.prefix)
    }

    /// The shard's epoch: a number made when the key is missing, so it is new
    /// whenever Redis lost the shard's streams. Resume cursors carry it.
    pub fn epoch(&self, shard: u16) -> String {
        format!("{}:epoch:{{{shard}}}", self.prefix)
    }

    pub fn dlq(&self, shard: u16) -> String {
        format!("{}:dlq:{{{shard}}}", self.prefix)
    }

    /// Enrich's bitmap of the `seq`s of `source` it has seen in one block of
    /// seqs on `shard`: how a producer's re-send is recognised.
    pub fn seen(&self, shard: u16, source: &str, block: u64) -> String {
        format!("{}:seen:{{{shard}}}:{source}:{block}", self.prefix)
    }

    pub fn ingest_dlq(&self) -> String {
        format!("{}:dlq:ingest", self.prefix)
    }

    /// Every dead-letter stream, ingest's first.
    pub fn all_dlqs(&self) -> Vec<String> {
        std::iter::once(self.ingest_dlq())
            .chain(self.shard_ids().map(|s| self.dlq(s)))
            .collect()
    }
}

impl Default for StreamLayout {
    fn default() -> Self {
        Self::new("tg", 4)
    }
}

/// FNV-1a: stable across processes, releases and architectures, unlike std's
/// randomly seeded hasher.
pub fn shard_of(instrument: &str, shards: u16) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in instrument.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The modulus is below u16::MAX, so the cast cannot truncate.
    (h % u64::from(shards.max(1))) as u16
}

/// How a stream is kept bounded. Trimming is approximate (`~`), which lets Redis
/// drop whole macro-nodes and keeps XADD cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trim {
    /// Keep about this many entries.
    MaxLen(u64),
    /// Keep entries younger than this (`MINID` from the entry ids' milliseconds).
    MaxAge(Duration),
    /// Never trim.
    None,
}

impl Trim {
    /// The trim arguments of an XADD (`MAXLEN ~ n`, `MINID ~ id` or nothing).
    pub fn args(&self) -> Vec<String> {
        match *self {
            Trim::MaxLen(n) => vec!["MAXLEN".into(), "~".into(), n.to_string()],
            Trim::MaxAge(age) => {
                let now_ms = u64::try_from(now_nanos() / 1_000_000).unwrap_or(0);
                let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                vec![
                    "MINID".into(),
                    "~".into(),
                    now_ms.saturating_sub(age_ms).to_string(),
                ]
            }
            Trim::None => Vec::new(),
        }
    }

    /// An `XADD key <trim> * field value ...` command.
    pub fn xadd(&self, key: &str, fields: &[(&str, &[u8])]) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(key).arg(self.args()).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd
    }
}

impl FromStr for Trim {
    type Err = String;

    /// `maxlen:<entries>`, `maxage:<seconds>` or `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("expected maxlen:<entries>, maxage:<seconds> or none, got {s:?}");
        match s.split_once(':') {
            Some(("maxlen", n)) => n.parse().map(Trim::MaxLen).map_err(|_| bad()),
            Some(("maxage", n)) => n
                .parse()
                .map(|secs| Trim::MaxAge(Duration::from_secs(secs)))
                .map_err(|_| bad()),
            None if s == "none" => Ok(Trim::None),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Trim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trim::MaxLen(n) => write!(f, "maxlen:{n}"),
            Trim::MaxAge(d) => write!(f, "maxage:{}", d.as_secs()),
            Trim::None => f.write_str("none"),
        }
    }
}

/// What a raw stream entry holds: the validated event and when ingest accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRecord {
    pub event: Event,
    /// Wall-clock nanoseconds at which ingest received the batch.
    pub ingest_ns: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encoding a stream record: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding a stream record: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("stream entry has no `{RECORD_FIELD}` field")]
    MissingField,
}

impl RawRecord {
    /// A positional MessagePack array (`[event, ingest_ns]`, nested structs
    /// likewise): field names made up more than half of every record's bytes,
    /// paid for in every XADD, read and decode. Readers take both this and the
    /// map form written before, since serde's derived decoders accept either.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        Ok(rmp_serde::to_vec(self)?)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

/// Joins records already encoded (each one MessagePack value) into the record
/// field of one batch entry: a MessagePack array of them, built without decoding
/// or re-encoding any record.
pub fn encode_batch<'a, I>(records: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: ExactSizeIterator,
{
    let records = records.into_iter();
    let len = records.len();
    let mut out = Vec::with_capacity(5 + len * 160);
    // Writing to a Vec cannot fail; the length fits u32 as entries are capped far below.
    let _ = rmp::encode::write_array_len(&mut out, u32::try_from(len).unwrap_or(u32::MAX));
    for r in records {
        out.extend_from_slice(r);
    }
    out
}

/// Whether an entry's record field is a batch (an array) rather than one record.
pub fn is_batch(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(0x90..=0x9f | 0xdc | 0xdd))
}

/// An event's place in a stream: `<entry id>.<index>` inside a batch entry, the
/// entry id alone for an entry of one record.
pub fn event_position(entry_id: &str, index: usize, batch: bool) -> String {
    if batch {
        format!("{entry_id}.{index}")
    } else {
        entry_id.to_owned()
    }
}

/// Decodes an entry's record field: a batch (a MessagePack array of records) or a
/// single record (a map), so entries written one event each still read.
///
/// The hand-written [`fast_decode`](crate::fast_decode) reads the entries our
/// writers produce; any other entry is read by [`decode_entry_with_serde`], so
/// the result (or the error) is always the one serde gives.
pub fn decode_entry<T>(bytes: &[u8]) -> Result<Vec<T>, CodecError>
where
    T: FastDecode + serde::de::DeserializeOwned,
{
    match try_fast(bytes) {
        Some(records) => Ok(records),
        None => decode_entry_with_serde(bytes),
    }
}

/// [`decode_entry`] by `rmp_serde` alone: its fallback, and what tests and
/// benchmarks compare the fast path with.
pub fn decode_entry_with_serde<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<Vec<T>, CodecError> {
    if is_batch(bytes) {
        Ok(rmp_serde::from_slice(bytes)?)
    } else {
        Ok(vec![rmp_serde::from_slice(bytes)?])
    }
}

/// A dead-lettered event: where it was refused, why, and its original bytes.
/// `tickgraph-enrich`'s `deadletter` module lists and replays them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// `ingest` or `enrich`.
    pub stage: &'static str,
    pub reason: String,
    /// The event as the producer sent it (ingest) or as it was accepted (enrich).
    pub payload: Vec<u8>,
    /// The event id `source:seq`, when it was known.
    pub event_id: Option<String>,
    /// When ingest accepted the event, when it had (enrich): a replay puts the
    /// event back with it, so its `ingest_ns` stays the original one.
    pub ingest_ns: Option<i64>,
    pub at_ns: i64,
}

impl DeadLetter {
    /// Most of a payload kept. The largest valid event, as JSON, is under a
    /// kilobyte, so this holds any event enrich refuses whole, and enough of
    /// a malformed one to see what is wrong with it; the rest is cut, which
    /// bounds what one letter pins in Redis.
    pub const PAYLOAD_MAX: usize = 2 * 1024;

    /// Most of a reason kept. Reasons quote at most 64 characters of a value
    /// (decoder errors 300), so only the cut note itself can come near it.
    pub const REASON_MAX: usize = 512;

    /// Most bytes one letter counts against its stream's `--dlq-max-bytes`
    /// ([`DeadLetter::counted_bytes`]): the payload and the reason at most,
    /// plus the field names, the stage, the times and the event id.
    pub const MAX_BYTES: usize = Self::PAYLOAD_MAX + Self::REASON_MAX + 256;

    /// A dead letter; a payload over [`Self::PAYLOAD_MAX`] is cut, and the reason
    /// says how many bytes were.
    pub fn new(stage: &'static str, reason: String, mut payload: Vec<u8>) -> Self {
        let reason = if payload.len() > Self::PAYLOAD_MAX {
            let len = payload.len();
            payload.truncate(Self::PAYLOAD_MAX);
            format!(
                "{reason} (payload cut: the first {} of {len} bytes kept, {} cut)",
                Self::PAYLOAD_MAX,
                len - Self::PAYLOAD_MAX
            )
        } else {
            reason
        };
        Self {
            stage,
            reason: cap_reason(reason),
            payload,
            event_id: None,
            ingest_ns: None,
            at_ns: now_nanos(),
        }
    }

    /// What this letter counts against its stream's byte bound: the bytes of
    /// its field names and values, as [`DLQ_ADD_LUA`] adds them up.
    pub fn counted_bytes(&self) -> usize {
        self.fields().iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// The entry's fields, as XADD takes them.
    pub fn fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut fields = vec![
            ("stage", self.stage.as_bytes().to_vec()),
            ("reason", self.reason.clone().into_bytes()),
            ("payload", self.payload.clone()),
            ("at_ns", self.at_ns.to_string().into_bytes()),
        ];
        if let Some(id) = &self.event_id {
            fields.push(("event_id", id.clone().into_bytes()));
        }
        if let Some(ns) = self.ingest_ns {
            fields.push(("ingest_ns", ns.to_string().into_bytes()));
        }
        fields
    }

    /// An `EVAL` of [`DLQ_ADD_LUA`] appending this letter to `stream` within
    /// `bounds`: for a writer that adds letters now and then (the loader).
    pub fn append(&self, stream: &str, bounds: DlqBounds) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(&*DLQ_APPEND_ONE)
            .arg(2)
            .arg(stream)
            .arg(dlq_bytes_key(stream))
            .arg(&bounds.args()[..]);
        for (k, v) in self.fields() {
            cmd.arg(k).arg(v);
        }
        cmd
    }
}

/// `reason` cut to at most [`DeadLetter::REASON_MAX`] bytes, on a character
/// boundary.
fn cap_reason(mut reason: String) -> String {
    const MARK: &str = "...";
    if reason.len() <= DeadLetter::REASON_MAX {
        return reason;
    }
    let mut cut = DeadLetter::REASON_MAX - MARK.len();
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    reason.truncate(cut);
    reason.push_str(MARK);
    reason
}

/// How a dead-letter stream is kept bounded: by `trim` (entries, or age) and
/// by `max_bytes` of letters ([`DeadLetter::counted_bytes`]), both enforced
/// by [`DLQ_ADD_LUA`] whenever a letter is added, whoever adds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DlqBounds {
    pub trim: Trim,
    pub max_bytes: u64,
}

impl DlqBounds {
    /// What every dead-letter stream keeps unless told otherwise: 100,000
    /// letters and 64 MiB of them, whichever is less.
    pub const DEFAULT: DlqBounds = DlqBounds {
        trim: Trim::MaxLen(100_000),
        max_bytes: 64 << 20,
    };

    /// `[max letters, oldest entry id's milliseconds, max bytes]` as
    /// [`DLQ_ADD_LUA`] takes them; 0 is no bound.
    pub fn args(&self) -> [u64; 3] {
        let (max_len, min_ms) = match self.trim {
            Trim::MaxLen(n) => (n, 0),
            Trim::MaxAge(age) => {
                let now_ms = u64::try_from(now_nanos() / 1_000_000).unwrap_or(0);
                let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                (0, now_ms.saturating_sub(age_ms).max(1))
            }
            Trim::None => (0, 0),
        };
        [max_len, min_ms, self.max_bytes]
    }
}

impl Default for DlqBounds {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The key holding the bytes a dead-letter stream's letters count
/// ([`DeadLetter::counted_bytes`]). It shares the stream's hash tag (or takes
/// the whole key as its tag), so scripts touch both in one cluster slot.
pub fn dlq_bytes_key(stream: &str) -> String {
    if stream.contains('{') {
        format!("{stream}:bytes")
    } else {
        format!("{{{stream}}}:bytes")
    }
}

/// `dlq_add(key, bytes_key, bounds, fields)`, a Lua function for the scripts
/// that write dead letters (ingest's append, enrich's commit, the loader's
/// [`DeadLetter::append`]); replays keep the count too (`tickgraph-enrich`'s
/// `deadletter`).
///
/// It appends `fields` to the stream `key` with one more field, `size`: the
/// bytes of the names and values given, added to the count in `bytes_key`.
/// Then, while the stream holds more letters than `bounds[1]`, letters older
/// than `bounds[2]` ms, or more counted bytes than `bounds[3]` (0: no such
/// bound), it deletes the oldest, taking each one's `size` off the count. So
/// the bound holds after every append, in bytes, whatever each letter's size,
/// and a stream's letters pin at most `max bytes` plus one letter. It never
/// deletes the letter just added, and deletes at most 256 per call: letters
/// written before this count existed have no `size` and count nothing, and a
/// stream full of them is emptied over a few appends instead of one long call.
/// An empty stream resets the count.
pub const DLQ_ADD_LUA: &str = r#"
local function dlq_add(key, bytes_key, bounds, fields)
  local size = 0
  for _, f in ipairs(fields) do size = size + #f end
  local cmd = { 'XADD', key, '*' }
  for _, f in ipairs(fields) do cmd[#cmd + 1] = f end
  cmd[#cmd + 1] = 'size'
  cmd[#cmd + 1] = tostring(size)
  local len = redis.call('XLEN', key)
  local id = redis.call(unpack(cmd))
  if len == 0 then
    redis.call('SET', bytes_key, size)
    return
  end
  len = len + 1
  local total = redis.call('INCRBY', bytes_key, size)
  local max_len, min_ms, max_bytes = tonumber(bounds[1]), tonumber(bounds[2]), tonumber(bounds[3])
  local removed, freed = 0, 0
  while removed < 256 do
    local oldest = redis.call('XRANGE', key, '-', '+', 'COUNT', 32)
    local gone = {}
    local done = #oldest == 0
    for _, e in ipairs(oldest) do
      local eid, f = e[1], e[2]
      local over = (max_len > 0 and len > max_len) or (max_bytes > 0 and total - freed > max_bytes)
        or (min_ms > 0 and tonumber(string.match(eid, '^%d+')) < min_ms)
      if eid == id or not over or removed == 256 then
        done = true
        break
      end
      for j = 1, #f, 2 do
        if f[j] == 'size' then freed = freed + (tonumber(f[j + 1]) or 0) end
      end
      gone[#gone + 1] = eid
      len = len - 1
      removed = removed + 1
    end
    if #gone > 0 then redis.call('XDEL', key, unpack(gone)) end
    if done then break end
  end
  if freed > 0 and redis.call('DECRBY', bytes_key, freed) < 0 then
    redis.call('SET', bytes_key, 0)
  end
end
"#;

/// [`DLQ_ADD_LUA`] for one letter: KEYS the stream and its count, ARGV the
/// three bounds, then the letter's field, value pairs.
static DLQ_APPEND_ONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{DLQ_ADD_LUA}\nlocal fields = {{}}\nfor i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end\n\
         dlq_add(KEYS[1], KEYS[2], {{ ARGV[1], ARGV[2], ARGV[3] }}, fields)\nreturn 1\n"
    )
});

/// A stream entry id `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl FromStr for EntryId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        Ok(Self {
            ms: ms.parse().map_err(|_| format!("bad stream id {s:?}"))?,
            seq: seq.parse().map_err(|_| format!("bad stream id {s:?}"))?,
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One entry read from a stream: its id and the bytes of its record field.
#[derive(Debug, Clone)]
pub struct StreamEntry {
    pub id: String,
    pub record: Option<Vec<u8>>,
}

/// Parses an XREAD/XREADGROUP reply into `(stream key, entries)` pairs. Entries
/// whose payload was deleted (XREADGROUP of a trimmed pending entry) have no record.
pub fn parse_read_reply(v: redis::Value) -> Result<Vec<(String, Vec<StreamEntry>)>, String> {
    use redis::Value;
    let streams = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(a) => a
            .into_iter()
            .map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop().unwrap_or(Value::Nil);
                    let key = kv.pop().unwrap_or(Value::Nil);
                    Ok((key, entries))
                }
                other => Err(format!("unexpected stream reply {other:?}")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Value::Map(m) => m,
        other => return Err(format!("unexpected XREAD reply {other:?}")),
    };
    streams
        .into_iter()
        .map(|(key, entries)| {
            let key = value_string(key)?;
            Ok((key, parse_entries(entries)?))
        })
        .collect()
}

/// Parses a list of `[id, [field, value, ...]]` (XRANGE, XAUTOCLAIM's second item).
pub fn parse_entries(v: redis::Value) -> Result<Vec<StreamEntry>, String> {
    use redis::Value;
    let Value::Array(items) = v else {
        return match v {
            Value::Nil => Ok(Vec::new()),
            other => Err(format!("unexpected entries {other:?}")),
        };
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut parts) = item else {
                return Err("stream entry is not an array".to_string());
            };
            if parts.len() != 2 {
                return Err("stream entry is not [id, fields]".to_string());
            }
            let fields = parts.pop().unwrap_or(Value::Nil);
            let id = value_string(parts.pop().unwrap_or(Value::Nil))?;
            let mut record = None;
            let fields = match fields {
                Value::Array(f) => f,
                Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                _ => Vec::new(),
            };
            let mut it = fields.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if matches!(&k, Value::BulkString(b) if b == RECORD_FIELD.as_bytes()) {
                    if let Value::BulkString(b) = v {
                        record = Some(b);
                    }
                }
            }
            Ok(StreamEntry { id, record })
        })
        .collect()
}

pub fn value_string(v: redis::Value) -> Result<String, String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b).map_err(|e| e.to_string()),
        redis::Value::SimpleString(s) => Ok(s),
        other => Err(format!("expected a string, got {other:?}")),
    }
}

/// Creates a consumer group at the start of a stream, creating the stream too;
/// an existing group is left as it is.
pub async fn ensure_group<C: redis::aio::ConnectionLike>(
    con: &mut C,
    key: &str,
    group: &str,
) -> redis::RedisResult<()> {
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(con)
        .await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_in_range() {
        for s in ["AAPL", "MSFT", "VOD.L", "7203.T", ""] {
            assert!(shard_of(s, 4) < 4);
        }
        assert_eq!(shard_of("AAPL", 1), 0);
        // Pinned: changing the hash would re-shard every deployment's history.
        assert_eq!(shard_of("AAPL", 16), 11);
        assert_eq!(shard_of("MSFT", 16), 3);
    }

    #[test]
    fn keys_share_the_shard_hash_tag() {
        let l = StreamLayout::new("tg", 4);
        assert_eq!(l.raw(3), "tg:raw:{3}");
        assert_eq!(l.enriched(3), "tg:enriched:{3}");
        assert_eq!(l.dlq(3), "tg:dlq:{3}");
        assert_eq!(l.all_dlqs().len(), 5);
    }

    #[test]
    fn trim_parses_and_prints() {
        for s in ["maxlen:1000", "maxage:3600", "none"] {
            assert_eq!(s.parse::<Trim>().expect("parses").to_string(), s);
        }
        assert!("maxlen:x".parse::<Trim>().is_err());
        assert!("keep".parse::<Trim>().is_err());
    }

    #[test]
    fn a_dead_letter_keeps_at_most_2_kib_of_payload_and_says_how_much_was_cut() {
        let big = DeadLetter::new("ingest", "bad".into(), vec![b'x'; 20_000]);
        assert_eq!(big.payload.len(), DeadLetter::PAYLOAD_MAX);
        assert_eq!(
            big.reason,
            "bad (payload cut: the first 2048 of 20000 bytes kept, 17952 cut)"
        );
        let small = DeadLetter::new("ingest", "bad".into(), b"{}".to_vec());
        assert_eq!(
            (small.payload.as_slice(), small.reason.as_str()),
            (&b"{}"[..], "bad")
        );
    }

    /// The most a letter can count, with every field at its longest, is
    /// within [`DeadLetter::MAX_BYTES`].
    #[test]
    fn no_letter_counts_more_than_max_bytes() {
        let mut letter = DeadLetter::new("enrich", "é".repeat(4096), vec![0xff; 1 << 20]);
        letter.event_id = Some(format!("{}:{}", "s".repeat(64), u64::MAX));
        letter.ingest_ns = Some(i64::MIN);
        letter.at_ns = i64::MIN;
        assert!(
            letter.reason.len() <= DeadLetter::REASON_MAX,
            "{}",
            letter.reason.len()
        );
        assert!(letter.reason.ends_with("..."));
        assert!(
            letter.counted_bytes() <= DeadLetter::MAX_BYTES,
            "{} > {}",
            letter.counted_bytes(),
            DeadLetter::MAX_BYTES
        );
    }

    #[test]
    fn batch_entries_and_single_record_entries_both_decode() {
        let rec = |seq: u64| RawRecord {
            event: serde_json::from_value(serde_json::json!({"quote": {
                "header": {"source": "s", "seq": seq, "instrument": "AAPL",
                           "venue": "XNAS", "ts": 1},
                "bid": "1.5", "ask": "1.6", "bid_size": "10", "ask_size": "20"}}))
            .expect("a quote"),
            ingest_ns: 7,
        };
        let encoded: Vec<Vec<u8>> = (1..=3).map(|s| rec(s).encode().expect("encodes")).collect();
        let batch = encode_batch(encoded.iter().map(Vec::as_slice));
        let back: Vec<RawRecord> = decode_entry(&batch).expect("batch decodes");
        assert_eq!(back, vec![rec(1), rec(2), rec(3)]);
        // Entries of one record are from before batching, when records were
        // MessagePack maps.
        let named = rmp_serde::to_vec_named(&rec(2)).expect("encodes");
        let single: Vec<RawRecord> = decode_entry(&named).expect("single decodes");
        assert_eq!(single, vec![rec(2)]);
        assert!(decode_entry::<RawRecord>(&[0x93, 0x01]).is_err());
        // A positional record alone is an array: read as a batch, it is not
        // one, and is refused rather than misread.
        assert!(is_batch(&encoded[0]));
        assert!(decode_entry::<RawRecord>(&encoded[0]).is_err());
    }

    #[test]
    fn records_are_positional_arrays_and_the_named_form_still_reads() {
        let trade = |trade_id: Option<&str>, account: Option<&str>| RawRecord {
            event: serde_json::from_value(serde_json::json!({"trade": {
                "header": {"source": "s", "seq": 1, "instrument": "AAPL",
                           "venue": "XNAS", "ts": 1},
                "price": "187.25", "qty": "100", "side": "buy",
                "trade_id": trade_id, "account": account}}))
            .expect("a trade"),
            ingest_ns: 7,
        };
        for rec in [
            trade(None, None),
            trade(Some("T1"), None),
            // A field after an absent one keeps its place.
            trade(None, Some("ACC-7")),
            trade(Some("T1"), Some("ACC-7")),
        ] {
            let positional = rec.encode().expect("encodes");
            let named = rmp_serde::to_vec_named(&rec).expect("encodes");
            assert_eq!(positional.first(), Some(&0x92), "[event, ingest_ns]");
            assert!(positional.len() * 2 < named.len(), "names were most of it");
            for bytes in [&positional, &named] {
                let batch = encode_batch(std::iter::once(bytes.as_slice()));
                let back: Vec<RawRecord> = decode_entry(&batch).expect("decodes");
                assert_eq!(back, vec![rec.clone()]);
            }
        }
    }

    #[test]
    fn entry_ids_order_numerically() {
        let a: EntryId = "9-5".parse().expect("id");
        let b: EntryId = "10-0".parse().expect("id");
        assert!(a < b);
        assert_eq!(b.to_string(), "10-0");
    }
}
