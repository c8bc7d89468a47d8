//! Subscriptions: live trades and quotes from the fan-out hub. Every argument is
//! an optional filter; a subscription receives only the events all its given
//! filters select, each with its stream `cursor`.

use async_graphql::{Context, Result, Subscription};
use futures_util::{Stream, StreamExt};

use super::fast::{LiveQuote, LiveTrade};
use super::types::{AssetClassKind, SideKind};
use super::{Services, MAX_FILTER_VALUES};
use crate::hub::{Filter, MaxRate};

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
    /// that this server has seen since it started (and that passes the filters),
    /// then live trades, with none missed and none repeated between the two.
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
        let hub = &ctx.data::<Services>()?.hub;
        let feed = hub.subscribe_trades(filter(
            instruments,
            venues,
            asset_classes,
            sides,
            max_rate,
            snapshot,
        )?)?;
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
    /// that this server has seen since it started (and that passes the filters),
    /// then live quotes, with none missed and none repeated between the two.
    async fn quotes(
        &self,
        ctx: &Context<'_>,
        instruments: Option<Vec<String>>,
        venues: Option<Vec<String>>,
        asset_classes: Option<Vec<AssetClassKind>>,
        max_rate: Option<f64>,
        #[graphql(default)] snapshot: bool,
    ) -> Result<impl Stream<Item = Result<LiveQuote>>> {
        let hub = &ctx.data::<Services>()?.hub;
        let feed = hub.subscribe_quotes(filter(
            instruments,
            venues,
            asset_classes,
            None,
            max_rate,
            snapshot,
        )?)?;
        Ok(feed.map(|r| r.map(LiveQuote).map_err(Into::into)))
    }
}
