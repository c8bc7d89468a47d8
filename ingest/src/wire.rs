//! Bytes to events: the three batch formats ingest accepts, chosen by Content-Type.
//!
//! A batch is split into its items first and each item is decoded on its own, so
//! one malformed or mistyped event is rejected with its reason while the rest of the
//! batch passes. Only a body whose framing cannot be read (not a JSON array, not a
//! MessagePack array) fails as a whole.

use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::event::{Event, Rejection, WireEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`: one array of event objects.
    Json,
    /// `application/x-ndjson`: one event object per line.
    Ndjson,
    /// `application/msgpack`: one MessagePack array of event maps.
    MsgPack,
}

impl Format {
    /// Picks the format from a Content-Type header value (parameters ignored).
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/json" => Some(Self::Json),
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines" => Some(Self::Ndjson),
            "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Some(Self::MsgPack)
            }
            _ => None,
        }
    }

    pub const ACCEPTED: &'static str =
        "application/json, application/x-ndjson, application/msgpack";
}

/// One item of a batch: its original bytes (kept for the dead-letter stream) and
/// the outcome of decoding and validating it.
#[derive(Debug)]
pub struct Item<'a> {
    pub raw: &'a [u8],
    pub outcome: Result<Event, Rejection>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch holds more than {limit} events")]
    TooManyEvents { limit: usize },
    #[error("malformed body: {0}")]
    Malformed(String),
}

/// Decodes a whole batch into per-item outcomes, refusing more than `max_events`.
pub fn decode_batch(
    format: Format,
    body: &[u8],
    max_events: usize,
) -> Result<Vec<Item<'_>>, BatchError> {
    match format {
        Format::Json => decode_json_array(body, max_events),
        Format::Ndjson => decode_ndjson(body, max_events),
        Format::MsgPack => decode_msgpack_array(body, max_events),
    }
}

fn decode_json_item(raw: &[u8]) -> Result<Event, Rejection> {
    serde_json::from_slice::<WireEvent>(raw)
        .map_err(invalid)?
        .into_event()
}

/// A decoder's error as a rejection. Decoders quote offending values in full, so
/// the text is cut to keep a hostile value out of answers and dead letters.
fn invalid(e: impl std::fmt::Display) -> Rejection {
    let msg = format!("invalid event: {e}");
    match crate::event::clip(&msg, 300) {
        (head, true) => Rejection(format!("{head}...")),
        (_, false) => Rejection(msg),
    }
}

/// Reads the array's elements as raw slices, failing as soon as there are too many
/// (before allocating for all of them).
struct BoundedRawSeq {
    limit: usize,
}

impl<'de> DeserializeSeed<'de> for BoundedRawSeq {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BoundedRawSeq {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.limit));
        while let Some(v) = seq.next_element::<&'de RawValue>()? {
            if out.len() == self.limit {
                return Err(serde::de::Error::custom(TOO_MANY));
            }
            out.push(v);
        }
        Ok(out)
    }
}

const TOO_MANY: &str = "tickgraph: too many events";

fn decode_json_array(body: &[u8], limit: usize) -> Result<Vec<Item<'_>>, BatchError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let raws = BoundedRawSeq { limit }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| {
            if e.to_string().starts_with(TOO_MANY) {
                BatchError::TooManyEvents { limit }
            } else {
                BatchError::Malformed(e.to_string())
            }
        })?;
    Ok(raws
        .into_iter()
        .map(|r| {
            let raw = r.get().as_bytes();
            Item {
                raw,
                outcome: decode_json_item(raw),
            }
        })
        .collect())
}

fn decode_ndjson(body: &[u8], limit: usize) -> Result<Vec<Item<'_>>, BatchError> {
    let mut out = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if out.len() == limit {
            return Err(BatchError::TooManyEvents { limit });
        }
        out.push(Item {
            raw: line,
            outcome: decode_json_item(line),
        });
    }
    Ok(out)
}

/// MessagePack nesting deeper than this is refused rather than recursed into.
const MSGPACK_MAX_DEPTH: usize = 32;

fn decode_msgpack_array(body: &[u8], limit: usize) -> Result<Vec<Item<'_>>, BatchError> {
    let malformed = |m: String| BatchError::Malformed(format!("MessagePack: {m}"));
    let (len, mut pos) = match body.first() {
        Some(&b) if b & 0xf0 == 0x90 => (usize::from(b & 0x0f), 1),
        Some(0xdc) => (be_len(body, 1, 2).map_err(malformed)?, 3),
        Some(0xdd) => (be_len(body, 1, 4).map_err(malformed)?, 5),
        Some(_) => return Err(malformed("the body is not an array".into())),
        None => return Err(malformed("the body is empty".into())),
    };
    if len > limit {
        return Err(BatchError::TooManyEvents { limit });
    }
    // Every element takes at least one byte: a length prefix that promises more
    // than the body holds must not size the allocation.
    let mut out = Vec::with_capacity(len.min(body.len()));
    for i in 0..len {
        let end = msgpack_skip(body, pos, 0).map_err(|e| malformed(format!("element {i}: {e}")))?;
        let raw = &body[pos..end];
        let outcome = rmp_serde::from_slice::<WireEvent>(raw)
            .map_err(invalid)
            .and_then(WireEvent::into_event);
        out.push(Item { raw, outcome });
        pos = end;
    }
    if pos != body.len() {
        return Err(malformed(format!(
            "{} bytes after the array",
            body.len() - pos
        )));
    }
    Ok(out)
}

fn be_len(buf: &[u8], at: usize, width: usize) -> Result<usize, String> {
    let bytes = buf
        .get(at..at + width)
        .ok_or_else(|| "truncated length".to_string())?;
    Ok(bytes
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)))
}

/// Returns the offset just past the MessagePack value starting at `pos`, without
/// allocating, so a hostile length prefix costs nothing.
pub fn msgpack_skip(buf: &[u8], pos: usize, depth: usize) -> Result<usize, String> {
    if depth > MSGPACK_MAX_DEPTH {
        return Err(format!("nested deeper than {MSGPACK_MAX_DEPTH} levels"));
    }
    let marker = *buf.get(pos).ok_or("truncated value")?;
    let p = pos + 1;
    let (header, payload, children): (usize, usize, usize) = match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0, 0),
        0x80..=0x8f => (0, 0, usize::from(marker & 0x0f) * 2),
        0x90..=0x9f => (0, 0, usize::from(marker & 0x0f)),
        0xa0..=0xbf => (0, usize::from(marker & 0x1f), 0),
        0xc4 | 0xd9 => (1, be_len(buf, p, 1)?, 0),
        0xc5 | 0xda => (2, be_len(buf, p, 2)?, 0),
        0xc6 | 0xdb => (4, be_len(buf, p, 4)?, 0),
        0xc7 => (2, be_len(buf, p, 1)?, 0),
        0xc8 => (3, be_len(buf, p, 2)?, 0),
        0xc9 => (5, be_len(buf, p, 4)?, 0),
        0xca => (0, 4, 0),
        0xcb => (0, 8, 0),
        0xcc | 0xd0 => (0, 1, 0),
        0xcd | 0xd1 => (0, 2, 0),
        0xce | 0xd2 => (0, 4, 0),
        0xcf | 0xd3 => (0, 8, 0),
        0xd4 => (0, 2, 0),
        0xd5 => (0, 3, 0),
        0xd6 => (0, 5, 0),
        0xd7 => (0, 9, 0),
        0xd8 => (0, 17, 0),
        0xdc => (2, 0, be_len(buf, p, 2)?),
        0xdd => (4, 0, be_len(buf, p, 4)?),
        0xde => (2, 0, be_len(buf, p, 2)? * 2),
        0xdf => (4, 0, be_len(buf, p, 4)?.saturating_mul(2)),
        0xc1 => return Err("reserved marker 0xc1".into()),
    };
    let mut end = p
        .checked_add(header)
        .and_then(|e| e.checked_add(payload))
        .ok_or("length overflow")?;
    if end > buf.len() {
        return Err("truncated value".into());
    }
    // Each child takes at least one byte: a count beyond what is left is a lie.
    if children > buf.len() - end {
        return Err("element count exceeds the bytes left".into());
    }
    for _ in 0..children {
        end = msgpack_skip(buf, end, depth + 1)?;
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"kind":"quote","source":"s","seq":1,"instrument":"AAPL","venue":"XNAS","ts":1764066667000000000,"bid":"1.5","ask":"1.6","bid_size":10,"ask_size":5}"#;

    #[test]
    fn json_array_rejects_only_the_bad_item() {
        let body = format!(r#"[{GOOD}, {{"kind":"quote","seq":"x"}}, 5]"#);
        let items = decode_batch(Format::Json, body.as_bytes(), 10).expect("framing ok");
        assert_eq!(items.len(), 3);
        assert!(items[0].outcome.is_ok());
        let e1 = items[1].outcome.as_ref().unwrap_err();
        assert!(e1.0.contains("`seq`"), "{e1}");
        let e2 = items[2].outcome.as_ref().unwrap_err();
        assert!(e2.0.contains("an event object"), "{e2}");
        assert_eq!(items[2].raw, b"5");
    }

    #[test]
    fn json_that_is_not_an_array_is_malformed() {
        assert!(matches!(
            decode_batch(Format::Json, b"{\"a\":1}", 10),
            Err(BatchError::Malformed(_))
        ));
        assert!(matches!(
            decode_batch(Format::Json, b"[1,2", 10),
            Err(BatchError::Malformed(_))
        ));
    }

    #[test]
    fn too_many_events_is_its_own_error() {
        let body = format!("[{GOOD},{GOOD},{GOOD}]");
        assert_eq!(
            decode_batch(Format::Json, body.as_bytes(), 2).unwrap_err(),
            BatchError::TooManyEvents { limit: 2 }
        );
        let nd = format!("{GOOD}\n{GOOD}\n{GOOD}\n");
        assert_eq!(
            decode_batch(Format::Ndjson, nd.as_bytes(), 2).unwrap_err(),
            BatchError::TooManyEvents { limit: 2 }
        );
    }

    #[test]
    fn ndjson_keeps_going_past_a_broken_line() {
        let body = format!("{GOOD}\r\n{{not json\n\n{GOOD}\n");
        let items = decode_batch(Format::Ndjson, body.as_bytes(), 10).expect("ok");
        assert_eq!(items.len(), 3);
        assert!(items[0].outcome.is_ok());
        assert!(items[1].outcome.is_err());
        assert!(items[2].outcome.is_ok());
    }

    #[test]
    fn msgpack_array_decodes_and_rejects_per_item() {
        // serde_json::Value cannot stand in here: under arbitrary_precision its
        // numbers serialize as maps.
        #[derive(serde::Serialize)]
        #[serde(untagged)]
        enum V {
            S(&'static str),
            I(i64),
            F(f64),
            B(bool),
        }
        use std::collections::BTreeMap;
        let good: BTreeMap<&str, V> = [
            ("kind", V::S("quote")),
            ("source", V::S("s")),
            ("seq", V::I(1)),
            ("instrument", V::S("AAPL")),
            ("venue", V::S("XNAS")),
            ("ts", V::I(1_764_066_667_000_000_000)),
            ("bid", V::F(1.5)),
            ("ask", V::S("1.6")),
            ("bid_size", V::I(10)),
            ("ask_size", V::I(5)),
        ]
        .into_iter()
        .collect();
        let bad: BTreeMap<&str, V> = [("kind", V::S("trade")), ("price", V::B(true))]
            .into_iter()
            .collect();
        let body = rmp_serde::to_vec_named(&(good, bad)).expect("encode");
        let items = decode_batch(Format::MsgPack, &body, 10).expect("framing ok");
        assert_eq!(items.len(), 2);
        assert!(items[0].outcome.is_ok(), "{:?}", items[0].outcome);
        let e = items[1].outcome.as_ref().unwrap_err();
        assert!(e.0.contains("`price`"), "{e}");
    }

    #[test]
    fn msgpack_hostile_lengths_are_refused_without_allocating() {
        // An array claiming 2^32-1 elements, and a string claiming 4 GiB.
        assert!(matches!(
            decode_batch(Format::MsgPack, &[0xdd, 0xff, 0xff, 0xff, 0xff], 10_000),
            Err(BatchError::TooManyEvents { .. })
        ));
        assert!(matches!(
            decode_batch(Format::MsgPack, &[0x91, 0xdb, 0xff, 0xff, 0xff, 0xff], 10),
            Err(BatchError::Malformed(_))
        ));
        let deep: Vec<u8> = std::iter::once(0x91)
            .chain(std::iter::repeat_n(0x91, 100))
            .collect();
        assert!(matches!(
            decode_batch(Format::MsgPack, &deep, 10),
            Err(BatchError::Malformed(_))
        ));
    }

    #[test]
    fn a_huge_mistyped_value_is_not_echoed_in_full() {
        let body = format!(r#"[{{"kind":"trade","seq":"{}"}}]"#, "9".repeat(1 << 20));
        let items = decode_batch(Format::Json, body.as_bytes(), 10).expect("framing ok");
        let e = items[0].outcome.as_ref().unwrap_err();
        assert!(e.0.len() <= 310, "{} bytes", e.0.len());
    }

    #[test]
    fn content_types_map_to_formats() {
        assert_eq!(
            Format::from_content_type("application/json; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type("application/x-ndjson"),
            Some(Format::Ndjson)
        );
        assert_eq!(
            Format::from_content_type("application/msgpack"),
            Some(Format::MsgPack)
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
    }
}
