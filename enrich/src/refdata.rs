//! Reference data: the rows events are joined against, and the in-memory cache
//! that keeps them (loaded with sqlx, kept fresh by LISTEN/NOTIFY on `tg_refdata`).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssetClass {
    Equity,
    Etf,
    Fx,
    Future,
    Bond,
    Crypto,
}

impl AssetClass {
    pub const ALL: [AssetClass; 6] = [
        AssetClass::Equity,
        AssetClass::Etf,
        AssetClass::Fx,
        AssetClass::Future,
        AssetClass::Bond,
        AssetClass::Crypto,
    ];

    /// The value stored in `instruments.asset_class`.
    pub fn as_str(self) -> &'static str {
        match self {
            AssetClass::Equity => "equity",
            AssetClass::Etf => "etf",
            AssetClass::Fx => "fx",
            AssetClass::Future => "future",
            AssetClass::Bond => "bond",
            AssetClass::Crypto => "crypto",
        }
    }
}

impl FromStr for AssetClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown asset class {s:?}"))
    }
}

impl fmt::Display for AssetClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instrument {
    pub symbol: String,
    pub name: String,
    pub asset_class: AssetClass,
    pub currency: String,
    /// MIC of the primary listing.
    pub venue: String,
    pub tick_size: Decimal,
    pub lot_size: Decimal,
    pub sector: Option<String>,
    pub isin: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Venue {
    pub mic: String,
    pub name: String,
    pub country: String,
    pub timezone: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub desk: String,
    pub owner: String,
}

/// A full copy of the reference tables, keyed by primary key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefData {
    pub instruments: HashMap<String, Instrument>,
    pub venues: HashMap<String, Venue>,
    pub accounts: HashMap<String, Account>,
    /// currency -> USD value of one unit.
    pub fx_usd: HashMap<String, Decimal>,
}

#[derive(Debug, thiserror::Error)]
pub enum RefDataError {
    #[error("reference data query failed: {0}")]
    Db(#[from] sqlx::Error),
    #[error("bad row in `{table}`: {msg}")]
    BadRow { table: &'static str, msg: String },
}

type InstrumentRow = (
    String,
    String,
    String,
    String,
    String,
    Decimal,
    Decimal,
    Option<String>,
    Option<String>,
);

const INSTRUMENT_SQL: &str = "SELECT symbol, name, asset_class, currency::text, venue, \
     tick_size, lot_size, sector, isin FROM instruments";
const VENUE_SQL: &str = "SELECT mic, name, country::text, timezone FROM venues";
const ACCOUNT_SQL: &str = "SELECT id, desk, owner FROM accounts";
const FX_SQL: &str = "SELECT currency::text, usd_rate FROM fx_rates";

fn instrument(row: InstrumentRow) -> Result<Instrument, RefDataError> {
    let (symbol, name, asset_class, currency, venue, tick_size, lot_size, sector, isin) = row;
    Ok(Instrument {
        asset_class: asset_class.parse().map_err(|msg| RefDataError::BadRow {
            table: "instruments",
            msg,
        })?,
        symbol,
        name,
        currency,
        venue,
        tick_size,
        lot_size,
        sector,
        isin,
    })
}

impl RefData {
    /// Reads all four reference tables.
    pub async fn load(pool: &sqlx::PgPool) -> Result<Self, RefDataError> {
        let instruments = sqlx::query_as::<_, InstrumentRow>(INSTRUMENT_SQL)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| instrument(r).map(|i| (i.symbol.clone(), i)))
            .collect::<Result<_, _>>()?;
        let venues = sqlx::query_as::<_, (String, String, String, String)>(VENUE_SQL)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(mic, name, country, timezone)| {
                (
                    mic.clone(),
                    Venue {
                        mic,
                        name,
                        country,
                        timezone,
                    },
                )
            })
            .collect();
        let accounts = sqlx::query_as::<_, (String, String, String)>(ACCOUNT_SQL)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(id, desk, owner)| (id.clone(), Account { id, desk, owner }))
            .collect();
        let fx_usd = sqlx::query_as::<_, (String, Decimal)>(FX_SQL)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
        Ok(Self {
            instruments,
            venues,
            accounts,
            fx_usd,
        })
    }
}

/// What a `tg_refdata` notification says changed.
#[derive(Debug, Deserialize)]
struct Change {
    table: String,
    op: String,
    key: Option<String>,
}

/// The latest copy of one changed row, or `None` when it is gone.
enum Fetched {
    Instrument(String, Option<Instrument>),
    Venue(String, Option<Venue>),
    Account(String, Option<Account>),
    Fx(String, Option<Decimal>),
    /// TRUNCATE, an unknown table or a missing key: reload everything.
    All,
}

