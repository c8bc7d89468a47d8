//! Latest-value queries: the hub's in-memory latest trade and quote per
//! instrument, and for instruments the hub has not seen since this process
//! started, the newest history row (one SQL for all of them).
//!
//! "Latest" is by event time: the hub keeps the tick with the greatest `ts`, as
//! history does. History answers are not cached: the loader may still be writing
//! rows older than the hub's start, and a cached answer would hide them.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::{Context, Object, Result};

use super::types::{QuoteNode, TradeNode};
use super::{internal, list_cost, principal, Services, MAX_INSTRUMENTS};
use crate::auth::Principal;
use crate::history::{self, Visible};
use crate::tick::TickMeta;

fn check_len(instruments: &[String]) -> Result<()> {
    if instruments.len() > MAX_INSTRUMENTS {
        return Err(format!(
            "at most {MAX_INSTRUMENTS} instruments per request, got {}",
            instruments.len()
        )
        .into());
    }
    Ok(())
}

/// Fills the gaps of `found` (aligned with `instruments`) from history.
async fn fill_from_history<T, R, F, Fut>(
    s: &Services,
    instruments: &[String],
    mut found: Vec<Option<Arc<T>>>,
    fetch: F,
    into_tick: fn(R, u16) -> Result<T, crate::tick::TickError>,
    symbol_of: fn(&R) -> &str,
) -> Result<Vec<Option<Arc<T>>>>
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<R>, sqlx::Error>>,
{
    let missing: Vec<String> = instruments
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(i, _)| i.clone())
        .collect();
    if missing.is_empty() {
        return Ok(found);
    }
    let rows = fetch(missing).await.map_err(|e| internal("history", e))?;
    let mut by_symbol = HashMap::with_capacity(rows.len());
    for row in rows {
        let symbol = symbol_of(&row).to_owned();
        let tick = into_tick(row, s.shards).map_err(|e| internal("history", e))?;
        by_symbol.insert(symbol, Arc::new(tick));
    }
    for (i, slot) in instruments.iter().zip(found.iter_mut()) {
        if slot.is_none() {
            *slot = by_symbol.get(i).cloned();
        }
    }
    Ok(found)
}

/// The hub's ticks that `who` may see; the others are looked up in history,
/// which answers the newest row `who` may see.
fn visible_only<T: TickMeta>(found: Vec<Option<Arc<T>>>, who: &Principal) -> Vec<Option<Arc<T>>> {
    let e = who.entitlements();
    if e.is_all() {
        return found;
    }
    found
        .into_iter()
        .map(|t| t.filter(|t| e.allows(t.venue(), t.asset_class())))
        .collect()
}

async fn latest_trades(
    s: &Services,
    who: &Principal,
    instruments: &[String],
) -> Result<Vec<Option<TradeNode>>> {
    check_len(instruments)?;
    let found = visible_only(s.hub.latest_trades(instruments), who);
    let pool = s.pool.clone();
    let visible = Visible::of(who.entitlements());
    let filled = fill_from_history(
        s,
        instruments,
        found,
        |missing| async move { history::trades_as_of(&pool, &missing, i64::MAX, &visible).await },
        crate::tick::TradeRow::into_tick,
        |r| r.instrument.as_str(),
    )
    .await?;
    Ok(filled.into_iter().map(|t| t.map(TradeNode)).collect())
}

async fn latest_quotes(
    s: &Services,
    who: &Principal,
    instruments: &[String],
) -> Result<Vec<Option<QuoteNode>>> {
    check_len(instruments)?;
    let found = visible_only(s.hub.latest_quotes(instruments), who);
    let pool = s.pool.clone();
    let visible = Visible::of(who.entitlements());
    let filled = fill_from_history(
        s,
        instruments,
        found,
        |missing| async move { history::quotes_as_of(&pool, &missing, i64::MAX, &visible).await },
        crate::tick::QuoteRow::into_tick,
        |r| r.instrument.as_str(),
    )
    .await?;
    Ok(filled.into_iter().map(|q| q.map(QuoteNode)).collect())
}

#[derive(Default)]
pub struct LatestQuery;

#[Object]
impl LatestQuery {
    /// The instrument's newest quote by event time; null when it has none.
    async fn latest_quote(
        &self,
        ctx: &Context<'_>,
        instrument: String,
    ) -> Result<Option<QuoteNode>> {
        let s = ctx.data::<Services>()?;
        Ok(latest_quotes(s, principal(ctx)?, &[instrument])
            .await?
            .pop()
            .flatten())
    }

    /// The instrument's newest trade by event time; null when it has none.
    async fn latest_trade(
        &self,
        ctx: &Context<'_>,
        instrument: String,
    ) -> Result<Option<TradeNode>> {
        let s = ctx.data::<Services>()?;
        Ok(latest_trades(s, principal(ctx)?, &[instrument])
            .await?
            .pop()
            .flatten())
    }

    /// The newest quote of each instrument, in the order asked (at most 1000);
    /// null for an instrument without quotes.
    #[graphql(complexity = "list_cost(instruments.len(), MAX_INSTRUMENTS, child_complexity)")]
    async fn latest_quotes(
        &self,
        ctx: &Context<'_>,
        instruments: Vec<String>,
    ) -> Result<Vec<Option<QuoteNode>>> {
        latest_quotes(ctx.data::<Services>()?, principal(ctx)?, &instruments).await
    }

    /// The newest trade of each instrument, in the order asked (at most 1000);
    /// null for an instrument without trades.
    #[graphql(complexity = "list_cost(instruments.len(), MAX_INSTRUMENTS, child_complexity)")]
    async fn latest_trades(
        &self,
        ctx: &Context<'_>,
        instruments: Vec<String>,
    ) -> Result<Vec<Option<TradeNode>>> {
        latest_trades(ctx.data::<Services>()?, principal(ctx)?, &instruments).await
    }
}
