//! Ingest's metrics and readiness.
//!
//! Counted once per batch, after the writer has stored it: a handler counts its
//! batch's events and rejection reasons locally and adds them with one atomic
//! add per counter (and one per distinct reason), never per event.
//!
//! Readiness: ingest keeps accepting while Redis is down, because it spools. So
//! `/readyz` stays 200 while the writer can store rounds (in Redis or the spool)
//! and reports Redis as `degraded`; it is 503 only once the writer refuses
//! rounds (the spool full or failing), when producers get 503 too.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::ops::{self, Check, CheckLink, Outcome, StaticLabel};
use crate::writer::WriterStats;

/// The reason codes of rejected (dead-lettered) events, a fixed set.
pub const REJECTION_CODES: &[&str] = &[
    "malformed",
    "missing_field",
    "wrong_kind_field",
    "invalid_value",
    "unencodable",
];

/// A rejection's reason as a code of [`REJECTION_CODES`]. The reasons are
/// free text (they quote the producer's values); the label must not be.
pub fn rejection_code(reason: &str) -> &'static str {
    if reason.starts_with("invalid event:") {
        // A decoder's error: not the right syntax or type.
        "malformed"
    } else if reason.contains("missing required field") {
        "missing_field"
    } else if reason.starts_with("source ") && reason.contains("is not one producer") {
        // See `server::ingest_batch`: the token does not own the source.
        "unowned_source"
    } else if reason.starts_with("a trade has no field")
        || reason.starts_with("a quote has no field")
    {
        "wrong_kind_field"
    } else {
        "invalid_value"
    }
}

/// Ingest's counters. Cheap to clone: every field is shared.
#[derive(Debug, Clone, Default)]
pub struct IngestMetrics {
    received: Counter,
    accepted: Counter,
    rejected: Family<StaticLabel, Counter>,
}

impl IngestMetrics {
    /// Counts one batch the writer stored: `received` events decoded,
    /// `accepted` of them in the raw streams or the spool, the others rejected
    /// for `reasons` (one per rejected event).
    pub fn stored_batch<'a>(
        &self,
        received: usize,
        accepted: usize,
        reasons: impl IntoIterator<Item = &'a str>,
    ) {
        self.received.inc_by(received as u64);
        self.accepted.inc_by(accepted as u64);
        let mut per_code = [0u64; REJECTION_CODES.len()];
        for r in reasons {
            let code = rejection_code(r);
            if let Some(i) = REJECTION_CODES.iter().position(|c| *c == code) {
                per_code[i] += 1;
            }
        }
        self.add_rejected(&per_code);
    }

    /// Counts a batch that was decoded but not stored (the writer refused it):
    /// received, neither accepted nor rejected.
    pub fn refused_batch(&self, received: usize) {
        self.received.inc_by(received as u64);
    }

    /// Counts events that could not be encoded for the stream (`unencodable`).
    pub fn unencodable(&self, n: usize) {
        let mut per_code = [0u64; REJECTION_CODES.len()];
        per_code[REJECTION_CODES.len() - 1] = n as u64;
        self.add_rejected(&per_code);
    }

    fn add_rejected(&self, per_code: &[u64; REJECTION_CODES.len()]) {
        for (code, &n) in REJECTION_CODES.iter().zip(per_code) {
            if n > 0 {
                self.rejected.get_or_create(&[("reason", code)]).inc_by(n);
            }
        }
    }

    pub fn received(&self) -> u64 {
        self.received.get()
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ingest_received_events",
            "Events decoded from producers' batches (accepted + rejected + those of batches answered 503)",
            self.received.clone(),
        );
        registry.register(
            "ingest_accepted_events",
            "Events answered with success: in a raw stream or the local spool",
            self.accepted.clone(),
        );
        registry.register(
            "ingest_rejected_events",
            "Events refused and dead-lettered to the ingest dead-letter stream, by reason code",
            self.rejected.clone(),
        );
    }
}

/// Adds ingest's counters, the writer's figures and [`IngestReady`] to `ops`.
pub fn register_ops(
    ops: &mut ops::Ops,
    metrics: &IngestMetrics,
    writer: Arc<WriterStats>,
    link: CheckLink,
    spool_max_bytes: u64,
) {
    metrics.register(ops.registry_mut());
    writer.register(ops.registry_mut());
    ops.add_check(IngestReady::new(link, writer, spool_max_bytes));
}

/// Ingest's readiness: see the module notes.
pub struct IngestReady {
    link: CheckLink,
    stats: Arc<WriterStats>,
    spool_max_bytes: u64,
}

