//! MessagePack values as a tree, for tests of the entry decoders: records built
//! the way our writers encode them (tests check the bytes are equal), then
//! changed in ways the writers never produce (a key added, repeated, dropped or
//! reordered, a value of another type) to check the fast decoder hands every
//! such entry to `rmp_serde`.

use std::fmt;

use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::event::{Event, Header};
use crate::fast_decode::{try_fast, FastDecode};
use crate::stream::{decode_entry, decode_entry_with_serde, RawRecord};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    /// Written as `rmp_serde` writes an `i64`: the smallest form.
    Int(i64),
    /// Written as `rmp_serde` writes a `u64` or `u32`: the smallest form.
    UInt(u64),
    F64(f64),
    Str(String),
    /// A string whose bytes may not be UTF-8.
    RawStr(Vec<u8>),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(Value, Value)>),
}

impl Value {
    pub fn str(s: &str) -> Self {
        Value::Str(s.to_owned())
    }

    /// A map with string keys, in the given order.
    pub fn map<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Self {
        Value::Map(pairs.into_iter().map(|(k, v)| (Value::str(k), v)).collect())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut Vec<u8>) {
        use rmp::encode as w;
        let len = |n: usize| u32::try_from(n).expect("test values are small");
        // Writing to a Vec cannot fail.
        match self {
            Value::Nil => {
                let _ = w::write_nil(out);
            }
            Value::Bool(b) => {
                let _ = w::write_bool(out, *b);
            }
            Value::Int(i) => {
                let _ = w::write_sint(out, *i);
            }
            Value::UInt(u) => {
                let _ = w::write_uint(out, *u);
            }
            Value::F64(f) => {
                let _ = w::write_f64(out, *f);
            }
            Value::Str(s) => {
                let _ = w::write_str(out, s);
            }
            Value::RawStr(b) => {
                let _ = w::write_str_len(out, len(b.len()));
                out.extend_from_slice(b);
            }
            Value::Bin(b) => {
                let _ = w::write_bin(out, b);
            }
            Value::Array(items) => {
                let _ = w::write_array_len(out, len(items.len()));
                for v in items {
                    v.write(out);
                }
            }
            Value::Map(pairs) => {
                let _ = w::write_map_len(out, len(pairs.len()));
                for (k, v) in pairs {
                    k.write(out);
                    v.write(out);
                }
            }
        }
    }

    /// How many values the tree holds, itself included (map keys not counted).
    pub fn count(&self) -> usize {
        1 + match self {
            Value::Array(items) => items.iter().map(Value::count).sum(),
            Value::Map(pairs) => pairs.iter().map(|(_, v)| v.count()).sum(),
            _ => 0,
        }
    }

    /// The `n`th value in preorder, itself first (map keys not counted).
    pub fn nth_mut(&mut self, n: usize) -> Option<&mut Value> {
        let mut left = n;
        self.find(&mut left)
    }

    fn find(&mut self, left: &mut usize) -> Option<&mut Value> {
        if *left == 0 {
            return Some(self);
        }
        *left -= 1;
        match self {
            Value::Array(items) => items.iter_mut().find_map(|v| v.find(left)),
            Value::Map(pairs) => pairs.iter_mut().find_map(|(_, v)| v.find(left)),
            _ => None,
        }
    }

