//! Snapshot queries: the state of the market at a moment, per instrument its
//! newest quote and trade with `ts <= at`, from history (one SQL per kind).

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::{Context, Object, Result};
use chrono::{DateTime, Utc};

use super::history::nanos;
use super::types::{InstrumentNode, QuoteNode, TradeNode};
use super::{internal, list_cost, principal, Services, MAX_INSTRUMENTS};
use crate::history::{self, Visible};

/// GraphQL `InstrumentSnapshot`.
pub struct InstrumentSnapshot {
    instrument: String,
    quote: Option<QuoteNode>,
    trade: Option<TradeNode>,
}

/// One instrument at the snapshot's time.
#[Object]
impl InstrumentSnapshot {
    async fn instrument(&self) -> &str {
        &self.instrument
    }

    /// The newest quote at or before the snapshot's time; null when none.
    async fn quote(&self) -> Option<&QuoteNode> {
        self.quote.as_ref()
    }

    /// The newest trade at or before the snapshot's time; null when none.
    async fn trade(&self) -> Option<&TradeNode> {
        self.trade.as_ref()
    }

    /// The instrument's current reference data; null when unknown.
    async fn reference(&self, ctx: &Context<'_>) -> Result<Option<InstrumentNode>> {
        let data = ctx.data::<Services>()?.refs.read();
        Ok(data
            .instruments
            .get(&self.instrument)
            .cloned()
            .map(InstrumentNode))
    }
}

#[derive(Default)]
pub struct SnapshotQuery;

#[Object]
impl SnapshotQuery {
    /// For each instrument (at most 1000, answered in the order asked), its newest
    /// quote and newest trade with `ts <= at`, from history.
    #[graphql(complexity = "list_cost(instruments.len(), MAX_INSTRUMENTS, child_complexity)")]
    async fn snapshot(
        &self,
        ctx: &Context<'_>,
        instruments: Vec<String>,
        at: DateTime<Utc>,
    ) -> Result<Vec<InstrumentSnapshot>> {
        if instruments.len() > MAX_INSTRUMENTS {
            return Err(format!(
                "at most {MAX_INSTRUMENTS} instruments per snapshot, got {}",
                instruments.len()
            )
            .into());
        }
        let s = ctx.data::<Services>()?;
        let visible = Visible::of(principal(ctx)?.entitlements());
        let at_ns = nanos(at, "at")?;
        let (trades, quotes) = tokio::try_join!(
            history::trades_as_of(&s.pool, &instruments, at_ns, &visible),
            history::quotes_as_of(&s.pool, &instruments, at_ns, &visible),
        )
        .map_err(|e| internal("history", e))?;
        let trades: HashMap<String, TradeNode> = trades
            .into_iter()
            .map(|r| {
                let symbol = r.instrument.clone();
                let tick = r.into_tick(s.shards).map_err(|e| internal("history", e))?;
                Ok((symbol, TradeNode(Arc::new(tick))))
            })
            .collect::<Result<_>>()?;
        let quotes: HashMap<String, QuoteNode> = quotes
            .into_iter()
            .map(|r| {
                let symbol = r.instrument.clone();
                let tick = r.into_tick(s.shards).map_err(|e| internal("history", e))?;
                Ok((symbol, QuoteNode(Arc::new(tick))))
            })
            .collect::<Result<_>>()?;
        Ok(instruments
            .into_iter()
            .map(|instrument| InstrumentSnapshot {
                // Cloned, not removed: an instrument asked twice is answered twice.
                quote: quotes.get(&instrument).cloned(),
                trade: trades.get(&instrument).cloned(),
                instrument,
            })
            .collect())
    }
}
