//! Integration tests of tickgraph-enrich against real Redis and real Postgres.
//! Run with DATABASE_URL=postgres://root@127.0.0.1:5432/postgres (each Postgres
//! test gets a database of its own) and, optionally, TG_TEST_REDIS_URL; each Redis
//! test uses a stream prefix of its own.

mod consumer;
mod deadletters;
mod decoders;
mod demo;
mod fast_decode;
mod helpers;
mod loader;
mod refcache;
mod retention;
mod worker;