async fn fetch_change(pool: &sqlx::PgPool, c: &Change) -> Result<Fetched, RefDataError> {
    let Some(key) = c.key.clone().filter(|_| c.op != "TRUNCATE") else {
        return Ok(Fetched::All);
    };
    Ok(match c.table.as_str() {
        "instruments" => {
            let row =
                sqlx::query_as::<_, InstrumentRow>(&format!("{INSTRUMENT_SQL} WHERE symbol = $1"))
                    .bind(&key)
                    .fetch_optional(pool)
                    .await?;
            Fetched::Instrument(key, row.map(instrument).transpose()?)
        }
        "venues" => {
            let row = sqlx::query_as::<_, (String, String, String, String)>(&format!(
                "{VENUE_SQL} WHERE mic = $1"
            ))
            .bind(&key)
            .fetch_optional(pool)
            .await?;
            Fetched::Venue(
                key,
                row.map(|(mic, name, country, timezone)| Venue {
                    mic,
                    name,
                    country,
                    timezone,
                }),
            )
        }
        "accounts" => {
            let row = sqlx::query_as::<_, (String, String, String)>(&format!(
                "{ACCOUNT_SQL} WHERE id = $1"
            ))
            .bind(&key)
            .fetch_optional(pool)
            .await?;
            Fetched::Account(
                key,
                row.map(|(id, desk, owner)| Account { id, desk, owner }),
            )
        }
        "fx_rates" => {
            let row =
                sqlx::query_as::<_, (String, Decimal)>(&format!("{FX_SQL} WHERE currency = $1"))
                    .bind(&key)
                    .fetch_optional(pool)
                    .await?;
            Fetched::Fx(key, row.map(|(_, rate)| rate))
        }
        _ => Fetched::All,
    })
}

fn put<V>(map: &mut HashMap<String, V>, key: String, v: Option<V>) {
    match v {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// The shared in-memory copy of the reference data. Readers take the read lock once
/// per batch; the listener holds the write lock only to swap in a changed row.
#[derive(Debug, Clone, Default)]
pub struct RefCache {
    inner: std::sync::Arc<std::sync::RwLock<RefData>>,
}

/// Channel the reference-table triggers notify on.
pub const NOTIFY_CHANNEL: &str = "tg_refdata";

impl RefCache {
    pub fn new(data: RefData) -> Self {
        Self {
            inner: std::sync::Arc::new(std::sync::RwLock::new(data)),
        }
    }

    pub async fn load(pool: &sqlx::PgPool) -> Result<Self, RefDataError> {
        Ok(Self::new(RefData::load(pool).await?))
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, RefData> {
        // A panic while holding the lock leaves whole rows in place, never half a
        // row, so the data stays usable.
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RefData> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn replace(&self, data: RefData) {
        *self.write() = data;
    }

    fn apply(&self, f: Fetched) {
        let mut d = self.write();
        match f {
            Fetched::Instrument(k, v) => put(&mut d.instruments, k, v),
            Fetched::Venue(k, v) => put(&mut d.venues, k, v),
            Fetched::Account(k, v) => put(&mut d.accounts, k, v),
            Fetched::Fx(k, v) => put(&mut d.fx_usd, k, v),
            Fetched::All => {}
        }
    }

    async fn reload(&self, pool: &sqlx::PgPool) -> Result<(), RefDataError> {
        let data = RefData::load(pool).await?;
        tracing::info!(
            instruments = data.instruments.len(),
            venues = data.venues.len(),
            accounts = data.accounts.len(),
            fx_rates = data.fx_usd.len(),
            "reference data loaded"
        );
        self.replace(data);
        Ok(())
    }

    /// Keeps the cache fresh until `shutdown`: applies each NOTIFY, and reloads
    /// everything after every (re)connect, since changes made while the listener
    /// was away sent notifications nobody heard.
    pub fn spawn_listener(
        &self,
        pool: sqlx::PgPool,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            let mut backoff = std::time::Duration::from_millis(100);
            while !shutdown.is_cancelled() {
                match cache.listen(&pool, &shutdown).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, ?backoff, "reference data listener failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            }
        })
    }

    async fn listen(
        &self,
        pool: &sqlx::PgPool,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(), RefDataError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        self.reload(pool).await?;
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = listener.try_recv() => m?,
            };
            let Some(n) = msg else {
                // The connection dropped. With eager reconnect (the default)
                // try_recv has already reconnected and re-issued LISTEN, so a
                // reload now misses nothing. Calling `listen` again would add the
                // channel a second time to the list replayed on every reconnect.
                tracing::warn!("reference data listener lost its connection; reloading");
                self.reload(pool).await?;
                continue;
            };
            let fetched = match serde_json::from_str::<Change>(n.payload()) {
                Ok(c) => fetch_change(pool, &c).await?,
                Err(e) => {
                    tracing::warn!(error = %e, payload = n.payload(), "unreadable refdata notification");
                    Fetched::All
                }
            };
            if matches!(fetched, Fetched::All) {
                self.reload(pool).await?;
            } else {
                self.apply(fetched);
            }
        }
    }
}
