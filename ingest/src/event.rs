//! The event contract: what a producer may send, as types that are valid by
//! construction. Wire formats are decoded in [`crate::wire`]; this module turns a
//! decoded [`WireEvent`] into an [`Event`] or a [`Rejection`] naming the rule broken.

use std::borrow::Cow;
use std::fmt;

use compact_str::CompactString;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A producer's value as quoted in a rejection: at most 64 characters, so a
/// hostile megabyte-long field cannot blow up the answer or the dead-letter stream.
pub fn shown(s: &str) -> String {
    match clip(s, 64) {
        (head, true) => format!("{head:?}... ({} bytes)", s.len()),
        (_, false) => format!("{s:?}"),
    }
}

/// `s` cut to at most `max` characters, and whether anything was cut.
pub(crate) fn clip(s: &str, max: usize) -> (&str, bool) {
    match s.char_indices().nth(max) {
        Some((cut, _)) => (&s[..cut], true),
        None => (s, false),
    }
}

/// Why one event was refused. The text is shown to the producer and stored in the
/// dead-letter stream, so it names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

impl Rejection {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

macro_rules! ident_newtype {
    ($(#[$m:meta])* $name:ident, $what:literal, $max:expr, $ok:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(CompactString);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, Rejection> {
                let ok: fn(u8) -> bool = $ok;
                if s.is_empty() {
                    return Err(Rejection::new(concat!("`", $what, "` must not be empty")));
                }
                if s.len() > $max {
                    return Err(Rejection(format!(
                        "`{}` is longer than {} bytes", $what, $max
                    )));
                }
                if let Some(b) = s.bytes().find(|b| !ok(*b)) {
                    return Err(Rejection(format!(
                        "`{}` contains the character {:?}, which is not allowed",
                        $what,
                        char::from(b)
                    )));
                }
                Ok(Self(CompactString::new(s)))
            }

            /// As read back from our own streams: unchecked, exactly as the
            /// transparent `Deserialize` reads it.
            pub(crate) fn from_stream(s: CompactString) -> Self {
                Self(s)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

ident_newtype!(
    /// Producer id: letters, digits, `.`, `_`, `-`, at most 64 bytes.
    Source, "source", 64,
    |b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
);
ident_newtype!(
    /// Instrument symbol: printable ASCII without spaces, at most 32 bytes.
    Symbol, "instrument", 32,
    |b| b.is_ascii_graphic()
);
ident_newtype!(
    /// Account id: printable ASCII without spaces, at most 64 bytes.
    AccountId, "account", 64,
    |b| b.is_ascii_graphic()
);
ident_newtype!(
    /// Venue trade id: printable ASCII without spaces, at most 64 bytes.
    TradeId, "trade_id", 64,
    |b| b.is_ascii_graphic()
);

/// ISO 10383 market identifier code: four upper-case letters or digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Mic(CompactString);

impl Mic {
    pub fn parse(s: &str) -> Result<Self, Rejection> {
        if s.len() == 4
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            Ok(Self(CompactString::new(s)))
        } else {
            Err(Rejection(format!(
                "`venue` must be a 4-character upper-case MIC, got {}",
                shown(s)
            )))
        }
    }

    /// As read back from our own streams: unchecked, exactly as the transparent
    /// `Deserialize` reads it.
    pub(crate) fn from_stream(s: CompactString) -> Self {
        Self(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Mic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Event time in nanoseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// 2000-01-01T00:00:00Z: anything earlier is a producer bug, not market data.
    pub const MIN: i64 = 946_684_800_000_000_000;
    /// 2100-01-01T00:00:00Z.
    pub const MAX: i64 = 4_102_444_800_000_000_000;

    pub fn from_nanos(ns: i64) -> Result<Self, Rejection> {
        if (Self::MIN..Self::MAX).contains(&ns) {
            Ok(Self(ns))
        } else {
            Err(Rejection(format!(
                "`ts` {ns} is outside 2000-01-01..2100-01-01 in epoch nanoseconds"
            )))
        }
    }

    /// RFC 3339's `date-time` exactly: `T` between date and time (a space,
    /// which chrono takes too, is refused), at most nine fractional digits
    /// (chrono drops the rest without a word), and `Z` or a `±hh:mm` offset.
    pub fn parse_rfc3339(s: &str) -> Result<Self, Rejection> {
        rfc3339_shape(s.as_bytes()).map_err(|why| {
            Rejection(format!(
                "`ts` {} is not an RFC 3339 timestamp: {why}",
                shown(s)
            ))
        })?;
        let dt = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
            Rejection(format!(
                "`ts` {} is not an RFC 3339 timestamp: {e}",
                shown(s)
            ))
        })?;
        let ns = dt
            .timestamp_nanos_opt()
            .ok_or_else(|| Rejection(format!("`ts` {} is out of range", shown(s))))?;
        Self::from_nanos(ns)
    }

    /// Trusted constructor for values read back from our own streams and tables.
    pub fn from_nanos_unchecked(ns: i64) -> Self {
        Self(ns)
    }

    pub fn nanos(self) -> i64 {
        self.0
    }

    pub fn to_datetime(self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_nanos(self.0)
    }
}

/// The shape of RFC 3339's `date-time` (`YYYY-MM-DDThh:mm:ss[.f]Z|±hh:mm`,
/// `T` and `Z` in either case, as its ABNF allows); chrono then checks the
/// calendar.
fn rfc3339_shape(b: &[u8]) -> Result<(), &'static str> {
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let at = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(digits(0..4) && at(4, b'-') && digits(5..7) && at(7, b'-') && digits(8..10)) {
        return Err("the date must be YYYY-MM-DD");
    }
    match b.get(10) {
        Some(b'T' | b't') => {}
        Some(b' ') => return Err("a space between date and time, where RFC 3339 has `T`"),
        _ => return Err("`T` must follow the date"),
    }
    if !(digits(11..13) && at(13, b':') && digits(14..16) && at(16, b':') && digits(17..19)) {
        return Err("the time must be hh:mm:ss");
    }
    let mut i = 19;
    if at(i, b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        match i - start {
            0 => return Err("no digit after the point"),
            1..=9 => {}
            _ => return Err("more than 9 fractional digits (finer than a nanosecond)"),
        }
    }
    match b.get(i..) {
        Some([b'Z' | b'z']) => Ok(()),
        Some([b'+' | b'-', h1, h2, b':', m1, m2])
            if [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()) =>
        {
            Ok(())
        }
        _ => Err("the time must end in Z or an offset +hh:mm / -hh:mm"),
    }
}

pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Buy => "buy",
            Side::Sell => "sell",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Trade,
    Quote,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Trade => "trade",
            Kind::Quote => "quote",
        }
    }
}

