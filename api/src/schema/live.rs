//! Subscriptions: live trades and quotes from the fan-out hub. Every argument is
//! an optional filter; a subscription receives only the events all its given
//! filters select, each with its stream `cursor`.

use std::future::Future;
use std::sync::Arc;

use async_graphql::{Context, ErrorExtensions, Result, Subscription};
use futures_util::{Stream, StreamExt};
use sqlx::PgPool;

use super::fast::{quote_json, trade_json, LiveQuote, LiveTrade};
use super::types::{AssetClassKind, QuoteConflationKind, SideKind, TradeConflationKind};
use super::{internal, principal, Services, MAX_FILTER_VALUES};
use crate::auth::{Principal, SubscriptionSlot};
use crate::history::{self, Visible};
use crate::hub::{ConflationField, ConflationKey, Feed, Filter, HubError, MaxRate, Resumed};
use crate::resume::ResumeCursor;
use crate::shared_json::SelectionKey;
use crate::tick::{QuoteRow, QuoteTick, TickError, TickMeta, TradeRow, TradeTick};
use crate::ws::{Gate, Gated};
use crate::Hub;

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

/// `conflateBy` as the hub takes it, from either field's GraphQL enum.
pub(crate) fn conflation_fields<K: Into<ConflationField>>(
    by: Option<Vec<K>>,
) -> Option<Vec<ConflationField>> {
    by.map(|v| v.into_iter().map(Into::into).collect())
}

/// The filter arguments of `trades` and `quotes` as the client gave them.
#[derive(Default)]
pub(crate) struct LiveArgs {
    pub instruments: Option<Vec<String>>,
    pub venues: Option<Vec<String>>,
    pub asset_classes: Option<Vec<AssetClassKind>>,
    /// `trades` only.
    pub sides: Option<Vec<SideKind>>,
    pub max_rate: Option<f64>,
    /// What `max_rate` is per; None: the instrument.
    pub conflate_by: Option<Vec<ConflationField>>,
    pub snapshot: bool,
}

impl LiveArgs {
    /// The values of every filter list, as given: what counts against the
    /// user's `max_filter_values`.
    pub(crate) fn values(&self) -> usize {
        fn len<T>(v: &Option<Vec<T>>) -> usize {
            v.as_ref().map_or(0, Vec::len)
        }
        len(&self.instruments)
            + len(&self.venues)
            + len(&self.asset_classes)
            + len(&self.sides)
            + len(&self.conflate_by)
    }

    pub(crate) fn filter(self) -> Result<Filter> {
        check_len("instruments", &self.instruments)?;
        check_len("venues", &self.venues)?;
        check_len("assetClasses", &self.asset_classes)?;
        check_len("sides", &self.sides)?;
        check_len("conflateBy", &self.conflate_by)?;
        if self.max_rate.is_none() && self.conflate_by.is_some() {
            return Err(
                "`conflateBy` needs `maxRate`: without it every event is sent, none conflated"
                    .into(),
            );
        }
        let rate = self.max_rate.map(MaxRate::per_second).transpose()?;
        let key = self
            .conflate_by
            .as_deref()
            .map(ConflationKey::of)
            .transpose()?;
        let max_rate = rate.map(|r| key.map_or(r, |k| r.per(k)));
        Ok(Filter {
            instruments: self.instruments,
            venues: self.venues,
            asset_classes: self
                .asset_classes
                .map(|v| v.into_iter().map(Into::into).collect()),
            sides: self.sides.map(|v| v.into_iter().map(Into::into).collect()),
            max_rate,
            snapshot: self.snapshot,
            entitled: None,
        })
    }
}

