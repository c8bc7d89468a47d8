//! The enrich transform as a pure function: one raw record plus a snapshot of the
//! reference data in, one [`EnrichedRecord`] or the exact reason it cannot be
//! enriched out. No I/O, so every rule is unit-tested without Redis or Postgres.

use compact_str::CompactString;
use rust_decimal::Decimal;
use tickgraph_ingest::stream::RawRecord;
use tickgraph_ingest::{Event, Quote, Trade};

use crate::record::{Derived, EnrichedRecord};
use crate::refdata::RefData;

/// Why an accepted event cannot be enriched. The text goes to the dead-letter
/// stream, so it names the missing key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unenrichable {
    #[error("unknown instrument {0:?}")]
    UnknownInstrument(String),
    #[error("unknown venue {0:?}")]
    UnknownVenue(String),
    #[error("unknown account {0:?}")]
    UnknownAccount(String),
    #[error("no USD FX rate for currency {0:?}")]
    NoFxRate(String),
    /// A derived value does not fit a 96-bit decimal; rejecting keeps the
    /// pipeline alive where arithmetic would otherwise panic or round silently.
    #[error("`{0}` overflows a decimal")]
    Overflow(&'static str),
}

impl Unenrichable {
    /// Whether adding or fixing reference rows can make the event enrichable
    /// (an overflow is the event's own values: no reference row changes it).
    pub fn is_reference_gap(&self) -> bool {
        !matches!(self, Unenrichable::Overflow(_))
    }

    /// Whether a dead letter's reason, as this type's `Display` wrote it, is a
    /// reference gap. Dead letters keep only the text, and reading the text
    /// also covers letters written before this was asked.
    pub fn reason_is_reference_gap(reason: &str) -> bool {
        REFERENCE_GAP_PREFIXES.iter().any(|p| reason.starts_with(p))
    }

    /// The reason as a short code, for the dead-letter metric's label (the text
    /// names the missing key, so it cannot be one).
    pub fn code(&self) -> &'static str {
        match self {
            Unenrichable::UnknownInstrument(_) => "unknown_instrument",
            Unenrichable::UnknownVenue(_) => "unknown_venue",
            Unenrichable::UnknownAccount(_) => "unknown_account",
            Unenrichable::NoFxRate(_) => "no_fx_rate",
            Unenrichable::Overflow(_) => "overflow",
        }
    }
}

/// How the `Display` of each reference-gap variant begins (a test keeps them
/// in step with the variants).
const REFERENCE_GAP_PREFIXES: [&str; 4] = [
    "unknown instrument ",
    "unknown venue ",
    "unknown account ",
    "no USD FX rate for currency ",
];

/// Joins `rec` against `refs` and computes the derived fields.
///
/// The event's venue must be a known venue, but need not be the instrument's
/// primary listing: instruments trade away from home.
pub fn enrich(
    rec: &RawRecord,
    refs: &RefData,
    enriched_ns: i64,
) -> Result<EnrichedRecord, Unenrichable> {
    let header = rec.event.header();
    let instrument = refs
        .instruments
        .get(header.instrument.as_str())
        .ok_or_else(|| Unenrichable::UnknownInstrument(header.instrument.to_string()))?;
    if !refs.venues.contains_key(header.venue.as_str()) {
        return Err(Unenrichable::UnknownVenue(header.venue.to_string()));
    }
    let derived = match &rec.event {
        Event::Trade(t) => trade(t, refs, &instrument.currency)?,
        Event::Quote(q) => quote(q)?,
    };
    Ok(EnrichedRecord {
        event: rec.event.clone(),
        ingest_ns: rec.ingest_ns,
        enriched_ns,
        asset_class: instrument.asset_class,
        currency: CompactString::new(&instrument.currency),
        derived,
    })
}

fn trade(t: &Trade, refs: &RefData, currency: &str) -> Result<Derived, Unenrichable> {
    if let Some(account) = &t.account {
        if !refs.accounts.contains_key(account.as_str()) {
            return Err(Unenrichable::UnknownAccount(account.to_string()));
        }
    }
    let rate = refs
        .fx_usd
        .get(currency)
        .ok_or_else(|| Unenrichable::NoFxRate(currency.to_owned()))?;
    let notional = t
        .price
        .checked_mul(t.qty)
        .ok_or(Unenrichable::Overflow("notional"))?;
    let notional_usd = notional
        .checked_mul(*rate)
        .ok_or(Unenrichable::Overflow("notional_usd"))?;
    Ok(Derived::Trade {
        notional: notional.normalize(),
        notional_usd: notional_usd.normalize(),
    })
}

