//! Subscriptions: live trades and quotes from the fan-out hub. Every argument is
//! an optional filter; a subscription receives only the events all its given
//! filters select, each with its stream `cursor`.

use std::future::Future;
use std::sync::Arc;

use async_graphql::{Context, Result, Subscription};
use futures_util::{Stream, StreamExt};

use super::fast::{LiveQuote, LiveTrade};
use super::types::{AssetClassKind, SideKind};
use super::{internal, Services, MAX_FILTER_VALUES};
use crate::history;
use crate::hub::{Feed, Filter, MaxRate};
use crate::tick::{QuoteRow, TickError, TickMeta, TradeRow};

/// Refuses a filter list longer than [`MAX_FILTER_VALUES`]: every event is
/// matched against it.
fn check_len<T>(arg: &str, values: &Option<Vec<T>>) -> Result<()> {
    match values {
        Some(v) if v.len() > MAX_FILTER_VALUES => Err(format!(
            "at most {MAX_FILTER_VALUES} `{arg}` per subscription, got {}",
            v.len()
        )
        .into()),
        _ => Ok(()),
    }
}

fn filter(
    instruments: Option<Vec<String>>,
    venues: Option<Vec<String>>,
    asset_classes: Option<Vec<AssetClassKind>>,
    sides: Option<Vec<SideKind>>,
    max_rate: Option<f64>,
    snapshot: bool,
) -> Result<Filter> {
    check_len("instruments", &instruments)?;
    check_len("venues", &venues)?;
    check_len("assetClasses", &asset_classes)?;
    check_len("sides", &sides)?;
    Ok(Filter {
        instruments,
        venues,
        asset_classes: asset_classes.map(|v| v.into_iter().map(Into::into).collect()),
        sides: sides.map(|v| v.into_iter().map(Into::into).collect()),
        max_rate: max_rate.map(MaxRate::per_second).transpose()?,
        snapshot,
    })
}

/// Completes a snapshot from history: the newest row of each listed instrument
/// the hub has not seen since it started.
async fn backfill<T, R, F, Fut>(
    feed: &mut Feed<T>,
    fetch: F,
    into_tick: fn(R, u16) -> Result<T, TickError>,
    shards: u16,
) -> Result<()>
where
    T: TickMeta,
    F: FnOnce(Vec<String>) -> Fut,
    Fut: Future<Output = Result<Vec<R>, sqlx::Error>>,
{
    if feed.not_in_snapshot().is_empty() {
        return Ok(());
    }
    let rows = fetch(feed.not_in_snapshot().to_vec())
        .await
        .map_err(|e| internal("history", e))?;
    let ticks = rows
        .into_iter()
        .map(|r| into_tick(r, shards).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| internal("history", e))?;
    feed.backfill(ticks);
    Ok(())
}

#[derive(Default)]
pub struct TradeSubscription;

#[Subscription]
impl TradeSubscription {
    /// Live trades matching every given filter (an omitted filter matches all;
    /// an empty list is refused, as it would match nothing, and so is a list of
    /// more than 1000 values). Per instrument, trades arrive in stream order. A
    /// subscriber that falls `subscriber_queue` events behind gets the error
    /// "subscriber too slow: ..." and is closed; resubscribe to continue.
    ///
    /// `maxRate` conflates: at most that many trades per second per instrument
    /// (above 0, at most 1000), each the latest of its instrument when sent; the
    /// ones in between are skipped, never queued, so such a subscriber is never
    /// too slow. Omitted, every trade is sent.
    ///
    /// `snapshot: true` first sends the latest trade of every selected instrument
    /// that passes the filters (from this server's memory, or from history for
    /// listed instruments it has not seen since it started; without an
    /// `instruments` list, only the ones it has seen), then live trades, with
    /// none missed and none repeated between the two.
    // Each argument is a GraphQL argument of the field.
    #[allow(clippy::too_many_arguments)]
    async fn trades(
        &self,
        ctx: &Context<'_>,
        instruments: Option<Vec<String>>,
        venues: Option<Vec<String>>,
        asset_classes: Option<Vec<AssetClassKind>>,
        sides: Option<Vec<SideKind>>,
        max_rate: Option<f64>,
        #[graphql(default)] snapshot: bool,
    ) -> Result<impl Stream<Item = Result<LiveTrade>>> {
        let services = ctx.data::<Services>()?;
        let mut feed = services.hub.subscribe_trades(filter(
            instruments,
            venues,
            asset_classes,
            sides,
            max_rate,
            snapshot,
        )?)?;
        let pool = services.pool.clone();
        backfill(
            &mut feed,
            |missing| async move { history::trades_as_of(&pool, &missing, i64::MAX).await },
            TradeRow::into_tick,
            services.shards,
        )
        .await?;
        Ok(feed.map(|r| r.map(LiveTrade).map_err(Into::into)))
    }
}

#[derive(Default)]
pub struct QuoteSubscription;

#[Subscription]
impl QuoteSubscription {
    /// Live quotes matching every given filter (an omitted filter matches all;
    /// an empty list is refused, as it would match nothing, and so is a list of
    /// more than 1000 values). Per instrument, quotes arrive in stream order. A
    /// subscriber that falls `subscriber_queue` events behind gets the error
    /// "subscriber too slow: ..." and is closed; resubscribe to continue.
    ///
    /// `maxRate` conflates: at most that many quotes per second per instrument
    /// (above 0, at most 1000), each the latest of its instrument when sent; the
    /// ones in between are skipped, never queued, so such a subscriber is never
    /// too slow. Omitted, every quote is sent.
    ///
    /// `snapshot: true` first sends the latest quote of every selected instrument
    /// that passes the filters (from this server's memory, or from history for
    /// listed instruments it has not seen since it started; without an
    /// `instruments` list, only the ones it has seen), then live quotes, with
    /// none missed and none repeated between the two.
    async fn quotes(
        &self,
        ctx: &Context<'_>,
        instruments: Option<Vec<String>>,
        venues: Option<Vec<String>>,
        asset_classes: Option<Vec<AssetClassKind>>,
        max_rate: Option<f64>,
        #[graphql(default)] snapshot: bool,
    ) -> Result<impl Stream<Item = Result<LiveQuote>>> {
        let services = ctx.data::<Services>()?;
        let mut feed = services.hub.subscribe_quotes(filter(
            instruments,
            venues,
            asset_classes,
            None,
            max_rate,
            snapshot,
        )?)?;
        let pool = services.pool.clone();
        backfill(
            &mut feed,
            |missing| async move { history::quotes_as_of(&pool, &missing, i64::MAX).await },
            QuoteRow::into_tick,
            services.shards,
        )
        .await?;
        Ok(feed.map(|r| r.map(LiveQuote).map_err(Into::into)))
    }
}
