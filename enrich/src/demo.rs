//! Demo reference data: a deterministic, realistic universe to run tickgraph
//! against. Well-known instruments come first (AAPL, VOD.L, 7203.T, EURUSD,
//! BTCUSD, ...), then generated listings on each venue that follow the venue's
//! conventions: symbol shape, quote currency (London in pence, `GBX`), tick size
//! table, board lot and ISIN prefix with a valid check digit.
//!
//! Generation uses its own fixed PRNG, not `rand`, so the set is identical across
//! releases and machines: a demo feed started anywhere sends the same symbols.

use std::collections::HashSet;
use std::str::FromStr;

use rust_decimal::Decimal;
use sqlx::PgPool;

use tickgraph_ingest::feed::{self, FeedInstrument};
use tickgraph_ingest::stream::RawRecord;
use tickgraph_ingest::wire::{decode_batch, Format};

use crate::refdata::{Account, AssetClass, Instrument, RefData, Venue};

/// What [`load_demo_data`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoSummary {
    pub venues: usize,
    pub instruments: usize,
    pub accounts: usize,
    pub currencies: usize,
    /// Rows inserted or changed by this run; 0 when the data was already there.
    pub changed_rows: u64,
}

/// Upserts the demo reference data in one transaction. Rows that already hold the
/// demo values are left untouched, so a second run changes nothing and sends no
/// change notifications.
pub async fn load_demo_data(pool: &PgPool) -> Result<DemoSummary, sqlx::Error> {
    let data = demo_refdata();
    let mut tx = pool.begin().await?;
    let mut changed = 0;

    let venues: Vec<&Venue> = sorted(data.venues.values(), |v| &v.mic);
    changed += sqlx::query(
        "INSERT INTO venues (mic, name, country, timezone) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) \
         ON CONFLICT (mic) DO UPDATE SET name = EXCLUDED.name, country = EXCLUDED.country, \
         timezone = EXCLUDED.timezone, updated_at = now() \
         WHERE (venues.name, venues.country, venues.timezone) \
         IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.country, EXCLUDED.timezone)",
    )
    .bind(venues.iter().map(|v| v.mic.as_str()).collect::<Vec<_>>())
    .bind(venues.iter().map(|v| v.name.as_str()).collect::<Vec<_>>())
    .bind(
        venues
            .iter()
            .map(|v| v.country.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        venues
            .iter()
            .map(|v| v.timezone.as_str())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let mut fx: Vec<(&String, &Decimal)> = data.fx_usd.iter().collect();
    fx.sort();
    changed += sqlx::query(
        "INSERT INTO fx_rates (currency, usd_rate) \
         SELECT * FROM UNNEST($1::text[], $2::numeric[]) \
         ON CONFLICT (currency) DO UPDATE SET usd_rate = EXCLUDED.usd_rate, updated_at = now() \
         WHERE fx_rates.usd_rate IS DISTINCT FROM EXCLUDED.usd_rate",
    )
    .bind(fx.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>())
    .bind(fx.iter().map(|(_, r)| **r).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let accounts: Vec<&Account> = sorted(data.accounts.values(), |a| &a.id);
    changed += sqlx::query(
        "INSERT INTO accounts (id, desk, owner) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]) \
         ON CONFLICT (id) DO UPDATE SET desk = EXCLUDED.desk, owner = EXCLUDED.owner, \
         updated_at = now() \
         WHERE (accounts.desk, accounts.owner) IS DISTINCT FROM (EXCLUDED.desk, EXCLUDED.owner)",
    )
    .bind(accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>())
    .bind(accounts.iter().map(|a| a.desk.as_str()).collect::<Vec<_>>())
    .bind(
        accounts
            .iter()
            .map(|a| a.owner.as_str())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let instruments: Vec<&Instrument> = sorted(data.instruments.values(), |i| &i.symbol);
    changed += sqlx::query(
        "INSERT INTO instruments (symbol, name, asset_class, currency, venue, tick_size, \
         lot_size, sector, isin) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
         $6::numeric[], $7::numeric[], $8::text[], $9::text[]) \
         ON CONFLICT (symbol) DO UPDATE SET name = EXCLUDED.name, \
         asset_class = EXCLUDED.asset_class, currency = EXCLUDED.currency, \
         venue = EXCLUDED.venue, tick_size = EXCLUDED.tick_size, \
         lot_size = EXCLUDED.lot_size, sector = EXCLUDED.sector, isin = EXCLUDED.isin, \
         updated_at = now() \
         WHERE (instruments.name, instruments.asset_class, instruments.currency, \
         instruments.venue, instruments.tick_size, instruments.lot_size, instruments.sector, \
         instruments.isin) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.asset_class, \
         EXCLUDED.currency, EXCLUDED.venue, EXCLUDED.tick_size, EXCLUDED.lot_size, \
         EXCLUDED.sector, EXCLUDED.isin)",
    )
    .bind(
        instruments
            .iter()
            .map(|i| i.symbol.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        instruments
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        instruments
            .iter()
            .map(|i| i.asset_class.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        instruments
            .iter()
            .map(|i| i.currency.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        instruments
            .iter()
            .map(|i| i.venue.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(instruments.iter().map(|i| i.tick_size).collect::<Vec<_>>())
    .bind(instruments.iter().map(|i| i.lot_size).collect::<Vec<_>>())
    .bind(
        instruments
            .iter()
            .map(|i| i.sector.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        instruments
            .iter()
            .map(|i| i.isin.as_deref())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();

    tx.commit().await?;
    let summary = DemoSummary {
        venues: data.venues.len(),
        instruments: data.instruments.len(),
        accounts: data.accounts.len(),
        currencies: data.fx_usd.len(),
        changed_rows: changed,
    };
    tracing::info!(?summary, "demo reference data loaded");
    Ok(summary)
}

fn sorted<'a, T>(items: impl Iterator<Item = &'a T>, key: impl Fn(&T) -> &String) -> Vec<&'a T> {
    let mut v: Vec<&T> = items.collect();
    v.sort_by(|a, b| key(a).cmp(key(b)));
    v
}

/// What the demo feed quotes: every instrument of `refs` at its reference price,
/// sorted by symbol so that the feed's skewed activity lands on the same names
/// every run.
pub fn feed_instruments(refs: &RefData) -> Vec<FeedInstrument> {
    let mut list: Vec<FeedInstrument> = refs
        .instruments
        .values()
        .map(|i| FeedInstrument {
            symbol: i.symbol.clone(),
            venue: i.venue.clone(),
            price: reference_price(i),
            tick: i.tick_size,
        })
        .collect();
    list.sort_by(|a, b| a.symbol.cmp(&b.symbol));
    list
}

/// `n` events of the demo feed over `refs` (`trade_ratio` of them trades, the
/// feed's seed 42), as ingest stores them, stamped `ingest_ns`: what benches,
/// tests and the decode-cost example decode and enrich. The feed writes only
/// valid events, so all `n` come back; callers that rely on it check the count.
pub fn feed_records(refs: &RefData, n: usize, trade_ratio: f64, ingest_ns: i64) -> Vec<RawRecord> {
    let mut market = feed::Market::new(
        feed_instruments(refs),
        "demo-feed".into(),
        trade_ratio,
        feed_accounts(refs),
        42,
    );
    let body = market.batch(n, false);
    decode_batch(Format::Json, &body, n)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|item| item.outcome.ok())
        .map(|event| RawRecord { event, ingest_ns })
        .collect()
}

/// The accounts the demo feed's trades name, sorted for repeatable runs.
pub fn feed_accounts(refs: &RefData) -> Vec<String> {
    let mut accounts: Vec<String> = refs.accounts.keys().cloned().collect();
    accounts.sort();
    accounts
}

/// A deterministic, plausible price to start a demo feed from: a multiple of the
/// instrument's tick size, never zero.
pub fn reference_price(i: &Instrument) -> Decimal {
    let base = WELL_KNOWN
        .iter()
        .find(|w| w.symbol == i.symbol)
        .map(|w| dec(w.price))
        .unwrap_or_else(|| generated_price(&i.symbol, i.asset_class, &i.currency));
    round_to_tick(base, i.tick_size)
}

fn round_to_tick(price: Decimal, tick: Decimal) -> Decimal {
    if tick <= Decimal::ZERO {
        return price;
    }
    let ticks = (price / tick).floor().max(Decimal::ONE);
    (ticks * tick).normalize()
}

/// The whole demo universe, in memory.
pub fn demo_refdata() -> RefData {
    let mut data = RefData::default();
    for &(mic, name, country, timezone) in VENUES {
        data.venues.insert(
            mic.to_string(),
            Venue {
                mic: mic.into(),
                name: name.into(),
                country: country.into(),
                timezone: timezone.into(),
            },
        );
    }
    for &(currency, rate) in FX_USD {
        data.fx_usd.insert(currency.into(), dec(rate));
    }
    for a in accounts() {
        data.accounts.insert(a.id.clone(), a);
    }
    for i in instruments() {
        data.instruments.insert(i.symbol.clone(), i);
    }
    data
}

/// `Decimal` from a literal in this file; the literals are tested to parse.
fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap_or(Decimal::ZERO)
}

const VENUES: &[(&str, &str, &str, &str)] = &[
    ("XNAS", "Nasdaq Stock Market", "US", "America/New_York"),
    ("XNYS", "New York Stock Exchange", "US", "America/New_York"),
    ("ARCX", "NYSE Arca", "US", "America/New_York"),
    (
        "XCME",
        "Chicago Mercantile Exchange",
        "US",
        "America/Chicago",
    ),
    ("XLON", "London Stock Exchange", "GB", "Europe/London"),
    ("XPAR", "Euronext Paris", "FR", "Europe/Paris"),
    ("XETR", "Xetra", "DE", "Europe/Berlin"),
    ("XEUR", "Eurex Deutschland", "DE", "Europe/Berlin"),
    ("XSWX", "SIX Swiss Exchange", "CH", "Europe/Zurich"),
    ("XTKS", "Tokyo Stock Exchange", "JP", "Asia/Tokyo"),
    (
        "XHKG",
        "Hong Kong Exchanges and Clearing",
        "HK",
        "Asia/Hong_Kong",
    ),
    // ISO 10383's code for trades away from any exchange: FX, crypto, bonds.
    ("XOFF", "Off-exchange (OTC)", "ZZ", "Etc/UTC"),
];

/// USD value of one unit. `GBX` is pence: London equities are quoted in it.
const FX_USD: &[(&str, &str)] = &[
    ("USD", "1"),
    ("EUR", "1.0850"),
    ("GBP", "1.2700"),
    ("GBX", "0.012700"),
    ("CHF", "1.1300"),
    ("JPY", "0.006650"),
    ("HKD", "0.128200"),
];

struct Known {
    symbol: &'static str,
    name: &'static str,
    class: AssetClass,
    currency: &'static str,
    venue: &'static str,
    sector: Option<&'static str>,
    isin: Option<&'static str>,
    price: &'static str,
    /// Empty: from the venue's tick table.
    tick: &'static str,
    /// Empty: the venue's board lot.
    lot: &'static str,
}

macro_rules! known {
    ($($sym:literal, $name:literal, $class:ident, $ccy:literal, $venue:literal, $sector:expr, $isin:expr, $price:literal, $tick:literal, $lot:literal;)*) => {
        &[$(Known {
            symbol: $sym,
            name: $name,
            class: AssetClass::$class,
            currency: $ccy,
            venue: $venue,
            sector: $sector,
            isin: $isin,
            price: $price,
            tick: $tick,
            lot: $lot,
        }),*]
    };
}

const TECH: Option<&str> = Some("Information Technology");
const COMM: Option<&str> = Some("Communication Services");
const DISC: Option<&str> = Some("Consumer Discretionary");
const STAP: Option<&str> = Some("Consumer Staples");
const FIN: Option<&str> = Some("Financials");
const HLTH: Option<&str> = Some("Health Care");
const ENER: Option<&str> = Some("Energy");
const INDU: Option<&str> = Some("Industrials");
const MATS: Option<&str> = Some("Materials");
const EQIX: Option<&str> = Some("Equity Index");
const RATES: Option<&str> = Some("Rates");
const CCY: Option<&str> = Some("Currency");
const GOVT: Option<&str> = Some("Government");

#[rustfmt::skip]
const WELL_KNOWN: &[Known] = known![
    "AAPL", "Apple Inc.", Equity, "USD", "XNAS", TECH, Some("US0378331005"), "189.84", "", "";
    "MSFT", "Microsoft Corporation", Equity, "USD", "XNAS", TECH, Some("US5949181045"), "415.26", "", "";
    "NVDA", "NVIDIA Corporation", Equity, "USD", "XNAS", TECH, Some("US67066G1040"), "121.79", "", "";
    "AMZN", "Amazon.com, Inc.", Equity, "USD", "XNAS", DISC, Some("US0231351067"), "184.70", "", "";
    "GOOGL", "Alphabet Inc. Class A", Equity, "USD", "XNAS", COMM, Some("US02079K3059"), "171.95", "", "";
    "META", "Meta Platforms, Inc. Class A", Equity, "USD", "XNAS", COMM, Some("US30303M1027"), "502.60", "", "";
    "TSLA", "Tesla, Inc.", Equity, "USD", "XNAS", DISC, Some("US88160R1014"), "248.50", "", "";
    "AVGO", "Broadcom Inc.", Equity, "USD", "XNAS", TECH, Some("US11135F1012"), "168.40", "", "";
    "COST", "Costco Wholesale Corporation", Equity, "USD", "XNAS", STAP, Some("US22160K1051"), "884.10", "", "";
    "NFLX", "Netflix, Inc.", Equity, "USD", "XNAS", COMM, Some("US64110L1061"), "684.35", "", "";
    "AMD", "Advanced Micro Devices, Inc.", Equity, "USD", "XNAS", TECH, Some("US0079031078"), "152.12", "", "";
    "INTC", "Intel Corporation", Equity, "USD", "XNAS", TECH, Some("US4581401001"), "22.05", "", "";
    "ADBE", "Adobe Inc.", Equity, "USD", "XNAS", TECH, Some("US00724F1012"), "498.30", "", "";
    "CSCO", "Cisco Systems, Inc.", Equity, "USD", "XNAS", TECH, Some("US17275R1023"), "55.18", "", "";
    "PEP", "PepsiCo, Inc.", Equity, "USD", "XNAS", STAP, Some("US7134481081"), "164.92", "", "";
    "JPM", "JPMorgan Chase & Co.", Equity, "USD", "XNYS", FIN, Some("US46625H1005"), "221.49", "", "";
    "V", "Visa Inc. Class A", Equity, "USD", "XNYS", FIN, Some("US92826C8394"), "279.86", "", "";
    "JNJ", "Johnson & Johnson", Equity, "USD", "XNYS", HLTH, Some("US4781601046"), "155.34", "", "";
    "WMT", "Walmart Inc.", Equity, "USD", "XNYS", STAP, Some("US9311421039"), "80.27", "", "";
    "XOM", "Exxon Mobil Corporation", Equity, "USD", "XNYS", ENER, Some("US30231G1022"), "114.66", "", "";
    "BAC", "Bank of America Corporation", Equity, "USD", "XNYS", FIN, Some("US0605051046"), "39.88", "", "";
    "KO", "The Coca-Cola Company", Equity, "USD", "XNYS", STAP, Some("US1912161007"), "65.43", "", "";
    "PG", "The Procter & Gamble Company", Equity, "USD", "XNYS", STAP, Some("US7427181091"), "166.01", "", "";
    "DIS", "The Walt Disney Company", Equity, "USD", "XNYS", COMM, Some("US2546871060"), "94.75", "", "";
    "BRK.B", "Berkshire Hathaway Inc. Class B", Equity, "USD", "XNYS", FIN, Some("US0846707026"), "458.20", "", "";
    "GS", "The Goldman Sachs Group, Inc.", Equity, "USD", "XNYS", FIN, Some("US38141G1040"), "503.11", "", "";
    "IBM", "International Business Machines Corporation", Equity, "USD", "XNYS", TECH, Some("US4592001014"), "221.63", "", "";
    "VOD.L", "Vodafone Group Plc", Equity, "GBX", "XLON", COMM, Some("GB00BH4HKS39"), "72.34", "", "";
    "HSBA.L", "HSBC Holdings plc", Equity, "GBX", "XLON", FIN, Some("GB0005405286"), "702.40", "", "";
    "BP.L", "BP p.l.c.", Equity, "GBX", "XLON", ENER, Some("GB0007980591"), "451.25", "", "";
    "SHEL.L", "Shell plc", Equity, "GBX", "XLON", ENER, Some("GB00BP6MXD84"), "2698.50", "", "";
    "AZN.L", "AstraZeneca PLC", Equity, "GBX", "XLON", HLTH, Some("GB0009895292"), "11842", "", "";
    "ULVR.L", "Unilever PLC", Equity, "GBX", "XLON", STAP, Some("GB00B10RZP78"), "4561", "", "";
    "GSK.L", "GSK plc", Equity, "GBX", "XLON", HLTH, Some("GB00BN7SWP63"), "1512.5", "", "";
    "BARC.L", "Barclays PLC", Equity, "GBX", "XLON", FIN, Some("GB0031348658"), "231.45", "", "";
    "LLOY.L", "Lloyds Banking Group plc", Equity, "GBX", "XLON", FIN, Some("GB0008706128"), "55.12", "", "";
    "RIO.L", "Rio Tinto plc", Equity, "GBX", "XLON", MATS, Some("GB0007188757"), "4987.5", "", "";
    "AIR.PA", "Airbus SE", Equity, "EUR", "XPAR", INDU, Some("NL0000235190"), "139.72", "", "";
    "MC.PA", "LVMH Moet Hennessy Louis Vuitton SE", Equity, "EUR", "XPAR", DISC, Some("FR0000121014"), "698.40", "", "";
    "OR.PA", "L'Oreal S.A.", Equity, "EUR", "XPAR", STAP, Some("FR0000120321"), "402.15", "", "";
    "TTE.PA", "TotalEnergies SE", Equity, "EUR", "XPAR", ENER, Some("FR0000120271"), "60.34", "", "";
    "SAN.PA", "Sanofi", Equity, "EUR", "XPAR", HLTH, Some("FR0000120578"), "89.91", "", "";
    "BNP.PA", "BNP Paribas SA", Equity, "EUR", "XPAR", FIN, Some("FR0000131104"), "62.18", "", "";
    "SAP.DE", "SAP SE", Equity, "EUR", "XETR", TECH, Some("DE0007164600"), "201.35", "", "";
    "SIE.DE", "Siemens AG", Equity, "EUR", "XETR", INDU, Some("DE0007236101"), "174.82", "", "";
    "ALV.DE", "Allianz SE", Equity, "EUR", "XETR", FIN, Some("DE0008404005"), "261.40", "", "";
    "DTE.DE", "Deutsche Telekom AG", Equity, "EUR", "XETR", COMM, Some("DE0005557508"), "23.12", "", "";
    "BMW.DE", "Bayerische Motoren Werke AG", Equity, "EUR", "XETR", DISC, Some("DE0005190003"), "89.64", "", "";
    "BAS.DE", "BASF SE", Equity, "EUR", "XETR", MATS, Some("DE000BASF111"), "45.27", "", "";
    "NESN.SW", "Nestle S.A.", Equity, "CHF", "XSWX", STAP, Some("CH0038863350"), "94.82", "", "";
    "NOVN.SW", "Novartis AG", Equity, "CHF", "XSWX", HLTH, Some("CH0012005267"), "95.36", "", "";
    "ROG.SW", "Roche Holding AG", Equity, "CHF", "XSWX", HLTH, Some("CH0012032048"), "251.30", "", "";
    "UBSG.SW", "UBS Group AG", Equity, "CHF", "XSWX", FIN, Some("CH0244767585"), "27.14", "", "";
    "7203.T", "Toyota Motor Corporation", Equity, "JPY", "XTKS", DISC, Some("JP3633400001"), "2841", "", "";
    "6758.T", "Sony Group Corporation", Equity, "JPY", "XTKS", DISC, Some("JP3435000009"), "3398", "", "";
    "9984.T", "SoftBank Group Corp.", Equity, "JPY", "XTKS", COMM, Some("JP3436100006"), "8512", "", "";
    "6861.T", "Keyence Corporation", Equity, "JPY", "XTKS", TECH, Some("JP3236200006"), "65230", "", "";
    "8306.T", "Mitsubishi UFJ Financial Group, Inc.", Equity, "JPY", "XTKS", FIN, Some("JP3902900004"), "1604", "", "";
    "0700.HK", "Tencent Holdings Limited", Equity, "HKD", "XHKG", COMM, Some("KYG875721634"), "381.20", "", "";
    "9988.HK", "Alibaba Group Holding Limited", Equity, "HKD", "XHKG", DISC, Some("KYG017191142"), "80.35", "", "";
    "0005.HK", "HSBC Holdings plc", Equity, "HKD", "XHKG", FIN, Some("GB0005405286"), "65.40", "", "400";
    "1299.HK", "AIA Group Limited", Equity, "HKD", "XHKG", FIN, Some("HK0000069689"), "60.15", "", "200";
    "0941.HK", "China Mobile Limited", Equity, "HKD", "XHKG", COMM, Some("HK0941009539"), "70.25", "", "500";
    "3690.HK", "Meituan Class B", Equity, "HKD", "XHKG", DISC, Some("KYG596691041"), "120.40", "", "100";
    "SPY", "SPDR S&P 500 ETF Trust", Etf, "USD", "ARCX", Some("US Large Cap"), Some("US78462F1030"), "521.90", "", "";
    "QQQ", "Invesco QQQ Trust, Series 1", Etf, "USD", "XNAS", Some("US Large Cap Growth"), Some("US46090E1038"), "441.06", "", "";
    "IWM", "iShares Russell 2000 ETF", Etf, "USD", "ARCX", Some("US Small Cap"), Some("US4642876555"), "201.74", "", "";
    "GLD", "SPDR Gold Shares", Etf, "USD", "ARCX", Some("Commodities"), Some("US78463V1070"), "215.32", "", "";
    "TLT", "iShares 20+ Year Treasury Bond ETF", Etf, "USD", "XNAS", Some("Government Bonds"), Some("US4642874329"), "92.48", "", "";
    "EEM", "iShares MSCI Emerging Markets ETF", Etf, "USD", "ARCX", Some("Emerging Markets"), Some("US4642872349"), "42.16", "", "";
    "VTI", "Vanguard Total Stock Market ETF", Etf, "USD", "ARCX", Some("US Total Market"), Some("US9229087690"), "259.87", "", "";
    "XLF", "Financial Select Sector SPDR Fund", Etf, "USD", "ARCX", Some("Sector: Financials"), Some("US81369Y6059"), "42.05", "", "";
    "EURUSD", "Euro / US Dollar", Fx, "USD", "XOFF", None, None, "1.08500", "0.00001", "1000";
    "GBPUSD", "British Pound / US Dollar", Fx, "USD", "XOFF", None, None, "1.27000", "0.00001", "1000";
    "USDJPY", "US Dollar / Japanese Yen", Fx, "JPY", "XOFF", None, None, "150.380", "0.001", "1000";
    "USDCHF", "US Dollar / Swiss Franc", Fx, "CHF", "XOFF", None, None, "0.88500", "0.00001", "1000";
    "USDHKD", "US Dollar / Hong Kong Dollar", Fx, "HKD", "XOFF", None, None, "7.80040", "0.00001", "1000";
    "EURGBP", "Euro / British Pound", Fx, "GBP", "XOFF", None, None, "0.85430", "0.00001", "1000";
    "EURJPY", "Euro / Japanese Yen", Fx, "JPY", "XOFF", None, None, "163.160", "0.001", "1000";
    "EURCHF", "Euro / Swiss Franc", Fx, "CHF", "XOFF", None, None, "0.96020", "0.00001", "1000";
    "GBPJPY", "British Pound / Japanese Yen", Fx, "JPY", "XOFF", None, None, "190.980", "0.001", "1000";
    "AUDUSD", "Australian Dollar / US Dollar", Fx, "USD", "XOFF", None, None, "0.66120", "0.00001", "1000";
    "NZDUSD", "New Zealand Dollar / US Dollar", Fx, "USD", "XOFF", None, None, "0.60850", "0.00001", "1000";
    "BTCUSD", "Bitcoin / US Dollar", Crypto, "USD", "XOFF", None, None, "65120.50", "0.01", "0.00001";
    "ETHUSD", "Ether / US Dollar", Crypto, "USD", "XOFF", None, None, "3184.20", "0.01", "0.0001";
    "SOLUSD", "Solana / US Dollar", Crypto, "USD", "XOFF", None, None, "148.36", "0.01", "0.001";
    "XRPUSD", "XRP / US Dollar", Crypto, "USD", "XOFF", None, None, "0.5214", "0.0001", "1";
    "ADAUSD", "Cardano / US Dollar", Crypto, "USD", "XOFF", None, None, "0.4521", "0.0001", "1";
    "DOGEUSD", "Dogecoin / US Dollar", Crypto, "USD", "XOFF", None, None, "0.15218", "0.00001", "1";
    "LTCUSD", "Litecoin / US Dollar", Crypto, "USD", "XOFF", None, None, "84.52", "0.01", "0.001";
    "BTCEUR", "Bitcoin / Euro", Crypto, "EUR", "XOFF", None, None, "60020.00", "0.01", "0.00001";
    "ETHEUR", "Ether / Euro", Crypto, "EUR", "XOFF", None, None, "2934.80", "0.01", "0.0001";
    "US2Y", "US Treasury 2-Year Note (on-the-run)", Bond, "USD", "XOFF", GOVT, None, "99.7265625", "0.0078125", "1000";
    "US10Y", "US Treasury 10-Year Note (on-the-run)", Bond, "USD", "XOFF", GOVT, None, "97.84375", "0.015625", "1000";
    "US30Y", "US Treasury 30-Year Bond (on-the-run)", Bond, "USD", "XOFF", GOVT, None, "94.3125", "0.03125", "1000";
    "DE10Y", "German Bund 10-Year (on-the-run)", Bond, "EUR", "XOFF", GOVT, None, "98.62", "0.01", "1000";
    "UK10Y", "UK Gilt 10-Year (on-the-run)", Bond, "GBP", "XOFF", GOVT, None, "96.41", "0.01", "1000";
    "JP10Y", "Japanese Government Bond 10-Year (on-the-run)", Bond, "JPY", "XOFF", GOVT, None, "99.85", "0.01", "1000";
];

/// A futures product, listed with three quarterly expiries.
struct FutureRoot {
    root: &'static str,
    product: &'static str,
    currency: &'static str,
    venue: &'static str,
    sector: Option<&'static str>,
    price: &'static str,
    tick: &'static str,
}

macro_rules! futures {
    ($($root:literal, $product:literal, $ccy:literal, $venue:literal, $sector:expr, $price:literal, $tick:literal;)*) => {
        &[$(FutureRoot { root: $root, product: $product, currency: $ccy, venue: $venue, sector: $sector, price: $price, tick: $tick }),*]
    };
}

#[rustfmt::skip]
const FUTURES: &[FutureRoot] = futures![
    // root, product name, currency, venue, sector, price level, tick
    "ES", "E-mini S&P 500", "USD", "XCME", EQIX, "5325.00", "0.25";
    "NQ", "E-mini Nasdaq-100", "USD", "XCME", EQIX, "18620.00", "0.25";
    "YM", "E-mini Dow Jones", "USD", "XCME", EQIX, "39150", "1";
    "RTY", "E-mini Russell 2000", "USD", "XCME", EQIX, "2068.0", "0.1";
    "6E", "Euro FX", "USD", "XCME", CCY, "1.08750", "0.00005";
    "6J", "Japanese Yen", "USD", "XCME", CCY, "0.0066650", "0.0000005";
    "ZN", "10-Year T-Note", "USD", "XCME", RATES, "109.703125", "0.015625";
    "FDAX", "DAX Futures", "EUR", "XEUR", EQIX, "18412", "1";
    "FESX", "EURO STOXX 50 Futures", "EUR", "XEUR", EQIX, "4987", "1";
    "FGBL", "Euro-Bund Futures", "EUR", "XEUR", RATES, "131.42", "0.01";
];

/// Quarterly expiries: (CME month-year code, name).
const EXPIRIES: &[(&str, &str)] = &[("Z5", "Dec 2025"), ("H6", "Mar 2026"), ("M6", "Jun 2026")];

/// Futures prices are the root's level; the table is small enough to search.
fn future_price(symbol: &str) -> Option<Decimal> {
    FUTURES.iter().find_map(|f| {
        let rest = symbol.strip_prefix(f.root)?;
        EXPIRIES.iter().any(|e| e.0 == rest).then(|| dec(f.price))
    })
}

fn known_instruments() -> Vec<Instrument> {
    let mut out = Vec::new();
    for k in WELL_KNOWN {
        let price = dec(k.price);
        let tick = if k.tick.is_empty() {
            venue_tick(k.venue, price)
        } else {
            dec(k.tick)
        };
        let lot = if k.lot.is_empty() {
            venue_lot(k.venue, 0)
        } else {
            dec(k.lot)
        };
        out.push(Instrument {
            symbol: k.symbol.into(),
            name: k.name.into(),
            asset_class: k.class,
            currency: k.currency.into(),
            venue: k.venue.into(),
            tick_size: tick,
            lot_size: lot,
            sector: k.sector.map(str::to_string),
            isin: k.isin.map(str::to_string),
        });
    }
    for f in FUTURES {
        for &(code, month) in EXPIRIES {
            out.push(Instrument {
                symbol: format!("{}{code}", f.root),
                name: format!("{} {month}", f.product),
                asset_class: AssetClass::Future,
                currency: f.currency.into(),
                venue: f.venue.into(),
                tick_size: dec(f.tick),
                lot_size: Decimal::ONE,
                sector: f.sector.map(str::to_string),
                isin: None,
            });
        }
    }
    out
}

/// Minimum price increments by venue, from each venue's tick-size regime
/// (US Reg NMS sub-penny rule, the MiFID II liquid-band table, the TSE standard
/// table and the HKEX spread table).
fn venue_tick(venue: &str, price: Decimal) -> Decimal {
    let table: &[(&str, &str)] = match venue {
        "XNAS" | "XNYS" | "ARCX" => &[("1", "0.0001"), ("", "0.01")],
        "XLON" | "XPAR" | "XETR" | "XSWX" => &[
            ("1", "0.0002"),
            ("10", "0.002"),
            ("50", "0.005"),
            ("100", "0.01"),
            ("500", "0.05"),
            ("1000", "0.1"),
            ("5000", "0.5"),
            ("10000", "1"),
            ("", "2"),
        ],
        "XTKS" => &[
            ("3000", "1"),
            ("5000", "5"),
            ("30000", "10"),
            ("50000", "50"),
            ("", "100"),
        ],
        "XHKG" => &[
            ("0.25", "0.001"),
            ("0.5", "0.005"),
            ("10", "0.01"),
            ("20", "0.02"),
            ("100", "0.05"),
            ("200", "0.1"),
            ("500", "0.2"),
            ("1000", "0.5"),
            ("2000", "1"),
            ("5000", "2"),
            ("", "5"),
        ],
        _ => &[("", "0.01")],
    };
    table
        .iter()
        .find(|(below, _)| below.is_empty() || price < dec(below))
        .map(|(_, tick)| dec(tick))
        .unwrap_or(Decimal::ONE)
}

/// Board lots: 100 shares in Tokyo, a per-stock lot in Hong Kong, 1 elsewhere.
fn venue_lot(venue: &str, pick: u64) -> Decimal {
    match venue {
        "XTKS" => Decimal::ONE_HUNDRED,
        "XHKG" => {
            const LOTS: [i64; 6] = [100, 200, 400, 500, 1000, 2000];
            Decimal::from(LOTS[(pick % LOTS.len() as u64) as usize])
        }
        _ => Decimal::ONE,
    }
}

/// SplitMix64: tiny, fixed forever, good enough to pick demo names.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn letter(&mut self) -> char {
        char::from(b'A' + self.below(26) as u8)
    }

    fn digit(&mut self) -> char {
        char::from(b'0' + self.below(10) as u8)
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn symbol_hash(symbol: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in symbol.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// Price bands per market, in the quote currency; a band is picked first so that
/// cheap and expensive listings both occur.
fn price_bands(class: AssetClass, currency: &str) -> &'static [(i64, i64)] {
    match (class, currency) {
        (AssetClass::Etf, _) => &[(20, 60), (60, 150), (150, 500)],
        (_, "GBX") => &[(20, 100), (100, 500), (500, 2000), (2000, 8000)],
        (_, "EUR") => &[(5, 20), (20, 60), (60, 150), (150, 400)],
        (_, "CHF") => &[(10, 50), (50, 150), (150, 500)],
        (_, "JPY") => &[(300, 1000), (1000, 3000), (3000, 8000), (8000, 20000)],
        (_, "HKD") => &[(1, 10), (10, 50), (50, 150), (150, 450)],
        _ => &[(5, 20), (20, 60), (60, 150), (150, 400)],
    }
}

/// The untruncated price of a generated listing, from its symbol alone, so that
/// [`reference_price`] needs nothing but the instrument.
fn generated_price(symbol: &str, class: AssetClass, currency: &str) -> Decimal {
    if let Some(p) = future_price(symbol) {
        return p;
    }
    let h = symbol_hash(symbol);
    let bands = price_bands(class, currency);
    let (lo, hi) = bands[(h % bands.len() as u64) as usize];
    let span_cents = ((hi - lo) * 100) as u64;
    let cents = lo * 100 + ((h >> 16) % span_cents) as i64;
    Decimal::new(cents, 2)
}

/// ISIN check digit: letters become two digits (A = 10), then Luhn doubling from
/// the right.
fn isin_check_digit(body: &str) -> char {
    let mut digits = Vec::with_capacity(body.len() * 2);
    for c in body.chars() {
        match c.to_digit(36) {
            Some(v) if v >= 10 => {
                digits.push(v / 10);
                digits.push(v % 10);
            }
            Some(v) => digits.push(v),
            None => {}
        }
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    char::from(b'0' + ((10 - sum % 10) % 10) as u8)
}

fn isin(prefix: &str, rng: &mut Rng) -> String {
    // US (CUSIP), UK (SEDOL B...) and German (WKN A...) national codes mix in
    // letters; French, Swiss, Japanese and Hong Kong ones are digits.
    let letters = ["US", "GB", "DE"].iter().any(|c| prefix.starts_with(c));
    let mut body = prefix.to_string();
    while body.len() < 11 {
        let letter = letters && body.len() >= 5 && rng.below(4) == 0;
        body.push(if letter { rng.letter() } else { rng.digit() });
    }
    let check = isin_check_digit(&body);
    body.push(check);
    body
}

const SECTORS: &[(&str, &[&str])] = &[
    (
        "Information Technology",
        &[
            "Software",
            "Semiconductor",
            "Systems",
            "Networks",
            "Digital",
            "Data",
        ],
    ),
    (
        "Health Care",
        &[
            "Pharmaceuticals",
            "Biotech",
            "Medical",
            "Therapeutics",
            "Health",
            "Diagnostics",
        ],
    ),
    (
        "Financials",
        &[
            "Financial",
            "Bancorp",
            "Capital",
            "Insurance",
            "Asset Management",
            "Bank",
        ],
    ),
    (
        "Consumer Discretionary",
        &["Retail", "Apparel", "Motors", "Leisure", "Brands", "Hotels"],
    ),
    (
        "Consumer Staples",
        &[
            "Foods",
            "Beverages",
            "Household Products",
            "Grocers",
            "Brewing",
            "Farms",
        ],
    ),
    (
        "Industrials",
        &[
            "Industries",
            "Aerospace",
            "Logistics",
            "Machinery",
            "Engineering",
            "Rail",
        ],
    ),
    (
        "Energy",
        &[
            "Energy",
            "Petroleum",
            "Oil & Gas",
            "Resources",
            "Drilling",
            "Pipelines",
        ],
    ),
    (
        "Materials",
        &[
            "Mining",
            "Chemicals",
            "Steel",
            "Materials",
            "Paper",
            "Metals",
        ],
    ),
    (
        "Utilities",
        &[
            "Power",
            "Utilities",
            "Water",
            "Electric",
            "Gas & Electric",
            "Renewables",
        ],
    ),
    (
        "Real Estate",
        &[
            "Properties",
            "Realty",
            "REIT",
            "Land",
            "Estates",
            "Real Estate",
        ],
    ),
    (
        "Communication Services",
        &[
            "Media",
            "Communications",
            "Telecom",
            "Broadcasting",
            "Entertainment",
            "Interactive",
        ],
    ),
];

const ENGLISH_WORDS: &[&str] = &[
    "Apex",
    "Arbor",
    "Atlas",
    "Aurora",
    "Beacon",
    "Birch",
    "Blue Ridge",
    "Cascade",
    "Cedar",
    "Cobalt",
    "Crescent",
    "Crown",
    "Delta",
    "Eagle",
    "Ember",
    "Evergreen",
    "Falcon",
    "Frontier",
    "Garnet",
    "Granite",
    "Harbor",
    "Helix",
    "Horizon",
    "Ironwood",
    "Juniper",
    "Keystone",
    "Lakeshore",
    "Lumen",
    "Magnolia",
    "Meridian",
    "Monarch",
    "Northwind",
    "Oakmont",
    "Orion",
    "Pacifica",
    "Pinnacle",
    "Polaris",
    "Prairie",
    "Quantum",
    "Redwood",
    "Ridgeline",
    "Sable",
    "Sapphire",
    "Sierra",
    "Silverline",
    "Sterling",
    "Summit",
    "Suncrest",
    "Terra",
    "Titan",
    "Trident",
    "Unity",
    "Vertex",
    "Willow",
    "Zenith",
    "Albion",
    "Castle",
    "Northgate",
    "Severn",
    "Thames",
];

const FRENCH_WORDS: &[&str] = &[
    "Lumiere",
    "Rhone",
    "Seine",
    "Provence",
    "Loire",
    "Garonne",
    "Azur",
    "Normandie",
    "Bretagne",
    "Alsace",
    "Lyonnaise",
    "Marseille",
    "Bordeaux",
    "Vendome",
    "Concorde",
    "Etoile",
    "Atlantique",
    "Orleans",
    "Savoie",
    "Gascogne",
];

const GERMAN_WORDS: &[&str] = &[
    "Rhein",
    "Alster",
    "Nordwerk",
    "Bergmann",
    "Elbe",
    "Donau",
    "Schwarzwald",
    "Hansa",
    "Bavaria",
    "Westfalen",
    "Sachsen",
    "Isar",
    "Neckar",
    "Weser",
    "Spree",
    "Brandt",
    "Kessler",
    "Vogel",
    "Lindner",
    "Falkenberg",
];

const SWISS_WORDS: &[&str] = &[
    "Alpen",
    "Helvetia",
    "Lucerne",
    "Matterhorn",
    "Jungfrau",
    "Basel",
    "Geneva",
    "Lugano",
    "Ticino",
    "Engadin",
    "Rigi",
    "Pilatus",
    "Bernina",
    "Gotthard",
    "Aare",
    "Limmat",
    "Santis",
];

const JAPANESE_WORDS: &[&str] = &[
    "Asahi", "Daiichi", "Fuji", "Hokuto", "Kansai", "Kyoto", "Meiji", "Nishi", "Osaka", "Sakura",
    "Sanwa", "Shinsei", "Taiyo", "Tohoku", "Yamato", "Chubu", "Kyushu", "Hokkaido", "Nagoya",
    "Kanto", "Marusan", "Daiwa", "Toyo", "Nichi", "Hikari", "Kizuna", "Aozora", "Tsubasa",
];

const HONG_KONG_WORDS: &[&str] = &[
    "Golden",
    "Harbour",
    "Jade",
    "Dragon",
    "Pearl",
    "Kowloon",
    "Victoria",
    "Lucky",
    "Grand",
    "Orient",
    "Sino",
    "Wing",
    "Fortune",
    "Cheung",
    "Hang",
    "Tai",
    "Lung",
    "Far East",
    "Kwong",
    "Shun",
    "Man Yee",
    "Lai",
    "Prosper",
    "Everbright",
];

const ETF_PROVIDERS: &[&str] = &[
    "iShares",
    "Vanguard",
    "SPDR",
    "Invesco",
    "Schwab",
    "Global X",
    "First Trust",
    "VanEck",
    "WisdomTree",
    "ProShares",
];

const ETF_THEMES: &[(&str, &str)] = &[
    ("Core US Aggregate Bond", "US Bonds"),
    ("Short-Term Treasury", "Government Bonds"),
    ("TIPS Bond", "Government Bonds"),
    ("Investment Grade Corporate Bond", "Corporate Bonds"),
    ("High Yield Corporate Bond", "Corporate Bonds"),
    ("Emerging Markets Bond", "Emerging Markets"),
    ("S&P 500 Equal Weight", "US Large Cap"),
    ("Mid-Cap Value", "US Mid Cap"),
    ("Small-Cap Growth", "US Small Cap"),
    ("Dividend Appreciation", "Dividend"),
    ("High Dividend Yield", "Dividend"),
    ("Semiconductor", "Sector: Information Technology"),
    ("Cloud Computing", "Sector: Information Technology"),
    ("Cybersecurity", "Sector: Information Technology"),
    ("Clean Energy", "Thematic"),
    ("Robotics & AI", "Thematic"),
    ("Biotechnology", "Sector: Health Care"),
    ("Regional Banks", "Sector: Financials"),
    ("Homebuilders", "Sector: Consumer Discretionary"),
    ("Oil & Gas Exploration", "Sector: Energy"),
    ("Gold Miners", "Commodities"),
    ("Silver Trust", "Commodities"),
    ("MSCI EAFE", "International Developed"),
    ("MSCI Japan", "International Developed"),
    ("MSCI Europe", "International Developed"),
    ("MSCI China", "Emerging Markets"),
    ("MSCI India", "Emerging Markets"),
    ("Real Estate", "Sector: Real Estate"),
    ("Utilities", "Sector: Utilities"),
    ("Minimum Volatility", "Factor"),
    ("Momentum Factor", "Factor"),
    ("Quality Factor", "Factor"),
];

/// How each venue's generated listings look.
struct Market {
    venue: &'static str,
    currency: &'static str,
    count: usize,
    words: &'static [&'static str],
    /// Legal-form suffixes of the country.
    forms: &'static [&'static str],
    isin_prefix: &'static str,
}

const MARKETS: &[Market] = &[
    Market {
        venue: "XNAS",
        currency: "USD",
        count: 520,
        words: ENGLISH_WORDS,
        forms: &["Inc.", "Corp.", "Holdings, Inc."],
        isin_prefix: "US",
    },
    Market {
        venue: "XNYS",
        currency: "USD",
        count: 420,
        words: ENGLISH_WORDS,
        forms: &["Inc.", "Corporation", "Co.", "Group, Inc."],
        isin_prefix: "US",
    },
    Market {
        venue: "XLON",
        currency: "GBX",
        count: 260,
        words: ENGLISH_WORDS,
        forms: &["plc", "Group plc", "Holdings plc"],
        isin_prefix: "GB00B",
    },
    Market {
        venue: "XPAR",
        currency: "EUR",
        count: 160,
        words: FRENCH_WORDS,
        forms: &["SA", "SE", "Groupe SA"],
        isin_prefix: "FR0000",
    },
    Market {
        venue: "XETR",
        currency: "EUR",
        count: 160,
        words: GERMAN_WORDS,
        forms: &["AG", "SE", "Holding AG"],
        isin_prefix: "DE000",
    },
    Market {
        venue: "XSWX",
        currency: "CHF",
        count: 70,
        words: SWISS_WORDS,
        forms: &["AG", "SA", "Holding AG"],
        isin_prefix: "CH00",
    },
    Market {
        venue: "XTKS",
        currency: "JPY",
        count: 330,
        words: JAPANESE_WORDS,
        forms: &["Co., Ltd.", "Corporation", "Holdings, Inc."],
        isin_prefix: "JP3",
    },
    Market {
        venue: "XHKG",
        currency: "HKD",
        count: 230,
        words: HONG_KONG_WORDS,
        forms: &["Holdings Limited", "Group Limited", "International Limited"],
        isin_prefix: "HK0000",
    },
];

/// Symbol in the venue's style; `None` when the attempt collided.
fn make_symbol(venue: &str, name_word: &str, term: &str, rng: &mut Rng) -> String {
    let letters: Vec<char> = name_word
        .chars()
        .chain(term.chars())
        .filter(char::is_ascii_alphabetic)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let stem = |len: usize, rng: &mut Rng| -> String {
        let mut s: String = letters.iter().take(2).collect();
        while s.len() < len {
            s.push(rng.letter());
        }
        s
    };
    match venue {
        "XNAS" => stem(4, rng),
        "XNYS" => {
            let len = 2 + rng.below(2);
            stem(len, rng)
        }
        "XLON" => {
            let len = 3 + rng.below(2);
            format!("{}.L", stem(len, rng))
        }
        "XPAR" => {
            let len = 2 + rng.below(3);
            format!("{}.PA", stem(len, rng))
        }
        "XETR" => format!("{}.DE", stem(3, rng)),
        "XSWX" => {
            let len = 3 + rng.below(2);
            format!("{}.SW", stem(len, rng))
        }
        "XTKS" => format!("{}.T", 1300 + rng.below(8700)),
        "XHKG" => format!("{:04}.HK", 1 + rng.below(9998)),
        _ => stem(4, rng),
    }
}

fn instruments() -> Vec<Instrument> {
    let mut out = known_instruments();
    let mut symbols: HashSet<String> = out.iter().map(|i| i.symbol.clone()).collect();
    let mut rng = Rng(0x7469_636b_6772_6170); // "tickgrap"
    for m in MARKETS {
        let mut names = HashSet::new();
        let mut made = 0;
        while made < m.count {
            let (sector, terms) = *rng.pick(SECTORS);
            let word = *rng.pick(m.words);
            let term = *rng.pick(terms);
            let form = *rng.pick(m.forms);
            let name = format!("{word} {term} {form}");
            let symbol = make_symbol(m.venue, word, term, &mut rng);
            if names.contains(&name) || symbols.contains(&symbol) {
                continue;
            }
            let price = generated_price(&symbol, AssetClass::Equity, m.currency);
            let lot = venue_lot(m.venue, rng.next());
            let isin = isin(m.isin_prefix, &mut rng);
            names.insert(name.clone());
            symbols.insert(symbol.clone());
            out.push(Instrument {
                tick_size: venue_tick(m.venue, price),
                symbol,
                name,
                asset_class: AssetClass::Equity,
                currency: m.currency.into(),
                venue: m.venue.into(),
                lot_size: lot,
                sector: Some(sector.into()),
                isin: Some(isin),
            });
            made += 1;
        }
    }
    let mut made = 0;
    while made < 120 {
        let provider = *rng.pick(ETF_PROVIDERS);
        let (theme, category) = *rng.pick(ETF_THEMES);
        let name = format!("{provider} {theme} ETF");
        let len = 3 + rng.below(2);
        let symbol: String = provider
            .chars()
            .filter(char::is_ascii_alphabetic)
            .take(1)
            .map(|c| c.to_ascii_uppercase())
            .chain((1..len).map(|_| rng.letter()))
            .collect();
        if symbols.contains(&symbol) || out.iter().any(|i| i.name == name) {
            continue;
        }
        let price = generated_price(&symbol, AssetClass::Etf, "USD");
        let isin = isin("US", &mut rng);
        symbols.insert(symbol.clone());
        out.push(Instrument {
            tick_size: venue_tick("ARCX", price),
            symbol,
            name,
            asset_class: AssetClass::Etf,
            currency: "USD".into(),
            venue: "ARCX".into(),
            lot_size: Decimal::ONE,
            sector: Some(category.into()),
            isin: Some(isin),
        });
        made += 1;
    }
    out
}

const DESKS: &[(&str, &str)] = &[
    ("USEQ", "US Cash Equities"),
    ("EMEQ", "EMEA Cash Equities"),
    ("APEQ", "APAC Cash Equities"),
    ("ETFM", "ETF Market Making"),
    ("IARB", "Index Arbitrage"),
    ("FXSP", "FX Spot"),
    ("FUTD", "Futures Delta One"),
    ("DIGA", "Digital Assets"),
    ("RATE", "Rates Trading"),
];

const FIRST_NAMES: &[&str] = &[
    "Alice", "Benjamin", "Chloe", "Daniel", "Emma", "Felix", "Grace", "Hiroshi", "Isabel", "James",
    "Keiko", "Liam", "Mei", "Noah", "Olivia", "Pierre", "Priya", "Rafael", "Sofia", "Thomas",
    "Ursula", "Victor", "Wei", "Yuki",
];

const LAST_NAMES: &[&str] = &[
    "Anderson",
    "Becker",
    "Chen",
    "Dubois",
    "Evans",
    "Fischer",
    "Garcia",
    "Hughes",
    "Ito",
    "Johansson",
    "Kumar",
    "Lambert",
    "Martin",
    "Nakamura",
    "O'Brien",
    "Patel",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Wong",
];

/// Four accounts per desk.
fn accounts() -> Vec<Account> {
    let mut rng = Rng(0x6163_636f_756e_7473); // "accounts"
    let mut out = Vec::new();
    for &(code, desk) in DESKS {
        for n in 1..=4 {
            out.push(Account {
                id: format!("{code}-{n:02}"),
                desk: desk.into(),
                owner: format!("{} {}", rng.pick(FIRST_NAMES), rng.pick(LAST_NAMES)),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_literal_parses() {
        for k in WELL_KNOWN {
            for s in [k.price, k.tick, k.lot]
                .into_iter()
                .filter(|s| !s.is_empty())
            {
                assert!(
                    Decimal::from_str(s).is_ok(),
                    "{} has a bad literal {s}",
                    k.symbol
                );
            }
        }
        for f in FUTURES {
            assert!(
                Decimal::from_str(f.price).is_ok() && Decimal::from_str(f.tick).is_ok(),
                "{}",
                f.root
            );
        }
        for (c, r) in FX_USD {
            assert!(Decimal::from_str(r).is_ok(), "{c}");
        }
    }

    #[test]
    fn isin_check_digits_match_real_isins() {
        assert_eq!(isin_check_digit("US037833100"), '5');
        assert_eq!(isin_check_digit("GB000263494"), '6');
        assert_eq!(isin_check_digit("DE000BASF11"), '1');
        for k in WELL_KNOWN {
            if let Some(isin) = k.isin {
                assert_eq!(isin.len(), 12, "{}", k.symbol);
                assert_eq!(
                    isin_check_digit(&isin[..11]),
                    isin.chars().last().unwrap_or(' '),
                    "{} has an ISIN with a bad check digit",
                    k.symbol
                );
            }
        }
    }

    #[test]
    fn generation_is_deterministic() {
        let a = demo_refdata();
        let b = demo_refdata();
        assert_eq!(a, b);
    }

    #[test]
    fn universe_is_large_and_consistent() {
        let d = demo_refdata();
        assert!(d.instruments.len() >= 2000, "{}", d.instruments.len());
        assert!(d.venues.len() >= 6);
        assert!(d.fx_usd.len() >= 5);
        assert_eq!(d.fx_usd.get("USD"), Some(&Decimal::ONE));
        assert!(d.accounts.len() >= 24);
        for class in [
            AssetClass::Equity,
            AssetClass::Etf,
            AssetClass::Fx,
            AssetClass::Future,
            AssetClass::Crypto,
        ] {
            assert!(
                d.instruments.values().any(|i| i.asset_class == class),
                "no {class}"
            );
        }
        for i in d.instruments.values() {
            assert!(
                d.venues.contains_key(&i.venue),
                "{} on unknown venue",
                i.symbol
            );
            assert!(
                d.fx_usd.contains_key(&i.currency),
                "{} has no FX rate",
                i.symbol
            );
            assert!(
                i.symbol.len() <= 32 && i.symbol.bytes().all(|b| b.is_ascii_graphic()),
                "{}",
                i.symbol
            );
            assert!(
                i.tick_size > Decimal::ZERO && i.lot_size > Decimal::ZERO,
                "{}",
                i.symbol
            );
            if let Some(isin) = &i.isin {
                assert_eq!(
                    isin_check_digit(&isin[..11]),
                    isin.chars().last().unwrap_or(' '),
                    "{isin}"
                );
            }
        }
        for v in d.venues.values() {
            assert!(
                v.mic.len() == 4 && v.country.len() == 2 && v.timezone.contains('/'),
                "{v:?}"
            );
        }
    }

    #[test]
    fn well_known_symbols_come_first() {
        let all = instruments();
        for (i, s) in [
            "AAPL", "MSFT", "VOD.L", "7203.T", "0700.HK", "SPY", "EURUSD", "BTCUSD",
        ]
        .iter()
        .enumerate()
        {
            let pos = all
                .iter()
                .position(|x| x.symbol == *s)
                .unwrap_or(usize::MAX);
            assert!(pos < WELL_KNOWN.len(), "{s} at {pos}, step {i}");
        }
    }

    #[test]
    fn reference_prices_sit_on_the_tick_grid() {
        let d = demo_refdata();
        for i in d.instruments.values() {
            let p = reference_price(i);
            assert!(p > Decimal::ZERO, "{}", i.symbol);
            assert!(
                (p % i.tick_size).is_zero(),
                "{} price {p} tick {}",
                i.symbol,
                i.tick_size
            );
            // The tick table was chosen for this price, so it spans many ticks.
            assert!(
                p / i.tick_size >= Decimal::from(10),
                "{} price {p} tick {}",
                i.symbol,
                i.tick_size
            );
        }
        let aapl = &d.instruments["AAPL"];
        assert_eq!(reference_price(aapl), dec("189.84"));
        assert_eq!(reference_price(&d.instruments["ESZ5"]), dec("5325"));
    }

    #[test]
    fn tick_tables_follow_the_venue() {
        assert_eq!(venue_tick("XNAS", dec("0.5")), dec("0.0001"));
        assert_eq!(venue_tick("XNAS", dec("250")), dec("0.01"));
        assert_eq!(venue_tick("XTKS", dec("2841")), dec("1"));
        assert_eq!(venue_tick("XTKS", dec("65230")), dec("100"));
        assert_eq!(venue_tick("XHKG", dec("381.2")), dec("0.2"));
        assert_eq!(venue_tick("XLON", dec("72.34")), dec("0.01"));
    }

    #[test]
    fn rounding_to_tick_floors_and_never_reaches_zero() {
        assert_eq!(round_to_tick(dec("101.37"), dec("0.25")), dec("101.25"));
        assert_eq!(round_to_tick(dec("0.001"), dec("0.25")), dec("0.25"));
    }
}
