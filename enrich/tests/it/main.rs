//! Integration tests of tickgraph-enrich against real Redis and real Postgres.
//! Run with DATABASE_URL=postgres://root@127.0.0.1:5432/root (each Postgres test
//! gets a database of its own); each Redis test uses a stream prefix of its own.

mod consumer;
mod demo;
mod helpers;
mod loader;
mod refcache;
mod retention;
mod worker;