/// The fields every event carries. `(source, seq)` identifies the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub source: Source,
    pub seq: u64,
    pub instrument: Symbol,
    pub venue: Mic,
    pub ts: Timestamp,
}

impl Header {
    /// `source:seq`, the event's stable identity.
    pub fn id(&self) -> String {
        format!("{}:{}", self.source, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trade {
    pub header: Header,
    #[serde(with = "crate::decimal")]
    pub price: Decimal,
    #[serde(with = "crate::decimal")]
    pub qty: Decimal,
    pub side: Side,
    // Always written (nil when absent): stream records are positional arrays,
    // where a skipped field would shift the ones after it. `default` still
    // reads records written as maps without them.
    #[serde(default)]
    pub trade_id: Option<TradeId>,
    #[serde(default)]
    pub account: Option<AccountId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    pub header: Header,
    #[serde(with = "crate::decimal")]
    pub bid: Decimal,
    #[serde(with = "crate::decimal")]
    pub ask: Decimal,
    #[serde(with = "crate::decimal")]
    pub bid_size: Decimal,
    #[serde(with = "crate::decimal")]
    pub ask_size: Decimal,
}

/// A validated event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Trade(Trade),
    Quote(Quote),
}

impl Event {
    pub fn header(&self) -> &Header {
        match self {
            Event::Trade(t) => &t.header,
            Event::Quote(q) => &q.header,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Event::Trade(_) => Kind::Trade,
            Event::Quote(_) => Kind::Quote,
        }
    }

    /// The stable identity `source:seq`.
    pub fn id(&self) -> String {
        self.header().id()
    }
}

/// One event as decoded from any wire format, before validation. Every field is
/// optional so that a missing field becomes a named rejection, not a parse failure.
///
/// Decoded by hand ([`de`]), not by serde's derive, which is lenient where a
/// producer's mistake should be named: it takes a struct written as an array
/// (fields by position), MessagePack map keys that are integers (a field's
/// index) or `bin`, and `bin` values as strings. Here an event is a map whose
/// keys are strings, string fields are strings, and a field given twice is
/// refused; unknown fields are skipped.
#[derive(Debug, Default)]
pub struct WireEvent<'a> {
    pub kind: Option<Cow<'a, str>>,
    pub source: Option<Cow<'a, str>>,
    pub seq: Option<u64>,
    pub instrument: Option<Cow<'a, str>>,
    pub venue: Option<Cow<'a, str>>,
    pub ts: Option<Timestamp>,
    pub price: Option<Decimal>,
    pub qty: Option<Decimal>,
    pub side: Option<Cow<'a, str>>,
    pub trade_id: Option<Cow<'a, str>>,
    pub account: Option<Cow<'a, str>>,
    pub bid: Option<Decimal>,
    pub ask: Option<Decimal>,
    pub bid_size: Option<Decimal>,
    pub ask_size: Option<Decimal>,
}

fn required<T>(v: Option<T>, name: &str, kind: &str) -> Result<T, Rejection> {
    v.ok_or_else(|| Rejection(format!("{kind} is missing required field `{name}`")))
}

/// History stores `seq` as a Postgres bigint, so the top bit must be clear.
fn seq_in_range(seq: u64) -> Result<u64, Rejection> {
    if i64::try_from(seq).is_ok() {
        Ok(seq)
    } else {
        Err(Rejection(format!("`seq` {seq} is above 2^63-1")))
    }
}

fn positive(v: Decimal, name: &str) -> Result<Decimal, Rejection> {
    if v.is_sign_positive() && !v.is_zero() {
        Ok(v.normalize())
    } else {
        Err(Rejection(format!(
            "`{name}` must be greater than zero, got {v}"
        )))
    }
}

fn non_negative(v: Decimal, name: &str) -> Result<Decimal, Rejection> {
    if v.is_sign_negative() && !v.is_zero() {
        Err(Rejection(format!("`{name}` must not be negative, got {v}")))
    } else {
        Ok(v.normalize())
    }
}

impl WireEvent<'_> {
    /// Validates every rule of the contract; the first rule broken is the reason.
    pub fn into_event(self) -> Result<Event, Rejection> {
        let kind = match self.kind.as_deref() {
            Some("trade") => Kind::Trade,
            Some("quote") => Kind::Quote,
            Some(other) => {
                return Err(Rejection(format!(
                    "`kind` must be \"trade\" or \"quote\", got {}",
                    shown(other)
                )))
            }
            None => return Err(Rejection::new("event is missing required field `kind`")),
        };
        let k = kind.as_str();
        let header = Header {
            source: Source::parse(&required(self.source, "source", k)?)?,
            seq: seq_in_range(required(self.seq, "seq", k)?)?,
            instrument: Symbol::parse(&required(self.instrument, "instrument", k)?)?,
            venue: Mic::parse(&required(self.venue, "venue", k)?)?,
            ts: required(self.ts, "ts", k)?,
        };
        match kind {
            Kind::Trade => {
                for (present, name) in [
                    (self.bid.is_some(), "bid"),
                    (self.ask.is_some(), "ask"),
                    (self.bid_size.is_some(), "bid_size"),
                    (self.ask_size.is_some(), "ask_size"),
                ] {
                    if present {
                        return Err(Rejection(format!("a trade has no field `{name}`")));
                    }
                }
                let side = match required(self.side, "side", k)?.as_ref() {
                    "buy" => Side::Buy,
                    "sell" => Side::Sell,
                    other => {
                        return Err(Rejection(format!(
                            "`side` must be \"buy\" or \"sell\", got {}",
                            shown(other)
                        )))
                    }
                };
                Ok(Event::Trade(Trade {
                    header,
                    price: positive(required(self.price, "price", k)?, "price")?,
                    qty: positive(required(self.qty, "qty", k)?, "qty")?,
                    side,
                    trade_id: self.trade_id.map(|s| TradeId::parse(&s)).transpose()?,
                    account: self.account.map(|s| AccountId::parse(&s)).transpose()?,
                }))
            }
            Kind::Quote => {
                for (present, name) in [
                    (self.price.is_some(), "price"),
                    (self.qty.is_some(), "qty"),
                    (self.side.is_some(), "side"),
                    (self.trade_id.is_some(), "trade_id"),
                    (self.account.is_some(), "account"),
                ] {
                    if present {
                        return Err(Rejection(format!("a quote has no field `{name}`")));
                    }
                }
                Ok(Event::Quote(Quote {
                    header,
                    bid: positive(required(self.bid, "bid", k)?, "bid")?,
                    ask: positive(required(self.ask, "ask", k)?, "ask")?,
                    bid_size: non_negative(required(self.bid_size, "bid_size", k)?, "bid_size")?,
                    ask_size: non_negative(required(self.ask_size, "ask_size", k)?, "ask_size")?,
                }))
            }
        }
    }
}