fn quote(q: &Quote) -> Result<Derived, Unenrichable> {
    let mid = q
        .bid
        .checked_add(q.ask)
        .and_then(|sum| sum.checked_div(Decimal::TWO))
        .ok_or(Unenrichable::Overflow("mid"))?;
    // A crossed quote (ask < bid) is a real market state, so a negative spread is
    // kept rather than rejected.
    let spread = q
        .ask
        .checked_sub(q.bid)
        .ok_or(Unenrichable::Overflow("spread"))?;
    Ok(Derived::Quote {
        mid: mid.normalize(),
        spread: spread.normalize(),
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use tickgraph_ingest::event::{AccountId, Header, Mic, Source, Symbol};
    use tickgraph_ingest::{Side, Timestamp};

    use super::*;
    use crate::refdata::{Account, AssetClass, Instrument, Venue};

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).expect("test decimal")
    }

    #[test]
    fn reference_gaps_are_recognised_by_their_reason_text() {
        let all = [
            Unenrichable::UnknownInstrument("ZZZ".into()),
            Unenrichable::UnknownVenue("XXXX".into()),
            Unenrichable::UnknownAccount("A9".into()),
            Unenrichable::NoFxRate("JPY".into()),
            Unenrichable::Overflow("notional"),
        ];
        for u in all {
            assert_eq!(
                Unenrichable::reason_is_reference_gap(&u.to_string()),
                u.is_reference_gap(),
                "{u}"
            );
        }
        assert!(!Unenrichable::reason_is_reference_gap(
            "undecodable raw entry 1-0: boom"
        ));
    }

    fn refs() -> RefData {
        let mut r = RefData::default();
        for (symbol, currency, venue, class) in [
            ("AAPL", "USD", "XNAS", AssetClass::Equity),
            ("VOD.L", "GBX", "XLON", AssetClass::Equity),
            ("7203.T", "JPY", "XTKS", AssetClass::Equity),
        ] {
            r.instruments.insert(
                symbol.into(),
                Instrument {
                    symbol: symbol.into(),
                    name: format!("{symbol} name"),
                    asset_class: class,
                    currency: currency.into(),
                    venue: venue.into(),
                    tick_size: dec("0.01"),
                    lot_size: Decimal::ONE,
                    sector: None,
                    isin: None,
                },
            );
        }
        for mic in ["XNAS", "XLON", "XTKS", "ARCX"] {
            r.venues.insert(
                mic.into(),
                Venue {
                    mic: mic.into(),
                    name: mic.into(),
                    country: "US".into(),
                    timezone: "America/New_York".into(),
                },
            );
        }
        r.accounts.insert(
            "ACC1".into(),
            Account {
                id: "ACC1".into(),
                desk: "desk".into(),
                owner: "owner".into(),
            },
        );
        r.fx_usd.insert("USD".into(), Decimal::ONE);
        r.fx_usd.insert("GBX".into(), dec("0.0126"));
        r
    }

    fn header(instrument: &str, venue: &str) -> Header {
        Header {
            source: Source::parse("test").expect("source"),
            seq: 7,
            instrument: Symbol::parse(instrument).expect("symbol"),
            venue: Mic::parse(venue).expect("mic"),
            ts: Timestamp::from_nanos(1_700_000_000_000_000_000).expect("ts"),
        }
    }

    fn trade(
        instrument: &str,
        venue: &str,
        price: &str,
        qty: &str,
        account: Option<&str>,
    ) -> RawRecord {
        RawRecord {
            event: Event::Trade(Trade {
                header: header(instrument, venue),
                price: dec(price),
                qty: dec(qty),
                side: Side::Buy,
                trade_id: None,
                account: account.map(|a| AccountId::parse(a).expect("account")),
            }),
            ingest_ns: 1_700_000_000_100_000_000,
        }
    }

    fn quote(instrument: &str, bid: &str, ask: &str) -> RawRecord {
        RawRecord {
            event: Event::Quote(Quote {
                header: header(instrument, "XNAS"),
                bid: dec(bid),
                ask: dec(ask),
                bid_size: dec("100"),
                ask_size: dec("200"),
            }),
            ingest_ns: 1_700_000_000_100_000_000,
        }
    }

    #[test]
    fn quote_gets_mid_and_spread() {
        let out = enrich(&quote("AAPL", "187.25", "187.26"), &refs(), 42).expect("enriched");
        assert_eq!(
            out.derived,
            Derived::Quote {
                mid: dec("187.255"),
                spread: dec("0.01")
            }
        );
        assert_eq!(out.asset_class, AssetClass::Equity);
        assert_eq!(out.currency, "USD");
        assert_eq!(out.enriched_ns, 42);
        assert_eq!(out.ingest_ns, 1_700_000_000_100_000_000);
    }

    #[test]
    fn crossed_quote_keeps_negative_spread() {
        let out = enrich(&quote("AAPL", "10.02", "10.00"), &refs(), 0).expect("enriched");
        assert_eq!(
            out.derived,
            Derived::Quote {
                mid: dec("10.01"),
                spread: dec("-0.02")
            }
        );
    }

    #[test]
    fn trade_gets_notional_in_usd() {
        let out = enrich(
            &trade("VOD.L", "XLON", "72.34", "1000", Some("ACC1")),
            &refs(),
            0,
        )
        .expect("enriched");
        assert_eq!(
            out.derived,
            Derived::Trade {
                notional: dec("72340"),
                notional_usd: dec("911.484")
            }
        );
        assert_eq!(out.currency, "GBX");
    }

    #[test]
    fn full_precision_is_kept() {
        let out = enrich(
            &trade(
                "AAPL",
                "XNAS",
                "0.000000123456789",
                "123456789.123456789",
                None,
            ),
            &refs(),
            0,
        )
        .expect("enriched");
        let Derived::Trade { notional, .. } = out.derived else {
            panic!("not a trade");
        };
        assert_eq!(notional, dec("15.241578765432099750190521"));
    }

    #[test]
    fn trade_may_print_away_from_primary_venue() {
        assert!(enrich(&trade("AAPL", "ARCX", "1", "1", None), &refs(), 0).is_ok());
    }

    #[test]
    fn unknown_instrument_is_named() {
        let err = enrich(&quote("ZZZZ", "1", "2"), &refs(), 0).expect_err("rejected");
        assert_eq!(err, Unenrichable::UnknownInstrument("ZZZZ".into()));
        assert_eq!(err.to_string(), "unknown instrument \"ZZZZ\"");
    }

    #[test]
    fn unknown_venue_is_named() {
        let err = enrich(&trade("AAPL", "XXXX", "1", "1", None), &refs(), 0).expect_err("rejected");
        assert_eq!(err.to_string(), "unknown venue \"XXXX\"");
    }

    #[test]
    fn unknown_account_is_named() {
        let err =
            enrich(&trade("AAPL", "XNAS", "1", "1", Some("A")), &refs(), 0).expect_err("rejected");
        assert_eq!(err.to_string(), "unknown account \"A\"");
    }

    #[test]
    fn missing_fx_rate_rejects_trades_only() {
        let err = enrich(&trade("7203.T", "XTKS", "2500", "100", None), &refs(), 0)
            .expect_err("rejected");
        assert_eq!(err.to_string(), "no USD FX rate for currency \"JPY\"");
        // A quote derives nothing in USD, so it does not need the rate.
        assert!(enrich(&quote("7203.T", "2500", "2501"), &refs(), 0).is_ok());
    }

    #[test]
    fn overflow_is_a_rejection_not_a_panic() {
        let err = enrich(
            &trade("AAPL", "XNAS", "79228162514264337593543950335", "2", None),
            &refs(),
            0,
        )
        .expect_err("rejected");
        assert_eq!(err, Unenrichable::Overflow("notional"));
        let err = enrich(
            &quote(
                "AAPL",
                "79228162514264337593543950335",
                "79228162514264337593543950335",
            ),
            &refs(),
            0,
        )
        .expect_err("rejected");
        assert_eq!(err, Unenrichable::Overflow("mid"));
    }
}
