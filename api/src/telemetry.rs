//! Logs and traces: `tracing` to stdout (text, or JSON lines with `--log-json`),
//! and, only when an endpoint is configured, every span exported over
//! OTLP/HTTP (protobuf) to an OpenTelemetry collector.
//!
//! Workers open one span per batch, never per event (the ingest writer per
//! round, enrich and the loader per consumer-group batch, the hub per read;
//! all named `batch`, told apart by `stage` or `group`), so exporting costs a
//! few spans per batch whatever the event rate. Spans leave through the
//! SDK's batch processor, on its own thread, so a slow collector never holds
//! up a worker; at most its queue (2,048 spans) is dropped.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("a tracing subscriber is already installed: {0}")]
    Init(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the exporter running; dropping it sends what spans are still queued.
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still queued, waiting for the collector's answer.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            if let Err(e) = p.force_flush() {
                tracing::warn!(error = %e, "flushing spans to the collector failed");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("stopping the span exporter: {e}");
            }
        }
    }
}

/// The traces URL for a collector's base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`'s
/// meaning): `http://127.0.0.1:4318` -> `http://127.0.0.1:4318/v1/traces`. A
/// URL that already ends in `/v1/traces` is kept.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// A tracer provider exporting to `endpoint` (a collector's base URL) over
/// OTLP/HTTP, as service `service`.
pub fn otlp_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let url = traces_url(endpoint);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: url,
            source,
        })?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build())
}

/// The layer that turns `tracing` spans into OpenTelemetry spans of `provider`.
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("tickgraph"))
}

/// Installs the process's subscriber: logs filtered by `RUST_LOG` (default
/// `info`), as JSON lines when `json`; and spans to `otlp_endpoint` when given.
pub fn init(json: bool, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = if json {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let provider = otlp_endpoint
        .map(|e| otlp_provider(e, "tickgraph"))
        .transpose()?;
    // The same filter as the logs: spans of dependencies stay out unless asked.
    let otel = provider
        .as_ref()
        .map(|p| otel_layer::<Registry>(p).with_filter(filter()));
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt.with_filter(filter()))
        .try_init()?;
    if let Some(e) = otlp_endpoint {
        tracing::info!(endpoint = %traces_url(e), "exporting spans over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