/// The strict decoding of [`WireEvent`]: field by field, each error wrapped
/// with the field's name so that a wrong type reads "`price`: invalid type:
/// boolean `true`, expected a decimal ...".
mod de {
    use std::borrow::Cow;
    use std::fmt;
    use std::marker::PhantomData;
    use std::str::FromStr;

    use rust_decimal::Decimal;
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
    use serde::Deserialize;

    use super::{Timestamp, WireEvent};

    /// The key serde_json uses for numbers under its `arbitrary_precision` feature,
    /// which keeps a decimal literal's exact digits instead of rounding through f64.
    const JSON_NUMBER_TOKEN: &str = "$serde_json::private::Number";

    fn named<E: de::Error>(field: &str, e: impl fmt::Display) -> E {
        E::custom(format_args!("`{field}`: {e}"))
    }

    /// The fields of an event, by the key naming them; any other string key is
    /// `Other`, skipped.
    #[derive(Clone, Copy)]
    enum Field {
        Kind,
        Source,
        Seq,
        Instrument,
        Venue,
        Ts,
        Price,
        Qty,
        Side,
        TradeId,
        Account,
        Bid,
        Ask,
        BidSize,
        AskSize,
        Other,
    }

    impl Field {
        fn of(key: &str) -> Self {
            match key {
                "kind" => Field::Kind,
                "source" => Field::Source,
                "seq" => Field::Seq,
                "instrument" => Field::Instrument,
                "venue" => Field::Venue,
                "ts" => Field::Ts,
                "price" => Field::Price,
                "qty" => Field::Qty,
                "side" => Field::Side,
                "trade_id" => Field::TradeId,
                "account" => Field::Account,
                "bid" => Field::Bid,
                "ask" => Field::Ask,
                "bid_size" => Field::BidSize,
                "ask_size" => Field::AskSize,
                _ => Field::Other,
            }
        }

