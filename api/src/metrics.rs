//! The api's metrics and readiness.
//!
//! The hub counts once per dispatched batch (after its locks are released):
//! events handed to subscriptions, conflated away, subscriptions cut off as
//! too slow, and each event's freshness (now minus event time) once per event,
//! not per subscriber. Connections are counted by a guard each WebSocket and
//! SSE stream holds ([`ApiMetrics::connection`]).
//!
//! Readiness ([`register_ops`]): Redis and Postgres reachable, and the hub's
//! readers not behind: per shard, how long the oldest entry the hub has not
//! dispatched yet has been in the stream (by Redis's clock), at most
//! `max_behind`. The same check sets the subscription and behind gauges, so
//! they are read at scrape time.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use sqlx::PgPool;
use tickgraph_enrich::metrics::PostgresPing;
use tickgraph_ingest::event::now_nanos;
use tickgraph_ingest::ops::{
    self, BatchHistogram, Check, CheckLink, Ops, Outcome, OwnedLabel, StaticLabel,
};
use tickgraph_ingest::redis_link::query_by_slot;
use tickgraph_ingest::stream::parse_entries;

use crate::hub::Hub;
use crate::tick::{Tick, TickMeta};
use crate::Api;

/// How a client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Sse,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// The api's counters and gauges. Cheap to clone: every field is shared.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    delivered: Counter,
    conflated: Counter,
    dropped_slow: Family<StaticLabel, Counter>,
    connections: Family<StaticLabel, Gauge>,
    subscriptions: Family<StaticLabel, Gauge>,
    freshness: BatchHistogram,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self {
            delivered: Counter::default(),
            conflated: Counter::default(),
            dropped_slow: Family::default(),
            connections: Family::default(),
            subscriptions: Family::default(),
            freshness: BatchHistogram::freshness(),
        }
    }
}

/// What one dispatch did, counted by the hub while it delivered.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Dispatched {
    pub delivered: usize,
    pub conflated: usize,
    pub overflowed: usize,
}

impl ApiMetrics {
    /// Counts one dispatched batch: its counts, and each tick's freshness.
    pub(crate) fn dispatched(&self, d: Dispatched, ticks: &[Tick]) {
        self.delivered.inc_by(d.delivered as u64);
        if d.conflated > 0 {
            self.conflated.inc_by(d.conflated as u64);
        }
        if d.overflowed > 0 {
            self.slow("subscription").inc_by(d.overflowed as u64);
        }
        if ticks.is_empty() {
            return;
        }
        let now = now_nanos();
        let mut fresh = self.freshness.batch();
        for t in ticks {
            let ts = match t {
                Tick::Trade(t) => t.header().ts,
                Tick::Quote(q) => q.header().ts,
            };
            fresh.observe_ns(now - ts.nanos());
        }
        self.freshness.add(&fresh);
    }

    fn slow(&self, scope: &'static str) -> Counter {
        self.dropped_slow.get_or_create(&[("scope", scope)]).clone()
    }

    /// A live connection, counted until the guard is dropped.
    pub fn connection(&self, transport: Transport) -> Connection {
        let gauge = self
            .connections
            .get_or_create(&[("transport", transport.label())])
            .clone();
        gauge.inc();
        Connection {
            gauge,
            slow: (transport == Transport::Ws).then(|| self.slow("websocket")),
        }
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.get()
    }

    pub fn freshness(&self) -> &BatchHistogram {
        &self.freshness
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "api_delivered_events",
            "Events the hub handed to subscriptions (one per matching subscription; a conflated one's slot counts too)",
            self.delivered.clone(),
        );
        registry.register(
            "api_conflated_events",
            "Events a maxRate subscription never received: replaced by a newer one of the same instrument first",
            self.conflated.clone(),
        );
        registry.register(
            "api_slow_clients_dropped",
            "Clients cut off as too slow: a subscription whose queue filled (subscription), a WebSocket whose outbox passed its limit, closed with 4008 (websocket)",
            self.dropped_slow.clone(),
        );
        registry.register(
            "api_connections",
            "Open subscription connections, by transport (ws, sse)",
            self.connections.clone(),
        );
        registry.register(
            "api_subscriptions",
            "Live hub subscriptions, by kind (trades, quotes)",
            self.subscriptions.clone(),
        );
        registry.register_with_unit(
            "api_freshness",
            "Now minus event time when the hub dispatches an event (once per event)",
            Unit::Seconds,
            self.freshness.clone(),
        );
    }
}

/// One open connection in the connections gauge; dropping it takes it out.
#[derive(Debug)]
pub struct Connection {
    gauge: Gauge,
    slow: Option<Counter>,
}

