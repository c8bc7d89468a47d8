//! The enrich worker's and the loader's metrics, and the readiness checks of
//! both: Postgres reachable, and their consumer group not too far behind.
//!
//! Counted once per batch: a worker counts its batch locally (events, dead
//! letters by reason, freshness buckets) and adds the totals after the batch is
//! committed, so a batch retried after a failure is counted once.
//!
//! Group lag and pending counts are read at scrape time (and by `/readyz`)
//! with `XINFO GROUPS`, one call per shard, within the check's timeout.

use std::time::Duration;

use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tickgraph_ingest::ops::{
    is_broken, BatchHistogram, Check, CheckLink, Outcome, OwnedLabel, StaticLabel,
};

/// The enrich worker's counters. Cheap to clone: every field is shared.
#[derive(Debug, Clone)]
pub struct EnrichMetrics {
    pub(crate) enriched: Counter,
    pub(crate) resent: Counter,
    pub(crate) dead_letters: Family<StaticLabel, Counter>,
    /// Now minus event time, per event, when enrich takes it.
    pub(crate) freshness: BatchHistogram,
}

impl Default for EnrichMetrics {
    fn default() -> Self {
        Self {
            enriched: Counter::default(),
            resent: Counter::default(),
            dead_letters: Family::default(),
            freshness: BatchHistogram::freshness(),
        }
    }
}

/// Dead-letter reason codes of enrich: what [`crate::Unenrichable::code`] gives,
/// and the entry-level ones.
pub const ENRICH_DEAD_LETTER_CODES: &[&str] = &[
    "unknown_instrument",
    "unknown_venue",
    "unknown_account",
    "no_fx_rate",
    "overflow",
    "undecodable",
    "unencodable",
];

/// Dead-letter reason codes of the loader.
pub const LOAD_DEAD_LETTER_CODES: &[&str] = &["unloadable_entry", "unloadable_event"];

/// Adds per-code counts (`codes[i]` counted `counts[i]` times) to `family`.
pub(crate) fn add_codes(
    family: &Family<StaticLabel, Counter>,
    codes: &[&'static str],
    counts: &[u64],
) {
    for (code, &n) in codes.iter().zip(counts) {
        if n > 0 {
            family.get_or_create(&[("reason", code)]).inc_by(n);
        }
    }
}

impl EnrichMetrics {
    pub fn enriched(&self) -> u64 {
        self.enriched.get()
    }

    pub fn freshness(&self) -> &BatchHistogram {
        &self.freshness
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "enrich_enriched_events",
            "Events enriched and written to the enriched streams",
            self.enriched.clone(),
        );
        registry.register(
            "enrich_resent_events",
            "Events dropped as a producer's re-send (same source and seq within the dedupe window)",
            self.resent.clone(),
        );
        registry.register(
            "enrich_dead_letters",
            "Events (or undecodable entries) enrich dead-lettered, by reason code",
            self.dead_letters.clone(),
        );
        registry.register_with_unit(
            "enrich_freshness",
            "Now minus event time when enrich takes an event",
            Unit::Seconds,
            self.freshness.clone(),
        );
    }
}

/// The loader's counters. Cheap to clone: every field is shared.
#[derive(Debug, Clone, Default)]
pub struct LoadMetrics {
    pub(crate) loaded: Counter,
    pub(crate) dead_letters: Family<StaticLabel, Counter>,
}

impl LoadMetrics {
    pub fn loaded(&self) -> u64 {
        self.loaded.get()
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "load_loaded_events",
            "Events written to the history tables (trades and quotes rows committed)",
            self.loaded.clone(),
        );
        registry.register(
            "load_dead_letters",
            "Enriched entries or events the loader could not load and dead-lettered, by reason code",
            self.dead_letters.clone(),
        );
    }
}

/// A consumer group's lag and pending entries per shard, as gauges, and
/// `failed` when the lag of any shard is above a threshold.
pub struct GroupLag {
    name: &'static str,
    link: CheckLink,
    group: String,
    streams: Vec<(u16, String)>,
    max_lag: u64,
    lag: Family<OwnedLabel, Gauge>,
    pending: Family<OwnedLabel, Gauge>,
}

impl GroupLag {
    /// `name`: the check's and the metrics' component (`enrich`, `load`);
    /// `streams`: `(shard, key)` of every stream the group consumes;
    /// `max_lag`: entries not yet delivered to the group, per shard, above
    /// which the component is not ready.
    pub fn new(
        name: &'static str,
        link: impl Into<CheckLink>,
        group: &str,
        streams: Vec<(u16, String)>,
        max_lag: u64,
    ) -> Self {
        Self {
            name,
            link: link.into(),
            group: group.to_owned(),
            streams,
            max_lag,
            lag: Family::default(),
            pending: Family::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            format!("{}_group_lag_entries", self.name),
            format!(
                "Entries of each shard's stream not yet delivered to the {} group (XINFO GROUPS lag; absent when Redis cannot tell)",
                self.group
            ),
            self.lag.clone(),
        );
        registry.register(
            format!("{}_group_pending_entries", self.name),
            format!(
                "Entries of each shard's stream delivered to the {} group and not yet acknowledged",
                self.group
            ),
            self.pending.clone(),
        );
    }