/// What the `trades` and `quotes` fields differ in.
pub(crate) trait LiveKind: TickMeta + Sized + Send + Sync + 'static {
    type Row;
    /// The tick's shared JSON for a plain selection (see [`crate::shared_json`]).
    fn json(&self, key: &SelectionKey) -> Option<Arc<str>>;
    fn subscribe(hub: &Hub, filter: Filter) -> Result<Feed<Self>, HubError>;
    fn resume(
        hub: &Hub,
        filter: Filter,
        after: &str,
    ) -> impl Future<Output = Result<Resumed<Self>, HubError>> + Send;
    /// The newest history row of each of `instruments` that `visible` lets through.
    fn latest_rows(
        pool: &PgPool,
        instruments: &[String],
        visible: &Visible,
    ) -> impl Future<Output = Result<Vec<Self::Row>, sqlx::Error>> + Send;
    fn into_tick(row: Self::Row, shards: u16) -> Result<Self, TickError>;
}

impl LiveKind for TradeTick {
    type Row = TradeRow;

    fn json(&self, key: &SelectionKey) -> Option<Arc<str>> {
        trade_json(self, key)
    }

    fn subscribe(hub: &Hub, filter: Filter) -> Result<Feed<Self>, HubError> {
        hub.subscribe_trades(filter)
    }

    fn resume(
        hub: &Hub,
        filter: Filter,
        after: &str,
    ) -> impl Future<Output = Result<Resumed<Self>, HubError>> + Send {
        hub.resume_trades(filter, after)
    }

    fn latest_rows(
        pool: &PgPool,
        instruments: &[String],
        visible: &Visible,
    ) -> impl Future<Output = Result<Vec<TradeRow>, sqlx::Error>> + Send {
        history::trades_as_of(pool, instruments, i64::MAX, visible)
    }

    fn into_tick(row: TradeRow, shards: u16) -> Result<Self, TickError> {
        row.into_tick(shards)
    }
}

impl LiveKind for QuoteTick {
    type Row = QuoteRow;

    fn json(&self, key: &SelectionKey) -> Option<Arc<str>> {
        quote_json(self, key)
    }

    fn subscribe(hub: &Hub, filter: Filter) -> Result<Feed<Self>, HubError> {
        hub.subscribe_quotes(filter)
    }

    fn resume(
        hub: &Hub,
        filter: Filter,
        after: &str,
    ) -> impl Future<Output = Result<Resumed<Self>, HubError>> + Send {
        hub.resume_quotes(filter, after)
    }

    fn latest_rows(
        pool: &PgPool,
        instruments: &[String],
        visible: &Visible,
    ) -> impl Future<Output = Result<Vec<QuoteRow>, sqlx::Error>> + Send {
        history::quotes_as_of(pool, instruments, i64::MAX, visible)
    }

    fn into_tick(row: QuoteRow, shards: u16) -> Result<Self, TickError> {
        row.into_tick(shards)
    }
}

/// A hub error as a GraphQL error; the ones a client acts on carry
/// `extensions.code` (`CURSOR_EXPIRED`, `TOO_SLOW`).
pub(crate) fn hub_error(e: HubError) -> async_graphql::Error {
    let code = e.code();
    let err = async_graphql::Error::new(e.to_string());
    match code {
        Some(code) => err.extend_with(|_, ext| ext.set("code", code)),
        None => err,
    }
}

/// Opens a subscription: resumed after `after`, or from now (with a snapshot
/// when asked). `values`: [`LiveArgs::values`].
async fn open<T: LiveKind>(
    ctx: &Context<'_>,
    filter: Filter,
    after: Option<String>,
    values: usize,
) -> Result<Resumed<T>> {
    let gate = ctx.data_opt::<Arc<Gate>>().cloned();
    let who = principal(ctx)?;
    open_with(ctx.data::<Services>()?, who, gate, filter, after, values).await
}

/// [`open`] without a GraphQL context. The feed carries only what `who` is
/// entitled to, whatever the filter asks for. Instruments and venues must be
/// in the reference data, and the subscription within its user's limits
/// ([`crate::auth::Users::subscribe`]), which it counts against until it is
/// dropped.
pub(crate) async fn open_with<T: LiveKind>(
    s: &Services,
    who: &Principal,
    gate: Option<Arc<Gate>>,
    filter: Filter,
    after: Option<String>,
    values: usize,
) -> Result<Resumed<T>> {
    known(s, &filter)?;
    let slot = s
        .users
        .subscribe(who, values)
        .map_err(|e| coded(e.to_string(), e.code()))?;
    let feed = open_feed(s, who, gate, filter, after).await?;
    Ok(Counted { feed, _slot: slot }.boxed())
}