        fn name(self) -> &'static str {
            match self {
                Field::Kind => "kind",
                Field::Source => "source",
                Field::Seq => "seq",
                Field::Instrument => "instrument",
                Field::Venue => "venue",
                Field::Ts => "ts",
                Field::Price => "price",
                Field::Qty => "qty",
                Field::Side => "side",
                Field::TradeId => "trade_id",
                Field::Account => "account",
                Field::Bid => "bid",
                Field::Ask => "ask",
                Field::BidSize => "bid_size",
                Field::AskSize => "ask_size",
                Field::Other => "",
            }
        }
    }

    /// A map key: a string, nothing else (MessagePack allows any value).
    impl<'de> Deserialize<'de> for Field {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Field;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a field name (a string)")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                    Ok(Field::of(v))
                }
            }
            d.deserialize_str(V)
        }
    }

    /// A string value, and only a string: MessagePack `bin` is refused.
    struct Text<'a>(Cow<'a, str>);

    impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<'a>(PhantomData<&'a ()>);
            impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
                type Value = Text<'a>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                    Ok(Text(Cow::Borrowed(v)))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                    Ok(Text(Cow::Owned(v.to_owned())))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'a>, E> {
                    Ok(Text(Cow::Owned(v)))
                }
            }
            d.deserialize_str(V(PhantomData))
        }
    }

    impl<'de: 'a, 'a> Deserialize<'de> for WireEvent<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(EventVisitor(PhantomData))
        }
    }

    struct EventVisitor<'a>(PhantomData<&'a ()>);

    impl<'de: 'a, 'a> Visitor<'de> for EventVisitor<'a> {
        type Value = WireEvent<'a>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an event object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            fn value<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
                map: &mut A,
                field: Field,
            ) -> Result<Option<T>, A::Error> {
                map.next_value::<Option<T>>()
                    .map_err(|e| named(field.name(), e))
            }
            fn text<'de, A: MapAccess<'de>>(
                map: &mut A,
                field: Field,
            ) -> Result<Option<Cow<'de, str>>, A::Error> {
                Ok(value::<Text<'de>, A>(map, field)?.map(|t| t.0))
            }
            fn decimal<'de, A: MapAccess<'de>>(
                map: &mut A,
                field: Field,
            ) -> Result<Option<Decimal>, A::Error> {
                Ok(value::<DecimalValue, A>(map, field)?.map(|d| d.0))
            }
            let mut e = WireEvent::default();
            // One bit per field seen, so a repeated one is refused (null too).
            let mut seen = 0u32;
            while let Some(field) = map.next_key::<Field>()? {
                if let Field::Other = field {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
                let bit = 1 << (field as u32);
                if seen & bit != 0 {
                    return Err(de::Error::duplicate_field(field.name()));
                }
                seen |= bit;
                match field {
                    Field::Kind => e.kind = text(&mut map, field)?,
                    Field::Source => e.source = text(&mut map, field)?,
                    Field::Seq => e.seq = value(&mut map, field)?,
                    Field::Instrument => e.instrument = text(&mut map, field)?,
                    Field::Venue => e.venue = text(&mut map, field)?,
                    Field::Ts => e.ts = value::<TsValue, A>(&mut map, field)?.map(|t| t.0),
                    Field::Price => e.price = decimal(&mut map, field)?,
                    Field::Qty => e.qty = decimal(&mut map, field)?,
                    Field::Side => e.side = text(&mut map, field)?,
                    Field::TradeId => e.trade_id = text(&mut map, field)?,
                    Field::Account => e.account = text(&mut map, field)?,
                    Field::Bid => e.bid = decimal(&mut map, field)?,
                    Field::Ask => e.ask = decimal(&mut map, field)?,
                    Field::BidSize => e.bid_size = decimal(&mut map, field)?,
                    Field::AskSize => e.ask_size = decimal(&mut map, field)?,
                    Field::Other => {}
                }
            }
            Ok(e)
        }
    }

    /// A decimal from a JSON number (exact digits), a string, or a MessagePack
    /// integer or float, in the one syntax of [`crate::decimal::parse`].
    pub struct DecimalValue(pub Decimal);

    pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
        crate::decimal::parse(s)
            .map_err(|e| format!("{} is not a decimal number ({e})", super::shown(s)))
    }

    impl<'de> Deserialize<'de> for DecimalValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = DecimalValue;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a decimal number or a string holding one")
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                    Ok(DecimalValue(Decimal::from(v)))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                    Ok(DecimalValue(Decimal::from(v)))
                }
                // Display gives the shortest digits that round-trip in the float's
                // own width: a MessagePack float32 1.1 is 1.1, where widening it
                // to f64 first would give 1.100000023841858.
                fn visit_f32<E: de::Error>(self, v: f32) -> Result<Self::Value, E> {
                    if !v.is_finite() {
                        return Err(E::custom("not a finite number"));
                    }
                    parse_decimal(&v.to_string())
                        .map(DecimalValue)
                        .map_err(E::custom)
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                    if !v.is_finite() {
                        return Err(E::custom("not a finite number"));
                    }
                    // The digits the producer wrote, for any price of up to 15 digits.
                    parse_decimal(&v.to_string())
                        .map(DecimalValue)
                        .map_err(E::custom)
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    parse_decimal(v).map(DecimalValue).map_err(E::custom)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    match map.next_key::<Cow<'de, str>>()? {
                        Some(k) if k == JSON_NUMBER_TOKEN => {
                            let s: Cow<'de, str> = map.next_value()?;
                            parse_decimal(&s)
                                .map(DecimalValue)
                                .map_err(de::Error::custom)
                        }
                        _ => Err(de::Error::invalid_type(de::Unexpected::Map, &self)),
                    }
                }
            }
            d.deserialize_any(V)
        }
    }

    /// A timestamp from integer epoch nanoseconds or an RFC 3339 string.
    pub struct TsValue(pub Timestamp);

    impl<'de> Deserialize<'de> for TsValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = TsValue;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("integer epoch nanoseconds or an RFC 3339 string")
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                    Timestamp::from_nanos(v).map(TsValue).map_err(E::custom)
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                    let v = i64::try_from(v).map_err(|_| E::custom("out of range"))?;
                    self.visit_i64(v)
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    Timestamp::parse_rfc3339(v).map(TsValue).map_err(E::custom)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    match map.next_key::<Cow<'de, str>>()? {
                        Some(k) if k == JSON_NUMBER_TOKEN => {
                            let s: Cow<'de, str> = map.next_value()?;
                            let ns = i64::from_str(&s).map_err(|_| {
                                de::Error::custom(format_args!(
                                    "{} is not integer epoch nanoseconds",
                                    super::shown(&s)
                                ))
                            })?;
                            self.visit_i64(ns)
                        }
                        _ => Err(de::Error::invalid_type(de::Unexpected::Map, &self)),
                    }
                }
            }
            d.deserialize_any(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Event, Rejection> {
        let w: WireEvent = serde_json::from_str(json).map_err(|e| Rejection(e.to_string()))?;
        w.into_event()
    }

    const TRADE: &str = r#"{"kind":"trade","source":"oms-1","seq":7,"instrument":"AAPL","venue":"XNAS","ts":"2026-11-25T10:31:07.123456789Z","price":189.1234567890123456789,"qty":"100","side":"buy","account":"ACC-1"}"#;

    #[test]
    fn a_trade_keeps_every_digit_of_its_price() {
        let Event::Trade(t) = parse(TRADE).expect("valid trade") else {
            panic!("not a trade")
        };
        assert_eq!(t.price.to_string(), "189.1234567890123456789");
        assert_eq!(t.header.ts.nanos() % 1_000_000_000, 123_456_789);
        assert_eq!(t.side, Side::Buy);
    }

    #[test]
    fn ts_may_be_epoch_nanoseconds() {
        let e = parse(r#"{"kind":"quote","source":"s","seq":1,"instrument":"X","venue":"XLON","ts":1764066667000000001,"bid":1.5,"ask":1.6,"bid_size":10,"ask_size":0}"#)
            .expect("valid quote");
        assert_eq!(e.header().ts.nanos(), 1_764_066_667_000_000_001);
    }

    #[test]
    fn a_wrong_type_names_the_field() {
        let err = parse(&TRADE.replace("\"qty\":\"100\"", "\"qty\":true")).unwrap_err();
        assert!(err.0.contains("`qty`"), "{err}");
    }

    #[test]
    fn a_missing_field_is_named() {
        let err = parse(&TRADE.replace("\"side\":\"buy\",", "")).unwrap_err();
        assert_eq!(err.0, "trade is missing required field `side`");
    }

    #[test]
    fn venue_must_be_a_mic() {
        assert!(Mic::parse("XNAS").is_ok());
        assert!(Mic::parse("xnas").is_err());
        assert!(Mic::parse("XNASD").is_err());
    }

    #[test]
    fn prices_must_be_positive() {
        let err = parse(&TRADE.replace("189.1234567890123456789", "-1")).unwrap_err();
        assert!(err.0.contains("greater than zero"), "{err}");
    }

    #[test]
    fn fields_of_the_other_kind_are_refused() {
        let err = parse(&TRADE.replace("\"side\"", "\"bid\":1,\"side\"")).unwrap_err();
        assert_eq!(err.0, "a trade has no field `bid`");
    }

    #[test]
    fn rejections_quote_at_most_64_characters_of_a_value() {
        let long = "X".repeat(1 << 20);
        let err = Mic::parse(&long).unwrap_err();
        assert!(err.0.len() < 200, "{} bytes", err.0.len());
        assert!(err.0.contains("(1048576 bytes)"), "{err}");
        assert_eq!(shown("XNAS"), "\"XNAS\"");
    }

    #[test]
    fn unknown_kind_is_refused() {
        let err = parse(&TRADE.replace("\"trade\"", "\"order\"")).unwrap_err();
        assert!(err.0.contains("`kind`"), "{err}");
    }

    fn quote_json(bid: &str, ts: &str) -> String {
        format!(
            r#"{{"kind":"quote","source":"s","seq":1,"instrument":"X","venue":"XLON","ts":{ts},"bid":{bid},"ask":"2","bid_size":10,"ask_size":0}}"#
        )
    }

    #[test]
    fn decimals_are_written_as_json_numbers_and_nothing_looser() {
        for bad in [
            "1_000", " 1.5", "1.5 ", "+1.5", ".5", "5.", "01.5", "00", "1e", "1e+", "0x10", "1,5",
            "", "-", "Infinity", "1.5.", "1__0",
        ] {
            let err =
                parse(&quote_json(&format!("{bad:?}"), "1764066667000000001")).expect_err(bad);
            assert!(
                err.0.contains("`bid`") && err.0.contains("is not a decimal number"),
                "{bad:?}: {err}"
            );
        }
        let err = parse(&quote_json("\"1_000\"", "1764066667000000001")).unwrap_err();
        assert!(err.0.contains("an underscore"), "{err}");
        for (good, want) in [
            ("\"1000\"", "1000"),
            ("\"0.50\"", "0.5"),
            ("\"1.5e3\"", "1500"),
            ("\"1.5E-3\"", "0.0015"),
            ("\"2e+2\"", "200"),
            ("1.5e3", "1500"),
            ("189.1234567890123456789", "189.1234567890123456789"),
        ] {
            let Event::Quote(q) = parse(&quote_json(good, "1764066667000000001")).expect(good)
            else {
                panic!("not a quote")
            };
            assert_eq!(q.bid.to_string(), want, "{good}");
        }
        // More places than a decimal holds is refused, not rounded.
        let err = parse(&quote_json(
            "\"1.00000000000000000000000000001\"",
            "1764066667000000001",
        ))
        .unwrap_err();
        assert!(err.0.contains("`bid`"), "{err}");
    }

    #[test]
    fn timestamps_are_rfc_3339_date_times_exactly() {
        for bad in [
            "2026-11-25 10:31:07Z",
            "2026-11-25T10:31:07",
            "2026-11-25T10:31:07.1234567891Z",
            "2026-11-25T10:31:07.Z",
            "2026-11-25T10:31:07+0100",
            "2026-11-25T10:31Z",
            "2026-11-25T10:31:07Z ",
            " 2026-11-25T10:31:07Z",
            "20261125T103107Z",
            "2026-13-25T10:31:07Z",
        ] {
            let err = parse(&quote_json("1", &format!("{bad:?}"))).expect_err(bad);
            assert!(
                err.0.contains("is not an RFC 3339 timestamp"),
                "{bad:?}: {err}"
            );
        }
        let err = parse(&quote_json("1", "\"2026-11-25 10:31:07Z\"")).unwrap_err();
        assert!(err.0.contains("a space between date and time"), "{err}");
        for (good, nanos) in [
            ("2026-11-25T10:31:07Z", 1_795_602_667_000_000_000),
            ("2026-11-25t10:31:07.5z", 1_795_602_667_500_000_000),
            (
                "2026-11-25T11:31:07.123456789+01:00",
                1_795_602_667_123_456_789,
            ),
        ] {
            let e = parse(&quote_json("1", &format!("{good:?}"))).expect(good);
            assert_eq!(e.header().ts.nanos(), nanos, "{good}");
        }
    }

    /// Writes one MessagePack value.
    type Writes<'a> = &'a dyn Fn(&mut Vec<u8>);

    fn text(v: &'static str) -> impl Fn(&mut Vec<u8>) {
        move |o| rmp::encode::write_str(o, v).expect("vec")
    }

    fn uint(v: u64) -> impl Fn(&mut Vec<u8>) {
        move |o| {
            rmp::encode::write_uint(o, v).expect("vec");
        }
    }

    /// A MessagePack map of `(key, key as bin, value)`.
    fn msgpack_event(pairs: &[(&[u8], bool, Writes<'_>)]) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_map_len(&mut out, pairs.len() as u32).expect("vec");
        for (key, key_is_bin, value) in pairs {
            if *key_is_bin {
                rmp::encode::write_bin(&mut out, key).expect("vec");
            } else {
                rmp::encode::write_str(&mut out, std::str::from_utf8(key).expect("utf8"))
                    .expect("vec");
            }
            value(&mut out);
        }
        out
    }

    fn decode_msgpack(bytes: &[u8]) -> Result<Event, Rejection> {
        rmp_serde::from_slice::<WireEvent>(bytes)
            .map_err(|e| Rejection(e.to_string()))?
            .into_event()
    }

    fn msgpack_quote(kind_as_bin: bool, key_as_bin: bool) -> Vec<u8> {
        let kind = move |o: &mut Vec<u8>| {
            if kind_as_bin {
                rmp::encode::write_bin(o, b"quote").expect("vec");
            } else {
                rmp::encode::write_str(o, "quote").expect("vec");
            }
        };
        msgpack_event(&[
            (b"kind", false, &kind),
            (b"source", key_as_bin, &text("s")),
            (b"seq", false, &uint(1)),
            (b"instrument", false, &text("X")),
            (b"venue", false, &text("XLON")),
            (b"ts", false, &uint(1_764_066_667_000_000_001)),
            (b"bid", false, &text("1")),
            (b"ask", false, &text("2")),
            (b"bid_size", false, &uint(10)),
            (b"ask_size", false, &uint(0)),
        ])
    }

    #[test]
    fn messagepack_bin_is_not_a_string() {
        assert!(decode_msgpack(&msgpack_quote(false, false)).is_ok());
        let err = decode_msgpack(&msgpack_quote(true, false)).unwrap_err();
        assert!(
            err.0.contains("`kind`") && err.0.contains("expected a string"),
            "{err}"
        );
        let err = decode_msgpack(&msgpack_quote(false, true)).unwrap_err();
        assert!(err.0.contains("expected a field name"), "{err}");
    }

    #[test]
    fn messagepack_keys_are_names_not_field_indexes() {
        // Key 0 would be the first field, `kind`, to serde's derive.
        let mut bytes = Vec::new();
        rmp::encode::write_map_len(&mut bytes, 1).expect("vec");
        rmp::encode::write_uint(&mut bytes, 0).expect("vec");
        rmp::encode::write_str(&mut bytes, "quote").expect("vec");
        let err = decode_msgpack(&bytes).unwrap_err();
        assert!(err.0.contains("expected a field name"), "{err}");
    }

    #[test]
    fn an_event_is_an_object_never_an_array_of_its_fields() {
        let positional = r#"["quote","s",1,"X","XLON",1764066667000000001,"1","2","10","0"]"#;
        let err = parse(positional).unwrap_err();
        assert!(err.0.contains("expected an event object"), "{err}");
        let mut bytes = Vec::new();
        rmp::encode::write_array_len(&mut bytes, 2).expect("vec");
        rmp::encode::write_str(&mut bytes, "quote").expect("vec");
        rmp::encode::write_str(&mut bytes, "s").expect("vec");
        let err = decode_msgpack(&bytes).unwrap_err();
        assert!(err.0.contains("expected an event object"), "{err}");
    }

    #[test]
    fn a_field_given_twice_is_refused_even_as_null() {
        let err = parse(&TRADE.replace("\"side\":\"buy\"", "\"side\":null,\"side\":\"buy\""))
            .unwrap_err();
        assert!(err.0.contains("duplicate field `side`"), "{err}");
        // Unknown fields are skipped, whatever they hold.
        assert!(parse(&TRADE.replace("\"side\"", "\"x\":[{\"y\":1}],\"side\"")).is_ok());
    }

    #[test]
    fn a_messagepack_float32_keeps_its_own_shortest_digits() {
        let f32_bid = |o: &mut Vec<u8>| rmp::encode::write_f32(o, 1.1).expect("vec");
        let f64_bid = |o: &mut Vec<u8>| rmp::encode::write_f64(o, 187.25).expect("vec");
        for (bid, want) in [(&f32_bid as Writes<'_>, "1.1"), (&f64_bid, "187.25")] {
            let bytes = msgpack_event(&[
                (b"kind", false, &text("quote")),
                (b"source", false, &text("s")),
                (b"seq", false, &uint(1)),
                (b"instrument", false, &text("X")),
                (b"venue", false, &text("XLON")),
                (b"ts", false, &uint(1_764_066_667_000_000_001)),
                (b"bid", false, bid),
                (b"ask", false, &text("2")),
                (b"bid_size", false, &uint(10)),
                (b"ask_size", false, &uint(0)),
            ]);
            let Event::Quote(q) = decode_msgpack(&bytes).expect("valid") else {
                panic!("not a quote")
            };
            assert_eq!(q.bid.to_string(), want);
        }
    }

    #[test]
    fn ts_out_of_range_is_refused() {
        let err = parse(&TRADE.replace("\"2026-11-25T10:31:07.123456789Z\"", "5")).unwrap_err();
        assert!(err.0.contains("`ts`"), "{err}");
    }
}
