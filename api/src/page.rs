//! The live page: a small web app, served by the api itself, that shows a
//! ticking quote grid, a trade blotter and the pipeline's health, all driven by
//! tickgraph's own GraphQL subscriptions. Plain HTML and an ES module, compiled
//! into the binary: nothing to build or install at run time.

use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;

pub const PAGE_PATH: &str = "/live";
pub const SCRIPT_PATH: &str = "/live/app.js";

const PAGE: &str = include_str!("../static/live.html");
const SCRIPT: &str = include_str!("../static/app.js");

/// The page's routes, to merge into the api's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(PAGE_PATH, get(|| async { Html(PAGE) }))
        .route(
            SCRIPT_PATH,
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    SCRIPT,
                )
                    .into_response()
            }),
        )
}
