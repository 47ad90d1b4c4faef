//! Counters and histograms behind `<prefix>.stats` and the Prometheus `/metrics` page
//! (see `crate::http`), and the live handles a scrape reads (store size, NATS connection).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cluster::ClusterStatus;
use crate::protocol::ApiError;
use crate::retries::Retries;
use crate::store::Store;

/// The error codes counted one by one (see README "Errors"); any other counts as `other`.
pub const ERROR_CODES: [u16; 9] = [400, 403, 404, 413, 422, 429, 431, 500, 503];

/// Bounds of the commit round size histogram (requests per round).
pub const ROUND_SIZES: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4096];
/// Bounds of the commit round duration histogram, in microseconds.
pub const ROUND_MICROS: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// What the daemon counts since it started (and `pending`, which the store keeps).
pub struct Metrics {
    /// Schedules accepted (acknowledged, or committed without a reply subject).
    pub scheduled_total: AtomicU64,
    /// Schedules published and confirmed by the server.
    pub fired_total: AtomicU64,
    pub cancelled_total: AtomicU64,
    /// Requests answered (or dropped) with an error.
    pub errors_total: AtomicU64,
    /// Delivery attempts that failed (the schedule stays stored and is retried).
    pub delivery_errors_total: AtomicU64,
    /// Schedules refused because natsched may not publish to their target (403).
    /// Intake stream messages terminated and published to `<prefix>.rejected`.
    pub rejected_total: AtomicU64,
    pub denied_total: AtomicU64,
    /// Schedules in the store, as the committer last wrote it.
    pub pending: AtomicU64,
    /// Pending schedules per quota, as the committer last wrote them.
    pub quotas: Mutex<Vec<QuotaUsage>>,
    /// Why the store cannot be written, while it cannot (new schedules get 503 meanwhile).
    pub store_error: Mutex<Option<String>>,
    /// This instance's role for its prefix (see `crate::cluster`).
    cluster: Mutex<ClusterStatus>,
    /// Publish time minus due time, in microseconds.
    lateness: Mutex<Histogram<u64>>,
    /// The sum of every lateness recorded, in microseconds (a histogram's `_sum`).
    lateness_sum_us: AtomicU64,
    /// Requests (adds and cancels) per store round.
    pub round_sizes: FixedHistogram,
    /// Time from a round's first command to its commit (and fsync), in microseconds.
    pub round_micros: FixedHistogram,
    /// Handles a scrape reads live state from, once start-up has them.
    sources: Mutex<Sources>,
    /// Per API endpoint, in [`Endpoint::ALL`] order.
    endpoints: [EndpointStats; 5],
}

/// The request subjects natsched answers, as the micro-service protocol reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Add,
    Cancel,
    Get,
    List,
    Stats,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Add,
        Endpoint::Cancel,
        Endpoint::Get,
        Endpoint::List,
        Endpoint::Stats,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Add => "add",
            Endpoint::Cancel => "cancel",
            Endpoint::Get => "get",
            Endpoint::List => "list",
            Endpoint::Stats => "stats",
        }
    }

    /// The subject it listens on under `prefix`.
    pub fn subject(self, prefix: &str) -> String {
        match self {
            Endpoint::Add => format!("{prefix}.add.>"),
            other => format!("{prefix}.{}", other.name()),
        }
    }
}

/// Request and error counts of one endpoint.
#[derive(Default)]
pub struct EndpointStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// Total time from receipt to answer, in nanoseconds.
    pub processing_ns: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Errors by code, in [`ERROR_CODES`] order, then any other code.
    pub by_code: [AtomicU64; ERROR_CODES.len() + 1],
}

impl EndpointStats {
    fn count_error(&self, code: u16) {
        let index = ERROR_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(ERROR_CODES.len());
        self.by_code[index].fetch_add(1, Ordering::Relaxed);
    }
}