    /// `XINFO GROUPS` of every stream, on the check connection: per stream its
    /// reply, or the error Redis gave for that stream alone (no stream yet).
    async fn read_groups(
        &self,
    ) -> Result<Vec<redis::RedisResult<redis::streams::StreamInfoGroupsReply>>, String> {
        let streams = &self.streams;
        self.link
            .run(|mut con| async move {
                let mut out = Vec::with_capacity(streams.len());
                for (_, key) in streams {
                    let reply = redis::cmd("XINFO")
                        .arg("GROUPS")
                        .arg(key)
                        .query_async(&mut con)
                        .await;
                    match reply {
                        Err(e) if is_broken(&e) => return Err(e),
                        other => out.push(other),
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn measure(&self) -> Result<Vec<String>, String> {
        let replies = self.read_groups().await?;
        let mut problems = Vec::new();
        for ((shard, key), reply) in self.streams.iter().zip(replies) {
            let label = [("shard", shard.to_string())];
            let groups = match reply {
                Ok(g) => g,
                // Nobody has read or written the stream yet.
                Err(e) if e.to_string().contains("no such key") => {
                    problems.push(format!("shard {shard}: no stream {key} yet"));
                    continue;
                }
                Err(e) => return Err(format!("XINFO GROUPS {key}: {e}")),
            };
            let Some(g) = groups.groups.iter().find(|g| g.name == self.group) else {
                problems.push(format!(
                    "shard {shard}: no group {} on {key} yet",
                    self.group
                ));
                continue;
            };
            self.pending
                .get_or_create(&label)
                .set(i64::try_from(g.pending).unwrap_or(i64::MAX));
            match g.lag {
                Some(lag) => {
                    let lag = u64::try_from(lag).unwrap_or(u64::MAX);
                    self.lag
                        .get_or_create(&label)
                        .set(i64::try_from(lag).unwrap_or(i64::MAX));
                    if lag > self.max_lag {
                        problems.push(format!(
                            "shard {shard}: lag {lag} entries, above {}",
                            self.max_lag
                        ));
                    }
                }
                // Redis cannot tell (entries deleted in the range): no sample
                // rather than a wrong one.
                None => {
                    self.lag.remove(&label);
                }
            }
        }
        Ok(problems)
    }
}

impl Check for GroupLag {
    fn name(&self) -> &'static str {
        self.name
    }

    fn run(&self) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            match self.measure().await {
                Ok(p) if p.is_empty() => Outcome::ok(),
                Ok(p) => Outcome::failed(p.join("; ")),
                Err(e) => Outcome::failed(e),
            }
        })
    }
}

/// Postgres reachable: `SELECT 1` on the pool, within the check's timeout.
pub struct PostgresPing {
    pool: sqlx::PgPool,
}

impl PostgresPing {
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool }
    }
}

/// Shorter than the check's own timeout, so that the reason is Postgres's.
const PG_TIMEOUT: Duration = Duration::from_millis(900);

impl Check for PostgresPing {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn run(&self) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            let select = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool);
            match tokio::time::timeout(PG_TIMEOUT, select).await {
                Ok(Ok(_)) => Outcome::ok(),
                Ok(Err(e)) => Outcome::failed(format!("postgres unreachable: {e}")),
                Err(_) => Outcome::failed(format!("postgres: no answer within {PG_TIMEOUT:?}")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use tickgraph_ingest::ops::names::check_exposition;
    use tickgraph_ingest::ops::Ops;

    use super::*;

    #[test]
    fn every_metric_follows_the_rules() {
        let mut ops = Ops::new();
        let (e, l) = (EnrichMetrics::default(), LoadMetrics::default());
        e.register(ops.registry_mut());
        l.register(ops.registry_mut());
        add_codes(&e.dead_letters, ENRICH_DEAD_LETTER_CODES, &[1; 7]);
        add_codes(&l.dead_letters, LOAD_DEAD_LETTER_CODES, &[1; 2]);
        let client = redis::Client::open("redis://127.0.0.1:1").expect("url");
        let lag = GroupLag::new("enrich", client, "enrich", vec![(0, "k".into())], 10);
        lag.register(ops.registry_mut());
        lag.lag.get_or_create(&[("shard", "0".into())]).set(3);
        let text = ops.encode();
        for name in [
            "tickgraph_enrich_enriched_events_total 0",
            "tickgraph_enrich_dead_letters_total{reason=\"no_fx_rate\"} 1",
            "tickgraph_enrich_freshness_seconds_count 0",
            "tickgraph_load_loaded_events_total 0",
            "tickgraph_enrich_group_lag_entries{shard=\"0\"} 3",
        ] {
            assert!(text.lines().any(|l| l == name), "no {name:?} in\n{text}");
        }
        assert_eq!(check_exposition(&text), Vec::<String>::new());
    }

    #[test]
    fn every_unenrichable_reason_has_a_listed_code() {
        use crate::Unenrichable as U;
        for u in [
            U::UnknownInstrument("X".into()),
            U::UnknownVenue("X".into()),
            U::UnknownAccount("X".into()),
            U::NoFxRate("X".into()),
            U::Overflow("mid"),
        ] {
            assert!(ENRICH_DEAD_LETTER_CODES.contains(&u.code()), "{u}");
        }
    }
}