    /// The value under a string key of a map.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        match self {
            Value::Map(pairs) => pairs
                .iter_mut()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// A decimal as `crate::decimal` writes it: `[mantissa, scale]`, or text when
/// the mantissa needs more than 64 bits or `text` asks for the older form.
pub fn decimal(d: &Decimal, text: bool) -> Value {
    match i64::try_from(d.mantissa()) {
        Ok(m) if !text => Value::Array(vec![Value::Int(m), Value::UInt(u64::from(d.scale()))]),
        _ => Value::Str(d.to_string()),
    }
}

pub fn header(h: &Header) -> Value {
    Value::map([
        ("source", Value::str(h.source.as_str())),
        ("seq", Value::UInt(h.seq)),
        ("instrument", Value::str(h.instrument.as_str())),
        ("venue", Value::str(h.venue.as_str())),
        ("ts", Value::Int(h.ts.nanos())),
    ])
}

/// An event as `to_vec_named` writes it: externally tagged, fields by name,
/// `trade_id` and `account` left out when `None`.
pub fn event(e: &Event, text: bool) -> Value {
    let (variant, fields) = match e {
        Event::Trade(t) => {
            let mut fields = vec![
                ("header", header(&t.header)),
                ("price", decimal(&t.price, text)),
                ("qty", decimal(&t.qty, text)),
                ("side", Value::str(t.side.as_str())),
            ];
            // Nil when absent, as serde writes them now; writers before 11-26g
            // left them out, which the fast path's tests check separately.
            let opt = |v: Option<&str>| v.map_or(Value::Nil, Value::str);
            fields.push(("trade_id", opt(t.trade_id.as_ref().map(|x| x.as_str()))));
            fields.push(("account", opt(t.account.as_ref().map(|x| x.as_str()))));
            ("trade", fields)
        }
        Event::Quote(q) => (
            "quote",
            vec![
                ("header", header(&q.header)),
                ("bid", decimal(&q.bid, text)),
                ("ask", decimal(&q.ask, text)),
                ("bid_size", decimal(&q.bid_size, text)),
                ("ask_size", decimal(&q.ask_size, text)),
            ],
        ),
    };
    Value::map([(variant, Value::map(fields))])
}

/// A stream entry's tree: a lone record's own tree, or the array of a batch.
pub fn entry(mut trees: Vec<Value>, batch: bool) -> Value {
    match trees.pop() {
        Some(one) if !batch => one,
        last => Value::Array(trees.into_iter().chain(last).collect()),
    }
}

pub fn raw_record(r: &RawRecord, text: bool) -> Value {
    Value::map([
        ("event", event(&r.event, text)),
        ("ingest_ns", Value::Int(r.ingest_ns)),
    ])
}

/// Every field and variant name of raw and enriched records, and one that is
/// none of them: keys to add, so a key is repeated or unknown.
pub const NAMES: &[&str] = &[
    "event",
    "ingest_ns",
    "enriched_ns",
    "asset_class",
    "currency",
    "derived",
    "trade",
    "quote",
    "header",
    "source",
    "seq",
    "instrument",
    "venue",
    "ts",
    "price",
    "qty",
    "side",
    "trade_id",
    "account",
    "bid",
    "ask",
    "bid_size",
    "ask_size",
    "notional",
    "notional_usd",
    "mid",
    "spread",
    "bogus",
];

/// Values to put where another was: other types, near misses of what we write,
/// and shapes serde reads but our writers never produce.
pub fn odd_values() -> Vec<Value> {
    let pair = |m: i64, s: u64| Value::Array(vec![Value::Int(m), Value::UInt(s)]);
    vec![
        Value::Nil,
        Value::Bool(true),
        Value::Int(-1),
        Value::Int(0),
        Value::Int(i64::MIN),
        Value::UInt(u64::MAX),
        Value::UInt(1 << 32),
        Value::F64(1.5),
        Value::str("buy"),
        Value::str("sell"),
        Value::str("trade"),
        Value::str("quote"),
        Value::str("equity"),
        Value::str("1.50"),
        Value::str("1e3"),
        Value::str(""),
        Value::str("X".repeat(40).as_str()),
        Value::RawStr(vec![b'A', 0xff, 0xfe]),
        Value::Bin(b"AAPL".to_vec()),
        Value::Bin(vec![0xff]),
        pair(15, 1),
        pair(1, 28),
        pair(1, 29),
        Value::Array(vec![Value::Int(1)]),
        Value::Array(vec![Value::Int(1), Value::UInt(2), Value::UInt(3)]),
        Value::Array(vec![Value::Int(-5), Value::Int(-1)]),
        Value::Array(vec![Value::UInt(u64::MAX), Value::UInt(2)]),
        Value::Map(Vec::new()),
        Value::map([("buy", Value::Nil)]),
        Value::map([("trade", Value::Map(Vec::new()))]),
    ]
}

/// One change to a record tree; `at` picks a value in preorder, the other
/// numbers a pair or a palette entry, all wrapped to fit.
#[derive(Debug, Clone)]
pub enum Change {
    Replace {
        at: usize,
        with: usize,
    },
    AddKey {
        at: usize,
        pos: usize,
        name: usize,
        value: usize,
    },
    DropKey {
        at: usize,
        pos: usize,
    },
    SwapKeys {
        at: usize,
        i: usize,
        j: usize,
    },
    KeyAsBin {
        at: usize,
        pos: usize,
    },
}

impl Change {
    /// A change from plain numbers, so a test's strategy can be `any` of them.
    pub fn pick(kind: u8, a: usize, b: usize, c: usize) -> Self {
        match kind % 5 {
            0 => Change::Replace { at: a, with: b },
            1 => Change::AddKey {
                at: a,
                pos: b,
                name: c,
                value: b ^ c,
            },
            2 => Change::DropKey { at: a, pos: b },
            3 => Change::SwapKeys { at: a, i: b, j: c },
            _ => Change::KeyAsBin { at: a, pos: b },
        }
    }

