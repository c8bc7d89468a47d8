//! A histogram fed a whole batch at a time.
//!
//! prometheus-client's `Histogram` takes a lock per observation; at 100k events/s
//! that lock (and its cache line, shared by every worker) would show in the
//! profile. Here a worker counts a batch into a [`Batch`] on its own stack and
//! adds it with one atomic add per non-empty bucket; the registry encodes it
//! through prometheus-client's [`EncodeMetric`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds, in seconds, for data freshness (now minus event time): from a
/// millisecond, the pipeline's best, to five minutes, where something is stuck.
pub const FRESHNESS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Most finite bounds a histogram may have, so that a [`Batch`] fits on the stack.
pub const MAX_BUCKETS: usize = 24;

/// A histogram of durations, fed per batch. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct BatchHistogram {
    inner: Arc<Inner>,
}

struct Inner {
    bounds: &'static [f64],
    /// `bounds` in nanoseconds, for the per-event comparison.
    bounds_ns: Vec<u64>,
    /// Per bucket, not cumulative; the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    /// The sum in seconds, as `f64` bits (added once per batch).
    sum: AtomicU64,
}

impl std::fmt::Debug for BatchHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchHistogram")
            .field("bounds", &self.inner.bounds)
            .finish_non_exhaustive()
    }
}

impl BatchHistogram {
    /// `bounds`: increasing upper bounds in seconds, at most [`MAX_BUCKETS`].
    ///
    /// # Panics
    /// When `bounds` are not increasing or too many: a programming error,
    /// caught by the first test that builds the histogram.
    pub fn new(bounds: &'static [f64]) -> Self {
        assert!(bounds.len() <= MAX_BUCKETS, "too many histogram buckets");
        assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "histogram bounds must increase"
        );
        Self {
            inner: Arc::new(Inner {
                bounds,
                bounds_ns: bounds.iter().map(|s| (s * 1e9) as u64).collect(),
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    /// The freshness histogram: [`FRESHNESS_BUCKETS`].
    pub fn freshness() -> Self {
        Self::new(FRESHNESS_BUCKETS)
    }

    /// An empty batch to count observations into.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            bounds_ns: &self.inner.bounds_ns,
            counts: [0; MAX_BUCKETS + 1],
            sum_ns: 0,
        }
    }

    /// Adds a batch's observations: one atomic add per bucket it touched.
    pub fn add(&self, batch: &Batch<'_>) {
        let mut any = false;
        for (slot, &n) in self.inner.buckets.iter().zip(&batch.counts) {
            if n > 0 {
                slot.fetch_add(n, Ordering::Relaxed);
                any = true;
            }
        }
        if !any {
            return;
        }
        let add = batch.sum_ns as f64 / 1e9;
        // Once per batch, so a compare-and-swap loop costs nothing that shows.
        let _ = self
            .inner
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + add).to_bits())
            });
    }

    /// Observations so far, in total.
    pub fn count(&self) -> u64 {
        self.inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of the observations so far, in seconds.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.inner.sum.load(Ordering::Relaxed))
    }
}

/// One batch's observations, counted without atomics.
pub struct Batch<'h> {
    bounds_ns: &'h [u64],
    counts: [u64; MAX_BUCKETS + 1],
    sum_ns: u64,
}

impl Batch<'_> {
    /// Counts a duration in nanoseconds. A negative one (an event time ahead of
    /// this machine's clock) counts as zero, so the sum never goes down.
    pub fn observe_ns(&mut self, ns: i64) {
        let ns = u64::try_from(ns).unwrap_or(0);
        let i = self.bounds_ns.partition_point(|&b| b < ns);
        self.counts[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Observations in this batch.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl TypedMetric for BatchHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for BatchHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.inner;
        // Read once, and the count taken from the same reads, so that one
        // scrape is consistent even while batches are added.
        let counts: Vec<u64> = inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.sum(), counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::{Registry, Unit};

    use super::*;

    const MS: i64 = 1_000_000;

    #[test]
    fn a_batch_lands_in_the_buckets_of_its_observations() {
        let h = BatchHistogram::new(&[0.001, 0.01, 1.0]);
        let mut b = h.batch();
        // Bounds are inclusive, as Prometheus's `le` says.
        for ns in [0, MS, MS + 1, 10 * MS, 999 * MS, 5_000 * MS, -7 * MS] {
            b.observe_ns(ns);
        }
        assert_eq!(b.count(), 7);
        h.add(&b);
        h.add(&h.batch());
        assert_eq!(h.count(), 7);
        let sum = (MS + MS + 1 + 10 * MS + 999 * MS + 5_000 * MS) as f64 / 1e9;
        assert!((h.sum() - sum).abs() < 1e-9, "{}", h.sum());

        let mut registry = Registry::with_prefix("tickgraph");
        registry.register_with_unit("test_freshness", "Freshness.", Unit::Seconds, h.clone());
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("encodes");
        for line in [
            "# TYPE tickgraph_test_freshness_seconds histogram",
            // 0 ns, 1 ms and the negative one, counted as zero.
            "tickgraph_test_freshness_seconds_bucket{le=\"0.001\"} 3",
            "tickgraph_test_freshness_seconds_bucket{le=\"0.01\"} 5",
            "tickgraph_test_freshness_seconds_bucket{le=\"1\"} 6",
            "tickgraph_test_freshness_seconds_bucket{le=\"+Inf\"} 7",
            "tickgraph_test_freshness_seconds_count 7",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn batches_added_from_many_threads_all_count() {
        let h = BatchHistogram::freshness();
        std::thread::scope(|s| {
            for t in 0..4 {
                let h = h.clone();
                s.spawn(move || {
                    for _ in 0..100 {
                        let mut b = h.batch();
                        for i in 0..10 {
                            b.observe_ns((t * 10 + i) * MS);
                        }
                        h.add(&b);
                    }
                });
            }
        });
        assert_eq!(h.count(), 4_000);
    }

    #[test]
    #[should_panic(expected = "increase")]
    fn bounds_must_increase() {
        let _ = BatchHistogram::new(&[1.0, 0.5]);
    }
}
