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

    pub fn parse_rfc3339(s: &str) -> Result<Self, Rejection> {
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
#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "an event object")]
pub struct WireEvent<'a> {
    #[serde(default, borrow, deserialize_with = "de::kind")]
    pub kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "de::source")]
    pub source: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "de::seq")]
    pub seq: Option<u64>,
    #[serde(default, borrow, deserialize_with = "de::instrument")]
    pub instrument: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "de::venue")]
    pub venue: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "de::ts")]
    pub ts: Option<Timestamp>,
    #[serde(default, deserialize_with = "de::price")]
    pub price: Option<Decimal>,
    #[serde(default, deserialize_with = "de::qty")]
    pub qty: Option<Decimal>,
    #[serde(default, borrow, deserialize_with = "de::side")]
    pub side: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "de::trade_id")]
    pub trade_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "de::account")]
    pub account: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "de::bid")]
    pub bid: Option<Decimal>,
    #[serde(default, deserialize_with = "de::ask")]
    pub ask: Option<Decimal>,
    #[serde(default, deserialize_with = "de::bid_size")]
    pub bid_size: Option<Decimal>,
    #[serde(default, deserialize_with = "de::ask_size")]
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

/// Field deserializers. Each wraps its error with the field's name so that a wrong
/// type reads "`price`: invalid type: boolean `true`, expected a decimal ...".
mod de {
    use std::borrow::Cow;
    use std::fmt;
    use std::str::FromStr;

    use rust_decimal::Decimal;
    use serde::de::{self, Deserializer, MapAccess, Visitor};
    use serde::Deserialize;

    use super::Timestamp;

    /// The key serde_json uses for numbers under its `arbitrary_precision` feature,
    /// which keeps a decimal literal's exact digits instead of rounding through f64.
    const JSON_NUMBER_TOKEN: &str = "$serde_json::private::Number";

    fn named<E: de::Error>(field: &str, e: impl fmt::Display) -> E {
        E::custom(format_args!("`{field}`: {e}"))
    }

    macro_rules! field {
        ($name:ident, str) => {
            pub fn $name<'de: 'a, 'a, D: Deserializer<'de>>(
                d: D,
            ) -> Result<Option<Cow<'a, str>>, D::Error> {
                <Option<Cow<'a, str>>>::deserialize(d).map_err(|e| named(stringify!($name), e))
            }
        };
        ($name:ident, decimal) => {
            pub fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
                <Option<DecimalValue>>::deserialize(d)
                    .map(|v| v.map(|v| v.0))
                    .map_err(|e| named(stringify!($name), e))
            }
        };
    }

    field!(kind, str);
    field!(source, str);
    field!(instrument, str);
    field!(venue, str);
    field!(side, str);
    field!(trade_id, str);
    field!(account, str);
    field!(price, decimal);
    field!(qty, decimal);
    field!(bid, decimal);
    field!(ask, decimal);
    field!(bid_size, decimal);
    field!(ask_size, decimal);

    pub fn seq<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        <Option<u64>>::deserialize(d).map_err(|e| named("seq", e))
    }

    pub fn ts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        <Option<TsValue>>::deserialize(d)
            .map(|v| v.map(|v| v.0))
            .map_err(|e| named("ts", e))
    }

    /// A decimal from a JSON number (exact digits), a string, or a MessagePack
    /// integer or float.
    pub struct DecimalValue(pub Decimal);

    pub fn parse_decimal(s: &str) -> Result<Decimal, String> {
        let parsed = if s.contains(['e', 'E']) {
            Decimal::from_scientific(s)
        } else {
            Decimal::from_str_exact(s)
        };
        parsed.map_err(|e| format!("{} is not a decimal number ({e})", super::shown(s)))
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
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                    if !v.is_finite() {
                        return Err(E::custom("not a finite number"));
                    }
                    // Display gives the shortest digits that round-trip, which are the
                    // digits the producer wrote for any price of up to 15 digits.
                    parse_decimal(&v.to_string())
                        .map(DecimalValue)
                        .map_err(E::custom)
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                    parse_decimal(v.trim()).map(DecimalValue).map_err(E::custom)
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

    #[test]
    fn ts_out_of_range_is_refused() {
        let err = parse(&TRADE.replace("\"2026-11-25T10:31:07.123456789Z\"", "5")).unwrap_err();
        assert!(err.0.contains("`ts`"), "{err}");
    }
}
