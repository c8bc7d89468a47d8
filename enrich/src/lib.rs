//! tickgraph-enrich: the transform between the raw and enriched streams, and the
//! sink from the enriched streams into Postgres history.
//!
//! # Layout
//! - [`record`]: the enriched stream entry ([`EnrichedRecord`], [`Derived`]).
//! - [`refdata`]: reference rows and the in-memory [`RefCache`], kept fresh by
//!   Postgres LISTEN/NOTIFY.
//! - [`transform`]: the pure function [`enrich`]: raw record + reference data ->
//!   enriched record, or the [`Unenrichable`] reason.
//! - [`consumer`]: the consumer-group loop both workers share: own pending first,
//!   then new entries, claiming from dead consumers, retry without loss.
//! - [`worker`]: the enrich worker: raw streams -> enriched streams + dead letters,
//!   one XACK-gated Lua commit per batch.
//! - [`deadletter`]: listing dead letters and replaying those a reference-data
//!   fix can cure, exactly once.
//! - [`loader`]: the history loader: enriched streams -> Postgres `trades` and
//!   `quotes`, idempotent.
//! - [`metrics`]: what both workers count per batch (events, dead letters by
//!   reason code, freshness), and the readiness checks of both (Postgres, their
//!   group's lag per shard), for [`tickgraph_ingest::ops`].
//! - [`demo`]: deterministic, realistic demo reference data and start prices.

pub mod consumer;
pub mod deadletter;
pub mod demo;
pub mod loader;
pub mod metrics;
pub mod record;
pub mod refdata;
pub mod retention;
pub mod transform;
pub mod worker;

pub use deadletter::{DeadLetterError, DeadLetters};
pub use demo::{load_demo_data, reference_price, DemoSummary};
pub use loader::{LoadConfig, LoadError};
pub use record::{Derived, EnrichedRecord};
pub use refdata::{RefCache, RefData};
pub use transform::{enrich, Unenrichable};
pub use worker::{EnrichConfig, EnrichError};
