//! Integration tests of tickgraph-api through its front door, against real Redis
//! (a stream prefix per test) and real Postgres (a database per test; set
//! DATABASE_URL=postgres://root@127.0.0.1:5432/root).

mod deadletters;
mod extremes;
mod helpers;
mod history;
mod hostile;
mod http;
mod latest;
mod limits;
mod refdata;
mod subscriptions;
mod telemetry;
