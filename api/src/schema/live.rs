//! Subscriptions: live trades and quotes from the fan-out hub. Every argument is
//! an optional filter; a subscription receives only the events all its given
//! filters select, each with its stream `cursor`.

use async_graphql::{Context, Result, Subscription};
use futures_util::{Stream, StreamExt};

use super::types::{AssetClassKind, QuoteNode, SideKind, TradeNode};
use super::{Services, MAX_INSTRUMENTS};
use crate::hub::Filter;

fn filter(
    instruments: Option<Vec<String>>,
    venues: Option<Vec<String>>,
    asset_classes: Option<Vec<AssetClassKind>>,
    sides: Option<Vec<SideKind>>,
) -> Result<Filter> {
    if let Some(i) = &instruments {
        if i.len() > MAX_INSTRUMENTS {
            return Err(format!(
                "at most {MAX_INSTRUMENTS} instruments per subscription, got {}",
                i.len()
            )
            .into());
        }
    }
    Ok(Filter {
        instruments,
        venues,
        asset_classes: asset_classes.map(|v| v.into_iter().map(Into::into).collect()),
        sides: sides.map(|v| v.into_iter().map(Into::into).collect()),
    })
}

#[derive(Default)]
pub struct TradeSubscription;

#[Subscription]
impl TradeSubscription {
    /// Live trades matching every given filter (an omitted filter matches all;
    /// an empty list is refused, as it would match nothing). Per instrument,
    /// trades arrive in stream order. A subscriber that falls `subscriber_queue`
    /// events behind gets the error "subscriber too slow: ..." and is closed;
    /// resubscribe to continue.
    async fn trades(
        &self,
        ctx: &Context<'_>,
        instruments: Option<Vec<String>>,
        venues: Option<Vec<String>>,
        asset_classes: Option<Vec<AssetClassKind>>,
        sides: Option<Vec<SideKind>>,
    ) -> Result<impl Stream<Item = Result<TradeNode>>> {
        let hub = &ctx.data::<Services>()?.hub;
        let feed = hub.subscribe_trades(filter(instruments, venues, asset_classes, sides)?)?;
        Ok(feed.map(|r| r.map(TradeNode).map_err(Into::into)))
    }
}

#[derive(Default)]
pub struct QuoteSubscription;

#[Subscription]
impl QuoteSubscription {
    /// Live quotes matching every given filter (an omitted filter matches all;
    /// an empty list is refused, as it would match nothing). Per instrument,
    /// quotes arrive in stream order. A subscriber that falls `subscriber_queue`
    /// events behind gets the error "subscriber too slow: ..." and is closed;
    /// resubscribe to continue.
    async fn quotes(
        &self,
        ctx: &Context<'_>,
        instruments: Option<Vec<String>>,
        venues: Option<Vec<String>>,
        asset_classes: Option<Vec<AssetClassKind>>,
    ) -> Result<impl Stream<Item = Result<QuoteNode>>> {
        let hub = &ctx.data::<Services>()?.hub;
        let feed = hub.subscribe_quotes(filter(instruments, venues, asset_classes, None)?)?;
        Ok(feed.map(|r| r.map(QuoteNode).map_err(Into::into)))
    }
}