/// A subscription's stream, holding its place in its user's limits.
struct Counted<T> {
    feed: Resumed<T>,
    _slot: SubscriptionSlot,
}

impl<T> Stream for Counted<T> {
    type Item = Result<Arc<T>, HubError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.feed.poll_next_unpin(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.feed.size_hint()
    }
}

/// Listed at most this many in an error; the rest are counted.
const UNKNOWN_LISTED: usize = 5;
/// Characters of a name an error quotes.
const NAME_SHOWN: usize = 64;

/// Refuses instruments and venues that are not in the reference data: no
/// event can match them, and each would be held for as long as the
/// subscription lives.
fn known(s: &Services, filter: &Filter) -> Result<()> {
    let refs = s.refs.read();
    if let Some(list) = &filter.instruments {
        all_known(
            list,
            |n| refs.instruments.contains_key(n),
            "instruments",
            "UNKNOWN_INSTRUMENT",
        )?;
    }
    if let Some(list) = &filter.venues {
        all_known(
            list,
            |n| refs.venues.contains_key(n),
            "venues",
            "UNKNOWN_VENUE",
        )?;
    }
    Ok(())
}

fn all_known(
    list: &[String],
    known: impl Fn(&str) -> bool,
    what: &str,
    code: &'static str,
) -> Result<()> {
    let mut unknown = list.iter().filter(|n| !known(n.as_str()));
    let named: Vec<String> = unknown
        .by_ref()
        .take(UNKNOWN_LISTED)
        .map(|n| shown(n))
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    let mut message = format!(
        "unknown {what}, not in the reference data: {}",
        named.join(", ")
    );
    let more = unknown.count();
    if more > 0 {
        message.push_str(&format!(" and {more} more"));
    }
    Err(coded(message, code))
}

/// `name` quoted, cut at [`NAME_SHOWN`] characters.
fn shown(name: &str) -> String {
    match name.char_indices().nth(NAME_SHOWN) {
        Some((cut, _)) => format!("{:?}...", &name[..cut]),
        None => format!("{name:?}"),
    }
}

fn coded(message: String, code: &'static str) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, ext| ext.set("code", code))
}

/// Opens the feed itself; see [`open_with`].
async fn open_feed<T: LiveKind>(
    s: &Services,
    who: &Principal,
    gate: Option<Arc<Gate>>,
    mut filter: Filter,
    after: Option<String>,
) -> Result<Resumed<T>> {
    let e = who.entitlements();
    filter.entitled = (!e.is_all()).then(|| e.clone());
    let visible = Visible::of(e);
    match after {
        Some(_) if filter.snapshot => Err(
            "`after` and `snapshot` cannot be combined: `after` resumes exactly where the \
             cursor left off"
                .into(),
        ),
        // A conflated subscription only ever owes the newest value of each
        // instrument: resuming is a snapshot of them, then live.
        Some(after) if filter.max_rate.is_some() => {
            ResumeCursor::parse(&after, s.shards).map_err(|e| hub_error(e.into()))?;
            filter.snapshot = true;
            from_now(s, gate, filter, &visible).await
        }
        Some(after) => T::resume(&s.hub, filter, &after).await.map_err(hub_error),
        None => from_now(s, gate, filter, &visible).await,
    }
}

