//! Reference-data queries, answered from the in-memory [`RefCache`] (complete, and
//! kept fresh by LISTEN/NOTIFY), so they cost no SQL.
//!
//! [`RefCache`]: tickgraph_enrich::refdata::RefCache

use std::collections::HashSet;

use async_graphql::connection::{Connection, Edge};
use async_graphql::{Context, Object, Result, SimpleObject};
use tickgraph_enrich::refdata::{AssetClass, Instrument};

use super::types::{AccountNode, AssetClassKind, FxRate, InstrumentNode, VenueNode};
use super::{page_cost, page_size, Services, MAX_INSTRUMENTS};

/// Extra fields on `InstrumentConnection`.
#[derive(SimpleObject, Debug, Default)]
pub struct InstrumentTotal {
    /// How many instruments match the filters, over all pages.
    pub total_count: usize,
}

/// The `instruments` filters; every one given must match.
#[derive(Debug, Default)]
struct InstrumentFilter {
    symbols: Option<HashSet<String>>,
    venue: Option<String>,
    asset_class: Option<AssetClass>,
    currency: Option<String>,
    sector: Option<String>,
    /// Lower-cased once, compared against lower-cased symbol and name.
    search: Option<String>,
}

impl InstrumentFilter {
    fn matches(&self, i: &Instrument) -> bool {
        self.symbols.as_ref().is_none_or(|s| s.contains(&i.symbol))
            && self.venue.as_ref().is_none_or(|v| *v == i.venue)
            && self.asset_class.is_none_or(|a| a == i.asset_class)
            && self
                .currency
                .as_ref()
                .is_none_or(|c| c.eq_ignore_ascii_case(&i.currency))
            && self
                .sector
                .as_ref()
                .is_none_or(|s| i.sector.as_ref().is_some_and(|x| x.eq_ignore_ascii_case(s)))
            && self.search.as_ref().is_none_or(|q| {
                i.symbol.to_lowercase().contains(q) || i.name.to_lowercase().contains(q)
            })
    }
}

#[derive(Default)]
pub struct RefDataQuery;

#[Object]
impl RefDataQuery {
    /// Instruments matching every given filter, ordered by symbol. `search` is a
    /// case-insensitive substring of the symbol or the name; `currency` and
    /// `sector` ignore case; `symbols` holds at most 1000. Pages hold `first`
    /// instruments (at most 1000); pass a page's `pageInfo.endCursor` as
    /// `after` for the next.
    #[allow(clippy::too_many_arguments)]
    #[graphql(complexity = "page_cost(first, child_complexity)")]
    async fn instruments(
        &self,
        ctx: &Context<'_>,
        symbols: Option<Vec<String>>,
        venue: Option<String>,
        asset_class: Option<AssetClassKind>,
        currency: Option<String>,
        sector: Option<String>,
        search: Option<String>,
        #[graphql(default = 100)] first: i32,
        after: Option<String>,
    ) -> Result<Connection<String, InstrumentNode, InstrumentTotal>> {
        // Every instrument is matched against the list, so it is bounded like
        // every other list argument.
        if let Some(s) = &symbols {
            if s.len() > MAX_INSTRUMENTS {
                return Err(format!(
                    "at most {MAX_INSTRUMENTS} `symbols` per request, got {}",
                    s.len()
                )
                .into());
            }
        }
        let first = page_size(first)?;
        let filter = InstrumentFilter {
            symbols: symbols.map(HashSet::from_iter),
            venue,
            asset_class: asset_class.map(Into::into),
            currency,
            sector,
            search: search.map(|s| s.to_lowercase()),
        };
        let mut matched: Vec<Instrument> = {
            let data = ctx.data::<Services>()?.refs.read();
            data.instruments
                .values()
                .filter(|i| filter.matches(i))
                .cloned()
                .collect()
        };
        matched.sort_unstable_by(|a, b| a.symbol.cmp(&b.symbol));
        let total_count = matched.len();
        let start = match &after {
            Some(a) => matched.partition_point(|i| i.symbol.as_str() <= a.as_str()),
            None => 0,
        };
        let end = start.saturating_add(first).min(matched.len());
        let mut conn = Connection::with_additional_fields(
            start > 0,
            end < matched.len(),
            InstrumentTotal { total_count },
        );
        conn.edges.extend(
            matched
                .drain(start..end)
                .map(|i| Edge::new(i.symbol.clone(), InstrumentNode(i))),
        );
        Ok(conn)
    }

    /// One instrument by symbol; null when unknown.
    async fn instrument(
        &self,
        ctx: &Context<'_>,
        symbol: String,
    ) -> Result<Option<InstrumentNode>> {
        let data = ctx.data::<Services>()?.refs.read();
        Ok(data.instruments.get(&symbol).cloned().map(InstrumentNode))
    }

    /// Every venue, ordered by MIC.
    async fn venues(&self, ctx: &Context<'_>) -> Result<Vec<VenueNode>> {
        let mut v: Vec<VenueNode> = {
            let data = ctx.data::<Services>()?.refs.read();
            data.venues.values().map(VenueNode::from).collect()
        };
        v.sort_unstable_by(|a, b| a.mic.cmp(&b.mic));
        Ok(v)
    }

    /// Accounts, all or those of one desk, ordered by id.
    async fn accounts(&self, ctx: &Context<'_>, desk: Option<String>) -> Result<Vec<AccountNode>> {
        let mut v: Vec<AccountNode> = {
            let data = ctx.data::<Services>()?.refs.read();
            data.accounts
                .values()
                .filter(|a| desk.as_ref().is_none_or(|d| *d == a.desk))
                .map(AccountNode::from)
                .collect()
        };
        v.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// USD rates of every currency, ordered by currency.
    async fn fx_rates(&self, ctx: &Context<'_>) -> Result<Vec<FxRate>> {
        let mut v: Vec<FxRate> = {
            let data = ctx.data::<Services>()?.refs.read();
            data.fx_usd
                .iter()
                .map(|(c, r)| FxRate {
                    currency: c.clone(),
                    usd_rate: *r,
                })
                .collect()
        };
        v.sort_unstable_by(|a, b| a.currency.cmp(&b.currency));
        Ok(v)
    }
}