/// A histogram over fixed bounds, cheap enough to record from the store writer: one atomic
/// add per bucket hit, the sum and nothing else.
pub struct FixedHistogram {
    bounds: &'static [u64],
    /// Values up to each bound (not cumulative), then the values above the last one.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl FixedHistogram {
    pub fn new(bounds: &'static [u64]) -> FixedHistogram {
        FixedHistogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn record(&self, value: u64) {
        let index = self.bounds.partition_point(|bound| *bound < value);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// The sum, the count, and the cumulative count up to each bound.
    pub fn snapshot(&self) -> (u64, u64, Vec<(u64, u64)>) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, count) in self.bounds.iter().zip(self.counts.iter()) {
            cumulative += count.load(Ordering::Relaxed);
            buckets.push((*bound, cumulative));
        }
        let count = cumulative + self.counts[self.bounds.len()].load(Ordering::Relaxed);
        (self.sum.load(Ordering::Relaxed), count, buckets)
    }
}

/// What a scrape reads besides the counters. Set by start-up as it makes them; a scrape
/// before then reports what it has.
#[derive(Default, Clone)]
pub struct Sources {
    pub store: Option<Store>,
    pub client: Option<async_nats::Client>,
    pub retries: Option<Arc<Retries>>,
    /// Schedules held in memory (wheel and in-flight), while serving.
    pub resident: Option<Arc<AtomicUsize>>,
}

/// How full one `[[limits.quotas]]` entry is.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QuotaUsage {
    pub subjects: String,
    pub pending: u64,
    pub max_pending: u64,
}

/// Lateness percentiles in milliseconds.
#[derive(Debug, Serialize, PartialEq)]
pub struct LatenessMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub count: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            scheduled_total: AtomicU64::new(0),
            fired_total: AtomicU64::new(0),
            cancelled_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            delivery_errors_total: AtomicU64::new(0),
            denied_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            quotas: Mutex::default(),
            store_error: Mutex::default(),
            cluster: Mutex::default(),
            // 1 µs to 1 day at 3 significant digits; anything later is recorded as a day.
            lateness: Mutex::new(Histogram::new_with_bounds(1, 86_400_000_000, 3).expect("bounds")),
            lateness_sum_us: AtomicU64::new(0),
            round_sizes: FixedHistogram::new(&ROUND_SIZES),
            round_micros: FixedHistogram::new(&ROUND_MICROS),
            sources: Mutex::default(),
            endpoints: Default::default(),
        }
    }
}

impl Metrics {
    pub fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts an answered request (and, when `error` is given, an error) for `endpoint`.
    pub fn record_reply(&self, endpoint: Endpoint, elapsed: Duration, error: Option<ApiError>) {
        let stats = self.endpoint(endpoint);
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats
            .processing_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        if let Some(error) = error {
            self.errors_total.fetch_add(1, Ordering::Relaxed);
            stats.errors.fetch_add(1, Ordering::Relaxed);
            stats.count_error(error.code);
            *stats.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
        }
    }

    /// Counts a refused request that had no reply subject (a plain publish to `add`).
    pub fn record_unanswered(&self, code: u16) {
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        let stats = self.endpoint(Endpoint::Add);
        stats.errors.fetch_add(1, Ordering::Relaxed);
        stats.count_error(code);
    }

    /// Counts one store round of `requests` adds and cancels that took `took`.
    pub fn record_round(&self, requests: u64, took: Duration) {
        self.round_sizes.record(requests);
        self.round_micros.record(took.as_micros() as u64);
    }

