//! History queries: one instrument's trades or quotes in a time range, a page at
//! a time, one SQL per page (see [`crate::history`] for the keyset order).

use std::sync::Arc;

use async_graphql::connection::{Connection, CursorType, Edge, OpaqueCursor};
use async_graphql::{Context, Object, Result};
use chrono::{DateTime, Utc};

use super::types::{QuoteNode, SortOrder, TradeNode};
use super::{internal, page_cost, page_size, principal, Services};
use crate::history::{self, HistoryKey, Order, Page, Visible};
use crate::tick::{QuoteRow, TradeRow};

/// The opaque `after` cursor of history pages: a row's (ts, source, seq).
pub type HistoryCursor = OpaqueCursor<HistoryKey>;

/// A history row that can become a GraphQL node.
trait Row: Sized {
    type Node;
    fn key(&self) -> HistoryKey;
    fn into_node(self, shards: u16) -> Result<Self::Node>;
}

impl Row for TradeRow {
    type Node = TradeNode;

    fn key(&self) -> HistoryKey {
        HistoryKey {
            ts_ns: self.ts_ns,
            source: self.source.clone(),
            seq: self.seq,
        }
    }

    fn into_node(self, shards: u16) -> Result<TradeNode> {
        let tick = self.into_tick(shards).map_err(|e| internal("history", e))?;
        Ok(TradeNode(Arc::new(tick)))
    }
}

impl Row for QuoteRow {
    type Node = QuoteNode;

    fn key(&self) -> HistoryKey {
        HistoryKey {
            ts_ns: self.ts_ns,
            source: self.source.clone(),
            seq: self.seq,
        }
    }

    fn into_node(self, shards: u16) -> Result<QuoteNode> {
        let tick = self.into_tick(shards).map_err(|e| internal("history", e))?;
        Ok(QuoteNode(Arc::new(tick)))
    }
}

pub(crate) fn nanos(t: DateTime<Utc>, arg: &str) -> Result<i64> {
    t.timestamp_nanos_opt().ok_or_else(|| {
        format!("`{arg}` must lie between the years 1678 and 2261 (epoch nanoseconds)").into()
    })
}

/// Parses the arguments shared by `trades` and `quotes` into a page request that
/// asks for one row more than `first`, to learn whether another page follows.
fn page_request(
    instrument: String,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    first: i32,
    after: Option<String>,
    order: SortOrder,
) -> Result<(Page, usize)> {
    let first = page_size(first)?;
    let after = after
        .map(|a| {
            HistoryCursor::decode_cursor(&a)
                .map(|c| c.0)
                .map_err(|e| format!("`after` is not a cursor of a history page: {e}"))
        })
        .transpose()?;
    let page = Page {
        instrument,
        from_ns: from
            .map(|t| nanos(t, "from"))
            .transpose()?
            .unwrap_or(i64::MIN),
        to_ns: to.map(|t| nanos(t, "to")).transpose()?.unwrap_or(i64::MAX),
        after,
        limit: i64::try_from(first).unwrap_or(i64::MAX).saturating_add(1),
        order: match order {
            SortOrder::Asc => Order::Asc,
            SortOrder::Desc => Order::Desc,
        },
        visible: Visible::all(),
    };
    Ok((page, first))
}

fn connection<R: Row>(
    rows: Vec<R>,
    page: &Page,
    first: usize,
    shards: u16,
) -> Result<Connection<HistoryCursor, R::Node>>
where
    R::Node: async_graphql::OutputType,
{
    let mut conn = Connection::new(page.after.is_some(), rows.len() > first);
    for row in rows.into_iter().take(first) {
        let key = row.key();
        conn.edges
            .push(Edge::new(OpaqueCursor(key), row.into_node(shards)?));
    }
    Ok(conn)
}

#[derive(Default)]
pub struct HistoryQuery;

#[Object]
impl HistoryQuery {
    /// One instrument's trades with `from <= ts < to` (both optional), ordered by
    /// event time, ties by source then seq: oldest first by default, newest first
    /// with `order: DESC`. Pages hold `first` trades (at most 1000); pass a page's
    /// `pageInfo.endCursor` as `after` (with the same arguments) for the next.
    #[allow(clippy::too_many_arguments)]
    #[graphql(complexity = "page_cost(first, child_complexity)")]
    async fn trades(
        &self,
        ctx: &Context<'_>,
        instrument: String,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        #[graphql(default = 100)] first: i32,
        after: Option<String>,
        #[graphql(default)] order: SortOrder,
    ) -> Result<Connection<HistoryCursor, TradeNode>> {
        let s = ctx.data::<Services>()?;
        let (mut page, first) = page_request(instrument, from, to, first, after, order)?;
        page.visible = Visible::of(principal(ctx)?.entitlements());
        let rows = history::trade_page(&s.pool, &page)
            .await
            .map_err(|e| internal("history", e))?;
        connection(rows, &page, first, s.shards)
    }

    /// One instrument's quotes with `from <= ts < to` (both optional), ordered by
    /// event time, ties by source then seq: oldest first by default, newest first
    /// with `order: DESC`. Pages hold `first` quotes (at most 1000); pass a page's
    /// `pageInfo.endCursor` as `after` (with the same arguments) for the next.
    #[allow(clippy::too_many_arguments)]
    #[graphql(complexity = "page_cost(first, child_complexity)")]
    async fn quotes(
        &self,
        ctx: &Context<'_>,
        instrument: String,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        #[graphql(default = 100)] first: i32,
        after: Option<String>,
        #[graphql(default)] order: SortOrder,
    ) -> Result<Connection<HistoryCursor, QuoteNode>> {
        let s = ctx.data::<Services>()?;
        let (mut page, first) = page_request(instrument, from, to, first, after, order)?;
        page.visible = Visible::of(principal(ctx)?.entitlements());
        let rows = history::quote_page(&s.pool, &page)
            .await
            .map_err(|e| internal("history", e))?;
        connection(rows, &page, first, s.shards)
    }
}
