//! tickgraph-ingest: the collector, and the contracts every other part shares.
//!
//! # Layout
//! - [`decimal`]: how decimals are written in stream entries (mantissa and scale).
//! - [`event`]: the event contract (`Event`, `Trade`, `Quote`), valid by type, and
//!   the per-event rules that turn a decoded [`event::WireEvent`] into one.
//! - [`wire`]: batch decoders for JSON arrays, NDJSON and MessagePack, item by item.
//! - [`stream`]: Redis Streams key layout, sharding, trimming and entry codecs.
//! - [`fast_decode`]: the hand-written decoder of raw and enriched entries that
//!   [`stream::decode_entry`] tries before `rmp_serde`.
//! - [`writer`]: the group-commit stream writer: batches from many requests become
//!   one pipelined round trip to Redis.
//! - [`spool`]: the local disk spool that holds answered rounds while Redis
//!   cannot take them.
//! - [`producers`]: who may send events: producer tokens (by their SHA-256),
//!   the sources each may claim, per-producer rate limits.
//! - [`server`]: the HTTP edge (`POST /v1/events`), built by [`server::Ingest::router`].
//! - [`listener`]: what every HTTP listener holds its clients to: a cap on
//!   connections, deadlines for headers, bodies and idle keep-alive.
//! - [`ops`]: what every component serves for operators: `/metrics` (one
//!   prometheus-client registry per process), `/healthz`, `/readyz` and its
//!   checks, and the per-batch histogram and naming rules the metrics share.
//! - [`metrics`]: ingest's own counters and readiness (accepting while Redis is
//!   down, since it spools).
//! - [`feed`]: the demo feed, a producer that sends realistic quotes and trades
//!   through the real HTTP path.

pub mod decimal;
pub mod event;
pub mod fast_decode;
pub mod feed;
pub mod listener;
pub mod metrics;
pub mod ops;
pub mod producers;
pub mod redis_link;
pub mod server;
pub mod spool;
pub mod stream;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod wire;
pub mod writer;

pub use event::{Event, Kind, Quote, Rejection, Side, Timestamp, Trade};
pub use stream::{StreamLayout, Trim};