impl IngestReady {
    pub fn new(link: impl Into<CheckLink>, stats: Arc<WriterStats>, spool_max_bytes: u64) -> Self {
        Self {
            link: link.into(),
            stats,
            spool_max_bytes,
        }
    }
}

impl Check for IngestReady {
    fn name(&self) -> &'static str {
        "ingest"
    }

    fn run(&self) -> BoxFuture<'_, Outcome> {
        Box::pin(async move {
            let spool = format!(
                "spool holds {} rounds, {} of {} bytes",
                self.stats.spool_rounds.get(),
                self.stats.spool_bytes.get(),
                self.spool_max_bytes
            );
            if self.stats.refusing.load(Ordering::Relaxed) {
                return Outcome::failed(format!(
                    "refusing events: Redis cannot take them and the spool cannot either; {spool}"
                ));
            }
            let ping = self.link.ping().await;
            let spooling = self.stats.spool_rounds.get() > 0;
            match (ping, spooling) {
                (Ok(()), false) => Outcome::ok(),
                (Ok(()), true) => Outcome::degraded(format!("draining the spool; {spool}")),
                (Err(e), _) => Outcome::degraded(format!("{e}; accepting into the spool; {spool}")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_batch, Format};

    /// Every rejection the decoders and rules make maps to the code its kind
    /// says, whatever the text quotes.
    #[test]
    fn rejection_reasons_map_to_their_codes() {
        let good =
            r#""source":"s","seq":1,"instrument":"AAPL","venue":"XNAS","ts":1700000000000000000"#;
        let cases = [
            (format!("{{{good},\"kind\":\"trade\",\"price\":true,\"qty\":1,\"side\":\"buy\"}}"), "malformed"),
            (format!("{{{good},\"kind\":\"trade\",\"qty\":1,\"side\":\"buy\"}}"), "missing_field"),
            (format!("{{{good},\"kind\":\"trade\",\"price\":1,\"qty\":1,\"side\":\"buy\",\"bid\":1}}"), "wrong_kind_field"),
            (format!("{{{good},\"kind\":\"trade\",\"price\":-1,\"qty\":1,\"side\":\"buy\"}}"), "invalid_value"),
            (format!("{{{good},\"kind\":\"bond\"}}"), "invalid_value"),
            (r#"{"kind":"quote"}"#.to_string(), "missing_field"),
        ];
        for (event, code) in cases {
            let body = format!("[{event}]");
            let items = decode_batch(Format::Json, body.as_bytes(), 10).expect("batch");
            let Err(r) = &items[0].outcome else {
                panic!("{event} was accepted")
            };
            assert_eq!(rejection_code(&r.0), code, "{}", r.0);
        }
        let producers = crate::producers::Producers::parse(
            format!(
                r#"{{"producers":[{{"name":"p","token_sha256":"{}","sources":["a"]}}]}}"#,
                crate::producers::token_sha256("t")
            )
            .as_bytes(),
        )
        .expect("producers");
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            "Bearer t".parse().expect("header"),
        );
        let p = producers
            .authenticate(&headers)
            .expect("known")
            .expect("producer");
        assert_eq!(rejection_code(&p.unowned("b").0), "unowned_source");
    }

    #[test]
    fn a_batch_adds_each_reason_once() {
        let m = IngestMetrics::default();
        let mut ops = ops::Ops::new();
        m.register(ops.registry_mut());
        m.stored_batch(
            5,
            2,
            ["`kind` must be", "invalid event: x", "`seq` too big"],
        );
        m.unencodable(1);
        let text = ops.encode();
        for line in [
            "tickgraph_ingest_received_events_total 5",
            "tickgraph_ingest_accepted_events_total 2",
            "tickgraph_ingest_rejected_events_total{reason=\"invalid_value\"} 2",
            "tickgraph_ingest_rejected_events_total{reason=\"malformed\"} 1",
            "tickgraph_ingest_rejected_events_total{reason=\"unencodable\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert_eq!(ops::names::check_exposition(&text), Vec::<String>::new());
    }

    #[test]
    fn the_writer_figures_follow_the_rules() {
        let mut ops = ops::Ops::new();
        WriterStats::default().register(ops.registry_mut());
        IngestMetrics::default().register(ops.registry_mut());
        let text = ops.encode();
        assert!(
            text.contains("tickgraph_ingest_refused_events_total 0"),
            "{text}"
        );
        assert!(text.contains("tickgraph_ingest_spool_bytes 0"), "{text}");
        assert_eq!(ops::names::check_exposition(&text), Vec::<String>::new());
    }
}