/// Subscribes, and completes a snapshot from history: the newest row of each
/// listed instrument the hub has not seen since it started. A conflated feed
/// waits while its connection's outbox is backed up (its [`Gate`] is shut):
/// meanwhile the hub keeps only its newest value per instrument.
async fn from_now<T: LiveKind>(
    s: &Services,
    gate: Option<Arc<Gate>>,
    filter: Filter,
    visible: &Visible,
) -> Result<Resumed<T>> {
    let gate = gate.filter(|_| filter.max_rate.is_some());
    // A snapshot of every instrument holds what this process has seen; the
    // others (of the asset classes asked for) come from history.
    let everything = match (&filter.snapshot, &filter.instruments) {
        (true, None) => {
            let refs = s.refs.read();
            let classes = filter.asset_classes.clone();
            Some(
                refs.instruments
                    .values()
                    .filter(|i| classes.as_ref().is_none_or(|c| c.contains(&i.asset_class)))
                    .map(|i| i.symbol.clone())
                    .collect::<Vec<_>>(),
            )
        }
        _ => None,
    };
    let mut feed = T::subscribe(&s.hub, filter).map_err(hub_error)?;
    if let Some(known) = everything {
        feed.complete_from(known);
    }
    if !feed.not_in_snapshot().is_empty() {
        let rows = T::latest_rows(&s.pool, feed.not_in_snapshot(), visible)
            .await
            .map_err(|e| internal("history", e))?;
        let ticks = rows
            .into_iter()
            .map(|r| T::into_tick(r, s.shards).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| internal("history", e))?;
        feed.backfill(ticks);
    }
    Ok(Gated::new(feed, gate).boxed())
}

#[derive(Default)]
pub struct TradeSubscription;

#[Subscription]
impl TradeSubscription {
    /// Live trades matching every given filter (an omitted filter matches all;
    /// an empty list is refused, as it would match nothing, and so is a list of
    /// more than 1000 values). Instruments and venues must be in the reference
    /// data, or the subscription is refused (code `UNKNOWN_INSTRUMENT` or
    /// `UNKNOWN_VENUE`). Per instrument, trades arrive in stream order. A
    /// subscriber that falls `subscriber_queue` events, or
    /// `subscriber_queue_bytes` bytes of events, behind gets the error
    /// "subscriber too slow: ..." (code `TOO_SLOW`) and is closed; resubscribe
    /// to continue.
    ///
    /// `maxRate` conflates: at most that many trades per second per instrument
    /// (0.001 to 1000), each the latest of its instrument when sent; the
    /// ones in between are skipped, never queued, so such a subscriber is never
    /// too slow. Omitted, every trade is sent. `conflateBy` (with `maxRate`
    /// only) names what to keep one latest value per instead of the
    /// instrument: any of `INSTRUMENT`, `VENUE`, `SOURCE`, `SIDE`, combined; `[INSTRUMENT, VENUE]` sends
    /// each venue's latest trade of an instrument, not only the last venue's.
    ///
    /// `snapshot: true` first sends the latest trade of every selected instrument
    /// that passes the filters (from this server's memory, or from history for
    /// instruments it has not seen since it started), then live trades, with
    /// none missed and none repeated between the two.
    ///
    /// `after` resumes: give the `resume` of the last trade received (with the
    /// same filters) to receive first every trade this subscription would have
    /// sent after it, in order, none twice, then live ones. When the streams no
    /// longer hold them (trimmed, or Redis lost them), the subscription is
    /// refused with `extensions.code` `CURSOR_EXPIRED`: reload the current state
    /// (`snapshot: true`) instead. With `maxRate`, `after` means `snapshot: true`:
    /// a conflated subscription owes only the newest value of each instrument
    /// (the snapshot holds that, whatever `conflateBy`).
    /// Not with `snapshot`.
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
        conflate_by: Option<Vec<TradeConflationKind>>,
        #[graphql(default)] snapshot: bool,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Result<LiveTrade>>> {
        let args = LiveArgs {
            instruments,
            venues,
            asset_classes,
            sides,
            max_rate,
            conflate_by: conflation_fields(conflate_by),
            snapshot,
        };
        let values = args.values();
        let feed = open::<TradeTick>(ctx, args.filter()?, after, values).await?;
        Ok(feed.map(|r| r.map(LiveTrade).map_err(hub_error)))
    }
}

#[derive(Default)]
pub struct QuoteSubscription;