impl Connection {
    /// This connection is being closed as too slow (WebSocket 4008).
    pub fn dropped_slow(&self) {
        if let Some(c) = &self.slow {
            c.inc();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The hub's readers not behind; sets the subscription and behind gauges.
pub struct HubReady {
    hub: Hub,
    link: CheckLink,
    max_behind: Duration,
    behind: Family<OwnedLabel, Gauge<f64, AtomicU64>>,
}

impl HubReady {
    pub fn new(hub: Hub, link: impl Into<CheckLink>, max_behind: Duration) -> Self {
        Self {
            hub,
            link: link.into(),
            max_behind,
            behind: Family::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "api_hub_behind",
            "Per shard, how long the oldest enriched entry the hub has not dispatched yet has been in the stream; 0 when it has dispatched everything",
            Unit::Seconds,
            self.behind.clone(),
        );
    }

    /// Per shard, seconds behind: `TIME` and the first entry after the hub's
    /// dispatched position, in one round trip. `TIME` is asked per shard: on a
    /// cluster each shard's entry ids come from its own node's clock.
    async fn measure(&self) -> Result<Vec<(u16, f64)>, String> {
        let Some(keys) = self.hub.stream_keys() else {
            return Ok(Vec::new());
        };
        let dispatched = self.hub.dispatched_positions();
        let groups: Vec<redis::Pipeline> = keys
            .iter()
            .zip(&dispatched)
            .map(|(key, (ms, seq, _))| {
                let mut pipe = redis::pipe();
                pipe.cmd("TIME");
                pipe.cmd("XRANGE")
                    .arg(key)
                    .arg(format!("({ms}-{seq}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(1);
                pipe
            })
            .collect();
        let groups = &groups;
        let replies = self
            .link
            .run(|mut con| async move { query_by_slot::<redis::Value>(&mut con, groups).await })
            .await
            .map_err(|e| format!("reading the enriched streams: {e}"))?;
        let mut out = Vec::new();
        for (shard, group) in replies.into_iter().enumerate() {
            let mut group = group.into_iter();
            let (secs, micros): (u64, u64) =
                redis::from_redis_value(group.next().ok_or("no reply to TIME")?)
                    .map_err(|e| format!("TIME: {e}"))?;
            let now_ms = secs * 1000 + micros / 1000;
            let entries = parse_entries(group.next().ok_or("no reply to XRANGE")?)?;
            let behind_ms = entries
                .first()
                .and_then(|e| e.id.split_once('-'))
                .and_then(|(ms, _)| ms.parse::<u64>().ok())
                .map_or(0, |ms| now_ms.saturating_sub(ms));
            out.push((
                u16::try_from(shard).unwrap_or(u16::MAX),
                behind_ms as f64 / 1e3,
            ));
        }
        Ok(out)
    }
}

impl Check for HubReady {
    fn name(&self) -> &'static str {
        "hub"
    }

    fn run(&self) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            let (trades, quotes) = self.hub.subscriber_counts();
            let m = self.hub.metrics();
            for (kind, n) in [("trades", trades), ("quotes", quotes)] {
                m.subscriptions
                    .get_or_create(&[("kind", kind)])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            let shards = match self.measure().await {
                Ok(s) => s,
                Err(e) => return Outcome::failed(e),
            };
            let mut late = Vec::new();
            for (shard, secs) in shards {
                self.behind
                    .get_or_create(&[("shard", shard.to_string())])
                    .set(secs);
                if secs > self.max_behind.as_secs_f64() {
                    late.push(format!(
                        "shard {shard}: {secs:.1} s behind, above {:?}",
                        self.max_behind
                    ));
                }
            }
            if late.is_empty() {
                Outcome::ok()
            } else {
                Outcome::failed(late.join("; "))
            }
        })
    }
}

/// Adds the api's metrics and checks to `ops`: Redis, Postgres, the hub; the
/// Redis ones over `link`, the process's check connection.
pub fn register_ops(ops: &mut Ops, api: &Api, link: CheckLink, pool: PgPool, max_behind: Duration) {
    let hub = api.hub();
    hub.metrics().register(ops.registry_mut());
    let ready = HubReady::new(hub.clone(), link.clone(), max_behind);
    ready.register(ops.registry_mut());
    ops.add_check(ops::RedisPing::new(link));
    ops.add_check(PostgresPing::new(pool));
    ops.add_check(ready);
}

#[cfg(test)]
mod tests {
    use tickgraph_ingest::ops::names::check_exposition;

    use super::*;

    #[test]
    fn every_metric_follows_the_rules() {
        let mut ops = Ops::new();
        let hub = Hub::new(8);
        let m = hub.metrics();
        m.register(ops.registry_mut());
        let client = redis::Client::open("redis://127.0.0.1:1").expect("url");
        let ready = HubReady::new(hub.clone(), client, Duration::from_secs(5));
        ready.register(ops.registry_mut());
        ready
            .behind
            .get_or_create(&[("shard", "0".into())])
            .set(0.5);
        let ws = m.connection(Transport::Ws);
        let _sse = m.connection(Transport::Sse);
        ws.dropped_slow();
        m.dispatched(
            Dispatched {
                delivered: 3,
                conflated: 1,
                overflowed: 1,
            },
            &[],
        );
        let text = ops.encode();
        for line in [
            "tickgraph_api_delivered_events_total 3",
            "tickgraph_api_conflated_events_total 1",
            "tickgraph_api_slow_clients_dropped_total{scope=\"subscription\"} 1",
            "tickgraph_api_slow_clients_dropped_total{scope=\"websocket\"} 1",
            "tickgraph_api_connections{transport=\"ws\"} 1",
            "tickgraph_api_hub_behind_seconds{shard=\"0\"} 0.5",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert_eq!(check_exposition(&text), Vec::<String>::new());
        drop(ws);
        assert!(ops
            .encode()
            .lines()
            .any(|l| l == "tickgraph_api_connections{transport=\"ws\"} 0"));
    }
}
