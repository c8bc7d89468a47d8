//! Span export: a real worker's batch span reaches an OTLP/HTTP collector (a
//! local axum server standing in for one) through the exporter `tickgraph`
//! installs with `--otlp-endpoint`.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use tickgraph_api::telemetry;
use tickgraph_ingest::spool::SpoolConfig;
use tickgraph_ingest::writer::{RawEntry, StreamWriter, WriterConfig};
use tickgraph_ingest::StreamLayout;
use tracing_subscriber::layer::SubscriberExt;

use crate::helpers::redis_url;

const DEADLINE: Duration = Duration::from_secs(30);

/// The `stage` attribute of every span named `batch` in an export request.
fn batch_stages(req: &ExportTraceServiceRequest) -> Vec<String> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        for ss in &rs.scope_spans {
            for span in ss.spans.iter().filter(|s| s.name == "batch") {
                for kv in &span.attributes {
                    if kv.key == "stage" {
                        if let Some(AnyValue::StringValue(v)) =
                            kv.value.as_ref().and_then(|v| v.value.as_ref())
                        {
                            out.push(v.clone());
                        }
                    }
                }
            }
        }
    }
    out
}

/// Current-thread runtime: the subscriber set for this test's thread is the
/// one the writer task (spawned on the same thread) records its spans with.
#[tokio::test]
async fn a_batch_span_reaches_the_otlp_collector() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let collector = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let provider =
        telemetry::otlp_provider(&format!("http://{addr}"), "tickgraph-test").expect("exporter");
    let subscriber = tracing_subscriber::registry().with(telemetry::otel_layer(&provider));
    let guard = tracing::subscriber::set_default(subscriber);

    // A real worker: ingest's stream writer storing one batch in one round.
    let spool = tempfile::tempdir().expect("tempdir");
    let layout = StreamLayout::new(format!("otel{}", rand::random::<u32>()), 1);
    let key = layout.raw(0);
    let mut cfg = WriterConfig::new(layout);
    cfg.spool = SpoolConfig::new(spool.path());
    let client = redis::Client::open(redis_url()).expect("redis url");
    let (writer, task) = StreamWriter::spawn(cfg, client.clone()).expect("writer");
    let record = b"r0".to_vec();
    writer
        .write(vec![RawEntry { shard: 0, record }], Vec::new())
        .await
        .expect("write");
    drop(writer);
    task.await.expect("writer task");
    drop(guard);

    // The exporter's thread posts over blocking HTTP to the collector, which
    // runs on this thread: flush from another.
    let flushed = tokio::task::spawn_blocking(move || {
        let flushed = provider.force_flush();
        let _ = provider.shutdown();
        flushed
    });
    let mut stages = Vec::new();
    let received = tokio::time::timeout(DEADLINE, async {
        while let Some(body) = rx.recv().await {
            let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            stages.extend(batch_stages(&req));
            if stages.iter().any(|s| s == "ingest") {
                return;
            }
        }
    })
    .await;
    assert!(received.is_ok(), "no ingest batch span arrived: {stages:?}");
    flushed.await.expect("flush task").expect("flushed");

    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(&key)
        .arg(tickgraph_ingest::writer::writer_marker(&key, "ingest"))
        .query_async(&mut con)
        .await;
}