    /// Changes the handles a scrape reads.
    pub fn set_sources(&self, change: impl FnOnce(&mut Sources)) {
        change(&mut self.sources.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn sources(&self) -> Sources {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets (or with `None` clears) why the store cannot be written.
    pub fn set_store_error(&self, error: Option<String>) {
        *self.store_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    pub fn store_error(&self) -> Option<String> {
        self.store_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_cluster(&self, status: ClusterStatus) {
        *self.cluster.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// Replicated mode: how many log entries this instance has still to apply.
    pub fn set_log_lag(&self, lag: u64) {
        self.cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log_lag = Some(lag);
    }

    pub fn cluster(&self) -> ClusterStatus {
        self.cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn quotas(&self) -> Vec<QuotaUsage> {
        self.quotas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn endpoint(&self, endpoint: Endpoint) -> &EndpointStats {
        let index = Endpoint::ALL
            .iter()
            .position(|e| *e == endpoint)
            .expect("listed");
        &self.endpoints[index]
    }

    /// Records how late each of a batch of publishes was, in microseconds.
    pub fn record_lateness(&self, lateness_us: impl IntoIterator<Item = u64>) {
        let mut histogram = self.lateness.lock().unwrap_or_else(|e| e.into_inner());
        let mut sum = 0u64;
        for us in lateness_us {
            histogram.saturating_record(us.max(1));
            sum = sum.saturating_add(us);
        }
        self.lateness_sum_us.fetch_add(sum, Ordering::Relaxed);
    }

    /// Lateness as a cumulative histogram over `bounds_us`: the sum (µs), the count, and
    /// how many were at most each bound (within the recording's 3 significant digits).
    pub fn lateness_buckets(&self, bounds_us: &[u64]) -> (u64, u64, Vec<(u64, u64)>) {
        let histogram = self.lateness.lock().unwrap_or_else(|e| e.into_inner());
        let buckets = bounds_us
            .iter()
            .map(|bound| (*bound, histogram.count_between(0, *bound)))
            .collect();
        let sum = self.lateness_sum_us.load(Ordering::Relaxed);
        (sum, histogram.len(), buckets)
    }

    pub fn lateness(&self) -> LatenessMs {
        let histogram = self.lateness.lock().unwrap_or_else(|e| e.into_inner());
        let ms = |us: u64| us as f64 / 1000.0;
        if histogram.is_empty() {
            return LatenessMs {
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                count: 0,
            };
        }
        LatenessMs {
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            count: histogram.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_percentiles() {
        let metrics = Metrics::default();
        assert_eq!(metrics.lateness().count, 0);
        metrics.record_lateness((1..=1000).map(|ms| ms * 1000));
        let lateness = metrics.lateness();
        assert_eq!(lateness.count, 1000);
        assert!((lateness.p50 - 500.0).abs() < 1.0, "{lateness:?}");
        assert!((lateness.p99 - 990.0).abs() < 1.0, "{lateness:?}");
        assert!((lateness.max - 1000.0).abs() < 1.0, "{lateness:?}");
        let (sum, count, buckets) = metrics.lateness_buckets(&[1_000, 10_000, 2_000_000]);
        assert_eq!(count, 1000);
        assert_eq!(sum, (1..=1000).sum::<u64>() * 1000);
        assert_eq!(buckets, [(1_000, 1), (10_000, 10), (2_000_000, 1000)]);
    }

    #[test]
    fn fixed_histogram_counts_each_value_in_the_first_bucket_that_holds_it() {
        let histogram = FixedHistogram::new(&[1, 10, 100]);
        for value in [0, 1, 2, 10, 11, 100, 101, 5000] {
            histogram.record(value);
        }
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(sum, 5225);
        assert_eq!(count, 8);
        assert_eq!(buckets, [(1, 2), (10, 4), (100, 6)]);
    }

    #[test]
    fn errors_are_counted_by_code() {
        let metrics = Metrics::default();
        let elapsed = Duration::from_millis(1);
        metrics.record_reply(Endpoint::Add, elapsed, Some(ApiError::bad_request("x")));
        metrics.record_reply(Endpoint::Add, elapsed, Some(ApiError::new(418, "teapot")));
        metrics.record_reply(Endpoint::Add, elapsed, None);
        metrics.record_unanswered(503);
        let add = metrics.endpoint(Endpoint::Add);
        let count = |i: usize| add.by_code[i].load(Ordering::Relaxed);
        assert_eq!(count(0), 1); // 400
        assert_eq!(count(8), 1); // 503
        assert_eq!(count(ERROR_CODES.len()), 1); // other
        assert_eq!(add.errors.load(Ordering::Relaxed), 3);
        assert_eq!(metrics.errors_total.load(Ordering::Relaxed), 3);
    }
}