    /// Applies the change; a map change aimed at something else does nothing.
    pub fn apply(&self, tree: &mut Value) {
        let odd = odd_values();
        let (Change::Replace { at, .. }
        | Change::AddKey { at, .. }
        | Change::DropKey { at, .. }
        | Change::SwapKeys { at, .. }
        | Change::KeyAsBin { at, .. }) = *self;
        let Some(node) = tree.nth_mut(at % tree.count()) else {
            return;
        };
        if let Change::Replace { with, .. } = *self {
            *node = odd[with % odd.len()].clone();
            return;
        }
        let Value::Map(pairs) = node else {
            return;
        };
        let len = pairs.len();
        match *self {
            Change::AddKey {
                pos, name, value, ..
            } => pairs.insert(
                pos % (len + 1),
                (
                    Value::str(NAMES[name % NAMES.len()]),
                    odd[value % odd.len()].clone(),
                ),
            ),
            _ if len == 0 => {}
            Change::DropKey { pos, .. } => {
                pairs.remove(pos % len);
            }
            Change::SwapKeys { i, j, .. } => pairs.swap(i % len, j % len),
            Change::KeyAsBin { pos, .. } => {
                let key = &mut pairs[pos % len].0;
                if let Value::Str(s) = key {
                    *key = Value::Bin(s.as_bytes().to_vec());
                }
            }
            Change::Replace { .. } => {}
        }
    }
}

/// Whether `decode_entry` reads `bytes` as `rmp_serde` alone does (the same
/// records, or an error with the same message), and the fast path, where it
/// answers, with the same records too. `Ok(true)` when the fast path answered.
/// Records are compared re-encoded as well, since `Decimal`'s `==` ignores
/// the scale.
/// A record as our writers wrote it: by position (since 11-26g) or with field
/// names (before); with `text`, decimals as text, as before `[mantissa, scale]`.
pub fn serialize<T: Serialize + ?Sized>(r: &T, text: bool, named: bool) -> Vec<u8> {
    let mut buf = Vec::new();
    let ser = rmp_serde::Serializer::new(&mut buf);
    let done = match (named, text) {
        (true, true) => r.serialize(&mut ser.with_struct_map().with_human_readable()),
        (true, false) => r.serialize(&mut ser.with_struct_map().with_binary()),
        (false, true) => r.serialize(&mut ser.with_human_readable()),
        (false, false) => r.serialize(&mut ser.with_binary()),
    };
    done.expect("a record encodes");
    buf
}

pub fn agrees<T>(bytes: &[u8]) -> Result<bool, String>
where
    T: FastDecode + DeserializeOwned + Serialize + PartialEq + fmt::Debug,
{
    let same = |a: &[T], b: &[T]| {
        a == b && rmp_serde::to_vec_named(a).ok() == rmp_serde::to_vec_named(b).ok()
    };
    let serde = decode_entry_with_serde::<T>(bytes);
    let fast = try_fast::<T>(bytes);
    if let Some(fast) = &fast {
        match &serde {
            Ok(s) if same(fast, s) => {}
            other => return Err(format!("fast path gave {fast:?}, serde {other:?}")),
        }
    }
    match (decode_entry::<T>(bytes), serde) {
        (Ok(a), Ok(b)) if same(&a, &b) => Ok(fast.is_some()),
        (Err(a), Err(b)) if a.to_string() == b.to_string() => Ok(false),
        (via, serde) => Err(format!("decode_entry gave {via:?}, serde {serde:?}")),
    }
}