#[Subscription]
impl QuoteSubscription {
    /// Live quotes matching every given filter (an omitted filter matches all;
    /// an empty list is refused, as it would match nothing, and so is a list of
    /// more than 1000 values). Instruments and venues must be in the reference
    /// data, or the subscription is refused (code `UNKNOWN_INSTRUMENT` or
    /// `UNKNOWN_VENUE`). Per instrument, quotes arrive in stream order. A
    /// subscriber that falls `subscriber_queue` events, or
    /// `subscriber_queue_bytes` bytes of events, behind gets the error
    /// "subscriber too slow: ..." (code `TOO_SLOW`) and is closed; resubscribe
    /// to continue.
    ///
    /// `maxRate` conflates: at most that many quotes per second per instrument
    /// (0.001 to 1000), each the latest of its instrument when sent; the
    /// ones in between are skipped, never queued, so such a subscriber is never
    /// too slow. Omitted, every quote is sent. `conflateBy` (with `maxRate`
    /// only) names what to keep one latest value per instead of the
    /// instrument: any of `INSTRUMENT`, `VENUE`, `SOURCE`, combined; `[INSTRUMENT, VENUE]` sends
    /// each venue's latest quote of an instrument, not only the last venue's.
    ///
    /// `snapshot: true` first sends the latest quote of every selected instrument
    /// that passes the filters (from this server's memory, or from history for
    /// instruments it has not seen since it started), then live quotes, with
    /// none missed and none repeated between the two.
    ///
    /// `after` resumes: give the `resume` of the last quote received (with the
    /// same filters) to receive first every quote this subscription would have
    /// sent after it, in order, none twice, then live ones. When the streams no
    /// longer hold them (trimmed, or Redis lost them), the subscription is
    /// refused with `extensions.code` `CURSOR_EXPIRED`: reload the current state
    /// (`snapshot: true`) instead. With `maxRate`, `after` means `snapshot: true`:
    /// a conflated subscription owes only the newest value of each instrument
    /// (the snapshot holds that, whatever `conflateBy`).
    /// Not with `snapshot`.
    // Each argument is a GraphQL argument of the field.
    #[allow(clippy::too_many_arguments)]
    async fn quotes(
        &self,
        ctx: &Context<'_>,
        instruments: Option<Vec<String>>,
        venues: Option<Vec<String>>,
        asset_classes: Option<Vec<AssetClassKind>>,
        max_rate: Option<f64>,
        conflate_by: Option<Vec<QuoteConflationKind>>,
        #[graphql(default)] snapshot: bool,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Result<LiveQuote>>> {
        let args = LiveArgs {
            instruments,
            venues,
            asset_classes,
            sides: None,
            max_rate,
            conflate_by: conflation_fields(conflate_by),
            snapshot,
        };
        let values = args.values();
        let feed = open::<QuoteTick>(ctx, args.filter()?, after, values).await?;
        Ok(feed.map(|r| r.map(LiveQuote).map_err(hub_error)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(args: LiveArgs) -> String {
        match args.filter() {
            Ok(_) => panic!("accepted"),
            Err(e) => e.message,
        }
    }

    #[test]
    fn conflate_by_needs_max_rate_and_a_field() {
        let by_venue = Some(vec![ConflationField::Venue]);
        assert_eq!(
            refused(LiveArgs {
                conflate_by: by_venue.clone(),
                ..LiveArgs::default()
            }),
            "`conflateBy` needs `maxRate`: without it every event is sent, none conflated"
        );
        assert_eq!(
            refused(LiveArgs {
                max_rate: Some(2.0),
                conflate_by: Some(Vec::new()),
                ..LiveArgs::default()
            }),
            HubError::EmptyList { arg: "conflateBy" }.to_string()
        );
        let filter = LiveArgs {
            max_rate: Some(2.0),
            conflate_by: by_venue,
            ..LiveArgs::default()
        }
        .filter()
        .expect("accepted");
        let want = MaxRate::per_second(2.0)
            .expect("rate")
            .per(ConflationKey::of(&[ConflationField::Venue]).expect("key"));
        assert_eq!(filter.max_rate, Some(want));
    }
}
