//! End-to-end tests: the whole pipeline (the same `Pipeline` that `tickgraph all`
//! runs) against real Redis and Postgres, driven through its own front doors with
//! real HTTP and WebSocket clients. Each test has its own database
//! (`#[sqlx::test]`) and its own stream prefix, so tests run in parallel.

mod auth;
mod bad_input;
mod cluster;
mod faults;
mod flood;
mod flow;
mod helpers;
mod history;
mod metrics;
mod page;
mod protocol;
mod resume;
mod screens;
mod sse;
